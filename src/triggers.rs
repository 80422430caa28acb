//! Pure trigger functions: (before, event, after) → planned messages.
//!
//! Architecture invariant: nothing here does I/O or reads a clock; time comes in as an
//! argument. Each planned message carries a dedupe key (unique in the outbox), so planning the
//! same occurrence twice is harmless.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, NaiveDate, NaiveTime, Utc};
use serde_json::json;

use crate::domain::{CartState, Member, MemberState};
use crate::domain::{Channel, Trigger, dedupe_key, local_instant};
use crate::event::{Event, EventKind};
use crate::program::Program;

/// A message a trigger decided on, before it is stored in the outbox.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Planned {
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
pub(crate) fn reachable_channels(member: &Member) -> Vec<Channel> {
    let mut channels = Vec::with_capacity(2);
    if member.profile.email.is_some() && member.profile.consent.email {
        channels.push(Channel::Email);
    }
    if member.profile.phone.is_some() && member.profile.consent.sms {
        channels.push(Channel::Sms);
    }
    channels
}

/// `context` with what the member has ahead (`Program::progress`: `next_tier`,
/// `points_to_next_tier`, `next_reward`, `points_to_next_reward`) and `coupon_code` (null
/// here; planning fills it from the trigger's pool).
pub(crate) fn with_progress(
    mut context: serde_json::Value,
    state: &MemberState,
    program: &Program,
    now: DateTime<Utc>,
) -> serde_json::Value {
    if let serde_json::Value::Object(map) = &mut context {
        let tier_points = state.points.tier_points(now, program.tier_window_months);
        map.extend(program.progress(
            state.points.balance(),
            tier_points,
            &state.member.profile.locale,
        ));
        map.insert("coupon_code".into(), serde_json::Value::Null);
    }
    context
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
            dedupe_key: dedupe_key(trigger, key, channel),
            due_at,
            context: context.clone(),
        })
        .collect()
}

/// Every message an applied event plans. `before` is the member before the event (after lapsed
/// lots were expired; `None` when the event enrolled them), `after` the member after it; `now`
/// is business time.
pub(crate) fn plan(
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
pub(crate) fn rewards_within(program: &Program, balance: i64) -> Vec<serde_json::Value> {
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
pub(crate) fn welcome(
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
        "first_name": member.profile.first_name,
        "member_id": member.profile.member_id,
        "signup_bonus": program.signup_bonus,
        "balance": balance,
        "rewards": rewards_within(program, balance),
    });
    let context = with_progress(context, after, program, now);
    per_channel(
        Trigger::Welcome,
        member.profile.member_id.as_str(),
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
pub(crate) fn redemption_ready(
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
    crossed(was, after, event.id.as_str(), program, now)
}

/// Redemption-ready for a balance that went from `was` to `after`'s by `cause` (an event id,
/// or a scan's key such as a birthday bonus's): the most expensive reward newly reached.
pub(crate) fn crossed(
    was: i64,
    after: &MemberState,
    cause: &str,
    program: &Program,
    now: DateTime<Utc>,
) -> Vec<Planned> {
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
        "first_name": member.profile.first_name,
        "balance": is,
        "reward": {"points": reward.points, "discount": reward.discount},
        "rewards": rewards_within(program, is),
    });
    let context = with_progress(context, after, program, now);
    let key = format!("{}:{}:{cause}", member.profile.member_id, reward.points);
    per_channel(Trigger::RedemptionReady, &key, member, now, context)
}

/// Tier-up: the tier held by the qualifying points of the window rose. Dedupe key: member,
/// tier, and the event that raised it.
///
/// Context: `first_name`, `tier`, `previous_tier`, `benefits` (of the new tier),
/// `tier_points`.
pub(crate) fn tier_up(
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
    let tier = &program.tiers[is];
    let member = &after.member;
    let locale = &member.profile.locale;
    let context = json!({
        "first_name": member.profile.first_name,
        "tier": program.tier_name(is, locale),
        "previous_tier": program.tier_name(was, locale),
        "benefits": program.tier_benefits(is, locale),
        "tier_points": points,
    });
    let context = with_progress(context, after, program, now);
    let key = format!("{}:{}:{}", member.profile.member_id, tier.name, event.id);
    per_channel(Trigger::TierUp, &key, member, now, context)
}

