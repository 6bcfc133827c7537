//! The order book: turns a batch of deliveries into committed rows. Poison
//! messages go to the dead-letter queue; the rest are grouped by product and
//! each group is applied in one fenced transaction under the product's lock;
//! then every delivery of the batch is acked.

use crate::consumer::OrderConsumer;
use crate::heartbeat::WorkerStats;
use chrono::Utc;
use flashsale_engine::broker::{self, PublishError};
use flashsale_engine::domain::QueuedOrder;
use flashsale_engine::ledger::{GroupReceipt, LedgerError, OrderOutcome, StockLedger};
use flashsale_engine::lock::ProductLock;
use flashsale_engine::metrics::{
    BATCH_SIZE, LOCK_WAIT, ORDER_LATENCY, ORDERS_PROCESSED, STOCK_LEVEL,
};
use flashsale_engine::stock_feed::StockFeed;
use flashsale_engine::{OrderMessage, ProductId};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum BookError {
    /// Shutdown came while a backend was failing: the deliveries go back to
    /// the queue when the channel closes.
    #[error("abandoned on shutdown while {0}")]
    Abandoned(String),
    #[error("dead-lettering failed: {0}")]
    DeadLetter(#[from] PublishError),
    #[error("RabbitMQ: {0}")]
    Broker(#[from] lapin::Error),
}

/// The orders of one product, in arrival order, with their deliveries.
pub struct ProductGroup {
    pub product: ProductId,
    pub orders: Vec<QueuedOrder>,
}

/// Deliveries whose transactions committed, waiting for their ack.
pub struct Committed {
    deliveries: Vec<Delivery>,
}

impl Committed {
    /// Acks every delivery; one `multiple` ack of the last tag, valid because
    /// every earlier delivery on the channel is settled by then.
    pub async fn ack(self) -> Result<(), lapin::Error> {
        if let Some(last) = self.deliveries.last() {
            last.acker.ack(BasicAckOptions { multiple: true }).await?;
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.deliveries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.deliveries.is_empty()
    }
}

pub struct OrderBook {
    ledger: StockLedger,
    lock: ProductLock,
    feed: StockFeed,
    stats: Arc<WorkerStats>,
}

const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Product groups of one batch applied at once (below the pool's 8 connections).
pub const GROUP_CONCURRENCY: usize = 6;

impl OrderBook {
    pub fn new(
        ledger: StockLedger,
        lock: ProductLock,
        feed: StockFeed,
        stats: Arc<WorkerStats>,
    ) -> Self {
        Self {
            ledger,
            lock,
            feed,
            stats,
        }
    }

    /// Consumes batches until shutdown or until the consumer fails.
    pub async fn consume(
        &self,
        consumer: &OrderConsumer,
        shutdown: &CancellationToken,
    ) -> Result<(), BookError> {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            let batch = tokio::select! {
                () = shutdown.cancelled() => return self.finish(consumer, shutdown).await,
                _ = tick.tick() => {
                    crate::record_queue_stats(consumer).await;
                    continue;
                }
                batch = consumer.next_batch() => batch?,
            };
            let Some(deliveries) = batch else {
                return Err(BookError::Abandoned("the consumer ended".into()));
            };
            self.process(consumer, deliveries, shutdown).await?;
        }
    }

    /// On shutdown: stop the deliveries, then book and ack what was already
    /// sent, so a graceful stop hands nothing back to the queue.
    async fn finish(
        &self,
        consumer: &OrderConsumer,
        shutdown: &CancellationToken,
    ) -> Result<(), BookError> {
        consumer.cancel().await;
        while let Ok(batch) =
            tokio::time::timeout(Duration::from_millis(200), consumer.next_batch()).await
        {
            match batch? {
                Some(deliveries) => self.process(consumer, deliveries, shutdown).await?,
                None => break,
            }
        }
        Ok(())
    }

    /// Dead-letters poison, commits the rest, acks everything.
    pub async fn process(
        &self,
        consumer: &OrderConsumer,
        deliveries: Vec<Delivery>,
        shutdown: &CancellationToken,
    ) -> Result<(), BookError> {
        let held = deliveries.len();
        self.stats.hold(held);
        let result = async {
            let committed = self.commit(consumer, deliveries, shutdown).await?;
            committed.ack().await?;
            Ok(())
        }
        .await;
        self.stats.release(held);
        result
    }

    /// Everything up to, not including, the ack: dead letters are published
    /// (and their originals acked), groups are committed.
    pub async fn commit(
        &self,
        consumer: &OrderConsumer,
        deliveries: Vec<Delivery>,
        shutdown: &CancellationToken,
    ) -> Result<Committed, BookError> {
        let mut groups: BTreeMap<ProductId, ProductGroup> = BTreeMap::new();
        let mut kept = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            match OrderMessage::decode(&delivery.data) {
                Ok(order) => {
                    groups
                        .entry(order.product_id)
                        .or_insert_with(|| ProductGroup {
                            product: order.product_id,
                            orders: Vec::new(),
                        })
                        .orders
                        .push(order);
                    kept.push(delivery);
                }
                Err(reason) => self.dead_letter(consumer, &delivery, &reason).await?,
            }
        }
        self.book_groups(groups.into_values().collect(), shutdown)
            .await?;
        Ok(Committed { deliveries: kept })
    }

    async fn dead_letter(
        &self,
        consumer: &OrderConsumer,
        delivery: &Delivery,
        reason: &str,
    ) -> Result<(), BookError> {
        tracing::warn!(reason, "dead-lettering an undecodable message");
        let id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default();
        broker::publish_confirmed(
            consumer.channel(),
            &consumer.dead_letter_queue(),
            &id,
            &delivery.data,
            Some(broker::reason_headers(reason)),
        )
        .await?;
        delivery.acker.ack(BasicAckOptions::default()).await?;
        metrics::counter!(ORDERS_PROCESSED, "status" => "dead_lettered", "reason" => "undecodable")
            .increment(1);
        Ok(())
    }

    /// Applies every group, each under its product's lock, up to
    /// [`GROUP_CONCURRENCY`] at once (each in its own transaction, so their
    /// commits overlap). A product locked by another worker waits briefly
    /// while the other products go ahead; a failing backend is retried with
    /// backoff, keeping the deliveries.
    pub async fn book_groups(
        &self,
        groups: Vec<ProductGroup>,
        shutdown: &CancellationToken,
    ) -> Result<(), BookError> {
        let started = Instant::now();
        let results: Vec<Result<(), BookError>> = futures_util::stream::iter(groups)
            .map(|group| self.book_group(group, started, shutdown))
            .buffer_unordered(GROUP_CONCURRENCY)
            .collect()
            .await;
        results.into_iter().collect()
    }

    /// One group: lock, fenced transaction, release; until it commits.
    async fn book_group(
        &self,
        group: ProductGroup,
        started: Instant,
        shutdown: &CancellationToken,
    ) -> Result<(), BookError> {
        let mut lock_backoff = Duration::from_millis(1);
        let mut fault_backoff = Duration::from_millis(50);
        loop {
            let fault = match self.lock.try_acquire(group.product).await {
                Ok(Some(held)) => {
                    metrics::histogram!(LOCK_WAIT).record(started.elapsed().as_secs_f64());
                    self.stats.applying(Some(group.product.get()));
                    let applied = self
                        .ledger
                        .apply_group(group.product, held.token, &group.orders)
                        .await;
                    self.stats.applying(None);
                    if let Err(e) = self.lock.release(&held).await {
                        tracing::debug!(error = %e, "lock not released; its lease ends it");
                    }
                    match applied {
                        Ok(receipt) => {
                            self.record(&group, &receipt);
                            if let Some(stock) = receipt.stock_after {
                                self.feed.announce(group.product.get(), stock).await;
                            }
                            return Ok(());
                        }
                        Err(LedgerError::FencedOut { product, fence }) => {
                            tracing::info!(%product, fence, "fenced out; raising the fence counter");
                            match self.lock.raise_fence(product, fence).await {
                                Ok(_) => continue,
                                Err(e) => format!("Redis failed: {e}"),
                            }
                        }
                        Err(LedgerError::Database(e)) => format!("PostgreSQL failed: {e}"),
                    }
                }
                Ok(None) => {
                    // Held by another worker: wait briefly, never requeue.
                    tokio::time::sleep(lock_backoff).await;
                    lock_backoff = (lock_backoff * 2).min(Duration::from_millis(20));
                    continue;
                }
                Err(e) => format!("Redis failed: {e}"),
            };
            tracing::warn!(error = %fault, product = %group.product, "group not applied; retrying");
            tokio::select! {
                () = shutdown.cancelled() => return Err(BookError::Abandoned(fault)),
                () = tokio::time::sleep(fault_backoff) => {}
            }
            fault_backoff = (fault_backoff * 2).min(MAX_BACKOFF);
        }
    }

    fn record(&self, group: &ProductGroup, receipt: &GroupReceipt) {
        metrics::histogram!(BATCH_SIZE).record(group.orders.len() as f64);
        let now = Utc::now();
        for (order, outcome) in group.orders.iter().zip(&receipt.outcomes) {
            let (status, reason) = match outcome {
                OrderOutcome::Confirmed => ("confirmed", ""),
                OrderOutcome::Rejected(r) => ("rejected", r.as_str()),
                OrderOutcome::Duplicate => ("duplicate", ""),
            };
            metrics::counter!(ORDERS_PROCESSED, "status" => status, "reason" => reason)
                .increment(1);
            if *outcome != OrderOutcome::Duplicate {
                let latency = (now - order.accepted_at).num_microseconds().unwrap_or(0);
                metrics::histogram!(ORDER_LATENCY).record(latency.max(0) as f64 / 1e6);
            }
        }
        if let Some(stock) = receipt.stock_after {
            metrics::gauge!(STOCK_LEVEL, "product_id" => group.product.to_string())
                .set(f64::from(stock));
        }
        self.stats
            .processed
            .fetch_add(group.orders.len() as u64, Ordering::Relaxed);
    }
}
