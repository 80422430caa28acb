//! The HTTP server: health, metrics, unsubscribe pages and the providers' webhooks.
//!
//! Layout: this module is the server (limits, the accept loop, the routes); `health.rs`
//! (`/healthz`, `/readyz`, `/metrics`), `unsubscribe.rs` (the pages and RFC 8058's one-click),
//! `webhooks.rs` (Twilio and SendGrid, verified or refused).
//!
//! The server cannot be held: a connection must send its headers within 10 s, a request is
//! answered (or refused with 408) within 30 s, bodies over 1 MiB get 413, at most 256 requests
//! are handled at once and at most 1,024 connections are open.
//!
//! `/healthz` (the process is up), `/readyz` (each role alive, PostgreSQL answers, JSON),
//! `/metrics` (Prometheus text), `GET /unsubscribe/{token}` (a page in the member's language
//! with a button) and `POST /unsubscribe/{token}` (RFC 8058 one-click: unsubscribes at once),
//! `POST /webhooks/twilio/inbound` (STOP and START), `POST /webhooks/twilio/status` (delivery
//! status), `POST /webhooks/sendgrid/events` (bounces, spam reports, unsubscribes).

mod health;
mod unsubscribe;
mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::http::StatusCode;
use axum::routing::{get, post};
use tracing::{info, warn};

use crate::app::App;
use crate::shutdown::Shutdown;
pub use webhooks::{sendgrid_verify, twilio_signature};

/// How long a connection may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request may take, body and answer included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest request body accepted.
pub const MAX_BODY: usize = 1024 * 1024;
/// Requests handled at once; more wait (and time out).
const MAX_IN_FLIGHT: usize = 256;
/// Connections open at once; more are closed as they come.
const MAX_CONNECTIONS: usize = 1024;

/// The routes, over the shared handles, behind the time, size and concurrency limits.
pub fn router(app: App) -> Router {
    routes(app)
        .layer(tower::limit::ConcurrencyLimitLayer::new(MAX_IN_FLIGHT))
        .layer(tower_http::limit::RequestBodyLimitLayer::new(MAX_BODY))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
}

fn routes(app: App) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(health::ready))
        .route("/metrics", get(health::metrics))
        .route(
            "/unsubscribe/{token}",
            get(unsubscribe::page).post(unsubscribe::one_click),
        )
        .route("/webhooks/twilio/inbound", post(webhooks::twilio_inbound))
        .route("/webhooks/twilio/status", post(webhooks::twilio_status))
        .route("/webhooks/sendgrid/events", post(webhooks::sendgrid_events))
        .with_state(app)
}

/// Binds first, so that a taken port fails the start rather than a task later.
pub async fn bind(app: &App) -> anyhow::Result<tokio::net::TcpListener> {
    let addr = app.settings.http_addr;
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr} (LIFECYCLE_HTTP_ADDR)"))
}

/// Serves on a bound listener until shutdown, then lets requests in hand finish (10 s at
/// most).
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    app: App,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    info!(addr = %listener.local_addr()?, "HTTP server listening.");
    let service = hyper_util::service::TowerToHyperService::new(router(app));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.triggered() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors, or a connection reset before it was accepted: the
                // server goes on.
                warn!(%error, "Accepting a connection failed.");
                shutdown.sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            continue;
        };
        stream.set_nodelay(true).ok();
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT);
        let connection =
            graceful.watch(builder.serve_connection(TokioIo::new(stream), service.clone()));
        tokio::spawn(async move {
            connection.await.ok();
            drop(permit);
        });
    }
    tokio::time::timeout(Duration::from_secs(10), graceful.shutdown())
        .await
        .ok();
    Ok(())
}
