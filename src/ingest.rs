//! Consuming events: the batched consume loop, ack or dead-letter by outcome, reconnecting
//! (the topology and the connection are `amqp`'s).
//!
//! Architecture invariant: this module acks an event only after the transaction holding the
//! delivery has committed (or, for a refused event, after its dead letter was confirmed by the
//! broker). A crash anywhere before the ack means redelivery, and the inbox makes a redelivered
//! event a no-op.

use std::time::Duration;

use anyhow::{Context, anyhow};
use futures_util::{FutureExt, StreamExt};
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use tracing::{debug, info, warn};

use crate::amqp::{ERROR_HEADER, RETRIES_HEADER, bounded, connect, declare_topology};
use crate::app::App;
use crate::backoff::Backoff;
use crate::event::{self, Event};
use crate::ledger::{self, Locking, Outcome};
use crate::metrics::Metrics;
use crate::publish::Publisher;
use crate::shutdown::Shutdown;

/// The consuming side of the worker.
#[derive(Clone)]
pub(crate) struct Ingest {
    app: App,
}

impl Ingest {
    /// An ingest for this process.
    pub(crate) fn new(app: App) -> Ingest {
        Ingest { app }
    }

    /// Consumes until `shutdown`, reconnecting whenever the broker goes away.
    pub(crate) async fn run(self, shutdown: Shutdown) -> anyhow::Result<()> {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        while !shutdown.is_triggered() {
            match self.session(&shutdown).await {
                Ok(()) => backoff.reset(),
                Err(error) => {
                    warn!(
                        error = format!("{error:#}"),
                        "Ingest session ended; reconnecting."
                    );
                    metrics::counter!("lifecycle_reconnects_total", "component" => "ingest")
                        .increment(1);
                    shutdown.sleep(backoff.next()).await;
                }
            }
        }
        info!("Ingest stopped.");
        Ok(())
    }

    /// One connection's life: declare, then run the consumers until one fails or shutdown.
    async fn session(&self, shutdown: &Shutdown) -> anyhow::Result<()> {
        let connection = connect(&self.app.settings.amqp_url, "lifecycle-ingest").await?;
        declare_topology(&connection, &self.app.settings).await?;
        let mut consumers = tokio::task::JoinSet::new();
        for n in 0..self.app.settings.ingest.consumers {
            let this = self.clone();
            let channel = connection.create_channel().await?;
            let publisher = Publisher::open(&connection).await?;
            let shutdown = shutdown.clone();
            consumers.spawn(async move { this.consume(n, channel, publisher, shutdown).await });
        }
        // The first consumer to fail ends the session: closing the connection returns every
        // unacked delivery to the queue, and `run` reconnects.
        let mut result = Ok(());
        while let Some(joined) = consumers.join_next().await {
            let failed = match joined {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(e) if e.is_cancelled() => None,
                Err(e) => Some(anyhow!("consumer task failed: {e}")),
            };
            if let Some(error) = failed {
                consumers.abort_all();
                result = Err(error);
            }
        }
        // The broker may never answer a close (a channel already closing: seen under load);
        // the connection goes with the process, or with the next session, either way.
        bounded(connection.close(200, "bye".into())).await;
        result
    }

