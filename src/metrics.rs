//! Prometheus metrics: the names, the buckets, small typed functions the rest of the crate calls,
//! and the second listener (`metrics.listen`) that serves `/metrics` and `/health`.
//!
//! Every figure is recorded through the functions below, never with the `metrics` macros
//! elsewhere, so the names and the labels stay in one place. Labels have bounded cardinality and
//! never carry a user ID, room ID, token or code: an endpoint is its path template
//! (`/_matrix/client/v3/rooms/{room_id}/invite`), everything else is a fixed word.
//!
//! Until [`install`] has run (only when `metrics.enabled`), recording is a no-op.
//!
//! | metric | type | labels | recorded by |
//! |---|---|---|---|
//! | `handoff_transactions_total` | counter | | [`transaction`] |
//! | `handoff_transaction_events_total` | counter | | [`transaction`] |
//! | `handoff_transaction_duration_seconds` | histogram | | [`transaction`] |
//! | `handoff_homeserver_requests_total` | counter | `endpoint`, `outcome` | [`homeserver_request`] |
//! | `handoff_homeserver_request_duration_seconds` | histogram | `endpoint`, `outcome` | [`homeserver_request`] |
//! | `handoff_commands_total` | counter | `command`, `outcome` | [`command`] |
//! | `handoff_transfers_finished_total` | counter | `outcome` | [`transfer_finished`] |
//! | `handoff_rooms_finished_total` | counter | `outcome` | [`room_finished`] |
//! | `handoff_rooms_seated_total` | counter | | [`room_seated`] |
//! | `handoff_rooms_in_flight` | gauge | | [`RoomInFlight`] |
//! | `handoff_transfers_running` | gauge | | [`transfers_in_line`] |
//! | `handoff_transfers_waiting` | gauge | | [`transfers_in_line`] |
//! | `handoff_store_size_bytes` | gauge | | [`store_size`] |

use std::time::Duration;

use ::metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use ruma::api::Metadata;
use ruma::api::path_builder::PathBuilder;

/// Transactions the homeserver pushed that were accepted (stored and answered 200).
pub const TRANSACTIONS: &str = "handoff_transactions_total";
/// Events in those transactions.
pub const TRANSACTION_EVENTS: &str = "handoff_transaction_events_total";
/// From the request's arrival to the 200: authentication, body, durable store.
pub const TRANSACTION_SECONDS: &str = "handoff_transaction_duration_seconds";
/// Requests to the homeserver, each attempt counted (a retried request counts once per attempt).
pub const HOMESERVER_REQUESTS: &str = "handoff_homeserver_requests_total";
/// How long each of those attempts took, until the answer was read.
pub const HOMESERVER_REQUEST_SECONDS: &str = "handoff_homeserver_request_duration_seconds";
/// Bot commands handled.
pub const COMMANDS: &str = "handoff_commands_total";
/// Transfers that came to an end.
pub const TRANSFERS_FINISHED: &str = "handoff_transfers_finished_total";
/// Rooms of transfers that came to an end, one way or another.
pub const ROOMS_FINISHED: &str = "handoff_rooms_finished_total";
/// Rooms where the new account took its seat (joined, or invited on another server).
pub const ROOMS_SEATED: &str = "handoff_rooms_seated_total";
/// Rooms being moved right now, over every running transfer.
pub const ROOMS_IN_FLIGHT: &str = "handoff_rooms_in_flight";
/// Transfers running now (at most `handoff.max_transfers`).
pub const TRANSFERS_RUNNING: &str = "handoff_transfers_running";
/// Transfers waiting for a place to run.
pub const TRANSFERS_WAITING: &str = "handoff_transfers_waiting";
/// The store's size on disk.
pub const STORE_SIZE: &str = "handoff_store_size_bytes";

/// Transaction handling is a durable write and a 200: milliseconds, a slow disk up to seconds.
pub const TRANSACTION_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
/// Homeserver requests: a few milliseconds for a read, seconds for a join over federation, up to
/// the client's 60 s timeout.
pub const HOMESERVER_BUCKETS: &[f64] =
    &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0];

/// A transaction was accepted: `events` events, `elapsed` from its arrival to the 200.
pub fn transaction(events: usize, elapsed: Duration) {
    counter!(TRANSACTIONS).increment(1);
    counter!(TRANSACTION_EVENTS).increment(events as u64);
    histogram!(TRANSACTION_SECONDS).record(elapsed);
}

