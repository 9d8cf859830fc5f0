//! The two-pass room mover: pass 1 takes every room's seat, highest priority first; pass 2
//! finishes the seated rooms. Each room draws on the budget and ends journaled.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use futures_util::stream::{self, StreamExt};
use ruma::OwnedRoomId;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::Engine;
use crate::budget::{Class, Slot};
use crate::bundle::{Bundle, Priority, RoomKind};
use crate::metrics::{self, RoomInFlight, RoomOutcome};
use crate::transfer::arrivals::SAY_AFTER;
use crate::transfer::plan::{Plan, RoomPlan};
use crate::transfer::progress::Counts;
use crate::transfer::room::Announced;
use crate::transfer::{Error, FailReason, RoomStep, SkipReason, Stage, Transfer, TransferKind};

/// How pass 1 left a room.
enum Seat {
    /// Seated (its index in the plan, and its step): pass 2 finishes it.
    Taken(usize, RoomStep),
    /// Skipped or failed, journaled as such.
    Ended,
    /// Not started: the transfer was cancelled first.
    NotStarted,
}

impl Engine {
    /// Moves the planned rooms that are not finished: pass 1 seats them all, pass 2 finishes the
    /// seated ones. Returns whether a cancel stopped pass 1. `opened` is told once the
    /// transfer's first seat has ended (however it ended), or at once if there is none to take.
    pub(super) async fn move_rooms(
        &self,
        t: &Transfer,
        bundle: &Bundle,
        plan: &Plan,
        started: Instant,
        opened: &Notify,
    ) -> Result<bool, Error> {
        // Told when this returns, if the opening seat did not tell it before.
        let _opened = Opened(opened);
        let steps = self.journal.room_steps(t.id).await?;
        // Plan indices of the rooms left to do (indices, not references, keep the futures `Send`).
        let todo: Vec<usize> = (0..plan.rooms.len())
            .filter(|&i| !steps.get(&plan.rooms[i].room_id).is_some_and(RoomStep::is_final))
            .collect();
        if todo.is_empty() {
            return Ok(false);
        }
        let progress = Progress::new(plan, &steps);
        let (progress, steps) = (&progress, &steps);
        let concurrency = self.config.handoff.concurrency.0;
        let stop = &self.stop_token(t.id);
        // Another server lets one of its users receive only a few invites at once (Synapse: 5,
        // then one each 333 s): a reservation to it sends every favourite's and DM's invite
        // before any other room's, so they are the ones inside the burst.
        let remote_reservation = t.kind == TransferKind::Reserve && t.new.server_name() != t.old.server_name();
        let first = |i: &usize| class_of(&plan.rooms[*i]) == Class::First;
        // (They come first in a plan already; sorted all the same, as the rooms waiting for them
        // must never be the ones taking their places in line.)
        let mut todo = todo;
        todo.sort_by_key(|i| !first(i));
        let gate =
            tokio::sync::watch::channel(if remote_reservation { todo.iter().filter(|i| first(i)).count() } else { 0 })
                .0;
        let gate = &gate;
        // The transfer's opening seat: its first room (a favourite, if it has any) while it has
        // none yet, the room its user waits for. It goes before everyone's other first rooms,
        // and while it waits or is in flight the others' work keeps only a few slots (`Budget`).
        let opening = todo.first().copied().filter(|_| progress.seated.load(Ordering::Relaxed) == 0);
        if opening.is_none() {
            // Seated before (a resumed transfer, a later part): nothing to wait for.
            opened.notify_one();
        }
        let seat_class = |index: usize| {
            if Some(index) == opening { Class::Opening } else { class_of(&plan.rooms[index]) }
        };

        // Pass 1, seats: every room's invite and join, highest priority first, so the new account
        // is in its rooms as early as the homeserver allows.
        let seats = stream::iter(todo)
            .map(|index: usize| async move {
                let room = &plan.rooms[index];
                let from = steps.get(&room.room_id).cloned().unwrap_or(RoomStep::Pending);
                let _opens = (remote_reservation && first(&index)).then(|| Opens(gate));
                let _opened = (Some(index) == opening).then(|| Opened(opened));
                // Seated before a restart: straight to pass 2, without taking a slot.
                if from.is_seated() {
                    return Seat::Taken(index, from);
                }
                // Most of a crowd's rooms wait here for a slot, so this part of the future is kept
                // small: the seat's own (larger) future is made and boxed once the slot is taken.
                let slot = tokio::select! {
                    biased;
                    slot = async {
                        let _ = gate.subscribe().wait_for(|firsts| *firsts == 0 || first(&index)).await;
                        self.budget.acquire(t.id, seat_class(index)).await
                    } => Some(slot),
                    _ = stop.cancelled() => None,
                };
                let seat = match slot {
                    Some(slot) if !stop.is_cancelled() => {
                        Box::pin(self.take_seat(t, room, &from, slot, seat_class(index), stop)).await
                    }
                    _ => {
                        self.end_room(t, progress, &room.room_id, &RoomStep::Skipped(SkipReason::NotStarted)).await;
                        return Seat::NotStarted;
                    }
                };
                let ended = match seat {
                    None => {
                        tracing::info!(transfer = t.id, room_id = %room.room_id, "cancelled while the room waited");
                        RoomStep::Skipped(SkipReason::Interrupted)
                    }
                    Some(Ok(None)) => {
                        tracing::debug!(transfer = t.id, class = ?seat_class(index), elapsed_ms = started.elapsed().as_millis() as u64, "room seated");
                        metrics::room_seated();
                        progress.seated.fetch_add(1, Ordering::Relaxed);
                        self.tell_progress(t, progress).await;
                        return Seat::Taken(index, RoomStep::Started(Stage::Joined));
                    }
                    Some(Ok(Some(step))) => step,
                    Some(Err(e)) => RoomStep::Failed(FailReason::Error(e.to_string())),
                };
                self.end_room(t, progress, &room.room_id, &ended).await;
                Seat::Ended
            })
            .buffer_unordered(concurrency)
            .collect::<Vec<Seat>>();
        // Meanwhile, a reservation tells the old account when the other server paces its invites.
        let seats = tokio::select! {
            seats = seats => seats,
            never = self.tell_pace(t, progress) => match never {},
        };
        let cancelled = seats.iter().any(|s| matches!(s, Seat::NotStarted));
        let mut seated: Vec<(usize, RoomStep)> = seats
            .into_iter()
            .filter_map(|s| match s {
                Seat::Taken(index, from) => Some((index, from)),
                _ => None,
            })
            .collect();
        seated.sort_by_key(|(index, _)| *index);
        if plan.unplanned.is_empty() {
            tracing::info!(
                transfer = t.id,
                seated = progress.seated.load(Ordering::Relaxed),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "rooms joined"
            );
        }

        // Pass 2: rank, tags and the notice of every seated room, in the same order. A cancel does
        // not stop it: every room the new account was joined to is finished and announced.
        stream::iter(seated)
            .map(|(index, from): (usize, RoomStep)| async move {
                let room = &plan.rooms[index];
                let _slot = self.budget.acquire(t.id, finish_class_of(room)).await;
                let _flight = RoomInFlight::start();
                let entry = bundle.rooms.iter().find(|e| e.room_id == room.room_id);
                let finish =
                    Box::pin(self.rooms.finish_stages(t.into(), entry, room, &from, Announced::journaled(&from))).await;
                if let Some(refused) = finish.rank {
                    self.rank_refused(t.id, &room.room_id, &refused).await;
                }
                let step = match finish.end {
                    Ok(step) => step,
                    Err((_, e)) => RoomStep::Failed(FailReason::Error(e.to_string())),
                };
                self.end_room(t, progress, &room.room_id, &step).await;
            })
            .buffer_unordered(concurrency)
            .collect::<Vec<()>>()
            .await;
        Ok(cancelled)
    }

