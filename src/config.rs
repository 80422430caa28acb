//! Typed settings: an optional `lifecycle.toml` overlaid by `LIFECYCLE_…` environment variables.
//!
//! Every key is parsed into its final type while loading, so a wrong value is one error line that
//! names the key (in both its file and its environment form). Secrets (`Secret`, passwords inside
//! URLs) are redacted by `Debug` and `Display`, so printing settings never leaks them.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};

use crate::domain::{parsed, quoted};
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};

/// The shortest `LIFECYCLE_ADMIN_TOKEN` accepted: it opens everything, so it must not be
/// guessable.
pub(crate) const MIN_ADMIN_TOKEN: usize = 32;

/// Prefix of every environment variable that overlays the file.
const ENV_PREFIX: &str = "LIFECYCLE_";
/// Names the configuration file; not itself a setting.
const ENV_CONFIG_FILE: &str = "LIFECYCLE_CONFIG";

/// All settings of a lifecycle process.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// RabbitMQ connection (`LIFECYCLE_AMQP_URL`).
    #[serde(deserialize_with = "parsed")]
    pub amqp_url: AmqpUrl,
    /// PostgreSQL connection; `migrate` creates this database when missing.
    #[serde(deserialize_with = "parsed")]
    pub database_url: DatabaseUrl,
    /// Topic exchange the platform publishes to.
    pub exchange: String,
    /// Topic exchange lifecycle publishes its notifications to (events back to the platform);
    /// empty turns them off.
    pub notifications_exchange: String,
    /// Where the same notifications are POSTed, signed as Standard Webhooks; unset, not at all.
    #[serde(deserialize_with = "parsed_opt")]
    pub notify_url: Option<HttpUrl>,
    /// The Standard Webhooks signing secret of `notify_url`.
    #[serde(deserialize_with = "parsed_opt")]
    pub notify_secret: Option<SigningSecret>,
    /// Address of the HTTP server (health, metrics, admin API).
    #[serde(deserialize_with = "parsed")]
    pub http_addr: SocketAddr,
    /// Email providers, tried in order.
    #[serde(deserialize_with = "list")]
    pub email_providers: Vec<EmailProviderKind>,
    /// SMS providers, tried in order.
    #[serde(deserialize_with = "list")]
    pub sms_providers: Vec<SmsProviderKind>,
    /// SMTP relay, in lettre's URL form.
    #[serde(deserialize_with = "parsed")]
    pub smtp_url: SmtpUrl,
    /// Twilio API base (tests point it at a local fake).
    pub twilio_base_url: String,
    /// Twilio account.
    pub twilio_account_sid: Option<String>,
    /// Twilio auth token; also checks `X-Twilio-Signature` on inbound webhooks.
    pub twilio_auth_token: Option<Secret>,
    /// Sender number or messaging service of SMS.
    pub twilio_from: Option<String>,
    /// SendGrid API base.
    pub sendgrid_base_url: String,
    /// SendGrid API key.
    pub sendgrid_api_key: Option<Secret>,
    /// SendGrid's event webhook verification key (base64 of the P-256 public key, as SendGrid
    /// shows it); unset, `POST /webhooks/sendgrid/events` answers 403 to everything.
    pub sendgrid_webhook_key: Option<Secret>,
    /// Where the `webhook` provider posts rendered messages.
    pub webhook_url: Option<String>,
    /// Key of the `webhook` provider's body signature.
    pub webhook_secret: Option<Secret>,
    /// Base of unsubscribe links and callback URLs.
    #[serde(deserialize_with = "parsed")]
    pub public_url: HttpUrl,
    /// The sender of email.
    #[serde(deserialize_with = "parsed")]
    pub from: lettre::message::Mailbox,
    /// Where the `file` providers write `.eml` and `.json` files.
    pub outbox_dir: PathBuf,
    /// Bearer token of the admin API; unset refuses every request.
    pub admin_token: Option<Secret>,
    /// An address whose mail unsubscribes the sender (`List-Unsubscribe: <mailto:…>`), besides
    /// the https link every email carries.
    pub unsubscribe_mailto: Option<String>,
    /// Fixes the clock at this instant (tests and demos only).
    #[serde(deserialize_with = "parsed_opt")]
    pub now: Option<crate::domain::Instant>,
    /// How logs are written: `text`, or `json` (one object a line with the span fields).
    #[serde(deserialize_with = "parsed")]
    pub log_format: LogFormat,
    /// The shop's name as messages show it.
    pub shop_name: String,
    /// The shop's postal address, shown in the footer of every email (anti-spam laws ask for
    /// one in marketing mail).
    pub shop_address: Option<String>,
    /// Root of templates that replace the shipped ones (which are compiled into the binary);
    /// when set it must exist and hold every trigger's default locale.
    pub templates_dir: Option<PathBuf>,
    /// Consuming events.
    pub ingest: IngestSettings,
    /// Sending messages.
    pub dispatch: DispatchSettings,
    /// When the scheduled scans run.
    pub scheduler: SchedulerSettings,
    /// How long old rows are kept.
    pub retention: RetentionSettings,
    /// The HTTP server's defences (`[http]`): proxies believed, the statement timeout.
    pub http: HttpSettings,
    /// The console's test sends (`[console]`).
    pub console: ConsoleSettings,
    /// Publishing and POSTing notifications (`[notifications]`).
    pub notifications: NotificationSettings,
    /// The loyalty programme's rules.
    pub program: crate::program::Program,
}

