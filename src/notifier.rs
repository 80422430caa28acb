//! The notifier: sends the recorded notifications (`crate::notifications`) to the platform.
//! It publishes them to the notifications exchange in id order, persistently, with publisher
//! confirms, marking each page published once the broker confirmed it; and POSTs each to
//! `LIFECYCLE_NOTIFY_URL` signed as Standard Webhooks, retried with a doubling delay until
//! `notifications.dead_after_hours` have passed, then dead (visible to ops).
//!
//! One replica sends at a time: the notifier holds a PostgreSQL advisory lock on a connection
//! of its own while it works, so a member's notifications leave in the order they were
//! recorded. A crash between a change's commit and its publication loses nothing: the row
//! waits, and is published (with the same id) by whichever replica takes the lock next. A
//! crash after the broker took a page but before it was marked publishes that page again;
//! consumers drop the copies by id.

use std::time::Duration;

use anyhow::Context;
use aws_lc_rs::hmac;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use lapin::BasicProperties;
use sqlx::PgConnection;
use tracing::{info, warn};

use crate::app::App;
use crate::backoff::Backoff;
use crate::notifications::{self, Sinks, Stored};
use crate::publish::Publisher;
use crate::shutdown::Shutdown;

/// The advisory lock only the sending replica holds.
const LOCK: i64 = 0x6c69_6665_6e6f_7469; // "lifenoti"

/// How long a replica without the lock waits before trying for it again.
const LOCK_RETRY: Duration = Duration::from_secs(1);

/// Runs until shutdown: takes the lock, then publishes and POSTs. Broker, database or lock
/// trouble is logged and started over after a backoff.
pub(crate) async fn run(app: App, shutdown: Shutdown) -> anyhow::Result<()> {
    let sinks = Sinks::of(&app.settings);
    match notifications::forget_unsendable(&app.pool, sinks).await {
        Ok(0) => {}
        Ok(n) => warn!(
            notifications = n,
            "Notifications recorded for a way now turned off will not be sent that way."
        ),
        Err(error) => warn!(%error, "Letting go of unsendable notifications failed."),
    }
    if !sinks.any() {
        shutdown.triggered().await;
        return Ok(());
    }
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    while !shutdown.is_triggered() {
        match send_while_holding_the_lock(&app, sinks, &shutdown).await {
            Ok(()) => backoff.reset(),
            Err(error) => {
                warn!(
                    error = crate::mask::text(&format!("{error:#}")),
                    "Sending notifications failed; starting over."
                );
                shutdown.sleep(backoff.next()).await;
            }
        }
    }
    Ok(())
}

/// Waits for the lock, then sends until shutdown or an error.
async fn send_while_holding_the_lock(
    app: &App,
    sinks: Sinks,
    shutdown: &Shutdown,
) -> anyhow::Result<()> {
    // A connection of its own: the lock lives as long as it, and is gone when it closes.
    let mut lock = app.pool.acquire().await?.detach();
    loop {
        let held = sqlx::query_scalar!(r#"select pg_try_advisory_lock($1) as "held!""#, LOCK)
            .fetch_one(&mut lock)
            .await?;
        if held {
            break;
        }
        shutdown.sleep(LOCK_RETRY).await;
        if shutdown.is_triggered() {
            return Ok(());
        }
    }
    info!("Notifier started: this replica sends the notifications.");
    let publishing = async {
        match sinks.amqp {
            true => publish(app, shutdown).await,
            false => Ok(()),
        }
    };
    let posting = async {
        match sinks.http {
            true => post(app, shutdown).await,
            false => Ok(()),
        }
    };
    let watching = watch_lock(&mut lock, shutdown);
    // The first to fail ends the others; the lock goes with its connection.
    tokio::try_join!(publishing, posting, watching)?;
    Ok(())
}

/// Checks every few seconds that the lock's connection is alive: if it is not, the lock is
/// gone and another replica may be sending, so this one stops.
async fn watch_lock(lock: &mut PgConnection, shutdown: &Shutdown) -> anyhow::Result<()> {
    while !shutdown.is_triggered() {
        shutdown.sleep(Duration::from_secs(2)).await;
        // Bounded: a half-open connection (after a failover) must not keep this replica
        // sending while another holds the lock.
        let alive = tokio::time::timeout(
            Duration::from_secs(5),
            sqlx::query!("select 1 as alive").fetch_one(&mut *lock),
        )
        .await;
        match alive {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                return Err(error).context("the notifier's lock connection was lost");
            }
            Err(_) => anyhow::bail!("the notifier's lock connection did not answer within 5 s"),
        }
    }
    Ok(())
}

