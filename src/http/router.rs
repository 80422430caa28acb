//! The routes, and the time, size and concurrency limits over them.

use axum::Router;
use axum::body::Body;
use axum::extract::MatchedPath;
use axum::http::StatusCode;
use axum::http::{Request, Response};
use axum::routing::{get, post};
use tower_http::trace::TraceLayer;

use super::{
    MAX_BODY, MAX_IN_FLIGHT, REQUEST_TIMEOUT, api, console, health, unsubscribe, webhooks,
};
use crate::app::App;

/// The routes, over the shared handles, behind the time, size and concurrency limits. The
/// health routes are outside the limit of requests at once: slow requests filling it must not
/// fail a liveness probe (and get the process restarted).
pub(crate) fn router(app: App) -> Router {
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
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_request(())
                .on_response(record_status)
                .on_body_chunk(())
                .on_eos(())
                .on_failure(()),
        )
}

/// A request's span: its method, its route (the pattern, never the path: a path or a query
/// can hold a token or an address) and, once answered, its status.
fn request_span(request: &Request<Body>) -> tracing::Span {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("(no route)", |path| path.as_str());
    tracing::info_span!(
        "request",
        method = %request.method(),
        route,
        status = tracing::field::Empty
    )
}

/// Records the answer's status in its request's span, and logs it (at debug).
fn record_status(response: &Response<Body>, took: std::time::Duration, span: &tracing::Span) {
    let status = response.status().as_u16();
    span.record("status", status);
    tracing::debug!(status, ms = took.as_secs_f64() * 1e3, "Request answered.");
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
