//! How the account's settings merge into what the new account already has: pure functions from
//! the bundle and the new account's current account data (an [`AccountWorld`], read right before
//! the merge) to the writes to make ([`AccountPlan`]). Nothing here does I/O: the merges are
//! tested on JSON worlds with snapshots, and the executor (`account`) only applies them.
//!
//! The rules, the same for every setting: the new account keeps what it has; what the old one
//! had is added where the new one has nothing; nothing is ever removed; what is not applied
//! because the new account has its own is named in the summary the user reads. The profile alone
//! can be asked for over the account's own (`--profile-from-old`): it is one value, not a list
//! both accounts' entries fit into.

use std::collections::{BTreeMap, BTreeSet};

use ruma::events::direct::DirectEventContent;
use ruma::events::ignored_user_list::IgnoredUserListEventContent;
use ruma::push::{
    Action, AnyPushRuleRef, HighlightTweakValue, NewConditionalPushRule, NewPatternedPushRule, NewPushRule,
    NewSimplePushRule, PushCondition, RuleKind, Ruleset, Tweak,
};
use ruma::{OwnedMxcUri, OwnedRoomId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::{Value as JsonValue, json};

use crate::bundle::Bundle;

/// The ID of the push rule that keeps mentions of the old user ID notifying the new account.
pub const OLD_MENTIONS_RULE: &str = "org.handoff.old_mentions";

/// The new account's current account data, as far as the merges need it. `None`: it has none.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AccountWorld {
    #[serde(default)]
    pub direct: Option<DirectEventContent>,
    #[serde(default)]
    pub ignored_users: Option<IgnoredUserListEventContent>,
    /// The `global` push rules.
    #[serde(default)]
    pub push_rules: Option<Ruleset>,
    /// Each client setting the bundle carries, as the new account has it.
    #[serde(default)]
    pub client_settings: BTreeMap<String, Option<JsonValue>>,
    #[serde(default)]
    pub display_name: Option<String>,
    #[serde(default)]
    pub avatar_url: Option<OwnedMxcUri>,
}

/// A merged account-data event to write, if anything changed, and what the user is told.
#[derive(Debug, Clone, Serialize)]
pub struct Merge<T> {
    pub write: Option<T>,
    pub summary: String,
}

/// `m.direct` gains the moved DM rooms under their contacts; nothing it had is removed.
pub fn direct(world: &AccountWorld, bundle: &Bundle, moved: &BTreeSet<OwnedRoomId>) -> Merge<DirectEventContent> {
    let mut merged = world.direct.clone().unwrap_or_default();
    let mut added = 0;
    for contact in &bundle.contacts {
        let rooms = merged.entry(contact.user_id.clone().into()).or_default();
        for r in contact.dm_rooms.iter().filter(|r| moved.contains(*r)) {
            if !rooms.contains(r) {
                rooms.push(r.clone());
                added += 1;
            }
        }
    }
    merged.retain(|_, rooms| !rooms.is_empty());
    Merge { write: (added > 0).then_some(merged), summary: format!("{added} DM room(s) marked as DMs") }
}

/// The ignored users of both accounts.
pub fn ignored_users(world: &AccountWorld, bundle: &Bundle) -> Merge<IgnoredUserListEventContent> {
    let mut list = world.ignored_users.clone().unwrap_or_else(|| IgnoredUserListEventContent::new(BTreeMap::new()));
    let before = list.ignored_users.len();
    for user in &bundle.preferences.ignored_users {
        list.ignored_users.entry(user.clone()).or_default();
    }
    let added = list.ignored_users.len() - before;
    Merge { write: (added > 0).then_some(list), summary: format!("{added} ignored user(s) added") }
}

/// The push rule writes: the old account's own rules the new one lacks (with their enabled
/// flags), and the server-default rules whose enabled flag differs, switched to match. A rule the
/// new account has under the same kind and ID, set otherwise, stays as it is and is named in
/// `kept`: the person made it there.
#[derive(Debug, Clone, Default)]
pub struct PushRules {
    pub add: Vec<(NewPushRule, bool)>,
    pub switch: Vec<(RuleKind, String, bool)>,
    pub kept: Vec<String>,
    pub summary: String,
}

