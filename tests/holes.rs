//! One test per hole the fault-injection issue found, each of which failed before its fix:
//! claims with owners, results recorded one by one, a failed record retried, SMTP after DATA,
//! the marketing cap across dispatchers, scans that fail alone, scan keys apart from event
//! ids, a changed retry delay, the HTTP server's limits, templates found from any directory,
//! and retention; and one found later by the speed issue: a claim that read every message
//! scheduled for later.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::smtp_relay::{Fault, SmtpRelay};
use common::{
    ALL_ROLES, INGEST_ONLY, Serve, SmtpSink, TestEnv, count, enrolment, enrolments, free_port,
    wait_for, wait_up_to,
};
use lifecycle::testkit::app::Roles;
use lifecycle::testkit::dispatch::{Dispatcher, Step};
use lifecycle::testkit::domain::Trigger;
use lifecycle::testkit::notifications::Sinks;
use lifecycle::testkit::outbox::{self, Settled, Status};
use lifecycle::testkit::worker::Worker;
use serde_json::json;

fn dispatcher(app: &lifecycle::testkit::app::App) -> Dispatcher {
    Dispatcher::new(app.clone()).unwrap()
}

/// Enrols `n` members with only ingest running and waits until their welcomes are planned.
async fn planned(env: &TestEnv, n: usize) -> Worker {
    let worker = env.start(INGEST_ONLY).await;
    env.publish(&enrolments(env, n)).await;
    let app = worker.app.clone();
    wait_for("the welcomes planned", || async {
        (count(&app, "select count(*) from messages").await == n as i64).then_some(())
    })
    .await;
    worker
}