    /// Consumes in batches on one channel until shutdown (Ok) or an unrecoverable error.
    async fn consume(
        &self,
        n: usize,
        channel: Channel,
        publisher: Publisher,
        shutdown: Shutdown,
    ) -> anyhow::Result<()> {
        let s = &self.app.settings.ingest;
        channel
            .basic_qos(s.prefetch, BasicQosOptions::default())
            .await?;
        let tag = format!("lifecycle-{}-{n}", std::process::id());
        let mut consumer = channel
            .basic_consume(
                s.queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("consuming from {}", s.queue))?;
        debug!(consumer = tag, "Consuming.");
        let _consuming = self.app.health.consuming();
        // Deliveries whose member another transaction held stay here, unacked, at the front of
        // the next batch (their tags are the lowest, so its acks stay in order).
        let mut batch: Vec<Delivery> = Vec::with_capacity(s.batch_size);
        // Batches in a row that left deliveries behind; the next after a few waits for locks.
        let mut carried_rounds = 0;
        loop {
            let carried = batch.len();
            let Some(pending_error) =
                gather(&mut consumer, &mut batch, s.batch_size, &shutdown, &tag).await?
            else {
                break;
            };
            if !batch.is_empty() {
                // Waiting for the other consumers' locks when nothing new came in, or when
                // deliveries were held a few times in a row, so that none is held for ever.
                let locking = if batch.len() == carried || carried_rounds >= 3 {
                    Locking::Wait
                } else {
                    Locking::SkipBusy
                };
                let handled = self
                    .handle_batch(&batch, locking, &publisher, &shutdown)
                    .await;
                // An unacked batch must not be acked by a later batch's `multiple` ack: give
                // the channel up, which returns its unacked deliveries to the queue.
                let busy = handled.context("a batch could not be settled")?;
                let mut index = 0;
                batch.retain(|_| {
                    index += 1;
                    busy.binary_search(&(index - 1)).is_ok()
                });
                carried_rounds = if batch.is_empty() {
                    0
                } else {
                    carried_rounds + 1
                };
            }
            if let Some(error) = pending_error {
                // The session ends and `run` connects anew; the broker returns this channel's
                // unacked deliveries to the queue when the connection goes.
                return Err(anyhow!(error).context("the channel failed"));
            }
        }
        // Stop the flow, then close both channels, waiting for the broker each time:
        // prefetched deliveries return to the queue. Left open, a channel is closed from its
        // drop, racing the session's close of the connection, and lapin logs that as an
        // ERROR ("invalid channel state: Closing") at every shutdown.
        bounded(channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default())).await;
        bounded(channel.close(200, "bye".into())).await;
        publisher.close().await;
        Ok(())
    }

    /// Handles one batch: parse, apply in one transaction, publish dead letters and retries,
    /// then ack every delivery at once, except those whose member another transaction held:
    /// their indices are returned (ascending), and they stay unacked for the next batch. An
    /// `Err` means the batch was left unacked.
    #[tracing::instrument(name = "batch", skip_all, fields(size = batch.len()))]
    async fn handle_batch(
        &self,
        batch: &[Delivery],
        locking: Locking,
        publisher: &Publisher,
        shutdown: &Shutdown,
    ) -> anyhow::Result<Vec<usize>> {
        let started = std::time::Instant::now();
        let max = self.app.settings.ingest.max_event_bytes;
        let parsed: Vec<Result<Event, event::Rejection>> =
            batch.iter().map(|d| event::parse(&d.data, max)).collect();
        let valid: Vec<&Event> = parsed.iter().filter_map(|p| p.as_ref().ok()).collect();
        let Some(outcomes) = self.apply_with_retry(&valid, locking, shutdown).await else {
            return Err(anyhow!("shutting down while the database is unavailable"));
        };
        if outcomes
            .iter()
            .any(|o| matches!(o, Outcome::Applied { planned } if *planned > 0))
        {
            self.app.outbox_ready.notify_one();
        }
        let mut applied = outcomes.into_iter();

        let mut confirms = Vec::new();
        let mut busy = Vec::new();
        for (i, (delivery, parsed)) in batch.iter().zip(&parsed).enumerate() {
            let outcome = match parsed {
                Err(rejection) => Outcome::Rejected(rejection.0.clone()),
                Ok(_) => applied.next().expect("an outcome per valid event"),
            };
            if matches!(outcome, Outcome::Busy) {
                busy.push(i);
                continue;
            }
            let kind = parsed.as_ref().map_or("invalid", |e| e.kind.type_name());
            confirms.extend(self.settle(publisher, delivery, kind, outcome).await);
        }
        for confirm in confirms {
            // Without the dead letter or retry safely stored, the original must stay.
            Publisher::confirmed(confirm)
                .await
                .context("a dead letter or retry was not confirmed")?;
        }
        let applied_at = started.elapsed();
        ack_settled(batch, &busy).await;
        debug!(
            size = batch.len(),
            held = busy.len(),
            apply_ms = applied_at.as_secs_f64() * 1e3,
            total_ms = started.elapsed().as_secs_f64() * 1e3,
            "Batch settled."
        );
        Ok(busy)
    }

    /// Counts what became of one delivery (`kind`: its event type, or `invalid`), and
    /// publishes its dead letter or its retry, whose confirm is returned to be awaited before
    /// the batch is acked.
    async fn settle(
        &self,
        publisher: &Publisher,
        delivery: &Delivery,
        kind: &'static str,
        outcome: Outcome,
    ) -> Option<anyhow::Result<lapin::PublisherConfirm>> {
        let count = |outcome: &'static str| {
            metrics::counter!("lifecycle_events_total", "type" => kind, "outcome" => outcome)
                .increment(1);
        };
        let dead = |class: &'static str| {
            metrics::counter!("lifecycle_dead_letters_total", "reason_class" => class).increment(1);
            Metrics::inc(&self.app.metrics.events_dead_lettered);
            count("dead_lettered");
        };
        match outcome {
            Outcome::Busy => None,
            Outcome::Applied { .. } => {
                count("applied");
                Metrics::inc(&self.app.metrics.events_applied);
                None
            }
            Outcome::Duplicate => {
                count("duplicate");
                Metrics::inc(&self.app.metrics.events_duplicate);
                None
            }
            Outcome::Rejected(reason) => {
                dead(if kind == "invalid" {
                    "malformed"
                } else {
                    "refused"
                });
                // The header keeps the reason whole for ops; the log masks what it quotes.
                warn!(reason = crate::mask::text(&reason), routing_key = %delivery.routing_key, "Event dead-lettered.");
                Some(self.dead_letter(publisher, delivery, &reason).await)
            }
            Outcome::Deferred(reason) => {
                let retries = retries_of(delivery);
                if retries >= self.app.settings.ingest.max_retries {
                    dead("gave_up");
                    let reason = format!("{reason} (gave up after {retries} retries)");
                    warn!(
                        reason = crate::mask::text(&reason),
                        "Early event dead-lettered."
                    );
                    return Some(self.dead_letter(publisher, delivery, &reason).await);
                }
                count("deferred");
                Metrics::inc(&self.app.metrics.events_deferred);
                debug!(
                    reason = crate::mask::text(&reason),
                    retries, "Event deferred."
                );
                Some(self.retry_later(publisher, delivery, retries + 1).await)
            }
        }
    }

    /// Applies the valid events of a batch, retrying transient database errors with backoff.
    /// An event the database itself refuses is isolated by applying the batch one event at a
    /// time. `None` when shutdown interrupted the retries.
    async fn apply_with_retry(
        &self,
        events: &[&Event],
        locking: Locking,
        shutdown: &Shutdown,
    ) -> Option<Vec<Outcome>> {
        if events.is_empty() {
            return Some(Vec::new());
        }
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            match self.apply_once(events, locking).await {
                Ok(outcomes) => return Some(outcomes),
                Err(error) if crate::db::is_transient(&error) => {
                    warn!(
                        error = crate::mask::text(&error.to_string()),
                        "Database unavailable; retrying the batch."
                    );
                    if shutdown.is_triggered() {
                        return None;
                    }
                    shutdown.sleep(backoff.next()).await;
                }
                Err(error) if events.len() > 1 => {
                    warn!(
                        error = crate::mask::text(&error.to_string()),
                        "The database refused a batch; applying its events one by one."
                    );
                    let mut outcomes = Vec::with_capacity(events.len());
                    for event in events {
                        outcomes.extend(
                            Box::pin(self.apply_with_retry(&[event], locking, shutdown)).await?,
                        );
                    }
                    return Some(outcomes);
                }
                Err(error) => {
                    return Some(vec![Outcome::Rejected(format!(
                        "the database refused the event: {error}"
                    ))]);
                }
            }
        }
    }

    async fn apply_once(
        &self,
        events: &[&Event],
        locking: Locking,
    ) -> Result<Vec<Outcome>, sqlx::Error> {
        let mut tx = crate::db::begin_keyed(&self.app.pool).await?;
        let outcomes = ledger::apply_batch(
            &mut tx,
            events,
            &self.app.settings.program,
            &self.app.clock,
            locking,
            crate::notifications::Sinks::of(&self.app.settings),
        )
        .await?;
        tx.commit().await?;
        Ok(outcomes)
    }

    /// Publishes the delivery to the dead-letter exchange with its reason.
    async fn dead_letter(
        &self,
        publisher: &Publisher,
        delivery: &Delivery,
        reason: &str,
    ) -> anyhow::Result<lapin::PublisherConfirm> {
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        // The reason quotes what the event held; addresses and numbers in it are masked, as
        // in every stored error (the body keeps the event as it came).
        headers.insert(
            ERROR_HEADER.into(),
            AMQPValue::LongString(LongString::from(truncate(&crate::mask::text(reason), 1000))),
        );
        let exchange = &self.app.settings.ingest.dead_letter_exchange;
        publisher
            .publish_raw(
                exchange,
                delivery.routing_key.as_str(),
                &delivery.data,
                &delivery.properties,
                headers,
            )
            .await
    }

    /// Publishes the delivery to the retry queue with its retry count raised.
    async fn retry_later(
        &self,
        publisher: &Publisher,
        delivery: &Delivery,
        retries: u32,
    ) -> anyhow::Result<lapin::PublisherConfirm> {
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        headers.insert(RETRIES_HEADER.into(), AMQPValue::LongUInt(retries));
        let s = &self.app.settings.ingest;
        // The delay is the message's own expiration, not the queue's TTL (see
        // `declare_topology`).
        let properties = delivery
            .properties
            .clone()
            .with_expiration(s.retry_delay_ms.to_string().into());
        publisher
            .publish_raw("", &s.retry_queue, &delivery.data, &properties, headers)
            .await
    }
}

