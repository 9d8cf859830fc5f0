//! handoff: move a Matrix account's rooms, DMs, contacts, preferences and keys to another client or
//! account. See README.md for what it does and how to run it.
//!
//! Data flows one way: the homeserver pushes transactions to [`appservice`] (the HTTP edge), which
//! hands events to the [`bot`]; the bot talks back through [`homeserver`], the only client of the
//! homeserver; state lives in [`store`]. [`config`] and [`registration`] are the admin's side;
//! [`metrics`] is what they can watch. The bot's own end-to-end encrypted device
//! ([`bot::device`]) is a second client, for its encrypted DMs only. The user's own device side
//! (`handoff login/export/import`) is [`client`], driven from the command line ([`cli`]).

// matrix-sdk's futures are deep: without this, rustc 1.95 overflows proving a spawned sync `Send`.
#![recursion_limit = "256"]

pub mod appservice;
pub mod attachment;
pub mod bot;
pub mod budget;
pub mod bundle;
pub mod cli;
#[cfg(feature = "e2ee")]
pub mod client;
pub mod code;
pub mod config;
pub mod homeserver;
pub mod html;
pub mod keys;
pub mod metrics;
pub mod registration;
pub mod sandbox;
pub mod serve;
pub mod shutdown;
pub mod store;
pub mod transfer;
pub mod wording;
