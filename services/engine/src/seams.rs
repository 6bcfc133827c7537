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
//! - [`crate::accept_log`]: which keys were claimed or accepted
//!   (`AcceptStore`: `AcceptLog`, `MemoryAcceptLog`).
//!
//! One conformance suite (`services/engine/tests/conformance.rs`) runs
//! against both implementations of each, so they cannot drift.

/// A backend failed: a passing fault, retry later (the message names the
/// backend and what it was doing).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BackendFailed(pub String);

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

impl BackendFailed {
    pub fn redis(e: redis::RedisError) -> Self {
        Self(format!("Redis: {e}"))
    }

    pub fn rabbitmq(e: impl std::fmt::Display) -> Self {
        Self(format!("RabbitMQ: {e}"))
    }
}