/// Adds to `batch` (which may hold deliveries carried from the last one) what has arrived, up
/// to `size`: waits for a first delivery when the batch is empty, else 1 ms at most, then
/// takes whatever is ready. `None` at shutdown; `Some(Some(error))` when the channel failed
/// after the deliveries gathered (they are handled first), `Some(None)` when it did not; an
/// `Err` when the broker cancelled the consumer.
async fn gather(
    consumer: &mut lapin::Consumer,
    batch: &mut Vec<Delivery>,
    size: usize,
    shutdown: &Shutdown,
    tag: &str,
) -> anyhow::Result<Option<Option<lapin::Error>>> {
    let first = if batch.is_empty() {
        tokio::select! {
            _ = shutdown.triggered() => return Ok(None),
            next = consumer.next() => Some(next),
        }
    } else {
        // Held deliveries go again at once, with whatever has arrived meanwhile.
        tokio::select! {
            _ = shutdown.triggered() => return Ok(None),
            next = consumer.next() => Some(next),
            _ = tokio::time::sleep(Duration::from_millis(1)) => None,
        }
    };
    let arrived = first.is_some();
    let mut pending_error = match first {
        None => None,
        // The server cancelled the consumer (queue deleted, node shutting down).
        Some(None) => return Err(anyhow!("the broker cancelled consumer {tag}")),
        Some(Some(Err(error))) => Some(error),
        Some(Some(Ok(delivery))) => {
            batch.push(delivery);
            None
        }
    };
    while arrived && pending_error.is_none() && batch.len() < size {
        match consumer.next().now_or_never() {
            Some(Some(Ok(delivery))) => batch.push(delivery),
            Some(Some(Err(error))) => pending_error = Some(error),
            _ => break,
        }
    }
    Ok(Some(pending_error))
}

