//! A whole account moved, against a real Synapse: 30+ rooms of every kind, blocked rooms, push
//! rules, settings, profile, DMs; the bundle captured field by field, the new account checked field
//! by field, the old account untouched until `finish`.

mod common;

use std::collections::BTreeMap;

use common::{Harness, User, body, export_file, join_stamp, move_notices, open_bundle, raw};
use handoff::bundle::{Bundle, Priority, Rank, RoomKind, RoomNotifications};
use ruma::api::client::membership::{ban_user, joined_rooms};
use ruma::api::client::profile::{get_profile, set_profile_field};
use ruma::api::client::push::{get_pushrules_all, set_pushrule, set_pushrule_enabled};
use ruma::api::client::room::create_room;
use ruma::api::client::state::{get_state_event_for_key, send_state_event};
use ruma::events::StateEventType;
use ruma::events::tag::TagName;
use ruma::profile::ProfileFieldValue;
use ruma::push::{Action, NewPatternedPushRule, NewPushRule, NewSimplePushRule, RuleKind};
use ruma::{Int, OwnedMxcUri, OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde_json::{Value, json};

async fn room(user: &User, name: &str, extra: impl FnOnce(&mut create_room::v3::Request)) -> OwnedRoomId {
    let mut req = create_room::v3::Request::new();
    req.name = Some(name.into());
    req.preset = Some(create_room::v3::RoomPreset::PrivateChat);
    extra(&mut req);
    user.send(req).await.room_id
}

async fn state(user: &User, room: &RoomId, kind: &str, key: &str) -> Value {
    let req = get_state_event_for_key::v3::Request::new(room.to_owned(), StateEventType::from(kind), key.into());
    serde_json::from_str(user.send(req).await.event_or_content.get()).unwrap()
}

async fn power_of(reader: &User, room: &RoomId, user: &UserId) -> Option<i64> {
    state(reader, room, "m.room.power_levels", "").await["users"][user.as_str()].as_i64()
}

/// Everything the old account was given, to compare with.
struct Setup {
    favourites: Vec<OwnedRoomId>,
    low: Vec<OwnedRoomId>,
    work: OwnedRoomId,
    dms: BTreeMap<OwnedUserId, OwnedRoomId>,
    space: OwnedRoomId,
    children: Vec<OwnedRoomId>,
    restricted: OwnedRoomId,
    encrypted: OwnedRoomId,
    public: OwnedRoomId,
    peer_room: OwnedRoomId,
    no_invite: OwnedRoomId,
    banned: OwnedRoomId,
    joined_history: OwnedRoomId,
    mentions_only: OwnedRoomId,
    muted: OwnedRoomId,
    history_room: OwnedRoomId,
    all: Vec<OwnedRoomId>,
}

async fn populate(h: &Harness, alice: &User, bob: &User) -> Setup {
    let mut all = Vec::new();
    let mut favourites = Vec::new();
    for (i, order) in [0.1, 0.2, 0.3].into_iter().enumerate() {
        let r = room(alice, &format!("Fav {i}"), |_| {}).await;
        alice.tag(&r, "m.favourite", Some(order)).await;
        favourites.push(r);
    }
    let mut low = Vec::new();
    for (i, order) in [Some(0.5), None].into_iter().enumerate() {
        let r = room(alice, &format!("Low {i}"), |_| {}).await;
        alice.tag(&r, "m.lowpriority", order).await;
        low.push(r);
    }
    let work = room(alice, "Work", |_| {}).await;
    alice.tag(&work, "u.work", Some(0.7)).await;

    let mut peers = Vec::new();
    for i in 1..=4 {
        let peer = h.user(&format!("peer{i}")).await;
        peer.send(set_profile_field::v3::Request::new(
            peer.id.clone(),
            ProfileFieldValue::DisplayName(format!("Peer {i}")),
        ))
        .await;
        let avatar = OwnedMxcUri::from(format!("mxc://localhost/peer{i}"));
        peer.send(set_profile_field::v3::Request::new(peer.id.clone(), ProfileFieldValue::AvatarUrl(avatar))).await;
        peers.push(peer);
    }
    let dm_rooms = alice.dms_with(&peers.iter().collect::<Vec<_>>()).await;
    let dms: BTreeMap<_, _> = peers.iter().map(|p| p.id.clone()).zip(dm_rooms).collect();

    let space = room(alice, "Space", |r| r.creation_content = Some(raw(json!({"type": "m.space"})))).await;
    let mut children = Vec::new();
    for i in 0..2 {
        let child = room(alice, &format!("Child {i}"), |_| {}).await;
        let req = send_state_event::v3::Request::new_raw(
            space.clone(),
            StateEventType::SpaceChild,
            child.to_string(),
            raw(json!({"via": ["localhost"]})),
        );
        alice.send(req).await;
        children.push(child);
    }
    children.sort();
    let restricted = room(alice, "Restricted", |r| {
        r.initial_state = vec![raw(json!({"type": "m.room.join_rules", "state_key": "",
            "content": {"join_rule": "restricted", "allow": [{"type": "m.room_membership", "room_id": space}]}}))];
    })
    .await;
    let encrypted = room(alice, "Encrypted", |r| {
        r.initial_state = vec![raw(json!({"type": "m.room.encryption", "state_key": "",
            "content": {"algorithm": "m.megolm.v1.aes-sha2"}}))];
    })
    .await;
    let public = room(alice, "Public", |r| {
        r.preset = Some(create_room::v3::RoomPreset::PublicChat);
        r.room_alias_name = Some("alicepublic".into());
    })
    .await;

    // A room created by someone else, where alice has power level 50 and may invite.
    let host = h.user("host").await;
    let peer_room = room(&host, "Hosted", |r| {
        r.invite = vec![alice.id.clone()];
        r.power_level_content_override =
            Some(raw(json!({"users": {alice.id.as_str(): 50}, "invite": 0, "events": {"m.room.power_levels": 50}})));
    })
    .await;
    alice.join(&peer_room).await;
    // One where alice moderates (50) but may not change power levels (100, Synapse's default): her
    // rank can't be given, which the report names with the reason.
    let moderated = room(&host, "Moderated", |r| {
        r.invite = vec![alice.id.clone()];
        r.power_level_content_override = Some(raw(json!({"users": {alice.id.as_str(): 50}, "invite": 0})));
    })
    .await;
    alice.join(&moderated).await;
    // One where alice may not invite.
    let no_invite = room(&host, "No invites", |r| {
        r.invite = vec![alice.id.clone()];
        r.power_level_content_override = Some(raw(json!({"users": {}, "invite": 100})));
    })
    .await;
    alice.join(&no_invite).await;
    // One where bob is banned.
    let banned = room(alice, "Banned", |_| {}).await;
    alice.send(ban_user::v3::Request::new(banned.clone(), bob.id.clone())).await;
    let joined_history = room(alice, "Joined history", |r| {
        r.initial_state = vec![raw(json!({"type": "m.room.history_visibility", "state_key": "",
            "content": {"history_visibility": "joined"}}))];
    })
    .await;
    let mentions_only = room(alice, "Mentions only", |_| {}).await;
    alice
        .send(set_pushrule::v3::Request::new(NewPushRule::Room(NewSimplePushRule::new(mentions_only.clone(), vec![]))))
        .await;
    let muted = room(alice, "Muted", |_| {}).await;
    let mute: ruma::push::NewConditionalPushRule = serde_json::from_value(json!({"rule_id": muted, "actions": [],
        "conditions": [{"kind": "event_match", "key": "room_id", "pattern": muted}]}))
    .unwrap();
    alice.send(set_pushrule::v3::Request::new(NewPushRule::Override(mute))).await;
    let history_room = room(alice, "Chatty", |_| {}).await;
    for i in 1..=3 {
        alice.send_text(&history_room, &format!("hello {i}")).await;
    }
    let mut fillers = Vec::new();
    for i in 0..10 {
        fillers.push(room(alice, &format!("Filler {i:02}"), |_| {}).await);
    }

    let content_rule = NewPatternedPushRule::new(
        "handoff-test-keyword".into(),
        "deploy".into(),
        vec![Action::Notify, Action::SetTweak(ruma::push::Tweak::Sound("default".into()))],
    );
    alice.send(set_pushrule::v3::Request::new(NewPushRule::Content(content_rule))).await;
    // The new account has its own rule of this ID (below): not applied.
    let lunch = NewPatternedPushRule::new("handoff-test-lunch".into(), "lunch".into(), vec![Action::Notify]);
    alice.send(set_pushrule::v3::Request::new(NewPushRule::Content(lunch))).await;
    alice
        .send(set_pushrule_enabled::v3::Request::new(RuleKind::Override, ".m.rule.suppress_notices".into(), false))
        .await;
    alice
        .set_account_data(
            "m.ignored_user_list",
            json!({"ignored_users": {"@spammer:example.com": {}, "@troll:localhost": {}}}),
        )
        .await;
    alice.set_account_data("im.vector.setting.breadcrumbs", json!({"recent_rooms": [favourites[0], work]})).await;
    alice.set_account_data("im.vector.setting.integration_provisioning", json!({"enabled": false})).await;
    alice.set_account_data("org.example.private", json!({"secret": true})).await;
    alice
        .send(set_profile_field::v3::Request::new(alice.id.clone(), ProfileFieldValue::DisplayName("Alice A.".into())))
        .await;
    let avatar = OwnedMxcUri::from("mxc://localhost/aliceavatar");
    alice.send(set_profile_field::v3::Request::new(alice.id.clone(), ProfileFieldValue::AvatarUrl(avatar))).await;

    all.extend(favourites.iter().cloned());
    all.extend(low.iter().cloned());
    all.push(work.clone());
    all.extend(dms.values().cloned());
    all.push(space.clone());
    all.extend(children.iter().cloned());
    all.extend([
        restricted.clone(),
        encrypted.clone(),
        public.clone(),
        peer_room.clone(),
        no_invite.clone(),
        moderated,
    ]);
    all.extend([banned.clone(), joined_history.clone(), mentions_only.clone(), muted.clone(), history_room.clone()]);
    all.extend(fillers);
    Setup {
        favourites,
        low,
        work,
        dms,
        space,
        children,
        restricted,
        encrypted,
        public,
        peer_room,
        no_invite,
        banned,
        joined_history,
        mentions_only,
        muted,
        history_room,
        all,
    }
}

#[tokio::test]
async fn a_whole_account_is_captured_and_moved_field_by_field() {
    let h = Harness::start().await;
    let (alice, bob) = (h.user("alice").await, h.user("bob").await);
    let s = populate(&h, &alice, &bob).await;
    assert!(s.all.len() >= 30, "{} rooms", s.all.len());
    // The new account already has data of its own, which must survive.
    let own = h.user("bobsfriend").await;
    let own_dm = bob.create_dm(&own.id).await;
    bob.set_account_data("m.direct", json!({own.id.as_str(): [own_dm]})).await;
    bob.set_account_data("m.ignored_user_list", json!({"ignored_users": {"@bobsenemy:localhost": {}}})).await;
    // Its own display name (no avatar), and a keyword rule of the same ID as one of alice's.
    bob.send(set_profile_field::v3::Request::new(bob.id.clone(), ProfileFieldValue::DisplayName("Bob B.".into())))
        .await;
    let dinner = NewPatternedPushRule::new("handoff-test-lunch".into(), "dinner".into(), vec![Action::Notify]);
    bob.send(set_pushrule::v3::Request::new(NewPushRule::Content(dinner))).await;

    let (adm, bdm) = (h.dm_with_bot(&alice).await, h.dm_with_bot(&bob).await);

    // Capture, field by field (from the bundle file, opened with the code).
    let (code, bytes) = export_file(&h, &alice, &adm, "--to @bob:localhost --history 5").await;
    check_bundle(&open_bundle(&bytes, &code), &s, &alice);

    // The move.
    let report = h.ask(&bob, &bdm, &format!("import {code} --history 2"), "rooms moved to @bob:localhost").await;
    // The history portion asked for: the last two messages of the chatty room, as an HTML file.
    let file =
        bob.messages_from(&bdm, &h.bot).await.into_iter().find(|m| body(m) == "history.html").expect("history file");
    assert_eq!(file["content"]["info"]["mimetype"], "text/html");
    let history = bob.attachment(&file).await;
    // Other people's messages: whoever learns the media ID must not read them.
    for needle in ["hello 2", "Chatty", alice.id.as_str()] {
        assert!(!history.readable_at_rest(needle), "{needle:?} readable in the media repository");
    }
    let html = String::from_utf8(history.plain).unwrap();
    assert!(html.contains("<h2>Chatty</h2>") && html.contains("hello 2") && html.contains("hello 3"), "{html}");
    assert!(!html.contains("hello 1"), "only the last two: {html}");
    assert!(report.contains("history: 2 message(s) from 1 room(s) delivered as history.html"), "{report}");
    let blocked = 2; // banned, no invites
    let moved = s.all.len() - blocked;
    assert!(report.starts_with(&format!("{moved} of {} rooms moved", s.all.len())), "{report}");
    assert!(report.contains("No invites: the old account may not invite there"), "{report}");
    assert!(report.contains("Banned: the new account is banned there"), "{report}");
    assert!(report.contains("Joined history: history visibility is `joined`"), "{report}");
    let refused = "Moderated: the old account's rank (power level 50) can't be given: it may not change power levels";
    assert!(report.contains(refused), "{report}");
    // What bob had of his own is kept, and named with the old value and how to take it.
    let kept = "profile: avatar set; kept your own display name (the old one was \"Alice A.\"): use --profile-from-old to take it";
    assert!(report.contains(kept), "{report}");
    assert!(report.contains("not applied: the old account's handoff-test-lunch"), "{report}");

    // Joined everywhere it could be; exactly one notice per moved room.
    let joined: Vec<OwnedRoomId> = bob.send(joined_rooms::v3::Request::new()).await.joined_rooms;
    for r in s.all.iter().filter(|r| **r != s.banned && **r != s.no_invite) {
        assert!(joined.contains(r), "bob not in {r}");
        let timeline = alice.timeline(r).await;
        let notices = move_notices(&timeline);
        assert_eq!(notices.len(), 1, "{r}");
        assert_eq!(notices[0]["content"]["org.handoff.move"]["to"], "@bob:localhost");
        // In the encrypted room, nothing of the move in clear text: the move is marked on the
        // announcing account's membership (a join that keeps its name), not posted as a message.
        let kind = if *r == s.encrypted { "m.room.member" } else { "m.room.message" };
        assert_eq!(notices[0]["type"], kind, "{r}");
    }
    let encrypted = alice.timeline(&s.encrypted).await;
    let clear: Vec<&Value> = encrypted.iter().filter(|e| e["type"] == "m.room.message").collect();
    assert!(clear.is_empty(), "clear-text messages in the encrypted room: {clear:?}");
    let mark = move_notices(&encrypted)[0];
    assert_eq!(
        (mark["content"]["membership"].as_str(), mark["content"]["displayname"].as_str()),
        (Some("join"), Some("Alice A."))
    );
    assert!(!joined.contains(&s.banned) && !joined.contains(&s.no_invite));
    // Highest priority first: every favourite was joined before either low-priority room.
    let join_ts = |room: OwnedRoomId| {
        let alice = &alice;
        let bob = bob.id.clone();
        async move { join_stamp(&alice.timeline(&room).await, &bob).unwrap_or_else(|| panic!("no join of bob in {room}")) }
    };
    let mut last_favourite = 0;
    for r in &s.favourites {
        last_favourite = last_favourite.max(join_ts(r.clone()).await);
    }
    for r in &s.low {
        assert!(join_ts(r.clone()).await >= last_favourite, "{r} (low priority) joined before a favourite");
    }

    // Tags, with their order.
    for (r, t, order) in [
        (&s.favourites[0], "m.favourite", Some(0.1)),
        (&s.low[1], "m.lowpriority", None),
        (&s.work, "u.work", Some(0.7)),
    ] {
        let tags = bob.tags(r).await;
        let info = tags.get(&TagName::from(t)).unwrap_or_else(|| panic!("{t} on {r}: {tags:?}"));
        assert_eq!(info.order, order, "{t}");
    }
    // m.direct and ignored users merged, never overwritten.
    let direct = bob.account_data("m.direct").await.unwrap();
    assert_eq!(direct[own.id.as_str()], json!([own_dm]), "bob's own DM kept");
    for (peer, dm) in &s.dms {
        assert_eq!(direct[peer.as_str()], json!([dm]), "{peer}");
    }
    let ignored = bob.account_data("m.ignored_user_list").await.unwrap();
    for u in ["@bobsenemy:localhost", "@spammer:example.com", "@troll:localhost"] {
        assert!(ignored["ignored_users"].get(u).is_some(), "{u} in {ignored}");
    }
    // Push rules: the keyword, the per-room settings, the default rule switched off, old mentions.
    let rules = bob.send(get_pushrules_all::v3::Request::new()).await.global;
    assert!(rules.content.iter().any(|r| r.rule_id == "handoff-test-keyword" && r.pattern == "deploy"));
    assert!(rules.content.iter().any(|r| r.rule_id == "handoff-test-lunch" && r.pattern == "dinner"), "bob's own kept");
    assert!(rules.room.iter().any(|r| r.rule_id == s.mentions_only && r.actions.is_empty()));
    assert!(rules.override_.iter().any(|r| r.rule_id == s.muted.as_str()));
    assert!(rules.override_.iter().any(|r| r.rule_id == ".m.rule.suppress_notices" && !r.enabled));
    let mention = rules.override_.iter().find(|r| r.rule_id == "org.handoff.old_mentions").expect("old mentions rule");
    assert!(serde_json::to_string(&mention.conditions).unwrap().contains("@alice:localhost"));
    // Client settings on the allow-list only.
    assert_eq!(bob.account_data("im.vector.setting.integration_provisioning").await, Some(json!({"enabled": false})));
    assert!(bob.account_data("im.vector.setting.breadcrumbs").await.is_some());
    assert_eq!(bob.account_data("org.example.private").await, None);
    // Profile: bob's own display name kept; the avatar he had not, taken.
    let profile = bob.send(get_profile::v3::Request::new(bob.id.clone())).await;
    assert_eq!(profile.get("displayname"), Some(&json!("Bob B.")));
    assert_eq!(profile.get("avatar_url"), Some(&json!("mxc://localhost/aliceavatar")));
    // Rank: 50 where alice had 50; where alice is a v12 creator, the highest level she can give.
    assert_eq!(power_of(&alice, &s.peer_room, &bob.id).await, Some(50));
    assert_eq!(power_of(&alice, &s.favourites[0], &bob.id).await, Some(150));

    // The old account is untouched: still in every room, its tags and data as they were.
    let still: Vec<OwnedRoomId> = alice.send(joined_rooms::v3::Request::new()).await.joined_rooms;
    for r in &s.all {
        assert!(still.contains(r), "alice left {r} before finish");
    }
    let tags = alice.tags(&s.favourites[0]).await;
    assert!(tags.contains_key(&TagName::Favorite));

    // finish: leave where bob has at least the same rank (not where alice is a v12 creator).
    let fin = h.ask(&alice, &adm, "finish --leave --advertise", "Left").await;
    // Only the hosted room: everywhere else alice is the creator (v12), or bob is not there.
    assert!(fin.contains("Left 1 room(s)"), "{fin}");
    let still: Vec<OwnedRoomId> = alice.send(joined_rooms::v3::Request::new()).await.joined_rooms;
    assert!(!still.contains(&s.peer_room), "left the hosted room");
    // The leave says where alice went, as the room's members see it.
    let left = state(&bob, &s.peer_room, "m.room.member", alice.id.as_str()).await;
    assert_eq!((&left["membership"], &left["reason"]), (&json!("leave"), &json!("moved to @bob:localhost")), "{left}");
    assert!(still.contains(&s.favourites[0]), "stays where it is the creator");
    assert!(still.contains(&s.no_invite), "stays where nothing moved");
    let name = alice.send(get_profile::v3::Request::new(alice.id.clone())).await;
    assert_eq!(name.get("displayname"), Some(&json!("Alice A. (moved to @bob:localhost)")));

    // The old account's `undo` takes `finish` back: the hosted room is invite-only, so it needs an
    // invite first (said, with whom to ask); its name loses the "moved to".
    let un = h.ask(&alice, &adm, "undo", "room(s) you left with `finish --leave`").await;
    assert!(un.contains("Rejoined 0 of the 1 room(s)") && un.contains("Hosted: "), "{un}");
    assert!(un.contains("ask a member, such as @bob:localhost, to invite you"), "{un}");
    let name = alice.send(get_profile::v3::Request::new(alice.id.clone())).await;
    assert_eq!(name.get("displayname"), Some(&json!("Alice A.")));
    bob.invite(&s.peer_room, &alice.id).await;
    h.ask(&alice, &adm, "undo", "Rejoined 1 of the 1 room(s)").await;
    let back: Vec<OwnedRoomId> = alice.send(joined_rooms::v3::Request::new()).await.joined_rooms;
    assert!(back.contains(&s.peer_room), "alice is back in the hosted room");

    // What an undo will put back: bob's settings as they were before the merges, kept (sealed)
    // with the move's record.
    let mut h = h;
    h.signal_handoff("TERM");
    let store = handoff::store::Store::open(&h.sandbox.dir.join("handoff.db")).unwrap();
    let records = store.transfers().await.unwrap();
    let moves: Vec<handoff::transfer::Transfer> = records
        .iter()
        .map(|(_, bytes)| serde_json::from_slice(bytes).unwrap())
        .filter(|t: &handoff::transfer::Transfer| t.new == bob.id)
        .collect();
    assert_eq!(moves.len(), 1);
    let before = &moves[0].before.as_ref().expect("the settings before the move").world;
    assert_eq!(before.display_name.as_deref(), Some("Bob B."));
    assert_eq!(before.avatar_url, None, "bob had no avatar before");
    let direct = serde_json::to_value(before.direct.as_ref().unwrap()).unwrap();
    assert_eq!(direct, json!({own.id.as_str(): [own_dm]}), "bob's own m.direct, none of alice's");
    let ignored = serde_json::to_value(before.ignored_users.as_ref().unwrap()).unwrap();
    assert_eq!(ignored["ignored_users"].as_object().unwrap().keys().collect::<Vec<_>>(), ["@bobsenemy:localhost"]);
    let rules = before.push_rules.as_ref().unwrap();
    assert!(rules.content.iter().any(|r| r.rule_id == "handoff-test-lunch"), "bob's own rule");
    assert!(!rules.override_.iter().any(|r| r.rule_id == "org.handoff.old_mentions"), "nothing of the move's yet");
}

fn check_bundle(b: &Bundle, s: &Setup, alice: &User) {
    let entry =
        |r: &OwnedRoomId| b.rooms.iter().find(|e| &e.room_id == r).unwrap_or_else(|| panic!("{r} not captured"));
    assert_eq!(b.rooms.len(), s.all.len(), "every joined room but the bot's DM");
    assert_eq!(b.source.user_id, alice.id);
    for (i, r) in s.favourites.iter().enumerate() {
        let e = entry(r);
        assert_eq!(e.priority, Priority::High);
        assert_eq!(e.tags[&TagName::Favorite].order, Some([0.1, 0.2, 0.3][i]));
    }
    assert_eq!(entry(&s.low[0]).priority, Priority::Low);
    assert_eq!(entry(&s.low[0]).tags[&TagName::LowPriority].order, Some(0.5));
    assert_eq!(entry(&s.low[1]).tags[&TagName::LowPriority].order, None);
    assert_eq!(entry(&s.work).tags[&TagName::from("u.work")].order, Some(0.7));
    assert_eq!(entry(&s.work).priority, Priority::Normal);
    for (peer, dm) in &s.dms {
        let e = entry(dm);
        assert_eq!(e.kind, RoomKind::Dm);
        assert_eq!(e.dm_peer.as_ref(), Some(peer));
        let c = b.contacts.iter().find(|c| &c.user_id == peer).expect("contact");
        assert_eq!(c.dm_rooms, vec![dm.clone()]);
        let n = &peer.localpart()[4..];
        assert_eq!(c.display_name.as_deref(), Some(format!("Peer {n}").as_str()));
        assert_eq!(c.avatar_url.as_ref().map(|a| a.as_str().to_owned()), Some(format!("mxc://localhost/peer{n}")));
    }
    assert_eq!(b.contacts.len(), 4);
    assert_eq!(entry(&s.space).kind, RoomKind::Space);
    assert_eq!(entry(&s.space).children, s.children);
    assert!(matches!(entry(&s.restricted).join_rules.as_ref().unwrap().join_rule, ruma::room::JoinRule::Restricted(_)));
    assert!(entry(&s.encrypted).encrypted);
    assert!(!entry(&s.work).encrypted);
    assert_eq!(entry(&s.public).canonical_alias.as_ref().map(|a| a.as_str()), Some("#alicepublic:localhost"));
    assert!(matches!(entry(&s.public).join_rules.as_ref().unwrap().join_rule, ruma::room::JoinRule::Public));
    assert_eq!(entry(&s.peer_room).rank, Rank::Level(Int::from(50u32)));
    assert_eq!(entry(&s.favourites[0]).rank, Rank::Creator);
    assert_eq!(entry(&s.joined_history).history_visibility.as_ref().map(|v| v.as_str()), Some("joined"));
    assert_eq!(entry(&s.mentions_only).notifications, RoomNotifications::MentionsAndKeywords);
    assert_eq!(entry(&s.muted).notifications, RoomNotifications::Mute);
    assert_eq!(entry(&s.work).notifications, RoomNotifications::Default);
    assert_eq!(entry(&s.work).via, vec![ruma::OwnedServerName::try_from("localhost").unwrap()]);
    let history = entry(&s.history_room).history.as_ref().unwrap();
    let texts: Vec<&str> = history.messages.iter().map(|m| m.content.body()).collect();
    assert_eq!(texts, ["hello 1", "hello 2", "hello 3"]);
    let rules = b.preferences.push_rules.as_ref().unwrap();
    assert!(rules.content.iter().any(|r| r.rule_id == "handoff-test-keyword"));
    assert!(rules.override_.iter().any(|r| r.rule_id == ".m.rule.suppress_notices" && !r.enabled));
    let mut ignored: Vec<&str> = b.preferences.ignored_users.iter().map(|u| u.as_str()).collect();
    ignored.sort();
    assert_eq!(ignored, ["@spammer:example.com", "@troll:localhost"]);
    let settings: Vec<&str> = b.preferences.client_settings.keys().map(String::as_str).collect();
    assert_eq!(settings, ["im.vector.setting.breadcrumbs", "im.vector.setting.integration_provisioning"]);
    assert_eq!(b.profile.display_name.as_deref(), Some("Alice A."));
    assert_eq!(b.profile.avatar_url.as_ref().map(|a| a.as_str()), Some("mxc://localhost/aliceavatar"));
}
