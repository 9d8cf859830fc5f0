//! A move to an account on another homeserver, on two Synapses that federate over TLS on
//! loopback (the test bed of `tests/federation.rs`), against a baseline from the same run:
//!
//! - handoff: `export --to @new:B --file` on A (A's handoff reserves the seats: the old account
//!   invites the new one into every room), and as soon as the file is there, dropped into the new
//!   account's DM with B's bot and `import CODE` sent, while A still reserves (B's handoff joins
//!   each room through its servers as its invite comes, applies tags, DMs and settings, posts the
//!   notices); timed from the export to the later of A's and B's reports, and in its parts;
//! - baselines, with an old account's and a new account's own tokens, 16 rooms in flight, from one
//!   server to the other: the same invites and joins sent directly (against which the move's
//!   every room joined is set, by B's own timestamps of the joins), and the same writes sent
//!   directly (invite, join, the old account raising the new one's power level, one notice by the
//!   new account: against which the move's end is set); each part on rooms of its own made alike
//!   (none finds B's server in its rooms already), in rounds of alternating order
//!   (`HANDOFF_BENCH_ROUNDS`, 2 by default), each round's rates and their mean reported.
//!
//! The old account has N rooms on A: 10 favourites, 3 DMs, the rest group rooms.
//! Run: `cargo bench --bench cross_server` (N = 500; `HANDOFF_BENCH_ROOMS=100` for a quicker run).
//!
//! That run lifts every rate limit: it measures throughput. `HANDOFF_BENCH_LIMITS` runs the move
//! under Synapse's (N = 50 by default):
//!
//! - `raised`: Synapse's defaults on both servers, but B's `rc_invites.per_user` raised, as B's
//!   admin would for a migration day;
//! - `default`: Synapse's defaults on both servers.
//!
//! There the old account and the baseline's accounts act under their servers' limits, as people at
//! their clients do (handoff's registrations are exempt, as in production), and the move runs as a
//! person would: `import CODE` on B as soon as the file is there, while A still reserves. Timed
//! from the export, by the homeservers' own timestamps: every room's invite (and A's report), every
//! room's join (and B's report). Baselines, the same invites and joins sent directly: naively (no
//! request sent twice: how many land) and at the known rate (a refused request sent again when
//! Synapse's answer says, or after 1/rate, until it lands). Each baseline's account leaves the
//! rooms after it, so that every run joins over federation.
//!
//! Synapse's `rc_invites.per_user` lets one user receive 5 invites, then one per 333 s: four hours
//! for 50 rooms, on B for handoff's invites and on A as well for the old account's own (a server
//! also counts the invites it sends to each recipient, local or not); and a user's joins over
//! federation (`rc_joins.remote`) are 10, then one per 100 s. So these modes scale the rates of
//! `rc_invites` and `rc_joins` on both servers alike, bursts kept: `HANDOFF_BENCH_INVITE_RATE` is
//! `rc_invites.per_user`'s (0.03 by default, ten times Synapse's 0.003; 0.003 runs Synapse's own).
//! Every rate that paces the work scaled alike, the paced part (past the 5th invite) shrinks by
//! the scale, and the output gives it back at Synapse's rates: an estimate (handoff's probes after
//! a refusal, 15 s doubling, do not scale). `rc_message` (0.2/s after 10; every invite and join
//! counts) is not scaled: it paces nothing below about 0.1 invites per second.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::federation::{FederatedHarness, drop_file};
use common::{Harness, User, body, edit, export_file, raw};
use futures_util::stream::{self, StreamExt};
use handoff::sandbox::{RateLimit, Side, lifted};
use ruma::api::client::membership::{invite_user, join_room_by_id_or_alias, joined_rooms, leave_room};
use ruma::api::client::message::send_message_event;
use ruma::api::client::state::{get_state_event_for_key, send_state_event};
use ruma::events::StateEventType;
use ruma::events::room::message::RoomMessageEventContent;
use ruma::{OwnedRoomId, RoomId, ServerName};
use serde_json::{Value, json};

const IN_FLIGHT: usize = 16;

/// Synapse's default `rc_invites.per_user` rate (one invite per 333 s), and its burst.
const SYNAPSE_INVITE_RATE: f64 = 0.003;
const INVITE_BURST: usize = 5;

