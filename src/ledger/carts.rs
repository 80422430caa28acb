//! Carts and their abandoned-cart timers.
//!
//! A cart's events can arrive out of order (several consumers, retries), so each carries its
//! event time and the newest wins: an update older than what the cart has seen changes
//! nothing. Every newer `cart.updated` bumps the version and re-arms the timer; a checkout, or
//! an order naming the cart, closes it. The scan (`due`, then `triggers::abandoned_cart`)
//! plans one message per (cart, version).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use crate::domain::{CartState, MemberId, quoted};
use crate::event::Cart;

/// A cart change refused because the cart is someone else's.
fn not_theirs(cart_id: &str) -> String {
    format!("cart {} belongs to another member", quoted(cart_id))
}

impl CartState {
    /// The cart after a `cart.updated` that happened at `at`: `Ok(None)` when the cart has
    /// already seen something newer.
    pub fn updated(
        existing: Option<&CartState>,
        cart: &Cart,
        at: DateTime<Utc>,
        delay: chrono::Duration,
    ) -> Result<Option<CartState>, String> {
        if let Some(old) = existing {
            if old.member_id != cart.member_id {
                return Err(not_theirs(cart.cart_id.as_str()));
            }
            // A checkout and an update at the same instant: the checkout wins, whichever was
            // applied first (DESIGN.md), so an update never reopens a cart closed at its time.
            if at < old.changed_at || (!old.open && at == old.changed_at) {
                return Ok(None);
            }
        }
        Ok(Some(CartState {
            cart_id: cart.cart_id.to_string(),
            member_id: cart.member_id.clone(),
            version: existing.map_or(0, |c| c.version) + 1,
            open: true,
            changed_at: at,
            due_at: Some(at + delay),
            notified_version: existing.and_then(|c| c.notified_version),
            items: serde_json::to_value(&cart.items).unwrap_or_default(),
            total_minor: cart.total.minor,
            currency: cart.total.currency.code().to_owned(),
            checkout_url: cart.checkout_url.clone(),
        }))
    }

    /// The cart after a checkout at `at` (a `cart.checked_out`, or an order naming it).
    /// A checkout of a cart not seen yet is recorded closed, so that its updates arriving late
    /// do not open it. `Ok(None)`: nothing changes (already closed, or updated since).
    pub fn closed(
        existing: Option<&CartState>,
        cart_id: &str,
        member_id: &MemberId,
        at: DateTime<Utc>,
    ) -> Result<Option<CartState>, String> {
        match existing {
            Some(old) if &old.member_id != member_id => Err(not_theirs(cart_id)),
            Some(old) if !old.open || at < old.changed_at => Ok(None),
            Some(old) => Ok(Some(CartState {
                open: false,
                changed_at: at,
                due_at: None,
                ..old.clone()
            })),
            None => Ok(Some(CartState {
                cart_id: cart_id.to_owned(),
                member_id: member_id.clone(),
                version: 0,
                open: false,
                changed_at: at,
                due_at: None,
                notified_version: None,
                items: serde_json::Value::Array(Vec::new()),
                total_minor: 0,
                currency: String::new(),
                checkout_url: String::new(),
            })),
        }
    }
}

/// A cart's row as stored.
struct Stored {
    cart_id: String,
    member_id: String,
    version: i32,
    open: bool,
    changed_at: DateTime<Utc>,
    due_at: Option<DateTime<Utc>>,
    notified_version: Option<i32>,
    items: serde_json::Value,
    total_minor: i64,
    currency: String,
    checkout_url: String,
}

fn from_row(row: Stored) -> Result<CartState, sqlx::Error> {
    Ok(CartState {
        cart_id: row.cart_id,
        member_id: MemberId::parse(&row.member_id).map_err(|e| sqlx::Error::Decode(e.into()))?,
        version: row.version,
        open: row.open,
        changed_at: row.changed_at,
        due_at: row.due_at,
        notified_version: row.notified_version,
        items: row.items,
        total_minor: row.total_minor,
        currency: row.currency,
        checkout_url: row.checkout_url,
    })
}

