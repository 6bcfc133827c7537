//! The accept log in Redis: which idempotency keys were answered `202`, with
//! the body they came with, so a repeat is answered as a repeat and a reused
//! key with another body is refused. `<ns>:order:<key>` holds a JSON record,
//! first `pending` (claimed, publish under way) and then `queued` (confirmed by
//! RabbitMQ). Keys answered 4xx, 409 or 503 are never left behind.

//!
//! Two implementations: Redis ([`AcceptLog`]) and memory ([`MemoryAcceptLog`]).

mod memory;
mod redis;

pub use memory::MemoryAcceptLog;
pub use redis::AcceptLog;

use crate::domain::{IdempotencyKey, OrderRequest, OrderStatus, OrderView};
use crate::seams::BackendFailed;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// A claim not turned into `queued` within this long is forgotten, so a
/// process that died mid-publish does not block the key for good.
pub const PENDING_TTL: Duration = Duration::from_secs(15);
/// How long an accepted key is remembered.
pub const QUEUED_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AcceptState {
    Pending,
    Queued,
}

/// What the accept log remembers of one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AcceptRecord {
    pub user_id: String,
    pub product_id: i64,
    pub quantity: i64,
    pub accepted_at: DateTime<Utc>,
    pub state: AcceptState,
    /// Which request claimed the key (so only it can withdraw the claim).
    pub claim: String,
}

impl AcceptRecord {
    pub fn pending(request: &OrderRequest, at: DateTime<Utc>) -> Self {
        Self {
            user_id: request.user_id.as_str().to_owned(),
            product_id: request.product_id.get(),
            quantity: i64::from(request.quantity.get()),
            accepted_at: at,
            state: AcceptState::Pending,
            claim: uuid::Uuid::new_v4().to_string(),
        }
    }

    /// Same buyer, product and quantity as `request`.
    pub fn same_body(&self, request: &OrderRequest) -> bool {
        self.user_id == request.user_id.as_str()
            && self.product_id == request.product_id.get()
            && self.quantity == i64::from(request.quantity.get())
    }

    /// The order as `GET /orders` shows it before the worker wrote its row.
    pub fn queued_view(&self, key: &str) -> OrderView {
        OrderView {
            order_id: key.to_owned(),
            user_id: self.user_id.clone(),
            product_id: self.product_id,
            quantity: self.quantity,
            status: OrderStatus::Queued,
            reason: None,
            accepted_at: self.accepted_at,
            processed_at: None,
        }
    }
}

/// The outcome of trying to claim a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This request owns the key now and must publish, then mark it queued.
    Claimed,
    /// The key was claimed or accepted before.
    Taken(AcceptRecord),
}

/// The accept log: which keys were claimed or answered `202`.
#[async_trait::async_trait]
pub trait AcceptStore: Send + Sync {
    /// Claims `key` for `record` unless it is taken (then: what holds it).
    async fn claim(
        &self,
        key: &IdempotencyKey,
        record: &AcceptRecord,
    ) -> Result<Claim, BackendFailed>;
    async fn get(&self, key: &str) -> Result<Option<AcceptRecord>, BackendFailed>;
    /// Whether the log answers (for `/health/ready`).
    async fn probe(&self) -> crate::seams::Probe;
    /// The claimed key was accepted (its message confirmed).
    async fn mark_queued(
        &self,
        key: &IdempotencyKey,
        record: &AcceptRecord,
    ) -> Result<(), BackendFailed>;
    /// Withdraws this record's claim, and only its own.
    async fn withdraw(
        &self,
        key: &IdempotencyKey,
        record: &AcceptRecord,
    ) -> Result<(), BackendFailed>;
}
