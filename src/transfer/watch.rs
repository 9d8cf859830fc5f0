//! After a reservation (`export --to @new:other.server`) the old side watches the seats it
//! reserved: the new account's server joins them when it imports the bundle file, and the old
//! account can read the new account's membership in each of its rooms without that server's
//! help. Each seat taken (or declined) is journaled; when none is left waiting, the old account
//! is told that the move is complete. Looks come quickly while seats are being taken and slow
//! down while nothing changes, so a reservation that waits for days costs next to nothing.
//!
//! The old account's rank is given here, in each room where the new account is seen joined, and
//! never before: an invite (a typo in `--to`, a stranger) gets no rights. The room is journaled
//! done only after the rank is given, so a crash in between gives it at the next look (giving it
//! reads the power levels first: a rank already there is not written twice), and a room
//! journaled done never gets it again. A reservation that is cancelled, expires or is forgotten
//! withdraws the invites not taken yet ([`withdraw`]).

use std::time::Duration;

use ruma::api::client::membership::kick_user;
use ruma::api::error::ErrorKind;
use ruma::events::room::member::MembershipState;
use ruma::{OwnedRoomId, RoomId, UserId};

use super::journal::Journal;
use super::room::{carry_rank, membership};
use super::{Error, FailReason, RoomStep, SkipReason, Transfer, TransferKind, TransferState, Withdrawal};
use crate::homeserver::{Backoff, Homeserver, Transient};

/// The wait before the first look, and again after a look that found a seat taken.
pub const FIRST_LOOK: Duration = Duration::from_secs(5);
/// The longest wait between two looks (it doubles while nothing changes).
pub const LONGEST_WAIT: Duration = Duration::from_secs(5 * 60);

/// The waits between looks after the first, while nothing changes: doubling from twice the
/// first to the longest, for as long as the seats wait (no deadline: a reservation may wait for
/// days, and each look costs one read per seat still waiting). A look that finds a seat taken
/// ends the round, and the next round starts at [`FIRST_LOOK`] again.
pub const SLOWER: Backoff = Backoff::new(FIRST_LOOK.saturating_mul(2), LONGEST_WAIT);

/// Why a look changed nothing: the next one comes later.
#[derive(Debug, thiserror::Error)]
pub enum Unchanged {
    #[error("every seat still waits")]
    Waiting,
    #[error("{0}")]
    Unread(Error),
}

impl Transient for Unchanged {
    fn is_transient(&self) -> bool {
        true
    }
}

/// Whether `t` is a finished reservation whose seats are still watched.
pub fn is_watched(t: &Transfer) -> bool {
    t.kind == TransferKind::Reserve && t.state == TransferState::Done && !t.taken_up
}

/// What one look at the seats found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Look {
    /// Seats whose fate became known in this look (taken or declined).
    pub settled: usize,
    /// Seats still waiting for the new account.
    pub waiting: usize,
}

/// Reads, as the old account, the new account's membership in every room whose seat still waits,
/// and journals each that was taken (after giving it the old account's rank) or declined. With
/// `expired`, the invites still waiting are withdrawn too.
pub async fn look(acting: &Homeserver, journal: &Journal, t: &Transfer, expired: bool) -> Result<Look, Error> {
    let waiting: Vec<_> = journal
        .room_steps(t.id)
        .await?
        .into_iter()
        .filter(|(_, step)| *step == RoomStep::AwaitingAccept)
        .map(|(room, _)| room)
        .collect();
    let mut look = Look { settled: 0, waiting: 0 };
    for room in waiting {
        let settled = match membership(acting, &t.old, &room, &t.new).await {
            Ok(Some(MembershipState::Join)) => {
                give_rank(acting, t, &room).await;
                Some(RoomStep::Done)
            }
            Ok(Some(MembershipState::Invite)) if expired => {
                Some(withdraw_one(acting, t, &room, Withdrawal::Expired).await)
            }
            Ok(Some(MembershipState::Leave)) => Some(RoomStep::Skipped(SkipReason::Declined { new: t.new.clone() })),
            Ok(Some(MembershipState::Ban)) => Some(RoomStep::Skipped(SkipReason::BannedSince { new: t.new.clone() })),
            Ok(_) => None,
            // The old account left: it can no longer see the room, nor is it the one to move.
            Err(e) if matches!(e.kind(), Some(ErrorKind::Forbidden)) => Some(RoomStep::Skipped(old_left(t))),
            Err(e) => return Err(e.into()),
        };
        match settled {
            Some(step) => {
                journal.set_room_step(t.id, &room, &step).await?;
                look.settled += 1;
            }
            None => look.waiting += 1,
        }
    }
    Ok(look)
}

