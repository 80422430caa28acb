//! `lifecycle bench --report`: how long the report takes over a year of a large shop.
//!
//! A database of its own is filled in SQL (`generate_series`, a fixed random seed, so every run
//! has the same rows) with what a year of events leaves behind: members and their sign-up
//! points (enrolments, 10% of the events), orders with their SKUs and points (60%), refunds
//! (5%), adjustments, redemptions and feedback answers (5% together), expiries, and the
//! messages the triggers sent or held out, each table in time order as ingest writes it (so
//! the BRIN indexes work as they do in production). Cart updates (the other 20%) leave carts, which the
//! report never reads, so they are left out. Then the report is timed for the last 30 days,
//! the whole year, and the console page's six periods.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::{Period, loyalty};
use crate::config::Settings;

/// The size of the shop.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Size {
    pub members: i64,
    pub events: i64,
}

/// Fills the database, then times the report; prints the figures.
pub(crate) async fn run(mut settings: Settings, size: Size) -> anyhow::Result<()> {
    if size.members < 1 || size.events < size.members * 2 {
        bail!("--report-events must be at least twice --report-members (which must be at least 1)");
    }
    let database = format!("{}_report_bench", settings.database_url.database());
    settings.database_url = settings.database_url.with_database(&database);
    crate::db::drop_database(&settings.database_url).await?;
    let pool = crate::db::migrate(&settings.database_url).await?;
    let now = Utc::now();
    println!(
        "lifecycle bench --report: {} members, {} events over the year to {}, database {database}",
        size.members,
        size.events,
        now.format("%Y-%m-%d")
    );
    let started = Instant::now();
    let rows = seed(&pool, size, now).await?;
    println!(
        "seeded in {:.1} s: {} orders, {} journal entries, {} answers, {} messages",
        started.elapsed().as_secs_f64(),
        rows.0,
        rows.1,
        rows.2,
        rows.3
    );

    let month = Period::new(None, Some(now), now)?;
    let year = Period::new(Some(now - chrono::Duration::days(365)), Some(now), now)?;
    let mut lines = Vec::new();
    for (name, periods) in [
        ("last 30 days", vec![month]),
        ("the whole year", vec![year]),
        ("console page (6 periods of 30 days)", month.series(6)),
    ] {
        let mut times = Vec::new();
        for _ in 0..5 {
            let started = Instant::now();
            futures_util::future::try_join_all(periods.iter().map(|p| loyalty(&pool, *p))).await?;
            times.push(started.elapsed());
        }
        times.sort();
        lines.push((name, times[times.len() / 2], times[times.len() - 1]));
    }
    let r = loyalty(&pool, year).await?;
    println!(
        "the year: retention {:?}, repeat purchase {:?}, upsell {:?}, NPS {:?}, points {:?}",
        r.retention_rate, r.repeat_purchase_rate, r.upsell_ratio, r.nps, r.points
    );
    println!("report time (median of 5, slowest):");
    for (name, median, slowest) in lines {
        println!(
            "  {name:<38} {:>7.0} ms {:>7.0} ms",
            ms(median),
            ms(slowest)
        );
    }
    pool.close().await;
    println!("the database is left for inspection (EXPLAIN); the next run starts it afresh");
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Inserts a year of rows; counts of orders, journal entries, answers and messages.
async fn seed(
    pool: &PgPool,
    size: Size,
    now: DateTime<Utc>,
) -> anyhow::Result<(i64, i64, i64, i64)> {
    let members = size.members;
    let orders = size.events * 60 / 100;
    let refunds = size.events * 5 / 100;
    let others = (size.events * 5 / 100) / 3;
    let mut tx = pool.begin().await?;
    // Each statement with the count it makes ($3; 0 where it takes none).
    let steps: [(&str, i64, &str); 10] = [
        ("seed", 0, "select setseed(0.42)"),
        (
            "members",
            0,
            "insert into members (member_id, email, locale, timezone, consent_email, consent_sms,
                                  enrolled_at, updated_at)
             select 'm' || i, 'm' || i || '@example.com', 'en', 'UTC', true, false,
                    t, $1
             from (select i, $1 - random() * interval '365 days' as t
                   from generate_series(1, $2) i order by t) x",
        ),
        (
            "sign-up points",
            0,
            "insert into point_entries (member_id, kind, points, at, cause, event_at)
             select member_id, 'signup', 100, enrolled_at, 'e-' || member_id, enrolled_at
             from members order by enrolled_at",
        ),
        (
            "orders",
            orders,
            "insert into orders (order_id, member_id, total_minor, currency, earned, cart_id,
                                 placed_at, skus)
             select 'o' || i, 'm' || (1 + floor(random() * $2)::bigint), t, 'USD', t / 100,
                    case when random() < 0.1 then 'c' || i end,
                    $1 - random() * interval '365 days',
                    (select jsonb_agg(sku order by sku collate \"C\")
                     from (select distinct 'sku-' || floor(random() * 500)::int as sku
                           from generate_series(1, 1 + (i % 3))) s)
             from generate_series(1, $3) i, lateral (select 1000 + floor(random() * 19000)::bigint as t) x
             order by 7",
        ),
        (
            "order points",
            0,
            "insert into point_entries (member_id, kind, points, qualifying, at, cause, event_at)
             select member_id, 'order', earned, earned, placed_at, 'e-' || order_id, placed_at
             from orders order by placed_at",
        ),
        (
            "refunds",
            refunds,
            "insert into point_entries (member_id, kind, points, qualifying, at, cause, event_at)
             select member_id, 'refund', -earned / 2, -earned / 2, t, 'r-' || order_id, t
             from (select *, least($1, placed_at + random() * interval '10 days') as t
                   from orders where $2 > 0 order by random() limit $3) o
             order by t",
        ),
        (
            "adjustments, redemptions and expiries",
            others,
            "insert into point_entries (member_id, kind, points, at, cause, event_at)
             select 'm' || (1 + floor(random() * $2)::bigint), k, p, t, k || '-' || i, t
             from generate_series(1, $3) i,
                  (values ('adjustment', 50), ('redemption', -100), ('expiry', -20)) v(k, p),
                  lateral (select $1 - random() * interval '365 days' + i * interval '0' as t) x
             order by t",
        ),
        (
            "answers",
            others,
            "insert into feedback (event_id, member_id, score, at)
             select 'f' || i, 'm' || (1 + floor(random() * $2)::bigint), floor(random() * 11)::int,
                    $1 - random() * interval '365 days' as at
             from generate_series(1, $3) i order by at",
        ),
        (
            "messages",
            members / 2,
            "insert into messages (dedupe_key, member_id, trigger, channel, context, status,
                                   due_at, sent_at, created_at, finished_at)
             select trigger || ':' || member_id || ':' || n || ':email', member_id, trigger,
                    'email', jsonb_build_object('cart_id', cart_id),
                    case when random() < 0.1 then 'held_out' else 'sent' end, at, at, at, at
             from (select 'welcome' as trigger, member_id, '0' as n, null as cart_id,
                          enrolled_at + interval '1 second' as at
                   from members
                   union all
                   select t, 'm' || (1 + floor(random() * $2)::bigint), i::text, null,
                          $1 - random() * interval '365 days'
                   from generate_series(1, $3) i,
                        unnest(array['redemption-ready', 'points-expiring', 'birthday', 'tier-up']) t
                   union all
                   select 'abandoned-cart', member_id, cart_id, cart_id, placed_at - interval '2 hours'
                   from orders where cart_id is not null) m
             order by at",
        ),
        (
            "balances",
            0,
            "update members m set balance = s.points, lifetime = s.points
             from (select member_id, sum(points) as points from point_entries group by member_id) s
             where s.member_id = m.member_id",
        ),
    ];
    // Built at run time: one loop binds each step the parameters its text names (as macros,
    // several would need casts: `$1 - interval` types `$1` an interval, `random() * $2` a
    // double).
    for (what, count, sql) in steps {
        // Each statement takes the parameters it names, in order: now, members, a count.
        let mut query = sqlx::query(sql);
        if sql.contains("$1") {
            query = query.bind(now);
        }
        if sql.contains("$2") {
            query = query.bind(members);
        }
        if sql.contains("$3") {
            query = query.bind(count);
        }
        query
            .execute(&mut *tx)
            .await
            .with_context(|| format!("seeding {what}"))?;
    }
    tx.commit().await?;
    sqlx::query!("vacuum analyze members").execute(pool).await?;
    sqlx::query!("vacuum analyze orders").execute(pool).await?;
    sqlx::query!("vacuum analyze point_entries")
        .execute(pool)
        .await?;
    sqlx::query!("vacuum analyze feedback")
        .execute(pool)
        .await?;
    sqlx::query!("vacuum analyze messages")
        .execute(pool)
        .await?;
    let row = sqlx::query!(
        r#"select (select count(*) from orders) as "orders!",
                (select count(*) from point_entries) as "entries!",
                (select count(*) from feedback) as "answers!",
                (select count(*) from messages) as "messages!""#
    )
    .fetch_one(pool)
    .await?;
    Ok((row.orders, row.entries, row.answers, row.messages))
}
