//! Searching messages: one `Filter` for the API, the console and `lifecycle deliveries`.

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::{PgPool, Row};

use super::Status;
use crate::domain::{Email, Phone};

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
    /// `pending`, `sending`, `sent`, `suppressed`, `cancelled`, `failed`, `held_out`.
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
pub(crate) const FILTERED: &str = "($1::text is null or member_id = $1)
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

/// A message in a list.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct Message {
    /// Outbox id.
    pub id: i64,
    /// The member (empty for a test send to a typed address).
    pub member_id: String,
    /// The trigger.
    pub trigger: String,
    /// `email` or `sms`.
    pub channel: String,
    /// Its state.
    pub status: super::Status,
    /// Where it went (masked unless the reader is ops).
    pub recipient: Option<String>,
    /// The provider that took it, or was tried last.
    pub provider: Option<String>,
    /// The provider's reference.
    pub provider_ref: Option<String>,
    /// Why it is not sent (yet).
    pub last_error: Option<String>,
    /// Provider calls so far.
    pub attempts: i32,
    /// A test send.
    pub test: bool,
    /// The template version it was rendered with.
    pub template_version: Option<i32>,
    /// When it was planned.
    pub created_at: DateTime<Utc>,
    /// When it was due (or is).
    pub due_at: DateTime<Utc>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
}

/// One provider call.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct Attempt {
    /// The claim's number.
    pub attempt: i32,
    /// The provider (`policy` for a suppression, `unknown` for a lost claim).
    pub provider: String,
    /// `sent`, `transient`, `permanent`, `unsure`, `suppressed`.
    pub outcome: String,
    /// The error, masked.
    pub error: Option<String>,
    /// How long the call took.
    pub latency_ms: i32,
    /// When.
    pub at: DateTime<Utc>,
}

/// Masks an address or number for a reader who may not see it.
pub(crate) fn mask(channel: &str, to: &str) -> String {
    match channel {
        "email" => Email::parse(to).map_or_else(|_| "***".into(), |e| e.masked()),
        _ => Phone::parse(to).map_or_else(|_| "***".into(), |p| p.masked()),
    }
}

const COLUMNS: &str = "id, member_id, trigger, channel, status, recipient, provider, provider_ref,
    last_error, attempts, test, template_version, created_at, due_at, finished_at";

