//! End-to-end harness: a real Synapse (from `handoff::sandbox`), the real `handoff` binary
//! serving it, and clients that act as users with their own access tokens.
//!
//! Rate limits: every Synapse runs with Synapse's default rate limits, as a homeserver in
//! production does. handoff's service acts through its registrations, which are not rate-limited
//! there either (`rate_limited: false`); its bot's own device, its device side (`handoff login`,
//! `export`, `import`, with a person's own token) and what one server sends another are limited
//! as anywhere. The users a test makes with [`Harness::user`] are exempt ([`User::exempt`]): what
//! they do builds the test's world or plays the person at their client, and is not under test. A
//! test that runs the device side as one of them first puts it under the defaults
//! ([`User::under_defaults`]). A test that lifts a limit does it with
//! `handoff::sandbox::lifted`, saying why beside it.
#![allow(dead_code)]

pub mod federation;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use handoff::sandbox::{Sandbox, Synapse};
use ruma::api::Direction;
use ruma::api::client::authenticated_media::get_content;
use ruma::api::client::config::{get_global_account_data, set_global_account_data};
use ruma::api::client::media::create_content;
use ruma::api::client::membership::{invite_user, join_room_by_id};
use ruma::api::client::message::{get_message_events, send_message_event};
use ruma::api::client::room::create_room;
use ruma::api::client::state::{get_state_event_for_key, send_state_event};
use ruma::api::client::tag::{create_tag, get_tags};
use ruma::events::room::MediaSource;
use ruma::events::room::message::{FileMessageEventContent, MessageType, RoomMessageEventContent};
use ruma::events::tag::{TagInfo, Tags};
use ruma::events::{AnyTimelineEvent, StateEventType};
use ruma::serde::Raw;
use ruma::{OwnedMxcUri, OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde_json::{Value, json};

pub const HANDOFF: &str = env!("CARGO_BIN_EXE_handoff");

/// How long a test waits for something that should happen. Generous: tests run in parallel, each
/// with its own Synapse, on a 2-core machine.
pub const PATIENCE: Duration = Duration::from_secs(90);

/// How often a test looks again for what it waits for.
pub const POLL: Duration = Duration::from_millis(200);

/// Synapse plus `handoff serve`, in a temporary directory removed at the end.
pub struct Harness {
    pub sandbox: Sandbox,
    pub handoff: Option<Child>,
    pub handoff_url: String,
    pub bot: OwnedUserId,
    /// How long [`Harness::ask`] and [`Harness::bot_says`] wait for the bot ([`PATIENCE`]), and
    /// how often they look ([`POLL`]): a benchmark moving hundreds of rooms waits longer, and
    /// looks less often, to leave the homeserver to the transfer.
    pub patience: Duration,
    pub poll: Duration,
    /// A server admin of the homeserver, for its admin API (the users' exemption from rate limits).
    pub admin: Admin,
    /// The folder it all lives in, when the harness owns it (not when a [`federation`] does).
    _tmp: Option<tempfile::TempDir>,
}

impl Harness {
    pub async fn start() -> Harness {
        Self::start_with(|c| c).await
    }

    /// `change` may change the config text before registrations are generated (with [`edit`]).
    pub async fn start_with(change: impl FnOnce(String) -> String) -> Harness {
        Self::start_with_homeserver(change, "").await
    }

    /// Like [`Harness::start_with`], with `homeserver_extra` (YAML) appended to Synapse's config.
    pub async fn start_with_homeserver(change: impl FnOnce(String) -> String, homeserver_extra: &str) -> Harness {
        let tmp = tempfile::tempdir().unwrap();
        let sandbox = Sandbox::create_with(
            tmp.path(),
            |c| change(edit(c, "level: info", "level: \"info,handoff=debug\"")),
            homeserver_extra,
        )
        .await
        .expect("sandbox starts");
        Self::serving(sandbox, Some(tmp)).await
    }

    /// `handoff serve` started on `sandbox` (which `tmp`, if given, holds).
    pub async fn serving(sandbox: Sandbox, tmp: Option<tempfile::TempDir>) -> Harness {
        let handoff_url = format!("http://127.0.0.1:{}", sandbox.handoff_port);
        let bot = sandbox.bot_user_id().expect("the sandbox's config loads");
        let admin = Admin::of(&sandbox.synapse).await;
        let mut h =
            Harness { sandbox, handoff: None, handoff_url, bot, patience: PATIENCE, poll: POLL, admin, _tmp: tmp };
        h.start_handoff().await;
        h
    }

    pub fn log_path(&self) -> PathBuf {
        self.sandbox.dir.join("handoff.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts `handoff serve` and waits until `/health` answers 200.
    pub async fn start_handoff(&mut self) {
        let log = std::fs::File::options().create(true).append(true).open(self.log_path()).unwrap();
        let child = Command::new(HANDOFF)
            .args(["serve", "-c"])
            .arg(&self.sandbox.config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("handoff starts");
        self.handoff = Some(child);
        let deadline = Instant::now() + PATIENCE;
        let health = format!("{}/health", self.handoff_url);
        loop {
            if let Ok(r) = reqwest::get(&health).await
                && r.status().is_success()
            {
                return;
            }
            if let Some(status) = self.handoff.as_mut().unwrap().try_wait().unwrap() {
                panic!("handoff exited ({status}) at start-up:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "handoff not healthy in {PATIENCE:?}:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The process ID of the running `handoff serve`.
    pub fn handoff_pid(&self) -> u32 {
        self.handoff.as_ref().expect("handoff running").id()
    }

    /// Sends `signal` (e.g. "TERM", "KILL") to handoff and waits for it to exit.
    pub fn signal_handoff(&mut self, signal: &str) -> ExitStatus {
        let mut child = self.handoff.take().expect("handoff running");
        let ok = Command::new("kill").arg(format!("-{signal}")).arg(child.id().to_string()).status().unwrap();
        assert!(ok.success());
        child.wait().unwrap()
    }

    pub fn synapse(&self) -> &Synapse {
        &self.sandbox.synapse
    }

    /// The config file's value for a dotted key such as `appservice.hs_token`.
    pub fn config_value(&self, key: &str) -> String {
        let text = std::fs::read_to_string(&self.sandbox.config_path).unwrap();
        let yaml: Value = serde_norway::from_str(&text).unwrap();
        let mut v = &yaml;
        for part in key.split('.') {
            v = &v[part];
        }
        v.as_str().unwrap_or_else(|| panic!("{key} in config")).to_owned()
    }

    /// Registers a user and returns a client acting with that user's own access token, exempt from
    /// the homeserver's rate limits (what a test's users do is not under test; handoff's service
    /// acts as them through its registration, which this changes nothing for). Before the device
    /// side acts with its token, [`User::under_defaults`].
    pub async fn user(&self, localpart: &str) -> User {
        self.user_with_password(localpart, "password").await
    }

    /// [`Harness::user`] with that password (for the device side's `handoff login`).
    pub async fn user_with_password(&self, localpart: &str, password: &str) -> User {
        let (user_id, token) = self.synapse().register_user(localpart, password, false).await.unwrap();
        let mut user = User::new(&self.synapse().url, user_id, token).await;
        user.admin = Some(self.admin.clone());
        user.exempt().await;
        user
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(mut child) = self.handoff.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- handoff log ----\n{}", self.log());
        }
    }
}

/// A Matrix client acting as one user with its own access token.
pub struct User {
    pub id: OwnedUserId,
    pub token: String,
    client: ruma_client::Client<reqwest::Client>,
    txn: std::sync::atomic::AtomicU64,
    /// Its homeserver's admin, when the user may be exempted from rate limits ([`Harness::user`]).
    admin: Option<Admin>,
}

/// The admin API of a homeserver, as a server admin of it: what exempts a test's users from the
/// homeserver's rate limits ([`User::exempt`]).
#[derive(Clone)]
pub struct Admin {
    url: String,
    token: String,
}

impl Admin {
    /// Registers a server admin on `synapse` (with the shared secret: no rate limit applies to it).
    pub async fn of(synapse: &Synapse) -> Admin {
        let (_, token) = synapse.register_user("fixtures-admin", "password", true).await.unwrap();
        Admin { url: synapse.url.clone(), token }
    }

    /// Exempts `user` from the homeserver's rate limits (`exempt`), or puts it back under them.
    /// Synapse's override (`messages_per_second: 0`) exempts the user from every limit that knows
    /// who asks: events, joins (local and remote), invites sent, room creation, media, profile, …;
    /// not from what is counted per IP address (logins, registration) nor from the limit another
    /// server applies to invites it receives. It applies at once: setting or deleting it
    /// invalidates Synapse's cache of it.
    pub async fn set_exempt(&self, user: &UserId, exempt: bool) {
        let url = format!("{}/_synapse/admin/v1/users/{user}/override_ratelimit", self.url);
        let http = reqwest::Client::new();
        let req = if exempt {
            http.post(&url).json(&json!({"messages_per_second": 0, "burst_count": 0}))
        } else {
            http.delete(&url)
        };
        let resp = req.bearer_auth(&self.token).send().await.unwrap();
        let status = resp.status();
        assert!(
            status.is_success(),
            "override_ratelimit of {user} ({exempt}): {status} {}",
            resp.text().await.unwrap()
        );
    }
}

impl User {
    pub async fn new(homeserver: &str, id: OwnedUserId, token: String) -> User {
        let client = ruma_client::Client::builder()
            .homeserver_url(homeserver.to_owned())
            .access_token(Some(token.clone()))
            .http_client(reqwest::Client::new())
            .await
            .unwrap();
        User { id, token, client, txn: Default::default(), admin: None }
    }

    /// Exempts this user from its homeserver's rate limits (see [`Admin::set_exempt`]): a user of
    /// [`Harness::user`] is, from the start.
    pub async fn exempt(&self) {
        self.admin.as_ref().expect("a user of Harness::user").set_exempt(&self.id, true).await;
    }

    /// Puts this user back under its homeserver's default rate limits: before handoff's device side
    /// acts with its own token (the device side is under test, and must meet them).
    pub async fn under_defaults(&self) {
        self.admin.as_ref().expect("a user of Harness::user").set_exempt(&self.id, false).await;
    }

    /// Creates a DM (is_direct, trusted private chat) with `other` invited.
    pub async fn create_dm(&self, other: &UserId) -> OwnedRoomId {
        let mut req = create_room::v3::Request::new();
        req.invite = vec![other.to_owned()];
        req.is_direct = true;
        req.preset = Some(create_room::v3::RoomPreset::TrustedPrivateChat);
        self.client.send_request(req).await.unwrap().room_id
    }

    /// Sends any request with this user's token.
    pub async fn send<R>(&self, request: R) -> R::IncomingResponse
    where
        R: ruma::api::OutgoingRequest<EndpointError = ruma::api::error::Error> + Clone + std::fmt::Debug,
        for<'a> R::Authentication:
            ruma::api::auth_scheme::AuthScheme<Input<'a> = ruma::api::auth_scheme::SendAccessToken<'a>>,
        R::PathBuilder: ruma_client::SupportedPathBuilder,
    {
        let debug = format!("{request:?}");
        self.client.send_request(request).await.unwrap_or_else(|e| panic!("{debug}: {e}"))
    }

    /// Sends any request with this user's token; the homeserver's error is returned, not a panic.
    pub async fn try_send<R>(&self, request: R) -> Result<R::IncomingResponse, String>
    where
        R: ruma::api::OutgoingRequest<EndpointError = ruma::api::error::Error> + Clone,
        for<'a> R::Authentication:
            ruma::api::auth_scheme::AuthScheme<Input<'a> = ruma::api::auth_scheme::SendAccessToken<'a>>,
        R::PathBuilder: ruma_client::SupportedPathBuilder,
    {
        self.client.send_request(request).await.map_err(|e| e.to_string())
    }

    /// Creates a private group room named `name`.
    pub async fn create_room(&self, name: &str) -> OwnedRoomId {
        let mut req = create_room::v3::Request::new();
        req.name = Some(name.to_owned());
        req.preset = Some(create_room::v3::RoomPreset::PrivateChat);
        self.client.send_request(req).await.unwrap().room_id
    }

    /// Creates `n` private group rooms named `room 000`, `room 001`, …, a few at a time; returns
    /// them in that order.
    pub async fn create_rooms(&self, n: usize) -> Vec<OwnedRoomId> {
        use futures_util::stream::{self, StreamExt};
        let named = |i: usize| async move { self.create_room(&format!("room {i:03}")).await };
        stream::iter(0..n).map(named).buffered(8).collect().await
    }

    /// Tags `room` with `tag` (`m.favourite`, `m.lowpriority`, `u.work`, …) at `order`.
    pub async fn tag(&self, room: &RoomId, tag: &str, order: Option<f64>) {
        let mut info = TagInfo::new();
        info.order = order;
        self.send(create_tag::v3::Request::new(self.id.clone(), room.to_owned(), tag.into(), info)).await;
    }

    /// This user's tags on `room`.
    pub async fn tags(&self, room: &RoomId) -> Tags {
        self.send(get_tags::v3::Request::new(self.id.clone(), room.to_owned())).await.tags
    }

    /// Sets this user's global account data of type `kind`.
    pub async fn set_account_data(&self, kind: &str, content: Value) {
        let req = set_global_account_data::v3::Request::new_raw(self.id.clone(), kind.into(), raw(content));
        self.send(req).await;
    }

    /// This user's global account data of type `kind`, if it has any.
    pub async fn account_data(&self, kind: &str) -> Option<Value> {
        let req = get_global_account_data::v3::Request::new(self.id.clone(), kind.into());
        self.try_send(req).await.ok().map(|r| r.account_data.deserialize_as().unwrap())
    }

    /// Opens a DM with each of `peers`, who join it, and marks them in this user's `m.direct`
    /// (replacing what it held); returns the DMs in the order of `peers`.
    pub async fn dms_with(&self, peers: &[&User]) -> Vec<OwnedRoomId> {
        let mut dms = Vec::new();
        let mut direct = serde_json::Map::new();
        for peer in peers {
            let dm = self.create_dm(&peer.id).await;
            peer.join(&dm).await;
            direct.insert(peer.id.to_string(), json!([dm]));
            dms.push(dm);
        }
        self.set_account_data("m.direct", Value::Object(direct)).await;
        dms
    }

    pub async fn invite(&self, room: &RoomId, user: &UserId) {
        let req =
            invite_user::v3::Request::new(room.to_owned(), invite_user::v3::InviteUserId::new(user.to_owned()).into());
        self.client.send_request(req).await.unwrap();
    }

    /// Sets the room's state event of type `kind` (empty state key).
    pub async fn send_state(&self, room: &RoomId, kind: &str, content: Value) {
        let req = send_state_event::v3::Request::new_raw(room.to_owned(), kind.into(), String::new(), raw(content));
        self.send(req).await;
    }

    pub async fn join(&self, room: &RoomId) {
        self.client.send_request(join_room_by_id::v3::Request::new(room.to_owned())).await.unwrap();
    }

    pub async fn send_text(&self, room: &RoomId, body: &str) {
        self.send_content(room, &RoomMessageEventContent::text_plain(body)).await;
    }

    pub async fn send_content(&self, room: &RoomId, content: &RoomMessageEventContent) {
        let n = self.txn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let req = send_message_event::v3::Request::new(room.to_owned(), format!("t{n}").into(), content).unwrap();
        self.client.send_request(req).await.unwrap();
    }

    /// Uploads `bytes` as a plain-text file named `name`; returns its media URI.
    pub async fn upload(&self, name: &str, bytes: Vec<u8>) -> OwnedMxcUri {
        let mut upload = create_content::v3::Request::new(bytes);
        upload.filename = Some(name.into());
        upload.content_type = Some("text/plain".into());
        self.send(upload).await.content_uri
    }

    /// Sends the file at `source` into `room` as an `m.file` message named `name`.
    pub async fn send_file(&self, room: &RoomId, name: &str, source: MediaSource) {
        let file = FileMessageEventContent::new(name.into(), source);
        self.send_content(room, &RoomMessageEventContent::new(MessageType::File(file))).await;
    }

    /// The room's timeline, oldest first, as JSON.
    pub async fn timeline(&self, room: &RoomId) -> Vec<Value> {
        let mut req = get_message_events::v3::Request::new(room.to_owned(), Direction::Backward);
        req.limit = 200u32.into();
        let resp = self.client.send_request(req).await.unwrap();
        let mut events: Vec<Value> =
            resp.chunk.iter().map(|e: &Raw<AnyTimelineEvent>| e.deserialize_as().unwrap()).collect();
        events.reverse();
        events
    }

    /// The room's whole timeline, oldest first, paging back to its `m.room.create`: for rooms
    /// with more events than one [`User::timeline`] page holds.
    pub async fn whole_timeline(&self, room: &RoomId) -> Vec<Value> {
        let mut events: Vec<Value> = Vec::new();
        let mut from = None;
        loop {
            let mut req = get_message_events::v3::Request::new(room.to_owned(), Direction::Backward);
            req.from = from.take();
            req.limit = 200u32.into();
            let resp = self.client.send_request(req).await.unwrap();
            events.extend(resp.chunk.iter().map(|e: &Raw<AnyTimelineEvent>| e.deserialize_as::<Value>().unwrap()));
            // Nothing precedes the create event: stop there rather than ask for an empty page.
            let at_start = events.last().is_some_and(|e| e["type"] == "m.room.create");
            match resp.end {
                Some(end) if !resp.chunk.is_empty() && !at_start => from = Some(end),
                _ => break,
            }
        }
        events.reverse();
        assert_eq!(events.first().map(|e| &e["type"]), Some(&Value::from("m.room.create")), "{room}: not all of it");
        events
    }

    /// The `m.room.message` events `sender` sent into `room`, oldest first, without edits (an edit
    /// changes a message, as a client shows it; it is not a new one).
    pub async fn messages_from(&self, room: &RoomId, sender: &UserId) -> Vec<Value> {
        self.timeline(room)
            .await
            .into_iter()
            .filter(|e| e["type"] == "m.room.message" && e["sender"] == sender.as_str())
            .filter(|e| e["content"]["m.relates_to"]["rel_type"] != "m.replace")
            .collect()
    }

    /// Waits until `sender` has sent at least `count` messages into `room`; returns them all.
    pub async fn wait_for_messages(&self, room: &RoomId, sender: &UserId, count: usize) -> Vec<Value> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let msgs = self.messages_from(room, sender).await;
            if msgs.len() >= count {
                return msgs;
            }
            assert!(
                Instant::now() < deadline,
                "waited {PATIENCE:?} for {count} messages from {sender} in {room}, got {}: {msgs:#?}",
                msgs.len()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The rooms this user is invited to and has not answered.
    pub async fn invites(&self) -> Vec<OwnedRoomId> {
        use ruma::api::client::filter::FilterDefinition;
        use ruma::api::client::sync::sync_events::v3::Filter;
        let mut req = ruma::api::client::sync::sync_events::v3::Request::new();
        req.timeout = Some(Duration::ZERO);
        // Synapse answers a repeated identical sync from a cache for minutes: vary the filter.
        let n = self.txn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut filter = FilterDefinition::default();
        filter.room.timeline.limit = Some((n % 1000 + 1).try_into().unwrap());
        req.filter = Some(Filter::FilterDefinition(filter));
        let resp = self.client.send_request(req).await.unwrap();
        resp.rooms.invite.into_keys().collect()
    }

    /// Fetches the file of the `m.file` event `event` with this user's token, as a client would. It
    /// must be an encrypted attachment: the media repository holds ciphertext and the event the key.
    pub async fn attachment(&self, event: &Value) -> Attachment {
        let content = &event["content"];
        assert_eq!(content["msgtype"], "m.file", "{event}");
        assert!(content["url"].is_null(), "a plaintext `url` next to the attachment: {event}");
        let parsed: FileMessageEventContent = serde_json::from_value(content.clone()).unwrap();
        let MediaSource::Encrypted(file) = &parsed.source else { panic!("not an encrypted attachment: {event}") };
        let raw = self.send(get_content::v1::Request::from_uri(&file.url).unwrap()).await.file;
        let plain = handoff::attachment::decrypt(&raw, file).expect("the event's key opens the file");
        assert_eq!(content["info"]["size"], plain.len(), "the declared size is the plaintext's");
        Attachment { raw, plain }
    }

    /// The content of `user`'s membership event in `room`.
    pub async fn membership_of(&self, room: &RoomId, user: &UserId) -> Value {
        let req =
            get_state_event_for_key::v3::Request::new(room.to_owned(), StateEventType::RoomMember, user.to_string());
        let resp = self.client.send_request(req).await.unwrap();
        serde_json::from_str(resp.event_or_content.get()).unwrap()
    }
}

/// A file the bot sent, as stored in the media repository and as opened with the event's key.
pub struct Attachment {
    pub raw: Vec<u8>,
    pub plain: Vec<u8>,
}

impl Attachment {
    /// Whether `needle` can be read in the media repository's copy.
    pub fn readable_at_rest(&self, needle: &str) -> bool {
        self.raw.windows(needle.len()).any(|w| w == needle.as_bytes())
    }
}

/// Waits until `f` returns `Some`, polling; panics with `what` after [`PATIENCE`].
pub async fn eventually<T, F, Fut>(what: &str, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_within(what, PATIENCE, f).await
}

/// [`eventually`] with its own patience, for what takes longer than one step (a whole transfer).
pub async fn eventually_within<T, F, Fut>(what: &str, patience: Duration, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_every(what, patience, POLL, f).await
}

/// [`eventually_within`], looking every `poll`.
pub async fn eventually_every<T, F, Fut>(what: &str, patience: Duration, poll: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + patience;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {patience:?} waiting for {what}");
        tokio::time::sleep(poll).await;
    }
}

/// The text of a message event.
pub fn body(event: &Value) -> &str {
    event["content"]["body"].as_str().unwrap_or("")
}

/// The transfer code on a line of its own in the bot's `export` answer (`XXXX-XXXX-…`, 7 groups).
pub fn code_in(text: &str) -> Option<String> {
    text.lines()
        .map(str::trim)
        .find(|l| {
            l.len() == 34
                && l.split('-').all(|g| g.len() == 4)
                && l.chars().all(|c| c == '-' || c.is_ascii_uppercase() || ('2'..='7').contains(&c))
        })
        .map(str::to_owned)
}

impl Harness {
    /// Opens a DM with the bot as `user` and waits for the greeting.
    pub async fn dm_with_bot(&self, user: &User) -> OwnedRoomId {
        let dm = user.create_dm(&self.bot).await;
        user.wait_for_messages(&dm, &self.bot, 1).await;
        dm
    }

    /// Sends `command` and waits for a new bot message containing `expect`; returns its text.
    pub async fn ask(&self, user: &User, dm: &RoomId, command: &str, expect: &str) -> String {
        self.ask_timed(user, dm, command, expect).await.1
    }

    /// [`Harness::ask`], also returning the time from sending `command` to seeing the answer.
    pub async fn ask_timed(&self, user: &User, dm: &RoomId, command: &str, expect: &str) -> (Duration, String) {
        let before = user.messages_from(dm, &self.bot).await.len();
        let sent = Instant::now();
        user.send_text(dm, command).await;
        let what = format!("a reply to `{command}` containing {expect:?}");
        let reply = self.bot_says(user, dm, before, &what, |b| b.contains(expect)).await;
        (sent.elapsed(), reply)
    }

    /// Waits up to `patience` for a bot message in `dm` that contains `needle`; returns its text.
    pub async fn bot_says_within(&self, user: &User, dm: &RoomId, needle: &str, patience: Duration) -> String {
        eventually_within(&format!("a bot message containing {needle:?}"), patience, || async {
            let msgs = user.messages_from(dm, &self.bot).await;
            msgs.iter().map(|m| body(m).to_owned()).find(|b| b.contains(needle))
        })
        .await
    }

    /// Waits for a bot message in `dm`, after the first `skip`, whose text satisfies `matches`.
    pub async fn bot_says(
        &self,
        user: &User,
        dm: &RoomId,
        skip: usize,
        what: &str,
        matches: impl Fn(&str) -> bool,
    ) -> String {
        eventually_every(what, self.patience, self.poll, || async {
            let msgs = user.messages_from(dm, &self.bot).await;
            msgs.iter().skip(skip).map(|m| body(m).to_owned()).find(|b| matches(b))
        })
        .await
    }
}

/// An old account and what it holds (the benchmarks' accounts to move).
pub struct OldAccount {
    pub user: User,
    /// All its rooms but the bot's DM: group rooms, then the DMs with peers.
    pub rooms: Vec<OwnedRoomId>,
    /// Its favourites, among the group rooms.
    pub favourites: Vec<OwnedRoomId>,
    /// Its DM with the bot.
    pub dm: OwnedRoomId,
}

impl Harness {
    /// A fresh old account `name` with `n` rooms: `dms` DMs with peers (marked in `m.direct`), the
    /// rest group rooms, `favourites` of them favourites spread over their creation order; and a
    /// DM with the bot. A fresh one for every run, so every run sees rooms of the same shape.
    pub async fn old_account(&self, name: &str, n: usize, favourites: usize, dms: usize) -> OldAccount {
        assert!(n >= favourites + dms, "at least {} rooms", favourites + dms);
        let user = self.user(name).await;
        let groups = n - dms;
        let mut rooms = user.create_rooms(groups).await;
        let favs: Vec<OwnedRoomId> = (0..favourites).map(|i| rooms[i * groups / favourites].clone()).collect();
        for (i, room) in favs.iter().enumerate() {
            user.tag(room, "m.favourite", Some((i as f64 + 0.5) / favourites as f64)).await;
        }
        let mut peers = Vec::new();
        for i in 0..dms {
            peers.push(self.user(&format!("{name}-peer{i}")).await);
        }
        rooms.extend(user.dms_with(&peers.iter().collect::<Vec<_>>()).await);
        let dm = self.dm_with_bot(&user).await;
        OldAccount { user, rooms, favourites: favs, dm }
    }
}

/// Sends `export ARGS` as `old` in its DM with the bot; returns the transfer code of the answer.
pub async fn export(h: &Harness, old: &User, dm: &RoomId, args: &str) -> String {
    let answer = h.ask(old, dm, &format!("export {args}"), "Your transfer code").await;
    code_in(&answer).unwrap_or_else(|| panic!("no code in {answer}"))
}

/// `export --file ARGS` as `user`: returns the transfer code and the bundle file, downloaded as the
/// user and decrypted with the key in its event. The media repository holds neither an age file
/// nor a bundle, and the code alone does not open what it holds.
pub async fn export_file(h: &Harness, user: &User, dm: &RoomId, args: &str) -> (String, Vec<u8>) {
    let before = user.messages_from(dm, &h.bot).await.len();
    let code = export(h, user, dm, &format!("--file {args}")).await;
    let file = eventually("the bundle file", || async {
        user.messages_from(dm, &h.bot).await.into_iter().skip(before).find(|m| m["content"]["msgtype"] == "m.file")
    })
    .await;
    let attachment = user.attachment(&file).await;
    assert!(attachment.plain.starts_with(b"age-encryption.org/v1\n"), "the bundle file is an age file");
    assert!(!attachment.readable_at_rest("age-encryption.org"), "an age file in the media repository");
    assert!(handoff::bundle::file::open(&attachment.raw, &code, &handoff::bundle::file::Policy::DEVICE).is_err());
    (code, attachment.plain)
}

/// Opens a bundle file with its transfer code.
pub fn open_bundle(bytes: &[u8], code: &str) -> handoff::bundle::Bundle {
    handoff::bundle::file::open(bytes, code, &handoff::bundle::file::Policy::DEVICE)
        .expect("the file opens with the code")
        .bundle
}

/// Waits for the bot to invite `user` into a DM of its own making; joins it and returns it.
pub async fn dm_from_bot(user: &User) -> OwnedRoomId {
    let room = eventually("the bot's DM invite", || async { user.invites().await.into_iter().next() }).await;
    user.join(&room).await;
    room
}

/// The move notices (`org.handoff.move`) among `events`, in order.
pub fn move_notices(events: &[Value]) -> Vec<&Value> {
    events.iter().filter(|e| !e["content"]["org.handoff.move"].is_null()).collect()
}

/// The membership of each of `user`'s `m.room.member` events among `events`, in order ("invite",
/// "join", …; a profile change is a second "join").
pub fn memberships(events: &[Value], user: &UserId) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["type"] == "m.room.member" && e["state_key"] == user.as_str())
        .map(|e| e["content"]["membership"].as_str().unwrap_or("").to_owned())
        .collect()
}

/// The homeserver's timestamp (unix ms) of `user`'s first join among `events`.
pub fn join_stamp(events: &[Value], user: &UserId) -> Option<u64> {
    let join = events.iter().find(|e| {
        e["type"] == "m.room.member" && e["state_key"] == user.as_str() && e["content"]["membership"] == "join"
    });
    join.and_then(|e| e["origin_server_ts"].as_u64())
}

/// An `m.room.message` text event from `sender` in `room`, as the homeserver pushes it.
pub fn text_event(room: &RoomId, sender: &UserId, event_id: &str, text: &str) -> Value {
    let ts = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    json!({
        "type": "m.room.message", "event_id": event_id, "room_id": room, "sender": sender,
        "origin_server_ts": ts, "content": { "msgtype": "m.text", "body": text },
    })
}

/// JSON as a `Raw` of any event or request body type.
pub fn raw<T>(v: Value) -> Raw<T> {
    Raw::from_json(serde_json::value::to_raw_value(&v).unwrap())
}

/// `config` with every `from` replaced by `to`; panics naming `from` when there is none, so an
/// edit can't silently stop applying when the example config changes.
pub fn edit(config: String, from: &str, to: &str) -> String {
    assert!(config.contains(from), "nothing to replace: {from:?} is not in the config");
    config.replace(from, to)
}

/// `config` with `handoff.concurrency` (the example's default) set to `n`.
pub fn with_concurrency(config: String, n: usize) -> String {
    let default = handoff::config::HandoffConfig::default().concurrency.0;
    edit(config, &format!("concurrency: {default}"), &format!("concurrency: {n}"))
}

/// `config` with the metrics listener on, at `127.0.0.1:port`.
pub fn with_metrics(config: String, port: u16) -> String {
    let enabled = edit(config, "    enabled: false\n", "    enabled: true\n");
    edit(enabled, "listen: 127.0.0.1:8001", &format!("listen: 127.0.0.1:{port}"))
}

/// A counter or gauge in handoff's `/metrics` text: the sum of the series of `name` whose line
/// contains `labels` (`""` for all), `None` if it has none.
pub fn metric(text: &str, name: &str, labels: &str) -> Option<u64> {
    let values: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum::<f64>() as u64)
}

/// `config` with `user` (a full user ID) refused in `handoff.permissions`.
pub fn refusing(config: String, user: &str) -> String {
    let domain = "        \"localhost\": user\n";
    edit(config, domain, &format!("{domain}        \"{user}\": none\n"))
}

/// Runs the device side, `handoff ARGS`, with `data` as its data directory and `stdin` as its
/// input; returns how it exited and what it printed on stdout and stderr. It is under test: a user
/// of [`Harness::user`] it acts as is put under the default rate limits first
/// ([`User::under_defaults`]).
pub fn device_cli(data: &Path, args: &[&str], stdin: &str) -> (ExitStatus, String, String) {
    use std::io::Write;
    let mut child = Command::new(HANDOFF)
        .args(args)
        .env("HANDOFF_DATA_DIR", data)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status, String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Runs the handoff binary with `args`; returns its exit status and stderr.
pub fn run_handoff(args: &[&str], cwd: &Path) -> (ExitStatus, String) {
    let out = Command::new(HANDOFF).args(args).current_dir(cwd).output().unwrap();
    (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// utime + stime of a process, from /proc (`None` once it is gone).
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10)) // CLK_TCK is 100 on Linux
}

/// Peak resident memory of a process (VmHWM), in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()
}
