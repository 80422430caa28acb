//! The fault-injection suite: the promises (no event lost or applied twice, no message lost, a
//! message sent twice only where an attempt was unsure and never more often than the faults
//! allow, nothing sent without consent, no scan instant run twice, no address in a log or a
//! stored error) checked while everything that can fail does.
//!
//! A known stream (enrolments with and without consent, orders, partial refunds, adjustments,
//! redemptions, carts left, checked out in the same second, malformed events) goes through two
//! `lifecycle serve` processes while the suite kills workers (three times, at least once while
//! sends are in flight), closes every broker connection, kills the workers' database sessions,
//! restarts RabbitMQ and PostgreSQL, and the partners fail: an SMS API answering 503, 429 with
//! a sane and an absurd `Retry-After`, accepting then hanging, answering 200 with a NUL in its
//! id, a gateway answering 504 after forwarding, and refusing one number for good; an SMTP
//! relay that soft-refuses, drops the connection halfway through a mail or after its final
//! dot, answers slowly, and refuses every recipient with `554 5.7.1` (its policy) for a minute.
//! Each fault waits for its moment, and the stream must make progress after each before the
//! next.
//!
//! The reference is the same stream through a worker that sees no fault. At the end the suite
//! compares ledgers and planned messages with it, works out every message that must reach a
//! provider and finds each at the sink or the SMS API by recipient and trigger, bounds the
//! duplicates, reads the database's own record of every scan lease, checks both workers' logs
//! (one at the production level, one at `trace`) and every text column for addresses, and
//! prints one line of counts. It restarts shared services, so it is ignored in the parallel
//! run and run alone by `scripts/test`. `FAULT_SUITE_MEMBERS` sets the stream's size
//! (members; about four events each): small in CI, larger by hand. (Not a `LIFECYCLE_`
//! variable: the workers inherit the environment and refuse settings they do not know.)

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use common::fake_api::{FakeApi, Reply};
use common::smtp_relay::{Fault, SmtpRelay};
use common::{Serve, SmtpSink, TestEnv, WITH_SCHEDULER, wait_up_to};
use serde_json::json;
use sqlx::PgPool;

const DEFAULT_MEMBERS: usize = 120;

/// The member whose number the SMS API refuses for good (400): the one message planned to
/// fail.
const PERMANENT_SMS: usize = 36;

/// The member whose number the SMS API answers with `Retry-After: 10^13`: the one message
/// that waits (a day, the cap).
const WAITS_A_DAY: usize = 12;

/// The abandoned-cart delay of both runs (`[program] abandoned_cart_minutes`).
const CART_MINUTES: &str = "2";

/// The stream and what it must lead to besides the reference's state.
struct Stream {
    /// Event bodies, in publishing order.
    events: Vec<String>,
    /// Malformed or invalid events among them (each must be dead-lettered).
    refused: usize,
    /// Members enrolled without email consent, and without SMS consent (with a number).
    no_email: BTreeSet<String>,
    no_sms: BTreeSet<String>,
    /// Every address and number in the stream, none of which may appear in a log.
    secrets: Vec<String>,
    /// Abandoned-cart messages to plan: carts left open by members who take email.
    abandoned: i64,
    /// Every message the stream alone says must reach a provider: (recipient, trigger). The
    /// reference adds the rest.
    expected: BTreeSet<(String, String)>,
}

fn phone(i: usize) -> String {
    format!("+1415555{i:04}")
}

