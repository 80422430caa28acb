//! The scheduled triggers (points-expiring, birthday, abandoned-cart) and the scheduler, on
//! real RabbitMQ and PostgreSQL with a fixed clock (`LIFECYCLE_NOW`) that the tests move.

mod common;

use chrono::{DateTime, Duration, Utc};
use common::{ALL_ROLES, TestEnv, WITH_SCHEDULER, count, publish_in_order, wait_for};
use lifecycle::testkit::app::{App, Roles};
use lifecycle::testkit::metrics::Metrics;
use lifecycle::testkit::scheduler::Job;
use lifecycle::testkit::worker::Worker;
use serde_json::json;

fn t(raw: &str) -> DateTime<Utc> {
    raw.parse().unwrap()
}

fn event(id: String, kind: &str, time: DateTime<Utc>, data: serde_json::Value) -> String {
    json!({"specversion": "1.0", "id": id, "source": "test", "type": kind,
           "time": time.to_rfc3339(), "data": data})
    .to_string()
}

fn enrol(
    id: String,
    member: &str,
    zone: &str,
    birthday: Option<&str>,
    at: DateTime<Utc>,
) -> String {
    event(
        id,
        "member.enrolled",
        at,
        json!({"member_id": member, "email": format!("{member}@example.com"), "phone": "+905321234567",
               "first_name": "Deniz", "locale": "tr", "timezone": zone, "birthday": birthday,
               "consent": {"email": true, "sms": true}}),
    )
}

const SCHEDULE_ONLY: Roles = Roles {
    ingest: false,
    dispatch: false,
    schedule: true,
    http: false,
};

const INGEST_AND_SCHEDULE: Roles = Roles {
    ingest: true,
    dispatch: false,
    schedule: true,
    http: false,
};

/// An environment whose clock stands at `now` and whose scans run on every second of it, so
/// that each move of the clock runs all of them.
fn scheduled_env(now: DateTime<Utc>, extra: &[(&str, String)]) -> TestEnv {
    let mut vars = vec![("LIFECYCLE_NOW".to_owned(), now.to_rfc3339())];
    for job in [
        "EXPIRY",
        "POINTS_EXPIRING",
        "BIRTHDAY",
        "CARTS",
        "RETENTION",
    ] {
        vars.push((format!("LIFECYCLE_SCHEDULER__{job}"), "* * * * * *".into()));
    }
    vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
    let vars: Vec<(&str, String)> = vars.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    TestEnv::new(&vars)
}

/// Moves the fixed clock of each worker to `to` and waits until every scan has run at it.
async fn move_clock(workers: &[&Worker], to: DateTime<Utc>) {
    for w in workers {
        w.app.clock.set(to);
    }
    let app = &workers[0].app;
    wait_for(&format!("every scan to run at {to}"), || async {
        let behind: i64 = sqlx::query_scalar(
            "select count(*) from scheduled_jobs where last_run is null or last_run < $1",
        )
        .bind(to)
        .fetch_one(&app.pool)
        .await
        .unwrap();
        let jobs = count(app, "select count(*) from scheduled_jobs").await;
        (jobs == Job::ALL.len() as i64 && behind == 0).then_some(())
    })
    .await;
}

/// Dedupe keys of planned messages of one trigger, sorted.
async fn keys(app: &App, trigger: &str) -> Vec<String> {
    sqlx::query_scalar("select dedupe_key from messages where trigger = $1 order by dedupe_key")
        .bind(trigger)
        .fetch_all(&app.pool)
        .await
        .unwrap()
}

