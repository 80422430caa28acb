//! The outbox's SQL: claiming due messages, renewing claims, recording results, requeueing
//! failed messages, and the marketing cap's reservations. Dispatch calls it; nothing here
//! decides what to send.
//!
//! A claim carries an owner token (one per dispatcher) and a lease in database time. Only the
//! owner renews or settles its claims, so a dispatcher whose lease lapsed (it stalled, or its
//! process died) cannot overwrite the work of the dispatcher that took the message over. A
//! message claimed again after its lease lapsed may have been sent by the lost owner (its
//! result was never recorded): the new claim records that earlier attempt as `unsure`, so
//! every possible duplicate is on record.

use std::borrow::Cow;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgPool, Row};

/// A claimed message with what is needed to send it.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// Outbox id.
    pub id: i64,
    /// The member it is for.
    pub member_id: String,
    /// The member's IANA zone (quiet hours).
    pub timezone: String,
    /// This claim's attempt number (1 for the first).
    pub attempt: i32,
    /// The trigger's name.
    pub trigger: String,
    /// `email` or `sms`.
    pub channel: String,
    /// The trigger's template variables.
    pub context: Value,
    /// The member's current address, number and name.
    pub email: Option<String>,
    /// The member's current number.
    pub phone: Option<String>,
    /// The member's first name.
    pub first_name: Option<String>,
    /// The member's locale.
    pub locale: String,
    /// Consent per channel, as of the claim.
    pub consent_email: bool,
    /// Consent for SMS.
    pub consent_sms: bool,
    /// Why the address of the message's channel is suppressed, if it is.
    pub suppressed: Option<String>,
    /// A test send (never the trigger's send; no cap, no quiet hours).
    pub test: bool,
    /// The template version it renders with, once fixed (a test send's from the start; any
    /// other's at its first render).
    pub template_version: Option<i32>,
    /// The locale of that version's pair (none for a test send, whose locale is
    /// `test_locale`, and for messages pinned before it was recorded).
    pub template_locale: Option<String>,
    /// A test send's locale (it may be sent to no member).
    pub test_locale: Option<String>,
    /// A test send's explicit recipient (an address or number), instead of the member's.
    pub test_to: Option<String>,
    /// When it was planned (database time).
    pub created_at: DateTime<Utc>,
}

/// How a claimed message was settled.
#[derive(Debug, Clone)]
pub struct Settled {
    /// Outbox id.
    pub id: i64,
    /// The new status: `sent`, `suppressed`, `failed`, `held_out` (the trigger's control group:
    /// not sent, `sent_at` when it would have been), or `pending` (to be tried again).
    pub status: &'static str,
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
            status: "failed",
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

/// The claim's statement (`claim` binds `now`, the limit, the lease in seconds and the
/// owner); public so that a test can read its plan.
///
/// Due messages and lapsed claims are both looked for only among messages due by `now` or by
/// the database's time, whichever is later, so that the scan of `messages_due` stops at the
/// first message due later. While lapsed claims were looked for at any due time, a claim that
/// found fewer messages than its limit read the whole index: every message scheduled for later
/// (abandoned carts, reminders), 3.7 ms a claim over 20,000 of them in a scratch database
/// against 0.15 ms for the range. A message is claimed only once it is due, so its lapsed
/// claim is still found; only a test clock moved back before its due time would leave it until
/// the clock passes that time again.
pub const CLAIM: &str = "with due as (
         select id, member_id, status = 'sending' as lapsed, attempts from messages
         where due_at <= greatest($1, now())
           and ((status = 'pending' and due_at <= $1)
                or (status = 'sending' and claimed_until < now()))
         order by due_at
         limit $2
         for update skip locked
     ), lost as (
         insert into delivery_attempts (message_id, attempt, provider, outcome, error, latency_ms)
         select id, attempts, 'unknown', 'unsure',
                'the dispatcher that claimed it stopped before recording a result; it may have been sent',
                0
         from due where lapsed
     )
     update messages m
     set status = 'sending', claimed_until = now() + make_interval(secs => $3),
         claimed_by = $4, attempts = m.attempts + 1
     -- a test send may be for no member
     from due left join members mem on mem.member_id = due.member_id
     where m.id = due.id and (mem.member_id is not null or m.test)
     returning m.id, m.member_id, coalesce(mem.timezone, 'UTC') as timezone, m.attempts,
               m.trigger, m.channel, m.context, mem.email, mem.phone, mem.first_name,
               coalesce(m.test_locale, mem.locale, 'en') as locale,
               coalesce(mem.consent_email, false) as consent_email,
               coalesce(mem.consent_sms, false) as consent_sms,
               (select s.reason from suppressions s
                where s.channel = m.channel
                  and s.address = coalesce(m.test_to,
                      case m.channel when 'email' then mem.email else mem.phone end)
               ) as suppressed,
               m.test, m.template_version, m.template_locale, m.test_locale, m.test_to,
               m.created_at";

