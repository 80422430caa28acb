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
pub(crate) enum Role {
    /// Everything.
    Ops,
    /// Templates, previews, test sends, reading members.
    Marketer,
}

impl Role {
    /// `ops` or `marketer`.
    pub(crate) fn parse(raw: &str) -> anyhow::Result<Role> {
        match raw {
            "ops" => Ok(Role::Ops),
            "marketer" => Ok(Role::Marketer),
            _ => bail!("role {raw:?}: it is ops or marketer"),
        }
    }

    /// The role's name.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Role::Ops => "ops",
            Role::Marketer => "marketer",
        }
    }
}

/// Who is asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct User {
    /// The user's name (`admin` for the bootstrap token).
    pub name: String,
    /// Their role.
    pub role: Role,
}

/// How long a console session lasts.
pub(crate) const SESSION_HOURS: i64 = 12;

/// A new user's one-time password and API token.
pub(crate) struct Credentials {
    /// For the console.
    pub password: String,
    /// For the API (`Authorization: Bearer …`).
    pub token: String,
}

/// A random string of `bytes` random bytes, URL-safe.
pub(crate) fn random_secret(bytes: usize) -> String {
    let mut buffer = vec![0u8; bytes];
    aws_lc_rs::rand::fill(&mut buffer).expect("the system's random source");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buffer)
}

/// SHA-256 of `secret`, hex.
pub(crate) fn sha256_hex(secret: &str) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, secret.as_bytes());
    hex::encode(digest)
}

/// An argon2id hash of `password` (PHC string).
pub(crate) fn hash_password(password: &str) -> anyhow::Result<String> {
    let mut salt = [0u8; 16];
    aws_lc_rs::rand::fill(&mut salt).expect("the system's random source");
    let salt = SaltString::encode_b64(&salt).map_err(|e| anyhow::anyhow!("salt: {e}"))?;
    Ok(argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("hashing the password: {e}"))?
        .to_string())
}

/// Whether `password` matches the PHC string `hash`.
pub(crate) fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|parsed| {
        argon2::Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    })
}

/// Where a user's own test sends may go (`lifecycle users add --email/--phone`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Contact {
    /// Their email address.
    pub email: Option<crate::domain::Email>,
    /// Their phone number.
    pub phone: Option<crate::domain::Phone>,
}

/// Adds a user (or replaces one of that name) and returns their new credentials, shown once.
pub(crate) async fn add(
    pool: &PgPool,
    name: &str,
    role: Role,
    contact: &Contact,
) -> anyhow::Result<Credentials> {
    check_name(name)?;
    let credentials = Credentials {
        password: random_secret(12),
        token: format!("lc_{}", random_secret(32)),
    };
    let hash = {
        let password = credentials.password.clone();
        tokio::task::spawn_blocking(move || hash_password(&password)).await??
    };
    sqlx::query!(
        "insert into users (name, role, password_hash, token_sha256, email, phone)
         values ($1, $2, $3, $4, $5, $6)
         on conflict (name) do update set role = excluded.role,
             password_hash = excluded.password_hash, token_sha256 = excluded.token_sha256,
             email = excluded.email, phone = excluded.phone",
        name,
        role.as_str(),
        hash,
        sha256_hex(&credentials.token),
        contact.email.as_ref().map(|e| e.as_str()),
        contact.phone.as_ref().map(|p| p.as_str()),
    )
    .execute(pool)
    .await
    .context("saving the user")?;
    // Whoever held the old password is logged out.
    sqlx::query!("delete from sessions where user_name = $1", name)
        .execute(pool)
        .await?;
    Ok(credentials)
}

/// Removes a user: their sessions end and their API token stops working at once (the
/// sessions go with the row). Whether there was such a user.
pub(crate) async fn remove(pool: &PgPool, name: &str) -> anyhow::Result<bool> {
    let done = sqlx::query!("delete from users where name = $1", name)
        .execute(pool)
        .await
        .context("removing the user")?;
    Ok(done.rows_affected() > 0)
}

/// Whether `name` can be a user's name: 1 to 64 letters, digits, '.', '_', '-' or '@'.
pub(crate) fn check_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-@".contains(c))
    {
        bail!("user name {name:?}: 1 to 64 letters, digits, '.', '_', '-' or '@'");
    }
    Ok(())
}