    /// Takes a room's seat with the budget `slot` it was given, which it lends back while it
    /// waits for a server. A cancel ends it after a moment's grace (`None`): a room in the middle
    /// of its requests to this homeserver finishes its seat (no invite left without its join),
    /// one waiting for another server, or to try again, ends within seconds.
    async fn take_seat(
        &self,
        t: &Transfer,
        room: &RoomPlan,
        from: &RoomStep,
        slot: Slot,
        class: Class,
        stop: &CancellationToken,
    ) -> Option<Result<Option<RoomStep>, Error>> {
        let seat = self.budget.lend(slot, class, async {
            let _flight = RoomInFlight::start();
            // Boxed: the seat's future is large, and this one nests it in several more.
            Box::pin(self.rooms.take_seat(t, room, from)).await
        });
        tokio::select! {
            biased;
            seat = seat => Some(seat),
            _ = async {
                stop.cancelled().await;
                tokio::time::sleep(CANCEL_GRACE).await;
            } => None,
        }
    }

    /// Journals a room's final step and counts it.
    async fn end_room(&self, t: &Transfer, progress: &Progress, room: &OwnedRoomId, step: &RoomStep) {
        if let Err(e) = self.journal.set_room_step(t.id, room, step).await {
            tracing::error!(error = %e, "cannot journal a room's outcome");
        }
        metrics::room_finished(match step {
            RoomStep::AwaitingAccept => RoomOutcome::Awaiting,
            RoomStep::Skipped(_) => RoomOutcome::Skipped,
            RoomStep::Failed(_) => RoomOutcome::Failed,
            _ => RoomOutcome::Moved,
        });
        progress.done.fetch_add(1, Ordering::Relaxed);
        self.tell_progress(t, progress).await;
    }

