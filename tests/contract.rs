//! The event contract holds in the code: the committed JSON Schemas (`docs/events/`) are what
//! the decoder's types generate, `docs/asyncapi.yaml` refers to them for every type the decoder
//! accepts, its examples validate and decode, and the decoder and the schemas agree on variants
//! of those examples: what a schema refuses, the decoder refuses naming the field, and what the
//! decoder accepts, the schema accepts.
//!
//! After changing a wire type: `WRITE_EVENT_SCHEMAS=1 cargo nextest run --test contract`.

use std::cell::Cell;
use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use lifecycle::testkit::event::{parse, schemas};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Value, json};

/// The decoder's default body limit (`ingest.max_event_bytes`).
const MAX_BYTES: usize = 256 * 1024;

fn docs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs")
}

#[test]
fn committed_schemas_are_what_the_decoder_generates() {
    let dir = docs().join("events");
    let write = std::env::var_os("WRITE_EVENT_SCHEMAS").is_some();
    let mut generated = BTreeSet::new();
    let mut stale = Vec::new();
    for (name, schema) in schemas() {
        let file = format!("{name}.json");
        let text = serde_json::to_string_pretty(&schema).unwrap() + "\n";
        if write {
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join(&file), &text).unwrap();
        } else if fs::read_to_string(dir.join(&file)).ok().as_deref() != Some(text.as_str()) {
            stale.push(file.clone());
        }
        generated.insert(file);
    }
    assert!(
        stale.is_empty(),
        "docs/events/ differs from the decoder's types in {stale:?}; regenerate with \
         WRITE_EVENT_SCHEMAS=1 cargo nextest run --test contract"
    );
    let committed: BTreeSet<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".json"))
        .collect();
    assert_eq!(committed, generated, "docs/events/ holds other schemas");
}

/// A message of `docs/asyncapi.yaml` whose payload is an event schema.
struct Message {
    name: String,
    validator: jsonschema::Validator,
    examples: Vec<Value>,
}

/// The AsyncAPI document's event messages, their schemas loaded from the file each refers to.
fn messages() -> &'static [Message] {
    static MESSAGES: OnceLock<Vec<Message>> = OnceLock::new();
    MESSAGES.get_or_init(|| {
        let text = fs::read_to_string(docs().join("asyncapi.yaml")).unwrap();
        let document: Value = serde_norway::from_str(&text).expect("asyncapi.yaml is YAML");
        let messages = document["components"]["messages"].as_object().unwrap();
        messages
            .values()
            .filter_map(|message| {
                let file = message["payload"]["$ref"].as_str()?;
                let path = docs().join(file.trim_start_matches("./"));
                let schema: Value =
                    serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
                Some(Message {
                    name: message["name"].as_str().unwrap().to_owned(),
                    // With `format` asserted, as Ajv with ajv-formats does: the schema must
                    // refuse nothing the decoder accepts even then.
                    validator: jsonschema::options()
                        .should_validate_formats(true)
                        .build(&schema)
                        .unwrap_or_else(|e| panic!("{}: {e}", path.display())),
                    examples: message["examples"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|example| example["payload"].clone())
                        .collect(),
                })
            })
            .collect()
    })
}

fn refusals(message: &Message, instance: &Value) -> Vec<String> {
    message
        .validator
        .iter_errors(instance)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

fn decode(instance: &Value) -> Result<String, String> {
    parse(&serde_json::to_vec(instance).unwrap(), MAX_BYTES)
        .map(|event| event.kind.type_name().to_owned())
        .map_err(|rejection| rejection.0)
}

#[test]
fn asyncapi_describes_every_type_the_decoder_accepts_and_its_examples_hold() {
    let described: BTreeSet<&str> = messages().iter().map(|m| m.name.as_str()).collect();
    let accepted: BTreeSet<&str> = schemas().into_iter().map(|(name, _)| name).collect();
    assert_eq!(described, accepted);
    for message in messages() {
        assert!(
            !message.examples.is_empty(),
            "{} has no example",
            message.name
        );
        for example in &message.examples {
            let refused = refusals(message, example);
            assert!(refused.is_empty(), "{}: {refused:?}", message.name);
            assert_eq!(decode(example), Ok(message.name.clone()), "{example}");
        }
    }
}

/// Where a value sits in an example: object keys and array indexes from the root.
#[derive(Debug, Clone)]
enum Step {
    Key(String),
    Index(usize),
}

/// Every place in `value` below the root, parents before children.
fn places(value: &Value, prefix: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
    let children: Vec<(Step, &Value)> = match value {
        Value::Object(map) => map.iter().map(|(k, v)| (Step::Key(k.clone()), v)).collect(),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, v)| (Step::Index(i), v))
            .collect(),
        _ => Vec::new(),
    };
    for (step, child) in children {
        prefix.push(step);
        out.push(prefix.clone());
        places(child, prefix, out);
        prefix.pop();
    }
}

