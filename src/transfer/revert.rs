//! The writes of an undo, through one account's client: what the new account holds in a room of
//! the move now, leaving it, and putting its settings back. The service's engine journals each
//! ([`super::engine`]); the device side's `handoff undo` records each in the account's folder.

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
use ruma::{Int, OwnedEventId, OwnedRoomId, RoomId, UInt, UserId};
use serde_json::{Value as JsonValue, json};

use super::account::AccountWork;
use super::room::MOVE_FIELD;
use super::undo::{Revert, RoomNow, RoomUndo, SettingsUndo};
use super::{Error, SettingsUndone, UndoRoom};
use crate::homeserver::{Homeserver, HsError};

/// The pages of the new account's own messages read back per room to find the move's notices
/// and whether it wrote since (50 events each): enough for days of use, bounded for a room the
/// account is very active in (it then wrote since anyway).
const PAGES: usize = 4;

/// One undo's writes: as the new account `new`, through `hs`, of move `move_id` from `old`.
pub struct Reverter<'a> {
    pub hs: &'a Homeserver,
    pub new: &'a UserId,
    pub old: &'a UserId,
    pub move_id: u64,
    /// When the move began: what the new account sent before is not the move's.
    pub since_ms: u64,
    /// Who else may lower the rank the move gave where the new account can't (the old account,
    /// whose rank gave it), through which client.
    pub old_rank: Option<(&'a Homeserver, &'a UserId)>,
}

impl Reverter<'_> {
    /// The new account in `room` as it is now: its membership, rank and tags, the move's notices it
    /// posted there, and whether it wrote anything else since the move began.
    /// `sent`: the move's notices there that can't be told by their content (sent encrypted by
    /// the device side, which recorded their IDs).
    pub async fn room_now(&self, room: &OwnedRoomId, sent: &[OwnedEventId]) -> Result<RoomNow, HsError> {
        let (hs, new) = (self.hs, self.new);
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
        now.tags =
            hs.send_as(new, get_tags::v3::Request::new(new.to_owned(), room.clone())).await?.tags.into_keys().collect();
        let mut filter = RoomEventFilter::default();
        filter.senders = Some(vec![new.to_owned()]);
        let mut from = None;
        'pages: for _ in 0..PAGES {
            let mut req = get_message_events::v3::Request::new(room.clone(), Direction::Backward);
            req.filter = filter.clone();
            req.limit = UInt::from(50u32);
            req.from = from.take();
            let resp = hs.send_as(new, req).await?;
            for raw in &resp.chunk {
                let Ok(event) = raw.deserialize_as::<JsonValue>() else { continue };
                if event["origin_server_ts"].as_u64().unwrap_or(0) < self.since_ms {
                    break 'pages;
                }
                if event["sender"] != new.as_str() || !event["unsigned"]["redacted_because"].is_null() {
                    continue;
                }
                match event["type"].as_str() {
                    // Its joins, the move's mark, profile changes, and what an undo stopped midway
                    // wrote (redactions, its own rank lowered) are not the person writing.
                    Some("m.room.member" | "m.room.redaction" | "m.room.power_levels") => {}
                    Some("m.room.message") if event["content"][MOVE_FIELD]["transfer"] == self.move_id => {
                        if let Ok(id) = serde_json::from_value(event["event_id"].clone()) {
                            now.notices.push(id);
                        }
                    }
                    _ if sent.iter().any(|id| event["event_id"] == id.as_str()) => {
                        now.notices.extend(serde_json::from_value(event["event_id"].clone()).ok());
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

    /// Does what `what` says in `room`: [`Self::leave`] it, or nothing where the room is kept.
    pub async fn carry_out(&self, room: &RoomId, what: &RoomUndo) -> Result<UndoRoom, HsError> {
        match what {
            RoomUndo::Leave { lower_rank, untag, redact } => self.leave(room, *lower_rank, untag, redact).await,
            RoomUndo::Kept(why) => Ok(UndoRoom::Kept(why.clone())),
        }
    }

    /// Leaves `room` as the new account: its tags off, its notices redacted, its rank lowered.
    async fn leave(
        &self,
        room: &RoomId,
        lower_rank: bool,
        untag: &[ruma::events::tag::TagName],
        redact: &[ruma::OwnedEventId],
    ) -> Result<UndoRoom, HsError> {
        let (hs, new) = (self.hs, self.new);
        for tag in untag {
            match hs.send_as(new, delete_tag::v3::Request::new(new.to_owned(), room.to_owned(), tag.to_string())).await
            {
                Err(e) if !matches!(e.kind(), Some(ErrorKind::NotFound)) => return Err(e),
                _ => {}
            }
        }
        for event in redact {
            let txn = format!("handoff-undo-{}-{}", self.move_id, event.as_str().trim_start_matches('$'));
            let mut req = redact_event::v3::Request::new(room.to_owned(), event.clone(), txn.into());
            req.reason = Some(format!("{new} undid the move from {}", self.old));
            hs.send_as(new, req).await?;
        }
        let mut rank_kept = None;
        if lower_rank {
            // The account lowers its own rank; where the room needs more to change the power
            // levels, the old account (local) takes back the rank it gave.
            let mut tried = drop_rank(hs, new, room, new).await;
            if let (Err(_), Some((hs, old))) = (&tried, self.old_rank) {
                tried = drop_rank(hs, old, room, new).await;
            }
            if let Err(e) = tried {
                if e.is_transient() {
                    return Err(e);
                }
                rank_kept = Some(e.to_string());
            }
        }
        let mut req = leave_room::v3::Request::new(room.to_owned());
        req.reason = Some(format!("undid the move from {}", self.old));
        hs.send_as(new, req).await?;
        Ok(UndoRoom::Left { rank_kept, redacted: redact.len() })
    }

    /// Puts back each setting that still holds what the move wrote.
    pub async fn put_back(&self, s: &SettingsUndo) -> SettingsUndone {
        let (hs, new) = (self.hs, self.new);
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
                AccountWork { acting: hs.clone() }
                    .set_global_data(new, &kind, &value.unwrap_or_else(|| json!({})))
                    .await
                    .map_err(hs_error)
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
                    let req = set_profile_field::v3::Request::new(new.to_owned(), value);
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
