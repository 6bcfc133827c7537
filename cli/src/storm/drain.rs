//! After the storm: wait for every `202` to reach a final state, then run
//! `fsctl verify`'s checks with exactly the storm's accepted ids (invariant
//! 4). Reads the ledger (PostgreSQL, or `fsctl demo`'s embedded one); when
//! no database is reachable, asks the API (`GET /orders/{id}`, where a 404
//! is pending while the queue drains).

use super::report::{self, VerifySummary};
use crate::backends;
use crate::exit::Failure;
use crate::verify;
use flashsale_engine::BackendUrls;
use flashsale_engine::audit::{AuditReport, QueueFacts};
use flashsale_engine::ledger::{Ledger, LedgerError};
use futures_util::{StreamExt, stream};
use indicatif::ProgressBar;
use std::time::{Duration, Instant};

/// How long to try PostgreSQL before asking the API instead.
const DATABASE_PROBE: Duration = Duration::from_secs(5);
/// Order lookups in flight at once over HTTP.
const HTTP_LOOKUPS: usize = 32;

/// The drain and the checks after it.
pub struct DrainOutcome {
    pub drain: report::Drain,
    pub verify: VerifySummary,
    /// The full audit, when PostgreSQL was reachable.
    pub audit: Option<AuditReport>,
}

/// Waits up to `timeout` for the `accepted` orders to resolve, then checks.
pub async fn drain_and_verify(
    backends: &BackendUrls,
    api_url: &str,
    client: &reqwest::Client,
    accepted: &[String],
    timeout: Duration,
    show: bool,
) -> Result<DrainOutcome, Failure> {
    let bar = crate::output::spinner(show);
    let settled = match tokio::time::timeout(DATABASE_PROBE, backends::ledger(backends)).await {
        Ok(Ok(ledger)) => {
            let rabbitmq = RabbitMq(backends);
            let drain = Drain::new(&ledger, &rabbitmq, "postgresql");
            Ok(drain.then_audit(accepted, timeout, &bar).await?)
        }
        _ => Ok(over_http(api_url, client, accepted, timeout, &bar).await),
    };
    bar.finish_and_clear();
    settled
}

/// What a drain watches beside the ledger: the queue of the same engine.
#[async_trait::async_trait]
pub trait QueueWatch: Sync {
    /// The queue at one look: drained or not, and its dead letters.
    async fn facts(&self) -> QueueFacts;
    /// Whether nothing is left in flight, for sure.
    async fn drained(&self) -> bool {
        self.facts().await.drained
    }
}

/// The RabbitMQ queues and the workers' heartbeats.
struct RabbitMq<'a>(&'a BackendUrls);

#[async_trait::async_trait]
impl QueueWatch for RabbitMq<'_> {
    async fn facts(&self) -> QueueFacts {
        verify::queue_facts(self.0).await.unwrap_or_default()
    }

    /// Drained at two looks [`DRAIN_CONFIRM`](flashsale_engine::queue::DRAIN_CONFIRM)
    /// apart: a delivery sent to a worker just after its last heartbeat
    /// shows in its next one.
    async fn drained(&self) -> bool {
        self.facts().await.drained && {
            tokio::time::sleep(flashsale_engine::queue::DRAIN_CONFIRM).await;
            self.facts().await.drained
        }
    }
}

/// The wait for a storm's accepted orders, over one engine's ledger and
/// queue (PostgreSQL and RabbitMQ for `fsctl storm`, the embedded ones for
/// `fsctl demo`), then the audit with exactly those ids (invariant 4).
pub struct Drain<'a> {
    ledger: &'a dyn Ledger,
    queue: &'a dyn QueueWatch,
    /// How often the ledger is asked; the queue, five times slower.
    poll: Duration,
    source: &'static str,
}

impl<'a> Drain<'a> {
    pub fn new(ledger: &'a dyn Ledger, queue: &'a dyn QueueWatch, source: &'static str) -> Self {
        Self {
            ledger,
            queue,
            poll: Duration::from_millis(200),
            source,
        }
    }

