//! PostgreSQL: connecting, creating the database, migrations, and what a failure means.

use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

use crate::config::DatabaseUrl;

/// The schema, embedded in the binary. Migrations newer than this release's are a newer
/// release's, applied mid-upgrade: this one keeps working on that schema (expand/contract,
/// docs/deploy.md), so they are not an error (`refuse_unknown_older` still refuses the others).
fn migrator() -> sqlx::migrate::Migrator {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.set_ignore_missing(true);
    migrator
}

fn options(url: &DatabaseUrl) -> anyhow::Result<PgConnectOptions> {
    let options: PgConnectOptions = url
        .expose()
        .parse()
        .with_context(|| format!("parsing database URL {url}"))?;
    Ok(options
        .application_name("lifecycle")
        // Statements are prepared once per connection. A generic plan made while a table was
        // small (a new database, after a purge) scans it sequentially forever after; custom
        // plans see the table's current size. Planning these statements costs microseconds.
        //
        // No JIT: it compiles a statement for a quarter of a second whenever the planner
        // thinks it expensive, which lifecycle's short statements never repay (and the
        // report's scans lose by).
        .options([("plan_cache_mode", "force_custom_plan"), ("jit", "off")])
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(1)))
}

/// Begins a transaction whose statements find rows by key (a batch's members, the messages
/// of a claim). Without statistics (a new database, or a table grown since autovacuum last
/// analyzed it) the planner guesses that a list of a few hundred keys matches most of a table
/// and reads it whole: measured, ingest ran 1.6x and dispatch 4x slower on a fresh database
/// of 100,000 events. For these statements the index is always the right way.
pub async fn begin_keyed(
    pool: &PgPool,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
    pool.begin_with("begin; set local enable_seqscan = off")
        .await
}

/// A pool of at most `max` connections. Connections are made lazily, so a database that is
/// down at start-up is waited for by the callers' retries rather than failing the process.
pub fn pool(url: &DatabaseUrl, max: u32) -> anyhow::Result<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(options(url)?))
}

/// A pool for the HTTP API and console: each statement is cancelled by PostgreSQL after
/// `statement_timeout_ms` (`[http] statement_timeout_ms`), so no request, however it is
/// built, holds a connection or a core for longer.
pub(crate) fn pool_for_requests(
    url: &DatabaseUrl,
    max: u32,
    statement_timeout_ms: u64,
) -> anyhow::Result<PgPool> {
    let timeout = statement_timeout_ms.to_string();
    Ok(PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(options(url)?.options([("statement_timeout", timeout.as_str())])))
}

/// Creates the database named by `url` when it does not exist.
pub(crate) async fn create_if_missing(url: &DatabaseUrl) -> anyhow::Result<()> {
    let name = url.database();
    let mut admin = options(&url.with_database("postgres"))?
        .connect()
        .await
        .with_context(|| format!("connecting to PostgreSQL at {url}"))?;
    let exists: bool = sqlx::query_scalar!(
        r#"select exists (select 1 from pg_database where datname = $1) as "exists!""#,
        name
    )
    .fetch_one(&mut admin)
    .await?;
    if !exists {
        // The name was checked to be letters, digits and `_` when the URL was parsed.
        // Built at run time: a database name is an identifier, which cannot be a parameter.
        match sqlx::query(&format!("create database \"{name}\""))
            .execute(&mut admin)
            .await
        {
            Ok(_) => tracing::info!(database = name, "Created database."),
            // Another process created it first.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
            Err(e) => return Err(e).with_context(|| format!("creating database {name}")),
        }
    }
    admin.close().await.ok();
    Ok(())
}

/// Creates the database when missing and applies pending migrations.
pub(crate) async fn migrate(url: &DatabaseUrl) -> anyhow::Result<PgPool> {
    create_if_missing(url).await?;
    let pool = pool(url, 10)?;
    let migrator = migrator();
    migrator
        .run(&pool)
        .await
        .with_context(|| format!("applying migrations to {url}"))?;
    refuse_unknown_older(&migrator, &pool)
        .await
        .with_context(|| format!("checking the migrations applied to {url}"))?;
    Ok(pool)
}

/// Fails when the database holds an applied migration this release does not know that is not
/// newer than every one it knows: one renamed or removed, not a newer release's.
async fn refuse_unknown_older(
    migrator: &sqlx::migrate::Migrator,
    pool: &PgPool,
) -> anyhow::Result<()> {
    let known: Vec<i64> = migrator.iter().map(|m| m.version).collect();
    let newest = known.iter().copied().max().unwrap_or(0);
    // sqlx's own table, which migrations/ does not create: checked at run time.
    let applied: Vec<i64> = sqlx::query_scalar("select version from _sqlx_migrations")
        .fetch_all(pool)
        .await?;
    if let Some(unknown) = applied.iter().find(|v| **v <= newest && !known.contains(v)) {
        anyhow::bail!(
            "migration {unknown} was applied to this database but is not in this release's migrations/ (renamed or removed?)"
        );
    }
    Ok(())
}

/// Drops a database (tests and the benchmark clean up with it).
pub async fn drop_database(url: &DatabaseUrl) -> anyhow::Result<()> {
    let mut admin = options(&url.with_database("postgres"))?.connect().await?;
    // Built at run time: a database name is an identifier, which cannot be a parameter.
    sqlx::query(&format!(
        "drop database if exists \"{}\" with (force)",
        url.database()
    ))
    .execute(&mut admin)
    .await?;
    Ok(())
}

/// `is_transient` of the first database error in an error's chain; an error that holds none
/// (a pool or I/O failure wrapped by the caller) counts as passing.
pub(crate) fn is_transient_error(error: &anyhow::Error) -> bool {
    error
        .chain()
        .find_map(|e| e.downcast_ref::<sqlx::Error>())
        .is_none_or(is_transient)
}

/// Whether a database error may pass if the same work is tried again: lost connections,
/// deadlocks and serialization failures, a server shutting down or short of resources, and a
/// unique violation from a concurrent worker doing the same thing.
pub(crate) fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(e) => {
            let code = e.code().unwrap_or_default();
            matches!(&code[..2.min(code.len())], "08" | "40" | "53" | "57" | "58")
                || code == "23505"
        }
        _ => false,
    }
}
