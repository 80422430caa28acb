//! `feedback.submitted` through RabbitMQ and PostgreSQL: stored with the event's time, its
//! points given once per order, a score out of range dead-lettered with its reason, and an
//! answer about an order not known yet waiting for it, then giving up.

mod common;

use common::{INGEST_ONLY, TestEnv, count, enrolled, wait_for};
use serde_json::json;

/// A stored answer: event id, order, score, points, time.
type Answer = (
    String,
    Option<String>,
    i16,
    i64,
    chrono::DateTime<chrono::Utc>,
);

fn event(id: String, kind: &str, time: &str, data: serde_json::Value) -> String {
    json!({"specversion": "1.0", "id": id, "source": "test", "type": kind, "time": time, "data": data})
        .to_string()
}

#[tokio::test]
async fn feedback_is_stored_and_earns_its_points_once_per_order() {
    let env = TestEnv::new(&[
        ("LIFECYCLE_PROGRAM__FEEDBACK_POINTS", "25".into()),
        ("LIFECYCLE_INGEST__MAX_RETRIES", "2".into()),
    ]);
    let worker = env.start(INGEST_ONLY).await;
    let app = worker.app.clone();
    let t = &env.tag;
    let answer = |n: u32, time: &str, data: serde_json::Value| {
        event(format!("{t}-f{n}"), "feedback.submitted", time, data)
    };
    env.publish(&[
        enrolled(&format!("{t}-e"), "m-1", Some("m1@example.com"), None, "en", "Ada", (true, false)),
        event(
            format!("{t}-o"),
            "order.placed",
            "2026-11-20T09:00:00Z",
            json!({"order_id": "o-1", "member_id": "m-1", "total": 12000, "currency": "USD", "items": []}),
        ),
    ])
    .await;
    wait_for("the order applied", || async {
        (count(&app, "select count(*) from orders").await == 1).then_some(())
    })
    .await;
    env.publish(&[
        answer(1, "2026-11-21T08:00:00Z", json!({"member_id": "m-1", "score": 9, "order_id": "o-1", "comment": "Quick and kind."})),
        // A second answer about the same order: stored, no more points.
        answer(2, "2026-11-21T09:00:00Z", json!({"member_id": "m-1", "score": 10, "order_id": "o-1"})),
        // About nothing in particular: stored, no points.
        answer(3, "2026-11-21T10:00:00Z", json!({"member_id": "m-1", "score": 3})),
        // Out of range: refused at once, with why.
        answer(4, "2026-11-21T11:00:00Z", json!({"member_id": "m-1", "score": 11})),
        // About an order not known yet: waits, then gives up.
        answer(5, "2026-11-21T12:00:00Z", json!({"member_id": "m-1", "score": 8, "order_id": "o-unknown"})),
    ])
    .await;
    wait_for("three answers stored, two dead letters", || async {
        let stored = count(&app, "select count(*) from feedback").await;
        let dead = count(&app, "select count(*) from dead_letters").await;
        (stored == 3 && dead == 2).then_some(())
    })
    .await;
    let rows: Vec<Answer> =
        sqlx::query_as("select event_id, order_id, score, points, at from feedback order by at")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    let summary: Vec<(Option<&str>, i16, String)> = rows
        .iter()
        .map(|(_, order, score, _, at)| (order.as_deref(), *score, at.to_rfc3339()))
        .collect();
    assert_eq!(
        summary,
        [
            (Some("o-1"), 9, "2026-11-21T08:00:00+00:00".to_owned()),
            (Some("o-1"), 10, "2026-11-21T09:00:00+00:00".to_owned()),
            (None, 3, "2026-11-21T10:00:00+00:00".to_owned()),
        ],
        "each answer at its event time"
    );
    // The order's points once, to whichever of its answers was applied first (two consumers
    // may apply them in either order).
    let points: Vec<i64> = rows.iter().map(|r| r.3).collect();
    assert_eq!(points.iter().sum::<i64>(), 25, "{points:?}");
    assert_eq!(points.iter().filter(|p| **p > 0).count(), 1, "{points:?}");
    assert_eq!(points[2], 0, "no order, no points");
    assert_eq!(
        count(
            &app,
            "select coalesce(sum(points), 0)::bigint from point_entries where member_id = 'm-1'"
        )
        .await,
        100 + 120 + 25
    );
    assert_eq!(
        count(
            &app,
            "select count(*) from point_entries where kind = 'feedback'"
        )
        .await,
        1
    );
    let reasons: Vec<String> =
        sqlx::query_scalar("select reason from dead_letters order by reason")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        reasons,
        [
            "data.score: 11 is not between 0 and 10",
            "order o-unknown is not known yet (gave up after 2 retries)",
        ]
    );
    // The same answer again (a redelivery or a replay) changes nothing.
    env.publish(&[answer(
        1,
        "2026-11-21T08:00:00Z",
        json!({"member_id": "m-1", "score": 9, "order_id": "o-1"}),
    )])
    .await;
    wait_for("the duplicate seen", || async {
        (lifecycle::testkit::metrics::Metrics::get(&worker.app.metrics.events_duplicate) >= 1)
            .then_some(())
    })
    .await;
    assert_eq!(count(&app, "select count(*) from feedback").await, 3);
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn an_event_applied_late_keeps_the_time_it_happened() {
    // The worker's clock is a week past the events.
    let env = TestEnv::new(&[("LIFECYCLE_NOW", "2026-11-29T12:00:00Z".into())]);
    let worker = env.start(INGEST_ONLY).await;
    let app = worker.app.clone();
    let t = &env.tag;
    let mut enrolment: serde_json::Value = serde_json::from_str(&enrolled(
        &format!("{t}-e"),
        "m-late",
        Some("late@example.com"),
        None,
        "en",
        "Lee",
        (true, false),
    ))
    .unwrap();
    enrolment["time"] = json!("2026-11-20T08:00:00Z");
    env.publish(&[
        enrolment.to_string(),
        event(
            format!("{t}-o"),
            "order.placed",
            "2026-11-21T09:30:00Z",
            json!({"order_id": "o-late", "member_id": "m-late", "total": 60000, "currency": "USD",
                   "items": [{"sku": "tea", "name": "Tea", "quantity": 1, "unit_price": 30000},
                             {"sku": "mug", "name": "Mug", "quantity": 1, "unit_price": 15000},
                             {"sku": "tea", "name": "Tea", "quantity": 1, "unit_price": 15000}]}),
        ),
        // From the future (a skewed platform clock): recorded at the worker's now.
        event(
            format!("{t}-f"),
            "feedback.submitted",
            "2027-01-01T00:00:00Z",
            json!({"member_id": "m-late", "score": 10}),
        ),
    ])
    .await;
    wait_for("all three applied", || async {
        (count(&app, "select count(*) from inbox").await == 3).then_some(())
    })
    .await;
    let time = |sql: &'static str| {
        let pool = app.pool.clone();
        async move {
            sqlx::query_scalar::<_, chrono::DateTime<chrono::Utc>>(sql)
                .fetch_one(&pool)
                .await
                .unwrap()
                .to_rfc3339()
        }
    };
    assert_eq!(
        time("select placed_at from orders where order_id = 'o-late'").await,
        "2026-11-21T09:30:00+00:00"
    );
    assert_eq!(
        time("select event_at from point_entries where kind = 'order'").await,
        "2026-11-21T09:30:00+00:00"
    );
    assert_eq!(
        time("select event_at from point_entries where kind = 'signup'").await,
        "2026-11-20T08:00:00+00:00"
    );
    // The journal's business time is still the worker's (lots and tiers run on it).
    assert_eq!(
        time("select at from point_entries where kind = 'order'").await,
        "2026-11-29T12:00:00+00:00"
    );
    // The welcome and the tier-up the order crossed, planned for the events' times.
    assert_eq!(
        time("select event_at from messages where trigger = 'welcome'").await,
        "2026-11-20T08:00:00+00:00"
    );
    assert_eq!(
        time("select event_at from messages where trigger = 'tier-up'").await,
        "2026-11-21T09:30:00+00:00"
    );
    let skus: serde_json::Value = sqlx::query_scalar("select skus from orders")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(skus, json!(["mug", "tea"]), "the order's distinct SKUs");
    assert_eq!(
        time("select at from feedback").await,
        "2026-11-29T12:00:00+00:00"
    );
    worker.stop().await.unwrap();
    env.cleanup().await;
}
