//! A move to an account on another homeserver, end to end on two federating Synapses: the old
//! account on A exports with `--to @new:B --file` (A's handoff reserves the seats at once), the new
//! account drops the file into its DM with B's bot and sends `import CODE` there.

mod common;

use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt};

use common::federation::{FederatedHarness, drop_file};
use common::{User, body, eventually, export_file, move_notices, with_concurrency};
use handoff::sandbox::{RateLimit, Side, lifted};
use ruma::api::client::membership::joined_rooms;
use ruma::api::client::push::{get_pushrules_all, set_pushrule};
use ruma::api::client::room::{Visibility, create_room};
use ruma::api::client::state::{get_state_event_for_key, send_state_event};
use ruma::events::StateEventType;
use ruma::events::tag::TagName;
use ruma::push::{NewPushRule, NewSimplePushRule};
use ruma::{OwnedRoomId, RoomId};
use serde_json::{Value, json};

/// Side B's limit on the invites one user receives (`rc_invites.per_user`: 5 at once, then one
/// each 333 s; no exemption for an application service), lifted in the tests that are about
/// something else: at the default, a reservation past the 5th room is paced at one room per
/// 333 s (A's Synapse reports each refusal as 502 "Can't connect to server <B>"), and these tests
/// would take an hour. Pacing itself is tested under the same kind of limit, made faster
/// ([`B_LIMITS_INVITES`]), by `a_reservation_to_a_server_that_limits_invites_is_paced_told_and_completes`.
fn invites_unlimited_on_b(side: Side) -> String {
    if side == Side::B { lifted(&[RateLimit::InvitesPerUser]) } else { String::new() }
}

/// A room created by `creator` on its own server, named `name`, public or private.
async fn room_of(creator: &User, name: &str, public: bool) -> OwnedRoomId {
    let mut req = create_room::v3::Request::new();
    req.name = Some(name.to_owned());
    if public {
        req.preset = Some(create_room::v3::RoomPreset::PublicChat);
        req.visibility = Visibility::Public;
    } else {
        req.preset = Some(create_room::v3::RoomPreset::PrivateChat);
    }
    creator.send(req).await.room_id
}

/// `user`'s own membership of `room` as it reads it, `"none"` when it is not in the room.
async fn membership(user: &User, room: &RoomId) -> String {
    let req =
        get_state_event_for_key::v3::Request::new(room.to_owned(), StateEventType::RoomMember, user.id.to_string());
    match user.try_send(req).await {
        Ok(resp) => {
            let content: Value = serde_json::from_str(resp.event_or_content.get()).unwrap();
            content["membership"].as_str().unwrap_or_default().to_owned()
        }
        Err(e) if e.contains("not in room") => "none".to_owned(),
        Err(e) => panic!("{room}: {e}"),
    }
}

