//! `deliveries`: search messages, and requeue failed ones.

use clap::Subcommand;

use crate::app::App;
use crate::config::Settings;
use crate::deliveries::{self, Message, mask};

#[derive(clap::Args)]
pub(super) struct Deliveries {
    #[command(subcommand)]
    action: Option<DeliveriesAction>,
    #[command(flatten)]
    filter: Box<MessageFilter>,
    /// How many.
    #[arg(long, default_value_t = 50)]
    limit: i64,
    /// One JSON object a line instead of a table.
    #[arg(long)]
    json: bool,
}

/// Filters of `deliveries`.
#[derive(clap::Args, Debug, Default)]
pub(super) struct MessageFilter {
    /// One member's.
    #[arg(long)]
    member: Option<String>,
    /// One trigger's (welcome, redemption-ready, …).
    #[arg(long)]
    trigger: Option<String>,
    /// email or sms.
    #[arg(long)]
    channel: Option<String>,
    /// pending, sending, sent, suppressed, cancelled, failed or held_out.
    #[arg(long)]
    status: Option<String>,
    /// The provider that took it, or was tried last.
    #[arg(long)]
    provider: Option<String>,
    /// Planned at or after (RFC 3339).
    #[arg(long)]
    since: Option<chrono::DateTime<chrono::Utc>>,
    /// Planned before (RFC 3339).
    #[arg(long)]
    until: Option<chrono::DateTime<chrono::Utc>>,
    /// Test sends only (true) or none of them (false).
    #[arg(long)]
    test: Option<bool>,
}

impl MessageFilter {
    fn filter(self) -> crate::deliveries::Filter {
        crate::deliveries::Filter {
            member_id: self.member,
            trigger: self.trigger,
            channel: self.channel,
            status: self.status,
            provider: self.provider,
            since: self.since,
            until: self.until,
            test: self.test,
        }
    }
}

#[derive(Subcommand)]
pub(super) enum DeliveriesAction {
    /// Put failed messages back in the queue: these ids, or every failed one matching.
    Retry {
        /// Message ids.
        ids: Vec<i64>,
        /// Every failed message matching the filters.
        #[arg(long, conflicts_with = "ids")]
        failed: bool,
        #[command(flatten)]
        filter: Box<MessageFilter>,
    },
}

/// Lists messages matching the filters, or requeues failed ones.
pub(super) async fn run(args: Deliveries, settings: Settings) -> anyhow::Result<()> {
    let app = App::open(settings).await?;
    if let Some(DeliveriesAction::Retry {
        ids,
        failed,
        filter,
    }) = args.action
    {
        let filter = filter.filter();
        let which = match (failed, ids.is_empty()) {
            (true, _) => crate::outbox::Requeue::Matching(&filter),
            (false, false) => crate::outbox::Requeue::Ids(&ids),
            (false, true) => anyhow::bail!("name the messages to retry, or --failed"),
        };
        let n = crate::outbox::retry_failed(&app.pool, which, app.clock.now()).await?;
        println!("{n} failed messages queued again.");
        return Ok(());
    }
    let rows = deliveries::search(&app, &args.filter.filter(), args.limit, None, true).await?;
    super::table::print_rows(&rows, args.json, table)?;
    Ok(())
}

/// Messages as a table for the command line (recipients masked).
fn table(rows: &[Message]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|m| {
            vec![
                m.id.to_string(),
                m.created_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                m.trigger.clone(),
                m.channel.clone(),
                m.recipient
                    .as_deref()
                    .map_or(String::new(), |to| mask(&m.channel, to)),
                format!("{}{}", m.status, if m.test { " (test)" } else { "" }),
                m.attempts.to_string(),
                m.provider.clone().unwrap_or_default(),
                m.last_error
                    .as_deref()
                    .map(|e| e.chars().take(80).collect())
                    .unwrap_or_default(),
            ]
        })
        .collect();
    super::table::text_table(
        &[
            "id", "planned", "trigger", "channel", "to", "status", "tries", "provider", "error",
        ],
        &cells,
        "(no messages)",
    )
}
