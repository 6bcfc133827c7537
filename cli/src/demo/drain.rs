//! `fsctl demo` after its storm: the drain, the audit of the embedded
//! ledger, and a checkout's holds.

use super::DRAIN_TIMEOUT;
use crate::exit::Failure;
use crate::output;
use crate::storm::drain::{Drain, QueueWatch};
use crate::storm::report::StormReport;
use crate::storm::{self, StormPlan};
use flashsale_engine::audit::QueueFacts;
use flashsale_engine::embedded::EmbeddedBackends;
use flashsale_engine::queue::OrderQueue;
use std::time::Duration;

/// The embedded queue: drained when nothing waits or is held.
struct EmbeddedQueue<'a>(&'a EmbeddedBackends);

#[async_trait::async_trait]
impl QueueWatch for EmbeddedQueue<'_> {
    async fn facts(&self) -> QueueFacts {
        let (ready, held) = self.0.queue.depth();
        let dead = self.0.queue.dead_letters().await.unwrap_or_default();
        QueueFacts {
            drained: ready == 0 && held == 0,
            ..QueueFacts::drained_with(dead.into_iter().map(|(id, _)| id).collect())
        }
    }
}

/// Waits for every accepted order to be booked or dead-lettered, then
/// audits the embedded ledger with exactly those ids.
pub(super) async fn drain_and_audit(
    backends: &EmbeddedBackends,
    report: &mut StormReport,
    show: bool,
) -> Result<(), Failure> {
    let bar = output::spinner(show);
    let queue = EmbeddedQueue(backends);
    let drain =
        Drain::new(&*backends.ledger, &queue, "embedded").polling_every(Duration::from_millis(20));
    let outcome = drain
        .then_audit(&report.accepted, DRAIN_TIMEOUT, &bar)
        .await;
    bar.finish_and_clear();
    let outcome = outcome?;
    report.drain = Some(outcome.drain);
    report.verify = Some(outcome.verify);
    report.books = outcome.audit.as_ref().map(|a| a.products.clone());
    report.audit = outcome.audit;
    Ok(())
}

/// With `--pay-ratio` (a checkout scenario): waits until the storm's holds
/// have ended, then sums them up from the embedded ledger.
pub(super) async fn checkout_summary(
    backends: &EmbeddedBackends,
    plan: &StormPlan,
    checkout: storm::checkout::Checkout,
    report: &StormReport,
) -> Result<storm::checkout::CheckoutSummary, Failure> {
    Ok(storm::checkout::summarize(
        &*backends.ledger,
        checkout,
        report.started_at,
        report.pays,
        &report.accepted,
        &plan.mix.products,
        DRAIN_TIMEOUT,
    )
    .await?)
}