/// A user's own address and number, for their test sends.
pub(crate) async fn contact(pool: &PgPool, name: &str) -> Result<Contact, sqlx::Error> {
    let row: Option<(Option<String>, Option<String>)> =
        sqlx::query!("select email, phone from users where name = $1", name)
            .fetch_optional(pool)
            .await?
            .map(|r| (r.email, r.phone));
    let (email, phone) = row.unwrap_or_default();
    Ok(Contact {
        email: email.and_then(|e| crate::domain::Email::parse(&e).ok()),
        phone: phone.and_then(|p| crate::domain::Phone::parse(&p).ok()),
    })
}

/// The user whose API token this is.
pub(crate) async fn by_token(pool: &PgPool, token: &str) -> Result<Option<User>, sqlx::Error> {
    let row: Option<(String, String)> = sqlx::query!(
        "select name, role from users where token_sha256 = $1",
        sha256_hex(token)
    )
    .fetch_optional(pool)
    .await?
    .map(|r| (r.name, r.role));
    Ok(row.and_then(|(name, role)| {
        Some(User {
            name,
            role: Role::parse(&role).ok()?,
        })
    }))
}

/// The user whose password this is. The hash is checked on the blocking pool (argon2 is
/// deliberately slow); an unknown user costs the same as a wrong password.
pub(crate) async fn by_password(
    pool: &PgPool,
    name: &str,
    password: &str,
) -> Result<Option<User>, sqlx::Error> {
    let row: Option<(String, String)> = sqlx::query!(
        "select role, password_hash from users where name = $1",
        name
    )
    .fetch_optional(pool)
    .await?
    .map(|r| (r.role, r.password_hash));
    // An unknown name is checked against a hash all the same, so timing does not tell
    // which names exist (that hash is made once, on the blocking pool too).
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    // One check at a time: each takes argon2's 19 MiB and a core for tens of milliseconds,
    // so a flood of logins queues here rather than taking the memory and the cores dispatch
    // needs. A request that waits too long ends at the request timeout.
    static CHECKS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);
    let (role, hash) = match row {
        Some((role, hash)) => (role, Some(hash)),
        None => (String::new(), None),
    };
    let password = password.to_owned();
    let matches = match CHECKS.acquire().await {
        // The turn goes with the check: a request dropped while it runs keeps it taken.
        Ok(turn) => tokio::task::spawn_blocking(move || {
            let _turn = turn;
            let hash = hash.as_deref().unwrap_or_else(|| {
                DUMMY.get_or_init(|| hash_password("not a password").expect("hashing"))
            });
            verify_password(&password, hash)
        })
        .await
        .unwrap_or(false),
        Err(_) => false,
    };
    Ok(match Role::parse(&role) {
        Ok(role) if matches => Some(User {
            name: name.to_owned(),
            role,
        }),
        _ => None,
    })
}

/// A console session: the cookie's value, and the CSRF token its forms carry.
pub(crate) struct Session {
    /// The cookie's value (only its hash is stored).
    pub cookie: String,
    /// The CSRF token.
    pub csrf: String,
}

/// Opens a session for `user`.
pub(crate) async fn open_session(pool: &PgPool, user: &str) -> Result<Session, sqlx::Error> {
    let session = Session {
        cookie: random_secret(32),
        csrf: random_secret(24),
    };
    sqlx::query!(
        "insert into sessions (token_sha256, user_name, csrf, expires_at)
         values ($1, $2, $3, now() + make_interval(hours => $4))",
        sha256_hex(&session.cookie),
        user,
        &session.csrf,
        SESSION_HOURS as i32,
    )
    .execute(pool)
    .await?;
    // Expired sessions go as new ones come.
    sqlx::query!("delete from sessions where expires_at < now()")
        .execute(pool)
        .await?;
    Ok(session)
}

