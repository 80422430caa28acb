//! Console and API users: roles, argon2 password hashes, API tokens and console sessions.
//!
//! A user has a password (for the console's login form, stored as an argon2id PHC string) and
//! an API token (random, stored as its SHA-256: a token is long and random, so a fast hash is
//! enough, and looking one up by hash is an index probe). `LIFECYCLE_ADMIN_TOKEN`, when set,
//! is a bootstrap `ops` token. Sessions are random cookie values, stored by SHA-256, each with
//! its CSRF token, for 12 hours.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use base64::Engine;
use sqlx::PgPool;

/// What a user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything.
    Ops,
    /// Templates, previews, test sends, reading members.
    Marketer,
}

impl Role {
    /// `ops` or `marketer`.
    pub fn parse(raw: &str) -> anyhow::Result<Role> {
        match raw {
            "ops" => Ok(Role::Ops),
            "marketer" => Ok(Role::Marketer),
            _ => bail!("role {raw:?}: it is ops or marketer"),
        }
    }

    /// The role's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Ops => "ops",
            Role::Marketer => "marketer",
        }
    }
}

/// Who is asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// The user's name (`admin` for the bootstrap token).
    pub name: String,
    /// Their role.
    pub role: Role,
}

/// How long a console session lasts.
pub const SESSION_HOURS: i64 = 12;

/// A new user's one-time password and API token.
pub struct Credentials {
    /// For the console.
    pub password: String,
    /// For the API (`Authorization: Bearer …`).
    pub token: String,
}

/// A random string of `bytes` random bytes, URL-safe.
pub fn random_secret(bytes: usize) -> String {
    let mut buffer = vec![0u8; bytes];
    aws_lc_rs::rand::fill(&mut buffer).expect("the system's random source");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buffer)
}

/// SHA-256 of `secret`, hex.
pub fn sha256_hex(secret: &str) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, secret.as_bytes());
    hex::encode(digest)
}

/// An argon2id hash of `password` (PHC string).
pub fn hash_password(password: &str) -> anyhow::Result<String> {
    let mut salt = [0u8; 16];
    aws_lc_rs::rand::fill(&mut salt).expect("the system's random source");
    let salt = SaltString::encode_b64(&salt).map_err(|e| anyhow::anyhow!("salt: {e}"))?;
    Ok(argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("hashing the password: {e}"))?
        .to_string())
}

/// Whether `password` matches the PHC string `hash`.
pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|parsed| {
        argon2::Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    })
}

/// Adds a user (or replaces one of that name) and returns their new credentials, shown once.
pub async fn add(pool: &PgPool, name: &str, role: Role) -> anyhow::Result<Credentials> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-@".contains(c))
    {
        bail!("user name {name:?}: 1 to 64 letters, digits, '.', '_', '-' or '@'");
    }
    let credentials = Credentials {
        password: random_secret(12),
        token: format!("lc_{}", random_secret(32)),
    };
    let hash = {
        let password = credentials.password.clone();
        tokio::task::spawn_blocking(move || hash_password(&password)).await??
    };
    sqlx::query(
        "insert into users (name, role, password_hash, token_sha256) values ($1, $2, $3, $4)
         on conflict (name) do update set role = excluded.role,
             password_hash = excluded.password_hash, token_sha256 = excluded.token_sha256",
    )
    .bind(name)
    .bind(role.as_str())
    .bind(hash)
    .bind(sha256_hex(&credentials.token))
    .execute(pool)
    .await
    .context("saving the user")?;
    // Whoever held the old password is logged out.
    sqlx::query("delete from sessions where user_name = $1")
        .bind(name)
        .execute(pool)
        .await?;
    Ok(credentials)
}

/// The user whose API token this is.
pub async fn by_token(pool: &PgPool, token: &str) -> Result<Option<User>, sqlx::Error> {
    let row: Option<(String, String)> =
        sqlx::query_as("select name, role from users where token_sha256 = $1")
            .bind(sha256_hex(token))
            .fetch_optional(pool)
            .await?;
    Ok(row.and_then(|(name, role)| {
        Some(User {
            name,
            role: Role::parse(&role).ok()?,
        })
    }))
}

/// The user whose password this is. The hash is checked on the blocking pool (argon2 is
/// deliberately slow); an unknown user costs the same as a wrong password.
pub async fn by_password(
    pool: &PgPool,
    name: &str,
    password: &str,
) -> Result<Option<User>, sqlx::Error> {
    let row: Option<(String, String)> =
        sqlx::query_as("select role, password_hash from users where name = $1")
            .bind(name)
            .fetch_optional(pool)
            .await?;
    // An unknown name is checked against a hash all the same, so timing does not tell
    // which names exist.
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let dummy = DUMMY
        .get_or_init(|| hash_password("not a password").expect("hashing"))
        .clone();
    let (role, hash) = row.unwrap_or_else(|| (String::new(), dummy));
    let password = password.to_owned();
    let matches = tokio::task::spawn_blocking(move || verify_password(&password, &hash))
        .await
        .unwrap_or(false);
    Ok(match Role::parse(&role) {
        Ok(role) if matches => Some(User {
            name: name.to_owned(),
            role,
        }),
        _ => None,
    })
}

