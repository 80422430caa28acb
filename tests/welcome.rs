//! An event in from RabbitMQ, a welcome message out, exactly once, on real services.

mod common;

use common::{ALL_ROLES, INGEST_ONLY, SmtpSink, TestEnv, count, enrolled, parse_mail, wait_for};
use lifecycle::testkit::dispatch::{Dispatcher, Step};

/// Waits until `n` messages are recorded as sent and at least `n` emails reached `sink`
/// (sending precedes recording, so both are waited for): the raw emails.
async fn sent_and_received(
    app: &lifecycle::testkit::app::App,
    sink: &SmtpSink,
    n: i64,
) -> Vec<Vec<u8>> {
    wait_for("the messages recorded as sent", || async {
        (count(app, "select count(*) from messages where status = 'sent'").await == n).then_some(())
    })
    .await;
    wait_for("the emails at the SMTP server", || async {
        let messages = sink.messages();
        (messages.len() as i64 >= n).then_some(messages)
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn enrolment_yields_a_welcome_email_in_the_member_language() {
    let sink = SmtpSink::start(&[]);
    let env = TestEnv::with_smtp(&sink);
    let worker = env.start(ALL_ROLES).await;
    let t = &env.tag;
    env.publish(&[
        enrolled(
            &format!("{t}-1"),
            "m-en",
            Some("ada@example.com"),
            None,
            "en-GB",
            "Ada",
            (true, true),
        ),
        enrolled(
            &format!("{t}-2"),
            "m-ko",
            Some("jiwoo@example.kr"),
            None,
            "ko-KR",
            "지우",
            (true, true),
        ),
        enrolled(
            &format!("{t}-3"),
            "m-tr",
            Some("ozge@example.com.tr"),
            None,
            "tr",
            "Özge Çağlar",
            (true, true),
        ),
    ])
    .await;

    let mails = sent_and_received(&worker.app, &sink, 3).await;
    let mut mails: Vec<_> = mails.iter().map(|raw| parse_mail(raw)).collect();
    mails.sort_by(|a, b| a.to.cmp(&b.to));
    let expected = [
        (
            "ada@example.com",
            "Welcome to Loyalty Club, Ada!",
            "Thank you for joining the Loyalty Club loyalty programme.",
        ),
        (
            "jiwoo@example.kr",
            "지우님, Loyalty Club에 오신 것을 환영합니다!",
            "멤버십에 가입해 주셔서 감사합니다.",
        ),
        (
            "ozge@example.com.tr",
            "Loyalty Club'a hoş geldiniz, Özge Çağlar!",
            "sadakat programına katıldığınız için teşekkür ederiz.",
        ),
    ];
    assert_eq!(mails.len(), 3);
    for (mail, (to, subject, body)) in mails.iter().zip(expected) {
        assert_eq!(mail.to, to);
        assert_eq!(mail.subject, subject, "subject for {to}");
        assert!(mail.text.contains(body), "text for {to}: {}", mail.text);
        assert!(mail.html.contains(body), "html for {to}: {}", mail.html);
        assert_eq!(mail.trigger, "welcome");
        let row_id: i64 =
            sqlx::query_scalar("select id from messages where recipient = $1 and status = 'sent'")
                .bind(to)
                .fetch_one(&worker.app.pool)
                .await
                .unwrap();
        assert_eq!(
            mail.message_id,
            row_id.to_string(),
            "X-Lifecycle-Message-Id names the outbox row"
        );
    }
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_event_twice_yields_one_message_and_two_members_two() {
    let sink = SmtpSink::start(&[]);
    let env = TestEnv::with_smtp(&sink);
    let worker = env.start(ALL_ROLES).await;
    let t = &env.tag;
    let first = enrolled(
        &format!("{t}-1"),
        "m-1",
        Some("one@example.com"),
        None,
        "en",
        "One",
        (true, false),
    );
    let second = enrolled(
        &format!("{t}-2"),
        "m-2",
        Some("two@example.com"),
        None,
        "en",
        "Two",
        (true, false),
    );
    env.publish(&[first.clone(), first.clone(), second]).await;
    // A redelivery after the first was applied and sent.
    wait_for("two sent messages", || async {
        (count(
            &worker.app,
            "select count(*) from messages where status = 'sent'",
        )
        .await
            == 2)
            .then_some(())
    })
    .await;
    env.publish(&[first]).await;
    wait_for("four events handled", || async {
        (worker.app.metrics.events_handled() == 4).then_some(())
    })
    .await;

    // Let dispatch run dry, then count what reached the server.
    let app = &worker.app;
    assert_eq!(count(app, "select count(*) from inbox").await, 2);
    assert_eq!(count(app, "select count(*) from messages").await, 2);
    assert_eq!(
        lifecycle::testkit::metrics::Metrics::get(&app.metrics.events_duplicate),
        2
    );
    worker.stop().await.unwrap();
    // Nothing is in flight any more; smtp-sink may still be writing its last file.
    let messages = wait_for("two emails at the SMTP server", || async {
        let messages = sink.messages();
        (messages.len() >= 2).then_some(messages)
    })
    .await;
    let mut recipients: Vec<String> = messages.iter().map(|m| parse_mail(m).to).collect();
    recipients.sort();
    assert_eq!(recipients, ["one@example.com", "two@example.com"]);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_events_are_dead_lettered_with_a_reason_and_the_queue_moves_on() {
    let env = TestEnv::new(&[]);
    let worker = env.start(ALL_ROLES).await;
    let t = &env.tag;
    env.publish_raw("member.enrolled", b"this is not json {")
        .await;
    env.publish_raw(
        "member.exploded",
        br#"{"specversion":"1.0","id":"x1","source":"s","type":"member.exploded","data":{}}"#,
    )
    .await;
    env.publish_raw(
        "member.enrolled",
        br#"{"specversion":"1.0","source":"s","type":"member.enrolled","data":{}}"#,
    )
    .await;
    env.publish(&[enrolled(
        &format!("{t}-bad"),
        "m-bad",
        Some("not-an-address"),
        None,
        "en",
        "Bad",
        (true, false),
    )])
    .await;
    let mut huge = enrolled(
        &format!("{t}-huge"),
        "m-huge",
        Some("huge@example.com"),
        None,
        "en",
        "Huge",
        (true, false),
    );
    huge.insert_str(
        huge.len() - 1,
        &format!(r#","padding":"{}""#, "x".repeat(1024 * 1024)),
    );
    env.publish_raw("member.enrolled", huge.as_bytes()).await;
    env.publish(&[enrolled(
        &format!("{t}-good"),
        "m-good",
        Some("good@example.com"),
        None,
        "en",
        "Good",
        (true, false),
    )])
    .await;

    wait_for("the good event's welcome", || async {
        (count(
            &worker.app,
            "select count(*) from messages where member_id = 'm-good' and status = 'sent'",
        )
        .await
            == 1)
            .then_some(())
    })
    .await;
    wait_for("five dead letters counted", || async {
        (lifecycle::testkit::metrics::Metrics::get(&worker.app.metrics.events_dead_lettered) == 5)
            .then_some(())
    })
    .await;
    wait_for("five dead letters stored", || async {
        (count(&worker.app, "select count(*) from dead_letters").await >= 5).then_some(())
    })
    .await;
    let dead = env.take_dead_letters().await;
    let reasons: Vec<&str> = dead.iter().map(|(_, r)| r.as_str()).collect();
    let expected = [
        "not JSON",
        "unknown event type \"member.exploded\"",
        "missing field `id`",
        "data.email: email \"not-an-address\" is not a valid address",
        "over the limit of 262144",
    ];
    assert_eq!(dead.len(), expected.len(), "{reasons:?}");
    for (reason, wanted) in reasons.iter().zip(expected) {
        assert!(reason.contains(wanted), "{reason:?} should say {wanted:?}");
    }
    assert_eq!(
        dead[0].0, b"this is not json {",
        "the dead letter keeps the original body"
    );
    assert_eq!(
        count(
            &worker.app,
            "select count(*) from members where member_id in ('m-bad', 'm-huge')"
        )
        .await,
        0
    );
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn no_consent_no_message_and_consent_withdrawn_before_sending_suppresses() {
    let sink = SmtpSink::start(&[]);
    let env = TestEnv::with_smtp(&sink);
    let t = &env.tag;
    // Ingest only, so the messages wait in the outbox while consent changes.
    let worker = env.start(INGEST_ONLY).await;
    let withdrawn = serde_json::json!({
        "specversion": "1.0", "id": format!("{t}-3"), "source": "test", "type": "member.updated",
        "data": {"member_id": "m-withdrawn", "consent": {"email": false}}
    });
    env.publish(&[
        enrolled(
            &format!("{t}-1"),
            "m-sms-only",
            Some("sms-only@example.com"),
            Some("+905321234567"),
            "tr",
            "Ece",
            (false, true),
        ),
        enrolled(
            &format!("{t}-2"),
            "m-withdrawn",
            Some("later@example.com"),
            None,
            "en",
            "Lee",
            (true, false),
        ),
        withdrawn.to_string(),
    ])
    .await;
    // Applied, not just handled: with two consumers the update can arrive first, wait in the
    // retry queue, and be applied after the enrolment.
    wait_for("three events applied", || async {
        let applied = &worker.app.metrics.events_applied;
        (lifecycle::testkit::metrics::Metrics::get(applied) == 3).then_some(())
    })
    .await;
    let app = worker.app.clone();
    worker.stop().await.unwrap();

    let planned: Vec<(String, String)> =
        sqlx::query_as("select member_id, channel from messages order by member_id, channel")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        planned,
        [
            ("m-sms-only".into(), "sms".into()),
            ("m-withdrawn".into(), "email".into())
        ],
        "no email is planned without email consent"
    );

    let dispatcher = Dispatcher::new(app.clone()).unwrap();
    assert_eq!(
        dispatcher.try_execute_once().await.unwrap(),
        Step::Settled(2)
    );
    assert_eq!(dispatcher.try_execute_once().await.unwrap(), Step::Idle);
    let outcome: Vec<(String, String, Option<String>)> =
        sqlx::query_as("select channel, status, last_error from messages order by member_id")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(outcome[0], ("sms".into(), "sent".into(), None));
    assert_eq!(
        outcome[1],
        (
            "email".into(),
            "suppressed".into(),
            Some("no consent for email".into())
        )
    );
    assert!(
        sink.messages().is_empty(),
        "nothing reached the SMTP server"
    );
    let sms: serde_json::Value = serde_json::from_slice(
        &std::fs::read(env.outbox.path().join(format!(
            "{}-welcome-sms.json",
            planned_id(&app, "m-sms-only").await
        )))
        .unwrap(),
    )
    .unwrap();
    assert_eq!(sms["to"], "+905321234567");
    assert_eq!(sms["locale"], "tr");
    assert!(
        sms["body"].as_str().unwrap().contains("Hoş geldiniz, Ece!"),
        "{sms}"
    );
    env.cleanup().await;
}

async fn planned_id(app: &lifecycle::testkit::app::App, member: &str) -> i64 {
    sqlx::query_scalar("select id from messages where member_id = $1")
        .bind(member)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_early_event_waits_for_its_prerequisite_or_is_dead_lettered_with_the_reason() {
    let env = TestEnv::new(&[("LIFECYCLE_INGEST__MAX_RETRIES", "3".into())]);
    let worker = env.start(ALL_ROLES).await;
    let t = &env.tag;
    let update = |id: &str, member: &str| {
        serde_json::json!({
            "specversion": "1.0", "id": id, "source": "test", "type": "member.updated",
            "data": {"member_id": member, "first_name": "Updated"}
        })
        .to_string()
    };
    // The update comes first; its member enrols only after the update's first try.
    env.publish(&[
        update(&format!("{t}-u1"), "m-late"),
        update(&format!("{t}-u2"), "m-never"),
    ])
    .await;
    wait_for("the update deferred", || async {
        (lifecycle::testkit::metrics::Metrics::get(&worker.app.metrics.events_deferred) >= 2)
            .then_some(())
    })
    .await;
    env.publish(&[enrolled(
        &format!("{t}-e1"),
        "m-late",
        Some("late@example.com"),
        None,
        "en",
        "First",
        (true, false),
    )])
    .await;

    wait_for("the update applied after the enrolment", || async {
        let name: Option<String> =
            sqlx::query_scalar("select first_name from members where member_id = 'm-late'")
                .fetch_optional(&worker.app.pool)
                .await
                .unwrap()
                .flatten();
        (name.as_deref() == Some("Updated")).then_some(())
    })
    .await;
    let dead = wait_for("the orphan update dead-lettered", || async {
        let dead = env.take_dead_letters().await;
        (!dead.is_empty()).then_some(dead)
    })
    .await;
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0]
            .1
            .contains("member m-never is not enrolled yet (gave up after 3 retries)"),
        "{}",
        dead[0].1
    );
    assert!(String::from_utf8_lossy(&dead[0].0).contains("m-never"));
    assert_eq!(
        count(
            &worker.app,
            "select count(*) from inbox where event_id like '%-u2'"
        )
        .await,
        0,
        "a deferred event leaves no inbox row"
    );
    assert_eq!(
        count(
            &worker.app,
            "select count(*) from inbox where event_id like '%-u1'"
        )
        .await,
        1
    );
    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// A line of mail data that starts with a period is doubled on the wire (RFC 5321 4.5.2) and
/// arrives whole, whether the server takes pipelined commands (smtp-sink's default) or not
/// (`-p`); each message reaches the server once.
#[tokio::test(flavor = "multi_thread")]
async fn mail_arrives_whole_with_and_without_pipelining() {
    for flags in [&[][..], &["-p"][..]] {
        let sink = SmtpSink::start(flags);
        let env = TestEnv::new(&[
            ("LIFECYCLE_EMAIL_PROVIDERS", "smtp".into()),
            ("LIFECYCLE_SMTP_URL", sink.url()),
            // The text part's last line is the shop's name.
            ("LIFECYCLE_SHOP_NAME", ".Dot & Co".into()),
        ]);
        let worker = env.start(ALL_ROLES).await;
        let t = &env.tag;
        let events: Vec<String> = (0..3)
            .map(|i| {
                enrolled(
                    &format!("{t}-{i}"),
                    &format!("m-dot-{i}"),
                    Some(&format!("dot{i}@example.com")),
                    None,
                    "en",
                    "Ada",
                    (true, true),
                )
            })
            .collect();
        env.publish(&events).await;
        let mails = sent_and_received(&worker.app, &sink, 3).await;
        assert_eq!(mails.len(), 3, "smtp-sink {flags:?}: one copy each");
        let mut to: Vec<String> = mails.iter().map(|m| parse_mail(m).to).collect();
        to.sort();
        assert_eq!(
            to,
            ["dot0@example.com", "dot1@example.com", "dot2@example.com"]
        );
        for mail in &mails {
            let text = parse_mail(mail).text;
            assert!(
                text.lines().any(|line| line.trim_end() == ".Dot & Co"),
                "smtp-sink {flags:?}: {text}"
            );
        }
        worker.stop().await.unwrap();
        env.cleanup().await;
    }
}
