//! Ingest: how fast `handoff serve` takes the homeserver's transactions, against a minimal
//! application service on the mautrix Python framework doing the same work, in the same run.
//!
//! A load generator sends application service transactions of 100 realistic events each (what a
//! homeserver pushes to a bot that sits in busy group rooms and a few DMs: chatter, replies, edits,
//! reactions, other users' joins and leaves, a few state events, the bot's own notices; never a
//! command to the bot, which would make handoff write to the homeserver) over one keep-alive
//! HTTP/1.1 connection, one transaction at a time, as Synapse does. One transaction in twenty is
//! followed by a repeat of a recent transaction ID, as a homeserver's retry would send it. Both
//! servers get the same bytes: a warm-up, then the measured transactions in paired rounds (each
//! round one slice to each server in turn, alternating which goes first), so that a busy moment
//! of a shared machine falls on both alike.
//!
//! Reported per server: events/s (new events over the measured run's wall time), p50/p99/max
//! latency per transaction, peak resident memory (VmHWM) and CPU time per 1,000 events (counted
//! until the server is idle again, so it includes work done after the 200); then the ratio and
//! the targets (handoff >= 10x mautrix's events/s, p99 < 5 ms, < 50 MB resident). A missed
//! target is reported, not a failure: the bench exits non-zero only when something breaks.
//!
//! handoff runs as in the end-to-end tests (the real binary, with a throwaway Synapse for its
//! start-up checks) at the shipped log level; the load goes straight to its port. The baseline
//! (`benches/ingest/mautrix_baseline.py`: mautrix's `AppService` with its own transaction handler
//! and default state store) is installed from PyPI once, into `~/.cache/handoff/mautrix-<version>`.
//!
//! Run: `cargo bench --bench ingest` (2,000 measured transactions in 4 rounds after 200 warm-up
//! ones; `HANDOFF_BENCH_INGEST_TXNS`, `HANDOFF_BENCH_INGEST_WARMUP` and `HANDOFF_BENCH_INGEST_ROUNDS`
//! change these, e.g. `HANDOFF_BENCH_INGEST_TXNS=300 HANDOFF_BENCH_INGEST_WARMUP=50` for a quick run).

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::VecDeque;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use axum::body::Bytes;
use base64::Engine as _;
use common::{Harness, cpu_time, edit, peak_rss_kib};
use handoff::sandbox::run_command;
use serde_json::{Value, json};

/// The mautrix release the baseline runs on (pinned with its dependencies in requirements.txt).
const MAUTRIX_VERSION: &str = "0.21.1";
const REQUIREMENTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/ingest/requirements.txt");
const BASELINE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/ingest/mautrix_baseline.py");

const EVENTS_PER_TXN: usize = 100;
/// One transaction in this many is followed by a repeat of a recent transaction ID.
const REPLAY_EVERY: usize = 20;

const TARGET_RATIO: f64 = 10.0;
const TARGET_P99: Duration = Duration::from_millis(5);
const TARGET_RSS_MB: f64 = 50.0;

fn main() -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(run())
}

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

