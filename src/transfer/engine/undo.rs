//! Taking a move back (`undo`): reads what the new account holds now, decides with
//! [`crate::transfer::undo`] what goes back, and does it room by room, each step journaled on the
//! move's record before and after it runs (a restarted service resumes it: nothing is left or
//! redacted twice), then the settings in one step. The bot words the report.

use std::sync::Arc;

use futures_util::stream::{self, StreamExt};
use ruma::api::Direction;
use ruma::api::client::filter::RoomEventFilter;
use ruma::api::client::membership::leave_room;
use ruma::api::client::message::get_message_events;
use ruma::api::client::profile::{delete_profile_field, set_profile_field};
use ruma::api::client::push::{delete_pushrule, set_pushrule_enabled};
use ruma::api::client::redact::redact_event;
use ruma::api::client::state::{get_state_event_for_key, send_state_event};
use ruma::api::client::tag::{delete_tag, get_tags};
use ruma::api::error::ErrorKind;
use ruma::events::StateEventType;
use ruma::events::room::member::MembershipState;
use ruma::events::room::power_levels::RoomPowerLevelsEventContent;
use ruma::profile::{ProfileFieldName, ProfileFieldValue};
use ruma::{Int, OwnedRoomId, RoomId, UInt, UserId};
use serde_json::{Value as JsonValue, json};

use super::Engine;
use crate::budget::Class;
use crate::bundle::Bundle;
use crate::homeserver::{Homeserver, HsError};
use crate::store::now_ms;
use crate::transfer::account::SETTINGS;
use crate::transfer::room::MOVE_FIELD;
use crate::transfer::undo::{self, Kept, Revert, RoomNow, RoomUndo, SettingsUndo, UndoPlan};
use crate::transfer::{Error, SettingsUndone, Transfer, TransferKind, UndoRoom, Undoing, world};

/// The pages of the new account's own messages read back per room to find the move's notices
/// and whether it wrote since (50 events each): enough for days of use, bounded for a room the
/// account is very active in (it then wrote since anyway).
const PAGES: usize = 4;

impl Engine {
    /// What an undo of `t` would do now (`undo --dry-run`, and what `undo` then does): every
    /// room of the move as the new account has it, and its settings, unless the bundle is gone.
    pub async fn undo_plan(&self, t: &Transfer, all: bool) -> Result<UndoPlan, Error> {
        let bundle = self.undo_bundle(t).await?;
        let steps = self.journal.room_steps(t.id).await?;
        let rooms = t.plan.as_ref().map(|p| p.rooms.as_slice()).unwrap_or_default();
        let (bundle_ref, steps_ref) = (&bundle, &steps);
        // Indices, not references, keep the futures `Send` (as in `rooms`).
        let seated: Vec<usize> =
            (0..rooms.len()).filter(|&i| steps_ref.get(&rooms[i].room_id).is_some_and(|s| s.is_seated())).collect();
        let reads = stream::iter(seated)
            .map(|i| async move {
                let room = &rooms[i];
                let _slot = self.budget.acquire(t.id, Class::Normal).await;
                let now = room_now(&self.acting, t, &room.room_id).await?;
                let entry = bundle_ref.as_ref().and_then(|b| b.rooms.iter().find(|e| e.room_id == room.room_id));
                let what = undo::room(room, steps_ref.get(&room.room_id), entry, &now, all);
                Ok::<_, HsError>((room.room_id.clone(), room.name.clone(), what))
            })
            .buffered(self.budget.size());
        let mut rooms = Vec::new();
        for read in reads.collect::<Vec<_>>().await {
            rooms.push(read?);
        }
        let settings = match (&bundle, &t.before) {
            (Some(bundle), Some(before)) => {
                let now = world::read_account(&self.acting, &t.new, bundle, &SETTINGS).await?;
                Some(undo::settings(t, before, bundle, &undo::moved(&steps), &now))
            }
            _ => None,
        };
        Ok(UndoPlan { rooms, settings })
    }

