//! The `lifecycle` command: parse the command line, load settings, run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use lifecycle::app::{App, Roles};
use lifecycle::config::Settings;
use lifecycle::worker::Worker;

/// mimalloc instead of glibc's malloc: dispatch allocates and frees a few 10 KB buffers per
/// email across threads (rendered on the blocking pool, sent from the async workers), where
/// glibc took about a sixth of the bench process's samples (`malloc_consolidate`,
/// `unlink_chunk`, `_int_free`). Without transparent huge pages (`no_thp`): they added 20–30
/// MiB to the peak.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Loyalty lifecycle messaging worker.
#[derive(Parser)]
#[command(version, about)]
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
    Serve {
        /// Do not consume events.
        #[arg(long)]
        no_ingest: bool,
        /// Do not send messages.
        #[arg(long)]
        no_dispatch: bool,
        /// Do not run the scheduled scans (expiry, points-expiring, birthday, carts).
        #[arg(long)]
        no_schedule: bool,
        /// Do not serve HTTP (health, metrics, unsubscribe pages, webhooks).
        #[arg(long)]
        no_http: bool,
    },
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
    Bench {
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
    },
    /// Check that every template compiles.
    Templates {
        #[command(subcommand)]
        action: TemplatesAction,
    },
    /// Console and API users.
    Users {
        #[command(subcommand)]
        action: UsersAction,
    },
    /// Coupon code pools.
    Coupons {
        #[command(subcommand)]
        action: CouponsAction,
    },
    /// Search messages (newest first) and what became of them; `retry` requeues failed ones.
    Deliveries {
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
    },
    /// Dead letters (refused events) kept in PostgreSQL; `replay` republishes them.
    DeadLetters {
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
    },
    /// The loyalty report for [--from, --to): retention, repeat purchase, upsell, NPS, points,
    /// and each trigger's conversions beside its control group's.
    Report {
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
    },
    /// The broker's queues (ready messages, consumers) and the outbox by status.
    Queues {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// A `--from`/`--to` value.
fn time_arg(text: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    lifecycle::report::parse_time(text).map_err(|e| e.to_string())
}

/// Filters of `deliveries`.
#[derive(clap::Args, Debug, Default)]
struct MessageFilter {
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
    fn filter(self) -> lifecycle::deliveries::Filter {
        lifecycle::deliveries::Filter {
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
enum DeliveriesAction {
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

#[derive(Subcommand)]
enum DeadLettersAction {
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

#[derive(Subcommand)]
enum UsersAction {
    /// Add a user (or give one new credentials): prints a one-time console password and an
    /// API token.
    Add {
        /// The user's name (letters, digits, '.', '_', '-', '@').
        name: String,
        /// ops (everything) or marketer (templates, previews, test sends, reading members).
        #[arg(long)]
        role: String,
        /// The user's own email address: their test sends may always go there.
        #[arg(long)]
        email: Option<String>,
        /// The user's own number (E.164): their test SMS may always go there.
        #[arg(long)]
        phone: Option<String>,
    },
    /// Remove a user: their console sessions end and their API token stops working.
    Remove {
        /// The user's name.
        name: String,
    },
}

#[derive(Subcommand)]
enum CouponsAction {
    /// Load unique codes (one per line, or a CSV's first column) into a pool.
    Import {
        /// The pool's name, as `[program.coupons]` names it.
        pool: String,
        /// The file of codes.
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum TemplatesAction {
    /// Compile every template and report the first error.
    Check,
}

/// The stack of every thread the process starts (reserved, and touched only as used). lapin
/// reads a message's headers, and clones and drops them, recursing once per level of nesting,
/// on its own thread and on tokio's; a publisher's headers nested thousands deep (as many as
/// a 128 KiB frame holds, about 21,000) overflowed a 2 MiB stack and aborted the process.
const THREAD_STACK: usize = 256 * 1024 * 1024;

fn main() -> ExitCode {
    // lapin starts its thread without a stack size, so with Rust's default, which this sets;
    // nothing has started a thread yet.
    if std::env::var_os("RUST_MIN_STACK").is_none() {
        // SAFETY: the process has one thread yet, so nothing reads the environment meanwhile.
        unsafe { std::env::set_var("RUST_MIN_STACK", THREAD_STACK.to_string()) };
    }
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,lifecycle=info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();

    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("error: {error:#}");
            return ExitCode::from(2);
        }
    };
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

async fn run(command: Command, settings: Settings) -> anyhow::Result<()> {
    match command {
        Command::Serve {
            no_ingest,
            no_dispatch,
            no_schedule,
            no_http,
        } => {
            let app = App::open(settings).await?;
            let worker = Worker::start(
                app,
                Roles {
                    ingest: !no_ingest,
                    dispatch: !no_dispatch,
                    schedule: !no_schedule,
                    http: !no_http,
                },
            )
            .await?;
            tokio::select! {
                _ = lifecycle::shutdown::signal() => tracing::info!("Signal received; finishing work in hand."),
                _ = worker.stopped() => {}
            }
            worker.stop().await
        }
        Command::Migrate => {
            lifecycle::db::migrate(&settings.database_url).await?;
            println!(
                "database {} is up to date",
                settings.database_url.database()
            );
            Ok(())
        }
        Command::Publish { file } => {
            let lines = lifecycle::publish::read_lines(&file)?;
            let n = lifecycle::demo::publish(&settings, &lines).await?;
            println!("published {n} events to exchange {}", settings.exchange);
            Ok(())
        }
        Command::Demo { events } => lifecycle::demo::run(settings, &events).await,
        Command::Bench {
            events,
            members,
            messages,
            smtp,
            latency_seconds,
            scale_out_events,
            json,
            report,
            report_members,
            report_events,
        } => {
            if report {
                let size = lifecycle::report::bench::Size {
                    members: report_members,
                    events: report_events,
                };
                return lifecycle::report::bench::run(settings, size).await;
            }
            let smtp = smtp
                .map(|url| url.parse())
                .transpose()
                .map_err(|e: String| anyhow::anyhow!("--smtp: {e}"))?;
            let options = lifecycle::bench::Options {
                events,
                members,
                messages,
                smtp,
                latency_seconds,
                scale_out_events,
                json,
            };
            lifecycle::bench::run(settings, options).await
        }
        Command::Templates {
            action: TemplatesAction::Check,
        } => {
            let dir = settings.templates_dir.as_deref();
            let templates = lifecycle::render::Templates::load_configured(dir)?;
            let warnings = templates.check(settings.dispatch.sms_max_segments)?;
            for warning in &warnings {
                println!("warning: {warning}");
            }
            let which = dir.map_or("the shipped templates".to_owned(), |d| {
                format!("templates in {}", d.display())
            });
            println!("{which} are valid ({} warnings)", warnings.len());
            Ok(())
        }
        Command::Users {
            action:
                UsersAction::Add {
                    name,
                    role,
                    email,
                    phone,
                },
        } => {
            let role =
                lifecycle::users::Role::parse(&role).map_err(|e| anyhow::anyhow!("--role: {e}"))?;
            let contact = lifecycle::users::Contact {
                email: email
                    .map(|e| lifecycle::domain::Email::parse(&e))
                    .transpose()
                    .map_err(|e| anyhow::anyhow!("--email: {e}"))?,
                phone: phone
                    .map(|p| lifecycle::domain::Phone::parse(&p))
                    .transpose()
                    .map_err(|e| anyhow::anyhow!("--phone: {e}"))?,
            };
            lifecycle::db::migrate(&settings.database_url).await?;
            let pool = lifecycle::db::pool(&settings.database_url, 1)?;
            let credentials = lifecycle::users::add(&pool, &name, role, &contact).await?;
            println!("user: {name} ({})", role.as_str());
            println!("password: {}", credentials.password);
            println!("token: {}", credentials.token);
            Ok(())
        }
        Command::Users {
            action: UsersAction::Remove { name },
        } => {
            lifecycle::db::migrate(&settings.database_url).await?;
            let pool = lifecycle::db::pool(&settings.database_url, 1)?;
            if !lifecycle::users::remove(&pool, &name).await? {
                anyhow::bail!("no user {name:?}");
            }
            println!("user {name} removed: their sessions ended and their token no longer works");
            Ok(())
        }
        Command::Coupons {
            action: CouponsAction::Import { pool, file },
        } => {
            lifecycle::db::migrate(&settings.database_url).await?;
            let db = lifecycle::db::pool(&settings.database_url, 1)?;
            let done = lifecycle::coupons::import(&db, &pool, &file).await?;
            println!(
                "pool {pool}: {} codes added, {} already there, {} available",
                done.added, done.duplicates, done.available
            );
            Ok(())
        }
        Command::Deliveries {
            action,
            filter,
            limit,
            json,
        } => {
            let app = App::open(settings).await?;
            if let Some(DeliveriesAction::Retry {
                ids,
                failed,
                filter,
            }) = action
            {
                let filter = filter.filter();
                let which = match (failed, ids.is_empty()) {
                    (true, _) => lifecycle::outbox::Requeue::Matching(&filter),
                    (false, false) => lifecycle::outbox::Requeue::Ids(&ids),
                    (false, true) => anyhow::bail!("name the messages to retry, or --failed"),
                };
                let n = lifecycle::outbox::retry_failed(&app.pool, which, app.clock.now()).await?;
                println!("{n} failed messages queued again.");
                return Ok(());
            }
            let rows =
                lifecycle::deliveries::search(&app, &filter.filter(), limit, None, true).await?;
            if json {
                for row in &rows {
                    println!("{}", serde_json::to_string(row)?);
                }
            } else {
                print!("{}", lifecycle::deliveries::table(&rows));
            }
            Ok(())
        }
        Command::DeadLetters {
            action,
            reason,
            event_type,
            limit,
            json,
        } => {
            let app = App::open(settings).await?;
            let every = lifecycle::dead_letters::Filter::default();
            let by = std::env::var("USER").unwrap_or_else(|_| "cli".into());
            match action {
                Some(DeadLettersAction::Replay { ids, all, again }) => {
                    let selection = if all && again {
                        lifecycle::dead_letters::Selection::Again(&every)
                    } else if all {
                        lifecycle::dead_letters::Selection::Matching(&every)
                    } else if !ids.is_empty() {
                        lifecycle::dead_letters::Selection::Ids(&ids)
                    } else {
                        anyhow::bail!("name the dead letters to replay, or --all");
                    };
                    let n =
                        lifecycle::dead_letters::replay(&app, selection, &format!("{by} (cli)"))
                            .await?;
                    println!("{n} dead letters replayed.");
                }
                Some(DeadLettersAction::Archive { ids, all }) => {
                    let selection = if all {
                        lifecycle::dead_letters::Selection::Matching(&every)
                    } else if !ids.is_empty() {
                        lifecycle::dead_letters::Selection::Ids(&ids)
                    } else {
                        anyhow::bail!("name the dead letters to archive, or --all");
                    };
                    let n =
                        lifecycle::dead_letters::archive(&app, selection, &format!("{by} (cli)"))
                            .await?;
                    println!("{n} dead letters archived.");
                }
                None => {
                    let filter = lifecycle::dead_letters::Filter {
                        reason,
                        event_type,
                        ..Default::default()
                    };
                    let rows = lifecycle::dead_letters::list(&app, &filter, limit, None).await?;
                    if json {
                        for row in &rows {
                            println!("{}", serde_json::to_string(row)?);
                        }
                    } else {
                        print!("{}", lifecycle::dead_letters::table(&rows));
                    }
                }
            }
            Ok(())
        }
        Command::Report {
            from,
            to,
            json,
            csv,
        } => {
            let app = App::open(settings).await?;
            let period = lifecycle::report::Period::new(from, to, app.clock.now())?;
            let report = lifecycle::report::loyalty(&app.pool, period).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else if csv {
                print!("{}", lifecycle::report::csv(&report));
            } else {
                print!("{}", lifecycle::report::table(&report));
            }
            Ok(())
        }
        Command::Queues { json } => {
            let app = App::open(settings).await?;
            let q = lifecycle::queues::snapshot(&app).await?;
            if json {
                println!("{}", serde_json::to_string(&q)?);
            } else {
                println!("{:<8} {:>10} {:>10}", "queue", "ready", "consumers");
                for (name, d) in [("events", q.events), ("retry", q.retry), ("dead", q.dead)] {
                    println!("{name:<8} {:>10} {:>10}", d.messages, d.consumers);
                }
                println!();
                println!("{:<8} {:>10}", "outbox", "messages");
                for (status, n) in &q.outbox {
                    println!("{status:<8} {n:>10}");
                }
            }
            Ok(())
        }
    }
}
