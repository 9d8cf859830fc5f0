//! `handoff undo`: takes back the last import into the account logged in here, with the rules of
//! the service's `undo` ([`crate::transfer::undo`]) and its writes ([`Reverter`]).
//!
//! `handoff import` records what it wrote as it goes ([`Record`]: the account's settings read
//! before its first write, each room it seated the account in, what its merges wrote), sealed in
//! the account's folder with a key from the session's own passphrase. The undo records its own
//! steps there too, room by room, so an undo that stopped is run again and leaves nothing twice.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use futures_util::stream::{self, StreamExt};
use ruma::{OwnedRoomId, OwnedUserId};
use serde::{Deserialize, Serialize};

use super::session::Session;
use crate::homeserver::{Homeserver, HsError};
use crate::store::now_ms;
use crate::store::seal::Sealer;
use crate::transfer::account::SETTINGS;
use crate::transfer::merge::AccountWorld;
use crate::transfer::revert::Reverter;
use crate::transfer::undo::{self, RoomMoved, UndoPlan, UndoReport, Wrote};
use crate::transfer::{AccountStep, SettingsUndone, UndoRoom, Undoing, world};

/// The record's file in the account's folder.
const RECORD_FILE: &str = "last-import.sealed";
/// What the record's key is for ([`Session::sealing_key`]).
const RECORD_KEY: &str = "import record";
/// The record's layout; a newer one is refused, not guessed at.
const RECORD_VERSION: u32 = 1;

/// What an import wrote into the account, for `handoff undo`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub version: u32,
    /// The import's number: its move notices carry it.
    pub id: u64,
    pub old: OwnedUserId,
    pub new: OwnedUserId,
    /// When its first run began: what the account sent before is not the import's.
    pub started_at_ms: u64,
    /// The account's settings right before the import's first write.
    pub before: AccountWorld,
    /// Each room of the plan, over every run of the same import (a room seated by one run stays
    /// the import's on the next, which finds the account in it).
    pub rooms: BTreeMap<OwnedRoomId, RoomMoved>,
    /// The rooms the account is in after any run (the DMs the `m.direct` merge marked).
    pub moved: BTreeSet<OwnedRoomId>,
    /// The settings steps done, over every run.
    pub done: BTreeSet<AccountStep>,
    pub wrote: Wrote,
    /// An undo of it, once begun.
    #[serde(default)]
    pub undo: Option<Undoing>,
}

impl Record {
    /// A new import's record, `before` as the account's settings.
    pub fn new(id: u64, old: OwnedUserId, new: OwnedUserId, before: AccountWorld) -> Record {
        Record {
            version: RECORD_VERSION,
            id,
            old,
            new,
            started_at_ms: now_ms(),
            before,
            rooms: BTreeMap::new(),
            moved: BTreeSet::new(),
            done: BTreeSet::new(),
            wrote: Wrote::default(),
            undo: None,
        }
    }

    /// Takes in one run's outcome for a room: a room the import seated (or found the account in
    /// before its first run) stays so.
    pub fn room(&mut self, room: RoomMoved, in_room: bool) {
        if in_room {
            self.moved.insert(room.room_id.clone());
        }
        match self.rooms.get_mut(&room.room_id) {
            // A rank a later run (with the old account's access) gave is the import's too.
            Some(had) if had.seated => had.give_level = had.give_level.or(room.give_level),
            Some(had) if had.was_member => {}
            _ => {
                self.rooms.insert(room.room_id.clone(), room);
            }
        }
    }
}

/// The record kept in one account's folder.
pub struct Records {
    path: PathBuf,
    sealer: Sealer,
}

impl Records {
    pub fn of(session: &Session) -> Records {
        Records { path: session.dir().join(RECORD_FILE), sealer: Sealer::new(&session.sealing_key(RECORD_KEY)) }
    }

    /// The last import's record, if any.
    pub fn load(&self) -> Result<Option<Record>> {
        let sealed = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", self.path.display())),
        };
        let damaged =
            || anyhow::anyhow!("{} is damaged (or not this session's): it can't be read", self.path.display());
        let json = self.sealer.open(b"", &sealed).ok_or_else(damaged)?;
        let record: Record = serde_json::from_slice(&json).map_err(|_| damaged())?;
        if record.version > RECORD_VERSION {
            bail!("{} was written by a newer handoff: use that one to undo", self.path.display());
        }
        Ok(Some(record))
    }

    /// Writes `record` in place of the last (whole, or not at all), on the disk itself before it
    /// returns.
    pub fn save(&self, record: &Record) -> Result<()> {
        self.write(record, true)
    }

    /// Writes `record` in place of the last; `durable`: on the disk itself before it returns
    /// (else a process that stops keeps it, a machine that loses power may not).
    fn write(&self, record: &Record, durable: bool) -> Result<()> {
        let json = serde_json::to_vec(record)?;
        let sealed = self.sealer.seal(b"", &json);
        let mut file = crate::registration::private_file_beside(&self.path)?;
        std::io::Write::write_all(&mut file, &sealed)
            .and_then(|_| if durable { file.as_file().sync_all() } else { Ok(()) })
            .with_context(|| format!("cannot write {}", self.path.display()))?;
        file.persist(&self.path).map_err(|e| anyhow::anyhow!("cannot write {}: {}", self.path.display(), e.error))?;
        Ok(())
    }
}

