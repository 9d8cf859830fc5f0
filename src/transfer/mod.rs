//! Transfers: moving a bundle into a second account.
//!
//! - [`plan`] decides, purely, from the bundle and the rooms' current state ([`world`] reads it);
//!   [`merge`] decides, purely too, how the account's settings merge into what the new account has.
//! - [`engine`] runs transfers: [`room`] takes one room through its stages, [`account`] applies
//!   the account merges, each step journaled ([`journal`]) before and after it runs, so a
//!   restarted service resumes where it stopped and nothing is done twice. After a reservation,
//!   [`watch`] follows the seats until the new account's server has taken them.
//! - The engine tells the people it works for how it goes through a port, [`progress::Reporter`]:
//!   the bot renders it into chat. Why a room or step ended is a type ([`reason`]), worded at the
//!   edges (`crate::wording`). The engine words no report and never imports the bot.

pub mod account;
pub mod arrivals;
pub mod engine;
pub mod journal;
pub mod line;
pub mod merge;
pub mod pace;
pub mod plan;
pub mod progress;
pub mod reason;
pub mod report;
pub mod revert;
pub mod room;
pub mod undo;
pub mod watch;
pub mod world;

use std::collections::BTreeMap;

use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId};
use serde::{Deserialize, Serialize};

use crate::bundle::BundleId;
use crate::homeserver::{HsError, Retry};
use crate::store::{StoreError, now_ms};
use plan::{Plan, Requirements};
pub use reason::{FailReason, SkipReason, StepDone, StepFailure, Withdrawal};

/// Transient failures (homeserver away, rate limits) are waited out, however long it takes: a
/// transfer completes when the homeserver is back.
pub const PATIENT: Retry = Retry {
    attempts: u32::MAX,
    backoff: std::time::Duration::from_millis(250),
    max_wait: std::time::Duration::from_secs(15),
    server_errors: true,
    deadline: None,
};

/// Why a transfer could not go on. Either is retried at the next start: the journal says where.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Hs(#[from] HsError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("transfer {0} not found")]
    Missing(u64),
}

/// The second client's kind: shapes what it is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientProfile {
    /// A compact plain digest.
    Mobile,
    /// The full HTML report and files.
    #[default]
    Desktop,
}

impl std::str::FromStr for ClientProfile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "mobile" => Ok(ClientProfile::Mobile),
            "desktop" => Ok(ClientProfile::Desktop),
            other => Err(format!("`--profile` takes mobile or desktop, not `{other}`")),
        }
    }
}

impl std::fmt::Display for ClientProfile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ClientProfile::Mobile => "mobile",
            ClientProfile::Desktop => "desktop",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransferState {
    /// The code was not bound to the new account: the old account must approve.
    AwaitingApproval,
    Denied,
    Running,
    /// `cancel` was asked: stops after the rooms in flight.
    Cancelling,
    Cancelled,
    Done,
}

impl TransferState {
    pub fn is_finished(self) -> bool {
        matches!(self, TransferState::Denied | TransferState::Cancelled | TransferState::Done)
    }
}

/// Which part of a move this service plays, and so which accounts it acts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransferKind {
    /// The whole move on this server: the old account invites, the new one (if local) joins.
    #[default]
    Move,
    /// `export --to @new:other.server`: the old account (local) invites the remote new one into
    /// every room right away (the reservation). Nothing else: the new account's own server moves
    /// the rest when it imports the bundle file; once done, this side watches the seats being
    /// taken ([`watch`]), gives the old account's rank in each room the new one joined, and tells
    /// the old account.
    Reserve,
    /// `import CODE` of a bundle file from another server: the old account is remote and is never
    /// acted for. The new account (local) joins by room ID through the bundle's via servers, and
    /// posts the notices where the old account's invite proves the move.
    Receive,
}

/// One transfer, as journaled in the store (sealed: it holds room names).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Transfer {
    pub id: u64,
    pub old: OwnedUserId,
    pub new: OwnedUserId,
    pub bundle: BundleId,
    #[serde(default)]
    pub kind: TransferKind,
    pub requirements: Requirements,
    pub profile: ClientProfile,
    pub state: TransferState,
    /// Set when the transfer starts running (after approval).
    #[serde(default)]
    pub plan: Option<Plan>,
    /// The new account's DM with the bot, where progress and the report go.
    pub new_dm: OwnedRoomId,
    /// The old account's DM with the bot, for the approval prompt.
    #[serde(default)]
    pub old_dm: Option<OwnedRoomId>,
    /// The status message that is edited as rooms complete.
    #[serde(default)]
    pub status_event: Option<OwnedEventId>,
    /// Account-level steps done (m.direct, push rules, …).
    #[serde(default)]
    pub account_steps: BTreeMap<AccountStep, StepOutcome>,
    pub created_at_ms: u64,
    /// While awaiting approval: when the request lapses (with its code).
    #[serde(default)]
    pub expires_at_ms: Option<u64>,
    /// A reservation's seats are all taken or declined, and the old account was told ([`watch`]).
    #[serde(default)]
    pub taken_up: bool,
    /// What the bundle held that its border let not through (a bundle from another server).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dropped: Vec<crate::bundle::border::Dropped>,
    /// A cancelled reservation's invites not taken were withdrawn ([`watch::withdraw`]); until
    /// then, each start withdraws them.
    #[serde(default)]
    pub withdrawn: bool,
    /// The new account's settings as they were right before the move merged into them (its
    /// `m.direct`, ignored users, push rules, the client settings the bundle carries, its display
    /// name and avatar): what an undo puts back. Sealed with the record, and gone with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<Before>,
    /// Rooms where the rank the plan meant to give was refused when it was given (the power
    /// levels changed since the plan read them, say), with the homeserver's words: the report
    /// names them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ranks_refused: Vec<(OwnedRoomId, String)>,
    /// Rooms the old account left with `finish --leave` and has not rejoined: what its own `undo`
    /// rejoins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub left_at_finish: Vec<OwnedRoomId>,
    /// The move being taken back (`undo`), or taken back: journaled step by step like the move.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undo: Option<Undoing>,
}

