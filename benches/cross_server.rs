//! A move to an account on another homeserver, on two Synapses that federate over TLS on
//! loopback (the test bed of `tests/federation.rs`), against a baseline from the same run:
//!
//! - handoff: `export --to @new:B --file` on A (A's handoff reserves the seats: the old account
//!   invites the new one into every room), then the file dropped into the new account's DM with B's
//!   bot and `import CODE` there (B's handoff joins each room through its servers, applies tags,
//!   DMs and settings, posts the notices); timed from the export to B's report, and in its parts;
//! - baseline: the same invites and joins sent directly (the old account's and a second new
//!   account's own tokens, 16 in flight), from one server to the other, for the same rooms.
//!
//! The old account has N rooms on A: 10 favourites, 3 DMs, the rest group rooms.
//! Run: `cargo bench --bench cross_server` (N = 500; `HANDOFF_BENCH_ROOMS=100` for a quicker run).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::federation::{FederatedHarness, drop_file};
use common::{User, edit, export_file};
use futures_util::stream::{self, StreamExt};
use handoff::sandbox::{RateLimit, Side, lifted};
use ruma::api::client::membership::{invite_user, join_room_by_id_or_alias, joined_rooms};
use ruma::{OwnedRoomId, ServerName};

const IN_FLIGHT: usize = 16;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(run());
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// The old account invites `new` into every room, which joins it through `via`, 16 in flight.
async fn direct(old: &User, new: &User, rooms: &[OwnedRoomId], via: &ServerName) -> Duration {
    let start = Instant::now();
    stream::iter(rooms)
        .map(|room| async move {
            let who = invite_user::v3::InviteUserId::new(new.id.clone()).into();
            old.send(invite_user::v3::Request::new(room.clone(), who)).await;
            let mut join = join_room_by_id_or_alias::v3::Request::new(room.clone().into());
            join.via = vec![via.to_owned()];
            new.send(join).await;
        })
        .buffer_unordered(IN_FLIGHT)
        .count()
        .await;
    start.elapsed()
}

async fn run() {
    let n: usize = std::env::var("HANDOFF_BENCH_ROOMS").ok().and_then(|v| v.parse().ok()).unwrap_or(500);
    let quiet = |_, _: &_, c: String| edit(c, "level: \"info,handoff=debug\"", "level: warn");
    // Every rate limit lifted on both sides: the benchmark measures the move's throughput, which
    // B's limit on invites one user receives (5, then one each 333 s) would set alone.
    let mut fh = FederatedHarness::start_with(quiet, &lifted(RateLimit::ALL)).await;
    for side in [Side::A, Side::B] {
        let h = fh.side_mut(side);
        h.patience = Duration::from_secs(1800);
        h.poll = Duration::from_millis(500);
    }
    let name_a = fh.server_name(Side::A);
    println!("a {n}-room move from {name_a} to {}:", fh.server_name(Side::B));
    let old = fh.a.old_account("old", n, 10, 3).await;

    let baseline_new = fh.b.user("direct").await;
    let baseline = direct(&old.user, &baseline_new, &old.rooms, &name_a).await;
    let joined = baseline_new.send(joined_rooms::v3::Request::new()).await.joined_rooms;
    assert!(old.rooms.iter().all(|r| joined.contains(r)), "the baseline left rooms behind");

    let new = fh.b.user("new").await;
    let start = Instant::now();
    let (code, file) = export_file(&fh.a, &old.user, &old.dm, &format!("--to {}", new.id)).await;
    let exported = start.elapsed();
    let reserved =
        fh.a.bot_says(&old.user, &old.dm, 0, "the reservation's report", |b| b.contains("reserved for")).await;
    let reserve = start.elapsed();
    assert!(reserved.starts_with(&format!("{n} of {n} rooms reserved")), "{reserved}");
    let dm = fh.b.dm_with_bot(&new).await;
    drop_file(&fh.b, &new, &dm, &file).await;
    let imported = Instant::now();
    let before = new.messages_from(&dm, &fh.b.bot).await.len();
    new.send_text(&dm, &format!("import {code}")).await;
    let report = fh.b.bot_says(&new, &dm, before, "the report", |b| b.contains("rooms moved to")).await;
    let import = imported.elapsed();
    // The service's own work: what the person does between (a DM, a file dropped) left out.
    let total = reserve + import;
    assert!(report.starts_with(&format!("{n} of {n} rooms moved")), "{report}");

    println!("  invites and joins sent directly (baseline)   {}", secs(baseline));
    println!("  export --to --file on A (capture)            {}", secs(exported));
    println!("  … and every seat reserved from A             {}", secs(reserve));
    println!("  import CODE on B, to its report              {}", secs(import));
    println!(
        "  handoff's move (reservation + import)        {}  = {:.2}× the baseline",
        secs(total),
        total.as_secs_f64() / baseline.as_secs_f64()
    );
}
