//! Encrypted DMs against a real Synapse: the bot's own device, used by a client the project did
//! not write (matrix-sdk, with its own device and crypto store) the way Element uses it.

// matrix-sdk's futures are deep: rustc 1.95 overflows proving a spawned sync `Send` without this.
#![recursion_limit = "256"]

mod common;
#[path = "common/e2ee.rs"]
mod e2ee;

use common::{Harness, body, edit, eventually};
use e2ee::E2eeClient;
use ruma::api::client::authenticated_media::get_content;
use ruma::api::client::membership::joined_rooms;
use ruma::events::room::MediaSource;
use ruma::events::room::message::FileMessageEventContent;
use ruma::{OwnedDeviceId, OwnedRoomId};
use serde_json::{Value, json};

async fn health(h: &Harness) -> Value {
    reqwest::get(format!("{}/health", h.handoff_url)).await.unwrap().json().await.unwrap()
}

/// The bot's device as `/health` shows it, once it is up.
async fn bot_device(h: &Harness) -> OwnedDeviceId {
    let health = health(h).await;
    let encryption = &health["encryption"];
    assert_eq!(encryption["state"], "on", "{health}");
    assert_eq!(encryption["sync"], "ok", "{health}");
    encryption["device_id"].as_str().unwrap().into()
}

