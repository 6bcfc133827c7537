//! The seams between the order logic and its backends. Each is one concept,
//! one module, holding its trait, its types and both of its real
//! implementations side by side: the networked one (PostgreSQL, Redis,
//! RabbitMQ) and the in-memory one that `fsctl demo` runs on.
//!
//! - [`crate::ledger`]: products, orders, the fenced group apply
//!   (`Ledger`: `StockLedger`, `MemoryLedger`); the booking rules live once,
//!   in [`crate::ledger::decide`].
//! - [`crate::locks`]: the per-product lock and its fencing counter
//!   (`ProductLocks`: `ProductLock`, `MemoryLocks`).
//! - [`crate::queue`]: the order queue (`OrderQueue`, `QueueConsumer`:
//!   `RabbitQueue`, `MemoryQueue`).
//! - [`crate::accept_log`]: which keys were claimed or accepted, and
//!   [`crate::admission`]'s counters, in one store (`AcceptLog` and
//!   `AdmissionCounters`, together `AcceptStore`: `RedisAcceptLog`,
//!   `MemoryAcceptLog`).
//!
//! One conformance suite (`services/engine/tests/it/conformance.rs`) runs
//! against both implementations of each, so they cannot drift.

/// A backend failed: a passing fault; retry later. Each variant names the
/// backend and keeps its cause as the error's `source`.
#[derive(Debug, thiserror::Error)]
pub enum BackendFailed {
    /// Redis failed or did not answer in time.
    #[error("Redis: {0}")]
    Redis(#[source] redis::RedisError),
    /// RabbitMQ failed, refused, or did not answer in time.
    #[error("RabbitMQ: {0}")]
    RabbitMq(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A call this handle cannot serve, or a value it cannot carry: a bug
    /// in the caller, not a passing fault.
    #[error("{0}")]
    Misuse(String),
}

impl BackendFailed {
    pub fn redis(e: redis::RedisError) -> Self {
        Self::Redis(e)
    }

    pub fn rabbitmq(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::RabbitMq(Box::new(e))
    }

    /// RabbitMQ did not answer `what` within `after`.
    pub fn rabbitmq_timeout(what: &str, after: std::time::Duration) -> Self {
        Self::rabbitmq(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer to {what} within {after:?}"),
        ))
    }
}

/// What a seam's health probe found: the component it asked and whether it
/// answered (`/health/ready` reports each).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub component: &'static str,
    pub outcome: Result<(), String>,
}

impl Probe {
    /// The component answered.
    pub fn ok(component: &'static str) -> Self {
        Self {
            component,
            outcome: Ok(()),
        }
    }
}

/// How long a health probe waits for its component.
pub const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);
