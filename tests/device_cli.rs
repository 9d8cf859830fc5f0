//! The device side against a real Synapse: `handoff login`, `logout` and `export` as a Matrix
//! client of the person's own account (the real binary, with its own data directory).

// matrix-sdk's futures are deep: rustc 1.95 overflows proving a spawned sync `Send` without this.
#![recursion_limit = "256"]

mod common;
#[path = "common/e2ee.rs"]
mod e2ee;

use std::io::Write;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};

use common::{HANDOFF, Harness, User};
use e2ee::E2eeClient;
use ruma::api::client::device::get_devices;
use serde_json::Value;

const PASSWORD: &str = "correct horse battery staple";

/// Runs `handoff ARGS` with `data` as its data directory and `stdin` as its input.
fn handoff(data: &Path, args: &[&str], stdin: &str) -> (ExitStatus, String, String) {
    let mut child = Command::new(HANDOFF)
        .args(args)
        .env("HANDOFF_DATA_DIR", data)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status, String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

async fn user_with_password(h: &Harness, localpart: &str) -> User {
    let (id, token) = h.synapse().register_user(localpart, PASSWORD, false).await.unwrap();
    User::new(&h.synapse().url, id, token).await
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
