//! The order queue: publish with a confirm, consume with a prefetch in
//! batches, ack only what is booked, redelivery of what a consumer held when
//! it went away, dead letters. Two implementations: RabbitMQ (`rabbitmq`:
//! the queues' declaration and publishing; `publisher`: the API's
//! channel pool; `consumer`: the worker's consumer) and memory (`memory`,
//! for `fsctl demo`).

mod acks;
mod consumer;
pub mod dead_letters;
mod memory;
mod publisher;
pub mod rabbitmq;

pub use acks::{AckPlan, ChannelAcks};
pub use consumer::OrderConsumer;
pub use dead_letters::{DeadLetter, peek_dead_letters};
pub use memory::{MemoryConsumer, MemoryQueue};
pub use publisher::OrderPublisher;
pub use rabbitmq::{PartitionView, QueueView, RabbitQueue, queues};

use crate::domain::ProductId;
use crate::heartbeat::WorkerView;
use crate::seams::BackendFailed;

/// A message as a consumer sees it.
#[derive(Debug, Clone)]
pub struct Delivered {
    /// Grows with each delivery on a consumer; `ack_through` takes it.
    pub tag: u64,
    pub message_id: String,
    pub payload: Vec<u8>,
    /// Delivered before to a consumer that did not ack it.
    pub redelivered: bool,
}

/// The most deliveries one batch holds. A prefetch above it keeps
/// deliveries arriving while a batch commits, so a worker never waits on the
/// broker's round trip between an ack and the next deliveries.
pub const MAX_BATCH: usize = 500;

/// The order queue: publish with a confirm, consume with a prefetch, ack,
/// redelivery of what a consumer held when it went away, dead letters.
#[async_trait::async_trait]
pub trait OrderQueue: Send + Sync {
    /// Returns once the broker has the message durably (its confirm); it
    /// goes to `product`'s partition.
    async fn publish(
        &self,
        product: ProductId,
        message_id: &str,
        payload: &[u8],
    ) -> Result<(), BackendFailed>;
    /// A consumer holding at most `prefetch` unacknowledged messages, handed
    /// out in batches of at most [`MAX_BATCH`].
    async fn consume(&self, prefetch: u16) -> Result<Box<dyn QueueConsumer>, BackendFailed>;
    /// The dead-letter queue's messages: `(message id, reason)`.
    async fn dead_letters(&self) -> Result<Vec<(String, Option<String>)>, BackendFailed>;
    /// Whether the queue can take a publish now (for `/health/ready`).
    async fn probe(&self) -> crate::seams::Probe;
}

/// One consumer of the order queue.
#[async_trait::async_trait]
pub trait QueueConsumer: Send + Sync {
    /// Waits for a message, then takes every one already there (at most
    /// [`MAX_BATCH`], and within the prefetch). `None` when the consumer ended.
    async fn next_batch(&mut self) -> Result<Option<Vec<Delivered>>, BackendFailed>;
    /// Acknowledges every delivery up to and including `tag`.
    async fn ack_through(&mut self, tag: u64) -> Result<(), BackendFailed>;
    /// Moves one delivery to the dead-letter queue with `reason`.
    async fn dead_letter(
        &mut self,
        delivery: &Delivered,
        reason: &str,
    ) -> Result<(), BackendFailed>;
    /// Stops new deliveries; those already sent can still be taken.
    async fn cancel(&mut self);
    /// Records the queues' depth and consumers as metrics (where it can).
    async fn record_stats(&self) {}
    /// A flag set while the consumer waits with nothing in its prefetch
    /// buffer (`None`: it has no buffer of its own).
    fn waiting(&self) -> Option<std::sync::Arc<std::sync::atomic::AtomicBool>> {
        None
    }
    /// Goes away; what it held unacknowledged is delivered again.
    async fn close(self: Box<Self>);
}

/// How long after a first drained look to look again before calling the
/// queue drained: a heartbeat is up to a second old, and a delivery sent
/// just after it shows in the next one.
pub const DRAIN_CONFIRM: std::time::Duration = std::time::Duration::from_millis(1200);

/// Drained: no ready order messages and no live worker holding a delivery
/// (in hand, or possibly in its prefetch buffer).
pub fn is_drained(queues: &QueueView, workers: &[WorkerView]) -> bool {
    queues.orders_ready == 0 && held_by_workers(workers) == 0
}

/// Deliveries the live workers hold now.
pub fn held_by_workers(workers: &[WorkerView]) -> u64 {
    workers.iter().filter(|w| w.alive).map(|w| w.inflight).sum()
}
