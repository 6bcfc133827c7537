//! `fsctl storm`: configurable buy storms with numbers a k6, oha or wrk2
//! user can trust, and the one check no general load generator can make:
//! that every order accepted was booked exactly once and the books balance.
//!
//! `load` decides when requests go out, `mix` what they carry, `target`
//! sends them, `report` sums them up, `drain` waits for the accepted orders
//! and verifies, `threshold` judges.

pub mod drain;
pub mod load;
pub mod mix;
pub mod report;
pub mod target;
pub mod threshold;

use crate::exit::{Failure, OK, Outcome, PENDING, VIOLATION};
use crate::scenario::Scenario;
use crate::verify::{self, parse_duration};
use crate::{backends, output};
use clap::Args;
use flashsale_engine::BackendUrls;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use load::{LoadPlan, Shot, Stage};
use mix::{BuyMix, MixSource, QuantityRange, Skew};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use report::{BuyResult, StormReport};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use target::{BuyTarget, Outcome as Answer};
use threshold::Threshold;
use tokio_util::sync::CancellationToken;

/// A storm threshold failed.
pub const THRESHOLD_FAILED: u8 = 99;

const DEFAULT_REQUESTS: u64 = 1000;
const DEFAULT_CONCURRENCY: u64 = 50;
const DEFAULT_IN_FLIGHT: u64 = 1000;
const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Args)]
#[command(after_help = concat!(
"Load model: closed by default (-c senders, each sending its next request
when the last is answered, keep-alive). With -q the model is open: requests go
out at R per second in total whatever the answers, and latency counts from
each request's intended send time (coordinated omission corrected, like
wrk2); the uncorrected figures are in --json. --stage DURATION:TARGET ramps
linearly from the level before it (-c, or -q) and may repeat; with stages the
storm lasts their sum unless -z says otherwise. -z wins over -n.

After the storm, unless --no-verify: waits (up to --drain-timeout) for every
202 to be confirmed or rejected, then runs fsctl verify's checks with exactly
this storm's accepted order ids: lost = accepted, no row, not in the DLQ.

Thresholds (k6 style, checked at the end): METRIC OP VALUE with OP one of
< <= > >= == != and METRIC one of: min p50 p90 p95 p99 p999 max mean (250ms,
1.5s, 800us; bare = ms), rate(STATUS) or rate(4xx) (share of requests: 0.9
or 90%), errors (share with no answer), unexpected, lost, pending, rps, accepts.

Examples:
  fsctl storm --scenario scenarios/hot-item.toml
  fsctl storm -c 500 -n 5000 --product 1 --threshold 'p99<250ms' --threshold 'lost==0'
  fsctl storm -q 2000 -z 30s --products 20 --skew zipf:1.1 --users 5000 --json
  fsctl storm -c 10 --stage 10s:500 --stage 20s:500 --duplicate-ratio 0.3