/// Loads the carts among `ids` that exist.
pub(super) async fn load(
    conn: &mut PgConnection,
    ids: &[&str],
) -> Result<HashMap<String, CartState>, sqlx::Error> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = sqlx::query_as!(
        Stored,
        "select cart_id, member_id, version, open, changed_at, due_at, notified_version,
                items, total_minor, currency, checkout_url
         from carts where cart_id = any($1)",
        ids as &[&str]
    )
    .fetch_all(conn)
    .await?;
    rows.into_iter()
        .map(|r| from_row(r).map(|c| (c.cart_id.clone(), c)))
        .collect()
}

/// Open carts whose timer ran out by `now` and that have no message for their version, oldest
/// first; `after` pages through them by cart id.
pub(crate) async fn due(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
    after: &str,
    limit: i64,
) -> Result<Vec<CartState>, sqlx::Error> {
    let rows = sqlx::query_as!(
        Stored,
        "select cart_id, member_id, version, open, changed_at, due_at, notified_version,
                items, total_minor, currency, checkout_url
         from carts
         where open and notified_version is distinct from version and due_at <= $1 and cart_id > $2
         order by cart_id limit $3",
        now,
        after,
        limit
    )
    .fetch_all(conn)
    .await?;
    rows.into_iter().map(from_row).collect()
}

