//! `lifecycle bench`: end-to-end ingest throughput against the broker's raw ceiling, measured
//! in the same run on the same machine.
//!
//! The ceiling is N messages published with confirms to a quorum queue, then consumed and
//! acked by bare lapin consumers with the same prefetch, consumer count and ack batching as
//! ingest (one `multiple` ack per batch of what has arrived), doing nothing else. The end-to-end figure is the same N enrolment events published to the
//! exchange, then consumed by the real ingest: parsed, applied in PostgreSQL transactions
//! (inbox, member, planned welcome message), committed and acked. Both sides start with the
//! messages already queued, so each measures consumption alone. Everything runs in its own
//! exchange, queues and database, removed afterwards.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeleteOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};

use crate::app::{App, Roles, Worker};
use crate::config::{EmailProviderKind, Settings, SmtpUrl};
use crate::ingest;
use crate::metrics::Metrics;
use crate::publish::Publisher;

/// Figures of one run.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    /// Events in each phase.
    pub events: usize,
    /// Publishing with confirms, messages/s.
    pub publish_rate: f64,
    /// Bare consume + ack, messages/s.
    pub ceiling_rate: f64,
    /// Ingest, events/s committed and acked.
    pub ingest_rate: f64,
    /// Peak resident memory of the whole bench process, MiB.
    pub peak_rss_mib: f64,
}

impl Report {
    /// Ingest as a share of the ceiling.
    pub fn ratio(&self) -> f64 {
        self.ingest_rate / self.ceiling_rate
    }
}

/// Runs the benchmark and prints its report. With `smtp`, the welcome messages planned by the
/// ingest phase are then dispatched to that server, first with TCP_NODELAY (as lifecycle
/// sends) and then without (as lettre's own transport does), `messages` of them each time.
pub async fn run(
    mut settings: Settings,
    events: usize,
    mix: bool,
    smtp: Option<SmtpUrl>,
    http: bool,
    messages: usize,
) -> anyhow::Result<()> {
    if events == 0 {
        bail!("--events must be at least 1");
    }
    let tag = format!("bench{}", std::process::id());
    settings.exchange = format!("lifecycle.{tag}.events");
    settings.ingest.queue = format!("lifecycle.{tag}.events");
    settings.ingest.dead_letter_exchange = format!("lifecycle.{tag}.dlx");
    settings.ingest.dead_letter_queue = format!("lifecycle.{tag}.dead");
    settings.ingest.retry_queue = format!("lifecycle.{tag}.retry");
    let database = format!("{}_bench", settings.database_url.database());
    settings.database_url = settings.database_url.with_database(&database);
    crate::db::drop_database(&settings.database_url).await?;

    println!(
        "lifecycle bench: {events} {} events, {} consumers, prefetch {}, batches of up to {}",
        if mix { "mixed" } else { "enrolment" },
        settings.ingest.consumers,
        settings.ingest.prefetch,
        settings.ingest.batch_size
    );
    let bodies: Vec<String> = if mix {
        println!(
            "workload: a quarter enrolments, a quarter orders, an eighth each refunds, adjustments, cart updates, redemptions"
        );
        mixed(&tag, events)
    } else {
        (0..events).map(|i| enrolment(&tag, i)).collect()
    };
    let enrolments = bodies
        .iter()
        .filter(|b| b.contains("\"member.enrolled\""))
        .count();
    let connection = ingest::connect(&settings.amqp_url, "lifecycle-bench").await?;

    let (publish_rate, ceiling_rate) = ceiling(&connection, &settings, &tag, &bodies).await?;
    println!("broker publish (confirms):      {publish_rate:>9.0} msg/s");
    println!("broker ceiling (consume + ack): {ceiling_rate:>9.0} msg/s");

    let result = measure(&settings, &bodies, smtp, http, messages.min(enrolments)).await;
    cleanup(&connection, &settings).await;
    let (ingest_rate, dispatch) = result?;
    let report = Report {
        events,
        publish_rate,
        ceiling_rate,
        ingest_rate,
        peak_rss_mib: peak_rss_mib(),
    };
    println!(
        "lifecycle ingest (end to end):  {:>9.0} events/s",
        report.ingest_rate
    );
    println!("ratio to ceiling:               {:>9.2}", report.ratio());
    if let Some((n, with_nodelay, without)) = dispatch.smtp {
        println!("dispatch over SMTP, nodelay:    {with_nodelay:>9.0} msg/s ({n} messages)");
        println!("dispatch over SMTP, no nodelay: {without:>9.0} msg/s (lettre's default socket)");
    }
    if let Some((n, rate)) = dispatch.http {
        println!(
            "dispatch over HTTP (webhook):   {rate:>9.0} msg/s ({n} messages to a local server)"
        );
    }
    println!(
        "peak resident memory:           {:>9.1} MiB (whole bench process)",
        report.peak_rss_mib
    );
    Ok(())
}