Exit codes: 0 all held; 1 an accepted order lost or an invariant violated;
2 bad usage or the API unreachable (nothing sent); 3 not drained within
--drain-timeout; 99 a threshold failed."))]
pub struct StormArgs {
    /// Concurrent senders (closed model, default 50); with -q, most requests in flight (default 1000).
    #[arg(short = 'c', long, value_parser = clap::value_parser!(u64).range(1..))]
    pub concurrency: Option<u64>,
    /// Requests to send (default 1000).
    #[arg(short = 'n', long, value_parser = clap::value_parser!(u64).range(1..))]
    pub requests: Option<u64>,
    /// Send for this long instead of -n requests: 30s, 2m.
    #[arg(short = 'z', long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Open model: R requests per second in TOTAL, over all --api-url.
    #[arg(short = 'q', long)]
    pub rate: Option<f64>,
    /// Ramp the level (concurrency, or rate with -q) to TARGET over DURATION: 10s:500. Repeatable.
    #[arg(long = "stage", value_name = "DURATION:TARGET")]
    pub stages: Vec<Stage>,
    /// Buy this one product (default 1).
    #[arg(long, conflicts_with = "products")]
    pub product: Option<i64>,
    /// Buy products 1..N.
    #[arg(long)]
    pub products: Option<i64>,
    /// How traffic spreads over the products: uniform, zipf:S, hot:P (share P on product 1).
    #[arg(long)]
    pub skew: Option<Skew>,
    /// Buyers drawn from N users (per-user limits bite); default: each request its own buyer.
    #[arg(long)]
    pub users: Option<u64>,
    /// Units per order: Q, or MIN-MAX drawn uniformly.
    #[arg(long)]
    pub quantity: Option<QuantityRange>,
    /// Share of requests that repeat an earlier request's key and body (a retrying client).
    #[arg(long)]
    pub duplicate_ratio: Option<f64>,
    /// Share of requests that send one of the contract's bad inputs.
    #[arg(long)]
    pub invalid_ratio: Option<f64>,
    /// A scenario TOML (scenarios/README.md): products to seed, mix, load, thresholds. Flags override it.
    #[arg(long)]
    pub scenario: Option<PathBuf>,
    /// Pass/fail rule, k6 style: 'p99<250ms', 'rate(202)>0.1', 'errors<1%', 'lost==0'. Repeatable.
    #[arg(long = "threshold", value_name = "EXPR")]
    pub thresholds: Vec<Threshold>,
    /// Skip the drain and the ledger check after the storm.
    #[arg(long)]
    pub no_verify: bool,
    /// Longest wait for accepted orders to resolve (default 60s).
    #[arg(long, value_parser = parse_duration)]
    pub drain_timeout: Option<Duration>,
    /// A request with no answer after this long counts as a timeout error.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub timeout: Duration,
    /// Also write one JSON line per request (time, status, latency, key) here.
    #[arg(long, value_name = "FILE.jsonl")]
    pub output: Option<PathBuf>,
    /// Seed of the random mix, for a storm that sends the same requests again.
    #[arg(long)]
    pub seed: Option<u64>,
    /// One JSON document on stdout (the contract's storm report).
    #[arg(long)]
    pub json: bool,
}

impl StormArgs {
    /// A storm as a scenario file describes it, no flags over it.
    pub fn for_scenario(path: PathBuf) -> Self {
        Self {
            concurrency: None,
            requests: None,
            duration: None,
            rate: None,
            stages: Vec::new(),
            product: None,
            products: None,
            skew: None,
            users: None,
            quantity: None,
            duplicate_ratio: None,
            invalid_ratio: None,
            scenario: Some(path),
            thresholds: Vec::new(),
            no_verify: false,
            drain_timeout: None,
            timeout: Duration::from_secs(30),
            output: None,
            seed: None,
            json: false,
        }
    }
}

/// Everything a storm needs, flags and scenario merged and validated.
#[derive(Debug, Clone)]
pub struct StormPlan {
    pub load: LoadPlan,
    pub mix: BuyMix,
    pub thresholds: Vec<Threshold>,
    pub verify: bool,
    pub drain_timeout: Duration,
    pub timeout: Duration,
    pub seed: u64,
    /// The scenario's catalog, seeded (missing products only) before the storm.
    pub scenario: Option<Scenario>,
}

fn usage(e: impl std::fmt::Display) -> Failure {
    Failure::usage(e.to_string())
}

/// A scenario field in the flag's syntax.
fn parsed<T: std::str::FromStr<Err = String>>(raw: &Option<String>) -> Result<Option<T>, String> {
    raw.as_deref().map(str::parse).transpose()
}

