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
use crate::homeserver::Homeserver;

/// The wait before the first look, and again after a look that found a seat taken.
pub const FIRST_LOOK: Duration = Duration::from_secs(5);
/// The longest wait between two looks (it doubles while nothing changes).
pub const LONGEST_WAIT: Duration = Duration::from_secs(5 * 60);

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

/// The wait before the next look, after `previous` and a look that found `look`.
pub fn next_wait(previous: Duration, look: Option<Look>) -> Duration {
    match look {
        Some(l) if l.settled > 0 => FIRST_LOOK,
        _ => (previous * 2).min(LONGEST_WAIT),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn looks_slow_down_while_nothing_changes_and_speed_up_when_a_seat_is_taken() {
        let quiet = Some(Look { settled: 0, waiting: 3 });
        let mut wait = FIRST_LOOK;
        let mut waits = vec![];
        for _ in 0..8 {
            wait = next_wait(wait, quiet);
            waits.push(wait.as_secs());
        }
        assert_eq!(waits, [10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(next_wait(LONGEST_WAIT, Some(Look { settled: 1, waiting: 2 })), FIRST_LOOK);
        // A look that failed (the homeserver away) waits longer too.
        assert_eq!(next_wait(Duration::from_secs(20), None), Duration::from_secs(40));
    }
}
