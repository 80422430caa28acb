//! The console (`/console`): server-rendered pages (askama) for marketers and ops. Login sets
//! the session cookie; every form carries the session's CSRF token (the login form a
//! double-submitted one); the editor's live preview is one small script calling the API.

mod charts;
mod ops;
mod reports;

use std::collections::BTreeMap;

use askama::Template;
use axum::Router;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde::Deserialize;

use crate::app::App;
use crate::domain::Trigger;
use crate::http::api::templates::{self as api, TestSendRequest};
use crate::http::auth::{self, ApiError};
use crate::render::{FILE_NAMES, FileError};
use crate::template_store::Files;
use crate::users::{self, Role, User};

/// The double-submit cookie of the login form.
const LOGIN_CSRF_COOKIE: &str = "lifecycle_login_csrf";

/// `/console` routes.
pub(super) fn routes() -> Router<App> {
    Router::new()
        .route(
            "/console",
            get(|| async { Redirect::to("/console/templates") }),
        )
        .route("/console/login", get(login_page).post(login))
        .route("/console/logout", post(logout))
        .route("/console/static/console.css", get(css))
        .route("/console/static/console.js", get(js))
        .route("/console/templates", get(templates))
        .route("/console/templates/{trigger}/{locale}", get(editor))
        .route("/console/templates/{trigger}/{locale}/draft", post(save))
        .route(
            "/console/templates/{trigger}/{locale}/publish",
            post(publish),
        )
        .route(
            "/console/templates/{trigger}/{locale}/test-send",
            post(test_send),
        )
        .route("/console/templates/{trigger}/{locale}/diff", get(diff))
        .merge(ops::routes())
        .merge(reports::routes())
}

/// A logged-in console user and their session's CSRF token. Without a session, a page
/// answers with a redirect to the login form.
struct Session {
    user: User,
    csrf: String,
}

impl Session {
    /// A 403 page unless the user is ops.
    fn ops_only(&self) -> Option<Response> {
        (self.user.role != Role::Ops).then(|| {
            page_error(
                StatusCode::FORBIDDEN,
                "Not allowed",
                "This page is for the ops role.",
            )
        })
    }
}

impl FromRequestParts<App> for Session {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Session, Response> {
        let found = match auth::cookie(&parts.headers, auth::SESSION_COOKIE) {
            Some(cookie) => users::by_session(&app.pool, cookie)
                .await
                .map_err(|e| ApiError::internal(e).into_response())?,
            None => None,
        };
        match found {
            Some((user, csrf)) => Ok(Session { user, csrf }),
            None => Err(Redirect::to("/console/login").into_response()),
        }
    }
}

impl Session {
    /// The (trigger, locale) a form posted to a template's path is about, or the page that
    /// refuses it: a CSRF token not this session's (403), an unknown trigger or locale (404).
    fn form_on(
        &self,
        csrf: &str,
        name: &str,
        locale: &str,
    ) -> Result<(Trigger, String), Box<Response>> {
        if let Some(refused) = self.refusal(csrf) {
            return Err(Box::new(refused));
        }
        pair(name, locale).map_err(|e| Box::new(error_page(e)))
    }

    /// The refusal (403) of a form whose CSRF token is not this session's.
    fn refusal(&self, sent: &str) -> Option<Response> {
        (sent != self.csrf).then(|| {
            page_error(
                StatusCode::FORBIDDEN,
                "Refused",
                "This form's security token is missing or out of date. Reload the page and try again.",
            )
        })
    }
}

/// A page, with the headers every console page has: no framing, no caching, and a content
/// policy that allows only this origin's script (the email preview's iframe is sandboxed).
pub(super) fn page<T: Template>(status: StatusCode, template: &T) -> Response {
    match template.render() {
        Ok(html) => {
            let mut response = (status, Html(html)).into_response();
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: https:; frame-ancestors 'none'; form-action 'self'",
                ),
            );
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            headers.insert(
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            );
            response
        }
        Err(e) => ApiError::internal(e).into_response(),
    }
}

#[derive(Template)]
#[template(path = "message.html")]
struct MessagePage<'a> {
    user: Option<String>,
    csrf: Option<String>,
    heading: &'a str,
    text: &'a str,
}

fn page_error(status: StatusCode, heading: &str, text: &str) -> Response {
    page(
        status,
        &MessagePage {
            user: None,
            csrf: None,
            heading,
            text,
        },
    )
}

/// An API error as a page.
pub(super) fn error_page(error: ApiError) -> Response {
    let status = error.status();
    let heading = status.canonical_reason().unwrap_or("Error");
    page_error(status, heading, &error.error)
}

