//! The API's order publisher: one long-lived connection, reconnecting in
//! the background, and a few lanes, each a confirm-mode channel that
//! carries the publishes waiting for it as one batch.
//!
//! Batches, because RabbitMQ's work per confirm falls when many publishes
//! are in flight on one channel: it acks them together (`multiple`).
//!
//! A returned (unroutable) message stays its own request's. lapin hands a
//! `basic.return` to whichever confirm completes next on the channel, which
//! with several in flight may be another publish's. So a lane waits for
//! every confirm of its batch before it sends the next: AMQP sends a
//! message's `basic.return` before its `basic.ack`, so by then every return
//! of the batch has been handed to one of the batch's confirms, and the
//! publishes whose `message_id` came back are the returned ones, whichever
//! confirm carried it.

use super::rabbitmq::{
    BrokerError, CALL_TIMEOUT, PUBLISH_BUDGET, PublishError, confirmed, connect, declare_queues,
    message_properties, record_queue_stats,
};
use crate::config::{Namespace, mask_url};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{Channel, Connection, Event};
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;

/// Lanes (channels) of the API's publisher: two, so that one batch fills
/// while the other waits for its confirms (measured against 1 and 8
/// in docs/performance.md).
pub const PUBLISH_LANES: usize = 2;
/// Publishes one lane sends as one batch, at most.
pub const PUBLISH_BATCH: usize = 256;

struct PublisherState {
    /// The live connection, if any.
    connection: RwLock<Option<Arc<Connection>>>,
    kick: Notify,
}

impl PublisherState {
    fn connection(&self) -> Option<Arc<Connection>> {
        let guard = self.connection.read().unwrap_or_else(|p| p.into_inner());
        guard.as_ref().filter(|c| c.status().connected()).cloned()
    }

    fn set_connection(&self, connection: Option<Arc<Connection>>) {
        *self.connection.write().unwrap_or_else(|p| p.into_inner()) = connection;
    }
}

/// One order to publish, and where its outcome goes.
struct Request {
    queue: String,
    message_id: String,
    payload: Vec<u8>,
    deadline: Instant,
    outcome: oneshot::Sender<Result<(), PublishError>>,
}

/// The API's order publisher. Cloning shares the connection and its lanes.
#[derive(Clone)]
pub struct OrderPublisher {
    state: Arc<PublisherState>,
    ns: Namespace,
    lanes: Arc<[mpsc::UnboundedSender<Request>]>,
    next_lane: Arc<AtomicUsize>,
    _tasks: Arc<AbortOnDrop>,
}

struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
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
            kick: Notify::new(),
        });
        let mut tasks = vec![tokio::spawn(maintain(
            Arc::downgrade(&state),
            url.to_owned(),
            ns.clone(),
        ))];
        let mut lanes = Vec::with_capacity(PUBLISH_LANES);
        for _ in 0..PUBLISH_LANES {
            let (sender, requests) = mpsc::unbounded_channel();
            tasks.push(tokio::spawn(lane(Arc::downgrade(&state), requests)));
            lanes.push(sender);
        }
        Self {
            state,
            ns: ns.clone(),
            lanes: lanes.into(),
            next_lane: Arc::default(),
            _tasks: Arc::new(AbortOnDrop(tasks)),
        }
    }

    pub fn is_connected(&self) -> bool {
        self.state.connection().is_some()
    }

    /// Publishes one order and waits for RabbitMQ's confirm, all of it
    /// within [`PUBLISH_BUDGET`].
    pub async fn publish(
        &self,
        product: i64,
        message_id: &str,
        payload: &[u8],
    ) -> Result<(), PublishError> {
        if self.state.connection().is_none() {
            self.state.kick.notify_one();
            return Err(PublishError::NotConnected);
        }
        let deadline = Instant::now() + PUBLISH_BUDGET;
        let (outcome, published) = oneshot::channel();
        let request = Request {
            queue: self.ns.queue_for(product),
            message_id: message_id.to_owned(),
            payload: payload.to_vec(),
            deadline,
            outcome,
        };
        let lane = self.next_lane.fetch_add(1, Ordering::Relaxed) % self.lanes.len();
        self.lanes[lane]
            .send(request)
            .map_err(|_| PublishError::NotConnected)?;
        match tokio::time::timeout_at(deadline, published).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(PublishError::NotConnected),
            Err(_) => Err(PublishError::Timeout(PUBLISH_BUDGET)),
        }
    }
}

