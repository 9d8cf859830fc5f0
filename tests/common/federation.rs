//! Two harnesses whose homeservers federate (`handoff::sandbox::Federation`): a Synapse and a
//! `handoff serve` on each side, A and B, for moves to an account on another homeserver.

use std::path::PathBuf;
use std::time::Duration;

use handoff::sandbox::{Federation, FederationNames, Side};
use ruma::api::Direction;
use ruma::api::client::membership::join_room_by_id_or_alias;
use ruma::api::client::message::get_message_events;
use ruma::events::AnyTimelineEvent;
use ruma::events::room::MediaSource;
use ruma::serde::Raw;
use ruma::{OwnedServerName, RoomId, ServerName, UserId};
use serde_json::Value;

use super::{Harness, User, edit};

/// Both sides, each with its handoff serving; dropping it stops the handoffs, then the Synapses,
/// then removes the folder.
pub struct FederatedHarness {
    pub a: Harness,
    pub b: Harness,
    pub ca: PathBuf,
    _tmp: tempfile::TempDir,
}

impl FederatedHarness {
    pub async fn start() -> FederatedHarness {
        Self::start_with(|_, _, c| c, "").await
    }

    /// `change` may change each side's config text (it is told the side and both server names),
    /// `homeserver_extra` (YAML) is appended to both Synapse configs.
    pub async fn start_with(
        change: impl Fn(Side, &FederationNames, String) -> String,
        homeserver_extra: &str,
    ) -> FederatedHarness {
        Self::start_with_homeservers(change, |_| homeserver_extra.to_owned()).await
    }

    /// Like [`FederatedHarness::start_with`], with `homeserver_extra(side)` (YAML) appended to
    /// each side's Synapse config: one side may lift a rate limit the other keeps.
    pub async fn start_with_homeservers(
        change: impl Fn(Side, &FederationNames, String) -> String,
        homeserver_extra: impl Fn(Side) -> String,
    ) -> FederatedHarness {
        let tmp = tempfile::tempdir().unwrap();
        let debug = |side, names: &FederationNames, c| {
            change(side, names, edit(c, "level: info", "level: \"info,handoff=debug\""))
        };
        let federation =
            Federation::create_with(tmp.path(), debug, homeserver_extra).await.expect("both homeservers start");
        let Federation { a, b, ca } = federation;
        let (a, b) = tokio::join!(Harness::serving(a, None), Harness::serving(b, None));
        FederatedHarness { a, b, ca, _tmp: tmp }
    }

    pub fn side(&self, side: Side) -> &Harness {
        match side {
            Side::A => &self.a,
            Side::B => &self.b,
        }
    }

    pub fn side_mut(&mut self, side: Side) -> &mut Harness {
        match side {
            Side::A => &mut self.a,
            Side::B => &mut self.b,
        }
    }

    pub fn server_name(&self, side: Side) -> OwnedServerName {
        self.side(side).synapse().server_name.clone()
    }
}

impl User {
    /// Joins `room` through `via` (a room ID of room version 12 names no server: a remote join
    /// needs one that is in the room).
    pub async fn join_via(&self, room: &RoomId, via: &[&ServerName]) {
        let mut req = join_room_by_id_or_alias::v3::Request::new(room.to_owned().into());
        req.via = via.iter().map(|s| (*s).to_owned()).collect();
        self.send(req).await;
    }

    /// The `m.room.message` bodies `sender` sent into `room`, oldest first; `None` when the
    /// homeserver does not answer (it may be down, or just back with its connections gone).
    pub async fn try_bodies_from(&self, room: &RoomId, sender: &UserId) -> Option<Vec<String>> {
        let mut req = get_message_events::v3::Request::new(room.to_owned(), Direction::Backward);
        req.limit = 200u32.into();
        let resp = self.try_send(req).await.ok()?;
        let mut bodies: Vec<String> = resp
            .chunk
            .iter()
            .filter_map(|e: &Raw<AnyTimelineEvent>| e.deserialize_as::<Value>().ok())
            .filter(|e| e["type"] == "m.room.message" && e["sender"] == sender.as_str())
            .map(|e| super::body(&e).to_owned())
            .collect();
        bodies.reverse();
        Some(bodies)
    }
}

/// The status of `GET {handoff_url}/health`.
pub async fn health(h: &Harness) -> u16 {
    let resp = reqwest::Client::new()
        .get(format!("{}/health", h.handoff_url))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("handoff answers /health");
    resp.status().as_u16()
}

/// Drops `file` into `dm` as `user` (as a client sends a file) and waits for the bot's receipt.
pub async fn drop_file(h: &Harness, user: &User, dm: &RoomId, file: &[u8]) {
    let before = user.messages_from(dm, &h.bot).await.len();
    let mxc = user.upload("handoff-alice.age", file.to_vec()).await;
    user.send_file(dm, "handoff-alice.age", MediaSource::Plain(mxc)).await;
    h.bot_says(user, dm, before, "the file's receipt", |b| b.contains("This is a handoff bundle file")).await;
}