#[tokio::test]
async fn an_encrypted_dm_made_as_element_makes_it_just_works_and_survives_a_restart_and_a_lost_store() {
    let mut h = Harness::start().await;
    let alice = h.user("alice").await;
    let device = bot_device(&h).await;
    let phone = E2eeClient::login(&h.synapse().url, &alice.id, "password").await;

    // The DM is encrypted from creation; the bot joins, and greets encrypted.
    let dm = phone.create_dm(&h.bot).await;
    let greeting = phone.wait_for(&dm, &h.bot, 0, "the greeting", |m| m.body().contains("help")).await;
    assert!(greeting.encrypted, "{greeting:?}");
    assert!(greeting.body().starts_with("Hello @alice:localhost"), "{greeting:?}");
    assert!(!greeting.body().contains("can't read"), "{greeting:?}");
    // The user's client sees the bot's device, cross-signed by the bot's own identity (so a
    // client that hides unverified devices still writes to it).
    let seen_device = eventually("the client to know the bot's device", || async {
        phone.client.encryption().get_device(&h.bot, &device).await.unwrap()
    })
    .await;
    assert!(seen_device.is_cross_signed_by_owner(), "the bot's device is cross-signed");
    assert_eq!(health(&h).await["encryption"]["cross_signed"], true);

    let help = phone.ask(&dm, &h.bot, "help", "• help — show the commands").await;
    assert!(help.contains("• export"), "{help}");
    let typo = phone.ask(&dm, &h.bot, "hepl", "Did you mean `help`?").await;
    assert!(typo.contains("Unknown command `hepl`"), "{typo}");

    // What the homeserver holds of the conversation is ciphertext: no message of the bot, nor of
    // alice, in plaintext.
    let stored = alice.timeline(&dm).await;
    assert!(stored.iter().all(|e| e["type"] != "m.room.message"), "a plaintext message in the encrypted DM");
    assert!(stored.iter().filter(|e| e["type"] == "m.room.encrypted" && e["sender"] == h.bot.as_str()).count() >= 3);

    // A restart between commands: the same device, and it still decrypts and answers, once.
    h.signal_handoff("TERM");
    h.start_handoff().await;
    assert_eq!(bot_device(&h).await, device, "the bot kept its device");
    let before = phone.messages_from(&dm, &h.bot).await.len();
    let again = phone.ask(&dm, &h.bot, "help", "• help — show the commands").await;
    assert!(again.contains("• import"), "{again}");
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(phone.messages_from(&dm, &h.bot).await.len(), before + 1, "one answer to one command");
    assert_eq!(h.log().matches("logged the bot in as a new device").count(), 1, "a second device was made");

    // The user's client withholds its keys from the bot's device (blacklisted): the bot can't read
    // the message, says so once, and never runs it; trusted again, the next one is answered.
    let withheld = phone.client.encryption().get_device(&h.bot, &device).await.unwrap().unwrap();
    withheld.set_local_trust(matrix_sdk::encryption::LocalTrust::BlackListed).await.unwrap();
    let before = phone.messages_from(&dm, &h.bot).await.len();
    phone.send_text(&dm, "help").await;
    let told = phone
        .wait_for(&dm, &h.bot, before, "the bot to say it could not read", |m| m.body().contains("could not read"))
        .await;
    assert!(told.encrypted && told.body().contains("Please send it again"), "{told:?}");
    withheld.set_local_trust(matrix_sdk::encryption::LocalTrust::Unset).await.unwrap();
    phone.ask(&dm, &h.bot, "help", "• help — show the commands").await;
    let since = phone.messages_from(&dm, &h.bot).await;
    assert_eq!(since.len(), before + 2, "one notice, one answer: the unreadable `help` never ran: {since:#?}");

    // The crypto store is lost: the bot gets a fresh device (never a broken one), cross-signed
    // again from its secret storage, the old device is logged out, and the same DM still works.
    h.signal_handoff("TERM");
    std::fs::remove_dir_all(h.sandbox.dir.join("handoff.db.device")).unwrap();
    h.start_handoff().await;
    let fresh = bot_device(&h).await;
    assert_ne!(fresh, device, "a new device");
    // Signed at start-up from the recovered keys; under load, the signature may be read back by
    // the device's next sync rather than its first.
    eventually("the new device to be cross-signed", || async {
        (health(&h).await["encryption"]["cross_signed"] == true).then_some(())
    })
    .await;
    // The user's client learns of the change from its sync (a message sent before that is
    // encrypted for the old device alone, and the new one can't read it).
    let seen_device = eventually("the client to see the new device and not the old", || async {
        let devices = phone.client.encryption().get_user_devices(&h.bot).await.unwrap();
        if devices.get(&device).is_some() {
            return None;
        }
        devices.get(&fresh)
    })
    .await;
    assert!(seen_device.is_cross_signed_by_owner(), "the user's client sees the new device cross-signed");
    let after_loss = phone.ask(&dm, &h.bot, "help", "• help — show the commands").await;
    assert!(after_loss.contains("• export"), "{after_loss}");
    let log = h.log();
    assert!(log.contains("the bot's crypto store is gone"), "{log}");
    for key in ["appservice.as_token", "appservice.hs_token"] {
        assert!(!log.contains(&h.config_value(key)), "{key} leaked into the log");
    }
}

#[tokio::test]
async fn without_a_device_the_bot_says_it_cannot_read_an_encrypted_dm() {
    let h = Harness::start_with(|c| edit(c, "    allow: true", "    allow: false")).await;
    assert_eq!(health(&h).await["encryption"]["state"], "off");
    let alice = h.user("alice").await;
    let mut req = ruma::api::client::room::create_room::v3::Request::new();
    req.invite = vec![h.bot.clone()];
    req.is_direct = true;
    req.initial_state = vec![ruma::serde::Raw::from_json(
        serde_json::value::to_raw_value(&json!({"type": "m.room.encryption", "state_key": "",
            "content": {"algorithm": "m.megolm.v1.aes-sha2"}}))
        .unwrap(),
    )];
    let encrypted = alice.send(req).await.room_id;
    let warning = alice.wait_for_messages(&encrypted, &h.bot, 1).await.remove(0);
    assert!(body(&warning).contains("handoff on this server has no encryption"), "{warning}");
    // Unencrypted DMs work as ever.
    let dm = h.dm_with_bot(&alice).await;
    h.ask(&alice, &dm, "help", "• help — show the commands").await;
}

