//! `fsctl demo` after its storm: the drain, the audit of the embedded
//! ledger, and a checkout's holds.

use super::DRAIN_TIMEOUT;
use crate::output;
use crate::storm::report::{Drain, StormReport, VerifySummary};
use crate::storm::{self, StormPlan};
use flashsale_engine::embedded::EmbeddedBackends;
use flashsale_engine::ledger::Ledger;
use flashsale_engine::queue::OrderQueue;
use std::collections::HashSet;
use std::time::{Duration, Instant};

/// Waits for every accepted order to be booked or dead-lettered, then
/// audits the embedded ledger with exactly those ids.
pub(super) async fn drain_and_audit(
    backends: &EmbeddedBackends,
    report: &mut StormReport,
    show: bool,
) {
    let bar = output::spinner(show);
    let started = Instant::now();
    let accepted = report.accepted.clone();
    let mut dead: HashSet<String> = HashSet::new();
    let mut drained = false;
    while started.elapsed() < DRAIN_TIMEOUT {
        dead = backends
            .queue
            .dead_letters()
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        let mut missing = 0;
        for id in &accepted {
            if !dead.contains(id) && backends.ledger.order(id).await.ok().flatten().is_none() {
                missing += 1;
            }
        }
        let (ready, held) = backends.queue.depth();
        bar.set_message(format!(
            "drain: {} of {} accepted orders resolved",
            accepted.len() - missing,
            accepted.len()
        ));
        // Nothing waits or is held: what is still missing is lost.
        if missing == 0 || (ready == 0 && held == 0) {
            drained = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bar.finish_and_clear();
    let audit = backends.ledger.audit(&accepted, &dead, drained);
    let (mut confirmed, mut rejected) = (0, 0);
    for id in &accepted {
        if let Ok(Some(order)) = backends.ledger.order(id).await {
            // Booked: confirmed, or held and then paid, cancelled or expired.
            match order.status {
                flashsale_engine::OrderStatus::Rejected => rejected += 1,
                _ => confirmed += 1,
            }
        }
    }
    report.drain = Some(Drain {
        seconds: started.elapsed().as_secs_f64(),
        resolved: accepted.len() - audit.pending - audit.lost,
        pending: audit.pending,
        lost: audit.lost,
        confirmed,
        rejected,
        source: "embedded",
    });
    report.verify = Some(VerifySummary {
        ok: audit.ok,
        violations: audit.violations.clone(),
        invariants_checked: true,
    });
    report.books = Some(audit.products.clone());
    report.audit = Some(audit);
}

/// With `--pay-ratio` (a checkout scenario): waits until the storm's holds
/// have ended, then sums them up from the embedded ledger.
pub(super) async fn checkout_summary(
    backends: &EmbeddedBackends,
    plan: &StormPlan,
    checkout: storm::checkout::Checkout,
    report: &StormReport,
) -> storm::checkout::CheckoutSummary {
    let accepted: HashSet<&str> = report.accepted.iter().map(String::as_str).collect();
    let started = Instant::now();
    loop {
        let (_, orders) = backends.ledger.snapshot();
        let held = orders.iter().any(|o| {
            o.status == flashsale_engine::OrderStatus::Held
                && accepted.contains(o.order_id.as_str())
        });
        if !held || started.elapsed() >= DRAIN_TIMEOUT {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (products, orders) = backends.ledger.snapshot();
    let stormed: Vec<_> = products
        .into_iter()
        .filter(|p| plan.mix.products.contains(&p.id))
        .collect();
    storm::checkout::tally(
        checkout,
        report.started_at,
        report.pays,
        &report.accepted,
        &orders,
        &stormed,
    )
}
