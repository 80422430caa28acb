//! Member state and every change to it, applied a batch of events per transaction.
//!
//! A batch runs as: take each member's lock (advisory, so a member not yet inserted is covered
//! too; either every lock in key order, so two workers never deadlock, or only the free ones
//! without waiting, leaving the other members' events `Busy`); insert the event ids into the
//! inbox, keeping those that were new; load the members, their points and the orders the
//! events name; apply the new events in memory in delivery order (`apply`, pure); write back
//! changed members, lots, journal entries, orders and planned messages with one statement
//! each. The caller commits, then acks.

pub(crate) mod carts;
mod members;
mod store;

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

pub use crate::domain::CartState;
pub(crate) use crate::domain::{Member, MemberState};
pub(crate) use store::OrderRecord;

use crate::domain::points::{Entry, EntryKind, OrderPoints, Points};
use crate::domain::{MemberId, quoted};
use crate::event::{
    Adjustment, Cart, CartRef, Event, EventKind, Feedback, Order, Profile, Redemption, Refund,
};
use crate::notifications::{Notice, Sinks};
use crate::outbox;
use crate::program::Program;
use crate::triggers::{self, Planned};

/// What became of one event in a batch.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome {
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
    /// Another transaction holds its member: nothing was done; try again in a moment.
    Busy,
}

/// How a batch takes its members' locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Locking {
    /// Wait for every member's lock.
    Wait,
    /// Take the free ones; events of members another transaction holds come back `Busy`, so
    /// two consumers whose batches share a few members do not wait for each other's commit.
    SkipBusy,
}

/// Everything a batch works on, loaded once.
struct State {
    members: HashMap<MemberId, MemberState>,
    orders: HashMap<String, OrderRecord>,
    carts: HashMap<String, CartState>,
    /// Orders whose feedback has earned its points (before or earlier in this batch).
    feedback_rewarded: HashSet<String>,
}

/// A feedback answer as stored.
struct FeedbackRecord {
    member_id: MemberId,
    order_id: Option<String>,
    score: i16,
    comment: Option<String>,
    /// Points it earned (0 when none: no order, the order's feedback already rewarded, or
    /// the programme gives none).
    points: i64,
    /// When it was given (the event's time).
    at: DateTime<Utc>,
}

/// The verdict of applying one event in memory (returned once and matched at once, so the
/// size of `Applied` costs nothing worth a box).
#[allow(clippy::large_enum_variant)]
enum Verdict {
    Applied(Applied),
    Deferred(String),
    Rejected(String),
}

/// What an applied event changed.
struct Applied {
    /// The member before the event, after lapsed lots were expired.
    before: Option<MemberState>,
    after: MemberState,
    /// Journal entries, expiries first.
    entries: Vec<Entry>,
    /// The order the event created or changed.
    order: Option<OrderRecord>,
    /// The cart the event changed.
    cart: Option<CartState>,
    /// The feedback the event gave.
    feedback: Option<FeedbackRecord>,
}

/// Applies one event to the in-memory state. Pure: no I/O, time comes in as `now`. Nothing
/// changes unless the verdict is `Applied`.
///
/// An overdraft is deferred, not refused at once: with several consumers a member's events
/// can arrive out of order, and the points that cover a redemption may still be on their way.
/// After `ingest.max_retries` it is dead-lettered with the overdraft as its reason.
fn apply(state: &mut State, event: &Event, program: &Program, now: DateTime<Utc>) -> Verdict {
    let member_id = event.kind.member_id();
    let mut entries = Vec::new();
    let before = state.members.get(member_id).cloned().map(|mut m| {
        entries.extend(m.points.expire(now, program.tier_window_months));
        m
    });
    let mut a = Applying {
        state,
        member_id,
        program,
        now,
        // Carts order their events by when they happened (never later than now).
        happened: event.time.map_or(now, |t| t.min(now)),
        entries,
        order: None,
        cart: None,
        feedback: None,
    };
    let after = match (&event.kind, &before) {
        (EventKind::MemberEnrolled(profile), before) => Ok(a.enrolled(profile, before.as_ref())),
        (_, None) => Err(Refusal::Deferred(format!(
            "member {member_id} is not enrolled yet"
        ))),
        (EventKind::MemberUpdated(changes), Some(before)) => Ok(MemberState {
            member: before.member.updated(changes),
            points: before.points.clone(),
        }),
        (EventKind::OrderPlaced(placed), Some(before)) => Ok(a.order_placed(placed, before)),
        (EventKind::OrderRefunded(refund), Some(before)) => a.order_refunded(refund, before),
        (EventKind::PointsAdjusted(adjustment), Some(before)) => {
            a.points_adjusted(adjustment, before)
        }
        (EventKind::PointsRedeemed(redemption), Some(before)) => {
            a.points_redeemed(redemption, before)
        }
        (EventKind::CartUpdated(update), Some(before)) => {
            a.cart_updated(update).map(|()| before.clone())
        }
        (EventKind::FeedbackSubmitted(answer), Some(before)) => {
            a.feedback_submitted(answer, before)
        }
        (EventKind::CartCheckedOut(checkout), Some(before)) => {
            a.cart_checked_out(checkout).map(|()| before.clone())
        }
    };
    let after = match after {
        Ok(after) => after,
        Err(Refusal::Deferred(reason)) => return Verdict::Deferred(reason),
        Err(Refusal::Rejected(reason)) => return Verdict::Rejected(reason),
    };
    let Applying {
        state,
        entries,
        order,
        cart,
        feedback,
        ..
    } = a;
    if let Some(cart) = &cart {
        state.carts.insert(cart.cart_id.clone(), cart.clone());
    }
    if let Some(order) = &order {
        state.orders.insert(order.order_id.clone(), order.clone());
    }
    state.members.insert(member_id.clone(), after.clone());
    Verdict::Applied(Applied {
        before,
        after,
        entries,
        order,
        cart,
        feedback,
    })
}

