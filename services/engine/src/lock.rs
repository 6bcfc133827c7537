//! The per-product lock in Redis and its fencing tokens.
//!
//! `<ns>:lock:product:<id>` holds `<worker_id>:<token>` with a lease; the
//! token comes from `INCR <ns>:fence:product:<id>`, one per transaction, and
//! PostgreSQL refuses any token not above the last one that wrote the row
//! (see [`crate::ledger`]). The lock keeps workers from queueing on one hot
//! row; correctness rests on the fence, not on the lock.

use crate::config::Namespace;
use crate::domain::ProductId;
use crate::redis_conn::timed;
use redis::aio::ConnectionManager;
use std::time::Duration;

/// How long a lock holder may keep the lock without renewing it.
pub const LOCK_LEASE: Duration = Duration::from_secs(10);

/// A fencing token: strictly increasing per product.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct FencingToken(pub i64);

/// A lock this worker holds on one product.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldLock {
    pub product: ProductId,
    pub token: FencingToken,
    value: String,
}

/// Takes, releases and re-fences product locks for one worker.
#[derive(Clone)]
pub struct ProductLock {
    redis: ConnectionManager,
    ns: Namespace,
    holder: String,
    lease: Duration,
}

// Takes the lock only when free: then one INCR gives the token, and SET NX PX
// stores `<holder>:<token>` with the lease. Nil when another holder has it.
const ACQUIRE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local token = redis.call('INCR', KEYS[2])
if redis.call('SET', KEYS[1], ARGV[1] .. ':' .. token, 'NX', 'PX', ARGV[2]) then
  return token
end
return false";

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

impl HeldLock {
    /// The lock `holder` holds on `product` with `token`.
    pub fn new(product: ProductId, token: FencingToken, holder: &str) -> Self {
        Self {
            product,
            token,
            value: format!("{holder}:{}", token.0),
        }
    }

    /// What the lock key holds: `<holder>:<token>`.
    pub fn value(&self) -> &str {
        &self.value
    }
}

impl ProductLock {
    pub fn new(redis: ConnectionManager, ns: Namespace, holder: impl Into<String>) -> Self {
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

    /// Takes the lock if it is free; `None` when another holder has it.
    pub async fn try_acquire(&self, product: ProductId) -> redis::RedisResult<Option<HeldLock>> {
        let mut conn = self.redis.clone();
        let token: Option<i64> = timed(
            redis::Script::new(ACQUIRE)
                .key(self.ns.lock_key(product.get()))
                .key(self.ns.fence_key(product.get()))
                .arg(&self.holder)
                .arg(self.lease.as_millis() as u64)
                .invoke_async(&mut conn),
        )
        .await?;
        Ok(token.map(|t| HeldLock::new(product, FencingToken(t), &self.holder)))
    }

    /// Releases the lock if this holder still owns it.
    pub async fn release(&self, lock: &HeldLock) -> redis::RedisResult<bool> {
        let mut conn = self.redis.clone();
        let deleted: i64 = timed(
            redis::Script::new(RELEASE)
                .key(self.ns.lock_key(lock.product.get()))
                .arg(&lock.value)
                .invoke_async(&mut conn),
        )
        .await?;
        Ok(deleted == 1)
    }

    /// After PostgreSQL fenced us out: raise the counter to at least what the
    /// row has seen, so the next token wins (also after Redis lost its data).
    pub async fn raise_fence(&self, product: ProductId, seen: i64) -> redis::RedisResult<i64> {
        let mut conn = self.redis.clone();
        timed(
            redis::Script::new(RAISE_FENCE)
                .key(self.ns.fence_key(product.get()))
                .arg(seen)
                .invoke_async(&mut conn),
        )
        .await
    }
}
