//! The border every bundle handoff did not just capture crosses: a file from another server, a
//! file given to the device side, a hand-edited one. What comes out is what capture could have
//! made, and each thing left behind is named ([`Dropped`]) for the dry run and the report.
//!
//! - the JSON is capped ([`MAX_JSON_BYTES`]) before it is parsed, and parsed straight into the
//!   bundle's types (no generic JSON tree of the whole file): IDs are ruma's, so a malformed one
//!   refuses the bundle;
//! - unknown fields are not kept (a newer handoff's bundle loses them, and says which);
//! - account data passes capture's allow-list, and never a secret or a device's own type
//!   ([`FORBIDDEN_ACCOUNT_DATA`]), whatever the list says;
//! - every collection and string has a bound, the room-key export is validated again.

use std::collections::BTreeSet;
use std::fmt;

use ruma::{OwnedRoomId, RoomId};
use serde::{Deserialize, Serialize};

use super::capture::is_client_setting;
use super::{BUNDLE_VERSION, Bundle, BundleFormatError, Priority};
use crate::keys;

/// The most bundle JSON read: a 1,000-room bundle with 50 messages of history per room is about
/// 20 MiB; parsing 32 MiB into the bundle's types stays well under 256 MiB.
pub const MAX_JSON_BYTES: usize = 32 << 20;

/// Account data types no bundle carries, whatever a list says: secrets (their keys and backups),
/// a device's own identity, and settings that point the client at another server's code
/// (identity server, widgets). Exact types, and prefixes ending in `.`.
pub const FORBIDDEN_ACCOUNT_DATA: &[&str] = &[
    "m.secret_storage.",
    "m.cross_signing.",
    "m.megolm_backup.",
    "m.identity_server",
    "m.widgets",
    // Dehydrated devices (MSC3814): a device's own keys.
    "org.matrix.msc3814",
];

/// Servers to join a room through: capture writes three.
pub const MAX_VIA: usize = 8;
/// People in the bundle with a DM, and each one's DM rooms.
pub const MAX_CONTACTS: usize = 10_000;
pub const MAX_DM_ROOMS_PER_CONTACT: usize = 64;
/// Rooms a space lists as its children.
pub const MAX_CHILDREN: usize = 10_000;
pub const MAX_IGNORED_USERS: usize = 10_000;
/// Push rules of one kind (override, content, room, sender, underride).
pub const MAX_PUSH_RULES_PER_KIND: usize = 2_000;
/// Client-settings account data: how many types, and the JSON size of one.
pub const MAX_SETTINGS: usize = 100;
pub const MAX_SETTING_BYTES: usize = 64 << 10;
/// Synapse refuses longer display names (`MAX_DISPLAYNAME_LEN`).
pub const MAX_DISPLAY_NAME_CHARS: usize = 256;
/// Names only shown (room names, contacts' names, the client that made the bundle).
pub const MAX_LABEL_CHARS: usize = 1_024;
/// Unknown fields named one by one in a report; the rest are counted.
const NAMED_UNKNOWN: usize = 10;

/// How much a bundle may hold where it is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Rooms kept: the most important first, as capture keeps them.
    pub max_rooms: usize,
    /// Messages of history kept per room.
    pub max_history: usize,
}

impl Limits {
    /// What the device side opens: a person's own file, any size capture could make.
    pub const DEVICE: Limits = Limits { max_rooms: 10_000, max_history: 1_000 };
}

/// A bundle that crossed the border, and what it left behind.
#[derive(Debug, Clone)]
pub struct Opened {
    pub bundle: Bundle,
    pub dropped: Vec<Dropped>,
}