/// Dispatch figures.
#[derive(Default)]
struct DispatchRates {
    /// (messages, with nodelay, without) over SMTP.
    smtp: Option<(usize, f64, f64)>,
    /// (messages, rate) over HTTP.
    http: Option<(usize, f64)>,
}

/// The end-to-end phase, then the dispatch phases, which send the welcomes it planned.
async fn measure(
    settings: &Settings,
    bodies: &[String],
    smtp: Option<SmtpUrl>,
    http: bool,
    messages: usize,
) -> anyhow::Result<(f64, DispatchRates)> {
    let ingest_rate = end_to_end(settings, bodies).await?;
    let mut rates = DispatchRates::default();
    if let Some(smtp) = smtp {
        let mut settings = settings.clone();
        settings.email_providers = vec![EmailProviderKind::Smtp];
        settings.smtp_url = smtp;
        let with_nodelay = dispatch(&settings, messages).await?;
        settings.dispatch.smtp_nodelay = false;
        // Without nodelay each message takes tens of milliseconds: a tenth is enough.
        let without = dispatch(&settings, (messages / 10).max(1)).await?;
        rates.smtp = Some((messages, with_nodelay, without));
    }
    if http {
        let (url, server) = http_server().await?;
        let mut settings = settings.clone();
        settings.email_providers = vec![EmailProviderKind::Webhook];
        settings.webhook_url = Some(url);
        settings.webhook_secret = Some("bench".to_owned().into());
        let rate = dispatch(&settings, messages).await;
        server.abort();
        rates.http = Some((messages, rate?));
    }
    Ok((ingest_rate, rates))
}

/// A minimal HTTP/1.1 server answering `200 {}` to every request on kept-alive connections:
/// the local stand-in for an HTTP provider. Returns its URL.
async fn http_server() -> anyhow::Result<(String, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/messages", listener.local_addr()?);
    let server = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            stream.set_nodelay(true).ok();
            tokio::spawn(answer_http(stream));
        }
    });
    Ok((url, server))
}

async fn answer_http(stream: tokio::net::TcpStream) -> std::io::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let mut length = 0;
        loop {
            line.clear();
            if reader.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            if line.trim_end().is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).await?;
        reader
            .get_mut()
            .write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
            )
            .await?;
    }
}

/// Runs dispatch alone until `messages` more messages were sent: messages/s.
async fn dispatch(settings: &Settings, messages: usize) -> anyhow::Result<f64> {
    let app = App::open(settings.clone()).await?;
    let roles = Roles {
        ingest: false,
        dispatch: true,
        schedule: false,
        http: false,
    };
    let elapsed = time_worker(&app, roles, |m| {
        let failed = Metrics::get(&m.messages_failed) + Metrics::get(&m.messages_retried);
        if failed > 0 {
            return Err(format!(
                "{failed} messages failed or retried (is the server up?)"
            ));
        }
        Ok(Metrics::get(&m.messages_sent) as usize >= messages)
    })
    .await
    .context("dispatch")?;
    app.pool.close().await;
    Ok(messages as f64 / elapsed.as_secs_f64())
}

