//! The order event streams of this process (`GET /orders/{id}/events`):
//! which orders are watched, woken when an announcement names them (Redis
//! pub/sub, or memory when embedded), and how many streams are open: at
//! most `API_MAX_STREAMS` in all (over it `503`) and `API_STREAMS_PER_BUYER`
//! per holder (over it `429`).

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
    /// Streams open per holder (buyer or address).
    held: Mutex<HashMap<String, usize>>,
    open: AtomicUsize,
}

/// One open stream's watch of an order; dropping it ends the watch.
pub struct Watch {
    hub: Arc<Watchers>,
    holder: String,
    pub key: String,
    pub notify: Arc<Notify>,
}

/// Why a stream was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `API_MAX_STREAMS` are open in this process.
    Full,
    /// The holder has `API_STREAMS_PER_BUYER` open.
    HolderFull,
}

impl Watchers {
    /// Watches `key` for `holder`, within `max` streams in all and
    /// `per_holder` for the holder.
    pub fn watch(
        self: &Arc<Self>,
        key: &str,
        holder: &str,
        max: usize,
        per_holder: usize,
    ) -> Result<Watch, Refused> {
        {
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            let count = held.entry(holder.to_owned()).or_default();
            if *count >= per_holder {
                if *count == 0 {
                    held.remove(holder);
                }
                return Err(Refused::HolderFull);
            }
            if self.open.fetch_add(1, Ordering::AcqRel) >= max {
                self.open.fetch_sub(1, Ordering::AcqRel);
                if *count == 0 {
                    held.remove(holder);
                }
                return Err(Refused::Full);
            }
            *count += 1;
        }
        let mut watched = self.watched.lock().unwrap_or_else(|p| p.into_inner());
        let entry = watched
            .entry(key.to_owned())
            .or_insert_with(|| (Arc::new(Notify::new()), 0));
        entry.1 += 1;
        Ok(Watch {
            hub: self.clone(),
            holder: holder.to_owned(),
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
        {
            let mut held = self.hub.held.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(count) = held.get_mut(&self.holder) {
                *count -= 1;
                if *count == 0 {
                    held.remove(&self.holder);
                }
            }
        }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_holder_holds_at_most_its_share_and_gets_it_back_when_streams_end() {
        let hub = Arc::new(Watchers::default());
        let a1 = hub.watch("k1", "ip:1", 10, 2).unwrap();
        let _a2 = hub.watch("k2", "ip:1", 10, 2).unwrap();
        assert_eq!(
            hub.watch("k3", "ip:1", 10, 2).err(),
            Some(Refused::HolderFull)
        );
        // Another holder is not held back by the first.
        let _b = hub.watch("k1", "ip:2", 10, 2).unwrap();
        drop(a1);
        let _a3 = hub.watch("k3", "ip:1", 10, 2).unwrap();
        assert_eq!(hub.open(), 3);
        assert_eq!(hub.watch("k4", "ip:3", 3, 2).err(), Some(Refused::Full));
        assert!(hub.held.lock().unwrap().get("ip:3").is_none());
    }
}
