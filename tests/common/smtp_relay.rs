//! An SMTP relay in front of smtp-sink that injects faults into chosen mail transactions: a
//! soft refusal at `DATA` (the server never sees the mail), or a connection dropped after the
//! mail's final dot (the server has the mail, the client never hears so). The second is the
//! case a sender cannot tell from a lost mail: lifecycle must record it as unsure and may send
//! it again, and the sink then shows the duplicate. It can also answer `RCPT` itself, with
//! whatever reply a test chooses (a mailbox refused, a relay's policy).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// What the relay does to one mail transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Relay it.
    None,
    /// Answer `421` to `DATA` and hang up.
    SoftRejectData,
    /// Relay the mail, let the server accept it, then hang up before the client hears.
    DropAfterDot,
    /// Hang up halfway through the mail: the server never gets it (and the client cannot
    /// tell this from `DropAfterDot`).
    DropMidData,
    /// Relay the mail, and its verdict half a second late: sends stay in flight a while.
    SlowVerdict,
}

/// The running relay.
pub struct SmtpRelay {
    /// Its port.
    pub port: u16,
    /// Faults injected so far, by kind: (soft rejects, drops after the dot, drops mid-data).
    injected: Arc<(AtomicUsize, AtomicUsize, AtomicUsize)>,
    /// `RCPT` commands the relay answered itself.
    refused: Arc<AtomicUsize>,
}

/// The relay's own answer to an `RCPT` (its recipient line), if it gives one: a whole reply
/// line such as `554 5.7.1 Relay access denied`.
pub type RcptPlan = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

impl SmtpRelay {
    /// Relays to `127.0.0.1:upstream`; `plan(n)` decides the fault of the n-th `DATA` (from 0).
    pub async fn start(upstream: u16, plan: fn(usize) -> Fault) -> SmtpRelay {
        SmtpRelay::start_with(upstream, plan, Arc::new(|_| None)).await
    }

    /// The same, with `rcpt` answering `RCPT` commands in the server's stead.
    pub async fn start_with(upstream: u16, plan: fn(usize) -> Fault, rcpt: RcptPlan) -> SmtpRelay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mails = Arc::new(AtomicUsize::new(0));
        let injected = Arc::new((
            AtomicUsize::new(0),
            AtomicUsize::new(0),
            AtomicUsize::new(0),
        ));
        let refused = Arc::new(AtomicUsize::new(0));
        let counts = injected.clone();
        let answered = refused.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (mails, counts) = (mails.clone(), counts.clone());
                let (rcpt, answered) = (rcpt.clone(), answered.clone());
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await {
                        let own = Own {
                            rcpt: &*rcpt,
                            answered: &answered,
                        };
                        relay(client, server, &mails, &counts, plan, own).await.ok();
                    }
                });
            }
        });
        SmtpRelay {
            port,
            injected,
            refused,
        }
    }

    /// `RCPT` commands the relay answered itself so far.
    pub fn refused_rcpts(&self) -> usize {
        self.refused.load(Ordering::Relaxed)
    }

    /// `smtp://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    /// (soft rejects, drops after the dot, drops mid-data) injected so far.
    pub fn injected(&self) -> (usize, usize, usize) {
        (
            self.injected.0.load(Ordering::Relaxed),
            self.injected.1.load(Ordering::Relaxed),
            self.injected.2.load(Ordering::Relaxed),
        )
    }
}

/// Copies one reply (all its lines, `250-…` until `250 …`) from the server to the client.
async fn reply(
    server: &mut BufReader<OwnedReadHalf>,
    client: &mut OwnedWriteHalf,
) -> std::io::Result<Vec<u8>> {
    let mut all = Vec::new();
    loop {
        let mut line = Vec::new();
        if server.read_until(b'\n', &mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        all.extend_from_slice(&line);
        if line.get(3) != Some(&b'-') {
            break;
        }
    }
    client.write_all(&all).await?;
    Ok(all)
}

/// The relay's own answers to `RCPT`, and their count.
struct Own<'a> {
    rcpt: &'a (dyn Fn(&str) -> Option<String> + Send + Sync),
    answered: &'a AtomicUsize,
}

async fn relay(
    client: TcpStream,
    server: TcpStream,
    mails: &AtomicUsize,
    counts: &(AtomicUsize, AtomicUsize, AtomicUsize),
    plan: fn(usize) -> Fault,
    own: Own<'_>,
) -> std::io::Result<()> {
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (client_read, mut client_write) = client.into_split();
    let (server_read, mut server_write) = server.into_split();
    let mut from_client = BufReader::new(client_read);
    let mut from_server = BufReader::new(server_read);
    reply(&mut from_server, &mut client_write).await?; // greeting
    loop {
        let mut line = Vec::new();
        if from_client.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        if line.to_ascii_uppercase().starts_with(b"RCPT")
            && let Some(answer) = (own.rcpt)(&String::from_utf8_lossy(&line))
        {
            own.answered.fetch_add(1, Ordering::Relaxed);
            client_write
                .write_all(format!("{answer}\r\n").as_bytes())
                .await?;
            continue;
        }
        if !line.to_ascii_uppercase().starts_with(b"DATA") {
            server_write.write_all(&line).await?;
            reply(&mut from_server, &mut client_write).await?;
            continue;
        }
        let fault = plan(mails.fetch_add(1, Ordering::Relaxed));
        if fault == Fault::SoftRejectData {
            counts.0.fetch_add(1, Ordering::Relaxed);
            client_write
                .write_all(b"421 4.3.2 Service not available, try again later\r\n")
                .await?;
            return Ok(());
        }
        server_write.write_all(&line).await?;
        if !reply(&mut from_server, &mut client_write)
            .await?
            .starts_with(b"354")
        {
            // DATA refused (no recipient was accepted): no mail data follows.
            continue;
        }
        let mut lines = 0;
        loop {
            let mut data = Vec::new();
            if from_client.read_until(b'\n', &mut data).await? == 0 {
                return Ok(());
            }
            if fault == Fault::DropMidData && lines == 10 {
                // The server has half a mail, which it discards when the connection goes.
                counts.2.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            lines += 1;
            server_write.write_all(&data).await?;
            if data == b".\r\n" {
                break;
            }
        }
        if fault == Fault::DropAfterDot {
            // Wait for the server's verdict (it has the mail), then hang up without a word.
            let mut verdict = Vec::new();
            from_server.read_until(b'\n', &mut verdict).await?;
            counts.1.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        if fault == Fault::SlowVerdict {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
        reply(&mut from_server, &mut client_write).await?;
    }
}
