//! The line and the tasks: a transfer is started, put in line, stopped, cancelled and resumed
//! here; each runs in a task of its own ([`Engine::run`]).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::Engine;
use crate::budget::Budget;
use crate::metrics::{self, TransferOutcome};
use crate::store::StoreError;
use crate::transfer::line::{Admit, Line};
use crate::transfer::progress::Place;
use crate::transfer::{TransferKind, TransferState, Withdrawal, watch};

impl Engine {
    /// Starts (or resumes) a transfer in the background, or puts it in line when every place is
    /// taken (it starts by itself when one frees up), unless it is running or waiting already.
    pub fn spawn(self: &Arc<Self>, id: u64) {
        // Held while starting, so the task's own removal (at its end) comes after the insert.
        let mut line = self.line.lock().expect("lock");
        match line.admit(id) {
            Admit::Start => self.start(&mut line, id),
            Admit::Wait { ahead } => {
                let place = Place { ahead, running: line.running() };
                tracing::info!(transfer = id, ahead, "transfer waits for a place");
                metrics::transfers_in_line(line.running(), line.waiting());
                let engine = Arc::clone(self);
                self.shutdown.spawn(async move { engine.tell_waiting(id, place).await });
            }
            Admit::No => {}
        }
    }

    /// Starts `id`'s task and records it in `line` (whose lock the caller holds).
    fn start(self: &Arc<Self>, line: &mut Line<tokio::task::AbortHandle>, id: u64) {
        let engine = Arc::clone(self);
        let task = self.shutdown.spawn(async move {
            // Takes it out of the line however the task ends (finished, failed, panicked), and
            // starts the next one waiting.
            let _entry = RunningEntry { engine: Arc::clone(&engine), id };
            match engine.run(id).await {
                Ok(()) => engine.watch_if_reserved(id).await,
                Err(e) => {
                    metrics::transfer_finished(TransferOutcome::Failed);
                    tracing::error!(transfer = id, error = %e, "transfer stopped with an error; it resumes at the next start");
                }
            }
        });
        line.run(id, task.abort_handle());
        metrics::transfers_in_line(line.running(), line.waiting());
    }

    /// Starts those waiting while places are free (not once the service is stopping).
    fn fill(self: &Arc<Self>, line: &mut Line<tokio::task::AbortHandle>) {
        if self.shutdown.is_begun() {
            return;
        }
        while let Some(next) = line.next_to_start() {
            tracing::info!(transfer = next, "a place is free: transfer starts");
            self.start(line, next);
        }
        metrics::transfers_in_line(line.running(), line.waiting());
    }

    /// Tells a waiting transfer's new account its place, unless it had run once already
    /// (resumed after a restart, it waits quietly: its status message is there).
    async fn tell_waiting(&self, id: u64, place: Place) {
        let t = match self.journal.get(id).await {
            Ok(Some(t)) if t.plan.is_none() => t,
            Ok(_) => return,
            Err(e) => return tracing::warn!(transfer = id, error = %e, "cannot read a waiting transfer"),
        };
        if let Err(e) = self.reporter.waiting(&t, place).await {
            tracing::warn!(transfer = id, error = %e, "cannot tell a transfer its place in line");
        }
    }

    /// Stops a transfer at once, wherever it is, running or waiting (for `forget`: its records
    /// are about to go). What it did stays done; the journal is as of its last step.
    pub fn stop(self: &Arc<Self>, id: u64) {
        let mut line = self.line.lock().expect("lock");
        if let Some(task) = line.remove(id) {
            task.abort();
            tracing::info!(transfer = id, "transfer stopped");
        }
        self.fill(&mut line);
    }

    /// Stops every transfer at once (at shutdown: a transfer may run for an hour, and the
    /// journal makes stopping safe; each resumes at the next start, as do those waiting).
    /// Returns how many ran.
    pub fn stop_all(&self) -> usize {
        let running = self.line.lock().expect("lock").close();
        for task in &running {
            task.abort();
        }
        running.len()
    }

    /// How transfer `id`'s reservation invites are paced by the other server, if they are.
    pub fn paced(&self, id: u64) -> Option<crate::transfer::pace::Paced> {
        self.rooms.pace.note(id)
    }

    /// How transfer `id`'s received rooms wait for their invites, while some do.
    pub fn awaited(&self, id: u64) -> Option<crate::transfer::arrivals::Awaited> {
        self.rooms.arrivals.note(id, self.rooms.invites_patience)
    }

    /// Where `id` waits: how many are ahead of it, and how many run. `None` if it is not waiting.
    pub fn place(&self, id: u64) -> Option<Place> {
        let line = self.line.lock().expect("lock");
        line.ahead_of(id).map(|ahead| Place { ahead, running: line.running() })
    }

