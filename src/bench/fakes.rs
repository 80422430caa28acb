//! The bench's stand-ins for providers: a minimal HTTP server in the process (for an HTTP
//! email or SMS API, which cannot be reached from here) and postfix's smtp-sink (a real SMTP
//! server that accepts and discards).

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::config::{EmailProviderKind, Settings, SmtpUrl};

/// An HTTP/1.1 server answering `200 {}` to every request on kept-alive connections. While
/// `recording`, it notes when each message (by its `idempotency-key`) arrived.
pub(super) struct HttpProvider {
    url: String,
    arrivals: Arc<Mutex<Option<HashMap<i64, SystemTime>>>>,
    server: tokio::task::JoinHandle<()>,
}

impl HttpProvider {
    /// Listens on a free local port.
    pub(super) async fn start() -> anyhow::Result<HttpProvider> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/messages", listener.local_addr()?);
        let arrivals: Arc<Mutex<Option<HashMap<i64, SystemTime>>>> = Arc::default();
        let noted = arrivals.clone();
        let server = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                stream.set_nodelay(true).ok();
                tokio::spawn(answer(stream, noted.clone()));
            }
        });
        Ok(HttpProvider {
            url,
            arrivals,
            server,
        })
    }

    /// `settings` sending email by the `webhook` provider to this server.
    pub(super) fn settings(&self, settings: &Settings) -> Settings {
        let mut settings = settings.clone();
        settings.email_providers = vec![EmailProviderKind::Webhook];
        settings.webhook_url = Some(self.url.clone());
        settings.webhook_secret = Some("bench".to_owned().into());
        settings
    }

    /// Starts noting arrivals.
    pub(super) fn record(&self) {
        *self.arrivals.lock().expect("arrivals") = Some(HashMap::new());
    }

    /// Stops noting arrivals: message id → when it arrived.
    pub(super) fn recorded(&self) -> HashMap<i64, SystemTime> {
        self.arrivals
            .lock()
            .expect("arrivals")
            .take()
            .unwrap_or_default()
    }
}

impl Drop for HttpProvider {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn answer(
    stream: tokio::net::TcpStream,
    arrivals: Arc<Mutex<Option<HashMap<i64, SystemTime>>>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let arrived = SystemTime::now();
        let (mut length, mut message) = (0, None);
        loop {
            line.clear();
            if reader.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            if line.trim_end().is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                let value = value.trim();
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.parse().unwrap_or(0);
                } else if name.eq_ignore_ascii_case("idempotency-key") {
                    message = value
                        .strip_prefix("lifecycle-")
                        .and_then(|id| id.parse().ok());
                }
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).await?;
        if let (Some(id), Some(noted)) = (message, arrivals.lock().expect("arrivals").as_mut()) {
            noted.insert(id, arrived);
        }
        reader
            .get_mut()
            .write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
            )
            .await?;
    }
}

/// smtp-sink on a free local port, stopped when dropped.
pub(super) struct SmtpSink {
    /// Where it listens.
    pub url: SmtpUrl,
    child: Child,
}

impl SmtpSink {
    /// Starts smtp-sink (from postfix) if it is installed: `None` if it is not.
    pub(super) fn start() -> anyhow::Result<Option<SmtpSink>> {
        let Some(program) = ["/usr/sbin/smtp-sink", "/usr/bin/smtp-sink"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
        else {
            return Ok(None);
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let address = format!("127.0.0.1:{port}");
        let mut command = Command::new(program);
        // As root it must be told which user to become; 1000 is its connection backlog.
        if is_root() {
            command.args(["-u", "root"]);
        }
        let child = command
            .args([address.as_str(), "1000"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        let sink = SmtpSink {
            url: format!("smtp://{address}")
                .parse()
                .map_err(|e: String| anyhow::anyhow!(e))?,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&address).is_err() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "smtp-sink did not listen on {address} within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Some(sink))
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("Uid:"))?;
            line.split_whitespace().nth(1).map(|uid| uid == "0")
        })
        .unwrap_or(false)
}
