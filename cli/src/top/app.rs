//! The dashboard's state: what the collectors last reported, the rates
//! derived from it, and what the operator asked for (panel, filter, sort,
//! freeze, help). Updated only by `on_sample` and `on_key`; rendering
//! (`ui`) reads it and nothing else.

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use flashsale_engine::audit::{ProductBooks, Violation};
use flashsale_engine::heartbeat::WorkerView;
use flashsale_engine::locks::LockView;
use flashsale_engine::queue::QueueView;
use flashsale_engine::redis_conn::Master;
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// Rate samples kept for the sparklines.
pub const HISTORY: usize = 240;
pub use super::stats::{Buckets, LATENCY_WINDOW, Percentiles, percentiles};
use super::stats::{Counter, Window};

/// What the API's `/metrics` said.
#[derive(Debug, Clone, Default)]
pub struct ApiSample {
    /// `/health/ready`: `None` when ready, else what it said.
    pub not_ready: Option<String>,
    /// Orders accepted (`202`) since the API started.
    pub accepted_total: f64,
    /// `POST /buy` durations.
    pub buy_latency: Buckets,
}

/// What PostgreSQL said.
#[derive(Debug, Clone, Default)]
pub struct LedgerSample {
    pub books: Vec<ProductBooks>,
    pub names: BTreeMap<i64, String>,
    pub violations: Vec<Violation>,
    pub confirmed_orders: u64,
    pub rejected_orders: u64,
    /// Holds expired so far.
    pub expired_orders: u64,
    /// Each product's admission counter (Redis), where it exists.
    pub tokens: BTreeMap<i64, i64>,
}

/// What Redis (and the workers it names) said.
#[derive(Debug, Clone, Default)]
pub struct RedisSample {
    pub workers: Vec<WorkerView>,
    pub locks: Vec<LockView>,
    /// The Redis masters (one for a standalone server).
    pub masters: Vec<Master>,
    /// Accept-to-commit times, summed over the workers' `/metrics`.
    pub commit_latency: Buckets,
}

/// One collector's report.
#[derive(Debug, Clone)]
pub enum Sample {
    Api(Result<ApiSample, String>),
    Postgres(Result<LedgerSample, String>),
    Redis(Result<RedisSample, String>),
    Broker(Result<QueueView, String>),
}

/// The four sources, for health and staleness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    Api,
    Postgres,
    Redis,
    Broker,
}

impl Source {
    pub const ALL: [Source; 4] = [Source::Api, Source::Postgres, Source::Redis, Source::Broker];
    pub fn name(self) -> &'static str {
        match self {
            Source::Api => "API",
            Source::Postgres => "PostgreSQL",
            Source::Redis => "Redis",
            Source::Broker => "RabbitMQ",
        }
    }
}

/// How a source is doing.
#[derive(Debug, Clone, Default)]
pub struct Health {
    pub last_ok: Option<Instant>,
    pub error: Option<String>,
}

impl Health {
    /// How long since the last good answer, when that is too long ago (or
    /// there never was one and the source has failed).
    pub fn stale(&self, now: Instant, after: Duration) -> Option<Duration> {
        match self.last_ok {
            Some(at) if now.saturating_duration_since(at) > after => {
                Some(now.saturating_duration_since(at))
            }
            Some(_) => None,
            None if self.error.is_some() => Some(Duration::ZERO),
            None => None,
        }
    }

    pub fn is_up(&self) -> bool {
        self.error.is_none() && self.last_ok.is_some()
    }
}

/// Everything the screen shows. `f` freezes a copy of it.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub accepted: VecDeque<u64>,
    pub confirmed: VecDeque<u64>,
    pub rejected: VecDeque<u64>,
    pub accepted_now: Option<f64>,
    pub confirmed_now: Option<f64>,
    pub rejected_now: Option<f64>,
    /// Holds expiring per second, lately.
    pub expired_now: Option<f64>,
    pub not_ready: Option<String>,
    pub queue: Option<QueueView>,
    pub workers: Vec<WorkerRow>,
    pub locks: Vec<LockView>,
    pub masters: Vec<Master>,
    pub products: Vec<ProductRow>,
    /// `None` until PostgreSQL has answered once.
    pub violations: Option<Vec<Violation>>,
    pub accept_latency: Option<Percentiles>,
    pub commit_latency: Option<Percentiles>,
}

