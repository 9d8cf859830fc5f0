//! Applying the account steps: each reads nothing and decides nothing; the merges were decided
//! by [`merge`](super::merge) from the new account's account data, read right before.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use ruma::api::client::config::set_global_account_data;
use ruma::api::client::profile::set_profile_field;
use ruma::api::client::push::{set_pushrule, set_pushrule_enabled};
use ruma::profile::ProfileFieldValue;
use ruma::serde::Raw;
use ruma::{OwnedRoomId, UserId};
use serde::Serialize;

use super::merge::{self, AccountWorld};
use super::plan::Plan;
use super::progress::{Delivery, Reporter, RoomHistory};
use super::{AccountStep, Error, RoomStep, Transfer};
use crate::bundle::Bundle;
use crate::homeserver::{Homeserver, HsError};

/// What the account steps need: the acting client, and the reporter for files handed over.
pub struct AccountWork {
    pub acting: Homeserver,
    pub reporter: Arc<dyn Reporter>,
}

/// The steps that run after the rooms, in order (the profile runs before them).
pub const AFTER_ROOMS: [AccountStep; 7] = [
    AccountStep::Direct,
    AccountStep::IgnoredUsers,
    AccountStep::PushRules,
    AccountStep::ClientSettings,
    AccountStep::OldMentions,
    AccountStep::RoomKeys,
    AccountStep::History,
];

impl AccountWork {
    /// Runs one step; returns what it did, for the report.
    pub async fn run(
        &self,
        step: AccountStep,
        t: &Transfer,
        bundle: &Bundle,
        plan: &Plan,
        steps: &BTreeMap<OwnedRoomId, RoomStep>,
        world: &AccountWorld,
    ) -> Result<String, Error> {
        let new = &t.new;
        match step {
            AccountStep::Profile => {
                let writes = merge::profile(world, bundle);
                if let Some(name) = writes.display_name {
                    let req = set_profile_field::v3::Request::new(new.clone(), ProfileFieldValue::DisplayName(name));
                    self.acting.send_as(new, req).await?;
                }
                if let Some(avatar) = writes.avatar_url {
                    let req = set_profile_field::v3::Request::new(new.clone(), ProfileFieldValue::AvatarUrl(avatar));
                    self.acting.send_as(new, req).await?;
                }
                Ok(writes.summary)
            }
            AccountStep::Direct => {
                let moved: BTreeSet<OwnedRoomId> = plan
                    .rooms
                    .iter()
                    .filter(|r| matches!(steps.get(&r.room_id), Some(RoomStep::Done | RoomStep::AwaitingAccept)))
                    .map(|r| r.room_id.clone())
                    .collect();
                let merged = merge::direct(world, bundle, &moved);
                if let Some(content) = &merged.write {
                    self.set_global_data(new, "m.direct", content).await?;
                }
                Ok(merged.summary)
            }
            AccountStep::IgnoredUsers => {
                let merged = merge::ignored_users(world, bundle);
                if let Some(content) = &merged.write {
                    self.set_global_data(new, "m.ignored_user_list", content).await?;
                }
                Ok(merged.summary)
            }
            AccountStep::PushRules => {
                let rules = merge::push_rules(world, bundle);
                for (rule, enabled) in rules.add {
                    let (kind, id) = (rule.kind(), rule.rule_id().to_owned());
                    self.acting.send_as(new, set_pushrule::v3::Request::new(rule)).await?;
                    if !enabled {
                        self.acting.send_as(new, set_pushrule_enabled::v3::Request::new(kind, id, false)).await?;
                    }
                }
                for (kind, id, enabled) in rules.switch {
                    self.acting.send_as(new, set_pushrule_enabled::v3::Request::new(kind, id, enabled)).await?;
                }
                Ok(rules.summary)
            }
            AccountStep::ClientSettings => {
                let merged = merge::client_settings(world, bundle);
                for (kind, content) in merged.write.iter().flatten() {
                    self.set_global_data(new, kind, content).await?;
                }
                Ok(merged.summary)
            }
            AccountStep::OldMentions => {
                self.acting.send_as(new, set_pushrule::v3::Request::new(merge::old_mentions(&t.old))).await?;
                Ok(format!("mentions of {} notify you", t.old))
            }
            AccountStep::RoomKeys => {
                let Some(keys) = &bundle.room_keys else {
                    return Ok("no key export in the bundle".into());
                };
                self.reporter.deliver(t, Delivery::RoomKeys { armored: &keys.armored }).await?;
                Ok("key export delivered".into())
            }
            AccountStep::History => self.history(t, bundle, plan).await,
            AccountStep::Remote => Ok(String::new()),
        }
    }

    /// With `import --history N`: the last N captured messages of each moved room.
    async fn history(&self, t: &Transfer, bundle: &Bundle, plan: &Plan) -> Result<String, Error> {
        let n = t.requirements.history;
        if n == 0 {
            return Ok("not asked for (import --history N)".into());
        }
        let rooms: Vec<RoomHistory<'_>> = plan
            .rooms
            .iter()
            .filter_map(|r| bundle.rooms.iter().find(|e| e.room_id == r.room_id))
            .filter_map(|entry| {
                let history = entry.history.as_ref()?;
                let recent = &history.messages[history.messages.len().saturating_sub(n)..];
                (!recent.is_empty() || history.encrypted_count > 0).then(|| RoomHistory {
                    title: entry.name.clone().unwrap_or_else(|| entry.room_id.to_string()),
                    messages: recent,
                    encrypted: history.encrypted_count,
                })
            })
            .collect();
        if rooms.is_empty() {
            return Ok("the bundle carries no history (export --history N)".into());
        }
        let (count, messages) = (rooms.len(), rooms.iter().map(|r| r.messages.len()).sum::<usize>());
        let name = self.reporter.deliver(t, Delivery::History(rooms)).await?;
        Ok(format!("{messages} message(s) from {count} room(s) delivered as {name}"))
    }

    async fn set_global_data(&self, user: &UserId, kind: &str, content: &impl Serialize) -> Result<(), Error> {
        let json = serde_json::value::to_raw_value(content).map_err(|e| HsError::Protocol(e.to_string()))?;
        let req = set_global_account_data::v3::Request::new_raw(user.to_owned(), kind.into(), Raw::from_json(json));
        self.acting.send_as(user, req).await?;
        Ok(())
    }
}