#[tokio::test]
async fn a_move_to_another_server_is_imported_there_with_the_file_and_the_code() {
    let started = Instant::now();
    let fh = FederatedHarness::start_with_homeservers(
        |_, _, c| c,
        |side| match side {
            // A: the test's world has B's bob invite alice (on A) into 7 rooms, past the 5 invites
            // A lets one user receive; the move's invites go to B, under B's limits.
            Side::A => lifted(&[RateLimit::InvitesPerUser]),
            // lifted (a test about something else): 17 invites to newbie on B, paced
            // one per 333 s past the 5th at the default (see `invites_unlimited_on_b`).
            Side::B => invites_unlimited_on_b(side),
        },
    )
    .await;
    let name_b = fh.server_name(Side::B);
    println!("both homeservers and handoffs up in {:.1?}", started.elapsed());

    // The old account on A, in 20 rooms hosted on A and on B: DMs with a contact on each side,
    // favourites, a space with a child on each side, a restricted room, an encrypted room, a
    // public and a private room on B, and plain rooms on both.
    let alice = fh.a.user("alice").await;
    let carol = fh.a.user("carol").await;
    let bob = fh.b.user("bob").await;
    let dms = alice.dms_with(&[&carol, &bob]).await;
    let (dm, dm_b) = (dms[0].clone(), dms[1].clone());
    let on_b = |name: &'static str| {
        let (alice, bob, name_b) = (&alice, &bob, &name_b);
        async move {
            let room = room_of(bob, name, false).await;
            bob.invite(&room, &alice.id).await;
            alice.join_via(&room, &[name_b]).await;
            room
        }
    };
    let favourite = room_of(&alice, "Favourite on A", false).await;
    alice.tag(&favourite, "m.favourite", Some(0.5)).await;
    let favourite_b = on_b("Favourite on B").await;
    alice.tag(&favourite_b, "m.favourite", Some(0.7)).await;
    let public = room_of(&bob, "Public on B", true).await;
    alice.join_via(&public, &[&name_b]).await;
    let private = on_b("Private on B").await;
    let child_a = room_of(&alice, "Child on A", false).await;
    let child_b = on_b("Child on B").await;
    let mut req = create_room::v3::Request::new();
    req.name = Some("Space".into());
    req.preset = Some(create_room::v3::RoomPreset::PrivateChat);
    req.creation_content = Some(ruma::serde::Raw::new(&json!({"type": "m.space"})).unwrap().cast_unchecked());
    let space = alice.send(req).await.room_id;
    for (child, via) in [(&child_a, fh.server_name(Side::A)), (&child_b, name_b.clone())] {
        let req = send_state_event::v3::Request::new_raw(
            space.clone(),
            "m.space.child".into(),
            child.to_string(),
            common::raw(json!({"via": [via]})),
        );
        alice.send(req).await;
    }
    // Restricted to the members of the child on B (it is B's, so B can check).
    let restricted = on_b("Restricted on B").await;
    let rule = json!({"join_rule": "restricted", "allow": [{"type": "m.room_membership", "room_id": child_b}]});
    bob.send_state(&restricted, "m.room.join_rules", rule).await;
    let mut req = create_room::v3::Request::new();
    req.name = Some("Encrypted on A".into());
    req.preset = Some(create_room::v3::RoomPreset::PrivateChat);
    req.initial_state = vec![common::raw(json!({"type": "m.room.encryption", "state_key": "",
        "content": {"algorithm": "m.megolm.v1.aes-sha2"}}))];
    let encrypted = alice.send(req).await.room_id;
    let mut plain = alice.create_rooms(4).await;
    for name in ["Plain on B 1", "Plain on B 2"] {
        plain.push(on_b(name).await);
    }
    // Where alice moderates (a room-version-12 creator's rank can't be given; a moderator's can).
    let moderated = on_b("Moderated on B").await;
    bob.send_state(&moderated, "m.room.power_levels", json!({"users": {alice.id.as_str(): 50}})).await;
    plain.push(moderated.clone());
    let mut rooms = vec![
        dm.clone(),
        dm_b.clone(),
        favourite.clone(),
        favourite_b.clone(),
        public.clone(),
        private.clone(),
        space.clone(),
        child_a.clone(),
        child_b.clone(),
        restricted.clone(),
        encrypted.clone(),
    ];
    rooms.extend(plain.iter().cloned());
    assert_eq!(rooms.len(), 18, "18 movable rooms, and 2 that can't be moved below");
    // Preferences: a room's notifications, a client setting, an ignored user, a display name.
    alice
        .send(set_pushrule::v3::Request::new(NewPushRule::Room(NewSimplePushRule::new(favourite_b.clone(), vec![]))))
        .await;
    alice.set_account_data("im.vector.web.settings", json!({"theme": "dark"})).await;
    let spammer = format!("@spammer:{}", fh.server_name(Side::A));
    alice.set_account_data("m.ignored_user_list", json!({"ignored_users": {spammer.as_str(): {}}})).await;
    let req = ruma::api::client::profile::set_profile_field::v3::Request::new(
        alice.id.clone(),
        ruma::profile::ProfileFieldValue::DisplayName("Alice of A".into()),
    );
    alice.send(req).await;
    // Two rooms that can't take B's accounts: one does not federate, one's server ACL denies B.
    let mut req = create_room::v3::Request::new();
    req.name = Some("Only on A".into());
    req.preset = Some(create_room::v3::RoomPreset::PrivateChat);
    req.creation_content = Some(ruma::serde::Raw::new(&json!({"m.federate": false})).unwrap().cast_unchecked());
    let local_only = alice.send(req).await.room_id;
    let denying = room_of(&alice, "Denies B", false).await;
    let acl = json!({"allow": ["*"], "deny": [Side::B.host().to_string()], "allow_ip_literals": true});
    alice.send_state(&denying, "m.room.server_acl", acl).await;

    // An avatar on A, copied to B by the move (a 1×1 PNG).
    let png = hex_png();
    let avatar = alice.upload("avatar.png", png.clone()).await;
    let req = ruma::api::client::profile::set_profile_field::v3::Request::new(
        alice.id.clone(),
        ruma::profile::ProfileFieldValue::AvatarUrl(avatar.clone()),
    );
    alice.send(req).await;

    // The new account on B: nothing on A knows it, and it never writes to A's bot.
    let newbie = fh.b.user("newbie").await;
    let alice_dm = fh.a.dm_with_bot(&alice).await;
    let exported = Instant::now();
    let (code, file) = export_file(&fh.a, &alice, &alice_dm, &format!("--to {}", newbie.id)).await;
    println!("export with the file in {:.1?}", exported.elapsed());

    // A reserves the seats right away: the new account is invited into every room the old one may
    // invite to (in the public room, only moderators may: it is joined without an invite).
    // Before anything changes, the room that can't reach B is named, with why.
    let preflight = fh.a.bot_says(&alice, &alice_dm, 0, "the preflight", |b| b.contains("can't be moved to")).await;
    assert!(preflight.starts_with(&format!("2 of your rooms can't be moved to {}", newbie.id)), "{preflight}");
    assert!(preflight.contains("Only on A: the room is limited to the old account's server"), "{preflight}");
    assert!(preflight.contains("Denies B: the room's server ACL excludes the new account's server"), "{preflight}");
    let reserved =
        fh.a.bot_says(&alice, &alice_dm, 0, "the reservation's report", |b| b.contains("reserved for")).await;
    assert!(reserved.starts_with(&format!("18 of 20 rooms reserved for {}", newbie.id)), "{reserved}");
    println!("seats reserved {:.1?} after the export", exported.elapsed());
    // Every room but the public one (only its moderators may invite there).
    let invited: Vec<OwnedRoomId> = rooms.iter().filter(|r| **r != public).cloned().collect();
    eventually("every reservation on B", || async {
        let invites = newbie.invites().await;
        invited.iter().all(|r| invites.contains(r)).then_some(())
    })
    .await;
    println!("every invite on B {:.1?} after the export", exported.elapsed());

    // The new account drops the file into its DM with B's bot.
    let new_dm = fh.b.dm_with_bot(&newbie).await;
    drop_file(&fh.b, &newbie, &new_dm, &file).await;

    // Another account on B holding the file and the code can't use them: the bundle is addressed.
    let mallory = fh.b.user("mallory").await;
    let mallory_dm = fh.b.dm_with_bot(&mallory).await;
    drop_file(&fh.b, &mallory, &mallory_dm, &file).await;
    let refused = fh.b.ask(&mallory, &mallory_dm, &format!("import {code}"), "not to you").await;
    assert!(refused.contains(&format!("addressed to {}", newbie.id)), "{refused}");
    let mallory_rooms = mallory.send(joined_rooms::v3::Request::new()).await.joined_rooms;
    assert_eq!(mallory_rooms, std::slice::from_ref(&mallory_dm), "mallory joined nothing");

    // A wrong code opens nothing and changes nothing.
    let wrong = handoff::code::TransferCode::generate().display();
    let refused = fh.b.ask(&newbie, &new_dm, &format!("import {wrong}"), "does not open the bundle file").await;
    assert!(refused.starts_with("No such transfer code"), "{refused}");
    for room in &rooms {
        assert_eq!(membership(&newbie, room).await, "none", "{room}: the new account is not in it");
    }
    let invites = newbie.invites().await;
    assert!(invited.iter().all(|r| invites.contains(r)), "still invited: {invites:?}");
    for room in [&local_only, &denying] {
        assert!(!invites.contains(room), "invited where it can't go: {invites:?}");
    }

    // The right code moves everything into the new account.
    let imported = Instant::now();
    fh.b.ask(&newbie, &new_dm, &format!("import {code}"), "The code opens the bundle file of").await;
    let report = fh.b.bot_says(&newbie, &new_dm, 0, "the report", |b| b.contains("rooms moved to")).await;
    println!("import on B done in {:.1?}", imported.elapsed());
    assert!(report.starts_with(&format!("18 of 20 rooms moved to {}", newbie.id)), "{report}");
    assert!(report.contains("✓ direct"), "{report}");
    // The rooms A's preflight named are skipped at once on B too, with A's reasons (the bundle says).
    assert!(report.contains("Only on A: the room is limited to the old account's server"), "{report}");
    assert!(report.contains("Denies B: the room's server ACL excludes the new account's server"), "{report}");
    for room in &rooms {
        assert_eq!(membership(&newbie, room).await, "join", "{room}");
        let timeline = newbie.timeline(room).await;
        let notices = move_notices(&timeline);
        assert_eq!(notices.len(), 1, "{room}: one move notice: {notices:#?}");
        assert_eq!(notices[0]["sender"], newbie.id.as_str(), "posted by the new account");
        assert_eq!(notices[0]["content"]["org.handoff.move"]["from"], alice.id.as_str());
        // In an encrypted room (the DMs), the new account's membership carries it, not a
        // clear-text message: its reason is the notice's text.
        let encrypted = timeline.iter().any(|e| e["type"] == "m.room.encryption");
        let (kind, text) = match encrypted {
            true => ("m.room.member", notices[0]["content"]["reason"].as_str().unwrap_or_default()),
            false => ("m.room.message", body(notices[0])),
        };
        assert_eq!(notices[0]["type"], kind, "{room}");
        assert!(text.contains(alice.id.as_str()), "{text}");
        if encrypted {
            assert!(!timeline.iter().any(|e| e["type"] == "m.room.message" && e["sender"] == newbie.id.as_str()));
        }
    }
    for room in [&favourite, &favourite_b] {
        assert!(newbie.tags(room).await.contains_key(&TagName::Favorite), "{room}: a favourite");
    }
    assert_eq!(
        newbie.account_data("m.direct").await,
        Some(json!({ carol.id.as_str(): [dm], bob.id.as_str(): [dm_b] }))
    );
    let rules = newbie.send(get_pushrules_all::v3::Request::new()).await.global;
    assert!(rules.room.iter().any(|r| r.rule_id == favourite_b && r.actions.is_empty()), "its push rule");
    assert_eq!(newbie.account_data("im.vector.web.settings").await, Some(json!({"theme": "dark"})));
    let ignored = newbie.account_data("m.ignored_user_list").await.unwrap_or_default();
    assert!(ignored["ignored_users"].get(&spammer).is_some(), "{ignored}");
    let child_state = newbie.membership_of(&child_b, &newbie.id).await;
    assert_eq!(child_state["membership"], "join", "the space's child on B");
    // The display name is carried; the avatar is a copy on B, with the same bytes.
    let profile = newbie.send(ruma::api::client::profile::get_profile::v3::Request::new(newbie.id.clone())).await;
    assert_eq!(profile.get("displayname"), Some(&json!("Alice of A")));
    let copied: ruma::OwnedMxcUri = serde_json::from_value(profile.get("avatar_url").cloned().unwrap()).unwrap();
    assert_eq!(copied.server_name().unwrap().as_str(), name_b.as_str(), "{copied} is not on B");
    let req = ruma::api::client::authenticated_media::get_content::v1::Request::from_uri(&copied).unwrap();
    assert_eq!(newbie.send(req).await.file, png, "the copy holds the avatar's bytes");
    // The old account sees the new one in the rooms it hosts.
    assert_eq!(alice.membership_of(&favourite, &newbie.id).await["membership"], "join");

    // The old side learns, from the new account's joins it can read, that the move is complete,
    // and says so in the old account's DM (without being asked: its watch looks by itself).
    let learned = Instant::now();
    let taken = fh.a.bot_says_within(&alice, &alice_dm, "is complete", Duration::from_secs(200)).await;
    println!("A learned the move was done {:.1?} after B's report", learned.elapsed());
    assert!(
        taken.starts_with(&format!(
            "{} has joined 18 of your 20 rooms: your move to {} is complete",
            newbie.id, newbie.id
        )),
        "{taken}"
    );
    assert!(taken.contains("Denies B: the room's server ACL excludes"), "{taken}");
    assert!(taken.contains("`finish --leave`"), "{taken}");
    // The moderator rank is carried, once A has seen the new account joined.
    assert_eq!(level_of(&alice, &moderated, &newbie.id).await, Some(50));
    let status = fh.a.ask(&alice, &alice_dm, "status", "Transfer").await;
    assert!(status.contains("20 rooms: 18 moved, 0 awaiting accept, 2 skipped, 0 failed"), "{status}");

    // The code works once.
    let again = fh.b.ask(&newbie, &new_dm, &format!("import {code}"), "already used").await;
    assert!(again.contains("ask for a new one"), "{again}");
    assert_eq!(move_notices(&newbie.timeline(&favourite).await).len(), 1, "still one notice");

    // The new account takes the move back on B: it leaves every room it joined, as the old
    // account's server sees it, its notices redacted, and its settings go back to what it had.
    let undone = fh.b.ask(&newbie, &new_dm, "undo", "is undone").await;
    assert!(undone.contains("left 18 room(s)"), "{undone}");
    for room in &rooms {
        eventually("the leave to reach A", || async {
            (alice.membership_of(room, &newbie.id).await["membership"] == "leave").then_some(())
        })
        .await;
    }
    let notices = move_notices(&alice.timeline(&favourite).await).len();
    assert_eq!(notices, 0, "the notice in the favourite is redacted, as A sees it");
    let direct = newbie.account_data("m.direct").await;
    assert!(direct.is_none() || direct == Some(json!({})), "newbie had no DMs: {direct:?}");
    let profile = newbie.send(ruma::api::client::profile::get_profile::v3::Request::new(newbie.id.clone())).await;
    assert_eq!(profile.get("displayname"), Some(&json!("newbie")), "its own name again");
    assert_eq!(profile.get("avatar_url"), None, "no avatar, as before");
    println!("whole test: {:.1?}", started.elapsed());
}

