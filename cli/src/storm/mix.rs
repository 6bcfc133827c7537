//! The buy mix: which product, user and quantity each request carries, which
//! requests repeat an earlier one (a retrying client) and which send one of
//! the contract's bad inputs. What no general load generator knows.

use rand::Rng;
use rand::rngs::SmallRng;
use std::sync::Mutex;

/// How traffic spreads over the products.
#[derive(Debug, Clone, PartialEq)]
pub enum Skew {
    Uniform,
    /// Rank k (the k-th product) gets weight 1/k^s.
    Zipf(f64),
    /// That fraction of traffic on the first product, the rest uniform.
    Hot(f64),
}

impl std::str::FromStr for Skew {
    type Err = String;
    fn from_str(raw: &str) -> Result<Self, String> {
        let bad = || format!("skew {raw:?}: expected uniform, zipf:S (S > 0) or hot:P (0..1)");
        match raw.split_once(':') {
            None if raw == "uniform" => Ok(Skew::Uniform),
            Some(("zipf", s)) => match s.parse::<f64>() {
                Ok(s) if s > 0.0 && s.is_finite() => Ok(Skew::Zipf(s)),
                _ => Err(bad()),
            },
            Some(("hot", p)) => match p.parse::<f64>() {
                Ok(p) if (0.0..=1.0).contains(&p) => Ok(Skew::Hot(p)),
                _ => Err(bad()),
            },
            _ => Err(bad()),
        }
    }
}

/// `--quantity 2` or `--quantity 1-3` (uniform in the range).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuantityRange {
    pub min: i32,
    pub max: i32,
}

impl std::str::FromStr for QuantityRange {
    type Err = String;
    fn from_str(raw: &str) -> Result<Self, String> {
        let bad = || format!("quantity {raw:?}: expected Q or MIN-MAX with 1 <= MIN <= MAX");
        let (a, b) = raw.split_once('-').unwrap_or((raw, raw));
        let (min, max): (i32, i32) = (
            a.trim().parse().map_err(|_| bad())?,
            b.trim().parse().map_err(|_| bad())?,
        );
        if min < 1 || max < min {
            return Err(bad());
        }
        Ok(Self { min, max })
    }
}

/// What a request is, and what the answer to it should be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A new key and a valid body.
    Fresh,
    /// An earlier request's key and body again. `replays` when the earlier
    /// one was answered 202: then the answer must be 200.
    Duplicate { replays: bool },
    /// One of the contract's bad inputs, which must get `expect`.
    Invalid { expect: u16 },
}

impl Kind {
    /// The status this request must get, when the contract fixes one.
    pub fn expected_status(self) -> Option<u16> {
        match self {
            Kind::Fresh | Kind::Duplicate { replays: false } => None,
            Kind::Duplicate { replays: true } => Some(200),
            Kind::Invalid { expect } => Some(expect),
        }
    }
}

/// One request to send.
#[derive(Debug, Clone)]
pub struct BuyRequest {
    pub key: String,
    pub body: String,
    /// The buyer a token names for it (with `--jwt-secret`/`--jwt-key`).
    pub buyer: String,
    pub kind: Kind,
}

/// The mix a storm sends.
#[derive(Debug, Clone)]
pub struct BuyMix {
    pub products: Vec<i64>,
    pub skew: Skew,
    /// Buyers drawn from this many users; `None`: every request its own buyer.
    pub users: Option<u64>,
    pub quantity: QuantityRange,
    pub duplicate_ratio: f64,
    pub invalid_ratio: f64,
    /// How each buy's `Idempotency-Key` is made.
    pub keys: KeyStyle,
}

/// How a storm makes its `Idempotency-Key`s.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyStyle {
    /// A random UUIDv4 a request (36 characters): what real clients send.
    #[default]
    Uuid,
    /// `storm-<run>-<n>` (about 20 characters), for comparing with older figures.
    Sequential,
}

