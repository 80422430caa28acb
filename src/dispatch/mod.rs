//! Sending planned messages: claim, compose, defer, deliver, record.
//!
//! A dispatcher claims due messages (`outbox::claim`: `FOR UPDATE SKIP LOCKED`, an owner
//! token and a lease it renews while it works), so any number of dispatchers share the
//! outbox; a crashed one's lease lapses and its messages are claimed again, with the lost
//! claim recorded as an unsure attempt. Each message then goes through small steps:
//!
//! 1. **compose** (`compose.rs`, on the blocking pool): consent, suppression and address as
//!    of the claim, then rendering;
//! 2. **defer**: quiet hours for SMS, and the marketing cap taken under its row lock;
//! 3. **deliver**: the channel's providers in order, behind their circuit breakers and rate
//!    limits, failing over only on failures from before a provider had the message;
//! 4. **conclude**: sent, suppressed, failed, or pending again with a backoff.
//!
//! Each message's result is recorded as soon as its provider answered: results that arrive
//! while a write is under way go in the next write (group commit), so a crash can resend only
//! what was in flight. A write that fails is retried until it succeeds, never dropped.

mod compose;
pub(crate) mod email;
pub(crate) mod guard;
pub(crate) mod policy;
pub(crate) mod providers;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use tracing::{Instrument, debug, info, warn};

use crate::app::App;
use crate::backoff::Backoff;
use crate::domain::Channel;
use crate::metrics::Metrics;
use crate::outbox::{self, Attempt, Claimed, Settled, Status, Unreadable};
use crate::shutdown::Shutdown;
use crate::template_store::Catalog;
use compose::{Composed, Composer};
pub use providers::Failure;
pub(crate) use providers::{Accepted, Outgoing, Provider};

/// What one step of the dispatcher did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing was due.
    Idle,
    /// This many messages were claimed, settled and recorded.
    Settled(usize),
}

/// `now` plus `delay`, never panicking: the delay is capped at a day (a provider's
/// `Retry-After` is outside input) and an overflow saturates at `now` plus a day.
pub fn later(now: DateTime<Utc>, delay: Duration) -> DateTime<Utc> {
    let day = chrono::Duration::days(1);
    let delay = chrono::Duration::from_std(delay.min(providers::MAX_RETRY_AFTER)).unwrap_or(day);
    now.checked_add_signed(delay)
        .or_else(|| now.checked_add_signed(day))
        .unwrap_or(now)
}

/// A provider with its circuit breaker and rate limit.
pub(crate) struct Slot {
    /// The provider.
    pub provider: Provider,
    /// Skips it while it keeps failing.
    pub breaker: guard::Breaker,
    /// Paces calls to it.
    pub limit: Option<guard::RateLimit>,
}

impl Slot {
    fn new(provider: Provider, settings: &crate::config::DispatchSettings) -> Slot {
        Slot {
            breaker: guard::Breaker::new(settings.breaker_failures, settings.breaker_cooldown()),
            limit: settings
                .rate_limit
                .of(provider.name())
                .map(guard::RateLimit::new),
            provider,
        }
    }
}

/// The sending side of the worker.
pub struct Dispatcher {
    app: App,
    composer: Composer,
    email_providers: Vec<Slot>,
    sms_providers: Vec<Slot>,
    /// This dispatcher's claims carry it: only it renews and settles them.
    owner: String,
    recorder: Recorder,
}

impl Dispatcher {
    /// A dispatcher with the providers of the settings; fails when one cannot be built.
    pub fn new(app: App) -> anyhow::Result<Dispatcher> {
        let d = &app.settings.dispatch;
        let email_providers = providers::email_providers(&app.settings)?
            .into_iter()
            .map(|p| Slot::new(p, d))
            .collect();
        let sms_providers = providers::sms_providers(&app.settings)?
            .into_iter()
            .map(|p| Slot::new(p, d))
            .collect();
        Ok(Dispatcher {
            composer: Composer {
                store: app.templates.clone(),
                settings: app.settings.clone(),
                tokens: app.tokens.clone(),
            },
            owner: format!("{:032x}", rand::random::<u128>()),
            recorder: Recorder::default(),
            app,
            email_providers,
            sms_providers,
        })
    }

