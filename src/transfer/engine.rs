//! The engine: runs transfers, one task each, many at once, their rooms drawing on one bounded
//! pool. A transfer is moved in parts: the first rooms (favourites and DMs) are read, planned and
//! moved before the rest of the account is even read, so the rooms that matter are usable first.
//! Each part goes in two passes, highest priority first: pass 1 takes every room's seat (invite,
//! join), pass 2 finishes them (rank, tags, notice). Then the account steps, then the report.
//! Every step is journaled before and after it runs; the engine only tells the [`Reporter`] how it
//! goes. At most `handoff.max_transfers` run at once; the others wait their turn in [`Line`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures_util::stream::{self, StreamExt};
use ruma::api::client::media::create_content;
use ruma::events::room::MediaSource;
use ruma::{OwnedRoomId, UserId};
use tokio_util::sync::CancellationToken;

use super::account::{AFTER_ROOMS, AccountWork};
use super::journal::Journal;
use super::line::{Admit, Line};
use super::plan::{self, Plan, Requirements, RoomPlan};
use super::progress::{Counts, Delivery, Place, Reporter, RoomHistory, Stopped};
use super::report::Report;
use super::room::RoomWork;
use super::{
    AccountStep, Error, FailReason, PATIENT, RoomStep, SkipReason, Stage, StepDone, StepFailure, StepOutcome, Transfer,
    TransferKind, TransferState, Withdrawal, watch, world,
};
use crate::budget::{Budget, Class};
use crate::bundle::{Bundle, Priority, RoomKind};
use crate::config::{Config, PermissionLevel};
use crate::homeserver::{Homeserver, HsError, Retry};
use crate::metrics::{self, RoomInFlight, RoomOutcome, TransferOutcome};
use crate::shutdown::Shutdown;
use crate::store::{Store, StoreError, now_ms};

/// How pass 1 left a room.
enum Seat {
    /// Seated (its index in the plan, and its step): pass 2 finishes it.
    Taken(usize, RoomStep),
    /// Skipped or failed, journaled as such.
    Ended,
    /// Not started: the transfer was cancelled first.
    NotStarted,
}

/// Runs transfers: one task each, many at once, their rooms drawing on one bounded pool.
pub struct Engine {
    config: Arc<Config>,
    /// Acts as the old and (local) new accounts.
    acting: Homeserver,
    /// The bundles.
    store: Store,
    journal: Journal,
    reporter: Arc<dyn Reporter>,
    rooms: RoomWork,
    account: AccountWork,
    /// Transfers running in this process (with the handle that stops one at once), and those
    /// waiting for a place.
    line: Mutex<Line<tokio::task::AbortHandle>>,
    /// Each transfer's stop: cancelled when it is asked to stop (also persisted as `Cancelling`,
    /// for a restart); a room waiting for a server or its turn ends at once.
    cancelling: Mutex<HashMap<u64, CancellationToken>>,
    /// Work in flight across every transfer and capture (`handoff.concurrency`): what the
    /// homeserver sees stays bounded however many users move at once, and rooms are served by
    /// priority class, then in turn across transfers ([`Budget`]).
    budget: Arc<Budget>,
    shutdown: Shutdown,
}

