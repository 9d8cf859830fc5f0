//! Bundles against a real Synapse: export through the bot, the bundle file and `handoff inspect`,
//! key-export files, `--only`/`--exclude`, `forget`, and what is left in the store.

mod common;

use common::{Harness, User, body, code_in, edit, eventually, export_file, open_bundle, run_handoff};
use handoff::bundle::RoomKind;
use ruma::api::client::media::create_content;
use ruma::events::room::MediaSource;
use ruma::{OwnedRoomId, RoomId};
use serde_json::Value;

async fn tagged_room(user: &User, name: &str, tag: &str, order: Option<f64>) -> OwnedRoomId {
    let room = user.create_room(name).await;
    user.tag(&room, tag, order).await;
    room
}

#[tokio::test]
async fn export_file_inspect_only_exclude_keys_and_forget() {
    let mut h = Harness::start().await;
    let alice = h.user("alice").await;
    let fav = tagged_room(&alice, "Fav", "m.favourite", Some(0.3)).await;
    let low = tagged_room(&alice, "Low", "m.lowpriority", None).await;
    let plain = alice.create_room("Plain").await;
    let peer = h.user("peer").await;
    let dm_room = alice.dms_with(&[&peer]).await.remove(0);
    let dm = h.dm_with_bot(&alice).await;

    // The whole account, as a file that opens with the code; the bot's own DM is not part of it.
    let (code, file) = export_file(&h, &alice, &dm, "").await;
    let bundle = open_bundle(&file, &code);
    let ids: Vec<_> = bundle.rooms.iter().map(|r| r.room_id.clone()).collect();
    for room in [&fav, &low, &plain, &dm_room] {
        assert!(ids.contains(room), "{room} missing from {ids:?}");
    }
    assert!(!ids.contains(&dm), "the DM with the bot is not exported");
    let entry = |id: &OwnedRoomId| bundle.rooms.iter().find(|r| &r.room_id == id).unwrap().clone();
    assert_eq!(entry(&fav).priority, handoff::bundle::Priority::High);
    assert_eq!(entry(&fav).tags.get(&ruma::events::tag::TagName::Favorite).unwrap().order, Some(0.3));
    assert_eq!(entry(&low).priority, handoff::bundle::Priority::Low);
    assert_eq!(entry(&dm_room).kind, RoomKind::Dm);
    assert_eq!(entry(&dm_room).dm_peer.as_deref(), Some(peer.id.as_ref()));
    assert_eq!(entry(&plain).via, vec![ruma::OwnedServerName::try_from("localhost").unwrap()]);
    assert_eq!(bundle.contacts.len(), 1);
    assert_eq!(bundle.contacts[0].dm_rooms, vec![dm_room.clone()]);
    assert_eq!(bundle.source.user_id, alice.id);
    assert_eq!(bundle.source.homeserver_url.as_str(), h.synapse().url);

    // `handoff inspect` with the code (typed in lower case), then a wrong code and a tampered file.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bundle.age");
    std::fs::write(&path, &file).unwrap();
    let pass = dir.path().join("code.txt");
    std::fs::write(&pass, code.to_lowercase()).unwrap();
    let out = std::process::Command::new(common::HANDOFF)
        .args(["inspect", path.to_str().unwrap(), "--passphrase-file", pass.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("Bundle of @alice:localhost"), "{stdout}");
    assert!(stdout.contains(&format!("Rooms: {}", bundle.rooms.len())), "{stdout}");
    let json = std::process::Command::new(common::HANDOFF)
        .args(["inspect", path.to_str().unwrap(), "--passphrase-file", pass.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    let parsed: Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(parsed["version"], 1);
    std::fs::write(&pass, "AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAAA").unwrap();
    let (status, err) =
        run_handoff(&["inspect", path.to_str().unwrap(), "--passphrase-file", pass.to_str().unwrap()], dir.path());
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("wrong code or passphrase"), "{err}");
    std::fs::write(&pass, &code).unwrap();
    let mut tampered = file.clone();
    let at = tampered.len() - 30;
    tampered[at] ^= 0x55;
    std::fs::write(&path, &tampered).unwrap();
    let (status, err) =
        run_handoff(&["inspect", path.to_str().unwrap(), "--passphrase-file", pass.to_str().unwrap()], dir.path());
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("damaged"), "{err}");
    std::fs::write(&path, &file[..file.len() / 2]).unwrap();
    let (_, err) =
        run_handoff(&["inspect", path.to_str().unwrap(), "--passphrase-file", pass.to_str().unwrap()], dir.path());
    assert!(err.contains("damaged or cut short"), "{err}");

    // --only and --exclude select.
    let (code, file) = export_file(&h, &alice, &dm, "--only favourites").await;
    let only_fav: Vec<_> = open_bundle(&file, &code).rooms.into_iter().map(|r| r.room_id).collect();
    assert_eq!(only_fav, vec![fav.clone()]);
    let (code, file) = export_file(&h, &alice, &dm, "--only dms").await;
    let only_dms = open_bundle(&file, &code);
    assert_eq!(only_dms.rooms.iter().map(|r| &r.room_id).collect::<Vec<_>>(), vec![&dm_room]);
    let (code, file) = export_file(&h, &alice, &dm, &format!("--only rooms --exclude {plain}")).await;
    let rooms: Vec<_> = open_bundle(&file, &code).rooms.into_iter().map(|r| r.room_id).collect();
    assert!(rooms.contains(&fav) && rooms.contains(&low));
    assert!(!rooms.contains(&plain) && !rooms.contains(&dm_room), "{rooms:?}");

    // A key export is attached to the latest bundle; a file that isn't one is refused, saying why.
    let element_vector = "-----BEGIN MEGOLM SESSION DATA-----\nAXNhbHRzYWx0c2FsdHNhbHSIiIiIiIiIiIiIiIiIiIiIAAAACmIRUW2OjZ3L2l6j9h0lHlV3M2dx\ncissyYBxjsfsAndErh065A8=\n-----END MEGOLM SESSION DATA-----\n";
    let reply =
        send_file(&h, &alice, &dm, "notes.txt", b"just some notes", Upload::Plain, "Nothing was attached").await;
    assert!(body(&reply).contains("header"), "{reply}");
    let reply =
        send_file(&h, &alice, &dm, "element-keys.txt", element_vector.as_bytes(), Upload::Plain, "Attached").await;
    assert!(body(&reply).contains("10 PBKDF2 rounds"), "{reply}");
    // As an encrypted attachment too (how clients send files in encrypted rooms), checked by its hash.
    let keys = element_vector.as_bytes();
    let reply = send_file(&h, &alice, &dm, "element-keys.txt", keys, Upload::Encrypted, "Attached").await;
    assert!(body(&reply).contains("10 PBKDF2 rounds"), "{reply}");
    let reply = send_file(&h, &alice, &dm, "element-keys.txt", keys, Upload::Tampered, "nothing was attached").await;
    assert!(body(&reply).contains("does not match its SHA-256 hash"), "{reply}");
    let shown = h.ask(&alice, &dm, "keys", "key export").await;
    assert!(shown.contains("carries a key export"), "{shown}");

    // Everything is sealed at rest; `forget` leaves nothing about alice behind.
    h.signal_handoff("TERM");
    let db = h.sandbox.dir.join("handoff.db");
    {
        let store = handoff::store::Store::open(&db).unwrap();
        let raw = store.raw_bundle_bytes().await.unwrap();
        for needle in ["Fav", "Plain", "@peer:localhost", fav.as_str()] {
            assert!(!raw.windows(needle.len()).any(|w| w == needle.as_bytes()), "{needle} readable at rest");
        }
        let latest = store.latest_bundle(&alice.id).await.unwrap().unwrap().1;
        assert_eq!(latest.bundle.room_keys.unwrap().armored, element_vector);
        assert_eq!(store.bundle_count(&alice.id).await.unwrap(), 4);
        assert_eq!(store.codes_of(&alice.id).await.unwrap().len(), 4);
    }
    h.start_handoff().await;
    let forgot = h.ask(&alice, &dm, "forget", "Deleted").await;
    assert!(forgot.contains("Deleted 4 bundle(s), 4 transfer code(s)"), "{forgot}");
    h.signal_handoff("TERM");
    let store = handoff::store::Store::open(&db).unwrap();
    assert_eq!(store.bundle_count(&alice.id).await.unwrap(), 0);
    assert!(store.codes_of(&alice.id).await.unwrap().is_empty());
    assert!(store.raw_bundle_bytes().await.unwrap().is_empty());
}

/// How a test sends a file.
#[derive(Clone, Copy, PartialEq)]
enum Upload {
    Plain,
    Encrypted,
    /// Encrypted, with a byte of the ciphertext changed after its hash was taken.
    Tampered,
}

/// Uploads `bytes` as `user` and sends it as a file message; waits for the bot's reply containing `expect`.
async fn send_file(
    h: &Harness,
    user: &User,
    dm: &RoomId,
    name: &str,
    bytes: &[u8],
    how: Upload,
    expect: &str,
) -> Value {
    let before = user.messages_from(dm, &h.bot).await.len();
    let source = if how == Upload::Plain {
        MediaSource::Plain(user.upload(name, bytes.to_vec()).await)
    } else {
        let (mut cipher, key) = handoff::attachment::encrypt(bytes);
        if how == Upload::Tampered {
            cipher[0] ^= 1;
        }
        let uri = user.send(create_content::v3::Request::new(cipher)).await.content_uri;
        MediaSource::Encrypted(Box::new(key.into_file(uri)))
    };
    user.send_file(dm, name, source).await;
    eventually(&format!("a reply to {name}"), || async {
        user.messages_from(dm, &h.bot).await.into_iter().skip(before).find(|m| body(m).contains(expect))
    })
    .await
}

#[tokio::test]
async fn an_expired_code_is_refused() {
    let h = Harness::start_with(|c| edit(c, "code_ttl: 15m", "code_ttl: 30s")).await;
    let (alice, bob) = (h.user("alice").await, h.user("bob").await);
    alice.create_room("Something").await;
    let (adm, bdm) = (h.dm_with_bot(&alice).await, h.dm_with_bot(&bob).await);
    let answer = h.ask(&alice, &adm, "export --to @bob:localhost", "Your transfer code").await;
    assert!(answer.contains("expires in 30s"), "{answer}");
    let code = code_in(&answer).unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(31)).await;
    let refused = h.ask(&bob, &bdm, &format!("import {code}"), "expired").await;
    assert!(refused.contains("ask for a new one with `export`"), "{refused}");
}
