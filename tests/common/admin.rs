//! A client of the admin API and the console, over real HTTP.

use reqwest::{Method, StatusCode};
use serde_json::Value;

use super::{SmtpSink, TestEnv, free_port};

/// The bootstrap `ops` token the admin environments set.
pub const ADMIN_TOKEN: &str = "admin-token-for-tests-0123456789";

/// An environment whose email goes to `sink`, serving HTTP on a port of its own, with the
/// bootstrap token set; and the server's base URL.
pub fn env(sink: &SmtpSink, extra: &[(&str, String)]) -> (TestEnv, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut vars = vec![
        ("LIFECYCLE_EMAIL_PROVIDERS", "smtp".to_owned()),
        ("LIFECYCLE_SMTP_URL", sink.url()),
        ("LIFECYCLE_HTTP_ADDR", addr.clone()),
        ("LIFECYCLE_PUBLIC_URL", format!("http://{addr}")),
        ("LIFECYCLE_ADMIN_TOKEN", ADMIN_TOKEN.to_owned()),
        // The QA inbox and phone test sends may go to.
        (
            "LIFECYCLE_CONSOLE__TEST_RECIPIENTS",
            "qa@example.com,+14155550999".to_owned(),
        ),
    ];
    vars.extend(extra.iter().cloned());
    (TestEnv::new(&vars), format!("http://{addr}"))
}

/// `env` with email going to SendGrid's API at `fake` (a local fake of it).
pub fn sendgrid_env(sink: &SmtpSink, fake: &str, extra: &[(&str, String)]) -> (TestEnv, String) {
    let mut vars = vec![
        ("LIFECYCLE_EMAIL_PROVIDERS", "sendgrid".to_owned()),
        ("LIFECYCLE_SENDGRID_BASE_URL", fake.to_owned()),
        ("LIFECYCLE_SENDGRID_API_KEY", "SG.test-key".to_owned()),
    ];
    vars.extend(extra.iter().cloned());
    env(sink, &vars)
}

/// Calls the server at `base`.
pub struct Client {
    /// `http://127.0.0.1:port`.
    pub base: String,
    http: reqwest::Client,
}

/// How a request authenticates.
#[derive(Clone, Copy)]
pub enum Auth<'a> {
    /// No credentials.
    None,
    /// `Authorization: Bearer`.
    Bearer(&'a str),
    /// The console's session cookie, and the CSRF header (when given).
    Session {
        cookie: &'a str,
        csrf: Option<&'a str>,
    },
}

impl Client {
    /// A client that does not follow redirects (the tests look at them).
    pub fn new(base: &str) -> Client {
        Client {
            base: base.to_owned(),
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
        }
    }

    /// A JSON request; the status and the JSON answer (null when it is not JSON).
    pub async fn json(
        &self,
        method: Method,
        path: &str,
        auth: Auth<'_>,
        body: Option<&Value>,
    ) -> (StatusCode, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        request = match auth {
            Auth::None => request,
            Auth::Bearer(token) => request.bearer_auth(token),
            Auth::Session { cookie, csrf } => {
                let r = request.header("Cookie", format!("lifecycle_session={cookie}"));
                match csrf {
                    Some(csrf) => r.header("X-CSRF-Token", csrf),
                    None => r,
                }
            }
        };
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// A console page with the session cookie: status, body.
    pub async fn page(&self, path: &str, cookie: &str) -> (StatusCode, String) {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .header("Cookie", format!("lifecycle_session={cookie}"))
            .send()
            .await
            .unwrap();
        (response.status(), response.text().await.unwrap())
    }

    /// A console form post with the session cookie: status, `Location`, body.
    pub async fn form(
        &self,
        path: &str,
        cookie: &str,
        fields: &[(&str, &str)],
    ) -> (StatusCode, String, String) {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .header("Cookie", format!("lifecycle_session={cookie}"))
            .form(fields)
            .send()
            .await
            .unwrap();
        let location = response
            .headers()
            .get("location")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        (response.status(), location, response.text().await.unwrap())
    }

    /// Logs in through the console's form: the status, and the session cookie and its CSRF
    /// token when it worked.
    pub async fn login(
        &self,
        name: &str,
        password: &str,
    ) -> (StatusCode, Option<(String, String)>) {
        let form = self
            .http
            .get(format!("{}/console/login", self.base))
            .send()
            .await
            .unwrap();
        let login_cookie = cookie_of(&form, "lifecycle_login_csrf").expect("the login CSRF cookie");
        let page = form.text().await.unwrap();
        let token = attribute_after(&page, "name=\"csrf\" value=\"").expect("the form's token");
        let response = self
            .http
            .post(format!("{}/console/login", self.base))
            .header("Cookie", format!("lifecycle_login_csrf={login_cookie}"))
            .form(&[("name", name), ("password", password), ("csrf", &token)])
            .send()
            .await
            .unwrap();
        let status = response.status();
        let Some(session) = cookie_of(&response, "lifecycle_session") else {
            return (status, None);
        };
        let set_cookie: Vec<String> = response
            .headers()
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect();
        assert!(
            set_cookie
                .iter()
                .any(|c| c.starts_with("lifecycle_session=")
                    && c.contains("HttpOnly")
                    && c.contains("SameSite=Strict")),
            "{set_cookie:?}"
        );
        let (_, templates) = self.page("/console/templates", &session).await;
        let csrf =
            attribute_after(&templates, "name=\"csrf-token\" content=\"").expect("csrf meta");
        (status, Some((session, csrf)))
    }
}

/// The value of cookie `name` set by a response.
fn cookie_of(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split(';').next()?.split_once('='))
        .find(|(k, v)| *k == name && !v.is_empty())
        .map(|(_, v)| v.to_owned())
}

/// The attribute value that follows `marker` in a page.
pub fn attribute_after(page: &str, marker: &str) -> Option<String> {
    let start = page.find(marker)? + marker.len();
    let end = page[start..].find('"')?;
    Some(page[start..start + end].to_owned())
}

/// Runs `lifecycle users add NAME --role ROLE` with the environment's settings and returns
/// the password and token it printed.
pub fn add_user(env: &TestEnv, name: &str, role: &str) -> (String, String) {
    add_user_with(env, name, role, &[])
}

/// `add_user` with more arguments (`--email`, `--phone`).
pub fn add_user_with(env: &TestEnv, name: &str, role: &str, extra: &[&str]) -> (String, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_lifecycle"))
        .args(["users", "add", name, "--role", role])
        .args(extra)
        .envs(env.env_vars())
        .output()
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line = |prefix: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix} line in {stdout}"))
            .to_owned()
    };
    (line("password: "), line("token: "))
}
