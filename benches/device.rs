//! The device side, each figure next to a baseline from the same run (a release build):
//!
//! - key derivation: opening an Element key export at Element's 500,000 PBKDF2 rounds with
//!   matrix-sdk (what `handoff import` does with a bundle's keys) against PBKDF2-HMAC-SHA512 at
//!   those rounds alone, the floor any client pays; and the service's validator of the same file
//!   (which never decrypts);
//! - a key file of 10,000 sessions (over 100 rooms, made with vodozemac): the service's validator,
//!   matrix-sdk's decryption of it (the floor of an import), and `handoff import` of a bundle that
//!   carries it into a fresh device of the command line (the real binary, against Synapse on
//!   loopback: log-in of the store, decryption, the store's writes), as a ratio to that floor;
//! - a 500-room move on one Synapse: `handoff import --old` on the device side against the
//!   service's engine (`export --to`, `import CODE`), both at the default concurrency, two old
//!   accounts of the same shape into two new accounts, on a fresh Synapse per round, in rounds
//!   of alternating order (`HANDOFF_BENCH_ROUNDS`, 2 by default), each ratio and their mean.
//!
//! Run: `cargo bench --bench device` (`HANDOFF_BENCH_ROOMS=100` and `HANDOFF_BENCH_SESSIONS=2000`
//! for a quicker run).

// matrix-sdk's futures are deep: rustc 1.95 overflows proving a spawned sync `Send` without this.
#![recursion_limit = "256"]

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Harness, export};
use matrix_sdk_crypto::olm::ExportedRoomKey;
use matrix_sdk_crypto::vodozemac::megolm::{GroupSession, SessionConfig};
use matrix_sdk_crypto::vodozemac::{Curve25519SecretKey, Ed25519SecretKey};
use matrix_sdk_crypto::{decrypt_room_key_export, encrypt_room_key_export};
use serde_json::json;

/// Element's rounds for key exports (and matrix-sdk's).
const ROUNDS: u32 = 500_000;
const PASSPHRASE: &str = "bench passphrase";

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(run());
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// `n` room keys as a client exports them, over 100 rooms.
fn room_keys(n: usize) -> Vec<ExportedRoomKey> {
    let sender = Curve25519SecretKey::new();
    let sender = matrix_sdk_crypto::vodozemac::Curve25519PublicKey::from(&sender).to_base64();
    let signing = Ed25519SecretKey::new().public_key().to_base64();
    let keys: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            let session = GroupSession::new(SessionConfig::version_1());
            let mut inbound = matrix_sdk_crypto::vodozemac::megolm::InboundGroupSession::new(
                &session.session_key(),
                SessionConfig::version_1(),
            );
            json!({
                "algorithm": "m.megolm.v1.aes-sha2",
                "room_id": format!("!bench{:03}:localhost", i % 100),
                "sender_key": sender,
                "session_id": session.session_id(),
                "session_key": inbound.export_at(0).expect("index 0").to_base64(),
                "sender_claimed_keys": {"ed25519": signing},
                "forwarding_curve25519_key_chain": [],
            })
        })
        .collect();
    serde_json::from_value(json!(keys)).expect("valid exported room keys")
}

fn timed<T>(f: impl FnOnce() -> T) -> (Duration, T) {
    let start = Instant::now();
    let out = f();
    (start.elapsed(), out)
}

fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

/// Runs `handoff ARGS` with `data` as its data directory and `stdin` as its input; panics unless
/// it succeeds. Returns its wall time.
fn handoff(data: &Path, args: &[&str], stdin: &str) -> Duration {
    let start = Instant::now();
    let (status, out, err) = common::device_cli(data, args, stdin);
    let took = start.elapsed();
    assert!(status.success(), "handoff {args:?}: {out}{err}");
    // HANDOFF_LOG=debug: the device side's log (each stage of an import timed).
    if std::env::var_os("HANDOFF_LOG").is_some() {
        eprint!("{err}");
    }
    took
}

