//! `dead-letters`: list, replay and archive refused events.

use clap::Subcommand;

use crate::app::App;
use crate::config::Settings;
use crate::dead_letters::{self, DeadLetter, Filter, Selection};

#[derive(clap::Args)]
pub(super) struct DeadLetters {
    #[command(subcommand)]
    action: Option<DeadLettersAction>,
    /// Reason contains this.
    #[arg(long)]
    reason: Option<String>,
    /// Event type.
    #[arg(long = "type")]
    event_type: Option<String>,
    /// How many.
    #[arg(long, default_value_t = 50)]
    limit: i64,
    /// One JSON object a line instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
pub(super) enum DeadLettersAction {
    /// Republish dead letters to the exchange with a fresh retry count.
    Replay {
        /// Dead letter ids (replayed even when they were before).
        ids: Vec<i64>,
        /// Every unarchived dead letter not replayed before.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        /// With --all: those replayed before too.
        #[arg(long, requires = "all")]
        again: bool,
    },
    /// Archive dead letters (they leave the list).
    Archive {
        /// Dead letter ids.
        ids: Vec<i64>,
        /// Every unarchived dead letter.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
}

/// Lists dead letters, or replays or archives them.
pub(super) async fn run(args: DeadLetters, settings: Settings) -> anyhow::Result<()> {
    let app = App::open(settings).await?;
    let every = Filter::default();
    let by = format!(
        "{} (cli)",
        std::env::var("USER").unwrap_or_else(|_| "cli".into())
    );
    match args.action {
        Some(DeadLettersAction::Replay { ids, all, again }) => {
            let selection = if all && again {
                Selection::Again(&every)
            } else if all {
                Selection::Matching(&every)
            } else if !ids.is_empty() {
                Selection::Ids(&ids)
            } else {
                anyhow::bail!("name the dead letters to replay, or --all");
            };
            let n = dead_letters::replay(&app, selection, &by).await?;
            println!("{n} dead letters replayed.");
        }
        Some(DeadLettersAction::Archive { ids, all }) => {
            let selection = if all {
                Selection::Matching(&every)
            } else if !ids.is_empty() {
                Selection::Ids(&ids)
            } else {
                anyhow::bail!("name the dead letters to archive, or --all");
            };
            let n = dead_letters::archive(&app, selection, &by).await?;
            println!("{n} dead letters archived.");
        }
        None => {
            let filter = Filter {
                reason: args.reason,
                event_type: args.event_type,
                ..Default::default()
            };
            let rows = dead_letters::list(&app, &filter, args.limit, None).await?;
            super::table::print_rows(&rows, args.json, table)?;
        }
    }
    Ok(())
}

/// Dead letters as a table for the command line.
fn table(rows: &[DeadLetter]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|d| {
            vec![
                d.id.to_string(),
                d.dead_lettered_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                d.event_type.clone().unwrap_or_else(|| "?".into()),
                d.event_id.clone().unwrap_or_default(),
                d.replays.to_string(),
                crate::mask::text(&d.reason).chars().take(100).collect(),
            ]
        })
        .collect();
    super::table::text_table(
        &["id", "dead-lettered", "type", "event", "replays", "reason"],
        &cells,
        "(no dead letters)",
    )
}
