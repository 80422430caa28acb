//! Loading and saving points and orders: lots, the journal, order records.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Months, Utc};
use sqlx::PgConnection;

use super::{MemberState, members};
use crate::domain::MemberId;
use crate::domain::points::{Entry, Lot, OrderPoints, Points};
use crate::program::Program;

/// What the ledger keeps of an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OrderRecord {
    /// The order.
    pub order_id: String,
    /// The buyer.
    pub member_id: MemberId,
    /// ISO 4217 code of its total and its refunds.
    pub currency: String,
    /// Earned and reversed points.
    pub points: OrderPoints,
    /// The cart it checked out, if any.
    pub cart_id: Option<String>,
    /// When it was placed (the event's time, capped at the business time it was applied).
    pub placed_at: DateTime<Utc>,
    /// The distinct SKUs bought (what the upsell ratio counts), sorted.
    pub skus: Vec<String>,
}

/// Loads the members among `ids` that exist, with their lots and the qualifying entries
/// still inside the tier window at `now`.
pub(super) async fn load_members(
    conn: &mut PgConnection,
    ids: &[&str],
    program: &Program,
    now: DateTime<Utc>,
) -> Result<HashMap<MemberId, MemberState>, sqlx::Error> {
    let mut profiles = members::load(conn, ids).await?;
    if profiles.is_empty() {
        return Ok(HashMap::new());
    }
    let present: Vec<&str> = profiles.keys().map(MemberId::as_str).collect();
    let mut points: HashMap<String, Points> = HashMap::new();
    let lots = sqlx::query!(
        "select lot_id, member_id, earned_at, expires_at, points, remaining from point_lots
         where member_id = any($1) order by member_id, earned_at, lot_id",
        &present as &[&str]
    )
    .fetch_all(&mut *conn)
    .await?;
    for row in lots {
        points.entry(row.member_id).or_default().lots.push(Lot {
            id: Some(row.lot_id),
            earned_at: row.earned_at,
            expires_at: row.expires_at,
            points: row.points,
            remaining: row.remaining,
        });
    }
    let since = now - Months::new(program.tier_window_months);
    let qualifying = sqlx::query!(
        "select member_id, at, qualifying from point_entries
         where member_id = any($1) and qualifying <> 0 and at > $2 order by at, id",
        &present as &[&str],
        since
    )
    .fetch_all(&mut *conn)
    .await?;
    for row in qualifying {
        points
            .entry(row.member_id)
            .or_default()
            .qualifying
            .push((row.at, row.qualifying));
    }
    Ok(profiles
        .drain()
        .map(|(id, (member, lifetime))| {
            let mut points = points.remove(id.as_str()).unwrap_or_default();
            points.lifetime = lifetime;
            (id, MemberState { member, points })
        })
        .collect())
}

/// Writes what changed in the lots of the changed members (`loaded`: each stored lot's member
/// and remaining points when the batch began) and appends the journal: new lots are inserted,
/// spent ones updated, emptied or lapsed ones deleted.
pub(super) async fn save_points(
    conn: &mut PgConnection,
    changed: &[&MemberState],
    loaded: &HashMap<i64, (MemberId, i64)>,
    journal: &[(MemberId, Entry, &str, DateTime<Utc>)],
) -> Result<(), sqlx::Error> {
    write_lots(conn, &LotChanges::of(changed, loaded)).await?;
    append_journal(conn, journal).await
}

/// What changed in the stored lots of some members, as the columns of three statements.
#[derive(Default)]
struct LotChanges<'a> {
    /// Emptied or lapsed lots: (member, lot).
    gone_members: Vec<&'a str>,
    gone: Vec<i64>,
    /// Spent lots: (member, lot, remaining).
    updated_members: Vec<&'a str>,
    updated: Vec<i64>,
    updated_remaining: Vec<i64>,
    /// New lots: (member, earned, expires, points, remaining).
    members: Vec<&'a str>,
    earned: Vec<DateTime<Utc>>,
    expires: Vec<DateTime<Utc>>,
    points: Vec<i64>,
    remaining: Vec<i64>,
}

