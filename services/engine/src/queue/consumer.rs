//! One consuming session on RabbitMQ: a connection, a confirm-mode channel
//! with the worker's prefetch, and the consumer on `<ns>.orders`.

use super::rabbitmq as broker;
use crate::Namespace;
use futures_util::stream::SelectAll;
use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub struct OrderConsumer {
    connection: Connection,
    channel: Channel,
    /// One consumer per partition consumed, on the one channel (so the
    /// delivery tags, and the `multiple` acks, span them all).
    consumer: tokio::sync::Mutex<SelectAll<Consumer>>,
    prefetch: u16,
    tags: Vec<String>,
    ns: Namespace,
    /// Set while [`Self::next_batch`] waits with nothing buffered.
    waiting: Arc<AtomicBool>,
}

impl OrderConsumer {
    pub async fn open(
        url: &str,
        ns: &Namespace,
        prefetch: u16,
        worker_id: &str,
        partitions: &[u16],
    ) -> Result<Self, broker::BrokerError> {
        let connection = broker::connect(url, &format!("flashsale-worker {worker_id}")).await?;
        let channel = connection.create_channel().await?;
        // Confirm mode for the worker's own publishes (dead letters).
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        broker::declare_queues(&channel, ns).await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let tag = format!("{worker_id}-{}", uuid::Uuid::new_v4().simple());
        let mut consumers = Vec::new();
        for p in partitions {
            let consumer = channel
                .basic_consume(
                    ns.partition_queue(*p).into(),
                    format!("{tag}-{p}").as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            consumers.push(consumer);
        }
        let tags = partitions.iter().map(|p| format!("{tag}-{p}")).collect();
        let consumer = futures_util::stream::select_all(consumers);
        Ok(Self {
            connection,
            channel,
            consumer: tokio::sync::Mutex::new(consumer),
            prefetch,
            tags,
            ns: ns.clone(),
            waiting: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Set while the consumer waits with nothing buffered.
    pub fn waiting(&self) -> Arc<AtomicBool> {
        self.waiting.clone()
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    pub fn namespace(&self) -> Namespace {
        self.ns.clone()
    }

    pub fn dead_letter_queue(&self) -> String {
        self.ns.dead_letter_queue()
    }

    /// Waits for a delivery, then takes every delivery already buffered (at
    /// most [`MAX_BATCH`](super::MAX_BATCH)). `Ok(None)` when the consumer ended (channel or
    /// connection gone). Cancel-safe: nothing is taken until it returns.
    pub async fn next_batch(&self) -> Result<Option<Vec<Delivery>>, lapin::Error> {
        let mut consumer = self.consumer.lock().await;
        let max = usize::from(self.prefetch.max(1)).min(super::MAX_BATCH);
        let first = match consumer.next().now_or_never() {
            Some(first) => first,
            None => {
                // Nothing buffered: whatever the broker sends next arrives here.
                self.waiting.store(true, Ordering::Release);
                consumer.next().await
            }
        };
        self.waiting.store(false, Ordering::Release);
        let first = match first {
            None => return Ok(None),
            Some(d) => d?,
        };
        let mut batch = vec![first];
        while batch.len() < max {
            match consumer.next().now_or_never() {
                Some(Some(Ok(d))) => batch.push(d),
                Some(Some(Err(e))) => return Err(e),
                Some(None) | None => break,
            }
        }
        Ok(Some(batch))
    }

    /// Stops new deliveries; those already sent can still be taken.
    pub async fn cancel(&self) {
        for tag in &self.tags {
            let cancel = self
                .channel
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default());
            let _ = tokio::time::timeout(Duration::from_secs(2), cancel).await;
        }
    }

    /// Closes the connection; unacked deliveries go back to the queue.
    pub async fn close(&self) {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.connection.close(200, "worker closing".into()),
        )
        .await;
    }
}
