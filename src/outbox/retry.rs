//! Failed messages put back in the queue by ops, a page at a time.

use anyhow::Context;
use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};

use super::search::{FILTERED, Filter};

/// Which failed messages to put back in the queue.
pub enum Requeue<'a> {
    /// These (those of them that are failed).
    Ids(&'a [i64]),
    /// Every failed one matching.
    Matching(&'a Filter),
}

/// Failed messages requeued per statement: a million failures go back in a thousand short
/// transactions, never in one long one, and no list of them is held in memory.
pub(crate) const RETRY_PAGE: i64 = 1_000;

/// Puts failed messages back in the queue (ops, after fixing what made them fail), a page at a
/// time. They are due at `now` with their attempts counted afresh; the earlier attempts stay
/// recorded. A retried message renders with the version published for its pair when it goes
/// (its pin is dropped: the failure may have been the template's); a test send keeps the
/// version it was asked for. Returns how many.
///
/// Built at run time, not checked at compile time: its `where` clause is `FILTERED`, shared
/// with the search.
pub async fn retry_failed(
    pool: &PgPool,
    which: Requeue<'_>,
    now: DateTime<Utc>,
) -> anyhow::Result<u64> {
    let (ids, filter) = match which {
        Requeue::Ids(ids) => (Some(ids), Filter::default()),
        Requeue::Matching(filter) => (None, filter.clone()),
    };
    let sql = format!(
        "with page as (
             select id from messages
             where status = 'failed' and {FILTERED}
               and ($9::bigint[] is null or id = any($9)) and id > $10
             order by id limit $11
             for update skip locked
         )
         update messages m
         set status = 'pending', due_at = $12, attempts = 0, finished_at = null,
             claimed_until = null, claimed_by = null,
             template_version = case when m.test then m.template_version end,
             template_locale = case when m.test then m.template_locale end
         from page where m.id = page.id
         returning m.id"
    );
    let mut after = 0_i64;
    let mut requeued = 0_u64;
    loop {
        // Along the failed index from `after`, however stale the table's statistics: without
        // them (a million failures just now) the planner read every failed message and sorted
        // them for each page, 0.5 s a page instead of 25 ms.
        let mut tx = pool
            .begin_with(
                "begin; set local enable_seqscan = off; set local enable_bitmapscan = off;
                 set local enable_sort = off",
            )
            .await?;
        let page: Vec<i64> = filter
            .bind(sqlx::query(&sql))
            .bind(ids)
            .bind(after)
            .bind(RETRY_PAGE)
            .bind(now)
            .fetch_all(&mut *tx)
            .await
            .context("requeueing failed messages")?
            .iter()
            .map(|row| row.get(0))
            .collect();
        tx.commit().await?;
        requeued += page.len() as u64;
        match page.iter().max() {
            Some(last) if page.len() as i64 == RETRY_PAGE => after = *last,
            _ => return Ok(requeued),
        }
    }
}
