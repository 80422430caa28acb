//! What is waiting: the broker's queues (depth and consumers of the input, retry and
//! dead-letter queues) and the outbox by status; sampled into gauges every few seconds by the
//! process that serves HTTP, and read at once by `GET /api/queues` and `lifecycle queues`.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde::Serialize;
use tracing::warn;

use crate::app::App;
use crate::shutdown::Shutdown;

/// One broker queue.
#[derive(Debug, Clone, Copy, Default, Serialize, utoipa::ToSchema)]
pub struct Depth {
    /// Messages ready (not yet delivered to a consumer).
    pub messages: u32,
    /// Consumers subscribed.
    pub consumers: u32,
}

/// The queues and the outbox now.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Queues {
    /// The input queue (`ingest.queue`).
    pub events: Depth,
    /// Early events waiting to be tried again (`ingest.retry_queue`).
    pub retry: Depth,
    /// Refused events (`ingest.dead_letter_queue`); the dead-letter store moves them to
    /// PostgreSQL, so this is what it has not taken yet.
    pub dead: Depth,
    /// Messages in the outbox by status (`pending`, `sending`, `failed`).
    pub outbox: BTreeMap<String, i64>,
    /// Notifications back to the platform still to leave, and those given up on.
    pub notifications: crate::notifications::Backlog,
    /// What moved over the last five minutes, per minute.
    pub rates: Rates,
}

/// Per-minute rates over the last five minutes.
#[derive(Debug, Clone, Copy, Default, Serialize, utoipa::ToSchema)]
pub struct Rates {
    /// Events applied.
    pub events_applied: f64,
    /// Messages a provider took.
    pub messages_sent: f64,
    /// Provider calls that failed.
    pub attempts_failed: f64,
}

/// How often the gauges are refreshed.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// Reads the queues (passively: nothing is declared) and the outbox.
pub async fn snapshot(app: &App) -> anyhow::Result<Queues> {
    let s = &app.settings.ingest;
    let connection = crate::amqp::connect(&app.settings.amqp_url, "lifecycle-queues").await?;
    let mut depths = Vec::new();
    for name in [&s.queue, &s.retry_queue, &s.dead_letter_queue] {
        // A passive declare of a missing queue closes its channel: one channel per queue.
        let channel = connection.create_channel().await?;
        let depth = match channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
        {
            Ok(queue) => Depth {
                messages: queue.message_count(),
                consumers: queue.consumer_count(),
            },
            Err(_) => Depth::default(),
        };
        crate::amqp::bounded(channel.close(200, "bye".into())).await;
        depths.push(depth);
    }
    crate::amqp::bounded(connection.close(200, "bye".into())).await;
    let outbox = crate::outbox::counts(&app.pool)
        .await
        .context("counting the outbox")?;
    let applied: i64 = sqlx::query_scalar!(
        r#"select count(*) as "count!" from inbox where applied_at > now() - interval '5 minutes'"#
    )
    .fetch_one(&app.pool)
    .await
    .context("reading the rates")?;
    let (sent, failed) = crate::outbox::recent_calls(&app.pool)
        .await
        .context("reading the rates")?;
    let notifications = crate::notifications::backlog(&app.pool)
        .await
        .context("counting the notifications")?;
    let per_minute = |n: i64| n as f64 / 5.0;
    Ok(Queues {
        rates: Rates {
            events_applied: per_minute(applied),
            messages_sent: per_minute(sent),
            attempts_failed: per_minute(failed),
        },
        events: depths[0],
        retry: depths[1],
        dead: depths[2],
        outbox,
        notifications,
    })
}

/// Refreshes the queue, outbox and coupon gauges until shutdown. A failed read is logged and
/// the gauges keep their last values until the next.
pub(crate) async fn sample(app: App, shutdown: Shutdown) -> anyhow::Result<()> {
    loop {
        let taken = tokio::select! {
            taken = snapshot(&app) => taken,
            _ = shutdown.triggered() => return Ok(()),
        };
        match taken {
            Ok(q) => {
                for (name, depth) in [("events", q.events), ("retry", q.retry), ("dead", q.dead)] {
                    metrics::gauge!("lifecycle_queue_messages", "queue" => name)
                        .set(f64::from(depth.messages));
                    metrics::gauge!("lifecycle_queue_consumers", "queue" => name)
                        .set(f64::from(depth.consumers));
                }
                for (status, n) in q.outbox {
                    metrics::gauge!("lifecycle_outbox_messages", "status" => status).set(n as f64);
                }
                let n = q.notifications;
                for (name, value) in [
                    ("lifecycle_notifications_unpublished", n.unpublished as f64),
                    (
                        "lifecycle_notifications_oldest_unpublished_seconds",
                        n.oldest_unpublished_seconds,
                    ),
                    (
                        "lifecycle_notifications_posts_pending",
                        n.posts_pending as f64,
                    ),
                    (
                        "lifecycle_notifications_oldest_post_seconds",
                        n.oldest_post_seconds,
                    ),
                    ("lifecycle_notifications_posts_dead", n.posts_dead as f64),
                ] {
                    metrics::gauge!(name).set(value);
                }
                match crate::outbox::due(&app.pool).await {
                    Ok(n) => metrics::gauge!("lifecycle_outbox_due_messages").set(n as f64),
                    Err(error) => warn!(%error, "Counting the due messages failed."),
                }
            }
            Err(error) => warn!(
                error = format!("{error:#}"),
                "Reading the queues for the gauges failed."
            ),
        }
        match sqlx::query!(
            r#"select pool, count(*) filter (where occurrence is null) as "left!"
               from coupons group by pool"#
        )
        .fetch_all(&app.pool)
        .await
        {
            Ok(pools) => {
                for p in pools {
                    metrics::gauge!("lifecycle_coupons_remaining", "pool" => p.pool)
                        .set(p.left as f64);
                }
            }
            Err(error) => warn!(%error, "Counting coupons for the gauges failed."),
        }
        shutdown.sleep(SAMPLE_EVERY).await;
        if shutdown.is_triggered() {
            return Ok(());
        }
    }
}