/// Why an event changes nothing: it is early (deferred), or wrong (rejected).
enum Refusal {
    Deferred(String),
    Rejected(String),
}

/// One event being applied: what it reads, and what it changed so far. Each kind of event that
/// does more than change the profile (`member.updated`, applied in `apply`) has its method,
/// which returns the member after the event, or the refusal that stops it (deferred,
/// rejected) with nothing changed.
struct Applying<'a> {
    state: &'a mut State,
    member_id: &'a MemberId,
    program: &'a Program,
    now: DateTime<Utc>,
    /// When the event happened, never later than now.
    happened: DateTime<Utc>,
    /// Journal entries, expiries first.
    entries: Vec<Entry>,
    order: Option<OrderRecord>,
    cart: Option<CartState>,
    feedback: Option<FeedbackRecord>,
}

impl Applying<'_> {
    /// Earns `points` of `kind` for `member`, journalled.
    fn earn(&mut self, member: &mut MemberState, kind: EntryKind, points: i64) {
        let (now, months) = (self.now, self.program.expiry_months);
        self.entries
            .extend(member.points.earn(kind, points, now, months));
    }

    /// An enrolment; a second one updates the profile (the bonus was given once).
    fn enrolled(&mut self, profile: &Profile, before: Option<&MemberState>) -> MemberState {
        if let Some(before) = before {
            return MemberState {
                member: Member::enrolled(profile, before.member.enrolled_at),
                points: before.points.clone(),
            };
        }
        let mut after = MemberState {
            member: Member::enrolled(profile, self.now),
            points: Points::default(),
        };
        self.earn(&mut after, EntryKind::Signup, self.program.signup_bonus);
        after
    }

    /// An order earns its points once (an order id republished under a new event id earns
    /// nothing again), and checks its cart out.
    fn order_placed(&mut self, placed: &Order, before: &MemberState) -> MemberState {
        let mut after = before.clone();
        if !self.state.orders.contains_key(placed.order_id.as_str()) {
            let earned = self.program.earned(placed.total);
            self.earn(&mut after, EntryKind::Order, earned);
            let mut skus: Vec<String> = placed.items.iter().map(|i| i.sku.clone()).collect();
            skus.sort_unstable();
            skus.dedup();
            self.order = Some(OrderRecord {
                order_id: placed.order_id.to_string(),
                member_id: self.member_id.clone(),
                currency: placed.total.currency.code().to_owned(),
                points: OrderPoints {
                    total_minor: placed.total.minor,
                    earned,
                    refunded_minor: 0,
                    reversed: 0,
                },
                cart_id: placed.cart_id.as_ref().map(ToString::to_string),
                // When the platform says it was placed: reports count it in its period.
                placed_at: self.happened,
                skus,
            });
        }
        // A cart id of another member's cart is the platform's mistake; the order still
        // earns, the cart is left alone.
        if let Some(cart_id) = &placed.cart_id {
            let existing = self.state.carts.get(cart_id.as_str());
            self.cart =
                CartState::closed(existing, cart_id.as_str(), self.member_id, self.happened)
                    .ok()
                    .flatten();
        }
        after
    }

    /// A refund takes back the points its amount earned, in the order's currency.
    fn order_refunded(
        &mut self,
        refund: &Refund,
        before: &MemberState,
    ) -> Result<MemberState, Refusal> {
        let record = self.known_order(refund.order_id.as_str())?;
        if record.currency != refund.amount.currency.code() {
            return Err(Refusal::Rejected(format!(
                "refund in {} of order {} placed in {}",
                refund.amount.currency.code(),
                refund.order_id,
                quoted(&record.currency)
            )));
        }
        let record = record.clone();
        let mut after = before.clone();
        let (entry, points) = after
            .points
            .reverse(record.points, refund.amount.minor, self.now);
        self.entries.extend(entry);
        self.order = Some(OrderRecord { points, ..record });
        Ok(after)
    }

    /// The member's order `order_id`: deferred while unknown, rejected when another member's.
    fn known_order(&self, order_id: &str) -> Result<&OrderRecord, Refusal> {
        let Some(record) = self.state.orders.get(order_id) else {
            return Err(Refusal::Deferred(format!(
                "order {order_id} is not known yet"
            )));
        };
        if &record.member_id != self.member_id {
            return Err(Refusal::Rejected(format!(
                "order {order_id} belongs to another member"
            )));
        }
        Ok(record)
    }

    /// An adjustment earns, or spends without overdraft.
    fn points_adjusted(
        &mut self,
        adjustment: &Adjustment,
        before: &MemberState,
    ) -> Result<MemberState, Refusal> {
        let mut after = before.clone();
        if adjustment.points > 0 {
            self.earn(&mut after, EntryKind::Adjustment, adjustment.points);
            return Ok(after);
        }
        self.spend(
            &mut after,
            EntryKind::Adjustment,
            -adjustment.points,
            "adjustment",
        )?;
        Ok(after)
    }

    /// A redemption spends without overdraft.
    fn points_redeemed(
        &mut self,
        redemption: &Redemption,
        before: &MemberState,
    ) -> Result<MemberState, Refusal> {
        let mut after = before.clone();
        self.spend(
            &mut after,
            EntryKind::Redemption,
            redemption.points,
            "redemption",
        )?;
        Ok(after)
    }

    /// Spends `points` of `kind` from `member`, journalled; an overdraft defers the event
    /// (`what` names it in the reason).
    fn spend(
        &mut self,
        member: &mut MemberState,
        kind: EntryKind,
        points: i64,
        what: &str,
    ) -> Result<(), Refusal> {
        let entry = member
            .points
            .spend(kind, points, self.now)
            .map_err(|overdraft| Refusal::Deferred(format!("{what} refused: {overdraft}")))?;
        self.entries.push(entry);
        Ok(())
    }

    /// A cart's new contents (its abandonment timer starts again).
    fn cart_updated(&mut self, update: &Cart) -> Result<(), Refusal> {
        let existing = self.state.carts.get(update.cart_id.as_str());
        let delay = chrono::Duration::minutes(i64::from(self.program.abandoned_cart_minutes));
        self.cart = CartState::updated(existing, update, self.happened, delay)
            .map_err(Refusal::Rejected)?;
        Ok(())
    }

    /// A cart checked out without an order event.
    fn cart_checked_out(&mut self, checkout: &CartRef) -> Result<(), Refusal> {
        let existing = self.state.carts.get(checkout.cart_id.as_str());
        self.cart = CartState::closed(
            existing,
            checkout.cart_id.as_str(),
            self.member_id,
            self.happened,
        )
        .map_err(Refusal::Rejected)?;
        Ok(())
    }

    /// A feedback answer, which earns its points once per order, however often the member
    /// answers about it.
    fn feedback_submitted(
        &mut self,
        answer: &Feedback,
        before: &MemberState,
    ) -> Result<MemberState, Refusal> {
        let mut after = before.clone();
        let mut points = 0;
        if let Some(order_id) = &answer.order_id {
            self.known_order(order_id.as_str())?;
            if self.program.feedback_points > 0
                && self.state.feedback_rewarded.insert(order_id.to_string())
            {
                points = self.program.feedback_points;
                self.earn(&mut after, EntryKind::Feedback, points);
            }
        }
        self.feedback = Some(FeedbackRecord {
            member_id: self.member_id.clone(),
            order_id: answer.order_id.as_ref().map(ToString::to_string),
            score: i16::from(answer.score),
            comment: answer.comment.clone(),
            points,
            at: self.happened,
        });
        Ok(after)
    }
}

