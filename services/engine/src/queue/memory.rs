//! The order queue in memory, for `fsctl demo`: the same confirm, prefetch,
//! ack-through, redelivery and dead-letter behaviour as on RabbitMQ.

use super::{Delivered, MAX_BATCH, OrderQueue, QueueConsumer};
use crate::domain::ProductId;
use crate::seams::BackendFailed;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// A message in the embedded queue.
#[derive(Debug, Clone)]
struct Message {
    id: String,
    payload: Vec<u8>,
    deliveries: u32,
}

#[derive(Debug, Default)]
struct QueueState {
    ready: std::collections::VecDeque<Message>,
    /// Consumer -> tag -> message it holds unacknowledged.
    held: HashMap<u64, BTreeMap<u64, Message>>,
    dead: Vec<(String, Option<String>)>,
    next_tag: u64,
    next_consumer: u64,
}

/// The order queue in memory: publish (the "confirm" is the push under the
/// lock), prefetch, ack, redelivery of what a consumer held when it closes
/// or is dropped, and dead letters, by hand or past the delivery limit.
#[derive(Debug, Clone, Default)]
pub struct MemoryQueue {
    state: std::sync::Arc<Mutex<QueueState>>,
    wake: std::sync::Arc<tokio::sync::Notify>,
}

impl MemoryQueue {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ready messages and deliveries held, for `fsctl top` and the drain.
    pub fn depth(&self) -> (usize, usize) {
        let s = self.state();
        (s.ready.len(), s.held.values().map(BTreeMap::len).sum())
    }

    /// The queues as `fsctl inspect queue` shows RabbitMQ's.
    pub fn view(&self) -> super::QueueView {
        let s = self.state();
        super::QueueView {
            orders_ready: s.ready.len() as u64,
            orders_consumers: s.held.len() as u64,
            dlq_ready: s.dead.len() as u64,
            dlq_consumers: 0,
            partitions: Vec::new(),
        }
    }
}

#[async_trait::async_trait]
impl OrderQueue for MemoryQueue {
    /// One queue in memory: the partitions are RabbitMQ's concern.
    async fn publish(
        &self,
        _product: ProductId,
        message_id: &str,
        payload: &[u8],
    ) -> Result<(), BackendFailed> {
        self.state().ready.push_back(Message {
            id: message_id.to_owned(),
            payload: payload.to_vec(),
            deliveries: 0,
        });
        self.wake.notify_waiters();
        Ok(())
    }

    async fn consume(&self, prefetch: u16) -> Result<Box<dyn QueueConsumer>, BackendFailed> {
        let id = {
            let mut s = self.state();
            s.next_consumer += 1;
            let id = s.next_consumer;
            s.held.insert(id, BTreeMap::new());
            id
        };
        Ok(Box::new(MemoryConsumer {
            queue: self.clone(),
            id,
            prefetch: usize::from(prefetch.max(1)),
            cancelled: false,
        }))
    }

    async fn probe(&self) -> crate::seams::Probe {
        crate::seams::Probe::ok("embedded")
    }
    async fn dead_letters(&self) -> Result<Vec<(String, Option<String>)>, BackendFailed> {
        Ok(self.state().dead.clone())
    }
}

/// A consumer of the embedded queue; dropping it hands back what it held.
pub struct MemoryConsumer {
    queue: MemoryQueue,
    id: u64,
    prefetch: usize,
    cancelled: bool,
}

impl MemoryConsumer {
    /// Takes up to the free prefetch, at most a batch; messages past the
    /// delivery limit go to the dead letters instead, as RabbitMQ's quorum
    /// queue does.
    fn take(&self) -> Vec<Delivered> {
        if self.cancelled {
            return Vec::new();
        }
        let mut s = self.queue.state();
        let holding = s.held.get(&self.id).map_or(0, BTreeMap::len);
        let mut out = Vec::new();
        while holding + out.len() < self.prefetch && out.len() < MAX_BATCH {
            let Some(mut m) = s.ready.pop_front() else {
                break;
            };
            if m.deliveries > super::rabbitmq::DELIVERY_LIMIT as u32 {
                s.dead.push((m.id, Some("delivery_limit".into())));
                continue;
            }
            m.deliveries += 1;
            s.next_tag += 1;
            let tag = s.next_tag;
            out.push(Delivered {
                tag,
                message_id: m.id.clone(),
                payload: m.payload.clone(),
                redelivered: m.deliveries > 1,
            });
            s.held.entry(self.id).or_default().insert(tag, m);
        }
        out
    }

    fn hand_back(&self) {
        let mut s = self.queue.state();
        if let Some(held) = s.held.remove(&self.id) {
            for m in held.into_values().rev() {
                s.ready.push_front(m);
            }
        }
        drop(s);
        self.queue.wake.notify_waiters();
    }
}

impl Drop for MemoryConsumer {
    fn drop(&mut self) {
        self.hand_back();
    }
}

#[async_trait::async_trait]
impl QueueConsumer for MemoryConsumer {
    async fn next_batch(&mut self) -> Result<Option<Vec<Delivered>>, BackendFailed> {
        loop {
            let woken = self.queue.wake.notified();
            let batch = self.take();
            if !batch.is_empty() {
                return Ok(Some(batch));
            }
            // A publish or an ack may free room; a short poll covers a wake
            // that raced the check above.
            let _ = tokio::time::timeout(Duration::from_millis(50), woken).await;
        }
    }

    async fn ack_through(&mut self, tag: u64) -> Result<(), BackendFailed> {
        if let Some(held) = self.queue.state().held.get_mut(&self.id) {
            held.retain(|t, _| *t > tag);
        }
        self.queue.wake.notify_waiters();
        Ok(())
    }

    async fn dead_letter(
        &mut self,
        delivery: &Delivered,
        reason: &str,
    ) -> Result<(), BackendFailed> {
        let mut s = self.queue.state();
        let removed = s
            .held
            .get_mut(&self.id)
            .and_then(|held| held.remove(&delivery.tag));
        if let Some(m) = removed {
            s.dead.push((m.id, Some(reason.to_owned())));
        }
        Ok(())
    }

    async fn cancel(&mut self) {
        self.cancelled = true;
    }

    async fn close(self: Box<Self>) {
        // Drop hands back what it held.
    }
}
