//! Claiming due messages and renewing the claims while they are out.

use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;

use crate::domain::{Channel, Locale, TimeZone, Trigger};

/// A claimed message with what is needed to send it, its stored names parsed once.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// Outbox id.
    pub id: i64,
    /// The member it is for (empty for a test send to a typed address).
    pub member_id: String,
    /// The member's zone (quiet hours); none when the stored name does not parse, which the
    /// ledger never stores (such a message has no quiet hours, as before zones were parsed
    /// here).
    pub timezone: Option<TimeZone>,
    /// This claim's attempt number (1 for the first).
    pub attempt: i32,
    /// The trigger.
    pub trigger: Trigger,
    /// The channel.
    pub channel: Channel,
    /// The trigger's template variables.
    pub context: Value,
    /// The member's current address.
    pub email: Option<String>,
    /// The member's current number.
    pub phone: Option<String>,
    /// The member's first name.
    pub first_name: Option<String>,
    /// The locale asked for: a test send's, else the member's.
    pub locale: Locale,
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
    /// A test send's locale (it may be sent to no member), exactly as its pair is stored.
    pub test_locale: Option<String>,
    /// A test send's explicit recipient (an address or number), instead of the member's.
    pub test_to: Option<String>,
    /// When it was planned (database time).
    pub created_at: DateTime<Utc>,
}

/// A claimed message whose stored names do not parse (a trigger this release does not know,
/// a channel or locale written by hand): it cannot be sent, and the dispatcher fails it.
#[derive(Debug, Clone)]
pub struct Unreadable {
    /// Outbox id.
    pub id: i64,
    /// Its trigger, as stored.
    pub trigger: String,
    /// What does not parse.
    pub reason: String,
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
pub const CLAIM: &str = include_str!("claim.sql");

/// Claims up to `limit` messages due by `now` for `owner`, for `lease`. Messages whose
/// earlier claim lapsed are claimed too, and that lost claim is recorded as an unsure attempt.
#[tracing::instrument(name = "claim", skip_all, fields(claimed = tracing::field::Empty))]
pub async fn claim(
    pool: &PgPool,
    owner: &str,
    now: DateTime<Utc>,
    limit: i64,
    lease: Duration,
) -> anyhow::Result<Vec<Result<Claimed, Unreadable>>> {
    let mut tx = crate::db::begin_keyed(pool).await?;
    let rows = sqlx::query_file!(
        "src/outbox/claim.sql",
        now,
        limit,
        lease.as_secs_f64(),
        owner
    )
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
        .map(|r| {
            let unreadable = |reason: String| Unreadable {
                id: r.id,
                trigger: r.trigger.clone(),
                reason,
            };
            let trigger = Trigger::parse(&r.trigger)
                .ok_or_else(|| unreadable(format!("unknown trigger {:?}", r.trigger)))?;
            let channel = Channel::parse(&r.channel).map_err(|e| unreadable(e.to_string()))?;
            let locale = Locale::parse(&r.locale)
                .map_err(|e| unreadable(format!("the message's locale: {e}")))?;
            let timezone = TimeZone::parse(&r.timezone).ok();
            Ok(Claimed {
                id: r.id,
                member_id: r.member_id,
                timezone,
                attempt: r.attempts,
                trigger,
                channel,
                context: r.context,
                email: r.email,
                phone: r.phone,
                first_name: r.first_name,
                locale,
                consent_email: r.consent_email,
                consent_sms: r.consent_sms,
                suppressed: r.suppressed,
                test: r.test,
                template_version: r.template_version,
                template_locale: r.template_locale,
                test_locale: r.test_locale,
                test_to: r.test_to,
                created_at: r.created_at,
            })
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
    let done = sqlx::query!(
        "update messages set claimed_until = now() + make_interval(secs => $3)
         where id = any($1) and claimed_by = $2 and status = 'sending'",
        ids,
        owner,
        lease.as_secs_f64()
    )
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}
