//! One shutdown signal for every task of `serve`, and the tasks it waits for (after mini-redis'
//! `shutdown.rs`). Every background task is spawned here, so a stop can tell the truth: what
//! finished, and what was interrupted (the journal and the inbox make interruption safe: an
//! interrupted transfer or event resumes at the next start).

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Clone, Default)]
pub struct Shutdown {
    signal: CancellationToken,
    tasks: TaskTracker,
}

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Spawns a task that the stop waits for.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tasks.spawn(task)
    }

    /// Resolves when the stop begins: loops select on it and end.
    pub async fn begun(&self) {
        self.signal.cancelled().await
    }

    pub fn is_begun(&self) -> bool {
        self.signal.is_cancelled()
    }

    /// Begins the stop, then waits up to `patience` for the tasks; returns how many were still
    /// running when it gave up (dropped with the process).
    pub async fn stop(&self, patience: Duration) -> usize {
        self.signal.cancel();
        self.tasks.close();
        if tokio::time::timeout(patience, self.tasks.wait()).await.is_err() {
            return self.tasks.len();
        }
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_stop_waits_for_tasks_and_counts_those_that_did_not_end() {
        let shutdown = Shutdown::new();
        let s = shutdown.clone();
        shutdown.spawn(async move { s.begun().await });
        shutdown.spawn(std::future::pending::<()>());
        assert!(!shutdown.is_begun());
        assert_eq!(shutdown.stop(Duration::from_millis(100)).await, 1, "the pending task is counted");
        assert!(shutdown.is_begun());
    }
}