    /// The budget of work in flight (`handoff.concurrency`), shared with captures so the
    /// homeserver's load stays bounded whatever runs.
    pub fn pool(&self) -> Arc<Budget> {
        Arc::clone(&self.budget)
    }

    /// Resumes every transfer that was running when the service stopped.
    pub async fn resume_all(self: &Arc<Self>) -> Result<usize, StoreError> {
        let mut n = 0;
        for t in self.journal.all().await? {
            if t.is_live() {
                tracing::info!(transfer = t.id, old = %t.old, new = %t.new, "resuming transfer");
                self.spawn(t.id);
                n += 1;
            } else if watch::is_watched(&t) {
                self.watch(t.id);
            } else if t.kind == TransferKind::Reserve && t.state == TransferState::Cancelled && !t.withdrawn {
                self.withdraw_later(t.id, Withdrawal::Cancelled);
            }
            if t.undo.as_ref().is_some_and(|u| !u.finished) {
                tracing::info!(transfer = t.id, new = %t.new, "resuming the undo of a move");
                self.spawn_undo(t.id);
            }
        }
        Ok(n)
    }

    /// Asks a transfer to stop after the rooms in flight. One waiting for a place leaves the line
    /// and ends at once (it changed nothing yet, unless it had run before a restart: then it
    /// finishes the rooms it had joined, as a running one does). Returns whether it was waiting.
    pub fn cancel(self: &Arc<Self>, id: u64) -> bool {
        self.stop_token(id).cancel();
        let mut line = self.line.lock().expect("lock");
        let waiting = line.unqueue(id);
        if waiting {
            // Above the limit for a moment: it only writes its end.
            self.start(&mut line, id);
        }
        waiting
    }

    pub(super) fn cancel_requested(&self, id: u64) -> bool {
        self.cancelling.lock().expect("lock").get(&id).is_some_and(CancellationToken::is_cancelled)
    }

    /// The token that is cancelled when `id` is asked to stop.
    pub(super) fn stop_token(&self, id: u64) -> CancellationToken {
        self.cancelling.lock().expect("lock").entry(id).or_default().clone()
    }
}

/// Takes a transfer out of [`Engine::line`] when its task ends, however it ends, and gives its
/// place to the next one waiting.
struct RunningEntry {
    engine: Arc<Engine>,
    id: u64,
}

impl Drop for RunningEntry {
    fn drop(&mut self) {
        // The next run learns afresh which servers are away.
        self.engine.rooms.reach.forget(self.id);
        self.engine.rooms.pace.forget(self.id);
        self.engine.rooms.arrivals.forget(self.id);
        if let Ok(mut stops) = self.engine.cancelling.lock() {
            stops.remove(&self.id);
        }
        if let Ok(mut line) = self.engine.line.lock() {
            line.remove(self.id);
            self.engine.fill(&mut line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::Harness;
    use super::*;

    /// Takes the engine's only place with a task that runs until it is stopped.
    fn take_the_place(h: &Harness) -> u64 {
        let busy = u64::MAX;
        let task = tokio::spawn(std::future::pending::<()>());
        let mut line = h.engine.line.lock().unwrap();
        assert!(matches!(line.admit(busy), Admit::Start));
        line.run(busy, task.abort_handle());
        busy
    }

    /// With every place taken, a transfer waits in line and is told its place; cancelled there,
    /// it leaves the line and ends without having run.
    #[tokio::test]
    async fn a_transfer_cancelled_in_line_ends_without_running() {
        let h = Harness::new(1).await;
        take_the_place(&h);
        let t = h.transfer("@old:example.org").await;
        h.engine.spawn(t.id);
        assert_eq!(h.engine.place(t.id), Some(Place { ahead: 0, running: 1 }));
        assert!(h.engine.cancel(t.id), "it was waiting");
        h.until(t.id, TransferState::Cancelled).await;
        assert_eq!(h.engine.place(t.id), None);
        assert!(h.told.said().contains(&format!("{} stopped CancelledWaiting", t.id)), "{:?}", h.told.said());
    }

    /// A place that frees up (a transfer stopped) goes to the first one waiting, which starts by
    /// itself; once it ends, the line is empty.
    #[tokio::test]
    async fn a_freed_place_starts_the_next_in_line() {
        let h = Harness::new(1).await;
        let busy = take_the_place(&h);
        let (first, second) = (h.transfer("@old:example.org").await, h.transfer("@old:example.org").await);
        h.engine.spawn(first.id);
        h.engine.spawn(second.id);
        assert_eq!(h.engine.place(second.id), Some(Place { ahead: 1, running: 1 }));
        h.engine.stop(busy);
        // Each ends at once (its bundle was never stored), giving its place to the next.
        h.until(first.id, TransferState::Cancelled).await;
        h.until(second.id, TransferState::Cancelled).await;
        assert_eq!(h.engine.place(second.id), None);
        assert_eq!(h.engine.stop_all(), 0, "nothing left running");
    }
}
