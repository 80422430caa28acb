//! Who is asking, and may they: bearer tokens and console sessions, roles, CSRF, and the
//! JSON error every `/api` refusal is.
//!
//! `Authorization: Bearer <token>` is a user's API token or `LIFECYCLE_ADMIN_TOKEN` (as
//! `ops`). The console's session cookie (`lifecycle_session`: HttpOnly, SameSite=Strict,
//! Secure when `LIFECYCLE_PUBLIC_URL` is https) works for `/api` too, as the console's own
//! scripts use it; then a request that changes anything must carry the session's CSRF token in
//! `X-CSRF-Token` (the console's forms carry it as a field instead). Missing or wrong
//! credentials: 401; a role that may not: 403.

use std::net::{IpAddr, SocketAddr};

use axum::Json;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::app::App;
use crate::config::Network;
use crate::render::FileError;
use crate::template_store::StoreError;
use crate::users::{self, Role, User};

/// The session cookie's name.
pub(crate) const SESSION_COOKIE: &str = "lifecycle_session";
/// The header carrying the CSRF token of a session-authenticated API request.
pub(crate) const CSRF_HEADER: &str = "x-csrf-token";

/// An `/api` error: `{"error": "..."}`, and `errors` by file and line for a template that
/// does not validate (422).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct ApiError {
    #[serde(skip)]
    status: u16,
    /// What went wrong.
    pub error: String,
    /// For a template that does not validate: each problem by file and line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<FileError>>,
    /// Seconds to wait, sent as `Retry-After` (429).
    #[serde(skip)]
    retry_after: Option<u64>,
}

impl ApiError {
    /// An error with this status.
    pub(crate) fn new(status: StatusCode, error: impl Into<String>) -> ApiError {
        ApiError {
            status: status.as_u16(),
            error: error.into(),
            errors: None,
            retry_after: None,
        }
    }

    /// 401.
    pub(crate) fn unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing or wrong credentials: send Authorization: Bearer <token>, or log in to the console",
        )
    }

    /// 429, with how long to wait (`Retry-After`).
    pub(crate) fn too_many(error: impl Into<String>, wait: std::time::Duration) -> ApiError {
        ApiError {
            retry_after: Some(wait.as_secs().max(1)),
            ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, error)
        }
    }

    /// 404.
    pub(crate) fn not_found(what: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, what)
    }

    /// 422 with each problem.
    pub(crate) fn invalid(errors: Vec<FileError>) -> ApiError {
        ApiError {
            status: 422,
            error: "the template does not validate".into(),
            errors: Some(errors),
            retry_after: None,
        }
    }

    /// 500, logged; the client learns nothing of the cause.
    pub(crate) fn internal(error: impl std::fmt::Display) -> ApiError {
        tracing::error!(
            error = crate::mask::text(&error.to_string()),
            "Admin API request failed."
        );
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error; the server's log has the cause",
        )
    }

    /// An error of the layers below: a query over the statement timeout is 503 with what
    /// happened, anything else 500, logged.
    pub(crate) fn from_anyhow(error: anyhow::Error) -> ApiError {
        if error
            .chain()
            .filter_map(|e| e.downcast_ref::<sqlx::Error>())
            .any(timed_out)
        {
            ApiError::statement_timeout()
        } else {
            ApiError::internal(format!("{error:#}"))
        }
    }

    /// 503: a query ran past `[http] statement_timeout_ms`.
    fn statement_timeout() -> ApiError {
        tracing::warn!("An API or console query ran past the statement timeout.");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the query took longer than the statement timeout ([http] statement_timeout_ms); ask for less",
        )
    }

    /// The HTTP status.
    pub(crate) fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry_after = self.retry_after;
        let mut response = (self.status(), Json(self)).into_response();
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> ApiError {
        if timed_out(&e) {
            return ApiError::statement_timeout();
        }
        ApiError::internal(e)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::Invalid(errors) => ApiError::invalid(errors),
            StoreError::NotFound(what) => ApiError::not_found(what),
            StoreError::Database(e) => ApiError::from_anyhow(e),
        }
    }
}

/// Whether PostgreSQL cancelled the statement for running past its timeout (57014).
fn timed_out(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.code().as_deref() == Some("57014"))
}

/// An authenticated request's user (a session's CSRF token was checked on the way in).
#[derive(Debug, Clone)]
pub(crate) struct Authed {
    /// Who.
    pub user: User,
}

impl Authed {
    /// Refuses (403) a user whose role is not `role` (`ops` may do everything).
    pub(crate) fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.user.role == role || self.user.role == Role::Ops {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "{} may not do this: it needs the {} role",
                    self.user.role.as_str(),
                    role.as_str()
                ),
            ))
        }
    }
}

/// The value of cookie `name`.
pub(crate) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The bearer token's user, or `Ok(None)` when there is no `Authorization` header. A client
/// address that sent too many wrong tokens is refused (429) before its token is looked at;
/// every wrong token is counted and logged (its length, never the token).
async fn bearer(
    app: &App,
    headers: &HeaderMap,
    client: Option<IpAddr>,
) -> Result<Option<User>, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    if let Some(wait) = client.and_then(|addr| app.bearers.blocked(addr)) {
        return Err(ApiError::too_many(
            "too many wrong tokens from this address; try again later",
            wait,
        ));
    }
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let user = match token {
        Some(token) => known_token(app, token).await?,
        None => None,
    };
    if user.is_none() {
        if let Some(addr) = client {
            app.bearers.failed(addr);
        }
        tracing::warn!(
            client = client.map(|a| a.to_string()),
            token_chars = token.map_or(0, |t| t.chars().count()),
            "A wrong bearer token was refused."
        );
        return Err(ApiError::unauthorized());
    }
    Ok(user)
}

