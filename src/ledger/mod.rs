//! Member state and every change to it, applied a batch of events per transaction.
//!
//! A batch runs as: take each member's lock (advisory, in key order, so two workers never
//! deadlock and a member not yet inserted is covered too); insert the event ids into the
//! inbox, keeping those that were new; load the members; apply the new events in memory in
//! delivery order (`apply`, pure); write back changed members and planned messages with one
//! statement each. The caller commits, then acks.

mod members;
pub mod points;

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

pub use members::Member;

use crate::domain::MemberId;
use crate::event::{Event, EventKind};
use crate::triggers::{self, Planned};

/// What became of one event in a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// State changed (or the event was recorded); `planned` messages were queued.
    Applied {
        /// Messages planned by the triggers (before outbox dedupe).
        planned: usize,
    },
    /// The event id was applied before; nothing changed.
    Duplicate,
    /// Valid but early (its prerequisite has not arrived): try again later.
    Deferred(String),
    /// Valid JSON but refused by the ledger: dead-letter with this reason.
    Rejected(String),
}

/// The verdict of applying one event in memory (returned once and matched at once, so the
/// size of `Applied` costs nothing worth a box).
#[allow(clippy::large_enum_variant)]
enum Verdict {
    Applied {
        before: Option<Member>,
        after: Member,
    },
    Deferred(String),
}

/// Applies one event to the in-memory members. Pure: no I/O, time comes in as `now`.
fn apply(members: &mut HashMap<MemberId, Member>, event: &Event, now: DateTime<Utc>) -> Verdict {
    let member_id = event.kind.member_id();
    let before = members.get(member_id).cloned();
    let after = match (&event.kind, &before) {
        (EventKind::MemberEnrolled(profile), _) => {
            Member::enrolled(profile, before.as_ref().map_or(now, |b| b.enrolled_at))
        }
        (EventKind::MemberUpdated(changes), Some(before)) => before.updated(changes),
        (_, None) => return Verdict::Deferred(format!("member {member_id} is not enrolled yet")),
        // Orders, points and carts reach the ledger with issue 3; until then they are recorded.
        (_, Some(before)) => before.clone(),
    };
    members.insert(member_id.clone(), after.clone());
    Verdict::Applied { before, after }
}

/// Applies a batch of valid events inside the caller's transaction and returns one outcome per
/// event, in order. An `Err` leaves the transaction to be rolled back; nothing was applied.
pub async fn apply_batch(
    conn: &mut PgConnection,
    events: &[&Event],
    now: DateTime<Utc>,
) -> Result<Vec<Outcome>, sqlx::Error> {
    // Members first: a redelivered copy of an event is for the same member, so a second worker
    // handling it waits here rather than deadlocking on the inbox row below.
    let mut member_ids: Vec<&str> = events.iter().map(|e| e.kind.member_id().as_str()).collect();
    member_ids.sort_unstable();
    member_ids.dedup();
    members::lock(conn, &member_ids).await?;
    let fresh = claim_inbox(conn, events).await?;
    let mut state = members::load(conn, &member_ids).await?;

    let mut outcomes = Vec::with_capacity(events.len());
    let mut settled: HashSet<&str> = HashSet::new();
    let mut not_applied: Vec<&str> = Vec::new();
    let mut changed: HashSet<MemberId> = HashSet::new();
    let mut planned: Vec<(MemberId, Planned)> = Vec::new();
    for event in events {
        let id = event.id.as_str();
        // Applied before this batch, or earlier in it (a copy deferred here travels on as
        // the retry, so a second copy is a duplicate too).
        if !fresh.contains(id) || !settled.insert(id) {
            outcomes.push(Outcome::Duplicate);
            continue;
        }
        match apply(&mut state, event, now) {
            Verdict::Applied { before, after } => {
                let messages = triggers::plan(before.as_ref(), event, &after, now);
                outcomes.push(Outcome::Applied {
                    planned: messages.len(),
                });
                if before.as_ref() != Some(&after) {
                    changed.insert(after.member_id.clone());
                }
                planned.extend(messages.into_iter().map(|p| (after.member_id.clone(), p)));
            }
            Verdict::Deferred(reason) => {
                not_applied.push(id);
                outcomes.push(Outcome::Deferred(reason));
            }
        }
    }

    let changed: Vec<&Member> = changed.iter().map(|id| &state[id]).collect();
    members::save(conn, &changed, now).await?;
    release_inbox(conn, &not_applied).await?;
    insert_planned(conn, &planned).await?;
    Ok(outcomes)
}

/// Records every event id of the batch in the inbox and returns those that were not there:
/// the events to apply. A concurrent transaction inserting the same id makes this wait for
/// its outcome.
async fn claim_inbox(
    conn: &mut PgConnection,
    events: &[&Event],
) -> Result<HashSet<String>, sqlx::Error> {
    let ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
    let types: Vec<&str> = events.iter().map(|e| e.kind.type_name()).collect();
    let fresh: Vec<String> = sqlx::query_scalar(
        "insert into inbox (event_id, event_type) select * from unnest($1::text[], $2::text[])
         on conflict (event_id) do nothing
         returning event_id",
    )
    .bind(&ids)
    .bind(&types)
    .fetch_all(conn)
    .await?;
    Ok(fresh.into_iter().collect())
}

/// Removes the inbox rows of events that were claimed but not applied (deferred), so they
/// are applied when they come back.
async fn release_inbox(conn: &mut PgConnection, ids: &[&str]) -> Result<(), sqlx::Error> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query("delete from inbox where event_id = any($1)")
        .bind(ids)
        .execute(conn)
        .await?;
    Ok(())
}

/// Inserts planned messages; a dedupe key already in the outbox is skipped.
async fn insert_planned(
    conn: &mut PgConnection,
    planned: &[(MemberId, Planned)],
) -> Result<(), sqlx::Error> {
    if planned.is_empty() {
        return Ok(());
    }
    let mut keys = Vec::with_capacity(planned.len());
    let mut members = Vec::with_capacity(planned.len());
    let mut triggers = Vec::with_capacity(planned.len());
    let mut channels = Vec::with_capacity(planned.len());
    let mut contexts = Vec::with_capacity(planned.len());
    let mut due = Vec::with_capacity(planned.len());
    for (member_id, p) in planned {
        keys.push(p.dedupe_key.as_str());
        members.push(member_id.as_str());
        triggers.push(p.trigger.as_str());
        channels.push(p.channel.as_str());
        contexts.push(p.context.to_string());
        due.push(p.due_at);
    }
    sqlx::query(
        "insert into messages (dedupe_key, member_id, trigger, channel, context, due_at)
         select k, m, t, c, x::jsonb, d
         from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[])
              as p(k, m, t, c, x, d)
         on conflict (dedupe_key) do nothing",
    )
    .bind(&keys)
    .bind(&members)
    .bind(&triggers)
    .bind(&channels)
    .bind(&contexts)
    .bind(&due)
    .execute(conn)
    .await?;
    Ok(())
}