impl StormPlan {
    /// Flags over the scenario over the defaults; every value checked.
    pub fn resolve(args: &StormArgs) -> Result<Self, Failure> {
        let scenario = args.scenario.as_deref().map(Scenario::load).transpose()?;
        let spec = scenario
            .as_ref()
            .and_then(|s| s.storm.clone())
            .unwrap_or_default();
        let rate = args.rate.or(spec.rate);
        let duration = match args.duration {
            Some(d) => Some(d),
            None => spec
                .duration
                .as_deref()
                .map(parse_duration)
                .transpose()
                .map_err(usage)?,
        };
        let stages = if args.stages.is_empty() {
            spec.stages
                .iter()
                .map(|s| s.parse())
                .collect::<Result<Vec<Stage>, _>>()
                .map_err(usage)?
        } else {
            args.stages.clone()
        };
        let concurrency = args.concurrency.or(spec.concurrency);
        let open = rate.is_some();
        if let Some(r) = rate
            && !(r > 0.0 && r.is_finite())
        {
            return Err(usage(format!("--rate {r}: must be above 0")));
        }
        if concurrency == Some(0) {
            return Err(usage("--concurrency must be at least 1"));
        }
        let load = LoadPlan {
            open,
            start_level: match rate {
                Some(r) => r,
                None => concurrency.unwrap_or(DEFAULT_CONCURRENCY) as f64,
            },
            stages,
            requests: Some(args.requests.or(spec.requests).unwrap_or(DEFAULT_REQUESTS)),
            duration,
            max_in_flight: concurrency.unwrap_or(if open {
                DEFAULT_IN_FLIGHT
            } else {
                DEFAULT_CONCURRENCY
            }) as usize,
        };
        if load.requests == Some(0) {
            return Err(usage("--requests must be at least 1"));
        }

        let products = match (args.product, args.products, spec.product, spec.products) {
            (Some(id), _, _, _) => vec![id],
            (None, Some(n), _, _) => (1..=n).collect(),
            (None, None, Some(id), _) => vec![id],
            (None, None, None, Some(n)) => (1..=n).collect(),
            (None, None, None, None) => vec![1],
        };
        if products.is_empty() || products[0] < 1 {
            return Err(usage(
                "products start at 1: --product ID >= 1, --products N >= 1",
            ));
        }
        let ratio = |name: &str, flag: Option<f64>, file: Option<f64>| {
            let r = flag.or(file).unwrap_or(0.0);
            if (0.0..=1.0).contains(&r) {
                Ok(r)
            } else {
                Err(usage(format!("--{name} {r}: must be between 0 and 1")))
            }
        };
        let mix = BuyMix {
            products,
            skew: match &args.skew {
                Some(s) => s.clone(),
                None => parsed(&spec.skew).map_err(usage)?.unwrap_or(Skew::Uniform),
            },
            users: args.users.or(spec.users),
            quantity: match args.quantity {
                Some(q) => q,
                None => parsed(&spec.quantity)
                    .map_err(usage)?
                    .unwrap_or(QuantityRange { min: 1, max: 1 }),
            },
            duplicate_ratio: ratio(
                "duplicate-ratio",
                args.duplicate_ratio,
                spec.duplicate_ratio,
            )?,
            invalid_ratio: ratio("invalid-ratio", args.invalid_ratio, spec.invalid_ratio)?,
        };
        if mix.users == Some(0) {
            return Err(usage("--users must be at least 1"));
        }
        if mix.duplicate_ratio + mix.invalid_ratio > 1.0 {
            return Err(usage(
                "--duplicate-ratio plus --invalid-ratio must not exceed 1",
            ));
        }
        let thresholds = if args.thresholds.is_empty() {
            spec.thresholds
                .iter()
                .map(|t| t.parse())
                .collect::<Result<Vec<Threshold>, _>>()
                .map_err(usage)?
        } else {
            args.thresholds.clone()
        };
        if args.no_verify
            && let Some(t) = thresholds.iter().find(|t| t.needs_drain())
        {
            return Err(usage(format!(
                "threshold {:?} needs the drain: drop --no-verify",
                t.expr
            )));
        }
        let drain_timeout = match args.drain_timeout {
            Some(d) => d,
            None => spec
                .drain_timeout
                .as_deref()
                .map(parse_duration)
                .transpose()
                .map_err(usage)?
                .unwrap_or(DEFAULT_DRAIN_TIMEOUT),
        };
        Ok(Self {
            load,
            mix,
            thresholds,
            verify: !args.no_verify,
            drain_timeout,
            timeout: args.timeout,
            seed: args.seed.unwrap_or_else(rand::random),
            scenario,
        })
    }
}

/// Counters the progress bar reads while the storm runs.
#[derive(Debug, Default)]
pub struct LiveCounts {
    pub done: AtomicU64,
    pub accepted: AtomicU64,
    pub sold_out: AtomicU64,
    pub client_errors: AtomicU64,
    pub server_errors: AtomicU64,
    pub failed: AtomicU64,
}

impl LiveCounts {
    fn count(&self, answer: Answer) {
        let counter = match answer {
            Answer::Status(202) => Some(&self.accepted),
            Answer::Status(409) => Some(&self.sold_out),
            Answer::Status(400..=499) => Some(&self.client_errors),
            Answer::Status(500..) => Some(&self.server_errors),
            Answer::Status(_) => None,
            Answer::Error(_) => Some(&self.failed),
        };
        if let Some(c) = counter {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.done.fetch_add(1, Ordering::Relaxed);
    }

    fn line(&self) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "202 {} · 409 {} · 4xx {} · 5xx {} · errors {}",
            get(&self.accepted),
            get(&self.sold_out),
            get(&self.client_errors),
            get(&self.server_errors),
            get(&self.failed)
        )
    }
}

