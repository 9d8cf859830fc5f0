//! After a reservation (`export --to @new:other.server`) the old side watches the seats it
//! reserved: the new account's server joins them when it imports the bundle file, and the old
//! account can read the new account's membership in each of its rooms without that server's
//! help. Each seat taken (or declined) is journaled; when none is left waiting, the old account
//! is told that the move is complete. Looks come quickly while seats are being taken and slow
//! down while nothing changes, so a reservation that waits for days costs next to nothing.

use std::time::Duration;

use ruma::api::error::ErrorKind;
use ruma::events::room::member::MembershipState;

use super::journal::Journal;
use super::room::membership;
use super::{Error, RoomStep, Transfer, TransferKind, TransferState};
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
/// and journals each that was taken or declined.
pub async fn look(acting: &Homeserver, journal: &Journal, t: &Transfer) -> Result<Look, Error> {
    let waiting: Vec<_> = journal
        .room_steps(t.id)?
        .into_iter()
        .filter(|(_, step)| *step == RoomStep::AwaitingAccept)
        .map(|(room, _)| room)
        .collect();
    let mut look = Look { settled: 0, waiting: 0 };
    for room in waiting {
        let settled = match membership(acting, &t.old, &room, &t.new).await {
            Ok(Some(MembershipState::Join)) => Some(RoomStep::Done),
            Ok(Some(MembershipState::Leave)) => Some(RoomStep::Skipped(format!("{} declined the invite", t.new))),
            Ok(Some(MembershipState::Ban)) => Some(RoomStep::Skipped(format!("{} was banned from the room", t.new))),
            Ok(_) => None,
            // The old account left: it can no longer see the room, nor is it the one to move.
            Err(e) if matches!(e.kind(), Some(ErrorKind::Forbidden)) => Some(RoomStep::Skipped(format!(
                "{} left the room before {} joined, so whether it did can't be seen from here",
                t.old, t.new
            ))),
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
