//! Suppression through the HTTP server: SMS STOP and START (Twilio's inbound webhook), one-click
//! unsubscribe (RFC 8058), SendGrid bounces, and an SMTP server refusing a recipient. Each then
//! stops the next message, including one already queued.

mod common;

use std::sync::Arc;

use common::smtp_relay::{Fault, SmtpRelay};
use common::{
    SendgridSigner, SmtpSink, TestEnv, count, free_port, publish_in_order, twilio_post, wait_for,
};
use lifecycle::testkit::app::{App, Roles};
use lifecycle::testkit::dispatch::{Dispatcher, Step};
use lifecycle::testkit::worker::Worker;
use serde_json::json;

/// Consume events and serve HTTP; sending is done step by step by the test.
const INGEST_AND_HTTP: Roles = Roles {
    ingest: true,
    dispatch: false,
    schedule: false,
    http: true,
};

fn http_env(extra: &[(&str, String)]) -> (TestEnv, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut vars = vec![
        ("LIFECYCLE_HTTP_ADDR", addr.clone()),
        ("LIFECYCLE_PUBLIC_URL", format!("http://{addr}")),
    ];
    vars.extend(extra.iter().cloned());
    (TestEnv::new(&vars), format!("http://{addr}"))
}

fn event(id: String, kind: &str, data: serde_json::Value) -> String {
    json!({"specversion": "1.0", "id": id, "source": "test", "type": kind, "data": data})
        .to_string()
}

fn enrol(id: String, member: &str, locale: &str, email: bool, sms: bool) -> String {
    event(
        id,
        "member.enrolled",
        json!({"member_id": member, "email": format!("{member}@example.com"), "phone": "+14155550123",
               "first_name": "Ada", "locale": locale, "timezone": "UTC",
               "consent": {"email": email, "sms": sms}}),
    )
}

/// Spends the signup bonus and gives it back: a redemption-ready message (a second message
/// for the member, planned after the suppression).
fn another_message(tag: &str, n: u32, member: &str) -> Vec<String> {
    vec![
        event(
            format!("{tag}-r{n}"),
            "points.redeemed",
            json!({"member_id": member, "points": 100}),
        ),
        event(
            format!("{tag}-a{n}"),
            "points.adjusted",
            json!({"member_id": member, "points": 100, "reason": "manual"}),
        ),
    ]
}

/// An environment sending email to `sink`, with `member` enrolled (by email) and the welcome
/// waiting in the outbox; the worker consumes only.
async fn enrolled_at_smtp(
    sink: &SmtpSink,
    member: &str,
    extra: &[(&str, String)],
) -> (TestEnv, Worker) {
    enrolled_at(&sink.url(), member, extra).await
}

/// An enrolled member whose welcome is planned (not sent), email going to the relay at `url`.
async fn enrolled_at(url: &str, member: &str, extra: &[(&str, String)]) -> (TestEnv, Worker) {
    let mut vars = vec![
        ("LIFECYCLE_EMAIL_PROVIDERS", "smtp".to_owned()),
        ("LIFECYCLE_SMTP_URL", url.to_owned()),
        ("LIFECYCLE_INGEST__CONSUMERS", "1".to_owned()),
    ];
    vars.extend(extra.iter().cloned());
    let env = TestEnv::new(&vars);
    let roles = Roles {
        ingest: true,
        dispatch: false,
        schedule: false,
        http: false,
    };
    let worker = Worker::start(env.app().await, roles).await.unwrap();
    let enrolment = enrol(format!("{}-1", env.tag), member, "en", true, false);
    publish_in_order(&env, &worker.app, &[enrolment], async |_| {}).await;
    (env, worker)
}

async fn dispatch_all(app: &App) {
    let dispatcher = Dispatcher::new(app.clone()).unwrap();
    while dispatcher.try_execute_once().await.unwrap() != Step::Idle {}
}

