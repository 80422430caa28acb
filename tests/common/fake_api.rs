//! A local stand-in for a SaaS HTTP API (SendGrid, Twilio, a webhook receiver): it records
//! every request and answers by rules, so a test scripts 202s, 400s, 429s with Retry-After,
//! 503s and slow answers.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

/// One answer.
#[derive(Debug, Clone)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// Extra headers.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: String,
    /// Wait this long before answering.
    pub delay: Duration,
    /// The provider took the message whatever the status says (a gateway that forwarded
    /// the request, then answered 504).
    pub forwarded: bool,
    /// The provider behind honours `Idempotency-Key`: a request whose key it already took is
    /// answered 200 and is no new copy.
    pub idempotent: bool,
}

impl Reply {
    /// An answer with this status and body.
    pub fn new(status: u16, body: &str) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: body.to_owned(),
            delay: Duration::ZERO,
            forwarded: false,
            idempotent: false,
        }
    }

    /// The same, after the provider took the message (a gateway's 504 after forwarding).
    pub fn forwarded(mut self) -> Reply {
        self.forwarded = true;
        self
    }

    /// The same, from a provider that honours `Idempotency-Key` (for this request and the
    /// later ones with its key).
    pub fn idempotent(mut self) -> Reply {
        self.idempotent = true;
        self
    }

    /// The same with a header.
    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// The same, answered after `delay`.
    pub fn after(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }
}

/// A request as the fake received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Headers.
    pub headers: HeaderMap,
    /// Body as text.
    pub body: String,
    /// When it arrived.
    pub at: Instant,
    /// The status it was (or is being) answered with.
    pub status: u16,
    /// The client's address: one per connection.
    pub peer: SocketAddr,
    /// The provider has the message from this request: a 2xx, or a forwarded request.
    pub took: bool,
    /// A request with an idempotency key the provider had already taken: no new copy.
    pub replayed: bool,
}

impl Recorded {
    /// Whether this request left a copy of the message at the provider.
    pub fn copy(&self) -> bool {
        self.took && !self.replayed
    }
}

#[derive(Default)]
struct Inner {
    /// (substring of the body, answer, answers left): the first rule whose text the body
    /// contains, and that has answers left (`None`: any number), answers.
    rules: Vec<(String, Reply, Option<usize>)>,
    fallback: Option<Reply>,
    requests: Vec<Recorded>,
    /// Idempotency keys taken under an idempotent rule.
    taken: std::collections::HashSet<String>,
}

/// The running fake.
#[derive(Clone)]
pub struct FakeApi {
    /// Base URL (`http://127.0.0.1:<port>`).
    pub url: String,
    inner: Arc<Mutex<Inner>>,
}

impl FakeApi {
    /// Starts a fake answering `fallback` to anything no rule matches.
    pub async fn start(fallback: Reply) -> FakeApi {
        let inner = Arc::new(Mutex::new(Inner {
            fallback: Some(fallback),
            ..Inner::default()
        }));
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = app.into_make_service_with_connect_info::<SocketAddr>();
        tokio::spawn(async move { axum::serve(listener, app).await.ok() });
        FakeApi { url, inner }
    }

    /// Answers `reply` to requests whose body contains `text`.
    pub fn rule(&self, text: &str, reply: Reply) {
        self.inner
            .lock()
            .unwrap()
            .rules
            .push((text.to_owned(), reply, None));
    }

    /// Answers `reply` to the first `times` requests whose body contains `text`; later ones
    /// go to the next rule or the fallback (a provider that fails, then recovers).
    pub fn rule_times(&self, text: &str, reply: Reply, times: usize) {
        self.inner
            .lock()
            .unwrap()
            .rules
            .push((text.to_owned(), reply, Some(times)));
    }

    /// Changes the answer to everything no rule matches.
    pub fn set_fallback(&self, reply: Reply) {
        self.inner.lock().unwrap().fallback = Some(reply);
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.inner.lock().unwrap().requests.clone()
    }
}

async fn handle(
    State(inner): State<Arc<Mutex<Inner>>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body = String::from_utf8_lossy(&body).into_owned();
    let reply = {
        let mut inner = inner.lock().unwrap();
        let rule = inner
            .rules
            .iter_mut()
            .find(|(text, _, left)| body.contains(text.as_str()) && *left != Some(0));
        let mut reply = match rule {
            Some((_, reply, left)) => {
                if let Some(n) = left {
                    *n -= 1;
                }
                reply.clone()
            }
            None => inner.fallback.clone().unwrap(),
        };
        let key = headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let replayed = key.as_ref().is_some_and(|k| inner.taken.contains(k));
        if replayed {
            reply = Reply::new(200, r#"{"id": "replayed"}"#);
        }
        let took = reply.status < 300 || reply.forwarded;
        if took
            && reply.idempotent
            && let Some(key) = key
        {
            inner.taken.insert(key);
        }
        inner.requests.push(Recorded {
            method: method.to_string(),
            path: uri.to_string(),
            headers,
            body: body.clone(),
            at: Instant::now(),
            status: reply.status,
            peer,
            took,
            replayed,
        });
        reply
    };
    tokio::time::sleep(reply.delay).await;
    let mut response = (StatusCode::from_u16(reply.status).unwrap(), reply.body).into_response();
    for (name, value) in reply.headers {
        response.headers_mut().insert(
            axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    response
}
