//! Dead letters ops can act on: a consumer moves every message of the dead-letter queue into
//! PostgreSQL (acked after commit), those lifecycle refused (`x-lifecycle-error`) and those the
//! broker dead-lettered itself (over `x-delivery-limit`: the reason comes from `x-death`).
//! Ops list and search them, replay them (republished to the exchange with a fresh retry
//! count; the inbox makes a replay of an applied event a no-op) and archive them.

use std::time::Duration;

use anyhow::{Context, anyhow};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde::Serialize;
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::amqp::ERROR_HEADER;
use crate::app::App;
use crate::publish::Publisher;
use crate::shutdown::Shutdown;

/// Dead letters moved per transaction.
const BATCH: usize = 100;

/// One dead letter.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct DeadLetter {
    /// Its id here.
    pub id: i64,
    /// The event's id, when the body had one.
    pub event_id: Option<String>,
    /// The event's type, when the body had one.
    #[serde(rename = "type")]
    pub event_type: Option<String>,
    /// The routing key it was published with.
    pub routing_key: String,
    /// Why it was dead-lettered.
    pub reason: String,
    /// When it reached the dead-letter queue's store.
    pub dead_lettered_at: DateTime<Utc>,
    /// The body as it came (UTF-8, lossy for a body that is not).
    pub body: String,
    /// The AMQP headers, as JSON.
    pub headers: Value,
    /// Times replayed.
    pub replays: i32,
    /// The last replay: when and by whom.
    pub replayed_at: Option<DateTime<Utc>>,
    /// Who replayed it last.
    pub replayed_by: Option<String>,
    /// When it was archived (archived ones are listed only when asked).
    pub archived_at: Option<DateTime<Utc>>,
}

/// Which dead letters.
#[derive(Debug, Clone, Default, serde::Deserialize, utoipa::ToSchema, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub(crate) struct Filter {
    /// Reason contains this (case-insensitive).
    pub reason: Option<String>,
    /// Event type.
    #[serde(rename = "type")]
    pub event_type: Option<String>,
    /// Dead-lettered at or after.
    pub since: Option<DateTime<Utc>>,
    /// Dead-lettered before.
    pub until: Option<DateTime<Utc>>,
    /// Archived ones too.
    #[serde(default)]
    pub archived: bool,
}

/// Moves the dead-letter queue into PostgreSQL until shutdown, reconnecting after a failure.
pub(crate) async fn store(app: App, shutdown: Shutdown) -> anyhow::Result<()> {
    let mut backoff =
        crate::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    while !shutdown.is_triggered() {
        // A session waiting on the broker (connecting, declaring) must not hold up shutdown:
        // it is dropped, and the broker requeues whatever it had delivered and not been acked.
        let ended = tokio::select! {
            ended = session(&app, &shutdown) => ended,
            _ = shutdown.triggered() => Ok(()),
        };
        match ended {
            Ok(()) => backoff.reset(),
            Err(error) => {
                warn!(
                    error = format!("{error:#}"),
                    "Dead-letter store session ended; reconnecting."
                );
                metrics::counter!("lifecycle_reconnects_total", "component" => "dead_letters")
                    .increment(1);
                shutdown.sleep(backoff.next()).await;
            }
        }
    }
    Ok(())
}

async fn session(app: &App, shutdown: &Shutdown) -> anyhow::Result<()> {
    let connection = crate::amqp::connect(&app.settings.amqp_url, "lifecycle-dead-letters").await?;
    crate::amqp::declare_topology(&connection, &app.settings).await?;
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(BATCH as u16, BasicQosOptions::default())
        .await?;
    let queue = &app.settings.ingest.dead_letter_queue;
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            format!("lifecycle-dead-{}", std::process::id())
                .as_str()
                .into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("consuming from {queue}"))?;
    loop {
        let first = tokio::select! {
            _ = shutdown.triggered() => break,
            next = consumer.next() => next,
        };
        let mut batch = match first {
            None => return Err(anyhow!("the broker cancelled the dead-letter consumer")),
            Some(delivery) => vec![delivery?],
        };
        while batch.len() < BATCH {
            match futures_util::FutureExt::now_or_never(consumer.next()) {
                Some(Some(Ok(delivery))) => batch.push(delivery),
                Some(Some(Err(e))) => return Err(e.into()),
                _ => break,
            }
        }
        save(app, &batch).await?;
        let last = batch.last().expect("non-empty");
        // Acked only after the commit: a crash in between stores a letter twice at worst.
        channel
            .basic_ack(last.delivery_tag, BasicAckOptions { multiple: true })
            .await?;
        info!(n = batch.len(), "Dead letters stored.");
    }
    crate::amqp::bounded(connection.close(200, "bye".into())).await;
    Ok(())
}