impl<'a> LotChanges<'a> {
    /// Compares the changed members' lots with those stored (`loaded`: each stored lot's
    /// member and remaining points when the batch began).
    fn of(changed: &[&'a MemberState], loaded: &'a HashMap<i64, (MemberId, i64)>) -> Self {
        let mut c = LotChanges::default();
        let mut kept: HashSet<i64> = HashSet::new();
        for m in changed {
            let member = m.member.profile.member_id.as_str();
            for lot in &m.points.lots {
                let Some(id) = lot.id else {
                    c.members.push(member);
                    c.earned.push(lot.earned_at);
                    c.expires.push(lot.expires_at);
                    c.points.push(lot.points);
                    c.remaining.push(lot.remaining);
                    continue;
                };
                kept.insert(id);
                if loaded.get(&id).map(|(_, remaining)| *remaining) != Some(lot.remaining) {
                    c.updated_members.push(member);
                    c.updated.push(id);
                    c.updated_remaining.push(lot.remaining);
                }
            }
        }
        // A stored lot of a changed member that is no longer among its lots was emptied or
        // lapsed.
        let changed_ids: HashSet<&MemberId> = changed
            .iter()
            .map(|m| &m.member.profile.member_id)
            .collect();
        (c.gone_members, c.gone) = loaded
            .iter()
            .filter(|(id, (member, _))| changed_ids.contains(member) && !kept.contains(*id))
            .map(|(id, (member, _))| (member.as_str(), *id))
            .unzip();
        c
    }
}

/// Deletes, updates and inserts lots, one statement each (none when there is nothing to do).
async fn write_lots(conn: &mut PgConnection, c: &LotChanges<'_>) -> Result<(), sqlx::Error> {
    if !c.gone.is_empty() {
        sqlx::query!(
            "delete from point_lots l using unnest($1::text[], $2::bigint[]) as g(member_id, lot_id)
             where l.member_id = g.member_id and l.lot_id = g.lot_id",
            &c.gone_members as &[&str],
            &c.gone
        )
        .execute(&mut *conn)
        .await?;
    }
    if !c.updated.is_empty() {
        sqlx::query!(
            "update point_lots l set remaining = u.remaining
             from unnest($1::text[], $2::bigint[], $3::bigint[]) as u(member_id, lot_id, remaining)
             where l.member_id = u.member_id and l.lot_id = u.lot_id",
            &c.updated_members as &[&str],
            &c.updated,
            &c.updated_remaining
        )
        .execute(&mut *conn)
        .await?;
    }
    if !c.members.is_empty() {
        sqlx::query!(
            "insert into point_lots (member_id, earned_at, expires_at, points, remaining)
             select * from unnest($1::text[], $2::timestamptz[], $3::timestamptz[], $4::bigint[], $5::bigint[])",
            &c.members as &[&str],
            &c.earned,
            &c.expires,
            &c.points,
            &c.remaining
        )
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Appends journal entries in order, each with its cause and when it happened: the event's
/// time, except an expiry, which happened when its lot lapsed, whatever applied it.
async fn append_journal(
    conn: &mut PgConnection,
    journal: &[(MemberId, Entry, &str, DateTime<Utc>)],
) -> Result<(), sqlx::Error> {
    if journal.is_empty() {
        return Ok(());
    }
    let members: Vec<&str> = journal.iter().map(|(m, ..)| m.as_str()).collect();
    let kinds: Vec<&str> = journal.iter().map(|(_, e, ..)| e.kind.as_str()).collect();
    let points: Vec<i64> = journal.iter().map(|(_, e, ..)| e.points).collect();
    let qualifying: Vec<i64> = journal.iter().map(|(_, e, ..)| e.qualifying).collect();
    let at: Vec<DateTime<Utc>> = journal.iter().map(|(_, e, ..)| e.at).collect();
    let causes: Vec<&str> = journal.iter().map(|(_, _, c, _)| *c).collect();
    let happened: Vec<DateTime<Utc>> = journal
        .iter()
        .map(|(_, e, _, t)| {
            if e.kind == crate::ledger::EntryKind::Expiry {
                e.at
            } else {
                *t
            }
        })
        .collect();
    sqlx::query!(
        "insert into point_entries (member_id, kind, points, qualifying, at, cause, event_at)
         select m, k, p, q, a, c, h
         from unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::timestamptz[], $6::text[],
                     $7::timestamptz[])
              with ordinality as j(m, k, p, q, a, c, h, n)
         order by n",
        &members as &[&str],
        &kinds as &[&str],
        &points,
        &qualifying,
        &at,
        &causes as &[&str],
        &happened
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Loads the orders among `ids` that exist.
pub(super) async fn load_orders(
    conn: &mut PgConnection,
    ids: &[&str],
) -> Result<HashMap<String, OrderRecord>, sqlx::Error> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = sqlx::query!(
        "select order_id, member_id, currency, total_minor, earned, refunded_minor, reversed, cart_id, placed_at,
                skus
         from orders where order_id = any($1)",
        ids as &[&str]
    )
    .fetch_all(conn)
    .await?;
    rows.into_iter()
        .map(|r| {
            let member_id =
                MemberId::parse(&r.member_id).map_err(|e| sqlx::Error::Decode(e.into()))?;
            let record = OrderRecord {
                order_id: r.order_id,
                member_id,
                currency: r.currency,
                points: OrderPoints {
                    total_minor: r.total_minor,
                    earned: r.earned,
                    refunded_minor: r.refunded_minor,
                    reversed: r.reversed,
                },
                cart_id: r.cart_id,
                placed_at: r.placed_at,
                skus: serde_json::from_value(r.skus).unwrap_or_default(),
            };
            Ok((record.order_id.clone(), record))
        })
        .collect()
}

/// Inserts new orders and updates changed ones.
pub(super) async fn save_orders(
    conn: &mut PgConnection,
    orders: &[OrderRecord],
) -> Result<(), sqlx::Error> {
    if orders.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = orders.iter().map(|o| o.order_id.as_str()).collect();
    let members: Vec<&str> = orders.iter().map(|o| o.member_id.as_str()).collect();
    let currencies: Vec<&str> = orders.iter().map(|o| o.currency.as_str()).collect();
    let totals: Vec<i64> = orders.iter().map(|o| o.points.total_minor).collect();
    let earned: Vec<i64> = orders.iter().map(|o| o.points.earned).collect();
    let refunded: Vec<i64> = orders.iter().map(|o| o.points.refunded_minor).collect();
    let reversed: Vec<i64> = orders.iter().map(|o| o.points.reversed).collect();
    let carts: Vec<Option<&str>> = orders.iter().map(|o| o.cart_id.as_deref()).collect();
    let placed: Vec<DateTime<Utc>> = orders.iter().map(|o| o.placed_at).collect();
    let skus: Vec<String> = orders
        .iter()
        .map(|o| serde_json::to_string(&o.skus).expect("strings serialize"))
        .collect();
    sqlx::query!(
        "insert into orders (order_id, member_id, currency, total_minor, earned, refunded_minor, reversed, cart_id, placed_at,
                             skus)
         select o, m, c, t, e, f, r, k, p, s::jsonb
         from unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[],
                     $7::bigint[], $8::text[], $9::timestamptz[], $10::text[])
              as x(o, m, c, t, e, f, r, k, p, s)
         on conflict (order_id) do update set
             refunded_minor = excluded.refunded_minor, reversed = excluded.reversed",
        &ids as &[&str],
        &members as &[&str],
        &currencies as &[&str],
        &totals,
        &earned,
        &refunded,
        &reversed,
        &carts as &[Option<&str>],
        &placed,
        &skus
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// The orders among `ids` whose feedback has already earned its points.
pub(super) async fn feedback_rewarded(
    conn: &mut PgConnection,
    ids: &[&str],
) -> Result<std::collections::HashSet<String>, sqlx::Error> {
    if ids.is_empty() {
        return Ok(Default::default());
    }
    let rows: Vec<String> = sqlx::query_scalar!(
        r#"select distinct order_id as "order_id!" from feedback
           where order_id = any($1) and points > 0"#,
        ids as &[&str]
    )
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().collect())
}