/// Points-expiring: what is left of the lots lapsing on each date ahead. For every expiry date
/// within a notice period, one message per notice: the nearest notice that applies (30 days
/// ahead, then 7), so a worker back from an outage sends the 7-day notice rather than a late
/// 30-day one. Dedupe key: member, expiry date, notice.
///
/// The expiry date of the key (and of the grouping) is the UTC date of the lots' expiry, not
/// the member's local date: a member who changes time zone inside the notice window would
/// otherwise see their lots move to another local date, under a new key, and be told again.
/// The message shows the local date (in the member's zone now) of the group's first lot to
/// lapse.
///
/// Context: `first_name`, `points` (expiring on that date), `expiry_date` (`YYYY-MM-DD` in the
/// member's zone), `days_left`, `notice_days`, `balance`.
pub(crate) fn points_expiring(
    state: &MemberState,
    program: &Program,
    now: DateTime<Utc>,
) -> Vec<Planned> {
    let Some(&farthest) = program.expiring_notice_days.first() else {
        return Vec::new();
    };
    let tz = state.member.profile.timezone.tz();
    let today = now.with_timezone(&tz).date_naive();
    // (points, first expiry) by UTC date
    let mut by_date: BTreeMap<NaiveDate, (i64, DateTime<Utc>)> = BTreeMap::new();
    for lot in state.points.lots.iter().filter(|l| l.expires_at > now) {
        let local = lot.expires_at.with_timezone(&tz).date_naive();
        if (local - today).num_days() <= i64::from(farthest) {
            let group = by_date
                .entry(lot.expires_at.date_naive())
                .or_insert((0, lot.expires_at));
            group.0 += lot.remaining;
            group.1 = group.1.min(lot.expires_at);
        }
    }
    let member = &state.member;
    let balance = state.points.balance();
    by_date
        .into_iter()
        .filter(|(_, (points, _))| *points > 0)
        .filter_map(|(date, (points, first))| {
            let local = first.with_timezone(&tz).date_naive();
            let days_left = (local - today).num_days();
            let notice = program
                .expiring_notice_days
                .iter()
                .rev()
                .find(|n| days_left <= i64::from(**n))?;
            let context = json!({
                "first_name": member.profile.first_name,
                "points": points,
                "expiry_date": local.to_string(),
                "days_left": days_left,
                "notice_days": notice,
                "balance": balance,
            });
            let context = with_progress(context, state, program, now);
            let key = format!("{}:{date}:{notice}", member.profile.member_id);
            Some(per_channel(
                Trigger::PointsExpiring,
                &key,
                member,
                now,
                context,
            ))
        })
        .flatten()
        .collect()
}

/// The year whose birthday is due for this member at `now`: it is the celebration day in the
/// member's zone (29 February falls on 28 February in common years) and the send time
/// (`program.birthday_time`, local) has come. A scan that runs late the same day still finds
/// it due; the next day it does not.
pub(crate) fn birthday_due(member: &Member, program: &Program, now: DateTime<Utc>) -> Option<i32> {
    let birthday = member.profile.birthday?;
    let tz = member.profile.timezone.tz();
    let today = now.with_timezone(&tz).date_naive();
    if birthday.celebrated_in(today.year())? != today {
        return None;
    }
    let send_time = program
        .birthday_time()
        .unwrap_or(NaiveTime::from_hms_opt(9, 0, 0)?);
    (now >= local_instant(tz, today, send_time)).then_some(today.year())
}

