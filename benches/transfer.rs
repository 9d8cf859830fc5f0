//! Benchmarks against a real Synapse on loopback, each figure next to a baseline from the same run:
//!
//! - capture: `export` of an account with N rooms, against the minimum requests a capture needs
//!   (joined rooms, one account-data sync, each room's state) sent directly at the best concurrency;
//! - transfer: `import` of N rooms at the default concurrency (16, in paired rounds with the
//!   ceiling on one homeserver, in alternating order, their ratios averaged), at 8 and at 1 (one room at a
//!   time, as today's migration tools do), against the homeserver's ceiling (the same invites and
//!   joins sent directly at the best concurrency), against the bound set by the four writes the
//!   engine must make per room (invite, join, power level, notice; each measured on its own), and
//!   against the same four writes sent directly; plus the service's own CPU time per room moved
//!   and its peak memory;
//! - first rooms first: for each `import`, the time from sending it to the new account's first
//!   favourite joined and to all of them joined (seen in the new account's joined rooms, polled),
//!   next to the time to every room joined. The project's target: the first favourite within 1 s,
//!   whatever the account's size.
//!
//! Every old account has N rooms: 10 favourites (`m.favourite`), 3 DMs with peers (in `m.direct`),
//! the rest group rooms; plus its DM with the bot.
//!
//! Run: `cargo bench --bench transfer` (N = 500, 4 paired rounds; `HANDOFF_BENCH_ROOMS=100` and
//! `HANDOFF_BENCH_ROUNDS=2` for a quicker run; `HANDOFF_BENCH_CRITERION_ONLY=1` for the paired rounds alone).
//!
//! On PostgreSQL: `HANDOFF_BENCH_SYNAPSE_DB=postgres` runs every Synapse of the bench on PostgreSQL
//! (one PostgreSQL 18 for the run, `handoff::sandbox::postgres`, a database per Synapse) instead of
//! SQLite. `HANDOFF_BENCH_STORE=both` measures handoff's own store instead: the same move of N rooms
//! with the store on sled and on PostgreSQL (the same server), each on a fresh homeserver with fresh
//! rooms, in `HANDOFF_BENCH_STORE_ROUNDS` (2) paired rounds alternating which goes first, and prints
//! the ratio PostgreSQL/sled (target: at most 1.10); the rest of the bench is then skipped.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{
    Harness, OldAccount, User, cpu_time, edit, export, join_stamp, metric, peak_rss_kib, raw, with_concurrency,
    with_metrics,
};
use futures_util::stream::{self, StreamExt};
use handoff::homeserver::Homeserver;
use handoff::sandbox::postgres::Postgres;
use handoff::sandbox::{Sandbox, SynapseDatabase, SynapseOptions};
use ruma::api::auth_scheme::{AuthScheme, SendAccessToken};
use ruma::api::client::filter::{FilterDefinition, RoomEventFilter, RoomFilter};
use ruma::api::client::membership::{invite_user, join_room_by_id, joined_rooms};
use ruma::api::client::message::send_message_event;
use ruma::api::client::state::{get_state_event_for_key, get_state_events, send_state_event};
use ruma::api::client::sync::sync_events;
use ruma::events::StateEventType;
use ruma::events::room::message::RoomMessageEventContent;
use ruma::{OwnedRoomId, RoomId, UserId};

/// Favourites among each old account's rooms.
const FAVOURITES: usize = 10;
/// DMs with peers among each old account's rooms.
const DMS: usize = 3;
/// How long the bench waits for the bot: a transfer of hundreds of rooms takes minutes.
const PATIENCE: Duration = Duration::from_secs(900);
/// How often it looks for the bot's answer. Not more often: each look is a request the homeserver
/// serves instead of the transfer.
const POLL: Duration = Duration::from_millis(500);
/// What the project works towards: the first favourite joined this soon after `import`.
const FIRST_FAVOURITE_TARGET: Duration = Duration::from_secs(1);

/// handoff's store ratio target: PostgreSQL at most this much slower than sled for the same move.
const STORE_TARGET: f64 = 1.10;

/// The one PostgreSQL of the run, when Synapse or handoff's store is on PostgreSQL.
static POSTGRES: std::sync::OnceLock<Postgres> = std::sync::OnceLock::new();

/// Which engine handoff's store runs on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Store {
    Sled,
    Postgres,
}

