//! The storm to run: flags over the scenario over the defaults, every value
//! checked before anything is sent.

use super::args::StormArgs;
use super::checkout::Checkout;
use super::load::{LoadPlan, Stage};
use super::mix::{BuyMix, KeyStyle, QuantityRange, Skew};
use super::threshold::Threshold;
use crate::exit::Failure;
use crate::scenario::Scenario;
use crate::token::Tokens;
use crate::verify::parse_duration;
use clap::ValueEnum;
use flashsale_engine::identity::{Secret, Signer};
use std::sync::Arc;
use std::time::Duration;

const DEFAULT_REQUESTS: u64 = 1000;
const DEFAULT_CONCURRENCY: u64 = 50;
const DEFAULT_IN_FLIGHT: u64 = 1000;
const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

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
    /// Each buyer's token, when the API wants them.
    pub tokens: Option<Arc<Tokens>>,
    /// The buyers who pay for their holds (`--pay-ratio`).
    pub checkout: Option<Checkout>,
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
            keys: match args.keys {
                Some(k) => k,
                None => match spec.keys.as_deref() {
                    None => KeyStyle::default(),
                    Some(raw) => KeyStyle::from_str(raw, true)
                        .map_err(|_| usage(format!("keys {raw:?}: must be uuid or sequential")))?,
                },
            },
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
        let pay_delay = match args.pay_delay {
            Some(d) => Some(d),
            None => spec
                .pay_delay
                .as_deref()
                .map(parse_duration)
                .transpose()
                .map_err(usage)?,
        };
        let checkout = match args.pay_ratio.or(spec.pay_ratio) {
            Some(r) if !(0.0..=1.0).contains(&r) => {
                return Err(usage(format!("--pay-ratio {r}: must be from 0 to 1")));
            }
            Some(_) if args.no_verify => {
                return Err(usage("--pay-ratio needs the drain: drop --no-verify"));
            }
            Some(pay_ratio) => Some(Checkout {
                pay_ratio,
                pay_delay: pay_delay.unwrap_or(Duration::from_secs(1)),
            }),
            None if pay_delay.is_some() => {
                return Err(usage("--pay-delay needs --pay-ratio"));
            }
            None => None,
        };
        let mut signing = args.signing.clone();
        if signing.jwt_secret.is_none() && signing.jwt_key.is_none() {
            signing.jwt_secret = spec.jwt_secret.as_deref().map(Secret::new);
        }
        let tokens = signing
            .signer(Signer::DEFAULT_TTL)?
            .map(Tokens::new)
            .map(Arc::new);
        Ok(Self {
            load,
            mix,
            thresholds,
            verify: !args.no_verify,
            drain_timeout,
            timeout: args.timeout,
            seed: args.seed.unwrap_or_else(rand::random),
            scenario,
            tokens,
            checkout,
        })
    }
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
    fn checkout_needs_a_ratio_from_0_to_1_and_the_drain() {
        let c = plan(&["--pay-ratio", "0.6", "--pay-delay", "2s"])
            .expect("valid")
            .checkout
            .expect("a checkout");
        assert_eq!((c.pay_ratio, c.pay_delay), (0.6, Duration::from_secs(2)));
        let default = plan(&["--pay-ratio", "1"]).expect("valid").checkout;
        assert_eq!(default.map(|c| c.pay_delay), Some(Duration::from_secs(1)));
        for bad in [
            &["--pay-ratio", "1.5"][..],
            &["--pay-ratio", "-0.1"],
            &["--pay-delay", "1s"],
            &["--pay-ratio", "0.5", "--no-verify"],
        ] {
            assert!(plan(bad).is_err(), "{bad:?} accepted");
        }
        assert!(plan(&[]).expect("valid").checkout.is_none());
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

    #[test]
    fn keys_come_from_the_flag_then_the_scenario_then_uuid() {
        let dir = std::env::temp_dir().join(format!("fsctl-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("seq.toml");
        std::fs::write(
            &file,
            "name = \"seq\"\n[[products]]\nid = 1\nstock = 5\n[storm]\nkeys = \"sequential\"\n",
        )
        .expect("scenario written");
        let path = file.to_str().expect("utf-8 path");
        assert_eq!(plan(&[]).expect("valid").mix.keys, KeyStyle::Uuid);
        assert_eq!(
            plan(&["--scenario", path]).expect("valid").mix.keys,
            KeyStyle::Sequential
        );
        let flagged = plan(&["--scenario", path, "--keys", "uuid"]).expect("valid");
        assert_eq!(flagged.mix.keys, KeyStyle::Uuid);
        std::fs::write(
            &file,
            "name = \"bad\"\n[[products]]\nid = 1\nstock = 5\n[storm]\nkeys = \"short\"\n",
        )
        .expect("scenario written");
        assert!(
            plan(&["--scenario", path]).is_err(),
            "an unknown key style is refused"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
