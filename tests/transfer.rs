//! Transfers against a real Synapse: codes and consent, crash (SIGKILL) and homeserver outages in
//! the middle of a transfer, and that nothing is ever done twice.

mod common;

use std::time::Duration;

use common::{Harness, User, body, dm_from_bot, edit, eventually, export, move_notices, with_concurrency};
use ruma::{OwnedRoomId, RoomId, UserId};

/// The membership of each `m.room.member` event of `user` in `room`, in order ("invite", "join",
/// …), as they are: a repeated invite or join shows, and so would a profile change after the join
/// (the profile is set before the rooms, so none is expected).
async fn memberships(reader: &User, room: &RoomId, user: &UserId) -> Vec<String> {
    common::memberships(&reader.timeline(room).await, user)
}

/// Asserts each room holds exactly one invite then one join of `new` (no other member event of
/// it), and exactly one move notice.
async fn assert_moved_once(old: &User, new: &User, rooms: &[OwnedRoomId]) {
    for room in rooms {
        let m = memberships(old, room, &new.id).await;
        assert_eq!(m, ["invite", "join"], "{room}: {m:?}");
        assert_eq!(move_notices(&old.timeline(room).await).len(), 1, "{room}: move notices");
    }
}

#[tokio::test]
async fn bound_code_moves_rooms_and_cannot_be_used_twice() {
    let h = Harness::start().await;
    let (alice, bob, carol) = (h.user("alice").await, h.user("bob").await, h.user("carol").await);
    let rooms = alice.create_rooms(4).await;
    let (adm, bdm, cdm) = (h.dm_with_bot(&alice).await, h.dm_with_bot(&bob).await, h.dm_with_bot(&carol).await);
    let code = export(&h, &alice, &adm, "--to @bob:localhost").await;

    // Bound to bob: carol is told there is no such code (nothing reveals that it exists).
    let refused = h.ask(&carol, &cdm, &format!("import {code}"), "no such transfer code").await;
    assert!(!refused.contains("alice"), "{refused}");

    // A dry run shows the plan and changes nothing; the code stays good.
    let plan = h.ask(&bob, &bdm, &format!("import {} --dry-run", code.to_lowercase()), "Dry run").await;
    assert!(plan.contains("4 to join"), "{plan}");
    assert!(memberships(&alice, &rooms[0], &bob.id).await.is_empty(), "dry run changed nothing");

    let report = h.ask(&bob, &bdm, &format!("import {code}"), "rooms moved to @bob:localhost").await;
    assert!(report.starts_with("4 of 4 rooms moved"), "{report}");
    assert_moved_once(&alice, &bob, &rooms).await;
    let timeline = alice.timeline(&rooms[0]).await;
    let notice = move_notices(&timeline)[0];
    assert_eq!(notice["sender"], "@alice:localhost");
    assert_eq!(notice["content"]["msgtype"], "m.notice");
    assert_eq!(notice["content"]["org.handoff.move"]["from"], "@alice:localhost");
    assert_eq!(notice["content"]["org.handoff.move"]["to"], "@bob:localhost");
    assert_eq!(notice["content"]["org.handoff.move"]["profile"], "desktop");

    // One status message, edited as the rooms went: its last edits count the four rooms and say done.
    let edits: Vec<String> = bob
        .timeline(&bdm)
        .await
        .iter()
        .filter(|e| e["sender"] == h.bot.as_str() && e["content"]["m.relates_to"]["rel_type"] == "m.replace")
        .map(|e| e["content"]["m.new_content"]["body"].as_str().unwrap_or("").to_owned())
        .collect();
    assert!(edits.iter().any(|e| e.contains("4 joined, 4 of 4 finished")), "{edits:?}");
    assert!(edits.last().is_some_and(|e| e.starts_with("Done: 4 of 4 rooms moved")), "{edits:?}");

    // Neither the code nor a token reaches the log.
    assert!(!h.log().contains(&code), "the transfer code leaked into the log");

    // The same code a second time: refused.
    let again = h.ask(&bob, &bdm, &format!("import {code}"), "already used").await;
    assert!(again.contains("export"), "{again}");
    // `status` on either side tells the outcome.
    let status = h.ask(&alice, &adm, "status", "Transfer").await;
    assert!(status.contains("done") && status.contains("4 moved"), "{status}");
}