/// An answered request that a later duplicate may repeat.
#[derive(Debug, Clone)]
struct Answered {
    key: String,
    body: String,
    buyer: String,
    accepted: bool,
}

/// Most answered requests remembered for duplicates.
const REMEMBERED: usize = 4096;

/// Turns request numbers into requests. Shared by every load task; the
/// only lock is the short one on the memory of answered requests.
pub struct MixSource {
    mix: BuyMix,
    run: String,
    /// Cumulative product weights for the skew.
    cumulative: Vec<f64>,
    answered: Mutex<Vec<Answered>>,
}

/// The contract's bad inputs, one chosen at random per invalid request.
pub const BAD_INPUTS: &[&str] = &[
    "malformed JSON",
    "not an object",
    "wrong type",
    "missing field",
    "empty userId",
    "userId over 64 characters",
    "productId below 1",
    "quantity below 1",
    "quantity over max_per_order",
    "malformed Idempotency-Key",
    "unknown product",
    "body over 16 KiB",
    "key reused with another body",
];

impl MixSource {
    /// `run` makes this storm's keys and buyers unique.
    pub fn new(mix: BuyMix, run: String) -> Self {
        let weights: Vec<f64> = (1..=mix.products.len())
            .map(|rank| match mix.skew {
                Skew::Uniform => 1.0,
                Skew::Zipf(s) => 1.0 / (rank as f64).powf(s),
                Skew::Hot(p) if mix.products.len() == 1 => p.max(f64::MIN_POSITIVE),
                Skew::Hot(p) if rank == 1 => p,
                Skew::Hot(p) => (1.0 - p) / (mix.products.len() - 1) as f64,
            })
            .collect();
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let cumulative = weights
            .iter()
            .map(|w| {
                acc += w / total;
                acc
            })
            .collect();
        Self {
            mix,
            run,
            cumulative,
            answered: Mutex::new(Vec::with_capacity(REMEMBERED)),
        }
    }

    pub fn run_id(&self) -> &str {
        &self.run
    }

    /// Request number `i`.
    pub fn request(&self, i: u64, rng: &mut SmallRng) -> BuyRequest {
        let roll: f64 = rng.random();
        if roll < self.mix.invalid_ratio {
            return self.invalid(i, rng);
        }
        if roll < self.mix.invalid_ratio + self.mix.duplicate_ratio
            && let Some(earlier) = self.earlier(rng)
        {
            return BuyRequest {
                key: earlier.key,
                body: earlier.body,
                buyer: earlier.buyer,
                kind: Kind::Duplicate {
                    replays: earlier.accepted,
                },
            };
        }
        let buyer = self.user(i, rng);
        let q = self.mix.quantity;
        BuyRequest {
            key: self.key(i),
            body: body(&buyer, self.product(rng), rng.random_range(q.min..=q.max)),
            buyer,
            kind: Kind::Fresh,
        }
    }

    /// Remembers an answered fresh request so later duplicates can repeat it.
    pub fn answered(&self, request: &BuyRequest, status: u16, rng: &mut SmallRng) {
        if request.kind != Kind::Fresh || self.mix.duplicate_ratio == 0.0 {
            return;
        }
        let entry = Answered {
            key: request.key.clone(),
            body: request.body.clone(),
            buyer: request.buyer.clone(),
            accepted: status == 202,
        };
        let Ok(mut memory) = self.answered.lock() else {
            return;
        };
        if memory.len() < REMEMBERED {
            memory.push(entry);
        } else {
            let slot = rng.random_range(0..REMEMBERED);
            memory[slot] = entry;
        }
    }

    fn earlier(&self, rng: &mut SmallRng) -> Option<Answered> {
        let memory = self.answered.lock().ok()?;
        if memory.is_empty() {
            return None;
        }
        Some(memory[rng.random_range(0..memory.len())].clone())
    }

