//! The bot's own end-to-end encrypted device, for its encrypted DMs: whether the bot reads
//! encrypted rooms, as `serve` started it ([`Encryption`]), and what the device hands the bot
//! ([`event`]). Two builds of the device itself: with the `e2ee` feature, matrix-sdk's ([`sdk`]);
//! without it, one that never starts ([`off`]).

mod event;
#[cfg(not(feature = "e2ee"))]
mod off;
#[cfg(feature = "e2ee")]
mod sdk;

pub use event::{Decrypted, Unreadable, is_message};
#[cfg(not(feature = "e2ee"))]
pub use off::*;
#[cfg(feature = "e2ee")]
pub use sdk::*;

use crate::config::Config;
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