/// Applies a batch of valid events inside the caller's transaction and returns one outcome per
/// event, in order. An `Err` leaves the transaction to be rolled back; nothing was applied.
pub(crate) async fn apply_batch(
    conn: &mut PgConnection,
    events: &[&Event],
    program: &Program,
    clock: &crate::clock::Clock,
    locking: Locking,
    sinks: Sinks,
) -> Result<Vec<Outcome>, sqlx::Error> {
    // Members first: a redelivered copy of an event is for the same member, so a second worker
    // handling it waits here (or leaves it) rather than deadlocking on the inbox row below.
    let mut member_ids: Vec<&str> = events.iter().map(|e| e.kind.member_id().as_str()).collect();
    member_ids.sort_unstable();
    member_ids.dedup();
    let busy = match locking {
        Locking::Wait => {
            members::lock(conn, &member_ids).await?;
            HashSet::new()
        }
        Locking::SkipBusy => members::try_lock(conn, &member_ids).await?,
    };
    if busy.is_empty() {
        return apply_locked(conn, events, &member_ids, program, clock, sinks).await;
    }
    let is_busy = |e: &&Event| busy.contains(e.kind.member_id().as_str());
    let free: Vec<&Event> = events.iter().filter(|e| !is_busy(e)).copied().collect();
    member_ids.retain(|m| !busy.contains(*m));
    let mut applied = apply_locked(conn, &free, &member_ids, program, clock, sinks)
        .await?
        .into_iter();
    Ok(events
        .iter()
        .map(|e| match is_busy(e) {
            true => Outcome::Busy,
            false => applied.next().expect("an outcome per free event"),
        })
        .collect())
}

/// `apply_batch` once the members of `events` are locked.
async fn apply_locked(
    conn: &mut PgConnection,
    events: &[&Event],
    member_ids: &[&str],
    program: &Program,
    clock: &crate::clock::Clock,
    sinks: Sinks,
) -> Result<Vec<Outcome>, sqlx::Error> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    // The time is read once the members are ours: read before, a batch that waited for a lock
    // another worker held would stamp its lots earlier than that worker's, and a member's lots
    // (spent oldest first) would then depend on which worker waited.
    let now = clock.now();
    let fresh = claim_inbox(conn, events).await?;
    let (order_ids, cart_ids) = orders_and_carts(events);
    let mut state = State {
        members: store::load_members(conn, member_ids, program, now).await?,
        orders: store::load_orders(conn, &order_ids).await?,
        carts: carts::load(conn, &cart_ids).await?,
        feedback_rewarded: store::feedback_rewarded(conn, &order_ids).await?,
    };
    let loaded = stored_lots(&state.members);

    let mut outcomes = Vec::with_capacity(events.len());
    let mut settled: HashSet<&str> = HashSet::new();
    let mut changes = Changes::default();
    for event in events {
        let id = event.id.as_str();
        // Applied before this batch, or earlier in it (a copy deferred here travels on as
        // the retry, so a second copy is a duplicate too).
        if !fresh.contains(id) || !settled.insert(id) {
            outcomes.push(Outcome::Duplicate);
            continue;
        }
        let span =
            tracing::debug_span!("event", event_id = id, event_type = event.kind.type_name());
        let _in_event = span.enter();
        let outcome = match apply(&mut state, event, program, now) {
            Verdict::Applied(applied) => {
                let messages =
                    triggers::plan(applied.before.as_ref(), event, &applied.after, program, now);
                for m in &messages {
                    tracing::debug!(dedupe_key = %crate::mask::text(&m.dedupe_key), "Message planned.");
                }
                let planned = messages.len();
                if sinks.any() {
                    changes.notices.extend(notices_of(
                        applied.before.as_ref(),
                        &applied.after,
                        &applied.entries,
                        id,
                        program,
                        now,
                    ));
                }
                changes.applied(event, applied, messages, now);
                Outcome::Applied { planned }
            }
            Verdict::Deferred(reason) => {
                changes.not_applied.push(id);
                Outcome::Deferred(reason)
            }
            Verdict::Rejected(reason) => {
                changes.not_applied.push(id);
                Outcome::Rejected(reason)
            }
        };
        outcomes.push(outcome);
    }
    changes
        .save(conn, &state, &loaded, program, now, sinks)
        .await?;
    Ok(outcomes)
}

