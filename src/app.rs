//! The process: shared handles, and starting and stopping the worker's roles.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use anyhow::Context;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{error, info};

use crate::clock::Clock;
use crate::config::Settings;
use crate::dispatch::Dispatcher;
use crate::ingest::Ingest;
use crate::metrics::Metrics;
use crate::render::Templates;
use crate::scheduler::Scheduler;
use crate::shutdown::{self, Shutdown, ShutdownTrigger};
use crate::template_store::TemplateStore;

/// What every part of the worker shares.
#[derive(Clone)]
pub struct App {
    /// Settings, loaded once.
    pub settings: Arc<Settings>,
    /// The database.
    pub pool: PgPool,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Business time.
    pub clock: Clock,
    /// Ingest signals here when it planned messages, so dispatch need not wait for its poll.
    pub outbox_ready: Arc<Notify>,
    /// Signs and checks unsubscribe links.
    pub tokens: Arc<crate::suppress::Tokens>,
    /// What each role reports of itself, for `/readyz`.
    pub health: Arc<Health>,
    /// The templates: shipped, and the marketers' versions.
    pub templates: Arc<TemplateStore>,
    /// Console logins, throttled per (user, address), per address and globally.
    pub logins: Arc<crate::users::LoginThrottle>,
    /// Wrong bearer tokens, per client address.
    pub bearers: Arc<crate::users::BearerThrottle>,
}

/// Each role's own report of being alive, read by `/readyz`.
#[derive(Debug, Default)]
pub struct Health {
    /// The roles this process runs.
    pub roles: std::sync::OnceLock<Roles>,
    /// Ingest consumers consuming now (a channel open and subscribed).
    pub ingest_consumers: AtomicUsize,
    /// Dispatch loops running.
    pub dispatch_loops: AtomicUsize,
    /// The scheduler's loop is running.
    pub scheduler: AtomicBool,
    /// Each provider's circuit as this process's dispatcher last saw it: open or not.
    pub circuits: std::sync::Mutex<std::collections::BTreeMap<String, bool>>,
    /// Since when the dispatcher's results writer has been failing past its limit, if it is
    /// (`dispatch.writer_stuck_ms`).
    pub writer_stuck_since: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Health {
    /// Marks the results writer stuck (it has failed for longer than it may) or not.
    pub fn writer_stuck(&self, stuck: bool) {
        let mut since = self
            .writer_stuck_since
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match (stuck, since.is_some()) {
            (true, false) => {
                *since = Some(std::time::Instant::now());
                tracing::error!("The results writer is stuck: results cannot be recorded.");
            }
            (false, true) => *since = None,
            _ => return,
        }
        metrics::gauge!("lifecycle_results_writer_stuck").set(if stuck { 1.0 } else { 0.0 });
    }

    /// How long the results writer has been stuck, if it is.
    pub fn writer_stuck_for(&self) -> Option<std::time::Duration> {
        self.writer_stuck_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|since| since.elapsed())
    }

    /// Counts one ingest consumer as consuming until the guard is dropped.
    pub fn consuming(self: &Arc<Health>) -> ConsumingGuard {
        self.ingest_consumers.fetch_add(1, Ordering::Relaxed);
        ConsumingGuard(self.clone())
    }
}

/// Counts a consumer as consuming while it lives.
pub struct ConsumingGuard(Arc<Health>);

impl Drop for ConsumingGuard {
    fn drop(&mut self) {
        self.0.ingest_consumers.fetch_sub(1, Ordering::Relaxed);
    }
}