impl Store {
    fn name(self) -> &'static str {
        match self {
            Store::Sled => "sled",
            Store::Postgres => "PostgreSQL",
        }
    }
}

/// A fresh database on the run's PostgreSQL, with a name of its own: `prefix_N`.
async fn fresh_database(prefix: &str) -> String {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let name = format!("{prefix}_{}", NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    POSTGRES.get().expect("the run's PostgreSQL").create_database(&name).await.unwrap();
    name
}

fn synapse_on_postgres() -> bool {
    std::env::var("HANDOFF_BENCH_SYNAPSE_DB").is_ok_and(|v| v == "postgres")
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(run());
}

fn rooms_n() -> usize {
    std::env::var("HANDOFF_BENCH_ROOMS").ok().and_then(|v| v.parse().ok()).unwrap_or(500)
}

/// The minimum requests of a capture, sent directly: joined rooms, one account-data sync, each room's state.
async fn direct_capture(owner: &User, concurrency: usize) -> Duration {
    let start = Instant::now();
    let rooms = owner.send(joined_rooms::v3::Request::new()).await.joined_rooms;
    let mut filter = FilterDefinition::ignore_all();
    filter.account_data = Default::default();
    filter.room = RoomFilter::ignore_all();
    filter.room.rooms = None;
    filter.room.account_data = RoomEventFilter::empty();
    let mut sync = sync_events::v3::Request::new();
    sync.filter = Some(sync_events::v3::Filter::FilterDefinition(filter));
    owner.send(sync).await;
    stream::iter(rooms)
        .map(|r| owner.send(get_state_events::v3::Request::new(r)))
        .buffer_unordered(concurrency)
        .count()
        .await;
    start.elapsed()
}

/// Who sends the writes the bench makes directly: each user with its own access token, or the
/// acting registration (`?user_id=`), as the engine sends them.
#[derive(Clone, Copy)]
enum Via<'a> {
    OwnTokens,
    Acting(&'a Homeserver),
}

impl Via<'_> {
    async fn send<R>(self, user: &User, request: R) -> R::IncomingResponse
    where
        R: ruma::api::OutgoingRequest<EndpointError = ruma::api::error::Error> + Clone + std::fmt::Debug,
        for<'a> R::Authentication: AuthScheme<Input<'a> = SendAccessToken<'a>>,
        R::PathBuilder: ruma_client::SupportedPathBuilder,
    {
        match self {
            Via::OwnTokens => user.send(request).await,
            Via::Acting(hs) => hs.send_as(&user.id, request).await.unwrap(),
        }
    }

    async fn invite(self, old: &User, new: &User, room: &RoomId) {
        let who = invite_user::v3::InviteUserId::new(new.id.clone()).into();
        self.send(old, invite_user::v3::Request::new(room.to_owned(), who)).await;
    }

    async fn join(self, new: &User, room: &RoomId) {
        self.send(new, join_room_by_id::v3::Request::new(room.to_owned())).await;
    }

    /// The old account invites the new one, which joins.
    async fn seat(self, old: &User, new: &User, room: &RoomId) {
        self.invite(old, new, room).await;
        self.join(new, room).await;
    }

    /// Re-reads the room's power levels and gives `new` the level the engine gives in rooms the
    /// old account created (150: a room version 12 creator's highest grantable level).
    async fn raise_power(self, old: &User, new: &User, room: &RoomId) {
        let req =
            get_state_event_for_key::v3::Request::new(room.to_owned(), StateEventType::RoomPowerLevels, String::new());
        let mut pl: serde_json::Value = serde_json::from_str(self.send(old, req).await.event_or_content.get()).unwrap();
        pl["users"][new.id.as_str()] = 150.into();
        let req = send_state_event::v3::Request::new_raw(
            room.to_owned(),
            StateEventType::RoomPowerLevels,
            String::new(),
            raw(pl),
        );
        self.send(old, req).await;
    }

    /// The old account posts a move notice, with the transaction ID `txn`.
    async fn notice(self, old: &User, new: &User, room: &RoomId, txn: String) {
        let content = RoomMessageEventContent::notice_plain(format!("{} has moved to {}", old.id, new.id));
        let req = send_message_event::v3::Request::new(room.to_owned(), txn.into(), &content).unwrap();
        self.send(old, req).await;
    }
}

