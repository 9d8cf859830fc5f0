//! Why a room or an account step ended as it did, as data: the engine decides the reason, the
//! edges word it (`crate::wording`, for the bot's chat and the device side's terminal), each
//! reason once. Journaled: a record written before these types (a sentence) still reads, as
//! `Legacy`, and is shown as it was written.

use std::time::Duration;

use ruma::{OwnedRoomId, OwnedServerName, OwnedUserId};
use serde::{Deserialize, Serialize};

use crate::bundle::Blocked;

/// Why a room was not moved: nothing failed, the room or the move's own course kept it out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// The new account can't be seated there, whatever is tried.
    Blocked(Blocked),
    /// The old account is no longer in the room, or it no longer exists.
    Gone,
    /// The transfer was cancelled before this room's turn.
    NotStarted,
    /// The transfer was cancelled while this room waited (for a server, or its turn to try again).
    Interrupted,
    /// A received room that is not public, and no invite of `old` reached the new account.
    NeedsInvite { old: OwnedUserId },
    /// A reserved seat: `new` declined the invite.
    Declined { new: OwnedUserId },
    /// A reserved seat: `new` was banned from the room since.
    BannedSince { new: OwnedUserId },
    /// A reserved seat: `old` left the room before `new` joined, so it can't see whether it did.
    OldLeft { old: OwnedUserId, new: OwnedUserId },
    /// A reservation ended (`why`) before `new` took its seat; `withdrawn`: its invite was taken back.
    Reservation { why: Withdrawal, new: OwnedUserId, withdrawn: bool },
    /// Written by an earlier version, as a sentence.
    #[serde(untagged)]
    Legacy(String),
}

/// Why a room could not be moved this time: trying again may do it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailReason {
    /// `server` (the new account's) did not answer for `waited_secs`, so `new` was not invited.
    InviteUnanswered { server: OwnedServerName, waited_secs: u64, error: String, new: OwnedUserId },
    /// The homeserver refused the invite.
    Invite { error: String },
    /// The homeserver refused the join.
    Join { error: String },
    /// The servers a received room is reached through did not answer for `waited_secs`.
    Unreached { servers: Vec<OwnedServerName>, waited_secs: u64, error: String, room: OwnedRoomId },
    /// A reservation's invite of `new` could not be taken back.
    Withdraw { new: OwnedUserId, error: String },
    /// The room's stages stopped on an error: its text.
    Error(String),
    /// Written by an earlier version, as a sentence.
    #[serde(untagged)]
    Legacy(String),
}

impl FailReason {
    /// `waited` as it is kept: whole seconds, at least one.
    pub fn seconds(waited: Duration) -> u64 {
        waited.as_secs().max(1)
    }
}

/// Why a reservation's invites are withdrawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Withdrawal {
    Cancelled,
    Expired,
    Forgotten,
}

/// What an account step did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepDone {
    /// A merged setting: what the merge says it did (`merge` words its own summaries).
    Merged(String),
    /// Mentions of `old` notify the new account.
    OldMentions {
        old: OwnedUserId,
    },
    /// The bundle holds no key export.
    NoKeyExport,
    KeysDelivered,
    /// `import --history N` was not asked for.
    HistoryNotAsked,
    /// The bundle carries no history of the moved rooms.
    NoHistory,
    /// `messages` from `rooms` rooms handed over as the file `file`.
    HistoryDelivered {
        messages: usize,
        rooms: usize,
        file: String,
    },
    /// A reservation for `new`, on another server: its account steps are that server's, by plan.
    Reserved {
        new: OwnedUserId,
    },
    /// Nothing to do.
    Nothing,
    /// Written by an earlier version, as a sentence.
    #[serde(untagged)]
    Legacy(String),
}

/// Why an account step was not done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepFailure {
    /// The homeserver refused: its error's text.
    Homeserver(String),
    /// `new` is on another server: its account steps are that server's handoff's or its client's.
    Elsewhere { new: OwnedUserId },
    /// Written by an earlier version, as a sentence.
    #[serde(untagged)]
    Legacy(String),
}

#[cfg(test)]
mod tests {
    use super::super::{RoomStep, StepOutcome};
    use super::*;

    /// A journal written before the reasons were typed (sentences) still loads, as written.
    #[test]
    fn an_earlier_versions_sentences_still_read() {
        let skipped: RoomStep = serde_json::from_str(r#"{"step":"skipped","detail":"not reached: x"}"#).unwrap();
        assert_eq!(skipped, RoomStep::Skipped(SkipReason::Legacy("not reached: x".into())));
        let failed: RoomStep = serde_json::from_str(r#"{"step":"failed","detail":"joining failed: y"}"#).unwrap();
        assert_eq!(failed, RoomStep::Failed(FailReason::Legacy("joining failed: y".into())));
        let done: StepOutcome = serde_json::from_str(r#"{"outcome":"done","detail":"3 set"}"#).unwrap();
        assert_eq!(done, StepOutcome::Done(StepDone::Legacy("3 set".into())));
        let failed: StepOutcome = serde_json::from_str(r#"{"outcome":"failed","detail":"M_FORBIDDEN"}"#).unwrap();
        assert_eq!(failed, StepOutcome::Failed(StepFailure::Legacy("M_FORBIDDEN".into())));
    }

    /// Every typed reason goes through the journal and back as itself, a legacy sentence too.
    #[test]
    fn typed_reasons_round_trip() {
        let old: OwnedUserId = "@old:a.org".try_into().unwrap();
        let new: OwnedUserId = "@new:b.org".try_into().unwrap();
        let steps = [
            RoomStep::Skipped(SkipReason::NotStarted),
            RoomStep::Skipped(SkipReason::Blocked(Blocked::Banned)),
            RoomStep::Skipped(SkipReason::Reservation { why: Withdrawal::Expired, new: new.clone(), withdrawn: true }),
            RoomStep::Skipped(SkipReason::OldLeft { old: old.clone(), new: new.clone() }),
            RoomStep::Skipped(SkipReason::Legacy("the room is gone".into())),
            RoomStep::Failed(FailReason::Unreached {
                servers: vec!["b.org".try_into().unwrap()],
                waited_secs: 600,
                error: "no answer".into(),
                room: "!r:a.org".try_into().unwrap(),
            }),
            RoomStep::Failed(FailReason::Error("M_UNKNOWN".into())),
        ];
        for step in steps {
            let json = serde_json::to_string(&step).unwrap();
            assert_eq!(serde_json::from_str::<RoomStep>(&json).unwrap(), step, "{json}");
        }
        let outcomes = [
            StepOutcome::Done(StepDone::KeysDelivered),
            StepOutcome::Done(StepDone::HistoryDelivered { messages: 2, rooms: 1, file: "history.html".into() }),
            StepOutcome::Done(StepDone::Merged("nothing to set".into())),
            StepOutcome::Failed(StepFailure::Elsewhere { new }),
            StepOutcome::Failed(StepFailure::Homeserver("M_FORBIDDEN".into())),
        ];
        for outcome in outcomes {
            let json = serde_json::to_string(&outcome).unwrap();
            assert_eq!(serde_json::from_str::<StepOutcome>(&json).unwrap(), outcome, "{json}");
        }
    }
}
