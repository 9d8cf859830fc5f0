//! The pace of a reservation's invites to another homeserver. That server limits the invites
//! one of its users receives over federation (Synapse: `rc_invites.per_user`, by default a burst
//! of 5, then one every 333 s), and appservices are not exempt; the old account's server reports
//! each refusal as a server that can't be reached (502), like one that is away.
//!
//! So the pattern is read, not one error: once invites of this move have landed there and then
//! two in a row are refused, the lane is *paced*. Its rooms then try one at a time, each at the
//! lane's next slot: after a refusal a probe that doubles up to [`PROBE_CAP`]; after a landing,
//! the interval measured between the last two landings, the rate that gets through. A landing
//! right after another (the limit was raised, or the burst is back) returns the lane to full
//! speed. A paced room never fails on the `federation_patience` clock: only when nothing has
//! landed for [`Pace::gave_up`]'s span is the server taken for away.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ruma::OwnedServerName;
use tokio::sync::watch;
use tokio::time::Instant;

/// The first wait after the lane turns paced; it doubles at each refusal.
pub const PROBE_FIRST: Duration = Duration::from_secs(15);
/// The longest wait between two tries after a refusal: a little over Synapse's default of one
/// invite per 333 s, so a default server is tried about once per invite it allows.
pub const PROBE_CAP: Duration = Duration::from_secs(345);
/// Refusals in a row (after a landing) that make a lane paced: one can be a blip.
const PATTERN: u32 = 2;

/// What a paced lane tells the people it works for, and `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paced {
    /// The server that limits the invites.
    pub server: OwnedServerName,
    /// Invites of this move that landed there, in all.
    pub landed: usize,
    /// The interval measured between the last two landings while paced, once known.
    pub every: Option<Duration>,
}

/// Every reservation's lane, by transfer.
#[derive(Default)]
pub struct Pace(Mutex<HashMap<u64, Lane>>);

struct Lane {
    server: OwnedServerName,
    landed: usize,
    last_landed: Option<Instant>,
    refused_in_a_row: u32,
    /// The interval measured between the last two landings while paced: kept when the lane
    /// returns to full speed, so a lane paced again starts from it.
    every: Option<Duration>,
    mode: Mode,
    /// One paced try at a time.
    turn: Arc<tokio::sync::Mutex<()>>,
    news: watch::Sender<Option<Paced>>,
}

#[derive(Clone, Copy)]
enum Mode {
    Full,
    Paced {
        /// When the next try may go.
        next: Instant,
        probe: Duration,
        /// The last try landed: if the next lands too, the lane is back to full speed.
        just_landed: bool,
        /// When the lane turned paced (the span before its first landing counts as one interval).
        since: Instant,
    },
}

/// A lane's verdict on a refused invite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A server that may be away: the room waits on the patience clock, as for any server.
    Away,
    /// The server limits these invites: the room tries again at the lane's pace.
    Paced,
}

impl Lane {
    fn note(&self) -> Option<Paced> {
        match self.mode {
            Mode::Full => None,
            Mode::Paced { .. } => Some(Paced { server: self.server.clone(), landed: self.landed, every: self.every }),
        }
    }

    fn tell(&self) {
        let note = self.note();
        self.news.send_if_modified(|old| {
            let changed = *old != note;
            *old = note;
            changed
        });
    }
}

impl Pace {
    fn with<T>(&self, id: u64, server: &OwnedServerName, f: impl FnOnce(&mut Lane) -> T) -> T {
        let mut lanes = self.0.lock().expect("pace lock");
        let lane = lanes.entry(id).or_insert_with(|| Lane {
            server: server.clone(),
            landed: 0,
            last_landed: None,
            refused_in_a_row: 0,
            every: None,
            mode: Mode::Full,
            turn: Arc::default(),
            news: watch::channel(None).0,
        });
        f(lane)
    }

