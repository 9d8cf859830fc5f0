//! No secret reaches the log, even at `trace`: a whole session (the bot DM, `export --file`, a key
//! export dropped in, pasted codes and passphrases, a typo'd code, `import`, `status`, transactions
//! pushed by hand with wrong and legacy query-string tokens) runs with `logging.level: trace`, and
//! the log is then searched for every secret in every spelling it could take.

mod common;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use common::{Harness, body, export_file, open_bundle};
use ruma::events::room::MediaSource;
use serde_json::json;

/// Element's key-export test vector 2 (matrix-react-sdk MegolmExportEncryption-test.js), made with
/// the passphrase below.
const KEY_EXPORT: &str = "-----BEGIN MEGOLM SESSION DATA-----\nAW1vcmVzYWx0bW9yZXNhbHT//////////wAAAAAAAAAAAAAD6KyBpe1Niv5M5NPm4ZATsJo5nghk\nKYu63a0YQ5DRhUWEKk7CcMkrKnAUiZny\n-----END MEGOLM SESSION DATA-----\n";
const KEY_PASSPHRASE: &str = "betterpassword";
/// What a caller that is not the homeserver presents as `hs_token`: perhaps a real token of
/// something else, so it must not be logged either.
const WRONG_HS_TOKEN: &str = "wrong-hs-token-4f7d2c91e8b3a6";

/// The config with `logging.level` set to `trace`, whatever level it had.
fn at_trace(config: String) -> String {
    let mut replaced = 0;
    let out: Vec<String> = config
        .lines()
        .map(|line| {
            if line.trim_start().starts_with("level:") {
                replaced += 1;
                format!("{}level: trace", &line[..line.len() - line.trim_start().len()])
            } else {
                line.to_owned()
            }
        })
        .collect();
    assert_eq!(replaced, 1, "one logging.level line in the config");
    out.join("\n") + "\n"
}

/// The spellings a user may type a transfer code in (`import` takes any case, with or without
/// hyphens), and the normalised one the service works with.
fn spellings(code: &str) -> [String; 4] {
    let bare = code.replace('-', "");
    [code.to_owned(), code.to_lowercase(), bare.to_lowercase(), bare]
}

/// The ways raw key bytes may be written out: hex, every base64, Rust's `Debug` of the bytes.
fn spelled(key: &[u8]) -> Vec<(&'static str, String)> {
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    vec![
        ("upper-case hex", hex.to_uppercase()),
        ("hex", hex),
        ("base64", STANDARD.encode(key)),
        ("unpadded base64", STANDARD_NO_PAD.encode(key)),
        ("url-safe base64", URL_SAFE.encode(key)),
        ("unpadded url-safe base64", URL_SAFE_NO_PAD.encode(key)),
        ("a Debug byte list", format!("{key:?}")),
    ]
}