pub fn push_rules(world: &AccountWorld, bundle: &Bundle) -> PushRules {
    let Some(rules) = &bundle.preferences.push_rules else {
        return PushRules { summary: "none in the bundle".into(), ..Default::default() };
    };
    let current = world.push_rules.clone().unwrap_or_default();
    let (mut add, mut kept) = (Vec::new(), Vec::new());
    for rule in rules.iter().filter(|r| !r.is_server_default()) {
        let Some(new) = new_rule(&rule) else { continue };
        match current.get(kind_of(&rule), rule.rule_id()) {
            None => add.push((new, rule.enabled())),
            // Compared as written (kind, ID, conditions or pattern, actions) and switched on or off.
            Some(own)
                if new_rule(&own).map(|o| describe(&o)) == Some(describe(&new)) && own.enabled() == rule.enabled() => {}
            Some(_) => kept.push(rule.rule_id().to_owned()),
        }
    }
    let switch: Vec<(RuleKind, String, bool)> = rules
        .iter()
        .filter(|r| r.is_server_default())
        .filter(|r| current.get(kind_of(r), r.rule_id()).is_some_and(|e| e.enabled() != r.enabled()))
        .map(|r| (kind_of(&r), r.rule_id().to_owned(), r.enabled()))
        .collect();
    let mut summary = format!("{} push rule(s) added, {} default rule(s) switched to match", add.len(), switch.len());
    if !kept.is_empty() {
        summary.push_str(&format!(
            "; not applied: the old account's {} (you have your own rule of that ID, kept as it is)",
            kept.join(", ")
        ));
    }
    PushRules { add, switch, kept, summary }
}

/// The rule that keeps mentions of the old user ID notifying the new account.
pub fn old_mentions(old: &UserId) -> NewPushRule {
    let condition: PushCondition = serde_json::from_value(json!({
        "kind": "event_property_contains",
        "key": "content.m\\.mentions.user_ids",
        "value": old,
    }))
    .expect("a valid push condition");
    NewPushRule::Override(NewConditionalPushRule::new(
        OLD_MENTIONS_RULE.into(),
        vec![condition],
        vec![
            Action::Notify,
            Action::SetTweak(Tweak::Highlight(HighlightTweakValue::Yes)),
            Action::SetTweak(Tweak::Sound("default".into())),
        ],
    ))
}

/// Client settings the new account lacks are set; one it has (and that differs) is kept.
pub fn client_settings(world: &AccountWorld, bundle: &Bundle) -> Merge<Vec<(String, JsonValue)>> {
    let (mut set, mut kept) = (Vec::new(), Vec::new());
    for (kind, content) in &bundle.preferences.client_settings {
        match world.client_settings.get(kind) {
            None | Some(None) => set.push((kind.clone(), content.clone())),
            Some(Some(existing)) if existing == content => {}
            Some(Some(_)) => kept.push(kind.as_str()),
        }
    }
    let mut summary = format!("{} client setting(s) applied", set.len());
    if !kept.is_empty() {
        summary.push_str(&format!("; kept the new account's own {} (it differs)", kept.join(", ")));
    }
    Merge { write: (!set.is_empty()).then_some(set), summary }
}

/// The profile to set. Where the new account has no display name or avatar of its own, the old
/// account's are set (the person is the same; the new account was usually just created). One it
/// has is kept unless the import asked for the old ones (`from_old`, `--profile-from-old`), and
/// the summary says what was kept and how to take the old one. A display name equal to the
/// localpart is the homeserver's default at registration (Synapse's), not one of its own.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProfileWrites {
    pub display_name: Option<String>,
    pub avatar_url: Option<OwnedMxcUri>,
    pub summary: String,
}

/// The flag that asks for the old account's display name and avatar over the new one's own.
pub const PROFILE_FROM_OLD: &str = "--profile-from-old";