/// The user and CSRF token of a live session.
pub(crate) async fn by_session(
    pool: &PgPool,
    cookie: &str,
) -> Result<Option<(User, String)>, sqlx::Error> {
    let row: Option<(String, String, String)> = sqlx::query!(
        "select u.name, u.role, s.csrf from sessions s join users u on u.name = s.user_name
         where s.token_sha256 = $1 and s.expires_at > now()",
        sha256_hex(cookie)
    )
    .fetch_optional(pool)
    .await?
    .map(|r| (r.name, r.role, r.csrf));
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
pub(crate) async fn close_session(pool: &PgPool, cookie: &str) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "delete from sessions where token_sha256 = $1",
        sha256_hex(cookie)
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Failures counted per key in a fixed window, in bounded memory: when the map is full, expired
/// entries go first, then the oldest. Losing an entry forgets failures (a throttle a little
/// weaker under a flood of keys), never refuses anyone who has not failed.
struct Window<K> {
    counts: HashMap<K, (u32, Instant)>,
    length: Duration,
    cap: usize,
}

impl<K: std::hash::Hash + Eq + Clone> Window<K> {
    fn new(length: Duration, cap: usize) -> Window<K> {
        Window {
            counts: HashMap::new(),
            length,
            cap,
        }
    }

    /// The failures of `key` in its current window, and how long that window has left.
    fn get(&self, key: &K, now: Instant) -> (u32, Duration) {
        match self.counts.get(key) {
            Some((n, since)) => match self.length.checked_sub(now.duration_since(*since)) {
                Some(left) if !left.is_zero() => (*n, left),
                _ => (0, Duration::ZERO),
            },
            None => (0, Duration::ZERO),
        }
    }

    fn add(&mut self, key: &K, now: Instant) {
        if !self.counts.contains_key(key) && self.counts.len() >= self.cap {
            let length = self.length;
            self.counts
                .retain(|_, (_, since)| now.duration_since(*since) < length);
            if self.counts.len() >= self.cap
                && let Some(oldest) = self
                    .counts
                    .iter()
                    .min_by_key(|(_, (_, since))| *since)
                    .map(|(k, _)| k.clone())
            {
                self.counts.remove(&oldest);
            }
        }
        let entry = self.counts.entry(key.clone()).or_insert((0, now));
        if now.duration_since(entry.1) >= self.length {
            *entry = (0, now);
        }
        entry.0 = entry.0.saturating_add(1);
    }

    fn sub(&mut self, key: &K) {
        if let Some(entry) = self.counts.get_mut(key) {
            entry.0 = entry.0.saturating_sub(1);
        }
    }

    fn forget(&mut self, key: &K) {
        self.counts.remove(key);
    }
}

/// Console logins, throttled so that no one can lock another user out:
///
/// - per (user, address): after `PAIR_FAILURES` failures in `LOGIN_WINDOW`, that pair waits for
///   the window to pass (the user can still log in from elsewhere);
/// - per address: after `ADDRESS_FAILURES`, whatever the names tried (one address guessing
///   many users);
/// - a global backoff: past `GLOBAL_FAILURES_PER_MINUTE` failures in a minute from anywhere (a
///   spread-out guess), logins from a (user, address) pair that has not logged in before wait
///   until the flood's minute is over, doubling while it goes on (at most 15 minutes); pairs
///   that logged in before are let through.
///
/// An attempt is counted when it starts (`begin`), in the same critical section as the
/// check, and given back when the password was right: a burst of parallel guesses cannot all
/// pass a check made before any of them was counted. Memory is bounded; per replica.
pub struct LoginThrottle {
    state: Mutex<LoginState>,
}

struct LoginState {
    pairs: Window<(String, IpAddr)>,
    addresses: Window<IpAddr>,
    /// (user, address) pairs that logged in, and when.
    known: Window<(String, IpAddr)>,
    /// Failures in the current minute, from when it started.
    minute: (u32, Instant),
    /// Unknown pairs wait until then, and the backoff now in force.
    backoff: Option<(Instant, Duration)>,
}

/// Failures allowed per (user, address) and window.
pub(crate) const PAIR_FAILURES: u32 = 5;
/// Failures allowed per address and window, whatever the names.
pub(crate) const ADDRESS_FAILURES: u32 = 30;
/// Failures in a minute, from anywhere, past which unknown pairs back off.
pub(crate) const GLOBAL_FAILURES_PER_MINUTE: u32 = 120;
/// The window.
pub(crate) const LOGIN_WINDOW: Duration = Duration::from_secs(15 * 60);
/// Entries kept in each of the throttle's maps.
const THROTTLE_ENTRIES: usize = 50_000;

impl Default for LoginThrottle {
    fn default() -> Self {
        LoginThrottle {
            state: Mutex::new(LoginState {
                pairs: Window::new(LOGIN_WINDOW, THROTTLE_ENTRIES),
                addresses: Window::new(LOGIN_WINDOW, THROTTLE_ENTRIES),
                known: Window::new(Duration::from_secs(30 * 24 * 3600), THROTTLE_ENTRIES),
                minute: (0, Instant::now()),
                backoff: None,
            }),
        }
    }
}

/// A login attempt under way, counted as a failure until `LoginThrottle::succeeded`.
#[derive(Debug)]
pub struct Attempt {
    name: String,
    addr: IpAddr,
}

impl LoginThrottle {
    /// Starts an attempt of `name` from `addr`, counting it; or how long to wait first.
    pub fn begin(&self, name: &str, addr: IpAddr) -> Result<Attempt, Duration> {
        self.begin_at(name, addr, Instant::now())
    }

    fn begin_at(&self, name: &str, addr: IpAddr, now: Instant) -> Result<Attempt, Duration> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let pair = (name.to_owned(), addr);
        let (n, left) = s.pairs.get(&pair, now);
        if n >= PAIR_FAILURES {
            return Err(left);
        }
        let (n, left) = s.addresses.get(&addr, now);
        if n >= ADDRESS_FAILURES {
            return Err(left);
        }
        if s.known.get(&pair, now).0 == 0
            && let Some((until, _)) = s.backoff
            && until > now
        {
            return Err(until - now);
        }
        s.pairs.add(&pair, now);
        s.addresses.add(&addr, now);
        let minute = Duration::from_secs(60);
        if now.duration_since(s.minute.1) >= minute {
            s.minute = (0, now);
        }
        s.minute.0 += 1;
        if s.minute.0 > GLOBAL_FAILURES_PER_MINUTE {
            let step = match s.backoff {
                // The flood goes on (the last backoff ended less than a minute ago): twice as
                // long as the last one.
                Some((until, step)) if now < until + minute => (step * 2).min(LOGIN_WINDOW),
                _ => minute,
            };
            let until = (s.minute.1 + minute).max(now + step);
            s.backoff = Some((until, step));
            s.minute = (0, now);
        }
        Ok(Attempt {
            name: name.to_owned(),
            addr,
        })
    }

    /// The attempt's password was right: its count is given back, the pair's failures are
    /// forgotten and the pair is known from now on.
    pub fn succeeded(&self, attempt: Attempt) {
        let now = Instant::now();
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let pair = (attempt.name, attempt.addr);
        s.pairs.forget(&pair);
        s.addresses.sub(&attempt.addr);
        s.minute.0 = s.minute.0.saturating_sub(1);
        s.known.add(&pair, now);
    }
}

