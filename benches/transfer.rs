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
//!   and its peak memory.
//!
//! Run: `cargo bench --bench transfer` (N = 500, 4 paired rounds; `HANDOFF_BENCH_ROOMS=100` and
//! `HANDOFF_BENCH_ROUNDS=2` for a quicker run; `HANDOFF_BENCH_CRITERION_ONLY=1` for the paired rounds alone).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{Harness, User, edit, with_concurrency};
use futures_util::stream::{self, StreamExt};
use ruma::api::client::filter::{FilterDefinition, RoomEventFilter, RoomFilter};
use ruma::api::client::membership::{invite_user, join_room_by_id, joined_rooms};
use ruma::api::client::message::send_message_event;
use ruma::api::client::room::create_room;
use ruma::api::client::state::{get_state_event_for_key, get_state_events, send_state_event};
use ruma::api::client::sync::sync_events;
use ruma::events::StateEventType;
use ruma::events::room::message::RoomMessageEventContent;
use ruma::serde::Raw;
use ruma::{OwnedRoomId, RoomId};

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(run());
}

fn rooms_n() -> usize {
    std::env::var("HANDOFF_BENCH_ROOMS").ok().and_then(|v| v.parse().ok()).unwrap_or(500)
}

/// Waits (up to 15 minutes) for a bot message in `dm` containing `text`, after `before` messages.
async fn wait_reply(h: &Harness, user: &User, dm: &RoomId, before: usize, text: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let msgs = user.messages_from(dm, &h.bot).await;
        if let Some(m) =
            msgs.iter().skip(before).find(|m| m["content"]["body"].as_str().is_some_and(|b| b.contains(text)))
        {
            return m["content"]["body"].as_str().unwrap().to_owned();
        }
        assert!(Instant::now() < deadline, "no reply containing {text:?}");
        // Not faster: each poll is a request the homeserver serves instead of the transfer.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Sends a command and times it until the bot's reply containing `text`.
async fn timed_command(h: &Harness, user: &User, dm: &RoomId, command: &str, text: &str) -> (Duration, String) {
    let before = user.messages_from(dm, &h.bot).await.len();
    let start = Instant::now();
    user.send_text(dm, command).await;
    let reply = wait_reply(h, user, dm, before, text).await;
    (start.elapsed(), reply)
}

fn code_in(text: &str) -> String {
    text.lines().map(str::trim).find(|l| l.len() == 34 && l.split('-').count() == 7).expect("a code").to_owned()
}

/// utime + stime of a process, from /proc.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10) // CLK_TCK is 100 on Linux
}

/// Peak resident memory of a process, in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 =
        status.lines().find(|l| l.starts_with("VmHWM:")).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    kb / 1024.0
}