/// A harness at log level `warn`, every rate limit lifted: the benchmark measures the device side's
/// throughput, which Synapse's limits on its joins (10, then one each 10 s) would set alone.
/// With `HANDOFF_LOG` set, the service logs its transfers' stages too (printed after each round).
async fn quiet_harness() -> Harness {
    let lifted = handoff::sandbox::lifted(handoff::sandbox::RateLimit::ALL);
    let level = if std::env::var_os("HANDOFF_LOG").is_some() { "\"warn,handoff::transfer=info\"" } else { "warn" };
    let level = format!("level: {level}");
    Harness::start_with_homeserver(|c| common::edit(c, "level: \"info,handoff=debug\"", &level), &lifted).await
}

async fn run() {
    let sessions = env_or("HANDOFF_BENCH_SESSIONS", 10_000);
    let rooms = env_or("HANDOFF_BENCH_ROOMS", 500);

    println!("key derivation at {ROUNDS} PBKDF2 rounds:");
    let one = encrypt_room_key_export(&room_keys(1), PASSPHRASE, ROUNDS).unwrap();
    let (floor, _) = timed(|| {
        let mut key = [0u8; 64];
        pbkdf2::pbkdf2_hmac::<sha2::Sha512>(PASSPHRASE.as_bytes(), &[7u8; 16], ROUNDS, &mut key);
        key
    });
    let (open_one, keys) = timed(|| decrypt_room_key_export(one.as_bytes(), PASSPHRASE).unwrap());
    assert_eq!(keys.len(), 1);
    let (validate_one, _) = timed(|| handoff::keys::validate(&one).unwrap());
    println!("  PBKDF2-HMAC-SHA512 alone (baseline)      {}", secs(floor));
    println!(
        "  open a 1-session export (matrix-sdk)     {}  = {:.2}× the baseline",
        secs(open_one),
        open_one.as_secs_f64() / floor.as_secs_f64()
    );
    println!(
        "  the service's validator (no decryption)  {}  = {:.5}× the baseline",
        secs(validate_one),
        validate_one.as_secs_f64() / floor.as_secs_f64()
    );

    println!("a key file of {sessions} sessions:");
    let (made, file) = timed(|| encrypt_room_key_export(&room_keys(sessions), PASSPHRASE, ROUNDS).unwrap());
    println!("  made (vodozemac + encryption)            {} ({} KiB)", secs(made), file.len() / 1024);
    let (validate, validated) = timed(|| handoff::keys::validate(&file).unwrap());
    let (decrypt, keys) = timed(|| decrypt_room_key_export(file.as_bytes(), PASSPHRASE).unwrap());
    assert_eq!(keys.len(), sessions);
    println!("  matrix-sdk decrypts it (baseline)        {}", secs(decrypt));
    println!(
        "  the service's validator                  {}  = {:.4}× the baseline",
        secs(validate),
        validate.as_secs_f64() / decrypt.as_secs_f64()
    );
    assert_eq!(validated.encrypted_len + 69, keys_len(&file));

    // The bundle's keys into a fresh device of the command line, on Synapse.
    let h = quiet_harness().await;
    let url = h.synapse().url.clone();
    let owner = h.user("keys").await;
    let work = tempfile::tempdir().unwrap();
    let keys_path = work.path().join("element-keys.txt");
    std::fs::write(&keys_path, &file).unwrap();
    let pass = work.path().join("pass");
    std::fs::write(&pass, PASSPHRASE).unwrap();
    let bundle = work.path().join("keys.handoff");
    let (laptop, phone) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let login = ["login", owner.id.as_str(), "--homeserver", url.as_str(), "--password-stdin"];
    handoff(laptop.path(), &login, "password\n");
    handoff(phone.path(), &login, "password\n");
    let (b, p, k) = (bundle.to_str().unwrap(), pass.to_str().unwrap(), keys_path.to_str().unwrap());
    handoff(laptop.path(), &["export", "--out", b, "--passphrase-file", p, "--room-keys", k], "");
    let import = ["import", b, "--passphrase-file", p, "--room-keys-passphrase-file", p, "--json"];
    let took = handoff(phone.path(), &import, "");
    println!(
        "  `handoff import` into a fresh device      {}  = {:.2}× the baseline (the process, its store, the writes of {sessions} keys)",
        secs(took),
        took.as_secs_f64() / decrypt.as_secs_f64()
    );
    drop(h);

    println!("a {rooms}-room move on one Synapse:");
    let rounds = env_or("HANDOFF_BENCH_ROUNDS", 2);
    let mut ratios = Vec::new();
    for round in 0..rounds {
        let device_first = round % 2 == 0;
        let (device, service) = move_round(rooms, device_first, p).await;
        let ratio = device.as_secs_f64() / service.as_secs_f64();
        ratios.push(ratio);
        println!(
            "  round {} ({} first): the service's engine (baseline) {}; `handoff import --old` (device side) {} = {ratio:.2}× the baseline",
            round + 1,
            if device_first { "device side" } else { "service" },
            secs(service),
            secs(device),
        );
    }
    let mean = ratios.iter().sum::<f64>() / ratios.len() as f64;
    println!("  mean of {rounds} rounds: the device side takes {mean:.2}× the service's engine");
}

