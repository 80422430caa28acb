//! What the HTTP providers share: a client with timeouts, the classification of failures, and
//! `Retry-After`.
//!
//! 2xx is accepted. 429, 500 and a 503 that says when to come back (`Retry-After`) are
//! transient: the provider answered that it did not take the message. 502 and 504 come from a
//! proxy or gateway in front of the provider, which may have forwarded the request and lost
//! the answer; a 503 without `Retry-After` may be such a gateway too; and a timeout or a
//! connection lost after the request went out tells nothing. Those are *unsure*: the provider
//! may have the message, so it waits for a retry of the same provider rather than risk a
//! second copy through another. A connection that could not be made failed before the
//! provider saw anything, so the next provider may take it. Other statuses are permanent.
//!
//! A provider's answer is read up to `MAX_BODY` bytes: what it says is kept (cleaned) in the
//! message's error or reference, never more.

use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::{RequestBuilder, StatusCode};

use super::Failure;
use crate::config::Settings;

/// The most of an answer's body read: ids and error texts are short, and no provider answer
/// may fill the memory.
const MAX_BODY: usize = 64 * 1024;

/// The client every HTTP provider uses: the send timeout on every call, a connect timeout, and
/// an idle connection kept for every send that may be in flight (each loop's `concurrency`), so
/// that a busy dispatcher reuses its connections instead of opening (and, over TLS, handshaking)
/// new ones.
pub(super) fn client(settings: &Settings) -> anyhow::Result<reqwest::Client> {
    let d = &settings.dispatch;
    Ok(client_builder()
        .timeout(d.send_timeout())
        .connect_timeout(Duration::from_secs(5).min(d.send_timeout()))
        .pool_max_idle_per_host(d.concurrency.saturating_mul(d.pipelines.max(1)))
        .tcp_nodelay(true)
        .user_agent(concat!("lifecycle/", env!("CARGO_PKG_VERSION")))
        .build()?)
}

/// A client builder that trusts the Mozilla roots compiled in (webpki-root-certs) besides the
/// system's, as lapin, lettre and sqlx do: the container image carries no CA bundle, and
/// without a root reqwest cannot build a client at all.
pub(crate) fn client_builder() -> reqwest::ClientBuilder {
    let roots = webpki_root_certs::TLS_SERVER_ROOT_CERTS
        .iter()
        .filter_map(|der| reqwest::Certificate::from_der(der).ok());
    reqwest::Client::builder().tls_certs_merge(roots)
}

/// A provider's answer.
pub(super) struct Response {
    /// Headers (a message id may be there).
    pub headers: HeaderMap,
    /// The body as text: at most `MAX_BODY` bytes of it, invalid UTF-8 replaced.
    pub body: String,
}

/// Sends the request; a 2xx answer is `Ok`, anything else a classified failure.
pub(super) async fn send(provider: &str, request: RequestBuilder) -> Result<Response, Failure> {
    let mut response = request
        .send()
        .await
        .map_err(|e| request_failure(provider, &e))?;
    let status = response.status();
    let headers = response.headers().clone();
    let mut body = Vec::new();
    // The answer is in; a body cut short changes nothing of the verdict.
    while body.len() < MAX_BODY {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                body.extend_from_slice(&chunk[..chunk.len().min(MAX_BODY - body.len())])
            }
            Ok(None) | Err(_) => break,
        }
    }
    let body = String::from_utf8_lossy(&body).into_owned();
    if status.is_success() {
        return Ok(Response { headers, body });
    }
    Err(classify(
        provider,
        status,
        &headers,
        &body,
        SystemTime::now(),
    ))
}

