//! The marketer's template versions, in PostgreSQL, over the shipped templates (version 0).
//!
//! A version holds one (trigger, locale)'s files for both channels. Saving validates it (as
//! `templates check` does) and keeps it as that pair's one draft; publishing a version makes
//! dispatch use it; publishing an earlier one rolls back (version 0: the shipped files). Each
//! publish bumps a sequence; every replica reads it every second and reloads when it moved,
//! so a publish is seen everywhere within about a second, without a restart.
//!
//! Dispatch takes the [`Catalog`] in force when it claims a batch and renders the whole batch
//! with it, recording each message's version. A test send names its version and is rendered
//! with exactly that one.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use tracing::{info, warn};

use crate::domain::Trigger;
use crate::render::{FileError, Templates};
use crate::shutdown::Shutdown;

/// Template files by name (`email.subject.hbs` …).
pub(crate) type Files = BTreeMap<String, String>;

/// The templates in force: the shipped ones with every published version in place.
pub struct Catalog {
    /// Compiled, ready to render.
    pub templates: Arc<Templates>,
    /// The published version of each (trigger, locale) that has one above 0.
    versions: HashMap<(Trigger, String), i32>,
    /// The heads this catalog was built from: (trigger, locale, version, seq) of every row of
    /// `template_heads`, sorted. A reload compares them all, not just the highest `seq`: two
    /// publishes that commit out of sequence order leave the highest unchanged.
    heads: Vec<Head>,
}

/// A row of `template_heads`: (trigger, locale, version, seq).
type Head = (String, String, i32, i64);

impl Catalog {
    /// The version in force for a (trigger, resolved locale).
    pub fn version(&self, trigger: Trigger, locale: &str) -> i32 {
        self.versions
            .get(&(trigger, locale.to_owned()))
            .copied()
            .unwrap_or(0)
    }
}

/// One version as the API lists it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Version {
    /// 0 for the shipped files.
    pub version: i32,
    /// `draft`, `published` or `archived`.
    pub state: String,
    /// The files, by name.
    pub files: Files,
    /// Who saved it (`lifecycle` for the shipped files).
    pub author: String,
    /// When it was saved (null for the shipped files).
    pub created_at: Option<DateTime<Utc>>,
}

/// A (trigger, locale) with its published and draft versions.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Pair {
    /// The trigger.
    pub trigger: String,
    /// The locale.
    pub locale: String,
    /// The version dispatch uses.
    pub published: i32,
    /// The draft, if there is one.
    pub draft: Option<i32>,
}

/// Why a store operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The version does not validate.
    #[error("the template does not validate: {}", describe(.0))]
    Invalid(Vec<FileError>),
    /// No such version.
    #[error("{0}")]
    NotFound(String),
    /// The database failed.
    #[error(transparent)]
    Database(#[from] anyhow::Error),
}

