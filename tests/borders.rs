//! Borders on a real Synapse: a move to a server that takes connections and never answers. Its
//! rooms wait for that server without holding up anyone else's work, and `cancel` ends them at
//! once, the report naming the rooms not reached.

mod common;

use std::time::{Duration, Instant};

use common::{Harness, edit, export, with_concurrency};

/// Synapse federates out (the sandbox's single server otherwise refuses every other server), to
/// loopback too: Synapse's default blocklist without 127.0.0.0/8. Appended keys win over the
/// sandbox's own (YAML's last key).
const FEDERATES_TO_LOOPBACK: &str = "federation_domain_whitelist: null\nip_range_blacklist: [\"10.0.0.0/8\", \"172.16.0.0/12\", \"192.168.0.0/16\", \"100.64.0.0/10\", \"169.254.0.0/16\", \"::1/128\", \"fe80::/10\", \"fc00::/7\"]\n";

/// A TCP listener that accepts every connection and never says a word; its connections are
/// kept open for as long as the test runs.
async fn silent_server() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    port
}

#[tokio::test]
async fn a_server_that_never_answers_holds_up_no_one_and_cancel_ends_its_rooms_at_once() {
    // Few slots, more rooms than slots: a room that held its slot while it waited would leave
    // none for anyone. The patience outlasts the test: only the cancel ends the wait.
    let h = Harness::start_with_homeserver(
        |c| edit(with_concurrency(c, 3), "federation_patience: 10m", "federation_patience: 5m"),
        FEDERATES_TO_LOOPBACK,
    )
    .await;
    let port = silent_server().await;
    let (alice, bob) = (h.user("alice").await, h.user("bob").await);
    let rooms = alice.create_rooms(8).await;
    bob.create_rooms(3).await;
    let (adm, bdm) = (h.dm_with_bot(&alice).await, h.dm_with_bot(&bob).await);

    // alice reserves her seats for an account of the silent server: every invite waits for it.
    let hostile = format!("@x:127.0.0.1:{port}");
    export(&h, &alice, &adm, &format!("--to {hostile}")).await;
    // Its rooms are in flight (past the moment a request holds its slot).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let status = h.ask(&alice, &adm, "status", "Transfer").await;
    assert!(status.contains("running"), "{status}");

    // Meanwhile bob's export is answered as if alice's did not exist.
    let (took, _) = h.ask_timed(&bob, &bdm, "export", "Your transfer code").await;
    println!("bob's export answered in {took:.1?} while alice's rooms wait");
    assert!(took < Duration::from_secs(10), "bob's export took {took:?}");

    // alice cancels: the waiting rooms end at once, and the report names them.
    let asked = Instant::now();
    h.ask(&alice, &adm, "cancel", "Stopping after the rooms in flight").await;
    let report = h.bot_says_within(&alice, &adm, "Cancelled.", Duration::from_secs(15)).await;
    let took = asked.elapsed();
    println!("cancel to report: {took:.1?}\n{report}");
    assert!(took < Duration::from_secs(10), "the cancel took {took:?}");
    assert!(report.starts_with(&format!("Cancelled. 0 of {} rooms reserved", rooms.len())), "{report}");
    let not_reached = report.matches("not reached").count();
    assert!(not_reached >= rooms.len(), "every room is named not reached: {report}");
    assert!(report.contains("waited for a server"), "the rooms that waited say so: {report}");
    let status = h.ask(&alice, &adm, "status", "Transfer").await;
    assert!(status.contains("cancelled"), "{status}");
    assert!(status.contains("not reached"), "{status}");
    assert!(!status.contains("in progress"), "{status}");
}
