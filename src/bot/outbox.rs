//! Where the bot's messages leave: into an encrypted room through the bot's own device,
//! encrypted for the members' devices; into any other room through the appservice, as before.
//! Nothing the bot says goes into an encrypted room in plaintext.

use std::time::Duration;

use ruma::api::client::membership::join_room_by_id;
use ruma::api::client::message::send_message_event;
use ruma::api::client::state::get_state_event_for_key;
use ruma::api::error::ErrorKind;
use ruma::events::StateEventType;
use ruma::events::room::message::RoomMessageEventContent;
use ruma::{OwnedEventId, OwnedTransactionId, RoomId};

use super::device::Device;
use crate::homeserver::{Homeserver, HsError, Retry};

/// How long a send waits for the device's sync to bring a room the bot joined a moment ago.
const ROOM_PATIENCE: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct Outbox {
    /// The main registration's client: it acts as the bot.
    hs: Homeserver,
    /// The bot's device, if it has one (`encryption.allow`, and the homeserver let it log in).
    device: Option<Device>,
}

impl Outbox {
    pub fn new(hs: Homeserver, device: Option<Device>) -> Outbox {
        Outbox { hs, device }
    }

    /// The same outbox, retrying plain sends and uploads as `retry` says.
    pub fn with_retry(&self, retry: Retry) -> Outbox {
        Outbox { hs: self.hs.with_retry(retry), device: self.device.clone() }
    }

    /// The bot's client, for what is not a message (uploads, downloads, state).
    pub fn hs(&self) -> &Homeserver {
        &self.hs
    }

    pub fn device(&self) -> Option<&Device> {
        self.device.as_ref()
    }

    /// Whether the bot can read and write `room`: it is not encrypted, or the bot has a device.
    pub async fn can_read(&self, room: &RoomId) -> Result<bool, HsError> {
        Ok(self.device.is_some() || !self.room_is_encrypted(room).await?)
    }

    /// Sends `content` into `room` as the bot. `txn_id` makes a retried send land once.
    pub async fn send(
        &self,
        room: &RoomId,
        txn_id: OwnedTransactionId,
        content: RoomMessageEventContent,
    ) -> Result<OwnedEventId, HsError> {
        if let Some(device) = &self.device {
            let encrypted = match device.is_encrypted(room).await? {
                Some(encrypted) => encrypted,
                // The device has not seen the room yet: the room's state says, and if it is
                // encrypted the device's sync brings it in a moment.
                None => {
                    let encrypted = self.room_is_encrypted(room).await?;
                    if encrypted && !device.wait_for_room(room, ROOM_PATIENCE).await {
                        return Err(HsError::Protocol(format!(
                            "the bot's device has not caught up with the encrypted room {room} yet; nothing was sent"
                        )));
                    }
                    encrypted
                }
            };
            if encrypted {
                return device.send(room, txn_id, content).await;
            }
        }
        let request = send_message_event::v3::Request::new(room.to_owned(), txn_id, &content)
            .map_err(|e| HsError::Protocol(e.to_string()))?;
        Ok(self.hs.send(request).await?.event_id)
    }

    /// Joins `room` as the bot. The device's sync learns of the join at once (its long-poll wakes
    /// for it); a message sent before that waits for it ([`Outbox::send`]).
    pub async fn join(&self, room: &RoomId) -> Result<(), HsError> {
        self.hs.send(join_room_by_id::v3::Request::new(room.to_owned())).await.map(|_| ())
    }

    /// Whether `room` has `m.room.encryption`, read as the bot (a member).
    async fn room_is_encrypted(&self, room: &RoomId) -> Result<bool, HsError> {
        let req =
            get_state_event_for_key::v3::Request::new(room.to_owned(), StateEventType::RoomEncryption, String::new());
        match self.hs.send(req).await {
            Ok(_) => Ok(true),
            Err(e) if matches!(e.kind(), Some(ErrorKind::NotFound)) => Ok(false),
            Err(e) => Err(e),
        }
    }
}
