//! A model of the order queue as RabbitMQ behaves, not as the embedded
//! memory queue does:
//! - **partitions**: one queue per partition, a product's orders in its own;
//! - **channels**: a worker consumes every partition on one channel, whose
//!   delivery tags count over all of them; the broker pushes deliveries
//!   into per-partition consumer buffers (up to the prefetch per consumer),
//!   and the worker takes them from the buffers in any (seeded) order;
//! - **acks**: an ack with `multiple` settles every unacknowledged tag up to
//!   its own on the channel, taken or not; an ack of a tag the channel does
//!   not know closes the channel (`PRECONDITION_FAILED`), and what its
//!   buffers held is gone with it;
//! - **a closed channel** (a killed worker, a failed call) has its
//!   unacknowledged deliveries requeued, but only once the broker notices,
//!   a seeded while later;
//! - **publishes** that fail before their effect, or take effect and lose
//!   the confirm (the API answers `503`, the message is queued all the same);
//! - the delivery limit and dead letters, as the quorum queues have them.
//!
//! The consumer keeps its tags with the engine's own [`ChannelAcks`], as
//! the RabbitMQ consumer does.

use crate::rng::SimRng;
use flashsale_engine::ProductId;
use flashsale_engine::queue::{ChannelAcks, Delivered, MAX_BATCH, OrderQueue, QueueConsumer};
use flashsale_engine::seams::{BackendFailed, Probe};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// What a seed draws for the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BrokerOptions {
    pub partitions: usize,
    /// Percent of publishes that fail before their effect.
    pub publish_failures: u64,
    /// Percent of publishes whose confirm is lost after the message is queued.
    pub lost_confirms: u64,
    /// The longest the broker takes to notice a closed channel (ms).
    pub notice_ms: u64,
    /// The worker takes from the first partition's buffer whenever it has
    /// deliveries: the others wait there unseen, lower tags among them (as
    /// when a channel's partitions have their leaders on several nodes).
    pub uneven: bool,
}

impl BrokerOptions {
    pub fn draw(r: &mut SimRng) -> Self {
        Self {
            partitions: r.between(1, 3) as usize,
            publish_failures: if r.chance(0.5) { r.between(1, 10) } else { 0 },
            lost_confirms: if r.chance(0.5) { r.between(1, 10) } else { 0 },
            notice_ms: r.between(0, 2000),
            // Drawn after every other option (see `Options::draw`).
            uneven: false,
        }
    }
}

#[derive(Debug, Clone)]
struct Message {
    id: String,
    payload: Vec<u8>,
    deliveries: u32,
}

#[derive(Debug, Default)]
struct Channel {
    next_tag: u64,
    prefetch: usize,
    /// Sent and not settled: tag -> (partition, message).
    unacked: BTreeMap<u64, (usize, Message)>,
    /// Sent and not yet taken by the worker, per partition (its consumer's
    /// buffer, in arrival order). The client holds the message itself: one
    /// settled meanwhile by a `multiple` ack is still delivered from here.
    buffers: Vec<VecDeque<(u64, Message)>>,
    cancelled: bool,
    closed: bool,
}

#[derive(Debug, Default)]
struct State {
    partitions: Vec<VecDeque<Message>>,
    channels: BTreeMap<u64, Channel>,
    next_channel: u64,
    dead: Vec<(String, Option<String>)>,
}

/// The broker: cheap to clone, clones share it.
#[derive(Clone)]
pub struct Broker {
    state: Arc<Mutex<State>>,
    rng: Arc<Mutex<SimRng>>,
    options: BrokerOptions,
    wake: Arc<tokio::sync::Notify>,
    /// Connections still to drop right after an ack.
    drops_left: Arc<AtomicU64>,
}

fn failed(what: &str) -> BackendFailed {
    BackendFailed::rabbitmq(std::io::Error::other(what.to_owned()))
}

