//! The loyalty programme's rules (`[program]` in lifecycle.toml), checked once at start-up.
//!
//! Defaults follow DESIGN.md: earn 1 point per USD or EUR, per ₩1000, per ₺10; a 100-point
//! signup bonus; a reward at every 100 points; lots expire 12 months after they are earned;
//! Bronze 0, Silver 500, Gold 1500 qualifying points in a rolling 12 months; birthday messages
//! at 09:00 local time; carts abandoned after an hour; expiry notices 30 and 7 days ahead.

use std::collections::BTreeMap;

use anyhow::{bail, ensure};
use chrono::NaiveTime;
use serde::Deserialize;

use crate::domain::{Currency, Locale, Money};

/// The most points one order earns.
pub(crate) const MAX_POINTS_PER_ORDER: i64 = 1_000_000_000_000;

/// How many points an amount in one currency earns: `points` per `per` major units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EarnRate {
    /// Points earned for every `per` major units.
    pub points: i64,
    /// Major units (dollars, won, lira) that earn `points`.
    pub per: i64,
}

/// A reward a member can redeem points for.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reward {
    /// Points it costs; crossing this balance upward fires redemption-ready.
    pub points: i64,
    /// What it buys, in major units of the member's currency (10 = "10 off").
    pub discount: i64,
}

/// A tier and what it brings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    /// Name shown to members (Bronze, Silver, Gold).
    pub name: String,
    /// Qualifying points in the rolling window needed to hold it.
    pub threshold: i64,
    /// Benefits listed in the tier-up message.
    #[serde(default)]
    pub benefits: Vec<String>,
    /// The name and benefits in other languages, by locale (`ko`, `tr`, `ko-KR`):
    /// `translations.ko = { name = "골드", benefits = ["무료 배송"] }`.
    #[serde(default)]
    pub translations: BTreeMap<String, TierText>,
}

/// A tier's name and benefits in one language; what is left out stays as in the tier.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierText {
    /// The tier's name.
    pub name: Option<String>,
    /// Its benefits.
    pub benefits: Option<Vec<String>>,
}

/// The programme's rules.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Program {
    /// Earn rate per ISO 4217 code; orders in other currencies earn nothing (and say so).
    pub earn: BTreeMap<String, EarnRate>,
    /// Points given on enrolment.
    #[serde(deserialize_with = "crate::domain::parsed")]
    pub signup_bonus: i64,
    /// Rewards, by their cost in points.
    pub rewards: Vec<Reward>,
    /// Months after which an earned lot expires.
    #[serde(deserialize_with = "crate::domain::parsed")]
    pub expiry_months: u32,
    /// Months of the rolling window of qualifying points.
    #[serde(deserialize_with = "crate::domain::parsed")]
    pub tier_window_months: u32,
    /// Tiers, lowest first; the first must start at 0.
    pub tiers: Vec<Tier>,
    /// Points given on the birthday (0: none).
    #[serde(deserialize_with = "crate::domain::parsed")]
    pub birthday_bonus: i64,
    /// Local time of the birthday message, `HH:MM`.
    pub birthday_time: String,
    /// Minutes a cart must stay open and unchanged to be abandoned.
    #[serde(deserialize_with = "crate::domain::parsed")]
    pub abandoned_cart_minutes: u32,
    /// Days before a lot's expiry at which a notice goes out, farthest first.
    pub expiring_notice_days: Vec<u32>,
    /// The coupon pool each trigger's messages draw a code from (`abandoned-cart = "CART10"`).
    pub coupons: BTreeMap<String, String>,
    /// A pool with this many codes left or fewer is logged and counted as running low.
    #[serde(deserialize_with = "crate::domain::parsed")]
    pub coupon_low_water: i64,
    /// Points for answering the feedback question about an order, once per order (0: none).
    #[serde(deserialize_with = "crate::domain::parsed")]
    pub feedback_points: i64,
    /// The share of members held out of each trigger as its control group.
    pub holdout_percent: Holdout,
}

