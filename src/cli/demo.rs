//! `lifecycle demo`: publish sample events, process them with a real worker, show the result.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use sqlx::PgPool;

use crate::amqp;
use crate::app::{App, Roles};
use crate::config::Settings;
use crate::domain::{Email, Phone};
use crate::metrics::Metrics;
use crate::publish::Publisher;
use crate::worker::Worker;

/// How long the demo waits for any one step.
const STEP_DEADLINE: Duration = Duration::from_secs(60);

/// Runs the demo: migrate, publish `events` one at a time with the clock at each event's
/// `time`, move the clock past the abandoned-cart delay, and print the messages and balances.
/// The scheduler runs all along, so the scans fire as the clock passes their instants.
pub(super) async fn run(mut settings: Settings, events: &Path) -> anyhow::Result<()> {
    // One consumer, so the story reads in the order the file tells it (with several, a
    // member's events may be applied out of order, as they may from any platform).
    settings.ingest.consumers = 1;
    let lines = crate::publish::read_lines(events)?;
    let parsed: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_default())
        .collect();
    let member_ids: Vec<String> = parsed
        .iter()
        .filter_map(|v| v["data"]["member_id"].as_str().map(str::to_owned))
        .collect();
    let times: Vec<Option<DateTime<Utc>>> = parsed
        .iter()
        .map(|v| v["time"].as_str().and_then(|t| t.parse().ok()))
        .collect();
    let first = times
        .iter()
        .flatten()
        .min()
        .copied()
        .unwrap_or_else(Utc::now);
    let last = times.iter().flatten().max().copied().unwrap_or(first);
    let end =
        last + chrono::Duration::minutes(i64::from(settings.program.abandoned_cart_minutes) + 1);
    settings.now = Some(crate::domain::Instant(first));

    let app = App::open(settings).await?;
    let heard = Listener::bind(&app).await?;
    let worker = Worker::start(
        app.clone(),
        Roles {
            ingest: true,
            dispatch: true,
            schedule: true,
            http: false,
        },
    )
    .await?;
    let mut result = tell(&app, &lines, &times, end, &member_ids).await;
    if result.is_ok() && heard.is_some() {
        result = wait("the notifications to be published", || async {
            Ok(crate::notifications::backlog(&app.pool).await?.unpublished == 0)
        })
        .await;
    }
    worker.stop().await?;
    result?;
    let m = &app.metrics;
    println!(
        "Events: {} applied, {} duplicates (event ids already applied), {} waiting for a prerequisite, {} dead-lettered (list them with `lifecycle dead-letters`).",
        Metrics::get(&m.events_applied),
        Metrics::get(&m.events_duplicate),
        Metrics::get(&m.events_deferred),
        Metrics::get(&m.events_dead_lettered),
    );
    let rows = recent_messages(&app.pool, Some(&member_ids), 100).await?;
    println!("\nMessages for the demo's members:\n");
    print!("{}", table(&rows));
    let balances = sqlx::query!(
        "select member_id, balance, lifetime from members where member_id = any($1)
         order by enrolled_at, member_id",
        &member_ids
    )
    .fetch_all(&app.pool)
    .await?;
    println!("\nPoints:\n");
    for r in balances {
        let (member, balance, lifetime) = (r.member_id, r.balance, r.lifetime);
        println!("{member:<14} balance {balance:>5}   lifetime {lifetime:>5}");
    }
    // Up to a second past the clock, so what was sent at the demo's last instant counts.
    let now = app.clock.now();
    let to = now + chrono::Duration::seconds(1);
    let report =
        crate::report::loyalty(&app.pool, crate::report::Period::new(None, Some(to), now)?).await?;
    println!(
        "\nThe loyalty report of the 30 days to the demo's end (`lifecycle report`; the whole database):\n"
    );
    print!("{}", super::report::table(&report));
    if let Some(heard) = heard {
        println!(
            "\nNotifications to the platform, as a queue bound to {} received them:\n",
            app.settings.notifications_exchange
        );
        print!("{}", heard.drain().await?);
    }
    println!(
        "\nFiles written by the file providers are in {}/.",
        app.settings.outbox_dir.display()
    );
    Ok(())
}

/// Publishes each event with the clock at its time and waits until it is handled, then moves
/// the clock to `end` and waits for the scans and for every due message to be sent.
async fn tell(
    app: &App,
    lines: &[String],
    times: &[Option<DateTime<Utc>>],
    end: DateTime<Utc>,
    member_ids: &[String],
) -> anyhow::Result<()> {
    let connection = amqp::connect(&app.settings.amqp_url, "lifecycle-demo").await?;
    amqp::declare_topology(&connection, &app.settings).await?;
    let publisher = Publisher::open(&connection).await?;
    let start = app.metrics.events_handled();
    for (i, (line, time)) in lines.iter().zip(times).enumerate() {
        if let Some(t) = time.filter(|t| *t > app.clock.now()) {
            settle(app, member_ids).await?;
            app.clock.set(t);
        }
        publisher
            .publish_events(&app.settings.exchange, [line])
            .await?;
        wait(&format!("event {} to be handled", i + 1), || async {
            Ok(app.metrics.events_handled() > start + i as u64)
        })
        .await?;
    }
    publisher.close().await;
    connection.close(200, "bye".into()).await.ok();
    println!(
        "Published {} events one by one, the clock following their times from {} to {}.",
        lines.len(),
        times
            .iter()
            .flatten()
            .min()
            .map_or("-".into(), |t| t.to_rfc3339()),
        times
            .iter()
            .flatten()
            .max()
            .map_or("-".into(), |t| t.to_rfc3339()),
    );
    settle(app, member_ids).await?;
    app.clock.set(end);
    println!(
        "Then the clock moved on to {}: the scheduled scans ran.",
        end.to_rfc3339()
    );
    settle(app, member_ids).await
}

