//! The one budget of work in flight against the homeserver (`handoff.concurrency`), shared by
//! every capture, planning read and transfer, and served fairly: by priority class first (each
//! transfer's start, up to the reads that plan its first rooms; its first seat; favourites and
//! DMs; then seats in other rooms, then in low-priority ones; then finishing those), and
//! round-robin across the parties (transfers, captures) waiting in a class, so no user's
//! important rooms wait behind another user's ordinary ones, and a large transfer does not
//! starve a small one. While any transfer is opening (from its start to its first seat), the
//! other work keeps only a few slots ([`State::opening_cap`]): a homeserver answers a request
//! sooner the fewer it is serving, and the opening ones are what a user who has just sent
//! `import` waits for.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

/// A priority class; lower is served first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Class {
    /// A transfer's start: its first message, its profile and the reads that plan its first
    /// rooms. A few quick requests that every one of its first moves waits for, so no other
    /// transfer's moves hold them up.
    Start = 0,
    /// A transfer's first seat (its first favourite, or its first room if it has none): the room
    /// the user who just sent `import` waits for. With the start, the opening of a transfer.
    Opening = 1,
    /// Favourites and DMs, their seat and their finish; a transfer's last account steps: what a
    /// person needs first on a new device.
    First = 2,
    /// Taking the seat in other rooms (invite, join).
    Normal = 3,
    /// Taking the seat in low-priority rooms.
    Low = 4,
    /// Finishing the rooms of the two classes above (rank, tags, notice): once seated a room is
    /// usable, so every transfer's seats come before anyone's finishing, as in one transfer alone.
    Finishing = 5,
}

const CLASSES: usize = 6;

/// The classes of a transfer's opening: while work of these waits or is in flight, the other
/// classes keep at most [`State::opening_cap`] slots.
const OPENING: std::ops::Range<usize> = 0..Class::First as usize;

/// Who is waiting: a transfer, or a capture (any number that tells parties apart).
pub type Party = u64;

pub struct Budget {
    state: Mutex<State>,
}

struct State {
    size: usize,
    free: usize,
    /// Slots held, by party (only parties holding some).
    held: HashMap<Party, usize>,
    /// Slots held, by class.
    held_in: [usize; CLASSES],
    /// Parties present for a while (a running transfer), whether they hold or wait this moment.
    present: HashMap<Party, usize>,
    /// Transfers opening ([`Budget::opening`]), since when.
    opening: HashMap<Party, Instant>,
    /// Per class, each party's waiters in arrival order.
    waiting: [BTreeMap<Party, VecDeque<oneshot::Sender<Slot>>>; CLASSES],
    /// Per class, the party served last: the next turn goes to the party after it.
    last: [Option<Party>; CLASSES],
}

/// One unit of the budget, held while the work runs; dropping it hands it to the next in turn.
#[must_use = "the work counts against the budget only while this is held"]
pub struct Slot {
    budget: Arc<Budget>,
    party: Party,
    class: Class,
}

impl Budget {
    pub fn new(size: usize) -> Arc<Budget> {
        let size = size.max(1);
        Arc::new(Budget {
            state: Mutex::new(State {
                size,
                free: size,
                held: HashMap::new(),
                held_in: [0; CLASSES],
                present: HashMap::new(),
                opening: HashMap::new(),
                waiting: Default::default(),
                last: [None; CLASSES],
            }),
        })
    }

    /// Waits for a slot for `party`'s work of `class`.
    pub async fn acquire(self: &Arc<Self>, party: Party, class: Class) -> Slot {
        let (tx, rx) = oneshot::channel();
        {
            let mut state = self.state.lock().expect("budget lock");
            state.waiting[class as usize].entry(party).or_default().push_back(tx);
            // Served at once if a slot is free and it is this waiter's turn.
            state.dispatch(self);
        }
        rx.await.expect("a waiter's sender is only dropped after sending")
    }