impl Default for Settings {
    fn default() -> Self {
        let parse = |s: &str| s.parse().expect("default settings parse");
        Self {
            amqp_url: parse_default("amqp://guest:guest@127.0.0.1:5672/%2f"),
            database_url: parse_default("postgres://postgres@127.0.0.1:5432/lifecycle"),
            exchange: "commerce.events".into(),
            notifications_exchange: "lifecycle.notifications".into(),
            notify_url: None,
            notify_secret: None,
            http_addr: parse("127.0.0.1:8080"),
            email_providers: vec![EmailProviderKind::File],
            sms_providers: vec![SmsProviderKind::File],
            smtp_url: parse_default("smtp://127.0.0.1:25"),
            twilio_base_url: "https://api.twilio.com".into(),
            twilio_account_sid: None,
            twilio_auth_token: None,
            twilio_from: None,
            sendgrid_base_url: "https://api.sendgrid.com".into(),
            sendgrid_api_key: None,
            sendgrid_webhook_key: None,
            webhook_url: None,
            webhook_secret: None,
            public_url: parse_default("http://127.0.0.1:8080"),
            from: parse_default("Loyalty <loyalty@localhost>"),
            outbox_dir: "outbox".into(),
            admin_token: None,
            unsubscribe_mailto: None,
            now: None,
            log_format: LogFormat::Text,
            shop_name: "Loyalty Club".into(),
            shop_address: None,
            templates_dir: None,
            ingest: IngestSettings::default(),
            dispatch: DispatchSettings::default(),
            scheduler: SchedulerSettings::default(),
            retention: RetentionSettings::default(),
            http: HttpSettings::default(),
            console: ConsoleSettings::default(),
            notifications: NotificationSettings::default(),
            program: crate::program::Program::default(),
        }
    }
}

/// How notifications leave: a page at a time, each page waited for; over HTTP, retried with a
/// doubling delay until a day has passed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotificationSettings {
    /// Notifications published (or POSTed) per page.
    #[serde(deserialize_with = "parsed")]
    pub batch_size: i64,
    /// The pause between looks when nothing waits, in milliseconds.
    #[serde(deserialize_with = "parsed")]
    pub poll_interval_ms: u64,
    /// The first delay before a failed POST is tried again, in milliseconds; it doubles.
    #[serde(deserialize_with = "parsed")]
    pub retry_base_ms: u64,
    /// The longest delay between tries, in milliseconds.
    #[serde(deserialize_with = "parsed")]
    pub retry_max_ms: u64,
    /// How long a notification is POSTed again before it is dead (visible to ops).
    #[serde(deserialize_with = "parsed")]
    pub dead_after_hours: u32,
    /// How long one POST may take, in milliseconds.
    #[serde(deserialize_with = "parsed")]
    pub timeout_ms: u64,
}

impl Default for NotificationSettings {
    fn default() -> Self {
        Self {
            batch_size: 500,
            poll_interval_ms: 200,
            retry_base_ms: 5_000,
            retry_max_ms: 3_600_000,
            dead_after_hours: 24,
            timeout_ms: 15_000,
        }
    }
}

/// The HTTP server's defences.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    /// Addresses (or CIDR networks) of the reverse proxies in front of lifecycle: only a
    /// request from one of them has its `X-Forwarded-For` believed, for the client address the
    /// login and bearer throttles count by. Empty: the connection's own address, always.
    #[serde(deserialize_with = "list_parsed")]
    pub trusted_proxies: Vec<Network>,
    /// The statement timeout of every query the API and the console make, in milliseconds.
    #[serde(deserialize_with = "parsed")]
    pub statement_timeout_ms: u64,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            trusted_proxies: Vec::new(),
            statement_timeout_ms: 15_000,
        }
    }
}

/// What test sends from the console and the API may do.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleSettings {
    /// The only addresses and numbers a test send may go to, besides the signed-in user's own
    /// (`lifecycle users add --email/--phone`).
    #[serde(deserialize_with = "list_parsed")]
    pub test_recipients: Vec<TestRecipient>,
    /// Test sends a user may queue per hour; past it the API answers 429.
    #[serde(deserialize_with = "parsed")]
    pub test_sends_per_hour: u32,
}

impl Default for ConsoleSettings {
    fn default() -> Self {
        Self {
            test_recipients: Vec::new(),
            test_sends_per_hour: 30,
        }
    }
}

/// An address or number on `[console] test_recipients`, normalised as the providers get it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TestRecipient {
    /// An email address.
    Email(String),
    /// An E.164 number.
    Phone(String),
}

impl FromStr for TestRecipient {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.contains('@') {
            crate::domain::Email::parse(s)
                .map(|e| TestRecipient::Email(e.to_string()))
                .map_err(|e| e.to_string())
        } else {
            crate::domain::Phone::parse(s)
                .map(|p| TestRecipient::Phone(p.to_string()))
                .map_err(|e| {
                    format!(
                        "{} is neither an email address nor an E.164 number ({e})",
                        quoted(s)
                    )
                })
        }
    }
}

/// An IP address or a CIDR network (`10.0.0.0/8`, `::1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: std::net::IpAddr,
    prefix: u8,
}

impl Network {
    /// Whether `ip` is inside this network (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (std::net::IpAddr::V4(net), std::net::IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (std::net::IpAddr::V6(net), std::net::IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Network {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!(
                "{} is not an IP address or a CIDR network such as 10.0.0.0/8",
                quoted(s)
            )
        };
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s.trim(), None),
        };
        let addr: std::net::IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
            None => max,
        };
        Ok(Network { addr, prefix })
    }
}

fn parse_default<T: FromStr>(s: &str) -> T
where
    T::Err: fmt::Display,
{
    match s.parse() {
        Ok(value) => value,
        Err(error) => panic!("default setting {s:?} does not parse: {error}"),
    }
}

/// How events are consumed: the queue topology of DESIGN.md and the batching of ingest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestSettings {
    /// The worker's input queue (quorum).
    pub queue: String,
    /// Fanout exchange of dead letters.
    pub dead_letter_exchange: String,
    /// Queue that keeps dead letters for inspection and replay.
    pub dead_letter_queue: String,
    /// Queue where early events wait before they are tried again.
    pub retry_queue: String,
    /// How long an early event waits in the retry queue, in milliseconds.
    #[serde(deserialize_with = "parsed")]
    pub retry_delay_ms: u64,
    /// How often an early event is tried before it is dead-lettered.
    #[serde(deserialize_with = "parsed")]
    pub max_retries: u32,
    /// Unacknowledged deliveries the broker may push to one consumer.
    #[serde(deserialize_with = "parsed")]
    pub prefetch: u16,
    /// Most deliveries handled in one database transaction.
    #[serde(deserialize_with = "parsed")]
    pub batch_size: usize,
    /// Consumers (each its own channel and transaction) per process.
    #[serde(deserialize_with = "parsed")]
    pub consumers: usize,
    /// Redeliveries before the broker itself dead-letters a message (`x-delivery-limit`).
    #[serde(deserialize_with = "parsed")]
    pub delivery_limit: u32,
    /// Largest accepted event body, in bytes.
    #[serde(deserialize_with = "parsed")]
    pub max_event_bytes: usize,
}

