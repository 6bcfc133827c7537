//! The storm's report: a pure function of the shots (statistics only; the
//! tables are `printer`'s, the JSON is serde's).

use super::load::Shot;
use super::mix::Kind;
use super::target::{BuyAnswer, Outcome};
use super::threshold::ThresholdResult;
use flashsale_engine::audit::{AuditReport, Violation};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// One request as the storm saw it.
#[derive(Debug, Clone)]
pub struct BuyResult {
    pub kind: Kind,
    pub key: String,
    pub answer: BuyAnswer,
}

/// Latency percentiles, in seconds.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Latency {
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let s = |micros: u64| micros as f64 / 1e6;
        Self {
            min: s(h.min()),
            p50: s(h.value_at_quantile(0.5)),
            p90: s(h.value_at_quantile(0.9)),
            p99: s(h.value_at_quantile(0.99)),
            p999: s(h.value_at_quantile(0.999)),
            max: s(h.max()),
            mean: h.mean() / 1e6,
        }
    }
}

/// What the mix sent, and the answers that broke the contract.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MixCounts {
    pub fresh: u64,
    pub duplicates: u64,
    /// Repeats of a key answered 202 that got the 200 the contract promises.
    pub duplicates_replayed: u64,
    pub invalid: u64,
    /// Bad inputs that got the 4xx the contract gives them.
    pub invalid_rejected: u64,
    /// Answers other than the contract's for that request.
    pub unexpected: u64,
    /// A few of them, `key: expected X, got Y`.
    pub unexpected_examples: Vec<String>,
}

/// One second of the storm, by the time answers came back.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Second {
    pub second: u64,
    pub requests: u64,
    pub status_counts: BTreeMap<String, u64>,
    pub errors: u64,
    pub p99: f64,
}

/// The drain after the storm.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Drain {
    pub seconds: f64,
    pub resolved: usize,
    pub pending: usize,
    pub lost: usize,
    /// Of the resolved: confirmed and rejected orders.
    pub confirmed: usize,
    pub rejected: usize,
    /// Where the outcomes were read: `postgresql`, or `http` when no
    /// database was reachable.
    pub source: &'static str,
}

/// The ledger check after the drain.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifySummary {
    pub ok: bool,
    pub violations: Vec<Violation>,
    /// `false` when PostgreSQL was unreachable: only the orders were checked.
    pub invariants_checked: bool,
}

/// Everything `fsctl storm` (and `fsctl demo`) reports.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StormReport {
    pub run: String,
    pub requests: u64,
    pub duration_seconds: f64,
    /// Answers (any status) per second.
    pub answer_rate: f64,
    /// 202s per second.
    pub accept_rate: f64,
    /// Requests sent per second.
    pub send_rate: f64,
    /// Open model: the rate asked for.
    pub target_rate: Option<f64>,
    pub status_counts: BTreeMap<String, u64>,
    pub errors: BTreeMap<String, u64>,
    /// In flight when the storm was stopped.
    pub interrupted: u64,
    /// From the intended send time (open model) or the send (closed).
    pub latency_seconds: Latency,
    /// Open model: from the actual send, ignoring waits to be sent.
    pub uncorrected_latency_seconds: Option<Latency>,
    pub mix: MixCounts,
    pub series: Vec<Second>,
    pub stopped_early: bool,
    pub drain: Option<Drain>,
    pub verify: Option<VerifySummary>,
    /// How the holds ended (`--pay-ratio`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkout: Option<super::checkout::CheckoutSummary>,
    /// Pays answered (200, 409), until the summary is made.
    #[serde(skip)]
    pub pays: (u64, u64),
    /// When the storm began.
    #[serde(skip)]
    pub started_at: chrono::DateTime<chrono::Utc>,
    /// The books of the products (`fsctl demo`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub books: Option<Vec<flashsale_engine::audit::ProductBooks>>,
    /// What `fsctl demo --chaos` did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chaos: Option<serde_json::Value>,
    pub thresholds: Vec<ThresholdResult>,
    /// Order ids answered 202, for the drain.
    #[serde(skip)]
    pub accepted: Vec<String>,
    /// The latencies behind `latency_seconds`, in µs.
    #[serde(skip)]
    histogram: Histogram<u64>,
    /// Every request, for `--output`.
    #[serde(skip)]
    pub shots: Vec<Shot<BuyResult>>,
    /// The full ledger check, when PostgreSQL was reachable.
    #[serde(skip)]
    pub audit: Option<AuditReport>,
}

const UNEXPECTED_EXAMPLES: usize = 5;