/// Bearer tokens that failed, per client address: past `BEARER_FAILURES` in `LOGIN_WINDOW`
/// the address is refused (429) until its window has passed. Bounded memory; per replica.
pub struct BearerThrottle {
    failures: Mutex<Window<IpAddr>>,
}

/// Wrong bearer tokens allowed per address and window.
pub(crate) const BEARER_FAILURES: u32 = 20;

impl Default for BearerThrottle {
    fn default() -> Self {
        BearerThrottle {
            failures: Mutex::new(Window::new(LOGIN_WINDOW, THROTTLE_ENTRIES)),
        }
    }
}

impl BearerThrottle {
    /// How long `addr` must wait before its next bearer token is looked at, if it must.
    pub fn blocked(&self, addr: IpAddr) -> Option<Duration> {
        let failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let (n, left) = failures.get(&addr, Instant::now());
        (n >= BEARER_FAILURES).then_some(left)
    }

    /// Counts a wrong token from `addr`.
    pub fn failed(&self, addr: IpAddr) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        failures.add(&addr, Instant::now());
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
    fn no_one_can_lock_out_a_user_from_another_address() {
        let throttle = LoginThrottle::default();
        let attacker: IpAddr = "192.0.2.1".parse().unwrap();
        let alice: IpAddr = "198.51.100.7".parse().unwrap();
        let now = Instant::now();
        for _ in 0..PAIR_FAILURES {
            throttle.begin_at("alice", attacker, now).unwrap();
        }
        // The attacker's pair is blocked for the window; Alice from her address is not.
        let wait = throttle.begin_at("alice", attacker, now).unwrap_err();
        assert!(wait > Duration::from_secs(14 * 60), "{wait:?}");
        let mine = throttle.begin_at("alice", alice, now).unwrap();
        throttle.succeeded(mine);
        // The window passes.
        let later = now + LOGIN_WINDOW + Duration::from_secs(1);
        throttle.begin_at("alice", attacker, later).unwrap();
    }

