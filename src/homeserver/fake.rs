//! An in-memory homeserver for unit tests, reached through [`Transport::Fake`]. The room stages
//! run their real code against it (retries, deadlines, the re-checks of a resumed stage) in
//! simulated time: milliseconds where the Synapse tests take minutes, and failures on demand that
//! a real server won't produce (a rate limit, another server away, no answer at all).
//!
//! It keeps what the stages read and write: the rooms' members, power levels and messages, and
//! the accounts' tags, with Synapse's rules where the stages depend on them (who may invite,
//! join, change power levels, read a room; a send's transaction ID makes it idempotent). It
//! writes down every request it gets, so a test can say what was asked, and how many times.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use http::{Method, StatusCode};
use ruma::api::client::filter::RoomEventFilter;
use ruma::events::room::member::MembershipState;
use ruma::events::room::power_levels::RoomPowerLevelsEventContent;
use ruma::events::tag::TagInfo;
use ruma::{OwnedRoomId, OwnedServerName, OwnedUserId, RoomId, UserId};
use serde_json::{Value as JsonValue, json};
use tokio::sync::Notify;

use super::{Homeserver, HsError, Transport};

/// The token of the fake's appservice registration.
pub const AS_TOKEN: &str = "as-token";

/// Where the fake is, as the requests say: never dialled.
const ADDRESS: &str = "http://fake.invalid";

/// The endpoints the fake serves, to script and to count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Versions,
    /// `GET /rooms/{room}/state/m.room.member/{user}`
    Member,
    /// `PUT /rooms/{room}/state/m.room.member/{user}`: one's own membership, as a join that
    /// changes its content (Synapse takes it as a membership update).
    SetMember,
    /// `GET /rooms/{room}/state/m.room.power_levels/`
    PowerLevels,
    /// `PUT /rooms/{room}/state/m.room.power_levels/`
    SetPowerLevels,
    Invite,
    /// `POST /join/{room}`, by the room's ID.
    Join,
    /// `PUT /user/{user}/rooms/{room}/tags/{tag}`
    Tag,
    /// `PUT /rooms/{room}/send/{type}/{txn}`
    Send,
    /// `GET /rooms/{room}/messages`
    Messages,
    /// `POST /user/{user}/filter`
    Filter,
    /// `GET /sync`: the requester's pending invites.
    Sync,
    /// Anything else: answered `M_UNRECOGNIZED`.
    Other,
}

impl Endpoint {
    /// Whether a success changes the homeserver's state.
    fn writes(self) -> bool {
        matches!(
            self,
            Endpoint::SetPowerLevels
                | Endpoint::SetMember
                | Endpoint::Invite
                | Endpoint::Join
                | Endpoint::Tag
                | Endpoint::Send
        )
    }
}

/// A scripted answer, given instead of the homeserver's own.
#[derive(Debug, Clone)]
pub enum Answer {
    /// An HTTP status and its Matrix error body.
    Error(StatusCode, JsonValue),
    /// The connection is refused: the homeserver is away.
    Refused,
    /// The request is taken and never answered.
    Silent,
}

impl Answer {
    /// `M_LIMIT_EXCEEDED`, asking to wait `ms` milliseconds.
    pub fn limited(ms: u64) -> Answer {
        let body = json!({"errcode": "M_LIMIT_EXCEEDED", "error": "Too Many Requests", "retry_after_ms": ms});
        Answer::Error(StatusCode::TOO_MANY_REQUESTS, body)
    }

    /// What Synapse answers when another server a request needs (an invitee's, a via server)
    /// is away.
    pub fn other_server_away() -> Answer {
        let body = json!({"errcode": "M_UNKNOWN", "error": "Failed to send request: connection refused"});
        Answer::Error(StatusCode::BAD_GATEWAY, body)
    }
}

/// One request as the fake got it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub endpoint: Endpoint,
    /// Whom it acted as (`None`: an unknown token).
    pub user: Option<OwnedUserId>,
    pub room: Option<OwnedRoomId>,
    /// The query's parameters (`via`, `user_id`, ...), decoded.
    pub query: Vec<(String, String)>,
    /// The JSON body (`null` without one).
    pub body: JsonValue,
}

