//! `serve`, `migrate` and `publish`: the worker and what it runs on.

use std::path::PathBuf;

use anyhow::Context;

use crate::app::{App, Roles};
use crate::config::Settings;
use crate::worker::Worker;

#[derive(clap::Args)]
pub(super) struct Serve {
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
}

/// Runs the roles asked for until a signal, or until one of them stops by itself.
pub(super) async fn serve(args: Serve, settings: Settings) -> anyhow::Result<()> {
    let app = App::open(settings).await?;
    let roles = Roles {
        ingest: !args.no_ingest,
        dispatch: !args.no_dispatch,
        schedule: !args.no_schedule,
        http: !args.no_http,
    };
    let health = app.health.clone();
    let worker = Worker::start(app, roles).await?;
    let ready = async {
        while !health.roles_state().0 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        tell_service_manager(sd_notify::NotifyState::Ready);
        std::future::pending::<()>().await
    };
    tokio::select! {
        _ = crate::shutdown::signal() => tracing::info!("Signal received; finishing work in hand."),
        _ = worker.stopped() => {}
        _ = ready => {}
    }
    tell_service_manager(sd_notify::NotifyState::Stopping);
    worker.stop().await
}

/// Tells systemd (a `Type=notify` unit) where `serve` stands: `READY=1` once every role it
/// runs is alive, `STOPPING=1` as it begins to stop. Without `$NOTIFY_SOCKET` it does nothing.
fn tell_service_manager(state: sd_notify::NotifyState<'_>) {
    if let Err(error) = sd_notify::notify(false, &[state]) {
        tracing::warn!(%error, "Could not notify the service manager.");
    }
}

/// Creates the database if missing and applies the migrations.
pub(super) async fn migrate(settings: Settings) -> anyhow::Result<()> {
    crate::db::migrate(&settings.database_url).await?;
    println!(
        "database {} is up to date",
        settings.database_url.database()
    );
    Ok(())
}

/// Publishes a JSON-lines file of events with confirms.
pub(super) async fn publish(file: PathBuf, settings: Settings) -> anyhow::Result<()> {
    let lines = crate::publish::read_lines(&file)?;
    let n = crate::publish::events(&settings, &lines).await?;
    println!("published {n} events to exchange {}", settings.exchange);
    Ok(())
}

/// How long a health check waits for its answer.
const HEALTHCHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// GETs `/readyz` on the configured HTTP address (on loopback when it listens on every
/// address): `Ok` when it answers 200, else an error saying what it answered or why it could
/// not ask.
pub(super) async fn healthcheck(settings: &Settings) -> anyhow::Result<()> {
    let mut addr = settings.http_addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let url = format!("http://{addr}/readyz");
    let client = crate::dispatch::providers::client_builder()
        .timeout(HEALTHCHECK_TIMEOUT)
        .build()
        .context("building the HTTP client")?;
    let response = client
        .get(&url)
        .send()
        .await
        .with_context(|| format!("{url} did not answer"))?;
    let status = response.status();
    anyhow::ensure!(status.is_success(), "{url} answered {status}: not ready");
    Ok(())
}
