//! Taking a move back (`undo`): reads what the new account holds now, decides with
//! [`crate::transfer::undo`] what goes back, and does it room by room, each step journaled on the
//! move's record before and after it runs (a restarted service resumes it: nothing is left or
//! redacted twice), then the settings in one step. The bot words the report.

use std::sync::Arc;

use futures_util::stream::{self, StreamExt};

use super::Engine;
use crate::budget::Class;
use crate::bundle::Bundle;
use crate::homeserver::HsError;
use crate::store::now_ms;
use crate::transfer::account::SETTINGS;
use crate::transfer::revert::Reverter;
use crate::transfer::undo::{self, RoomMoved, UndoPlan, Wrote};
use crate::transfer::{Error, SettingsUndone, Transfer, TransferKind, UndoRoom, Undoing, world};

impl Engine {
    /// What an undo of `t` would do now (`undo --dry-run`, and what `undo` then does): every
    /// room of the move as the new account has it, and its settings, unless the bundle is gone.
    pub async fn undo_plan(&self, t: &Transfer, all: bool) -> Result<UndoPlan, Error> {
        let bundle = self.undo_bundle(t).await?;
        let steps = self.journal.room_steps(t.id).await?;
        let rooms = t.plan.as_ref().map(|p| p.rooms.as_slice()).unwrap_or_default();
        let (bundle_ref, steps_ref) = (&bundle, &steps);
        // Indices, not references, keep the futures `Send` (as in `rooms`).
        let seated: Vec<usize> =
            (0..rooms.len()).filter(|&i| steps_ref.get(&rooms[i].room_id).is_some_and(|s| s.is_seated())).collect();
        let reads = stream::iter(seated)
            .map(|i| async move {
                let room = &rooms[i];
                let _slot = self.budget.acquire(t.id, Class::Normal).await;
                let now = self.reverter(t).room_now(&room.room_id, &[]).await?;
                let entry = bundle_ref.as_ref().and_then(|b| b.rooms.iter().find(|e| e.room_id == room.room_id));
                let what = undo::room(&RoomMoved::of(room, steps_ref.get(&room.room_id), entry), &now, all);
                Ok::<_, HsError>((room.room_id.clone(), room.name.clone(), what))
            })
            .buffered(self.budget.size());
        let mut rooms = Vec::new();
        for read in reads.collect::<Vec<_>>().await {
            rooms.push(read?);
        }
        let settings = match (&bundle, &t.before) {
            (Some(bundle), Some(before)) => {
                let now =
                    world::read_account(&self.acting, &t.new, bundle.preferences.client_settings.keys(), &SETTINGS)
                        .await?;
                let wrote = Wrote::of_transfer(t, before, bundle, &undo::moved(&steps));
                Some(undo::settings(&wrote, &before.world, &now))
            }
            _ => None,
        };
        Ok(UndoPlan { rooms, settings })
    }

    /// The move's bundle, if it is still kept (a later export may have trimmed it): the settings
    /// the move wrote are computed again from it.
    async fn undo_bundle(&self, t: &Transfer) -> Result<Option<Bundle>, Error> {
        Ok(self.store.get_bundle(&t.bundle).await?.map(|stored| stored.bundle))
    }

    /// Starts (or resumes) the undo journaled on transfer `id`, in the background.
    pub fn spawn_undo(self: &Arc<Self>, id: u64) {
        let engine = Arc::clone(self);
        self.shutdown.spawn(async move {
            if let Err(e) = engine.run_undo(id).await {
                tracing::error!(transfer = id, error = %e, "undo stopped with an error; it resumes at the next start");
            }
        });
    }

