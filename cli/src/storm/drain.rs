//! After the storm: wait for every `202` to reach a final state, then run
//! `fsctl verify`'s checks with exactly the storm's accepted ids (invariant
//! 4). Reads PostgreSQL; when no database is reachable, asks the API
//! (`GET /orders/{id}`, where a 404 is pending while the queue drains).

use super::report::{Drain, VerifySummary};
use crate::backends;
use crate::exit::Failure;
use crate::verify;
use flashsale_engine::BackendUrls;
use flashsale_engine::audit::{self, AuditReport};
use flashsale_engine::ledger::StockLedger;
use futures_util::{StreamExt, stream};
use indicatif::ProgressBar;
use std::time::{Duration, Instant};

/// How long to try PostgreSQL before asking the API instead.
const DATABASE_PROBE: Duration = Duration::from_secs(5);
/// Order lookups in flight at once over HTTP.
const HTTP_LOOKUPS: usize = 32;

/// The drain and the checks after it.
pub struct DrainOutcome {
    pub drain: Drain,
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
        Ok(Ok(ledger)) => through_postgres(backends, &ledger, accepted, timeout, &bar).await,
        _ => Ok(over_http(api_url, client, accepted, timeout, &bar).await),
    };
    bar.finish_and_clear();
    settled
}

async fn through_postgres(
    backends: &BackendUrls,
    ledger: &StockLedger,
    accepted: &[String],
    timeout: Duration,
    bar: &ProgressBar,
) -> Result<DrainOutcome, Failure> {
    let started = Instant::now();
    for round in 0u32.. {
        let (confirmed, rejected) = ledger.outcomes(accepted).await?;
        let resolved = confirmed + rejected;
        bar.set_message(format!(
            "drain: {resolved} of {} accepted orders resolved ({:.1}s)",
            accepted.len(),
            started.elapsed().as_secs_f64()
        ));
        if resolved >= accepted.len() || started.elapsed() >= timeout {
            break;
        }
        // Once nothing is in flight, a missing order is dead-lettered or lost.
        if round % 5 == 4 && queue_drained(backends).await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let facts = verify::queue_facts(backends).await.unwrap_or_default();
    let report = audit::audit(ledger.pool(), Some(accepted), &facts).await?;
    let (confirmed, rejected) = ledger.outcomes(accepted).await?;
    Ok(DrainOutcome {
        drain: Drain {
            seconds,
            resolved: accepted.len() - report.pending - report.lost,
            pending: report.pending,
            lost: report.lost,
            confirmed,
            rejected,
            source: "postgresql",
        },
        verify: VerifySummary {
            ok: report.ok,
            violations: report.violations.clone(),
            invariants_checked: true,
        },
        audit: Some(report),
    })
}

/// Drained at two looks [`DRAIN_CONFIRM`](flashsale_engine::queue::DRAIN_CONFIRM)
/// apart: a delivery sent to a worker just after its last heartbeat shows
/// in its next one.
async fn queue_drained(backends: &BackendUrls) -> bool {
    let drained = || async {
        verify::queue_facts(backends)
            .await
            .is_ok_and(|facts| facts.drained)
    };
    drained().await && {
        tokio::time::sleep(flashsale_engine::queue::DRAIN_CONFIRM).await;
        drained().await
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
        drain: Drain {
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
