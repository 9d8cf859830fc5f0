//! How long a device-side import takes under the homeserver's limits on one account's joins
//! (Synapse's `rc_joins`: 10 at once, then one every 10 s into a room the server is in already,
//! one every 100 s into the others): before it starts (`--dry-run`) and as it goes (the time
//! left beside the progress bar). The import itself waits as each 429 asks.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use ruma::UserId;

use crate::transfer::plan::{Action, Plan};

/// Joins Synapse lets one account make at once, by default.
pub const BURST: usize = 10;
/// Then one every this long into a room its server is in already (`rc_joins.local`)...
pub const LOCAL_EVERY: Duration = Duration::from_secs(10);
/// ... and into a room it must join over federation (`rc_joins.remote`).
pub const REMOTE_EVERY: Duration = Duration::from_secs(100);
/// Completions the time left is measured over: the rooms in flight at once.
const WINDOW: usize = 8;

/// A plan's joins, by whether the new account's server is in the room already (one of the room's
/// via servers, which are servers in the room, is its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Joins {
    pub local: usize,
    pub remote: usize,
}

impl Joins {
    pub fn of(plan: &Plan, new: &UserId) -> Joins {
        let mut joins = Joins::default();
        for room in plan.rooms.iter().filter(|r| r.action == Action::Join) {
            if room.via.iter().any(|s| s == new.server_name()) {
                joins.local += 1;
            } else {
                joins.remote += 1;
            }
        }
        joins
    }

    pub fn total(&self) -> usize {
        self.local + self.remote
    }

    /// How long they take at Synapse's defaults: each kind's joins past the burst at its rate,
    /// the two kinds side by side.
    pub fn at_defaults(&self) -> Duration {
        let past_burst = |n: usize, every: Duration| every * n.saturating_sub(BURST) as u32;
        past_burst(self.local, LOCAL_EVERY).max(past_burst(self.remote, REMOTE_EVERY))
    }
}

/// The time left of an import as its rooms end: the rate of the last few rooms once past the
/// burst; within it (the first rooms go at once, whatever the limits), what the defaults make of
/// the rest unless the rooms are slower still.
pub struct TimeLeft {
    total: usize,
    done: usize,
    start: Instant,
    at_defaults: Duration,
    recent: VecDeque<Instant>,
}

impl TimeLeft {
    pub fn new(total: usize, at_defaults: Duration, now: Instant) -> TimeLeft {
        TimeLeft { total, done: 0, start: now, at_defaults, recent: VecDeque::with_capacity(WINDOW) }
    }

    pub fn room_done(&mut self, now: Instant) {
        self.done += 1;
        if self.recent.len() == WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(now);
    }

    pub fn left(&self, now: Instant) -> Duration {
        let remaining = self.total.saturating_sub(self.done);
        if remaining == 0 {
            return Duration::ZERO;
        }
        let measured = match (self.recent.front(), self.recent.back()) {
            (Some(first), Some(last)) if self.recent.len() >= 3 => {
                Some((*last - *first) / (self.recent.len() as u32 - 1) * remaining as u32)
            }
            _ => None,
        };
        let expected = self.at_defaults.saturating_sub(now - self.start);
        match measured {
            Some(measured) if self.done > BURST => measured,
            Some(measured) => measured.max(expected),
            None => expected,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::{Priority, RoomKind};
    use crate::transfer::plan::RoomPlan;

    /// A plan joining, for each `(server, n)`, `n` rooms whose via server is `server`.
    fn join_plan(rooms: &[(&str, usize)]) -> Plan {
        let rooms = rooms
            .iter()
            .flat_map(|(server, n)| (0..*n).map(move |i| (*server, i)))
            .map(|(server, i)| RoomPlan {
                room_id: format!("!r{i}:{server}").try_into().unwrap(),
                via: vec![server.try_into().unwrap()],
                name: None,
                kind: RoomKind::Group,
                priority: Priority::Normal,
                action: Action::Join,
                give_level: None,
                warnings: vec![],
            })
            .collect();
        Plan {
            old: "@old:a.org".try_into().unwrap(),
            new: "@new:b.org".try_into().unwrap(),
            rooms,
            unplanned: vec![],
            left_out: 0,
        }
    }

    #[test]
    fn joins_past_the_burst_take_the_defaults_rate_of_their_kind() {
        let new: &UserId = "@new:b.org".try_into().unwrap();
        // 30 rooms b.org is in already, 25 it must join over federation.
        let plan = join_plan(&[("b.org", 30), ("a.org", 25)]);
        let joins = Joins::of(&plan, new);
        assert_eq!(joins, Joins { local: 30, remote: 25 });
        // 20 local past the burst at 10 s (200 s), 15 remote at 100 s (1,500 s), side by side.
        assert_eq!(joins.at_defaults(), Duration::from_secs(1500));
        assert_eq!(Joins { local: 10, remote: 0 }.at_defaults(), Duration::ZERO, "the burst alone");
    }

    #[test]
    fn the_time_left_is_the_defaults_within_the_burst_and_the_measured_rate_past_it() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        // 40 rooms, 300 s expected at the defaults.
        let mut left = TimeLeft::new(40, s(300), t0);
        assert_eq!(left.left(t0), s(300));
        // The burst: 10 rooms in the first 2 seconds say nothing of what follows.
        for i in 0..10 {
            left.room_done(t0 + Duration::from_millis(200 * i));
        }
        assert_eq!(left.left(t0 + s(2)), s(298));
        // Past it, one room every 10 s: 29 rooms left at that rate.
        for i in 1..=8 {
            left.room_done(t0 + s(2 + 10 * i));
        }
        assert_eq!(left.done, 18);
        assert_eq!(left.left(t0 + s(82)), s(10) * 22);
        // Limits raised meanwhile: the measured rate follows.
        for i in 1..=8 {
            left.room_done(t0 + s(82) + Duration::from_millis(100 * i));
        }
        assert!(left.left(t0 + s(83)) < s(2), "{:?}", left.left(t0 + s(83)));
    }
}
