//! What deploying lifecycle relies on: `lifecycle healthcheck`, the container's health check,
//! against a real `serve`.

mod common;

use std::process::{Output, Stdio};

use common::{Serve, TestEnv, free_port, wait_for};

/// `lifecycle healthcheck` with the environment's settings and this HTTP address.
fn healthcheck(env: &TestEnv, addr: &str) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_lifecycle"))
        .arg("healthcheck")
        .envs(env.env_vars())
        .env("LIFECYCLE_HTTP_ADDR", addr)
        .output()
        .unwrap()
}

#[tokio::test]
async fn healthcheck_passes_while_serve_is_ready_and_fails_before_and_after() {
    let env = TestEnv::new(&[]);
    let port = free_port();
    // Nothing listens yet: exit 1, saying so.
    let before = healthcheck(&env, &format!("127.0.0.1:{port}"));
    assert_eq!(before.status.code(), Some(1));
    let said = String::from_utf8_lossy(&before.stderr);
    assert!(said.contains("/readyz did not answer"), "{said}");
    // Listening on every address, as in a container: the check asks loopback.
    let every = format!("0.0.0.0:{port}");
    let mut serve = Serve::start_with(
        &env,
        &[("LIFECYCLE_HTTP_ADDR", every.clone())],
        Stdio::inherit(),
    );
    wait_for("the health check to pass", || {
        let passed = healthcheck(&env, &every).status.success();
        async move { passed.then_some(()) }
    })
    .await;
    assert!(serve.terminate().await.success());
    let after = healthcheck(&env, &every);
    assert_eq!(after.status.code(), Some(1), "gone after SIGTERM");
    env.cleanup().await;
}

/// The image `scripts/image` builds: `IMAGE_UNDER_TEST`, or this version's tag.
fn image() -> String {
    std::env::var("IMAGE_UNDER_TEST")
        .unwrap_or_else(|_| format!("localhost/lifecycle:{}", env!("CARGO_PKG_VERSION")))
}

/// `podman` with the project's settings (runc, cgroupfs, no default ulimits).
fn podman() -> std::process::Command {
    let mut command = std::process::Command::new("podman");
    command.env(
        "CONTAINERS_CONF",
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/container/containers.conf"
        ),
    );
    command
}

