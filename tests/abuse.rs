//! The console and the API against abuse: nobody can lock a user out from another address,
//! a burst of guesses is counted before it is checked, `X-Forwarded-For` is believed only from
//! trusted proxies, wrong bearer tokens are throttled and logged, removed users are out at
//! once, a short admin token stops start-up, report periods are bounded, every query of a
//! request runs under a statement timeout, test sends go only where they may (and not too
//! often), and `/readyz` keeps the database's words to the log.

mod common;

use std::process::{Command, Stdio};

use common::admin::{self, ADMIN_TOKEN, Auth, Client};
use common::{Serve, SmtpSink, TestEnv, free_port, wait_for};
use lifecycle::testkit::app::Roles;
use reqwest::{Method, StatusCode};
use serde_json::json;

const SERVING: Roles = Roles {
    ingest: true,
    dispatch: true,
    schedule: false,
    http: true,
};

/// A login attempt as a client behind the trusted proxy at `from`: the status.
async fn login_from(base: &str, from: &str, name: &str, password: &str) -> StatusCode {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let form = http
        .get(format!("{base}/console/login"))
        .send()
        .await
        .unwrap();
    let cookie = form
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| v.strip_prefix("lifecycle_login_csrf="))
        .map(|v| v.split(';').next().unwrap().to_owned())
        .unwrap();
    http.post(format!("{base}/console/login"))
        .header("Cookie", format!("lifecycle_login_csrf={cookie}"))
        .header("X-Forwarded-For", format!("203.0.113.250, {from}"))
        .form(&[("name", name), ("password", password), ("csrf", &cookie)])
        .send()
        .await
        .unwrap()
        .status()
}

