//! RabbitMQ: the order queue and its dead-letter queue, declared with the
//! contract's arguments by every service, and the API's publisher: one
//! long-lived connection with a pool of confirm-mode channels, each carrying
//! one publish at a time, reconnecting in the background.
//!
//! One publish per channel is what makes a returned (unroutable) message
//! provably its own request's: lapin hands a `basic.return` to whichever
//! confirm completes next on the channel, and under `multiple` acks that can
//! be another publish's. With one confirm pending per channel there is no
//! other, and the returned message's `message_id` is checked besides.

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
    publish_with(channel, queue, payload, props).await
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
    match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
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

struct PublisherState {
    /// The live connection, if any.
    connection: RwLock<Option<Arc<Connection>>>,
    /// Confirm-mode channels with nothing in flight.
    idle: std::sync::Mutex<Vec<Channel>>,
    /// One permit per channel: publishes beyond [`PUBLISH_CHANNELS`] wait.
    slots: tokio::sync::Semaphore,
    kick: Notify,
}

impl PublisherState {
    fn connection(&self) -> Option<Arc<Connection>> {
        let guard = self.connection.read().unwrap_or_else(|p| p.into_inner());
        guard.as_ref().filter(|c| c.status().connected()).cloned()
    }

    fn set_connection(&self, connection: Option<Arc<Connection>>) {
        *self.connection.write().unwrap_or_else(|p| p.into_inner()) = connection;
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    fn take_idle(&self) -> Option<Channel> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(channel) = idle.pop() {
            if channel.status().connected() {
                return Some(channel);
            }
        }
        None
    }

    fn give_back(&self, channel: Channel) {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(channel);
    }
}

/// The API's order publisher. Cloning shares the connection and its channels.
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

async fn confirm_channel(connection: &Connection) -> Result<Channel, lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

impl OrderPublisher {
    /// Starts the publisher; it connects (and reconnects) in the background,
    /// so the API starts even while RabbitMQ is away.
    pub fn start(url: &str, ns: &Namespace) -> Self {
        let state = Arc::new(PublisherState {
            connection: RwLock::new(None),
            idle: std::sync::Mutex::new(Vec::new()),
            slots: tokio::sync::Semaphore::new(PUBLISH_CHANNELS),
            kick: Notify::new(),
        });
        let task = tokio::spawn(maintain(Arc::downgrade(&state), url.to_owned(), ns.clone()));
        Self {
            state,
            queue: ns.orders_queue(),
            _task: Arc::new(AbortOnDrop(task)),
        }
    }

    pub fn is_connected(&self) -> bool {
        self.state.connection().is_some()
    }

    /// Publishes one order and waits for RabbitMQ's confirm, on a channel
    /// that carries nothing else meanwhile.
    pub async fn publish(&self, message_id: &str, payload: &[u8]) -> Result<(), PublishError> {
        let not_connected = || {
            self.state.kick.notify_one();
            PublishError::NotConnected
        };
        let connection = self.state.connection().ok_or_else(not_connected)?;
        let _slot = tokio::time::timeout(CONFIRM_TIMEOUT, self.state.slots.acquire())
            .await
            .map_err(|_| PublishError::Timeout(CONFIRM_TIMEOUT))?
            .map_err(|_| not_connected())?;
        let channel = match self.state.take_idle() {
            Some(channel) => channel,
            None => tokio::time::timeout(CALL_TIMEOUT, confirm_channel(&connection))
                .await
                .map_err(|_| PublishError::Timeout(CALL_TIMEOUT))??,
        };
        let result = publish_confirmed(&channel, &self.queue, message_id, payload, None).await;
        match &result {
            // The confirm came: the channel has nothing in flight.
            Ok(()) | Err(PublishError::Returned | PublishError::Nacked) => {
                self.state.give_back(channel);
            }
            // A confirm may still come on it: never reuse it.
            Err(PublishError::Timeout(_)) => {
                tokio::spawn(async move {
                    let _ =
                        tokio::time::timeout(CALL_TIMEOUT, channel.close(200, "timed out".into()))
                            .await;
                });
            }
            Err(_) => self.state.kick.notify_one(),
        }
        result
    }
}

async fn open_connection(url: &str, ns: &Namespace) -> Result<Connection, BrokerError> {
    let conn = connect(url, "flashsale-api").await?;
    let channel = conn.create_channel().await?;
    declare_queues(&channel, ns).await?;
    let _ = channel.close(200, "declared".into()).await;
    Ok(conn)
}

/// Keeps one connection open; reconnects with backoff when it fails.
async fn maintain(state: Weak<PublisherState>, url: String, ns: Namespace) {
    use futures_util::StreamExt;
    let mut backoff = Duration::from_millis(100);
    loop {
        match open_connection(&url, &ns).await {
            Ok(conn) => {
                let conn = Arc::new(conn);
                // A channel for the queue statistics, apart from the publishers'.
                let stats = confirm_channel(&conn).await.ok();
                let Some(s) = state.upgrade() else { return };
                s.set_connection(Some(Arc::clone(&conn)));
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
                            if let Some(channel) = &stats {
                                record_queue_stats(channel, &ns).await;
                            }
                            false
                        }
                    };
                    if !conn.status().connected() {
                        if kicked {
                            tracing::warn!("RabbitMQ connection lost");
                        }
                        break;
                    }
                }
                if let Some(s) = state.upgrade() {
                    s.set_connection(None);
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
