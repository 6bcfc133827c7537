//! Product locks in memory, for `fsctl demo`: one table shared by every
//! worker of the process, leases on tokio's clock.

use super::{FencingToken, HeldLock, LOCK_LEASE, ProductLocks};
use crate::domain::ProductId;
use crate::seams::BackendFailed;
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug, Default)]
struct LockTable {
    /// Product -> (holder:token, lease end).
    held: HashMap<i64, (String, Instant)>,
    /// Product -> last fencing token handed out.
    fences: HashMap<i64, i64>,
}

/// Product locks in memory, shared by every worker of a process: clone the
/// `Arc` and give each worker its own holder name with [`MemoryLocks::holder`].
#[derive(Debug, Clone)]
pub struct MemoryLocks {
    table: std::sync::Arc<Mutex<LockTable>>,
    holder: String,
    lease: Duration,
}

impl MemoryLocks {
    pub fn new(holder: impl Into<String>) -> Self {
        Self {
            table: std::sync::Arc::default(),
            holder: holder.into(),
            lease: LOCK_LEASE,
        }
    }

    /// Forgets every lock and fence counter: what Redis losing its data
    /// looks like (the simulator's fault).
    pub fn forget_everything(&self) {
        let mut t = self.table();
        t.held.clear();
        t.fences.clear();
    }

    /// The same lock table under another holder's name.
    pub fn holder(&self, holder: impl Into<String>) -> Self {
        Self {
            holder: holder.into(),
            ..self.clone()
        }
    }

    /// A shorter lease, for tests of lease expiry.
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    fn table(&self) -> MutexGuard<'_, LockTable> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The locks held now, as `fsctl inspect locks` shows Redis's.
    pub fn held(&self) -> Vec<crate::locks::LockView> {
        let now = Instant::now();
        let t = self.table();
        let mut out: Vec<_> = t
            .held
            .iter()
            .filter(|(_, (_, until))| *until > now)
            .map(|(product, (value, until))| {
                let (holder, token) = value.rsplit_once(':').unwrap_or((value.as_str(), "0"));
                crate::locks::LockView {
                    product_id: *product,
                    holder: holder.to_owned(),
                    token: token.parse().unwrap_or(0),
                    ttl_ms: until.saturating_duration_since(now).as_millis() as i64,
                }
            })
            .collect();
        out.sort_by_key(|l| l.product_id);
        out
    }
}

#[async_trait::async_trait]
impl ProductLocks for MemoryLocks {
    async fn try_acquire(&self, product: ProductId) -> Result<Option<HeldLock>, BackendFailed> {
        let mut t = self.table();
        let now = Instant::now();
        let others = |value: &str| value.rsplit_once(':').map(|(h, _)| h) != Some(&self.holder);
        if t.held
            .get(&product.get())
            .is_some_and(|(value, until)| *until > now && others(value))
        {
            return Ok(None);
        }
        let fence = t.fences.entry(product.get()).or_insert(0);
        *fence += 1;
        let token = *fence;
        let lock = HeldLock::new(product, FencingToken(token), &self.holder);
        t.held
            .insert(product.get(), (lock.value().to_owned(), now + self.lease));
        Ok(Some(lock))
    }

    async fn release(&self, lock: &HeldLock) -> Result<bool, BackendFailed> {
        let mut t = self.table();
        let owned = t
            .held
            .get(&lock.product.get())
            .is_some_and(|(value, until)| value == lock.value() && *until > Instant::now());
        if owned {
            t.held.remove(&lock.product.get());
        }
        Ok(owned)
    }

    async fn raise_fence(&self, product: ProductId, seen: i64) -> Result<i64, BackendFailed> {
        let mut t = self.table();
        let fence = t.fences.entry(product.get()).or_insert(0);
        *fence = (*fence).max(seen);
        Ok(*fence)
    }
}
