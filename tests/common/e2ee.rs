//! A user's own client with end-to-end encryption: matrix-sdk with its own device and crypto
//! store, which the project did not write. It creates DMs the way Element does once the other
//! side has device keys (encrypted from creation), and reads what the bot says by decrypting it.
//! Only the tests that need it include it (`#[path]`): matrix-sdk's futures need a higher
//! recursion limit in every crate that spawns them.
#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use matrix_sdk::attachment::AttachmentConfig;
use matrix_sdk::config::SyncSettings;
use matrix_sdk::deserialized_responses::TimelineEventKind;
use matrix_sdk::room::MessagesOptions;
use matrix_sdk::{Client, Room};
use ruma::events::room::message::{MessageType, RoomMessageEventContent};
use ruma::{OwnedRoomId, RoomId, UserId};
use serde_json::Value;

use crate::common::PATIENCE;

/// A message as this client shows it: decrypted if it came encrypted.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The (decrypted) event.
    pub event: Value,
    /// It arrived as `m.room.encrypted`.
    pub encrypted: bool,
}

impl Seen {
    pub fn body(&self) -> &str {
        self.event["content"]["body"].as_str().unwrap_or("")
    }
}

/// One logged-in device of a user, syncing in the background.
pub struct E2eeClient {
    pub client: Client,
    sync: tokio::task::JoinHandle<()>,
    _store: Option<tempfile::TempDir>,
}

impl E2eeClient {
    /// Logs `user` in with its password as a new device with a fresh crypto store.
    pub async fn login(homeserver: &str, user: &UserId, password: &str) -> E2eeClient {
        let store = tempfile::tempdir().unwrap();
        let client = Client::builder()
            .homeserver_url(homeserver)
            .sqlite_store(store.path(), Some("the test client's passphrase"))
            .build()
            .await
            .unwrap();
        client
            .matrix_auth()
            .login_username(user.localpart(), password)
            .initial_device_display_name("test client")
            .await
            .unwrap();
        client.sync_once(SyncSettings::default()).await.unwrap();
        let syncing = client.clone();
        let sync = tokio::spawn(async move {
            let _ = syncing.sync(SyncSettings::default().timeout(Duration::from_secs(2))).await;
        });
        E2eeClient { client, sync, _store: Some(store) }
    }

