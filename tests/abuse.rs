//! A hostile local user against the running service on a real Synapse: forced moves, floods,
//! wrong codes, crafted files, commands in the wrong place, and requests that never authenticated.
//! Each is refused; another user is still answered; nothing stored is lost or changed.

mod common;

use std::time::{Duration, Instant};

use common::{Harness, User, dm_from_bot, eventually, export, refusing, text_event, with_concurrency};
use ruma::events::room::MediaSource;
use ruma::{RoomId, UserId};
use serde_json::{Value, json};

/// A config where mallory is a local user the admin has refused.
fn with_mallory_refused(config: String) -> String {
    refusing(config, "@mallory:localhost")
}

/// The membership changes of `user` in `room` as `reader` sees them.
async fn memberships(reader: &User, room: &RoomId, user: &UserId) -> Vec<String> {
    common::memberships(&reader.timeline(room).await, user)
}

async fn displayname(user: &User) -> Option<String> {
    let req = ruma::api::client::profile::get_profile::v3::Request::new(user.id.clone());
    user.send(req).await.get("displayname").and_then(Value::as_str).map(str::to_owned)
}

#[tokio::test]
async fn a_forced_move_is_only_an_offer_and_nothing_is_written_before_accept() {
    let h = Harness::start_with(with_mallory_refused).await;
    let (alice, bob, eve) = (h.user("alice").await, h.user("bob").await, h.user("eve").await);
    let room = alice.create_room("alice's room").await;
    // Things of alice's that a forced move would write into bob: a display name, an ignored user.
    let set = ruma::api::client::profile::set_profile_field::v3::Request::new(
        alice.id.clone(),
        ruma::profile::ProfileFieldValue::DisplayName("Alice Forced".into()),
    );
    alice.send(set).await;
    alice.set_account_data("m.ignored_user_list", json!({"ignored_users": {"@spam:localhost": {}}})).await;
    let bob_name = displayname(&bob).await;
    let bob_ignored = bob.account_data("m.ignored_user_list").await;
    let adm = h.dm_with_bot(&alice).await;

    // Refused outright: a move into the sender itself, and into an account the admin refused.
    h.ask(&alice, &adm, "export --to @alice:localhost --auto", "can't be this same account").await;
    h.ask(&alice, &adm, "export --to @mallory:localhost --auto", "may not use handoff on this server").await;

    // bob exists and has signed in: the "move" starts as an offer in bob's DM, nothing more.
    let code = export(&h, &alice, &adm, "--to @bob:localhost --auto").await;
    let bdm = dm_from_bot(&bob).await;
    let offer = h.bot_says(&bob, &bdm, 0, "the offer", |b| b.contains("reply `accept`")).await;
    assert!(offer.contains("Nothing changes in this account unless you accept"), "{offer}");

    // Someone else's offer can't replace alice's.
    let edm = h.dm_with_bot(&eve).await;
    h.ask(&eve, &edm, "export --to @bob:localhost --auto", "already offered @bob:localhost a move").await;

    // Several watch rounds later, still nothing was written into bob.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(memberships(&alice, &room, &bob.id).await.is_empty(), "bob was not invited or joined");
    assert_eq!(displayname(&bob).await, bob_name, "bob's display name unchanged");
    assert_eq!(bob.account_data("m.ignored_user_list").await, bob_ignored, "bob's ignored users unchanged");

    // bob declines: alice is told, and her code is dead even for bob.
    h.ask(&bob, &bdm, "decline", "Declined").await;
    h.bot_says(&alice, &adm, 0, "alice to hear of the decline", |b| b.contains("declined your move")).await;
    h.ask(&bob, &bdm, &format!("import {code}"), "no such transfer code").await;
    assert!(memberships(&alice, &room, &bob.id).await.is_empty());
    h.ask(&bob, &bdm, "accept", "No move is waiting").await;
}

