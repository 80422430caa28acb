//! The benchmark's events: a shop's mix, generated as it is published (a million bodies held
//! at once would be the bench's largest use of memory, not lifecycle's).
//!
//! Of every 20 events, 12 are orders, 4 cart updates, 2 enrolments, 1 a refund and 1 an
//! adjustment, a redemption or a feedback answer in turn: the issue's 60/20/10/5/5. Enrolments
//! stop at `members`; their slots then carry orders. A member's other events come at least
//! `lag` events after its enrolment, and a refund at least `lag` after its order, so that no
//! event of the run waits for one still in another consumer's hands (a shop's member buys days
//! after signing up): a slot that has nothing old enough to refer to carries an enrolment
//! (or an order) instead.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::json;

/// Orders' currencies and totals in minor units, in turn.
const CURRENCIES: [(&str, i64); 4] = [
    ("USD", 4_599),
    ("EUR", 12_000),
    ("KRW", 54_000),
    ("TRY", 123_456),
];

/// What each of 20 consecutive events is.
const CYCLE: [Kind; 20] = {
    use Kind::*;
    [
        Enrol, Order, Order, Order, Cart, Order, Order, Order, Cart, Order, Enrol, Order, Order,
        Order, Cart, Order, Order, Cart, Refund, Other,
    ]
};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Enrol,
    Order,
    Cart,
    Refund,
    Other,
}

/// When the events say they happened.
#[derive(Clone, Copy, Debug)]
pub(super) enum Time {
    /// Every event at this instant.
    Fixed(DateTime<Utc>),
    /// The moment each event is made (to the microsecond): the start of its latency.
    Live,
}

/// An endless, deterministic stream of `(routing key, body)`.
pub(super) struct Workload {
    tag: String,
    members: usize,
    lag: usize,
    time: Time,
    /// Events made so far.
    k: usize,
    /// The position of each member's enrolment, in order.
    enrolled_at: Vec<u32>,
    /// (position, member) of each order.
    orders: Vec<(u32, u32)>,
    refunds: usize,
    others: usize,
}

impl Workload {
    /// A stream for `members` members whose ids and event ids all carry `tag`.
    pub(super) fn new(tag: &str, members: usize, lag: usize, time: Time) -> Workload {
        Workload {
            tag: tag.to_owned(),
            members: members.max(1),
            lag,
            time,
            k: 0,
            enrolled_at: Vec::with_capacity(members),
            orders: Vec::new(),
            refunds: 0,
            others: 0,
        }
    }

    /// Members enrolled at least `lag` events ago.
    fn settled_members(&self) -> usize {
        let k = self.k;
        self.enrolled_at
            .partition_point(|&at| at as usize + self.lag <= k)
    }

    /// One of the settled members, spread evenly and repeatably.
    fn pick(&self, settled: usize, salt: u64) -> usize {
        (splitmix(self.k as u64 ^ salt) % settled as u64) as usize
    }

    fn event(&self, kind: &str, data: serde_json::Value) -> (&'static str, String) {
        let time = match self.time {
            Time::Fixed(t) => t,
            Time::Live => Utc::now(),
        };
        let body = json!({
            "specversion": "1.0", "id": format!("{}-{}", self.tag, self.k), "source": "bench",
            "type": kind, "time": time.to_rfc3339_opts(SecondsFormat::Micros, true), "data": data,
        });
        (static_kind(kind), body.to_string())
    }

    fn member(&self, m: usize) -> String {
        format!("{}-m{m}", self.tag)
    }

    fn enrolment(&mut self) -> (&'static str, String) {
        let m = self.enrolled_at.len();
        self.enrolled_at.push(self.k as u32);
        self.event(
            "member.enrolled",
            json!({
                "member_id": self.member(m), "email": format!("member{m}@example.com"),
                "first_name": "Bench", "locale": (["en", "ko", "tr"][m % 3]),
                "timezone": "Europe/Istanbul", "consent": {"email": true, "sms": false}
            }),
        )
    }

    fn order(&mut self, settled: usize) -> (&'static str, String) {
        let m = self.pick(settled, 1);
        let (currency, total) = CURRENCIES[self.k % CURRENCIES.len()];
        let skus = 1 + self.k % 3;
        let items: Vec<serde_json::Value> = (0..skus)
            .map(|s| json!({"sku": format!("SKU-{}", (self.k + s * 7) % 50), "name": "Tea", "quantity": 1,
                "unit_price": total / skus as i64}))
            .collect();
        let mut data = json!({
            "order_id": format!("{}-o{}", self.tag, self.k), "member_id": self.member(m),
            "total": total, "currency": currency, "items": items,
        });
        // A quarter of orders check out the member's cart.
        if self.k % 4 == 1 {
            data["cart_id"] = json!(format!("{}-c{m}", self.tag));
        }
        self.orders.push((self.k as u32, m as u32));
        self.event("order.placed", data)
    }