impl App {
    /// Migrates the database (creating it when missing) and opens the pool.
    pub async fn open(settings: Settings) -> anyhow::Result<App> {
        crate::db::migrate(&settings.database_url).await?;
        let pool_size = (settings.ingest.consumers + settings.dispatch.pipelines + 4) as u32;
        let pool = crate::db::pool(&settings.database_url, pool_size)?;
        let tokens = crate::suppress::Tokens::load(&pool)
            .await
            .context("loading the unsubscribe key")?;
        // Counters recorded before the recorder exists are lost: install it first.
        crate::metrics::prometheus();
        let shipped = Templates::load_configured(settings.templates_dir.as_deref())?;
        let templates = TemplateStore::open(pool.clone(), shipped).await?;
        Ok(App {
            templates: Arc::new(templates),
            logins: Arc::default(),
            bearers: Arc::default(),
            tokens: Arc::new(tokens),
            clock: Clock::from_setting(settings.now),
            settings: Arc::new(settings),
            pool,
            metrics: Arc::new(Metrics::default()),
            outbox_ready: Arc::new(Notify::new()),
            health: Arc::new(Health::default()),
        })
    }
}

/// Which parts of the worker run in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    /// Consume events.
    pub ingest: bool,
    /// Send messages.
    pub dispatch: bool,
    /// Run the scheduled scans.
    pub schedule: bool,
    /// Serve HTTP (health, metrics, unsubscribe, webhooks) on `http_addr`.
    pub http: bool,
}

/// A running worker.
pub struct Worker {
    /// The shared handles (tests read metrics and the pool through it).
    pub app: App,
    trigger: ShutdownTrigger,
    shutdown: Shutdown,
    roles: Supervisor,
}

impl Worker {
    /// Starts the roles. Templates and providers are checked before anything runs, so a bad
    /// template or provider setting fails here, not at the first send.
    pub async fn start(app: App, roles: Roles) -> anyhow::Result<Worker> {
        let (trigger, shutdown) = shutdown::channel();
        let mut supervisor = Supervisor::new(shutdown.clone());
        app.health.roles.set(roles).ok();
        if roles.dispatch {
            let dispatcher = Dispatcher::new(app.clone())?;
            supervisor.spawn("dispatch", dispatcher.run(shutdown.clone()));
        }
        if roles.http {
            // The queue, outbox and coupon gauges of /metrics.
            supervisor.spawn(
                "gauges",
                crate::queues::sample(app.clone(), shutdown.clone()),
            );
        }
        if roles.dispatch || roles.http {
            // Publishes made through any replica.
            supervisor.spawn("templates", app.templates.clone().watch(shutdown.clone()));
        }
        if roles.http {
            let listener = crate::http::bind(&app).await?;
            supervisor.spawn(
                "http",
                crate::http::serve_on(listener, app.clone(), shutdown.clone()),
            );
        }
        if roles.schedule {
            let scheduler = Scheduler::new(app.clone());
            supervisor.spawn("scheduler", scheduler.run(shutdown.clone()));
        }
        if roles.ingest {
            let ingest = Ingest::new(app.clone());
            supervisor.spawn("ingest", ingest.run(shutdown.clone()));
            supervisor.spawn(
                "dead letters",
                crate::dead_letters::store(app.clone(), shutdown.clone()),
            );
        }
        info!(
            ingest = roles.ingest,
            dispatch = roles.dispatch,
            schedule = roles.schedule,
            http = roles.http,
            "Worker started."
        );
        Ok(Worker {
            app,
            trigger,
            shutdown,
            roles: supervisor,
        })
    }

    /// Asks every role to finish its work in hand and stop, and waits for them. An error when
    /// a role failed, or ended before it was asked to.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.trigger.trigger();
        self.roles.join().await
    }

    /// Completes when a role stopped by itself (it should not) or shutdown was triggered.
    pub async fn stopped(&self) {
        tokio::select! {
            _ = self.shutdown.triggered() => {}
            _ = self.roles.died() => {}
        }
    }
}

