//! `/api/messages`, `/api/dead-letters`, `/api/queues`, `/api/members`, `/api/providers`:
//! what ops watch and fix. Marketers may read messages and members (addresses masked); the
//! rest is ops'.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::app::App;
use crate::dead_letters::{self, DeadLetter, Selection};
use crate::deliveries::{self, Detail, Message, ProviderHealth};
use crate::domain::Channel;
use crate::http::auth::{ApiError, Authed};
use crate::notifications::DeadPost;
use crate::queues::Queues;
use crate::users::Role;

/// Paging of a list: how many, and the cursor a previous page gave.
#[derive(Debug, Default)]
pub(crate) struct Page {
    /// At most this many (default 50, at most 500).
    pub limit: Option<i64>,
    /// The `next` of the previous page.
    pub cursor: Option<i64>,
}

impl Page {
    fn limit(&self) -> i64 {
        self.limit.unwrap_or(50).clamp(1, 500)
    }
}

/// A page of messages.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Messages {
    /// Newest first.
    pub messages: Vec<Message>,
    /// The cursor of the next page, or null at the end.
    pub next: Option<i64>,
}

/// Query parameters of `GET /api/messages` (flat: URL queries cannot nest).
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub(crate) struct MessagesQuery {
    /// One member's.
    pub member_id: Option<String>,
    /// One trigger's.
    pub trigger: Option<String>,
    /// `email` or `sms`.
    pub channel: Option<String>,
    /// `pending`, `sending`, `sent`, `suppressed`, `cancelled`, `failed`, `held_out`.
    pub status: Option<String>,
    /// The provider that took it, or was tried last.
    pub provider: Option<String>,
    /// Planned at or after (RFC 3339).
    pub since: Option<DateTime<Utc>>,
    /// Planned before.
    pub until: Option<DateTime<Utc>>,
    /// Test sends only, or none.
    pub test: Option<bool>,
    /// At most this many (default 50, at most 500).
    pub limit: Option<i64>,
    /// The `next` of the previous page.
    pub cursor: Option<i64>,
}

impl MessagesQuery {
    /// The filter and the page.
    pub(crate) fn split(self) -> (deliveries::Filter, Page) {
        (
            deliveries::Filter {
                member_id: self.member_id,
                trigger: self.trigger,
                channel: self.channel,
                status: self.status,
                provider: self.provider,
                since: self.since,
                until: self.until,
                test: self.test,
            },
            Page {
                limit: self.limit,
                cursor: self.cursor,
            },
        )
    }
}

#[utoipa::path(get, path = "/api/messages", tag = "messages", params(MessagesQuery),
    responses((status = 200, body = Messages), (status = 401, body = ApiError)),
    security(("bearer" = []), ("session" = [])))]
/// Messages by member, trigger, channel, status, provider, time and test flag, newest first.
pub(crate) async fn messages(
    State(app): State<App>,
    who: Authed,
    Query(query): Query<MessagesQuery>,
) -> Result<Json<Messages>, ApiError> {
    who.require(Role::Marketer)?;
    let (filter, page) = query.split();
    let limit = page.limit();
    let reveal = who.user.role == Role::Ops;
    let messages = deliveries::search(&app, &filter, limit, page.cursor, reveal)
        .await
        .map_err(ApiError::from_anyhow)?;
    let next = (messages.len() as i64 == limit)
        .then(|| messages.last().map(|m| m.id))
        .flatten();
    Ok(Json(Messages { messages, next }))
}

#[utoipa::path(get, path = "/api/messages/{id}", tag = "messages",
    params(("id" = i64, Path)),
    responses((status = 200, body = Detail), (status = 401, body = ApiError), (status = 404, body = ApiError)),
    security(("bearer" = []), ("session" = [])))]
/// One message: its template version, every attempt, and its content as rendered.
pub(crate) async fn message(
    State(app): State<App>,
    who: Authed,
    Path(id): Path<i64>,
) -> Result<Json<Detail>, ApiError> {
    who.require(Role::Marketer)?;
    deliveries::detail(&app, id, who.user.role == Role::Ops)
        .await
        .map_err(ApiError::from_anyhow)?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no message {id}")))
}

/// A page of dead letters.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct DeadLetters {
    /// Newest first.
    pub dead_letters: Vec<DeadLetter>,
    /// The cursor of the next page, or null at the end.
    pub next: Option<i64>,
}

/// Query parameters of `GET /api/dead-letters`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeadLettersQuery {
    /// Reason contains this (case-insensitive).
    pub reason: Option<String>,
    /// Event type.
    #[serde(rename = "type")]
    #[param(rename = "type")]
    pub event_type: Option<String>,
    /// Dead-lettered at or after.
    pub since: Option<DateTime<Utc>>,
    /// Dead-lettered before.
    pub until: Option<DateTime<Utc>>,
    /// Archived ones too.
    #[serde(default)]
    pub archived: bool,
    /// At most this many (default 50, at most 500).
    pub limit: Option<i64>,
    /// The `next` of the previous page.
    pub cursor: Option<i64>,
}

