//! `queues`: the broker's queues and the outbox by status.

use crate::app::App;
use crate::config::Settings;

/// Prints the queues' depths and the outbox's counts.
pub(super) async fn run(json: bool, settings: Settings) -> anyhow::Result<()> {
    let app = App::open(settings).await?;
    let q = crate::queues::snapshot(&app).await?;
    if json {
        println!("{}", serde_json::to_string(&q)?);
        return Ok(());
    }
    println!("{:<8} {:>10} {:>10}", "queue", "ready", "consumers");
    for (name, d) in [("events", q.events), ("retry", q.retry), ("dead", q.dead)] {
        println!("{name:<8} {:>10} {:>10}", d.messages, d.consumers);
    }
    println!();
    println!("{:<8} {:>10}", "outbox", "messages");
    for (status, n) in &q.outbox {
        println!("{status:<8} {n:>10}");
    }
    Ok(())
}
