//! What the HTTP providers share: a client with timeouts, the classification of failures, and
//! `Retry-After`.
//!
//! 2xx is accepted. 429, 5xx and timeouts are transient; other statuses are permanent. A
//! connection that could not be made failed before the provider saw the message, so the next
//! provider may take it; a timeout after the request went out is *unsure* (the provider may
//! have taken it), so the message waits for a retry of the same provider rather than risk a
//! second copy through another.

use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::{RequestBuilder, StatusCode};

use super::Failure;
use crate::config::Settings;

/// Longest provider error text kept in a message's `last_error`.
const ERROR_TEXT: usize = 300;

/// The client every HTTP provider uses: the send timeout on every call, a connect timeout, and
/// an idle connection kept for every send that may be in flight (each loop's `concurrency`), so
/// that a busy dispatcher reuses its connections instead of opening (and, over TLS, handshaking)
/// new ones.
pub fn client(settings: &Settings) -> anyhow::Result<reqwest::Client> {
    let d = &settings.dispatch;
    Ok(reqwest::Client::builder()
        .timeout(d.send_timeout())
        .connect_timeout(Duration::from_secs(5).min(d.send_timeout()))
        .pool_max_idle_per_host(d.concurrency.saturating_mul(d.pipelines.max(1)))
        .tcp_nodelay(true)
        .user_agent(concat!("lifecycle/", env!("CARGO_PKG_VERSION")))
        .build()?)
}

/// A provider's answer.
pub struct Response {
    /// Headers (a message id may be there).
    pub headers: HeaderMap,
    /// The body as text.
    pub body: String,
}

/// Sends the request; a 2xx answer is `Ok`, anything else a classified failure.
pub async fn send(provider: &str, request: RequestBuilder) -> Result<Response, Failure> {
    let response = request
        .send()
        .await
        .map_err(|e| request_failure(provider, &e))?;
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.text().await.unwrap_or_default();
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
pub fn classify(
    provider: &str,
    status: StatusCode,
    headers: &HeaderMap,
    body: &str,
    now: SystemTime,
) -> Failure {
    let text = one_line(body);
    let message = if text.is_empty() {
        format!("{provider}: HTTP {status}")
    } else {
        format!("{provider}: HTTP {status}: {text}")
    };
    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        Failure::transient(retry_after(headers, now), message)
    } else {
        Failure::permanent(message)
    }
}

/// A failure of the exchange itself (no answer).
fn request_failure(provider: &str, error: &reqwest::Error) -> Failure {
    // reqwest's message names the URL, never headers, so no key reaches the error.
    let message = format!("{provider}: {}", one_line(&error_chain(error)));
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
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
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

/// Provider text fit for a log line and `last_error`: one line, bounded.
fn one_line(text: &str) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let flat = flat.split_whitespace().collect::<Vec<_>>().join(" ");
    match flat.char_indices().nth(ERROR_TEXT) {
        Some((cut, _)) => format!("{}…", &flat[..cut]),
        None => flat,
    }
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
        let table = [
            (429, false),
            (500, false),
            (503, false),
            (400, true),
            (401, true),
            (403, true),
            (404, true),
            (422, true),
        ];
        for (code, permanent) in table {
            let f = classify("p", StatusCode::from_u16(code).unwrap(), &none, "", now);
            assert_eq!(f.is_permanent(), permanent, "{code}");
            assert!(!f.is_unsure());
        }
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
