//! Scale past one machine: two workers on a three-node RabbitMQ cluster (started by
//! `scripts/rabbit-cluster`), the input a quorum queue replicated on all three. The node leading
//! the queue is stopped mid-stream: a new leader is elected, and nothing is lost or doubled.
//! Ignored in the parallel run (it starts nodes of its own); `scripts/test` runs it alone.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Serve, SmtpSink, TestEnv, count, wait_up_to};

const EVENTS: usize = 2_000;

fn cluster(args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/rabbit-cluster");
    let status = Command::new(script).args(args).status().unwrap();
    assert!(status.success(), "scripts/rabbit-cluster {args:?}");
}

/// The node leading quorum queue `queue`, as the cluster (asked through node 1) says.
fn leader(queue: &str) -> String {
    let output = Command::new("rabbitmqctl")
        .args(["-q", "-n", "lc1@localhost", "list_queues", "name", "leader"])
        .output()
        .unwrap();
    assert!(output.status.success(), "rabbitmqctl list_queues");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|line| {
            let mut columns = line.split_whitespace();
            (columns.next() == Some(queue)).then(|| columns.next().unwrap_or_default().to_owned())
        })
        .unwrap_or_else(|| panic!("{queue} listed"))
}

/// Stops the cluster however the test ends.
struct Cluster;

impl Drop for Cluster {
    fn drop(&mut self) {
        cluster(&["stop"]);
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "starts a three-node RabbitMQ cluster; run alone with --run-ignored only"]
async fn a_node_stopped_mid_stream_loses_and_doubles_nothing() {
    cluster(&["start"]);
    let _cluster = Cluster;
    let node = |n: u16| format!("amqp://guest:guest@127.0.0.1:{}/%2f", 5700 + n);
    let sink = SmtpSink::start(&[]);
    // Workers and the platform talk to node 1; the queues are declared through node 2, so
    // that node 2 leads them (quorum queues are led from where they are declared).
    let env = TestEnv::new(&[
        ("LIFECYCLE_AMQP_URL", node(1)),
        ("LIFECYCLE_EMAIL_PROVIDERS", "smtp".into()),
        ("LIFECYCLE_SMTP_URL", sink.url()),
    ]);
    let mut via_two = env.settings.clone();
    via_two.amqp_url = node(2).parse().unwrap();
    let connection = lifecycle::testkit::amqp::connect(&via_two.amqp_url, "cluster-test")
        .await
        .unwrap();
    lifecycle::testkit::amqp::declare_topology(&connection, &via_two)
        .await
        .unwrap();
    connection.close(200, "bye".into()).await.ok();

    let app = env.app().await;
    let events = common::enrolments(&env, EVENTS);
    let mut a = Serve::start(&env);
    let mut b = Serve::start(&env);
    let (first, rest) = events.split_at(EVENTS / 2);
    env.publish(first).await;
    let under_way = wait_up_to(Duration::from_secs(60), || async {
        (count(&app, "select count(*) from inbox").await >= 200).then_some(())
    })
    .await;
    assert!(under_way.is_some(), "ingest under way");
    // The queues' leader goes away mid-stream; the platform goes on publishing. That node 2
    // leads the input queue is checked, not assumed.
    assert_eq!(
        leader(&env.settings.ingest.queue),
        "lc2@localhost",
        "node 2 leads the input queue"
    );
    cluster(&["stop-node", "2"]);
    env.publish(rest).await;
    let done = wait_up_to(Duration::from_secs(180), || async {
        let applied = count(&app, "select count(*) from inbox").await;
        let sent = count(&app, "select count(*) from messages where status = 'sent'").await;
        (applied == EVENTS as i64 && sent == EVENTS as i64).then_some(())
    })
    .await;
    let applied = count(&app, "select count(*) from inbox").await;
    assert!(
        done.is_some(),
        "not everything arrived with node 2 down: {applied} of {EVENTS} applied"
    );
    cluster(&["start-node", "2"]);
    assert!(a.terminate().await.success());
    assert!(b.terminate().await.success());
    assert_eq!(
        count(&app, "select count(*) from messages").await,
        EVENTS as i64
    );
    let mut copies: std::collections::HashMap<String, usize> = Default::default();
    for raw in sink.messages() {
        *copies
            .entry(common::parse_mail(&raw).message_id)
            .or_default() += 1;
    }
    assert_eq!(copies.len(), EVENTS, "one welcome each at the sink");
    let doubled: Vec<_> = copies.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "sent twice: {doubled:?}");
    println!(
        "cluster: {EVENTS} events, node 2 (the queues' leader) stopped mid-stream; 0 lost, 0 doubled"
    );
    env.cleanup().await;
}