async fn css() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("static/console.css"),
    )
        .into_response()
}

async fn js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("static/console.js"),
    )
        .into_response()
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    user: Option<String>,
    csrf: Option<String>,
    login_csrf: String,
    name: String,
    error: Option<String>,
}

fn login_form(status: StatusCode, name: String, error: Option<String>) -> Response {
    let token = users::random_secret(24);
    let mut response = page(
        status,
        &LoginPage {
            user: None,
            csrf: None,
            login_csrf: token.clone(),
            name,
            error,
        },
    );
    if let Ok(value) = HeaderValue::from_str(&format!(
        "{LOGIN_CSRF_COOKIE}={token}; Path=/console/login; HttpOnly; SameSite=Strict; Max-Age=3600"
    )) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
}

async fn login_page() -> Response {
    login_form(StatusCode::OK, String::new(), None)
}

#[derive(Deserialize)]
struct LoginForm {
    name: String,
    password: String,
    csrf: String,
}

async fn login(State(app): State<App>, request: axum::extract::Request) -> Response {
    let (parts, body) = request.into_parts();
    let client = auth::client_addr(&app, &parts);
    let headers = parts.headers.clone();
    let form = match axum::Form::<LoginForm>::from_request(
        axum::extract::Request::from_parts(parts, body),
        &app,
    )
    .await
    {
        Ok(axum::Form(form)) => form,
        Err(rejection) => return rejection.into_response(),
    };
    if auth::cookie(&headers, LOGIN_CSRF_COOKIE) != Some(form.csrf.as_str()) {
        return login_form(
            StatusCode::FORBIDDEN,
            form.name,
            Some("The form's security token is missing or out of date; try again.".into()),
        );
    }
    // No user has a name like that: refused before it is counted (the throttle keeps the
    // names it counts), and not echoed back.
    if users::check_name(&form.name).is_err() {
        tracing::warn!(
            client = client.map(|a| a.to_string()),
            "A console login failed: no such user name."
        );
        return login_form(
            StatusCode::UNAUTHORIZED,
            String::new(),
            Some("Wrong user name or password.".into()),
        );
    }
    // Counted before the password is checked, given back when it is right.
    let attempt = match client.map(|addr| app.logins.begin(&form.name, addr)) {
        Some(Ok(attempt)) => Some(attempt),
        Some(Err(wait)) => {
            let mut response = login_form(
                StatusCode::TOO_MANY_REQUESTS,
                form.name,
                Some(format!(
                    "Too many failed logins. Try again in {} minutes.",
                    wait.as_secs().div_ceil(60).max(1)
                )),
            );
            if let Ok(v) = HeaderValue::from_str(&wait.as_secs().max(1).to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
            return response;
        }
        None => None,
    };
    let user = match users::by_password(&app.pool, &form.name, &form.password).await {
        Ok(user) => user,
        Err(e) => return ApiError::internal(e).into_response(),
    };
    let Some(user) = user else {
        // Without the name typed: it may be a password typed in the wrong field.
        tracing::warn!(
            client = client.map(|a| a.to_string()),
            "A console login failed."
        );
        return login_form(
            StatusCode::UNAUTHORIZED,
            form.name,
            Some("Wrong user name or password.".into()),
        );
    };
    if let Some(attempt) = attempt {
        app.logins.succeeded(attempt);
    }
    let session = match users::open_session(&app.pool, &user.name).await {
        Ok(s) => s,
        Err(e) => return ApiError::internal(e).into_response(),
    };
    let mut response = Redirect::to("/console/templates").into_response();
    if let Ok(v) = HeaderValue::from_str(&auth::session_cookie(&app, &session.cookie)) {
        response.headers_mut().append(header::SET_COOKIE, v);
    }
    response
}

#[derive(Deserialize)]
struct CsrfForm {
    csrf: String,
}

async fn logout(
    State(app): State<App>,
    headers: HeaderMap,
    session: Session,
    axum::Form(form): axum::Form<CsrfForm>,
) -> Response {
    if let Some(refused) = session.refusal(&form.csrf) {
        return refused;
    }
    if let Some(cookie) = auth::cookie(&headers, auth::SESSION_COOKIE)
        && let Err(e) = users::close_session(&app.pool, cookie).await
    {
        return ApiError::internal(e).into_response();
    }
    let mut response = Redirect::to("/console/login").into_response();
    if let Ok(v) = HeaderValue::from_str(&auth::session_cookie(&app, "")) {
        response.headers_mut().append(header::SET_COOKIE, v);
    }
    response
}

#[derive(Template)]
#[template(path = "templates.html")]
struct TemplatesPage {
    user: Option<String>,
    csrf: Option<String>,
    pairs: Vec<crate::template_store::Pair>,
}

async fn templates(State(app): State<App>, session: Session) -> Response {
    if session.user.role != Role::Ops && session.user.role != Role::Marketer {
        return StatusCode::FORBIDDEN.into_response();
    }
    match app.templates.pairs().await {
        Ok(pairs) => page(
            StatusCode::OK,
            &TemplatesPage {
                user: Some(session.user.name),
                csrf: Some(session.csrf),
                pairs,
            },
        ),
        Err(e) => error_page(e.into()),
    }
}

/// A file in the editor.
struct EditorFile {
    name: String,
    text: String,
    rows: usize,
}

/// A row of the history table.
struct HistoryRow {
    version: i32,
    state: String,
    author: String,
    created: String,
}

#[derive(Template)]
#[template(path = "editor.html")]
struct EditorPage {
    user: Option<String>,
    csrf: Option<String>,
    trigger: String,
    locale: String,
    version: i32,
    state: String,
    published: i32,
    draft: Option<i32>,
    test_version: i32,
    files: Vec<EditorFile>,
    errors: Vec<FileError>,
    notice: Option<String>,
    history: Vec<HistoryRow>,
}

#[derive(Deserialize, Default)]
struct EditorQuery {
    version: Option<i32>,
    /// What just happened, as a code (never text from the URL on the page): `saved`,
    /// `published`, `sent`, with `of` (the version, or the test's message ids).
    done: Option<String>,
    of: Option<String>,
}

impl EditorQuery {
    /// The notice the editor shows.
    fn notice(&self) -> Option<String> {
        let of = self.of.as_deref().unwrap_or_default();
        let number = |s: &str| s.parse::<i64>().ok();
        match self.done.as_deref()? {
            "saved" => number(of).map(|v| format!("Saved as draft v{v}.")),
            "published" => number(of).map(|v| format!("Published v{v}: new messages use it now.")),
            "sent" => {
                let ids: Option<Vec<String>> = of
                    .split(',')
                    .map(|i| number(i).map(|i| format!("#{i}")))
                    .collect();
                ids.map(|ids| format!("Test queued: message {}.", ids.join(", ")))
            }
            _ => None,
        }
    }
}

/// The trigger and locale of a console path.
fn pair(name: &str, locale: &str) -> Result<(Trigger, String), ApiError> {
    Ok((api::trigger(name)?, api::locale(locale)?))
}

async fn editor(
    State(app): State<App>,
    session: Session,
    Path((name, raw_locale)): Path<(String, String)>,
    Query(query): Query<EditorQuery>,
) -> Response {
    let (trigger, locale) = match pair(&name, &raw_locale) {
        Ok(p) => p,
        Err(e) => return error_page(e),
    };
    editor_page(
        &app,
        session,
        trigger,
        &locale,
        query.version,
        None,
        Vec::new(),
        query.notice(),
    )
    .await
}

/// The editor for (trigger, locale) showing `version` (default: the draft, else the published
/// one), or the `unsaved` files a save refused with their `errors`.
#[allow(clippy::too_many_arguments)]
async fn editor_page(
    app: &App,
    session: Session,
    trigger: Trigger,
    locale: &str,
    version: Option<i32>,
    unsaved: Option<Files>,
    errors: Vec<FileError>,
    notice: Option<String>,
) -> Response {
    let store = &app.templates;
    let loaded = async {
        let history = store.versions(trigger, locale).await?;
        let published = store.published(trigger, locale).await?;
        let draft = store.draft(trigger, locale).await?;
        Ok::<_, crate::template_store::StoreError>((history, published, draft))
    }
    .await;
    let (history, published, draft) = match loaded {
        Ok(found) => found,
        Err(e) => return error_page(e.into()),
    };
    let shown = version.or(draft).unwrap_or(published);
    let Some(current) = history.iter().find(|v| v.version == shown) else {
        return error_page(ApiError::not_found(format!("no version {shown}")));
    };
    let source = unsaved.unwrap_or_else(|| current.files.clone());
    let html_file = if source.contains_key("email.html.hbs") {
        "email.html.hbs"
    } else {
        "email.mjml.hbs"
    };
    let files = ["email.subject.hbs", html_file, "email.txt.hbs", "sms.hbs"]
        .into_iter()
        .map(|name| {
            let text = source.get(name).cloned().unwrap_or_default();
            let rows = (text.lines().count() + 2).clamp(3, 30);
            EditorFile {
                name: name.to_owned(),
                text,
                rows,
            }
        })
        .collect();
    let status = if errors.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::UNPROCESSABLE_ENTITY
    };
    page(
        status,
        &EditorPage {
            user: Some(session.user.name),
            csrf: Some(session.csrf),
            trigger: trigger.as_str().to_owned(),
            locale: locale.to_owned(),
            version: shown,
            state: current.state.clone(),
            published,
            draft,
            test_version: draft.unwrap_or(shown),
            files,
            errors,
            notice,
            history: history
                .iter()
                .map(|v| HistoryRow {
                    version: v.version,
                    state: v.state.clone(),
                    author: v.author.clone(),
                    created: v.created_at.map_or("shipped".to_owned(), |t| {
                        t.format("%Y-%m-%d %H:%M UTC").to_string()
                    }),
                })
                .collect(),
        },
    )
}

