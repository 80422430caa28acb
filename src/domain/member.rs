//! A member as the ledger knows them, and with their points. Applying an event to a member is
//! the ledger's (`ledger::members`).

use chrono::{DateTime, Utc};

use super::points::Points;
use super::{Birthday, Consent, Email, Locale, MemberId, Phone, TimeZone};

/// A member as `member.enrolled` describes them, and as the ledger keeps them.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// Who.
    pub member_id: MemberId,
    /// Email address, if any.
    pub email: Option<Email>,
    /// Mobile number, if any.
    pub phone: Option<Phone>,
    /// Given name for greetings.
    pub first_name: Option<String>,
    /// Language of messages.
    pub locale: Locale,
    /// Zone of quiet hours and birthdays.
    pub timezone: TimeZone,
    /// Birthday, if given.
    pub birthday: Option<Birthday>,
    /// Consent per channel.
    pub consent: Consent,
}

/// A member as the ledger knows them: the profile the platform last sent, and since when they
/// are a member.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Member {
    /// What the platform said of them.
    pub profile: Profile,
    /// When they first enrolled (business time).
    pub enrolled_at: DateTime<Utc>,
}

/// A member with their points.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct MemberState {
    /// The profile.
    pub member: Member,
    /// Lots, qualifying points and lifetime.
    pub points: Points,
}
