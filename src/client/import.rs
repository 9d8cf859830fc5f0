//! `handoff import FILE`: a bundle applied to the account logged in on this device, with the
//! planner, the merges and the room stages the service uses ([`RoomWork`]), acting through this
//! device's sessions.
//!
//! There is no journal here: each run plans from what the homeserver says then, so a second run
//! finds done what the first did and leaves it alone (a room the account is in is not joined
//! again, a rank given is not given again, a tag that is set, a merge that adds nothing, a notice
//! that is there already: [`Announced::planned`]): an import that stopped half-way is simply run again.
//! What it wrote is recorded in the account's folder as it goes ([`super::undo::Recording`]),
//! for `handoff undo`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::stream::{self, StreamExt};
use ruma::api::client::membership::joined_rooms;
use ruma::{OwnedRoomId, OwnedUserId, UserId};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::pace::Joins;
use super::room_keys;
use super::undo::Recording;
use crate::budget::{Budget, Class};
use crate::bundle::Bundle;
use crate::client::session::Session;
use crate::config::{NotifyConfig, NotifySender, Secret};
use crate::homeserver::{Homeserver, Retry};
use crate::transfer::account::{AccountWork, SETTINGS};
use crate::transfer::journal::RoomJournal;
use crate::transfer::merge::AccountWorld;
use crate::transfer::plan::{self, Plan, Requirements, RoomPlan};
use crate::transfer::room::{
    Accounts, Announced, EncryptedNotice, MOVE_FIELD, Move, Notice, OwnSession, Reach, RoomWork,
};
use crate::transfer::undo::{RoomMoved, Wrote};
use crate::transfer::{
    AccountStep, ClientProfile, Error, FailReason, RoomStep, SkipReason, Stage, TransferKind, world,
};
use crate::wording;

/// Rooms in flight at once: as many as the service's engine by default (on a homeserver that
/// limits the person's own joins, the limits set the pace either way).
const IN_FLIGHT: usize = crate::config::DEFAULT_CONCURRENCY;

/// A homeserver that stops answering is waited for a while, then the room is reported as failed
/// (a second run picks it up): a command line should not wait forever.
const PATIENCE: Retry = Retry {
    attempts: 10,
    backoff: std::time::Duration::from_millis(500),
    max_wait: std::time::Duration::from_secs(10),
    server_errors: true,
    deadline: None,
};

/// How long a room waits for the other homeservers it needs (its via servers, or the new
/// account's for an invite), then is reported as failed (a second run picks it up): a command line
/// should not wait as long as the service.
const FEDERATION_PATIENCE: Duration = Duration::from_secs(60);

/// The old account, when this device can act for it too (a second login, or its access token):
/// it sends the invites (the reservation) and carries the rank, and the plan reads its rooms.
pub struct OldAccount {
    pub user: OwnedUserId,
    pub hs: Homeserver,
}

impl OldAccount {
    /// Checks that `hs`'s token is `user`'s.
    pub async fn connect(user: &UserId, hs: Homeserver) -> Result<OldAccount> {
        let me = hs
            .send(ruma::api::client::account::whoami::v3::Request::new())
            .await
            .map_err(|e| anyhow::anyhow!("cannot check the old account's access: {e}"))?;
        if me.user_id != user {
            bail!("that access is {}'s, but the bundle is {user}'s", me.user_id);
        }
        Ok(OldAccount { user: user.to_owned(), hs: hs.with_retry(PATIENCE) })
    }
}

pub struct ImportOptions {
    pub requirements: Requirements,
    /// Post the move notice in each room.
    pub notify: bool,
    pub old: Option<OldAccount>,
    /// Unlocks the new account's key backup, which then gets the room keys too.
    pub recovery_key: Option<Secret>,
    /// Tried in order on the bundle's key export.
    pub key_passphrases: Vec<Secret>,
}