    /// Tells the old account of a reservation to another server how its invites are paced, as
    /// it changes: when they are, when the rate is measured, when they land at full speed again.
    /// Never returns (pass 1 ends it).
    async fn tell_pace(&self, t: &Transfer, progress: &Progress) -> std::convert::Infallible {
        if t.kind == TransferKind::Receive {
            return self.tell_arrivals(t, progress).await;
        }
        if t.kind != TransferKind::Reserve || t.new.server_name() == t.old.server_name() {
            return std::future::pending().await;
        }
        let mut news = self.rooms.pace.watch(t.id, &t.new.server_name().to_owned());
        let mut said: Option<(bool, bool)> = None;
        while news.changed().await.is_ok() {
            let note = news.borrow_and_update().clone();
            // Paced or not, and whether the rate is known: each is said once.
            let now = note.as_ref().map(|p| p.every.is_some());
            let state = (now.is_some(), now.unwrap_or(false));
            if said == Some(state) || (said.is_none() && note.is_none()) {
                continue;
            }
            said = Some(state);
            if let Err(e) = self.reporter.paced(t, note.as_ref(), progress.counts()).await {
                tracing::warn!(transfer = t.id, error = %e, "cannot tell how the invites are paced");
            }
        }
        std::future::pending().await
    }

    /// Tells the new account of a received bundle when its rooms wait for their invites: once
    /// they have waited a while ([`SAY_AFTER`]), and again once the rate is measured. Never
    /// returns (pass 1 ends it).
    async fn tell_arrivals(&self, t: &Transfer, progress: &Progress) -> std::convert::Infallible {
        let mut said = (false, false);
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            let Some(awaited) = self.awaited(t.id) else { continue };
            let now = (said.0 || awaited.since_last >= SAY_AFTER, awaited.every.is_some());
            if now.0 && now != said {
                said = now;
                if let Err(e) = self.reporter.awaiting_invites(t, &awaited, progress.counts()).await {
                    tracing::warn!(transfer = t.id, error = %e, "cannot tell that the rooms wait for their invites");
                }
            }
        }
    }

    /// Keeps, for the report, that the rank the plan meant to give in `room` was refused.
    async fn rank_refused(&self, id: u64, room: &ruma::RoomId, refused: &crate::homeserver::HsError) {
        let reason = refused.to_string();
        let kept = self.journal.update(id, |t| {
            if !t.ranks_refused.iter().any(|(r, _)| r == room) {
                t.ranks_refused.push((room.to_owned(), reason));
            }
        });
        if let Err(e) = kept.await {
            tracing::warn!(transfer = id, error = %e, "cannot keep a refused rank for the report");
        }
    }

    pub(super) async fn tell_progress(&self, t: &Transfer, progress: &Progress) {
        if let Err(e) = self.reporter.progress(t, progress.counts()).await {
            tracing::warn!(error = %e, "cannot report progress");
        }
    }
}