/// Waits until every scan has caught up with the clock and no message of the demo's members
/// is due and unsent.
async fn settle(app: &App, member_ids: &[String]) -> anyhow::Result<()> {
    wait("the scans and dispatch to catch up", || async {
        let now = app.clock.now();
        let due = crate::outbox::search::unsent_of(&app.pool, now, member_ids).await?;
        Ok(due == 0 && crate::scheduler::caught_up(app, now).await?)
    })
    .await
}

/// Polls `done` until it is true, or fails after `STEP_DEADLINE`.
async fn wait<F, Fut>(what: &str, mut done: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + STEP_DEADLINE;
    while !done().await? {
        if Instant::now() > deadline {
            bail!(
                "the demo gave up waiting {}s for {what}",
                STEP_DEADLINE.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// One message as the demo and `deliveries` show it.
pub(super) struct MessageRow {
    /// Outbox id.
    pub id: i64,
    /// Trigger name.
    pub trigger: String,
    /// email or sms.
    pub channel: String,
    /// Masked recipient.
    pub to: String,
    /// Final or current status.
    pub status: String,
    /// Provider and its reference, or the error.
    pub detail: String,
}

/// The most recent messages, of the given members when `members` is set.
pub(super) async fn recent_messages(
    pool: &PgPool,
    members: Option<&[String]>,
    limit: i64,
) -> anyhow::Result<Vec<MessageRow>> {
    let rows = crate::outbox::search::recent_of_members(pool, members, limit)
        .await
        .context("reading messages")?;
    let mut out: Vec<MessageRow> = rows
        .into_iter()
        .map(|r| {
            let to = match r.channel.as_str() {
                "email" => r
                    .email
                    .and_then(|e| Email::parse(&e).ok())
                    .map(|e| e.masked()),
                _ => r
                    .phone
                    .and_then(|p| Phone::parse(&p).ok())
                    .map(|p| p.masked()),
            };
            let detail = match (r.provider, r.provider_ref) {
                (Some(provider), Some(reference)) => format!("{provider}: {reference}"),
                _ => r.last_error.unwrap_or_default(),
            };
            MessageRow {
                id: r.id,
                trigger: r.trigger,
                channel: r.channel,
                to: to.unwrap_or_else(|| "-".into()),
                status: r.status,
                detail,
            }
        })
        .collect();
    out.reverse();
    Ok(out)
}

/// A queue of the demo's own, bound to the notifications exchange with `#`: what a platform
/// subscribed to everything would hear.
struct Listener {
    connection: lapin::Connection,
    channel: lapin::Channel,
    queue: String,
}

impl Listener {
    /// Binds the queue; `None` when notifications are off.
    async fn bind(app: &App) -> anyhow::Result<Option<Listener>> {
        let exchange = app.settings.notifications_exchange.as_str();
        if exchange.is_empty() {
            return Ok(None);
        }
        let connection = amqp::connect(&app.settings.amqp_url, "lifecycle-demo-listener").await?;
        amqp::declare_topology(&connection, &app.settings).await?;
        let channel = connection.create_channel().await?;
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?
            .name()
            .to_string();
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Some(Listener {
            connection,
            channel,
            queue,
        }))
    }

    /// Takes everything the queue holds, as a table (the data without the member id).
    async fn drain(self) -> anyhow::Result<String> {
        let mut rows = Vec::new();
        while let Some(message) = self
            .channel
            .basic_get(self.queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await?
        {
            let event: serde_json::Value = serde_json::from_slice(&message.delivery.data)?;
            let data = event["data"].as_object().cloned().unwrap_or_default();
            let details: Vec<String> = data
                .iter()
                .filter(|(k, v)| *k != "member_id" && !v.is_null())
                .map(|(k, v)| match v {
                    serde_json::Value::String(s) => format!("{k}={s}"),
                    other => format!("{k}={other}"),
                })
                .collect();
            rows.push(vec![
                event["id"].as_str().unwrap_or_default().to_owned(),
                event["type"].as_str().unwrap_or_default().to_owned(),
                event["subject"].as_str().unwrap_or_default().to_owned(),
                details.join(" "),
            ]);
        }
        crate::amqp::bounded(self.channel.close(200, "bye".into())).await;
        crate::amqp::bounded(self.connection.close(200, "bye".into())).await;
        Ok(super::table::text_table(
            &["id", "type", "member", "data"],
            &rows,
            "(none: every event was already applied)",
        ))
    }
}

/// Formats messages as an aligned text table.
pub(super) fn table(rows: &[MessageRow]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.id.to_string(),
                r.trigger.clone(),
                r.channel.clone(),
                r.to.clone(),
                r.status.clone(),
                r.detail.clone(),
            ]
        })
        .collect();
    super::table::text_table(
        &["id", "trigger", "channel", "to", "status", "where"],
        &cells,
        "(no messages)",
    )
}
