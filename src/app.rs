//! The process: shared handles, and starting and stopping the worker's roles.

use std::sync::Arc;

use anyhow::Context;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::info;

use crate::clock::Clock;
use crate::config::Settings;
use crate::dispatch::Dispatcher;
use crate::ingest::Ingest;
use crate::metrics::Metrics;
use crate::render::Templates;
use crate::scheduler::Scheduler;
use crate::shutdown::{self, Shutdown, ShutdownTrigger};

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
        Ok(App {
            tokens: Arc::new(tokens),
            clock: Clock::from_setting(settings.now),
            settings: Arc::new(settings),
            pool,
            metrics: Arc::new(Metrics::default()),
            outbox_ready: Arc::new(Notify::new()),
        })
    }
}

/// Which parts of the worker run in this process.
#[derive(Debug, Clone, Copy)]
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
    tasks: Vec<(&'static str, JoinHandle<anyhow::Result<()>>)>,
}

impl Worker {
    /// Starts the roles. Templates and providers are checked before anything runs, so a bad
    /// template or provider setting fails here, not at the first send.
    pub async fn start(app: App, roles: Roles) -> anyhow::Result<Worker> {
        let (trigger, shutdown) = shutdown::channel();
        let mut tasks = Vec::new();
        if roles.dispatch {
            let templates = Templates::load(&app.settings.templates_dir).with_context(|| {
                format!(
                    "loading templates from {}",
                    app.settings.templates_dir.display()
                )
            })?;
            let dispatcher = Dispatcher::new(app.clone(), Arc::new(templates))?;
            tasks.push(("dispatch", tokio::spawn(dispatcher.run(shutdown.clone()))));
        }
        if roles.http {
            let listener = crate::http::bind(&app).await?;
            tasks.push((
                "http",
                tokio::spawn(crate::http::serve_on(
                    listener,
                    app.clone(),
                    shutdown.clone(),
                )),
            ));
        }
        if roles.schedule {
            let scheduler = Scheduler::new(app.clone());
            tasks.push(("scheduler", tokio::spawn(scheduler.run(shutdown.clone()))));
        }
        if roles.ingest {
            let ingest = Ingest::new(app.clone());
            tasks.push(("ingest", tokio::spawn(ingest.run(shutdown.clone()))));
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
            tasks,
        })
    }

    /// Asks every role to finish its work in hand and stop, and waits for them.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.trigger.trigger();
        for (name, task) in self.tasks {
            task.await
                .with_context(|| format!("{name} task panicked"))??;
        }
        Ok(())
    }

    /// Completes when a role stopped by itself (it should not) or shutdown was triggered.
    pub async fn stopped(&self) {
        self.shutdown.triggered().await;
    }
}