/// One dead letter as it is stored: every text without NUL (PostgreSQL's `text` and `jsonb`
/// refuse it, and a publisher's bytes may hold one).
struct Letter {
    id: Option<String>,
    kind: Option<String>,
    key: String,
    reason: String,
    headers: String,
}

impl Letter {
    fn of(delivery: &Delivery) -> Letter {
        let table = delivery.properties.headers().clone().unwrap_or_default();
        let (id, kind) = identity(&delivery.data);
        Letter {
            id,
            kind,
            key: storable(delivery.routing_key.as_str()),
            // Masked again here: a letter refused by an older release may quote an address.
            reason: storable(&crate::mask::text(&reason(&table))),
            headers: table_json(&table).to_string(),
        }
    }

    /// The same letter without what the database refused of it: its headers, and its id and
    /// type (the body, kept as bytes, still holds them).
    fn bare(self, refusal: &anyhow::Error) -> Letter {
        Letter {
            id: None,
            kind: None,
            headers: "{}".to_owned(),
            reason: format!(
                "{} (stored without its headers: {})",
                self.reason,
                crate::mask::clean(&format!("{refusal:#}"), 300)
            ),
            ..self
        }
    }
}

/// Stores a batch of dead letters in one transaction. When the database refuses the batch for
/// its data, each letter is stored alone, and one it still refuses is stored bare: a letter
/// the database cannot take as it came must not hold up the queue behind it.
async fn save(app: &App, batch: &[Delivery]) -> anyhow::Result<()> {
    let rows: Vec<Letter> = batch.iter().map(Letter::of).collect();
    let bodies: Vec<&[u8]> = batch.iter().map(|d| d.data.as_slice()).collect();
    let error = match insert(app, &rows, &bodies).await {
        Err(error) if !crate::db::is_transient_error(&error) => error,
        done => return done,
    };
    warn!(error = %format!("{error:#}"), n = rows.len(), "Dead letters stored one at a time.");
    for (row, body) in rows.into_iter().zip(bodies) {
        match insert(app, std::slice::from_ref(&row), &[body]).await {
            Err(error) if !crate::db::is_transient_error(&error) => {
                warn!(error = %format!("{error:#}"), "A dead letter is stored without its headers.");
                insert(app, &[row.bare(&error)], &[body]).await?;
            }
            done => done?,
        }
    }
    Ok(())
}

async fn insert(app: &App, rows: &[Letter], bodies: &[&[u8]]) -> anyhow::Result<()> {
    let column = |f: fn(&Letter) -> Option<&str>| rows.iter().map(f).collect::<Vec<_>>();
    let ids = column(|r| r.id.as_deref());
    let kinds = column(|r| r.kind.as_deref());
    let keys = column(|r| Some(&r.key));
    let reasons = column(|r| Some(&r.reason));
    let headers = column(|r| Some(&r.headers));
    sqlx::query!(
        "insert into dead_letters (event_id, event_type, routing_key, reason, headers, body)
         select i, t, k, r, h::jsonb, b
         from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bytea[])
              as d(i, t, k, r, h, b)",
        &ids as &[Option<&str>],
        &kinds as &[Option<&str>],
        &keys as &[Option<&str>],
        &reasons as &[Option<&str>],
        &headers as &[Option<&str>],
        bodies as &[&[u8]],
    )
    .execute(&app.pool)
    .await
    .context("storing dead letters")?;
    Ok(())
}

/// `text` without NUL characters.
fn storable(text: &str) -> String {
    text.replace('\0', "")
}

/// The event id and type of a body, when it is JSON that has them.
fn identity(body: &[u8]) -> (Option<String>, Option<String>) {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return (None, None);
    };
    let text = |k: &str| {
        value
            .get(k)
            .and_then(Value::as_str)
            .map(|s| s.chars().filter(|c| *c != '\0').take(200).collect())
    };
    (text("id"), text("type"))
}