    /// The move's bundle, if it is still kept (a later export may have trimmed it): the settings
    /// the move wrote are computed again from it.
    async fn undo_bundle(&self, t: &Transfer) -> Result<Option<Bundle>, Error> {
        Ok(self.store.get_bundle(&t.bundle).await?.map(|stored| stored.bundle))
    }

    /// Starts (or resumes) the undo journaled on transfer `id`, in the background.
    pub fn spawn_undo(self: &Arc<Self>, id: u64) {
        let engine = Arc::clone(self);
        self.shutdown.spawn(async move {
            if let Err(e) = engine.run_undo(id).await {
                tracing::error!(transfer = id, error = %e, "undo stopped with an error; it resumes at the next start");
            }
        });
    }

    async fn run_undo(&self, id: u64) -> Result<(), Error> {
        let Some(mut t) = self.journal.get(id).await? else { return Err(Error::Missing(id)) };
        let Some(undoing) = t.undo.clone() else { return Ok(()) };
        if undoing.finished {
            return Ok(());
        }
        let _present = self.budget.enter(id);
        if undoing.status_event.is_none() {
            let status = self.reporter.undoing(&t).await?;
            t = self
                .journal
                .update(id, |t| set_undo(t, |u| u.status_event = Some(status)))
                .await?
                .ok_or(Error::Missing(id))?;
        }
        let plan = self.undo_plan(&t, undoing.all).await?;
        let (t, undoing) = (&t, &undoing);
        let rooms = &plan.rooms;
        let entries: Vec<usize> =
            (0..rooms.len()).filter(|&i| !undoing.rooms.get(&rooms[i].0).is_some_and(UndoRoom::is_final)).collect();
        let results = stream::iter(entries)
            .map(|i| async move {
                let (room, _, what) = &rooms[i];
                let _slot = self.budget.acquire(id, Class::Normal).await;
                let step = match what {
                    // A room this undo had started to leave, and left before it was stopped.
                    RoomUndo::Kept(Kept::NotThere) if undoing.rooms.get(room) == Some(&UndoRoom::Started) => {
                        UndoRoom::Left { rank_kept: None, redacted: 0 }
                    }
                    RoomUndo::Kept(why) => UndoRoom::Kept(why.clone()),
                    RoomUndo::Leave { lower_rank, untag, redact } => {
                        self.journal
                            .update(id, |t| {
                                set_undo(t, |u| {
                                    u.rooms.insert(room.clone(), UndoRoom::Started);
                                })
                            })
                            .await?;
                        match self.leave(t, room, *lower_rank, untag, redact).await {
                            Ok(step) => step,
                            Err(e) if e.is_transient() => return Err(Error::Hs(e)),
                            Err(e) => UndoRoom::Failed(e.to_string()),
                        }
                    }
                };
                let t = self
                    .journal
                    .update(id, |t| {
                        set_undo(t, |u| {
                            u.rooms.insert(room.clone(), step);
                        })
                    })
                    .await?;
                if let Some(t) = t {
                    let done = t.undo.as_ref().map_or(0, |u| u.rooms.values().filter(|s| s.is_final()).count());
                    if let Err(e) = self.reporter.undo_progress(&t, done, rooms.len()).await {
                        tracing::debug!(transfer = id, error = %e, "cannot show the undo's progress");
                    }
                }
                Ok::<_, Error>(())
            })
            .buffer_unordered(self.budget.size());
        for result in results.collect::<Vec<_>>().await {
            result?;
        }
        let t = self.journal.get(id).await?.ok_or(Error::Missing(id))?;
        if t.undo.as_ref().is_some_and(|u| u.settings.is_none()) {
            let done = match &plan.settings {
                Some(settings) => self.put_back(&t, settings).await,
                None => SettingsUndone {
                    kept: vec!["every setting: the move's bundle is gone, so what it wrote can't be told apart".into()],
                    ..Default::default()
                },
            };
            self.journal.update(id, |t| set_undo(t, |u| u.settings = Some(done))).await?;
        }
        let t = self.journal.get(id).await?.ok_or(Error::Missing(id))?;
        let mut report = undo::report(&t);
        report.notices_by_old =
            t.kind == TransferKind::Move && self.config.handoff.notify.sender == crate::config::NotifySender::Old;
        self.reporter.undone(&t, &report).await?;
        self.journal.update(id, |t| set_undo(t, |u| u.finished = true)).await?;
        tracing::info!(transfer = id, left = report.left.len(), kept = report.kept.len(), "move undone");
        Ok(())
    }

