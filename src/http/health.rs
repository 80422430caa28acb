//! `/readyz` (each role and the database) and `/metrics` (Prometheus text).

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::app::App;

/// Each role's state and the database's, as JSON; 503 unless every role this process runs is
/// alive and PostgreSQL answers.
pub(super) async fn ready(State(app): State<App>) -> Response {
    let h = &app.health;
    let roles = h.roles.get().copied();
    let mut ready = true;
    let mut report = serde_json::Map::new();
    let mut check = |name: &str, runs: bool, alive: bool, state: serde_json::Value| {
        if runs {
            ready &= alive;
            report.insert(name.into(), state);
        }
    };
    let consumers = h.ingest_consumers.load(Ordering::Relaxed);
    check(
        "ingest",
        roles.is_some_and(|r| r.ingest),
        consumers > 0,
        serde_json::json!({"consumers": consumers, "alive": consumers > 0}),
    );
    let loops = h.dispatch_loops.load(Ordering::Relaxed);
    check(
        "dispatch",
        roles.is_some_and(|r| r.dispatch),
        loops > 0,
        serde_json::json!({"loops": loops, "alive": loops > 0}),
    );
    let scheduler = h.scheduler.load(Ordering::Relaxed);
    check(
        "scheduler",
        roles.is_some_and(|r| r.schedule),
        scheduler,
        serde_json::json!({"alive": scheduler}),
    );
    let database = sqlx::query("select 1").execute(&app.pool).await;
    check(
        "database",
        true,
        database.is_ok(),
        match &database {
            Ok(_) => serde_json::json!({"alive": true}),
            Err(e) => serde_json::json!({
                "alive": false,
                "error": e.to_string().lines().next().unwrap_or_default(),
            }),
        },
    );
    report.insert("ready".into(), ready.into());
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(serde_json::Value::Object(report))).into_response()
}

/// The Prometheus text of every labelled metric this process records (see
/// `crate::metrics::prometheus`).
pub(super) async fn metrics() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::prometheus().render(),
    )
        .into_response()
}