impl Default for IngestSettings {
    fn default() -> Self {
        Self {
            queue: "lifecycle.events".into(),
            dead_letter_exchange: "lifecycle.dlx".into(),
            dead_letter_queue: "lifecycle.dead".into(),
            retry_queue: "lifecycle.retry".into(),
            retry_delay_ms: 5_000,
            max_retries: 20,
            prefetch: 1_000,
            batch_size: 500,
            consumers: 2,
            delivery_limit: 20,
            max_event_bytes: 256 * 1024,
        }
    }
}

impl IngestSettings {
    /// The retry queue's delay as a duration.
    pub fn retry_delay(&self) -> Duration {
        Duration::from_millis(self.retry_delay_ms)
    }
}

/// How planned messages are sent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DispatchSettings {
    /// Most messages claimed at once.
    #[serde(deserialize_with = "parsed")]
    pub batch_size: i64,
    /// Sends in flight at once, per pipeline.
    #[serde(deserialize_with = "parsed")]
    pub concurrency: usize,
    /// Claim–send–record loops running at once (each claims its own batch).
    #[serde(deserialize_with = "parsed")]
    pub pipelines: usize,
    /// Pause between polls when nothing is due, in milliseconds.
    #[serde(deserialize_with = "parsed")]
    pub poll_interval_ms: u64,
    /// How long a claim holds a message before another worker may take it, in seconds
    /// (default 30, so a dead dispatcher's messages go again within half a minute). A
    /// dispatcher renews its claims every third of this while a batch is out, so only a
    /// dispatcher that died or stalled lets its claims lapse.
    #[serde(deserialize_with = "parsed")]
    pub lease_secs: u64,
    /// Attempts before a transiently failing message ends `failed`.
    #[serde(deserialize_with = "parsed")]
    pub max_attempts: i32,
    /// First retry delay, in milliseconds; doubles with every attempt.
    #[serde(deserialize_with = "parsed")]
    pub retry_base_ms: u64,
    /// The longest retry delay of lifecycle's own, in milliseconds (a provider's
    /// `Retry-After` may ask for longer).
    #[serde(deserialize_with = "parsed")]
    pub retry_max_ms: u64,
    /// Pooled SMTP connections.
    #[serde(deserialize_with = "parsed")]
    pub smtp_pool_size: usize,
    /// Sets TCP_NODELAY on SMTP sockets. `false` reproduces lettre's own behaviour (about 40 ms
    /// a message, Nagle waiting for delayed ACKs); the benchmark uses it for comparison.
    #[serde(deserialize_with = "parsed")]
    pub smtp_nodelay: bool,
    /// Time limit of one provider call, in milliseconds.
    #[serde(deserialize_with = "parsed")]
    pub send_timeout_ms: u64,
    /// Transient failures in a row after which a provider is skipped (its circuit opens).
    #[serde(deserialize_with = "parsed")]
    pub breaker_failures: u32,
    /// How long an open circuit skips its provider before one message tries it again, in
    /// milliseconds.
    #[serde(deserialize_with = "parsed")]
    pub breaker_cooldown_ms: u64,
    /// Most messages per second handed to each provider (unset: no limit).
    pub rate_limit: RateLimits,
    /// Local hours in which SMS is deferred (`21:00-08:00`, or `off`).
    #[serde(deserialize_with = "parsed")]
    pub quiet_hours: crate::domain::QuietHours,
    /// Hours between two marketing messages (birthday, abandoned-cart) to a member on one
    /// channel; 0 turns the cap off.
    #[serde(deserialize_with = "parsed")]
    pub marketing_cap_hours: u32,
    /// How long the results writer may go on failing before it counts as stuck (`/readyz`
    /// then says dispatch is not ready, and `lifecycle_results_writer_stuck` is 1), in
    /// milliseconds.
    #[serde(deserialize_with = "parsed")]
    pub writer_stuck_ms: u64,
    /// SMS segments past which `templates check` warns (GSM-7: 160 characters alone, 153 a
    /// segment; UCS-2, as Korean always is: 70 alone, 67 a segment).
    #[serde(deserialize_with = "parsed")]
    pub sms_max_segments: usize,
}

/// Messages per second per provider (`[dispatch.rate_limit] twilio = 10`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimits {
    /// SMTP relay.
    #[serde(deserialize_with = "parsed_opt")]
    pub smtp: Option<f64>,
    /// SendGrid.
    #[serde(deserialize_with = "parsed_opt")]
    pub sendgrid: Option<f64>,
    /// The webhook.
    #[serde(deserialize_with = "parsed_opt")]
    pub webhook: Option<f64>,
    /// Twilio.
    #[serde(deserialize_with = "parsed_opt")]
    pub twilio: Option<f64>,
    /// The file provider.
    #[serde(deserialize_with = "parsed_opt")]
    pub file: Option<f64>,
}