/// The words of a caught panic (`panic!` gives a `&str` or a `String`).
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or(payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// How long roles have to finish their work in hand once shutdown is asked for.
const STOP_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs the roles' tasks and notices one that ends before shutdown was asked for (an error,
/// a panic, or returning at all), so that the process ends rather than go on half-alive.
struct Supervisor {
    shutdown: Shutdown,
    /// Signalled when a role ends before shutdown was asked for.
    died: Arc<Notify>,
    tasks: Vec<(&'static str, JoinHandle<RoleEnd>)>,
}

/// How a role's task ended: its result, and whether it ended by itself (before shutdown).
struct RoleEnd {
    result: anyhow::Result<()>,
    unasked: bool,
}

impl Supervisor {
    fn new(shutdown: Shutdown) -> Supervisor {
        Supervisor {
            shutdown,
            died: Arc::new(Notify::new()),
            tasks: Vec::new(),
        }
    }

    /// Runs a role.
    fn spawn<F>(&mut self, name: &'static str, role: F)
    where
        F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let (shutdown, died) = (self.shutdown.clone(), self.died.clone());
        let task = tokio::spawn(async move {
            // A panic is caught here so that it counts as the role dying, with its words.
            let result =
                match futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(role))
                    .await
                {
                    Ok(result) => result,
                    Err(panic) => Err(anyhow::anyhow!("panicked: {}", panic_message(&*panic))),
                };
            let unasked = !shutdown.is_triggered();
            if unasked {
                error!(role = name, error = ?result.as_ref().err(), "A role stopped by itself; the worker stops.");
                died.notify_one();
            }
            RoleEnd { result, unasked }
        });
        self.tasks.push((name, task));
    }

    /// Completes when a role ended before it was asked to.
    async fn died(&self) {
        self.died.notified().await;
    }

    /// Waits for every role; the first failure, if any. A role still running 30 s after
    /// shutdown was asked for (stuck on a broker or database that does not answer) is aborted
    /// and logged: what it had in hand comes back (unacked deliveries are requeued, claims
    /// lapse), and the process ends rather than hang.
    async fn join(self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + STOP_DEADLINE;
        let mut first_error = None;
        for (name, mut task) in self.tasks {
            let joined = match tokio::time::timeout_at(deadline, &mut task).await {
                Ok(joined) => joined,
                Err(_) => {
                    task.abort();
                    error!(
                        role = name,
                        "A role did not stop within 30 s of shutdown; it was aborted."
                    );
                    continue;
                }
            };
            let end = joined.with_context(|| format!("the {name} role's task was lost"))?;
            let failed = match end.result {
                Err(error) => Some(error.context(format!("the {name} role failed"))),
                Ok(()) if end.unasked => Some(anyhow::anyhow!(
                    "the {name} role stopped before it was asked to"
                )),
                Ok(()) => None,
            };
            if let Some(error) = failed {
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_role_that_ends_by_itself_stops_the_worker_with_an_error() {
        for (role, expected) in [
            (0, "the quitter role stopped before it was asked to"),
            (1, "the faulty role failed: broken"),
            (2, "the panicky role failed: panicked: boom"),
        ] {
            let (trigger, shutdown) = shutdown::channel();
            let mut roles = Supervisor::new(shutdown.clone());
            let waiting = shutdown.clone();
            roles.spawn("steady", async move {
                waiting.triggered().await;
                Ok(())
            });
            match role {
                0 => roles.spawn("quitter", async { Ok(()) }),
                1 => roles.spawn("faulty", async { Err(anyhow::anyhow!("broken")) }),
                _ => roles.spawn("panicky", async { panic!("boom") }),
            }
            tokio::time::timeout(std::time::Duration::from_secs(5), roles.died())
                .await
                .expect("the death is noticed");
            trigger.trigger();
            let error = roles.join().await.unwrap_err();
            assert_eq!(format!("{error:#}"), expected);
        }
        // Roles that stop when asked end cleanly.
        let (trigger, shutdown) = shutdown::channel();
        let mut roles = Supervisor::new(shutdown.clone());
        roles.spawn("steady", async move {
            shutdown.triggered().await;
            Ok(())
        });
        trigger.trigger();
        roles.join().await.unwrap();
    }
}
