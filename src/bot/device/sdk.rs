//! The bot's own device: a matrix-sdk client logged in as the bot, so it reads and writes
//! end-to-end encrypted DMs.
//!
//! What it owns, in order of start-up:
//! - **The login**: `m.login.application_service` with the main registration's `as_token` (the
//!   way mautrix bridges give their bot a device); the device ID and its access token are kept in
//!   the store's sealed device record and reused at every start, so the device never changes
//!   while its crypto store lives.
//! - **The crypto store**: matrix-sdk's SQLite stores in `<database.path>.device/`, locked with a
//!   random passphrase that lives only in the sealed device record (so it opens with the store
//!   key, and with nothing else). A lost crypto store means a fresh device, never a broken one:
//!   the old device is logged out and a new one made; a store that does not open is moved aside.
//! - **Cross-signing**: bootstrapped for the bot's identity when it has none (first upload, no
//!   re-authentication), and recovery enabled with a recovery key kept in the device record, so a
//!   later fresh device is cross-signed again from secret storage.
//! - **Its own `/sync`**: to-device messages, device lists and key counts, and the timeline of the
//!   bot's rooms. Only events that arrived *encrypted* are taken from here (decrypted); plain
//!   events keep coming through the appservice transactions: one source per event. Its position
//!   is stored once what it brought is in the inbox, so a crash loses no command. Events that
//!   could not be decrypted yet are decrypted when their keys arrive; after a few seconds
//!   without, their sender is asked to send them again.
//!
//! It sends into a room only when that room is encrypted: [`Device::is_encrypted`] says which.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use matrix_sdk::authentication::matrix::MatrixSession;
use matrix_sdk::config::{RequestConfig, SyncSettings};
use matrix_sdk::deserialized_responses::{TimelineEvent, TimelineEventKind};
use matrix_sdk::encryption::EncryptionSettings;
use matrix_sdk::store::RoomLoadSettings;
use matrix_sdk::{Client, EncryptionState, Room, RoomState, SessionMeta, SessionTokens};
use ruma::api::client::filter::{FilterDefinition, LazyLoadOptions, RoomEventFilter};
use ruma::api::client::sync::sync_events;
use ruma::api::error::ErrorKind;
use ruma::events::room::encrypted::OriginalSyncRoomEncryptedEvent;
use ruma::events::room::message::RoomMessageEventContent;
use ruma::serde::Raw;
use ruma::{OwnedDeviceId, OwnedEventId, OwnedRoomId, OwnedTransactionId, OwnedUserId, RoomId, UInt};
use serde::{Deserialize, Serialize};

use super::event::{Decrypted, Unreadable, is_message};
use crate::config::{Config, Secret};
use crate::homeserver::{Homeserver, HsError};
use crate::metrics::{self, Outcome, Problem};
use crate::shutdown::Shutdown;
use crate::store::{Store, StoreError, now_ms};

/// The metrics label of a message sent by the device (the path template ruma gives it).
const SEND_ENDPOINT: &str = "/_matrix/client/v3/rooms/{room_id}/send/{event_type}/{txn_id}";

/// What the device's clients see it as.
const DISPLAY_NAME: &str = "handoff bot";