fn histogram() -> Histogram<u64> {
    // 1 µs .. 1 h at 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant, valid bounds")
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).max(1)
}

fn status_key(outcome: Outcome) -> Option<String> {
    match outcome {
        Outcome::Status(s) => Some(s.to_string()),
        Outcome::Error(_) => None,
    }
}

impl StormReport {
    /// Builds the report from the shots. `target_rate` marks an open-model
    /// storm, whose uncorrected latencies are reported beside the others.
    pub fn from_shots(
        run: &str,
        shots: &[Shot<BuyResult>],
        target_rate: Option<f64>,
        stopped_early: bool,
    ) -> Self {
        let (mut corrected, mut uncorrected) = (histogram(), histogram());
        let mut status_counts = BTreeMap::new();
        let mut errors = BTreeMap::new();
        let mut mix = MixCounts::default();
        let mut per_second: BTreeMap<u64, (Second, Histogram<u64>)> = BTreeMap::new();
        let (mut interrupted, mut accepted_count) = (0, 0);
        let mut accepted = Vec::new();
        let mut end = Duration::ZERO;
        for shot in shots {
            end = end.max(shot.done);
            let Some(result) = &shot.value else {
                interrupted += 1;
                continue;
            };
            let second = shot.done.as_secs();
            let (bucket, bucket_h) = per_second.entry(second).or_insert_with(|| {
                (
                    Second {
                        second,
                        requests: 0,
                        status_counts: BTreeMap::new(),
                        errors: 0,
                        p99: 0.0,
                    },
                    histogram(),
                )
            });
            bucket.requests += 1;
            match result.answer.outcome {
                Outcome::Status(status) => {
                    let _ = corrected.record(micros(shot.latency()));
                    let _ = uncorrected.record(micros(shot.service_time()));
                    let _ = bucket_h.record(micros(shot.latency()));
                    *bucket.status_counts.entry(status.to_string()).or_insert(0) += 1;
                    if status == 202 {
                        accepted_count += 1;
                        accepted.push(
                            result
                                .answer
                                .order_id
                                .clone()
                                .unwrap_or_else(|| result.key.clone()),
                        );
                    }
                }
                Outcome::Error(kind) => {
                    bucket.errors += 1;
                    *errors.entry(kind.name().to_owned()).or_insert(0) += 1;
                }
            }
            if let Some(key) = status_key(result.answer.outcome) {
                *status_counts.entry(key).or_insert(0) += 1;
            }
            mix.count(result);
        }
        accepted.sort_unstable();
        accepted.dedup();
        let requests = shots.len() as u64 - interrupted;
        let answered: u64 = status_counts.values().sum();
        let seconds = end.as_secs_f64();
        let per = |n: u64| {
            if seconds > 0.0 {
                n as f64 / seconds
            } else {
                0.0
            }
        };
        let sent_by = shots.iter().map(|s| s.sent).max().unwrap_or_default();
        Self {
            run: run.to_owned(),
            requests,
            duration_seconds: seconds,
            answer_rate: per(answered),
            accept_rate: per(accepted_count),
            send_rate: if sent_by.is_zero() {
                per(shots.len() as u64)
            } else {
                shots.len() as f64 / sent_by.as_secs_f64()
            },
            target_rate,
            status_counts,
            errors,
            interrupted,
            latency_seconds: Latency::of(&corrected),
            uncorrected_latency_seconds: target_rate.map(|_| Latency::of(&uncorrected)),
            mix,
            series: per_second
                .into_values()
                .map(|(mut s, h)| {
                    s.p99 = Latency::of(&h).p99;
                    s
                })
                .collect(),
            stopped_early,
            drain: None,
            verify: None,
            checkout: None,
            pays: (0, 0),
            started_at: chrono::Utc::now(),
            books: None,
            chaos: None,
            thresholds: Vec::new(),
            accepted,
            histogram: corrected,
            shots: Vec::new(),
            audit: None,
        }
    }

    /// Any latency quantile, in seconds.
    pub fn latency_quantile(&self, q: f64) -> f64 {
        if self.histogram.is_empty() {
            return 0.0;
        }
        self.histogram.value_at_quantile(q) as f64 / 1e6
    }