#[utoipa::path(get, path = "/api/dead-letters", tag = "dead-letters", params(DeadLettersQuery),
    responses((status = 200, body = DeadLetters), (status = 401, body = ApiError), (status = 403, body = ApiError)),
    security(("bearer" = []), ("session" = [])))]
/// Dead letters by reason, type and time, newest first (archived ones with `archived=true`).
pub(crate) async fn list_dead_letters(
    State(app): State<App>,
    who: Authed,
    Query(query): Query<DeadLettersQuery>,
) -> Result<Json<DeadLetters>, ApiError> {
    who.require(Role::Ops)?;
    let page = Page {
        limit: query.limit,
        cursor: query.cursor,
    };
    let filter = dead_letters::Filter {
        reason: query.reason,
        event_type: query.event_type,
        since: query.since,
        until: query.until,
        archived: query.archived,
    };
    let limit = page.limit();
    let dead_letters = dead_letters::list(&app, &filter, limit, page.cursor)
        .await
        .map_err(ApiError::from_anyhow)?;
    let next = (dead_letters.len() as i64 == limit)
        .then(|| dead_letters.last().map(|d| d.id))
        .flatten();
    Ok(Json(DeadLetters { dead_letters, next }))
}

/// Which dead letters: `ids`, `all` (every unarchived one), or a `filter`. A replay of `all`
/// or a `filter` skips letters replayed before, unless `again`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeadLetterSelection {
    /// These.
    pub ids: Option<Vec<i64>>,
    /// Every unarchived one.
    #[serde(default)]
    pub all: bool,
    /// Every unarchived one matching.
    pub filter: Option<dead_letters::Filter>,
    /// With `all` or `filter`: replay those replayed before too.
    #[serde(default)]
    pub again: bool,
}

impl DeadLetterSelection {
    fn selection(&self) -> Result<Selection<'_>, ApiError> {
        static EVERY: std::sync::LazyLock<dead_letters::Filter> =
            std::sync::LazyLock::new(dead_letters::Filter::default);
        let matching = |filter| {
            if self.again {
                Selection::Again(filter)
            } else {
                Selection::Matching(filter)
            }
        };
        match (&self.ids, self.all, &self.filter) {
            (Some(ids), false, None) => Ok(Selection::Ids(ids)),
            (None, true, None) => Ok(matching(&EVERY)),
            (None, false, Some(filter)) => Ok(matching(filter)),
            _ => Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "send one of ids, all: true, or filter",
            )),
        }
    }
}

/// How many were replayed.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Replayed {
    /// Republished to the exchange.
    pub replayed: u64,
}

#[utoipa::path(post, path = "/api/dead-letters/replay", tag = "dead-letters",
    request_body = DeadLetterSelection,
    responses((status = 200, body = Replayed), (status = 401, body = ApiError), (status = 403, body = ApiError)),
    security(("bearer" = []), ("session" = [])))]
/// Republishes dead letters with a fresh retry count; one already applied is a no-op.
pub(crate) async fn replay(
    State(app): State<App>,
    who: Authed,
    Json(body): Json<DeadLetterSelection>,
) -> Result<Json<Replayed>, ApiError> {
    who.require(Role::Ops)?;
    let replayed = dead_letters::replay(&app, body.selection()?, &who.user.name)
        .await
        .map_err(ApiError::from_anyhow)?;
    Ok(Json(Replayed { replayed }))
}

/// How many were archived.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Archived {
    /// Archived now.
    pub archived: u64,
}

#[utoipa::path(post, path = "/api/dead-letters/archive", tag = "dead-letters",
    request_body = DeadLetterSelection,
    responses((status = 200, body = Archived), (status = 401, body = ApiError), (status = 403, body = ApiError)),
    security(("bearer" = []), ("session" = [])))]
/// Archives dead letters: they leave the default list.
pub(crate) async fn archive(
    State(app): State<App>,
    who: Authed,
    Json(body): Json<DeadLetterSelection>,
) -> Result<Json<Archived>, ApiError> {
    who.require(Role::Ops)?;
    let archived = dead_letters::archive(&app, body.selection()?, &who.user.name)
        .await
        .map_err(ApiError::from_anyhow)?;
    Ok(Json(Archived { archived }))
}

#[utoipa::path(get, path = "/api/queues", tag = "queues",
    responses((status = 200, body = Queues), (status = 401, body = ApiError), (status = 403, body = ApiError)),
    security(("bearer" = []), ("session" = [])))]