impl Engine {
    pub fn new(
        config: Arc<Config>,
        acting: Homeserver,
        store: Store,
        journal: Journal,
        reporter: Arc<dyn Reporter>,
        shutdown: Shutdown,
    ) -> Arc<Self> {
        let acting = acting.with_retry(PATIENT);
        Arc::new(Engine {
            rooms: RoomWork {
                acting: acting.clone(),
                // Every failure of a request that needs another server counts against one clock
                // (`federation_patience`), kept by `RoomWork::across`: no retries of its own.
                remote: acting.with_retry(Retry::NONE),
                journal: journal.clone(),
                notify: config.handoff.notify.clone(),
                domain: config.homeserver.domain.clone(),
                patience: config.handoff.federation_patience,
                reach: Default::default(),
            },
            account: AccountWork { acting: acting.clone() },
            acting,
            store,
            journal,
            reporter,
            line: Mutex::new(Line::new(config.handoff.max_transfers.0)),
            cancelling: Mutex::new(HashMap::new()),
            budget: Budget::new(config.handoff.concurrency.0),
            shutdown,
            config,
        })
    }

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
                Ok(()) => engine.watch_if_reserved(id),
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
        let t = match self.journal.get(id) {
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
    pub fn resume_all(self: &Arc<Self>) -> Result<usize, StoreError> {
        let mut n = 0;
        for t in self.journal.all()? {
            if t.is_live() {
                tracing::info!(transfer = t.id, old = %t.old, new = %t.new, "resuming transfer");
                self.spawn(t.id);
                n += 1;
            } else if watch::is_watched(&t) {
                self.watch(t.id);
            } else if t.kind == TransferKind::Reserve && t.state == TransferState::Cancelled && !t.withdrawn {
                self.withdraw_later(t.id, Withdrawal::Cancelled);
            }
        }
        Ok(n)
    }

    /// Withdraws the invites a cancelled or expired reservation's new account has not taken
    /// ([`watch::withdraw`]), as the old account, one at a time in the transfer's share of the
    /// budget; marked done in the record, so a restart in the middle does the rest. Returns how
    /// many were withdrawn.
    pub async fn withdraw_seats(&self, id: u64, why: Withdrawal) -> Result<usize, Error> {
        let Some(t) = self.journal.get(id)? else { return Ok(0) };
        // It acts as the old account: not once that account may no longer use handoff.
        if t.kind != TransferKind::Reserve || t.withdrawn || self.config.permission(&t.old) < PermissionLevel::User {
            return Ok(0);
        }
        let rooms = watch::withdrawable(&self.journal, &t)?;
        let withdrawn = {
            let _slot = self.budget.acquire(id, Class::Normal).await;
            watch::withdraw(&self.acting, Some(&self.journal), &t, &rooms, why).await?
        };
        self.journal.update(id, |s| s.withdrawn = true).await?;
        tracing::info!(transfer = id, withdrawn, ?why, "a reservation's invites not taken were withdrawn");
        Ok(withdrawn)
    }

    /// [`Engine::withdraw_seats`] in the background (after a `cancel` of a finished reservation,
    /// or at a start that finds one not done).
    pub fn withdraw_later(self: &Arc<Self>, id: u64, why: Withdrawal) {
        let engine = Arc::clone(self);
        self.shutdown.spawn(async move {
            if let Err(e) = engine.withdraw_seats(id, why).await {
                tracing::warn!(transfer = id, error = %e, "cannot withdraw a reservation's invites; trying at the next start");
            }
        });
    }

    /// `forget` of a reservation: its invites not taken are withdrawn in the background, from
    /// what its journal says now (its records are deleted right after, so nothing is journaled,
    /// and a restart before it is done does not resume it).
    pub fn withdraw_forgotten(self: &Arc<Self>, t: &Transfer) -> Result<(), Error> {
        if t.kind != TransferKind::Reserve || t.withdrawn || t.taken_up {
            return Ok(());
        }
        let rooms = watch::withdrawable(&self.journal, t)?;
        if rooms.is_empty() {
            return Ok(());
        }
        let (engine, t) = (Arc::clone(self), t.clone());
        self.shutdown.spawn(async move {
            let _slot = engine.budget.acquire(t.id, Class::Normal).await;
            match watch::withdraw(&engine.acting, None, &t, &rooms, Withdrawal::Forgotten).await {
                Ok(n) => tracing::info!(withdrawn = n, "a forgotten reservation's invites not taken were withdrawn"),
                Err(e) => tracing::warn!(error = %e, "cannot withdraw a forgotten reservation's invites"),
            }
        });
        Ok(())
    }

    /// A reservation that just finished: its seats are watched from now on, if any waits.
    fn watch_if_reserved(self: &Arc<Self>, id: u64) {
        if let Ok(Some(t)) = self.journal.get(id)
            && watch::is_watched(&t)
        {
            self.watch(id);
        }
    }

    /// Follows a finished reservation's seats until none waits ([`watch`]), then tells the old
    /// account. Runs in the background until then, across restarts, while the record is kept.
    fn watch(self: &Arc<Self>, id: u64) {
        let engine = Arc::clone(self);
        self.shutdown.spawn(async move {
            // A stop does not wait for the next look: the watch resumes at the next start.
            tokio::select! {
                _ = engine.watch_seats(id) => {}
                _ = engine.shutdown.begun() => {}
            }
        });
    }

    /// Looks at the seats until none waits: soon after a look that found a seat taken, less
    /// and less often while nothing changes or the homeserver is away ([`watch::SLOWER`]).
    async fn watch_seats(&self, id: u64) {
        loop {
            tokio::time::sleep(watch::FIRST_LOOK).await;
            let changed = watch::SLOWER
                .run(
                    || async {
                        match self.look_at_seats(id).await {
                            Ok(None) => Ok(false),
                            Ok(Some(look)) if look.settled > 0 => Ok(true),
                            Ok(Some(_)) => Err(watch::Unchanged::Waiting),
                            Err(e) => Err(watch::Unchanged::Unread(e)),
                        }
                    },
                    |unchanged| {
                        if let watch::Unchanged::Unread(e) = unchanged {
                            tracing::warn!(transfer = id, error = %e, "cannot look at the reserved seats; trying later");
                        }
                        true
                    },
                )
                .await;
            // Done with (or no longer watched): the watch ends; a seat taken: quick looks again.
            if !matches!(changed, Ok(true)) {
                return;
            }
        }
    }

    /// Looks at a watched reservation's seats now (also for `status`); when none waits any more,
    /// tells the old account and stops watching. `None` once it is not watched.
    pub async fn look_at_seats(&self, id: u64) -> Result<Option<watch::Look>, Error> {
        let Some(t) = self.journal.get(id)?.filter(watch::is_watched) else { return Ok(None) };
        // It reads as the old account: not once that account may no longer use handoff.
        if self.config.permission(&t.old) < PermissionLevel::User {
            tracing::info!(transfer = id, "seats no longer watched: the old account may no longer use handoff");
            return Ok(None);
        }
        let Some(plan) = t.plan.clone() else { return Ok(None) };
        // Once the code has expired, no import can take the seats any more: the invites still
        // waiting are withdrawn. After a grace of the federation patience, for an import redeemed
        // at the last moment that still waits for a server.
        let grace = self.config.handoff.federation_patience.as_millis() as u64;
        let expired = t.expires_at_ms.is_some_and(|at| now_ms() > at.saturating_add(grace));
        let look = {
            let _slot = self.budget.acquire(id, Class::Normal).await;
            watch::look(&self.acting, &self.journal, &t, expired).await?
        };
        if look.waiting > 0 {
            return Ok(Some(look));
        }
        let report = Report::new(&t, &plan, &self.journal.room_steps(id)?, false);
        tracing::info!(transfer = id, joined = report.moved, "every reserved seat is taken or declined");
        // Nothing was ever reserved (the reservation's report said so): nothing more to say. Said
        // before it is stored otherwise: a crash in between says it again (posted once).
        if report.moved > 0 || look.settled > 0 {
            self.reporter.taken_up(&t, &report).await?;
        }
        self.journal.update(id, |s| s.taken_up = true).await?;
        Ok(None)
    }

    /// The whole plan a transfer of `bundle` into `new` would follow now (`import --dry-run`):
    /// the same selection, reads and planning as a transfer's parts, all at once, nothing written.
    pub async fn preview(&self, bundle: &Bundle, new: &UserId, req: &Requirements) -> Result<Plan, HsError> {
        let mut plan = plan::unplanned(bundle, new, req, &Default::default());
        let part = std::mem::take(&mut plan.unplanned);
        let party = Budget::party_of(new);
        let world =
            world::read(&self.acting, &bundle.source.user_id, new, part.clone(), &self.budget, party, Class::Normal)
                .await?;
        plan.add(plan::plan_rooms(bundle, new, &part, &world), &part);
        Ok(plan)
    }

    /// The plan of a bundle from another server into the local account `new`: every room at once,
    /// from what `new` sees (its rooms, and the old account's invites waiting for it).
    pub async fn plan_received(&self, bundle: &Bundle, new: &UserId, req: &Requirements) -> Result<Plan, HsError> {
        let rooms: Vec<OwnedRoomId> = bundle.rooms.iter().map(|r| r.room_id.clone()).collect();
        let view = world::read_new_view(&self.acting, new, &bundle.source.user_id, &rooms).await?;
        Ok(plan::received(bundle, new, req, &view.joined, &view.reserved))
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

    fn cancel_requested(&self, id: u64) -> bool {
        self.cancelling.lock().expect("lock").get(&id).is_some_and(CancellationToken::is_cancelled)
    }

    /// The token that is cancelled when `id` is asked to stop.
    fn stop_token(&self, id: u64) -> CancellationToken {
        self.cancelling.lock().expect("lock").entry(id).or_default().clone()
    }

    fn is_local(&self, user: &UserId) -> bool {
        user.server_name() == self.config.homeserver.domain
    }

    async fn run(&self, id: u64) -> Result<(), Error> {
        let started = Instant::now();
        // Its share of the budget is kept for it while it runs, also between two steps.
        let _present = self.budget.enter(id);
        let mut t = self.journal.get(id)?.ok_or(Error::Missing(id))?;
        // Permission is checked at every start and resume: revoking it stops the transfer.
        let revoked = t.acted_for().into_iter().find(|u| self.config.permission(u) < PermissionLevel::User).cloned();
        if let Some(who) = revoked {
            self.set_state(&mut t, TransferState::Cancelled).await?;
            tracing::info!(transfer = id, user = %who, "transfer stopped: the user may no longer use handoff");
            self.reporter.stopped(&t, Stopped::Revoked(who)).await?;
            return Ok(());
        }
        if t.state == TransferState::Cancelling {
            self.stop_token(id).cancel();
        }
        if self.cancel_requested(id) && t.plan.is_none() {
            // Cancelled while it waited for a place, before it ever ran (a run stores its plan
            // before anything else): nothing was done.
            self.set_state(&mut t, TransferState::Cancelled).await?;
            self.reporter.stopped(&t, Stopped::CancelledWaiting).await?;
            return Ok(());
        }
        let Some(stored) = self.store.get_bundle(&t.bundle)? else {
            self.set_state(&mut t, TransferState::Cancelled).await?;
            self.reporter.stopped(&t, Stopped::BundleGone).await?;
            return Ok(());
        };
        let bundle = stored.bundle;
        if t.plan.is_none() {
            t.plan = Some(match t.kind {
                // The old account's rooms can't be read here: planned at once, as the new account
                // sees them.
                TransferKind::Receive => {
                    let _slot = self.budget.acquire(id, Class::Start).await;
                    self.plan_received(&bundle, &t.new, &t.requirements).await?
                }
                // Which rooms, in which order, from the bundle alone: nothing is read yet.
                _ => plan::unplanned(&bundle, &t.new, &t.requirements, &Default::default()),
            });
            self.save(&mut t).await?;
        }
        // The transfer's start: the profile and, meanwhile, the reads that plan its first rooms
        // (in the budget's start class: its first moves wait for them); its status message.
        let local = self.is_local(&t.new);
        let first_part = {
            let plan = t.plan.as_ref().expect("planned above");
            let part = plan.next_part(&bundle);
            (plan.rooms.is_empty() && !part.is_empty()).then_some(part)
        };
        let (old, new) = (t.old.clone(), t.new.clone());
        // What the status message is posted from, while the profile step changes `t`.
        let snapshot = t.clone();
        let read_first = async {
            match &first_part {
                Some(part) if !self.cancel_requested(id) => {
                    let w = world::read(&self.acting, &old, &new, part.clone(), &self.budget, id, Class::Start).await?;
                    Ok::<_, Error>(Some(w))
                }
                _ => Ok(None),
            }
        };
        let announce = async {
            if snapshot.status_event.is_some() {
                return Ok(None);
            }
            let total = snapshot.plan.as_ref().map_or(0, Plan::total);
            let _slot = self.budget.acquire(id, Class::Start).await;
            let status = self.reporter.started(&snapshot, Counts { seated: 0, done: 0, total }).await?;
            tracing::debug!(transfer = id, elapsed_ms = started.elapsed().as_millis() as u64, "status message posted");
            Ok::<_, Error>(Some(status))
        };
        let profile = async {
            if local && !self.cancel_requested(id) {
                // The profile goes before the joins: set after them, it would add a member event
                // to every room.
                if t.kind == TransferKind::Receive && !t.account_steps.contains_key(&AccountStep::Profile) {
                    // The avatar lives on the old server: a copy here outlives it.
                    let mut own = bundle.clone();
                    self.carry_avatar(&t.new, &mut own).await;
                    self.account_steps(&mut t, &own, &[AccountStep::Profile], Class::Start).await?;
                } else {
                    self.account_steps(&mut t, &bundle, &[AccountStep::Profile], Class::Start).await?;
                }
                tracing::debug!(transfer = id, elapsed_ms = started.elapsed().as_millis() as u64, "profile step done");
            }
            Ok::<_, Error>(())
        };
        let (first_world, profiled) = tokio::join!(read_first, profile);
        profiled?;
        let mut first_world = first_world?.zip(first_part);
        // The status message goes out while the first rooms move: the user has the import's
        // answer already, and under load a message takes as long as a seat. (Progress before it
        // is there is not shown; the next edit shows it.)
        let mut announce = Some(announce);

        let mut cancelled = false;
        loop {
            let plan = t.plan.clone().expect("planned above");
            // Plan the next part: the first rooms, then the rest, each read right before it moves.
            let part = plan.next_part(&bundle);
            if !part.is_empty() && !self.cancel_requested(id) {
                let world = match first_world.take() {
                    Some((world, read)) if read == part => world,
                    _ => {
                        world::read(&self.acting, &t.old, &t.new, part.clone(), &self.budget, id, Class::Normal).await?
                    }
                };
                let rooms = plan::plan_rooms(&bundle, &t.new, &part, &world);
                tracing::info!(
                    transfer = id,
                    rooms = rooms.len(),
                    left = plan.unplanned.len() - part.len(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "planned"
                );
                t.plan.as_mut().expect("planned above").add(rooms, &part);
                self.save(&mut t).await?;
            }
            let plan = t.plan.clone().expect("planned above");
            let moved = match announce.take() {
                Some(announce) => {
                    let (moved, status) = tokio::join!(self.move_rooms(&t, &bundle, &plan, started), announce);
                    if let Some(status) = status? {
                        t.status_event = Some(status);
                        self.save(&mut t).await?;
                        // What moved before the message was there, shown now.
                        self.tell_progress(&t, &Progress::new(&plan, &self.journal.room_steps(id)?)).await;
                    }
                    moved?
                }
                None => self.move_rooms(&t, &bundle, &plan, started).await?,
            };
            cancelled |= moved;
            if cancelled || plan.unplanned.is_empty() || self.cancel_requested(id) {
                break;
            }
        }

        let mut t = self.journal.get(id)?.ok_or(Error::Missing(id))?;
        let plan = t.plan.clone().expect("planned above");
        // The report goes out before the final state is stored: a crash in between resumes and
        // posts it again (the reporter posts it once), instead of never.
        if cancelled || t.state == TransferState::Cancelling {
            // A cancelled reservation takes back the invites it sent (before the report, which
            // then says so; a crash in between does it again at the resume).
            if t.kind == TransferKind::Reserve {
                self.withdraw_seats(id, Withdrawal::Cancelled).await?;
                t = self.journal.get(id)?.ok_or(Error::Missing(id))?;
            }
            let report = Report::new(&t, &plan, &self.journal.room_steps(id)?, true);
            return self.finish_with(&mut t, TransferState::Cancelled, &report).await;
        }
        tracing::info!(transfer = id, elapsed_ms = started.elapsed().as_millis() as u64, "rooms done");
        if self.is_local(&t.new) {
            self.account_steps(&mut t, &bundle, &AFTER_ROOMS, Class::First).await?;
        } else if !t.account_steps.contains_key(&AccountStep::Remote) {
            // For a reservation that is the plan, not a shortfall.
            let new = t.new.clone();
            let outcome = match t.kind {
                TransferKind::Reserve => StepOutcome::Done(StepDone::Reserved { new }),
                _ => StepOutcome::Failed(StepFailure::Elsewhere { new }),
            };
            t.account_steps.insert(AccountStep::Remote, outcome);
            self.save(&mut t).await?;
        }
        let report = Report::new(&t, &plan, &self.journal.room_steps(id)?, false);
        self.finish_with(&mut t, TransferState::Done, &report).await?;
        tracing::info!(transfer = id, elapsed_ms = started.elapsed().as_millis() as u64, "transfer done");
        Ok(())
    }

    /// Moves the planned rooms that are not finished: pass 1 seats them all, pass 2 finishes the
    /// seated ones. Returns whether a cancel stopped pass 1.
    async fn move_rooms(&self, t: &Transfer, bundle: &Bundle, plan: &Plan, started: Instant) -> Result<bool, Error> {
        let steps = self.journal.room_steps(t.id)?;
        // Plan indices of the rooms left to do (indices, not references, keep the futures `Send`).
        let todo: Vec<usize> = (0..plan.rooms.len())
            .filter(|&i| !steps.get(&plan.rooms[i].room_id).is_some_and(RoomStep::is_final))
            .collect();
        if todo.is_empty() {
            return Ok(false);
        }
        let progress = Progress::new(plan, &steps);
        let (progress, steps) = (&progress, &steps);
        let concurrency = self.config.handoff.concurrency.0;
        let stop = &self.stop_token(t.id);

        // Pass 1, seats: every room's invite and join, highest priority first, so the new account
        // is in its rooms as early as the homeserver allows.
        let seats: Vec<Seat> = stream::iter(todo)
            .map(|index: usize| async move {
                let room = &plan.rooms[index];
                let from = steps.get(&room.room_id).cloned().unwrap_or(RoomStep::Pending);
                // Seated before a restart: straight to pass 2, without taking a slot.
                if from.is_seated() {
                    return Seat::Taken(index, from);
                }
                // Its slot is given back while it waits for a server (and taken again to try).
                let begun = AtomicBool::new(false);
                let seat = self.budget.hold(t.id, class_of(room), async {
                    let _flight = RoomInFlight::start();
                    if stop.is_cancelled() {
                        return None;
                    }
                    begun.store(true, Ordering::Relaxed);
                    // Boxed: the seat's future is large, and this one nests it in several more.
                    Some(Box::pin(self.rooms.take_seat(t, room, &from)).await)
                });
                // A cancel ends the wait for a slot at once, and a room still waiting (for a
                // server, or to try again) after a moment's grace: a room in the middle of its
                // requests to this homeserver finishes its seat (no invite left without its join).
                let seat = tokio::select! {
                    biased;
                    seat = seat => seat,
                    _ = async {
                        stop.cancelled().await;
                        if begun.load(Ordering::Relaxed) {
                            tokio::time::sleep(CANCEL_GRACE).await;
                        }
                    } => None,
                };
                let ended = match seat {
                    None if !begun.load(Ordering::Relaxed) => {
                        self.end_room(t, progress, &room.room_id, &RoomStep::Skipped(SkipReason::NotStarted)).await;
                        return Seat::NotStarted;
                    }
                    None => {
                        tracing::info!(transfer = t.id, room_id = %room.room_id, "cancelled while the room waited");
                        RoomStep::Skipped(SkipReason::Interrupted)
                    }
                    Some(Ok(None)) => {
                        tracing::debug!(transfer = t.id, class = ?class_of(room), elapsed_ms = started.elapsed().as_millis() as u64, "room seated");
                        metrics::room_seated();
                        progress.seated.fetch_add(1, Ordering::Relaxed);
                        self.tell_progress(t, progress).await;
                        return Seat::Taken(index, RoomStep::Started(Stage::Joined));
                    }
                    Some(Ok(Some(step))) => step,
                    Some(Err(e)) => RoomStep::Failed(FailReason::Error(e.to_string())),
                };
                self.end_room(t, progress, &room.room_id, &ended).await;
                Seat::Ended
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
        let cancelled = seats.iter().any(|s| matches!(s, Seat::NotStarted));
        let mut seated: Vec<(usize, RoomStep)> = seats
            .into_iter()
            .filter_map(|s| match s {
                Seat::Taken(index, from) => Some((index, from)),
                _ => None,
            })
            .collect();
        seated.sort_by_key(|(index, _)| *index);
        if plan.unplanned.is_empty() {
            tracing::info!(
                transfer = t.id,
                seated = progress.seated.load(Ordering::Relaxed),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "rooms joined"
            );
        }

        // Pass 2: rank, tags and the notice of every seated room, in the same order. A cancel does
        // not stop it: every room the new account was joined to is finished and announced.
        stream::iter(seated)
            .map(|(index, from): (usize, RoomStep)| async move {
                let room = &plan.rooms[index];
                let _slot = self.budget.acquire(t.id, finish_class_of(room)).await;
                let _flight = RoomInFlight::start();
                let entry = bundle.rooms.iter().find(|e| e.room_id == room.room_id);
                let step = match Box::pin(self.rooms.finish(t, entry, room, &from)).await {
                    Ok(step) => step,
                    Err(e) => RoomStep::Failed(FailReason::Error(e.to_string())),
                };
                self.end_room(t, progress, &room.room_id, &step).await;
            })
            .buffer_unordered(concurrency)
            .collect::<Vec<()>>()
            .await;
        Ok(cancelled)
    }

    /// Account-level steps, each once (journaled in the transfer record). The new account's
    /// account data is read once, right before, and every merge is decided from it.
    async fn account_steps(
        &self,
        t: &mut Transfer,
        bundle: &Bundle,
        steps: &[AccountStep],
        class: Class,
    ) -> Result<(), Error> {
        let todo: Vec<AccountStep> = steps.iter().copied().filter(|s| !t.account_steps.contains_key(s)).collect();
        if todo.is_empty() {
            return Ok(());
        }
        // The account steps are few requests, each one after the other, and they complete the
        // move the user sees (the profile, the DMs): one slot of a high `class` at a time.
        let world = {
            let _slot = self.budget.acquire(t.id, class).await;
            world::read_account(&self.acting, &t.new, bundle, &todo).await?
        };
        let plan = t.plan.clone().expect("planned before the account steps");
        let room_steps = self.journal.room_steps(t.id)?;
        let seated: BTreeSet<OwnedRoomId> = plan
            .rooms
            .iter()
            .filter(|r| matches!(room_steps.get(&r.room_id), Some(RoomStep::Done | RoomStep::AwaitingAccept)))
            .map(|r| r.room_id.clone())
            .collect();
        for step in todo {
            let _slot = self.budget.acquire(t.id, class).await;
            let done = match step.setting() {
                Some(setting) => self.account.apply(setting, &t.old, &t.new, bundle, &seated, &world).await,
                None => self.deliver(step, t, bundle, &plan).await,
            };
            let outcome = match done {
                Ok(done) => StepOutcome::Done(done),
                Err(Error::Hs(e)) if !e.is_transient() => StepOutcome::Failed(StepFailure::Homeserver(e.to_string())),
                Err(e) => return Err(e),
            };
            t.account_steps.insert(step, outcome);
            self.save(t).await?;
        }
        Ok(())
    }

    /// Copies an avatar kept on another server into this one's media repository, as `new`, and
    /// points the bundle at the copy. If that fails the avatar stays where it is (still shown
    /// while its server is up), and the log says why.
    async fn carry_avatar(&self, new: &UserId, bundle: &mut Bundle) {
        let Some(url) = bundle.profile.avatar_url.clone() else { return };
        if url.server_name().is_ok_and(|s| s == self.config.homeserver.domain) {
            return;
        }
        let copied = async {
            // The old server serves it through this one: its clock is `federation_patience`.
            let remote = self.acting.with_retry(PATIENT.within(self.config.handoff.federation_patience));
            let bytes = remote.download(&MediaSource::Plain(url.clone()), AVATAR_MAX).await?;
            let mut upload = create_content::v3::Request::new(bytes);
            // The homeserver makes thumbnails only for an image type.
            upload.content_type = Some(image_type(&upload.file).into());
            upload.filename = Some("avatar".into());
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(self.acting.send_as(new, upload).await?.content_uri)
        };
        match copied.await {
            Ok(copy) => bundle.profile.avatar_url = Some(copy),
            Err(e) => tracing::warn!(error = %e, "the avatar was not copied from the old server; it is linked there"),
        }
    }

    /// The account steps that hand files over to the new account's DM.
    async fn deliver(&self, step: AccountStep, t: &Transfer, bundle: &Bundle, plan: &Plan) -> Result<StepDone, Error> {
        match step {
            AccountStep::RoomKeys => {
                let Some(keys) = &bundle.room_keys else {
                    return Ok(StepDone::NoKeyExport);
                };
                self.reporter.deliver(t, Delivery::RoomKeys { armored: &keys.armored }).await?;
                Ok(StepDone::KeysDelivered)
            }
            AccountStep::History => self.history(t, bundle, plan).await,
            _ => Ok(StepDone::Nothing),
        }
    }

    /// With `import --history N`: the last N captured messages of each moved room.
    async fn history(&self, t: &Transfer, bundle: &Bundle, plan: &Plan) -> Result<StepDone, Error> {
        let n = t.requirements.history;
        if n == 0 {
            return Ok(StepDone::HistoryNotAsked);
        }
        let rooms: Vec<RoomHistory<'_>> = plan
            .rooms
            .iter()
            .filter_map(|r| bundle.rooms.iter().find(|e| e.room_id == r.room_id))
            .filter_map(|entry| {
                let history = entry.history.as_ref()?;
                let recent = &history.messages[history.messages.len().saturating_sub(n)..];
                (!recent.is_empty() || history.encrypted_count > 0).then(|| RoomHistory {
                    title: entry.name.clone().unwrap_or_else(|| entry.room_id.to_string()),
                    messages: recent,
                    encrypted: history.encrypted_count,
                })
            })
            .collect();
        if rooms.is_empty() {
            return Ok(StepDone::NoHistory);
        }
        let (count, messages) = (rooms.len(), rooms.iter().map(|r| r.messages.len()).sum::<usize>());
        let file = self.reporter.deliver(t, Delivery::History(rooms)).await?;
        Ok(StepDone::HistoryDelivered { messages, rooms: count, file })
    }

    /// Tells the reporter the end, then stores the final state. A report that can't be posted
    /// for good (the DM is gone) is logged; the transfer still ends.
    async fn finish_with(&self, t: &mut Transfer, state: TransferState, report: &Report) -> Result<(), Error> {
        let _slot = self.budget.acquire(t.id, Class::Normal).await;
        if let Err(e) = self.reporter.finished(t, report).await {
            tracing::warn!(transfer = t.id, error = %e, "cannot post the report");
        }
        self.set_state(t, state).await
    }

    /// Stores what the engine owns of its record (the plan, the status message, the account
    /// steps) into the stored one, keeping what others wrote meanwhile (a `cancel`), and takes
    /// the stored record back.
    async fn save(&self, t: &mut Transfer) -> Result<(), Error> {
        let (plan, status, steps) = (t.plan.clone(), t.status_event.clone(), t.account_steps.clone());
        let stored = self.journal.update(t.id, |s| {
            s.plan = plan;
            s.status_event = status;
            s.account_steps = steps;
        });
        *t = stored.await?.ok_or(Error::Missing(t.id))?;
        Ok(())
    }

    /// Stores the engine's final state (`Done`, or `Cancelled`) and counts the transfer as ended.
    async fn set_state(&self, t: &mut Transfer, state: TransferState) -> Result<(), Error> {
        *t = self.journal.update(t.id, |s| s.state = state).await?.ok_or(Error::Missing(t.id))?;
        metrics::transfer_finished(if state == TransferState::Done {
            TransferOutcome::Done
        } else {
            TransferOutcome::Cancelled
        });
        Ok(())
    }

    /// Journals a room's final step and counts it.
    async fn end_room(&self, t: &Transfer, progress: &Progress, room: &OwnedRoomId, step: &RoomStep) {
        if let Err(e) = self.journal.set_room_step(t.id, room, step).await {
            tracing::error!(error = %e, "cannot journal a room's outcome");
        }
        metrics::room_finished(match step {
            RoomStep::AwaitingAccept => RoomOutcome::Awaiting,
            RoomStep::Skipped(_) => RoomOutcome::Skipped,
            RoomStep::Failed(_) => RoomOutcome::Failed,
            _ => RoomOutcome::Moved,
        });
        progress.done.fetch_add(1, Ordering::Relaxed);
        self.tell_progress(t, progress).await;
    }

    async fn tell_progress(&self, t: &Transfer, progress: &Progress) {
        let counts = Counts {
            seated: progress.seated.load(Ordering::Relaxed),
            done: progress.done.load(Ordering::Relaxed),
            total: progress.total,
        };
        if let Err(e) = self.reporter.progress(t, counts).await {
            tracing::warn!(error = %e, "cannot report progress");
        }
    }
}

/// A room's priority class in the budget: favourites and DMs first, low-priority rooms last.
fn class_of(room: &RoomPlan) -> Class {
    match room.priority {
        Priority::High => Class::First,
        Priority::Normal if room.kind == RoomKind::Dm => Class::First,
        Priority::Normal => Class::Normal,
        Priority::Low => Class::Low,
    }
}

/// A seated room's class for its finishing (rank, tags, notice): favourites and DMs stay first,
/// the others come after every transfer's seats.
fn finish_class_of(room: &RoomPlan) -> Class {
    match class_of(room) {
        Class::First => Class::First,
        _ => Class::Finishing,
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
        if let Ok(mut stops) = self.engine.cancelling.lock() {
            stops.remove(&self.id);
        }
        if let Ok(mut line) = self.engine.line.lock() {
            line.remove(self.id);
            self.engine.fill(&mut line);
        }
    }
}

/// Counts for progress, across the parts of a transfer.
struct Progress {
    seated: AtomicUsize,
    done: AtomicUsize,
    total: usize,
}

impl Progress {
    /// Counts what the journal says was done before.
    fn new(plan: &Plan, steps: &BTreeMap<OwnedRoomId, RoomStep>) -> Progress {
        let step = |id: &OwnedRoomId| steps.get(id).cloned().unwrap_or(RoomStep::Pending);
        // Seated: past pass 1, whether finished since or not (skipped and failed rooms never were).
        let seated = plan.rooms.iter().filter(|r| step(&r.room_id).is_seated()).count();
        let done = plan.rooms.iter().filter(|r| step(&r.room_id).is_final()).count();
        Progress { seated: AtomicUsize::new(seated), done: AtomicUsize::new(done), total: plan.total() }
    }
}

/// How long a room that has begun may go on after a cancel: long enough for requests to this
/// homeserver, short enough that a cancel ends a room waiting for another server within seconds.
const CANCEL_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// The largest avatar copied from another server.
const AVATAR_MAX: u64 = 10 * 1024 * 1024;

/// An image's type from its first bytes (the download says none): PNG, JPEG, GIF, WebP.
fn image_type(bytes: &[u8]) -> &'static str {
    match bytes {
        [0x89, b'P', b'N', b'G', ..] => "image/png",
        [0xFF, 0xD8, 0xFF, ..] => "image/jpeg",
        [b'G', b'I', b'F', b'8', ..] => "image/gif",
        [b'R', b'I', b'F', b'F', _, _, _, _, b'W', b'E', b'B', b'P', ..] => "image/webp",
        _ => "application/octet-stream",
    }
}