    fn cart(&self, settled: usize) -> (&'static str, String) {
        let m = self.pick(settled, 2);
        self.event(
            "cart.updated",
            json!({
                "cart_id": format!("{}-c{m}", self.tag), "member_id": self.member(m),
                "items": [{"sku": "SKU-1", "name": "Tea", "quantity": 1 + self.k % 3, "unit_price": 1_000}],
                "total": 1_000 * (1 + self.k % 3) as i64, "currency": "USD",
                "checkout_url": format!("https://shop.example/cart/{m}"),
            }),
        )
    }

    /// A refund of half of every tenth order, once it is old enough; `None` if it is not yet.
    fn refund(&mut self) -> Option<(&'static str, String)> {
        let &(at, m) = self.orders.get(self.refunds * 10)?;
        if at as usize + self.lag > self.k {
            return None;
        }
        self.refunds += 1;
        let (currency, total) = CURRENCIES[at as usize % CURRENCIES.len()];
        Some(self.event(
            "order.refunded",
            json!({"order_id": format!("{}-o{at}", self.tag), "member_id": self.member(m as usize),
                "amount": total / 2, "currency": currency}),
        ))
    }

    fn other(&mut self, settled: usize) -> (&'static str, String) {
        let m = self.pick(settled, 3);
        self.others += 1;
        match self.others % 3 {
            0 => self.event(
                "points.adjusted",
                json!({"member_id": self.member(m), "points": 25, "reason": "review"}),
            ),
            // The signup bonus covers ten of these.
            1 => self.event(
                "points.redeemed",
                json!({"member_id": self.member(m), "points": 10}),
            ),
            _ => self.event(
                "feedback.submitted",
                json!({"member_id": self.member(m), "score": self.k % 11}),
            ),
        }
    }
}

impl Iterator for Workload {
    type Item = (&'static str, String);

    fn next(&mut self) -> Option<Self::Item> {
        let settled = self.settled_members();
        let can_enrol = self.enrolled_at.len() < self.members;
        let event = match CYCLE[self.k % CYCLE.len()] {
            _ if settled == 0 => self.enrolment(),
            Kind::Enrol if can_enrol => self.enrolment(),
            Kind::Enrol | Kind::Order => self.order(settled),
            Kind::Cart => self.cart(settled),
            Kind::Refund => match self.refund() {
                Some(event) => event,
                None => self.order(settled),
            },
            Kind::Other => self.other(settled),
        };
        self.k += 1;
        Some(event)
    }
}

fn static_kind(kind: &str) -> &'static str {
    [
        "member.enrolled",
        "order.placed",
        "cart.updated",
        "order.refunded",
        "points.adjusted",
        "points.redeemed",
        "feedback.submitted",
    ]
    .into_iter()
    .find(|k| *k == kind)
    .unwrap_or("member.invalid")
}

/// A well-mixed 64-bit hash (SplitMix64's finalizer).
fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn fixed() -> Time {
        Time::Fixed("2026-11-22T10:00:00Z".parse().unwrap())
    }

    #[test]
    fn the_mix_is_the_issues_and_every_event_refers_to_what_came_long_enough_before() {
        let (n, lag) = (100_000, 5_000);
        let mut enrolled: HashMap<String, usize> = HashMap::new();
        let mut ordered: HashMap<String, usize> = HashMap::new();
        let mut kinds: HashMap<&str, usize> = HashMap::new();
        for (k, (kind, body)) in Workload::new("t", 10_000, lag, fixed()).take(n).enumerate() {
            *kinds.entry(kind).or_default() += 1;
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["type"], kind);
            assert_eq!(v["id"], format!("t-{k}"));
            let member = v["data"]["member_id"].as_str().unwrap().to_owned();
            match kind {
                "member.enrolled" => assert!(enrolled.insert(member, k).is_none()),
                _ => assert!(enrolled[&member] + lag <= k, "event {k} came too soon"),
            }
            let order = v["data"]["order_id"].as_str().map(str::to_owned);
            match kind {
                "order.placed" => assert!(ordered.insert(order.unwrap(), k).is_none()),
                "order.refunded" => assert!(ordered[&order.unwrap()] + lag <= k),
                _ => {}
            }
        }
        let share = |k: &str| kinds.get(k).copied().unwrap_or(0) as f64 / n as f64;
        assert_eq!(enrolled.len(), 10_000);
        assert!((share("order.placed") - 0.60).abs() < 0.02, "{kinds:?}");
        assert!((share("cart.updated") - 0.20).abs() < 0.015, "{kinds:?}");
        assert!((share("order.refunded") - 0.05).abs() < 0.01, "{kinds:?}");
        let other =
            share("points.adjusted") + share("points.redeemed") + share("feedback.submitted");
        assert!((other - 0.05).abs() < 0.005, "{kinds:?}");
    }

    #[test]
    fn ten_percent_are_enrolments_when_the_members_last_the_run() {
        let n = 30_000;
        let enrolments = Workload::new("t", 1_000_000, 1_000, fixed())
            .take(n)
            .filter(|(kind, _)| *kind == "member.enrolled")
            .count();
        // The first `lag` events are all enrolments; then one in ten.
        assert_eq!(enrolments, 1_000 + (n - 1_000) / 10);
    }
}
