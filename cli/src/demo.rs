//! `fsctl demo`: the whole engine with nothing installed. The API (the same
//! axum router as `flashsale-api`) and the workers (the same order book as
//! `flashsale-worker`) run in this process on the embedded backends; a hot
//! product is seeded, stormed over loopback by `fsctl storm`'s load engine,
//! drained and verified.

use crate::exit::{Failure, OK, Outcome, VIOLATION};
use crate::output;
use crate::storm::load::LoadPlan;
use crate::storm::mix::{BuyMix, QuantityRange, Skew};
use crate::storm::report::{Drain, StormReport, VerifySummary};
use crate::storm::target::BuyTarget;
use crate::storm::{self, StormPlan};
use crate::verify;
use clap::Args;
use flashsale_api::{Application, RunningApi};
use flashsale_engine::embedded::EmbeddedBackends;
use flashsale_engine::ledger::Ledger;
use flashsale_engine::ledger::NewProduct;
use flashsale_engine::queue::{Delivered, OrderQueue, QueueConsumer};
use flashsale_engine::seams::BackendFailed;
use flashsale_worker::{DEFAULT_PREFETCH, RunningWorker, Worker};
use std::collections::HashSet;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Longest wait for the accepted orders to resolve.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Args)]
#[command(
    after_help = "Runs the API and the workers in this process on embedded (in-memory)
backends: no PostgreSQL, Redis, RabbitMQ or Docker, and no network beyond
loopback. Seeds the products, storms them with fsctl storm's load engine,
waits for every accepted order to be confirmed or rejected, checks the
books (invariants 1-5) and prints the storm report.

Examples:
  fsctl demo
  fsctl demo --chaos                 # kill a worker mid-storm: nothing lost
  fsctl demo --products 20 --stock 50 --duplicate-ratio 0.2 --invalid-ratio 0.1
  fsctl demo --scenario scenarios/retry-storm.toml
  fsctl demo --serve                 # keep the API up for curl afterwards

Exit codes: 0 the ledger is exact and nothing was lost; 1 otherwise;
2 bad usage."
)]
pub struct DemoArgs {
    /// Units of stock per product.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i32).range(0..))]
    pub stock: i32,
    /// Products 1..N (traffic spread uniformly).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i64).range(1..))]
    pub products: i64,
    /// Buy requests in the storm.
    #[arg(short = 'n', long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..))]
    pub requests: u64,
    /// Concurrent buyers.
    #[arg(short = 'c', long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..))]
    pub concurrency: u64,
    /// Workers draining the queue.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub workers: u64,
    /// A scenario TOML (its products and its storm) instead of the flags above.
    #[arg(long)]
    pub scenario: Option<PathBuf>,
    /// Share of requests that repeat an earlier request's key and body.
    #[arg(long, default_value_t = 0.0)]
    pub duplicate_ratio: f64,
    /// Share of requests that send one of the contract's bad inputs.
    #[arg(long, default_value_t = 0.0)]
    pub invalid_ratio: f64,
    /// Kill a worker mid-storm; its deliveries are delivered again.
    #[arg(long)]
    pub chaos: bool,
    /// Watch it on the live dashboard (fsctl top) instead of the text report; q quits.
    #[arg(long, conflicts_with = "json")]
    pub top: bool,
    /// Keep the API running afterwards, for curl, until Ctrl-C.
    #[arg(long)]
    pub serve: bool,
    /// Where the API listens (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    /// One JSON document on stdout (the storm report's, with the books).
    #[arg(long)]
    pub json: bool,
}