    /// Runs `work` holding a slot of `class` for `party`; the waits inside it ([`away`]) give
    /// the slot back while they last, and take one again before the work goes on.
    pub async fn hold<F: Future>(self: &Arc<Self>, party: Party, class: Class, work: F) -> F::Output {
        let slot = self.acquire(party, class).await;
        self.lend(slot, class, work).await
    }

    /// [`Budget::hold`] with a slot taken already (of `class`, by its party): for work whose
    /// future is only made once it has its slot.
    pub async fn lend<F: Future>(self: &Arc<Self>, slot: Slot, class: Class, work: F) -> F::Output {
        let party = slot.party;
        let lease = Lease { budget: Arc::clone(self), party, class, slot: Mutex::new(Some(slot)) };
        LEASE.scope(lease, work).await
    }

    /// Counts `party` among those sharing the budget until the guard is dropped, also while it
    /// neither holds nor waits (between two steps of a transfer): the share of a running
    /// transfer is kept for it, instead of going to whoever asks first in that moment.
    pub fn enter(self: &Arc<Self>, party: Party) -> Presence {
        *self.state.lock().expect("budget lock").present.entry(party).or_default() += 1;
        Presence { budget: Arc::clone(self), party }
    }

    /// Marks `party` (a transfer) as opening until the guard is dropped: from its start to its
    /// first seat, the gaps between its steps included, the other work keeps only a few slots
    /// ([`State::opening_cap`]). For [`OPENING_MAX`] at most, and not while its first seat waits
    /// for another server ([`away`]): a seat that waits is not what the homeserver is busy with.
    pub fn opening(self: &Arc<Self>, party: Party) -> Opening {
        self.state.lock().expect("budget lock").opening.insert(party, Instant::now());
        Opening { budget: Arc::clone(self), party }
    }

    /// `party` is no longer opening: the rest gets its slots back.
    fn opened(self: &Arc<Self>, party: Party) {
        let mut state = self.state.lock().expect("budget lock");
        if state.opening.remove(&party).is_some() {
            state.dispatch(self);
        }
    }

    /// How many slots there are in all (for how much work one party puts in line at once).
    pub fn size(&self) -> usize {
        self.state.lock().expect("budget lock").size
    }

    /// The party of a user's own work outside a transfer (a capture): apart from every transfer's.
    pub fn party_of(user: &ruma::UserId) -> Party {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(user.as_bytes());
        // Transfer IDs count up from 1; these live in the top half.
        (1 << 63) | u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
    }

    /// A slot of `party` came back: hand it to the next waiter in turn, or keep it free.
    fn release(self: &Arc<Self>, party: Party, class: Class) {
        let mut state = self.state.lock().expect("budget lock");
        state.free += 1;
        state.give_back(party, class);
        state.dispatch(self);
    }
}

tokio::task_local! {
    /// The slot of the work running in this future ([`Budget::hold`]). A task-local, not an
    /// argument: a room's wait is deep inside its stages (a request that needs another server),
    /// and every stage would otherwise pass it on.
    static LEASE: Lease;
}

/// A slot held by one piece of work, which it gives back while it waits.
struct Lease {
    budget: Arc<Budget>,
    party: Party,
    class: Class,
    slot: Mutex<Option<Slot>>,
}

/// Waits for `wait` without the slot of the work it is part of ([`Budget::hold`]), so others'
/// work goes on meanwhile, then takes a slot again (in its turn) before returning. Outside a
/// held piece of work it is `wait` alone.
pub async fn away<F: Future>(wait: F) -> F::Output {
    let given = LEASE
        .try_with(|l| {
            let given = l.slot.lock().expect("lease lock").take().is_some();
            if given && l.class == Class::Opening {
                // A first seat that waits holds nobody back meanwhile.
                l.budget.opened(l.party);
            }
            given
        })
        .unwrap_or(false);
    let out = wait.await;
    if given {
        take_again().await;
    }
    out
}