/// (trigger, status, last_error) of a member's messages on a channel, oldest first.
async fn outcomes(app: &App, member: &str, channel: &str) -> Vec<(String, String, Option<String>)> {
    sqlx::query_as(
        "select trigger, status, last_error from messages where member_id = $1 and channel = $2 order by id",
    )
    .bind(member)
    .bind(channel)
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn sms_stop_stops_a_queued_message_and_start_restores() {
    let (env, base) = http_env(&[
        ("LIFECYCLE_TWILIO_AUTH_TOKEN", "tw-token".into()),
        ("LIFECYCLE_INGEST__CONSUMERS", "1".into()),
    ]);
    let worker = Worker::start(env.app().await, INGEST_AND_HTTP)
        .await
        .unwrap();
    let app = worker.app.clone();
    let tag = env.tag.clone();
    publish_in_order(
        &env,
        &app,
        &[enrol(format!("{tag}-1"), "m-stop", "en", false, true)],
        async |_| {},
    )
    .await;

    // A forged request (no valid signature) changes nothing.
    let forged = reqwest::Client::new()
        .post(format!("{base}/webhooks/twilio/inbound"))
        .form(&[("From", "+14155550123"), ("Body", "STOP")])
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 403);
    assert_eq!(count(&app, "select count(*) from suppressions").await, 0);

    // The member texts " Stop. " while the welcome SMS waits in the outbox.
    let form = [
        ("From", "+14155550123"),
        ("To", "+15005550006"),
        ("Body", " Stop. "),
    ];
    let answer = twilio_post(&base, "/webhooks/twilio/inbound", "tw-token", &form)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert!(answer.text().await.unwrap().contains("<Response>"));
    dispatch_all(&app).await;
    assert_eq!(
        outcomes(&app, "m-stop", "sms").await,
        [(
            "welcome".into(),
            "suppressed".into(),
            Some("suppressed: STOP".into())
        )]
    );

    // START lifts it: the next message goes.
    let form = [("From", "+14155550123"), ("Body", "start")];
    assert_eq!(
        twilio_post(&base, "/webhooks/twilio/inbound", "tw-token", &form)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    publish_in_order(
        &env,
        &app,
        &another_message(&tag, 1, "m-stop"),
        async |_| {},
    )
    .await;
    dispatch_all(&app).await;
    let after = outcomes(&app, "m-stop", "sms").await;
    assert_eq!(after[1].0, "redemption-ready");
    assert_eq!(after[1].1, "sent");

    // Twilio's status callback lands on the message it sent.
    let sid: String = sqlx::query_scalar("select provider_ref from messages where status = 'sent'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    sqlx::query("update messages set provider = 'twilio' where provider_ref = $1")
        .bind(&sid)
        .execute(&app.pool)
        .await
        .unwrap();
    let form = [("MessageSid", sid.as_str()), ("MessageStatus", "delivered")];
    assert_eq!(
        twilio_post(&base, "/webhooks/twilio/status", "tw-token", &form)
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    let status: Option<String> =
        sqlx::query_scalar("select provider_status from messages where provider_ref = $1")
            .bind(&sid)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(status.as_deref(), Some("delivered"));
    // A SID holding a NUL (signed all the same) is refused as a bad request, not a 503 that
    // Twilio would retry.
    let nul = [("MessageSid", "SM\u{0}1"), ("MessageStatus", "failed")];
    let answer = twilio_post(&base, "/webhooks/twilio/status", "tw-token", &nul)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 400);
    assert!(answer.text().await.unwrap().contains("not a Twilio SID"));
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_click_unsubscribe_from_the_emails_own_header() {
    let (env, base) = http_env(&[("LIFECYCLE_INGEST__CONSUMERS", "1".into())]);
    let worker = Worker::start(env.app().await, INGEST_AND_HTTP)
        .await
        .unwrap();
    let app = worker.app.clone();
    let tag = env.tag.clone();
    publish_in_order(
        &env,
        &app,
        &[enrol(format!("{tag}-1"), "m-unsub", "ko", true, false)],
        async |_| {},
    )
    .await;
    dispatch_all(&app).await;

    // The welcome carries RFC 8058's two headers.
    let eml = std::fs::read_dir(env.outbox.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().ends_with(".eml"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .unwrap();
    let header = |name: &str| {
        eml.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no {name} in\n{eml}"))
            .to_owned()
    };
    assert_eq!(
        header("List-Unsubscribe-Post"),
        "List-Unsubscribe=One-Click"
    );
    let link = header("List-Unsubscribe");
    let url = link
        .trim_start_matches('<')
        .split('>')
        .next()
        .unwrap()
        .to_owned();
    assert!(url.starts_with(&format!("{base}/unsubscribe/")), "{url}");
    let mail = common::parse_mail(eml.as_bytes());
    assert!(
        mail.html.contains("수신 거부"),
        "the footer links it in Korean"
    );

    // GET shows a page in the member's language and changes nothing.
    let page = reqwest::get(&url).await.unwrap();
    assert_eq!(page.status(), 200);
    let text = page.text().await.unwrap();
    assert!(
        text.contains("lang=\"ko\"") && text.contains("<form method=\"post\""),
        "{text}"
    );
    assert_eq!(count(&app, "select count(*) from suppressions").await, 0);
    // A forged token is refused.
    let forged = reqwest::get(format!("{base}/unsubscribe/bS11bnN1Yg.AAAA"))
        .await
        .unwrap();
    assert_eq!(forged.status(), 404);

    // The member changes address after the welcome went out.
    publish_in_order(
        &env,
        &app,
        &[event(
            format!("{tag}-u"),
            "member.updated",
            json!({"member_id": "m-unsub", "email": "m-unsub-new@example.com"}),
        )],
        async |_| {},
    )
    .await;

    // The database fails under the POST: 503, asking to try again, and nothing is lost.
    let one_click = || {
        reqwest::Client::new()
            .post(&url)
            .form(&[("List-Unsubscribe", "One-Click")])
            .send()
    };
    sqlx::query("alter table suppressions rename to suppressions_away")
        .execute(&app.pool)
        .await
        .unwrap();
    let failed = one_click().await.unwrap();
    sqlx::query("alter table suppressions_away rename to suppressions")
        .execute(&app.pool)
        .await
        .unwrap();
    assert_eq!(failed.status(), 503, "not an 'invalid link'");
    assert!(failed.text().await.unwrap().contains("try again"));

    // The mail client's one-click POST, again.
    let done = one_click().await.unwrap();
    assert_eq!(done.status(), 200);
    assert!(done.text().await.unwrap().contains("수신 거부되었습니다"));
    // It unsubscribed the address the message went to, not the member's new one.
    let suppressed: Vec<String> = sqlx::query_scalar("select address from suppressions")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(suppressed, ["m-unsub@example.com"]);

    publish_in_order(
        &env,
        &app,
        &another_message(&tag, 1, "m-unsub"),
        async |_| {},
    )
    .await;
    // Back at the unsubscribed address, the next message is suppressed.
    publish_in_order(
        &env,
        &app,
        &[event(
            format!("{tag}-u2"),
            "member.updated",
            json!({"member_id": "m-unsub", "email": "m-unsub@example.com"}),
        )],
        async |_| {},
    )
    .await;
    dispatch_all(&app).await;
    let after = outcomes(&app, "m-unsub", "email").await;
    assert_eq!(
        after[1],
        (
            "redemption-ready".into(),
            "suppressed".into(),
            Some("suppressed: unsubscribed".into())
        )
    );
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn webhooks_without_a_configured_key_refuse_everything() {
    // Neither LIFECYCLE_TWILIO_AUTH_TOKEN nor LIFECYCLE_SENDGRID_WEBHOOK_KEY is set.
    let (env, base) = http_env(&[("LIFECYCLE_INGEST__CONSUMERS", "1".into())]);
    let worker = Worker::start(env.app().await, INGEST_AND_HTTP)
        .await
        .unwrap();
    let app = worker.app.clone();
    let client = reqwest::Client::new();
    let stop = client
        .post(format!("{base}/webhooks/twilio/inbound"))
        .form(&[("From", "+14155550123"), ("Body", "STOP")])
        .send()
        .await
        .unwrap();
    assert_eq!(stop.status(), 403, "an unsigned STOP without a token");
    let status = client
        .post(format!("{base}/webhooks/twilio/status"))
        .form(&[("MessageSid", "SM1"), ("MessageStatus", "failed")])
        .send()
        .await
        .unwrap();
    assert_eq!(status.status(), 403);
    // Even a correctly signed SendGrid request: there is no key to check it against.
    let signer = SendgridSigner::new();
    let bounce = r#"[{"email":"victim@example.com","event":"unsubscribe"}]"#;
    let sendgrid = signer.post(&base, bounce).send().await.unwrap();
    assert_eq!(sendgrid.status(), 403);
    assert_eq!(count(&app, "select count(*) from suppressions").await, 0);
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sendgrid_bounce_suppresses_the_address_but_a_block_does_not() {
    let signer = SendgridSigner::new();
    let (env, base) = http_env(&[
        ("LIFECYCLE_INGEST__CONSUMERS", "1".into()),
        ("LIFECYCLE_SENDGRID_WEBHOOK_KEY", signer.public_key.clone()),
    ]);
    let worker = Worker::start(env.app().await, INGEST_AND_HTTP)
        .await
        .unwrap();
    let app = worker.app.clone();
    let tag = env.tag.clone();
    let events = [
        enrol(format!("{tag}-1"), "m-bounce", "en", true, false),
        enrol(format!("{tag}-2"), "m-block", "en", true, false),
    ];
    publish_in_order(&env, &app, &events, async |_| {}).await;
    let sendgrid = json!([
        {"email": "m-bounce@example.com", "event": "bounce", "type": "bounce", "reason": "550 no such user"},
        {"email": "m-block@example.com", "event": "bounce", "type": "blocked"},
        {"email": "m-block@example.com", "event": "delivered"},
        {"event": "processed"}
    ]);
    // Unsigned, or signed by another key: refused, and nothing changes.
    let unsigned = reqwest::Client::new()
        .post(format!("{base}/webhooks/sendgrid/events"))
        .json(&sendgrid)
        .send()
        .await
        .unwrap();
    assert_eq!(unsigned.status(), 403);
    let forged = SendgridSigner::new()
        .post(&base, &sendgrid.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 403);
    assert_eq!(count(&app, "select count(*) from suppressions").await, 0);
    let answer = signer
        .post(&base, &sendgrid.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 204);
    // Both welcomes were queued before the events came: the bounced one is stopped.
    dispatch_all(&app).await;
    assert_eq!(
        outcomes(&app, "m-bounce", "email").await,
        [(
            "welcome".into(),
            "suppressed".into(),
            Some("suppressed: bounced".into())
        )]
    );
    assert_eq!(outcomes(&app, "m-block", "email").await[0].1, "sent");
    let bad = signer.post(&base, "not json").send().await.unwrap();
    assert_eq!(bad.status(), 400);
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_smtp_server_refusing_the_recipient_suppresses_the_address() {
    // The relay refuses every RCPT with a mailbox-level permanent answer (5.1.1).
    let upstream = SmtpSink::start(&[]);
    let sink = SmtpRelay::start_with(
        upstream.port,
        |_| Fault::None,
        Arc::new(|line: &str| {
            Some(format!(
                "550 5.1.1 <{}>: Recipient address rejected: User unknown",
                line.split(['<', '>']).nth(1).unwrap_or_default()
            ))
        }),
    )
    .await;
    let (env, worker) = enrolled_at(&sink.url(), "m-550", &[]).await;
    let app = worker.app.clone();
    let tag = env.tag.clone();
    dispatch_all(&app).await;
    let first = outcomes(&app, "m-550", "email").await;
    assert_eq!(first[0].1, "failed", "{first:?}");
    assert!(
        first[0].2.as_deref().unwrap().contains("recipient refused"),
        "{first:?}"
    );
    let reason: String =
        sqlx::query_scalar("select reason from suppressions where address = 'm-550@example.com'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert!(reason.starts_with("bounced: smtp"), "{reason}");
    // The next message is not even tried.
    publish_in_order(&env, &app, &another_message(&tag, 1, "m-550"), async |_| {}).await;
    dispatch_all(&app).await;
    let after = outcomes(&app, "m-550", "email").await;
    assert_eq!(after[1].1, "suppressed");
    assert!(upstream.messages().is_empty(), "nothing reached the sink");
    assert_eq!(sink.refused_rcpts(), 1, "the second message was not tried");
    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// A relay's policy refusal at RCPT (`554 5.7.1 Relay access denied`, `550 5.7.1 Client host
/// rejected`, a 5xx with no mailbox code) says nothing of the address: nothing is suppressed,
/// the next provider takes the message, and once the relay is fixed it sends again.
#[tokio::test(flavor = "multi_thread")]
async fn a_relays_policy_refusal_suppresses_no_one_and_fails_over() {
    let upstream = SmtpSink::start(&[]);
    let refusing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let answer = refusing.clone();
    let relay = SmtpRelay::start_with(
        upstream.port,
        |_| Fault::None,
        Arc::new(move |line: &str| {
            let to = line.split(['<', '>']).nth(1).unwrap_or_default().to_owned();
            answer
                .load(std::sync::atomic::Ordering::Relaxed)
                .then(|| match to.chars().nth(2) {
                    Some('a') => format!("554 5.7.1 <{to}>: Relay access denied"),
                    Some('b') => "550 5.7.1 Client host rejected: access denied".to_owned(),
                    _ => "550 Requested action not taken".to_owned(),
                })
        }),
    )
    .await;
    let vars = [
        ("LIFECYCLE_EMAIL_PROVIDERS", "smtp,file".to_owned()),
        ("LIFECYCLE_SMTP_URL", relay.url()),
        ("LIFECYCLE_DISPATCH__BREAKER_FAILURES", "1000".to_owned()),
    ];
    let env = TestEnv::new(&vars);
    let worker = env.start(common::INGEST_ONLY).await;
    let app = worker.app.clone();
    let members = ["m-a", "m-b", "m-c"];
    let events: Vec<String> = members
        .iter()
        .enumerate()
        .map(|(i, m)| enrol(format!("{}-{i}", env.tag), m, "en", true, false))
        .collect();
    publish_in_order(&env, &app, &events, async |_| {}).await;
    dispatch_all(&app).await;
    assert_eq!(relay.refused_rcpts(), 3);
    for member in members {
        let (_, status, error) = outcomes(&app, member, "email").await.remove(0);
        assert_eq!(
            status, "sent",
            "{member}: taken by the next provider ({error:?})"
        );
        let tried: Vec<(String, String)> = sqlx::query_as(
            "select a.provider, a.outcome from delivery_attempts a
             join messages m on m.id = a.message_id where m.member_id = $1 order by a.id",
        )
        .bind(member)
        .fetch_all(&app.pool)
        .await
        .unwrap();
        assert_eq!(
            tried,
            [
                ("smtp".to_owned(), "transient".to_owned()),
                ("file".to_owned(), "sent".to_owned())
            ],
            "{member}"
        );
    }
    assert_eq!(count(&app, "select count(*) from suppressions").await, 0);
    // The relay is fixed: the next welcome goes through it.
    refusing.store(false, std::sync::atomic::Ordering::Relaxed);
    publish_in_order(
        &env,
        &app,
        &another_message(&env.tag, 1, "m-a"),
        async |_| {},
    )
    .await;
    dispatch_all(&app).await;
    wait_for("the mail at the sink", || async {
        (upstream.messages().len() == 1).then_some(())
    })
    .await;
    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// smtp-sink answering every RCPT with a soft (4xx) error, or hanging up after DATA: the
/// message is retried later and the address is not suppressed.
#[tokio::test(flavor = "multi_thread")]
async fn smtp_soft_rejects_and_disconnects_are_retried_not_suppressed() {
    for (flags, member) in [(["-r", "RCPT"], "m-soft"), (["-q", "DATA"], "m-hangup")] {
        let sink = SmtpSink::start(&flags);
        let retry_later = [("LIFECYCLE_DISPATCH__RETRY_BASE_MS", "600000".to_owned())];
        let (env, worker) = enrolled_at_smtp(&sink, member, &retry_later).await;
        let app = worker.app.clone();
        dispatch_all(&app).await;
        let (_, status, error) = outcomes(&app, member, "email").await.remove(0);
        assert_eq!(status, "pending", "{member}: retried later ({error:?})");
        assert!(error.as_deref().unwrap().starts_with("smtp"), "{error:?}");
        assert_eq!(
            count(&app, "select count(*) from suppressions").await,
            0,
            "{member}"
        );
        worker.stop().await.unwrap();
        env.cleanup().await;
    }
}
