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
