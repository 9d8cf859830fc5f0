//! Taking a move back: what the move wrote into the new account, against what the account holds
//! now. Each setting the move changed goes back to its value from before the move
//! ([`super::Before`]) only where it still holds what the move wrote; one the person changed
//! since is kept, and named. Each room the move joined is left (its rank lowered and its tags
//! taken off first, the new account's move notice redacted), unless the new account has written
//! there since, or was there before, or is not there any more.
//!
//! Decisions only, from what was read: reading the account and writing the undo are the
//! engine's. What the move wrote is computed again from the same merges, on the kept settings and
//! the same bundle: they are pure.

use std::collections::BTreeSet;

use ruma::events::direct::DirectEventContent;
use ruma::events::ignored_user_list::IgnoredUserListEventContent;
use ruma::events::room::member::MembershipState;
use ruma::events::tag::TagName;
use ruma::push::RuleKind;
use ruma::{Int, OwnedEventId, OwnedMxcUri, OwnedRoomId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::Value as JsonValue;

use super::merge::{self, AccountWorld, OLD_MENTIONS_RULE};
use super::plan::{Action, RoomPlan};
use super::room::Move;
use super::{
    AccountStep, Before, RoomStep, SettingsUndone, StepOutcome, Transfer, TransferKind, TransferState, UndoRoom,
};
use crate::bundle::{Bundle, RoomEntry};

/// What becomes of one setting the move wrote.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Revert<T> {
    /// It holds what the move wrote: back to the value before (`None`: the account had none).
    Restore(Option<T>),
    /// Changed since the move: kept as it is.
    Changed,
}

/// The push rules the move wrote, and what becomes of each.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PushRulesUndo {
    /// Rules the move added (the old account's, and the rule for mentions of the old ID),
    /// unchanged since: removed.
    pub remove: Vec<(RuleKind, String)>,
    /// Server-default rules the move switched on or off, still so: switched back to this.
    pub switch_back: Vec<(RuleKind, String, bool)>,
    /// Rules the move wrote that were changed since: kept.
    pub changed: Vec<String>,
}

/// What an undo does to the account's settings: `None` where the move wrote nothing.
#[derive(Debug, Clone, Default)]
pub struct SettingsUndo {
    pub direct: Option<Revert<DirectEventContent>>,
    pub ignored_users: Option<Revert<IgnoredUserListEventContent>>,
    pub client_settings: Vec<(String, Revert<JsonValue>)>,
    pub push_rules: PushRulesUndo,
    pub display_name: Option<Revert<String>>,
    pub avatar_url: Option<Revert<OwnedMxcUri>>,
}

impl SettingsUndo {
    /// The settings by name: those that would go back to what the account had before the move,
    /// and those changed since, which would stay.
    pub fn names(&self) -> (Vec<String>, Vec<String>) {
        let (mut back, mut kept) = (Vec::new(), Vec::new());
        let mut sort = |what: String, restore: bool| if restore { back.push(what) } else { kept.push(what) };
        if let Some(r) = &self.direct {
            sort("your DM list (m.direct)".into(), restores(r));
        }
        if let Some(r) = &self.ignored_users {
            sort("ignored users".into(), restores(r));
        }
        for (kind, r) in &self.client_settings {
            sort(format!("client setting {kind}"), restores(r));
        }
        for (_, id) in &self.push_rules.remove {
            sort(format!("push rule {id} (removed)"), true);
        }
        for (_, id, _) in &self.push_rules.switch_back {
            sort(format!("push rule {id} (switched back)"), true);
        }
        for id in &self.push_rules.changed {
            sort(format!("push rule {id}"), false);
        }
        if let Some(r) = &self.display_name {
            sort("display name".into(), restores(r));
        }
        if let Some(r) = &self.avatar_url {
            sort("avatar".into(), restores(r));
        }
        (back, kept)
    }
}

