//! The device side against a real Synapse: `handoff login`, `logout` and `export` as a Matrix
//! client of the person's own account (the real binary, with its own data directory).

// matrix-sdk's futures are deep: rustc 1.95 overflows proving a spawned sync `Send` without this.
#![recursion_limit = "256"]

mod common;
#[path = "common/e2ee.rs"]
mod e2ee;

use std::path::Path;
use std::process::ExitStatus;

use common::{Harness, User};
use e2ee::E2eeClient;
use ruma::api::client::device::get_devices;
use ruma::api::client::profile::{get_profile, set_profile_field};
use ruma::profile::ProfileFieldValue;
use serde_json::Value;

const PASSWORD: &str = "correct horse battery staple";

/// Runs `handoff ARGS` with `data` as its data directory and `stdin` as its input.
fn handoff(data: &Path, args: &[&str], stdin: &str) -> (ExitStatus, String, String) {
    common::device_cli(data, args, stdin)
}

async fn user_with_password(h: &Harness, localpart: &str) -> User {
    let (id, token) = h.synapse().register_user(localpart, PASSWORD, false).await.unwrap();
    User::new(&h.synapse().url, id, token).await
}

async fn display_name(user: &User) -> Option<Value> {
    user.send(get_profile::v3::Request::new(user.id.clone())).await.get("displayname").cloned()
}

async fn device_names(user: &User) -> Vec<(String, Option<String>)> {
    let devices = user.send(get_devices::v3::Request::new()).await.devices;
    devices.into_iter().map(|d| (d.device_id.to_string(), d.display_name)).collect()
}

/// Every file under `dir`, with its bytes.
fn files(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push((path.clone(), std::fs::read(&path).unwrap()));
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn login_keeps_a_session_and_logout_ends_it() {
    let h = Harness::start().await;
    let alice = user_with_password(&h, "alice").await;
    let data = tempfile::tempdir().unwrap();
    let url = h.synapse().url.clone();
    let login = ["login", "@alice:localhost", "--homeserver", url.as_str(), "--password-stdin"];

    // A wrong password: a clear error, and nothing left behind.
    let (status, _, err) = handoff(data.path(), &login, "not the password\n");
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("wrong user ID or password for @alice:localhost"), "{err}");
    assert!(!data.path().join("accounts").join("@alice:localhost").exists(), "a half-made session stayed");

    // A server name that leads nowhere: say what to pass.
    let (status, _, err) = handoff(data.path(), &["login", "@alice:localhost", "--password-stdin"], "x\n");
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("cannot find the homeserver of localhost") && err.contains("--homeserver"), "{err}");

    let (status, out, err) = handoff(data.path(), &login, &format!("{PASSWORD}\n"));
    assert!(status.success(), "{err}");
    assert!(out.starts_with("Logged in as @alice:localhost on http://127.0.0.1:"), "{out}");
    let devices = device_names(&alice).await;
    let cli = devices.iter().find(|(_, name)| name.as_deref() == Some("handoff (command line)"));
    let (device, _) = cli.unwrap_or_else(|| panic!("no device of the command line: {devices:?}")).clone();
    assert!(out.contains(&format!("(device {device})")), "{out}");

    // Kept privately, and the password in none of it.
    let dir = data.path().join("accounts").join("@alice:localhost");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
    assert_eq!(std::fs::metadata(dir.join("session.json")).unwrap().permissions().mode() & 0o077, 0);
    for (path, bytes) in files(data.path()) {
        assert!(!contains(&bytes, PASSWORD), "the password is in {}", path.display());
    }

    // The next command finds the session; a second login says what to do.
    let (status, _, err) = handoff(data.path(), &login, &format!("{PASSWORD}\n"));
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("already logged in here") && err.contains("handoff logout @alice:localhost"), "{err}");

    // Logout: the device is gone from the account and the folder from the disk.
    let (status, out, err) = handoff(data.path(), &["logout"], "");
    assert!(status.success(), "{err}");
    assert!(out.contains("Logged @alice:localhost out"), "{out}");
    assert!(!dir.exists());
    assert!(!device_names(&alice).await.iter().any(|(d, _)| *d == device), "the device is still there");
    let (status, _, err) = handoff(data.path(), &["logout"], "");
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("not logged in"), "{err}");

    // An access token from another client: its device becomes the session's.
    let token = &alice.token;
    let (status, out, err) = handoff(
        data.path(),
        &["login", "@alice:localhost", "--homeserver", url.as_str(), "--access-token", "--password-stdin"],
        &format!("{token}\n"),
    );
    assert!(status.success(), "{err}");
    assert!(out.starts_with("Logged in as @alice:localhost"), "{out}");
    let (status, _, err) = handoff(
        tempfile::tempdir().unwrap().path(),
        &["login", "@bob:localhost", "--homeserver", url.as_str(), "--access-token", "--password-stdin"],
        &format!("{token}\n"),
    );
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("that access token is @alice:localhost's, not @bob:localhost's"), "{err}");
}

