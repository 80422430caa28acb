//! `bench`: the pipeline's figures against the broker's ceiling, or the report's timing.

use crate::config::Settings;

#[derive(clap::Args)]
pub(super) struct Bench {
    /// Events of the ceiling and ingest phases: the shop's mix.
    #[arg(long, default_value_t = 1_000_000)]
    events: usize,
    /// Members of the shop (at most a tenth of --events).
    #[arg(long, default_value_t = 100_000)]
    members: usize,
    /// Messages in each dispatch phase (HTTP, then SMTP).
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// The SMTP server of the SMTP dispatch phase; without it the bench starts smtp-sink
    /// (postfix) on a free port, and skips the phase if smtp-sink is not installed.
    #[arg(long)]
    smtp: Option<String>,
    /// Seconds of steady traffic at half the ingest rate in the latency phase.
    #[arg(long, default_value_t = 20)]
    latency_seconds: u64,
    /// Events of each scale-out run (one worker process, then two); 0 skips it.
    #[arg(long, default_value_t = 200_000)]
    scale_out_events: usize,
    /// Print the figures as one JSON object.
    #[arg(long)]
    json: bool,
    /// Instead: time the loyalty report over a year of a shop filled in SQL.
    #[arg(long)]
    report: bool,
    /// Members of that shop.
    #[arg(long, default_value_t = 100_000, requires = "report")]
    report_members: i64,
    /// Events of its year.
    #[arg(long, default_value_t = 1_000_000, requires = "report")]
    report_events: i64,
}

/// Runs the bench the arguments ask for.
pub(super) async fn run(args: Bench, settings: Settings) -> anyhow::Result<()> {
    if args.report {
        let size = crate::report::bench::Size {
            members: args.report_members,
            events: args.report_events,
        };
        return crate::report::bench::run(settings, size).await;
    }
    let smtp = args
        .smtp
        .map(|url| url.parse())
        .transpose()
        .map_err(|e: String| anyhow::anyhow!("--smtp: {e}"))?;
    let options = crate::bench::Options {
        events: args.events,
        members: args.members,
        messages: args.messages,
        smtp,
        latency_seconds: args.latency_seconds,
        scale_out_events: args.scale_out_events,
        json: args.json,
    };
    crate::bench::run(settings, options).await
}
