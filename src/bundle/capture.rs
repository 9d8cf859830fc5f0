//! Capturing a live account into a [`Bundle`], acting as the user through the acting registration.
//!
//! Requests: one `joined_rooms`, one filtered `/sync` that carries all global account data and
//! every room's tags, then per room its state (and with `--history`, its last messages), and per
//! contact their profile, all with bounded concurrency.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures_util::stream::{self, StreamExt, TryStreamExt};
use ruma::api::Direction;
use ruma::api::client::filter::{FilterDefinition, RoomEventFilter, RoomFilter};
use ruma::api::client::membership::joined_rooms;
use ruma::api::client::message::get_message_events;
use ruma::api::client::profile::get_profile;
use ruma::api::client::state::get_state_events;
use ruma::api::client::sync::sync_events;
use ruma::events::direct::DirectEventContent;
use ruma::events::ignored_user_list::IgnoredUserListEventContent;
use ruma::events::push_rules::PushRulesEventContent;
use ruma::events::room::member::MembershipState;
use ruma::events::tag::{TagEventContent, Tags};
use ruma::events::{AnyMessageLikeEvent, AnyStateEvent, AnyTimelineEvent, MessageLikeEvent, StateEvent};
use ruma::push::{Action, Ruleset};
use ruma::{Int, MilliSecondsSinceUnixEpoch, OwnedMxcUri, OwnedRoomId, OwnedServerName, OwnedUserId, UInt, UserId};
use serde_json::Value as JsonValue;

use super::{
    BUNDLE_VERSION, Bundle, Contact, History, HistoryMessage, Only, Preferences, Priority, Profile, Rank, RoomEntry,
    RoomKind, RoomNotifications, Source,
};
use crate::budget::{Budget, Class};
use crate::config::HttpUrl;
use crate::homeserver::{Homeserver, HsError};

/// Client-settings account data that a bundle carries: exact types, and prefixes ending in `.`.
/// Nothing secret is on it (no `m.secret_storage.*`, `m.cross_signing.*`, `m.megolm_backup.*`,
/// widgets or per-device data).
pub const CLIENT_SETTINGS: &[&str] = &[
    "im.vector.setting.",
    "im.vector.web.settings",
    "io.element.recent_emoji",
    "im.ponies.user_emotes",
    "im.ponies.emote_rooms",
];

pub fn is_client_setting(event_type: &str) -> bool {
    CLIENT_SETTINGS.iter().any(|s| if s.ends_with('.') { event_type.starts_with(s) } else { event_type == *s })
}

#[derive(Debug, Clone)]
pub struct CaptureOptions {
    pub only: Option<Only>,
    /// Room IDs or aliases to leave out.
    pub exclude: Vec<String>,
    /// Rooms that are never part of a bundle (the user's DM with the handoff bot).
    pub skip: Vec<OwnedRoomId>,
    /// How many recent messages per room to copy (0: none).
    pub history: usize,
    /// The shared budget of work in flight: each room read and each profile read takes a slot,
    /// so a capture adds no more load to the homeserver than the budget allows.
    pub pool: Arc<Budget>,
    /// The most rooms to capture: the most important first (favourites, then normal rooms, then
    /// low priority), the rest are counted in [`Captured::left_out`].
    pub max_rooms: usize,
    /// Names the capturing side in `source.client`.
    pub client: String,
}

/// A captured account, and how many of its rooms were over [`CaptureOptions::max_rooms`].
pub struct Captured {
    pub bundle: Bundle,
    pub left_out: usize,
}