    /// Leaves `room` as the new account: its tags off, its notices redacted, its rank lowered.
    async fn leave(
        &self,
        t: &Transfer,
        room: &RoomId,
        lower_rank: bool,
        untag: &[ruma::events::tag::TagName],
        redact: &[ruma::OwnedEventId],
    ) -> Result<UndoRoom, HsError> {
        let (hs, new) = (&self.acting, &t.new);
        for tag in untag {
            match hs.send_as(new, delete_tag::v3::Request::new(new.clone(), room.to_owned(), tag.to_string())).await {
                Err(e) if !matches!(e.kind(), Some(ErrorKind::NotFound)) => return Err(e),
                _ => {}
            }
        }
        for event in redact {
            let txn = format!("handoff-undo-{}-{}", t.id, event.as_str().trim_start_matches('$'));
            let mut req = redact_event::v3::Request::new(room.to_owned(), event.clone(), txn.into());
            req.reason = Some(format!("{new} undid the move from {}", t.old));
            hs.send_as(new, req).await?;
        }
        let mut rank_kept = None;
        if lower_rank {
            // The account lowers its own rank; where the room needs more to change the power
            // levels, the old account (local) takes back the rank it gave.
            let mut tried = drop_rank(hs, new, room, new).await;
            if tried.is_err() && t.kind == TransferKind::Move {
                tried = drop_rank(hs, &t.old, room, new).await;
            }
            if let Err(e) = tried {
                if e.is_transient() {
                    return Err(e);
                }
                rank_kept = Some(e.to_string());
            }
        }
        let mut req = leave_room::v3::Request::new(room.to_owned());
        req.reason = Some(format!("undid the move from {}", t.old));
        hs.send_as(new, req).await?;
        Ok(UndoRoom::Left { rank_kept, redacted: redact.len() })
    }