/// Birthday: fires when `birthday_due` says so, with the bonus (if any) already in `after`.
/// Dedupe key: member, year.
///
/// Context: `first_name`, `bonus` (0 when the programme gives none), `balance`.
pub(crate) fn birthday(
    after: &MemberState,
    year: i32,
    program: &Program,
    now: DateTime<Utc>,
) -> Vec<Planned> {
    let member = &after.member;
    let context = json!({
        "first_name": member.profile.first_name,
        "bonus": program.birthday_bonus,
        "balance": after.points.balance(),
    });
    let context = with_progress(context, after, program, now);
    let key = format!("{}:{year}", member.profile.member_id);
    per_channel(Trigger::Birthday, &key, member, now, context)
}

/// Abandoned-cart: the cart is open, its timer (last update + the programme's delay) has run
/// out, and no message was planned for this version of it. Dedupe key: cart, version.
///
/// Context: `first_name`, `cart_id`, `items` [{`sku`, `name`, `quantity`, `unit_price`}],
/// `item_count`, `total_minor`, `currency`, `checkout_url`.
pub(crate) fn abandoned_cart(
    cart: &CartState,
    state: &MemberState,
    program: &Program,
    now: DateTime<Utc>,
) -> Vec<Planned> {
    let member = &state.member;
    if !cart.is_due(now) {
        return Vec::new();
    }
    let mut context = cart_variables(cart);
    context["first_name"] = json!(member.profile.first_name);
    let context = with_progress(context, state, program, now);
    let key = cart.dedupe_part(cart.version);
    per_channel(Trigger::AbandonedCart, &key, member, now, context)
}