/// The record of an import as it runs: each step saved as it ends.
pub struct Recording {
    records: Records,
    record: Mutex<Record>,
}

impl Recording {
    /// The record of import `id` into the session's account: the one kept, when it is this
    /// import's and not undone (a second run of it), else a new one with `before`.
    pub fn begin(session: &Session, id: u64, old: &OwnedUserId, before: &AccountWorld) -> Result<Recording> {
        let records = Records::of(session);
        let kept = records.load().ok().flatten().filter(|r| r.id == id && r.undo.is_none());
        let record = kept.unwrap_or_else(|| Record::new(id, old.clone(), session.user_id.clone(), before.clone()));
        records.save(&record)?;
        Ok(Recording { records, record: Mutex::new(record) })
    }

    /// Changes the record and saves it, as each room ends: not synced to the disk each time
    /// (hundreds of rooms), but each write whole.
    pub fn update(&self, change: impl FnOnce(&mut Record)) -> Result<()> {
        self.apply(change, false)
    }

    /// The same, on the disk itself before it returns (the import's or the undo's end).
    pub fn update_durably(&self, change: impl FnOnce(&mut Record)) -> Result<()> {
        self.apply(change, true)
    }

    fn apply(&self, change: impl FnOnce(&mut Record), durable: bool) -> Result<()> {
        let mut record = self.record.lock().expect("the record's lock");
        change(&mut record);
        self.records.write(&record, durable)
    }

    pub fn record(&self) -> Record {
        self.record.lock().expect("the record's lock").clone()
    }
}

/// Why `handoff undo` can't run.
pub fn refusal(record: Option<&Record>, user: &ruma::UserId) -> Option<String> {
    match record {
        None => Some(format!(
            "no import into {user} is recorded on this device: `handoff undo` takes back an import made here by `handoff import`"
        )),
        Some(r) if r.undo.as_ref().is_some_and(|u| u.finished) => {
            Some(format!("the import from {} into {user} was undone already", r.old))
        }
        _ => None,
    }
}

/// An undo of the last import into the session's account.
pub struct DeviceUndo<'a> {
    hs: Homeserver,
    recording: Recording,
    /// The old account and its client, when logged in here too: it may take back the rank it gave.
    old: Option<(OwnedUserId, Homeserver)>,
    _session: &'a Session,
}

/// Rooms read or left at once.
const IN_FLIGHT: usize = crate::config::DEFAULT_CONCURRENCY;