/// Captures `user`'s account. `hs` must be able to act as `user` (the acting registration).
pub async fn capture(
    hs: &Homeserver,
    user: &UserId,
    homeserver_url: &HttpUrl,
    opts: &CaptureOptions,
) -> Result<Captured, HsError> {
    let pool = &opts.pool;
    let concurrency = pool.size();
    let party = Budget::party_of(user);
    // Every request of a capture takes a slot of the shared budget, these two as well.
    let (mut joined, account) = {
        let _slot = pool.acquire(party, Class::Normal).await;
        let joined = hs.send_as(user, joined_rooms::v3::Request::new()).await?.joined_rooms;
        (joined, account_data(hs, user).await?)
    };
    joined.retain(|r| !opts.skip.contains(r));

    let dm_peers: BTreeMap<&OwnedRoomId, &OwnedUserId> =
        account.direct.iter().flat_map(|(peer, rooms)| rooms.iter().map(move |r| (r, peer))).collect();
    let push_rules = account.push_rules.as_ref();
    let mut work: Vec<(OwnedRoomId, Tags, Option<OwnedUserId>)> = joined
        .into_iter()
        .map(|room_id| {
            let tags = account.tags.get(&room_id).cloned().unwrap_or_default();
            let peer = dm_peers.get(&room_id).map(|p| (*p).clone());
            (room_id, tags, peer)
        })
        .collect();
    // Over the limit, the most important rooms are kept (a stable sort keeps the rest in order).
    work.sort_by_key(|(_, tags, _)| Priority::from_tags(tags));
    let left_out = work.len().saturating_sub(opts.max_rooms);
    work.truncate(opts.max_rooms);
    let rooms: Vec<RoomEntry> = stream::iter(work)
        .map(|(room_id, tags, peer)| async move {
            let _slot = pool.acquire(party, Class::Normal).await;
            room_entry(hs, user, room_id, tags, peer, push_rules, opts.history).await
        })
        .buffer_unordered(concurrency)
        .try_collect()
        .await?;
    let mut rooms: Vec<RoomEntry> = rooms.into_iter().filter(|r| selected(r, opts)).collect();
    rooms.sort_by(|a, b| a.room_id.cmp(&b.room_id));

    // Contacts: the m.direct peers whose DMs are in the bundle.
    let mut contact_rooms: BTreeMap<OwnedUserId, Vec<OwnedRoomId>> = BTreeMap::new();
    for room in &rooms {
        if let Some(peer) = &room.dm_peer {
            contact_rooms.entry(peer.clone()).or_default().push(room.room_id.clone());
        }
    }
    let contacts: Vec<Contact> = stream::iter(contact_rooms)
        .map(|(peer, dm_rooms)| async move {
            let _slot = pool.acquire(party, Class::Normal).await;
            let (display_name, avatar_url) = profile_of(hs, user, &peer).await?;
            Ok::<_, HsError>(Contact { user_id: peer, display_name, avatar_url, dm_rooms })
        })
        .buffer_unordered(concurrency)
        .try_collect()
        .await?;
    let mut contacts = contacts;
    contacts.sort_by(|a, b| a.user_id.cmp(&b.user_id));

    let (display_name, avatar_url) = {
        let _slot = pool.acquire(party, Class::Normal).await;
        profile_of(hs, user, user).await?
    };
    let bundle = Bundle {
        version: BUNDLE_VERSION,
        source: Source {
            user_id: user.to_owned(),
            server_name: user.server_name().to_owned(),
            homeserver_url: homeserver_url.clone(),
            exported_at: MilliSecondsSinceUnixEpoch::now(),
            client: opts.client.clone(),
        },
        rooms,
        contacts,
        preferences: Preferences {
            push_rules: account.push_rules,
            ignored_users: account.ignored_users,
            client_settings: account.client_settings,
        },
        profile: Profile { display_name, avatar_url },
        room_keys: None,
        login_token: None,
        recipient: None,
    };
    Ok(Captured { bundle, left_out })
}

fn selected(room: &RoomEntry, opts: &CaptureOptions) -> bool {
    let excluded = opts
        .exclude
        .iter()
        .any(|e| room.room_id.as_str() == e || room.canonical_alias.as_ref().is_some_and(|a| a.as_str() == e));
    opts.only.is_none_or(|only| only.admits(room)) && !excluded
}

/// The account data the bundle needs, from one filtered `/sync`.
#[derive(Default)]
struct AccountData {
    direct: BTreeMap<OwnedUserId, Vec<OwnedRoomId>>,
    push_rules: Option<Ruleset>,
    ignored_users: Vec<OwnedUserId>,
    client_settings: BTreeMap<String, JsonValue>,
    tags: BTreeMap<OwnedRoomId, Tags>,
}