/// Why a message was dead-lettered: lifecycle's header, else the broker's `x-death`.
fn reason(headers: &FieldTable) -> String {
    let inner = headers.inner();
    if let Some(AMQPValue::LongString(reason)) = inner.get(ERROR_HEADER) {
        return String::from_utf8_lossy(reason.as_bytes()).into_owned();
    }
    if let Some(AMQPValue::FieldArray(deaths)) = inner.get("x-death")
        && let Some(AMQPValue::FieldTable(death)) = deaths.as_slice().first()
    {
        let field = |k: &str| match death.inner().get(k) {
            Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
            Some(AMQPValue::ShortString(s)) => s.as_str().to_owned(),
            _ => String::new(),
        };
        let why = match field("reason").as_str() {
            "delivery_limit" => "delivered too many times (x-delivery-limit)".to_owned(),
            "expired" => "expired in the queue".to_owned(),
            "rejected" => "rejected by a consumer".to_owned(),
            "maxlen" => "the queue was full".to_owned(),
            other => format!("dead-lettered by the broker ({other})"),
        };
        return format!("{why} on queue {}", field("queue"));
    }
    "dead-lettered without a reason".to_owned()
}

/// How deep stored headers nest; deeper tables and arrays are stored as a note. A publisher
/// may nest them thousands deep, and turning them into JSON, writing it and dropping it each
/// recurse once a level.
const HEADER_DEPTH: usize = 16;

/// AMQP headers as JSON (strings, numbers, booleans, arrays, tables; bytes as lossy text),
/// nested at most `HEADER_DEPTH` deep.
fn table_json(table: &FieldTable) -> Value {
    table_json_at(table, 0)
}

fn table_json_at(table: &FieldTable, depth: usize) -> Value {
    if depth == HEADER_DEPTH {
        return json!(format!("(nested deeper than {HEADER_DEPTH})"));
    }
    Value::Object(
        table
            .inner()
            .iter()
            .map(|(k, v)| (storable(k.as_str()), value_json(v, depth + 1)))
            .collect(),
    )
}

fn value_json(value: &AMQPValue, depth: usize) -> Value {
    match value {
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::ShortShortInt(n) => json!(n),
        AMQPValue::ShortShortUInt(n) => json!(n),
        AMQPValue::ShortInt(n) => json!(n),
        AMQPValue::ShortUInt(n) => json!(n),
        AMQPValue::LongInt(n) => json!(n),
        AMQPValue::LongUInt(n) => json!(n),
        AMQPValue::LongLongInt(n) => json!(n),
        AMQPValue::Float(n) => json!(n),
        AMQPValue::Double(n) => json!(n),
        AMQPValue::Timestamp(t) => json!(t),
        AMQPValue::ShortString(s) => json!(storable(s.as_str())),
        AMQPValue::LongString(s) => json!(storable(&String::from_utf8_lossy(s.as_bytes()))),
        AMQPValue::ByteArray(b) => json!(storable(&String::from_utf8_lossy(b.as_slice()))),
        AMQPValue::FieldArray(_) if depth == HEADER_DEPTH => {
            json!(format!("(nested deeper than {HEADER_DEPTH})"))
        }
        AMQPValue::FieldArray(items) => Value::Array(
            items
                .as_slice()
                .iter()
                .map(|v| value_json(v, depth + 1))
                .collect(),
        ),
        AMQPValue::FieldTable(t) => table_json_at(t, depth),
        AMQPValue::DecimalValue(_) | AMQPValue::Void => Value::Null,
    }
}