    async fn run_undo(&self, id: u64) -> Result<(), Error> {
        let Some(mut t) = self.journal.get(id).await? else { return Err(Error::Missing(id)) };
        let Some(undoing) = t.undo.clone() else { return Ok(()) };
        if undoing.finished {
            return Ok(());
        }
        let _present = self.budget.enter(id);
        if undoing.status_event.is_none() {
            let status = self.reporter.undoing(&t).await?;
            t = self
                .journal
                .update(id, |t| set_undo(t, |u| u.status_event = Some(status)))
                .await?
                .ok_or(Error::Missing(id))?;
        }
        let plan = self.undo_plan(&t, undoing.all).await?;
        let (t, undoing) = (&t, &undoing);
        let rooms = &plan.rooms;
        let entries: Vec<usize> =
            (0..rooms.len()).filter(|&i| !undoing.rooms.get(&rooms[i].0).is_some_and(UndoRoom::is_final)).collect();
        let results = stream::iter(entries)
            .map(|i| async move {
                let (room, _, what) = &rooms[i];
                let _slot = self.budget.acquire(id, Class::Normal).await;
                let step = match what.settled(undoing.rooms.get(room)) {
                    Some(step) => step,
                    None => {
                        self.journal
                            .update(id, |t| {
                                set_undo(t, |u| {
                                    u.rooms.insert(room.clone(), UndoRoom::Started);
                                })
                            })
                            .await?;
                        match self.reverter(t).carry_out(room, what).await {
                            Ok(step) => step,
                            Err(e) if e.is_transient() => return Err(Error::Hs(e)),
                            Err(e) => UndoRoom::Failed(e.to_string()),
                        }
                    }
                };
                let t = self
                    .journal
                    .update(id, |t| {
                        set_undo(t, |u| {
                            u.rooms.insert(room.clone(), step);
                        })
                    })
                    .await?;
                if let Some(t) = t {
                    let done = t.undo.as_ref().map_or(0, |u| u.rooms.values().filter(|s| s.is_final()).count());
                    if let Err(e) = self.reporter.undo_progress(&t, done, rooms.len()).await {
                        tracing::debug!(transfer = id, error = %e, "cannot show the undo's progress");
                    }
                }
                Ok::<_, Error>(())
            })
            .buffer_unordered(self.budget.size());
        for result in results.collect::<Vec<_>>().await {
            result?;
        }
        let t = self.journal.get(id).await?.ok_or(Error::Missing(id))?;
        if t.undo.as_ref().is_some_and(|u| u.settings.is_none()) {
            let done = match &plan.settings {
                Some(settings) => self.reverter(&t).put_back(settings).await,
                None => SettingsUndone {
                    kept: vec!["every setting: the move's bundle is gone, so what it wrote can't be told apart".into()],
                    ..Default::default()
                },
            };
            self.journal.update(id, |t| set_undo(t, |u| u.settings = Some(done))).await?;
        }
        let t = self.journal.get(id).await?.ok_or(Error::Missing(id))?;
        let mut report = undo::report(&t);
        report.notices_by_old =
            t.kind == TransferKind::Move && self.config.handoff.notify.sender == crate::config::NotifySender::Old;
        self.reporter.undone(&t, &report).await?;
        self.journal.update(id, |t| set_undo(t, |u| u.finished = true)).await?;
        tracing::info!(transfer = id, left = report.left.len(), kept = report.kept.len(), "move undone");
        Ok(())
    }

    /// The undo's writes for `t`, as its new account; on a local move the old account, whose
    /// rank gave the new one its rank, may take it back where the new account can't.
    fn reverter<'a>(&'a self, t: &'a Transfer) -> Reverter<'a> {
        Reverter {
            hs: &self.acting,
            new: &t.new,
            old: &t.old,
            move_id: t.id,
            since_ms: t.created_at_ms,
            old_rank: (t.kind == TransferKind::Move).then_some((&self.acting, &*t.old)),
        }
    }
}

/// Changes the undo journaled on `t`.
fn set_undo(t: &mut Transfer, change: impl FnOnce(&mut Undoing)) {
    if let Some(undo) = t.undo.as_mut() {
        change(undo);
    }
}

/// A new undo's record, started now.
pub fn begin(all: bool) -> Undoing {
    Undoing { all, started_at_ms: now_ms(), ..Default::default() }
}
