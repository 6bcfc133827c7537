//! The `flashsale-api` binary as an operator runs it: SIGTERM ends it
//! gracefully with exit 0; `--help` never prints the passwords in the
//! environment.

use flashsale_testkit as common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_api_with_exit_0() {
    let env = common::env().await;
    let (mut child, _) = super::api_process(&env).await;
    let status =
        flashsale_testkit::terminate(&mut child.0).expect("the API did not stop on SIGTERM");
    assert_eq!(status.code(), Some(0));
    env.finish().await;
}

/// `--help` names the backend variables but never prints their values from
/// the environment (they carry passwords).
#[test]
fn help_never_prints_the_passwords_in_the_environment() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flashsale-api"))
        .arg("--help")
        .env("DATABASE_URL", "postgres://u:pg-pass-1@127.0.0.1/x")
        .env("AMQP_URL", "amqp://u:mq-pass-2@127.0.0.1/%2f")
        .env("REDIS_URL", "redis://:rd-pass-3@127.0.0.1")
        .output()
        .expect("runs");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("DATABASE_URL"), "{help}");
    for secret in ["pg-pass-1", "mq-pass-2", "rd-pass-3"] {
        assert!(!help.contains(secret), "--help printed {secret}");
    }
}
