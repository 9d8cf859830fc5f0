//! `undo` against a real Synapse: a move taken back by the account it wrote into, read through the
//! client-server API as the people in it see it; a SIGKILL in the middle of the undo, then a
//! restart, does nothing twice; and who may not undo. The device side's `handoff undo` too.

mod common;

use std::collections::BTreeSet;

use common::{Harness, User, eventually, export, memberships, move_notices, with_concurrency};
use ruma::api::client::membership::joined_rooms;
use ruma::api::client::profile::{get_profile, set_profile_field};
use ruma::api::client::push::{get_pushrules_all, set_pushrule};
use ruma::api::client::state::get_state_event_for_key;
use ruma::events::StateEventType;
use ruma::events::tag::TagName;
use ruma::profile::ProfileFieldValue;
use ruma::push::{Action, NewPatternedPushRule, NewPushRule};
use ruma::{OwnedMxcUri, OwnedRoomId, RoomId, UserId};
use serde_json::{Value, json};

async fn joined(user: &User) -> BTreeSet<OwnedRoomId> {
    user.send(joined_rooms::v3::Request::new()).await.joined_rooms.into_iter().collect()
}

async fn power_of(reader: &User, room: &RoomId, user: &UserId) -> Option<i64> {
    let req =
        get_state_event_for_key::v3::Request::new(room.to_owned(), StateEventType::RoomPowerLevels, String::new());
    let levels: Value = serde_json::from_str(reader.send(req).await.event_or_content.get()).unwrap();
    levels["users"][user.as_str()].as_i64()
}

async fn rules(user: &User) -> Value {
    serde_json::to_value(user.send(get_pushrules_all::v3::Request::new()).await.global).unwrap()
}

fn has_rule(rules: &Value, kind: &str, id: &str) -> bool {
    rules[kind].as_array().unwrap().iter().any(|r| r["rule_id"] == id)
}