async fn account_data(hs: &Homeserver, user: &UserId) -> Result<AccountData, HsError> {
    // Everything off but account data, global and per room (tags).
    let mut filter = FilterDefinition::ignore_all();
    filter.account_data = Default::default();
    filter.room = RoomFilter::ignore_all();
    filter.room.rooms = None;
    filter.room.account_data = RoomEventFilter::empty();
    filter.room.state = RoomEventFilter::ignore_all();
    filter.room.timeline = RoomEventFilter::ignore_all();
    filter.room.ephemeral = RoomEventFilter::ignore_all();
    let mut req = sync_events::v3::Request::new();
    req.filter = Some(sync_events::v3::Filter::FilterDefinition(filter));
    let resp = hs.send_as(user, req).await?;

    let mut data = AccountData::default();
    for raw in &resp.account_data.events {
        let Ok(Some(kind)) = raw.get_field::<String>("type") else {
            continue;
        };
        let content = || raw.get_field::<JsonValue>("content").ok().flatten().unwrap_or_default();
        match kind.as_str() {
            "m.direct" => {
                if let Ok(c) = serde_json::from_value::<DirectEventContent>(content()) {
                    data.direct =
                        c.0.into_iter()
                            .filter_map(|(k, v)| OwnedUserId::try_from(k.to_string()).ok().map(|u| (u, v)))
                            .collect();
                }
            }
            "m.push_rules" => {
                data.push_rules = serde_json::from_value::<PushRulesEventContent>(content()).ok().map(|c| c.global)
            }
            "m.ignored_user_list" => {
                if let Ok(c) = serde_json::from_value::<IgnoredUserListEventContent>(content()) {
                    data.ignored_users = c.ignored_users.into_keys().collect();
                }
            }
            t if is_client_setting(t) => {
                data.client_settings.insert(t.to_owned(), content());
            }
            _ => {}
        }
    }
    for (room_id, room) in &resp.rooms.join {
        for raw in &room.account_data.events {
            if raw.get_field::<String>("type").ok().flatten().as_deref() != Some("m.tag") {
                continue;
            }
            if let Ok(Some(c)) = raw.get_field::<TagEventContent>("content") {
                data.tags.insert(room_id.clone(), c.tags);
            }
        }
    }
    Ok(data)
}

async fn room_entry(
    hs: &Homeserver,
    user: &UserId,
    room_id: OwnedRoomId,
    tags: Tags,
    dm_peer: Option<OwnedUserId>,
    push_rules: Option<&Ruleset>,
    history: usize,
) -> Result<RoomEntry, HsError> {
    let state = hs.send_as(user, get_state_events::v3::Request::new(room_id.clone())).await?.room_state;
    let room_id = &room_id;
    let mut entry = RoomEntry {
        room_id: room_id.clone(),
        via: vec![],
        name: None,
        canonical_alias: None,
        kind: if dm_peer.is_some() { RoomKind::Dm } else { RoomKind::Group },
        dm_peer,
        priority: Priority::from_tags(&tags),
        tags,
        rank: Rank::Level(Int::from(0u32)),
        notifications: notifications(room_id, push_rules),
        encrypted: false,
        join_rules: None,
        history_visibility: None,
        room_version: None,
        children: vec![],
        history: None,
    };
    let mut creators: BTreeSet<OwnedUserId> = BTreeSet::new();
    let mut privileged_creators = false;
    let mut power_levels = None;
    let mut servers: BTreeMap<OwnedServerName, usize> = BTreeMap::new();
    for raw in &state {
        let Ok(event) = raw.deserialize() else {
            continue;
        };
        match event {
            AnyStateEvent::RoomCreate(StateEvent::Original(ev)) => {
                if ev.content.room_type == Some(ruma::room::RoomType::Space) {
                    entry.kind = RoomKind::Space;
                }
                privileged_creators =
                    ev.content.room_version.rules().is_some_and(|r| r.authorization.explicitly_privilege_room_creators);
                creators.insert(ev.sender.clone());
                creators.extend(ev.content.additional_creators.iter().cloned());
                entry.room_version = Some(ev.content.room_version);
            }
            AnyStateEvent::RoomName(StateEvent::Original(ev)) => {
                entry.name = Some(ev.content.name).filter(|n| !n.is_empty())
            }
            AnyStateEvent::RoomCanonicalAlias(StateEvent::Original(ev)) => entry.canonical_alias = ev.content.alias,
            AnyStateEvent::RoomJoinRules(StateEvent::Original(ev)) => entry.join_rules = Some(ev.content),
            AnyStateEvent::RoomHistoryVisibility(StateEvent::Original(ev)) => {
                entry.history_visibility = Some(ev.content.history_visibility)
            }
            AnyStateEvent::RoomEncryption(StateEvent::Original(_)) => entry.encrypted = true,
            AnyStateEvent::RoomPowerLevels(StateEvent::Original(ev)) => power_levels = Some(ev.content),
            AnyStateEvent::RoomMember(StateEvent::Original(ev)) => {
                if ev.content.membership == MembershipState::Join
                    && let Ok(member) = <&UserId>::try_from(ev.state_key.as_str())
                {
                    *servers.entry(member.server_name().to_owned()).or_default() += 1;
                }
            }
            AnyStateEvent::SpaceChild(StateEvent::Original(ev)) => {
                if !ev.content.via.is_empty()
                    && let Ok(child) = OwnedRoomId::try_from(ev.state_key.as_str())
                {
                    entry.children.push(child);
                }
            }
            _ => {}
        }
    }
    entry.rank = if privileged_creators && creators.contains(user) {
        Rank::Creator
    } else {
        match &power_levels {
            Some(pl) => Rank::Level(pl.users.get(user).copied().unwrap_or(pl.users_default)),
            // Without a power levels event the creator has 100, everyone else 0.
            None if creators.contains(user) => Rank::Level(Int::from(100u32)),
            None => Rank::Level(Int::from(0u32)),
        }
    };
    entry.via = via_servers(servers);
    entry.children.sort();
    if history > 0 {
        entry.history = Some(recent_messages(hs, user, room_id, history).await?);
    }
    Ok(entry)
}

