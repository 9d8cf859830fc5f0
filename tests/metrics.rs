//! `/metrics` and `/health` on `metrics.listen`, against a real Synapse: what an admin's Prometheus
//! would scrape after a user has talked to the bot.

mod common;

use std::collections::BTreeMap;

use common::{Harness, eventually, with_metrics};
use serde_json::Value;

/// One sample of the Prometheus text format: name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the sample lines of a Prometheus text exposition (comments skipped).
fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value: {line}"));
            let (name, labels) = match series.split_once('{') {
                None => (series, BTreeMap::new()),
                Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}').expect("closing brace"))),
            };
            Sample { name: name.to_owned(), labels, value }
        })
        .collect()
}

/// `a="x",b="y"` (values may hold braces, escaped quotes and backslashes).
fn parse_labels(mut s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    while !s.is_empty() {
        let (key, rest) = s.split_once("=\"").expect("key=\"value\"");
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next().expect("closing quote") {
                (_, '\\') => value.push(chars.next().expect("escaped character").1),
                (i, '"') => break i,
                (_, c) => value.push(c),
            }
        };
        out.insert(key.to_owned(), value);
        s = rest[end + 1..].trim_start_matches(',');
    }
    out
}

fn sum(samples: &[Sample], name: &str, filter: impl Fn(&BTreeMap<String, String>) -> bool) -> f64 {
    samples.iter().filter(|s| s.name == name && filter(&s.labels)).map(|s| s.value).sum()
}