/// Whether a setting goes back.
fn restores<T>(r: &Revert<T>) -> bool {
    matches!(r, Revert::Restore(_))
}

/// Whether two values are the same setting (ruma's account-data types compare as JSON).
fn same<T: Serialize>(a: &T, b: &T) -> bool {
    serde_json::to_value(a).ok() == serde_json::to_value(b).ok()
}

/// What to do with a setting the move wrote as `wrote`, which the account holds as `now` and
/// held as `before`.
fn revert<T: Serialize + Clone>(wrote: Option<T>, now: &Option<T>, before: &Option<T>) -> Option<Revert<T>> {
    let wrote = wrote?;
    Some(match now {
        Some(now) if same(now, &wrote) => Revert::Restore(before.clone()),
        _ => Revert::Changed,
    })
}

/// What a move wrote into the account's settings: the service computes it again from the
/// settings kept before the move and its bundle ([`Wrote::of`]); the device side records it as it
/// imports.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Wrote {
    #[serde(default)]
    pub direct: Option<DirectEventContent>,
    #[serde(default)]
    pub ignored_users: Option<IgnoredUserListEventContent>,
    #[serde(default)]
    pub client_settings: Vec<(String, JsonValue)>,
    /// The push rules it added (the old account's, and the one for mentions of the old ID).
    #[serde(default)]
    pub push_rules: Vec<RuleWrote>,
    /// The server-default rules it switched on (`true`) or off.
    #[serde(default)]
    pub switched: Vec<(RuleKind, String, bool)>,
    #[serde(default)]
    pub display_name: Option<String>,
    #[serde(default)]
    pub avatar: Option<AvatarWrote>,
}

/// A push rule a move added, as it wrote it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuleWrote {
    pub kind: RuleKind,
    pub id: String,
    /// Its conditions or pattern and actions ([`merge::describe`]).
    pub rule: JsonValue,
    pub enabled: bool,
}

impl RuleWrote {
    fn new(rule: &ruma::push::NewPushRule, enabled: bool) -> RuleWrote {
        RuleWrote { kind: rule.kind(), id: rule.rule_id().to_owned(), rule: merge::describe(rule), enabled }
    }
}

/// The avatar a move set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AvatarWrote {
    Url(OwnedMxcUri),
    /// Copied from another server under a new address, which the merge does not know: put back
    /// unless the account has the one it had before again.
    Copied,
}

impl Wrote {
    /// What move `m` wrote, from the settings it merged into (`was`), its bundle and the rooms it
    /// moved (`moved`: the DMs it marked are among them): the same merges again, for the steps
    /// it did (`did`).
    pub fn of(
        m: Move<'_>,
        profile_from_old: bool,
        did: impl Fn(AccountStep) -> bool,
        was: &AccountWorld,
        bundle: &Bundle,
        moved: &BTreeSet<OwnedRoomId>,
    ) -> Wrote {
        let mut wrote = Wrote::default();
        if did(AccountStep::Direct) {
            wrote.direct = merge::direct(was, bundle, moved).write;
        }
        if did(AccountStep::IgnoredUsers) {
            wrote.ignored_users = merge::ignored_users(was, bundle).write;
        }
        if did(AccountStep::ClientSettings) {
            wrote.client_settings = merge::client_settings(was, bundle).write.unwrap_or_default().into_iter().collect();
        }
        if did(AccountStep::PushRules) {
            let rules = merge::push_rules(was, bundle);
            wrote.push_rules = rules.add.iter().map(|(rule, enabled)| RuleWrote::new(rule, *enabled)).collect();
            wrote.switched = rules.switch;
        }
        let had_mentions =
            was.push_rules.as_ref().is_some_and(|r| r.override_.iter().any(|r| r.rule_id == OLD_MENTIONS_RULE));
        if did(AccountStep::OldMentions) && !had_mentions {
            wrote.push_rules.push(RuleWrote::new(&merge::old_mentions(m.old), true));
        }
        if did(AccountStep::Profile) {
            let profile = merge::profile(was, bundle, m.new, profile_from_old);
            wrote.display_name = profile.display_name;
            wrote.avatar = profile.avatar_url.map(|url| match m.kind {
                TransferKind::Receive => AvatarWrote::Copied,
                _ => AvatarWrote::Url(url),
            });
        }
        wrote
    }

