//! The wire format: CloudEvents 1.0 structured JSON, parsed into domain events.
//!
//! The serde structs here are the boundary; everything past `parse` works on `Event`, whose
//! values are already valid. A parse failure is a `Rejection` whose text becomes the
//! `x-lifecycle-error` header of the dead letter, so it names the field and what is wrong.

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

use crate::domain::{
    Birthday, Consent, Currency, Email, EventId, Invalid, Locale, MemberId, Money, Phone, RecordId,
    TimeZone, quoted,
};

mod schema;

pub use schema::schemas;

/// Why an event was refused; the text is the dead letter's reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Rejection(pub String);

impl From<Invalid> for Rejection {
    fn from(value: Invalid) -> Self {
        Rejection(value.0)
    }
}

/// A valid event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Idempotency key.
    pub id: EventId,
    /// The platform that published it.
    pub source: String,
    /// When the platform says it happened.
    pub time: Option<DateTime<Utc>>,
    /// What happened.
    pub kind: EventKind,
}

/// The event types of DESIGN.md.
#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    /// `member.enrolled`
    MemberEnrolled(Profile),
    /// `member.updated`
    MemberUpdated(ProfileChanges),
    /// `order.placed`
    OrderPlaced(Order),
    /// `order.refunded`
    OrderRefunded(Refund),
    /// `points.adjusted`
    PointsAdjusted(Adjustment),
    /// `points.redeemed`
    PointsRedeemed(Redemption),
    /// `cart.updated`
    CartUpdated(Cart),
    /// `cart.checked_out`
    CartCheckedOut(CartRef),
    /// `feedback.submitted`
    FeedbackSubmitted(Feedback),
}

impl EventKind {
    /// The CloudEvents `type`, also the routing key.
    pub fn type_name(&self) -> &'static str {
        match self {
            EventKind::MemberEnrolled(_) => "member.enrolled",
            EventKind::MemberUpdated(_) => "member.updated",
            EventKind::OrderPlaced(_) => "order.placed",
            EventKind::OrderRefunded(_) => "order.refunded",
            EventKind::PointsAdjusted(_) => "points.adjusted",
            EventKind::PointsRedeemed(_) => "points.redeemed",
            EventKind::CartUpdated(_) => "cart.updated",
            EventKind::CartCheckedOut(_) => "cart.checked_out",
            EventKind::FeedbackSubmitted(_) => "feedback.submitted",
        }
    }

    /// The member the event is about; every type has one.
    pub fn member_id(&self) -> &MemberId {
        match self {
            EventKind::MemberEnrolled(p) => &p.member_id,
            EventKind::MemberUpdated(p) => &p.member_id,
            EventKind::OrderPlaced(o) => &o.member_id,
            EventKind::OrderRefunded(r) => &r.member_id,
            EventKind::PointsAdjusted(a) => &a.member_id,
            EventKind::PointsRedeemed(r) => &r.member_id,
            EventKind::CartUpdated(c) => &c.member_id,
            EventKind::CartCheckedOut(c) => &c.member_id,
            EventKind::FeedbackSubmitted(f) => &f.member_id,
        }
    }
}

pub(crate) use crate::domain::Profile;

/// The fields `member.updated` changes: `None` leaves a field alone, `Some(None)` clears it.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileChanges {
    /// Who.
    pub member_id: MemberId,
    /// New address, or cleared.
    pub email: Option<Option<Email>>,
    /// New number, or cleared.
    pub phone: Option<Option<Phone>>,
    /// New name, or cleared.
    pub first_name: Option<Option<String>>,
    /// New language.
    pub locale: Option<Locale>,
    /// New zone.
    pub timezone: Option<TimeZone>,
    /// New birthday, or cleared.
    pub birthday: Option<Option<Birthday>>,
    /// New email consent.
    pub consent_email: Option<bool>,
    /// New SMS consent.
    pub consent_sms: Option<bool>,
}

/// One line of an order or cart.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Item {
    /// Stock keeping unit.
    pub sku: String,
    /// Product name as shown to the customer.
    pub name: String,
    /// How many, at least 1.
    pub quantity: u32,
    /// Price of one, in minor units.
    pub unit_price: i64,
}

/// `order.placed`
#[derive(Debug, Clone, PartialEq)]
pub struct Order {
    /// The order.
    pub order_id: RecordId,
    /// The buyer.
    pub member_id: MemberId,
    /// What was paid.
    pub total: Money,
    /// What was bought.
    pub items: Vec<Item>,
    /// The cart this order checks out, if any.
    pub cart_id: Option<RecordId>,
}

/// `order.refunded`
#[derive(Debug, Clone, PartialEq)]
pub struct Refund {
    /// The refunded order.
    pub order_id: RecordId,
    /// The buyer.
    pub member_id: MemberId,
    /// How much of it was refunded.
    pub amount: Money,
}

/// `points.adjusted`
#[derive(Debug, Clone, PartialEq)]
pub struct Adjustment {
    /// Whose points.
    pub member_id: MemberId,
    /// Points added (positive) or removed (negative), never 0.
    pub points: i64,
    /// Why (`referral`, `review`, `manual`, …).
    pub reason: String,
}