/// Claims up to `limit` messages due by `now` for `owner`, for `lease`. Messages whose
/// earlier claim lapsed are claimed too, and that lost claim is recorded as an unsure attempt.
#[tracing::instrument(name = "claim", skip_all, fields(claimed = tracing::field::Empty))]
pub async fn claim(
    pool: &PgPool,
    owner: &str,
    now: DateTime<Utc>,
    limit: i64,
    lease: Duration,
) -> anyhow::Result<Vec<Claimed>> {
    let mut tx = crate::db::begin_keyed(pool).await?;
    let rows = sqlx::query(CLAIM)
        .bind(now)
        .bind(limit)
        .bind(lease.as_secs_f64())
        .bind(owner)
        .fetch_all(&mut *tx)
        .await
        .context("claiming due messages")?;
    tx.commit().await?;
    tracing::Span::current().record("claimed", rows.len());
    if !rows.is_empty() {
        tracing::debug!("Messages claimed.");
    }
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
            test: r.get("test"),
            template_version: r.get("template_version"),
            template_locale: r.get("template_locale"),
            test_locale: r.get("test_locale"),
            test_to: r.get("test_to"),
            created_at: r.get("created_at"),
        })
        .collect())
}

/// Extends `owner`'s claims on `ids` by `lease`; returns how many it still held.
pub async fn renew(
    pool: &PgPool,
    owner: &str,
    ids: &[i64],
    lease: Duration,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "update messages set claimed_until = now() + make_interval(secs => $3)
         where id = any($1) and claimed_by = $2 and status = 'sending'",
    )
    .bind(ids)
    .bind(owner)
    .bind(lease.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Writes the results of `owner`'s claims in one transaction: message states (only where the
/// claim is still `owner`'s) and every attempt (always: an attempt happened, whoever holds the
/// message now). Returns the ids whose claim had been taken over by another dispatcher.
pub async fn record(pool: &PgPool, owner: &str, settled: &[Settled]) -> anyhow::Result<Vec<i64>> {
    let mut tx = crate::db::begin_keyed(pool).await?;
    let ids: Vec<i64> = settled.iter().map(|s| s.id).collect();
    let statuses: Vec<&str> = settled.iter().map(|s| s.status).collect();
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
    let updated: Vec<i64> = sqlx::query_scalar(
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
         returning m.id",
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
    .bind(owner)
    .bind(&versions)
    .bind(&locales)
    .fetch_all(&mut *tx)
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
        let errors: Vec<Option<Cow<str>>> =
            attempts.iter().map(|(_, a)| storable(&a.error)).collect();
        let errors: Vec<Option<&str>> = errors.iter().map(Option::as_deref).collect();
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
    let updated: std::collections::HashSet<i64> = updated.into_iter().collect();
    Ok(ids.into_iter().filter(|id| !updated.contains(id)).collect())
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

/// Takes the marketing cap of (member, channel) for message `id` until `until`, if it is free
/// by `now` (or already this message's). `Err(until)`: held by another message until then.
///
/// The reservation is one row per (member, channel), taken under its row lock, so two
/// dispatchers can never both send a marketing message inside one cap window.
pub async fn reserve_cap(
    pool: &PgPool,
    member: &str,
    channel: &str,
    id: i64,
    now: DateTime<Utc>,
    until: DateTime<Utc>,
) -> anyhow::Result<Result<(), DateTime<Utc>>> {
    let taken: Option<i64> = sqlx::query_scalar(
        "insert into marketing_caps (member_id, channel, message_id, until)
         values ($1, $2, $3, $5)
         on conflict (member_id, channel) do update
             set message_id = excluded.message_id, until = excluded.until
             where marketing_caps.until <= $4 or marketing_caps.message_id = excluded.message_id
         returning message_id",
    )
    .bind(member)
    .bind(channel)
    .bind(id)
    .bind(now)
    .bind(until)
    .fetch_optional(pool)
    .await
    .context("reserving the marketing cap")?;
    if taken.is_some() {
        return Ok(Ok(()));
    }
    let held: DateTime<Utc> = sqlx::query_scalar(
        "select until from marketing_caps where member_id = $1 and channel = $2",
    )
    .bind(member)
    .bind(channel)
    .fetch_one(pool)
    .await
    .context("reading the marketing cap")?;
    Ok(Err(held))
}

/// Gives back the cap message `id` reserved but did not use (it was not sent): free from
/// `now`. The reservation was only made when the cap had run out, so nothing earlier is lost.
pub async fn release_cap(pool: &PgPool, id: i64, now: DateTime<Utc>) -> anyhow::Result<()> {
    sqlx::query("update marketing_caps set until = least(until, $2) where message_id = $1")
        .bind(id)
        .bind(now)
        .execute(pool)
        .await
        .context("releasing the marketing cap")?;
    Ok(())
}

/// Which messages a search or a bulk retry is about; every field left out matches all.
#[derive(
    Debug,
    Clone,
    Default,
    serde::Deserialize,
    serde::Serialize,
    utoipa::IntoParams,
    utoipa::ToSchema,
)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    /// One member's.
    pub member_id: Option<String>,
    /// One trigger's (`welcome` …).
    pub trigger: Option<String>,
    /// `email` or `sms`.
    pub channel: Option<String>,
    /// `pending`, `sending`, `sent`, `suppressed`, `cancelled`, `failed`.
    pub status: Option<String>,
    /// The provider that took it, or was tried last.
    pub provider: Option<String>,
    /// Planned at or after.
    pub since: Option<DateTime<Utc>>,
    /// Planned before.
    pub until: Option<DateTime<Utc>>,
    /// Test sends only (`true`) or none of them (`false`).
    pub test: Option<bool>,
}

/// The `where` clause of `Filter` over `messages`, its values bound as `$1` to `$8` in the
/// order of `Filter::bind`.
pub const FILTERED: &str = "($1::text is null or member_id = $1)
           and ($2::text is null or trigger = $2)
           and ($3::text is null or channel = $3)
           and ($4::text is null or status = $4)
           and ($5::text is null or provider = $5)
           and ($6::timestamptz is null or created_at >= $6)
           and ($7::timestamptz is null or created_at < $7)
           and ($8::bool is null or test = $8)";

impl Filter {
    /// Binds the filter's values to a statement using `FILTERED` (as `$1` to `$8`).
    pub fn bind<'q>(
        &'q self,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        query
            .bind(&self.member_id)
            .bind(&self.trigger)
            .bind(&self.channel)
            .bind(&self.status)
            .bind(&self.provider)
            .bind(self.since)
            .bind(self.until)
            .bind(self.test)
    }
}

