//! The order queue on RabbitMQ: connecting, the queues declared with the
//! exact arguments every service uses, confirmed publishes, the queues'
//! figures, and [`RabbitQueue`], the [`OrderQueue`] the API and the worker
//! hold.

use super::{Delivered, OrderQueue, QueueConsumer};
use crate::config::{Namespace, mask_url};
use crate::domain::ProductId;
use crate::seams::BackendFailed;
use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use serde::Serialize;
use std::time::Duration;
use tokio::time::Instant;

/// A publish not confirmed within this long is answered `503`.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
/// The API's whole publish of one order — waiting for a channel slot,
/// opening a channel, the confirm — ends within this, one budget for all
/// three (the accept log's liveness window is derived from it).
pub const PUBLISH_BUDGET: Duration = CONFIRM_TIMEOUT;
/// Connecting (TCP and AMQP handshake) gives up after this long.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Any other call to RabbitMQ (an ack, opening a channel) gives up after this long.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Channels the API's publisher keeps; each carries one publish at a time.
pub const PUBLISH_CHANNELS: usize = 128;
/// Messages a redelivered order may see before it is dead-lettered.
pub const DELIVERY_LIMIT: i32 = 20;
/// The header that says why the worker dead-lettered a message.
pub const REASON_HEADER: &str = "x-flashsale-reason";

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot reach RabbitMQ at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("RabbitMQ: {0}")]
    Channel(#[from] lapin::Error),
    #[error(
        "RabbitMQ did not report on queue {queue} within {waited:?} (a partition without a leader?)"
    )]
    Silent { queue: String, waited: Duration },
}

/// Why a publish is not known to be accepted: always answered `503`, always
/// safe to retry with the same key.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("not connected to RabbitMQ")]
    NotConnected,
    #[error("RabbitMQ returned the message as unroutable")]
    Returned,
    #[error("RabbitMQ refused the message (nack)")]
    Nacked,
    #[error("RabbitMQ did not confirm within {0:?}")]
    Timeout(Duration),
    #[error("RabbitMQ channel failed: {0}")]
    Channel(#[from] lapin::Error),
}

/// Connects to RabbitMQ, with a timeout. `url` may list several nodes of
/// one cluster, comma-separated: one that answers is used.
pub async fn connect(url: &str, name: &str) -> Result<Connection, BrokerError> {
    let nodes: Vec<&str> = url
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    // Start at a node picked at random, so that processes spread over a
    // cluster's nodes, then try the others in turn.
    let start = (uuid::Uuid::new_v4().as_u128() % nodes.len().max(1) as u128) as usize;
    let mut failures = Vec::new();
    for i in 0..nodes.len() {
        let node = nodes[(start + i) % nodes.len()];
        let props = ConnectionProperties::default().with_connection_name(name.into());
        match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(node, props)).await {
            Ok(Ok(conn)) => return Ok(conn),
            Ok(Err(e)) => failures.push((node, e.to_string())),
            Err(_) => failures.push((node, format!("no answer within {CONNECT_TIMEOUT:?}"))),
        }
    }
    let reason = match failures.as_slice() {
        [(_, why)] => why.clone(),
        many => many
            .iter()
            .map(|(node, why)| format!("{}: {why}", mask_url(node)))
            .collect::<Vec<_>>()
            .join("; "),
    };
    Err(BrokerError::Unreachable {
        url: mask_url(url),
        reason,
    })
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// The order queue's arguments, exactly as the contract fixes them.
pub fn order_queue_arguments(ns: &Namespace) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), long("quorum"));
    args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongInt(DELIVERY_LIMIT),
    );
    args.insert("x-dead-letter-exchange".into(), long(""));
    args.insert(
        "x-dead-letter-routing-key".into(),
        long(&ns.dead_letter_queue()),
    );
    args.insert("x-dead-letter-strategy".into(), long("at-least-once"));
    args.insert("x-overflow".into(), long("reject-publish"));
    args
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

/// Declares the order queues (`<ns>.orders`, or one per partition with
/// their leaders balanced over the cluster's nodes) and `<ns>.orders.dlq`
/// (idempotent).
pub async fn declare_queues(channel: &Channel, ns: &Namespace) -> Result<(), lapin::Error> {
    let mut dlq_args = FieldTable::default();
    dlq_args.insert("x-queue-type".into(), long("quorum"));
    channel
        .queue_declare(ns.dead_letter_queue().into(), durable(), dlq_args)
        .await?;
    let mut args = order_queue_arguments(ns);
    if ns.partitions() > 1 {
        args.insert("x-queue-leader-locator".into(), long("balanced"));
    }
    for queue in ns.order_queues() {
        channel
            .queue_declare(queue.into(), durable(), args.clone())
            .await?;
    }
    Ok(())
}