    /// An invite of transfer `id` landed on `server`.
    pub fn landed(&self, id: u64, server: &OwnedServerName) {
        self.with(id, server, |lane| {
            let now = Instant::now();
            let previous = lane.last_landed.replace(now);
            lane.landed += 1;
            lane.refused_in_a_row = 0;
            if let Mode::Paced { probe, just_landed, since, .. } = lane.mode {
                lane.mode = if just_landed {
                    tracing::info!(transfer = id, server = %lane.server, "invites land again at full speed");
                    Mode::Full
                } else {
                    lane.every = Some(now - previous.unwrap_or(since).max(since));
                    // The next room tries at once: if it lands too, the limit is gone.
                    Mode::Paced { next: now, probe, just_landed: true, since }
                };
            }
            lane.tell();
        })
    }

    /// An invite of transfer `id` to `server` was refused as if the server were away: a paced
    /// try (`turn`: sent at its turn), or one sent at full speed, which moves no paced slot.
    pub fn refused(&self, id: u64, server: &OwnedServerName, turn: bool) -> Verdict {
        self.with(id, server, |lane| {
            let now = Instant::now();
            lane.refused_in_a_row += 1;
            let verdict = match lane.mode {
                Mode::Full if lane.landed > 0 && lane.refused_in_a_row >= PATTERN => {
                    tracing::warn!(transfer = id, server = %lane.server, landed = lane.landed, "the other server limits these invites: pacing them");
                    // A lane paced before starts from the interval it measured then.
                    let first = lane.every.unwrap_or(PROBE_FIRST);
                    lane.mode =
                        Mode::Paced { next: now + first, probe: first, just_landed: false, since: lane.last_landed.unwrap_or(now) };
                    Verdict::Paced
                }
                Mode::Full => Verdict::Away,
                // A try sent before the lane turned paced.
                Mode::Paced { .. } if !turn => Verdict::Paced,
                Mode::Paced { probe, since, just_landed, .. } => {
                    // After a landing, the measured interval from that landing; else the probe.
                    let (wait, probe) = match lane.every {
                        Some(every) if just_landed => (every, probe),
                        _ => (probe, (probe * 2).min(PROBE_CAP)),
                    };
                    lane.mode = Mode::Paced { next: now + wait, probe, just_landed: false, since };
                    Verdict::Paced
                }
            };
            lane.tell();
            verdict
        })
    }

    /// Whether transfer `id`'s invites are paced now.
    pub fn is_paced(&self, id: u64) -> bool {
        self.0.lock().expect("pace lock").get(&id).is_some_and(|l| matches!(l.mode, Mode::Paced { .. }))
    }

