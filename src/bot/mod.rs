//! The bot: decides which pushed events are for it, runs commands, replies.

pub mod commands;
mod export;
mod keys;
mod transfer;

use std::sync::Arc;

use ruma::api::client::membership::{join_room_by_id, leave_room};
use ruma::api::client::message::send_message_event;
use ruma::api::client::state::get_state_event_for_key;
use ruma::events::StateEventType;
use ruma::events::room::member::{MembershipState, RoomMemberEventContent};
use ruma::events::room::message::{MessageType, Relation, RoomMessageEventContent};
use ruma::events::{
    AnyMessageLikeEvent, AnyStateEvent, AnyTimelineEvent, MessageLikeEvent, OriginalMessageLikeEvent,
    OriginalStateEvent, StateEvent,
};
use ruma::serde::Raw;
use ruma::{OwnedEventId, OwnedRoomId, OwnedTransactionId, OwnedUserId, UserId};
use sha2::{Digest, Sha256};

use crate::config::{Config, PermissionLevel};
use crate::homeserver::{Homeserver, HsError};
use crate::store::Store;
use crate::transfer::run::Engine;
use commands::{Command, Place};

pub struct Bot {
    config: Arc<Config>,
    user_id: OwnedUserId,
    /// The main registration's client: it acts as the bot.
    hs: Homeserver,
    /// The acting registration's client: it acts as local users.
    acting: Homeserver,
    store: Store,
    engine: Arc<Engine>,
    wrong_codes: transfer::WrongCodes,
}

/// The message a command or file came in.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub room_id: OwnedRoomId,
    pub event_id: OwnedEventId,
    pub sender: OwnedUserId,
}

impl Bot {
    /// Starts the background watch for `export --auto` transfers.
    pub fn watch_auto_starts(self: &Arc<Self>) {
        transfer::spawn_auto_watch(Arc::clone(self));
    }

    pub fn new(config: Arc<Config>, hs: Homeserver, acting: Homeserver, store: Store, engine: Arc<Engine>) -> Self {
        Bot { user_id: config.bot_user_id(), config, hs, acting, store, engine, wrong_codes: Default::default() }
    }

    pub fn user_id(&self) -> &UserId {
        &self.user_id
    }

    /// Handles one event the homeserver pushed. Errors are logged: one bad event must not stop a transaction.
    pub async fn handle_event(self: &Arc<Self>, raw: &Raw<AnyTimelineEvent>) {
        let event = match raw.deserialize() {
            Ok(e) => e,
            Err(e) => {
                tracing::debug!(error = %e, "skipping an event that does not parse");
                return;
            }
        };
        let result = match &event {
            AnyTimelineEvent::State(AnyStateEvent::RoomMember(StateEvent::Original(ev))) => self.on_member(ev).await,
            AnyTimelineEvent::MessageLike(AnyMessageLikeEvent::RoomMessage(MessageLikeEvent::Original(ev))) => {
                self.on_message(ev).await
            }
            _ => Ok(()),
        };
        if let Err(e) = result {
            tracing::warn!(event_id = %event.event_id(), room_id = %event.room_id(), error = %e, "handling an event failed");
        }
    }

