//! Bundle files handoff did not make, crafted as a hostile sender would, against the running
//! service (a file from "another server" dropped into the DM) and the device side (`handoff
//! import`), on a real Synapse: account data capture never carries, a work factor that asks for
//! gigabytes, unknown fields, and a passphrase with spaces at its ends.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::federation::drop_file;
use common::{Harness, User};
use handoff::bundle::file::{CODE_WORK_FACTOR, seal_json};
use handoff::code::TransferCode;
use ruma::OwnedRoomId;
use ruma::api::client::room::create_room;
use serde_json::{Value, json};

/// Account data no bundle may write, each pointing somewhere a hostile sender chose.
const FORBIDDEN: &[&str] =
    &["m.identity_server", "m.widgets", "m.secret_storage.default_key", "m.cross_signing.master", "m.megolm_backup.v1"];

/// A bundle of a remote account, addressed to `to`, with one public room and, among its client
/// settings, the forbidden account data and one real setting; plus a field no handoff writes.
fn hostile_bundle(to: &str, room: &OwnedRoomId) -> Value {
    let now = handoff::store::now_ms();
    let mut settings = json!({"im.vector.setting.breadcrumbs": {"recent_rooms": [room]}});
    for kind in FORBIDDEN {
        settings[kind] = json!({"base_url": "https://evil.example", "key": "attacker's"});
    }
    json!({
        "version": 1,
        "source": {
            "user_id": "@old:elsewhere.example",
            "server_name": "elsewhere.example",
            "homeserver_url": "https://elsewhere.example",
            "exported_at": now,
            "client": "handoff-bot 0.1.0",
        },
        "rooms": [{
            "room_id": room, "via": ["localhost"], "name": "Square", "kind": "group", "priority": "normal",
            "rank": 0, "notifications": "default", "encrypted": false,
        }],
        "contacts": [],
        "preferences": {"client_settings": settings},
        "profile": {},
        "recipient": {"user_id": to, "expires_at": now + 3_600_000},
        "smuggled": {"anything": "at all"},
    })
}

async fn public_room(user: &User, name: &str) -> OwnedRoomId {
    let mut req = create_room::v3::Request::new();
    req.name = Some(name.to_owned());
    req.preset = Some(create_room::v3::RoomPreset::PublicChat);
    user.send(req).await.room_id
}

/// `sealed` (made at work factor 10) with its scrypt stanza saying `asks` instead: age reads the
/// work factor before deriving anything, so this is what a hostile file asking for it looks like.
fn asking_for(sealed: &[u8], asks: u8) -> Vec<u8> {
    let head = String::from_utf8_lossy(&sealed[..sealed.len().min(100)]).into_owned();
    let at = head.find(" 10\n").expect("the scrypt stanza's work factor");
    [&sealed[..at], format!(" {asks}\n").as_bytes(), &sealed[at + 4..]].concat()
}

/// Peak resident memory of a live process, from /proc (kB).
fn peak_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

const MIB: u64 = 1024;

async fn assert_nothing_forbidden_written(user: &User) {
    for kind in FORBIDDEN {
        assert_eq!(user.account_data(kind).await, None, "{kind} was written into {}", user.id);
    }
}

#[tokio::test]
async fn a_hostile_file_through_the_dm_writes_nothing_capture_would_not_and_costs_no_gigabytes() {
    let h = Harness::start().await;
    let (alice, bob) = (h.user("alice").await, h.user("bob").await);
    let square = public_room(&bob, "Square").await;
    let adm = h.dm_with_bot(&alice).await;
    let json = serde_json::to_vec(&hostile_bundle(alice.id.as_str(), &square)).unwrap();

    // A file whose scrypt stanza asks for 2^22 (4 GiB): refused before any key derivation, and the
    // code is not used up by it.
    let code = TransferCode::generate().display();
    let greedy = asking_for(&seal_json(&json, &code, Some(10)), 22);
    drop_file(&h, &alice, &adm, &greedy).await;
    let reply = h.ask(&alice, &adm, &format!("import {code} --dry-run"), "can't be read").await;
    assert!(
        reply.contains("work factor 22, more than the 16 accepted here") && reply.contains("Nothing was changed"),
        "{reply}"
    );
    let peak = peak_rss_kb(h.handoff_pid()).expect("handoff's /proc status");
    assert!(peak < 256 * MIB, "handoff's peak memory reached {} MiB", peak / MIB);

    // The honest seal of the same hostile JSON: the dry run names what it will leave out.
    let code = TransferCode::generate().display();
    drop_file(&h, &alice, &adm, &seal_json(&json, &code, Some(CODE_WORK_FACTOR))).await;
    let dry = h.ask(&alice, &adm, &format!("import {code} --dry-run"), "Dry run").await;
    for kind in FORBIDDEN {
        assert!(dry.contains(&format!("`{kind}` was left out")), "{kind} not named in: {dry}");
    }
    assert!(dry.contains("smuggled"), "the unknown field is named: {dry}");

    // The move: the public room joined and the real setting carried, nothing forbidden written,
    // and the report says what was left out.
    // The dry run said "Left out of the bundle" too: the report is looked for after it.
    let before = alice.messages_from(&adm, &h.bot).await.len();
    h.ask(&alice, &adm, &format!("import {code}"), "opens the bundle file").await;
    let report = h.bot_says(&alice, &adm, before, "the report", |b| b.contains("Left out of the bundle")).await;
    assert!(report.contains("`m.identity_server` was left out"), "{report}");
    assert_eq!(alice.membership_of(&square, &alice.id).await["membership"], "join");
    common::eventually("the breadcrumbs setting", || async {
        alice.account_data("im.vector.setting.breadcrumbs").await.filter(|v| v["recent_rooms"][0] == square.as_str())
    })
    .await;
    assert_nothing_forbidden_written(&alice).await;
    assert!(!h.log().contains(&code), "the code in the log");
}

