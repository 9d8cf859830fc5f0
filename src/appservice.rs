//! The HTTP edge: the application service API the homeserver calls, and `/health` (also served on
//! the metrics listener).
//!
//! Every request is checked against `hs_token` in constant time before its body is read; a
//! transaction's events are durable in the store (with its ID, so it is handled once) before the
//! 200 goes out, and are handled afterwards in each sender's own queue: one user's commands never
//! hold up the homeserver's stream, nor anyone else's commands.

// Early returns carry an axum `Response`; boxing it would buy nothing on this path.
#![allow(clippy::result_large_err)]

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post, put};
use ruma::api::appservice::event::push_events;
use ruma::api::appservice::ping::send_ping;
use ruma::api::appservice::query::{query_room_alias, query_user_id};
use ruma::api::auth_scheme::{AccessToken, AuthScheme};
use ruma::api::client::account::whoami;
use ruma::api::error::{ErrorBody, ErrorKind, StandardErrorBody};
use ruma::api::{IncomingRequest, OutgoingResponse};
use subtle::ConstantTimeEq;

use crate::bot::Bot;
use crate::bot::device::Encryption;
use crate::bot::intake::Intake;
use crate::config::Secret;
use crate::homeserver::{Homeserver, Retry};
use crate::metrics::{self, Problem};
use crate::shutdown::Shutdown;
use crate::store::Store;

/// Synapse sends at most 100 events (plus as many ephemeral ones) per transaction; 16 MiB is ample.
pub const MAX_BODY: usize = 16 << 20;

#[derive(Clone)]
pub struct AppState {
    pub hs_token: Secret,
    pub role: Role,
    /// What `/health` serves, kept fresh in the background.
    pub health: Arc<Health>,
}

/// What this instance does with the homeserver's transactions.
#[derive(Clone)]
pub enum Role {
    /// The one instance, or the leader of a database several share: the events go into the inbox
    /// and their senders' queues.
    Leader {
        bot: Arc<Bot>,
        /// The bot's device, for `/health`.
        encryption: Arc<Encryption>,
    },
    /// A standby of a shared database: the events go into the inbox, where the leader finds them.
    Standby(Arc<Intake>),
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/_matrix/app/v1/transactions/{txn_id}", put(transaction))
        .route("/_matrix/app/v1/users/{user_id}", get(query_user))
        .route("/_matrix/app/v1/rooms/{room_alias}", get(query_alias))
        .route("/_matrix/app/v1/ping", post(ping))
        .route("/health", get(health))
        .fallback(any(unrecognized))
        .with_state(state)
}

/// `/health` alone, for the metrics listener.
pub fn health_router(state: AppState) -> Router {
    Router::new().route("/health", get(health)).with_state(state)
}

fn matrix_error(status: StatusCode, kind: ErrorKind, message: impl Into<String>) -> Response {
    let error = ruma::api::error::Error::new(status, ErrorBody::Standard(StandardErrorBody::new(kind, message.into())));
    ruma_response(error)
}

fn ruma_response(r: impl OutgoingResponse) -> Response {
    match r.try_into_http_response::<Vec<u8>>() {
        Ok(resp) => resp.map(Body::from).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "cannot serialize a response");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// Checks the homeserver's token, then reads the body (bounded); `Err` is the response to send.
/// The token comes first: an unauthenticated caller can't make the service read 16 MiB.
async fn authenticated(state: &AppState, req: Request) -> Result<http::Request<Vec<u8>>, Response> {
    let (parts, body) = req.into_parts();
    let head = http::Request::from_parts(parts, Vec::new());
    match AccessToken::extract_authentication(&head) {
        Ok(token) if bool::from(token.as_bytes().ct_eq(state.hs_token.expose().as_bytes())) => {}
        Ok(_) => return Err(matrix_error(StatusCode::FORBIDDEN, ErrorKind::Forbidden, "wrong hs_token")),
        Err(_) => {
            return Err(matrix_error(
                StatusCode::UNAUTHORIZED,
                ErrorKind::Unauthorized,
                "missing hs_token: send `Authorization: Bearer <hs_token>`",
            ));
        }
    }
    let (parts, _) = head.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(_) => {
            return Err(matrix_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorKind::TooLarge,
                format!("request body larger than {MAX_BODY} bytes"),
            ));
        }
    };
    Ok(http::Request::from_parts(parts, bytes.to_vec()))
}