/// Events kept until their keys arrive, at most (a flood of undecryptable events costs no more).
const MAX_UNDECRYPTED: usize = 256;
/// Events of one sender kept until their keys arrive, at most: a person's client sends a few
/// commands before its keys follow, not dozens.
const MAX_UNDECRYPTED_PER_SENDER: usize = 16;
/// How long an undecryptable event waits for its keys before its sender is told.
const UNREADABLE_AFTER: Duration = Duration::from_secs(10);
/// A room is told of an unreadable event at most this often.
const TELL_AT_MOST_EVERY: Duration = Duration::from_secs(60);
/// How long the long-poll of the device's `/sync` waits for news.
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the device could not start. The bot then works in unencrypted rooms only.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(
        "the homeserver refused to log the bot in with m.login.application_service ({0}). Homeservers that delegate login to MAS, or a registration with `io.element.msc4190: true`, don't allow it yet: the bot works in unencrypted DMs only (set encryption.allow: false to stop trying)"
    )]
    LoginRefused(HsError),
    #[error("cannot log the bot's device in: {0}")]
    Homeserver(#[from] HsError),
    #[error("the bot's device record: {0}")]
    Store(#[from] StoreError),
    #[error("the bot's crypto store {path}: {message}")]
    CryptoStore { path: String, message: String },
}

impl DeviceError {
    /// What `/health` may say of it: no error text (it can hold the homeserver's address or the
    /// crypto store's path); the log has that.
    pub fn summary(&self) -> String {
        match self {
            DeviceError::LoginRefused(_) => "the homeserver refused to log the bot in with m.login.application_service (homeservers that delegate login to MAS, or a registration with io.element.msc4190, don't allow it yet): the bot works in unencrypted DMs only".into(),
            DeviceError::Homeserver(e) => e.problem().as_str().into(),
            DeviceError::Store(_) => Problem::DatabaseError.as_str().into(),
            DeviceError::CryptoStore { .. } => "the bot's crypto store does not open (the log says where it is)".into(),
        }
    }
}

/// How often, and how many times at most, the device's sync signs the device again while it is
/// not cross-signed ([`Device::sign_if_unsigned`]).
const RESIGN_EVERY: Duration = Duration::from_secs(10);
const RESIGNS: u32 = 12;

/// The sealed record of the device, in the store's `meta` tree.
#[derive(Serialize, Deserialize)]
struct Record {
    device_id: OwnedDeviceId,
    access_token: Secret,
    /// Locks the crypto store.
    passphrase: Secret,
    /// When the device was made: encrypted events older than it were never meant for it.
    created_ms: u64,
    /// Opens the bot's secret storage (its cross-signing keys), once recovery is enabled.
    #[serde(default)]
    recovery_key: Option<Secret>,
}

/// The bot's device, running.
#[derive(Clone)]
pub struct Device {
    client: Client,
    created_ms: u64,
    health: Arc<Mutex<SyncHealth>>,
    undecrypted: Arc<Mutex<Vec<Undecrypted>>>,
}

#[derive(Default)]
struct SyncHealth {
    last_ok: Option<Instant>,
    /// What the last failed sync ran into, as `/health` may say it (the log has the error).
    last_error: Option<Problem>,
}

struct Undecrypted {
    room_id: OwnedRoomId,
    /// Whose it is, for the per-sender bound (the homeserver vouches for it, as for any event).
    sender: Option<OwnedUserId>,
    event: Raw<OriginalSyncRoomEncryptedEvent>,
    since: Instant,
}

/// Adds `new` to the events waiting for their keys, within the bounds: a sender at its own bound
/// loses its own oldest; when all are full, the sender with the most waiting loses its oldest.
/// Either way a flood pushes out the flooder's events, never another user's waiting command
/// (unless that user is among the biggest senders).
fn keep_waiting(waiting: &mut Vec<Undecrypted>, new: Undecrypted) {
    let mine = waiting.iter().filter(|u| u.sender == new.sender).count();
    let evict = if mine >= MAX_UNDECRYPTED_PER_SENDER {
        waiting.iter().position(|u| u.sender == new.sender)
    } else if waiting.len() >= MAX_UNDECRYPTED {
        let mut counts: HashMap<&Option<OwnedUserId>, usize> = HashMap::new();
        for u in waiting.iter() {
            *counts.entry(&u.sender).or_default() += 1;
        }
        let most = counts.values().copied().max().unwrap_or(0);
        // Oldest first: the first event of a sender with the most is that sender's oldest.
        waiting.iter().position(|u| counts[&u.sender] == most)
    } else {
        None
    };
    if let Some(i) = evict {
        waiting.remove(i);
    }
    waiting.push(new);
}

impl Device {
    /// Logs the bot's device in (or restores it), opens its crypto store, makes sure it is
    /// cross-signed, and syncs once so its keys are on the homeserver before anyone writes to it.
    pub async fn start(config: &Config, hs: &Homeserver, store: &Store) -> Result<Device, DeviceError> {
        let path = config.device_store_path();
        let localpart = &config.appservice.bot.username;
        let record = match store.device_record().await? {
            Some(bytes) => match serde_json::from_slice::<Record>(&bytes) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(error = %e, "the bot's device record does not parse: making a new device");
                    None
                }
            },
            None => None,
        };
        let record = match record {
            Some(r) if path.exists() => r,
            Some(old) => {
                tracing::warn!(
                    path = %path.display(),
                    device_id = %old.device_id,
                    "the bot's crypto store is gone: logging that device out and making a new one (users' clients see a new device of the bot)"
                );
                if let Err(e) = hs.logout_token(old.access_token.expose()).await {
                    tracing::info!(error = %e, "the old device could not be logged out (it may be gone already)");
                }
                // The recovery key opens the bot's secret storage: the new device is cross-signed from it.
                new_device(hs, store, localpart, &path, old.recovery_key).await?
            }
            None => new_device(hs, store, localpart, &path, None).await?,
        };
        let (client, record) = match open(config, &path, &record).await {
            Ok(client) => (client, record),
            Err(e) => {
                // The store is there but is not this device's (or does not open): keep it for the
                // admin to look at, log its device out, and start afresh.
                let aside = set_aside(&path)?;
                tracing::warn!(
                    error = %e,
                    moved_to = %aside.display(),
                    "the bot's crypto store does not open: moved aside, making a new device"
                );
                if let Err(e) = hs.logout_token(record.access_token.expose()).await {
                    tracing::info!(error = %e, "the old device could not be logged out (it may be gone already)");
                }
                let record = new_device(hs, store, localpart, &path, record.recovery_key).await?;
                let client = open(config, &path, &record).await.map_err(|e| crypto_store(&path, e))?;
                (client, record)
            }
        };
        match client.whoami().await {
            Ok(_) => Device::ready(client, record, store).await,
            Err(e) if matches!(e.client_api_error_kind(), Some(ErrorKind::UnknownToken { .. })) => {
                // The session ended (an admin logged it out?) but the device's keys are here: log in
                // again as the same device.
                tracing::info!(device_id = %record.device_id, "the bot's device token is no longer valid: logging in again as the same device");
                drop(client);
                let login =
                    hs.login_device(localpart, Some(record.device_id.clone()), DISPLAY_NAME).await.map_err(refused)?;
                let record = Record { access_token: Secret::new(login.access_token), ..record };
                save(store, &record).await?;
                let client = open(config, &path, &record).await.map_err(|e| crypto_store(&path, e))?;
                Device::ready(client, record, store).await
            }
            Err(e) => Err(DeviceError::Homeserver(sdk_error(e.into()))),
        }
    }

    /// Cross-signing, recovery and a first sync for a client whose session is restored.
    async fn ready(client: Client, mut record: Record, store: &Store) -> Result<Device, DeviceError> {
        let encryption = client.encryption();
        encryption.wait_for_e2ee_initialization_tasks().await;
        let recovery = encryption.recovery();
        let have_keys = encryption.cross_signing_status().await.is_some_and(|s| s.is_complete());
        match (&record.recovery_key, have_keys) {
            // Cross-signed, and its keys already in secret storage.
            (Some(_), true) => {}
            (Some(key), false) => {
                // A fresh device of a bot that had one before: its cross-signing keys come back
                // from secret storage, and sign this device.
                if let Err(e) = recovery.recover(key.expose()).await {
                    tracing::warn!(error = %e, "cannot recover the bot's cross-signing keys: its device stays unverified");
                }
            }
            (None, true) => match recovery.enable().await {
                Ok(key) => {
                    record.recovery_key = Some(Secret::new(key));
                    save(store, &record).await?;
                }
                Err(e) => tracing::warn!(error = %e, "cannot enable recovery for the bot's cross-signing keys"),
            },
            (None, false) => tracing::warn!(
                "the bot already has a cross-signing identity whose keys this device does not hold: its device stays unverified (clients that hide unverified devices may not write to it)"
            ),
        }
        let device =
            Device { client, created_ms: record.created_ms, health: Arc::default(), undecrypted: Arc::default() };
        // One sync before anyone is told the bot is up: its keys are uploaded, and the rooms and
        // members it knows are current.
        device.client.sync_once(device.sync_settings().timeout(Duration::ZERO)).await.map_err(sdk_error)?;
        if record.recovery_key.is_some() && !device.cross_signed().await {
            // A fresh device's signature from recovered keys can race the upload of its own keys
            // (seen under load): sign it again now that they are up, and sync to read it back.
            match device.client.encryption().get_own_device().await {
                Ok(Some(own)) => match own.verify().await {
                    Ok(()) => {
                        let settings = device.sync_settings().timeout(Duration::ZERO);
                        device.client.sync_once(settings).await.map_err(sdk_error)?;
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot sign the bot's device with its cross-signing keys"),
                },
                Ok(None) => tracing::warn!("the bot's own device is not known yet: it stays unverified for now"),
                Err(e) => tracing::warn!(error = %e, "cannot read the bot's own device"),
            }
        }
        device.health.lock().expect("lock").last_ok = Some(Instant::now());
        tracing::info!(device_id = %record.device_id, cross_signed = device.cross_signed().await, "the bot's device is ready");
        Ok(device)
    }

    fn sync_settings(&self) -> SyncSettings {
        // Room history, receipts, typing and presence are of no use to the bot; lazy-loaded
        // members keep a big DM list cheap (the device fetches a room's members to encrypt).
        let mut filter = FilterDefinition::default();
        filter.presence = ruma::api::client::filter::Filter::ignore_all();
        filter.account_data = ruma::api::client::filter::Filter::ignore_all();
        filter.room.ephemeral = RoomEventFilter::ignore_all();
        filter.room.account_data = RoomEventFilter::ignore_all();
        filter.room.timeline.limit = Some(UInt::from(50u32));
        filter.room.state.lazy_load_options = LazyLoadOptions::Enabled { include_redundant_members: false };
        SyncSettings::default().filter(sync_events::v3::Filter::FilterDefinition(filter)).timeout(SYNC_TIMEOUT)
    }

    /// Syncs until the stop, handing every encrypted event it decrypts to `accept`; events
    /// decrypted later (their keys arrived) are handed over too. The sync's position is stored only
    /// once `accept` has taken every event before it, so a crash in between loses nothing: the next
    /// start syncs again from there (and `accept` knows each event ID once). An event still
    /// undecryptable after [`UNREADABLE_AFTER`] goes to `unreadable` instead, once, and is no
    /// longer waited for (the sender is asked to send it again: it must not run twice).
    pub fn spawn_sync<F, Fut, G, GFut>(&self, shutdown: &Shutdown, store: Store, accept: F, unreadable: G)
    where
        F: Fn(Decrypted) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<(), StoreError>> + Send + 'static,
        G: Fn(Unreadable) -> GFut + Send + Sync + 'static,
        GFut: Future<Output = ()> + Send + 'static,
    {
        let (this, stop) = (self.clone(), shutdown.clone());
        shutdown.spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(2));
            // When each room was last told: at most once a minute, whatever a sender floods.
            let mut told: HashMap<OwnedRoomId, Instant> = HashMap::new();
            loop {
                tokio::select! {
                    _ = stop.begun() => return,
                    _ = every.tick() => {}
                }
                told.retain(|_, at| at.elapsed() < TELL_AT_MOST_EVERY);
                let overdue: Vec<Undecrypted> = {
                    let mut waiting = this.undecrypted.lock().expect("lock");
                    let (overdue, still) = std::mem::take(&mut *waiting)
                        .into_iter()
                        .partition(|u: &Undecrypted| u.since.elapsed() >= UNREADABLE_AFTER);
                    *waiting = still;
                    overdue
                };
                for u in overdue {
                    let (Some(event_id), Some(sender)) = (
                        u.event.get_field::<OwnedEventId>("event_id").ok().flatten(),
                        u.event.get_field::<OwnedUserId>("sender").ok().flatten(),
                    ) else {
                        continue;
                    };
                    if told.contains_key(&u.room_id) {
                        continue;
                    }
                    told.insert(u.room_id.clone(), Instant::now());
                    tracing::info!(room_id = %u.room_id, "an encrypted event stayed unreadable: its sender is told");
                    unreadable(Unreadable { room_id: u.room_id, event_id, sender }).await;
                }
            }
        });
        let (this, stop, take) = (self.clone(), shutdown.clone(), accept.clone());
        shutdown.spawn(async move {
            let base = this.sync_settings();
            // Where the last stop left the bot (the device's own store may be ahead of it).
            let mut from = store.device_sync_token().await.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot read where the device's sync stood");
                None
            });
            let mut backoff = Duration::from_secs(1);
            let (mut signed_at, mut signings) = (Instant::now(), 0);
            loop {
                let settings = match &from {
                    Some(token) => base.clone().token(token.clone()),
                    None => base.clone(),
                };
                let response = tokio::select! {
                    _ = stop.begun() => return,
                    r = this.client.sync_once(settings) => r,
                };
                let response = match response {
                    Ok(r) => r,
                    Err(e) => {
                        let e = sdk_error(e);
                        tracing::warn!(error = %e, retry_in = ?backoff, "the bot's device cannot sync");
                        this.health.lock().expect("lock").last_error = Some(e.problem());
                        tokio::select! {
                            _ = stop.begun() => return,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(60));
                        continue;
                    }
                };
                backoff = Duration::from_secs(1);
                this.health.lock().expect("lock").last_ok = Some(Instant::now());
                // A signature that lost its race at start-up is made again, now and then, a few times.
                if signings < RESIGNS && signed_at.elapsed() >= RESIGN_EVERY {
                    signed_at = Instant::now();
                    if this.sign_if_unsigned().await {
                        signings += 1;
                    }
                }
                let mut taken = true;
                for (room_id, update) in response.rooms.joined {
                    for event in update.timeline.events {
                        if let Some(d) = this.take(&room_id, event)
                            && let Err(e) = take(d).await
                        {
                            tracing::error!(error = %e, "cannot store a decrypted event: the sync goes over it again");
                            taken = false;
                        }
                    }
                }
                // Ahead only when all is stored; otherwise the same stretch again, from `from`.
                if taken {
                    match store.put_device_sync_token(&response.next_batch).await {
                        Ok(()) => from = None,
                        Err(e) => tracing::warn!(error = %e, "cannot store where the device's sync stands"),
                    }
                }
            }
        });
        let (this, stop) = (self.clone(), shutdown.clone());
        shutdown.spawn(async move {
            let Some(keys) = this.client.encryption().room_keys_received_stream().await else { return };
            tokio::pin!(keys);
            loop {
                let news = tokio::select! {
                    _ = stop.begun() => return,
                    n = keys.next() => n,
                };
                let rooms: Option<HashSet<OwnedRoomId>> = match news {
                    None => return,
                    Some(Ok(infos)) => Some(infos.into_iter().map(|i| i.room_id).collect()),
                    // Missed some: try every waiting event.
                    Some(Err(_)) => None,
                };
                for d in this.retry_undecrypted(rooms.as_ref()).await {
                    if let Err(e) = accept(d).await {
                        tracing::error!(error = %e, "cannot store a decrypted event: it is not handled");
                    }
                }
            }
        });
    }

    /// What the bot takes from one timeline event of its sync: a decrypted event, or nothing (a
    /// plain one comes in a transaction; one not decrypted yet waits for its keys).
    fn take(&self, room_id: &RoomId, event: TimelineEvent) -> Option<Decrypted> {
        let before_device = |ts: Option<u64>| ts.is_some_and(|t| t + 60_000 < self.created_ms);
        match event.kind {
            TimelineEventKind::Decrypted(d) => {
                let ts = d.event.get_field::<u64>("origin_server_ts").ok().flatten();
                if !is_message(&d.event) {
                    tracing::debug!(room_id = %room_id, "a decrypted event that is not a message is ignored");
                    return None;
                }
                (!before_device(ts)).then(|| Decrypted { room_id: room_id.to_owned(), event: d.event })
            }
            TimelineEventKind::UnableToDecrypt { event, utd_info } => {
                let ts = event.get_field::<u64>("origin_server_ts").ok().flatten();
                if !before_device(ts) {
                    tracing::debug!(room_id = %room_id, reason = ?utd_info.reason, "an encrypted event waits for its keys");
                    let sender = event.get_field::<OwnedUserId>("sender").ok().flatten();
                    let new = Undecrypted {
                        room_id: room_id.to_owned(),
                        sender,
                        event: event.cast_unchecked(),
                        since: Instant::now(),
                    };
                    keep_waiting(&mut self.undecrypted.lock().expect("lock"), new);
                }
                None
            }
            TimelineEventKind::PlainText { .. } => None,
        }
    }

    /// Tries again the waiting events of `rooms` (all, with `None`); returns those that decrypt.
    async fn retry_undecrypted(&self, rooms: Option<&HashSet<OwnedRoomId>>) -> Vec<Decrypted> {
        let candidates: Vec<(OwnedRoomId, Raw<OriginalSyncRoomEncryptedEvent>)> = {
            let waiting = self.undecrypted.lock().expect("lock");
            waiting
                .iter()
                .filter(|u| rooms.is_none_or(|r| r.contains(&u.room_id)))
                .map(|u| (u.room_id.clone(), u.event.clone()))
                .collect()
        };
        let mut out = Vec::new();
        for (room_id, event) in candidates {
            let Some(room) = self.client.get_room(&room_id) else { continue };
            let Ok(decrypted) = room.decrypt_event(&event, None).await else { continue };
            if let TimelineEventKind::Decrypted(d) = decrypted.kind {
                let id = event.get_field::<OwnedEventId>("event_id").ok().flatten();
                self.undecrypted
                    .lock()
                    .expect("lock")
                    .retain(|u| u.event.get_field::<OwnedEventId>("event_id").ok().flatten() != id);
                tracing::debug!(room_id = %room_id, "an encrypted event decrypted once its keys came");
                if is_message(&d.event) {
                    out.push(Decrypted { room_id, event: d.event });
                } else {
                    tracing::debug!(room_id = %room_id, "a decrypted event that is not a message is ignored");
                }
            }
        }
        out
    }

    /// Whether `room` is encrypted, as the device knows it; `None` if the device has not seen the
    /// bot's join yet (it joined through the appservice a moment ago, say).
    pub async fn is_encrypted(&self, room: &RoomId) -> Result<Option<bool>, HsError> {
        let Some(room) = self.joined(room) else { return Ok(None) };
        let state = match room.encryption_state() {
            EncryptionState::Unknown => room.latest_encryption_state().await.map_err(sdk_error)?,
            known => known,
        };
        Ok(Some(state.is_encrypted()))
    }

    /// The room, if the device knows the bot is in it (it can send there only then).
    fn joined(&self, room: &RoomId) -> Option<Room> {
        self.client.get_room(room).filter(|r| r.state() == RoomState::Joined)
    }

    /// Waits (a while) until the device's sync has brought the bot's join of `room`.
    pub async fn wait_for_room(&self, room: &RoomId, patience: Duration) -> bool {
        let until = Instant::now() + patience;
        while self.joined(room).is_none() {
            if Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        true
    }

    /// Sends `content` into the (encrypted) `room`, encrypted for its members' devices. The
    /// transaction ID makes a retried send land once. Counted in the homeserver request metrics
    /// as the one send it is (the key queries and key sharing it may take are not).
    pub async fn send(
        &self,
        room: &RoomId,
        txn_id: OwnedTransactionId,
        content: RoomMessageEventContent,
    ) -> Result<OwnedEventId, HsError> {
        let Some(room) = self.joined(room) else {
            return Err(HsError::Protocol(format!("the bot's device does not know it is in room {room}")));
        };
        let start = Instant::now();
        let sent = room.send(content).with_transaction_id(txn_id).await.map_err(sdk_error);
        let outcome = sent.as_ref().map_or_else(HsError::outcome, |_| Outcome::Ok);
        metrics::homeserver_request(SEND_ENDPOINT, outcome, start.elapsed());
        Ok(sent?.response.event_id)
    }

    /// Signs this device with the bot's cross-signing keys where it holds them and the device is
    /// not signed yet (a signature uploaded at start-up can race the device's own keys, under
    /// load, and be lost). Whether it tried.
    async fn sign_if_unsigned(&self) -> bool {
        let encryption = self.client.encryption();
        if self.cross_signed().await || !encryption.cross_signing_status().await.is_some_and(|s| s.has_self_signing) {
            return false;
        }
        match encryption.get_own_device().await {
            Ok(Some(own)) => {
                match own.verify().await {
                    Ok(()) => tracing::info!("signed the bot's device again with its cross-signing keys"),
                    Err(e) => tracing::warn!(error = %e, "cannot sign the bot's device with its cross-signing keys"),
                }
                true
            }
            _ => false,
        }
    }

    async fn cross_signed(&self) -> bool {
        matches!(self.client.encryption().get_own_device().await, Ok(Some(d)) if d.is_cross_signed_by_owner())
    }

    /// The device's state, for `/health`.
    pub async fn health(&self) -> serde_json::Value {
        let (last_ok, last_error) = {
            let h = self.health.lock().expect("lock");
            (h.last_ok.map(|t| t.elapsed().as_secs()), h.last_error)
        };
        // A sync answers within its long-poll; one that has not for a few of them is stuck.
        let syncing = last_ok.is_some_and(|s| s < 3 * SYNC_TIMEOUT.as_secs());
        serde_json::json!({
            "device_id": self.client.device_id().map(|d| d.to_string()),
            "cross_signed": self.cross_signed().await,
            "sync": if syncing { "ok" } else { last_error.map_or("not syncing", Problem::as_str) },
            "last_sync_seconds_ago": last_ok,
            "waiting_for_keys": self.undecrypted.lock().expect("lock").len(),
        })
    }
}

