//! `fsctl storm`: configurable buy storms with numbers a k6, oha or wrk2
//! user can trust, and the one check no general load generator can make:
//! that every order accepted was booked exactly once and the books balance.
//!
//! `args` is the command line, `plan` merges it with a scenario into what
//! to do, `load` decides when requests go out, `mix` what they carry,
//! `target` sends them, `progress` shows them going, `report` sums them up
//! and `printer` prints that, `drain` waits for the accepted orders and
//! verifies, `threshold` judges. This file runs those steps in order.

mod args;
pub mod checkout;
pub mod drain;
pub mod load;
pub mod mix;
mod plan;
pub mod printer;
mod progress;
pub mod report;
pub mod target;
pub mod threshold;

pub use args::StormArgs;
use flashsale_engine::ledger::Ledger;
pub use plan::StormPlan;
pub use progress::LiveCounts;
use progress::{progress, show_progress};

use crate::exit::{Failure, OK, Outcome, PENDING, VIOLATION};
use crate::scenario::Scenario;
use crate::verify::{self};
use crate::{backends, output};
use flashsale_engine::BackendUrls;
use load::Shot;
use mix::MixSource;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use report::{BuyResult, StormReport};
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::Duration;
use target::{BuyTarget, Outcome as Answer};
use tokio_util::sync::CancellationToken;

/// A storm threshold failed.
pub const THRESHOLD_FAILED: u8 = 99;

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
    let started_at = chrono::Utc::now();
    let source = Arc::new(MixSource::new(plan.mix.clone(), run_id(plan.seed)));
    let seed = plan.seed;
    let payer = plan
        .checkout
        .map(|c| Arc::new(checkout::Payer::start(target.clone(), c, seed)));
    let fire = {
        let (source, target, payer) = (source.clone(), target.clone(), payer.clone());
        move |i: u64| {
            let (source, target, live) = (source.clone(), target.clone(), live.clone());
            let payer = payer.clone();
            async move {
                let mut rng = SmallRng::seed_from_u64(seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                let request = source.request(i, &mut rng);
                let answer = target.buy(i, &request).await;
                if let Answer::Status(status) = answer.outcome {
                    source.answered(&request, status, &mut rng);
                    if let (202, Some(payer), Some(key)) = (status, &payer, &answer.order_id) {
                        payer.accepted(key, &request.buyer);
                    }
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
    let pays = match payer.and_then(Arc::into_inner) {
        Some(payer) => payer.finish().await,
        None => (0, 0),
    };
    let mut report = StormReport::from_shots(
        source.run_id(),
        &shots,
        plan.load.open.then_some(plan.load.start_level),
        stop.is_cancelled(),
    );
    report.shots = shots;
    report.pays = pays;
    report.started_at = started_at;
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

/// The APIs reload their catalog every 250 ms: products created just now
/// are buyable after at most that (a buy before it is a `404`).
const CATALOG_RELOAD: Duration = Duration::from_millis(600);

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
            if !created.is_empty() {
                tokio::time::sleep(CATALOG_RELOAD).await;
            }
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
                    let have = existing.iter().find(|p| p.id.get() == want.id)?;
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
    let target = BuyTarget::new(api_urls, connections, plan.timeout, plan.tokens.clone())?;
    preflight(target.client(), api_urls).await?;
    if let Some(scenario) = &plan.scenario {
        seed_scenario(b, scenario, args.json).await;
    }
    let stop = stop_on_ctrl_c();
    let report = storm_and_drain(b, api_urls, &plan, &target, &stop, show).await?;
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
pub async fn storm_and_drain(
    b: &BackendUrls,
    api_urls: &[String],
    plan: &StormPlan,
    target: &BuyTarget,
    stop: &CancellationToken,
    show: bool,
) -> Result<StormReport, Failure> {
    let mut report = execute_with_progress(plan, target, stop, show).await;
    if plan.verify {
        let settled = drain::drain_and_verify(
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
        if let Some(checkout) = plan.checkout {
            let ledger = backends::ledger(b).await?;
            report.checkout = Some(
                checkout::summarize(
                    &ledger,
                    checkout,
                    report.started_at,
                    report.pays,
                    &report.accepted,
                    &plan.mix.products,
                    plan.drain_timeout,
                )
                .await?,
            );
        }
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
