//! What each fuzz target does with its input, shared by the cargo-fuzz targets
//! (`fuzz/fuzz_targets/`) and the short proptest that runs in CI (`tests/fuzz.rs`). Each
//! function must return without panicking whatever the bytes; the assertions in it are the
//! properties that must hold besides.

#![allow(dead_code)]

use std::time::{Duration, SystemTime};

use lifecycle::testkit::domain::Trigger;
use lifecycle::testkit::render::Templates;

/// The event decoder, and masking of whatever text it refuses.
pub fn event(data: &[u8]) {
    match lifecycle::testkit::event::parse(data, 1 << 20) {
        Ok(event) => {
            assert!(!event.id.as_str().is_empty());
        }
        Err(rejection) => {
            assert!(!rejection.0.is_empty(), "a refusal says why");
            assert_no_address(&lifecycle::testkit::mask::text(&rejection.0));
        }
    }
}

/// No word of masked text is a whole email address (each is `x***@domain`).
fn assert_no_address(masked: &str) {
    let words = masked.split(|c: char| c.is_whitespace() || "\"'<>(),;:[]{}`".contains(c));
    for word in words.filter(|w| w.contains('@') && !w.contains("***@")) {
        assert!(
            lifecycle::testkit::domain::Email::parse(word).is_err(),
            "an address survived masking: {word:?} in {masked:?}"
        );
    }
}

/// Splits input into `n` parts at 0xFF bytes (missing parts are empty), as UTF-8.
fn parts(data: &[u8], n: usize) -> Vec<String> {
    let mut out: Vec<String> = data
        .splitn(n, |b| *b == 0xFF)
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    out.resize(n, String::new());
    out
}

/// Template compilation and rendering with a hostile welcome (MJML, subject, SMS), a hostile
/// shared partial, and a hostile context; then the same welcome as a marketer's version over
/// the shipped templates.
pub fn templates(data: &[u8]) {
    let [mjml, subject, sms, partial, context] = <[String; 5]>::try_from(parts(data, 5)).unwrap();
    let mut sources = vec![("partials/p.hbs".to_owned(), partial)];
    for trigger in Trigger::ALL {
        let dir = format!("{}/en", trigger.as_str());
        if trigger == Trigger::Welcome {
            sources.push((format!("{dir}/email.mjml.hbs"), mjml.clone()));
            sources.push((format!("{dir}/email.subject.hbs"), subject.clone()));
            sources.push((format!("{dir}/sms.hbs"), sms.clone()));
        } else {
            sources.push((format!("{dir}/email.html.hbs"), "<p>x</p>".into()));
            sources.push((format!("{dir}/email.subject.hbs"), "x".into()));
            sources.push((format!("{dir}/sms.hbs"), "x".into()));
        }
    }
    let context: serde_json::Value = serde_json::from_str(&context)
        .unwrap_or_else(|_| lifecycle::testkit::render::sample_context(Trigger::Welcome));
    if let Ok(templates) = Templates::from_sources(sources) {
        if let Ok(email) = templates.render_email(Trigger::Welcome, "en", &context) {
            assert!(
                !email.subject.contains('\n') && !email.subject.contains('\r'),
                "a subject is one line"
            );
        }
        let _ = templates.render_sms(Trigger::Welcome, "en", &context);
    }
    // The same files as a marketer's version over the shipped templates (the path of a save,
    // a preview and a publish: the pair's own checks, and the sample context's render).
    let shipped = SHIPPED.get_or_init(|| Templates::shipped().expect("the shipped templates"));
    let files = [
        ("email.mjml.hbs", mjml),
        ("email.subject.hbs", subject),
        ("sms.hbs", sms),
    ]
    .into_iter()
    .map(|(file, source)| (file.to_owned(), source))
    .collect();
    if let Ok(version) = shipped.overlay(Trigger::Welcome, "en", &files) {
        let _ = version.render_email(Trigger::Welcome, "en", &context);
        let _ = version.render_sms(Trigger::Welcome, "en", &context);
    }
}

/// The shipped templates, compiled once per process.
static SHIPPED: std::sync::OnceLock<Templates> = std::sync::OnceLock::new();

/// The parsers of addresses, numbers, locales and ids, and masking.
pub fn addresses(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(email) = lifecycle::testkit::domain::Email::parse(&text) {
        assert!(email.masked().contains("***@"));
    }
    if let Ok(phone) = lifecycle::testkit::domain::Phone::parse(&text) {
        assert!(phone.masked().contains('*'));
    }
    let _ = lifecycle::testkit::domain::Locale::parse(&text);
    let _ = lifecycle::testkit::domain::MemberId::parse(&text);
    let masked = lifecycle::testkit::mask::text(&text);
    assert_no_address(&masked);
    let mut run = 0;
    for c in masked.chars() {
        run = if c.is_ascii_digit() { run + 1 } else { 0 };
        assert!(run < 7, "a long digit run survived masking: {masked:?}");
    }
}

/// `Retry-After` parsing and the date arithmetic that follows it.
pub fn retry_after(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000);
    let Some(asked) = lifecycle::testkit::dispatch::providers::parse_retry_after(&text, now) else {
        return;
    };
    let failure = lifecycle::testkit::dispatch::Failure::transient(Some(asked), "429");
    let capped = failure.retry_after().unwrap();
    assert!(capped <= lifecycle::testkit::dispatch::providers::MAX_RETRY_AFTER);
    let start: chrono::DateTime<chrono::Utc> = "2026-11-22T10:00:00Z".parse().unwrap();
    let at = lifecycle::testkit::dispatch::later(start, asked);
    assert!(at >= start && at <= start + chrono::Duration::days(1));
    let _ = lifecycle::testkit::dispatch::later(chrono::DateTime::<chrono::Utc>::MAX_UTC, asked);
}