#[tokio::test]
async fn unbound_code_waits_for_approval_and_deny_changes_nothing() {
    let h = Harness::start().await;
    let (alice, bob) = (h.user("alice").await, h.user("bob").await);
    let rooms = alice.create_rooms(2).await;
    let (adm, bdm) = (h.dm_with_bot(&alice).await, h.dm_with_bot(&bob).await);

    let code = export(&h, &alice, &adm, "").await;
    h.ask(&bob, &bdm, &format!("import {code} --profile mobile"), "has been asked to approve").await;
    let prompt = h.bot_says(&alice, &adm, 0, "the approval prompt", |b| b.contains("wants to import")).await;
    assert!(prompt.contains("@bob:localhost") && prompt.contains("mobile"), "{prompt}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(memberships(&alice, &rooms[0], &bob.id).await.is_empty(), "nothing before approval");
    h.ask(&alice, &adm, "deny @bob:localhost", "Refused").await;
    h.bot_says(&bob, &bdm, 0, "bob to hear of the refusal", |b| b.contains("refused the import")).await;
    assert!(memberships(&alice, &rooms[0], &bob.id).await.is_empty());

    // Two fresh codes, imported by bob and by carol: a bare `approve` resolves neither, it names
    // them; `approve @bob` lets only bob's go ahead.
    let carol = h.user("carol").await;
    let cdm = h.dm_with_bot(&carol).await;
    let code = export(&h, &alice, &adm, "").await;
    h.ask(&bob, &bdm, &format!("import {code} --profile mobile"), "asked to approve").await;
    let code = export(&h, &alice, &adm, "").await;
    h.ask(&carol, &cdm, &format!("import {code}"), "asked to approve").await;
    eventually("the two new prompts", || async {
        (alice.messages_from(&adm, &h.bot).await.iter().filter(|m| body(m).contains("wants to import")).count() == 3)
            .then_some(())
    })
    .await;
    let listed = h.ask(&alice, &adm, "approve", "Name the account").await;
    assert!(listed.contains("@bob:localhost") && listed.contains("@carol:localhost"), "{listed}");
    assert!(memberships(&alice, &rooms[0], &bob.id).await.is_empty(), "a bare approve started nothing");
    h.ask(&alice, &adm, "approve @bob:localhost", "Approved").await;
    let digest = eventually("the report", || async {
        bob.messages_from(&bdm, &h.bot).await.into_iter().find(|m| body(m).starts_with("2 of 2 rooms moved"))
    })
    .await;
    assert!(digest["content"]["formatted_body"].is_null(), "mobile gets plain text: {digest}");
    assert_moved_once(&alice, &bob, &rooms).await;
    assert!(memberships(&alice, &rooms[0], &carol.id).await.is_empty(), "carol's import still waits");
    let status = h.ask(&carol, &cdm, "status", "Transfer").await;
    assert!(status.contains("waiting for the old account to approve"), "{status}");
}

#[tokio::test]
async fn wrong_codes_are_rate_limited_and_malformed_ones_explained() {
    let h = Harness::start().await;
    let bob = h.user("bob").await;
    let bdm = h.dm_with_bot(&bob).await;
    let malformed = h.ask(&bob, &bdm, "import ABCD-EFGH", "has 28 letters").await;
    assert!(malformed.contains("Usage"), "{malformed}");
    for _ in 0..5 {
        h.ask(&bob, &bdm, "import AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAAA", "no such transfer code").await;
    }
    h.ask(&bob, &bdm, "import AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAAB", "Too many wrong codes").await;
}

/// Waits until `new` has joined at least `n` of `rooms`.
async fn joined_at_least(old: &User, new: &User, rooms: &[OwnedRoomId], n: usize) {
    eventually(&format!("{n} rooms joined"), || async {
        let mut joined = 0;
        for r in rooms {
            if memberships(old, r, &new.id).await.last().map(String::as_str) == Some("join") {
                joined += 1;
            }
        }
        (joined >= n).then_some(())
    })
    .await;
}

/// A transfer of `n` rooms from alice to bob that has just been started, one room at a time, so a
/// test can interrupt it midway.
struct Interruptible {
    h: Harness,
    alice: User,
    bob: User,
    rooms: Vec<OwnedRoomId>,
    adm: OwnedRoomId,
    bdm: OwnedRoomId,
}

async fn interruptible_transfer(n: usize) -> Interruptible {
    let h = Harness::start_with(|c| with_concurrency(c, 1)).await;
    let (alice, bob) = (h.user("alice").await, h.user("bob").await);
    let rooms = alice.create_rooms(n).await;
    let (adm, bdm) = (h.dm_with_bot(&alice).await, h.dm_with_bot(&bob).await);
    let code = export(&h, &alice, &adm, "--to @bob:localhost").await;
    bob.send_text(&bdm, &format!("import {code}")).await;
    Interruptible { h, alice, bob, rooms, adm, bdm }
}

#[tokio::test]
async fn sigkill_and_sigterm_mid_transfer_resume_without_doing_anything_twice() {
    // One room at a time, so the kills land mid-transfer.
    let Interruptible { mut h, alice, bob, rooms, bdm, .. } = interruptible_transfer(40).await;

    // Twice while the rooms are joined (pass 1: a SIGKILL, then a SIGTERM), once while they are
    // announced (pass 2).
    joined_at_least(&alice, &bob, &rooms, 3).await;
    assert!(!h.signal_handoff("KILL").success());
    h.start_handoff().await;
    joined_at_least(&alice, &bob, &rooms, 10).await;
    assert!(h.signal_handoff("TERM").success(), "a SIGTERM mid-transfer is a clean exit");
    // The log says what the stop interrupted, and does not claim a clean stop.
    let log = h.log();
    let stop = log.lines().rev().find(|l| l.contains("the store is flushed")).expect("the stop is logged");
    assert!(stop.contains("what was interrupted resumes at the next start"), "{stop}");
    assert!(stop.contains("transfers_interrupted=1"), "{stop}");
    h.start_handoff().await;
    // As soon as the engine logs that every room is joined: pass 2 has begun.
    eventually("pass 1 to end", || async { h.log().contains("rooms joined").then_some(()) }).await;
    assert!(!h.signal_handoff("KILL").success());
    assert!(!h.log().contains("rooms done"), "the kill landed before the rooms were finished");
    h.start_handoff().await;
    let report = h.bot_says(&bob, &bdm, 0, "the report after restarts", |b| b.contains("rooms moved to")).await;
    assert!(report.starts_with("40 of 40 rooms moved"), "{report}");
    assert_eq!(h.log().matches("resuming transfer").count(), 3, "every stop landed mid-transfer");
    assert_moved_once(&alice, &bob, &rooms).await;
    let reports = bob.messages_from(&bdm, &h.bot).await.iter().filter(|m| body(m).contains("rooms moved to")).count();
    assert_eq!(reports, 1, "one report");
}

#[tokio::test]
async fn admins_see_and_cancel_any_transfer_and_users_only_their_own() {
    let h = Harness::start_with(|c| {
        let domain = "        \"localhost\": user\n";
        edit(with_concurrency(c, 1), domain, &format!("{domain}        \"@carol:localhost\": admin\n"))
    })
    .await;
    let (alice, bob, carol, mallory) =
        (h.user("alice").await, h.user("bob").await, h.user("carol").await, h.user("mallory").await);
    let rooms = alice.create_rooms(30).await;
    let (adm, bdm) = (h.dm_with_bot(&alice).await, h.dm_with_bot(&bob).await);
    let (cdm, mdm) = (h.dm_with_bot(&carol).await, h.dm_with_bot(&mallory).await);
    let code = export(&h, &alice, &adm, "--to @bob:localhost").await;
    bob.send_text(&bdm, &format!("import {code}")).await;
    joined_at_least(&alice, &bob, &rooms, 2).await;

    // A user can't look into or stop someone else's transfer.
    h.ask(&mallory, &mdm, "status @bob:localhost", "Only a handoff admin").await;
    h.ask(&mallory, &mdm, "cancel @bob:localhost", "Only a handoff admin").await;
    // An admin can.
    let status = h.ask(&carol, &cdm, "status @bob:localhost", "Transfer").await;
    assert!(status.contains("@alice:localhost → @bob:localhost: running"), "{status}");
    h.ask(&carol, &cdm, "cancel @bob:localhost", "Stopping after the rooms in flight").await;
    let report = h.bot_says(&bob, &bdm, 0, "the cancelled report", |b| b.starts_with("Cancelled.")).await;
    assert!(!report.starts_with("Cancelled. 30 of 30"), "the admin's cancel stopped it mid-way: {report}");
    assert!(h.log().contains("an admin cancelled a transfer"));
}

#[tokio::test]
async fn homeserver_outage_mid_transfer_is_waited_out() {
    let Interruptible { mut h, alice, bob, rooms, bdm, .. } = interruptible_transfer(30).await;
    joined_at_least(&alice, &bob, &rooms, 4).await;

    h.sandbox.synapse.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    h.sandbox.synapse.restart().await.unwrap();

    let report = h.bot_says(&bob, &bdm, 0, "the report after the outage", |b| b.contains("rooms moved to")).await;
    assert!(report.starts_with("30 of 30 rooms moved"), "{report}");
    // A request of the transfer met the homeserver gone, and was tried again (the retry helper's
    // line: "transient homeserver error, retrying error=cannot reach the homeserver: …").
    let waited = h
        .log()
        .lines()
        .any(|l| l.contains("transient homeserver error, retrying") && l.contains("cannot reach the homeserver"));
    assert!(waited, "the outage landed mid-transfer");
    assert_moved_once(&alice, &bob, &rooms).await;
}

#[tokio::test]
async fn auto_export_offers_the_move_and_starts_only_on_accept() {
    let h = Harness::start().await;
    let alice = h.user("alice").await;
    let rooms = alice.create_rooms(3).await;
    let adm = h.dm_with_bot(&alice).await;
    let answer = h.ask(&alice, &adm, "export --to @newbie:localhost --auto", "Your transfer code").await;
    assert!(answer.contains("whether to accept"), "{answer}");
    // The new account is created (and signs in) only now: it is offered the move, nothing more.
    let newbie = h.user("newbie").await;
    let ndm = dm_from_bot(&newbie).await;
    let offer = h.bot_says(&newbie, &ndm, 0, "the offer", |b| b.contains("reply `accept`")).await;
    assert!(offer.contains("@alice:localhost wants to move their rooms and settings here"), "{offer}");
    tokio::time::sleep(Duration::from_secs(6)).await; // a watch round or more
    for room in &rooms {
        assert!(memberships(&alice, room, &newbie.id).await.is_empty(), "nothing before accept");
    }
    h.ask(&newbie, &ndm, "accept", "Accepted").await;
    joined_at_least(&alice, &newbie, &rooms, 3).await;
    let status = eventually("the accepted transfer to finish", || async {
        let s = h.ask(&alice, &adm, "status", "Transfer").await;
        s.contains("done").then_some(s)
    })
    .await;
    assert!(status.contains("3 moved"), "{status}");
    assert_moved_once(&alice, &newbie, &rooms).await;
    h.bot_says(&alice, &adm, 0, "alice to hear of the accept", |b| b.contains("accepted your move")).await;
}

#[tokio::test]
async fn cancel_stops_after_the_rooms_in_flight_and_keeps_what_is_done() {
    let Interruptible { h, alice, bob, rooms, adm, bdm } = interruptible_transfer(30).await;
    joined_at_least(&alice, &bob, &rooms, 2).await;
    h.ask(&bob, &bdm, "cancel", "Stopping after the rooms in flight").await;
    let report = h.bot_says(&bob, &bdm, 0, "the cancelled report", |b| b.starts_with("Cancelled.")).await;
    let mut joined = 0;
    for r in &rooms {
        let m = memberships(&alice, r, &bob.id).await;
        if m.last().map(String::as_str) == Some("join") {
            joined += 1;
            assert_eq!(move_notices(&alice.timeline(r).await).len(), 1, "a moved room has its notice");
        } else {
            assert!(m.is_empty(), "{r}: nothing started after the cancel: {m:?}");
        }
    }
    assert!(joined >= 2 && joined < rooms.len(), "{joined} rooms moved before the cancel");
    assert!(report.contains(&format!("{joined} of {} rooms moved", rooms.len())), "{report}");
    let status = h.ask(&alice, &adm, "status", "Transfer").await;
    assert!(status.contains("cancelled"), "{status}");
}

/// `config` with `handoff.max_transfers` (the example's default) set to `n`.
fn with_max_transfers(config: String, n: usize) -> String {
    let default = handoff::config::HandoffConfig::default().max_transfers.0;
    edit(config, &format!("max_transfers: {default}"), &format!("max_transfers: {n}"))
}

/// The homeserver's timestamp of the first bot message in `dm` whose text satisfies `matches`.
async fn stamp_of(h: &Harness, user: &User, dm: &RoomId, matches: impl Fn(&str) -> bool) -> u64 {
    let msgs = user.messages_from(dm, &h.bot).await;
    let m = msgs.iter().find(|m| matches(body(m))).expect("the message");
    m["origin_server_ts"].as_u64().unwrap()
}

/// Five users press `import` at once on a service that runs two transfers at a time: two start,
/// three wait and are each told their place; the last in line sees it in `status`, cancels, and
/// nothing is written into its account; the others start only as places free up, and every room
/// of every one of the four moves is joined and announced once.
#[tokio::test]
async fn many_users_at_once_wait_their_turn_told_their_place_and_all_move_once() {
    let h = Harness::start_with(|c| with_concurrency(with_max_transfers(c, 2), 4)).await;
    const USERS: usize = 5;
    let mut movers = Vec::new();
    for i in 0..USERS {
        let old = h.user(&format!("old{i}")).await;
        let rooms = old.create_rooms(6).await;
        old.tag(&rooms[3], "m.favourite", Some(0.5)).await;
        let odm = h.dm_with_bot(&old).await;
        let new = h.user(&format!("new{i}")).await;
        let code = export(&h, &old, &odm, &format!("--to {}", new.id)).await;
        let ndm = h.dm_with_bot(&new).await;
        movers.push((old, rooms, new, ndm, code));
    }
    futures_util::future::join_all(
        movers.iter().map(|(_, _, new, ndm, code)| async move { new.send_text(ndm, &format!("import {code}")).await }),
    )
    .await;

    // Every import gets an answer; three of them, a place in line.
    let waits: Vec<Option<String>> = futures_util::future::join_all(movers.iter().map(|(_, _, new, ndm, _)| async {
        let first = h
            .bot_says(new, ndm, 1, "the answer to import", |b| {
                (b.starts_with("Moving") && b.contains(" to @"))
                    || b.contains("ahead of yours")
                    || b.contains("yours is next")
            })
            .await;
        // The status message of a transfer that started, or its place in line.
        (!first.starts_with("Moving")).then_some(first)
    }))
    .await;
    let mut places: Vec<&str> = waits
        .iter()
        .flatten()
        .map(|w| {
            assert!(w.contains("2 moves are running") && w.contains("starts by itself"), "{w}");
            if w.contains("yours is next") {
                "next"
            } else if w.contains("1 move is ahead") {
                "1 ahead"
            } else if w.contains("2 moves are ahead") {
                "2 ahead"
            } else {
                panic!("{w}")
            }
        })
        .collect();
    places.sort();
    assert_eq!(places, ["1 ahead", "2 ahead", "next"], "{waits:?}");
    // Their import's answer said so too.
    for (i, (_, _, new, ndm, _)) in movers.iter().enumerate() {
        let said = new.messages_from(ndm, &h.bot).await.iter().any(|m| body(m).contains("waits for its turn"));
        assert_eq!(said, waits[i].is_some(), "{}: the import's answer", new.id);
    }

    // The last in line sees its place, then leaves the line: nothing is written into its account.
    let last = waits.iter().position(|w| w.as_deref().is_some_and(|w| w.contains("2 moves are ahead"))).unwrap();
    let (lold, lrooms, lnew, ldm, _) = &movers[last];
    let status = h.ask(lnew, ldm, "status", "Transfer").await;
    assert!(status.contains("waiting for its turn"), "{status}");
    h.ask(lnew, ldm, "cancel", "Cancelled before its turn came").await;
    h.bot_says(lnew, ldm, 0, "the note of the cancel", |b| b.contains("cancelled while it waited")).await;

    // The four others all finish, each room moved once.
    for (i, (old, rooms, new, ndm, _)) in movers.iter().enumerate() {
        if i == last {
            continue;
        }
        let report = h.bot_says(new, ndm, 0, "the report", |b| b.contains("rooms moved to")).await;
        assert!(report.starts_with("6 of 6 rooms moved"), "{report}");
        assert_moved_once(old, new, rooms).await;
    }
    for room in lrooms {
        assert!(memberships(lold, room, &lnew.id).await.is_empty(), "{room}: the cancelled one changed nothing");
    }
    // Those who waited started only once a running one had ended (its report posted).
    let mut reports = Vec::new();
    let mut first_joins = Vec::new();
    for (i, (old, rooms, new, ndm, _)) in movers.iter().enumerate() {
        if i == last {
            continue;
        }
        let report = stamp_of(&h, new, ndm, |b| b.contains("rooms moved to")).await;
        let mut joins = Vec::new();
        for room in rooms {
            joins.push(common::join_stamp(&old.timeline(room).await, &new.id).unwrap());
        }
        let first = *joins.iter().min().unwrap();
        if waits[i].is_some() {
            first_joins.push(first);
        } else {
            reports.push(report);
        }
    }
    let first_end = *reports.iter().min().unwrap();
    for first in first_joins {
        assert!(
            first >= first_end,
            "a waiting transfer joined a room at {first}, before any place was free ({first_end})"
        );
    }
    assert!(!h.log().contains("panicked"), "{}", h.log());
}

/// A room the new account is in already is neither invited to nor joined again: a join there
/// would put the account's global name back over the one it set for that room.
#[tokio::test]
async fn a_room_the_new_account_is_in_keeps_the_name_it_has_there() {
    use ruma::api::client::state::{get_state_event_for_key, send_state_event};
    use ruma::events::StateEventType;
    use ruma::profile::ProfileFieldValue;
    let h = Harness::start().await;
    let (alice, bob) = (h.user("alice").await, h.user("bob").await);
    // A name of bob's own (the move keeps it), and another for the room he shares with alice.
    let name = ProfileFieldValue::DisplayName("Bob B.".into());
    bob.send(ruma::api::client::profile::set_profile_field::v3::Request::new(bob.id.clone(), name)).await;
    let rooms = alice.create_rooms(2).await;
    alice.invite(&rooms[0], &bob.id).await;
    bob.join(&rooms[0]).await;
    let own = serde_json::json!({"membership": "join", "displayname": "Bob, in this room"});
    let req = send_state_event::v3::Request::new_raw(
        rooms[0].clone(),
        "m.room.member".into(),
        bob.id.to_string(),
        common::raw(own),
    );
    bob.send(req).await;
    let (adm, bdm) = (h.dm_with_bot(&alice).await, h.dm_with_bot(&bob).await);
    let code = export(&h, &alice, &adm, "--to @bob:localhost").await;
    let report = h.ask(&bob, &bdm, &format!("import {code}"), "rooms moved to @bob:localhost").await;
    assert!(report.starts_with("2 of 2 rooms moved"), "{report}");

    let req =
        get_state_event_for_key::v3::Request::new(rooms[0].clone(), StateEventType::RoomMember, bob.id.to_string());
    let member: serde_json::Value = serde_json::from_str(alice.send(req).await.event_or_content.get()).unwrap();
    assert_eq!(member["displayname"], "Bob, in this room", "{member}");
    let m = memberships(&alice, &rooms[0], &bob.id).await;
    assert_eq!(m, ["invite", "join", "join"], "the invite, the join, the name: nothing of the move");
    // The other room moved as any: invited, joined, announced once.
    assert_moved_once(&alice, &bob, &rooms[1..]).await;
    assert_eq!(move_notices(&alice.timeline(&rooms[0]).await).len(), 1, "announced in the shared room too");
}