/// Starts `roles` and polls the counters until `done` says the work is finished: the time it
/// took. `done` returns an error to give up at once; after 300 s the run gives up anyway.
async fn time_worker(
    app: &App,
    roles: Roles,
    mut done: impl FnMut(&Metrics) -> Result<bool, String>,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let worker = Worker::start(app.clone(), roles).await?;
    let deadline = started + Duration::from_secs(300);
    loop {
        let verdict = match done(&app.metrics) {
            Ok(false) if Instant::now() > deadline => Err("not finished in 300 s".to_owned()),
            verdict => verdict,
        };
        match verdict {
            Ok(true) => break,
            Ok(false) => tokio::time::sleep(Duration::from_millis(5)).await,
            Err(reason) => {
                worker.stop().await.ok();
                bail!("{reason}");
            }
        }
    }
    let elapsed = started.elapsed();
    worker.stop().await?;
    Ok(elapsed)
}

/// A mixed workload of about `events` events for `events / 4` members, in phases so that a
/// member's events are far apart in the queue (as a shop's would be): enrolments, orders in
/// four currencies, refunds of half of them, adjustments and cart updates, redemptions.
fn mixed(tag: &str, events: usize) -> Vec<String> {
    let members = (events / 4).max(1);
    let body = |i: usize, kind: &str, data: serde_json::Value| {
        serde_json::json!({"specversion": "1.0", "id": format!("{tag}-{kind}-{i}"), "source": "bench", "type": kind,
            "time": "2026-11-22T10:00:00Z", "data": data})
        .to_string()
    };
    let currencies = [
        ("USD", 4_599),
        ("EUR", 12_000),
        ("KRW", 54_000),
        ("TRY", 123_456),
    ];
    let mut out: Vec<String> = (0..members).map(|i| enrolment(tag, i)).collect();
    for i in 0..members {
        let (currency, total) = currencies[i % currencies.len()];
        out.push(body(i, "order.placed", serde_json::json!({"order_id": format!("{tag}-o{i}"), "member_id": format!("{tag}-m{i}"),
            "total": total, "currency": currency, "items": [{"sku": "SKU-1", "name": "Tea", "quantity": 1, "unit_price": total}]})));
    }
    for i in (0..members).step_by(2) {
        let (currency, total) = currencies[i % currencies.len()];
        out.push(body(i, "order.refunded", serde_json::json!({"order_id": format!("{tag}-o{i}"), "member_id": format!("{tag}-m{i}"),
            "amount": total / 2, "currency": currency})));
    }
    for i in 0..members {
        out.push(if i % 2 == 0 {
            body(i, "points.adjusted", serde_json::json!({"member_id": format!("{tag}-m{i}"), "points": 25, "reason": "review"}))
        } else {
            body(i, "cart.updated", serde_json::json!({"cart_id": format!("{tag}-c{i}"), "member_id": format!("{tag}-m{i}"),
                "items": [], "total": 1_000, "currency": "USD", "checkout_url": format!("https://shop.example/cart/{i}")}))
        });
    }
    for i in (1..members).step_by(2) {
        out.push(body(
            i,
            "points.redeemed",
            serde_json::json!({"member_id": format!("{tag}-m{i}"), "points": 10}),
        ));
    }
    out
}

/// A `member.enrolled` event with email consent, as a shop would send it.
fn enrolment(tag: &str, i: usize) -> String {
    serde_json::json!({
        "specversion": "1.0", "id": format!("{tag}-{i}"), "source": "bench", "type": "member.enrolled",
        "time": "2026-11-22T10:00:00Z",
        "data": {
            "member_id": format!("{tag}-m{i}"), "email": format!("member{i}@example.com"),
            "first_name": "Bench", "locale": (["en", "ko", "tr"][i % 3]), "timezone": "Europe/Istanbul",
            "consent": {"email": true, "sms": false}
        }
    })
    .to_string()
}

