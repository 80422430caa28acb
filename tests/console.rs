//! The marketer's side over real HTTP: the admin API's templates routes with each role and
//! credential, CSRF, limits, validation by line, preview with a real member, test sends
//! through a real SMTP server, publish and rollback seen by dispatch (also in a second worker
//! process), and coupon codes drawn by two planners at once.

mod common;

use common::admin::{self, ADMIN_TOKEN, Auth, Client};
use common::{Serve, SmtpSink, count, enrolled, parse_mail, wait_for};
use lifecycle::testkit::app::Roles;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// Everything but the scheduler, in this process.
const SERVING: Roles = Roles {
    ingest: true,
    dispatch: true,
    schedule: false,
    http: true,
};

/// A Korean member's enrolment.
fn korean(env: &common::TestEnv, n: usize) -> String {
    enrolled(
        &format!("{}-ko-{n}", env.tag),
        &format!("ko-{n}"),
        Some(&format!("ko{n}@example.com")),
        None,
        "ko-KR",
        "지우",
        (true, false),
    )
}

/// The subjects of the mails the sink has for `to`.
fn subjects_to(sink: &SmtpSink, to: &str) -> Vec<String> {
    sink.messages()
        .iter()
        .map(|m| parse_mail(m))
        .filter(|m| m.to == to)
        .map(|m| m.subject)
        .collect()
}