/// A member of an encrypted room writes the whole encrypted payload, its `type` included: what
/// decrypts as a membership change (the bot's leave, a DM invite) is no such thing, and the bot
/// takes nothing but messages from its device. matrix-sdk puts no `state_key` in a payload, so a
/// payload with one (a forged client's) is tested in `device::tests` only; here the types.
#[tokio::test]
async fn encrypted_member_events_are_not_taken_for_state() {
    let h = Harness::start().await;
    let alice = h.user("alice").await;
    let phone = E2eeClient::login(&h.synapse().url, &alice.id, "password").await;
    let dm = phone.create_dm(&h.bot).await;
    phone.wait_for(&dm, &h.bot, 0, "the greeting", |m| m.body().contains("help")).await;
    let room = phone.room(&dm).await;
    for membership in ["leave", "ban", "invite"] {
        let content = json!({"membership": membership, "is_direct": true, "reason": "forged"});
        room.send_raw("m.room.member", content).await.unwrap();
    }
    // Still there, and the DM still a DM: a bare command is answered.
    phone.ask(&dm, &h.bot, "help", "• help — show the commands").await;
    assert_eq!(alice.membership_of(&dm, &h.bot).await["membership"], "join");
    let log = h.log();
    assert_eq!(
        log.matches("a decrypted event that is not a message is ignored").count(),
        3,
        "each forged member event ignored by the device:\n{log}"
    );
}

/// The bot's `m.file` messages in `room` as `client` shows them, with the ciphertext the media
/// repository holds for each.
async fn files_at_rest(
    client: &E2eeClient,
    user: &common::User,
    room: &ruma::RoomId,
    bot: &ruma::UserId,
) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for m in client.messages_from(room, bot).await.into_iter().filter(|m| m.event["content"]["msgtype"] == "m.file") {
        assert!(m.encrypted, "a file message in plaintext: {m:?}");
        let file: FileMessageEventContent = serde_json::from_value(m.event["content"].clone()).unwrap();
        let MediaSource::Encrypted(source) = &file.source else { panic!("not an encrypted attachment: {m:?}") };
        let raw = user.send(get_content::v1::Request::from_uri(&source.url).unwrap()).await.file;
        out.push((m.body().to_owned(), raw));
    }
    out
}

