//! Domain values, each parsed once at the boundary and valid from then on.
//!
//! Constructors return a `Result` whose error says what is wrong with the input; the inner
//! fields are private, so a `Phone` in the core is always E.164 and an `Email` always an address.

mod cart;
mod member;
mod parse;
pub(crate) mod points;
mod time;
mod trigger;

pub use cart::CartState;
pub(crate) use member::Profile;
pub(crate) use member::{Member, MemberState};
pub(crate) use parse::parsed;
pub(crate) use time::local_instant;
pub(crate) use time::{Instant, QuietHours};
pub use trigger::Trigger;
pub(crate) use trigger::dedupe_key;

use std::fmt;

use chrono::NaiveDate;
use serde::{Serialize, Serializer};

/// A value that failed to parse, with a reason fit for a dead-letter header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

fn invalid(message: impl Into<String>) -> Invalid {
    Invalid(message.into())
}

/// Quotes untrusted text for an error message: escaped, and cut to a sane length.
pub(crate) fn quoted(text: &str) -> String {
    const MAX: usize = 64;
    let mut shown: String = text.chars().take(MAX).collect();
    if shown.len() < text.len() {
        shown.push('…');
    }
    format!("{shown:?}")
}

macro_rules! string_newtype {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// The value as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
    };
}

/// Checks an identifier from the platform: 1–128 printable characters, no spaces.
fn identifier(kind: &str, raw: &str) -> Result<String, Invalid> {
    if raw.is_empty() || raw.len() > 128 || !raw.chars().all(|c| c.is_ascii_graphic()) {
        return Err(invalid(format!(
            "{kind} {} must be 1 to 128 printable ASCII characters without spaces",
            quoted(raw)
        )));
    }
    Ok(raw.to_owned())
}

string_newtype!(
    /// The platform's id of a member.
    MemberId
);

impl MemberId {
    /// Parses a member id.
    pub fn parse(raw: &str) -> Result<Self, Invalid> {
        identifier("member_id", raw).map(Self)
    }
}

string_newtype!(
    /// An event id, the idempotency key of an event.
    EventId
);

impl EventId {
    /// Parses an event id.
    pub fn parse(raw: &str) -> Result<Self, Invalid> {
        identifier("id", raw).map(Self)
    }
}

string_newtype!(
    /// The platform's id of an order, cart or other record.
    RecordId
);

impl RecordId {
    /// Parses a record id; `kind` names the field in errors.
    pub fn parse(kind: &str, raw: &str) -> Result<Self, Invalid> {
        identifier(kind, raw).map(Self)
    }
}

string_newtype!(
    /// An email address (checked by lettre's RFC 5321 parser, at most 254 bytes).
    Email
);

impl Email {
    /// Parses an address; surrounding spaces are trimmed, the domain is lower-cased.
    pub fn parse(raw: &str) -> Result<Self, Invalid> {
        let trimmed = raw.trim();
        let error = || invalid(format!("email {} is not a valid address", quoted(raw)));
        if raw.len() > 254 {
            return Err(error());
        }
        let address: lettre::Address = trimmed.parse().map_err(|_| error())?;
        Ok(Self(format!(
            "{}@{}",
            address.user(),
            address.domain().to_ascii_lowercase()
        )))
    }

    /// The address masked for logs and tables: `j***@example.com`.
    pub fn masked(&self) -> String {
        let (user, domain) = self.0.split_once('@').unwrap_or((&self.0, ""));
        let first: String = user.chars().take(1).collect();
        format!("{first}***@{domain}")
    }
}

string_newtype!(
    /// A phone number in E.164 form: `+` and 8 to 15 digits, the first not 0.
    Phone
);

impl Phone {
    /// Parses an E.164 number; spaces, dashes, dots and brackets are not accepted, so that what
    /// is stored is exactly what the platform meant.
    pub fn parse(raw: &str) -> Result<Self, Invalid> {
        let digits = raw.strip_prefix('+').unwrap_or("");
        let ok = (8..=15).contains(&digits.len())
            && digits.bytes().all(|b| b.is_ascii_digit())
            && !digits.starts_with('0');
        if !ok {
            return Err(invalid(format!(
                "phone {} is not an E.164 number such as +14155550123",
                quoted(raw)
            )));
        }
        Ok(Self(raw.to_owned()))
    }

