//! Pure trigger functions: (before, event, after) → planned messages.
//!
//! Architecture invariant: nothing here does I/O or reads a clock; time comes in as an
//! argument. Each planned message carries a dedupe key (unique in the outbox), so planning the
//! same occurrence twice is harmless.

use chrono::{DateTime, Utc};
use serde_json::json;

use crate::domain::Channel;
use crate::event::{Event, EventKind};
use crate::ledger::{Member, MemberState};
use crate::program::Program;

/// The six lifecycle triggers of DESIGN.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Trigger {
    /// A member enrolled.
    Welcome,
    /// The available balance crossed a reward threshold.
    RedemptionReady,
    /// Points expire soon.
    PointsExpiring,
    /// The member reached a higher tier.
    TierUp,
    /// Today is the member's birthday.
    Birthday,
    /// A cart was left open.
    AbandonedCart,
}

impl Trigger {
    /// Every trigger, in DESIGN.md's order.
    pub const ALL: [Trigger; 6] = [
        Trigger::Welcome,
        Trigger::RedemptionReady,
        Trigger::PointsExpiring,
        Trigger::TierUp,
        Trigger::Birthday,
        Trigger::AbandonedCart,
    ];

    /// The trigger's name: template directory, `X-Lifecycle-Trigger` header, stored value.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Welcome => "welcome",
            Trigger::RedemptionReady => "redemption-ready",
            Trigger::PointsExpiring => "points-expiring",
            Trigger::TierUp => "tier-up",
            Trigger::Birthday => "birthday",
            Trigger::AbandonedCart => "abandoned-cart",
        }
    }

    /// Parses a stored trigger name.
    pub fn parse(raw: &str) -> Option<Trigger> {
        Trigger::ALL.into_iter().find(|t| t.as_str() == raw)
    }
}

/// A message a trigger decided on, before it is stored in the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    /// Why it is sent.
    pub trigger: Trigger,
    /// Where it goes.
    pub channel: Channel,
    /// Outbox uniqueness: the trigger's dedupe key of DESIGN.md, plus the channel.
    pub dedupe_key: String,
    /// Earliest send time.
    pub due_at: DateTime<Utc>,
    /// Template variables specific to the trigger.
    pub context: serde_json::Value,
}

/// Channels this member can be reached on: an address and consent for it.
pub fn reachable_channels(member: &Member) -> Vec<Channel> {
    let mut channels = Vec::with_capacity(2);
    if member.email.is_some() && member.consent.email {
        channels.push(Channel::Email);
    }
    if member.phone.is_some() && member.consent.sms {
        channels.push(Channel::Sms);
    }
    channels
}

/// Plans a message per reachable channel, with `key` as the dedupe key's trigger-specific part.
fn per_channel(
    trigger: Trigger,
    key: &str,
    member: &Member,
    due_at: DateTime<Utc>,
    context: serde_json::Value,
) -> Vec<Planned> {
    reachable_channels(member)
        .into_iter()
        .map(|channel| Planned {
            trigger,
            channel,
            dedupe_key: format!("{}:{key}:{}", trigger.as_str(), channel.as_str()),
            due_at,
            context: context.clone(),
        })
        .collect()
}

/// Every message an applied event plans. `before` is the member before the event (after lapsed
/// lots were expired; `None` when the event enrolled them), `after` the member after it; `now`
/// is business time.
pub fn plan(
    before: Option<&MemberState>,
    event: &Event,
    after: &MemberState,
    program: &Program,
    now: DateTime<Utc>,
) -> Vec<Planned> {
    let mut planned = Vec::new();
    planned.extend(welcome(event, after, program, now));
    planned.extend(redemption_ready(before, event, after, program, now));
    planned.extend(tier_up(before, event, after, program, now));
    planned
}

/// The rewards a balance can buy, cheapest first, as template context.
fn rewards_within(program: &Program, balance: i64) -> Vec<serde_json::Value> {
    program
        .rewards
        .iter()
        .filter(|r| r.points <= balance)
        .map(|r| json!({"points": r.points, "discount": r.discount}))
        .collect()
}

