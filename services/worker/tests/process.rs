//! The `flashsale-worker` binary as an operator runs it: a clear one-line
//! error for an unreachable backend, and exit 0 on SIGTERM.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use flashsale_engine::BackendUrls;
use flashsale_engine::scratch::Scratch;
use flashsale_testkit::servers;
use std::process::{Command, Stdio};
use std::time::Duration;

fn worker(b: &BackendUrls) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_flashsale-worker"));
    c.env("DATABASE_URL", &b.database_url)
        .env("REDIS_URL", &b.redis_url)
        .env("AMQP_URL", &b.amqp_url)
        .env("FLASHSALE_NAMESPACE", &b.namespace)
        .env("METRICS_ADDR", "0");
    c
}

#[test]
fn an_unreachable_backend_is_one_clear_line_and_a_failure() {
    let scratch = Scratch::new(&servers());
    let cases = [
        (
            "PostgreSQL",
            "postgres://postgres:secret@127.0.0.1:1/x",
            "DATABASE_URL",
        ),
        ("Redis", "redis://127.0.0.1:1", "REDIS_URL"),
        (
            "RabbitMQ",
            "amqp://guest:secret@127.0.0.1:1/%2f",
            "AMQP_URL",
        ),
    ];
    for (component, url, var) in cases {
        let out = worker(&scratch.backends)
            .env(var, url)
            .env("RUST_LOG", "off")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{component}: exit 0");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let line = stderr.trim();
        assert_eq!(line.lines().count(), 1, "{component}: {stderr}");
        assert!(line.contains(component), "{line}");
        assert!(line.contains("127.0.0.1:1"), "{line}");
        assert!(!line.contains("secret"), "password shown: {line}");
        assert!(!line.contains("panicked"), "{line}");
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(scratch.remove()).unwrap();
}

fn http_get(port: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    reply
}

#[test]
fn sigterm_stops_the_worker_with_exit_0() {
    let scratch = Scratch::new(&servers());
    let mut child = worker(&scratch.backends)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until it runs: its heartbeat appears in Redis.
    let client = redis::Client::open(scratch.backends.redis_url.as_str()).unwrap();
    let mut conn = client.get_connection().unwrap();
    let pattern = format!("{}:worker:*", scratch.backends.namespace);
    let mut started = false;
    for _ in 0..100 {
        let keys: Vec<String> = redis::cmd("KEYS").arg(&pattern).query(&mut conn).unwrap();
        if !keys.is_empty() {
            started = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(started, "the worker never wrote a heartbeat");

    // The heartbeat names where its metrics are served.
    let keys: Vec<String> = redis::cmd("KEYS").arg(&pattern).query(&mut conn).unwrap();
    let beat: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(&keys[0])
        .query(&mut conn)
        .unwrap();
    for field in [
        "id",
        "startedAt",
        "processed",
        "inflight",
        "product",
        "metricsAddr",
    ] {
        assert!(
            beat.contains_key(field),
            "heartbeat lacks {field}: {beat:?}"
        );
    }
    let port = beat["metricsAddr"].rsplit(':').next().unwrap().to_owned();
    assert!(http_get(&port, "/health/live").starts_with("HTTP/1.1 200"));
    let metrics = http_get(&port, "/metrics");
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    let status =
        flashsale_testkit::terminate(&mut child).expect("the worker did not stop on SIGTERM");
    assert_eq!(status.code(), Some(0));
    let keys: Vec<String> = redis::cmd("KEYS").arg(&pattern).query(&mut conn).unwrap();
    assert!(keys.is_empty(), "heartbeat left behind: {keys:?}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(scratch.remove()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_a_busy_worker_loses_and_doubles_nothing() {
    let mut env = flashsale_testkit::env().await;
    env.seed(1, 600, None).await;
    let api = env.start_api().await;
    let answers = env.storm(&api, 1, 600, 50, |i| format!("k9-{i}")).await;
    let keys: Vec<String> = answers.iter().map(|a| a.key.clone()).collect();
    assert!(answers.iter().all(|a| a.status.as_u16() == 202));

    // A worker process with a small prefetch, killed -9 while it books.
    let mut child = worker(&env.backends())
        .env("WORKER_PREFETCH", "20")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if env.count("SELECT count(*) FROM orders").await >= 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let killed = Command::new("kill")
        .args(["-9", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let _ = child.wait();
    let booked = env.count("SELECT count(*) FROM orders").await;
    assert!(
        booked > 0 && booked < 600,
        "the kill came too late to test anything ({booked} rows)"
    );

    env.start_worker().await;
    env.wait_for_rows(&keys).await;
    assert_eq!(env.count("SELECT count(*) FROM orders").await, 600);
    assert_eq!(
        env.count("SELECT count(*) FROM orders WHERE status = 'confirmed'")
            .await,
        600
    );
    assert_eq!(env.stock(1).await, 0);
    env.assert_invariants().await;
    env.finish().await;
}

/// `--help` names the backend variables but never prints their values from
/// the environment (they carry passwords).
#[test]
fn help_never_prints_the_passwords_in_the_environment() {
    let out = Command::new(env!("CARGO_BIN_EXE_flashsale-worker"))
        .arg("--help")
        .env("DATABASE_URL", "postgres://u:pg-pass-1@127.0.0.1/x")
        .env("AMQP_URL", "amqp://u:mq-pass-2@127.0.0.1/%2f")
        .env("REDIS_URL", "redis://:rd-pass-3@127.0.0.1")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("DATABASE_URL"), "{help}");
    for secret in ["pg-pass-1", "mq-pass-2", "rd-pass-3"] {
        assert!(!help.contains(secret), "--help printed {secret}");
    }
}
