//! Planning a transfer: a pure function from the bundle, the second client's requirements and the
//! rooms' current state (a [`World`]) to a serialisable [`Plan`]. Nothing here does I/O, so plans are
//! tested on JSON worlds, without a homeserver.

use std::collections::{BTreeMap, BTreeSet};

use ruma::events::room::create::RoomCreateEventContent;
use ruma::events::room::history_visibility::HistoryVisibility;
use ruma::events::room::join_rules::RoomJoinRulesEventContent;
use ruma::events::room::member::MembershipState;
use ruma::events::room::power_levels::{RoomPowerLevels, RoomPowerLevelsEventContent, UserPowerLevel};
use ruma::events::room::server_acl::RoomServerAclEventContent;
use ruma::events::tag::TagName;
use ruma::room::{AllowRule, JoinRule};
use ruma::{Int, OwnedRoomId, OwnedServerName, OwnedUserId, RoomId, UserId};
use serde::{Deserialize, Serialize};

pub use crate::bundle::Blocked;
use crate::bundle::{Bundle, Only, Priority, RoomEntry, RoomKind};

/// The current state of the bundle's rooms, as the old account sees them. A room missing from
/// `rooms` is gone (the old account is no longer in it, or it no longer exists).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct World {
    pub rooms: BTreeMap<OwnedRoomId, RoomFacts>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoomFacts {
    /// The sender of `m.room.create`.
    pub creator: OwnedUserId,
    pub create: RoomCreateEventContent,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_levels: Option<RoomPowerLevelsEventContent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join_rules: Option<RoomJoinRulesEventContent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_acl: Option<RoomServerAclEventContent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_visibility: Option<HistoryVisibility>,
    /// The new account's membership, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_membership: Option<MembershipState>,
}

impl RoomFacts {
    pub fn power_levels(&self) -> RoomPowerLevels {
        let rules = self
            .create
            .room_version
            .rules()
            .map(|r| r.authorization)
            .unwrap_or_else(|| ruma::room_version_rules::RoomVersionRules::V12.authorization);
        let mut creators = vec![self.creator.clone()];
        if rules.explicitly_privilege_room_creators {
            creators.extend(self.create.additional_creators.iter().cloned());
        }
        RoomPowerLevels::new(self.power_levels.clone().into(), &rules, creators)
    }

    fn join_rule(&self) -> JoinRule {
        self.join_rules.as_ref().map_or(JoinRule::Invite, |j| j.join_rule.clone())
    }
}

/// What the second client asked for.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Requirements {
    pub only: Option<Only>,
    pub max_rooms: Option<usize>,
    /// How many captured messages per room to deliver to the new account (0: none).
    #[serde(default)]
    pub history: usize,
    /// Set the old account's display name and avatar even where the new account has its own
    /// (`--profile-from-old`); without it, its own are kept and the report says so.
    #[serde(default)]
    pub profile_from_old: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub old: OwnedUserId,
    pub new: OwnedUserId,
    /// In the order they will be moved: highest priority first, dependencies before dependents.
    pub rooms: Vec<RoomPlan>,
    /// Rooms selected but not planned yet, in order: the engine plans the first rooms (favourites
    /// and DMs) and moves them before it reads the rest of the account.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unplanned: Vec<OwnedRoomId>,
    /// Rooms of the bundle left out by `--only` or `--max-rooms`.
    pub left_out: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoomPlan {
    pub room_id: OwnedRoomId,
    pub via: Vec<OwnedServerName>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub kind: RoomKind,
    pub priority: Priority,
    pub action: Action,
    /// The power level to give the new account, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub give_level: Option<Int>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<Warning>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "action", content = "reason")]
pub enum Action {
    /// Invite (if the old account may) and join.
    Join,
    /// The new account is already in the room.
    AlreadyJoined,
    Blocked(Blocked),
    /// The old account is no longer in the room, or it no longer exists.
    Gone,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "warning")]
pub enum Warning {
    /// History before the join won't be visible to the new account.
    HistoryHidden { visibility: HistoryVisibility },
    /// The old account's rank can't be carried whole.
    RankNotCarried { had: String, gives: Option<Int> },
    /// The rank the plan meant to give was refused when the move gave it (the homeserver's words).
    RankRefused { reason: String },
    /// A bundle from another server, and no invite of the old account (the reservation) reached
    /// the new one in any of its rooms: the move is not proven, so no move notice is posted (an
    /// invite, signed by the old account's server, is what shows the old account chose this one).
    Unreserved,
}

