//! The order event streams of this process (`GET /orders/{id}/events`):
//! which orders are watched, woken when an announcement names them (Redis
//! pub/sub, or memory when embedded), and how many streams are open (a
//! bounded number: over it the route answers `503`).

use flashsale_engine::order_events::{self, OrderEvents};
use flashsale_engine::{BackendUrls, Namespace};
use futures_util::StreamExt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

#[derive(Default)]
pub struct Watchers {
    /// Each watched order: its wake-up and how many streams watch it.
    watched: Mutex<HashMap<String, (Arc<Notify>, usize)>>,
    open: AtomicUsize,
}

/// One open stream's watch of an order; dropping it ends the watch.
pub struct Watch {
    hub: Arc<Watchers>,
    pub key: String,
    pub notify: Arc<Notify>,
}

impl Watchers {
    /// Watches `key`; `None` when `max` streams are open already.
    pub fn watch(self: &Arc<Self>, key: &str, max: usize) -> Option<Watch> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let mut watched = self.watched.lock().unwrap_or_else(|p| p.into_inner());
        let entry = watched
            .entry(key.to_owned())
            .or_insert_with(|| (Arc::new(Notify::new()), 0));
        entry.1 += 1;
        Some(Watch {
            hub: self.clone(),
            key: key.to_owned(),
            notify: entry.0.clone(),
        })
    }

    /// Streams open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Wakes the streams watching any order of this announcement (read
    /// only when some stream is open).
    pub fn wake(&self, payload: &str) {
        let watched = self.watched.lock().unwrap_or_else(|p| p.into_inner());
        if watched.is_empty() {
            return;
        }
        for id in order_events::ids(payload) {
            if let Some((notify, _)) = watched.get(id) {
                notify.notify_waiters();
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.hub.open.fetch_sub(1, Ordering::AcqRel);
        let mut watched = self.hub.watched.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = watched.get_mut(&self.key) {
            entry.1 -= 1;
            if entry.1 == 0 {
                watched.remove(&self.key);
            }
        }
    }
}

/// Follows the announcements on Redis until aborted, resubscribing when
/// Redis drops.
pub async fn follow_redis(backends: BackendUrls, ns: Namespace, hub: Arc<Watchers>) {
    loop {
        let subscribed = tokio::time::timeout(
            Duration::from_secs(3),
            order_events::subscribe(&backends.redis_url, &ns),
        );
        match subscribed.await {
            Ok(Ok(changes)) => {
                let mut changes = std::pin::pin!(changes);
                while let Some(payload) = changes.next().await {
                    hub.wake(&payload);
                }
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "order events unavailable"),
            Err(_) => tracing::debug!("order events subscription timed out"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Follows the embedded announcements until aborted.
pub async fn follow_memory(events: OrderEvents, hub: Arc<Watchers>) {
    if let Some(changes) = events.follow_memory() {
        let mut changes = std::pin::pin!(changes);
        while let Some(payload) = changes.next().await {
            hub.wake(&payload);
        }
    }
}
