//! Transfers: moving a bundle into a second account.
//!
//! - [`plan`] decides, purely, from the bundle and the rooms' current state ([`world`] reads it).
//! - [`run`] executes a plan step by step, journaling each step in the store before and after it
//!   runs, so a restarted service resumes where it stopped and nothing is done twice.

pub mod plan;
pub mod run;
pub mod world;

use std::collections::BTreeMap;

use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId};
use serde::{Deserialize, Serialize};

use crate::store::BundleId;
use plan::{Plan, Requirements};

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

/// One transfer, as journaled in the store (sealed: it holds room names).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Transfer {
    pub id: u64,
    pub old: OwnedUserId,
    pub new: OwnedUserId,
    pub bundle: BundleId,
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
    /// Account-level steps done (tags, m.direct, …), by name.
    #[serde(default)]
    pub account_steps: BTreeMap<String, StepOutcome>,
    pub created_at_ms: u64,
    /// While awaiting approval: when the request lapses (with its code).
    #[serde(default)]
    pub expires_at_ms: Option<u64>,
}

/// The journal entry of one room. `Started(stage)` is written before each stage runs, so it also
/// records that the stages before it completed; a final step is written when the room is done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "step", content = "detail")]
pub enum RoomStep {
    /// Nothing done yet.
    Pending,
    /// `invite`, `join`, `rank`, `tags` or `notify` was started; a resumed transfer re-checks the
    /// room before doing it again.
    Started(String),
    /// Everything done.
    Done,
    /// Left invited: a remote new account accepts the invite from its own client.
    AwaitingAccept,
    /// Not moved, with the reason shown to the user.
    Skipped(String),
    Failed(String),
}

impl RoomStep {
    pub fn is_final(&self) -> bool {
        matches!(self, RoomStep::Done | RoomStep::AwaitingAccept | RoomStep::Skipped(_) | RoomStep::Failed(_))
    }
}

/// How an account-level step ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "outcome", content = "detail")]
pub enum StepOutcome {
    Done(String),
    Failed(String),
}
