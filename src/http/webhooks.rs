//! Providers' webhooks, each verified or refused (403, and 403 to everything on a route whose
//! key is not configured): Twilio's inbound SMS (STOP, START) and status callbacks, checked
//! against `X-Twilio-Signature`; SendGrid's signed event webhook (bounces, spam reports,
//! unsubscribes), checked against its ECDSA P-256 key.

use std::collections::BTreeMap;

use aws_lc_rs::hmac;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use tracing::{info, warn};

use crate::app::App;
use crate::domain::{Channel, Email, Phone};
use crate::notifications::{How, Sinks};
use crate::suppress::{self, Keyword};

/// Twilio's request signature: base64 HMAC-SHA1, under the auth token, of the URL followed by
/// each form parameter's name and value in name order.
pub fn twilio_signature(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort();
    let mut data = url.to_owned();
    for (name, value) in sorted {
        data.push_str(name);
        data.push_str(value);
    }
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, auth_token.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(hmac::sign(&key, data.as_bytes()).as_ref())
}

/// The form of a Twilio webhook, checked against `X-Twilio-Signature`. Without an auth token
/// nothing can be checked, so everything is refused (403). `Err` is the answer to give.
fn twilio_form(
    app: &App,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<BTreeMap<String, String>, (StatusCode, &'static str)> {
    let params: Vec<(String, String)> = url::form_urlencoded::parse(body).into_owned().collect();
    let Some(token) = &app.settings.twilio_auth_token else {
        warn!(
            path,
            "Twilio webhook refused: LIFECYCLE_TWILIO_AUTH_TOKEN is not set."
        );
        return Err((StatusCode::FORBIDDEN, "not configured\n"));
    };
    {
        let url = format!(
            "{}{path}",
            app.settings.public_url.as_str().trim_end_matches('/')
        );
        let expected = twilio_signature(token.expose(), &url, &params);
        let given = headers
            .get("x-twilio-signature")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let matches = aws_lc_rs::constant_time::verify_slices_are_equal(
            expected.as_bytes(),
            given.as_bytes(),
        )
        .is_ok();
        if !matches {
            warn!(path, "Twilio webhook with a bad signature refused.");
            return Err((StatusCode::FORBIDDEN, "bad signature\n"));
        }
    }
    Ok(params.into_iter().collect())
}

/// TwiML with no reply: Twilio itself answers STOP and START with its standard texts.
fn empty_twiml() -> Response {
    (
        [(header::CONTENT_TYPE, "text/xml")],
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response></Response>",
    )
        .into_response()
}

pub(super) async fn twilio_inbound(
    State(app): State<App>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form = match twilio_form(&app, "/webhooks/twilio/inbound", &headers, &body) {
        Ok(form) => form,
        Err(answer) => return answer.into_response(),
    };
    let (Some(from), Some(text)) = (form.get("From"), form.get("Body")) else {
        return (StatusCode::BAD_REQUEST, "From and Body are required\n").into_response();
    };
    let Ok(number) = Phone::parse(from) else {
        return (StatusCode::BAD_REQUEST, "From is not an E.164 number\n").into_response();
    };
    let sinks = Sinks::of(&app.settings);
    let change = |how| suppress::Change {
        channel: Channel::Sms,
        address: number.as_str(),
        how,
        member: None,
    };
    let result = match suppress::keyword(text) {
        Some(Keyword::Stop) => {
            info!(from = number.masked(), "SMS STOP: suppressed.");
            suppress::suppress(&app.pool, sinks, change(How::Stop), "STOP", "twilio")
                .await
                .map(|_| ())
        }
        Some(Keyword::Start) => {
            info!(from = number.masked(), "SMS START: suppression lifted.");
            suppress::restore(&app.pool, sinks, change(How::Start))
                .await
                .map(|_| ())
        }
        None => Ok(()),
    };
    match result {
        Ok(()) => empty_twiml(),
        Err(e) => {
            warn!(error = %e, "Recording an SMS keyword failed.");
            // Twilio retries on errors.
            StatusCode::SERVICE_UNAVAILABLE.into_response()
        }
    }
}

pub(super) async fn twilio_status(
    State(app): State<App>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form = match twilio_form(&app, "/webhooks/twilio/status", &headers, &body) {
        Ok(form) => form,
        Err(answer) => return answer.into_response(),
    };
    let (Some(sid), Some(status)) = (form.get("MessageSid"), form.get("MessageStatus")) else {
        return (
            StatusCode::BAD_REQUEST,
            "MessageSid and MessageStatus are required\n",
        )
            .into_response();
    };
    // A Twilio SID is 34 letters and digits (`SM…`); a control character or a space matches
    // no message (and a NUL would make PostgreSQL refuse the query, and Twilio retry it).
    if sid.is_empty() || sid.len() > 64 || !sid.chars().all(|c| c.is_ascii_graphic()) {
        return (StatusCode::BAD_REQUEST, "MessageSid is not a Twilio SID\n").into_response();
    }
    let status: String = status
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(32)
        .collect();
    let updated = crate::outbox::set_provider_status(&app.pool, sid, &status).await;
    match updated {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => {
            warn!(error = %e, "Recording a Twilio status failed.");
            StatusCode::SERVICE_UNAVAILABLE.into_response()
        }
    }
}

/// SendGrid's signed event webhook: an ECDSA P-256 signature (base64 of DER) of the
/// timestamp header followed by the raw body, under the key SendGrid shows (base64 of the
/// public key's DER SubjectPublicKeyInfo, or of the bare point). Timestamps more than 15
/// minutes from now are refused, so a captured request cannot be replayed later.
pub(crate) fn sendgrid_verify(
    key_base64: &str,
    timestamp: &str,
    signature_base64: &str,
    body: &[u8],
    now_unix: i64,
) -> Result<(), &'static str> {
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1, UnparsedPublicKey};
    /// The DER prefix of a P-256 SubjectPublicKeyInfo, before the 65-byte point.
    const P256_SPKI_PREFIX: [u8; 26] = [
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08,
        0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
    ];
    let b64 = &base64::engine::general_purpose::STANDARD;
    let key = b64
        .decode(key_base64.trim())
        .map_err(|_| "the configured key is not base64")?;
    let point = key.strip_prefix(&P256_SPKI_PREFIX[..]).unwrap_or(&key);
    let at: i64 = timestamp.trim().parse().map_err(|_| "bad timestamp")?;
    if now_unix.abs_diff(at) > 15 * 60 {
        return Err("timestamp too far from now");
    }
    let signature = b64
        .decode(signature_base64.trim())
        .map_err(|_| "bad signature")?;
    let signed = [timestamp.as_bytes(), body].concat();
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, point)
        .verify(&signed, &signature)
        .map_err(|_| "bad signature")
}

