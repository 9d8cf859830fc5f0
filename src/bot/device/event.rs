//! What the bot's device hands the bot: decrypted commands, and events it could not decrypt.

use ruma::events::AnyTimelineEvent;
use ruma::serde::Raw;
use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId};

/// A command that arrived encrypted, decrypted: handled like one from a transaction.
pub struct Decrypted {
    pub room_id: OwnedRoomId,
    pub event: Raw<AnyTimelineEvent>,
}

/// Whether a decrypted event is one the bot may take: a message. Inside the encryption the sender
/// writes the whole payload, `type` and all: an `m.room.member` with a `state_key` would read as
/// a membership change the room never had (the bot's leave, a DM's invite). State comes in the
/// clear, through the appservice's transactions, and nowhere else.
pub fn is_message(event: &Raw<AnyTimelineEvent>) -> bool {
    event.get_field::<String>("type").ok().flatten().as_deref() == Some("m.room.message")
        && matches!(event.get_field::<serde::de::IgnoredAny>("state_key"), Ok(None))
}

/// An encrypted event the device could not decrypt in time: its keys never reached this device
/// (the sender's client did not know the device yet, or withheld them).
pub struct Unreadable {
    pub room_id: OwnedRoomId,
    pub event_id: OwnedEventId,
    pub sender: OwnedUserId,
}
