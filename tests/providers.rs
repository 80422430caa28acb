//! The HTTP providers against a local fake of their APIs: what they send, how failures are
//! classified, failover, the circuit breaker and the rate limit.

mod common;

use std::time::Duration;

use common::fake_api::{FakeApi, Reply};
use common::{ALL_ROLES, TestEnv, count, wait_for};
use lifecycle::testkit::app::App;
use serde_json::json;

const NOW: &str = "2026-11-22T10:00:00Z";

fn enrol(id: String, member: &str, email: bool, phone: bool) -> String {
    json!({"specversion": "1.0", "id": id, "source": "test", "type": "member.enrolled",
           "data": {"member_id": member, "email": format!("{member}@example.com"),
                    "phone": "+14155550123", "first_name": "Ada", "locale": "en", "timezone": "UTC",
                    "consent": {"email": email, "sms": phone}}})
    .to_string()
}

/// (status, provider, provider_ref, last_error, attempts) of a member's one message.
async fn message(
    app: &App,
    member: &str,
) -> (String, Option<String>, Option<String>, Option<String>, i32) {
    sqlx::query_as(
        "select status, provider, provider_ref, last_error, attempts from messages where member_id = $1",
    )
    .bind(member)
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

/// Waits until the member's message has at least `n` recorded attempts.
async fn attempts(app: &App, member: &str, n: i64) -> Vec<(String, String)> {
    wait_for(&format!("{n} attempts for {member}"), || async {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "select a.provider, a.outcome from delivery_attempts a join messages m on m.id = a.message_id
             where m.member_id = $1 order by a.id",
        )
        .bind(member)
        .fetch_all(&app.pool)
        .await
        .unwrap();
        (rows.len() as i64 >= n).then_some(rows)
    })
    .await
}

fn sendgrid_env(fake: &FakeApi, providers: &str, extra: &[(&str, String)]) -> TestEnv {
    let mut vars = vec![
        ("LIFECYCLE_NOW", NOW.to_owned()),
        ("LIFECYCLE_EMAIL_PROVIDERS", providers.to_owned()),
        ("LIFECYCLE_SENDGRID_BASE_URL", fake.url.clone()),
        ("LIFECYCLE_SENDGRID_API_KEY", "SG.test-key".to_owned()),
        ("LIFECYCLE_DISPATCH__SEND_TIMEOUT_MS", "500".to_owned()),
    ];
    vars.extend(extra.iter().cloned());
    TestEnv::new(&vars)
}

