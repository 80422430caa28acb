//! The console's ops pages: deliveries (filters in the URL, paged), one message, dead letters,
//! queues and providers, members. Marketers see deliveries and members with addresses masked;
//! the rest, and every change, is ops'.

use std::collections::BTreeMap;

use askama::Template;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde::Deserialize;

use super::{Session, error_page, page};
use crate::app::App;
use crate::dead_letters::{self, DeadLetter, Selection};
use crate::deliveries::{self, Detail, Message, ProviderHealth};
use crate::domain::Trigger;
use crate::http::api::ops::{Member, member_view};
use crate::http::auth::ApiError;
use crate::outbox::Requeue;
use crate::queues::Depth;
use crate::users::Role;

/// The ops pages' routes.
pub(super) fn routes() -> Router<App> {
    Router::new()
        .route("/console/deliveries", get(deliveries_page))
        .route("/console/deliveries/retry", post(retry))
        .route("/console/messages/{id}", get(message_page))
        .route("/console/dead-letters", get(dead_letters_page))
        .route("/console/dead-letters/replay", post(replay))
        .route("/console/dead-letters/archive", post(archive))
        .route("/console/queues", get(queues_page))
        .route("/console/members", get(open_member))
        .route("/console/members/{id}", get(member_page))
        .route("/console/members/{id}/lift", post(lift))
}

/// A redirect to `path` with `done` and `of` (the page turns them into its notice) and the
/// other query pairs.
fn redirect(path: &str, pairs: &[(&str, String)]) -> Response {
    let mut url = url::Url::parse("http://console/").expect("static URL");
    url.set_path(path);
    {
        let mut query = url.query_pairs_mut();
        for (k, v) in pairs.iter().filter(|(_, v)| !v.is_empty()) {
            query.append_pair(k, v);
        }
    }
    let target = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_owned(),
    };
    Redirect::to(&target).into_response()
}

/// A notice from a code in the URL (never text from it).
fn notice(done: Option<&str>, of: Option<&str>) -> Option<String> {
    let n: i64 = of?.parse().ok()?;
    Some(match done? {
        "retried" => format!("{n} failed messages queued again."),
        "replayed" => format!("{n} dead letters replayed."),
        "archived" => format!("{n} dead letters archived."),
        "lifted" if n > 0 => "Suppression lifted.".to_owned(),
        "lifted" => "There was no suppression to lift.".to_owned(),
        _ => return None,
    })
}

/// The deliveries filter as the URL carries it (strings: an empty field is no filter).
#[derive(Debug, Default, Deserialize, Clone)]
#[serde(default)]
struct DeliveriesQuery {
    member_id: String,
    trigger: String,
    channel: String,
    status: String,
    provider: String,
    since: String,
    until: String,
    test: String,
    cursor: Option<i64>,
    done: Option<String>,
    of: Option<String>,
}

impl DeliveriesQuery {
    fn filter(&self) -> Result<deliveries::Filter, String> {
        let text = |s: &String| (!s.trim().is_empty()).then(|| s.trim().to_owned());
        let time = |s: &String, what: &str| {
            text(s)
                .map(|t| {
                    chrono::DateTime::parse_from_rfc3339(&t)
                        .map(|t| t.to_utc())
                        .map_err(|_| {
                            format!("{what}: {t:?} is not an RFC 3339 time (2026-11-22T00:00:00Z)")
                        })
                })
                .transpose()
        };
        Ok(deliveries::Filter {
            member_id: text(&self.member_id),
            trigger: text(&self.trigger),
            channel: text(&self.channel),
            status: text(&self.status),
            provider: text(&self.provider),
            since: time(&self.since, "since")?,
            until: time(&self.until, "until")?,
            test: match self.test.as_str() {
                "true" => Some(true),
                "false" => Some(false),
                _ => None,
            },
        })
    }

    /// The filter's query pairs (for links and the retry form).
    fn pairs(&self) -> Vec<(&'static str, String)> {
        vec![
            ("member_id", self.member_id.clone()),
            ("trigger", self.trigger.clone()),
            ("channel", self.channel.clone()),
            ("status", self.status.clone()),
            ("provider", self.provider.clone()),
            ("since", self.since.clone()),
            ("until", self.until.clone()),
            ("test", self.test.clone()),
        ]
    }
}

