//! Crashes and outages: nothing lost, nothing applied twice.
//!
//! The restart tests stop RabbitMQ or PostgreSQL for everyone on the machine, so they are
//! ignored in the parallel run and run one at a time by `scripts/test` (`--run-ignored only`).

mod common;

use std::time::Duration;

use common::{ALL_ROLES, Serve, TestEnv, count, enrolled, wait_for};

const EVENTS: usize = 3_000;

fn events(env: &TestEnv) -> Vec<String> {
    common::enrolments(env, EVENTS)
}

/// Every message planned, sent, and written exactly once per member.
async fn assert_everything_once(env: &TestEnv, app: &lifecycle::testkit::app::App) {
    // A generous limit: the point is that everything arrives, and a loaded CI machine with a
    // crashed worker's leases to wait out can take a while.
    let done = common::wait_up_to(Duration::from_secs(120), || async {
        let applied = count(app, "select count(*) from inbox").await;
        let sent = count(app, "select count(*) from messages where status = 'sent'").await;
        (applied == EVENTS as i64 && sent == EVENTS as i64).then_some(())
    })
    .await;
    if done.is_none() {
        let states: Vec<(String, i64, i32)> = sqlx::query_as(
            "select status, count(*), max(attempts) from messages group by status order by status",
        )
        .fetch_all(&app.pool)
        .await
        .unwrap();
        let applied = count(app, "select count(*) from inbox").await;
        panic!(
            "not everything arrived in 120 s: {applied} events applied; messages (status, count, max attempts): {states:?}"
        );
    }
    assert_eq!(
        count(app, "select count(*) from messages").await,
        EVENTS as i64,
        "one welcome per member"
    );
    assert_eq!(
        count(app, "select count(distinct member_id) from messages").await,
        EVENTS as i64
    );
    assert_eq!(
        count(app, "select count(*) from members").await,
        EVENTS as i64
    );
    let emails = std::fs::read_dir(env.outbox.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "eml")
        })
        .count();
    assert_eq!(
        emails, EVENTS,
        "one .eml per message: a re-send after a crash rewrites the same file"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_mid_stream_then_restart_processes_every_event_once() {
    let env = TestEnv::new(&[]);
    let app = env.app().await;
    env.publish(&events(&env)).await;

    let mut first = Serve::start(&env);
    wait_for("ingest under way", || async {
        (count(&app, "select count(*) from inbox").await >= 300).then_some(())
    })
    .await;
    first.kill();
    let applied_before_restart = count(&app, "select count(*) from inbox").await;
    assert!(
        applied_before_restart < EVENTS as i64,
        "killed mid-stream ({applied_before_restart} of {EVENTS} applied)"
    );

    let mut second = Serve::start(&env);
    assert_everything_once(&env, &app).await;
    // SIGTERM: finish in-flight work and exit 0.
    let status = second.terminate().await;
    assert!(status.success(), "graceful shutdown exits 0, got {status}");
    env.cleanup().await;
}

/// Starts a worker on queued events, runs `restart` once ingest is under way, and checks
/// that everything still happens exactly once.
async fn restart_mid_stream(restart: impl FnOnce()) {
    let env = TestEnv::new(&[("LIFECYCLE_DISPATCH__LEASE_SECS", "2".into())]);
    env.publish(&events(&env)).await;
    let worker = env.start(ALL_ROLES).await;
    let app = worker.app.clone();
    wait_for("ingest under way", || async {
        (count(&app, "select count(*) from inbox").await >= 300).then_some(())
    })
    .await;
    let applied = count(&app, "select count(*) from inbox").await;
    assert!(
        applied < EVENTS as i64,
        "restarted mid-stream ({applied} of {EVENTS} applied)"
    );
    restart();
    assert_everything_once(&env, &app).await;
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "restarts RabbitMQ; run alone with --run-ignored only"]
async fn broker_restart_mid_stream_loses_and_duplicates_nothing() {
    restart_mid_stream(common::restart_rabbitmq).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "restarts PostgreSQL; run alone with --run-ignored only"]
async fn postgres_restart_mid_stream_loses_and_duplicates_nothing() {
    restart_mid_stream(common::restart_postgres).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_cancel_is_followed_by_a_new_consumer() {
    let env = TestEnv::new(&[]);
    let worker = env.start(ALL_ROLES).await;
    let app = worker.app.clone();
    let t = &env.tag;
    env.publish(&[enrolled(
        &format!("{t}-1"),
        "m-1",
        Some("one@example.com"),
        None,
        "en",
        "One",
        (true, false),
    )])
    .await;
    wait_for("the first event applied", || async {
        (count(&app, "select count(*) from inbox").await == 1).then_some(())
    })
    .await;

    // Deleting the queue makes the broker cancel every consumer of it.
    let connection = lifecycle::testkit::amqp::connect(&env.settings.amqp_url, "test")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_delete(
            env.settings.ingest.queue.as_str().into(),
            Default::default(),
        )
        .await
        .unwrap();
    connection.close(200, "bye".into()).await.ok();

    // Publishing declares the topology again; only a worker that consumes again applies this.
    env.publish(&[enrolled(
        &format!("{t}-2"),
        "m-2",
        Some("two@example.com"),
        None,
        "en",
        "Two",
        (true, false),
    )])
    .await;
    wait_for("the second event applied by a new consumer", || async {
        (count(&app, "select count(*) from inbox").await == 2).then_some(())
    })
    .await;
    worker.stop().await.unwrap();
    env.cleanup().await;
}
