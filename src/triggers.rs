//! Pure trigger functions: (before, event, after) → planned messages.
//!
//! Architecture invariant: nothing here does I/O or reads a clock; time comes in as an
//! argument. Each planned message carries a dedupe key (unique in the outbox), so planning the
//! same occurrence twice is harmless.

use chrono::{DateTime, Utc};
use serde_json::json;

use crate::domain::Channel;
use crate::event::{Event, EventKind};
use crate::ledger::Member;

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

/// Every message an applied event plans. `before` is the member before the event (`None` when
/// the event enrolled them), `after` the member after it; `now` is business time.
pub fn plan(
    before: Option<&Member>,
    event: &Event,
    after: &Member,
    now: DateTime<Utc>,
) -> Vec<Planned> {
    let mut planned = Vec::new();
    planned.extend(welcome(before, event, after, now));
    planned
}

/// Welcome: fires on `member.enrolled`; dedupe key: the member. A re-enrolment plans again, but
/// the key makes it a no-op in the outbox.
///
/// Context: `first_name` (may be null), `member_id`.
pub fn welcome(
    _before: Option<&Member>,
    event: &Event,
    after: &Member,
    now: DateTime<Utc>,
) -> Vec<Planned> {
    if !matches!(event.kind, EventKind::MemberEnrolled(_)) {
        return Vec::new();
    }
    let context = json!({
        "first_name": after.first_name,
        "member_id": after.member_id,
    });
    per_channel(
        Trigger::Welcome,
        after.member_id.as_str(),
        after,
        now,
        context,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Consent, Email, EventId, Locale, MemberId, Phone, TimeZone};
    use crate::event::{CartRef, Profile};

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

    fn enrolled(m: &Member) -> Event {
        Event {
            id: EventId::parse("e1").unwrap(),
            source: "t".into(),
            time: None,
            kind: EventKind::MemberEnrolled(Profile {
                member_id: m.member_id.clone(),
                email: m.email.clone(),
                phone: m.phone.clone(),
                first_name: m.first_name.clone(),
                locale: m.locale.clone(),
                timezone: m.timezone,
                birthday: None,
                consent: m.consent,
            }),
        }
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
        for (email, phone, consent, expected) in cases {
            let m = member(email, phone, consent);
            let keys: Vec<String> = plan(None, &enrolled(&m), &m, DateTime::UNIX_EPOCH)
                .into_iter()
                .map(|p| p.dedupe_key)
                .collect();
            assert_eq!(keys, expected, "email={email} phone={phone} {consent:?}");
        }
    }

    #[test]
    fn welcome_only_on_enrolment() {
        let m = member(
            true,
            true,
            Consent {
                email: true,
                sms: true,
            },
        );
        let event = Event {
            kind: EventKind::CartCheckedOut(CartRef {
                cart_id: crate::domain::RecordId::parse("cart_id", "c").unwrap(),
                member_id: m.member_id.clone(),
            }),
            ..enrolled(&m)
        };
        assert!(plan(Some(&m), &event, &m, DateTime::UNIX_EPOCH).is_empty());
    }

    #[test]
    fn trigger_names_round_trip() {
        for t in Trigger::ALL {
            assert_eq!(Trigger::parse(t.as_str()), Some(t));
        }
    }
}