/// SendGrid's event webhook: a JSON array of events, verified first (403 without a
/// configured key or with a bad signature). Hard bounces, spam reports and unsubscribes
/// suppress the address; other events are ignored.
pub(super) async fn sendgrid_events(
    State(app): State<App>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(key) = &app.settings.sendgrid_webhook_key else {
        warn!("SendGrid webhook refused: LIFECYCLE_SENDGRID_WEBHOOK_KEY is not set.");
        return (StatusCode::FORBIDDEN, "not configured\n").into_response();
    };
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    if let Err(why) = sendgrid_verify(
        key.expose(),
        header("x-twilio-email-event-webhook-timestamp"),
        header("x-twilio-email-event-webhook-signature"),
        &body,
        now,
    ) {
        warn!(why, "SendGrid webhook refused.");
        return (StatusCode::FORBIDDEN, format!("{why}\n")).into_response();
    }
    let Ok(events) = serde_json::from_slice::<Vec<serde_json::Value>>(&body) else {
        return (StatusCode::BAD_REQUEST, "expected a JSON array of events\n").into_response();
    };
    for event in &events {
        let (Some(address), Some(kind)) = (event["email"].as_str(), event["event"].as_str()) else {
            continue;
        };
        let (reason, how) = match kind {
            "bounce" if hard_bounce(event) => ("bounced", How::HardBounce),
            "spamreport" => ("complained (spam report)", How::Complaint),
            "unsubscribe" | "group_unsubscribe" => ("unsubscribed", How::OneClick),
            _ => continue,
        };
        let Ok(email) = Email::parse(address) else {
            continue;
        };
        let change = suppress::Change {
            channel: Channel::Email,
            address: email.as_str(),
            how,
            member: None,
        };
        if let Err(e) = suppress::suppress(
            &app.pool,
            Sinks::of(&app.settings),
            change,
            reason,
            "sendgrid",
        )
        .await
        {
            warn!(error = %e, "Recording a SendGrid event failed.");
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        }
        info!(
            to = email.masked(),
            reason, "Suppressed by a SendGrid event."
        );
    }
    StatusCode::NO_CONTENT.into_response()
}