    /// Puts back each setting that still holds what the move wrote.
    async fn put_back(&self, t: &Transfer, s: &SettingsUndo) -> SettingsUndone {
        let (hs, new) = (&self.acting, &t.new);
        let mut done = SettingsUndone::default();
        let mut note = |name: String, outcome: Option<Result<(), HsError>>| match outcome {
            None => done.kept.push(name),
            Some(Ok(())) => done.restored.push(name),
            Some(Err(e)) => done.failed.push(format!("{name} ({e})")),
        };
        // Account data can't be deleted: an empty object is what an absent one reads as.
        let data = |kind: &str, value: Option<JsonValue>| {
            let kind = kind.to_owned();
            async move {
                self.account.set_global_data(new, &kind, &value.unwrap_or_else(|| json!({}))).await.map_err(hs_error)
            }
        };
        if let Some(r) = &s.direct {
            note("your DM list (m.direct)".into(), restore(r, |v| data("m.direct", v.map(to_json))).await);
        }
        if let Some(r) = &s.ignored_users {
            let absent = || json!({"ignored_users": {}});
            note(
                "ignored users".into(),
                restore(r, |v| data("m.ignored_user_list", Some(v.map(to_json).unwrap_or_else(absent)))).await,
            );
        }
        for (kind, r) in &s.client_settings {
            note(format!("client setting {kind}"), restore(r, |v| data(kind, v.cloned())).await);
        }
        for (kind, id) in &s.push_rules.remove {
            let req = delete_pushrule::v3::Request::new(kind.clone(), id.clone());
            note(format!("push rule {id}"), Some(hs.send_as(new, req).await.map(drop)));
        }
        for (kind, id, enabled) in &s.push_rules.switch_back {
            let req = set_pushrule_enabled::v3::Request::new(kind.clone(), id.clone(), *enabled);
            note(format!("push rule {id} switched back"), Some(hs.send_as(new, req).await.map(drop)));
        }
        for id in &s.push_rules.changed {
            note(format!("push rule {id}"), None);
        }
        // The profile's two fields alike: set back, or taken off where the account had none.
        let profile = [
            (
                s.display_name.as_ref().map(|r| map(r, |n| ProfileFieldValue::DisplayName(n.clone()))),
                ProfileFieldName::DisplayName,
                ProfileFieldValue::DisplayName(String::new()),
                "display name",
            ),
            (
                s.avatar_url.as_ref().map(|r| map(r, |u| ProfileFieldValue::AvatarUrl(u.clone()))),
                ProfileFieldName::AvatarUrl,
                ProfileFieldValue::AvatarUrl("".into()),
                "avatar",
            ),
        ];
        for (revert, field, empty, label) in profile {
            let outcome = match revert {
                None => continue,
                Some(Revert::Changed) => None,
                Some(Revert::Restore(Some(value))) => {
                    let req = set_profile_field::v3::Request::new(new.clone(), value);
                    Some(hs.send_as(new, req).await.map(drop))
                }
                Some(Revert::Restore(None)) => Some(clear_profile_field(hs, new, field, empty).await),
            };
            note(label.into(), outcome);
        }
        done
    }
}

