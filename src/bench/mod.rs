//! `lifecycle bench`: lifecycle's speed against what the machine allows, measured in one run.
//!
//! Phases, each in its own exchange, queues and database (`<database>_bench`, removed after):
//!
//! 1. **ceiling**: the N events published with confirms to a bare quorum queue, then consumed
//!    and acked by bare lapin consumers with ingest's prefetch, consumer count and ack batching,
//!    doing nothing else;
//! 2. **ingest**: the same N events (a shop's mix, `workload.rs`) published to the exchange, then
//!    consumed by the real ingest (parse, ledger, triggers, plan, commit, ack). Both phases start
//!    with the messages queued, so both measure consumption; the ratio is ingest / ceiling;
//! 3. **dispatch**: messages ingest planned, sent over HTTP (the `webhook` provider) to a local
//!    server in this process, then over SMTP to smtp-sink;
//! 4. **latency**: the mix published at a steady half of the ingest rate while ingest and
//!    dispatch run; each event carries its publishing instant as its `time`, the HTTP server
//!    notes when each message reaches it, and the latency is the difference;
//! 5. **scale-out**: a smaller N ingested by one worker process, then by two, against one
//!    PostgreSQL and one RabbitMQ.

mod fakes;
mod workload;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeleteOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};
use serde::Serialize;

use crate::amqp;
use crate::app::{App, Roles};
use crate::config::{EmailProviderKind, Settings, SmtpUrl};
use crate::metrics::Metrics;
use crate::publish::Publisher;
use crate::worker::Worker;
use fakes::{HttpProvider, SmtpSink};
use workload::{Time, Workload};

/// What to run.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    /// Events of the ceiling and ingest phases.
    pub events: usize,
    /// Members of the shop (at most a tenth of the events).
    pub members: usize,
    /// Messages in each dispatch phase.
    pub messages: usize,
    /// An SMTP server to send to; without it the bench starts smtp-sink if it is installed.
    pub smtp: Option<SmtpUrl>,
    /// How long events are published at half the ingest rate.
    pub latency_seconds: u64,
    /// Events of each scale-out run; 0 skips the phase.
    pub scale_out_events: usize,
    /// Print the report as JSON.
    pub json: bool,
}

/// How far a member's other events come after its enrolment (see `workload.rs`): more than
/// two consumers' prefetch, so no event of a queued run waits for one another consumer holds.
const LAG: usize = 10_000;

/// The roles each phase runs.
const INGEST: Roles = Roles {
    dispatch: false,
    ..INGEST_AND_DISPATCH
};
const DISPATCH: Roles = Roles {
    ingest: false,
    ..INGEST_AND_DISPATCH
};
const INGEST_AND_DISPATCH: Roles = Roles {
    ingest: true,
    dispatch: true,
    schedule: false,
    http: false,
};

/// The figures of one run, as `--json` prints them.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    /// Where it ran.
    pub machine: Machine,
    /// Events of the ceiling and ingest phases.
    pub events: usize,
    /// Members they are for.
    pub members: usize,
    /// Publishing with confirms, messages/s.
    pub publish_per_s: f64,
    /// Bare consume + ack, messages/s.
    pub ceiling_per_s: f64,
    /// Ingest of the mix, events/s committed and acked.
    pub ingest_per_s: f64,
    /// Ingest as a share of the ceiling.
    pub ingest_ratio: f64,
    /// Messages ingest planned (welcomes, redemption-ready, tier-ups, abandoned carts).
    pub planned_messages: i64,
    /// Dispatch over HTTP.
    pub dispatch_http: Rate,
    /// Dispatch over SMTP, when a server was there.
    pub dispatch_smtp: Option<Rate>,
    /// Ingest and dispatch together: the maximum rate of the whole pipeline.
    pub end_to_end: EndToEnd,
    /// Event-to-provider latency at half the end-to-end rate.
    pub latency: Latency,
    /// One worker process against two.
    pub scale_out: Option<ScaleOut>,
    /// Peak resident memory of the bench process, which runs the worker of phases 2 to 4.
    pub peak_rss_mib: f64,
}