impl Warning {
    pub fn explain(&self) -> String {
        match self {
            Warning::HistoryHidden { visibility } => {
                format!("history visibility is `{visibility}`: the new account won't see earlier messages")
            }
            Warning::RankNotCarried { had, gives: Some(l) } => {
                format!("the old account's rank ({had}) can't be given; the new account gets power level {l}")
            }
            Warning::RankNotCarried { had, gives: None } => {
                format!("the old account's rank ({had}) can't be given: it may not change power levels")
            }
            Warning::RankRefused { reason } => format!("the old account's rank could not be given: {reason}"),
            Warning::Unreserved => {
                "no invite from the old account reached the new one in any room, so the move is not proven: no move notice is posted".to_owned()
            }
        }
    }
}

/// Plans the transfer of `bundle` from `old` to `new`, every room at once (`import --dry-run`).
pub fn plan(bundle: &Bundle, new: &UserId, req: &Requirements, world: &World) -> Plan {
    let mut plan = unplanned(bundle, new, req, world);
    let ids = std::mem::take(&mut plan.unplanned);
    plan.rooms = plan_rooms(bundle, new, &ids, world);
    plan
}

/// A plan that has selected and ordered its rooms (from the bundle and what is known of the
/// world) but planned none of them yet: [`Plan::next_part`] says which to read and plan next.
pub fn unplanned(bundle: &Bundle, new: &UserId, req: &Requirements, world: &World) -> Plan {
    let mut rooms: Vec<&RoomEntry> = bundle.rooms.iter().filter(|r| req.only.is_none_or(|o| o.admits(r))).collect();
    let selected = rooms.len();
    rooms.sort_by(|a, b| order_key(a).partial_cmp(&order_key(b)).unwrap_or(std::cmp::Ordering::Equal));
    let mut rooms = dependencies_first(rooms, world);
    if let Some(max) = req.max_rooms {
        rooms.truncate(max);
    }
    let left_out = bundle.rooms.len() - selected + (selected - rooms.len());
    Plan {
        old: bundle.source.user_id.clone(),
        new: new.to_owned(),
        rooms: vec![],
        unplanned: rooms.into_iter().map(|r| r.room_id.clone()).collect(),
        left_out,
    }
}

/// Plans the given rooms of the bundle, in the given order, from their current state.
pub fn plan_rooms(bundle: &Bundle, new: &UserId, ids: &[OwnedRoomId], world: &World) -> Vec<RoomPlan> {
    let old = &bundle.source.user_id;
    let entries: BTreeMap<&RoomId, &RoomEntry> = bundle.rooms.iter().map(|r| (r.room_id.as_ref(), r)).collect();
    ids.iter()
        .filter_map(|id| entries.get::<RoomId>(id))
        .map(|r| plan_room(r, old, new, world.rooms.get(&r.room_id)))
        .collect()
}

/// Plans without the old account's view of its rooms (the device side, signed in as the new
/// account alone): every selected room is to be joined by its ID through its via servers, and the
/// join itself says whether it needs an invite. `joined`: the rooms the new account is in already.
pub fn blind(bundle: &Bundle, new: &UserId, req: &Requirements, joined: &BTreeSet<OwnedRoomId>) -> Plan {
    let mut plan = unplanned(bundle, new, req, &World::default());
    let entries: BTreeMap<&RoomId, &RoomEntry> = bundle.rooms.iter().map(|r| (r.room_id.as_ref(), r)).collect();
    plan.rooms = std::mem::take(&mut plan.unplanned)
        .iter()
        .filter_map(|id| entries.get::<RoomId>(id))
        .map(|r| RoomPlan {
            room_id: r.room_id.clone(),
            via: r.via.clone(),
            name: r.name.clone(),
            kind: r.kind,
            priority: r.priority,
            action: if joined.contains(&r.room_id) { Action::AlreadyJoined } else { Action::Join },
            give_level: None,
            warnings: vec![],
        })
        .collect();
    // Where the old server said it would reserve no seat for this account (its preflight, in
    // the bundle), no invite is coming: skipped at once, with its reason.
    if let Some(recipient) = bundle.recipient.as_ref().filter(|r| r.user_id == new) {
        for room in &mut plan.rooms {
            if let (Action::Join, Some(b)) = (room.action, recipient.unreserved.get(&room.room_id)) {
                room.action = Action::Blocked(*b);
            }
        }
    }
    plan
}

