//! Concurrent repeats of one `Idempotency-Key` share one wait. While the
//! key's first request is still publishing, every repeat that reaches this
//! process subscribes to one watch per key: the publish task resolves it at
//! once when the first request is in this process, and one poller per key
//! (with backoff) reads the accept log when it is in another. A thousand
//! repeats cost a thousand subscriptions, not a thousand polling loops.

use flashsale_engine::accept_log::{AcceptLog, AcceptRecord, AcceptState};
use flashsale_engine::seams::BackendFailed;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// How a pending key ended: accepted (the record), withdrawn (`None`), or
/// unknown (why).
pub type FirstOutcome = Result<Option<AcceptRecord>, Unresolved>;

/// Why the outcome of a key's first request is not known.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Unresolved {
    #[error("Redis failed while the first request with this key was awaited")]
    Redis(#[source] Arc<BackendFailed>),
    #[error("an earlier request with this key is still unconfirmed")]
    StillPending,
    /// Published, but PostgreSQL did not say whether the key was booked before.
    #[error("the ledger did not answer for this key")]
    LedgerSilent,
    /// Every sender of the wait went away without an outcome.
    #[error("the wait for the first request ended")]
    WaitEnded,
}

type Waiting = watch::Sender<Option<FirstOutcome>>;

/// The keys this process is waiting on.
#[derive(Default)]
pub struct FirstRequests {
    waits: Mutex<HashMap<String, Waiting>>,
}

const FIRST_POLL: Duration = Duration::from_millis(2);
const MAX_POLL: Duration = Duration::from_millis(50);

impl FirstRequests {
    /// Waits (at most `patience`) until the key's first request resolves.
    pub async fn wait(
        self: &Arc<Self>,
        log: Arc<dyn AcceptLog>,
        key: &str,
        patience: Duration,
    ) -> FirstOutcome {
        let mut resolved = {
            let mut waits = self.waits.lock().unwrap_or_else(|p| p.into_inner());
            match waits.get(key) {
                Some(waiting) => waiting.subscribe(),
                None => {
                    let (waiting, resolved) = watch::channel(None);
                    waits.insert(key.to_owned(), waiting.clone());
                    tokio::spawn(Arc::clone(self).poll(
                        log,
                        key.to_owned(),
                        waiting,
                        Instant::now() + patience,
                    ));
                    resolved
                }
            }
        };
        match resolved.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone().unwrap_or(Err(Unresolved::WaitEnded)),
            Err(_) => Err(Unresolved::WaitEnded),
        }
    }

    /// The key's first request, in this process, has its outcome.
    pub fn resolve(&self, key: &str, outcome: FirstOutcome) {
        let waiting = self
            .waits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
        if let Some(waiting) = waiting {
            waiting.send_replace(Some(outcome));
        }
    }

    /// The one poller of a key: reads the accept log with backoff until the
    /// record is no longer pending, the first request resolves it here, or
    /// the deadline passes.
    async fn poll(
        self: Arc<Self>,
        log: Arc<dyn AcceptLog>,
        key: String,
        waiting: Waiting,
        deadline: Instant,
    ) {
        let mut pause = FIRST_POLL;
        let outcome = loop {
            if waiting.borrow().is_some() {
                return; // resolved by the publish task
            }
            match log.get(&key).await {
                Ok(Some(record)) if record.state == AcceptState::Pending => {}
                Ok(found) => break Ok(found),
                Err(e) => break Err(Unresolved::Redis(Arc::new(e))),
            }
            if Instant::now() + pause > deadline {
                break Err(Unresolved::StillPending);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_POLL);
        };
        let mut waits = self.waits.lock().unwrap_or_else(|p| p.into_inner());
        if waits.get(&key).is_some_and(|w| w.same_channel(&waiting)) {
            waits.remove(&key);
        }
        drop(waits);
        waiting.send_replace(Some(outcome));
    }
}
