//! `fsctl demo`: the whole engine with nothing installed. The API (the same
//! axum router as `flashsale-api`) and the workers (the same order book as
//! `flashsale-worker`) run in this process on the embedded backends; a hot
//! product is seeded, stormed over loopback by `fsctl storm`'s load engine,
//! drained and verified.

mod chaos;
mod drain;

use chaos::StallingQueue;
use drain::{checkout_summary, drain_and_audit};

use crate::exit::{Failure, OK, Outcome, VIOLATION};
use crate::output;
use crate::storm::report::StormReport;
use crate::storm::target::BuyTarget;
use crate::storm::{self, StormPlan};
use crate::token::Tokens;
use crate::verify;
use clap::Args;
use flashsale_api::{Access, Application, RunningApi};
use flashsale_engine::embedded::{EmbeddedBackends, Reach};
use flashsale_engine::identity::{AuthConfig, Secret, Signer};
use flashsale_engine::ledger::Ledger;
use flashsale_engine::ledger::NewProduct;
use flashsale_worker::{DEFAULT_PREFETCH, RunningWorker, Worker};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
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
  fsctl demo --auth                  # buyers need a token; bots cannot buy as others

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
    /// Identity on (FLASHSALE_AUTH=jwt, HS256 with a secret made up for this
    /// run): the storm signs a token per buyer, and one buyer first shows
    /// the 401, 403 and owner-only reads.
    #[arg(long)]
    pub auth: bool,
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
    let storm_args = match &args.scenario {
        Some(path) => crate::storm::StormArgs::for_scenario(path.clone()),
        None => crate::storm::StormArgs::parse_flags(
            [
                format!("--requests={}", args.requests),
                format!("--concurrency={}", args.concurrency),
                format!("--products={}", args.products),
                format!("--duplicate-ratio={}", args.duplicate_ratio),
                format!("--invalid-ratio={}", args.invalid_ratio),
            ]
            .map(Into::into),
        )
        .map_err(|e| Failure::usage(e.to_string()))?,
    };
    let plan = StormPlan::resolve(&storm_args)?;
    let catalog = match &plan.scenario {
        Some(scenario) => scenario.catalog()?,
        None => (1..=args.products)
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
                hold_seconds: None,
            })
            .collect(),
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

/// With `--auth`: the API wants HS256 tokens of a secret made up for this
/// run, and the storm signs one per buyer.
fn access(args: &DemoArgs, plan: &StormPlan) -> (Access, Option<Arc<Tokens>>) {
    if !args.auth {
        return (Access::default(), plan.tokens.clone());
    }
    let secret = uuid::Uuid::new_v4().simple().to_string();
    let access = Access {
        auth: AuthConfig::hs256(&secret),
        ..Access::default()
    };
    let tokens = Tokens::new(Signer::hs256(&Secret::new(secret)));
    (access, Some(Arc::new(tokens)))
}

fn say(quiet: bool, line: impl AsRef<str>) {
    if !quiet {
        eprintln!("{}", line.as_ref());
    }
}

/// The demo's engine: the API and the workers, on one set of embedded backends.
struct DemoEngine {
    api: RunningApi,
    workers: Vec<DemoWorker>,
    /// With `--chaos`: the worker that will die holding a batch.
    chaos: Option<Chaos>,
}

/// `--chaos`: the victim stalls on its first batch; the others start once
/// it is dead, so it is the one holding the first orders when it dies.
struct Chaos {
    victim: DemoWorker,
    stalled: Arc<tokio::sync::Notify>,
    others_go: CancellationToken,
}

impl DemoEngine {
    /// Starts the API on `listen` and `workers` workers, and waits until the API is ready.
    async fn start(
        backends: &EmbeddedBackends,
        listen: &str,
        workers: u64,
        chaos: bool,
        access: &Access,
    ) -> Result<Self, Failure> {
        let app = Application::embedded(backends, listen, access)
            .await
            .map_err(|e| Failure::usage(e.to_string()))?;
        let api = RunningApi::spawn(app)?;
        let stalled = Arc::new(tokio::sync::Notify::new());
        let victim_held = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let others_go = CancellationToken::new();
        let mut running: Vec<DemoWorker> = (1..=workers)
            .map(|i| {
                let id = format!("demo-worker-{i}");
                let victim = chaos && i == 1;
                let worker = if victim {
                    let reach = Reach {
                        queue: Arc::new(StallingQueue {
                            inner: backends.queue.clone(),
                            stalled: stalled.clone(),
                            held: victim_held.clone(),
                        }),
                        ..backends.reach()
                    };
                    Worker::embedded_on(&id, backends, reach, DEFAULT_PREFETCH)
                } else {
                    Worker::embedded(&id, backends, DEFAULT_PREFETCH)
                };
                let start = (chaos && !victim).then(|| others_go.clone());
                DemoWorker {
                    stats: worker.stats(),
                    running: RunningWorker::spawn(worker, start),
                    alive: Arc::new(std::sync::atomic::AtomicBool::new(true)),
                    held: victim_held.clone(),
                }
            })
            .collect();
        api.wait_ready(Duration::from_secs(5))
            .await
            .map_err(Failure::unreachable)?;
        let chaos = chaos.then(|| Chaos {
            victim: running.remove(0),
            stalled,
            others_go,
        });
        Ok(Self {
            api,
            workers: running,
            chaos,
        })
    }