    /// The number masked for logs and tables: `+44*******123`.
    pub fn masked(&self) -> String {
        let n = self.0.len();
        format!("{}{}{}", &self.0[..3], "*".repeat(n - 6), &self.0[n - 3..])
    }
}

string_newtype!(
    /// A BCP 47 language tag such as `en`, `ko-KR` or `tr`, in canonical case.
    Locale
);

impl Locale {
    /// Parses a language tag: a 2–3 letter language, then subtags of 1–8 letters or digits.
    pub fn parse(raw: &str) -> Result<Self, Invalid> {
        let error = || {
            invalid(format!(
                "locale {} is not a BCP 47 tag such as en, ko or tr-TR",
                quoted(raw)
            ))
        };
        let mut parts = raw.split(['-', '_']);
        let language = parts.next().unwrap_or("");
        if !(2..=3).contains(&language.len()) || !language.bytes().all(|b| b.is_ascii_alphabetic())
        {
            return Err(error());
        }
        let mut canonical = language.to_ascii_lowercase();
        for part in parts {
            if part.is_empty() || part.len() > 8 || !part.bytes().all(|b| b.is_ascii_alphanumeric())
            {
                return Err(error());
            }
            canonical.push('-');
            match part.len() {
                2 => canonical.push_str(&part.to_ascii_uppercase()),
                4 => {
                    canonical.push_str(&part[..1].to_ascii_uppercase());
                    canonical.push_str(&part[1..].to_ascii_lowercase());
                }
                _ => canonical.push_str(&part.to_ascii_lowercase()),
            }
        }
        Ok(Self(canonical))
    }

    /// The tags to try for templates, most specific first: `ko-KR` → `ko-KR`, `ko`.
    pub fn fallbacks(&self) -> Vec<&str> {
        let mut chain = vec![self.0.as_str()];
        let mut rest = self.0.as_str();
        while let Some((head, _)) = rest.rsplit_once('-') {
            chain.push(head);
            rest = head;
        }
        chain
    }
}

/// An IANA time zone such as `Europe/Istanbul`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeZone(chrono_tz::Tz);

impl TimeZone {
    /// Parses an IANA zone name.
    pub fn parse(raw: &str) -> Result<Self, Invalid> {
        raw.parse::<chrono_tz::Tz>().map(Self).map_err(|_| {
            invalid(format!(
                "timezone {} is not an IANA zone such as Asia/Seoul",
                quoted(raw)
            ))
        })
    }

    /// The zone.
    pub fn tz(&self) -> chrono_tz::Tz {
        self.0
    }

    /// The zone's name.
    pub fn name(&self) -> &'static str {
        self.0.name()
    }
}

impl Serialize for TimeZone {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// A birthday: month and day, and the year when the platform knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Birthday {
    month: u32,
    day: u32,
    year: Option<i32>,
}

impl Birthday {
    /// Parses `MM-DD` or `YYYY-MM-DD`; 02-29 is a valid `MM-DD`.
    pub fn parse(raw: &str) -> Result<Self, Invalid> {
        let error = || {
            invalid(format!(
                "birthday {} is not MM-DD or YYYY-MM-DD",
                quoted(raw)
            ))
        };
        let (year, month_day) = match raw.len() {
            5 => (None, raw),
            10 if raw.as_bytes()[..4].iter().all(u8::is_ascii_digit) => {
                let date = NaiveDate::parse_from_str(raw, "%Y-%m-%d").map_err(|_| error())?;
                (Some(chrono::Datelike::year(&date)), &raw[5..])
            }
            _ => return Err(error()),
        };
        let (m, d) = month_day.split_once('-').ok_or_else(error)?;
        if !(m.len() == 2
            && d.len() == 2
            && (m.bytes().chain(d.bytes())).all(|b| b.is_ascii_digit()))
        {
            return Err(error());
        }
        let (month, day): (u32, u32) = (
            m.parse().map_err(|_| error())?,
            d.parse().map_err(|_| error())?,
        );
        // A leap year, so that 02-29 is accepted without a year.
        NaiveDate::from_ymd_opt(2000, month, day).ok_or_else(error)?;
        Ok(Self { month, day, year })
    }

