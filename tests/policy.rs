//! Quiet hours and the frequency cap, with a fixed clock: deferred to the right instant in the
//! member's zone, then sent.

mod common;

use chrono::{DateTime, Duration, Utc};
use common::{ALL_ROLES, INGEST_ONLY, TestEnv, count, wait_for};
use lifecycle::testkit::app::App;
use lifecycle::testkit::worker::Worker;
use serde_json::json;

fn t(raw: &str) -> DateTime<Utc> {
    raw.parse().unwrap()
}

fn enrol(id: String, member: &str, zone: &str) -> String {
    json!({"specversion": "1.0", "id": id, "source": "test", "type": "member.enrolled",
           "data": {"member_id": member, "email": format!("{member}@example.com"),
                    "phone": "+905321234567", "first_name": "Ece", "locale": "tr", "timezone": zone,
                    "consent": {"email": true, "sms": true}}})
    .to_string()
}

/// (status, due_at, last_error) of a member's message of this trigger and channel.
async fn state(
    app: &App,
    member: &str,
    trigger: &str,
    channel: &str,
) -> (String, DateTime<Utc>, Option<String>) {
    sqlx::query_as(
        "select status, due_at, last_error from messages where member_id = $1 and trigger = $2 and channel = $3",
    )
    .bind(member)
    .bind(trigger)
    .bind(channel)
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

async fn settled(app: &App, n: i64) {
    wait_for(&format!("{n} messages settled or deferred"), || async {
        let done = count(
            app,
            "select count(*) from messages where status in ('sent', 'failed', 'suppressed')
               or (status = 'pending' and last_error like 'deferred:%')",
        )
        .await;
        (done >= n).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sms_waits_out_quiet_hours_in_the_members_zone() {
    // 22:30 in Istanbul, 11:30 in Los Angeles.
    let now = t("2026-11-22T19:30:00Z");
    let env = TestEnv::new(&[
        ("LIFECYCLE_NOW", now.to_rfc3339()),
        ("LIFECYCLE_DISPATCH__QUIET_HOURS", "21:00-08:00".into()),
    ]);
    let worker = env.start(ALL_ROLES).await;
    let app = worker.app.clone();
    env.publish(&[
        enrol(format!("{}-1", env.tag), "m-ist", "Europe/Istanbul"),
        enrol(format!("{}-2", env.tag), "m-la", "America/Los_Angeles"),
    ])
    .await;
    settled(&app, 4).await;
    let (status, due, error) = state(&app, "m-ist", "welcome", "sms").await;
    assert_eq!(status, "pending");
    assert_eq!(
        due,
        t("2026-11-23T05:00:00Z"),
        "08:00 the next morning in Istanbul"
    );
    assert_eq!(
        error.as_deref(),
        Some("deferred: quiet hours in Europe/Istanbul")
    );
    assert_eq!(
        state(&app, "m-ist", "welcome", "email").await.0,
        "sent",
        "email has no quiet hours"
    );
    assert_eq!(
        state(&app, "m-la", "welcome", "sms").await.0,
        "sent",
        "daytime in Los Angeles"
    );
    let attempts: i32 = sqlx::query_scalar(
        "select attempts from messages where member_id = 'm-ist' and channel = 'sms'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(attempts, 0, "a deferral uses no attempt");

    // At eight it goes.
    worker.app.clock.set(t("2026-11-23T05:00:00Z"));
    wait_for("the SMS sent at 08:00", || async {
        (state(&app, "m-ist", "welcome", "sms").await.0 == "sent").then_some(())
    })
    .await;
    let sent_at: DateTime<Utc> = sqlx::query_scalar(
        "select sent_at from messages where member_id = 'm-ist' and channel = 'sms'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(sent_at, t("2026-11-23T05:00:00Z"));
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_marketing_message_waits_out_the_cap() {
    let now = t("2026-11-22T10:00:00Z"); // 13:00 in Istanbul: no quiet hours
    let env = TestEnv::new(&[("LIFECYCLE_NOW", now.to_rfc3339())]);
    let ingest = env.start(INGEST_ONLY).await;
    let app = ingest.app.clone();
    env.publish(&[enrol(format!("{}-1", env.tag), "m-cap", "Europe/Istanbul")])
        .await;
    wait_for("enrolled", || async {
        (count(&app, "select count(*) from members").await == 1).then_some(())
    })
    .await;
    ingest.stop().await.unwrap();
    // A birthday and an abandoned cart planned for the same member at once (as the scans
    // would), plus a tier-up, which is not marketing.
    let plan = |key: &str, trigger: &str, context: serde_json::Value| {
        let app = app.clone();
        let (key, trigger) = (key.to_owned(), trigger.to_owned());
        async move {
            sqlx::query(
                "insert into messages (dedupe_key, member_id, trigger, channel, context, due_at)
                 values ($1, 'm-cap', $2, 'email', $3, $4)",
            )
            .bind(key)
            .bind(trigger)
            .bind(context)
            .bind(now)
            .execute(&app.pool)
            .await
            .unwrap();
        }
    };
    plan(
        "birthday:m-cap:2026:email",
        "birthday",
        json!({"first_name": "Ece", "bonus": 0, "balance": 100}),
    )
    .await;
    plan(
        "abandoned-cart:c1:1:email",
        "abandoned-cart",
        json!({"first_name": "Ece", "cart_id": "c1", "items": [], "item_count": 0, "total_minor": 0,
               "currency": "TRY", "checkout_url": "https://shop.example/c1"}),
    )
    .await;
    plan(
        "tier-up:m-cap:Silver:e9:email",
        "tier-up",
        json!({"first_name": "Ece", "tier": "Silver", "previous_tier": "Bronze", "benefits": [], "tier_points": 500}),
    )
    .await;

    let worker = Worker::start(env.app().await, ALL_ROLES).await.unwrap();
    // Welcome (email, SMS) and tier-up go; of the two marketing messages one goes and the
    // other waits for it.
    wait_for("one marketing message sent", || async {
        let sent = count(
            &app,
            "select count(*) from messages where status = 'sent' and trigger in ('birthday', 'abandoned-cart')",
        )
        .await;
        (sent == 1 && count(&app, "select count(*) from messages where status = 'sent'").await == 4).then_some(())
    })
    .await;
    // Claimed in the same batch as the first, the other was put off a minute; looked at again
    // then, it is deferred until 16 hours after the first was sent.
    worker.app.clock.set(now + Duration::minutes(2));
    let error = wait_for("the second deferred by the cap", || async {
        let row: Option<(DateTime<Utc>, Option<String>)> = sqlx::query_as(
            "select due_at, last_error from messages
             where trigger in ('birthday', 'abandoned-cart') and status = 'pending'",
        )
        .fetch_optional(&app.pool)
        .await
        .unwrap();
        row.filter(|(due, _)| *due == now + Duration::hours(16))
            .map(|(_, error)| error)
    })
    .await;
    assert!(
        error
            .as_deref()
            .is_some_and(|e| e.contains("frequency cap")),
        "{error:?}"
    );
    // At sixteen hours it goes.
    worker.app.clock.set(now + Duration::hours(16));
    wait_for("both marketing messages sent", || async {
        (count(&app, "select count(*) from messages where status = 'sent' and trigger in ('birthday', 'abandoned-cart')").await
            == 2)
            .then_some(())
    })
    .await;
    worker.stop().await.unwrap();
    env.cleanup().await;
}