/// `[program] holdout_percent`: the percentage of members (0 to 100, two decimals) held out of
/// a trigger, for all triggers (`holdout_percent = 10`) or per trigger
/// (`[program.holdout_percent]` with `welcome = 50`, `default = 10`). Who is held out is a
/// stable hash of member and trigger: the same member is always on the same side of the
/// same trigger, on every replica and after every restart, and the sides of two triggers are
/// independent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Holdout {
    /// Basis points (hundredths of a percent) of triggers without their own share.
    default: u32,
    /// Basis points, by trigger name.
    per_trigger: BTreeMap<String, u32>,
}

impl Holdout {
    /// The share held out of `trigger`, in percent.
    pub fn percent(&self, trigger: &str) -> f64 {
        f64::from(self.basis_points(trigger)) / 100.0
    }

    fn basis_points(&self, trigger: &str) -> u32 {
        self.per_trigger
            .get(trigger)
            .copied()
            .unwrap_or(self.default)
    }

    /// Whether `member_id` is in `trigger`'s control group.
    pub fn holds_out(&self, member_id: &str, trigger: &str) -> bool {
        let share = self.basis_points(trigger);
        share > 0 && holdout_bucket(member_id, trigger) < share
    }

    /// Refuses a share outside 0 to 100 or a name that is not a trigger.
    fn check(&self) -> anyhow::Result<()> {
        ensure!(
            self.default <= 10_000,
            "program.holdout_percent must be between 0 and 100"
        );
        for (trigger, share) in &self.per_trigger {
            ensure!(
                crate::domain::Trigger::parse(trigger).is_some(),
                "program.holdout_percent: {trigger:?} is not a trigger"
            );
            ensure!(
                *share <= 10_000,
                "program.holdout_percent.{trigger} must be between 0 and 100"
            );
        }
        Ok(())
    }
}

/// A member's bucket for a trigger, 0 to 9,999: the first eight bytes of
/// SHA-256(member id, NUL, trigger) modulo 10,000. Fixed forever: changing it would move
/// members between a trigger's sides mid-measurement.
pub(crate) fn holdout_bucket(member_id: &str, trigger: &str) -> u32 {
    let mut input = Vec::with_capacity(member_id.len() + trigger.len() + 1);
    input.extend_from_slice(member_id.as_bytes());
    input.push(0);
    input.extend_from_slice(trigger.as_bytes());
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &input);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_ref()[..8]);
    (u64::from_be_bytes(first) % 10_000) as u32
}

/// A percentage, as basis points.
fn basis_points(value: &toml::Value) -> Result<u32, String> {
    let percent = match value {
        toml::Value::Integer(i) => *i as f64,
        toml::Value::Float(f) => *f,
        toml::Value::String(s) => s
            .trim()
            .parse::<f64>()
            .map_err(|_| format!("{s:?} is not a percentage"))?,
        other => return Err(format!("expected a percentage, found {}", other.type_str())),
    };
    if !(0.0..=100.0).contains(&percent) {
        return Err(format!("{percent} is not between 0 and 100"));
    }
    Ok((percent * 100.0).round() as u32)
}

impl<'de> Deserialize<'de> for Holdout {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let value = toml::Value::deserialize(deserializer)?;
        let mut holdout = Holdout::default();
        match value {
            toml::Value::Table(table) => {
                for (key, value) in table {
                    let share = basis_points(&value)
                        .map_err(|e| D::Error::custom(format!("{key}: {e}")))?;
                    if key == "default" {
                        holdout.default = share;
                    } else {
                        holdout.per_trigger.insert(key, share);
                    }
                }
            }
            value => holdout.default = basis_points(&value).map_err(D::Error::custom)?,
        }
        Ok(holdout)
    }
}

