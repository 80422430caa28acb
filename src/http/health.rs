//! `/readyz` (each role and the database) and `/metrics` (Prometheus text).

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::app::App;

/// Each role's state and the database's, as JSON; 503 unless every role this process runs is
/// alive and PostgreSQL answers.
pub(super) async fn ready(State(app): State<App>) -> Response {
    let (mut ready, mut report) = app.health.roles_state();
    // The database's error text names hosts, users and databases: it goes to the log, and
    // /readyz, which anyone may read, says only that the database is down.
    let database = sqlx::query_scalar!("select 1").fetch_one(&app.pool).await;
    if let Err(error) = &database {
        tracing::warn!(
            error = crate::mask::text(&error.to_string()),
            "Readiness: the database did not answer."
        );
    }
    ready &= database.is_ok();
    report.insert(
        "database".into(),
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