/// The field a place belongs to: its last object key.
fn field(place: &[Step]) -> &str {
    place
        .iter()
        .rev()
        .find_map(|step| match step {
            Step::Key(key) => Some(key.as_str()),
            Step::Index(_) => None,
        })
        .unwrap()
}

/// `example` with the value at `place` replaced, or removed when `with` is `None`.
fn variant(example: &Value, place: &[Step], with: Option<Value>) -> Value {
    let mut out = example.clone();
    let (last, parents) = place.split_last().unwrap();
    let mut parent = &mut out;
    for step in parents {
        parent = match step {
            Step::Key(key) => &mut parent[key.as_str()],
            Step::Index(i) => &mut parent[*i],
        };
    }
    match (last, with) {
        (Step::Key(key), Some(value)) => parent[key.as_str()] = value,
        (Step::Key(key), None) => {
            parent.as_object_mut().unwrap().remove(key);
        }
        (Step::Index(i), Some(value)) => parent[*i] = value,
        (Step::Index(i), None) => {
            parent.as_array_mut().unwrap().remove(*i);
        }
    }
    out
}

/// What one variant showed: the schema refused it (and so did the decoder, naming the field),
/// the decoder accepted it (and so did the schema), or the schema accepted what the decoder's
/// stricter checks refused.
#[derive(Debug, PartialEq)]
enum Outcome {
    Refused,
    Accepted,
    OnlyDecoderRefused,
}

/// The contract for one variant; panics with the variant when it is broken.
fn check(message: &Message, instance: &Value, place: &[Step]) -> Outcome {
    let refused = refusals(message, instance);
    match decode(instance) {
        Ok(kind) => {
            assert!(
                refused.is_empty(),
                "the decoder accepted what the {} schema refuses ({refused:?}):\n{instance}",
                message.name
            );
            assert_eq!(kind, message.name);
            Outcome::Accepted
        }
        Err(reason) if refused.is_empty() => {
            let _ = reason;
            Outcome::OnlyDecoderRefused
        }
        Err(reason) => {
            let name = field(place);
            assert!(
                reason.contains(name),
                "refused without naming `{name}`: {reason}\n(schema: {refused:?})\n{instance}"
            );
            Outcome::Refused
        }
    }
}

/// A value of another JSON type than `value`'s, which no field's schema allows there.
fn wrong_type(value: &Value) -> Value {
    match value {
        Value::String(_) => json!(12345),
        Value::Number(_) => json!("12"),
        Value::Bool(_) => json!("true"),
        Value::Object(_) | Value::Array(_) => json!(7),
        Value::Null => json!({}),
    }
}

/// Values past the ranges the contract states, for every kind of field.
fn out_of_range() -> Vec<Value> {
    vec![
        json!(-1),
        json!(0),
        json!(11),
        json!(100_000_001),
        json!(-100_000_001),
        json!(1_000_000_000_000_001_i64),
        json!(4_294_967_296_i64),
        json!(1.5),
        json!(""),
        json!(" "),
        json!("\u{7}"),
        json!("x".repeat(2049)),
        json!("XXX"),
        json!("13-01"),
        json!("javascript:alert(1)"),
    ]
}

/// Small edits of a value, where the two sides of the contract would disagree if they did:
/// for a string, a character of each kind put at its start, middle and end, each character
/// taken out, and the string cut or stretched to the lengths around every limit; for a number,
/// its neighbours, its opposite and the limits.
fn edits(original: &Value) -> Vec<Value> {
    match original {
        Value::String(s) => {
            let chars: Vec<char> = s.chars().collect();
            let mut out = Vec::new();
            for c in [
                '0', '9', '+', '-', '_', ' ', '\u{7}', '\n', 'a', 'Z', '가', '.', '/', ':', '@',
            ] {
                for at in [0, chars.len() / 2, chars.len()] {
                    let mut edited = chars.clone();
                    edited.insert(at, c);
                    out.push(edited.into_iter().collect::<String>());
                }
            }
            for at in 0..chars.len() {
                let mut edited = chars.clone();
                edited.remove(at);
                out.push(edited.into_iter().collect());
            }
            let last = chars.last().copied().unwrap_or('x');
            for len in [
                0, 1, 2, 3, 4, 5, 8, 9, 10, 15, 16, 17, 99, 100, 101, 127, 128, 129, 254, 255,
                1999, 2000, 2001, 2048, 2049,
            ] {
                let mut edited: Vec<char> = chars.iter().copied().take(len).collect();
                edited.resize(len, last);
                out.push(edited.into_iter().collect());
            }
            out.push(s.to_uppercase());
            out.push(s.to_lowercase());
            out.into_iter().map(Value::from).collect()
        }
        Value::Number(n) => {
            let n = n.as_i64().unwrap_or(0);
            [
                n - 1,
                n + 1,
                -n,
                0,
                1,
                10,
                11,
                100_000_000,
                100_000_001,
                -100_000_001,
            ]
            .into_iter()
            .map(Value::from)
            .chain([json!(n as f64 + 0.5), json!(1e20)])
            .collect()
        }
        _ => Vec::new(),
    }
}