impl RateLimits {
    /// Every provider's name with its limit.
    fn all(&self) -> [(&'static str, Option<f64>); 5] {
        [
            ("smtp", self.smtp),
            ("sendgrid", self.sendgrid),
            ("webhook", self.webhook),
            ("twilio", self.twilio),
            ("file", self.file),
        ]
    }

    /// The limit of the provider of this name.
    pub fn of(&self, provider: &str) -> Option<f64> {
        self.all()
            .into_iter()
            .find(|(name, _)| *name == provider)
            .and_then(|(_, limit)| limit)
    }
}

impl Default for DispatchSettings {
    fn default() -> Self {
        Self {
            batch_size: 500,
            concurrency: 64,
            pipelines: 4,
            poll_interval_ms: 200,
            lease_secs: 30,
            max_attempts: 8,
            retry_base_ms: 2_000,
            retry_max_ms: 600_000,
            smtp_pool_size: 32,
            smtp_nodelay: true,
            send_timeout_ms: 10_000,
            breaker_failures: 5,
            breaker_cooldown_ms: 30_000,
            rate_limit: RateLimits::default(),
            quiet_hours: parse_default("21:00-08:00"),
            marketing_cap_hours: 16,
            writer_stuck_ms: 30_000,
            sms_max_segments: 2,
        }
    }
}

impl DispatchSettings {
    /// The claim lease as a duration (at least a second).
    pub fn lease(&self) -> Duration {
        Duration::from_secs(self.lease_secs.max(1))
    }

    /// The idle poll interval as a duration.
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms)
    }

    /// The time limit of one provider call.
    pub fn send_timeout(&self) -> Duration {
        Duration::from_millis(self.send_timeout_ms)
    }

    /// How long an open circuit stays open.
    pub fn breaker_cooldown(&self) -> Duration {
        Duration::from_millis(self.breaker_cooldown_ms)
    }
}

/// When the scheduled scans run: cron expressions (seconds field first, evaluated in UTC) and
/// the lease that lets one replica run each scan.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerSettings {
    /// Lapsed lots are expired (balances of members with no events fall too).
    #[serde(deserialize_with = "parsed")]
    pub expiry: Cron,
    /// Points-expiring notices are planned.
    #[serde(deserialize_with = "parsed")]
    pub points_expiring: Cron,
    /// Birthday messages (and bonuses) whose local send time has come are planned.
    #[serde(deserialize_with = "parsed")]
    pub birthday: Cron,
    /// Carts left unchanged past `program.abandoned_cart_minutes` are planned.
    #[serde(deserialize_with = "parsed")]
    pub carts: Cron,
    /// When old rows are pruned (`[retention]`).
    #[serde(deserialize_with = "parsed")]
    pub retention: Cron,
    /// How long a replica may hold a scan before another may take it over, in seconds.
    #[serde(deserialize_with = "parsed")]
    pub lease_secs: u64,
    /// Members or carts handled per transaction of a scan.
    #[serde(deserialize_with = "parsed")]
    pub batch_size: i64,
}

/// How long old rows are kept, in days (0 keeps them forever); the `retention` scan prunes
/// them in pages.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionSettings {
    /// Inbox rows (applied event ids). A redelivery or replay of an event older than this is
    /// applied again, so keep it longer than any replay you might make.
    #[serde(deserialize_with = "parsed")]
    pub inbox_days: u32,
    /// Finished messages (sent, suppressed, cancelled, failed, held out) and their attempts. A pruned
    /// message's dedupe key is kept (`retired_keys`), so pruning never lets a message go twice.
    #[serde(deserialize_with = "parsed")]
    pub messages_days: u32,
    /// Delivery attempts, of messages kept or not.
    #[serde(deserialize_with = "parsed")]
    pub attempts_days: u32,
    /// Notifications that left (published, and POSTed or dead).
    #[serde(deserialize_with = "parsed")]
    pub notifications_days: u32,
    /// Rows deleted per statement.
    #[serde(deserialize_with = "parsed")]
    pub page_size: i64,
}

impl Default for RetentionSettings {
    fn default() -> Self {
        Self {
            inbox_days: 90,
            messages_days: 365,
            attempts_days: 90,
            notifications_days: 30,
            page_size: 5_000,
        }
    }
}

impl Default for SchedulerSettings {
    fn default() -> Self {
        Self {
            expiry: parse_default("0 */10 * * * *"),
            points_expiring: parse_default("0 0 * * * *"),
            birthday: parse_default("0 */5 * * * *"),
            carts: parse_default("0 * * * * *"),
            retention: parse_default("0 17 * * * *"),
            lease_secs: 300,
            batch_size: 500,
        }
    }
}

/// A cron expression of the `cron` crate: six or seven fields, seconds first
/// (`0 */5 * * * *` is every five minutes).
#[derive(Clone)]
pub struct Cron {
    source: String,
    schedule: cron::Schedule,
}

impl Cron {
    /// The first instant of the schedule strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.schedule.after(&t).next()
    }
}

impl FromStr for Cron {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let schedule = cron::Schedule::from_str(s.trim()).map_err(|e| {
            format!(
                "{} is not a cron expression with a seconds field first, like \"0 */5 * * * *\": {e}",
                quoted(s)
            )
        })?;
        if schedule.upcoming(Utc).next().is_none() {
            return Err(format!("{} never fires again", quoted(s)));
        }
        Ok(Cron {
            source: s.trim().to_owned(),
            schedule,
        })
    }
}

impl fmt::Debug for Cron {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.source)
    }
}

impl fmt::Display for Cron {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// An email provider name of `LIFECYCLE_EMAIL_PROVIDERS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EmailProviderKind {
    /// An SMTP relay (`LIFECYCLE_SMTP_URL`).
    Smtp,
    /// SendGrid's v3 mail send API.
    Sendgrid,
    /// A signed JSON POST to `LIFECYCLE_WEBHOOK_URL`.
    Webhook,
    /// `.eml` and `.json` files in `LIFECYCLE_OUTBOX_DIR`.
    File,
}

/// An SMS provider name of `LIFECYCLE_SMS_PROVIDERS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SmsProviderKind {
    /// Twilio's Messages API.
    Twilio,
    /// A signed JSON POST to `LIFECYCLE_WEBHOOK_URL`.
    Webhook,
    /// `.json` files in `LIFECYCLE_OUTBOX_DIR`.
    File,
}

/// A secret value: never shown by `Debug` or `Display`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

impl Secret {
    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Replaces the password of a URL with `***` for display.
fn redact_password(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut url) if url.password().is_some() => {
            let _ = url.set_password(Some("***"));
            url.to_string()
        }
        _ => raw.to_owned(),
    }
}

