//! Following one message from its event to its send in a real `lifecycle serve`'s JSON logs
//! (`LIFECYCLE_LOG_FORMAT=json`, `RUST_LOG=lifecycle=debug`): the event's span names the event
//! and the dedupe key it planned, the planning names the message id it stored under that key,
//! and the dispatch spans name the message, its trigger and channel, and the provider with its
//! outcome. HTTP requests have a span with the route and the status. No line holds the
//! member's address or number.

mod common;

use std::process::Stdio;

use common::{Serve, SmtpSink, TestEnv, enrolled, free_port, wait_for};
use serde_json::Value;

/// The log's lines as JSON objects; a line that is not one fails the test.
fn lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

/// The value of `field` in the span named `span` that `line` happened in.
fn span_field<'a>(line: &'a Value, span: &str, field: &str) -> Option<&'a Value> {
    line["spans"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == span)?
        .get(field)
}

/// A real `serve` logging JSON at debug to a file, on a free HTTP port: the process, the log
/// and the port's address.
fn serve_logging_json(env: &TestEnv) -> (Serve, tempfile::NamedTempFile, String) {
    let log = tempfile::NamedTempFile::new().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let serve = Serve::start_with(
        env,
        &[
            ("LIFECYCLE_LOG_FORMAT", "json".into()),
            ("RUST_LOG", "lifecycle=debug".into()),
            ("LIFECYCLE_HTTP_ADDR", addr.clone()),
        ],
        Stdio::from(log.reopen().unwrap()),
    );
    (serve, log, addr)
}

#[tokio::test]
async fn one_message_is_followed_from_its_event_to_its_send_by_its_ids() {
    let sink = SmtpSink::start(&[]);
    let env = TestEnv::with_smtp(&sink);
    let (mut serve, log, addr) = serve_logging_json(&env);
    let event_id = format!("{}-span", env.tag);
    env.publish(&[enrolled(
        &event_id,
        "m-span",
        Some("jiwoo.kim@example.com"),
        Some("+821012345678"),
        "en",
        "Jiwoo",
        (true, false),
    )])
    .await;
    wait_for("the welcome at the sink", || async {
        (sink.messages().len() == 1).then_some(())
    })
    .await;
    let health = format!("http://{addr}/healthz");
    wait_for("the HTTP server", || async {
        reqwest::get(&health)
            .await
            .ok()
            .filter(|r| r.status() == 200)
    })
    .await;
    // The provider's span closes after the message is at the sink: wait for its line.
    wait_for("the send logged", || async {
        lines(log.path())
            .iter()
            .any(|l| l["message"] == "Message sent.")
            .then_some(())
    })
    .await;
    assert_eq!(serve.terminate().await.code(), Some(0));
    let lines = lines(log.path());

    // The event planned the welcome under a key…
    let planned = lines
        .iter()
        .find(|l| l["message"] == "Message planned." && l["dedupe_key"] == "welcome:m-span:email")
        .expect("the welcome planned");
    assert_eq!(
        span_field(planned, "event", "event_id"),
        Some(&event_id.clone().into())
    );
    assert_eq!(
        span_field(planned, "event", "event_type"),
        Some(&"member.enrolled".into())
    );
    assert!(span_field(planned, "batch", "size").is_some(), "{planned}");
    // …stored under a message id…
    let stored = lines
        .iter()
        .find(|l| l["message"] == "Message stored." && l["dedupe_key"] == "welcome:m-span:email")
        .expect("the welcome stored");
    let message_id = stored["message_id"].clone();
    assert!(message_id.is_i64(), "{stored}");
    // …which dispatch settles, through a provider that sent it.
    let sent = lines
        .iter()
        .find(|l| l["message"] == "Message sent.")
        .expect("the welcome sent");
    assert_eq!(span_field(sent, "message", "message_id"), Some(&message_id));
    assert_eq!(
        span_field(sent, "message", "trigger"),
        Some(&"welcome".into())
    );
    assert_eq!(
        span_field(sent, "message", "channel"),
        Some(&"email".into())
    );
    assert_eq!(
        span_field(sent, "provider", "provider"),
        Some(&"smtp".into())
    );
    assert_eq!(
        span_field(sent, "provider", "outcome"),
        Some(&"sent".into())
    );
    // The claim that took it has its own span, with how many it claimed.
    let claimed = lines
        .iter()
        .find(|l| l["message"] == "Messages claimed.")
        .expect("a claim logged");
    assert!(
        span_field(claimed, "claim", "claimed").is_some_and(Value::is_u64),
        "{claimed}"
    );
    // Nothing logged the member's address or number, in a field or a span.
    let all = lines.iter().map(Value::to_string).collect::<String>();
    for secret in ["jiwoo.kim@example.com", "+821012345678", "821012345678"] {
        assert!(!all.contains(secret), "{secret} in the log");
    }
    env.cleanup().await;
}

#[tokio::test]
async fn a_request_span_has_the_route_and_status_and_a_bad_format_is_refused() {
    let env = TestEnv::new(&[]);
    let (mut serve, log, addr) = serve_logging_json(&env);
    let page = format!("http://{addr}/unsubscribe/not-a-token?email=jiwoo.kim@example.com");
    wait_for("an answer", || async { reqwest::get(&page).await.ok() }).await;
    assert_eq!(serve.terminate().await.code(), Some(0));
    let lines = lines(log.path());
    let answered: Vec<&Value> = lines
        .iter()
        .filter(|l| l["message"] == "Request answered.")
        .collect();
    assert!(
        answered.iter().any(|l| {
            span_field(l, "request", "route") == Some(&"/unsubscribe/{token}".into())
                && span_field(l, "request", "method") == Some(&"GET".into())
                && l["status"].is_u64()
        }),
        "{answered:?}"
    );
    let all = lines.iter().map(Value::to_string).collect::<String>();
    assert!(!all.contains("jiwoo.kim"), "the query in the log");
    assert!(!all.contains("not-a-token"), "the path in the log");

    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_lifecycle"))
        .arg("migrate")
        .envs(env.env_vars())
        .env("LIFECYCLE_LOG_FORMAT", "yaml")
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("(LIFECYCLE_LOG_FORMAT)")
            && said.contains("\"yaml\" is neither text nor json"),
        "{said}"
    );
    env.cleanup().await;
}
