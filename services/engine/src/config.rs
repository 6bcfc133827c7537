//! Configuration shared by every part: where the three backends live and the
//! namespace that prefixes every Redis key and RabbitMQ queue.

use clap::Args;
use std::time::Duration;

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/flashsale";
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const DEFAULT_NAMESPACE: &str = "flashsale";

/// The backends and namespace, read from the environment or flags.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Backends")]
pub struct BackendUrls {
    /// PostgreSQL URL; the database is created when missing.
    #[arg(long, global = true, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true)]
    pub database_url: String,
    /// Redis URL (locks, fencing counters, accept log, heartbeats).
    #[arg(long, global = true, env = "REDIS_URL", default_value = DEFAULT_REDIS_URL, hide_env_values = true)]
    pub redis_url: String,
    /// RabbitMQ URL (the order queue and its dead-letter queue).
    #[arg(long, global = true, env = "AMQP_URL", default_value = DEFAULT_AMQP_URL, hide_env_values = true)]
    pub amqp_url: String,
    /// Prefix of every Redis key and RabbitMQ queue name.
    #[arg(long, global = true, env = "FLASHSALE_NAMESPACE", default_value = DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// Order queue partitions K: a product's orders go to
    /// `<ns>.orders.<id mod K>` (K = 1: `<ns>.orders`). Recorded in
    /// PostgreSQL; change it with `fsctl migrate --partitions K`.
    /// (default 1)
    #[arg(long, global = true, env = "FLASHSALE_PARTITIONS",
          value_parser = clap::value_parser!(u16).range(1..=MAX_PARTITIONS as i64))]
    pub partitions: Option<u16>,
}

/// Most order queue partitions a deployment may have.
pub const MAX_PARTITIONS: u16 = 64;

impl BackendUrls {
    pub fn namespace(&self) -> Namespace {
        Namespace::partitioned(&self.namespace, self.partitions.unwrap_or(1))
    }
}

impl Default for BackendUrls {
    fn default() -> Self {
        Self {
            database_url: DEFAULT_DATABASE_URL.into(),
            redis_url: DEFAULT_REDIS_URL.into(),
            amqp_url: DEFAULT_AMQP_URL.into(),
            namespace: DEFAULT_NAMESPACE.into(),
            partitions: None,
        }
    }
}

/// The names of every Redis key and queue of one deployment, and how many
/// partitions its order queue has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace(String, u16);

