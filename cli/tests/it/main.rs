//! fsctl's tests, one binary: each command as an operator runs it, against
//! the real services (or, for the demo and the scripted storms, against
//! nothing installed at all). Shared helpers live here.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

mod admin;
mod demo;
mod doctor;
mod identity;
mod monitoring;
mod storm;
mod top;

use flashsale_engine::BackendUrls;
use serde_json::Value;
use std::process::Output;

/// `fsctl ARGS` against these backends (and namespace, when one is set),
/// without colour. Async tests wrap it: `tokio::process::Command::from(..)`.
pub fn fsctl(b: &BackendUrls, args: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_fsctl"));
    cmd.args(args)
        .env("DATABASE_URL", &b.database_url)
        .env("REDIS_URL", &b.redis_url)
        .env("AMQP_URL", &b.amqp_url)
        .env("NO_COLOR", "1");
    if !b.namespace.is_empty() {
        cmd.env("FLASHSALE_NAMESPACE", &b.namespace);
    }
    cmd
}

/// The same, as a tokio command that dies with the test.
pub fn fsctl_async(b: &BackendUrls, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::from(fsctl(b, args));
    cmd.kill_on_drop(true);
    cmd
}

/// Every backend at a dead port: a machine with nothing installed.
pub fn nowhere() -> BackendUrls {
    BackendUrls {
        database_url: "postgres://postgres@127.0.0.1:1/nowhere".into(),
        redis_url: "redis://127.0.0.1:1".into(),
        amqp_url: "amqp://guest:guest@127.0.0.1:1/%2f".into(),
        namespace: String::new(),
        partitions: None,
    }
}

/// fsctl's exit code.
pub fn code(out: &Output) -> i32 {
    out.status.code().unwrap()
}

/// stdout as one JSON document; fails showing both streams.
pub fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not one JSON document ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Exit 0 and one JSON document.
pub fn ok_json(out: &Output) -> Value {
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    json(out)
}

/// Answers a storm report counts, over every status.
pub fn answered(report: &Value) -> u64 {
    report["statusCounts"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum()
}