#[derive(Template)]
#[template(path = "deliveries.html")]
struct DeliveriesPage {
    user: Option<String>,
    csrf: Option<String>,
    f: DeliveriesQuery,
    triggers: Vec<&'static str>,
    statuses: Vec<&'static str>,
    rows: Vec<Message>,
    next: Option<String>,
    can_retry: bool,
    retry_fields: Vec<(&'static str, String)>,
    notice: Option<String>,
}

const PAGE: i64 = 50;

async fn deliveries_page(
    State(app): State<App>,
    session: Session,
    Query(query): Query<DeliveriesQuery>,
) -> Response {
    let filter = match query.filter() {
        Ok(f) => f,
        Err(e) => return error_page(ApiError::new(StatusCode::BAD_REQUEST, e)),
    };
    let ops = session.user.role == Role::Ops;
    let rows = match deliveries::search(&app, &filter, PAGE, query.cursor, ops).await {
        Ok(rows) => rows,
        Err(e) => return error_page(ApiError::from_anyhow(e)),
    };
    let next = (rows.len() as i64 == PAGE).then(|| {
        let mut url = url::Url::parse("http://console/console/deliveries").expect("static URL");
        {
            let mut q = url.query_pairs_mut();
            for (k, v) in query.pairs().iter().filter(|(_, v)| !v.is_empty()) {
                q.append_pair(k, v);
            }
            q.append_pair("cursor", &rows.last().map_or(0, |m| m.id).to_string());
        }
        format!("{}?{}", url.path(), url.query().unwrap_or_default())
    });
    let notice = notice(query.done.as_deref(), query.of.as_deref());
    let retry_fields = query
        .pairs()
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .collect();
    page(
        StatusCode::OK,
        &DeliveriesPage {
            user: Some(session.user.name),
            csrf: Some(session.csrf),
            can_retry: ops && query.status == "failed",
            triggers: Trigger::ALL.map(|t| t.as_str()).to_vec(),
            statuses: vec![
                "pending",
                "sending",
                "sent",
                "suppressed",
                "cancelled",
                "failed",
                "held_out",
            ],
            f: query,
            rows,
            next,
            retry_fields,
            notice,
        },
    )
}

/// The retry form: one message (`id`), or every failed one matching the filters.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RetryForm {
    csrf: String,
    id: Option<i64>,
    #[serde(flatten)]
    filter: BTreeMap<String, String>,
}

async fn retry(
    State(app): State<App>,
    session: Session,
    axum::Form(form): axum::Form<RetryForm>,
) -> Response {
    if let Some(refused) = session.refusal(&form.csrf).or_else(|| session.ops_only()) {
        return refused;
    }
    let now = app.clock.now();
    if let Some(id) = form.id {
        return match crate::outbox::retry_failed(&app.pool, Requeue::Ids(&[id]), now).await {
            Ok(n) => {
                app.outbox_ready.notify_waiters();
                redirect(
                    &format!("/console/messages/{id}"),
                    &[("done", "retried".into()), ("of", n.to_string())],
                )
            }
            Err(e) => error_page(ApiError::from_anyhow(e)),
        };
    }
    let field = |k: &str| form.filter.get(k).cloned().unwrap_or_default();
    let query = DeliveriesQuery {
        member_id: field("member_id"),
        trigger: field("trigger"),
        channel: field("channel"),
        status: "failed".into(),
        provider: field("provider"),
        since: field("since"),
        until: field("until"),
        test: field("test"),
        ..Default::default()
    };
    let filter = match query.filter() {
        Ok(f) => f,
        Err(e) => return error_page(ApiError::new(StatusCode::BAD_REQUEST, e)),
    };
    let result = crate::outbox::retry_failed(&app.pool, Requeue::Matching(&filter), now).await;
    match result {
        Ok(n) => {
            app.outbox_ready.notify_waiters();
            let mut pairs = query.pairs();
            pairs.push(("done", "retried".into()));
            pairs.push(("of", n.to_string()));
            redirect("/console/deliveries", &pairs)
        }
        Err(e) => error_page(ApiError::from_anyhow(e)),
    }
}

