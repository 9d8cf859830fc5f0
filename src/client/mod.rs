//! The device side of a move, a Matrix client of the person's own accounts: the [`session`] it
//! logs in and keeps, and what `handoff export` and `handoff import` do with it, with the bundle on
//! disk. Room by room, the import runs the service's own stages
//! ([`RoomWork`](crate::transfer::room::RoomWork)) through these sessions. The same bundle, the
//! same planner and the same merges as the service's; what only a device can do is carry the
//! keys that decrypt the account's history ([`room_keys`]).

pub mod export;
pub mod import;
pub mod pace;
pub mod room_keys;
pub mod session;
pub mod undo;

pub use export::{ExportOptions, Exported, export, read_room_keys};