async fn balance(app: &App, member: &str) -> i64 {
    sqlx::query_scalar("select balance from members where member_id = $1")
        .bind(member)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn points_expiring_notices_go_30_and_7_days_ahead_then_the_points_lapse() {
    let start = t("2025-12-20T10:00:00Z");
    let env = scheduled_env(start, &[]);
    let worker = env.start(WITH_SCHEDULER).await;
    let app = worker.app.clone();
    let tag = &env.tag;
    // Earned on 20 December 2025 (13:00 in Istanbul): both lots lapse on 20 December 2026.
    let events = [
        enrol(format!("{tag}-1"), "m-exp", "Europe/Istanbul", None, start),
        event(
            format!("{tag}-2"),
            "order.placed",
            start,
            json!({"order_id": format!("{tag}-o1"), "member_id": "m-exp", "total": 4_000,
                   "currency": "USD", "items": []}),
        ),
    ];
    publish_in_order(&env, &app, &events, async |_| {}).await;
    assert_eq!(balance(&app, "m-exp").await, 140);

    // 31 days ahead: nothing yet.
    move_clock(&[&worker], t("2026-11-19T10:00:00Z")).await;
    assert!(keys(&app, "points-expiring").await.is_empty());
    // 30 days ahead in Istanbul: the 30-day notice, on both channels.
    move_clock(&[&worker], t("2026-11-20T10:00:00Z")).await;
    assert_eq!(
        keys(&app, "points-expiring").await,
        [
            "points-expiring:m-exp:2026-12-20:30:email",
            "points-expiring:m-exp:2026-12-20:30:sms"
        ]
    );
    // A later scan inside the same period plans nothing new.
    move_clock(&[&worker], t("2026-11-25T10:00:00Z")).await;
    assert_eq!(keys(&app, "points-expiring").await.len(), 2);
    // 7 days ahead: the 7-day notice.
    move_clock(&[&worker], t("2026-12-13T10:00:00Z")).await;
    assert_eq!(keys(&app, "points-expiring").await.len(), 4);
    let context: serde_json::Value = sqlx::query_scalar(
        "select context from messages where dedupe_key = 'points-expiring:m-exp:2026-12-20:7:email'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(context["points"], 140);
    assert_eq!(context["days_left"], 7);

    // The email went out with the points and the date.
    let mail = wait_for("the 7-day notice sent", || async {
        std::fs::read_dir(env.outbox.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .ends_with("-points-expiring-email.eml")
            })
            .map(|e| common::parse_mail(&std::fs::read(e.path()).unwrap()))
            .find(|m| m.subject.contains("7 gün"))
    })
    .await;
    assert!(mail.text.contains("140 puan"), "{}", mail.text);
    assert!(mail.text.contains("20 Aralık 2026"), "{}", mail.text);

    // The lots lapse with no event for the member: the expiry scan takes the points.
    move_clock(&[&worker], t("2026-12-20T10:00:01Z")).await;
    assert_eq!(balance(&app, "m-exp").await, 0);
    let expired: i64 = count(
        &app,
        "select coalesce(sum(points), 0)::bigint from point_entries where kind = 'expiry'",
    )
    .await;
    assert_eq!(expired, -140);
    assert_eq!(
        count(&app, "select count(*) from point_lots").await,
        0,
        "lapsed lots are gone"
    );
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_birthday_missed_in_an_outage_is_sent_once_by_two_replicas_with_its_bonus() {
    let morning = t("2026-11-22T05:00:00Z"); // 08:00 in Istanbul
    let env = scheduled_env(
        morning,
        &[("LIFECYCLE_PROGRAM__BIRTHDAY_BONUS", "50".into())],
    );
    let ingest = env.start(ALL_ROLES).await;
    let app = ingest.app.clone();
    let tag = &env.tag;
    let events = [
        enrol(
            format!("{tag}-1"),
            "m-today",
            "Europe/Istanbul",
            Some("1990-11-22"),
            morning,
        ),
        enrol(
            format!("{tag}-2"),
            "m-tomorrow",
            "Europe/Istanbul",
            Some("11-23"),
            morning,
        ),
        // Already 23 November in Auckland: not today there.
        enrol(
            format!("{tag}-3"),
            "m-auckland",
            "Pacific/Auckland",
            Some("11-22"),
            morning,
        ),
    ];
    publish_in_order(&env, &app, &events, async |_| {}).await;

    // The scans last ran at 08:00 Istanbul time; then every worker was down past 09:00.
    sqlx::query(
        "insert into scheduled_jobs (job, last_run)
         select j, $1 from unnest(array['expiry', 'points-expiring', 'birthday', 'carts', 'retention']) as j",
    )
    .bind(morning)
    .execute(&app.pool)
    .await
    .unwrap();
    // Two replicas come back at 20:00 in Istanbul, both wanting to catch up.
    let evening = t("2026-11-22T17:00:00Z");
    ingest.app.clock.set(evening);
    let a = Worker::start(env.app().await, SCHEDULE_ONLY).await.unwrap();
    let b = Worker::start(env.app().await, SCHEDULE_ONLY).await.unwrap();
    move_clock(&[&a, &b], evening).await;

    assert_eq!(
        keys(&app, "birthday").await,
        ["birthday:m-today:2026:email", "birthday:m-today:2026:sms"]
    );
    assert_eq!(balance(&app, "m-today").await, 150, "bonus given once");
    assert_eq!(balance(&app, "m-tomorrow").await, 100);
    assert_eq!(balance(&app, "m-auckland").await, 100);
    let runs = Metrics::get(&a.app.metrics.scans_run) + Metrics::get(&b.app.metrics.scans_run);
    assert_eq!(
        runs,
        Job::ALL.len() as u64,
        "each scan ran once, on one replica"
    );

    // Both replicas scan again later that day: nothing more.
    move_clock(&[&a, &b], t("2026-11-22T20:00:00Z")).await;
    assert_eq!(keys(&app, "birthday").await.len(), 2);
    assert_eq!(balance(&app, "m-today").await, 150);
    // Next day, it is m-tomorrow's turn (09:00 in Istanbul).
    move_clock(&[&a, &b], t("2026-11-23T06:00:00Z")).await;
    assert_eq!(keys(&app, "birthday").await.len(), 4);
    assert_eq!(balance(&app, "m-tomorrow").await, 150);
    let journal: i64 = count(
        &app,
        "select count(*) from point_entries where kind = 'birthday'",
    )
    .await;
    assert_eq!(journal, 2);

    for w in [a, b, ingest] {
        w.stop().await.unwrap();
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_birthday_bonus_that_reaches_a_reward_plans_redemption_ready_once() {
    // 60 points from the signup bonus; the birthday's 50 reach the 100-point reward.
    let morning = t("2026-11-22T05:00:00Z"); // 08:00 in Istanbul
    let env = scheduled_env(
        morning,
        &[
            ("LIFECYCLE_PROGRAM__SIGNUP_BONUS", "60".into()),
            ("LIFECYCLE_PROGRAM__BIRTHDAY_BONUS", "50".into()),
        ],
    );
    let worker = env.start(INGEST_AND_SCHEDULE).await;
    let app = worker.app.clone();
    let events = [enrol(
        format!("{}-1", env.tag),
        "m-today",
        "Europe/Istanbul",
        Some("11-22"),
        morning,
    )];
    publish_in_order(&env, &app, &events, async |_| {}).await;
    move_clock(&[&worker], morning).await;
    assert!(keys(&app, "redemption-ready").await.is_empty());
    // 09:00 in Istanbul: the bonus, its message, and the reward it reached.
    move_clock(&[&worker], t("2026-11-22T06:00:00Z")).await;
    assert_eq!(balance(&app, "m-today").await, 110);
    assert_eq!(
        keys(&app, "redemption-ready").await,
        [
            "redemption-ready:m-today:100:birthday:m-today:2026:email",
            "redemption-ready:m-today:100:birthday:m-today:2026:sms"
        ]
    );
    // Scanned again that day: nothing more.
    move_clock(&[&worker], t("2026-11-22T08:00:00Z")).await;
    assert_eq!(keys(&app, "redemption-ready").await.len(), 2);
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn abandoned_carts_fire_an_hour_after_the_last_update_unless_checked_out() {
    let t0 = t("2026-11-22T10:00:00Z");
    let env = scheduled_env(t0, &[]);
    let worker = env.start(INGEST_AND_SCHEDULE).await;
    let app = worker.app.clone();
    let tag = &env.tag;
    let cart = |n: u32, cart: &str, at: DateTime<Utc>| {
        event(
            format!("{tag}-c{n}"),
            "cart.updated",
            at,
            json!({"cart_id": cart, "member_id": "m-cart", "total": 1_800, "currency": "USD",
                   "items": [{"sku": "mug", "name": "Kupa", "quantity": 2, "unit_price": 900}],
                   "checkout_url": format!("https://shop.example/cart/{cart}")}),
        )
    };
    let checkout = |n: u32, cart: &str, at| {
        event(
            format!("{tag}-k{n}"),
            "cart.checked_out",
            at,
            json!({"cart_id": cart, "member_id": "m-cart"}),
        )
    };
    let events = [
        enrol(format!("{tag}-1"), "m-cart", "Europe/Istanbul", None, t0),
        cart(1, "left", t0),
        cart(2, "bought", t0),
        checkout(3, "bought", t0),
        cart(4, "ordered", t0),
        event(
            format!("{tag}-o"),
            "order.placed",
            t0,
            json!({"order_id": format!("{tag}-o1"), "member_id": "m-cart", "total": 1_800,
                   "currency": "USD", "items": [], "cart_id": "ordered"}),
        ),
        cart(5, "changed", t0),
        cart(6, "late", t0),
    ];
    publish_in_order(&env, &app, &events, async |_| {}).await;

    // Half an hour later the shopper changes one cart: its timer starts again.
    let later = t0 + Duration::minutes(30);
    move_clock(&[&worker], later).await;
    publish_in_order(&env, &app, &[cart(7, "changed", later)], async |_| {}).await;
    // An update from before the last one arrives late: it changes nothing.
    publish_in_order(
        &env,
        &app,
        &[cart(8, "changed", t0 + Duration::minutes(10))],
        async |_| {},
    )
    .await;

    move_clock(&[&worker], t0 + Duration::minutes(59)).await;
    assert!(
        keys(&app, "abandoned-cart").await.is_empty(),
        "not before the hour"
    );
    move_clock(&[&worker], t0 + Duration::minutes(61)).await;
    assert_eq!(
        keys(&app, "abandoned-cart").await,
        [
            "abandoned-cart:late:1:email",
            "abandoned-cart:late:1:sms",
            "abandoned-cart:left:1:email",
            "abandoned-cart:left:1:sms",
        ]
    );
    // A checkout of a cart whose message has not gone yet cancels it.
    publish_in_order(
        &env,
        &app,
        &[checkout(9, "late", t0 + Duration::minutes(61))],
        async |_| {},
    )
    .await;
    let cancelled: Vec<String> = sqlx::query_scalar(
        "select dedupe_key from messages where status = 'cancelled' order by dedupe_key",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        cancelled,
        ["abandoned-cart:late:1:email", "abandoned-cart:late:1:sms"]
    );

    // The changed cart fires an hour after its last update, as version 2.
    move_clock(&[&worker], later + Duration::minutes(60)).await;
    let keys_now = keys(&app, "abandoned-cart").await;
    assert_eq!(keys_now.len(), 6, "{keys_now:?}");
    assert!(keys_now.contains(&"abandoned-cart:changed:2:email".to_owned()));
    // Much later, nothing fires again.
    move_clock(&[&worker], t0 + Duration::hours(5)).await;
    assert_eq!(keys(&app, "abandoned-cart").await.len(), 6);
    worker.stop().await.unwrap();

    // Dispatch sends what is pending, with the cart's link; the cancelled stay unsent.
    let dispatcher = env.start(ALL_ROLES).await;
    dispatcher.app.clock.set(t0 + Duration::hours(5));
    // One cart's messages go; the other cart's wait out the marketing cap (one message per
    // member and channel in 16 hours).
    wait_for("cart messages sent or capped", || async {
        let sent = count(
            &app,
            "select count(*) from messages where trigger = 'abandoned-cart' and status = 'sent'",
        )
        .await;
        let capped = count(
            &app,
            "select count(*) from messages where trigger = 'abandoned-cart' and status = 'pending'
               and last_error like 'deferred: frequency cap%'",
        )
        .await;
        (sent == 2 && capped == 2).then_some(())
    })
    .await;
    let sms: serde_json::Value = std::fs::read_dir(env.outbox.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| {
            e.file_name()
                .to_string_lossy()
                .ends_with("-abandoned-cart-sms.json")
        })
        .map(|e| serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap())
        .expect("an abandoned-cart SMS");
    let body = sms["body"].as_str().unwrap();
    assert!(
        body.contains("https://shop.example/cart/left")
            || body.contains("https://shop.example/cart/changed"),
        "{sms}"
    );
    assert!(sms["body"].as_str().unwrap().contains("2 ürün"), "{sms}");
    assert_eq!(
        count(
            &app,
            "select count(*) from messages where status = 'cancelled'"
        )
        .await,
        2
    );
    dispatcher.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_scan_runs_only_under_the_lease_and_only_once_per_instant() {
    use lifecycle::testkit::scheduler::{Job, Scheduler};
    let now = t("2026-11-22T10:00:00Z");
    let env = scheduled_env(now, &[]);
    let app = env.app().await;
    let (a, b) = (Scheduler::new(app.clone()), Scheduler::new(app.clone()));
    sqlx::query("insert into scheduled_jobs (job) values ('carts')")
        .execute(&app.pool)
        .await
        .unwrap();
    // Another replica holds the lease: neither runs.
    sqlx::query(
        "update scheduled_jobs set leased_by = 'other', lease_until = now() + interval '1 minute'",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    assert_eq!(a.run_leased(Job::Carts, None, now).await.unwrap(), None);
    // Its lease lapsed (it crashed mid-scan): the scan is taken over.
    sqlx::query("update scheduled_jobs set lease_until = now() - interval '1 second'")
        .execute(&app.pool)
        .await
        .unwrap();
    assert_eq!(a.run_leased(Job::Carts, None, now).await.unwrap(), Some(0));
    // B read `last_run` before A's run finished: it finds the instant done and does not run.
    assert_eq!(b.run_leased(Job::Carts, None, now).await.unwrap(), None);
    let (last_run, holder): (Option<DateTime<Utc>>, Option<String>) =
        sqlx::query_as("select last_run, leased_by from scheduled_jobs where job = 'carts'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        (last_run, holder),
        (Some(now), None),
        "run recorded, lease given back"
    );
    // The next instant is B's if it asks first.
    let next = now + Duration::seconds(1);
    assert_eq!(
        b.run_leased(Job::Carts, Some(now), next).await.unwrap(),
        Some(0)
    );
    assert_eq!(
        a.run_leased(Job::Carts, Some(now), next).await.unwrap(),
        None
    );
    env.cleanup().await;
}