    /// Waits for the lane's turn: one paced try at a time, not before its slot. `None` when the
    /// lane is not paced (any more).
    pub async fn turn(&self, id: u64) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        let turn = Arc::clone(&self.0.lock().expect("pace lock").get(&id)?.turn);
        let guard = turn.lock_owned().await;
        let next = match self.0.lock().expect("pace lock").get(&id)?.mode {
            Mode::Paced { next, .. } => next,
            Mode::Full => return None,
        };
        tokio::time::sleep_until(next).await;
        Some(guard)
    }

    /// Whether a paced lane has been given long enough: nothing landed for the patience, nor for
    /// three measured intervals, nor for two of the longest probes. Then the server is away.
    pub fn gave_up(&self, id: u64, patience: Duration) -> Option<Duration> {
        let lanes = self.0.lock().expect("pace lock");
        let lane = lanes.get(&id)?;
        let Mode::Paced { since, .. } = lane.mode else { return None };
        let quiet = lane.last_landed.unwrap_or(since).elapsed();
        let span = patience.max(lane.every.unwrap_or_default() * 3).max(PROBE_CAP * 2);
        (quiet >= span).then_some(quiet)
    }

    /// What transfer `id`'s lane says now (`None`: at full speed, or none).
    pub fn note(&self, id: u64) -> Option<Paced> {
        self.0.lock().expect("pace lock").get(&id).and_then(Lane::note)
    }

    /// The lane's news as it changes, for the engine to tell the old account.
    pub fn watch(&self, id: u64, server: &OwnedServerName) -> watch::Receiver<Option<Paced>> {
        self.with(id, server, |lane| lane.news.subscribe())
    }

    /// Forgets a transfer's lane (at its end).
    pub fn forget(&self, id: u64) {
        self.0.lock().expect("pace lock").remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> OwnedServerName {
        "b.example".try_into().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_before_any_landing_are_a_server_away() {
        let pace = Pace::default();
        for _ in 0..5 {
            assert_eq!(pace.refused(1, &server(), false), Verdict::Away);
        }
        assert!(!pace.is_paced(1));
        assert_eq!(pace.note(1), None);
    }

    #[tokio::test(start_paused = true)]
    async fn after_landings_two_refusals_in_a_row_pace_the_lane_one_was_a_blip() {
        let pace = Pace::default();
        let mut news = pace.watch(1, &server());
        for _ in 0..5 {
            pace.landed(1, &server());
        }
        assert_eq!(pace.refused(1, &server(), false), Verdict::Away, "one refusal is a blip");
        pace.landed(1, &server());
        assert_eq!(pace.refused(1, &server(), false), Verdict::Away);
        assert_eq!(pace.refused(1, &server(), false), Verdict::Paced);
        assert!(pace.is_paced(1));
        assert!(news.has_changed().unwrap());
        assert_eq!(*news.borrow_and_update(), Some(Paced { server: server(), landed: 6, every: None }));
        // Paced: the next try waits for its slot.
        let before = Instant::now();
        assert!(pace.turn(1).await.is_some());
        assert_eq!(before.elapsed(), PROBE_FIRST);
    }

    #[tokio::test(start_paused = true)]
    async fn a_paced_lane_learns_the_rate_that_gets_through_and_tries_one_at_a_time() {
        let pace = Pace::default();
        let s = server();
        pace.landed(1, &s);
        pace.refused(1, &s, false);
        assert_eq!(pace.refused(1, &s, false), Verdict::Paced);
        // The server allows one invite every 333 s: probes of 15, 30, 60, 120, 240 s are refused
        // until the token is back.
        let start = Instant::now();
        loop {
            let _turn = pace.turn(1).await.expect("paced");
            if start.elapsed() >= Duration::from_secs(333) {
                pace.landed(1, &s);
                break;
            }
            pace.refused(1, &s, true);
        }
        let every = pace.note(1).unwrap().every.expect("an interval measured");
        assert!(every >= Duration::from_secs(333) && every < Duration::from_secs(700), "{every:?}");
        // The next room tries at once (is the limit gone?), is refused, and then waits the
        // measured interval, not the probe.
        let t0 = Instant::now();
        drop(pace.turn(1).await.expect("paced"));
        assert_eq!(t0.elapsed(), Duration::ZERO);
        pace.refused(1, &s, true);
        let t1 = Instant::now();
        drop(pace.turn(1).await.expect("paced"));
        assert_eq!(t1.elapsed(), every);
        // One at a time: a second room waits while the first holds the turn.
        let first = pace.turn(1).await.expect("paced");
        let second = tokio::time::timeout(Duration::from_secs(3600), pace.turn(1));
        assert!(second.await.is_err(), "a second try went while the first held the turn");
        drop(first);
    }

    #[tokio::test(start_paused = true)]
    async fn two_landings_in_a_row_return_to_full_speed() {
        let pace = Pace::default();
        let s = server();
        pace.landed(1, &s);
        pace.refused(1, &s, false);
        pace.refused(1, &s, false);
        assert!(pace.is_paced(1));
        pace.landed(1, &s);
        assert!(pace.is_paced(1), "one landing in a paced lane is the rate, not the end of the limit");
        pace.landed(1, &s);
        assert!(!pace.is_paced(1));
        assert_eq!(pace.note(1), None);
        assert!(pace.turn(1).await.is_none(), "a full-speed lane has no turns");
    }

    #[tokio::test(start_paused = true)]
    async fn a_paced_lane_where_nothing_lands_gives_up_after_the_longest_span() {
        let pace = Pace::default();
        let s = server();
        pace.landed(1, &s);
        pace.refused(1, &s, false);
        pace.refused(1, &s, false);
        let patience = Duration::from_secs(600);
        assert_eq!(pace.gave_up(1, patience), None);
        tokio::time::advance(Duration::from_secs(689)).await;
        assert_eq!(pace.gave_up(1, patience), None, "two of the longest probes are 690 s");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(pace.gave_up(1, patience).is_some());
        pace.forget(1);
        assert!(!pace.is_paced(1));
    }
}