/// The in-memory homeserver of one server name; clones share it.
#[derive(Clone)]
pub struct Fake(Arc<Mutex<World>>);

struct World {
    server: OwnedServerName,
    /// The users' own tokens (the device side's sessions).
    sessions: HashMap<String, OwnedUserId>,
    rooms: HashMap<OwnedRoomId, Room>,
    tags: HashMap<(OwnedUserId, OwnedRoomId), BTreeMap<String, TagInfo>>,
    /// The event of each transaction sent, by token, sender and transaction ID.
    transactions: HashMap<(String, OwnedUserId, String), String>,
    events: u64,
    seen: Vec<Seen>,
    script: Vec<Rule>,
    writes: usize,
    crash: Option<(usize, Arc<Notify>)>,
    /// Crashed: nothing is answered until [`Fake::restart`].
    down: bool,
    /// The other server's limit on the invites its users receive ([`Fake::limit_remote_invites`]).
    remote_invites: Option<Bucket>,
}

/// A token bucket, as Synapse's rate limiters: `burst` at most, one more every `every`.
struct Bucket {
    burst: f64,
    every: std::time::Duration,
    tokens: f64,
    at: tokio::time::Instant,
}

impl Bucket {
    fn take(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        let refill = (now - self.at).as_secs_f64() / self.every.as_secs_f64();
        self.tokens = (self.tokens + refill).min(self.burst);
        self.at = now;
        let ok = self.tokens >= 1.0;
        if ok {
            self.tokens -= 1.0;
        }
        ok
    }
}

struct Rule {
    endpoint: Endpoint,
    answer: Answer,
    /// How many more requests it answers; `None`: all of them.
    times: Option<usize>,
}

struct Room {
    public: bool,
    members: BTreeMap<OwnedUserId, MembershipState>,
    power_levels: JsonValue,
    /// Every event, oldest first.
    timeline: Vec<JsonValue>,
    /// Who invited each invitee, the invite's reason, and its place in the server's order.
    invited_by: BTreeMap<OwnedUserId, (OwnedUserId, Option<String>, u64)>,
    /// Membership contents set beyond the membership itself ([`Endpoint::SetMember`]).
    member_content: BTreeMap<OwnedUserId, JsonValue>,
    /// How many membership events each user's invites and joins made.
    member_events: BTreeMap<OwnedUserId, usize>,
}

