//! The rate limiter in Redis: every bucket of a request in one script, on
//! Redis's clock, so every API process shares the buckets and the time.

use super::{Bucket, RateLimiter, Verdict};
use crate::redis_conn::Redis;
use crate::redis_conn::timed;
use crate::seams::BackendFailed;
use async_trait::async_trait;
use std::sync::LazyLock;
use std::time::Duration;

/// KEYS: buckets. ARGV: per bucket, its interval and burst (µs, count).
/// 0 when allowed (every bucket charged), else µs until allowed (none
/// charged). The same GCRA as `super::gcra`; numbers are written with
/// `%.0f`, as Lua would print a large one in exponent form.
static CHECK: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local wait, next = 0, {}
for i = 1, #KEYS do
  local interval, burst = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  local tat = math.max(tonumber(redis.call('GET', KEYS[i]) or now), now)
  next[i] = tat + interval
  local at = next[i] - burst * interval
  if at > now then wait = math.max(wait, at - now) end
end
if wait > 0 then return string.format('%.0f', wait) end
for i = 1, #KEYS do
  local ms = math.ceil((next[i] - now) / 1000) + 1
  redis.call('SET', KEYS[i], string.format('%.0f', next[i]), 'PX', string.format('%.0f', ms))
end
return '0'",
    )
});

pub struct RedisRateLimiter {
    redis: Redis,
}

impl RedisRateLimiter {
    pub fn new(redis: Redis) -> Self {
        Self { redis }
    }
}

#[async_trait]
impl RateLimiter for RedisRateLimiter {
    async fn check(&self, buckets: &[Bucket]) -> Result<Verdict, BackendFailed> {
        if self.redis.is_cluster() && buckets.len() > 1 {
            // On a cluster the buckets live on different masters, which no
            // script spans: they are charged one by one, in order, so a
            // request refused by a later bucket stays charged to the
            // earlier ones (stricter, never looser).
            for bucket in buckets {
                let verdict = self.check_together(std::slice::from_ref(bucket)).await?;
                if verdict != Verdict::Allowed {
                    return Ok(verdict);
                }
            }
            return Ok(Verdict::Allowed);
        }
        self.check_together(buckets).await
    }
}

impl RedisRateLimiter {
    /// Charges every bucket or none, in one script.
    async fn check_together(&self, buckets: &[Bucket]) -> Result<Verdict, BackendFailed> {
        if buckets.is_empty() {
            return Ok(Verdict::Allowed);
        }
        let mut call = CHECK.prepare_invoke();
        for b in buckets {
            call.key(&b.key)
                .arg(b.rate.interval().as_micros() as u64)
                .arg(b.rate.burst());
        }
        let mut conn = self.redis.clone();
        let wait: String = timed(call.invoke_async(&mut conn))
            .await
            .map_err(BackendFailed::redis)?;
        match wait.parse::<u64>() {
            Ok(0) => Ok(Verdict::Allowed),
            Ok(us) => Ok(Verdict::Limited {
                retry_after: Duration::from_micros(us),
            }),
            Err(_) => Err(BackendFailed::Misuse(format!(
                "the rate limit script answered {wait:?}"
            ))),
        }
    }
}