    /// What the service's move `t` wrote, with the settings kept before it.
    pub fn of_transfer(t: &Transfer, before: &Before, bundle: &Bundle, moved: &BTreeSet<OwnedRoomId>) -> Wrote {
        let did = |step| matches!(t.account_steps.get(&step), Some(StepOutcome::Done(_)));
        Wrote::of(Move::from(t), t.requirements.profile_from_old, did, &before.world, bundle, moved)
    }
}

/// What to put back of what a move wrote (`wrote`), over settings that were `was` before it and
/// are `now`.
pub fn settings(wrote: &Wrote, was: &AccountWorld, now: &AccountWorld) -> SettingsUndo {
    let mut undo = SettingsUndo {
        direct: revert(wrote.direct.clone(), &now.direct, &was.direct),
        ignored_users: revert(wrote.ignored_users.clone(), &now.ignored_users, &was.ignored_users),
        display_name: revert(wrote.display_name.clone(), &now.display_name, &was.display_name),
        ..Default::default()
    };
    for (kind, wrote) in &wrote.client_settings {
        let now = now.client_settings.get(kind).cloned().flatten();
        let before = was.client_settings.get(kind).cloned().flatten();
        undo.client_settings.push((kind.clone(), revert(Some(wrote.clone()), &now, &before).expect("written")));
    }
    let rules_now = now.push_rules.clone().unwrap_or_default();
    for rule in &wrote.push_rules {
        match rules_now.get(rule.kind.clone(), &rule.id) {
            Some(now) if now.enabled() == rule.enabled && same_rule(&now, &rule.rule) => {
                undo.push_rules.remove.push((rule.kind.clone(), rule.id.clone()))
            }
            // Removed since: nothing to take back.
            None => {}
            Some(_) => undo.push_rules.changed.push(rule.id.clone()),
        }
    }
    for (kind, id, enabled) in &wrote.switched {
        match rules_now.get(kind.clone(), id) {
            Some(now) if now.enabled() == *enabled => {
                undo.push_rules.switch_back.push((kind.clone(), id.clone(), !enabled))
            }
            _ => undo.push_rules.changed.push(id.clone()),
        }
    }
    undo.avatar_url = match &wrote.avatar {
        None => None,
        Some(AvatarWrote::Url(url)) => revert(Some(url.clone()), &now.avatar_url, &was.avatar_url),
        Some(AvatarWrote::Copied) => {
            (now.avatar_url != was.avatar_url).then(|| Revert::Restore(was.avatar_url.clone()))
        }
    };
    undo
}

/// Whether the account's rule is the one the move wrote (kind, ID, conditions or pattern, actions).
fn same_rule(now: &ruma::push::AnyPushRuleRef<'_>, wrote: &JsonValue) -> bool {
    merge::as_new_rule(now).is_some_and(|n| merge::describe(&n) == *wrote)
}

/// A room the move joined, as the new account has it now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoomNow {
    pub membership: Option<MembershipState>,
    /// The new account sent something there since its join (the move's notice aside).
    pub wrote_since: bool,
    /// Its power level there, if the room's power levels name it.
    pub level: Option<Int>,
    /// Its tags there.
    pub tags: BTreeSet<TagName>,
    /// The move's notices there that the new account posted.
    pub notices: Vec<OwnedEventId>,
}

/// Why a room the move touched stays.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kept {
    /// The new account was in it before the move.
    WasMember,
    /// The move did not seat the new account there.
    NotMoved,
    /// The new account is not in it any more.
    NotThere,
    /// The new account has written there since the move (`undo --all` leaves it anyway).
    WroteSince,
}