/// A failure from the status and headers of a non-2xx answer.
pub(super) fn classify(
    provider: &str,
    status: StatusCode,
    headers: &HeaderMap,
    body: &str,
    now: SystemTime,
) -> Failure {
    let text = crate::mask::clean(body, crate::mask::PARTNER_TEXT);
    let message = if text.is_empty() {
        format!("{provider}: HTTP {status}")
    } else {
        format!("{provider}: HTTP {status}: {text}")
    };
    let asked = retry_after(headers, now);
    match status {
        StatusCode::BAD_GATEWAY | StatusCode::GATEWAY_TIMEOUT => Failure::unsure(format!(
            "{message} (a gateway's answer: the provider may have the message)"
        )),
        StatusCode::SERVICE_UNAVAILABLE if asked.is_none() => Failure::unsure(format!(
            "{message} (no Retry-After: the provider may have the message)"
        )),
        StatusCode::TOO_MANY_REQUESTS => Failure::transient(asked, message),
        _ if status.is_server_error() => Failure::transient(asked, message),
        _ => Failure::permanent(message),
    }
}

/// A failure of the exchange itself (no answer).
fn request_failure(provider: &str, error: &reqwest::Error) -> Failure {
    // reqwest's message names the URL, never headers, so no key reaches the error.
    let message = format!("{provider}: {}", error_chain(error));
    if error.is_connect() || error.is_builder() {
        Failure::transient(None, message)
    } else {
        // A timeout or a connection lost after the request went out.
        Failure::unsure(message)
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// `Retry-After` as seconds or as an HTTP date, relative to `now`; a date in the past is zero.
pub(super) fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    parse_retry_after(headers.get(RETRY_AFTER)?.to_str().ok()?, now)
}

/// A `Retry-After` value: seconds, or an HTTP date relative to `now` (a date in the past is
/// zero). Anything else is `None`. The result is not bounded here: `Failure::transient` caps
/// it at a day.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(retry: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_str(retry).unwrap());
        h
    }

    #[test]
    fn retry_after_is_seconds_or_a_date() {
        let now = httpdate::parse_http_date("Sun, 22 Nov 2026 10:00:00 GMT").unwrap();
        assert_eq!(
            retry_after(&headers("7"), now),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            retry_after(&headers("Sun, 22 Nov 2026 10:01:30 GMT"), now),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            retry_after(&headers("Sun, 22 Nov 2026 09:00:00 GMT"), now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after(&headers("soon"), now), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }

    #[test]
    fn statuses_are_classified() {
        let now = SystemTime::now();
        let none = HeaderMap::new();
        // (status, Retry-After, the outcome recorded)
        let table = [
            (429, None, "transient"),
            (500, None, "transient"),
            (503, Some("5"), "transient"),
            // A gateway's answer, or an unavailable that does not say when to come back:
            // the request may have reached the provider.
            (502, None, "unsure"),
            (504, None, "unsure"),
            (503, None, "unsure"),
            (502, Some("5"), "unsure"),
            (400, None, "permanent"),
            (401, None, "permanent"),
            (403, None, "permanent"),
            (404, None, "permanent"),
            (422, None, "permanent"),
        ];
        for (code, retry, outcome) in table {
            let h = retry.map_or_else(HeaderMap::new, headers);
            let f = classify("p", StatusCode::from_u16(code).unwrap(), &h, "", now);
            assert_eq!(f.outcome(), outcome, "{code} {retry:?}");
        }
        // Whatever the body holds, the stored text is one clean, bounded line.
        let f = classify(
            "p",
            StatusCode::BAD_REQUEST,
            &none,
            &format!("bad\u{0}id {}", "y".repeat(10_000)),
            now,
        );
        assert!(!f.to_string().contains('\u{0}'));
        assert!(
            f.to_string().chars().count() < 700,
            "{}",
            f.to_string().len()
        );
        let f = classify(
            "p",
            StatusCode::TOO_MANY_REQUESTS,
            &headers("3"),
            "slow\r\ndown",
            now,
        );
        assert_eq!(f.retry_after(), Some(Duration::from_secs(3)));
        assert_eq!(f.to_string(), "p: HTTP 429 Too Many Requests: slow down");
    }
}
