//! `fsctl doctor`: what this machine's PostgreSQL, Redis and RabbitMQ can do
//! raw, what the engine achieves on them end to end, the ratio, and the
//! bottleneck. Everything runs on a scratch database and namespace (the
//! same `Scratch` the tests use) that is removed afterwards, also on error.

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

/// Runs `f` for about `budget`; returns operations per second.
async fn rate<F, Fut, E>(budget: Duration, mut f: F) -> Result<f64, E>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<u64, E>>,
{
    let started = Instant::now();
    let mut done = 0;
    while started.elapsed() < budget {
        done += f().await?;
    }
    Ok(done as f64 / started.elapsed().as_secs_f64())
}

fn capacity(
    component: &'static str,
    measure: impl Into<String>,
    per_second: f64,
    unit: &'static str,
) -> Capacity {
    Capacity {
        component,
        measure: measure.into(),
        per_second,
        unit,
    }
}

fn order_payload(id: &str, i: u64, product: i64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "orderId": id, "userId": format!("doctor-{i}"), "productId": product,
        "quantity": 1, "acceptedAt": chrono::Utc::now(),
    }))
    .unwrap_or_default()
}

async fn rabbitmq(
    b: &BackendUrls,
    budget: Duration,
    out: &mut Vec<Capacity>,
) -> Result<(), Failure> {
    let ns = b.namespace();
    let conn = broker::connect(&b.amqp_url, "fsctl-doctor").await?;
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    broker::declare_queues(&channel, &ns).await?;
    let queue = ns.orders_queue();

    let started = Instant::now();
    let published: Vec<Result<(), broker::PublishError>> = stream::iter(0u64..)
        .take_while(|_| std::future::ready(started.elapsed() < budget))
        .map(|i| {
            let (channel, queue) = (&channel, &queue);
            async move {
                let id = format!("doctor-w-{i}");
                broker::publish_confirmed(channel, queue, &id, &order_payload(&id, i, 1), None)
                    .await
            }
        })
        .buffer_unordered(PUBLISH_WINDOW)
        .collect()
        .await;
    let confirmed = published.iter().filter(|r| r.is_ok()).count() as f64;
    out.push(capacity(
        "RabbitMQ",
        format!("persistent publishes, {PUBLISH_WINDOW} confirms in flight"),
        confirmed / started.elapsed().as_secs_f64(),
        "msg/s",
    ));

    let mut i = 0u64;
    let one_by_one = rate(budget / 2, || {
        i += 1;
        let (channel, queue, id) = (&channel, &queue, format!("doctor-s-{i}"));
        async move {
            broker::publish_confirmed(channel, queue, &id, &order_payload(&id, i, 1), None)
                .await
                .map(|()| 1)
        }
    })
    .await?;
    out.push(capacity(
        "RabbitMQ",
        "persistent publishes, one confirm awaited each",
        one_by_one,
        "msg/s",
    ));
    let _ = conn.close(200, "doctor".into()).await;

    // Consume + ack what was published, as the worker does: batches up to
    // the prefetch, one `multiple` ack per batch.
    let consumer = OrderConsumer::open(&b.amqp_url, &ns, DEFAULT_PREFETCH, "fsctl-doctor").await?;
    let started = Instant::now();
    let mut taken = 0u64;
    while started.elapsed() < budget * 2 {
        let batch = tokio::time::timeout(Duration::from_millis(500), consumer.next_batch()).await;
        let Ok(Ok(Some(deliveries))) = batch else {
            break;
        };
        taken += deliveries.len() as u64;
        if let Some(last) = deliveries.last() {
            last.acker.ack(BasicAckOptions { multiple: true }).await?;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    consumer.close().await;
    out.push(capacity(
        "RabbitMQ",
        format!("consume + ack, prefetch {DEFAULT_PREFETCH}"),
        taken as f64 / seconds,
        "msg/s",
    ));
    Ok(())
}

async fn postgresql(
    ledger: &StockLedger,
    budget: Duration,
    out: &mut Vec<Capacity>,
) -> Result<(), Failure> {
    let pool = ledger.pool();
    sqlx::query(
        "INSERT INTO products (id, name, stock, seeded_stock) VALUES (900000001, 'doctor hot row', 1000000000, 1000000000)",
    )
    .execute(pool)
    .await?;
    let hot = rate(budget, || async {
        sqlx::query("UPDATE products SET stock = stock - 1 WHERE id = 900000001 AND stock >= 1")
            .execute(pool)
            .await
            .map(|_| 1)
    })
    .await?;
    out.push(capacity(
        "PostgreSQL",
        "conditional UPDATE of one hot row",
        hot,
        "tx/s",
    ));

    let mut next = 0u64;
    for batch in INSERT_BATCHES {
        let rows_per_second = rate(budget / 3, || {
            let keys: Vec<String> = (next..next + batch as u64).map(|i| format!("doctor-{i}")).collect();
            next += batch as u64;
            async move {
                sqlx::query(
                    "INSERT INTO orders (idempotency_key, user_id, product_id, quantity, status, accepted_at, processed_at)
                     SELECT k, k, 900000002, 1, 'confirmed', now(), now() FROM unnest($1::text[]) AS t(k)
                     ON CONFLICT (idempotency_key) DO NOTHING",
                )
                .bind(&keys)
                .execute(pool)
                .await
                .map(|r| r.rows_affected())
            }
        })
        .await?;
        let note = if batch == ENGINE_BATCH {
            " (the worker's statement size)"
        } else {
            ""
        };
        let rows = if batch == 1 { "row" } else { "rows" };
        out.push(capacity(
            "PostgreSQL",
            format!("idempotent inserts, {batch} {rows} a transaction{note}"),
            rows_per_second,
            "rows/s",
        ));
    }
    Ok(())
}

async fn redis(b: &BackendUrls, budget: Duration, out: &mut Vec<Capacity>) -> Result<(), Failure> {
    let conn = redis_conn::connect(&b.redis_url).await?;
    let unpipelined = rate(budget, || {
        let mut c = conn.clone();
        async move {
            redis::cmd("PING")
                .query_async::<String>(&mut c)
                .await
                .map(|_| 1)
        }
    })
    .await?;
    out.push(capacity(
        "Redis",
        "round trips, one command each",
        unpipelined,
        "cmd/s",
    ));
    let pipelined = rate(budget, || {
        let mut c = conn.clone();
        async move {
            let mut pipe = redis::pipe();
            for _ in 0..PIPELINE {
                pipe.cmd("PING");
            }
            pipe.query_async::<Vec<String>>(&mut c)
                .await
                .map(|v| v.len() as u64)
        }
    })
    .await?;
    out.push(capacity(
        "Redis",
        format!("pipelined, {PIPELINE} commands a trip"),
        pipelined,
        "cmd/s",
    ));
    let lock = ProductLock::new(conn.clone(), b.namespace(), "fsctl-doctor");
    let product = ProductId::new(1).map_err(|e| Failure::usage(e.message))?;
    let cycles = rate(budget, || {
        let lock = lock.clone();
        async move {
            if let Some(held) = lock.try_acquire(product).await? {
                lock.release(&held).await?;
            }
            Ok::<_, flashsale_engine::seams::BackendFailed>(1)
        }
    })
    .await?;
    out.push(capacity(
        "Redis",
        "product lock acquire + release",
        cycles,
        "cycles/s",
    ));
    Ok(())
}

/// An in-process API takes a storm; then one worker drains what it accepted.
async fn engine(
    b: &BackendUrls,
    ledger: &StockLedger,
    budget: Duration,
) -> Result<EngineFigures, Failure> {
    ledger
        .create_missing(&[NewProduct {
            id: 1,
            name: "doctor ample".into(),
            stock: 1_000_000_000,
            max_per_order: 10,
            per_user_limit: None,
        }])
        .await?;
    let app = Application::build(ApiConfig::new(b.clone(), "127.0.0.1:0"))
        .await
        .map_err(Failure::unreachable)?;
    let running_api = RunningApi::spawn(app)?;
    let api = running_api.url.clone();
    let target = BuyTarget::new(
        std::slice::from_ref(&api),
        CONCURRENCY as usize,
        Duration::from_secs(30),
    )?;
    running_api
        .wait_ready(Duration::from_secs(20))
        .await
        .map_err(Failure::unreachable)?;

    let plan = StormPlan {
        load: LoadPlan {
            open: false,
            start_level: CONCURRENCY as f64,
            stages: Vec::new(),
            requests: None,
            duration: Some(budget),
            max_in_flight: CONCURRENCY as usize,
        },
        mix: BuyMix {
            products: vec![1],
            skew: Skew::Uniform,
            users: None,
            quantity: QuantityRange { min: 1, max: 1 },
            duplicate_ratio: 0.0,
            invalid_ratio: 0.0,
        },
        thresholds: Vec::new(),
        verify: false,
        drain_timeout: Duration::from_secs(60),
        timeout: Duration::from_secs(30),
        seed: rand::random(),
        scenario: None,
    };
    let report = storm::execute(
        &plan,
        &target,
        &CancellationToken::new(),
        Arc::new(LiveCounts::default()),
    )
    .await;
    running_api.stop().await;

    let accepted = report.accepted.len();
    // Every order is one unit of an ample product, so the product's stock
    // tells how many are booked: one row read, where counting the orders
    // table every few milliseconds would take CPU from the drain it times.
    let hot = ProductId::new(1).map_err(|e| Failure::usage(e.message))?;
    let sold = || async {
        let product = ledger.product(hot).await?;
        Ok::<_, sqlx::Error>(product.map_or(0, |p| i64::from(p.seeded_stock - p.stock)))
    };
    let sold_before = sold().await?;
    let mut config = WorkerConfig::new(b.clone());
    config.worker_id = Some("fsctl-doctor".into());
    let worker = Worker::connect(config)
        .await
        .map_err(Failure::unreachable)?;
    let started = Instant::now();
    let running = RunningWorker::spawn(worker, None);
    let drained = async {
        loop {
            if (sold().await? - sold_before) as usize >= accepted {
                return Ok::<_, sqlx::Error>(());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let finished = tokio::time::timeout(Duration::from_secs(120), drained).await;
    let drain_seconds = started.elapsed().as_secs_f64();
    let _ = running.stop().await;
    match finished {
        Ok(result) => result?,
        Err(_) => {
            return Err(Failure::unreachable(
                "the worker did not drain the storm's orders within 120 s",
            ));
        }
    }
    Ok(EngineFigures {
        accepts_per_second: report.accept_rate,
        accept_p50_seconds: report.latency_seconds.p50,
        accept_p99_seconds: report.latency_seconds.p99,
        accepted,
        drain_per_second: accepted as f64 / drain_seconds,
        drain_seconds,
    })
}

/// The engine figures beside the raw limits, and what holds each back.
fn verdicts(r: &DoctorReport) -> Vec<Verdict> {
    let accept_limit = r.raw(&format!("persistent publishes, {PUBLISH_WINDOW}"));
    let accept_limit_is = "RabbitMQ confirmed publishes".to_owned();
    let consume = r.raw("consume + ack");
    let insert = r.raw(&format!("idempotent inserts, {ENGINE_BATCH} rows"));
    let (drain_limit, drain_limit_is) = if consume <= insert {
        (consume, "RabbitMQ consume + ack".to_owned())
    } else {
        (
            insert,
            format!("PostgreSQL inserts at {ENGINE_BATCH} rows a transaction"),
        )
    };
    let verdict = |path, engine: f64, limit: f64, limit_is: String, goal: f64, own: &str| {
        let ratio = if limit > 0.0 { engine / limit } else { 0.0 };
        let bottleneck = if ratio >= goal {
            format!("{limit_is}: the engine runs close to it")
        } else {
            own.to_owned()
        };
        Verdict {
            path,
            engine,
            limit,
            limit_is,
            ratio,
            goal,
            bottleneck,
        }
    };
    vec![
        verdict(
            "durable accepts/s",
            r.engine.accepts_per_second,
            accept_limit,
            accept_limit_is,
            0.7,
            &format!(
                "the API's CPU per request (HTTP, JSON, two Redis round trips, the publish), shared with the load generator on {} cores",
                r.cores
            ),
        ),
        verdict(
            "drain, one hot product, orders/s",
            r.engine.drain_per_second,
            drain_limit,
            drain_limit_is,
            0.5,
            "the worker's per-batch work beyond the insert (lock and fence in Redis, stock update, decode, ack)",
        ),
    ]
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
    report.verdicts = verdicts(&report);
    if args.json {
        output::json(&report);
    } else {
        print(&report);
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
    let mut conn = redis_conn::connect(&b.redis_url).await?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await?;
    if let Some(v) = info.lines().find_map(|l| l.strip_prefix("redis_version:")) {
        versions.insert("redis", v.trim().to_owned());
    }
    step(bar, "RabbitMQ: publishes with confirms, consume + ack");
    rabbitmq(b, budget, &mut raw).await?;
    step(bar, "PostgreSQL: hot-row updates, batched inserts");
    postgresql(&ledger, budget, &mut raw).await?;
    step(bar, "Redis: round trips, pipelines, the product lock");
    redis(b, budget, &mut raw).await?;
    step(
        bar,
        "engine: accepts at c=200 through an in-process API, then one worker's drain",
    );
    let engine = engine(b, &ledger, budget).await?;
    ledger.pool().close().await;
    Ok((raw, engine, versions))
}

fn number(n: f64) -> String {
    output::thousands(n)
}

fn print(r: &DoctorReport) {
    println!(
        "{} cores; PostgreSQL {} (synchronous_commit {}); Redis {}",
        r.cores, r.postgres_version, r.synchronous_commit, r.redis_version
    );
    let mut t = output::table(&["component", "raw capacity", "rate"]);
    for c in &r.raw {
        t.add_row(vec![
            Cell::new(c.component),
            Cell::new(&c.measure),
            Cell::new(format!("{} {}", number(c.per_second), c.unit)),
        ]);
    }
    println!("{t}");
    let e = &r.engine;
    println!(
        "engine: {} durable accepts/s at c={CONCURRENCY} (p50 {}, p99 {}); one worker drained their {} orders at {} orders/s",
        number(e.accepts_per_second),
        crate::storm::report::format_seconds(e.accept_p50_seconds),
        crate::storm::report::format_seconds(e.accept_p99_seconds),
        number(e.accepted as f64),
        number(e.drain_per_second)
    );
    let mut t = output::table(&["engine path", "achieved", "limit", "ratio"]);
    for v in &r.verdicts {
        t.add_row(vec![
            Cell::new(v.path),
            Cell::new(number(v.engine)),
            Cell::new(format!("{} ({})", number(v.limit), v.limit_is)),
            output::verdict(
                v.ratio >= v.goal,
                &format!("{:.0}%", v.ratio * 100.0),
                &format!("{:.0}% (goal {:.0}%)", v.ratio * 100.0, v.goal * 100.0),
            ),
        ]);
    }
    println!("{t}");
    for v in &r.verdicts {
        println!("bottleneck of {}: {}", v.path, v.bottleneck);
    }
}
