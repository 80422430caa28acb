//! Sending planned messages: claim, check consent, render, send, record.
//!
//! A dispatcher claims due messages with `FOR UPDATE SKIP LOCKED` and a lease, so any number
//! of dispatchers share the outbox; a crashed one's lease lapses and its messages are claimed
//! again. Each claimed message is checked against the member's current consent and address,
//! rendered, and handed to the channel's providers in order. Every attempt is recorded; a
//! message ends `sent`, `suppressed` or `failed`, or goes back to `pending` with a later due
//! time after a transient failure.

pub(crate) mod email;
pub mod guard;
pub mod policy;
pub mod providers;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde_json::Value;
use sqlx::Row;
use tracing::{debug, info, warn};

use crate::app::App;
use crate::domain::{Channel, Email, Locale, Phone};
use crate::ingest::Backoff;
use crate::metrics::Metrics;
use crate::render::Templates;
use crate::shutdown::Shutdown;
use crate::triggers::Trigger;
pub use providers::{Accepted, Content, Failure, Outgoing, Provider};

/// What one step of the dispatcher did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing was due.
    Idle,
    /// This many messages were claimed and settled.
    Settled(usize),
}

/// A claimed message with what is needed to send it.
struct Claimed {
    id: i64,
    member_id: String,
    timezone: String,
    attempt: i32,
    trigger: String,
    channel: String,
    context: Value,
    email: Option<String>,
    phone: Option<String>,
    first_name: Option<String>,
    locale: String,
    consent_email: bool,
    consent_sms: bool,
    /// Why the address of the message's channel is suppressed, if it is.
    suppressed: Option<String>,
}

/// How a claimed message was settled.
struct Settled {
    id: i64,
    status: &'static str,
    recipient: Option<String>,
    provider: Option<String>,
    provider_ref: Option<String>,
    error: Option<String>,
    /// For a transient failure: when to try again.
    retry_at: Option<DateTime<Utc>>,
    /// No provider was called (deferred, or every circuit open): the claim does not count as
    /// an attempt.
    uncounted: bool,
    /// Business time at which a provider took it.
    sent_at: Option<DateTime<Utc>>,
    attempts: Vec<Attempt>,
}

/// One provider call, as recorded in `delivery_attempts`.
struct Attempt {
    provider: &'static str,
    outcome: &'static str,
    error: Option<String>,
    latency: Duration,
}

/// A provider with its circuit breaker and rate limit.
pub struct Slot {
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
    templates: Arc<Templates>,
    email_providers: Vec<Slot>,
    sms_providers: Vec<Slot>,
}