    /// Month, 1–12.
    pub fn month(&self) -> u32 {
        self.month
    }

    /// Day of the month.
    pub fn day(&self) -> u32 {
        self.day
    }

    /// Year of birth, when known.
    pub fn year(&self) -> Option<i32> {
        self.year
    }

    /// The day it is celebrated in `year`: itself, or 28 February for 29 February in a
    /// common year.
    pub fn celebrated_in(&self, year: i32) -> Option<NaiveDate> {
        NaiveDate::from_ymd_opt(year, self.month, self.day)
            .or_else(|| NaiveDate::from_ymd_opt(year, self.month, self.day - 1))
    }
}

/// A member's consent per channel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Consent {
    /// May receive email.
    pub email: bool,
    /// May receive SMS.
    pub sms: bool,
}

/// A delivery channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    /// Email.
    Email,
    /// SMS.
    Sms,
}

impl Channel {
    /// The channel's name as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Email => "email",
            Channel::Sms => "sms",
        }
    }

    /// Parses a stored channel name.
    pub fn parse(raw: &str) -> Result<Self, Invalid> {
        match raw {
            "email" => Ok(Channel::Email),
            "sms" => Ok(Channel::Sms),
            other => Err(invalid(format!(
                "channel {} is not email or sms",
                quoted(other)
            ))),
        }
    }
}

/// An ISO 4217 currency with its number of minor-unit digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Currency {
    code: [u8; 3],
    minor_digits: u8,
}

/// Currencies accepted, with their minor-unit digits (ISO 4217).
const CURRENCIES: &[(&str, u8)] = &[
    ("AED", 2),
    ("ARS", 2),
    ("AUD", 2),
    ("BGN", 2),
    ("BHD", 3),
    ("BRL", 2),
    ("CAD", 2),
    ("CHF", 2),
    ("CLP", 0),
    ("CNY", 2),
    ("COP", 2),
    ("CZK", 2),
    ("DKK", 2),
    ("EGP", 2),
    ("EUR", 2),
    ("GBP", 2),
    ("HKD", 2),
    ("HUF", 2),
    ("IDR", 2),
    ("ILS", 2),
    ("INR", 2),
    ("ISK", 0),
    ("JOD", 3),
    ("JPY", 0),
    ("KRW", 0),
    ("KWD", 3),
    ("MXN", 2),
    ("MYR", 2),
    ("NOK", 2),
    ("NZD", 2),
    ("OMR", 3),
    ("PHP", 2),
    ("PLN", 2),
    ("QAR", 2),
    ("RON", 2),
    ("SAR", 2),
    ("SEK", 2),
    ("SGD", 2),
    ("THB", 2),
    ("TND", 3),
    ("TRY", 2),
    ("TWD", 2),
    ("UAH", 2),
    ("USD", 2),
    ("VND", 0),
    ("ZAR", 2),
];

impl Currency {
    /// The codes `parse` accepts.
    pub fn codes() -> impl Iterator<Item = &'static str> {
        CURRENCIES.iter().map(|(code, _)| *code)
    }

    /// Parses a known ISO 4217 code (upper case).
    pub fn parse(raw: &str) -> Result<Self, Invalid> {
        CURRENCIES
            .iter()
            .find(|(code, _)| *code == raw)
            .map(|(code, minor_digits)| Currency {
                code: code.as_bytes().try_into().expect("three letters"),
                minor_digits: *minor_digits,
            })
            .ok_or_else(|| {
                invalid(format!(
                    "currency {} is not a supported ISO 4217 code",
                    quoted(raw)
                ))
            })
    }

    /// The three-letter code.
    pub fn code(&self) -> &str {
        std::str::from_utf8(&self.code).expect("ASCII code")
    }

    /// Digits of the minor unit (2 for USD, 0 for KRW).
    pub fn minor_digits(&self) -> u8 {
        self.minor_digits
    }
}

impl Serialize for Currency {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.code())
    }
}

/// An amount of money in minor units (cents; won for KRW).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Money {
    /// Minor units, never negative.
    pub minor: i64,
    /// Currency of the amount.
    pub currency: Currency,
}

