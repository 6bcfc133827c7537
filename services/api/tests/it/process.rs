//! The `flashsale-api` binary as an operator runs it: SIGTERM ends it
//! gracefully with exit 0.

use flashsale_testkit as common;

use std::process::{Command, Stdio};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_api_with_exit_0() {
    let env = common::env().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let b = env.backends();
    let mut child = flashsale_testkit::Stopped(
        Command::new(env!("CARGO_BIN_EXE_flashsale-api"))
            .env("DATABASE_URL", &b.database_url)
            .env("REDIS_URL", &b.redis_url)
            .env("AMQP_URL", &b.amqp_url)
            .env("FLASHSALE_NAMESPACE", &b.namespace)
            .env("API_ADDR", format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut ready = false;
    for _ in 0..100 {
        let answer = env
            .http
            .get(format!("http://127.0.0.1:{port}/health/ready"))
            .send()
            .await;
        if answer.is_ok_and(|r| r.status().is_success()) {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "the API never became ready");
    let status =
        flashsale_testkit::terminate(&mut child.0).expect("the API did not stop on SIGTERM");
    assert_eq!(status.code(), Some(0));
    env.finish().await;
}