/// Something a bundle held that the border did not let through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Dropped {
    /// Account data capture never carries.
    AccountData {
        event_type: String,
        why: AccountDataRefusal,
    },
    /// Fields this handoff doesn't know (the first few by name, the rest counted).
    UnknownFields {
        names: Vec<String>,
        more: usize,
    },
    /// Entries over a bound, or repeated.
    OverLimit {
        what: Collection,
        dropped: usize,
        limit: usize,
    },
    Duplicates {
        what: Collection,
        dropped: usize,
    },
    /// A display name longer than homeservers accept: the new account's own is kept.
    DisplayNameTooLong {
        chars: usize,
    },
    /// The room keys inside don't read as an Element key export.
    RoomKeys {
        why: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountDataRefusal {
    /// A secret, a device's own data, or a pointer at another server's code.
    Forbidden,
    /// Not a client setting that capture carries.
    NotCarried,
    /// Larger than [`MAX_SETTING_BYTES`].
    TooLarge,
}

/// The collections of a bundle that have a bound.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "of", content = "room", rename_all = "snake_case")]
pub enum Collection {
    Rooms,
    Via(OwnedRoomId),
    History(OwnedRoomId),
    Children(OwnedRoomId),
    Contacts,
    DmRooms,
    IgnoredUsers,
    PushRules,
    ClientSettings,
    UnreservedRooms,
}

/// Reads bundle JSON at the border: capped, parsed into the bundle's types, checked.
pub fn open(json: &[u8], limits: &Limits) -> Result<Opened, BundleFormatError> {
    if json.len() > MAX_JSON_BYTES {
        return Err(BundleFormatError::TooLarge { bytes: json.len() });
    }
    // The version first, so a newer format is named as such rather than as a parse error.
    #[derive(Deserialize)]
    struct Version {
        version: Option<serde_json::Value>,
    }
    let malformed = |e: serde_json::Error| BundleFormatError::Malformed(e.to_string());
    let peek: Version = serde_json::from_slice(json).map_err(malformed)?;
    match peek.version.as_ref().map(serde_json::Value::as_u64) {
        Some(Some(v)) if v == u64::from(BUNDLE_VERSION) => {}
        Some(Some(found)) => return Err(BundleFormatError::Version { found }),
        Some(None) => return Err(BundleFormatError::Malformed("its version is not a number".into())),
        None => return Err(BundleFormatError::Malformed("it has no version".into())),
    }
    let mut unknown = Vec::new();
    let mut de = serde_json::Deserializer::from_slice(json);
    let bundle: Bundle =
        serde_ignored::deserialize(&mut de, |path| unknown.push(path.to_string())).map_err(malformed)?;
    de.end().map_err(malformed)?;
    let mut opened = check(bundle, limits);
    if !unknown.is_empty() {
        let more = unknown.len().saturating_sub(NAMED_UNKNOWN);
        unknown.truncate(NAMED_UNKNOWN);
        opened.dropped.insert(0, Dropped::UnknownFields { names: unknown, more });
    }
    Ok(opened)
}

/// Holds a typed bundle to the border's bounds.
pub fn check(mut b: Bundle, limits: &Limits) -> Opened {
    let mut dropped = Vec::new();
    let mut over = |what: Collection, before: usize, limit: usize| {
        if before > limit {
            dropped.push(Dropped::OverLimit { what, dropped: before - limit, limit });
        }
    };

    // Rooms: once each, then the most important first, as capture keeps them.
    let before = b.rooms.len();
    let mut seen = BTreeSet::new();
    b.rooms.retain(|r| seen.insert(r.room_id.clone()));
    let repeated = before - b.rooms.len();
    b.rooms.sort_by_key(|r| priority_order(r.priority));
    over(Collection::Rooms, b.rooms.len(), limits.max_rooms);
    b.rooms.truncate(limits.max_rooms);
    for room in &mut b.rooms {
        let id = room.room_id.clone();
        over(Collection::Via(id.clone()), room.via.len(), MAX_VIA);
        room.via.truncate(MAX_VIA);
        over(Collection::Children(id.clone()), room.children.len(), MAX_CHILDREN);
        room.children.truncate(MAX_CHILDREN);
        if let Some(history) = &mut room.history {
            over(Collection::History(id), history.messages.len(), limits.max_history);
            history.messages.truncate(limits.max_history);
        }
        bound_label(&mut room.name);
    }

    over(Collection::Contacts, b.contacts.len(), MAX_CONTACTS);
    b.contacts.truncate(MAX_CONTACTS);
    let mut dm_rooms_over = 0;
    for contact in &mut b.contacts {
        dm_rooms_over += contact.dm_rooms.len().saturating_sub(MAX_DM_ROOMS_PER_CONTACT);
        contact.dm_rooms.truncate(MAX_DM_ROOMS_PER_CONTACT);
        bound_label(&mut contact.display_name);
    }
    if dm_rooms_over > 0 {
        over(Collection::DmRooms, MAX_DM_ROOMS_PER_CONTACT + dm_rooms_over, MAX_DM_ROOMS_PER_CONTACT);
    }

    let prefs = &mut b.preferences;
    over(Collection::IgnoredUsers, prefs.ignored_users.len(), MAX_IGNORED_USERS);
    prefs.ignored_users.truncate(MAX_IGNORED_USERS);
    if let Some(rules) = &mut prefs.push_rules {
        let lens =
            [rules.override_.len(), rules.content.len(), rules.room.len(), rules.sender.len(), rules.underride.len()];
        let extra: usize = lens.iter().map(|n| n.saturating_sub(MAX_PUSH_RULES_PER_KIND)).sum();
        if extra > 0 {
            over(Collection::PushRules, MAX_PUSH_RULES_PER_KIND + extra, MAX_PUSH_RULES_PER_KIND);
            // `IndexSet`s: keep the first rules of each kind, in their order.
            let keep = |n: usize| n.min(MAX_PUSH_RULES_PER_KIND);
            rules.override_ = rules.override_.drain(..).take(keep(lens[0])).collect();
            rules.content = rules.content.drain(..).take(keep(lens[1])).collect();
            rules.room = rules.room.drain(..).take(keep(lens[2])).collect();
            rules.sender = rules.sender.drain(..).take(keep(lens[3])).collect();
            rules.underride = rules.underride.drain(..).take(keep(lens[4])).collect();
        }
    }
    let settings = std::mem::take(&mut prefs.client_settings);
    let mut kept = 0;
    for (event_type, content) in settings {
        let why = if is_forbidden(&event_type) {
            Some(AccountDataRefusal::Forbidden)
        } else if !is_client_setting(&event_type) {
            Some(AccountDataRefusal::NotCarried)
        } else if serde_json::to_vec(&content).map_or(usize::MAX, |j| j.len()) > MAX_SETTING_BYTES
            || !content.is_object()
        {
            Some(AccountDataRefusal::TooLarge)
        } else {
            None
        };
        match why {
            Some(why) => dropped.push(Dropped::AccountData { event_type: bound_str(event_type), why }),
            None if kept < MAX_SETTINGS => {
                kept += 1;
                prefs.client_settings.insert(event_type, content);
            }
            None => kept += 1,
        }
    }
    if kept > MAX_SETTINGS {
        dropped.push(Dropped::OverLimit {
            what: Collection::ClientSettings,
            dropped: kept - MAX_SETTINGS,
            limit: MAX_SETTINGS,
        });
    }

    if let Some(name) = &b.profile.display_name {
        let chars = name.chars().count();
        if chars > MAX_DISPLAY_NAME_CHARS {
            dropped.push(Dropped::DisplayNameTooLong { chars });
            b.profile.display_name = None;
        }
    }
    b.source.client = bound_str(std::mem::take(&mut b.source.client));

    if let Some(export) = b.room_keys.take() {
        match keys::validate(&export.armored) {
            Ok(valid) => b.room_keys = Some(keys::KeyExport { bundle_passphrase: export.bundle_passphrase, ..valid }),
            Err(e) => dropped.push(Dropped::RoomKeys { why: e.to_string() }),
        }
    }

    // Rooms the old server won't reserve: only rooms of this bundle.
    if let Some(recipient) = &mut b.recipient {
        let rooms: BTreeSet<&RoomId> = b.rooms.iter().map(|r| &*r.room_id).collect();
        let before = recipient.unreserved.len();
        recipient.unreserved.retain(|id, _| rooms.contains(&**id));
        if recipient.unreserved.len() < before {
            dropped.push(Dropped::OverLimit {
                what: Collection::UnreservedRooms,
                dropped: before - recipient.unreserved.len(),
                limit: rooms.len(),
            });
        }
    }

    if repeated > 0 {
        dropped.push(Dropped::Duplicates { what: Collection::Rooms, dropped: repeated });
    }
    Opened { bundle: b, dropped }
}

/// Whether a bundle must never carry account data of this type.
pub fn is_forbidden(event_type: &str) -> bool {
    FORBIDDEN_ACCOUNT_DATA.iter().any(|f| if f.ends_with('.') { event_type.starts_with(f) } else { event_type == *f })
}

fn priority_order(p: Priority) -> u8 {
    match p {
        Priority::High => 0,
        Priority::Normal => 1,
        Priority::Low => 2,
    }
}

fn bound_label(label: &mut Option<String>) {
    if let Some(s) = label.take() {
        *label = Some(bound_str(s));
    }
}

fn bound_str(s: String) -> String {
    // The ellipsis counts, so a bounded label is within the bound the next time too.
    if s.chars().count() <= MAX_LABEL_CHARS {
        s
    } else {
        s.chars().take(MAX_LABEL_CHARS - 1).collect::<String>() + "…"
    }
}

impl fmt::Display for Dropped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dropped::AccountData { event_type, why } => {
                let why = match why {
                    AccountDataRefusal::Forbidden => {
                        "a bundle never carries secrets, a device's own data or pointers to another server's services"
                    }
                    AccountDataRefusal::NotCarried => "not a client setting that handoff moves",
                    AccountDataRefusal::TooLarge => "larger than a client setting handoff moves",
                };
                write!(f, "account data `{event_type}` was left out: {why}")
            }
            Dropped::UnknownFields { names, more } => {
                write!(f, "fields this handoff doesn't know were left out: {}", names.join(", "))?;
                if *more > 0 {
                    write!(f, " and {more} more")?;
                }
                Ok(())
            }
            Dropped::OverLimit { what, dropped, limit } => {
                write!(f, "{dropped} {} left out (at most {limit})", what.noun())
            }
            Dropped::Duplicates { what, dropped } => write!(f, "{dropped} repeated {} left out", what.noun()),
            Dropped::DisplayNameTooLong { chars } => write!(
                f,
                "the display name ({chars} characters) was left out: homeservers take at most {MAX_DISPLAY_NAME_CHARS}"
            ),
            Dropped::RoomKeys { why } => write!(f, "the room keys were left out: {why}"),
        }
    }
}