/// The machine a run was on.
#[derive(Debug, Serialize)]
pub(crate) struct Machine {
    /// CPU model.
    pub cpu: String,
    /// Cores available.
    pub cores: usize,
    /// Memory, GiB.
    pub memory_gib: f64,
}

/// Messages sent in a phase and how fast.
#[derive(Debug, Serialize)]
pub(crate) struct Rate {
    /// Messages sent.
    pub messages: usize,
    /// Messages/s.
    pub per_s: f64,
}

/// Events queued, then ingested while their messages are dispatched.
#[derive(Debug, Serialize)]
pub(crate) struct EndToEnd {
    /// Events.
    pub events: usize,
    /// Messages sent.
    pub messages: u64,
    /// Events/s, from the start until every event is applied and every message due is sent.
    pub events_per_s: f64,
}

/// Event-to-provider latency.
#[derive(Debug, Serialize)]
pub(crate) struct Latency {
    /// The rate events were published at, events/s.
    pub events_per_s: f64,
    /// Events published.
    pub events: usize,
    /// Messages whose latency was measured.
    pub messages: usize,
    /// Percentiles, milliseconds.
    pub p50_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// The slowest.
    pub max_ms: f64,
    /// The first part of the way: from the event to the start of the ingest transaction that
    /// planned its message (waiting in the queue and for the batch before), median.
    pub to_ingest_p50_ms: f64,
    /// The same, 99th percentile.
    pub to_ingest_p99_ms: f64,
}

/// Ingest by one worker process and by two.
#[derive(Debug, Serialize)]
pub(crate) struct ScaleOut {
    /// Events of each run.
    pub events: usize,
    /// One process, events/s.
    pub one_per_s: f64,
    /// Two processes, events/s.
    pub two_per_s: f64,
}