impl Namespace {
    pub fn new(prefix: &str) -> Self {
        Self(prefix.to_owned(), 1)
    }
    /// With `partitions` order queues (at least 1).
    pub fn partitioned(prefix: &str, partitions: u16) -> Self {
        Self(prefix.to_owned(), partitions.max(1))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    pub fn partitions(&self) -> u16 {
        self.1
    }
    /// The unpartitioned order queue's name, `<ns>.orders`.
    pub fn orders_queue(&self) -> String {
        format!("{}.orders", self.0)
    }
    /// Partition `p`'s order queue: `<ns>.orders.<p>`, or `<ns>.orders`
    /// when there is one partition.
    pub fn partition_queue(&self, p: u16) -> String {
        if self.1 == 1 {
            self.orders_queue()
        } else {
            format!("{}.orders.{p}", self.0)
        }
    }
    /// Every order queue, partition by partition.
    pub fn order_queues(&self) -> Vec<String> {
        (0..self.1).map(|p| self.partition_queue(p)).collect()
    }
    /// The partition of a product's orders: `id mod K`.
    pub fn partition_of(&self, product: i64) -> u16 {
        product.rem_euclid(i64::from(self.1)) as u16
    }
    /// The order queue of a product's orders.
    pub fn queue_for(&self, product: i64) -> String {
        self.partition_queue(self.partition_of(product))
    }
    pub fn dead_letter_queue(&self) -> String {
        format!("{}.orders.dlq", self.0)
    }
    /// A product's lock; its keys share the hash tag `{<id>}`, so the
    /// scripts that touch several stay in one Redis Cluster slot.
    pub fn lock_key(&self, product: i64) -> String {
        format!("{}{{{product}}}", self.lock_prefix())
    }
    /// What every product lock's key starts with.
    pub fn lock_prefix(&self) -> String {
        format!("{}:lock:product:", self.0)
    }
    pub fn fence_key(&self, product: i64) -> String {
        format!("{}:fence:product:{{{product}}}", self.0)
    }
    /// Units a buy may still take (admission counter), hash-tagged by product.
    pub fn tokens_key(&self, product: i64) -> String {
        format!("{}:tokens:product:{{{product}}}", self.0)
    }
    /// The orders that took units and are not settled yet: key -> quantity.
    pub fn admitted_key(&self, product: i64) -> String {
        format!("{}:tokens:admitted:product:{{{product}}}", self.0)
    }
    /// Bumped by every change of the counter other than a reconciliation.
    pub fn tokens_version_key(&self, product: i64) -> String {
        format!("{}:tokens:version:product:{{{product}}}", self.0)
    }
    pub fn accept_key(&self, order_id: &str) -> String {
        format!("{}:order:{order_id}", self.0)
    }
    /// An API process's heartbeat (its instance id).
    pub fn api_key(&self, instance: &str) -> String {
        format!("{}:api:{instance}", self.0)
    }
    pub fn worker_key(&self, worker_id: &str) -> String {
        format!("{}:worker:{worker_id}", self.0)
    }
    /// Pub/sub channel of stock changes.
    pub fn stock_channel(&self) -> String {
        format!("{}:stock", self.0)
    }
    /// The pub/sub channel of order changes (`GET /orders/{id}/events`).
    pub fn order_events_channel(&self) -> String {
        format!("{}:order-events", self.0)
    }
    /// Glob matching every Redis key of this namespace.
    pub fn key_pattern(&self) -> String {
        format!("{}:*", self.0)
    }
}

/// `30s`, `500ms`, `2m`, `1h`, or plain seconds.
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let split = raw
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(raw.len());
    let (number, unit) = raw.split_at(split);
    let n: f64 = number
        .parse()
        .map_err(|_| format!("{raw:?} is not a duration like 30s, 500ms or 2m"))?;
    let seconds = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{raw:?}: unknown unit {unit:?} (ms, s, m, h)")),
    };
    Ok(Duration::from_secs_f64(seconds))
}

/// The URL with its password replaced by `***`, for messages and logs.
pub fn mask_url(url: &str) -> String {
    if url.contains(',') {
        return url.split(',').map(mask_url).collect::<Vec<_>>().join(",");
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host}{path}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_passwords_only() {
        assert_eq!(
            mask_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            mask_url("postgres://postgres@127.0.0.1:5432/flashsale"),
            "postgres://postgres@127.0.0.1:5432/flashsale"
        );
        assert_eq!(mask_url("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(mask_url("redis://:pw@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(
            mask_url("amqp://u:p1@a:1/%2f,amqp://u:p2@b:2/%2f"),
            "amqp://u:***@a:1/%2f,amqp://u:***@b:2/%2f"
        );
    }

    #[test]
    fn names_follow_the_contract() {
        let ns = Namespace::new("fs");
        assert_eq!(ns.orders_queue(), "fs.orders");
        assert_eq!(ns.dead_letter_queue(), "fs.orders.dlq");
        assert_eq!(ns.lock_key(7), "fs:lock:product:{7}");
        assert_eq!(ns.fence_key(7), "fs:fence:product:{7}");
        assert_eq!(ns.tokens_key(7), "fs:tokens:product:{7}");
        assert_eq!(ns.order_queues(), vec!["fs.orders"]);
        let three = Namespace::partitioned("fs", 3);
        assert_eq!(
            three.order_queues(),
            vec!["fs.orders.0", "fs.orders.1", "fs.orders.2"]
        );
        assert_eq!(three.queue_for(7), "fs.orders.1");
        assert_eq!(three.dead_letter_queue(), "fs.orders.dlq");
        assert_eq!(ns.worker_key("w1"), "fs:worker:w1");
    }
}
