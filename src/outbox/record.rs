//! Recording what became of claimed messages: their states and every provider call.

use std::borrow::Cow;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};

use super::Status;
use crate::notifications::{MessageOutcome, Notice, Sinks};

/// How a claimed message was settled.
#[derive(Debug, Clone)]
pub struct Settled {
    /// Outbox id.
    pub id: i64,
    /// The new status: sent, suppressed, failed, held out (the trigger's control group: not
    /// sent, `sent_at` when it would have been), or pending (to be tried again).
    pub status: Status,
    /// The address or number it went to.
    pub recipient: Option<String>,
    /// The provider that took it, or the last one tried.
    pub provider: Option<String>,
    /// The provider's reference.
    pub provider_ref: Option<String>,
    /// Why it is not sent (yet).
    pub error: Option<String>,
    /// For a message going back to `pending`: when to try again.
    pub retry_at: Option<DateTime<Utc>>,
    /// No provider was called (deferred, or every circuit open): the claim does not count as
    /// an attempt.
    pub uncounted: bool,
    /// Business time at which a provider took it.
    pub sent_at: Option<DateTime<Utc>>,
    /// Every provider call of this claim.
    pub attempts: Vec<Attempt>,
    /// The template version it was rendered with, and the locale of that version's pair.
    pub template: Option<(i32, String)>,
}

impl Settled {
    /// A settlement of message `id` still to be filled in: failed, with nothing tried.
    pub fn new(id: i64) -> Settled {
        Settled {
            id,
            status: Status::Failed,
            recipient: None,
            provider: None,
            provider_ref: None,
            error: None,
            retry_at: None,
            uncounted: false,
            sent_at: None,
            attempts: Vec::new(),
            template: None,
        }
    }

    /// This message deferred to `until` for `reason`: pending again, and the claim does not
    /// count as an attempt.
    pub(crate) fn deferred(mut self, until: DateTime<Utc>, reason: String) -> Settled {
        self.status = Status::Pending;
        self.uncounted = true;
        self.retry_at = Some(until);
        self.error = Some(format!("deferred: {reason}"));
        self
    }
}

/// One provider call, as recorded in `delivery_attempts`.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// The provider's name (`policy` for a suppression).
    pub provider: &'static str,
    /// `sent`, `transient`, `permanent`, `unsure` or `suppressed`.
    pub outcome: &'static str,
    /// The failure, masked.
    pub error: Option<String>,
    /// How long the call took.
    pub latency: Duration,
}

/// Writes the results of `owner`'s claims in one transaction: message states (only where the
/// claim is still `owner`'s), every attempt (always: an attempt happened, whoever holds the
/// message now), and a notification of each message settled for good. Returns the ids whose
/// claim had been taken over by another dispatcher.
pub async fn record(
    pool: &PgPool,
    sinks: Sinks,
    owner: &str,
    settled: &[Settled],
) -> anyhow::Result<Vec<i64>> {
    let mut tx = crate::db::begin_keyed(pool).await?;
    let updated = write_states(&mut tx, owner, settled).await?;
    write_attempts(&mut tx, settled).await?;
    let notices: Vec<Notice> = updated
        .iter()
        .filter_map(|m| {
            Notice::message(&MessageOutcome {
                message_id: m.id,
                member_id: &m.member_id,
                status: &m.status,
                trigger: &m.trigger,
                channel: &m.channel,
                provider: m.provider.as_deref(),
                reason: m.last_error.as_deref(),
                test: m.test,
            })
        })
        .collect();
    crate::notifications::record(&mut tx, sinks, &notices)
        .await
        .context("recording notifications")?;
    tx.commit().await?;
    let updated: std::collections::HashSet<i64> = updated.into_iter().map(|m| m.id).collect();
    Ok(settled
        .iter()
        .map(|s| s.id)
        .filter(|id| !updated.contains(id))
        .collect())
}

/// A message as `write_states` left it.
struct Written {
    id: i64,
    member_id: String,
    status: String,
    trigger: String,
    channel: String,
    provider: Option<String>,
    last_error: Option<String>,
    test: bool,
}

