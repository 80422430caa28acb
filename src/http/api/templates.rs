//! `/api/templates`: versions, drafts, previews, test sends and publishing.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::app::App;
use crate::config::TestRecipient;
use crate::domain::Trigger;
use crate::domain::{Channel, Email, Phone};
use crate::http::auth::{ApiError, Authed};
use crate::outbox;
use crate::render::{self, FileError};
use crate::template_store::{Files, Pair, Version};
use crate::users::{Role, User};

/// A draft's files: each given file replaces the published one; `null` removes one (say,
/// `email.txt.hbs`, to derive the text part from the HTML).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct DraftRequest {
    /// By file name: `email.subject.hbs`, `email.mjml.hbs` (or `email.html.hbs`),
    /// `email.txt.hbs`, `sms.hbs`.
    pub files: BTreeMap<String, Option<String>>,
}

/// A saved version's number.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Saved {
    /// The version.
    pub version: i32,
}

/// What to preview: unsaved files, a saved version, or the published one; with a member's
/// context as it is now, or the trigger's sample.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PreviewRequest {
    /// Render for this member (their ledger now).
    pub member_id: Option<String>,
    /// A saved version (default: the published one).
    pub version: Option<i32>,
    /// Unsaved files over the published ones (as a draft's).
    pub files: Option<BTreeMap<String, Option<String>>>,
}

/// An email as it will arrive.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct EmailPreview {
    /// The subject line.
    pub subject: String,
    /// The HTML part.
    pub html: String,
    /// The plain-text part.
    pub text: String,
}

/// An SMS as it will arrive.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct SmsPreview {
    /// The text.
    pub body: String,
    /// How many segments it is sent as.
    pub segments: usize,
    /// `GSM-7` or `UCS-2`.
    pub encoding: String,
}

/// A rendered preview.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Preview {
    /// The email.
    pub email: EmailPreview,
    /// The SMS.
    pub sms: SmsPreview,
}

/// Where a test goes, and what it shows: with which version (default: the draft, else the
/// published one), as which member (their context; default: the trigger's sample), to which
/// address and number. A test goes only to `[console] test_recipients` or to the signed-in
/// user's own address and number (`lifecycle users add --email/--phone`); without `email`
/// and `phone`, to the user's own.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct TestSendRequest {
    /// The version to send.
    pub version: Option<i32>,
    /// A member whose context it renders (never whose addresses it goes to).
    pub member_id: Option<String>,
    /// An email address to send the email to.
    pub email: Option<String>,
    /// An E.164 number to send the SMS to.
    pub phone: Option<String>,
}

/// The test messages queued.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct TestSent {
    /// Their outbox ids (`GET /api/messages/{id}`).
    pub message_ids: Vec<i64>,
}

/// The version to publish.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PublishRequest {
    /// A saved version, or 0 for the shipped files.
    pub version: i32,
}

/// What dispatch uses now.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Published {
    /// The trigger.
    pub trigger: String,
    /// The locale.
    pub locale: String,
    /// The version published.
    pub version: i32,
}

/// The trigger of a path, or 404.
pub(crate) fn trigger(name: &str) -> Result<Trigger, ApiError> {
    Trigger::parse(name).ok_or_else(|| {
        ApiError::not_found(format!(
            "no trigger {name:?}; the triggers are {}",
            Trigger::ALL.map(|t| t.as_str()).join(", ")
        ))
    })
}

/// The locale of a path, checked.
pub(crate) fn locale(raw: &str) -> Result<String, ApiError> {
    crate::domain::Locale::parse(raw)
        .map(|l| l.as_str().to_owned())
        .map_err(|_| ApiError::not_found(format!("{raw:?} is not a locale (ko, ko-KR, tr …)")))
}

#[utoipa::path(get, path = "/api/templates", tag = "templates",
    responses((status = 200, description = "Every (trigger, locale) with its published and draft versions", body = [Pair]),
              (status = 401, body = ApiError)),
    security(("bearer" = []), ("session" = [])))]
/// Every (trigger, locale): published version, draft version or null.
pub(crate) async fn list(State(app): State<App>, who: Authed) -> Result<Json<Vec<Pair>>, ApiError> {
    who.require(Role::Marketer)?;
    Ok(Json(app.templates.pairs().await?))
}

#[utoipa::path(get, path = "/api/templates/{trigger}/{locale}", tag = "templates",
    params(("trigger" = String, Path), ("locale" = String, Path)),
    responses((status = 200, description = "Versions, newest first; version 0 is the shipped files", body = [Version]),
              (status = 401, body = ApiError), (status = 404, body = ApiError)),
    security(("bearer" = []), ("session" = [])))]