/// Runs `step` for every room (with its index), `concurrency` rooms in flight; returns how long it took.
async fn timed_over_rooms<'a, F: std::future::Future<Output = ()> + 'a>(
    rooms: &'a [OwnedRoomId],
    concurrency: usize,
    step: impl Fn(usize, &'a OwnedRoomId) -> F,
) -> Duration {
    let start = Instant::now();
    stream::iter(rooms.iter().enumerate()).map(|(i, r)| step(i, r)).buffer_unordered(concurrency).count().await;
    start.elapsed()
}

/// Invite + join for every room, `concurrency` in flight: with the users' own tokens, the
/// homeserver's ceiling.
async fn direct_moves(via: Via<'_>, old: &User, new: &User, rooms: &[OwnedRoomId], concurrency: usize) -> Duration {
    timed_over_rooms(rooms, concurrency, |_, r| via.seat(old, new, r)).await
}

/// The same work as the engine per room, sent directly: invite, join, re-read and raise the power
/// level, one notice. What the engine adds on top of this is its own overhead.
async fn direct_full_moves(via: Via<'_>, old: &User, new: &User, rooms: &[OwnedRoomId], c: usize) -> Duration {
    timed_over_rooms(rooms, c, |i, r| async move {
        via.seat(old, new, r).await;
        via.raise_power(old, new, r).await;
        via.notice(old, new, r, format!("bench-{i}")).await;
    })
    .await
}

/// What each of the engine's writes costs the homeserver on its own: every room's invite, then every
/// join, then every power-level change, then every notice, each phase with `concurrency` in flight.
async fn per_step_costs(old: &User, new: &User, rooms: &[OwnedRoomId], concurrency: usize) -> [Duration; 4] {
    let via = Via::OwnTokens;
    let invite = timed_over_rooms(rooms, concurrency, |_, r| via.invite(old, new, r)).await;
    let join = timed_over_rooms(rooms, concurrency, |_, r| via.join(new, r)).await;
    let power = timed_over_rooms(rooms, concurrency, |_, r| via.raise_power(old, new, r)).await;
    let notice = timed_over_rooms(rooms, concurrency, |i, r| via.notice(old, new, r, format!("step-{i}"))).await;
    [invite, join, power, notice]
}

/// Rooms seated so far by the service (`handoff_rooms_seated_total` on its `/metrics`).
async fn rooms_seated(http: &reqwest::Client, metrics: &str) -> u64 {
    let text = http.get(metrics).send().await.unwrap().text().await.unwrap();
    metric(&text, "handoff_rooms_seated_total", "").expect("the seated counter")
}

/// Polls the service's `/metrics` every 100 ms from `start` until `n` more rooms are seated than
/// `before`; returns the time from `start`. Costs the homeserver nothing.
async fn until_seated(metrics: &str, before: u64, n: usize, start: Instant, patience: Duration) -> Duration {
    let http = reqwest::Client::new();
    loop {
        let seated = rooms_seated(&http, metrics).await;
        let seen = start.elapsed();
        if seated >= before + n as u64 {
            return seen;
        }
        assert!(seen < patience, "{} of {n} rooms seated after {patience:?}", seated - before);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

/// A fresh old account `name` with `n` rooms, `FAVOURITES` of them favourites and `DMS` DMs with
/// peers; and a DM with the bot (fresh for every run: earlier runs would otherwise have added
/// members to the rooms of later ones).
async fn old_account(h: &Harness, name: &str, n: usize) -> OldAccount {
    h.old_account(name, n, FAVOURITES, DMS).await
}

fn default_concurrency() -> usize {
    handoff::config::HandoffConfig::default().concurrency.0
}

/// A fresh Synapse and handoff for each measurement: every figure is taken on a homeserver in
/// the same state (a database grown by earlier measurements would slow the later ones).
async fn fresh(concurrency: usize) -> Harness {
    fresh_on(concurrency, Store::Sled).await
}

/// Like [`fresh`], with handoff's store on `store` (a fresh database when PostgreSQL), and Synapse
/// on PostgreSQL when `HANDOFF_BENCH_SYNAPSE_DB=postgres`.
async fn fresh_on(concurrency: usize, store: Store) -> Harness {
    let metrics_port = handoff::sandbox::free_port();
    // Every rate limit lifted: the benchmark measures handoff's throughput, and its numbers stay
    // comparable with the earlier ones (Synapse's limits on the fixture's users would set them).
    let lifted = handoff::sandbox::lifted(handoff::sandbox::RateLimit::ALL);
    let store_uri = match store {
        Store::Sled => None,
        Store::Postgres => Some(POSTGRES.get().expect("the run's PostgreSQL").uri(&fresh_database("handoff").await)),
    };
    let database = match synapse_on_postgres() {
        false => SynapseDatabase::Sqlite,
        true => SynapseDatabase::Postgres {
            port: POSTGRES.get().expect("the run's PostgreSQL").port,
            database: fresh_database("synapse").await,
        },
    };
    let options = SynapseOptions { database, extra: lifted, ..SynapseOptions::default() };
    let tmp = tempfile::tempdir().unwrap();
    let sandbox = Sandbox::create_as(
        tmp.path(),
        |c| {
            let c = edit(c, "level: info", "level: \"warn,handoff::transfer=info\"");
            let c = match &store_uri {
                None => c,
                Some(uri) => edit(
                    c,
                    "database:\n    path: handoff.db",
                    &format!("database:\n    type: postgres\n    path: handoff.db\n    uri: {uri}"),
                ),
            };
            // The bench reads the service's progress from /metrics, never from its log.
            with_concurrency(with_metrics(c, metrics_port), concurrency)
        },
        options,
    )
    .await
    .expect("sandbox starts");
    let mut h = Harness::serving(sandbox, Some(tmp)).await;
    h.patience = PATIENCE;
    h.poll = POLL;
    h
}

async fn acting(h: &Harness) -> Homeserver {
    let token = h.config_value("appservice.acting.as_token");
    Homeserver::connect(&h.synapse().url, &token, reqwest::Client::new()).await.unwrap()
}

/// Polls `user`'s joined rooms every 100 ms from `start` until it is in every one of `rooms`;
/// returns the times from `start` to the first and to the last. One cheap request a poll (Synapse
/// answers it from a cache), and none once the last is joined: light on the homeserver while the
/// transfer runs. (A sync long-poll loop lagged the joins by 0.5–1 s under the transfer's load:
/// Synapse computes each answer while busy with the transfer.)
async fn until_joined(user: &User, rooms: &[OwnedRoomId], start: Instant, patience: Duration) -> (Duration, Duration) {
    let mut first = None;
    loop {
        let joined = user.send(joined_rooms::v3::Request::new()).await.joined_rooms;
        let seen = start.elapsed();
        let n = rooms.iter().filter(|r| joined.contains(r)).count();
        if n > 0 {
            first.get_or_insert(seen);
        }
        if n == rooms.len() {
            return (first.unwrap(), seen);
        }
        assert!(seen < patience, "{} of {} rooms joined after {patience:?}", n, rooms.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// The homeserver's timestamps of `user`'s joins of `rooms` (read by `reader` after the run),
/// from `since` (unix ms): the earliest and the latest. When the engine's joins were made,
/// whatever the polling's delay in seeing them.
async fn join_stamps(reader: &User, user: &UserId, rooms: &[OwnedRoomId], since: u64) -> (Duration, Duration) {
    let mut stamps = Vec::new();
    for room in rooms {
        let ts = join_stamp(&reader.timeline(room).await, user).unwrap_or_else(|| panic!("no join in {room}"));
        stamps.push(Duration::from_millis(ts.saturating_sub(since)));
    }
    (*stamps.iter().min().unwrap(), *stamps.iter().max().unwrap())
}

/// One engine run: `export --to`, then `import`, timed to the first favourite, to every favourite
/// and to every room joined, and to the report.
struct EngineRun {
    concurrency: usize,
    first_favourite: Duration,
    all_favourites: Duration,
    all_joined: Duration,
    /// Rooms per second to every room joined, and to the report.
    joined: f64,
    whole: f64,
    cpu: Duration,
    rss: f64,
}

async fn engine_run(n: usize, c: usize) -> EngineRun {
    engine_run_on(n, c, Store::Sled).await
}

async fn engine_run_on(n: usize, c: usize, store: Store) -> EngineRun {
    let h = fresh_on(c, store).await;
    let old = old_account(&h, "old", n).await;
    engine_on(&h, &old, "new", n, c).await
}

/// `export --to` on `old`, then `import` on a new account `target`, on a running harness.
async fn engine_on(h: &Harness, old: &OldAccount, target: &str, n: usize, c: usize) -> EngineRun {
    let target = h.user(target).await;
    let code = export(h, &old.user, &old.dm, &format!("--to {}", target.id)).await;
    let tdm = h.dm_with_bot(&target).await;
    let pid = h.handoff_pid();
    let cpu_before = cpu_time(pid).expect("handoff's CPU time");
    let before = target.messages_from(&tdm, &h.bot).await.len();
    let metrics = format!("http://{}/metrics", h.config_value("metrics.listen"));
    let seated_before = rooms_seated(&reqwest::Client::new(), &metrics).await;
    let (start, sent_at) = (Instant::now(), unix_ms());
    target.send_text(&tdm, &format!("import {code}")).await;
    let report = async {
        let report = h.bot_says(&target, &tdm, before, "the report", |b| b.contains("rooms moved to")).await;
        (start.elapsed(), report)
    };
    let ((first_favourite, all_favourites), all_joined, (took, report)) = tokio::join!(
        until_joined(&target, &old.favourites, start, h.patience),
        until_seated(&metrics, seated_before, n, start, h.patience),
        report
    );
    let cpu = cpu_time(pid).expect("handoff's CPU time") - cpu_before;
    let stamps = join_stamps(&old.user, &target.id, &old.favourites, sent_at).await;
    assert!(report.starts_with(&format!("{n} of {n} rooms moved")), "{report}");
    println!(
        "      first favourite joined after {:.2} s, all {FAVOURITES} after {:.2} s (the joins' own timestamps: {:.2} s, {:.2} s), every room after {:.2} s, the report after {:.2} s",
        first_favourite.as_secs_f64(),
        all_favourites.as_secs_f64(),
        stamps.0.as_secs_f64(),
        stamps.1.as_secs_f64(),
        all_joined.as_secs_f64(),
        took.as_secs_f64()
    );
    EngineRun {
        concurrency: c,
        first_favourite,
        all_favourites,
        all_joined,
        joined: rate(n, all_joined),
        whole: rate(n, took),
        cpu,
        rss: peak_rss_kib(pid).expect("handoff's peak memory") as f64 / 1024.0,
    }
}

/// The middle value; of an even number, the mean of the two middle ones (not the one of them
/// that favours either side).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mid = v.len() / 2;
    if v.len().is_multiple_of(2) { (v[mid - 1] + v[mid]) / 2.0 } else { v[mid] }
}

fn median_time(v: Vec<Duration>) -> Duration {
    Duration::from_secs_f64(median(v.iter().map(Duration::as_secs_f64).collect()))
}

/// The paired rounds' medians.
struct Medians {
    ceiling: f64,
    joined: f64,
    whole: f64,
    first_favourite: Duration,
    all_favourites: Duration,
    all_joined: Duration,
}

/// The criterion, measured in paired rounds: in each, one fresh homeserver holds three old
/// accounts of `n` rooms each; the ceiling (invite+join sent directly at 8 and at 16 in flight, the
/// best of the two) and the engine at its default run on it back to back, in alternating order so
/// neither always meets the bigger database.
async fn paired_rounds(n: usize, rounds: usize) -> Medians {
    let default = default_concurrency();
    let (mut ceilings, mut ratios, mut runs) = (vec![], vec![], vec![]);
    for round in 0..rounds {
        let h = fresh(default).await;
        let o8 = old_account(&h, "old-c8", n).await;
        let o16 = old_account(&h, "old-c16", n).await;
        let oe = old_account(&h, "old-engine", n).await;
        let (n8, n16) = (h.user("new-c8").await, h.user("new-c16").await);
        let ceiling = |()| async {
            let a = rate(n, direct_moves(Via::OwnTokens, &o8.user, &n8, &o8.rooms, 8).await);
            let b = rate(n, direct_moves(Via::OwnTokens, &o16.user, &n16, &o16.rooms, 16).await);
            println!("    direct invite+join: {a:.1} rooms/s at 8, {b:.1} at 16");
            a.max(b)
        };
        let (c, e) = if round % 2 == 0 {
            let c = ceiling(()).await;
            (c, engine_on(&h, &oe, "new-engine", n, default).await)
        } else {
            let e = engine_on(&h, &oe, "new-engine", n, default).await;
            (ceiling(()).await, e)
        };
        println!(
            "  round {}: ceiling {c:.1} rooms/s; handoff at {default}: every room joined {:.1} rooms/s = {:.2} of it, whole transfer {:.1} rooms/s",
            round + 1,
            e.joined,
            e.joined / c,
            e.whole
        );
        ceilings.push(c);
        ratios.push(e.joined / c);
        runs.push(e);
    }
    // Whichever runs first on a fresh homeserver is faster, so the order alternates and the
    // rounds' ratios are averaged (an even number of rounds balances the two orders).
    println!(
        "  mean of {rounds} rounds: every room joined at {:.2} of the invite+join ceiling (rounds: {}; odd rounds ran the ceiling first)",
        ratios.iter().sum::<f64>() / ratios.len() as f64,
        ratios.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(", ")
    );
    Medians {
        ceiling: median(ceilings),
        joined: median(runs.iter().map(|r| r.joined).collect()),
        whole: median(runs.iter().map(|r| r.whole).collect()),
        first_favourite: median_time(runs.iter().map(|r| r.first_favourite).collect()),
        all_favourites: median_time(runs.iter().map(|r| r.all_favourites).collect()),
        all_joined: median_time(runs.iter().map(|r| r.all_joined).collect()),
    }
}

/// The results table: how soon the new account is in its first rooms, and how fast it is in all.
fn print_results(n: usize, rounds: usize, paired: &Medians, others: &[EngineRun]) {
    println!("\nresults ({n} rooms, {FAVOURITES} of them favourites, {DMS} DMs): from sending `import`");
    println!(
        "  {:<36} {:>15} {:>15} {:>15} {:>15} {:>15}",
        "", "first favourite", "all favourites", "every room", "rooms/s joined", "rooms/s whole"
    );
    let row = |label: String, first: Duration, favs: Duration, all: Duration, joined: f64, whole: f64| {
        println!(
            "  {label:<36} {:>13.2} s {:>13.2} s {:>13.2} s {joined:>15.1} {whole:>15.1}",
            first.as_secs_f64(),
            favs.as_secs_f64(),
            all.as_secs_f64()
        );
    };
    let default = default_concurrency();
    let p = paired;
    row(
        format!("handoff at {default} (median of {rounds} rounds)"),
        p.first_favourite,
        p.all_favourites,
        p.all_joined,
        p.joined,
        p.whole,
    );
    for r in others {
        let label = format!("handoff at {}", r.concurrency);
        row(label, r.first_favourite, r.all_favourites, r.all_joined, r.joined, r.whole);
    }
    let met = if p.first_favourite <= FIRST_FAVOURITE_TARGET { "met" } else { "not met" };
    println!(
        "  target: first favourite within {:.0} s of `import` at the default: {met} ({:.2} s)",
        FIRST_FAVOURITE_TARGET.as_secs_f64(),
        p.first_favourite.as_secs_f64()
    );
}

/// handoff's store on sled and on PostgreSQL, the same move of `n` rooms at the default
/// concurrency, each on a fresh homeserver with fresh rooms, in `rounds` paired rounds alternating
/// which goes first; prints each round's times and the ratio PostgreSQL/sled.
async fn store_rounds(n: usize, rounds: usize) {
    let default = default_concurrency();
    println!(
        "\ntransfer ({n} rooms), handoff's store: sled against PostgreSQL, at {default}, {rounds} paired rounds (a fresh homeserver for each move)"
    );
    let (mut ratios, mut sled, mut pg) = (vec![], vec![], vec![]);
    for round in 0..rounds {
        let order = if round % 2 == 0 { [Store::Sled, Store::Postgres] } else { [Store::Postgres, Store::Sled] };
        let mut took = [Duration::ZERO; 2];
        for store in order {
            println!("    {}:", store.name());
            let r = engine_run_on(n, default, store).await;
            took[usize::from(store == Store::Postgres)] = Duration::from_secs_f64(n as f64 / r.whole);
            println!(
                "    {}: every room joined {:.1} rooms/s, whole transfer {:.1} rooms/s ({:.2} s), service CPU {:.1} ms per room, peak RSS {:.0} MiB",
                store.name(),
                r.joined,
                r.whole,
                n as f64 / r.whole,
                r.cpu.as_secs_f64() * 1000.0 / n as f64,
                r.rss
            );
        }
        let ratio = took[1].as_secs_f64() / took[0].as_secs_f64();
        println!(
            "  round {} ({} first): sled {:.2} s, PostgreSQL {:.2} s: PostgreSQL/sled {ratio:.3}",
            round + 1,
            order[0].name(),
            took[0].as_secs_f64(),
            took[1].as_secs_f64()
        );
        ratios.push(ratio);
        sled.push(took[0]);
        pg.push(took[1]);
    }
    let mean = ratios.iter().sum::<f64>() / ratios.len() as f64;
    let met = if mean <= STORE_TARGET { "met" } else { "not met" };
    println!(
        "  mean of {rounds} rounds: PostgreSQL/sled {mean:.3} to the report (rounds: {}); medians sled {:.2} s, PostgreSQL {:.2} s; target at most {STORE_TARGET:.2}: {met}",
        ratios.iter().map(|r| format!("{r:.3}")).collect::<Vec<_>>().join(", "),
        median_time(sled).as_secs_f64(),
        median_time(pg).as_secs_f64()
    );
}

/// A folder removed when the run ends.
struct RemovedAtEnd(std::path::PathBuf);

impl Drop for RemovedAtEnd {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn run() {
    let n = rooms_n();
    let store_both = std::env::var("HANDOFF_BENCH_STORE").is_ok_and(|v| v == "both");
    let synapse_db = if synapse_on_postgres() { "PostgreSQL" } else { "SQLite" };
    println!(
        "handoff benchmark: {n} rooms, Synapse {} on {synapse_db}, on loopback, a fresh homeserver for each figure",
        handoff::sandbox::SYNAPSE_VERSION
    );
    // One PostgreSQL for the run (a database for each Synapse and store on it), in a folder that
    // outlives the run's statics (the server stops when the process ends) and goes at the run's end.
    let mut _pg_dir = None;
    if store_both || synapse_on_postgres() {
        let dir = tempfile::tempdir().unwrap().keep();
        _pg_dir = Some(RemovedAtEnd(dir.clone()));
        let pg = Postgres::start(&dir.join("pg")).await.expect("PostgreSQL starts");
        println!("PostgreSQL 18 on 127.0.0.1:{} in {}", pg.port, dir.display());
        let _ = POSTGRES.set(pg);
    }
    if store_both {
        let rounds = std::env::var("HANDOFF_BENCH_STORE_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
        store_rounds(n, rounds).await;
        return;
    }

    // HANDOFF_BENCH_CRITERION_ONLY=1: just the paired rounds.
    let criterion_only = std::env::var_os("HANDOFF_BENCH_CRITERION_ONLY").is_some();
    // Capture: the minimum requests at their best concurrency, capture() itself, and `export`.
    if !criterion_only {
        let h = fresh(default_concurrency()).await;
        let t = Instant::now();
        let alice = old_account(&h, "alice", n).await;
        println!("setup: created {n} rooms in {:.1} s", t.elapsed().as_secs_f64());
        let direct = direct_capture(&alice.user, 4).await.min(direct_capture(&alice.user, 16).await);
        let acting = acting(&h).await;
        let opts = handoff::bundle::capture::CaptureOptions {
            only: None,
            exclude: vec![],
            skip: vec![],
            history: 0,
            pool: handoff::budget::Budget::new(8),
            max_rooms: usize::MAX,
            client: "bench".into(),
        };
        let start = Instant::now();
        let bundle =
            handoff::bundle::capture::capture(&acting, &alice.user.id, &h.synapse().url.parse().unwrap(), &opts)
                .await
                .unwrap()
                .bundle;
        let library = start.elapsed();
        assert_eq!(bundle.rooms.len(), n + 1, "every room and the bot's DM");
        let (capture, _) = h.ask_timed(&alice.user, &alice.dm, "export", "Your transfer code").await;
        println!("\ncapture ({n} rooms)");
        println!("  minimum requests, direct:  {:>7.2} s", direct.as_secs_f64());
        println!(
            "  capture() itself:          {:>7.2} s = {:.2}x the minimum requests",
            library.as_secs_f64(),
            library.as_secs_f64() / direct.as_secs_f64()
        );
        println!(
            "  handoff export (end to end, incl. storing and answering): {:>7.2} s = {:.2}x",
            capture.as_secs_f64(),
            capture.as_secs_f64() / direct.as_secs_f64()
        );
    }

    let rounds = std::env::var("HANDOFF_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
    println!(
        "\ntransfer ({n} rooms), the criterion: the engine at its default ({}) against invite+join sent directly, {rounds} paired rounds",
        default_concurrency()
    );
    let paired = paired_rounds(n, rounds).await;
    if criterion_only {
        print_results(n, rounds, &paired, &[]);
        return;
    }

    println!("\ntransfer ({n} rooms), where the time goes (one run each, a fresh homeserver for each)");
    let mut ceiling: f64 = 0.0;
    for c in [4, 8, 16, 32] {
        let h = fresh(default_concurrency()).await;
        let old = old_account(&h, "old", n).await;
        let r = rate(n, direct_moves(Via::OwnTokens, &old.user, &h.user("new").await, &old.rooms, c).await);
        println!("  direct invite+join at {c} in flight: {r:.1} rooms/s");
        ceiling = ceiling.max(r);
    }
    println!("  ceiling (the best of these): {ceiling:.1} rooms/s");
    for c in [8, 16] {
        let h = fresh(default_concurrency()).await;
        let old = old_account(&h, "old", n).await;
        let acting = acting(&h).await;
        let r = rate(n, direct_moves(Via::Acting(&acting), &old.user, &h.user("new").await, &old.rooms, c).await);
        println!(
            "  the same invites and joins through the acting registration (?user_id=) at {c}: {r:.1} rooms/s = {:.2} of the ceiling",
            r / ceiling
        );
    }

    let bound = {
        let h = fresh(default_concurrency()).await;
        let old = old_account(&h, "old", n).await;
        let costs = per_step_costs(&old.user, &h.user("new").await, &old.rooms, 16).await;
        let total: Duration = costs.iter().sum();
        let bound = rate(n, total);
        println!(
            "  the four writes of a move, each on its own at 16 in flight: together {bound:.1} rooms/s = {:.2} of the ceiling: about the most a mover that makes all four can reach",
            bound / ceiling
        );
        for (name, d) in ["invite", "join", "power level", "notice"].iter().zip(costs) {
            println!(
                "    {name:<12} {:>6.1} rooms/s  {:>3.0} %",
                rate(n, d),
                100.0 * d.as_secs_f64() / total.as_secs_f64()
            );
        }
        bound
    };
    let same_work = {
        let h = fresh(default_concurrency()).await;
        let old = old_account(&h, "old", n).await;
        rate(n, direct_full_moves(Via::OwnTokens, &old.user, &h.user("new").await, &old.rooms, 16).await)
    };
    println!("  the same four writes room by room, direct at 16: {same_work:.1} rooms/s");
    let same_work_as = {
        let h = fresh(default_concurrency()).await;
        let old = old_account(&h, "old", n).await;
        let acting = acting(&h).await;
        rate(n, direct_full_moves(Via::Acting(&acting), &old.user, &h.user("new").await, &old.rooms, 16).await)
    };
    println!("  the same through the acting registration (?user_id=) at 16: {same_work_as:.1} rooms/s");

    // The engine at 8 and at 1 (one room at a time), each on its own homeserver.
    let default = default_concurrency();
    let levels = [8, 1];
    let mut results = Vec::new();
    for c in levels {
        println!("  handoff at concurrency {c}:");
        results.push(engine_run(n, c).await);
    }
    println!("  every room joined (pass 1 of the engine: the same invites and joins as the ceiling):");
    for r in &results {
        println!(
            "    handoff at concurrency {}: {:.1} rooms/s = {:.2} of the invite+join ceiling",
            r.concurrency,
            r.joined,
            r.joined / ceiling
        );
    }
    println!("  the whole transfer (joins, then rank, tags and a notice in each room, then the account):");
    for r in &results {
        println!(
            "    handoff at concurrency {}: {:.1} rooms/s = {:.2} of the invite+join ceiling, {:.2} of the four writes' bound, {:.2} of the same writes sent directly, {:.2} of them through the acting registration; service CPU {:.1} ms per room; peak RSS {:.0} MiB",
            r.concurrency,
            r.whole,
            r.whole / ceiling,
            r.whole / bound,
            r.whole / same_work,
            r.whole / same_work_as,
            r.cpu.as_secs_f64() * 1000.0 / n as f64,
            r.rss
        );
    }
    println!(
        "  default ({default}, the paired rounds' medians) / one-at-a-time: {:.2}x to every room joined, {:.2}x to the end; medians: ceiling {:.1}, joined {:.1}, whole {:.1} rooms/s",
        paired.joined / results.last().unwrap().joined,
        paired.whole / results.last().unwrap().whole,
        paired.ceiling,
        paired.joined,
        paired.whole
    );
    print_results(n, rounds, &paired, &results);
}