/// An AMQP URL, checked by lapin's own parser.
#[derive(Clone)]
pub struct AmqpUrl(String);

impl AmqpUrl {
    /// The URL with its password, for connecting.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl FromStr for AmqpUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        lapin::uri::AMQPUri::from_str(s)
            .map(|_| AmqpUrl(s.to_owned()))
            .map_err(|e| format!("`{}` is not an AMQP URL ({e})", redact_password(s)))
    }
}

impl fmt::Display for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_password(&self.0))
    }
}

impl fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

/// A PostgreSQL URL naming a database.
#[derive(Clone)]
pub struct DatabaseUrl {
    url: url::Url,
}

impl DatabaseUrl {
    /// The name of the database.
    pub fn database(&self) -> &str {
        self.url.path().trim_start_matches('/')
    }

    /// The same server with another database (used to create databases and by the benchmark).
    pub fn with_database(&self, name: &str) -> DatabaseUrl {
        let mut url = self.url.clone();
        url.set_path(&format!("/{name}"));
        DatabaseUrl { url }
    }

    /// The URL with its password, for connecting.
    pub fn expose(&self) -> &str {
        self.url.as_str()
    }
}

impl FromStr for DatabaseUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let url = url::Url::parse(s)
            .map_err(|e| format!("`{}` is not a URL ({e})", redact_password(s)))?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return Err(format!("`{}` is not a postgres:// URL", redact_password(s)));
        }
        let name = url.path().trim_start_matches('/');
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!(
                "`{}` must name a database of letters, digits and `_`",
                redact_password(s)
            ));
        }
        Ok(DatabaseUrl { url })
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_password(self.url.as_str()))
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Lines for people to read.
    Text,
    /// One JSON object a line, with the fields of the event and of the spans it happened in.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("{} is neither text nor json", quoted(other))),
        }
    }
}

/// How an SMTP connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpTls {
    /// Plain text (a local relay or a test sink).
    None,
    /// STARTTLS when the server offers it.
    Opportunistic,
    /// STARTTLS, or fail.
    Required,
    /// TLS from the first byte (`smtps://`).
    Wrapper,
}

/// An SMTP relay in lettre's URL form: `smtp://user:pass@host:port?tls=required`, `smtps://…`.
#[derive(Clone)]
pub struct SmtpUrl {
    /// Host name, also the name checked in the server's certificate.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Transport security.
    pub tls: SmtpTls,
    /// User and password, when the relay wants authentication.
    pub credentials: Option<(String, Secret)>,
}

impl FromStr for SmtpUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let shown = redact_password(s);
        let url = url::Url::parse(s).map_err(|e| format!("`{shown}` is not a URL ({e})"))?;
        let (default_port, mut tls) = match url.scheme() {
            "smtp" => (25, SmtpTls::None),
            "smtps" => (465, SmtpTls::Wrapper),
            other => return Err(format!("`{shown}`: scheme `{other}` is not smtp or smtps")),
        };
        for (key, value) in url.query_pairs() {
            match (&*key, &*value) {
                ("tls", "required") if tls == SmtpTls::None => tls = SmtpTls::Required,
                ("tls", "opportunistic") if tls == SmtpTls::None => tls = SmtpTls::Opportunistic,
                _ => return Err(format!("`{shown}`: unknown parameter `{key}={value}`")),
            }
        }
        let host = url
            .host_str()
            .ok_or_else(|| format!("`{shown}` has no host"))?
            .trim_matches(['[', ']'])
            .to_owned();
        let credentials = (!url.username().is_empty()).then(|| {
            let decode = |s: &str| {
                url::form_urlencoded::parse(s.as_bytes())
                    .map(|(k, _)| k)
                    .collect::<String>()
            };
            (
                decode(url.username()),
                Secret(decode(url.password().unwrap_or(""))),
            )
        });
        Ok(SmtpUrl {
            host,
            port: url.port().unwrap_or(default_port),
            tls,
            credentials,
        })
    }
}

impl fmt::Debug for SmtpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpUrl")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("user", &self.credentials.as_ref().map(|(user, _)| user))
            .finish()
    }
}

/// An absolute http(s) URL without a trailing slash.
#[derive(Debug, Clone)]
pub struct HttpUrl(String);

impl HttpUrl {
    /// The URL as text, without a trailing slash.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for HttpUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let url = url::Url::parse(s).map_err(|e| format!("`{s}` is not a URL ({e})"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("`{s}` is not an http(s) URL"));
        }
        Ok(HttpUrl(s.trim_end_matches('/').to_owned()))
    }
}

/// A Standard Webhooks signing secret: `whsec_` and the base64 of 24 to 64 random bytes (the
/// prefix may be left out). `Debug` never shows it, and nor does a refusal.
#[derive(Clone)]
pub struct SigningSecret(Vec<u8>);

impl SigningSecret {
    /// What a secret looks like, for errors.
    const FORM: &'static str = "whsec_ and the base64 of 24 to 64 random bytes; `echo whsec_$(openssl rand -base64 32)` makes one";

    /// The HMAC key.
    pub fn key(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningSecret(***)")
    }
}

impl FromStr for SigningSecret {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        use base64::Engine;
        let encoded = s.trim().strip_prefix("whsec_").unwrap_or(s.trim());
        let key = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|_| format!("not base64: expected {}", Self::FORM))?;
        if !(24..=64).contains(&key.len()) {
            return Err(format!("{} bytes: expected {}", key.len(), Self::FORM));
        }
        Ok(SigningSecret(key))
    }
}

