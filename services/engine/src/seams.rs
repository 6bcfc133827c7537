//! The seams between the order logic and its backends that have two real
//! implementations: PostgreSQL / Redis here, and the in-memory ones of
//! [`crate::embedded`] (for `fsctl demo`). One conformance suite
//! (`services/engine/tests/conformance.rs`) runs against both, so they
//! cannot drift. The booking rules themselves live once, in
//! [`crate::ledger::decide`].
//!
//! Seams: the ledger, the product locks, the order queue and the accept
//! log. Still to come (issue "fsctl demo"): the API and the worker running
//! on these traits rather than on the concrete types, and the demo itself.

use crate::domain::{OrderView, ProductId, QueuedOrder};
use crate::ledger::{GroupReceipt, LedgerError, NewProduct, ProductRecord, Refusal, StockLedger};
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
    async fn products(&self) -> Result<Vec<ProductRecord>, LedgerError>;
    async fn order(&self, order_id: &str) -> Result<Option<OrderView>, LedgerError>;
    /// Units of `product` confirmed to `user`.
    async fn held_by(&self, product: ProductId, user: &str) -> Result<i64, LedgerError>;
    /// After `apply_group` failed with [`LedgerError::Refused`]: the orders
    /// of the group the ledger refuses as data, each with its reason.
    async fn refused(&self, orders: &[QueuedOrder]) -> Result<Vec<Refusal>, LedgerError>;
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
    async fn products(&self) -> Result<Vec<ProductRecord>, LedgerError> {
        Ok(StockLedger::products(self).await?)
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
    async fn refused(&self, orders: &[QueuedOrder]) -> Result<Vec<Refusal>, LedgerError> {
        StockLedger::refused(self, orders).await
    }
}

#[async_trait::async_trait]
impl ProductLocks for ProductLock {
    async fn try_acquire(&self, product: ProductId) -> Result<Option<HeldLock>, BackendFailed> {
        ProductLock::try_acquire(self, product)
            .await
            .map_err(|e| BackendFailed(e.to_string()))
    }
    async fn release(&self, lock: &HeldLock) -> Result<bool, BackendFailed> {
        ProductLock::release(self, lock)
            .await
            .map_err(|e| BackendFailed(e.to_string()))
    }
    async fn raise_fence(&self, product: ProductId, seen: i64) -> Result<i64, BackendFailed> {
        ProductLock::raise_fence(self, product, seen)
            .await
            .map_err(|e| BackendFailed(e.to_string()))
    }
}

/// A message as a consumer sees it.
#[derive(Debug, Clone)]
pub struct Delivered {
    /// Grows with each delivery on a consumer; `ack_through` takes it.
    pub tag: u64,
    pub message_id: String,
    pub payload: Vec<u8>,
    /// Delivered before to a consumer that did not ack it.
    pub redelivered: bool,
}

/// The most deliveries one batch holds. A prefetch above it keeps
/// deliveries arriving while a batch commits, so a worker never waits on the
/// broker's round trip between an ack and the next deliveries.
pub const MAX_BATCH: usize = 500;

/// The order queue: publish with a confirm, consume with a prefetch, ack,
/// redelivery of what a consumer held when it went away, dead letters.
#[async_trait::async_trait]
pub trait OrderQueue: Send + Sync {
    /// Returns once the broker has the message durably (its confirm).
    async fn publish(&self, message_id: &str, payload: &[u8]) -> Result<(), BackendFailed>;
    /// A consumer holding at most `prefetch` unacknowledged messages, handed
    /// out in batches of at most [`MAX_BATCH`].
    async fn consume(&self, prefetch: u16) -> Result<Box<dyn QueueConsumer>, BackendFailed>;
    /// The dead-letter queue's messages: `(message id, reason)`.
    async fn dead_letters(&self) -> Result<Vec<(String, Option<String>)>, BackendFailed>;
}

