//! The rate limiter in memory, for `fsctl demo`: the same GCRA as Redis.

use super::{Bucket, RateLimiter, Verdict, gcra};
use crate::seams::BackendFailed;
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Buckets in a map; a bucket whose time has passed is as good as gone
/// and is dropped when the map grows.
pub struct MemoryRateLimiter {
    epoch: Instant,
    tats: Mutex<HashMap<String, u64>>,
}

impl Default for MemoryRateLimiter {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            tats: Mutex::default(),
        }
    }
}

/// Buckets kept before the stale ones are swept.
const SWEEP_ABOVE: usize = 100_000;

#[async_trait]
impl RateLimiter for MemoryRateLimiter {
    async fn check(&self, buckets: &[Bucket]) -> Result<Verdict, BackendFailed> {
        let now = self.epoch.elapsed().as_micros() as u64;
        let mut tats = self
            .tats
            .lock()
            .map_err(|_| BackendFailed::Misuse("rate limiter lock poisoned".into()))?;
        let mut next = Vec::with_capacity(buckets.len());
        let mut wait = 0;
        for b in buckets {
            match gcra(tats.get(&b.key).copied(), now, &b.rate) {
                Ok(tat) => next.push(tat),
                Err(w) => wait = wait.max(w),
            }
        }
        if wait > 0 {
            return Ok(Verdict::Limited {
                retry_after: Duration::from_micros(wait),
            });
        }
        if tats.len() > SWEEP_ABOVE {
            tats.retain(|_, tat| *tat > now);
        }
        for (b, tat) in buckets.iter().zip(next) {
            tats.insert(b.key.clone(), tat);
        }
        Ok(Verdict::Allowed)
    }
}
