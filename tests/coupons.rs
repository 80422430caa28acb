//! Coupon codes: imported with `lifecycle coupons import`, drawn by planners working at once
//! (never one code twice), and an empty pool still sending its message without a code.

mod common;

use std::collections::HashSet;

use common::{ALL_ROLES, INGEST_ONLY, TestEnv, count, enrolment, wait_for};
use lifecycle::testkit::domain::MemberId;
use lifecycle::testkit::ledger::{self, CartState};
use serde_json::json;
use sqlx::Row;

const CARTS: usize = 200;

fn cart_event(env: &TestEnv, i: usize) -> String {
    json!({"specversion": "1.0", "id": format!("{}-cart-{i}", env.tag), "source": "test",
           "type": "cart.updated", "time": "2026-11-22T10:00:00Z",
           "data": {"cart_id": format!("c{i}"), "member_id": format!("m-{i}"), "total": 1800,
                    "currency": "USD", "items": [{"sku": "t", "name": "Tea", "quantity": 1, "unit_price": 1800}],
                    "checkout_url": format!("https://shop.example/cart/c{i}")}})
    .to_string()
}

/// Runs `lifecycle coupons import POOL FILE` and returns what it printed.
fn import(env: &TestEnv, pool: &str, codes: &[String]) -> String {
    let file = env.outbox.path().join(format!("{pool}.csv"));
    std::fs::write(&file, format!("# codes\n{}\n", codes.join("\n"))).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_lifecycle"))
        .args(["coupons", "import", pool, file.to_str().unwrap()])
        .envs(env.env_vars())
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout).unwrap()
}

/// The carts as stored, due at `now`.
async fn due_carts(pool: &sqlx::PgPool) -> Vec<CartState> {
    sqlx::query(
        "select cart_id, member_id, version, open, changed_at, due_at, notified_version, items,
                total_minor, currency, checkout_url
         from carts order by cart_id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .map(|r| CartState {
        cart_id: r.get("cart_id"),
        member_id: MemberId::parse(r.get::<&str, _>("member_id")).unwrap(),
        version: r.get("version"),
        open: r.get("open"),
        changed_at: r.get("changed_at"),
        due_at: r.get("due_at"),
        notified_version: r.get("notified_version"),
        items: r.get("items"),
        total_minor: r.get("total_minor"),
        currency: r.get("currency"),
        checkout_url: r.get("checkout_url"),
    })
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_planners_at_once_draw_distinct_codes_and_an_empty_pool_still_sends() {
    let env = TestEnv::new(&[
        ("LIFECYCLE_NOW", "2026-11-22T12:00:00Z".into()),
        (
            "LIFECYCLE_PROGRAM__COUPONS__ABANDONED-CART",
            "CART10".into(),
        ),
        ("LIFECYCLE_PROGRAM__COUPON_LOW_WATER", "5".into()),
    ]);
    let worker = env.start(INGEST_ONLY).await;
    let app = worker.app.clone();
    // Exactly as many codes as carts, one of them twice in the file.
    let mut codes: Vec<String> = (0..CARTS).map(|i| format!("CART10-{i:04}")).collect();
    codes.push("CART10-0007".into());
    let printed = import(&env, "CART10", &codes);
    assert_eq!(
        printed.trim(),
        format!("pool CART10: {CARTS} codes added, 1 already there, {CARTS} available")
    );

    let mut events: Vec<String> = (0..=CARTS).map(|i| enrolment(&env, i)).collect();
    events.extend((0..=CARTS).map(|i| cart_event(&env, i)));
    env.publish(&events).await;
    wait_for("every event applied", || async {
        (count(&app, "select count(*) from inbox").await == 2 * (CARTS as i64 + 1)).then_some(())
    })
    .await;

    // Two planners at once, each over half of the first 200 carts (interleaved, in batches
    // of ten, each batch its own transaction), as two workers' scans would.
    let mut carts = due_carts(&app.pool).await;
    let at = carts
        .iter()
        .position(|c| c.cart_id == format!("c{CARTS}"))
        .unwrap();
    let last = carts.remove(at);
    let now = app.clock.now();
    let program = app.settings.program.clone();
    let halves: Vec<Vec<CartState>> = (0..2)
        .map(|h| carts.iter().skip(h).step_by(2).cloned().collect())
        .collect();
    let planners = halves.into_iter().map(|half| {
        let (pool, program) = (app.pool.clone(), program.clone());
        tokio::spawn(async move {
            for batch in half.chunks(10) {
                let mut tx = pool.begin().await.unwrap();
                ledger::abandon_carts(&mut tx, batch, &program, now)
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
            }
        })
    });
    for planner in planners.collect::<Vec<_>>() {
        planner.await.unwrap();
    }
    let drawn: Vec<(String, Option<String>)> = sqlx::query_as(
        "select dedupe_key, context->>'coupon_code' from messages where trigger = 'abandoned-cart'",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(drawn.len(), CARTS);
    let distinct: HashSet<&str> = drawn.iter().filter_map(|(_, c)| c.as_deref()).collect();
    assert_eq!(distinct.len(), CARTS, "every message its own code");
    assert!(distinct.iter().all(|c| c.starts_with("CART10-")));
    assert_eq!(
        count(
            &app,
            "select count(*) from coupons where occurrence is null"
        )
        .await,
        0
    );

    // The pool is empty: the last cart's message is planned without a code, and sent.
    let mut tx = app.pool.begin().await.unwrap();
    ledger::abandon_carts(&mut tx, &[last], &program, now)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let key = format!("abandoned-cart:c{CARTS}:1:email");
    let code: Option<String> =
        sqlx::query_scalar("select context->>'coupon_code' from messages where dedupe_key = $1")
            .bind(&key)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(code, None);
    assert!(
        lifecycle::testkit::coupons::POOL_EMPTY.load(std::sync::atomic::Ordering::Relaxed) >= 1
    );
    worker.stop().await.unwrap();

    let sender = env.start(ALL_ROLES).await;
    wait_for("every cart's message sent", || async {
        (count(
            &app,
            "select count(*) from messages where trigger = 'abandoned-cart' and status = 'sent'",
        )
        .await
            == CARTS as i64 + 1)
            .then_some(())
    })
    .await;
    // The file provider's JSON has the rendered text part: with the code, and without it.
    let body = |cart: String| {
        let app = app.clone();
        let dir = env.outbox.path().to_owned();
        async move {
            let id: i64 = sqlx::query_scalar("select id from messages where dedupe_key = $1")
                .bind(format!("abandoned-cart:{cart}:1:email"))
                .fetch_one(&app.pool)
                .await
                .unwrap();
            let file = dir.join(format!("{id}-abandoned-cart-email.json"));
            let json: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
            json["body"].as_str().unwrap().to_owned()
        }
    };
    let (c7, code7) = (
        body("c7".into()).await,
        drawn
            .iter()
            .find(|(k, _)| k == "abandoned-cart:c7:1:email")
            .and_then(|(_, c)| c.clone())
            .unwrap(),
    );
    assert!(
        c7.contains(&format!("Use the code {code7} at checkout.")),
        "{c7}"
    );
    let empty = body(format!("c{CARTS}")).await;
    assert!(
        !empty.contains("CART10-") && !empty.contains("Use the code"),
        "{empty}"
    );
    sender.stop().await.unwrap();
    env.cleanup().await;
}
