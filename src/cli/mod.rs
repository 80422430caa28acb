//! The `lifecycle` command line: one file per group of verbs, each with its arguments.

mod admin;
mod bench;
mod dead_letters;
mod deliveries;
mod demo;
mod queues;
mod report;
mod serve;
pub(crate) mod table;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{LogFormat, Settings};

/// Loyalty lifecycle messaging worker.
#[derive(Parser)]
#[command(name = "lifecycle", version, about)]
struct Cli {
    /// Configuration file (default: lifecycle.toml when present, or LIFECYCLE_CONFIG).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume events and send messages until SIGINT or SIGTERM.
    Serve(serve::Serve),
    /// Create the database if missing and apply migrations.
    Migrate,
    /// Publish a JSON-lines file of events to the exchange.
    Publish {
        /// One CloudEvent per line.
        file: PathBuf,
    },
    /// Publish the sample events, process them, and show the messages produced.
    Demo {
        /// Events to publish.
        #[arg(long, default_value = "examples/demo-events.jsonl")]
        events: PathBuf,
    },
    /// Measure ingest throughput against the broker's raw ceiling, and optionally SMTP dispatch.
    Bench(bench::Bench),
    /// Check that every template compiles.
    Templates {
        #[command(subcommand)]
        action: admin::TemplatesAction,
    },
    /// Console and API users.
    Users {
        #[command(subcommand)]
        action: admin::UsersAction,
    },
    /// Coupon code pools.
    Coupons {
        #[command(subcommand)]
        action: admin::CouponsAction,
    },
    /// Search messages (newest first) and what became of them; `retry` requeues failed ones.
    Deliveries(deliveries::Deliveries),
    /// Dead letters (refused events) kept in PostgreSQL; `replay` republishes them.
    DeadLetters(dead_letters::DeadLetters),
    /// The loyalty report for [--from, --to): retention, repeat purchase, upsell, NPS, points,
    /// and each trigger's conversions beside its control group's.
    Report(report::ReportArgs),
    /// The broker's queues (ready messages, consumers) and the outbox by status.
    Queues {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// GET /readyz on the configured HTTP address: exit 0 when ready, 1 otherwise (a
    /// container's health check: the image has no curl).
    Healthcheck,
}

/// The stack of every thread the process starts (reserved, and touched only as used). lapin
/// reads a message's headers, and clones and drops them, recursing once per level of nesting,
/// on its own thread and on tokio's; a publisher's headers nested thousands deep (as many as
/// a 128 KiB frame holds, about 21,000) overflowed a 2 MiB stack and aborted the process.
const THREAD_STACK: usize = 256 * 1024 * 1024;

/// Parses the command line, loads the settings, and runs the command; the process's exit code
/// (2 for settings that do not load).
pub fn main() -> ExitCode {
    // lapin starts its thread without a stack size, so with Rust's default, which this sets;
    // nothing has started a thread yet.
    if std::env::var_os("RUST_MIN_STACK").is_none() {
        // SAFETY: the process has one thread yet, so nothing reads the environment meanwhile.
        unsafe { std::env::set_var("RUST_MIN_STACK", THREAD_STACK.to_string()) };
    }
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("error: {error:#}");
            return ExitCode::from(2);
        }
    };
    // The demo tells its own story on stdout; its logs are for when something goes wrong.
    let level = match cli.command {
        Command::Demo { .. } => "warn",
        _ => "warn,lifecycle=info",
    };
    init_logging(level, settings.log_format);
    // The blocking pool runs rendering (CPU work) and the odd file or password hash: a few
    // threads per core keep the cores busy, where tokio's default of 512 grew to over a hundred
    // threads under load, each with its own allocator arena (memory) and its share of switches.
    let cores = std::thread::available_parallelism().map_or(2, usize::from);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads((cores * 4).max(8))
        .thread_stack_size(THREAD_STACK)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(cli.command, settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr at `RUST_LOG`'s levels (`default` without it), as text or as one JSON object
/// a line holding the fields of the event and of every span it happened in (the event, the
/// message, its trigger and channel, the provider…).
fn init_logging(default: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs
            .json()
            .with_current_span(false)
            .with_span_list(true)
            .flatten_event(true)
            .init(),
    }
}

async fn run(command: Command, settings: Settings) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => serve::serve(args, settings).await,
        Command::Migrate => serve::migrate(settings).await,
        Command::Publish { file } => serve::publish(file, settings).await,
        Command::Demo { events } => demo::run(settings, &events).await,
        Command::Bench(args) => bench::run(args, settings).await,
        Command::Templates { action } => admin::templates(action, &settings),
        Command::Users { action } => admin::users(action, &settings).await,
        Command::Coupons { action } => admin::coupons(action, &settings).await,
        Command::Deliveries(args) => deliveries::run(args, settings).await,
        Command::DeadLetters(args) => dead_letters::run(args, settings).await,
        Command::Report(args) => report::run(args, settings).await,
        Command::Healthcheck => serve::healthcheck(&settings).await,
        Command::Queues { json } => queues::run(json, settings).await,
    }
}
