//! What other parts change in or read from the outbox beside sending: cancelled cart messages,
//! coupon codes, Twilio's delivery status, retention, the queue counts, and the address an
//! unsubscribe link was sent to.

use std::collections::BTreeMap;

use sqlx::{PgConnection, PgPool};

/// Cancels messages of these keys that have not been claimed yet (the cart changed).
pub(crate) async fn cancel_pending(
    conn: &mut PgConnection,
    keys: &[String],
) -> Result<(), sqlx::Error> {
    if keys.is_empty() {
        return Ok(());
    }
    sqlx::query!(
        "update messages set status = 'cancelled', finished_at = now(),
                last_error = 'the cart changed before the message went'
         where dedupe_key = any($1) and status = 'pending'",
        keys
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Adds each message's coupon code to its template variables (`coupon_code`).
pub(crate) async fn set_coupon_codes(
    conn: &mut PgConnection,
    ids: &[i64],
    codes: &[&str],
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "update messages m
         set context = m.context || jsonb_build_object('coupon_code', x.code)
         from unnest($1::bigint[], $2::text[]) as x(id, code)
         where m.id = x.id",
        ids,
        codes as &[&str]
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Records the delivery status Twilio reported for its message `sid`.
pub(crate) async fn set_provider_status(
    pool: &PgPool,
    sid: &str,
    status: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "update messages set provider_status = $2 where provider = 'twilio' and provider_ref = $1",
        sid,
        status
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Deletes one page of delivery attempts older than `days`; returns how many.
pub(crate) async fn prune_attempts(
    pool: &PgPool,
    days: i32,
    page: i64,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query!(
        "delete from delivery_attempts where id in (
             select id from delivery_attempts
             where at < now() - make_interval(days => $1) limit $2)",
        days,
        page
    )
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Deletes one page of messages finished more than `days` ago, with their attempts; their keys
/// stay in `retired_keys`, so a pruned message can never be planned again. Returns how many.
pub(crate) async fn prune_messages(
    pool: &PgPool,
    days: i32,
    page: i64,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query!(
        "with old as (
             select id, dedupe_key from messages
             where status in ('sent', 'suppressed', 'cancelled', 'failed', 'held_out')
               and created_at < now() - make_interval(days => $1)
               and finished_at < now() - make_interval(days => $1)
             limit $2
             for update skip locked
         ), kept as (
             insert into retired_keys (dedupe_key) select dedupe_key from old
             on conflict do nothing
         ), attempts as (
             delete from delivery_attempts where message_id in (select id from old)
         )
         delete from messages where id in (select id from old)",
        days,
        page
    )
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Pending messages that are due now: what a dispatcher would claim at once, unlike those
/// waiting for their time (quiet hours, a retry's backoff). Autoscalers scale dispatch on it.
pub(crate) async fn due(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(
        r#"select count(*) as "count!" from messages
           where status = 'pending' and due_at <= now()"#
    )
    .fetch_one(pool)
    .await
}

/// Messages pending, sending and failed, each counted (zero when there are none).
pub(crate) async fn counts(pool: &PgPool) -> Result<BTreeMap<String, i64>, sqlx::Error> {
    let rows = sqlx::query!(
        r#"select status, count(*) as "count!" from messages
           where status in ('pending', 'sending', 'failed') group by status"#
    )
    .fetch_all(pool)
    .await?;
    let mut counts: BTreeMap<String, i64> = ["pending", "sending", "failed"]
        .into_iter()
        .map(|s| (s.to_owned(), 0))
        .collect();
    counts.extend(rows.into_iter().map(|r| (r.status, r.count)));
    Ok(counts)
}

/// Provider calls in the last five minutes that were taken and that failed.
pub(crate) async fn recent_calls(pool: &PgPool) -> Result<(i64, i64), sqlx::Error> {
    let row = sqlx::query!(
        r#"select count(*) filter (where outcome = 'sent') as "sent!",
                  count(*) filter (where outcome in ('transient', 'permanent', 'unsure'))
                      as "failed!"
           from delivery_attempts where at > now() - interval '5 minutes'"#
    )
    .fetch_one(pool)
    .await?;
    Ok((row.sent, row.failed))
}

/// The member an unsubscribe link names, the address that message `message_id` went to (else
/// the member's address now), and the member's locale; `None` for a member no longer known.
pub(crate) async fn unsubscribed_address(
    pool: &PgPool,
    member: &str,
    message_id: Option<i64>,
) -> Result<Option<(String, Option<String>, String)>, sqlx::Error> {
    let row = sqlx::query!(
        r#"select mem.member_id, coalesce(msg.recipient, mem.email) as "email?", mem.locale
           from members mem
           left join messages msg
                  on msg.id = $2 and msg.member_id = mem.member_id and msg.channel = 'email'
           where mem.member_id = $1"#,
        member,
        message_id
    )
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| (r.member_id, r.email, r.locale)))
}
