//! Ops actions do what they say: a retry renders with the version in force, a pin that no
//! longer resolves falls back (and the version used is recorded), a database error while
//! loading templates waits instead of failing, dead letters are replayed once (and never
//! applied twice, even after retention), every publish reaches every replica whatever order
//! publishes commit in, and a million failed messages are retried in pages.

mod common;

use std::time::{Duration, Instant};

use common::{
    ALL_ROLES, DISPATCH_ONLY, INGEST_ONLY, Serve, SmtpSink, TestEnv, cli, count, enrolled, wait_for,
};
use lifecycle::testkit::app::App;
use lifecycle::testkit::domain::Trigger;
use serde_json::json;

fn enrol(env: &TestEnv, member: &str, locale: &str) -> String {
    enrolled(
        &format!("{}-{member}", env.tag),
        member,
        Some(&format!("{member}@example.com")),
        None,
        locale,
        "Ada",
        (true, false),
    )
}

/// (status, template version, template locale, last error) of a member's welcome.
async fn welcome(app: &App, member: &str) -> (String, Option<i32>, Option<String>, Option<String>) {
    wait_for(&format!("{member}'s welcome planned"), || async {
        sqlx::query_as(
            "select status, template_version, template_locale, last_error from messages
             where member_id = $1 and trigger = 'welcome' and not test",
        )
        .bind(member)
        .fetch_optional(&app.pool)
        .await
        .unwrap()
    })
    .await
}

/// Waits until a member's welcome is settled (neither pending nor sending); its status.
async fn settled(app: &App, member: &str) -> String {
    wait_for(&format!("{member}'s welcome settled"), || async {
        let (status, ..) = welcome(app, member).await;
        (status != "pending" && status != "sending").then_some(status)
    })
    .await
}

/// Stores `files` as version `version` of (trigger, locale), as a save would.
async fn store_version(
    app: &App,
    trigger: &str,
    locale: &str,
    version: i32,
    files: serde_json::Value,
) {
    sqlx::query(
        "insert into template_versions (trigger, locale, version, state, files, author)
         values ($1, $2, $3, 'archived', $4, 'test')",
    )
    .bind(trigger)
    .bind(locale)
    .bind(version)
    .bind(files)
    .execute(&app.pool)
    .await
    .unwrap();
}

