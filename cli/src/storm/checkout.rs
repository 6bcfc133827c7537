//! `--pay-ratio F --pay-delay D`: buyers who reach checkout. For each order
//! the storm got a `202` for, a share F of the buyers wait until it is held,
//! then D more, and pay (`POST /orders/{id}/pay`); the others never pay, so
//! their holds expire and the units go back on sale to later buyers of the
//! same storm. After the drain the report adds how the holds ended and how
//! many units were sold a second time.

use super::target::BuyTarget;
use flashsale_engine::ledger::{Ledger, LedgerError, ProductRecord};
use flashsale_engine::{OrderStatus, OrderView, ProductId};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

/// What the buyers do with their holds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Checkout {
    pub pay_ratio: f64,
    pub pay_delay: Duration,
}

/// Checkouts in progress at once.
const PAYING: usize = 256;
/// How often a buyer looks whether its order is held yet.
const LOOK_EVERY: Duration = Duration::from_millis(100);
/// A buyer gives up on an order still queued after this long.
const LOOK_FOR: Duration = Duration::from_secs(60);

/// How the storm's holds ended.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckoutSummary {
    pub pay_ratio: f64,
    pub pay_delay_seconds: f64,
    /// Pays sent and answered `200`.
    pub pays_accepted: u64,
    /// Pays answered `409` (the hold had expired).
    pub pays_too_late: u64,
    /// The storm's accepted orders by how they ended.
    pub paid: u64,
    pub cancelled: u64,
    pub expired: u64,
    /// Still held when the report was made.
    pub held: u64,
    /// Units given back by cancelled and expired holds.
    pub units_returned: i64,
    /// Units sold more than once: bookings beyond each product's seeded stock.
    pub units_sold_again: i64,
    /// Units booked in all (paid, confirmed, held, and those given back).
    pub units_booked: i64,
    /// From the storm's start to the last booking of its products.
    pub last_sale_seconds: Option<f64>,
}

/// The buyers who pay, fed with the storm's `202`s as they come.
pub struct Payer {
    accepted: mpsc::UnboundedSender<(String, String)>,
    task: tokio::task::JoinHandle<(u64, u64)>,
}

impl Payer {
    pub fn start(target: BuyTarget, checkout: Checkout, seed: u64) -> Self {
        let (accepted, mut orders) = mpsc::unbounded_channel::<(String, String)>();
        let task = tokio::spawn(async move {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
            let slots = Arc::new(Semaphore::new(PAYING));
            let ok = Arc::new(AtomicU64::new(0));
            let late = Arc::new(AtomicU64::new(0));
            let mut paying = JoinSet::new();
            while let Some((key, buyer)) = orders.recv().await {
                if rng.random::<f64>() >= checkout.pay_ratio {
                    continue;
                }
                let (target, slots, ok, late) =
                    (target.clone(), slots.clone(), ok.clone(), late.clone());
                paying.spawn(async move {
                    let Ok(_slot) = slots.acquire_owned().await else {
                        return;
                    };
                    if !held(&target, &key, &buyer).await {
                        return;
                    }
                    tokio::time::sleep(checkout.pay_delay).await;
                    match target.pay(&key, &buyer).await {
                        Some(200) => ok.fetch_add(1, Ordering::Relaxed),
                        Some(409) => late.fetch_add(1, Ordering::Relaxed),
                        _ => 0,
                    };
                });
            }
            while paying.join_next().await.is_some() {}
            (ok.load(Ordering::Relaxed), late.load(Ordering::Relaxed))
        });
        Self { accepted, task }
    }

    /// An order answered `202`, bought as `buyer`.
    pub fn accepted(&self, key: &str, buyer: &str) {
        let _ = self.accepted.send((key.to_owned(), buyer.to_owned()));
    }

    /// Waits for the buyers still paying: (pays answered 200, answered 409).
    pub async fn finish(self) -> (u64, u64) {
        drop(self.accepted);
        self.task.await.unwrap_or_default()
    }
}

/// Waits until the order is booked; whether it is held.
async fn held(target: &BuyTarget, key: &str, buyer: &str) -> bool {
    let started = Instant::now();
    while started.elapsed() < LOOK_FOR {
        match target.order_status(key, buyer).await.as_deref() {
            Some("held") => return true,
            Some("queued") | None => tokio::time::sleep(LOOK_EVERY).await,
            Some(_) => return false,
        }
    }
    false
}