#[tokio::test]
async fn export_writes_the_account_and_its_room_keys_into_a_passphrase_file() {
    let h = Harness::start().await;
    let alice = user_with_password(&h, "alice").await;
    let rooms = alice.create_rooms(2).await;
    alice.tag(&rooms[0], "m.favourite", Some(0.25)).await;
    // History from alice's own device in an encrypted room, and a key export of that device.
    let phone = E2eeClient::login(&h.synapse().url, &alice.id, PASSWORD).await;
    let bob = h.user("bob").await;
    let secret = phone.create_dm(&bob.id).await;
    phone.send_text(&secret, "a secret before the move").await;
    let work = tempfile::tempdir().unwrap();
    let keys = work.path().join("element-keys.txt");
    phone.client.encryption().export_room_keys(keys.clone(), "keys passphrase", |_| true).await.unwrap();
    let passphrase = work.path().join("passphrase");
    std::fs::write(&passphrase, "bundle passphrase\n").unwrap();

    let data = tempfile::tempdir().unwrap();
    let url = h.synapse().url.clone();
    let (status, _, err) = handoff(
        data.path(),
        &["login", "@alice:localhost", "--homeserver", url.as_str(), "--password-stdin"],
        &format!("{PASSWORD}\n"),
    );
    assert!(status.success(), "{err}");

    // A file that is not a key export: refused, nothing written.
    let bad = work.path().join("not-keys.txt");
    std::fs::write(&bad, "hello").unwrap();
    let out_file = work.path().join("alice.handoff");
    let out_arg = out_file.to_str().unwrap();
    let pass_arg = passphrase.to_str().unwrap();
    let (status, _, err) = handoff(
        data.path(),
        &["export", "--out", out_arg, "--passphrase-file", pass_arg, "--room-keys", bad.to_str().unwrap()],
        "",
    );
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("not-keys.txt"), "{err}");
    assert!(!out_file.exists());

    let (status, out, err) = handoff(
        data.path(),
        &["export", "--out", out_arg, "--passphrase-file", pass_arg, "--room-keys", keys.to_str().unwrap()],
        "",
    );
    assert!(status.success(), "{err}");
    assert!(out.contains("Your key export travels inside it"), "{out}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&out_file).unwrap().permissions().mode() & 0o077, 0, "readable by others");
    let sealed = std::fs::read(&out_file).unwrap();
    assert!(!contains(&sealed, rooms[0].as_str()), "a room ID in plaintext in the file");

    // The same file format as the service's: `inspect` opens it with the passphrase.
    let (status, json, err) = handoff(data.path(), &["inspect", out_arg, "--passphrase-file", pass_arg, "--json"], "");
    assert!(status.success(), "{err}");
    let bundle: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(bundle["source"]["user_id"], "@alice:localhost");
    assert!(bundle["source"]["client"].as_str().unwrap().starts_with("handoff-cli"), "{}", bundle["source"]);
    let ids: Vec<&str> = bundle["rooms"].as_array().unwrap().iter().map(|r| r["room_id"].as_str().unwrap()).collect();
    for room in rooms.iter().chain([&secret]) {
        assert!(ids.contains(&room.as_str()), "{room} not in {ids:?}");
    }
    let favourite = bundle["rooms"].as_array().unwrap().iter().find(|r| r["room_id"] == rooms[0].as_str()).unwrap();
    assert_eq!(favourite["priority"], "high", "{favourite}");
    assert!(
        bundle["room_keys"]["armored"].as_str().unwrap().contains("BEGIN MEGOLM SESSION DATA"),
        "{}",
        bundle["room_keys"]
    );

    // A wrong passphrase opens nothing; an existing file is never overwritten.
    std::fs::write(&passphrase, "another passphrase").unwrap();
    let (status, _, err) = handoff(data.path(), &["inspect", out_arg, "--passphrase-file", pass_arg], "");
    assert_eq!(status.code(), Some(1), "{err}");
    let (status, _, err) = handoff(data.path(), &["export", "--out", out_arg, "--passphrase-file", pass_arg], "");
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("exists already"), "{err}");
    assert_eq!(std::fs::read(&out_file).unwrap(), sealed);
}