async fn create_rooms(owner: &User, n: usize) -> Vec<OwnedRoomId> {
    stream::iter(0..n)
        .map(|i| async move {
            let mut req = create_room::v3::Request::new();
            req.name = Some(format!("bench room {i:03}"));
            owner.send(req).await.room_id
        })
        .buffer_unordered(8)
        .collect()
        .await
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

/// Re-reads the room's power levels and gives `new` the level the engine gives in rooms the old
/// account created (150: a room version 12 creator's highest grantable level).
async fn raise_power(old: &User, new: &User, room: &OwnedRoomId) {
    let req = get_state_event_for_key::v3::Request::new(room.clone(), StateEventType::RoomPowerLevels, String::new());
    let mut pl: serde_json::Value = serde_json::from_str(old.send(req).await.event_or_content.get()).unwrap();
    pl["users"][new.id.as_str()] = 150.into();
    let raw = Raw::from_json(serde_json::value::to_raw_value(&pl).unwrap());
    old.send(send_state_event::v3::Request::new_raw(room.clone(), StateEventType::RoomPowerLevels, String::new(), raw))
        .await;
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

/// The old account invites the new one, which joins: with the users' own tokens.
async fn seat(old: &User, new: &User, room: &OwnedRoomId) {
    let who = invite_user::v3::InviteUserId::new(new.id.clone()).into();
    old.send(invite_user::v3::Request::new(room.clone(), who)).await;
    new.send(join_room_by_id::v3::Request::new(room.clone())).await;
}

/// The same invite and join through the acting registration (`?user_id=`), as the engine sends them.
async fn seat_as(hs: &handoff::homeserver::Homeserver, old: &User, new: &User, room: &OwnedRoomId) {
    let who = invite_user::v3::InviteUserId::new(new.id.clone()).into();
    hs.send_as(&old.id, invite_user::v3::Request::new(room.clone(), who)).await.unwrap();
    hs.send_as(&new.id, join_room_by_id::v3::Request::new(room.clone())).await.unwrap();
}

/// `raise_power` through the acting registration.
async fn raise_power_as(hs: &handoff::homeserver::Homeserver, old: &User, new: &User, room: &OwnedRoomId) {
    let req = get_state_event_for_key::v3::Request::new(room.clone(), StateEventType::RoomPowerLevels, String::new());
    let resp = hs.send_as(&old.id, req).await.unwrap();
    let mut pl: serde_json::Value = serde_json::from_str(resp.event_or_content.get()).unwrap();
    pl["users"][new.id.as_str()] = 150.into();
    let raw = Raw::from_json(serde_json::value::to_raw_value(&pl).unwrap());
    let req = send_state_event::v3::Request::new_raw(room.clone(), StateEventType::RoomPowerLevels, String::new(), raw);
    hs.send_as(&old.id, req).await.unwrap();
}

fn move_notice(old: &User, new: &User) -> RoomMessageEventContent {
    RoomMessageEventContent::notice_plain(format!("{} has moved to {}", old.id, new.id))
}

/// The homeserver's ceiling: invite + join for every room, sent directly with `concurrency` in flight.
async fn direct_moves(old: &User, new: &User, rooms: &[OwnedRoomId], concurrency: usize) -> Duration {
    timed_over_rooms(rooms, concurrency, |_, r| seat(old, new, r)).await
}

/// Invite + join for every room through the acting registration (`?user_id=`), as the engine sends them.
async fn direct_moves_as(
    hs: &handoff::homeserver::Homeserver,
    old: &User,
    new: &User,
    rooms: &[OwnedRoomId],
    concurrency: usize,
) -> Duration {
    timed_over_rooms(rooms, concurrency, |_, r| seat_as(hs, old, new, r)).await
}

/// The same work as the engine per room, sent directly: invite, join, re-read and raise the power
/// level, one notice. What the engine adds on top of this is its own overhead.
async fn direct_full_moves(old: &User, new: &User, rooms: &[OwnedRoomId], concurrency: usize) -> Duration {
    timed_over_rooms(rooms, concurrency, |i, r| async move {
        seat(old, new, r).await;
        raise_power(old, new, r).await;
        let req = send_message_event::v3::Request::new(r.clone(), format!("bench-{i}").into(), &move_notice(old, new));
        old.send(req.unwrap()).await;
    })
    .await
}

/// The same work again, through the acting registration (`?user_id=`), as the engine sends it.
async fn direct_full_moves_as(
    hs: &handoff::homeserver::Homeserver,
    old: &User,
    new: &User,
    rooms: &[OwnedRoomId],
    concurrency: usize,
) -> Duration {
    timed_over_rooms(rooms, concurrency, |i, r| async move {
        seat_as(hs, old, new, r).await;
        raise_power_as(hs, old, new, r).await;
        let req =
            send_message_event::v3::Request::new(r.clone(), format!("bench-as-{i}").into(), &move_notice(old, new));
        hs.send_as(&old.id, req.unwrap()).await.unwrap();
    })
    .await
}

/// What each of the engine's writes costs the homeserver on its own: every room's invite, then every
/// join, then every power-level change, then every notice, each phase with `concurrency` in flight.
async fn per_step_costs(old: &User, new: &User, rooms: &[OwnedRoomId], concurrency: usize) -> [Duration; 4] {
    let invite = timed_over_rooms(rooms, concurrency, |_, r| async move {
        let who = invite_user::v3::InviteUserId::new(new.id.clone()).into();
        old.send(invite_user::v3::Request::new(r.clone(), who)).await;
    })
    .await;
    let join = timed_over_rooms(rooms, concurrency, |_, r| async move {
        new.send(join_room_by_id::v3::Request::new(r.clone())).await;
    })
    .await;
    let power = timed_over_rooms(rooms, concurrency, |_, r| raise_power(old, new, r)).await;
    let notice = timed_over_rooms(rooms, concurrency, |i, r| async move {
        let req = send_message_event::v3::Request::new(r.clone(), format!("step-{i}").into(), &move_notice(old, new));
        old.send(req.unwrap()).await;
    })
    .await;
    [invite, join, power, notice]
}

/// `elapsed_ms` of the last log line containing `phase`.
fn last_elapsed_ms(log: &str, phase: &str) -> u64 {
    let line = log.lines().rev().find(|l| l.contains(phase)).unwrap_or_else(|| panic!("no {phase:?} in the log"));
    let value = line.split_once("elapsed_ms=").expect("elapsed_ms").1;
    value.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

/// A fresh old account with `n` rooms and a DM with the bot, so every run sees rooms of the same
/// shape (earlier runs would otherwise have added members to the rooms of later ones).
async fn old_account(h: &Harness, name: &str, n: usize) -> (User, Vec<OwnedRoomId>, OwnedRoomId) {
    let old = h.user(name).await;
    let rooms = create_rooms(&old, n).await;
    let dm = old.create_dm(&h.bot).await;
    old.wait_for_messages(&dm, &h.bot, 1).await;
    (old, rooms, dm)
}

fn default_concurrency() -> usize {
    handoff::config::HandoffConfig::default().concurrency.0
}

/// A fresh Synapse and handoff for each measurement: every figure is taken on a homeserver in
/// the same state (a database grown by earlier measurements would slow the later ones).
async fn fresh(concurrency: usize) -> Harness {
    Harness::start_with(|c| {
        let quiet = edit(c, "level: \"info,handoff=debug\"", "level: \"warn,handoff::transfer=info\"");
        with_concurrency(quiet, concurrency)
    })
    .await
}

async fn acting(h: &Harness) -> handoff::homeserver::Homeserver {
    let token = h.config_value("appservice.acting.as_token");
    handoff::homeserver::Homeserver::connect(&h.synapse().url, &token, reqwest::Client::new()).await.unwrap()
}

/// One engine run: `export --to`, then `import`, timed to every room joined and to the report.
struct EngineRun {
    concurrency: usize,
    whole: f64,
    joined: f64,
    cpu: Duration,
    rss: f64,
}

async fn engine_run(n: usize, c: usize) -> EngineRun {
    let h = fresh(c).await;
    let (old, _, odm) = old_account(&h, "old", n).await;
    engine_on(&h, &old, &odm, "new", n, c).await
}

/// `export --to` on `old`, then `import` on a new account `target`, on a running harness.
async fn engine_on(h: &Harness, old: &User, odm: &RoomId, target: &str, n: usize, c: usize) -> EngineRun {
    let target = h.user(target).await;
    let code =
        code_in(&timed_command(h, old, odm, &format!("export --to {}", target.id), "Your transfer code").await.1);
    let tdm = target.create_dm(&h.bot).await;
    target.wait_for_messages(&tdm, &h.bot, 1).await;
    let pid = h.handoff_pid();
    let cpu_before = cpu_time(pid);
    let (took, report) = timed_command(h, &target, &tdm, &format!("import {code}"), "rooms moved to").await;
    let cpu = cpu_time(pid) - cpu_before;
    assert!(report.starts_with(&format!("{n} of {n} rooms moved")), "{report}");
    // The engine logs when every room is joined (pass 1) and when it is done; the time from the
    // command to the last join is the command's time less what came after that log line.
    let log = h.log();
    let after_joins = last_elapsed_ms(&log, "transfer done") - last_elapsed_ms(&log, "rooms joined");
    let phases = ["planned", "rooms joined", "rooms done", "transfer done"];
    let lines: Vec<&str> = log.lines().filter(|l| phases.iter().any(|p| l.contains(p))).collect();
    for line in &lines[lines.len().saturating_sub(4)..] {
        println!("      {}", line.split_once("handoff::transfer::run:").map_or(*line, |(_, rest)| rest.trim()));
    }
    EngineRun {
        concurrency: c,
        whole: rate(n, took),
        joined: rate(n, took - Duration::from_millis(after_joins)),
        cpu,
        rss: peak_rss_mib(pid),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The criterion, measured in paired rounds: in each, one fresh homeserver holds three old
/// accounts of `n` rooms each; the ceiling (invite+join sent directly at 8 and at 16 in flight, the
/// best of the two) and the engine at its default run on it back to back, in alternating order so
/// neither always meets the bigger database. Returns the medians: ceiling, engine to every room
/// joined, engine to the end.
async fn paired_rounds(n: usize, rounds: usize) -> (f64, f64, f64) {
    let default = default_concurrency();
    let (mut ceilings, mut joined, mut whole, mut ratios) = (vec![], vec![], vec![], vec![]);
    for round in 0..rounds {
        let h = fresh(default).await;
        let (o8, r8, _) = old_account(&h, "old-c8", n).await;
        let (o16, r16, _) = old_account(&h, "old-c16", n).await;
        let (oe, _, oedm) = old_account(&h, "old-engine", n).await;
        let (n8, n16) = (h.user("new-c8").await, h.user("new-c16").await);
        let ceiling = |()| async {
            let a = rate(n, direct_moves(&o8, &n8, &r8, 8).await);
            let b = rate(n, direct_moves(&o16, &n16, &r16, 16).await);
            println!("    direct invite+join: {a:.1} rooms/s at 8, {b:.1} at 16");
            a.max(b)
        };
        let (c, e) = if round % 2 == 0 {
            let c = ceiling(()).await;
            (c, engine_on(&h, &oe, &oedm, "new-engine", n, default).await)
        } else {
            let e = engine_on(&h, &oe, &oedm, "new-engine", n, default).await;
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
        joined.push(e.joined);
        whole.push(e.whole);
        ratios.push(e.joined / c);
    }
    // Whichever runs first on a fresh homeserver is faster, so the order alternates and the
    // rounds' ratios are averaged (an even number of rounds balances the two orders).
    println!(
        "  mean of {rounds} rounds: every room joined at {:.2} of the invite+join ceiling (rounds: {}; odd rounds ran the ceiling first)",
        ratios.iter().sum::<f64>() / ratios.len() as f64,
        ratios.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(", ")
    );
    (median(ceilings), median(joined), median(whole))
}

async fn run() {
    let n = rooms_n();
    println!(
        "handoff benchmark: {n} rooms, Synapse {} on loopback, a fresh homeserver for each figure",
        handoff::sandbox::SYNAPSE_VERSION
    );

    // HANDOFF_BENCH_CRITERION_ONLY=1: just the paired rounds.
    let criterion_only = std::env::var_os("HANDOFF_BENCH_CRITERION_ONLY").is_some();
    // Capture: the minimum requests at their best concurrency, capture() itself, and `export`.
    if !criterion_only {
        let h = fresh(default_concurrency()).await;
        let t = Instant::now();
        let (alice, _, adm) = old_account(&h, "alice", n).await;
        println!("setup: created {n} rooms in {:.1} s", t.elapsed().as_secs_f64());
        let direct = direct_capture(&alice, 4).await.min(direct_capture(&alice, 16).await);
        let acting = acting(&h).await;
        let opts = handoff::bundle::capture::CaptureOptions {
            only: None,
            exclude: vec![],
            skip: vec![],
            history: 0,
            pool: std::sync::Arc::new(tokio::sync::Semaphore::new(8)),
            max_rooms: usize::MAX,
            client: "bench".into(),
        };
        let start = Instant::now();
        let bundle =
            handoff::bundle::capture::capture(&acting, &alice.id, &h.synapse().url, &opts).await.unwrap().bundle;
        let library = start.elapsed();
        assert_eq!(bundle.rooms.len(), n + 1, "every room and the bot's DM");
        let (capture, _) = timed_command(&h, &alice, &adm, "export", "Your transfer code").await;
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
    let (paired_ceiling, paired_joined, paired_whole) = paired_rounds(n, rounds).await;
    if criterion_only {
        return;
    }

    println!("\ntransfer ({n} rooms), where the time goes (one run each, a fresh homeserver for each)");
    let mut ceiling: f64 = 0.0;
    for c in [4, 8, 16, 32] {
        let h = fresh(default_concurrency()).await;
        let (old, rooms, _) = old_account(&h, "old", n).await;
        let r = rate(n, direct_moves(&old, &h.user("new").await, &rooms, c).await);
        println!("  direct invite+join at {c} in flight: {r:.1} rooms/s");
        ceiling = ceiling.max(r);
    }
    println!("  ceiling (the best of these): {ceiling:.1} rooms/s");
    for c in [8, 16] {
        let h = fresh(default_concurrency()).await;
        let (old, rooms, _) = old_account(&h, "old", n).await;
        let acting = acting(&h).await;
        let r = rate(n, direct_moves_as(&acting, &old, &h.user("new").await, &rooms, c).await);
        println!(
            "  the same invites and joins through the acting registration (?user_id=) at {c}: {r:.1} rooms/s = {:.2} of the ceiling",
            r / ceiling
        );
    }

    let bound = {
        let h = fresh(default_concurrency()).await;
        let (old, rooms, _) = old_account(&h, "old", n).await;
        let costs = per_step_costs(&old, &h.user("new").await, &rooms, 16).await;
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
        let (old, rooms, _) = old_account(&h, "old", n).await;
        rate(n, direct_full_moves(&old, &h.user("new").await, &rooms, 16).await)
    };
    println!("  the same four writes room by room, direct at 16: {same_work:.1} rooms/s");
    let same_work_as = {
        let h = fresh(default_concurrency()).await;
        let (old, rooms, _) = old_account(&h, "old", n).await;
        let acting = acting(&h).await;
        rate(n, direct_full_moves_as(&acting, &old, &h.user("new").await, &rooms, 16).await)
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
        "  default ({default}, the paired rounds' medians) / one-at-a-time: {:.2}x to every room joined, {:.2}x to the end; medians: ceiling {paired_ceiling:.1}, joined {paired_joined:.1}, whole {paired_whole:.1} rooms/s",
        paired_joined / results.last().unwrap().joined,
        paired_whole / results.last().unwrap().whole
    );
}
