//! Notifications: the events lifecycle tells the platform of (DESIGN.md, "Notifications"),
//! kept in `notifications`, a transactional outbox this module owns.
//!
//! A change writes its notices in its own transaction (`record`), so a notice exists exactly
//! when its change committed. The notifier (`crate::notifier`) then publishes them in id
//! order and marks them published after the broker's confirm, and POSTs them when a URL is
//! set. A notice never carries an address or a phone number.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool};

use crate::config::Settings;
use crate::domain::Channel;

/// How a member's subscription to a channel changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum How {
    /// The unsubscribe link of a message (RFC 8058 one-click, or the page's button).
    OneClick,
    /// An SMS STOP.
    Stop,
    /// An SMS START.
    Start,
    /// The receiving server refused the address for good.
    HardBounce,
    /// A spam report.
    Complaint,
    /// Ops lifted a suppression.
    Ops,
}

impl How {
    fn as_str(self) -> &'static str {
        match self {
            How::OneClick => "one_click",
            How::Stop => "stop",
            How::Start => "start",
            How::HardBounce => "hard_bounce",
            How::Complaint => "complaint",
            How::Ops => "ops",
        }
    }
}

/// One notification to record: its type (the routing key) and data.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Notice {
    /// The CloudEvents `type`.
    pub kind: &'static str,
    /// The member it is about.
    pub member_id: String,
    /// The CloudEvents `data`, `member_id` included.
    pub data: Value,
}

impl Notice {
    fn new(kind: &'static str, member_id: &str, mut data: Value) -> Notice {
        data["member_id"] = member_id.into();
        Notice {
            kind,
            member_id: member_id.to_owned(),
            data,
        }
    }

    /// What became of a message, when it is settled: `message.sent`, `message.failed` or
    /// `message.suppressed`; `None` for any other status. `reason` is masked here.
    pub(crate) fn message(m: &MessageOutcome<'_>) -> Option<Notice> {
        let kind = match m.status {
            "sent" => "message.sent",
            "failed" => "message.failed",
            "suppressed" => "message.suppressed",
            _ => return None,
        };
        let data = json!({
            "message_id": m.message_id,
            "trigger": m.trigger,
            "channel": m.channel,
            "provider": m.provider,
            "reason": m.reason.map(crate::mask::text),
            "test": m.test,
        });
        Some(Notice::new(kind, m.member_id, data))
    }

    /// `member.unsubscribed` (or `member.resubscribed` when `subscribed`).
    pub(crate) fn subscription(
        member_id: &str,
        channel: Channel,
        how: How,
        subscribed: bool,
    ) -> Notice {
        let kind = match subscribed {
            true => "member.resubscribed",
            false => "member.unsubscribed",
        };
        let data = json!({"channel": channel.as_str(), "how": how.as_str()});
        Notice::new(kind, member_id, data)
    }

    /// `points.expired`: `points` lapsed, leaving `balance`.
    pub(crate) fn expired(member_id: &str, points: i64, balance: i64) -> Notice {
        Notice::new(
            "points.expired",
            member_id,
            json!({"points": points, "balance": balance}),
        )
    }

    /// `points.balance_changed`: the balance is now `balance`, because of `caused_by` (an
    /// event id, or `scan:<name>`).
    pub(crate) fn balance_changed(member_id: &str, balance: i64, caused_by: &str) -> Notice {
        Notice::new(
            "points.balance_changed",
            member_id,
            json!({"balance": balance, "caused_by": caused_by}),
        )
    }

    /// `tier.changed`, by the tiers' names.
    pub(crate) fn tier_changed(member_id: &str, from: &str, to: &str) -> Notice {
        Notice::new("tier.changed", member_id, json!({"from": from, "to": to}))
    }
}

/// A settled message, as a notice tells of it.
pub(crate) struct MessageOutcome<'a> {
    pub message_id: i64,
    pub member_id: &'a str,
    pub status: &'a str,
    pub trigger: &'a str,
    pub channel: &'a str,
    pub provider: Option<&'a str>,
    pub reason: Option<&'a str>,
    pub test: bool,
}

/// Where notifications go: the exchange, a URL, both or neither (then nothing is recorded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sinks {
    /// Published to `notifications_exchange`.
    pub amqp: bool,
    /// POSTed to `notify_url`.
    pub http: bool,
}

impl Sinks {
    /// The sinks `settings` turn on.
    pub fn of(settings: &Settings) -> Sinks {
        Sinks {
            amqp: !settings.notifications_exchange.is_empty(),
            http: settings.notify_url.is_some(),
        }
    }

