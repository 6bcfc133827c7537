//! Rate limits (`FLASHSALE_USER_RATE`, `FLASHSALE_IP_RATE`): one GCRA
//! bucket per buyer and per client address, `N/s` with a burst of `2N`,
//! shared by every API process of a deployment (in Redis), or kept in
//! memory for `fsctl demo`. Every bucket of a request is checked and
//! charged in one call: all allow, or none is charged.

mod memory;
mod redis;

pub use memory::MemoryRateLimiter;
pub use redis::RedisRateLimiter;

use crate::seams::BackendFailed;
use async_trait::async_trait;
use std::time::Duration;

/// A sustained rate, `N/s`; the burst is twice it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    per_second: f64,
}

impl Rate {
    pub fn per_second(n: f64) -> Result<Self, String> {
        if n.is_finite() && n > 0.0 && n <= 1_000_000.0 {
            Ok(Self { per_second: n })
        } else {
            Err(format!(
                "a rate must be above 0 and at most 1000000/s, not {n}"
            ))
        }
    }

    /// Time between two requests at the sustained rate.
    pub fn interval(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.per_second)
    }

    /// Requests a quiet client may send at once: `2N`, at least one.
    pub fn burst(&self) -> u32 {
        ((2.0 * self.per_second).floor() as u32).max(1)
    }
}

impl std::str::FromStr for Rate {
    type Err = String;
    /// `N/s` (`N` may have a fraction: `0.5/s`).
    fn from_str(raw: &str) -> Result<Self, String> {
        let n = raw
            .trim()
            .strip_suffix("/s")
            .and_then(|n| n.trim().parse::<f64>().ok())
            .ok_or_else(|| format!("a rate is N/s, e.g. 5/s, not {raw:?}"))?;
        Self::per_second(n)
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/s", self.per_second)
    }
}

/// One bucket a request is charged to: its key and its rate.
#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    pub key: String,
    pub rate: Rate,
}

/// What the limiter decided for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// Over a limit: nothing was charged; retry after this long.
    Limited {
        retry_after: Duration,
    },
}

/// The rate limiter seam: Redis for deployments, memory for the demo.
#[async_trait]
pub trait RateLimiter: Send + Sync {
    /// Charges one request to every bucket if each has room; else charges
    /// none and says when the fullest one will.
    async fn check(&self, buckets: &[Bucket]) -> Result<Verdict, BackendFailed>;
}

/// The API's limits (contract v3, "Identity and abuse").
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "Rate limits")]
pub struct RateConfig {
    /// Per-buyer limit, `N/s` with a burst of `2N` (off when not set).
    #[arg(long, env = "FLASHSALE_USER_RATE")]
    pub user_rate: Option<Rate>,
    /// Per client address limit, `N/s` with a burst of `2N` (off when not set).
    #[arg(long, env = "FLASHSALE_IP_RATE")]
    pub ip_rate: Option<Rate>,
    /// Take the client address from `X-Forwarded-For` (its last entry, the
    /// one the proxy in front of the API added). Only behind such a proxy:
    /// otherwise any client picks its own address.
    #[arg(long, env = "FLASHSALE_TRUST_PROXY", value_parser = clap::builder::BoolishValueParser::new(), default_value = "false")]
    pub trust_proxy: bool,
}

impl RateConfig {
    pub fn is_off(&self) -> bool {
        self.user_rate.is_none() && self.ip_rate.is_none()
    }
}

/// The bucket key of `kind` (`user`, `ip`) and `who`.
pub fn bucket_key(namespace: &crate::Namespace, kind: &str, who: &str) -> String {
    format!("{}:rate:{kind}:{who}", namespace.as_str())
}

/// GCRA on one bucket: its theoretical arrival time after a request at
/// `now`, or how long until it may come (all in microseconds).
fn gcra(tat: Option<u64>, now: u64, rate: &Rate) -> Result<u64, u64> {
    let interval = rate.interval().as_micros() as u64;
    let next = tat.unwrap_or(now).max(now) + interval;
    let allowed_at = next.saturating_sub(u64::from(rate.burst()) * interval);
    if allowed_at > now {
        Err(allowed_at - now)
    } else {
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_as_n_per_second() {
        let r: Rate = "5/s".parse().expect("5/s");
        assert_eq!(r.burst(), 10);
        assert_eq!(r.interval(), Duration::from_millis(200));
        assert_eq!("0.5/s".parse::<Rate>().expect("half").burst(), 1);
        for bad in ["5", "0/s", "-1/s", "x/s", "5/m", ""] {
            assert!(bad.parse::<Rate>().is_err(), "{bad}");
        }
    }

    #[test]
    fn gcra_allows_the_burst_then_the_rate() {
        let rate: Rate = "5/s".parse().expect("rate");
        let mut tat = None;
        for _ in 0..10 {
            tat = Some(gcra(tat, 0, &rate).expect("within the burst"));
        }
        let wait = gcra(tat, 0, &rate).expect_err("over the burst");
        assert_eq!(wait, 200_000);
        assert!(gcra(tat, 200_000, &rate).is_ok());
    }
}