/// Publishes unpublished notifications a page at a time, in id order, until shutdown.
async fn publish(app: &App, shutdown: &Shutdown) -> anyhow::Result<()> {
    let settings = &app.settings;
    let exchange = settings.notifications_exchange.as_str();
    let connection = crate::amqp::connect(&settings.amqp_url, "lifecycle-notifier").await?;
    let publisher = Publisher::open(&connection).await?;
    declare_exchange(&connection, exchange).await?;
    let source = settings.public_url.as_str();
    let pause = Duration::from_millis(settings.notifications.poll_interval_ms);
    let result = async {
        while !shutdown.is_triggered() {
            let page = notifications::unpublished(&app.pool, settings.notifications.batch_size)
                .await
                .context("reading unpublished notifications")?;
            if page.is_empty() {
                shutdown.sleep(pause).await;
                continue;
            }
            let mut confirms = Vec::with_capacity(page.len());
            for notice in &page {
                let properties = BasicProperties::default()
                    .with_content_type("application/cloudevents+json".into())
                    .with_message_id(notice.event_id().as_str().into())
                    .with_type(notice.kind.as_str().into());
                confirms.push(
                    publisher
                        .publish_to_any(exchange, &notice.kind, &notice.body(source), properties)
                        .await,
                );
            }
            let mut confirmed = Vec::with_capacity(page.len());
            let mut failure = None;
            for (notice, confirm) in page.iter().zip(confirms) {
                match Publisher::confirmed(confirm).await {
                    Ok(()) => confirmed.push(notice.id),
                    Err(error) => {
                        failure = Some(error);
                        break;
                    }
                }
            }
            notifications::published(&app.pool, &confirmed)
                .await
                .context("marking notifications published")?;
            for notice in page.iter().take(confirmed.len()) {
                metrics::counter!("lifecycle_notifications_published_total", "type" => notice.kind.clone())
                    .increment(1);
            }
            if let Some(error) = failure {
                return Err(error.context("publishing a notification"));
            }
        }
        anyhow::Ok(())
    }
    .await;
    publisher.close().await;
    crate::amqp::bounded(connection.close(200, "bye".into())).await;
    result
}

/// Declares the notifications exchange on a channel of its own.
async fn declare_exchange(connection: &lapin::Connection, exchange: &str) -> anyhow::Result<()> {
    let channel = connection.create_channel().await?;
    crate::amqp::declare_notifications(&channel, exchange).await?;
    crate::amqp::bounded(channel.close(200, "declared".into())).await;
    Ok(())
}