    /// Whether notifications go anywhere.
    pub(crate) fn any(self) -> bool {
        self.amqp || self.http
    }
}

/// Records `notices` in the caller's transaction, in their order (ids follow it).
pub(crate) async fn record(
    conn: &mut PgConnection,
    sinks: Sinks,
    notices: &[Notice],
) -> Result<(), sqlx::Error> {
    if notices.is_empty() || !sinks.any() {
        return Ok(());
    }
    let kinds: Vec<&str> = notices.iter().map(|n| n.kind).collect();
    let members: Vec<&str> = notices.iter().map(|n| n.member_id.as_str()).collect();
    let data: Vec<String> = notices.iter().map(|n| n.data.to_string()).collect();
    sqlx::query!(
        "insert into notifications (type, member_id, data, amqp_pending, http_state, http_next_at)
         select r.type, r.member_id, r.data, $4,
                case when $5 then 'pending' end, case when $5 then now() end
         from unnest($1::text[], $2::text[], $3::text[]) with ordinality
              as r(type, member_id, data, n)
         order by r.n",
        &kinds as &[&str],
        &members as &[&str],
        &data,
        sinks.amqp,
        sinks.http,
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// A recorded notification, as it leaves.
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    pub id: i64,
    pub kind: String,
    pub member_id: String,
    /// The data, JSON text as recorded.
    pub data: String,
    pub at: DateTime<Utc>,
    /// POSTs tried so far.
    pub attempts: i32,
}

/// The CloudEvents `id` of notification `id`.
fn event_id(id: i64) -> String {
    format!("ntf-{id}")
}

/// The CloudEvent of a notification, as published and POSTed.
#[derive(Serialize)]
struct CloudEvent<'a> {
    specversion: &'static str,
    id: String,
    source: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    subject: &'a str,
    time: String,
    datacontenttype: &'static str,
    data: &'a serde_json::value::RawValue,
}

impl Stored {
    /// The CloudEvents `id`: stable, so a consumer can drop a second copy.
    pub(crate) fn event_id(&self) -> String {
        event_id(self.id)
    }

    /// The CloudEvent's JSON; the same bytes every time it is sent.
    pub(crate) fn body(&self, source: &str) -> Vec<u8> {
        let data: &serde_json::value::RawValue =
            serde_json::from_str(&self.data).expect("recorded data is JSON");
        serde_json::to_vec(&CloudEvent {
            specversion: "1.0",
            id: self.event_id(),
            source,
            kind: &self.kind,
            subject: &self.member_id,
            time: self.at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            datacontenttype: "application/json",
            data,
        })
        .expect("a notification serializes")
    }
}

/// The oldest notifications not yet published, in id order.
pub(crate) async fn unpublished(pool: &PgPool, limit: i64) -> Result<Vec<Stored>, sqlx::Error> {
    sqlx::query_as!(
        Stored,
        r#"select id, type as kind, member_id, data, at, http_attempts as attempts
           from notifications where amqp_pending order by id limit $1"#,
        limit
    )
    .fetch_all(pool)
    .await
}