/// Runs the benchmark and prints its report.
pub(crate) async fn run(mut settings: Settings, options: Options) -> anyhow::Result<()> {
    if options.events == 0 {
        bail!("--events must be at least 1");
    }
    let tag = format!("bench{}", std::process::id());
    settings.exchange = format!("lifecycle.{tag}.events");
    settings.notifications_exchange = format!("lifecycle.{tag}.notifications");
    settings.ingest.queue = format!("lifecycle.{tag}.events");
    settings.ingest.dead_letter_exchange = format!("lifecycle.{tag}.dlx");
    settings.ingest.dead_letter_queue = format!("lifecycle.{tag}.dead");
    settings.ingest.retry_queue = format!("lifecycle.{tag}.retry");
    let database = format!("{}_bench", settings.database_url.database());
    settings.database_url = settings.database_url.with_database(&database);
    crate::db::drop_database(&settings.database_url).await?;
    let members = options.members.min(options.events / 10).max(1);
    let say = |line: String| {
        if !options.json {
            println!("{line}");
        }
    };
    say(format!(
        "lifecycle bench: {} events for {members} members (orders 60%, cart updates 20%, enrolments 10%, refunds 5%, adjustments, redemptions and feedback 5%); {} consumers, prefetch {}, batches of up to {}",
        options.events,
        settings.ingest.consumers,
        settings.ingest.prefetch,
        settings.ingest.batch_size
    ));
    let workload = || {
        Workload::new(
            &tag,
            members,
            LAG,
            Time::Fixed(Utc::now() - chrono::Duration::hours(1)),
        )
        .take(options.events)
    };
    let connection = amqp::connect(&settings.amqp_url, "lifecycle-bench").await?;
    let result = async {
        let (publish_per_s, ceiling_per_s) =
            ceiling(&connection, &settings, &tag, workload()).await?;
        say(format!("broker publish (confirms):        {publish_per_s:>9.0} msg/s"));
        say(format!("broker ceiling (consume + ack):   {ceiling_per_s:>9.0} msg/s"));
        let (ingest_per_s, planned_messages, due) =
            ingest_phase(&settings, workload(), options.events).await?;
        // Half of what is due for each of the two dispatch phases.
        let messages = options.messages.min(due as usize / 2).max(1);
        say(format!("lifecycle ingest (the mix):       {ingest_per_s:>9.0} events/s, {:.2} of the ceiling; {planned_messages} messages planned", ingest_per_s / ceiling_per_s));
        let http = HttpProvider::start().await?;
        let dispatch_http = dispatch(&http.settings(&settings), messages).await?;
        say(format!("dispatch over HTTP (webhook):     {:>9.0} msg/s ({} messages to a local server)", dispatch_http.per_s, dispatch_http.messages));
        let sink = match &options.smtp {
            Some(url) => Some((url.clone(), None)),
            None => SmtpSink::start()?.map(|sink| (sink.url.clone(), Some(sink))),
        };
        let dispatch_smtp = match &sink {
            Some((url, _)) => {
                let mut smtp = settings.clone();
                smtp.email_providers = vec![EmailProviderKind::Smtp];
                smtp.smtp_url = url.clone();
                let rate = dispatch(&smtp, messages).await?;
                say(format!("dispatch over SMTP (smtp-sink):   {:>9.0} msg/s ({} messages)", rate.per_s, rate.messages));
                Some(rate)
            }
            None => {
                say("dispatch over SMTP: skipped (no --smtp, and smtp-sink is not installed)".into());
                None
            }
        };
        drop(sink);
        let pipeline = end_to_end(&http.settings(&settings), &tag, members, (options.events / 5).clamp(1, 100_000)).await?;
        say(format!("end to end (ingest and dispatch): {:>9.0} events/s ({} events, {} messages sent)", pipeline.events_per_s, pipeline.events, pipeline.messages));
        let latency = latency(&settings, &http, &tag, members, pipeline.events_per_s / 2.0, options.latency_seconds).await?;
        say(format!(
            "latency at {:.0} events/s (half):   p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} messages)",
            latency.events_per_s, latency.p50_ms, latency.p95_ms, latency.p99_ms, latency.max_ms, latency.messages
        ));
        say(format!(
            "  of which until ingest took the event: p50 {:.1} ms, p99 {:.1} ms",
            latency.to_ingest_p50_ms, latency.to_ingest_p99_ms
        ));
        drop(http);
        let scale_out = if options.scale_out_events > 0 {
            let figures = scale_out(&settings, &tag, options.scale_out_events).await?;
            say(format!(
                "scale-out ({} events):            one process {:>7.0} events/s, two {:>7.0} events/s ({:.2}x)",
                figures.events, figures.one_per_s, figures.two_per_s, figures.two_per_s / figures.one_per_s
            ));
            Some(figures)
        } else {
            None
        };
        Ok::<_, anyhow::Error>(Report {
            machine: Machine::this(),
            events: options.events,
            members,
            publish_per_s,
            ceiling_per_s,
            ingest_per_s,
            ingest_ratio: ingest_per_s / ceiling_per_s,
            planned_messages,
            dispatch_http,
            dispatch_smtp,
            end_to_end: pipeline,
            latency,
            scale_out,
            peak_rss_mib: peak_rss_mib(),
        })
    }
    .await;
    cleanup(&connection, &settings).await;
    let report = result?;
    if options.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "peak resident memory:             {:>9.1} MiB (the bench process, with the worker of the ingest, dispatch and latency phases)",
            report.peak_rss_mib
        );
        println!(
            "machine: {}, {} cores, {:.0} GiB",
            report.machine.cpu, report.machine.cores, report.machine.memory_gib
        );
    }
    Ok(())
}

impl Machine {
    fn this() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        let memory_gib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
                line.split_whitespace().nth(1)?.parse::<f64>().ok()
            })
            .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
        Machine {
            cpu,
            cores: std::thread::available_parallelism().map_or(1, usize::from),
            memory_gib,
        }
    }
}

