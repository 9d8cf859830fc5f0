//! The device side of a move: what `handoff export` and `handoff import` do with a person's own
//! session ([`Session`](crate::session::Session)), with the bundle on disk. The same bundle, the
//! same planner and the same merges as the service's; what only a device can do is carry the
//! keys that decrypt the account's history ([`room_keys`]).

pub mod export;
pub mod import;
pub mod room_keys;

pub use export::{ExportOptions, Exported, export, read_room_keys};
