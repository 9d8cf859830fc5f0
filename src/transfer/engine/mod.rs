//! The engine: runs transfers, one task each, many at once, their rooms drawing on one bounded
//! pool. A transfer is moved in parts: the first rooms (favourites and DMs) are read, planned and
//! moved before the rest of the account is even read, so the rooms that matter are usable first.
//! Each part goes in two passes, highest priority first: pass 1 takes every room's seat (invite,
//! join), pass 2 finishes them (rank, tags, notice). Then the account steps, then the report.
//! Every step is journaled before and after it runs; the engine only tells the [`Reporter`] how it
//! goes. At most `handoff.max_transfers` run at once; the others wait their turn in [`Line`].

mod lifecycle;
mod rooms;
mod run;
mod seats;
mod steps;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use super::PATIENT;
use super::account::AccountWork;
use super::journal::Journal;
use super::line::Line;
use super::progress::Reporter;
use super::room::RoomWork;
use crate::budget::Budget;
use crate::config::Config;
use crate::homeserver::{Homeserver, Retry};
use crate::shutdown::Shutdown;
use crate::store::Store;

/// Runs transfers: one task each, many at once, their rooms drawing on one bounded pool.
pub struct Engine {
    config: Arc<Config>,
    /// Acts as the old and (local) new accounts.
    acting: Homeserver,
    /// The bundles.
    store: Store,
    journal: Journal,
    reporter: Arc<dyn Reporter>,
    rooms: RoomWork,
    account: AccountWork,
    /// Transfers running in this process (with the handle that stops one at once), and those
    /// waiting for a place.
    line: Mutex<Line<tokio::task::AbortHandle>>,
    /// Each transfer's stop: cancelled when it is asked to stop (also persisted as `Cancelling`,
    /// for a restart); a room waiting for a server or its turn ends at once.
    cancelling: Mutex<HashMap<u64, CancellationToken>>,
    /// Work in flight across every transfer and capture (`handoff.concurrency`): what the
    /// homeserver sees stays bounded however many users move at once, and rooms are served by
    /// priority class, then in turn across transfers ([`Budget`]).
    budget: Arc<Budget>,
    shutdown: Shutdown,
}

impl Engine {
    pub fn new(
        config: Arc<Config>,
        acting: Homeserver,
        store: Store,
        journal: Journal,
        reporter: Arc<dyn Reporter>,
        shutdown: Shutdown,
    ) -> Arc<Self> {
        let acting = acting.with_retry(PATIENT);
        Arc::new(Engine {
            rooms: RoomWork {
                acting: acting.clone(),
                // Every failure of a request that needs another server counts against one clock
                // (`federation_patience`), kept by `RoomWork::across`: no retries of its own.
                remote: acting.with_retry(Retry::NONE),
                journal: journal.clone(),
                notify: config.handoff.notify.clone(),
                domain: config.homeserver.domain.clone(),
                patience: config.handoff.federation_patience,
                reach: Default::default(),
            },
            account: AccountWork { acting: acting.clone() },
            acting,
            store,
            journal,
            reporter,
            line: Mutex::new(Line::new(config.handoff.max_transfers.0)),
            cancelling: Mutex::new(HashMap::new()),
            budget: Budget::new(config.handoff.concurrency.0),
            shutdown,
            config,
        })
    }
}