/// One consumer of the order queue.
#[async_trait::async_trait]
pub trait QueueConsumer: Send + Sync {
    /// Waits for a message, then takes every one already there (at most
    /// [`MAX_BATCH`], and within the prefetch). `None` when the consumer ended.
    async fn next_batch(&mut self) -> Result<Option<Vec<Delivered>>, BackendFailed>;
    /// Acknowledges every delivery up to and including `tag`.
    async fn ack_through(&mut self, tag: u64) -> Result<(), BackendFailed>;
    /// Moves one delivery to the dead-letter queue with `reason`.
    async fn dead_letter(
        &mut self,
        delivery: &Delivered,
        reason: &str,
    ) -> Result<(), BackendFailed>;
    /// Stops new deliveries; those already sent can still be taken.
    async fn cancel(&mut self);
    /// Records the queues' depth and consumers as metrics (where it can).
    async fn record_stats(&self) {}
    /// Goes away; what it held unacknowledged is delivered again.
    async fn close(self: Box<Self>);
}

/// The order queue on RabbitMQ: the API's publisher and the worker's consumer.
pub struct RabbitQueue {
    url: String,
    ns: crate::Namespace,
    /// The API's publisher (connects in the background); a worker has none.
    publisher: Option<crate::broker::OrderPublisher>,
}

impl RabbitQueue {
    /// For publishing and consuming (the API).
    pub fn start(url: &str, ns: &crate::Namespace) -> Self {
        Self {
            url: url.to_owned(),
            ns: ns.clone(),
            publisher: Some(crate::broker::OrderPublisher::start(url, ns)),
        }
    }

    /// For consuming only (a worker): no publisher connection.
    pub fn consumer_only(url: &str, ns: &crate::Namespace) -> Self {
        Self {
            url: url.to_owned(),
            ns: ns.clone(),
            publisher: None,
        }
    }

    pub fn is_connected(&self) -> bool {
        self.publisher.as_ref().is_some_and(|p| p.is_connected())
    }

    /// A consumer named after `worker_id` (RabbitMQ shows it).
    pub async fn consume_as(
        &self,
        prefetch: u16,
        worker_id: &str,
    ) -> Result<Box<dyn QueueConsumer>, BackendFailed> {
        let open = crate::consumer::OrderConsumer::open(&self.url, &self.ns, prefetch, worker_id);
        let consumer = tokio::time::timeout(
            crate::broker::CONNECT_TIMEOUT + crate::broker::CALL_TIMEOUT,
            open,
        )
        .await
        .map_err(|_| BackendFailed("RabbitMQ did not open the consumer in time".into()))?
        .map_err(broker_failed)?;
        Ok(Box::new(RabbitConsumer {
            consumer,
            held: std::collections::BTreeMap::new(),
        }))
    }
}

fn broker_failed(e: impl std::fmt::Display) -> BackendFailed {
    BackendFailed(e.to_string())
}

/// An ack under [`crate::broker::CALL_TIMEOUT`]: a silent broker is a
/// failure (the consumer reconnects), never a hang.
async fn within_deadline<T>(
    call: impl Future<Output = Result<T, lapin::Error>>,
) -> Result<(), BackendFailed> {
    match tokio::time::timeout(crate::broker::CALL_TIMEOUT, call).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(broker_failed(e)),
        Err(_) => Err(BackendFailed(format!(
            "RabbitMQ did not take the ack within {:?}",
            crate::broker::CALL_TIMEOUT
        ))),
    }
}

#[async_trait::async_trait]
impl OrderQueue for RabbitQueue {
    async fn publish(&self, message_id: &str, payload: &[u8]) -> Result<(), BackendFailed> {
        let Some(publisher) = &self.publisher else {
            return Err(BackendFailed("this queue handle only consumes".into()));
        };
        publisher
            .publish(message_id, payload)
            .await
            .map_err(broker_failed)
    }

    async fn consume(&self, prefetch: u16) -> Result<Box<dyn QueueConsumer>, BackendFailed> {
        self.consume_as(prefetch, "flashsale").await
    }

    async fn dead_letters(&self) -> Result<Vec<(String, Option<String>)>, BackendFailed> {
        Ok(
            crate::observe::peek_dead_letters(&self.url, &self.ns, 10_000)
                .await
                .map_err(broker_failed)?
                .into_iter()
                .map(|d| (d.message_id.unwrap_or_default(), d.reason))
                .collect(),
        )
    }
}

struct RabbitConsumer {
    consumer: crate::consumer::OrderConsumer,
    held: std::collections::BTreeMap<u64, lapin::message::Delivery>,
}