impl Settings {
    /// Loads the file named by `path` (or `LIFECYCLE_CONFIG`, or `lifecycle.toml` when present)
    /// and overlays the process environment.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Settings> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        let path = path.map(Path::to_path_buf).or_else(|| {
            env.iter()
                .find(|(k, _)| k == ENV_CONFIG_FILE)
                .map(|(_, v)| v.into())
        });
        let file = match &path {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading configuration file {}", path.display()))?,
            ),
            None => std::fs::read_to_string("lifecycle.toml").ok(),
        };
        Self::from_sources(file.as_deref(), env)
    }

    /// Builds settings from a file's text and environment pairs (those without the prefix are
    /// ignored).
    pub fn from_sources(
        file: Option<&str>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> anyhow::Result<Settings> {
        let mut table = match file {
            Some(text) => text
                .parse::<toml::Table>()
                .map_err(|e| anyhow::anyhow!("configuration file is not valid TOML: {e}"))?,
            None => toml::Table::new(),
        };
        for (key, value) in env {
            let Some(name) = key.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            if key == ENV_CONFIG_FILE {
                continue;
            }
            overlay(&mut table, &name.to_ascii_lowercase(), value)
                .with_context(|| format!("environment variable {key}"))?;
        }
        let settings: Settings = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| {
                let path = e.path().to_string();
                let env = format!(
                    "{ENV_PREFIX}{}",
                    path.replace('.', "__").to_ascii_uppercase()
                );
                if path == "." {
                    anyhow::anyhow!("invalid configuration: {}", e.inner().message())
                } else {
                    anyhow::anyhow!("invalid setting `{path}` ({env}): {}", e.inner().message())
                }
            })?;
        settings.check()?;
        settings.check_notifications()?;
        settings
            .program
            .check()
            .map_err(|e| anyhow::anyhow!("invalid setting {e}"))?;
        Ok(settings)
    }

    /// The notification settings: a URL needs its secret, and the secret is Standard Webhooks'.
    fn check_notifications(&self) -> anyhow::Result<()> {
        if self.notify_url.is_some() && self.notify_secret.is_none() {
            bail!(
                "invalid setting `notify_secret` ({ENV_PREFIX}NOTIFY_SECRET): LIFECYCLE_NOTIFY_URL is set, so its signing secret must be ({})",
                SigningSecret::FORM
            );
        }
        let n = &self.notifications;
        for (key, value) in [
            ("notifications.batch_size", n.batch_size.max(0) as u64),
            ("notifications.poll_interval_ms", n.poll_interval_ms),
            ("notifications.retry_base_ms", n.retry_base_ms),
            ("notifications.timeout_ms", n.timeout_ms),
            (
                "notifications.dead_after_hours",
                u64::from(n.dead_after_hours),
            ),
        ] {
            if value == 0 {
                let env = format!(
                    "{ENV_PREFIX}{}",
                    key.replace('.', "__").to_ascii_uppercase()
                );
                bail!("invalid setting `{key}` ({env}): must be at least 1");
            }
        }
        if n.retry_max_ms < n.retry_base_ms {
            bail!(
                "invalid setting `notifications.retry_max_ms` ({ENV_PREFIX}NOTIFICATIONS__RETRY_MAX_MS): below notifications.retry_base_ms"
            );
        }
        // Bounded so that no delay added to a time can overflow it.
        if n.retry_max_ms > 86_400_000 || n.dead_after_hours > 24 * 365 {
            bail!(
                "invalid setting `notifications.retry_max_ms` or `notifications.dead_after_hours`: at most a day and a year"
            );
        }
        Ok(())
    }

    /// Cross-field checks that no single key's parser can make.
    fn check(&self) -> anyhow::Result<()> {
        if let Some(token) = &self.admin_token
            && token.expose().chars().count() < MIN_ADMIN_TOKEN
        {
            bail!(
                "invalid setting `admin_token` (LIFECYCLE_ADMIN_TOKEN): at least {MIN_ADMIN_TOKEN} characters (it is an ops password; `openssl rand -base64 32` makes one)"
            );
        }
        if let Some(mailto) = &self.unsubscribe_mailto {
            crate::domain::Email::parse(mailto).map_err(|e| {
                anyhow::anyhow!(
                    "invalid setting `unsubscribe_mailto` (LIFECYCLE_UNSUBSCRIBE_MAILTO): {e}"
                )
            })?;
        }
        if self.email_providers.is_empty() {
            bail!(
                "invalid setting `email_providers` (LIFECYCLE_EMAIL_PROVIDERS): name at least one provider"
            );
        }
        if self.sms_providers.is_empty() {
            bail!(
                "invalid setting `sms_providers` (LIFECYCLE_SMS_PROVIDERS): name at least one provider"
            );
        }
        let positive = [
            ("ingest.batch_size", self.ingest.batch_size as u64),
            ("ingest.consumers", self.ingest.consumers as u64),
            ("ingest.prefetch", self.ingest.prefetch as u64),
            (
                "dispatch.batch_size",
                self.dispatch.batch_size.max(0) as u64,
            ),
            ("dispatch.concurrency", self.dispatch.concurrency as u64),
            ("dispatch.pipelines", self.dispatch.pipelines as u64),
            (
                "dispatch.smtp_pool_size",
                self.dispatch.smtp_pool_size as u64,
            ),
            ("scheduler.lease_secs", self.scheduler.lease_secs),
            (
                "dispatch.breaker_failures",
                u64::from(self.dispatch.breaker_failures),
            ),
            (
                "scheduler.batch_size",
                self.scheduler.batch_size.max(0) as u64,
            ),
            (
                "dispatch.max_attempts",
                self.dispatch.max_attempts.max(0) as u64,
            ),
            ("dispatch.retry_max_ms", self.dispatch.retry_max_ms),
        ];
        if self.dispatch.retry_max_ms < self.dispatch.retry_base_ms {
            bail!(
                "invalid setting `dispatch.retry_max_ms` ({ENV_PREFIX}DISPATCH__RETRY_MAX_MS): {} is below dispatch.retry_base_ms ({})",
                self.dispatch.retry_max_ms,
                self.dispatch.retry_base_ms
            );
        }
        for (name, limit) in self.dispatch.rate_limit.all() {
            if limit.is_some_and(|l| !(l.is_finite() && l > 0.0)) {
                bail!(
                    "invalid setting `dispatch.rate_limit.{name}` ({ENV_PREFIX}DISPATCH__RATE_LIMIT__{}): must be a positive number of messages per second",
                    name.to_ascii_uppercase()
                );
            }
        }
        for (key, value) in positive {
            if value == 0 {
                let env = format!(
                    "{ENV_PREFIX}{}",
                    key.replace('.', "__").to_ascii_uppercase()
                );
                bail!("invalid setting `{key}` ({env}): must be at least 1");
            }
        }
        Ok(())
    }
}