#[tokio::test]
async fn floods_wrong_codes_and_crafted_files_never_stall_the_bot_for_anyone_else() {
    let h = Harness::start().await;
    let (alice, bob, mallory) = (h.user("alice").await, h.user("bob").await, h.user("mallory").await);
    let rooms = vec![alice.create_room("one").await, alice.create_room("two").await];
    let (adm, bdm, mdm) = (h.dm_with_bot(&alice).await, h.dm_with_bot(&bob).await, h.dm_with_bot(&mallory).await);
    // A code made before the abuse: it must still work after it.
    let code = export(&h, &alice, &adm, "--to @bob:localhost").await;

    // Commands that show codes or change accounts don't run in a group room.
    let group = alice.create_room("team").await;
    alice.invite(&group, &h.bot).await;
    alice.wait_for_messages(&group, &h.bot, 1).await;
    let before = alice.messages_from(&group, &h.bot).await.len();
    alice.send_text(&group, "!handoff export").await;
    let refused = h.bot_says(&alice, &group, before, "the refusal", |b| b.contains("only works in your DM")).await;
    assert!(!refused.contains("transfer code"), "{refused}");

    // A key-export file whose trailer also comes before its header: answered, not a crash.
    let crafted = "-----END MEGOLM SESSION DATA-----\n-----BEGIN MEGOLM SESSION DATA-----\nAXNhbHRzYWx0c2FsdHNhbHSIiIiIiIiIiIiIiIiIiIiIAAAACmIRUW2OjZ3L2l6j9h0lHlV3M2dx\ncissyYBxjsfsAndErh065A8=\n-----END MEGOLM SESSION DATA-----\n";
    let uri = mallory.upload("keys.txt", crafted.as_bytes().to_vec()).await;
    let before = mallory.messages_from(&mdm, &h.bot).await.len();
    mallory.send_file(&mdm, "keys.txt", MediaSource::Plain(uri)).await;
    // The next message is the answer (whatever it says, so a wrong one fails here, not by timing out).
    let file_reply = h.bot_says(&mallory, &mdm, before, "the answer to the crafted file", |_| true).await;
    // The armour between the header and the trailer after it is a valid export: mallory, who has
    // no bundle, is told so.
    assert_eq!(
        file_reply,
        "This is a valid key export, but you have no bundle to attach it to: send `export` first, then drop the file again.",
        "a clear answer, not a crash"
    );

    // mallory floods, as the homeserver would push it: 1,000 wrong codes in ten transactions, then
    // 10,000 events in one.
    let hs_token = h.config_value("appservice.hs_token");
    let http = reqwest::Client::new();
    let put = |id: String, events: Vec<Value>| {
        http.put(format!("{}/_matrix/app/v1/transactions/{id}", h.handoff_url))
            .bearer_auth(&hs_token)
            .json(&json!({ "events": events }))
            .send()
    };
    let wrong_code = "import AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAAB";
    let started = Instant::now();
    for batch in 0..10 {
        let events = (0..100).map(|i| text_event(&mdm, &mallory.id, &format!("$wrong-{batch}-{i}"), wrong_code));
        assert_eq!(put(format!("wrong-{batch}"), events.collect()).await.unwrap().status(), 200);
    }
    let flood = (0..10_000).map(|i| text_event(&mdm, &mallory.id, &format!("$flood-{i}"), "status"));
    assert_eq!(put("flood".into(), flood.collect()).await.unwrap().status(), 200);
    let acked_in = started.elapsed();

    // Meanwhile bob is answered promptly: his own queue waits behind nobody's.
    let asked = Instant::now();
    h.ask(&bob, &bdm, "help", "• help — ").await;
    let answered_in = asked.elapsed();
    eprintln!("11,000 events acknowledged in {acked_in:?}; bob's help answered in {answered_in:?}");
    assert!(
        answered_in < Duration::from_secs(20),
        "bob waited {answered_in:?} behind mallory's flood (acknowledged in {acked_in:?})"
    );

    // The wrong codes were cut off after a few.
    h.bot_says(&mallory, &mdm, 0, "the wrong-code limit", |b| b.contains("Too many wrong codes")).await;

    // Nothing stored was lost: alice's code still moves her rooms, for the account it names.
    let report = h.ask(&bob, &bdm, &format!("import {code}"), "rooms moved to @bob:localhost").await;
    assert!(report.starts_with("2 of 2 rooms moved"), "{report}");
    for room in &rooms {
        assert_eq!(memberships(&alice, room, &bob.id).await, ["invite", "join"], "{room}");
    }
    assert!(memberships(&alice, &rooms[0], &mallory.id).await.is_empty());
    let log = h.log();
    let overflows = log.matches("too many events waiting from one user").count();
    assert!((1..50).contains(&overflows), "the flood was bounded, and logged {overflows} times, not per event");
    assert!(!log.contains(&code), "the code leaked into the log");
}