#[tokio::test(flavor = "multi_thread")]
async fn sendgrid_gets_the_mail_and_its_message_id_is_recorded() {
    let fake = FakeApi::start(Reply::new(202, "").header("X-Message-Id", "sg-42")).await;
    let env = sendgrid_env(&fake, "sendgrid", &[]);
    let worker = env.start(ALL_ROLES).await;
    let app = worker.app.clone();
    env.publish(&[enrol(format!("{}-1", env.tag), "m-sg", true, false)])
        .await;
    attempts(&app, "m-sg", 1).await;
    let (status, provider, reference, _, _) = message(&app, "m-sg").await;
    assert_eq!(
        (status.as_str(), provider.as_deref(), reference.as_deref()),
        ("sent", Some("sendgrid"), Some("sg-42"))
    );

    let requests = fake.requests();
    assert_eq!(requests.len(), 1);
    let r = &requests[0];
    assert_eq!(
        (r.method.as_str(), r.path.as_str()),
        ("POST", "/v3/mail/send")
    );
    assert_eq!(r.headers["authorization"], "Bearer SG.test-key");
    let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(
        body["personalizations"][0]["to"][0]["email"],
        "m-sg@example.com"
    );
    assert_eq!(body["from"]["email"], "loyalty@localhost");
    assert!(body["subject"].as_str().unwrap().contains("Ada"));
    assert_eq!(body["content"][0]["type"], "text/plain");
    assert!(
        body["content"][1]["value"]
            .as_str()
            .unwrap()
            .starts_with("<!DOCTYPE html>")
    );
    assert_eq!(body["headers"]["X-Lifecycle-Trigger"], "welcome");
    let id: i64 = count(&app, "select id from messages").await;
    assert_eq!(body["custom_args"]["message_id"], id.to_string());
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn twilio_gets_the_sms_with_a_status_callback() {
    let fake = FakeApi::start(Reply::new(201, r#"{"sid": "SM123", "status": "queued"}"#)).await;
    let env = TestEnv::new(&[
        ("LIFECYCLE_SMS_PROVIDERS", "twilio".into()),
        ("LIFECYCLE_TWILIO_BASE_URL", fake.url.clone()),
        ("LIFECYCLE_TWILIO_ACCOUNT_SID", "AC0123".into()),
        ("LIFECYCLE_TWILIO_AUTH_TOKEN", "tw-secret".into()),
        ("LIFECYCLE_TWILIO_FROM", "+15005550006".into()),
        ("LIFECYCLE_PUBLIC_URL", "https://loyalty.example".into()),
    ]);
    let worker = env.start(ALL_ROLES).await;
    let app = worker.app.clone();
    env.publish(&[enrol(format!("{}-1", env.tag), "m-tw", false, true)])
        .await;
    attempts(&app, "m-tw", 1).await;
    let (status, provider, reference, _, _) = message(&app, "m-tw").await;
    assert_eq!(
        (status.as_str(), provider.as_deref(), reference.as_deref()),
        ("sent", Some("twilio"), Some("SM123"))
    );
    let r = &fake.requests()[0];
    assert_eq!(r.path, "/2010-04-01/Accounts/AC0123/Messages.json");
    use base64::Engine;
    let basic = base64::engine::general_purpose::STANDARD.encode("AC0123:tw-secret");
    assert_eq!(
        r.headers["authorization"],
        format!("Basic {basic}").as_str()
    );
    let form: Vec<(String, String)> = url::form_urlencoded::parse(r.body.as_bytes())
        .into_owned()
        .collect();
    let field = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    assert_eq!(field("To"), "+14155550123");
    assert_eq!(field("From"), "+15005550006");
    assert!(field("Body").contains("Welcome, Ada"));
    assert_eq!(
        field("StatusCallback"),
        "https://loyalty.example/webhooks/twilio/status"
    );
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_webhook_body_is_signed_and_carries_an_idempotency_key() {
    let fake = FakeApi::start(Reply::new(200, r#"{"id": "hook-1"}"#)).await;
    let env = TestEnv::new(&[
        ("LIFECYCLE_EMAIL_PROVIDERS", "webhook".into()),
        ("LIFECYCLE_SMS_PROVIDERS", "webhook".into()),
        (
            "LIFECYCLE_WEBHOOK_URL",
            format!("{}/hooks/lifecycle", fake.url),
        ),
        ("LIFECYCLE_WEBHOOK_SECRET", "hook-secret".into()),
    ]);
    let worker = env.start(ALL_ROLES).await;
    let app = worker.app.clone();
    env.publish(&[enrol(format!("{}-1", env.tag), "m-hook", true, true)])
        .await;
    attempts(&app, "m-hook", 2).await;
    let requests = fake.requests();
    assert_eq!(requests.len(), 2, "email and SMS");
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, b"hook-secret");
    for r in &requests {
        assert_eq!(r.path, "/hooks/lifecycle");
        let signature = r.headers["x-lifecycle-signature"].to_str().unwrap();
        let hex = signature.strip_prefix("sha256=").unwrap();
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        aws_lc_rs::hmac::verify(&key, r.body.as_bytes(), &bytes).expect("a valid signature");
        let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(
            r.headers["idempotency-key"],
            format!("lifecycle-{}", body["message_id"].as_str().unwrap()).as_str()
        );
        assert_eq!(body["trigger"], "welcome");
        assert!(body["body"].as_str().unwrap().contains("Ada"));
    }
    let channels: Vec<String> = requests
        .iter()
        .map(|r| {
            serde_json::from_str::<serde_json::Value>(&r.body).unwrap()["channel"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert!(channels.contains(&"email".to_owned()) && channels.contains(&"sms".to_owned()));
    // A tampered body does not verify.
    assert!(aws_lc_rs::hmac::verify(&key, b"{}", &[0; 32]).is_err());
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_busy_dispatcher_reuses_its_connections() {
    // Each answer takes a while, so that every loop has all its sends in flight at once, and
    // all of them come back idle together between two batches.
    let fake = FakeApi::start(Reply::new(200, "{}").after(Duration::from_millis(40))).await;
    let (loops, concurrency) = (4, 3);
    let env = TestEnv::new(&[
        ("LIFECYCLE_EMAIL_PROVIDERS", "webhook".into()),
        ("LIFECYCLE_WEBHOOK_URL", format!("{}/hooks", fake.url)),
        ("LIFECYCLE_WEBHOOK_SECRET", "hook-secret".into()),
        ("LIFECYCLE_DISPATCH__PIPELINES", loops.to_string()),
        ("LIFECYCLE_DISPATCH__CONCURRENCY", concurrency.to_string()),
        ("LIFECYCLE_DISPATCH__BATCH_SIZE", "6".into()),
    ]);
    let worker = env.start(ALL_ROLES).await;
    // Email only: one provider, one client.
    let members = 60;
    let events: Vec<String> = (0..members)
        .map(|i| {
            enrol(
                format!("{}-{i}", env.tag),
                &format!("m-reuse-{i}"),
                true,
                false,
            )
        })
        .collect();
    env.publish(&events).await;
    wait_for("every welcome at the receiver", || async {
        (fake.requests().len() >= members).then_some(())
    })
    .await;
    // Sends in flight never exceed loops × concurrency, and an idle connection is kept for each:
    // a connection closed and opened again would show as another client port.
    let peers: std::collections::HashSet<_> = fake.requests().iter().map(|r| r.peer).collect();
    assert!(
        peers.len() <= loops * concurrency,
        "{} connections for {} sends at most in flight",
        peers.len(),
        loops * concurrency
    );
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_are_classified_and_retry_after_is_honoured() {
    let fake = FakeApi::start(Reply::new(202, "")).await;
    fake.rule(
        "m-400@",
        Reply::new(400, r#"{"errors":[{"message":"bad request"}]}"#),
    );
    fake.rule("m-429@", Reply::new(429, "").header("Retry-After", "120"));
    // An HTTP date is in the provider's (real) time: five minutes from now.
    let date = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(300));
    fake.rule("m-date@", Reply::new(429, "").header("Retry-After", &date));
    fake.rule("m-500@", Reply::new(500, "down"));
    // A gateway's answer, or an unavailable with no word of when to come back: the request
    // may have reached the provider.
    fake.rule("m-502@", Reply::new(502, "bad gateway"));
    fake.rule("m-503@", Reply::new(503, "down"));
    fake.rule("m-slow@", Reply::new(202, "").after(Duration::from_secs(3)));
    // An absurd Retry-After (10^13 s, past the end of chrono's calendar) once panicked the
    // date arithmetic and killed the dispatch loop; it is now capped at a day.
    fake.rule(
        "m-absurd@",
        Reply::new(429, "").header("Retry-After", "10000000000000"),
    );
    let env = sendgrid_env(
        &fake,
        "sendgrid",
        &[
            ("LIFECYCLE_DISPATCH__RETRY_BASE_MS", "60000".into()),
            // One loop: had the absurd answer killed it, nothing after it would be sent.
            ("LIFECYCLE_DISPATCH__PIPELINES", "1".into()),
            // Every member's answer is seen: the circuit never opens here.
            ("LIFECYCLE_DISPATCH__BREAKER_FAILURES", "100".into()),
            ("LIFECYCLE_DISPATCH__BATCH_SIZE", "1".into()),
        ],
    );
    let worker = env.start(ALL_ROLES).await;
    let app = worker.app.clone();
    let members = [
        "m-absurd", "m-400", "m-429", "m-date", "m-500", "m-502", "m-503", "m-slow",
    ];
    let events: Vec<String> = members
        .iter()
        .enumerate()
        .map(|(i, m)| enrol(format!("{}-{i}", env.tag), m, true, false))
        .collect();
    env.publish(&events).await;
    for m in members {
        attempts(&app, m, 1).await;
    }
    let now: chrono::DateTime<chrono::Utc> = NOW.parse().unwrap();
    let due = |member: &'static str| {
        let app = app.clone();
        async move {
            let due: chrono::DateTime<chrono::Utc> =
                sqlx::query_scalar("select due_at from messages where member_id = $1")
                    .bind(member)
                    .fetch_one(&app.pool)
                    .await
                    .unwrap();
            due - now
        }
    };
    // 400: permanent, failed at once with the provider's words.
    let (status, _, _, error, _) = message(&app, "m-400").await;
    assert_eq!(status, "failed");
    assert!(
        error
            .unwrap()
            .contains("HTTP 400 Bad Request: {\"errors\":[{\"message\":\"bad request\"}]}")
    );
    // 429: retried when the provider asked (after more than the 30–60 s backoff here), in
    // seconds or as a date.
    let (status, ..) = message(&app, "m-429").await;
    assert_eq!(status, "pending");
    assert_eq!(due("m-429").await, chrono::Duration::seconds(120));
    let wait = due("m-date").await;
    assert!(
        wait > chrono::Duration::seconds(290) && wait <= chrono::Duration::seconds(300),
        "{wait}"
    );
    // 500: transient, retried after a jittered backoff (half to all of the base).
    let (status, _, _, error, _) = message(&app, "m-500").await;
    assert_eq!(status, "pending");
    assert!(error.unwrap().contains("HTTP 500"));
    let wait = due("m-500").await;
    assert!(
        wait >= chrono::Duration::seconds(30) && wait <= chrono::Duration::seconds(60),
        "{wait}"
    );
    // 502, and 503 without Retry-After: unsure, retried after the backoff too.
    for (member, said) in [("m-502", "HTTP 502"), ("m-503", "HTTP 503")] {
        let (status, _, _, error, _) = message(&app, member).await;
        assert_eq!(status, "pending");
        let error = error.unwrap();
        assert!(
            error.contains(said) && error.contains("may have the message"),
            "{error}"
        );
    }
    // The absurd Retry-After: a day, and the loop went on to send the rest.
    let (status, ..) = message(&app, "m-absurd").await;
    assert_eq!(status, "pending");
    assert_eq!(due("m-absurd").await, chrono::Duration::days(1));
    // A timeout: retried, and the provider may have it (unsure).
    let (status, _, _, error, _) = message(&app, "m-slow").await;
    assert_eq!(status, "pending");
    assert!(
        error.unwrap().contains("sendgrid"),
        "the error names the provider"
    );
    let outcomes: Vec<String> = sqlx::query_scalar(
        "select a.outcome from delivery_attempts a join messages m on m.id = a.message_id order by m.member_id",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    // By member: 400, 429, 500, 502, 503, absurd, date, slow.
    assert_eq!(
        outcomes,
        [
            "permanent",
            "transient",
            "transient",
            "unsure",
            "unsure",
            "transient",
            "transient",
            "unsure"
        ]
    );
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_provider_fails_over_to_the_next_but_a_timeout_does_not() {
    // Down for maintenance, and saying when to come back: it did not take the message.
    let fake = FakeApi::start(Reply::new(503, "maintenance").header("Retry-After", "1")).await;
    fake.rule("m-slow@", Reply::new(202, "").after(Duration::from_secs(3)));
    let env = sendgrid_env(
        &fake,
        "sendgrid,file",
        &[("LIFECYCLE_DISPATCH__BREAKER_FAILURES", "100".into())],
    );
    let worker = env.start(ALL_ROLES).await;
    let app = worker.app.clone();
    env.publish(&[
        enrol(format!("{}-1", env.tag), "m-over", true, false),
        enrol(format!("{}-2", env.tag), "m-slow", true, false),
    ])
    .await;
    assert_eq!(
        attempts(&app, "m-over", 2).await,
        [
            ("sendgrid".to_owned(), "transient".to_owned()),
            ("file".to_owned(), "sent".to_owned())
        ]
    );
    let (status, provider, reference, ..) = message(&app, "m-over").await;
    assert_eq!(
        (status.as_str(), provider.as_deref()),
        ("sent", Some("file"))
    );
    assert!(
        env.outbox
            .path()
            .join(reference.unwrap().rsplit('/').next().unwrap())
            .exists()
    );
    // The slow answer may still be a success at SendGrid: no second copy through the file,
    // and the attempt is on record as unsure.
    assert_eq!(
        attempts(&app, "m-slow", 1).await,
        [("sendgrid".to_owned(), "unsure".to_owned())]
    );
    let (status, ..) = message(&app, "m-slow").await;
    assert_eq!(status, "pending");
    let files = std::fs::read_dir(env.outbox.path()).unwrap().count();
    assert_eq!(files, 2, "only m-over's .eml and .json");
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_breaker_skips_a_failing_provider_and_tries_it_again_later() {
    let fake = FakeApi::start(Reply::new(500, "down")).await;
    let env = sendgrid_env(
        &fake,
        "sendgrid,file",
        &[
            ("LIFECYCLE_DISPATCH__BREAKER_FAILURES", "2".into()),
            ("LIFECYCLE_DISPATCH__BREAKER_COOLDOWN_MS", "1500".into()),
            ("LIFECYCLE_DISPATCH__CONCURRENCY", "1".into()),
            ("LIFECYCLE_DISPATCH__PIPELINES", "1".into()),
        ],
    );
    let worker = env.start(ALL_ROLES).await;
    let app = worker.app.clone();
    let events: Vec<String> = (0..6)
        .map(|i| enrol(format!("{}-{i}", env.tag), &format!("m-b{i}"), true, false))
        .collect();
    env.publish(&events).await;
    wait_for("six messages sent", || async {
        (count(&app, "select count(*) from messages where status = 'sent'").await == 6)
            .then_some(())
    })
    .await;
    assert_eq!(
        fake.requests().len(),
        2,
        "two failures open the circuit; the rest skip SendGrid"
    );
    assert_eq!(
        count(
            &app,
            "select count(*) from messages where provider = 'file'"
        )
        .await,
        6
    );
    // SendGrid recovers; after the cooldown one message tries it, and it takes the rest.
    fake.set_fallback(Reply::new(202, "").header("X-Message-Id", "sg-back"));
    let events: Vec<String> = (6..9)
        .map(|i| enrol(format!("{}-{i}", env.tag), &format!("m-b{i}"), true, false))
        .collect();
    tokio::time::sleep(Duration::from_millis(1600)).await; // the cooldown itself is what is tested
    env.publish(&events).await;
    wait_for("three more sent", || async {
        (count(&app, "select count(*) from messages where status = 'sent'").await == 9)
            .then_some(())
    })
    .await;
    assert_eq!(
        count(
            &app,
            "select count(*) from messages where provider = 'sendgrid'"
        )
        .await,
        3,
        "closed again after a good trial"
    );
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_rate_limit_holds() {
    let fake = FakeApi::start(Reply::new(200, "{}")).await;
    let env = TestEnv::new(&[
        ("LIFECYCLE_EMAIL_PROVIDERS", "webhook".into()),
        ("LIFECYCLE_WEBHOOK_URL", fake.url.clone()),
        ("LIFECYCLE_WEBHOOK_SECRET", "s".into()),
        ("LIFECYCLE_DISPATCH__RATE_LIMIT__WEBHOOK", "10".into()),
    ]);
    let worker = env.start(ALL_ROLES).await;
    let app = worker.app.clone();
    let events: Vec<String> = (0..30)
        .map(|i| enrol(format!("{}-{i}", env.tag), &format!("m-r{i}"), true, false))
        .collect();
    env.publish(&events).await;
    wait_for("thirty sent", || async {
        (count(&app, "select count(*) from messages where status = 'sent'").await == 30)
            .then_some(())
    })
    .await;
    // A bucket of 10 a second (bursts of 10): between any two requests i < j, at most
    // 10 + 10 × (t_j − t_i) requests (a little slack for clock granularity).
    let at: Vec<_> = fake.requests().iter().map(|r| r.at).collect();
    assert_eq!(at.len(), 30);
    for i in 0..at.len() {
        for j in i + 1..at.len() {
            let span = at[j].duration_since(at[i]).as_secs_f64();
            let allowed = 10.0 + 10.0 * span + 1.0;
            assert!(
                ((j - i + 1) as f64) <= allowed,
                "{} requests in {span:.3}s",
                j - i + 1
            );
        }
    }
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ops_can_retry_a_failed_message() {
    let fake = FakeApi::start(Reply::new(400, "bad sender")).await;
    let env = sendgrid_env(&fake, "sendgrid", &[]);
    let worker = env.start(ALL_ROLES).await;
    let app = worker.app.clone();
    env.publish(&[enrol(format!("{}-1", env.tag), "m-ops", true, false)])
        .await;
    attempts(&app, "m-ops", 1).await;
    assert_eq!(message(&app, "m-ops").await.0, "failed");
    // The sender is fixed at SendGrid; ops put the message back.
    fake.set_fallback(Reply::new(202, "").header("X-Message-Id", "sg-ok"));
    let n = lifecycle::testkit::outbox::retry_failed(
        &app.pool,
        lifecycle::testkit::outbox::Requeue::Matching(&Default::default()),
        app.clock.now(),
    )
    .await
    .unwrap();
    assert_eq!(n, 1);
    app.outbox_ready.notify_one();
    wait_for("the retried message sent", || async {
        (message(&app, "m-ops").await.0 == "sent").then_some(())
    })
    .await;
    let outcomes: Vec<String> =
        sqlx::query_scalar("select outcome from delivery_attempts order by id")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        outcomes,
        ["permanent", "sent"],
        "the first attempt stays on record"
    );
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn twilio_failures_are_classified_like_every_http_api() {
    let fake = FakeApi::start(Reply::new(201, r#"{"sid": "SM-ok"}"#)).await;
    // Rules match the form-encoded `To` of each member's number.
    fake.rule(
        "To=%2B14155550101",
        Reply::new(
            400,
            r#"{"code": 21211, "message": "Invalid 'To' Phone Number"}"#,
        ),
    );
    fake.rule(
        "To=%2B14155550102",
        Reply::new(429, "").header("Retry-After", "90"),
    );
    fake.rule("To=%2B14155550103", Reply::new(503, "busy"));
    fake.rule(
        "To=%2B14155550104",
        Reply::new(201, "{}").after(Duration::from_secs(3)),
    );
    let env = TestEnv::new(&[
        ("LIFECYCLE_NOW", NOW.to_owned()),
        ("LIFECYCLE_SMS_PROVIDERS", "twilio".into()),
        ("LIFECYCLE_TWILIO_BASE_URL", fake.url.clone()),
        ("LIFECYCLE_TWILIO_ACCOUNT_SID", "AC1".into()),
        ("LIFECYCLE_TWILIO_AUTH_TOKEN", "t".into()),
        ("LIFECYCLE_TWILIO_FROM", "+15005550006".into()),
        ("LIFECYCLE_DISPATCH__SEND_TIMEOUT_MS", "500".into()),
        ("LIFECYCLE_DISPATCH__RETRY_BASE_MS", "60000".into()),
    ]);
    let worker = env.start(ALL_ROLES).await;
    let app = worker.app.clone();
    let events: Vec<String> = (1..=5)
        .map(|i| {
            json!({"specversion": "1.0", "id": format!("{}-{i}", env.tag), "source": "test",
                   "type": "member.enrolled",
                   "data": {"member_id": format!("m-tw{i}"), "phone": format!("+1415555010{i}"),
                            "locale": "en", "timezone": "UTC", "consent": {"email": false, "sms": true}}})
            .to_string()
        })
        .collect();
    env.publish(&events).await;
    for i in 1..=5 {
        attempts(&app, &format!("m-tw{i}"), 1).await;
    }
    let (status, _, _, error, _) = message(&app, "m-tw1").await;
    assert_eq!(status, "failed");
    assert!(error.unwrap().contains("Invalid 'To' Phone Number"));
    let due: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("select due_at from messages where member_id = 'm-tw2'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        due - NOW.parse::<chrono::DateTime<chrono::Utc>>().unwrap(),
        chrono::Duration::seconds(90)
    );
    for m in ["m-tw2", "m-tw3", "m-tw4"] {
        assert_eq!(message(&app, m).await.0, "pending", "{m}: retried later");
    }
    let (status, _, reference, ..) = message(&app, "m-tw5").await;
    assert_eq!(
        (status.as_str(), reference.as_deref()),
        ("sent", Some("SM-ok"))
    );
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_send_keeps_its_claim_so_no_other_loop_sends_it_again() {
    // The provider takes 2.5 s; the claim lease is 1 s. Without renewal another dispatch loop
    // would take the message after a second and send it a second time.
    let fake = FakeApi::start(Reply::new(202, "").after(Duration::from_millis(2_500))).await;
    let env = sendgrid_env(
        &fake,
        "sendgrid",
        &[
            ("LIFECYCLE_DISPATCH__LEASE_SECS", "1".into()),
            ("LIFECYCLE_DISPATCH__SEND_TIMEOUT_MS", "5000".into()),
            ("LIFECYCLE_DISPATCH__PIPELINES", "4".into()),
        ],
    );
    let worker = env.start(ALL_ROLES).await;
    let app = worker.app.clone();
    env.publish(&[enrol(format!("{}-1", env.tag), "m-slow-send", true, false)])
        .await;
    wait_for("the slow message sent", || async {
        (count(&app, "select count(*) from messages where status = 'sent'").await == 1)
            .then_some(())
    })
    .await;
    assert_eq!(fake.requests().len(), 1, "sent once");
    assert_eq!(attempts(&app, "m-slow-send", 1).await.len(), 1);
    worker.stop().await.unwrap();
    env.cleanup().await;
}