/// An undo of a move, as journaled: each room's step is written before and after it runs, so a
/// restarted service resumes it and nothing is left or redacted twice.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Undoing {
    /// `undo --all`: rooms the new account wrote in since the move are left too.
    pub all: bool,
    /// Every step ran and the report was posted.
    pub finished: bool,
    pub started_at_ms: u64,
    /// The message edited as rooms are left.
    #[serde(default)]
    pub status_event: Option<OwnedEventId>,
    pub rooms: BTreeMap<OwnedRoomId, UndoRoom>,
    /// The settings, once put back: what went back and what was kept.
    #[serde(default)]
    pub settings: Option<SettingsUndone>,
}

/// One room's undo step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "step", content = "detail")]
pub enum UndoRoom {
    /// Started: a resumed undo reads the room again before going on.
    Started,
    /// Left, with the move's notices there redacted. `rank_kept`: the rank the move gave could
    /// not be lowered first (why).
    Left { rank_kept: Option<String>, redacted: usize },
    /// Kept, and why.
    Kept(undo::Kept),
    /// Not left: the homeserver's words.
    Failed(String),
}

impl UndoRoom {
    pub fn is_final(&self) -> bool {
        !matches!(self, UndoRoom::Started)
    }
}

/// The settings an undo put back, kept (changed since the move) and could not put back, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettingsUndone {
    pub restored: Vec<String>,
    pub kept: Vec<String>,
    pub failed: Vec<String>,
}

/// The new account's settings right before the move merged into them, as its account steps read
/// them (the profile at the start, the rest after the rooms).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Before {
    pub world: merge::AccountWorld,
    /// The settings read so far: `profile`, `direct`, `ignored_users`, `push_rules`, `client_settings`.
    pub kept: std::collections::BTreeSet<String>,
}

impl Before {
    /// Keeps what `steps`, about to merge, read in `world`, unless it was kept already: a resumed
    /// move reads some settings after their merge (and two steps share the push rules).
    pub fn keep(&mut self, world: &merge::AccountWorld, steps: &[AccountStep]) {
        for step in steps {
            let part = match step {
                AccountStep::Profile => "profile",
                AccountStep::Direct => "direct",
                AccountStep::IgnoredUsers => "ignored_users",
                AccountStep::PushRules | AccountStep::OldMentions => "push_rules",
                AccountStep::ClientSettings => "client_settings",
                AccountStep::RoomKeys | AccountStep::History | AccountStep::Remote => continue,
            };
            if !self.kept.insert(part.to_owned()) {
                continue;
            }
            let (w, from) = (&mut self.world, world.clone());
            match part {
                "profile" => (w.display_name, w.avatar_url) = (from.display_name, from.avatar_url),
                "direct" => w.direct = from.direct,
                "ignored_users" => w.ignored_users = from.ignored_users,
                "push_rules" => w.push_rules = from.push_rules,
                _ => w.client_settings = from.client_settings,
            }
        }
    }
}

impl Transfer {
    /// A new transfer record, running unless the caller says otherwise.
    pub fn new(
        id: u64,
        old: OwnedUserId,
        new: OwnedUserId,
        bundle: BundleId,
        requirements: Requirements,
        new_dm: OwnedRoomId,
        old_dm: Option<OwnedRoomId>,
    ) -> Transfer {
        Transfer {
            id,
            old,
            new,
            bundle,
            kind: TransferKind::Move,
            requirements,
            profile: ClientProfile::default(),
            state: TransferState::Running,
            plan: None,
            new_dm,
            old_dm,
            status_event: None,
            account_steps: BTreeMap::new(),
            created_at_ms: now_ms(),
            expires_at_ms: None,
            taken_up: false,
            dropped: Vec::new(),
            withdrawn: false,
            before: None,
            ranks_refused: Vec::new(),
            undo: None,
            left_at_finish: Vec::new(),
        }
    }