    /// Asks the ledger every `poll` (200 ms unless told).
    pub fn polling_every(self, poll: Duration) -> Self {
        Self { poll, ..self }
    }

    /// Waits up to `timeout` for every order of `accepted` to have its row
    /// (or for the queue to hold nothing more: a missing order is then
    /// dead-lettered or lost), then audits.
    pub async fn then_audit(
        &self,
        accepted: &[String],
        timeout: Duration,
        bar: &ProgressBar,
    ) -> Result<DrainOutcome, LedgerError> {
        let started = Instant::now();
        for round in 0u32.. {
            let (confirmed, rejected) = self.ledger.outcomes(accepted).await?;
            let resolved = confirmed + rejected;
            bar.set_message(format!(
                "drain: {resolved} of {} accepted orders resolved ({:.1}s)",
                accepted.len(),
                started.elapsed().as_secs_f64()
            ));
            if resolved >= accepted.len() || started.elapsed() >= timeout {
                break;
            }
            if round % 5 == 4 && self.queue.drained().await {
                break;
            }
            tokio::time::sleep(self.poll).await;
        }
        let seconds = started.elapsed().as_secs_f64();
        let facts = self.queue.facts().await;
        let report = self.ledger.audit(Some(accepted), &facts).await?;
        let (confirmed, rejected) = self.ledger.outcomes(accepted).await?;
        Ok(DrainOutcome {
            drain: report::Drain {
                seconds,
                resolved: accepted.len() - report.pending - report.lost,
                pending: report.pending,
                lost: report.lost,
                confirmed,
                rejected,
                source: self.source,
            },
            verify: VerifySummary {
                ok: report.ok,
                violations: report.violations.clone(),
                invariants_checked: true,
            },
            audit: Some(report),
        })
    }
}

/// An order's state over HTTP: `Some(true)` confirmed, `Some(false)`
/// rejected, `None` still pending (queued, 404 while draining, or no answer).
async fn order_state(client: &reqwest::Client, api_url: &str, id: &str) -> Option<bool> {
    #[derive(serde::Deserialize)]
    struct Order {
        status: String,
    }
    let url = format!("{}/orders/{id}", api_url.trim_end_matches('/'));
    let response = client.get(url).send().await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    match response.json::<Order>().await.ok()?.status.as_str() {
        "confirmed" => Some(true),
        "rejected" => Some(false),
        _ => None,
    }
}

async fn over_http(
    api_url: &str,
    client: &reqwest::Client,
    accepted: &[String],
    timeout: Duration,
    bar: &ProgressBar,
) -> DrainOutcome {
    let started = Instant::now();
    let mut unresolved = accepted.to_vec();
    let (mut confirmed, mut rejected) = (0, 0);
    loop {
        let states: Vec<(String, Option<bool>)> = stream::iter(unresolved)
            .map(|id| async move {
                let state = order_state(client, api_url, &id).await;
                (id, state)
            })
            .buffer_unordered(HTTP_LOOKUPS)
            .collect()
            .await;
        unresolved = Vec::new();
        for (id, state) in states {
            match state {
                Some(true) => confirmed += 1,
                Some(false) => rejected += 1,
                None => unresolved.push(id),
            }
        }
        bar.set_message(format!(
            "drain (over HTTP): {} of {} accepted orders resolved ({:.1}s)",
            confirmed + rejected,
            accepted.len(),
            started.elapsed().as_secs_f64()
        ));
        if unresolved.is_empty() || started.elapsed() >= timeout {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    DrainOutcome {
        drain: report::Drain {
            seconds: started.elapsed().as_secs_f64(),
            resolved: confirmed + rejected,
            pending: unresolved.len(),
            lost: 0,
            confirmed,
            rejected,
            source: "http",
        },
        verify: VerifySummary {
            ok: true,
            violations: Vec::new(),
            invariants_checked: false,
        },
        audit: None,
    }
}