/// Where the editor goes after a change, with what was `done` (a code the page turns into
/// its notice) `of` what.
fn back_to(trigger: Trigger, locale: &str, version: Option<i32>, done: &str, of: &str) -> Response {
    let mut url = url::Url::parse("http://console/").expect("static URL");
    url.set_path(&format!("/console/templates/{}/{locale}", trigger.as_str()));
    {
        let mut query = url.query_pairs_mut();
        if let Some(v) = version {
            query.append_pair("version", &v.to_string());
        }
        query.append_pair("done", done);
        query.append_pair("of", of);
    }
    let target = format!("{}?{}", url.path(), url.query().unwrap_or_default());
    Redirect::to(&target).into_response()
}

async fn save(
    State(app): State<App>,
    session: Session,
    Path((name, raw_locale)): Path<(String, String)>,
    axum::Form(form): axum::Form<BTreeMap<String, String>>,
) -> Response {
    let csrf = form.get("csrf").map_or("", String::as_str);
    let (trigger, locale) = match session.form_on(csrf, &name, &raw_locale) {
        Ok(pair) => pair,
        Err(refused) => return *refused,
    };
    // Every file the editor shows is sent; an emptied one is removed.
    let mut changes: BTreeMap<String, Option<String>> = form
        .iter()
        .filter(|(k, _)| FILE_NAMES.contains(&k.as_str()))
        .map(|(k, v)| {
            let text = v.replace("\r\n", "\n");
            (k.clone(), (!text.is_empty()).then_some(text))
        })
        .collect();
    // The editor shows one of the two HTML files; the other goes.
    for (shown, other) in [
        ("email.mjml.hbs", "email.html.hbs"),
        ("email.html.hbs", "email.mjml.hbs"),
    ] {
        if changes.contains_key(shown) && !changes.contains_key(other) {
            changes.insert(other.to_owned(), None);
        }
    }
    match api::draft(&app, trigger, &locale, &changes, &session.user.name).await {
        Ok(version) => back_to(
            trigger,
            &locale,
            Some(version),
            "saved",
            &version.to_string(),
        ),
        Err(e) if e.errors.is_some() => {
            let unsaved: Files = changes
                .into_iter()
                .filter_map(|(k, v)| Some((k, v?)))
                .collect();
            let errors = e.errors.unwrap_or_default();
            editor_page(
                &app,
                session,
                trigger,
                &locale,
                None,
                Some(unsaved),
                errors,
                None,
            )
            .await
        }
        Err(e) => error_page(e),
    }
}

