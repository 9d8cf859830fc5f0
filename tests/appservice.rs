//! The appservice against a real Synapse: the bot in a DM, permissions, the transaction endpoint's
//! authentication, errors and deduplication, start-up failures and a clean stop.

mod common;

use std::time::Duration;

use common::{Harness, body, edit, eventually, refusing, run_handoff, text_event};
use ruma::{RoomId, UserId};
use serde_json::{Value, json};

#[tokio::test]
async fn bot_greets_in_dm_answers_help_and_refuses_strangers() {
    // One local user is explicitly not permitted.
    let h = Harness::start_with(|c| refusing(c, "@mallory:localhost")).await;
    let alice = h.user("alice").await;

    // Invite the bot into a DM: it joins and greets with the help text.
    let dm = alice.create_dm(&h.bot).await;
    let greeting = alice.wait_for_messages(&dm, &h.bot, 1).await.remove(0);
    assert_eq!(greeting["content"]["msgtype"], "m.notice");
    assert!(body(&greeting).contains("help"), "{greeting}");
    assert!(body(&greeting).starts_with("Hello @alice:localhost"), "{greeting}");
    assert_eq!(greeting["content"]["format"], "org.matrix.custom.html");
    assert!(greeting["content"]["formatted_body"].as_str().unwrap().contains("<code>help</code>"));
    let joined = alice.membership_of(&dm, &h.bot).await;
    assert_eq!(joined["membership"], "join");

    // `help` bare in the DM: a notice listing the commands, plain and HTML.
    alice.send_text(&dm, "help").await;
    let replies = alice.wait_for_messages(&dm, &h.bot, 2).await;
    let help = &replies[1];
    assert_eq!(help["content"]["msgtype"], "m.notice");
    assert!(body(help).contains("• help — show the commands"), "{help}");
    assert!(help["content"]["formatted_body"].as_str().unwrap().contains("<li>"), "{help}");

    // A typo gets an error naming the closest command.
    alice.send_text(&dm, "hepl").await;
    let replies = alice.wait_for_messages(&dm, &h.bot, 3).await;
    assert!(body(&replies[2]).contains("Unknown command `hepl`. Did you mean `help`?"), "{}", replies[2]);

    // Its own notices and other people's chatter in a group room are not commands; the prefix is.
    let group = alice.create_room("team").await;
    alice.invite(&group, &h.bot).await;
    alice.wait_for_messages(&group, &h.bot, 1).await; // greeting
    alice.send_text(&group, "help").await; // no prefix outside the DM: ignored
    alice.send_text(&group, "!handoff help").await;
    let replies = alice.wait_for_messages(&group, &h.bot, 2).await;
    assert!(body(&replies[1]).contains("• help — "), "{}", replies[1]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(alice.messages_from(&group, &h.bot).await.len(), 2, "exactly one reply, to the prefixed command");

    // A user the config refuses: the bot rejects the invite and says why.
    let mallory = h.user("mallory").await;
    let room = mallory.create_dm(&h.bot).await;
    let member = eventually("the bot to reject mallory's invite", || async {
        let m = mallory.membership_of(&room, &h.bot).await;
        (m["membership"] == "leave").then_some(m)
    })
    .await;
    let reason = member["reason"].as_str().unwrap_or("");
    assert!(reason.contains("@mallory:localhost may not use handoff"), "{member}");
    assert!(mallory.messages_from(&room, &h.bot).await.is_empty());

    // No token ever reaches the log.
    let log = h.log();
    for key in ["appservice.as_token", "appservice.hs_token", "appservice.acting.as_token"] {
        assert!(!log.contains(&h.config_value(key)), "{key} leaked into the log");
    }
}

/// A transaction of one text event.
fn txn_body(room: &RoomId, sender: &UserId, event_id: &str, text: &str) -> Value {
    json!({ "events": [text_event(room, sender, event_id, text)] })
}

#[tokio::test]
async fn transaction_endpoint_checks_tokens_rejects_bad_bodies_and_handles_each_txn_once() {
    let mut h = Harness::start().await;
    let hs_token = h.config_value("appservice.hs_token");
    let http = reqwest::Client::new();
    let base = h.handoff_url.clone();
    let url = |path: &str| format!("{base}{path}");
    let errcode = |v: Value| v["errcode"].as_str().unwrap_or("").to_owned();

    // Authentication: missing → 401 M_UNAUTHORIZED, wrong → 403 M_FORBIDDEN (header or query).
    let empty = json!({"events": []});
    let r = http.put(url("/_matrix/app/v1/transactions/a1")).json(&empty).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(errcode(r.json().await.unwrap()), "M_UNAUTHORIZED");
    let r =
        http.put(url("/_matrix/app/v1/transactions/a1")).bearer_auth("wrong-token").json(&empty).send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(errcode(r.json().await.unwrap()), "M_FORBIDDEN");
    let r = http.put(url("/_matrix/app/v1/transactions/a1?access_token=wrong")).json(&empty).send().await.unwrap();
    assert_eq!(r.status(), 403);
    // The right token but for its last character.
    let last = if hs_token.ends_with('x') { 'y' } else { 'x' };
    let almost = format!("{}{last}", &hs_token[..hs_token.len() - 1]);
    let r = http.put(url("/_matrix/app/v1/transactions/a1")).bearer_auth(almost).json(&empty).send().await.unwrap();
    assert_eq!(r.status(), 403);
    // The legacy query parameter with the right token is accepted.
    let r = http
        .put(url(&format!("/_matrix/app/v1/transactions/a2?access_token={hs_token}")))
        .json(&empty)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Bad bodies: not JSON, JSON of the wrong shape, too large; unknown endpoints.
    let put = |id: &str| http.put(url(&format!("/_matrix/app/v1/transactions/{id}"))).bearer_auth(&hs_token);
    let r = put("b1").body("{not json").send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(errcode(r.json().await.unwrap()), "M_NOT_JSON");
    let r = put("b2").json(&json!({"events": "nope"})).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(errcode(r.json().await.unwrap()), "M_BAD_JSON");
    // On a connection of its own: the server answers before reading it all, then closes it.
    let r = reqwest::Client::new()
        .put(url("/_matrix/app/v1/transactions/b3"))
        .bearer_auth(&hs_token)
        .body(vec![b' '; 17 << 20])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(errcode(r.json().await.unwrap()), "M_TOO_LARGE");
    let r = http.get(url("/_matrix/app/v1/nothing")).bearer_auth(&hs_token).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(errcode(r.json().await.unwrap()), "M_UNRECOGNIZED");

    // The user query knows the bot and nobody else; ping answers with the right token only.
    let r = http.get(url("/_matrix/app/v1/users/@handoff:localhost")).bearer_auth(&hs_token).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = http.get(url("/_matrix/app/v1/users/@someone:localhost")).bearer_auth(&hs_token).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let r = http.post(url("/_matrix/app/v1/ping")).bearer_auth(&hs_token).json(&json!({})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = http.post(url("/_matrix/app/v1/ping")).json(&json!({})).send().await.unwrap();
    assert_eq!(r.status(), 401);

    // After all that the service still serves: health and a real conversation.
    let r = http.get(url("/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let alice = h.user("alice").await;
    let dm = h.dm_with_bot(&alice).await;

    // A transaction handled once: the same txn ID again, even carrying another command, does nothing.
    let help_replies = |msgs: &[Value]| msgs.iter().filter(|m| body(m).contains("• help — ")).count();
    let first = txn_body(&dm, &alice.id, "$replay-1", "help");
    let r = put("replay").json(&first).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let msgs = alice.wait_for_messages(&dm, &h.bot, 2).await;
    assert_eq!(help_replies(&msgs), 2, "the greeting and one reply");
    let r = put("replay").json(&first).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let other = txn_body(&dm, &alice.id, "$replay-2", "hepl");
    let r = put("replay").json(&other).send().await.unwrap();
    assert_eq!(r.status(), 200);

    // The record is durable: after a restart the replay is still recognised.
    let status = h.signal_handoff("TERM");
    assert!(status.success(), "SIGTERM stops cleanly: {status}\n{}", h.log());
    assert!(h.log().contains("stopped cleanly"));
    h.start_handoff().await;
    let r = put("replay").json(&other).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // A new transaction is handled: its reply arrives, and only then do we count.
    let fresh = txn_body(&dm, &alice.id, "$fresh-1", "hepl");
    assert_eq!(put("fresh").json(&fresh).send().await.unwrap().status(), 200);
    let msgs = alice.wait_for_messages(&dm, &h.bot, 3).await;
    assert_eq!(msgs.len(), 3, "greeting, one help reply, one reply to the fresh txn: {msgs:#?}");
    assert!(body(&msgs[2]).contains("Did you mean `help`"));
}

#[tokio::test]
async fn startup_failures_say_what_to_fix() {
    let mut h = Harness::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bridge-config.yaml");
    let original = std::fs::read_to_string(&h.sandbox.config_path).unwrap();
    let set = |from: &str, to: &str| {
        let text = edit(original.clone(), from, to);
        let text = edit(text, "path: handoff.db", &format!("path: {}", dir.path().join("db").display()));
        std::fs::write(&config, text).unwrap();
    };
    let serve = || run_handoff(&["serve", "-c", config.to_str().unwrap()], dir.path());

    // The homeserver is not where the config says.
    let dead = handoff::sandbox::free_port();
    set(&h.synapse().url, &format!("http://127.0.0.1:{dead}"));
    let (status, err) = serve();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("cannot reach the homeserver"), "{err}");
    assert!(err.contains("check homeserver.address"), "{err}");

    // Tokens the homeserver never loaded.
    let as_token = h.config_value("appservice.as_token");
    set(&as_token, "a-token-the-homeserver-does-not-know");
    let (status, err) = serve();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("does not know appservice.as_token"), "{err}");
    assert!(err.contains("app_service_config_files"), "{err}");

    // The homeserver calls back (on the registered address) with an hs_token handoff doesn't expect.
    assert!(h.signal_handoff("TERM").success());
    let hs_token = h.config_value("appservice.hs_token");
    set(&hs_token, "another-hs-token");
    let (status, err) = serve();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("ping to the homeserver failed"), "{err}");
    assert!(err.contains("appservice.hs_token differs"), "{err}");

    // Placeholder tokens: a config problem, refused before anything starts.
    set(&as_token, "generate");
    let (status, err) = serve();
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("appservice.as_token is still \"generate\""), "{err}");
    assert!(err.contains("generate-registration"), "{err}");
}