/// `user`'s power level in the room's `users`, as `reader` reads it (`None`: not named there).
async fn level_of(reader: &User, room: &RoomId, user: &ruma::UserId) -> Option<i64> {
    let req =
        get_state_event_for_key::v3::Request::new(room.to_owned(), StateEventType::RoomPowerLevels, String::new());
    let levels: Value = serde_json::from_str(reader.send(req).await.event_or_content.get()).unwrap();
    levels["users"][user.as_str()].as_i64()
}

#[tokio::test]
async fn a_reservation_gives_the_rank_only_after_the_join_and_undo_takes_back_the_invites() {
    let started = Instant::now();
    let fh = FederatedHarness::start().await;
    let name_a = fh.server_name(Side::A);
    let alice = fh.a.user("alice").await;
    let carol = fh.a.user("carol").await;
    let newbie = fh.b.user("newbie").await;
    // Where alice moderates, and two rooms of her own (a creator: the plan gives 100).
    let moderated = room_of(&carol, "Moderated", false).await;
    carol.invite(&moderated, &alice.id).await;
    alice.join(&moderated).await;
    carol.send_state(&moderated, "m.room.power_levels", json!({"users": {alice.id.as_str(): 50}})).await;
    let own = alice.create_rooms(2).await;
    let rooms: Vec<OwnedRoomId> = [moderated.clone()].into_iter().chain(own.iter().cloned()).collect();
    let dm = fh.a.dm_with_bot(&alice).await;

    let reserving = fh.a.ask(&alice, &dm, &format!("export --to {}", newbie.id), "Reserving").await;
    assert!(reserving.contains("once it has joined it"), "{reserving}");
    let report = fh.a.bot_says(&alice, &dm, 0, "the reservation's report", |b| b.contains("reserved for")).await;
    assert!(report.starts_with(&format!("3 of 3 rooms reserved for {}", newbie.id)), "{report}");
    eventually("every invite on B", || async {
        let invites = newbie.invites().await;
        rooms.iter().all(|r| invites.contains(r)).then_some(())
    })
    .await;
    // Invited only: no rank anywhere (a typo in `--to` gives a stranger nothing).
    for room in &rooms {
        assert_eq!(level_of(&alice, room, &newbie.id).await, None, "{room}: a rank before the join");
    }

    // The new account joins one room from its client: A's watch gives it alice's rank there only.
    newbie.join_via(&moderated, &[&name_a]).await;
    eventually("the rank after the join", || async {
        (level_of(&alice, &moderated, &newbie.id).await == Some(50)).then_some(())
    })
    .await;
    println!("rank given {:.1?} into the test", started.elapsed());
    for room in &own {
        assert_eq!(level_of(&alice, room, &newbie.id).await, None, "{room}: a rank without a join");
    }

    // `undo` (as `cancel`) takes back the invites not taken; the joined room keeps the new account
    // and its rank. Its dry run changes nothing.
    let dry = fh.a.ask(&alice, &dm, "undo --dry-run", "Nothing was changed").await;
    assert!(dry.contains("would withdraw the invites it has not taken yet"), "{dry}");
    assert_eq!(count_membership(&alice, &own, &newbie.id, "invite").await, own.len(), "the dry run withdrew");
    let cancelled = fh.a.ask(&alice, &dm, "undo", "reservation").await;
    assert!(cancelled.contains("invites not taken yet are being withdrawn"), "{cancelled}");
    eventually("the invites withdrawn", || async {
        (count_membership(&alice, &own, &newbie.id, "leave").await == own.len()).then_some(())
    })
    .await;
    for room in &own {
        let member = alice.membership_of(room, &newbie.id).await;
        assert_eq!(member["reason"], format!("{} cancelled the move to this account (handoff)", alice.id), "{member}");
    }
    assert_eq!(alice.membership_of(&moderated, &newbie.id).await["membership"], "join");
    assert_eq!(level_of(&alice, &moderated, &newbie.id).await, Some(50));
    eventually("no invite left on B", || async {
        let invites = newbie.invites().await;
        own.iter().all(|r| !invites.contains(r)).then_some(())
    })
    .await;
    let status = fh.a.ask(&alice, &dm, "status", "Transfer").await;
    assert!(status.contains("cancelled"), "{status}");
    assert!(status.contains("1 moved, 0 awaiting accept, 2 skipped"), "{status}");
    println!("whole test: {:.1?}", started.elapsed());
}

