//! What providers send back is data, never control: an id holding a NUL, a reply the database
//! refuses, a database that refuses every result for a while, and a gateway that answers 504
//! after forwarding. Dispatch goes on for everyone else, nothing is recorded twice or lost,
//! and a stuck writer shows in `/readyz` and `/metrics`.

mod common;

use common::fake_api::{FakeApi, Reply};
use common::{ALL_ROLES, DISPATCH_ONLY, TestEnv, count, enrolled, free_port, wait_for};
use lifecycle::testkit::app::Roles;

/// An environment whose email goes to the webhook provider at `fake` (then to `then`, if
/// given), serving HTTP on `addr`.
fn webhook_env(fake: &FakeApi, then: Option<&str>, extra: &[(&str, String)]) -> TestEnv {
    let providers = match then {
        Some(next) => format!("webhook,{next}"),
        None => "webhook".to_owned(),
    };
    let mut vars = vec![
        ("LIFECYCLE_EMAIL_PROVIDERS", providers),
        ("LIFECYCLE_WEBHOOK_URL", format!("{}/mail", fake.url)),
        ("LIFECYCLE_WEBHOOK_SECRET", "partners".to_owned()),
        ("LIFECYCLE_DISPATCH__SEND_TIMEOUT_MS", "2000".to_owned()),
    ];
    vars.extend(extra.iter().cloned());
    TestEnv::new(&vars)
}

fn enrol(env: &TestEnv, member: &str) -> String {
    enrolled(
        &format!("{}-{member}", env.tag),
        member,
        Some(&format!("{member}@example.com")),
        None,
        "en",
        "Ada",
        (true, false),
    )
}

