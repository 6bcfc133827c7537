//! Flash Sale Engine core: the domain types every part shares, the stock
//! ledger in PostgreSQL, the fenced product lock and the accept log in Redis,
//! the order queue in RabbitMQ, metric names and configuration; the seams
//! with two implementations, and the in-memory (embedded) one.

pub mod accept_log;
pub mod audit;
pub mod config;
pub mod domain;
pub mod embedded;
pub mod heartbeat;
pub mod ledger;
pub mod locks;
pub mod metrics;
pub mod postgres;
pub mod queue;
pub mod redis_conn;
pub mod scratch;
pub mod seams;
pub mod shutdown;
pub mod stock_feed;
pub mod telemetry;

pub use config::{BackendUrls, Namespace};
pub use domain::{
    IdempotencyKey, OrderMessage, OrderRequest, OrderStatus, OrderView, ProductId, Quantity,
    RejectReason, UserId,
};