/// Whether a SendGrid `bounce` event is a hard bounce, the only kind that suppresses: not
/// `"type": "blocked"` (a temporary refusal, often the receiver's policy), and, when SendGrid
/// gives the receiver's enhanced status, a mailbox-level one (5.1.x, 5.2.1); without a status,
/// or with the generic 5.0.0, a `bounce_classification` that names the address ("Invalid
/// Address", "Mailbox Unavailable"), or, with neither, SendGrid's own word that it bounced.
fn hard_bounce(event: &serde_json::Value) -> bool {
    if event["type"].as_str() == Some("blocked") {
        return false;
    }
    let status = event["status"]
        .as_str()
        .and_then(crate::dispatch::providers::enhanced_status);
    match status {
        // Temporary, whatever else it says.
        Some((class, ..)) if class != 5 => return false,
        // 5.0.0 says nothing of what failed (SendGrid often gives it): the classification
        // decides.
        Some((_, 0, 0)) | None => {}
        Some(specific) => return crate::dispatch::providers::mailbox_gone(specific),
    }
    match event["bounce_classification"].as_str() {
        Some(class) => matches!(class, "Invalid Address" | "Mailbox Unavailable"),
        None => true,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_hard_bounces_suppress() {
        use serde_json::json;
        let table = [
            (json!({"type": "bounce", "status": "5.1.1"}), true),
            (json!({"type": "bounce", "status": "5.2.1"}), true),
            (
                json!({"type": "bounce", "status": "5.7.1", "reason": "relay denied"}),
                false,
            ),
            (json!({"type": "bounce", "status": "4.2.2"}), false),
            (json!({"type": "blocked", "status": "5.1.1"}), false),
            (
                json!({"type": "bounce", "bounce_classification": "Invalid Address"}),
                true,
            ),
            (
                json!({"type": "bounce", "bounce_classification": "Reputation"}),
                false,
            ),
            (json!({"type": "bounce"}), true),
            (
                json!({"type": "bounce", "status": "5.0.0", "bounce_classification": "Technical"}),
                false,
            ),
            (
                json!({"type": "bounce", "status": "5.0.0", "bounce_classification": "Invalid Address"}),
                true,
            ),
            (
                json!({"type": "bounce", "status": "4.0.0", "bounce_classification": "Invalid Address"}),
                false,
            ),
        ];
        for (event, hard) in table {
            assert_eq!(super::hard_bounce(&event), hard, "{event}");
        }
    }

    use super::*;

    #[test]
    fn sendgrid_signatures_verify_only_as_signed() {
        use aws_lc_rs::rand::SystemRandom;
        use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
        let b64 = &base64::engine::general_purpose::STANDARD;
        let rng = SystemRandom::new();
        let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).unwrap();
        let spki = [
            &[
                0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06,
                0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
            ][..],
            pair.public_key().as_ref(),
        ]
        .concat();
        let key = b64.encode(&spki);
        let body = br#"[{"email":"a@example.com","event":"bounce"}]"#;
        let sign = |ts: &str, body: &[u8]| {
            b64.encode(
                pair.sign(&rng, &[ts.as_bytes(), body].concat())
                    .unwrap()
                    .as_ref(),
            )
        };
        let now = 1_795_000_000;
        let ts = now.to_string();
        assert_eq!(
            sendgrid_verify(&key, &ts, &sign(&ts, body), body, now),
            Ok(())
        );
        // The bare point works as a key too.
        let bare = b64.encode(pair.public_key().as_ref());
        assert_eq!(
            sendgrid_verify(&bare, &ts, &sign(&ts, body), body, now),
            Ok(())
        );
        let tampered = br#"[{"email":"b@example.com","event":"bounce"}]"#;
        assert!(sendgrid_verify(&key, &ts, &sign(&ts, body), tampered, now).is_err());
        let other_ts = (now + 1).to_string();
        assert!(sendgrid_verify(&key, &other_ts, &sign(&ts, body), body, now).is_err());
        let old = (now - 3600).to_string();
        assert!(sendgrid_verify(&key, &old, &sign(&old, body), body, now).is_err());
        let other = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).unwrap();
        let forged = b64.encode(
            other
                .sign(&rng, &[ts.as_bytes(), body].concat())
                .unwrap()
                .as_ref(),
        );
        assert!(sendgrid_verify(&key, &ts, &forged, body, now).is_err());
        assert!(sendgrid_verify(&key, &ts, "", body, now).is_err());
        assert!(sendgrid_verify("not base64!", &ts, &sign(&ts, body), body, now).is_err());
    }

    #[test]
    fn twilio_signature_matches_twilios_documented_example() {
        // The example of Twilio's "Webhooks security" documentation.
        let params: Vec<(String, String)> = [
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+14158675310"),
            ("Digits", "1234"),
            ("From", "+14158675310"),
            ("To", "+18005551212"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(
            twilio_signature(
                "12345",
                "https://mycompany.com/myapp.php?foo=1&bar=2",
                &params
            ),
            "GvWf1cFY/Q7PnoempGyD5oXAezc="
        );
    }
}