impl Broker {
    pub fn new(seed: u64, options: BrokerOptions, dropped_connections: u64) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                partitions: vec![VecDeque::new(); options.partitions.max(1)],
                ..State::default()
            })),
            rng: Arc::new(Mutex::new(SimRng::new(seed))),
            options,
            wake: Arc::new(tokio::sync::Notify::new()),
            drops_left: Arc::new(AtomicU64::new(dropped_connections)),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn percent(&self, p: u64) -> bool {
        p > 0
            && self
                .rng
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .between(1, 100)
                <= p
    }

    fn pick(&self, n: usize) -> usize {
        self.rng
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .between(0, n as u64 - 1) as usize
    }

    /// Ready messages, and messages sent to channels and not settled.
    pub fn depth(&self) -> (usize, usize) {
        let s = self.state();
        (
            s.partitions.iter().map(VecDeque::len).sum(),
            s.channels.values().map(|c| c.unacked.len()).sum(),
        )
    }

    /// Fills the channel's buffers: each partition's consumer gets ready
    /// messages up to the prefetch, the partitions served in seeded order,
    /// each new delivery taking the channel's next tag.
    fn push(&self, channel: u64) {
        let mut s = self.state();
        let parts = s.partitions.len();
        loop {
            let Some(c) = s.channels.get(&channel) else {
                return;
            };
            if c.cancelled || c.closed {
                return;
            }
            let open: Vec<usize> = (0..parts)
                .filter(|p| {
                    !s.partitions[*p].is_empty()
                        && c.unacked.values().filter(|(q, _)| q == p).count() < c.prefetch
                })
                .collect();
            if open.is_empty() {
                return;
            }
            let p = open[self.pick(open.len())];
            let Some(mut m) = s.partitions[p].pop_front() else {
                return;
            };
            if m.deliveries > flashsale_engine::queue::rabbitmq::DELIVERY_LIMIT as u32 {
                s.dead.push((m.id, Some("delivery_limit".into())));
                continue;
            }
            m.deliveries += 1;
            let Some(c) = s.channels.get_mut(&channel) else {
                return;
            };
            c.next_tag += 1;
            let tag = c.next_tag;
            c.unacked.insert(tag, (p, m.clone()));
            c.buffers[p].push_back((tag, m));
        }
    }

    /// Takes from the channel's buffers, in seeded order, up to `max`; at
    /// times fewer (the rest "still on the wire").
    fn take(&self, channel: u64, max: usize) -> Result<Vec<Delivered>, BackendFailed> {
        let mut out = Vec::new();
        let mut s = self.state();
        let c = s
            .channels
            .get_mut(&channel)
            .ok_or_else(|| failed("channel closed"))?;
        if c.closed {
            return Err(failed("channel closed"));
        }
        while out.len() < max {
            let filled: Vec<usize> = (0..c.buffers.len())
                .filter(|p| !c.buffers[*p].is_empty())
                .collect();
            if filled.is_empty() || (!out.is_empty() && self.percent(20)) {
                break;
            }
            let p = if self.options.uneven && filled[0] == 0 {
                0
            } else {
                filled[self.pick(filled.len())]
            };
            let Some((tag, m)) = c.buffers[p].pop_front() else {
                break;
            };
            out.push(Delivered {
                tag,
                message_id: m.id,
                payload: m.payload,
                redelivered: m.deliveries > 1,
            });
        }
        Ok(out)
    }

    /// `basic.ack`: settles `tag` (and every lower tag on the channel with
    /// `multiple`). An unknown tag closes the channel.
    fn ack(&self, channel: u64, tag: u64, multiple: bool) -> Result<(), BackendFailed> {
        let mut s = self.state();
        let Some(c) = s.channels.get_mut(&channel).filter(|c| !c.closed) else {
            return Err(failed("channel closed"));
        };
        if c.unacked.remove(&tag).is_none() {
            drop(s);
            self.close(channel);
            return Err(failed("PRECONDITION_FAILED - unknown delivery tag"));
        }
        if multiple {
            c.unacked.retain(|t, _| *t > tag);
        }
        drop(s);
        self.wake.notify_waiters();
        Ok(())
    }

    /// After an ack got through: the channel's connection drops, while the
    /// seed has drops left, at one such ack in two among those made while
    /// deliveries were on their way to the worker (in its buffers: where a
    /// consumer's bugs lose messages).
    fn maybe_drop_after_ack(&self, channel: u64) {
        let in_flight = || {
            self.state()
                .channels
                .get(&channel)
                .is_some_and(|c| c.buffers.iter().any(|b| !b.is_empty()))
        };
        let drop_now =
            self.drops_left.load(Ordering::Relaxed) > 0 && in_flight() && self.percent(50);
        if drop_now {
            self.drops_left.fetch_sub(1, Ordering::Relaxed);
            self.close(channel);
            self.wake.notify_waiters();
        }
    }

    /// The channel is gone: its buffers with it at once, its unacknowledged
    /// messages back at the head of their partitions once the broker
    /// notices (a seeded while later).
    fn close(&self, channel: u64) {
        {
            let mut s = self.state();
            let Some(c) = s.channels.get_mut(&channel) else {
                return;
            };
            if c.closed {
                return;
            }
            c.closed = true;
            for b in &mut c.buffers {
                b.clear();
            }
        }
        let notice = Duration::from_millis(self.pick(self.options.notice_ms as usize + 1) as u64);
        let broker = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(notice).await;
            let mut s = broker.state();
            if let Some(c) = s.channels.remove(&channel) {
                for (_, (p, m)) in c.unacked.into_iter().rev() {
                    s.partitions[p].push_front(m);
                }
            }
            drop(s);
            broker.wake.notify_waiters();
        });
    }
}