#[tokio::test]
async fn a_move_is_undone_once_even_when_killed_midway_and_what_the_user_changed_since_stays() {
    // One room at a time, so the kill lands mid-undo; the move's notices posted as the new
    // account, so the undo has its own messages to redact.
    let mut h = Harness::start_with(|c| with_concurrency(common::edit(c, "sender: old", "sender: new"), 1)).await;
    let (alice, bob) = (h.user("alice").await, h.user("bob").await);
    let rooms = alice.create_rooms(16).await;
    alice.tag(&rooms[0], "m.favourite", Some(0.1)).await;
    // What alice's bundle brings: an ignored user, a keyword rule, a client setting, an avatar.
    alice.set_account_data("m.ignored_user_list", json!({"ignored_users": {"@troll:localhost": {}}})).await;
    let deploy = NewPatternedPushRule::new("handoff-test-deploy".into(), "deploy".into(), vec![Action::Notify]);
    alice.send(set_pushrule::v3::Request::new(NewPushRule::Content(deploy))).await;
    alice.set_account_data("im.vector.setting.integration_provisioning", json!({"enabled": false})).await;
    let avatar: OwnedMxcUri = "mxc://localhost/aliceavatar".into();
    alice.send(set_profile_field::v3::Request::new(alice.id.clone(), ProfileFieldValue::AvatarUrl(avatar))).await;
    // What bob has of his own: a room he is in already, his ignored list, his name (no avatar).
    alice.invite(&rooms[1], &bob.id).await;
    bob.join(&rooms[1]).await;
    bob.set_account_data("m.ignored_user_list", json!({"ignored_users": {"@bobsenemy:localhost": {}}})).await;
    bob.send(set_profile_field::v3::Request::new(bob.id.clone(), ProfileFieldValue::DisplayName("Bob B.".into())))
        .await;
    let (adm, bdm) = (h.dm_with_bot(&alice).await, h.dm_with_bot(&bob).await);
    let bob_had = joined(&bob).await;
    let direct_before = bob.account_data("m.direct").await;

    let code = export(&h, &alice, &adm, "--to @bob:localhost").await;
    h.ask(&bob, &bdm, &format!("import {code}"), "rooms moved to @bob:localhost").await;
    assert!(joined(&bob).await.is_superset(&rooms.iter().cloned().collect()), "moved");
    assert!(bob.tags(&rooms[0]).await.contains_key(&TagName::Favorite));
    assert!(power_of(&alice, &rooms[3], &bob.id).await.is_some(), "the move gave bob alice's rank");
    assert!(has_rule(&rules(&bob).await, "content", "handoff-test-deploy"));
    assert!(has_rule(&rules(&bob).await, "override", "org.handoff.old_mentions"));

    // Between the move and the undo, bob writes in one room and ignores someone else: both his.
    bob.send_text(&rooms[2], "my own words, after the move").await;
    let mine = json!({"ignored_users": {"@bobsenemy:localhost": {}, "@troll:localhost": {}, "@later:localhost": {}}});
    bob.set_account_data("m.ignored_user_list", mine.clone()).await;

    // Another account can't undo bob's move; the dry run changes nothing.
    h.ask(&alice, &adm, "undo", "no move into this account to undo").await;
    let dry = h.ask(&bob, &bdm, "undo --dry-run", "Nothing was changed").await;
    assert!(dry.contains("would leave 14 room(s)"), "{dry}");
    assert!(dry.contains("room 001: you were in it before the move"), "{dry}");
    assert!(dry.contains("room 002: you have written there since the move"), "{dry}");
    assert!(dry.contains("Settings you changed since the move, which would stay: ignored users"), "{dry}");
    assert!(dry.contains("push rule handoff-test-deploy (removed)"), "{dry}");
    assert!(joined(&bob).await.is_superset(&rooms.iter().cloned().collect()), "the dry run left nothing");

    // The undo, killed after a few rooms, resumed by the next start.
    bob.send_text(&bdm, "undo").await;
    eventually("bob to have left 3 rooms", || async {
        let now = joined(&bob).await;
        (rooms.iter().filter(|r| !now.contains(*r)).count() >= 3).then_some(())
    })
    .await;
    assert!(!h.signal_handoff("KILL").success());
    let left_before_restart = rooms.len() - joined(&bob).await.iter().filter(|r| rooms.contains(r)).count();
    h.start_handoff().await;
    let report = h.bot_says_within(&bob, &bdm, "is undone", h.patience).await;
    assert!(
        left_before_restart < 14,
        "the kill landed after the undo ended: make it slower ({left_before_restart} left)"
    );
    assert!(h.log().contains("resuming the undo of a move"), "the restart resumed it");
    // Its progress, on one message edited as rooms are done.
    let said: Vec<String> = bob.messages_from(&bdm, &h.bot).await.iter().map(|m| common::body(m).to_owned()).collect();
    let status = said.iter().filter(|b| b.starts_with("Undoing your move from @alice:localhost: leaving")).count();
    assert_eq!(status, 1, "one status message, posted once across the restart: {said:?}");
    let edits: Vec<String> = bob
        .timeline(&bdm)
        .await
        .iter()
        .filter_map(|e| e["content"]["m.new_content"]["body"].as_str().map(str::to_owned))
        .collect();
    assert!(edits.iter().any(|b| b.contains("16 of 16 rooms done")), "{edits:?}");

    // Bob's rooms are what he had, and the room he wrote in.
    let mut expected = bob_had.clone();
    expected.insert(rooms[2].clone());
    assert_eq!(joined(&bob).await, expected, "{report}");
    // (The room in flight at the kill may have had its notice redacted before it: each room's
    // redactions are counted below.)
    assert!(report.contains("left 14 room(s)"), "{report}");
    assert!(report.contains("room 002: you have written there since the move"), "{report}");
    for room in rooms.iter().filter(|r| !expected.contains(*r)) {
        let timeline = alice.timeline(room).await;
        // One join and one leave: nothing done twice.
        assert_eq!(memberships(&timeline, &bob.id), ["invite", "join", "leave"], "{room}");
        let leave = timeline.iter().rev().find(|e| e["type"] == "m.room.member" && e["state_key"] == bob.id.as_str());
        assert_eq!(leave.unwrap()["content"]["reason"], "undid the move from @alice:localhost", "{room}");
        // Its notice redacted, once, with the reason.
        assert!(move_notices(&timeline).is_empty(), "{room}: a notice left");
        let redactions: Vec<&Value> = timeline.iter().filter(|e| e["type"] == "m.room.redaction").collect();
        assert_eq!(redactions.len(), 1, "{room}: {redactions:?}");
        assert_eq!(redactions[0]["content"]["reason"], "@bob:localhost undid the move from @alice:localhost");
        // The rank the move gave, taken back.
        assert_eq!(power_of(&alice, room, &bob.id).await, None, "{room}");
    }
    assert!(!bob.tags(&rooms[0]).await.contains_key(&TagName::Favorite), "the move's tag taken off");
    // In the room he wrote in, the move's notice and rank stay with him.
    assert_eq!(move_notices(&alice.timeline(&rooms[2]).await).len(), 1);

    // The settings: back where the move wrote them, kept where bob changed them.
    assert_eq!(bob.account_data("m.ignored_user_list").await, Some(mine), "changed since: kept");
    assert!(report.contains("Kept, changed since the move: ignored users"), "{report}");
    let now = rules(&bob).await;
    assert!(!has_rule(&now, "content", "handoff-test-deploy"), "alice's rule removed");
    assert!(!has_rule(&now, "override", "org.handoff.old_mentions"), "the mention rule removed");
    let setting = bob.account_data("im.vector.setting.integration_provisioning").await;
    assert!(setting.is_none() || setting == Some(json!({})), "bob had none: {setting:?}");
    let direct = bob.account_data("m.direct").await;
    assert!(direct == direct_before || (direct_before.is_none() && direct == Some(json!({}))), "{direct:?}");
    let profile = bob.send(get_profile::v3::Request::new(bob.id.clone())).await;
    assert_eq!(profile.get("displayname"), Some(&json!("Bob B.")));
    assert_eq!(profile.get("avatar_url"), None, "bob had no avatar before the move");

    // Once is all; `status` says it.
    h.ask(&bob, &bdm, "undo", "was undone already").await;
    h.ask(&bob, &bdm, "status", "Undone (`undo`)").await;
}

