//! Events back to the platform: each change lifecycle makes is published once to the
//! notifications exchange, read here from a queue bound to it as a platform would bind one;
//! a notification committed before a crash is published after the restart, once; and the
//! same notifications are POSTed signed as Standard Webhooks, retried through a 503.

mod common;

use std::collections::BTreeMap;
use std::process::Stdio;

use aws_lc_rs::hmac;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::fake_api::{FakeApi, Reply};
use common::{
    SendgridSigner, Serve, TestEnv, count, free_port, publish_in_order, twilio_post, wait_for,
};
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lifecycle::testkit::app::{App, Roles};
use lifecycle::testkit::dispatch::{Dispatcher, Step};
use lifecycle::testkit::scheduler::{Job, run_scan};
use lifecycle::testkit::worker::Worker;
use serde_json::{Value, json};

/// Standard Webhooks' test secret (any 24 bytes would do).
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Consume events, serve HTTP and run the scheduler role (which runs the notifier); the test
/// dispatches step by step.
const NO_DISPATCH: Roles = Roles {
    ingest: true,
    dispatch: false,
    schedule: true,
    http: true,
};

fn http_env(extra: &[(&str, String)]) -> (TestEnv, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut vars = vec![
        ("LIFECYCLE_HTTP_ADDR", addr.clone()),
        ("LIFECYCLE_PUBLIC_URL", format!("http://{addr}")),
        ("LIFECYCLE_INGEST__CONSUMERS", "1".to_owned()),
        ("LIFECYCLE_NOTIFICATIONS__POLL_INTERVAL_MS", "50".to_owned()),
    ];
    vars.extend(extra.iter().cloned());
    (TestEnv::new(&vars), format!("http://{addr}"))
}

fn event(id: String, kind: &str, data: Value) -> String {
    json!({"specversion": "1.0", "id": id, "source": "test", "type": kind, "data": data})
        .to_string()
}

fn enrol(id: String, member: &str, phone: &str, email: bool, sms: bool) -> String {
    event(
        id,
        "member.enrolled",
        json!({"member_id": member, "email": format!("{member}@example.com"), "phone": phone,
               "first_name": "Ada", "locale": "en", "timezone": "UTC",
               "consent": {"email": email, "sms": sms}}),
    )
}

async fn dispatch_all(app: &App) {
    let dispatcher = Dispatcher::new(app.clone()).unwrap();
    while dispatcher.try_execute_once().await.unwrap() != Step::Idle {}
}

/// A queue bound to the test's notifications exchange with `#`, as a platform binds one.
struct Subscriber {
    _connection: lapin::Connection,
    channel: lapin::Channel,
    queue: String,
}

/// A notification as the subscriber got it: the CloudEvent and the message's properties.
#[derive(Debug, Clone)]
struct Got {
    event: Value,
    routing_key: String,
    message_id: String,
}

impl Got {
    fn kind(&self) -> &str {
        self.event["type"].as_str().unwrap()
    }

    fn member(&self) -> &str {
        self.event["data"]["member_id"].as_str().unwrap()
    }
}