impl Collection {
    fn noun(&self) -> String {
        match self {
            Collection::Rooms => "room(s)".into(),
            Collection::Via(room) => format!("server(s) to join {room} through"),
            Collection::History(room) => format!("message(s) of history of {room}"),
            Collection::Children(room) => format!("child room(s) of the space {room}"),
            Collection::Contacts => "contact(s)".into(),
            Collection::DmRooms => "DM room(s) of contacts".into(),
            Collection::IgnoredUsers => "ignored user(s)".into(),
            Collection::PushRules => "push rule(s)".into(),
            Collection::ClientSettings => "client setting(s)".into(),
            Collection::UnreservedRooms => "unreserved room(s) not in the bundle".into(),
        }
    }
}

/// One line per dropped thing, for a chat message or a terminal (empty when nothing was).
pub fn describe(dropped: &[Dropped]) -> String {
    if dropped.is_empty() {
        return String::new();
    }
    let mut out = String::from("Left out of the bundle, as handoff moves nothing else:");
    for d in dropped {
        out.push_str("\n- ");
        out.push_str(&d.to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::tests::sample;
    use serde_json::json;

    fn open_value(v: &serde_json::Value) -> Result<Opened, BundleFormatError> {
        open(&serde_json::to_vec(v).unwrap(), &Limits::DEVICE)
    }

    #[test]
    fn what_capture_makes_crosses_unchanged() {
        let b = sample();
        let opened = open(&b.to_json(), &Limits::DEVICE).unwrap();
        assert_eq!(opened.bundle.to_json(), b.to_json());
        assert!(opened.dropped.is_empty(), "{:?}", opened.dropped);
    }

    #[test]
    fn secrets_and_pointers_to_other_servers_never_cross_whatever_the_list_says() {
        let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        v["preferences"]["client_settings"] = json!({
            "m.identity_server": {"base_url": "https://evil.example"},
            "m.widgets": {"w": {"url": "https://evil.example"}},
            "m.secret_storage.default_key": {"key": "k"},
            "m.secret_storage.key.k": {"algorithm": "x"},
            "m.cross_signing.master": {"encrypted": {}},
            "m.megolm_backup.v1": {"encrypted": {}},
            "m.direct": {},
            "im.vector.setting.breadcrumbs": {"recent_rooms": []},
            "im.vector.setting.huge": {"x": "a".repeat(MAX_SETTING_BYTES)},
            "im.vector.setting.not_an_object": 5,
        });
        let opened = open_value(&v).unwrap();
        let kept: Vec<&String> = opened.bundle.preferences.client_settings.keys().collect();
        assert_eq!(kept, ["im.vector.setting.breadcrumbs"]);
        let refused = |t: &str| {
            opened.dropped.iter().find_map(|d| match d {
                Dropped::AccountData { event_type, why } if event_type == t => Some(*why),
                _ => None,
            })
        };
        for t in [
            "m.identity_server",
            "m.widgets",
            "m.secret_storage.default_key",
            "m.cross_signing.master",
            "m.megolm_backup.v1",
        ] {
            assert_eq!(refused(t), Some(AccountDataRefusal::Forbidden), "{t}");
        }
        assert_eq!(refused("m.direct"), Some(AccountDataRefusal::NotCarried));
        assert_eq!(refused("im.vector.setting.huge"), Some(AccountDataRefusal::TooLarge));
        assert_eq!(refused("im.vector.setting.not_an_object"), Some(AccountDataRefusal::TooLarge));
        let text = describe(&opened.dropped);
        assert!(text.contains("`m.identity_server` was left out"), "{text}");
    }

    #[test]
    fn the_allow_list_names_nothing_forbidden() {
        for t in super::super::capture::CLIENT_SETTINGS {
            assert!(!is_forbidden(t), "{t}");
        }
        assert!(is_forbidden("m.secret_storage.key.abc") && is_forbidden("m.widgets") && !is_forbidden("m.widgets2"));
    }

    #[test]
    fn unknown_fields_are_dropped_and_named() {
        let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        v["future_field"] = json!({"a": 1});
        v["rooms"][0]["room_colour"] = "blue".into();
        let opened = open_value(&v).unwrap();
        let again: serde_json::Value = serde_json::from_slice(&opened.bundle.to_json()).unwrap();
        assert!(again.get("future_field").is_none() && again["rooms"][0].get("room_colour").is_none());
        let Some(Dropped::UnknownFields { names, more: 0 }) = opened.dropped.first() else {
            panic!("{:?}", opened.dropped)
        };
        assert_eq!(names, &["future_field".to_string(), "rooms.0.room_colour".to_string()]);
    }

    #[test]
    fn malformed_ids_and_sizes_refuse_the_bundle() {
        let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        v["rooms"][0]["room_id"] = "not a room".into();
        assert!(matches!(open_value(&v), Err(BundleFormatError::Malformed(_))));
        let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        v["source"]["user_id"] = "@no-server".into();
        assert!(matches!(open_value(&v), Err(BundleFormatError::Malformed(_))));
        let big = vec![b' '; MAX_JSON_BYTES + 1];
        assert!(matches!(open(&big, &Limits::DEVICE), Err(BundleFormatError::TooLarge { .. })));
        let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        v["version"] = 7.into();
        let err = open_value(&v).unwrap_err().to_string();
        assert!(err.contains("version 7") && err.contains("version 1"), "{err}");
        assert!(open(b"{}", &Limits::DEVICE).unwrap_err().to_string().contains("no version"));
        assert!(open(b"{\"version\": 1} trailing", &Limits::DEVICE).is_err());
    }

    #[test]
    fn collections_are_bounded_the_most_important_rooms_kept() {
        let mut b = sample();
        let fav = b.rooms[0].clone();
        let mut normal = fav.clone();
        normal.priority = Priority::Normal;
        normal.tags.clear();
        b.rooms = (0..5)
            .map(|i| {
                let mut r = normal.clone();
                r.room_id = format!("!n{i}:example.org").try_into().unwrap();
                r
            })
            .collect();
        b.rooms.push(fav.clone());
        b.rooms.push(fav.clone());
        b.rooms[0].via = (0..20).map(|i| format!("s{i}.example.org").try_into().unwrap()).collect();
        b.profile.display_name = Some("x".repeat(MAX_DISPLAY_NAME_CHARS + 1));
        let opened = check(b, &Limits { max_rooms: 3, max_history: 10 });
        let ids: Vec<&str> = opened.bundle.rooms.iter().map(|r| r.room_id.as_str()).collect();
        assert_eq!(ids, ["!fav:example.org", "!n0:example.org", "!n1:example.org"]);
        assert_eq!(opened.bundle.rooms[1].via.len(), MAX_VIA);
        assert!(opened.bundle.profile.display_name.is_none());
        let text = describe(&opened.dropped);
        for expected in [
            "3 room(s) left out (at most 3)",
            "1 repeated room(s)",
            "12 server(s) to join !n0:example.org",
            "display name (257 characters)",
        ] {
            assert!(text.contains(expected), "{expected} in {text}");
        }
    }

    #[test]
    fn room_keys_are_validated_again() {
        let mut b = sample();
        b.room_keys = Some(keys::KeyExport {
            armored: "-----BEGIN MEGOLM SESSION DATA-----\nnot base64!\n-----END MEGOLM SESSION DATA-----".into(),
            rounds: 1,
            encrypted_len: 1,
            bundle_passphrase: false,
        });
        let opened = check(b, &Limits::DEVICE);
        assert!(opened.bundle.room_keys.is_none());
        assert!(matches!(opened.dropped.as_slice(), [Dropped::RoomKeys { .. }]));
    }
}
