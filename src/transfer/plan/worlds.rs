//! The planner's corpus: each `worlds/*.json` is planned the way its kind of move is planned in
//! the service, and the plan is compared with its snapshot (`snapshots/`), beside the world's
//! `why` so a reader sees intent next to result.
//!
//! A world file holds:
//! - `why`: one line, what the world checks;
//! - `move`: `local` (an import into an account of the old server: the engine's order from the
//!   bundle alone, then its parts, first rooms and then the rest, each planned from the rooms'
//!   state), `reservation` (`export --to` another server: the engine's preview, every room at
//!   once), `received` (a bundle from another server, as the new account sees it), `device` (the
//!   device side reading the old account: [`plan`]) or `device_blind` (the device side alone:
//!   [`blind`]);
//! - `old` (default `@old:old.org`) and `new`;
//! - `requirements` (`only`, `max_rooms`), optional;
//! - `rooms`: the bundle's rooms, as [`RoomEntry`] with defaults for what the planner reads from
//!   the facts instead (`via` old.org, `kind` group, no tags, `priority` from the tags, rank 0,
//!   default notifications, not encrypted);
//! - `facts`: [`RoomFacts`] by room, what the old account reads now (a bundle room without facts
//!   is gone); `joined`, `reserved` and `recipient` for the moves that read the new account;
//! - `unseen`, optional: facts of the world the planner does not read (it has no field for them),
//!   written down so the snapshot shows what the plan was blind to.
//!
//! Every key is checked: a misspelt one fails the test instead of being dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::*;
use crate::bundle::Recipient;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Move {
    Local,
    Reservation,
    Received,
    Device,
    DeviceBlind,
}

#[derive(Deserialize)]
struct WorldFile {
    why: String,
    #[serde(rename = "move")]
    kind: Move,
    #[serde(default = "old_account")]
    old: OwnedUserId,
    new: OwnedUserId,
    #[serde(default)]
    requirements: Requirements,
    rooms: Vec<Value>,
    #[serde(default)]
    facts: BTreeMap<OwnedRoomId, RoomFacts>,
    #[serde(default)]
    joined: BTreeSet<OwnedRoomId>,
    #[serde(default)]
    reserved: BTreeSet<OwnedRoomId>,
    #[serde(default)]
    recipient: Option<Recipient>,
    #[serde(default)]
    unseen: Option<Value>,
}

fn old_account() -> OwnedUserId {
    OwnedUserId::try_from("@old:old.org").unwrap()
}

/// What is compared: field order chosen for a reader (why first, then what the planner was
/// given beyond the bundle, then the plan and its table as `import --dry-run` prints it).
#[derive(Serialize)]
struct Snapshot<'a> {
    why: &'a str,
    #[serde(rename = "move")]
    kind: Move,
    #[serde(skip_serializing_if = "Option::is_none")]
    unseen: Option<&'a Value>,
    plan: &'a Plan,
    table: Vec<&'a str>,
}

/// Deserializes, failing on any key the type doesn't know (serde would drop it silently).
fn strict<T: DeserializeOwned>(json: Value, what: &str) -> T {
    let mut unknown = Vec::new();
    let value = serde_ignored::deserialize(json, |path| unknown.push(path.to_string()))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(unknown.is_empty(), "{what}: unknown keys {unknown:?}");
    value
}

/// A bundle room from its short form: the defaults named in the module's doc.
fn room_entry(short: &Value, world: &str) -> RoomEntry {
    let mut room = json!({"via": ["old.org"], "kind": "group", "tags": {}, "rank": 0,
                          "notifications": "default", "encrypted": false});
    for (k, v) in short.as_object().unwrap_or_else(|| panic!("{world}: a room is an object")) {
        room[k] = v.clone();
    }
    if room.get("priority").is_none() {
        // As capture derives it (Priority::from_tags).
        let tags = &room["tags"];
        room["priority"] = json!(if tags.get("m.favourite").is_some() {
            "high"
        } else if tags.get("m.lowpriority").is_some() {
            "low"
        } else {
            "normal"
        });
    }
    strict(room, &format!("{world}: room {}", short["room_id"]))
}