/// After the drain: waits (up to `limit`) until none of `accepted` is held,
/// then sums up how their holds ended and how many units sold twice.
pub async fn summarize(
    ledger: &dyn Ledger,
    checkout: Checkout,
    started_at: chrono::DateTime<chrono::Utc>,
    pays: (u64, u64),
    accepted: &[String],
    products: &[i64],
    limit: Duration,
) -> Result<CheckoutSummary, LedgerError> {
    let started = Instant::now();
    loop {
        let orders = ledger.orders(accepted).await?;
        let held = orders.iter().any(|o| o.status == OrderStatus::Held);
        if !held || started.elapsed() >= limit {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let ids: Vec<ProductId> = products
        .iter()
        .filter_map(|&p| ProductId::new(p).ok())
        .collect();
    let orders = ledger.orders_of(&ids).await?;
    let stormed: Vec<ProductRecord> = ledger
        .products()
        .await?
        .into_iter()
        .filter(|p| products.contains(&p.id.get()))
        .collect();
    Ok(tally(
        checkout, started_at, pays, accepted, &orders, &stormed,
    ))
}

/// How the holds of the `accepted` orders ended, from the stormed
/// `products` and all their `orders` (any ledger's).
pub fn tally(
    checkout: Checkout,
    started_at: chrono::DateTime<chrono::Utc>,
    pays: (u64, u64),
    accepted: &[String],
    orders: &[OrderView],
    products: &[ProductRecord],
) -> CheckoutSummary {
    let accepted: HashSet<&str> = accepted.iter().map(String::as_str).collect();
    let mut summary = CheckoutSummary {
        pay_ratio: checkout.pay_ratio,
        pay_delay_seconds: checkout.pay_delay.as_secs_f64(),
        pays_accepted: pays.0,
        pays_too_late: pays.1,
        ..CheckoutSummary::default()
    };
    let mut booked: HashMap<i64, i64> = HashMap::new();
    let mut last = None;
    for o in orders {
        if o.status != OrderStatus::Rejected {
            *booked.entry(o.product_id).or_insert(0) += o.quantity;
            last = last.max(o.processed_at);
        }
        if !accepted.contains(o.order_id.as_str()) {
            continue;
        }
        match o.status {
            OrderStatus::Paid => summary.paid += 1,
            OrderStatus::Cancelled => summary.cancelled += 1,
            OrderStatus::Expired => summary.expired += 1,
            OrderStatus::Held => summary.held += 1,
            _ => {}
        }
        if matches!(o.status, OrderStatus::Cancelled | OrderStatus::Expired) {
            summary.units_returned += o.quantity;
        }
    }
    for p in products {
        let units = booked.get(&p.id.get()).copied().unwrap_or(0);
        summary.units_booked += units;
        summary.units_sold_again += (units - i64::from(p.seeded_stock)).max(0);
    }
    summary.last_sale_seconds = last.map(|at| (at - started_at).as_seconds_f64());
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(key: &str, status: OrderStatus, at: i64) -> OrderView {
        let t0 = chrono::DateTime::<chrono::Utc>::from_timestamp(1_000, 0).expect("time");
        OrderView {
            order_id: key.into(),
            user_id: "u".into(),
            product_id: 1,
            quantity: 1,
            status,
            reason: None,
            accepted_at: t0,
            processed_at: Some(t0 + chrono::Duration::seconds(at)),
            held_until: None,
            settled_at: None,
        }
    }

    #[test]
    fn a_tally_counts_how_holds_ended_and_what_sold_twice() {
        let product = ProductRecord {
            id: ProductId::new(1).expect("a product id"),
            name: "p".into(),
            stock: 0,
            seeded_stock: 3,
            max_per_order: 1,
            per_user_limit: None,
            hold_seconds: Some(5),
            lock_fence: 0,
        };
        let orders = [
            order("a", OrderStatus::Paid, 1),
            order("b", OrderStatus::Expired, 1),
            order("c", OrderStatus::Cancelled, 2),
            order("d", OrderStatus::Paid, 7),
            order("e", OrderStatus::Held, 9),
            order("f", OrderStatus::Rejected, 12),
            // Not this storm's, but its product's: counts as booked.
            order("other", OrderStatus::Paid, 3),
        ];
        let accepted: Vec<String> = ["a", "b", "c", "d", "e", "f"].map(String::from).to_vec();
        let checkout = Checkout {
            pay_ratio: 0.5,
            pay_delay: Duration::from_secs(1),
        };
        let t0 = chrono::DateTime::<chrono::Utc>::from_timestamp(1_000, 0).expect("time");
        let s = tally(checkout, t0, (2, 1), &accepted, &orders, &[product]);
        assert_eq!((s.paid, s.expired, s.cancelled, s.held), (2, 1, 1, 1));
        assert_eq!((s.pays_accepted, s.pays_too_late), (2, 1));
        assert_eq!(s.units_returned, 2);
        assert_eq!(s.units_booked, 6, "every order but the rejected one");
        assert_eq!(s.units_sold_again, 3, "6 booked of 3 seeded");
        assert_eq!(
            s.last_sale_seconds,
            Some(9.0),
            "the rejected one is no sale"
        );
    }
}
