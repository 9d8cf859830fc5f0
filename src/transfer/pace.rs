//! The pace of a reservation's invites to another homeserver. That server limits the invites
//! one of its users receives over federation (Synapse: `rc_invites.per_user`, by default a burst
//! of 5, then one every 333 s), and appservices are not exempt; the old account's server reports
//! each refusal as a server that can't be reached (502), like one that is away.
//!
//! So the pattern is read, not one error: once invites of this move have landed there and then
//! two in a row are refused, the lane is *paced*. Its rooms then try one at a time, each at the
//! lane's next slot. After a landing the next room tries at once: a wait longer than the limit's
//! interval leaves the server's bucket more than one invite, and those land back to back. After a
//! refusal that follows a landing, the lane waits the rate that gets through (the paced span over
//! the invites landed in it); after any other refusal, a probe that doubles up to [`PROBE_CAP`].
//! Only a run of landings longer than any bucket a wait could have filled ([`FULL_AFTER`]) says
//! the limit was raised and returns the lane to full speed: two in a row are what a wait of the
//! measured interval leaves when the interval is a little long. A paced room never fails on the
//! `federation_patience` clock: only when nothing has landed for [`Pace::gave_up`]'s span is the
//! server taken for away.

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
/// Landings in a row, each tried at once after the one before, that return a paced lane to full
/// speed: twice Synapse's default burst of 5, more than a wait could have let the bucket gather.
pub const FULL_AFTER: u32 = 10;

/// What a paced lane tells the people it works for, and `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paced {
    /// The server that limits the invites.
    pub server: OwnedServerName,
    /// Invites of this move that landed there, in all.
    pub landed: usize,
    /// The interval that gets through: the paced span over the invites landed in it, once one has.
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
    /// The interval that gets through, measured while paced: kept when the lane returns to full
    /// speed, so a lane paced again starts from it.
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
        /// Landings since the last refusal: [`FULL_AFTER`] of them end the pacing.
        run: u32,
        /// Invites landed since `since`.
        landed: u32,
        /// The last landing before the lane turned paced: the paced span starts there.
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
            lane.last_landed = Some(now);
            lane.landed += 1;
            lane.refused_in_a_row = 0;
            if let Mode::Paced { run, landed, since, .. } = lane.mode {
                let (run, landed) = (run + 1, landed + 1);
                lane.every = Some((now - since) / landed);
                lane.mode = if run >= FULL_AFTER {
                    tracing::info!(transfer = id, server = %lane.server, "invites land again at full speed");
                    Mode::Full
                } else {
                    // The next room tries at once: the wait may have left the bucket more.
                    Mode::Paced { next: now, probe: PROBE_FIRST, run, landed, since }
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
                    let since = lane.last_landed.unwrap_or(now);
                    lane.mode = Mode::Paced { next: now + first, probe: first, run: 0, landed: 0, since };
                    Verdict::Paced
                }
                Mode::Full => Verdict::Away,
                // A try sent before the lane turned paced.
                Mode::Paced { .. } if !turn => Verdict::Paced,
                Mode::Paced { probe, run, landed, since, .. } => {
                    // After a landing, the interval that gets through; else the probe.
                    let (wait, probe) = match lane.every {
                        Some(every) if run > 0 => (every, probe),
                        _ => (probe, (probe * 2).min(PROBE_CAP)),
                    };
                    lane.mode = Mode::Paced { next: now + wait, probe, run: 0, landed, since };
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
    async fn only_a_run_longer_than_any_burst_returns_to_full_speed() {
        let pace = Pace::default();
        let s = server();
        pace.landed(1, &s);
        pace.refused(1, &s, false);
        pace.refused(1, &s, false);
        assert!(pace.is_paced(1));
        for n in 1..FULL_AFTER {
            pace.landed(1, &s);
            assert!(pace.is_paced(1), "{n} landings in a row are what a long wait leaves in the bucket");
        }
        pace.landed(1, &s);
        assert!(!pace.is_paced(1));
        assert_eq!(pace.note(1), None);
        assert!(pace.turn(1).await.is_none(), "a full-speed lane has no turns");
    }

    /// Synapse's limiter (`synapse/api/ratelimiting.py`): a bucket of `burst` that drains at
    /// `per_second`; an action is allowed while the bucket has room for it.
    struct Limiter {
        per_second: f64,
        burst: f64,
        count: f64,
        start: Instant,
    }

    impl Limiter {
        fn new(per_second: f64, burst: f64) -> Self {
            Limiter { per_second, burst, count: 0.0, start: Instant::now() }
        }

        fn allow(&mut self) -> bool {
            let now = Instant::now();
            let performed = self.count - (now - self.start).as_secs_f64() * self.per_second;
            let performed = performed.max(0.0);
            let allowed = performed + 1.0 <= self.burst;
            if allowed {
                self.count = performed + 1.0;
                self.start = now;
            }
            allowed
        }
    }

    /// Sends `rooms` invites through the lane as the engine does (at full speed every waiting
    /// room at once; paced, one at its turn) to a server with `limiter`. Returns when the last
    /// landed and how often the lane went back to full speed.
    async fn reserve(pace: &Pace, limiter: &mut Limiter, rooms: usize) -> (Duration, usize) {
        let s = server();
        let start = Instant::now();
        let (mut left, mut fulls) = (rooms, 0);
        while left > 0 {
            match pace.turn(1).await {
                Some(_turn) => {
                    if limiter.allow() {
                        pace.landed(1, &s);
                        left -= 1;
                        if !pace.is_paced(1) {
                            fulls += 1;
                        }
                    } else {
                        pace.refused(1, &s, true);
                    }
                }
                None => {
                    let waiting = left;
                    for _ in 0..waiting {
                        if limiter.allow() {
                            pace.landed(1, &s);
                            left -= 1;
                        } else if pace.refused(1, &s, false) == Verdict::Away {
                            tokio::time::advance(Duration::from_millis(500)).await;
                        }
                    }
                }
            }
        }
        (start.elapsed(), fulls)
    }

    #[tokio::test(start_paused = true)]
    async fn under_synapse_s_limiter_the_lane_stays_paced_near_its_rate_and_leaves_it_when_raised() {
        // Synapse's default `rc_invites.per_user`: 5, then one per 333 s. 40 rooms: the burst,
        // then 35 at the limit's rate, 35 × 333 s ≈ 3.2 h at best.
        let pace = Pace::default();
        let mut limiter = Limiter::new(0.003, 5.0);
        let (took, fulls) = reserve(&pace, &mut limiter, 40).await;
        assert_eq!(fulls, 0, "the lane took a wait's leftover for the end of the limit");
        let best = Duration::from_secs_f64(35.0 / 0.003);
        assert!(took >= best, "{took:?}: faster than the limit allows?");
        assert!(took.as_secs_f64() <= best.as_secs_f64() * 1.25, "{took:?} against {best:?} at the limit's rate");
        let every = pace.note(1).unwrap().every.unwrap();
        assert!(every.as_secs() >= 300 && every.as_secs() <= 420, "measured {every:?} for one per 333 s");
        // The server's admin raises the limit: the lane is at full speed again within the run.
        let mut raised = Limiter::new(10.0, 50.0);
        let (took, fulls) = reserve(&pace, &mut raised, 40).await;
        assert_eq!(fulls, 1);
        assert!(!pace.is_paced(1));
        assert!(took <= every * 2, "{took:?}: the raised limit was not noticed");
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