/// Acks a batch's deliveries except the held ones (`busy`, ascending). Tags rise through the
/// batch: one `multiple` ack up to the first held delivery, then one ack for each settled
/// delivery after it. A failed ack is logged: the broker redelivers, and the inbox skips them.
async fn ack_settled(batch: &[Delivery], busy: &[usize]) {
    let first_held = busy.first().copied().unwrap_or(batch.len());
    let mut acks = Vec::new();
    if first_held > 0 {
        acks.push((&batch[first_held - 1], true));
    }
    acks.extend(
        (first_held..batch.len())
            .filter(|i| busy.binary_search(i).is_err())
            .map(|i| (&batch[i], false)),
    );
    for (delivery, multiple) in acks {
        match delivery.acker.ack(BasicAckOptions { multiple }).await {
            Ok(true) => {}
            Ok(false) => warn!(
                "The channel was lost before the ack; the broker will redeliver and the inbox skips them."
            ),
            Err(error) => {
                warn!(%error, "Ack failed; the broker will redeliver and the inbox skips them.")
            }
        }
    }
}

/// The retry count of a delivery (0 when it never was deferred).
fn retries_of(delivery: &Delivery) -> u32 {
    let header: ShortString = RETRIES_HEADER.into();
    match delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(&header).cloned())
    {
        Some(AMQPValue::LongUInt(n)) => n,
        Some(AMQPValue::LongInt(n)) => n.max(0) as u32,
        Some(AMQPValue::LongLongInt(n)) => n.clamp(0, u32::MAX as i64) as u32,
        _ => 0,
    }
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}