/// `work` (a request that may wait long for another server), holding the slot for `grace`,
/// then without it until the work ends: a request still running by then is waiting, not
/// working the homeserver.
pub async fn away_after<F: Future>(grace: Duration, work: F) -> F::Output {
    let mut work = std::pin::pin!(work);
    tokio::select! {
        out = &mut work => return out,
        _ = tokio::time::sleep(grace) => {}
    }
    away(work).await
}

async fn take_again() {
    let Ok((budget, party, class)) = LEASE.try_with(|l| (Arc::clone(&l.budget), l.party, l.class)) else { return };
    let slot = budget.acquire(party, class).await;
    let _ = LEASE.try_with(|l| *l.slot.lock().expect("lease lock") = Some(slot));
}

impl State {
    /// Parties present, with work in hand or waiting.
    fn parties(&self) -> BTreeSet<Party> {
        let mut parties: BTreeSet<Party> = self.held.keys().chain(self.present.keys()).copied().collect();
        for class in &self.waiting {
            parties.extend(class.keys());
        }
        parties
    }

    /// The most slots the work outside the opening classes may hold while a transfer opens: a
    /// quarter of the budget (at least one). The homeserver, which answers a request later the
    /// more it is serving, then serves the opening work (a few quick reads, one seat per
    /// transfer) with fewer others; the rest of the budget comes back once every transfer that
    /// was opening has its first seat. Measured by `cargo bench --bench crowd` (`docs/scale.md`).
    fn opening_cap(&self) -> usize {
        (self.size / 4).max(1)
    }

    fn held_by(&self, party: Party) -> usize {
        self.held.get(&party).copied().unwrap_or(0)
    }

    /// Whether `party` may take a free slot for work of `class` now: within its `share` (the
    /// slots over the `parties` present, rounded up), or beyond it while a free slot remains for
    /// every other party below its share that may want one as urgently: one busy with work in
    /// hand (a transfer that is starting wants its favourites' seats in a moment, and must not
    /// find them all taken by one that started a little earlier), or waiting in this class or a
    /// higher one. A party waiting only for less urgent work does not hold slots back: classes
    /// still come first.
    fn may_take(&self, party: Party, class: usize, parties: &BTreeSet<Party>, share: usize) -> bool {
        if self.held_by(party) < share {
            return true;
        }
        let waits_in =
            |p: Party, classes: std::ops::Range<usize>| classes.into_iter().any(|c| self.waiting[c].contains_key(&p));
        let urgent = |p: Party| !waits_in(p, 0..CLASSES) || waits_in(p, 0..class + 1);
        let below = parties.iter().filter(|&&p| p != party && self.held_by(p) < share && urgent(p)).count();
        self.free > below
    }

    /// Hands free slots to waiters: the highest class first, parties in turn within it, each
    /// party only as [`State::may_take`] allows (its fair share, unless the rest has no one as
    /// urgent to serve); what nobody may take stays free for a moment.
    fn dispatch(&mut self, budget: &Arc<Budget>) {
        while self.free > 0 {
            let Some((class, party)) = self.next_waiter() else { return };
            let queue = self.waiting[class].get_mut(&party).expect("present");
            let tx = queue.pop_front().expect("queues are never left empty");
            if queue.is_empty() {
                self.waiting[class].remove(&party);
            }
            self.last[class] = Some(party);
            self.free -= 1;
            *self.held.entry(party).or_default() += 1;
            self.held_in[class] += 1;
            let class = CLASS_OF[class];
            if let Err(slot) = tx.send(Slot { budget: Arc::clone(budget), party, class }) {
                // The waiter gave up (its task was cancelled): the slot is taken back here,
                // without its drop releasing it a second time (this lock is held).
                std::mem::forget(slot);
                self.free += 1;
                self.give_back(party, class);
            }
        }
    }

    fn give_back(&mut self, party: Party, class: Class) {
        self.held_in[class as usize] -= 1;
        if let Some(n) = self.held.get_mut(&party) {
            *n -= 1;
            if *n == 0 {
                self.held.remove(&party);
            }
        }
    }

