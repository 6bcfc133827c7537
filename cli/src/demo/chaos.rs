//! `fsctl demo --chaos`: the queue as the victim worker sees it.

use flashsale_engine::queue::{Delivered, OrderQueue, QueueConsumer};
use flashsale_engine::seams::BackendFailed;
use std::sync::Arc;

/// `--chaos`: the queue as the victim worker sees it. Its first batch is
/// taken (the deliveries are held, unacknowledged) and then the worker
/// hangs there until the demo kills it, as a process killed mid-batch.
pub(super) struct StallingQueue {
    pub(super) inner: flashsale_engine::queue::MemoryQueue,
    pub(super) stalled: Arc<tokio::sync::Notify>,
    pub(super) held: Arc<std::sync::atomic::AtomicUsize>,
}

struct StallingConsumer {
    inner: Box<dyn QueueConsumer>,
    stalled: Arc<tokio::sync::Notify>,
    held: Arc<std::sync::atomic::AtomicUsize>,
}

#[async_trait::async_trait]
impl OrderQueue for StallingQueue {
    async fn publish(
        &self,
        product: flashsale_engine::ProductId,
        message_id: &str,
        payload: &[u8],
    ) -> Result<(), BackendFailed> {
        self.inner.publish(product, message_id, payload).await
    }
    async fn consume(&self, prefetch: u16) -> Result<Box<dyn QueueConsumer>, BackendFailed> {
        Ok(Box::new(StallingConsumer {
            inner: self.inner.consume(prefetch).await?,
            stalled: self.stalled.clone(),
            held: self.held.clone(),
        }))
    }
    async fn dead_letters(&self) -> Result<Vec<(String, Option<String>)>, BackendFailed> {
        self.inner.dead_letters().await
    }
    async fn probe(&self) -> flashsale_engine::seams::Probe {
        self.inner.probe().await
    }
}

#[async_trait::async_trait]
impl QueueConsumer for StallingConsumer {
    async fn next_batch(&mut self) -> Result<Option<Vec<Delivered>>, BackendFailed> {
        let batch = self.inner.next_batch().await?;
        if let Some(b) = &batch {
            self.held
                .store(b.len(), std::sync::atomic::Ordering::SeqCst);
            self.stalled.notify_one();
            std::future::pending::<()>().await;
        }
        Ok(batch)
    }
    async fn ack_through(&mut self, tag: u64) -> Result<(), BackendFailed> {
        self.inner.ack_through(tag).await
    }
    async fn dead_letter(&mut self, d: &Delivered, reason: &str) -> Result<(), BackendFailed> {
        self.inner.dead_letter(d, reason).await
    }
    async fn cancel(&mut self) {
        self.inner.cancel().await;
    }
    async fn close(self: Box<Self>) {
        self.inner.close().await;
    }
}