/// Parses an authenticated request into its ruma type, or answers `M_NOT_JSON` / `M_BAD_JSON`.
/// Public so the `transaction_body` fuzz target runs exactly the edge's parsing.
pub fn parse<R: IncomingRequest>(req: http::Request<Vec<u8>>, path_args: &[&str]) -> Result<R, Response> {
    let (parts, body) = req.into_parts();
    R::try_from_http_request(http::Request::from_parts(parts, body.as_slice()), path_args).map_err(|err| {
        // Only a refused body is looked at twice (to say which error it is), never a good one.
        let is_json = body.is_empty() || serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_ok();
        let (kind, what) = if is_json {
            (ErrorKind::BadJson, "body is not a valid request")
        } else {
            (ErrorKind::NotJson, "body is not JSON")
        };
        matrix_error(StatusCode::BAD_REQUEST, kind, format!("{what}: {err}"))
    })
}

async fn transaction(State(state): State<AppState>, Path(txn_id): Path<String>, req: Request) -> Response {
    let arrived = Instant::now();
    let req = match authenticated(&state, req).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let txn: push_events::v1::Request = match parse(req, &[&txn_id]) {
        Ok(t) => t,
        Err(resp) => return resp,
    };
    let taken = match &state.role {
        Role::Leader { bot, .. } => bot.accept(&txn_id, &txn.events).await,
        Role::Standby(intake) => intake.take(&txn_id, &txn.events).await.map(drop),
    };
    match taken {
        Ok(()) => {
            metrics::transaction(txn.events.len(), arrived.elapsed());
            ruma_response(push_events::v1::Response::new())
        }
        Err(e) => store_failure(e),
    }
}

fn store_failure(e: crate::store::StoreError) -> Response {
    tracing::error!(error = %e, "store failure while handling a transaction");
    // A 5xx makes the homeserver retry the transaction later.
    matrix_error(StatusCode::INTERNAL_SERVER_ERROR, ErrorKind::Unknown, "storage failure, retry later")
}

async fn query_user(State(state): State<AppState>, Path(user_id): Path<String>, req: Request) -> Response {
    let req = match authenticated(&state, req).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let query: query_user_id::v1::Request = match parse(req, &[&user_id]) {
        Ok(q) => q,
        Err(resp) => return resp,
    };
    // The bot is registered at start-up; no other user lives in the exclusive namespace.
    let me = match &state.role {
        Role::Leader { bot, .. } => bot.user_id(),
        Role::Standby(intake) => intake.me(),
    };
    if query.user_id == me {
        ruma_response(query_user_id::v1::Response::new())
    } else {
        matrix_error(StatusCode::NOT_FOUND, ErrorKind::NotFound, "no such user")
    }
}

async fn query_alias(State(state): State<AppState>, Path(alias): Path<String>, req: Request) -> Response {
    let req = match authenticated(&state, req).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    if let Err(resp) = parse::<query_room_alias::v1::Request>(req, &[&alias]) {
        return resp;
    }
    matrix_error(StatusCode::NOT_FOUND, ErrorKind::NotFound, "handoff provides no room aliases")
}

async fn ping(State(state): State<AppState>, req: Request) -> Response {
    let req = match authenticated(&state, req).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    if let Err(resp) = parse::<send_ping::v1::Request>(req, &[]) {
        return resp;
    }
    tracing::debug!("ping from the homeserver");
    ruma_response(send_ping::v1::Response::new())
}

/// How often `/health`'s state is checked again. A hit reads the last check: however often a
/// load balancer or a stranger asks, the homeserver gets one request per period.
pub const HEALTH_EVERY: Duration = Duration::from_secs(10);
/// A check the homeserver has not answered by then finds it unreachable.
const HEALTH_PATIENCE: Duration = Duration::from_secs(5);

