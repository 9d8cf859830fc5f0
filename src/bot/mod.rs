//! The bot: decides which pushed events are for it, runs commands, replies.
//!
//! Every event the bot acts on is accepted into the store's inbox together with its transaction
//! (so the homeserver gets its 200 at once, and a crash loses nothing), then handled in its
//! sender's own ordered queue ([`queue`]): one user's slow command or flood never delays another
//! user, and an error or a panic while handling one event ends that event alone, with a reply.

pub mod commands;
mod consent;
pub mod device;
pub mod door;
pub mod intake;
mod keys;
pub mod outbox;
pub mod progress;
pub mod queue;
mod receive;
mod state;

use std::sync::Arc;
use std::time::Duration;

use ruma::api::client::device::get_devices;
use ruma::api::client::membership::leave_room;
use ruma::events::room::member::{MembershipState, RoomMemberEventContent};
use ruma::events::room::message::{MessageType, Relation, RoomMessageEventContent};
use ruma::events::{
    AnyMessageLikeEvent, AnyStateEvent, AnyTimelineEvent, MessageLikeEvent, OriginalMessageLikeEvent,
    OriginalStateEvent, StateEvent,
};
use ruma::serde::Raw;
use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};

use crate::code::TransferCode;
use crate::config::PermissionLevel;
use crate::html::escape;
use crate::metrics;
use crate::store::{StoreError, now_ms};
use commands::Place;
use device::{Decrypted, Unreadable, is_message};
use queue::Queued;

/// How often the leader looks for events a standby took into a shared inbox.
pub const SHARED_INBOX_EVERY: Duration = Duration::from_millis(500);
pub use state::{Bot, BotError, Ctx, Job};

/// Who an event is for the bot from, as [`addressed`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addressed {
    pub sender: OwnedUserId,
    /// The event invites the bot into a DM (`is_direct`): this room.
    pub dm_invite: Option<OwnedRoomId>,
}

/// The bot's filter of pushed events, whatever a remote server put in them: an invite or leave of
/// the bot (`me`), or a message for it — from someone else in their DM with the bot (`dm_owner`
/// says whose DM a room is), or a command (with `prefix`) in any other room: the chatter of group
/// rooms the bot sits in is not for it. Everything else is dropped before it is stored.
pub fn addressed(
    event: &Raw<AnyTimelineEvent>,
    me: &UserId,
    prefix: &str,
    dm_owner: impl Fn(&RoomId) -> Option<OwnedUserId>,
) -> Option<Addressed> {
    let kind = event.get_field::<String>("type").ok().flatten()?;
    let sender = event.get_field::<OwnedUserId>("sender").ok().flatten()?;
    match kind.as_str() {
        "m.room.member" => {
            let key = event.get_field::<String>("state_key").ok().flatten()?;
            if key != me.as_str() {
                return None;
            }
            let content = event.get_field::<RoomMemberEventContent>("content").ok().flatten();
            let room = event.get_field::<OwnedRoomId>("room_id").ok().flatten();
            let dm_invite =
                content.filter(|c| c.membership == MembershipState::Invite && c.is_direct == Some(true)).and(room);
            Some(Addressed { sender, dm_invite })
        }
        "m.room.message" if sender != me => {
            let room = event.get_field::<OwnedRoomId>("room_id").ok().flatten()?;
            let in_dm = dm_owner(&room).is_some_and(|owner| owner == sender);
            let content = event.get_field::<serde_json::Value>("content").ok().flatten();
            let body = content.as_ref().and_then(|c| c.get("body")?.as_str()).unwrap_or_default();
            // An edit would re-run a command that already ran.
            let edit =
                content.as_ref().and_then(|c| c.pointer("/m.relates_to/rel_type")?.as_str()) == Some("m.replace");
            let for_bot = in_dm || body.trim_start().starts_with(prefix);
            (for_bot && !edit).then_some(Addressed { sender, dm_invite: None })
        }
        _ => None,
    }
}

impl Bot {
    /// Starts the background watch for `export --auto` offers.
    pub fn watch_auto_starts(self: &Arc<Self>) {
        spawn_auto_watch(Arc::clone(self));
    }

    /// At start-up: drops offers and pending imports of users no longer permitted.
    pub async fn sweep_revoked(&self) -> Result<usize, BotError> {
        consent::sweep_revoked(self).await
    }

    async fn addressed(&self, event: &Raw<AnyTimelineEvent>) -> Option<OwnedUserId> {
        self.intake.addressed(event).await
    }

