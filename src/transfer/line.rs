//! The line of transfers: at most `handoff.max_transfers` run at once, the rest wait in the order
//! they were asked for. A waiting transfer is only its ID here (its bundle and plan stay in the
//! store until it starts), so a thousand users pressing `import` together cost a few bytes each,
//! not a thousand transfers' worth of memory and homeserver requests.
//!
//! Pure bookkeeping, no tasks: the engine starts what [`Line::admit`] and [`Line::next`] say and
//! keeps `H` (its handle on a running task) here, so who runs and who waits is one record.

use std::collections::{HashMap, VecDeque};

/// What to do with a transfer asked to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// A place is free: start it now (and record its handle with [`Line::run`]).
    Start,
    /// Every place is taken: it waits behind `ahead` others.
    Wait { ahead: usize },
    /// It is running or waiting already, or the line is closed (the service is stopping).
    No,
}

pub struct Line<H> {
    places: usize,
    running: HashMap<u64, H>,
    /// In the order they were asked for.
    waiting: VecDeque<u64>,
    /// Set at shutdown: nothing starts any more.
    closed: bool,
}

impl<H> Line<H> {
    pub fn new(places: usize) -> Line<H> {
        Line { places: places.max(1), running: HashMap::new(), waiting: VecDeque::new(), closed: false }
    }

    /// Asks for `id` to run: start now, or wait in line.
    pub fn admit(&mut self, id: u64) -> Admit {
        if self.closed || self.running.contains_key(&id) || self.waiting.contains(&id) {
            return Admit::No;
        }
        if self.running.len() < self.places && self.waiting.is_empty() {
            return Admit::Start;
        }
        self.waiting.push_back(id);
        Admit::Wait { ahead: self.waiting.len() - 1 }
    }

    /// Records that `id` started, with its handle.
    pub fn run(&mut self, id: u64, handle: H) {
        self.running.insert(id, handle);
    }

    /// The next waiting transfer to start, if a place is free.
    pub fn next_to_start(&mut self) -> Option<u64> {
        if self.closed || self.running.len() >= self.places {
            return None;
        }
        self.waiting.pop_front()
    }

    /// Takes `id` out, running or waiting: its handle if it was running.
    pub fn remove(&mut self, id: u64) -> Option<H> {
        self.waiting.retain(|w| *w != id);
        self.running.remove(&id)
    }

    /// Takes `id` out of the waiting line; whether it was waiting.
    pub fn unqueue(&mut self, id: u64) -> bool {
        let before = self.waiting.len();
        self.waiting.retain(|w| *w != id);
        self.waiting.len() < before
    }

    /// How many wait ahead of `id`, if it is waiting.
    pub fn ahead_of(&self, id: u64) -> Option<usize> {
        self.waiting.iter().position(|w| *w == id)
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Closes the line (the service stops): returns the running handles; the waiting are let go
    /// (each is still `Running` in the store and takes its place again at the next start).
    pub fn close(&mut self) -> Vec<H> {
        self.closed = true;
        self.waiting.clear();
        self.running.drain().map(|(_, h)| h).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfers_beyond_the_places_wait_in_the_order_they_came_and_start_as_places_free() {
        let mut line: Line<()> = Line::new(2);
        assert_eq!(line.admit(10), Admit::Start);
        line.run(10, ());
        assert_eq!(line.admit(11), Admit::Start);
        line.run(11, ());
        // IDs are not the order: the line is (an approved import can be older than a newer one).
        assert_eq!(line.admit(5), Admit::Wait { ahead: 0 });
        assert_eq!(line.admit(12), Admit::Wait { ahead: 1 });
        assert_eq!(line.admit(13), Admit::Wait { ahead: 2 });
        assert_eq!(line.admit(12), Admit::No, "asked twice, waits once");
        assert_eq!(line.admit(10), Admit::No, "running already");
        assert_eq!(line.next_to_start(), None, "no place is free");
        assert_eq!((line.running(), line.waiting()), (2, 3));

        assert!(line.remove(10).is_some());
        assert_eq!(line.next_to_start(), Some(5));
        line.run(5, ());
        assert_eq!(line.next_to_start(), None);
        assert_eq!(line.ahead_of(13), Some(1));

        // One leaves the line (cancelled while waiting): those behind it move up.
        assert!(line.unqueue(12));
        assert!(!line.unqueue(12));
        assert_eq!(line.ahead_of(13), Some(0));
        assert_eq!(line.ahead_of(5), None, "running, not waiting");
    }

    #[test]
    fn a_newcomer_does_not_pass_those_waiting_when_a_place_is_free_for_a_moment() {
        let mut line: Line<()> = Line::new(1);
        assert_eq!(line.admit(1), Admit::Start);
        line.run(1, ());
        assert_eq!(line.admit(2), Admit::Wait { ahead: 0 });
        line.remove(1);
        // Before the engine started 2, a third asks: it waits behind 2.
        assert_eq!(line.admit(3), Admit::Wait { ahead: 1 });
        assert_eq!(line.next_to_start(), Some(2));
    }

    #[test]
    fn a_closed_line_starts_nothing() {
        let mut line: Line<u8> = Line::new(1);
        assert_eq!(line.admit(1), Admit::Start);
        line.run(1, 7);
        assert_eq!(line.admit(2), Admit::Wait { ahead: 0 });
        assert_eq!(line.close(), vec![7]);
        assert_eq!(line.next_to_start(), None);
        assert_eq!(line.admit(3), Admit::No);
        assert_eq!(line.waiting(), 0);
    }
}