#[async_trait::async_trait]
impl QueueConsumer for RabbitConsumer {
    async fn next_batch(&mut self) -> Result<Option<Vec<Delivered>>, BackendFailed> {
        let Some(batch) = self.consumer.next_batch().await.map_err(broker_failed)? else {
            return Ok(None);
        };
        let mut out = Vec::with_capacity(batch.len());
        for d in batch {
            out.push(Delivered {
                tag: d.delivery_tag,
                message_id: d
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.as_str().to_owned())
                    .unwrap_or_default(),
                payload: d.data.clone(),
                redelivered: d.redelivered,
            });
            self.held.insert(d.delivery_tag, d);
        }
        Ok(Some(out))
    }

    async fn ack_through(&mut self, tag: u64) -> Result<(), BackendFailed> {
        // The newest held delivery at or below `tag` (one may have been
        // dead-lettered, and so acked, already).
        if let Some((_, d)) = self.held.range(..=tag).next_back() {
            let ack = d
                .acker
                .ack(lapin::options::BasicAckOptions { multiple: true });
            within_deadline(ack).await?;
        }
        self.held.retain(|t, _| *t > tag);
        Ok(())
    }

    async fn dead_letter(
        &mut self,
        delivery: &Delivered,
        reason: &str,
    ) -> Result<(), BackendFailed> {
        let Some(d) = self.held.remove(&delivery.tag) else {
            return Ok(());
        };
        crate::broker::publish_confirmed(
            self.consumer.channel(),
            &self.consumer.dead_letter_queue(),
            &delivery.message_id,
            &d.data,
            Some(crate::broker::reason_headers(reason)),
        )
        .await
        .map_err(broker_failed)?;
        within_deadline(d.acker.ack(lapin::options::BasicAckOptions::default())).await
    }

    async fn cancel(&mut self) {
        self.consumer.cancel().await;
    }

    async fn record_stats(&self) {
        crate::broker::record_queue_stats(self.consumer.channel(), &self.consumer.namespace())
            .await;
    }

    async fn close(self: Box<Self>) {
        self.consumer.close().await;
    }
}

/// The accept log: which keys were claimed or answered `202`.
#[async_trait::async_trait]
pub trait AcceptStore: Send + Sync {
    /// Claims `key` for `record` unless it is taken (then: what holds it).
    async fn claim(
        &self,
        key: &crate::IdempotencyKey,
        record: &crate::accept_log::AcceptRecord,
    ) -> Result<crate::accept_log::Claim, BackendFailed>;
    async fn get(
        &self,
        key: &str,
    ) -> Result<Option<crate::accept_log::AcceptRecord>, BackendFailed>;
    /// The claimed key was accepted (its message confirmed).
    async fn mark_queued(
        &self,
        key: &crate::IdempotencyKey,
        record: &crate::accept_log::AcceptRecord,
    ) -> Result<(), BackendFailed>;
    /// Withdraws this record's claim, and only its own.
    async fn withdraw(
        &self,
        key: &crate::IdempotencyKey,
        record: &crate::accept_log::AcceptRecord,
    ) -> Result<(), BackendFailed>;
}

fn redis_failed(e: redis::RedisError) -> BackendFailed {
    BackendFailed(e.to_string())
}

#[async_trait::async_trait]
impl AcceptStore for crate::accept_log::AcceptLog {
    async fn claim(
        &self,
        key: &crate::IdempotencyKey,
        record: &crate::accept_log::AcceptRecord,
    ) -> Result<crate::accept_log::Claim, BackendFailed> {
        crate::accept_log::AcceptLog::claim(self, key, record)
            .await
            .map_err(redis_failed)
    }
    async fn get(
        &self,
        key: &str,
    ) -> Result<Option<crate::accept_log::AcceptRecord>, BackendFailed> {
        crate::accept_log::AcceptLog::get(self, key)
            .await
            .map_err(redis_failed)
    }
    async fn mark_queued(
        &self,
        key: &crate::IdempotencyKey,
        record: &crate::accept_log::AcceptRecord,
    ) -> Result<(), BackendFailed> {
        crate::accept_log::AcceptLog::mark_queued(self, key, record)
            .await
            .map_err(redis_failed)
    }
    async fn withdraw(
        &self,
        key: &crate::IdempotencyKey,
        record: &crate::accept_log::AcceptRecord,
    ) -> Result<(), BackendFailed> {
        crate::accept_log::AcceptLog::withdraw(self, key, record)
            .await
            .map_err(redis_failed)
    }
}
