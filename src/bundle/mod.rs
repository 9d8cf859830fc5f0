//! The client bundle: everything that makes an account "yours", as one versioned document.
//!
//! Built from ruma types. A bundle that handoff did not just capture is read only through
//! [`border::open`], which keeps what capture could have made and names the rest; a bundle of an
//! unsupported version is refused with both versions named.

pub mod border;
pub mod capture;
pub mod file;
mod summary;

use std::collections::BTreeMap;

use ruma::events::room::history_visibility::HistoryVisibility;
use ruma::events::room::join_rules::RoomJoinRulesEventContent;
use ruma::events::room::message::RoomMessageEventContent;
use ruma::events::tag::{TagName, Tags};
use ruma::push::Ruleset;
use ruma::{
    Int, MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedMxcUri, OwnedRoomAliasId, OwnedRoomId, OwnedServerName,
    OwnedUserId, RoomVersionId,
};
use serde::{Deserialize, Serialize};
use serde_json::Value as JsonValue;

pub use summary::Summary;

use crate::config::{HttpUrl, Secret};
use crate::keys::KeyExport;

/// The bundle format this handoff writes and reads.
pub const BUNDLE_VERSION: u32 = 1;

/// Identifies a stored bundle: its owner and a number that grows, so that an owner's bundles sort
/// oldest first under the owner's prefix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleId(String);

impl BundleId {
    pub fn new(owner: &ruma::UserId, number: u64) -> Self {
        BundleId(format!("{}{number:020}", Self::prefix(owner)))
    }

    /// What every bundle ID of `owner` starts with.
    pub fn prefix(owner: &ruma::UserId) -> String {
        format!("{owner}\0")
    }

    /// An ID as it was stored (the key of a stored bundle).
    pub fn from_stored(key: &[u8]) -> Self {
        BundleId(String::from_utf8_lossy(key).into_owned())
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

/// Which part of the account to take (`--only`), at export and at import.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Only {
    Favourites,
    Dms,
    Rooms,
}

impl Only {
    /// Whether `room` is part of what was asked for.
    pub fn admits(self, room: &RoomEntry) -> bool {
        match self {
            Only::Favourites => room.priority == Priority::High,
            Only::Dms => room.kind == RoomKind::Dm,
            Only::Rooms => room.kind != RoomKind::Dm,
        }
    }
}

impl std::str::FromStr for Only {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "favourites" | "favorites" => Ok(Only::Favourites),
            "dms" => Ok(Only::Dms),
            "rooms" => Ok(Only::Rooms),
            other => Err(format!("`--only` takes favourites, dms or rooms, not `{other}`")),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bundle {
    pub version: u32,
    pub source: Source,
    pub rooms: Vec<RoomEntry>,
    pub contacts: Vec<Contact>,
    pub preferences: Preferences,
    pub profile: Profile,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room_keys: Option<KeyExport>,
    /// A single-use login token of the same account (`handoff export --login-token`): the device
    /// that imports the bundle signs in with it, without the password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login_token: Option<LoginToken>,
    /// With `export --to`: the one account the bundle is for, and until when. What lets another
    /// server's handoff take the bundle file: the file opens with the code, and the code is this
    /// account's alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient: Option<Recipient>,
}

/// The account a bundle was exported for (`export --to`), and when its code expires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    pub user_id: OwnedUserId,
    pub expires_at: MilliSecondsSinceUnixEpoch,
    /// For an account on another server: the rooms where the old server will reserve no seat,
    /// and why (its preflight). That server's import then expects no invite there.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unreserved: BTreeMap<OwnedRoomId, Blocked>,
}

/// Why a room can't be moved into the new account, whatever is tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Blocked {
    /// The new account is banned from the room.
    Banned,
    /// The room's server ACL excludes the new account's server.
    ServerAcl,
    /// The room does not federate (`m.federate: false`) and the new account is on another server.
    NoFederation,
    /// The room is not public and the old account may not invite.
    CannotInvite,
}

impl Blocked {
    /// What happened and what the user can do about it.
    pub fn explain(self) -> &'static str {
        match self {
            Blocked::Banned => "the new account is banned there: ask a moderator to unban it",
            Blocked::ServerAcl => "the room's server ACL excludes the new account's server",
            Blocked::NoFederation => "the room is limited to the old account's server",
            Blocked::CannotInvite => "the old account may not invite there: ask a moderator to invite the new account",
        }
    }
}

/// A login token (`m.login.token`) and when the homeserver said it expires.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoginToken {
    pub token: Secret,
    pub expires_at: MilliSecondsSinceUnixEpoch,
}

/// Who exported, from where: the second client needs the server identity to connect.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Source {
    pub user_id: OwnedUserId,
    pub server_name: OwnedServerName,
    /// The client-server API base URL of the exporting account's homeserver.
    pub homeserver_url: HttpUrl,
    pub exported_at: MilliSecondsSinceUnixEpoch,
    /// How the bundle was made (`handoff-bot`, `handoff-cli`), with the handoff version.
    pub client: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoomKind {
    Dm,
    Group,
    Space,
}

/// Derived from the tags: `m.favourite` is high, `m.lowpriority` low, everything else normal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    Normal,
    Low,
}

impl Priority {
    pub fn from_tags(tags: &Tags) -> Priority {
        if tags.contains_key(&TagName::Favorite) {
            Priority::High
        } else if tags.contains_key(&TagName::LowPriority) {
            Priority::Low
        } else {
            Priority::Normal
        }
    }
}

