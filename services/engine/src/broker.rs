//! RabbitMQ: the order queue and its dead-letter queue, declared with the
//! contract's arguments by every service, and the API's publisher: one
//! long-lived confirm-mode channel with many publishes in flight, each request
//! awaiting only its own confirm, reconnecting in the background.

use crate::config::{Namespace, mask_url};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Event};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;
use tokio::sync::Notify;

/// A publish not confirmed within this long is answered `503`.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
/// Connecting (TCP and AMQP handshake) gives up after this long.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
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

/// Connects to RabbitMQ, with a timeout.
pub async fn connect(url: &str, name: &str) -> Result<Connection, BrokerError> {
    let unreachable = |reason: String| BrokerError::Unreachable {
        url: mask_url(url),
        reason,
    };
    let props = ConnectionProperties::default().with_connection_name(name.into());
    match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url, props)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(unreachable(e.to_string())),
        Err(_) => Err(unreachable(format!("no answer within {CONNECT_TIMEOUT:?}"))),
    }
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

/// Declares `<ns>.orders` and `<ns>.orders.dlq` (idempotent).
pub async fn declare_queues(channel: &Channel, ns: &Namespace) -> Result<(), lapin::Error> {
    let mut dlq_args = FieldTable::default();
    dlq_args.insert("x-queue-type".into(), long("quorum"));
    channel
        .queue_declare(ns.dead_letter_queue().into(), durable(), dlq_args)
        .await?;
    channel
        .queue_declare(
            ns.orders_queue().into(),
            durable(),
            order_queue_arguments(ns),
        )
        .await?;
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
    for queue in [ns.orders_queue(), ns.dead_letter_queue()] {
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

/// Publishes one persistent, mandatory JSON message to `queue` through the
/// default exchange and waits (at most [`CONFIRM_TIMEOUT`]) for its confirm.
pub async fn publish_confirmed(
    channel: &Channel,
    queue: &str,
    message_id: &str,
    payload: &[u8],
    headers: Option<FieldTable>,
) -> Result<(), PublishError> {
    let mut props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_message_id(ShortString::from(message_id))
        .with_delivery_mode(2);
    if let Some(h) = headers {
        props = props.with_headers(h);
    }
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
    match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
        Err(_) => Err(PublishError::Timeout(CONFIRM_TIMEOUT)),
        Ok(Err(e)) => Err(PublishError::Channel(e)),
        Ok(Ok(Confirmation::Ack(None))) => Ok(()),
        Ok(Ok(Confirmation::Ack(Some(_)))) => Err(PublishError::Returned),
        Ok(Ok(Confirmation::Nack(_))) => Err(PublishError::Nacked),
        Ok(Ok(Confirmation::NotRequested)) => Err(PublishError::Nacked),
    }
}

/// Header table carrying the dead-letter reason.
pub fn reason_headers(reason: &str) -> FieldTable {
    let mut h = FieldTable::default();
    h.insert(REASON_HEADER.into(), long(reason));
    h
}

struct PublisherState {
    channel: RwLock<Option<Channel>>,
    kick: Notify,
}

/// The API's order publisher. Cloning shares the one channel.
#[derive(Clone)]
pub struct OrderPublisher {
    state: Arc<PublisherState>,
    queue: String,
    _task: Arc<AbortOnDrop>,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl OrderPublisher {
    /// Starts the publisher; it connects (and reconnects) in the background,
    /// so the API starts even while RabbitMQ is away.
    pub fn start(url: &str, ns: &Namespace) -> Self {
        let state = Arc::new(PublisherState {
            channel: RwLock::new(None),
            kick: Notify::new(),
        });
        let task = tokio::spawn(maintain(Arc::downgrade(&state), url.to_owned(), ns.clone()));
        Self {
            state,
            queue: ns.orders_queue(),
            _task: Arc::new(AbortOnDrop(task)),
        }
    }

    /// A channel ready for publishing, if connected.
    fn channel(&self) -> Option<Channel> {
        let guard = self.state.channel.read().unwrap_or_else(|p| p.into_inner());
        guard.as_ref().filter(|c| c.status().connected()).cloned()
    }

    pub fn is_connected(&self) -> bool {
        self.channel().is_some()
    }

    /// Publishes one order and waits for RabbitMQ's confirm.
    pub async fn publish(&self, message_id: &str, payload: &[u8]) -> Result<(), PublishError> {
        let channel = self.channel().ok_or_else(|| {
            self.state.kick.notify_one();
            PublishError::NotConnected
        })?;
        let result = publish_confirmed(&channel, &self.queue, message_id, payload, None).await;
        if matches!(result, Err(PublishError::Channel(_))) {
            self.state.kick.notify_one();
        }
        result
    }
}

async fn open_channel(url: &str, ns: &Namespace) -> Result<(Connection, Channel), BrokerError> {
    let conn = connect(url, "flashsale-api").await?;
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    declare_queues(&channel, ns).await?;
    Ok((conn, channel))
}

/// Keeps one confirm-mode channel open; reconnects with backoff when it fails.
async fn maintain(state: Weak<PublisherState>, url: String, ns: Namespace) {
    use futures_util::StreamExt;
    let mut backoff = Duration::from_millis(100);
    loop {
        match open_channel(&url, &ns).await {
            Ok((conn, channel)) => {
                let Some(s) = state.upgrade() else { return };
                *s.channel.write().unwrap_or_else(|p| p.into_inner()) = Some(channel.clone());
                drop(s);
                tracing::info!(url = %mask_url(&url), "publisher connected to RabbitMQ");
                backoff = Duration::from_millis(100);
                let mut events = conn.events_listener();
                loop {
                    let Some(s) = state.upgrade() else {
                        let _ = conn.close(200, "shutdown".into()).await;
                        return;
                    };
                    let kicked = tokio::select! {
                        event = events.next() => match event {
                            Some(Event::Error(e)) => {
                                tracing::warn!(error = %e, "RabbitMQ connection failed");
                                break;
                            }
                            None => break,
                            Some(_) => false,
                        },
                        () = s.kick.notified() => true,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {
                            record_queue_stats(&channel, &ns).await;
                            false
                        }
                    };
                    if !conn.status().connected() || !channel.status().connected() {
                        if kicked {
                            tracing::warn!("RabbitMQ channel lost");
                        }
                        break;
                    }
                }
                if let Some(s) = state.upgrade() {
                    *s.channel.write().unwrap_or_else(|p| p.into_inner()) = None;
                }
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    conn.close(200, "reconnecting".into()),
                )
                .await;
            }
            Err(e) => tracing::warn!(error = %e, "publisher cannot connect; retrying"),
        }
        if state.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}
