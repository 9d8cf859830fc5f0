//! Running one transfer, from its record: permission, plan, the profile, its rooms part by part,
//! the account steps, the report; and how the engine's part of the record is stored.

use std::time::Instant;

use ruma::{OwnedRoomId, UserId};

use super::Engine;
use super::rooms::Progress;
use crate::budget::{Budget, Class};
use crate::bundle::Bundle;
use crate::config::PermissionLevel;
use crate::homeserver::HsError;
use crate::metrics::{self, TransferOutcome};
use crate::transfer::account::AFTER_ROOMS;
use crate::transfer::plan::{self, Plan, Requirements};
use crate::transfer::progress::{Counts, Stopped};
use crate::transfer::report::Report;
use crate::transfer::{
    AccountStep, Error, StepDone, StepFailure, StepOutcome, Transfer, TransferKind, TransferState, Withdrawal, world,
};

impl Engine {
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

    fn is_local(&self, user: &UserId) -> bool {
        user.server_name() == self.config.homeserver.domain
    }

    pub(super) async fn run(&self, id: u64) -> Result<(), Error> {
        let started = Instant::now();
        // Its share of the budget is kept for it while it runs, also between two steps.
        let _present = self.budget.enter(id);
        // And from its start to its first seat, the others' work keeps only a few slots, so the
        // homeserver answers what its user waits for sooner (dropped by `announce` below).
        let opening = self.budget.opening(id);
        let mut t = self.journal.get(id).await?.ok_or(Error::Missing(id))?;
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
        let Some(stored) = self.store.get_bundle(&t.bundle).await? else {
            self.set_state(&mut t, TransferState::Cancelled).await?;
            self.reporter.stopped(&t, Stopped::BundleGone).await?;
            return Ok(());
        };
        // Through the border again: a bundle stored by an earlier handoff (before it checked what
        // it received) is held to the same bounds as one opened today.
        let limits = crate::bundle::border::Limits {
            max_rooms: self.config.handoff.max_rooms,
            max_history: self.config.handoff.history_messages,
        };
        let bundle = crate::bundle::border::check(stored.bundle, &limits).bundle;
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
        // Told once the transfer's first seat has ended.
        let opened = tokio::sync::Notify::new();
        let announce = async {
            opened.notified().await;
            drop(opening);
            if snapshot.status_event.is_some() {
                return Ok(None);
            }
            let total = snapshot.plan.as_ref().map_or(0, Plan::total);
            // After the first seat, with the favourites: under load a message takes as long as a
            // seat, and the user who waits for that room has the import's answer already.
            let _slot = self.budget.acquire(id, Class::First).await;
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
        // The status message goes out once the first room is seated, while the other first rooms
        // move. (Progress before it is there is not shown; the next edit shows it.)
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
                    let (moved, status) = tokio::join!(self.move_rooms(&t, &bundle, &plan, started, &opened), announce);
                    if let Some(status) = status? {
                        t.status_event = Some(status);
                        self.save(&mut t).await?;
                        // What moved before the message was there, shown now.
                        self.tell_progress(&t, &Progress::new(&plan, &self.journal.room_steps(id).await?)).await;
                    }
                    moved?
                }
                None => self.move_rooms(&t, &bundle, &plan, started, &opened).await?,
            };
            cancelled |= moved;
            if cancelled || plan.unplanned.is_empty() || self.cancel_requested(id) {
                break;
            }
        }

        let mut t = self.journal.get(id).await?.ok_or(Error::Missing(id))?;
        let plan = t.plan.clone().expect("planned above");
        // The report goes out before the final state is stored: a crash in between resumes and
        // posts it again (the reporter posts it once), instead of never.
        if cancelled || t.state == TransferState::Cancelling {
            // A cancelled reservation takes back the invites it sent (before the report, which
            // then says so; a crash in between does it again at the resume).
            if t.kind == TransferKind::Reserve {
                self.withdraw_seats(id, Withdrawal::Cancelled).await?;
            }
            // As stored: the rooms' tasks keep what the report names there (a refused rank).
            t = self.journal.get(id).await?.ok_or(Error::Missing(id))?;
            let report = Report::new(&t, &plan, &self.journal.room_steps(id).await?, true);
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
        let report = Report::new(&t, &plan, &self.journal.room_steps(id).await?, false);
        self.finish_with(&mut t, TransferState::Done, &report).await?;
        tracing::info!(transfer = id, elapsed_ms = started.elapsed().as_millis() as u64, "transfer done");
        Ok(())
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
    pub(super) async fn save(&self, t: &mut Transfer) -> Result<(), Error> {
        let (plan, status, steps) = (t.plan.clone(), t.status_event.clone(), t.account_steps.clone());
        let before = t.before.clone();
        let stored = self.journal.update(t.id, |s| {
            s.plan = plan;
            s.status_event = status;
            s.account_steps = steps;
            s.before = before;
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
}

#[cfg(test)]
mod tests {
    use super::super::testing::Harness;
    use crate::transfer::TransferState;

    /// A transfer whose bundle is gone (forgotten, or past its retention) ends at its start, and
    /// says so.
    #[tokio::test]
    async fn a_transfer_whose_bundle_is_gone_ends_and_says_so() {
        let h = Harness::new(4).await;
        let t = h.transfer("@old:example.org").await;
        h.engine.run(t.id).await.unwrap();
        assert_eq!(h.state(t.id).await, TransferState::Cancelled);
        assert_eq!(h.told.said(), [format!("{} stopped BundleGone", t.id)]);
    }

    /// Permission is checked at every start: an account that may not use handoff (here, one of
    /// another server) stops the transfer before anything is read or written.
    #[tokio::test]
    async fn a_transfer_for_an_account_that_may_not_use_handoff_stops_first() {
        let h = Harness::new(4).await;
        let t = h.transfer("@old:elsewhere.org").await;
        h.engine.run(t.id).await.unwrap();
        assert_eq!(h.state(t.id).await, TransferState::Cancelled);
        let said = h.told.said();
        assert!(said.len() == 1 && said[0].contains("Revoked") && said[0].contains("@old:elsewhere.org"), "{said:?}");
    }
}
