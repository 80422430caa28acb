//! The admin API (`/api`, JSON, authenticated; see `auth`). Its OpenAPI document is generated
//! from these handlers and types (utoipa) and served open at `/api/openapi.json`.

pub(crate) mod messages;
pub(crate) mod ops;
pub(crate) mod reports;
pub(crate) mod templates;

use axum::Json;
use axum::Router;
use axum::routing::{get, post, put};
use utoipa::OpenApi;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};

use crate::app::App;

/// The OpenAPI document.
#[derive(OpenApi)]
#[openapi(
    info(title = "lifecycle admin API", description = "Templates, previews, test sends and deliveries of the lifecycle loyalty messaging worker. Authenticate with `Authorization: Bearer <token>` (a user's API token, or LIFECYCLE_ADMIN_TOKEN as ops) or the console's session cookie (then send X-CSRF-Token on changes)."),
    paths(
        templates::list,
        templates::versions,
        templates::save_draft,
        templates::preview,
        templates::test_send,
        templates::publish,
        ops::messages,
        ops::message,
        messages::retry,
        ops::list_dead_letters,
        ops::replay,
        ops::archive,
        ops::queues,
        ops::dead_notifications,
        ops::providers,
        ops::member,
        ops::lift,
        reports::loyalty,
    ),
    modifiers(&Security),
    tags((name = "templates", description = "Template versions: drafts, previews, test sends, publishing and rollback"),
         (name = "messages", description = "The outbox: search, one message with its attempts and content, retry"),
         (name = "dead-letters", description = "Refused events: list, replay, archive"),
         (name = "queues", description = "The broker's queues, the outbox, the notifications back to the platform, the providers"),
         (name = "members", description = "A member's profile, points, suppressions and messages"),
         (name = "reports", description = "The loyalty report: retention, repeat purchase, upsell, NPS, points, and each trigger's conversions against its control group"))
)]
pub(crate) struct ApiDoc;

/// The two ways to authenticate.
struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "session",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::new(
                crate::http::auth::SESSION_COOKIE,
            ))),
        );
    }
}

/// `/api` routes.
pub(crate) fn routes() -> Router<App> {
    Router::new()
        .route(
            "/api/openapi.json",
            get(|| async { Json(ApiDoc::openapi()) }),
        )
        .route("/api/templates", get(templates::list))
        .route(
            "/api/templates/{trigger}/{locale}",
            get(templates::versions),
        )
        .route(
            "/api/templates/{trigger}/{locale}/draft",
            put(templates::save_draft),
        )
        .route(
            "/api/templates/{trigger}/{locale}/preview",
            post(templates::preview),
        )
        .route(
            "/api/templates/{trigger}/{locale}/test-send",
            post(templates::test_send),
        )
        .route(
            "/api/templates/{trigger}/{locale}/publish",
            post(templates::publish),
        )
        .route("/api/messages", get(ops::messages))
        .route("/api/messages/{id}", get(ops::message))
        .route("/api/messages/retry", post(messages::retry))
        .route("/api/dead-letters", get(ops::list_dead_letters))
        .route("/api/dead-letters/replay", post(ops::replay))
        .route("/api/dead-letters/archive", post(ops::archive))
        .route("/api/queues", get(ops::queues))
        .route("/api/notifications/dead", get(ops::dead_notifications))
        .route("/api/providers", get(ops::providers))
        .route("/api/members/{member_id}", get(ops::member))
        .route(
            "/api/members/{member_id}/suppressions/lift",
            post(ops::lift),
        )
        .route("/api/reports/loyalty", get(reports::loyalty))
}