    /// Sends until shutdown with `dispatch.pipelines` claim–send–record loops at once, so that
    /// one loop's database round trips overlap another's sending. A loop that panics ends the
    /// role with an error (the process then exits non-zero), never leaving a half-alive worker.
    pub async fn run(self, shutdown: Shutdown) -> anyhow::Result<()> {
        let this = Arc::new(self);
        let mut loops = tokio::task::JoinSet::new();
        for _ in 0..this.app.settings.dispatch.pipelines.max(1) {
            let (dispatcher, shutdown) = (this.clone(), shutdown.clone());
            loops.spawn(async move { dispatcher.pipeline(shutdown).await });
        }
        this.app
            .health
            .dispatch_loops
            .store(loops.len(), std::sync::atomic::Ordering::Relaxed);
        while let Some(result) = loops.join_next().await {
            this.app
                .health
                .dispatch_loops
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            result.context("a dispatch loop panicked")?;
        }
        info!("Dispatch stopped.");
        Ok(())
    }

    /// One loop: claim, send, record, until shutdown; wakes early when messages were planned.
    async fn pipeline(&self, shutdown: Shutdown) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        while !shutdown.is_triggered() {
            match self.try_execute_once().await {
                Ok(Step::Settled(_)) => backoff.reset(),
                Ok(Step::Idle) => {
                    tokio::select! {
                        _ = self.app.outbox_ready.notified() => {}
                        _ = shutdown.sleep(self.app.settings.dispatch.poll_interval()) => {}
                    }
                }
                Err(error) => {
                    warn!(
                        error = crate::mask::text(&format!("{error:#}")),
                        "Dispatch step failed; retrying."
                    );
                    shutdown.sleep(backoff.next()).await;
                }
            }
        }
    }

    /// Claims one batch of due messages, sends them, and records each result as it comes.
    /// Returns once every result of the batch is recorded.
    pub async fn try_execute_once(&self) -> anyhow::Result<Step> {
        let d = &self.app.settings.dispatch;
        let started = Instant::now();
        let claimed = outbox::claim(
            &self.app.pool,
            &self.owner,
            self.app.clock.now(),
            d.batch_size,
            d.lease(),
        )
        .await?;
        if claimed.is_empty() {
            return Ok(Step::Idle);
        }
        let n = claimed.len();
        let claimed_in = started.elapsed();
        let oldest = claimed.iter().flatten().map(|c| c.created_at).min();
        let ids: Vec<i64> = claimed
            .iter()
            .map(|c| c.as_ref().map_or_else(|u| u.id, |c| c.id))
            .collect();
        // The batch renders with the templates in force when it was claimed.
        let catalog = self.composer.store.current();
        let catalog = &catalog;
        let sending = futures_util::stream::iter(claimed)
            .map(|c| async move {
                let settled = match c {
                    Ok(c) => self.settle(c, catalog).await,
                    Err(unreadable) => self.unreadable(unreadable),
                };
                self.recorder.record(&self.app, &self.owner, settled).await;
            })
            .buffer_unordered(d.concurrency)
            .collect::<Vec<()>>();
        // While the batch is out, its claims are renewed: a slow provider must not let another
        // dispatcher take (and send again) messages that are still being sent.
        tokio::select! {
            _ = sending => {}
            never = self.renew_claims(&ids) => match never {},
        }
        debug!(
            messages = n,
            claim_ms = claimed_in.as_secs_f64() * 1e3,
            total_ms = started.elapsed().as_secs_f64() * 1e3,
            oldest_planned_ms = oldest.map(|at| (chrono::Utc::now() - at).num_milliseconds()),
            "Dispatch batch settled."
        );
        Ok(Step::Settled(n))
    }

    /// Extends this dispatcher's claims on `ids` every third of the lease, until dropped
    /// (recorded messages are no longer `sending` and are left alone). A failed renewal is
    /// logged; the lease then runs its course.
    async fn renew_claims(&self, ids: &[i64]) -> std::convert::Infallible {
        let lease = self.app.settings.dispatch.lease();
        let every = (lease / 3).max(Duration::from_millis(100));
        loop {
            tokio::time::sleep(every).await;
            if let Err(error) = outbox::renew(&self.app.pool, &self.owner, ids, lease).await {
                warn!(%error, "Renewing message claims failed.");
            }
        }
    }

    /// Decides and sends one claimed message, and counts what became of it.
    // At debug, like the provider's span: at info (the production level) a span for every
    // message and call took HTTP dispatch from 11,226-11,873 msg/s to 10,358-10,895 in two
    // bench pairs, and the warnings logged within name the message and the provider anyway.
    #[tracing::instrument(
        name = "message",
        level = "debug",
        skip_all,
        fields(
            message_id = claimed.id,
            trigger = claimed.trigger.as_str(),
            channel = claimed.channel.as_str()
        )
    )]
    async fn settle(&self, claimed: Claimed, catalog: &Catalog) -> Settled {
        let trigger = claimed.trigger.as_str();
        let channel = claimed.channel.as_str();
        let planned_at = claimed.created_at;
        let settled = self.decide(claimed, catalog).await;
        let status = match (settled.status, settled.uncounted) {
            (Status::Pending, true) => "deferred",
            (Status::Pending, false) => "retried",
            (status, _) => status.as_str(),
        };
        let provider = settled.provider.clone().unwrap_or_else(|| "none".into());
        for attempt in &settled.attempts {
            metrics::histogram!(
                "lifecycle_provider_latency_seconds",
                "provider" => attempt.provider,
                "outcome" => attempt.outcome,
            )
            .record(attempt.latency.as_secs_f64());
        }
        if status == "sent" {
            let waited = (chrono::Utc::now() - planned_at)
                .to_std()
                .unwrap_or_default();
            metrics::histogram!(
                "lifecycle_event_to_send_seconds",
                "trigger" => trigger,
                "channel" => channel,
            )
            .record(waited.as_secs_f64());
        }
        metrics::counter!(
            "lifecycle_messages_total",
            "status" => status,
            "provider" => provider,
            "trigger" => trigger,
        )
        .increment(1);
        settled
    }

    /// A message that cannot be rendered (a broken template, a value that does not parse):
    /// it fails.
    fn broken(&self, mut settled: Settled, error: &anyhow::Error) -> Settled {
        let error = crate::mask::text(&format!("{error:#}"));
        warn!(
            message_id = settled.id,
            error, "Message cannot be rendered."
        );
        Metrics::inc(&self.app.metrics.messages_failed);
        settled.error = Some(error);
        settled
    }

    /// A claimed message whose stored names do not parse: it fails, counted and logged as a
    /// message that cannot be rendered.
    fn unreadable(&self, u: Unreadable) -> Settled {
        metrics::counter!(
            "lifecycle_messages_total",
            "status" => "failed",
            "provider" => "none",
            "trigger" => u.trigger,
        )
        .increment(1);
        self.broken(Settled::new(u.id), &anyhow::anyhow!(u.reason))
    }

    /// Decides and sends one claimed message: compose, defer, deliver, conclude.
    async fn decide(&self, claimed: Claimed, catalog: &Catalog) -> Settled {
        let mut settled = Settled::new(claimed.id);
        let (c, composed, version) = self.composer.compose(claimed, catalog).await;
        settled.template = version;
        let outgoing = match composed {
            Composed::Ready(outgoing) => outgoing,
            Composed::Suppressed(reason) => return self.suppressed(settled, reason.into_owned()),
            Composed::Unavailable(error) => {
                // The database could not give the message's templates: a passing failure, not
                // the message's. It waits, without counting as an attempt.
                let error = crate::mask::text(&format!("{error:#}"));
                warn!(
                    message_id = c.id,
                    error, "Templates could not be loaded; the message waits."
                );
                let until = later(self.app.clock.now(), Duration::from_secs(30));
                return settled.deferred(until, format!("templates could not be loaded: {error}"));
            }
            Composed::Broken(error) => return self.broken(settled, &error),
        };
        settled.recipient = Some(outgoing.to.clone());
        if !c.test
            && self
                .app
                .settings
                .program
                .holdout_percent
                .holds_out(&c.member_id, c.trigger.as_str())
        {
            // The trigger's control group: everything a send checks was checked, and the
            // moment it would have gone is kept for the report.
            debug!(message_id = c.id, "Message held out (control group).");
            settled.status = Status::HeldOut;
            settled.sent_at = Some(self.app.clock.now());
            return settled;
        }
        let marketing = self.is_marketing(&c);
        match self.deferral(&c, &outgoing, marketing).await {
            Ok(None) => {}
            Ok(Some((until, reason))) => {
                debug!(message_id = c.id, until = %until, reason, "Message deferred.");
                return settled.deferred(until, reason);
            }
            Err(error) => {
                warn!(
                    message_id = c.id,
                    error = format!("{error:#}"),
                    "Checking the cap failed."
                );
                let until = later(self.app.clock.now(), Duration::from_secs(30));
                return settled.deferred(until, "the marketing cap could not be checked".into());
            }
        }
        let delivery = self.deliver(&c, &outgoing).await;
        if marketing && !matches!(delivery.outcome, Outcome::Sent { .. }) {
            // Not sent: the cap taken for it is free again. Should this fail, the cap holds a
            // little longer than it needs to; nothing is sent twice.
            if let Err(error) =
                outbox::release_cap(&self.app.pool, c.id, self.app.clock.now()).await
            {
                warn!(
                    message_id = c.id,
                    error = format!("{error:#}"),
                    "Releasing the cap failed."
                );
            }
        }
        self.conclude(settled, &c, delivery)
    }

    /// A message that must not be sent: recorded as suppressed, with why.
    fn suppressed(&self, mut settled: Settled, reason: String) -> Settled {
        debug!(message_id = settled.id, reason, "Message suppressed.");
        Metrics::inc(&self.app.metrics.messages_suppressed);
        settled.status = Status::Suppressed;
        settled.attempts.push(Attempt {
            provider: "policy",
            outcome: "suppressed",
            error: Some(reason.clone()),
            latency: Duration::ZERO,
        });
        settled.error = Some(reason);
        settled
    }

    fn is_marketing(&self, c: &Claimed) -> bool {
        !c.test
            && self.app.settings.dispatch.marketing_cap_hours > 0
            && policy::is_marketing(c.trigger)
    }

    /// Until when the message must wait, and why, if it may not go now: quiet hours for SMS,
    /// then the marketing cap, which is taken here (under its row lock) when it is free.
    async fn deferral(
        &self,
        c: &Claimed,
        outgoing: &Outgoing,
        marketing: bool,
    ) -> anyhow::Result<Option<(DateTime<Utc>, String)>> {
        let now = self.app.clock.now();
        if c.test {
            // The marketer asked for it now, usually to their own phone.
            return Ok(None);
        }
        // A stored zone that does not parse has no quiet hours.
        if let (Channel::Sms, Some(tz)) = (outgoing.channel, c.timezone) {
            let quiet = self
                .app
                .settings
                .dispatch
                .quiet_hours
                .until(tz.tz(), now)
                .map(|until| (until, format!("quiet hours in {}", tz.name())));
            if quiet.is_some() {
                return Ok(quiet);
            }
        }
        if !marketing {
            return Ok(None);
        }
        let hours = self.app.settings.dispatch.marketing_cap_hours;
        let until = later(now, Duration::from_secs(u64::from(hours) * 3600));
        let taken =
            outbox::reserve_cap(&self.app.pool, &c.member_id, c.channel, c.id, now, until).await?;
        Ok(taken.err().map(|held| {
            (
                held,
                format!("frequency cap: one marketing message per {hours} h"),
            )
        }))
    }

    /// Hands the message to the channel's providers in order. The next provider is tried
    /// after a failure that happened before the provider had the message; an unsure failure
    /// (a timeout after the request went out) stops here, and the message is retried later
    /// rather than risk a second copy through another provider.
    async fn deliver(&self, c: &Claimed, outgoing: &Outgoing) -> Delivery {
        let providers = match outgoing.channel {
            Channel::Email => &self.email_providers,
            Channel::Sms => &self.sms_providers,
        };
        let mut delivery = Delivery {
            attempts: Vec::new(),
            outcome: Outcome::Paused,
        };
        let mut any_transient = false;
        for slot in providers {
            let provider = &slot.provider;
            if !slot.breaker.allow() {
                debug!(
                    message_id = c.id,
                    provider = provider.name(),
                    "Provider skipped: its circuit is open."
                );
                continue;
            }
            let (result, latency, call) = self.call(slot, outgoing).await;
            let failure = match result {
                Ok(accepted) => {
                    slot.breaker.success();
                    delivery.attempts.push(Attempt {
                        provider: provider.name(),
                        outcome: "sent",
                        error: None,
                        latency,
                    });
                    call.in_scope(|| {
                        debug!(
                            message_id = c.id,
                            provider = provider.name(),
                            to = outgoing.masked_to(),
                            "Message sent."
                        )
                    });
                    delivery.outcome = Outcome::Sent {
                        provider: provider.name(),
                        reference: accepted.reference,
                    };
                    return delivery;
                }
                Err(failure) => failure,
            };
            any_transient |= !failure.is_permanent();
            self.failed(slot, c, outgoing, &failure, &call).await;
            delivery.attempts.push(Attempt {
                provider: provider.name(),
                outcome: failure.outcome(),
                error: Some(failure.to_string()),
                latency,
            });
            let unsure = failure.is_unsure();
            delivery.outcome = Outcome::Failed {
                failure,
                any_transient,
            };
            if unsure {
                break;
            }
        }
        self.show_circuits(providers);
        delivery
    }

    /// One provider call within the rate limit and the send timeout (no answer in time is an
    /// unsure failure), in its span; with how long it took.
    async fn call(
        &self,
        slot: &Slot,
        outgoing: &Outgoing,
    ) -> (Result<Accepted, Failure>, Duration, tracing::Span) {
        let d = &self.app.settings.dispatch;
        let provider = &slot.provider;
        if let Some(limit) = &slot.limit {
            limit.acquire().await;
        }
        let started = Instant::now();
        let call = tracing::debug_span!(
            "provider",
            provider = provider.name(),
            outcome = tracing::field::Empty
        );
        let result = tokio::time::timeout(d.send_timeout(), provider.send(outgoing))
            .instrument(call.clone())
            .await
            .unwrap_or_else(|_| {
                Err(Failure::unsure(format!(
                    "{}: no answer within {} ms",
                    provider.name(),
                    d.send_timeout_ms
                )))
            });
        let latency = started.elapsed();
        call.record(
            "outcome",
            match &result {
                Ok(_) => "sent",
                Err(failure) => failure.outcome(),
            },
        );
        (result, latency, call)
    }

    /// After a provider's failure: its breaker learns of it (a permanent failure is the
    /// message's, not the provider's), it is logged, and an address the server refused for
    /// good is suppressed.
    async fn failed(
        &self,
        slot: &Slot,
        c: &Claimed,
        outgoing: &Outgoing,
        failure: &Failure,
        call: &tracing::Span,
    ) {
        let provider = &slot.provider;
        if failure.is_permanent() {
            slot.breaker.neutral();
        } else {
            slot.breaker.failure();
        }
        call.in_scope(|| {
            warn!(message_id = c.id, provider = provider.name(), to = outgoing.masked_to(), error = %failure, "Provider failed.")
        });
        if failure.rejects_recipient() {
            // The server refused this address for good: no more mail to it.
            let reason = format!("bounced: {failure}");
            let change = crate::suppress::Change {
                channel: outgoing.channel,
                address: &outgoing.to,
                how: crate::notifications::How::HardBounce,
                member: Some(c.member_id.as_str()),
            };
            let sinks = crate::notifications::Sinks::of(&self.app.settings);
            if let Err(e) =
                crate::suppress::suppress(&self.app.pool, sinks, change, &reason, provider.name())
                    .await
            {
                warn!(message_id = c.id, error = %e, "Recording a bounce failed.");
            }
        }
    }

    /// Each provider's circuit, as a gauge and on the health board.
    fn show_circuits(&self, providers: &[Slot]) {
        let mut circuits = self.app.health.circuits.lock().expect("circuits lock");
        for slot in providers {
            let open = slot.breaker.is_open();
            metrics::gauge!("lifecycle_provider_circuit_open", "provider" => slot.provider.name())
                .set(if open { 1.0 } else { 0.0 });
            circuits.insert(slot.provider.name().to_owned(), open);
        }
    }

    /// The message's new state from what its providers did: sent; failed (permanently, or out
    /// of attempts); or pending again after an exponential backoff with jitter, never sooner
    /// than a provider asked (`Retry-After`, at most a day).
    fn conclude(&self, mut settled: Settled, c: &Claimed, delivery: Delivery) -> Settled {
        let d = &self.app.settings.dispatch;
        let now = self.app.clock.now();
        settled.attempts = delivery.attempts;
        match delivery.outcome {
            Outcome::Sent {
                provider,
                reference,
            } => {
                Metrics::inc(&self.app.metrics.messages_sent);
                settled.status = Status::Sent;
                settled.sent_at = Some(now);
                settled.provider = Some(provider.to_owned());
                settled.provider_ref = Some(reference);
            }
            Outcome::Paused => {
                // Every provider's circuit is open: wait for a cooldown, without an attempt.
                settled.status = Status::Pending;
                settled.uncounted = true;
                settled.error =
                    Some("every provider of the channel is paused (circuit open)".into());
                settled.retry_at = Some(later(now, d.breaker_cooldown()));
            }
            Outcome::Failed {
                failure,
                any_transient,
            } => {
                settled.provider = settled.attempts.last().map(|a| a.provider.to_owned());
                settled.error = Some(failure.to_string());
                if !any_transient || c.attempt >= d.max_attempts {
                    Metrics::inc(&self.app.metrics.messages_failed);
                    settled.status = Status::Failed;
                } else {
                    Metrics::inc(&self.app.metrics.messages_retried);
                    let backoff = Duration::from_millis(
                        d.retry_base_ms
                            .saturating_mul(1 << (c.attempt - 1).clamp(0, 16))
                            .min(d.retry_max_ms),
                    );
                    let jittered = backoff.mul_f64(0.5 + rand::random::<f64>() / 2.0);
                    let delay = failure
                        .retry_after()
                        .map_or(jittered, |asked| asked.max(jittered));
                    settled.status = Status::Pending;
                    settled.retry_at = Some(later(now, delay));
                }
            }
        }
        settled
    }
}

