//! The HTTP server: health, metrics, unsubscribe pages and the providers' webhooks.
//!
//! The server cannot be held: a connection must send its headers within 10 s, a request is
//! answered (or refused with 408) within 30 s, bodies over 1 MiB get 413, at most 256 requests
//! are handled at once and at most 1,024 connections are open.
//!
//! `/healthz` (the process is up), `/readyz` (each role alive, PostgreSQL answers, JSON),
//! `/metrics` (Prometheus
//! text), `GET /unsubscribe/{token}` (a page in the member's language with a button) and
//! `POST /unsubscribe/{token}` (RFC 8058 one-click: unsubscribes at once), `POST
//! /webhooks/twilio/inbound` (STOP and START), `POST /webhooks/twilio/status` (delivery
//! status), `POST /webhooks/sendgrid/events` (bounces, spam reports, unsubscribes).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

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

/// How long a connection may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request may take, body and answer included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest request body accepted.
pub const MAX_BODY: usize = 1024 * 1024;
/// Requests handled at once; more wait (and time out).
const MAX_IN_FLIGHT: usize = 256;
/// Connections open at once; more are closed as they come.
const MAX_CONNECTIONS: usize = 1024;

/// The routes, over the shared handles, behind the time, size and concurrency limits.
pub fn router(app: App) -> Router {
    routes(app)
        .layer(tower::limit::ConcurrencyLimitLayer::new(MAX_IN_FLIGHT))
        .layer(tower_http::limit::RequestBodyLimitLayer::new(MAX_BODY))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
}

fn routes(app: App) -> Router {
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

/// Serves on a bound listener until shutdown, then lets requests in hand finish (10 s at
/// most).
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    app: App,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    info!(addr = %listener.local_addr()?, "HTTP server listening.");
    let service = hyper_util::service::TowerToHyperService::new(router(app));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.triggered() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors, or a connection reset before it was accepted: the
                // server goes on.
                warn!(%error, "Accepting a connection failed.");
                shutdown.sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            continue;
        };
        stream.set_nodelay(true).ok();
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT);
        let connection =
            graceful.watch(builder.serve_connection(TokioIo::new(stream), service.clone()));
        tokio::spawn(async move {
            connection.await.ok();
            drop(permit);
        });
    }
    tokio::time::timeout(Duration::from_secs(10), graceful.shutdown())
        .await
        .ok();
    Ok(())
}

/// Each role's state and the database's, as JSON; 503 unless every role this process runs is
/// alive and PostgreSQL answers.
async fn ready(State(app): State<App>) -> Response {
    let h = &app.health;
    let roles = h.roles.get().copied();
    let mut ready = true;
    let mut report = serde_json::Map::new();
    let mut check = |name: &str, runs: bool, alive: bool, state: serde_json::Value| {
        if runs {
            ready &= alive;
            report.insert(name.into(), state);
        }
    };
    let consumers = h.ingest_consumers.load(Ordering::Relaxed);
    check(
        "ingest",
        roles.is_some_and(|r| r.ingest),
        consumers > 0,
        serde_json::json!({"consumers": consumers, "alive": consumers > 0}),
    );
    let loops = h.dispatch_loops.load(Ordering::Relaxed);
    check(
        "dispatch",
        roles.is_some_and(|r| r.dispatch),
        loops > 0,
        serde_json::json!({"loops": loops, "alive": loops > 0}),
    );
    let scheduler = h.scheduler.load(Ordering::Relaxed);
    check(
        "scheduler",
        roles.is_some_and(|r| r.schedule),
        scheduler,
        serde_json::json!({"alive": scheduler}),
    );
    let database = sqlx::query("select 1").execute(&app.pool).await;
    check(
        "database",
        true,
        database.is_ok(),
        match &database {
            Ok(_) => serde_json::json!({"alive": true}),
            Err(e) => serde_json::json!({
                "alive": false,
                "error": e.to_string().lines().next().unwrap_or_default(),
            }),
        },
    );
    report.insert("ready".into(), ready.into());
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(serde_json::Value::Object(report))).into_response()
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

/// Whom an unsubscribe link is for: the member, the address to unsubscribe (the one the
/// link's message went to, else the member's current one) and the page's locale.
struct Recipient {
    member: String,
    email: Option<String>,
    locale: String,
}

/// Looks a token up. `Ok(None)`: not genuine, or a member no longer known. `Err`: the
/// database could not say (the caller answers 503, so the person can try again).
async fn recipient_of(app: &App, token: &str) -> Result<Option<Recipient>, sqlx::Error> {
    let Some(named) = app.tokens.verify(token) else {
        return Ok(None);
    };
    let row: Option<(String, Option<String>, String)> = sqlx::query_as(
        "select mem.member_id, coalesce(msg.recipient, mem.email), mem.locale
         from members mem
         left join messages msg
                on msg.id = $2 and msg.member_id = mem.member_id and msg.channel = 'email'
         where mem.member_id = $1",
    )
    .bind(named.member.as_str())
    .bind(named.message_id)
    .fetch_optional(&app.pool)
    .await?;
    Ok(row.map(|(member, email, locale)| Recipient {
        member,
        email,
        locale,
    }))
}

/// The answer to a token that is not genuine (or of a member no longer known).
fn invalid_link(shop: &str) -> Response {
    let w = words("en");
    let body = format!("<p>{}</p>", escape(w.invalid));
    (StatusCode::NOT_FOUND, page(&w, shop, &body)).into_response()
}

/// The answer when the database is unavailable: nothing was done; try again.
fn try_again(shop: &str, error: &sqlx::Error) -> Response {
    warn!(%error, "Unsubscribe: the database is unavailable.");
    let w = words("en");
    let body = "<p>We could not handle this just now. Nothing was changed; please try again in a few minutes.</p>";
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, "60")],
        page(&w, shop, body),
    )
        .into_response()
}

async fn unsubscribe_page(State(app): State<App>, Path(token): Path<String>) -> Response {
    let shop = &app.settings.shop_name;
    let recipient = match recipient_of(&app, &token).await {
        Ok(Some(recipient)) => recipient,
        Ok(None) => return invalid_link(shop),
        Err(error) => return try_again(shop, &error),
    };
    let w = words(&recipient.locale);
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
    let recipient = match recipient_of(&app, &token).await {
        Ok(Some(recipient)) => recipient,
        Ok(None) => return invalid_link(shop),
        Err(error) => return try_again(shop, &error),
    };
    if let Some(email) = &recipient.email {
        if let Err(error) = suppress::suppress(
            &app.pool,
            Channel::Email,
            email,
            "unsubscribed",
            "unsubscribe",
        )
        .await
        {
            return try_again(shop, &error);
        }
        let masked = Email::parse(email).map(|e| e.masked()).unwrap_or_default();
        info!(member = recipient.member, to = masked, "Unsubscribed.");
    }
    let w = words(&recipient.locale);
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

/// SendGrid's signed event webhook: an ECDSA P-256 signature (base64 of DER) of the
/// timestamp header followed by the raw body, under the key SendGrid shows (base64 of the
/// public key's DER SubjectPublicKeyInfo, or of the bare point). Timestamps more than 15
/// minutes from now are refused, so a captured request cannot be replayed later.
pub fn sendgrid_verify(
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
async fn sendgrid_events(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
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
