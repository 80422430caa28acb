//! Scheduled scans: lot expiry, points-expiring notices, birthdays, due cart timers, and the
//! pruning of old rows (`[retention]`).
//!
//! Each scan has a cron expression (`[scheduler]`, seconds first, UTC) and a row in
//! `scheduled_jobs`. A replica runs a scan when the first cron instant after its `last_run`
//! has come on the business clock, and only after taking the row's lease on the condition that
//! `last_run` is still what it read: of replicas racing for the same instant one runs it, the
//! others find it done. A scan missed while every worker was down runs once on return.
//!
//! Scans are level-triggered: they look for what is due *now* (a birthday whose send time has
//! passed today, lots within a notice period, carts past their timer), not for what falls
//! exactly on the cron instant. So a late or missed run loses nothing, and dedupe keys make a
//! second run (a lease that lapsed mid-scan) harmless.
//!
//! A scan renews its lease while it runs, so a long scan is not taken over by another replica;
//! a scan that fails is logged and retried on the next tick without holding up the others.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Datelike, NaiveDate, Utc};
use tracing::{debug, info, warn};

use crate::app::App;
use crate::backoff::Backoff;
use crate::config::Cron;
use crate::domain::points::EntryKind;
use crate::ledger::{self, ScanChange};
use crate::metrics::Metrics;
use crate::outbox;
use crate::shutdown::Shutdown;
use crate::triggers;

/// A scheduled scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job {
    /// Expire lapsed lots of every member (those with events are expired as events arrive).
    Expiry,
    /// Plan points-expiring notices.
    PointsExpiring,
    /// Plan birthday messages and bonuses.
    Birthday,
    /// Plan abandoned-cart messages of due carts.
    Carts,
    /// Prune old inbox rows, finished messages and attempts.
    Retention,
}

impl Job {
    /// Every scan, in the order a tick runs them (expiry first, so notices see what is left).
    pub const ALL: [Job; 5] = [
        Job::Expiry,
        Job::PointsExpiring,
        Job::Birthday,
        Job::Carts,
        Job::Retention,
    ];

    /// The name in `scheduled_jobs` and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Job::Expiry => "expiry",
            Job::PointsExpiring => "points-expiring",
            Job::Birthday => "birthday",
            Job::Carts => "carts",
            Job::Retention => "retention",
        }
    }

    fn cron(self, app: &App) -> &Cron {
        let s = &app.settings.scheduler;
        match self {
            Job::Expiry => &s.expiry,
            Job::PointsExpiring => &s.points_expiring,
            Job::Birthday => &s.birthday,
            Job::Carts => &s.carts,
            Job::Retention => &s.retention,
        }
    }
}

/// The longest real-time pause between looks at the schedule.
const MAX_POLL: Duration = Duration::from_secs(1);

/// The same with a fixed clock (tests, demos), which jumps when set: look again soon.
const MAX_POLL_FIXED: Duration = Duration::from_millis(50);

/// The scheduler role of a worker.
pub struct Scheduler {
    app: App,
    /// This replica's name in leases.
    holder: String,
}

