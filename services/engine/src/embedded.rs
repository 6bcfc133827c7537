//! Every in-memory backend of one process, for `fsctl demo`: the same seams
//! as PostgreSQL, Redis and RabbitMQ ([`crate::seams`]), the same booking
//! rules, nothing installed. The API and the workers of the process share
//! them.

use crate::accept_log::{AcceptStore, MemoryAcceptLog};
use crate::ledger::MemoryLedger;
use crate::locks::MemoryLocks;
use crate::order_events::OrderEvents;
use crate::queue::{MemoryQueue, OrderQueue};
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

/// The order queue and the accept log as an API or a worker on the
/// embedded backends reaches them: the backends themselves, or wrappers
/// that inject faults (the simulator's, `fsctl demo --chaos`'s).
#[derive(Clone)]
pub struct Reach {
    pub queue: Arc<dyn OrderQueue>,
    pub accept_log: Arc<dyn AcceptStore>,
}

impl EmbeddedBackends {
    /// The backends themselves, no wrapper.
    pub fn reach(&self) -> Reach {
        Reach {
            queue: Arc::new(self.queue.clone()),
            accept_log: self.accept_log.clone(),
        }
    }
}