/// Depth and consumers of the input, retry and dead-letter queues; the outbox by status; the
/// notifications waiting to be published or POSTed.
pub(crate) async fn queues(State(app): State<App>, who: Authed) -> Result<Json<Queues>, ApiError> {
    who.require(Role::Ops)?;
    crate::queues::snapshot(&app)
        .await
        .map(Json)
        .map_err(ApiError::from_anyhow)
}

#[utoipa::path(get, path = "/api/notifications/dead", tag = "queues",
    responses((status = 200, body = [DeadPost]), (status = 401, body = ApiError), (status = 403, body = ApiError)),
    security(("bearer" = []), ("session" = [])))]
/// Notifications whose POSTs to LIFECYCLE_NOTIFY_URL were given up on (after
/// `notifications.dead_after_hours` of failures), newest first, at most 500.
pub(crate) async fn dead_notifications(
    State(app): State<App>,
    who: Authed,
) -> Result<Json<Vec<DeadPost>>, ApiError> {
    who.require(Role::Ops)?;
    Ok(Json(
        crate::notifications::dead_posts(&app.pool, 500).await?,
    ))
}

/// Query of `GET /api/providers`.
#[derive(Debug, Deserialize, IntoParams)]
pub(crate) struct ProvidersQuery {
    /// The window, minutes (default 15).
    pub minutes: Option<i32>,
}

#[utoipa::path(get, path = "/api/providers", tag = "queues", params(ProvidersQuery),
    responses((status = 200, body = [ProviderHealth]), (status = 401, body = ApiError), (status = 403, body = ApiError)),
    security(("bearer" = []), ("session" = [])))]
/// Each provider's circuit, recent successes and failures, latency and rate limit.
pub(crate) async fn providers(
    State(app): State<App>,
    who: Authed,
    Query(query): Query<ProvidersQuery>,
) -> Result<Json<Vec<ProviderHealth>>, ApiError> {
    who.require(Role::Ops)?;
    deliveries::provider_health(&app, query.minutes.unwrap_or(15).clamp(1, 24 * 60))
        .await
        .map(Json)
        .map_err(ApiError::from_anyhow)
}

/// A member as ops and marketers see them.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Member {
    /// Their id.
    pub member_id: String,
    /// First name.
    pub first_name: Option<String>,
    /// Email (masked for marketers).
    pub email: Option<String>,
    /// Phone (masked for marketers).
    pub phone: Option<String>,
    /// Locale.
    pub locale: String,
    /// Time zone.
    pub timezone: String,
    /// Consent per channel.
    pub consent: serde_json::Value,
    /// Suppressed addresses of theirs: channel, reason, source, when.
    pub suppressions: Vec<serde_json::Value>,
    /// Points available.
    pub balance: i64,
    /// Their tier.
    pub tier: String,
    /// Qualifying points in the tier window.
    pub tier_points: i64,
    /// Lots with points left: earned, expires, points, remaining.
    pub lots: Vec<serde_json::Value>,
    /// The latest journal entries, newest first.
    pub journal: Vec<serde_json::Value>,
    /// The latest messages, newest first.
    pub messages: Vec<Message>,
}

#[utoipa::path(get, path = "/api/members/{member_id}", tag = "members",
    params(("member_id" = String, Path)),
    responses((status = 200, body = Member), (status = 401, body = ApiError), (status = 404, body = ApiError)),
    security(("bearer" = []), ("session" = [])))]
/// A member's profile, consent, suppressions, points, lots, journal and messages.
pub(crate) async fn member(
    State(app): State<App>,
    who: Authed,
    Path(id): Path<String>,
) -> Result<Json<Member>, ApiError> {
    who.require(Role::Marketer)?;
    member_view(&app, &id, who.user.role == Role::Ops)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no member {id:?}")))
}

