//! The order book: turns a batch of deliveries into committed rows. Poison
//! messages go to the dead-letter queue; the rest are grouped by product,
//! the groups whose locks are free are applied together in one transaction
//! (each fenced by its own lock's token), any others one by one as their
//! locks come free; then every delivery of the batch is acked.
//!
//! Faults are told apart: an order PostgreSQL refuses as data (a permanent
//! fault) is taken out of its group and dead-lettered with the reason, and
//! the rest of the group commits; a failing or silent backend (a passing
//! fault, every call under a deadline) keeps the deliveries and is retried
//! with backoff. No input can stop the worker from consuming.

use flashsale_engine::admission::AdmissionCounters;
use flashsale_engine::domain::{QueuedOrder, RejectReason};
use flashsale_engine::heartbeat::WorkerStats;
use flashsale_engine::ledger::Ledger;
use flashsale_engine::ledger::{
    FencedGroup, GroupReceipt, JointOutcome, LedgerError, OrderOutcome, Refusal,
};
use flashsale_engine::locks::{HeldLock, ProductLocks};
use flashsale_engine::metrics::{
    ADMISSION_TOKENS, BATCH_SIZE, LOCK_WAIT, ORDER_LATENCY, ORDERS_PROCESSED, STOCK_LEVEL,
};
use flashsale_engine::mutants::{self, Mutant};
use flashsale_engine::order_events::OrderEvents;
use flashsale_engine::queue::{Delivered, QueueConsumer};
use flashsale_engine::seams::BackendFailed;
use flashsale_engine::stock_feed::StockFeed;
use flashsale_engine::{OrderMessage, ProductId};
use futures_util::StreamExt;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum BookError {
    /// Shutdown came while a backend was failing (or the consumer ended):
    /// the deliveries go back to the queue when the channel closes.
    #[error("abandoned on shutdown")]
    Abandoned(#[source] Fault),
    /// The queue failed (consuming, acking or dead-lettering): reconnect;
    /// what was not acked is delivered again.
    #[error("the order queue failed")]
    Queue(#[from] BackendFailed),
}

/// Why a step of a batch did not happen this time: a passing fault, retried
/// until it does (or until shutdown).
#[derive(Debug, thiserror::Error)]
pub enum Fault {
    #[error("the consumer ended")]
    ConsumerEnded,
    #[error("cannot read the duplicates' rows")]
    ReadingDuplicates(#[source] LedgerError),
    #[error("cannot take the lock")]
    TakingLock(#[source] BackendFailed),
    #[error("cannot raise the fence counter")]
    RaisingFence(#[source] BackendFailed),
    #[error("the group was not applied")]
    Applying(#[source] LedgerError),
    #[error("cannot find the refused orders")]
    FindingRefused(#[source] LedgerError),
    /// PostgreSQL refused the group, but none of its orders alone.
    #[error("the group was refused, but no single order of it")]
    NoneRefusedAlone(#[source] LedgerError),
}

/// The orders of one product, in arrival order, with their deliveries' tags.
pub struct ProductGroup {
    pub product: ProductId,
    pub orders: Vec<QueuedOrder>,
    /// The delivery tag of each order, index for index.
    pub tags: Vec<u64>,
}

impl ProductGroup {
    pub fn new(product: ProductId) -> Self {
        Self {
            product,
            orders: Vec::new(),
            tags: Vec::new(),
        }
    }

    pub fn push(&mut self, order: QueuedOrder, tag: u64) {
        self.orders.push(order);
        self.tags.push(tag);
    }

    /// Takes the refused orders out; returns their deliveries' tags with the reasons.
    fn take_out(&mut self, refusals: &[Refusal]) -> Vec<RefusedOrder> {
        let mut out = Vec::with_capacity(refusals.len());
        for r in refusals.iter().rev() {
            if r.index < self.orders.len() {
                let order = self.orders.remove(r.index);
                out.push(RefusedOrder {
                    order_id: order.order_id.as_str().to_owned(),
                    tag: self.tags.remove(r.index),
                    reason: r.reason.clone(),
                });
            }
        }
        out
    }
}

/// An order the ledger refused as data: its delivery goes to the DLQ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedOrder {
    pub order_id: String,
    pub tag: u64,
    pub reason: String,
}

/// What one round of joint booking left.
#[derive(Default)]
struct JointRound {
    /// Groups whose lock another worker holds: the next round tries again.
    waiting: Vec<ProductGroup>,
    /// Groups for the one-by-one path (fenced out, or a backend failed).
    alone: Vec<ProductGroup>,
    /// Groups committed in this round.
    booked: usize,
}

/// Deliveries whose transactions committed, waiting for their ack.
pub struct Committed {
    /// The newest delivery's tag; acking through it settles the batch.
    last_tag: Option<u64>,
    count: usize,
}

impl Committed {
    /// Acks every delivery through the last tag, valid because every
    /// earlier delivery on the consumer is settled by then.
    pub async fn ack(self, consumer: &mut dyn QueueConsumer) -> Result<(), BackendFailed> {
        if let Some(tag) = self.last_tag {
            consumer.ack_through(tag).await?;
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

pub struct OrderBook {
    ledger: Arc<dyn Ledger>,
    lock: Arc<dyn ProductLocks>,
    /// The admission counters: committed orders are settled there, and the
    /// units of rejected and refused ones given back.
    admission: Arc<dyn AdmissionCounters>,
    /// Stock announcements to the APIs (Redis); none when embedded.
    feed: Option<StockFeed>,
    /// Order changes for the APIs' event streams.
    events: OrderEvents,
    stats: Arc<WorkerStats>,
    /// The duplicates of the batch being booked (key already booked): the
    /// ones whose row has another body are dead-lettered, not dropped.
    duplicates: std::sync::Mutex<Vec<(QueuedOrder, u64)>>,
}

const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Product groups of one batch applied at once (below the pool's 8 connections).
pub const GROUP_CONCURRENCY: usize = 6;

impl OrderBook {
    pub fn new(
        ledger: Arc<dyn Ledger>,
        lock: Arc<dyn ProductLocks>,
        admission: Arc<dyn AdmissionCounters>,
        feed: Option<StockFeed>,
        events: OrderEvents,
        stats: Arc<WorkerStats>,
    ) -> Self {
        Self {
            ledger,
            lock,
            admission,
            feed,
            events,
            stats,
            duplicates: std::sync::Mutex::default(),
        }
    }

    /// Consumes batches until shutdown or until the consumer fails.
    pub async fn consume(
        &self,
        consumer: &mut dyn QueueConsumer,
        shutdown: &CancellationToken,
    ) -> Result<(), BookError> {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            let batch = tokio::select! {
                () = shutdown.cancelled() => return self.finish(consumer, shutdown).await,
                _ = tick.tick() => {
                    consumer.record_stats().await;
                    continue;
                }
                batch = consumer.next_batch() => batch?,
            };
            let Some(deliveries) = batch else {
                return Err(BookError::Abandoned(Fault::ConsumerEnded));
            };
            self.process(consumer, deliveries, shutdown).await?;
        }
    }

    /// On shutdown: stop the deliveries, then book and ack what was already
    /// sent, so a graceful stop hands nothing back to the queue.
    async fn finish(
        &self,
        consumer: &mut dyn QueueConsumer,
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
        consumer: &mut dyn QueueConsumer,
        deliveries: Vec<Delivered>,
        shutdown: &CancellationToken,
    ) -> Result<(), BookError> {
        let held = deliveries.len();
        self.stats.hold(held);
        let result = async {
            if mutants::active(Mutant::AckBeforeCommit)
                && let Some(last) = deliveries.iter().map(|d| d.tag).max()
            {
                consumer.ack_through(last).await?;
            }
            let committed = self.commit(consumer, deliveries, shutdown).await?;
            committed.ack(consumer).await?;
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
        consumer: &mut dyn QueueConsumer,
        deliveries: Vec<Delivered>,
        shutdown: &CancellationToken,
    ) -> Result<Committed, BookError> {
        let mut groups: BTreeMap<ProductId, ProductGroup> = BTreeMap::new();
        let last_tag = deliveries.iter().map(|d| d.tag).max();
        let mut held: HashMap<u64, Delivered> = HashMap::with_capacity(deliveries.len());
        for delivery in deliveries {
            match OrderMessage::decode(&delivery.payload) {
                Ok(order) => {
                    groups
                        .entry(order.product_id)
                        .or_insert_with(|| ProductGroup::new(order.product_id))
                        .push(order, delivery.tag);
                    held.insert(delivery.tag, delivery);
                }
                Err(reason) => {
                    self.dead_letter(consumer, &delivery, &reason, "undecodable")
                        .await?;
                }
            }
        }
        let refused = self
            .book_groups(groups.into_values().collect(), shutdown)
            .await?;
        for r in &refused {
            if let Some(delivery) = held.remove(&r.tag) {
                self.dead_letter(consumer, &delivery, &r.reason, "refused")
                    .await?;
            }
        }
        let reused = self.reused_keys(shutdown).await?;
        for tag in reused
            .into_iter()
            .filter(|_| !mutants::active(Mutant::DuplicateDropped))
        {
            if let Some(delivery) = held.remove(&tag) {
                let reason = "idempotency_key_reused: the key's order has another body";
                self.dead_letter(consumer, &delivery, reason, "key_reused")
                    .await?;
            }
        }
        Ok(Committed {
            last_tag: if held.is_empty() { None } else { last_tag },
            count: held.len(),
        })
    }

    /// The batch's duplicates whose key was booked with another body: an
    /// order accepted twice under one key after Redis forgot the first (the
    /// API could not know). Dropping the second would lose an accepted
    /// order without a trace; it goes to the DLQ instead (invariant 4).
    async fn reused_keys(&self, shutdown: &CancellationToken) -> Result<Vec<u64>, BookError> {
        let duplicates =
            std::mem::take(&mut *self.duplicates.lock().unwrap_or_else(|p| p.into_inner()));
        if duplicates.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = duplicates
            .iter()
            .map(|(o, _)| o.order_id.as_str().to_owned())
            .collect();
        let mut backoff = Duration::from_millis(50);
        let rows = loop {
            match self.ledger.orders(&keys).await {
                Ok(rows) => break rows,
                Err(e) => {
                    if shutdown.is_cancelled() {
                        return Err(BookError::Abandoned(Fault::ReadingDuplicates(e)));
                    }
                    tracing::warn!(error = %e, "cannot read the duplicates' rows; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        };
        let rows: HashMap<&str, &flashsale_engine::OrderView> =
            rows.iter().map(|r| (r.order_id.as_str(), r)).collect();
        Ok(duplicates
            .iter()
            .filter(|(order, _)| {
                rows.get(order.order_id.as_str()).is_some_and(|row| {
                    row.user_id != order.user_id.as_str()
                        || row.product_id != order.product_id.get()
                        || row.quantity != i64::from(order.quantity.get())
                })
            })
            .map(|(_, tag)| *tag)
            .collect())
    }

    async fn dead_letter(
        &self,
        consumer: &mut dyn QueueConsumer,
        delivery: &Delivered,
        reason: &str,
        kind: &'static str,
    ) -> Result<(), BookError> {
        tracing::warn!(reason, order = %delivery.message_id, "dead-lettering an order");
        consumer.dead_letter(delivery, reason).await?;
        metrics::counter!(ORDERS_PROCESSED, "status" => "dead_lettered", "reason" => kind)
            .increment(1);
        Ok(())
    }

    /// Applies every group, each under its product's lock: first the groups
    /// whose locks are free, together in one transaction; then whatever is
    /// left (a lock held elsewhere, a group fenced out, or every group when
    /// the joint apply failed) one by one, up to [`GROUP_CONCURRENCY`] at
    /// once. A product locked by another worker waits briefly while the
    /// other products go ahead; a failing backend is retried with backoff,
    /// keeping the deliveries. Returns the orders the ledger refused as data
    /// (left out of their groups), for the dead-letter queue.
    pub async fn book_groups(
        &self,
        groups: Vec<ProductGroup>,
        shutdown: &CancellationToken,
    ) -> Result<Vec<RefusedOrder>, BookError> {
        let started = Instant::now();
        let groups = self.book_together(groups, started).await;
        let results: Vec<Result<Vec<RefusedOrder>, BookError>> = futures_util::stream::iter(groups)
            .map(|group| self.book_group(group, started, shutdown))
            .buffer_unordered(GROUP_CONCURRENCY)
            .collect()
            .await;
        let mut refused = Vec::new();
        for r in results {
            refused.extend(r?);
        }
        Ok(refused)
    }

    /// Books the groups together, round after round: each round applies
    /// the groups whose locks are free in one transaction, then waits
    /// briefly for the locks other workers hold. Returns the groups left
    /// for the one-by-one path: a last one, a group fenced out, or all of
    /// them when a joint apply failed.
    async fn book_together(
        &self,
        mut groups: Vec<ProductGroup>,
        started: Instant,
    ) -> Vec<ProductGroup> {
        let mut alone = Vec::new();
        let mut wait = Duration::from_millis(1);
        while groups.len() > 1 {
            let round = self.book_jointly(groups, started).await;
            alone.extend(round.alone);
            if round.booked == 0 {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_millis(20));
            }
            groups = round.waiting;
        }
        alone.extend(groups);
        alone
    }

    /// One round: the groups whose locks are free (taken in one round trip:
    /// the connection pipelines them) in one transaction.
    async fn book_jointly(&self, groups: Vec<ProductGroup>, started: Instant) -> JointRound {
        let locks =
            futures_util::future::join_all(groups.iter().map(|g| self.lock.try_acquire(g.product)))
                .await;
        let mut held: Vec<(ProductGroup, HeldLock)> = Vec::with_capacity(groups.len());
        let mut round = JointRound::default();
        for (group, lock) in groups.into_iter().zip(locks) {
            match lock {
                Ok(Some(lock)) => held.push((group, lock)),
                Ok(None) => round.waiting.push(group),
                // Redis failed: the one-by-one path retries with backoff.
                Err(_) => round.alone.push(group),
            }
        }
        if held.is_empty() {
            return round;
        }
        metrics::histogram!(LOCK_WAIT).record(started.elapsed().as_secs_f64());
        self.stats.applying(Some(held[0].0.product.get()));
        let joint: Vec<FencedGroup<'_>> = held
            .iter()
            .map(|(g, l)| FencedGroup {
                product: g.product,
                token: l.token,
                orders: &g.orders,
            })
            .collect();
        let applied = self.ledger.apply_groups(&joint).await;
        self.stats.applying(None);
        drop(joint);
        let outcomes = match applied {
            Ok(outcomes) => outcomes,
            Err(e) => {
                // Nothing was written: the one-by-one path retries each
                // group, finding any order the ledger refuses as data.
                tracing::debug!(error = %e, "joint apply failed; applying the groups one by one");
                self.release_all(held.iter().map(|(_, l)| l)).await;
                round.alone.extend(held.into_iter().map(|(g, _)| g));
                round.alone.append(&mut round.waiting);
                return round;
            }
        };
        let mut fenced_out = Vec::new();
        let finished = held.iter().zip(&outcomes).map(|((group, lock), outcome)| async move {
            match outcome {
                JointOutcome::Committed(receipt) => {
                    self.after_commit(group, lock, receipt).await;
                    None
                }
                JointOutcome::FencedOut { fence } => {
                    self.release_all([lock]).await;
                    tracing::info!(product = %group.product, fence, "fenced out; raising the fence counter");
                    if let Err(e) = self.lock.raise_fence(group.product, *fence).await {
                        tracing::debug!(error = %e, "fence not raised; the group's retry will");
                    }
                    Some(group.product)
                }
            }
        });
        fenced_out.extend(
            futures_util::future::join_all(finished)
                .await
                .into_iter()
                .flatten(),
        );
        round.booked = held.len() - fenced_out.len();
        round.alone.extend(
            held.into_iter()
                .map(|(g, _)| g)
                .filter(|g| fenced_out.contains(&g.product)),
        );
        round
    }

    async fn release_all(&self, locks: impl IntoIterator<Item = &HeldLock>) {
        let released =
            futures_util::future::join_all(locks.into_iter().map(|l| self.lock.release(l))).await;
        for r in released {
            if let Err(e) = r {
                tracing::debug!(error = %e, "lock not released; its lease ends it");
            }
        }
    }

    /// After a group committed: its metrics, then the lock's release, the
    /// admission settle and a sell-out's announcement together (one round
    /// trip's wait, not three). Only a sell-out is announced: the APIs'
    /// catalogs need it at once for their fast path, and poll every other
    /// change within 250 ms.
    async fn after_commit(&self, group: &ProductGroup, held: &HeldLock, receipt: &GroupReceipt) {
        self.record(group, receipt);
        {
            let mut duplicates = self.duplicates.lock().unwrap_or_else(|p| p.into_inner());
            for ((order, tag), outcome) in
                group.orders.iter().zip(&group.tags).zip(&receipt.outcomes)
            {
                if *outcome == OrderOutcome::Duplicate {
                    duplicates.push((order.clone(), *tag));
                }
            }
        }
        let announce = async {
            if let (Some(feed), Some(0)) = (&self.feed, receipt.stock_after) {
                feed.announce(group.product, 0).await;
            }
            let changed = group
                .orders
                .iter()
                .zip(&receipt.outcomes)
                .filter(|(_, o)| **o != OrderOutcome::Duplicate)
                .map(|(q, _)| q.order_id.as_str());
            self.events.announce(changed).await;
        };
        let ((), (), ()) = tokio::join!(
            self.release_all([held]),
            self.release_admitted(group, &receipt.outcomes),
            announce
        );
    }

    /// One group: lock, fenced transaction, release; until it commits.
    async fn book_group(
        &self,
        mut group: ProductGroup,
        started: Instant,
        shutdown: &CancellationToken,
    ) -> Result<Vec<RefusedOrder>, BookError> {
        let mut refused = Vec::new();
        let mut lock_backoff = Duration::from_millis(1);
        let mut fault_backoff = Duration::from_millis(50);
        loop {
            if group.orders.is_empty() {
                return Ok(refused);
            }
            let fault = match self.lock.try_acquire(group.product).await {
                Ok(Some(held)) => {
                    metrics::histogram!(LOCK_WAIT).record(started.elapsed().as_secs_f64());
                    self.stats.applying(Some(group.product.get()));
                    // PostgreSQL's ledger holds its own deadline (a silent
                    // server is a passing fault, not a hang).
                    let applied = self
                        .ledger
                        .apply_group(group.product, held.token, &group.orders)
                        .await;
                    self.stats.applying(None);
                    if let Ok(receipt) = &applied {
                        self.after_commit(&group, &held, receipt).await;
                        return Ok(refused);
                    }
                    self.release_all([&held]).await;
                    match applied {
                        Ok(_) => return Ok(refused),
                        Err(LedgerError::FencedOut { product, fence }) => {
                            tracing::info!(%product, fence, "fenced out; raising the fence counter");
                            match self.lock.raise_fence(product, fence).await {
                                Ok(_) => continue,
                                Err(e) => Fault::RaisingFence(e),
                            }
                        }
                        Err(refused_group @ LedgerError::Refused(_)) => {
                            match self.find_refused(&mut group).await {
                                Ok(out) if !out.is_empty() => {
                                    // Never booked: their units go back on sale.
                                    let keys: Vec<String> =
                                        out.iter().map(|r| r.order_id.clone()).collect();
                                    self.give_back(group.product, &[], &keys).await;
                                    refused.extend(out);
                                    continue;
                                }
                                Ok(_) => Fault::NoneRefusedAlone(refused_group),
                                Err(fault) => fault,
                            }
                        }
                        Err(e) => Fault::Applying(e),
                    }
                }
                Ok(None) => {
                    // Held by another worker: wait briefly, never requeue.
                    tokio::time::sleep(lock_backoff).await;
                    lock_backoff = (lock_backoff * 2).min(Duration::from_millis(20));
                    continue;
                }
                Err(e) => Fault::TakingLock(e),
            };
            tracing::warn!(
                error = &fault as &dyn std::error::Error,
                product = %group.product,
                "group not applied; retrying"
            );
            tokio::select! {
                () = shutdown.cancelled() => return Err(BookError::Abandoned(fault)),
                () = tokio::time::sleep(fault_backoff) => {}
            }
            fault_backoff = (fault_backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Asks the ledger which orders of the group it refuses as data and
    /// takes them out of the group; the error is a passing fault.
    async fn find_refused(&self, group: &mut ProductGroup) -> Result<Vec<RefusedOrder>, Fault> {
        match self.ledger.refused(&group.orders).await {
            Ok(refusals) => {
                for r in &refusals {
                    tracing::warn!(product = %group.product, reason = %r.reason, "order refused by the ledger");
                }
                Ok(group.take_out(&refusals))
            }
            Err(e) => Err(Fault::FindingRefused(e)),
        }
    }

    /// Settles a committed group's orders in the admission counter: the
    /// units of an order rejected for its buyer or product go back on sale;
    /// a sold-out rejection's do not (the counter admitted too many).
    async fn release_admitted(&self, group: &ProductGroup, outcomes: &[OrderOutcome]) {
        let mut done = Vec::with_capacity(group.orders.len());
        let mut returned = Vec::new();
        for (order, outcome) in group.orders.iter().zip(outcomes) {
            let key = order.order_id.as_str().to_owned();
            match outcome {
                OrderOutcome::Rejected(
                    RejectReason::PerUserLimit | RejectReason::UnknownProduct,
                ) => {
                    returned.push(key);
                }
                _ => done.push(key),
            }
        }
        self.give_back(group.product, &done, &returned).await;
    }

    /// A failure only delays the counter until its next reconciliation.
    async fn give_back(&self, product: ProductId, done: &[String], returned: &[String]) {
        match self
            .admission
            .release_admitted(product, done, returned)
            .await
        {
            Ok(Some(tokens)) => {
                metrics::gauge!(ADMISSION_TOKENS, "product_id" => product.to_string())
                    .set(tokens as f64);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(error = %e, %product, "admission not settled; reconciliation will")
            }
        }
    }

    fn record(&self, group: &ProductGroup, receipt: &GroupReceipt) {
        metrics::histogram!(BATCH_SIZE).record(group.orders.len() as f64);
        let now = flashsale_engine::clock::now();
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