/// How one request to the homeserver ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A successful answer.
    Ok,
    /// `M_LIMIT_EXCEEDED`.
    RateLimited,
    /// Another Matrix error with a 4xx status: forbidden, not found, in use…
    Refused,
    /// A 5xx status: the homeserver (or a proxy before it) failed.
    ServerError,
    /// No answer: connection refused or reset, or the 60 s timeout.
    Unreachable,
    /// An answer handoff could not read or use (not Matrix, too large), or a request it could not build.
    Invalid,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::RateLimited => "rate_limited",
            Outcome::Refused => "refused",
            Outcome::ServerError => "server_error",
            Outcome::Unreachable => "unreachable",
            Outcome::Invalid => "invalid",
        }
    }
}

/// One attempt of a request to the homeserver. `endpoint` is the path template, from [`endpoint`]:
/// `&'static` so that it can't be a formatted path with a room or user ID in it.
pub fn homeserver_request(endpoint: &'static str, outcome: Outcome, elapsed: Duration) {
    let labels = [("endpoint", endpoint), ("outcome", outcome.as_str())];
    counter!(HOMESERVER_REQUESTS, &labels).increment(1);
    histogram!(HOMESERVER_REQUEST_SECONDS, &labels).record(elapsed);
}

/// The label of request type `R`: the path template ruma picks for `input` (the homeserver's
/// versions for most endpoints, `()` for those with a single path), such as
/// `/_matrix/client/v3/rooms/{room_id}/invite`. `"unknown"` if ruma knows no path for those versions
/// (the request itself then fails before it is sent).
pub fn endpoint<R: Metadata>(input: <R::PathBuilder as PathBuilder>::Input<'_>) -> &'static str {
    R::PATH_BUILDER.select_path(input).unwrap_or("unknown")
}

/// How a bot command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandOutcome {
    /// Done as asked (a `--dry-run` or a `status` included).
    Ok,
    /// Refused with an answer that says why: bad arguments, not permitted, a wrong or expired code,
    /// a limit reached.
    Refused,
    /// Failed on handoff's side: a store or homeserver error, a panic.
    Failed,
}

impl CommandOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            CommandOutcome::Ok => "ok",
            CommandOutcome::Refused => "refused",
            CommandOutcome::Failed => "failed",
        }
    }
}

/// A bot command was handled. `name` is the command's canonical name (`export`, `import`…), or
/// `"unknown"` for a word that is none: never the user's text.
pub fn command(name: &'static str, outcome: CommandOutcome) {
    counter!(COMMANDS, "command" => name, "outcome" => outcome.as_str()).increment(1);
}

/// How a transfer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferOutcome {
    /// Every planned step ran (rooms that could not be moved are counted in [`room_finished`]).
    Done,
    /// Stopped by `cancel` (or `forget`).
    Cancelled,
    /// Stopped by an error.
    Failed,
}

impl TransferOutcome {
    pub const ALL: [TransferOutcome; 3] = [TransferOutcome::Done, TransferOutcome::Cancelled, TransferOutcome::Failed];

    pub fn as_str(self) -> &'static str {
        match self {
            TransferOutcome::Done => "done",
            TransferOutcome::Cancelled => "cancelled",
            TransferOutcome::Failed => "failed",
        }
    }
}

/// A transfer came to an end. A transfer resumed after a restart is counted once, when it ends.
pub fn transfer_finished(outcome: TransferOutcome) {
    counter!(TRANSFERS_FINISHED, "outcome" => outcome.as_str()).increment(1);
}

/// Where one room of a transfer ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoomOutcome {
    /// The new account is in the room, with what could be carried.
    Moved,
    /// Invited, waiting for the new account (on another homeserver) to accept.
    Awaiting,
    /// Not moved, on purpose: blocked (ban, server ACL, no right to invite) or gone.
    Skipped,
    /// An error stopped this room.
    Failed,
}

impl RoomOutcome {
    pub const ALL: [RoomOutcome; 4] =
        [RoomOutcome::Moved, RoomOutcome::Awaiting, RoomOutcome::Skipped, RoomOutcome::Failed];

    pub fn as_str(self) -> &'static str {
        match self {
            RoomOutcome::Moved => "moved",
            RoomOutcome::Awaiting => "awaiting",
            RoomOutcome::Skipped => "skipped",
            RoomOutcome::Failed => "failed",
        }
    }
}

/// One room of a transfer is finished with.
pub fn room_finished(outcome: RoomOutcome) {
    counter!(ROOMS_FINISHED, "outcome" => outcome.as_str()).increment(1);
}

/// The new account has its seat in a room (pass 1 of the room is done): the room is usable.
pub fn room_seated() {
    counter!(ROOMS_SEATED).increment(1);
}

/// A room being moved: counts in `handoff_rooms_in_flight` from [`RoomInFlight::start`] until it is
/// dropped, however the work ends (an early return, an error, a panic).
#[must_use = "the room counts as in flight only while this is held"]
#[derive(Debug)]
pub struct RoomInFlight(());

