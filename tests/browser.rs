//! The console in a real browser: Debian's headless Chromium driven through chromedriver
//! (WebDriver, fantoccini). A marketer logs in, opens the Korean welcome, types a change and
//! sees the preview follow, makes a syntax error and sees it by line, previews with a real
//! member, test-sends, publishes, and the next Korean member's welcome uses the new text;
//! rolling back restores the old one. Every page is screenshotted (kept under the target
//! directory's `tmp/screenshots/`), and the editor is checked at 375 px wide.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use common::admin;
use common::{SmtpSink, TestEnv, enrolled, free_port, parse_mail, wait_for};
use fantoccini::{Client, ClientBuilder, Locator};
use lifecycle::testkit::app::Roles;
use serde_json::json;

const SERVING: Roles = Roles {
    ingest: true,
    dispatch: true,
    schedule: false,
    http: true,
};

/// chromedriver on a free port, killed with the test.
struct Driver {
    child: Child,
    port: u16,
    _profile: tempfile::TempDir,
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// Starts chromedriver and a headless Chromium session through it.
async fn browser() -> (Driver, Client) {
    let port = free_port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver (scripts/services installs chromium-driver)");
    let profile = tempfile::tempdir().unwrap();
    let driver = Driver {
        child,
        port,
        _profile: profile,
    };
    let url = format!("http://127.0.0.1:{}", driver.port);
    wait_for("chromedriver to listen", || async {
        reqwest::get(format!("{url}/status")).await.ok().map(drop)
    })
    .await;
    let capabilities = json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--window-size=1280,1000",
                "--lang=ko-KR",
                format!("--user-data-dir={}", driver._profile.path().display()),
            ]
        }
    });
    let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(capabilities.as_object().unwrap().clone())
        .connect(&url)
        .await
        .expect("a Chromium session");
    (driver, client)
}

/// Where screenshots go.
fn shots() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn screenshot(client: &Client, name: &str) {
    let png = client.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    std::fs::write(shots().join(format!("{name}.png")), png).unwrap();
}

/// The text of the element `css` once `ready` accepts it.
async fn text_when(client: &Client, css: &str, what: &str, ready: impl Fn(&str) -> bool) -> String {
    wait_for(what, || async {
        let text = client
            .find(Locator::Css(css))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        ready(&text).then_some(text)
    })
    .await
}

/// Replaces a textarea's text and types `text` into it, as a person would (input events).
async fn retype(client: &Client, css: &str, text: &str) {
    let area = client.find(Locator::Css(css)).await.unwrap();
    area.clear().await.unwrap();
    area.send_keys(text).await.unwrap();
}

/// The text of the element `css`.
async fn text_of(client: &Client, css: &str) -> String {
    let element = client.find(Locator::Css(css)).await.unwrap();
    element.text().await.unwrap()
}

/// Clicks the element `at`.
async fn click(client: &Client, at: Locator<'_>) {
    client.find(at).await.unwrap().click().await.unwrap();
}

/// Fills in the login form on the page and sends it.
async fn log_in(client: &Client, name: &str, password: &str) {
    for (field, value) in [("#name", name), ("#password", password)] {
        let input = client.find(Locator::Css(field)).await.unwrap();
        input.send_keys(value).await.unwrap();
    }
    click(client, Locator::Css("form button[type=submit]")).await;
}

fn korean(env: &TestEnv, n: usize) -> String {
    enrolled(
        &format!("{}-ko-{n}", env.tag),
        &format!("ko-{n}"),
        Some(&format!("ko{n}@example.com")),
        None,
        "ko",
        "지우",
        (true, false),
    )
}