#[test]
fn bad_config_gives_the_documented_message() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bridge-config.yaml");
    let example = include_str!("../bridge-config.yaml");
    let cases = [
        ("port: 29340", "port: abc", "appservice.port: expected a port number 1-65535, found \"abc\""),
        ("    concurrency: 16", "    concurrency: 16\n    concurency: 2", "unknown key handoff.concurency"),
        ("format: pretty", "format: xml", "logging.format: unknown variant `xml`"),
    ];
    for (from, to, expected) in cases {
        std::fs::write(&config, edit(example.to_owned(), from, to)).unwrap();
        let (status, err) = run_handoff(&["serve", "-c", config.to_str().unwrap()], dir.path());
        assert_eq!(status.code(), Some(2), "{err}");
        assert!(err.contains(expected), "expected {expected:?} in {err:?}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
    }
    let (status, err) = run_handoff(&["serve", "-c", "does-not-exist.yaml"], dir.path());
    assert_eq!(status.code(), Some(2));
    assert!(err.contains("cannot read config does-not-exist.yaml"), "{err}");
}

#[test]
fn generate_registration_fills_tokens_and_keeps_comments() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bridge-config.yaml");
    let example = edit(include_str!("../bridge-config.yaml").to_owned(), "example.org", "my.example");
    std::fs::write(&config, &example).unwrap();
    let (status, err) = run_handoff(&["generate-registration", "-c", "bridge-config.yaml"], dir.path());
    assert!(status.success(), "{err}");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(!text.contains("as_token: generate"));
    assert!(!text.contains("hs_token: generate"));
    let comments = |t: &str| t.lines().filter(|l| l.trim_start().starts_with('#')).count();
    assert_eq!(comments(&text), comments(&example));
    let main: Value =
        serde_norway::from_str(&std::fs::read_to_string(dir.path().join("handoff-registration.yaml")).unwrap())
            .unwrap();
    let acting: Value =
        serde_norway::from_str(&std::fs::read_to_string(dir.path().join("handoff-acting-registration.yaml")).unwrap())
            .unwrap();
    let cfg: Value = serde_norway::from_str(&text).unwrap();
    assert_eq!(main["as_token"], cfg["appservice"]["as_token"]);
    assert_eq!(main["hs_token"], cfg["appservice"]["hs_token"]);
    assert_eq!(acting["as_token"], cfg["appservice"]["acting"]["as_token"]);
    assert_eq!(main["as_token"].as_str().unwrap().len(), 64);
    assert_ne!(main["as_token"], acting["as_token"]);
    assert_eq!(acting["url"], Value::Null);
    assert_eq!(main["namespaces"]["users"][0]["regex"], "@handoff(-appservice)?:my\\.example$");
    // The bot is not the registration's sender: Synapse lets no sender `/sync`, and the bot's
    // device must.
    assert_eq!(main["sender_localpart"], "handoff-appservice");
    assert_eq!(acting["namespaces"]["users"][0]["regex"], "@.*:my\\.example$");
    assert_eq!(acting["namespaces"]["users"][0]["exclusive"], false);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("handoff-registration.yaml")).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "registration readable by others: {mode:o}");
    // Running it again keeps the tokens.
    let (status, _) = run_handoff(&["generate-registration", "-c", "bridge-config.yaml"], dir.path());
    assert!(status.success());
    assert_eq!(std::fs::read_to_string(&config).unwrap(), text);
}