#[tokio::test]
async fn the_invites_of_a_reservation_not_imported_before_its_code_expires_are_withdrawn() {
    let started = Instant::now();
    // The shortest code A allows, and little grace after it (the federation patience).
    let short = |side, _: &_, c: String| {
        if side == Side::A { with_patience(common::edit(c, "code_ttl: 15m", "code_ttl: 30s"), "3s") } else { c }
    };
    // lifted (a test about something else): 10 invites to newbie on B, paced one per 333 s
    // past the 5th at the default, longer than the 30 s code this test lets expire.
    let fh = FederatedHarness::start_with_homeservers(short, invites_unlimited_on_b).await;
    let (alice, dm, newbie, rooms) = reserving(&fh).await;
    fh.a.ask(&alice, &dm, &format!("export --to {}", newbie.id), "Reserving").await;
    fh.a.bot_says(&alice, &dm, 0, "the reservation's report", |b| b.contains("reserved for")).await;
    assert_eq!(count_membership(&alice, &rooms, &newbie.id, "invite").await, OUTAGE_ROOMS);
    // Nobody imports: past the code's expiry, A's watch takes every invite back.
    let taken_back = fh.a.bot_says_within(&alice, &dm, "Not moved", Duration::from_secs(150)).await;
    println!("invites withdrawn {:.1?} after the export", started.elapsed());
    assert!(taken_back.contains("the reservation expired before"), "{taken_back}");
    assert_eq!(count_membership(&alice, &rooms, &newbie.id, "leave").await, OUTAGE_ROOMS);
    let member = alice.membership_of(&rooms[0], &newbie.id).await;
    assert!(member["reason"].as_str().unwrap_or_default().contains("expired"), "{member}");
    println!("whole test: {:.1?}", started.elapsed());
}

