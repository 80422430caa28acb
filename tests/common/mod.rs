//! Test harness: real RabbitMQ, PostgreSQL and smtp-sink, isolated per test.
//!
//! Each `TestEnv` has its own database, exchange and queues (random names), outbox directory,
//! and, when asked, its own smtp-sink process on a free port. Waits poll a condition until a
//! deadline; nothing sleeps and hopes.

#![allow(dead_code)]

pub mod admin;
pub mod fake_api;
pub mod smtp_relay;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, ExchangeDeleteOptions, QueueDeleteOptions};
use lifecycle::testkit::app::{App, Roles};
use lifecycle::testkit::config::Settings;
use lifecycle::testkit::worker::Worker;

/// How long any wait may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// An isolated environment for one test.
pub struct TestEnv {
    /// Settings naming this test's database, exchange, queues and directories.
    pub settings: Settings,
    /// Random part of every name.
    pub tag: String,
    /// The file providers' directory.
    pub outbox: tempfile::TempDir,
    /// The `LIFECYCLE_…` variables the settings were made from.
    vars: Vec<(String, String)>,
}

impl TestEnv {
    /// A new environment; `extra` overrides settings as `LIFECYCLE_…` variables would.
    pub fn new(extra: &[(&str, String)]) -> TestEnv {
        let filter =
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "off".into());
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init()
            .ok();
        let tag = format!("t{:016x}", rand::random::<u64>());
        let outbox = tempfile::tempdir().unwrap();
        let base_db = std::env::var("LIFECYCLE_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/lifecycle".into());
        let db: lifecycle::testkit::config::DatabaseUrl = base_db.parse().unwrap();
        let mut env: Vec<(String, String)> = vec![
            (
                "LIFECYCLE_DATABASE_URL".into(),
                db.with_database(&format!("lifecycle_{tag}"))
                    .expose()
                    .to_owned(),
            ),
            ("LIFECYCLE_EXCHANGE".into(), format!("{tag}.events")),
            (
                "LIFECYCLE_NOTIFICATIONS_EXCHANGE".into(),
                format!("{tag}.notifications"),
            ),
            ("LIFECYCLE_INGEST__QUEUE".into(), format!("{tag}.events")),
            (
                "LIFECYCLE_INGEST__DEAD_LETTER_EXCHANGE".into(),
                format!("{tag}.dlx"),
            ),
            (
                "LIFECYCLE_INGEST__DEAD_LETTER_QUEUE".into(),
                format!("{tag}.dead"),
            ),
            (
                "LIFECYCLE_INGEST__RETRY_QUEUE".into(),
                format!("{tag}.retry"),
            ),
            ("LIFECYCLE_INGEST__RETRY_DELAY_MS".into(), "300".into()),
            (
                "LIFECYCLE_OUTBOX_DIR".into(),
                outbox.path().display().to_string(),
            ),
            (
                "LIFECYCLE_TEMPLATES_DIR".into(),
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("templates")
                    .display()
                    .to_string(),
            ),
            ("LIFECYCLE_DISPATCH__POLL_INTERVAL_MS".into(), "50".into()),
            ("LIFECYCLE_DISPATCH__RETRY_BASE_MS".into(), "100".into()),
            // Tests run at any hour: quiet hours are off unless a test is about them.
            ("LIFECYCLE_DISPATCH__QUIET_HOURS".into(), "off".into()),
        ];
        if let Ok(url) = std::env::var("LIFECYCLE_AMQP_URL") {
            env.push(("LIFECYCLE_AMQP_URL".into(), url));
        }
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
        let settings = Settings::from_sources(None, env.clone()).unwrap();
        TestEnv {
            settings,
            tag,
            outbox,
            vars: env,
        }
    }

    /// A new environment whose email goes to `sink`.
    pub fn with_smtp(sink: &SmtpSink) -> TestEnv {
        TestEnv::new(&[
            ("LIFECYCLE_EMAIL_PROVIDERS", "smtp".into()),
            ("LIFECYCLE_SMTP_URL", sink.url()),
        ])
    }

    /// The settings as environment variables, for a child `lifecycle` process.
    pub fn env_vars(&self) -> Vec<(String, String)> {
        let mut vars = self.vars.clone();
        // A crashed child's claims lapse quickly; small batches finish well inside the lease,
        // so live dispatchers never take each other's messages.
        vars.push(("LIFECYCLE_DISPATCH__LEASE_SECS".into(), "2".into()));
        vars.push(("LIFECYCLE_DISPATCH__BATCH_SIZE".into(), "50".into()));
        // A `serve` child serves HTTP too: on a port of its own.
        vars.push((
            "LIFECYCLE_HTTP_ADDR".into(),
            format!("127.0.0.1:{}", free_port()),
        ));
        vars
    }

    /// Migrates this test's database and opens the shared handles.
    pub async fn app(&self) -> App {
        App::open(self.settings.clone()).await.unwrap()
    }

    /// Starts a worker in this process.
    pub async fn start(&self, roles: Roles) -> Worker {
        Worker::start(self.app().await, roles).await.unwrap()
    }

    /// Publishes event bodies as the platform would (declaring the topology first).
    pub async fn publish(&self, bodies: &[String]) {
        lifecycle::testkit::publish::events(&self.settings, bodies)
            .await
            .unwrap();
    }

    /// Publishes raw bytes with a routing key the input queue binds.
    pub async fn publish_raw(&self, routing_key: &str, body: &[u8]) {
        self.publish_raw_with(routing_key, body, BasicProperties::default())
            .await;
    }

    /// Publishes one body as it is, with `properties` (headers…).
    pub async fn publish_raw_with(
        &self,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) {
        let connection = lifecycle::testkit::amqp::connect(&self.settings.amqp_url, "test")
            .await
            .unwrap();
        lifecycle::testkit::amqp::declare_topology(&connection, &self.settings)
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        channel.confirm_select(Default::default()).await.unwrap();
        channel
            .basic_publish(
                self.settings.exchange.as_str().into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        connection.close(200, "bye".into()).await.ok();
    }

    /// Takes every dead letter the dead-letter store has moved to PostgreSQL and not yet
    /// taken: (body, reason). Taking archives them.
    pub async fn take_dead_letters(&self) -> Vec<(Vec<u8>, String)> {
        let pool = lifecycle::testkit::db::pool(&self.settings.database_url, 1).unwrap();
        let rows: Vec<(i64, Vec<u8>, String)> = sqlx::query_as(
            "update dead_letters set archived_at = now(), archived_by = 'test'
             where archived_at is null returning id, body, reason",
        )
        .fetch_all(&pool)
        .await
        .unwrap_or_default();
        pool.close().await;
        let mut rows = rows;
        rows.sort_by_key(|(id, ..)| *id);
        rows.into_iter()
            .map(|(_, body, reason)| (body, reason))
            .collect()
    }

    /// Removes this test's queues, exchanges and database.
    pub async fn cleanup(self) {
        // Cleaning up never hangs a test: a broker or database that does not answer within
        // 20 s leaves the leftovers (random names) behind.
        let settings = self.settings.clone();
        let done = tokio::time::timeout(Duration::from_secs(20), Self::remove(settings)).await;
        if done.is_err() {
            eprintln!("cleanup of {} did not finish within 20 s", self.tag);
        }
    }

    async fn remove(settings: Settings) {
        let this = &settings;
        if let Ok(connection) = lifecycle::testkit::amqp::connect(&this.amqp_url, "test").await {
            let channel = connection.create_channel().await.unwrap();
            let s = &this.ingest;
            for q in [&s.queue, &s.dead_letter_queue, &s.retry_queue] {
                channel
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await
                    .ok();
            }
            for e in [
                &this.exchange,
                &s.dead_letter_exchange,
                &this.notifications_exchange,
            ] {
                channel
                    .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
                    .await
                    .ok();
            }
            connection.close(200, "bye".into()).await.ok();
        }
        lifecycle::testkit::db::drop_database(&this.database_url)
            .await
            .ok();
    }
}