#[tokio::test]
async fn the_edge_refuses_unauthenticated_and_malformed_requests_and_keeps_serving() {
    let h = Harness::start().await;
    let hs_token = h.config_value("appservice.hs_token");
    let http = reqwest::Client::new();
    let url = |path: &str| format!("{}{path}", h.handoff_url);
    let endpoints = [
        (reqwest::Method::PUT, "/_matrix/app/v1/transactions/t1"),
        (reqwest::Method::GET, "/_matrix/app/v1/users/@handoff:localhost"),
        (reqwest::Method::GET, "/_matrix/app/v1/rooms/%23a:localhost"),
        (reqwest::Method::POST, "/_matrix/app/v1/ping"),
    ];
    for (method, path) in &endpoints {
        let r = http.request(method.clone(), url(path)).json(&json!({"events": []})).send().await.unwrap();
        assert_eq!(r.status(), 401, "{method} {path} without a token");
        let r = http.request(method.clone(), url(path)).bearer_auth("nope").json(&json!({})).send().await.unwrap();
        assert_eq!(r.status(), 403, "{method} {path} with a wrong token");
        let query = format!("{path}{}access_token={hs_token}x", if path.contains('?') { "&" } else { "?" });
        let r = http.request(method.clone(), url(&query)).json(&json!({})).send().await.unwrap();
        assert_eq!(r.status(), 403, "{method} {path} with a token one character off");
    }
    // A wrong token with a huge body: refused for the token, before the body is read. Only the
    // head and a first 64 KiB are sent (a client sending all 40 MiB races the refusal and may
    // see its connection reset): the 403 must come while the rest of the body is still owed.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = h.handoff_url.trim_start_matches("http://");
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "PUT /_matrix/app/v1/transactions/huge HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer nope\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            40 << 20
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        conn.write_all(&[b' '; 64 << 10]).await.unwrap();
        let mut answer = vec![0; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut answer))
            .await
            .expect("no answer while the body was still owed: the service waited for it")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]);
        assert!(answer.starts_with("HTTP/1.1 403"), "refused for the token, not the size: {answer}");
    }
    // The right token: deeply nested and malformed bodies get Matrix errors, or are acknowledged
    // with nothing for the bot in them; never a crash.
    let put = |id: &str| http.put(url(&format!("/_matrix/app/v1/transactions/{id}"))).bearer_auth(&hs_token);
    let nested = format!("{{\"events\": [{}{}]}}", "[".repeat(100_000), "]".repeat(100_000));
    let r = put("nested").body(nested).send().await.unwrap();
    assert!(r.status().is_client_error() || r.status().is_success(), "nested: {}", r.status());
    let deep_event = format!(
        "{{\"events\": [{{\"type\": \"m.room.message\", \"content\": {}1{}}}]}}",
        "{\"a\":".repeat(5_000),
        "}".repeat(5_000)
    );
    let r = put("deep").body(deep_event).send().await.unwrap();
    assert!(r.status().is_client_error() || r.status().is_success(), "deep: {}", r.status());
    assert_eq!(put("notjson").body("\u{0}\u{1}").send().await.unwrap().status(), 400);
    // (An oversized body with the right token, 413, is in tests/appservice.rs.)
    // Events the bot has no business with are acknowledged and dropped, even malformed ones.
    let junk = json!({"events": [{"type": "m.room.message"}, {"type": 7}, {"no": "type"}, "text", 42]});
    assert_eq!(put("junk").json(&junk).send().await.unwrap().status(), 200);

    // After all that the service still serves a real user.
    assert_eq!(http.get(url("/health")).send().await.unwrap().status(), 200);
    let alice = h.user("alice").await;
    let dm = h.dm_with_bot(&alice).await;
    h.ask(&alice, &dm, "help", "• help — ").await;
    let log = h.log();
    assert!(!log.contains("panicked"), "nothing panicked");
}

#[tokio::test]
async fn revoking_a_users_permission_stops_their_offers_pending_imports_and_transfers() {
    // One room at a time, so bob's transfer is still running when the permission goes.
    let mut h = Harness::start_with(|c| with_concurrency(c, 1)).await;
    let (alice, bob, carol) = (h.user("alice").await, h.user("bob").await, h.user("carol").await);
    let rooms = alice.create_rooms(30).await;
    let (adm, bdm, cdm) = (h.dm_with_bot(&alice).await, h.dm_with_bot(&bob).await, h.dm_with_bot(&carol).await);
    h.ask(&alice, &adm, "export --to @newbie:localhost --auto", "Your transfer code").await;
    let unbound = export(&h, &alice, &adm, "").await;
    h.ask(&carol, &cdm, &format!("import {unbound}"), "asked to approve").await;
    let bound = export(&h, &alice, &adm, "--to @bob:localhost").await;
    h.ask(&bob, &bdm, &format!("import {bound}"), "progress follows").await;
    eventually("bob's transfer to be under way", || async {
        let joined = memberships(&alice, &rooms[0], &bob.id).await;
        joined.contains(&"join".to_owned()).then_some(())
    })
    .await;

    // The admin revokes alice and restarts handoff.
    assert!(h.signal_handoff("TERM").success());
    let config = std::fs::read_to_string(&h.sandbox.config_path).unwrap();
    let revoked = refusing(config, "@alice:localhost");
    std::fs::write(&h.sandbox.config_path, revoked).unwrap();
    h.start_handoff().await;

    let stopped = h.bot_says(&bob, &bdm, 0, "the stop notice", |b| b.contains("This transfer was stopped")).await;
    assert!(stopped.contains("@alice:localhost may no longer use handoff"), "{stopped}");
    let moved = {
        let mut n = 0;
        for room in &rooms {
            if memberships(&alice, room, &bob.id).await.contains(&"join".to_owned()) {
                n += 1;
            }
        }
        n
    };
    assert!(moved < rooms.len(), "stopped before the end: {moved} rooms moved");
    assert!(h.ask(&bob, &bdm, "status", "Transfer").await.contains("cancelled"));
    assert!(h.ask(&carol, &cdm, "status", "Transfer").await.contains("cancelled"), "carol's pending import dropped");
    assert!(h.log().contains("dropped offers and pending imports"));
    // The account alice named with --auto signs in now: no offer comes.
    let newbie = h.user("newbie").await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(newbie.invites().await.is_empty(), "no offer from a revoked account");
}
