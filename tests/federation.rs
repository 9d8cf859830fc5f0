//! The two-homeserver test bed: two Synapses federating over TLS on loopback, each with its own
//! handoff. Moves to an account on another homeserver are tested on it.

mod common;

use std::time::{Duration, Instant};

use common::eventually_within;
use common::federation::{FederatedHarness, health};
use handoff::sandbox::Side;

/// How long B may take, once back, to receive what A sent while it was down. The retries of the
/// federation config make it a second or two.
const CATCH_UP: Duration = Duration::from_secs(20);

#[tokio::test]
async fn two_homeservers_federate_and_catch_up_after_an_outage() {
    let started = Instant::now();
    let mut fh = FederatedHarness::start().await;
    println!("both homeservers and handoffs up in {:.1?}", started.elapsed());
    let (name_a, name_b) = (fh.server_name(Side::A), fh.server_name(Side::B));
    assert_ne!(name_a, name_b);
    for side in [Side::A, Side::B] {
        assert_eq!(health(fh.side(side)).await, 200, "{side:?}'s handoff /health");
    }

    let alice = fh.a.user("alice").await;
    let bob = fh.b.user("bob").await;
    assert_eq!(alice.id.server_name(), name_a);
    assert_eq!(bob.id.server_name(), name_b);

    // Each bot is its own server's, and answers its own server's user.
    let asked = Instant::now();
    for (h, user) in [(&fh.a, &alice), (&fh.b, &bob)] {
        assert_eq!(h.bot.as_str(), format!("@handoff:{}", user.id.server_name()));
        let dm = h.dm_with_bot(user).await;
        h.ask(user, &dm, "help", "• help — ").await;
    }
    println!("both bots answered `help` in {:.1?}", asked.elapsed());

    let federated = Instant::now();
    let room = alice.create_room("across servers").await;
    alice.invite(&room, &bob.id).await;
    bob.join_via(&room, &[&name_a]).await;
    println!("invite from A and join from B in {:.1?}", federated.elapsed());
    let sent = Instant::now();
    alice.send_text(&room, "hello from A").await;
    bob.wait_for_messages(&room, &alice.id, 1).await;
    println!("A -> B message in {:.1?}", sent.elapsed());
    let sent = Instant::now();
    bob.send_text(&room, "hello from B").await;
    alice.wait_for_messages(&room, &bob.id, 1).await;
    println!("B -> A message in {:.1?}", sent.elapsed());

    // B's outage: what alice sends meanwhile reaches bob once B is back.
    fh.b.sandbox.synapse.stop();
    alice.send_text(&room, "while B was down").await;
    tokio::time::sleep(Duration::from_secs(1)).await; // A's first attempts fail: a real outage
    let restart = Instant::now();
    fh.b.sandbox.synapse.restart().await.expect("B restarts");
    let back = Instant::now();
    println!("B restarted in {:.1?}", back - restart);
    let bodies = eventually_within("the message sent while B was down, on B", CATCH_UP, || async {
        let bodies = bob.try_bodies_from(&room, &alice.id).await?;
        bodies.iter().any(|b| b == "while B was down").then_some(bodies)
    })
    .await;
    println!("B caught up {:.1?} after it was back", back.elapsed());
    assert_eq!(bodies, ["hello from A", "while B was down"]);
    println!("whole test: {:.1?}", started.elapsed());
}