/// Dead letters matching `filter`, newest first, `limit` from before id `before`.
pub(crate) async fn list(
    app: &App,
    filter: &Filter,
    limit: i64,
    before: Option<i64>,
) -> anyhow::Result<Vec<DeadLetter>> {
    let rows = sqlx::query!(
        "select id, event_id, event_type, routing_key, reason, dead_lettered_at, body, headers,
                replays, replayed_at, replayed_by, archived_at
         from dead_letters
         where ($1::text is null or reason ilike '%' || $1 || '%')
           and ($2::text is null or event_type = $2)
           and ($3::timestamptz is null or dead_lettered_at >= $3)
           and ($4::timestamptz is null or dead_lettered_at < $4)
           and ($5 or archived_at is null)
           and ($6::bigint is null or id < $6)
         order by id desc limit $7",
        filter.reason.as_deref(),
        filter.event_type.as_deref(),
        filter.since,
        filter.until,
        filter.archived,
        before,
        limit,
    )
    .fetch_all(&app.pool)
    .await
    .context("listing dead letters")?;
    Ok(rows
        .into_iter()
        .map(|r| DeadLetter {
            id: r.id,
            event_id: r.event_id,
            event_type: r.event_type,
            routing_key: r.routing_key,
            reason: r.reason,
            dead_lettered_at: r.dead_lettered_at,
            body: String::from_utf8_lossy(&r.body).into_owned(),
            headers: r.headers,
            replays: r.replays,
            replayed_at: r.replayed_at,
            replayed_by: r.replayed_by,
            archived_at: r.archived_at,
        })
        .collect())
}