pub fn profile(world: &AccountWorld, bundle: &Bundle, new: &UserId, from_old: bool) -> ProfileWrites {
    let own_name = world.display_name.as_ref().filter(|n| !n.is_empty() && n.as_str() != new.localpart());
    let (mut set, mut kept) = (Vec::new(), Vec::new());
    let display_name = bundle.profile.display_name.clone().filter(|old| match own_name {
        Some(own) if own == old => false,
        Some(_) if !from_old => {
            kept.push(format!("your own display name (the old one was \"{old}\")"));
            false
        }
        // Not yet the old one (the default, or its own and the import asked): set.
        _ => world.display_name.as_ref() != Some(old),
    });
    let avatar_url = bundle.profile.avatar_url.clone().filter(|old| match &world.avatar_url {
        Some(own) if own == old => false,
        Some(_) if !from_old => {
            kept.push(format!("your own avatar (the old one is {old})"));
            false
        }
        _ => true,
    });
    set.extend(display_name.as_ref().map(|_| "display name"));
    set.extend(avatar_url.as_ref().map(|_| "avatar"));
    let mut parts = Vec::new();
    if !set.is_empty() {
        parts.push(format!("{} set", set.join(" and ")));
    }
    if !kept.is_empty() {
        let them = if kept.len() > 1 { "them" } else { "it" };
        parts.push(format!("kept {}: use {PROFILE_FROM_OLD} to take {them}", kept.join(" and ")));
    }
    let summary = if parts.is_empty() { "nothing to set".into() } else { parts.join("; ") };
    ProfileWrites { display_name, avatar_url, summary }
}

/// A rule of the bundle as a rule to create.
fn new_rule(rule: &AnyPushRuleRef<'_>) -> Option<NewPushRule> {
    as_new_rule(rule)
}

/// A rule as it would be created (to compare a rule with one written).
pub fn as_new_rule(rule: &AnyPushRuleRef<'_>) -> Option<NewPushRule> {
    let conditional = |r: &ruma::push::ConditionalPushRule| {
        NewConditionalPushRule::new(r.rule_id.clone(), r.conditions.clone(), r.actions.clone())
    };
    Some(match rule {
        AnyPushRuleRef::Override(r) => NewPushRule::Override(conditional(r)),
        AnyPushRuleRef::Content(r) => {
            NewPushRule::Content(NewPatternedPushRule::new(r.rule_id.clone(), r.pattern.clone(), r.actions.clone()))
        }
        AnyPushRuleRef::Room(r) => NewPushRule::Room(NewSimplePushRule::new(r.rule_id.clone(), r.actions.clone())),
        AnyPushRuleRef::Sender(r) => NewPushRule::Sender(NewSimplePushRule::new(r.rule_id.clone(), r.actions.clone())),
        AnyPushRuleRef::Underride(r) => NewPushRule::Underride(conditional(r)),
        #[allow(unreachable_patterns)]
        _ => return None, // kinds behind unstable features
    })
}

fn kind_of(rule: &AnyPushRuleRef<'_>) -> RuleKind {
    match rule {
        AnyPushRuleRef::Override(_) => RuleKind::Override,
        AnyPushRuleRef::Content(_) => RuleKind::Content,
        AnyPushRuleRef::Room(_) => RuleKind::Room,
        AnyPushRuleRef::Sender(_) => RuleKind::Sender,
        AnyPushRuleRef::Underride(_) => RuleKind::Underride,
        #[allow(unreachable_patterns)]
        _ => RuleKind::Override,
    }
}