impl Subscriber {
    async fn bind(env: &TestEnv) -> Subscriber {
        let settings = &env.settings;
        let connection = lifecycle::testkit::amqp::connect(&settings.amqp_url, "test")
            .await
            .unwrap();
        lifecycle::testkit::amqp::declare_topology(&connection, settings)
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        let queue = format!("{}.platform", env.tag);
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .queue_bind(
                queue.as_str().into(),
                settings.notifications_exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        Subscriber {
            _connection: connection,
            channel,
            queue,
        }
    }

    /// Once every recorded notification is published (confirmed, so in the queue), and at
    /// least `at_least` are, everything the queue holds.
    async fn drain(&self, app: &App, at_least: i64) -> Vec<Got> {
        wait_for(&format!("{at_least} notifications published"), || async {
            let recorded = count(app, "select count(*) from notifications").await;
            let waiting = count(app, "select count(*) from notifications where amqp_pending").await;
            (recorded >= at_least && waiting == 0).then_some(())
        })
        .await;
        let mut got = Vec::new();
        while let Some(message) = self
            .channel
            .basic_get(self.queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            let properties = &message.delivery.properties;
            assert_eq!(
                properties.content_type().as_ref().map(|c| c.as_str()),
                Some("application/cloudevents+json")
            );
            assert_eq!(*properties.delivery_mode(), Some(2), "persistent");
            let body = String::from_utf8(message.delivery.data.clone()).unwrap();
            // Never an address or a phone number.
            assert!(
                !body.contains("@example.com") && !body.contains("+1415"),
                "{body}"
            );
            got.push(Got {
                event: serde_json::from_str(&body).unwrap(),
                routing_key: message.delivery.routing_key.to_string(),
                message_id: properties
                    .message_id()
                    .as_ref()
                    .map(|m| m.to_string())
                    .unwrap_or_default(),
            });
        }
        let contract = contract();
        for g in &got {
            let schema = contract
                .get(g.kind())
                .unwrap_or_else(|| panic!("docs/asyncapi.yaml has no message {}", g.kind()));
            let errors: Vec<String> = schema
                .iter_errors(&g.event)
                .map(|e| e.to_string())
                .collect();
            assert!(errors.is_empty(), "{}: {errors:?}", g.event);
            assert_eq!(g.routing_key, g.kind(), "routing key = type");
            assert_eq!(g.message_id, g.event["id"].as_str().unwrap());
            assert_eq!(g.event["specversion"], "1.0");
        }
        got
    }
}

/// The payload schema of each notification in `docs/asyncapi.yaml`, by type.
fn contract() -> BTreeMap<String, jsonschema::Validator> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/asyncapi.yaml");
    let document: Value = serde_norway::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    document["components"]["messages"]
        .as_object()
        .unwrap()
        .values()
        .filter(|m| m["payload"]["properties"]["id"]["pattern"] == "^ntf-[0-9]+$")
        .map(|m| {
            let name = m["name"].as_str().unwrap().to_owned();
            (name, jsonschema::validator_for(&m["payload"]).unwrap())
        })
        .collect()
}

/// How many of each (type, member) came.
fn tally(got: &[Got]) -> BTreeMap<(String, String), usize> {
    let mut tally = BTreeMap::new();
    for g in got {
        *tally
            .entry((g.kind().to_owned(), g.member().to_owned()))
            .or_default() += 1;
    }
    tally
}

/// The one notification of `kind` about `member`.
fn one<'a>(got: &'a [Got], kind: &str, member: &str) -> &'a Value {
    let found: Vec<&Got> = got
        .iter()
        .filter(|g| g.kind() == kind && g.member() == member)
        .collect();
    assert_eq!(found.len(), 1, "{kind} of {member}: {found:?}");
    &found[0].event["data"]
}