/// Runs `handoff ARGS` like `common::device_cli`, watching its peak memory while it runs.
fn handoff_watched(data: &Path, args: &[&str]) -> (bool, String, u64) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_handoff"))
        .args(args)
        .env("HANDOFF_DATA_DIR", data)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (pid, started) = (child.id(), Instant::now());
    let mut peak = 0;
    while child.try_wait().unwrap().is_none() {
        peak = peak.max(peak_rss_kb(pid).unwrap_or(0));
        assert!(started.elapsed() < Duration::from_secs(120), "handoff {args:?} still runs");
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &*String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text, peak)
}

#[tokio::test]
async fn a_hostile_file_given_to_the_device_side_writes_nothing_capture_would_not() {
    let h = Harness::start().await;
    let (carol, bob) = (h.user("carol").await, h.user("bob").await);
    let square = public_room(&bob, "Square").await;
    let json = serde_json::to_vec(&hostile_bundle(carol.id.as_str(), &square)).unwrap();
    let data = tempfile::tempdir().unwrap();
    let url = h.synapse().url.clone();
    // From here the device side acts as carol, with her own token: under the defaults.
    carol.under_defaults().await;
    let login = ["login", carol.id.as_str(), "--homeserver", url.as_str(), "--access-token", "--password-stdin"];
    let (status, _, err) = common::device_cli(data.path(), &login, &format!("{}\n", carol.token));
    assert!(status.success(), "{err}");

    // A passphrase with a space at either end opens as it was typed (from a file, its line).
    let passphrase = "  two words  ";
    let pass_file = data.path().join("passphrase");
    std::fs::write(&pass_file, format!("{passphrase}\n")).unwrap();
    let pass = pass_file.to_str().unwrap();
    let file = data.path().join("hostile.age");
    let at = |name: &str| data.path().join(name).to_str().unwrap().to_owned();

    // 2^22 asked: refused before derivation, with what to do if the file is one's own.
    std::fs::write(&file, asking_for(&seal_json(&json, passphrase, Some(10)), 22)).unwrap();
    let args = ["import", file.to_str().unwrap(), "--passphrase-file", pass, "--dry-run"];
    let (ok, text, peak) = handoff_watched(data.path(), &args);
    assert!(!ok && text.contains("work factor 22, more than the 17 accepted here"), "{text}");
    assert!(text.contains("--max-work-factor 22"), "{text}");
    assert!(peak < 256 * MIB, "handoff import's peak memory reached {} MiB", peak / MIB);

    // Sealed as `handoff export --out` seals: the import leaves out what capture never carries,
    // says so, and writes none of it.
    std::fs::write(&file, seal_json(&json, passphrase, Some(handoff::bundle::file::PASSPHRASE_WORK_FACTOR))).unwrap();
    let (ok, text, _) = handoff_watched(data.path(), &["inspect", &at("hostile.age"), "--passphrase-file", pass]);
    assert!(ok && text.contains("Bundle of @old:elsewhere.example"), "{text}");
    assert!(text.contains("`m.widgets` was left out"), "{text}");
    let (_, text, _) = handoff_watched(data.path(), &["import", &at("hostile.age"), "--passphrase-file", pass]);
    for kind in FORBIDDEN {
        assert!(text.contains(&format!("`{kind}` was left out")), "{kind} not named in: {text}");
    }
    assert!(text.contains("1 of 1 room(s) moved"), "{text}");
    assert_eq!(carol.account_data("im.vector.setting.breadcrumbs").await.unwrap()["recent_rooms"][0], square.as_str());
    assert_nothing_forbidden_written(&carol).await;
}