/// Rooms of the move that B's handoff is stopped in the middle of.
const ROOMS: usize = 24;

#[tokio::test]
async fn a_received_move_stopped_midway_completes_when_the_service_is_back() {
    let started = Instant::now();
    // One room at a time on B, so the move is still going when its handoff is killed.
    let mut fh = FederatedHarness::start_with_homeservers(
        |side, _, c| if side == Side::B { with_concurrency(c, 1) } else { c },
        |side| match side {
            // A: the test's world has B's bob invite alice (on A) into 24 rooms, past the 5
            // invites A lets one user receive; the move's invites go to B, under B's limits.
            Side::A => lifted(&[RateLimit::InvitesPerUser]),
            // lifted (a test about something else): 24 invites to newbie on B, paced
            // one per 333 s past the 5th at the default (see `invites_unlimited_on_b`).
            Side::B => invites_unlimited_on_b(side),
        },
    )
    .await;
    let name_b = fh.server_name(Side::B);
    let alice = fh.a.user("alice").await;
    let bob = fh.b.user("bob").await;
    let newbie = fh.b.user("newbie").await;
    let rooms: Vec<OwnedRoomId> = stream::iter(0..ROOMS)
        .map(|i| {
            let (alice, bob, name_b) = (&alice, &bob, &name_b);
            async move {
                let room = room_of(bob, &format!("room {i:02}"), false).await;
                bob.invite(&room, &alice.id).await;
                alice.join_via(&room, &[name_b]).await;
                room
            }
        })
        .buffered(6)
        .collect()
        .await;
    println!("{ROOMS} rooms on B with alice from A in {:.1?}", started.elapsed());

    let alice_dm = fh.a.dm_with_bot(&alice).await;
    let (code, file) = export_file(&fh.a, &alice, &alice_dm, &format!("--to {}", newbie.id)).await;
    let reserved =
        fh.a.bot_says(&alice, &alice_dm, 0, "the reservation's report", |b| b.contains("reserved for")).await;
    assert!(reserved.starts_with(&format!("{ROOMS} of {ROOMS} rooms reserved")), "{reserved}");
    eventually("every reservation on B", || async {
        let invites = newbie.invites().await;
        rooms.iter().all(|r| invites.contains(r)).then_some(())
    })
    .await;

    let new_dm = fh.b.dm_with_bot(&newbie).await;
    drop_file(&fh.b, &newbie, &new_dm, &file).await;
    fh.b.ask(&newbie, &new_dm, &format!("import {code}"), "The code opens the bundle file of").await;
    // Killed once the first rooms are joined, with the others still to do.
    let joined_now = || async {
        let joined = newbie.send(joined_rooms::v3::Request::new()).await.joined_rooms;
        rooms.iter().filter(|r| joined.contains(r)).count()
    };
    eventually("the first rooms joined", || async { (joined_now().await > 0).then_some(()) }).await;
    fh.b.signal_handoff("KILL");
    let moved = joined_now().await;
    println!("B's handoff killed with {moved} of {ROOMS} rooms joined");
    assert!(moved > 0 && moved < ROOMS, "killed mid-move, or the test proves nothing: {moved} joined");

    let restarted = Instant::now();
    fh.b.start_handoff().await;
    let report = fh.b.bot_says_within(&newbie, &new_dm, "rooms moved to", Duration::from_secs(120)).await;
    println!("the move completed {:.1?} after the restart", restarted.elapsed());
    assert!(report.starts_with(&format!("{ROOMS} of {ROOMS} rooms moved to {}", newbie.id)), "{report}");
    for room in &rooms {
        let timeline = newbie.timeline(room).await;
        assert_eq!(move_notices(&timeline).len(), 1, "{room}: one notice across the restart");
        assert_eq!(common::memberships(&timeline, &newbie.id), ["invite", "join"], "{room}: joined once");
    }
    println!("whole test: {:.1?}", started.elapsed());
}