impl RoomInFlight {
    pub fn start() -> RoomInFlight {
        gauge!(ROOMS_IN_FLIGHT).increment(1.0);
        RoomInFlight(())
    }
}

impl Drop for RoomInFlight {
    fn drop(&mut self) {
        gauge!(ROOMS_IN_FLIGHT).decrement(1.0);
    }
}

/// How many transfers run, and how many wait for a place.
pub fn transfers_in_line(running: usize, waiting: usize) {
    gauge!(TRANSFERS_RUNNING).set(running as f64);
    gauge!(TRANSFERS_WAITING).set(waiting as f64);
}

/// The store's size on disk, in bytes (sled's `Db::size_on_disk`).
pub fn store_size(bytes: u64) {
    gauge!(STORE_SIZE).set(bytes as f64);
}

/// The recorder with handoff's buckets and help texts, not installed: for [`install`] and tests.
fn builder() -> PrometheusBuilder {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(TRANSACTION_SECONDS.into()), TRANSACTION_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(HOMESERVER_REQUEST_SECONDS.into()), HOMESERVER_BUCKETS))
        .expect("bucket lists are not empty")
}

/// Help texts, and a zero for every series whose labels are known in advance, so a dashboard or an
/// alert sees them before the first event.
fn describe() {
    describe_counter!(
        TRANSACTIONS,
        Unit::Count,
        "Transactions from the homeserver accepted (stored and answered 200)."
    );
    describe_counter!(TRANSACTION_EVENTS, Unit::Count, "Events in the accepted transactions.");
    describe_histogram!(TRANSACTION_SECONDS, Unit::Seconds, "Time from a transaction's arrival to its 200.");
    describe_counter!(
        HOMESERVER_REQUESTS,
        Unit::Count,
        "Requests to the homeserver (each attempt), by endpoint path template and outcome."
    );
    describe_histogram!(HOMESERVER_REQUEST_SECONDS, Unit::Seconds, "Time of each homeserver request attempt.");
    describe_counter!(COMMANDS, Unit::Count, "Bot commands handled, by command and outcome.");
    describe_counter!(TRANSFERS_FINISHED, Unit::Count, "Transfers ended, by outcome (done, cancelled, failed).");
    describe_counter!(
        ROOMS_FINISHED,
        Unit::Count,
        "Rooms of transfers, by outcome (moved, awaiting, skipped, failed)."
    );
    describe_counter!(ROOMS_SEATED, Unit::Count, "Rooms where the new account took its seat (joined or invited).");
    describe_gauge!(ROOMS_IN_FLIGHT, Unit::Count, "Rooms being moved now, over all running transfers.");
    describe_gauge!(TRANSFERS_RUNNING, Unit::Count, "Transfers running now (at most handoff.max_transfers).");
    describe_gauge!(TRANSFERS_WAITING, Unit::Count, "Transfers waiting for a place to run.");
    describe_gauge!(STORE_SIZE, Unit::Bytes, "Size of the store on disk.");

    counter!(TRANSACTIONS).absolute(0);
    counter!(TRANSACTION_EVENTS).absolute(0);
    for outcome in TransferOutcome::ALL {
        counter!(TRANSFERS_FINISHED, "outcome" => outcome.as_str()).absolute(0);
    }
    for outcome in RoomOutcome::ALL {
        counter!(ROOMS_FINISHED, "outcome" => outcome.as_str()).absolute(0);
    }
    counter!(ROOMS_SEATED).absolute(0);
    gauge!(ROOMS_IN_FLIGHT).set(0.0);
    transfers_in_line(0, 0);
}

/// What `/health` may say is wrong: a short category, never an error's own text (which can carry
/// the homeserver's internal address or the database's path). The details go to the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    /// No answer, a timeout, or a 5xx (a proxy before a homeserver that is down).
    HomeserverUnreachable,
    /// The homeserver does not take the registration's token (or its namespace).
    TokenRefused,
    /// Any other answer that is not what was asked for.
    HomeserverError,
    DatabaseError,
}

impl Problem {
    pub fn as_str(self) -> &'static str {
        match self {
            Problem::HomeserverUnreachable => "homeserver unreachable",
            Problem::TokenRefused => "homeserver refused the token",
            Problem::HomeserverError => "homeserver error",
            Problem::DatabaseError => "database error",
        }
    }
}

/// Installs the Prometheus recorder for the whole process (once: a second call fails) and returns
/// the handle that renders it. Also starts the periodic upkeep that keeps histograms bounded when
/// nobody scrapes; call it inside the Tokio runtime.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = builder().install_recorder().map_err(|e| anyhow::anyhow!("cannot start metrics: {e}"))?;
    describe();
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// `GET /metrics` (Prometheus text format 0.0.4). Merge `/health` in beside it.
pub fn router(handle: PrometheusHandle) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let handle = handle.clone();
            async move {
                handle.run_upkeep(); // publishes help texts registered since the last one
                ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], handle.render())
            }
        }),
    )
}

