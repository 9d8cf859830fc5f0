//! The engine: runs transfers, one task each, many at once, their rooms drawing on one bounded
//! pool. A transfer is moved in parts: the first rooms (favourites and DMs) are read, planned and
//! moved before the rest of the account is even read, so the rooms that matter are usable first.
//! Each part goes in two passes, highest priority first: pass 1 takes every room's seat (invite,
//! join), pass 2 finishes them (rank, tags, notice). Then the account steps, then the report.
//! Every step is journaled before and after it runs; the engine only tells the [`Reporter`] how it
//! goes. At most `handoff.max_transfers` run at once; the others wait their turn in [`Line`].
//!
//! Its parts: `lifecycle` (the line and the tasks: spawn, stop, cancel, resume), `run` (one
//! transfer, from its record to its report), `rooms` (the two passes), `steps` (the account steps
//! and the deliveries) and `seats` (after a reservation, the seat watch and the withdrawals).

mod lifecycle;
mod rooms;
mod run;
mod seats;
mod steps;
mod undo;

pub use undo::begin as begin_undo;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use super::PATIENT;
use super::account::AccountWork;
use super::arrivals::{self, Arrivals};
use super::journal::{Journal, RoomJournal};
use super::line::Line;
use super::progress::Reporter;
use super::room::{Accounts, EncryptedNotice, RoomWork};
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
                accounts: Accounts::Service {
                    acting: acting.clone(),
                    // Every failure of a request that needs another server counts against one
                    // clock (`federation_patience`), kept by `RoomWork::across`: no retries of its own.
                    remote: acting.with_retry(Retry::NONE),
                    domain: config.homeserver.domain.clone(),
                },
                journal: RoomJournal::Sled(journal.clone()),
                notify: Some(config.handoff.notify.clone()),
                patience: config.handoff.federation_patience,
                invites_patience: arrivals::QUIET,
                arrivals: Arrivals::default(),
                reach: Default::default(),
                pace: Default::default(),
                encrypted_notice: EncryptedNotice::Mark,
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

/// An engine without Synapse: a homeserver that only says its versions (a test that reaches
/// further fails loudly), a store in a temporary folder, and a reporter that writes down what
/// it is told.
#[cfg(test)]
mod testing {
    use std::sync::{Arc, Mutex};

    use axum::Json;
    use axum::routing::get;
    use futures_util::future::BoxFuture;
    use ruma::{OwnedEventId, OwnedUserId};
    use serde_json::json;

    use super::Engine;
    use crate::bundle::BundleId;
    use crate::config::Config;
    use crate::homeserver::{Homeserver, HsError};
    use crate::shutdown::Shutdown;
    use crate::store::Store;
    use crate::transfer::arrivals::Awaited;
    use crate::transfer::journal::Journal;
    use crate::transfer::progress::{Counts, Delivery, Place, Reporter, Stopped};
    use crate::transfer::report::Report;
    use crate::transfer::{Transfer, TransferState};

    /// What the engine told the people it works for, in order.
    #[derive(Default)]
    pub(crate) struct Told(pub Mutex<Vec<String>>);

    impl Told {
        pub fn said(&self) -> Vec<String> {
            self.0.lock().unwrap().clone()
        }
        fn note(&self, what: String) {
            self.0.lock().unwrap().push(what);
        }
    }