/// `config` with `handoff.federation_patience` set to `patience`.
fn with_patience(config: String, patience: &str) -> String {
    common::edit(config, "federation_patience: 10m", &format!("federation_patience: {patience}"))
}

/// Rooms on A that a reservation is reserving when B's homeserver goes away.
const OUTAGE_ROOMS: usize = 10;

/// Alice on A with `OUTAGE_ROOMS` rooms of her own, her DM with A's bot, and the new account on B.
async fn reserving(fh: &FederatedHarness) -> (common::User, OwnedRoomId, common::User, Vec<OwnedRoomId>) {
    let alice = fh.a.user("alice").await;
    let newbie = fh.b.user("newbie").await;
    let rooms = alice.create_rooms(OUTAGE_ROOMS).await;
    let dm = fh.a.dm_with_bot(&alice).await;
    (alice, dm, newbie, rooms)
}

/// How many of `rooms` `user` has `membership` in, as `reader` (in them all) sees it.
async fn count_membership(
    reader: &common::User,
    rooms: &[OwnedRoomId],
    user: &ruma::UserId,
    membership: &str,
) -> usize {
    let mut n = 0;
    for room in rooms {
        let req = get_state_event_for_key::v3::Request::new(room.clone(), StateEventType::RoomMember, user.to_string());
        // No member event (404): no membership at all.
        if let Ok(resp) = reader.try_send(req).await {
            let content: Value = serde_json::from_str(resp.event_or_content.get()).unwrap();
            n += usize::from(content["membership"] == membership);
        }
    }
    n
}