/// Marks notifications published (the broker confirmed them).
pub(crate) async fn published(pool: &PgPool, ids: &[i64]) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "update notifications set amqp_pending = false, published_at = now() where id = any($1)",
        ids
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Stops waiting to send notifications one way when that way is now off (the exchange set
/// empty, or the URL unset since they were recorded): they would wait forever, and keep the
/// backlog gauges and their alert up. Returns how many were let go.
pub(crate) async fn forget_unsendable(pool: &PgPool, sinks: Sinks) -> Result<u64, sqlx::Error> {
    let mut forgotten = 0;
    if !sinks.amqp {
        forgotten +=
            sqlx::query!("update notifications set amqp_pending = false where amqp_pending")
                .execute(pool)
                .await?
                .rows_affected();
    }
    if !sinks.http {
        forgotten += sqlx::query!(
            "update notifications set http_state = null, http_next_at = null
             where http_state = 'pending'"
        )
        .execute(pool)
        .await?
        .rows_affected();
    }
    Ok(forgotten)
}

/// Notifications whose POST is due, in id order, each only when no earlier one of its member
/// still waits: a member's notifications are POSTed in the order of their changes, a failed
/// one holding back the member's later ones until it is delivered or dead.
pub(crate) async fn due_posts(pool: &PgPool, limit: i64) -> Result<Vec<Stored>, sqlx::Error> {
    sqlx::query_as!(
        Stored,
        r#"select n.id, n.type as kind, n.member_id, n.data, n.at, n.http_attempts as attempts
           from notifications n
           where n.http_state = 'pending' and n.http_next_at <= now()
             and not exists (select 1 from notifications e
                             where e.http_state = 'pending' and e.member_id = n.member_id
                               and e.id < n.id)
           order by n.id limit $1"#,
        limit
    )
    .fetch_all(pool)
    .await
}

/// Records a POST's outcome: delivered (`error` is `None`), or failed and tried again after
/// `retry_ms`, or dead when the notification is older than `dead_after_hours`. Returns true
/// when it is dead.
pub(crate) async fn posted(
    pool: &PgPool,
    id: i64,
    error: Option<&str>,
    retry_ms: i64,
    dead_after_hours: i32,
) -> Result<bool, sqlx::Error> {
    let state = sqlx::query_scalar!(
        r#"update notifications set
               http_attempts = http_attempts + 1,
               http_error = $2,
               http_state = case
                   when $2::text is null then 'delivered'
                   when at + make_interval(hours => $4) <= now() then 'dead'
                   else 'pending' end,
               http_next_at = case when $2::text is null then null
                                   else now() + make_interval(secs => $3::bigint / 1000.0) end,
               http_done_at = case when $2::text is null
                                     or at + make_interval(hours => $4) <= now()
                                   then now() end
           where id = $1
           returning http_state as "state!""#,
        id,
        error,
        retry_ms,
        dead_after_hours,
    )
    .fetch_one(pool)
    .await?;
    Ok(state == "dead")
}

/// What is waiting to leave, for the gauges and `GET /api/queues`.
#[derive(Debug, Clone, Copy, Default, Serialize, utoipa::ToSchema)]
pub struct Backlog {
    /// Not yet published to the exchange.
    pub unpublished: i64,
    /// Seconds the oldest of those has waited (0 when none).
    pub oldest_unpublished_seconds: f64,
    /// Waiting for a successful POST.
    pub posts_pending: i64,
    /// Seconds the oldest of those has waited (0 when none).
    pub oldest_post_seconds: f64,
    /// Given up on after `notifications.dead_after_hours` of failed POSTs.
    pub posts_dead: i64,
}

/// Counts what is waiting (the partial indexes keep this cheap).
pub(crate) async fn backlog(pool: &PgPool) -> Result<Backlog, sqlx::Error> {
    let row = sqlx::query!(
        r#"select
             (select count(*) from notifications where amqp_pending) as "unpublished!",
             (select coalesce(extract(epoch from now() - min(at)), 0)::float8
                from notifications where amqp_pending) as "oldest_unpublished!",
             (select count(*) from notifications where http_state = 'pending') as "posts!",
             (select coalesce(extract(epoch from now() - min(at)), 0)::float8
                from notifications where http_state = 'pending') as "oldest_post!",
             (select count(*) from notifications where http_state = 'dead') as "dead!""#
    )
    .fetch_one(pool)
    .await?;
    Ok(Backlog {
        unpublished: row.unpublished,
        oldest_unpublished_seconds: row.oldest_unpublished,
        posts_pending: row.posts,
        oldest_post_seconds: row.oldest_post,
        posts_dead: row.dead,
    })
}

/// A notification whose POSTs were given up on, for ops.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct DeadPost {
    /// The CloudEvents id (`ntf-…`).
    pub id: String,
    /// Its type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Whom it is about.
    pub member_id: String,
    /// When it was recorded.
    pub at: DateTime<Utc>,
    /// POSTs tried.
    pub attempts: i32,
    /// The last failure.
    pub error: Option<String>,
}

/// The newest dead POSTs.
pub(crate) async fn dead_posts(pool: &PgPool, limit: i64) -> Result<Vec<DeadPost>, sqlx::Error> {
    let rows = sqlx::query!(
        "select id, type, member_id, at, http_attempts, http_error from notifications
         where http_state = 'dead' order by id desc limit $1",
        limit
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| DeadPost {
            id: event_id(r.id),
            kind: r.r#type,
            member_id: r.member_id,
            at: r.at,
            attempts: r.http_attempts,
            error: r.http_error,
        })
        .collect())
}

/// Deletes one page of notifications older than `days` that have left every way they go;
/// returns how many. Oldest first, by id: the old rows are the first the primary key finds, so
/// no index on `at` is kept up on every insert for an hourly prune.
pub(crate) async fn prune(pool: &PgPool, days: i32, page: i64) -> Result<u64, sqlx::Error> {
    let done = sqlx::query!(
        "delete from notifications where id in (
             select id from notifications
             where at < now() - make_interval(days => $1)
               and not amqp_pending and http_state is distinct from 'pending'
             order by id
             limit $2)",
        days,
        page
    )
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}
