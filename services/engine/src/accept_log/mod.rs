//! The accept log: which idempotency keys were answered `202`, with the
//! body they came with, so a repeat is answered as a repeat and a reused key
//! with another body is refused. In Redis `<ns>:order:<key>` holds a JSON
//! record, first `pending` (claimed, publish under way) and then `queued`
//! (confirmed by RabbitMQ). Keys answered 4xx, 409 or 503 are never left
//! behind.
//!
//! Two implementations, each also keeping the admission counters
//! ([`crate::admission`]): Redis ([`RedisAcceptLog`]) and memory
//! ([`MemoryAcceptLog`]).

mod memory;
mod redis;

pub use memory::MemoryAcceptLog;
pub use redis::RedisAcceptLog;

use crate::admission::AdmissionCounters;
use crate::domain::{IdempotencyKey, OrderRequest, OrderStatus, OrderView};
use crate::seams::BackendFailed;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// A claim not turned into `queued` within this long is forgotten, so a
/// process that died mid-publish does not block the key for good. Well
/// past [`crate::admission::PENDING_ALIVE`], so a claim is never forgotten
/// while it may still be published.
pub const PENDING_TTL: Duration = Duration::from_secs(15);
const _: () =
    assert!(crate::admission::PENDING_ALIVE.as_millis() * 3 / 2 <= PENDING_TTL.as_millis());
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

    /// The same record, its claim marked with the API process that holds it
    /// (`<instance>/<claim>`), so that a reconciliation can tell a claim
    /// whose process died ([`AcceptStore::claimants_alive`]).
    pub fn claimed_by(mut self, instance: &str) -> Self {
        self.claim = format!("{instance}/{}", self.claim);
        self
    }

    /// The API process holding the claim, if it was marked.
    pub fn claimant(&self) -> Option<&str> {
        self.claim.split_once('/').map(|(instance, _)| instance)
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
            held_until: None,
            settled_at: None,
        }
    }
}

/// The outcome of admitting a buy: claiming its key and taking its units
/// from the product's admission counter, both or neither.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admit {
    /// This request owns the key and took its units (`left` remain): it
    /// must publish, then mark the key queued, or withdraw (units back). A
    /// re-run of the same admission (a retried script) finds its own claim
    /// and answers this again, taking nothing more.
    Claimed { left: i64 },
    /// The key was claimed or accepted before; nothing was taken.
    Taken(AcceptRecord),
    /// Fewer units are left than asked (`available`, maybe none).
    Short { available: i64 },
    /// The product has no counter yet (first use, or Redis lost it):
    /// derive it ([`crate::admission::derive`]) and admit again.
    NoCounter,
}

/// The accept log: which keys were claimed or answered `202`. A claim and
/// its units are taken together ([`AcceptLog::admit`]) and given back
/// together ([`AcceptLog::withdraw`]), so one store holds this log and the
/// admission counters ([`AdmissionCounters`]): [`AcceptStore`] is both.
#[async_trait::async_trait]
pub trait AcceptLog: Send + Sync {
    /// Claims `key` and takes `record.quantity` units of `record.product_id`,
    /// both or neither.
    async fn admit(
        &self,
        key: &IdempotencyKey,
        record: &AcceptRecord,
    ) -> Result<Admit, BackendFailed>;
    async fn get(&self, key: &str) -> Result<Option<AcceptRecord>, BackendFailed>;
    /// The records of `keys`, in order (`None` where there is none).
    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<AcceptRecord>>, BackendFailed>;
    /// Whether the log answers (for `/health/ready`).
    async fn probe(&self) -> crate::seams::Probe;
    /// The claimed key was accepted (its message confirmed): marked
    /// `queued` only if the record is still this claim's. Whether it was
    /// (safe to run twice).
    async fn mark_queued(
        &self,
        key: &IdempotencyKey,
        record: &AcceptRecord,
    ) -> Result<bool, BackendFailed>;
    /// How long ago each key's record was claimed, on the store's own clock
    /// (from what is left of its pending TTL); `None` where there is no
    /// pending record.
    async fn pending_ages(&self, keys: &[String]) -> Result<Vec<Option<Duration>>, BackendFailed>;
    /// Withdraws this record's claim, and only its own, giving its units back.
    async fn withdraw(
        &self,
        key: &IdempotencyKey,
        record: &AcceptRecord,
    ) -> Result<(), BackendFailed>;
    /// Whether each API process (by its instance id) is still alive: its
    /// heartbeat has not expired.
    async fn claimants_alive(&self, instances: &[String]) -> Result<Vec<bool>, BackendFailed>;
}

/// The accept log and the admission counters, in one store.
pub trait AcceptStore: AcceptLog + AdmissionCounters {}

impl<T: AcceptLog + AdmissionCounters + ?Sized> AcceptStore for T {}