    /// Answers with this status, or with any of a class like `4xx`.
    pub fn status_count(&self, status: &str) -> u64 {
        match status.strip_suffix("xx") {
            Some(class) => self
                .status_counts
                .iter()
                .filter(|(s, _)| s.starts_with(class))
                .map(|(_, n)| n)
                .sum(),
            None => self.status_counts.get(status).copied().unwrap_or(0),
        }
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Open model: the rate was not reached (below 95 % of the target).
    pub fn rate_missed(&self) -> Option<String> {
        let target = self.target_rate?;
        (self.send_rate < target * 0.95).then(|| {
            format!(
                "WARNING: target rate {target:.0}/s NOT reached: sent {:.0}/s. The API or this machine could not keep up: raise -c (most requests in flight) or lower -q.",
                self.send_rate,
            )
        })
    }
}

impl MixCounts {
    fn count(&mut self, result: &BuyResult) {
        match result.kind {
            Kind::Fresh => self.fresh += 1,
            Kind::Duplicate { .. } => self.duplicates += 1,
            Kind::Invalid { .. } => self.invalid += 1,
        }
        let Outcome::Status(got) = result.answer.outcome else {
            return;
        };
        match result.kind.expected_status() {
            Some(want) if want == got => match result.kind {
                Kind::Duplicate { .. } => self.duplicates_replayed += 1,
                _ => self.invalid_rejected += 1,
            },
            // A 503 is never wrong: "not known to be accepted, retry".
            Some(want) if got != 503 => {
                self.unexpected += 1;
                if self.unexpected_examples.len() < UNEXPECTED_EXAMPLES {
                    self.unexpected_examples
                        .push(format!("{}: expected {want}, got {got}", result.key));
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storm::target::ErrorKind;

    fn shot(index: u64, latency_ms: u64, outcome: Outcome, kind: Kind) -> Shot<BuyResult> {
        let sent = Duration::from_millis(index);
        Shot {
            index,
            intended: sent,
            sent,
            done: sent + Duration::from_millis(latency_ms),
            value: Some(BuyResult {
                kind,
                key: format!("k{index}"),
                answer: BuyAnswer {
                    outcome,
                    order_id: None,
                },
            }),
        }
    }

    #[test]
    fn percentiles_match_a_known_distribution() {
        // Latencies 1..=1000 ms, once each: pN is N/100 * 1000 ms.
        let shots: Vec<_> = (1..=1000)
            .map(|ms| shot(ms, ms, Outcome::Status(409), Kind::Fresh))
            .collect();
        let r = StormReport::from_shots("t", &shots, None, false);
        let l = &r.latency_seconds;
        let near = |got: f64, want: f64| (got - want).abs() <= want * 0.001 + 1e-6;
        assert!(near(l.min, 0.001), "{l:?}");
        assert!(near(l.p50, 0.5), "{l:?}");
        assert!(near(l.p90, 0.9), "{l:?}");
        assert!(near(l.p99, 0.99), "{l:?}");
        assert!(near(l.p999, 0.999), "{l:?}");
        assert!(near(l.max, 1.0), "{l:?}");
        assert!(near(r.latency_quantile(0.95), 0.95));
    }

    #[test]
    fn counts_add_up_and_contract_breaches_are_caught() {
        let mut shots = vec![
            shot(0, 5, Outcome::Status(202), Kind::Fresh),
            shot(1, 5, Outcome::Status(409), Kind::Fresh),
            shot(
                2,
                5,
                Outcome::Status(200),
                Kind::Duplicate { replays: true },
            ),
            shot(
                3,
                5,
                Outcome::Status(202),
                Kind::Duplicate { replays: true },
            ),
            shot(4, 5, Outcome::Status(400), Kind::Invalid { expect: 400 }),
            shot(5, 5, Outcome::Status(202), Kind::Invalid { expect: 413 }),
            shot(6, 5, Outcome::Status(503), Kind::Invalid { expect: 400 }),
            shot(7, 5, Outcome::Error(ErrorKind::Timeout), Kind::Fresh),
        ];
        shots.push(Shot {
            value: None,
            ..shot(8, 5, Outcome::Status(202), Kind::Fresh)
        });
        let r = StormReport::from_shots("t", &shots, None, true);
        assert_eq!(r.requests, 8);
        assert_eq!(r.interrupted, 1);
        assert_eq!(r.status_count("202"), 3);
        assert_eq!(r.status_count("2xx"), 4);
        assert_eq!(r.status_counts.values().sum::<u64>() + r.error_count(), 8);
        assert_eq!(r.errors.get("timeout"), Some(&1));
        assert_eq!(r.accepted, vec!["k0", "k3", "k5"]);
        let m = &r.mix;
        assert_eq!((m.fresh, m.duplicates, m.invalid), (3, 2, 3));
        assert_eq!((m.duplicates_replayed, m.invalid_rejected), (1, 1));
        assert_eq!(m.unexpected, 2, "{:?}", m.unexpected_examples);
        assert_eq!(r.series.iter().map(|s| s.requests).sum::<u64>(), 8);
    }
}
