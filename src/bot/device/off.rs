//! The bot's device in a build without the `e2ee` feature (the fuzz targets' build): there is
//! none. The bot works in unencrypted rooms, and says so in an encrypted one.

use std::future::Future;
use std::time::Duration;

use ruma::events::room::message::RoomMessageEventContent;
use ruma::{OwnedEventId, OwnedTransactionId, RoomId};

use super::event::{Decrypted, Unreadable};
use crate::config::Config;
use crate::homeserver::{Homeserver, HsError};
use crate::shutdown::Shutdown;
use crate::store::{Store, StoreError};

/// Why there is no device: this build has none.
#[derive(Debug, thiserror::Error)]
#[error(
    "this build of handoff has no encryption (built without the `e2ee` feature): the bot works in unencrypted DMs only"
)]
pub struct DeviceError;

impl DeviceError {
    /// What `/health` says of it.
    pub fn summary(&self) -> String {
        self.to_string()
    }
}

/// No device can exist in this build: the type has no values.
#[derive(Clone)]
pub enum Device {}

impl Device {
    pub async fn start(_config: &Config, _hs: &Homeserver, _store: &Store) -> Result<Device, DeviceError> {
        Err(DeviceError)
    }

    pub fn spawn_sync<F, Fut, G, GFut>(&self, _shutdown: &Shutdown, _store: Store, _accept: F, _unreadable: G)
    where
        F: Fn(Decrypted) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<(), StoreError>> + Send + 'static,
        G: Fn(Unreadable) -> GFut + Send + Sync + 'static,
        GFut: Future<Output = ()> + Send + 'static,
    {
        match *self {}
    }

    pub async fn health(&self) -> serde_json::Value {
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