/// Ready messages and consumers of a queue, as RabbitMQ reports them now.
pub async fn queue_stats(channel: &Channel, queue: &str) -> Result<(u32, u32), lapin::Error> {
    let q = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok((q.message_count(), q.consumer_count()))
}

/// Records both queues' ready messages and consumers as gauges (so the API
/// reports them too, and an alert can see a queue nobody consumes).
pub async fn record_queue_stats(channel: &Channel, ns: &Namespace) {
    let mut queues = ns.order_queues();
    queues.push(ns.dead_letter_queue());
    for queue in queues {
        let stats =
            tokio::time::timeout(Duration::from_secs(1), queue_stats(channel, &queue)).await;
        if let Ok(Ok((ready, consumers))) = stats {
            metrics::gauge!(crate::metrics::QUEUE_DEPTH, "queue" => queue.clone())
                .set(f64::from(ready));
            metrics::gauge!(crate::metrics::QUEUE_CONSUMERS, "queue" => queue)
                .set(f64::from(consumers));
        }
    }
}

/// A persistent JSON message's properties.
pub fn message_properties(message_id: &str, headers: Option<FieldTable>) -> BasicProperties {
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_message_id(ShortString::from(message_id))
        .with_delivery_mode(2);
    match headers {
        Some(h) => props.with_headers(h),
        None => props,
    }
}

/// Publishes one persistent, mandatory JSON message to `queue` through the
/// default exchange and waits (at most [`CONFIRM_TIMEOUT`]) for its confirm.
pub async fn publish_confirmed(
    channel: &Channel,
    queue: &str,
    message_id: &str,
    payload: &[u8],
    headers: Option<FieldTable>,
) -> Result<(), PublishError> {
    publish_with(
        channel,
        queue,
        payload,
        message_properties(message_id, headers),
    )
    .await
}

/// Publishes a mandatory message with these properties to `queue` and
/// waits (at most [`CONFIRM_TIMEOUT`]) for its confirm. A returned message
/// must carry this publish's `message_id`.
pub async fn publish_with(
    channel: &Channel,
    queue: &str,
    payload: &[u8],
    props: BasicProperties,
) -> Result<(), PublishError> {
    publish_until(
        channel,
        queue,
        payload,
        props,
        Instant::now() + CONFIRM_TIMEOUT,
    )
    .await
}

/// [`publish_with`], waiting for the confirm until `deadline`.
pub async fn publish_until(
    channel: &Channel,
    queue: &str,
    payload: &[u8],
    props: BasicProperties,
    deadline: Instant,
) -> Result<(), PublishError> {
    let message_id = props.message_id().as_ref().map(|s| s.as_str().to_owned());
    let options = BasicPublishOptions {
        mandatory: true,
        ..Default::default()
    };
    let confirm = async {
        channel
            .basic_publish("".into(), queue.into(), options, payload, props)
            .await?
            .await
    };
    match tokio::time::timeout_at(deadline, confirm).await {
        Err(_) => Err(PublishError::Timeout(CONFIRM_TIMEOUT)),
        Ok(Err(e)) => Err(PublishError::Channel(e)),
        Ok(Ok(Confirmation::Ack(None))) => Ok(()),
        Ok(Ok(Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)))) => {
            let id = returned
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.as_str().to_owned());
            if id != message_id {
                // Never with one publish in flight per channel; either way
                // this publish is not known to be accepted.
                tracing::error!(returned = ?id, ours = ?message_id, "a returned message came back with another publish's confirm");
            }
            Err(PublishError::Returned)
        }
        Ok(Ok(Confirmation::Nack(None) | Confirmation::NotRequested)) => Err(PublishError::Nacked),
    }
}

/// Header table carrying the dead-letter reason.
pub fn reason_headers(reason: &str) -> FieldTable {
    let mut h = FieldTable::default();
    h.insert(REASON_HEADER.into(), long(reason));
    h
}

/// The order queue on RabbitMQ: the API's publisher and the worker's consumer.
pub struct RabbitQueue {
    url: String,
    ns: crate::Namespace,
    /// The API's publisher (connects in the background); a worker has none.
    publisher: Option<super::OrderPublisher>,
    /// The partitions a consumer takes from (all unless narrowed).
    consumed: Vec<u16>,
}