/// Up to three servers, most joined members first (ties by name, so captures are stable).
fn via_servers(servers: BTreeMap<OwnedServerName, usize>) -> Vec<OwnedServerName> {
    let mut servers: Vec<_> = servers.into_iter().collect();
    servers.sort_by(|(a, n), (b, m)| m.cmp(n).then_with(|| a.cmp(b)));
    servers.into_iter().take(3).map(|(s, _)| s).collect()
}

fn notifications(room_id: &OwnedRoomId, rules: Option<&Ruleset>) -> RoomNotifications {
    let Some(rules) = rules else {
        return RoomNotifications::Default;
    };
    let notifies = |actions: &[Action]| actions.iter().any(|a| matches!(a, Action::Notify));
    if let Some(rule) = rules.override_.iter().find(|r| r.rule_id == room_id.as_str() && r.enabled)
        && !notifies(&rule.actions)
    {
        return RoomNotifications::Mute;
    }
    match rules.room.iter().find(|r| r.rule_id == *room_id && r.enabled) {
        Some(rule) if notifies(&rule.actions) => RoomNotifications::AllMessages,
        Some(_) => RoomNotifications::MentionsAndKeywords,
        None => RoomNotifications::Default,
    }
}

async fn recent_messages(hs: &Homeserver, user: &UserId, room_id: &OwnedRoomId, n: usize) -> Result<History, HsError> {
    let mut req = get_message_events::v3::Request::new(room_id.clone(), Direction::Backward);
    req.limit = UInt::try_from(n).unwrap_or(UInt::MAX);
    // Only messages: state changes are not history a person reads.
    req.filter.types = Some(vec!["m.room.message".into(), "m.room.encrypted".into()]);
    let chunk = hs.send_as(user, req).await?.chunk;
    let mut history = History { messages: vec![], encrypted_count: 0 };
    for raw in chunk.iter().rev() {
        match raw.deserialize() {
            Ok(AnyTimelineEvent::MessageLike(AnyMessageLikeEvent::RoomMessage(MessageLikeEvent::Original(ev)))) => {
                history.messages.push(HistoryMessage {
                    event_id: ev.event_id,
                    sender: ev.sender,
                    origin_server_ts: ev.origin_server_ts,
                    content: ev.content,
                })
            }
            Ok(AnyTimelineEvent::MessageLike(AnyMessageLikeEvent::RoomEncrypted(_))) => history.encrypted_count += 1,
            _ => {}
        }
    }
    Ok(history)
}

/// A user's display name and avatar; `None`s when the profile can't be read (e.g. a remote user
/// whose server is away).
async fn profile_of(
    hs: &Homeserver,
    acting: &UserId,
    whose: &UserId,
) -> Result<(Option<String>, Option<OwnedMxcUri>), HsError> {
    match hs.send_as(acting, get_profile::v3::Request::new(whose.to_owned())).await {
        Ok(p) => {
            let name = p.get("displayname").and_then(JsonValue::as_str).map(str::to_owned);
            let avatar = p.get("avatar_url").and_then(JsonValue::as_str).map(OwnedMxcUri::from);
            Ok((name, avatar))
        }
        Err(e) if e.is_transient() => Err(e),
        Err(e) => {
            tracing::debug!(user = %whose, error = %e, "profile not readable");
            Ok((None, None))
        }
    }
}
