//! `fsctl top`: one live screen for the running sale. State in `app`, the
//! event channel in `event`, background collectors in `collect`, pure
//! rendering in `ui`. The UI never waits on I/O; a source that stops
//! answering greys out its panel, and top recovers when it returns.

pub mod app;
pub mod collect;
pub mod event;
pub mod stats;
pub mod ui;

use crate::exit::{Failure, OK, Outcome};
use crate::verify::parse_duration;
use app::App;
use clap::Args;
use event::Event;
use flashsale_engine::BackendUrls;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

#[derive(Debug, Args)]
#[command(
    after_help = "The screen: health of the API, PostgreSQL, Redis and RabbitMQ; the ledger
badge (fsctl verify's checks, re-run every second: LEDGER OK or VIOLATED);
accepted / confirmed / rejected per second; the queue, its dead letters and
the drain ETA; a stock gauge per product; workers and their heartbeats; held
locks; accept and accept-to-commit latency over the last 10 s.

Keys: q or Ctrl-C quit, ? help, f freeze, / filter products, s sort,
Tab / Shift-Tab or 1-4 panels, Esc back.

Needs a terminal of at least 80x24; for scripts use fsctl inspect --json or
fsctl verify --json. Exit codes: 0 quit; 2 not a terminal."
)]
pub struct TopArgs {
    /// How often to poll the API and Redis (PostgreSQL and RabbitMQ: at most once a second).
    #[arg(short = 'r', long, value_parser = parse_duration, default_value = "500ms")]
    pub refresh: Duration,
    /// No colours (also when NO_COLOR is set).
    #[arg(long)]
    pub no_color: bool,
}

/// Restores the terminal however top ends (ratatui's panic hook covers panics).
struct RestoreTerminal;

impl Drop for RestoreTerminal {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

fn not_a_terminal() -> Failure {
    Failure::usage(
        "fsctl top needs a terminal; for scripts use fsctl inspect queue --json or fsctl verify --json",
    )
}

pub async fn run(b: &BackendUrls, api_urls: &[String], args: &TopArgs) -> Outcome {
    if !std::io::stdout().is_terminal() {
        return Err(not_a_terminal());
    }
    if args.refresh < Duration::from_millis(50) {
        return Err(Failure::usage("--refresh must be at least 50ms"));
    }
    let api_url = api_urls
        .first()
        .map_or("http://127.0.0.1:3000", String::as_str);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let tasks = collect::start(b, api_url, args.refresh, &tx);
    let color = !args.no_color && std::env::var_os("NO_COLOR").is_none();
    dashboard(&b.namespace, api_url, args.refresh, color, tasks, tx, rx).await
}

/// `fsctl demo --top`: the dashboard on the demo's embedded backends.
pub async fn run_embedded(sources: collect::EmbeddedSources, api_url: &str) -> Outcome {
    if !std::io::stdout().is_terminal() {
        return Err(not_a_terminal());
    }
    let refresh = Duration::from_millis(250);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let tasks = collect::start_embedded(sources, api_url, refresh, &tx);
    let color = std::env::var_os("NO_COLOR").is_none();
    dashboard(
        "embedded (fsctl demo)",
        api_url,
        refresh,
        color,
        tasks,
        tx,
        rx,
    )
    .await
}

/// Draws until the operator quits; the collectors in `tasks` feed `rx`.
async fn dashboard(
    namespace: &str,
    api_url: &str,
    refresh: Duration,
    color: bool,
    mut tasks: tokio::task::JoinSet<()>,
    tx: tokio::sync::mpsc::UnboundedSender<Event>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
) -> Outcome {
    event::start(refresh, &tx, &mut tasks);
    drop(tx);

    let mut terminal = ratatui::init();
    let _restore = RestoreTerminal;
    let mut app = App::new(namespace, api_url, refresh, color, Instant::now());
    loop {
        terminal
            .draw(|frame| ui::draw(frame, &app, Instant::now()))
            .map_err(|e| Failure::usage(format!("cannot draw: {e}")))?;
        let Some(first) = rx.recv().await else {
            break;
        };
        // Apply everything that queued up, then draw once.
        let mut next = Some(first);
        while let Some(event) = next {
            match event {
                Event::Key(key) => app.on_key(key),
                Event::Redraw => {}
                Event::Sample(at, sample) => app.on_sample(at, sample),
            }
            next = rx.try_recv().ok();
        }
        if app.quit {
            break;
        }
    }
    tasks.abort_all();
    Ok(OK)
}