/// What the metrics listener answers for any other path.
pub async fn not_found() -> impl IntoResponse {
    (StatusCode::NOT_FOUND, "not found: this listener serves /metrics and /health\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use ruma::api::client::membership::invite_user;
    use ruma::api::client::profile::set_profile_field;
    use ruma::api::{MatrixVersion, SupportedVersions};
    use std::borrow::Cow;
    use std::collections::{BTreeMap, BTreeSet};

    fn versions(v: &[MatrixVersion]) -> SupportedVersions {
        SupportedVersions { versions: v.iter().copied().collect::<BTreeSet<_>>(), features: BTreeSet::new() }
    }

    #[test]
    fn the_endpoint_label_is_the_path_template_for_the_servers_versions() {
        let modern = versions(&[MatrixVersion::V1_1, MatrixVersion::V1_15]);
        let label = endpoint::<invite_user::v3::Request>(Cow::Borrowed(&modern));
        assert_eq!(label, "/_matrix/client/v3/rooms/{room_id}/invite");
        let label = endpoint::<set_profile_field::v3::Request>(Cow::Borrowed(&modern));
        assert_eq!(label, "/_matrix/client/v3/profile/{user_id}/{field}");
        // Only Matrix 1.0 spoken: the r0 path, as the request is sent.
        let old = versions(&[MatrixVersion::V1_0]);
        let label = endpoint::<invite_user::v3::Request>(Cow::Borrowed(&old));
        assert_eq!(label, "/_matrix/client/r0/rooms/{room_id}/invite");
        // No version in common: no path, and no ID either.
        let none = SupportedVersions::from_parts(&[], &BTreeMap::new());
        assert_eq!(endpoint::<invite_user::v3::Request>(Cow::Borrowed(&none)), "unknown");
    }

    #[test]
    fn a_single_path_endpoint_has_its_one_template() {
        use ruma::api::appservice::ping::send_ping;
        assert_eq!(endpoint::<send_ping::v1::Request>(()), "/_matrix/app/v1/ping");
    }

    #[test]
    fn rendered_text_has_the_names_labels_and_buckets() {
        let recorder = builder().build_recorder();
        let handle = recorder.handle();
        ::metrics::with_local_recorder(&recorder, || {
            describe();
            transaction(3, Duration::from_millis(4));
            let modern = versions(&[MatrixVersion::V1_1]);
            let invite = endpoint::<invite_user::v3::Request>(Cow::Borrowed(&modern));
            homeserver_request(invite, Outcome::Ok, Duration::from_millis(30));
            homeserver_request(invite, Outcome::RateLimited, Duration::from_secs(12));
            command("help", CommandOutcome::Ok);
            transfer_finished(TransferOutcome::Cancelled);
            room_finished(RoomOutcome::Moved);
            let a = RoomInFlight::start();
            let b = RoomInFlight::start();
            drop(a);
            store_size(4096);
            std::mem::forget(b); // still in flight when rendered
        });
        handle.run_upkeep();
        let text = handle.render();
        for line in [
            "handoff_transactions_total 1",
            "handoff_transaction_events_total 3",
            "handoff_transaction_duration_seconds_bucket{le=\"0.005\"} 1",
            "handoff_transaction_duration_seconds_bucket{le=\"0.0025\"} 0",
            "handoff_transaction_duration_seconds_count 1",
            "handoff_homeserver_requests_total{endpoint=\"/_matrix/client/v3/rooms/{room_id}/invite\",outcome=\"ok\"} 1",
            "handoff_homeserver_request_duration_seconds_bucket{endpoint=\"/_matrix/client/v3/rooms/{room_id}/invite\",outcome=\"rate_limited\",le=\"20\"} 1",
            "handoff_homeserver_request_duration_seconds_bucket{endpoint=\"/_matrix/client/v3/rooms/{room_id}/invite\",outcome=\"rate_limited\",le=\"10\"} 0",
            "handoff_commands_total{command=\"help\",outcome=\"ok\"} 1",
            "handoff_transfers_finished_total{outcome=\"cancelled\"} 1",
            "handoff_transfers_finished_total{outcome=\"failed\"} 0",
            "handoff_rooms_finished_total{outcome=\"moved\"} 1",
            "handoff_rooms_finished_total{outcome=\"skipped\"} 0",
            "handoff_rooms_in_flight 1",
            "handoff_store_size_bytes 4096",
            "# TYPE handoff_transaction_duration_seconds histogram",
            "# HELP handoff_rooms_in_flight Rooms being moved now, over all running transfers.",
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line:?} in\n{text}");
        }
    }
}
