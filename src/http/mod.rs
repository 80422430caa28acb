//! The HTTP server: health, metrics, the admin API, the console, unsubscribe pages and the
//! providers' webhooks.
//!
//! Layout: this module is the server (the accept loop); `router.rs` (the routes and the
//! limits over them); `auth.rs` (tokens, sessions, roles, CSRF, API errors); `api/` (`/api`,
//! JSON, with its OpenAPI document); `console/` (`/console`, server-rendered pages);
//! `health.rs` (`/healthz`, `/readyz`, `/metrics`), `unsubscribe.rs` (the pages and RFC 8058's
//! one-click), `webhooks.rs` (Twilio and SendGrid, verified or refused).
//!
//! The server cannot be held: a connection must send its headers within 10 s, a request is
//! answered (or refused with 408) within 30 s, bodies over 1 MiB get 413, at most 256 requests
//! are handled at once (the health routes apart, so that a flood of slow requests does not
//! fail a liveness probe), at most 1,024 connections are open, and at most 64 from one address
//! (a trusted proxy apart: it carries many clients).
//!
//! `/healthz` (the process is up), `/readyz` (each role alive, PostgreSQL answers, JSON),
//! `/metrics` (Prometheus text), `GET /unsubscribe/{token}` (a page in the member's language
//! with a button) and `POST /unsubscribe/{token}` (RFC 8058 one-click: unsubscribes at once),
//! `POST /webhooks/twilio/inbound` (STOP and START), `POST /webhooks/twilio/status` (delivery
//! status), `POST /webhooks/sendgrid/events` (bounces, spam reports, unsubscribes).

pub(crate) mod api;
pub(crate) mod auth;
mod console;
mod health;
mod router;
mod unsubscribe;
mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tracing::{info, warn};

use crate::app::App;
use crate::shutdown::Shutdown;
pub(crate) use router::router;
pub use webhooks::twilio_signature;

/// How long a connection may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request may take, body and answer included.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest request body accepted.
pub(crate) const MAX_BODY: usize = 1024 * 1024;
/// Requests handled at once; more wait (and time out).
pub(crate) const MAX_IN_FLIGHT: usize = 256;
/// Database connections the requests share.
const MAX_DATABASE_CONNECTIONS: u32 = 8;
/// Connections open at once; more are closed as they come.
const MAX_CONNECTIONS: usize = 1024;
/// Connections open at once from one address that is not a trusted proxy; more are closed as
/// they come.
const MAX_CONNECTIONS_PER_PEER: usize = 64;

/// The connections open from each address.
#[derive(Default)]
struct PerPeer(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

/// One connection counted against its address until dropped.
struct PeerTurn {
    peers: Arc<PerPeer>,
    ip: std::net::IpAddr,
}

impl PerPeer {
    /// A turn for a connection from `ip`, or None when it has its fill open.
    fn take(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<PeerTurn> {
        let mut open = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(ip).or_default();
        if *n >= MAX_CONNECTIONS_PER_PEER {
            return None;
        }
        *n += 1;
        Some(PeerTurn {
            peers: self.clone(),
            ip,
        })
    }
}

impl Drop for PeerTurn {
    fn drop(&mut self) {
        let mut open = self.peers.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Binds first, so that a taken port fails the start rather than a task later.
pub(crate) async fn bind(app: &App) -> anyhow::Result<tokio::net::TcpListener> {
    let addr = app.settings.http_addr;
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr} (LIFECYCLE_HTTP_ADDR)"))
}

/// Serves on a bound listener until shutdown, then lets requests in hand finish (10 s at
/// most).
pub(crate) async fn serve_on(
    listener: tokio::net::TcpListener,
    app: App,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    info!(addr = %listener.local_addr()?, "HTTP server listening.");
    // Every query a request makes runs under the statement timeout.
    let pool = crate::db::pool_for_requests(
        &app.settings.database_url,
        MAX_DATABASE_CONNECTIONS,
        app.settings.http.statement_timeout_ms,
    )?;
    let trusted = app.settings.http.trusted_proxies.clone();
    let router = router(App { pool, ..app });
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let peers = Arc::new(PerPeer::default());
    loop {
        let accepted = tokio::select! {
            _ = shutdown.triggered() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
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
        let turn = if trusted.iter().any(|net| net.contains(peer.ip())) {
            None
        } else {
            match peers.take(peer.ip()) {
                Some(turn) => Some(turn),
                None => continue,
            }
        };
        stream.set_nodelay(true).ok();
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT);
        // Each request knows its client's address (the login throttle counts by it).
        let service = hyper_util::service::TowerToHyperService::new(
            router.clone().layer(axum::Extension(auth::Peer(peer))),
        );
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            connection.await.ok();
            drop((permit, turn));
        });
    }
    tokio::time::timeout(Duration::from_secs(10), graceful.shutdown())
        .await
        .ok();
    Ok(())
}