impl Default for Program {
    fn default() -> Self {
        let rate = |points, per| EarnRate { points, per };
        let tier = |name: &str, threshold, benefits: &[&str]| Tier {
            name: name.into(),
            threshold,
            benefits: benefits.iter().map(|b| (*b).into()).collect(),
            translations: BTreeMap::new(),
        };
        Program {
            earn: [
                ("USD", rate(1, 1)),
                ("EUR", rate(1, 1)),
                ("KRW", rate(1, 1000)),
                ("TRY", rate(1, 10)),
            ]
            .into_iter()
            .map(|(code, rate)| (code.to_owned(), rate))
            .collect(),
            signup_bonus: 100,
            rewards: vec![Reward {
                points: 100,
                discount: 10,
            }],
            expiry_months: 12,
            tier_window_months: 12,
            tiers: vec![
                tier("Bronze", 0, &["Points on every order"]),
                tier(
                    "Silver",
                    500,
                    &["Free standard shipping", "Early access to sales"],
                ),
                tier(
                    "Gold",
                    1500,
                    &[
                        "Free express shipping",
                        "Early access to sales",
                        "A gift every quarter",
                    ],
                ),
            ],
            birthday_bonus: 0,
            birthday_time: "09:00".into(),
            abandoned_cart_minutes: 60,
            expiring_notice_days: vec![30, 7],
            coupons: BTreeMap::new(),
            coupon_low_water: 100,
            feedback_points: 0,
            holdout_percent: Holdout::default(),
        }
    }
}

impl Program {
    /// Refuses a programme that cannot work, naming the key.
    pub fn check(&self) -> anyhow::Result<()> {
        for (code, rate) in &self.earn {
            Currency::parse(code).map_err(|e| anyhow::anyhow!("program.earn.{code}: {e}"))?;
            ensure!(
                rate.points >= 0,
                "program.earn.{code}: points must not be negative"
            );
            ensure!(rate.per > 0, "program.earn.{code}: per must be at least 1");
        }
        ensure!(
            self.signup_bonus >= 0,
            "program.signup_bonus must not be negative"
        );
        ensure!(
            self.birthday_bonus >= 0,
            "program.birthday_bonus must not be negative"
        );
        for pair in self.rewards.windows(2) {
            ensure!(
                pair[0].points < pair[1].points,
                "program.rewards must be in increasing order of points"
            );
        }
        for reward in &self.rewards {
            ensure!(
                reward.points > 0 && reward.discount > 0,
                "program.rewards: points and discount must be at least 1"
            );
        }
        match self.tiers.first() {
            Some(first) if first.threshold == 0 => {}
            _ => bail!("program.tiers: the first tier must have threshold 0"),
        }
        for pair in self.tiers.windows(2) {
            ensure!(
                pair[0].threshold < pair[1].threshold,
                "program.tiers must be in increasing order of threshold ({} then {})",
                pair[0].name,
                pair[1].name
            );
        }
        ensure!(
            self.expiry_months >= 1,
            "program.expiry_months must be at least 1"
        );
        ensure!(
            self.tier_window_months >= 1,
            "program.tier_window_months must be at least 1"
        );
        ensure!(
            self.abandoned_cart_minutes >= 1,
            "program.abandoned_cart_minutes must be at least 1"
        );
        self.birthday_time()?;
        for days in &self.expiring_notice_days {
            ensure!(
                (1..=366).contains(days),
                "program.expiring_notice_days: {days} is not between 1 and 366"
            );
        }
        for (trigger, pool) in &self.coupons {
            ensure!(
                crate::domain::Trigger::parse(trigger).is_some(),
                "program.coupons: {trigger:?} is not a trigger"
            );
            ensure!(
                !pool.is_empty(),
                "program.coupons.{trigger}: the pool's name is empty"
            );
        }
        for pair in self.expiring_notice_days.windows(2) {
            ensure!(
                pair[0] > pair[1],
                "program.expiring_notice_days must be in decreasing order"
            );
        }
        self.holdout_percent.check()?;
        Ok(())
    }

    /// Points an order total earns: whole points only, rounded down, and at most
    /// `MAX_POINTS_PER_ORDER` (however the earn rate is set, a balance stays far from
    /// overflowing).
    pub fn earned(&self, total: Money) -> i64 {
        let Some(rate) = self.earn.get(total.currency.code()) else {
            return 0;
        };
        let minor_per_major = 10_i128.pow(u32::from(total.currency.minor_digits()));
        let earned = i128::from(total.minor) * i128::from(rate.points)
            / (i128::from(rate.per) * minor_per_major);
        earned.min(i128::from(MAX_POINTS_PER_ORDER)) as i64
    }

