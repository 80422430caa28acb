//! The handles every part of the worker shares: settings, the pool, metrics, the clock,
//! templates, health. It imports no role (`worker` starts them).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use anyhow::Context;
use sqlx::PgPool;
use tokio::sync::Notify;

use crate::clock::Clock;
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::render::Templates;
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

    /// Each role this process runs with its state, and whether all of them are alive: what
    /// `/readyz` reports besides the database, and what `serve` waits for before it tells
    /// systemd it is ready.
    pub fn roles_state(&self) -> (bool, serde_json::Map<String, serde_json::Value>) {
        let roles = self.roles.get().copied();
        let mut alive_all = true;
        let mut report = serde_json::Map::new();
        let mut check = |name: &str, runs: bool, alive: bool, state: serde_json::Value| {
            if runs {
                alive_all &= alive;
                report.insert(name.into(), state);
            }
        };
        let consumers = self.ingest_consumers.load(Ordering::Relaxed);
        check(
            "ingest",
            roles.is_some_and(|r| r.ingest),
            consumers > 0,
            serde_json::json!({"consumers": consumers, "alive": consumers > 0}),
        );
        let loops = self.dispatch_loops.load(Ordering::Relaxed);
        // A dispatcher whose results cannot be written holds its claims and sends nothing new.
        let stuck = self.writer_stuck_for().map(|d| d.as_secs());
        let alive = loops > 0 && stuck.is_none();
        let mut dispatch = serde_json::json!({"loops": loops, "alive": alive});
        if let Some(secs) = stuck {
            dispatch["writer_stuck_secs"] = secs.into();
        }
        check(
            "dispatch",
            roles.is_some_and(|r| r.dispatch),
            alive,
            dispatch,
        );
        let scheduler = self.scheduler.load(Ordering::Relaxed);
        check(
            "scheduler",
            roles.is_some_and(|r| r.schedule),
            scheduler,
            serde_json::json!({"alive": scheduler}),
        );
        (alive_all, report)
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
