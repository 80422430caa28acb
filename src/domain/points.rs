//! One member's points, as pure state: earned lots with expiry dates, spent oldest first, and
//! the qualifying points that decide the tier.
//!
//! Every change returns journal entries; balance, lifetime and tier points are always
//! derivable from the journal (the property test checks it against a model). Rules where
//! DESIGN.md is silent:
//! - a refund reverses `earned × refunded / total` of its order, computed on the cumulative
//!   refunded amount so that partial refunds add up exactly, and never more than was earned;
//! - a reversal takes what the member still has: points already redeemed are not clawed back,
//!   so a balance never goes below zero (the journal records what was actually taken), while
//!   qualifying points drop by the full reversal;
//! - a redemption or a negative adjustment larger than the balance is refused (an overdraft).

use chrono::{DateTime, Months, Utc};

/// Why points moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum EntryKind {
    /// The signup bonus.
    Signup,
    /// Earned by an order.
    Order,
    /// Taken back by a refund.
    Refund,
    /// Added or removed by `points.adjusted`.
    Adjustment,
    /// Spent by `points.redeemed`.
    Redemption,
    /// What was left of a lot when it lapsed.
    Expiry,
    /// The birthday bonus.
    Birthday,
    /// Points for answering the feedback question about an order.
    Feedback,
}

impl EntryKind {
    /// The kind as stored.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            EntryKind::Signup => "signup",
            EntryKind::Order => "order",
            EntryKind::Refund => "refund",
            EntryKind::Adjustment => "adjustment",
            EntryKind::Redemption => "redemption",
            EntryKind::Feedback => "feedback",
            EntryKind::Expiry => "expiry",
            EntryKind::Birthday => "birthday",
        }
    }
}

/// One line of the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    /// Why.
    pub kind: EntryKind,
    /// Points added (positive) or taken (negative) from the balance.
    pub points: i64,
    /// Change of qualifying (tier) points: order earnings and their reversals.
    pub qualifying: i64,
    /// When (business time).
    pub at: DateTime<Utc>,
}

/// Points earned at one time, expiring together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Lot {
    /// Its row in `point_lots`; `None` until it is stored.
    pub id: Option<i64>,
    /// When it was earned.
    pub earned_at: DateTime<Utc>,
    /// When what is left of it lapses.
    pub expires_at: DateTime<Utc>,
    /// Points earned.
    pub points: i64,
    /// Points not yet spent, reversed or expired.
    pub remaining: i64,
}

/// What an order earned and what its refunds took back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OrderPoints {
    /// The order's total in minor units.
    pub total_minor: i64,
    /// Points it earned.
    pub earned: i64,
    /// Minor units refunded so far.
    pub refunded_minor: i64,
    /// Points reversed so far (qualifying points dropped by this much).
    pub reversed: i64,
}

/// A change the balance cannot cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{wanted} points wanted but only {available} available")]
pub(crate) struct Overdraft {
    /// Points asked for.
    pub wanted: i64,
    /// Points the member has.
    pub available: i64,
}

/// A member's points.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Points {
    /// Lots with points left, oldest first.
    pub lots: Vec<Lot>,
    /// Qualifying movements still inside the tier window: (when, points), oldest first.
    pub qualifying: Vec<(DateTime<Utc>, i64)>,
    /// Points ever earned or given (never decreases).
    pub lifetime: i64,
}

impl Points {
    /// Points available to spend: what is left of the lots. Lots that lapsed count until
    /// `expire` removes them, so callers expire first (the ledger does, before every event).
    pub(crate) fn balance(&self) -> i64 {
        self.lots
            .iter()
            .fold(0_i64, |sum, l| sum.saturating_add(l.remaining))
    }

    /// Qualifying points earned in the window ending at `now`.
    pub(crate) fn tier_points(&self, now: DateTime<Utc>, window_months: u32) -> i64 {
        let since = now - Months::new(window_months);
        self.qualifying
            .iter()
            .filter(|(at, _)| *at > since)
            .map(|(_, p)| p)
            .sum::<i64>()
            .max(0)
    }

