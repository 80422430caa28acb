//! The publisher examples (examples/publishers/), run against the real broker: lifecycle
//! applies what each publishes, once, however often it is run.

mod common;

use std::process::Command;

use common::{TestEnv, count, wait_for};
use lifecycle::testkit::app::Roles;

const INGEST: Roles = Roles {
    ingest: true,
    dispatch: false,
    schedule: false,
    http: false,
};

/// Runs one example twice (a platform retrying) with the environment's broker and exchange,
/// then waits for lifecycle to have applied its enrolment and order exactly once.
async fn publishes_what_lifecycle_applies_once(program: &str, script: &str) {
    let env = TestEnv::new(&[]);
    let worker = env.start(INGEST).await;
    let app = env.app().await;
    let member = format!("{}-member", env.tag);
    let order = format!("{}-order", env.tag);
    // The topology lifecycle declares as it starts, declared now: the examples publish with
    // `mandatory`, and an event no queue takes is their error.
    env.publish(&[]).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/publishers/").to_owned() + script;
    for _ in 0..2 {
        let out = Command::new(program)
            .arg(&script)
            .args([&member, &order])
            .env("AMQP_URL", env.settings.amqp_url.expose())
            .env("EXCHANGE", &env.settings.exchange)
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{script}: {said}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            said.contains(&format!("published order.placed order-{order}")),
            "{said}"
        );
    }
    let applied = format!(
        "select count(*) from inbox where event_id in ('enrolled-{member}', 'order-{order}')"
    );
    wait_for("both events applied", || async {
        (count(&app, &applied).await == 2).then_some(())
    })
    .await;
    let members = format!("select count(*) from members where member_id = '{member}'");
    let orders = format!(
        "select count(*) from orders where order_id = '{order}' and member_id = '{member}'"
    );
    assert_eq!(count(&app, &members).await, 1);
    assert_eq!(count(&app, &orders).await, 1);
    // The second run's copies were the same events: applied once, earned once.
    let journal = format!(
        "select count(*) from point_entries where member_id = '{member}' and kind = 'order'"
    );
    assert_eq!(count(&app, &journal).await, 1);
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn the_python_example_publishes_what_lifecycle_applies() {
    let python = std::env::var("PUBLISHERS_PYTHON")
        .expect("PUBLISHERS_PYTHON names a python with pika (scripts/publishers)");
    publishes_what_lifecycle_applies_once(&python, "python/publish.py").await;
}

#[tokio::test]
async fn the_node_example_publishes_what_lifecycle_applies() {
    publishes_what_lifecycle_applies_once("node", "node/publish.mjs").await;
}
