//! The HTTP server: health, metrics, unsubscribe pages and the providers' webhooks.
//!
//! `/healthz` (the process is up), `/readyz` (PostgreSQL answers), `/metrics` (Prometheus
//! text), `GET /unsubscribe/{token}` (a page in the member's language with a button) and
//! `POST /unsubscribe/{token}` (RFC 8058 one-click: unsubscribes at once), `POST
//! /webhooks/twilio/inbound` (STOP and START), `POST /webhooks/twilio/status` (delivery
//! status), `POST /webhooks/sendgrid/events` (bounces, spam reports, unsubscribes).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::Context;
use aws_lc_rs::hmac;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use tracing::{info, warn};

use crate::app::App;
use crate::domain::{Channel, Email, Phone};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::suppress::{self, Keyword};

/// The routes, over the shared handles.
pub fn router(app: App) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .route(
            "/unsubscribe/{token}",
            get(unsubscribe_page).post(unsubscribe),
        )
        .route("/webhooks/twilio/inbound", post(twilio_inbound))
        .route("/webhooks/twilio/status", post(twilio_status))
        .route("/webhooks/sendgrid/events", post(sendgrid_events))
        .with_state(app)
}

/// Binds first, so that a taken port fails the start rather than a task later.
pub async fn bind(app: &App) -> anyhow::Result<tokio::net::TcpListener> {
    let addr = app.settings.http_addr;
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr} (LIFECYCLE_HTTP_ADDR)"))
}

/// Serves on a bound listener until shutdown.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    app: App,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    info!(addr = %listener.local_addr()?, "HTTP server listening.");
    axum::serve(listener, router(app))
        .with_graceful_shutdown(async move { shutdown.triggered().await })
        .await?;
    Ok(())
}

async fn ready(State(app): State<App>) -> Response {
    match sqlx::query("select 1").execute(&app.pool).await {
        Ok(_) => "ready\n".into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "database unavailable: {}\n",
                e.to_string().lines().next().unwrap_or_default()
            ),
        )
            .into_response(),
    }
}

