//! The stock ledger in memory, for `fsctl demo`: the same booking rules
//! ([`super::decide`]); a group applies under one mutex, all or nothing, as a
//! transaction would.

use super::{
    Decisions, ExpiredHolds, GroupReceipt, HeldUnits, HoldAction, HoldSettlement, Ledger,
    LedgerError, NewProduct, OrderOutcome, ProductRecord, decide,
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

    /// Time passes for the holds: every `heldUntil` moves `by` earlier (the
    /// property test of holds, which cannot wait for real expiries).
    pub fn age_holds(&self, by: std::time::Duration) {
        let by = chrono::Duration::from_std(by).unwrap_or_default();
        for o in self.books().orders.values_mut() {
            if let Some(until) = o.held_until.as_mut() {
                *until -= by;
            }
        }
    }

    /// Orders with a row: (booked: confirmed, or held and then paid,
    /// cancelled or expired; rejected), as `StockLedger::totals` counts them.
    pub fn totals(&self) -> (u64, u64) {
        let books = self.books();
        let rejected = books
            .orders
            .values()
            .filter(|o| o.status == OrderStatus::Rejected)
            .count() as u64;
        (books.orders.len() as u64 - rejected, rejected)
    }

    /// The contract's invariants over what the ledger holds (3, one row
    /// per order id, is the map's key), as `(invariant, detail)`.
    pub fn violations(&self) -> Vec<(u8, String)> {
        self.audit_now(
            None,
            &crate::audit::QueueFacts::drained_with(HashSet::new()),
        )
        .violations
        .into_iter()
        .map(|v| (v.invariant, v.detail))
        .collect()
    }

    /// [`Ledger::audit`] at once: the simulator and `fsctl top` judge the
    /// books between steps of their own.
    pub fn audit_now(
        &self,
        accepted: Option<&[String]>,
        queue: &crate::audit::QueueFacts,
    ) -> crate::audit::AuditReport {
        use crate::audit::{HOLD_GRACE, LedgerFacts, OverLimit, OverdueHold, ProductTotals, judge};
        let books = self.books();
        let mut totals = Vec::with_capacity(books.products.len());
        let mut over_limit = Vec::new();
        let now = crate::clock::now();
        let overdue_holds = books
            .orders
            .values()
            .filter(|o| o.status == OrderStatus::Held)
            .filter_map(|o| {
                let overdue = (now - o.held_until?).to_std().ok()?;
                (overdue > HOLD_GRACE).then(|| OverdueHold {
                    order_id: o.order_id.clone(),
                    product_id: o.product_id,
                    overdue,
                })
            })
            .collect();
        for p in books.products.values() {
            let (mut confirmed, mut held_units, mut rejected) = (0, 0, 0);
            let mut held: BTreeMap<&str, i64> = BTreeMap::new();
            for o in books.orders.values().filter(|o| o.product_id == p.id.get()) {
                match o.status {
                    OrderStatus::Confirmed | OrderStatus::Paid => confirmed += o.quantity,
                    OrderStatus::Held => held_units += o.quantity,
                    OrderStatus::Rejected => rejected += 1,
                    _ => {}
                }
                if o.status.is_booked() {
                    *held.entry(o.user_id.as_str()).or_insert(0) += o.quantity;
                }
            }
            totals.push(ProductTotals {
                id: p.id.get(),
                seeded_stock: i64::from(p.seeded_stock),
                stock: i64::from(p.stock),
                confirmed_units: confirmed,
                held_units,
                rejected_orders: rejected,
            });
            if let Some(limit) = p.per_user_limit {
                over_limit.extend(held.into_iter().filter(|(_, u)| *u > i64::from(limit)).map(
                    |(user, units)| OverLimit {
                        product_id: p.id.get(),
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
                overdue_holds,
                booked: &booked,
            },
            accepted,
            queue,
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
            let id = ProductId::new(p.id).map_err(|e| LedgerError::Refused(Box::new(e)))?;
            books.products.insert(
                p.id,
                ProductRecord {
                    id,
                    name: p.name.clone(),
                    stock: p.stock,
                    seeded_stock: p.stock,
                    max_per_order: p.max_per_order,
                    per_user_limit: p.per_user_limit,
                    hold_seconds: p.hold_seconds,
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
        let (stock, per_user_limit, hold) = match books.products.get_mut(&product.get()) {
            Some(p) if p.lock_fence >= token.0 => {
                return Err(LedgerError::FencedOut {
                    product,
                    fence: p.lock_fence,
                });
            }
            Some(p) => {
                p.lock_fence = token.0;
                (Some(p.stock), p.per_user_limit, p.hold_seconds)
            }
            None => (None, None, None),
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
            .filter(|o| o.product_id == product.get() && o.status.is_booked())
        {
            *held.entry(o.user_id.clone()).or_insert(0) += o.quantity;
        }
        let Decisions {
            outcomes,
            stock_left,
            ..
        } = decide(orders, &booked, &mut held, stock, per_user_limit);
        let now = crate::clock::now();
        let held_until = hold.map(|s| now + chrono::Duration::seconds(i64::from(s)));
        for (order, outcome) in orders.iter().zip(&outcomes) {
            let (status, reason, held_until) = match outcome {
                OrderOutcome::Duplicate => continue,
                OrderOutcome::Confirmed if held_until.is_some() => {
                    (OrderStatus::Held, None, held_until)
                }
                OrderOutcome::Confirmed => (OrderStatus::Confirmed, None, None),
                OrderOutcome::Rejected(r) => {
                    (OrderStatus::Rejected, Some(r.as_str().to_owned()), None)
                }
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
                    held_until,
                    settled_at: None,
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

    async fn orders(&self, keys: &[String]) -> Result<Vec<OrderView>, LedgerError> {
        let books = self.books();
        Ok(keys
            .iter()
            .filter_map(|k| books.orders.get(k).cloned())
            .collect())
    }

    async fn orders_of(&self, products: &[ProductId]) -> Result<Vec<OrderView>, LedgerError> {
        Ok(self
            .books()
            .orders
            .values()
            .filter(|o| products.iter().any(|p| p.get() == o.product_id))
            .cloned()
            .collect())
    }

    /// Memory holds any string: nothing is ever refused as data.
    async fn refused(
        &self,
        _orders: &[QueuedOrder],
    ) -> Result<Vec<crate::ledger::Refusal>, LedgerError> {
        Ok(Vec::new())
    }
    async fn settle_hold(
        &self,
        order_id: &str,
        action: HoldAction,
    ) -> Result<HoldSettlement, LedgerError> {
        let mut books = self.books();
        let now = crate::clock::now();
        let Some(order) = books.orders.get_mut(order_id) else {
            return Ok(HoldSettlement::Unknown);
        };
        if order.status != OrderStatus::Held {
            return Ok(if order.status == action.status() {
                HoldSettlement::Settled {
                    order: order.clone(),
                    changed: false,
                    stock_after: None,
                }
            } else {
                HoldSettlement::NotHeld(order.clone())
            });
        }
        let due = order.held_until.is_some_and(|until| until <= now);
        let (status, units_back) = match action {
            HoldAction::Pay if due => (OrderStatus::Expired, true),
            HoldAction::Pay => (OrderStatus::Paid, false),
            HoldAction::Cancel => (OrderStatus::Cancelled, true),
        };
        order.status = status;
        order.settled_at = Some(now);
        let order = order.clone();
        let mut stock_after = None;
        if units_back && let Some(p) = books.products.get_mut(&order.product_id) {
            p.stock += order.quantity as i32;
            stock_after = Some(p.stock);
        }
        Ok(if status == OrderStatus::Expired {
            HoldSettlement::Expired { order, stock_after }
        } else {
            HoldSettlement::Settled {
                order,
                changed: true,
                stock_after,
            }
        })
    }

    async fn expire_holds(&self, limit: usize) -> Result<Vec<ExpiredHolds>, LedgerError> {
        let mut books = self.books();
        let now = crate::clock::now();
        let mut due: Vec<(chrono::DateTime<Utc>, String)> = books
            .orders
            .values()
            .filter(|o| {
                o.status == OrderStatus::Held
                    || crate::mutants::active(crate::mutants::Mutant::SweepIgnoresStatus)
            })
            .filter_map(|o| {
                o.held_until
                    .filter(|u| *u <= now)
                    .map(|u| (u, o.order_id.clone()))
            })
            .collect();
        due.sort();
        due.truncate(limit);
        let mut by_product: BTreeMap<i64, (Vec<String>, i64)> = BTreeMap::new();
        for (_, key) in due {
            let Some(order) = books.orders.get_mut(&key) else {
                continue;
            };
            order.status = OrderStatus::Expired;
            order.settled_at = Some(now);
            let (orders, units) = by_product.entry(order.product_id).or_default();
            *units += order.quantity;
            orders.push(key);
        }
        Ok(by_product
            .into_iter()
            .filter_map(|(product, (orders, units))| {
                let p = books.products.get_mut(&product)?;
                p.stock += units as i32;
                Some(ExpiredHolds {
                    product_id: p.id,
                    orders,
                    units,
                    stock_after: p.stock,
                })
            })
            .collect())
    }

    async fn held_units(&self) -> Result<Vec<HeldUnits>, LedgerError> {
        let now = crate::clock::now();
        let mut held: BTreeMap<i64, HeldUnits> = BTreeMap::new();
        for o in self
            .books()
            .orders
            .values()
            .filter(|o| o.status == OrderStatus::Held)
        {
            let h = held.entry(o.product_id).or_insert(HeldUnits {
                product_id: o.product_id,
                units: 0,
                overdue: 0,
            });
            h.units += o.quantity;
            let late = o
                .held_until
                .and_then(|u| (now - u).to_std().ok())
                .is_some_and(|late| late > crate::audit::HOLD_GRACE);
            h.overdue += i64::from(late);
        }
        Ok(held.into_values().collect())
    }

    async fn audit(
        &self,
        accepted: Option<&[String]>,
        queue: &crate::audit::QueueFacts,
    ) -> Result<crate::audit::AuditReport, LedgerError> {
        Ok(self.audit_now(accepted, queue))
    }

    async fn held_by(&self, product: ProductId, user: &str) -> Result<i64, LedgerError> {
        Ok(self
            .books()
            .orders
            .values()
            .filter(|o| o.product_id == product.get() && o.user_id == user && o.status.is_booked())
            .map(|o| o.quantity)
            .sum())
    }
}