async fn run() -> Result<()> {
    let measured_n = env_count("HANDOFF_BENCH_INGEST_TXNS", 2000).max(1);
    let warmup_n = env_count("HANDOFF_BENCH_INGEST_WARMUP", 200);
    let rounds = env_count("HANDOFF_BENCH_INGEST_ROUNDS", 4).max(1);

    // Installed first: a failing install stops the bench before anything is measured.
    let python = ensure_mautrix_installed()?;

    let mut world = World::new(20_261_129);
    let warmup = world.transactions("warmup", warmup_n);
    let measured = world.transactions("txn", measured_n);
    let fresh: Vec<&Txn> = measured.iter().filter(|t| !t.replay).collect();
    let fresh_events: usize = fresh.iter().map(|t| t.events).sum();
    let avg_kib = fresh.iter().map(|t| t.body.len()).sum::<usize>() as f64 / fresh.len() as f64 / 1024.0;
    println!(
        "ingest: {} transactions of {EVENTS_PER_TXN} events ({} events) and {} repeated transaction IDs, \
         {avg_kib:.0} KiB each on average;\n        one keep-alive HTTP/1.1 connection per server, one transaction at \
         a time, after {warmup_n} warm-up transactions, in {rounds} paired rounds",
        fresh.len(),
        thousands(fresh_events as f64),
        measured.len() - fresh.len(),
    );

    // handoff: the real binary, started as the end-to-end tests start it, at the shipped log level
    // (the tests' harness turns on debug logging for handoff).
    let t = Instant::now();
    // Synapse's default rate limits: nothing measured goes through Synapse (the transactions are
    // pushed to handoff directly).
    let h = Harness::start_with(|c| edit(c, "level: \"info,handoff=debug\"", "level: info")).await;
    let token = h.config_value("appservice.hs_token");
    let port = config_port(&h.sandbox.config_path)?;
    let mut handoff = Server::new(format!("http://127.0.0.1:{port}"), h.handoff_pid())?;
    println!("        handoff ({}) serving on {} after {:.1} s", binary_name(), handoff.url, t.elapsed().as_secs_f64());

    // mautrix: the baseline script on its own port; it needs no homeserver.
    let tmp = tempfile::tempdir()?;
    let baseline = Baseline::start(&python, tmp.path(), &token).await?;
    let mut mautrix = Server::new(baseline.url.clone(), baseline.pid())?;

    // Both run side by side (each idle while the other is measured), in paired rounds of equal
    // slices of the measured transactions, alternating which goes first: a busy moment of the
    // machine falls on both alike.
    for server in [&mut handoff, &mut mautrix] {
        server.send(&token, &warmup).await?;
        settle(server.pid).await;
    }
    let slice = measured.len().div_ceil(rounds);
    for (round, txns) in measured.chunks(slice).enumerate() {
        let (first, second) = if round % 2 == 0 { (&mut handoff, &mut mautrix) } else { (&mut mautrix, &mut handoff) };
        let a = first.measure(&token, txns).await?;
        let b = second.measure(&token, txns).await?;
        let (h_rate, m_rate) = if round % 2 == 0 { (a, b) } else { (b, a) };
        println!(
            "        round {}/{}: handoff {} events/s, mautrix {} events/s ({:.1}x)",
            round + 1,
            measured.chunks(slice).len(),
            thousands(h_rate),
            thousands(m_rate),
            h_rate / m_rate
        );
    }
    handoff.peak_rss_kib = peak_rss_kib(handoff.pid).context("handoff's peak memory")?;
    mautrix.peak_rss_kib = peak_rss_kib(mautrix.pid).context("mautrix's peak memory")?;
    let summary = baseline.stop()?;
    let handoff_log = h.log();
    drop(h);

    report(&handoff, &mautrix, fresh_events);

    let mut notes = Vec::new();
    let field = |name: &str| summary.split_whitespace().find_map(|w| w.strip_prefix(name)?.strip_prefix('='));
    let expected_txns = warmup.iter().chain(&measured).filter(|t| !t.replay).count().to_string();
    match (field("transactions"), field("events"), field("for_the_bot")) {
        (Some(txns), Some(events), Some(mine)) => {
            if txns != expected_txns {
                notes.push(format!("mautrix recorded {txns} transactions, {expected_txns} were distinct"));
            }
            notes.push(format!(
                "{mine} of the {events} events sent (warm-up included, repeats not) pass handoff's filter for \
                 events the bot acts on (counted by the baseline): handoff stores and queues those"
            ));
        }
        _ => notes.push(format!("the mautrix baseline printed no summary: {summary:?}")),
    }
    let complaints: Vec<&str> = handoff_log.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).collect();
    if !complaints.is_empty() {
        notes.push(format!("handoff logged {} warnings or errors, the first: {}", complaints.len(), complaints[0]));
    }
    for note in notes {
        println!("note: {note}");
    }
    Ok(())
}

/// One request of the load: a transaction ID and its body.
struct Txn {
    id: String,
    body: Bytes,
    /// Events in the body.
    events: usize,
    /// A repeat of an ID sent before (its events are not counted as new).
    replay: bool,
}