#[tokio::test(flavor = "multi_thread")]
async fn only_the_owner_of_a_claim_settles_it_and_a_lapsed_claim_is_recorded_unsure() {
    let env = TestEnv::new(&[]);
    let worker = planned(&env, 1).await;
    let pool = worker.app.pool.clone();
    let now = worker.app.clock.now();
    let lease = Duration::from_secs(30);
    let mine = outbox::claim(&pool, "dispatcher-a", now, 10, lease)
        .await
        .unwrap();
    assert_eq!(mine.len(), 1);
    let id = mine[0].as_ref().unwrap().id;
    // A stalls past its lease; B takes the message over.
    sqlx::query("update messages set claimed_until = now() - interval '1 second'")
        .execute(&pool)
        .await
        .unwrap();
    let theirs = outbox::claim(&pool, "dispatcher-b", now, 10, lease)
        .await
        .unwrap();
    assert_eq!(theirs.len(), 1);
    assert_eq!(theirs[0].as_ref().unwrap().attempt, 2);
    // A's lost claim is on record as an unsure attempt: it may have sent the message.
    let attempts: Vec<(i32, String)> =
        sqlx::query_as("select attempt, outcome from delivery_attempts order by id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(attempts, [(1, "unsure".to_owned())]);
    // A comes back: it can neither renew nor settle B's claim.
    assert_eq!(
        outbox::renew(&pool, "dispatcher-a", &[id], lease)
            .await
            .unwrap(),
        0
    );
    let mut failed = Settled::new(id);
    failed.error = Some("from a stale dispatcher".into());
    let sinks = Sinks::of(&env.settings);
    let lost = outbox::record(&pool, sinks, "dispatcher-a", &[failed])
        .await
        .unwrap();
    assert_eq!(lost, [id]);
    let (status, owner): (String, Option<String>) =
        sqlx::query_as("select status, claimed_by from messages where id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        (status.as_str(), owner.as_deref()),
        ("sending", Some("dispatcher-b"))
    );
    // B settles it.
    assert_eq!(
        outbox::renew(&pool, "dispatcher-b", &[id], lease)
            .await
            .unwrap(),
        1
    );
    let mut sent = Settled::new(id);
    sent.status = Status::Sent;
    assert!(
        outbox::record(&pool, sinks, "dispatcher-b", &[sent])
            .await
            .unwrap()
            .is_empty()
    );
    // The platform hears of the message once, as B settled it: A's stale result is not told.
    let told: Vec<(String, serde_json::Value)> =
        sqlx::query_as("select type, data::jsonb from notifications where type like 'message.%'")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(told.len(), 1, "{told:?}");
    assert_eq!(told[0].0, "message.sent");
    assert_eq!(told[0].1["message_id"], id);
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_dispatcher_resends_only_what_was_in_flight_and_records_it_unsure() {
    const MEMBERS: usize = 400;
    let sink = SmtpSink::start(&[]);
    // A slow relay keeps many messages in flight when the worker dies.
    let env = TestEnv::with_smtp(&sink);
    let worker = planned(&env, MEMBERS).await;
    let app = worker.app.clone();
    let mut serve = Serve::start_with(
        &env,
        &[
            ("LIFECYCLE_INGEST__CONSUMERS", "1".into()),
            ("LIFECYCLE_DISPATCH__BATCH_SIZE", "200".into()),
            ("LIFECYCLE_DISPATCH__CONCURRENCY", "4".into()),
            ("LIFECYCLE_DISPATCH__PIPELINES", "1".into()),
        ],
        std::process::Stdio::inherit(),
    );
    // Killed once the sink has forty mails of the 200-message batch: sent, recorded or not.
    wait_for("some mail at the sink", || async {
        (sink.messages().len() >= 40).then_some(())
    })
    .await;
    serve.kill();
    let recorded_sent = count(&app, "select count(*) from messages where status = 'sent'").await;
    let claimed = count(
        &app,
        "select count(*) from messages where status = 'sending'",
    )
    .await;
    assert!(claimed > 0, "killed while messages were claimed");
    // The batch was claimed as one; every result already recorded stays so. Only the
    // unrecorded claims go again, within the (2 s) lease.
    let mut again = Serve::start(&env);
    wait_for("every welcome sent", || async {
        (count(&app, "select count(*) from messages where status = 'sent'").await == MEMBERS as i64)
            .then_some(())
    })
    .await;
    assert!(again.terminate().await.success());
    let mut copies: std::collections::HashMap<String, usize> = Default::default();
    for raw in sink.messages() {
        *copies
            .entry(common::parse_mail(&raw).message_id)
            .or_default() += 1;
    }
    assert_eq!(copies.len(), MEMBERS, "every message reached the sink");
    let unsure: Vec<String> = sqlx::query_scalar(
        "select distinct message_id::text from delivery_attempts where outcome = 'unsure'",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    for (id, n) in &copies {
        assert!(
            *n == 1 || unsure.contains(id),
            "message {id} sent {n} times without an unsure attempt"
        );
    }
    let duplicates = copies.values().filter(|n| **n > 1).count();
    assert!(
        duplicates as i64 <= 4 + 1,
        "{duplicates} duplicates: at most the sends in flight (concurrency 4); {recorded_sent} recorded sent at the kill"
    );
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_whose_stored_names_do_not_parse_fails_alone() {
    let sink = SmtpSink::start(&[]);
    let env = TestEnv::with_smtp(&sink);
    let worker = planned(&env, 2).await;
    let app = worker.app.clone();
    // A trigger this release does not know (written by a later one, or by hand).
    let odd: i64 = sqlx::query_scalar(
        "update messages set trigger = 'retired-trigger'
         where id = (select min(id) from messages) returning id",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let d = dispatcher(&app);
    assert_eq!(d.try_execute_once().await.unwrap(), Step::Settled(2));
    let states: Vec<(i64, String, Option<String>)> =
        sqlx::query_as("select id, status, last_error from messages order by id")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(states.len(), 2);
    assert_eq!(
        (states[0].0, states[0].1.as_str(), states[0].2.as_deref()),
        (odd, "failed", Some("unknown trigger \"retired-trigger\""))
    );
    assert_eq!(states[1].1, "sent", "the other member's welcome goes");
    assert_eq!(sink.messages().len(), 1);
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_record_is_retried_until_it_succeeds() {
    let sink = SmtpSink::start(&[]);
    let env = TestEnv::with_smtp(&sink);
    let worker = planned(&env, 1).await;
    let app = worker.app.clone();
    // Recording will fail: the database refuses every attempt row for now, with an error
    // that may pass (a serialization failure).
    for sql in [
        "create function refuse() returns trigger language plpgsql
         as $$ begin raise exception 'refused for the test' using errcode = '40001'; end $$",
        "create trigger refuse before insert on delivery_attempts
         for each row execute function refuse()",
    ] {
        sqlx::query(sql).execute(&app.pool).await.unwrap();
    }
    let d = dispatcher(&app);
    let step = tokio::spawn(async move { d.try_execute_once().await.unwrap() });
    wait_for("the mail at the sink", || async {
        (sink.messages().len() == 1).then_some(())
    })
    .await;
    // The result is not lost while the database refuses it…
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!step.is_finished(), "still retrying the record");
    sqlx::query("drop trigger refuse on delivery_attempts")
        .execute(&app.pool)
        .await
        .unwrap();
    // …and lands once it can.
    assert_eq!(step.await.unwrap(), Step::Settled(1));
    assert_eq!(
        count(&app, "select count(*) from messages where status = 'sent'").await,
        1
    );
    assert_eq!(
        count(
            &app,
            "select count(*) from delivery_attempts where outcome = 'sent'"
        )
        .await,
        1
    );
    assert_eq!(sink.messages().len(), 1, "sent once");
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_smtp_connection_lost_after_the_data_is_unsure_and_does_not_fail_over() {
    let sink = SmtpSink::start(&[]);
    let relay = SmtpRelay::start(sink.port, |n| {
        if n == 0 {
            Fault::DropAfterDot
        } else {
            Fault::None
        }
    })
    .await;
    let env = TestEnv::new(&[
        ("LIFECYCLE_EMAIL_PROVIDERS", "smtp,file".into()),
        ("LIFECYCLE_SMTP_URL", relay.url()),
        ("LIFECYCLE_DISPATCH__RETRY_BASE_MS", "60000".into()),
    ]);
    let worker = planned(&env, 1).await;
    let app = worker.app.clone();
    let d = dispatcher(&app);
    assert_eq!(d.try_execute_once().await.unwrap(), Step::Settled(1));
    // The server has the mail; lifecycle cannot know it, so it neither fails over to the file
    // provider nor calls it a plain failure.
    assert_eq!(sink.messages().len(), 1);
    let attempts: Vec<(String, String)> =
        sqlx::query_as("select provider, outcome from delivery_attempts order by id")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(attempts, [("smtp".to_owned(), "unsure".to_owned())]);
    let status: String = sqlx::query_scalar("select status from messages")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(status, "pending", "retried later, through smtp");
    let files = std::fs::read_dir(env.outbox.path()).unwrap().count();
    assert_eq!(files, 0, "no copy through the file provider");
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_dispatchers_never_both_send_a_marketing_message_inside_the_cap() {
    let env = TestEnv::new(&[
        ("LIFECYCLE_DISPATCH__BATCH_SIZE", "1".into()),
        ("LIFECYCLE_NOW", "2026-11-22T12:00:00Z".into()),
    ]);
    let worker = env.start(INGEST_ONLY).await;
    let app = worker.app.clone();
    env.publish(&[enrolment(&env, 1)]).await;
    wait_for("enrolled", || async {
        (count(&app, "select count(*) from members").await == 1).then_some(())
    })
    .await;
    // Two abandoned-cart messages for one member, due now.
    sqlx::query(
        "insert into messages (dedupe_key, member_id, trigger, channel, context, due_at)
         select 'abandoned-cart:c' || n || ':1:email', 'm-1', 'abandoned-cart', 'email', $1, $2
         from generate_series(1, 2) n",
    )
    .bind(lifecycle::testkit::render::sample_context(
        lifecycle::testkit::domain::Trigger::AbandonedCart,
    ))
    .bind(app.clock.now())
    .execute(&app.pool)
    .await
    .unwrap();
    sqlx::query("update messages set status = 'sent' where trigger = 'welcome'")
        .execute(&app.pool)
        .await
        .unwrap();
    let (a, b) = (dispatcher(&app), dispatcher(&app));
    let (one, two) = tokio::join!(a.try_execute_once(), b.try_execute_once());
    assert_eq!(
        (one.unwrap(), two.unwrap()),
        (Step::Settled(1), Step::Settled(1))
    );
    let states: Vec<(String, Option<String>)> = sqlx::query_as(
        "select status, last_error from messages where trigger = 'abandoned-cart' order by status",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(states.len(), 2);
    assert_eq!(states[0].0, "pending", "{states:?}");
    assert!(states[0].1.as_deref().unwrap().contains("frequency cap"));
    assert_eq!(states[1].0, "sent", "{states:?}");
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_changed_retry_delay_and_an_older_retry_queue_do_not_stop_ingest() {
    let env = TestEnv::new(&[("LIFECYCLE_INGEST__RETRY_DELAY_MS", "500".into())]);
    // The retry queue as an older version declared it: with its delay as a queue argument.
    let connection = lifecycle::testkit::amqp::connect(&env.settings.amqp_url, "test")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let mut args = lapin::types::FieldTable::default();
    for (k, v) in [
        (
            "x-queue-type",
            lapin::types::AMQPValue::LongString("quorum".into()),
        ),
        ("x-message-ttl", lapin::types::AMQPValue::LongLongInt(300)),
        (
            "x-dead-letter-exchange",
            lapin::types::AMQPValue::LongString("".into()),
        ),
        (
            "x-dead-letter-routing-key",
            lapin::types::AMQPValue::LongString(env.settings.ingest.queue.as_str().into()),
        ),
    ] {
        args.insert(k.into(), v);
    }
    channel
        .queue_declare(
            env.settings.ingest.retry_queue.as_str().into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .unwrap();
    connection.close(200, "bye".into()).await.ok();

    let worker = env.start(ALL_ROLES).await;
    let app = worker.app.clone();
    let order = json!({"specversion": "1.0", "id": format!("{}-o", env.tag), "source": "test",
        "type": "order.placed", "time": "2026-11-22T10:00:00Z",
        "data": {"order_id": "o1", "member_id": "m-1", "total": 5000, "currency": "USD", "items": []}})
    .to_string();
    // The order comes before its member: it waits in the retry queue, then applies.
    env.publish(&[order]).await;
    wait_for("the order deferred", || async {
        (lifecycle::testkit::metrics::Metrics::get(&app.metrics.events_deferred) >= 1).then_some(())
    })
    .await;
    env.publish(&[enrolment(&env, 1)]).await;
    wait_for(
        "the order applied through the older retry queue",
        || async { (count(&app, "select count(*) from orders").await == 1).then_some(()) },
    )
    .await;
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_id_shaped_like_a_scan_key_does_not_take_the_birthday_bonus() {
    let env = TestEnv::new(&[
        ("LIFECYCLE_NOW", "2026-11-22T12:00:00Z".into()),
        ("LIFECYCLE_PROGRAM__BIRTHDAY_BONUS", "50".into()),
        ("LIFECYCLE_SCHEDULER__BIRTHDAY", "* * * * * *".into()),
    ]);
    let worker = env.start(INGEST_ONLY).await;
    let app = worker.app.clone();
    let member = |id: &str, kind: &str, data: serde_json::Value| {
        json!({"specversion": "1.0", "id": id, "source": "test", "type": kind,
               "time": "2026-11-22T08:00:00Z", "data": data})
        .to_string()
    };
    env.publish(&[
        member(
            &format!("{}-e", env.tag),
            "member.enrolled",
            json!({"member_id": "m-bday", "email": "b@example.com", "locale": "en",
                   "timezone": "UTC", "birthday": "11-22", "consent": {"email": true, "sms": false}}),
        ),
        // An event whose id is exactly the birthday bonus's key this year.
        member(
            "birthday:m-bday:2026",
            "points.adjusted",
            json!({"member_id": "m-bday", "points": 1, "reason": "manual"}),
        ),
    ])
    .await;
    wait_for("both events applied", || async {
        (count(&app, "select count(*) from inbox").await == 2).then_some(())
    })
    .await;
    let planned = lifecycle::testkit::scheduler::run_scan(
        &app,
        lifecycle::testkit::scheduler::Job::Birthday,
        app.clock.now(),
    )
    .await
    .unwrap();
    assert!(planned > 0, "the birthday message planned");
    let balance: i64 = sqlx::query_scalar("select balance from members where member_id = 'm-bday'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(
        balance,
        100 + 1 + 50,
        "signup, the adjustment, and the birthday bonus"
    );
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_scan_does_not_keep_the_others_from_running() {
    let env = TestEnv::new(&[
        ("LIFECYCLE_NOW", "2026-11-22T12:00:00Z".into()),
        ("LIFECYCLE_SCHEDULER__EXPIRY", "* * * * * *".into()),
        ("LIFECYCLE_SCHEDULER__CARTS", "* * * * * *".into()),
    ]);
    let worker = env.start(INGEST_ONLY).await;
    let app = worker.app.clone();
    let event = |id: String, kind: &str, data: serde_json::Value| {
        json!({"specversion": "1.0", "id": id, "source": "test", "type": kind,
               "time": "2026-11-22T10:00:00Z", "data": data})
        .to_string()
    };
    env.publish(&[
        enrolment(&env, 1),
        event(
            format!("{}-c", env.tag),
            "cart.updated",
            json!({"cart_id": "c1", "member_id": "m-1", "total": 900, "currency": "USD",
                   "items": [], "checkout_url": "https://shop.example/c1"}),
        ),
    ])
    .await;
    wait_for("applied", || async {
        (count(&app, "select count(*) from inbox").await == 2).then_some(())
    })
    .await;
    // The expiry scan (the first of a tick) will fail: the member's bonus has lapsed, and the
    // database refuses the expiry's journal entry.
    for sql in [
        "update point_lots set expires_at = '2026-11-01T00:00:00Z'",
        "create function refuse_expiry() returns trigger language plpgsql as $$
         begin
             if new.kind = 'expiry' then raise exception 'the expiry scan is broken'; end if;
             return new;
         end $$",
        "create trigger refuse_expiry before insert on point_entries
         for each row execute function refuse_expiry()",
    ] {
        sqlx::query(sql).execute(&app.pool).await.unwrap();
    }
    let scheduler = Worker::start(
        app.clone(),
        Roles {
            ingest: false,
            dispatch: false,
            schedule: true,
            http: false,
        },
    )
    .await
    .unwrap();
    wait_for(
        "the cart's message planned despite the failing expiry scan",
        || async {
            (count(
                &app,
                "select count(*) from messages where trigger = 'abandoned-cart'",
            )
            .await
                > 0)
            .then_some(())
        },
    )
    .await;
    let expiry_ran = count(
        &app,
        "select count(*) from scheduled_jobs where job = 'expiry' and last_run is not null",
    )
    .await;
    assert_eq!(expiry_ran, 0, "the expiry scan did fail");
    scheduler.stop().await.unwrap();
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_prunes_old_rows_and_keeps_their_dedupe_keys() {
    let env = TestEnv::new(&[
        ("LIFECYCLE_RETENTION__INBOX_DAYS", "1".into()),
        ("LIFECYCLE_RETENTION__MESSAGES_DAYS", "1".into()),
        ("LIFECYCLE_RETENTION__ATTEMPTS_DAYS", "1".into()),
        ("LIFECYCLE_RETENTION__PAGE_SIZE", "2".into()),
    ]);
    let worker = env.start(ALL_ROLES).await;
    let app = worker.app.clone();
    env.publish(&enrolments(&env, 5)).await;
    wait_for("welcomes sent", || async {
        (count(&app, "select count(*) from messages where status = 'sent'").await == 5)
            .then_some(())
    })
    .await;
    // Three inbox rows and three messages are two days old, and the attempts of two of those
    // messages: the third message's attempt goes with its message, young as it is.
    for sql in [
        "update inbox set applied_at = now() - interval '2 days' where event_id in (select event_id from inbox order by event_id limit 3)",
        "update messages set created_at = now() - interval '2 days', finished_at = now() - interval '2 days' where id in (select id from messages order by id limit 3)",
        "update delivery_attempts set at = now() - interval '2 days' where message_id in (select id from messages order by id limit 2)",
    ] {
        sqlx::query(sql).execute(&app.pool).await.unwrap();
    }
    let keys: Vec<String> =
        sqlx::query_scalar("select dedupe_key from messages order by id limit 3")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    lifecycle::testkit::scheduler::run_scan(
        &app,
        lifecycle::testkit::scheduler::Job::Retention,
        app.clock.now(),
    )
    .await
    .unwrap();
    assert_eq!(count(&app, "select count(*) from inbox").await, 2);
    assert_eq!(count(&app, "select count(*) from messages").await, 2);
    assert_eq!(
        count(&app, "select count(*) from delivery_attempts").await,
        2
    );
    let retired: Vec<String> =
        sqlx::query_scalar("select dedupe_key from retired_keys order by dedupe_key")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    let mut keys = keys;
    keys.sort();
    assert_eq!(retired, keys);
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_http_server_cannot_be_held_and_says_which_roles_are_ready() {
    let addr = format!("127.0.0.1:{}", free_port());
    let env = TestEnv::new(&[("LIFECYCLE_HTTP_ADDR", addr.clone())]);
    let worker = env
        .start(Roles {
            ingest: true,
            dispatch: true,
            schedule: true,
            http: true,
        })
        .await;
    // Ready: each role reports itself.
    let ready = wait_up_to(Duration::from_secs(30), || async {
        let answer = reqwest::get(format!("http://{addr}/readyz")).await.ok()?;
        (answer.status() == 200).then_some(())?;
        answer.json::<serde_json::Value>().await.ok()
    })
    .await
    .expect("ready");
    assert_eq!(ready["ready"], true);
    assert!(
        ready["ingest"]["consumers"].as_u64().unwrap() > 0,
        "{ready}"
    );
    assert!(ready["dispatch"]["loops"].as_u64().unwrap() > 0, "{ready}");
    assert_eq!(ready["scheduler"]["alive"], true);
    assert_eq!(ready["database"]["alive"], true);

    // A body declared over 1 MiB: 413 before any of it is read. (Sending the body as well
    // raced the answer: the server may hang up while the client is still writing, and the
    // client then sees a broken pipe instead of the 413.)
    let big = {
        let addr = addr.clone();
        tokio::task::spawn_blocking(move || {
            let mut stream = std::net::TcpStream::connect(&addr).unwrap();
            stream
                .write_all(
                    b"POST /webhooks/twilio/inbound HTTP/1.1\r\nHost: x\r\n\
                      Content-Type: application/x-www-form-urlencoded\r\n\
                      Content-Length: 2097152\r\n\r\n",
                )
                .unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            let mut head = [0u8; 12];
            stream.read_exact(&mut head).unwrap();
            head
        })
        .await
        .unwrap()
    };
    assert_eq!(&big, b"HTTP/1.1 413", "{}", String::from_utf8_lossy(&big));

    // Half-sent headers: the server hangs up after its header timeout (10 s).
    let started = std::time::Instant::now();
    let closed = tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(&addr).unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut buffer = Vec::new();
        stream.read_to_end(&mut buffer).is_ok()
    })
    .await
    .unwrap();
    assert!(closed, "the connection was closed, not left open");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(9) && waited < Duration::from_secs(25),
        "closed after {waited:?}"
    );
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn templates_are_found_from_any_directory_and_a_missing_one_is_named() {
    let check = |dir: Option<&str>| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_lifecycle"));
        command
            .args(["templates", "check"])
            .current_dir("/")
            .env_remove("LIFECYCLE_TEMPLATES_DIR");
        if let Some(dir) = dir {
            command.env("LIFECYCLE_TEMPLATES_DIR", dir);
        }
        command.output().unwrap()
    };
    let shipped = check(None);
    assert!(shipped.status.success(), "{shipped:?}");
    assert!(String::from_utf8_lossy(&shipped.stdout).contains("the shipped templates are valid"));
    let missing = check(Some("/nonexistent/templates"));
    assert!(!missing.status.success());
    let error = String::from_utf8_lossy(&missing.stderr);
    assert!(
        error.contains("/nonexistent/templates") && error.contains("LIFECYCLE_TEMPLATES_DIR"),
        "{error}"
    );
    // A directory without every trigger's default locale is refused, naming what is missing.
    let partial = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(partial.path().join("welcome/en")).unwrap();
    let refused = check(Some(partial.path().to_str().unwrap()));
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("/en/ is missing"),
        "{refused:?}"
    );

    // `serve` from another directory, without the variable, sends with the shipped ones.
    let env = TestEnv::new(&[]);
    let app = env.app().await;
    let mut serve = {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_lifecycle"))
            .arg("serve")
            .current_dir("/")
            .envs(env.env_vars())
            .env_remove("LIFECYCLE_TEMPLATES_DIR")
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        Serve(child)
    };
    env.publish(&[enrolment(&env, 1)]).await;
    wait_for("the welcome sent", || async {
        (count(&app, "select count(*) from messages where status = 'sent'").await == 1)
            .then_some(())
    })
    .await;
    assert!(serve.terminate().await.success());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_claim_reads_only_what_is_due_not_the_whole_outbox() {
    let env = TestEnv::new(&[]);
    let worker = planned(&env, 1).await;
    let pool = worker.app.pool.clone();
    // A shop's outbox: mostly history, and messages scheduled for later.
    sqlx::query(
        "insert into messages (dedupe_key, member_id, trigger, channel, context, status, due_at)
         select 'later:' || n, 'm' || n, 'abandoned_cart', 'email', '{}',
                case when n % 2 = 0 then 'sent' else 'pending' end,
                now() + case when n % 2 = 0 then interval '-1 day' else interval '1 hour' end
         from generate_series(1, 20000) n",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("analyze messages")
        .execute(&pool)
        .await
        .unwrap();
    // Planned as `claim` runs it.
    let mut tx = lifecycle::testkit::db::begin_keyed(&pool).await.unwrap();
    let (plan,): (serde_json::Value,) =
        sqlx::query_as(&format!("explain (format json) {}", outbox::CLAIM))
            .bind(worker.app.clock.now())
            .bind(500_i64)
            .bind(30.0_f64)
            .bind("dispatcher-a")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
    tx.rollback().await.unwrap();
    // Every scan of `messages` in the plan: its kind, the index it uses, and its condition.
    type Scan = (String, Option<String>, Option<String>);
    fn scans(node: &serde_json::Value, found: &mut Vec<Scan>) {
        if node["Relation Name"] == "messages" {
            let text = |key: &str| node[key].as_str().map(str::to_owned);
            found.push((
                text("Node Type").unwrap(),
                text("Index Name"),
                text("Index Cond"),
            ));
        }
        for child in node["Plans"].as_array().into_iter().flatten() {
            scans(child, found);
        }
    }
    let mut found = Vec::new();
    scans(&plan[0]["Plan"], &mut found);
    // The due messages come from a range of `messages_due`, not the whole index…
    assert!(
        found.iter().any(|(_, index, condition)| {
            index.as_deref() == Some("messages_due")
                && condition
                    .as_deref()
                    .is_some_and(|c| c.contains("due_at <="))
        }),
        "the due messages are not read as a range of messages_due: {found:?}"
    );
    // …and nothing reads the whole table.
    assert!(
        found.iter().all(|(node, _, _)| !node.contains("Seq Scan")),
        "the claim reads the whole outbox: {found:?}\n{plan:#}"
    );
    // And it claims the one message that is due.
    let claimed = outbox::claim(
        &pool,
        "dispatcher-a",
        worker.app.clock.now(),
        500,
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].as_ref().unwrap().trigger, Trigger::Welcome);
    worker.stop().await.unwrap();
    env.cleanup().await;
}