/// Runs dispatch alone until `messages` more messages were sent (or every one due now, if
/// fewer are).
async fn dispatch(settings: &Settings, messages: usize) -> anyhow::Result<Rate> {
    let app = App::open(settings.clone()).await?;
    let due = sqlx::query_scalar!(
        r#"select count(*) as "count!" from messages where status = 'pending' and due_at <= now()"#
    )
    .fetch_one(&app.pool)
    .await?;
    let messages = messages.min(due as usize);
    let roles = DISPATCH;
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
    Ok(Rate {
        messages,
        per_s: messages as f64 / elapsed.as_secs_f64(),
    })
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
    let notifier = Notifier::start(app);
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
                notifier.stop().await;
                worker.stop().await.ok();
                bail!("{reason}");
            }
        }
    }
    let elapsed = started.elapsed();
    notifier.stop().await;
    worker.stop().await?;
    Ok(elapsed)
}

/// The notifier, as the replica with the scheduler role runs it beside ingest and dispatch
/// (publishing every notification they record): its cost is in the figures.
struct Notifier {
    trigger: crate::shutdown::ShutdownTrigger,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Notifier {
    fn start(app: &App) -> Notifier {
        let (trigger, shutdown) = crate::shutdown::channel();
        let task = tokio::spawn(crate::notifier::run(app.clone(), shutdown));
        Notifier { trigger, task }
    }

    async fn stop(self) {
        self.trigger.trigger();
        self.task.await.ok();
    }
}

/// Publishes to a bare quorum queue, then consumes and acks every message as ingest batches
/// them: (publish, consume) rates.
async fn ceiling(
    connection: &Connection,
    settings: &Settings,
    tag: &str,
    events: impl Iterator<Item = (&'static str, String)>,
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
    let mut total = 0;
    for (_, body) in events {
        total += 1;
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
    let publish_rate = total as f64 / started.elapsed().as_secs_f64();

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

/// Publishes `events` to the exchange, then runs ingest until all are applied: (events/s,
/// messages planned, of which due now).
async fn ingest_phase(
    settings: &Settings,
    events: impl Iterator<Item = (&'static str, String)>,
    total: usize,
) -> anyhow::Result<(f64, i64, i64)> {
    let app = App::open(settings.clone()).await?;
    publish(settings, events).await?;
    let roles = INGEST;
    let elapsed = time_worker(&app, roles, |m| {
        let dead = Metrics::get(&m.events_dead_lettered);
        if dead > 0 {
            return Err(format!("{dead} events were dead-lettered"));
        }
        Ok(Metrics::get(&m.events_applied) >= total as u64)
    })
    .await
    .with_context(|| {
        format!(
            "ingest applied {} of {total} events",
            Metrics::get(&app.metrics.events_applied)
        )
    })?;
    // Every event applied once.
    let row = sqlx::query!(
        r#"select (select count(*) from inbox) as "inbox!",
                  (select count(*) from messages) as "planned!",
                  (select count(*) from messages where due_at <= now()) as "due!""#
    )
    .fetch_one(&app.pool)
    .await?;
    let (inbox, planned, due) = (row.inbox, row.planned, row.due);
    if inbox as usize != total {
        bail!("after ingest: {inbox} of {total} events in the inbox");
    }
    // A shop's tables have statistics: autovacuum analyzes a table within a minute of its
    // growing by a tenth. This database is a minute old, so the bench does what autovacuum
    // would have; without it the planner of the phases after this one guesses from empty
    // tables (see `db::begin_keyed` for what ingest does about it itself).
    sqlx::query!("analyze").execute(&app.pool).await?;
    app.pool.close().await;
    Ok((total as f64 / elapsed.as_secs_f64(), planned, due))
}

/// Publishes events to the exchange as a platform would, waiting for confirms in windows.
async fn publish(
    settings: &Settings,
    events: impl Iterator<Item = (&'static str, String)>,
) -> anyhow::Result<()> {
    let connection = amqp::connect(&settings.amqp_url, "lifecycle-bench-publish").await?;
    amqp::declare_topology(&connection, settings).await?;
    let publisher = Publisher::open(&connection).await?;
    publisher
        .publish_events(&settings.exchange, events.map(|(_, body)| body))
        .await?;
    publisher.close().await;
    connection.close(200, "bye".into()).await.ok();
    Ok(())
}

/// `Publisher::publish_event` with the routing key already known: the steady stream is timed,
/// so it does not parse each body again to find its type.
async fn publish_one(
    publisher: &Publisher,
    exchange: &str,
    kind: &str,
    body: &str,
) -> anyhow::Result<lapin::PublisherConfirm> {
    let properties =
        BasicProperties::default().with_content_type("application/cloudevents+json".into());
    publisher
        .publish_raw(
            exchange,
            kind,
            body.as_bytes(),
            &properties,
            FieldTable::default(),
        )
        .await
}

/// Cancels the messages earlier phases left waiting, so that a phase times its own traffic.
async fn cancel_waiting(app: &App) -> anyhow::Result<()> {
    sqlx::query!("update messages set status = 'cancelled' where status = 'pending'")
        .execute(&app.pool)
        .await?;
    Ok(())
}

/// Messages due now and not yet settled.
async fn still_due(pool: &sqlx::PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(
        r#"select count(*) as "count!" from messages
           where status in ('pending', 'sending') and due_at <= now()"#
    )
    .fetch_one(pool)
    .await
}

/// `events` of the mix queued, then ingested with dispatch running: the pipeline's maximum.
/// Messages still waiting from earlier phases are cancelled first.
async fn end_to_end(
    settings: &Settings,
    tag: &str,
    members: usize,
    events: usize,
) -> anyhow::Result<EndToEnd> {
    let app = App::open(settings.clone()).await?;
    cancel_waiting(&app).await?;
    let workload = Workload::new(
        &format!("{tag}-max"),
        members,
        LAG,
        Time::Fixed(Utc::now() - chrono::Duration::hours(1)),
    );
    publish(settings, workload.take(events)).await?;
    let roles = INGEST_AND_DISPATCH;
    let pool = app.pool.clone();
    let waiting = Arc::new(std::sync::atomic::AtomicI64::new(i64::MAX));
    // The outbox is read in a task of its own, the counters on every poll.
    let reader = {
        let waiting = waiting.clone();
        tokio::spawn(async move {
            loop {
                if let Ok(n) = still_due(&pool).await {
                    waiting.store(n, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let elapsed =
        time_worker(&app, roles, |m| {
            Ok(Metrics::get(&m.events_applied) >= events as u64
                && waiting.load(Ordering::Relaxed) == 0)
        })
        .await;
    reader.abort();
    let elapsed = elapsed.context("end to end")?;
    let messages = Metrics::get(&app.metrics.messages_sent);
    app.pool.close().await;
    Ok(EndToEnd {
        events,
        messages,
        events_per_s: events as f64 / elapsed.as_secs_f64(),
    })
}

/// Publishes the mix at `rate` events/s for `seconds` while ingest and dispatch run, each event
/// stamped with the moment it was made, and measures each message from its event's stamp to
/// its arrival at the HTTP provider. Messages still waiting from earlier phases are cancelled
/// first, so that only this phase's traffic is timed.
///
/// The stream's members are new, so that enrolments (and their welcomes) are part of it, and a
/// member's other events come a second of traffic after its enrolment: the stream's first
/// second is enrolments alone, a burst of welcomes at eight times the steady rate of messages.
/// That second is the warm-up: published at the same rate, left to settle, and not timed.
async fn latency(
    settings: &Settings,
    http: &HttpProvider,
    tag: &str,
    members: usize,
    rate: f64,
    seconds: u64,
) -> anyhow::Result<Latency> {
    let settings = http.settings(settings);
    let app = App::open(settings.clone()).await?;
    cancel_waiting(&app).await?;
    let worker = Worker::start(app.clone(), INGEST_AND_DISPATCH).await?;
    let notifier = Notifier::start(&app);
    let measured = async {
        let connection = amqp::connect(&settings.amqp_url, "lifecycle-bench-steady").await?;
        let publisher = Publisher::open(&connection).await?;
        let lag = (rate as usize).max(1);
        let mut events = Workload::new(&format!("{tag}-steady"), members, lag, Time::Live);
        let exchange = settings.exchange.as_str();
        steady(&publisher, exchange, &mut events, rate, lag).await?;
        settled(&app, lag).await?;
        http.record();
        let started_at = Utc::now();
        let count = (rate * seconds as f64) as usize;
        steady(&publisher, exchange, &mut events, rate, count).await?;
        settled(&app, lag + count).await?;
        publisher.close().await;
        connection.close(200, "bye".into()).await.ok();
        Ok::<_, anyhow::Error>((count, started_at))
    }
    .await;
    let arrivals = http.recorded();
    notifier.stop().await;
    worker.stop().await?;
    let (published, started_at) = measured?;
    let ids: Vec<i64> = arrivals.keys().copied().collect();
    let stamps: Vec<(i64, DateTime<Utc>, DateTime<Utc>)> = sqlx::query!(
        r#"select id, event_at as "event_at!", created_at from messages
           where id = any($1) and event_at >= $2"#,
        &ids,
        started_at
    )
    .fetch_all(&app.pool)
    .await?
    .into_iter()
    .map(|r| (r.id, r.event_at, r.created_at))
    .collect();
    app.pool.close().await;
    if stamps.is_empty() {
        bail!("no message of the latency phase reached the provider");
    }
    let millis = |from: DateTime<Utc>, to: DateTime<Utc>| {
        (to - from).num_microseconds().unwrap_or(i64::MAX) as f64 / 1000.0
    };
    // The whole way, and its first part: until the ingest transaction that planned the message
    // began (`created_at` is that transaction's `now()`).
    let total = Percentiles::of(
        stamps
            .iter()
            .map(|(id, event_at, _)| millis(*event_at, arrivals[id].into())),
    );
    let planned = Percentiles::of(
        stamps
            .iter()
            .map(|(_, event_at, created_at)| millis(*event_at, *created_at)),
    );
    Ok(Latency {
        events_per_s: rate,
        events: published,
        messages: stamps.len(),
        p50_ms: total.at(0.50),
        p95_ms: total.at(0.95),
        p99_ms: total.at(0.99),
        max_ms: total.at(1.0),
        to_ingest_p50_ms: planned.at(0.50),
        to_ingest_p99_ms: planned.at(0.99),
    })
}

/// Sorted samples.
struct Percentiles(Vec<f64>);

impl Percentiles {
    fn of(samples: impl Iterator<Item = f64>) -> Percentiles {
        let mut samples: Vec<f64> = samples.collect();
        samples.sort_by(f64::total_cmp);
        Percentiles(samples)
    }

    /// The `q` quantile (nearest rank); `q` = 1 is the largest.
    fn at(&self, q: f64) -> f64 {
        let n = self.0.len();
        self.0[((n as f64 * q).ceil() as usize).clamp(1, n) - 1]
    }
}

/// Publishes the next `count` events of `events` at `rate` events/s, in ticks of 10 ms, and
/// waits for the broker's confirms.
async fn steady(
    publisher: &Publisher,
    exchange: &str,
    events: &mut Workload,
    rate: f64,
    count: usize,
) -> anyhow::Result<()> {
    // Confirms are awaited as they come, so that they do not pile up in memory.
    let (confirms, mut confirmed) = tokio::sync::mpsc::unbounded_channel();
    let waiter = tokio::spawn(async move {
        while let Some(confirm) = confirmed.recv().await {
            Publisher::confirmed(confirm).await?;
        }
        Ok::<(), anyhow::Error>(())
    });
    let started = Instant::now();
    let mut published = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while published < count {
        tick.tick().await;
        let due = ((started.elapsed().as_secs_f64() * rate) as usize).min(count);
        while published < due {
            let (kind, body) = events.next().expect("endless");
            confirms
                .send(publish_one(publisher, exchange, kind, &body).await)
                .ok();
            published += 1;
        }
    }
    drop(confirms);
    waiter.await?
}

/// Waits until `applied` events are applied and no message is due: at most two minutes.
async fn settled(app: &App, applied: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let waiting = still_due(&app.pool).await?;
        let done = Metrics::get(&app.metrics.events_applied);
        if done >= applied as u64 && waiting == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("after 120 s: {waiting} messages still due, {done} of {applied} events applied");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `events` of the mix ingested by one worker process, then by two, each on a fresh database
/// with the events queued before the processes start: events/s of each.
async fn scale_out(settings: &Settings, tag: &str, events: usize) -> anyhow::Result<ScaleOut> {
    let mut rates = Vec::new();
    for processes in [1, 2] {
        crate::db::drop_database(&settings.database_url).await?;
        let pool = crate::db::migrate(&settings.database_url).await?;
        let workload = Workload::new(
            &format!("{tag}-x{processes}"),
            (events / 10).max(1),
            LAG,
            Time::Fixed(Utc::now() - chrono::Duration::hours(1)),
        );
        publish(settings, workload.take(events)).await?;
        let mut children = Children::default();
        for _ in 0..processes {
            children.0.push(spawn_worker(settings)?);
        }
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut first = None;
        loop {
            let applied = sqlx::query_scalar!(r#"select count(*) as "count!" from inbox"#)
                .fetch_one(&pool)
                .await?;
            if applied > 0 && first.is_none() {
                first = Some((Instant::now(), applied));
            }
            if applied as usize >= events {
                let (at, before) = first.expect("set above");
                rates.push((events as i64 - before) as f64 / at.elapsed().as_secs_f64().max(1e-3));
                break;
            }
            for child in &mut children.0 {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "a worker process exited ({status}) with {applied} of {events} events applied"
                    );
                }
            }
            if Instant::now() > deadline {
                bail!("{processes} worker processes applied {applied} of {events} events in 600 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        pool.close().await;
    }
    Ok(ScaleOut {
        events,
        one_per_s: rates[0],
        two_per_s: rates[1],
    })
}

/// Worker processes, killed when dropped.
#[derive(Default)]
struct Children(Vec<std::process::Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            child.kill().ok();
            child.wait().ok();
        }
    }
}

/// `lifecycle serve` with ingest alone, on the bench's exchange, queues and database.
fn spawn_worker(settings: &Settings) -> anyhow::Result<std::process::Child> {
    let s = &settings.ingest;
    std::process::Command::new(std::env::current_exe()?)
        .args(["serve", "--no-dispatch", "--no-schedule", "--no-http"])
        .env("LIFECYCLE_DATABASE_URL", settings.database_url.expose())
        .env("LIFECYCLE_AMQP_URL", settings.amqp_url.expose())
        .env("LIFECYCLE_EXCHANGE", &settings.exchange)
        .env("LIFECYCLE_INGEST__QUEUE", &s.queue)
        .env(
            "LIFECYCLE_INGEST__DEAD_LETTER_EXCHANGE",
            &s.dead_letter_exchange,
        )
        .env("LIFECYCLE_INGEST__DEAD_LETTER_QUEUE", &s.dead_letter_queue)
        .env("LIFECYCLE_INGEST__RETRY_QUEUE", &s.retry_queue)
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("starting a worker process")
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
        for exchange in [
            &settings.exchange,
            &s.dead_letter_exchange,
            &settings.notifications_exchange,
        ] {
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
