//! The stock ledger: products, orders and the fenced group apply. The
//! [`Ledger`] trait has two implementations side by side, PostgreSQL's
//! ([`StockLedger`], in `postgres.rs`) and the in-memory one
//! ([`MemoryLedger`], in `memory.rs`, for `fsctl demo`); the booking rules
//! live once, in [`decide`], and the conformance suite holds both to them.

mod memory;
mod postgres;
mod reports;

pub use memory::MemoryLedger;
pub use postgres::{BOOKED_KEYS, StockLedger, TRANSACTION_DEADLINE};
pub use reports::{Fence, HoldsReport, OrderCounts};

use crate::audit::{AuditReport, QueueFacts};
use crate::domain::{OrderStatus, OrderView, ProductId, QueuedOrder, RejectReason};
use crate::locks::FencingToken;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

/// What became of one order of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderOutcome {
    Confirmed,
    Rejected(RejectReason),
    /// The key already had a row: nothing changed.
    Duplicate,
}

/// The result of one committed group: an outcome per order, in input order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupReceipt {
    pub outcomes: Vec<OrderOutcome>,
    /// Stock after the commit; `None` for an unknown product.
    pub stock_after: Option<i32>,
}

/// One group of a joint apply: a product, its lock's token, its orders.
#[derive(Debug, Clone, Copy)]
pub struct FencedGroup<'a> {
    pub product: ProductId,
    pub token: FencingToken,
    pub orders: &'a [QueuedOrder],
}

/// What one group of a joint apply came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JointOutcome {
    /// Committed with the others.
    Committed(GroupReceipt),
    /// A newer token already wrote the product: nothing of this group was
    /// written; raise the fence counter and apply it alone.
    FencedOut { fence: i64 },
}

/// A backend's own error, kept as the cause.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// A newer token already wrote this product: raise the fence counter to
    /// at least `fence` and take the lock again.
    #[error("fenced out: product {product} was written with token {fence}")]
    FencedOut { product: ProductId, fence: i64 },
    /// The ledger refused the group's data (in PostgreSQL: SQLSTATE class
    /// 22 or 23, other than the idempotency key's own unique violation): a
    /// permanent fault. Find the orders at fault with `refused`, dead-letter
    /// them, apply the rest.
    #[error("the ledger refused the data: {0}")]
    Refused(#[source] BoxError),
    /// The ledger's store failed or is unreachable: a passing fault; keep
    /// the deliveries and retry.
    #[error("the ledger failed: {0}")]
    Database(#[source] BoxError),
    /// PostgreSQL did not finish within the deadline: a passing fault.
    #[error("the ledger did not answer within {0:?}")]
    TimedOut(Duration),
    /// Another product's transaction kept booking keys of this group (a key
    /// reused across products): a passing fault; retry.
    #[error("product {0}: keys kept being booked concurrently")]
    Contended(ProductId),
}

/// One order of a group that the ledger refuses as data: its index in the
/// group and why. It is dead-lettered; the rest of the group is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub index: usize,
    pub reason: String,
}

/// A product as the ledger holds it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProductRecord {
    pub id: ProductId,
    pub name: String,
    pub stock: i32,
    pub seeded_stock: i32,
    pub max_per_order: i32,
    pub per_user_limit: Option<i32>,
    /// Booked orders are held this long for payment (`None`: final at once).
    pub hold_seconds: Option<i32>,
    pub lock_fence: i64,
}

/// A product as `fsctl seed` puts it in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewProduct {
    pub id: i64,
    pub name: String,
    pub stock: i32,
    pub max_per_order: i32,
    pub per_user_limit: Option<i32>,
    pub hold_seconds: Option<i32>,
}

/// What to do with a held order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldAction {
    /// `paid`: final; only before `heldUntil`.
    Pay,
    /// `cancelled`: the units go back to the stock at once.
    Cancel,
}

impl HoldAction {
    /// The status the action leaves the order in.
    pub fn status(self) -> OrderStatus {
        match self {
            Self::Pay => OrderStatus::Paid,
            Self::Cancel => OrderStatus::Cancelled,
        }
    }
}

/// What a pay or cancel came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldSettlement {
    /// The order is now in the action's status: `changed` when this call
    /// did it, not when a repeat found it so.
    Settled {
        order: OrderView,
        changed: bool,
        /// The product's stock after a cancel gave its units back.
        stock_after: Option<i32>,
    },
    /// The order is not held (nor already in the action's status): its
    /// current state.
    NotHeld(OrderView),
    /// A pay came after `heldUntil` and found the hold not swept yet: this
    /// call expired it (its units are back), as the sweep would have.
    Expired {
        order: OrderView,
        stock_after: Option<i32>,
    },
    /// No order row with that key.
    Unknown,
}

/// A product's holds now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldUnits {
    pub product_id: i64,
    pub units: i64,
    /// Holds more than [`crate::audit::HOLD_GRACE`] past their `heldUntil`.
    pub overdue: i64,
}