/// (status, provider reference, last error) of a member's welcome, once it is planned.
async fn welcome(
    app: &lifecycle::testkit::app::App,
    member: &str,
) -> (String, Option<String>, Option<String>) {
    wait_for(&format!("{member}'s welcome planned"), || async {
        sqlx::query_as(
            "select status, provider_ref, last_error from messages
             where member_id = $1 and trigger = 'welcome'",
        )
        .bind(member)
        .fetch_optional(&app.pool)
        .await
        .unwrap()
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_provider_id_holding_a_nul_does_not_stop_dispatch() {
    let fake = FakeApi::start(Reply::new(200, r#"{"id": "ok"}"#)).await;
    // PostgreSQL's text refuses NUL (22021): once, this reply made every write of results
    // fail, forever, with every loop's results queued behind it.
    fake.rule("m-nul@", Reply::new(200, r#"{"id": "a\u0000b"}"#));
    let env = webhook_env(&fake, None, &[]);
    let worker = env.start(ALL_ROLES).await;
    let app = worker.app.clone();
    let members: Vec<String> = (0..20).map(|i| format!("m-{i}")).collect();
    let mut events = vec![enrol(&env, "m-nul")];
    events.extend(members.iter().map(|m| enrol(&env, m)));
    env.publish(&events).await;
    wait_for("every welcome sent", || async {
        (count(&app, "select count(*) from messages where status = 'sent'").await == 21)
            .then_some(())
    })
    .await;
    let (status, reference, _) = welcome(&app, "m-nul").await;
    assert_eq!(status, "sent");
    assert_eq!(reference.as_deref(), Some("a b"), "kept, cleaned");
    assert_eq!(fake.requests().len(), 21, "each sent once");
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_result_the_database_refuses_for_good_is_written_without_its_texts() {
    let fake = FakeApi::start(Reply::new(200, r#"{"id": "ok"}"#)).await;
    fake.rule("m-poison@", Reply::new(400, "poison"));
    let env = webhook_env(&fake, None, &[]);
    let worker = env
        .start(Roles {
            dispatch: false,
            ..ALL_ROLES
        })
        .await;
    let app = worker.app.clone();
    let members: Vec<String> = (0..30).map(|i| format!("m-{i}")).collect();
    let mut events = vec![enrol(&env, "m-poison")];
    events.extend(members.iter().map(|m| enrol(&env, m)));
    env.publish(&events).await;
    wait_for("every welcome planned", || async {
        (count(&app, "select count(*) from messages").await == 31).then_some(())
    })
    .await;
    // The database refuses, for good, any attempt whose error says "poison": the batch that
    // holds it fails as a whole.
    for sql in [
        "create function refuse_poison() returns trigger language plpgsql
         as $$ begin if new.error like '%poison%' then
             raise exception 'no poison here' using errcode = '23514'; end if;
             return new; end $$",
        "create trigger refuse_poison before insert on delivery_attempts
         for each row execute function refuse_poison()",
    ] {
        sqlx::query(sql).execute(&app.pool).await.unwrap();
    }
    let dispatch = lifecycle::testkit::worker::Worker::start(env.app().await, DISPATCH_ONLY)
        .await
        .unwrap();
    wait_for("every result recorded", || async {
        (count(
            &app,
            "select count(*) from messages where status not in ('pending', 'sending')",
        )
        .await
            == 31)
            .then_some(())
    })
    .await;
    assert_eq!(
        count(&app, "select count(*) from messages where status = 'sent'").await,
        30
    );
    let (status, _, error) = welcome(&app, "m-poison").await;
    assert_eq!(status, "failed");
    assert_eq!(
        error.as_deref(),
        Some("(the result's text could not be stored; the log has it)")
    );
    let attempt: Option<String> = sqlx::query_scalar(
        "select a.error from delivery_attempts a join messages m on m.id = a.message_id
         where m.member_id = 'm-poison'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(attempt.as_deref(), Some("(not stored)"));
    assert_eq!(fake.requests().len(), 31, "each tried once");
    dispatch.stop().await.unwrap();
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_writer_stuck_on_the_database_shows_in_readyz_and_metrics_until_it_recovers() {
    let fake = FakeApi::start(Reply::new(200, r#"{"id": "ok"}"#)).await;
    let addr = format!("127.0.0.1:{}", free_port());
    let env = webhook_env(
        &fake,
        None,
        &[
            ("LIFECYCLE_HTTP_ADDR", addr.clone()),
            ("LIFECYCLE_DISPATCH__WRITER_STUCK_MS", "1000".to_owned()),
        ],
    );
    let worker = env
        .start(Roles {
            ingest: true,
            dispatch: true,
            schedule: false,
            http: true,
        })
        .await;
    let app = worker.app.clone();
    let ready = || async {
        let answer = reqwest::get(format!("http://{addr}/readyz")).await.ok()?;
        Some((
            answer.status().as_u16(),
            answer.json::<serde_json::Value>().await.ok()?,
        ))
    };
    let scrape = || async {
        let answer = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .unwrap();
        answer.text().await.unwrap()
    };
    wait_for("ready", || async {
        ready().await.filter(|(s, _)| *s == 200)
    })
    .await;
    // The database refuses every attempt for a while, with an error that may pass.
    for sql in [
        "create function refuse_all() returns trigger language plpgsql
         as $$ begin raise exception 'not now' using errcode = '40001'; end $$",
        "create trigger refuse_all before insert on delivery_attempts
         for each row execute function refuse_all()",
    ] {
        sqlx::query(sql).execute(&app.pool).await.unwrap();
    }
    env.publish(&[enrol(&env, "m-1")]).await;
    let (_, report) = wait_for("/readyz saying the writer is stuck", || async {
        ready().await.filter(|(s, _)| *s == 503)
    })
    .await;
    assert_eq!(report["dispatch"]["alive"], false, "{report}");
    assert!(report["dispatch"]["writer_stuck_secs"].is_u64(), "{report}");
    let metrics = scrape().await;
    assert!(
        metrics.contains("lifecycle_results_writer_stuck 1"),
        "{metrics}"
    );
    // The database recovers: the result lands, once, and the writer is well again.
    sqlx::query("drop trigger refuse_all on delivery_attempts")
        .execute(&app.pool)
        .await
        .unwrap();
    wait_for("ready again", || async {
        ready().await.filter(|(s, _)| *s == 200)
    })
    .await;
    assert_eq!(welcome(&app, "m-1").await.0, "sent");
    assert_eq!(fake.requests().len(), 1);
    let metrics = scrape().await;
    assert!(
        metrics.contains("lifecycle_results_writer_stuck 0"),
        "{metrics}"
    );
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gateway_504_after_forwarding_is_unsure_and_fails_over_to_no_one() {
    // The provider sits behind a proxy that forwarded the request, then answered 504: the
    // provider may have the message.
    let fake = FakeApi::start(Reply::new(200, r#"{"id": "ok"}"#)).await;
    fake.rule_times("m-504@", Reply::new(504, "Gateway Time-out"), 1);
    let env = webhook_env(
        &fake,
        Some("file"),
        &[("LIFECYCLE_DISPATCH__RETRY_BASE_MS", "1000".to_owned())],
    );
    let worker = env.start(ALL_ROLES).await;
    let app = worker.app.clone();
    env.publish(&[enrol(&env, "m-504")]).await;
    wait_for("the message sent on its retry", || async {
        (welcome(&app, "m-504").await.0 == "sent").then_some(())
    })
    .await;
    let attempts: Vec<(String, String)> =
        sqlx::query_as("select provider, outcome from delivery_attempts order by id")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        attempts,
        [
            ("webhook".to_owned(), "unsure".to_owned()),
            ("webhook".to_owned(), "sent".to_owned())
        ],
        "no failover after the 504"
    );
    // The file provider never had it; both requests carry the same idempotency key, so the
    // provider can drop the second.
    assert_eq!(std::fs::read_dir(env.outbox.path()).unwrap().count(), 0);
    let keys: Vec<String> = fake
        .requests()
        .iter()
        .map(|r| r.headers["idempotency-key"].to_str().unwrap().to_owned())
        .collect();
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0], keys[1]);
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_huge_or_binary_error_reply_is_stored_short_and_clean() {
    let body = format!(
        "bad \u{0}\u{1}\u{7f} {} ada@example.com",
        "x".repeat(200_000)
    );
    let fake = FakeApi::start(Reply::new(422, &body)).await;
    let env = webhook_env(&fake, None, &[]);
    let worker = env.start(ALL_ROLES).await;
    let app = worker.app.clone();
    env.publish(&[enrol(&env, "m-bin")]).await;
    let (status, _, error) = wait_for("the message failed", || async {
        let w = welcome(&app, "m-bin").await;
        (w.0 == "failed").then_some(w)
    })
    .await;
    assert_eq!(status, "failed");
    let error = error.unwrap();
    assert!(error.chars().count() < 600, "{} characters", error.len());
    assert!(
        error.starts_with("webhook: HTTP 422 Unprocessable Entity: bad x"),
        "{error:.80}"
    );
    assert!(!error.chars().any(char::is_control), "{error:?}");
    worker.stop().await.unwrap();
    env.cleanup().await;
}
