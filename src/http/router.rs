//! The routes, and the time, size and concurrency limits over them.

use axum::Router;
use axum::http::StatusCode;
use axum::routing::{get, post};

use super::{
    MAX_BODY, MAX_IN_FLIGHT, REQUEST_TIMEOUT, api, console, health, unsubscribe, webhooks,
};
use crate::app::App;

/// The routes, over the shared handles, behind the time, size and concurrency limits. The
/// health routes are outside the limit of requests at once: slow requests filling it must not
/// fail a liveness probe (and get the process restarted).
pub fn router(app: App) -> Router {
    health_routes(app.clone())
        .merge(
            routes(app).layer(tower::limit::GlobalConcurrencyLimitLayer::new(
                MAX_IN_FLIGHT,
            )),
        )
        .layer(tower_http::limit::RequestBodyLimitLayer::new(MAX_BODY))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
}

fn health_routes(app: App) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(health::ready))
        .route("/metrics", get(health::metrics))
        .with_state(app)
}

fn routes(app: App) -> Router {
    Router::new()
        .route(
            "/unsubscribe/{token}",
            get(unsubscribe::page).post(unsubscribe::one_click),
        )
        .route("/webhooks/twilio/inbound", post(webhooks::twilio_inbound))
        .route("/webhooks/twilio/status", post(webhooks::twilio_status))
        .route("/webhooks/sendgrid/events", post(webhooks::sendgrid_events))
        .merge(api::routes())
        .merge(console::routes())
        .with_state(app)
}