/// Logs in as a new device, records it (durably, before its crypto store exists), and clears
/// whatever crypto store was there.
async fn new_device(
    hs: &Homeserver,
    store: &Store,
    localpart: &str,
    path: &Path,
    recovery_key: Option<Secret>,
) -> Result<Record, DeviceError> {
    let login = hs.login_device(localpart, None, DISPLAY_NAME).await.map_err(refused)?;
    let passphrase: [u8; 32] = rand::random();
    let record = Record {
        device_id: login.device_id,
        access_token: Secret::new(login.access_token),
        passphrase: Secret::new(hex::encode(passphrase)),
        created_ms: now_ms(),
        recovery_key,
    };
    store.forget_device_sync_token().await?;
    save(store, &record).await?;
    if path.exists() {
        std::fs::remove_dir_all(path).map_err(|e| crypto_store(path, e))?;
    }
    tracing::info!(device_id = %record.device_id, "logged the bot in as a new device");
    Ok(record)
}

async fn save(store: &Store, record: &Record) -> Result<(), DeviceError> {
    let bytes = serde_json::to_vec(record).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    store.put_device_record(&bytes).await?;
    Ok(())
}

/// Builds the client on the crypto store and restores the device's session into it.
async fn open(config: &Config, path: &Path, record: &Record) -> Result<Client, matrix_sdk::Error> {
    let client = Client::builder()
        .homeserver_url(config.homeserver.address.as_str())
        .sqlite_store(path, Some(record.passphrase.expose()))
        .with_encryption_settings(EncryptionSettings { auto_enable_cross_signing: true, ..Default::default() })
        .request_config(RequestConfig::new().retry_limit(5).timeout(Duration::from_secs(60)))
        .build()
        .await
        .map_err(|e| matrix_sdk::Error::UnknownError(Box::new(e)))?;
    let session = MatrixSession {
        meta: SessionMeta { user_id: config.bot_user_id(), device_id: record.device_id.clone() },
        tokens: SessionTokens { access_token: record.access_token.expose().to_owned(), refresh_token: None },
    };
    client.matrix_auth().restore_session(session, RoomLoadSettings::default()).await?;
    Ok(client)
}