/// Which rate limits the two Synapses keep: `HANDOFF_BENCH_LIMITS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Limits {
    /// Every one lifted (unset).
    Lifted,
    /// Synapse's, but B's `rc_invites.per_user` raised (`raised`).
    Raised,
    /// Synapse's (`default`).
    Default,
}

impl Limits {
    fn from_env() -> Limits {
        match std::env::var("HANDOFF_BENCH_LIMITS").as_deref() {
            Err(_) => Limits::Lifted,
            Ok("raised") => Limits::Raised,
            Ok("default") => Limits::Default,
            Ok(other) => panic!("HANDOFF_BENCH_LIMITS={other}: `raised`, `default`, or unset for none"),
        }
    }

    /// The Synapse config (YAML) of `side`, with `rc_invites.per_user` at `rate` where it is kept.
    fn homeserver_yaml(self, side: Side, rate: f64) -> String {
        let scale = rate / SYNAPSE_INVITE_RATE;
        // Synapse's default of each, its rate times the scale (rounded: 0.3 × 10 is not 3 in f64).
        let at = |per_second: f64, burst: usize| {
            format!("{{per_second: {}, burst_count: {burst}}}", (per_second * scale * 1e6).round() / 1e6)
        };
        let per_user = match (self, side) {
            // Every rate limit lifted: the move's throughput, which B's limit on the invites one
            // user receives (5, then one each 333 s) would set alone.
            (Limits::Lifted, _) => return lifted(RateLimit::ALL),
            // B's admin raised it for the day, as handoff's message to the old account suggests
            // (it names the setting): 50 invites land at once, and a few hundred in seconds.
            (Limits::Raised, Side::B) => "{per_second: 10, burst_count: 1000}".to_owned(),
            _ => format!("{{per_second: {rate}, burst_count: {INVITE_BURST}}}"),
        };
        format!(
            "rc_invites:\n  per_room: {}\n  per_user: {per_user}\n  per_issuer: {}\nrc_joins:\n  local: {}\n  remote: {}\n",
            at(0.3, 10),
            at(0.3, 10),
            at(0.1, 10),
            at(0.01, 10),
        )
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(run());
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// A time that may be long, in seconds and in minutes or hours.
fn long(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 90.0 {
        secs(d)
    } else if s >= 5400.0 {
        format!("{s:.0} s ({:.1} h)", s / 3600.0)
    } else {
        format!("{s:.0} s ({:.1} min)", s / 60.0)
    }
}

/// The old account invites `new` into every room, which joins it through `via`, 16 in flight.
async fn direct(old: &User, new: &User, rooms: &[OwnedRoomId], via: &ServerName) -> Duration {
    let start = Instant::now();
    stream::iter(rooms).map(|room| seat(old, new, room, via)).buffer_unordered(IN_FLIGHT).count().await;
    start.elapsed()
}

/// The old account invites `new` into `room`, which joins it through `via`.
async fn seat(old: &User, new: &User, room: &RoomId, via: &ServerName) {
    let who = invite_user::v3::InviteUserId::new(new.id.clone()).into();
    old.send(invite_user::v3::Request::new(room.to_owned(), who)).await;
    let mut join = join_room_by_id_or_alias::v3::Request::new(room.to_owned().into());
    join.via = vec![via.to_owned()];
    new.send(join).await;
}

/// The writes a move to another server makes in each room, sent directly, 16 rooms in flight: the
/// seat, then the old account (on A) re-reads the power levels and gives `new` 150 (a room version
/// 12 creator's highest grantable level, as the move gives there), and `new` (on B) posts one
/// notice, as the receiving side does.
async fn direct_writes(old: &User, new: &User, rooms: &[OwnedRoomId], via: &ServerName) -> Duration {
    let start = Instant::now();
    let room_writes = async |i: usize, room: &OwnedRoomId| {
        seat(old, new, room, via).await;
        let read =
            get_state_event_for_key::v3::Request::new(room.clone(), StateEventType::RoomPowerLevels, String::new());
        let mut levels: Value = serde_json::from_str(old.send(read).await.event_or_content.get()).unwrap();
        levels["users"][new.id.as_str()] = 150.into();
        old.send(send_state_event::v3::Request::new_raw(
            room.clone(),
            StateEventType::RoomPowerLevels,
            String::new(),
            raw(levels),
        ))
        .await;
        let notice = RoomMessageEventContent::notice_plain(format!("{} has moved to {}", old.id, new.id));
        new.send(send_message_event::v3::Request::new(room.clone(), format!("bench-{i}").into(), &notice).unwrap())
            .await;
    };
    stream::iter(rooms.iter().enumerate())
        .map(|(i, room)| room_writes(i, room))
        .buffer_unordered(IN_FLIGHT)
        .count()
        .await;
    start.elapsed()
}

async fn run() {
    let limits = Limits::from_env();
    let default_n = if limits == Limits::Lifted { 500 } else { 50 };
    let n: usize = std::env::var("HANDOFF_BENCH_ROOMS").ok().and_then(|v| v.parse().ok()).unwrap_or(default_n);
    let rate: f64 = std::env::var("HANDOFF_BENCH_INVITE_RATE").ok().and_then(|v| v.parse().ok()).unwrap_or(0.03);
    // HANDOFF_BENCH_LOG=FILTER: both handoffs log at that level, and rooms B did not move are
    // looked up in B's log at the end.
    let level = std::env::var("HANDOFF_BENCH_LOG").unwrap_or_else(|_| "warn".into());
    let quiet = |_, _: &_, c: String| edit(c, "level: \"info,handoff=debug\"", &format!("level: \"{level}\""));
    let mut fh = FederatedHarness::start_with_homeservers(quiet, |side| limits.homeserver_yaml(side, rate)).await;
    // Paced, the reservation takes (N - 5) / rate: wait three times that, and an hour at least.
    let patience = match limits {
        Limits::Lifted => Duration::from_secs(1800),
        _ => Duration::from_secs_f64((3.0 * n as f64 / rate).max(3600.0)),
    };
    for side in [Side::A, Side::B] {
        let h = fh.side_mut(side);
        h.patience = patience;
        h.poll = Duration::from_millis(500);
    }
    match limits {
        Limits::Lifted => run_lifted(&fh, n).await,
        _ => run_limited(&fh, n, limits, rate).await,
    }
}

/// The lifted mode's rounds: `HANDOFF_BENCH_ROUNDS` (2 by default: one in each order).
fn rounds() -> usize {
    std::env::var("HANDOFF_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(2)
}

/// Every rate limit lifted: the move's throughput against the same work sent directly. Each part
/// gets rooms of its own, made alike (so none finds B's server in the rooms already: every join
/// goes over federation), and the order alternates over the rounds (whichever runs last meets the
/// bigger databases).
async fn run_lifted(fh: &FederatedHarness, n: usize) {
    let name_a = fh.server_name(Side::A);
    println!("a {n}-room move from {name_a} to {}:", fh.server_name(Side::B));
    let mut rates = Vec::new();
    for round in 0..rounds() {
        let baseline_first = round % 2 == 0;
        let (seats, writes, moved) = if baseline_first {
            let seats = lifted_baseline(fh, n, round, Work::Seats).await;
            let writes = lifted_baseline(fh, n, round, Work::Writes).await;
            (seats, writes, lifted_move(fh, n, round).await)
        } else {
            let moved = lifted_move(fh, n, round).await;
            let seats = lifted_baseline(fh, n, round, Work::Seats).await;
            (seats, lifted_baseline(fh, n, round, Work::Writes).await, moved)
        };
        // Rates as a share of the baseline's: the baseline's time over the move's.
        let rate = |base: Duration, took: Duration| base.as_secs_f64() / took.as_secs_f64();
        let round_rates = [rate(seats, moved.joined), rate(writes, moved.end), rate(seats, moved.end)];
        println!(
            "  round {} ({} first): every room joined {} against the invites and joins sent directly {} = {:.2} of their rate; \
             the end {} against the same writes sent directly {} = {:.2} of their rate ({:.2} of the invites and joins')",
            round + 1,
            if baseline_first { "baselines" } else { "handoff" },
            secs(moved.joined),
            secs(seats),
            round_rates[0],
            secs(moved.end),
            secs(writes),
            round_rates[1],
            round_rates[2],
        );
        rates.push(round_rates);
    }
    let mean = |i: usize| rates.iter().map(|r| r[i]).sum::<f64>() / rates.len() as f64;
    println!(
        "  mean of {} rounds: every room joined at {:.2} of the rate of the invites and joins sent directly; \
         the end at {:.2} of the same writes sent directly ({:.2} of the invites and joins alone)",
        rates.len(),
        mean(0),
        mean(1),
        mean(2),
    );
}

/// What a baseline sends directly.
#[derive(Clone, Copy)]
enum Work {
    /// The invites and joins.
    Seats,
    /// Every write the move makes in a room: [`direct_writes`].
    Writes,
}

/// A baseline of a round: a fresh old account's rooms, and a user of B's.
async fn lifted_baseline(fh: &FederatedHarness, n: usize, round: usize, work: Work) -> Duration {
    let tag = match work {
        Work::Seats => "seats",
        Work::Writes => "writes",
    };
    let old = fh.a.old_account(&format!("base{tag}{round}"), n, 10, 3).await;
    let new = fh.b.user(&format!("direct{tag}{round}")).await;
    let via = fh.server_name(Side::A);
    let took = match work {
        Work::Seats => direct(&old.user, &new, &old.rooms, &via).await,
        Work::Writes => direct_writes(&old.user, &new, &old.rooms, &via).await,
    };
    let joined = new.send(joined_rooms::v3::Request::new()).await.joined_rooms;
    assert!(old.rooms.iter().all(|r| joined.contains(r)), "the baseline left rooms behind");
    took
}

/// A move's times from the export (without what the person does between export and import).
struct Moved {
    /// To the new account's last join, by B's timestamps.
    joined: Duration,
    /// To the later of A's and B's reports.
    end: Duration,
}

/// handoff's move of a round, of another fresh old account of the same shape, as a person makes
/// it: `export --to --file` on A, and as soon as the file is there, `import` on B, while A still
/// reserves (B's rooms wait for their invites). The times are from the export, without what the
/// person does between (a DM, a file dropped).
async fn lifted_move(fh: &FederatedHarness, n: usize, round: usize) -> Moved {
    let old = fh.a.old_account(&format!("old{round}"), n, 10, 3).await;
    let new = fh.b.user(&format!("new{round}")).await;
    let dm = fh.b.dm_with_bot(&new).await;
    let start = Instant::now();
    let since = unix_ms();
    let (code, file) = export_file(&fh.a, &old.user, &old.dm, &format!("--to {}", new.id)).await;
    let exported = start.elapsed();
    let paused = Instant::now();
    drop_file(&fh.b, &new, &dm, &file).await;
    let before = new.messages_from(&dm, &fh.b.bot).await.len();
    let between = paused.elapsed();
    new.send_text(&dm, &format!("import {code}")).await;
    let reserving = async {
        let said = fh.a.bot_says(&old.user, &old.dm, 0, "the reservation's report", |b| b.contains("reserved for"));
        let said = said.await;
        (said, start.elapsed())
    };
    let importing = async {
        let said = fh.b.bot_says(&new, &dm, before, "the report", |b| b.contains("rooms moved to")).await;
        (said, start.elapsed())
    };
    let ((reserved, reserve), (report, import)) = tokio::join!(reserving, importing);
    assert!(reserved.starts_with(&format!("{n} of {n} rooms reserved")), "{reserved}");
    assert!(report.starts_with(&format!("{n} of {n} rooms moved")), "{report}");
    let mut joins = Vec::new();
    for room in &old.rooms {
        let at = stamp(&new.timeline(room).await, &new.id, "join", since);
        joins.push(at.unwrap_or_else(|| panic!("no join of the new account in {room}")));
    }
    let joined = joins.into_iter().max().unwrap_or_default().saturating_sub(between);
    println!(
        "    handoff: export --to --file on A {}; every seat reserved (A's report) {}; every room joined {}; B's report {} (from the export; the file dropped on B in between, {} not counted)",
        secs(exported),
        secs(reserve - between),
        secs(joined),
        secs(import - between),
        secs(between)
    );
    // With HANDOFF_BENCH_LOG, both handoffs' logs outlive the run's folders.
    if std::env::var_os("HANDOFF_BENCH_LOG").is_some() {
        for (side, h) in [("a", &fh.a), ("b", &fh.b)] {
            let kept = std::env::temp_dir().join(format!("handoff-bench-{side}-round{round}.log"));
            std::fs::write(&kept, h.log()).unwrap();
            println!("    {side}'s log: {}", kept.display());
        }
    }
    Moved { joined, end: reserve.max(import) - between }
}

/// A request refused: `status errcode`, and the wait Synapse asked for, if it did.
struct Refusal {
    kind: String,
    retry_after: Option<Duration>,
}

/// The URL of the client API path `path` (its segments, percent-encoded here) of `homeserver`.
fn client_url(homeserver: &str, path: &[&str]) -> reqwest::Url {
    let mut url = reqwest::Url::parse(homeserver).unwrap();
    url.path_segments_mut().unwrap().pop_if_empty().extend(["_matrix", "client", "v3"]).extend(path);
    url
}

/// POSTs `body` to `url` with `token`. Sent as plain HTTP: a refusal's `retry_after_ms` is what a
/// client reads.
async fn post(http: &reqwest::Client, url: reqwest::Url, token: &str, body: Value) -> Result<(), Refusal> {
    let sent = http.post(url).bearer_auth(token).json(&body).send().await;
    let resp = match sent {
        Ok(resp) => resp,
        Err(e) => return Err(Refusal { kind: format!("no answer ({e})"), retry_after: None }),
    };
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    let answer: Value = resp.json().await.unwrap_or_default();
    let errcode = answer["errcode"].as_str().unwrap_or("-");
    let retry_after = answer["retry_after_ms"].as_u64().map(Duration::from_millis);
    Err(Refusal { kind: format!("{} {errcode}", status.as_u16()), retry_after })
}

/// What the invites and joins sent directly came to: when each landed (from their start, in
/// order), and the refusals on the way, by request and kind.
struct Direct {
    invited: Vec<Duration>,
    joined: Vec<Duration>,
    refused: BTreeMap<String, usize>,
}

impl Direct {
    fn refusals(&self) -> String {
        if self.refused.is_empty() {
            return "none".to_owned();
        }
        let each: Vec<String> = self.refused.iter().map(|(k, n)| format!("{k} ×{n}")).collect();
        each.join(", ")
    }
}

/// The old account (on `hs_a`) invites `new` (on `hs_b`) into every room, which joins it through
/// `via`, 16 in flight, each with its own token; a refused request is sent again after the wait
/// Synapse asks for, or `retry` without one, until it lands; with no `retry`, never.
async fn direct_limited(
    (old, hs_a): (&User, &str),
    (new, hs_b): (&User, &str),
    rooms: &[OwnedRoomId],
    via: &ServerName,
    retry: Option<Duration>,
) -> Direct {
    let http = reqwest::Client::new();
    let refused = Mutex::new(BTreeMap::new());
    let start = Instant::now();
    let landed: Vec<(Option<Duration>, Option<Duration>)> = stream::iter(rooms)
        .map(|room| {
            let (http, refused) = (&http, &refused);
            async move {
                let invite_url = client_url(hs_a, &["rooms", room.as_str(), "invite"]);
                let mut join_url = client_url(hs_b, &["join", room.as_str()]);
                join_url.query_pairs_mut().append_pair("via", via.as_str());
                let invite = || post(http, invite_url.clone(), &old.token, json!({"user_id": new.id}));
                let join = || post(http, join_url.clone(), &new.token, json!({}));
                let invited = landing("invite", invite, retry, refused, start).await;
                let joined = match invited {
                    Some(_) => landing("join", join, retry, refused, start).await,
                    None => None,
                };
                (invited, joined)
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    let mut invited: Vec<Duration> = landed.iter().filter_map(|l| l.0).collect();
    let mut joined: Vec<Duration> = landed.iter().filter_map(|l| l.1).collect();
    invited.sort();
    joined.sort();
    Direct { invited, joined, refused: refused.into_inner().unwrap() }
}

/// Sends `request` until it lands (see [`direct_limited`]); when it did, from `start`.
async fn landing<F, Fut>(
    what: &str,
    request: F,
    retry: Option<Duration>,
    refused: &Mutex<BTreeMap<String, usize>>,
    start: Instant,
) -> Option<Duration>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<(), Refusal>>,
{
    loop {
        let refusal = match request().await {
            Ok(()) => return Some(start.elapsed()),
            Err(refusal) => refusal,
        };
        *refused.lock().unwrap().entry(format!("{what}: {}", refusal.kind)).or_default() += 1;
        let fallback = retry?;
        // Synapse's wait is to the millisecond of its own clock: a little more, so it has passed.
        let wait = refusal.retry_after.map_or(fallback, |w| w + Duration::from_millis(100));
        tokio::time::sleep(wait).await;
    }
}

/// `user` leaves each of `rooms` (exempt again: this is not measured), so that B's server is in
/// none of them and the next run joins over federation too, as the first did.
async fn leave_all(user: &User, rooms: &[OwnedRoomId]) {
    user.exempt().await;
    let leave = |room: &OwnedRoomId| user.try_send(leave_room::v3::Request::new(room.clone()));
    stream::iter(rooms).map(leave).buffer_unordered(IN_FLIGHT).count().await;
}

/// A B account that acts as a person at a client: under B's limits.
async fn person_on_b(fh: &FederatedHarness, name: &str) -> User {
    let user = fh.b.user(name).await;
    user.under_defaults().await;
    user
}

/// The homeserver's timestamp of `user`'s first `membership` among `events`, from `start` (unix ms).
fn stamp(events: &[Value], user: &ruma::UserId, membership: &str, start: u64) -> Option<Duration> {
    let event = events.iter().find(|e| {
        e["type"] == "m.room.member" && e["state_key"] == user.as_str() && e["content"]["membership"] == membership
    })?;
    Some(Duration::from_millis(event["origin_server_ts"].as_u64()?.saturating_sub(start)))
}

/// The bot's messages in `dm` past the first `skip`, each with its homeserver's timestamp from
/// `start` (unix ms).
async fn bot_messages(h: &Harness, user: &User, dm: &RoomId, skip: usize, start: u64) -> Vec<(Duration, String)> {
    let msgs = user.messages_from(dm, &h.bot).await;
    let at = |m: &Value| Duration::from_millis(m["origin_server_ts"].as_u64().unwrap_or(0).saturating_sub(start));
    msgs.iter().skip(skip).map(|m| (at(m), body(m).to_owned())).collect()
}

/// The first of `msgs` containing `needle`.
fn first<'a>(msgs: &'a [(Duration, String)], needle: &str) -> Option<&'a (Duration, String)> {
    msgs.iter().find(|(_, b)| b.contains(needle))
}

/// The rooms a report lists as skipped or failed, counted by why ("• room: why" lines).
fn not_moved(report: &str) -> BTreeMap<&str, usize> {
    let mut why = BTreeMap::new();
    for line in report.lines().filter_map(|l| l.strip_prefix("• ")) {
        *why.entry(line.split_once(": ").map_or(line, |(_, w)| w)).or_default() += 1;
    }
    why
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// A figure's label and value, aligned.
fn line(label: &str, value: impl std::fmt::Display) {
    println!("  {label:<52} {value}");
}

/// Paced times given back at Synapse's rates: what came past the `burst`'s end, times `scale`.
struct Extrapolation {
    burst: Duration,
    scale: f64,
}

impl Extrapolation {
    fn at_synapse(&self, t: Duration) -> Duration {
        self.burst + t.saturating_sub(self.burst).mul_f64(self.scale)
    }
}

/// When the last of `times` came if there are `n`: every one.
fn every(times: &[Duration], n: usize) -> Option<Duration> {
    (times.len() == n).then(|| times.iter().max().copied()).flatten()
}

/// `a` / `b`, or why not.
fn ratio(a: Option<Duration>, b: Option<Duration>) -> String {
    match (a, b) {
        (Some(a), Some(b)) => match a.as_secs_f64() / b.as_secs_f64() {
            r if r >= 0.5 => format!("{r:.2}×"),
            r => format!("{r:.4}× (1/{:.0})", 1.0 / r),
        },
        _ => "- (not every room)".to_owned(),
    }
}

/// The interval between landings past the burst (the pace that got through), if there were some.
fn pace(times: &[Duration]) -> Option<Duration> {
    let mut sorted = times.to_vec();
    sorted.sort();
    let past = sorted.len().checked_sub(INVITE_BURST).filter(|&k| k > 0)?;
    Some((sorted[sorted.len() - 1] - sorted[INVITE_BURST - 1]) / past as u32)
}

async fn run_limited(fh: &FederatedHarness, n: usize, limits: Limits, rate: f64) {
    let (name_a, name_b) = (fh.server_name(Side::A), fh.server_name(Side::B));
    let scale = rate / SYNAPSE_INVITE_RATE;
    let raised = if limits == Limits::Raised { ", B's rc_invites.per_user raised" } else { "" };
    println!("a {n}-room move from {name_a} to {name_b}, Synapse's default rate limits on both servers{raised}:");
    for side in [Side::A, Side::B] {
        let yaml = limits.homeserver_yaml(side, rate);
        line(&format!("{side:?}'s Synapse"), yaml.trim_end().replace("\n ", "").replace('\n', "; "));
    }
    if scale != 1.0 {
        println!(
            "  (the rates of rc_invites and rc_joins are {scale:.1}× Synapse's, the bursts Synapse's; \"at Synapse's\" \
             below is the time to the {INVITE_BURST}th invite and {scale:.1}× the time past it)"
        );
    }
    let old = fh.a.old_account("old", n, 10, 3).await;
    // From here the old account is a person at a client, under A's limits (it made its rooms
    // exempt: 50 at rc_room_creation's default would take 40 minutes).
    old.user.under_defaults().await;
    let (hs_a, hs_b) = (fh.a.synapse().url.as_str(), fh.b.synapse().url.as_str());
    let retry = Duration::from_secs_f64(1.0 / rate);

    // Each baseline invites a new account of its own: the limit on invites counts per recipient.
    let naive_new = person_on_b(fh, "naive").await;
    let naive = direct_limited((&old.user, hs_a), (&naive_new, hs_b), &old.rooms, &name_a, None).await;
    line(
        "direct, naive (no request sent twice)",
        format!("{} of {n} invites landed, {} joined", naive.invited.len(), naive.joined.len()),
    );
    line("", format!("refused: {}", naive.refusals()));
    leave_all(&naive_new, &old.rooms).await;
    let paced_new = person_on_b(fh, "paced").await;
    let paced = direct_limited((&old.user, hs_a), (&paced_new, hs_b), &old.rooms, &name_a, Some(retry)).await;
    let (paced_invited, paced_joined) = (every(&paced.invited, n), every(&paced.joined, n));
    let show = |t: Option<Duration>| t.map_or_else(|| "never".to_owned(), long);
    line(
        "direct, at the known rate (refusals sent again)",
        format!("every room invited {}, joined {}", show(paced_invited), show(paced_joined)),
    );
    line("", format!("refused: {}", paced.refusals()));
    let direct_at = paced.invited.get(INVITE_BURST - 1).map(|&burst| Extrapolation { burst, scale });
    if let Some(p) = pace(&paced.invited) {
        line("", format!("past the {INVITE_BURST}th, an invite landed each {}", secs(p)));
    }
    if let (Some(x), false) = (&direct_at, paced.refused.is_empty() || scale == 1.0) {
        let at = |t: Option<Duration>| t.map_or_else(|| "-".to_owned(), |t| long(x.at_synapse(t)));
        line("", format!("at Synapse's: invited {}, joined {}", at(paced_invited), at(paced_joined)));
    }

    leave_all(&paced_new, &old.rooms).await;
    // Every invite and join is an event of rc_message's too (0.2/s after 10: not scaled, and it
    // paces nothing at these rates): its burst back before the old account sends `export`.
    tokio::time::sleep(Duration::from_secs(50)).await;

    // handoff, as a person does it: the import asked for as soon as the file is on B, the
    // reservation still going.
    let new = person_on_b(fh, "new").await;
    let skip_a = old.user.messages_from(&old.dm, &fh.a.bot).await.len();
    let (start, start_ms) = (Instant::now(), unix_ms());
    let (code, file) = export_file(&fh.a, &old.user, &old.dm, &format!("--to {}", new.id)).await;
    let exported = start.elapsed();
    let dm = fh.b.dm_with_bot(&new).await;
    drop_file(&fh.b, &new, &dm, &file).await;
    let skip_b = new.messages_from(&dm, &fh.b.bot).await.len();
    new.send_text(&dm, &format!("import {code}")).await;
    let asked = start.elapsed();
    tokio::join!(
        fh.a.bot_says(&old.user, &old.dm, skip_a, "the reservation's report", |b| b.contains("reserved for")),
        fh.b.bot_says(&new, &dm, skip_b, "the import's report", |b| b.contains("rooms moved to")),
    );
    // When each thing happened, by the homeservers' own timestamps (one machine, one clock).
    let a_msgs = bot_messages(&fh.a, &old.user, &old.dm, skip_a, start_ms).await;
    let b_msgs = bot_messages(&fh.b, &new, &dm, skip_b, start_ms).await;
    let (reserved_at, reserved) = first(&a_msgs, "reserved for").unwrap().clone();
    let (moved_at, moved) = first(&b_msgs, "rooms moved to").unwrap().clone();
    let (mut invited, mut joined) = (Vec::new(), Vec::new());
    for room in &old.rooms {
        let timeline = old.user.timeline(room).await;
        invited.extend(stamp(&timeline, &new.id, "invite", start_ms));
        joined.extend(stamp(&timeline, &new.id, "join", start_ms));
    }
    invited.sort();
    let now_joined = new.send(joined_rooms::v3::Request::new()).await.joined_rooms;
    let (all_invited, all_joined) = (every(&invited, n), every(&joined, n));

    println!("  handoff, from the export:");
    line("export --to --file on A (capture)", secs(exported));
    line("import CODE sent on B (the file there)", secs(asked));
    if let Some((t, _)) = first(&a_msgs, "limits the invites") {
        line("A tells the old account B limits the invites", secs(*t));
    }
    if let Some((t, _)) = first(&a_msgs, "at full speed again") {
        line("A tells it invites land at full speed again", secs(*t));
    }
    line(&format!("every room invited ({} of {n})", invited.len()), show(all_invited));
    line("A's report", format!("{}  \"{}\"", long(reserved_at), reserved.lines().next().unwrap_or("")));
    line(&format!("every room joined ({} of {n})", joined.len()), show(all_joined));
    line("B's report", format!("{}  \"{}\"", long(moved_at), moved.lines().next().unwrap_or("")));
    for (why, count) in not_moved(&moved) {
        line("", format!("{count} not moved: {why}"));
    }
    if std::env::var_os("HANDOFF_BENCH_LOG").is_some() {
        let log = fh.b.log();
        let again = log.lines().filter(|l| l.contains("the join is refused yet")).count();
        println!("  B's joins refused just after their invite came, tried again: {again}");
        for room in old.rooms.iter().filter(|r| !now_joined.contains(r)) {
            println!("  B's log of {room}, not joined:");
            for l in log.lines().filter(|l| l.contains(room.as_str())) {
                println!("    {l}");
            }
        }
    }
    line(
        "the new account's joined_rooms, of the old rooms",
        format!("{} of {n}", old.rooms.iter().filter(|r| now_joined.contains(r)).count()),
    );
    if let Some(p) = pace(&invited) {
        line("", format!("past the {INVITE_BURST}th, an invite landed each {}", secs(p)));
    }
    let paced_here = first(&a_msgs, "limits the invites").is_some();
    let handoff_at = invited.get(INVITE_BURST - 1).map(|&burst| Extrapolation { burst, scale });
    if let (Some(x), true) = (&handoff_at, paced_here && scale != 1.0) {
        let at = |t: Option<Duration>| t.map_or_else(|| "-".to_owned(), |t| long(x.at_synapse(t)));
        line(
            "",
            format!(
                "at Synapse's: invited {}, A's report {}, joined {}",
                at(all_invited),
                long(x.at_synapse(reserved_at)),
                at(all_joined)
            ),
        );
    }

    println!("  handoff against the direct run at the known rate:");
    line("every room invited", ratio(all_invited, paced_invited));
    line("every room joined", ratio(all_joined, paced_joined));
    if let (Some(h), Some(d)) = (&handoff_at, &direct_at)
        && scale != 1.0
    {
        // handoff's figures stay as measured where nothing paced them.
        let back =
            |x: &Extrapolation, paced: bool, t: Option<Duration>| t.map(|t| if paced { x.at_synapse(t) } else { t });
        let paced_there = !paced.refused.is_empty();
        line(
            "at Synapse's rates: every room invited",
            ratio(back(h, paced_here, all_invited), back(d, paced_there, paced_invited)),
        );
        line(
            "at Synapse's rates: every room joined",
            ratio(back(h, paced_here, all_joined), back(d, paced_there, paced_joined)),
        );
    }
}
