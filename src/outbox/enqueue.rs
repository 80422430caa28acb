//! Putting messages in the outbox: the ones planning decided on, and test sends.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgConnection;

use crate::domain::{Channel, Trigger};

/// A message planning decided on, for one member.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Planned<'a> {
    /// The occurrence's key: a key already in the outbox, or retired by retention, is skipped.
    pub dedupe_key: &'a str,
    /// The member.
    pub member_id: &'a str,
    /// The trigger.
    pub trigger: Trigger,
    /// The channel.
    pub channel: Channel,
    /// The trigger's template variables.
    pub context: &'a Value,
    /// When it may go.
    pub due_at: DateTime<Utc>,
    /// When what planned it happened (business time).
    pub event_at: DateTime<Utc>,
}

/// A message newly in the outbox.
#[derive(Debug, Clone)]
pub(crate) struct Enqueued {
    /// Outbox id.
    pub id: i64,
    /// Its key.
    pub dedupe_key: String,
    /// Its trigger's name.
    pub trigger: String,
}

/// Inserts planned messages inside the caller's transaction, skipping every key the outbox
/// has or had; returns those inserted.
pub(crate) async fn enqueue(
    conn: &mut PgConnection,
    planned: &[Planned<'_>],
) -> Result<Vec<Enqueued>, sqlx::Error> {
    let keys: Vec<&str> = planned.iter().map(|p| p.dedupe_key).collect();
    let members: Vec<&str> = planned.iter().map(|p| p.member_id).collect();
    let triggers: Vec<&str> = planned.iter().map(|p| p.trigger.as_str()).collect();
    let channels: Vec<&str> = planned.iter().map(|p| p.channel.as_str()).collect();
    let contexts: Vec<String> = planned.iter().map(|p| p.context.to_string()).collect();
    let due: Vec<DateTime<Utc>> = planned.iter().map(|p| p.due_at).collect();
    let happened: Vec<DateTime<Utc>> = planned.iter().map(|p| p.event_at).collect();
    sqlx::query_as!(
        Enqueued,
        "insert into messages (dedupe_key, member_id, trigger, channel, context, due_at, event_at)
         select k, m, t, c, x::jsonb, d, e
         from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[],
                     $7::timestamptz[])
              as p(k, m, t, c, x, d, e)
         -- a key whose message retention pruned was sent (or settled) before
         where not exists (select 1 from retired_keys r where r.dedupe_key = p.k)
         on conflict (dedupe_key) do nothing
         returning id, dedupe_key, trigger",
        &keys as &[&str],
        &members as &[&str],
        &triggers as &[&str],
        &channels as &[&str],
        &contexts,
        &due,
        &happened,
    )
    .fetch_all(conn)
    .await
}

/// A test send a marketer asked for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TestSend<'a> {
    /// Its own key: a test never takes the trigger's.
    pub dedupe_key: &'a str,
    /// The member whose data it renders with (empty for none).
    pub member_id: &'a str,
    /// The trigger.
    pub trigger: Trigger,
    /// The channel.
    pub channel: Channel,
    /// The template variables.
    pub context: &'a Value,
    /// Now.
    pub due_at: DateTime<Utc>,
    /// The version it renders.
    pub version: i32,
    /// The locale of that version's pair.
    pub locale: &'a str,
    /// A typed recipient instead of the member's.
    pub to: Option<&'a str>,
    /// Who asked.
    pub by: &'a str,
}

/// Test sends `user` queued in the last hour.
pub(crate) async fn test_sends_last_hour(
    conn: &mut PgConnection,
    user: &str,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(
        r#"select count(*) as "count!" from messages
           where test and test_by = $1 and created_at > now() - interval '1 hour'"#,
        user
    )
    .fetch_one(conn)
    .await
}

/// Inserts test sends inside the caller's transaction; returns their ids.
pub(crate) async fn enqueue_tests(
    conn: &mut PgConnection,
    sends: &[TestSend<'_>],
) -> Result<Vec<i64>, sqlx::Error> {
    let mut ids = Vec::with_capacity(sends.len());
    for s in sends {
        let id = sqlx::query_scalar!(
            "insert into messages (dedupe_key, member_id, trigger, channel, context, due_at,
                                   test, template_version, test_locale, test_to, test_by)
             values ($1, $2, $3, $4, $5, $6, true, $7, $8, $9, $10)
             returning id",
            s.dedupe_key,
            s.member_id,
            s.trigger.as_str(),
            s.channel.as_str(),
            s.context,
            s.due_at,
            s.version,
            s.locale,
            s.to,
            s.by,
        )
        .fetch_one(&mut *conn)
        .await?;
        ids.push(id);
    }
    Ok(ids)
}