/// The shipped files of (trigger, locale), with the SMS replaced.
fn files_with_sms(app: &App, trigger: Trigger, locale: &str, sms: &str) -> serde_json::Value {
    let mut files = app.templates.shipped().files(trigger, locale);
    files.insert("sms.hbs".into(), sms.into());
    serde_json::to_value(files).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_renders_with_the_version_in_force_not_the_broken_one_it_failed_with() {
    let sink = SmtpSink::start(&[]);
    let env = TestEnv::with_smtp(&sink);
    let worker = env.start(ALL_ROLES).await;
    let app = worker.app.clone();
    // A version that fails m42's render only (markup nested deeper than the MJML stage
    // takes, for m42 alone: the sample renders).
    let mut files = app.templates.shipped().files(Trigger::Welcome, "en");
    let mjml = files["email.mjml.hbs"].replacen(
        "</mj-text>",
        &format!(
            "{{{{#if (eq member_id \"m42\")}}}}{}{{{{/if}}}}</mj-text>",
            "<div>".repeat(150)
        ),
        1,
    );
    files.insert("email.mjml.hbs".into(), mjml);
    let version = app
        .templates
        .save_draft(Trigger::Welcome, "en", &files, "mia")
        .await
        .unwrap();
    app.templates
        .publish(Trigger::Welcome, "en", version, "mia")
        .await
        .unwrap();
    env.publish(&[enrol(&env, "m42", "en")]).await;
    assert_eq!(settled(&app, "m42").await, "failed");
    let (_, pinned, ..) = welcome(&app, "m42").await;
    assert_eq!(pinned, Some(version), "it failed with the broken version");
    // The marketer rolls back; ops retry the message: it renders with version 0 and goes.
    app.templates
        .publish(Trigger::Welcome, "en", 0, "mia")
        .await
        .unwrap();
    let id: i64 = sqlx::query_scalar("select id from messages where member_id = 'm42'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let out = cli(&env, &["deliveries", "retry", &id.to_string()]);
    assert!(out.contains("1 failed messages queued again"), "{out}");
    app.outbox_ready.notify_waiters();
    assert_eq!(settled(&app, "m42").await, "sent");
    let (_, version, locale, _) = welcome(&app, "m42").await;
    assert_eq!((version, locale.as_deref()), (Some(0), Some("en")));
    assert_eq!(sink.messages().len(), 1);
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pin_that_no_longer_resolves_falls_back_to_the_version_in_force() {
    let sink = SmtpSink::start(&[]);
    let env = TestEnv::with_smtp(&sink);
    let worker = env.start(INGEST_ONLY).await;
    let app = worker.app.clone();
    env.publish(&[enrol(&env, "m-gone", "en"), enrol(&env, "m-moved", "ko")])
        .await;
    wait_for("two welcomes planned", || async {
        (count(&app, "select count(*) from messages").await == 2).then_some(())
    })
    .await;
    // Both were rendered once and deferred (quiet hours): m-gone pinned to a version of its
    // pair that no longer exists; m-moved pinned to English, and has since moved to Korean.
    sqlx::query(
        "update messages set template_version = 7, template_locale = 'en'
         where member_id in ('m-gone', 'm-moved')",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let dispatch = lifecycle::testkit::worker::Worker::start(env.app().await, DISPATCH_ONLY)
        .await
        .unwrap();
    assert_eq!(settled(&app, "m-gone").await, "sent");
    assert_eq!(settled(&app, "m-moved").await, "sent");
    let (_, version, locale, _) = welcome(&app, "m-gone").await;
    assert_eq!((version, locale.as_deref()), (Some(0), Some("en")));
    let (_, version, locale, _) = welcome(&app, "m-moved").await;
    assert_eq!((version, locale.as_deref()), (Some(0), Some("ko")));
    dispatch.stop().await.unwrap();
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_error_while_loading_templates_waits_instead_of_failing() {
    let sink = SmtpSink::start(&[]);
    let env = TestEnv::with_smtp(&sink);
    let worker = env.start(INGEST_ONLY).await;
    let app = worker.app.clone();
    env.publish(&[enrol(&env, "m-wait", "en")]).await;
    wait_for("the welcome planned", || async {
        (count(&app, "select count(*) from messages").await == 1).then_some(())
    })
    .await;
    // Pinned to a stored version of its pair, which dispatch must load from the database.
    let files = files_with_sms(&app, Trigger::Welcome, "en", "Hi {{first_name}} STOP");
    store_version(&app, "welcome", "en", 3, files).await;
    sqlx::query("update messages set template_version = 3, template_locale = 'en'")
        .execute(&app.pool)
        .await
        .unwrap();
    // The versions cannot be read for now.
    sqlx::query("alter table template_versions rename to template_versions_away")
        .execute(&app.pool)
        .await
        .unwrap();
    let dispatcher = lifecycle::testkit::dispatch::Dispatcher::new(app.clone()).unwrap();
    dispatcher.try_execute_once().await.unwrap();
    let (status, _, _, error) = welcome(&app, "m-wait").await;
    assert_eq!(status, "pending", "{error:?}");
    assert!(
        error
            .as_deref()
            .unwrap()
            .starts_with("deferred: templates could not be loaded"),
        "{error:?}"
    );
    let attempts: i32 = sqlx::query_scalar("select attempts from messages")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(attempts, 0, "not counted as an attempt");
    // Back: it goes, with its pinned version.
    sqlx::query("alter table template_versions_away rename to template_versions")
        .execute(&app.pool)
        .await
        .unwrap();
    sqlx::query("update messages set due_at = now()")
        .execute(&app.pool)
        .await
        .unwrap();
    while dispatcher.try_execute_once().await.unwrap() != lifecycle::testkit::dispatch::Step::Idle {
    }
    let (status, version, ..) = welcome(&app, "m-wait").await;
    assert_eq!((status.as_str(), version), ("sent", Some(3)));
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_holding_nul_is_stored_and_holds_up_none_behind_it() {
    use lapin::types::{AMQPValue, FieldTable};
    let env = TestEnv::new(&[]);
    let worker = env.start(ALL_ROLES).await;
    let app = worker.app.clone();
    // An id, a header's value and a header's name holding NUL: PostgreSQL's text refuses it
    // (22021), and so does jsonb (22P05). Once, this letter was refused, requeued at the head
    // of the dead-letter queue and refused again, for good, with every letter behind it.
    let nul = json!({"specversion": "1.0", "id": "a\u{0}b", "source": "test",
        "type": "member.exploded"})
    .to_string();
    let mut headers = FieldTable::default();
    headers.insert("x-note".into(), AMQPValue::LongString("c\u{0}d".into()));
    headers.insert("x-\u{0}name".into(), AMQPValue::LongString("e".into()));
    let properties = lapin::BasicProperties::default().with_headers(headers);
    env.publish_raw_with("member.exploded", nul.as_bytes(), properties)
        .await;
    env.publish_raw("member.enrolled", b"not json, behind it")
        .await;
    wait_for("both dead letters stored", || async {
        (count(&app, "select count(*) from dead_letters").await == 2).then_some(())
    })
    .await;
    let rows: Vec<(String, String, String, String)> = sqlx::query_as(
        "select coalesce(event_id, '-'), coalesce(headers->>'x-note', '-'),
                coalesce(headers->>'x-name', '-'), reason
         from dead_letters order by id",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(
        (&*rows[0].0, &*rows[0].1, &*rows[0].2),
        ("ab", "cd", "e"),
        "{rows:?}"
    );
    assert!(rows[0].3.contains("printable ASCII"), "{rows:?}");
    assert!(rows[1].3.contains("not JSON"), "{rows:?}");
    // The body is kept as it came, NUL and all.
    let body: Vec<u8> = sqlx::query_scalar("select body from dead_letters order by id limit 1")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(body, nul.as_bytes());
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_are_replayed_once_and_never_applied_twice_even_after_retention() {
    let env = TestEnv::new(&[
        ("LIFECYCLE_INGEST__MAX_RETRIES", "1".into()),
        ("LIFECYCLE_INGEST__RETRY_DELAY_MS", "100".into()),
        ("LIFECYCLE_RETENTION__INBOX_DAYS", "30".into()),
    ]);
    let worker = env.start(ALL_ROLES).await;
    let app = worker.app.clone();
    // Points for a member not enrolled yet: early, retried, then dead-lettered.
    let points =
        json!({"specversion": "1.0", "id": format!("{}-points", env.tag), "source": "test",
        "type": "points.adjusted", "time": "2026-11-22T10:00:00Z",
        "data": {"member_id": "m-late", "points": 25, "reason": "manual"}})
        .to_string();
    env.publish(&[points]).await;
    wait_for("the dead letter stored", || async {
        (count(&app, "select count(*) from dead_letters").await == 1).then_some(())
    })
    .await;
    env.publish(&[enrol(&env, "m-late", "en")]).await;
    let balance = || async {
        sqlx::query_scalar::<_, i64>("select balance from members where member_id = 'm-late'")
            .fetch_optional(&app.pool)
            .await
            .unwrap()
    };
    wait_for("enrolled", || async {
        balance().await.filter(|b| *b == 100)
    })
    .await;
    let out = cli(&env, &["dead-letters", "replay", "--all"]);
    assert!(out.contains("1 dead letters replayed"), "{out}");
    wait_for("the points applied", || async {
        balance().await.filter(|b| *b == 125)
    })
    .await;
    // --all again: nothing, it was replayed.
    let out = cli(&env, &["dead-letters", "replay", "--all"]);
    assert!(out.contains("0 dead letters replayed"), "{out}");
    // Retention runs long after: the event's inbox row is kept, because a letter holds it.
    sqlx::query("update inbox set applied_at = now() - interval '400 days'")
        .execute(&app.pool)
        .await
        .unwrap();
    lifecycle::testkit::scheduler::run_scan(
        &app,
        lifecycle::testkit::scheduler::Job::Retention,
        app.clock.now(),
    )
    .await
    .unwrap();
    let kept: i64 = count(
        &app,
        &format!(
            "select count(*) from inbox where event_id = '{}-points'",
            env.tag
        ),
    )
    .await;
    assert_eq!(kept, 1, "the replayed event's inbox row survives retention");
    assert_eq!(
        count(
            &app,
            &format!(
                "select count(*) from inbox where event_id = '{}-m-late'",
                env.tag
            )
        )
        .await,
        0,
        "other rows are pruned"
    );
    // Replayed again on purpose: republished, and still a no-op.
    let out = cli(&env, &["dead-letters", "replay", "--all", "--again"]);
    assert!(out.contains("1 dead letters replayed"), "{out}");
    let settled_at = Instant::now();
    wait_for("the replay consumed", || async {
        let q = lifecycle::testkit::queues::snapshot(&app).await.ok()?;
        (q.events.messages == 0 && settled_at.elapsed() > Duration::from_millis(500)).then_some(())
    })
    .await;
    assert_eq!(balance().await, Some(125), "applied once");
    let entries: i64 = count(
        &app,
        "select count(*) from point_entries where member_id = 'm-late' and kind = 'adjustment'",
    )
    .await;
    assert_eq!(entries, 1);
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_replica_picks_up_publishes_that_commit_out_of_order() {
    let env = TestEnv::new(&[]);
    let worker = env.start(DISPATCH_ONLY).await;
    let app = worker.app.clone();
    let en = files_with_sms(&app, Trigger::Welcome, "en", "Hello en {{first_name}} STOP");
    let ko = files_with_sms(&app, Trigger::Welcome, "ko", "Hello ko {{first_name}} STOP");
    store_version(&app, "welcome", "en", 1, en).await;
    store_version(&app, "welcome", "ko", 1, ko).await;
    // Publish A takes its sequence number first but commits last.
    let mut a = app.pool.begin().await.unwrap();
    sqlx::query(
        "insert into template_heads (trigger, locale, version, published_by)
         values ('welcome', 'en', 1, 'a')",
    )
    .execute(&mut *a)
    .await
    .unwrap();
    sqlx::query(
        "insert into template_heads (trigger, locale, version, published_by)
         values ('welcome', 'ko', 1, 'b')",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let version = |locale: &'static str| {
        let app = app.clone();
        move || {
            let v = app.templates.current().version(Trigger::Welcome, locale);
            async move { (v == 1).then_some(()) }
        }
    };
    wait_for("publish B seen", version("ko")).await;
    a.commit().await.unwrap();
    let committed = Instant::now();
    common::wait_up_to(Duration::from_secs(2), version("en"))
        .await
        .expect("publish A seen within 2 s of its commit");
    println!("publish A seen {:?} after its commit", committed.elapsed());
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "a million rows; run alone with --run-ignored only"]
async fn a_million_failed_messages_are_retried_in_pages_with_bounded_memory() {
    const FAILED: i64 = 1_000_000;
    let env = TestEnv::new(&[]);
    let app = env.app().await;
    sqlx::query(
        "insert into messages (dedupe_key, member_id, trigger, channel, context, status, due_at,
                               attempts, last_error, finished_at)
         select 'bulk:' || n, 'm' || (n % 1000), 'welcome', 'email', '{}', 'failed', now(), 8,
                'provider down', now()
         from generate_series(1, $1) as n",
    )
    .bind(FAILED)
    .execute(&app.pool)
    .await
    .unwrap();
    let started = Instant::now();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_lifecycle"))
        .args(["deliveries", "retry", "--failed", "--trigger", "welcome"])
        .envs(env.env_vars())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The high-water mark of its resident memory, read until it exits.
    let mut peak_kib = 0;
    let status = loop {
        if let Ok(text) = std::fs::read_to_string(format!("/proc/{}/status", child.id())) {
            let hwm = text
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
            peak_kib = peak_kib.max(hwm.unwrap_or(0));
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "retry took too long"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut out = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out).unwrap();
    assert!(status.success(), "{out}");
    assert!(
        out.contains(&format!("{FAILED} failed messages queued again")),
        "{out}"
    );
    assert_eq!(
        count(
            &app,
            "select count(*) from messages where status = 'pending'"
        )
        .await,
        FAILED
    );
    println!(
        "retried {FAILED} failed messages in {:?}, peak resident {} MiB",
        started.elapsed(),
        peak_kib / 1024
    );
    assert!(peak_kib < 64 * 1024, "peak resident {peak_kib} KiB");
    app.pool.close().await;
    env.cleanup().await;
}

/// Headers nested as deep as one 128 KiB frame holds (each level an empty name, a type and a
/// length: 6 bytes).
const DEEP_HEADERS: usize = 20_000;

/// Not a test of its own: run in a child process by
/// `headers_nested_twenty_thousand_deep_stop_no_worker` with `DEEP_HEADERS_TO` set and stacks
/// large enough for lapin to write such headers (its writer recurses per level too), it
/// publishes one body with them.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a helper process of headers_nested_twenty_thousand_deep_stop_no_worker"]
async fn publish_deep_headers() {
    use lapin::types::{AMQPValue, FieldTable};
    let Ok(to) = std::env::var("DEEP_HEADERS_TO") else {
        return;
    };
    let (url, exchange) = to.split_once(' ').unwrap();
    let mut headers = FieldTable::default();
    for _ in 0..DEEP_HEADERS {
        let mut outer = FieldTable::default();
        outer.insert("".into(), AMQPValue::FieldTable(headers));
        headers = outer;
    }
    let connection = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(Default::default()).await.unwrap();
    channel
        .basic_publish(
            exchange.into(),
            "member.enrolled".into(),
            Default::default(),
            b"not json, with deep headers",
            lapin::BasicProperties::default().with_headers(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    connection.close(200, "bye".into()).await.ok();
    println!("published {DEEP_HEADERS} deep");
}

#[tokio::test(flavor = "multi_thread")]
async fn headers_nested_twenty_thousand_deep_stop_no_worker() {
    let sink = SmtpSink::start(&[]);
    let env = TestEnv::with_smtp(&sink);
    let app = env.app().await;
    let mut serve = Serve::start_with(&env, &[], std::process::Stdio::inherit());
    let enrol = |m: &str| {
        let address = format!("{m}@example.com");
        enrolled(
            &format!("{}-{m}", env.tag),
            m,
            Some(&address),
            None,
            "en",
            "Ada",
            (true, false),
        )
    };
    // Published first, it also declares the exchange and queues.
    env.publish(&[enrol("m-before")]).await;
    let published = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "publish_deep_headers",
            "--ignored",
            "--nocapture",
        ])
        .env("RUST_MIN_STACK", (256 << 20).to_string())
        .env(
            "DEEP_HEADERS_TO",
            format!(
                "{} {}",
                env.settings.amqp_url.expose(),
                env.settings.exchange
            ),
        )
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&published.stdout);
    assert!(said.contains("published 20000 deep"), "{said}");
    // Once, reading these headers overflowed lapin's thread and aborted the process.
    env.publish(&[enrol("m-after")]).await;
    wait_for("both welcomes at the sink", || async {
        (sink.messages().len() == 2).then_some(())
    })
    .await;
    wait_for("the dead letter stored", || async {
        (count(&app, "select count(*) from dead_letters").await == 1).then_some(())
    })
    .await;
    let headers: String = sqlx::query_scalar("select headers::text from dead_letters")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert!(headers.contains("nested deeper than 16"), "{headers}");
    assert!(headers.len() < 1_000, "{headers}");
    assert_eq!(
        serve.terminate().await.code(),
        Some(0),
        "serve ran on and left on SIGTERM"
    );
    env.cleanup().await;
}