/// `points.redeemed`
#[derive(Debug, Clone, PartialEq)]
pub struct Redemption {
    /// Whose points.
    pub member_id: MemberId,
    /// Points spent, positive.
    pub points: i64,
    /// What they bought, if said.
    pub reward: Option<String>,
}

/// `feedback.submitted`: the answer to the NPS question, perhaps about an order.
#[derive(Debug, Clone, PartialEq)]
pub struct Feedback {
    /// Who answered.
    pub member_id: MemberId,
    /// 0 to 10 ("how likely are you to recommend us?").
    pub score: u8,
    /// The order it is about, if any (feedback points are given once per order).
    pub order_id: Option<RecordId>,
    /// What they wrote, if anything (at most 2,000 characters).
    pub comment: Option<String>,
}

/// `cart.updated`
#[derive(Debug, Clone, PartialEq)]
pub struct Cart {
    /// The cart.
    pub cart_id: RecordId,
    /// Its owner.
    pub member_id: MemberId,
    /// What is in it.
    pub items: Vec<Item>,
    /// Its value.
    pub total: Money,
    /// Where the customer resumes checkout (http or https).
    pub checkout_url: String,
}

/// `cart.checked_out`
#[derive(Debug, Clone, PartialEq)]
pub struct CartRef {
    /// The cart.
    pub cart_id: RecordId,
    /// Its owner.
    pub member_id: MemberId,
}

/// The CloudEvents envelope as it arrives; `schema` completes its schema per type (`type` and
/// `data`).
#[derive(Deserialize, schemars::JsonSchema)]
struct Envelope {
    /// The CloudEvents version.
    #[schemars(extend("const" = "1.0"))]
    specversion: String,
    /// The idempotency key: a retry publishes the same id, and lifecycle applies it once.
    #[schemars(with = "schema::Identifier")]
    id: String,
    /// The platform that published it.
    #[schemars(length(min = 1))]
    source: String,
    /// The event type, also the routing key.
    #[serde(rename = "type")]
    kind: String,
    /// When it happened (RFC 3339); records keep it, capped at lifecycle's now.
    #[schemars(with = "Option<schema::Rfc3339>")]
    time: Option<String>,
    /// `application/json` when given.
    #[schemars(with = "Option<schema::JsonMediaType>")]
    datacontenttype: Option<String>,
    /// The type's data.
    data: Option<serde_json::Value>,
}

/// Parses an event body; `max_bytes` bounds the body before any parsing.
pub fn parse(body: &[u8], max_bytes: usize) -> Result<Event, Rejection> {
    if body.len() > max_bytes {
        return Err(Rejection(format!(
            "event body is {} bytes, over the limit of {max_bytes}",
            body.len()
        )));
    }
    let envelope: Envelope = serde_json::from_slice(body).map_err(|e| {
        if e.is_syntax() || e.is_eof() {
            Rejection(format!("not JSON: {e}"))
        } else {
            // Parsed again, only to name the field: the first pass stays as fast as it was.
            let mut at = serde_json::Deserializer::from_slice(body);
            match serde_path_to_error::deserialize::<_, Envelope>(&mut at) {
                Err(e) if e.path().to_string() != "." => {
                    Rejection(format!("not a CloudEvent: {}: {}", e.path(), e.inner()))
                }
                _ => Rejection(format!("not a CloudEvent: {e}")),
            }
        }
    })?;
    if envelope.specversion != "1.0" {
        return Err(Rejection(format!(
            "specversion {} is not \"1.0\"",
            quoted(&envelope.specversion)
        )));
    }
    if let Some(content_type) = &envelope.datacontenttype
        && !content_type.starts_with("application/json")
    {
        return Err(Rejection(format!(
            "datacontenttype {} is not application/json",
            quoted(content_type)
        )));
    }
    let id = EventId::parse(&envelope.id)?;
    if envelope.source.is_empty() {
        return Err(Rejection("source must not be empty".into()));
    }
    let time = envelope
        .time
        .as_deref()
        .map(|t| {
            DateTime::parse_from_rfc3339(t)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|_| Rejection(format!("time {} is not RFC 3339", quoted(t))))
        })
        .transpose()?;
    let data = envelope.data.unwrap_or(serde_json::Value::Null);
    let kind = KINDS
        .iter()
        .find(|kind| kind.name == envelope.kind)
        .ok_or_else(|| Rejection(format!("unknown event type {}", quoted(&envelope.kind))))?;
    let kind = (kind.decode)(data)?;
    Ok(Event {
        id,
        source: envelope.source,
        time,
        kind,
    })
}

/// An event type the decoder accepts: its name, how its `data` decodes, and the schema of that
/// `data` (`schema::schemas` publishes it), kept in one table so the two cannot disagree.
struct Kind {
    name: &'static str,
    decode: fn(serde_json::Value) -> Result<EventKind, Rejection>,
    schema: fn(&mut schemars::SchemaGenerator) -> schemars::Schema,
}