/// A refusal: status, `errcode`, message.
struct Refusal(StatusCode, &'static str, String);

fn forbidden(message: impl Into<String>) -> Refusal {
    Refusal(StatusCode::FORBIDDEN, "M_FORBIDDEN", message.into())
}

fn not_found(message: impl Into<String>) -> Refusal {
    Refusal(StatusCode::NOT_FOUND, "M_NOT_FOUND", message.into())
}

fn bad_json(e: impl std::fmt::Display) -> Refusal {
    Refusal(StatusCode::BAD_REQUEST, "M_BAD_JSON", e.to_string())
}

/// How the fake answers one request.
enum Reply {
    Json(StatusCode, JsonValue),
    Refused,
    Silent,
}

impl From<Refusal> for Reply {
    fn from(Refusal(status, errcode, message): Refusal) -> Reply {
        Reply::Json(status, json!({"errcode": errcode, "error": message}))
    }
}

impl From<Answer> for Reply {
    fn from(answer: Answer) -> Reply {
        match answer {
            Answer::Error(status, body) => Reply::Json(status, body),
            Answer::Refused => Reply::Refused,
            Answer::Silent => Reply::Silent,
        }
    }
}

/// A request, taken apart.
struct Request {
    endpoint: Endpoint,
    method: Method,
    /// The path's segments after `/_matrix/client/`, decoded.
    path: Vec<String>,
    query: Vec<(String, String)>,
    token: Option<String>,
    body: JsonValue,
}

impl Request {
    fn parse(req: &http::Request<Vec<u8>>) -> Request {
        let method = req.method().clone();
        let path: Vec<String> = req.uri().path().split('/').skip(3).map(|s| decode(s, false)).collect();
        let query = req
            .uri()
            .query()
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (decode(k, true), decode(v, true))
            })
            .collect();
        let token = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()?.strip_prefix("Bearer "))
            .map(str::to_owned);
        let body = serde_json::from_slice(req.body()).unwrap_or(JsonValue::Null);
        let p: Vec<&str> = path.iter().map(String::as_str).collect();
        let endpoint = match (&method, p.as_slice()) {
            (&Method::GET, ["versions"]) => Endpoint::Versions,
            (&Method::GET, ["v3", "rooms", _, "state", "m.room.member", _]) => Endpoint::Member,
            (&Method::PUT, ["v3", "rooms", _, "state", "m.room.member", _]) => Endpoint::SetMember,
            (&Method::GET, ["v3", "rooms", _, "state", "m.room.power_levels", ""]) => Endpoint::PowerLevels,
            (&Method::PUT, ["v3", "rooms", _, "state", "m.room.power_levels", ""]) => Endpoint::SetPowerLevels,
            (&Method::POST, ["v3", "rooms", _, "invite"]) => Endpoint::Invite,
            (&Method::POST, ["v3", "join", room]) if room.starts_with('!') => Endpoint::Join,
            (&Method::PUT, ["v3", "user", _, "rooms", _, "tags", _]) => Endpoint::Tag,
            (&Method::PUT, ["v3", "rooms", _, "send", _, _]) => Endpoint::Send,
            (&Method::GET, ["v3", "rooms", _, "messages"]) => Endpoint::Messages,
            (&Method::POST, ["v3", "user", _, "filter"]) => Endpoint::Filter,
            (&Method::GET, ["v3", "sync"]) => Endpoint::Sync,
            _ => Endpoint::Other,
        };
        Request { endpoint, method, path, query, token, body }
    }

    /// The room it is about, from its path.
    fn room(&self) -> Option<OwnedRoomId> {
        let at = match self.path.get(1).map(String::as_str) {
            Some("rooms" | "join") => 2,
            Some("user") => 4,
            _ => return None,
        };
        self.path.get(at)?.as_str().try_into().ok()
    }

    fn param(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Percent-decoding (and `+` as a space in a query).
fn decode(s: &str, query: bool) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = s.get(i + 1..i + 3).filter(|_| bytes[i] == b'%').and_then(|h| u8::from_str_radix(h, 16).ok());
        match (escaped, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 2;
            }
            (None, b'+') if query => out.push(b' '),
            (None, b) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Fake {
    /// The homeserver of `server`, with no rooms.
    pub fn new(server: &str) -> Fake {
        Fake(Arc::new(Mutex::new(World {
            server: server.try_into().expect("a server name"),
            sessions: HashMap::new(),
            rooms: HashMap::new(),
            tags: HashMap::new(),
            transactions: HashMap::new(),
            events: 0,
            seen: Vec::new(),
            script: Vec::new(),
            writes: 0,
            crash: None,
            down: false,
            remote_invites: None,
        })))
    }

    fn world(&self) -> std::sync::MutexGuard<'_, World> {
        self.0.lock().expect("the fake homeserver")
    }

    /// The appservice's client, connected as the service connects it.
    pub async fn appservice(&self) -> Homeserver {
        Homeserver::connect_through(ADDRESS, AS_TOKEN, Transport::Fake(self.clone())).await.expect("the fake connects")
    }

    /// `user`'s own session (the device side), with a token of its own.
    pub async fn session(&self, user: &UserId) -> Homeserver {
        let token = format!("token-of-{user}");
        self.world().sessions.insert(token.clone(), user.to_owned());
        Homeserver::connect_user_through(ADDRESS, &token, Transport::Fake(self.clone()))
            .await
            .expect("the fake connects")
    }

    /// The invitees' server (every other server) takes `burst` invites, then one every `every`,
    /// refusing the others over federation; this server then answers 502, as Synapse does when
    /// `rc_invites.per_user` refuses its invite on the other side.
    pub fn limit_remote_invites(&self, burst: u32, every: std::time::Duration) {
        let tokens = f64::from(burst);
        self.world().remote_invites = Some(Bucket { burst: tokens, every, tokens, at: tokio::time::Instant::now() });
    }

    /// A private room that `creator` is in, with power level 100.
    pub fn create_room(&self, room: &RoomId, creator: &UserId) {
        let room_state = Room {
            public: false,
            members: BTreeMap::from([(creator.to_owned(), MembershipState::Join)]),
            power_levels: json!({
                "users": {creator.as_str(): 100},
                "users_default": 0,
                "events": {"m.room.power_levels": 100},
                "state_default": 50,
                "invite": 0,
            }),
            timeline: Vec::new(),
            invited_by: BTreeMap::new(),
            member_content: BTreeMap::new(),
            member_events: BTreeMap::new(),
        };
        self.world().rooms.insert(room.to_owned(), room_state);
    }

    /// Anyone may join the room.
    pub fn make_public(&self, room: &RoomId) {
        self.world().room_mut(room).public = true;
    }

    /// `inviter` (of any server: an invite that came over federation) invites `invitee`.
    pub fn invite(&self, room: &RoomId, inviter: &UserId, invitee: &UserId, reason: Option<String>) {
        let mut world = self.world();
        world.events += 1;
        let seq = world.events;
        let room = world.room_mut(room);
        room.members.insert(invitee.to_owned(), MembershipState::Invite);
        room.invited_by.insert(invitee.to_owned(), (inviter.to_owned(), reason, seq));
    }

    pub fn set_membership(&self, room: &RoomId, user: &UserId, membership: MembershipState) {
        self.world().room_mut(room).members.insert(user.to_owned(), membership);
    }

    pub fn set_level(&self, room: &RoomId, user: &UserId, level: i64) {
        self.world().room_mut(room).power_levels["users"][user.as_str()] = level.into();
    }

    /// A message already in the room, from `sender`.
    pub fn post(&self, room: &RoomId, sender: &UserId, content: JsonValue) {
        let mut world = self.world();
        world.append(room, sender, "m.room.message", content);
    }

    /// Answers the next `times` requests to `endpoint` (all of them: `None`) with `answer`.
    pub fn script(&self, endpoint: Endpoint, answer: Answer, times: Option<usize>) {
        self.world().script.push(Rule { endpoint, answer, times });
    }

    /// The service crashes right after the homeserver applied its `writes`-th write: that
    /// request gets no answer, nor does any after it until [`Fake::restart`]. Notified then.
    pub fn crash_after(&self, writes: usize) -> Arc<Notify> {
        let crashed = Arc::new(Notify::new());
        self.world().crash = Some((writes, Arc::clone(&crashed)));
        crashed
    }

    /// Answers again after a crash.
    pub fn restart(&self) {
        let mut world = self.world();
        world.down = false;
        world.crash = None;
    }

    /// How many membership events `user`'s invites and joins into `room` made through the API.
    pub fn member_events(&self, room: &RoomId, user: &UserId) -> usize {
        self.world().rooms.get(room).and_then(|r| r.member_events.get(user).copied()).unwrap_or(0)
    }

    pub fn membership(&self, room: &RoomId, user: &UserId) -> Option<MembershipState> {
        self.world().rooms.get(room)?.members.get(user).cloned()
    }

    pub fn level(&self, room: &RoomId, user: &UserId) -> i64 {
        self.world().rooms.get(room).map_or(0, |r| level_of(&r.power_levels, user))
    }

    /// `user`'s tags on the room, by name.
    pub fn tags(&self, user: &UserId, room: &RoomId) -> BTreeMap<String, TagInfo> {
        self.world().tags.get(&(user.to_owned(), room.to_owned())).cloned().unwrap_or_default()
    }

    /// The room's messages, oldest first.
    pub fn messages(&self, room: &RoomId) -> Vec<JsonValue> {
        self.world().rooms.get(room).map(|r| r.timeline.clone()).unwrap_or_default()
    }

    /// Every request it got, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.world().seen.clone()
    }

    /// How many requests to `endpoint` it got, answered or not.
    pub fn count(&self, endpoint: Endpoint) -> usize {
        self.world().seen.iter().filter(|s| s.endpoint == endpoint).count()
    }

    /// The transport's end: the answer to one request.
    pub(super) async fn answer(&self, req: http::Request<Vec<u8>>) -> Result<http::Response<Vec<u8>>, HsError> {
        let reply = self.world().handle(Request::parse(&req));
        match reply {
            Reply::Json(status, body) => Ok(http::Response::builder()
                .status(status)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(serde_json::to_vec(&body).expect("json"))
                .expect("a response")),
            Reply::Refused => Err(HsError::Unreachable("Connection refused (the fake homeserver)".into())),
            Reply::Silent => std::future::pending().await,
        }
    }
}