#[tokio::test]
async fn every_route_checks_credentials_roles_csrf_and_size() {
    let sink = SmtpSink::start(&[]);
    let (env, base) = admin::env(&sink, &[]);
    let worker = env.start(SERVING).await;
    let api = Client::new(&base);
    let (password, marketer) = admin::add_user(&env, "mia", "marketer");
    let (_, ops) = admin::add_user(&env, "otto", "ops");

    // The OpenAPI document is open and describes every route.
    let (status, doc) = api
        .json(Method::GET, "/api/openapi.json", Auth::None, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    for path in [
        "/api/templates",
        "/api/templates/{trigger}/{locale}",
        "/api/templates/{trigger}/{locale}/draft",
        "/api/templates/{trigger}/{locale}/preview",
        "/api/templates/{trigger}/{locale}/test-send",
        "/api/templates/{trigger}/{locale}/publish",
        "/api/messages/retry",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} in the OpenAPI document"
        );
    }
    assert!(doc["components"]["schemas"]["Preview"].is_object());

    let draft = json!({"files": {"sms.hbs": "{{shop_name}}: 환영합니다 {{first_name}}! STOP"}});
    let routes: Vec<(Method, &str, Option<Value>, StatusCode)> = vec![
        (Method::GET, "/api/templates", None, StatusCode::OK),
        (
            Method::GET,
            "/api/templates/welcome/ko",
            None,
            StatusCode::OK,
        ),
        (
            Method::PUT,
            "/api/templates/welcome/ko/draft",
            Some(draft.clone()),
            StatusCode::OK,
        ),
        (
            Method::POST,
            "/api/templates/welcome/ko/preview",
            Some(json!({})),
            StatusCode::OK,
        ),
        (
            Method::POST,
            "/api/templates/welcome/ko/test-send",
            Some(json!({"email": "qa@example.com"})),
            StatusCode::ACCEPTED,
        ),
        (
            Method::POST,
            "/api/templates/welcome/ko/publish",
            Some(json!({"version": 0})),
            StatusCode::OK,
        ),
    ];
    for (method, path, body, ok) in &routes {
        for auth in [Auth::None, Auth::Bearer("lc_wrong"), Auth::Bearer("")] {
            let (status, answer) = api.json(method.clone(), path, auth, body.as_ref()).await;
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{method} {path}: {answer}"
            );
            assert!(answer["error"].is_string(), "{answer}");
        }
        for token in [marketer.as_str(), ops.as_str(), ADMIN_TOKEN] {
            let (status, answer) = api
                .json(method.clone(), path, Auth::Bearer(token), body.as_ref())
                .await;
            assert_eq!(status, *ok, "{method} {path}: {answer}");
        }
    }
    // The three test sends (no member: a typed address) arrive.
    wait_for("three test mails", || async {
        (subjects_to(&sink, "qa@example.com").len() == 3).then_some(())
    })
    .await;
    // Requeueing failed messages is ops' work.
    let retry = json!({"ids": [1]});
    let (status, answer) = api
        .json(
            Method::POST,
            "/api/messages/retry",
            Auth::Bearer(&marketer),
            Some(&retry),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    let (status, answer) = api
        .json(
            Method::POST,
            "/api/messages/retry",
            Auth::Bearer(&ops),
            Some(&retry),
        )
        .await;
    assert_eq!(
        (status, answer["requeued"].as_u64()),
        (StatusCode::OK, Some(0))
    );

    // Over 1 MiB: 413, nothing saved.
    let versions_before = count(&worker.app, "select count(*) from template_versions").await;
    let big = json!({"files": {"sms.hbs": "x".repeat(1024 * 1024 + 1)}});
    let (status, _) = api
        .json(
            Method::PUT,
            "/api/templates/welcome/ko/draft",
            Auth::Bearer(&ops),
            Some(&big),
        )
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        count(&worker.app, "select count(*) from template_versions").await,
        versions_before
    );
    // An unknown trigger or a malformed locale: 404 with why.
    let (status, answer) = api
        .json(
            Method::GET,
            "/api/templates/nope/ko",
            Auth::Bearer(&ops),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        answer["error"].as_str().unwrap().contains("welcome"),
        "{answer}"
    );

    // The console's session works for the API, with the CSRF header on changes only.
    let (status, session) = api.login("mia", &password).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (cookie, csrf) = session.unwrap();
    let (status, _) = api
        .json(
            Method::GET,
            "/api/templates",
            Auth::Session {
                cookie: &cookie,
                csrf: None,
            },
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let path = "/api/templates/welcome/ko/draft";
    for (sent, expected) in [
        (None, StatusCode::FORBIDDEN),
        (Some("forged"), StatusCode::FORBIDDEN),
        (Some(csrf.as_str()), StatusCode::OK),
    ] {
        let (status, answer) = api
            .json(
                Method::PUT,
                path,
                Auth::Session {
                    cookie: &cookie,
                    csrf: sent,
                },
                Some(&draft),
            )
            .await;
        assert_eq!(status, expected, "{sent:?}: {answer}");
    }
    // A console form without the session's token is refused too.
    let (status, _, page) = api
        .form(
            "/console/templates/welcome/ko/publish",
            &cookie,
            &[("csrf", "forged"), ("version", "0")],
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{page}");

    // Logging out ends the session.
    let (status, location, _) = api
        .form("/console/logout", &cookie, &[("csrf", &csrf)])
        .await;
    assert_eq!(
        (status, location.as_str()),
        (StatusCode::SEE_OTHER, "/console/login")
    );
    let (status, _) = api
        .json(
            Method::GET,
            "/api/templates",
            Auth::Session {
                cookie: &cookie,
                csrf: None,
            },
            None,
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = api.page("/console/templates", &cookie).await;
    assert_eq!(
        status,
        StatusCode::SEE_OTHER,
        "the console sends them to the login form"
    );

    // Failed logins are limited per user: the sixth try is refused even with the password.
    for _ in 0..5 {
        let (status, session) = api.login("mia", "wrong password").await;
        assert_eq!(
            (status, session.is_none()),
            (StatusCode::UNAUTHORIZED, true)
        );
    }
    let (status, session) = api.login("mia", &password).await;
    assert_eq!(
        (status, session.is_none()),
        (StatusCode::TOO_MANY_REQUESTS, true)
    );

    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_draft_is_validated_previewed_test_sent_published_and_rolled_back() {
    let sink = SmtpSink::start(&[]);
    let (env, base) = admin::env(&sink, &[]);
    let worker = env.start(SERVING).await;
    let app = worker.app.clone();
    let api = Client::new(&base);
    let (_, token) = admin::add_user_with(&env, "mia", "marketer", &["--email", "mia@example.com"]);
    let auth = Auth::Bearer(&token);
    let ko = "/api/templates/welcome/ko";

    // A syntax error on line 2 of the subject: 422 by file and line; nothing saved.
    let broken =
        json!({"files": {"email.subject.hbs": "환영합니다\n{{#if first_name}}{{first_name}}"}});
    let (status, answer) = api
        .json(Method::PUT, &format!("{ko}/draft"), auth, Some(&broken))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(answer["errors"][0]["file"], "email.subject.hbs", "{answer}");
    assert!(
        answer["errors"][0]["line"].as_u64().is_some_and(|l| l >= 2),
        "{answer}"
    );
    // An unknown variable: found by rendering the sample context, by line.
    let unknown = json!({"files": {"sms.hbs": "안녕\n{{voucher}} STOP"}});
    let (status, answer) = api
        .json(Method::PUT, &format!("{ko}/draft"), auth, Some(&unknown))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(
        (&answer["errors"][0]["file"], &answer["errors"][0]["line"]),
        (&json!("sms.hbs"), &json!(2)),
        "{answer}"
    );
    let (_, versions) = api.json(Method::GET, ko, auth, None).await;
    assert_eq!(versions.as_array().unwrap().len(), 1, "{versions}");
    assert_eq!(
        (&versions[0]["version"], &versions[0]["state"]),
        (&json!(0), &json!("published"))
    );

    // Preview unsaved files with a real member's ledger: their balance and what is ahead.
    env.publish(&[korean(&env, 1)]).await;
    wait_for("the first welcome", || async {
        (subjects_to(&sink, "ko1@example.com").len() == 1).then_some(())
    })
    .await;
    let old_subject = subjects_to(&sink, "ko1@example.com").remove(0);
    assert!(old_subject.contains("지우"), "{old_subject}");
    let new_subject = "새 소식: {{first_name}}님, {{balance}}포인트가 있어요";
    let files = json!({"email.subject.hbs": new_subject});
    let (status, preview) = api
        .json(
            Method::POST,
            &format!("{ko}/preview"),
            auth,
            Some(&json!({"files": files, "member_id": "ko-1"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{preview}");
    assert_eq!(
        preview["email"]["subject"],
        "새 소식: 지우님, 100포인트가 있어요"
    );
    assert!(
        preview["email"]["html"]
            .as_str()
            .unwrap()
            .contains("<html lang=\"ko\""),
        "{preview}"
    );
    assert!(
        preview["email"]["text"]
            .as_str()
            .unwrap()
            .contains("Silver 등급까지 500포인트"),
        "{preview}"
    );
    assert_eq!(preview["sms"]["encoding"], "UCS-2");
    assert!(preview["sms"]["segments"].as_u64().unwrap() >= 1);
    // Without a member: the sample context.
    let (_, sample) = api
        .json(
            Method::POST,
            &format!("{ko}/preview"),
            auth,
            Some(&json!({"files": files})),
        )
        .await;
    assert!(
        sample["email"]["subject"]
            .as_str()
            .unwrap()
            .contains("Ada <script>"),
        "{sample}"
    );
    let (status, _) = api
        .json(
            Method::POST,
            &format!("{ko}/preview"),
            auth,
            Some(&json!({"member_id": "nobody"})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Saved as the draft: the published version is untouched.
    let (status, saved) = api
        .json(
            Method::PUT,
            &format!("{ko}/draft"),
            auth,
            Some(&json!({"files": files})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{saved}");
    let draft = saved["version"].as_i64().unwrap();
    assert_eq!(draft, 1);
    let (_, pairs) = api.json(Method::GET, "/api/templates", auth, None).await;
    let pair = pairs
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["trigger"] == "welcome" && p["locale"] == "ko")
        .unwrap();
    assert_eq!((&pair["published"], &pair["draft"]), (&json!(0), &json!(1)));

    // A test send of the draft with the member's data, to the marketer's own address.
    let (status, sent) = api
        .json(
            Method::POST,
            &format!("{ko}/test-send"),
            auth,
            Some(&json!({"member_id": "ko-1", "email": "mia@example.com"})),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{sent}");
    let test_subject = wait_for("the test mail", || async {
        subjects_to(&sink, "mia@example.com").pop()
    })
    .await;
    assert_eq!(test_subject, "새 소식: 지우님, 100포인트가 있어요");
    let id = sent["message_ids"][0].as_i64().unwrap();
    let (test, version): (bool, Option<i32>) =
        sqlx::query_as("select test, template_version from messages where id = $1")
            .bind(id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!((test, version), (true, Some(1)));

    // Until published, members get the old text.
    env.publish(&[korean(&env, 2)]).await;
    let second = wait_for("the second welcome", || async {
        subjects_to(&sink, "ko2@example.com").pop()
    })
    .await;
    assert!(!second.starts_with("새 소식"), "{second}");

    // Published: the next welcome uses it, and records its version.
    let (status, _) = api
        .json(
            Method::POST,
            &format!("{ko}/publish"),
            auth,
            Some(&json!({"version": draft})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    env.publish(&[korean(&env, 3)]).await;
    let third = wait_for("the third welcome", || async {
        subjects_to(&sink, "ko3@example.com").pop()
    })
    .await;
    assert_eq!(third, "새 소식: 지우님, 100포인트가 있어요");
    // The version each member's welcome recorded, once its result is recorded (the mail can
    // reach the sink a moment before).
    let versions_of = |member: &'static str| {
        let pool = app.pool.clone();
        async move {
            wait_for("the welcome recorded as sent", || async {
                sqlx::query_scalar::<_, Option<i32>>(
                    "select template_version from messages
                     where member_id = $1 and not test and status = 'sent'",
                )
                .bind(member)
                .fetch_optional(&pool)
                .await
                .unwrap()
            })
            .await
        }
    };
    assert_eq!(versions_of("ko-2").await, Some(0));
    assert_eq!(versions_of("ko-3").await, Some(1));

    // Rolled back to the shipped text (version 0): the next welcome is the old one again.
    let (status, _) = api
        .json(
            Method::POST,
            &format!("{ko}/publish"),
            auth,
            Some(&json!({"version": 0})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    env.publish(&[korean(&env, 4)]).await;
    let fourth = wait_for("the fourth welcome", || async {
        subjects_to(&sink, "ko4@example.com").pop()
    })
    .await;
    assert_eq!(fourth, old_subject);
    assert_eq!(versions_of("ko-4").await, Some(0));
    let (_, versions) = api.json(Method::GET, ko, auth, None).await;
    let states: Vec<(i64, &str, &str)> = versions
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["version"].as_i64().unwrap(),
                v["state"].as_str().unwrap(),
                v["author"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        states,
        [(1, "archived", "mia"), (0, "published", "lifecycle")]
    );

    // The test send took no trigger's key: every member got exactly one welcome, the tester
    // one test, and none of it counts as the trigger's send.
    assert_eq!(
        count(
            &app,
            "select count(*) from messages where trigger = 'welcome' and not test"
        )
        .await,
        4
    );
    assert_eq!(
        count(
            &app,
            "select count(*) from messages where test and dedupe_key like 'welcome:%'"
        )
        .await,
        0
    );
    assert_eq!(sink.messages().len(), 5);

    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_publish_is_seen_by_a_second_worker_process_without_restart() {
    let sink = SmtpSink::start(&[]);
    let (env, base) = admin::env(&sink, &[]);
    // This process serves the API only; a `lifecycle serve` child consumes and sends.
    let worker = env.start(common::HTTP_ONLY).await;
    let mut child = Serve::start(&env);
    let api = Client::new(&base);
    let auth = Auth::Bearer(ADMIN_TOKEN);
    env.publish(&[korean(&env, 1)]).await;
    wait_for("the child's first welcome", || async {
        subjects_to(&sink, "ko1@example.com").pop()
    })
    .await;

    let files = json!({"files": {"email.subject.hbs": "두 번째 프로세스 {{first_name}}"}});
    let (_, saved) = api
        .json(
            Method::PUT,
            "/api/templates/welcome/ko/draft",
            auth,
            Some(&files),
        )
        .await;
    let (status, _) = api
        .json(
            Method::POST,
            "/api/templates/welcome/ko/publish",
            auth,
            Some(&json!({"version": saved["version"]})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    // Within the replicas' reload interval (a second), without restarting the child.
    let published = std::time::Instant::now();
    let mut n = 2;
    let subject = loop {
        env.publish(&[korean(&env, n)]).await;
        let to = format!("ko{n}@example.com");
        let subject = wait_for("the child's welcome", || async {
            subjects_to(&sink, &to).pop()
        })
        .await;
        if subject.starts_with("두 번째") || published.elapsed().as_secs() > 10 {
            break subject;
        }
        n += 1;
    };
    assert_eq!(subject, "두 번째 프로세스 지우");
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "the child never restarted"
    );
    child.terminate().await;
    worker.stop().await.unwrap();
    env.cleanup().await;
}