#[tokio::test(flavor = "multi_thread")]
async fn no_one_can_lock_a_user_out_from_another_address() {
    let sink = SmtpSink::start(&[]);
    let (env, base) = admin::env(
        &sink,
        &[("LIFECYCLE_HTTP__TRUSTED_PROXIES", "127.0.0.1".into())],
    );
    let worker = env.start(SERVING).await;
    let (password, _) = admin::add_user(&env, "alice", "ops");
    // Someone guesses Alice's password from 192.0.2.1: five tries, then that address waits.
    for _ in 0..5 {
        assert_eq!(
            login_from(&base, "192.0.2.1", "alice", "guess").await,
            StatusCode::UNAUTHORIZED
        );
    }
    assert_eq!(
        login_from(&base, "192.0.2.1", "alice", "guess").await,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        login_from(&base, "192.0.2.1", "alice", &password).await,
        StatusCode::TOO_MANY_REQUESTS,
        "not even the right password from there"
    );
    // Alice, from her own address, is not locked out.
    assert_eq!(
        login_from(&base, "198.51.100.7", "alice", &password).await,
        StatusCode::SEE_OTHER
    );
    // A burst of parallel guesses from one address: only five get to the password check.
    let guesses = futures_util::future::join_all(
        (0..20).map(|_| login_from(&base, "192.0.2.9", "alice", "guess")),
    )
    .await;
    let checked = guesses
        .iter()
        .filter(|s| **s == StatusCode::UNAUTHORIZED)
        .count();
    assert_eq!(checked, 5, "{guesses:?}");
    // Names no user can have (100 KB of text, a password typed in the wrong field with
    // a space in it) are refused without being counted or kept: that address is not
    // throttled by them, and its own user still logs in.
    for name in ["x".repeat(100_000), "correct horse battery".to_owned()] {
        // Twenty of each: forty counted would pass the address's limit of thirty.
        for _ in 0..20 {
            assert_eq!(
                login_from(&base, "192.0.2.50", &name, "guess").await,
                StatusCode::UNAUTHORIZED
            );
        }
    }
    assert_eq!(
        login_from(&base, "192.0.2.50", "alice", &password).await,
        StatusCode::SEE_OTHER
    );
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn forwarded_addresses_are_believed_only_from_trusted_proxies() {
    let sink = SmtpSink::start(&[]);
    // No trusted proxy: every login from here is 127.0.0.1, whatever X-Forwarded-For says.
    let (env, base) = admin::env(&sink, &[]);
    let worker = env.start(SERVING).await;
    let (password, _) = admin::add_user(&env, "alice", "ops");
    for n in 0..5 {
        // Each guess claims another address; all count against the connection's own.
        let from = format!("192.0.2.{n}");
        assert_eq!(
            login_from(&base, &from, "alice", "guess").await,
            StatusCode::UNAUTHORIZED
        );
    }
    assert_eq!(
        login_from(&base, "192.0.2.200", "alice", &password).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_bearer_tokens_are_throttled_per_address_and_logged_without_the_token() {
    let sink = SmtpSink::start(&[]);
    let (env, _) = admin::env(
        &sink,
        &[("LIFECYCLE_HTTP__TRUSTED_PROXIES", "127.0.0.1".into())],
    );
    let addr = format!("127.0.0.1:{}", free_port());
    let base = format!("http://{addr}");
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut serve = Serve::start_with(
        &env,
        &[
            ("LIFECYCLE_HTTP_ADDR", addr.clone()),
            ("RUST_LOG", "info".into()),
        ],
        Stdio::from(log.reopen().unwrap()),
    );
    let http = reqwest::Client::new();
    let call = |from: &'static str, token: &'static str| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            http.get(format!("{base}/api/templates"))
                .bearer_auth(token)
                .header("X-Forwarded-For", from)
                .send()
                .await
                .map(|r| r.status())
                .ok()
        }
    };
    wait_for("the server up", || async {
        call("198.51.100.7", ADMIN_TOKEN)
            .await
            .filter(|s| *s == StatusCode::OK)
    })
    .await;
    for _ in 0..20 {
        assert_eq!(
            call("192.0.2.1", "lc_guessed-token-0123456789").await,
            Some(StatusCode::UNAUTHORIZED)
        );
    }
    assert_eq!(
        call("192.0.2.1", "lc_guessed-token-0123456789").await,
        Some(StatusCode::TOO_MANY_REQUESTS)
    );
    assert_eq!(
        call("192.0.2.1", ADMIN_TOKEN).await,
        Some(StatusCode::TOO_MANY_REQUESTS),
        "the address waits, whatever it sends"
    );
    assert_eq!(
        call("198.51.100.7", ADMIN_TOKEN).await,
        Some(StatusCode::OK)
    );
    assert!(serve.terminate().await.success());
    let text = std::fs::read_to_string(log.path()).unwrap();
    let refused = text
        .lines()
        .filter(|l| l.contains("A wrong bearer token was refused."))
        .count();
    assert_eq!(refused, 20, "each wrong token logged once");
    assert!(text.contains("192.0.2.1"), "with the client's address");
    assert!(!text.contains("guessed-token"), "never the token");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_removed_user_is_out_at_once() {
    let sink = SmtpSink::start(&[]);
    let (env, base) = admin::env(&sink, &[]);
    let worker = env.start(SERVING).await;
    let api = Client::new(&base);
    let (password, token) = admin::add_user(&env, "mia", "marketer");
    let (_, session) = api.login("mia", &password).await;
    let (cookie, _) = session.expect("logged in");
    let (status, _) = api
        .json(Method::GET, "/api/templates", Auth::Bearer(&token), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let out = common::cli(&env, &["users", "remove", "mia"]);
    assert!(out.contains("mia removed"), "{out}");
    let (status, _) = api
        .json(Method::GET, "/api/templates", Auth::Bearer(&token), None)
        .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "the token no longer works"
    );
    let (status, _) = api.page("/console/templates", &cookie).await;
    assert_eq!(
        status,
        StatusCode::SEE_OTHER,
        "the session ended: back to login"
    );
    // No such user: a clear error, exit 1.
    let output = Command::new(env!("CARGO_BIN_EXE_lifecycle"))
        .args(["users", "remove", "nobody"])
        .envs(env.env_vars())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("no user \"nobody\""));
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_short_admin_token_stops_start_up() {
    let env = TestEnv::new(&[]);
    let output = Command::new(env!("CARGO_BIN_EXE_lifecycle"))
        .arg("serve")
        .envs(env.env_vars())
        .env("LIFECYCLE_ADMIN_TOKEN", "letmein")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "a configuration error");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(
            "invalid setting `admin_token` (LIFECYCLE_ADMIN_TOKEN): at least 32 characters"
        ),
        "{stderr}"
    );
    assert!(
        !stderr.contains("letmein"),
        "the token is not printed: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn report_periods_are_bounded_and_every_query_has_a_statement_timeout() {
    let sink = SmtpSink::start(&[]);
    let (env, base) = admin::env(
        &sink,
        &[("LIFECYCLE_HTTP__STATEMENT_TIMEOUT_MS", "300".into())],
    );
    let worker = env.start(SERVING).await;
    let app = worker.app.clone();
    let api = Client::new(&base);
    let ops = Auth::Bearer(ADMIN_TOKEN);
    let (status, answer) = api
        .json(
            Method::GET,
            "/api/reports/loyalty?from=0001-01-01",
            ops,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("longer than 1830 days (5 years)"),
        "{answer}"
    );
    let (password, _) = admin::add_user(&env, "otto", "ops");
    let (_, session) = api.login("otto", &password).await;
    let (cookie, _) = session.unwrap();
    let (status, page) = api
        .page("/console/reports?from=0001-01-01&to=2026-01-01", &cookie)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{page:.300}");
    // A query that cannot finish (the table is locked by another transaction) is cancelled
    // by the statement timeout: a clear 503 at once, not a request hanging for 30 s.
    let mut lock = app.pool.begin().await.unwrap();
    sqlx::query("lock table messages in access exclusive mode")
        .execute(&mut *lock)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let (status, answer) = api.json(Method::GET, "/api/messages", ops, None).await;
    let took = started.elapsed();
    lock.rollback().await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("statement timeout"),
        "{answer}"
    );
    assert!(took < std::time::Duration::from_secs(5), "{took:?}");
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_says_which_part_is_down_but_not_the_databases_words() {
    let addr = format!("127.0.0.1:{}", free_port());
    let env = TestEnv::new(&[("LIFECYCLE_HTTP_ADDR", addr.clone())]);
    let worker = env.start(common::HTTP_ONLY).await;
    wait_for("ready", || async {
        let answer = reqwest::get(format!("http://{addr}/readyz")).await.ok()?;
        (answer.status() == 200).then_some(())
    })
    .await;
    // The database goes away (dropped, its sessions ended).
    lifecycle::testkit::db::drop_database(&env.settings.database_url)
        .await
        .unwrap();
    let body = wait_for("/readyz down", || async {
        let answer = reqwest::get(format!("http://{addr}/readyz")).await.ok()?;
        (answer.status() == 503).then(|| answer.text())?.await.ok()
    })
    .await;
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["database"], json!({"alive": false}), "{body}");
    assert!(
        !body.contains(env.settings.database_url.database()) && !body.contains("does not exist"),
        "{body}"
    );
    worker.stop().await.ok();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn test_sends_go_only_where_they_may_and_not_too_often() {
    let sink = SmtpSink::start(&[]);
    let (env, base) = admin::env(
        &sink,
        &[("LIFECYCLE_CONSOLE__TEST_SENDS_PER_HOUR", "3".into())],
    );
    let worker = env.start(SERVING).await;
    let app = worker.app.clone();
    let api = Client::new(&base);
    let (_, mia) = admin::add_user_with(&env, "mia", "marketer", &["--email", "mia@example.com"]);
    let (_, noah) = admin::add_user(&env, "noah", "marketer");
    // A member with real addresses (and no consent: no welcome of their own).
    env.publish(&[common::enrolled(
        &format!("{}-1", env.tag),
        "m-real",
        Some("real.member@example.com"),
        Some("+14155550123"),
        "en",
        "Ada",
        (false, false),
    )])
    .await;
    wait_for("the member", || async {
        (common::count(&app, "select count(*) from members").await == 1).then_some(())
    })
    .await;
    let send = |token: &str, body: serde_json::Value| {
        let (api, token) = (&api, token.to_owned());
        async move {
            api.json(
                Method::POST,
                "/api/templates/welcome/en/test-send",
                Auth::Bearer(&token),
                Some(&body),
            )
            .await
        }
    };
    // Any typed address: refused.
    let (status, answer) = send(&mia, json!({"email": "someone@example.org"})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("test_recipients"),
        "{answer}"
    );
    // "As member X" picks the context; it goes to Mia's own address, never the member's.
    let (status, answer) = send(&mia, json!({"member_id": "m-real"})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    // The QA inbox on [console] test_recipients.
    let (status, answer) = send(&mia, json!({"email": "qa@example.com"})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    // Noah has no address of his own: he must name one on the list.
    let (status, answer) = send(&noah, json!({"member_id": "m-real"})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    wait_for("two test mails", || async {
        (sink.messages().len() == 2).then_some(())
    })
    .await;
    let to: Vec<String> = sink
        .messages()
        .iter()
        .map(|m| common::parse_mail(m).to)
        .collect();
    assert!(to.contains(&"mia@example.com".to_owned()), "{to:?}");
    assert!(
        !to.contains(&"real.member@example.com".to_owned()),
        "{to:?}"
    );
    // Who sent each is on record.
    let by: Vec<Option<String>> =
        sqlx::query_scalar("select test_by from messages where test order by id")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(by, [Some("mia".to_owned()), Some("mia".to_owned())]);
    // Three an hour: the third passes, the fourth is 429.
    let (status, _) = send(&mia, json!({"email": "qa@example.com"})).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, answer) = send(&mia, json!({"email": "qa@example.com"})).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("test_sends_per_hour")
    );
    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// A connection from `from` that sends a login's headers and then nothing of its body: a
/// request held open, as a slow client (or an attacker) holds one.
async fn slow_request(from: &str, addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    stream
        .write_all(
            b"POST /console/login HTTP/1.1\r\nHost: x\r\n\
              Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\nna",
        )
        .await
        .unwrap();
    stream
}

/// A client whose connections come from `from` (any address of 127.0.0.0/8 is this host's).
fn client_from(from: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(from.parse::<std::net::IpAddr>().unwrap())
        .timeout(std::time::Duration::from_secs(2))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_requests_hold_neither_the_health_routes_nor_other_addresses() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let env = TestEnv::new(&[("LIFECYCLE_HTTP_ADDR", addr.to_string())]);
    let worker = env.start(common::HTTP_ONLY).await;
    let other = client_from("127.0.0.9");
    wait_for("healthz", || async {
        let answer = other
            .get(format!("http://{addr}/healthz"))
            .send()
            .await
            .ok()?;
        (answer.status() == 200).then_some(())
    })
    .await;

    // 64 requests held from one address: its next connection is closed unanswered, while
    // another address is served.
    let mut held = Vec::new();
    for _ in 0..64 {
        held.push(slow_request("127.0.0.1", addr).await);
    }
    let mut one_more = tokio::net::TcpStream::connect(addr).await.unwrap();
    one_more
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .ok();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        one_more.read_to_end(&mut answer),
    )
    .await;
    assert!(
        read.is_ok(),
        "the 65th connection is closed, not left waiting"
    );
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    let login = other
        .get(format!("http://{addr}/console/login"))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), StatusCode::OK);

    // 256 held from four addresses fill the requests handled at once: another address's
    // console request waits, but liveness and readiness still answer.
    for from in ["127.0.0.2", "127.0.0.3", "127.0.0.4"] {
        for _ in 0..64 {
            held.push(slow_request(from, addr).await);
        }
    }
    wait_for("the limit of requests at once reached", || async {
        other
            .get(format!("http://{addr}/console/login"))
            .send()
            .await
            .is_err()
            .then_some(())
    })
    .await;
    for path in ["/healthz", "/readyz"] {
        let answer = other.get(format!("http://{addr}{path}")).send().await;
        assert_eq!(
            answer.map(|a| a.status()).ok(),
            Some(StatusCode::OK),
            "{path} while the limit is full"
        );
    }
    drop(held);
    wait_for("the console again", || async {
        let answer = other
            .get(format!("http://{addr}/console/login"))
            .send()
            .await
            .ok()?;
        (answer.status() == 200).then_some(())
    })
    .await;
    worker.stop().await.ok();
    env.cleanup().await;
}
