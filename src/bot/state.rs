//! What every command handler works with: the bot's clients, records and limits, the message a
//! command came in ([`Ctx`]), how the bot replies, and the one error type of the bot's layer.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ruma::events::AnyTimelineEvent;
use ruma::events::room::message::RoomMessageEventContent;
use ruma::serde::Raw;
use ruma::{OwnedEventId, OwnedRoomId, OwnedTransactionId, OwnedUserId, UserId};
use sha2::{Digest, Sha256};

use super::outbox::Outbox;
use super::queue::UserQueues;
use crate::config::Config;
use crate::homeserver::{Homeserver, HsError};
use crate::html::to_html;
use crate::shutdown::Shutdown;
use crate::store::{Store, StoreError};
use crate::transfer::engine::Engine;
use crate::transfer::journal::Journal;

/// Why handling an event failed, told to the user in one line. Mapped once, where the event's
/// handling ends: the log gets the details (`{:?}`), the user what happened.
#[derive(Debug, thiserror::Error)]
pub enum BotError {
    #[error("{0}")]
    Homeserver(#[from] HsError),
    #[error("the server's database failed; nothing more was done (the server's log has the details)")]
    Store(#[from] StoreError),
}

impl From<crate::transfer::Error> for BotError {
    fn from(e: crate::transfer::Error) -> Self {
        match e {
            crate::transfer::Error::Hs(e) => BotError::Homeserver(e),
            crate::transfer::Error::Store(e) => BotError::Store(e),
            missing @ crate::transfer::Error::Missing(_) => {
                BotError::Homeserver(HsError::Protocol(missing.to_string()))
            }
        }
    }
}

pub struct Bot {
    pub(in crate::bot) config: Arc<Config>,
    pub(in crate::bot) user_id: OwnedUserId,
    /// The main registration's client: it acts as the bot.
    pub(in crate::bot) hs: Homeserver,
    /// Where the bot's messages leave (encrypted rooms through its device).
    pub(in crate::bot) outbox: Outbox,
    /// The acting registration's client: it acts as local users.
    pub(in crate::bot) acting: Homeserver,
    pub(in crate::bot) store: Store,
    pub(in crate::bot) journal: Journal,
    pub(in crate::bot) engine: Arc<Engine>,
    pub(in crate::bot) wrong_codes: WrongCodes,
    pub(in crate::bot) queues: Arc<UserQueues<OwnedUserId, Job>>,
    /// Users whose `export` is capturing right now (one at a time each).
    pub(in crate::bot) exports: Mutex<HashSet<OwnedUserId>>,
    /// Serialises the read-check-write of consent records (codes, offers, transfers), which two
    /// users' queues may touch at once. Never held across a request to the homeserver.
    pub(in crate::bot) records: tokio::sync::Mutex<()>,
    /// Every background task of the bot is spawned here, so a stop waits for it.
    pub(in crate::bot) shutdown: Shutdown,
    /// Inbox events being handled now: a clean stop that interrupts one does not count it as
    /// an attempt that killed the process.
    pub(in crate::bot) in_hand: Mutex<HashSet<u64>>,
    /// Takes the homeserver's transactions into the inbox.
    pub(in crate::bot) intake: super::intake::Intake,
    /// Held while events are taken into the inbox and queued, and while the shared inbox is
    /// read for events another instance took: each event is queued once.
    pub(in crate::bot) intake_lock: tokio::sync::Mutex<()>,
    /// The inbox numbers queued by this process (events waiting or in hand).
    pub(in crate::bot) queued: Mutex<std::collections::BTreeSet<u64>>,
}

/// Work in a user's queue.
pub enum Job {
    /// An event the homeserver pushed; `inbox` is its number in the store's inbox.
    Event { inbox: u64, event: Raw<AnyTimelineEvent> },
    /// Offer this (new) account the move another account prepared for it (`export --to … --auto`).
    Offer(OwnedUserId),
}

/// The message a command or file came in.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub room_id: OwnedRoomId,
    pub event_id: OwnedEventId,
    pub sender: OwnedUserId,
}

impl Bot {
    pub fn new(
        config: Arc<Config>,
        outbox: Outbox,
        acting: Homeserver,
        store: Store,
        journal: Journal,
        engine: Arc<Engine>,
        shutdown: Shutdown,
    ) -> Self {
        let intake =
            super::intake::Intake::new(store.clone(), config.bot_user_id(), config.handoff.command_prefix.clone());
        Bot {
            intake,
            intake_lock: tokio::sync::Mutex::new(()),
            queued: Mutex::new(Default::default()),
            user_id: config.bot_user_id(),
            config,
            hs: outbox.hs().clone(),
            outbox,
            acting,
            store,
            journal,
            engine,
            wrong_codes: WrongCodes::default(),
            queues: Arc::new(UserQueues::new(shutdown.clone())),
            exports: Mutex::new(HashSet::new()),
            records: tokio::sync::Mutex::new(()),
            shutdown,
            in_hand: Mutex::new(HashSet::new()),
        }
    }