    /// Accepts a transaction: the events for the bot are stored with the transaction ID in one
    /// durable write ([`intake::Intake::take`]), then queued. A transaction seen before is
    /// acknowledged and ignored.
    pub async fn accept(self: &Arc<Self>, txn_id: &str, events: &[Raw<AnyTimelineEvent>]) -> Result<(), StoreError> {
        // Taken and queued under the intake's lock: the watch of a shared inbox must not find
        // these events between the two and queue them a second time.
        let _intake = self.intake_lock.lock().await;
        for (inbox, sender, event) in self.intake.take(txn_id, events).await?.unwrap_or_default() {
            self.enqueue(sender, Job::Event { inbox, event });
        }
        Ok(())
    }

    /// Accepts an event that arrived encrypted and that the bot's device decrypted: stored (once
    /// per event ID, as a transaction of its own) and queued like one from a transaction.
    pub async fn accept_decrypted(self: &Arc<Self>, decrypted: Decrypted) -> Result<(), StoreError> {
        let Decrypted { room_id, event } = decrypted;
        // The device took messages only; checked again here, where it matters.
        if !is_message(&event) {
            return Ok(());
        }
        // The device checked the payload's room against the room it came in; `addressed` and the
        // handlers read it from the event, as in a transaction.
        let Ok(mut object) = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(event.json().get())
        else {
            return Ok(());
        };
        object.insert("room_id".into(), serde_json::Value::String(room_id.to_string()));
        let Ok(json) = serde_json::value::to_raw_value(&object) else { return Ok(()) };
        let event = Raw::<AnyTimelineEvent>::from_json(json);
        let Some(event_id) = event.get_field::<String>("event_id").ok().flatten() else { return Ok(()) };
        let Some(sender) = self.addressed(&event).await else { return Ok(()) };
        let bytes = event.json().get().as_bytes().to_vec();
        let _intake = self.intake_lock.lock().await;
        let Some(numbers) = self.store.accept_txn(&format!("decrypted-{event_id}"), &[bytes]).await? else {
            tracing::debug!("decrypted event already handled");
            return Ok(());
        };
        self.enqueue(sender, Job::Event { inbox: numbers[0], event });
        Ok(())
    }

    /// An encrypted message the bot's device never got the keys for: in the sender's own DM (and
    /// only for a permitted user) the bot says so and asks for it again; elsewhere it keeps quiet.
    pub async fn tell_unreadable(&self, unreadable: Unreadable) {
        let Unreadable { room_id, event_id, sender } = unreadable;
        let in_dm = matches!(self.store.dm_room_user(&room_id).await, Ok(Some(owner)) if owner == sender);
        if !in_dm || self.config.permission(&sender) < PermissionLevel::User {
            return;
        }
        let ctx = Ctx { room_id, event_id, sender };
        let text = "I could not read your last message: your client did not share its keys with my device (it may not know my device yet, or does not trust it). Please send it again; if this keeps happening, check that your client shows my device.".to_owned();
        if let Err(e) = self.reply(&ctx, text).await {
            tracing::warn!(error = %e, "cannot tell a user their message was unreadable");
        }
    }

    /// Queues the events a previous run accepted but did not handle.
    pub async fn replay_inbox(self: &Arc<Self>) -> Result<usize, StoreError> {
        let _intake = self.intake_lock.lock().await;
        let pending = self.store.inbox().await?;
        let n = pending.len();
        for (inbox, bytes) in pending {
            self.queue_stored(inbox, &bytes).await?;
        }
        Ok(n)
    }

    /// Queues an event read back from the inbox; drops one the bot no longer acts on.
    async fn queue_stored(self: &Arc<Self>, inbox: u64, bytes: &[u8]) -> Result<(), StoreError> {
        let event = serde_json::from_slice::<Raw<AnyTimelineEvent>>(bytes).ok();
        let sender = match &event {
            Some(e) => self.addressed(e).await,
            None => None,
        };
        match (sender, event) {
            (Some(sender), Some(event)) => self.enqueue(sender, Job::Event { inbox, event }),
            _ => self.store.inbox_done(inbox).await?,
        }
        Ok(())
    }

