//! `fsctl doctor`: what this machine's PostgreSQL, Redis and RabbitMQ can do
//! raw, what the engine achieves on them end to end, the ratio, and the
//! bottleneck. Everything runs on a scratch database and namespace (the
//! same `Scratch` the tests use) that is removed afterwards, also on error.
//!
//! `probes` measures each component raw, `engine` runs the engine on them,
//! `verdict` compares the two and prints the report.

mod engine;
mod probes;
mod verdict;

use crate::exit::{Failure, OK, Outcome};
use crate::output;
use crate::storm::load::LoadPlan;
use crate::storm::mix::{BuyMix, QuantityRange, Skew};
use crate::storm::target::BuyTarget;
use crate::storm::{self, LiveCounts, StormPlan};
use clap::Args;
use comfy_table::Cell;
use flashsale_api::{ApiConfig, Application, RunningApi};
use flashsale_engine::ledger::{NewProduct, StockLedger};
use flashsale_engine::locks::{ProductLock, ProductLocks};
use flashsale_engine::queue::OrderConsumer;
use flashsale_engine::queue::rabbitmq as broker;
use flashsale_engine::scratch::Scratch;
use flashsale_engine::{BackendUrls, ProductId, postgres, redis_conn};
use flashsale_worker::{DEFAULT_PREFETCH, RunningWorker, Worker, WorkerConfig};
use futures_util::{StreamExt, stream};
use indicatif::ProgressBar;
use lapin::options::{BasicAckOptions, ConfirmSelectOptions};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Confirms kept in flight by the windowed publish test.
const PUBLISH_WINDOW: usize = 1000;
/// Batch sizes of the insert test; 128 is the worker's statement size.
const INSERT_BATCHES: [usize; 5] = [1, 10, 100, 128, 500];
const ENGINE_BATCH: usize = 128;
/// Redis commands per pipelined round trip.
const PIPELINE: usize = 100;
/// The end-to-end storm's concurrency.
const CONCURRENCY: u64 = 200;

#[derive(Debug, Args)]
#[command(
    after_help = "Measures on a scratch database, queues and keys (removed afterwards):
  RabbitMQ    persistent publishes with confirms to a quorum queue, 1,000 in
              flight and one awaited per publish; consume + ack with the
              worker's prefetch
  PostgreSQL  conditional UPDATE of one hot row (transactions/s); idempotent
              batched inserts at 1, 10, 100, 128 (the worker's) and 500 rows
  Redis       round trips unpipelined and pipelined (100 a trip); the product
              lock's acquire + release
  engine      an in-process API: durable accepts at c=200 and latency; then
              one in-process worker drains those orders (one hot product)
Then the ratios, and the bottleneck that remains.

Examples:
  fsctl doctor --quick
  fsctl doctor --json > capacity.json

Exit codes: 0 measured; 2 a component could not be reached."
)]
pub struct DoctorArgs {
    /// About 20 seconds instead of about a minute.
    #[arg(long)]
    pub quick: bool,
    /// One JSON document on stdout.
    #[arg(long)]
    pub json: bool,
}

/// One raw measurement.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Capacity {
    pub component: &'static str,
    pub measure: String,
    pub per_second: f64,
    pub unit: &'static str,
}

/// The engine end to end.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EngineFigures {
    pub accepts_per_second: f64,
    pub accept_p50_seconds: f64,
    pub accept_p99_seconds: f64,
    pub accepted: usize,
    pub drain_per_second: f64,
    pub drain_seconds: f64,
}

/// An engine figure beside the raw limit it leans on.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Verdict {
    pub path: &'static str,
    pub engine: f64,
    pub limit: f64,
    pub limit_is: String,
    pub ratio: f64,
    pub goal: f64,
    pub bottleneck: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DoctorReport {
    pub cores: usize,
    pub postgres_version: String,
    pub synchronous_commit: String,
    pub redis_version: String,
    pub quick: bool,
    /// The scratch deployment used (and removed).
    pub scratch: String,
    pub raw: Vec<Capacity>,
    pub engine: EngineFigures,
    pub verdicts: Vec<Verdict>,
}

impl DoctorReport {
    fn raw(&self, measure_starts: &str) -> f64 {
        self.raw
            .iter()
            .find(|c| c.measure.starts_with(measure_starts))
            .map_or(0.0, |c| c.per_second)
    }
}

fn step(bar: &ProgressBar, what: &str) {
    bar.set_message(what.to_owned());
}

pub async fn run(b: &BackendUrls, args: &DoctorArgs) -> Outcome {
    let budget = if args.quick {
        Duration::from_millis(1500)
    } else {
        Duration::from_secs(5)
    };
    let scratch = Scratch::new(b);
    let bar = crate::output::spinner(!args.json && std::io::stderr().is_terminal());
    let measured = measure(&scratch.backends, budget, &bar).await;
    step(&bar, "removing the scratch database, queues and keys");
    let removed = scratch.remove().await;
    bar.finish_and_clear();
    let (raw, engine, versions) = measured?;
    removed.map_err(|e| {
        Failure::unreachable(format!(
            "could not remove scratch {}: {e}",
            scratch.database
        ))
    })?;
    let mut report = DoctorReport {
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        postgres_version: versions.get("postgres").cloned().unwrap_or_default(),
        synchronous_commit: versions
            .get("synchronous_commit")
            .cloned()
            .unwrap_or_default(),
        redis_version: versions.get("redis").cloned().unwrap_or_default(),
        quick: args.quick,
        scratch: scratch.database.clone(),
        raw,
        engine,
        verdicts: Vec::new(),
    };
    report.verdicts = verdict::verdicts(&report);
    if args.json {
        output::json(&report);
    } else {
        verdict::print(&report);
    }
    Ok(OK)
}

type Measured = (Vec<Capacity>, EngineFigures, BTreeMap<&'static str, String>);

async fn measure(
    b: &BackendUrls,
    budget: Duration,
    bar: &ProgressBar,
) -> Result<Measured, Failure> {
    let mut raw = Vec::new();
    let mut versions = BTreeMap::new();
    step(bar, "PostgreSQL: scratch database");
    let ledger = StockLedger::new(postgres::connect_and_migrate(&b.database_url, 4).await?);
    for (key, sql) in [
        ("postgres", "SHOW server_version"),
        ("synchronous_commit", "SHOW synchronous_commit"),
    ] {
        let value: String = sqlx::query_scalar(sql).fetch_one(ledger.pool()).await?;
        versions.insert(key, value);
    }
    let conn = redis_conn::connect(&b.redis_url).await?;
    let info: String =
        redis_conn::on_any_node(&conn, redis::cmd("INFO").arg("server").clone()).await?;
    if let Some(v) = info.lines().find_map(|l| l.strip_prefix("redis_version:")) {
        versions.insert("redis", v.trim().to_owned());
    }
    step(bar, "RabbitMQ: publishes with confirms, consume + ack");
    probes::rabbitmq(b, budget, &mut raw).await?;
    step(bar, "PostgreSQL: hot-row updates, batched inserts");
    probes::postgresql(&ledger, budget, &mut raw).await?;
    step(bar, "Redis: round trips, pipelines, the product lock");
    probes::redis(b, budget, &mut raw).await?;
    step(
        bar,
        "engine: accepts at c=200 through an in-process API, then one worker's drain",
    );
    let engine = engine::engine(b, &ledger, budget).await?;
    ledger.pool().close().await;
    Ok((raw, engine, versions))
}