/// A favourite's or DM's seat of a reservation to another server, until it ends (however it
/// ends): the other rooms wait for all of them to end before they start.
struct Opens<'a>(&'a tokio::sync::watch::Sender<usize>);

impl Drop for Opens<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|firsts| *firsts -= 1);
    }
}

/// Tells a transfer's status message that its opening seat has ended (or that there was none).
struct Opened<'a>(&'a Notify);

impl Drop for Opened<'_> {
    fn drop(&mut self) {
        self.0.notify_one();
    }
}

/// A room's priority class in the budget: favourites and DMs first, low-priority rooms last.
fn class_of(room: &RoomPlan) -> Class {
    match room.priority {
        Priority::High => Class::First,
        Priority::Normal if room.kind == RoomKind::Dm => Class::First,
        Priority::Normal => Class::Normal,
        Priority::Low => Class::Low,
    }
}

/// A seated room's class for its finishing (rank, tags, notice): favourites and DMs stay first,
/// the others come after every transfer's seats.
fn finish_class_of(room: &RoomPlan) -> Class {
    match class_of(room) {
        Class::First => Class::First,
        _ => Class::Finishing,
    }
}

/// Counts for progress, across the parts of a transfer.
pub(super) struct Progress {
    seated: AtomicUsize,
    done: AtomicUsize,
    total: usize,
}

impl Progress {
    fn counts(&self) -> Counts {
        Counts {
            seated: self.seated.load(Ordering::Relaxed),
            done: self.done.load(Ordering::Relaxed),
            total: self.total,
        }
    }

    /// Counts what the journal says was done before.
    pub(super) fn new(plan: &Plan, steps: &BTreeMap<OwnedRoomId, RoomStep>) -> Progress {
        let step = |id: &OwnedRoomId| steps.get(id).cloned().unwrap_or(RoomStep::Pending);
        // Seated: past pass 1, whether finished since or not (skipped and failed rooms never were).
        let seated = plan.rooms.iter().filter(|r| step(&r.room_id).is_seated()).count();
        let done = plan.rooms.iter().filter(|r| step(&r.room_id).is_final()).count();
        Progress { seated: AtomicUsize::new(seated), done: AtomicUsize::new(done), total: plan.total() }
    }
}