/// Publishes to a bare quorum queue, then consumes and acks every message as ingest batches
/// them: (publish, consume) rates.
async fn ceiling(
    connection: &Connection,
    settings: &Settings,
    tag: &str,
    bodies: &[String],
) -> anyhow::Result<(f64, f64)> {
    let queue = format!("lifecycle.{tag}.ceiling");
    let channel = connection.create_channel().await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await?;

    let publisher = Publisher::open(connection).await?;
    let started = Instant::now();
    let mut pending = Vec::new();
    for body in bodies {
        pending.push(
            publisher
                .publish_raw(
                    "",
                    &queue,
                    body.as_bytes(),
                    &BasicProperties::default(),
                    FieldTable::default(),
                )
                .await,
        );
        if pending.len() >= 2_000 {
            for confirm in pending.drain(..) {
                Publisher::confirmed(confirm).await?;
            }
        }
    }
    for confirm in pending.drain(..) {
        Publisher::confirmed(confirm).await?;
    }
    let publish_rate = bodies.len() as f64 / started.elapsed().as_secs_f64();

    let total = bodies.len();
    let acked = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for n in 0..settings.ingest.consumers {
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(settings.ingest.prefetch, BasicQosOptions::default())
            .await?;
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                format!("ceiling-{n}").as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let acked = acked.clone();
        let batch_size = settings.ingest.batch_size;
        tasks.push(tokio::spawn(async move {
            // The same batching as ingest: take what has arrived (up to a batch), ack it with
            // one `multiple` ack. Nothing else is done with the messages.
            while acked.load(Ordering::Relaxed) < total {
                let first =
                    match tokio::time::timeout(Duration::from_millis(200), consumer.next()).await {
                        Ok(Some(delivery)) => delivery?,
                        Ok(None) => break,
                        Err(_) => continue,
                    };
                let mut last = first;
                let mut n = 1;
                while n < batch_size {
                    match consumer.next().now_or_never() {
                        Some(Some(delivery)) => {
                            last = delivery?;
                            n += 1;
                        }
                        _ => break,
                    }
                }
                last.ack(BasicAckOptions { multiple: true }).await?;
                acked.fetch_add(n, Ordering::Relaxed);
            }
            channel.close(200, "done".into()).await.ok();
            Ok::<(), anyhow::Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let ceiling_rate = total as f64 / started.elapsed().as_secs_f64();
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    Ok((publish_rate, ceiling_rate))
}

/// Publishes the events to the exchange, then runs ingest until all are applied: events/s.
async fn end_to_end(settings: &Settings, bodies: &[String]) -> anyhow::Result<f64> {
    let app = App::open(settings.clone()).await?;
    crate::demo::publish(settings, bodies).await?;
    let total = bodies.len() as u64;
    let roles = Roles {
        ingest: true,
        dispatch: false,
        schedule: false,
        http: false,
    };
    let elapsed = time_worker(
        &app,
        roles,
        |m| Ok(Metrics::get(&m.events_applied) >= total),
    )
    .await
    .with_context(|| {
        format!(
            "ingest applied {} of {total} events",
            Metrics::get(&app.metrics.events_applied)
        )
    })?;
    // Every event applied once, none refused, and a welcome planned per enrolment.
    let (inbox, welcomes): (i64, i64) = sqlx::query_as(
        "select (select count(*) from inbox), (select count(*) from messages where trigger = 'welcome')",
    )
    .fetch_one(&app.pool)
    .await?;
    let enrolments = bodies
        .iter()
        .filter(|b| b.contains("\"member.enrolled\""))
        .count() as i64;
    let dead = Metrics::get(&app.metrics.events_dead_lettered);
    if inbox as u64 != total || welcomes != enrolments || dead > 0 {
        bail!(
            "after ingest: {inbox} of {total} events in the inbox, {welcomes} welcomes for {enrolments} enrolments, {dead} dead-lettered"
        );
    }
    app.pool.close().await;
    Ok(total as f64 / elapsed.as_secs_f64())
}

async fn cleanup(connection: &Connection, settings: &Settings) {
    let s = &settings.ingest;
    if let Ok(channel) = connection.create_channel().await {
        for queue in [&s.queue, &s.dead_letter_queue, &s.retry_queue] {
            channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await
                .ok();
        }
        for exchange in [&settings.exchange, &s.dead_letter_exchange] {
            channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await
                .ok();
        }
    }
    if let Err(error) = crate::db::drop_database(&settings.database_url)
        .await
        .context("dropping the bench database")
    {
        tracing::warn!(error = format!("{error:#}"), "Cleanup incomplete.");
    }
}

/// Peak resident set size of this process (VmHWM), in MiB.
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}
