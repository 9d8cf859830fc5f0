//! The intake: what every instance does with a transaction the homeserver pushes, leader or
//! standby. It keeps the events for the bot ([`super::addressed`]) and stores them in the inbox
//! with the transaction's ID, in one durable write, before the homeserver gets its 200. The
//! leader's bot then queues them; on a database several instances share, the leader also finds in
//! the inbox what a standby's intake took ([`super::Bot::watch_shared_inbox`]).

use ruma::events::AnyTimelineEvent;
use ruma::serde::Raw;
use ruma::{OwnedRoomId, OwnedUserId, RoomId};

use crate::store::{Store, StoreError};

/// An event taken into the inbox: its number there, who it is from.
pub type Taken = (u64, OwnedUserId, Raw<AnyTimelineEvent>);

pub struct Intake {
    store: Store,
    me: OwnedUserId,
    prefix: String,
}

impl Intake {
    pub fn new(store: Store, me: OwnedUserId, prefix: String) -> Intake {
        Intake { store, me, prefix }
    }

    pub fn me(&self) -> &ruma::UserId {
        &self.me
    }

    /// The user an event is addressed by, if the bot acts on it ([`super::addressed`]); a DM
    /// invite of the bot is recorded as the inviter's DM as it arrives, not when the invite is
    /// handled from the queue: the inviter's first bare command may come right behind it, and a
    /// bare message is kept only in a known DM.
    pub async fn addressed(&self, event: &Raw<AnyTimelineEvent>) -> Option<OwnedUserId> {
        // Whose DM the event's room is, read before the (synchronous) filter asks: for messages
        // only, the one kind it asks about (a read per event of a busy room would be wasted).
        let message = event.get_field::<String>("type").ok().flatten().as_deref() == Some("m.room.message");
        let room = event.get_field::<OwnedRoomId>("room_id").ok().flatten().filter(|_| message);
        let owner = match &room {
            Some(room) => self.store.dm_room_user(room).await.ok().flatten(),
            None => None,
        };
        let dm_owner = |asked: &RoomId| owner.clone().filter(|_| room.as_deref() == Some(asked));
        let addressed = super::addressed(event, &self.me, &self.prefix, dm_owner)?;
        if let Some(room) = &addressed.dm_invite
            && let Err(e) = self.store.set_dm_room(room, &addressed.sender).await
        {
            tracing::warn!(error = %e, "cannot record a DM room");
        }
        Some(addressed.sender)
    }

    /// Takes a transaction: the events for the bot go into the inbox with the transaction ID, in
    /// one durable write. `None`: the transaction was taken before (here or by another instance).
    pub async fn take(&self, txn_id: &str, events: &[Raw<AnyTimelineEvent>]) -> Result<Option<Vec<Taken>>, StoreError> {
        let mut mine: Vec<(OwnedUserId, &Raw<AnyTimelineEvent>)> = Vec::new();
        for event in events {
            if let Some(sender) = self.addressed(event).await {
                mine.push((sender, event));
            }
        }
        let bytes: Vec<Vec<u8>> = mine.iter().map(|(_, e)| e.json().get().as_bytes().to_vec()).collect();
        let Some(numbers) = self.store.accept_txn(txn_id, &bytes).await? else {
            tracing::debug!(txn_id, "transaction already handled");
            return Ok(None);
        };
        tracing::debug!(txn_id, events = events.len(), for_the_bot = mine.len(), "transaction accepted");
        Ok(Some(numbers.into_iter().zip(mine).map(|(n, (sender, event))| (n, sender, event.clone())).collect()))
    }
}