/// A public room of `user` (anyone may join it by its ID).
async fn public_room(user: &User, name: &str) -> ruma::OwnedRoomId {
    let mut req = ruma::api::client::room::create_room::v3::Request::new();
    req.name = Some(name.to_owned());
    req.preset = Some(ruma::api::client::room::create_room::v3::RoomPreset::PublicChat);
    user.send(req).await.room_id
}

/// Logs `user` in on the command line, with `data` as its data directory.
fn cli_login(data: &Path, url: &str, user: &ruma::UserId) {
    let (status, _, err) =
        handoff(data, &["login", user.as_str(), "--homeserver", url, "--password-stdin"], &format!("{PASSWORD}\n"));
    assert!(status.success(), "{err}");
}

async fn joined(user: &User) -> Vec<ruma::OwnedRoomId> {
    user.send(ruma::api::client::membership::joined_rooms::v3::Request::new()).await.joined_rooms
}

#[tokio::test]
async fn import_moves_the_account_and_the_keys_that_decrypt_its_history() {
    let h = Harness::start().await;
    let url = h.synapse().url.clone();
    let alice = user_with_password(&h, "alice").await;
    let bob = user_with_password(&h, "bob").await;
    let carol = h.user("carol").await;

    // The old account: a favourite private room, a public room, a DM with carol, and an
    // encrypted room where its own device wrote before the move, with its keys in key backup.
    let private = alice.create_room("Private plans").await;
    alice.tag(&private, "m.favourite", Some(0.5)).await;
    let public = public_room(&alice, "Town square").await;
    let dm = alice.dms_with(&[&carol]).await.remove(0);
    let phone = E2eeClient::login(&url, &alice.id, PASSWORD).await;
    // Both have a display name of their own: bob keeps his until he asks for the old one.
    for (user, name) in [(&alice, "Alice A."), (&bob, "Bob B.")] {
        user.send(set_profile_field::v3::Request::new(user.id.clone(), ProfileFieldValue::DisplayName(name.into())))
            .await;
    }
    let secret = phone.create_dm(&carol.id).await;
    carol.join(&secret).await;
    phone.send_text(&secret, "said before the move").await;
    let alice_key = phone.enable_recovery().await;

    let work = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = work.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let pass = write("passphrase", "bundle passphrase\n");
    let alice_key_file = write("alice-recovery-key", &alice_key);
    let bundle = work.path().join("alice.handoff");
    let bundle_arg = bundle.to_str().unwrap();

    // Both accounts logged in on this one device (a second login).
    let data = tempfile::tempdir().unwrap();
    cli_login(data.path(), &url, &alice.id);
    cli_login(data.path(), &url, &bob.id);
    // `handoff import` of the bundle into bob, with `extra` arguments.
    let import = |file: &str, passphrase: &str, extra: &[&str]| {
        let mut args = vec!["import", file, "--as", "@bob:localhost", "--passphrase-file", passphrase];
        args.extend_from_slice(extra);
        handoff(data.path(), &args, "")
    };

    // `handoff export` of alice's bundle with the recovery key in `key_file`.
    let export_with_key = |key_file: &str| {
        let key = format!("--recovery-key={key_file}");
        let args = ["export", "--as", "@alice:localhost", "--out", bundle_arg, "--passphrase-file", &pass, &key];
        handoff(data.path(), &args, "")
    };

    // A wrong recovery key stops the export before anything is written.
    let wrong_key = write("wrong-key", "EsTc 1234 5678 90ab cdef 1234 5678 90ab cdef 1234 5678 90ab");
    let (status, _, err) = export_with_key(&wrong_key);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("recovery key does not unlock the key backup of @alice:localhost"), "{err}");
    assert!(!bundle.exists());

    // The export carries the keys of the key backup, encrypted with the bundle's passphrase.
    let (status, out, err) = export_with_key(&alice_key_file);
    assert!(status.success(), "{err}");
    assert!(out.contains("room key(s) from your key backup travel inside it"), "{out}");

    // Bad files fail cleanly and change nothing.
    let bytes = std::fs::read(&bundle).unwrap();
    let truncated = write("truncated.handoff", "");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let mut tampered_bytes = bytes.clone();
    let last = tampered_bytes.len() - 20;
    tampered_bytes[last] ^= 0x55;
    let tampered = write("tampered.handoff", "");
    std::fs::write(&tampered, &tampered_bytes).unwrap();
    let wrong_pass = write("wrong-pass", "not the passphrase");
    for (file, passphrase, expect) in [
        (bundle_arg, wrong_pass.as_str(), "wrong code or passphrase"),
        (truncated.as_str(), pass.as_str(), "damaged or cut short"),
        (tampered.as_str(), pass.as_str(), "damaged or cut short"),
    ] {
        let (status, _, err) = import(file, passphrase, &[]);
        assert_eq!(status.code(), Some(1), "{file}: {err}");
        assert!(err.contains(expect), "{file}: {err}");
    }
    assert!(joined(&bob).await.is_empty(), "a bad file changed the new account");

    // --dry-run: the plan, nothing changed.
    let (status, out, err) = import(bundle_arg, &pass, &["--old", "@alice:localhost", "--dry-run"]);
    assert!(status.success(), "{err}");
    assert!(out.contains("Plan: @alice:localhost → @bob:localhost") && out.contains("Private plans"), "{out}");
    // What the joins take under the server's limits, in a few rooms: within the burst.
    assert!(out.contains("joins: ") && out.contains("into rooms localhost is in already"), "{out}");
    assert!(out.contains("Within Synapse's default burst"), "{out}");
    assert!(out.contains("Nothing was changed"), "{out}");
    // The same with the old account's access token instead of its login here; someone else's is refused.
    let alice_token = write("alice-token", &alice.token);
    // (The server name `localhost` leads to no homeserver: --homeserver says where it is.)
    let with_token = |token_file: &str| {
        let token = format!("--old-access-token={token_file}");
        import(bundle_arg, &pass, &[token.as_str(), "--homeserver", url.as_str(), "--dry-run", "--json"])
    };
    let (status, out, err) = with_token(&alice_token);
    assert!(status.success(), "{err}");
    let plan: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(plan["old"], "@alice:localhost");
    assert!(
        plan["rooms"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["room_id"] == private.as_str() && r["action"]["action"] == "join"),
        "{plan:#}"
    );
    let carols = write("carol-token", &carol.token);
    let (status, _, err) = with_token(&carols);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("@carol:localhost's, but the bundle is @alice:localhost's"), "{err}");
    assert!(joined(&bob).await.is_empty());

    // Without the old account's access: the public room is joined, the others need an invite (exit 3).
    let (status, out, err) = import(bundle_arg, &pass, &[]);
    assert_eq!(status.code(), Some(3), "{out}{err}");
    assert!(out.contains("need an invite") && out.contains("--old @alice:localhost"), "{out}");
    assert!(out.contains("Private plans"), "{out}");
    assert!(joined(&bob).await.contains(&public));
    assert!(!joined(&bob).await.contains(&private));
    let kept = r#"profile: kept your own display name (the old one was "Alice A."): use --profile-from-old to take it"#;
    assert!(out.contains(kept), "{out}");
    assert_eq!(display_name(&bob).await, Some(Value::from("Bob B.")));

    // With the second login as the old account, which invites: every room, as JSON for scripts.
    let bob_phone = E2eeClient::login(&url, &bob.id, PASSWORD).await;
    let bob_key = bob_phone.enable_recovery().await;
    let bob_key_file = write("bob-recovery-key", &bob_key);
    let recovery = format!("--recovery-key={bob_key_file}");
    let args = ["--old", "@alice:localhost", &recovery, "--profile-from-old", "--json"];
    let (status, out, err) = import(bundle_arg, &pass, &args);
    assert!(status.success(), "{out}{err}");
    let report: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    // Asked for: the old display name replaces bob's own.
    let profile = report["settings"].as_array().unwrap().iter().find(|s| s["step"] == "profile").cloned();
    assert_eq!(profile.map(|p| p["detail"].clone()), Some(Value::from("display name set")), "{report:#}");
    assert_eq!(display_name(&bob).await, Some(Value::from("Alice A.")));
    assert!(report["rooms"].as_array().unwrap().iter().all(|r| r["outcome"] == "moved"), "{report:#}");
    assert!(report["room_keys"]["total"].as_u64().unwrap() >= 1, "{report:#}");
    assert_eq!(report["room_keys"]["backed_up"], true);
    let rooms = joined(&bob).await;
    for room in [&private, &public, &dm, &secret] {
        assert!(rooms.contains(room), "{room} not joined: {rooms:?}");
    }
    assert!(bob.tags(&private).await.contains_key(&ruma::events::tag::TagName::Favorite));
    let direct = bob.account_data("m.direct").await.unwrap();
    assert!(direct["@carol:localhost"].as_array().unwrap().iter().any(|r| r == dm.as_str()), "{direct}");
    // Exactly one notice per room, across both runs.
    for room in [&private, &public, &dm] {
        let notices = common::move_notices(&alice.whole_timeline(room).await).len();
        assert_eq!(notices, 1, "{room}: {notices} notices");
    }
    // In the encrypted room, nothing of the move in clear text: this device sent it encrypted,
    // and a member's own client decrypts it.
    let secret_timeline = alice.whole_timeline(&secret).await;
    assert!(common::move_notices(&secret_timeline).is_empty(), "the move in clear text in the encrypted room");
    let clear = secret_timeline.iter().filter(|e| e["type"] == "m.room.message" && e["sender"] == bob.id.as_str());
    assert_eq!(clear.count(), 0, "a clear-text message of bob's in the encrypted room");
    let moved = |m: &e2ee::Seen| !m.event["content"]["org.handoff.move"].is_null();
    let notice = common::eventually("alice's phone to decrypt the move notice", || async {
        phone.messages_from(&secret, &bob.id).await.into_iter().find(|m| moved(m))
    })
    .await;
    assert!(notice.encrypted && notice.body().contains("has moved to @bob:localhost"), "{:?}", notice.event);
    assert_eq!(phone.messages_from(&secret, &bob.id).await.iter().filter(|m| moved(m)).count(), 1, "one notice");

    // The command line's own device decrypts the history sent before the new account joined.
    let cli_device = E2eeClient::open_session(&data.path().join("accounts").join("@bob:localhost")).await;
    let history = common::eventually("the history to decrypt on the command line's device", || async {
        cli_device.messages_from(&secret, &alice.id).await.into_iter().find(|m| m.body() == "said before the move")
    })
    .await;
    assert!(history.encrypted);
    drop(cli_device);

    // A second fresh device of the new account gets the keys from its key backup, and decrypts too.
    let tablet = E2eeClient::login(&url, &bob.id, PASSWORD).await;
    tablet.recover(&bob_key, &secret).await;
    let history = common::eventually("the history to decrypt on a second device", || async {
        tablet.messages_from(&secret, &alice.id).await.into_iter().find(|m| m.body() == "said before the move")
    })
    .await;
    assert!(history.encrypted);

    // No secret in what the command line keeps or prints.
    for (path, bytes) in files(data.path()) {
        for needle in [PASSWORD, alice_key.as_str(), bob_key.as_str(), "bundle passphrase"] {
            assert!(!contains(&bytes, needle), "a secret in {}", path.display());
        }
    }

    // `handoff undo` takes both runs of the import back: every room left, the notice this device
    // sent encrypted redacted too (told by the ID it recorded), bob's own name back.
    let (status, out, err) = handoff(data.path(), &["undo", "--as", "@bob:localhost"], "");
    assert!(status.success(), "{out}{err}");
    let now = joined(&bob).await;
    for room in [&private, &public, &dm, &secret] {
        assert!(!now.contains(room), "{room} still joined: {out}");
    }
    for room in [&private, &public, &dm, &secret] {
        let timeline = alice.whole_timeline(room).await;
        let redactions = timeline.iter().filter(|e| e["type"] == "m.room.redaction" && e["sender"] == bob.id.as_str());
        assert_eq!(redactions.count(), 1, "{room}: its move notice redacted once: {out}");
    }
    assert_eq!(display_name(&bob).await, Some(Value::from("Bob B.")), "{out}");

    let other = work.path().join("token.handoff");
    let (status, _, err) = handoff(
        data.path(),
        &[
            "export",
            "--as",
            "@alice:localhost",
            "--out",
            other.to_str().unwrap(),
            "--passphrase-file",
            &pass,
            "--login-token",
            "--password-stdin",
        ],
        &format!("{PASSWORD}\n"),
    );
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("does not let a session make login tokens"), "{err}");
    assert!(!other.exists());
}