/// Plans a bundle that came from another server, as the new account sees its rooms (the old
/// account can't be read here): [`blind`]. `reserved` are the rooms the old account invited the new
/// one to; without any, the move is not proven and every room gets [`Warning::Unreserved`] (a room
/// the old account can't invite to, a public one say, needs no invite of its own: one anywhere
/// shows the old account chose this account). Nothing is planned for the old account to do.
pub fn received(
    bundle: &Bundle,
    new: &UserId,
    req: &Requirements,
    joined: &BTreeSet<OwnedRoomId>,
    reserved: &BTreeSet<OwnedRoomId>,
) -> Plan {
    let mut plan = blind(bundle, new, req, joined);
    let proven = plan.rooms.iter().any(|r| reserved.contains(&r.room_id));
    if !proven {
        for room in &mut plan.rooms {
            room.warnings.push(Warning::Unreserved);
        }
    }
    plan
}

/// The rooms that are moved first, before the rest of the account is even read: favourites and
/// DMs (unless marked low priority), the rooms a person needs on a new device right away.
pub fn is_first(r: &RoomEntry) -> bool {
    r.priority == Priority::High || (r.kind == RoomKind::Dm && r.priority == Priority::Normal)
}

/// Favourites first (by tag order, untagged order last), then DMs, then other rooms, then low
/// priority ones; then by name, then ID, so plans are stable.
fn order_key(r: &RoomEntry) -> (u8, f64, String, String) {
    let bucket = match r.priority {
        Priority::High => 0,
        Priority::Normal if r.kind == RoomKind::Dm => 1,
        Priority::Normal => 2,
        Priority::Low => 3,
    };
    let tag = match r.priority {
        Priority::High => r.tags.get(&TagName::Favorite),
        Priority::Low => r.tags.get(&TagName::LowPriority),
        Priority::Normal => None,
    };
    let order = tag.and_then(|t| t.order).unwrap_or(f64::INFINITY);
    (bucket, order, r.name.clone().unwrap_or_default(), r.room_id.to_string())
}

/// The rooms a restricted room's `allow` rules name (those that are in the plan too).
fn depends_on<'a>(room: &RoomEntry, world: &'a World) -> Vec<&'a RoomId> {
    let rule = world
        .rooms
        .get(&room.room_id)
        .map(|f| f.join_rule())
        .or_else(|| room.join_rules.as_ref().map(|j| j.join_rule.clone()));
    match rule {
        Some(JoinRule::Restricted(r)) | Some(JoinRule::KnockRestricted(r)) => r
            .allow
            .iter()
            .filter_map(|a| match a {
                AllowRule::RoomMembership(m) => world.rooms.get_key_value(&m.room_id).map(|(k, _)| k.as_ref()),
                _ => None,
            })
            .collect(),
        _ => vec![],
    }
}

/// Moves each restricted room after the rooms its `allow` rules name, keeping the order otherwise.
fn dependencies_first<'a>(rooms: Vec<&'a RoomEntry>, world: &World) -> Vec<&'a RoomEntry> {
    let ids: BTreeSet<&RoomId> = rooms.iter().map(|r| r.room_id.as_ref()).collect();
    let mut placed: BTreeSet<&RoomId> = BTreeSet::new();
    let mut out = Vec::with_capacity(rooms.len());
    let mut waiting: Vec<&RoomEntry> = Vec::new();
    for room in rooms {
        let ready = |r: &RoomEntry, placed: &BTreeSet<&RoomId>| {
            depends_on(r, world).iter().all(|d| !ids.contains(d) || placed.contains(d) || *d == r.room_id)
        };
        if ready(room, &placed) {
            placed.insert(&room.room_id);
            out.push(room);
            // Anything waiting on what was just placed may go now.
            while let Some(i) = waiting.iter().position(|w| ready(w, &placed)) {
                let w = waiting.remove(i);
                placed.insert(&w.room_id);
                out.push(w);
            }
        } else {
            waiting.push(room);
        }
    }
    out.extend(waiting); // dependency cycles: keep their order
    out
}

