//! The points ledger through RabbitMQ and PostgreSQL.

mod common;

use common::{INGEST_ONLY, TestEnv, count, enrolled, publish_in_order, wait_for};
use lifecycle::testkit::app::App;
use serde_json::json;

fn event(id: String, kind: &str, data: serde_json::Value) -> String {
    json!({"specversion": "1.0", "id": id, "source": "test", "type": kind, "data": data})
        .to_string()
}

async fn balance(app: &App, member: &str) -> (i64, i64) {
    sqlx::query_as("select balance, lifetime from members where member_id = $1")
        .bind(member)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

/// The balance column, the journal and the lots agree.
async fn assert_consistent(app: &App, member: &str) {
    let (balance, lifetime) = balance(app, member).await;
    let (journal, earned): (i64, i64) = sqlx::query_as(
        "select coalesce(sum(points), 0)::bigint, coalesce(sum(points) filter (where points > 0), 0)::bigint
         from point_entries where member_id = $1",
    )
    .bind(member)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let lots: i64 = sqlx::query_scalar(
        "select coalesce(sum(remaining), 0)::bigint from point_lots where member_id = $1",
    )
    .bind(member)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        (balance, lifetime),
        (journal, earned),
        "members row = journal"
    );
    assert_eq!(balance, lots, "balance = what is left of the lots");
}

