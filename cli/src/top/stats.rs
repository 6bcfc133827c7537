//! The arithmetic behind `fsctl top`'s figures: rates from growing
//! counters, and latency percentiles from Prometheus histograms over a
//! sliding window. Pure: no terminal, no network.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Latency percentiles are taken over this window.
pub const LATENCY_WINDOW: Duration = Duration::from_secs(10);

/// A Prometheus histogram: cumulative counts by upper bound (seconds).
pub type Buckets = Vec<(f64, f64)>;

/// Per-second rate from a growing total.
#[derive(Debug, Clone, Default)]
pub struct Counter {
    last: Option<(Instant, f64)>,
}

impl Counter {
    pub fn rate(&mut self, at: Instant, total: f64) -> Option<f64> {
        let previous = self.last.replace((at, total));
        let (then, before) = previous?;
        let dt = at.saturating_duration_since(then).as_secs_f64();
        // A restart resets a counter: skip that sample.
        (dt > 0.0 && total >= before).then(|| (total - before) / dt)
    }
}

/// Latency percentiles (seconds) over the recent window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub count: f64,
}

/// Histogram samples over the latency window.
#[derive(Debug, Clone, Default)]
pub struct Window {
    samples: VecDeque<(Instant, Buckets)>,
}

impl Window {
    pub fn push(&mut self, at: Instant, buckets: Buckets) -> Option<Percentiles> {
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| at.saturating_duration_since(*t) > LATENCY_WINDOW)
        {
            self.samples.pop_front();
        }
        self.samples.push_back((at, buckets));
        let (_, oldest) = self.samples.front()?;
        let (_, newest) = self.samples.back()?;
        let recent: Buckets = if self.samples.len() == 1 {
            newest.clone()
        } else {
            newest
                .iter()
                .map(|(le, n)| {
                    let before = oldest
                        .iter()
                        .find(|(l, _)| l == le)
                        .map_or(0.0, |(_, b)| *b);
                    (*le, (n - before).max(0.0))
                })
                .collect()
        };
        percentiles(&recent)
    }
}

/// Percentiles of a cumulative histogram, interpolated within buckets.
pub fn percentiles(buckets: &Buckets) -> Option<Percentiles> {
    let count = buckets.last().map(|(_, n)| *n)?;
    if count <= 0.0 {
        return None;
    }
    let at = |q: f64| {
        let rank = q * count;
        let mut lower = (0.0, 0.0);
        for &(le, n) in buckets {
            if n >= rank {
                if le.is_infinite() {
                    return lower.0;
                }
                let span = n - lower.1;
                let part = if span > 0.0 {
                    (rank - lower.1) / span
                } else {
                    1.0
                };
                return lower.0 + (le - lower.0) * part;
            }
            lower = (le, n);
        }
        lower.0
    };
    Some(Percentiles {
        p50: at(0.5),
        p90: at(0.9),
        p99: at(0.99),
        count,
    })
}