/// Which dead letters to act on: these ids, or every one matching a filter.
pub(crate) enum Selection<'a> {
    /// By id (replayed even when replayed before).
    Ids(&'a [i64]),
    /// Every unarchived one matching; a replay takes only those never replayed.
    Matching(&'a Filter),
    /// Every unarchived one matching, those replayed before too (`--again`).
    Again(&'a Filter),
}

/// Dead letters replayed per page: a replay of a million letters holds a page in memory and
/// marks each page replayed as soon as the broker confirmed it.
const REPLAY_PAGE: i64 = 500;

/// Republishes dead letters to the exchange as the platform publishes events (routing key:
/// the event's type; the stored routing key for a body without one), their bodies as they
/// came and without their headers (so with a fresh retry count and no dead-lettering
/// history), a page at a time, and records who replayed them. A selection by filter (`--all`)
/// skips letters replayed before: a second replay needs their ids, or `Again`. Either way an
/// event the inbox has seen is not applied again (retention keeps the inbox rows of
/// dead-lettered events). Returns how many were republished.
pub(crate) async fn replay(app: &App, selection: Selection<'_>, by: &str) -> anyhow::Result<u64> {
    let (ids, filter, again) = match selection {
        Selection::Ids(ids) => (Some(ids), Filter::default(), true),
        Selection::Matching(filter) => (None, filter.clone(), false),
        Selection::Again(filter) => (None, filter.clone(), true),
    };
    if ids.is_some_and(<[i64]>::is_empty) {
        return Ok(0);
    }
    let mut connection = None;
    let mut publisher = None;
    let mut after = 0_i64;
    let mut replayed_total = 0_u64;
    loop {
        let rows = sqlx::query_as!(
            Replayed,
            r#"select id, coalesce(event_type, routing_key) as "routing_key!", body
               from dead_letters
               where ($1::bigint[] is null or id = any($1))
                 and ($2::text is null or reason ilike '%' || $2 || '%')
                 and ($3::text is null or event_type = $3)
                 and ($4::timestamptz is null or dead_lettered_at >= $4)
                 and ($5::timestamptz is null or dead_lettered_at < $5)
                 and ($1::bigint[] is not null or $6 or archived_at is null)
                 and ($7 or replays = 0)
                 and id > $8
               order by id limit $9"#,
            ids,
            filter.reason.as_deref(),
            filter.event_type.as_deref(),
            filter.since,
            filter.until,
            filter.archived,
            again,
            after,
            REPLAY_PAGE,
        )
        .fetch_all(&app.pool)
        .await
        .context("reading dead letters to replay")?;
        if rows.is_empty() {
            break;
        }
        if publisher.is_none() {
            let opened = crate::amqp::connect(&app.settings.amqp_url, "lifecycle-replay").await?;
            publisher = Some(Publisher::open(&opened).await?);
            connection = Some(opened);
        }
        let channel = publisher.as_ref().expect("opened above");
        let replayed = publish_page(channel, &app.settings.exchange, &rows).await?;
        sqlx::query!(
            "update dead_letters set replays = replays + 1, replayed_at = now(), replayed_by = $2
             where id = any($1)",
            &replayed,
            by
        )
        .execute(&app.pool)
        .await?;
        replayed_total += replayed.len() as u64;
        after = *replayed.last().expect("a page of rows");
        if (rows.len() as i64) < REPLAY_PAGE {
            break;
        }
    }
    if let Some(publisher) = publisher {
        publisher.close().await;
    }
    if let Some(connection) = connection {
        crate::amqp::bounded(connection.close(200, "bye".into())).await;
    }
    if replayed_total > 0 {
        info!(n = replayed_total, by, "Dead letters replayed.");
    }
    Ok(replayed_total)
}

/// A dead letter as it is replayed.
struct Replayed {
    id: i64,
    /// The event's type, or the stored routing key for a body without one.
    routing_key: String,
    body: Vec<u8>,
}

/// Publishes a page of letters to `exchange`, then awaits their confirms: one round trip a
/// page. Returns their ids, once the broker has them all.
async fn publish_page(
    channel: &Publisher,
    exchange: &str,
    letters: &[Replayed],
) -> anyhow::Result<Vec<i64>> {
    let mut confirms = Vec::with_capacity(letters.len());
    for letter in letters {
        let properties = lapin::BasicProperties::default()
            .with_content_type("application/cloudevents+json".into());
        let confirm = channel
            .publish_raw(
                exchange,
                &letter.routing_key,
                &letter.body,
                &properties,
                FieldTable::default(),
            )
            .await;
        confirms.push((letter.id, confirm));
    }
    let mut replayed = Vec::with_capacity(letters.len());
    for (id, confirm) in confirms {
        Publisher::confirmed(confirm)
            .await
            .with_context(|| format!("replaying dead letter {id}"))?;
        replayed.push(id);
    }
    Ok(replayed)
}

/// Dead letters archived per statement: archiving a million holds no list of them, and
/// each statement is short.
const ARCHIVE_PAGE: i64 = 10_000;

/// Archives dead letters (they leave the default list), a page at a time. Returns how many.
pub(crate) async fn archive(app: &App, selection: Selection<'_>, by: &str) -> anyhow::Result<u64> {
    let (ids, filter) = match selection {
        Selection::Ids(ids) => (Some(ids), Filter::default()),
        Selection::Matching(filter) | Selection::Again(filter) => (None, filter.clone()),
    };
    let mut archived = 0;
    loop {
        let done = sqlx::query!(
            "update dead_letters set archived_at = now(), archived_by = $7
             where id in (
               select id from dead_letters
               where archived_at is null
                 and ($1::bigint[] is null or id = any($1))
                 and ($2::text is null or reason ilike '%' || $2 || '%')
                 and ($3::text is null or event_type = $3)
                 and ($4::timestamptz is null or dead_lettered_at >= $4)
                 and ($5::timestamptz is null or dead_lettered_at < $5)
               order by id limit $6)",
            ids,
            filter.reason.as_deref(),
            filter.event_type.as_deref(),
            filter.since,
            filter.until,
            ARCHIVE_PAGE,
            by
        )
        .execute(&app.pool)
        .await
        .context("archiving dead letters")?;
        archived += done.rows_affected();
        if done.rows_affected() < ARCHIVE_PAGE as u64 {
            return Ok(archived);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{FieldArray, LongString, ShortString};

    #[test]
    fn the_reason_is_lifecycles_or_else_the_brokers_x_death() {
        let mut ours = FieldTable::default();
        ours.insert(
            ShortString::from(ERROR_HEADER),
            AMQPValue::LongString(LongString::from("not JSON")),
        );
        assert_eq!(reason(&ours), "not JSON");

        let mut death = FieldTable::default();
        death.insert(
            "reason".into(),
            AMQPValue::LongString("delivery_limit".into()),
        );
        death.insert(
            "queue".into(),
            AMQPValue::LongString("lifecycle.events".into()),
        );
        death.insert("count".into(), AMQPValue::LongLongInt(1));
        let mut brokers = FieldTable::default();
        brokers.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        );
        assert_eq!(
            reason(&brokers),
            "delivered too many times (x-delivery-limit) on queue lifecycle.events"
        );
        let headers = table_json(&brokers);
        assert_eq!(headers["x-death"][0]["count"], 1);
        assert_eq!(
            reason(&FieldTable::default()),
            "dead-lettered without a reason"
        );
    }

    #[test]
    fn identity_comes_from_a_json_body_only() {
        assert_eq!(
            identity(br#"{"id": "e1", "type": "order.placed"}"#),
            (Some("e1".into()), Some("order.placed".into()))
        );
        assert_eq!(identity(b"{not json"), (None, None));
    }
}