/// An open cart's template variables: `cart_id`, `items`, `item_count` (the quantities
/// summed), `total_minor`, `currency`, `checkout_url`.
pub(crate) fn cart_variables(cart: &CartState) -> serde_json::Value {
    let item_count = cart.items.as_array().map_or(0, |items| {
        items
            .iter()
            .map(|i| i["quantity"].as_u64().unwrap_or(0))
            .sum::<u64>()
    });
    json!({
        "cart_id": cart.cart_id,
        "items": cart.items,
        "item_count": item_count,
        "total_minor": cart.total_minor,
        "currency": cart.currency,
        "checkout_url": cart.checkout_url,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::points::{EntryKind, Points};
    use crate::domain::{Consent, Email, EventId, Locale, MemberId, Phone, TimeZone};
    use crate::event::{Adjustment, CartRef, Profile};
    use crate::program::Reward;
    use chrono::TimeZone as _;
    use chrono_tz::Tz;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 22, 10, 0, 0).unwrap()
    }

    fn member(email: bool, phone: bool, consent: Consent) -> Member {
        Member {
            profile: crate::domain::Profile {
                member_id: MemberId::parse("m1").unwrap(),
                email: email.then(|| Email::parse("a@b.co").unwrap()),
                phone: phone.then(|| Phone::parse("+14155550123").unwrap()),
                first_name: Some("Ada".into()),
                locale: Locale::parse("en").unwrap(),
                timezone: TimeZone::parse("UTC").unwrap(),
                birthday: None,
                consent,
            },
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
                member_id: m.profile.member_id.clone(),
                email: m.profile.email.clone(),
                phone: m.profile.phone.clone(),
                first_name: m.profile.first_name.clone(),
                locale: m.profile.locale.clone(),
                timezone: m.profile.timezone,
                birthday: None,
                consent: m.profile.consent,
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
                member_id: m.member.profile.member_id.clone(),
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

    // ---- scheduled triggers ----

    fn at(y: i32, m: u32, d: u32, h: u32, min: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, h, min, 0).unwrap()
    }

    fn in_zone(zone: &str, birthday: Option<&str>) -> Member {
        let mut m = member(
            true,
            false,
            Consent {
                email: true,
                sms: false,
            },
        );
        m.profile.timezone = TimeZone::parse(zone).unwrap();
        m.profile.birthday = birthday.map(|b| crate::domain::Birthday::parse(b).unwrap());
        m
    }

    /// A member in `zone` holding lots that expire at these instants with these points.
    fn with_lots(zone: &str, lots: &[(DateTime<Utc>, i64)]) -> MemberState {
        let mut points = Points::default();
        for (expires_at, n) in lots {
            points.lots.push(crate::domain::points::Lot {
                id: None,
                earned_at: *expires_at - chrono::Months::new(12),
                expires_at: *expires_at,
                points: *n,
                remaining: *n,
            });
        }
        MemberState {
            member: in_zone(zone, None),
            points,
        }
    }

    #[test]
    fn points_expiring_sends_the_nearest_notice_that_applies() {
        let now = at(2026, 11, 22, 10, 0);
        let program = Program::default();
        // (days until the lot expires, the notice expected)
        let table: &[(i64, Option<u32>)] = &[
            (31, None),
            (30, Some(30)),
            (8, Some(30)),
            (7, Some(7)),
            (1, Some(7)),
            (0, Some(7)), // later today
        ];
        for (days, expected) in table {
            let expires = now + chrono::Duration::days(*days) + chrono::Duration::hours(1);
            let planned = points_expiring(&with_lots("UTC", &[(expires, 40)]), &program, now);
            let notices: Vec<u64> = planned
                .iter()
                .map(|p| p.context["notice_days"].as_u64().unwrap())
                .collect();
            assert_eq!(
                notices,
                expected.map(u64::from).into_iter().collect::<Vec<_>>(),
                "{days} days ahead"
            );
            for p in &planned {
                assert_eq!(p.context["points"], 40);
                assert_eq!(p.context["days_left"], *days);
                let date = expires.date_naive();
                assert_eq!(
                    p.dedupe_key,
                    format!("points-expiring:m1:{date}:{}:email", expected.unwrap())
                );
            }
        }
        // A lapsed lot is not announced.
        let lapsed = with_lots("UTC", &[(now - chrono::Duration::minutes(1), 40)]);
        assert!(points_expiring(&lapsed, &program, now).is_empty());
    }

    #[test]
    fn points_expiring_keys_do_not_move_with_the_members_time_zone() {
        let now = at(2026, 11, 22, 10, 0);
        // 23:30 UTC on 12 December is 08:30 on the 13th in Seoul.
        let lots = [
            (at(2026, 12, 12, 23, 30), 30),
            (at(2026, 12, 13, 5, 0), 12),
            (at(2027, 3, 1, 0, 0), 99), // too far ahead
        ];
        let program = Program::default();
        let seoul = points_expiring(&with_lots("Asia/Seoul", &lots), &program, now);
        let utc = points_expiring(&with_lots("UTC", &lots), &program, now);
        let istanbul = points_expiring(&with_lots("Europe/Istanbul", &lots), &program, now);
        // The same keys in every zone: a member who moves is not told again.
        assert_eq!(keys(seoul.clone()), keys(utc.clone()));
        assert_eq!(keys(istanbul), keys(utc.clone()));
        assert_eq!(
            keys(utc.clone()),
            [
                "points-expiring:m1:2026-12-12:30:email",
                "points-expiring:m1:2026-12-13:30:email"
            ]
        );
        // Each message shows the date in the member's zone.
        let shown = |planned: &[Planned]| -> Vec<(String, i64)> {
            planned
                .iter()
                .map(|p| {
                    (
                        p.context["expiry_date"].as_str().unwrap().to_owned(),
                        p.context["points"].as_i64().unwrap(),
                    )
                })
                .collect()
        };
        assert_eq!(
            shown(&seoul),
            [("2026-12-13".to_owned(), 30), ("2026-12-13".to_owned(), 12)]
        );
        assert_eq!(
            shown(&utc),
            [("2026-12-12".to_owned(), 30), ("2026-12-13".to_owned(), 12)]
        );
    }

    #[test]
    fn birthdays_fire_at_nine_local_time_on_the_day() {
        let program = Program::default();
        // (zone, birthday, now, due year)
        let table: &[(&str, &str, DateTime<Utc>, Option<i32>)] = &[
            ("UTC", "11-22", at(2026, 11, 22, 8, 59), None),
            ("UTC", "11-22", at(2026, 11, 22, 9, 0), Some(2026)),
            // A scan that runs late the same day still sends.
            ("UTC", "11-22", at(2026, 11, 22, 23, 59), Some(2026)),
            ("UTC", "11-22", at(2026, 11, 23, 9, 0), None),
            ("UTC", "1990-11-22", at(2026, 11, 22, 9, 0), Some(2026)),
            // East of UTC: 09:00 on 23 November in Auckland (UTC+13) is 20:00 on the 22nd UTC.
            ("Pacific/Auckland", "11-23", at(2026, 11, 22, 19, 59), None),
            (
                "Pacific/Auckland",
                "11-23",
                at(2026, 11, 22, 20, 0),
                Some(2026),
            ),
            ("Pacific/Auckland", "11-22", at(2026, 11, 22, 20, 0), None),
            // West of UTC: Los Angeles (UTC−8) is still on the 22nd at 02:00 UTC on the 23rd.
            (
                "America/Los_Angeles",
                "11-22",
                at(2026, 11, 22, 16, 59),
                None,
            ),
            (
                "America/Los_Angeles",
                "11-22",
                at(2026, 11, 22, 17, 0),
                Some(2026),
            ),
            (
                "America/Los_Angeles",
                "11-22",
                at(2026, 11, 23, 2, 0),
                Some(2026),
            ),
            ("America/Los_Angeles", "11-22", at(2026, 11, 23, 8, 0), None),
            // 29 February: on 28 February in common years, on the day in leap years.
            ("UTC", "02-29", at(2027, 2, 28, 9, 0), Some(2027)),
            ("UTC", "02-29", at(2027, 3, 1, 9, 0), None),
            ("UTC", "2000-02-29", at(2028, 2, 28, 9, 0), None),
            ("UTC", "2000-02-29", at(2028, 2, 29, 9, 0), Some(2028)),
            // DST starts in New York on 8 March 2026: 09:00 is EDT (UTC−4), 13:00 UTC.
            ("America/New_York", "03-08", at(2026, 3, 8, 12, 59), None),
            (
                "America/New_York",
                "03-08",
                at(2026, 3, 8, 13, 0),
                Some(2026),
            ),
            // DST ends on 1 November 2026: 09:00 is EST (UTC−5), 14:00 UTC.
            ("America/New_York", "11-01", at(2026, 11, 1, 13, 59), None),
            (
                "America/New_York",
                "11-01",
                at(2026, 11, 1, 14, 0),
                Some(2026),
            ),
        ];
        for (zone, birthday, now, expected) in table {
            let m = in_zone(zone, Some(birthday));
            assert_eq!(
                birthday_due(&m, &program, *now),
                *expected,
                "{zone} {birthday} at {now}"
            );
        }
        assert_eq!(
            birthday_due(&in_zone("UTC", None), &program, at(2026, 11, 22, 9, 0)),
            None
        );
    }

    #[test]
    fn a_send_time_in_a_dst_gap_or_overlap_happens_exactly_once() {
        let ny: Tz = "America/New_York".parse().unwrap();
        let date = |m, d| NaiveDate::from_ymd_opt(2026, m, d).unwrap();
        let time = |h, m| NaiveTime::from_hms_opt(h, m, 0).unwrap();
        // 02:30 never happens on 8 March (02:00 EST jumps to 03:00 EDT): it is taken as 03:30
        // EDT, 07:30 UTC.
        assert_eq!(
            local_instant(ny, date(3, 8), time(2, 30)),
            at(2026, 3, 8, 7, 30)
        );
        // 01:30 happens twice on 1 November (EDT, then EST): the first, 05:30 UTC.
        assert_eq!(
            local_instant(ny, date(11, 1), time(1, 30)),
            at(2026, 11, 1, 5, 30)
        );
        // So a birthday sent at 02:30 on the day DST starts is due once from 07:30 UTC on,
        // and one sent at 01:30 on the day it ends is due once from 05:30 UTC on, its
        // dedupe key (member, year) covering the whole day.
        let program = Program {
            birthday_time: "02:30".into(),
            ..Program::default()
        };
        let m = in_zone("America/New_York", Some("03-08"));
        assert_eq!(birthday_due(&m, &program, at(2026, 3, 8, 7, 29)), None);
        assert_eq!(
            birthday_due(&m, &program, at(2026, 3, 8, 7, 30)),
            Some(2026)
        );
        let program = Program {
            birthday_time: "01:30".into(),
            ..Program::default()
        };
        let m = in_zone("America/New_York", Some("11-01"));
        assert_eq!(birthday_due(&m, &program, at(2026, 11, 1, 5, 29)), None);
        assert_eq!(
            birthday_due(&m, &program, at(2026, 11, 1, 5, 30)),
            Some(2026)
        );
        assert_eq!(
            birthday_due(&m, &program, at(2026, 11, 1, 6, 30)),
            Some(2026)
        );
    }

    #[test]
    fn birthday_message_carries_the_bonus_and_its_key_is_member_and_year() {
        let program = Program {
            birthday_bonus: 50,
            ..Program::default()
        };
        let state = MemberState {
            member: in_zone("UTC", Some("11-22")),
            points: Points::default(),
        };
        let planned = birthday(&state, 2026, &program, now());
        assert_eq!(keys(planned.clone()), ["birthday:m1:2026:email"]);
        assert_eq!(planned[0].context["bonus"], 50);
    }

    #[test]
    fn abandoned_cart_fires_once_per_version_after_the_delay() {
        let delay = chrono::Duration::hours(1);
        let cart = |version, open, notified: Option<i32>| CartState {
            cart_id: "c1".into(),
            member_id: MemberId::parse("m1").unwrap(),
            version,
            open,
            changed_at: now(),
            due_at: open.then_some(now() + delay),
            notified_version: notified,
            items: json!([{"sku": "s", "name": "Mug", "quantity": 2, "unit_price": 900}]),
            total_minor: 1_800,
            currency: "USD".into(),
            checkout_url: "https://shop.example/c1".into(),
        };
        let m = with_lots("UTC", &[]);
        let program = Program::default();
        let later = now() + delay;
        // (cart, at, expected keys)
        let table: Vec<(CartState, DateTime<Utc>, Vec<&str>)> = vec![
            (
                cart(1, true, None),
                later - chrono::Duration::seconds(1),
                vec![],
            ),
            (
                cart(1, true, None),
                later,
                vec!["abandoned-cart:c1:1:email"],
            ),
            (cart(1, true, Some(1)), later, vec![]),
            // Re-armed by a later update: the new version fires.
            (
                cart(2, true, Some(1)),
                later,
                vec!["abandoned-cart:c1:2:email"],
            ),
            // Checked out.
            (cart(2, false, Some(1)), later, vec![]),
        ];
        for (c, at, expected) in table {
            assert_eq!(
                keys(abandoned_cart(&c, &m, &program, at)),
                expected,
                "{c:?} at {at}"
            );
        }
        let planned = abandoned_cart(&cart(1, true, None), &m, &program, later);
        assert_eq!(planned[0].context["coupon_code"], serde_json::Value::Null);
        assert_eq!(planned[0].context["next_tier"], "Silver");
        assert_eq!(planned[0].context["points_to_next_tier"], 500);
        assert_eq!(planned[0].context["item_count"], 2);
        assert_eq!(
            planned[0].context["checkout_url"],
            "https://shop.example/c1"
        );
    }
}