/// Gives the new account, seen joined in `room`, the rank the plan found for it (as the old
/// account, re-reading the power levels first). A refusal (the old account lost the right since)
/// is logged: the seat is taken all the same.
async fn give_rank(acting: &Homeserver, t: &Transfer, room: &RoomId) {
    let level = t.plan.as_ref().and_then(|p| p.rooms.iter().find(|r| r.room_id == room)).and_then(|r| r.give_level);
    if let Some(level) = level
        && let Err(e) = carry_rank(acting, &t.old, room, &t.new, level).await
    {
        tracing::warn!(transfer = t.id, room_id = %room, error = %e, "carrying the rank after the join failed");
    }
}

/// The kick's reason, which the new account's client shows: part of the request (the new
/// account's server keeps it), not of the report.
fn kick_reason(why: Withdrawal, old: &UserId) -> String {
    match why {
        Withdrawal::Cancelled => format!("{old} cancelled the move to this account (handoff)"),
        Withdrawal::Expired => format!("{old}'s move to this account expired before it was imported (handoff)"),
        Withdrawal::Forgotten => format!("{old} withdrew the move to this account (handoff)"),
    }
}

/// A reserved room's end when the reservation ends; `withdrawn` says whether an invite was taken back.
fn ended(why: Withdrawal, t: &Transfer, withdrawn: bool) -> RoomStep {
    RoomStep::Skipped(SkipReason::Reservation { why, new: t.new.clone(), withdrawn })
}

/// The old account left the room: it can't see whether the new one joined.
fn old_left(t: &Transfer) -> SkipReason {
    SkipReason::OldLeft { old: t.old.clone(), new: t.new.clone() }
}

/// Withdraws a reservation's invites that were not taken: in every room that may hold one (its
/// seat waits, or was in flight), where the new account is still only invited, the old account
/// takes the invite back, saying why. A room the new account joined is left alone (without the
/// rank: the move is off). Returns how many invites were withdrawn.
/// `journal` records each room's end (none for a forgotten reservation: its records are gone).
pub async fn withdraw(
    acting: &Homeserver,
    journal: Option<&Journal>,
    t: &Transfer,
    rooms: &[OwnedRoomId],
    why: Withdrawal,
) -> Result<usize, Error> {
    let mut withdrawn = 0;
    for room in rooms {
        let step = match membership(acting, &t.old, room, &t.new).await {
            Ok(Some(MembershipState::Invite)) => {
                let step = withdraw_one(acting, t, room, why).await;
                withdrawn += usize::from(!matches!(step, RoomStep::Failed(_)));
                step
            }
            Ok(Some(MembershipState::Join)) => RoomStep::Done,
            Ok(_) => ended(why, t, false),
            Err(e) if matches!(e.kind(), Some(ErrorKind::Forbidden)) => RoomStep::Skipped(old_left(t)),
            Err(e) => return Err(e.into()),
        };
        if let Some(journal) = journal {
            journal.set_room_step(t.id, room, &step).await?;
        }
    }
    Ok(withdrawn)
}

/// The rooms of a reservation that may hold an invite not taken: its seat waits, or was in flight.
pub async fn withdrawable(journal: &Journal, t: &Transfer) -> Result<Vec<OwnedRoomId>, Error> {
    Ok(journal
        .room_steps(t.id)
        .await?
        .into_iter()
        .filter(|(_, step)| matches!(step, RoomStep::AwaitingAccept | RoomStep::Started(_)))
        .map(|(room, _)| room)
        .collect())
}

/// Takes back one invite of the new account, as the old account (a kick of an invitee).
async fn withdraw_one(acting: &Homeserver, t: &Transfer, room: &RoomId, why: Withdrawal) -> RoomStep {
    let mut req = kick_user::v3::Request::new(room.to_owned(), t.new.clone());
    req.reason = Some(kick_reason(why, &t.old));
    match acting.send_as(&t.old, req).await {
        Ok(_) => ended(why, t, true),
        Err(e) => {
            tracing::warn!(transfer = t.id, room_id = %room, error = %e, "withdrawing an invite failed");
            RoomStep::Failed(FailReason::Withdraw { new: t.new.clone(), error: e.to_string() })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn looks_slow_down_while_nothing_changes() {
        use backon::BackoffBuilder;
        let waits: Vec<u64> = SLOWER.builder().build().take(8).map(|w| w.as_secs()).collect();
        assert_eq!(waits, [10, 20, 40, 80, 160, 300, 300, 300]);
    }
}