fn level_of(power_levels: &JsonValue, user: &UserId) -> i64 {
    power_levels["users"][user.as_str()].as_i64().or_else(|| power_levels["users_default"].as_i64()).unwrap_or(0)
}

impl World {
    fn room_mut(&mut self, room: &RoomId) -> &mut Room {
        self.rooms.get_mut(room).expect("a room of the fake: create_room first")
    }

    fn append(&mut self, room: &RoomId, sender: &UserId, kind: &str, content: JsonValue) -> String {
        self.events += 1;
        let event_id = format!("$event{}", self.events);
        let event = json!({
            "type": kind,
            "sender": sender,
            "content": content,
            "event_id": event_id,
            "room_id": room,
            "origin_server_ts": self.events,
        });
        self.room_mut(room).timeline.push(event);
        event_id
    }

    /// Whom the request acts as: the user its token is, or the appservice's asserted user.
    fn requester(&self, req: &Request) -> Result<OwnedUserId, Refusal> {
        let unknown = || Refusal(StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN", "Unrecognised access token".into());
        match req.token.as_deref() {
            Some(AS_TOKEN) => {
                let user: OwnedUserId = match req.param("user_id") {
                    Some(user) => user.try_into().map_err(bad_json)?,
                    None => format!("@handoff:{}", self.server).try_into().expect("a user ID"),
                };
                if user.server_name() != self.server {
                    return Err(forbidden("Application service cannot masquerade as this user"));
                }
                Ok(user)
            }
            Some(token) => self.sessions.get(token).cloned().ok_or_else(unknown),
            None => Err(Refusal(StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN", "Missing access token".into())),
        }
    }

    fn scripted(&mut self, endpoint: Endpoint) -> Option<Answer> {
        let rule = self.script.iter_mut().find(|r| r.endpoint == endpoint && r.times != Some(0))?;
        if let Some(n) = &mut rule.times {
            *n -= 1;
        }
        Some(rule.answer.clone())
    }

    fn handle(&mut self, req: Request) -> Reply {
        let user = self.requester(&req);
        self.seen.push(Seen {
            endpoint: req.endpoint,
            user: user.as_ref().ok().cloned(),
            room: req.room(),
            query: req.query.clone(),
            body: req.body.clone(),
        });
        if self.down {
            return Reply::Silent;
        }
        if let Some(answer) = self.scripted(req.endpoint) {
            return answer.into();
        }
        if req.endpoint == Endpoint::Versions {
            return Reply::Json(StatusCode::OK, json!({"versions": ["v1.11"]}));
        }
        let handled = user.and_then(|user| self.serve(&req, &user));
        match handled {
            Ok(body) => {
                if req.endpoint.writes() {
                    self.writes += 1;
                    if let Some((after, crashed)) = &self.crash
                        && *after == self.writes
                    {
                        crashed.notify_one();
                        self.down = true;
                        return Reply::Silent;
                    }
                }
                Reply::Json(StatusCode::OK, body)
            }
            Err(refusal) => refusal.into(),
        }
    }

    fn serve(&mut self, req: &Request, user: &UserId) -> Result<JsonValue, Refusal> {
        if req.endpoint == Endpoint::Other {
            let message = format!("{} /{} is not served by the fake", req.method, req.path.join("/"));
            return Err(Refusal(StatusCode::NOT_FOUND, "M_UNRECOGNIZED", message));
        }
        match req.endpoint {
            Endpoint::Filter => return Ok(json!({"filter_id": "1"})),
            // No long poll: what came since `since` (the server's event count), at once.
            Endpoint::Sync => return Ok(self.pending_invites(user, req.param("since"))),
            _ => {}
        }
        let room_id = req.room().ok_or_else(|| bad_json("no room in the path"))?;
        match req.endpoint {
            Endpoint::Join => return self.join(&room_id, user, req),
            // Any room's ID, whoever is in it.
            Endpoint::Tag => {
                if req.path[2] != user.as_str() {
                    return Err(forbidden("Cannot set another user's tags"));
                }
                let info: TagInfo = serde_json::from_value(req.body.clone()).map_err(bad_json)?;
                self.tags.entry((user.to_owned(), room_id)).or_default().insert(req.path[6].clone(), info);
                return Ok(json!({}));
            }
            _ => {}
        }
        let token = req.token.clone().unwrap_or_default();
        let Some(room) = self.rooms.get_mut(&room_id) else {
            return Err(forbidden(format!("User {user} not in room {room_id}")));
        };
        if room.members.get(user) != Some(&MembershipState::Join) {
            return Err(forbidden(format!("User {user} not in room {room_id}")));
        }
        match req.endpoint {
            Endpoint::Member => {
                let target: &UserId = req.path[5].as_str().try_into().map_err(bad_json)?;
                match (room.members.get(target), room.member_content.get(target)) {
                    (Some(MembershipState::Join), Some(content)) => Ok(content.clone()),
                    (Some(membership), _) => Ok(json!({"membership": membership})),
                    (None, _) => Err(not_found("Event not found.")),
                }
            }
            Endpoint::SetMember => {
                let target: OwnedUserId = req.path[5].as_str().try_into().map_err(bad_json)?;
                if target != user || req.body["membership"] != "join" {
                    return Err(forbidden("the fake takes one's own join only"));
                }
                room.member_content.insert(target.clone(), req.body.clone());
                let room_id = room_id.clone();
                let event_id = self.append(&room_id, user, "m.room.member", req.body.clone());
                if let Some(event) = self.room_mut(&room_id).timeline.last_mut() {
                    event["state_key"] = target.as_str().into();
                }
                Ok(json!({"event_id": event_id}))
            }
            Endpoint::PowerLevels => Ok(room.power_levels.clone()),
            Endpoint::SetPowerLevels => {
                serde_json::from_value::<RoomPowerLevelsEventContent>(req.body.clone()).map_err(bad_json)?;
                let own = level_of(&room.power_levels, user);
                let needed = room.power_levels["events"]["m.room.power_levels"]
                    .as_i64()
                    .or_else(|| room.power_levels["state_default"].as_i64())
                    .unwrap_or(50);
                if own < needed {
                    return Err(forbidden("You don't have permission to change the power levels"));
                }
                let users = req.body["users"].as_object().cloned().unwrap_or_default();
                let raised = users.iter().any(|(u, level)| {
                    let before = room.power_levels["users"][u.as_str()].as_i64();
                    level.as_i64() != before && level.as_i64().unwrap_or(0) > own
                });
                if raised {
                    return Err(forbidden("You cannot raise a user's level above your own"));
                }
                room.power_levels = req.body.clone();
                Ok(json!({"event_id": "$power_levels"}))
            }
            Endpoint::Invite => {
                let invitee: OwnedUserId =
                    req.body["user_id"].as_str().unwrap_or_default().try_into().map_err(bad_json)?;
                if level_of(&room.power_levels, user) < room.power_levels["invite"].as_i64().unwrap_or(0) {
                    return Err(forbidden("You don't have permission to invite users"));
                }
                let remote = invitee.server_name() != self.server;
                if remote
                    && let Some(bucket) = &mut self.remote_invites
                    && !bucket.take()
                {
                    return Err(Refusal(
                        StatusCode::BAD_GATEWAY,
                        "M_UNKNOWN",
                        format!("Can't connect to server {}", invitee.server_name()),
                    ));
                }
                let reason = req.body["reason"].as_str().map(str::to_owned);
                let same = |(by, why, _): &(OwnedUserId, Option<String>, u64)| by == user && *why == reason;
                match room.members.get(&invitee) {
                    Some(MembershipState::Join) => Err(forbidden(format!("{invitee} is already in the room."))),
                    Some(MembershipState::Ban) => Err(forbidden(format!("{invitee} is banned from the room"))),
                    // The same invite again (same inviter, same reason): Synapse answers with the
                    // first and makes no event (`update_membership_locked`).
                    Some(MembershipState::Invite) if room.invited_by.get(&invitee).is_some_and(same) => Ok(json!({})),
                    _ => {
                        self.events += 1;
                        *room.member_events.entry(invitee.clone()).or_default() += 1;
                        room.invited_by.insert(invitee.clone(), (user.to_owned(), reason, self.events));
                        room.members.insert(invitee, MembershipState::Invite);
                        Ok(json!({}))
                    }
                }
            }
            Endpoint::Send => {
                let (kind, txn) = (req.path[4].clone(), req.path[5].clone());
                let key = (token, user.to_owned(), txn);
                let event_id = match self.transactions.get(&key) {
                    Some(event_id) => event_id.clone(),
                    None => {
                        let event_id = self.append(&room_id, user, &kind, req.body.clone());
                        self.transactions.insert(key, event_id.clone());
                        event_id
                    }
                };
                Ok(json!({"event_id": event_id}))
            }
            Endpoint::Messages => {
                let filter: RoomEventFilter = match req.param("filter") {
                    Some(filter) => serde_json::from_str(filter).map_err(bad_json)?,
                    None => RoomEventFilter::default(),
                };
                let limit = req.param("limit").and_then(|l| l.parse().ok()).unwrap_or(10);
                let wanted = |ev: &&JsonValue| {
                    filter.types.as_ref().is_none_or(|t| t.iter().any(|t| ev["type"] == t.as_str()))
                        && filter.senders.as_ref().is_none_or(|s| s.iter().any(|s| ev["sender"] == s.as_str()))
                };
                let events: Vec<JsonValue> = match req.param("dir") {
                    Some("f") => room.timeline.iter().filter(wanted).take(limit).cloned().collect(),
                    _ => room.timeline.iter().rev().filter(wanted).take(limit).cloned().collect(),
                };
                Ok(json!({"chunk": events, "start": "t0", "end": "t1"}))
            }
            Endpoint::Versions
            | Endpoint::Join
            | Endpoint::Tag
            | Endpoint::Filter
            | Endpoint::Sync
            | Endpoint::Other => unreachable!("served above"),
        }
    }

    /// A sync of `user`'s pending invites (those that came after `since`), as Synapse shows them:
    /// the invite's member event among the room's stripped state.
    fn pending_invites(&self, user: &UserId, since: Option<&str>) -> JsonValue {
        let since: u64 = since.and_then(|s| s.parse().ok()).unwrap_or(0);
        let mut invite = serde_json::Map::new();
        for (room_id, room) in &self.rooms {
            let Some((inviter, reason, seq)) = room.invited_by.get(user) else { continue };
            if room.members.get(user) != Some(&MembershipState::Invite) || *seq <= since {
                continue;
            }
            let mut content = json!({"membership": "invite"});
            if let Some(reason) = reason {
                content["reason"] = reason.as_str().into();
            }
            let member = json!({"type": "m.room.member", "state_key": user, "sender": inviter, "content": content});
            invite.insert(room_id.to_string(), json!({"invite_state": {"events": [member]}}));
        }
        json!({"next_batch": self.events.to_string(), "rooms": {"invite": invite}})
    }

    /// A join by the room's ID: an invited user, or anyone in a public room.
    fn join(&mut self, room_id: &RoomId, user: &UserId, req: &Request) -> Result<JsonValue, Refusal> {
        let Some(room) = self.rooms.get_mut(room_id) else {
            return Err(not_found(format!("No known servers (via {:?})", req.param("via"))));
        };
        match room.members.get(user) {
            // Joined already: the same join again, no event (as Synapse).
            Some(MembershipState::Join) => return Ok(json!({"room_id": room_id})),
            Some(MembershipState::Ban) => return Err(forbidden("You are banned from the room")),
            Some(MembershipState::Invite) => {}
            _ if room.public => {}
            _ => return Err(forbidden("You are not invited to this room.")),
        }
        room.members.insert(user.to_owned(), MembershipState::Join);
        *room.member_events.entry(user.to_owned()).or_default() += 1;
        Ok(json!({"room_id": room_id}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ruma::api::client::membership::{invite_user, join_room_by_id_or_alias};
    use ruma::api::client::message::send_message_event;
    use ruma::api::error::ErrorKind;
    use ruma::events::room::message::RoomMessageEventContent;
    use ruma::{owned_room_id, owned_user_id};

    use crate::homeserver::Retry;

    /// The rules the stages rely on, through the real client: a join needs an invite, the
    /// appservice acts only for its own server's users, a transaction is sent once, and a
    /// script answers before the homeserver does, as many times as it says.
    #[tokio::test]
    async fn it_keeps_synapses_rules_and_its_scripts() {
        let fake = Fake::new("a.org");
        let (room, old, new) = (owned_room_id!("!r:a.org"), owned_user_id!("@old:a.org"), owned_user_id!("@new:a.org"));
        fake.create_room(&room, &old);
        let hs = fake.appservice().await.with_retry(Retry::NONE);
        let join = || join_room_by_id_or_alias::v3::Request::new(room.clone().into());
        let err = hs.send_as(&new, join()).await.unwrap_err();
        assert!(matches!(err.kind(), Some(ErrorKind::Forbidden)), "{err}");
        let invite =
            invite_user::v3::Request::new(room.clone(), invite_user::v3::InviteUserId::new(new.clone()).into());
        hs.send_as(&old, invite.clone()).await.unwrap();
        hs.send_as(&new, join()).await.unwrap();
        assert_eq!(fake.membership(&room, &new), Some(MembershipState::Join));
        let stranger = owned_user_id!("@old:b.org");
        let err = hs.send_as(&stranger, invite).await.unwrap_err();
        assert!(matches!(err.kind(), Some(ErrorKind::Forbidden)), "{err}");

        let send = send_message_event::v3::Request::new(
            room.clone(),
            "txn".into(),
            &RoomMessageEventContent::text_plain("hi"),
        )
        .unwrap();
        let first = hs.send_as(&new, send.clone()).await.unwrap().event_id;
        assert_eq!(hs.send_as(&new, send.clone()).await.unwrap().event_id, first);
        assert_eq!(fake.messages(&room).len(), 1, "one transaction, one message");

        fake.script(Endpoint::Send, Answer::limited(10), Some(1));
        fake.script(Endpoint::Send, Answer::Refused, Some(1));
        let err = hs.send_as(&new, send.clone()).await.unwrap_err();
        assert!(matches!(err.kind(), Some(ErrorKind::LimitExceeded(_))), "{err}");
        let err = hs.send_as(&new, send.clone()).await.unwrap_err();
        assert!(matches!(err, HsError::Unreachable(_)), "{err}");
        hs.send_as(&new, send).await.unwrap();
        assert_eq!(fake.count(Endpoint::Send), 5);
        assert_eq!(fake.count(Endpoint::Invite), 2);
    }

    #[test]
    fn decoding_takes_percent_escapes_and_query_spaces() {
        assert_eq!(decode("%21room%3Aa.org", false), "!room:a.org");
        assert_eq!(decode("a+b%2", true), "a b%2");
        assert_eq!(decode("a+b", false), "a+b");
    }
}