/// DESIGN.md's event types.
const KINDS: [Kind; 9] = [
    Kind {
        name: "member.enrolled",
        decode: |data| {
            Ok(EventKind::MemberEnrolled(
                decode::<wire::Profile>(data)?.try_into()?,
            ))
        },
        schema: |g| g.subschema_for::<wire::Profile>(),
    },
    Kind {
        name: "member.updated",
        decode: |data| {
            Ok(EventKind::MemberUpdated(
                decode::<wire::ProfileChanges>(data)?.try_into()?,
            ))
        },
        schema: |g| g.subschema_for::<wire::ProfileChanges>(),
    },
    Kind {
        name: "order.placed",
        decode: |data| {
            Ok(EventKind::OrderPlaced(
                decode::<wire::Order>(data)?.try_into()?,
            ))
        },
        schema: |g| g.subschema_for::<wire::Order>(),
    },
    Kind {
        name: "order.refunded",
        decode: |data| {
            Ok(EventKind::OrderRefunded(
                decode::<wire::Refund>(data)?.try_into()?,
            ))
        },
        schema: |g| g.subschema_for::<wire::Refund>(),
    },
    Kind {
        name: "points.adjusted",
        decode: |data| {
            Ok(EventKind::PointsAdjusted(
                decode::<wire::Adjustment>(data)?.try_into()?,
            ))
        },
        schema: |g| g.subschema_for::<wire::Adjustment>(),
    },
    Kind {
        name: "points.redeemed",
        decode: |data| {
            Ok(EventKind::PointsRedeemed(
                decode::<wire::Redemption>(data)?.try_into()?,
            ))
        },
        schema: |g| g.subschema_for::<wire::Redemption>(),
    },
    Kind {
        name: "cart.updated",
        decode: |data| {
            Ok(EventKind::CartUpdated(
                decode::<wire::Cart>(data)?.try_into()?,
            ))
        },
        schema: |g| g.subschema_for::<wire::Cart>(),
    },
    Kind {
        name: "cart.checked_out",
        decode: |data| {
            Ok(EventKind::CartCheckedOut(
                decode::<wire::CartRef>(data)?.try_into()?,
            ))
        },
        schema: |g| g.subschema_for::<wire::CartRef>(),
    },
    Kind {
        name: "feedback.submitted",
        decode: |data| {
            Ok(EventKind::FeedbackSubmitted(
                decode::<wire::Feedback>(data)?.try_into()?,
            ))
        },
        schema: |g| g.subschema_for::<wire::Feedback>(),
    },
];

/// Decodes `data` into its wire struct, naming the path of a bad field.
fn decode<T: DeserializeOwned>(data: serde_json::Value) -> Result<T, Rejection> {
    if !data.is_object() {
        return Err(Rejection("data must be a JSON object".into()));
    }
    serde_path_to_error::deserialize(data).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            Rejection(format!("data: {}", e.inner()))
        } else {
            Rejection(format!("data.{path}: {}", e.inner()))
        }
    })
}

/// Prefixes a domain error with the field it came from, unless it already names it.
fn field<T>(name: &str, result: Result<T, Invalid>) -> Result<T, Rejection> {
    result.map_err(|e| Rejection(format!("data.{name}: {e}")))
}

/// A display name: at most 100 characters and no control characters (CR, LF, NUL …) as sent,
/// so it is safe in a mail header and a greeting; stored trimmed.
fn display_name(name: &str, raw: String) -> Result<Option<String>, Rejection> {
    if raw.chars().any(char::is_control) {
        return Err(Rejection(format!(
            "data.{name}: must not contain control characters"
        )));
    }
    let trimmed = raw.trim();
    if raw.chars().count() > 100 {
        return Err(Rejection(format!(
            "data.{name}: longer than 100 characters"
        )));
    }
    Ok((!trimmed.is_empty()).then(|| trimmed.to_owned()))
}

fn money(name: &str, minor: i64, currency: &str) -> Result<Money, Rejection> {
    let currency = field("currency", Currency::parse(currency))?;
    field(name, Money::new(name, minor, currency))
}

fn items(raw: Vec<wire::Item>) -> Result<Vec<Item>, Rejection> {
    if raw.len() > 500 {
        return Err(Rejection("data.items: more than 500 lines".into()));
    }
    raw.into_iter()
        .enumerate()
        .map(|(i, item)| {
            let at = |what: &str| format!("data.items[{i}].{what}");
            if item.quantity == 0 {
                return Err(Rejection(format!("{}: must be at least 1", at("quantity"))));
            }
            if item.unit_price < 0 {
                return Err(Rejection(format!(
                    "{}: must not be negative",
                    at("unit_price")
                )));
            }
            if item.unit_price > Money::MAX_MINOR {
                return Err(Rejection(format!(
                    "{}: more than the ledger holds (at most {} minor units)",
                    at("unit_price"),
                    Money::MAX_MINOR
                )));
            }
            let name = display_name(&format!("items[{i}].name"), item.name)?
                .ok_or_else(|| Rejection(format!("{}: must not be empty", at("name"))))?;
            let sku = RecordId::parse("sku", &item.sku)
                .map_err(|e| Rejection(format!("{}: {e}", at("sku"))))?;
            Ok(Item {
                sku: sku.to_string(),
                name,
                quantity: item.quantity,
                unit_price: item.unit_price,
            })
        })
        .collect()
}

