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
    // A dispatcher whose results cannot be written holds its claims and sends nothing new.
    let stuck = h.writer_stuck_for().map(|d| d.as_secs());
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
    let scheduler = h.scheduler.load(Ordering::Relaxed);
    check(
        "scheduler",
        roles.is_some_and(|r| r.schedule),
        scheduler,
        serde_json::json!({"alive": scheduler}),
    );
    // The database's error text names hosts, users and databases: it goes to the log, and
    // /readyz, which anyone may read, says only that the database is down.
    let database = sqlx::query_scalar!("select 1").fetch_one(&app.pool).await;
    if let Err(error) = &database {
        tracing::warn!(
            error = crate::mask::text(&error.to_string()),
            "Readiness: the database did not answer."
        );
    }
    check(
        "database",
        true,
        database.is_ok(),
        serde_json::json!({"alive": database.is_ok()}),
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
