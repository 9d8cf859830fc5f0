//! Reading the rooms' current state (the planner's [`World`]) as the old account.

use futures_util::stream::{self, StreamExt, TryStreamExt};
use ruma::api::client::state::get_state_events;
use ruma::events::{AnyStateEvent, StateEvent};
use ruma::{OwnedRoomId, UserId};
use tokio::sync::Semaphore;

use super::plan::{RoomFacts, World};
use crate::homeserver::{Homeserver, HsError};

/// Reads each room's state as `old`, one read per permit of `pool` (the engine's shared pool, so
/// planning doesn't add to the homeserver's load beyond it). A room the old account can't read
/// any more is left out: the planner calls it gone.
pub async fn read(
    hs: &Homeserver,
    old: &UserId,
    new: &UserId,
    rooms: impl IntoIterator<Item = OwnedRoomId>,
    pool: &Semaphore,
) -> Result<World, HsError> {
    let facts: Vec<Option<(OwnedRoomId, RoomFacts)>> = stream::iter(rooms)
        .map(|room| async move {
            let _permit = pool.acquire().await.expect("the pool is never closed");
            match room_facts(hs, old, new, &room).await {
                Ok(Some(f)) => Ok(Some((room, f))),
                Ok(None) => Ok(None),
                Err(e) if e.is_transient() => Err(e),
                // Forbidden / not found: the old account is no longer there.
                Err(e) => {
                    tracing::debug!(room_id = %room, error = %e, "room not readable: gone");
                    Ok(None)
                }
            }
        })
        .buffer_unordered(pool.available_permits().max(1))
        .try_collect()
        .await?;
    Ok(World { rooms: facts.into_iter().flatten().collect() })
}

/// One room's facts, or `None` if its state lacks a create event (not a usable room).
pub async fn room_facts(
    hs: &Homeserver,
    old: &UserId,
    new: &UserId,
    room: &OwnedRoomId,
) -> Result<Option<RoomFacts>, HsError> {
    let state = hs.send_as(old, get_state_events::v3::Request::new(room.clone())).await?.room_state;
    let mut create = None;
    let (mut power_levels, mut join_rules, mut server_acl, mut history_visibility, mut new_membership) =
        (None, None, None, None, None);
    for raw in &state {
        let Ok(event) = raw.deserialize() else {
            continue;
        };
        match event {
            AnyStateEvent::RoomCreate(StateEvent::Original(ev)) => create = Some((ev.sender, ev.content)),
            AnyStateEvent::RoomPowerLevels(StateEvent::Original(ev)) => power_levels = Some(ev.content),
            AnyStateEvent::RoomJoinRules(StateEvent::Original(ev)) => join_rules = Some(ev.content),
            AnyStateEvent::RoomServerAcl(StateEvent::Original(ev)) => server_acl = Some(ev.content),
            AnyStateEvent::RoomHistoryVisibility(StateEvent::Original(ev)) => {
                history_visibility = Some(ev.content.history_visibility)
            }
            AnyStateEvent::RoomMember(StateEvent::Original(ev)) if ev.state_key == new => {
                new_membership = Some(ev.content.membership)
            }
            _ => {}
        }
    }
    Ok(create.map(|(creator, create)| RoomFacts {
        creator,
        create,
        power_levels,
        join_rules,
        server_acl,
        history_visibility,
        new_membership,
    }))
}