#[derive(Deserialize)]
struct PublishForm {
    csrf: String,
    version: i32,
}

async fn publish(
    State(app): State<App>,
    session: Session,
    Path((name, raw_locale)): Path<(String, String)>,
    axum::Form(form): axum::Form<PublishForm>,
) -> Response {
    let (trigger, locale) = match session.form_on(&form.csrf, &name, &raw_locale) {
        Ok(pair) => pair,
        Err(refused) => return *refused,
    };
    match app
        .templates
        .publish(trigger, &locale, form.version, &session.user.name)
        .await
    {
        Ok(()) => back_to(
            trigger,
            &locale,
            Some(form.version),
            "published",
            &form.version.to_string(),
        ),
        Err(e) => error_page(e.into()),
    }
}

#[derive(Deserialize)]
struct TestSendForm {
    csrf: String,
    version: Option<String>,
    email: Option<String>,
    phone: Option<String>,
    member_id: Option<String>,
}

async fn test_send(
    State(app): State<App>,
    session: Session,
    Path((name, raw_locale)): Path<(String, String)>,
    axum::Form(form): axum::Form<TestSendForm>,
) -> Response {
    let (trigger, locale) = match session.form_on(&form.csrf, &name, &raw_locale) {
        Ok(pair) => pair,
        Err(refused) => return *refused,
    };
    let nonempty = |v: Option<String>| v.filter(|s| !s.trim().is_empty());
    let version = nonempty(form.version).and_then(|v| v.trim().parse().ok());
    let request = TestSendRequest {
        version,
        member_id: nonempty(form.member_id),
        email: nonempty(form.email),
        phone: nonempty(form.phone),
    };
    match api::queue_test(&app, &session.user, trigger, &locale, request).await {
        Ok(ids) => {
            let ids: Vec<String> = ids.iter().map(i64::to_string).collect();
            back_to(trigger, &locale, version, "sent", &ids.join(","))
        }
        Err(e) => error_page(e),
    }
}