/// Account data that reads as absent (`None`, or the empty object an undo writes where there was
/// none: account data can't be deleted) compares as absent.
fn or_empty(v: Option<Value>) -> Value {
    v.filter(|v| v.as_object().is_none_or(|o| !o.is_empty())).unwrap_or(Value::Null)
}

/// The device side: `handoff import` records what it wrote in the account's folder, and
/// `handoff undo` takes it back with the same rules as the bot's `undo`.
#[tokio::test]
async fn the_device_side_undoes_its_last_import_and_keeps_what_changed_since() {
    const PASSWORD: &str = "correct horse battery staple";
    let h = Harness::start().await;
    let url = h.synapse().url.clone();
    let (alice, bob) = (h.user_with_password("alice", PASSWORD).await, h.user_with_password("bob", PASSWORD).await);
    let carol = h.user("carol").await;

    // alice's account: a favourite, two more rooms, a DM with carol, a room bob is in already,
    // an ignored user, a keyword rule, a client setting and a display name.
    let plans = alice.create_room("Plans").await;
    alice.tag(&plans, "m.favourite", Some(0.5)).await;
    let (chat, square) = (alice.create_room("Chat").await, alice.create_room("Square").await);
    let dm = alice.dms_with(&[&carol]).await.remove(0);
    let shared = alice.create_room("Shared").await;
    alice.invite(&shared, &bob.id).await;
    bob.join(&shared).await;
    alice.set_account_data("m.ignored_user_list", json!({"ignored_users": {"@troll:localhost": {}}})).await;
    let deploy = NewPatternedPushRule::new("handoff-test-deploy".into(), "deploy".into(), vec![Action::Notify]);
    alice.send(set_pushrule::v3::Request::new(NewPushRule::Content(deploy))).await;
    alice.set_account_data("im.vector.setting.integration_provisioning", json!({"enabled": false})).await;
    alice
        .send(set_profile_field::v3::Request::new(alice.id.clone(), ProfileFieldValue::DisplayName("Alice A.".into())))
        .await;
    bob.set_account_data("m.ignored_user_list", json!({"ignored_users": {"@bobsenemy:localhost": {}}})).await;
    // bob's account as it was, read through the client-server API.
    let had = joined(&bob).await;
    let bob_name = bob.send(get_profile::v3::Request::new(bob.id.clone())).await.get("displayname").cloned();
    let (direct, ignored) = (bob.account_data("m.direct").await, bob.account_data("m.ignored_user_list").await);
    let rules_before = rules(&bob).await;

    // Both accounts logged in on this device; alice's bundle exported, then imported into bob.
    let data = tempfile::tempdir().unwrap();
    let cli = |args: &[&str], stdin: &str| common::device_cli(data.path(), args, stdin);
    for user in [&alice.id, &bob.id] {
        let (status, _, err) =
            cli(&["login", user.as_str(), "--homeserver", url.as_str(), "--password-stdin"], &format!("{PASSWORD}\n"));
        assert!(status.success(), "{err}");
    }
    let pass = data.path().join("passphrase");
    std::fs::write(&pass, "bundle passphrase\n").unwrap();
    let (pass, file) = (pass.to_str().unwrap().to_owned(), data.path().join("alice.handoff"));
    let file = file.to_str().unwrap();
    let (status, _, err) = cli(&["export", "--as", "@alice:localhost", "--out", file, "--passphrase-file", &pass], "");
    assert!(status.success(), "{err}");

    // Nothing imported yet: nothing to undo.
    let (status, _, err) = cli(&["undo", "--as", "@bob:localhost"], "");
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("no import into @bob:localhost is recorded on this device"), "{err}");

    let import = ["import", file, "--as", "@bob:localhost", "--passphrase-file", &pass, "--old", "@alice:localhost"];
    let (status, out, err) = cli(&[&import[..], &["--profile-from-old"]].concat(), "");
    assert!(status.success(), "{out}{err}");
    let moved = [&plans, &chat, &square, &dm];
    let now = joined(&bob).await;
    assert!(moved.iter().all(|r| now.contains(*r)), "{out}");
    assert!(bob.tags(&plans).await.contains_key(&TagName::Favorite));
    assert!(has_rule(&rules(&bob).await, "content", "handoff-test-deploy"));
    assert!(power_of(&alice, &plans, &bob.id).await.is_some(), "the import carried alice's rank");

    // Since the import, bob wrote in one room and changed the client setting: both his.
    bob.send_text(&chat, "my own words, after the import").await;
    bob.set_account_data("im.vector.setting.integration_provisioning", json!({"enabled": true})).await;

    // The dry run says what would change, and changes nothing.
    let (status, out, err) = cli(&["undo", "--as", "@bob:localhost", "--dry-run", "--json"], "");
    assert!(status.success(), "{err}");
    let plan: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let undo_of = |room: &RoomId| {
        let rooms = plan["rooms"].as_array().unwrap();
        rooms.iter().find(|r| r["room_id"] == room.as_str()).map(|r| (r["undo"].clone(), r["why"].clone()))
    };
    for room in [&plans, &square, &dm] {
        assert_eq!(undo_of(room), Some((json!("leave"), Value::Null)), "{room}: {plan:#}");
    }
    assert_eq!(undo_of(&chat), Some((json!("keep"), json!("wrote_since"))), "{plan:#}");
    assert_eq!(undo_of(&shared), Some((json!("keep"), json!("was_member"))), "{plan:#}");
    let settings = &plan["settings"];
    assert!(
        settings["keep"].as_array().unwrap().iter().any(|s| s.as_str().unwrap().contains("integration")),
        "{plan:#}"
    );
    assert!(settings["restore"].as_array().unwrap().contains(&json!("display name")), "{plan:#}");
    assert_eq!(joined(&bob).await, now, "the dry run left nothing");

    let (status, out, err) = cli(&["undo", "--as", "@bob:localhost"], "");
    assert!(status.success(), "{out}{err}");
    assert!(out.contains("left 3 room(s), redacted 3 move notice(s)"), "{out}");
    assert!(out.contains("stays: Chat (you have written there since the move (--all leaves it anyway))"), "{out}");
    assert!(
        out.contains("Kept, changed since the import: client setting im.vector.setting.integration_provisioning"),
        "{out}"
    );

    // bob's rooms are those he had, and the one he wrote in.
    let mut expected = had.clone();
    expected.insert(chat.clone());
    assert_eq!(joined(&bob).await, expected, "{out}");
    for room in [&plans, &square, &dm] {
        let timeline = alice.timeline(room).await;
        assert_eq!(memberships(&timeline, &bob.id).last().map(String::as_str), Some("leave"), "{room}");
        assert!(move_notices(&timeline).is_empty(), "{room}: a notice left");
        let redactions = timeline.iter().filter(|e| e["type"] == "m.room.redaction").count();
        assert_eq!(redactions, 1, "{room}");
        assert_eq!(power_of(&alice, room, &bob.id).await, None, "{room}: the rank the import gave");
    }
    assert!(!bob.tags(&plans).await.contains_key(&TagName::Favorite), "the import's tag taken off");
    // Every setting the import wrote is back as it was, but the one bob changed since.
    assert_eq!(or_empty(bob.account_data("m.direct").await), or_empty(direct));
    assert_eq!(bob.account_data("m.ignored_user_list").await, ignored);
    let rules_now = rules(&bob).await;
    assert!(!has_rule(&rules_now, "content", "handoff-test-deploy"));
    assert!(!has_rule(&rules_now, "override", "org.handoff.old_mentions"));
    assert_eq!(rules_now, rules_before, "push rules as they were");
    assert_eq!(bob.send(get_profile::v3::Request::new(bob.id.clone())).await.get("displayname").cloned(), bob_name);
    assert_eq!(
        bob.account_data("im.vector.setting.integration_provisioning").await,
        Some(json!({"enabled": true})),
        "bob's own change since the import stays"
    );

    // Once only; and what the record keeps is sealed.
    let (status, _, err) = cli(&["undo", "--as", "@bob:localhost"], "");
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("was undone already"), "{err}");
    let record = std::fs::read(data.path().join("accounts/@bob:localhost/last-import.sealed")).unwrap();
    for needle in ["bobsenemy", "troll", "handoff-test-deploy", plans.as_str()] {
        assert!(!record.windows(needle.len()).any(|w| w == needle.as_bytes()), "{needle} readable in the record");
    }
}
