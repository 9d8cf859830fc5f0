//! The bot: decides which pushed events are for it, runs commands, replies.

pub mod commands;

use std::sync::Arc;

use ruma::api::client::membership::{join_room_by_id, leave_room};
use ruma::api::client::message::send_message_event;
use ruma::events::room::member::{MembershipState, RoomMemberEventContent};
use ruma::events::room::message::{MessageType, Relation, RoomMessageEventContent};
use ruma::events::{
    AnyMessageLikeEvent, AnyStateEvent, AnyTimelineEvent, MessageLikeEvent,
    OriginalMessageLikeEvent, OriginalStateEvent, StateEvent,
};
use ruma::serde::Raw;
use ruma::{EventId, OwnedTransactionId, OwnedUserId, RoomId, UserId};
use sha2::{Digest, Sha256};

use crate::config::{Config, PermissionLevel};
use crate::homeserver::{Homeserver, HsError};
use crate::store::Store;
use commands::{Command, Place};

pub struct Bot {
    config: Arc<Config>,
    user_id: OwnedUserId,
    /// The main registration's client: it acts as the bot.
    hs: Homeserver,
    store: Store,
}

impl Bot {
    pub fn new(config: Arc<Config>, hs: Homeserver, store: Store) -> Self {
        Bot {
            user_id: config.bot_user_id(),
            config,
            hs,
            store,
        }
    }

    pub fn user_id(&self) -> &UserId {
        &self.user_id
    }

    /// Handles one event the homeserver pushed. Errors are logged: one bad event must not stop a transaction.
    pub async fn handle_event(&self, raw: &Raw<AnyTimelineEvent>) {
        let event = match raw.deserialize() {
            Ok(e) => e,
            Err(e) => {
                tracing::debug!(error = %e, "skipping an event that does not parse");
                return;
            }
        };
        let result = match &event {
            AnyTimelineEvent::State(AnyStateEvent::RoomMember(StateEvent::Original(ev))) => {
                self.on_member(ev).await
            }
            AnyTimelineEvent::MessageLike(AnyMessageLikeEvent::RoomMessage(
                MessageLikeEvent::Original(ev),
            )) => self.on_message(ev).await,
            _ => Ok(()),
        };
        if let Err(e) = result {
            tracing::warn!(event_id = %event.event_id(), room_id = %event.room_id(), error = %e, "handling an event failed");
        }
    }

    async fn on_member(
        &self,
        ev: &OriginalStateEvent<RoomMemberEventContent>,
    ) -> Result<(), HsError> {
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

    async fn on_invite(
        &self,
        ev: &OriginalStateEvent<RoomMemberEventContent>,
    ) -> Result<(), HsError> {
        let room = &ev.room_id;
        if self.config.permission(&ev.sender) < PermissionLevel::User {
            tracing::info!(room_id = %room, inviter = %ev.sender, "refusing an invite from a user without permission");
            let mut leave = leave_room::v3::Request::new(room.clone());
            leave.reason = Some(format!(
                "{} may not use handoff on this server; ask the server admin for access",
                ev.sender
            ));
            self.hs.send(leave).await?;
            return Ok(());
        }
        self.hs
            .send(join_room_by_id::v3::Request::new(room.clone()))
            .await?;
        tracing::info!(room_id = %room, inviter = %ev.sender, "joined on invite");
        if ev.content.is_direct == Some(true)
            && let Err(e) = self.store.set_dm_room(room, &ev.sender)
        {
            tracing::warn!(error = %e, "cannot record a DM room");
        }
        let (plain, html) = commands::help::text(&self.config.handoff.command_prefix);
        let greeting = format!("Hello {}! {plain}", ev.sender);
        let html = format!(
            "<p>Hello {}!</p>{html}",
            commands::help::escape(ev.sender.as_str())
        );
        self.reply(
            room,
            &ev.event_id,
            0,
            RoomMessageEventContent::notice_html(greeting, html),
        )
        .await
    }

    async fn on_message(
        &self,
        ev: &OriginalMessageLikeEvent<RoomMessageEventContent>,
    ) -> Result<(), HsError> {
        if ev.sender == self.user_id {
            return Ok(());
        }
        // Edits would re-run a command that already ran.
        if matches!(ev.content.relates_to, Some(Relation::Replacement(_))) {
            return Ok(());
        }
        let MessageType::Text(text) = &ev.content.msgtype else {
            return Ok(());
        };
        let place = match self.store.dm_room_user(&ev.room_id) {
            Ok(Some(owner)) if owner == ev.sender => Place::Dm,
            _ => Place::Group,
        };
        let Some(parsed) = commands::parse(&text.body, place, &self.config.handoff.command_prefix)
        else {
            return Ok(());
        };
        if self.config.permission(&ev.sender) < PermissionLevel::User {
            return self
                .reply_text(
                    &ev.room_id,
                    &ev.event_id,
                    format!("{} may not use handoff on this server.", ev.sender),
                )
                .await;
        }
        tracing::info!(room_id = %ev.room_id, sender = %ev.sender, command = ?parsed.as_ref().ok(), "command");
        match parsed {
            Err(e) => {
                self.reply_text(&ev.room_id, &ev.event_id, e.to_string())
                    .await
            }
            Ok(Command::Help) => {
                let (plain, html) = commands::help::text(&self.config.handoff.command_prefix);
                self.reply(
                    &ev.room_id,
                    &ev.event_id,
                    0,
                    RoomMessageEventContent::notice_html(plain, html),
                )
                .await
            }
        }
    }

    async fn reply_text(
        &self,
        room: &RoomId,
        cause: &EventId,
        text: String,
    ) -> Result<(), HsError> {
        let html = commands::help::escape(&text);
        self.reply(
            room,
            cause,
            0,
            RoomMessageEventContent::notice_html(text, html),
        )
        .await
    }

    /// Sends a notice caused by `cause`. The transaction ID is derived from the cause, so a retried or
    /// replayed event can't produce a second reply.
    async fn reply(
        &self,
        room: &RoomId,
        cause: &EventId,
        n: u32,
        content: RoomMessageEventContent,
    ) -> Result<(), HsError> {
        let request =
            send_message_event::v3::Request::new(room.to_owned(), reply_txn_id(cause, n), &content)
                .map_err(|e| HsError::Protocol(e.to_string()))?;
        self.hs.send(request).await?;
        Ok(())
    }
}

fn reply_txn_id(cause: &EventId, n: u32) -> OwnedTransactionId {
    let digest = Sha256::digest(cause.as_str().as_bytes());
    let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
    format!("handoff-{hex}-{n}").into()
}