/// A rule to create, as JSON (ruma's `NewPushRule` is not serialisable): for snapshots and logs.
pub fn describe(rule: &NewPushRule) -> JsonValue {
    match rule {
        NewPushRule::Override(r) | NewPushRule::Underride(r) => {
            json!({"kind": rule.kind().as_str(), "rule_id": r.rule_id, "conditions": r.conditions, "actions": r.actions})
        }
        NewPushRule::Content(r) => {
            json!({"kind": "content", "rule_id": r.rule_id, "pattern": r.pattern, "actions": r.actions})
        }
        NewPushRule::Room(r) => json!({"kind": "room", "rule_id": r.rule_id, "actions": r.actions}),
        NewPushRule::Sender(r) => json!({"kind": "sender", "rule_id": r.rule_id, "actions": r.actions}),
        #[allow(unreachable_patterns)]
        _ => json!({"kind": rule.kind().as_str(), "rule_id": rule.rule_id()}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bundle with everything an account merge reads: contacts with DMs, ignored users, push
    /// rules (own ones and a switched default), client settings and a profile.
    fn bundle() -> Bundle {
        serde_json::from_value(json!({
            "version": 1,
            "source": {"user_id": "@old:old.org", "server_name": "old.org", "homeserver_url": "https://old.org",
                       "exported_at": 0, "client": "test"},
            "rooms": [],
            "contacts": [
                {"user_id": "@alice:old.org", "display_name": "Alice", "dm_rooms": ["!alice-dm:old.org", "!alice-old:old.org"]},
                {"user_id": "@bob:other.org", "dm_rooms": ["!bob-dm:old.org"]},
            ],
            "preferences": {
                "ignored_users": ["@spam:evil.org", "@troll:evil.org"],
                "push_rules": {
                    "override": [
                        {"rule_id": ".m.rule.master", "default": true, "enabled": false, "conditions": [], "actions": []},
                        {"rule_id": ".m.rule.suppress_notices", "default": true, "enabled": false,
                         "conditions": [{"kind": "event_match", "key": "content.msgtype", "pattern": "m.notice"}], "actions": []}
                    ],
                    "content": [
                        {"rule_id": "lunch", "default": false, "enabled": true, "pattern": "lunch",
                         "actions": ["notify", {"set_tweak": "highlight"}]}
                    ],
                    "room": [
                        {"rule_id": "!noisy:old.org", "default": false, "enabled": false, "actions": []}
                    ],
                    "sender": [], "underride": []
                },
                "client_settings": {
                    "im.vector.setting.breadcrumbs": {"recent_rooms": ["!a:old.org"]},
                    "m.accepted_terms": {"accepted": ["https://old.org/terms"]},
                    "im.vector.analytics": {"pseudonymousAnalyticsOptIn": false}
                }
            },
            "profile": {"display_name": "Old Me", "avatar_url": "mxc://old.org/avatar"}
        }))
        .unwrap()
    }

    /// The new account as it is right after registration on Synapse: default push rules, no
    /// account data, a display name equal to its localpart.
    fn fresh() -> AccountWorld {
        serde_json::from_value(json!({
            "push_rules": {
                "override": [
                    {"rule_id": ".m.rule.master", "default": true, "enabled": false, "conditions": [], "actions": []},
                    {"rule_id": ".m.rule.suppress_notices", "default": true, "enabled": true,
                     "conditions": [{"kind": "event_match", "key": "content.msgtype", "pattern": "m.notice"}], "actions": []}
                ],
                "content": [], "room": [], "sender": [], "underride": []
            },
            "client_settings": {"im.vector.setting.breadcrumbs": null, "m.accepted_terms": null, "im.vector.analytics": null},
            "display_name": "new"
        }))
        .unwrap()
    }

    /// A new account that was used already: its own DMs, ignored users, rules, settings and profile.
    fn lived_in() -> AccountWorld {
        serde_json::from_value(json!({
            "direct": {"@alice:old.org": ["!alice-dm:old.org", "!new-only:new.org"], "@carol:new.org": ["!carol:new.org"]},
            "ignored_users": {"ignored_users": {"@spam:evil.org": {}, "@mine:new.org": {}}},
            "push_rules": {
                "override": [
                    {"rule_id": ".m.rule.master", "default": true, "enabled": false, "conditions": [], "actions": []},
                    {"rule_id": ".m.rule.suppress_notices", "default": true, "enabled": false,
                     "conditions": [{"kind": "event_match", "key": "content.msgtype", "pattern": "m.notice"}], "actions": []}
                ],
                "content": [
                    {"rule_id": "lunch", "default": false, "enabled": true, "pattern": "dinner", "actions": ["notify"]}
                ],
                "room": [], "sender": [], "underride": []
            },
            "client_settings": {
                "im.vector.setting.breadcrumbs": {"recent_rooms": ["!mine:new.org"]},
                "m.accepted_terms": {"accepted": ["https://old.org/terms"]},
                "im.vector.analytics": null
            },
            "display_name": "Me, lately",
            "avatar_url": "mxc://new.org/other"
        }))
        .unwrap()
    }

    /// The new account of every world here (Synapse gave it the display name `new`).
    fn new() -> ruma::OwnedUserId {
        "@new:new.org".try_into().unwrap()
    }

    /// Everything the merges decide for one world, as one JSON document (an import that did not
    /// ask for the old profile).
    fn decide(world: &AccountWorld) -> JsonValue {
        let b = bundle();
        // Alice's second DM and Bob's DM were not moved (skipped, say): they are not marked.
        let moved: BTreeSet<OwnedRoomId> = ["!alice-dm:old.org".try_into().unwrap()].into();
        let rules = push_rules(world, &b);
        json!({
            "direct": direct(world, &b, &moved),
            "ignored_users": ignored_users(world, &b),
            "push_rules": {
                "add": rules.add.iter().map(|(r, enabled)| json!({"rule": describe(r), "enabled": enabled})).collect::<Vec<_>>(),
                "switch": rules.switch.iter().map(|(k, id, on)| json!([k.as_str(), id, on])).collect::<Vec<_>>(),
                "kept": rules.kept,
                "summary": rules.summary,
            },
            "old_mentions": describe(&old_mentions(&b.source.user_id)),
            "client_settings": client_settings(world, &b),
            "profile": profile(world, &b, &new(), false),
        })
    }

    #[test]
    fn into_a_fresh_account_everything_is_added() {
        insta::assert_json_snapshot!(decide(&fresh()));
    }

    #[test]
    fn into_a_lived_in_account_nothing_it_has_is_changed() {
        insta::assert_json_snapshot!(decide(&lived_in()));
    }

    #[test]
    fn a_lived_in_account_that_asks_for_the_old_profile_gets_it() {
        let p = profile(&lived_in(), &bundle(), &new(), true);
        assert_eq!(p.display_name.as_deref(), Some("Old Me"));
        assert_eq!(p.avatar_url.as_ref().map(|a| a.as_str()), Some("mxc://old.org/avatar"));
        assert_eq!(p.summary, "display name and avatar set");
    }

    #[test]
    fn an_account_with_only_a_display_name_of_its_own_gets_the_old_avatar() {
        let mut world = lived_in();
        world.avatar_url = None;
        let p = profile(&world, &bundle(), &new(), false);
        assert_eq!(
            (p.display_name.as_deref(), p.avatar_url.as_ref().map(|a| a.as_str())),
            (None, Some("mxc://old.org/avatar"))
        );
        assert_eq!(
            p.summary,
            "avatar set; kept your own display name (the old one was \"Old Me\"): use --profile-from-old to take it"
        );
    }

    #[test]
    fn a_second_merge_writes_nothing() {
        // What the first merge wrote, read back: the same merge again is a no-op (a resumed step).
        let b = bundle();
        let moved: BTreeSet<OwnedRoomId> = ["!alice-dm:old.org".try_into().unwrap()].into();
        let mut world = fresh();
        world.direct = direct(&world, &b, &moved).write;
        world.ignored_users = ignored_users(&world, &b).write;
        for (kind, content) in client_settings(&world, &b).write.unwrap() {
            world.client_settings.insert(kind, Some(content));
        }
        world.display_name = b.profile.display_name.clone();
        world.avatar_url = b.profile.avatar_url.clone();
        assert!(direct(&world, &b, &moved).write.is_none());
        assert!(ignored_users(&world, &b).write.is_none());
        assert!(client_settings(&world, &b).write.is_none());
        // Asked for or not: the old profile is what it has now.
        for from_old in [false, true] {
            let p = profile(&world, &b, &new(), from_old);
            assert!(p.display_name.is_none() && p.avatar_url.is_none(), "{p:?}");
            assert_eq!(p.summary, "nothing to set");
        }
        // The rules as the first merge left them: the same as the old account's.
        world.push_rules = b.preferences.push_rules.clone();
        let rules = push_rules(&world, &b);
        assert!(rules.add.is_empty() && rules.switch.is_empty() && rules.kept.is_empty(), "{}", rules.summary);
    }
}