#[derive(Template)]
#[template(path = "message_detail.html")]
struct MessagePage {
    user: Option<String>,
    csrf: Option<String>,
    d: Detail,
    can_retry: bool,
    notice: Option<String>,
    subject: Option<String>,
    html: Option<String>,
    text: Option<String>,
    body: Option<String>,
    content_error: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct NoticeQuery {
    done: Option<String>,
    of: Option<String>,
}

async fn message_page(
    State(app): State<App>,
    session: Session,
    Path(id): Path<i64>,
    Query(query): Query<NoticeQuery>,
) -> Response {
    let ops = session.user.role == Role::Ops;
    let d = match deliveries::detail(&app, id, ops).await {
        Ok(Some(d)) => d,
        Ok(None) => return error_page(ApiError::not_found(format!("no message {id}"))),
        Err(e) => return error_page(ApiError::from_anyhow(e)),
    };
    let field = |k: &str| d.content.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    page(
        StatusCode::OK,
        &MessagePage {
            user: Some(session.user.name),
            csrf: Some(session.csrf),
            can_retry: ops && d.message.status == crate::outbox::Status::Failed,
            notice: notice(query.done.as_deref(), query.of.as_deref()),
            subject: field("subject"),
            html: field("html"),
            text: field("text"),
            body: field("body"),
            content_error: field("error"),
            d,
        },
    )
}

#[derive(Template)]
#[template(path = "dead_letters.html")]
struct DeadLettersPage {
    user: Option<String>,
    csrf: Option<String>,
    reason: String,
    kind: String,
    rows: Vec<DeadLetter>,
    notice: Option<String>,
    /// The next page (older letters), when this one is full.
    next: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct DeadLettersQuery {
    reason: String,
    #[serde(rename = "type")]
    kind: String,
    done: Option<String>,
    of: Option<String>,
    /// Letters older than this id (the next page).
    before: Option<i64>,
}

impl DeadLettersQuery {
    fn filter(&self) -> dead_letters::Filter {
        let text = |s: &String| (!s.trim().is_empty()).then(|| s.trim().to_owned());
        dead_letters::Filter {
            reason: text(&self.reason),
            event_type: text(&self.kind),
            ..Default::default()
        }
    }
}

async fn dead_letters_page(
    State(app): State<App>,
    session: Session,
    Query(query): Query<DeadLettersQuery>,
) -> Response {
    if let Some(refused) = session.ops_only() {
        return refused;
    }
    const PAGE: i64 = 200;
    let rows = match dead_letters::list(&app, &query.filter(), PAGE, query.before).await {
        Ok(rows) => rows,
        Err(e) => return error_page(ApiError::from_anyhow(e)),
    };
    let next = (rows.len() as i64 == PAGE).then(|| {
        let mut url = url::Url::parse("http://console/console/dead-letters").expect("static URL");
        url.query_pairs_mut()
            .append_pair("reason", &query.reason)
            .append_pair("type", &query.kind)
            .append_pair("before", &rows.last().map_or(0, |d| d.id).to_string());
        format!("{}?{}", url.path(), url.query().unwrap_or_default())
    });
    page(
        StatusCode::OK,
        &DeadLettersPage {
            user: Some(session.user.name),
            csrf: Some(session.csrf),
            notice: notice(query.done.as_deref(), query.of.as_deref()),
            reason: query.reason,
            kind: query.kind,
            rows,
            next,
        },
    )
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct DeadLetterForm {
    csrf: String,
    id: Option<i64>,
    reason: String,
    #[serde(rename = "type")]
    kind: String,
}

async fn act_on_dead_letters(
    app: &App,
    session: &Session,
    form: DeadLetterForm,
    replaying: bool,
) -> Response {
    if let Some(refused) = session.refusal(&form.csrf).or_else(|| session.ops_only()) {
        return refused;
    }
    let query = DeadLettersQuery {
        reason: form.reason.clone(),
        kind: form.kind.clone(),
        ..Default::default()
    };
    let filter = query.filter();
    let ids;
    let selection = match form.id {
        Some(id) => {
            ids = [id];
            Selection::Ids(&ids)
        }
        None => Selection::Matching(&filter),
    };
    let by = &session.user.name;
    let (done, result) = if replaying {
        ("replayed", dead_letters::replay(app, selection, by).await)
    } else {
        ("archived", dead_letters::archive(app, selection, by).await)
    };
    match result {
        Ok(n) => redirect(
            "/console/dead-letters",
            &[
                ("reason", form.reason),
                ("type", form.kind),
                ("done", done.into()),
                ("of", n.to_string()),
            ],
        ),
        Err(e) => error_page(ApiError::from_anyhow(e)),
    }
}

async fn replay(
    State(app): State<App>,
    session: Session,
    axum::Form(form): axum::Form<DeadLetterForm>,
) -> Response {
    act_on_dead_letters(&app, &session, form, true).await
}

async fn archive(
    State(app): State<App>,
    session: Session,
    axum::Form(form): axum::Form<DeadLetterForm>,
) -> Response {
    act_on_dead_letters(&app, &session, form, false).await
}

#[derive(Template)]
#[template(path = "queues.html")]
struct QueuesPage {
    user: Option<String>,
    csrf: Option<String>,
    queues: Vec<(&'static str, Depth)>,
    outbox: Vec<(String, i64)>,
    rates: crate::queues::Rates,
    providers: Vec<ProviderHealth>,
}

async fn queues_page(State(app): State<App>, session: Session) -> Response {
    if let Some(refused) = session.ops_only() {
        return refused;
    }
    let (q, providers) = match (
        crate::queues::snapshot(&app).await,
        deliveries::provider_health(&app, 15).await,
    ) {
        (Ok(q), Ok(p)) => (q, p),
        (Err(e), _) | (_, Err(e)) => return error_page(ApiError::from_anyhow(e)),
    };
    page(
        StatusCode::OK,
        &QueuesPage {
            user: Some(session.user.name),
            csrf: Some(session.csrf),
            queues: vec![("events", q.events), ("retry", q.retry), ("dead", q.dead)],
            outbox: q.outbox.into_iter().collect(),
            rates: q.rates,
            providers,
        },
    )
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct OpenMember {
    id: String,
}

async fn open_member(_session: Session, Query(query): Query<OpenMember>) -> Response {
    let id = query.id.trim();
    if id.is_empty() {
        return Redirect::to("/console/deliveries").into_response();
    }
    let path = format!(
        "/console/members/{}",
        percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC)
    );
    Redirect::to(&path).into_response()
}

#[derive(Template)]
#[template(path = "member.html")]
struct MemberPage {
    user: Option<String>,
    csrf: Option<String>,
    m: Member,
    consent_email: bool,
    consent_sms: bool,
    suppressions: Vec<(String, String, String)>,
    lots: Vec<(String, String, i64, i64)>,
    journal: Vec<(String, String, i64, String)>,
    can_lift: bool,
    notice: Option<String>,
}

async fn member_page(
    State(app): State<App>,
    session: Session,
    Path(id): Path<String>,
    Query(query): Query<NoticeQuery>,
) -> Response {
    let ops = session.user.role == Role::Ops;
    let m = match member_view(&app, &id, ops).await {
        Ok(Some(m)) => m,
        Ok(None) => return error_page(ApiError::not_found(format!("no member {id:?}"))),
        Err(e) => return error_page(e),
    };
    let text = |v: &serde_json::Value, k: &str| v[k].as_str().unwrap_or_default().to_owned();
    let day = |v: &serde_json::Value, k: &str| text(v, k).chars().take(10).collect::<String>();
    page(
        StatusCode::OK,
        &MemberPage {
            user: Some(session.user.name),
            csrf: Some(session.csrf),
            consent_email: m.consent["email"].as_bool().unwrap_or(false),
            consent_sms: m.consent["sms"].as_bool().unwrap_or(false),
            suppressions: m
                .suppressions
                .iter()
                .map(|s| (text(s, "channel"), text(s, "reason"), text(s, "source")))
                .collect(),
            lots: m
                .lots
                .iter()
                .map(|l| {
                    (
                        day(l, "earned_at"),
                        day(l, "expires_at"),
                        l["points"].as_i64().unwrap_or(0),
                        l["remaining"].as_i64().unwrap_or(0),
                    )
                })
                .collect(),
            journal: m
                .journal
                .iter()
                .map(|j| {
                    (
                        day(j, "at"),
                        text(j, "kind"),
                        j["points"].as_i64().unwrap_or(0),
                        text(j, "cause"),
                    )
                })
                .collect(),
            can_lift: ops,
            notice: notice(query.done.as_deref(), query.of.as_deref()),
            m,
        },
    )
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct LiftForm {
    csrf: String,
    channel: String,
    reason: String,
}

async fn lift(
    State(app): State<App>,
    session: Session,
    Path(id): Path<String>,
    axum::Form(form): axum::Form<LiftForm>,
) -> Response {
    if let Some(refused) = session.refusal(&form.csrf).or_else(|| session.ops_only()) {
        return refused;
    }
    let who = crate::http::auth::Authed {
        user: session.user.clone(),
    };
    let body = crate::http::api::ops::Lift {
        channel: form.channel,
        reason: form.reason,
    };
    match crate::http::api::ops::lift(State(app), who, Path(id.clone()), axum::Json(body)).await {
        Ok(axum::Json(lifted)) => redirect(
            &format!("/console/members/{id}"),
            &[
                ("done", "lifted".into()),
                ("of", u8::from(lifted.lifted).to_string()),
            ],
        ),
        Err(e) => error_page(e),
    }
}
