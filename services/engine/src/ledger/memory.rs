//! The stock ledger in memory, for `fsctl demo`: the same booking rules
//! ([`super::decide`]); a group applies under one mutex, all or nothing, as a
//! transaction would.

use super::{
    Decisions, GroupReceipt, Ledger, LedgerError, NewProduct, OrderOutcome, ProductRecord, decide,
};
use crate::domain::{OrderStatus, OrderView, ProductId, QueuedOrder};
use crate::locks::FencingToken;
use chrono::Utc;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};

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

    async fn probe(&self) -> crate::seams::Probe {
        crate::seams::Probe::ok("embedded")
    }
    async fn products(&self) -> Result<Vec<ProductRecord>, LedgerError> {
        Ok(self.books().products.values().cloned().collect())
    }

    async fn stock_and_booked(
        &self,
        product: ProductId,
        keys: &[String],
    ) -> Result<Option<(i32, HashSet<String>)>, LedgerError> {
        let books = self.books();
        Ok(books.products.get(&product.get()).map(|p| {
            let booked = keys
                .iter()
                .filter(|k| books.orders.contains_key(k.as_str()))
                .cloned()
                .collect();
            (p.stock, booked)
        }))
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