/// Polls `check` until it returns `Some`, or fails the test after `DEADLINE`.
pub async fn wait_for<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    match wait_up_to(DEADLINE, check).await {
        Some(value) => value,
        None => panic!("timed out waiting for {what}"),
    }
}

/// Polls `check` until it returns `Some`, or gives up (`None`) after `limit`.
pub async fn wait_up_to<T, F, Fut>(limit: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Runs the `lifecycle` binary with the environment's settings and requires it to succeed;
/// its stdout.
pub fn cli(env: &TestEnv, args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_lifecycle"))
        .args(args)
        .envs(env.env_vars())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "lifecycle {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// A count from the test's database.
pub async fn count(app: &App, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&app.pool).await.unwrap()
}

/// A `member.enrolled` event body.
pub fn enrolled(
    id: &str,
    member: &str,
    email: Option<&str>,
    phone: Option<&str>,
    locale: &str,
    first_name: &str,
    consent: (bool, bool),
) -> String {
    serde_json::json!({
        "specversion": "1.0", "id": id, "source": "test", "type": "member.enrolled",
        "time": "2026-11-22T10:00:00Z",
        "data": {
            "member_id": member, "email": email, "phone": phone, "first_name": first_name,
            "locale": locale, "timezone": "Europe/Istanbul",
            "consent": {"email": consent.0, "sms": consent.1}
        }
    })
    .to_string()
}

/// A real SMTP server (postfix's smtp-sink) dumping each message to a file.
pub struct SmtpSink {
    child: Child,
    dir: tempfile::TempDir,
    /// The port it listens on.
    pub port: u16,
}

impl SmtpSink {
    /// Starts smtp-sink on a free port; `extra` adds flags such as `-r RCPT` (soft rejects).
    pub fn start(extra: &[&str]) -> SmtpSink {
        let dir = tempfile::tempdir().unwrap();
        let binary = ["/usr/sbin/smtp-sink", "/usr/bin/smtp-sink"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("smtp-sink is installed (Debian package postfix)");
        for _ in 0..20 {
            let port = free_port();
            let mut child = Command::new(binary)
                .args(["-u", "root", "-d"])
                .arg(format!("{}/%M.", dir.path().display()))
                .args(extra)
                .arg(format!("127.0.0.1:{port}"))
                .arg("256")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("starting smtp-sink");
            // Ready when it accepts connections; gone if the port was taken meanwhile.
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return SmtpSink { child, dir, port };
                }
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            child.kill().ok();
            child.wait().ok();
        }
        panic!("smtp-sink did not start");
    }

    /// `smtp://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    /// Every message received so far, as raw bytes (smtp-sink's own X- lines stripped).
    pub fn messages(&self) -> Vec<Vec<u8>> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        files
            .into_iter()
            .filter_map(|p| std::fs::read(p).ok())
            .filter(|raw| {
                raw.windows(4)
                    .any(|w| w == b"\r\n\r\n" || &w[..2] == b"\n\n")
            })
            .map(|raw| {
                // smtp-sink writes its own headers, then "Received:", then the message.
                let start = find(&raw, b"From: ").unwrap_or(0);
                raw[start..].to_vec()
            })
            .collect()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A parsed email.
pub struct Mail {
    /// Decoded subject.
    pub subject: String,
    /// Decoded text part.
    pub text: String,
    /// Decoded HTML part.
    pub html: String,
    /// `X-Lifecycle-Trigger`.
    pub trigger: String,
    /// `X-Lifecycle-Message-Id`.
    pub message_id: String,
    /// The `To` address.
    pub to: String,
}

/// Parses an email as a mail client would.
pub fn parse_mail(raw: &[u8]) -> Mail {
    let message = mail_parser::MessageParser::default()
        .parse(raw)
        .expect("a parseable email");
    let header = |name: &str| {
        message
            .header_raw(name)
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    Mail {
        subject: message.subject().unwrap_or_default().to_owned(),
        text: message
            .body_text(0)
            .map(|t| t.into_owned())
            .unwrap_or_default(),
        html: message
            .body_html(0)
            .map(|t| t.into_owned())
            .unwrap_or_default(),
        trigger: header("X-Lifecycle-Trigger"),
        message_id: header("X-Lifecycle-Message-Id"),
        to: message
            .to()
            .and_then(|a| a.first())
            .and_then(|a| a.address())
            .unwrap_or_default()
            .to_owned(),
    }
}

/// Both roles.
pub const ALL_ROLES: Roles = Roles {
    ingest: true,
    dispatch: true,
    schedule: false,
    http: false,
};

/// Every role, the scheduler too.
pub const WITH_SCHEDULER: Roles = Roles {
    ingest: true,
    dispatch: true,
    schedule: true,
    http: false,
};

/// Consuming only: planned messages stay in the outbox.
pub const INGEST_ONLY: Roles = Roles {
    ingest: true,
    dispatch: false,
    schedule: false,
    http: false,
};

/// Sending only: a second worker beside one that consumes.
pub const DISPATCH_ONLY: Roles = Roles {
    ingest: false,
    dispatch: true,
    schedule: false,
    http: false,
};

/// The HTTP server alone.
pub const HTTP_ONLY: Roles = Roles {
    ingest: false,
    dispatch: false,
    schedule: false,
    http: true,
};

/// Publishes the events one at a time, each applied (inbox grown by one) before the next, so
/// they apply in order whatever the consumers do; `after` runs after each, with its index.
pub async fn publish_in_order(
    env: &TestEnv,
    app: &App,
    bodies: &[String],
    mut after: impl AsyncFnMut(usize),
) {
    let start = count(app, "select count(*) from inbox").await;
    for (i, body) in bodies.iter().enumerate() {
        env.publish(std::slice::from_ref(body)).await;
        wait_for(&format!("event {} applied", i + 1), || async {
            (count(app, "select count(*) from inbox").await == start + i as i64 + 1).then_some(())
        })
        .await;
        after(i).await;
    }
}

/// A `lifecycle serve` child process, killed if the test ends without stopping it.
pub struct Serve(pub Child);

impl Serve {
    /// Starts `lifecycle serve` with the environment's settings, logging warnings to the
    /// test's stderr.
    pub fn start(env: &TestEnv) -> Serve {
        Serve::start_with(env, &[], Stdio::inherit())
    }

    /// The same with extra variables and stderr where given.
    pub fn start_with(env: &TestEnv, extra: &[(&str, String)], stderr: Stdio) -> Serve {
        Serve::start_args(env, &[], extra, stderr)
    }

    /// The same with arguments after `serve` (`--no-schedule`, …).
    pub fn start_args(
        env: &TestEnv,
        args: &[&str],
        extra: &[(&str, String)],
        stderr: Stdio,
    ) -> Serve {
        let child = Command::new(env!("CARGO_BIN_EXE_lifecycle"))
            .arg("serve")
            .args(args)
            .envs(env.env_vars())
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .envs(extra.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("starting lifecycle serve");
        Serve(child)
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }

    /// SIGTERM, then its exit status, within the test deadline.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        Command::new("kill")
            .arg("-TERM")
            .arg(self.0.id().to_string())
            .status()
            .unwrap();
        let child = &mut self.0;
        wait_for("the worker to exit after SIGTERM", || {
            let status = child.try_wait().unwrap();
            async move { status }
        })
        .await
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            self.0.kill().ok();
            self.0.wait().ok();
        }
    }
}

/// The `i`-th enrolment of a test stream: member `m-i` at `mi@example.com` (email consent),
/// its id from the environment's tag.
pub fn enrolment(env: &TestEnv, i: usize) -> String {
    enrolled(
        &format!("{}-{i}", env.tag),
        &format!("m-{i}"),
        Some(&format!("m{i}@example.com")),
        None,
        "en",
        "Ada",
        (true, false),
    )
}

/// The first `n` enrolments of a test stream.
pub fn enrolments(env: &TestEnv, n: usize) -> Vec<String> {
    (0..n).map(|i| enrolment(env, i)).collect()
}

/// Runs a command that must succeed.
pub fn run(command: &str, args: &[&str]) {
    let status = Command::new(command)
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("{command}: {e}"));
    assert!(status.success(), "{command} {args:?} failed: {status}");
}

/// Restarts the machine's RabbitMQ node (for everyone on the machine).
pub fn restart_rabbitmq() {
    run("rabbitmqctl", &["stop_app"]);
    run("rabbitmqctl", &["start_app"]);
    run("rabbitmqctl", &["await_startup"]);
}

/// Restarts the machine's PostgreSQL cluster (for everyone on the machine).
pub fn restart_postgres() {
    let cluster = std::fs::read_dir("/etc/postgresql")
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .file_name();
    run(
        "pg_ctlcluster",
        &[
            "--skip-systemctl-redirect",
            cluster.to_str().unwrap(),
            "main",
            "restart",
        ],
    );
}

/// A POST to one of Twilio's webhook routes, signed with `token` as Twilio signs it.
pub fn twilio_post(
    base: &str,
    path: &str,
    token: &str,
    form: &[(&str, &str)],
) -> reqwest::RequestBuilder {
    let url = format!("{base}{path}");
    let params: Vec<(String, String)> = form
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let signature = lifecycle::testkit::http::twilio_signature(token, &url, &params);
    reqwest::Client::new()
        .post(url)
        .header("X-Twilio-Signature", signature)
        .form(form)
}

/// SendGrid's signing side: a P-256 key pair, its public key as SendGrid shows it (base64 of
/// the SubjectPublicKeyInfo), and requests signed as SendGrid signs them.
pub struct SendgridSigner {
    pub pair: aws_lc_rs::signature::EcdsaKeyPair,
    pub public_key: String,
}

impl SendgridSigner {
    pub fn new() -> SendgridSigner {
        use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
        use base64::Engine;
        let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).unwrap();
        let spki_prefix: [u8; 26] = [
            0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06,
            0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
        ];
        let public_key = base64::engine::general_purpose::STANDARD
            .encode([&spki_prefix[..], pair.public_key().as_ref()].concat());
        SendgridSigner { pair, public_key }
    }

    /// A POST of `body` to the events route, signed now.
    pub fn post(&self, base: &str, body: &str) -> reqwest::RequestBuilder {
        use base64::Engine;
        let timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            .to_string();
        let signed = [timestamp.as_bytes(), body.as_bytes()].concat();
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let signature = base64::engine::general_purpose::STANDARD
            .encode(self.pair.sign(&rng, &signed).unwrap().as_ref());
        reqwest::Client::new()
            .post(format!("{base}/webhooks/sendgrid/events"))
            .header("X-Twilio-Email-Event-Webhook-Signature", signature)
            .header("X-Twilio-Email-Event-Webhook-Timestamp", timestamp)
            .header("Content-Type", "application/json")
            .body(body.to_owned())
    }
}
