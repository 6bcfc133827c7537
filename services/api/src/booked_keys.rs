//! Whether a key already has an order row in the ledger (contract v4, "A
//! key is the truth, even after Redis forgets it"). Every buy whose
//! client-sent key the accept log did not know asks before it publishes;
//! the asks that arrive together share one query (`= ANY($1)`), so under
//! load a look-up costs PostgreSQL a share of one statement, not one each.

use flashsale_engine::OrderView;
use flashsale_engine::ledger::{Ledger, LedgerError};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Keys one query asks about at most.
const BATCH: usize = 256;
/// Queries in flight at once: while one runs the next asks gather, so
/// under load a query answers many (the rest of the pool serves the rest).
const QUERIES: usize = 1;
/// A look-up gives up after this long.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// What the ledger said of one key: its row, if any; `Err` when it did not
/// answer.
pub type Found = Result<Option<OrderView>, Unanswered>;

/// Why a key's look-up has no answer (shared by every ask of its batch).
#[derive(Debug, Clone, thiserror::Error)]
pub enum Unanswered {
    #[error("the ledger failed")]
    Ledger(#[source] Arc<LedgerError>),
    #[error("PostgreSQL did not answer within {0:?}")]
    TimedOut(Duration),
    /// The look-up task is gone (the process is stopping).
    #[error("the key look-up has stopped")]
    Stopped,
}

struct Ask {
    key: String,
    reply: oneshot::Sender<Found>,
}

/// The batching look-up; cheap to clone. Its task ends when the last
/// clone is dropped.
#[derive(Clone)]
pub struct BookedKeys {
    asks: mpsc::UnboundedSender<Ask>,
}

impl BookedKeys {
    pub fn start(ledger: Arc<dyn Ledger>) -> Self {
        let (asks, received) = mpsc::unbounded_channel();
        tokio::spawn(serve(ledger, received));
        Self { asks }
    }

    /// The key's order row, if it has one.
    pub async fn row(&self, key: &str) -> Found {
        let (reply, answer) = oneshot::channel();
        let ask = Ask {
            key: key.to_owned(),
            reply,
        };
        if self.asks.send(ask).is_err() {
            return Err(Unanswered::Stopped);
        }
        answer.await.unwrap_or(Err(Unanswered::Stopped))
    }
}

/// Takes the asks waiting, up to [`BATCH`], and answers them with one query.
async fn serve(ledger: Arc<dyn Ledger>, mut received: mpsc::UnboundedReceiver<Ask>) {
    let queries = Arc::new(Semaphore::new(QUERIES));
    while let Some(first) = received.recv().await {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match received.try_recv() {
                Ok(ask) => batch.push(ask),
                Err(_) => break,
            }
        }
        let Ok(permit) = Arc::clone(&queries).acquire_owned().await else {
            return;
        };
        let ledger = Arc::clone(&ledger);
        tokio::spawn(async move {
            answer(ledger.as_ref(), batch).await;
            drop(permit);
        });
    }
}

async fn answer(ledger: &dyn Ledger, batch: Vec<Ask>) {
    let keys: Vec<String> = batch.iter().map(|a| a.key.clone()).collect();
    let found = match tokio::time::timeout(LOOKUP_TIMEOUT, ledger.orders(&keys)).await {
        Ok(Ok(rows)) => Ok(rows
            .into_iter()
            .map(|row| (row.order_id.clone(), row))
            .collect::<HashMap<_, _>>()),
        Ok(Err(e)) => Err(Unanswered::Ledger(Arc::new(e))),
        Err(_) => Err(Unanswered::TimedOut(LOOKUP_TIMEOUT)),
    };
    for ask in batch {
        let reply = match &found {
            Ok(rows) => Ok(rows.get(&ask.key).cloned()),
            Err(e) => Err(e.clone()),
        };
        let _ = ask.reply.send(reply);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use flashsale_engine::ledger::MemoryLedger;

    #[tokio::test]
    async fn concurrent_asks_are_answered_each_with_its_own_row() {
        let ledger = Arc::new(MemoryLedger::new());
        let keys = BookedKeys::start(ledger);
        let asks: Vec<_> = (0..600)
            .map(|i| {
                let keys = keys.clone();
                tokio::spawn(async move { keys.row(&format!("k{i}")).await })
            })
            .collect();
        for ask in asks {
            assert!(matches!(ask.await.unwrap(), Ok(None)));
        }
    }
}
