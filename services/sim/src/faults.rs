//! The seams where a seed's faults go in: the order queue as the APIs and
//! the workers see it, with seeded delays around every call, so that a
//! killed worker or a client that hangs up can land between a call's effect
//! and the next step (where the bugs live).

use crate::rng::SimRng;
use flashsale_engine::queue::{Delivered, OrderQueue, QueueConsumer};
use flashsale_engine::seams::{BackendFailed, Probe};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Seeded pauses: each call may wait up to `max` before and after its effect.
#[derive(Clone)]
pub struct Delays {
    rng: Arc<Mutex<SimRng>>,
    max_micros: u64,
}

impl Delays {
    pub fn new(seed: u64, max: Duration) -> Self {
        Self {
            rng: Arc::new(Mutex::new(SimRng::new(seed))),
            max_micros: max.as_micros() as u64,
        }
    }

    async fn pause(&self) {
        let micros = self
            .rng
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .between(0, self.max_micros);
        if micros > 0 {
            tokio::time::sleep(Duration::from_micros(micros)).await;
        }
    }
}

/// A crash at a chosen point: the victim worker's consumer springs it at
/// its first ack (the victim API's queue at its first publish), just
/// before or just after the call takes effect, and then never returns; the
/// world kills the worker (the API) there ("a worker killed mid-batch",
/// "an API killed between taking units and publishing").
#[derive(Default)]
pub struct Trap {
    armed: std::sync::atomic::AtomicBool,
    /// Spring after the ack's effect (else before it).
    after_effect: bool,
    pub sprung: tokio::sync::Notify,
}

impl Trap {
    pub fn armed(after_effect: bool) -> Arc<Self> {
        Arc::new(Self {
            armed: std::sync::atomic::AtomicBool::new(true),
            after_effect,
            sprung: tokio::sync::Notify::new(),
        })
    }

    /// Springs (once) and parks the caller for good.
    async fn spring(&self) {
        if self.armed.swap(false, std::sync::atomic::Ordering::AcqRel) {
            self.sprung.notify_one();
            std::future::pending::<()>().await;
        }
    }
}

/// The queue, with pauses around publishes and a consumer with pauses
/// around every call (and, for the victim worker, a trap at its first ack;
/// for the victim API, one at its first publish).
pub struct SlowQueue {
    pub inner: Arc<dyn OrderQueue>,
    pub delays: Delays,
    pub trap: Option<Arc<Trap>>,
    pub publish_trap: Option<Arc<Trap>>,
}

#[async_trait::async_trait]
impl OrderQueue for SlowQueue {
    async fn publish(
        &self,
        product: i64,
        message_id: &str,
        payload: &[u8],
    ) -> Result<(), BackendFailed> {
        self.delays.pause().await;
        if let Some(trap) = self.publish_trap.as_ref().filter(|t| !t.after_effect) {
            trap.spring().await;
        }
        let published = self.inner.publish(product, message_id, payload).await;
        if let Some(trap) = self.publish_trap.as_ref().filter(|t| t.after_effect) {
            trap.spring().await;
        }
        self.delays.pause().await;
        published
    }

    async fn consume(&self, prefetch: u16) -> Result<Box<dyn QueueConsumer>, BackendFailed> {
        Ok(Box::new(SlowConsumer {
            inner: self.inner.consume(prefetch).await?,
            delays: self.delays.clone(),
            trap: self.trap.clone(),
        }))
    }

    async fn dead_letters(&self) -> Result<Vec<(String, Option<String>)>, BackendFailed> {
        self.inner.dead_letters().await
    }

    async fn probe(&self) -> Probe {
        self.inner.probe().await
    }
}

struct SlowConsumer {
    inner: Box<dyn QueueConsumer>,
    delays: Delays,
    trap: Option<Arc<Trap>>,
}

#[async_trait::async_trait]
impl QueueConsumer for SlowConsumer {
    /// Pauses before the take only: a consumer's `next_batch` must stay
    /// cancel-safe (nothing taken until it returns).
    async fn next_batch(&mut self) -> Result<Option<Vec<Delivered>>, BackendFailed> {
        self.delays.pause().await;
        self.inner.next_batch().await
    }

    async fn ack_through(&mut self, tag: u64) -> Result<(), BackendFailed> {
        self.delays.pause().await;
        if let Some(trap) = self.trap.as_ref().filter(|t| !t.after_effect) {
            trap.spring().await;
        }
        let acked = self.inner.ack_through(tag).await;
        if let Some(trap) = self.trap.as_ref().filter(|t| t.after_effect) {
            trap.spring().await;
        }
        self.delays.pause().await;
        acked
    }

    async fn dead_letter(
        &mut self,
        delivery: &Delivered,
        reason: &str,
    ) -> Result<(), BackendFailed> {
        self.delays.pause().await;
        self.inner.dead_letter(delivery, reason).await
    }

    async fn cancel(&mut self) {
        self.inner.cancel().await;
    }

    async fn close(self: Box<Self>) {
        self.inner.close().await;
    }
}