#[async_trait::async_trait]
impl OrderQueue for Broker {
    async fn publish(
        &self,
        product: ProductId,
        message_id: &str,
        payload: &[u8],
    ) -> Result<(), BackendFailed> {
        if self.percent(self.options.publish_failures) {
            return Err(failed("channel closed before the publish"));
        }
        {
            let mut s = self.state();
            let p = product.get().unsigned_abs() as usize % s.partitions.len();
            s.partitions[p].push_back(Message {
                id: message_id.to_owned(),
                payload: payload.to_vec(),
                deliveries: 0,
            });
        }
        self.wake.notify_waiters();
        if self.percent(self.options.lost_confirms) {
            return Err(failed("connection lost before the confirm"));
        }
        Ok(())
    }

    async fn consume(&self, prefetch: u16) -> Result<Box<dyn QueueConsumer>, BackendFailed> {
        let id = {
            let mut s = self.state();
            s.next_channel += 1;
            let id = s.next_channel;
            let parts = s.partitions.len();
            s.channels.insert(
                id,
                Channel {
                    prefetch: usize::from(prefetch.max(1)),
                    buffers: vec![VecDeque::new(); parts],
                    ..Channel::default()
                },
            );
            id
        };
        Ok(Box::new(BrokerConsumer {
            broker: self.clone(),
            channel: id,
            max: usize::from(prefetch.max(1)).min(MAX_BATCH),
            held: ChannelAcks::default(),
        }))
    }

    async fn dead_letters(&self) -> Result<Vec<(String, Option<String>)>, BackendFailed> {
        Ok(self.state().dead.clone())
    }

    async fn probe(&self) -> Probe {
        Probe::ok("simulated broker")
    }
}

/// A worker's consumer of every partition, on one channel.
struct BrokerConsumer {
    broker: Broker,
    channel: u64,
    max: usize,
    held: ChannelAcks<()>,
}

impl Drop for BrokerConsumer {
    fn drop(&mut self) {
        self.broker.close(self.channel);
    }
}

#[async_trait::async_trait]
impl QueueConsumer for BrokerConsumer {
    async fn next_batch(&mut self) -> Result<Option<Vec<Delivered>>, BackendFailed> {
        loop {
            let woken = self.broker.wake.notified();
            self.broker.push(self.channel);
            let batch = self.broker.take(self.channel, self.max)?;
            if !batch.is_empty() {
                for d in &batch {
                    self.held.took(d.tag, ());
                }
                return Ok(Some(batch));
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), woken).await;
        }
    }

    async fn ack_through(&mut self, tag: u64) -> Result<(), BackendFailed> {
        let plan = self.held.plan(tag);
        if let Some(t) = plan.multiple_through {
            self.broker.ack(self.channel, t, true)?;
        }
        for t in plan.singles {
            self.broker.ack(self.channel, t, false)?;
        }
        self.held.settled_through(tag);
        self.broker.maybe_drop_after_ack(self.channel);
        Ok(())
    }

    async fn dead_letter(
        &mut self,
        delivery: &Delivered,
        reason: &str,
    ) -> Result<(), BackendFailed> {
        if self.held.remove(delivery.tag).is_none() {
            return Ok(());
        }
        self.broker
            .state()
            .dead
            .push((delivery.message_id.clone(), Some(reason.to_owned())));
        self.broker.ack(self.channel, delivery.tag, false)
    }

    async fn cancel(&mut self) {
        if let Some(c) = self.broker.state().channels.get_mut(&self.channel) {
            c.cancelled = true;
        }
    }

    async fn close(self: Box<Self>) {
        // Drop closes the channel.
    }
}