/// A product line.
#[derive(Debug, Clone, PartialEq)]
pub struct ProductRow {
    pub id: i64,
    pub name: String,
    pub seeded: i64,
    pub stock: i64,
    /// Units buys may still take (the admission counter), if known.
    pub tokens: Option<i64>,
    pub confirmed: i64,
    /// Units held for buyers who have not paid yet (products with holds).
    pub held: i64,
    pub rejected: i64,
}

/// A worker line; `gone` when its heartbeat expired since top saw it.
#[derive(Debug, Clone)]
pub struct WorkerRow {
    pub view: WorkerView,
    pub gone: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Panel {
    Overview,
    Products,
    Workers,
    Locks,
}

impl Panel {
    pub const ALL: [Panel; 4] = [
        Panel::Overview,
        Panel::Products,
        Panel::Workers,
        Panel::Locks,
    ];
    pub fn title(self) -> &'static str {
        match self {
            Panel::Overview => "Overview",
            Panel::Products => "Products",
            Panel::Workers => "Workers",
            Panel::Locks => "Locks",
        }
    }
    fn index(self) -> usize {
        Panel::ALL.iter().position(|p| *p == self).unwrap_or(0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortKey {
    Id,
    StockLeft,
    Confirmed,
    Rejected,
}

impl SortKey {
    pub fn name(self) -> &'static str {
        match self {
            SortKey::Id => "id",
            SortKey::StockLeft => "stock left",
            SortKey::Confirmed => "confirmed",
            SortKey::Rejected => "rejected",
        }
    }
    fn next(self) -> Self {
        match self {
            SortKey::Id => SortKey::StockLeft,
            SortKey::StockLeft => SortKey::Confirmed,
            SortKey::Confirmed => SortKey::Rejected,
            SortKey::Rejected => SortKey::Id,
        }
    }
}

pub struct App {
    pub namespace: String,
    pub api_url: String,
    pub refresh: Duration,
    pub started: Instant,
    pub color: bool,
    pub health: BTreeMap<Source, Health>,
    live: Snapshot,
    /// What is on screen: `live`, or the copy `f` froze.
    pub shown: Snapshot,
    pub frozen: bool,
    pub help: bool,
    pub panel: Panel,
    pub filter: String,
    pub filtering: bool,
    pub sort: SortKey,
    pub quit: bool,
    accepted: Counter,
    confirmed: Counter,
    rejected: Counter,
    expired: Counter,
    accept_window: Window,
    commit_window: Window,
}

fn push(history: &mut VecDeque<u64>, rate: f64) {
    if history.len() == HISTORY {
        history.pop_front();
    }
    history.push_back(rate.round() as u64);
}

impl App {
    pub fn new(
        namespace: &str,
        api_url: &str,
        refresh: Duration,
        color: bool,
        now: Instant,
    ) -> Self {
        Self {
            namespace: namespace.to_owned(),
            api_url: api_url.to_owned(),
            refresh,
            started: now,
            color,
            health: Source::ALL
                .iter()
                .map(|s| (*s, Health::default()))
                .collect(),
            live: Snapshot::default(),
            shown: Snapshot::default(),
            frozen: false,
            help: false,
            panel: Panel::Overview,
            filter: String::new(),
            filtering: false,
            sort: SortKey::Id,
            quit: false,
            accepted: Counter::default(),
            confirmed: Counter::default(),
            rejected: Counter::default(),
            expired: Counter::default(),
            accept_window: Window::default(),
            commit_window: Window::default(),
        }
    }

    /// A source is stale after three refreshes (at least 3 s) without an answer.
    pub fn stale_after(&self) -> Duration {
        (self.refresh * 3).max(Duration::from_secs(3))
    }

    pub fn stale(&self, source: Source, now: Instant) -> Option<(Duration, Option<&str>)> {
        let h = self.health.get(&source)?;
        h.stale(now, self.stale_after())
            .map(|age| (age, h.error.as_deref()))
    }

    fn health(&mut self, source: Source, at: Instant, error: Option<String>) {
        let h = self.health.entry(source).or_default();
        if error.is_none() {
            h.last_ok = Some(at);
        }
        h.error = error;
    }

    /// A collector's report arrives.
    pub fn on_sample(&mut self, at: Instant, sample: Sample) {
        match sample {
            Sample::Api(Ok(api)) => {
                self.health(Source::Api, at, None);
                let rate = self.accepted.rate(at, api.accepted_total);
                if let Some(r) = rate {
                    push(&mut self.live.accepted, r);
                }
                self.live.accepted_now = rate.or(self.live.accepted_now);
                self.live.not_ready = api.not_ready;
                self.live.accept_latency = self.accept_window.push(at, api.buy_latency);
            }
            Sample::Postgres(Ok(ledger)) => {
                self.health(Source::Postgres, at, None);
                let confirmed = self.confirmed.rate(at, ledger.confirmed_orders as f64);
                let rejected = self.rejected.rate(at, ledger.rejected_orders as f64);
                if let (Some(c), Some(r)) = (confirmed, rejected) {
                    push(&mut self.live.confirmed, c);
                    push(&mut self.live.rejected, r);
                }
                self.live.confirmed_now = confirmed.or(self.live.confirmed_now);
                self.live.rejected_now = rejected.or(self.live.rejected_now);
                let expired = self.expired.rate(at, ledger.expired_orders as f64);
                self.live.expired_now = expired.or(self.live.expired_now);
                self.live.products = ledger
                    .books
                    .iter()
                    .map(|b| ProductRow {
                        id: b.id,
                        name: ledger.names.get(&b.id).cloned().unwrap_or_default(),
                        seeded: b.seeded_stock,
                        stock: b.stock,
                        tokens: ledger.tokens.get(&b.id).copied(),
                        held: b.held_units,
                        confirmed: b.confirmed_units,
                        rejected: b.rejected_orders,
                    })
                    .collect();
                self.live.violations = Some(ledger.violations);
            }
            Sample::Redis(Ok(redis)) => {
                self.health(Source::Redis, at, None);
                let mut rows: Vec<WorkerRow> = redis
                    .workers
                    .into_iter()
                    .map(|view| WorkerRow {
                        gone: !view.alive,
                        view,
                    })
                    .collect();
                for old in &self.live.workers {
                    if !rows.iter().any(|r| r.view.id == old.view.id) {
                        rows.push(WorkerRow {
                            view: old.view.clone(),
                            gone: true,
                        });
                    }
                }
                rows.sort_by(|a, b| (a.gone, &a.view.id).cmp(&(b.gone, &b.view.id)));
                self.live.workers = rows;
                self.live.locks = redis.locks;
                self.live.masters = redis.masters;
                self.live.commit_latency = self.commit_window.push(at, redis.commit_latency);
            }
            Sample::Broker(Ok(queue)) => {
                self.health(Source::Broker, at, None);
                self.live.queue = Some(queue);
            }
            Sample::Api(Err(e)) => self.health(Source::Api, at, Some(e)),
            Sample::Postgres(Err(e)) => self.health(Source::Postgres, at, Some(e)),
            Sample::Redis(Err(e)) => self.health(Source::Redis, at, Some(e)),
            Sample::Broker(Err(e)) => self.health(Source::Broker, at, Some(e)),
        }
        if !self.frozen {
            self.shown = self.live.clone();
        }
    }

    /// A key was pressed.
    pub fn on_key(&mut self, key: KeyEvent) {
        let ctrl_c =
            key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c');
        if ctrl_c {
            self.quit = true;
            return;
        }
        if self.filtering {
            match key.code {
                KeyCode::Char(c) => self.filter.push(c),
                KeyCode::Backspace => {
                    self.filter.pop();
                }
                KeyCode::Enter => self.filtering = false,
                KeyCode::Esc => {
                    self.filter.clear();
                    self.filtering = false;
                }
                _ => {}
            }
            return;
        }
        match key.code {
            KeyCode::Char('q') => self.quit = true,
            KeyCode::Esc if self.help => self.help = false,
            KeyCode::Esc => self.filter.clear(),
            KeyCode::Char('?') => self.help = !self.help,
            _ if self.help => {}
            KeyCode::Char('f') => {
                self.frozen = !self.frozen;
                if !self.frozen {
                    self.shown = self.live.clone();
                }
            }
            KeyCode::Char('/') => {
                self.filtering = true;
                self.filter.clear();
            }
            KeyCode::Char('s') => self.sort = self.sort.next(),
            KeyCode::Tab => self.panel = Panel::ALL[(self.panel.index() + 1) % Panel::ALL.len()],
            KeyCode::BackTab => {
                self.panel =
                    Panel::ALL[(self.panel.index() + Panel::ALL.len() - 1) % Panel::ALL.len()]
            }
            KeyCode::Char(c @ '1'..='4') => {
                self.panel = Panel::ALL[(c as u8 - b'1') as usize];
            }
            _ => {}
        }
    }

    /// The products to list: filtered by id or name, sorted.
    pub fn products(&self) -> Vec<&ProductRow> {
        let needle = self.filter.to_lowercase();
        let mut rows: Vec<&ProductRow> = self
            .shown
            .products
            .iter()
            .filter(|p| {
                needle.is_empty()
                    || p.id.to_string().contains(&needle)
                    || p.name.to_lowercase().contains(&needle)
            })
            .collect();
        match self.sort {
            SortKey::Id => rows.sort_by_key(|p| p.id),
            SortKey::StockLeft => {
                rows.sort_by(|a, b| left(a).total_cmp(&left(b)).then(a.id.cmp(&b.id)))
            }
            SortKey::Confirmed => rows.sort_by_key(|p| (std::cmp::Reverse(p.confirmed), p.id)),
            SortKey::Rejected => rows.sort_by_key(|p| (std::cmp::Reverse(p.rejected), p.id)),
        }
        rows
    }

    /// Orders waiting or held, and how long the drain will take at the
    /// current processing rate.
    pub fn drain_eta(&self) -> Option<Duration> {
        let q = self.shown.queue.as_ref()?;
        let backlog = q.orders_ready + self.inflight();
        if backlog == 0 {
            return Some(Duration::ZERO);
        }
        let rate = self.shown.confirmed_now.unwrap_or(0.0) + self.shown.rejected_now.unwrap_or(0.0);
        (rate > 0.0).then(|| Duration::from_secs_f64(backlog as f64 / rate))
    }

    /// Deliveries the live workers hold.
    pub fn inflight(&self) -> u64 {
        self.shown
            .workers
            .iter()
            .filter(|w| !w.gone)
            .map(|w| w.view.inflight)
            .sum()
    }
}

/// Share of the seeded stock still there.
pub fn left(p: &ProductRow) -> f64 {
    if p.seeded <= 0 {
        0.0
    } else {
        p.stock as f64 / p.seeded as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(c: KeyCode) -> KeyEvent {
        KeyEvent::new(c, KeyModifiers::NONE)
    }

    fn app() -> (App, Instant) {
        let now = Instant::now();
        (
            App::new("ns", "http://api", Duration::from_millis(500), false, now),
            now,
        )
    }

    fn ledger(confirmed: u64, products: &[(i64, &str, i64, i64, i64)]) -> Sample {
        Sample::Postgres(Ok(LedgerSample {
            books: products
                .iter()
                .map(|(id, _, seeded, stock, rejected)| ProductBooks {
                    id: *id,
                    seeded_stock: *seeded,
                    stock: *stock,
                    confirmed_units: seeded - stock,
                    held_units: 0,
                    rejected_orders: *rejected,
                    ok: true,
                })
                .collect(),
            names: products
                .iter()
                .map(|(id, n, ..)| (*id, (*n).to_owned()))
                .collect(),
            violations: Vec::new(),
            confirmed_orders: confirmed,
            rejected_orders: 0,
            expired_orders: 0,
            tokens: BTreeMap::new(),
        }))
    }

    #[test]
    fn rates_come_from_counter_deltas_and_survive_restarts() {
        let (mut app, t0) = app();
        let api = |total: f64| {
            Sample::Api(Ok(ApiSample {
                accepted_total: total,
                ..ApiSample::default()
            }))
        };
        app.on_sample(t0, api(100.0));
        assert_eq!(app.shown.accepted_now, None, "one sample is no rate");
        app.on_sample(t0 + Duration::from_millis(500), api(600.0));
        assert_eq!(app.shown.accepted_now, Some(1000.0));
        // The API restarted: its counter went back to 5; no negative rate.
        app.on_sample(t0 + Duration::from_secs(1), api(5.0));
        assert_eq!(app.shown.accepted_now, Some(1000.0));
        app.on_sample(t0 + Duration::from_secs(2), api(55.0));
        assert_eq!(app.shown.accepted_now, Some(50.0));
        assert_eq!(
            app.shown.accepted.iter().copied().collect::<Vec<_>>(),
            vec![1000, 50]
        );
    }

    #[test]
    fn a_source_that_stops_answering_goes_stale_and_recovers() {
        let (mut app, t0) = app();
        app.on_sample(t0, Sample::Broker(Ok(QueueView::default())));
        assert!(
            app.stale(Source::Broker, t0 + Duration::from_secs(2))
                .is_none()
        );
        app.on_sample(
            t0 + Duration::from_secs(4),
            Sample::Broker(Err("connection refused".into())),
        );
        let (age, error) = app
            .stale(Source::Broker, t0 + Duration::from_secs(12))
            .expect("stale");
        assert_eq!(age, Duration::from_secs(12));
        assert_eq!(error, Some("connection refused"));
        assert!(
            app.shown.queue.is_some(),
            "the last good data stays on screen"
        );
        app.on_sample(
            t0 + Duration::from_secs(13),
            Sample::Broker(Ok(QueueView::default())),
        );
        assert!(
            app.stale(Source::Broker, t0 + Duration::from_secs(13))
                .is_none()
        );
        // Never answered and failing: stale from the start.
        app.on_sample(t0, Sample::Redis(Err("down".into())));
        assert!(app.stale(Source::Redis, t0).is_some());
    }

    #[test]
    fn products_filter_and_sort() {
        let (mut app, t0) = app();
        app.on_sample(
            t0,
            ledger(
                0,
                &[
                    (1, "Hot item", 100, 0, 50),
                    (2, "Sneaker", 100, 80, 0),
                    (12, "Hat", 10, 5, 3),
                ],
            ),
        );
        let ids = |app: &App| app.products().iter().map(|p| p.id).collect::<Vec<_>>();
        assert_eq!(ids(&app), vec![1, 2, 12]);
        app.on_key(key(KeyCode::Char('s')));
        assert_eq!(app.sort, SortKey::StockLeft);
        assert_eq!(ids(&app), vec![1, 12, 2]);
        app.on_key(key(KeyCode::Char('s')));
        assert_eq!(ids(&app), vec![1, 2, 12], "most confirmed first");
        app.on_key(key(KeyCode::Char('s')));
        assert_eq!(ids(&app), vec![1, 12, 2], "most rejected first");
        app.on_key(key(KeyCode::Char('/')));
        for c in "sNe".chars() {
            app.on_key(key(KeyCode::Char(c)));
        }
        assert_eq!(ids(&app), vec![2], "names match, any case");
        app.on_key(key(KeyCode::Backspace));
        app.on_key(key(KeyCode::Backspace));
        app.on_key(key(KeyCode::Backspace));
        app.on_key(key(KeyCode::Char('1')));
        app.on_key(key(KeyCode::Enter));
        assert_eq!(ids(&app), vec![1, 12], "ids match");
        app.on_key(key(KeyCode::Esc));
        assert_eq!(ids(&app).len(), 3, "Esc clears the filter");
    }

    #[test]
    fn freeze_keeps_the_screen_while_data_keeps_coming() {
        let (mut app, t0) = app();
        app.on_sample(t0, ledger(0, &[(1, "a", 100, 100, 0)]));
        app.on_key(key(KeyCode::Char('f')));
        app.on_sample(
            t0 + Duration::from_secs(1),
            ledger(10, &[(1, "a", 100, 90, 0)]),
        );
        assert_eq!(app.shown.products[0].stock, 100, "frozen");
        app.on_key(key(KeyCode::Char('f')));
        assert_eq!(app.shown.products[0].stock, 90, "thawed at the latest data");
        assert_eq!(
            app.shown.confirmed_now,
            Some(10.0),
            "rates went on while frozen"
        );
    }

    #[test]
    fn keys_switch_panels_and_open_help() {
        let (mut app, _) = app();
        app.on_key(key(KeyCode::Tab));
        assert_eq!(app.panel, Panel::Products);
        app.on_key(key(KeyCode::BackTab));
        app.on_key(key(KeyCode::BackTab));
        assert_eq!(app.panel, Panel::Locks);
        app.on_key(key(KeyCode::Char('3')));
        assert_eq!(app.panel, Panel::Workers);
        app.on_key(key(KeyCode::Char('?')));
        assert!(app.help);
        app.on_key(key(KeyCode::Char('1')));
        assert_eq!(
            app.panel,
            Panel::Workers,
            "keys under the help overlay do nothing"
        );
        app.on_key(key(KeyCode::Esc));
        assert!(!app.help);
        app.on_key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL));
        assert!(app.quit);
    }

    #[test]
    fn percentiles_interpolate_within_buckets() {
        // 100 observations: 50 under 10 ms, 40 in 10-50 ms, 10 in 50-100 ms.
        let b = vec![
            (0.01, 50.0),
            (0.05, 90.0),
            (0.1, 100.0),
            (f64::INFINITY, 100.0),
        ];
        let p = percentiles(&b).expect("observations");
        assert!((p.p50 - 0.01).abs() < 1e-9);
        assert!((p.p90 - 0.05).abs() < 1e-9);
        assert!((p.p99 - 0.095).abs() < 1e-9);
        assert_eq!(percentiles(&vec![(0.1, 0.0)]), None);
    }

    #[test]
    fn workers_that_vanish_are_shown_as_gone() {
        let (mut app, t0) = app();
        let worker = |id: &str| WorkerView {
            id: id.into(),
            started_at: String::new(),
            processed: 1,
            inflight: 7,
            product: None,
            metrics_addr: String::new(),
            last_beat_seconds: 0.5,
            alive: true,
        };
        let redis = |ids: &[&str]| {
            Sample::Redis(Ok(RedisSample {
                workers: ids.iter().map(|i| worker(i)).collect(),
                ..RedisSample::default()
            }))
        };
        app.on_sample(t0, redis(&["w1", "w2"]));
        assert_eq!(app.inflight(), 14);
        app.on_sample(t0, redis(&["w2"]));
        let gone: Vec<_> = app
            .shown
            .workers
            .iter()
            .map(|w| (w.view.id.as_str(), w.gone))
            .collect();
        assert_eq!(gone, vec![("w2", false), ("w1", true)]);
        assert_eq!(app.inflight(), 7);
    }
}
