//! `queues`: the broker's queues, the outbox by status, and the notifications waiting.

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
    let n = q.notifications;
    println!();
    println!(
        "{:<14} {:>10} {:>12}",
        "notifications", "waiting", "oldest (s)"
    );
    println!(
        "{:<14} {:>10} {:>12.0}",
        "unpublished", n.unpublished, n.oldest_unpublished_seconds
    );
    println!(
        "{:<14} {:>10} {:>12.0}",
        "to POST", n.posts_pending, n.oldest_post_seconds
    );
    println!("{:<14} {:>10}", "POSTs dead", n.posts_dead);
    Ok(())
}
