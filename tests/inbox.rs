//! The inbox across deaths of the service, against a real Synapse: an event that was in hand each
//! time the service died is answered, not run again; one that was in hand once runs again.
//!
//! Nothing here makes a command kill the process (production code has no hook for it): the
//! service is killed, and the store is left as three deaths with an event in hand leave it, through
//! the store's own calls (the event accepted, an attempt counted before each handling).
//! `store::tests::an_attempt_counted_before_a_kill_9_is_still_counted` kills a process for real.

mod common;

use common::{Harness, body, eventually, text_event};
use handoff::config::Config;
use handoff::store::Store;
use serde_json::Value;

fn helps(msgs: &[Value]) -> usize {
    msgs.iter().filter(|m| body(m).contains("• help — ")).count()
}

#[tokio::test]
async fn an_event_in_hand_at_three_deaths_is_answered_not_run_and_one_in_hand_once_runs_again() {
    let mut h = Harness::start().await;
    let alice = h.user("alice").await;
    let dm = h.dm_with_bot(&alice).await;
    let helps_before = helps(&alice.messages_from(&dm, &h.bot).await);

    h.signal_handoff("KILL");
    let code = handoff::code::TransferCode::generate().display();
    {
        let config = Config::load(&h.sandbox.config_path).unwrap();
        let store = Store::open(&config.database_path()).unwrap();
        // Never pushed by Synapse (their IDs are made up): they reach the bot from the inbox only.
        let deadly = text_event(&dm, &alice.id, "$deadly", &format!("import {code}"));
        let once = text_event(&dm, &alice.id, "$once", "help");
        let events = [deadly, once].map(|e| serde_json::to_vec(&e).unwrap());
        let numbers = store.accept_txn("before-the-deaths", &events).await.unwrap().unwrap();
        for _ in 0..3 {
            store.inbox_attempt(numbers[0]).await.unwrap();
        }
        store.inbox_attempt(numbers[1]).await.unwrap();
    }
    h.start_handoff().await;

    let said = h.bot_says_within(&alice, &dm, "stopped while handling that message", common::PATIENCE).await;
    assert!(said.contains("did not run it again"), "{said}");
    eventually("the help in hand at one death answered", || async {
        (helps(&alice.messages_from(&dm, &h.bot).await) == helps_before + 1).then_some(())
    })
    .await;
    // The import was not run: a made-up code would have been answered "no such transfer code".
    let msgs = alice.messages_from(&dm, &h.bot).await;
    assert!(!msgs.iter().any(|m| body(m).contains("no such transfer code")), "the import ran");

    let log = h.log();
    assert_eq!(log.matches("dropped without running it again").count(), 1, "one log line:\n{log}");
    assert!(log.contains("handling again an event that was in hand"), "{log}");
    assert!(!log.contains(&code), "the code in the log");

    // And at the next start, nothing of either is left to run.
    h.signal_handoff("TERM");
    h.start_handoff().await;
    h.ask(&alice, &dm, "help", "• help — ").await;
    let msgs = alice.messages_from(&dm, &h.bot).await;
    assert_eq!(helps(&msgs), helps_before + 2, "only the new help answered");
    assert_eq!(msgs.iter().filter(|m| body(m).contains("stopped while handling")).count(), 1);
}
