//! The marketing cap's reservations: one row per (member, channel) in `marketing_caps`.

use anyhow::Context;
use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::domain::Channel;

/// Takes the marketing cap of (member, channel) for message `id` until `until`, if it is free
/// by `now` (or already this message's). `Err(until)`: held by another message until then.
///
/// The reservation is one row per (member, channel), taken under its row lock, so two
/// dispatchers can never both send a marketing message inside one cap window.
pub(crate) async fn reserve_cap(
    pool: &PgPool,
    member: &str,
    channel: Channel,
    id: i64,
    now: DateTime<Utc>,
    until: DateTime<Utc>,
) -> anyhow::Result<Result<(), DateTime<Utc>>> {
    let taken = sqlx::query_scalar!(
        "insert into marketing_caps (member_id, channel, message_id, until)
         values ($1, $2, $3, $5)
         on conflict (member_id, channel) do update
             set message_id = excluded.message_id, until = excluded.until
             where marketing_caps.until <= $4 or marketing_caps.message_id = excluded.message_id
         returning message_id",
        member,
        channel.as_str(),
        id,
        now,
        until
    )
    .fetch_optional(pool)
    .await
    .context("reserving the marketing cap")?;
    if taken.is_some() {
        return Ok(Ok(()));
    }
    let held = sqlx::query_scalar!(
        "select until from marketing_caps where member_id = $1 and channel = $2",
        member,
        channel.as_str()
    )
    .fetch_one(pool)
    .await
    .context("reading the marketing cap")?;
    Ok(Err(held))
}

/// Gives back the cap message `id` reserved but did not use (it was not sent): free from
/// `now`. The reservation was only made when the cap had run out, so nothing earlier is lost.
pub(crate) async fn release_cap(pool: &PgPool, id: i64, now: DateTime<Utc>) -> anyhow::Result<()> {
    sqlx::query!(
        "update marketing_caps set until = least(until, $2) where message_id = $1",
        id,
        now
    )
    .execute(pool)
    .await
    .context("releasing the marketing cap")?;
    Ok(())
}