    /// On a database several instances share, the events a standby's intake took go into the
    /// same inbox: the leader looks for them every [`SHARED_INBOX_EVERY`] and queues those it has
    /// not queued yet.
    pub fn watch_shared_inbox(self: &Arc<Self>) {
        if !self.store.is_shared() {
            return;
        }
        let (bot, stop) = (Arc::clone(self), self.shutdown.clone());
        self.shutdown.spawn(async move {
            let mut every = tokio::time::interval(SHARED_INBOX_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.begun() => return,
                    _ = every.tick() => {}
                }
                if let Err(e) = bot.queue_from_others().await {
                    tracing::warn!(error = %e, "cannot read the shared inbox");
                }
            }
        });
    }

    async fn queue_from_others(self: &Arc<Self>) -> Result<(), StoreError> {
        let _intake = self.intake_lock.lock().await;
        let numbers = self.store.inbox_numbers().await?;
        let new: Vec<u64> = {
            let mut queued = self.queued.lock().expect("lock");
            // What left the inbox was handled: forgotten here too, so the set stays its size.
            queued.retain(|n| numbers.binary_search(n).is_ok());
            numbers.iter().copied().filter(|n| !queued.contains(n)).collect()
        };
        for inbox in new {
            if let Some(bytes) = self.store.inbox_event(inbox).await? {
                tracing::debug!(inbox, "an event another instance took");
                self.queue_stored(inbox, &bytes).await?;
            }
        }
        Ok(())
    }

    /// Puts a job in `user`'s queue.
    pub(crate) fn enqueue(self: &Arc<Self>, user: OwnedUserId, job: Job) {
        let inbox = match &job {
            Job::Event { inbox, .. } => Some(*inbox),
            Job::Offer(_) => None,
        };
        if let Some(n) = inbox
            && self.store.is_shared()
        {
            self.queued.lock().expect("lock").insert(n);
        }
        let bot = Arc::clone(self);
        let queued = self.queues.push(user.clone(), job, move |job| {
            let bot = Arc::clone(&bot);
            async move { bot.run_job(job).await }
        });
        if let Queued::Full { dropped } = queued {
            // Logged once per overflow, so a flood doesn't flood the log too.
            if dropped == 1 {
                tracing::warn!(user = %user, "too many events waiting from one user: the excess is dropped");
            }
            if let Some(n) = inbox {
                let store = self.store.clone();
                tokio::spawn(async move {
                    if let Err(e) = store.inbox_done(n).await {
                        tracing::warn!(error = %e, "cannot drop an inbox event");
                    }
                });
            }
        }
    }

    /// Runs one job in isolation: an error or a panic is logged and, for a message, answered.
    async fn run_job(self: Arc<Self>, job: Job) {
        match job {
            Job::Offer(user) => {
                let bot = Arc::clone(&self);
                match tokio::spawn(async move { consent::offer(&bot, &user, None).await }).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "offering an automatic move failed"),
                    Err(e) => tracing::error!(task = %e.id(), "offering an automatic move panicked"),
                }
            }
            Job::Event { inbox, event } => {
                let reply_to = self.reply_target(&event);
                // Counted durably before it runs: if this event takes the process down, the next
                // start knows, however it died.
                match self.store.inbox_attempt(inbox).await {
                    Ok(attempt) if !queue::may_run(attempt) => return self.give_up(inbox, &event, reply_to).await,
                    Ok(1) => {}
                    Ok(attempt) => {
                        tracing::info!(attempt, "handling again an event that was in hand when the service stopped")
                    }
                    // Not counted: handled anyway, a store failure is no reason to ignore a user.
                    Err(e) => tracing::warn!(error = %e, "cannot count an attempt at an inbox event"),
                }
                self.in_hand.lock().expect("lock").insert(inbox);
                let bot = Arc::clone(&self);
                let outcome = tokio::spawn(async move { bot.handle_event(&event).await }).await;
                let failure = match outcome {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => {
                        tracing::warn!(error = ?e, "handling an event failed");
                        Some(format!("That failed: {e}. Try again, or tell the server admin if it keeps failing."))
                    }
                    Err(e) => {
                        tracing::error!(task = %e.id(), "handling an event panicked");
                        Some("Sorry: handling that message failed on the server's side, so it was not done. Try again, or tell the server admin (the log has the details).".to_owned())
                    }
                };
                if let (Some(text), Some(ctx)) = (failure, reply_to)
                    && let Err(e) = self.reply_n(&ctx, 8, text).await
                {
                    tracing::warn!(error = %e, "cannot report a failure");
                }
                if let Err(e) = self.store.inbox_done(inbox).await {
                    tracing::warn!(error = %e, "cannot mark an inbox event handled");
                }
                self.in_hand.lock().expect("lock").remove(&inbox);
            }
        }
    }

    /// An event that was in hand each of the [`queue::MAX_ATTEMPTS`] times the service died is
    /// not run again: its sender is told in their DM, and the log says so once (without what it
    /// said: it may hold a code).
    async fn give_up(&self, inbox: u64, event: &Raw<AnyTimelineEvent>, reply_to: Option<Ctx>) {
        let sender = event.get_field::<OwnedUserId>("sender").ok().flatten();
        tracing::warn!(
            sender = ?sender.as_ref().map(|s| s.as_str()),
            attempts = queue::MAX_ATTEMPTS,
            "the service stopped each time it handled this event: dropped without running it again"
        );
        if let Some(mut ctx) = reply_to {
            // Said in the sender's DM with the bot when the message came elsewhere.
            let in_dm = matches!(self.store.dm_room_user(&ctx.room_id).await, Ok(Some(owner)) if owner == ctx.sender);
            if !in_dm
                && let Some(dm) = self.store.dm_rooms_of(&ctx.sender).await.ok().and_then(|r| r.into_iter().next())
            {
                ctx.room_id = dm;
            }
            let text = format!(
                "Sorry: the service stopped while handling that message, each of the {} times it was tried, so I did not run it again. Please tell the server admin before you send it again.",
                queue::MAX_ATTEMPTS
            );
            if let Err(e) = self.reply_n(&ctx, 9, text).await {
                tracing::warn!(error = %e, "cannot tell a user their message was dropped");
            }
        }
        if let Err(e) = self.store.inbox_done(inbox).await {
            tracing::warn!(error = %e, "cannot drop an inbox event");
        }
    }

    /// At a clean stop, after the patience for the events in hand: those still in hand were
    /// interrupted by the stop, not the cause of a death, and their attempt is not counted.
    pub async fn release_in_hand(&self) {
        let numbers: Vec<u64> = self.in_hand.lock().expect("lock").iter().copied().collect();
        if let Err(e) = self.store.inbox_attempts_undo(&numbers).await {
            tracing::warn!(error = %e, "cannot uncount the attempts a stop interrupted");
        }
    }

    /// Where a failure in handling `event` is reported: a permitted user's message.
    fn reply_target(&self, event: &Raw<AnyTimelineEvent>) -> Option<Ctx> {
        if event.get_field::<String>("type").ok().flatten()? != "m.room.message" {
            return None;
        }
        let sender = event.get_field::<OwnedUserId>("sender").ok().flatten()?;
        if self.config.permission(&sender) < PermissionLevel::User {
            return None;
        }
        Some(Ctx {
            room_id: event.get_field("room_id").ok().flatten()?,
            event_id: event.get_field("event_id").ok().flatten()?,
            sender,
        })
    }

    /// Handles one event. An event that does not parse is skipped.
    async fn handle_event(self: &Arc<Self>, raw: &Raw<AnyTimelineEvent>) -> Result<(), BotError> {
        let event = match raw.deserialize() {
            Ok(e) => e,
            Err(e) => {
                tracing::debug!(error = %e, "skipping an event that does not parse");
                return Ok(());
            }
        };
        match &event {
            AnyTimelineEvent::State(AnyStateEvent::RoomMember(StateEvent::Original(ev))) => self.on_member(ev).await,
            AnyTimelineEvent::MessageLike(AnyMessageLikeEvent::RoomMessage(MessageLikeEvent::Original(ev))) => {
                self.on_message(ev).await
            }
            _ => Ok(()),
        }
    }

    async fn on_member(&self, ev: &OriginalStateEvent<RoomMemberEventContent>) -> Result<(), BotError> {
        if ev.state_key != self.user_id {
            return Ok(());
        }
        match ev.content.membership {
            MembershipState::Invite => self.on_invite(ev).await,
            MembershipState::Leave | MembershipState::Ban => {
                if let Err(e) = self.store.remove_dm_room(&ev.room_id).await {
                    tracing::warn!(error = %e, "cannot forget a DM room");
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    async fn on_invite(&self, ev: &OriginalStateEvent<RoomMemberEventContent>) -> Result<(), BotError> {
        let room = &ev.room_id;
        if self.config.permission(&ev.sender) < PermissionLevel::User {
            tracing::info!(room_id = %room, inviter = %ev.sender, "refusing an invite from a user without permission");
            let mut leave = leave_room::v3::Request::new(room.clone());
            leave.reason =
                Some(format!("{} may not use handoff on this server; ask the server admin for access", ev.sender));
            self.hs.send(leave).await?;
            return Ok(());
        }
        self.outbox.join(room).await?;
        // A DM invite was recorded as the inviter's DM when it arrived (`note_dm_invite`).
        tracing::info!(room_id = %room, inviter = %ev.sender, "joined on invite");
        let ctx = Ctx { room_id: room.clone(), event_id: ev.event_id.clone(), sender: ev.sender.clone() };
        if !self.outbox.can_read(room).await? {
            // An encrypted room, and the bot has no device (encryption.allow is off, or the
            // homeserver refused its login): it would never see a command here.
            let text = format!(
                "Hello {}! This room is end-to-end encrypted, and handoff on this server has no encryption (the server admin turned it off, or the homeserver does not let the bot have a device), so it would not see your commands here. Please start a new DM with {} with encryption turned off (in Element: untick \"Enable end-to-end encryption\" when you create it), or ask the server admin.",
                ev.sender, self.user_id
            );
            return self.reply(&ctx, text).await;
        }
        let (plain, html) = commands::help::text(&self.config.handoff.command_prefix);
        let greeting = format!("Hello {}! {plain}", ev.sender);
        let html = format!("<p>Hello {}!</p>{html}", escape(ev.sender.as_str()));
        self.send_notice(&ctx, 0, RoomMessageEventContent::notice_html(greeting, html)).await?;
        if ev.content.is_direct == Some(true) {
            // A move offered to this account waits for it to be active: this is activity.
            consent::offer(self, &ev.sender, Some(room.clone())).await?;
        }
        Ok(())
    }

    async fn on_message(
        self: &Arc<Self>,
        ev: &OriginalMessageLikeEvent<RoomMessageEventContent>,
    ) -> Result<(), BotError> {
        if ev.sender == self.user_id {
            return Ok(());
        }
        // Edits would re-run a command that already ran.
        if matches!(ev.content.relates_to, Some(Relation::Replacement(_))) {
            return Ok(());
        }
        let place = match self.store.dm_room_user(&ev.room_id).await? {
            Some(owner) if owner == ev.sender => Place::Dm,
            _ => Place::Group,
        };
        let ctx = Ctx { room_id: ev.room_id.clone(), event_id: ev.event_id.clone(), sender: ev.sender.clone() };
        let permitted = self.config.permission(&ev.sender) >= PermissionLevel::User;
        if place == Place::Dm && permitted {
            // Writing to the bot is activity: a move offered to this account is offered now.
            consent::offer(self, &ev.sender, Some(ev.room_id.clone())).await?;
        }
        let text = match &ev.content.msgtype {
            MessageType::Text(text) => &text.body,
            // A file dropped into the DM: perhaps a key export.
            MessageType::File(file) if place == Place::Dm && permitted => return keys::on_file(self, &ctx, file).await,
            _ => return Ok(()),
        };
        let Some(parsed) = commands::parse(text, place, &self.config.handoff.command_prefix) else {
            return Ok(());
        };
        if !permitted {
            return self.reply(&ctx, format!("{} may not use handoff on this server.", ev.sender)).await;
        }
        let command = match parsed {
            Ok(c) => c,
            Err(e) => {
                // Never echo or log what was typed: it may be a code pasted on its own.
                tracing::info!(room_id = %ev.room_id, sender = %ev.sender, "not a command");
                let text = if TransferCode::parse(text).is_ok() {
                    "That looks like a transfer code. To move its bundle into this account, send `import CODE` (with the code) here.".to_owned()
                } else {
                    e.to_string()
                };
                return self.reply(&ctx, text).await;
            }
        };
        let spec = command.spec();
        tracing::info!(room_id = %ev.room_id, sender = %ev.sender, command = spec.name, "command");
        if !spec.anywhere && place != Place::Dm {
            metrics::command(spec.name, metrics::CommandOutcome::Refused);
            let text = format!(
                "`{}` only works in your DM with me: what it shows or takes (codes, files, transfer details) would be readable by everyone in this room. Start a DM with {} and send it there.",
                spec.name, self.user_id
            );
            return self.reply(&ctx, text).await;
        }
        commands::run(self, &ctx, command).await
    }
}

/// Watches pending offers: a local account that has a device (has signed in) is active, and is
/// offered its move in its own queue (so the offer and the account's own commands never race).
fn spawn_auto_watch(bot: Arc<Bot>) {
    bot.shutdown.clone().spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = bot.shutdown.begun() => return,
                _ = every.tick() => {}
            }
            let autos = match bot.store.autos().await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read pending offers");
                    continue;
                }
            };
            for auto in autos {
                if auto.offered_in.is_some() || auto.expires_at_ms <= now_ms() {
                    continue; // answered in the DM; expired ones go with retention
                }
                if auto.new.server_name() != bot.config.homeserver.domain {
                    continue; // remote accounts are offered it when they write to the bot
                }
                let active = match bot.acting.send_as(&auto.new, get_devices::v3::Request::new()).await {
                    Ok(r) => !r.devices.is_empty(),
                    Err(_) => false, // not registered yet
                };
                if active {
                    bot.enqueue(auto.new.clone(), Job::Offer(auto.new.clone()));
                }
            }
        }
    });
}