/// One server under the load, and what it did in the measured rounds.
struct Server {
    url: String,
    pid: u32,
    /// One keep-alive connection: Synapse keeps one per application service and sends the next
    /// transaction when the last one is answered.
    client: reqwest::Client,
    wall: Duration,
    /// Per measured transaction.
    latencies: Vec<Duration>,
    new_events: usize,
    /// CPU time from the start of each measured slice until the server was idle again.
    cpu: Duration,
    peak_rss_kib: u64,
}

impl Server {
    fn new(url: String, pid: u32) -> Result<Server> {
        let client = reqwest::Client::builder().pool_max_idle_per_host(1).build()?;
        Ok(Server {
            url,
            pid,
            client,
            wall: Duration::ZERO,
            latencies: Vec::new(),
            new_events: 0,
            cpu: Duration::ZERO,
            peak_rss_kib: 0,
        })
    }

    async fn send(&self, token: &str, txns: &[Txn]) -> Result<Vec<Duration>> {
        send_all(&self.client, &self.url, token, txns).await
    }

    /// Sends `txns` (measured), then waits until the server is idle: its work after the 200
    /// counts in its CPU time. Returns the slice's new events per second.
    async fn measure(&mut self, token: &str, txns: &[Txn]) -> Result<f64> {
        let cpu_before = cpu_time(self.pid).context("the server's CPU time")?;
        let start = Instant::now();
        let latencies = self.send(token, txns).await?;
        let wall = start.elapsed();
        settle(self.pid).await;
        let new_events: usize = txns.iter().filter(|t| !t.replay).map(|t| t.events).sum();
        self.cpu += cpu_time(self.pid).context("the server's CPU time")?.saturating_sub(cpu_before);
        self.wall += wall;
        self.latencies.extend(latencies);
        self.new_events += new_events;
        Ok(new_events as f64 / wall.as_secs_f64())
    }

    fn events_per_s(&self) -> f64 {
        self.new_events as f64 / self.wall.as_secs_f64()
    }

    fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        sorted[rank.clamp(1, sorted.len()) - 1]
    }

    fn cpu_per_1k_events(&self) -> Duration {
        self.cpu.mul_f64(1000.0 / self.new_events as f64)
    }

    fn peak_rss_mib(&self) -> f64 {
        self.peak_rss_kib as f64 / 1024.0
    }

    fn peak_rss_mb(&self) -> f64 {
        self.peak_rss_kib as f64 * 1024.0 / 1e6
    }
}

/// Sends the transactions one at a time; returns each one's latency (request sent to response
/// read). Anything but a 200 is an error.
async fn send_all(client: &reqwest::Client, base: &str, token: &str, txns: &[Txn]) -> Result<Vec<Duration>> {
    let auth = format!("Bearer {token}");
    let mut latencies = Vec::with_capacity(txns.len());
    for txn in txns {
        let request = client
            .put(format!("{base}/_matrix/app/v1/transactions/{}", txn.id))
            .header(reqwest::header::AUTHORIZATION, &auth)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(txn.body.clone())
            .build()?;
        let start = Instant::now();
        let response = client.execute(request).await.with_context(|| format!("transaction {} to {base}", txn.id))?;
        let status = response.status();
        let body = response.bytes().await?;
        latencies.push(start.elapsed());
        if status != reqwest::StatusCode::OK {
            bail!("transaction {} to {base}: {status} {}", txn.id, String::from_utf8_lossy(&body));
        }
    }
    Ok(latencies)
}

/// Waits (up to a minute) until the process has used no CPU for half a second.
async fn settle(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = cpu_time(pid).unwrap_or_default();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = cpu_time(pid).unwrap_or_default();
        if now == last {
            return;
        }
        last = now;
    }
}