/// What the providers did with one message.
struct Delivery {
    /// Every call made.
    attempts: Vec<Attempt>,
    outcome: Outcome,
}

enum Outcome {
    /// A provider took it.
    Sent {
        provider: &'static str,
        reference: String,
    },
    /// The last provider tried failed; `any_transient`: some failure was worth retrying.
    Failed {
        failure: Failure,
        any_transient: bool,
    },
    /// No provider was called: every circuit is open.
    Paused,
}

/// Records results as they come, in group commits: a result that arrives while a write is
/// under way goes in the next write, with every other that arrived meanwhile. Under load the
/// writes batch themselves; when idle each result is written at once.
///
/// A write the database refuses for good (a constraint, a value it cannot hold) is not
/// retried as it is: the batch is written one result at a time, and a result refused alone is
/// written once more without its texts (its error and the provider's reference), then, should
/// even that be refused, given up with an error logged (its claim lapses and it is sent again,
/// with the lost claim recorded as unsure). So no one result can hold the writer. A write that
/// fails for a passing reason (the database restarting) is retried with backoff, never
/// dropped; past `dispatch.writer_stuck_ms` (30 s) the writer counts as stuck, which
/// `/readyz` and the `lifecycle_results_writer_stuck` gauge show.
#[derive(Default)]
struct Recorder {
    /// Results waiting for the next write, each with its waiter.
    waiting: Mutex<Vec<(Settled, tokio::sync::oneshot::Sender<()>)>>,
    /// Held by whoever is writing.
    writing: tokio::sync::Mutex<()>,
}