/// How long a room that has begun may go on after a cancel: long enough for requests to this
/// homeserver, short enough that a cancel ends a room waiting for another server within seconds.
const CANCEL_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use ruma::owned_user_id;

    use crate::bundle::BundleId;
    use crate::homeserver::fake::{Answer, Endpoint, Fake};
    use crate::transfer::engine::testing::Harness;
    use crate::transfer::plan::Action;
    use crate::transfer::{SkipReason, Stage};

    fn room(id: &str, priority: Priority, kind: RoomKind) -> RoomPlan {
        RoomPlan {
            room_id: id.try_into().unwrap(),
            via: vec![],
            name: None,
            kind,
            priority,
            action: Action::Join,
            give_level: None,
            warnings: vec![],
        }
    }

    #[test]
    fn favourites_and_dms_go_first_and_stay_first_when_finishing() {
        let cases = [
            (Priority::High, RoomKind::Group, Class::First, Class::First),
            (Priority::Normal, RoomKind::Dm, Class::First, Class::First),
            (Priority::Normal, RoomKind::Group, Class::Normal, Class::Finishing),
            (Priority::Low, RoomKind::Group, Class::Low, Class::Finishing),
        ];
        for (priority, kind, seat, finish) in cases {
            let r = room("!r:a.org", priority, kind);
            assert_eq!((class_of(&r), finish_class_of(&r)), (seat, finish), "{priority:?} {kind:?}");
        }
    }

    /// A resumed transfer's progress starts from its journal: seated is past pass 1 (finished or
    /// not), done is final (moved, skipped or failed), and the total counts rooms not planned yet.
    #[test]
    fn progress_counts_what_the_journal_says_was_done() {
        let ids = ["!a:a.org", "!b:a.org", "!c:a.org", "!d:a.org"];
        let plan = Plan {
            old: "@old:a.org".try_into().unwrap(),
            new: "@new:a.org".try_into().unwrap(),
            rooms: ids.iter().map(|id| room(id, Priority::Normal, RoomKind::Group)).collect(),
            unplanned: vec!["!e:a.org".try_into().unwrap()],
            left_out: 0,
        };
        let steps: BTreeMap<OwnedRoomId, RoomStep> = [
            (ids[0], RoomStep::Done),
            (ids[1], RoomStep::Started(Stage::Joined)),
            (ids[2], RoomStep::Skipped(SkipReason::NotStarted)),
            (ids[3], RoomStep::Started(Stage::Invite)),
        ]
        .into_iter()
        .map(|(id, step)| (id.try_into().unwrap(), step))
        .collect();
        let p = Progress::new(&plan, &steps);
        assert_eq!((p.seated.into_inner(), p.done.into_inner(), p.total), (2, 2, 5));
    }

    /// A transfer's first seat (its favourite, before its DM) is its opening: while it is in
    /// flight (its invite not answered at first), another transfer's work, which asks for every
    /// slot over and over, keeps a quarter of the budget; once the seat is taken it gets more.
    #[tokio::test(start_paused = true)]
    async fn others_keep_a_quarter_of_the_budget_while_a_transfer_takes_its_first_seat() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicUsize};
        let fake = Fake::new("example.org");
        let (old, new) = (owned_user_id!("@old:example.org"), owned_user_id!("@new:example.org"));
        let rooms = vec![
            room("!favourite:example.org", Priority::High, RoomKind::Group),
            room("!dm:example.org", Priority::Normal, RoomKind::Dm),
        ];
        for r in &rooms {
            fake.create_room(&r.room_id, &old);
        }
        fake.script(Endpoint::Invite, Answer::Silent, Some(1));
        let h = Harness::on(1, fake.appservice().await);
        let id = h.journal.new_id().await.unwrap();
        let bundle_id = BundleId::new(&old, id);
        let dm = "!d:example.org".try_into().unwrap();
        let t = Transfer::new(id, old.clone(), new.clone(), bundle_id, Default::default(), dm, None);
        h.journal.put(&t).await.unwrap();
        let plan = Plan { old, new: new.clone(), rooms: rooms.clone(), unplanned: vec![], left_out: 0 };
        let bundle = crate::bundle::tests::sample();
        let budget = Arc::clone(&h.engine.budget);
        let size = budget.size();

        let (held, most, done) =
            (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
        let others = async {
            // Once the first seat is in flight, another transfer asks for every slot, again and again.
            while fake.count(Endpoint::Invite) == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let mut tasks = Vec::new();
            for _ in 0..size {
                let (budget, held, most, done) =
                    (Arc::clone(&budget), Arc::clone(&held), Arc::clone(&most), Arc::clone(&done));
                tasks.push(tokio::spawn(async move {
                    while !done.load(Ordering::SeqCst) {
                        let _slot = budget.acquire(0, Class::First).await;
                        most.fetch_max(held.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        held.fetch_sub(1, Ordering::SeqCst);
                    }
                }));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            let during = (most.swap(0, Ordering::SeqCst), fake.membership(&rooms[0].room_id, &new));
            while fake.count(Endpoint::Join) < 2 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            most.store(0, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(500)).await;
            let after = most.load(Ordering::SeqCst);
            done.store(true, Ordering::SeqCst);
            for task in tasks {
                task.await.unwrap();
            }
            (during, after)
        };
        let opened = Notify::new();
        let moving = h.engine.move_rooms(&t, &bundle, &plan, Instant::now(), &opened);
        let (moved, ((during, joined), after)) = tokio::join!(moving, others);
        assert!(!moved.unwrap());
        assert_eq!(joined, None, "the first seat was in flight");
        assert_eq!(during, size / 4, "the most the other transfer held while the first seat was in flight");
        assert!(after > size / 4, "the most it held once the seat was taken: {after}");
        let steps = h.journal.room_steps(id).await.unwrap();
        assert!(rooms.iter().all(|r| steps.get(&r.room_id) == Some(&RoomStep::Done)), "{steps:?}");
    }

    /// A cancel ends a room that waits for another server (the new account's, answering 502
    /// to every invite) within the grace, journaled as interrupted, with no attempt after it.
    #[tokio::test(start_paused = true)]
    async fn a_cancel_ends_a_room_waiting_for_another_server_within_the_grace() {
        let fake = Fake::new("example.org");
        let (old, new) = (owned_user_id!("@old:example.org"), owned_user_id!("@new:other.org"));
        let waiting = room("!waiting:example.org", Priority::Normal, RoomKind::Group);
        fake.create_room(&waiting.room_id, &old);
        fake.script(Endpoint::Invite, Answer::other_server_away(), None);
        let h = Harness::on(1, fake.appservice().await);
        let id = h.journal.new_id().await.unwrap();
        let bundle_id = BundleId::new(&old, id);
        let dm = "!dm:example.org".try_into().unwrap();
        let t = Transfer::new(id, old.clone(), new.clone(), bundle_id, Default::default(), dm, None);
        h.journal.put(&t).await.unwrap();
        let plan = Plan { old, new, rooms: vec![waiting.clone()], unplanned: vec![], left_out: 0 };
        let bundle = crate::bundle::tests::sample();

        let moving = async {
            let cancelled = h.engine.move_rooms(&t, &bundle, &plan, Instant::now(), &Notify::new()).await.unwrap();
            (cancelled, tokio::time::Instant::now(), fake.count(Endpoint::Invite))
        };
        // Once the room is waiting (it tried again), well within the patience (ten minutes).
        let cancel = async {
            while fake.count(Endpoint::Invite) < 3 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert!(!h.engine.cancel(id), "it was running, not waiting for a place");
            tokio::time::Instant::now()
        };
        let ((cancelled, ended, tries), asked) = tokio::join!(moving, cancel);
        assert!(!cancelled, "the room had begun: it is interrupted, not left unstarted");
        assert!(ended - asked <= CANCEL_GRACE, "the cancel took {:?}", ended - asked);
        let steps = h.journal.room_steps(id).await.unwrap();
        assert_eq!(steps.get(&waiting.room_id), Some(&RoomStep::Skipped(SkipReason::Interrupted)));
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(fake.count(Endpoint::Invite), tries, "no attempt after the room ended");
    }

    /// A received bundle's rooms, whose invites this server lets in slowly: the first came with
    /// the burst, the second five minutes later (the old server's next paced invite), the third
    /// never. Each room waits for its invite instead of being skipped after a minute, the new
    /// account is told (and told the rate once measured), and the room whose invite never came
    /// is skipped only once none has come for the quiet span.
    #[tokio::test(start_paused = true)]
    async fn received_rooms_wait_for_the_invites_this_server_lets_in_slowly() {
        let fake = Fake::new("example.org");
        let (old, new) = (owned_user_id!("@old:other.org"), owned_user_id!("@new:example.org"));
        let reason = Some(crate::transfer::world::reservation_reason(&old));
        let rooms: Vec<RoomPlan> = ["!burst:other.org", "!paced:other.org", "!never:other.org"]
            .iter()
            .map(|id| room(id, Priority::Normal, RoomKind::Group))
            .collect();
        for r in &rooms {
            fake.create_room(&r.room_id, &old);
        }
        fake.invite(&rooms[0].room_id, &old, &new, reason.clone());
        let h = Harness::on(1, fake.appservice().await);
        let id = h.journal.new_id().await.unwrap();
        let bundle_id = BundleId::new(&old, id);
        let dm = "!dm:example.org".try_into().unwrap();
        let mut t = Transfer::new(id, old.clone(), new.clone(), bundle_id, Default::default(), dm, None);
        t.kind = TransferKind::Receive;
        h.journal.put(&t).await.unwrap();
        let plan = Plan { old: old.clone(), new: new.clone(), rooms: rooms.clone(), unplanned: vec![], left_out: 0 };
        let bundle = crate::bundle::tests::sample();

        let paced = Duration::from_secs(300);
        let start = tokio::time::Instant::now();
        let moving = async {
            let cancelled = h.engine.move_rooms(&t, &bundle, &plan, Instant::now(), &Notify::new()).await.unwrap();
            (cancelled, start.elapsed())
        };
        let inviting = async {
            tokio::time::sleep(paced).await;
            fake.invite(&rooms[1].room_id, &old, &new, reason.clone());
        };
        let ((cancelled, took), ()) = tokio::join!(moving, inviting);
        assert!(!cancelled);
        let steps = h.journal.room_steps(id).await.unwrap();
        assert_eq!(steps.get(&rooms[0].room_id), Some(&RoomStep::Done));
        assert_eq!(steps.get(&rooms[1].room_id), Some(&RoomStep::Done), "the paced room was joined");
        assert_eq!(fake.membership(&rooms[1].room_id, &new), Some(ruma::events::room::member::MembershipState::Join));
        assert_eq!(
            steps.get(&rooms[2].room_id),
            Some(&RoomStep::Skipped(SkipReason::NeedsInvite { old: old.clone() })),
            "the room whose invite never came"
        );
        // None came for the quiet span after the last (three times the longest pause seen).
        let quiet = crate::transfer::arrivals::QUIET.max(paced * 3);
        assert!(took >= paced + quiet && took <= paced + quiet + Duration::from_secs(60), "{took:?}");
        let said = h.told.said();
        // Told once the rooms waited a minute, and once the rate was measured (as the paced
        // invite came, while its room joins).
        assert_eq!(said.len(), 2, "{said:?}");
        assert_eq!(said[0], format!("{id} 1 joined, 2 awaiting invites "));
        assert!(said[1].ends_with(", 1 awaiting invites at a measured rate"), "{said:?}");
    }

    /// The invite shows at this server a moment before the inviting server has it in the room
    /// (Synapse sends it to the invitee's server first): the join right after it came is refused
    /// for a moment, and the room is joined on a later try, not skipped as uninvited.
    #[tokio::test(start_paused = true)]
    async fn a_join_refused_just_after_the_invite_came_is_tried_again() {
        let fake = Fake::new("example.org");
        let (old, new) = (owned_user_id!("@old:other.org"), owned_user_id!("@new:example.org"));
        let reason = Some(crate::transfer::world::reservation_reason(&old));
        let rooms: Vec<RoomPlan> = ["!burst:other.org", "!late:other.org"]
            .iter()
            .map(|id| room(id, Priority::Normal, RoomKind::Group))
            .collect();
        for r in &rooms {
            fake.create_room(&r.room_id, &old);
        }
        fake.invite(&rooms[0].room_id, &old, &new, reason.clone());
        let h = Harness::on(1, fake.appservice().await);
        let id = h.journal.new_id().await.unwrap();
        let dm = "!dm:example.org".try_into().unwrap();
        let mut t = Transfer::new(id, old.clone(), new.clone(), BundleId::new(&old, id), Default::default(), dm, None);
        t.kind = TransferKind::Receive;
        h.journal.put(&t).await.unwrap();
        let plan = Plan { old: old.clone(), new: new.clone(), rooms: rooms.clone(), unplanned: vec![], left_out: 0 };
        let bundle = crate::bundle::tests::sample();
        let opened = Notify::new();
        let moving = h.engine.move_rooms(&t, &bundle, &plan, Instant::now(), &opened);
        let inviting = async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            // The late room's invite shows here; the next two joins are refused all the same.
            let refused = Answer::Error(
                http::StatusCode::FORBIDDEN,
                serde_json::json!({"errcode": "M_FORBIDDEN", "error": "You are not invited to this room."}),
            );
            fake.script(Endpoint::Join, refused, Some(2));
            fake.invite(&rooms[1].room_id, &old, &new, reason.clone());
        };
        let (moved, ()) = tokio::join!(moving, inviting);
        assert!(!moved.unwrap());
        let steps = h.journal.room_steps(id).await.unwrap();
        assert_eq!(steps.get(&rooms[1].room_id), Some(&RoomStep::Done), "joined on a later try");
        assert_eq!(fake.membership(&rooms[1].room_id, &new), Some(ruma::events::room::member::MembershipState::Join));
    }

    /// A reservation to a server that lets one user receive 2 invites at once: the favourite and
    /// the DM are the ones inside the burst, whatever order the rooms come in and however long
    /// their invites take, and the others still get their seats (paced).
    #[tokio::test(start_paused = true)]
    async fn a_reservation_to_another_server_sends_favourites_and_dms_inside_the_burst() {
        let fake = Fake::new("example.org");
        let (old, new) = (owned_user_id!("@old:example.org"), owned_user_id!("@new:other.org"));
        let rooms = vec![
            room("!plain1:example.org", Priority::Normal, RoomKind::Group),
            room("!plain2:example.org", Priority::Normal, RoomKind::Group),
            room("!low:example.org", Priority::Low, RoomKind::Group),
            room("!favourite:example.org", Priority::High, RoomKind::Group),
            room("!dm:example.org", Priority::Normal, RoomKind::Dm),
        ];
        for r in &rooms {
            fake.create_room(&r.room_id, &old);
        }
        fake.limit_remote_invites(2, Duration::from_secs(30));
        // The first invite sent (the favourite's) is held up a second by this server's own limit:
        // the other rooms don't take its place in the burst meanwhile.
        fake.script(Endpoint::Invite, Answer::limited(1000), Some(1));
        let h = Harness::on(1, fake.appservice().await);
        let id = h.journal.new_id().await.unwrap();
        let bundle_id = BundleId::new(&old, id);
        let mut t = Transfer::new(
            id,
            old.clone(),
            new.clone(),
            bundle_id,
            Default::default(),
            "!d:example.org".try_into().unwrap(),
            None,
        );
        t.kind = TransferKind::Reserve;
        h.journal.put(&t).await.unwrap();
        let plan = Plan { old, new: new.clone(), rooms: rooms.clone(), unplanned: vec![], left_out: 0 };
        let bundle = crate::bundle::tests::sample();

        assert!(!h.engine.move_rooms(&t, &bundle, &plan, Instant::now(), &Notify::new()).await.unwrap());
        let invited: Vec<String> = fake
            .seen()
            .into_iter()
            .filter(|s| s.endpoint == Endpoint::Invite)
            .filter_map(|s| s.room.map(|r| r.to_string()))
            .collect();
        let mut burst = invited[..3].to_vec();
        burst.sort();
        let firsts = ["!dm:example.org", "!favourite:example.org", "!favourite:example.org"];
        assert_eq!(burst, firsts, "the first invites sent (the favourite's twice): {invited:?}");
        for r in &rooms {
            assert_eq!(
                fake.membership(&r.room_id, &new),
                Some(ruma::events::room::member::MembershipState::Invite),
                "{}",
                r.room_id
            );
        }
    }
}