    /// Removes what is left of lots that lapsed at or before `now`, and forgets qualifying
    /// movements older than the window. Returns one expiry entry per lapsed lot.
    pub(crate) fn expire(&mut self, now: DateTime<Utc>, window_months: u32) -> Vec<Entry> {
        let mut entries = Vec::new();
        self.lots.retain(|lot| {
            if lot.expires_at > now {
                return true;
            }
            if lot.remaining > 0 {
                entries.push(Entry {
                    kind: EntryKind::Expiry,
                    points: -lot.remaining,
                    qualifying: 0,
                    at: lot.expires_at,
                });
            }
            false
        });
        let since = now - Months::new(window_months);
        self.qualifying.retain(|(at, _)| *at > since);
        entries
    }

    /// Adds a lot of `points` earned at `at`, lapsing `expiry_months` later.
    pub(crate) fn earn(
        &mut self,
        kind: EntryKind,
        points: i64,
        at: DateTime<Utc>,
        expiry_months: u32,
    ) -> Option<Entry> {
        if points <= 0 {
            return None;
        }
        let lot = Lot {
            id: None,
            earned_at: at,
            expires_at: at + Months::new(expiry_months),
            points,
            remaining: points,
        };
        let at_index = self.lots.partition_point(|l| l.earned_at <= at);
        self.lots.insert(at_index, lot);
        self.lifetime = self.lifetime.saturating_add(points);
        let qualifying = if kind == EntryKind::Order { points } else { 0 };
        if qualifying != 0 {
            self.qualifying.push((at, qualifying));
        }
        Some(Entry {
            kind,
            points,
            qualifying,
            at,
        })
    }

    /// Takes `points` from the oldest lots first; refused when the balance is short.
    pub(crate) fn spend(
        &mut self,
        kind: EntryKind,
        points: i64,
        at: DateTime<Utc>,
    ) -> Result<Entry, Overdraft> {
        let available = self.balance();
        if points > available {
            return Err(Overdraft {
                wanted: points,
                available,
            });
        }
        self.take(points);
        Ok(Entry {
            kind,
            points: -points,
            qualifying: 0,
            at,
        })
    }

    /// Reverses part of an order after a refund of `refunded_minor` more minor units.
    /// Returns the entry (if anything changed) and the order's new record.
    pub(crate) fn reverse(
        &mut self,
        order: OrderPoints,
        refunded_minor: i64,
        at: DateTime<Utc>,
    ) -> (Option<Entry>, OrderPoints) {
        // Saturating: amounts are bounded when decoded, but a stored order is not re-checked.
        let refunded_total = order
            .refunded_minor
            .saturating_add(refunded_minor)
            .min(order.total_minor);
        let due = if order.total_minor == 0 {
            order.earned
        } else {
            (i128::from(order.earned) * i128::from(refunded_total) / i128::from(order.total_minor))
                as i64
        };
        let reversal = (due - order.reversed).clamp(0, order.earned - order.reversed);
        let updated = OrderPoints {
            refunded_minor: refunded_total,
            reversed: order.reversed + reversal,
            ..order
        };
        if reversal == 0 {
            return (None, updated);
        }
        let taken = reversal.min(self.balance());
        self.take(taken);
        self.qualifying.push((at, -reversal));
        (
            Some(Entry {
                kind: EntryKind::Refund,
                points: -taken,
                qualifying: -reversal,
                at,
            }),
            updated,
        )
    }

