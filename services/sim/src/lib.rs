//! `flashsale-sim`: the whole engine — the real API router, real worker
//! loops with their reconciliation and holds sweep — on the in-memory
//! backends, under one current-thread tokio runtime with a paused clock and
//! a seeded scheduler. A seed draws the deployment (APIs, workers,
//! products), the buyers (keys, repeats, retries, hang-ups) and the faults
//! (workers killed, Redis losing everything); the run goes through faults,
//! then heals and must converge; then the contract's invariants and the
//! truth of every answer are checked. The same seed on the same build
//! always takes the same schedule: its trace (a hash of every answer in
//! the order it came and of the final books) is the same.

mod broker;
mod check;
mod faults;
mod rng;
mod world;

pub use broker::BrokerOptions;
pub use check::Violation;
pub use rng::SimRng;
pub use world::Options;

use std::time::Duration;

/// What one seed came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub seed: u64,
    /// What the seed drew.
    pub options: Options,
    /// A hash of the schedule's observable events, in order.
    pub trace: u64,
    /// The first invariant broken, if any.
    pub violation: Option<Violation>,
    /// Every observable event, in order (what the trace hashes).
    pub events: Vec<String>,
}

impl Outcome {
    /// The last events, for a failure's report.
    pub fn tail(&self) -> &[String] {
        &self.events[self.events.len().saturating_sub(20)..]
    }

    /// The line `flashsale-sim --seed S` ends with (contract v4).
    pub fn line(&self) -> String {
        match &self.violation {
            None => format!("seed {}: ok, trace {:016x}", self.seed, self.trace),
            Some(v) => format!(
                "seed {}: violation: {}, trace {:016x}",
                self.seed, v.invariant, self.trace
            ),
        }
    }

    /// The one command that replays this seed.
    pub fn replay_command(&self) -> String {
        format!(
            "cargo run -p flashsale-sim -- --seed {}   (or: SIM_SEED={} cargo test -p flashsale-sim -- replay --nocapture)",
            self.seed, self.seed
        )
    }
}

/// How long a seed's world may take in simulated time to converge after
/// the faults are healed before it counts as a liveness violation.
pub const CONVERGE_WITHIN: Duration = Duration::from_secs(120);

/// Runs one seed on a runtime of its own: current-thread, clock paused,
/// scheduler seeded by the seed.
pub fn run_seed(seed: u64) -> Outcome {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .rng_seed(tokio::runtime::RngSeed::from_bytes(&seed.to_le_bytes()))
        .build();
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            return Outcome {
                seed,
                options: Options::draw(seed),
                trace: 0,
                violation: Some(Violation::new("runtime", format!("no runtime: {e}"))),
                events: Vec::new(),
            };
        }
    };
    let outcome = runtime.block_on(world::run(seed));
    // Tasks still parked (a poller, a killed worker's remains) go with it.
    runtime.shutdown_background();
    outcome
}

/// What a campaign of seeds came to.
#[derive(Debug, Clone)]
pub struct Summary {
    pub seeds: u64,
    pub failures: Vec<Outcome>,
    pub seconds: f64,
}

impl Summary {
    /// The line `flashsale-sim --seeds N` ends with (contract v4).
    pub fn line(&self) -> String {
        format!(
            "seeds {}, violations {}, {:.1} s",
            self.seeds,
            self.failures.len(),
            self.seconds
        )
    }
}

/// Runs seeds `first .. first + n`, with a progress bar when `progress`.
pub fn campaign(first: u64, n: u64, progress: bool) -> Summary {
    let started = std::time::Instant::now();
    let bar = if progress {
        indicatif::ProgressBar::new(n)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} seeds, {per_sec}, {msg} (eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut failures = Vec::new();
    for seed in first..first + n {
        let outcome = run_seed(seed);
        if outcome.violation.is_some() {
            failures.push(outcome);
            bar.set_message(format!("{} violations", failures.len()));
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Summary {
        seeds: n,
        failures,
        seconds: started.elapsed().as_secs_f64(),
    }
}
