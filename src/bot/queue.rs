//! Per-user ordered queues: each user's events are handled one after another, in the order the
//! homeserver sent them, and no user's events wait behind another user's.
//!
//! A user's queue has one worker task while it holds work; the worker ends when the queue is
//! empty, so idle users cost nothing. A queue is bounded: a user who floods the bot loses the
//! excess (logged), never anyone else's turn.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use crate::shutdown::Shutdown;

/// The most events one user may have waiting. A person types a command every few seconds; a
/// queue this long is a script or a flood.
pub const MAX_QUEUED: usize = 64;

/// How many times the handling of one inbox event may begin: once, and twice more after the
/// process died with it in hand. An event that kills the process (a command that exhausts memory)
/// would otherwise run again at every start: a crash loop.
pub const MAX_ATTEMPTS: u32 = 3;

/// Whether the `attempt`th handling of an event (1 the first) may run. The store counts
/// attempts durably before each ([`crate::store::Store::inbox_attempt`]).
pub fn may_run(attempt: u32) -> bool {
    attempt <= MAX_ATTEMPTS
}

/// What happened to a job offered to a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    /// Waits its turn (a worker is running or was started).
    Accepted,
    /// The user's queue is full: the job was dropped, the `dropped`th since it filled.
    Full { dropped: usize },
}

/// One user's waiting jobs.
struct Queue<J> {
    jobs: VecDeque<J>,
    /// Jobs refused since the queue was last below its bound.
    dropped: usize,
}

/// Queues keyed by user; `run` handles one job, and is called for one user's jobs in order.
pub struct UserQueues<K, J> {
    queues: Mutex<HashMap<K, Queue<J>>>,
    /// Workers are its tasks; once the stop begins, they finish the job in hand and take no more.
    shutdown: Shutdown,
}

impl<K, J> UserQueues<K, J> {
    pub fn new(shutdown: Shutdown) -> Self {
        UserQueues { queues: Mutex::new(HashMap::new()), shutdown }
    }
}

impl<K, J> UserQueues<K, J>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
    J: Send + 'static,
{
    /// Adds `job` to `key`'s queue, starting that queue's worker if it has none.
    pub fn push<F, Fut>(self: &Arc<Self>, key: K, job: J, run: F) -> Queued
    where
        F: Fn(J) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut queues = self.queues.lock().expect("queue lock");
        if let Some(queue) = queues.get_mut(&key) {
            // A worker owns this queue: it will reach the job.
            if queue.jobs.len() >= MAX_QUEUED {
                queue.dropped += 1;
                return Queued::Full { dropped: queue.dropped };
            }
            queue.jobs.push_back(job);
            return Queued::Accepted;
        }
        queues.insert(key.clone(), Queue { jobs: VecDeque::from([job]), dropped: 0 });
        drop(queues);
        let this = Arc::clone(self);
        self.shutdown.spawn(async move { this.work(key, run).await });
        Queued::Accepted
    }

    /// Runs `key`'s jobs until its queue is empty, then removes the queue (under the lock, so a
    /// job pushed meanwhile either is seen here or starts a new worker).
    async fn work<F, Fut>(self: Arc<Self>, key: K, run: F)
    where
        F: Fn(J) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        loop {
            let job = {
                let mut queues = self.queues.lock().expect("queue lock");
                if self.shutdown.is_begun() {
                    // What is left waits in the store's inbox for the next start.
                    queues.remove(&key);
                    return;
                }
                let Some(queue) = queues.get_mut(&key) else { return };
                match queue.jobs.pop_front() {
                    Some(job) => {
                        queue.dropped = 0;
                        job
                    }
                    None => {
                        queues.remove(&key);
                        return;
                    }
                }
            };
            // Each job in a task of its own: a panic ends that job, not the user's queue.
            if let Err(e) = tokio::spawn(run(job)).await {
                tracing::error!(task = %e.id(), "a queued job panicked");
            }
        }
    }

    /// How many users have work queued or running (for tests and health).
    pub fn active(&self) -> usize {
        self.queues.lock().expect("queue lock").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn one_users_jobs_run_in_order_and_another_user_is_not_kept_waiting() {
        let queues: Arc<UserQueues<&'static str, (u32, u64)>> = Arc::new(UserQueues::new(Shutdown::new()));
        let log = Arc::new(Mutex::new(Vec::new()));
        let run = {
            let log = log.clone();
            move |(n, sleep_ms): (u32, u64)| {
                let log = log.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(sleep_ms)).await;
                    log.lock().unwrap().push(n);
                }
            }
        };
        // The flooder's jobs are slow; the other user's one job must not wait for them.
        for n in 0..5 {
            assert_eq!(queues.push("flood", (n, 40), run.clone()), Queued::Accepted);
        }
        queues.push("other", (100, 0), run.clone());
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(*log.lock().unwrap(), vec![100], "the other user's job ran first");
        while queues.active() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(*log.lock().unwrap(), vec![100, 0, 1, 2, 3, 4], "the flooder's jobs in order");
    }

    /// A crash loop, played out on a real store: each "start" replays the inbox, counts the
    /// attempt, and "dies" (drops the store) before the event is done.
    #[tokio::test]
    async fn an_event_in_hand_at_every_death_runs_three_times_then_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let store = crate::store::Store::open(&path).unwrap();
            store.accept_txn("t", &[b"{\"deadly\":1}".to_vec()]).await.unwrap().unwrap();
        }
        // sled lets go of its lock a moment after the store is dropped, as a dead process would.
        let open = || async {
            for _ in 0..100 {
                if let Ok(store) = crate::store::Store::open(&path) {
                    return store;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            crate::store::Store::open(&path).unwrap()
        };
        let (mut ran, mut dropped) = (0, 0);
        for _start in 0..10 {
            let store = open().await;
            let pending = store.inbox().await.unwrap();
            if pending.is_empty() {
                break;
            }
            for (number, _) in pending {
                if may_run(store.inbox_attempt(number).await.unwrap()) {
                    ran += 1; // ...and the process dies here, the event still in the inbox
                } else {
                    dropped += 1;
                    store.inbox_done(number).await.unwrap();
                }
            }
        }
        assert_eq!((ran, dropped), (MAX_ATTEMPTS, 1));
        assert!(open().await.inbox().await.unwrap().is_empty(), "no fifth start with it");
    }

    #[tokio::test]
    async fn a_full_queue_drops_the_excess_and_a_panic_ends_only_its_job() {
        let queues: Arc<UserQueues<u8, u32>> = Arc::new(UserQueues::new(Shutdown::new()));
        let done = Arc::new(AtomicUsize::new(0));
        let run = {
            let done = done.clone();
            move |n: u32| {
                let done = done.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    if n == 1 {
                        panic!("job 1 fails");
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                }
            }
        };
        let mut full = 0;
        for n in 0..(MAX_QUEUED as u32 + 10) {
            if let Queued::Full { dropped } = queues.push(7, n, run.clone()) {
                full += 1;
                assert_eq!(dropped, full, "each refusal is counted");
            }
        }
        // The first job is taken by the worker at once or is still queued: 9 or 10 are dropped.
        assert!((9..=10).contains(&full), "{full} dropped");
        while queues.active() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let accepted = MAX_QUEUED + 10 - full;
        assert_eq!(done.load(Ordering::SeqCst), accepted - 1, "every job but the panicking one ran");
        // The queue still works after the panic.
        queues.push(7, 99, run.clone());
        while queues.active() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(done.load(Ordering::SeqCst), accepted);
    }
}