    /// What the dashboard reads of every worker, the victim first.
    fn sources(&self, backends: &EmbeddedBackends) -> crate::top::collect::EmbeddedSources {
        let victim = self.chaos.as_ref().map(|c| &c.victim);
        crate::top::collect::EmbeddedSources {
            backends: backends.clone(),
            workers: victim
                .into_iter()
                .chain(&self.workers)
                .map(|w| (w.stats.clone(), w.alive.clone()))
                .collect(),
        }
    }

    /// Stops the workers gracefully, then the API.
    async fn stop(self) {
        for w in self.workers {
            let _ = w.running.stop().await;
        }
        self.api.stop().await;
    }
}

impl Chaos {
    /// Kills the victim once it hangs on its batch (or when the storm is
    /// over, if it never got one) and lets the others start. Returns the
    /// victim's id and how many deliveries it held.
    async fn strike(self, storm_over: CancellationToken) -> (String, usize) {
        tokio::select! {
            () = self.stalled.notified() => {}
            () = storm_over.cancelled() => {}
        }
        let held = self.victim.held.load(std::sync::atomic::Ordering::SeqCst);
        let id = self.victim.running.id.clone();
        self.victim.running.kill().await;
        self.victim
            .alive
            .store(false, std::sync::atomic::Ordering::Relaxed);
        self.others_go.cancel();
        (id, held)
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
    let (access, tokens) = access(args, &plan);
    let mut engine =
        DemoEngine::start(&backends, &args.listen, args.workers, args.chaos, &access).await?;
    let api = engine.api.url.clone();
    if args.auth
        && let Some(tokens) = &tokens
    {
        let product = plan.mix.products[0];
        let lines = crate::identity_tour::run(&api, tokens, product).await?;
        say(quiet, "auth: FLASHSALE_AUTH=jwt (HS256); one buyer first:");
        for line in lines {
            say(quiet, line);
        }
    }
    let target = BuyTarget::new(
        std::slice::from_ref(&api),
        plan.load.max_in_flight,
        plan.timeout,
        tokens,
    )?;
    say(
        quiet,
        format!(
            "storm: {} buys at concurrency {} against {api}",
            plan.load.requests.unwrap_or(0),
            plan.load.max_in_flight
        ),
    );
    let sources = engine.sources(&backends);
    let report = storm_and_drain(
        args,
        &plan,
        &target,
        &backends,
        engine.chaos.take(),
        sources,
        &api,
    )
    .await?;
    let code = print_outcome(args, &report);
    if args.serve {
        serve_until_ctrl_c(&api).await;
    }
    engine.stop().await;
    Ok(code)
}

/// The storm (with the chaos strike, if any), then the drain and the audit;
/// under `--top` the dashboard runs meanwhile.
async fn storm_and_drain(
    args: &DemoArgs,
    plan: &StormPlan,
    target: &BuyTarget,
    backends: &EmbeddedBackends,
    chaos: Option<Chaos>,
    sources: crate::top::collect::EmbeddedSources,
    api: &str,
) -> Result<StormReport, Failure> {
    let quiet = args.json || args.top;
    let stop = if args.top {
        CancellationToken::new()
    } else {
        storm::stop_on_ctrl_c()
    };
    let storm_over = CancellationToken::new();
    let strike = chaos.map(|c| tokio::spawn(c.strike(storm_over.clone())));
    let show = !args.json && !args.top && std::io::stdout().is_terminal();
    let job = {
        let (plan, target, backends, stop) =
            (plan.clone(), target.clone(), backends.clone(), stop.clone());
        async move {
            let mut report = storm::execute_with_progress(&plan, &target, &stop, show).await;
            storm_over.cancel();
            if let Some(strike) = strike
                && let Ok((id, held)) = strike.await
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
            drain_and_audit(&backends, &mut report, show).await?;
            if let Some(checkout) = plan.checkout {
                report.checkout =
                    Some(checkout_summary(&backends, &plan, checkout, &report).await?);
            }
            Ok::<_, Failure>(report)
        }
    };
    if !args.top {
        let report = job.await;
        stop.cancel();
        return report;
    }
    let job = tokio::spawn(job);
    let shown = crate::top::run_embedded(sources, api).await;
    stop.cancel();
    let report = job.await.map_err(|e| Failure::usage(e.to_string()))??;
    shown?;
    println!("{}", closing_line(&report));
    Ok(report)
}

/// The report (JSON, or tables and the closing line) and the exit code.
fn print_outcome(args: &DemoArgs, report: &StormReport) -> u8 {
    if args.json {
        output::json(report);
    } else if !args.top {
        report.print();
        report.print_drain();
        if let Some(audit) = &report.audit {
            verify::print_report(audit);
        }
        println!("{}", closing_line(report));
    }
    match &report.audit {
        Some(audit) if audit.ok && audit.lost == 0 && audit.pending == 0 => OK,
        _ => VIOLATION,
    }
}

/// `--serve`: the API stays up for curl until Ctrl-C.
async fn serve_until_ctrl_c(api: &str) {
    println!("the API stays up at {api} until Ctrl-C; try:");
    println!(
        "  curl -s -X POST {api}/buy -H 'content-type: application/json' -d '{{\"userId\":\"me\",\"productId\":1,\"quantity\":1}}'"
    );
    println!("  curl -s {api}/products/1");
    let _ = tokio::signal::ctrl_c().await;
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