/// One round on a fresh Synapse: two old accounts of `rooms` rooms each, one moved by the device
/// side (`handoff export` then `handoff import --old`), the other by the service (`export --to`,
/// `import CODE`), in the order given. Returns (device side, service), each from its `import`.
async fn move_round(rooms: usize, device_first: bool, passphrase_file: &str) -> (Duration, Duration) {
    let h = quiet_harness().await;
    let url = h.synapse().url.clone();
    let (for_device, for_service) =
        (h.old_account("old1", rooms, 10, 3).await, h.old_account("old2", rooms, 10, 3).await);
    let (by_device, by_service) = (h.user("device").await, h.user("service").await);
    let data = tempfile::tempdir().unwrap();
    for user in [&for_device.user, &by_device] {
        handoff(
            data.path(),
            &["login", user.id.as_str(), "--homeserver", url.as_str(), "--password-stdin"],
            "password\n",
        );
    }
    let bundle = data.path().join("old.handoff");
    let b = bundle.to_str().unwrap();
    let as_old = ["export", "--as", for_device.user.id.as_str(), "--out", b, "--passphrase-file", passphrase_file];
    handoff(data.path(), &as_old, "");
    let device_side = || {
        let import = [
            "import",
            b,
            "--as",
            by_device.id.as_str(),
            "--old",
            for_device.user.id.as_str(),
            "--passphrase-file",
            passphrase_file,
            "--json",
        ];
        handoff(data.path(), &import, "")
    };
    let mut h = h;
    h.patience = Duration::from_secs(1800);
    h.poll = Duration::from_millis(500);
    let service = async {
        let code = export(&h, &for_service.user, &for_service.dm, &format!("--to {}", by_service.id)).await;
        let dm = h.dm_with_bot(&by_service).await;
        let before = by_service.messages_from(&dm, &h.bot).await.len();
        let start = Instant::now();
        by_service.send_text(&dm, &format!("import {code}")).await;
        let report = h.bot_says(&by_service, &dm, before, "the report", |b| b.contains("rooms moved to")).await;
        assert!(report.starts_with(&format!("{rooms} of {rooms} rooms moved")), "{report}");
        start.elapsed()
    };
    let (device, service) = if device_first {
        let device = device_side();
        (device, service.await)
    } else {
        let service = service.await;
        (device_side(), service)
    };
    if std::env::var_os("HANDOFF_LOG").is_some() {
        // The service's stages, beside the device side's (its log has only these at this level).
        let stages = ["planned", "rooms joined", "rooms done", "transfer done"];
        h.log().lines().filter(|l| stages.iter().any(|s| l.contains(s))).for_each(|l| eprintln!("service: {l}"));
    }
    let joined = by_device.send(ruma::api::client::membership::joined_rooms::v3::Request::new()).await.joined_rooms;
    assert!(for_device.rooms.iter().all(|r| joined.contains(r)), "the device side left rooms behind");
    (device, service)
}

/// The decoded length of a key export's body.
fn keys_len(armored: &str) -> usize {
    use base64::Engine;
    let body: String = armored.lines().filter(|l| !l.starts_with("-----")).collect::<Vec<_>>().concat();
    base64::engine::general_purpose::STANDARD_NO_PAD.decode(body.trim_end_matches('=')).unwrap().len()
}