    /// The device of a session `handoff login` keeps in `dir` (`accounts/<user>`), opened from
    /// its store as the command line left it, and syncing.
    pub async fn open_session(dir: &Path) -> E2eeClient {
        let saved: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("session.json")).unwrap()).unwrap();
        let text = |k: &str| saved[k].as_str().unwrap().to_owned();
        let client = Client::builder()
            .homeserver_url(text("homeserver"))
            .sqlite_store(dir.join("store"), Some(&text("passphrase")))
            .build()
            .await
            .unwrap();
        let session = matrix_sdk::authentication::matrix::MatrixSession {
            meta: matrix_sdk::SessionMeta {
                user_id: text("user_id").try_into().unwrap(),
                device_id: text("device_id").into(),
            },
            tokens: matrix_sdk::SessionTokens { access_token: text("access_token"), refresh_token: None },
        };
        client.matrix_auth().restore_session(session, matrix_sdk::store::RoomLoadSettings::default()).await.unwrap();
        client.sync_once(SyncSettings::default()).await.unwrap();
        let syncing = client.clone();
        let sync = tokio::spawn(async move {
            let _ = syncing.sync(SyncSettings::default().timeout(Duration::from_secs(2))).await;
        });
        E2eeClient { client, sync, _store: None }
    }

    /// A DM with `other`, encrypted from creation.
    pub async fn create_dm(&self, other: &UserId) -> OwnedRoomId {
        let room = self.client.create_dm(other).await.unwrap();
        assert!(room.latest_encryption_state().await.unwrap().is_encrypted(), "the DM is encrypted");
        room.room_id().to_owned()
    }

    /// The room, once this client's sync has it.
    pub async fn room(&self, room: &RoomId) -> Room {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(r) = self.client.get_room(room) {
                return r;
            }
            assert!(Instant::now() < deadline, "{room} never reached the client");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Sends `text` into `room` (encrypted if the room is).
    pub async fn send_text(&self, room: &RoomId, text: &str) {
        self.room(room).await.send(RoomMessageEventContent::text_plain(text)).await.unwrap();
    }

    /// Sends `bytes` as a file; matrix-sdk encrypts it (and its event) in an encrypted room.
    pub async fn send_file(&self, room: &RoomId, name: &str, bytes: Vec<u8>) {
        let mime: mime::Mime = "text/plain".parse().unwrap();
        self.room(room).await.send_attachment(name, &mime, bytes, AttachmentConfig::new()).await.unwrap();
    }

    /// The room's last 200 messages from `sender`, oldest first, as this client shows them
    /// (edits left out: they change a message, they are not new ones).
    pub async fn messages_from(&self, room: &RoomId, sender: &UserId) -> Vec<Seen> {
        let room = self.room(room).await;
        let mut options = MessagesOptions::backward();
        options.limit = 200u32.into();
        let messages = room.messages(options).await.unwrap();
        let mut seen: Vec<Seen> = messages
            .chunk
            .into_iter()
            .filter_map(|e| {
                let (event, encrypted) = match e.kind {
                    TimelineEventKind::Decrypted(d) => (d.event.deserialize_as::<Value>().ok()?, true),
                    TimelineEventKind::UnableToDecrypt { event, .. } => (event.deserialize_as::<Value>().ok()?, true),
                    TimelineEventKind::PlainText { event } => (event.deserialize_as::<Value>().ok()?, false),
                };
                Some(Seen { event, encrypted })
            })
            .filter(|s| s.event["sender"] == sender.as_str())
            .filter(|s| s.event["content"]["m.relates_to"]["rel_type"] != "m.replace")
            .collect();
        seen.reverse();
        seen
    }

    /// Waits for a message from `sender` in `room`, after the first `skip`, that satisfies `matches`.
    pub async fn wait_for(
        &self,
        room: &RoomId,
        sender: &UserId,
        skip: usize,
        what: &str,
        matches: impl Fn(&Seen) -> bool,
    ) -> Seen {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let msgs = self.messages_from(room, sender).await;
            if let Some(m) = msgs.iter().skip(skip).find(|m| matches(m)) {
                return m.clone();
            }
            assert!(Instant::now() < deadline, "waited {PATIENCE:?} for {what} in {room}; saw {msgs:#?}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Sends `command` and waits for the bot's answer containing `expect`, which must have come
    /// encrypted; returns its text.
    pub async fn ask(&self, room: &RoomId, bot: &UserId, command: &str, expect: &str) -> String {
        let before = self.messages_from(room, bot).await.len();
        self.send_text(room, command).await;
        let what = format!("an answer to `{command}` containing {expect:?}");
        let answer = self.wait_for(room, bot, before, &what, |m| m.body().contains(expect)).await;
        assert!(answer.encrypted, "the answer came in plaintext: {answer:?}");
        answer.body().to_owned()
    }

    /// Downloads and decrypts the file of `seen` (an `m.file`), as a client does.
    pub async fn file(&self, seen: &Seen) -> Vec<u8> {
        let content: RoomMessageEventContent = serde_json::from_value(seen.event["content"].clone()).unwrap();
        let MessageType::File(file) = content.msgtype else { panic!("not a file: {seen:?}") };
        self.client.media().get_file(&file, false).await.unwrap().expect("the file has content")
    }

    /// Sets up recovery (secret storage and key backup) for the account; returns the recovery
    /// key, once the keys this device has are backed up.
    pub async fn enable_recovery(&self) -> String {
        let key = self.client.encryption().recovery().enable().wait_for_backups_to_upload().await.unwrap();
        self.client.encryption().backups().wait_for_steady_state().await.unwrap();
        key
    }

    /// Unlocks the account's secret storage and key backup with its recovery key, and fetches the
    /// backed-up keys of `room`, as a client does on a new device.
    pub async fn recover(&self, key: &str, room: &RoomId) {
        self.client.encryption().recovery().recover(key).await.unwrap();
        self.client.encryption().backups().download_room_keys_for_room(room).await.unwrap();
    }

    /// Imports an Element key-export file into this device.
    pub async fn import_keys(&self, path: &Path, passphrase: &str) -> usize {
        let imported = self.client.encryption().import_room_keys(path.to_owned(), passphrase).await.unwrap();
        imported.imported_count
    }
}

impl Drop for E2eeClient {
    fn drop(&mut self) {
        self.sync.abort();
    }
}
