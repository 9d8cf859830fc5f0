//! handoff with its store on PostgreSQL (`database.type: postgres`), against a real Synapse and
//! a PostgreSQL started by the test: a move, a restart that finds it there, what the tables hold.

mod common;

use common::{Harness, edit, export};
use handoff::sandbox::postgres::Postgres;

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