    /// The tier held with `points` qualifying points (the highest whose threshold is met).
    pub fn tier_for(&self, points: i64) -> usize {
        self.tiers
            .iter()
            .rposition(|t| points >= t.threshold)
            .unwrap_or(0)
    }

    /// Tier `index`'s name in `locale` (its translation, through the locale's fallbacks).
    pub fn tier_name(&self, index: usize, locale: &Locale) -> &str {
        let tier = &self.tiers[index];
        locale
            .fallbacks()
            .into_iter()
            .find_map(|l| tier.translations.get(l)?.name.as_deref())
            .unwrap_or(&tier.name)
    }

    /// Tier `index`'s benefits in `locale`.
    pub fn tier_benefits(&self, index: usize, locale: &Locale) -> &[String] {
        let tier = &self.tiers[index];
        locale
            .fallbacks()
            .into_iter()
            .find_map(|l| tier.translations.get(l)?.benefits.as_deref())
            .unwrap_or(&tier.benefits)
    }

    /// What a member with `balance` points and `tier_points` qualifying points has ahead:
    /// `next_tier` (its name in `locale`) and `points_to_next_tier`, `next_reward`
    /// ({`points`, `discount`}) and `points_to_next_reward`; null where there is none (the top
    /// tier, the dearest reward reached).
    pub fn progress(
        &self,
        balance: i64,
        tier_points: i64,
        locale: &Locale,
    ) -> serde_json::Map<String, serde_json::Value> {
        use serde_json::{Value, json};
        let next = self.tier_for(tier_points) + 1;
        let (next_tier, to_tier) = match self.tiers.get(next) {
            Some(tier) => (
                json!(self.tier_name(next, locale)),
                json!(tier.threshold - tier_points),
            ),
            None => (Value::Null, Value::Null),
        };
        let (next_reward, to_reward) = match self.rewards.iter().find(|r| r.points > balance) {
            Some(r) => (
                json!({"points": r.points, "discount": r.discount}),
                json!(r.points - balance),
            ),
            None => (Value::Null, Value::Null),
        };
        [
            ("next_tier", next_tier),
            ("points_to_next_tier", to_tier),
            ("next_reward", next_reward),
            ("points_to_next_reward", to_reward),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// Local time of birthday messages.
    pub fn birthday_time(&self) -> anyhow::Result<NaiveTime> {
        NaiveTime::parse_from_str(&self.birthday_time, "%H:%M").map_err(|_| {
            anyhow::anyhow!(
                "program.birthday_time {:?} is not HH:MM",
                self.birthday_time
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn money(minor: i64, code: &str) -> Money {
        Money::new("total", minor, Currency::parse(code).unwrap()).unwrap()
    }

    #[test]
    fn progress_names_the_next_tier_and_reward_in_the_members_language() {
        let mut p = Program::default();
        p.rewards.push(Reward {
            points: 250,
            discount: 30,
        });
        p.tiers[1].translations.insert(
            "ko".into(),
            TierText {
                name: Some("실버".into()),
                benefits: Some(vec!["무료 배송".into()]),
            },
        );
        let ko = Locale::parse("ko-KR").unwrap();
        let en = Locale::parse("en").unwrap();
        let ahead = p.progress(160, 380, &ko);
        assert_eq!(ahead["next_tier"], "실버");
        assert_eq!(ahead["points_to_next_tier"], 120);
        assert_eq!(
            ahead["next_reward"],
            serde_json::json!({"points": 250, "discount": 30})
        );
        assert_eq!(ahead["points_to_next_reward"], 90);
        assert_eq!(p.progress(160, 380, &en)["next_tier"], "Silver");
        assert_eq!(p.tier_benefits(1, &ko), ["무료 배송"]);
        assert_eq!(p.tier_benefits(1, &en)[0], "Free standard shipping");
        // The top tier and the dearest reward have nothing ahead: null, not 0.
        let top = p.progress(300, 2_000, &en);
        assert!(top["next_tier"].is_null() && top["points_to_next_tier"].is_null());
        assert!(top["next_reward"].is_null() && top["points_to_next_reward"].is_null());
    }

    #[test]
    fn earning_follows_the_currency() {
        let p = Program::default();
        let cases = [
            (money(4599, "USD"), 45),
            (money(100, "EUR"), 1),
            (money(99, "EUR"), 0),
            (money(12_000, "KRW"), 12),
            (money(999, "KRW"), 0),
            (money(123_456, "TRY"), 123),
            (money(100_000, "JPY"), 0), // no earn rate configured
        ];
        for (total, expected) in cases {
            assert_eq!(p.earned(total), expected, "{total:?}");
        }
    }

    #[test]
    fn tiers_by_threshold() {
        let p = Program::default();
        for (points, tier) in [
            (0, "Bronze"),
            (499, "Bronze"),
            (500, "Silver"),
            (1499, "Silver"),
            (1500, "Gold"),
            (99_999, "Gold"),
        ] {
            assert_eq!(p.tiers[p.tier_for(points)].name, tier, "{points}");
        }
    }

    /// A change that makes the default programme invalid.
    type Breakage = Box<dyn Fn(&mut Program)>;

    #[test]
    fn invalid_programmes_are_refused_with_the_key() {
        let cases: Vec<(Breakage, &str)> = vec![
            (
                Box::new(|p| p.tiers.swap(1, 2)),
                "program.tiers must be in increasing order",
            ),
            (
                Box::new(|p| p.tiers[0].threshold = 10),
                "first tier must have threshold 0",
            ),
            (
                Box::new(|p| p.earn.get_mut("USD").unwrap().points = -1),
                "program.earn.USD: points must not be negative",
            ),
            (
                Box::new(|p| {
                    p.earn.insert("XYZ".into(), EarnRate { points: 1, per: 1 });
                }),
                "program.earn.XYZ",
            ),
            (
                Box::new(|p| p.earn.get_mut("KRW").unwrap().per = 0),
                "program.earn.KRW: per",
            ),
            (
                Box::new(|p| p.birthday_time = "9am".into()),
                "program.birthday_time",
            ),
            (
                Box::new(|p| p.expiring_notice_days = vec![7, 30]),
                "expiring_notice_days",
            ),
            (
                Box::new(|p| {
                    p.rewards.push(Reward {
                        points: 50,
                        discount: 5,
                    })
                }),
                "program.rewards",
            ),
        ];
        for (change, expected) in cases {
            let mut p = Program::default();
            change(&mut p);
            let error = p.check().unwrap_err().to_string();
            assert!(error.contains(expected), "{error}");
        }
        Program::default().check().unwrap();
    }

    #[test]
    fn holdout_buckets_are_fixed_and_even() {
        // Computed apart from this code (Python's hashlib): SHA-256 of "m-1\0welcome", first
        // eight bytes big-endian, modulo 10,000. A change here moves members between sides.
        assert_eq!(holdout_bucket("m-1", "welcome"), 1938);
        assert_eq!(holdout_bucket("m-2", "welcome"), 366);
        assert_eq!(holdout_bucket("m-1", "birthday"), 4940);
        // 20,000 members at 30%: the count held out is binomial (sd 65); 5 sd either side.
        let holdout = Holdout {
            default: 3_000,
            per_trigger: BTreeMap::new(),
        };
        let held = (0..20_000)
            .filter(|i| holdout.holds_out(&format!("member-{i}"), "welcome"))
            .count();
        assert!((5_675..=6_325).contains(&held), "{held} of 20000 held out");
        // Independent across triggers: about 30% of those held out of welcome are held out of
        // birthday too (binomial on ~6,000, sd 35).
        let both = (0..20_000)
            .map(|i| format!("member-{i}"))
            .filter(|m| holdout.holds_out(m, "welcome") && holdout.holds_out(m, "birthday"))
            .count();
        assert!((1_625..=1_975).contains(&both), "{both} held out of both");
        assert!(!Holdout::default().holds_out("m-1", "welcome"));
    }
}