#[tokio::test]
async fn a_trace_level_log_of_a_whole_session_holds_no_secret() {
    let mut h = Harness::start_with(at_trace).await;
    let (alice, bob) = (h.user("alice").await, h.user("bob").await);
    for name in ["secret plans", "family"] {
        alice.create_room(name).await;
    }

    // The old account: help, export with a file, a key export dropped in, the passphrase pasted.
    let adm = h.dm_with_bot(&alice).await;
    h.ask(&alice, &adm, "help", "• help — ").await;
    let (code, sealed) = export_file(&h, &alice, &adm, "--to @bob:localhost").await;
    assert_eq!(open_bundle(&sealed, &code).source.user_id, alice.id);
    handoff::keys::validate(KEY_EXPORT).expect("the test vector is a key export");
    let before = alice.messages_from(&adm, &h.bot).await.len();
    let uri = alice.upload("element-keys.txt", KEY_EXPORT.as_bytes().to_vec()).await;
    alice.send_file(&adm, "element-keys.txt", MediaSource::Plain(uri)).await;
    h.bot_says(&alice, &adm, before, "the key export attached", |b| b.contains("Attached your key export")).await;
    // People paste what they shouldn't: the passphrase, alone.
    h.ask(&alice, &adm, KEY_PASSPHRASE, "Unknown command").await;

    // The new account: the code pasted alone (twice, differently), a typo of it, then the import.
    let bdm = h.dm_with_bot(&bob).await;
    let [grouped, _, lower_bare, _] = spellings(&code);
    h.ask(&bob, &bdm, &grouped, "looks like a transfer code").await;
    h.ask(&bob, &bdm, &lower_bare, "looks like a transfer code").await;
    let last = code.chars().last().unwrap();
    let typo = format!("{}{}", &code[..code.len() - 1], if last == 'A' { 'B' } else { 'A' });
    h.ask(&bob, &bdm, &format!("import {typo}"), "no such transfer code").await;
    h.ask(&bob, &bdm, &format!("import {code}"), "The code is good").await;
    let report = h.bot_says(&bob, &bdm, 0, "the report", |b| b.contains("rooms moved to")).await;
    assert!(report.starts_with("2 of 2 rooms moved"), "{report}");
    assert!(report.contains("key export delivered"), "{report}");
    h.ask(&alice, &adm, "status", "Transfer").await;
    h.ask(&bob, &bdm, "status", "Transfer").await;

    // Transactions pushed by hand: a wrong token in the header and in the query string, and the
    // right one in the (legacy) query string, where a logged URL would show it.
    let hs_token = h.config_value("appservice.hs_token");
    let http = reqwest::Client::new();
    let url = |txn: &str, query: &str| format!("{}/_matrix/app/v1/transactions/{txn}{query}", h.handoff_url);
    let empty = json!({"events": []});
    let r = http.put(url("by-hand-1", "")).bearer_auth(WRONG_HS_TOKEN).json(&empty).send().await.unwrap();
    assert_eq!(r.status(), 403);
    let r = http.put(url("by-hand-2", &format!("?access_token={WRONG_HS_TOKEN}"))).json(&empty).send().await.unwrap();
    assert_eq!(r.status(), 403);
    let r = http.put(url("by-hand-3", &format!("?access_token={hs_token}"))).json(&empty).send().await.unwrap();
    assert_eq!(r.status(), 200);

    // A clean stop, so every line is written.
    assert!(h.signal_handoff("TERM").success());
    let log = h.log();

    // The log is really at trace level and covers the session: the test can't pass on an empty one.
    let trace_lines = log.lines().filter(|l| l.contains(" TRACE ")).count();
    assert!(trace_lines > 100, "{trace_lines} TRACE lines:\n{log}");
    for expected in
        ["transaction accepted", "not a command", "bundle captured and stored", "transfer done", "stopped cleanly"]
    {
        assert!(log.contains(expected), "{expected:?} not in the log");
    }

    let mut secrets: Vec<(String, String)> = Vec::new();
    // The keys of the files the bot sent (the bundle file, the key export it delivered): the media
    // repository holds ciphertext that anyone with a log line holding one of them could open.
    let mut files = Vec::new();
    for (user, dm) in [(&alice, &adm), (&bob, &bdm)] {
        for file in user.messages_from(dm, &h.bot).await.iter().filter(|m| m["content"]["msgtype"] == "m.file") {
            let name = body(file).to_owned();
            files.push(name.clone());
            let k = file["content"]["file"]["key"]["k"].as_str().expect("an encrypted attachment").to_owned();
            for (form, text) in spelled(&URL_SAFE_NO_PAD.decode(&k).unwrap()) {
                secrets.push((format!("the attachment key of {name} as {form}"), text));
            }
        }
    }
    assert_eq!(files.len(), 2, "the bundle file and the delivered key export: {files:?}");
    for key in
        ["appservice.as_token", "appservice.hs_token", "appservice.acting.as_token", "appservice.acting.hs_token"]
    {
        secrets.push((key.to_owned(), h.config_value(key)));
    }
    secrets.push(("the wrong hs_token a caller presented".into(), WRONG_HS_TOKEN.into()));
    for user in [&alice, &bob] {
        secrets.push((format!("{}'s access token", user.id), user.token.clone()));
    }
    for (what, c) in [("the transfer code", &code), ("the typo of the transfer code", &typo)] {
        for spelling in spellings(c) {
            secrets.push((format!("{what} as {spelling:?}"), spelling));
        }
    }
    secrets.push(("the key-export passphrase".into(), KEY_PASSPHRASE.into()));
    for line in KEY_EXPORT.lines().filter(|l| !l.starts_with("-----")) {
        secrets.push(("the key export's encrypted body".into(), line.to_owned()));
    }
    let db = h.sandbox.dir.join(h.config_value("database.path"));
    let store_key = std::fs::read(format!("{}.key", db.display())).expect("the store key beside the database");
    assert_eq!(store_key.len(), 32);
    for (form, text) in spelled(&store_key) {
        secrets.push((format!("the store key as {form}"), text));
    }

    // Every leak, with the lines that hold it (the secret masked) and what emitted them.
    let mut leaks = Vec::new();
    for (what, secret) in &secrets {
        let lines: Vec<String> = log
            .lines()
            .filter(|l| l.contains(secret.as_str()))
            .take(3)
            .map(|l| l.replace(secret.as_str(), "<SECRET>").chars().take(400).collect())
            .collect();
        if !lines.is_empty() {
            leaks.push(format!("{what} is in the log, e.g.:\n    {}", lines.join("\n    ")));
        }
    }
    assert!(leaks.is_empty(), "{} secret(s) leaked into the trace log:\n{}", leaks.len(), leaks.join("\n"));
}