/// A member as the API and the console show them.
pub(crate) async fn member_view(
    app: &App,
    id: &str,
    reveal: bool,
) -> Result<Option<Member>, ApiError> {
    let program = &app.settings.program;
    let now = app.clock.now();
    let Some((state, _)) = crate::ledger::member_now(&app.pool, id, program, now).await? else {
        return Ok(None);
    };
    let m = &state.member;
    let email = m.profile.email.as_ref().map(|e| e.to_string());
    let phone = m.profile.phone.as_ref().map(|p| p.to_string());
    let suppressions = sqlx::query!(
        "select channel, reason, source, at from suppressions
         where (channel = 'email' and address = $1) or (channel = 'sms' and address = $2)",
        email.as_deref(),
        phone.as_deref()
    )
    .fetch_all(&app.pool)
    .await?
    .into_iter()
    .map(|r| {
        serde_json::json!({
            "channel": r.channel, "reason": r.reason, "source": r.source, "at": r.at,
        })
    })
    .collect();
    let journal = sqlx::query!(
        "select kind, points, qualifying, at, cause from point_entries
         where member_id = $1 order by at desc, id desc limit 50",
        id
    )
    .fetch_all(&app.pool)
    .await?
    .into_iter()
    .map(|r| {
        serde_json::json!({
            "kind": r.kind, "points": r.points, "qualifying": r.qualifying,
            "at": r.at, "cause": r.cause,
        })
    })
    .collect();
    let filter = deliveries::Filter {
        member_id: Some(id.to_owned()),
        ..Default::default()
    };
    let messages = deliveries::search(app, &filter, 20, None, reveal)
        .await
        .map_err(ApiError::from_anyhow)?;
    let tier_points = state.points.tier_points(now, program.tier_window_months);
    let masked = |channel: &str, v: Option<String>| {
        v.map(|v| {
            if reveal {
                v
            } else {
                deliveries::mask(channel, &v)
            }
        })
    };
    Ok(Some(Member {
        member_id: id.to_owned(),
        first_name: m.profile.first_name.clone(),
        email: masked("email", email),
        phone: masked("sms", phone),
        locale: m.profile.locale.as_str().to_owned(),
        timezone: m.profile.timezone.name().to_owned(),
        consent: serde_json::json!({"email": m.profile.consent.email, "sms": m.profile.consent.sms}),
        suppressions,
        balance: state.points.balance(),
        tier: program
            .tier_name(program.tier_for(tier_points), &m.profile.locale)
            .to_owned(),
        tier_points,
        lots: state
            .points
            .lots
            .iter()
            .map(|l| {
                serde_json::json!({"earned_at": l.earned_at, "expires_at": l.expires_at,
                                   "points": l.points, "remaining": l.remaining})
            })
            .collect(),
        journal,
        messages,
    }))
}

/// Lifting a suppression.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Lift {
    /// `email` or `sms`.
    pub channel: String,
    /// Why (recorded in the log with who lifted it).
    pub reason: String,
}

/// Whether a suppression was lifted.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Lifted {
    /// False when the member's address was not suppressed.
    pub lifted: bool,
}

/// The longest reason for lifting a suppression, in characters.
const MAX_REASON: usize = 500;

#[utoipa::path(post, path = "/api/members/{member_id}/suppressions/lift", tag = "members",
    params(("member_id" = String, Path)), request_body = Lift,
    responses((status = 200, body = Lifted), (status = 401, body = ApiError), (status = 403, body = ApiError),
              (status = 404, body = ApiError), (status = 422, body = ApiError)),
    security(("bearer" = []), ("session" = [])))]
/// Lifts the suppression of a member's address on one channel (ops), with a reason, kept
/// with who lifted it in `suppression_lifts`.
pub(crate) async fn lift(
    State(app): State<App>,
    who: Authed,
    Path(id): Path<String>,
    Json(body): Json<Lift>,
) -> Result<Json<Lifted>, ApiError> {
    who.require(Role::Ops)?;
    let unprocessable = |e: &str| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e);
    let channel =
        Channel::parse(&body.channel).map_err(|_| unprocessable("channel is email or sms"))?;
    let reason = body.reason.trim();
    if reason.is_empty() {
        return Err(unprocessable("say why the suppression is lifted (reason)"));
    }
    if reason.chars().count() > MAX_REASON || reason.chars().any(|c| c.is_control() && c != '\n') {
        return Err(unprocessable(&format!(
            "reason: at most {MAX_REASON} characters, without control characters"
        )));
    }
    let address: Option<Option<String>> = sqlx::query_scalar!(
        r#"select case $2::text when 'email' then email else phone end as "address?"
           from members where member_id = $1"#,
        &id,
        channel.as_str()
    )
    .fetch_optional(&app.pool)
    .await?;
    let Some(address) = address else {
        return Err(ApiError::not_found(format!("no member {id:?}")));
    };
    let Some(address) = address else {
        return Ok(Json(Lifted { lifted: false }));
    };
    let change = crate::suppress::Change {
        channel,
        address: &address,
        how: crate::notifications::How::Ops,
        member: Some(&id),
    };
    let sinks = crate::notifications::Sinks::of(&app.settings);
    let lifted = crate::suppress::restore(&app.pool, sinks, change).await?;
    if lifted {
        sqlx::query!(
            "insert into suppression_lifts (member_id, channel, address, reason, lifted_by)
             values ($1, $2, $3, $4, $5)",
            &id,
            channel.as_str(),
            &address,
            reason,
            &who.user.name
        )
        .execute(&app.pool)
        .await?;
    }
    tracing::info!(
        member = id,
        channel = channel.as_str(),
        by = who.user.name,
        reason = crate::mask::text(reason),
        lifted,
        "Suppression lifted by ops."
    );
    Ok(Json(Lifted { lifted }))
}