/// Runs podman to its end; its stdout, or a panic with what it said.
fn podman_output(args: &[&str]) -> String {
    let out = podman().args(args).output().expect("podman is installed");
    assert!(
        out.status.success(),
        "podman {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Waits for the welcome of `common::enrolment(env, 0)` at the sink: the first mail, to m0.
async fn first_enrolments_welcome(sink: &common::SmtpSink) {
    let mail = wait_for("the welcome at smtp-sink", || {
        let mail = sink.messages().first().map(|raw| common::parse_mail(raw));
        async move { mail }
    })
    .await;
    assert_eq!(mail.trigger, "welcome");
    assert_eq!(mail.to, "m0@example.com");
}

/// Records a migration as applied, as sqlx would have after running it.
async fn record_applied_migration(
    app: &lifecycle::testkit::app::App,
    version: i64,
    description: &str,
) {
    sqlx::query(
        "insert into _sqlx_migrations (version, description, success, checksum, execution_time)
         values ($1, $2, true, '\\x00', 0)",
    )
    .bind(version)
    .bind(description)
    .execute(&app.pool)
    .await
    .unwrap();
}

/// The uid the image runs as; the test runs it so, as a cluster would.
const IMAGE_UID: &str = "10001:10001";
/// What a shop is promised about the image's size (docs/deploy.md).
const IMAGE_MAX_BYTES: u64 = 60_000_000;

/// The image, run as it would be deployed (host network, read-only root filesystem, its
/// non-root uid) against this machine's RabbitMQ and PostgreSQL with email to smtp-sink:
/// `migrate`, then `serve` until its own HEALTHCHECK passes, an enrolment's welcome at the
/// sink, and SIGTERM answered with exit 0 within the worker's stop deadline. Ignored in the
/// parallel pass: it needs the image `scripts/image` builds, which `scripts/test` makes first.
#[tokio::test]
#[ignore]
async fn the_image_migrates_serves_and_sends_a_welcome_read_only_as_its_own_user() {
    let image = image();
    let size: u64 = podman_output(&["image", "inspect", "--format", "{{.Size}}", &image])
        .trim()
        .parse()
        .unwrap();
    assert!(size < IMAGE_MAX_BYTES, "{image} is {size} bytes");
    let config = podman_output(&[
        "image",
        "inspect",
        "--format",
        "{{.Config.User}} {{json .Config.Healthcheck.Test}}",
        &image,
    ]);
    assert_eq!(
        config.trim(),
        format!(r#"{IMAGE_UID} ["CMD","/usr/local/bin/lifecycle","healthcheck"]"#)
    );

    let sink = common::SmtpSink::start(&[]);
    let env = TestEnv::with_smtp(&sink);
    let addr = format!("127.0.0.1:{}", free_port());
    // The host's paths mean nothing inside the image: its own templates and outbox directory
    // serve.
    let vars: Vec<String> = env
        .env_vars()
        .into_iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "LIFECYCLE_TEMPLATES_DIR" | "LIFECYCLE_OUTBOX_DIR" | "LIFECYCLE_HTTP_ADDR"
            )
        })
        .chain([("LIFECYCLE_HTTP_ADDR".to_owned(), addr)])
        // A host name, not an address: the C library in the scratch image resolves it.
        .map(|(k, v)| match k.as_str() {
            "LIFECYCLE_DATABASE_URL" => (k, v.replacen("@127.0.0.1:", "@localhost:", 1)),
            _ => (k, v),
        })
        .flat_map(|(k, v)| ["--env".to_owned(), format!("{k}={v}")])
        .collect();
    assert!(vars.iter().any(|v| v.contains("@localhost:")), "{vars:?}");
    let name = format!("lifecycle-{}", env.tag);
    let state = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        state.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let run = |extra: &[&str]| {
        let mut command = podman();
        command
            .args([
                "run",
                "--network",
                "host",
                "--read-only",
                "--user",
                IMAGE_UID,
            ])
            // The file providers' outbox (SMS here) is a volume in every deployment.
            .args([
                "--volume",
                &format!("{}:/var/lib/lifecycle", state.path().display()),
            ])
            .args(&vars)
            .args(extra);
        command
    };

    let migrated = run(&["--rm", &image, "migrate"]).output().unwrap();
    assert!(
        migrated.status.success(),
        "migrate: {}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    assert!(String::from_utf8_lossy(&migrated.stdout).contains("is up to date"));

    let _removed = Removed(name.clone());
    let mut serve = common::Serve(
        run(&["--name", &name, "--env", "RUST_LOG=warn", &image, "serve"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("the image's HEALTHCHECK to pass", || {
        let healthy = podman().args(["healthcheck", "run", &name]).output();
        async move { healthy.ok().filter(|o| o.status.success()).map(|_| ()) }
    })
    .await;
    let ran = podman_output(&[
        "inspect",
        "--format",
        "{{.Config.User}} {{.HostConfig.ReadonlyRootfs}}",
        &name,
    ]);
    assert_eq!(ran.trim(), format!("{IMAGE_UID} true"));

    env.publish(&[common::enrolment(&env, 0)]).await;
    first_enrolments_welcome(&sink).await;

    let asked = std::time::Instant::now();
    podman_output(&["kill", "--signal", "TERM", &name]);
    let status = serve.0.wait().unwrap();
    assert!(status.success(), "serve in the image exited with {status}");
    assert!(
        asked.elapsed() < std::time::Duration::from_secs(30),
        "took {:?} to stop",
        asked.elapsed()
    );
    env.cleanup().await;
}

/// Removes the named container when the test ends, however it ends.
struct Removed(String);

impl Drop for Removed {
    fn drop(&mut self) {
        podman()
            .args(["rm", "--force", "--ignore", "--time", "0", &self.0])
            .output()
            .ok();
    }
}

/// systemd's notify protocol (`Type=notify` in deploy/systemd/lifecycle.service): `serve`
/// sends `READY=1` to `$NOTIFY_SOCKET` once its roles are up (and /readyz passes then), and
/// `STOPPING=1` when SIGTERM arrives, before it exits 0. The socket here is the test's own, as
/// systemd's would be.
#[tokio::test]
async fn serve_tells_systemd_it_is_ready_and_then_stopping() {
    let env = TestEnv::new(&[]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let mut serve = Serve::start_with(
        &env,
        &[
            ("NOTIFY_SOCKET", path.display().to_string()),
            ("LIFECYCLE_HTTP_ADDR", addr.clone()),
        ],
        Stdio::inherit(),
    );
    let mut buffer = [0u8; 512];
    let said = |n: usize, buffer: &[u8]| String::from_utf8_lossy(&buffer[..n]).into_owned();
    let n = socket.recv(&mut buffer).expect("READY=1 within a minute");
    assert_eq!(said(n, &buffer).trim(), "READY=1");
    assert!(
        healthcheck(&env, &addr).status.success(),
        "ready when it says so"
    );
    std::process::Command::new("kill")
        .args(["-TERM", &serve.0.id().to_string()])
        .status()
        .unwrap();
    let n = socket.recv(&mut buffer).expect("STOPPING=1 after SIGTERM");
    assert_eq!(said(n, &buffer).trim(), "STOPPING=1");
    assert!(serve.0.wait().unwrap().success());
    env.cleanup().await;
}

/// Settings this release added. The previous release refuses settings it does not know, so a
/// rollback leaves these out (docs/deploy.md, "Upgrade"), as this test does.
const SETTINGS_SINCE_PREVIOUS: &[&str] = &["LIFECYCLE_NOTIFICATIONS_EXCHANGE"];

/// The upgrade rule (docs/deploy.md): migrations are expand/contract, so the previous
/// release's binary keeps working against this release's schema. The database is migrated by
/// this release; the previous one (`scripts/previous-release` builds it; `scripts/test` passes
/// its path in PREVIOUS_LIFECYCLE_BIN) then serves on it: it starts, applies an enrolment and
/// sends its welcome to smtp-sink, and stops cleanly.
#[tokio::test]
#[ignore]
async fn the_previous_release_works_against_this_schema() {
    let previous = std::env::var("PREVIOUS_LIFECYCLE_BIN").expect(
        "PREVIOUS_LIFECYCLE_BIN names the previous release's binary (scripts/previous-release)",
    );
    let sink = common::SmtpSink::start(&[]);
    let env = TestEnv::with_smtp(&sink);
    // This release migrates.
    drop(env.app().await);
    let mut serve = common::Serve(
        std::process::Command::new(&previous)
            .arg("serve")
            .envs(env.env_vars().into_iter().filter(|(k, _)| {
                k != "LIFECYCLE_TEMPLATES_DIR" && !SETTINGS_SINCE_PREVIOUS.contains(&k.as_str())
            }))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    env.publish(&[common::enrolment(&env, 0)]).await;
    first_enrolments_welcome(&sink).await;
    assert!(serve.terminate().await.success());
    env.cleanup().await;
}

/// Mid-upgrade, a newer release has migrated the database further than this one knows: this
/// release still opens it (and so still starts, and restarts) rather than refusing a schema
/// with migrations it has never seen.
#[tokio::test]
async fn a_schema_migrated_by_a_newer_release_still_opens() {
    let env = TestEnv::new(&[]);
    let app = env.app().await;
    record_applied_migration(&app, 99_999_999, "a newer release's migration").await;
    drop(app);
    let reopened = env.app().await;
    assert_eq!(
        common::count(
            &reopened,
            "select count(*) from _sqlx_migrations where version = 99999999"
        )
        .await,
        1
    );
    drop(reopened);
    env.cleanup().await;
}

/// Tolerating a newer release's migrations does not hide a migration renamed or removed: an
/// applied version this release does not know, older than its newest, is refused by name.
#[tokio::test]
async fn an_applied_migration_this_release_lost_is_refused() {
    let env = TestEnv::new(&[]);
    let app = env.app().await;
    record_applied_migration(&app, 0, "a migration since renamed").await;
    drop(app);
    let refused = lifecycle::testkit::app::App::open(env.settings.clone())
        .await
        .err()
        .expect("a lost migration is refused");
    let said = format!("{refused:#}");
    assert!(said.contains("migration 0 was applied"), "{said}");
    env.cleanup().await;
}