impl RabbitQueue {
    /// For publishing and consuming (the API).
    pub fn start(url: &str, ns: &crate::Namespace) -> Self {
        Self {
            url: url.to_owned(),
            ns: ns.clone(),
            publisher: Some(super::OrderPublisher::start(url, ns)),
            consumed: (0..ns.partitions()).collect(),
        }
    }

    /// For consuming only (a worker): no publisher connection.
    pub fn consumer_only(url: &str, ns: &crate::Namespace) -> Self {
        Self {
            url: url.to_owned(),
            ns: ns.clone(),
            publisher: None,
            consumed: (0..ns.partitions()).collect(),
        }
    }

    /// Consumes only these partitions (`WORKER_PARTITIONS`).
    pub fn consuming(mut self, partitions: Vec<u16>) -> Self {
        self.consumed = partitions;
        self
    }

    pub fn is_connected(&self) -> bool {
        self.publisher.as_ref().is_some_and(|p| p.is_connected())
    }

    /// A consumer named after `worker_id` (RabbitMQ shows it).
    pub async fn consume_as(
        &self,
        prefetch: u16,
        worker_id: &str,
    ) -> Result<Box<dyn QueueConsumer>, BackendFailed> {
        let open =
            super::OrderConsumer::open(&self.url, &self.ns, prefetch, worker_id, &self.consumed);
        let consumer = tokio::time::timeout(CONNECT_TIMEOUT + CALL_TIMEOUT, open)
            .await
            .map_err(|_| {
                BackendFailed::rabbitmq_timeout(
                    "opening the consumer",
                    CONNECT_TIMEOUT + CALL_TIMEOUT,
                )
            })?
            .map_err(broker_failed)?;
        Ok(Box::new(RabbitConsumer::new(consumer)))
    }
}

fn broker_failed(e: impl std::error::Error + Send + Sync + 'static) -> BackendFailed {
    BackendFailed::rabbitmq(e)
}

/// An ack under [`CALL_TIMEOUT`]: a silent broker is a
/// failure (the consumer reconnects), never a hang.
async fn within_deadline<T>(
    call: impl Future<Output = Result<T, lapin::Error>>,
) -> Result<(), BackendFailed> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(broker_failed(e)),
        Err(_) => Err(BackendFailed::rabbitmq_timeout("an ack", CALL_TIMEOUT)),
    }
}

#[async_trait::async_trait]
impl OrderQueue for RabbitQueue {
    async fn publish(
        &self,
        product: ProductId,
        message_id: &str,
        payload: &[u8],
    ) -> Result<(), BackendFailed> {
        let Some(publisher) = &self.publisher else {
            return Err(BackendFailed::Misuse(
                "this queue handle only consumes".into(),
            ));
        };
        publisher
            .publish(product, message_id, payload)
            .await
            .map_err(broker_failed)
    }

    async fn consume(&self, prefetch: u16) -> Result<Box<dyn QueueConsumer>, BackendFailed> {
        self.consume_as(prefetch, "flashsale").await
    }

    async fn probe(&self) -> crate::seams::Probe {
        crate::seams::Probe {
            component: "rabbitmq",
            outcome: if self.is_connected() {
                Ok(())
            } else {
                Err("not connected".into())
            },
        }
    }
    async fn dead_letters(&self) -> Result<Vec<(String, Option<String>)>, BackendFailed> {
        Ok(super::peek_dead_letters(&self.url, &self.ns, 10_000)
            .await
            .map_err(broker_failed)?
            .into_iter()
            .map(|d| (d.message_id.unwrap_or_default(), d.reason))
            .collect())
    }
}

struct RabbitConsumer {
    consumer: super::OrderConsumer,
    held: super::ChannelAcks<lapin::message::Delivery>,
}

impl RabbitConsumer {
    fn new(consumer: super::OrderConsumer) -> Self {
        Self {
            consumer,
            held: super::ChannelAcks::default(),
        }
    }
}

#[async_trait::async_trait]
impl QueueConsumer for RabbitConsumer {
    fn waiting(&self) -> Option<std::sync::Arc<std::sync::atomic::AtomicBool>> {
        Some(self.consumer.waiting())
    }