/// Puts one environment value at its dotted place in the table (`INGEST__PREFETCH` →
/// `ingest.prefetch`). Values stay strings; the typed parsers read them.
fn overlay(table: &mut toml::Table, key: &str, value: String) -> anyhow::Result<()> {
    let mut parts: Vec<&str> = key.split("__").collect();
    let last = parts.pop().unwrap_or_default();
    let mut current = table;
    for part in parts {
        let entry = current
            .entry(part.to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = match entry {
            toml::Value::Table(t) => t,
            _ => bail!("`{part}` is a value, not a section"),
        };
    }
    current.insert(last.to_owned(), toml::Value::String(value));
    Ok(())
}

fn parsed_opt<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: fmt::Display,
{
    parsed::<D, T>(deserializer).map(Some)
}

/// A list of values each parsed from its text, from a TOML array or a comma-separated string
/// (`10.0.0.1, 10.0.0.2`).
fn list_parsed<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: fmt::Display,
{
    let items: Vec<String> = match toml::Value::deserialize(deserializer)? {
        toml::Value::String(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        toml::Value::Array(items) => items
            .into_iter()
            .map(|item| match item {
                toml::Value::String(s) => Ok(s),
                other => Err(de::Error::custom(format!(
                    "expected a list of strings, found {}",
                    other.type_str()
                ))),
            })
            .collect::<Result<_, _>>()?,
        other => {
            return Err(de::Error::custom(format!(
                "expected a list, found {}",
                other.type_str()
            )));
        }
    };
    items
        .iter()
        .map(|item| item.trim().parse().map_err(de::Error::custom))
        .collect()
}

/// A list, from a TOML array or a comma-separated string (`smtp,file`).
fn list<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    let value = toml::Value::deserialize(deserializer)?;
    let items: Vec<toml::Value> = match value {
        toml::Value::String(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| toml::Value::String(s.to_owned()))
            .collect(),
        toml::Value::Array(items) => items,
        other => {
            return Err(de::Error::custom(format!(
                "expected a list, found {}",
                other.type_str()
            )));
        }
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let shown = match &item {
            toml::Value::String(s) => format!("{s:?}"),
            other => other.type_str().to_owned(),
        };
        let parsed = T::deserialize(item)
            .map_err(|_| de::Error::custom(format!("unknown provider {shown}")))?;
        out.push(parsed);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(file: Option<&str>, env: &[(&str, &str)]) -> anyhow::Result<Settings> {
        Settings::from_sources(
            file,
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    fn error(file: Option<&str>, env: &[(&str, &str)]) -> String {
        load(file, env).unwrap_err().to_string()
    }

    #[test]
    fn defaults_follow_the_design() {
        let s = load(None, &[]).unwrap();
        assert_eq!(s.exchange, "commerce.events");
        assert_eq!(s.database_url.database(), "lifecycle");
        assert_eq!(s.email_providers, vec![EmailProviderKind::File]);
        assert_eq!(s.http_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(s.ingest.queue, "lifecycle.events");
        assert_eq!(s.smtp_url.port, 25);
        assert_eq!(s.program.signup_bonus, 100);
    }

    #[test]
    fn the_program_comes_from_the_file() {
        let file = r#"
            [program]
            signup_bonus = 50
            tiers = [{ name = "Member", threshold = 0 }, { name = "VIP", threshold = 1000, benefits = ["Lounge"] }]
            [program.earn]
            GBP = { points = 2, per = 1 }
        "#;
        let s = load(Some(file), &[("LIFECYCLE_PROGRAM__BIRTHDAY_BONUS", "25")]).unwrap();
        assert_eq!(s.program.signup_bonus, 50);
        assert_eq!(s.program.birthday_bonus, 25);
        assert_eq!(s.program.tiers[1].benefits, ["Lounge"]);
        assert_eq!(s.program.earn["GBP"].points, 2);
        let bad = "[program]\ntiers = [{ name = \"Gold\", threshold = 10 }]\n";
        assert!(error(Some(bad), &[]).contains("first tier must have threshold 0"));
    }

    #[test]
    fn environment_overlays_file() {
        let file = "exchange = \"from.file\"\n[ingest]\nprefetch = 10\nbatch_size = 7\n";
        let s = load(
            Some(file),
            &[
                ("LIFECYCLE_EXCHANGE", "from.env"),
                ("LIFECYCLE_INGEST__PREFETCH", "99"),
                ("LIFECYCLE_EMAIL_PROVIDERS", "smtp, file"),
                ("LIFECYCLE_NOW", "2026-11-22T10:00:00+01:00"),
                ("OTHER", "ignored"),
            ],
        )
        .unwrap();
        assert_eq!(s.exchange, "from.env");
        assert_eq!(s.ingest.prefetch, 99);
        assert_eq!(s.ingest.batch_size, 7);
        assert_eq!(
            s.email_providers,
            vec![EmailProviderKind::Smtp, EmailProviderKind::File]
        );
        assert_eq!(s.now.unwrap().0.to_rfc3339(), "2026-11-22T09:00:00+00:00");
    }

    #[test]
    fn errors_name_the_key() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("LIFECYCLE_INGEST__PREFETCH", "lots")],
                "`ingest.prefetch` (LIFECYCLE_INGEST__PREFETCH)",
            ),
            (
                &[("LIFECYCLE_AMQP_URL", "http://x")],
                "`amqp_url` (LIFECYCLE_AMQP_URL)",
            ),
            (
                &[("LIFECYCLE_EMAIL_PROVIDERS", "smtp,pigeon")],
                "unknown provider \"pigeon\"",
            ),
            (&[("LIFECYCLE_NOW", "yesterday")], "`now` (LIFECYCLE_NOW)"),
            (
                &[("LIFECYCLE_DISPATCH__RETRY_MAX_MS", "1000")],
                "`dispatch.retry_max_ms` (LIFECYCLE_DISPATCH__RETRY_MAX_MS): 1000 is below",
            ),
            (
                &[("LIFECYCLE_LOG_FORMAT", "yaml")],
                "`log_format` (LIFECYCLE_LOG_FORMAT)",
            ),
            (
                &[("LIFECYCLE_FROM", "not a mailbox")],
                "`from` (LIFECYCLE_FROM)",
            ),
            (
                &[("LIFECYCLE_AMPQ_URL", "amqp://x")],
                "unknown field `ampq_url`",
            ),
            (
                &[("LIFECYCLE_DATABASE_URL", "postgres://u:hunter2@h/")],
                "must name a database",
            ),
            (
                &[("LIFECYCLE_INGEST__CONSUMERS", "0")],
                "`ingest.consumers` (LIFECYCLE_INGEST__CONSUMERS)",
            ),
            (
                &[("LIFECYCLE_ADMIN_TOKEN", "secret")],
                "`admin_token` (LIFECYCLE_ADMIN_TOKEN): at least 32 characters",
            ),
            (
                &[("LIFECYCLE_HTTP__TRUSTED_PROXIES", "10.0.0.0/33")],
                "`http.trusted_proxies` (LIFECYCLE_HTTP__TRUSTED_PROXIES)",
            ),
            (
                &[(
                    "LIFECYCLE_CONSOLE__TEST_RECIPIENTS",
                    "qa@example.com, 12345",
                )],
                "`console.test_recipients` (LIFECYCLE_CONSOLE__TEST_RECIPIENTS)",
            ),
        ];
        for (env, expected) in cases {
            let message = error(None, env);
            assert!(message.contains(expected), "{env:?}: {message}");
            assert!(!message.contains('\n'), "one line: {message}");
        }
    }

    #[test]
    fn proxies_and_test_recipients_parse() {
        let s = load(
            Some("[http]\ntrusted_proxies = [\"10.1.0.0/16\", \"::1\"]\n"),
            &[(
                "LIFECYCLE_CONSOLE__TEST_RECIPIENTS",
                "QA@Example.com, +821012345678",
            )],
        )
        .unwrap();
        let [net, v6] = s.http.trusted_proxies[..] else {
            panic!("two proxies: {:?}", s.http.trusted_proxies);
        };
        for (ip, inside) in [
            ("10.1.200.3", true),
            ("10.2.0.1", false),
            ("::ffff:10.1.0.9", true),
        ] {
            assert_eq!(net.contains(ip.parse().unwrap()), inside, "{ip}");
        }
        assert!(v6.contains("::1".parse().unwrap()));
        assert!(!v6.contains("127.0.0.1".parse().unwrap()));
        assert_eq!(s.http.statement_timeout_ms, 15_000);
        assert_eq!(s.console.test_sends_per_hour, 30);
        assert_eq!(s.console.test_recipients.len(), 2);
        assert!(
            matches!(&s.console.test_recipients[1], TestRecipient::Phone(p) if p == "+821012345678")
        );
    }

    #[test]
    fn secrets_are_not_printed() {
        let s = load(
            None,
            &[
                (
                    "LIFECYCLE_DATABASE_URL",
                    "postgres://app:hunter2@db/lifecycle",
                ),
                ("LIFECYCLE_AMQP_URL", "amqp://app:hunter3@mq:5672/%2f"),
                (
                    "LIFECYCLE_SMTP_URL",
                    "smtp://mailer:hunter4@relay:587?tls=required",
                ),
                (
                    "LIFECYCLE_ADMIN_TOKEN",
                    "hunter5-is-a-long-enough-admin-token",
                ),
            ],
        )
        .unwrap();
        let shown = format!("{s:?}");
        for secret in ["hunter2", "hunter3", "hunter4", "hunter5"] {
            assert!(!shown.contains(secret), "{secret} leaked: {shown}");
        }
        assert_eq!(s.smtp_url.tls, SmtpTls::Required);
        assert_eq!(
            s.smtp_url.credentials.as_ref().unwrap().1.expose(),
            "hunter4"
        );
        let bad = error(
            None,
            &[("LIFECYCLE_DATABASE_URL", "mysql://app:hunter6@db/x")],
        );
        assert!(!bad.contains("hunter6"), "{bad}");
    }

    #[test]
    fn holdout_percent_is_one_share_or_one_per_trigger() {
        let settings = |file: Option<&str>, env: &[(&str, &str)]| {
            Settings::from_sources(
                file,
                env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
            )
        };
        let s = settings(None, &[("LIFECYCLE_PROGRAM__HOLDOUT_PERCENT", "12.5")]).unwrap();
        assert_eq!(s.program.holdout_percent.percent("welcome"), 12.5);
        assert_eq!(s.program.holdout_percent.percent("birthday"), 12.5);
        let s = settings(
            Some("[program.holdout_percent]\nwelcome = 50\ndefault = 10\n"),
            &[("LIFECYCLE_PROGRAM__HOLDOUT_PERCENT__BIRTHDAY", "20")],
        )
        .unwrap();
        let h = &s.program.holdout_percent;
        assert_eq!(
            (
                h.percent("welcome"),
                h.percent("birthday"),
                h.percent("tier-up")
            ),
            (50.0, 20.0, 10.0)
        );
        for (value, expected) in [
            ("101", "not between 0 and 100"),
            ("-1", "not between 0 and 100"),
            ("half", "not a percentage"),
        ] {
            let error = settings(None, &[("LIFECYCLE_PROGRAM__HOLDOUT_PERCENT", value)])
                .unwrap_err()
                .to_string();
            assert!(error.contains(expected), "{value}: {error}");
        }
        let error = settings(Some("[program.holdout_percent]\nwelcom = 50\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(error.contains("\"welcom\" is not a trigger"), "{error}");
    }
}