fn plan_room(r: &RoomEntry, old: &UserId, new: &UserId, facts: Option<&RoomFacts>) -> RoomPlan {
    let mut plan = RoomPlan {
        room_id: r.room_id.clone(),
        via: r.via.clone(),
        name: r.name.clone(),
        kind: r.kind,
        priority: r.priority,
        action: Action::Gone,
        give_level: None,
        warnings: vec![],
    };
    let Some(facts) = facts else { return plan };
    let pl = facts.power_levels();
    plan.action = match facts.new_membership {
        Some(MembershipState::Join) => Action::AlreadyJoined,
        Some(MembershipState::Ban) => Action::Blocked(Blocked::Banned),
        _ if facts.server_acl.as_ref().is_some_and(|acl| !acl.is_allowed(new.server_name())) => {
            Action::Blocked(Blocked::ServerAcl)
        }
        _ if !facts.create.federate && new.server_name() != old.server_name() => Action::Blocked(Blocked::NoFederation),
        _ if facts.join_rule() != JoinRule::Public && !pl.user_can_invite(old) => {
            Action::Blocked(Blocked::CannotInvite)
        }
        _ => Action::Join,
    };
    if matches!(plan.action, Action::Blocked(_)) {
        return plan;
    }
    if let Some(v) = &facts.history_visibility
        && matches!(v, HistoryVisibility::Joined | HistoryVisibility::Invited)
    {
        plan.warnings.push(Warning::HistoryHidden { visibility: v.clone() });
    }
    // Carry rank: the old account's level, or for a creator the highest level it can grant.
    let current_new = pl.users.get(new).copied().unwrap_or(pl.users_default);
    let can_change = pl.user_can_change_user_power_level(old, new);
    match pl.for_user(old) {
        UserPowerLevel::Infinite => {
            // Enough for every action the room's power levels name (150 for a v12 tombstone).
            let highest = pl
                .events
                .values()
                .chain([&pl.ban, &pl.kick, &pl.redact, &pl.invite, &pl.state_default, &pl.events_default])
                .chain(pl.users.values())
                .copied()
                .max()
                .unwrap_or_default();
            let gives = can_change.then(|| highest.max(Int::from(100u32)));
            plan.give_level = gives.filter(|g| *g > current_new);
            plan.warnings.push(Warning::RankNotCarried { had: "room creator".into(), gives });
        }
        UserPowerLevel::Int(level) if level > current_new => {
            if can_change {
                plan.give_level = Some(level);
            } else {
                plan.warnings.push(Warning::RankNotCarried { had: format!("power level {level}"), gives: None });
            }
        }
        _ => {}
    }
    plan
}

impl Plan {
    /// The plan as a text table, for `import --dry-run`.
    pub fn table(&self) -> String {
        let mut out = format!("Plan: {} → {}\n", self.old, self.new);
        out.push_str("  # | room | priority | action | notes\n");
        for (i, r) in self.rooms.iter().enumerate() {
            let label = r.name.clone().unwrap_or_else(|| r.room_id.to_string());
            let action = match r.action {
                Action::Join => "join".to_owned(),
                Action::AlreadyJoined => "already joined".to_owned(),
                Action::Blocked(b) => format!("blocked: {}", b.explain()),
                Action::Gone => "gone".to_owned(),
            };
            let mut notes: Vec<String> = r.warnings.iter().map(Warning::explain).collect();
            if let Some(l) = r.give_level
                && !r.warnings.iter().any(|w| matches!(w, Warning::RankNotCarried { .. }))
            {
                notes.push(format!("gets power level {l}"));
            }
            out.push_str(&format!("{:>3} | {} | {:?} | {} | {}\n", i + 1, label, r.priority, action, notes.join("; ")));
        }
        if self.left_out > 0 {
            out.push_str(&format!("{} more room(s) of the bundle left out by the options.\n", self.left_out));
        }
        out
    }

    pub fn count(&self, f: impl Fn(&Action) -> bool) -> usize {
        self.rooms.iter().filter(|r| f(&r.action)).count()
    }

    /// Every room selected, planned or not.
    pub fn total(&self) -> usize {
        self.rooms.len() + self.unplanned.len()
    }

    /// The rooms to read and plan next: the first rooms still unplanned ([`is_first`]), or else
    /// all the rest. Empty when everything is planned.
    pub fn next_part(&self, bundle: &Bundle) -> Vec<OwnedRoomId> {
        let first: BTreeSet<&RoomId> =
            bundle.rooms.iter().filter(|r| is_first(r)).map(|r| r.room_id.as_ref()).collect();
        let part: Vec<OwnedRoomId> = self.unplanned.iter().filter(|id| first.contains::<RoomId>(id)).cloned().collect();
        if part.is_empty() { self.unplanned.clone() } else { part }
    }

    /// Adds planned rooms (a part [`Plan::next_part`] named) to the plan.
    pub fn add(&mut self, rooms: Vec<RoomPlan>, part: &[OwnedRoomId]) {
        let part: BTreeSet<&OwnedRoomId> = part.iter().collect();
        self.unplanned.retain(|id| !part.contains(id));
        self.rooms.extend(rooms);
    }
}

