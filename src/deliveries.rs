//! The outbox as ops read it: messages searched by member, trigger, channel, status, provider,
//! time and test flag (newest first, paged by id); one message with its template version, every
//! attempt and its content as rendered; and each provider's recent health. The API, the
//! console and `lifecycle deliveries` share it.

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::Row;

use crate::app::App;
use crate::domain::{Email, Phone};

pub use crate::outbox::Filter;

/// A message in a list.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Message {
    /// Outbox id.
    pub id: i64,
    /// The member (empty for a test send to a typed address).
    pub member_id: String,
    /// The trigger.
    pub trigger: String,
    /// `email` or `sms`.
    pub channel: String,
    /// Its state.
    pub status: String,
    /// Where it went (masked unless the reader is ops).
    pub recipient: Option<String>,
    /// The provider that took it, or was tried last.
    pub provider: Option<String>,
    /// The provider's reference.
    pub provider_ref: Option<String>,
    /// Why it is not sent (yet).
    pub last_error: Option<String>,
    /// Provider calls so far.
    pub attempts: i32,
    /// A test send.
    pub test: bool,
    /// The template version it was rendered with.
    pub template_version: Option<i32>,
    /// When it was planned.
    pub created_at: DateTime<Utc>,
    /// When it was due (or is).
    pub due_at: DateTime<Utc>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
}

/// One provider call.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Attempt {
    /// The claim's number.
    pub attempt: i32,
    /// The provider (`policy` for a suppression, `unknown` for a lost claim).
    pub provider: String,
    /// `sent`, `transient`, `permanent`, `unsure`, `suppressed`.
    pub outcome: String,
    /// The error, masked.
    pub error: Option<String>,
    /// How long the call took.
    pub latency_ms: i32,
    /// When.
    pub at: DateTime<Utc>,
}

/// A message with its attempts and content.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Detail {
    /// The message.
    #[serde(flatten)]
    pub message: Message,
    /// Every attempt, oldest first.
    pub attempts_made: Vec<Attempt>,
    /// The content as rendered with its template version and context (an email's `subject`,
    /// `html`, `text`; an SMS's `body`), or `error` when it cannot be rendered.
    pub content: Value,
}

/// Masks an address or number for a reader who may not see it.
pub fn mask(channel: &str, to: &str) -> String {
    match channel {
        "email" => Email::parse(to).map_or_else(|_| "***".into(), |e| e.masked()),
        _ => Phone::parse(to).map_or_else(|_| "***".into(), |p| p.masked()),
    }
}

fn message(r: &sqlx::postgres::PgRow, reveal: bool) -> Message {
    let channel: String = r.get("channel");
    let recipient: Option<String> = r.get("recipient");
    Message {
        id: r.get("id"),
        member_id: r.get("member_id"),
        trigger: r.get("trigger"),
        recipient: recipient.map(|to| if reveal { to } else { mask(&channel, &to) }),
        channel,
        status: r.get("status"),
        provider: r.get("provider"),
        provider_ref: r.get("provider_ref"),
        last_error: r.get("last_error"),
        attempts: r.get("attempts"),
        test: r.get("test"),
        template_version: r.get("template_version"),
        created_at: r.get("created_at"),
        due_at: r.get("due_at"),
        finished_at: r.get("finished_at"),
    }
}

const COLUMNS: &str = "id, member_id, trigger, channel, status, recipient, provider, provider_ref,
    last_error, attempts, test, template_version, created_at, due_at, finished_at";

/// Messages matching `filter`, newest first: `limit` of them with an id below `before`.
pub async fn search(
    app: &App,
    filter: &Filter,
    limit: i64,
    before: Option<i64>,
    reveal: bool,
) -> anyhow::Result<Vec<Message>> {
    let sql = format!(
        "select {COLUMNS} from messages
         where {} and ($9::bigint is null or id < $9)
         order by id desc limit $10",
        crate::outbox::FILTERED
    );
    let rows = filter
        .bind(sqlx::query(&sql))
        .bind(before)
        .bind(limit)
        .fetch_all(&app.pool)
        .await
        .context("searching messages")?;
    Ok(rows.iter().map(|r| message(r, reveal)).collect())
}

/// One message, its attempts and its content; `None` when there is no such message.
pub async fn detail(app: &App, id: i64, reveal: bool) -> anyhow::Result<Option<Detail>> {
    let Some(row) = sqlx::query(&format!(
        "select {COLUMNS}, context, coalesce(test_locale, template_locale) as pinned_locale
         from messages where id = $1"
    ))
    .bind(id)
    .fetch_optional(&app.pool)
    .await?
    else {
        return Ok(None);
    };
    let message = message(&row, reveal);
    let attempts = sqlx::query(
        "select attempt, provider, outcome, error, latency_ms, at from delivery_attempts
         where message_id = $1 order by id",
    )
    .bind(id)
    .fetch_all(&app.pool)
    .await?
    .iter()
    .map(|r| Attempt {
        attempt: r.get("attempt"),
        provider: r.get("provider"),
        outcome: r.get("outcome"),
        error: r.get("error"),
        latency_ms: r.get("latency_ms"),
        at: r.get("at"),
    })
    .collect();
    let context: Value = row.get("context");
    let pinned_locale: Option<String> = row.get("pinned_locale");
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
            let member_locale: Option<String> =
                sqlx::query_scalar("select locale from members where member_id = $1")
                    .bind(&m.member_id)
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
    if let Value::Object(map) = &mut context {
        map.insert("shop_name".into(), settings.shop_name.clone().into());
        map.insert("locale".into(), locale.clone().into());
        map.insert(
            "shop_address".into(),
            settings.shop_address.clone().unwrap_or_default().into(),
        );
        for key in [
            "coupon_code",
            "next_tier",
            "points_to_next_tier",
            "next_reward",
            "points_to_next_reward",
        ] {
            map.entry(key).or_insert(Value::Null);
        }
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
pub struct ProviderHealth {
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
pub async fn provider_health(app: &App, minutes: i32) -> anyhow::Result<Vec<ProviderHealth>> {
    let rows = sqlx::query(
        "select provider,
                count(*) filter (where outcome = 'sent') as sent,
                count(*) filter (where outcome in ('transient', 'permanent', 'unsure')) as failed,
                percentile_cont(0.5) within group (order by latency_ms) as p50,
                percentile_cont(0.95) within group (order by latency_ms) as p95
         from delivery_attempts
         where at > now() - make_interval(mins => $1) and provider not in ('policy', 'unknown')
         group by provider",
    )
    .bind(minutes)
    .fetch_all(&app.pool)
    .await
    .context("reading provider health")?;
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
            let row = rows.iter().find(|r| r.get::<String, _>("provider") == name);
            ProviderHealth {
                sent: row.map_or(0, |r| r.get("sent")),
                failed: row.map_or(0, |r| r.get("failed")),
                p50_ms: row.and_then(|r| r.get("p50")),
                p95_ms: row.and_then(|r| r.get("p95")),
                circuit: board
                    .get(&name)
                    .map(|open| if *open { "open" } else { "closed" }.to_owned()),
                rate_limit: app.settings.dispatch.rate_limit.of(&name),
                provider: name,
            }
        })
        .collect())
}