/// How one room ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome", content = "detail")]
pub enum RoomOutcome {
    /// The new account is in the room (joined now or before).
    Moved,
    /// The room is not public and nobody invited the new account: with the old account's access
    /// (`--old`), it invites; otherwise someone in the room must.
    NeedsInvite,
    /// Worded as the service words it, in `--json` too.
    Skipped(#[serde(serialize_with = "wording::as_text")] SkipReason),
    Failed(#[serde(serialize_with = "wording::as_text")] FailReason),
}

/// A room's final step as the device side reports it.
impl From<RoomStep> for RoomOutcome {
    fn from(step: RoomStep) -> RoomOutcome {
        match step {
            RoomStep::Skipped(SkipReason::NeedsInvite { .. }) => RoomOutcome::NeedsInvite,
            RoomStep::Skipped(why) => RoomOutcome::Skipped(why),
            RoomStep::Failed(why) => RoomOutcome::Failed(why),
            RoomStep::Done | RoomStep::AwaitingAccept | RoomStep::Pending | RoomStep::Started(_) => RoomOutcome::Moved,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RoomResult {
    pub room_id: OwnedRoomId,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(flatten)]
    pub outcome: RoomOutcome,
    /// What went wrong after the join (tags, rank, notice), if anything.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl RoomResult {
    pub fn label(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.room_id.to_string())
    }
}

/// What an import did, for the person and (as JSON) for scripts.
#[derive(Debug, Clone, Serialize)]
pub struct ImportReport {
    pub old: OwnedUserId,
    pub new: OwnedUserId,
    pub rooms: Vec<RoomResult>,
    /// Each setting, with what it did or why it failed.
    pub settings: Vec<SettingResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub room_keys: Option<room_keys::Imported>,
    pub left_out: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct SettingResult {
    pub step: &'static str,
    pub ok: bool,
    pub detail: String,
}

impl ImportReport {
    pub fn count(&self, f: impl Fn(&RoomOutcome) -> bool) -> usize {
        self.rooms.iter().filter(|r| f(&r.outcome)).count()
    }

    /// Whether anything was not moved that could be (the command's exit code says so).
    pub fn complete(&self) -> bool {
        self.rooms.iter().all(|r| matches!(r.outcome, RoomOutcome::Moved | RoomOutcome::Skipped(_)))
            && self.settings.iter().all(|s| s.ok)
    }
}

/// What an import tells the person as it goes (a progress bar, or nothing for `--json`).
pub trait Progress: Send + Sync {
    fn step(&self, what: &str);
    /// The rooms begin: `total` of them, `at_defaults` the time their joins take at Synapse's
    /// default limits ([`Joins::at_defaults`]).
    fn rooms(&self, total: usize, at_defaults: Duration);
    fn room(&self, result: &RoomResult);
}

/// A device-side import of `bundle` into the session's account.
pub struct Import<'a> {
    session: &'a Session,
    new: Homeserver,
    bundle: &'a Bundle,
    options: ImportOptions,
}

impl<'a> Import<'a> {
    pub async fn new(session: &'a Session, bundle: &'a Bundle, options: ImportOptions) -> Result<Import<'a>> {
        let new = session
            .homeserver()
            .await
            .with_context(|| format!("cannot reach {}", session.homeserver))?
            .with_retry(PATIENCE);
        Ok(Import { session, new, bundle, options })
    }

    fn new_user(&self) -> &UserId {
        &self.session.user_id
    }

    /// The same account on a new device: nothing to invite, announce or redirect.
    fn same_account(&self) -> bool {
        self.bundle.source.user_id == self.session.user_id
    }

    /// The plan: from the old account's view of its rooms when this device can read it, else a
    /// plan that tries every room by its ID.
    pub async fn plan(&self) -> Result<Plan> {
        let bundle = self.bundle;
        let req = &self.options.requirements;
        if let Some(old) = &self.options.old {
            let rooms = bundle.rooms.iter().map(|r| r.room_id.clone());
            let budget = Budget::new(IN_FLIGHT);
            let world = world::read(&old.hs, &old.user, self.new_user(), rooms, &budget, 0, Class::First)
                .await
                .context("cannot read the old account's rooms")?;
            return Ok(plan::plan(bundle, self.new_user(), req, &world));
        }
        let joined = self
            .new
            .send(joined_rooms::v3::Request::new())
            .await
            .with_context(|| format!("cannot read the rooms of {}", self.new_user()))?
            .joined_rooms;
        Ok(plan::blind(bundle, self.new_user(), req, &joined.into_iter().collect()))
    }

    /// Runs the plan: the room keys first (a wrong passphrase or recovery key stops here, before
    /// anything changed), then the profile, the rooms (highest priority first), the settings.
    pub async fn run(&self, plan: &Plan, progress: &dyn Progress) -> Result<ImportReport> {
        let clock = Instant::now();
        let took = |what: &str| tracing::debug!(ms = clock.elapsed().as_millis(), "import: {what}");
        let room_keys = self.room_keys(progress).await?;
        took("room keys");
        let world = self.account_world(&SETTINGS).await?;
        let t = self.as_move(self.notice_id());
        // What it writes is recorded from here, before its first write, for `handoff undo`.
        let recording = Recording::begin(self.session, t.id, &self.bundle.source.user_id, &world)?;
        let account = AccountWork { acting: self.new.clone() };
        let (mut settings, mut done) = (Vec::new(), Vec::new());
        let none = BTreeSet::new();
        progress.step("profile");
        settings.push(self.setting(&account, AccountStep::Profile, &none, &world, &mut done).await?);

        took("settings read, profile");
        progress.rooms(plan.rooms.len(), Joins::of(plan, self.new_user()).at_defaults());
        let (work, recording) = (&self.room_work(), &recording);
        // Two passes, as the service's engine: every room's seat first (the account is in its
        // rooms as early as the homeserver allows), then the rank, tags and notice of each.
        // Unordered: a room that waits (another server, a rate limit) holds one slot, not the
        // rooms behind it; they start in the plan's order all the same, and are put back in it.
        let mut rooms: Vec<(usize, RoomResult)> = stream::iter(plan.rooms.iter().enumerate())
            .map(|(i, room)| async move {
                let mut result = self.seat(work, t, room).await;
                let in_room = result.outcome == RoomOutcome::Moved;
                // Recorded once seated: an import stopped before the second pass is undone too.
                let entry = self.bundle.rooms.iter().find(|e| e.room_id == room.room_id);
                let moved = RoomMoved::of(room, in_room.then_some(&RoomStep::Done), entry);
                if let Err(e) = recording.update(|r| r.room(moved, in_room)) {
                    result.notes.push(format!("not recorded for `handoff undo`: {e:#}"));
                }
                // The bar counts seats (what a rate limit paces); the second pass changes no outcome.
                progress.room(&result);
                (i, result)
            })
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await;
        rooms.sort_by_key(|(i, _)| *i);
        took("rooms joined");
        progress.step("ranks, tags and notices");
        let mut rooms: Vec<(usize, RoomResult)> = stream::iter(rooms)
            .map(|(i, mut result)| async move {
                if result.outcome == RoomOutcome::Moved {
                    self.finish(work, t, &plan.rooms[i], &mut result).await;
                }
                (i, result)
            })
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await;
        rooms.sort_by_key(|(i, _)| *i);
        let mut rooms: Vec<RoomResult> = rooms.into_iter().map(|(_, r)| r).collect();
        took("rooms finished");
        if let Some(notify) = &work.notify {
            progress.step("move notices in encrypted rooms");
            self.encrypted_notices(notify, t, &mut rooms, recording).await;
            took("notices in encrypted rooms");
        }

        let moved: BTreeSet<OwnedRoomId> =
            rooms.iter().filter(|r| r.outcome == RoomOutcome::Moved).map(|r| r.room_id.clone()).collect();
        for step in &SETTINGS[1..] {
            if *step == AccountStep::OldMentions && self.same_account() {
                continue;
            }
            progress.step(step.name());
            settings.push(self.setting(&account, *step, &moved, &world, &mut done).await?);
        }
        took("settings");
        let profile_from_old = self.options.requirements.profile_from_old;
        recording.update_durably(|r| {
            r.done.extend(done);
            r.wrote = Wrote::of(t, profile_from_old, |s| r.done.contains(&s), &r.before, self.bundle, &r.moved);
        })?;
        Ok(ImportReport {
            old: self.bundle.source.user_id.clone(),
            new: self.new_user().to_owned(),
            rooms,
            settings,
            room_keys,
            left_out: plan.left_out,
        })
    }

    async fn account_world(&self, steps: &[AccountStep]) -> Result<AccountWorld> {
        world::read_account(&self.new, self.new_user(), self.bundle.preferences.client_settings.keys(), steps)
            .await
            .with_context(|| format!("cannot read the settings of {}", self.new_user()))
    }

    async fn setting(
        &self,
        account: &AccountWork,
        step: AccountStep,
        moved: &BTreeSet<OwnedRoomId>,
        world: &AccountWorld,
        done: &mut Vec<AccountStep>,
    ) -> Result<SettingResult> {
        let setting = step.setting(&self.options.requirements).expect("SETTINGS are settings");
        let old = &self.bundle.source.user_id;
        let (ok, detail) = match account.apply(setting, old, self.new_user(), self.bundle, moved, world).await {
            Ok(wrote) => {
                done.push(step);
                (true, wrote.to_string())
            }
            Err(Error::Hs(e)) => (false, e.to_string()),
            Err(e) => return Err(e.into()),
        };
        Ok(SettingResult { step: step.name(), ok, detail })
    }

    /// The bundle's key export into this device (and the key backup, with a recovery key).
    async fn room_keys(&self, progress: &dyn Progress) -> Result<Option<room_keys::Imported>> {
        if let Some(key) = &self.options.recovery_key {
            progress.step("unlocking the key backup");
            room_keys::recover(self.session, key).await?;
        }
        let Some(export) = &self.bundle.room_keys else {
            return Ok(None);
        };
        progress.step("importing the room keys");
        let passphrases: Vec<&Secret> = self.options.key_passphrases.iter().collect();
        let result = room_keys::import(self.session, export, &passphrases).await?;
        let backed_up = self.options.recovery_key.is_some();
        if backed_up {
            progress.step("uploading the room keys to the key backup");
            room_keys::wait_for_backup(self.session).await?;
        }
        Ok(Some(room_keys::Imported { imported: result.imported_count, total: result.total_count, backed_up }))
    }

    /// The service's room stages, acting through this device's sessions, with no journal: each run's
    /// plan says what an earlier one did, so a second run does nothing twice.
    fn room_work(&self) -> RoomWork {
        let old = self.options.old.as_ref().map(|o| OwnSession::new(o.user.clone(), o.hs.clone()));
        RoomWork {
            accounts: Accounts::Own { new: OwnSession::new(self.new_user().to_owned(), self.new.clone()), old },
            journal: RoomJournal::Nothing,
            // The new account is the one this device acts for in every run: it says it moved.
            notify: (self.options.notify && !self.same_account())
                .then(|| NotifyConfig { sender: NotifySender::New, ..NotifyConfig::default() }),
            patience: FEDERATION_PATIENCE,
            // No reservation runs alongside: a room without its invite is said at once.
            invites_patience: Duration::ZERO,
            arrivals: Default::default(),
            reach: Reach::default(),
            pace: Default::default(),
            // This device has the account's keys: it sends those notices encrypted, below.
            encrypted_notice: EncryptedNotice::Caller,
        }
    }

    /// The move notice of each moved room that is end-to-end encrypted, sent encrypted by this
    /// device: the stages leave it (clear text would be flagged there), and this device holds the
    /// account's keys. A room whose last messages hold it already is left alone; a notice that
    /// can't be sent is a note of its room.
    async fn encrypted_notices(
        &self,
        notify: &NotifyConfig,
        t: Move<'_>,
        rooms: &mut [RoomResult],
        recording: &Recording,
    ) {
        let encrypted = |r: &RoomResult| self.bundle.rooms.iter().any(|e| e.room_id == r.room_id && e.encrypted);
        let mut todo: Vec<&mut RoomResult> =
            rooms.iter_mut().filter(|r| r.outcome == RoomOutcome::Moved && encrypted(r)).collect();
        if todo.is_empty() {
            return;
        }
        let client = &self.session.client;
        // The rooms just joined, known to this device's client (their members, to encrypt for).
        let settings = matrix_sdk::config::SyncSettings::default().timeout(Duration::ZERO);
        if let Err(e) = client.sync_once(settings).await {
            for r in &mut todo {
                r.notes.push(format!("the notice was not posted (this device could not sync: {e})"));
            }
            return;
        }
        let notice = Notice { template: &notify.template, id: t.id, old: t.old, new: t.new, profile: t.profile };
        let (content, txn_id) = (notice.content(), ruma::OwnedTransactionId::from(notice.txn_id()));
        for r in todo {
            let sent = async {
                let room = client.get_room(&r.room_id).context("this device does not know the room yet")?;
                if notice_among(&room, t.id).await? {
                    return Ok(());
                }
                let sent = room.send_raw("m.room.message", content.clone()).with_transaction_id(&txn_id).await?;
                // Encrypted, it is told from the account's own messages only by its ID.
                recording.update(|rec| {
                    if let Some(moved) = rec.rooms.get_mut(&r.room_id) {
                        moved.notices.push(sent.response.event_id);
                    }
                })?;
                anyhow::Ok(())
            };
            if let Err(e) = sent.await {
                r.notes.push(format!("the notice was not posted: {e:#}"));
            }
        }
    }

    /// This import as the stages see a move: a whole one where the old account is acted for too,
    /// else a received one.
    fn as_move(&self, id: u64) -> Move<'_> {
        let kind = if self.options.old.is_some() { TransferKind::Move } else { TransferKind::Receive };
        Move { id, old: &self.bundle.source.user_id, new: self.new_user(), kind, profile: ClientProfile::Desktop }
    }

    /// A room's seat: the reservation (with the old account's access) and the join by ID. Its
    /// outcome is `Moved` when the account is in the room for [`Self::finish`].
    async fn seat(&self, work: &RoomWork, t: Move<'_>, room: &RoomPlan) -> RoomResult {
        let mut result = RoomResult {
            room_id: room.room_id.clone(),
            name: room.name.clone(),
            outcome: RoomOutcome::Moved,
            notes: vec![],
        };
        let ended = match work.take_seat(t, room, &RoomStep::Pending).await {
            Ok(None) => None,
            Ok(Some(step)) => Some(step),
            Err(e) => Some(RoomStep::Failed(FailReason::Error(e.to_string()))),
        };
        if let Some(step) = ended {
            result.outcome = RoomOutcome::from(step);
        }
        result
    }

    /// A seated room's rank, tags and notice, whose failures are notes (the seat is taken).
    async fn finish(&self, work: &RoomWork, t: Move<'_>, room: &RoomPlan, result: &mut RoomResult) {
        let entry = self.bundle.rooms.iter().find(|e| e.room_id == room.room_id);
        let finish =
            work.finish_stages(t, entry, room, &RoomStep::Started(Stage::Joined), Announced::planned(room)).await;
        if let Some(e) = finish.rank {
            result.notes.push(format!("the rank was not carried: {e}"));
        }
        if let Err((stage, e)) = finish.end {
            result.notes.push(match stage {
                Stage::Tags => format!("the tags were not set: {e}"),
                Stage::Notify => format!("the notice was not posted: {e}"),
                _ => e.to_string(),
            });
        }
    }

    /// The move's number, the same on every run of this bundle into this account (48 bits: a JSON
    /// number every client reads exactly).
    fn notice_id(&self) -> u64 {
        let s = &self.bundle.source;
        let digest = Sha256::new()
            .chain_update(s.user_id.as_bytes())
            .chain_update(u64::from(s.exported_at.get()).to_be_bytes())
            .chain_update(self.new_user().as_bytes())
            .finalize();
        let mut id = [0u8; 8];
        id[2..].copy_from_slice(&digest[..6]);
        u64::from_be_bytes(id)
    }
}

/// Whether the room's last messages, as this device decrypts them, hold the notice of move `id`.
async fn notice_among(room: &matrix_sdk::Room, id: u64) -> Result<bool> {
    let mut options = matrix_sdk::room::MessagesOptions::backward();
    options.limit = 50u32.into();
    let messages = room.messages(options).await?;
    Ok(messages.chunk.iter().any(|ev| {
        ev.raw()
            .get_field::<serde_json::Value>("content")
            .ok()
            .flatten()
            .and_then(|c| c.get(MOVE_FIELD)?.get("transfer")?.as_u64())
            == Some(id)
    }))
}

/// The old account's access from its own session kept on this device (`handoff login @old`).
pub async fn old_from_session(session: &Session) -> Result<OldAccount> {
    let hs = session.homeserver().await.with_context(|| format!("cannot reach {}", session.homeserver))?;
    OldAccount::connect(&session.user_id, hs).await
}

/// The old account's access from an access token, on its homeserver `address`.
pub async fn old_from_token(user: &UserId, address: &str, token: &Secret) -> Result<OldAccount> {
    let hs = Homeserver::connect_user(address, token.expose(), reqwest::Client::new())
        .await
        .with_context(|| format!("cannot reach the old account's homeserver {address}"))?;
    OldAccount::connect(user, hs).await
}

/// For `Arc<dyn Progress>` callers.
impl<P: Progress + ?Sized> Progress for Arc<P> {
    fn step(&self, what: &str) {
        (**self).step(what)
    }
    fn rooms(&self, total: usize, at_defaults: Duration) {
        (**self).rooms(total, at_defaults)
    }
    fn room(&self, result: &RoomResult) {
        (**self).room(result)
    }
}
