//! The outbox as ops read it: messages searched by member, trigger, channel, status, provider,
//! time and test flag (newest first, paged by id); one message with its template version, every
//! attempt and its content as rendered; and each provider's recent health. The API, the
//! console and `lifecycle deliveries` share it.

use anyhow::Context;
use serde::Serialize;
use serde_json::Value;

use crate::app::App;
use crate::outbox;

pub(crate) use crate::outbox::search::Filter;
pub(crate) use crate::outbox::search::{Attempt, Message, mask};

/// A message with its attempts and content.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct Detail {
    /// The message.
    #[serde(flatten)]
    pub message: Message,
    /// Every attempt, oldest first.
    pub attempts_made: Vec<Attempt>,
    /// The content as rendered with its template version and context (an email's `subject`,
    /// `html`, `text`; an SMS's `body`), or `error` when it cannot be rendered.
    pub content: Value,
}

/// One message, its attempts and its content; `None` when there is no such message.
pub(crate) async fn detail(app: &App, id: i64, reveal: bool) -> anyhow::Result<Option<Detail>> {
    let Some((message, context, pinned_locale)) = outbox::message(&app.pool, id, reveal).await?
    else {
        return Ok(None);
    };
    let attempts = outbox::attempts_of(&app.pool, id).await?;
    let content = match render(app, &message, context, pinned_locale).await {
        Ok(content) => content,
        Err(e) => serde_json::json!({"error": format!("{e:#}")}),
    };
    Ok(Some(Detail {
        message,
        attempts_made: attempts,
        content,
    }))
}

/// Messages matching `filter`, newest first: `limit` of them with an id below `before`.
pub(crate) async fn search(
    app: &App,
    filter: &Filter,
    limit: i64,
    before: Option<i64>,
    reveal: bool,
) -> anyhow::Result<Vec<Message>> {
    outbox::search(&app.pool, filter, limit, before, reveal).await
}

/// Renders a stored message as it was (or will be) sent: its version (of the locale it was
/// rendered in), its context.
async fn render(
    app: &App,
    m: &Message,
    mut context: Value,
    pinned_locale: Option<String>,
) -> anyhow::Result<Value> {
    let trigger = crate::domain::Trigger::parse(&m.trigger).context("unknown trigger")?;
    let catalog = app.templates.current();
    let locale = match pinned_locale.filter(|_| m.template_version.is_some() || m.test) {
        Some(l) => l,
        None => {
            let member_locale: Option<String> = sqlx::query_scalar!(
                "select locale from members where member_id = $1",
                m.member_id.as_str()
            )
            .fetch_optional(&app.pool)
            .await?;
            let asked = crate::domain::Locale::parse(member_locale.as_deref().unwrap_or("en"))?;
            catalog.templates.resolve_locale(trigger, &asked).to_owned()
        }
    };
    let version = m
        .template_version
        .unwrap_or_else(|| catalog.version(trigger, &locale));
    let templates = app
        .templates
        .templates_of_for_request(trigger, &locale, version)
        .await?;
    let settings = &app.settings;
    crate::render::add_shop_variables(&mut context, settings, &locale);
    if let Value::Object(map) = &mut context {
        map.insert(
            "unsubscribe_url".into(),
            format!(
                "{}/unsubscribe/…",
                settings.public_url.as_str().trim_end_matches('/')
            )
            .into(),
        );
    }
    // Rendered off the async workers, within the render budget, as every render is.
    let email = m.channel == "email";
    app.templates
        .for_request(move |_| {
            if email {
                let email = templates.render_email(trigger, &locale, &context)?;
                Ok(serde_json::json!({"subject": email.subject, "html": email.html, "text": email.text}))
            } else {
                let body = templates.render_sms(trigger, &locale, &context)?;
                Ok(serde_json::json!({"body": body}))
            }
        })
        .await?
}

/// A provider's recent record.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct ProviderHealth {
    /// The provider.
    pub provider: String,
    /// Calls in the window that it took.
    pub sent: i64,
    /// Calls in the window that failed (transient, permanent or unsure).
    pub failed: i64,
    /// Median latency in the window, ms.
    pub p50_ms: Option<f64>,
    /// 95th percentile latency in the window, ms.
    pub p95_ms: Option<f64>,
    /// Its circuit breaker, as this process's dispatcher last saw it (`open`, `closed`, or
    /// null when this process does not dispatch).
    pub circuit: Option<String>,
    /// Its rate limit, messages per second, if configured.
    pub rate_limit: Option<f64>,
}

/// Each configured provider's record over the last `minutes`.
pub(crate) async fn provider_health(
    app: &App,
    minutes: i32,
) -> anyhow::Result<Vec<ProviderHealth>> {
    let rows = outbox::provider_calls(&app.pool, minutes).await?;
    // The kinds' names are the providers' (Smtp: smtp …).
    let mut names: Vec<String> = app
        .settings
        .email_providers
        .iter()
        .map(|p| format!("{p:?}").to_lowercase())
        .chain(
            app.settings
                .sms_providers
                .iter()
                .map(|p| format!("{p:?}").to_lowercase()),
        )
        .collect();
    names.sort();
    names.dedup();
    let board = app.health.circuits.lock().expect("circuits lock").clone();
    Ok(names
        .into_iter()
        .map(|name| {
            let row = rows.iter().find(|r| r.provider == name);
            ProviderHealth {
                sent: row.map_or(0, |r| r.sent),
                failed: row.map_or(0, |r| r.failed),
                p50_ms: row.and_then(|r| r.p50),
                p95_ms: row.and_then(|r| r.p95),
                circuit: board
                    .get(&name)
                    .map(|open| if *open { "open" } else { "closed" }.to_owned()),
                rate_limit: app.settings.dispatch.rate_limit.of(&name),
                provider: name,
            }
        })
        .collect())
}