impl<'a> DeviceUndo<'a> {
    pub async fn open(session: &'a Session, old: Option<(OwnedUserId, Homeserver)>) -> Result<DeviceUndo<'a>> {
        let records = Records::of(session);
        let record = records.load()?;
        if let Some(why) = refusal(record.as_ref(), &session.user_id) {
            bail!("{why}");
        }
        let record = record.expect("refused without one");
        if let Some((user, _)) = &old {
            anyhow::ensure!(*user == record.old, "the import was from {}, not {user}", record.old);
        }
        let hs = session.homeserver().await.with_context(|| format!("cannot reach {}", session.homeserver))?;
        Ok(DeviceUndo { hs, recording: Recording { records, record: Mutex::new(record) }, old, _session: session })
    }

    pub fn record(&self) -> Record {
        self.recording.record()
    }

    fn reverter<'r>(&'r self, r: &'r Record) -> Reverter<'r> {
        Reverter {
            hs: &self.hs,
            new: &r.new,
            old: &r.old,
            move_id: r.id,
            since_ms: r.started_at_ms,
            old_rank: self.old.as_ref().map(|(user, hs)| (hs, &**user)),
        }
    }

    /// What an undo would do now, from what the account holds.
    pub async fn plan(&self, all: bool) -> Result<UndoPlan> {
        let r = self.record();
        let reverter = self.reverter(&r);
        // The rooms it seated the account in, and (to say they stay) those it found it in.
        let touched: Vec<&RoomMoved> = r.rooms.values().filter(|m| m.seated || m.was_member).collect();
        let reads = stream::iter(touched)
            .map(|m| {
                let reverter = &reverter;
                async move {
                    let now = match m.seated {
                        true => reverter.room_now(&m.room_id, &m.notices).await?,
                        false => Default::default(),
                    };
                    Ok::<_, HsError>((m.room_id.clone(), m.name.clone(), undo::room(m, &now, all)))
                }
            })
            .buffered(IN_FLIGHT);
        let mut rooms = Vec::new();
        for read in reads.collect::<Vec<_>>().await {
            rooms.push(read.with_context(|| format!("cannot read the rooms of {}", r.new))?);
        }
        let kinds: Vec<String> = r.wrote.client_settings.iter().map(|(k, _)| k.clone()).collect();
        let now = world::read_account(&self.hs, &r.new, &kinds, &SETTINGS)
            .await
            .with_context(|| format!("cannot read the settings of {}", r.new))?;
        Ok(UndoPlan { rooms, settings: Some(undo::settings(&r.wrote, &r.before, &now)) })
    }

    /// Runs the undo of `plan` (from [`DeviceUndo::plan`]): each room it leaves, recorded before
    /// and after, then the settings; an undo stopped half-way is resumed by the next.
    pub async fn run(
        &self,
        plan: &UndoPlan,
        all: bool,
        progress: impl Fn(&OwnedRoomId, &UndoRoom),
    ) -> Result<UndoReport> {
        self.recording.update(|r| {
            r.undo.get_or_insert_with(|| Undoing { all, started_at_ms: now_ms(), ..Default::default() });
        })?;
        let r = self.record();
        let undoing = r.undo.clone().unwrap_or_default();
        let reverter = self.reverter(&r);
        // Rooms left or kept are done; one that failed is tried again.
        let done =
            |room: &OwnedRoomId| matches!(undoing.rooms.get(room), Some(UndoRoom::Left { .. } | UndoRoom::Kept(_)));
        let todo = plan.rooms.iter().filter(|(room, _, _)| !done(room));
        let steps = stream::iter(todo)
            .map(|(room, _, what)| {
                let (reverter, undoing, progress) = (&reverter, &undoing, &progress);
                async move {
                    let step = match what.settled(undoing.rooms.get(room)) {
                        Some(step) => step,
                        None => {
                            self.set_room(room, UndoRoom::Started)?;
                            reverter.carry_out(room, what).await.unwrap_or_else(|e| UndoRoom::Failed(e.to_string()))
                        }
                    };
                    progress(room, &step);
                    self.set_room(room, step)
                }
            })
            .buffer_unordered(IN_FLIGHT);
        for step in steps.collect::<Vec<_>>().await {
            step?;
        }
        if self.record().undo.as_ref().is_some_and(|u| u.settings.is_none()) {
            let done = match &plan.settings {
                Some(settings) => reverter.put_back(settings).await,
                None => SettingsUndone::default(),
            };
            self.recording.update_durably(|r| set_undo(r, |u| u.settings = Some(done)))?;
        }
        // With rooms it could not leave, the undo is not over: the next run tries them again.
        self.recording.update_durably(|r| {
            set_undo(r, |u| u.finished = !u.rooms.values().any(|s| matches!(s, UndoRoom::Failed(_))))
        })?;
        Ok(undo::report_of(self.record().undo.as_ref().expect("begun")))
    }

    fn set_room(&self, room: &OwnedRoomId, step: UndoRoom) -> Result<()> {
        self.recording.update(|r| {
            set_undo(r, |u| {
                u.rooms.insert(room.clone(), step);
            })
        })
    }
}

fn set_undo(r: &mut Record, change: impl FnOnce(&mut Undoing)) {
    if let Some(u) = r.undo.as_mut() {
        change(u);
    }
}

#[cfg(test)]
mod tests {
    use ruma::{Int, owned_room_id, owned_user_id};

    use super::*;

    fn moved(seated: bool, was_member: bool, level: Option<i64>) -> RoomMoved {
        RoomMoved {
            room_id: owned_room_id!("!r:example.org"),
            name: None,
            was_member,
            seated,
            give_level: level.map(|l| Int::new(l).unwrap()),
            tags: vec![],
            notices: vec![],
        }
    }

    /// A second run of the same import finds the account in the rooms the first seated it in: they
    /// stay the import's (to leave), with a rank the second run gave; a room the account was in
    /// before the first run stays its own.
    #[test]
    fn a_second_run_keeps_what_the_first_seated() {
        let (old, new) = (owned_user_id!("@old:example.org"), owned_user_id!("@new:example.org"));
        let mut r = Record::new(1, old, new, AccountWorld::default());
        r.room(moved(true, false, None), true);
        r.room(moved(false, true, Some(50)), true);
        let room = &r.rooms[&owned_room_id!("!r:example.org")];
        assert!(room.seated && !room.was_member);
        assert_eq!(room.give_level, Some(Int::from(50)));

        let mut r =
            Record::new(1, owned_user_id!("@old:example.org"), owned_user_id!("@new:example.org"), Default::default());
        r.room(moved(false, false, None), false);
        r.room(moved(true, false, None), true);
        assert!(r.rooms[&owned_room_id!("!r:example.org")].seated, "a room failed, then seated by the next run");
        r.room(moved(false, true, None), true);
        assert!(r.rooms[&owned_room_id!("!r:example.org")].seated);

        let mut r =
            Record::new(1, owned_user_id!("@old:example.org"), owned_user_id!("@new:example.org"), Default::default());
        r.room(moved(false, true, None), true);
        r.room(moved(true, false, Some(50)), true);
        assert!(r.rooms[&owned_room_id!("!r:example.org")].was_member, "the account's own room stays its own");
    }
}