impl Kept {
    /// Why, for the person; `all` is how they ask to leave such a room anyway where they are
    /// (the bot's "`undo --all`", the command line's "--all").
    pub fn text(&self, all: &str) -> String {
        match self {
            Kept::WasMember => "you were in it before the move".into(),
            Kept::NotMoved => "the move did not join it".into(),
            Kept::NotThere => "you are not in it any more".into(),
            Kept::WroteSince => format!("you have written there since the move ({all} leaves it anyway)"),
        }
    }
}

/// What an undo does in one room of the move.
#[derive(Debug, Clone, PartialEq)]
pub enum RoomUndo {
    /// Leave it, after lowering the rank the move gave (to the room's default), taking off the
    /// tags the move set, and redacting the move's notices the new account posted.
    Leave {
        lower_rank: bool,
        untag: Vec<TagName>,
        redact: Vec<OwnedEventId>,
    },
    Kept(Kept),
}

impl RoomUndo {
    /// The step this room comes to without a write, given the step an earlier run of the same
    /// undo recorded (`before`): kept, or left already by a run stopped between its leave and
    /// the record of it. `None`: leave it now (recorded as started first, then
    /// [`super::revert::Reverter::carry_out`]).
    pub fn settled(&self, before: Option<&UndoRoom>) -> Option<UndoRoom> {
        match self {
            RoomUndo::Kept(Kept::NotThere) if before == Some(&UndoRoom::Started) => {
                Some(UndoRoom::Left { rank_kept: None, redacted: 0 })
            }
            RoomUndo::Kept(why) => Some(UndoRoom::Kept(why.clone())),
            RoomUndo::Leave { .. } => None,
        }
    }
}

/// What a move did in one room, as its undo needs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoomMoved {
    pub room_id: OwnedRoomId,
    #[serde(default)]
    pub name: Option<String>,
    /// The new account was in the room before the move.
    pub was_member: bool,
    /// The move seated the new account there.
    pub seated: bool,
    /// The rank the move gave.
    #[serde(default)]
    pub give_level: Option<Int>,
    /// The tags the move set.
    #[serde(default)]
    pub tags: Vec<TagName>,
    /// Its notices there that only their IDs tell (the device side's, sent encrypted).
    #[serde(default)]
    pub notices: Vec<OwnedEventId>,
}

impl RoomMoved {
    /// The room as `plan` planned it, the move left it at `step`, and its bundle entry (`None`:
    /// the bundle is gone, so no tags are known) set its tags.
    pub fn of(plan: &RoomPlan, step: Option<&RoomStep>, entry: Option<&RoomEntry>) -> RoomMoved {
        RoomMoved {
            room_id: plan.room_id.clone(),
            name: plan.name.clone(),
            was_member: plan.action == Action::AlreadyJoined,
            seated: plan.action == Action::Join && step.is_some_and(RoomStep::is_seated),
            give_level: plan.give_level,
            tags: entry.map(|e| e.tags.keys().cloned().collect()).unwrap_or_default(),
            notices: vec![],
        }
    }
}

/// What to do in a room the move touched (`moved`), the new account in it as `now`; `all`: leave
/// it even where the new account wrote since.
pub fn room(moved: &RoomMoved, now: &RoomNow, all: bool) -> RoomUndo {
    if moved.was_member {
        return RoomUndo::Kept(Kept::WasMember);
    }
    if !moved.seated {
        return RoomUndo::Kept(Kept::NotMoved);
    }
    if now.membership != Some(MembershipState::Join) {
        return RoomUndo::Kept(Kept::NotThere);
    }
    if now.wrote_since && !all {
        return RoomUndo::Kept(Kept::WroteSince);
    }
    // The rank the move gave, if the room still gives it that (one changed since, by a room
    // admin, is theirs): before the move the account was not in the room, so it had the room's
    // default.
    let lower_rank = moved.give_level.is_some() && now.level == moved.give_level;
    let untag = moved.tags.iter().filter(|t| now.tags.contains(*t)).cloned().collect();
    RoomUndo::Leave { lower_rank, untag, redact: now.notices.clone() }
}

