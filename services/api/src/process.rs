//! The tasks an API process runs for its requests past the client's wait: a
//! buy from its first take of units on, a pay or cancel once it reaches the
//! ledger. They outlive a client that hangs up, but not the process: in
//! production the operating system ends them with it; in the simulator
//! [`Process::kill`] does, so that a killed API is tried like a real one
//! (units taken and never published, a publish never marked). A graceful
//! stop waits for them ([`Process::wind_down`]).

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle};
use tokio_util::sync::CancellationToken;

/// Finished tasks are forgotten once this many are remembered.
const PRUNE_AT: usize = 256;

/// Cheap to clone: clones are the same process.
#[derive(Clone, Default)]
pub struct Process(Arc<Inner>);

struct Inner {
    tasks: Mutex<Vec<AbortHandle>>,
    killed: CancellationToken,
    /// Tasks started and not ended (finished, or aborted).
    running: watch::Sender<usize>,
}

impl Default for Inner {
    fn default() -> Self {
        Self {
            tasks: Mutex::default(),
            killed: CancellationToken::new(),
            running: watch::channel(0).0,
        }
    }
}

/// Counts a task as running until it is dropped, however it ends.
struct Running(Arc<Inner>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.send_modify(|n| *n -= 1);
    }
}

impl Process {
    /// Runs `task` as this process's: it ends when the process is killed.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.0.running.send_modify(|n| *n += 1);
        let running = Running(Arc::clone(&self.0));
        let handle = tokio::spawn(async move {
            let _running = running;
            task.await
        });
        let mut tasks = self.0.tasks.lock().unwrap_or_else(|p| p.into_inner());
        if self.0.killed.is_cancelled() {
            handle.abort();
            return handle;
        }
        if tasks.len() >= PRUNE_AT {
            tasks.retain(|t| !t.is_finished());
        }
        tasks.push(handle.abort_handle());
        handle
    }

    /// Ends every task of the process, at whatever step it is, and every
    /// one it would start from now on.
    pub fn kill(&self) {
        let mut tasks = self.0.tasks.lock().unwrap_or_else(|p| p.into_inner());
        self.0.killed.cancel();
        for task in tasks.drain(..) {
            task.abort();
        }
    }

    /// Waits, at most `within`, until no task runs (a buy whose client hung
    /// up has published and marked its order, or given its units back);
    /// false if some still ran.
    pub async fn wind_down(&self, within: Duration) -> bool {
        let mut running = self.0.running.subscribe();
        tokio::time::timeout(within, running.wait_for(|n| *n == 0))
            .await
            .is_ok()
    }

    pub fn is_killed(&self) -> bool {
        self.0.killed.is_cancelled()
    }

    /// Resolves once the process is killed (its connections close).
    pub fn killed(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.0.killed.clone().cancelled_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_killed_process_ends_its_tasks_and_starts_none() {
        let process = Process::default();
        let done = process.spawn(async {});
        let long = process.spawn(tokio::time::sleep(Duration::from_secs(60)));
        assert!(done.await.is_ok());
        process.kill();
        assert!(long.await.is_err_and(|e| e.is_cancelled()));
        let late = process.spawn(async { 7 });
        assert!(late.await.is_err_and(|e| e.is_cancelled()));
        process.killed().await;
    }

    #[tokio::test(start_paused = true)]
    async fn winding_down_waits_for_the_running_tasks_at_most_so_long() {
        let process = Process::default();
        assert!(process.wind_down(Duration::ZERO).await);
        let short = process.spawn(tokio::time::sleep(Duration::from_secs(5)));
        let started = tokio::time::Instant::now();
        assert!(process.wind_down(Duration::from_secs(10)).await);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert!(short.is_finished());
        let long = process.spawn(tokio::time::sleep(Duration::from_secs(60)));
        assert!(!process.wind_down(Duration::from_secs(10)).await);
        assert!(!long.is_finished());
        process.kill();
        let killed = tokio::time::Instant::now();
        assert!(process.wind_down(Duration::from_secs(1)).await);
        assert_eq!(
            killed.elapsed(),
            Duration::ZERO,
            "a killed task ends at once"
        );
    }
}
