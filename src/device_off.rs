//! The bot's device in a build without the `e2ee` feature (the fuzz targets' build): there is
//! none. The bot works in unencrypted rooms, and says so in an encrypted one.

use std::future::Future;
use std::time::Duration;

use ruma::events::AnyTimelineEvent;
use ruma::events::room::message::RoomMessageEventContent;
use ruma::serde::Raw;
use ruma::{OwnedEventId, OwnedRoomId, OwnedTransactionId, RoomId};

use crate::config::Config;
use crate::homeserver::{Homeserver, HsError};
use crate::shutdown::Shutdown;
use crate::store::{Store, StoreError};

/// Whether the bot reads encrypted rooms: never, in this build.
#[derive(Clone)]
pub enum Encryption {
    Off,
    Unavailable(String),
}

impl Encryption {
    pub async fn start(config: &Config, _hs: &Homeserver, _store: &Store) -> Encryption {
        if !config.encryption.allow {
            return Encryption::Off;
        }
        let why = "this build of handoff has no encryption (built without the `e2ee` feature)";
        tracing::warn!("{why}: the bot works in unencrypted DMs only");
        Encryption::Unavailable(why.into())
    }

    pub fn device(&self) -> Option<&Device> {
        None
    }

    pub async fn health(&self) -> serde_json::Value {
        match self {
            Encryption::Off => serde_json::json!({"state": "off"}),
            Encryption::Unavailable(why) => serde_json::json!({"state": "unavailable", "reason": why}),
        }
    }
}

/// A command that arrived encrypted, decrypted (never, in this build).
pub struct Decrypted {
    pub room_id: OwnedRoomId,
    pub event: Raw<AnyTimelineEvent>,
}

/// An encrypted event that stayed undecryptable (never, in this build).
pub struct Unreadable {
    pub room_id: OwnedRoomId,
    pub event_id: OwnedEventId,
    pub sender: ruma::OwnedUserId,
}

/// No device can exist in this build: the type has no values.
#[derive(Clone)]
pub enum Device {}

impl Device {
    pub fn spawn_sync<F, Fut, G, GFut>(&self, _shutdown: &Shutdown, _store: Store, _accept: F, _unreadable: G)
    where
        F: Fn(Decrypted) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<(), StoreError>> + Send + 'static,
        G: Fn(Unreadable) -> GFut + Send + Sync + 'static,
        GFut: Future<Output = ()> + Send + 'static,
    {
        match *self {}
    }

    pub async fn is_encrypted(&self, _room: &RoomId) -> Result<Option<bool>, HsError> {
        match *self {}
    }

    pub async fn wait_for_room(&self, _room: &RoomId, _patience: Duration) -> bool {
        match *self {}
    }

    pub async fn send(
        &self,
        _room: &RoomId,
        _txn_id: OwnedTransactionId,
        _content: RoomMessageEventContent,
    ) -> Result<OwnedEventId, HsError> {
        match *self {}
    }
}