/// The account's rank in a room. Room version 12 creators outrank every power level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rank {
    Creator,
    #[serde(untagged)]
    Level(Int),
}

/// The per-room notification setting, as clients show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoomNotifications {
    /// No room-specific rule: the account's defaults apply.
    Default,
    /// A `room` rule that notifies on every message.
    AllMessages,
    /// A `room` rule that doesn't notify: mentions and keywords only.
    MentionsAndKeywords,
    /// An `override` rule that doesn't notify: nothing at all.
    Mute,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoomEntry {
    pub room_id: OwnedRoomId,
    /// Servers to join through: the ones with most joined members, as matrix.to links choose them.
    pub via: Vec<OwnedServerName>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canonical_alias: Option<OwnedRoomAliasId>,
    pub kind: RoomKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dm_peer: Option<OwnedUserId>,
    #[serde(default)]
    pub tags: Tags,
    pub priority: Priority,
    pub rank: Rank,
    pub notifications: RoomNotifications,
    pub encrypted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join_rules: Option<RoomJoinRulesEventContent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_visibility: Option<HistoryVisibility>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room_version: Option<RoomVersionId>,
    /// For spaces: the rooms listed as children.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<OwnedRoomId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<History>,
}

/// The last messages of a room: unencrypted ones copied, encrypted ones only counted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct History {
    pub messages: Vec<HistoryMessage>,
    pub encrypted_count: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryMessage {
    pub event_id: OwnedEventId,
    pub sender: OwnedUserId,
    pub origin_server_ts: MilliSecondsSinceUnixEpoch,
    pub content: RoomMessageEventContent,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Contact {
    pub user_id: OwnedUserId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avatar_url: Option<OwnedMxcUri>,
    pub dm_rooms: Vec<OwnedRoomId>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Preferences {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_rules: Option<Ruleset>,
    #[serde(default)]
    pub ignored_users: Vec<OwnedUserId>,
    /// Client-settings account data, by event type (only types on [`capture::CLIENT_SETTINGS`]).
    #[serde(default)]
    pub client_settings: BTreeMap<String, JsonValue>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avatar_url: Option<OwnedMxcUri>,
}

#[derive(Debug, thiserror::Error)]
pub enum BundleFormatError {
    #[error(
        "this bundle has format version {found}, and this handoff reads version {BUNDLE_VERSION}: upgrade handoff to open it"
    )]
    Version { found: u64 },
    #[error("this is not a handoff bundle: {0}")]
    Malformed(String),
    #[error("this bundle is {bytes} bytes of JSON, more than handoff reads ({} MiB)", border::MAX_JSON_BYTES >> 20)]
    TooLarge { bytes: usize },
}

impl Bundle {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a bundle always serialises")
    }

    pub fn summary(&self) -> Summary {
        Summary::of(self)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ruma::events::tag::TagInfo;
    use ruma::{owned_room_id, owned_server_name, owned_user_id};

    pub fn sample() -> Bundle {
        let mut tags = Tags::new();
        let mut fav = TagInfo::new();
        fav.order = Some(0.25);
        tags.insert(TagName::Favorite, fav);
        Bundle {
            version: BUNDLE_VERSION,
            source: Source {
                user_id: owned_user_id!("@old:example.org"),
                server_name: owned_server_name!("example.org"),
                homeserver_url: "https://matrix.example.org".parse().expect("a URL"),
                exported_at: MilliSecondsSinceUnixEpoch(1_700_000_000_000u64.try_into().unwrap()),
                client: "handoff-bot 0.1.0".into(),
            },
            rooms: vec![RoomEntry {
                room_id: owned_room_id!("!fav:example.org"),
                via: vec![owned_server_name!("example.org")],
                name: Some("Favourite".into()),
                canonical_alias: None,
                kind: RoomKind::Group,
                dm_peer: None,
                priority: Priority::from_tags(&tags),
                tags,
                rank: Rank::Creator,
                notifications: RoomNotifications::Default,
                encrypted: true,
                join_rules: None,
                history_visibility: Some(HistoryVisibility::Shared),
                room_version: Some(RoomVersionId::V12),
                children: vec![],
                history: None,
            }],
            contacts: vec![],
            preferences: Preferences {
                push_rules: None,
                ignored_users: vec![owned_user_id!("@spam:evil.org")],
                client_settings: BTreeMap::new(),
            },
            profile: Profile { display_name: Some("Old".into()), ..Default::default() },
            room_keys: None,
            login_token: None,
            recipient: None,
        }
    }

    #[test]
    fn round_trips_and_derives_priority() {
        let b = sample();
        assert_eq!(b.rooms[0].priority, Priority::High);
        let back = border::open(&b.to_json(), &border::Limits::DEVICE).unwrap().bundle;
        assert_eq!(back.to_json(), b.to_json());
    }

    #[test]
    fn rank_serialises_as_creator_or_number() {
        assert_eq!(serde_json::to_string(&Rank::Creator).unwrap(), "\"creator\"");
        assert_eq!(serde_json::to_string(&Rank::Level(Int::from(50u32))).unwrap(), "50");
        assert_eq!(serde_json::from_str::<Rank>("100").unwrap(), Rank::Level(Int::from(100u32)));
    }
}
