//! The port through which the engine tells the people it works for how a transfer goes. The bot
//! renders it into the new account's DM with the bot; a device-side client would draw a progress
//! bar. The engine decides what happened; the renderer decides how it reads.

use futures_util::future::BoxFuture;
use ruma::{OwnedEventId, OwnedUserId};

use super::Transfer;
use super::arrivals::Awaited;
use super::pace::Paced;
use super::report::Report;
use super::undo::UndoReport;
use crate::bundle::HistoryMessage;
use crate::homeserver::HsError;

/// How far a transfer got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Rooms the new account has its seat in (pass 1 done).
    pub seated: usize,
    /// Rooms with their final step (moved, skipped or failed).
    pub done: usize,
    pub total: usize,
}

/// A waiting transfer's place in line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    /// Transfers waiting ahead of it.
    pub ahead: usize,
    /// Transfers running now.
    pub running: usize,
}

/// Why a transfer stopped before it did anything more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stopped {
    /// This account may no longer use handoff on this server.
    Revoked(OwnedUserId),
    /// The bundle is gone (forgotten, or past its retention).
    BundleGone,
    /// Cancelled while it waited for a place: nothing was done.
    CancelledWaiting,
}

/// Something handed over to the new account as a file.
pub enum Delivery<'a> {
    /// The old account's Element key export, still encrypted with its passphrase.
    RoomKeys { armored: &'a str },
    /// The last messages of the moved rooms (`import --history N`).
    History(Vec<RoomHistory<'a>>),
}

/// One room's part of a history delivery.
pub struct RoomHistory<'a> {
    pub title: String,
    pub messages: &'a [HistoryMessage],
    /// Encrypted messages, counted, not copied.
    pub encrypted: usize,
}

/// Where the engine's news goes. Every call may be repeated after a restart (the engine journals
/// what it did, not what it said): an implementation posts each message once per transfer.
pub trait Reporter: Send + Sync {
    /// Every place is taken: the transfer waits its turn, and starts by itself.
    fn waiting<'a>(&'a self, t: &'a Transfer, place: Place) -> BoxFuture<'a, Result<(), HsError>>;
    /// The transfer starts moving rooms: returns the message that later progress edits.
    fn started<'a>(&'a self, t: &'a Transfer, counts: Counts) -> BoxFuture<'a, Result<OwnedEventId, HsError>>;
    /// A room moved on (an implementation may skip some of these: the last one always comes).
    fn progress<'a>(&'a self, t: &'a Transfer, counts: Counts) -> BoxFuture<'a, Result<(), HsError>>;
    fn stopped<'a>(&'a self, t: &'a Transfer, why: Stopped) -> BoxFuture<'a, Result<(), HsError>>;
    /// Hands a file over; returns its name, for the report.
    fn deliver<'a>(&'a self, t: &'a Transfer, what: Delivery<'a>) -> BoxFuture<'a, Result<String, HsError>>;
    /// The transfer ended (done or cancelled): its report.
    fn finished<'a>(&'a self, t: &'a Transfer, report: &'a Report) -> BoxFuture<'a, Result<(), HsError>>;
    /// A reservation's invites are paced by the other server's limit (`Some`, said again once
    /// the rate is measured), or land at full speed again (`None`). By default, nothing is said.
    fn paced<'a>(
        &'a self,
        t: &'a Transfer,
        pace: Option<&'a Paced>,
        counts: Counts,
    ) -> BoxFuture<'a, Result<(), HsError>> {
        let _ = (t, pace, counts);
        Box::pin(async { Ok(()) })
    }
    /// A received bundle's rooms wait for the invites of the old account's server, which this
    /// server lets in at a limited rate (said once they have waited a while, and again once the
    /// rate is measured). By default, nothing is said.
    fn awaiting_invites<'a>(
        &'a self,
        t: &'a Transfer,
        awaited: &'a Awaited,
        counts: Counts,
    ) -> BoxFuture<'a, Result<(), HsError>> {
        let _ = (t, awaited, counts);
        Box::pin(async { Ok(()) })
    }
    /// A reservation's new account has taken (or declined) every seat: the move is complete.
    fn taken_up<'a>(&'a self, t: &'a Transfer, report: &'a Report) -> BoxFuture<'a, Result<(), HsError>>;
    /// An undo of the move starts: returns the message its report follows.
    fn undoing<'a>(&'a self, t: &'a Transfer) -> BoxFuture<'a, Result<OwnedEventId, HsError>> {
        let _ = t;
        Box::pin(async { Err(HsError::Protocol("this reporter does not report undos".into())) })
    }
    /// A room of the undo is done (an implementation may skip some: the last one always comes).
    fn undo_progress<'a>(&'a self, t: &'a Transfer, done: usize, total: usize) -> BoxFuture<'a, Result<(), HsError>> {
        let _ = (t, done, total);
        Box::pin(async { Ok(()) })
    }
    /// The undo ended: what went back and what was kept.
    fn undone<'a>(&'a self, t: &'a Transfer, report: &'a UndoReport) -> BoxFuture<'a, Result<(), HsError>> {
        let _ = (t, report);
        Box::pin(async { Ok(()) })
    }
}
