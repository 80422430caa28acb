//! Unique coupon codes: pools imported from files, a code drawn for each planned message of a
//! trigger that has a pool (`[program.coupons]`), in the transaction that plans it.
//!
//! A code goes to one trigger occurrence (the dedupe key without its channel), so the email
//! and the SMS of one abandoned cart carry the same code, and no code is ever given twice: a
//! drawn row is marked in the planning transaction, and concurrent planners skip the rows
//! another holds (`for update skip locked`). An empty pool plans the message without a code
//! (`coupon_code` null); a pool at or below `program.coupon_low_water` is logged and counted.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, bail};
use sqlx::{PgConnection, PgPool};
use tracing::warn;

use crate::program::Program;

/// Draws that found their pool at or below the low-water mark.
pub(crate) static POOL_LOW: AtomicU64 = AtomicU64::new(0);
/// Messages planned without a code because their pool was empty.
pub static POOL_EMPTY: AtomicU64 = AtomicU64::new(0);

/// Longest code accepted.
const MAX_CODE: usize = 64;

/// Draws a code for each occurrence among `inserted` messages (id, dedupe key, trigger) whose
/// trigger has a pool, and writes it into their context as `coupon_code`.
pub(crate) async fn draw(
    conn: &mut PgConnection,
    program: &Program,
    inserted: &[(i64, String, String)],
) -> Result<(), sqlx::Error> {
    // pool -> occurrence -> message ids
    let mut wanted: BTreeMap<&str, BTreeMap<&str, Vec<i64>>> = BTreeMap::new();
    for (id, key, trigger) in inserted {
        let Some(pool) = program.coupons.get(trigger) else {
            continue;
        };
        let occurrence = key.rsplit_once(':').map_or(key.as_str(), |(head, _)| head);
        wanted
            .entry(pool)
            .or_default()
            .entry(occurrence)
            .or_default()
            .push(*id);
    }
    for (pool, occurrences) in wanted {
        let names: Vec<&str> = occurrences.keys().copied().collect();
        let codes = take_codes(conn, pool, &names).await?;
        let mut ids = Vec::new();
        let mut values = Vec::new();
        for (occurrence, message_ids) in &occurrences {
            match codes.get(*occurrence) {
                Some(code) => {
                    for id in message_ids {
                        ids.push(*id);
                        values.push(code.as_str());
                    }
                }
                None => {
                    POOL_EMPTY.fetch_add(message_ids.len() as u64, Ordering::Relaxed);
                    metrics::counter!("lifecycle_coupon_pool_empty_total", "pool" => pool.to_owned())
                        .increment(message_ids.len() as u64);
                    warn!(
                        pool,
                        occurrence, "Coupon pool is empty; the message goes without a code."
                    );
                }
            }
        }
        crate::outbox::set_coupon_codes(&mut *conn, &ids, &values).await?;
        let left = remaining(&mut *conn, pool, program.coupon_low_water + 1).await?;
        if left <= program.coupon_low_water {
            POOL_LOW.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("lifecycle_coupon_pool_low_total", "pool" => pool.to_owned())
                .increment(1);
            warn!(pool, left, "Coupon pool is running low.");
        }
    }
    Ok(())
}

/// Gives each occurrence among `names` that has no code yet a free code of `pool` (oldest
/// first, skipping codes another transaction is taking), and returns the code of every
/// occurrence among them that has one.
async fn take_codes(
    conn: &mut PgConnection,
    pool: &str,
    names: &[&str],
) -> Result<BTreeMap<String, String>, sqlx::Error> {
    sqlx::query!(
        "with wanted as (
             select o, row_number() over (order by o) as n
             from unnest($2::text[]) as o
             where not exists (select 1 from coupons c where c.occurrence = o)
         ), free as (
             select id, row_number() over (order by id) as n
             from (select id from coupons
                   where pool = $1 and occurrence is null
                   order by id limit (select count(*) from wanted)
                   for update skip locked) as f
         )
         update coupons c set occurrence = w.o, drawn_at = now()
         from free f join wanted w using (n)
         where c.id = f.id",
        pool,
        names as &[&str]
    )
    .execute(&mut *conn)
    .await?;
    let codes: Vec<(String, String)> = sqlx::query!(
        r#"select occurrence as "occurrence!", code from coupons where occurrence = any($1)"#,
        names as &[&str]
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|r| (r.occurrence, r.code))
    .collect();
    Ok(codes.into_iter().collect())
}

/// Codes left in `pool`, counted up to `at_most` (enough to compare with the low-water mark
/// without counting a large pool).
async fn remaining(conn: &mut PgConnection, pool: &str, at_most: i64) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(
        r#"select count(*) as "count!"
           from (select 1 from coupons where pool = $1 and occurrence is null limit $2) as f"#,
        pool,
        at_most
    )
    .fetch_one(conn)
    .await
}

/// What an import did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Imported {
    /// New codes added.
    pub added: u64,
    /// Codes already in the pool (skipped).
    pub duplicates: u64,
    /// Codes left in the pool now.
    pub available: i64,
}

/// Loads the codes of `file` (one per line; blank lines and `#` comments skipped; a CSV's
/// first column) into `pool`. A code already there is skipped, so an import can be re-run.
pub(crate) async fn import(pool_db: &PgPool, pool: &str, file: &Path) -> anyhow::Result<Imported> {
    if pool.is_empty() || pool.len() > 64 {
        bail!("pool name {pool:?}: 1 to 64 characters");
    }
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let mut codes = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.split(',').next().unwrap_or("").trim();
        if code.is_empty() || code.starts_with('#') {
            continue;
        }
        if code.len() > MAX_CODE || !code.chars().all(|c| c.is_ascii_graphic()) {
            bail!(
                "{}:{}: a code is 1 to {MAX_CODE} printable ASCII characters without spaces",
                file.display(),
                n + 1
            );
        }
        codes.push(code.to_owned());
    }
    let added = sqlx::query!(
        "insert into coupons (pool, code) select $1, c from unnest($2::text[]) as c
         on conflict (pool, code) do nothing",
        pool,
        &codes
    )
    .execute(pool_db)
    .await
    .context("importing coupon codes")?
    .rows_affected();
    let available: i64 = sqlx::query_scalar!(
        r#"select count(*) as "count!" from coupons where pool = $1 and occurrence is null"#,
        pool
    )
    .fetch_one(pool_db)
    .await?;
    Ok(Imported {
        added,
        duplicates: codes.len() as u64 - added,
        available,
    })
}