/// Holds one sweep expired, for one product.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiredHolds {
    pub product_id: ProductId,
    pub orders: Vec<String>,
    /// Units given back.
    pub units: i64,
    pub stock_after: i32,
}

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
    /// Applies several groups of distinct products in one commit (contract
    /// v3, "Several products in one commit"): every group's fence is checked
    /// first; the groups whose fence passes commit together; a group fenced
    /// out writes nothing and says so. An error means nothing was written.
    /// This default applies them one by one, each all or nothing, for a
    /// ledger whose `apply_group` can fail only by being fenced out.
    async fn apply_groups(
        &self,
        groups: &[FencedGroup<'_>],
    ) -> Result<Vec<JointOutcome>, LedgerError> {
        let mut outcomes = Vec::with_capacity(groups.len());
        for g in groups {
            outcomes.push(match self.apply_group(g.product, g.token, g.orders).await {
                Ok(receipt) => JointOutcome::Committed(receipt),
                Err(LedgerError::FencedOut { fence, .. }) => JointOutcome::FencedOut { fence },
                Err(e) => return Err(e),
            });
        }
        Ok(outcomes)
    }
    async fn product(&self, id: ProductId) -> Result<Option<ProductRecord>, LedgerError>;
    async fn products(&self) -> Result<Vec<ProductRecord>, LedgerError>;
    /// Whether the ledger answers (for `/health/ready`).
    async fn probe(&self) -> crate::seams::Probe;
    async fn order(&self, order_id: &str) -> Result<Option<OrderView>, LedgerError>;
    /// The order rows of those of `keys` that have one, in any order.
    async fn orders(&self, keys: &[String]) -> Result<Vec<OrderView>, LedgerError>;
    /// Every order of these products (a checkout's summary), in any order.
    async fn orders_of(&self, products: &[ProductId]) -> Result<Vec<OrderView>, LedgerError>;
    /// The product's stock and which of `keys` have an order row, read in
    /// one snapshot (for the admission counter); `None`: unknown product.
    async fn stock_and_booked(
        &self,
        product: ProductId,
        keys: &[String],
    ) -> Result<Option<(i32, HashSet<String>)>, LedgerError>;
    /// Units of `product` booked to `user` (confirmed, held or paid).
    async fn held_by(&self, product: ProductId, user: &str) -> Result<i64, LedgerError>;
    /// After `apply_group` failed with [`LedgerError::Refused`]: the orders
    /// of the group the ledger refuses as data, each with its reason.
    async fn refused(&self, orders: &[QueuedOrder]) -> Result<Vec<Refusal>, LedgerError>;
    /// Pays or cancels a held order, exactly once: a pay racing the expiry
    /// ends as one of the two. Idempotent: a repeat finds it settled.
    async fn settle_hold(
        &self,
        order_id: &str,
        action: HoldAction,
    ) -> Result<HoldSettlement, LedgerError>;
    /// Expires up to `limit` holds past their `heldUntil` and gives their
    /// units back, per product. Several sweepers at once never expire an
    /// order twice.
    async fn expire_holds(&self, limit: usize) -> Result<Vec<ExpiredHolds>, LedgerError>;
    /// Units held now, per product with any, and how many of those holds
    /// are more than [`crate::audit::HOLD_GRACE`] past their expiry.
    async fn held_units(&self) -> Result<Vec<HeldUnits>, LedgerError>;
    /// How many of `keys` have a row: (booked, that is confirmed, or held
    /// and then paid, cancelled or expired; rejected).
    async fn outcomes(&self, keys: &[String]) -> Result<(usize, usize), LedgerError> {
        let orders = self.orders(keys).await?;
        let rejected = orders
            .iter()
            .filter(|o| o.status == OrderStatus::Rejected)
            .count();
        Ok((orders.len() - rejected, rejected))
    }
    /// The contract's invariants over this ledger, judged by
    /// [`crate::audit::judge`]: 1, 2, 3, 5 and 7, and 4 for `accepted`
    /// (each has a row, or sits in the dead letters of `queue`).
    async fn audit(
        &self,
        accepted: Option<&[String]>,
        queue: &QueueFacts,
    ) -> Result<AuditReport, LedgerError>;
}

/// What a group's orders come to, decided in arrival order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decisions {
    pub outcomes: Vec<OrderOutcome>,
    /// Units confirmed in the group.
    pub taken: i32,
    /// Stock after the group; `None` for an unknown product.
    pub stock_left: Option<i32>,
}

/// The booking rules, one place for every ledger (PostgreSQL's and the
/// embedded one): a key already `booked`, or seen earlier in the group, is
/// a duplicate; an unknown product (`stock` `None`) rejects; an order for
/// more than is left is sold out; one that would take its user past
/// `per_user_limit` (counting `held`, updated here) is rejected; the rest
/// are confirmed and taken from the stock.
pub fn decide(
    orders: &[QueuedOrder],
    booked: &HashSet<String>,
    held: &mut HashMap<String, i64>,
    mut stock: Option<i32>,
    per_user_limit: Option<i32>,
) -> Decisions {
    let mut seen: HashSet<&str> = HashSet::new();
    let mut outcomes = Vec::with_capacity(orders.len());
    let mut taken: i32 = 0;
    for order in orders {
        let key = order.order_id.as_str();
        if booked.contains(key) || !seen.insert(key) {
            outcomes.push(OrderOutcome::Duplicate);
            continue;
        }
        let qty = order.quantity.get();
        let outcome = match stock {
            None => OrderOutcome::Rejected(RejectReason::UnknownProduct),
            Some(left) if qty > left => OrderOutcome::Rejected(RejectReason::SoldOut),
            Some(left) => {
                let user = held.entry(order.user_id.as_str().to_owned()).or_insert(0);
                match per_user_limit {
                    Some(limit) if *user + i64::from(qty) > i64::from(limit) => {
                        OrderOutcome::Rejected(RejectReason::PerUserLimit)
                    }
                    _ => {
                        *user += i64::from(qty);
                        stock = Some(left - qty);
                        taken += qty;
                        OrderOutcome::Confirmed
                    }
                }
            }
        };
        outcomes.push(outcome);
    }
    Decisions {
        outcomes,
        taken,
        stock_left: stock,
    }
}