/// Moves a crypto store that does not open out of the way, beside it.
fn set_aside(path: &Path) -> Result<PathBuf, DeviceError> {
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".broken-{}", now_ms()));
    let aside = PathBuf::from(aside);
    std::fs::rename(path, &aside).map_err(|e| crypto_store(path, e))?;
    Ok(aside)
}

fn crypto_store(path: &Path, e: impl std::fmt::Display) -> DeviceError {
    DeviceError::CryptoStore { path: path.display().to_string(), message: e.to_string() }
}

/// A refused login is a deployment that can't give the bot a device (MAS, MSC4190).
fn refused(e: HsError) -> DeviceError {
    match e {
        HsError::Matrix { status, .. } if status.is_client_error() => DeviceError::LoginRefused(e),
        e => DeviceError::Homeserver(e),
    }
}

/// matrix-sdk's errors, as the rest of the crate sees the homeserver's.
pub fn sdk_error(e: matrix_sdk::Error) -> HsError {
    if let Some(api) = e.as_client_api_error() {
        let (kind, message) = match &api.body {
            ruma::api::error::ErrorBody::Standard(b) => (b.kind.clone(), b.message.clone()),
            other => (ErrorKind::Unknown, format!("{other:?}")),
        };
        return HsError::Matrix { status: api.status_code, errcode: kind.errcode().to_string(), kind, message };
    }
    match &e {
        matrix_sdk::Error::Http(h) if matches!(**h, matrix_sdk::HttpError::Reqwest(_)) => {
            HsError::Unreachable(e.to_string())
        }
        _ => HsError::Protocol(format!("the bot's device: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use matrix_sdk::deserialized_responses::{
        AlgorithmInfo, DecryptedRoomEvent, EncryptionInfo, UnableToDecryptInfo, UnableToDecryptReason,
        VerificationState,
    };
    use ruma::events::AnySyncTimelineEvent;
    use serde_json::{Value, json};

    /// A device of a client that never talks to a homeserver: what `take` decides is local.
    async fn offline(created_ms: u64) -> Device {
        let client = Client::builder().homeserver_url("http://127.0.0.1:9").build().await.unwrap();
        Device { client, created_ms, health: Arc::default(), undecrypted: Arc::default() }
    }

    fn raw_from(sender: &str, n: u64, ts: u64, kind: &str) -> Raw<AnySyncTimelineEvent> {
        Raw::from_json(
            serde_json::value::to_raw_value(&json!({
                "type": kind, "event_id": format!("$e{n}"), "sender": sender,
                "origin_server_ts": ts, "content": {"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "x",
                    "sender_key": "k", "device_id": "D", "session_id": "s"},
            }))
            .unwrap(),
        )
    }

    fn raw(n: u64, ts: u64, kind: &str) -> Raw<AnySyncTimelineEvent> {
        raw_from("@alice:example.org", n, ts, kind)
    }

    fn undecryptable_from(sender: &str, n: u64, ts: u64) -> TimelineEvent {
        let info = UnableToDecryptInfo {
            session_id: Some("s".into()),
            reason: UnableToDecryptReason::MalformedEncryptedEvent,
        };
        TimelineEvent::from_utd(raw_from(sender, n, ts, "m.room.encrypted"), info)
    }

    fn undecryptable(n: u64, ts: u64) -> TimelineEvent {
        undecryptable_from("@alice:example.org", n, ts)
    }

    /// An event as the device decrypts it: its payload (type, content, room, and whatever else
    /// the sender's client put there) with the encrypted event's sender, ID and time.
    fn decrypted(payload: Value, ts: u64) -> TimelineEvent {
        let mut event = payload;
        event["sender"] = "@mallory:example.org".into();
        event["event_id"] = "$d".into();
        event["origin_server_ts"] = ts.into();
        let encryption_info = EncryptionInfo {
            sender: "@mallory:example.org".try_into().unwrap(),
            sender_device: None,
            forwarder: None,
            algorithm_info: AlgorithmInfo::MegolmV1AesSha2 {
                curve25519_key: "k".into(),
                sender_claimed_keys: Default::default(),
                session_id: Some("s".into()),
            },
            verification_state: VerificationState::Verified,
        };
        let event = Raw::from_json(serde_json::value::to_raw_value(&event).unwrap());
        TimelineEvent::from_decrypted(
            DecryptedRoomEvent { event, encryption_info: Arc::new(encryption_info), unsigned_encryption_info: None },
            None,
        )
    }

    fn waiting_ids(device: &Device) -> Vec<String> {
        let waiting = device.undecrypted.lock().unwrap();
        waiting.iter().map(|u| u.event.get_field::<String>("event_id").unwrap().unwrap()).collect()
    }

    #[tokio::test]
    async fn only_encrypted_events_newer_than_the_device_wait_for_keys_and_never_too_many() {
        let created = 1_000_000_000;
        let device = offline(created).await;
        let room: OwnedRoomId = "!dm:example.org".try_into().unwrap();

        // A plain event is the transaction's: the device takes nothing.
        assert!(device.take(&room, TimelineEvent::from_plaintext(raw(0, created, "m.room.message"))).is_none());
        assert_eq!(device.undecrypted.lock().unwrap().len(), 0);

        // Encrypted for a device before this one (an initial sync's history): not kept.
        assert!(device.take(&room, undecryptable(1, created - 120_000)).is_none());
        assert_eq!(device.undecrypted.lock().unwrap().len(), 0);

        // Newer ones wait for their keys; one sender's flood keeps only its latest few.
        for n in 0..(MAX_UNDECRYPTED_PER_SENDER as u64 + 40) {
            assert!(device.take(&room, undecryptable(100 + n, created + n)).is_none());
        }
        let ids = waiting_ids(&device);
        assert_eq!(ids.len(), MAX_UNDECRYPTED_PER_SENDER);
        assert_eq!(ids[0], "$e140", "the oldest were dropped");

        // Without their keys, trying again decrypts nothing and keeps them waiting.
        assert!(device.retry_undecrypted(None).await.is_empty());
        assert_eq!(device.undecrypted.lock().unwrap().len(), MAX_UNDECRYPTED_PER_SENDER);
    }

    #[tokio::test]
    async fn a_flood_pushes_out_only_the_flooders_own_waiting_events() {
        let created = 1_000_000_000;
        let device = offline(created).await;
        let (dm, group): (OwnedRoomId, OwnedRoomId) =
            ("!dm:example.org".try_into().unwrap(), "!group:example.org".try_into().unwrap());
        // A user's command waits for its keys; then a member of another room floods.
        device.take(&dm, undecryptable_from("@alice:example.org", 1, created));
        for n in 0..1000 {
            device.take(&group, undecryptable_from("@flood:evil.org", 1000 + n, created + n));
        }
        let ids = waiting_ids(&device);
        assert!(ids.contains(&"$e1".to_owned()), "alice's command still waits");
        assert_eq!(ids.len(), 1 + MAX_UNDECRYPTED_PER_SENDER);

        // Many flooders: the global bound holds, and alice's one event is never the one to go
        // while anyone has more waiting.
        for n in 0..(MAX_UNDECRYPTED as u64 * 2) {
            let sender = format!("@flood{}:evil.org", n % 40);
            device.take(&group, undecryptable_from(&sender, 10_000 + n, created + n));
        }
        let ids = waiting_ids(&device);
        assert_eq!(ids.len(), MAX_UNDECRYPTED);
        assert!(ids.contains(&"$e1".to_owned()), "alice's command still waits");
    }

    #[tokio::test]
    async fn a_decrypted_event_is_taken_only_as_a_message() {
        let created = 1_000_000_000;
        let device = offline(created).await;
        let room: OwnedRoomId = "!dm:example.org".try_into().unwrap();
        let message =
            json!({"type": "m.room.message", "room_id": room, "content": {"msgtype": "m.text", "body": "help"}});
        assert!(device.take(&room, decrypted(message.clone(), created)).is_some(), "a message is taken");

        // A payload that says it is the bot's leave, or a DM invite from its sender: state, in
        // the sender's words only.
        for membership in ["leave", "invite"] {
            let member = json!({
                "type": "m.room.member", "room_id": room, "state_key": "@handoff:example.org",
                "content": {"membership": membership, "is_direct": true},
            });
            assert!(device.take(&room, decrypted(member, created)).is_none(), "{membership}");
        }
        // A message with a state key is state too; other types are nothing the bot handles.
        let mut keyed = message;
        keyed["state_key"] = "".into();
        assert!(device.take(&room, decrypted(keyed, created)).is_none());
        let reaction = json!({"type": "m.reaction", "room_id": room, "content": {}});
        assert!(device.take(&room, decrypted(reaction, created)).is_none());
    }
}