#[tokio::test]
async fn a_login_token_in_the_bundle_signs_a_new_device_in_without_the_password() {
    let extra = "login_via_existing_session: {enabled: true, require_ui_auth: true, token_timeout: 5m}\n";
    let h = Harness::start_with_homeserver(|c| c, extra).await;
    let url = h.synapse().url.clone();
    let alice = user_with_password(&h, "alice").await;
    let room = alice.create_room("Kept").await;
    let work = tempfile::tempdir().unwrap();
    let pass = work.path().join("passphrase");
    std::fs::write(&pass, "bundle passphrase").unwrap();
    let pass = pass.to_str().unwrap();
    let bundle = work.path().join("alice.handoff");
    let bundle = bundle.to_str().unwrap();

    let laptop = tempfile::tempdir().unwrap();
    cli_login(laptop.path(), &url, &alice.id);
    // The homeserver asks for the password again: a wrong one makes no token and no file.
    let export = ["export", "--out", bundle, "--passphrase-file", pass, "--login-token", "--password-stdin"];
    let (status, _, err) = handoff(laptop.path(), &export, "not the password\n");
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("wrong password for @alice:localhost"), "{err}");
    assert!(!Path::new(bundle).exists());
    let (status, out, err) = handoff(laptop.path(), &export, &format!("{PASSWORD}\n"));
    assert!(status.success(), "{err}");
    assert!(out.contains("single-use login token is inside"), "{out}");
    // `inspect --json` never prints the token.
    let (_, json, _) = handoff(laptop.path(), &["inspect", bundle, "--passphrase-file", pass, "--json"], "");
    let shown: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(shown["login_token"]["token"], "<redacted>");

    // The new device: nothing logged in there, no password given.
    let before = device_names(&alice).await.len();
    let phone = tempfile::tempdir().unwrap();
    // (The server name `localhost` leads to no homeserver: --homeserver says where it is.)
    let import = ["import", bundle, "--passphrase-file", pass, "--homeserver", url.as_str()];
    let (status, out, err) = handoff(phone.path(), &import, "");
    assert!(status.success(), "{out}{err}");
    assert!(err.contains("Logged in as @alice:localhost on this device with the bundle's login token"), "{err}");
    // Alice's one room ("Kept"), into the same account on the new device.
    assert!(out.contains("into @alice:localhost: 1 of 1 room(s) moved."), "{out}");
    assert_eq!(device_names(&alice).await.len(), before + 1, "no new device");
    assert!(phone.path().join("accounts").join("@alice:localhost").join("session.json").exists());
    // The same account: no notice about a move to itself.
    assert!(common::move_notices(&alice.whole_timeline(&room).await).is_empty());

    // A used token fails cleanly on a third device, and leaves nothing behind there.
    let third = tempfile::tempdir().unwrap();
    let (status, _, err) = handoff(third.path(), &import, "");
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("expired or was used already") && err.contains("handoff login @alice:localhost"), "{err}");
    assert!(err.contains("--password-stdin"), "{err}");
    assert!(!third.path().join("accounts").join("@alice:localhost").exists());
}

