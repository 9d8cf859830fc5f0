//! The invites a received bundle's rooms wait for. The old account's server reserves the seats
//! (its invites) while the new account imports here, and this server may let them in slowly: it
//! limits the invites one of its users receives over federation (Synapse: `rc_invites.per_user`,
//! by default 5, then one every 333 s), and the old server's handoff paces its invites to that
//! rate. So a room whose invite has not come waits for it, without its budget slot, as long as
//! invites keep coming: until none has for the quiet span ([`Seen::quiet`]), longer than the old
//! server keeps trying. One long poll of the new account's sync per transfer watches for them,
//! for every room that waits.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ruma::{OwnedRoomId, RoomId, UserId};
use tokio::sync::watch;
use tokio::time::Instant;

use super::world;
use crate::homeserver::Homeserver;

/// The least a waiting room waits without any invite coming: longer than a reserving handoff
/// goes on trying a server that refuses every invite (690 s at Synapse's default rate,
/// [`super::pace`]), so the old server has given up before this one does.
pub const QUIET: Duration = Duration::from_secs(12 * 60);
/// How long the new account is left without word when its rooms wait for invites.
pub const SAY_AFTER: Duration = Duration::from_secs(60);
/// How long one poll waits for an invite to come (the homeserver answers at once when one does).
const LONG_POLL: Duration = Duration::from_secs(25);
/// The least time between two polls, for a homeserver that answers a long poll at once.
const BETWEEN_POLLS: Duration = Duration::from_secs(2);

/// What a transfer's watch has seen.
#[derive(Debug, Clone)]
struct Seen {
    /// The rooms whose reservation invite came (pending when seen; some joined since).
    arrived: BTreeSet<OwnedRoomId>,
    /// When the last came, or the watch began.
    last: Instant,
    /// Whether the watch has polled once (what it found then came before it began).
    polled: bool,
    /// The longest pause between two arrivals.
    longest_gap: Duration,
    /// The pause between the last two arrivals, once there were two.
    every: Option<Duration>,
    /// Rooms waiting for their invite now.
    waiting: usize,
}

impl Seen {
    /// How long without an arrival the rooms wait for theirs: at least `least`, and three times
    /// the longest pause seen between two (a server slower than the default is waited for too).
    fn quiet(&self, least: Duration) -> Duration {
        least.max(self.longest_gap * 3)
    }

    /// The invites of `rooms` are pending now.
    fn add(&mut self, rooms: BTreeSet<OwnedRoomId>) {
        let before = self.arrived.len();
        self.arrived.extend(rooms);
        if self.arrived.len() > before {
            let now = Instant::now();
            if self.polled {
                let gap = now - self.last;
                self.longest_gap = self.longest_gap.max(gap);
                self.every = Some(gap);
            }
            self.last = now;
        }
        self.polled = true;
    }
}

/// How the rooms of a received bundle wait for their invites, for the new account and `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Awaited {
    /// Rooms waiting for their invite now.
    pub waiting: usize,
    /// How long since the last invite came (or the first room began to wait).
    pub since_last: Duration,
    /// The pause between the last two invites, once measured.
    pub every: Option<Duration>,
    /// How long without an invite before a waiting room is skipped.
    pub quiet: Duration,
}

/// How a room's wait for its invite ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    Came,
    /// None came for the quiet span: the reservation is over, and this room's is not coming.
    Quiet,
}

/// Every received transfer's watch, by transfer.
#[derive(Default)]
pub struct Arrivals(Mutex<HashMap<u64, Arc<Watch>>>);

struct Watch {
    /// One poll at a time, with its filter and sync token.
    poll: tokio::sync::Mutex<Poll>,
    seen: watch::Sender<Seen>,
}

#[derive(Default)]
struct Poll {
    filter: Option<String>,
    since: Option<String>,
}

/// A room counted as waiting until its wait ends, however it ends (a cancel drops it).
struct Waiting(Arc<Watch>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.seen.send_modify(|s| s.waiting -= 1);
    }
}

impl Arrivals {
    fn watch(&self, id: u64) -> Arc<Watch> {
        let mut watches = self.0.lock().expect("arrivals lock");
        let watch = watches.entry(id).or_insert_with(|| {
            Arc::new(Watch {
                poll: tokio::sync::Mutex::default(),
                seen: watch::channel(Seen {
                    arrived: BTreeSet::new(),
                    last: Instant::now(),
                    polled: false,
                    longest_gap: Duration::ZERO,
                    every: None,
                    waiting: 0,
                })
                .0,
            })
        });
        Arc::clone(watch)
    }

    /// Waits until the invite of `old` to `new` into `room` is pending (as `new` reads its sync
    /// through `hs`), or none of transfer `id`'s has come for the quiet span (at least `least`).
    pub async fn wait_for(
        &self,
        hs: &Homeserver,
        id: u64,
        new: &UserId,
        old: &UserId,
        room: &RoomId,
        least: Duration,
    ) -> Arrival {
        let watch = self.watch(id);
        watch.seen.send_modify(|s| s.waiting += 1);
        let _waiting = Waiting(Arc::clone(&watch));
        let mut news = watch.seen.subscribe();
        loop {
            {
                let seen = news.borrow_and_update();
                if seen.arrived.contains(room) {
                    return Arrival::Came;
                }
                if seen.last.elapsed() >= seen.quiet(least) {
                    return Arrival::Quiet;
                }
            }
            match watch.poll.try_lock() {
                Ok(mut poll) => {
                    let began = Instant::now();
                    match poll.once(hs, new, old).await {
                        Ok(pending) => watch.seen.send_modify(|s| s.add(pending)),
                        Err(e) => {
                            tracing::warn!(transfer = id, error = %e, "cannot read the new account's invites")
                        }
                    }
                    tokio::time::sleep_until(began + BETWEEN_POLLS).await;
                }
                // Another room polls: its news, or a look at the clock now and then.
                Err(_) => {
                    let _ = tokio::time::timeout(LONG_POLL, news.changed()).await;
                }
            }
        }
    }

    /// How transfer `id`'s rooms wait for their invites, while some do (`least`: the quiet
    /// span's least, as given to [`Arrivals::wait_for`]).
    pub fn note(&self, id: u64, least: Duration) -> Option<Awaited> {
        let watch = Arc::clone(self.0.lock().expect("arrivals lock").get(&id)?);
        let seen = watch.seen.borrow();
        (seen.waiting > 0).then(|| Awaited {
            waiting: seen.waiting,
            since_last: seen.last.elapsed(),
            every: seen.every,
            quiet: seen.quiet(least),
        })
    }

    /// Forgets a transfer's watch (at its end).
    pub fn forget(&self, id: u64) {
        self.0.lock().expect("arrivals lock").remove(&id);
    }
}

impl Poll {
    /// One read of the pending reservation invites: all of them the first time, then a long
    /// poll for those that come.
    async fn once(
        &mut self,
        hs: &Homeserver,
        new: &UserId,
        old: &UserId,
    ) -> Result<BTreeSet<OwnedRoomId>, crate::homeserver::HsError> {
        let filter = match &self.filter {
            Some(filter) => filter.clone(),
            None => self.filter.insert(world::invites_filter(hs, new, None).await?).clone(),
        };
        let timeout = if self.since.is_some() { LONG_POLL } else { Duration::ZERO };
        let (pending, next) = world::reservation_invites(hs, new, old, &filter, self.since.take(), timeout).await?;
        self.since = Some(next);
        Ok(pending)
    }
}