/// The value at `place` in `example`.
fn at<'a>(example: &'a Value, place: &[Step]) -> &'a Value {
    place.iter().fold(example, |v, step| match step {
        Step::Key(k) => &v[k.as_str()],
        Step::Index(i) => &v[*i],
    })
}

#[test]
fn every_missing_field_wrong_type_and_out_of_range_value_the_schema_refuses_is_refused_naming_it() {
    let mut refused = 0;
    for message in messages() {
        for example in &message.examples {
            let mut all = Vec::new();
            places(example, &mut Vec::new(), &mut all);
            for place in &all {
                // A field missing: refused when the schema requires it; an optional one the
                // decoder must do without.
                let missing = variant(example, place, None);
                if check(message, &missing, place) == Outcome::Refused {
                    refused += 1;
                }
                // A wrong type: always refused.
                let original = at(example, place);
                let wrong = variant(example, place, Some(wrong_type(original)));
                assert_eq!(
                    check(message, &wrong, place),
                    Outcome::Refused,
                    "{}: {wrong}",
                    message.name
                );
                refused += 1;
                for value in out_of_range().into_iter().chain(edits(original)) {
                    let instance = variant(example, place, Some(value));
                    if check(message, &instance, place) == Outcome::Refused {
                        refused += 1;
                    }
                }
            }
        }
    }
    assert!(refused > 2000, "only {refused} variants were refused");
}

/// Arbitrary JSON values, weighted towards the edges of what the contract allows.
fn values() -> impl Strategy<Value = Value> {
    let integers = prop_oneof![
        any::<i64>(),
        -3_i64..=12,
        prop::sample::select(vec![
            100_000_000_i64,
            100_000_001,
            -100_000_000,
            -100_000_001,
            1_000_000_000_000_000,
            1_000_000_000_000_001,
            4_294_967_295,
            4_294_967_296,
        ]),
    ]
    .prop_map(Value::from);
    let strings = prop_oneof![
        "[ -~]{0,12}",
        "\\PC{0,12}",
        "[a \\x00\\x07\\t\\r\\n\\u{85}]{0,5}",
        "\\+[0-9]{6,17}",
        "[0-9+]{1,4}-[0-9+]{1,3}(-[0-9]{2})?",
        "[a-zA-Z]{1,4}([-_][A-Za-z0-9]{0,9}){0,2}",
        prop::sample::select(vec!["Asia/Seoul", "Europe/Istanbul", "asia/seoul", "UTC"])
            .prop_map(String::from),
        prop::sample::select(vec!["KRW", "TRY", "usd", "XYZ"]).prop_map(String::from),
        "(https?|HTTP|ftp)://[a-z.]{0,6}(/[ -~]{0,6})?",
        " ?(https?://[a-z]{1,4}\\.example/c)",
        "[a-z]{1,3}@[a-z]{1,3}\\.(co|kr)",
        "x{126,130}",
        "가{98,102}",
        "a{1999,2001}",
    ]
    .prop_map(Value::from);
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        integers,
        prop::sample::select(vec![0.5, 9.0, 1e20, -0.0]).prop_map(Value::from),
        strings,
        Just(json!({})),
        Just(json!([])),
    ]
}

#[test]
fn the_decoder_and_the_schemas_agree_on_arbitrary_variants_of_the_examples() {
    let cases = 3000;
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let (refused, accepted) = (Cell::new(0), Cell::new(0));
    let strategy = (
        prop::sample::select((0..messages().len()).collect::<Vec<_>>()),
        any::<prop::sample::Index>(),
        any::<prop::sample::Index>(),
        any::<bool>(),
        prop::option::weighted(0.9, values()),
    );
    runner
        .run(&strategy, |(m, place, edit, edited, with)| {
            let message = &messages()[m];
            let example = &message.examples[0];
            let mut all = Vec::new();
            places(example, &mut Vec::new(), &mut all);
            let place = place.get(&all);
            // Half the time an arbitrary value (or none), half an edit of what is there.
            let edits = edits(at(example, place));
            let with = match with {
                Some(_) if edited && !edits.is_empty() => Some(edit.get(&edits).clone()),
                with => with,
            };
            // The type names the schema; another valid type would be another contract.
            if field(place) == "type" && with.as_ref().and_then(Value::as_str).is_some() {
                return Ok(());
            }
            let instance = variant(example, place, with);
            match check(message, &instance, place) {
                Outcome::Refused => refused.set(refused.get() + 1),
                Outcome::Accepted => accepted.set(accepted.get() + 1),
                Outcome::OnlyDecoderRefused => {}
            }
            Ok(())
        })
        .unwrap();
    // Both sides of the contract were exercised, not just one.
    assert!(refused.get() > cases / 3, "{} refused", refused.get());
    assert!(accepted.get() > cases / 20, "{} accepted", accepted.get());
}