    async fn next_batch(&mut self) -> Result<Option<Vec<Delivered>>, BackendFailed> {
        let Some(batch) = self.consumer.next_batch().await.map_err(broker_failed)? else {
            return Ok(None);
        };
        let mut out = Vec::with_capacity(batch.len());
        for d in batch {
            out.push(Delivered {
                tag: d.delivery_tag,
                message_id: d
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.as_str().to_owned())
                    .unwrap_or_default(),
                payload: d.data.clone(),
                redelivered: d.redelivered,
            });
            self.held.took(d.delivery_tag, d);
        }
        Ok(Some(out))
    }

    async fn ack_through(&mut self, tag: u64) -> Result<(), BackendFailed> {
        // One may have been dead-lettered, and so acked, already.
        let plan = self.held.plan(tag);
        if let Some(d) = plan.multiple_through.and_then(|t| self.held.get(t)) {
            let ack = d
                .acker
                .ack(lapin::options::BasicAckOptions { multiple: true });
            within_deadline(ack).await?;
        }
        for d in plan.singles.iter().filter_map(|t| self.held.get(*t)) {
            within_deadline(d.acker.ack(lapin::options::BasicAckOptions::default())).await?;
        }
        self.held.settled_through(tag);
        Ok(())
    }

    async fn dead_letter(
        &mut self,
        delivery: &Delivered,
        reason: &str,
    ) -> Result<(), BackendFailed> {
        let Some(d) = self.held.remove(delivery.tag) else {
            return Ok(());
        };
        publish_confirmed(
            self.consumer.channel(),
            &self.consumer.dead_letter_queue(),
            &delivery.message_id,
            &d.data,
            Some(reason_headers(reason)),
        )
        .await
        .map_err(broker_failed)?;
        within_deadline(d.acker.ack(lapin::options::BasicAckOptions::default())).await
    }

    async fn cancel(&mut self) {
        self.consumer.cancel().await;
    }

    async fn record_stats(&self) {
        record_queue_stats(self.consumer.channel(), &self.consumer.namespace()).await;
    }

    async fn close(self: Box<Self>) {
        self.consumer.close().await;
    }
}

/// Ready messages and consumers of the order queue and the DLQ.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct QueueView {
    /// Ready messages over every partition.
    pub orders_ready: u64,
    /// Consumers of the least consumed partition (0: one nobody consumes).
    pub orders_consumers: u64,
    pub dlq_ready: u64,
    pub dlq_consumers: u64,
    /// Each order queue (one per partition), in partition order.
    pub partitions: Vec<PartitionView>,
}

/// One partition's order queue.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PartitionView {
    pub queue: String,
    pub ready: u64,
    pub consumers: u64,
}

/// How long [`queues`] waits for RabbitMQ to report on one queue: a
/// partition whose quorum has no leader does not answer, and "drained"
/// must not be decided without it.
pub const QUEUE_LOOK_TIMEOUT: Duration = Duration::from_secs(3);

/// Each order queue's and the DLQ's ready messages and consumers, on a
/// connection of its own. The queues are declared first (with the fixed
/// arguments, so a missing one is created rather than failing the look).
/// A queue RabbitMQ does not report on within [`QUEUE_LOOK_TIMEOUT`] is an
/// error, never a queue taken as empty.
pub async fn queues(amqp_url: &str, ns: &Namespace) -> Result<QueueView, BrokerError> {
    let conn = connect(amqp_url, "fsctl").await?;
    let look = |queue: String, channel: Channel| async move {
        tokio::time::timeout(QUEUE_LOOK_TIMEOUT, queue_stats(&channel, &queue))
            .await
            .map_err(|_| BrokerError::Silent {
                queue,
                waited: QUEUE_LOOK_TIMEOUT,
            })?
            .map_err(BrokerError::from)
    };
    let result = async {
        let channel = conn.create_channel().await?;
        tokio::time::timeout(QUEUE_LOOK_TIMEOUT, declare_queues(&channel, ns))
            .await
            .map_err(|_| BrokerError::Silent {
                queue: ns.order_queues().join(", "),
                waited: QUEUE_LOOK_TIMEOUT,
            })??;
        let mut partitions = Vec::new();
        for queue in ns.order_queues() {
            let (ready, consumers) = look(queue.clone(), channel.clone()).await?;
            partitions.push(PartitionView {
                queue,
                ready: ready.into(),
                consumers: consumers.into(),
            });
        }
        let (dlq_ready, dlq_consumers) = look(ns.dead_letter_queue(), channel.clone()).await?;
        Ok::<_, BrokerError>(QueueView {
            orders_ready: partitions.iter().map(|p| p.ready).sum(),
            orders_consumers: partitions.iter().map(|p| p.consumers).min().unwrap_or(0),
            dlq_ready: dlq_ready.into(),
            dlq_consumers: dlq_consumers.into(),
            partitions,
        })
    }
    .await;
    let _ = tokio::time::timeout(QUEUE_LOOK_TIMEOUT, conn.close(200, "done".into())).await;
    result
}
