//! The seat watch: after a reservation, the engine follows the seats until the new account's
//! server has taken them ([`watch`]), and withdraws the invites of one that ends first.

use std::sync::Arc;

use super::Engine;
use crate::budget::Class;
use crate::config::PermissionLevel;
use crate::store::now_ms;
use crate::transfer::report::Report;
use crate::transfer::{Error, Transfer, TransferKind, Withdrawal, watch};

impl Engine {
    /// Withdraws the invites a cancelled or expired reservation's new account has not taken
    /// ([`watch::withdraw`]), as the old account, one at a time in the transfer's share of the
    /// budget; marked done in the record, so a restart in the middle does the rest. Returns how
    /// many were withdrawn.
    pub async fn withdraw_seats(&self, id: u64, why: Withdrawal) -> Result<usize, Error> {
        let Some(t) = self.journal.get(id).await? else { return Ok(0) };
        // It acts as the old account: not once that account may no longer use handoff.
        if t.kind != TransferKind::Reserve || t.withdrawn || self.config.permission(&t.old) < PermissionLevel::User {
            return Ok(0);
        }
        let rooms = watch::withdrawable(&self.journal, &t).await?;
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
    pub async fn withdraw_forgotten(self: &Arc<Self>, t: &Transfer) -> Result<(), Error> {
        if t.kind != TransferKind::Reserve || t.withdrawn || t.taken_up {
            return Ok(());
        }
        let rooms = watch::withdrawable(&self.journal, t).await?;
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
    pub(super) async fn watch_if_reserved(self: &Arc<Self>, id: u64) {
        if let Ok(Some(t)) = self.journal.get(id).await
            && watch::is_watched(&t)
        {
            self.watch(id);
        }
    }

    /// Follows a finished reservation's seats until none waits ([`watch`]), then tells the old
    /// account. Runs in the background until then, across restarts, while the record is kept.
    pub(super) fn watch(self: &Arc<Self>, id: u64) {
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
        let Some(t) = self.journal.get(id).await?.filter(watch::is_watched) else { return Ok(None) };
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
        let report = Report::new(&t, &plan, &self.journal.room_steps(id).await?, false);
        tracing::info!(transfer = id, joined = report.moved, "every reserved seat is taken or declined");
        // Nothing was ever reserved (the reservation's report said so): nothing more to say. Said
        // before it is stored otherwise: a crash in between says it again (posted once).
        if report.moved > 0 || look.settled > 0 {
            self.reporter.taken_up(&t, &report).await?;
        }
        self.journal.update(id, |s| s.taken_up = true).await?;
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::Harness;
    use super::*;

    /// Only a finished reservation is watched, and only a reservation has invites to withdraw.
    #[tokio::test]
    async fn a_move_is_not_watched_and_withdraws_nothing() {
        let h = Harness::new(1).await;
        let t = h.transfer("@old:example.org").await;
        assert_eq!(h.engine.look_at_seats(t.id).await.unwrap(), None);
        assert_eq!(h.engine.withdraw_seats(t.id, Withdrawal::Cancelled).await.unwrap(), 0);
        assert!(!h.journal.get(t.id).await.unwrap().unwrap().withdrawn);
        h.engine.withdraw_forgotten(&t).await.unwrap();
    }

    /// A reservation's withdrawal is marked done in its record once every invite not taken was
    /// withdrawn (none here: no seat was reserved), so no start does it again.
    #[tokio::test]
    async fn a_reservations_withdrawal_is_marked_done() {
        let h = Harness::new(1).await;
        let mut t = h.transfer("@old:example.org").await;
        t.kind = TransferKind::Reserve;
        h.journal.put(&t).await.unwrap();
        assert_eq!(h.engine.withdraw_seats(t.id, Withdrawal::Expired).await.unwrap(), 0);
        assert!(h.journal.get(t.id).await.unwrap().unwrap().withdrawn);
        assert_eq!(h.engine.withdraw_seats(t.id, Withdrawal::Expired).await.unwrap(), 0);
    }
}