/// A short random id that makes this storm's keys and buyers unique.
pub fn run_id(seed: u64) -> String {
    format!("{:08x}", (seed ^ rand::random::<u64>()) as u32)
}

/// Sends the storm and builds its report (no drain, no thresholds yet).
pub async fn execute(
    plan: &StormPlan,
    target: &BuyTarget,
    stop: &CancellationToken,
    live: Arc<LiveCounts>,
) -> StormReport {
    let source = Arc::new(MixSource::new(plan.mix.clone(), run_id(plan.seed)));
    let seed = plan.seed;
    let fire = {
        let (source, target) = (source.clone(), target.clone());
        move |i: u64| {
            let (source, target, live) = (source.clone(), target.clone(), live.clone());
            async move {
                let mut rng = SmallRng::seed_from_u64(seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                let request = source.request(i, &mut rng);
                let answer = target.buy(i, &request).await;
                if let Answer::Status(status) = answer.outcome {
                    source.answered(&request, status, &mut rng);
                }
                live.count(answer.outcome);
                BuyResult {
                    kind: request.kind,
                    key: request.key,
                    answer,
                }
            }
        }
    };
    let shots = load::drive(&plan.load, stop, fire).await;
    let mut report = StormReport::from_shots(
        source.run_id(),
        &shots,
        plan.load.open.then_some(plan.load.start_level),
        stop.is_cancelled(),
    );
    report.shots = shots;
    report
}

/// [`execute`] with the live progress bar (when `show`).
pub async fn execute_with_progress(
    plan: &StormPlan,
    target: &BuyTarget,
    stop: &CancellationToken,
    show: bool,
) -> StormReport {
    let live = Arc::new(LiveCounts::default());
    let done = CancellationToken::new();
    let display = tokio::spawn(show_progress(
        progress(&plan.load, show),
        plan.load.clone(),
        live.clone(),
        done.clone(),
    ));
    let report = execute(plan, target, stop, live).await;
    done.cancel();
    let _ = display.await;
    report
}

/// Checks each API answers `/health/live` before anything is sent.
async fn preflight(client: &reqwest::Client, api_urls: &[String]) -> Result<(), Failure> {
    for url in api_urls {
        let live = format!("{}/health/live", url.trim_end_matches('/'));
        let answer = tokio::time::timeout(Duration::from_secs(3), client.get(&live).send()).await;
        match answer {
            Ok(Ok(r)) if r.status().is_success() => {}
            Ok(Ok(r)) => {
                return Err(Failure::unreachable(format!(
                    "API at {url} answered {} on /health/live; nothing sent",
                    r.status()
                )));
            }
            Ok(Err(e)) => {
                return Err(Failure::unreachable(format!(
                    "cannot reach the API at {url}: {e}; nothing sent (start it: fsctl up)"
                )));
            }
            Err(_) => {
                return Err(Failure::unreachable(format!(
                    "API at {url} did not answer /health/live within 3s; nothing sent"
                )));
            }
        }
    }
    Ok(())
}

/// Seeds the scenario's missing products when PostgreSQL is reachable, and
/// warns when existing ones differ from what the scenario describes.
async fn seed_scenario(b: &BackendUrls, scenario: &Scenario, quiet: bool) {
    let catalog = match scenario.catalog() {
        Ok(c) if !c.is_empty() => c,
        _ => return,
    };
    let seeded = async {
        let ledger = backends::ledger(b).await?;
        let created = ledger.create_missing(&catalog).await?;
        let existing = ledger.products().await?;
        Ok::<_, Failure>((created, existing))
    };
    match tokio::time::timeout(Duration::from_secs(10), seeded).await {
        Ok(Ok((created, existing))) => {
            if !quiet && !created.is_empty() {
                eprintln!(
                    "seeded {} missing products of {:?}",
                    created.len(),
                    scenario.name
                );
            }
            let differing: Vec<String> = catalog
                .iter()
                .filter_map(|want| {
                    let have = existing.iter().find(|p| p.id == want.id)?;
                    let differs = have.stock < want.stock
                        || have.max_per_order != want.max_per_order
                        || have.per_user_limit != want.per_user_limit;
                    differs.then(|| {
                        format!(
                            "product {}: stock {} of {}, max per order {}",
                            have.id, have.stock, want.stock, have.max_per_order
                        )
                    })
                })
                .collect();
            if let Some(first) = differing.first() {
                eprintln!(
                    "fsctl: {} of the scenario's products already exist and differ from it ({first}); \
                     `fsctl seed --scenario FILE --reset` starts the sale afresh",
                    differing.len()
                );
            }
        }
        Ok(Err(e)) => eprintln!(
            "fsctl: could not seed {:?} ({}); storming the products as they are",
            scenario.name, e.message
        ),
        Err(_) => eprintln!("fsctl: seeding timed out; storming the products as they are"),
    }
}

fn progress(plan: &LoadPlan, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden());
    }
    let (len, template) = match (plan.time_limit(), plan.request_limit()) {
        (Some(limit), _) => (
            limit.as_millis() as u64,
            "{spinner} [{elapsed_precise}] {wide_bar} {msg}",
        ),
        (None, Some(n)) => (n, "{spinner} {pos}/{len} {wide_bar} {msg}"),
        (None, None) => (0, "{spinner} {msg}"),
    };
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// Redraws the bar until `done`; the load loop never waits for it.
async fn show_progress(
    bar: ProgressBar,
    plan: LoadPlan,
    live: Arc<LiveCounts>,
    done: CancellationToken,
) {
    let started = tokio::time::Instant::now();
    let mut last = (started, 0u64);
    loop {
        tokio::select! {
            () = done.cancelled() => break,
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        let now = tokio::time::Instant::now();
        let n = live.done.load(Ordering::Relaxed);
        let rate = (n - last.1) as f64 / (now - last.0).as_secs_f64().max(1e-3);
        last = (now, n);
        if plan.time_limit().is_some() {
            bar.set_position(started.elapsed().as_millis() as u64);
        } else {
            bar.set_position(n);
        }
        bar.set_message(format!("{n} done · {rate:.0}/s · {}", live.line()));
    }
    bar.finish_and_clear();
}

/// First Ctrl-C stops the storm (the report still comes); a second one exits.
/// Cancelling the token yourself once the storm is over leaves Ctrl-C alone.
pub fn stop_on_ctrl_c() -> CancellationToken {
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            pressed = tokio::signal::ctrl_c() => if pressed.is_err() { return },
            () = token.cancelled() => return,
        }
        eprintln!("\nstopping: in-flight requests get 2s; Ctrl-C again to quit at once");
        token.cancel();
        if tokio::signal::ctrl_c().await.is_ok() {
            std::process::exit(130);
        }
    });
    stop
}

