//! The broker's plumbing shared by every part that talks to RabbitMQ: connecting, the
//! topology of DESIGN.md, the headers lifecycle sets, and closing without waiting forever.

use anyhow::Context;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use tracing::warn;

use crate::config::{AmqpUrl, Settings};

/// Header that carries a dead letter's reason.
pub(crate) const ERROR_HEADER: &str = "x-lifecycle-error";
/// Header that counts how often an early event went through the retry queue.
pub(crate) const RETRIES_HEADER: &str = "x-lifecycle-retries";
/// Routing-key patterns that bind the input queue to the exchange.
const BINDINGS: [&str; 5] = ["member.#", "order.#", "cart.#", "points.#", "feedback.#"];

/// Connects to RabbitMQ.
///
/// Without lapin's automatic recovery, on purpose: ingest recovers by ending its session and
/// making a new connection (`Ingest::run`). With both, a connection whose session had ended
/// could recover by itself later, with consumers that no loop reads any more, and hold the
/// deliveries they were given unacked for as long as the process lives (the fault suite's
/// larger run found 621 events stuck so).
pub async fn connect(url: &AmqpUrl, name: &str) -> anyhow::Result<Connection> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(url.expose(), properties)
        .await
        .with_context(|| format!("connecting to RabbitMQ at {url}"))
}

/// Declares the exchanges and queues of DESIGN.md; safe to run any number of times.
///
/// Nothing a user may change later (the retry delay) is a queue argument: RabbitMQ refuses to
/// declare a queue again with other arguments. And should a queue exist with other arguments
/// all the same (declared by an older version, or by hand), it is used as it is, with a
/// warning, rather than fought on every reconnect.
pub async fn declare_topology(connection: &Connection, settings: &Settings) -> anyhow::Result<()> {
    let s = &settings.ingest;
    let channel = connection.create_channel().await?;
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let text = |s: &str| AMQPValue::LongString(s.into());
    let context = |what: &str, name: &str| format!("declaring {what} {name}");

    channel
        .exchange_declare(
            settings.exchange.as_str().into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await
        .with_context(|| context("exchange", &settings.exchange))?;
    if !settings.notifications_exchange.is_empty() {
        declare_notifications(&channel, &settings.notifications_exchange).await?;
    }
    channel
        .exchange_declare(
            s.dead_letter_exchange.as_str().into(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await
        .with_context(|| context("exchange", &s.dead_letter_exchange))?;
    let channel = declare_queue(connection, channel, &s.dead_letter_queue, &[]).await?;
    channel
        .queue_bind(
            s.dead_letter_queue.as_str().into(),
            s.dead_letter_exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    // Dead-lettering at least once needs the target to push back rather than drop.
    let safe_dead_lettering = [
        ("x-dead-letter-strategy", text("at-least-once")),
        ("x-overflow", text("reject-publish")),
    ];
    let mut input_args = vec![
        (
            "x-delivery-limit",
            AMQPValue::LongInt(s.delivery_limit as i32),
        ),
        ("x-dead-letter-exchange", text(&s.dead_letter_exchange)),
    ];
    input_args.extend(safe_dead_lettering.iter().cloned());
    let channel = declare_queue(connection, channel, &s.queue, &input_args).await?;
    for pattern in BINDINGS {
        channel
            .queue_bind(
                s.queue.as_str().into(),
                settings.exchange.as_str().into(),
                pattern.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    // Early events wait here, each for the delay its publish sets (a per-message expiration,
    // so the delay can change without declaring the queue anew), then expire back into the
    // input queue (through the default exchange, so other consumers of the platform's
    // exchange do not see them twice).
    let mut retry_args = vec![
        ("x-dead-letter-exchange", text("")),
        ("x-dead-letter-routing-key", text(&s.queue)),
    ];
    retry_args.extend(safe_dead_lettering.iter().cloned());
    let channel = declare_queue(connection, channel, &s.retry_queue, &retry_args).await?;
    channel.close(200, "declared".into()).await.ok();
    Ok(())
}

/// Declares the exchange lifecycle's notifications go to: a durable topic exchange, routing
/// key = type, where the platform binds its queues.
pub(crate) async fn declare_notifications(channel: &Channel, name: &str) -> anyhow::Result<()> {
    channel
        .exchange_declare(
            name.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("declaring exchange {name}"))
}

/// Declares a durable quorum queue with `args` on `channel`. When the broker refuses because
/// the queue exists with other arguments (PRECONDITION_FAILED, which closes the channel), the
/// queue is checked to exist on a new channel and used as it is. Returns the channel to go on
/// with.
async fn declare_queue(
    connection: &Connection,
    channel: Channel,
    name: &str,
    args: &[(&str, AMQPValue)],
) -> anyhow::Result<Channel> {
    let mut table = FieldTable::default();
    table.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    for (key, value) in args {
        table.insert((*key).into(), value.clone());
    }
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let refused = match channel.queue_declare(name.into(), durable, table).await {
        Ok(_) => return Ok(channel),
        Err(error) => error,
    };
    let precondition = matches!(
        &refused.kind(),
        lapin::ErrorKind::ProtocolError(e) if e.get_id() == 406
    );
    if !precondition {
        return Err(refused).with_context(|| format!("declaring queue {name}"));
    }
    let channel = connection.create_channel().await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    channel
        .queue_declare(name.into(), passive, FieldTable::default())
        .await
        .with_context(|| format!("declaring queue {name}: {refused}"))?;
    warn!(
        queue = name,
        "The queue exists with other arguments than this version declares; using it as it is."
    );
    Ok(channel)
}

/// Awaits a broker call made while closing, for at most 5 s: its answer does not matter, and
/// a broker that never gives one must not keep a worker from stopping.
pub(crate) async fn bounded<T>(call: impl std::future::Future<Output = T>) {
    tokio::time::timeout(std::time::Duration::from_secs(5), call)
        .await
        .ok();
}