#[tokio::test]
async fn events_acknowledged_before_a_crash_are_handled_after_the_restart() {
    let mut h = Harness::start().await;
    let hs_token = h.config_value("appservice.hs_token");
    let alice = h.user("alice").await;
    let dm = h.dm_with_bot(&alice).await;
    let before = alice.messages_from(&dm, &h.bot).await.len();
    // The homeserver's transaction is acknowledged, and handoff is killed at once.
    let txn = txn_body(&dm, &alice.id, "$before-crash", "help");
    let r = reqwest::Client::new()
        .put(format!("{}/_matrix/app/v1/transactions/crash-1", h.handoff_url))
        .bearer_auth(&hs_token)
        .json(&txn)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(!h.signal_handoff("KILL").success());
    h.start_handoff().await;
    let msgs = alice.wait_for_messages(&dm, &h.bot, before + 1).await;
    assert!(body(&msgs[before]).contains("• help — "), "{:#?}", msgs[before]);
    // The acknowledged event was kept through the crash and handled after it; had its answer gone
    // out just before the kill, the replayed answer carries the same transaction ID: still one.
    assert!(h.log().contains("handling events accepted before the last stop"), "replayed from the inbox");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(alice.messages_from(&dm, &h.bot).await.len(), before + 1, "one answer, not two");
}