/// The most lines of a file the diff compares; a longer file is said to be too long.
const MAX_DIFF_LINES: usize = 10_000;
/// The most bytes (both versions together) of a file the diff compares.
const MAX_DIFF_BYTES: usize = 1024 * 1024;
/// How long the diff of one file may take; past it, the diff is coarser (whole runs of lines
/// replaced) but still correct.
const DIFF_TIME: std::time::Duration = std::time::Duration::from_millis(500);

/// The changes of each file between two versions.
fn diff_files(old: &Files, new: &Files) -> Vec<DiffFile> {
    FILE_NAMES
        .iter()
        .filter(|f| old.contains_key(**f) || new.contains_key(**f))
        .map(|f| {
            let a = old.get(*f).map_or("", String::as_str);
            let b = new.get(*f).map_or("", String::as_str);
            let longest = a.lines().count().max(b.lines().count());
            let lines = if a == b {
                Vec::new()
            } else if longest > MAX_DIFF_LINES || a.len() + b.len() > MAX_DIFF_BYTES {
                vec![(
                    "equal",
                    format!(
                        "  ({longest} lines, {} bytes: more than a diff shows ({MAX_DIFF_LINES} lines, {} KiB); compare the versions' files instead)",
                        a.len() + b.len(),
                        MAX_DIFF_BYTES / 1024
                    ),
                )]
            } else {
                similar::TextDiff::configure()
                    .timeout(DIFF_TIME)
                    .diff_lines(a, b)
                    .iter_all_changes()
                    .map(|change| {
                        let (class, sign) = match change.tag() {
                            similar::ChangeTag::Insert => ("insert", '+'),
                            similar::ChangeTag::Delete => ("delete", '-'),
                            similar::ChangeTag::Equal => ("equal", ' '),
                        };
                        (
                            class,
                            format!("{sign} {}", change.value().trim_end_matches('\n')),
                        )
                    })
                    .collect()
            };
            DiffFile {
                name: (*f).to_owned(),
                lines,
            }
        })
        .collect()
}

/// One file's changes.
struct DiffFile {
    name: String,
    /// (class, line): `insert`, `delete`, `equal`.
    lines: Vec<(&'static str, String)>,
}

#[derive(Template)]
#[template(path = "diff.html")]
struct DiffPage {
    user: Option<String>,
    csrf: Option<String>,
    trigger: String,
    locale: String,
    from: i32,
    to: i32,
    files: Vec<DiffFile>,
}

#[derive(Deserialize)]
struct DiffQuery {
    from: i32,
    to: i32,
}

async fn diff(
    State(app): State<App>,
    session: Session,
    Path((name, raw_locale)): Path<(String, String)>,
    Query(query): Query<DiffQuery>,
) -> Response {
    let (trigger, locale) = match pair(&name, &raw_locale) {
        Ok(p) => p,
        Err(e) => return error_page(e),
    };
    let store = &app.templates;
    let (old, new) = match (
        store.files(trigger, &locale, query.from).await,
        store.files(trigger, &locale, query.to).await,
    ) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return error_page(e.into()),
    };
    // Off the async workers, a few at a time, bounded in lines and time.
    let files = match app
        .templates
        .for_request(move |_| diff_files(&old, &new))
        .await
    {
        Ok(files) => files,
        Err(e) => return error_page(ApiError::from_anyhow(e)),
    };
    page(
        StatusCode::OK,
        &DiffPage {
            user: Some(session.user.name),
            csrf: Some(session.csrf),
            trigger: trigger.as_str().to_owned(),
            locale,
            from: query.from,
            to: query.to,
            files,
        },
    )
}
