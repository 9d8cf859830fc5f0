//! Reading what the planners decide from: the rooms' current state as the old account (the
//! planner's [`World`]) and the new account's account data (the merges' [`AccountWorld`]).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, StreamExt, TryStreamExt};
use ruma::api::client::config::get_global_account_data;
use ruma::api::client::filter::{FilterDefinition, create_filter};
use ruma::api::client::membership::joined_rooms;
use ruma::api::client::profile::get_profile;
use ruma::api::client::state::get_state_events;
use ruma::api::client::sync::sync_events::{self, v3::Filter};
use ruma::api::error::ErrorKind;
use ruma::events::room::member::MembershipState;
use ruma::events::{AnyStateEvent, AnyStrippedStateEvent, GlobalAccountDataEventType, StateEvent};
use ruma::{OwnedRoomId, UInt, UserId};
use serde::de::DeserializeOwned;
use serde_json::Value as JsonValue;

use super::AccountStep;
use super::merge::AccountWorld;
use super::plan::{RoomFacts, World};
use crate::budget::{Budget, Class, Party};
use crate::homeserver::{Homeserver, HsError};

/// Reads each room's state as `old`, one read per slot of the shared budget (as `party`'s work of
/// `class`), so planning doesn't add to the homeserver's load beyond it. A room the old account can't read
/// any more is left out: the planner calls it gone.
pub async fn read(
    hs: &Homeserver,
    old: &UserId,
    new: &UserId,
    rooms: impl IntoIterator<Item = OwnedRoomId>,
    budget: &Arc<Budget>,
    party: Party,
    class: Class,
) -> Result<World, HsError> {
    let facts: Vec<Option<(OwnedRoomId, RoomFacts)>> = stream::iter(rooms)
        .map(|room| async move {
            let _slot = budget.acquire(party, class).await;
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
        .buffer_unordered(budget.size())
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

/// The new account's account data that the merges of `steps` need (`merge`), read as that
/// account; what no step needs is left out.
pub async fn read_account<'k>(
    hs: &Homeserver,
    user: &UserId,
    client_settings: impl IntoIterator<Item = &'k String>,
    steps: &[AccountStep],
) -> Result<AccountWorld, HsError> {
    let needs = |step: AccountStep| steps.contains(&step);
    let mut world = AccountWorld::default();
    if needs(AccountStep::Direct) {
        world.direct = global_data(hs, user, GlobalAccountDataEventType::Direct.to_string()).await?;
    }
    if needs(AccountStep::IgnoredUsers) {
        world.ignored_users = global_data(hs, user, GlobalAccountDataEventType::IgnoredUserList.to_string()).await?;
    }
    if needs(AccountStep::PushRules) {
        world.push_rules = global_data::<JsonValue>(hs, user, GlobalAccountDataEventType::PushRules.to_string())
            .await?
            .and_then(|v| serde_json::from_value(v.get("global")?.clone()).ok());
    }
    if needs(AccountStep::ClientSettings) {
        for kind in client_settings {
            world.client_settings.insert(kind.clone(), global_data(hs, user, kind.clone()).await?);
        }
    }
    if needs(AccountStep::Profile) {
        match hs.send_as(user, get_profile::v3::Request::new(user.to_owned())).await {
            Ok(profile) => {
                world.display_name = profile.get("displayname").and_then(|v| v.as_str()).map(str::to_owned);
                world.avatar_url = profile.get("avatar_url").and_then(|v| serde_json::from_value(v.clone()).ok());
            }
            Err(e) if matches!(e.kind(), Some(ErrorKind::NotFound)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(world)
}

/// One global account-data event of `user`; `None` if it has none (or one that doesn't parse:
/// the merge then treats it as absent, and adds to it rather than failing).
async fn global_data<T: DeserializeOwned>(hs: &Homeserver, user: &UserId, kind: String) -> Result<Option<T>, HsError> {
    match hs.send_as(user, get_global_account_data::v3::Request::new(user.to_owned(), kind.as_str().into())).await {
        Ok(r) => Ok(serde_json::from_str(r.account_data.json().get()).ok()),
        Err(e) if matches!(e.kind(), Some(ErrorKind::NotFound)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// What the new account's own view says of a bundle's rooms, for a bundle from another server
/// ([`super::plan::received`]): the rooms it is in, and those the bundle's old account invited it
/// to for this move and it has not answered yet (the reservation, signed by the old account's
/// server; an invite of the old account for anything else proves no move).
#[derive(Debug, Clone, Default)]
pub struct NewView {
    pub joined: BTreeSet<OwnedRoomId>,
    pub reserved: BTreeSet<OwnedRoomId>,
}

/// Reads [`NewView`] as `new`: its joined rooms, and its pending invites from `old` among `rooms`.
pub async fn read_new_view(
    hs: &Homeserver,
    new: &UserId,
    old: &UserId,
    rooms: &[OwnedRoomId],
) -> Result<NewView, HsError> {
    let joined = hs.send_as(new, joined_rooms::v3::Request::new()).await?.joined_rooms.into_iter().collect();
    let filter = invites_filter(hs, new, Some(rooms.to_vec())).await?;
    let reserved = reservation_invites(hs, new, old, &filter, None, Duration::ZERO).await?.0;
    Ok(NewView { joined, reserved })
}

/// Uploads a filter of `new`'s sync that keeps only its pending invites (of `rooms`, or all):
/// everything else is filtered out by a type that exists nowhere; being new each time, it also
/// keeps Synapse from answering from its sync cache.
pub async fn invites_filter(hs: &Homeserver, new: &UserId, rooms: Option<Vec<OwnedRoomId>>) -> Result<String, HsError> {
    let nothing = vec![format!("org.handoff.none.{}", rand::random::<u64>())];
    let mut filter = FilterDefinition::default();
    filter.presence.types = Some(nothing.clone());
    filter.account_data.types = Some(nothing.clone());
    filter.room.rooms = rooms;
    filter.room.timeline.types = Some(nothing.clone());
    filter.room.timeline.limit = Some(UInt::from(1u32));
    filter.room.state.types = Some(nothing.clone());
    filter.room.ephemeral.types = Some(nothing.clone());
    filter.room.account_data.types = Some(nothing);
    // Uploaded, not inlined: a filter naming hundreds of rooms makes a query string longer than
    // the homeserver takes (with 500 rooms, Synapse never answered and the request hung).
    Ok(hs.send_as(new, create_filter::v3::Request::new(new.to_owned(), filter)).await?.filter_id)
}

/// The rooms `old` invited `new` to for a move and it has not answered yet (pending invites are
/// only in a sync), through `filter` ([`invites_filter`]): all of them without `since`, those
/// that came since then with it, waiting up to `timeout` for one (a long poll). With the sync's
/// token for the next call.
pub async fn reservation_invites(
    hs: &Homeserver,
    new: &UserId,
    old: &UserId,
    filter: &str,
    since: Option<String>,
    timeout: Duration,
) -> Result<(BTreeSet<OwnedRoomId>, String), HsError> {
    let mut req = sync_events::v3::Request::new();
    req.filter = Some(Filter::FilterId(filter.to_owned()));
    req.since = since;
    req.timeout = Some(timeout);
    let answer = hs.send_as(new, req).await?;
    let reason = reservation_reason(old);
    let reserved = answer
        .rooms
        .invite
        .into_iter()
        .filter(|(_, room)| {
            room.invite_state.events.iter().any(|raw| match raw.deserialize() {
                Ok(AnyStrippedStateEvent::RoomMember(ev)) => {
                    ev.state_key == new
                        && ev.sender == old
                        && ev.content.membership == MembershipState::Invite
                        && ev.content.reason.as_deref() == Some(reason.as_str())
                }
                _ => false,
            })
        })
        .map(|(room, _)| room)
        .collect();
    Ok((reserved, answer.next_batch))
}

/// The reason of a reservation's invite: also what tells the new account's server that an invite
/// is `old`'s move ([`read_new_view`]), not any other invite.
pub fn reservation_reason(old: &UserId) -> String {
    format!("{old} is moving to this account (handoff)")
}