fn subject_to(sink: &SmtpSink, to: &str) -> Option<String> {
    sink.messages()
        .iter()
        .map(|m| parse_mail(m))
        .find(|m| m.to == to)
        .map(|m| m.subject)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_marketer_changes_the_korean_welcome_in_the_browser() {
    let sink = SmtpSink::start(&[]);
    let (env, base) = admin::env(&sink, &[]);
    let worker = env.start(SERVING).await;
    let (password, _) =
        admin::add_user_with(&env, "mia", "marketer", &["--email", "mia@example.com"]);
    env.publish(&[korean(&env, 1)]).await;
    let old_subject = wait_for("the first welcome", || async {
        subject_to(&sink, "ko1@example.com")
    })
    .await;

    let (_driver, client) = browser().await;
    client.goto(&format!("{base}/console")).await.unwrap();
    assert!(
        client
            .current_url()
            .await
            .unwrap()
            .path()
            .ends_with("/console/login")
    );
    assert_eq!(client.title().await.unwrap(), "Log in · lifecycle console");
    screenshot(&client, "login").await;
    log_in(&client, "mia", &password).await;
    wait_for("the templates page", || async {
        (client.title().await.ok()? == "Templates · lifecycle console").then_some(())
    })
    .await;
    screenshot(&client, "templates").await;

    click(&client, Locator::LinkText("Edit welcome (ko)")).await;
    text_when(&client, "#preview-state", "the first preview", |t| {
        t == "Preview up to date."
    })
    .await;
    let subject = text_of(&client, "#subject").await;
    assert!(
        subject.contains("Ada <script>"),
        "the sample context: {subject}"
    );
    screenshot(&client, "editor").await;

    // Typing changes the preview, after a pause.
    retype(
        &client,
        "textarea[data-file='email.subject.hbs']",
        "브라우저에서 바꾼 환영 {{first_name}}님",
    )
    .await;
    text_when(
        &client,
        "#subject",
        "the preview to follow the typing",
        |t| t == "브라우저에서 바꾼 환영 Ada <script>님",
    )
    .await;
    // The email sits in a sandboxed iframe, scripts off.
    let frame = client.find(Locator::Css("#email-frame")).await.unwrap();
    assert_eq!(frame.attr("sandbox").await.unwrap().as_deref(), Some(""));
    assert!(
        frame
            .prop("srcdoc")
            .await
            .unwrap()
            .unwrap()
            .contains("lang=\"ko\"")
    );
    // With a real member's ledger.
    client
        .find(Locator::Css("#member"))
        .await
        .unwrap()
        .send_keys("ko-1")
        .await
        .unwrap();
    text_when(&client, "#subject", "the member's preview", |t| {
        t == "브라우저에서 바꾼 환영 지우님"
    })
    .await;
    let sms_meta = text_when(&client, "#sms-meta", "the SMS segments", |t| {
        t.contains("UCS-2")
    })
    .await;
    assert!(sms_meta.contains("segment"), "{sms_meta}");

    // A syntax error shows by file and line, and marks the field.
    let sms_area = client
        .find(Locator::Css("textarea[data-file='sms.hbs']"))
        .await
        .unwrap();
    let sms = sms_area.prop("value").await.unwrap().unwrap();
    sms_area.send_keys("\n{{#if first_name}}").await.unwrap();
    let error = text_when(&client, "#errors-live", "the error by line", |t| {
        t.contains("sms.hbs line")
    })
    .await;
    // The broken tag is on the line after the text's last.
    let line = sms.matches('\n').count() + 2;
    assert!(error.contains(&format!("sms.hbs line {line}:")), "{error}");
    assert_eq!(
        sms_area.attr("aria-invalid").await.unwrap().as_deref(),
        Some("true")
    );
    client
        .execute(
            "document.getElementById('errors-live').scrollIntoView();",
            vec![],
        )
        .await
        .unwrap();
    screenshot(&client, "editor-error").await;
    retype(&client, "textarea[data-file='sms.hbs']", &sms).await;
    text_when(&client, "#preview-state", "the error gone", |t| {
        t == "Preview up to date."
    })
    .await;

    // Save the draft.
    click(&client, Locator::Css("#draft-form button[type=submit]")).await;
    text_when(&client, ".notice", "saved", |t| t == "Saved as draft v1.").await;

    // Test-send it to the marketer.
    client
        .find(Locator::Css("#test-email"))
        .await
        .unwrap()
        .send_keys("mia@example.com")
        .await
        .unwrap();
    client
        .find(Locator::Css("#test-member"))
        .await
        .unwrap()
        .send_keys("ko-1")
        .await
        .unwrap();
    click(&client, Locator::XPath("//button[text()='Send test']")).await;
    text_when(&client, ".notice", "queued", |t| {
        t.starts_with("Test queued")
    })
    .await;
    let test = wait_for("the test mail", || async {
        subject_to(&sink, "mia@example.com")
    })
    .await;
    assert_eq!(test, "브라우저에서 바꾼 환영 지우님");

    // Publish: the next Korean member's welcome uses it.
    click(
        &client,
        Locator::XPath("//button[text()='Publish draft v1']"),
    )
    .await;
    text_when(&client, ".notice", "published", |t| {
        t.starts_with("Published v1")
    })
    .await;
    env.publish(&[korean(&env, 2)]).await;
    let second = wait_for("the welcome after publishing", || async {
        subject_to(&sink, "ko2@example.com")
    })
    .await;
    assert_eq!(second, "브라우저에서 바꾼 환영 지우님");

    // The history's diff.
    client
        .goto(&format!(
            "{base}/console/templates/welcome/ko/diff?from=0&to=1"
        ))
        .await
        .unwrap();
    let diff = text_of(&client, "main").await;
    assert!(
        diff.contains("+ 브라우저에서 바꾼 환영 {{first_name}}님"),
        "{diff}"
    );
    screenshot(&client, "diff").await;

    // Roll back to the shipped text.
    client
        .goto(&format!("{base}/console/templates/welcome/ko"))
        .await
        .unwrap();
    click(
        &client,
        Locator::XPath("//button[text()='Roll back to v0']"),
    )
    .await;
    text_when(&client, ".notice", "rolled back", |t| {
        t.starts_with("Published v0")
    })
    .await;
    screenshot(&client, "history").await;
    env.publish(&[korean(&env, 3)]).await;
    let third = wait_for("the welcome after the rollback", || async {
        subject_to(&sink, "ko3@example.com")
    })
    .await;
    assert_eq!(third, old_subject);

    // The loyalty report: the welcomes just sent, as charts.
    client
        .goto(&format!("{base}/console/reports"))
        .await
        .unwrap();
    let report = text_of(&client, "main").await;
    assert!(
        report.contains("Does each message bring members back?"),
        "{report}"
    );
    let charts = client
        .find_all(Locator::Css("svg.chart"))
        .await
        .unwrap()
        .len();
    assert_eq!(charts, 7, "six KPI charts and the triggers'");
    client.set_window_size(1280, 1800).await.unwrap();
    screenshot(&client, "report").await;

    // At 375 px the pages fit: nothing scrolls sideways but the tables' own boxes.
    client.set_window_size(375, 800).await.unwrap();
    for (path, name) in [
        ("/console/templates", "templates-375"),
        ("/console/templates/welcome/ko", "editor-375"),
        ("/console/reports", "report-375"),
    ] {
        client.goto(&format!("{base}{path}")).await.unwrap();
        let width = client
            .execute("return document.documentElement.scrollWidth;", vec![])
            .await
            .unwrap();
        let viewport = client
            .execute("return window.innerWidth;", vec![])
            .await
            .unwrap();
        let wide = client
            .execute(
                "return Array.from(document.querySelectorAll('body *'))
                     .filter(e => e.getBoundingClientRect().right > window.innerWidth)
                     .filter(e => !e.parentElement.closest('.scroll'))
                     .map(e => e.tagName + '.' + e.className + ' ' + Math.round(e.getBoundingClientRect().right));",
                vec![],
            )
            .await
            .unwrap();
        assert!(
            width.as_u64().unwrap() <= viewport.as_u64().unwrap(),
            "{path}: {width} wide in a {viewport} px window: {wide}"
        );
        screenshot(&client, name).await;
    }
    // Every form field has a label a screen reader reads.
    let unlabelled = client
        .execute(
            "return Array.from(document.querySelectorAll('input:not([type=hidden]), textarea'))
                 .filter(e => !(e.labels && e.labels.length)).map(e => e.id || e.name);",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(unlabelled, json!([]), "fields without a label");

    client.close().await.unwrap();
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ops_find_the_failed_messages_retry_them_and_open_a_member() {
    use common::fake_api::{FakeApi, Reply};
    let fake = FakeApi::start(Reply::new(503, "maintenance").header("Retry-After", "1")).await;
    let sink = SmtpSink::start(&[]);
    let (env, base) = admin::sendgrid_env(
        &sink,
        &fake.url,
        &[
            ("LIFECYCLE_DISPATCH__MAX_ATTEMPTS", "1".into()),
            ("LIFECYCLE_DISPATCH__BREAKER_FAILURES", "2".into()),
            ("LIFECYCLE_DISPATCH__BREAKER_COOLDOWN_MS", "200".into()),
        ],
    );
    let worker = env.start(SERVING).await;
    let app = worker.app.clone();
    let (password, _) = admin::add_user(&env, "otto", "ops");
    let members: Vec<String> = (1..=3).map(|n| korean(&env, n)).collect();
    env.publish(&members).await;
    env.publish_raw("order.placed", b"{\"broken\": ").await;
    wait_for("three failed welcomes", || async {
        (common::count(
            &app,
            "select count(*) from messages where status = 'failed'",
        )
        .await
            == 3)
            .then_some(())
    })
    .await;

    let (_driver, client) = browser().await;
    client.goto(&format!("{base}/console/login")).await.unwrap();
    log_in(&client, "otto", &password).await;
    wait_for("logged in", || async {
        (client.title().await.ok()? == "Templates · lifecycle console").then_some(())
    })
    .await;

    // Find the failed messages: the filter lands in the URL, so the view can be shared.
    click(&client, Locator::LinkText("Deliveries")).await;
    wait_for("the deliveries page", || async {
        (client.title().await.ok()? == "Deliveries · lifecycle console").then_some(())
    })
    .await;
    click(&client, Locator::Css("#f-status option[value=failed]")).await;
    click(&client, Locator::XPath("//button[text()='Search']")).await;
    let caption = text_when(&client, "caption", "the failed messages", |t| {
        t == "3 messages, newest first"
    })
    .await;
    assert_eq!(caption, "3 messages, newest first");
    assert!(
        client
            .current_url()
            .await
            .unwrap()
            .query()
            .unwrap()
            .contains("status=failed")
    );
    let table = text_of(&client, "table").await;
    assert!(
        table.contains("503"),
        "the provider's error is shown: {table}"
    );
    screenshot(&client, "deliveries-failed").await;
    // The queues page shows the provider's circuit open.
    client
        .goto(&format!("{base}/console/queues"))
        .await
        .unwrap();
    let circuit = client
        .find(Locator::Css(".circuit-open"))
        .await
        .expect("sendgrid's circuit shown open")
        .text()
        .await
        .unwrap();
    assert_eq!(circuit, "open");
    screenshot(&client, "queues-outage").await;
    client.back().await.unwrap();

    // The provider is back: retry them all in one click.
    fake.set_fallback(Reply::new(202, "").header("X-Message-Id", "sg-back"));
    client
        .find(Locator::XPath(
            "//button[starts-with(text(), 'Retry every failed message')]",
        ))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    text_when(&client, ".notice", "requeued", |t| {
        t == "3 failed messages queued again."
    })
    .await;
    wait_for("every message sent", || async {
        (common::count(&app, "select count(*) from messages where status = 'sent'").await == 3)
            .then_some(())
    })
    .await;

    // One message: its attempts and its content.
    client
        .goto(&format!("{base}/console/deliveries?member_id=ko-1"))
        .await
        .unwrap();
    click(&client, Locator::Css("td a")).await;
    let facts = text_when(&client, "dl.facts", "the message page", |t| {
        t.contains("sent")
    })
    .await;
    assert!(facts.contains("v0"), "{facts}");
    let attempts = text_of(&client, "table").await;
    assert!(
        attempts.contains("transient") && attempts.contains("sent"),
        "{attempts}"
    );
    screenshot(&client, "message").await;

    // Open the member.
    click(&client, Locator::LinkText("ko-1")).await;
    let facts = text_when(&client, "dl.facts", "the member page", |t| {
        t.contains("Balance")
    })
    .await;
    assert!(
        facts.contains("100 points") && facts.contains("ko1@example.com"),
        "{facts}"
    );
    screenshot(&client, "member").await;

    // Queues and dead letters.
    client
        .goto(&format!("{base}/console/queues"))
        .await
        .unwrap();
    let queues = text_of(&client, "main").await;
    assert!(queues.contains("sendgrid"), "{queues}");
    screenshot(&client, "queues").await;
    client
        .goto(&format!("{base}/console/dead-letters"))
        .await
        .unwrap();
    let dead = text_when(&client, "main", "the malformed event listed", |t| {
        t.contains("not JSON")
    })
    .await;
    assert!(dead.contains("Dead letters, newest first (1)"), "{dead}");
    screenshot(&client, "dead-letters").await;

    client.close().await.unwrap();
    worker.stop().await.unwrap();
    env.cleanup().await;
}