/// Inserts or replaces the given carts.
pub(super) async fn save(conn: &mut PgConnection, carts: &[&CartState]) -> Result<(), sqlx::Error> {
    if carts.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = carts.iter().map(|c| c.cart_id.as_str()).collect();
    let members: Vec<&str> = carts.iter().map(|c| c.member_id.as_str()).collect();
    let versions: Vec<i32> = carts.iter().map(|c| c.version).collect();
    let open: Vec<bool> = carts.iter().map(|c| c.open).collect();
    let changed: Vec<DateTime<Utc>> = carts.iter().map(|c| c.changed_at).collect();
    let due: Vec<Option<DateTime<Utc>>> = carts.iter().map(|c| c.due_at).collect();
    let notified: Vec<Option<i32>> = carts.iter().map(|c| c.notified_version).collect();
    let items: Vec<String> = carts.iter().map(|c| c.items.to_string()).collect();
    let totals: Vec<i64> = carts.iter().map(|c| c.total_minor).collect();
    let currencies: Vec<&str> = carts.iter().map(|c| c.currency.as_str()).collect();
    let urls: Vec<&str> = carts.iter().map(|c| c.checkout_url.as_str()).collect();
    sqlx::query!(
        "insert into carts (cart_id, member_id, version, open, changed_at, due_at, notified_version,
                            items, total_minor, currency, checkout_url)
         select c, m, v, o, ch, d, n, i::jsonb, t, cu, u
         from unnest($1::text[], $2::text[], $3::int[], $4::bool[], $5::timestamptz[],
                     $6::timestamptz[], $7::int[], $8::text[], $9::bigint[], $10::text[], $11::text[])
              as x(c, m, v, o, ch, d, n, i, t, cu, u)
         on conflict (cart_id) do update set
             version = excluded.version, open = excluded.open, changed_at = excluded.changed_at,
             due_at = excluded.due_at, notified_version = excluded.notified_version,
             items = excluded.items, total_minor = excluded.total_minor,
             currency = excluded.currency, checkout_url = excluded.checkout_url",
        &ids as &[&str],
        &members as &[&str],
        &versions,
        &open,
        &changed,
        &due as &[Option<DateTime<Utc>>],
        &notified as &[Option<i32>],
        &items,
        &totals,
        &currencies as &[&str],
        &urls as &[&str]
    )
    .execute(conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Currency, Money, RecordId};
    use chrono::TimeZone;

    fn t(minute: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 22, 10, minute, 0).unwrap()
    }

    fn cart(member: &str) -> Cart {
        Cart {
            cart_id: RecordId::parse("cart_id", "c1").unwrap(),
            member_id: MemberId::parse(member).unwrap(),
            items: Vec::new(),
            total: Money::new("total", 1_000, Currency::parse("USD").unwrap()).unwrap(),
            checkout_url: "https://shop.example/c1".into(),
        }
    }

    const HOUR: chrono::Duration = chrono::Duration::hours(1);

    #[test]
    fn newer_updates_bump_the_version_and_move_the_timer() {
        let first = CartState::updated(None, &cart("m1"), t(0), HOUR)
            .unwrap()
            .unwrap();
        assert_eq!((first.version, first.due_at), (1, Some(t(0) + HOUR)));
        let second = CartState::updated(Some(&first), &cart("m1"), t(20), HOUR)
            .unwrap()
            .unwrap();
        assert_eq!((second.version, second.due_at), (2, Some(t(20) + HOUR)));
        // An update that happened before the newest one seen arrives late: nothing changes.
        assert_eq!(
            CartState::updated(Some(&second), &cart("m1"), t(10), HOUR),
            Ok(None)
        );
    }

    #[test]
    fn a_checkout_closes_and_late_updates_stay_closed() {
        let open = CartState::updated(None, &cart("m1"), t(0), HOUR)
            .unwrap()
            .unwrap();
        let member = MemberId::parse("m1").unwrap();
        let closed = CartState::closed(Some(&open), "c1", &member, t(5))
            .unwrap()
            .unwrap();
        assert!(!closed.open && closed.due_at.is_none());
        assert_eq!(
            CartState::updated(Some(&closed), &cart("m1"), t(3), HOUR),
            Ok(None)
        );
        // A checkout before any update was seen is remembered.
        let unseen = CartState::closed(None, "c1", &member, t(5))
            .unwrap()
            .unwrap();
        assert_eq!(
            CartState::updated(Some(&unseen), &cart("m1"), t(4), HOUR),
            Ok(None)
        );
        // Shopping again after checkout opens it anew.
        let again = CartState::updated(Some(&closed), &cart("m1"), t(30), HOUR)
            .unwrap()
            .unwrap();
        assert!(again.open && again.version == 2);
    }

    #[test]
    fn a_checkout_and_an_update_at_the_same_instant_leave_the_cart_closed() {
        let member = MemberId::parse("m1").unwrap();
        let open = CartState::updated(None, &cart("m1"), t(0), HOUR)
            .unwrap()
            .unwrap();
        // Checkout applied first, then the update of the same second.
        let closed = CartState::closed(Some(&open), "c1", &member, t(5))
            .unwrap()
            .unwrap();
        assert_eq!(
            CartState::updated(Some(&closed), &cart("m1"), t(5), HOUR),
            Ok(None)
        );
        // The update applied first, then the checkout of the same second.
        let updated = CartState::updated(Some(&open), &cart("m1"), t(5), HOUR)
            .unwrap()
            .unwrap();
        let closed = CartState::closed(Some(&updated), "c1", &member, t(5))
            .unwrap()
            .unwrap();
        assert!(!closed.open && closed.due_at.is_none());
        // A checkout never seen an update before, tied with one.
        let unseen = CartState::closed(None, "c1", &member, t(5))
            .unwrap()
            .unwrap();
        assert_eq!(
            CartState::updated(Some(&unseen), &cart("m1"), t(5), HOUR),
            Ok(None)
        );
    }

    #[test]
    fn another_members_cart_is_refused() {
        let open = CartState::updated(None, &cart("m1"), t(0), HOUR)
            .unwrap()
            .unwrap();
        assert!(CartState::updated(Some(&open), &cart("m2"), t(1), HOUR).is_err());
        let other = MemberId::parse("m2").unwrap();
        assert!(CartState::closed(Some(&open), "c1", &other, t(1)).is_err());
    }
}
