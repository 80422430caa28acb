//! `GET /api/reports/loyalty`: the figures of `lifecycle report`, for marketers and ops.

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use serde::Deserialize;
use utoipa::IntoParams;

use crate::app::App;
use crate::http::auth::{ApiError, Authed};
use crate::report::{self, Period, Report};
use crate::users::Role;

/// The period of a report (event time, UTC).
#[derive(Debug, Default, Deserialize, IntoParams)]
pub(crate) struct PeriodQuery {
    /// Start, included: a date (`2026-10-01`, midnight UTC) or an RFC 3339 time. Default: 30
    /// days before `to`.
    pub from: Option<String>,
    /// End, excluded. Default: now.
    pub to: Option<String>,
}

impl PeriodQuery {
    /// The period asked for, or a 400 naming what is wrong.
    pub(crate) fn period(&self, app: &App) -> Result<Period, ApiError> {
        let time = |value: &Option<String>| {
            value
                .as_deref()
                .filter(|v| !v.trim().is_empty())
                .map(report::parse_time)
                .transpose()
                .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))
        };
        Period::new(time(&self.from)?, time(&self.to)?, app.clock.now())
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))
    }
}

#[utoipa::path(get, path = "/api/reports/loyalty", tag = "reports", params(PeriodQuery),
    responses((status = 200, body = Report), (status = 400, body = ApiError),
              (status = 401, body = ApiError), (status = 403, body = ApiError)),
    security(("bearer" = []), ("session" = [])))]
/// Retention, repeat purchase, upsell, NPS, points, and each trigger's conversions beside its
/// control group's, for [from, to); a ratio with nothing to divide by is null.
pub(crate) async fn loyalty(
    State(app): State<App>,
    who: Authed,
    Query(query): Query<PeriodQuery>,
) -> Result<Json<Report>, ApiError> {
    who.require(Role::Marketer)?;
    let period = query.period(&app)?;
    report::loyalty(&app.pool, period)
        .await
        .map(Json)
        .map_err(ApiError::from_anyhow)
}