impl Dispatcher {
    /// A dispatcher with the providers of the settings; fails when one cannot be built.
    pub fn new(app: App, templates: Arc<Templates>) -> anyhow::Result<Dispatcher> {
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
            app,
            templates,
            email_providers,
            sms_providers,
        })
    }

    /// Sends until shutdown with `dispatch.pipelines` claim–send–record loops at once, so that
    /// one loop's database round trips overlap another's sending.
    pub async fn run(self, shutdown: Shutdown) -> anyhow::Result<()> {
        let this = Arc::new(self);
        let mut loops = tokio::task::JoinSet::new();
        for _ in 0..this.app.settings.dispatch.pipelines.max(1) {
            let (dispatcher, shutdown) = (this.clone(), shutdown.clone());
            loops.spawn(async move { dispatcher.pipeline(shutdown).await });
        }
        while let Some(result) = loops.join_next().await {
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
                        error = format!("{error:#}"),
                        "Dispatch step failed; retrying."
                    );
                    shutdown.sleep(backoff.next()).await;
                }
            }
        }
    }

    /// Claims one batch of due messages, sends them, and records the results.
    pub async fn try_execute_once(&self) -> anyhow::Result<Step> {
        let claimed = self.claim().await?;
        if claimed.is_empty() {
            return Ok(Step::Idle);
        }
        let n = claimed.len();
        let ids: Vec<i64> = claimed.iter().map(|c| c.id).collect();
        let held = self.capped(&claimed).await?;
        let sending = futures_util::stream::iter(claimed.into_iter().zip(held))
            .map(|(c, held)| self.settle(c, held))
            .buffer_unordered(self.app.settings.dispatch.concurrency)
            .collect::<Vec<Settled>>();
        // While the batch is out, its claims are renewed: a slow provider must not let another
        // dispatcher take (and send again) messages that are still being sent.
        let settled = tokio::select! {
            settled = sending => settled,
            never = self.renew_claims(&ids) => match never {},
        };
        self.record(&settled).await?;
        Ok(Step::Settled(n))
    }

    /// Extends the lease of claimed messages every third of `dispatch.lease_secs`, until
    /// dropped. A failed renewal is logged; the lease then runs its course.
    async fn renew_claims(&self, ids: &[i64]) -> std::convert::Infallible {
        let lease = self.app.settings.dispatch.lease_secs;
        let every = Duration::from_millis((lease * 1000 / 3).max(100));
        loop {
            tokio::time::sleep(every).await;
            let renewed = sqlx::query(
                "update messages set claimed_until = now() + make_interval(secs => $2)
                 where id = any($1) and status = 'sending'",
            )
            .bind(ids)
            .bind(lease as f64)
            .execute(&self.app.pool)
            .await;
            if let Err(error) = renewed {
                warn!(%error, "Renewing message claims failed.");
            }
        }
    }

    async fn claim(&self) -> anyhow::Result<Vec<Claimed>> {
        let d = &self.app.settings.dispatch;
        let rows = sqlx::query(
            "with due as (
                 select id from messages
                 where (status = 'pending' and due_at <= $1)
                    or (status = 'sending' and claimed_until < now())
                 order by due_at
                 limit $2
                 for update skip locked
             )
             update messages m
             set status = 'sending', claimed_until = now() + make_interval(secs => $3),
                 attempts = m.attempts + 1
             from due, members mem
             where m.id = due.id and mem.member_id = m.member_id
             returning m.id, m.member_id, mem.timezone, m.attempts, m.trigger, m.channel, m.context,
                       mem.email, mem.phone, mem.first_name, mem.locale, mem.consent_email,
                       mem.consent_sms,
                       (select s.reason from suppressions s
                        where s.channel = m.channel
                          and s.address = case m.channel when 'email' then mem.email else mem.phone end
                       ) as suppressed",
        )
        .bind(self.app.clock.now())
        .bind(d.batch_size)
        .bind(d.lease_secs as f64)
        .fetch_all(&self.app.pool)
        .await
        .context("claiming due messages")?;
        Ok(rows
            .into_iter()
            .map(|r| Claimed {
                id: r.get("id"),
                member_id: r.get("member_id"),
                timezone: r.get("timezone"),
                attempt: r.get("attempts"),
                trigger: r.get("trigger"),
                channel: r.get("channel"),
                context: r.get("context"),
                email: r.get("email"),
                phone: r.get("phone"),
                first_name: r.get("first_name"),
                locale: r.get("locale"),
                consent_email: r.get("consent_email"),
                consent_sms: r.get("consent_sms"),
                suppressed: r.get("suppressed"),
            })
            .collect())
    }

    /// For each claimed message, when the frequency cap holds it back (and why): `cap` after
    /// the last marketing message sent to the member on the channel; a second marketing
    /// message for the same member and channel in this batch waits a minute and is looked at
    /// again once the first is settled.
    async fn capped(
        &self,
        claimed: &[Claimed],
    ) -> anyhow::Result<Vec<Option<(DateTime<Utc>, String)>>> {
        let hours = self.app.settings.dispatch.marketing_cap_hours;
        let marketing =
            |c: &Claimed| hours > 0 && Trigger::parse(&c.trigger).is_some_and(policy::is_marketing);
        let members: Vec<&str> = claimed
            .iter()
            .filter(|c| marketing(c))
            .map(|c| c.member_id.as_str())
            .collect();
        if members.is_empty() {
            return Ok(claimed.iter().map(|_| None).collect());
        }
        let rows: Vec<(String, String, Option<DateTime<Utc>>)> = sqlx::query_as(
            "select member_id, channel, max(sent_at) from messages
             where trigger in ('birthday', 'abandoned-cart') and status = 'sent'
               and member_id = any($1)
             group by member_id, channel",
        )
        .bind(&members)
        .fetch_all(&self.app.pool)
        .await
        .context("reading the last marketing sends")?;
        let last: std::collections::HashMap<(String, String), DateTime<Utc>> = rows
            .into_iter()
            .filter_map(|(m, c, at)| Some(((m, c), at?)))
            .collect();
        let now = self.app.clock.now();
        let cap = chrono::Duration::hours(i64::from(hours));
        let mut in_batch = std::collections::HashSet::new();
        Ok(claimed
            .iter()
            .map(|c| {
                if !marketing(c) {
                    return None;
                }
                let key = (c.member_id.clone(), c.channel.clone());
                if let Some(until) = policy::cap_until(last.get(&key).copied(), cap, now) {
                    return Some((
                        until,
                        format!("frequency cap: one marketing message per {hours} h"),
                    ));
                }
                if !in_batch.insert(key) {
                    return Some((
                        now + chrono::Duration::minutes(1),
                        "frequency cap: another marketing message is being sent".into(),
                    ));
                }
                None
            })
            .collect())
    }

    /// Decides and sends one claimed message; `held` is the frequency cap's deferral.
    async fn settle(&self, c: Claimed, held: Option<(DateTime<Utc>, String)>) -> Settled {
        let mut settled = Settled {
            id: c.id,
            status: "failed",
            recipient: None,
            provider: None,
            provider_ref: None,
            error: None,
            retry_at: None,
            uncounted: false,
            sent_at: None,
            attempts: Vec::new(),
        };
        let outgoing = match self.prepare(&c) {
            Ok(Ok(outgoing)) => outgoing,
            Ok(Err(suppressed)) => {
                debug!(
                    message_id = c.id,
                    reason = %suppressed,
                    "Message suppressed."
                );
                Metrics::inc(&self.app.metrics.messages_suppressed);
                settled.status = "suppressed";
                settled.error = Some(suppressed.into_owned());
                settled.attempts.push(Attempt {
                    provider: "policy",
                    outcome: "suppressed",
                    error: settled.error.clone(),
                    latency: Duration::ZERO,
                });
                return settled;
            }
            Err(error) => {
                let error = format!("{error:#}");
                warn!(message_id = c.id, error, "Message cannot be rendered.");
                Metrics::inc(&self.app.metrics.messages_failed);
                settled.error = Some(error);
                return settled;
            }
        };
        settled.recipient = Some(outgoing.to.clone());
        let quiet = match outgoing.channel {
            Channel::Sms => crate::domain::TimeZone::parse(&c.timezone)
                .ok()
                .and_then(|tz| {
                    let until = self
                        .app
                        .settings
                        .dispatch
                        .quiet_hours
                        .until(tz.tz(), self.app.clock.now())?;
                    Some((until, format!("quiet hours in {}", tz.name())))
                }),
            Channel::Email => None,
        };
        if let Some((until, reason)) = quiet.into_iter().chain(held).max_by_key(|(t, _)| *t) {
            debug!(message_id = c.id, until = %until, reason, "Message deferred.");
            settled.status = "pending";
            settled.uncounted = true;
            settled.retry_at = Some(until);
            settled.error = Some(format!("deferred: {reason}"));
            return settled;
        }
        let providers = match outgoing.channel {
            Channel::Email => &self.email_providers,
            Channel::Sms => &self.sms_providers,
        };
        // Providers in order: the next one is tried after a failure that happened before the
        // provider took the message; an unsure failure (a timeout after the request went out)
        // stops here, and the message is retried later rather than risk a second copy.
        let mut last_failure: Option<Failure> = None;
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
            if let Some(limit) = &slot.limit {
                limit.acquire().await;
            }
            let started = Instant::now();
            let result = tokio::time::timeout(
                self.app.settings.dispatch.send_timeout(),
                provider.send(&outgoing),
            )
            .await
            .unwrap_or_else(|_| {
                Err(Failure::unsure(format!(
                    "{}: no answer within {} ms",
                    provider.name(),
                    self.app.settings.dispatch.send_timeout_ms
                )))
            });
            let latency = started.elapsed();
            match result {
                Ok(accepted) => {
                    slot.breaker.success();
                    settled.attempts.push(Attempt {
                        provider: provider.name(),
                        outcome: "sent",
                        error: None,
                        latency,
                    });
                    settled.status = "sent";
                    settled.sent_at = Some(self.app.clock.now());
                    settled.provider = Some(provider.name().to_owned());
                    settled.provider_ref = Some(accepted.reference);
                    Metrics::inc(&self.app.metrics.messages_sent);
                    debug!(
                        message_id = c.id,
                        provider = provider.name(),
                        to = outgoing.masked_to(),
                        "Message sent."
                    );
                    return settled;
                }
                Err(failure) => {
                    let outcome = if failure.is_permanent() {
                        slot.breaker.neutral();
                        "permanent"
                    } else {
                        slot.breaker.failure();
                        any_transient = true;
                        "transient"
                    };
                    warn!(message_id = c.id, provider = provider.name(), to = outgoing.masked_to(), error = %failure, "Provider failed.");
                    settled.attempts.push(Attempt {
                        provider: provider.name(),
                        outcome,
                        error: Some(failure.to_string()),
                        latency,
                    });
                    if failure.rejects_recipient() {
                        // The server refused this address for good: no more mail to it.
                        let reason = format!("bounced: {failure}");
                        if let Err(e) = crate::suppress::suppress(
                            &self.app.pool,
                            outgoing.channel,
                            &outgoing.to,
                            &reason,
                            provider.name(),
                        )
                        .await
                        {
                            warn!(message_id = c.id, error = %e, "Recording a bounce failed.");
                        }
                    }
                    let unsure = failure.is_unsure();
                    last_failure = Some(failure);
                    if unsure {
                        break;
                    }
                }
            }
        }
        let d = &self.app.settings.dispatch;
        let Some(failure) = last_failure else {
            // Every provider's circuit is open: wait for a cooldown, without using an attempt.
            settled.status = "pending";
            settled.uncounted = true;
            settled.error = Some("every provider of the channel is paused (circuit open)".into());
            settled.retry_at = Some(
                self.app.clock.now()
                    + chrono::Duration::from_std(d.breaker_cooldown()).unwrap_or_default(),
            );
            return settled;
        };
        settled.provider = settled.attempts.last().map(|a| a.provider.to_owned());
        settled.error = Some(failure.to_string());
        if !any_transient || c.attempt >= d.max_attempts {
            Metrics::inc(&self.app.metrics.messages_failed);
            settled.status = "failed";
        } else {
            Metrics::inc(&self.app.metrics.messages_retried);
            let backoff = Duration::from_millis(
                d.retry_base_ms
                    .saturating_mul(1 << (c.attempt - 1).clamp(0, 16)),
            );
            // Exponential backoff with jitter, and never sooner than the provider asked
            // (Retry-After; a date already past asks for nothing).
            let jittered = backoff.mul_f64(0.5 + rand::random::<f64>() / 2.0);
            let delay = failure
                .retry_after()
                .map_or(jittered, |asked| asked.max(jittered));
            settled.status = "pending";
            settled.retry_at =
                Some(self.app.clock.now() + chrono::Duration::from_std(delay).unwrap_or_default());
        }
        settled
    }

    /// Builds the outgoing message, or says why it must not be sent (`Ok(Err(reason))`).
    fn prepare(
        &self,
        c: &Claimed,
    ) -> anyhow::Result<Result<Outgoing, std::borrow::Cow<'static, str>>> {
        let trigger = Trigger::parse(&c.trigger)
            .with_context(|| format!("unknown trigger {:?}", c.trigger))?;
        let channel = Channel::parse(&c.channel)?;
        let locale = Locale::parse(&c.locale)?;
        let locale = self.templates.resolve_locale(trigger, &locale).to_owned();
        let mut context = c.context.clone();
        if let Value::Object(map) = &mut context {
            map.insert(
                "shop_name".into(),
                Value::String(self.app.settings.shop_name.clone()),
            );
            // The helpers format money, points and dates for it.
            map.insert("locale".into(), Value::String(locale.clone()));
            map.insert(
                "shop_address".into(),
                Value::String(self.app.settings.shop_address.clone().unwrap_or_default()),
            );
        }
        let (to, content) = match channel {
            Channel::Email => {
                let Some(address) = c.email.as_deref() else {
                    return Ok(Err("no email address".into()));
                };
                if !c.consent_email {
                    return Ok(Err("no consent for email".into()));
                }
                if let Some(reason) = &c.suppressed {
                    return Ok(Err(format!("suppressed: {reason}").into()));
                }
                let to = Email::parse(address)?;
                let member = crate::domain::MemberId::parse(&c.member_id)?;
                let unsubscribe_url = format!(
                    "{}/unsubscribe/{}",
                    self.app.settings.public_url.as_str().trim_end_matches('/'),
                    self.app.tokens.issue(&member)
                );
                if let Value::Object(map) = &mut context {
                    map.insert("unsubscribe_url".into(), unsubscribe_url.clone().into());
                }
                let rendered = self.templates.render_email(trigger, &locale, &context)?;
                // The MIME form is composed only by the providers that send it (smtp, file).
                let content = Content::Email {
                    rendered,
                    from: self.app.settings.from.clone(),
                    first_name: c.first_name.clone(),
                    list_unsubscribe: email::list_unsubscribe(
                        &unsubscribe_url,
                        self.app.settings.unsubscribe_mailto.as_deref(),
                    ),
                };
                (to.to_string(), content)
            }
            Channel::Sms => {
                let Some(number) = c.phone.as_deref() else {
                    return Ok(Err("no phone number".into()));
                };
                if !c.consent_sms {
                    return Ok(Err("no consent for SMS".into()));
                }
                if let Some(reason) = &c.suppressed {
                    return Ok(Err(format!("suppressed: {reason}").into()));
                }
                let to = Phone::parse(number)?;
                (
                    to.to_string(),
                    Content::Sms {
                        body: self.templates.render_sms(trigger, &locale, &context)?,
                    },
                )
            }
        };
        Ok(Ok(Outgoing {
            message_id: c.id,
            trigger,
            channel,
            locale,
            to,
            content,
        }))
    }

    /// Writes the outcome of a batch: message states and every attempt, one statement each.
    async fn record(&self, settled: &[Settled]) -> anyhow::Result<()> {
        let mut tx = self.app.pool.begin().await?;
        let ids: Vec<i64> = settled.iter().map(|s| s.id).collect();
        let statuses: Vec<&str> = settled.iter().map(|s| s.status).collect();
        let recipients: Vec<Option<&str>> =
            settled.iter().map(|s| s.recipient.as_deref()).collect();
        let providers: Vec<Option<&str>> = settled.iter().map(|s| s.provider.as_deref()).collect();
        let refs: Vec<Option<&str>> = settled.iter().map(|s| s.provider_ref.as_deref()).collect();
        let errors: Vec<Option<&str>> = settled.iter().map(|s| s.error.as_deref()).collect();
        let retry_at: Vec<Option<DateTime<Utc>>> = settled.iter().map(|s| s.retry_at).collect();
        let uncounted: Vec<bool> = settled.iter().map(|s| s.uncounted).collect();
        let sent_at: Vec<Option<DateTime<Utc>>> = settled.iter().map(|s| s.sent_at).collect();
        sqlx::query(
            "update messages m
             set status = r.status, claimed_until = null, recipient = coalesce(r.recipient, m.recipient),
                 provider = r.provider, provider_ref = r.ref, last_error = r.error,
                 due_at = coalesce(r.retry_at, m.due_at),
                 attempts = m.attempts - case when r.uncounted then 1 else 0 end,
                 sent_at = coalesce(r.sent_at, m.sent_at),
                 finished_at = case when r.status = 'pending' then null else now() end
             from unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                         $7::timestamptz[], $8::bool[], $9::timestamptz[])
                  as r(id, status, recipient, provider, ref, error, retry_at, uncounted, sent_at)
             where m.id = r.id and m.status = 'sending'",
        )
        .bind(&ids)
        .bind(&statuses)
        .bind(&recipients)
        .bind(&providers)
        .bind(&refs)
        .bind(&errors)
        .bind(&retry_at)
        .bind(&uncounted)
        .bind(&sent_at)
        .execute(&mut *tx)
        .await
        .context("recording message states")?;

        // Attempts of one claim (one per provider tried) share the claim's number.
        let attempts: Vec<(i64, &Attempt)> = settled
            .iter()
            .flat_map(|s| s.attempts.iter().map(move |a| (s.id, a)))
            .collect();
        if !attempts.is_empty() {
            let message_ids: Vec<i64> = attempts.iter().map(|(id, _)| *id).collect();
            let names: Vec<&str> = attempts.iter().map(|(_, a)| a.provider).collect();
            let outcomes: Vec<&str> = attempts.iter().map(|(_, a)| a.outcome).collect();
            let errors: Vec<Option<&str>> =
                attempts.iter().map(|(_, a)| a.error.as_deref()).collect();
            let latencies: Vec<i32> = attempts
                .iter()
                .map(|(_, a)| a.latency.as_millis().min(i32::MAX as u128) as i32)
                .collect();
            sqlx::query(
                "insert into delivery_attempts (message_id, attempt, provider, outcome, error, latency_ms)
                 select r.id, m.attempts, r.provider, r.outcome, r.error, r.latency
                 from unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::int[])
                      with ordinality as r(id, provider, outcome, error, latency, n)
                 join messages m on m.id = r.id
                 order by r.n",
            )
            .bind(&message_ids)
            .bind(&names)
            .bind(&outcomes)
            .bind(&errors)
            .bind(&latencies)
            .execute(&mut *tx)
            .await
            .context("recording delivery attempts")?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// Puts failed messages back in the queue (ops, after fixing what made them fail): those of
/// `ids`, or every failed one when `ids` is `None`. They are due at `now` with their attempts
/// counted afresh; the earlier attempts stay recorded. Returns how many.
pub async fn retry_failed(
    pool: &sqlx::PgPool,
    ids: Option<&[i64]>,
    now: DateTime<Utc>,
) -> anyhow::Result<u64> {
    let done = sqlx::query(
        "update messages set status = 'pending', due_at = $2, attempts = 0, finished_at = null,
                claimed_until = null
         where status = 'failed' and ($1::bigint[] is null or id = any($1))",
    )
    .bind(ids)
    .bind(now)
    .execute(pool)
    .await
    .context("requeueing failed messages")?;
    Ok(done.rows_affected())
}
