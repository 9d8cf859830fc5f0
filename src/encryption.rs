//! Whether the bot reads encrypted rooms, as `serve` started it, and what the bot's device hands
//! the bot. Shared by both builds of [`crate::device`]: with the `e2ee` feature (matrix-sdk) and
//! without it (where no device can start).

use ruma::events::AnyTimelineEvent;
use ruma::serde::Raw;
use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId};

use crate::config::Config;
use crate::device::Device;
use crate::homeserver::Homeserver;
use crate::store::Store;

/// Whether the bot reads encrypted rooms, as `serve` started it.
#[derive(Clone)]
pub enum Encryption {
    /// `encryption.allow: false`.
    Off,
    /// Allowed, but the device could not start (the reason, for `/health`).
    Unavailable(String),
    On(Device),
}

impl Encryption {
    /// Starts the bot's device if the config allows one. A device that can't start is logged and
    /// leaves the bot working in unencrypted rooms.
    pub async fn start(config: &Config, hs: &Homeserver, store: &Store) -> Encryption {
        if !config.encryption.allow {
            tracing::info!("encryption.allow is off: the bot has no device and reads unencrypted rooms only");
            return Encryption::Off;
        }
        match Device::start(config, hs, store).await {
            Ok(device) => Encryption::On(device),
            Err(e) => {
                tracing::error!("{e}");
                // Not the error's text: it may name the homeserver's address or a path.
                Encryption::Unavailable(e.summary())
            }
        }
    }

    pub fn device(&self) -> Option<&Device> {
        match self {
            Encryption::On(d) => Some(d),
            _ => None,
        }
    }

    /// For `/health`.
    pub async fn health(&self) -> serde_json::Value {
        match self {
            Encryption::Off => serde_json::json!({"state": "off"}),
            Encryption::Unavailable(why) => serde_json::json!({"state": "unavailable", "reason": why}),
            Encryption::On(device) => {
                let mut h = device.health().await;
                h["state"] = "on".into();
                h
            }
        }
    }
}

/// A command that arrived encrypted, decrypted: handled like one from a transaction.
pub struct Decrypted {
    pub room_id: OwnedRoomId,
    pub event: Raw<AnyTimelineEvent>,
}

/// Whether a decrypted event is one the bot may take: a message. Inside the encryption the sender
/// writes the whole payload, `type` and all: an `m.room.member` with a `state_key` would read as
/// a membership change the room never had (the bot's leave, a DM's invite). State comes in the
/// clear, through the appservice's transactions, and nowhere else.
pub fn is_message(event: &Raw<AnyTimelineEvent>) -> bool {
    event.get_field::<String>("type").ok().flatten().as_deref() == Some("m.room.message")
        && matches!(event.get_field::<serde::de::IgnoredAny>("state_key"), Ok(None))
}

/// An encrypted event the device could not decrypt in time: its keys never reached this device
/// (the sender's client did not know the device yet, or withheld them).
pub struct Unreadable {
    pub room_id: OwnedRoomId,
    pub event_id: OwnedEventId,
    pub sender: OwnedUserId,
}
