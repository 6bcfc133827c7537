//! Order changes pushed to every API process, for `GET /orders/{id}/events`:
//! after a commit the worker publishes the ids of the group's orders (one
//! `PUBLISH` per group on `<ns>:order-events`, one id a line), the API after
//! a pay or a cancel, the holds sweep after an expiry. Each API subscribes
//! once and wakes the streams watching those orders, which then read the
//! order afresh from the ledger: no stream polls. Pub/sub may drop a message
//! (a reconnect): a stream also reads its order at each heartbeat.

use crate::config::Namespace;
use crate::redis_conn::{self, Redis, timed};
use futures_util::{Stream, StreamExt};

/// Where order changes are announced: Redis pub/sub, or in memory for the
/// embedded backends of `fsctl demo`.
#[derive(Clone)]
pub enum OrderEvents {
    Redis { redis: Redis, channel: String },
    Memory(tokio::sync::broadcast::Sender<String>),
}

impl OrderEvents {
    pub fn redis(redis: Redis, ns: &Namespace) -> Self {
        Self::Redis {
            redis,
            channel: ns.order_events_channel(),
        }
    }

    pub fn memory() -> Self {
        Self::Memory(tokio::sync::broadcast::channel(4096).0)
    }

    /// Announces that these orders changed; a failure only delays their
    /// streams until their next heartbeat.
    pub async fn announce<'a>(&self, orders: impl IntoIterator<Item = &'a str>) {
        let payload = orders.into_iter().collect::<Vec<_>>().join("\n");
        if payload.is_empty() {
            return;
        }
        match self {
            Self::Redis { redis, channel } => {
                let mut conn = redis.clone();
                let sent = timed(
                    redis::cmd("PUBLISH")
                        .arg(channel)
                        .arg(payload)
                        .query_async::<i64>(&mut conn),
                )
                .await;
                if let Err(e) = sent {
                    tracing::debug!(error = %e, "order changes not announced");
                }
            }
            Self::Memory(sender) => {
                // No receiver: no stream is open.
                let _ = sender.send(payload);
            }
        }
    }

    /// The embedded announcements, as a stream of payloads (see [`ids`]).
    pub fn follow_memory(&self) -> Option<impl Stream<Item = String> + use<>> {
        let Self::Memory(sender) = self else {
            return None;
        };
        let receiver = sender.subscribe();
        Some(futures_util::stream::unfold(receiver, |mut r| async move {
            loop {
                match r.recv().await {
                    Ok(payload) => return Some((payload, r)),
                    // Missed some: the streams read again at their heartbeat.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        }))
    }
}

/// The order ids of one announcement's payload.
pub fn ids(payload: &str) -> impl Iterator<Item = &str> {
    payload.lines().filter(|l| !l.is_empty())
}

/// Subscribes to the namespace's order changes on Redis (any node of a
/// cluster): each item one announcement's payload (see [`ids`]), read only
/// by a process with streams open.
pub async fn subscribe(
    url: &str,
    ns: &Namespace,
) -> redis::RedisResult<impl Stream<Item = String> + use<>> {
    let pubsub = redis_conn::subscribe(url, &ns.order_events_channel()).await?;
    Ok(pubsub
        .into_on_message()
        .filter_map(|msg| async move { msg.get_payload::<String>().ok() }))
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_announcement_is_one_id_a_line() {
        assert_eq!(
            super::ids("a\nb-2\n\n").collect::<Vec<_>>(),
            vec!["a", "b-2"]
        );
    }
}