impl Money {
    /// The largest amount the ledger takes, in minor units (10^15: a trillion dollars, a
    /// quadrillion won). Sums and refunds of amounts up to this stay far inside an `i64`.
    pub const MAX_MINOR: i64 = 1_000_000_000_000_000;

    /// Builds an amount; negative amounts, and amounts over `MAX_MINOR`, are refused; `field`
    /// names the field in errors.
    pub fn new(field: &str, minor: i64, currency: Currency) -> Result<Self, Invalid> {
        if minor < 0 {
            return Err(invalid(format!(
                "{field} must not be negative (got {minor})"
            )));
        }
        if minor > Self::MAX_MINOR {
            return Err(invalid(format!(
                "{field} is {minor} minor units, more than the ledger holds (at most {})",
                Self::MAX_MINOR
            )));
        }
        Ok(Self { minor, currency })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails() {
        let ok = [
            ("Ada@Example.COM", "Ada@example.com"),
            (" x@y.io ", "x@y.io"),
        ];
        for (raw, stored) in ok {
            assert_eq!(Email::parse(raw).unwrap().as_str(), stored, "{raw}");
        }
        for raw in [
            "",
            "no-at",
            "a@",
            "@b.com",
            "a b@c.com",
            "a@b.com\r\nBcc: x@y.z",
            &"a".repeat(250),
        ] {
            let e = Email::parse(raw).unwrap_err().to_string();
            assert!(e.starts_with("email "), "{raw}: {e}");
            assert!(!e.contains('\r') && !e.contains('\n'), "{e}");
        }
        assert_eq!(
            Email::parse("jane@example.com").unwrap().masked(),
            "j***@example.com"
        );
    }

    #[test]
    fn phones() {
        for raw in ["+14155550123", "+821012345678", "+905321234567"] {
            assert!(Phone::parse(raw).is_ok(), "{raw}");
        }
        for raw in [
            "14155550123",
            "+0123456789",
            "+1 415 555 0123",
            "+1234567",
            "+1234567890123456",
            "+1415555012a",
            "",
        ] {
            assert!(Phone::parse(raw).is_err(), "{raw}");
        }
        assert_eq!(
            Phone::parse("+14155550123").unwrap().masked(),
            "+14******123"
        );
    }

    #[test]
    fn locales() {
        let cases = [
            ("en", "en"),
            ("ko-kr", "ko-KR"),
            ("tr_TR", "tr-TR"),
            ("zh-hant-tw", "zh-Hant-TW"),
        ];
        for (raw, canonical) in cases {
            assert_eq!(Locale::parse(raw).unwrap().as_str(), canonical);
        }
        for raw in ["", "e", "english", "en-", "en--US", "e1"] {
            assert!(Locale::parse(raw).is_err(), "{raw}");
        }
        assert_eq!(
            Locale::parse("zh-Hant-TW").unwrap().fallbacks(),
            ["zh-Hant-TW", "zh-Hant", "zh"]
        );
    }

    #[test]
    fn birthdays() {
        assert_eq!(Birthday::parse("02-29").unwrap().day(), 29);
        assert_eq!(Birthday::parse("1990-12-31").unwrap().year(), Some(1990));
        for raw in ["13-01", "02-30", "1991-02-29", "2-3", "12/31", ""] {
            assert!(Birthday::parse(raw).is_err(), "{raw}");
        }
    }

    #[test]
    fn currencies_and_money() {
        assert_eq!(Currency::parse("KRW").unwrap().minor_digits(), 0);
        assert_eq!(Currency::parse("USD").unwrap().minor_digits(), 2);
        assert!(Currency::parse("usd").is_err());
        assert!(Currency::parse("XXX").is_err());
        assert!(Money::new("total", -1, Currency::parse("EUR").unwrap()).is_err());
    }

    #[test]
    fn identifiers() {
        assert!(MemberId::parse("m-1").is_ok());
        for raw in ["", "has space", "tab\t", "ünïcode", &"x".repeat(129)] {
            assert!(MemberId::parse(raw).is_err(), "{raw:?}");
        }
    }
}
