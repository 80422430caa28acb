//! `templates check`, `users` and `coupons`: what a shop sets up.

use std::path::PathBuf;

use clap::Subcommand;

use crate::config::Settings;

#[derive(Subcommand)]
pub(super) enum TemplatesAction {
    /// Compile every template and report the first error.
    Check,
}

#[derive(Subcommand)]
pub(super) enum UsersAction {
    /// Add a user (or give one new credentials): prints a one-time console password and an
    /// API token.
    Add {
        /// The user's name (letters, digits, '.', '_', '-', '@').
        name: String,
        /// ops (everything) or marketer (templates, previews, test sends, reading members).
        #[arg(long)]
        role: String,
        /// The user's own email address: their test sends may always go there.
        #[arg(long)]
        email: Option<String>,
        /// The user's own number (E.164): their test SMS may always go there.
        #[arg(long)]
        phone: Option<String>,
    },
    /// Remove a user: their console sessions end and their API token stops working.
    Remove {
        /// The user's name.
        name: String,
    },
}

#[derive(Subcommand)]
pub(super) enum CouponsAction {
    /// Load unique codes (one per line, or a CSV's first column) into a pool.
    Import {
        /// The pool's name, as `[program.coupons]` names it.
        pool: String,
        /// The file of codes.
        file: PathBuf,
    },
}

/// Compiles and renders every template with its trigger's sample context.
pub(super) fn templates(action: TemplatesAction, settings: &Settings) -> anyhow::Result<()> {
    let TemplatesAction::Check = action;
    let dir = settings.templates_dir.as_deref();
    let templates = crate::render::Templates::load_configured(dir)?;
    let warnings = templates.check(settings.dispatch.sms_max_segments)?;
    for warning in &warnings {
        println!("warning: {warning}");
    }
    let which = dir.map_or("the shipped templates".to_owned(), |d| {
        format!("templates in {}", d.display())
    });
    println!("{which} are valid ({} warnings)", warnings.len());
    Ok(())
}

/// Adds or removes a console and API user.
pub(super) async fn users(action: UsersAction, settings: &Settings) -> anyhow::Result<()> {
    match action {
        UsersAction::Add {
            name,
            role,
            email,
            phone,
        } => {
            // The arguments are checked before the database is touched.
            let role =
                crate::users::Role::parse(&role).map_err(|e| anyhow::anyhow!("--role: {e}"))?;
            let contact = crate::users::Contact {
                email: email
                    .map(|e| crate::domain::Email::parse(&e))
                    .transpose()
                    .map_err(|e| anyhow::anyhow!("--email: {e}"))?,
                phone: phone
                    .map(|p| crate::domain::Phone::parse(&p))
                    .transpose()
                    .map_err(|e| anyhow::anyhow!("--phone: {e}"))?,
            };
            let pool = open(settings).await?;
            let credentials = crate::users::add(&pool, &name, role, &contact).await?;
            println!("user: {name} ({})", role.as_str());
            println!("password: {}", credentials.password);
            println!("token: {}", credentials.token);
        }
        UsersAction::Remove { name } => {
            let pool = open(settings).await?;
            if !crate::users::remove(&pool, &name).await? {
                anyhow::bail!("no user {name:?}");
            }
            println!("user {name} removed: their sessions ended and their token no longer works");
        }
    }
    Ok(())
}

/// Migrates the database (creating it when missing) and opens a pool of one connection.
async fn open(settings: &Settings) -> anyhow::Result<sqlx::PgPool> {
    crate::db::migrate(&settings.database_url).await?;
    crate::db::pool(&settings.database_url, 1)
}

/// Loads coupon codes into a pool.
pub(super) async fn coupons(action: CouponsAction, settings: &Settings) -> anyhow::Result<()> {
    let CouponsAction::Import { pool, file } = action;
    let db = open(settings).await?;
    let done = crate::coupons::import(&db, &pool, &file).await?;
    println!(
        "pool {pool}: {} codes added, {} already there, {} available",
        done.added, done.duplicates, done.available
    );
    Ok(())
}
