//! The context a trigger would render with for a member now, built from the ledger: what
//! previews and test sends to a member use. Messages the triggers plan carry their own context,
//! fixed when they were planned.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::config::Settings;
use crate::domain::{CartState, MemberState, Trigger};
use crate::program::Program;
use crate::triggers::{cart_variables, rewards_within, with_progress};

/// The context `trigger` would render with for this member now: the balance, the lots expiring
/// next, the tier and what is ahead; the member's newest open cart (or the sample cart when
/// there is none).
pub(crate) fn context_now(
    trigger: Trigger,
    state: &MemberState,
    cart: Option<&CartState>,
    program: &Program,
    now: DateTime<Utc>,
) -> Value {
    let balance = state.points.balance();
    let context = match trigger {
        Trigger::Welcome => json!({
            "member_id": state.member.profile.member_id,
            "signup_bonus": program.signup_bonus,
            "balance": balance,
            "rewards": rewards_within(program, balance),
        }),
        Trigger::RedemptionReady => {
            let reward = program
                .rewards
                .iter()
                .rev()
                .find(|r| r.points <= balance)
                .or(program.rewards.first());
            json!({
                "balance": balance,
                "reward": reward.map(|r| json!({"points": r.points, "discount": r.discount})),
                "rewards": rewards_within(program, balance),
            })
        }
        Trigger::TierUp => tier_up(state, program, now),
        Trigger::PointsExpiring => points_expiring(state, program, now),
        Trigger::Birthday => json!({"bonus": program.birthday_bonus, "balance": balance}),
        Trigger::AbandonedCart => cart.map_or_else(sample_cart, cart_variables),
    };
    let mut context = with_progress(context, state, program, now);
    context["first_name"] = json!(state.member.profile.first_name);
    context
}

/// The tier the member's points reach now, and the one below it.
fn tier_up(state: &MemberState, program: &Program, now: DateTime<Utc>) -> Value {
    let locale = &state.member.profile.locale;
    let points = state.points.tier_points(now, program.tier_window_months);
    let is = program.tier_for(points);
    json!({
        "tier": program.tier_name(is, locale),
        "previous_tier": program.tier_name(is.saturating_sub(1), locale),
        "benefits": program.tier_benefits(is, locale),
        "tier_points": points,
    })
}

/// The points that lapse next (on the member's local date), and the notice that date falls in;
/// 30 days ahead when nothing lapses.
fn points_expiring(state: &MemberState, program: &Program, now: DateTime<Utc>) -> Value {
    let tz = state.member.profile.timezone.tz();
    let today = now.with_timezone(&tz).date_naive();
    let lapsing = || {
        state
            .points
            .lots
            .iter()
            .filter(|l| l.expires_at > now)
            .map(|l| (l.expires_at.with_timezone(&tz).date_naive(), l.remaining))
    };
    let next = lapsing()
        .filter(|(_, left)| *left > 0)
        .map(|(d, _)| d)
        .min();
    let date = next.unwrap_or(today + chrono::Duration::days(30));
    let points: i64 = lapsing()
        .filter(|(d, _)| *d == date)
        .map(|(_, left)| left)
        .sum();
    let days_left = (date - today).num_days();
    let notice = program
        .expiring_notice_days
        .iter()
        .rev()
        .find(|n| days_left <= i64::from(**n))
        .or(program.expiring_notice_days.first())
        .copied()
        .unwrap_or(30);
    json!({
        "points": points,
        "expiry_date": date.to_string(),
        "days_left": days_left,
        "notice_days": notice,
        "balance": state.points.balance(),
    })
}

/// The sample cart's variables, for a member with no open cart.
fn sample_cart() -> Value {
    let sample = super::sample_context(Trigger::AbandonedCart);
    let keys = [
        "cart_id",
        "items",
        "item_count",
        "total_minor",
        "currency",
        "checkout_url",
    ];
    keys.iter()
        .map(|k| ((*k).to_owned(), sample[*k].clone()))
        .collect()
}

/// Context variables a message planned by an older version lacks.
const PLANNED_LATER: [&str; 5] = [
    "coupon_code",
    "next_tier",
    "points_to_next_tier",
    "next_reward",
    "points_to_next_reward",
];

/// Adds what every message renders with beside its trigger's variables: the shop's name and
/// address, and the locale (the helpers format money, points and dates for it). Variables
/// added since a message was planned are null in it, so that it renders too.
pub(crate) fn add_shop_variables(context: &mut Value, settings: &Settings, locale: &str) {
    if let Value::Object(map) = context {
        map.insert("shop_name".into(), settings.shop_name.clone().into());
        map.insert("locale".into(), locale.into());
        map.insert(
            "shop_address".into(),
            settings.shop_address.clone().unwrap_or_default().into(),
        );
        for key in PLANNED_LATER {
            map.entry(key).or_insert(Value::Null);
        }
    }
}