/// Each of `rooms` holds exactly one invite of `newbie` (as `alice`, in them all, reads its
/// timeline), and every invite has reached B.
async fn invited_once_each(alice: &common::User, newbie: &common::User, rooms: &[OwnedRoomId]) {
    for room in rooms {
        let timeline = alice.timeline(room).await;
        assert_eq!(common::memberships(&timeline, &newbie.id), ["invite"], "{room}: invited once");
    }
    eventually("every invite on B", || async {
        let invites = newbie.invites().await;
        rooms.iter().all(|r| invites.contains(r)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_reservation_waits_for_the_new_accounts_server_and_completes_when_it_is_back() {
    let started = Instant::now();
    // One room at a time on A, so the reservation is still going when B goes away.
    let mut fh = FederatedHarness::start_with_homeservers(
        |side, _, c| if side == Side::A { with_patience(with_concurrency(c, 1), "5m") } else { c },
        // lifted (a test about something else): 10 invites to newbie on B, paced one per 333 s
        // past the 5th at the default (see `invites_unlimited_on_b`).
        invites_unlimited_on_b,
    )
    .await;
    let (alice, dm, newbie, rooms) = reserving(&fh).await;
    fh.a.ask(&alice, &dm, &format!("export --to {}", newbie.id), "Reserving").await;
    eventually("the first seats reserved", || async {
        (count_membership(&alice, &rooms, &newbie.id, "invite").await > 0).then_some(())
    })
    .await;
    fh.b.sandbox.synapse.stop();
    let before = count_membership(&alice, &rooms, &newbie.id, "invite").await;
    println!("B stopped with {before} of {OUTAGE_ROOMS} seats reserved");
    assert!(before < OUTAGE_ROOMS, "B stopped mid-reservation, or the test proves nothing");
    // A keeps trying while B is away, and reports nothing as failed meanwhile.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let during = count_membership(&alice, &rooms, &newbie.id, "invite").await;
    assert!(during < OUTAGE_ROOMS, "{during} reserved with B away");
    let msgs = alice.messages_from(&dm, &fh.a.bot).await;
    assert!(!msgs.iter().any(|m| body(m).contains("reserved for")), "no report while B is away");

    let back = Instant::now();
    fh.b.sandbox.synapse.restart().await.expect("B restarts");
    let report = fh.a.bot_says_within(&alice, &dm, "reserved for", Duration::from_secs(180)).await;
    println!("reservation done {:.1?} after B was back", back.elapsed());
    assert!(report.starts_with(&format!("{OUTAGE_ROOMS} of {OUTAGE_ROOMS} rooms reserved")), "{report}");
    invited_once_each(&alice, &newbie, &rooms).await;
    println!("whole test: {:.1?}", started.elapsed());
}

/// B limits the invites one of its users receives as Synapse does by default (`rc_invites.per_user`:
/// a burst, then a steady rate, appservices not exempt), with numbers a test can wait for: 3 at
/// once, then one each 5 s (the default is 5, then one each 333 s).
const B_LIMITS_INVITES: &str = "rc_invites:\n  per_user: {per_second: 0.2, burst_count: 3}\n";

#[tokio::test]
async fn a_reservation_to_a_server_that_limits_invites_is_paced_told_and_completes() {
    let started = Instant::now();
    let fh = FederatedHarness::start_with_homeservers(
        |_, _, c| c,
        |side| if side == Side::B { B_LIMITS_INVITES.to_owned() } else { String::new() },
    )
    .await;
    let (alice, dm, newbie, rooms) = reserving(&fh).await;
    fh.a.ask(&alice, &dm, &format!("export --to {}", newbie.id), "Reserving").await;
    // The refusals are read as the limit they are: the old account is told, with the setting.
    let told = fh.a.bot_says_within(&alice, &dm, "limits the invites", Duration::from_secs(120)).await;
    println!("told {:.1?} after the start:\n{told}", started.elapsed());
    let name_b = fh.server_name(Side::B);
    assert!(told.starts_with(&format!("{name_b} limits the invites")), "{told}");
    assert!(told.contains("`rc_invites.per_user`"), "{told}");
    assert!(told.contains(&format!("of your {OUTAGE_ROOMS} rooms are reserved")), "{told}");
    // Paced rooms are not failed: every seat is reserved in the end, each invited once.
    let report = fh.a.bot_says_within(&alice, &dm, "reserved for", Duration::from_secs(300)).await;
    println!("reservation reported {:.1?} after the start:\n{report}", started.elapsed());
    assert!(report.starts_with(&format!("{OUTAGE_ROOMS} of {OUTAGE_ROOMS} rooms reserved")), "{report}");
    invited_once_each(&alice, &newbie, &rooms).await;
    println!("whole test: {:.1?}", started.elapsed());
}

/// B's limit on the invites one user receives, slow enough that its pauses outlast a minute
/// (the default is 5 at once, then one each 333 s): 3 at once, then one each 80 s.
const B_LIMITS_INVITES_SLOWLY: &str = "rc_invites:\n  per_user: {per_second: 0.0125, burst_count: 3}\n";

#[tokio::test]
async fn an_import_on_the_limiting_server_waits_for_the_paced_invites_and_says_so() {
    let started = Instant::now();
    let fh = FederatedHarness::start_with_homeservers(
        |_, _, c| c,
        |side| if side == Side::B { B_LIMITS_INVITES_SLOWLY.to_owned() } else { String::new() },
    )
    .await;
    let alice = fh.a.user("alice").await;
    let newbie = fh.b.user("newbie").await;
    let rooms = alice.create_rooms(4).await;
    let dm = fh.a.dm_with_bot(&alice).await;
    let (code, file) = export_file(&fh.a, &alice, &dm, &format!("--to {}", newbie.id)).await;
    // The new account imports at once, while A's reservation is paced by B's limit: the fourth
    // invite comes more than a minute after the first three.
    let new_dm = fh.b.dm_with_bot(&newbie).await;
    drop_file(&fh.b, &newbie, &new_dm, &file).await;
    fh.b.ask(&newbie, &new_dm, &format!("import {code}"), "The code opens the bundle file of").await;
    let told = fh.b.bot_says_within(&newbie, &new_dm, "waits for the invites of", Duration::from_secs(150)).await;
    println!("told {:.1?} after the start:\n{told}", started.elapsed());
    assert!(
        told.starts_with(&format!("3 of your 4 rooms are joined; 1 waits for the invites of {}", alice.id)),
        "{told}"
    );
    assert!(told.contains("`rc_invites.per_user`"), "{told}");
    let status = fh.b.ask(&newbie, &new_dm, "status", "Transfer").await;
    assert!(
        status.contains("waits for the invites of") || status.contains("4 moved"),
        "status says what the rooms wait for (or that they are all in): {status}"
    );
    // Waited for, not skipped after a minute: every room is moved.
    let report = fh.b.bot_says_within(&newbie, &new_dm, "rooms moved to", Duration::from_secs(300)).await;
    println!("import reported {:.1?} after the start:\n{report}", started.elapsed());
    assert!(report.starts_with("4 of 4 rooms moved"), "{report}");
    for room in &rooms {
        assert_eq!(membership(&newbie, room).await, "join", "{room}");
    }
    println!("whole test: {:.1?}", started.elapsed());
}

#[tokio::test]
async fn rooms_that_need_a_server_gone_too_long_are_reported_each_with_what_to_do() {
    let started = Instant::now();
    let mut fh =
        FederatedHarness::start_with(|side, _, c| if side == Side::A { with_patience(c, "3s") } else { c }, "").await;
    let (alice, dm, newbie, rooms) = reserving(&fh).await;
    // B is gone before the reservation starts, and stays gone.
    fh.b.sandbox.synapse.stop();
    let asked = Instant::now();
    fh.a.ask(&alice, &dm, &format!("export --to {}", newbie.id), "Reserving").await;
    let report = fh.a.bot_says_within(&alice, &dm, "reserved for", Duration::from_secs(120)).await;
    println!("reported {:.1?} after the export, B away all along:\n{report}", asked.elapsed());
    assert!(
        report.starts_with(&format!("0 of {OUTAGE_ROOMS} rooms reserved for {}, {OUTAGE_ROOMS} failed", newbie.id)),
        "{report}"
    );
    let name_b = fh.server_name(Side::B);
    let why = format!("{name_b} did not answer for");
    assert_eq!(report.matches(&why).count(), OUTAGE_ROOMS, "each room, with why: {report}");
    assert!(report.contains(&format!("once it is back, invite {} from your client", newbie.id)), "{report}");
    // Once the first room has waited out the patience, the others don't wait as long again.
    assert!(asked.elapsed() < Duration::from_secs(60), "{:.1?}", asked.elapsed());
    assert_eq!(count_membership(&alice, &rooms, &newbie.id, "invite").await, 0, "nothing half-done");
    // Nothing is watched: no seat waits.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let msgs = alice.messages_from(&dm, &fh.a.bot).await;
    assert!(!msgs.iter().any(|m| body(m).contains("is complete")), "no completion news");
    println!("whole test: {:.1?}", started.elapsed());
}

/// Rooms reserved while the import on B already runs.
const RACING_ROOMS: usize = 30;

#[tokio::test]
async fn an_import_started_while_the_seats_are_still_being_reserved_waits_for_them() {
    let started = Instant::now();
    // One room at a time on A, so B's import starts while A still sends the invites.
    let fh = FederatedHarness::start_with_homeservers(
        |side, _, c| if side == Side::A { with_concurrency(c, 1) } else { c },
        // lifted (a test about something else): 30 invites to newbie on B, paced one per 333 s
        // past the 5th at the default, while B's import waits a minute for each missing invite.
        invites_unlimited_on_b,
    )
    .await;
    let alice = fh.a.user("alice").await;
    let carol = fh.a.user("carol").await;
    let newbie = fh.b.user("newbie").await;
    let rooms = alice.create_rooms(RACING_ROOMS).await;
    // A room where only its moderators may invite: alice can't reserve a seat there, and the
    // bundle says so, so B does not wait for that invite.
    let mut req = create_room::v3::Request::new();
    req.name = Some("Moderators invite".into());
    req.preset = Some(create_room::v3::RoomPreset::PrivateChat);
    req.power_level_content_override = Some(common::raw(json!({"invite": 50})));
    let closed = carol.send(req).await.room_id;
    carol.invite(&closed, &alice.id).await;
    alice.join(&closed).await;
    println!("{RACING_ROOMS} rooms on A in {:.1?}", started.elapsed());

    let alice_dm = fh.a.dm_with_bot(&alice).await;
    let (code, file) = export_file(&fh.a, &alice, &alice_dm, &format!("--to {}", newbie.id)).await;
    let new_dm = fh.b.dm_with_bot(&newbie).await;
    drop_file(&fh.b, &newbie, &new_dm, &file).await;
    let invited_then = newbie.invites().await.len();
    fh.b.ask(&newbie, &new_dm, &format!("import {code}"), "The code opens the bundle file of").await;
    println!("import on B asked with {invited_then} of {RACING_ROOMS} invites there");
    assert!(invited_then < RACING_ROOMS, "the import raced the reservation, or the test proves nothing");

    let report = fh.b.bot_says_within(&newbie, &new_dm, "rooms moved to", Duration::from_secs(240)).await;
    println!("import on B done {:.1?} after the start", started.elapsed());
    let total = RACING_ROOMS + 1;
    assert!(
        report.starts_with(&format!("{RACING_ROOMS} of {total} rooms moved to {}, 1 skipped", newbie.id)),
        "{report}"
    );
    assert!(report.contains("Moderators invite: the old account may not invite there"), "{report}");
    for room in &rooms {
        let timeline = newbie.timeline(room).await;
        assert_eq!(common::memberships(&timeline, &newbie.id), ["invite", "join"], "{room}: joined once");
        assert_eq!(move_notices(&timeline).len(), 1, "{room}: one notice");
    }
    assert_eq!(membership(&newbie, &closed).await, "none");
    println!("whole test: {:.1?}", started.elapsed());
}

/// A 1×1 PNG.
fn hex_png() -> Vec<u8> {
    hex::decode(
        "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d49444154789c6360f8cfc0f01f0005\
         0001ff5ba8e6ea0000000049454e44ae426082",
    )
    .unwrap()
}

/// Where the new account's homeserver runs no handoff, the device side does the receiving side:
/// `handoff import FILE` with the code, logged in as the new account, joins the reserved rooms.
#[cfg(feature = "e2ee")]
#[tokio::test]
async fn the_device_side_receives_a_move_from_another_server() {
    let fh = FederatedHarness::start().await;
    let name_b = fh.server_name(Side::B);
    let alice = fh.a.user("alice").await;
    let bob = fh.b.user("bob").await;
    let favourite = room_of(&alice, "Favourite on A", false).await;
    alice.tag(&favourite, "m.favourite", Some(0.5)).await;
    let private = room_of(&bob, "Private on B", false).await;
    bob.invite(&private, &alice.id).await;
    alice.join_via(&private, &[&name_b]).await;

    let newdev = fh.b.user("newdev").await;
    let alice_dm = fh.a.dm_with_bot(&alice).await;
    let (code, file) = export_file(&fh.a, &alice, &alice_dm, &format!("--to {}", newdev.id)).await;
    let reserved =
        fh.a.bot_says(&alice, &alice_dm, 0, "the reservation's report", |b| b.contains("reserved for")).await;
    assert!(reserved.starts_with("2 of 2 rooms reserved"), "{reserved}");
    eventually("the reservations on B", || async {
        let invites = newdev.invites().await;
        [&favourite, &private].iter().all(|r| invites.contains(r)).then_some(())
    })
    .await;

    let work = tempfile::tempdir().unwrap();
    let (bundle, code_file) = (work.path().join("alice.age"), work.path().join("code"));
    std::fs::write(&bundle, &file).unwrap();
    std::fs::write(&code_file, &code).unwrap();
    let data = work.path().join("data");
    let url = fh.b.synapse().url.clone();
    // From here the device side acts as newdev, with its own token: under B's defaults.
    newdev.under_defaults().await;
    let (status, _, err) = common::device_cli(
        &data,
        &["login", newdev.id.as_str(), "--homeserver", url.as_str(), "--password-stdin"],
        "password\n",
    );
    assert!(status.success(), "{err}");
    let (status, out, err) = common::device_cli(
        &data,
        &["import", bundle.to_str().unwrap(), "--passphrase-file", code_file.to_str().unwrap()],
        "",
    );
    assert!(status.success(), "{out}{err}");
    assert!(out.contains("2 of 2 room(s) moved"), "{out}");
    for room in [&favourite, &private] {
        assert_eq!(membership(&newdev, room).await, "join", "{room}");
        assert_eq!(move_notices(&newdev.timeline(room).await).len(), 1, "{room}: one notice");
    }
    assert!(newdev.tags(&favourite).await.contains_key(&TagName::Favorite));
}