fn plan(args: &DemoArgs) -> Result<(StormPlan, Vec<NewProduct>), Failure> {
    if let Some(path) = &args.scenario {
        let storm_args = crate::storm::StormArgs::for_scenario(path.clone());
        let plan = StormPlan::resolve(&storm_args)?;
        let catalog = plan
            .scenario
            .as_ref()
            .map(|s| s.catalog())
            .transpose()?
            .unwrap_or_default();
        return Ok((plan, catalog));
    }
    for (name, r) in [
        ("duplicate-ratio", args.duplicate_ratio),
        ("invalid-ratio", args.invalid_ratio),
    ] {
        if !(0.0..=1.0).contains(&r) {
            return Err(Failure::usage(format!(
                "--{name} {r}: must be between 0 and 1"
            )));
        }
    }
    if args.duplicate_ratio + args.invalid_ratio > 1.0 {
        return Err(Failure::usage(
            "--duplicate-ratio plus --invalid-ratio must not exceed 1",
        ));
    }
    let catalog = (1..=args.products)
        .map(|id| NewProduct {
            id,
            name: if args.products == 1 {
                "Hot item".into()
            } else {
                format!("Deal #{id}")
            },
            stock: args.stock,
            max_per_order: crate::scenario::DEFAULT_MAX_PER_ORDER,
            per_user_limit: None,
        })
        .collect();
    let plan = StormPlan {
        load: LoadPlan {
            open: false,
            start_level: args.concurrency as f64,
            stages: Vec::new(),
            requests: Some(args.requests),
            duration: None,
            max_in_flight: args.concurrency as usize,
        },
        mix: BuyMix {
            products: (1..=args.products).collect(),
            skew: Skew::Uniform,
            users: None,
            quantity: QuantityRange { min: 1, max: 1 },
            duplicate_ratio: args.duplicate_ratio,
            invalid_ratio: args.invalid_ratio,
        },
        thresholds: Vec::new(),
        verify: true,
        drain_timeout: DRAIN_TIMEOUT,
        timeout: Duration::from_secs(30),
        seed: rand::random(),
        scenario: None,
    };
    Ok((plan, catalog))
}

/// A worker running in this process, which `--chaos` may kill.
/// A demo worker: the running worker, and what the dashboard and the
/// `--chaos` report read of it.
struct DemoWorker {
    running: RunningWorker,
    stats: Arc<flashsale_engine::heartbeat::WorkerStats>,
    alive: Arc<std::sync::atomic::AtomicBool>,
    /// Deliveries the `--chaos` victim held when it stalled.
    held: Arc<std::sync::atomic::AtomicUsize>,
}

/// `--chaos`: the queue as the victim worker sees it. Its first batch is
/// taken (the deliveries are held, unacknowledged) and then the worker
/// hangs there until the demo kills it, as a process killed mid-batch.
struct StallingQueue {
    inner: flashsale_engine::queue::MemoryQueue,
    stalled: Arc<tokio::sync::Notify>,
    held: Arc<std::sync::atomic::AtomicUsize>,
}

struct StallingConsumer {
    inner: Box<dyn QueueConsumer>,
    stalled: Arc<tokio::sync::Notify>,
    held: Arc<std::sync::atomic::AtomicUsize>,
}

#[async_trait::async_trait]
impl OrderQueue for StallingQueue {
    async fn publish(&self, message_id: &str, payload: &[u8]) -> Result<(), BackendFailed> {
        self.inner.publish(message_id, payload).await
    }
    async fn consume(&self, prefetch: u16) -> Result<Box<dyn QueueConsumer>, BackendFailed> {
        Ok(Box::new(StallingConsumer {
            inner: self.inner.consume(prefetch).await?,
            stalled: self.stalled.clone(),
            held: self.held.clone(),
        }))
    }
    async fn dead_letters(&self) -> Result<Vec<(String, Option<String>)>, BackendFailed> {
        self.inner.dead_letters().await
    }
    async fn probe(&self) -> flashsale_engine::seams::Probe {
        self.inner.probe().await
    }
}

#[async_trait::async_trait]
impl QueueConsumer for StallingConsumer {
    async fn next_batch(&mut self) -> Result<Option<Vec<Delivered>>, BackendFailed> {
        let batch = self.inner.next_batch().await?;
        if let Some(b) = &batch {
            self.held
                .store(b.len(), std::sync::atomic::Ordering::SeqCst);
            self.stalled.notify_one();
            std::future::pending::<()>().await;
        }
        Ok(batch)
    }
    async fn ack_through(&mut self, tag: u64) -> Result<(), BackendFailed> {
        self.inner.ack_through(tag).await
    }
    async fn dead_letter(&mut self, d: &Delivered, reason: &str) -> Result<(), BackendFailed> {
        self.inner.dead_letter(d, reason).await
    }
    async fn cancel(&mut self) {
        self.inner.cancel().await;
    }
    async fn close(self: Box<Self>) {
        self.inner.close().await;
    }
}