fn report(handoff: &Server, mautrix: &Server, fresh_events: usize) {
    let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1e3);
    let rows: [(&str, String, String); 7] = [
        ("events/s", thousands(handoff.events_per_s()), thousands(mautrix.events_per_s())),
        ("p50 per transaction", ms(handoff.percentile(50.0)), ms(mautrix.percentile(50.0))),
        ("p99 per transaction", ms(handoff.percentile(99.0)), ms(mautrix.percentile(99.0))),
        ("max per transaction", ms(handoff.percentile(100.0)), ms(mautrix.percentile(100.0))),
        (
            "peak resident (VmHWM)",
            format!("{:.1} MiB", handoff.peak_rss_mib()),
            format!("{:.1} MiB", mautrix.peak_rss_mib()),
        ),
        ("CPU per 1,000 events", ms(handoff.cpu_per_1k_events()), ms(mautrix.cpu_per_1k_events())),
        (
            "measured run",
            format!("{:.2} s", handoff.wall.as_secs_f64()),
            format!("{:.2} s", mautrix.wall.as_secs_f64()),
        ),
    ];
    let mautrix_name = format!("mautrix {MAUTRIX_VERSION}");
    println!();
    println!("  {:<24}{:>14}{:>18}", format!("{} events", thousands(fresh_events as f64)), "handoff", mautrix_name);
    for (name, a, b) in rows {
        println!("  {name:<24}{a:>14}{b:>18}");
    }
    let ratio = handoff.events_per_s() / mautrix.events_per_s();
    let cpu_ratio = mautrix.cpu.as_secs_f64() / handoff.cpu.as_secs_f64();
    println!();
    println!("  handoff / mautrix: {ratio:.1}x the events/s, {cpu_ratio:.1}x less CPU per event");
    println!();
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    let p99 = handoff.percentile(99.0);
    println!("targets (handoff)");
    println!(
        "  events/s >= {TARGET_RATIO}x mautrix's   {:>10}   {}",
        format!("{ratio:.1}x"),
        verdict(ratio >= TARGET_RATIO)
    );
    println!("  p99 < {} ms                {:>10}   {}", TARGET_P99.as_millis(), ms(p99), verdict(p99 < TARGET_P99));
    println!(
        "  peak resident < {TARGET_RSS_MB} MB     {:>10}   {}",
        format!("{:.1} MB", handoff.peak_rss_mb()),
        verdict(handoff.peak_rss_mb() < TARGET_RSS_MB)
    );
}

/// `appservice.port` of a handoff config (a number, which `Harness::config_value` doesn't read).
fn config_port(config: &Path) -> Result<u16> {
    let yaml: Value = serde_norway::from_str(&std::fs::read_to_string(config)?)?;
    let port = yaml["appservice"]["port"].as_u64().context("appservice.port in the config")?;
    Ok(u16::try_from(port)?)
}