    /// Removes `points` (at most the balance) from the oldest lots.
    fn take(&mut self, mut points: i64) {
        for lot in &mut self.lots {
            if points == 0 {
                break;
            }
            let taken = points.min(lot.remaining);
            lot.remaining -= taken;
            points -= taken;
        }
        self.lots.retain(|l| l.remaining > 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn day(d: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + chrono::Duration::days(i64::from(d))
    }

    fn remaining(p: &Points) -> Vec<i64> {
        p.lots.iter().map(|l| l.remaining).collect()
    }

    #[test]
    fn refunds_and_sums_saturate_instead_of_overflowing() {
        let mut p = Points::default();
        p.earn(EntryKind::Order, i64::MAX - 5, day(0), 12);
        p.earn(EntryKind::Order, 100, day(1), 12);
        assert_eq!(p.balance(), i64::MAX);
        assert_eq!(p.lifetime, i64::MAX);
        // An order already refunded almost whole, refunded again by the most an amount holds.
        let order = OrderPoints {
            total_minor: i64::MAX,
            earned: 1_000,
            refunded_minor: i64::MAX - 1,
            reversed: 999,
        };
        let (entry, updated) = p.reverse(order, i64::MAX, day(2));
        assert_eq!(updated.refunded_minor, i64::MAX);
        assert_eq!(updated.reversed, 1_000);
        assert_eq!(entry.unwrap().qualifying, -1);
    }

    #[test]
    fn spending_takes_the_oldest_lots_first() {
        let mut p = Points::default();
        p.earn(EntryKind::Order, 50, day(10), 12);
        p.earn(EntryKind::Signup, 100, day(0), 12); // older, inserted in date order
        p.earn(EntryKind::Order, 30, day(20), 12);
        assert_eq!(remaining(&p), [100, 50, 30]);
        let entry = p.spend(EntryKind::Redemption, 120, day(30)).unwrap();
        assert_eq!(entry.points, -120);
        assert_eq!(remaining(&p), [30, 30]);
        assert_eq!(
            p.spend(EntryKind::Redemption, 61, day(31)),
            Err(Overdraft {
                wanted: 61,
                available: 60
            })
        );
        assert_eq!(p.balance(), 60, "a refused redemption changes nothing");
        assert_eq!(p.lifetime, 180);
    }

    #[test]
    fn lots_lapse_after_the_expiry_period() {
        let mut p = Points::default();
        p.earn(EntryKind::Order, 40, day(0), 12);
        p.earn(EntryKind::Order, 60, day(100), 12);
        p.spend(EntryKind::Redemption, 10, day(101)).unwrap();
        let lapse = day(0) + Months::new(12);
        assert!(
            p.expire(lapse - chrono::Duration::seconds(1), 12)
                .is_empty()
        );
        let entries = p.expire(lapse, 12);
        assert_eq!(
            entries,
            [Entry {
                kind: EntryKind::Expiry,
                points: -30,
                qualifying: 0,
                at: lapse
            }]
        );
        assert_eq!(p.balance(), 60);
        assert_eq!(
            p.tier_points(lapse, 12),
            60,
            "the first order left the tier window too"
        );
    }

    #[test]
    fn partial_refunds_add_up_to_the_whole_order() {
        let mut p = Points::default();
        let order = OrderPoints {
            total_minor: 1000,
            earned: 10,
            refunded_minor: 0,
            reversed: 0,
        };
        p.earn(EntryKind::Order, 10, day(0), 12);
        // Three refunds of a third each: 3 + 3 + 4 points, never 3 + 3 + 3.
        let (e1, order) = p.reverse(order, 333, day(1));
        let (e2, order) = p.reverse(order, 333, day(2));
        let (e3, order) = p.reverse(order, 334, day(3));
        let taken: Vec<i64> = [e1, e2, e3]
            .iter()
            .map(|e| e.as_ref().unwrap().points)
            .collect();
        assert_eq!(taken, [-3, -3, -4]);
        assert_eq!(order.reversed, 10);
        // A further refund of the same order reverses nothing more.
        let (e4, order) = p.reverse(order, 500, day(4));
        assert!(e4.is_none());
        assert_eq!(order.reversed, 10);
        assert_eq!(p.balance(), 0);
        assert_eq!(p.tier_points(day(5), 12), 0);
    }

    #[test]
    fn a_refund_of_spent_points_takes_only_what_is_left() {
        let mut p = Points::default();
        p.earn(EntryKind::Order, 100, day(0), 12);
        p.spend(EntryKind::Redemption, 80, day(1)).unwrap();
        let order = OrderPoints {
            total_minor: 10_000,
            earned: 100,
            refunded_minor: 0,
            reversed: 0,
        };
        let (entry, order) = p.reverse(order, 10_000, day(2));
        let entry = entry.unwrap();
        assert_eq!((entry.points, entry.qualifying), (-20, -100));
        assert_eq!(order.reversed, 100);
        assert_eq!(p.balance(), 0);
        assert_eq!(p.tier_points(day(3), 12), 0);
    }

    #[test]
    fn only_order_points_qualify_for_tiers() {
        let mut p = Points::default();
        p.earn(EntryKind::Signup, 100, day(0), 12);
        p.earn(EntryKind::Adjustment, 400, day(1), 12);
        p.earn(EntryKind::Order, 70, day(2), 12);
        assert_eq!(p.balance(), 570);
        assert_eq!(p.tier_points(day(3), 12), 70);
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;

    const EXPIRY: u32 = 12;
    const WINDOW: u32 = 12;

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
            (1..50_000_i64).prop_map(|total_minor| Op::Order { total_minor }),
            (0..8_usize, 1..30_000_i64).prop_map(|(order, minor)| Op::Refund { order, minor }),
            (-300..300_i64).prop_map(|points| Op::Adjust { points }),
            (1..400_i64).prop_map(|points| Op::Redeem { points }),
            (0..200_i64).prop_map(|days| Op::Advance { days }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn the_journal_explains_every_balance(ops in proptest::collection::vec(op(), 1..80)) {
            let mut now = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
            let mut points = Points::default();
            let mut journal: Vec<Entry> = Vec::new();
            let mut orders: Vec<OrderPoints> = Vec::new();
            let mut all_qualifying: Vec<(DateTime<Utc>, i64)> = Vec::new();
            for op in ops {
                journal.extend(points.expire(now, WINDOW));
                match op {
                    Op::Order { total_minor } => {
                        let earned = total_minor / 100; // 1 point per major unit
                        if let Some(entry) = points.earn(EntryKind::Order, earned, now, EXPIRY) {
                            all_qualifying.push((now, entry.qualifying));
                            journal.push(entry);
                        }
                        orders.push(OrderPoints { total_minor, earned, refunded_minor: 0, reversed: 0 });
                    }
                    Op::Refund { order, minor } => {
                        if let Some(record) = orders.get(order).copied() {
                            let (entry, updated) = points.reverse(record, minor, now);
                            prop_assert!(updated.reversed <= updated.earned, "never more than was earned");
                            let model = updated.earned * updated.refunded_minor / updated.total_minor;
                            prop_assert_eq!(updated.reversed, model, "reversed = earned × refunded / total");
                            prop_assert!(updated.refunded_minor <= updated.total_minor);
                            if let Some(entry) = entry {
                                all_qualifying.push((now, entry.qualifying));
                                journal.push(entry);
                            }
                            orders[order] = updated;
                        }
                    }
                    Op::Adjust { points: n } if n > 0 => journal.extend(points.earn(EntryKind::Adjustment, n, now, EXPIRY)),
                    Op::Adjust { points: n } | Op::Redeem { points: n } => {
                        let before = points.clone();
                        match points.spend(EntryKind::Redemption, n.abs(), now) {
                            Ok(entry) => journal.push(entry),
                            Err(overdraft) => {
                                prop_assert_eq!(&points, &before, "a refused spend changes nothing");
                                prop_assert!(overdraft.wanted > overdraft.available);
                            }
                        }
                    }
                    Op::Advance { days } => {
                        now += chrono::Duration::days(days);
                        journal.extend(points.expire(now, WINDOW));
                    }
                }

                let journal_sum: i64 = journal.iter().map(|e| e.points).sum();
                prop_assert_eq!(points.balance(), journal_sum, "balance = sum of the journal");
                prop_assert!(points.balance() >= 0);
                let earned: i64 = journal.iter().filter(|e| e.points > 0).map(|e| e.points).sum();
                prop_assert_eq!(points.lifetime, earned, "lifetime = everything ever earned");
                // FIFO: only the oldest lot can have been partly used.
                for lot in points.lots.iter().skip(1) {
                    prop_assert_eq!(lot.remaining, lot.points, "a younger lot was touched first");
                }
                prop_assert!(points.lots.windows(2).all(|w| w[0].earned_at <= w[1].earned_at));
                prop_assert!(points.lots.iter().all(|l| l.remaining > 0 && l.expires_at > now));
                let since = now - Months::new(WINDOW);
                let window: i64 = all_qualifying.iter().filter(|(at, _)| *at > since).map(|(_, q)| q).sum();
                prop_assert_eq!(points.tier_points(now, WINDOW), window.max(0), "tier points = qualifying journal in the window");
            }
        }
    }
}