fn say(quiet: bool, line: impl AsRef<str>) {
    if !quiet {
        eprintln!("{}", line.as_ref());
    }
}

pub async fn run(args: &DemoArgs) -> Outcome {
    let (plan, catalog) = plan(args)?;
    if args.top && !std::io::stdout().is_terminal() {
        return Err(Failure::usage(
            "--top needs a terminal; without it the demo prints its report",
        ));
    }
    let quiet = args.json || args.top;
    let backends = EmbeddedBackends::default();
    backends.ledger.create_missing(&catalog).await?;
    let units: i64 = catalog.iter().map(|p| i64::from(p.stock)).sum();
    say(
        quiet,
        format!(
            "demo: {} product(s), {units} units in all; API and {} workers in this process on embedded backends",
            catalog.len(),
            args.workers
        ),
    );

    let app = Application::embedded(&backends, &args.listen)
        .await
        .map_err(|e| Failure::usage(e.to_string()))?;
    let running_api = RunningApi::spawn(app)?;
    let api = running_api.url.clone();

    let stalled = Arc::new(tokio::sync::Notify::new());
    let victim_held = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let others_go = CancellationToken::new();
    let mut workers: Vec<DemoWorker> = (1..=args.workers)
        .map(|i| {
            let id = format!("demo-worker-{i}");
            let worker = if args.chaos && i == 1 {
                let queue = Arc::new(StallingQueue {
                    inner: backends.queue.clone(),
                    stalled: stalled.clone(),
                    held: victim_held.clone(),
                });
                Worker::embedded_on(&id, &backends, queue, DEFAULT_PREFETCH)
            } else {
                Worker::embedded(&id, &backends, DEFAULT_PREFETCH)
            };
            // With --chaos the others wait until the victim is down, so it
            // is the one holding the first orders when it dies.
            let start = (args.chaos && i > 1).then(|| others_go.clone());
            DemoWorker {
                stats: worker.stats(),
                running: RunningWorker::spawn(worker, start),
                alive: Arc::new(std::sync::atomic::AtomicBool::new(true)),
                held: victim_held.clone(),
            }
        })
        .collect();

    let target = BuyTarget::new(
        std::slice::from_ref(&api),
        plan.load.max_in_flight,
        plan.timeout,
    )?;
    running_api
        .wait_ready(Duration::from_secs(5))
        .await
        .map_err(Failure::unreachable)?;
    say(
        quiet,
        format!(
            "storm: {} buys at concurrency {} against {api}",
            plan.load.requests.unwrap_or(0),
            plan.load.max_in_flight
        ),
    );

    let sources = crate::top::collect::EmbeddedSources {
        backends: backends.clone(),
        workers: workers
            .iter()
            .map(|w| (w.stats.clone(), w.alive.clone()))
            .collect(),
    };
    let stop = if args.top {
        CancellationToken::new()
    } else {
        storm::stop_on_ctrl_c()
    };
    let storm_over = CancellationToken::new();
    let chaos = args.chaos.then(|| {
        let victim = workers.remove(0);
        let (storm_over, stalled, go) = (storm_over.clone(), stalled.clone(), others_go.clone());
        tokio::spawn(async move {
            // The victim took a batch and hangs on it; kill it there (or at
            // the end of the storm if it never got one).
            tokio::select! {
                () = stalled.notified() => {}
                () = storm_over.cancelled() => {}
            }
            let held = victim.held.load(std::sync::atomic::Ordering::SeqCst);
            let id = victim.running.id.clone();
            victim.running.kill().await;
            victim
                .alive
                .store(false, std::sync::atomic::Ordering::Relaxed);
            go.cancel();
            (id, held)
        })
    });
    let show = !args.json && !args.top && std::io::stdout().is_terminal();
    let job = {
        let (backends, stop) = (backends.clone(), stop.clone());
        async move {
            let mut report = storm::execute_with_progress(&plan, &target, &stop, show).await;
            storm_over.cancel();
            if let Some(chaos) = chaos
                && let Ok((id, held)) = chaos.await
            {
                let what = if held == 1 { "delivery" } else { "deliveries" };
                say(
                    quiet,
                    format!(
                        "chaos: killed {id} while it held {held} unacknowledged {what}; the queue gave them to the other workers"
                    ),
                );
                report.chaos =
                    Some(serde_json::json!({"killedWorker": id, "heldDeliveries": held}));
            }
            settle(&backends, &mut report, show).await;
            report
        }
    };
    let report = if args.top {
        let job = tokio::spawn(job);
        let shown = crate::top::run_embedded(sources, &api).await;
        stop.cancel();
        let report = job.await.map_err(|e| Failure::usage(e.to_string()))?;
        shown?;
        println!("{}", closing_line(&report));
        report
    } else {
        let report = job.await;
        stop.cancel();
        report
    };

    if args.json {
        output::json(&report);
    } else if !args.top {
        report.print();
        report.print_drain();
        if let Some(audit) = &report.audit {
            verify::print_report(audit);
        }
        println!("{}", closing_line(&report));
    }
    let code = match &report.audit {
        Some(audit) if audit.ok && audit.lost == 0 && audit.pending == 0 => OK,
        _ => VIOLATION,
    };

    if args.serve {
        println!("the API stays up at {api} until Ctrl-C; try:");
        println!(
            "  curl -s -X POST {api}/buy -H 'content-type: application/json' -d '{{\"userId\":\"me\",\"productId\":1,\"quantity\":1}}'"
        );
        println!("  curl -s {api}/products/1");
        let _ = tokio::signal::ctrl_c().await;
    }
    for w in workers {
        let _ = w.running.stop().await;
    }
    running_api.stop().await;
    Ok(code)
}

