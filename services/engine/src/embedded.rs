//! In-memory backends for `fsctl demo`: the same seams as PostgreSQL and
//! Redis ([`crate::seams`]), the same rules ([`crate::ledger::decide`]),
//! nothing installed. A group applies under one mutex, all or nothing, as
//! a transaction would; the lock's lease runs on tokio's clock.

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

    /// The contract's invariants 1, 2 and 5 over what the ledger holds (3,
    /// one row per order id, is the map's key), as `(invariant, detail)`.
    pub fn violations(&self) -> Vec<(u8, String)> {
        let books = self.books();
        let mut out = Vec::new();
        for p in books.products.values() {
            let confirmed: i64 = books
                .orders
                .values()
                .filter(|o| o.product_id == p.id && o.status == OrderStatus::Confirmed)
                .map(|o| o.quantity)
                .sum();
            if i64::from(p.seeded_stock) != i64::from(p.stock) + confirmed {
                out.push((
                    1,
                    format!(
                        "product {}: seeded {} != stock {} + confirmed {confirmed}",
                        p.id, p.seeded_stock, p.stock
                    ),
                ));
            }
            if p.stock < 0 {
                out.push((2, format!("product {}: stock {}", p.id, p.stock)));
            }
            if let Some(limit) = p.per_user_limit {
                let mut held: HashMap<&str, i64> = HashMap::new();
                for o in books
                    .orders
                    .values()
                    .filter(|o| o.product_id == p.id && o.status == OrderStatus::Confirmed)
                {
                    *held.entry(o.user_id.as_str()).or_insert(0) += o.quantity;
                }
                for (user, units) in held {
                    if units > i64::from(limit) {
                        out.push((
                            5,
                            format!("product {}: user {user} holds {units}, limit {limit}", p.id),
                        ));
                    }
                }
            }
        }
        out
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

    async fn order(&self, order_id: &str) -> Result<Option<OrderView>, LedgerError> {
        Ok(self.books().orders.get(order_id).cloned())
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