/// The user a token belongs to: `LIFECYCLE_ADMIN_TOKEN`'s `admin`, or a user's API token.
async fn known_token(app: &App, token: &str) -> Result<Option<User>, ApiError> {
    if let Some(admin) = &app.settings.admin_token {
        // Compared by digest: equal-length values, and no early exit on the secret's bytes.
        if users::sha256_hex(token) == users::sha256_hex(admin.expose()) {
            return Ok(Some(User {
                name: "admin".into(),
                role: Role::Ops,
            }));
        }
    }
    Ok(users::by_token(&app.pool, token).await?)
}

impl FromRequestParts<App> for Authed {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Authed, ApiError> {
        let client = client_addr(app, parts);
        if let Some(user) = bearer(app, &parts.headers, client).await? {
            return Ok(Authed { user });
        }
        let Some(cookie) = cookie(&parts.headers, SESSION_COOKIE) else {
            return Err(ApiError::unauthorized());
        };
        let Some((user, csrf)) = users::by_session(&app.pool, cookie).await? else {
            return Err(ApiError::unauthorized());
        };
        let safe = matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
        let sent = parts.headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
        if !safe && sent != Some(csrf.as_str()) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "the CSRF token is missing or wrong (X-CSRF-Token)",
            ));
        }
        Ok(Authed { user })
    }
}

/// The connection's peer address, put on each request by the accept loop.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer(pub SocketAddr);

/// The client's address: the connection's peer, or, when the peer is one of
/// `[http] trusted_proxies`, the rightmost address of `X-Forwarded-For` that is not a trusted
/// proxy itself (the leftmost ones are whatever the client wrote). `None` only for a request
/// that did not come through the accept loop.
pub(crate) fn client_addr(app: &App, parts: &Parts) -> Option<IpAddr> {
    let peer = parts.extensions.get::<Peer>()?.0.ip();
    Some(forwarded_client(
        &app.settings.http.trusted_proxies,
        peer,
        &parts.headers,
    ))
}

/// `client_addr`'s rule, apart from the request. The hops of every `X-Forwarded-For` header
/// are read from the right (the nearest proxy's entry last), trusted proxies skipped: the first
/// other address is the client. A hop that is not an address (`1.2.3.4:80` and `[::1]:80` are)
/// ends the walk at the peer: no trusted proxy wrote it.
pub(crate) fn forwarded_client(trusted: &[Network], peer: IpAddr, headers: &HeaderMap) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    for hop in hops.into_iter().rev() {
        let Some(ip) = hop
            .parse::<IpAddr>()
            .ok()
            .or_else(|| hop.parse::<SocketAddr>().ok().map(|a| a.ip()))
        else {
            return peer;
        };
        if !is_trusted(ip) {
            return ip;
        }
    }
    peer
}

/// The `Set-Cookie` value of a session cookie (`value` empty: one that clears it).
pub(crate) fn session_cookie(app: &App, value: &str) -> String {
    let secure = if app.settings.public_url.as_str().starts_with("https://") {
        "; Secure"
    } else {
        ""
    };
    let age = if value.is_empty() {
        "; Max-Age=0".to_owned()
    } else {
        format!("; Max-Age={}", users::SESSION_HOURS * 3600)
    };
    format!("{SESSION_COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict{age}{secure}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_is_the_nearest_untrusted_hop() {
        let trusted: Vec<Network> = vec!["10.0.0.0/8".parse().unwrap()];
        let proxy: IpAddr = "10.0.0.5".parse().unwrap();
        let client = |xff: &[&str], peer: IpAddr| {
            let mut headers = HeaderMap::new();
            for value in xff {
                headers.append("x-forwarded-for", value.parse().unwrap());
            }
            forwarded_client(&trusted, peer, &headers).to_string()
        };
        // Whatever the client wrote first, the address the first proxy saw counts.
        assert_eq!(client(&["garbage, 1.2.3.4"], proxy), "1.2.3.4");
        assert_eq!(client(&["9.9.9.9, 1.2.3.4, 10.0.0.7"], proxy), "1.2.3.4");
        assert_eq!(client(&["9.9.9.9", "1.2.3.4:5678"], proxy), "1.2.3.4");
        assert_eq!(client(&["[2001:db8::1]:443"], proxy), "2001:db8::1");
        // Nothing but proxies, nothing at all, or junk where a proxy writes: the peer.
        assert_eq!(client(&["10.0.0.7"], proxy), "10.0.0.5");
        assert_eq!(client(&[], proxy), "10.0.0.5");
        assert_eq!(client(&["1.2.3.4, junk"], proxy), "10.0.0.5");
        // From an untrusted peer the header is ignored.
        let stranger: IpAddr = "5.6.7.8".parse().unwrap();
        assert_eq!(client(&["1.2.3.4"], stranger), "5.6.7.8");
    }
}
