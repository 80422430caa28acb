//! Ops over real HTTP and the real CLI: a provider outage seen in the API and /metrics, then
//! retried once the provider is back, every message sent once; a dead letter replayed after
//! its cause is fixed, applied once; queues, members, providers, with each role.

mod common;

use std::time::Instant;

use common::admin::{self, ADMIN_TOKEN, Auth, Client};
use common::fake_api::{FakeApi, Reply};
use common::{SmtpSink, cli, count, enrolled, enrolments, wait_for};
use lifecycle::testkit::app::Roles;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const SERVING: Roles = Roles {
    ingest: true,
    dispatch: true,
    schedule: false,
    http: true,
};

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_provider_outage_is_seen_then_retried_and_every_message_sent_once() {
    let fake = FakeApi::start(Reply::new(503, "maintenance")).await;
    let sink = SmtpSink::start(&[]);
    let (env, base) = admin::sendgrid_env(
        &sink,
        &fake.url,
        &[
            ("LIFECYCLE_DISPATCH__MAX_ATTEMPTS", "2".into()),
            ("LIFECYCLE_DISPATCH__RETRY_BASE_MS", "50".into()),
            ("LIFECYCLE_DISPATCH__BREAKER_FAILURES", "3".into()),
            ("LIFECYCLE_DISPATCH__BREAKER_COOLDOWN_MS", "300".into()),
        ],
    );
    let worker = env.start(SERVING).await;
    let app = worker.app.clone();
    let api = Client::new(&base);
    let (_, marketer) = admin::add_user(&env, "mia", "marketer");
    let ops = Auth::Bearer(ADMIN_TOKEN);
    env.publish(&enrolments(&env, 5)).await;
    wait_for("five welcomes failed", || async {
        (count(
            &app,
            "select count(*) from messages where status = 'failed'",
        )
        .await
            == 5)
            .then_some(())
    })
    .await;

    // The API lists them, with the provider's error in each attempt.
    let (status, failed) = api
        .json(
            Method::GET,
            "/api/messages?status=failed&trigger=welcome",
            ops,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{failed}");
    let listed = failed["messages"].as_array().unwrap();
    assert_eq!(listed.len(), 5);
    assert!(
        listed[0]["recipient"]
            .as_str()
            .unwrap()
            .ends_with("@example.com")
    );
    let id = listed[0]["id"].as_i64().unwrap();
    let (_, detail) = api
        .json(Method::GET, &format!("/api/messages/{id}"), ops, None)
        .await;
    let attempts = detail["attempts_made"].as_array().unwrap();
    assert!(!attempts.is_empty(), "{detail}");
    assert!(
        attempts.iter().all(|a| a["provider"] == "sendgrid"),
        "{detail}"
    );
    assert!(
        attempts[0]["error"].as_str().unwrap().contains("503"),
        "{detail}"
    );
    assert!(
        detail["content"]["subject"]
            .as_str()
            .unwrap()
            .contains("Ada"),
        "rendered content: {detail}"
    );
    assert_eq!(detail["template_version"], 0);
    // A marketer reads them too, with the addresses masked.
    let (_, masked) = api
        .json(
            Method::GET,
            "/api/messages?status=failed",
            Auth::Bearer(&marketer),
            None,
        )
        .await;
    let to = masked["messages"][0]["recipient"].as_str().unwrap();
    assert!(to.contains('*') && !to.starts_with("m0@"), "{to}");
    // Paging: two by two, by cursor.
    let (_, page) = api
        .json(
            Method::GET,
            "/api/messages?status=failed&limit=2",
            ops,
            None,
        )
        .await;
    let next = page["next"].as_i64().unwrap();
    let (_, rest) = api
        .json(
            Method::GET,
            &format!("/api/messages?status=failed&limit=10&cursor={next}"),
            ops,
            None,
        )
        .await;
    assert_eq!(rest["messages"].as_array().unwrap().len(), 3);
    assert!(rest["next"].is_null());

    // /metrics: the failures by provider, the circuit open.
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("lifecycle_messages_total{")
                && l.contains("status=\"failed\"")
                && l.contains("provider=\"sendgrid\"")),
        "{metrics}"
    );
    assert!(
        metrics.contains("lifecycle_provider_circuit_open{provider=\"sendgrid\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("lifecycle_provider_latency_seconds_bucket{"),
        "{metrics}"
    );
    let (_, providers) = api.json(Method::GET, "/api/providers", ops, None).await;
    let sendgrid = providers
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["provider"] == "sendgrid")
        .unwrap();
    assert_eq!(sendgrid["circuit"], "open", "{providers}");
    assert!(sendgrid["failed"].as_i64().unwrap() >= 5, "{providers}");
    let (status, _) = api
        .json(Method::GET, "/api/providers", Auth::Bearer(&marketer), None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // The CLI sees the same.
    let lines = json_lines(&cli(&env, &["deliveries", "--status", "failed", "--json"]));
    assert_eq!(lines.len(), 5);
    assert!(cli(&env, &["deliveries", "--status", "failed"]).contains("welcome"));

    // The provider is back; ops retry the failed set with one command.
    fake.set_fallback(Reply::new(202, "").header("X-Message-Id", "sg-back"));
    let recovered = Instant::now();
    let printed = cli(
        &env,
        &["deliveries", "retry", "--failed", "--trigger", "welcome"],
    );
    assert_eq!(printed.trim(), "5 failed messages queued again.");
    wait_for("every message sent", || async {
        (count(&app, "select count(*) from messages where status = 'sent'").await == 5)
            .then_some(())
    })
    .await;
    // Once each: one accepted attempt per message, five calls since the recovery.
    assert_eq!(
        count(
            &app,
            "select count(*) from (select message_id from delivery_attempts
             where outcome = 'sent' group by message_id having count(*) = 1) as once",
        )
        .await,
        5
    );
    let calls = fake.requests().iter().filter(|r| r.at >= recovered).count();
    assert_eq!(calls, 5, "one call per message after the recovery");
    assert!(cli(&env, &["deliveries", "retry", "--failed"]).starts_with("0 failed"));
    // A message that is not failed is not requeued by id either.
    assert!(cli(&env, &["deliveries", "retry", &id.to_string()]).starts_with("0 failed"));
    let (_, queues) = api.json(Method::GET, "/api/queues", ops, None).await;
    assert!(
        queues["rates"]["messages_sent"].as_f64().unwrap() >= 1.0,
        "{queues}"
    );

    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_is_replayed_once_its_cause_is_fixed() {
    let sink = SmtpSink::start(&[]);
    let (env, base) = admin::env(
        &sink,
        &[
            ("LIFECYCLE_INGEST__MAX_RETRIES", "2".into()),
            ("LIFECYCLE_INGEST__RETRY_DELAY_MS", "100".into()),
        ],
    );
    let worker = env.start(SERVING).await;
    let app = worker.app.clone();
    let api = Client::new(&base);
    let (_, marketer) = admin::add_user(&env, "mia", "marketer");
    let ops = Auth::Bearer(ADMIN_TOKEN);

    // An order for a member not enrolled yet gives up and is dead-lettered; a malformed event
    // is dead-lettered at once.
    let order = json!({"specversion": "1.0", "id": format!("{}-order", env.tag), "source": "test",
        "type": "order.placed", "time": "2026-11-22T10:00:00Z",
        "data": {"order_id": "o-1", "member_id": "m-late", "total": 12000, "currency": "USD", "items": []}})
    .to_string();
    env.publish(std::slice::from_ref(&order)).await;
    env.publish_raw("order.placed", b"{not json").await;
    let dead = wait_for("two dead letters stored", || async {
        let (_, listed) = api.json(Method::GET, "/api/dead-letters", ops, None).await;
        let letters = listed["dead_letters"].as_array()?.clone();
        (letters.len() == 2).then_some(letters)
    })
    .await;
    let malformed = dead.iter().find(|d| d["event_id"].is_null()).unwrap();
    assert_eq!(malformed["body"], "{not json");
    assert!(
        malformed["reason"].as_str().unwrap().contains("not JSON"),
        "{malformed}"
    );
    let early = dead
        .iter()
        .find(|d| d["type"] == "order.placed" && !d["event_id"].is_null())
        .unwrap();
    assert!(
        early["reason"]
            .as_str()
            .unwrap()
            .contains("gave up after 2 retries"),
        "{early}"
    );
    assert_eq!(early["body"].as_str().unwrap(), order);
    // Searched by reason; ops' only.
    let (_, found) = api
        .json(
            Method::GET,
            "/api/dead-letters?reason=not%20json",
            ops,
            None,
        )
        .await;
    assert_eq!(found["dead_letters"].as_array().unwrap().len(), 1);
    let (status, _) = api
        .json(
            Method::GET,
            "/api/dead-letters",
            Auth::Bearer(&marketer),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = api
        .json(
            Method::POST,
            "/api/dead-letters/replay",
            Auth::Bearer(&marketer),
            Some(&json!({"all": true})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let lines = json_lines(&cli(&env, &["dead-letters", "--json"]));
    assert_eq!(lines.len(), 2);

    // The member enrols; ops replay the order: its points are applied once.
    env.publish(&[enrolled(
        &format!("{}-enrol", env.tag),
        "m-late",
        Some("late@example.com"),
        None,
        "en",
        "Lee",
        (true, false),
    )])
    .await;
    wait_for("the member enrolled", || async {
        (count(
            &app,
            "select count(*) from members where member_id = 'm-late'",
        )
        .await
            == 1)
            .then_some(())
    })
    .await;
    let early_id = early["id"].as_i64().unwrap();
    let (status, replayed) = api
        .json(
            Method::POST,
            "/api/dead-letters/replay",
            ops,
            Some(&json!({"ids": [early_id]})),
        )
        .await;
    assert_eq!((status, &replayed["replayed"]), (StatusCode::OK, &json!(1)));
    let balance =
        "select coalesce(sum(points), 0)::bigint from point_entries where member_id = 'm-late'";
    wait_for("the order's points applied", || async {
        (count(&app, balance).await == 100 + 120).then_some(())
    })
    .await;
    // A second replay (from the CLI) changes nothing: the inbox knows the event.
    let printed = cli(&env, &["dead-letters", "replay", &early_id.to_string()]);
    assert_eq!(printed.trim(), "1 dead letters replayed.");
    wait_for("the second replay seen as a duplicate", || async {
        let m = &worker.app.metrics;
        (lifecycle::testkit::metrics::Metrics::get(&m.events_duplicate) >= 1).then_some(())
    })
    .await;
    assert_eq!(count(&app, balance).await, 220);
    assert_eq!(
        count(
            &app,
            "select count(*) from point_entries where kind = 'order'"
        )
        .await,
        1
    );
    let (_, listed) = api.json(Method::GET, "/api/dead-letters", ops, None).await;
    let again = listed["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == early_id)
        .unwrap()
        .clone();
    assert_eq!(again["replays"], 2);
    assert!(
        again["replayed_by"].as_str().unwrap().ends_with("(cli)"),
        "who replayed it last: {again}"
    );
    let (status, _) = api
        .json(
            Method::POST,
            "/api/dead-letters/archive",
            Auth::Bearer(&marketer),
            Some(&json!({"all": true})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Archived, it leaves the list.
    let (_, archived) = api
        .json(
            Method::POST,
            "/api/dead-letters/archive",
            ops,
            Some(&json!({"ids": [early_id]})),
        )
        .await;
    assert_eq!(archived["archived"], 1);
    let (_, listed) = api.json(Method::GET, "/api/dead-letters", ops, None).await;
    assert_eq!(listed["dead_letters"].as_array().unwrap().len(), 1);
    let (_, everything) = api
        .json(Method::GET, "/api/dead-letters?archived=true", ops, None)
        .await;
    assert_eq!(everything["dead_letters"].as_array().unwrap().len(), 2);
    // The malformed one replays too (`--all`), and is refused again, with its reason.
    assert_eq!(
        cli(&env, &["dead-letters", "replay", "--all"]).trim(),
        "1 dead letters replayed."
    );
    wait_for("the malformed event dead-lettered again", || async {
        (count(&app, "select count(*) from dead_letters").await == 3).then_some(())
    })
    .await;
    assert_eq!(
        cli(&env, &["dead-letters", "archive", "--all"]).trim(),
        "2 dead letters archived."
    );

    // The console's page shows 200 letters and links to the older ones, search kept.
    sqlx::query(
        "insert into dead_letters (event_type, routing_key, reason, headers, body)
         select 'order.placed', 'order.placed', 'bulk ' || i, '{}', 'x'
         from generate_series(1, 201) i",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let (password, _) = admin::add_user(&env, "oona", "ops");
    let (_, session) = api.login("oona", &password).await;
    let (cookie, _) = session.expect("ops logs in");
    let (status, first) = api.page("/console/dead-letters?reason=bulk", &cookie).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        first.matches("<tr>").count() - 1,
        200,
        "200 rows and the header"
    );
    let at = first
        .find("Older dead letters")
        .expect("a link to the older letters");
    let href = first[..at].rfind("href=\"").expect("the link's address") + "href=\"".len();
    let next = first[href..at]
        .split('"')
        .next()
        .unwrap()
        .replace("&#38;", "&");
    assert!(next.contains("reason=bulk"), "{next}");
    let (status, older) = api.page(&next, &cookie).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(older.matches("<tr>").count() - 1, 1, "the 201st ({next})");
    assert!(
        older.contains("bulk 1<"),
        "the oldest is on the second page"
    );
    assert!(!older.contains("Older dead letters"));

    // Queues: the input queue has its consumers; the outbox by status.
    let (status, queues) = api.json(Method::GET, "/api/queues", ops, None).await;
    assert_eq!(status, StatusCode::OK, "{queues}");
    assert!(
        queues["events"]["consumers"].as_u64().unwrap() >= 1,
        "{queues}"
    );
    assert_eq!(
        queues["dead"]["messages"], 0,
        "the store took them all: {queues}"
    );
    assert!(queues["outbox"]["failed"].is_i64(), "{queues}");
    let cli_queues: Value = serde_json::from_str(cli(&env, &["queues", "--json"]).trim()).unwrap();
    assert_eq!(cli_queues["dead"]["messages"], 0);
    assert!(cli(&env, &["queues"]).contains("events"));
    let (status, _) = api
        .json(Method::GET, "/api/queues", Auth::Bearer(&marketer), None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // The member: masked for a marketer, whole for ops; points, lots, journal, messages.
    let (_, seen) = api
        .json(
            Method::GET,
            "/api/members/m-late",
            Auth::Bearer(&marketer),
            None,
        )
        .await;
    assert_eq!(seen["balance"], 220, "{seen}");
    assert_ne!(seen["email"], "late@example.com");
    assert!(seen["email"].as_str().unwrap().contains('*'));
    assert_eq!(seen["lots"].as_array().unwrap().len(), 2, "{seen}");
    assert_eq!(seen["journal"][0]["kind"], "order", "{seen}");
    let (_, whole) = api
        .json(Method::GET, "/api/members/m-late", ops, None)
        .await;
    assert_eq!(whole["email"], "late@example.com");
    assert_eq!(whole["tier"], "Bronze");
    assert_eq!(whole["tier_points"], 120);
    assert!(!whole["messages"].as_array().unwrap().is_empty());
    let (status, _) = api
        .json(Method::GET, "/api/members/nobody", ops, None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // A suppression lifted by ops, with a reason; a marketer may not.
    sqlx::query(
        "insert into suppressions (channel, address, reason, source) values ('email', 'late@example.com', 'bounced', 'smtp')",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let lift = json!({"channel": "email", "reason": "mailbox fixed, confirmed by phone"});
    let path = "/api/members/m-late/suppressions/lift";
    let (status, _) = api
        .json(Method::POST, path, Auth::Bearer(&marketer), Some(&lift))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (_, shown) = api
        .json(Method::GET, "/api/members/m-late", ops, None)
        .await;
    assert_eq!(shown["suppressions"][0]["reason"], "bounced");
    // A reason too long, or holding a NUL, is refused with a clear error and lifts nothing.
    for (reason, why) in [
        ("a@b.co ".repeat(100), "too long"),
        ("fixed\u{0}".to_owned(), "a NUL"),
    ] {
        let bad = json!({"channel": "email", "reason": reason});
        let (status, body) = api.json(Method::POST, path, ops, Some(&bad)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{why}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains("at most 500"),
            "{body}"
        );
    }
    assert_eq!(count(&app, "select count(*) from suppressions").await, 1);
    let (status, lifted) = api.json(Method::POST, path, ops, Some(&lift)).await;
    assert_eq!((status, &lifted["lifted"]), (StatusCode::OK, &json!(true)));
    assert_eq!(count(&app, "select count(*) from suppressions").await, 0);
    let (reason, by): (String, String) = sqlx::query_as(
        "select reason, lifted_by from suppression_lifts where member_id = 'm-late'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        (reason.as_str(), by.as_str()),
        ("mailbox fixed, confirmed by phone", "admin")
    );

    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// `lifecycle_outbox_due_messages`, what KEDA scales dispatch on, counts the pending messages
/// due now and not those waiting for their time (quiet hours, a retry's backoff), which
/// `lifecycle_outbox_messages{status="pending"}` counts too.
#[tokio::test]
async fn the_due_gauge_counts_only_messages_due_now() {
    let sink = SmtpSink::start(&[]);
    let (env, base) = admin::env(&sink, &[]);
    // Nothing dispatches: the welcomes stay pending.
    let worker = env
        .start(Roles {
            dispatch: false,
            ..SERVING
        })
        .await;
    let app = worker.app.clone();
    env.publish(&enrolments(&env, 3)).await;
    wait_for("three welcomes pending", || async {
        (count(
            &app,
            "select count(*) from messages where status = 'pending'",
        )
        .await
            == 3)
            .then_some(())
    })
    .await;
    let held = sqlx::query(
        "update messages set due_at = now() + interval '1 day'
         where id = (select min(id) from messages)",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    assert_eq!(held.rows_affected(), 1);
    wait_for("the gauges sampled after the hold", || async {
        let metrics = reqwest::get(format!("{base}/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        (metrics.contains("lifecycle_outbox_due_messages 2")
            && metrics.contains("lifecycle_outbox_messages{status=\"pending\"} 3"))
        .then_some(())
    })
    .await;
    worker.stop().await.unwrap();
    env.cleanup().await;
}
