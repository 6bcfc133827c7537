//! Holds: the workers' sweep of holds past their expiry. Each sweep is one
//! ledger call (in PostgreSQL one statement: the due rows `FOR UPDATE SKIP
//! LOCKED`, their expiry, their units back on the stock), so several
//! workers sweep side by side without expiring an order twice, and a pay
//! racing the sweep is decided by the row lock: exactly one of them changes
//! the `held` row. Returned units are announced to the APIs' catalogs and
//! put back in the admission counter ([`units_back`]), and the expired
//! orders to their event streams.

use crate::accept_log::AcceptStore;
use crate::domain::ProductId;
use crate::ledger::{Ledger, LedgerError};
use crate::metrics::{HOLD_OUTCOMES, HOLDS, HOLDS_OVERDUE};
use crate::order_events::OrderEvents;
use crate::stock_feed::StockFeed;
use std::collections::HashSet;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often the workers look for expired holds: units come back within
/// this (plus the sweep's own time) of `heldUntil`.
pub const SWEEP_EVERY: Duration = Duration::from_millis(250);
/// Holds expired by one ledger call at most.
pub const SWEEP_BATCH: usize = 1000;
/// How often `flashsale_holds` is refreshed.
const GAUGE_EVERY: Duration = Duration::from_secs(1);

/// Expires every hold past its expiry; returns how many.
pub async fn sweep(
    ledger: &dyn Ledger,
    admission: &dyn AcceptStore,
    feed: Option<&StockFeed>,
    events: &OrderEvents,
) -> Result<usize, LedgerError> {
    let mut total = 0;
    loop {
        let expired = ledger.expire_holds(SWEEP_BATCH).await?;
        let n: usize = expired.iter().map(|e| e.orders.len()).sum();
        metrics::counter!(HOLD_OUTCOMES, "outcome" => "expired").increment(n as u64);
        for e in &expired {
            tracing::debug!(
                product = e.product_id.get(),
                orders = e.orders.len(),
                units = e.units,
                "holds expired; units back on sale"
            );
            if let Some(feed) = feed {
                feed.announce(e.product_id, e.stock_after).await;
            }
            units_back(admission, ledger, e.product_id).await;
            events.announce(e.orders.iter().map(String::as_str)).await;
        }
        total += n;
        if n < SWEEP_BATCH {
            return Ok(total);
        }
    }
}

/// Units went back on a product's stock (an expiry, a cancel): its
/// admission counter is derived afresh now, not at the next
/// reconciliation, so they sell at once. Adding them to the counter could
/// count them twice (a reconciliation may have seen them already); a
/// derivation is compare-and-set. Skipped mid-sale (too many orders in
/// flight): the reconciliation takes over.
pub async fn units_back(admission: &dyn AcceptStore, ledger: &dyn Ledger, product: ProductId) {
    if let Err(e) = crate::admission::derive(admission, ledger, product, false).await {
        tracing::debug!(error = %e, product = product.get(), "admission counter not derived after units came back");
    }
}

/// Sweeps every [`SWEEP_EVERY`] and refreshes `flashsale_holds` until `stop`.
pub async fn sweep_forever(
    ledger: std::sync::Arc<dyn Ledger>,
    admission: std::sync::Arc<dyn AcceptStore>,
    feed: Option<StockFeed>,
    events: OrderEvents,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut gauged = tokio::time::Instant::now();
    let mut shown: HashSet<i64> = HashSet::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = sweep(ledger.as_ref(), admission.as_ref(), feed.as_ref(), &events).await {
            tracing::debug!(error = %e, "holds not swept this round");
        }
        if gauged.elapsed() >= GAUGE_EVERY {
            gauged = tokio::time::Instant::now();
            if let Ok(held) = ledger.held_units().await {
                let now: HashSet<i64> = held.iter().map(|h| h.product_id).collect();
                for h in &held {
                    let product = h.product_id.to_string();
                    metrics::gauge!(HOLDS, "product_id" => product.clone()).set(h.units as f64);
                    metrics::gauge!(HOLDS_OVERDUE, "product_id" => product).set(h.overdue as f64);
                }
                for gone in shown.difference(&now) {
                    metrics::gauge!(HOLDS, "product_id" => gone.to_string()).set(0.0);
                    metrics::gauge!(HOLDS_OVERDUE, "product_id" => gone.to_string()).set(0.0);
                }
                shown = now;
            }
        }
    }
}