    impl Reporter for Told {
        fn waiting<'a>(&'a self, t: &'a Transfer, place: Place) -> BoxFuture<'a, Result<(), HsError>> {
            self.note(format!("{} waiting {} ahead", t.id, place.ahead));
            Box::pin(async { Ok(()) })
        }
        fn started<'a>(&'a self, t: &'a Transfer, _: Counts) -> BoxFuture<'a, Result<OwnedEventId, HsError>> {
            self.note(format!("{} started", t.id));
            Box::pin(async { Ok(ruma::owned_event_id!("$status")) })
        }
        fn progress<'a>(&'a self, _: &'a Transfer, _: Counts) -> BoxFuture<'a, Result<(), HsError>> {
            Box::pin(async { Ok(()) })
        }
        fn stopped<'a>(&'a self, t: &'a Transfer, why: Stopped) -> BoxFuture<'a, Result<(), HsError>> {
            self.note(format!("{} stopped {why:?}", t.id));
            Box::pin(async { Ok(()) })
        }
        fn deliver<'a>(&'a self, t: &'a Transfer, _: Delivery<'a>) -> BoxFuture<'a, Result<String, HsError>> {
            self.note(format!("{} delivered", t.id));
            Box::pin(async { Ok("file".to_owned()) })
        }
        fn finished<'a>(&'a self, t: &'a Transfer, _: &'a Report) -> BoxFuture<'a, Result<(), HsError>> {
            self.note(format!("{} finished", t.id));
            Box::pin(async { Ok(()) })
        }
        fn awaiting_invites<'a>(
            &'a self,
            t: &'a Transfer,
            a: &'a Awaited,
            c: Counts,
        ) -> BoxFuture<'a, Result<(), HsError>> {
            let rate = if a.every.is_some() { "at a measured rate" } else { "" };
            self.note(format!("{} {} joined, {} awaiting invites {rate}", t.id, c.seated, a.waiting));
            Box::pin(async { Ok(()) })
        }
        fn taken_up<'a>(&'a self, t: &'a Transfer, _: &'a Report) -> BoxFuture<'a, Result<(), HsError>> {
            self.note(format!("{} taken up", t.id));
            Box::pin(async { Ok(()) })
        }
    }

    pub(crate) struct Harness {
        pub engine: Arc<Engine>,
        pub journal: Journal,
        pub told: Arc<Told>,
        _dir: tempfile::TempDir,
    }

    impl Harness {
        /// An engine for `example.org` (whose users may use handoff) with `places` transfers at once.
        pub async fn new(places: usize) -> Harness {
            let app = axum::Router::new()
                .route("/_matrix/client/versions", get(|| async { Json(json!({"versions": ["v1.11"]})) }));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
            let acting = Homeserver::connect(&url, "token", reqwest::Client::new()).await.unwrap();
            Harness::on(places, acting)
        }

        /// The same, acting through `acting` (the in-memory homeserver's client, say).
        pub fn on(places: usize, acting: Homeserver) -> Harness {
            let yaml = include_str!("../../../bridge-config.yaml")
                .replace("max_transfers: 32", &format!("max_transfers: {places}"));
            let config = Arc::new(Config::parse(&yaml).unwrap());
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(&dir.path().join("db")).unwrap();
            let journal = Journal::new(store.clone());
            let told = Arc::new(Told::default());
            let engine = Engine::new(config, acting, store, journal.clone(), told.clone(), Shutdown::new());
            Harness { engine, journal, told, _dir: dir }
        }

        /// A transfer from `old` to `@new:example.org` of a bundle that was never stored, journaled.
        pub async fn transfer(&self, old: &str) -> Transfer {
            let old: OwnedUserId = old.try_into().unwrap();
            let id = self.journal.new_id().await.unwrap();
            let t = Transfer::new(
                id,
                old.clone(),
                "@new:example.org".try_into().unwrap(),
                BundleId::new(&old, id),
                Default::default(),
                "!dm:example.org".try_into().unwrap(),
                None,
            );
            self.journal.put(&t).await.unwrap();
            t
        }

        pub async fn state(&self, id: u64) -> TransferState {
            self.journal.get(id).await.unwrap().unwrap().state
        }

        /// Waits (a few seconds at most) until transfer `id` is in `state`.
        pub async fn until(&self, id: u64, state: TransferState) {
            for _ in 0..200 {
                if self.state(id).await == state {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            panic!("transfer {id} stayed {:?}, not {state:?}", self.state(id).await);
        }
    }
}