/// Welcome: fires on `member.enrolled`; dedupe key: the member. A re-enrolment plans again, but
/// the key makes it a no-op in the outbox.
///
/// Context: `first_name` (may be null), `member_id`, `signup_bonus`, `balance`, `rewards`
/// (what the balance buys already: a list of {`points`, `discount`}).
pub fn welcome(
    event: &Event,
    after: &MemberState,
    program: &Program,
    now: DateTime<Utc>,
) -> Vec<Planned> {
    if !matches!(event.kind, EventKind::MemberEnrolled(_)) {
        return Vec::new();
    }
    let member = &after.member;
    let balance = after.points.balance();
    let context = json!({
        "first_name": member.first_name,
        "member_id": member.member_id,
        "signup_bonus": program.signup_bonus,
        "balance": balance,
        "rewards": rewards_within(program, balance),
    });
    per_channel(
        Trigger::Welcome,
        member.member_id.as_str(),
        member,
        now,
        context,
    )
}

/// Redemption-ready: the balance rose from below a reward's cost to at or above it. One
/// message for the most expensive reward newly reached, however many were crossed at once;
/// not for enrolment, whose welcome says what the bonus buys. Dedupe key: member, reward,
/// and the event that crossed it (a balance that falls back and rises again crosses anew).
///
/// Context: `first_name`, `balance`, `reward` {`points`, `discount`}, `rewards` (all the
/// balance buys).
pub fn redemption_ready(
    before: Option<&MemberState>,
    event: &Event,
    after: &MemberState,
    program: &Program,
    now: DateTime<Utc>,
) -> Vec<Planned> {
    if matches!(event.kind, EventKind::MemberEnrolled(_)) {
        return Vec::new();
    }
    let was = before.map_or(0, |b| b.points.balance());
    let is = after.points.balance();
    let Some(reward) = program
        .rewards
        .iter()
        .rev()
        .find(|r| was < r.points && r.points <= is)
    else {
        return Vec::new();
    };
    let member = &after.member;
    let context = json!({
        "first_name": member.first_name,
        "balance": is,
        "reward": {"points": reward.points, "discount": reward.discount},
        "rewards": rewards_within(program, is),
    });
    let key = format!("{}:{}:{}", member.member_id, reward.points, event.id);
    per_channel(Trigger::RedemptionReady, &key, member, now, context)
}