/// The bundle in an age file sealed with `passphrase`, as JSON.
fn unseal(file: &Path, passphrase: &str) -> Value {
    use std::io::Read;
    let bytes = std::fs::read(file).unwrap();
    let identity = age::scrypt::Identity::new(age::secrecy::SecretString::from(passphrase.to_owned()));
    let decryptor = age::Decryptor::new_buffered(&bytes[..]).unwrap();
    let mut reader = decryptor.decrypt(std::iter::once(&identity as &dyn age::Identity)).unwrap();
    let mut json = Vec::new();
    reader.read_to_end(&mut json).unwrap();
    serde_json::from_slice(&json).unwrap()
}

/// `bundle` sealed into `file` with `passphrase`, as a bundle file is.
fn seal(file: &Path, bundle: &Value, passphrase: &str) {
    use std::io::Write;
    let mut recipient = age::scrypt::Recipient::new(age::secrecy::SecretString::from(passphrase.to_owned()));
    recipient.set_work_factor(12);
    let encryptor = age::Encryptor::with_recipients(std::iter::once(&recipient as &dyn age::Recipient)).unwrap();
    let mut out = Vec::new();
    let mut writer = encryptor.wrap_output(&mut out).unwrap();
    writer.write_all(&serde_json::to_vec(bundle).unwrap()).unwrap();
    writer.finish().unwrap();
    std::fs::write(file, out).unwrap();
}