#[cfg(test)]
mod worlds;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn room(id: &str, name: &str, tags: serde_json::Value, kind: &str) -> serde_json::Value {
        let priority = if tags.get("m.favourite").is_some() {
            "high"
        } else if tags.get("m.lowpriority").is_some() {
            "low"
        } else {
            "normal"
        };
        json!({"room_id": id, "via": ["old.org"], "name": name, "kind": kind, "tags": tags,
               "priority": priority, "rank": 0, "notifications": "default", "encrypted": false})
    }

    fn bundle(rooms: Vec<serde_json::Value>) -> Bundle {
        serde_json::from_value(json!({
            "version": 1,
            "source": {"user_id": "@old:old.org", "server_name": "old.org", "homeserver_url": "https://old.org",
                       "exported_at": 0, "client": "test"},
            "rooms": rooms, "contacts": [], "preferences": {}, "profile": {}
        }))
        .unwrap()
    }

    fn facts(extra: serde_json::Value) -> RoomFacts {
        let mut base = json!({
            "creator": "@someone:old.org",
            "create": {"room_version": "11"},
            "power_levels": {"users": {"@old:old.org": 50}, "invite": 0},
            "join_rules": {"join_rule": "invite"},
        });
        for (k, v) in extra.as_object().unwrap() {
            base[k] = v.clone();
        }
        serde_json::from_value(base).unwrap()
    }

    fn world(rooms: Vec<(&str, RoomFacts)>) -> World {
        World { rooms: rooms.into_iter().map(|(id, f)| (OwnedRoomId::try_from(id).unwrap(), f)).collect() }
    }

    fn new() -> OwnedUserId {
        OwnedUserId::try_from("@new:new.org").unwrap()
    }

    #[test]
    fn favourites_by_tag_order_then_normal_then_low() {
        let b = bundle(vec![
            room("!low:o", "Low", json!({"m.lowpriority": {}}), "group"),
            room("!n:o", "Normal", json!({}), "group"),
            room("!f2:o", "Fav2", json!({"m.favourite": {"order": 0.2}}), "group"),
            room("!f1:o", "Fav1", json!({"m.favourite": {"order": 0.1}}), "group"),
            room("!f3:o", "FavNoOrder", json!({"m.favourite": {}}), "dm"),
        ]);
        let w = world(b.rooms.iter().map(|r| (r.room_id.as_str(), facts(json!({})))).collect());
        let p = plan(&b, &new(), &Requirements::default(), &w);
        let order: Vec<_> = p.rooms.iter().map(|r| r.name.clone().unwrap()).collect();
        assert_eq!(order, ["Fav1", "Fav2", "FavNoOrder", "Normal", "Low"]);
        // The first part the engine moves: favourites (and DMs), before the rest is even read.
        let mut unplanned = unplanned(&b, &new(), &Requirements::default(), &World::default());
        let first = unplanned.next_part(&b);
        assert_eq!(first.iter().map(|r| r.as_str()).collect::<Vec<_>>(), ["!f1:o", "!f2:o", "!f3:o"]);
        unplanned.add(plan_rooms(&b, &new(), &first, &w), &first);
        assert_eq!(unplanned.rooms.len(), 3);
        assert_eq!(unplanned.total(), 5);
        let rest = unplanned.next_part(&b);
        assert_eq!(rest.iter().map(|r| r.as_str()).collect::<Vec<_>>(), ["!n:o", "!low:o"]);
        unplanned.add(plan_rooms(&b, &new(), &rest, &w), &rest);
        assert!(unplanned.next_part(&b).is_empty());
        assert_eq!(unplanned.rooms.len(), 5);
        assert!(p.rooms.iter().all(|r| r.action == Action::Join));
        assert_eq!(p.rooms[0].give_level, Some(Int::from(50u32)));

        let dm = b.rooms.iter().find(|r| r.room_id == "!f3:o").unwrap();
        assert!(is_first(dm));
        let only = Requirements { only: Some(Only::Dms), ..Default::default() };
        let p = plan(&b, &new(), &only, &w);
        assert_eq!(p.rooms.len(), 1);
        assert_eq!(p.left_out, 4);
        let max = Requirements { max_rooms: Some(2), ..Default::default() };
        let p = plan(&b, &new(), &max, &w);
        assert_eq!(p.rooms.len(), 2);
        assert_eq!(p.left_out, 3);
    }

    #[test]
    fn a_plan_is_serialisable() {
        let b = bundle(vec![room("!a:o", "A", json!({}), "group")]);
        let p = plan(&b, &new(), &Requirements::default(), &world(vec![("!a:o", facts(json!({})))]));
        let back: Plan = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back.rooms[0].action, Action::Join);
    }
}
