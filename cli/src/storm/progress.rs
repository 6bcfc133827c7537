//! The progress bar: live counters the load loop bumps, and a task that
//! redraws from them (the load loop never waits for the display).

use super::load::LoadPlan;
use super::target::Outcome as Answer;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Counters the progress bar reads while the storm runs.
#[derive(Debug, Default)]
pub struct LiveCounts {
    pub done: AtomicU64,
    pub accepted: AtomicU64,
    pub sold_out: AtomicU64,
    pub client_errors: AtomicU64,
    pub server_errors: AtomicU64,
    pub failed: AtomicU64,
}

impl LiveCounts {
    pub(super) fn count(&self, answer: Answer) {
        let counter = match answer {
            Answer::Status(202) => Some(&self.accepted),
            Answer::Status(409) => Some(&self.sold_out),
            Answer::Status(400..=499) => Some(&self.client_errors),
            Answer::Status(500..) => Some(&self.server_errors),
            Answer::Status(_) => None,
            Answer::Error(_) => Some(&self.failed),
        };
        if let Some(c) = counter {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.done.fetch_add(1, Ordering::Relaxed);
    }

    fn line(&self) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "202 {} · 409 {} · 4xx {} · 5xx {} · errors {}",
            get(&self.accepted),
            get(&self.sold_out),
            get(&self.client_errors),
            get(&self.server_errors),
            get(&self.failed)
        )
    }
}

pub(super) fn progress(plan: &LoadPlan, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden());
    }
    let (len, template) = match (plan.time_limit(), plan.request_limit()) {
        (Some(limit), _) => (
            limit.as_millis() as u64,
            "{spinner} [{elapsed_precise}] {wide_bar} {msg}",
        ),
        (None, Some(n)) => (n, "{spinner} {pos}/{len} {wide_bar} {msg}"),
        (None, None) => (0, "{spinner} {msg}"),
    };
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// Redraws the bar until `done`; the load loop never waits for it.
pub(super) async fn show_progress(
    bar: ProgressBar,
    plan: LoadPlan,
    live: Arc<LiveCounts>,
    done: CancellationToken,
) {
    let started = tokio::time::Instant::now();
    let mut last = (started, 0u64);
    loop {
        tokio::select! {
            () = done.cancelled() => break,
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        let now = tokio::time::Instant::now();
        let n = live.done.load(Ordering::Relaxed);
        let rate = (n - last.1) as f64 / (now - last.0).as_secs_f64().max(1e-3);
        last = (now, n);
        if plan.time_limit().is_some() {
            bar.set_position(started.elapsed().as_millis() as u64);
        } else {
            bar.set_position(n);
        }
        bar.set_message(format!("{n} done · {rate:.0}/s · {}", live.line()));
    }
    bar.finish_and_clear();
}
