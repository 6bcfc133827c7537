//! The API and the worker on the real PostgreSQL, Redis and RabbitMQ, one
//! test binary: the order path (`orders`), admission by stock tokens
//! (`admission`), faults of every backend and of
//! hostile input (`faults`), and the binary as an operator runs it (`process`).
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

mod admission;
mod faults;
mod holds;
mod identity;
mod orders;
mod partitions;
mod process;

use std::time::Duration;

/// The `flashsale-api` binary on a free port against `env`'s backends,
/// ready: its process (stopped when dropped) and its base URL.
async fn api_process(env: &flashsale_testkit::TestEnv) -> (flashsale_testkit::Stopped, String) {
    api_process_with(env, &[]).await
}

/// [`api_process`] with more settings in its environment.
async fn api_process_with(
    env: &flashsale_testkit::TestEnv,
    settings: &[(&str, &str)],
) -> (flashsale_testkit::Stopped, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let b = env.backends();
    let child = flashsale_testkit::Stopped(
        std::process::Command::new(env!("CARGO_BIN_EXE_flashsale-api"))
            .env("DATABASE_URL", &b.database_url)
            .env("REDIS_URL", &b.redis_url)
            .env("AMQP_URL", &b.amqp_url)
            .env("FLASHSALE_NAMESPACE", &b.namespace)
            .env("API_ADDR", format!("127.0.0.1:{port}"))
            .envs(settings.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    for _ in 0..100 {
        let answer = env.http.get(format!("{base}/health/ready")).send().await;
        if answer.is_ok_and(|r| r.status().is_success()) {
            return (child, base);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the API never became ready");
}