#[tokio::test(flavor = "multi_thread")]
async fn a_link_a_stop_a_start_and_a_hard_bounce_are_each_told_once() {
    let signer = SendgridSigner::new();
    let (env, base) = http_env(&[
        ("LIFECYCLE_TWILIO_AUTH_TOKEN", "tw-token".into()),
        ("LIFECYCLE_SENDGRID_WEBHOOK_KEY", signer.public_key.clone()),
    ]);
    let subscriber = Subscriber::bind(&env).await;
    let worker = Worker::start(env.app().await, NO_DISPATCH).await.unwrap();
    let app = worker.app.clone();
    let tag = env.tag.clone();
    let enrolments = [
        enrol(format!("{tag}-1"), "m-link", "+14155550101", true, false),
        enrol(format!("{tag}-2"), "m-stop", "+14155550102", false, true),
        enrol(format!("{tag}-3"), "m-bounce", "+14155550103", true, false),
    ];
    publish_in_order(&env, &app, &enrolments, async |_| {}).await;
    dispatch_all(&app).await;

    // The welcome's unsubscribe link, POSTed as a mail client's one-click does.
    let link = std::fs::read_dir(env.outbox.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .find(|eml| eml.contains("To: m-link@example.com") || eml.contains("<m-link@example.com>"))
        .and_then(|eml| {
            eml.lines()
                .find_map(|l| l.strip_prefix("List-Unsubscribe: <"))
                .map(|l| l.split('>').next().unwrap().to_owned())
        })
        .expect("m-link's welcome with its link");
    let clicked = reqwest::Client::new()
        .post(&link)
        .form(&[("List-Unsubscribe", "One-Click")])
        .send()
        .await
        .unwrap();
    assert_eq!(clicked.status(), 200);
    // STOP twice (the second changes nothing), then START.
    for body in ["STOP", "stop", "START"] {
        let form = [("From", "+14155550102"), ("Body", body)];
        let answer = twilio_post(&base, "/webhooks/twilio/inbound", "tw-token", &form)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200, "{body}");
    }
    // A hard bounce, reported twice.
    let bounce = json!([{"email": "m-bounce@example.com", "event": "bounce", "type": "bounce",
                         "status": "5.1.1", "reason": "550 5.1.1 no such user"}])
    .to_string();
    for _ in 0..2 {
        let answer = signer.post(&base, &bounce).send().await.unwrap();
        assert_eq!(answer.status(), 204);
    }

    let messages = count(&app, "select count(*) from messages where status = 'sent'").await;
    // 3 signup balances, the sent messages, 3 unsubscriptions and 1 resubscription.
    let expected = 3 + messages + 3 + 1;
    let got = subscriber.drain(&app, expected).await;
    assert_eq!(got.len() as i64, expected, "{:#?}", tally(&got));
    let ids: std::collections::HashSet<&str> = got
        .iter()
        .map(|g| g.event["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), got.len(), "every id once");

    let unsubscribed = |member| one(&got, "member.unsubscribed", member).clone();
    assert_eq!(
        unsubscribed("m-link"),
        json!({"member_id": "m-link", "channel": "email", "how": "one_click"})
    );
    assert_eq!(
        unsubscribed("m-stop"),
        json!({"member_id": "m-stop", "channel": "sms", "how": "stop"})
    );
    assert_eq!(
        unsubscribed("m-bounce"),
        json!({"member_id": "m-bounce", "channel": "email", "how": "hard_bounce"})
    );
    assert_eq!(
        *one(&got, "member.resubscribed", "m-stop"),
        json!({"member_id": "m-stop", "channel": "sms", "how": "start"})
    );
    for (i, member) in ["m-link", "m-stop", "m-bounce"].iter().enumerate() {
        assert_eq!(
            *one(&got, "points.balance_changed", member),
            json!({"member_id": member, "balance": 100, "caused_by": format!("{tag}-{}", i + 1)})
        );
    }
    // Each sent message once, with its id.
    let sent: Vec<i64> =
        sqlx::query_scalar("select id from messages where status = 'sent' order by id")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    let mut told: Vec<i64> = got
        .iter()
        .filter(|g| g.kind() == "message.sent")
        .map(|g| g.event["data"]["message_id"].as_i64().unwrap())
        .collect();
    told.sort();
    assert_eq!(told, sent);
    // A member's notifications arrive in the order their changes happened.
    let of_stop: Vec<&str> = got
        .iter()
        .filter(|g| g.member() == "m-stop")
        .map(Got::kind)
        .collect();
    assert_eq!(
        of_stop.last().copied(),
        Some("member.resubscribed"),
        "{of_stop:?}"
    );
    assert_eq!(of_stop[of_stop.len() - 2], "member.unsubscribed");
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_message_a_new_tier_and_an_expiry_are_each_told_once() {
    // Email goes to a port nobody listens on, and one try is all a message gets.
    let (env, _) = http_env(&[
        ("LIFECYCLE_EMAIL_PROVIDERS", "smtp".into()),
        (
            "LIFECYCLE_SMTP_URL",
            format!("smtp://127.0.0.1:{}", free_port()),
        ),
        ("LIFECYCLE_DISPATCH__MAX_ATTEMPTS", "1".into()),
    ]);
    let subscriber = Subscriber::bind(&env).await;
    let worker = Worker::start(env.app().await, NO_DISPATCH).await.unwrap();
    let app = worker.app.clone();
    let tag = env.tag.clone();
    publish_in_order(
        &env,
        &app,
        &[enrol(
            format!("{tag}-1"),
            "m-1",
            "+14155550104",
            true,
            false,
        )],
        async |_| {},
    )
    .await;
    dispatch_all(&app).await;
    let failed: Vec<i64> =
        sqlx::query_scalar("select id from messages where status = 'failed' order by id")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert!(!failed.is_empty());
    // An order of 600 USD: 600 points, Silver.
    let order = event(
        format!("{tag}-o"),
        "order.placed",
        json!({"order_id": "o-1", "member_id": "m-1", "total": 60000, "currency": "USD"}),
    );
    publish_in_order(&env, &app, &[order], async |_| {}).await;
    // Fourteen months on, every lot has lapsed.
    let later = chrono::Utc::now() + chrono::Months::new(14);
    run_scan(&app, Job::Expiry, later).await.unwrap();

    let expected = failed.len() as i64 + 5;
    let got = subscriber.drain(&app, expected).await;
    assert_eq!(got.len() as i64, expected, "{:#?}", tally(&got));
    let mut told: Vec<i64> = got
        .iter()
        .filter(|g| g.kind() == "message.failed")
        .map(|g| {
            let data = &g.event["data"];
            assert_eq!(data["channel"], "email");
            assert_eq!(data["provider"], "smtp");
            assert_eq!(data["test"], false);
            assert!(
                data["reason"].as_str().is_some_and(|r| !r.is_empty()),
                "{data}"
            );
            data["message_id"].as_i64().unwrap()
        })
        .collect();
    told.sort();
    assert_eq!(told, failed, "each failed message once");
    assert_eq!(
        *one(&got, "tier.changed", "m-1"),
        json!({"member_id": "m-1", "from": "Bronze", "to": "Silver"})
    );
    assert_eq!(
        *one(&got, "points.expired", "m-1"),
        json!({"member_id": "m-1", "points": 700, "balance": 0})
    );
    let balances: Vec<Value> = got
        .iter()
        .filter(|g| g.kind() == "points.balance_changed")
        .map(|g| g.event["data"].clone())
        .collect();
    assert_eq!(
        balances,
        [
            json!({"member_id": "m-1", "balance": 100, "caused_by": format!("{tag}-1")}),
            json!({"member_id": "m-1", "balance": 700, "caused_by": format!("{tag}-o")}),
            json!({"member_id": "m-1", "balance": 0, "caused_by": "scan:expiry"}),
        ],
        "in order"
    );
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_notification_committed_before_a_crash_is_published_after_the_restart_once() {
    let env = TestEnv::new(&[("LIFECYCLE_NOTIFICATIONS__POLL_INTERVAL_MS", "50".into())]);
    let subscriber = Subscriber::bind(&env).await;
    let app = env.app().await;
    // A worker that applies and sends but runs no notifier: its notifications are committed
    // and wait. It is killed there, as a crash between commit and publish would leave them.
    let mut first = Serve::start_args(&env, &["--no-schedule"], &[], Stdio::inherit());
    env.publish(&[common::enrolment(&env, 1), common::enrolment(&env, 2)])
        .await;
    wait_for("the enrolments' balances and welcomes recorded", || async {
        let kinds = count(
            &app,
            "select count(distinct type) from notifications where type in ('points.balance_changed', 'message.sent')",
        )
        .await;
        let sent = count(&app, "select count(*) from messages where status = 'sent'").await;
        (kinds == 2 && sent == 2).then_some(())
    })
    .await;
    first.kill();
    let recorded: Vec<i64> = sqlx::query_scalar("select id from notifications order by id")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(
        count(
            &app,
            "select count(*) from notifications where amqp_pending"
        )
        .await,
        recorded.len() as i64,
        "nothing was published before the crash"
    );
    // After the restart (the notifier runs now), each is published once, by its id.
    let mut second = Serve::start(&env);
    let got = subscriber.drain(&app, recorded.len() as i64).await;
    let ids: Vec<&str> = got
        .iter()
        .map(|g| g.event["id"].as_str().unwrap())
        .collect();
    for id in &recorded {
        let copies = ids.iter().filter(|i| **i == format!("ntf-{id}")).count();
        assert_eq!(copies, 1, "ntf-{id} in {ids:?}");
    }
    let unique: std::collections::HashSet<&&str> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "no id twice: {ids:?}");
    assert!(second.terminate().await.success());
    env.cleanup().await;
}

/// Checks a POST as a Standard Webhooks consumer does: the signature over
/// `{webhook-id}.{webhook-timestamp}.{body}` with the shared secret, a timestamp within five
/// minutes, and the CloudEvent's id equal to `webhook-id`.
fn verify(request: &common::fake_api::Recorded) -> Value {
    let header = |name: &str| {
        request
            .headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name}"))
            .to_str()
            .unwrap()
            .to_owned()
    };
    let (id, timestamp, signatures) = (
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
    );
    let at: i64 = timestamp.parse().unwrap();
    assert!((chrono::Utc::now().timestamp() - at).abs() < 300, "{at}");
    let secret = STANDARD
        .decode(SECRET.strip_prefix("whsec_").unwrap())
        .unwrap();
    let key = hmac::Key::new(hmac::HMAC_SHA256, &secret);
    let signed = format!("{id}.{timestamp}.{}", request.body);
    let verified = signatures.split(' ').any(|s| {
        s.strip_prefix("v1,")
            .and_then(|sig| STANDARD.decode(sig).ok())
            .is_some_and(|sig| hmac::verify(&key, signed.as_bytes(), &sig).is_ok())
    });
    assert!(verified, "{signatures} does not sign {signed}");
    let event: Value = serde_json::from_str(&request.body).unwrap();
    assert_eq!(event["id"], id.as_str());
    event
}

#[tokio::test(flavor = "multi_thread")]
async fn notifications_are_posted_signed_retried_through_a_503_and_dead_after_a_day() {
    let fake = FakeApi::start(Reply::new(204, "")).await;
    // The first POST meets a 503; the next of the same notification gets through.
    fake.rule_times("points.balance_changed", Reply::new(503, "busy"), 1);
    let (env, base) = http_env(&[
        ("LIFECYCLE_NOTIFY_URL", format!("{}/lifecycle", fake.url)),
        ("LIFECYCLE_NOTIFY_SECRET", SECRET.into()),
        ("LIFECYCLE_NOTIFICATIONS__RETRY_BASE_MS", "100".into()),
        ("LIFECYCLE_NOTIFICATIONS__DEAD_AFTER_HOURS", "1".into()),
        (
            "LIFECYCLE_ADMIN_TOKEN",
            "an-ops-token-long-enough-0123456789".into(),
        ),
    ]);
    let worker = Worker::start(env.app().await, NO_DISPATCH).await.unwrap();
    let app = worker.app.clone();
    let tag = env.tag.clone();
    publish_in_order(
        &env,
        &app,
        &[enrol(
            format!("{tag}-1"),
            "m-1",
            "+14155550105",
            false,
            false,
        )],
        async |_| {},
    )
    .await;
    wait_for("the POST delivered", || async {
        (count(
            &app,
            "select count(*) from notifications where http_state = 'delivered' and http_attempts = 2",
        )
        .await
            == 1)
            .then_some(())
    })
    .await;
    let requests = fake.requests();
    assert_eq!(
        requests.iter().map(|r| r.status).collect::<Vec<_>>(),
        [503, 204]
    );
    let events: Vec<Value> = requests.iter().map(verify).collect();
    assert_eq!(events[0], events[1], "the same event, the same id");
    assert_eq!(events[0]["type"], "points.balance_changed");
    assert_eq!(events[0]["data"]["balance"], 100);
    assert!(requests.iter().all(|r| r.path == "/lifecycle"));

    // A notification the endpoint keeps refusing is dead once it is older than a day (here
    // one hour): its age is set back so the test need not wait.
    fake.set_fallback(Reply::new(500, "broken"));
    publish_in_order(
        &env,
        &app,
        &[event(
            format!("{tag}-a"),
            "points.adjusted",
            json!({"member_id": "m-1", "points": 5, "reason": "manual"}),
        )],
        async |_| {},
    )
    .await;
    sqlx::query(
        "update notifications set at = at - interval '2 hours' where http_state = 'pending'",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    wait_for("the refused notification dead", || async {
        (count(
            &app,
            "select count(*) from notifications where http_state = 'dead'",
        )
        .await
            == 1)
            .then_some(())
    })
    .await;
    let dead: Value = reqwest::Client::new()
        .get(format!("{base}/api/notifications/dead"))
        .bearer_auth("an-ops-token-long-enough-0123456789")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let dead = dead.as_array().unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["type"], "points.balance_changed");
    assert_eq!(dead[0]["error"], "HTTP 500 Internal Server Error");
    verify(fake.requests().last().unwrap());
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn notifications_that_left_are_pruned_after_their_days_and_waiting_ones_kept() {
    let env = TestEnv::new(&[]);
    let app = env.app().await;
    // Old and published; old and POSTed (delivered, or dead); old but still waiting for the
    // broker or for a POST; new and published.
    sqlx::query(
        "insert into notifications (type, member_id, data, at, amqp_pending, http_state)
         values ('tier.changed', 'old-published', '{}', now() - interval '31 days', false, null),
                ('tier.changed', 'old-delivered', '{}', now() - interval '31 days', false, 'delivered'),
                ('tier.changed', 'old-dead', '{}', now() - interval '31 days', false, 'dead'),
                ('tier.changed', 'old-unpublished', '{}', now() - interval '31 days', true, null),
                ('tier.changed', 'old-to-post', '{}', now() - interval '31 days', false, 'pending'),
                ('tier.changed', 'new-published', '{}', now() - interval '29 days', false, null)",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    run_scan(&app, Job::Retention, chrono::Utc::now())
        .await
        .unwrap();
    let kept: Vec<String> = sqlx::query_scalar("select member_id from notifications order by id")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(kept, ["old-unpublished", "old-to-post", "new-published"]);
    env.cleanup().await;
}