/// Wire structs: exactly the JSON of DESIGN.md's event table. Unknown fields are ignored so
/// the platform can add fields without breaking the worker. Each field's `schemars` attribute
/// states, for `docs/events/`, the check its `TryFrom` makes (see `schema`).
mod wire {
    use schemars::JsonSchema;

    use super::schema::{
        CheckoutUrl, Comment, CurrencyCode, DisplayName, E164, EmailAddress, IanaZone, Identifier,
        LanguageTag, MinorUnits, MonthDay, PositiveMinorUnits, Quantity,
    };
    use super::*;

    /// Distinguishes an absent field (`None`) from an explicit `null` (`Some(None)`).
    fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
        d: D,
    ) -> Result<Option<Option<T>>, D::Error> {
        Option::<T>::deserialize(d).map(Some)
    }

    /// What the member agreed to be sent, per channel.
    #[derive(Deserialize, JsonSchema)]
    pub struct ConsentWire {
        /// Marketing and lifecycle email.
        pub email: bool,
        /// SMS.
        pub sms: bool,
    }

    /// The channels whose consent changes; an absent one stays as it was.
    #[derive(Deserialize, JsonSchema)]
    pub struct PartialConsent {
        /// Email consent, if it changed.
        pub email: Option<bool>,
        /// SMS consent, if it changed.
        pub sms: Option<bool>,
    }

    /// `member.enrolled`: a member joined the programme.
    #[derive(Deserialize, JsonSchema)]
    pub struct Profile {
        /// The platform's id of the member.
        #[schemars(with = "Identifier")]
        pub member_id: String,
        /// Email address (RFC 5321, at most 254 bytes).
        #[schemars(with = "Option<EmailAddress>")]
        pub email: Option<String>,
        /// Mobile number in E.164 form.
        #[schemars(with = "Option<E164>")]
        pub phone: Option<String>,
        /// Given name for greetings.
        #[schemars(with = "Option<DisplayName>")]
        pub first_name: Option<String>,
        /// Language of messages (BCP 47).
        #[schemars(with = "LanguageTag")]
        pub locale: String,
        /// IANA time zone of quiet hours and birthdays.
        #[schemars(with = "IanaZone")]
        pub timezone: String,
        /// `MM-DD`, or `YYYY-MM-DD` when the year is known.
        #[schemars(with = "Option<MonthDay>")]
        pub birthday: Option<String>,
        /// Consent per channel.
        pub consent: ConsentWire,
    }

    impl TryFrom<Profile> for super::Profile {
        type Error = Rejection;

        fn try_from(w: Profile) -> Result<Self, Rejection> {
            Ok(super::Profile {
                member_id: field("member_id", MemberId::parse(&w.member_id))?,
                email: w
                    .email
                    .as_deref()
                    .map(|e| field("email", Email::parse(e)))
                    .transpose()?,
                phone: w
                    .phone
                    .as_deref()
                    .map(|p| field("phone", Phone::parse(p)))
                    .transpose()?,
                first_name: w
                    .first_name
                    .map(|n| display_name("first_name", n))
                    .transpose()?
                    .flatten(),
                locale: field("locale", Locale::parse(&w.locale))?,
                timezone: field("timezone", TimeZone::parse(&w.timezone))?,
                birthday: w
                    .birthday
                    .as_deref()
                    .map(|b| field("birthday", Birthday::parse(b)))
                    .transpose()?,
                consent: Consent {
                    email: w.consent.email,
                    sms: w.consent.sms,
                },
            })
        }
    }

    /// `member.updated`: fields absent stay as they were; `null` clears an optional one.
    #[derive(Deserialize, JsonSchema)]
    pub struct ProfileChanges {
        /// The platform's id of the member.
        #[schemars(with = "Identifier")]
        pub member_id: String,
        /// New address, or `null` to clear it.
        #[serde(default, deserialize_with = "nullable")]
        #[schemars(with = "Option<EmailAddress>")]
        pub email: Option<Option<String>>,
        /// New number, or `null` to clear it.
        #[serde(default, deserialize_with = "nullable")]
        #[schemars(with = "Option<E164>")]
        pub phone: Option<Option<String>>,
        /// New given name, or `null` to clear it.
        #[serde(default, deserialize_with = "nullable")]
        #[schemars(with = "Option<DisplayName>")]
        pub first_name: Option<Option<String>>,
        /// New language.
        #[schemars(with = "Option<LanguageTag>")]
        pub locale: Option<String>,
        /// New time zone.
        #[schemars(with = "Option<IanaZone>")]
        pub timezone: Option<String>,
        /// New birthday, or `null` to clear it.
        #[serde(default, deserialize_with = "nullable")]
        #[schemars(with = "Option<MonthDay>")]
        pub birthday: Option<Option<String>>,
        /// Consent changes.
        pub consent: Option<PartialConsent>,
    }

    impl TryFrom<ProfileChanges> for super::ProfileChanges {
        type Error = Rejection;

        fn try_from(w: ProfileChanges) -> Result<Self, Rejection> {
            let consent = w.consent.unwrap_or(PartialConsent {
                email: None,
                sms: None,
            });
            Ok(super::ProfileChanges {
                member_id: field("member_id", MemberId::parse(&w.member_id))?,
                email: w
                    .email
                    .map(|e| {
                        e.as_deref()
                            .map(|e| field("email", Email::parse(e)))
                            .transpose()
                    })
                    .transpose()?,
                phone: w
                    .phone
                    .map(|p| {
                        p.as_deref()
                            .map(|p| field("phone", Phone::parse(p)))
                            .transpose()
                    })
                    .transpose()?,
                first_name: w
                    .first_name
                    .map(|n| {
                        n.map(|n| display_name("first_name", n))
                            .transpose()
                            .map(Option::flatten)
                    })
                    .transpose()?,
                locale: w
                    .locale
                    .as_deref()
                    .map(|l| field("locale", Locale::parse(l)))
                    .transpose()?,
                timezone: w
                    .timezone
                    .as_deref()
                    .map(|t| field("timezone", TimeZone::parse(t)))
                    .transpose()?,
                birthday: w
                    .birthday
                    .map(|b| {
                        b.as_deref()
                            .map(|b| field("birthday", Birthday::parse(b)))
                            .transpose()
                    })
                    .transpose()?,
                consent_email: consent.email,
                consent_sms: consent.sms,
            })
        }
    }

    /// One line of an order or cart.
    #[derive(Deserialize, JsonSchema)]
    pub struct Item {
        /// Stock keeping unit.
        #[schemars(with = "Identifier")]
        pub sku: String,
        /// Product name as shown to the customer.
        #[schemars(with = "DisplayName", length(min = 1))]
        pub name: String,
        /// How many.
        #[schemars(with = "Quantity")]
        pub quantity: u32,
        /// Price of one, in minor units of the currency.
        #[schemars(with = "MinorUnits")]
        pub unit_price: i64,
    }

    /// `order.placed`: points are earned on `total`.
    #[derive(Deserialize, JsonSchema)]
    pub struct Order {
        /// The platform's id of the order; a second event with it earns nothing more.
        #[schemars(with = "Identifier")]
        pub order_id: String,
        /// The buyer.
        #[schemars(with = "Identifier")]
        pub member_id: String,
        /// What was paid, in minor units of `currency`.
        #[schemars(with = "MinorUnits")]
        pub total: i64,
        /// ISO 4217 code.
        #[schemars(with = "CurrencyCode")]
        pub currency: String,
        /// What was bought.
        #[serde(default)]
        #[schemars(length(max = 500))]
        pub items: Vec<Item>,
        /// The cart this order checks out, if any.
        #[schemars(with = "Option<Identifier>")]
        pub cart_id: Option<String>,
    }

    impl TryFrom<Order> for super::Order {
        type Error = Rejection;

        fn try_from(w: Order) -> Result<Self, Rejection> {
            Ok(super::Order {
                order_id: field("order_id", RecordId::parse("order_id", &w.order_id))?,
                member_id: field("member_id", MemberId::parse(&w.member_id))?,
                total: money("total", w.total, &w.currency)?,
                items: items(w.items)?,
                cart_id: w
                    .cart_id
                    .as_deref()
                    .map(|c| field("cart_id", RecordId::parse("cart_id", c)))
                    .transpose()?,
            })
        }
    }

    /// `order.refunded`: the points the refunded part earned are taken back.
    #[derive(Deserialize, JsonSchema)]
    pub struct Refund {
        /// The refunded order.
        #[schemars(with = "Identifier")]
        pub order_id: String,
        /// The buyer.
        #[schemars(with = "Identifier")]
        pub member_id: String,
        /// How much was refunded, in minor units, more than 0.
        #[schemars(with = "PositiveMinorUnits")]
        pub amount: i64,
        /// ISO 4217 code.
        #[schemars(with = "CurrencyCode")]
        pub currency: String,
    }

    impl TryFrom<Refund> for super::Refund {
        type Error = Rejection;

        fn try_from(w: Refund) -> Result<Self, Rejection> {
            let amount = money("amount", w.amount, &w.currency)?;
            if amount.minor == 0 {
                return Err(Rejection("data.amount: must be more than 0".into()));
            }
            Ok(super::Refund {
                order_id: field("order_id", RecordId::parse("order_id", &w.order_id))?,
                member_id: field("member_id", MemberId::parse(&w.member_id))?,
                amount,
            })
        }
    }

    /// `points.adjusted`: points given or taken by hand or by another programme.
    #[derive(Deserialize, JsonSchema)]
    pub struct Adjustment {
        /// Whose points.
        #[schemars(with = "Identifier")]
        pub member_id: String,
        /// Points added (positive) or removed (negative), never 0.
        #[schemars(range(min = -100_000_000, max = 100_000_000), extend("not" = {"const": 0}))]
        pub points: i64,
        /// Why (`referral`, `review`, `manual`, …).
        #[schemars(with = "Identifier")]
        pub reason: String,
    }

    impl TryFrom<Adjustment> for super::Adjustment {
        type Error = Rejection;

        fn try_from(w: Adjustment) -> Result<Self, Rejection> {
            if w.points == 0 || !(-100_000_000..=100_000_000).contains(&w.points) {
                return Err(Rejection(
                    "data.points: must be non-zero and at most 100000000 either way".into(),
                ));
            }
            let reason = field("reason", RecordId::parse("reason", &w.reason))?;
            Ok(super::Adjustment {
                member_id: field("member_id", MemberId::parse(&w.member_id))?,
                points: w.points,
                reason: reason.to_string(),
            })
        }
    }

    /// `feedback.submitted`: the answer to "how likely are you to recommend us?".
    #[derive(Deserialize, JsonSchema)]
    pub struct Feedback {
        /// Who answered.
        #[schemars(with = "Identifier")]
        pub member_id: String,
        /// From 0 to 10.
        #[schemars(range(min = 0, max = 10))]
        pub score: i64,
        /// The order it is about, if any (feedback points are given once per order).
        #[schemars(with = "Option<Identifier>")]
        pub order_id: Option<String>,
        /// What they wrote, if anything.
        #[schemars(with = "Option<Comment>")]
        pub comment: Option<String>,
    }

    impl TryFrom<Feedback> for super::Feedback {
        type Error = Rejection;

        fn try_from(w: Feedback) -> Result<Self, Rejection> {
            let score = u8::try_from(w.score)
                .ok()
                .filter(|s| *s <= 10)
                .ok_or_else(|| {
                    Rejection(format!("data.score: {} is not between 0 and 10", w.score))
                })?;
            let comment = match w.comment {
                Some(c) if c.chars().count() > 2000 => {
                    return Err(Rejection(
                        "data.comment: longer than 2000 characters".into(),
                    ));
                }
                Some(c) if c.chars().any(|ch| ch.is_control() && ch != '\n') => {
                    return Err(Rejection(
                        "data.comment: must not contain control characters other than line breaks"
                            .into(),
                    ));
                }
                Some(c) => Some(c.trim().to_owned()).filter(|c| !c.is_empty()),
                None => None,
            };
            Ok(super::Feedback {
                member_id: field("member_id", MemberId::parse(&w.member_id))?,
                score,
                order_id: w
                    .order_id
                    .as_deref()
                    .map(|o| field("order_id", RecordId::parse("order_id", o)))
                    .transpose()?,
                comment,
            })
        }
    }

    /// `points.redeemed`: points spent on a reward.
    #[derive(Deserialize, JsonSchema)]
    pub struct Redemption {
        /// Whose points.
        #[schemars(with = "Identifier")]
        pub member_id: String,
        /// Points spent.
        #[schemars(range(min = 1, max = 100_000_000))]
        pub points: i64,
        /// What they bought, if said.
        #[schemars(with = "Option<DisplayName>")]
        pub reward: Option<String>,
    }

    impl TryFrom<Redemption> for super::Redemption {
        type Error = Rejection;

        fn try_from(w: Redemption) -> Result<Self, Rejection> {
            if !(1..=100_000_000).contains(&w.points) {
                return Err(Rejection(
                    "data.points: must be between 1 and 100000000".into(),
                ));
            }
            Ok(super::Redemption {
                member_id: field("member_id", MemberId::parse(&w.member_id))?,
                points: w.points,
                reward: w
                    .reward
                    .map(|r| display_name("reward", r))
                    .transpose()?
                    .flatten(),
            })
        }
    }

    /// `cart.updated`: the cart as it is now; an unchanged cart may be abandoned.
    #[derive(Deserialize, JsonSchema)]
    pub struct Cart {
        /// The platform's id of the cart.
        #[schemars(with = "Identifier")]
        pub cart_id: String,
        /// Its owner.
        #[schemars(with = "Identifier")]
        pub member_id: String,
        /// What is in it.
        #[serde(default)]
        #[schemars(length(max = 500))]
        pub items: Vec<Item>,
        /// Its value, in minor units of `currency`.
        #[schemars(with = "MinorUnits")]
        pub total: i64,
        /// ISO 4217 code.
        #[schemars(with = "CurrencyCode")]
        pub currency: String,
        /// Where the customer resumes checkout.
        #[schemars(with = "CheckoutUrl")]
        pub checkout_url: String,
    }

    impl TryFrom<Cart> for super::Cart {
        type Error = Rejection;

        fn try_from(w: Cart) -> Result<Self, Rejection> {
            // As sent, not as the URL parser would clean it: lower-case `http(s)://`, no
            // spaces or control characters, at most 2,048 characters.
            let raw = &w.checkout_url;
            let url_ok = (raw.starts_with("http://") || raw.starts_with("https://"))
                && !raw.chars().any(|c| c == ' ' || c.is_control())
                && raw.chars().count() <= 2048
                && url::Url::parse(raw).is_ok_and(|u| u.host().is_some());
            if !url_ok {
                return Err(Rejection(format!(
                    "data.checkout_url: {} is not an http(s) URL",
                    quoted(&w.checkout_url)
                )));
            }
            Ok(super::Cart {
                cart_id: field("cart_id", RecordId::parse("cart_id", &w.cart_id))?,
                member_id: field("member_id", MemberId::parse(&w.member_id))?,
                items: items(w.items)?,
                total: money("total", w.total, &w.currency)?,
                checkout_url: w.checkout_url,
            })
        }
    }

    /// `cart.checked_out`: the cart became an order and is no longer abandoned.
    #[derive(Deserialize, JsonSchema)]
    pub struct CartRef {
        /// The cart.
        #[schemars(with = "Identifier")]
        pub cart_id: String,
        /// Its owner.
        #[schemars(with = "Identifier")]
        pub member_id: String,
    }

    impl TryFrom<CartRef> for super::CartRef {
        type Error = Rejection;

        fn try_from(w: CartRef) -> Result<Self, Rejection> {
            Ok(super::CartRef {
                cart_id: field("cart_id", RecordId::parse("cart_id", &w.cart_id))?,
                member_id: field("member_id", MemberId::parse(&w.member_id))?,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 64 * 1024;

    fn event(kind: &str, data: &str) -> String {
        format!(
            r#"{{"specversion":"1.0","id":"e1","source":"shop","type":"{kind}","time":"2026-11-22T10:00:00Z","data":{data}}}"#
        )
    }

    fn rejected(body: &str) -> String {
        parse(body.as_bytes(), MAX).unwrap_err().0
    }

    #[test]
    fn parses_every_type() {
        let cases = [
            (
                "member.enrolled",
                r#"{"member_id":"m1","email":"a@b.co","phone":"+14155550123","first_name":"Ada","locale":"ko-KR","timezone":"Asia/Seoul","birthday":"02-29","consent":{"email":true,"sms":false}}"#,
            ),
            (
                "member.updated",
                r#"{"member_id":"m1","email":null,"consent":{"sms":true}}"#,
            ),
            (
                "order.placed",
                r#"{"order_id":"o1","member_id":"m1","total":12000,"currency":"KRW","items":[{"sku":"s","name":"Tea","quantity":2,"unit_price":6000}],"cart_id":"c1"}"#,
            ),
            (
                "order.refunded",
                r#"{"order_id":"o1","member_id":"m1","amount":500,"currency":"USD"}"#,
            ),
            (
                "points.adjusted",
                r#"{"member_id":"m1","points":-20,"reason":"manual"}"#,
            ),
            (
                "points.redeemed",
                r#"{"member_id":"m1","points":100,"reward":"$10 off"}"#,
            ),
            (
                "cart.updated",
                r#"{"cart_id":"c1","member_id":"m1","items":[],"total":0,"currency":"EUR","checkout_url":"https://shop.example/cart/c1"}"#,
            ),
            ("cart.checked_out", r#"{"cart_id":"c1","member_id":"m1"}"#),
            (
                "feedback.submitted",
                r#"{"member_id":"m1","score":9,"order_id":"o1","comment":"Fast delivery.\nThanks"}"#,
            ),
        ];
        for (kind, data) in cases {
            let parsed =
                parse(event(kind, data).as_bytes(), MAX).unwrap_or_else(|e| panic!("{kind}: {e}"));
            assert_eq!(parsed.kind.type_name(), kind);
            assert_eq!(parsed.kind.member_id().as_str(), "m1");
        }
    }

    #[test]
    fn feedback_is_a_score_from_0_to_10_with_an_optional_order_and_comment() {
        let answer = |data: &str| parse(event("feedback.submitted", data).as_bytes(), MAX);
        let EventKind::FeedbackSubmitted(f) =
            answer(r#"{"member_id":"m1","score":0}"#).unwrap().kind
        else {
            panic!()
        };
        assert_eq!((f.score, f.order_id, f.comment), (0, None, None));
        for (data, reason) in [
            (
                r#"{"member_id":"m1","score":11}"#,
                "data.score: 11 is not between 0 and 10",
            ),
            (
                r#"{"member_id":"m1","score":-1}"#,
                "data.score: -1 is not between 0 and 10",
            ),
            (r#"{"member_id":"m1","score":9.5}"#, "data.score"),
            (r#"{"member_id":"m1"}"#, "missing field `score`"),
            (
                r#"{"member_id":"m1","score":9,"comment":"a\u0007b"}"#,
                "data.comment: must not contain control characters",
            ),
        ] {
            let error = answer(data).unwrap_err().0;
            assert!(error.contains(reason), "{data}: {error}");
        }
        let long = format!(
            r#"{{"member_id":"m1","score":9,"comment":"{}"}}"#,
            "가".repeat(2001)
        );
        assert!(answer(&long).unwrap_err().0.contains("longer than 2000"));
    }

    #[test]
    fn updated_distinguishes_null_from_absent() {
        let e = parse(
            event("member.updated", r#"{"member_id":"m1","email":null}"#).as_bytes(),
            MAX,
        )
        .unwrap();
        let EventKind::MemberUpdated(changes) = e.kind else {
            panic!()
        };
        assert_eq!(changes.email, Some(None));
        assert_eq!(changes.phone, None);
    }

    #[test]
    fn rejections_say_what_is_wrong() {
        let enrolled = |data: &str| event("member.enrolled", data);
        let base = r#""member_id":"m1","locale":"en","timezone":"UTC","consent":{"email":true,"sms":true}"#;
        let cases: Vec<(String, &str)> = vec![
            ("not json".into(), "not JSON"),
            ("[1,2]".into(), "not a CloudEvent"),
            (
                r#"{"specversion":"1.0","source":"s","type":"member.enrolled","data":{}}"#.into(),
                "missing field `id`",
            ),
            (
                event("member.exploded", "{}"),
                "unknown event type \"member.exploded\"",
            ),
            (
                r#"{"specversion":"0.3","id":"x","source":"s","type":"t"}"#.into(),
                "specversion",
            ),
            (
                enrolled(&format!(r#"{{{base},"email":"nope"}}"#)),
                "data.email: email \"nope\" is not a valid address",
            ),
            (
                enrolled(&format!(r#"{{{base},"phone":"555-0100"}}"#)),
                "data.phone:",
            ),
            (
                enrolled(&format!(r#"{{{base},"first_name":"Eve\r\nBcc: x@y.z"}}"#)),
                "data.first_name: must not contain control",
            ),
            (
                enrolled(
                    r#"{"member_id":"m1","locale":"en","timezone":"Mars/Olympus","consent":{"email":true,"sms":true}}"#,
                ),
                "data.timezone",
            ),
            (
                enrolled(r#"{"member_id":"m1","locale":"en","timezone":"UTC"}"#),
                "data: missing field `consent`",
            ),
            (
                event(
                    "order.placed",
                    r#"{"order_id":"o","member_id":"m","total":"12","currency":"USD"}"#,
                ),
                "data.total: invalid type",
            ),
            (
                event(
                    "order.placed",
                    r#"{"order_id":"o","member_id":"m","total":1,"currency":"XYZ"}"#,
                ),
                "data.currency",
            ),
            (
                event(
                    "order.placed",
                    r#"{"order_id":"o","member_id":"m","total":1,"currency":"USD","items":[{"sku":"s","name":"n","quantity":0,"unit_price":1}]}"#,
                ),
                "data.items[0].quantity",
            ),
            (
                event(
                    "cart.updated",
                    r#"{"cart_id":"c","member_id":"m","total":1,"currency":"USD","checkout_url":"javascript:alert(1)"}"#,
                ),
                "data.checkout_url",
            ),
            (
                event("points.redeemed", r#"{"member_id":"m","points":0}"#),
                "data.points",
            ),
            // Amounts past what the ledger holds: refused, never summed into an overflow.
            (
                event(
                    "order.refunded",
                    r#"{"order_id":"o","member_id":"m","amount":9223372036854775807,"currency":"USD"}"#,
                ),
                "data.amount: amount is 9223372036854775807 minor units, more than the ledger holds",
            ),
            (
                event(
                    "order.placed",
                    r#"{"order_id":"o","member_id":"m","total":1000000000000001,"currency":"KRW"}"#,
                ),
                "more than the ledger holds (at most 1000000000000000)",
            ),
            (
                event(
                    "cart.updated",
                    r#"{"cart_id":"c","member_id":"m","total":1,"currency":"USD","checkout_url":"https://x.example/c","items":[{"sku":"s","name":"n","quantity":1,"unit_price":9223372036854775807}]}"#,
                ),
                "data.items[0].unit_price: more than the ledger holds",
            ),
            (event("order.placed", "42"), "data must be a JSON object"),
            // As sent, not as trimmed or cleaned: the published schemas say the same.
            (
                enrolled(&format!(r#"{{{base},"birthday":"+1-05"}}"#)),
                "data.birthday",
            ),
            (
                enrolled(&format!(
                    r#"{{{base},"first_name":"{}  "}}"#,
                    "a".repeat(99)
                )),
                "data.first_name: longer than 100",
            ),
            (
                event(
                    "cart.updated",
                    r#"{"cart_id":"c","member_id":"m","total":1,"currency":"USD","checkout_url":" https://x.example/c"}"#,
                ),
                "data.checkout_url",
            ),
            (
                event(
                    "points.adjusted",
                    r#"{"member_id":"m","points":-9223372036854775808,"reason":"manual"}"#,
                ),
                "data.points: must be non-zero and at most 100000000 either way",
            ),
            (
                enrolled(&format!(r#"{{{base},"birthday":"+990-07-14"}}"#)),
                "data.birthday",
            ),
            (
                r#"{"specversion":1,"id":"x","source":"s","type":"t"}"#.into(),
                "not a CloudEvent: specversion: invalid type",
            ),
        ];
        for (body, expected) in cases {
            let reason = rejected(&body);
            assert!(
                reason.contains(expected),
                "{body}\n  gave: {reason}\n  wanted: {expected}"
            );
        }
    }

    #[test]
    fn oversized_bodies_are_refused_before_parsing() {
        let body = vec![b' '; MAX + 1];
        assert!(parse(&body, MAX).unwrap_err().0.contains("over the limit"));
    }
}