/// A console session: the cookie's value, and the CSRF token its forms carry.
pub struct Session {
    /// The cookie's value (only its hash is stored).
    pub cookie: String,
    /// The CSRF token.
    pub csrf: String,
}

/// Opens a session for `user`.
pub async fn open_session(pool: &PgPool, user: &str) -> Result<Session, sqlx::Error> {
    let session = Session {
        cookie: random_secret(32),
        csrf: random_secret(24),
    };
    sqlx::query(
        "insert into sessions (token_sha256, user_name, csrf, expires_at)
         values ($1, $2, $3, now() + make_interval(hours => $4))",
    )
    .bind(sha256_hex(&session.cookie))
    .bind(user)
    .bind(&session.csrf)
    .bind(SESSION_HOURS as i32)
    .execute(pool)
    .await?;
    // Expired sessions go as new ones come.
    sqlx::query("delete from sessions where expires_at < now()")
        .execute(pool)
        .await?;
    Ok(session)
}

/// The user and CSRF token of a live session.
pub async fn by_session(
    pool: &PgPool,
    cookie: &str,
) -> Result<Option<(User, String)>, sqlx::Error> {
    let row: Option<(String, String, String)> = sqlx::query_as(
        "select u.name, u.role, s.csrf from sessions s join users u on u.name = s.user_name
         where s.token_sha256 = $1 and s.expires_at > now()",
    )
    .bind(sha256_hex(cookie))
    .fetch_optional(pool)
    .await?;
    Ok(row.and_then(|(name, role, csrf)| {
        Some((
            User {
                name,
                role: Role::parse(&role).ok()?,
            },
            csrf,
        ))
    }))
}

/// Ends a session.
pub async fn close_session(pool: &PgPool, cookie: &str) -> Result<(), sqlx::Error> {
    sqlx::query("delete from sessions where token_sha256 = $1")
        .bind(sha256_hex(cookie))
        .execute(pool)
        .await?;
    Ok(())
}

/// Failed logins, per user name and per client address: after `LOGIN_FAILURES` failures in
/// `LOGIN_WINDOW`, that name (or address) is refused until the window has passed. Kept in
/// memory, per replica.
#[derive(Default)]
pub struct LoginThrottle {
    failures: Mutex<HashMap<String, (u32, Instant)>>,
}

/// Failures allowed per window.
pub const LOGIN_FAILURES: u32 = 5;
/// The window.
pub const LOGIN_WINDOW: Duration = Duration::from_secs(15 * 60);

impl LoginThrottle {
    fn keys(name: &str, addr: Option<IpAddr>) -> Vec<String> {
        let mut keys = vec![format!("user:{name}")];
        if let Some(addr) = addr {
            keys.push(format!("addr:{addr}"));
        }
        keys
    }

    /// How long until `name` from `addr` may try again, if it may not now.
    pub fn blocked(&self, name: &str, addr: Option<IpAddr>) -> Option<Duration> {
        let failures = self.failures.lock().expect("throttle lock");
        Self::keys(name, addr)
            .iter()
            .filter_map(|key| {
                let (count, since) = failures.get(key)?;
                let left = LOGIN_WINDOW.checked_sub(since.elapsed())?;
                (*count >= LOGIN_FAILURES).then_some(left)
            })
            .max()
    }

    /// Counts a failed login.
    pub fn failed(&self, name: &str, addr: Option<IpAddr>) {
        let mut failures = self.failures.lock().expect("throttle lock");
        if failures.len() > 100_000 {
            failures.retain(|_, (_, since)| since.elapsed() < LOGIN_WINDOW);
        }
        for key in Self::keys(name, addr) {
            let entry = failures.entry(key).or_insert((0, Instant::now()));
            if entry.1.elapsed() >= LOGIN_WINDOW {
                *entry = (0, Instant::now());
            }
            entry.0 += 1;
        }
    }

    /// Forgets a user's failures after a successful login (not the address's).
    pub fn succeeded(&self, name: &str) {
        self.failures
            .lock()
            .expect("throttle lock")
            .remove(&format!("user:{name}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_verify_only_themselves() {
        let hash = hash_password("correct horse").unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert!(verify_password("correct horse", &hash));
        assert!(!verify_password("correct horsf", &hash));
        assert!(!verify_password("x", "not a hash"));
    }

    #[test]
    fn the_throttle_blocks_after_five_failures_per_user_and_per_address() {
        let throttle = LoginThrottle::default();
        let addr: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..LOGIN_FAILURES {
            assert!(throttle.blocked("ada", Some(addr)).is_none());
            throttle.failed("ada", Some(addr));
        }
        assert!(throttle.blocked("ada", None).is_some(), "by name");
        assert!(throttle.blocked("bob", Some(addr)).is_some(), "by address");
        assert!(throttle.blocked("bob", "192.0.2.2".parse().ok()).is_none());
        throttle.succeeded("ada");
        assert!(throttle.blocked("ada", None).is_none());
    }
}