/// Waits for every accepted order to be booked or dead-lettered, then
/// audits the embedded ledger with exactly those ids.
async fn settle(backends: &EmbeddedBackends, report: &mut StormReport, show: bool) {
    let bar = output::spinner(show);
    let started = Instant::now();
    let accepted = report.accepted.clone();
    let mut dead: HashSet<String> = HashSet::new();
    let mut drained = false;
    while started.elapsed() < DRAIN_TIMEOUT {
        dead = backends
            .queue
            .dead_letters()
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        let mut missing = 0;
        for id in &accepted {
            if !dead.contains(id) && backends.ledger.order(id).await.ok().flatten().is_none() {
                missing += 1;
            }
        }
        let (ready, held) = backends.queue.depth();
        bar.set_message(format!(
            "drain: {} of {} accepted orders resolved",
            accepted.len() - missing,
            accepted.len()
        ));
        // Nothing waits or is held: what is still missing is lost.
        if missing == 0 || (ready == 0 && held == 0) {
            drained = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bar.finish_and_clear();
    let audit = backends.ledger.audit(&accepted, &dead, drained);
    let (mut confirmed, mut rejected) = (0, 0);
    for id in &accepted {
        if let Ok(Some(order)) = backends.ledger.order(id).await {
            match order.status {
                flashsale_engine::OrderStatus::Confirmed => confirmed += 1,
                _ => rejected += 1,
            }
        }
    }
    report.drain = Some(Drain {
        seconds: started.elapsed().as_secs_f64(),
        resolved: accepted.len() - audit.pending - audit.lost,
        pending: audit.pending,
        lost: audit.lost,
        confirmed,
        rejected,
        source: "embedded",
    });
    report.verify = Some(VerifySummary {
        ok: audit.ok,
        violations: audit.violations.clone(),
        invariants_checked: true,
    });
    report.books = Some(audit.products.clone());
    report.audit = Some(audit);
}

/// "100 of 100 units sold, 4,900 buyers told sold out, 0 lost, ledger exact".
fn closing_line(report: &StormReport) -> String {
    let (sold, seeded) = report.books.iter().flatten().fold((0, 0), |(s, t), b| {
        (s + b.confirmed_units, t + b.seeded_stock)
    });
    let drain = report.drain.clone().unwrap_or_default();
    let told = report.status_count("409") as usize + drain.rejected;
    let books = match &report.verify {
        Some(v) if v.ok => "ledger exact".to_owned(),
        _ => "ledger VIOLATED".to_owned(),
    };
    format!(
        "{} of {} units sold, {} buyers told sold out, {} lost, {books}",
        output::thousands(sold as f64),
        output::thousands(seeded as f64),
        output::thousands(told as f64),
        drain.lost
    )
}