impl Recorder {
    /// Records `settled` (with whatever else is waiting) and returns once it is written (or,
    /// refused for good, given up).
    async fn record(&self, app: &App, owner: &str, settled: Settled) {
        let (done, mut committed) = tokio::sync::oneshot::channel();
        self.lock_waiting().push((settled, done));
        let _writer = tokio::select! {
            _ = &mut committed => return,
            writer = self.writing.lock() => writer,
        };
        let batch = std::mem::take(&mut *self.lock_waiting());
        if !batch.is_empty() {
            let (results, waiters): (Vec<Settled>, Vec<_>) = batch.into_iter().unzip();
            Self::write(app, owner, &results).await;
            for waiter in waiters {
                waiter.send(()).ok();
            }
        }
        // Ours went in this write or in the one before it.
        committed.await.ok();
    }

    /// Writes `results` in one transaction, retrying passing failures; a refusal for good
    /// writes them one by one.
    async fn write(app: &App, owner: &str, results: &[Settled]) {
        let started = Instant::now();
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        loop {
            match outbox::record(
                &app.pool,
                crate::notifications::Sinks::of(&app.settings),
                owner,
                results,
            )
            .await
            {
                Ok(lost) => {
                    warn_lost(&lost);
                    break;
                }
                Err(error) if !crate::db::is_transient_error(&error) && results.len() > 1 => {
                    warn!(
                        error = crate::mask::text(&format!("{error:#}")),
                        results = results.len(),
                        "The database refused a batch of results; writing them one by one."
                    );
                    for result in results {
                        Box::pin(Self::write(app, owner, std::slice::from_ref(result))).await;
                    }
                    break;
                }
                Err(error) if !crate::db::is_transient_error(&error) => {
                    Self::write_bare(app, owner, &results[0], &error).await;
                    break;
                }
                Err(error) => {
                    let failing = started.elapsed();
                    if failing.as_millis() >= u128::from(app.settings.dispatch.writer_stuck_ms) {
                        app.health.writer_stuck(true);
                    }
                    warn!(
                        error = crate::mask::text(&format!("{error:#}")),
                        results = results.len(),
                        failing_secs = failing.as_secs(),
                        "Recording results failed; retrying."
                    );
                    tokio::time::sleep(backoff.next()).await;
                }
            }
        }
        app.health.writer_stuck(false);
    }

