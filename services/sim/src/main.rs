//! `flashsale-sim --seeds N [--first S]` runs a campaign of seeds with a
//! progress bar; `flashsale-sim --seed S` runs one and prints its trace
//! (contract v4, "The simulator").

use clap::Parser;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "flashsale-sim",
    version,
    about = "Deterministic simulation of the Flash Sale Engine: seeded schedules with faults",
    after_help = "Examples:
  flashsale-sim --seeds 2000            # seeds 1..=2000, a summary line at the end
  flashsale-sim --seeds 500 --first 10000
  flashsale-sim --seed 42               # one seed: its options, events and trace

Exit codes: 0 no violation; 1 a seed broke an invariant (each printed with the
command that replays it); 2 bad usage."
)]
struct Args {
    /// Runs this many seeds.
    #[arg(long, conflicts_with = "seed")]
    seeds: Option<u64>,
    /// The first seed of `--seeds`.
    #[arg(long, default_value_t = 1, requires = "seeds")]
    first: u64,
    /// Runs this one seed and prints its trace.
    #[arg(long)]
    seed: Option<u64>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match (args.seed, args.seeds) {
        (Some(seed), _) => {
            let outcome = flashsale_sim::run_seed(seed);
            println!("options: {}", outcome.options);
            for event in &outcome.events {
                println!("  {event}");
            }
            if let Some(v) = &outcome.violation {
                println!("{v}");
                println!("replay: {}", outcome.replay_command());
            }
            println!("{}", outcome.line());
            ExitCode::from(u8::from(outcome.violation.is_some()))
        }
        (None, Some(n)) => {
            let summary = flashsale_sim::campaign(args.first, n, true);
            for failed in &summary.failures {
                println!("{}", failed.line());
                println!("  options: {}", failed.options);
                if let Some(v) = &failed.violation {
                    println!("  {v}");
                }
                println!("  replay: {}", failed.replay_command());
            }
            println!("{}", summary.line());
            ExitCode::from(u8::from(!summary.failures.is_empty()))
        }
        (None, None) => {
            eprintln!("give --seeds N or --seed S (see --help)");
            ExitCode::from(2)
        }
    }
}
