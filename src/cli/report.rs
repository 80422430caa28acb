//! `report`: the loyalty report as a table, JSON or CSV.

use crate::app::App;
use crate::config::Settings;
use crate::report::{self, Report, lines, trigger_lines};

#[derive(clap::Args)]
pub(super) struct ReportArgs {
    /// Start, included: a date (2026-10-01, midnight UTC) or an RFC 3339 time. Default:
    /// 30 days before --to.
    #[arg(long, value_parser = time_arg)]
    from: Option<chrono::DateTime<chrono::Utc>>,
    /// End, excluded. Default: now.
    #[arg(long, value_parser = time_arg)]
    to: Option<chrono::DateTime<chrono::Utc>>,
    /// JSON (the API's shape) instead of a table.
    #[arg(long, conflicts_with = "csv")]
    json: bool,
    /// CSV, a `figure,value` row per figure.
    #[arg(long)]
    csv: bool,
}

/// A `--from`/`--to` value.
fn time_arg(text: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    report::parse_time(text).map_err(|e| e.to_string())
}

/// Prints the report for the period asked.
pub(super) async fn run(args: ReportArgs, settings: Settings) -> anyhow::Result<()> {
    let app = App::open(settings).await?;
    let period = report::Period::new(args.from, args.to, app.clock.now())?;
    let report = report::loyalty(&app.pool, period).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if args.csv {
        print!("{}", report::csv(&report));
    } else {
        print!("{}", table(&report));
    }
    Ok(())
}

/// The report as a readable table: each figure with the counts it is made of.
pub(super) fn table(r: &Report) -> String {
    let rows: Vec<Vec<String>> = lines(r)
        .into_iter()
        .map(|l| vec![l.name.to_owned(), l.value, l.from])
        .collect();
    let mut out = format!(
        "Loyalty report, {} to {} (event time, UTC)\n\n",
        r.from.to_rfc3339(),
        r.to.to_rfc3339()
    );
    out.push_str(&super::table::text_table(
        &["figure", "value", "from"],
        &rows,
        "",
    ));
    out.push('\n');
    let triggers: Vec<Vec<String>> = trigger_lines(r)
        .into_iter()
        .map(|t| {
            vec![
                t.name,
                t.sent.to_string(),
                t.conversions.to_string(),
                t.rate,
                t.control_members.to_string(),
                t.control_conversions.to_string(),
                t.control_rate,
                t.lift,
            ]
        })
        .collect();
    out.push_str(&super::table::text_table(
        &[
            "trigger",
            "sent",
            "converted",
            "rate",
            "held out",
            "converted",
            "control rate",
            "lift",
        ],
        &triggers,
        "",
    ));
    out
}