/// The ids of the orders and carts a batch's events name.
fn orders_and_carts<'e>(events: &[&'e Event]) -> (Vec<&'e str>, Vec<&'e str>) {
    let mut orders = Vec::new();
    let mut carts = Vec::new();
    for event in events {
        match &event.kind {
            EventKind::OrderPlaced(o) => {
                orders.push(o.order_id.as_str());
                carts.extend(o.cart_id.as_ref().map(|c| c.as_str()));
            }
            EventKind::OrderRefunded(r) => orders.push(r.order_id.as_str()),
            EventKind::FeedbackSubmitted(f) => {
                orders.extend(f.order_id.as_ref().map(|o| o.as_str()))
            }
            EventKind::CartUpdated(c) => carts.push(c.cart_id.as_str()),
            EventKind::CartCheckedOut(c) => carts.push(c.cart_id.as_str()),
            _ => {}
        }
    }
    (orders, carts)
}

/// What a batch's events changed, gathered as they are applied and written at the end.
#[derive(Default)]
struct Changes<'e> {
    /// Events deferred or rejected: their inbox claims are released.
    not_applied: Vec<&'e str>,
    /// Members whose profile or points changed.
    members: HashSet<MemberId>,
    /// Journal entries with the event that caused them and when it happened.
    journal: Vec<(MemberId, Entry, &'e str, DateTime<Utc>)>,
    orders: HashMap<String, OrderRecord>,
    planned: Vec<(MemberId, Planned, DateTime<Utc>)>,
    carts: HashSet<String>,
    /// Outbox keys of messages planned for carts that changed since.
    cancelled: Vec<String>,
    answers: Vec<(&'e str, FeedbackRecord)>,
    /// What the platform is told.
    notices: Vec<Notice>,
}

impl<'e> Changes<'e> {
    /// Takes in what `event` changed and the messages it planned.
    fn applied(
        &mut self,
        event: &'e Event,
        applied: Applied,
        messages: Vec<Planned>,
        now: DateTime<Utc>,
    ) {
        let id = event.id.as_str();
        let Applied {
            before,
            after,
            entries,
            order,
            cart,
            feedback,
        } = applied;
        // What the event records happened when the platform says (never later than now), so
        // an event applied late counts in the period it happened in.
        let happened = event.time.map_or(now, |t| t.min(now));
        let member_id = after.member.profile.member_id.clone();
        // `before` already has lapsed lots expired, so an expiry alone leaves it equal to
        // `after` while the stored lots still need writing: the entries tell.
        if before.as_ref() != Some(&after) || !entries.is_empty() {
            self.members.insert(member_id.clone());
        }
        let at = |e| (member_id.clone(), e, id, happened);
        self.journal.extend(entries.into_iter().map(at));
        self.answers.extend(feedback.map(|f| (id, f)));
        if let Some(order) = order {
            self.orders.insert(order.order_id.clone(), order);
        }
        if let Some(cart) = cart {
            // A message planned for the cart as it was must not go now.
            self.cancelled.extend(cart.planned_keys());
            self.carts.insert(cart.cart_id);
        }
        let planning = |p| (member_id.clone(), p, happened);
        self.planned.extend(messages.into_iter().map(planning));
    }

    /// Writes the changes in the caller's transaction.
    async fn save(
        self,
        conn: &mut PgConnection,
        state: &State,
        loaded: &HashMap<i64, (MemberId, i64)>,
        program: &Program,
        now: DateTime<Utc>,
        sinks: Sinks,
    ) -> Result<(), sqlx::Error> {
        let changed: Vec<&MemberState> = self.members.iter().map(|id| &state.members[id]).collect();
        members::save(conn, &changed, now).await?;
        store::save_points(conn, &changed, loaded, &self.journal).await?;
        store::save_orders(conn, &self.orders.into_values().collect::<Vec<_>>()).await?;
        let carts: Vec<&CartState> = self.carts.iter().map(|id| &state.carts[id]).collect();
        carts::save(conn, &carts).await?;
        outbox::cancel_pending(conn, &self.cancelled).await?;
        release_inbox(conn, &self.not_applied).await?;
        insert_planned(conn, &self.planned, program).await?;
        save_feedback(conn, &self.answers).await?;
        crate::notifications::record(conn, sinks, &self.notices).await
    }
}

/// What the platform is told of one change to a member (`before` with lapsed lots already
/// expired, `entries` holding those expiries): the points that lapsed, the new balance if it
/// moved (since the balance last told, before the lapse), and a new tier. `cause` is the
/// event id or `scan:<name>`.
fn notices_of(
    before: Option<&MemberState>,
    after: &MemberState,
    entries: &[Entry],
    cause: &str,
    program: &Program,
    now: DateTime<Utc>,
) -> Vec<Notice> {
    let member = after.member.profile.member_id.as_str();
    let lapsed: i64 = entries
        .iter()
        .filter(|e| e.kind == EntryKind::Expiry)
        .map(|e| -e.points)
        .sum();
    let before_balance = before.map_or(0, |b| b.points.balance());
    let mut out = Vec::new();
    if lapsed > 0 {
        out.push(Notice::expired(member, lapsed, before_balance));
    }
    let balance = after.points.balance();
    if balance != before_balance + lapsed {
        out.push(Notice::balance_changed(member, balance, cause));
    }
    let tier = |state: Option<&MemberState>| {
        let points = state.map_or(0, |s| s.points.tier_points(now, program.tier_window_months));
        program.tier_for(points)
    };
    let (was, is) = (tier(before), tier(Some(after)));
    if was != is {
        out.push(Notice::tier_changed(
            member,
            &program.tiers[was].name,
            &program.tiers[is].name,
        ));
    }
    out
}

/// Stores feedback answers (by event id: a replayed answer is not stored twice).
async fn save_feedback(
    conn: &mut PgConnection,
    answers: &[(&str, FeedbackRecord)],
) -> Result<(), sqlx::Error> {
    if answers.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = answers.iter().map(|(id, _)| *id).collect();
    let members: Vec<&str> = answers.iter().map(|(_, f)| f.member_id.as_str()).collect();
    let orders: Vec<Option<&str>> = answers.iter().map(|(_, f)| f.order_id.as_deref()).collect();
    let scores: Vec<i16> = answers.iter().map(|(_, f)| f.score).collect();
    let comments: Vec<Option<&str>> = answers.iter().map(|(_, f)| f.comment.as_deref()).collect();
    let points: Vec<i64> = answers.iter().map(|(_, f)| f.points).collect();
    let at: Vec<DateTime<Utc>> = answers.iter().map(|(_, f)| f.at).collect();
    sqlx::query!(
        "insert into feedback (event_id, member_id, order_id, score, comment, points, at)
         select * from unnest($1::text[], $2::text[], $3::text[], $4::smallint[], $5::text[],
                              $6::bigint[], $7::timestamptz[])
         on conflict (event_id) do nothing",
        &ids as &[&str],
        &members as &[&str],
        &orders as &[Option<&str>],
        &scores,
        &comments as &[Option<&str>],
        &points,
        &at,
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Each stored lot's member and remaining points as loaded, so that saving writes only the
/// lots that changed.
fn stored_lots(members: &HashMap<MemberId, MemberState>) -> HashMap<i64, (MemberId, i64)> {
    members
        .iter()
        .flat_map(|(id, m)| {
            m.points
                .lots
                .iter()
                .filter_map(move |l| Some((l.id?, (id.clone(), l.remaining))))
        })
        .collect()
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
    let fresh: Vec<String> = sqlx::query_scalar!(
        "insert into inbox (event_id, event_type) select * from unnest($1::text[], $2::text[])
         on conflict (event_id) do nothing
         returning event_id",
        &ids as &[&str],
        &types as &[&str],
    )
    .fetch_all(conn)
    .await?;
    Ok(fresh.into_iter().collect())
}

/// Removes the inbox rows of events that were claimed but not applied (deferred or refused),
/// so a deferred event is applied when it comes back and a refused one can be replayed.
async fn release_inbox(conn: &mut PgConnection, ids: &[&str]) -> Result<(), sqlx::Error> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query!("delete from inbox where event_id = any($1)", ids as &[&str])
        .execute(conn)
        .await?;
    Ok(())
}

/// Inserts planned messages; a dedupe key already in the outbox is skipped. Messages of a
/// trigger with a coupon pool draw their codes here, in the planning transaction.
#[tracing::instrument(name = "plan", level = "debug", skip_all, fields(planned = planned.len()))]
async fn insert_planned(
    conn: &mut PgConnection,
    planned: &[(MemberId, Planned, DateTime<Utc>)],
    program: &Program,
) -> Result<(), sqlx::Error> {
    if planned.is_empty() {
        return Ok(());
    }
    let rows: Vec<outbox::Planned> = planned
        .iter()
        .map(|(member_id, p, at)| outbox::Planned {
            dedupe_key: &p.dedupe_key,
            member_id: member_id.as_str(),
            trigger: p.trigger,
            channel: p.channel,
            context: &p.context,
            due_at: p.due_at,
            event_at: *at,
        })
        .collect();
    let inserted = outbox::enqueue(conn, &rows).await?;
    for message in &inserted {
        tracing::debug!(
            message_id = message.id,
            dedupe_key = %crate::mask::text(&message.dedupe_key),
            "Message stored."
        );
        let channel = if message.dedupe_key.ends_with(":sms") {
            "sms"
        } else {
            "email"
        };
        metrics::counter!(
            "lifecycle_messages_planned_total",
            "trigger" => message.trigger.clone(),
            "channel" => channel,
        )
        .increment(1);
    }
    if !program.coupons.is_empty() {
        // A trigger's control group gets no message, so it takes no code from the pool.
        let held_out: std::collections::HashSet<&str> = planned
            .iter()
            .filter(|(member, p, _)| {
                program
                    .holdout_percent
                    .holds_out(member.as_str(), p.trigger.as_str())
            })
            .map(|(_, p, _)| p.dedupe_key.as_str())
            .collect();
        let drawing: Vec<(i64, String, String)> = inserted
            .into_iter()
            .filter(|m| !held_out.contains(m.dedupe_key.as_str()))
            .map(|m| (m.id, m.dedupe_key, m.trigger))
            .collect();
        crate::coupons::draw(conn, program, &drawing).await?;
    }
    Ok(())
}

/// What a scheduled scan does to one member, decided by a pure function of the member.
#[derive(Debug, Default)]
pub(crate) struct ScanChange {
    /// Recorded as the journal entries' cause.
    pub cause: String,
    /// A key claimed with the change (in `scan_claims`, apart from the event inbox, so no
    /// event id can collide with it): a change whose key was claimed before (by an earlier
    /// run, or a replica running the same scan) is not applied again.
    pub once: Option<String>,
    /// Journal entries (the change to `after`'s points made them).
    pub entries: Vec<Entry>,
    /// Messages to plan.
    pub planned: Vec<Planned>,
}

/// Runs a scan's change over members inside the caller's transaction: under each member's
/// lock, lapsed lots are expired first, then `change` may change the member further and plan
/// messages. Changed members, journal entries and messages are written as an event batch's
/// are. Returns the number of messages planned (before outbox dedupe).
pub(crate) async fn update_members<F>(
    conn: &mut PgConnection,
    ids: &[&str],
    program: &Program,
    now: DateTime<Utc>,
    sinks: Sinks,
    mut change: F,
) -> Result<usize, sqlx::Error>
where
    F: FnMut(&mut MemberState) -> Option<ScanChange>,
{
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    members::lock(conn, &ids).await?;
    let loaded_members = store::load_members(conn, &ids, program, now).await?;
    let loaded = stored_lots(&loaded_members);

    // Expire, then decide each member's change on a copy.
    let mut expired = Vec::with_capacity(loaded_members.len());
    for (id, mut state) in loaded_members {
        let entries = state.points.expire(now, program.tier_window_months);
        let mut changed = state.clone();
        let decided = change(&mut changed);
        expired.push((id, state, entries, changed, decided));
    }
    let once: Vec<&str> = expired
        .iter()
        .filter_map(|(.., decided)| decided.as_ref()?.once.as_deref())
        .collect();
    let fresh = claim_scan_keys(conn, &once).await?;
    let (saved, journal, planned, notices) = scan_changes(expired, &fresh, program, now);
    let saved_refs: Vec<&MemberState> = saved.iter().collect();
    members::save(conn, &saved_refs, now).await?;
    // A scan's changes happen at the scan's time.
    let journal_refs: Vec<(MemberId, Entry, &str, DateTime<Utc>)> = journal
        .iter()
        .map(|(m, e, c)| (m.clone(), e.clone(), c.as_str(), now))
        .collect();
    store::save_points(conn, &saved_refs, &loaded, &journal_refs).await?;
    insert_planned(conn, &planned, program).await?;
    if sinks.any() {
        crate::notifications::record(conn, sinks, &notices).await?;
    }
    Ok(planned.len())
}

/// Claims the keys of changes applied once: returns those no run claimed before.
async fn claim_scan_keys(
    conn: &mut PgConnection,
    once: &[&str],
) -> Result<HashSet<String>, sqlx::Error> {
    if once.is_empty() {
        return Ok(HashSet::new());
    }
    Ok(sqlx::query_scalar!(
        "insert into scan_claims (key) select k from unnest($1::text[]) as k
         on conflict (key) do nothing returning key",
        once as &[&str],
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .collect())
}

/// A scanned member: as loaded (lapsed lots expired), its expiry entries, as the scan's change
/// left it, and the change decided.
type Scanned = (
    MemberId,
    MemberState,
    Vec<Entry>,
    MemberState,
    Option<ScanChange>,
);

/// What a scan's decisions come to: the members to save, the journal with each entry's
/// cause, the messages to plan, and what the platform is told. A change whose key another run
/// claimed is not applied, but its member's expiry still is.
#[allow(clippy::type_complexity)]
fn scan_changes(
    scanned: Vec<Scanned>,
    fresh: &HashSet<String>,
    program: &Program,
    now: DateTime<Utc>,
) -> (
    Vec<MemberState>,
    Vec<(MemberId, Entry, String)>,
    Vec<(MemberId, Planned, DateTime<Utc>)>,
    Vec<Notice>,
) {
    let mut journal: Vec<(MemberId, Entry, String)> = Vec::new();
    let mut planned: Vec<(MemberId, Planned, DateTime<Utc>)> = Vec::new();
    let mut saved: Vec<MemberState> = Vec::new();
    let mut notices: Vec<Notice> = Vec::new();
    for (id, base, entries, changed, decided) in scanned {
        let expiry = !entries.is_empty();
        let mut told = entries.clone();
        journal.extend(
            entries
                .into_iter()
                .map(|e| (id.clone(), e, "expiry".to_owned())),
        );
        let applies = decided.filter(|d| d.once.as_ref().is_none_or(|k| fresh.contains(k)));
        match applies {
            Some(d) => {
                let touched = !d.entries.is_empty();
                told.extend(d.entries.iter().cloned());
                let cause = match touched {
                    true => format!("scan:{}", d.cause),
                    false => "scan:expiry".to_owned(),
                };
                if expiry || touched {
                    notices.extend(notices_of(
                        Some(&base),
                        &changed,
                        &told,
                        &cause,
                        program,
                        now,
                    ));
                }
                journal.extend(
                    d.entries
                        .into_iter()
                        .map(|e| (id.clone(), e, d.cause.clone())),
                );
                planned.extend(d.planned.into_iter().map(|p| (id.clone(), p, now)));
                if expiry || touched {
                    saved.push(changed);
                }
            }
            None if expiry => {
                notices.extend(notices_of(
                    Some(&base),
                    &base,
                    &told,
                    "scan:expiry",
                    program,
                    now,
                ));
                saved.push(base);
            }
            None => {}
        }
    }
    (saved, journal, planned, notices)
}

/// The members whose address on `channel` is `address`, in id order.
pub(crate) async fn with_address(
    conn: &mut PgConnection,
    channel: crate::domain::Channel,
    address: &str,
) -> Result<Vec<String>, sqlx::Error> {
    members::with_address(conn, channel, address).await
}

/// A member as they are at `now` (lots lapsed by then expired, on this copy only) and their
/// newest open cart: what a preview renders with. `None` when there is no such member.
pub(crate) async fn member_now(
    pool: &sqlx::PgPool,
    id: &str,
    program: &Program,
    now: DateTime<Utc>,
) -> Result<Option<(MemberState, Option<CartState>)>, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let mut states = store::load_members(&mut conn, &[id], program, now).await?;
    let Some(key) = states.keys().next().cloned() else {
        return Ok(None);
    };
    let mut state = states.remove(&key).expect("present");
    state.points.expire(now, program.tier_window_months);
    let cart: Option<String> = sqlx::query_scalar!(
        "select cart_id from carts where member_id = $1 and open order by changed_at desc limit 1",
        id
    )
    .fetch_optional(&mut *conn)
    .await?;
    let cart = match cart {
        Some(cart_id) => carts::load(&mut conn, &[cart_id.as_str()])
            .await?
            .into_values()
            .next(),
        None => None,
    };
    Ok(Some((state, cart)))
}

/// Plans the abandoned-cart message of each due cart inside the caller's transaction, under
/// its member's lock (re-reading the carts, which an event may have changed meanwhile), and
/// marks the version notified. A cart whose member cannot be reached is marked too, so the
/// scan does not find it again. Returns the number of messages planned.
pub async fn abandon_carts(
    conn: &mut PgConnection,
    due: &[CartState],
    program: &Program,
    now: DateTime<Utc>,
) -> Result<usize, sqlx::Error> {
    let mut member_ids: Vec<&str> = due.iter().map(|c| c.member_id.as_str()).collect();
    member_ids.sort_unstable();
    member_ids.dedup();
    members::lock(conn, &member_ids).await?;
    let cart_ids: Vec<&str> = due.iter().map(|c| c.cart_id.as_str()).collect();
    let current = carts::load(conn, &cart_ids).await?;
    let states = store::load_members(conn, &member_ids, program, now).await?;
    let mut marked = Vec::new();
    let mut planned = Vec::new();
    for cart in current.into_values().filter(|c| c.is_due(now)) {
        if let Some(state) = states.get(&cart.member_id) {
            let messages = triggers::abandoned_cart(&cart, state, program, now);
            planned.extend(
                messages
                    .into_iter()
                    .map(|p| (cart.member_id.clone(), p, now)),
            );
        }
        marked.push(CartState {
            notified_version: Some(cart.version),
            ..cart
        });
    }
    carts::save(conn, &marked.iter().collect::<Vec<_>>()).await?;
    insert_planned(conn, &planned, program).await?;
    Ok(planned.len())
}

/// The ledger and its triggers against a model written independently of them: random
/// sequences of orders, refunds, adjustments, redemptions and clock advances.
#[cfg(test)]
mod model {
    use std::collections::BTreeSet;

    use chrono::{Duration, Months, TimeZone};
    use proptest::prelude::*;

    use super::*;
    use crate::domain::{
        Consent, Currency, Email, EventId, Locale, Money, RecordId, TimeZone as Zone,
    };
    use crate::event::{Adjustment, Order, Profile, Redemption, Refund};
    use crate::program::Reward;

    #[derive(Debug, Clone)]
    enum Op {
        Order { total_minor: i64 },
        Refund { order: usize, minor: i64 },
        Adjust { points: i64 },
        Redeem { points: i64 },
        Advance { days: i64 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (1..60_000_i64).prop_map(|total_minor| Op::Order { total_minor }),
            1 => (0..8_usize, 1..40_000_i64).prop_map(|(order, minor)| Op::Refund { order, minor }),
            1 => (-200..300_i64).prop_map(|points| Op::Adjust { points }),
            1 => (1..300_i64).prop_map(|points| Op::Redeem { points }),
            2 => (1..120_i64).prop_map(|days| Op::Advance { days }),
        ]
    }

    /// The model: plain lists, recomputed from scratch; 1 point per dollar, lots lapse after
    /// 12 months, rewards at 100/250/500, tiers at 0/500/1500 over 12 months.
    #[derive(Default)]
    struct Model {
        /// (earned at, remaining), in earning order.
        lots: Vec<(DateTime<Utc>, i64)>,
        /// (total, earned, refunded, reversed)
        orders: Vec<(i64, i64, i64, i64)>,
        qualifying: Vec<(DateTime<Utc>, i64)>,
    }

    impl Model {
        fn expire(&mut self, now: DateTime<Utc>) {
            self.lots.retain(|(at, _)| *at + Months::new(12) > now);
        }
        fn balance(&self) -> i64 {
            self.lots.iter().map(|(_, n)| n).sum()
        }
        fn take(&mut self, mut n: i64) {
            for lot in &mut self.lots {
                let taken = n.min(lot.1);
                lot.1 -= taken;
                n -= taken;
            }
            self.lots.retain(|(_, n)| *n > 0);
        }
        fn tier(&self, now: DateTime<Utc>) -> usize {
            let points: i64 = self
                .qualifying
                .iter()
                .filter(|(at, _)| *at > now - Months::new(12))
                .map(|(_, q)| q)
                .sum();
            [0, 500, 1500]
                .iter()
                .rposition(|t| points.max(0) >= *t)
                .unwrap()
        }
    }

    fn program() -> Program {
        let reward = |points, discount| Reward { points, discount };
        Program {
            rewards: vec![reward(100, 10), reward(250, 30), reward(500, 70)],
            ..Program::default()
        }
    }

    fn event(n: usize, kind: EventKind) -> Event {
        Event {
            id: EventId::parse(&format!("e{n}")).unwrap(),
            source: "model".into(),
            time: None,
            kind,
        }
    }

    fn usd(minor: i64) -> Money {
        Money::new("total", minor, Currency::parse("USD").unwrap()).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn ledger_and_triggers_agree_with_the_model(ops in proptest::collection::vec(op(), 1..60)) {
            let program = program();
            let m = MemberId::parse("m1").unwrap();
            let mut now = Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap();
            let mut state = State { members: HashMap::new(), orders: HashMap::new(), carts: HashMap::new(), feedback_rewarded: HashSet::new() };
            let enrol = event(0, EventKind::MemberEnrolled(Profile {
                member_id: m.clone(),
                email: Some(Email::parse("m1@example.com").unwrap()),
                phone: None,
                first_name: None,
                locale: Locale::parse("en").unwrap(),
                timezone: Zone::parse("UTC").unwrap(),
                birthday: None,
                consent: Consent { email: true, sms: false },
            }));
            let enrolled = matches!(apply(&mut state, &enrol, &program, now), Verdict::Applied(_));
            prop_assert!(enrolled);
            let mut model = Model { lots: vec![(now, 100)], ..Model::default() };

            for (i, op) in ops.into_iter().enumerate() {
                let n = i + 1;
                model.expire(now);
                let (was_balance, was_tier) = (model.balance(), model.tier(now));
                let kind = match op {
                    Op::Advance { days } => {
                        now += Duration::days(days);
                        model.expire(now);
                        // The points-expiring scan at this moment.
                        let mut scanned = state.members[&m].clone();
                        scanned.points.expire(now, program.tier_window_months);
                        let planned: BTreeSet<String> = triggers::points_expiring(&scanned, &program, now)
                            .into_iter().map(|p| p.dedupe_key).collect();
                        let today = now.date_naive();
                        let expected: BTreeSet<String> = model.lots.iter()
                            .map(|(at, _)| (*at + Months::new(12)).date_naive())
                            .filter(|date| (*date - today).num_days() <= 30)
                            .map(|date| {
                                let notice = if (date - today).num_days() <= 7 { 7 } else { 30 };
                                format!("points-expiring:m1:{date}:{notice}:email")
                            })
                            .collect();
                        prop_assert_eq!(planned, expected);
                        continue;
                    }
                    Op::Order { total_minor } => {
                        let earned = total_minor / 100;
                        if earned > 0 {
                            model.lots.push((now, earned));
                            model.qualifying.push((now, earned));
                        }
                        model.orders.push((total_minor, earned, 0, 0));
                        EventKind::OrderPlaced(Order {
                            order_id: RecordId::parse("order_id", &format!("o{}", model.orders.len() - 1)).unwrap(),
                            member_id: m.clone(),
                            total: usd(total_minor),
                            items: Vec::new(),
                            cart_id: None,
                        })
                    }
                    Op::Refund { order, minor } => {
                        if model.orders.is_empty() {
                            continue;
                        }
                        let order = order % model.orders.len();
                        let (total, earned, refunded, reversed) = model.orders[order];
                        let refunded = (refunded + minor).min(total);
                        let reversal = earned * refunded / total - reversed;
                        let taken = reversal.min(model.balance());
                        model.take(taken);
                        if reversal > 0 {
                            model.qualifying.push((now, -reversal));
                        }
                        model.orders[order] = (total, earned, refunded, reversed + reversal);
                        EventKind::OrderRefunded(Refund {
                            order_id: RecordId::parse("order_id", &format!("o{order}")).unwrap(),
                            member_id: m.clone(),
                            amount: usd(minor),
                        })
                    }
                    Op::Adjust { points } | Op::Redeem { points } => {
                        let refused = points < 0 && -points > model.balance()
                            || matches!(op, Op::Redeem { .. }) && points > model.balance();
                        if !refused {
                            if points > 0 && matches!(op, Op::Adjust { .. }) {
                                model.lots.push((now, points));
                            } else {
                                model.take(points.abs());
                            }
                        }
                        if matches!(op, Op::Redeem { .. }) {
                            EventKind::PointsRedeemed(Redemption { member_id: m.clone(), points, reward: None })
                        } else {
                            EventKind::PointsAdjusted(Adjustment { member_id: m.clone(), points, reason: "manual".into() })
                        }
                    }
                };
                let event = event(n, kind);
                let planned: BTreeSet<String> = match apply(&mut state, &event, &program, now) {
                    Verdict::Applied(Applied { before, after, .. }) => {
                        triggers::plan(before.as_ref(), &event, &after, &program, now)
                            .into_iter().map(|p| p.dedupe_key).collect()
                    }
                    Verdict::Deferred(reason) => {
                        prop_assert!(reason.contains("refused"), "{}", reason);
                        prop_assert_eq!(model.balance(), was_balance, "the model refused it too");
                        BTreeSet::new()
                    }
                    Verdict::Rejected(reason) => panic!("rejected: {reason}"),
                };

                let mut expected = BTreeSet::new();
                let is = model.balance();
                if let Some(r) = program.rewards.iter().rev().find(|r| was_balance < r.points && r.points <= is) {
                    expected.insert(format!("redemption-ready:m1:{}:e{n}:email", r.points));
                }
                let tier = model.tier(now);
                if tier > was_tier {
                    expected.insert(format!("tier-up:m1:{}:e{n}:email", program.tiers[tier].name));
                }
                prop_assert_eq!(planned, expected, "after {:?}", event.kind);

                // A refused event leaves the state as loaded: expire as the next event would.
                let mut ledger = state.members[&m].points.clone();
                ledger.expire(now, program.tier_window_months);
                let lots: Vec<(DateTime<Utc>, i64)> = ledger.lots.iter().map(|l| (l.earned_at, l.remaining)).collect();
                prop_assert_eq!(&lots, &model.lots, "lots");
                prop_assert_eq!(ledger.balance(), model.balance());
                prop_assert_eq!(program.tier_for(ledger.tier_points(now, 12)), model.tier(now), "tier");
            }
        }
    }
}