    /// The waiter to serve next: in the highest class with a party that may take a slot, the
    /// first such party after the one served last in that class.
    fn next_waiter(&self) -> Option<(usize, Party)> {
        // Who shares the budget does not change while one waiter is picked: counted once.
        let present = self.parties();
        let share = self.size.div_ceil(present.len().max(1));
        let opening = OPENING.into_iter().any(|c| self.held_in[c] > 0 || !self.waiting[c].is_empty())
            || self.opening.values().any(|since| since.elapsed() < OPENING_MAX);
        for class in 0..CLASSES {
            let parties = &self.waiting[class];
            if parties.is_empty() {
                continue;
            }
            // While a transfer opens, the rest keeps a few slots (this class and all below).
            if opening
                && class >= OPENING.end
                && self.held_in[OPENING.end..].iter().sum::<usize>() >= self.opening_cap()
            {
                return None;
            }
            // The parties after the one served last, then from the start round to it.
            let from = self.last[class].map_or(0, |last| last.saturating_add(1));
            let mut in_turn = parties.range(from..).chain(parties.range(..from)).map(|(p, _)| *p);
            if let Some(party) = in_turn.find(|&p| self.may_take(p, class, &present, share)) {
                return Some((class, party));
            }
        }
        None
    }
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budget").field("size", &self.size()).finish_non_exhaustive()
    }
}

/// A transfer opening ([`Budget::opening`]).
#[must_use = "the transfer counts as opening only while this is held"]
pub struct Opening {
    budget: Arc<Budget>,
    party: Party,
}

impl Drop for Opening {
    fn drop(&mut self) {
        self.budget.opened(self.party);
    }
}

/// The longest a transfer counts as opening ([`Budget::opening`]): a first seat that takes
/// longer (a homeserver slow for other reasons) gives the rest its slots back.
pub const OPENING_MAX: Duration = Duration::from_secs(10);

/// A party's presence among those sharing the budget ([`Budget::enter`]).
#[must_use = "the party counts as present only while this is held"]
pub struct Presence {
    budget: Arc<Budget>,
    party: Party,
}

impl Drop for Presence {
    fn drop(&mut self) {
        let mut state = self.budget.state.lock().expect("budget lock");
        if let Some(n) = state.present.get_mut(&self.party) {
            *n -= 1;
            if *n == 0 {
                state.present.remove(&self.party);
            }
        }
        // Its share goes to the others.
        state.dispatch(&self.budget);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.budget.release(self.party, self.class);
    }
}

