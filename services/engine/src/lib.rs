//! Flash Sale Engine core: the domain types every part shares, and one
//! module per concept, each with its networked and its in-memory
//! implementation side by side: the stock ledger (`ledger`, PostgreSQL),
//! the fenced product lock (`locks`, Redis), the order queue (`queue`,
//! RabbitMQ), the accept log (`accept_log`, Redis) and the workers'
//! heartbeats (`heartbeat`); metric names, configuration, and the audit of
//! the invariants. `seams` is the index.

pub mod accept_log;
pub mod admission;
pub mod audit;
pub mod clock;
pub mod config;
pub mod domain;
pub mod embedded;
pub mod heartbeat;
pub mod holds;
pub mod identity;
pub mod ledger;
pub mod locks;
pub mod metrics;
pub mod mutants;
pub mod order_events;
pub mod postgres;
pub mod queue;
pub mod rate_limit;
pub mod redis_conn;
pub mod scratch;
pub mod seams;
pub mod shutdown;
pub mod stock_feed;
pub mod telemetry;

pub use config::{BackendUrls, Namespace};
pub use domain::{
    IdempotencyKey, OrderBody, OrderMessage, OrderRequest, OrderStatus, OrderView, ProductId,
    Quantity, RejectReason, UserId,
};