pub async fn run(b: &BackendUrls, api_urls: &[String], args: &StormArgs) -> Outcome {
    let plan = StormPlan::resolve(args)?;
    let show = !args.json && std::io::stdout().is_terminal();
    let connections = plan.load.max_in_flight.max(plan.load.peak_level() as usize);
    let target = BuyTarget::new(api_urls, connections, plan.timeout)?;
    preflight(target.client(), api_urls).await?;
    if let Some(scenario) = &plan.scenario {
        seed_scenario(b, scenario, args.json).await;
    }
    let stop = stop_on_ctrl_c();
    let report = storm_and_settle(b, api_urls, &plan, &target, &stop, show).await?;
    if let Some(path) = &args.output {
        write_lines(path, &report.shots)?;
    }
    if args.json {
        if let Some(warning) = report.rate_missed() {
            eprintln!("{warning}");
        }
        output::json(&report);
    } else {
        report.print();
        report.print_drain();
        if let Some(audit) = &report.audit {
            // The books of the products stormed; violations anywhere.
            let mut stormed = audit.clone();
            stormed
                .products
                .retain(|p| plan.mix.products.contains(&p.id));
            verify::print_report(&stormed);
        }
        report.print_thresholds();
    }
    Ok(exit_code(&report))
}

/// The storm, then (unless --no-verify) the drain and the checks, then the
/// thresholds: what `fsctl storm` and `fsctl demo` both report.
pub async fn storm_and_settle(
    b: &BackendUrls,
    api_urls: &[String],
    plan: &StormPlan,
    target: &BuyTarget,
    stop: &CancellationToken,
    show: bool,
) -> Result<StormReport, Failure> {
    let mut report = execute_with_progress(plan, target, stop, show).await;
    if plan.verify {
        let settled = drain::settle(
            b,
            &api_urls[0],
            target.client(),
            &report.accepted,
            plan.drain_timeout,
            show,
        )
        .await?;
        report.drain = Some(settled.drain);
        report.verify = Some(settled.verify);
        report.audit = settled.audit;
    }
    report.thresholds = plan.thresholds.iter().map(|t| t.check(&report)).collect();
    Ok(report)
}

