//! A move to an account on another homeserver, end to end on two federating Synapses: the old
//! account on A exports with `--to @new:B --file` (A's handoff reserves the seats at once), the new
//! account drops the file into its DM with B's bot and sends `import CODE` there.

mod common;

use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt};

use common::federation::{FederatedHarness, drop_file};
use common::{User, body, eventually, eventually_within, export_file, move_notices, with_concurrency};
use handoff::sandbox::Side;
use ruma::api::client::membership::joined_rooms;
use ruma::api::client::room::{Visibility, create_room};
use ruma::api::client::state::get_state_event_for_key;
use ruma::events::StateEventType;
use ruma::events::tag::TagName;
use ruma::{OwnedRoomId, RoomId};
use serde_json::{Value, json};

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
    let fh = FederatedHarness::start().await;
    let name_b = fh.server_name(Side::B);
    println!("both homeservers and handoffs up in {:.1?}", started.elapsed());

    // The old account on A: a DM and a favourite hosted on A, a public and a private room on B.
    let alice = fh.a.user("alice").await;
    let carol = fh.a.user("carol").await;
    let bob = fh.b.user("bob").await;
    let dm = alice.dms_with(&[&carol]).await.remove(0);
    let favourite = room_of(&alice, "Favourite on A", false).await;
    alice.tag(&favourite, "m.favourite", Some(0.5)).await;
    let public = room_of(&bob, "Public on B", true).await;
    alice.join_via(&public, &[&name_b]).await;
    let private = room_of(&bob, "Private on B", false).await;
    bob.invite(&private, &alice.id).await;
    alice.join_via(&private, &[&name_b]).await;
    let rooms = [dm.clone(), favourite.clone(), public.clone(), private.clone()];
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
    assert!(reserved.starts_with(&format!("4 of 6 rooms reserved for {}", newbie.id)), "{reserved}");
    println!("seats reserved {:.1?} after the export", exported.elapsed());
    let invited = [dm.clone(), favourite.clone(), private.clone()];
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
    assert!(report.starts_with(&format!("4 of 6 rooms moved to {}", newbie.id)), "{report}");
    assert!(report.contains("✓ direct"), "{report}");
    for room in &rooms {
        assert_eq!(membership(&newbie, room).await, "join", "{room}");
        let timeline = newbie.timeline(room).await;
        let notices = move_notices(&timeline);
        assert_eq!(notices.len(), 1, "{room}: one move notice: {notices:#?}");
        assert_eq!(notices[0]["sender"], newbie.id.as_str(), "posted by the new account");
        assert_eq!(notices[0]["content"]["org.handoff.move"]["from"], alice.id.as_str());
        assert!(body(notices[0]).contains(alice.id.as_str()), "{}", body(notices[0]));
    }
    assert!(newbie.tags(&favourite).await.contains_key(&TagName::Favorite));
    assert_eq!(newbie.account_data("m.direct").await, Some(json!({ carol.id.as_str(): [dm] })));
    // The avatar is a copy on B, with the same bytes.
    let profile = newbie.send(ruma::api::client::profile::get_profile::v3::Request::new(newbie.id.clone())).await;
    let copied: ruma::OwnedMxcUri = serde_json::from_value(profile.get("avatar_url").cloned().unwrap()).unwrap();
    assert_eq!(copied.server_name().unwrap().as_str(), name_b.as_str(), "{copied} is not on B");
    let req = ruma::api::client::authenticated_media::get_content::v1::Request::from_uri(&copied).unwrap();
    assert_eq!(newbie.send(req).await.file, png, "the copy holds the avatar's bytes");
    // The old account sees the new one in the rooms it hosts.
    assert_eq!(alice.membership_of(&favourite, &newbie.id).await["membership"], "join");

    // The code works once.
    let again = fh.b.ask(&newbie, &new_dm, &format!("import {code}"), "already used").await;
    assert!(again.contains("ask for a new one"), "{again}");
    assert_eq!(move_notices(&newbie.timeline(&favourite).await).len(), 1, "still one notice");
    println!("whole test: {:.1?}", started.elapsed());
}

/// Rooms of the move that B's handoff is stopped in the middle of.
const ROOMS: usize = 24;

#[tokio::test]
async fn a_received_move_stopped_midway_completes_when_the_service_is_back() {
    let started = Instant::now();
    // One room at a time on B, so the move is still going when its handoff is killed.
    let mut fh =
        FederatedHarness::start_with(|side, _, c| if side == Side::B { with_concurrency(c, 1) } else { c }, "").await;
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
    let report = eventually_within("the report after the restart", Duration::from_secs(120), || async {
        let msgs = newbie.messages_from(&new_dm, &fh.b.bot).await;
        msgs.iter().map(|m| body(m).to_owned()).find(|b| b.contains("rooms moved to"))
    })
    .await;
    println!("the move completed {:.1?} after the restart", restarted.elapsed());
    assert!(report.starts_with(&format!("{ROOMS} of {ROOMS} rooms moved to {}", newbie.id)), "{report}");
    for room in &rooms {
        let timeline = newbie.timeline(room).await;
        assert_eq!(move_notices(&timeline).len(), 1, "{room}: one notice across the restart");
        assert_eq!(common::memberships(&timeline, &newbie.id), ["invite", "join"], "{room}: joined once");
    }
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
