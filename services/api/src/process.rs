//! The tasks an API process runs for its requests past the client's wait: a
//! buy from its first take of units on, a pay or cancel once it reaches the
//! ledger. They outlive a client that hangs up, but not the process: in
//! production the operating system ends them with it; in the simulator
//! [`Process::kill`] does, so that a killed API is tried like a real one
//! (units taken and never published, a publish never marked).

use std::future::Future;
use std::sync::{Arc, Mutex};
use tokio::task::{AbortHandle, JoinHandle};
use tokio_util::sync::CancellationToken;

/// Finished tasks are forgotten once this many are remembered.
const PRUNE_AT: usize = 256;

/// Cheap to clone: clones are the same process.
#[derive(Clone, Default)]
pub struct Process(Arc<Inner>);

#[derive(Default)]
struct Inner {
    tasks: Mutex<Vec<AbortHandle>>,
    killed: CancellationToken,
}

impl Process {
    /// Runs `task` as this process's: it ends when the process is killed.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let handle = tokio::spawn(task);
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
}
