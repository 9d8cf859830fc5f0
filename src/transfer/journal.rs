//! The transfer journal: [`Transfer`] records and each room's [`RoomStep`], typed, on top of the
//! store's sealed records. Every step is written (and made durable) before and after it runs, so
//! a restarted service resumes where it stopped and nothing is done twice.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};

use super::{RoomStep, Transfer, TransferState};
use crate::store::{Store, StoreError, now_ms};

#[derive(Clone)]
pub struct Journal {
    store: Store,
    /// Held while a record is written, and across an [`Journal::update`]'s read, change and write:
    /// the engine and the bot write the same record (a plan, a `cancel`), and neither may
    /// overwrite the other's change with a stale copy.
    writes: Arc<tokio::sync::Mutex<()>>,
    /// Which transfers each account takes part in, built from the store at first use and kept
    /// with every write: one user's records are read without reading everyone's (every `import`
    /// checks both accounts' transfers, and the store keeps a week of everyone's).
    by_user: Arc<Mutex<ByUser>>,
}

/// Transfer IDs by the accounts that take part in them (`None` until built).
type ByUser = Option<HashMap<OwnedUserId, BTreeSet<u64>>>;

fn corrupt(e: serde_json::Error) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

impl Journal {
    /// The journal of `store`. One per store, cloned where it is needed: the clones share the
    /// index of who takes part in which transfer, which a second journal would not see change.
    pub fn new(store: Store) -> Journal {
        Journal { store, writes: Arc::default(), by_user: Arc::default() }
    }

    /// The transfers `user` takes part in, from the index of who takes part in which, built on
    /// first use. (Built outside its lock, which is never held across a read of the store; a
    /// write meanwhile is in the store already, or indexed by `write`, so the first build wins.)
    async fn ids_of(&self, user: &UserId) -> Result<Vec<u64>, StoreError> {
        if self.by_user.lock().expect("journal index").is_none() {
            let mut built: HashMap<OwnedUserId, BTreeSet<u64>> = HashMap::new();
            for t in self.all().await? {
                for user in [&t.old, &t.new] {
                    built.entry(user.clone()).or_default().insert(t.id);
                }
            }
            let mut index = self.by_user.lock().expect("journal index");
            if index.is_none() {
                *index = Some(built);
            }
        }
        let index = self.by_user.lock().expect("journal index");
        Ok(index.as_ref().and_then(|i| i.get(user)).into_iter().flatten().copied().collect())
    }

    /// Takes removed transfers out of the index.
    fn unindex(&self, removed: &[Transfer]) {
        if let Some(index) = self.by_user.lock().expect("journal index").as_mut() {
            for t in removed {
                for user in [&t.old, &t.new] {
                    if let Some(ids) = index.get_mut(user) {
                        ids.remove(&t.id);
                        if ids.is_empty() {
                            index.remove(user);
                        }
                    }
                }
            }
        }
    }

    pub async fn new_id(&self) -> Result<u64, StoreError> {
        self.store.new_transfer_id().await
    }

    /// Writes a transfer record (a new one, or one only its writer changes) and makes it durable.
    pub async fn put(&self, t: &Transfer) -> Result<(), StoreError> {
        let _writing = self.writes.lock().await;
        self.write(t).await
    }

    async fn write(&self, t: &Transfer) -> Result<(), StoreError> {
        self.store.put_transfer(t.id, &serde_json::to_vec(t).map_err(corrupt)?).await?;
        // Built later, the index reads this record from the store.
        if let Some(index) = self.by_user.lock().expect("journal index").as_mut() {
            for user in [&t.old, &t.new] {
                index.entry(user.clone()).or_default().insert(t.id);
            }
        }
        Ok(())
    }

    /// Changes a stored record in place: reads the current one, applies `change`, writes it, with
    /// no other write in between. Returns the record as stored, or `None` if there is none.
    pub async fn update(&self, id: u64, change: impl FnOnce(&mut Transfer)) -> Result<Option<Transfer>, StoreError> {
        let _writing = self.writes.lock().await;
        let Some(mut t) = self.get(id).await? else { return Ok(None) };
        change(&mut t);
        self.write(&t).await?;
        Ok(Some(t))
    }

    pub async fn get(&self, id: u64) -> Result<Option<Transfer>, StoreError> {
        self.store.transfer(id).await?.map(|json| serde_json::from_slice(&json).map_err(corrupt)).transpose()
    }