#[tokio::test(flavor = "multi_thread")]
async fn orders_earn_refunds_reverse_and_redemptions_spend() {
    let env = TestEnv::new(&[("LIFECYCLE_INGEST__MAX_RETRIES", "2".into())]);
    let worker = env.start(INGEST_ONLY).await;
    let app = worker.app.clone();
    let t = env.tag.clone();
    let m = "m-points";
    // One step at a time, each applied before the next is published: (event, balance after).
    let steps: Vec<(String, i64)> = vec![
        (
            enrolled(
                &format!("{t}-1"),
                m,
                Some("p@example.com"),
                None,
                "en",
                "P",
                (true, false),
            ),
            100,
        ),
        (
            event(
                format!("{t}-2"),
                "order.placed",
                json!({"order_id": format!("{t}-o1"), "member_id": m, "total": 4599, "currency": "USD", "items": []}),
            ),
            145,
        ),
        // A third of the order refunded: floor(45 × 1533 / 4599) = 15 points back.
        (
            event(
                format!("{t}-3"),
                "order.refunded",
                json!({"order_id": format!("{t}-o1"), "member_id": m, "amount": 1533, "currency": "USD"}),
            ),
            130,
        ),
        (
            event(
                format!("{t}-4"),
                "points.adjusted",
                json!({"member_id": m, "points": 50, "reason": "review"}),
            ),
            180,
        ),
        (
            event(
                format!("{t}-5"),
                "points.redeemed",
                json!({"member_id": m, "points": 100, "reward": "$10 off"}),
            ),
            80,
        ),
        // The same order republished under a new event id earns nothing again.
        (
            event(
                format!("{t}-6"),
                "order.placed",
                json!({"order_id": format!("{t}-o1"), "member_id": m, "total": 4599, "currency": "USD", "items": []}),
            ),
            80,
        ),
        // The rest of the order refunded: 45 - 15 = 30 more, all of it available.
        (
            event(
                format!("{t}-7"),
                "order.refunded",
                json!({"order_id": format!("{t}-o1"), "member_id": m, "amount": 3066, "currency": "USD"}),
            ),
            50,
        ),
    ];
    let bodies: Vec<String> = steps.iter().map(|(body, _)| body.clone()).collect();
    publish_in_order(&env, &app, &bodies, async |i| {
        assert_eq!(
            balance(&app, m).await.0,
            steps[i].1,
            "balance after step {}",
            i + 1
        );
        assert_consistent(&app, m).await;
    })
    .await;
    assert_eq!(
        balance(&app, m).await.1,
        195,
        "lifetime: 100 signup + 45 order + 50 adjustment"
    );
    let order: (i64, i64, i64) =
        sqlx::query_as("select earned, refunded_minor, reversed from orders")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(order, (45, 4599, 45));

    // An overdraft waits for points that may be on their way, then is refused with its reason.
    env.publish(&[event(
        format!("{t}-8"),
        "points.redeemed",
        json!({"member_id": m, "points": 500}),
    )])
    .await;
    let dead = wait_for("the overdraft dead-lettered", || async {
        let dead = env.take_dead_letters().await;
        (!dead.is_empty()).then_some(dead)
    })
    .await;
    assert!(
        dead[0].1.contains(
            "redemption refused: 500 points wanted but only 50 available (gave up after 2 retries)"
        ),
        "{}",
        dead[0].1
    );
    assert_eq!(
        balance(&app, m).await.0,
        50,
        "a refused redemption changes nothing"
    );
    assert_consistent(&app, m).await;
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refund_before_its_order_waits_for_it() {
    let env = TestEnv::new(&[]);
    let worker = env.start(INGEST_ONLY).await;
    let app = worker.app.clone();
    let t = env.tag.clone();
    let m = "m-early";
    env.publish(&[enrolled(
        &format!("{t}-1"),
        m,
        None,
        None,
        "ko",
        "K",
        (false, false),
    )])
    .await;
    wait_for("enrolled", || async {
        (count(&app, "select count(*) from members").await == 1).then_some(())
    })
    .await;
    env.publish(&[event(
        format!("{t}-2"),
        "order.refunded",
        json!({"order_id": "o-k", "member_id": m, "amount": 6000, "currency": "KRW"}),
    )])
    .await;
    wait_for("the refund deferred", || async {
        (lifecycle::testkit::metrics::Metrics::get(&app.metrics.events_deferred) >= 1).then_some(())
    })
    .await;
    env.publish(&[event(
        format!("{t}-3"),
        "order.placed",
        json!({"order_id": "o-k", "member_id": m, "total": 24000, "currency": "KRW", "items": []}),
    )])
    .await;
    wait_for("order and refund applied", || async {
        (count(&app, "select count(*) from inbox").await == 3).then_some(())
    })
    .await;
    // ₩24,000 earns 24 points; a quarter refunded takes 6 back.
    assert_eq!(balance(&app, m).await, (118, 124));
    assert_consistent(&app, m).await;
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_order_crosses_a_reward_and_a_tier_and_both_messages_go_out() {
    let env = TestEnv::new(&[]);
    let worker = env.start(common::ALL_ROLES).await;
    let app = worker.app.clone();
    let t = env.tag.clone();
    let m = "m-vip";
    let steps = [
        enrolled(
            &format!("{t}-1"),
            m,
            Some("vip@example.com"),
            None,
            "en",
            "Vera",
            (true, false),
        ),
        event(
            format!("{t}-2"),
            "points.redeemed",
            json!({"member_id": m, "points": 60}),
        ),
        event(
            format!("{t}-3"),
            "order.placed",
            json!({"order_id": format!("{t}-o1"), "member_id": m, "total": 60000, "currency": "USD", "items": []}),
        ),
    ];
    publish_in_order(&env, &app, &steps, async |_| {}).await;
    let sent: Vec<(String, i64)> = wait_for("three messages sent", || async {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("select trigger, id from messages where status = 'sent' order by id")
                .fetch_all(&app.pool)
                .await
                .unwrap();
        (rows.len() == 3).then_some(rows)
    })
    .await;
    let triggers: Vec<&str> = sent.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(triggers, ["welcome", "redemption-ready", "tier-up"]);
    assert_eq!(balance(&app, m).await.0, 640);

    let read = |trigger: &str, id: i64| {
        std::fs::read_to_string(env.outbox.path().join(format!("{id}-{trigger}-email.json")))
            .unwrap()
    };
    let ready: serde_json::Value =
        serde_json::from_str(&read("redemption-ready", sent[1].1)).unwrap();
    assert!(
        ready["body"]
            .as_str()
            .unwrap()
            .contains("you now have 640 points"),
        "{ready}"
    );
    let tier: serde_json::Value = serde_json::from_str(&read("tier-up", sent[2].1)).unwrap();
    assert_eq!(tier["subject"], "Welcome to Silver, Vera!");
    assert!(
        tier["body"]
            .as_str()
            .unwrap()
            .contains("moved up from Bronze to Silver"),
        "{tier}"
    );
    assert!(
        tier["body"]
            .as_str()
            .unwrap()
            .contains("- Free standard shipping"),
        "{tier}"
    );
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_workers_on_one_queue_keep_every_ledger_exact() {
    let env = TestEnv::new(&[("LIFECYCLE_INGEST__BATCH_SIZE", "20".into())]);
    let first = env.start(INGEST_ONLY).await;
    let second = env.start(INGEST_ONLY).await;
    let app = first.app.clone();
    let t = env.tag.clone();
    let members = 40;
    env.publish(
        &(0..members)
            .map(|m| {
                enrolled(
                    &format!("{t}-e{m}"),
                    &format!("m{m}"),
                    None,
                    None,
                    "en",
                    "M",
                    (false, false),
                )
            })
            .collect::<Vec<_>>(),
    )
    .await;
    wait_for("every member enrolled", || async {
        (count(&app, "select count(*) from members").await == members).then_some(())
    })
    .await;

    // Interleave every member's orders, refunds and adjustments, and keep a model of balances.
    let mut bodies = Vec::new();
    let mut expected = vec![100_i64; members as usize];
    for round in 0..6 {
        for (m, model) in expected.iter_mut().enumerate() {
            let total = 1_000 + 137 * (round * 7 + m as i64) % 9_000; // minor units of USD
            let order = format!("{t}-o{m}-{round}");
            bodies.push(event(format!("{t}-p{m}-{round}"), "order.placed", json!({"order_id": order, "member_id": format!("m{m}"), "total": total, "currency": "USD", "items": []})));
            let earned = total / 100;
            // Refund a third of every other order: floor(earned × refund / total) back.
            if round % 2 == 0 {
                let refund = total / 3;
                bodies.push(event(format!("{t}-r{m}-{round}"), "order.refunded", json!({"order_id": order, "member_id": format!("m{m}"), "amount": refund, "currency": "USD"})));
                *model -= earned * refund / total;
            }
            bodies.push(event(
                format!("{t}-a{m}-{round}"),
                "points.adjusted",
                json!({"member_id": format!("m{m}"), "points": 5 + round, "reason": "review"}),
            ));
            *model += earned + 5 + round;
        }
    }
    let total_events = members + bodies.len() as i64;
    env.publish(&bodies).await;
    wait_for("every event applied", || async {
        (count(&app, "select count(*) from inbox").await == total_events).then_some(())
    })
    .await;

    for (m, expected) in expected.iter().enumerate() {
        let member = format!("m{m}");
        assert_eq!(
            balance(&app, &member).await.0,
            *expected,
            "balance of {member}"
        );
        assert_consistent(&app, &member).await;
    }
    assert!(env.take_dead_letters().await.is_empty(), "nothing refused");
    let applied = |w: &lifecycle::testkit::worker::Worker| {
        lifecycle::testkit::metrics::Metrics::get(&w.app.metrics.events_applied)
    };
    assert!(
        applied(&first) > 0 && applied(&second) > 0,
        "both workers took part"
    );
    first.stop().await.unwrap();
    second.stop().await.unwrap();
    env.cleanup().await;
}

/// A member whose lock another transaction holds does not stop the rest of a batch: its events
/// stay unacked for the consumer's next batch and are applied once the lock is free, each once.
#[tokio::test]
async fn a_held_member_waits_while_the_rest_of_the_batch_goes_on() {
    let env = TestEnv::new(&[("LIFECYCLE_INGEST__CONSUMERS", "1".into())]);
    // No worker yet, so that the events below wait queued and arrive as one batch.
    let app = env.app().await;
    let t = env.tag.clone();
    let (held, free) = (format!("{t}-held"), format!("{t}-free"));
    // The ledger's member lock (`ledger/members.rs`), taken here as another worker would.
    let mut other = app.pool.begin().await.unwrap();
    sqlx::query("select pg_advisory_xact_lock(hashtextextended($1, 7))")
        .bind(&held)
        .execute(&mut *other)
        .await
        .unwrap();
    let enrol =
        |id: &str, member: &str| enrolled(id, member, None, None, "en", "M", (false, false));
    env.publish(&[
        enrol(&format!("{t}-e1"), &held),
        enrol(&format!("{t}-e2"), &free),
        event(
            format!("{t}-a2"),
            "points.adjusted",
            json!({"member_id": free, "points": 7, "reason": "review"}),
        ),
    ])
    .await;
    let worker = env.start(INGEST_ONLY).await;
    let members = || async {
        sqlx::query_scalar::<_, String>("select member_id from members order by 1")
            .fetch_all(&app.pool)
            .await
            .unwrap()
    };
    wait_for("the free member's events applied", || async {
        (count(&app, "select count(*) from inbox").await == 2).then_some(())
    })
    .await;
    assert_eq!(balance(&app, &free).await.0, 107);
    assert!(
        !members().await.contains(&held),
        "applied under another's lock"
    );

    other.commit().await.unwrap();
    wait_for("the held member enrolled", || async {
        members().await.contains(&held).then_some(())
    })
    .await;
    assert_eq!(count(&app, "select count(*) from inbox").await, 3);
    assert_eq!(balance(&app, &held).await.0, 100, "the signup bonus once");
    assert!(env.take_dead_letters().await.is_empty(), "nothing refused");
    worker.stop().await.unwrap();
    // Nothing was left unacked: a new worker gets no copy back (a returned delivery would go
    // before this marker and count as a duplicate).
    let again = env.start(INGEST_ONLY).await;
    env.publish(&[enrol(&format!("{t}-e3"), &format!("{t}-marker"))])
        .await;
    wait_for("the marker applied", || async {
        (count(&again.app, "select count(*) from inbox").await == 4).then_some(())
    })
    .await;
    let duplicates = lifecycle::testkit::metrics::Metrics::get(&again.app.metrics.events_duplicate);
    assert_eq!(duplicates, 0, "a settled delivery came back");
    again.stop().await.unwrap();
    env.cleanup().await;
}
