//! The six triggers of DESIGN.md, and the outbox key of one occurrence of a trigger.

use super::Channel;

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

/// The outbox key of one occurrence of a trigger on a channel: the trigger, the trigger-specific
/// part of DESIGN.md's dedupe key (`member:year`, `cart:version`…), the channel.
pub(crate) fn dedupe_key(trigger: Trigger, key: &str, channel: Channel) -> String {
    format!("{}:{key}:{}", trigger.as_str(), channel.as_str())
}