    /// Every transfer, oldest first.
    pub async fn all(&self) -> Result<Vec<Transfer>, StoreError> {
        self.store
            .transfers()
            .await?
            .into_iter()
            .map(|(_, json)| serde_json::from_slice(&json).map_err(corrupt))
            .collect()
    }

    /// Every transfer `user` takes part in (as the old or the new account), oldest first: only
    /// those records are read.
    pub async fn of(&self, user: &UserId) -> Result<Vec<Transfer>, StoreError> {
        let ids = self.ids_of(user).await?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(t) = self.get(id).await?
                && t.involves(user)
            {
                out.push(t);
            }
        }
        Ok(out)
    }

    /// The latest transfer `user` takes part in.
    pub async fn latest_of(&self, user: &UserId) -> Result<Option<Transfer>, StoreError> {
        Ok(self.of(user).await?.pop())
    }

    /// Journals a room's step and makes it durable before returning.
    pub async fn set_room_step(&self, id: u64, room: &RoomId, step: &RoomStep) -> Result<(), StoreError> {
        self.store.put_journal_entry(id, room, &serde_json::to_vec(step).map_err(corrupt)?).await
    }

    /// Every room's journaled step in a transfer.
    pub async fn room_steps(&self, id: u64) -> Result<BTreeMap<OwnedRoomId, RoomStep>, StoreError> {
        self.store
            .journal(id)
            .await?
            .into_iter()
            .map(|(room, json)| Ok((room, serde_json::from_slice(&json).map_err(corrupt)?)))
            .collect()
    }

    /// Deletes every transfer record of `user` (as either account) with its journal; returns how
    /// many. The caller stops the user's running transfers first.
    pub async fn forget(&self, user: &UserId) -> Result<usize, StoreError> {
        let gone = self.of(user).await?;
        let ids: Vec<u64> = gone.iter().map(|t| t.id).collect();
        self.store.remove_transfers(&ids).await?;
        self.unindex(&gone);
        Ok(ids.len())
    }

    /// Deletes finished transfers older than `retention`, and pending ones whose code lapsed that
    /// long ago, with their journals; never a running one. Returns how many.
    pub async fn purge(&self, retention: Duration) -> Result<usize, StoreError> {
        let cutoff = now_ms().saturating_sub(retention.as_millis() as u64);
        let gone: Vec<Transfer> = self
            .all()
            .await?
            .into_iter()
            .filter(|t| match t.state {
                TransferState::Running | TransferState::Cancelling => false,
                TransferState::AwaitingApproval => t.expires_at_ms.unwrap_or(t.created_at_ms) < cutoff,
                _ => t.created_at_ms < cutoff,
            })
            .collect();
        let ids: Vec<u64> = gone.iter().map(|t| t.id).collect();
        self.store.remove_transfers(&ids).await?;
        self.unindex(&gone);
        Ok(ids.len())
    }
}

/// Where a room's stages write their steps: the service's journal, or nowhere (the device side,
/// which keeps no state: a second run re-checks every stage instead).
// One per engine or import, built once: its size does not matter, an indirection would.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub enum RoomJournal {
    Sled(Journal),
    /// Records nothing: its caller (the device side) plans each run from what the homeserver says
    /// then, and tells the stages where an earlier run's notice may be ([`super::room::Announced::planned`]).
    Nothing,
}