/// The versions of one (trigger, locale), newest first.
pub(crate) async fn versions(
    State(app): State<App>,
    who: Authed,
    Path((name, raw_locale)): Path<(String, String)>,
) -> Result<Json<Vec<Version>>, ApiError> {
    who.require(Role::Marketer)?;
    let (trigger, locale) = (trigger(&name)?, locale(&raw_locale)?);
    Ok(Json(app.templates.versions(trigger, &locale).await?))
}

#[utoipa::path(put, path = "/api/templates/{trigger}/{locale}/draft", tag = "templates",
    params(("trigger" = String, Path), ("locale" = String, Path)),
    request_body = DraftRequest,
    responses((status = 200, description = "Saved as the draft", body = Saved),
              (status = 401, body = ApiError), (status = 403, body = ApiError),
              (status = 413, description = "Body over 1 MiB"),
              (status = 422, description = "Does not validate; nothing saved", body = ApiError)),
    security(("bearer" = []), ("session" = [])))]
/// Validates and saves a draft; the published version is untouched.
pub(crate) async fn save_draft(
    State(app): State<App>,
    who: Authed,
    Path((name, raw_locale)): Path<(String, String)>,
    Json(body): Json<DraftRequest>,
) -> Result<Json<Saved>, ApiError> {
    who.require(Role::Marketer)?;
    let (trigger, locale) = (trigger(&name)?, locale(&raw_locale)?);
    let version = draft(&app, trigger, &locale, &body.files, &who.user.name).await?;
    Ok(Json(Saved { version }))
}

/// Saves `changes` over the published files as the draft.
pub(crate) async fn draft(
    app: &App,
    trigger: Trigger,
    locale: &str,
    changes: &BTreeMap<String, Option<String>>,
    author: &str,
) -> Result<i32, ApiError> {
    let files = app.templates.merged(trigger, locale, changes).await?;
    Ok(app
        .templates
        .save_draft(trigger, locale, &files, author)
        .await?)
}

#[utoipa::path(post, path = "/api/templates/{trigger}/{locale}/preview", tag = "templates",
    params(("trigger" = String, Path), ("locale" = String, Path)),
    request_body = PreviewRequest,
    responses((status = 200, description = "The email and the SMS as they will arrive", body = Preview),
              (status = 401, body = ApiError), (status = 404, body = ApiError),
              (status = 422, description = "The files do not validate", body = ApiError)),
    security(("bearer" = []), ("session" = [])))]
/// Renders unsaved files, a version, or the published one, for a member or the sample.
pub(crate) async fn preview(
    State(app): State<App>,
    who: Authed,
    Path((name, raw_locale)): Path<(String, String)>,
    Json(body): Json<PreviewRequest>,
) -> Result<Json<Preview>, ApiError> {
    who.require(Role::Marketer)?;
    let (trigger, locale) = (trigger(&name)?, locale(&raw_locale)?);
    Ok(Json(render_preview(&app, trigger, &locale, body).await?))
}

/// The files a preview or test send is about.
async fn files_of(
    app: &App,
    trigger: Trigger,
    locale: &str,
    version: Option<i32>,
    changes: Option<&BTreeMap<String, Option<String>>>,
) -> Result<Files, ApiError> {
    if let Some(changes) = changes {
        return Ok(app.templates.merged(trigger, locale, changes).await?);
    }
    let version = match version {
        Some(v) => v,
        None => app.templates.published(trigger, locale).await?,
    };
    Ok(app.templates.files(trigger, locale, version).await?)
}

/// The context a preview or test send renders with: the member's now, or the sample.
async fn context_for(
    app: &App,
    trigger: Trigger,
    member_id: Option<&str>,
) -> Result<Value, ApiError> {
    let program = &app.settings.program;
    let mut context = match member_id {
        None => render::sample_context(trigger),
        Some(id) => {
            let now = app.clock.now();
            let Some((state, cart)) =
                crate::ledger::member_now(&app.pool, id, program, now).await?
            else {
                return Err(ApiError::not_found(format!("no member {id:?}")));
            };
            render::context_now(trigger, &state, cart.as_ref(), program, now)
        }
    };
    // A pool's code is drawn when a message is planned; a preview shows where it goes.
    if program.coupons.contains_key(trigger.as_str()) && context["coupon_code"].is_null() {
        context["coupon_code"] = Value::String("COUPON-CODE".into());
    }
    Ok(context)
}

