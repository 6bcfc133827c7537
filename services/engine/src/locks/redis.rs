//! The product lock in Redis: Lua scripts take it (`INCR` the fence
//! counter, `SET NX PX` the lease), release it (compare-and-delete) and
//! raise the fence counter after PostgreSQL fenced a holder out.

use super::{FencingToken, HeldLock, LOCK_LEASE, ProductLocks};
use crate::config::Namespace;
use crate::domain::ProductId;
use crate::redis_conn::Redis;
use crate::redis_conn::timed;
use crate::seams::BackendFailed;
use serde::Serialize;
use std::time::Duration;

/// Takes, releases and re-fences product locks for one worker.
#[derive(Clone)]
pub struct ProductLock {
    redis: Redis,
    ns: Namespace,
    holder: String,
    lease: Duration,
}

// Takes the lock when free, or when this holder has it already (an earlier
// acquire whose reply was lost: a worker applies one batch at a time, so it
// never holds a product's lock twice): one INCR gives a fresh token, and SET
// PX stores `<holder>:<token>` with the lease. Nil when another holder has it.
const ACQUIRE: &str = r"
local held = redis.call('GET', KEYS[1])
if held and string.match(held, '^(.*):%d+$') ~= ARGV[1] then return false end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. token, 'PX', ARGV[2])
return token";

// Compare-and-delete: only the owner releases.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0";

// Raises the counter to at least ARGV[1]; never lowers it.
const RAISE_FENCE: &str = r"
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local floor = tonumber(ARGV[1])
if current < floor then redis.call('SET', KEYS[1], floor) return floor end
return current";

impl ProductLock {
    pub fn new(redis: Redis, ns: Namespace, holder: impl Into<String>) -> Self {
        Self {
            redis,
            ns,
            holder: holder.into(),
            lease: LOCK_LEASE,
        }
    }

    /// A shorter lease, for tests of lease expiry.
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }
}

#[async_trait::async_trait]
impl ProductLocks for ProductLock {
    /// Takes the lock if it is free (or already this holder's, see
    /// [`ACQUIRE`]); `None` when another holder has it.
    async fn try_acquire(&self, product: ProductId) -> Result<Option<HeldLock>, BackendFailed> {
        let mut conn = self.redis.clone();
        let token: Option<i64> = timed(
            redis::Script::new(ACQUIRE)
                .key(self.ns.lock_key(product.get()))
                .key(self.ns.fence_key(product.get()))
                .arg(&self.holder)
                .arg(self.lease.as_millis() as u64)
                .invoke_async(&mut conn),
        )
        .await
        .map_err(BackendFailed::redis)?;
        Ok(token.map(|t| HeldLock::new(product, FencingToken(t), &self.holder)))
    }

    /// Releases the lock if this holder still owns it.
    async fn release(&self, lock: &HeldLock) -> Result<bool, BackendFailed> {
        let mut conn = self.redis.clone();
        let deleted: i64 = timed(
            redis::Script::new(RELEASE)
                .key(self.ns.lock_key(lock.product.get()))
                .arg(&lock.value)
                .invoke_async(&mut conn),
        )
        .await
        .map_err(BackendFailed::redis)?;
        Ok(deleted == 1)
    }

    /// After PostgreSQL fenced us out: raise the counter to at least what the
    /// row has seen, so the next token wins (also after Redis lost its data).
    async fn raise_fence(&self, product: ProductId, seen: i64) -> Result<i64, BackendFailed> {
        let mut conn = self.redis.clone();
        timed(
            redis::Script::new(RAISE_FENCE)
                .key(self.ns.fence_key(product.get()))
                .arg(seen)
                .invoke_async(&mut conn),
        )
        .await
        .map_err(BackendFailed::redis)
    }
}

/// A product lock held now.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LockView {
    pub product_id: i64,
    pub holder: String,
    pub token: i64,
    pub ttl_ms: i64,
}

/// Every product lock held now, by product.
pub async fn held(redis: &Redis, ns: &Namespace) -> redis::RedisResult<Vec<LockView>> {
    let mut conn = redis.clone();
    let prefix = ns.lock_prefix();
    let mut out = Vec::new();
    for key in crate::redis_conn::scan(redis, &format!("{prefix}*")).await? {
        let (value, ttl): (Option<String>, i64) = timed(
            redis::pipe()
                .cmd("GET")
                .arg(&key)
                .cmd("PTTL")
                .arg(&key)
                .query_async(&mut conn),
        )
        .await?;
        let Some(value) = value else { continue };
        let (holder, token) = value.rsplit_once(':').unwrap_or((&value, "0"));
        out.push(LockView {
            product_id: key[prefix.len()..]
                .trim_matches(['{', '}'])
                .parse()
                .unwrap_or(0),
            holder: holder.to_owned(),
            token: token.parse().unwrap_or(0),
            ttl_ms: ttl,
        });
    }
    out.sort_by_key(|l| l.product_id);
    Ok(out)
}