/// Writes the messages' new states where the claim is still `owner`'s; returns the messages
/// written.
async fn write_states(
    tx: &mut PgConnection,
    owner: &str,
    settled: &[Settled],
) -> anyhow::Result<Vec<Written>> {
    let ids: Vec<i64> = settled.iter().map(|s| s.id).collect();
    let statuses: Vec<&str> = settled.iter().map(|s| s.status.as_str()).collect();
    let recipients: Vec<Option<&str>> = settled.iter().map(|s| s.recipient.as_deref()).collect();
    let providers: Vec<Option<&str>> = settled.iter().map(|s| s.provider.as_deref()).collect();
    // PostgreSQL's text refuses NUL: whatever slipped past the cleaning of partners' replies
    // must not make the whole write fail.
    let refs: Vec<Option<Cow<str>>> = settled.iter().map(|s| storable(&s.provider_ref)).collect();
    let refs: Vec<Option<&str>> = refs.iter().map(Option::as_deref).collect();
    let errors: Vec<Option<Cow<str>>> = settled.iter().map(|s| storable(&s.error)).collect();
    let errors: Vec<Option<&str>> = errors.iter().map(Option::as_deref).collect();
    let locales: Vec<Option<&str>> = settled
        .iter()
        .map(|s| s.template.as_ref().map(|(_, locale)| locale.as_str()))
        .collect();
    let retry_at: Vec<Option<DateTime<Utc>>> = settled.iter().map(|s| s.retry_at).collect();
    let uncounted: Vec<bool> = settled.iter().map(|s| s.uncounted).collect();
    let sent_at: Vec<Option<DateTime<Utc>>> = settled.iter().map(|s| s.sent_at).collect();
    let versions: Vec<Option<i32>> = settled
        .iter()
        .map(|s| s.template.as_ref().map(|(version, _)| *version))
        .collect();
    let updated = sqlx::query_as!(
        Written,
        "update messages m
         set status = r.status, claimed_until = null, claimed_by = null,
             recipient = coalesce(r.recipient, m.recipient),
             provider = r.provider, provider_ref = r.ref, last_error = r.error,
             due_at = coalesce(r.retry_at, m.due_at),
             attempts = m.attempts - case when r.uncounted then 1 else 0 end,
             sent_at = coalesce(r.sent_at, m.sent_at),
             template_version = coalesce(r.version, m.template_version),
             template_locale = coalesce(r.locale, m.template_locale),
             finished_at = case when r.status = 'pending' then null else now() end
         from unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::timestamptz[], $8::bool[], $9::timestamptz[], $11::int[], $12::text[])
              as r(id, status, recipient, provider, ref, error, retry_at, uncounted, sent_at,
                   version, locale)
         where m.id = r.id and m.status = 'sending' and m.claimed_by = $10
         returning m.id, m.member_id, m.status, m.trigger, m.channel, m.provider, m.last_error,
                   m.test",
        &ids,
        &statuses as &[&str],
        &recipients as &[Option<&str>],
        &providers as &[Option<&str>],
        &refs as &[Option<&str>],
        &errors as &[Option<&str>],
        &retry_at as &[Option<DateTime<Utc>>],
        &uncounted,
        &sent_at as &[Option<DateTime<Utc>>],
        owner,
        &versions as &[Option<i32>],
        &locales as &[Option<&str>],
    )
    .fetch_all(tx)
    .await
    .context("recording message states")?;
    Ok(updated)
}

/// Writes every provider call of these claims: attempts of one claim (one per provider
/// tried) share the claim's number.
async fn write_attempts(tx: &mut PgConnection, settled: &[Settled]) -> anyhow::Result<()> {
    let attempts: Vec<(i64, &Attempt)> = settled
        .iter()
        .flat_map(|s| s.attempts.iter().map(move |a| (s.id, a)))
        .collect();
    if attempts.is_empty() {
        return Ok(());
    }
    let message_ids: Vec<i64> = attempts.iter().map(|(id, _)| *id).collect();
    let names: Vec<&str> = attempts.iter().map(|(_, a)| a.provider).collect();
    let outcomes: Vec<&str> = attempts.iter().map(|(_, a)| a.outcome).collect();
    let errors: Vec<Option<Cow<str>>> = attempts.iter().map(|(_, a)| storable(&a.error)).collect();
    let errors: Vec<Option<&str>> = errors.iter().map(Option::as_deref).collect();
    let latencies: Vec<i32> = attempts
        .iter()
        .map(|(_, a)| a.latency.as_millis().min(i32::MAX as u128) as i32)
        .collect();
    sqlx::query!(
        "insert into delivery_attempts (message_id, attempt, provider, outcome, error, latency_ms)
         select r.id, m.attempts, r.provider, r.outcome, r.error, r.latency
         from unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::int[])
              with ordinality as r(id, provider, outcome, error, latency, n)
         join messages m on m.id = r.id
         order by r.n",
        &message_ids,
        &names as &[&str],
        &outcomes as &[&str],
        &errors as &[Option<&str>],
        &latencies,
    )
    .execute(tx)
    .await
    .context("recording delivery attempts")?;
    Ok(())
}

/// `text` as PostgreSQL's `text` takes it: without NUL characters.
fn storable(text: &Option<String>) -> Option<Cow<'_, str>> {
    text.as_deref().map(|t| {
        if t.contains('\0') {
            Cow::Owned(t.replace('\0', ""))
        } else {
            Cow::Borrowed(t)
        }
    })
}
