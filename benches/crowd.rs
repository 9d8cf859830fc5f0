//! Many users at once, against one user alone, each figure next to its baseline from the same run:
//!
//! - on Synapse: N users with R rooms each press `import` within the same second, against one user
//!   with N×R rooms alone (the same rooms in all, the same favourites and DMs in all), each on a
//!   fresh homeserver, in paired rounds of alternating order. Reported: the aggregate rate to
//!   every room joined and to the end (the crowd's over the single user's), each crowd user's
//!   time from its `import` to its first favourite joined (best, median, worst) against the
//!   single user's, handoff's peak memory, and the CPU time per room moved of handoff and of
//!   Synapse (for `docs/scale.md`). Targets (issue 23): aggregate to the end (every report)
//!   ≥ 0.85× the single user; every crowd user's first favourite joined within 2.5 s of its
//!   `import`, in every round (its ratio to the single user's is printed too).
//! - on a simulated homeserver (in this process, which never answers, so every transfer stays
//!   where it is): 1,000 transfers asked for at once, with the line (`max_transfers`: 32 run, the
//!   rest wait) against the same 1,000 all let run. Reported: bytes per waiting transfer and per
//!   running one (counted by this binary's allocator), the most homeserver requests in flight.
//!   Target: a few KB per waiting transfer.
//!
//! Synapse keeps its data in SQLite; `HANDOFF_BENCH_SYNAPSE_DB=postgres` runs every Synapse of the
//! bench on PostgreSQL instead (one PostgreSQL for the run, `handoff::sandbox::postgres`, a
//! database per Synapse), as a deployed Synapse is.
//!
//! Times are the homeserver's own: a favourite counts as joined at its join event's timestamp, an
//! `import` as sent at its message's; the end is read from handoff's `/metrics`, polled (which
//! costs the homeserver nothing).
//!
//! Run: `cargo bench --bench crowd` (8 users × 40 rooms, 2 paired rounds; `HANDOFF_BENCH_USERS`,
//! `HANDOFF_BENCH_ROOMS` (per user), `HANDOFF_BENCH_ROUNDS`, `HANDOFF_BENCH_SYNAPSE_DB=postgres`;
//! `HANDOFF_BENCH_MEMORY_ONLY=1` for the simulated homeserver alone, `HANDOFF_BENCH_TRANSFERS=0`
//! to skip it).

#[path = "../tests/common/mod.rs"]
mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Harness, User, cpu_time, edit, export, join_stamp, metric, peak_rss_kib, with_metrics};
use futures_util::future::{BoxFuture, join_all};
use handoff::sandbox::postgres::Postgres;
use handoff::sandbox::{Sandbox, SynapseDatabase, SynapseOptions};
use ruma::{OwnedEventId, OwnedRoomId};

/// Counts the bytes this process holds on the heap, for the simulated homeserver's part.
struct Counting;

static HELD: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            HELD.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        HELD.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            HELD.fetch_add(new_size, Ordering::Relaxed);
            HELD.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Favourites and DMs with peers in each crowd user's rooms (the single user has N times as many).
const FAVOURITES: usize = 4;
const DMS: usize = 2;
const PATIENCE: Duration = Duration::from_secs(900);
/// The project's targets.
const AGGREGATE_TARGET: f64 = 0.85;
const FIRST_FAVOURITE_TARGET: Duration = Duration::from_millis(2500);

/// The one PostgreSQL of the run, when Synapse runs on PostgreSQL.
static POSTGRES: std::sync::OnceLock<Postgres> = std::sync::OnceLock::new();

fn synapse_on_postgres() -> bool {
    std::env::var("HANDOFF_BENCH_SYNAPSE_DB").is_ok_and(|v| v == "postgres")
}

/// Removes a folder when dropped (the run's PostgreSQL data, at the run's end).
struct RemovedAtEnd(std::path::PathBuf);

