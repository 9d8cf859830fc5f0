//! What a transfer did, room by room and step by step, from its journal: the data of the final
//! report (the bot words it).

use std::collections::BTreeMap;

use ruma::{OwnedRoomId, OwnedUserId};

use super::plan::{Plan, RoomPlan, Warning};
use super::{AccountStep, FailReason, RoomStep, SkipReason, StepOutcome, Transfer, TransferKind};

#[derive(Debug, Clone)]
pub struct Report {
    pub new: OwnedUserId,
    pub total: usize,
    pub moved: usize,
    /// Left invited: a remote new account accepts from its client.
    pub awaiting: usize,
    /// Room label and why.
    pub skipped: Vec<(String, SkipReason)>,
    pub failed: Vec<(String, FailReason)>,
    pub warnings: Vec<(String, Warning)>,
    pub account: Vec<(AccountStep, StepOutcome)>,
    /// Rooms of the bundle left out by the import options.
    pub left_out: usize,
    pub cancelled: bool,
    pub kind: TransferKind,
    /// What the bundle's border left out of it.
    pub dropped: Vec<crate::bundle::border::Dropped>,
}

impl Report {
    pub fn new(t: &Transfer, plan: &Plan, steps: &BTreeMap<OwnedRoomId, RoomStep>, cancelled: bool) -> Report {
        let mut report = Report {
            new: t.new.clone(),
            total: plan.total(),
            moved: 0,
            awaiting: 0,
            skipped: vec![],
            failed: vec![],
            warnings: vec![],
            account: t.account_steps.iter().map(|(k, v)| (*k, v.clone())).collect(),
            left_out: plan.left_out,
            cancelled,
            kind: t.kind,
            dropped: t.dropped.clone(),
        };
        for r in &plan.rooms {
            match steps.get(&r.room_id) {
                Some(RoomStep::Done) => report.moved += 1,
                Some(RoomStep::AwaitingAccept) => report.awaiting += 1,
                Some(RoomStep::Skipped(why)) => report.skipped.push((label(r), why.clone())),
                Some(RoomStep::Failed(why)) => report.failed.push((label(r), why.clone())),
                _ => {}
            }
            report.warnings.extend(r.warnings.iter().map(|w| (label(r), w.clone())));
        }
        report
    }
}

/// A room's name, or its ID when it has none.
pub fn label(r: &RoomPlan) -> String {
    r.name.clone().unwrap_or_else(|| r.room_id.to_string())
}
