//! Publishing with publisher confirms: events (the `publish` command, demo, benchmark, tests),
//! dead letters and retries.

use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection, PublisherConfirm};

use crate::amqp;
use crate::config::Settings;

/// Confirms awaited at once when publishing many events.
const WINDOW: usize = 2_000;
/// How long the broker may take to confirm a message. A confirm can stay pending forever when
/// the connection is lost and recovered meanwhile; past this the caller treats the message as
/// not stored (ingest then gives up the channel, and its deliveries come back).
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// Declares the topology and publishes event bodies to the exchange; returns how many.
pub async fn events(settings: &Settings, bodies: &[String]) -> anyhow::Result<usize> {
    let connection = amqp::connect(&settings.amqp_url, "lifecycle-publish").await?;
    amqp::declare_topology(&connection, settings).await?;
    let publisher = Publisher::open(&connection).await?;
    let n = publisher.publish_events(&settings.exchange, bodies).await?;
    publisher.close().await;
    connection.close(200, "bye".into()).await.ok();
    Ok(n)
}

/// A channel in confirm mode.
pub(crate) struct Publisher {
    channel: Channel,
}

impl Publisher {
    /// Opens a confirming channel on `connection`.
    pub(crate) async fn open(connection: &Connection) -> anyhow::Result<Publisher> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Publisher { channel })
    }

    /// Closes the channel and waits (at most 5 s) for the broker to say so. Closing the
    /// connection first leaves lapin to close the channel from its drop, racing the
    /// connection's close, and that it logs as an ERROR ("invalid channel state: Closing").
    pub(crate) async fn close(self) {
        crate::amqp::bounded(self.channel.close(200, "bye".into())).await;
    }

    /// Publishes a body with the given properties and headers; the returned confirm resolves
    /// when the broker has the message safe.
    pub(crate) async fn publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: &BasicProperties,
        headers: FieldTable,
    ) -> anyhow::Result<PublisherConfirm> {
        let properties = properties
            .clone()
            .with_headers(headers)
            .with_delivery_mode(2);
        self.channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                properties,
            )
            .await
            .with_context(|| format!("publishing to exchange {exchange:?}"))
    }

    /// Publishes a body persistently, not `mandatory`: no queue bound (nobody subscribed yet)
    /// is not an error. The notifier publishes this way.
    pub(crate) async fn publish_to_any(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> anyhow::Result<PublisherConfirm> {
        self.channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                properties.with_delivery_mode(2),
            )
            .await
            .with_context(|| format!("publishing to exchange {exchange:?}"))
    }

    /// Waits for a confirm and checks that the broker took the message and routed it.
    pub(crate) async fn confirmed(confirm: anyhow::Result<PublisherConfirm>) -> anyhow::Result<()> {
        let confirmation = tokio::time::timeout(CONFIRM_TIMEOUT, confirm?)
            .await
            .map_err(|_| {
                anyhow!(
                    "the broker did not confirm within {} s",
                    CONFIRM_TIMEOUT.as_secs()
                )
            })??;
        match confirmation {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(returned)) => Err(anyhow!(
                "the broker could not route the message ({})",
                returned.reply_text
            )),
            Confirmation::Nack(_) => Err(anyhow!("the broker refused the message")),
        }
    }

    /// Publishes one event body as the platform would: routing key = its `type`.
    pub(crate) async fn publish_event(
        &self,
        exchange: &str,
        body: &[u8],
    ) -> anyhow::Result<PublisherConfirm> {
        let (routing_key, id) = routing_of(body);
        let mut properties =
            BasicProperties::default().with_content_type("application/cloudevents+json".into());
        if let Some(id) = id {
            properties = properties.with_message_id(id.as_str().into());
        }
        self.publish_raw(
            exchange,
            &routing_key,
            body,
            &properties,
            FieldTable::default(),
        )
        .await
    }

    /// Publishes many event bodies, waiting for confirms in windows; returns how many.
    pub(crate) async fn publish_events<B: AsRef<[u8]>>(
        &self,
        exchange: &str,
        bodies: impl IntoIterator<Item = B>,
    ) -> anyhow::Result<usize> {
        let mut pending = Vec::with_capacity(WINDOW);
        let mut count = 0;
        for body in bodies {
            pending.push(self.publish_event(exchange, body.as_ref()).await?);
            count += 1;
            if pending.len() == WINDOW {
                confirm_all(&mut pending).await?;
            }
        }
        confirm_all(&mut pending).await?;
        Ok(count)
    }
}

async fn confirm_all(pending: &mut Vec<PublisherConfirm>) -> anyhow::Result<()> {
    for confirm in pending.drain(..) {
        Publisher::confirmed(Ok(confirm)).await?;
    }
    Ok(())
}

/// The routing key (`type`) and id of an event body. A body without a usable `type` is
/// published as `member.invalid`, a key the input queue binds, so the worker dead-letters it
/// with a reason instead of the broker dropping it unrouted.
fn routing_of(body: &[u8]) -> (String, Option<String>) {
    let value: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let field = |name: &str| {
        value
            .as_ref()
            .and_then(|v| v.get(name))
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    let routing_key = field("type")
        .filter(|t| !t.is_empty() && t.len() <= 255)
        .unwrap_or_else(|| "member.invalid".to_owned());
    (routing_key, field("id"))
}

/// Reads a JSON-lines file of events: one event a line; blank lines and `#` comments skipped.
pub(crate) fn read_lines(path: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let lines: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    if lines.is_empty() {
        bail!("{} has no events", path.display());
    }
    Ok(lines)
}
