//! In-memory backends for `fsctl demo`: the same seams as PostgreSQL,
//! Redis and RabbitMQ ([`crate::seams`]), the same booking rules
//! ([`crate::ledger::decide`]), nothing installed. A group applies under one
//! mutex, all or nothing, as a transaction would; leases and time limits run
//! on tokio's clock.

use crate::domain::{OrderStatus, OrderView, ProductId, QueuedOrder};
use crate::ledger::{
    Decisions, GroupReceipt, LedgerError, NewProduct, OrderOutcome, ProductRecord, decide,
};
use crate::lock::{FencingToken, HeldLock, LOCK_LEASE};
use crate::seams::{BackendFailed, Ledger, ProductLocks};
use chrono::Utc;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug, Default)]
struct Books {
    products: BTreeMap<i64, ProductRecord>,
    orders: BTreeMap<String, OrderView>,
}

/// The stock ledger in memory.
#[derive(Debug, Default)]
pub struct MemoryLedger {
    books: Mutex<Books>,
}

impl MemoryLedger {
    pub fn new() -> Self {
        Self::default()
    }

    fn books(&self) -> MutexGuard<'_, Books> {
        self.books.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every product and every order, for the audit.
    pub fn snapshot(&self) -> (Vec<ProductRecord>, Vec<OrderView>) {
        let books = self.books();
        (
            books.products.values().cloned().collect(),
            books.orders.values().cloned().collect(),
        )
    }

    /// Orders with a row: (confirmed, rejected).
    pub fn totals(&self) -> (u64, u64) {
        let books = self.books();
        let confirmed = books
            .orders
            .values()
            .filter(|o| o.status == OrderStatus::Confirmed)
            .count() as u64;
        (confirmed, books.orders.len() as u64 - confirmed)
    }

    /// The contract's invariants over what the ledger holds (3, one row
    /// per order id, is the map's key), as `(invariant, detail)`.
    pub fn violations(&self) -> Vec<(u8, String)> {
        self.audit(&[], &HashSet::new(), true)
            .violations
            .into_iter()
            .map(|v| (v.invariant, v.detail))
            .collect()
    }

    /// The same report `fsctl verify` gives on PostgreSQL, judged by the
    /// same code: invariants 1-5, and 4 for `accepted` (each has a row, or
    /// sits in `dead_letters`).
    pub fn audit(
        &self,
        accepted: &[String],
        dead_letters: &HashSet<String>,
        drained: bool,
    ) -> crate::audit::AuditReport {
        use crate::audit::{LedgerFacts, OverLimit, ProductTotals, QueueFacts, judge};
        let books = self.books();
        let mut totals = Vec::with_capacity(books.products.len());
        let mut over_limit = Vec::new();
        for p in books.products.values() {
            let (mut confirmed, mut rejected) = (0, 0);
            let mut held: BTreeMap<&str, i64> = BTreeMap::new();
            for o in books.orders.values().filter(|o| o.product_id == p.id) {
                match o.status {
                    OrderStatus::Confirmed => {
                        confirmed += o.quantity;
                        *held.entry(o.user_id.as_str()).or_insert(0) += o.quantity;
                    }
                    _ => rejected += 1,
                }
            }
            totals.push(ProductTotals {
                id: p.id,
                seeded_stock: i64::from(p.seeded_stock),
                stock: i64::from(p.stock),
                confirmed_units: confirmed,
                rejected_orders: rejected,
            });
            if let Some(limit) = p.per_user_limit {
                over_limit.extend(held.into_iter().filter(|(_, u)| *u > i64::from(limit)).map(
                    |(user, units)| OverLimit {
                        product_id: p.id,
                        user_id: user.to_owned(),
                        units,
                        limit: i64::from(limit),
                    },
                ));
            }
        }
        let booked = |key: &str| books.orders.contains_key(key);
        judge(
            LedgerFacts {
                totals,
                doubled: Vec::new(),
                over_limit,
                booked: &booked,
            },
            Some(accepted),
            &QueueFacts {
                drained,
                dlq_count: dead_letters.len() as u64,
                dlq_ids: dead_letters.clone(),
            },
        )
    }
}