impl RoomJournal {
    /// Journals a room's step (durable before returning), or does nothing.
    pub async fn set_room_step(&self, id: u64, room: &RoomId, step: &RoomStep) -> Result<(), StoreError> {
        match self {
            RoomJournal::Sled(journal) => journal.set_room_step(id, room, step).await,
            RoomJournal::Nothing => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::BundleId;

    fn transfer(id: u64, state: TransferState, created_at_ms: u64) -> Transfer {
        let old = UserId::parse("@old:x.org").unwrap();
        let mut t = Transfer::new(
            id,
            old.clone(),
            UserId::parse("@new:x.org").unwrap(),
            BundleId::new(&old, 1),
            Default::default(),
            "!dm:x.org".try_into().unwrap(),
            None,
        );
        t.state = state;
        t.created_at_ms = created_at_ms;
        t
    }

    #[tokio::test]
    async fn retention_purges_finished_transfers_with_their_journals_never_running_ones() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::new(Store::open(&dir.path().join("db")).unwrap());
        let room = <&RoomId>::try_from("!r:x.org").unwrap();
        let old = now_ms() - 10_000;
        for (id, state) in [(1, TransferState::Done), (2, TransferState::Running), (3, TransferState::Denied)] {
            journal.put(&transfer(id, state, old)).await.unwrap();
            journal.set_room_step(id, room, &RoomStep::Done).await.unwrap();
        }
        let pending = Transfer { expires_at_ms: Some(old), ..transfer(4, TransferState::AwaitingApproval, old) };
        journal.put(&pending).await.unwrap();
        assert_eq!(journal.purge(Duration::from_secs(3600)).await.unwrap(), 0);
        assert_eq!(journal.all().await.unwrap().len(), 4);
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(journal.purge(Duration::from_millis(1)).await.unwrap(), 3);
        let left: Vec<u64> = journal.all().await.unwrap().iter().map(|t| t.id).collect();
        assert_eq!(left, vec![2], "a running transfer is never purged");
        assert!(journal.room_steps(1).await.unwrap().is_empty(), "journals go with their transfers");
        assert_eq!(journal.room_steps(2).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn an_update_keeps_what_another_writer_changed() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::new(Store::open(&dir.path().join("db")).unwrap());
        let engine_copy = transfer(1, TransferState::Running, now_ms());
        journal.put(&engine_copy).await.unwrap();
        // The bot cancels; the engine, holding its older copy, then stores a status message.
        journal.update(1, |t| t.state = TransferState::Cancelling).await.unwrap();
        let status: ruma::OwnedEventId = "$status:x.org".try_into().unwrap();
        let stored = journal.update(1, |t| t.status_event = Some(status.clone())).await.unwrap().unwrap();
        assert_eq!(stored.state, TransferState::Cancelling, "the cancel survived the engine's write");
        assert_eq!(journal.get(1).await.unwrap().unwrap().status_event, Some(status));
        assert!(journal.update(2, |_| {}).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn steps_round_trip_and_forget_takes_both_sides() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::new(Store::open(&dir.path().join("db")).unwrap());
        let room = <&RoomId>::try_from("!r:x.org").unwrap();
        journal.put(&transfer(1, TransferState::Running, now_ms())).await.unwrap();
        let step = RoomStep::Started(super::super::Stage::Rank);
        journal.set_room_step(1, room, &step).await.unwrap();
        assert_eq!(journal.room_steps(1).await.unwrap().get(room), Some(&step));
        assert_eq!(journal.latest_of(<&UserId>::try_from("@new:x.org").unwrap()).await.unwrap().unwrap().id, 1);
        assert_eq!(journal.forget(<&UserId>::try_from("@new:x.org").unwrap()).await.unwrap(), 1);
        assert!(journal.get(1).await.unwrap().is_none());
        assert!(journal.room_steps(1).await.unwrap().is_empty());
        assert!(
            journal.of(<&UserId>::try_from("@old:x.org").unwrap()).await.unwrap().is_empty(),
            "forgotten on both sides"
        );
    }

    /// A user's transfers are found through the index, whether it was built before a write or
    /// after (from the store, by a journal opened later), and leave it with the purge.
    #[tokio::test]
    async fn a_users_transfers_are_read_alone_and_the_index_follows_every_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let journal = Journal::new(store.clone());
        let (old, new) = (<&UserId>::try_from("@old:x.org").unwrap(), <&UserId>::try_from("@new:x.org").unwrap());
        journal.put(&transfer(1, TransferState::Done, 0)).await.unwrap();
        assert_eq!(journal.of(new).await.unwrap().len(), 1, "built from the store at first use");
        journal.put(&transfer(2, TransferState::Running, now_ms())).await.unwrap();
        let mut other = transfer(3, TransferState::Running, now_ms());
        other.old = UserId::parse("@someone:x.org").unwrap();
        other.new = UserId::parse("@else:x.org").unwrap();
        journal.put(&other).await.unwrap();
        async fn ids(u: &UserId, j: &Journal) -> Vec<u64> {
            j.of(u).await.unwrap().iter().map(|t| t.id).collect()
        }
        assert_eq!(ids(old, &journal).await, [1, 2], "kept with the write, oldest first, others' left out");
        assert_eq!(ids(new, &Journal::new(store.clone())).await, [1, 2], "a journal opened later builds it");
        journal.purge(Duration::from_secs(60)).await.unwrap();
        assert_eq!(ids(old, &journal).await, [2], "the purged one left the index");
        assert_eq!(journal.latest_of(new).await.unwrap().unwrap().id, 2);
    }
}