fn readable(raw: &[u8], needle: &str) -> bool {
    raw.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn a_whole_move_in_encrypted_dms_on_a_homeserver_that_encrypts_every_room() {
    let h = Harness::start_with_homeserver(|c| c, "encryption_enabled_by_default_for_room_type: all\n").await;
    let old = h.user("old").await;
    let new = h.user("new").await;
    let old_phone = E2eeClient::login(&h.synapse().url, &old.id, "password").await;

    // The old account's rooms (encrypted, as every room here), one a favourite, and history in
    // one of them sent by its own device before the move.
    let rooms: Vec<OwnedRoomId> = old.create_rooms(3).await;
    old.tag(&rooms[0], "m.favourite", Some(0.5)).await;
    let secret = rooms[1].clone();
    old_phone.send_text(&secret, "said before the move").await;

    // Commands in the old account's encrypted DM: export with the bundle file.
    let odm = old_phone.create_dm(&h.bot).await;
    old_phone.wait_for(&odm, &h.bot, 0, "the greeting", |m| m.body().contains("help")).await;
    let answer = old_phone.ask(&odm, &h.bot, "export --file --to @new:localhost", "Your transfer code").await;
    let code = common::code_in(&answer).expect("a code");
    let bundle =
        old_phone.wait_for(&odm, &h.bot, 0, "the bundle file", |m| m.event["content"]["msgtype"] == "m.file").await;
    assert!(bundle.encrypted);
    let bundle_plain = old_phone.file(&bundle).await;
    assert!(bundle_plain.starts_with(b"age-encryption.org/v1\n"), "the client opens the bundle file");
    assert!(
        handoff::bundle::file::open(&bundle_plain, &code, &handoff::bundle::file::Policy::DEVICE).is_ok(),
        "the code opens it"
    );

    // A key export from the old account's own device, dropped into the encrypted DM.
    let keys_dir = tempfile::tempdir().unwrap();
    let keys_path = keys_dir.path().join("element-keys.txt");
    old_phone.client.encryption().export_room_keys(keys_path.clone(), "key passphrase", |_| true).await.unwrap();
    let keys = std::fs::read(&keys_path).unwrap();
    assert!(keys.starts_with(b"-----BEGIN MEGOLM SESSION DATA-----"));
    let before = old_phone.messages_from(&odm, &h.bot).await.len();
    old_phone.send_file(&odm, "element-keys.txt", keys.clone()).await;
    let attached =
        old_phone.wait_for(&odm, &h.bot, before, "the key file's answer", |m| m.body().contains("key export")).await;
    assert!(attached.body().starts_with("Attached your key export"), "{attached:?}");
    assert!(attached.encrypted);

    // The new account's encrypted DM: import, progress and report, all encrypted.
    let new_phone = E2eeClient::login(&h.synapse().url, &new.id, "password").await;
    let ndm = new_phone.create_dm(&h.bot).await;
    new_phone.wait_for(&ndm, &h.bot, 0, "the greeting", |m| m.body().contains("help")).await;
    new_phone.send_text(&ndm, &format!("import {code}")).await;
    let report =
        new_phone.wait_for(&ndm, &h.bot, 0, "the report", |m| m.body().contains("rooms moved to @new:localhost")).await;
    assert!(report.encrypted);
    assert!(report.body().starts_with("3 of 3 rooms moved"), "{report:?}");
    let joined = new.send(joined_rooms::v3::Request::new()).await.joined_rooms;
    for room in &rooms {
        assert!(joined.contains(room), "new is not in {room}");
    }
    assert!(new.tags(&rooms[0]).await.contains_key(&ruma::events::tag::TagName::Favorite));
    // Nothing the bot said in the new DM was plaintext, and no command ran twice.
    let stored = new.timeline(&ndm).await;
    assert!(stored.iter().all(|e| e["type"] != "m.room.message"), "a plaintext message in the encrypted DM");
    let reports = new_phone.messages_from(&ndm, &h.bot).await;
    assert_eq!(reports.iter().filter(|m| m.body().contains("rooms moved to @new:localhost")).count(), 1);

    // The key file comes back as an encrypted attachment; imported into the new account's own
    // fresh device, it decrypts the history sent before the move.
    let key_file = new_phone
        .wait_for(&ndm, &h.bot, 0, "the key file", |m| {
            m.body() == "element-keys.txt" && m.event["content"]["msgtype"] == "m.file"
        })
        .await;
    let received = new_phone.file(&key_file).await;
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).unwrap().trim_end().to_owned();
    assert!(text(&received) == text(&keys), "the key file arrives as it was dropped (but for a final newline)");
    let received_path = keys_dir.path().join("received-keys.txt");
    std::fs::write(&received_path, &received).unwrap();
    assert!(new_phone.import_keys(&received_path, "key passphrase").await >= 1);
    let history = eventually("the history to decrypt", || async {
        let seen = new_phone.messages_from(&secret, &old.id).await;
        seen.into_iter().find(|m| m.body() == "said before the move")
    })
    .await;
    assert!(history.encrypted, "{history:?}");

    // The media repository holds no plaintext of what the bot sent into the encrypted DMs.
    let at_rest =
        [files_at_rest(&old_phone, &old, &odm, &h.bot).await, files_at_rest(&new_phone, &new, &ndm, &h.bot).await]
            .concat();
    assert!(
        at_rest.len() >= 2,
        "the bundle file and the key file: {:?}",
        at_rest.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    for (name, raw) in &at_rest {
        for needle in ["age-encryption.org", "MEGOLM SESSION DATA", "said before the move"] {
            assert!(!readable(raw, needle), "{needle:?} readable in the media repository's copy of {name}");
        }
    }
}
