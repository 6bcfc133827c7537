//! The per-product lock and its fencing tokens.
//!
//! `<ns>:lock:product:{<id>}` holds `<worker_id>:<token>` with a lease; the
//! token comes from `INCR <ns>:fence:product:{<id>}`, one per transaction, and
//! PostgreSQL refuses any token not above the last one that wrote the row
//! (see [`crate::ledger`]). The lock keeps workers from queueing on one hot
//! row; correctness rests on the fence, not on the lock. Two
//! implementations: Redis ([`ProductLock`]) and memory ([`MemoryLocks`]).

mod memory;
mod redis;

pub use memory::MemoryLocks;
pub use redis::{LockView, ProductLock, held};

use crate::domain::ProductId;
use crate::seams::BackendFailed;
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

/// The per-product lock and its fencing counter.
#[async_trait::async_trait]
pub trait ProductLocks: Send + Sync {
    /// Takes the lock if free, with the next fencing token.
    async fn try_acquire(&self, product: ProductId) -> Result<Option<HeldLock>, BackendFailed>;
    /// Releases it if this holder still owns it.
    async fn release(&self, lock: &HeldLock) -> Result<bool, BackendFailed>;
    /// Raises the fencing counter to at least `seen`; never lowers it.
    async fn raise_fence(&self, product: ProductId, seen: i64) -> Result<i64, BackendFailed>;
}