/// POSTs due notifications one at a time, oldest first, until shutdown.
async fn post(app: &App, shutdown: &Shutdown) -> anyhow::Result<()> {
    let settings = &app.settings;
    let n = &settings.notifications;
    let (Some(url), Some(secret)) = (&settings.notify_url, &settings.notify_secret) else {
        return Ok(());
    };
    let client = crate::dispatch::providers::client_builder()
        .timeout(Duration::from_millis(n.timeout_ms))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .context("building the notifications' HTTP client")?;
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.key());
    let source = settings.public_url.as_str();
    let pause = Duration::from_millis(n.poll_interval_ms);
    let dead_after = i32::try_from(n.dead_after_hours).unwrap_or(i32::MAX);
    while !shutdown.is_triggered() {
        let due = notifications::due_posts(&app.pool, n.batch_size)
            .await
            .context("reading due notifications")?;
        if due.is_empty() {
            shutdown.sleep(pause).await;
            continue;
        }
        // A member whose POST failed in this page waits for the next: their later
        // notifications must not overtake it.
        let mut held: std::collections::HashSet<&str> = std::collections::HashSet::new();
        for notice in &due {
            if shutdown.is_triggered() {
                break;
            }
            if held.contains(notice.member_id.as_str()) {
                continue;
            }
            let error = post_one(&client, url.as_str(), &key, notice, source)
                .await
                .err();
            let retry_ms = retry_delay(n.retry_base_ms, n.retry_max_ms, notice.attempts);
            let dead =
                notifications::posted(&app.pool, notice.id, error.as_deref(), retry_ms, dead_after)
                    .await
                    .context("recording a notification's POST")?;
            let outcome = match (&error, dead) {
                (None, _) => "delivered",
                (Some(_), false) => "failed",
                (Some(_), true) => "dead",
            };
            metrics::counter!("lifecycle_notifications_posts_total", "outcome" => outcome)
                .increment(1);
            if error.is_some() && !dead {
                held.insert(&notice.member_id);
            }
            if let Some(error) = error {
                warn!(
                    notification = notice.event_id(),
                    attempts = notice.attempts + 1,
                    dead,
                    error,
                    "POSTing a notification failed."
                );
            }
        }
    }
    Ok(())
}

/// One signed POST; `Err` says why it did not succeed (any status but 2xx is a failure, and a
/// redirect is not followed, as Standard Webhooks says).
async fn post_one(
    client: &reqwest::Client,
    url: &str,
    key: &hmac::Key,
    notice: &Stored,
    source: &str,
) -> Result<(), String> {
    let id = notice.event_id();
    let body = notice.body(source);
    let timestamp = chrono::Utc::now().timestamp();
    let signature = sign(key, &id, timestamp, &body);
    let response = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("webhook-id", &id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(body)
        .send()
        .await
        .map_err(|e| crate::mask::text(&format!("{e}")))?;
    match response.status() {
        status if status.is_success() => Ok(()),
        status => Err(format!("HTTP {status}")),
    }
}

/// The `webhook-signature` header of Standard Webhooks: `v1,` and the base64 of
/// HMAC-SHA256(`{id}.{timestamp}.{body}`).
pub(crate) fn sign(key: &hmac::Key, id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut signed = format!("{id}.{timestamp}.").into_bytes();
    signed.extend_from_slice(body);
    let tag = hmac::sign(key, &signed);
    format!("v1,{}", STANDARD.encode(tag.as_ref()))
}

/// The delay before POST number `attempts + 2`: `base` doubled per failed try, at most `max`.
fn retry_delay(base_ms: u64, max_ms: u64, attempts: i32) -> i64 {
    let doublings = attempts.clamp(0, 40) as u32;
    let delay = base_ms
        .saturating_mul(1_u64 << doublings.min(62))
        .min(max_ms);
    i64::try_from(delay).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test vector of the Standard Webhooks reference libraries
    /// (libraries/javascript/src/webhook.test.ts, "sign function works"): secret
    /// `whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw`, id `msg_p5jXN8AQM9LWM0D4loKWxJek`, timestamp
    /// 1614265330, body `{"test": 2432232314}`.
    #[test]
    fn signs_the_standard_webhooks_test_vector() {
        let secret: crate::config::SigningSecret =
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".parse().unwrap();
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret.key());
        assert_eq!(
            sign(
                &key,
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        // The prefix is optional, as in the reference libraries.
        let bare: crate::config::SigningSecret =
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".parse().unwrap();
        assert_eq!(bare.key(), secret.key());
    }

    #[test]
    fn retries_double_up_to_the_most() {
        let delays: Vec<i64> = (0..6).map(|n| retry_delay(100, 1_000, n)).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1_000, 1_000]);
        assert_eq!(retry_delay(5_000, 3_600_000, i32::MAX), 3_600_000);
    }
}
