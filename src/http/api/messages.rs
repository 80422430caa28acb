//! `/api/messages`: the outbox (ops).

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::app::App;
use crate::http::auth::{ApiError, Authed};
use crate::outbox::{Requeue, retry_failed};
use crate::users::Role;

/// Which failed messages to requeue: by id, or every failed one matching a filter.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RetryRequest {
    /// These messages (those of them that are failed).
    pub ids: Option<Vec<i64>>,
    /// Every failed message matching it (`{}`: all).
    pub filter: Option<crate::deliveries::Filter>,
}

/// How many went back in the queue.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Requeued {
    /// Messages requeued.
    pub requeued: u64,
}

#[utoipa::path(post, path = "/api/messages/retry", tag = "messages",
    request_body = RetryRequest,
    responses((status = 200, description = "Failed messages put back in the queue", body = Requeued),
              (status = 401, body = ApiError), (status = 403, description = "Not ops", body = ApiError),
              (status = 422, body = ApiError)),
    security(("bearer" = []), ("session" = [])))]
/// Requeues failed messages (ops only).
pub(crate) async fn retry(
    State(app): State<App>,
    who: Authed,
    Json(body): Json<RetryRequest>,
) -> Result<Json<Requeued>, ApiError> {
    who.require(Role::Ops)?;
    let now = app.clock.now();
    let requeued = match (&body.ids, &body.filter) {
        (Some(ids), None) => retry_failed(&app.pool, Requeue::Ids(ids), now).await,
        (None, Some(filter)) => retry_failed(&app.pool, Requeue::Matching(filter), now).await,
        _ => {
            return Err(ApiError::new(
                axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                "send either ids or filter",
            ));
        }
    }
    .map_err(ApiError::from_anyhow)?;
    if requeued > 0 {
        app.outbox_ready.notify_waiters();
    }
    Ok(Json(Requeued { requeued }))
}