/// Renders a preview (on the blocking pool: MJML and CSS inlining are CPU work).
pub(crate) async fn render_preview(
    app: &App,
    trigger: Trigger,
    locale: &str,
    request: PreviewRequest,
) -> Result<Preview, ApiError> {
    let files = files_of(
        app,
        trigger,
        locale,
        request.version,
        request.files.as_ref(),
    )
    .await?;
    let mut context = context_for(app, trigger, request.member_id.as_deref()).await?;
    let settings = &app.settings;
    context["shop_name"] = Value::String(settings.shop_name.clone());
    context["shop_address"] = Value::String(settings.shop_address.clone().unwrap_or_default());
    context["locale"] = Value::String(locale.to_owned());
    context["unsubscribe_url"] = Value::String(format!(
        "{}/unsubscribe/preview",
        settings.public_url.as_str().trim_end_matches('/')
    ));
    let locale = locale.to_owned();
    // Compiled and rendered off the async workers, within the render budget, a few at a time.
    let rendered = app
        .templates
        .for_request(move |shipped| {
            let templates = shipped
                .overlay(trigger, &locale, &files)
                .map_err(ApiError::invalid)?;
            let base = format!("{}/{locale}", trigger.as_str());
            let email = templates
                .render_email(trigger, &locale, &context)
                .map_err(|e| ApiError::invalid(vec![render::render_error(&base, &e)]))?;
            let sms = templates
                .render_sms(trigger, &locale, &context)
                .map_err(|e| ApiError::invalid(vec![render::render_error(&base, &e)]))?;
            Ok::<_, ApiError>((email, sms))
        })
        .await
        .map_err(|panic| {
            ApiError::invalid(vec![FileError {
                file: String::new(),
                line: None,
                message: format!("{panic:#}"),
            }])
        })??;
    let (email, sms) = rendered;
    let (encoding, segments) = render::helpers::sms_segments(&sms);
    Ok(Preview {
        email: EmailPreview {
            subject: email.subject,
            html: email.html,
            text: email.text,
        },
        sms: SmsPreview {
            body: sms,
            segments,
            encoding: encoding.to_string(),
        },
    })
}

#[utoipa::path(post, path = "/api/templates/{trigger}/{locale}/test-send", tag = "templates",
    params(("trigger" = String, Path), ("locale" = String, Path)),
    request_body = TestSendRequest,
    responses((status = 202, description = "Queued for the real providers, recorded with test: true and who sent it", body = TestSent),
              (status = 401, body = ApiError), (status = 404, body = ApiError),
              (status = 422, description = "No recipient, a malformed one, or one not on [console] test_recipients nor the user's own", body = ApiError),
              (status = 429, description = "Over [console] test_sends_per_hour", body = ApiError)),
    security(("bearer" = []), ("session" = [])))]
/// Sends a version (default: the draft, else the published one) through the real providers.
pub(crate) async fn test_send(
    State(app): State<App>,
    who: Authed,
    Path((name, raw_locale)): Path<(String, String)>,
    Json(body): Json<TestSendRequest>,
) -> Result<(StatusCode, Json<TestSent>), ApiError> {
    who.require(Role::Marketer)?;
    let (trigger, locale) = (trigger(&name)?, locale(&raw_locale)?);
    let message_ids = queue_test(&app, &who.user, trigger, &locale, body).await?;
    Ok((StatusCode::ACCEPTED, Json(TestSent { message_ids })))
}

/// Plans the test messages of a request by `user`; returns their ids.
pub(crate) async fn queue_test(
    app: &App,
    user: &User,
    trigger: Trigger,
    locale: &str,
    request: TestSendRequest,
) -> Result<Vec<i64>, ApiError> {
    let version = match request.version {
        Some(v) => v,
        None => match app.templates.draft(trigger, locale).await? {
            Some(draft) => draft,
            None => app.templates.published(trigger, locale).await?,
        },
    };
    // The version must exist and validate before anything is queued.
    app.templates
        .templates_of_for_request(trigger, locale, version)
        .await?;
    let targets = recipients(app, user, &request).await?;
    let member = request.member_id.as_deref().filter(|m| !m.is_empty());
    let context = context_for(app, trigger, member).await?;
    // The hourly limit is counted and taken in one transaction, under the user's lock, so
    // that parallel requests cannot all pass it.
    let limit = i64::from(app.settings.console.test_sends_per_hour);
    let mut tx = app.pool.begin().await?;
    sqlx::query!(
        "select pg_advisory_xact_lock(hashtextextended('test-sends:' || $1, 0))",
        &user.name
    )
    .execute(&mut *tx)
    .await?;
    let sent = outbox::test_sends_last_hour(&mut tx, &user.name).await?;
    if sent + targets.len() as i64 > limit {
        return Err(ApiError::too_many(
            format!(
                "{sent} test messages in the last hour; at most {limit} ([console] test_sends_per_hour)"
            ),
            std::time::Duration::from_secs(600),
        ));
    }
    let keys: Vec<String> = targets
        .iter()
        .map(|(channel, _)| {
            // Its own key: a test never takes the trigger's.
            format!(
                "test:{}:{}:{}",
                trigger.as_str(),
                crate::users::random_secret(12),
                channel.as_str()
            )
        })
        .collect();
    let now = app.clock.now();
    let sends: Vec<outbox::TestSend> = targets
        .iter()
        .zip(&keys)
        .map(|((channel, to), key)| outbox::TestSend {
            dedupe_key: key,
            member_id: member.unwrap_or(""),
            trigger,
            channel: *channel,
            context: &context,
            due_at: now,
            version,
            locale,
            to: Some(to),
            by: &user.name,
        })
        .collect();
    let ids = outbox::enqueue_tests(&mut tx, &sends).await?;
    tx.commit().await?;
    tracing::info!(
        user = user.name,
        trigger = trigger.as_str(),
        locale,
        version,
        messages = ids.len(),
        "Test send queued."
    );
    app.outbox_ready.notify_waiters();
    Ok(ids)
}

