//! Every in-memory backend of one process, for `fsctl demo`: the same seams
//! as PostgreSQL, Redis and RabbitMQ ([`crate::seams`]), the same booking
//! rules, nothing installed. The API and the workers of the process share
//! them.

use crate::accept_log::MemoryAcceptLog;
use crate::ledger::MemoryLedger;
use crate::locks::MemoryLocks;
use crate::order_events::OrderEvents;
use crate::queue::MemoryQueue;
use std::sync::Arc;

/// Every embedded backend of one process.
#[derive(Clone)]
pub struct EmbeddedBackends {
    pub ledger: Arc<MemoryLedger>,
    pub locks: MemoryLocks,
    pub queue: MemoryQueue,
    pub accept_log: Arc<MemoryAcceptLog>,
    /// Order changes, for the API's event streams.
    pub events: OrderEvents,
}

impl Default for EmbeddedBackends {
    fn default() -> Self {
        Self {
            ledger: Arc::default(),
            locks: MemoryLocks::new("embedded"),
            queue: MemoryQueue::new(),
            accept_log: Arc::default(),
            events: OrderEvents::memory(),
        }
    }
}
