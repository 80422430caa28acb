//! The worker: starting the roles this process runs, noticing one that dies, and stopping
//! them all within a deadline.

use std::sync::Arc;

use anyhow::Context;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{error, info};

use crate::app::{App, Roles};
use crate::dispatch::Dispatcher;
use crate::ingest::Ingest;
use crate::scheduler::Scheduler;
use crate::shutdown::{self, Shutdown, ShutdownTrigger, panic_message};

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
            // Notifications leave from the replicas that run the scans, one at a time.
            supervisor.spawn(
                "notifier",
                crate::notifier::run(app.clone(), shutdown.clone()),
            );
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