    fn key(&self, i: u64) -> String {
        match self.mix.keys {
            KeyStyle::Uuid => uuid::Uuid::new_v4().to_string(),
            KeyStyle::Sequential => format!("storm-{}-{i}", self.run),
        }
    }

    fn product(&self, rng: &mut SmallRng) -> i64 {
        let roll: f64 = rng.random();
        let at = self.cumulative.partition_point(|c| *c < roll);
        self.mix.products[at.min(self.mix.products.len() - 1)]
    }

    fn user(&self, i: u64, rng: &mut SmallRng) -> String {
        match self.mix.users {
            Some(n) => format!("user-{}", rng.random_range(0..n.max(1))),
            None => format!("buyer-{}-{i}", self.run),
        }
    }

    fn invalid(&self, i: u64, rng: &mut SmallRng) -> BuyRequest {
        let which = rng.random_range(0..BAD_INPUTS.len());
        let (key, product, user) = (self.key(i), self.product(rng), self.user(i, rng));
        // The token names the body's buyer wherever the body has a valid one.
        let mut buyer = user.clone();
        let (key, body, expect) = match which {
            0 => (key, r#"{"userId":"x","productId":"#.to_owned(), 400),
            1 => (key, "[1,2,3]".to_owned(), 400),
            2 => (
                key,
                format!(r#"{{"userId":"{user}","productId":"one","quantity":1}}"#),
                400,
            ),
            3 => (
                key,
                format!(r#"{{"userId":"{user}","productId":{product}}}"#),
                400,
            ),
            4 => (key, body("", product, 1), 400),
            5 => (key, body(&"u".repeat(65), product, 1), 400),
            6 => (key, body(&user, 0, 1), 400),
            7 => (key, body(&user, product, 0), 400),
            8 => (key, body(&user, product, 1_000_000), 400),
            9 => (format!("bad key {i}!"), body(&user, product, 1), 400),
            10 => (key, body(&user, 9_000_000_000_000, 1), 404),
            11 => (key, body(&"u".repeat(17 * 1024), product, 1), 413),
            _ => match self.earlier(rng).filter(|e| e.accepted) {
                Some(e) => {
                    buyer = format!("{user}-other");
                    (e.key, body(&buyer, product, 1), 422)
                }
                None => (key, body(&user, product, 0), 400),
            },
        };
        BuyRequest {
            key,
            body,
            buyer,
            kind: Kind::Invalid { expect },
        }
    }
}

fn body(user: &str, product: i64, quantity: i32) -> String {
    format!(r#"{{"userId":"{user}","productId":{product},"quantity":{quantity}}}"#)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn source(mix: BuyMix) -> MixSource {
        MixSource::new(mix, "t".into())
    }

    fn mix(products: usize, skew: Skew) -> BuyMix {
        BuyMix {
            products: (1..=products as i64).collect(),
            skew,
            users: None,
            quantity: QuantityRange { min: 1, max: 1 },
            duplicate_ratio: 0.0,
            invalid_ratio: 0.0,
            keys: KeyStyle::default(),
        }
    }

    fn shares(s: &MixSource, n: usize) -> Vec<f64> {
        let mut rng = SmallRng::seed_from_u64(7);
        let mut counts = vec![0usize; s.mix.products.len()];
        for _ in 0..n {
            counts[(s.product(&mut rng) - 1) as usize] += 1;
        }
        counts.iter().map(|c| *c as f64 / n as f64).collect()
    }

    #[test]
    fn parses_skews_and_quantities() {
        assert_eq!("uniform".parse(), Ok(Skew::Uniform));
        assert_eq!("zipf:1.2".parse(), Ok(Skew::Zipf(1.2)));
        assert_eq!("hot:0.9".parse(), Ok(Skew::Hot(0.9)));
        for bad in ["zipf", "zipf:0", "hot:2", "pareto:1", ""] {
            assert!(bad.parse::<Skew>().is_err(), "{bad}");
        }
        assert_eq!("2".parse(), Ok(QuantityRange { min: 2, max: 2 }));
        assert_eq!("1-3".parse(), Ok(QuantityRange { min: 1, max: 3 }));
        for bad in ["0", "3-1", "a", "1-"] {
            assert!(bad.parse::<QuantityRange>().is_err(), "{bad}");
        }
    }

    #[test]
    fn skews_spread_traffic_as_asked() {
        let hot = shares(&source(mix(5, Skew::Hot(0.8))), 50_000);
        assert!((hot[0] - 0.8).abs() < 0.01, "{hot:?}");
        assert!((hot[4] - 0.05).abs() < 0.01, "{hot:?}");
        let uniform = shares(&source(mix(4, Skew::Uniform)), 40_000);
        assert!(
            uniform.iter().all(|s| (s - 0.25).abs() < 0.01),
            "{uniform:?}"
        );
        // zipf:1 over 3 products: weights 1, 1/2, 1/3 of 11/6.
        let zipf = shares(&source(mix(3, Skew::Zipf(1.0))), 60_000);
        for (got, want) in zipf.iter().zip([6.0 / 11.0, 3.0 / 11.0, 2.0 / 11.0]) {
            assert!((got - want).abs() < 0.01, "{zipf:?}");
        }
    }

    #[test]
    fn duplicates_repeat_answered_requests_and_know_what_to_expect() {
        let s = source(BuyMix {
            duplicate_ratio: 0.5,
            ..mix(1, Skew::Uniform)
        });
        let mut rng = SmallRng::seed_from_u64(1);
        let first = s.request(0, &mut rng);
        assert_eq!(first.kind, Kind::Fresh, "nothing answered yet to repeat");
        s.answered(&first, 202, &mut rng);
        let repeats: Vec<_> = (1..2000)
            .map(|i| s.request(i, &mut rng))
            .filter(|r| r.kind != Kind::Fresh)
            .collect();
        assert!((900..1100).contains(&repeats.len()), "{}", repeats.len());
        for r in repeats {
            assert_eq!(r.kind, Kind::Duplicate { replays: true });
            assert_eq!(
                (r.key.as_str(), r.body.as_str()),
                (first.key.as_str(), first.body.as_str())
            );
            assert_eq!(r.kind.expected_status(), Some(200));
        }
    }

    #[test]
    fn keys_are_uuids_unless_sequential_keys_are_asked_for() {
        let mut rng = SmallRng::seed_from_u64(5);
        let uuids = source(mix(1, Skew::Uniform));
        let keys: std::collections::HashSet<String> =
            (0..1000).map(|i| uuids.request(i, &mut rng).key).collect();
        assert_eq!(keys.len(), 1000, "UUID keys repeat");
        for k in &keys {
            assert_eq!(k.len(), 36);
            assert!(flashsale_engine::IdempotencyKey::parse(k).is_ok(), "{k}");
        }
        let sequential = source(BuyMix {
            keys: KeyStyle::Sequential,
            ..mix(1, Skew::Uniform)
        });
        let k = sequential.request(7, &mut rng).key;
        assert!(k.starts_with("storm-") && k.ends_with("-7"), "{k}");
    }

    #[test]
    fn invalid_requests_cover_the_bad_inputs() {
        let s = source(BuyMix {
            invalid_ratio: 1.0,
            ..mix(2, Skew::Uniform)
        });
        let mut rng = SmallRng::seed_from_u64(3);
        let mut expects = std::collections::BTreeSet::new();
        for i in 0..500 {
            let r = s.request(i, &mut rng);
            let Kind::Invalid { expect } = r.kind else {
                panic!("{r:?}")
            };
            expects.insert(expect);
        }
        assert_eq!(expects.into_iter().collect::<Vec<_>>(), vec![400, 404, 413]);
    }
}