/// 1 lost or violated, else 3 still pending, else 99 a threshold failed.
pub fn exit_code(report: &StormReport) -> u8 {
    let drain = report.drain.clone().unwrap_or_default();
    let verified = report.verify.as_ref().is_none_or(|v| v.ok);
    if drain.lost > 0 || !verified {
        VIOLATION
    } else if drain.pending > 0 {
        PENDING
    } else if report.thresholds.iter().any(|t| !t.ok) {
        THRESHOLD_FAILED
    } else {
        OK
    }
}

fn write_lines(path: &std::path::Path, shots: &[Shot<BuyResult>]) -> Result<(), Failure> {
    let cannot =
        |e: std::io::Error| Failure::usage(format!("cannot write {}: {e}", path.display()));
    let file = std::fs::File::create(path).map_err(cannot)?;
    let mut out = std::io::BufWriter::new(file);
    let mut ordered: Vec<&Shot<BuyResult>> = shots.iter().collect();
    ordered.sort_by_key(|s| s.index);
    for shot in ordered {
        let (status, error, key) = match &shot.value {
            Some(r) => match r.answer.outcome {
                Answer::Status(s) => (Some(s), None, Some(r.key.as_str())),
                Answer::Error(kind) => (None, Some(kind.name()), Some(r.key.as_str())),
            },
            None => (None, Some("interrupted"), None),
        };
        let line = serde_json::json!({
            "t": shot.intended.as_secs_f64(),
            "sentAt": shot.sent.as_secs_f64(),
            "status": status,
            "error": error,
            "latency": shot.latency().as_secs_f64(),
            "key": key,
        });
        writeln!(out, "{line}").map_err(cannot)?;
    }
    out.flush().map_err(cannot)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cli, Command};
    use clap::Parser;

    fn plan(args: &[&str]) -> Result<StormPlan, Failure> {
        let cli = Cli::try_parse_from([&["fsctl", "storm"], args].concat())
            .map_err(|e| Failure::usage(e.to_string()))?;
        let Command::Storm(args) = cli.command else {
            unreachable!("parsed as storm")
        };
        StormPlan::resolve(&args)
    }

    #[test]
    fn every_shipped_scenario_resolves_to_a_storm() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
        for entry in std::fs::read_dir(dir).expect("scenarios/") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                let p = plan(&["--scenario", path.to_str().expect("utf-8")])
                    .unwrap_or_else(|e| panic!("{}: {}", path.display(), e.message));
                let catalog = p
                    .scenario
                    .as_ref()
                    .expect("scenario")
                    .catalog()
                    .expect("catalog");
                for id in &p.mix.products {
                    assert!(
                        catalog.iter().any(|c| c.id == *id),
                        "{} storms product {id} it does not seed",
                        path.display()
                    );
                }
            }
        }
    }

    #[test]
    fn flags_override_the_scenario() {
        let hot = concat!(env!("CARGO_MANIFEST_DIR"), "/../scenarios/hot-item.toml");
        let p = plan(&["--scenario", hot]).expect("valid");
        assert_eq!(p.load.requests, Some(5000));
        assert_eq!(p.load.start_level, 500.0);
        assert_eq!(p.thresholds.len(), 1);
        let p = plan(&[
            "--scenario",
            hot,
            "-n",
            "10",
            "-c",
            "3",
            "--threshold",
            "p50<1s",
            "--threshold",
            "lost==0",
        ])
        .expect("valid");
        assert_eq!(p.load.requests, Some(10));
        assert_eq!(p.load.start_level, 3.0);
        assert_eq!(p.thresholds.len(), 2);
        let p = plan(&["-q", "100", "-z", "5s"]).expect("valid");
        assert!(p.load.open);
        assert_eq!(p.load.max_in_flight, 1000);
        assert_eq!(p.load.time_limit(), Some(Duration::from_secs(5)));
        assert_eq!(p.load.request_limit(), None, "duration wins over -n");
    }
}
