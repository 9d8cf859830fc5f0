//! handoff with its store on PostgreSQL (`database.type: postgres`), against a real Synapse and
//! a PostgreSQL started by the test: a move, a restart that finds it there, what the tables hold.

mod common;

use common::{Harness, User, edit, eventually, export, memberships, move_notices, with_concurrency};
use handoff::sandbox::postgres::Postgres;
use ruma::OwnedRoomId;

/// The database section of the example config, and the same pointed at PostgreSQL's `uri`.
const SLED: &str = "database:\n    path: handoff.db";
fn on_postgres(uri: &str) -> String {
    format!("database:\n    type: postgres\n    path: handoff.db\n    uri: {uri}")
}

/// alice's 20 rooms on their way to bob (`import` sent), 3 of them joined already.
async fn move_under_way(h: &Harness) -> (User, User, Vec<OwnedRoomId>, OwnedRoomId) {
    let (alice, bob) = (h.user("alice").await, h.user("bob").await);
    let rooms = alice.create_rooms(20).await;
    let (adm, bdm) = (h.dm_with_bot(&alice).await, h.dm_with_bot(&bob).await);
    let code = export(h, &alice, &adm, "--to @bob:localhost").await;
    bob.send_text(&bdm, &format!("import {code}")).await;
    eventually("3 rooms joined", || async { (joined(&alice, &bob, &rooms).await >= 3).then_some(()) }).await;
    (alice, bob, rooms, bdm)
}

async fn joined(old: &User, new: &User, rooms: &[OwnedRoomId]) -> usize {
    let mut n = 0;
    for room in rooms {
        n += usize::from(memberships(&old.timeline(room).await, &new.id).last().map(String::as_str) == Some("join"));
    }
    n
}

#[tokio::test]
async fn a_move_with_the_store_on_postgresql_is_kept_there_across_a_restart() {
    let pg_dir = tempfile::tempdir().unwrap();
    let pg = Postgres::start(&pg_dir.path().join("pg")).await.unwrap();
    let uri = pg.create_database("handoff").await.unwrap();
    let mut h = Harness::start_with(|c| {
        edit(
            c,
            "database:\n    path: handoff.db",
            &format!("database:\n    type: postgres\n    path: handoff.db\n    uri: {uri}"),
        )
    })
    .await;
    let (alice, bob) = (h.user("alice").await, h.user("bob").await);
    let rooms = alice.create_rooms(6).await;
    let (adm, bdm) = (h.dm_with_bot(&alice).await, h.dm_with_bot(&bob).await);
    let code = export(&h, &alice, &adm, "--to @bob:localhost").await;
    let report = h.ask(&bob, &bdm, &format!("import {code}"), "rooms moved to @bob:localhost").await;
    assert!(report.starts_with("6 of 6 rooms moved"), "{report}");
    let joined = bob.send(ruma::api::client::membership::joined_rooms::v3::Request::new()).await.joined_rooms;
    assert!(rooms.iter().all(|r| joined.contains(r)), "bob is in every room");

    // Everything is PostgreSQL's: no sled folder was made, the tables hold the transfer and a
    // journal entry per room, and a restarted service reads its record from there.
    assert!(!h.sandbox.dir.join("handoff.db").exists(), "a sled database was made");
    let (client, connection) = tokio_postgres::connect(&uri, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let count = |table: &'static str| {
        let client = &client;
        async move { client.query_one(&format!("SELECT count(*) FROM {table}"), &[]).await.unwrap().get::<_, i64>(0) }
    };
    assert_eq!(count("handoff_transfers").await, 1);
    assert_eq!(count("handoff_journal").await, 6);
    assert_eq!(count("handoff_bundles").await, 1);
    h.signal_handoff("KILL");
    h.start_handoff().await;
    let status = h.ask(&bob, &bdm, "status", "Transfer").await;
    assert!(status.contains("@alice:localhost → @bob:localhost: done"), "{status}");
    assert!(status.contains("6 moved"), "{status}");
}

/// An install moved from sled into PostgreSQL in the middle of a move (`handoff copy-store`,
/// after a SIGKILL): `serve` on PostgreSQL resumes the move, and every room gets one invite, one
/// join and one move notice.
#[tokio::test]
async fn a_store_copied_into_postgresql_mid_transfer_resumes_it_once() {
    let pg_dir = tempfile::tempdir().unwrap();
    let pg = Postgres::start(&pg_dir.path().join("pg")).await.unwrap();
    let uri = pg.create_database("handoff").await.unwrap();
    // One room at a time, so the kill lands mid-transfer.
    let mut h = Harness::start_with(|c| with_concurrency(c, 1)).await;
    let (alice, bob, rooms, bdm) = move_under_way(&h).await;
    assert!(!h.signal_handoff("KILL").success());
    let before = joined(&alice, &bob, &rooms).await;
    assert!(before < rooms.len(), "the kill landed before the end");

    let config = std::fs::read_to_string(&h.sandbox.config_path).unwrap();
    std::fs::write(&h.sandbox.config_path, edit(config, SLED, &on_postgres(&uri))).unwrap();
    let out = std::process::Command::new(common::HANDOFF)
        .args(["copy-store", "-c"])
        .arg(&h.sandbox.config_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("transfers: 1") && stdout.contains("Copied"), "{stdout}");

    h.start_handoff().await;
    let report = h.bot_says(&bob, &bdm, 0, "the report", |b| b.contains("rooms moved to")).await;
    assert!(report.starts_with("20 of 20 rooms moved"), "{report}");
    assert_eq!(h.log().matches("resuming transfer").count(), 1, "resumed from PostgreSQL");
    for room in &rooms {
        let timeline = alice.timeline(room).await;
        assert_eq!(memberships(&timeline, &bob.id), ["invite", "join"], "{room}");
        assert_eq!(move_notices(&timeline).len(), 1, "{room}: move notices");
    }
}