fn stream(tag: &str, members: usize, now: DateTime<Utc>) -> Stream {
    let at = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let start = now - chrono::Duration::hours(3);
    // Carts are updated now and abandoned after `CART_MINUTES`, by when every event is in: a
    // checkout that arrived after its cart's message went could not take the message back.
    let carts_at = now;
    let event = |id: String, kind: &str, time: DateTime<Utc>, data: serde_json::Value| {
        json!({"specversion": "1.0", "id": id, "source": "faults", "type": kind,
               "time": at(time), "data": data})
        .to_string()
    };
    let mut s = Stream {
        events: Vec::new(),
        refused: 0,
        no_email: BTreeSet::new(),
        no_sms: BTreeSet::new(),
        secrets: Vec::new(),
        abandoned: 0,
        expected: BTreeSet::new(),
    };
    for i in 0..members {
        let m = format!("m{i}");
        let email = format!("{m}@example.com");
        let has_phone = i % 3 == 0;
        let (consent_email, consent_sms) = (i % 10 != 7, has_phone && i % 2 == 0);
        if !consent_email {
            s.no_email.insert(m.clone());
        }
        if has_phone && !consent_sms {
            s.no_sms.insert(m.clone());
        }
        if consent_email {
            s.expected.insert((email.clone(), "welcome".into()));
        }
        // One number is refused for good; another's provider asks to wait a day.
        if consent_sms && i != PERMANENT_SMS && i != WAITS_A_DAY {
            s.expected.insert((phone(i), "welcome".into()));
        }
        s.secrets.push(email.clone());
        let locale = ["en", "ko", "tr"][i % 3];
        let mut data = json!({"member_id": m, "email": email, "first_name": "Ada",
            "locale": locale, "timezone": "UTC",
            "consent": {"email": consent_email, "sms": consent_sms}});
        if has_phone {
            data["phone"] = phone(i).into();
            s.secrets.push(phone(i));
        }
        s.events.push(event(
            format!("{tag}-{i}-enrol"),
            "member.enrolled",
            start,
            data,
        ));
        // Points: every member's redemptions and refund reversals stay within the signup lot
        // (100 points), so FIFO spending ends the same whatever order events apply in.
        let first = 1_000 + (i % 4) as i64 * 1_000;
        let order = |n: u32, total: i64, minutes: i64| {
            event(
                format!("{tag}-{i}-order{n}"),
                "order.placed",
                start + chrono::Duration::minutes(minutes),
                json!({"order_id": format!("{tag}-{i}-o{n}"), "member_id": m, "total": total,
                       "currency": "USD",
                       "items": [{"sku": "mug", "name": "Kupa", "quantity": 1, "unit_price": total}]}),
            )
        };
        s.events.push(order(1, first, 60));
        if i % 2 == 0 {
            s.events.push(order(2, 1_500, 61));
        }
        if i % 4 == 0 {
            s.events.push(event(
                format!("{tag}-{i}-refund"),
                "order.refunded",
                start + chrono::Duration::minutes(62),
                json!({"order_id": format!("{tag}-{i}-o1"), "member_id": m,
                       "amount": first / 2, "currency": "USD"}),
            ));
        }
        if i % 5 == 0 {
            s.events.push(event(
                format!("{tag}-{i}-adjust"),
                "points.adjusted",
                start + chrono::Duration::minutes(63),
                json!({"member_id": m, "points": 5, "reason": "review"}),
            ));
        }
        if i % 6 == 1 {
            s.events.push(event(
                format!("{tag}-{i}-redeem"),
                "points.redeemed",
                start + chrono::Duration::minutes(64),
                json!({"member_id": m, "points": 30}),
            ));
        }
        if i % 3 == 1 {
            let cart = format!("{tag}-{i}-cart");
            s.events.push(event(
                format!("{tag}-{i}-cart-update"),
                "cart.updated",
                carts_at,
                json!({"cart_id": cart, "member_id": m, "total": 900, "currency": "USD",
                       "items": [{"sku": "mug", "name": "Kupa", "quantity": 1, "unit_price": 900}],
                       "checkout_url": format!("https://shop.example/cart/{i}")}),
            ));
            if i % 6 != 1 && consent_email {
                s.abandoned += 1;
                s.expected.insert((email.clone(), "abandoned-cart".into()));
            }
            if i % 6 == 1 {
                // Checked out in the same second as the update: the cart stays closed.
                s.events.push(event(
                    format!("{tag}-{i}-cart-checkout"),
                    "cart.checked_out",
                    carts_at,
                    json!({"cart_id": cart, "member_id": m}),
                ));
            }
        }
    }
    // Refused events, whose reasons quote what they got: the log must mask it.
    s.events.push("{this is not json".to_owned());
    for (n, (field, value)) in [
        ("email", "jiwoo.kim@@example.com"),
        ("phone", "+82 10 1234 5678"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut data = json!({"member_id": format!("bad{n}"), "locale": "en",
            "timezone": "UTC", "consent": {"email": true, "sms": true}});
        data[field] = value.into();
        s.events.push(event(
            format!("{tag}-bad{n}"),
            "member.enrolled",
            start,
            data,
        ));
    }
    s.refused = 3;
    s.secrets
        .extend(["jiwoo.kim".to_owned(), "1234 5678".to_owned()]);
    s
}

/// A pool of the suite's own, named so that killing the workers' sessions spares it.
async fn own_pool(env: &TestEnv) -> PgPool {
    let url = format!(
        "{}?application_name=fault-suite",
        env.settings.database_url.expose()
    );
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .unwrap()
}

/// A number from the database, or `None` while it is unavailable (being restarted).
async fn number(pool: &PgPool, sql: &str) -> Option<i64> {
    sqlx::query_scalar(sql).fetch_one(pool).await.ok()
}

/// Waits (up to `limit`) until `sql` counts at least `n`.
async fn until_at_least(pool: &PgPool, sql: &str, n: i64, limit: Duration) -> bool {
    wait_up_to(limit, || async {
        number(pool, sql).await.filter(|c| *c >= n).map(|_| ())
    })
    .await
    .is_some()
}

/// The ledger as rows that do not depend on the order (or the time) events were applied in.
/// Journal entries and lots are stamped with the business time of their application, which
/// differs between runs, so times are left out.
async fn ledger(pool: &PgPool) -> BTreeMap<&'static str, Vec<String>> {
    let rows = |sql: &'static str| async move {
        let rows: Vec<(String,)> = sqlx::query_as(sql).fetch_all(pool).await.unwrap();
        rows.into_iter().map(|(r,)| r).collect::<Vec<_>>()
    };
    BTreeMap::from([
        (
            "members",
            rows("select concat_ws(' ', member_id, balance, lifetime, consent_email, consent_sms)
                  from members order by 1")
            .await,
        ),
        (
            "journal",
            rows("select concat_ws(' ', member_id, kind, points, qualifying, cause)
                  from point_entries order by 1")
            .await,
        ),
        (
            "lots",
            rows("select concat_ws(' ', member_id, points, remaining, expires_at - earned_at)
                  from point_lots order by 1")
            .await,
        ),
        (
            "orders",
            rows("select concat_ws(' ', order_id, earned, refunded_minor, reversed) from orders order by 1")
                .await,
        ),
        // Open or closed; not the version, which counts the updates applied and so depends
        // on whether a tied checkout came first.
        (
            "carts",
            rows("select concat_ws(' ', cart_id, open) from carts order by 1").await,
        ),
    ])
}

/// Dedupe keys of the messages whose planning does not depend on event order: welcomes, and
/// the abandoned-cart messages of carts left open. (Redemption-ready keys count crossings,
/// which depend on the order a member's events applied in.)
async fn fixed_keys(pool: &PgPool) -> BTreeSet<String> {
    sqlx::query_scalar(
        "select m.dedupe_key from messages m
         where m.trigger = 'welcome'
            or (m.trigger = 'abandoned-cart' and m.status <> 'cancelled'
                and exists (select 1 from carts c where c.open
                            and m.dedupe_key like 'abandoned-cart:' || c.cart_id || ':%'))",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

/// Counts the abandoned-cart messages of carts left open (and not cancelled). A cart checked
/// out in the same second as its update may also have had a message, planned (and even sent)
/// when a scan ran before the checkout arrived: see `LATE_CHECKOUTS`.
const ABANDONED: &str = "select count(*) from messages m
     where m.trigger = 'abandoned-cart' and m.status <> 'cancelled'
       and exists (select 1 from carts c
                   where c.open and m.dedupe_key like 'abandoned-cart:' || c.cart_id || ':%')";

/// Abandoned-cart messages of closed carts sent after the checkout was applied: the message
/// went although lifecycle knew the cart was closed. Must be none. (One sent before the
/// checkout arrived, delayed by the faults past the abandoned-cart delay, is correct.)
const LATE_CHECKOUTS: &str = "select m.dedupe_key from messages m
     join carts c on m.dedupe_key like 'abandoned-cart:' || c.cart_id || ':%'
     where m.trigger = 'abandoned-cart' and m.status = 'sent' and not c.open
       and m.sent_at > (select applied_at from inbox where event_id = c.cart_id || '-checkout')";

/// What the reference run made: its ledger, the keys of its welcomes and abandoned carts, and
/// its other messages as (recipient, trigger).
type Reference = (
    BTreeMap<&'static str, Vec<String>>,
    BTreeSet<String>,
    BTreeSet<(String, String)>,
);

async fn reference(events: &[String], valid: i64, abandoned: i64) -> Reference {
    let env = TestEnv::new(&[
        ("LIFECYCLE_SCHEDULER__CARTS", "* * * * * *".into()),
        (
            "LIFECYCLE_PROGRAM__ABANDONED_CART_MINUTES",
            CART_MINUTES.into(),
        ),
    ]);
    let worker = env.start(WITH_SCHEDULER).await;
    let pool = worker.app.pool.clone();
    env.publish(events).await;
    assert!(
        until_at_least(
            &pool,
            "select count(*) from inbox",
            valid,
            Duration::from_secs(120)
        )
        .await,
        "the reference run applied every valid event"
    );
    // The carts scans planned every abandoned cart.
    assert!(
        until_at_least(&pool, ABANDONED, abandoned, Duration::from_secs(200)).await,
        "the reference planned every abandoned cart"
    );
    let others: Vec<(String, String)> = sqlx::query_as(
        "select recipient, trigger from messages
         where trigger not in ('welcome', 'abandoned-cart') and status = 'sent'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let state = (
        ledger(&pool).await,
        fixed_keys(&pool).await,
        others.into_iter().collect(),
    );
    worker.stop().await.unwrap();
    env.cleanup().await;
    state
}

/// Every line of the workers' logs (one file each) that quotes a secret.
fn leaks_in_logs(dir: &std::path::Path, secrets: &[String]) -> (usize, Vec<String>) {
    let mut lines = 0;
    let mut leaks = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for line in text.lines() {
            lines += 1;
            if let Some(secret) = secrets.iter().find(|s| line.contains(s.as_str())) {
                leaks.push(format!("{secret}: {line:.300}"));
            }
        }
    }
    (lines, leaks)
}

/// Records, by a trigger in the database, every scan lease granted and every lease given back
/// (evidence the scheduler does not write itself).
async fn record_leases(pool: &PgPool) {
    for sql in [
        "create table lease_log (
             id bigint generated always as identity, job text not null, holder text,
             seen timestamptz, done timestamptz, granted boolean not null,
             at timestamptz not null default clock_timestamp())",
        "create function log_lease() returns trigger language plpgsql as $$
         begin
             if new.leased_by is not null and new.leased_by is distinct from old.leased_by then
                 insert into lease_log (job, holder, seen, granted)
                 values (new.job, new.leased_by, old.last_run, true);
             elsif new.leased_by is null and old.leased_by is not null then
                 insert into lease_log (job, holder, seen, done, granted)
                 values (new.job, old.leased_by, old.last_run, new.last_run, false);
             end if;
             return new;
         end $$",
        "create trigger log_lease after update on scheduled_jobs
         for each row execute function log_lease()",
    ] {
        sqlx::query(sql).execute(pool).await.unwrap();
    }
}

/// Scan instants run more than once, from the lease log: a (scan, last run seen) that two
/// holders completed, or that a holder was granted while another's lease on it was live (its
/// holder neither gave it back nor was killed).
async fn scans_run_twice(pool: &PgPool) -> (i64, Vec<String>) {
    let grants = number(pool, "select count(*) from lease_log where granted")
        .await
        .unwrap();
    let doubled: Vec<String> = sqlx::query_scalar(
        "select job || ' after ' || coalesce(seen::text, 'never') || ': ' || count(*) || ' runs'
         from lease_log where not granted and done is distinct from seen
         group by job, seen having count(*) > 1
         union all
         select g2.job || ' after ' || coalesce(g2.seen::text, 'never') || ': granted to '
                || g2.holder || ' while ' || g1.holder || ' held it'
         from lease_log g1 join lease_log g2
           on g2.job = g1.job and g2.seen is not distinct from g1.seen
          and g2.granted and g1.granted and g2.id > g1.id and g2.holder <> g1.holder
         where exists (select 1 from lease_log r
                       where not r.granted and r.holder = g1.holder and r.job = g1.job
                         and r.seen is not distinct from g1.seen and r.at > g2.at)",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    (grants, doubled)
}

/// Every stored text that quotes a secret: every text column of every table, but those that
/// hold addresses by design (the member's own, where a message went, a suppression's).
async fn leaks_in_tables(pool: &PgPool, secrets: &[String]) -> Vec<String> {
    const ADDRESSES: [(&str, &str); 8] = [
        ("members", "email"),
        ("members", "phone"),
        ("messages", "recipient"),
        ("messages", "test_to"),
        ("suppressions", "address"),
        ("suppression_lifts", "address"),
        ("users", "email"),
        ("users", "phone"),
    ];
    let columns: Vec<(String, String)> = sqlx::query_as(
        "select table_name::text, column_name::text from information_schema.columns
         where table_schema = 'public' and data_type in ('text', 'character varying')",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let mut leaks = Vec::new();
    for (table, column) in columns {
        if ADDRESSES.contains(&(table.as_str(), column.as_str())) {
            continue;
        }
        for secret in secrets {
            let found: Vec<String> = sqlx::query_scalar(&format!(
                "select left(\"{column}\", 200) from \"{table}\" where strpos(\"{column}\", $1) > 0 limit 3"
            ))
            .bind(secret)
            .fetch_all(pool)
            .await
            .unwrap();
            leaks.extend(found.into_iter().map(|v| format!("{table}.{column}: {v}")));
        }
    }
    leaks
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "restarts RabbitMQ and PostgreSQL; run alone with --run-ignored only"]
async fn every_promise_holds_under_faults() {
    let members: usize = std::env::var("FAULT_SUITE_MEMBERS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(DEFAULT_MEMBERS)
        .max(PERMANENT_SMS + 4);
    let now = Utc::now().trunc_subsecs(0);

    // Providers: smtp-sink behind a relay that soft-refuses some mails, drops the connection
    // halfway through some and after the final dot of others, answers some slowly, and (for
    // a minute, when the suite says) refuses every recipient for its own policy; an SMS API
    // that fails some numbers first.
    let sink = SmtpSink::start(&[]);
    let policy = Arc::new(AtomicBool::new(false));
    let refusing = policy.clone();
    let relay = SmtpRelay::start_with(
        sink.port,
        |n| match n % 23 {
            5 => Fault::SoftRejectData,
            11 if n < 200 => Fault::DropAfterDot,
            17 => Fault::DropMidData,
            2 | 8 | 14 | 20 => Fault::SlowVerdict,
            _ => Fault::None,
        },
        Arc::new(move |line: &str| {
            refusing.load(Ordering::Relaxed).then(|| {
                let to = line.split(['<', '>']).nth(1).unwrap_or_default();
                format!("554 5.7.1 <{to}>: Relay access denied")
            })
        }),
    )
    .await;
    let sms = FakeApi::start(Reply::new(200, r#"{"ok": true}"#)).await;
    sms.rule_times(
        &phone(0),
        Reply::new(503, &format!("number {} unavailable", phone(0))),
        2,
    );
    sms.rule_times(&phone(6), Reply::new(429, "").header("Retry-After", "1"), 1);
    // Always: whichever worker tries it (one may die before recording the answer), the
    // provider asks to wait 10^13 s.
    sms.rule(
        &phone(WAITS_A_DAY),
        Reply::new(429, "").header("Retry-After", "10000000000000"),
    );
    sms.rule_times(
        &phone(18),
        Reply::new(200, r#"{"ok": true}"#).after(Duration::from_secs(6)),
        1,
    );
    // An id PostgreSQL's text cannot hold.
    sms.rule_times(&phone(24), Reply::new(200, r#"{"id": "sm\u0000x"}"#), 1);
    // A gateway that forwarded the request (the provider behind has it, and honours the
    // idempotency key), then answered 504.
    sms.rule_times(
        &phone(30),
        Reply::new(504, "Gateway Time-out").forwarded().idempotent(),
        1,
    );
    sms.rule(&phone(30), Reply::new(200, r#"{"ok": true}"#).idempotent());
    // A number refused for good: the one message planned to fail.
    sms.rule(
        &phone(PERMANENT_SMS),
        Reply::new(400, &format!("invalid number {}", phone(PERMANENT_SMS))),
    );

    let env = TestEnv::new(&[(
        "LIFECYCLE_PROGRAM__ABANDONED_CART_MINUTES",
        CART_MINUTES.into(),
    )]);
    let tag = env.tag.clone();
    let s = stream(&tag, members, now);
    let valid = (s.events.len() - s.refused) as i64;
    let (reference_ledger, reference_keys, reference_others) =
        reference(&s.events, valid, s.abandoned).await;
    // The same stream, its carts updated now (the reference took its time).
    let s = stream(&tag, members, Utc::now().trunc_subsecs(0));
    let expected = s.expected.clone();

    let logs = tempfile::tempdir().unwrap();
    let mut starts = 0;
    // Worker A logs at the production default, worker B at trace.
    let mut start = |env: &TestEnv, level: &str| {
        starts += 1;
        let log = std::fs::File::create(logs.path().join(format!("worker-{starts}.log"))).unwrap();
        Serve::start_with(
            env,
            &[
                ("RUST_LOG", level.to_owned()),
                ("LIFECYCLE_EMAIL_PROVIDERS", "smtp".into()),
                ("LIFECYCLE_SMTP_URL", relay.url()),
                ("LIFECYCLE_SMS_PROVIDERS", "webhook".into()),
                ("LIFECYCLE_WEBHOOK_URL", format!("{}/sms", sms.url)),
                ("LIFECYCLE_WEBHOOK_SECRET", "faults".into()),
                ("LIFECYCLE_DISPATCH__SEND_TIMEOUT_MS", "2000".into()),
                ("LIFECYCLE_DISPATCH__RETRY_BASE_MS", "200".into()),
                // A message caught by several faults in a row (the relay's policy minute, then
                // a cut connection, then a restart) doubled its delay to over three minutes
                // and was not sent before the drain's deadline.
                ("LIFECYCLE_DISPATCH__RETRY_MAX_MS", "10000".into()),
                ("LIFECYCLE_DISPATCH__BREAKER_FAILURES", "1000".into()),
                ("LIFECYCLE_DISPATCH__MAX_ATTEMPTS", "20".into()),
                ("LIFECYCLE_SCHEDULER__EXPIRY", "* * * * * *".into()),
                ("LIFECYCLE_SCHEDULER__CARTS", "* * * * * *".into()),
                ("LIFECYCLE_SCHEDULER__BIRTHDAY", "* * * * * *".into()),
                ("LIFECYCLE_SCHEDULER__POINTS_EXPIRING", "* * * * * *".into()),
                ("LIFECYCLE_SCHEDULER__LEASE_SECS", "3".into()),
            ],
            Stdio::from(log),
        )
    };
    const PRODUCTION: &str = "warn,lifecycle=info";
    const TRACE: &str = "trace";
    let app = env.app().await;
    let pool = own_pool(&env).await;
    record_leases(&pool).await;
    let mut a = start(&env, PRODUCTION);
    let mut b = start(&env, TRACE);

    // The platform publishes throughout, in small chunks, and publishes a chunk again when
    // the broker was away (an event published twice is applied once).
    let publisher = {
        let settings = env.settings.clone();
        let events = s.events.clone();
        tokio::spawn(async move {
            let chunk = (events.len() / 150).max(1);
            for part in events.chunks(chunk) {
                // A publish caught by a broker restart can hang as well as fail: give it up
                // after a while and publish the chunk again.
                while !matches!(
                    tokio::time::timeout(
                        Duration::from_secs(10),
                        lifecycle::testkit::publish::events(&settings, part)
                    )
                    .await,
                    Ok(Ok(_))
                ) {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let inbox = "select count(*) from inbox";
    let sent = "select count(*) from messages where status = 'sent'";
    let sending = "select count(*) from messages where status = 'sending'";
    let minute = Duration::from_secs(60);
    let mut faults: Vec<String> = Vec::new();
    // Messages claimed (in flight or about to be) at each kill: the duplicates' bound.
    let mut in_flight_at_kills: Vec<i64> = Vec::new();
    // Before each fault, its moment; after it, progress: more events applied or more
    // messages sent than when it struck.
    let progress = |pool: PgPool, what: String| async move {
        let before = (number(&pool, inbox).await, number(&pool, sent).await);
        let moved = wait_up_to(Duration::from_secs(120), || async {
            let now = (number(&pool, inbox).await?, number(&pool, sent).await?);
            (Some(now.0) > before.0 || Some(now.1) > before.1).then_some(())
        })
        .await;
        assert!(moved.is_some(), "no progress after {what}");
    };
    // Kills once messages are claimed; asserts they were, and records how many.
    let claimed_now = |pool: PgPool| async move {
        wait_up_to(Duration::from_secs(30), || async {
            number(&pool, sending).await.filter(|n| *n > 0)
        })
        .await
    };

    // 1. SIGKILL while events are coming in.
    assert!(
        until_at_least(&pool, inbox, valid / 10, minute).await,
        "a tenth of the stream applied before the first kill"
    );
    a.kill();
    faults.push("SIGKILL worker A mid-ingest".into());
    a = start(&env, PRODUCTION);
    progress(pool.clone(), faults[0].clone()).await;
    // 2. The relay refuses every recipient (its policy) for a minute, from now on while the
    //    other faults go on: nothing may be suppressed, and everything goes once it stops.
    policy.store(true, Ordering::Relaxed);
    let policy_ends = {
        let policy = policy.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(60)).await;
            policy.store(false, Ordering::Relaxed);
        })
    };
    faults.push("SMTP relay refusing every RCPT with 554 5.7.1 for a minute".into());
    // 3. SIGKILL while messages are out (claimed, not yet recorded).
    assert!(
        until_at_least(&pool, sent, 10, minute).await,
        "ten messages sent before the second kill"
    );
    let out = claimed_now(pool.clone())
        .await
        .expect("messages claimed to kill worker B over");
    b.kill();
    in_flight_at_kills.push(out);
    faults.push(format!(
        "SIGKILL worker B mid-dispatch ({out} messages claimed)"
    ));
    b = start(&env, TRACE);
    progress(pool.clone(), faults.last().unwrap().clone()).await;
    // 4. Every broker connection closed.
    assert!(
        until_at_least(&pool, inbox, valid / 4, minute).await,
        "a quarter of the stream applied"
    );
    common::run(
        "rabbitmqctl",
        &["close_all_connections", "fault suite: connections closed"],
    );
    faults.push("rabbitmqctl close_all_connections".into());
    progress(pool.clone(), faults.last().unwrap().clone()).await;
    // 5. The workers' database sessions killed.
    assert!(
        until_at_least(&pool, inbox, valid / 3, minute).await,
        "a third of the stream applied"
    );
    let killed: i64 = sqlx::query_scalar(
        "select count(*) from (select pg_terminate_backend(pid) from pg_stat_activity
         where datname = current_database() and pid <> pg_backend_pid()
           and application_name <> 'fault-suite') k",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(killed > 0, "the workers had sessions to kill");
    faults.push(format!("pg_terminate_backend ({killed} sessions)"));
    progress(pool.clone(), faults.last().unwrap().clone()).await;
    // 6. RabbitMQ restarted.
    assert!(
        until_at_least(&pool, inbox, valid / 2, minute).await,
        "half the stream applied"
    );
    common::restart_rabbitmq();
    faults.push("RabbitMQ restart".into());
    progress(pool.clone(), faults.last().unwrap().clone()).await;
    // 7. PostgreSQL restarted.
    assert!(
        until_at_least(&pool, inbox, valid * 2 / 3, Duration::from_secs(120)).await,
        "two thirds of the stream applied"
    );
    common::restart_postgres();
    faults.push("PostgreSQL restart".into());
    progress(pool.clone(), faults.last().unwrap().clone()).await;
    // 8. SIGKILL again, while messages are out.
    assert!(
        until_at_least(&pool, sent, 20, Duration::from_secs(120)).await,
        "twenty messages sent before the last kill"
    );
    let out = claimed_now(pool.clone()).await.unwrap_or(0);
    a.kill();
    in_flight_at_kills.push(out);
    faults.push(format!("SIGKILL worker A ({out} messages claimed)"));
    a = start(&env, PRODUCTION);
    progress(pool.clone(), faults.last().unwrap().clone()).await;
    // The relay's minute is over.
    policy_ends.await.unwrap();
    publisher.await.unwrap();
    assert!(
        in_flight_at_kills.iter().any(|n| *n > 0),
        "a kill with sends in flight: {in_flight_at_kills:?}"
    );
    assert!(relay.refused_rcpts() > 0, "the relay's policy refused some");

    // Drained: every valid event applied, every message settled but the one a provider asked
    // to wait a day (Retry-After), the queues empty.
    let drained = wait_up_to(Duration::from_secs(300), || async {
        let applied = number(&pool, inbox).await?;
        let abandoned = number(&pool, ABANDONED).await?;
        let open = number(
            &pool,
            "select count(*) from messages where status in ('pending', 'sending')
               and coalesce(last_error, '') not like '%Retry-After%'
               and coalesce(last_error, '') not like '%429%'",
        )
        .await?;
        (applied == valid && abandoned == s.abandoned && open == 0).then_some(())
    })
    .await;
    let states: Vec<(String, i64)> =
        sqlx::query_as("select status, count(*) from messages group by status order by status")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(
        drained.is_some(),
        "not drained in 5 minutes: {} of {valid} events applied; messages {states:?}",
        number(&pool, inbox).await.unwrap_or(-1)
    );
    // The dead-letter stores have moved the refused events to PostgreSQL.
    assert!(
        until_at_least(
            &pool,
            "select count(distinct body) from dead_letters",
            s.refused as i64,
            minute
        )
        .await,
        "the refused events stored as dead letters"
    );
    // Both workers still up, and they leave on SIGTERM with 0.
    assert!(a.terminate().await.success(), "worker A exits 0 on SIGTERM");
    assert!(b.terminate().await.success(), "worker B exits 0 on SIGTERM");

    // Queues: nothing left to consume; the refused events, and only they, dead-lettered.
    let connection = lifecycle::testkit::amqp::connect(&env.settings.amqp_url, "faults")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let depth = |name: String| {
        let channel = channel.clone();
        async move {
            channel
                .queue_declare(
                    name.as_str().into(),
                    lapin::options::QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    Default::default(),
                )
                .await
                .unwrap()
                .message_count() as usize
        }
    };
    let ingest = &env.settings.ingest;
    assert_eq!(depth(ingest.queue.clone()).await, 0, "input queue drained");
    assert_eq!(
        depth(ingest.retry_queue.clone()).await,
        0,
        "retry queue drained"
    );
    // Each refused event is a dead letter at least once (one published just before a crash
    // can be published again), and nothing else is.
    assert_eq!(
        depth(ingest.dead_letter_queue.clone()).await,
        0,
        "dead letters all stored"
    );
    let bodies: BTreeSet<Vec<u8>> = sqlx::query_scalar("select body from dead_letters")
        .fetch_all(&pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    let refused: BTreeSet<Vec<u8>> = s.events[s.events.len() - s.refused..]
        .iter()
        .map(|e| e.as_bytes().to_vec())
        .collect();
    assert_eq!(
        bodies, refused,
        "the three refused events are the dead letters, and only they"
    );
    connection.close(200, "bye".into()).await.ok();

    // Every event applied exactly once: the ledger is the reference's.
    let ledger_now = ledger(&pool).await;
    for (table, rows) in &reference_ledger {
        let got = &ledger_now[table];
        let missing: Vec<&String> = rows.iter().filter(|r| !got.contains(r)).take(5).collect();
        let extra: Vec<&String> = got.iter().filter(|r| !rows.contains(r)).take(5).collect();
        assert_eq!(
            rows.len(),
            got.len(),
            "{table}: {} rows, the reference has {}; missing {missing:?}, extra {extra:?}",
            got.len(),
            rows.len()
        );
        assert_eq!(rows, got, "{table}: missing {missing:?}, extra {extra:?}");
    }
    assert_eq!(
        fixed_keys(&pool).await,
        reference_keys,
        "welcome and abandoned-cart messages"
    );
    let late: Vec<String> = sqlx::query_scalar(LATE_CHECKOUTS)
        .fetch_all(&pool)
        .await
        .unwrap();
    assert!(
        late.is_empty(),
        "sent after the cart's checkout was known: {late:?}"
    );

    // What reached the providers: copies by message id, and (recipient, trigger).
    let mut delivered: HashMap<String, usize> = HashMap::new();
    let mut arrived: BTreeSet<(String, String)> = BTreeSet::new();
    let mut recipients: Vec<(String, String)> = Vec::new();
    for raw in sink.messages() {
        let mail = common::parse_mail(&raw);
        *delivered.entry(mail.message_id.clone()).or_default() += 1;
        arrived.insert((mail.to.clone(), mail.trigger.clone()));
        recipients.push(("email".into(), mail.to));
    }
    // A request the provider took left a copy (a 2xx, or the gateway's forwarded 504); one it
    // refused did not; a request carrying a key the provider had taken is no new copy.
    for request in sms.requests().into_iter().filter(|r| r.copy()) {
        let body: serde_json::Value = serde_json::from_str(&request.body).unwrap();
        *delivered
            .entry(body["message_id"].as_str().unwrap().to_owned())
            .or_default() += 1;
        let to = body["to"].as_str().unwrap().to_owned();
        arrived.insert((to.clone(), body["trigger"].as_str().unwrap().to_owned()));
        recipients.push(("sms".into(), to));
    }
    // Every message that must reach a provider did: by recipient and trigger.
    let missing: Vec<&(String, String)> = expected.difference(&arrived).collect();
    assert!(
        missing.is_empty(),
        "{} of {} expected messages never reached a provider: {missing:?}",
        missing.len(),
        expected.len()
    );
    // The reference's other messages reached a provider here too, but for those that depend
    // on the order a member's events applied in: a redemption-ready planned when a
    // redemption applied before an order (the stream's redeeming members, i % 6 == 1), in one
    // run and not the other.
    let others_here: BTreeSet<(String, String)> = arrived
        .iter()
        .filter(|(_, trigger)| trigger != "welcome" && trigger != "abandoned-cart")
        .cloned()
        .collect();
    let order_dependent = |(to, trigger): &(String, String)| {
        let member: usize = to
            .trim_start_matches('m')
            .split('@')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(usize::MAX);
        trigger == "redemption-ready" && member % 6 == 1
    };
    let unexplained_others: Vec<&(String, String)> = reference_others
        .symmetric_difference(&others_here)
        .filter(|m| !order_dependent(m))
        .collect();
    assert!(
        unexplained_others.is_empty(),
        "messages the reference and this run do not share: {unexplained_others:?}"
    );
    // Nothing to a member without consent.
    for (channel, to) in &recipients {
        let member = match channel.as_str() {
            "email" => to.split('@').next().unwrap().to_owned(),
            _ => format!(
                "m{}",
                to.trim_start_matches("+1415555").parse::<usize>().unwrap()
            ),
        };
        let opted_out = if channel == "email" {
            &s.no_email
        } else {
            &s.no_sms
        };
        assert!(
            !opted_out.contains(&member),
            "{channel} to {member}, who gave no consent"
        );
    }
    // Nothing suppressed: the relay's policy refusals said nothing of the addresses.
    assert_eq!(
        number(&pool, "select count(*) from suppressions").await,
        Some(0),
        "no address suppressed"
    );
    // Failed: only the message the suite planned to fail.
    let failed: Vec<(i64, String, String, String)> = sqlx::query_as(
        "select id, member_id, channel, coalesce(last_error, '') from messages
         where status = 'failed' order by id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    for (id, member, channel, error) in &failed {
        println!("faults: failed as planned: message {id} ({member}, {channel}): {error}");
    }
    let failed_members: Vec<(&str, &str)> = failed
        .iter()
        .map(|(_, m, c, _)| (m.as_str(), c.as_str()))
        .collect();
    let planned_member = format!("m{PERMANENT_SMS}");
    assert_eq!(
        failed_members,
        [(planned_member.as_str(), "sms")],
        "no message failed but the one refused for good"
    );
    // Lost: a message recorded sent that no provider has.
    let sent_ids: Vec<i64> = sqlx::query_scalar("select id from messages where status = 'sent'")
        .fetch_all(&pool)
        .await
        .unwrap();
    let lost: Vec<i64> = sent_ids
        .iter()
        .copied()
        .filter(|id| !delivered.contains_key(&id.to_string()))
        .collect();
    // Duplicated: more than one copy at a provider. Each needs an unsure attempt, and their
    // number is bounded by what the faults could cause: the sends in flight at each kill,
    // the mails whose connection the relay dropped after the dot, and the SMS the API
    // answered after the timeout.
    let unsure: BTreeSet<String> = sqlx::query_scalar(
        "select distinct message_id::text from delivery_attempts where outcome = 'unsure'",
    )
    .fetch_all(&pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    let duplicated: BTreeMap<&String, usize> = delivered
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, n)| (id, *n))
        .collect();
    let copies_over: usize = duplicated.values().map(|n| n - 1).sum();
    let unexplained: Vec<&&String> = duplicated
        .keys()
        .filter(|id| !unsure.contains(**id))
        .collect();
    let (soft, dropped, cut) = relay.injected();
    let sms_late = 1;
    let bound = in_flight_at_kills.iter().sum::<i64>() as usize + dropped + sms_late;
    // Exactly one message waits: the one whose provider asked for 10^13 s, capped at a day.
    let waiting: Vec<(i64, String, String, DateTime<Utc>)> = sqlx::query_as(
        "select id, member_id, channel, due_at from messages where status = 'pending'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();

    // Scans: no instant run twice, by the database's own record. Logs: no address in any
    // line, at either level. Stored texts: no address in any column but those meant for it.
    let (grants, doubled) = scans_run_twice(&pool).await;
    let (log_lines, log_leaks) = leaks_in_logs(logs.path(), &s.secrets);
    let table_leaks = leaks_in_tables(&pool, &s.secrets).await;

    println!(
        "faults: events {}, faults injected {} ({}; SMTP {soft} soft refusals, {dropped} drops after the data, {cut} in the middle of it, {} RCPT refused by policy; SMS 503, 429, absurd Retry-After, hang, NUL id, 504 after forwarding, 400), expected at a provider {}, lost {}, duplicated {} ({} extra copies, bound {bound}), unsure {}, failed {} (as planned), scan leases {grants}, log lines checked {log_lines}",
        s.events.len(),
        faults.len() + soft + dropped + cut + 7,
        faults.join(", "),
        relay.refused_rcpts(),
        expected.len(),
        lost.len(),
        duplicated.len(),
        copies_over,
        unsure.len(),
        failed.len(),
    );
    for (id, n) in &duplicated {
        println!(
            "faults: duplicate: message {id} delivered {n} times; an unsure attempt is recorded: {}",
            unsure.contains(*id)
        );
    }
    for (id, member, channel, due) in &waiting {
        println!(
            "faults: message {id} ({member}, {channel}) waits until {due}, as its provider asked (Retry-After)"
        );
    }
    assert!(lost.is_empty(), "lost messages: {lost:?}");
    assert!(
        unexplained.is_empty(),
        "duplicates without an unsure attempt: {unexplained:?}"
    );
    assert!(
        copies_over <= bound,
        "{copies_over} extra copies, more than the faults allow ({bound}: in flight at kills {in_flight_at_kills:?}, {dropped} drops after the dot, {sms_late} late SMS answer)"
    );
    let day = Utc::now() + chrono::Duration::hours(24) + chrono::Duration::minutes(5);
    let expected_waiting = format!("m{WAITS_A_DAY}");
    assert_eq!(
        waiting
            .iter()
            .map(|(_, m, c, _)| (m.as_str(), c.as_str()))
            .collect::<Vec<_>>(),
        [(expected_waiting.as_str(), "sms")],
        "only the message whose provider asked to wait a day waits"
    );
    assert!(waiting.iter().all(|(.., due)| *due <= day), "{waiting:?}");
    assert!(grants > 0, "the lease log recorded the scans");
    assert!(doubled.is_empty(), "scan instants run twice: {doubled:?}");
    assert!(log_lines > 0, "the logs were read");
    assert!(log_leaks.is_empty(), "addresses in logs: {log_leaks:#?}");
    assert!(table_leaks.is_empty(), "addresses stored: {table_leaks:#?}");
    // The NUL id was stored cleaned; the 504 left one copy and an unsure attempt, and no
    // other provider was tried (there is none to fail over to here, and no attempt but the
    // webhook's).
    let nul: Option<String> = sqlx::query_scalar(
        "select provider_ref from messages where member_id = 'm24' and channel = 'sms'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(nul.as_deref(), Some("sm x"));
    let gateway: Vec<(String, String)> = sqlx::query_as(
        "select a.provider, a.outcome from delivery_attempts a join messages m on m.id = a.message_id
         where m.member_id = 'm30' and m.channel = 'sms' order by a.id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        gateway.first().map(|(_, o)| o.as_str()),
        Some("unsure"),
        "{gateway:?}"
    );
    assert!(gateway.iter().all(|(p, _)| p == "webhook"), "{gateway:?}");
    app.pool.close().await;
    pool.close().await;
    env.cleanup().await;
}