impl Drop for RemovedAtEnd {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        if std::env::var_os("HANDOFF_BENCH_MEMORY_ONLY").is_none() {
            // One PostgreSQL for the run (a database for each Synapse), in a folder that outlives
            // the run's statics (the server stops when the process ends) and goes at the run's end.
            let mut _pg_dir = None;
            if synapse_on_postgres() {
                let dir = tempfile::tempdir().unwrap().keep();
                _pg_dir = Some(RemovedAtEnd(dir.clone()));
                let pg = Postgres::start(&dir.join("pg")).await.expect("PostgreSQL starts");
                println!("PostgreSQL on 127.0.0.1:{} in {}", pg.port, dir.display());
                let _ = POSTGRES.set(pg);
            }
            on_synapse(env("HANDOFF_BENCH_USERS", 8), env("HANDOFF_BENCH_ROOMS", 40), env("HANDOFF_BENCH_ROUNDS", 2))
                .await;
        }
        let transfers = env("HANDOFF_BENCH_TRANSFERS", 1000);
        if transfers > 0 {
            simulated::run(transfers).await;
        }
    });
}

/// An old account ready to move: its rooms, favourites, new account and codes.
struct Mover {
    old: User,
    new: User,
    rooms: Vec<OwnedRoomId>,
    favourites: Vec<OwnedRoomId>,
    new_dm: OwnedRoomId,
    code: String,
}

/// Old account `name` with `n` rooms (`favourites` of them favourites, `dms` DMs with peers),
/// exported with `--to` its new account.
async fn mover(h: &Harness, name: &str, n: usize, favourites: usize, dms: usize) -> Mover {
    let old = h.old_account(&format!("{name}-old"), n, favourites, dms).await;
    let new = h.user(&format!("{name}-new")).await;
    let code = export(h, &old.user, &old.dm, &format!("--to {}", new.id)).await;
    let new_dm = h.dm_with_bot(&new).await;
    Mover { old: old.user, new, rooms: old.rooms, favourites: old.favourites, new_dm, code }
}

/// A fresh database on the run's PostgreSQL, with a name of its own: `synapse_N`.
async fn fresh_database() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let name = format!("synapse_{}", NEXT.fetch_add(1, Ordering::Relaxed));
    POSTGRES.get().expect("the run's PostgreSQL").create_database(&name).await.unwrap();
    name
}

/// A fresh Synapse (on SQLite, or on PostgreSQL with `HANDOFF_BENCH_SYNAPSE_DB=postgres`) and
/// handoff serving it.
async fn fresh() -> Harness {
    let metrics_port = handoff::sandbox::free_port();
    // Every rate limit lifted: the benchmark measures handoff's throughput under a crowd, which
    // Synapse's limits on the crowd's own requests (their rooms, their `import`) would set.
    let lifted = handoff::sandbox::lifted(handoff::sandbox::RateLimit::ALL);
    let database = match synapse_on_postgres() {
        false => SynapseDatabase::Sqlite,
        true => SynapseDatabase::Postgres {
            port: POSTGRES.get().expect("the run's PostgreSQL").port,
            database: fresh_database().await,
        },
    };
    let options = SynapseOptions { database, extra: lifted, ..SynapseOptions::default() };
    let tmp = tempfile::tempdir().unwrap();
    let sandbox = Sandbox::create_as(
        tmp.path(),
        |c| {
            // HANDOFF_BENCH_LOG=FILTER: handoff logs at that level, and each run's log is kept in the temp dir.
            let level = std::env::var("HANDOFF_BENCH_LOG").unwrap_or_else(|_| "warn".into());
            let quiet = edit(c, "level: info", &format!("level: \"{level}\""));
            with_metrics(quiet, metrics_port)
        },
        options,
    )
    .await
    .expect("sandbox starts");
    let mut h = Harness::serving(sandbox, Some(tmp)).await;
    h.patience = PATIENCE;
    h.poll = Duration::from_millis(500);
    h
}

/// One counter of handoff's `/metrics`; every one the bench reads is there from the start.
fn counter(text: &str, name: &str, labels: &str) -> u64 {
    metric(text, name, labels).unwrap_or_else(|| panic!("{name} in /metrics"))
}