    /// One result the database refused for good: written once more without its texts (which
    /// are logged instead, masked), or, refused even so, given up. A passing failure of that
    /// write is retried with backoff, as any write is.
    async fn write_bare(app: &App, owner: &str, result: &Settled, refused: &anyhow::Error) {
        let masked = |text: &Option<String>| text.as_deref().map(crate::mask::partner);
        warn!(
            message_id = result.id,
            error = crate::mask::text(&format!("{refused:#}")),
            result_error = masked(&result.error),
            provider_ref = masked(&result.provider_ref),
            attempt_errors = ?result
                .attempts
                .iter()
                .filter_map(|a| masked(&a.error))
                .collect::<Vec<_>>(),
            "The database refused a result; writing it without its texts."
        );
        let mut bare = result.clone();
        bare.error = Some("(the result's text could not be stored; the log has it)".into());
        bare.provider_ref = None;
        for attempt in &mut bare.attempts {
            attempt.error = attempt.error.as_ref().map(|_| "(not stored)".into());
        }
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        loop {
            match outbox::record(
                &app.pool,
                crate::notifications::Sinks::of(&app.settings),
                owner,
                std::slice::from_ref(&bare),
            )
            .await
            {
                Ok(lost) => return warn_lost(&lost),
                Err(error) if crate::db::is_transient_error(&error) => {
                    warn!(
                        message_id = result.id,
                        error = crate::mask::text(&format!("{error:#}")),
                        "Recording a result without its texts failed; retrying."
                    );
                    tokio::time::sleep(backoff.next()).await;
                }
                Err(error) => {
                    metrics::counter!("lifecycle_results_dropped_total").increment(1);
                    tracing::error!(
                        message_id = result.id,
                        error = crate::mask::text(&format!("{error:#}")),
                        "A result could not be recorded at all; its claim will lapse and the message go again."
                    );
                    return;
                }
            }
        }
    }

    fn lock_waiting(
        &self,
    ) -> std::sync::MutexGuard<'_, Vec<(Settled, tokio::sync::oneshot::Sender<()>)>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Logs results recorded after their claim was taken over.
fn warn_lost(lost: &[i64]) {
    for id in lost {
        warn!(
            message_id = id,
            "Result recorded too late: the claim had lapsed and another dispatcher took the message."
        );
    }
}
