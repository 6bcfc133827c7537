//! The API's order publisher: one long-lived connection with a pool of
//! confirm-mode channels, each carrying one publish at a time, reconnecting
//! in the background.
//!
//! One publish per channel is what makes a returned (unroutable) message
//! provably its own request's: lapin hands a `basic.return` to whichever
//! confirm completes next on the channel, and under `multiple` acks that can
//! be another publish's. With one confirm pending per channel there is no
//! other, and the returned message's `message_id` is checked besides.

use super::rabbitmq::{
    BrokerError, CALL_TIMEOUT, PUBLISH_BUDGET, PUBLISH_CHANNELS, PublishError, connect,
    declare_queues, message_properties, publish_until, record_queue_stats,
};
use crate::config::{Namespace, mask_url};
use crate::domain::ProductId;
use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection, Event};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;
use tokio::sync::Notify;

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
    ns: Namespace,
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
            ns: ns.clone(),
            _task: Arc::new(AbortOnDrop(task)),
        }
    }

    pub fn is_connected(&self) -> bool {
        self.state.connection().is_some()
    }

    /// Publishes one order and waits for RabbitMQ's confirm, on a channel
    /// that carries nothing else meanwhile; all of it within
    /// [`PUBLISH_BUDGET`].
    pub async fn publish(
        &self,
        product: ProductId,
        message_id: &str,
        payload: &[u8],
    ) -> Result<(), PublishError> {
        let not_connected = || {
            self.state.kick.notify_one();
            PublishError::NotConnected
        };
        let deadline = tokio::time::Instant::now() + PUBLISH_BUDGET;
        let out_of_time = |_| PublishError::Timeout(PUBLISH_BUDGET);
        let connection = self.state.connection().ok_or_else(not_connected)?;
        let _slot = tokio::time::timeout_at(deadline, self.state.slots.acquire())
            .await
            .map_err(out_of_time)?
            .map_err(|_| not_connected())?;
        let channel = match self.state.take_idle() {
            Some(channel) => channel,
            None => tokio::time::timeout_at(deadline, confirm_channel(&connection))
                .await
                .map_err(out_of_time)??,
        };
        let queue = self.ns.queue_for(product.get());
        let props = message_properties(message_id, None);
        let result = publish_until(&channel, &queue, payload, props, deadline).await;
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