    #[test]
    fn one_address_guessing_many_names_is_stopped() {
        let throttle = LoginThrottle::default();
        let attacker: IpAddr = "192.0.2.1".parse().unwrap();
        let now = Instant::now();
        for n in 0..ADDRESS_FAILURES {
            throttle
                .begin_at(&format!("user{n}"), attacker, now)
                .unwrap();
        }
        assert!(throttle.begin_at("bob", attacker, now).is_err());
        assert!(
            throttle
                .begin_at("bob", "192.0.2.2".parse().unwrap(), now)
                .is_ok()
        );
    }

    #[test]
    fn a_spread_out_flood_backs_off_unknown_pairs_but_not_known_ones() {
        let throttle = LoginThrottle::default();
        let now = Instant::now();
        let home: IpAddr = "198.51.100.7".parse().unwrap();
        throttle.succeeded(throttle.begin_at("alice", home, now).unwrap());
        for n in 0..=GLOBAL_FAILURES_PER_MINUTE {
            let addr = IpAddr::from([10, 0, (n / 250) as u8, (n % 250) as u8]);
            throttle.begin_at("alice", addr, now).unwrap();
        }
        let stranger: IpAddr = "203.0.113.9".parse().unwrap();
        let wait = throttle.begin_at("alice", stranger, now).unwrap_err();
        assert!(
            wait <= Duration::from_secs(60) && wait > Duration::ZERO,
            "{wait:?}"
        );
        // Alice, from where she logged in before, is let through.
        throttle.succeeded(throttle.begin_at("alice", home, now).unwrap());
        // After the backoff, strangers may try again.
        let later = now + Duration::from_secs(61);
        assert!(throttle.begin_at("alice", stranger, later).is_ok());
        // A flood that goes on right after it: twice as long, then twice again, up to the
        // window.
        let mut at = later;
        let mut waits = Vec::new();
        let flood = |round: u8, at: Instant| {
            (0..=GLOBAL_FAILURES_PER_MINUTE + 1)
                .find_map(|n| {
                    let addr = IpAddr::from([10, round, (n / 250) as u8, (n % 250) as u8]);
                    throttle.begin_at("alice", addr, at).err()
                })
                .expect("the flood backs off")
        };
        for round in 1..=6 {
            let wait = flood(round, at);
            waits.push(wait.as_secs());
            at += wait + Duration::from_secs(1);
        }
        assert_eq!(waits, [120, 240, 480, 900, 900, 900], "{waits:?}");
        // A calm minute after the last backoff: back to one minute.
        at += Duration::from_secs(61);
        assert_eq!(flood(9, at).as_secs(), 60);
    }

    #[test]
    fn parallel_guesses_are_counted_before_they_are_checked() {
        let throttle = std::sync::Arc::new(LoginThrottle::default());
        let addr: IpAddr = "192.0.2.1".parse().unwrap();
        let admitted: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..50)
                .map(|_| {
                    let throttle = throttle.clone();
                    s.spawn(move || throttle.begin("alice", addr).is_ok() as usize)
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(admitted, PAIR_FAILURES as usize);
    }

    #[test]
    fn the_throttles_memory_is_bounded() {
        let mut window: Window<u32> = Window::new(Duration::from_secs(60), 100);
        let now = Instant::now();
        for key in 0..10_000 {
            window.add(&key, now + Duration::from_millis(u64::from(key)));
        }
        assert_eq!(window.counts.len(), 100);
        // The newest keys are the ones kept.
        assert_eq!(window.get(&9_999, now + Duration::from_secs(10)).0, 1);
    }
}