/// A second `handoff serve` that dies with the test.
struct Standby(std::process::Child);

impl Drop for Standby {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Two `handoff serve` on one PostgreSQL, on the same config: the second stands by (it listens on
/// the same port beside the leader, and takes the transactions the kernel gives it into the
/// shared inbox) while the first leads. The leader killed (SIGKILL) in the middle of a move, the
/// standby takes the lead within seconds and finishes the move: every room one invite, one join,
/// one move notice, and one report.
#[tokio::test]
async fn a_standby_takes_over_a_move_when_the_leader_is_killed() {
    let pg_dir = tempfile::tempdir().unwrap();
    let pg = Postgres::start(&pg_dir.path().join("pg")).await.unwrap();
    let uri = pg.create_database("handoff").await.unwrap();
    // One room at a time, so the kill lands mid-transfer.
    let mut h = Harness::start_with(|c| edit(with_concurrency(c, 1), SLED, &on_postgres(&uri))).await;
    let standby_log = h.sandbox.dir.join("standby.log");
    let log = std::fs::File::create(&standby_log).unwrap();
    let _standby = Standby(
        std::process::Command::new(common::HANDOFF)
            .args(["serve", "-c"])
            .arg(&h.sandbox.config_path)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let said = |what: &'static str| {
        let path = standby_log.clone();
        async move { std::fs::read_to_string(&path).unwrap_or_default().contains(what).then_some(()) }
    };
    eventually("the second instance to stand by", || said("taking transactions as a standby")).await;

    let (alice, bob, rooms, bdm) = move_under_way(&h).await;
    assert!(!std::fs::read_to_string(&standby_log).unwrap().contains("leading the database"));
    assert!(!h.signal_handoff("KILL").success());
    let killed = std::time::Instant::now();
    assert!(joined(&alice, &bob, &rooms).await < rooms.len(), "the kill landed before the end");

    eventually("the standby to lead", || said("leading the database")).await;
    println!("the standby led {:.1?} after the kill", killed.elapsed());
    let report = h.bot_says(&bob, &bdm, 0, "the report", |b| b.contains("rooms moved to")).await;
    assert!(report.starts_with("20 of 20 rooms moved"), "{report}");
    for room in &rooms {
        let timeline = alice.timeline(room).await;
        assert_eq!(memberships(&timeline, &bob.id), ["invite", "join"], "{room}");
        assert_eq!(move_notices(&timeline).len(), 1, "{room}: move notices");
    }
    let reports =
        bob.messages_from(&bdm, &h.bot).await.iter().filter(|m| common::body(m).contains("rooms moved to")).count();
    assert_eq!(reports, 1, "one report");
}

/// A standby takes the homeserver's transactions too (behind one address, either instance may
/// get one): what it takes goes into the shared inbox, where the leader finds it and answers.
/// Here the standby listens on a port of its own, so the transaction goes to it alone; its
/// `/health` says it stands by, the leader's that it leads.
#[tokio::test]
async fn a_command_taken_by_the_standby_is_answered_by_the_leader() {
    let pg_dir = tempfile::tempdir().unwrap();
    let pg = Postgres::start(&pg_dir.path().join("pg")).await.unwrap();
    let uri = pg.create_database("handoff").await.unwrap();
    let h = Harness::start_with(|c| edit(c, SLED, &on_postgres(&uri))).await;
    let http = reqwest::Client::new();
    let role = |url: String| {
        let http = http.clone();
        async move {
            let health: serde_json::Value = http.get(format!("{url}/health")).send().await.ok()?.json().await.ok()?;
            health["role"].as_str().map(str::to_owned)
        }
    };
    // It answers `/health` before it has taken the lead (a moment, longer on a loaded machine):
    // the second one starts once it leads.
    eventually("the first to lead", || async { role(h.handoff_url.clone()).await.filter(|r| r == "leader") }).await;
    let port = handoff::sandbox::free_port();
    let config = std::fs::read_to_string(&h.sandbox.config_path).unwrap();
    let config = edit(config, &format!("port: {}", h.sandbox.handoff_port), &format!("port: {port}"));
    let standby_config = h.sandbox.dir.join("standby.yaml");
    std::fs::write(&standby_config, config).unwrap();
    let standby_log = h.sandbox.dir.join("standby.log");
    let log = std::fs::File::create(&standby_log).unwrap();
    let _standby = Standby(
        std::process::Command::new(common::HANDOFF)
            .args(["serve", "-c"])
            .arg(&standby_config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let standby = format!("http://127.0.0.1:{port}");
    eventually("the standby's /health", || async { role(standby.clone()).await.filter(|r| r == "standby") }).await;
    assert_eq!(role(h.handoff_url.clone()).await.as_deref(), Some("leader"));

    let bob = h.user("bob").await;
    let bdm = h.dm_with_bot(&bob).await;
    let before = bob.messages_from(&bdm, &h.bot).await.len();
    // What the homeserver would push: bob's `status` in his DM, in a transaction to the standby.
    let event = serde_json::json!({
        "type": "m.room.message",
        "room_id": bdm,
        "sender": bob.id,
        "event_id": "$taken-by-the-standby",
        "origin_server_ts": handoff::store::now_ms(),
        "content": {"msgtype": "m.text", "body": "status"},
    });
    let sent = http
        .put(format!("{standby}/_matrix/app/v1/transactions/standby-1"))
        .bearer_auth(h.config_value("appservice.hs_token"))
        .json(&serde_json::json!({"events": [event]}))
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 200, "{}", sent.text().await.unwrap());
    let reply = h.bot_says(&bob, &bdm, before, "the leader's answer", |_| true).await;
    println!("the leader answered: {reply}");
    let log = std::fs::read_to_string(&standby_log).unwrap();
    assert!(!log.contains("leading the database"), "the standby stood by");
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(bob.messages_from(&bdm, &h.bot).await.len(), before + 1, "answered once");
}

/// A leader that stops answering without dying (`SIGSTOP`: a frozen VM, a process swapped out)
/// while its lock session is ended by the database: the standby takes the lead and finishes the
/// move; the old leader, woken up (`SIGCONT`) with work in hand, writes nothing (the epoch
/// refuses it), learns it lost the lead and exits; every room one invite, one join, one notice,
/// and one report.
#[tokio::test]
async fn a_stale_leader_woken_up_writes_nothing_and_stops() {
    let pg_dir = tempfile::tempdir().unwrap();
    let pg = Postgres::start(&pg_dir.path().join("pg")).await.unwrap();
    let uri = pg.create_database("handoff").await.unwrap();
    let mut h = Harness::start_with(|c| edit(with_concurrency(c, 1), SLED, &on_postgres(&uri))).await;
    let standby_log = h.sandbox.dir.join("standby.log");
    let log = std::fs::File::create(&standby_log).unwrap();
    let _standby = Standby(
        std::process::Command::new(common::HANDOFF)
            .args(["serve", "-c"])
            .arg(&h.sandbox.config_path)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let said = |what: &'static str| {
        let path = standby_log.clone();
        async move { std::fs::read_to_string(&path).unwrap_or_default().contains(what).then_some(()) }
    };
    eventually("the second instance to stand by", || said("taking transactions as a standby")).await;

    let (alice, bob, rooms, bdm) = move_under_way(&h).await;
    let leader = h.handoff.take().expect("the leader runs");
    let signal = |name: &str, pid: u32| {
        assert!(
            std::process::Command::new("kill").arg(format!("-{name}")).arg(pid.to_string()).status().unwrap().success()
        )
    };
    let pid = leader.id();
    signal("STOP", pid);
    // The database ends the frozen leader's lock session (as it would once its keepalives fail).
    let (admin, connection) = tokio_postgres::connect(&uri, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let ended = admin
        .query("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted", &[])
        .await
        .unwrap();
    assert_eq!(ended.len(), 1, "one session holds the lead");
    eventually("the standby to lead", || said("leading the database")).await;
    assert!(joined(&alice, &bob, &rooms).await < rooms.len(), "the old leader froze before the end");

    signal("CONT", pid);
    let leader = std::sync::Mutex::new(leader);
    let stopped = eventually("the old leader to stop", || async { leader.lock().unwrap().try_wait().unwrap() }).await;
    assert!(!stopped.success(), "it stops as a leader that lost its lead does");
    assert!(h.log().contains("lost the lead of the database"), "and says why");

    let report = h.bot_says(&bob, &bdm, 0, "the report", |b| b.contains("rooms moved to")).await;
    assert!(report.starts_with("20 of 20 rooms moved"), "{report}");
    for room in &rooms {
        let timeline = alice.timeline(room).await;
        assert_eq!(memberships(&timeline, &bob.id), ["invite", "join"], "{room}");
        assert_eq!(move_notices(&timeline).len(), 1, "{room}: move notices");
    }
    let reports =
        bob.messages_from(&bdm, &h.bot).await.iter().filter(|m| common::body(m).contains("rooms moved to")).count();
    assert_eq!(reports, 1, "one report");
}