    pub fn user_id(&self) -> &UserId {
        &self.user_id
    }

    /// Replies with a notice; `backtick` spans become `<code>` in the HTML body.
    pub async fn reply(&self, ctx: &Ctx, text: String) -> Result<(), BotError> {
        self.reply_n(ctx, 0, text).await
    }

    /// The `n`th reply to the same message (each gets its own transaction ID).
    pub async fn reply_n(&self, ctx: &Ctx, n: u32, text: String) -> Result<(), BotError> {
        let html = to_html(&text);
        self.send_notice(ctx, n, RoomMessageEventContent::notice_html(text, html)).await
    }

    /// Sends a message caused by `ctx.event_id`. The transaction ID is derived from the cause, so a
    /// retried or replayed event can't produce a second reply.
    pub async fn send_notice(&self, ctx: &Ctx, n: u32, content: RoomMessageEventContent) -> Result<(), BotError> {
        self.outbox.send(&ctx.room_id, reply_txn_id(&ctx.event_id, n), content).await?;
        Ok(())
    }
}

pub(crate) fn reply_txn_id(cause: &ruma::EventId, n: u32) -> OwnedTransactionId {
    let digest = Sha256::digest(cause.as_str().as_bytes());
    format!("handoff-{}-{n}", hex::encode(&digest[..12])).into()
}

/// Wrong codes allowed per user in [`WRONG_CODE_WINDOW`] before `import` is refused for a while.
pub const WRONG_CODE_LIMIT: usize = 5;
const WRONG_CODE_WINDOW: Duration = Duration::from_secs(600);

/// Remembers each user's recent wrong codes. By hand rather than with a rate-limiting crate:
/// only wrong codes count (a rate limiter counts every attempt), and a user over the limit is
/// refused before the code is even looked at (a brute force learns nothing more).
#[derive(Default)]
pub struct WrongCodes(Mutex<HashMap<OwnedUserId, Vec<Instant>>>);

impl WrongCodes {
    pub fn recent(&self, user: &UserId) -> usize {
        let mut map = self.0.lock().expect("lock");
        let Some(list) = map.get_mut(user) else { return 0 };
        list.retain(|t| t.elapsed() < WRONG_CODE_WINDOW);
        let n = list.len();
        // Users with no recent wrong code are not remembered.
        if n == 0 {
            map.remove(user);
        }
        n
    }
    pub fn record(&self, user: &UserId) {
        let mut map = self.0.lock().expect("lock");
        // Everyone's old entries go now and then, so users who never come back are forgotten.
        map.retain(|_, list| {
            list.retain(|t| t.elapsed() < WRONG_CODE_WINDOW);
            !list.is_empty()
        });
        map.entry(user.to_owned()).or_default().push(Instant::now());
    }
}

impl WrongCodes {
    /// Drops what is remembered about `user` (for `forget`).
    pub fn forget(&self, user: &UserId) {
        self.0.lock().expect("lock").remove(user);
    }
}