/// Runs `write` with the value to put back, or nothing where the setting changed since (`None`).
async fn restore<'a, T, F, Fut>(r: &'a Revert<T>, write: F) -> Option<Result<(), HsError>>
where
    F: FnOnce(Option<&'a T>) -> Fut,
    Fut: Future<Output = Result<(), HsError>>,
{
    match r {
        Revert::Restore(value) => Some(write(value.as_ref()).await),
        Revert::Changed => None,
    }
}

/// The same decision about another form of the value.
fn map<T, U>(r: &Revert<T>, f: impl FnOnce(&T) -> U) -> Revert<U> {
    match r {
        Revert::Restore(value) => Revert::Restore(value.as_ref().map(f)),
        Revert::Changed => Revert::Changed,
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> JsonValue {
    serde_json::to_value(v).unwrap_or_default()
}

fn hs_error(e: Error) -> HsError {
    match e {
        Error::Hs(e) => e,
        other => HsError::Protocol(other.to_string()),
    }
}

/// Takes a profile field off: by deleting it, or (a homeserver without the deletion, such as
/// Synapse for the display name and avatar) by setting it empty, which it reads as none.
async fn clear_profile_field(
    hs: &Homeserver,
    user: &UserId,
    field: ProfileFieldName,
    empty: ProfileFieldValue,
) -> Result<(), HsError> {
    match hs.send_as(user, delete_profile_field::v3::Request::new(user.to_owned(), field)).await {
        Err(e) if matches!(e.kind(), Some(ErrorKind::Unrecognized)) => {
            hs.send_as(user, set_profile_field::v3::Request::new(user.to_owned(), empty)).await.map(drop)
        }
        done => done.map(drop),
    }
}

/// Changes the undo journaled on `t`.
fn set_undo(t: &mut Transfer, change: impl FnOnce(&mut Undoing)) {
    if let Some(undo) = t.undo.as_mut() {
        change(undo);
    }
}

/// A new undo's record, started now.
pub fn begin(all: bool) -> Undoing {
    Undoing { all, started_at_ms: now_ms(), ..Default::default() }
}

/// Takes `user`'s rank in `room` back to the room's default, acting as `by`.
async fn drop_rank(hs: &Homeserver, by: &UserId, room: &RoomId, user: &UserId) -> Result<(), HsError> {
    let req =
        get_state_event_for_key::v3::Request::new(room.to_owned(), StateEventType::RoomPowerLevels, String::new());
    let resp = hs.send_as(by, req).await?;
    let mut content: RoomPowerLevelsEventContent =
        serde_json::from_str(resp.event_or_content.get()).map_err(|e| HsError::Protocol(e.to_string()))?;
    if content.users.remove(user).is_none() {
        return Ok(());
    }
    let req = send_state_event::v3::Request::new(room.to_owned(), &ruma::events::EmptyStateKey, &content)
        .map_err(|e| HsError::Protocol(e.to_string()))?;
    hs.send_as(by, req).await?;
    Ok(())
}

/// The new account in `room` as it is now: its membership, rank and tags, the move's notices it
/// posted there, and whether it wrote anything else since the move began.
async fn room_now(hs: &Homeserver, t: &Transfer, room: &OwnedRoomId) -> Result<RoomNow, HsError> {
    let new = &t.new;
    let mut now = RoomNow::default();
    let state = |kind: StateEventType, key: String| {
        let req = get_state_event_for_key::v3::Request::new(room.clone(), kind, key);
        async move {
            match hs.send_as(new, req).await {
                Ok(resp) => Ok(serde_json::from_str::<JsonValue>(resp.event_or_content.get()).ok()),
                // Not in the room (any more), or no such state: nothing to read.
                Err(e) if matches!(e.kind(), Some(ErrorKind::NotFound | ErrorKind::Forbidden)) => Ok(None),
                Err(e) => Err(e),
            }
        }
    };
    let member = state(StateEventType::RoomMember, new.to_string()).await?;
    now.membership = member.and_then(|m| serde_json::from_value(m["membership"].clone()).ok());
    if now.membership != Some(MembershipState::Join) {
        return Ok(now);
    }
    let levels = state(StateEventType::RoomPowerLevels, String::new()).await?;
    now.level = levels.and_then(|l| l["users"][new.as_str()].as_i64()).and_then(|l| Int::try_from(l).ok());
    now.tags = hs.send_as(new, get_tags::v3::Request::new(new.clone(), room.clone())).await?.tags.into_keys().collect();
    let mut filter = RoomEventFilter::default();
    filter.senders = Some(vec![new.clone()]);
    let mut from = None;
    'pages: for _ in 0..PAGES {
        let mut req = get_message_events::v3::Request::new(room.clone(), Direction::Backward);
        req.filter = filter.clone();
        req.limit = UInt::from(50u32);
        req.from = from.take();
        let resp = hs.send_as(new, req).await?;
        for raw in &resp.chunk {
            let Ok(event) = raw.deserialize_as::<JsonValue>() else { continue };
            if event["origin_server_ts"].as_u64().unwrap_or(0) < t.created_at_ms {
                break 'pages;
            }
            if event["sender"] != new.as_str() || !event["unsigned"]["redacted_because"].is_null() {
                continue;
            }
            match event["type"].as_str() {
                // Its joins, the move's mark, profile changes, and what an undo stopped midway
                // wrote (redactions, its own rank lowered) are not the person writing.
                Some("m.room.member" | "m.room.redaction" | "m.room.power_levels") => {}
                Some("m.room.message") if event["content"][MOVE_FIELD]["transfer"] == t.id => {
                    if let Ok(id) = serde_json::from_value(event["event_id"].clone()) {
                        now.notices.push(id);
                    }
                }
                _ => now.wrote_since = true,
            }
        }
        match resp.end {
            Some(end) if !resp.chunk.is_empty() => from = Some(end),
            _ => break,
        }
    }
    Ok(now)
}