/// The rooms the move seated the new account in (its DMs among them), from its journal.
pub fn moved(steps: &std::collections::BTreeMap<OwnedRoomId, RoomStep>) -> BTreeSet<OwnedRoomId> {
    steps
        .iter()
        .filter(|(_, s)| matches!(s, RoomStep::Done | RoomStep::AwaitingAccept))
        .map(|(r, _)| r.clone())
        .collect()
}

/// What an undo would do now: each room of the move the new account was seated in (with its
/// name, if it has one), and its settings (`None`: the move's bundle is gone, so what it wrote
/// can't be told apart from the person's own).
#[derive(Debug, Clone, Default)]
pub struct UndoPlan {
    pub rooms: Vec<(OwnedRoomId, Option<String>, RoomUndo)>,
    pub settings: Option<SettingsUndo>,
}

impl UndoPlan {
    /// The rooms it would leave.
    pub fn leaving(&self) -> usize {
        self.rooms.iter().filter(|(_, _, r)| matches!(r, RoomUndo::Leave { .. })).count()
    }
}

/// What an undo did, from its journal, for the report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UndoReport {
    pub left: Vec<OwnedRoomId>,
    /// Move notices redacted.
    pub redacted: usize,
    /// Rooms left where the rank the move gave could not be lowered first, and why.
    pub rank_kept: Vec<(OwnedRoomId, String)>,
    pub kept: Vec<(OwnedRoomId, Kept)>,
    pub failed: Vec<(OwnedRoomId, String)>,
    pub settings: SettingsUndone,
    /// The move's notices were posted as the old account (`handoff.notify.sender: old`): its
    /// messages, which only it may take back.
    pub notices_by_old: bool,
}

/// The report of the undo journaled on `t`.
pub fn report(t: &Transfer) -> UndoReport {
    t.undo.as_ref().map(report_of).unwrap_or_default()
}

/// The report of an undo, from its journal.
pub fn report_of(undo: &super::Undoing) -> UndoReport {
    let mut r = UndoReport::default();
    for (room, step) in &undo.rooms {
        match step {
            UndoRoom::Left { rank_kept, redacted } => {
                r.left.push(room.clone());
                r.redacted += redacted;
                if let Some(why) = rank_kept {
                    r.rank_kept.push((room.clone(), why.clone()));
                }
            }
            // Kept because it was never moved: not worth a line.
            UndoRoom::Kept(Kept::NotMoved) => {}
            UndoRoom::Kept(why) => r.kept.push((room.clone(), why.clone())),
            UndoRoom::Failed(why) => r.failed.push((room.clone(), why.clone())),
            UndoRoom::Started => r.failed.push((room.clone(), "not finished".into())),
        }
    }
    r.settings = undo.settings.clone().unwrap_or_default();
    r
}

/// Why `t` can't be undone by `user` now, if it can't.
pub fn refusal(t: &Transfer, user: &UserId, retention: std::time::Duration) -> Option<Refusal> {
    if !may_undo(t, user) {
        return Some(Refusal::NotYours);
    }
    if t.is_live() || t.state == TransferState::AwaitingApproval {
        return Some(Refusal::Running);
    }
    if t.state == TransferState::Denied || t.plan.is_none() {
        return Some(Refusal::NothingDone);
    }
    if crate::store::now_ms().saturating_sub(t.created_at_ms) > retention.as_millis() as u64 {
        return Some(Refusal::Expired);
    }
    match &t.undo {
        Some(u) if u.finished => Some(Refusal::Undone),
        Some(_) => Some(Refusal::Undoing),
        None => None,
    }
}

