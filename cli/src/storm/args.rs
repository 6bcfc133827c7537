//! `fsctl storm`'s command line.

use super::load::Stage;
use super::mix::{KeyStyle, QuantityRange, Skew};
use super::threshold::Threshold;
use crate::verify::parse_duration;
use clap::Args;
use std::path::PathBuf;
use std::time::Duration;

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
  fsctl storm --jwt-secret \"$FLASHSALE_JWT_SECRET\" --users 1000   # an API with FLASHSALE_AUTH=jwt
  fsctl storm --scenario scenarios/checkout.toml --pay-ratio 0.6 --pay-delay 2s

With --jwt-secret or --jwt-key each simulated buyer sends a token naming it
(signed once per buyer and reused).

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
    /// Idempotency-Keys: `uuid` (a random UUIDv4 a buy, what real clients
    /// send; the default) or `sequential` (`storm-<run>-<n>`, as older figures used).
    #[arg(long, value_enum)]
    pub keys: Option<KeyStyle>,
    /// Checkout: this share (0 to 1) of the buyers answered 202 pay for their
    /// order once it is held (products seeded with --hold-seconds); the rest
    /// let it expire, and its units sell again. Needs the drain.
    #[arg(long, value_name = "F")]
    pub pay_ratio: Option<f64>,
    /// With --pay-ratio: how long a paying buyer takes, from the hold (default 1s).
    #[arg(long, value_parser = parse_duration, value_name = "D")]
    pub pay_delay: Option<Duration>,
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
    #[command(flatten)]
    pub signing: crate::token::SigningArgs,
}

impl StormArgs {
    /// A storm as a scenario file describes it, no flags over it: the
    /// command line's own defaults, exactly as `fsctl storm --scenario FILE`.
    pub fn for_scenario(path: PathBuf) -> Self {
        Self::parse_flags(["--scenario".into(), path.into_os_string()])
            .expect("--scenario FILE alone always parses")
    }

    /// The storm `fsctl storm FLAGS…` would run (without the `storm`
    /// itself): for commands that run a storm of their own, such as the
    /// demo, so that one set of rules and defaults makes every plan.
    pub fn parse_flags(
        flags: impl IntoIterator<Item = std::ffi::OsString>,
    ) -> Result<Self, clap::Error> {
        use clap::FromArgMatches;
        let command = Self::augment_args(clap::Command::new("storm"));
        let argv = std::iter::once(std::ffi::OsString::from("storm")).chain(flags);
        Self::from_arg_matches(&command.try_get_matches_from(argv)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scenario_storm_takes_the_command_lines_defaults() {
        let args = StormArgs::for_scenario(PathBuf::from("scenarios/hot-item.toml"));
        assert_eq!(
            args.scenario.as_deref(),
            Some(std::path::Path::new("scenarios/hot-item.toml"))
        );
        assert_eq!(args.timeout, Duration::from_secs(30));
        assert!(args.concurrency.is_none() && args.thresholds.is_empty());
        assert!(!args.no_verify && !args.json);
    }
}