    async fn on_member(&self, ev: &OriginalStateEvent<RoomMemberEventContent>) -> Result<(), HsError> {
        if ev.state_key != self.user_id {
            return Ok(());
        }
        match ev.content.membership {
            MembershipState::Invite => self.on_invite(ev).await,
            MembershipState::Leave | MembershipState::Ban => {
                if let Err(e) = self.store.remove_dm_room(&ev.room_id) {
                    tracing::warn!(error = %e, "cannot forget a DM room");
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    async fn on_invite(&self, ev: &OriginalStateEvent<RoomMemberEventContent>) -> Result<(), HsError> {
        let room = &ev.room_id;
        if self.config.permission(&ev.sender) < PermissionLevel::User {
            tracing::info!(room_id = %room, inviter = %ev.sender, "refusing an invite from a user without permission");
            let mut leave = leave_room::v3::Request::new(room.clone());
            leave.reason =
                Some(format!("{} may not use handoff on this server; ask the server admin for access", ev.sender));
            self.hs.send(leave).await?;
            return Ok(());
        }
        self.hs.send(join_room_by_id::v3::Request::new(room.clone())).await?;
        tracing::info!(room_id = %room, inviter = %ev.sender, "joined on invite");
        if ev.content.is_direct == Some(true)
            && let Err(e) = self.store.set_dm_room(room, &ev.sender)
        {
            tracing::warn!(error = %e, "cannot record a DM room");
        }
        if let Err(e) = transfer::auto_start(self, &ev.sender, Some(room.clone())).await {
            tracing::warn!(error = %e, "automatic start failed");
        }
        let ctx = Ctx { room_id: room.clone(), event_id: ev.event_id.clone(), sender: ev.sender.clone() };
        if self.is_encrypted(room).await {
            // The bot has no end-to-end encryption: it would never see a command here.
            let text = format!(
                "Hello {}! This room is end-to-end encrypted, and handoff can't read encrypted messages yet, so it would not see your commands here. Please start a new DM with {} with encryption turned off (in Element: untick \"Enable end-to-end encryption\" when you create it).",
                ev.sender, self.user_id
            );
            return self.reply(&ctx, text).await;
        }
        let (plain, html) = commands::help::text(&self.config.handoff.command_prefix);
        let greeting = format!("Hello {}! {plain}", ev.sender);
        let html = format!("<p>Hello {}!</p>{html}", escape(ev.sender.as_str()));
        self.send_notice(&ctx, 0, RoomMessageEventContent::notice_html(greeting, html)).await
    }

    /// Whether the room has `m.room.encryption` (read as the bot, which has just joined).
    async fn is_encrypted(&self, room: &ruma::RoomId) -> bool {
        let req =
            get_state_event_for_key::v3::Request::new(room.to_owned(), StateEventType::RoomEncryption, String::new());
        self.hs.send(req).await.is_ok()
    }

    async fn on_message(
        self: &Arc<Self>,
        ev: &OriginalMessageLikeEvent<RoomMessageEventContent>,
    ) -> Result<(), HsError> {
        if ev.sender == self.user_id {
            return Ok(());
        }
        // Edits would re-run a command that already ran.
        if matches!(ev.content.relates_to, Some(Relation::Replacement(_))) {
            return Ok(());
        }
        let place = match self.store.dm_room_user(&ev.room_id) {
            Ok(Some(owner)) if owner == ev.sender => Place::Dm,
            _ => Place::Group,
        };
        let ctx = Ctx { room_id: ev.room_id.clone(), event_id: ev.event_id.clone(), sender: ev.sender.clone() };
        if place == Place::Dm
            && let Err(e) = transfer::auto_start(self, &ev.sender, Some(ev.room_id.clone())).await
        {
            tracing::warn!(error = %e, "automatic start failed");
        }
        let text = match &ev.content.msgtype {
            MessageType::Text(text) => &text.body,
            // A file dropped into the DM: perhaps a key export.
            MessageType::File(file) if place == Place::Dm => {
                if self.config.permission(&ev.sender) < PermissionLevel::User {
                    return Ok(());
                }
                return keys::on_file(self, &ctx, file).await;
            }
            _ => return Ok(()),
        };
        let Some(parsed) = commands::parse(text, place, &self.config.handoff.command_prefix) else {
            return Ok(());
        };
        if self.config.permission(&ev.sender) < PermissionLevel::User {
            return self.reply(&ctx, format!("{} may not use handoff on this server.", ev.sender)).await;
        }
        tracing::info!(room_id = %ev.room_id, sender = %ev.sender, command = ?parsed.as_ref().map(command_name), "command");
        match parsed {
            Err(e) => self.reply(&ctx, e.to_string()).await,
            Ok(Command::Help) => {
                let (plain, html) = commands::help::text(&self.config.handoff.command_prefix);
                self.send_notice(&ctx, 0, RoomMessageEventContent::notice_html(plain, html)).await
            }
            Ok(Command::Export(args)) => {
                // Capturing takes a while: don't hold up the homeserver's transaction.
                let bot = Arc::clone(self);
                tokio::spawn(async move {
                    if let Err(e) = export::run(&bot, &ctx, args).await {
                        tracing::warn!(error = %e, "export failed");
                        let _ = bot
                            .reply_n(&ctx, 9, format!("The export failed: {e}. Nothing was stored; try again."))
                            .await;
                    }
                });
                Ok(())
            }
            Ok(Command::Keys) => keys::show(self, &ctx).await,
            Ok(Command::Forget) => self.forget(&ctx).await,
            Ok(Command::Import(args)) => {
                let bot = Arc::clone(self);
                tokio::spawn(async move {
                    if let Err(e) = transfer::import(&bot, &ctx, args).await {
                        tracing::warn!(error = %e, "import failed");
                        let _ = bot.reply_n(&ctx, 9, format!("The import failed: {e}.")).await;
                    }
                });
                Ok(())
            }
            Ok(Command::Approve) => transfer::approve(self, &ctx, true).await,
            Ok(Command::Deny) => transfer::approve(self, &ctx, false).await,
            Ok(Command::Status) => transfer::status(self, &ctx).await,
            Ok(Command::Cancel) => transfer::cancel(self, &ctx).await,
            Ok(Command::Finish { leave, advertise }) => transfer::finish(self, &ctx, leave, advertise).await,
        }
    }

    async fn forget(&self, ctx: &Ctx) -> Result<(), HsError> {
        let text = match self.store.forget(&ctx.sender).await {
            Ok(gone) => format!(
                "Deleted {} bundle(s), {} transfer code(s) and {} transfer record(s). handoff now holds nothing about you but the fact that this room is your DM with it.",
                gone.bundles, gone.codes, gone.transfers
            ),
            Err(e) => {
                tracing::error!(error = %e, "forget failed");
                "Deleting your data failed on the server's side; nothing was reported as deleted. Try again, or tell the server admin.".to_owned()
            }
        };
        self.reply(ctx, text).await
    }

    /// Replies with a notice; `backtick` spans become `<code>` in the HTML body.
    pub(crate) async fn reply(&self, ctx: &Ctx, text: String) -> Result<(), HsError> {
        self.reply_n(ctx, 0, text).await
    }

    /// The `n`th reply to the same message (each gets its own transaction ID).
    pub(crate) async fn reply_n(&self, ctx: &Ctx, n: u32, text: String) -> Result<(), HsError> {
        let html = to_html(&text);
        self.send_notice(ctx, n, RoomMessageEventContent::notice_html(text, html)).await
    }

    /// Sends a message caused by `ctx.event_id`. The transaction ID is derived from the cause, so a
    /// retried or replayed event can't produce a second reply.
    pub(crate) async fn send_notice(&self, ctx: &Ctx, n: u32, content: RoomMessageEventContent) -> Result<(), HsError> {
        let request =
            send_message_event::v3::Request::new(ctx.room_id.clone(), reply_txn_id(&ctx.event_id, n), &content)
                .map_err(|e| HsError::Protocol(e.to_string()))?;
        self.hs.send(request).await?;
        Ok(())
    }
}

/// A store failure, logged in full, told to the user without internals.
pub(crate) fn store_err(e: crate::store::StoreError) -> HsError {
    tracing::error!(error = %e, "store failure");
    HsError::Protocol("the server could not read or write its store".into())
}

fn command_name(c: &Command) -> &'static str {
    match c {
        Command::Help => "help",
        Command::Export(_) => "export",
        Command::Keys => "keys",
        Command::Forget => "forget",
        Command::Import(_) => "import",
        Command::Approve => "approve",
        Command::Deny => "deny",
        Command::Status => "status",
        Command::Cancel => "cancel",
        Command::Finish { .. } => "finish",
    }
}

fn reply_txn_id(cause: &ruma::EventId, n: u32) -> OwnedTransactionId {
    let digest = Sha256::digest(cause.as_str().as_bytes());
    let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
    format!("handoff-{hex}-{n}").into()
}

/// Escapes text for the HTML body of a message.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Plain text to HTML: escaped, `code` spans as `<code>`, line breaks as `<br>`.
pub fn to_html(text: &str) -> String {
    let escaped = escape(text);
    let mut out = String::with_capacity(escaped.len() + 16);
    for (i, part) in escaped.split('`').enumerate() {
        if i % 2 == 1 {
            out.push_str("<code>");
            out.push_str(part);
            out.push_str("</code>");
        } else {
            out.push_str(part);
        }
    }
    out.replace('\n', "<br>")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_has_code_spans_and_breaks() {
        assert_eq!(to_html("Send `help` <now>\nok"), "Send <code>help</code> &lt;now&gt;<br>ok");
    }
}