#[async_trait::async_trait]
impl Ledger for MemoryLedger {
    async fn create_missing(&self, products: &[NewProduct]) -> Result<Vec<i64>, LedgerError> {
        let mut books = self.books();
        let mut created = Vec::new();
        for p in products {
            if books.products.contains_key(&p.id) {
                continue;
            }
            books.products.insert(
                p.id,
                ProductRecord {
                    id: p.id,
                    name: p.name.clone(),
                    stock: p.stock,
                    seeded_stock: p.stock,
                    max_per_order: p.max_per_order,
                    per_user_limit: p.per_user_limit,
                    lock_fence: 0,
                },
            );
            created.push(p.id);
        }
        Ok(created)
    }

    async fn apply_group(
        &self,
        product: ProductId,
        token: FencingToken,
        orders: &[QueuedOrder],
    ) -> Result<GroupReceipt, LedgerError> {
        let mut books = self.books();
        let (stock, per_user_limit) = match books.products.get_mut(&product.get()) {
            Some(p) if p.lock_fence >= token.0 => {
                return Err(LedgerError::FencedOut {
                    product,
                    fence: p.lock_fence,
                });
            }
            Some(p) => {
                p.lock_fence = token.0;
                (Some(p.stock), p.per_user_limit)
            }
            None => (None, None),
        };
        let booked: HashSet<String> = orders
            .iter()
            .map(|o| o.order_id.as_str())
            .filter(|k| books.orders.contains_key(*k))
            .map(str::to_owned)
            .collect();
        let mut held: HashMap<String, i64> = HashMap::new();
        for o in books
            .orders
            .values()
            .filter(|o| o.product_id == product.get() && o.status == OrderStatus::Confirmed)
        {
            *held.entry(o.user_id.clone()).or_insert(0) += o.quantity;
        }
        let Decisions {
            outcomes,
            stock_left,
            ..
        } = decide(orders, &booked, &mut held, stock, per_user_limit);
        let now = Utc::now();
        for (order, outcome) in orders.iter().zip(&outcomes) {
            let (status, reason) = match outcome {
                OrderOutcome::Duplicate => continue,
                OrderOutcome::Confirmed => (OrderStatus::Confirmed, None),
                OrderOutcome::Rejected(r) => (OrderStatus::Rejected, Some(r.as_str().to_owned())),
            };
            books.orders.insert(
                order.order_id.as_str().to_owned(),
                OrderView {
                    order_id: order.order_id.as_str().to_owned(),
                    user_id: order.user_id.as_str().to_owned(),
                    product_id: order.product_id.get(),
                    quantity: i64::from(order.quantity.get()),
                    status,
                    reason,
                    accepted_at: order.accepted_at,
                    processed_at: Some(now),
                },
            );
        }
        if let (Some(p), Some(left)) = (books.products.get_mut(&product.get()), stock_left) {
            p.stock = left;
        }
        Ok(GroupReceipt {
            outcomes,
            stock_after: stock_left,
        })
    }

    async fn product(&self, id: ProductId) -> Result<Option<ProductRecord>, LedgerError> {
        Ok(self.books().products.get(&id.get()).cloned())
    }

    async fn products(&self) -> Result<Vec<ProductRecord>, LedgerError> {
        Ok(self.books().products.values().cloned().collect())
    }

    async fn order(&self, order_id: &str) -> Result<Option<OrderView>, LedgerError> {
        Ok(self.books().orders.get(order_id).cloned())
    }