/// One lane: takes every request waiting (up to [`PUBLISH_BATCH`]),
/// publishes them on its channel and waits for all their confirms before
/// the next batch.
async fn lane(state: Weak<PublisherState>, mut requests: mpsc::UnboundedReceiver<Request>) {
    let mut channel: Option<Channel> = None;
    let mut batch = Vec::with_capacity(PUBLISH_BATCH);
    while requests.recv_many(&mut batch, PUBLISH_BATCH).await > 0 {
        let Some(state) = state.upgrade() else { return };
        // A request whose caller stopped waiting was answered `503`: never
        // publish it afterwards.
        let now = Instant::now();
        batch.retain(|r| !r.outcome.is_closed() && r.deadline > now);
        if !batch.is_empty() {
            publish_batch(&state, &mut channel, &mut batch).await;
        }
        batch.clear();
    }
}

/// Publishes `batch` on the lane's channel (opened if need be) and hands
/// each request its outcome.
async fn publish_batch(
    state: &PublisherState,
    channel: &mut Option<Channel>,
    batch: &mut Vec<Request>,
) {
    let deadline = batch
        .iter()
        .map(|r| r.deadline)
        .max()
        .unwrap_or_else(Instant::now);
    let open = match channel.take().filter(|c| c.status().connected()) {
        Some(open) => Ok(open),
        None => match state.connection() {
            None => Err(PublishError::NotConnected),
            Some(connection) => {
                match tokio::time::timeout_at(deadline, confirm_channel(&connection)).await {
                    Ok(Ok(open)) => Ok(open),
                    Ok(Err(e)) => Err(PublishError::Channel(e)),
                    Err(_) => Err(PublishError::Timeout(PUBLISH_BUDGET)),
                }
            }
        },
    };
    let open = match open {
        Ok(open) => open,
        Err(e) => {
            state.kick.notify_one();
            return answer_all(batch, &e);
        }
    };
    let options = BasicPublishOptions {
        mandatory: true,
        ..Default::default()
    };
    let confirms = async {
        let mut confirms = Vec::with_capacity(batch.len());
        for r in batch.iter() {
            let props = message_properties(&r.message_id, None);
            confirms.push(
                open.basic_publish(
                    "".into(),
                    r.queue.as_str().into(),
                    options,
                    &r.payload,
                    props,
                )
                .await?,
            );
        }
        Ok::<_, lapin::Error>(futures_util::future::join_all(confirms).await)
    };
    match tokio::time::timeout_at(deadline, confirms).await {
        Ok(Ok(confirmations)) => {
            // Every return of the batch came with one of its confirms.
            let returned: HashSet<String> = confirmations
                .iter()
                .filter_map(|c| match c {
                    Ok(lapin::Confirmation::Ack(Some(m)) | lapin::Confirmation::Nack(Some(m))) => {
                        m.properties.message_id().as_ref().map(|id| id.to_string())
                    }
                    _ => None,
                })
                .collect();
            let failed = confirmations.iter().any(Result::is_err);
            for (r, confirmation) in batch.drain(..).zip(confirmations) {
                let _ = r
                    .outcome
                    .send(confirmed(&r.message_id, confirmation, &returned));
            }
            if failed {
                state.kick.notify_one();
            } else {
                *channel = Some(open);
            }
        }
        Ok(Err(e)) => {
            state.kick.notify_one();
            answer_all(batch, &PublishError::Channel(e));
        }
        // Confirms may still come on it: never reuse it.
        Err(_) => {
            tokio::spawn(async move {
                let _ =
                    tokio::time::timeout(CALL_TIMEOUT, open.close(200, "timed out".into())).await;
            });
            answer_all(batch, &PublishError::Timeout(PUBLISH_BUDGET));
        }
    }
}

fn answer_all(batch: &mut Vec<Request>, error: &PublishError) {
    for r in batch.drain(..) {
        let _ = r.outcome.send(Err(error.clone()));
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