/// Which failed messages to put back in the queue.
pub enum Requeue<'a> {
    /// These (those of them that are failed).
    Ids(&'a [i64]),
    /// Every failed one matching.
    Matching(&'a Filter),
}

/// Failed messages requeued per statement: a million failures go back in a thousand short
/// transactions, never in one long one, and no list of them is held in memory.
pub const RETRY_PAGE: i64 = 1_000;

/// Puts failed messages back in the queue (ops, after fixing what made them fail), a page at a
/// time. They are due at `now` with their attempts counted afresh; the earlier attempts stay
/// recorded. A retried message renders with the version published for its pair when it goes
/// (its pin is dropped: the failure may have been the template's); a test send keeps the
/// version it was asked for. Returns how many.
pub async fn retry_failed(
    pool: &PgPool,
    which: Requeue<'_>,
    now: DateTime<Utc>,
) -> anyhow::Result<u64> {
    let (ids, filter) = match which {
        Requeue::Ids(ids) => (Some(ids), Filter::default()),
        Requeue::Matching(filter) => (None, filter.clone()),
    };
    let sql = format!(
        "with page as (
             select id from messages
             where status = 'failed' and {FILTERED}
               and ($9::bigint[] is null or id = any($9)) and id > $10
             order by id limit $11
             for update skip locked
         )
         update messages m
         set status = 'pending', due_at = $12, attempts = 0, finished_at = null,
             claimed_until = null, claimed_by = null,
             template_version = case when m.test then m.template_version end,
             template_locale = case when m.test then m.template_locale end
         from page where m.id = page.id
         returning m.id"
    );
    let mut after = 0_i64;
    let mut requeued = 0_u64;
    loop {
        // Along the failed index from `after`, however stale the table's statistics: without
        // them (a million failures just now) the planner read every failed message and sorted
        // them for each page, 0.5 s a page instead of 25 ms.
        let mut tx = pool
            .begin_with(
                "begin; set local enable_seqscan = off; set local enable_bitmapscan = off;
                 set local enable_sort = off",
            )
            .await?;
        let page: Vec<i64> = filter
            .bind(sqlx::query(&sql))
            .bind(ids)
            .bind(after)
            .bind(RETRY_PAGE)
            .bind(now)
            .fetch_all(&mut *tx)
            .await
            .context("requeueing failed messages")?
            .iter()
            .map(|row| row.get(0))
            .collect();
        tx.commit().await?;
        requeued += page.len() as u64;
        match page.iter().max() {
            Some(last) if page.len() as i64 == RETRY_PAGE => after = *last,
            _ => return Ok(requeued),
        }
    }
}