    /// Whether `user` takes part in it, as the old or the new account.
    pub fn involves(&self, user: &ruma::UserId) -> bool {
        self.old == user || self.new == user
    }

    /// The accounts this service acts for in this transfer: their permission is checked at every
    /// start. A remote account is never acted for (the acting registration can't).
    pub fn acted_for(&self) -> Vec<&OwnedUserId> {
        match self.kind {
            TransferKind::Move => vec![&self.old, &self.new],
            TransferKind::Reserve => vec![&self.old],
            TransferKind::Receive => vec![&self.new],
        }
    }

    /// Running, or stopping after the rooms in flight.
    pub fn is_live(&self) -> bool {
        matches!(self.state, TransferState::Running | TransferState::Cancelling)
    }
}

/// A room's stages, in the order they run. Pass 1 takes the new account's seat (invite, join;
/// `Joined` marks its end), pass 2 finishes the room (rank, tags, notify).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Invite,
    Join,
    Joined,
    Rank,
    Tags,
    Notify,
}

/// The journal entry of one room. `Started(stage)` is written before each stage runs, so it also
/// records that the stages before it completed; a final step is written when the room is done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "step", content = "detail")]
pub enum RoomStep {
    /// Nothing done yet.
    Pending,
    /// The stage was started; a resumed transfer re-checks the room before doing it again.
    Started(Stage),
    /// Everything done.
    Done,
    /// Left invited: a remote new account accepts the invite from its own client.
    AwaitingAccept,
    /// Not moved: nothing failed, the room or the move's course kept it out.
    Skipped(SkipReason),
    /// Not moved this time: trying again may do it.
    Failed(FailReason),
}

impl RoomStep {
    pub fn is_final(&self) -> bool {
        matches!(self, RoomStep::Done | RoomStep::AwaitingAccept | RoomStep::Skipped(_) | RoomStep::Failed(_))
    }

    /// Whether the new account has its seat (pass 1 is over), finished since or not.
    pub fn is_seated(&self) -> bool {
        match self {
            RoomStep::Started(stage) => *stage >= Stage::Joined,
            RoomStep::Done | RoomStep::AwaitingAccept => true,
            _ => false,
        }
    }

    /// Whether `stage` was completed: a room is journaled `Started(s)` before each stage `s` runs,
    /// so every stage before the started one is done (and `Joined` is a mark, not work).
    pub fn completed(&self, stage: Stage) -> bool {
        match self {
            RoomStep::Pending => false,
            RoomStep::Started(started) => stage < *started || (stage == Stage::Joined && *started == Stage::Joined),
            _ => true,
        }
    }
}

/// The account-level steps, in the order they run (the profile first: set after the joins, it
/// would add a member event to every room).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountStep {
    Profile,
    Direct,
    IgnoredUsers,
    PushRules,
    ClientSettings,
    OldMentions,
    RoomKeys,
    History,
    /// The new account is on another server: its account steps are that server's or its client's.
    #[serde(rename = "account")]
    Remote,
}

impl AccountStep {
    /// Its name in the journal and in the report.
    pub fn name(self) -> &'static str {
        match self {
            AccountStep::Profile => "profile",
            AccountStep::Direct => "direct",
            AccountStep::IgnoredUsers => "ignored_users",
            AccountStep::PushRules => "push_rules",
            AccountStep::ClientSettings => "client_settings",
            AccountStep::OldMentions => "old_mentions",
            AccountStep::RoomKeys => "room_keys",
            AccountStep::History => "history",
            AccountStep::Remote => "account",
        }
    }
}

/// How an account-level step ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "outcome", content = "detail")]
pub enum StepOutcome {
    Done(StepDone),
    Failed(StepFailure),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(name: &str) -> merge::AccountWorld {
        merge::AccountWorld { display_name: Some(name.into()), ..Default::default() }
    }

    /// Each setting is kept as its step read it first: a resumed move, which reads the settings
    /// of the steps left after some merged, or a second step of the same setting, changes nothing
    /// kept.
    #[test]
    fn the_settings_before_a_move_are_kept_as_first_read() {
        let mut before = Before::default();
        before.keep(&named("Bob B."), &[AccountStep::Profile]);
        let mut later = named("Alice A.");
        later.push_rules = Some(ruma::push::Ruleset::default());
        before.keep(&later, &[AccountStep::Profile, AccountStep::PushRules]);
        assert_eq!(before.world.display_name.as_deref(), Some("Bob B."), "the profile as read before its merge");
        assert!(before.world.push_rules.is_some(), "the push rules, read once");
        let mut merged = later.clone();
        merged.push_rules = None;
        before.keep(&merged, &[AccountStep::OldMentions, AccountStep::RoomKeys]);
        assert!(before.world.push_rules.is_some(), "the mention rule shares the push rules kept before");
        let kept: Vec<&str> = before.kept.iter().map(String::as_str).collect();
        assert_eq!(kept, ["profile", "push_rules"]);
    }
}
