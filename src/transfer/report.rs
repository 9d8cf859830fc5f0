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
            if let Some((_, reason)) = t.ranks_refused.iter().find(|(room, _)| *room == r.room_id) {
                report.warnings.push((label(r), Warning::RankRefused { reason: reason.clone() }));
            }
        }
        report
    }
}

/// A room's name, or its ID when it has none.
pub fn label(r: &RoomPlan) -> String {
    r.name.clone().unwrap_or_else(|| r.room_id.to_string())
}

#[cfg(test)]
mod tests {
    use ruma::{owned_room_id, owned_user_id};

    use super::*;
    use crate::bundle::{BundleId, Priority, RoomKind};
    use crate::transfer::plan::Action;

    /// A rank the plan meant to give but the homeserver refused at the move is named in the
    /// report, with the homeserver's words, beside the rooms' planned warnings.
    #[test]
    fn a_rank_refused_at_the_move_is_named_in_the_report() {
        let (old, new) = (owned_user_id!("@old:example.org"), owned_user_id!("@new:example.org"));
        let mut t = Transfer::new(
            1,
            old.clone(),
            new.clone(),
            BundleId::new(&old, 1),
            Default::default(),
            owned_room_id!("!dm:example.org"),
            None,
        );
        let room = |id: &str, name: &str| RoomPlan {
            room_id: id.try_into().unwrap(),
            via: vec![],
            name: Some(name.into()),
            kind: RoomKind::Group,
            priority: Priority::Normal,
            action: Action::Join,
            give_level: Some(50.into()),
            warnings: vec![],
        };
        let plan = Plan {
            old,
            new,
            rooms: vec![room("!a:example.org", "Ranked"), room("!b:example.org", "Refused")],
            unplanned: vec![],
            left_out: 0,
        };
        t.ranks_refused.push((owned_room_id!("!b:example.org"), "M_FORBIDDEN: You don't have permission".into()));
        let steps = plan.rooms.iter().map(|r| (r.room_id.clone(), RoomStep::Done)).collect();
        let report = Report::new(&t, &plan, &steps, false);
        assert_eq!(report.moved, 2, "a refused rank stops no room");
        assert_eq!(report.warnings.len(), 1);
        let (label, warning) = &report.warnings[0];
        assert_eq!(label, "Refused");
        assert!(warning.explain().contains("could not be given: M_FORBIDDEN"), "{}", warning.explain());
    }
}