/// A listener on loopback that answers nothing and counts the connections made to it.
async fn recording_listener() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(stream);
        }
    });
    (url, seen)
}

#[tokio::test]
async fn a_bundle_naming_another_homeserver_gets_no_token_and_no_password() {
    let h = Harness::start().await;
    let url = h.synapse().url.clone();
    let alice = user_with_password(&h, "alice").await;
    let bob = user_with_password(&h, "bob").await;
    let room = alice.create_room("Kept").await;
    let work = tempfile::tempdir().unwrap();
    let pass = work.path().join("passphrase");
    std::fs::write(&pass, "bundle passphrase").unwrap();
    let pass = pass.to_str().unwrap();
    let bundle = work.path().join("alice.handoff");
    let bundle_arg = bundle.to_str().unwrap();
    let laptop = tempfile::tempdir().unwrap();
    cli_login(laptop.path(), &url, &alice.id);
    let (status, _, err) = handoff(laptop.path(), &["export", "--out", bundle_arg, "--passphrase-file", pass], "");
    assert!(status.success(), "{err}");

    // Someone edits the file: a login token (as `export --login-token` puts one), and their own
    // server as the account's homeserver, where the token and then the password would go.
    let (thief, seen) = recording_listener().await;
    let mut edited = unseal(&bundle, "bundle passphrase");
    edited["source"]["homeserver_url"] = Value::from(thief.clone());
    let in_ten_minutes = ruma::MilliSecondsSinceUnixEpoch::now().get() + ruma::UInt::from(600_000u32);
    edited["login_token"] = serde_json::json!({"token": "syt_not_a_real_token", "expires_at": in_ten_minutes});
    seal(&bundle, &edited, "bundle passphrase");

    // A new device: `localhost` leads to no homeserver, and the bundle's own word is not taken.
    let phone = tempfile::tempdir().unwrap();
    let import = |extra: &[&str], stdin: &str| {
        let mut args = vec!["import", bundle_arg, "--passphrase-file", pass];
        args.extend_from_slice(extra);
        handoff(phone.path(), &args, stdin)
    };
    let (status, _, err) = import(&["--password-stdin"], &format!("{PASSWORD}\n"));
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("cannot find the homeserver of @alice:localhost"), "{err}");
    assert!(err.contains("nothing was sent") && err.contains("--homeserver"), "{err}");
    assert!(err.contains(&format!("the bundle names {thief}")), "{err}");
    assert!(!phone.path().join("accounts").join("@alice:localhost").exists());
    // The old account's access token given for the invites goes nowhere either.
    cli_login(laptop.path(), &url, &bob.id);
    let token_file = work.path().join("alice-token");
    std::fs::write(&token_file, &alice.token).unwrap();
    let old_token = format!("--old-access-token={}", token_file.display());
    let args = ["import", bundle_arg, "--passphrase-file", pass, "--as", "@bob:localhost", &old_token, "--dry-run"];
    let (status, _, err) = handoff(laptop.path(), &args, "");
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("cannot find the homeserver of @alice:localhost"), "{err}");

    // Where the person says the account lives: the token goes there (and is refused there);
    // without a terminal the password is not asked, and the error says how to give it.
    let (status, _, err) = import(&["--homeserver", url.as_str()], "");
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("expired or was used already") && err.contains("--password-stdin"), "{err}");
    // With --password-stdin, the password goes there too, and the import goes on.
    let (status, out, err) = import(&["--homeserver", url.as_str(), "--password-stdin"], &format!("{PASSWORD}\n"));
    assert!(status.success(), "{out}{err}");
    assert!(err.contains("log in with your password instead"), "{err}");
    assert!(out.contains("into @alice:localhost: 1 of 1 room(s) moved."), "{out}");
    assert!(phone.path().join("accounts").join("@alice:localhost").join("session.json").exists());
    assert!(joined(&alice).await.contains(&room));

    // Not one connection reached the server the bundle named.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 0, "a request reached {thief}");
}