/// Why an undo is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Only the account the move wrote into may take it back.
    NotYours,
    /// The move is still running (or waits for approval): `cancel` it first.
    Running,
    /// The move never ran.
    NothingDone,
    /// Past `handoff.bundle_retention`.
    Expired,
    Undone,
    /// An undo of it is running.
    Undoing,
}

/// Whether `user` is the account move `t` wrote into, which alone may take it back.
pub fn may_undo(t: &Transfer, user: &UserId) -> bool {
    t.new == user && matches!(t.kind, TransferKind::Move | TransferKind::Receive)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ruma::events::tag::TagInfo;
    use ruma::{owned_room_id, owned_user_id};
    use serde_json::json;

    use super::*;
    use crate::bundle::{BundleId, Priority, RoomKind};
    use crate::transfer::StepDone;

    /// Settings compare as JSON (ruma's account-data types have no `PartialEq`).
    fn json<T: Serialize>(v: &T) -> JsonValue {
        serde_json::to_value(v).unwrap()
    }

    fn done() -> StepOutcome {
        StepOutcome::Done(StepDone::Merged(String::new()))
    }

    /// Move 1 of the sample bundle's account into `@new:example.org`, every account step done.
    fn transfer() -> Transfer {
        let (old, new) = (owned_user_id!("@old:example.org"), owned_user_id!("@new:example.org"));
        let mut t = Transfer::new(
            1,
            old.clone(),
            new,
            BundleId::new(&old, 1),
            Default::default(),
            owned_room_id!("!dm:example.org"),
            None,
        );
        for step in crate::transfer::account::SETTINGS {
            t.account_steps.insert(step, done());
        }
        t
    }

    fn ignoring(users: &[&str]) -> IgnoredUserListEventContent {
        let list = users.iter().map(|u| ((*u).try_into().unwrap(), Default::default())).collect();
        IgnoredUserListEventContent::new(list)
    }

    #[test]
    fn a_setting_as_the_move_left_it_goes_back_and_one_changed_since_is_kept() {
        let t = transfer();
        let mut bundle = crate::bundle::tests::sample();
        bundle.preferences.ignored_users = vec![owned_user_id!("@spam:example.org")];
        bundle.preferences.client_settings =
            BTreeMap::from([("im.vector.setting.breadcrumbs".to_owned(), json!({"recent_rooms": []}))]);
        bundle.profile.display_name = Some("Old Name".into());
        let mut before = Before::default();
        before.world.ignored_users = Some(ignoring(&["@mine:example.org"]));
        before.world.display_name = Some("new".into()); // Synapse's default: the localpart
        before.world.client_settings.insert("im.vector.setting.breadcrumbs".into(), None);
        before.kept = ["profile", "direct", "ignored_users", "push_rules", "client_settings"].map(String::from).into();
        // As the move left them: its merges on what was there.
        let mut now = before.world.clone();
        now.ignored_users = merge::ignored_users(&before.world, &bundle).write;
        now.display_name = Some("Old Name".into());
        now.client_settings.insert("im.vector.setting.breadcrumbs".into(), Some(json!({"recent_rooms": []})));
        let undo = settings(&Wrote::of_transfer(&t, &before, &bundle, &BTreeSet::new()), &before.world, &now);
        assert_eq!(json(&undo.ignored_users), json(&Some(Revert::Restore(Some(ignoring(&["@mine:example.org"]))))));
        assert_eq!(undo.display_name, Some(Revert::Restore(Some("new".into()))));
        assert_eq!(undo.client_settings, [("im.vector.setting.breadcrumbs".to_owned(), Revert::Restore(None))]);
        assert!(undo.direct.is_none(), "the move marked no DM: nothing to put back");

        // The person changed some since: those are kept.
        now.ignored_users = Some(ignoring(&["@mine:example.org", "@spam:example.org", "@later:example.org"]));
        now.display_name = Some("Chosen since".into());
        let undo = settings(&Wrote::of_transfer(&t, &before, &bundle, &BTreeSet::new()), &before.world, &now);
        assert_eq!(json(&undo.ignored_users), json(&Some(Revert::<()>::Changed)));
        assert_eq!(undo.display_name, Some(Revert::Changed));
        // A step the move did not do is not taken back.
        let mut partial = t.clone();
        partial.account_steps.remove(&AccountStep::IgnoredUsers);
        let wrote = Wrote::of_transfer(&partial, &before, &bundle, &BTreeSet::new());
        assert!(settings(&wrote, &before.world, &now).ignored_users.is_none());
    }

    #[test]
    fn the_push_rules_the_move_added_are_removed_unless_changed_and_its_mention_rule_goes() {
        let t = transfer();
        let mut bundle = crate::bundle::tests::sample();
        // The old account's own rules: two content rules, one of them switched off.
        let mut old_rules = ruma::push::Ruleset::server_default(&t.old);
        for (id, pattern, enabled) in [("lunch", "lunch", true), ("dinner", "dinner", false)] {
            let rule = ruma::push::NewPatternedPushRule::new(id.into(), pattern.into(), vec![]);
            old_rules.insert(ruma::push::NewPushRule::Content(rule), None, None).unwrap();
            old_rules.set_enabled(RuleKind::Content, id, enabled).unwrap();
        }
        bundle.preferences.push_rules = Some(old_rules);
        let before = Before::default();
        let wrote = merge::push_rules(&before.world, &bundle);
        assert_eq!(wrote.add.len(), 2, "{}", wrote.summary);
        // Now: the added rules and the mention rule, as the move wrote them.
        let mut rules = ruma::push::Ruleset::server_default(&t.new);
        for (rule, enabled) in &wrote.add {
            rules.insert(rule.clone(), None, None).unwrap();
            rules.set_enabled(rule.kind(), rule.rule_id(), *enabled).unwrap();
        }
        rules.insert(merge::old_mentions(&t.old), None, None).unwrap();
        let now = AccountWorld { push_rules: Some(rules.clone()), ..Default::default() };
        let undo =
            settings(&Wrote::of_transfer(&t, &before, &bundle, &BTreeSet::new()), &before.world, &now).push_rules;
        let removed: Vec<&str> = undo.remove.iter().map(|(_, id)| id.as_str()).collect();
        assert!(removed.contains(&OLD_MENTIONS_RULE), "{removed:?}");
        assert_eq!(removed.len(), wrote.add.len() + 1, "{removed:?}");
        assert!(undo.changed.is_empty());

        // One switched off since: kept, and named.
        let (first, _) = &wrote.add[0];
        let id = first.rule_id().to_owned();
        let enabled = rules.iter().find(|r| r.rule_id() == id).unwrap().enabled();
        rules.set_enabled(first.kind(), &id, !enabled).unwrap();
        let now = AccountWorld { push_rules: Some(rules), ..Default::default() };
        let undo =
            settings(&Wrote::of_transfer(&t, &before, &bundle, &BTreeSet::new()), &before.world, &now).push_rules;
        assert_eq!(undo.changed, std::slice::from_ref(&id));
        assert!(!undo.remove.iter().any(|(_, r)| *r == id));
    }

    /// Only the account moved into may undo, once the move ended, within the retention, once.
    #[test]
    fn an_undo_is_refused_to_others_while_running_after_retention_and_twice() {
        let week = std::time::Duration::from_secs(7 * 24 * 3600);
        let mut t = transfer();
        t.plan = Some(crate::transfer::plan::Plan {
            old: t.old.clone(),
            new: t.new.clone(),
            rooms: vec![],
            unplanned: vec![],
            left_out: 0,
        });
        assert_eq!(refusal(&t, &t.new.clone(), week), Some(Refusal::Running), "a new record runs");
        t.state = TransferState::Done;
        assert_eq!(refusal(&t, &t.new.clone(), week), None);
        assert_eq!(refusal(&t, &t.old.clone(), week), Some(Refusal::NotYours), "not the old account");
        let admin = ruma::owned_user_id!("@admin:example.org");
        assert_eq!(refusal(&t, &admin, week), Some(Refusal::NotYours), "nor an admin");
        let mut reserve = t.clone();
        reserve.kind = TransferKind::Reserve;
        assert_eq!(
            refusal(&reserve, &t.new.clone(), week),
            Some(Refusal::NotYours),
            "a reservation writes nothing here"
        );
        let mut old = t.clone();
        old.created_at_ms -= week.as_millis() as u64 + 1;
        assert_eq!(refusal(&old, &t.new.clone(), week), Some(Refusal::Expired));
        t.undo = Some(crate::transfer::Undoing::default());
        assert_eq!(refusal(&t, &t.new.clone(), week), Some(Refusal::Undoing));
        t.undo.as_mut().unwrap().finished = true;
        assert_eq!(refusal(&t, &t.new.clone(), week), Some(Refusal::Undone));
    }

    fn plan(action: Action) -> RoomPlan {
        RoomPlan {
            room_id: owned_room_id!("!room:example.org"),
            via: vec![],
            name: None,
            kind: RoomKind::Group,
            priority: Priority::Normal,
            action,
            give_level: Some(Int::from(50)),
            warnings: vec![],
        }
    }

    #[test]
    fn a_room_the_move_joined_is_left_unless_written_in_or_had_before() {
        let mut entry = crate::bundle::tests::sample().rooms.remove(0);
        entry.tags = BTreeMap::from([(TagName::Favorite, TagInfo::default())]);
        let now = RoomNow {
            membership: Some(MembershipState::Join),
            level: Some(Int::from(50)),
            tags: [TagName::Favorite, TagName::LowPriority].into(),
            notices: vec!["$notice".try_into().unwrap()],
            ..Default::default()
        };
        let joined = plan(Action::Join);
        let leave = room(&RoomMoved::of(&joined, Some(&RoomStep::Done), Some(&entry)), &now, false);
        let expected = RoomUndo::Leave {
            lower_rank: true,
            untag: vec![TagName::Favorite],
            redact: vec!["$notice".try_into().unwrap()],
        };
        assert_eq!(leave, expected, "the low-priority tag is the person's own: it stays");
        let wrote = RoomNow { wrote_since: true, ..now.clone() };
        assert_eq!(
            room(&RoomMoved::of(&joined, Some(&RoomStep::Done), Some(&entry)), &wrote, false),
            RoomUndo::Kept(Kept::WroteSince)
        );
        assert_eq!(room(&RoomMoved::of(&joined, Some(&RoomStep::Done), Some(&entry)), &wrote, true), expected, "--all");
        let promoted = RoomNow { level: Some(Int::from(100)), ..now.clone() };
        let RoomUndo::Leave { lower_rank, .. } =
            room(&RoomMoved::of(&joined, Some(&RoomStep::Done), Some(&entry)), &promoted, false)
        else {
            panic!("left")
        };
        assert!(!lower_rank, "a rank a room admin gave since is theirs to take back");
        let gone = RoomNow { membership: Some(MembershipState::Leave), ..now.clone() };
        assert_eq!(
            room(&RoomMoved::of(&joined, Some(&RoomStep::Done), Some(&entry)), &gone, false),
            RoomUndo::Kept(Kept::NotThere)
        );
        let had = plan(Action::AlreadyJoined);
        assert_eq!(
            room(&RoomMoved::of(&had, Some(&RoomStep::Done), Some(&entry)), &now, true),
            RoomUndo::Kept(Kept::WasMember)
        );
        let failed = RoomStep::Failed(crate::transfer::FailReason::Error("x".into()));
        assert_eq!(
            room(&RoomMoved::of(&joined, Some(&failed), Some(&entry)), &now, true),
            RoomUndo::Kept(Kept::NotMoved)
        );
    }
}
