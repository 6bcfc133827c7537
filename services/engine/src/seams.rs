//! The seams between the order logic and its backends that have two real
//! implementations: PostgreSQL / Redis here, and the in-memory ones of
//! [`crate::embedded`] (for `fsctl demo`). One conformance suite
//! (`services/engine/tests/conformance.rs`) runs against both, so they
//! cannot drift. The booking rules themselves live once, in
//! [`crate::ledger::decide`].
//!
//! Still to come (issue "fsctl demo"): the order queue seam (publish with
//! confirm, prefetch, ack, redelivery, dead letters) and the accept log,
//! and the API and worker running on these traits.

use crate::domain::{OrderView, ProductId, QueuedOrder};
use crate::ledger::{GroupReceipt, LedgerError, NewProduct, ProductRecord, StockLedger};
use crate::lock::{FencingToken, HeldLock, ProductLock};

/// A backend failed: retry later (the message names it).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BackendFailed(pub String);

/// The stock ledger: products, orders, and the fenced group apply.
#[async_trait::async_trait]
pub trait Ledger: Send + Sync {
    /// Inserts the products that do not exist yet; returns the ids created.
    async fn create_missing(&self, products: &[NewProduct]) -> Result<Vec<i64>, LedgerError>;
    /// Applies `orders` (all for `product`, in arrival order) under `token`,
    /// all or nothing.
    async fn apply_group(
        &self,
        product: ProductId,
        token: FencingToken,
        orders: &[QueuedOrder],
    ) -> Result<GroupReceipt, LedgerError>;
    async fn product(&self, id: ProductId) -> Result<Option<ProductRecord>, LedgerError>;
    async fn order(&self, order_id: &str) -> Result<Option<OrderView>, LedgerError>;
    /// Units of `product` confirmed to `user`.
    async fn held_by(&self, product: ProductId, user: &str) -> Result<i64, LedgerError>;
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

#[async_trait::async_trait]
impl Ledger for StockLedger {
    async fn create_missing(&self, products: &[NewProduct]) -> Result<Vec<i64>, LedgerError> {
        Ok(StockLedger::create_missing(self, products).await?)
    }
    async fn apply_group(
        &self,
        product: ProductId,
        token: FencingToken,
        orders: &[QueuedOrder],
    ) -> Result<GroupReceipt, LedgerError> {
        StockLedger::apply_group(self, product, token, orders).await
    }
    async fn product(&self, id: ProductId) -> Result<Option<ProductRecord>, LedgerError> {
        Ok(StockLedger::product(self, id).await?)
    }
    async fn order(&self, order_id: &str) -> Result<Option<OrderView>, LedgerError> {
        Ok(StockLedger::order(self, order_id).await?)
    }
    async fn held_by(&self, product: ProductId, user: &str) -> Result<i64, LedgerError> {
        Ok(sqlx::query_scalar(
            "SELECT COALESCE(SUM(quantity), 0)::bigint FROM orders
             WHERE product_id = $1 AND user_id = $2 AND status = 'confirmed'",
        )
        .bind(product.get())
        .bind(user)
        .fetch_one(self.pool())
        .await?)
    }
}

#[async_trait::async_trait]
impl ProductLocks for ProductLock {
    async fn try_acquire(&self, product: ProductId) -> Result<Option<HeldLock>, BackendFailed> {
        ProductLock::try_acquire(self, product)
            .await
            .map_err(|e| BackendFailed(format!("Redis: {e}")))
    }
    async fn release(&self, lock: &HeldLock) -> Result<bool, BackendFailed> {
        ProductLock::release(self, lock)
            .await
            .map_err(|e| BackendFailed(format!("Redis: {e}")))
    }
    async fn raise_fence(&self, product: ProductId, seen: i64) -> Result<i64, BackendFailed> {
        ProductLock::raise_fence(self, product, seen)
            .await
            .map_err(|e| BackendFailed(format!("Redis: {e}")))
    }
}
