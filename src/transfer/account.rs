//! Applying the merged settings: each reads nothing and decides nothing; the merges were decided
//! by [`merge`] from the new account's account data, read right before. The service's engine and
//! the device side's import apply them alike.

use std::collections::BTreeSet;

use ruma::api::client::config::set_global_account_data;
use ruma::api::client::profile::set_profile_field;
use ruma::api::client::push::{set_pushrule, set_pushrule_enabled};
use ruma::profile::ProfileFieldValue;
use ruma::serde::Raw;
use ruma::{OwnedRoomId, UserId};
use serde::Serialize;

use super::merge::{self, AccountWorld};
use super::plan::Requirements;
use super::{AccountStep, Error, StepDone};
use crate::bundle::Bundle;
use crate::homeserver::{Homeserver, HsError};

/// The merged settings: an account step that writes into the new account's account data or
/// profile, decided by [`merge`] from what it has. The other account steps hand files over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    /// `from_old`: the import asked for the old display name and avatar over the account's own.
    Profile {
        from_old: bool,
    },
    Direct,
    IgnoredUsers,
    PushRules,
    ClientSettings,
    OldMentions,
}

impl AccountStep {
    /// The setting this step merges, if it is one, as the import asked for it.
    pub fn setting(self, asked: &Requirements) -> Option<Setting> {
        Some(match self {
            AccountStep::Profile => Setting::Profile { from_old: asked.profile_from_old },
            AccountStep::Direct => Setting::Direct,
            AccountStep::IgnoredUsers => Setting::IgnoredUsers,
            AccountStep::PushRules => Setting::PushRules,
            AccountStep::ClientSettings => Setting::ClientSettings,
            AccountStep::OldMentions => Setting::OldMentions,
            AccountStep::RoomKeys | AccountStep::History | AccountStep::Remote => return None,
        })
    }
}

/// Applies the merged settings with a client that acts as the new account: the service's acting
/// registration, or the person's own session on the device side.
pub struct AccountWork {
    pub acting: Homeserver,
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

/// The settings, in the order they are applied (the profile before the rooms).
pub const SETTINGS: [AccountStep; 6] = [
    AccountStep::Profile,
    AccountStep::Direct,
    AccountStep::IgnoredUsers,
    AccountStep::PushRules,
    AccountStep::ClientSettings,
    AccountStep::OldMentions,
];

impl AccountWork {
    /// Applies one setting from `old`'s bundle to `new`; `moved` are the rooms the new account
    /// has its seat in now. Returns what it did, for the report (a merge words its own summary).
    pub async fn apply(
        &self,
        setting: Setting,
        old: &UserId,
        new: &UserId,
        bundle: &Bundle,
        moved: &BTreeSet<OwnedRoomId>,
        world: &AccountWorld,
    ) -> Result<StepDone, Error> {
        let merged: Result<String, Error> = match setting {
            Setting::Profile { from_old } => {
                let writes = merge::profile(world, bundle, new, from_old);
                if let Some(name) = writes.display_name {
                    let req = set_profile_field::v3::Request::new(new.to_owned(), ProfileFieldValue::DisplayName(name));
                    self.acting.send_as(new, req).await?;
                }
                if let Some(avatar) = writes.avatar_url {
                    let req = set_profile_field::v3::Request::new(new.to_owned(), ProfileFieldValue::AvatarUrl(avatar));
                    self.acting.send_as(new, req).await?;
                }
                Ok(writes.summary)
            }
            Setting::Direct => {
                let merged = merge::direct(world, bundle, moved);
                if let Some(content) = &merged.write {
                    self.set_global_data(new, "m.direct", content).await?;
                }
                Ok(merged.summary)
            }
            Setting::IgnoredUsers => {
                let merged = merge::ignored_users(world, bundle);
                if let Some(content) = &merged.write {
                    self.set_global_data(new, "m.ignored_user_list", content).await?;
                }
                Ok(merged.summary)
            }
            Setting::PushRules => {
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
            Setting::ClientSettings => {
                let merged = merge::client_settings(world, bundle);
                for (kind, content) in merged.write.iter().flatten() {
                    self.set_global_data(new, kind, content).await?;
                }
                Ok(merged.summary)
            }
            Setting::OldMentions => {
                self.acting.send_as(new, set_pushrule::v3::Request::new(merge::old_mentions(old))).await?;
                return Ok(StepDone::OldMentions { old: old.to_owned() });
            }
        };
        merged.map(StepDone::Merged)
    }

    pub(crate) async fn set_global_data(
        &self,
        user: &UserId,
        kind: &str,
        content: &impl Serialize,
    ) -> Result<(), Error> {
        let json = serde_json::value::to_raw_value(content).map_err(|e| HsError::Protocol(e.to_string()))?;
        let req = set_global_account_data::v3::Request::new_raw(user.to_owned(), kind.into(), Raw::from_json(json));
        self.acting.send_as(user, req).await?;
        Ok(())
    }
}
