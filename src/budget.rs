//! The one budget of work in flight against the homeserver (`handoff.concurrency`), shared by
//! every capture, planning read and transfer, and served fairly: by priority class first (each
//! transfer's start, up to the reads that plan its first rooms; favourites and DMs; then seats in other rooms,
//! then in low-priority ones; then finishing those), and round-robin across the parties
//! (transfers, captures) waiting in a class, so no user's important rooms wait behind another
//! user's ordinary ones, and a large transfer does not starve a small one.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// A priority class; lower is served first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Class {
    /// A transfer's start: its first message, its profile and the reads that plan its first
    /// rooms. A few quick requests that every one of its first moves waits for, so no other
    /// transfer's moves hold them up.
    Start = 0,
    /// Favourites and DMs, their seat and their finish; a transfer's last account steps: what a
    /// person needs first on a new device.
    First = 1,
    /// Taking the seat in other rooms (invite, join).
    Normal = 2,
    /// Taking the seat in low-priority rooms.
    Low = 3,
    /// Finishing the rooms of the two classes above (rank, tags, notice): once seated a room is
    /// usable, so every transfer's seats come before anyone's finishing, as in one transfer alone.
    Finishing = 4,
}

const CLASSES: usize = 5;

/// Who is waiting: a transfer, or a capture (any number that tells parties apart).
pub type Party = u64;

pub struct Budget {
    size: usize,
    state: Mutex<State>,
}

struct State {
    free: usize,
    /// Per class, each party's waiters in arrival order.
    waiting: [BTreeMap<Party, VecDeque<oneshot::Sender<Slot>>>; CLASSES],
    /// Per class, the party served last: the next turn goes to the party after it.
    last: [Option<Party>; CLASSES],
}

/// One unit of the budget, held while the work runs; dropping it hands it to the next in turn.
#[must_use = "the work counts against the budget only while this is held"]
pub struct Slot {
    budget: Arc<Budget>,
}

impl Budget {
    pub fn new(size: usize) -> Arc<Budget> {
        Arc::new(Budget {
            size: size.max(1),
            state: Mutex::new(State { free: size.max(1), waiting: Default::default(), last: [None; CLASSES] }),
        })
    }

    /// Waits for a slot for `party`'s work of `class`.
    pub async fn acquire(self: &Arc<Self>, party: Party, class: Class) -> Slot {
        let rx = {
            let mut state = self.state.lock().expect("budget lock");
            if state.free > 0 && state.waiting.iter().all(BTreeMap::is_empty) {
                state.free -= 1;
                return Slot { budget: Arc::clone(self) };
            }
            let (tx, rx) = oneshot::channel();
            state.waiting[class as usize].entry(party).or_default().push_back(tx);
            rx
        };
        // The slot is handed over by the one who released it (see `release`).
        rx.await.expect("a waiter's sender is only dropped after sending")
    }

    /// How many slots there are in all (for how much work one party puts in line at once).
    pub fn size(&self) -> usize {
        self.size
    }

    /// The party of a user's own work outside a transfer (a capture): apart from every transfer's.
    pub fn party_of(user: &ruma::UserId) -> Party {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(user.as_bytes());
        // Transfer IDs count up from 1; these live in the top half.
        (1 << 63) | u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
    }

    /// A slot came back: hand it to the next waiter in turn, or keep it free.
    fn release(self: &Arc<Self>) {
        loop {
            let next = {
                let mut state = self.state.lock().expect("budget lock");
                match state.next_waiter() {
                    Some(tx) => tx,
                    None => {
                        state.free += 1;
                        return;
                    }
                }
            };
            match next.send(Slot { budget: Arc::clone(self) }) {
                Ok(()) => return,
                // The waiter gave up (its task was cancelled): the slot goes to the next one,
                // without this one's drop releasing it a second time.
                Err(slot) => std::mem::forget(slot),
            }
        }
    }
}

impl State {
    /// The first waiter of the highest class, taking parties in turn within it.
    fn next_waiter(&mut self) -> Option<oneshot::Sender<Slot>> {
        for class in 0..CLASSES {
            let parties = &mut self.waiting[class];
            if parties.is_empty() {
                continue;
            }
            let after = self.last[class];
            let party = after
                .and_then(|last| parties.range(last + 1..).next().map(|(p, _)| *p))
                .or_else(|| parties.keys().next().copied())
                .expect("not empty");
            let queue = parties.get_mut(&party).expect("present");
            let tx = queue.pop_front().expect("queues are never left empty");
            if queue.is_empty() {
                parties.remove(&party);
            }
            self.last[class] = Some(party);
            return Some(tx);
        }
        None
    }
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budget").field("size", &self.size).finish_non_exhaustive()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.budget.release();
    }
}

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
        // The first two rooms found the budget free; from then on the waiters are served by class
        // and in turn: the start of transfer 4 (queued last of all); favourites 1, 2, 3,
        // 2; normal rooms 1, 3, 1, 1…; the low-priority room; the finishing of rooms 1, 3 last.
        assert_eq!(
            served,
            ["1n1", "1n2", "4p1", "1f1", "2f1", "3f1", "2f2", "1n3", "3n1", "1n4", "1n5", "1n6", "2l1", "1x1", "3x1"],
        );
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