    /// Memory holds any string: nothing is ever refused as data.
    async fn refused(
        &self,
        _orders: &[QueuedOrder],
    ) -> Result<Vec<crate::ledger::Refusal>, LedgerError> {
        Ok(Vec::new())
    }
    async fn held_by(&self, product: ProductId, user: &str) -> Result<i64, LedgerError> {
        Ok(self
            .books()
            .orders
            .values()
            .filter(|o| {
                o.product_id == product.get()
                    && o.user_id == user
                    && o.status == OrderStatus::Confirmed
            })
            .map(|o| o.quantity)
            .sum())
    }
}

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
    pub fn held(&self) -> Vec<crate::observe::LockView> {
        let now = Instant::now();
        let t = self.table();
        let mut out: Vec<_> = t
            .held
            .iter()
            .filter(|(_, (_, until))| *until > now)
            .map(|(product, (value, until))| {
                let (holder, token) = value.rsplit_once(':').unwrap_or((value.as_str(), "0"));
                crate::observe::LockView {
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
        if t.held
            .get(&product.get())
            .is_some_and(|(_, until)| *until > now)
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

/// A message in the embedded queue.
#[derive(Debug, Clone)]
struct Message {
    id: String,
    payload: Vec<u8>,
    deliveries: u32,
}

#[derive(Debug, Default)]
struct QueueState {
    ready: std::collections::VecDeque<Message>,
    /// Consumer -> tag -> message it holds unacknowledged.
    held: HashMap<u64, BTreeMap<u64, Message>>,
    dead: Vec<(String, Option<String>)>,
    next_tag: u64,
    next_consumer: u64,
}

/// The order queue in memory: publish (the "confirm" is the push under the
/// lock), prefetch, ack, redelivery of what a consumer held when it closes
/// or is dropped, and dead letters, by hand or past the delivery limit.
#[derive(Debug, Clone, Default)]
pub struct MemoryQueue {
    state: std::sync::Arc<Mutex<QueueState>>,
    wake: std::sync::Arc<tokio::sync::Notify>,
}

impl MemoryQueue {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ready messages and deliveries held, for `fsctl top` and the drain.
    pub fn depth(&self) -> (usize, usize) {
        let s = self.state();
        (s.ready.len(), s.held.values().map(BTreeMap::len).sum())
    }

    /// The queues as `fsctl inspect queue` shows RabbitMQ's.
    pub fn view(&self) -> crate::observe::QueueView {
        let s = self.state();
        crate::observe::QueueView {
            orders_ready: s.ready.len() as u64,
            orders_consumers: s.held.len() as u64,
            dlq_ready: s.dead.len() as u64,
            dlq_consumers: 0,
        }
    }
}

#[async_trait::async_trait]
impl crate::seams::OrderQueue for MemoryQueue {
    async fn publish(&self, message_id: &str, payload: &[u8]) -> Result<(), BackendFailed> {
        self.state().ready.push_back(Message {
            id: message_id.to_owned(),
            payload: payload.to_vec(),
            deliveries: 0,
        });
        self.wake.notify_waiters();
        Ok(())
    }

    async fn consume(
        &self,
        prefetch: u16,
    ) -> Result<Box<dyn crate::seams::QueueConsumer>, BackendFailed> {
        let id = {
            let mut s = self.state();
            s.next_consumer += 1;
            let id = s.next_consumer;
            s.held.insert(id, BTreeMap::new());
            id
        };
        Ok(Box::new(MemoryConsumer {
            queue: self.clone(),
            id,
            prefetch: usize::from(prefetch.max(1)),
            cancelled: false,
        }))
    }

    async fn dead_letters(&self) -> Result<Vec<(String, Option<String>)>, BackendFailed> {
        Ok(self.state().dead.clone())
    }
}

/// A consumer of the embedded queue; dropping it hands back what it held.
pub struct MemoryConsumer {
    queue: MemoryQueue,
    id: u64,
    prefetch: usize,
    cancelled: bool,
}

impl MemoryConsumer {
    /// Takes up to the free prefetch, at most a batch; messages past the
    /// delivery limit go to the dead letters instead, as RabbitMQ's quorum
    /// queue does.
    fn take(&self) -> Vec<crate::seams::Delivered> {
        if self.cancelled {
            return Vec::new();
        }
        let mut s = self.queue.state();
        let holding = s.held.get(&self.id).map_or(0, BTreeMap::len);
        let mut out = Vec::new();
        while holding + out.len() < self.prefetch && out.len() < crate::seams::MAX_BATCH {
            let Some(mut m) = s.ready.pop_front() else {
                break;
            };
            if m.deliveries > crate::broker::DELIVERY_LIMIT as u32 {
                s.dead.push((m.id, Some("delivery_limit".into())));
                continue;
            }
            m.deliveries += 1;
            s.next_tag += 1;
            let tag = s.next_tag;
            out.push(crate::seams::Delivered {
                tag,
                message_id: m.id.clone(),
                payload: m.payload.clone(),
                redelivered: m.deliveries > 1,
            });
            s.held.entry(self.id).or_default().insert(tag, m);
        }
        out
    }

    fn hand_back(&self) {
        let mut s = self.queue.state();
        if let Some(held) = s.held.remove(&self.id) {
            for m in held.into_values().rev() {
                s.ready.push_front(m);
            }
        }
        drop(s);
        self.queue.wake.notify_waiters();
    }
}

impl Drop for MemoryConsumer {
    fn drop(&mut self) {
        self.hand_back();
    }
}

#[async_trait::async_trait]
impl crate::seams::QueueConsumer for MemoryConsumer {
    async fn next_batch(&mut self) -> Result<Option<Vec<crate::seams::Delivered>>, BackendFailed> {
        loop {
            let woken = self.queue.wake.notified();
            let batch = self.take();
            if !batch.is_empty() {
                return Ok(Some(batch));
            }
            // A publish or an ack may free room; a short poll covers a wake
            // that raced the check above.
            let _ = tokio::time::timeout(Duration::from_millis(50), woken).await;
        }
    }

    async fn ack_through(&mut self, tag: u64) -> Result<(), BackendFailed> {
        if let Some(held) = self.queue.state().held.get_mut(&self.id) {
            held.retain(|t, _| *t > tag);
        }
        self.queue.wake.notify_waiters();
        Ok(())
    }

    async fn dead_letter(
        &mut self,
        delivery: &crate::seams::Delivered,
        reason: &str,
    ) -> Result<(), BackendFailed> {
        let mut s = self.queue.state();
        let removed = s
            .held
            .get_mut(&self.id)
            .and_then(|held| held.remove(&delivery.tag));
        if let Some(m) = removed {
            s.dead.push((m.id, Some(reason.to_owned())));
        }
        Ok(())
    }

    async fn cancel(&mut self) {
        self.cancelled = true;
    }

    async fn close(self: Box<Self>) {
        // Drop hands back what it held.
    }
}

/// The accept log in memory, with the same time limits as in Redis.
#[derive(Debug, Default)]
pub struct MemoryAcceptLog {
    records: Mutex<HashMap<String, (crate::accept_log::AcceptRecord, Instant)>>,
}

impl MemoryAcceptLog {
    pub fn new() -> Self {
        Self::default()
    }

    fn records(
        &self,
    ) -> MutexGuard<'_, HashMap<String, (crate::accept_log::AcceptRecord, Instant)>> {
        let mut r = self.records.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        r.retain(|_, (_, until)| *until > now);
        r
    }
}

#[async_trait::async_trait]
impl crate::seams::AcceptStore for MemoryAcceptLog {
    async fn claim(
        &self,
        key: &crate::IdempotencyKey,
        record: &crate::accept_log::AcceptRecord,
    ) -> Result<crate::accept_log::Claim, BackendFailed> {
        let mut r = self.records();
        if let Some((existing, _)) = r.get(key.as_str()) {
            return Ok(crate::accept_log::Claim::Taken(existing.clone()));
        }
        let until = Instant::now() + crate::accept_log::PENDING_TTL;
        r.insert(key.as_str().to_owned(), (record.clone(), until));
        Ok(crate::accept_log::Claim::Claimed)
    }

    async fn get(
        &self,
        key: &str,
    ) -> Result<Option<crate::accept_log::AcceptRecord>, BackendFailed> {
        Ok(self.records().get(key).map(|(r, _)| r.clone()))
    }

    async fn mark_queued(
        &self,
        key: &crate::IdempotencyKey,
        record: &crate::accept_log::AcceptRecord,
    ) -> Result<(), BackendFailed> {
        let queued = crate::accept_log::AcceptRecord {
            state: crate::accept_log::AcceptState::Queued,
            ..record.clone()
        };
        let until = Instant::now() + crate::accept_log::QUEUED_TTL;
        self.records()
            .insert(key.as_str().to_owned(), (queued, until));
        Ok(())
    }

    async fn withdraw(
        &self,
        key: &crate::IdempotencyKey,
        record: &crate::accept_log::AcceptRecord,
    ) -> Result<(), BackendFailed> {
        let mut r = self.records();
        if r.get(key.as_str())
            .is_some_and(|(held, _)| held.claim == record.claim)
        {
            r.remove(key.as_str());
        }
        Ok(())
    }
}

/// Every embedded backend of one process: the API and the workers share them.
#[derive(Clone)]
pub struct EmbeddedBackends {
    pub ledger: std::sync::Arc<MemoryLedger>,
    pub locks: MemoryLocks,
    pub queue: MemoryQueue,
    pub accept_log: std::sync::Arc<MemoryAcceptLog>,
}

impl Default for EmbeddedBackends {
    fn default() -> Self {
        Self {
            ledger: std::sync::Arc::default(),
            locks: MemoryLocks::new("embedded"),
            queue: MemoryQueue::new(),
            accept_log: std::sync::Arc::default(),
        }
    }
}