/// What one run measured.
struct Run {
    rooms: usize,
    /// From the first `import` to every room seated, and to every transfer's end.
    all_joined: Duration,
    end: Duration,
    /// Each user's time from its `import` to its first favourite joined.
    first_favourite: Vec<Duration>,
    rss_mib: f64,
    handoff_cpu: Duration,
    synapse_cpu: Duration,
}

/// All of `movers` send `import` at once; waits for every room seated and every transfer done.
async fn run_movers(h: &Harness, movers: &[Mover]) -> Run {
    let rooms: usize = movers.iter().map(|m| m.rooms.len()).sum();
    let metrics = format!("http://{}/metrics", h.config_value("metrics.listen"));
    let http = reqwest::Client::new();
    let scrape = || async { http.get(&metrics).send().await.unwrap().text().await.unwrap() };
    let before = scrape().await;
    let (seated0, done0) = (
        counter(&before, "handoff_rooms_seated_total", ""),
        counter(&before, "handoff_transfers_finished_total", "outcome=\"done\""),
    );
    let (hpid, spid) = (h.handoff_pid(), h.synapse().pid().expect("synapse runs"));
    let (hcpu, scpu) = (cpu_time(hpid).unwrap(), cpu_time(spid).unwrap());
    let start = Instant::now();
    join_all(movers.iter().map(|m| async move { m.new.send_text(&m.new_dm, &format!("import {}", m.code)).await }))
        .await;
    let mut all_joined = None;
    let end = loop {
        let text = scrape().await;
        let seen = start.elapsed();
        if all_joined.is_none() && counter(&text, "handoff_rooms_seated_total", "") >= seated0 + rooms as u64 {
            all_joined = Some(seen);
        }
        if counter(&text, "handoff_transfers_finished_total", "outcome=\"done\"") >= done0 + movers.len() as u64 {
            break seen;
        }
        assert!(seen < PATIENCE, "not done after {PATIENCE:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (handoff_cpu, synapse_cpu) = (cpu_time(hpid).unwrap() - hcpu, cpu_time(spid).unwrap() - scpu);
    let mut first_favourite = Vec::new();
    for m in movers {
        let report = h.bot_says(&m.new, &m.new_dm, 0, "the report", |b| b.contains("rooms moved to")).await;
        let n = m.rooms.len();
        assert!(report.starts_with(&format!("{n} of {n} rooms moved")), "{report}");
        // The homeserver's clock on both ends: the import message, and the favourites' joins.
        let sent = m
            .new
            .timeline(&m.new_dm)
            .await
            .iter()
            .find(|e| e["content"]["body"].as_str().is_some_and(|b| b.starts_with("import ")))
            .and_then(|e| e["origin_server_ts"].as_u64())
            .expect("the import message");
        let mut joins = Vec::new();
        for room in &m.favourites {
            joins.push(join_stamp(&m.old.timeline(room).await, &m.new.id).expect("a favourite joined"));
        }
        first_favourite.push(Duration::from_millis(joins.iter().min().unwrap().saturating_sub(sent)));
    }
    first_favourite.sort();
    if std::env::var_os("HANDOFF_BENCH_LOG").is_some() {
        let kept = std::env::temp_dir().join(format!("handoff-crowd-{}.log", movers.len()));
        std::fs::write(&kept, h.log()).unwrap();
        println!("    (handoff's log: {})", kept.display());
    }
    Run {
        rooms,
        all_joined: all_joined.unwrap_or(end),
        end,
        first_favourite,
        rss_mib: peak_rss_kib(hpid).unwrap() as f64 / 1024.0,
        handoff_cpu,
        synapse_cpu,
    }
}

/// One user with `users × rooms` rooms, alone on a fresh homeserver.
async fn single(users: usize, rooms: usize) -> Run {
    let h = fresh().await;
    let m = mover(&h, "solo", users * rooms, users * FAVOURITES, users * DMS).await;
    run_movers(&h, &[m]).await
}

/// `users` users with `rooms` rooms each, at once, on a fresh homeserver.
async fn crowd(users: usize, rooms: usize) -> Run {
    let h = fresh().await;
    let mut movers = Vec::new();
    for i in 0..users {
        movers.push(mover(&h, &format!("u{i}"), rooms, FAVOURITES, DMS).await);
    }
    run_movers(&h, &movers).await
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn describe(label: &str, r: &Run) {
    let ff = &r.first_favourite;
    println!(
        "    {label}: every room joined after {} ({:.1} rooms/s), the end after {} ({:.1} rooms/s); first favourite best {} median {} worst {}; peak RSS {:.0} MiB; CPU per room: handoff {:.1} ms, Synapse {:.1} ms",
        secs(r.all_joined),
        rate(r.rooms, r.all_joined),
        secs(r.end),
        rate(r.rooms, r.end),
        secs(ff[0]),
        secs(ff[ff.len() / 2]),
        secs(ff[ff.len() - 1]),
        r.rss_mib,
        r.handoff_cpu.as_secs_f64() * 1000.0 / r.rooms as f64,
        r.synapse_cpu.as_secs_f64() * 1000.0 / r.rooms as f64,
    );
}

async fn on_synapse(users: usize, rooms: usize, rounds: usize) {
    let synapse_db = if synapse_on_postgres() { "PostgreSQL" } else { "SQLite" };
    println!(
        "crowd benchmark: {users} users x {rooms} rooms at once against one user with {} rooms alone, Synapse {} on {synapse_db}, on loopback, a fresh homeserver for each, {rounds} paired rounds",
        users * rooms,
        handoff::sandbox::SYNAPSE_VERSION
    );
    let (mut joined, mut whole, mut worst, mut slowest) = (vec![], vec![], vec![], Duration::ZERO);
    for round in 0..rounds {
        // Whichever runs first meets a cooler machine: the order alternates.
        let (s, c) = if round % 2 == 0 {
            let s = single(users, rooms).await;
            (s, crowd(users, rooms).await)
        } else {
            let c = crowd(users, rooms).await;
            (single(users, rooms).await, c)
        };
        println!("  round {} ({} first):", round + 1, if round % 2 == 0 { "single" } else { "crowd" });
        describe("one user alone ", &s);
        describe(&format!("{users} users at once"), &c);
        let j = rate(c.rooms, c.all_joined) / rate(s.rooms, s.all_joined);
        let w = rate(c.rooms, c.end) / rate(s.rooms, s.end);
        let f = c.first_favourite.last().unwrap().as_secs_f64() / s.first_favourite[0].as_secs_f64();
        println!(
            "    crowd / alone: {j:.2}x to every room joined, {w:.2}x to the end; worst first favourite {f:.2}x the single user's"
        );
        joined.push(j);
        whole.push(w);
        worst.push(f);
        slowest = slowest.max(*c.first_favourite.last().unwrap());
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (j, w, f) = (mean(&joined), mean(&whole), mean(&worst));
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "  mean of {rounds} rounds: aggregate {j:.2}x to every room joined, {w:.2}x to the end; worst first favourite {f:.2}x"
    );
    println!(
        "  target: aggregate >= {AGGREGATE_TARGET}x of the single user (to the end): {}",
        verdict(w >= AGGREGATE_TARGET)
    );
    println!(
        "  target: every crowd user's first favourite within {} of its import (the worst of every round: {}): {}",
        secs(FIRST_FAVOURITE_TARGET),
        secs(slowest),
        verdict(slowest <= FIRST_FAVOURITE_TARGET)
    );
}

/// The engine alone against a homeserver that never answers: what waiting costs.
mod simulated {
    use super::*;
    use handoff::bundle::{Bundle, BundleId};
    use handoff::config::Config;
    use handoff::homeserver::{Homeserver, HsError};
    use handoff::shutdown::Shutdown;
    use handoff::store::Store;
    use handoff::transfer::Transfer;
    use handoff::transfer::engine::Engine;
    use handoff::transfer::journal::Journal;
    use handoff::transfer::plan::Requirements;
    use handoff::transfer::progress::{Counts, Delivery, Place, Reporter, Stopped};
    use handoff::transfer::report::Report;

    /// Rooms in each transfer's bundle.
    const ROOMS: usize = 40;

    /// Counts what the engine tells; posts nothing.
    #[derive(Default)]
    struct Counter {
        started: AtomicUsize,
        waiting: AtomicUsize,
    }

    impl Reporter for Counter {
        fn waiting<'a>(&'a self, _: &'a Transfer, _: Place) -> BoxFuture<'a, Result<(), HsError>> {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { Ok(()) })
        }
        fn started<'a>(&'a self, t: &'a Transfer, _: Counts) -> BoxFuture<'a, Result<OwnedEventId, HsError>> {
            self.started.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move { Ok(OwnedEventId::try_from(format!("$status-{}", t.id)).unwrap()) })
        }
        fn progress<'a>(&'a self, _: &'a Transfer, _: Counts) -> BoxFuture<'a, Result<(), HsError>> {
            Box::pin(async { Ok(()) })
        }
        fn stopped<'a>(&'a self, _: &'a Transfer, _: Stopped) -> BoxFuture<'a, Result<(), HsError>> {
            Box::pin(async { Ok(()) })
        }
        fn deliver<'a>(&'a self, _: &'a Transfer, _: Delivery<'a>) -> BoxFuture<'a, Result<String, HsError>> {
            Box::pin(async { Ok(String::new()) })
        }
        fn finished<'a>(&'a self, _: &'a Transfer, _: &'a Report) -> BoxFuture<'a, Result<(), HsError>> {
            Box::pin(async { Ok(()) })
        }
        fn taken_up<'a>(&'a self, _: &'a Transfer, _: &'a Report) -> BoxFuture<'a, Result<(), HsError>> {
            Box::pin(async { Ok(()) })
        }
    }

    /// A homeserver that answers `/versions` and holds every other request open, counting them.
    async fn silent_homeserver() -> (String, Arc<AtomicUsize>) {
        let held = Arc::new(AtomicUsize::new(0));
        let counter = held.clone();
        let app = axum::Router::new()
            .route(
                "/_matrix/client/versions",
                axum::routing::get(|| async { axum::Json(serde_json::json!({"versions": ["v1.11"]})) }),
            )
            .fallback(move || {
                counter.fetch_add(1, Ordering::SeqCst);
                std::future::pending::<&'static str>()
            });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (format!("http://{addr}"), held)
    }

    fn bundle(user: usize) -> Bundle {
        let rooms: Vec<serde_json::Value> = (0..ROOMS)
            .map(|r| {
                let fav = r % 10 == 0;
                serde_json::json!({
                    "room_id": format!("!room{r}-of-{user}:localhost"),
                    "via": ["localhost"],
                    "name": format!("Room {r} of user {user}"),
                    "kind": "group",
                    "tags": if fav { serde_json::json!({"m.favourite": {"order": 0.5}}) } else { serde_json::json!({}) },
                    "priority": if fav { "high" } else { "normal" },
                    "rank": "creator",
                    "notifications": "default",
                    "encrypted": false,
                })
            })
            .collect();
        let json = serde_json::json!({
            "version": 1,
            "source": {
                "user_id": format!("@old{user}:localhost"),
                "server_name": "localhost",
                "homeserver_url": "http://localhost",
                "exported_at": 1_700_000_000_000u64,
                "client": "bench",
            },
            "rooms": rooms,
            "contacts": [],
            "preferences": {},
            "profile": {"display_name": format!("Old {user}")},
        });
        handoff::bundle::border::open(&serde_json::to_vec(&json).unwrap(), &handoff::bundle::border::Limits::DEVICE)
            .unwrap()
            .bundle
    }

    /// The heap's size once it has stopped growing: the least of its sizes over a second (work
    /// in the background, such as the store's flush, only adds for a moment), taken again until
    /// two seconds agree within 2 KiB.
    async fn settled() -> usize {
        let least = || async {
            let mut least = usize::MAX;
            for _ in 0..20 {
                least = least.min(HELD.load(Ordering::SeqCst));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            least
        };
        let mut last = least().await;
        loop {
            let now = least().await;
            if now.abs_diff(last) < 2048 {
                return now;
            }
            last = now;
        }
    }

    /// What one setting measured, in bytes above the idle engine.
    struct Measured {
        /// After the first `places` transfers were asked for (all run), and after all.
        first: usize,
        all: usize,
        places: usize,
        requests: usize,
        /// What the store's cache took to hold every transfer record, read once.
        cache: usize,
    }

    /// `n` stored transfers asked for at once on an engine with `max_transfers` places.
    async fn measure(n: usize, max_transfers: usize) -> Measured {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let journal = Journal::new(store.clone());
        let mut ids = Vec::new();
        for user in 0..n {
            let old = ruma::UserId::parse(format!("@old{user}:localhost")).unwrap();
            let new = ruma::UserId::parse(format!("@new{user}:localhost")).unwrap();
            let bundle: BundleId = store.put_bundle(&old, &bundle(user)).await.unwrap();
            let id = journal.new_id().await.unwrap();
            let dm = OwnedRoomId::try_from(format!("!dm{user}:localhost")).unwrap();
            journal.put(&Transfer::new(id, old, new, bundle, Requirements::default(), dm, None)).await.unwrap();
            ids.push(id);
        }
        let text = include_str!("../bridge-config.yaml").to_owned();
        let text = edit(
            edit(text, "domain: example.org", "domain: localhost"),
            "\"example.org\": user",
            "\"localhost\": user",
        );
        let text = edit(text, "max_transfers: 32", &format!("max_transfers: {max_transfers}"));
        let config = Arc::new(Config::parse(&text).unwrap());
        let (url, requests) = silent_homeserver().await;
        let hs = Homeserver::connect(&url, "token", reqwest::Client::new()).await.unwrap();
        let reporter = Arc::new(Counter::default());
        let shutdown = Shutdown::new();
        let engine = Engine::new(config, hs, store.clone(), journal.clone(), reporter.clone(), shutdown.clone());
        // The store's cache (bounded: 64 MiB) keeps what was read once. Every record is read
        // before measuring, so the figures are the engine's; what the cache took is told apart.
        let cold = settled().await;
        for id in &ids {
            journal.get(*id).await.unwrap();
        }
        let idle = settled().await;
        let cache = idle.saturating_sub(cold);
        let places = max_transfers.min(n);
        for id in &ids[..places] {
            engine.spawn(*id);
        }
        let first = settled().await.saturating_sub(idle);
        for id in &ids[places..] {
            engine.spawn(*id);
        }
        while reporter.waiting.load(Ordering::SeqCst) < n - places {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let all = settled().await.saturating_sub(idle);
        let requests = requests.load(Ordering::SeqCst);
        engine.stop_all();
        Measured { first, all, places, requests, cache }
    }

    pub async fn run(n: usize) {
        let places = handoff::config::HandoffConfig::default().max_transfers.0;
        println!(
            "\n{n} transfers of {ROOMS} rooms asked for at once, on a simulated homeserver that never answers (bytes held on the heap above the idle engine)"
        );
        let line = measure(n, places).await;
        let places = line.places;
        let running = line.first as f64 / line.places as f64;
        let waiting = line.all.saturating_sub(line.first) as f64 / (n - places).max(1) as f64;
        println!(
            "  with the line ({places} run, {} wait): {:.1} MiB in all; {:.1} KiB per running transfer, {waiting:.0} bytes per waiting one; {} homeserver requests made",
            n - places,
            line.all as f64 / (1 << 20) as f64,
            running / 1024.0,
            line.requests
        );
        println!(
            "  the store's cache, to hold every transfer's record once read: {:.0} bytes per transfer (the cache is bounded at 64 MiB in all)",
            line.cache as f64 / n as f64
        );
        let stampede = measure(n, n).await;
        println!(
            "  without it (all {n} let run): {:.1} MiB in all, {:.1} KiB per transfer; {} homeserver requests made",
            stampede.all as f64 / (1 << 20) as f64,
            stampede.all as f64 / n as f64 / 1024.0,
            stampede.requests
        );
        println!(
            "  the line holds {:.2}x the memory of the stampede; target: a few KB per waiting transfer: {}",
            line.all as f64 / stampede.all as f64,
            if waiting <= 4096.0 { "met" } else { "NOT met" }
        );
    }
}
