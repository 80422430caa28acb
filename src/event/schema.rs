//! JSON Schemas (draft 2020-12) of the events `parse` accepts, generated from the wire structs
//! it decodes into, so the published contract (`docs/events/`) cannot drift from the decoder.
//!
//! The field types below are markers: each states in JSON Schema the check the decoder makes on
//! that kind of field (identifiers, E.164 numbers, `MM-DD` birthdays, ISO 4217 codes, amounts,
//! display names). The schema refuses nothing the decoder accepts, even under a validator that
//! asserts `format`: addresses and links carry none, as lettre and the URL parser take
//! internationalized ones that such validators refuse. Where JSON Schema cannot say all of a
//! check (an address's syntax, a year's leap day, a URL's host), the decoder is the stricter.

use std::borrow::Cow;

use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde_json::{Value, json};

use super::{Envelope, KINDS};
use crate::domain::{Currency, Money};

/// Characters `char::is_control` refuses (Unicode Cc), as a regular expression class.
const CONTROL: &str = r"\u0000-\u001F\u007F-\u009F";

/// Declares a marker type whose schema is inlined wherever a wire field uses it.
macro_rules! marker {
    ($(#[$meta:meta])* $name:ident, $schema:expr) => {
        $(#[$meta])*
        pub(super) struct $name;

        impl JsonSchema for $name {
            fn inline_schema() -> bool {
                true
            }

            fn schema_name() -> Cow<'static, str> {
                stringify!($name).into()
            }

            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                Schema::try_from($schema).expect("a marker's schema is an object")
            }
        }
    };
}

marker!(
    /// `MemberId`, `RecordId` and `EventId`: 1 to 128 printable ASCII characters, no spaces.
    Identifier,
    json!({"type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[!-~]+$"})
);
marker!(
    /// `Email`: checked by lettre's RFC 5321 parser (which takes what `format: email`
    /// validators refuse, such as an internationalized domain), at most 254 bytes.
    EmailAddress,
    json!({"type": "string", "maxLength": 254, "pattern": "@"})
);
marker!(
    /// `Phone`: `+` and 8 to 15 digits, the first not 0.
    E164,
    json!({"type": "string", "pattern": r"^\+[1-9][0-9]{7,14}$", "examples": ["+821012345678"]})
);
marker!(
    /// A display name: at most 100 characters, no control characters.
    DisplayName,
    json!({"type": "string", "maxLength": 100, "pattern": format!("^[^{CONTROL}]*$")})
);
marker!(
    /// A comment: at most 2,000 characters, no control characters but line feeds.
    Comment,
    json!({
        "type": "string",
        "maxLength": 2000,
        "pattern": r"^[^\u0000-\u0009\u000B-\u001F\u007F-\u009F]*$"
    })
);
marker!(
    /// `Locale`: a BCP 47 tag, a 2–3 letter language, then subtags of 1–8 letters or digits.
    LanguageTag,
    json!({
        "type": "string",
        "pattern": "^[A-Za-z]{2,3}([-_][A-Za-z0-9]{1,8})*$",
        "examples": ["ko-KR", "tr", "en"]
    })
);
marker!(
    /// `TimeZone`: an IANA zone name, as the tz database the worker was built with knows them.
    IanaZone,
    json!({
        "type": "string",
        "enum": chrono_tz::TZ_VARIANTS.iter().map(|tz| tz.name()).collect::<Vec<_>>()
    })
);
marker!(
    /// `Birthday`: `MM-DD` (02-29 allowed) or `YYYY-MM-DD`.
    MonthDay,
    json!({
        "type": "string",
        "pattern": concat!(
            "^([0-9]{4}-)?",
            "((0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-9])|(0[13-9]|1[0-2])-30|(0[13578]|1[02])-31)$"
        ),
        "examples": ["02-29", "1990-07-14"]
    })
);
marker!(
    /// `Currency`: the ISO 4217 codes the worker knows the minor units of.
    CurrencyCode,
    json!({"type": "string", "enum": Currency::codes().collect::<Vec<_>>()})
);
marker!(
    /// `Money`: minor units, from 0 to what the ledger holds.
    MinorUnits,
    json!({"type": "integer", "minimum": 0, "maximum": Money::MAX_MINOR})
);
marker!(
    /// How many of an item: at least 1 (and a 32-bit count).
    Quantity,
    json!({"type": "integer", "minimum": 1, "maximum": u32::MAX})
);
marker!(
    /// A refund: minor units, more than 0.
    PositiveMinorUnits,
    json!({"type": "integer", "minimum": 1, "maximum": Money::MAX_MINOR})
);
marker!(
    /// A checkout link: `http` or `https`, no spaces or control characters, 2,048 characters at
    /// most (the decoder also wants a host).
    CheckoutUrl,
    json!({
        "type": "string",
        "maxLength": 2048,
        "pattern": r"^https?://[^\u0000-\u0020\u007F-\u009F]+$"
    })
);

marker!(
    /// A CloudEvents `time`: RFC 3339.
    Rfc3339,
    json!({"type": "string", "format": "date-time"})
);
marker!(
    /// A CloudEvents `datacontenttype` lifecycle reads.
    JsonMediaType,
    json!({"type": "string", "pattern": "^application/json"})
);

/// One schema per event type the decoder accepts, by type name, in DESIGN.md's order: the
/// CloudEvents envelope as `parse` checks it, with the type's `data`.
pub fn schemas() -> Vec<(&'static str, Value)> {
    KINDS
        .iter()
        .map(|kind| {
            let mut generator = SchemaSettings::draft2020_12().into_generator();
            let data = (kind.schema)(&mut generator);
            let mut schema = Value::from(generator.root_schema_for::<Envelope>());
            let envelope = schema.as_object_mut().expect("an object schema");
            envelope.insert("title".into(), kind.name.into());
            envelope.insert(
                "description".into(),
                format!(
                    "A `{}` event: CloudEvents 1.0 structured JSON, published to the \
                     `commerce.events` exchange with routing key `{}`. Fields not listed are \
                     ignored. The whole body is at most `ingest.max_event_bytes` (256 KiB by \
                     default).",
                    kind.name, kind.name
                )
                .into(),
            );
            envelope["properties"]["type"]["const"] = kind.name.into();
            envelope["properties"]["data"] = Value::from(data);
            envelope["required"]
                .as_array_mut()
                .expect("required fields")
                .push("data".into());
            envelope.insert("$defs".into(), generator.take_definitions(true).into());
            (kind.name, schema)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_has_a_schema_whose_data_is_an_object_with_required_fields() {
        let schemas = schemas();
        assert_eq!(schemas.len(), KINDS.len());
        for (name, schema) in schemas {
            let data = &schema["properties"]["data"]["$ref"];
            let definition = data
                .as_str()
                .and_then(|r| r.strip_prefix("#/$defs/"))
                .map(|d| &schema["$defs"][d])
                .unwrap_or_else(|| panic!("{name}: data is {data}"));
            assert_eq!(definition["type"], "object", "{name}");
            assert!(
                definition["required"]
                    .as_array()
                    .is_some_and(|r| r.contains(&json!("member_id"))),
                "{name}: {definition}"
            );
        }
    }
}