/// A class from its index.
const CLASS_OF: [Class; CLASSES] =
    [Class::Start, Class::Opening, Class::First, Class::Normal, Class::Low, Class::Finishing];

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Several transfers of different sizes and priorities start at once on a budget of 2; each
    /// room holds its slot for 100 ms of simulated time. The order in which rooms are served:
    /// every transfer's favourites and DMs first, in turn, then the normal rooms in turn, then
    /// the low-priority ones, whatever order the transfers queued in.
    #[tokio::test(start_paused = true)]
    async fn rooms_are_served_by_class_then_in_turn_across_transfers() {
        let budget = Budget::new(2);
        let served = Arc::new(Mutex::new(Vec::new()));
        // Transfer 1 queues all its 6 normal rooms first (the old first-come-first-served would
        // serve them all before anyone's favourites), then its favourite.
        let rooms: Vec<(Party, Class, &str)> = vec![
            (1, Class::Normal, "1n1"),
            (1, Class::Normal, "1n2"),
            (1, Class::Normal, "1n3"),
            (1, Class::Normal, "1n4"),
            (1, Class::Normal, "1n5"),
            (1, Class::Normal, "1n6"),
            (1, Class::First, "1f1"),
            (2, Class::Low, "2l1"),
            (2, Class::First, "2f1"),
            (2, Class::First, "2f2"),
            (3, Class::Normal, "3n1"),
            (3, Class::First, "3f1"),
            (1, Class::Finishing, "1x1"),
            (4, Class::Start, "4p1"),
            (3, Class::Finishing, "3x1"),
        ];
        let mut tasks = Vec::new();
        for (i, (party, class, name)) in rooms.into_iter().enumerate() {
            let (budget, served) = (Arc::clone(&budget), Arc::clone(&served));
            tasks.push(tokio::spawn(async move {
                // Queued in this order, a millisecond apart.
                tokio::time::sleep(Duration::from_millis(i as u64)).await;
                let _slot = budget.acquire(party, class).await;
                served.lock().unwrap().push(name);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let served = served.lock().unwrap().clone();
        // The first two rooms found the budget free (transfer 1 was alone); from then on the
        // waiters are served by class and in turn: the start of transfer 4 (queued last of all);
        // favourites 1, 2, 3, 2; normal rooms 3 (1 had the last two turns), then 1's; the
        // low-priority room; the finishing of rooms 1, 3 last.
        assert_eq!(
            served,
            ["1n1", "1n2", "4p1", "1f1", "2f1", "3f1", "2f2", "3n1", "1n3", "1n4", "1n5", "1n6", "2l1", "1x1", "3x1"],
        );
    }

    /// Transfer 2 is busy starting (one slot in hand) when transfer 1, which started a moment
    /// earlier, asks for six favourites' seats on a budget of 4: it gets its share (2), and a
    /// slot stays free, so transfer 2's first favourite is served the moment it asks, not after
    /// transfer 1's. Once transfer 2 is done, transfer 1 gets the whole budget again.
    #[tokio::test(start_paused = true)]
    async fn a_transfer_starting_a_moment_later_finds_its_share_free() {
        let budget = Budget::new(4);
        let (_one, two) = (budget.enter(1), budget.enter(2));
        let start = budget.acquire(2, Class::Start).await;
        let served = Arc::new(Mutex::new(Vec::new()));
        let mut seats = Vec::new();
        for i in 0..6 {
            let (budget, served) = (Arc::clone(&budget), Arc::clone(&served));
            seats.push(tokio::spawn(async move {
                let _slot = budget.acquire(1, Class::First).await;
                served.lock().unwrap().push((i, tokio::time::Instant::now()));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        // While transfer 2 starts, the other work keeps a quarter of the budget (1 of 4).
        assert_eq!(served.lock().unwrap().len(), 1, "transfer 1 holds a quarter, no more");
        // Between two steps it holds nothing for a moment: its share is still kept for it.
        drop(start);
        tokio::time::sleep(Duration::from_millis(5)).await;
        let asked = tokio::time::Instant::now();
        let first = budget.acquire(2, Class::First).await;
        assert_eq!(asked.elapsed(), Duration::ZERO, "transfer 2's first favourite waited");
        drop(first);
        drop(two);
        for s in seats {
            s.await.unwrap();
        }
        // Alone again, transfer 1 took the free slots as they came: its last four rooms in two
        // rounds of slots, not one at a time.
        let times: Vec<_> = served.lock().unwrap().iter().map(|(_, at)| *at).collect();
        assert!(times[5].duration_since(times[0]) <= Duration::from_millis(200), "{times:?}");
    }

    /// While a transfer opens (its start, then its first seat, wait or are in flight), the other
    /// work keeps a quarter of the budget (2 of 8): transfer 1's rooms, which held 7 slots, get
    /// no more than 2 back as they end. Once transfer 2's first seat is taken, the rest comes back.
    #[tokio::test(start_paused = true)]
    async fn while_a_transfer_opens_the_rest_keeps_a_quarter_of_the_budget() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let budget = Budget::new(8);
        let (_one, _two) = (budget.enter(1), budget.enter(2));
        let held = Arc::new(AtomicUsize::new(0));
        let mut rooms = Vec::new();
        for _ in 0..40 {
            let (budget, held) = (Arc::clone(&budget), Arc::clone(&held));
            rooms.push(tokio::spawn(async move {
                let _slot = budget.acquire(1, Class::First).await;
                held.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
                held.fetch_sub(1, Ordering::SeqCst);
            }));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        // Before: its share (4), and more while a slot stays free for transfer 2.
        assert_eq!(held.load(Ordering::SeqCst), 7);
        let opening = budget.opening(2);
        let start = tokio::time::timeout(Duration::ZERO, budget.acquire(2, Class::Start)).await;
        let start = start.expect("transfer 2's start waited");
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(held.load(Ordering::SeqCst), 2, "while transfer 2 starts");
        drop(start);
        // Between two of its steps it still opens.
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(held.load(Ordering::SeqCst), 2, "between transfer 2's start and its first seat");
        let seat = tokio::time::timeout(Duration::ZERO, budget.acquire(2, Class::Opening)).await;
        let seat = seat.expect("transfer 2's first seat waited");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(held.load(Ordering::SeqCst), 2, "while transfer 2 takes its first seat");
        drop(seat);
        drop(opening);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(held.load(Ordering::SeqCst), 7, "after it");
        for r in rooms {
            r.await.unwrap();
        }
    }

    /// A room that waits (for another server, say) gives its slot back for the wait: the only
    /// slot goes to another transfer at once, and the room takes one again, in its turn, before
    /// it goes on. A request still running after its grace lends the slot the same way.
    #[tokio::test(start_paused = true)]
    async fn a_waiting_room_gives_its_slot_back_while_it_sleeps() {
        let budget = Budget::new(1);
        let events = Arc::new(Mutex::new(Vec::new()));
        let log = |events: &Arc<Mutex<Vec<(&'static str, u128)>>>, what| {
            let start = tokio::time::Instant::now();
            let events = Arc::clone(events);
            move || events.lock().unwrap().push((what, start.elapsed().as_millis()))
        };
        let waiting = {
            let (budget, back) = (Arc::clone(&budget), log(&events, "room goes on"));
            tokio::spawn(async move {
                budget
                    .hold(1, Class::First, async {
                        away(tokio::time::sleep(Duration::from_secs(10))).await;
                        back();
                    })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(1)).await;
        let other = tokio::time::timeout(Duration::from_millis(1), budget.acquire(2, Class::Low)).await;
        let other = other.expect("the sleeping room kept its slot");
        log(&events, "other served")();
        // The room wakes up while the other holds the slot: it waits for it.
        tokio::time::sleep(Duration::from_secs(15)).await;
        assert!(events.lock().unwrap().iter().all(|(what, _)| *what != "room goes on"));
        drop(other);
        waiting.await.unwrap();
        let order: Vec<_> = events.lock().unwrap().iter().map(|(what, _)| *what).collect();
        assert_eq!(order, ["other served", "room goes on"]);

        // A slow request: the slot is held for its grace, then lent until it ends.
        let slow = {
            let budget = Arc::clone(&budget);
            tokio::spawn(async move {
                budget
                    .hold(
                        1,
                        Class::First,
                        away_after(Duration::from_secs(2), tokio::time::sleep(Duration::from_secs(30))),
                    )
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(1)).await;
        let early = tokio::time::timeout(Duration::from_secs(1), budget.acquire(2, Class::Low)).await;
        assert!(early.is_err(), "lent before its grace");
        let later = tokio::time::timeout(Duration::from_secs(2), budget.acquire(2, Class::Low)).await;
        drop(later.expect("held past its grace"));
        slow.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_gives_up_does_not_lose_the_slot() {
        let budget = Budget::new(1);
        let held = budget.acquire(1, Class::Normal).await;
        let gave_up = tokio::time::timeout(Duration::from_millis(10), budget.acquire(2, Class::First)).await;
        assert!(gave_up.is_err());
        drop(held);
        // The slot went past the waiter that gave up and is free again.
        let again = tokio::time::timeout(Duration::from_millis(10), budget.acquire(3, Class::Low)).await;
        assert!(again.is_ok(), "the slot was lost");
    }
}