impl Scheduler {
    /// A scheduler for this process.
    pub fn new(app: App) -> Scheduler {
        let holder = format!(
            "{}-{}-{:08x}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".into()),
            std::process::id(),
            rand::random::<u32>()
        );
        Scheduler { app, holder }
    }

    /// Runs due scans until shutdown. Database trouble is logged and retried with backoff;
    /// a scan that failed keeps its `last_run`, so it runs again.
    pub async fn run(self, shutdown: Shutdown) -> anyhow::Result<()> {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        info!(holder = %self.holder, "Scheduler started.");
        let health = self.app.health.clone();
        health
            .scheduler
            .store(true, std::sync::atomic::Ordering::Relaxed);
        while !shutdown.is_triggered() {
            let pause = match self.tick(&shutdown).await {
                Ok(pause) => {
                    backoff.reset();
                    pause
                }
                Err(error) => {
                    warn!(
                        error = crate::mask::text(&format!("{error:#}")),
                        "Scheduled scans failed; retrying."
                    );
                    backoff.next()
                }
            };
            shutdown.sleep(pause).await;
        }
        health
            .scheduler
            .store(false, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Runs every scan that is due and returns how long to wait before looking again. A scan
    /// that fails does not keep the others from running; the tick then ends with its error.
    async fn tick(&self, shutdown: &Shutdown) -> anyhow::Result<Duration> {
        let mut pause = if self.app.clock.is_fixed() {
            MAX_POLL_FIXED
        } else {
            MAX_POLL
        };
        let last_runs = last_runs(&self.app.pool).await?;
        let mut failed = None;
        for job in Job::ALL {
            if shutdown.is_triggered() {
                break;
            }
            let now = self.app.clock.now();
            let last_run = last_runs.get(job.as_str()).copied().flatten();
            let next = last_run.and_then(|last| job.cron(&self.app).next_after(last));
            match next {
                Some(next) if next > now => {
                    let wait = (next - now).to_std().unwrap_or_default();
                    pause = pause.min(wait.max(Duration::from_millis(20)));
                }
                // Never run (a new database) or an instant has come: run it. The instant is
                // logged, so that a scan run twice for one instant would show.
                instant => match self.run_leased(job, last_run, now).await {
                    Ok(Some(0)) => debug!(
                        scan = job.as_str(),
                        instant = %instant.unwrap_or(now),
                        "Scheduled scan ran."
                    ),
                    Ok(Some(planned)) => info!(
                        scan = job.as_str(),
                        instant = %instant.unwrap_or(now),
                        planned,
                        "Scheduled scan ran."
                    ),
                    Ok(None) => {}
                    Err(error) => {
                        warn!(
                            scan = job.as_str(),
                            error = crate::mask::text(&format!("{error:#}")),
                            "Scheduled scan failed; the others go on."
                        );
                        failed.get_or_insert(error.context(format!("scan {}", job.as_str())));
                    }
                },
            }
        }
        failed.map_or(Ok(pause), Err)
    }

    /// Runs the scan if this replica gets the lease while `last_run` is still `seen`; records
    /// the run and gives the lease back. `None`: another replica has it or has done it.
    pub async fn run_leased(
        &self,
        job: Job,
        seen: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> anyhow::Result<Option<usize>> {
        let lease_secs = self.app.settings.scheduler.lease_secs as f64;
        let taken = sqlx::query!(
            "update scheduled_jobs set leased_by = $2, lease_until = now() + make_interval(secs => $3)
             where job = $1 and last_run is not distinct from $4
               and (lease_until is null or lease_until < now())",
            job.as_str(),
            &self.holder,
            lease_secs,
            seen
        )
        .execute(&self.app.pool)
        .await?
        .rows_affected()
            == 1;
        if !taken {
            return Ok(None);
        }
        // The lease is renewed while the scan runs, so another replica never takes over a
        // scan that is merely long.
        let result = tokio::select! {
            result = run_scan(&self.app, job, now) => result,
            never = self.renew_lease(job) => match never {},
        };
        metrics::counter!(
            "lifecycle_scans_total",
            "scan" => job.as_str(),
            "result" => if result.is_ok() { "ok" } else { "failed" },
        )
        .increment(1);
        if let Ok(planned) = &result {
            Metrics::inc(&self.app.metrics.scans_run);
            self.app
                .metrics
                .scan_messages
                .fetch_add(*planned as u64, std::sync::atomic::Ordering::Relaxed);
        }
        // Only a completed scan moves `last_run`; a failed one leaves it to run again.
        sqlx::query!(
            "update scheduled_jobs
             set last_run = case when $3 then $4 else last_run end, leased_by = null, lease_until = null
             where job = $1 and leased_by = $2",
            job.as_str(),
            &self.holder,
            result.is_ok(),
            now
        )
        .execute(&self.app.pool)
        .await?;
        let planned = result?;
        if planned > 0 {
            self.app.outbox_ready.notify_one();
        }
        Ok(Some(planned))
    }
}

impl Scheduler {
    /// Extends this replica's lease on `job` every third of the lease, until dropped.
    async fn renew_lease(&self, job: Job) -> std::convert::Infallible {
        let lease_secs = self.app.settings.scheduler.lease_secs.max(3);
        loop {
            tokio::time::sleep(Duration::from_secs(lease_secs) / 3).await;
            let renewed = sqlx::query!(
                "update scheduled_jobs set lease_until = now() + make_interval(secs => $3)
                 where job = $1 and leased_by = $2",
                job.as_str(),
                &self.holder,
                lease_secs as f64
            )
            .execute(&self.app.pool)
            .await;
            match renewed {
                Ok(done) if done.rows_affected() == 0 => {
                    warn!(
                        scan = job.as_str(),
                        "The scan's lease was lost; another replica may run it too (harmless: dedupe keys)."
                    )
                }
                Ok(_) => {}
                Err(error) => {
                    warn!(scan = job.as_str(), %error, "Renewing the scan's lease failed.")
                }
            }
        }
    }
}

/// Each scan's last completed run (business time), by name, in one read. The rows of scans not
/// seen before are made first (a new database, or a new scan).
async fn last_runs(
    pool: &sqlx::PgPool,
) -> Result<HashMap<String, Option<DateTime<Utc>>>, sqlx::Error> {
    let read = || async {
        sqlx::query!("select job, last_run from scheduled_jobs")
            .fetch_all(pool)
            .await
            .map(|rows| {
                rows.into_iter()
                    .map(|r| (r.job, r.last_run))
                    .collect::<HashMap<_, _>>()
            })
    };
    let runs = read().await?;
    if Job::ALL.iter().all(|job| runs.contains_key(job.as_str())) {
        return Ok(runs);
    }
    let names: Vec<&str> = Job::ALL.iter().map(|job| job.as_str()).collect();
    sqlx::query!(
        "insert into scheduled_jobs (job) select unnest($1::text[]) on conflict do nothing",
        &names as &[&str]
    )
    .execute(pool)
    .await?;
    read().await
}

/// Whether every scan has run at its latest cron instant up to `now` (demos wait on it).
pub(crate) async fn caught_up(app: &App, now: DateTime<Utc>) -> anyhow::Result<bool> {
    let runs = last_runs(&app.pool).await?;
    Ok(Job::ALL.iter().all(|job| {
        runs.get(job.as_str())
            .copied()
            .flatten()
            .is_some_and(|last| job.cron(app).next_after(last).is_none_or(|next| next > now))
    }))
}

/// Runs one scan at business time `now`, a transaction per page of members or carts, and
/// returns the number of messages it planned (before outbox dedupe). Safe to run twice.
#[tracing::instrument(name = "scan", skip_all, fields(scan = job.as_str(), planned = tracing::field::Empty))]
pub async fn run_scan(app: &App, job: Job, now: DateTime<Utc>) -> anyhow::Result<usize> {
    let program = &app.settings.program;
    let limit = app.settings.scheduler.batch_size;
    let mut planned = 0;
    let mut after = String::new();
    if job == Job::Retention {
        prune(app).await?;
        return Ok(0);
    }
    loop {
        let mut tx = app.pool.begin().await?;
        let page: Vec<String> = match job {
            Job::Carts => {
                let due = ledger::carts::due(&mut tx, now, &after, limit).await?;
                let ids = due.iter().map(|c| c.cart_id.clone()).collect();
                planned += ledger::abandon_carts(&mut tx, &due, program, now).await?;
                ids
            }
            _ => {
                let ids = candidates(&mut tx, job, program, now, &after, limit).await?;
                let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
                let sinks = crate::notifications::Sinks::of(&app.settings);
                planned += ledger::update_members(&mut tx, &refs, program, now, sinks, |member| {
                    change(job, member, program, now)
                })
                .await?;
                ids
            }
        };
        tx.commit().await?;
        match page.last() {
            Some(last) if page.len() as i64 >= limit => after = last.clone(),
            _ => break,
        }
    }
    tracing::Span::current().record("planned", planned);
    Ok(planned)
}

/// Deletes what `[retention]` no longer keeps, a page per statement so no transaction holds
/// many rows: inbox rows, delivery attempts, then finished messages with their attempts
/// (their dedupe keys kept in `retired_keys`, so a pruned message can never be planned
/// again). Ages are in database time. Returns nothing; logs what it deleted.
async fn prune(app: &App) -> anyhow::Result<()> {
    let r = &app.settings.retention;
    let steps = [
        ("inbox", r.inbox_days),
        ("attempts", r.attempts_days),
        ("messages", r.messages_days),
        ("notifications", r.notifications_days),
    ];
    for (what, days) in steps {
        if days == 0 {
            continue;
        }
        let days = days as i32;
        let mut deleted = 0;
        loop {
            let done = match what {
                "inbox" => prune_inbox(&app.pool, days, r.page_size).await,
                "attempts" => outbox::prune_attempts(&app.pool, days, r.page_size).await,
                "notifications" => crate::notifications::prune(&app.pool, days, r.page_size).await,
                _ => outbox::prune_messages(&app.pool, days, r.page_size).await,
            }
            .with_context(|| format!("pruning {what}"))?;
            deleted += done;
            if done < r.page_size as u64 {
                break;
            }
        }
        if deleted > 0 {
            info!(what, deleted, days, "Pruned old rows.");
        }
    }
    Ok(())
}

/// Deletes one page of inbox rows older than `days`; returns how many. An event that was also
/// dead-lettered keeps its row: a replay of its letter, however late, must find it applied.
async fn prune_inbox(pool: &sqlx::PgPool, days: i32, page: i64) -> Result<u64, sqlx::Error> {
    let done = sqlx::query!(
        "delete from inbox where event_id in (
             select i.event_id from inbox i
             where i.applied_at < now() - make_interval(days => $1)
               and not exists (select 1 from dead_letters d where d.event_id = i.event_id)
             limit $2)",
        days,
        page
    )
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// What a member scan does to one member (pure).
fn change(
    job: Job,
    member: &mut ledger::MemberState,
    program: &crate::program::Program,
    now: DateTime<Utc>,
) -> Option<ScanChange> {
    match job {
        // `update_members` expires lapsed lots of every member it loads.
        Job::Expiry | Job::Carts | Job::Retention => None,
        Job::PointsExpiring => Some(ScanChange {
            planned: triggers::points_expiring(member, program, now),
            ..ScanChange::default()
        }),
        Job::Birthday => {
            let year = triggers::birthday_due(&member.member, program, now)?;
            let was = member.points.balance();
            let entries = member
                .points
                .earn(
                    EntryKind::Birthday,
                    program.birthday_bonus,
                    now,
                    program.expiry_months,
                )
                .into_iter()
                .collect();
            let key = format!("birthday:{}:{year}", member.member.profile.member_id);
            // The bonus may reach a reward: that is redemption-ready as any event's would be.
            let mut planned = triggers::birthday(member, year, program, now);
            planned.extend(triggers::crossed(was, member, &key, program, now));
            Some(ScanChange {
                planned,
                cause: key.clone(),
                once: Some(key),
                entries,
            })
        }
    }
}

/// A page of member ids a member scan looks at, after `after` in id order.
async fn candidates(
    conn: &mut sqlx::PgConnection,
    job: Job,
    program: &crate::program::Program,
    now: DateTime<Utc>,
    after: &str,
    limit: i64,
) -> Result<Vec<String>, sqlx::Error> {
    match job {
        Job::Expiry => {
            sqlx::query_scalar!(
                "select distinct member_id from point_lots
                 where expires_at <= $1 and member_id > $2 order by member_id limit $3",
                now,
                after,
                limit
            )
            .fetch_all(conn)
            .await
        }
        Job::PointsExpiring => {
            // A day more than the farthest notice: notices count days in the member's zone.
            let farthest = program.expiring_notice_days.first().copied().unwrap_or(0);
            let days = i32::try_from(farthest).unwrap_or(i32::MAX - 1) + 1;
            sqlx::query_scalar!(
                "select distinct member_id from point_lots
                 where expires_at > $1 and expires_at <= $1 + make_interval(days => $4)
                   and member_id > $2 order by member_id limit $3",
                now,
                after,
                limit,
                days
            )
            .fetch_all(conn)
            .await
        }
        Job::Birthday => {
            let (months, days): (Vec<i16>, Vec<i16>) = birthday_dates(now)
                .into_iter()
                .map(|d| (d.month() as i16, d.day() as i16))
                .unzip();
            sqlx::query_scalar!(
                "select member_id from members
                 where birthday_month is not null
                   and (birthday_month, birthday_day) in
                       (select * from unnest($3::smallint[], $4::smallint[]))
                   and member_id > $1 order by member_id limit $2",
                after,
                limit,
                &months,
                &days
            )
            .fetch_all(conn)
            .await
        }
        Job::Carts | Job::Retention => Ok(Vec::new()),
    }
}

/// The (month, day) pairs that are "today" somewhere on Earth at `now` (zones run from UTC−12
/// to UTC+14), plus 29 February when one of them is 28 February of a common year.
fn birthday_dates(now: DateTime<Utc>) -> Vec<NaiveDate> {
    let today = now.date_naive();
    let mut dates: Vec<NaiveDate> = [today.pred_opt(), Some(today), today.succ_opt()]
        .into_iter()
        .flatten()
        .collect();
    for date in dates.clone() {
        if date.month() == 2
            && date.day() == 28
            && NaiveDate::from_ymd_opt(date.year(), 2, 29).is_none()
        {
            // Any leap year has the date; only its month and day are used.
            dates.extend(NaiveDate::from_ymd_opt(2000, 2, 29));
        }
    }
    dates
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn birthday_candidates_cover_every_zone_and_29_february() {
        let at = |y, m, d, h| Utc.with_ymd_and_hms(y, m, d, h, 0, 0).unwrap();
        let md = |dates: Vec<NaiveDate>| {
            let mut v: Vec<(u32, u32)> = dates.iter().map(|d| (d.month(), d.day())).collect();
            v.sort();
            v
        };
        assert_eq!(
            md(birthday_dates(at(2026, 11, 22, 12))),
            vec![(11, 21), (11, 22), (11, 23)]
        );
        // 2027 is a common year: 28 February is also 29 February's day.
        assert_eq!(
            md(birthday_dates(at(2027, 2, 28, 12))),
            vec![(2, 27), (2, 28), (2, 29), (3, 1)]
        );
        // 2028 is a leap year: 29 February is its own day.
        assert_eq!(
            md(birthday_dates(at(2028, 2, 28, 12))),
            vec![(2, 27), (2, 28), (2, 29)]
        );
    }
}