#[tokio::test]
async fn metrics_listener_serves_what_an_admin_checks_after_a_help() {
    let metrics_port = handoff::sandbox::free_port();
    let mut h = Harness::start_with(|config| with_metrics(config, metrics_port)).await;
    let base = format!("http://127.0.0.1:{metrics_port}");
    let http = reqwest::Client::new();

    // /health is on the metrics listener too, with the same report as on the appservice port.
    let health = http.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let health: Value = health.json().await.unwrap();
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["homeserver"], "ok", "{health}");
    let other = http.get(format!("{base}/_matrix/app/v1/ping")).send().await.unwrap();
    assert_eq!(other.status(), 404, "only /metrics and /health are served there");

    // A user opens a DM with the bot and asks for help.
    let alice = h.user("alice").await;
    let dm = h.dm_with_bot(&alice).await;
    h.ask(&alice, &dm, "help", "• help — ").await;

    // The reply is sent before its request is counted: wait for the second message's send.
    let send_template = "/_matrix/client/v3/rooms/{room_id}/send/{event_type}/{txn_id}";
    let (text, samples) = eventually("the help reply counted in /metrics", || async {
        let resp = http.get(format!("{base}/metrics")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let content_type = resp.headers()[reqwest::header::CONTENT_TYPE].to_str().unwrap().to_owned();
        assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");
        let text = resp.text().await.unwrap();
        let samples = parse(&text);
        let sends = sum(&samples, "handoff_homeserver_requests_total", |l| {
            l["endpoint"] == send_template && l["outcome"] == "ok"
        });
        (sends >= 2.0).then_some((text, samples))
    })
    .await;

    // Transactions: the invite and the `help` at least, each with its events and its latency. They
    // are two: the help is sent after the bot's join, which answers the invite's transaction. (More
    // may come: Synapse also pushes the bot's own events, batched as it goes.)
    let transactions = sum(&samples, "handoff_transactions_total", |_| true);
    assert!(transactions >= 2.0, "{text}");
    assert!(sum(&samples, "handoff_transaction_events_total", |_| true) >= transactions, "{text}");
    assert_eq!(sum(&samples, "handoff_transaction_duration_seconds_count", |_| true), transactions, "{text}");
    let all = sum(&samples, "handoff_transaction_duration_seconds_bucket", |l| l["le"] == "+Inf");
    assert_eq!(all, transactions, "{text}");
    assert!(
        samples.iter().any(|s| s.name == "handoff_transaction_duration_seconds_bucket" && s.labels["le"] == "0.01"),
        "ms-scale buckets: {text}"
    );

    // Homeserver requests: by endpoint template and outcome, never an ID in a label.
    let requests: Vec<&Sample> = samples.iter().filter(|s| s.name == "handoff_homeserver_requests_total").collect();
    assert!(!requests.is_empty(), "{text}");
    for s in &requests {
        let endpoint = &s.labels["endpoint"];
        assert!(endpoint.starts_with("/_matrix/"), "{endpoint}");
        assert!(!endpoint.contains('!') && !endpoint.contains('@') && !endpoint.contains(':'), "an ID in {endpoint}");
        assert!(
            ["ok", "rate_limited", "refused", "server_error", "unreachable", "invalid"]
                .contains(&s.labels["outcome"].as_str()),
            "{:?}",
            s.labels
        );
    }
    let join = sum(&samples, "handoff_homeserver_requests_total", |l| {
        l["endpoint"] == "/_matrix/client/v3/rooms/{room_id}/join" && l["outcome"] == "ok"
    });
    assert!(join >= 1.0, "the bot's join of the DM: {text}");
    // Each counted request has its latency, with buckets up to tens of seconds.
    for s in &requests {
        let count = sum(&samples, "handoff_homeserver_request_duration_seconds_count", |l| {
            l["endpoint"] == s.labels["endpoint"] && l["outcome"] == s.labels["outcome"]
        });
        assert_eq!(count, s.value, "latency of {:?}: {text}", s.labels);
    }
    assert!(
        samples
            .iter()
            .any(|s| s.name == "handoff_homeserver_request_duration_seconds_bucket" && s.labels["le"] == "30"),
        "{text}"
    );

    // Figures wired elsewhere are there from the start, at zero.
    assert_eq!(sum(&samples, "handoff_rooms_in_flight", |_| true), 0.0, "{text}");
    for outcome in ["done", "cancelled", "failed"] {
        assert!(
            samples.iter().any(|s| s.name == "handoff_transfers_finished_total" && s.labels["outcome"] == outcome),
            "{text}"
        );
    }
    assert!(text.contains("# HELP handoff_homeserver_requests_total "), "help texts: {text}");

    // Nothing that identifies a user or a room, and no token.
    for secret in [
        h.config_value("appservice.as_token"),
        h.config_value("appservice.hs_token"),
        h.config_value("appservice.acting.as_token"),
    ] {
        assert!(!text.contains(&secret), "a token in /metrics");
    }
    for id in [alice.id.as_str(), h.bot.as_str(), dm.as_str(), "localhost"] {
        assert!(!text.contains(id), "{id} in /metrics: {text}");
    }

    // /health serves the state its background check keeps: twenty hits, on both listeners, ask
    // the homeserver nothing (one periodic check may fall in between).
    let requests = |text: &str, endpoint: Option<&str>| {
        sum(&parse(text), "handoff_homeserver_requests_total", |l| endpoint.is_none_or(|e| l["endpoint"] == e))
    };
    let scrape = || async { http.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap() };
    let whoami = Some("/_matrix/client/v3/account/whoami");
    let before = scrape().await;
    for n in 0..20 {
        let url = if n % 2 == 0 { format!("{base}/health") } else { format!("{}/health", h.handoff_url) };
        assert_eq!(http.get(url).send().await.unwrap().status(), 200);
    }
    let after = scrape().await;
    assert!(requests(&after, whoami) - requests(&before, whoami) <= 1.0, "a check per hit?\n{before}\n{after}");
    assert!(requests(&after, None) - requests(&before, None) <= 2.0, "requests per hit?\n{before}\n{after}");

    // The homeserver goes away: /health says so in a few words, never with its address or a path.
    h.sandbox.synapse.stop();
    let (status, health) = eventually("/health to see the homeserver gone", || async {
        let r = http.get(format!("{base}/health")).send().await.unwrap();
        let status = r.status();
        let health: Value = r.json().await.unwrap();
        (status == 503).then_some((status, health))
    })
    .await;
    assert_eq!(status, 503);
    assert_eq!(health["status"], "unhealthy", "{health}");
    assert_eq!(health["homeserver"], "homeserver unreachable", "{health}");
    assert_eq!(health["store"], "ok", "{health}");
    let text = health.to_string();
    let dir = h.sandbox.dir.display().to_string();
    for leak in ["http", "127.0.0.1", "localhost", "/_matrix", dir.as_str(), "handoff.db"] {
        assert!(!text.contains(leak), "{leak} in /health: {text}");
    }
}