async fn metrics(State(app): State<App>) -> Response {
    let m = &app.metrics;
    let counters = [
        (
            "events_applied",
            "Events that changed state.",
            &m.events_applied,
        ),
        (
            "events_duplicate",
            "Events whose id was applied before.",
            &m.events_duplicate,
        ),
        (
            "events_deferred",
            "Early events sent to the retry queue.",
            &m.events_deferred,
        ),
        (
            "events_dead_lettered",
            "Events refused to the dead-letter queue.",
            &m.events_dead_lettered,
        ),
        (
            "messages_sent",
            "Messages a provider accepted.",
            &m.messages_sent,
        ),
        (
            "messages_suppressed",
            "Messages not sent for consent or suppression.",
            &m.messages_suppressed,
        ),
        (
            "messages_failed",
            "Messages that ended failed.",
            &m.messages_failed,
        ),
        (
            "messages_retried",
            "Transient failures to be retried.",
            &m.messages_retried,
        ),
        (
            "scans_run",
            "Scheduled scans this process ran.",
            &m.scans_run,
        ),
    ];
    let mut text = String::new();
    for (name, help, counter) in counters {
        let _ = writeln!(text, "# HELP lifecycle_{name}_total {help}");
        let _ = writeln!(text, "# TYPE lifecycle_{name}_total counter");
        let _ = writeln!(text, "lifecycle_{name}_total {}", Metrics::get(counter));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// The words of the unsubscribe pages, per language.
struct Words {
    lang: &'static str,
    title: &'static str,
    ask: &'static str,
    button: &'static str,
    done: &'static str,
    invalid: &'static str,
}

fn words(locale: &str) -> Words {
    match locale.split('-').next().unwrap_or("en") {
        "ko" => Words {
            lang: "ko",
            title: "수신 거부",
            ask: "이 주소로 더 이상 이메일을 받지 않으시겠습니까?",
            button: "수신 거부",
            done: "수신 거부되었습니다. 더 이상 이메일을 보내지 않습니다.",
            invalid: "이 링크는 유효하지 않습니다.",
        },
        "tr" => Words {
            lang: "tr",
            title: "Abonelikten çık",
            ask: "Bu adrese artık e-posta almak istemiyor musunuz?",
            button: "Abonelikten çık",
            done: "Aboneliğiniz iptal edildi. Size artık e-posta göndermeyeceğiz.",
            invalid: "Bu bağlantı geçerli değil.",
        },
        _ => Words {
            lang: "en",
            title: "Unsubscribe",
            ask: "Stop receiving email at this address?",
            button: "Unsubscribe",
            done: "You are unsubscribed. We will not email you again.",
            invalid: "This link is not valid.",
        },
    }
}

/// A small page; every value in it is ours (no member text), but escaped all the same.
fn page(w: &Words, shop: &str, body: &str) -> Html<String> {
    Html(format!(
        "<!doctype html><html lang=\"{}\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title></head><body style=\"font-family:Helvetica,Arial,sans-serif;max-width:32rem;margin:3rem auto;padding:0 1rem;\">\
         <h1>{}</h1>{body}</body></html>",
        w.lang,
        escape(w.title),
        escape(shop),
    ))
}

fn escape(text: &str) -> String {
    handlebars::html_escape(text)
}

/// The member's email and locale, from a genuine token.
async fn member_of(app: &App, token: &str) -> Option<(String, Option<String>, String)> {
    let member = app.tokens.verify(token)?;
    sqlx::query_as("select member_id, email, locale from members where member_id = $1")
        .bind(member.as_str())
        .fetch_optional(&app.pool)
        .await
        .ok()
        .flatten()
}

/// The answer to a token that is not genuine (or of a member no longer known).
fn invalid_link(shop: &str) -> Response {
    let w = words("en");
    let body = format!("<p>{}</p>", escape(w.invalid));
    (StatusCode::NOT_FOUND, page(&w, shop, &body)).into_response()
}

async fn unsubscribe_page(State(app): State<App>, Path(token): Path<String>) -> Response {
    let shop = &app.settings.shop_name;
    let Some((_, _, locale)) = member_of(&app, &token).await else {
        return invalid_link(shop);
    };
    let w = words(&locale);
    // The form posts to this same URL: the page works without JavaScript, and a link scanner
    // that follows GETs unsubscribes no one.
    let body = format!(
        "<p>{}</p><form method=\"post\"><input type=\"hidden\" name=\"List-Unsubscribe\" value=\"One-Click\">\
         <button type=\"submit\" style=\"padding:.75rem 1.25rem;font-size:1rem;\">{}</button></form>",
        escape(w.ask),
        escape(w.button)
    );
    page(&w, shop, &body).into_response()
}

async fn unsubscribe(State(app): State<App>, Path(token): Path<String>) -> Response {
    let shop = &app.settings.shop_name;
    let Some((member, email, locale)) = member_of(&app, &token).await else {
        return invalid_link(shop);
    };
    if let Some(email) = email {
        if let Err(e) = suppress::suppress(
            &app.pool,
            Channel::Email,
            &email,
            "unsubscribed",
            "unsubscribe",
        )
        .await
        {
            warn!(error = %e, "Recording an unsubscribe failed.");
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        }
        let masked = Email::parse(&email).map(|e| e.masked()).unwrap_or_default();
        info!(member, to = masked, "Unsubscribed.");
    }
    let w = words(&locale);
    page(&w, shop, &format!("<p>{}</p>", escape(w.done))).into_response()
}

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

/// The form of a Twilio webhook, checked against `X-Twilio-Signature` when an auth token is
/// set. `Err` is the answer to give.
fn twilio_form(
    app: &App,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<BTreeMap<String, String>, (StatusCode, &'static str)> {
    let params: Vec<(String, String)> = url::form_urlencoded::parse(body).into_owned().collect();
    if let Some(token) = &app.settings.twilio_auth_token {
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

async fn twilio_inbound(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
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
    let result = match suppress::keyword(text) {
        Some(Keyword::Stop) => {
            info!(from = number.masked(), "SMS STOP: suppressed.");
            suppress::suppress(&app.pool, Channel::Sms, number.as_str(), "STOP", "twilio").await
        }
        Some(Keyword::Start) => {
            info!(from = number.masked(), "SMS START: suppression lifted.");
            suppress::restore(&app.pool, Channel::Sms, number.as_str())
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

async fn twilio_status(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
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
    let status: String = status
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(32)
        .collect();
    let updated = sqlx::query(
        "update messages set provider_status = $2 where provider = 'twilio' and provider_ref = $1",
    )
    .bind(sid)
    .bind(&status)
    .execute(&app.pool)
    .await;
    match updated {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => {
            warn!(error = %e, "Recording a Twilio status failed.");
            StatusCode::SERVICE_UNAVAILABLE.into_response()
        }
    }
}

/// SendGrid's event webhook: a JSON array of events. Hard bounces, spam reports and
/// unsubscribes suppress the address; other events are ignored.
async fn sendgrid_events(State(app): State<App>, body: Bytes) -> Response {
    let Ok(events) = serde_json::from_slice::<Vec<serde_json::Value>>(&body) else {
        return (StatusCode::BAD_REQUEST, "expected a JSON array of events\n").into_response();
    };
    for event in &events {
        let (Some(address), Some(kind)) = (event["email"].as_str(), event["event"].as_str()) else {
            continue;
        };
        let reason = match kind {
            // "blocked" is a temporary refusal; "bounce" a permanent one.
            "bounce" if event["type"].as_str() != Some("blocked") => "bounced",
            "spamreport" => "complained (spam report)",
            "unsubscribe" | "group_unsubscribe" => "unsubscribed",
            _ => continue,
        };
        let Ok(email) = Email::parse(address) else {
            continue;
        };
        if let Err(e) = suppress::suppress(
            &app.pool,
            Channel::Email,
            email.as_str(),
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

#[cfg(test)]
mod tests {
    use super::*;

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