/// File errors on one line: `sms.hbs line 2: …; email.mjml.hbs: …`.
fn describe(errors: &[FileError]) -> String {
    errors
        .iter()
        .map(|e| match (e.file.as_str(), e.line) {
            ("", _) => e.message.clone(),
            (file, Some(line)) => format!("{file} line {line}: {}", e.message),
            (file, None) => format!("{file}: {}", e.message),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

impl StoreError {
    /// A compile or render that panicked (or could not run): the version is refused, with why.
    fn panicked(error: anyhow::Error) -> StoreError {
        StoreError::Invalid(vec![FileError {
            file: String::new(),
            line: None,
            message: format!("{error:#}"),
        }])
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> StoreError {
        StoreError::Database(e.into())
    }
}

/// The template store: the shipped templates, the catalog in force, and versions compiled on
/// demand (test sends, and messages claimed under a catalog since replaced).
pub struct TemplateStore {
    pool: PgPool,
    base: Arc<Templates>,
    current: RwLock<Arc<Catalog>>,
    compiled: Mutex<HashMap<(Trigger, String, i32), Arc<Templates>>>,
    /// Compiles and renders a marketer's requests make (save, publish, preview, test send,
    /// message detail) run a few at a time, so that dispatch's renders always find threads of
    /// the blocking pool, however many such requests come at once.
    requests: Arc<tokio::sync::Semaphore>,
}

/// A marketer's compiles and renders at once (see `TemplateStore::requests`).
const REQUEST_RENDERS: usize = 2;

/// Runs `work` (compiling, rendering: CPU work that a template makes as long as its budget
/// allows) on the blocking pool, off the async workers that answer `/healthz`, renew claims
/// and record results; a panic in it is an error.
pub(crate) async fn off_workers<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(move || {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).map_err(|panic| {
            anyhow::anyhow!(
                "rendering panicked: {}",
                crate::shutdown::panic_message(&*panic)
            )
        })
    })
    .await
    .context("the blocking pool refused the work")?
}

/// The channel a publish is announced on (`NOTIFY`), so that every replica reloads at once.
const PUBLISHED_CHANNEL: &str = "lifecycle_templates";

/// A connection listening for publishes, or None (logged) when it cannot be had now.
async fn listen(pool: &PgPool) -> Option<sqlx::postgres::PgListener> {
    let attempt = async {
        let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
        listener.listen(PUBLISHED_CHANNEL).await?;
        Ok::<_, sqlx::Error>(listener)
    };
    match tokio::time::timeout(Duration::from_secs(5), attempt).await {
        Ok(Ok(listener)) => Some(listener),
        Ok(Err(error)) => {
            warn!(%error, "Listening for template publishes failed; polling meanwhile.");
            None
        }
        Err(_) => None,
    }
}

/// Compiled versions kept besides the catalog; more are dropped (and compiled again if asked).
const COMPILED_KEPT: usize = 64;

impl TemplateStore {
    /// The store over `base` (version 0), with the published versions loaded.
    pub async fn open(pool: PgPool, base: Templates) -> anyhow::Result<TemplateStore> {
        let base = Arc::new(base);
        let store = TemplateStore {
            current: RwLock::new(Arc::new(Catalog {
                templates: base.clone(),
                versions: HashMap::new(),
                heads: vec![("(none loaded)".into(), String::new(), -1, -1)],
            })),
            compiled: Mutex::new(HashMap::new()),
            base,
            pool,
            requests: Arc::new(tokio::sync::Semaphore::new(REQUEST_RENDERS)),
        };
        store.reload().await?;
        Ok(store)
    }

    /// The catalog in force.
    pub fn current(&self) -> Arc<Catalog> {
        self.current.read().expect("catalog lock").clone()
    }

    /// The shipped templates.
    pub fn shipped(&self) -> &Templates {
        &self.base
    }

    /// Rebuilds the catalog when a publish happened since it was built.
    pub async fn reload(&self) -> anyhow::Result<bool> {
        let heads: Vec<Head> = sqlx::query!(
            "select trigger, locale, version, seq from template_heads order by trigger, locale"
        )
        .fetch_all(&self.pool)
        .await
        .context("reading the published template versions")?
        .into_iter()
        .map(|r| (r.trigger, r.locale, r.version, r.seq))
        .collect();
        if heads == self.current().heads {
            return Ok(false);
        }
        let rows = sqlx::query!(
            "select h.trigger, h.locale, h.version, v.files
             from template_heads h
             join template_versions v using (trigger, locale, version)
             where h.version > 0"
        )
        .fetch_all(&self.pool)
        .await
        .context("loading the published templates")?;
        let published: Vec<(String, String, i32, serde_json::Value)> = rows
            .into_iter()
            .map(|row| (row.trigger, row.locale, row.version, row.files))
            .collect();
        let base = self.base.clone();
        let (templates, versions) = off_workers(move || {
            let mut templates = (*base).clone();
            let mut versions = HashMap::new();
            for (name, locale, version, files) in published {
                let Some(trigger) = Trigger::parse(&name) else {
                    continue;
                };
                let files: Files = serde_json::from_value(files).unwrap_or_default();
                match templates.overlay(trigger, &locale, &files) {
                    Ok(next) => {
                        templates = next;
                        versions.insert((trigger, locale), version);
                    }
                    // Validated when saved; the shipped templates (or the limits) may have
                    // changed since. The pair stays on version 0.
                    Err(errors) => warn!(
                        trigger = name,
                        locale,
                        version,
                        ?errors,
                        "A published template version no longer validates; using the shipped one."
                    ),
                }
            }
            // The published emails keep their frames in the shipped templates' cache.
            (templates.sharing_frames(&base), versions)
        })
        .await?;
        info!(published = versions.len(), "Templates loaded.");
        *self.current.write().expect("catalog lock") = Arc::new(Catalog {
            templates: Arc::new(templates),
            versions,
            heads,
        });
        Ok(true)
    }

    /// Reloads when a publish is announced (`NOTIFY lifecycle_templates`), and every second in
    /// any case (a notification is lost while the listening connection is down), until
    /// shutdown; a failure is logged and tried again.
    pub async fn watch(self: Arc<Self>, shutdown: Shutdown) -> anyhow::Result<()> {
        let mut listener: Option<sqlx::postgres::PgListener> = None;
        loop {
            if listener.is_none() {
                listener = listen(&self.pool).await;
            }
            let announced = async {
                match listener.as_mut() {
                    Some(l) => l.try_recv().await.map(|n| n.is_some()).unwrap_or(false),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                heard = announced => {
                    // A lost connection ends the wait too: listen again next time round.
                    if !heard {
                        listener = None;
                    }
                }
                _ = shutdown.sleep(Duration::from_secs(1)) => {}
            }
            if shutdown.is_triggered() {
                return Ok(());
            }
            if let Err(error) = self.reload().await {
                warn!(
                    error = format!("{error:#}"),
                    "Checking for published templates failed."
                );
            }
        }
    }

    /// The templates of exactly `version` of (trigger, locale): the catalog's when it is the
    /// one in force, else compiled from the stored version (and kept a while).
    pub async fn templates_of(
        &self,
        trigger: Trigger,
        locale: &str,
        version: i32,
    ) -> Result<Arc<Templates>, StoreError> {
        self.version_templates(trigger, locale, version, false)
            .await
    }

    /// `templates_of` for a marketer's or an operator's request (a message's page, a test
    /// send): a compile it needs waits its turn among the requests' (`REQUEST_RENDERS`), so
    /// that opening many messages pinned to many versions does not fill the blocking pool.
    pub async fn templates_of_for_request(
        &self,
        trigger: Trigger,
        locale: &str,
        version: i32,
    ) -> Result<Arc<Templates>, StoreError> {
        self.version_templates(trigger, locale, version, true).await
    }

    async fn version_templates(
        &self,
        trigger: Trigger,
        locale: &str,
        version: i32,
        for_request: bool,
    ) -> Result<Arc<Templates>, StoreError> {
        let catalog = self.current();
        if catalog.version(trigger, locale) == version
            && catalog.templates.has_pair(trigger, locale)
        {
            return Ok(catalog.templates.clone());
        }
        let key = (trigger, locale.to_owned(), version);
        if let Some(t) = self.compiled.lock().expect("compiled lock").get(&key) {
            return Ok(t.clone());
        }
        let files = self.files(trigger, locale, version).await?;
        let turn = match for_request {
            true => Some(
                self.requests
                    .clone()
                    .acquire_owned()
                    .await
                    .context("the template store is closed")?,
            ),
            false => None,
        };
        let base = self.base.clone();
        let locale_owned = locale.to_owned();
        let compiled = off_workers(move || {
            let _turn = turn;
            base.overlay(trigger, &locale_owned, &files)
                .map(|t| t.sharing_frames(&base))
        })
        .await
        .map_err(StoreError::panicked)?
        .map_err(StoreError::Invalid)?;
        let compiled = Arc::new(compiled);
        let mut kept = self.compiled.lock().expect("compiled lock");
        if kept.len() >= COMPILED_KEPT {
            kept.clear();
        }
        kept.insert(key, compiled.clone());
        Ok(compiled)
    }

    /// The files of a version (0: the shipped ones).
    pub async fn files(
        &self,
        trigger: Trigger,
        locale: &str,
        version: i32,
    ) -> Result<Files, StoreError> {
        if version == 0 {
            let files = self.base.files(trigger, locale);
            if files.is_empty() {
                return Err(StoreError::NotFound(format!(
                    "{}/{locale} has no shipped templates",
                    trigger.as_str()
                )));
            }
            return Ok(files);
        }
        let files: Option<serde_json::Value> = sqlx::query_scalar!(
            "select files from template_versions
             where trigger = $1 and locale = $2 and version = $3",
            trigger.as_str(),
            locale,
            version
        )
        .fetch_optional(&self.pool)
        .await?;
        let files = files.ok_or_else(|| {
            StoreError::NotFound(format!(
                "{}/{locale} has no version {version}",
                trigger.as_str()
            ))
        })?;
        serde_json::from_value(files).map_err(|e| {
            StoreError::Invalid(vec![FileError {
                file: String::new(),
                line: None,
                message: format!("the stored files are not a map of file names to text: {e}"),
            }])
        })
    }

    /// The published version of (trigger, locale) as stored (not as this replica last
    /// loaded it).
    pub async fn published(&self, trigger: Trigger, locale: &str) -> Result<i32, StoreError> {
        let version: Option<i32> = sqlx::query_scalar!(
            "select version from template_heads where trigger = $1 and locale = $2",
            trigger.as_str(),
            locale
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok(version.unwrap_or(0))
    }

    /// The draft of (trigger, locale), if there is one.
    pub async fn draft(&self, trigger: Trigger, locale: &str) -> Result<Option<i32>, StoreError> {
        Ok(sqlx::query_scalar!(
            "select version from template_versions
             where trigger = $1 and locale = $2 and state = 'draft'",
            trigger.as_str(),
            locale
        )
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Every (trigger, locale) that has templates (shipped or versions), with its published
    /// and draft versions.
    pub async fn pairs(&self) -> Result<Vec<Pair>, StoreError> {
        let mut pairs: BTreeMap<(String, String), Pair> = self
            .base
            .pairs()
            .into_iter()
            .map(|(trigger, locale)| {
                let pair = Pair {
                    trigger: trigger.as_str().to_owned(),
                    locale: locale.clone(),
                    published: 0,
                    draft: None,
                };
                ((trigger.as_str().to_owned(), locale), pair)
            })
            .collect();
        let rows = sqlx::query!(
            r#"select trigger, locale,
                      (select h.version from template_heads h
                       where h.trigger = v.trigger and h.locale = v.locale) as "published?",
                      max(version) filter (where state = 'draft') as "draft?"
               from template_versions v group by trigger, locale"#
        )
        .fetch_all(&self.pool)
        .await?;
        for row in rows {
            let key: (String, String) = (row.trigger, row.locale);
            let pair = pairs.entry(key.clone()).or_insert_with(|| Pair {
                trigger: key.0,
                locale: key.1,
                published: 0,
                draft: None,
            });
            pair.published = row.published.unwrap_or(0);
            pair.draft = row.draft;
        }
        Ok(pairs.into_values().collect())
    }

    /// Every version of (trigger, locale), newest first, version 0 last.
    pub async fn versions(
        &self,
        trigger: Trigger,
        locale: &str,
    ) -> Result<Vec<Version>, StoreError> {
        let published = self.published(trigger, locale).await?;
        let rows = sqlx::query!(
            "select version, state, files, author, created_at from template_versions
             where trigger = $1 and locale = $2 order by version desc",
            trigger.as_str(),
            locale
        )
        .fetch_all(&self.pool)
        .await?;
        let mut versions: Vec<Version> = rows
            .into_iter()
            .map(|r| Version {
                version: r.version,
                state: r.state,
                files: serde_json::from_value(r.files).unwrap_or_default(),
                author: r.author,
                created_at: Some(r.created_at),
            })
            .collect();
        let shipped = self.base.files(trigger, locale);
        if !shipped.is_empty() {
            versions.push(Version {
                version: 0,
                state: if published == 0 {
                    "published"
                } else {
                    "archived"
                }
                .to_owned(),
                files: shipped,
                author: "lifecycle".to_owned(),
                created_at: None,
            });
        }
        if versions.is_empty() {
            return Err(StoreError::NotFound(format!(
                "{}/{locale} has no templates",
                trigger.as_str()
            )));
        }
        Ok(versions)
    }

    /// `changes` over the published files (a `None` removes a file): the files a draft would
    /// hold.
    pub async fn merged(
        &self,
        trigger: Trigger,
        locale: &str,
        changes: &BTreeMap<String, Option<String>>,
    ) -> Result<Files, StoreError> {
        let published = self.published(trigger, locale).await?;
        let mut files = match self.files(trigger, locale, published).await {
            Ok(files) => files,
            // A locale with no templates yet: the draft must bring every file.
            Err(StoreError::NotFound(_)) => Files::new(),
            Err(e) => return Err(e),
        };
        for (name, text) in changes {
            match text {
                Some(text) => files.insert(name.clone(), text.clone()),
                None => files.remove(name),
            };
        }
        Ok(files)
    }

    /// Runs a marketer's request's compile or render (`work`, given the shipped templates) off
    /// the async workers, a few at a time (`REQUEST_RENDERS`).
    pub async fn for_request<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Templates) -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        // The turn goes with the work: a request given up (its client gone) leaves its work
        // running on the blocking pool, and the turn taken until it ends.
        let turn = self
            .requests
            .clone()
            .acquire_owned()
            .await
            .context("the template store is closed")?;
        let base = self.base.clone();
        off_workers(move || {
            let _turn = turn;
            work(&base)
        })
        .await
    }

    /// `files` over the shipped templates as (trigger, locale)'s version, validated as a
    /// save is (`Templates::overlay`: each file compiles within its limits, the sample context
    /// renders within the render budget), off the async workers.
    pub async fn validate(
        &self,
        trigger: Trigger,
        locale: &str,
        files: Files,
    ) -> Result<Templates, StoreError> {
        let locale = locale.to_owned();
        self.for_request(move |base| base.overlay(trigger, &locale, &files))
            .await
            .map_err(StoreError::panicked)?
            .map_err(StoreError::Invalid)
    }

    /// A transaction holding (trigger, locale)'s lock: saves and publishes of one pair go one
    /// at a time.
    async fn locked(
        &self,
        trigger: Trigger,
        locale: &str,
    ) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query!(
            "select pg_advisory_xact_lock(hashtextextended('templates:' || $1 || '/' || $2, 0))",
            trigger.as_str(),
            locale
        )
        .execute(&mut *tx)
        .await?;
        Ok(tx)
    }

    /// Validates `files` and saves them as a new version, the draft of (trigger, locale) (the
    /// draft there was is archived); returns its number. Nothing is saved when they do not validate.
    pub async fn save_draft(
        &self,
        trigger: Trigger,
        locale: &str,
        files: &Files,
        author: &str,
    ) -> Result<i32, StoreError> {
        self.validate(trigger, locale, files.clone()).await?;
        let files_json = serde_json::to_value(files).expect("files serialize");
        // One saver at a time per pair: the draft's number is decided under this lock.
        let mut tx = self.locked(trigger, locale).await?;
        // Versions never change once saved (a test send or a claimed message may be rendering
        // one): a new save is a new version, and the draft it replaces is archived.
        sqlx::query!(
            "update template_versions set state = 'archived'
             where trigger = $1 and locale = $2 and state = 'draft'",
            trigger.as_str(),
            locale
        )
        .execute(&mut *tx)
        .await?;
        let version: i32 = sqlx::query_scalar!(
            "insert into template_versions (trigger, locale, version, state, files, author)
             select $1, $2, coalesce((select max(version) from template_versions
                                      where trigger = $1 and locale = $2), 0) + 1,
                    'draft', $3, $4
             returning version",
            trigger.as_str(),
            locale,
            &files_json,
            author
        )
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(version)
    }

    /// Makes `version` of (trigger, locale) the one dispatch uses (0: the shipped files),
    /// archiving the one it replaces. This replica reloads at once; the others within a
    /// second.
    pub async fn publish(
        &self,
        trigger: Trigger,
        locale: &str,
        version: i32,
        by: &str,
    ) -> Result<(), StoreError> {
        // It must exist and still validate.
        let files = self.files(trigger, locale, version).await?;
        self.validate(trigger, locale, files).await?;
        let mut tx = self.locked(trigger, locale).await?;
        sqlx::query!(
            "update template_versions
             set state = case when version = $3 then 'published' else 'archived' end
             where trigger = $1 and locale = $2 and (state = 'published' or version = $3)",
            trigger.as_str(),
            locale,
            version
        )
        .execute(&mut *tx)
        .await?;
        sqlx::query!(
            "insert into template_heads (trigger, locale, version, published_by)
             values ($1, $2, $3, $4)
             on conflict (trigger, locale) do update
             set version = excluded.version, seq = nextval('template_publish_seq'),
                 published_by = excluded.published_by, published_at = now()",
            trigger.as_str(),
            locale,
            version,
            by
        )
        .execute(&mut *tx)
        .await?;
        sqlx::query!(
            "select pg_notify($1, $2)",
            PUBLISHED_CHANNEL,
            format!("{}/{locale}", trigger.as_str())
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        info!(
            trigger = trigger.as_str(),
            locale, version, by, "Template version published."
        );
        self.reload().await?;
        Ok(())
    }
}