/// `12345.6` as `12,346`.
fn thousands(x: f64) -> String {
    let digits = format!("{:.0}", x.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The handoff binary the bench runs, as `target/<profile>/handoff`.
fn binary_name() -> String {
    let path = Path::new(common::HANDOFF);
    let profile = path.parent().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned());
    format!("target/{}/handoff", profile.unwrap_or_default())
}

/// Installs the baseline's requirements from PyPI into `~/.cache/handoff/mautrix-<version>`
/// (beside Synapse's) unless they are there; returns the venv's python. A changed
/// requirements.txt installs afresh.
fn ensure_mautrix_installed() -> Result<PathBuf> {
    let requirements = std::fs::read_to_string(REQUIREMENTS).context("benches/ingest/requirements.txt")?;
    let venv = handoff::sandbox::cache_dir(&format!("mautrix-{MAUTRIX_VERSION}"));
    handoff::sandbox::ensure_venv(&venv, &requirements, &["-r", REQUIREMENTS], &format!("mautrix {MAUTRIX_VERSION}"))
}

/// The mautrix baseline, running. Dropping it kills the process.
struct Baseline {
    child: Option<Child>,
    url: String,
    log: PathBuf,
}

impl Baseline {
    async fn start(python: &Path, dir: &Path, hs_token: &str) -> Result<Baseline> {
        let port = handoff::sandbox::free_port();
        let log = dir.join("mautrix.log");
        let out = File::create(&log)?;
        let child = Command::new(python)
            .arg(BASELINE)
            .args(["--port", &port.to_string(), "--hs-token", hs_token, "--domain", "localhost"])
            .args(["--bot-localpart", "handoff", "--homeserver", "http://127.0.0.1:9", "--state-dir"])
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("cannot start the mautrix baseline")?;
        let mut baseline = Baseline { child: Some(child), url: format!("http://127.0.0.1:{port}"), log };
        let t = Instant::now();
        let live = format!("{}/_matrix/mau/live", baseline.url);
        loop {
            if let Ok(r) = reqwest::get(&live).await
                && r.status().is_success()
            {
                break;
            }
            if let Some(status) = baseline.child.as_mut().expect("running").try_wait()? {
                bail!("the mautrix baseline exited ({status}) at start-up:\n{}", baseline.output());
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!("the mautrix baseline did not answer within 60 s:\n{}", baseline.output());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!(
            "        mautrix {MAUTRIX_VERSION} serving on {} after {:.1} s",
            baseline.url,
            t.elapsed().as_secs_f64()
        );
        Ok(baseline)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops it with SIGTERM; returns its closing summary line.
    fn stop(mut self) -> Result<String> {
        run_command(Command::new("kill").arg("-TERM").arg(self.pid().to_string()), "stop the mautrix baseline")?;
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    bail!("the mautrix baseline exited with {status}:\n{}", self.output());
                }
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the mautrix baseline did not stop within 10 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(self.output().lines().rfind(|l| l.starts_with("transactions=")).unwrap_or_default().to_owned())
    }
}

impl Drop for Baseline {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// splitmix64: the same pseudo-random events on every run, without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    fn base64(&mut self, bytes: usize) -> String {
        let raw: Vec<u8> = (0..bytes).map(|_| self.next() as u8).collect();
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    }

    fn letters(&mut self, n: usize) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
        (0..n).map(|_| *self.pick(ALPHABET) as char).collect()
    }
}

const WORDS: &[&str] = &[
    "the", "a", "and", "to", "of", "is", "it", "that", "for", "on", "with", "this", "I", "you", "we", "they", "was",
    "but", "not", "have", "just", "so", "if", "can", "about", "think", "deploy", "build", "release", "meeting",
    "tomorrow", "today", "lunch", "coffee", "server", "room", "bug", "fixed", "broken", "works", "again", "maybe",
    "probably", "thanks", "sounds", "good", "great", "yeah", "ok", "sure", "weird", "looks", "like", "PR", "review",
    "merge", "branch", "tests", "CI", "green", "red", "logs", "error", "timeout", "latency", "week", "weekend",
    "anyone", "else", "seeing", "this?", "lol", "nice", "agreed", "later", "now", "soon", "back", "from", "holiday",
];

const REACTIONS: &[&str] = &["👍", "😂", "❤️", "🎉", "👀", "✅", "🙏", "😅", "+1", "🚀"];

/// The rooms and people of the simulated deployment, and the events they make.
struct World {
    rng: Rng,
    bot: String,
    /// Group rooms the bot sits in, with their recent messages (event ID, sender).
    rooms: Vec<(String, VecDeque<(String, String)>)>,
    /// DMs with the bot: room, the other user.
    dms: Vec<(String, String)>,
    /// User ID, display name.
    users: Vec<(String, String)>,
    ts: u64,
}

impl World {
    fn new(seed: u64) -> World {
        let mut rng = Rng(seed);
        let room_id = |rng: &mut Rng| format!("!{}:localhost", rng.letters(18));
        let users: Vec<(String, String)> = (0..400)
            .map(|i| {
                let first = *rng.pick(&["alex", "sam", "kim", "lee", "robin", "jo", "mika", "ana", "li", "noor"]);
                (format!("@{first}.{i}:localhost"), format!("{} {}", first.to_uppercase(), rng.letters(6)))
            })
            .collect();
        let rooms = (0..40).map(|_| (room_id(&mut rng), VecDeque::new())).collect();
        let dms = (0..12).map(|i| (room_id(&mut rng), users[i * 31].0.clone())).collect();
        World { rng, bot: "@handoff:localhost".into(), rooms, dms, users, ts: 1_767_225_600_000 }
    }

    /// `n` transactions named `{prefix}-{i}`, each followed, one time in [`REPLAY_EVERY`], by a
    /// repeat of one of the last 50 (same ID, same body).
    fn transactions(&mut self, prefix: &str, n: usize) -> Vec<Txn> {
        let mut out: Vec<Txn> = Vec::with_capacity(n + n / REPLAY_EVERY);
        let mut fresh: Vec<usize> = Vec::with_capacity(n);
        for i in 0..n {
            let events: Vec<Value> = (0..EVENTS_PER_TXN).map(|_| self.event()).collect();
            let body = serde_json::to_vec(&json!({ "events": events })).expect("JSON");
            fresh.push(out.len());
            out.push(Txn { id: format!("{prefix}-{i}"), body: body.into(), events: EVENTS_PER_TXN, replay: false });
            if i % REPLAY_EVERY == REPLAY_EVERY - 1 {
                let recent = &fresh[fresh.len().saturating_sub(50)..];
                let original = &out[*self.rng.pick(recent)];
                let replay =
                    Txn { id: original.id.clone(), body: original.body.clone(), events: original.events, replay: true };
                out.push(replay);
            }
        }
        out
    }

    fn sentence(&mut self, min: usize, max: usize) -> String {
        let n = min + self.rng.below(max - min + 1);
        let words: Vec<&str> = (0..n).map(|_| *self.rng.pick(WORDS)).collect();
        words.join(" ")
    }

    /// A member of group room `room` (each room has its own 60 of the users).
    fn member_of(&mut self, room: usize) -> (String, String) {
        let i = (room * 53 + self.rng.below(60)) % self.users.len();
        self.users[i].clone()
    }

    fn envelope(&mut self, kind: &str, room: &str, sender: &str, content: Value) -> Value {
        self.ts += 1 + self.rng.below(400) as u64;
        json!({
            "type": kind,
            "room_id": room,
            "sender": sender,
            "content": content,
            "origin_server_ts": self.ts,
            "unsigned": { "age": 20 + self.rng.below(300) },
            "event_id": format!("${}", self.rng.base64(32)),
        })
    }

    /// One event, by this mix: group chat messages 62%, edits 8%, reactions 14%, redactions 1%,
    /// other users' membership 8%, room state 2%, the bot's own notices in DMs 3%, reactions in DMs 2%.
    fn event(&mut self) -> Value {
        let roll = self.rng.below(100);
        let room = self.rng.below(self.rooms.len());
        let room_id = self.rooms[room].0.clone();
        match roll {
            0..62 => {
                let (sender, _) = self.member_of(room);
                let content = self.message_content(room);
                let event = self.envelope("m.room.message", &room_id, &sender, content);
                let recent = &mut self.rooms[room].1;
                recent.push_back((event["event_id"].as_str().expect("id").to_owned(), sender));
                if recent.len() > 30 {
                    recent.pop_front();
                }
                event
            }
            62..70 => match self.recent_message(room) {
                Some((target, sender)) => {
                    let text = self.sentence(2, 16);
                    let content = json!({
                        "msgtype": "m.text",
                        "body": format!("* {text}"),
                        "m.new_content": { "msgtype": "m.text", "body": text, "m.mentions": {} },
                        "m.relates_to": { "rel_type": "m.replace", "event_id": target },
                        "m.mentions": {},
                    });
                    self.envelope("m.room.message", &room_id, &sender, content)
                }
                None => self.event(),
            },
            70..84 => match self.recent_message(room) {
                Some((target, _)) => {
                    let (sender, _) = self.member_of(room);
                    let key = *self.rng.pick(REACTIONS);
                    let content =
                        json!({ "m.relates_to": { "rel_type": "m.annotation", "event_id": target, "key": key } });
                    self.envelope("m.reaction", &room_id, &sender, content)
                }
                None => self.event(),
            },
            84..85 => match self.recent_message(room) {
                Some((target, sender)) => {
                    let mut event = self.envelope(
                        "m.room.redaction",
                        &room_id,
                        &sender,
                        json!({ "redacts": target, "reason": "wrong room" }),
                    );
                    event["redacts"] = target.into();
                    event
                }
                None => self.event(),
            },
            85..93 => {
                let (user, name) = self.member_of(room);
                let (membership, prev) = match self.rng.below(4) {
                    0 => ("leave", "join"),
                    1 => ("join", "leave"),
                    _ => ("join", "join"),
                };
                let display = if self.rng.chance(30) { format!("{name} (away)") } else { name };
                let content = if membership == "join" {
                    json!({ "membership": "join", "displayname": display, "avatar_url": format!("mxc://localhost/{}", self.rng.letters(24)) })
                } else {
                    json!({ "membership": "leave" })
                };
                let replaces = format!("${}", self.rng.base64(32));
                let mut event = self.envelope("m.room.member", &room_id, &user, content);
                event["state_key"] = user.into();
                event["unsigned"]["replaces_state"] = replaces.into();
                event["unsigned"]["prev_content"] = json!({ "membership": prev, "displayname": display });
                event
            }
            93..95 => {
                let (sender, _) = self.member_of(room);
                let (kind, content) = match self.rng.below(3) {
                    0 => ("m.room.topic", json!({ "topic": self.sentence(4, 14) })),
                    1 => ("m.room.name", json!({ "name": self.sentence(1, 3) })),
                    _ => {
                        let pinned: Vec<String> = self.rooms[room].1.iter().take(3).map(|(id, _)| id.clone()).collect();
                        ("m.room.pinned_events", json!({ "pinned": pinned }))
                    }
                };
                let mut event = self.envelope(kind, &room_id, &sender, content);
                event["state_key"] = "".into();
                event
            }
            95..98 => {
                let (dm, _) = self.dms[self.rng.below(self.dms.len())].clone();
                let text = self.sentence(8, 30);
                let content = json!({
                    "msgtype": "m.notice",
                    "body": text,
                    "format": "org.matrix.custom.html",
                    "formatted_body": format!("<p>{text}</p>"),
                });
                let bot = self.bot.clone();
                self.envelope("m.room.message", &dm, &bot, content)
            }
            _ => {
                let (dm, user) = self.dms[self.rng.below(self.dms.len())].clone();
                let target = format!("${}", self.rng.base64(32));
                let key = *self.rng.pick(REACTIONS);
                let content = json!({ "m.relates_to": { "rel_type": "m.annotation", "event_id": target, "key": key } });
                self.envelope("m.reaction", &dm, &user, content)
            }
        }
    }

    fn recent_message(&mut self, room: usize) -> Option<(String, String)> {
        let recent = &self.rooms[room].1;
        if recent.is_empty() {
            return None;
        }
        let i = self.rng.below(recent.len());
        Some(self.rooms[room].1[i].clone())
    }

    /// A chat message: plain text mostly, some HTML, some replies, now and then an image.
    fn message_content(&mut self, room: usize) -> Value {
        if self.rng.chance(4) {
            let n = self.rng.below(9000);
            return json!({
                "msgtype": "m.image",
                "body": format!("IMG_{n:04}.jpg"),
                "url": format!("mxc://localhost/{}", self.rng.letters(24)),
                "info": { "mimetype": "image/jpeg", "size": 40_000 + self.rng.below(3_000_000), "w": 1280, "h": 960 },
                "m.mentions": {},
            });
        }
        let text = self.sentence(1, 28);
        let mut content = json!({ "msgtype": "m.text", "body": text, "m.mentions": {} });
        if self.rng.chance(20) {
            let words: Vec<&str> = text.split(' ').collect();
            let html = match words.split_first() {
                Some((first, rest)) => format!("<strong>{first}</strong> {}", rest.join(" ")),
                None => text.clone(),
            };
            content["format"] = "org.matrix.custom.html".into();
            content["formatted_body"] = html.into();
        }
        if self.rng.chance(15)
            && let Some((target, author)) = self.recent_message(room)
        {
            content["m.relates_to"] = json!({ "m.in_reply_to": { "event_id": target } });
            content["m.mentions"] = json!({ "user_ids": [author] });
        }
        content
    }
}