fn bundle(w: &WorldFile, name: &str) -> Bundle {
    let rooms: Vec<RoomEntry> = w.rooms.iter().map(|r| room_entry(r, name)).collect();
    let server = w.old.server_name();
    Bundle {
        version: crate::bundle::BUNDLE_VERSION,
        source: strict(
            json!({"user_id": w.old, "server_name": server, "homeserver_url": format!("https://{server}"),
                   "exported_at": 0, "client": "plan worlds"}),
            name,
        ),
        rooms,
        contacts: vec![],
        preferences: strict(json!({}), name),
        profile: strict(json!({}), name),
        room_keys: None,
        login_token: None,
        recipient: w.recipient.clone(),
    }
}

/// Refuses a world that couldn't happen: the kind of move fixes where the new account is and
/// what the planner is given.
fn check(w: &WorldFile, b: &Bundle, name: &str) {
    let same_server = w.old.server_name() == w.new.server_name();
    match w.kind {
        Move::Local => assert!(same_server, "{name}: a local move stays on the old server"),
        Move::Reservation | Move::Received => assert!(!same_server, "{name}: a {:?} is to another server", w.kind),
        Move::Device | Move::DeviceBlind => {}
    }
    let reads_old = matches!(w.kind, Move::Local | Move::Reservation | Move::Device);
    assert!(reads_old || w.facts.is_empty(), "{name}: a {:?} move reads no facts", w.kind);
    assert!(!reads_old || (w.joined.is_empty() && w.reserved.is_empty()), "{name}: joined/reserved unread");
    assert!(w.kind == Move::Received || w.reserved.is_empty(), "{name}: only a received move reads `reserved`");
    assert!(!reads_old || w.recipient.is_none(), "{name}: only the new account's side reads the recipient");
    // The service reads only the bundle's rooms.
    for id in w.facts.keys() {
        assert!(b.rooms.iter().any(|r| r.room_id == *id), "{name}: facts for {id}, not a room of the bundle");
    }
}

/// Plans the world as the service plans its kind of move.
fn run(w: &WorldFile, b: &Bundle) -> Plan {
    let world = World { rooms: w.facts.clone() };
    match w.kind {
        Move::Local => {
            // engine::run: the order from the bundle alone, then part by part.
            let mut plan = unplanned(b, &w.new, &w.requirements, &World::default());
            loop {
                let part = plan.next_part(b);
                if part.is_empty() {
                    break plan;
                }
                plan.add(plan_rooms(b, &w.new, &part, &world), &part);
            }
        }
        Move::Reservation => {
            // engine::preview: the same order, every room planned at once.
            let mut plan = unplanned(b, &w.new, &w.requirements, &World::default());
            let part = std::mem::take(&mut plan.unplanned);
            plan.add(plan_rooms(b, &w.new, &part, &world), &part);
            plan
        }
        Move::Received => received(b, &w.new, &w.requirements, &w.joined, &w.reserved),
        Move::Device => plan(b, &w.new, &w.requirements, &world),
        Move::DeviceBlind => blind(b, &w.new, &w.requirements, &w.joined),
    }
}

fn here() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/transfer/plan")
}

#[test]
fn every_world_plans_as_its_snapshot_says() {
    let mut names = BTreeSet::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(here().join("worlds"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 20, "the corpus has {} worlds", files.len());
    for path in files {
        let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        let w: WorldFile = strict(json, &name);
        let b = bundle(&w, &name);
        check(&w, &b, &name);
        let plan = run(&w, &b);
        let table = plan.table();
        let snapshot = Snapshot {
            why: &w.why,
            kind: w.kind,
            unseen: w.unseen.as_ref(),
            plan: &plan,
            table: table.lines().collect(),
        };
        insta::with_settings!({omit_expression => true}, {
            insta::assert_json_snapshot!(name.as_str(), snapshot);
        });
        names.insert(name);
    }
    // A snapshot whose world was removed or renamed would otherwise stay, unchecked.
    let prefix = "handoff__transfer__plan__worlds__";
    for entry in std::fs::read_dir(here().join("snapshots")).into_iter().flatten() {
        let file = entry.unwrap().file_name().into_string().unwrap();
        if let Some(name) = file.strip_prefix(prefix).and_then(|f| f.strip_suffix(".snap")) {
            assert!(names.contains(name), "snapshot {file} has no world");
        }
    }
}