/// Where a test send goes, per channel: what the request asked for, else the user's own
/// address and number; an address that is neither the user's own nor on
/// `[console] test_recipients` is refused, and so is a request that names nowhere to go.
async fn recipients(
    app: &App,
    user: &User,
    request: &TestSendRequest,
) -> Result<Vec<(Channel, String)>, ApiError> {
    let unprocessable = |e: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e);
    let email = request
        .email
        .as_deref()
        .filter(|e| !e.trim().is_empty())
        .map(|e| Email::parse(e.trim()))
        .transpose()
        .map_err(|e| unprocessable(format!("email: {e}")))?;
    let phone = request
        .phone
        .as_deref()
        .filter(|p| !p.trim().is_empty())
        .map(|p| Phone::parse(p.trim()))
        .transpose()
        .map_err(|e| unprocessable(format!("phone: {e}")))?;
    let own = crate::users::contact(&app.pool, &user.name).await?;
    // Where it goes: what was asked for, else the user's own address and number.
    let (email, phone) = match (email, phone) {
        (None, None) => (own.email.clone(), own.phone.clone()),
        asked => asked,
    };
    let allowed = &app.settings.console.test_recipients;
    let mut targets: Vec<(Channel, String)> = Vec::new();
    if let Some(email) = email {
        if own.email.as_ref() != Some(&email)
            && !allowed.contains(&TestRecipient::Email(email.to_string()))
        {
            return Err(unprocessable(format!(
                "email: {} is neither on [console] test_recipients nor your own address",
                email.masked()
            )));
        }
        targets.push((Channel::Email, email.to_string()));
    }
    if let Some(phone) = phone {
        if own.phone.as_ref() != Some(&phone)
            && !allowed.contains(&TestRecipient::Phone(phone.to_string()))
        {
            return Err(unprocessable(format!(
                "phone: {} is neither on [console] test_recipients nor your own number",
                phone.masked()
            )));
        }
        targets.push((Channel::Sms, phone.to_string()));
    }
    if targets.is_empty() {
        return Err(unprocessable(
            "say where the test goes (email or phone); you have no address of your own (lifecycle users add --email)".into(),
        ));
    }
    Ok(targets)
}

#[utoipa::path(post, path = "/api/templates/{trigger}/{locale}/publish", tag = "templates",
    params(("trigger" = String, Path), ("locale" = String, Path)),
    request_body = PublishRequest,
    responses((status = 200, description = "Dispatch uses this version from now on (every replica within about a second)", body = Published),
              (status = 401, body = ApiError), (status = 404, body = ApiError),
              (status = 422, body = ApiError)),
    security(("bearer" = []), ("session" = [])))]
/// Publishes a version: a draft, or an earlier one (a rollback; 0 is the shipped files).
pub(crate) async fn publish(
    State(app): State<App>,
    who: Authed,
    Path((name, raw_locale)): Path<(String, String)>,
    Json(body): Json<PublishRequest>,
) -> Result<Json<Published>, ApiError> {
    who.require(Role::Marketer)?;
    let (trigger, locale) = (trigger(&name)?, locale(&raw_locale)?);
    app.templates
        .publish(trigger, &locale, body.version, &who.user.name)
        .await?;
    Ok(Json(Published {
        trigger: trigger.as_str().to_owned(),
        locale,
        version: body.version,
    }))
}