/// Messages matching `filter`, newest first: `limit` of them with an id below `before`.
///
/// Built at run time, not checked at compile time: its `where` clause is `FILTERED`, shared
/// with the requeue of failed messages.
pub(crate) async fn search(
    pool: &PgPool,
    filter: &Filter,
    limit: i64,
    before: Option<i64>,
    reveal: bool,
) -> anyhow::Result<Vec<Message>> {
    let sql = format!(
        "select {COLUMNS} from messages
         where {FILTERED} and ($9::bigint is null or id < $9)
         order by id desc limit $10"
    );
    let rows = filter
        .bind(sqlx::query(&sql))
        .bind(before)
        .bind(limit)
        .fetch_all(pool)
        .await
        .context("searching messages")?;
    // A status this release does not know (written by a newer one) is an error, not a panic.
    rows.iter()
        .map(|r| {
            let channel: String = r.try_get("channel")?;
            let recipient: Option<String> = r.try_get("recipient")?;
            Ok(Message {
                id: r.try_get("id")?,
                member_id: r.try_get("member_id")?,
                trigger: r.try_get("trigger")?,
                recipient: recipient.map(|to| shown(&channel, to, reveal)),
                channel,
                status: r.try_get("status")?,
                provider: r.try_get("provider")?,
                provider_ref: r.try_get("provider_ref")?,
                last_error: r.try_get("last_error")?,
                attempts: r.try_get("attempts")?,
                test: r.try_get("test")?,
                template_version: r.try_get("template_version")?,
                created_at: r.try_get("created_at")?,
                due_at: r.try_get("due_at")?,
                finished_at: r.try_get("finished_at")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .context("reading the messages found")
}

/// An address as a reader sees it: whole for ops, masked for the others.
fn shown(channel: &str, to: String, reveal: bool) -> String {
    if reveal { to } else { mask(channel, &to) }
}

/// One message, with its template variables and the locale its version was pinned in.
pub(crate) async fn message(
    pool: &PgPool,
    id: i64,
    reveal: bool,
) -> anyhow::Result<Option<(Message, Value, Option<String>)>> {
    let row = sqlx::query!(
        r#"select id, member_id, trigger, channel, status as "status: Status", recipient,
                  provider, provider_ref,
                  last_error, attempts, test, template_version, created_at, due_at, finished_at,
                  context, coalesce(test_locale, template_locale) as pinned_locale
           from messages where id = $1"#,
        id
    )
    .fetch_optional(pool)
    .await
    .context("reading a message")?;
    Ok(row.map(|r| {
        let message = Message {
            id: r.id,
            member_id: r.member_id,
            trigger: r.trigger,
            recipient: r.recipient.map(|to| shown(&r.channel, to, reveal)),
            channel: r.channel,
            status: r.status,
            provider: r.provider,
            provider_ref: r.provider_ref,
            last_error: r.last_error,
            attempts: r.attempts,
            test: r.test,
            template_version: r.template_version,
            created_at: r.created_at,
            due_at: r.due_at,
            finished_at: r.finished_at,
        };
        (message, r.context, r.pinned_locale)
    }))
}

/// Every provider call of message `id`, oldest first.
pub(crate) async fn attempts_of(pool: &PgPool, id: i64) -> anyhow::Result<Vec<Attempt>> {
    sqlx::query_as!(
        Attempt,
        "select attempt, provider, outcome, error, latency_ms, at from delivery_attempts
         where message_id = $1 order by id",
        id
    )
    .fetch_all(pool)
    .await
    .context("reading a message's attempts")
}

/// One provider's calls over a window.
#[derive(Debug, Clone)]
pub(crate) struct ProviderCalls {
    /// The provider.
    pub provider: String,
    /// Calls it took.
    pub sent: i64,
    /// Calls that failed (transient, permanent or unsure).
    pub failed: i64,
    /// Median latency, ms.
    pub p50: Option<f64>,
    /// 95th percentile latency, ms.
    pub p95: Option<f64>,
}

/// Each provider's calls over the last `minutes` (policy decisions and lost claims aside).
pub(crate) async fn provider_calls(
    pool: &PgPool,
    minutes: i32,
) -> anyhow::Result<Vec<ProviderCalls>> {
    sqlx::query_as!(
        ProviderCalls,
        r#"select provider,
                  count(*) filter (where outcome = 'sent') as "sent!",
                  count(*) filter (where outcome in ('transient', 'permanent', 'unsure'))
                      as "failed!",
                  percentile_cont(0.5) within group (order by latency_ms) as p50,
                  percentile_cont(0.95) within group (order by latency_ms) as p95
           from delivery_attempts
           where at > now() - make_interval(mins => $1) and provider not in ('policy', 'unknown')
           group by provider"#,
        minutes
    )
    .fetch_all(pool)
    .await
    .context("reading provider health")
}

/// A recent message with its member's current address and number.
#[derive(Debug, Clone)]
pub(crate) struct Recent {
    /// Outbox id.
    pub id: i64,
    /// The trigger's name.
    pub trigger: String,
    /// The channel's name.
    pub channel: String,
    /// Its state.
    pub status: String,
    /// The provider that took it, or was tried last.
    pub provider: Option<String>,
    /// The provider's reference.
    pub provider_ref: Option<String>,
    /// Why it is not sent (yet).
    pub last_error: Option<String>,
    /// The member's address.
    pub email: Option<String>,
    /// The member's number.
    pub phone: Option<String>,
}

/// The `limit` newest messages of `members` (of everyone when `None`), newest first.
pub(crate) async fn recent_of_members(
    pool: &PgPool,
    members: Option<&[String]>,
    limit: i64,
) -> Result<Vec<Recent>, sqlx::Error> {
    sqlx::query_as!(
        Recent,
        "select m.id, m.trigger, m.channel, m.status, m.provider, m.provider_ref, m.last_error,
                mem.email, mem.phone
         from messages m join members mem using (member_id)
         where $1::text[] is null or m.member_id = any($1)
         order by m.id desc limit $2",
        members,
        limit
    )
    .fetch_all(pool)
    .await
}

/// Messages of `members` due by `now` and not yet settled.
pub(crate) async fn unsent_of(
    pool: &PgPool,
    now: DateTime<Utc>,
    members: &[String],
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(
        r#"select count(*) as "count!" from messages
           where status in ('pending', 'sending') and due_at <= $1 and member_id = any($2)"#,
        now,
        members
    )
    .fetch_one(pool)
    .await
}