/// Tier-up: the tier held by the qualifying points of the window rose. Dedupe key: member,
/// tier, and the event that raised it.
///
/// Context: `first_name`, `tier`, `previous_tier`, `benefits` (of the new tier),
/// `tier_points`.
pub fn tier_up(
    before: Option<&MemberState>,
    event: &Event,
    after: &MemberState,
    program: &Program,
    now: DateTime<Utc>,
) -> Vec<Planned> {
    let window = program.tier_window_months;
    let was = program.tier_for(before.map_or(0, |b| b.points.tier_points(now, window)));
    let points = after.points.tier_points(now, window);
    let is = program.tier_for(points);
    if is <= was {
        return Vec::new();
    }
    let (tier, previous) = (&program.tiers[is], &program.tiers[was]);
    let member = &after.member;
    let context = json!({
        "first_name": member.first_name,
        "tier": tier.name,
        "previous_tier": previous.name,
        "benefits": tier.benefits,
        "tier_points": points,
    });
    let key = format!("{}:{}:{}", member.member_id, tier.name, event.id);
    per_channel(Trigger::TierUp, &key, member, now, context)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Consent, Email, EventId, Locale, MemberId, Phone, TimeZone};
    use crate::event::{Adjustment, CartRef, Profile};
    use crate::ledger::points::{EntryKind, Points};
    use crate::program::Reward;
    use chrono::TimeZone as _;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 22, 10, 0, 0).unwrap()
    }

    fn member(email: bool, phone: bool, consent: Consent) -> Member {
        Member {
            member_id: MemberId::parse("m1").unwrap(),
            email: email.then(|| Email::parse("a@b.co").unwrap()),
            phone: phone.then(|| Phone::parse("+14155550123").unwrap()),
            first_name: Some("Ada".into()),
            locale: Locale::parse("en").unwrap(),
            timezone: TimeZone::parse("UTC").unwrap(),
            birthday: None,
            consent,
            enrolled_at: DateTime::UNIX_EPOCH,
        }
    }

    /// A member reachable by email with these lots: (kind, points).
    fn state(lots: &[(EntryKind, i64)]) -> MemberState {
        let mut points = Points::default();
        for (kind, n) in lots {
            points.earn(*kind, *n, now() - chrono::Duration::days(1), 12);
        }
        MemberState {
            member: member(
                true,
                false,
                Consent {
                    email: true,
                    sms: false,
                },
            ),
            points,
        }
    }

    fn event(id: &str, kind: EventKind) -> Event {
        Event {
            id: EventId::parse(id).unwrap(),
            source: "t".into(),
            time: None,
            kind,
        }
    }

    fn enrolled(m: &Member) -> Event {
        event(
            "e1",
            EventKind::MemberEnrolled(Profile {
                member_id: m.member_id.clone(),
                email: m.email.clone(),
                phone: m.phone.clone(),
                first_name: m.first_name.clone(),
                locale: m.locale.clone(),
                timezone: m.timezone,
                birthday: None,
                consent: m.consent,
            }),
        )
    }

    /// Any non-enrolment event (the triggers look at state, not at the event's data).
    fn other(id: &str) -> Event {
        let member_id = MemberId::parse("m1").unwrap();
        event(
            id,
            EventKind::PointsAdjusted(Adjustment {
                member_id,
                points: 1,
                reason: "manual".into(),
            }),
        )
    }

    fn keys(planned: Vec<Planned>) -> Vec<String> {
        planned.into_iter().map(|p| p.dedupe_key).collect()
    }

    #[test]
    fn welcome_goes_to_each_reachable_channel() {
        let all = Consent {
            email: true,
            sms: true,
        };
        let cases = [
            // (has email, has phone, consent, expected channels)
            (true, true, all, vec!["welcome:m1:email", "welcome:m1:sms"]),
            (
                true,
                true,
                Consent {
                    email: true,
                    sms: false,
                },
                vec!["welcome:m1:email"],
            ),
            (
                true,
                true,
                Consent {
                    email: false,
                    sms: true,
                },
                vec!["welcome:m1:sms"],
            ),
            (false, true, all, vec!["welcome:m1:sms"]),
            (true, false, all, vec!["welcome:m1:email"]),
            (true, true, Consent::default(), vec![]),
        ];
        let program = Program::default();
        for (email, phone, consent, expected) in cases {
            let after = MemberState {
                member: member(email, phone, consent),
                points: Points::default(),
            };
            let planned = welcome(&enrolled(&after.member), &after, &program, now());
            assert_eq!(
                keys(planned),
                expected,
                "email={email} phone={phone} {consent:?}"
            );
        }
    }

    #[test]
    fn welcome_says_what_the_bonus_buys() {
        let after = state(&[(EntryKind::Signup, 100)]);
        let planned = welcome(&enrolled(&after.member), &after, &Program::default(), now());
        assert_eq!(planned[0].context["balance"], 100);
        assert_eq!(
            planned[0].context["rewards"],
            json!([{"points": 100, "discount": 10}])
        );
        assert!(
            welcome(&other("e2"), &after, &Program::default(), now()).is_empty(),
            "only on enrolment"
        );
    }

    #[test]
    fn redemption_ready_fires_on_an_upward_crossing() {
        let program = Program {
            rewards: vec![
                Reward {
                    points: 100,
                    discount: 10,
                },
                Reward {
                    points: 250,
                    discount: 30,
                },
            ],
            ..Program::default()
        };
        let cases: &[(&str, i64, i64, Option<i64>)] = &[
            // (case, balance before, balance after, reward announced)
            ("below to exactly at", 99, 100, Some(100)),
            ("below to above", 40, 180, Some(100)),
            ("still below", 40, 99, None),
            ("already above", 100, 180, None),
            (
                "two thresholds in one order: the higher",
                90,
                260,
                Some(250),
            ),
            ("from the first to the second", 120, 250, Some(250)),
            ("falling", 260, 90, None),
        ];
        for (case, was, is, expected) in cases {
            let before = state(&[(EntryKind::Order, *was)]);
            let after = state(&[(EntryKind::Order, *is)]);
            let planned = redemption_ready(Some(&before), &other("e7"), &after, &program, now());
            let announced: Vec<i64> = planned
                .iter()
                .map(|p| p.context["reward"]["points"].as_i64().unwrap())
                .collect();
            assert_eq!(
                announced,
                expected.iter().copied().collect::<Vec<_>>(),
                "{case}"
            );
            if let Some(points) = expected {
                assert_eq!(
                    planned[0].dedupe_key,
                    format!("redemption-ready:m1:{points}:e7:email"),
                    "{case}"
                );
                assert_eq!(planned[0].context["balance"], *is, "{case}");
            }
        }
    }

    #[test]
    fn redemption_ready_rearms_after_the_balance_falls_back() {
        let program = Program::default();
        let (low, high) = (
            state(&[(EntryKind::Order, 80)]),
            state(&[(EntryKind::Order, 120)]),
        );
        let first = redemption_ready(Some(&low), &other("order-1"), &high, &program, now());
        // A refund takes it below 100 (no message), a later order crosses again: a new key.
        assert!(
            redemption_ready(Some(&high), &other("refund-1"), &low, &program, now()).is_empty()
        );
        let second = redemption_ready(Some(&low), &other("order-2"), &high, &program, now());
        assert_eq!(first.len(), 1);
        assert_eq!(second.len(), 1);
        assert_ne!(first[0].dedupe_key, second[0].dedupe_key);
    }

    #[test]
    fn the_signup_bonus_alone_is_not_redemption_ready() {
        let after = state(&[(EntryKind::Signup, 100)]);
        assert!(
            redemption_ready(
                None,
                &enrolled(&after.member),
                &after,
                &Program::default(),
                now()
            )
            .is_empty()
        );
    }

    #[test]
    fn tier_up_fires_when_the_tier_rises() {
        let program = Program::default();
        let cases: &[(&str, i64, i64, Option<&str>)] = &[
            // (case, qualifying before, after, new tier)
            ("to exactly Silver", 499, 500, Some("Silver")),
            ("Bronze to Gold at once", 100, 1600, Some("Gold")),
            ("Silver to Gold", 900, 1500, Some("Gold")),
            ("within Silver", 500, 1499, None),
            ("falling", 1600, 400, None),
        ];
        for (case, was, is, expected) in cases {
            let before = state(&[(EntryKind::Order, *was)]);
            let after = state(&[(EntryKind::Order, *is)]);
            let planned = tier_up(Some(&before), &other("e9"), &after, &program, now());
            let tiers: Vec<&str> = planned
                .iter()
                .map(|p| p.context["tier"].as_str().unwrap())
                .collect();
            assert_eq!(
                tiers,
                expected.iter().copied().collect::<Vec<_>>(),
                "{case}"
            );
        }
        let planned = tier_up(
            Some(&state(&[])),
            &other("e9"),
            &state(&[(EntryKind::Order, 600)]),
            &program,
            now(),
        );
        assert_eq!(planned[0].dedupe_key, "tier-up:m1:Silver:e9:email");
        assert_eq!(planned[0].context["previous_tier"], "Bronze");
        assert_eq!(
            planned[0].context["benefits"],
            json!(["Free standard shipping", "Early access to sales"])
        );
    }

    #[test]
    fn signup_and_adjustments_do_not_raise_the_tier() {
        let before = state(&[]);
        let after = state(&[(EntryKind::Signup, 100), (EntryKind::Adjustment, 1000)]);
        assert!(
            tier_up(
                Some(&before),
                &other("e1"),
                &after,
                &Program::default(),
                now()
            )
            .is_empty()
        );
    }

    #[test]
    fn one_order_can_raise_the_tier_and_reach_a_reward() {
        let before = state(&[(EntryKind::Order, 450)]);
        let mut after = before.clone();
        after.points.earn(EntryKind::Order, 60, now(), 12);
        // 450 → 510: Silver, but the 100-point reward was reached long ago.
        let mut program = Program::default();
        program.rewards.push(Reward {
            points: 500,
            discount: 60,
        });
        let planned = plan(Some(&before), &other("e3"), &after, &program, now());
        let triggers: Vec<&str> = planned.iter().map(|p| p.trigger.as_str()).collect();
        assert_eq!(triggers, ["redemption-ready", "tier-up"]);
    }

    #[test]
    fn nothing_for_an_unrelated_event() {
        let m = state(&[(EntryKind::Order, 50)]);
        let checkout = event(
            "e4",
            EventKind::CartCheckedOut(CartRef {
                cart_id: crate::domain::RecordId::parse("cart_id", "c").unwrap(),
                member_id: m.member.member_id.clone(),
            }),
        );
        assert!(plan(Some(&m), &checkout, &m, &Program::default(), now()).is_empty());
    }

    #[test]
    fn trigger_names_round_trip() {
        for t in Trigger::ALL {
            assert_eq!(Trigger::parse(t.as_str()), Some(t));
        }
    }
}