/// The state `/health` serves: the last check of the store and of the homeserver.
pub struct Health {
    last: RwLock<Checked>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Checked {
    store: Option<Problem>,
    homeserver: Option<Problem>,
    at: Instant,
}

impl Health {
    /// Checks once now (so the first hit has an answer), then every [`HEALTH_EVERY`] until the stop.
    /// `hs` acts as the bot: asking who it is proves the homeserver is there and takes the token.
    pub async fn start(store: Store, hs: Homeserver, shutdown: &Shutdown) -> Arc<Health> {
        let hs = hs.with_retry(Retry::NONE);
        let first = check(&store, &hs, None).await;
        let health = Arc::new(Health { last: RwLock::new(first) });
        let (this, stop) = (Arc::clone(&health), shutdown.clone());
        shutdown.spawn(async move {
            let mut every = tokio::time::interval(HEALTH_EVERY);
            every.tick().await; // the first tick is now: checked above
            loop {
                tokio::select! {
                    _ = stop.begun() => return,
                    _ = every.tick() => {}
                }
                let before = *this.last.read().expect("lock");
                let now = check(&store, &hs, Some(before)).await;
                *this.last.write().expect("lock") = now;
            }
        });
        health
    }
}

/// One check. What changed since `before` is logged once, with the error's details (for the
/// admin); `/health` only ever shows its category.
async fn check(store: &Store, hs: &Homeserver, before: Option<Checked>) -> Checked {
    let store_problem = match store.check().await {
        Ok(()) => None,
        Err(e) => {
            if before.is_none_or(|b| b.store.is_none()) {
                tracing::error!(error = %e, "health: the database fails");
            }
            Some(Problem::DatabaseError)
        }
    };
    let asked = tokio::time::timeout(HEALTH_PATIENCE, hs.send(whoami::v3::Request::new())).await;
    let homeserver = match asked {
        Ok(Ok(_)) => None,
        Ok(Err(e)) => {
            let problem = e.problem();
            if before.is_none_or(|b| b.homeserver != Some(problem)) {
                tracing::warn!(error = %e, problem = problem.as_str(), "health: the homeserver check fails");
            }
            Some(problem)
        }
        Err(_) => {
            if before.is_none_or(|b| b.homeserver != Some(Problem::HomeserverUnreachable)) {
                tracing::warn!(patience = ?HEALTH_PATIENCE, "health: the homeserver did not answer in time");
            }
            Some(Problem::HomeserverUnreachable)
        }
    };
    if let Some(b) = before
        && (b.store.is_some() || b.homeserver.is_some())
        && store_problem.is_none()
        && homeserver.is_none()
    {
        tracing::info!("health: ok again");
    }
    Checked { store: store_problem, homeserver, at: Instant::now() }
}

/// 200 when the store answered and the homeserver took the bot's token at the last check; 503
/// naming what did not, in a few words. A standby is healthy too (it takes transactions): `role`
/// says which it is. The bot's device is shown, not judged: without it the bot still serves
/// unencrypted DMs.
async fn health(State(state): State<AppState>) -> Response {
    let last = *state.health.last.read().expect("lock");
    let ok = last.store.is_none() && last.homeserver.is_none();
    let word = |p: Option<Problem>| p.map_or("ok", Problem::as_str);
    let body = serde_json::json!({
        "status": if ok { "ok" } else { "unhealthy" },
        "store": word(last.store),
        "homeserver": word(last.homeserver),
        "checked_seconds_ago": last.at.elapsed().as_secs(),
        "role": match state.role { Role::Leader { .. } => "leader", Role::Standby(_) => "standby" },
        "encryption": match &state.role {
            Role::Leader { encryption, .. } => encryption.health().await,
            Role::Standby(_) => serde_json::json!({"state": "standby", "reason": "the leader's device serves"}),
        },
    });
    let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(body)).into_response()
}

async fn unrecognized() -> Response {
    matrix_error(StatusCode::NOT_FOUND, ErrorKind::Unrecognized, "unrecognized request")
}
