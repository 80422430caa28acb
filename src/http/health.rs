//! `/readyz` (each role and the database) and `/metrics` (Prometheus text).

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::app::App;
use crate::metrics::Metrics;

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

pub(super) async fn metrics(State(app): State<App>) -> Response {
    let m = &app.metrics;
    let counters = [
        (
            "events_applied",
            "Events that changed state.",
            &m.events_applied,
        ),
        (
            "events_duplicate",
            "Events whose id was applied before.",
            &m.events_duplicate,
        ),
        (
            "events_deferred",
            "Early events sent to the retry queue.",
            &m.events_deferred,
        ),
        (
            "events_dead_lettered",
            "Events refused to the dead-letter queue.",
            &m.events_dead_lettered,
        ),
        (
            "messages_sent",
            "Messages a provider accepted.",
            &m.messages_sent,
        ),
        (
            "messages_suppressed",
            "Messages not sent for consent or suppression.",
            &m.messages_suppressed,
        ),
        (
            "messages_failed",
            "Messages that ended failed.",
            &m.messages_failed,
        ),
        (
            "messages_retried",
            "Transient failures to be retried.",
            &m.messages_retried,
        ),
        (
            "scans_run",
            "Scheduled scans this process ran.",
            &m.scans_run,
        ),
    ];
    let mut text = String::new();
    for (name, help, counter) in counters {
        let _ = writeln!(text, "# HELP lifecycle_{name}_total {help}");
        let _ = writeln!(text, "# TYPE lifecycle_{name}_total counter");
        let _ = writeln!(text, "lifecycle_{name}_total {}", Metrics::get(counter));
    }
    use std::sync::atomic::Ordering;
    for (name, help, counter) in [
        (
            "coupon_pool_low",
            "Coupon draws that left their pool at or below program.coupon_low_water.",
            &crate::coupons::POOL_LOW,
        ),
        (
            "coupon_pool_empty",
            "Messages planned without a coupon code because their pool was empty.",
            &crate::coupons::POOL_EMPTY,
        ),
    ] {
        let _ = writeln!(text, "# HELP lifecycle_{name}_total {help}");
        let _ = writeln!(text, "# TYPE lifecycle_{name}_total counter");
        let _ = writeln!(
            text,
            "lifecycle_{name}_total {}",
            counter.load(Ordering::Relaxed)
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
