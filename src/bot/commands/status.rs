//! `status [@user]`: the current or last transfer, per room. An admin may name another account.

use ruma::OwnedUserId;

use super::{Args, Command, CommandError, Spec};
use crate::bot::consent::state_text;
use crate::bot::state::{Bot, BotError, Ctx};
use crate::config::PermissionLevel;
use crate::transfer::{RoomStep, TransferKind, watch};

pub const SPEC: Spec = Spec {
    name: "status",
    usage: "status [@user:server]",
    summary: "the current or last transfer: per-room state, counts, errors (admins: of any account)",
    anywhere: false,
    permission: PermissionLevel::User,
    runs_long: false,
};

pub fn parse(args: Args) -> Result<Command, CommandError> {
    Ok(Command::Status(super::optional_user(&SPEC, args)?))
}

pub async fn run(bot: &Bot, ctx: &Ctx, whom: Option<OwnedUserId>) -> Result<(), BotError> {
    let Some(user) = super::whose(bot, ctx, whom, "see") else {
        return bot.reply(ctx, super::ADMIN_ONLY.into()).await;
    };
    let Some(t) = bot.journal.latest_of(&user).await? else {
        let text = if user == ctx.sender {
            "You have no transfer yet. Start one with `export` on the old account and `import CODE` on the new one."
                .to_owned()
        } else {
            format!("{user} has no transfer.")
        };
        return bot.reply(ctx, text).await;
    };
    // A reservation's seats are looked at now: what `status` says is what is true.
    if watch::is_watched(&t)
        && let Err(e) = bot.engine.look_at_seats(t.id).await
    {
        tracing::warn!(transfer = t.id, error = %e, "cannot look at the reserved seats");
    }
    let t = bot.journal.get(t.id).await?.unwrap_or(t);
    let steps = bot.journal.room_steps(t.id).await?;
    let state = match bot.engine.place(t.id) {
        Some(place) => {
            let ahead = match place.ahead {
                0 => "it is next".to_owned(),
                1 => "1 move is ahead of it".to_owned(),
                n => format!("{n} moves are ahead of it"),
            };
            format!("waiting for its turn ({} moves running, {ahead}; it starts by itself)", place.running)
        }
        None => state_text(t.state).to_owned(),
    };
    let mut text = format!("Transfer {} → {}: {state}", t.old, t.new);
    if let Some(undo) = &t.undo {
        let done = undo.rooms.values().filter(|s| s.is_final()).count();
        text.push_str(&match undo.finished {
            true => "\nUndone (`undo`): its report is in the new account's DM.".to_owned(),
            false => format!("\nBeing undone (`undo`): {done} room(s) done so far."),
        });
    }
    if let Some(plan) = &t.plan {
        let count =
            |f: &dyn Fn(&RoomStep) -> bool| plan.rooms.iter().filter(|r| steps.get(&r.room_id).is_some_and(f)).count();
        if let Some(paced) = bot.engine.paced(t.id) {
            let reserved = count(&RoomStep::is_seated);
            text.push_str(&format!("\n{}", crate::wording::paced(&paced, reserved, plan.total())));
        }
        if let Some(awaited) = bot.engine.awaited(t.id) {
            let joined = count(&RoomStep::is_seated);
            text.push_str(&format!("\n{}", crate::wording::awaiting_invites(&awaited, &t.old, joined, plan.total())));
        }
        let done = count(&|s| *s == RoomStep::Done);
        let awaiting = count(&|s| *s == RoomStep::AwaitingAccept);
        let skipped = count(&|s| matches!(s, RoomStep::Skipped(_)));
        let failed = count(&|s| matches!(s, RoomStep::Failed(_)));
        let pending = plan.total() - done - awaiting - skipped - failed;
        text.push_str(&format!(
            "\n{} rooms: {done} moved, {awaiting} awaiting accept, {skipped} skipped, {failed} failed, {pending} to do",
            plan.total()
        ));
        // Rooms that need attention first; a long list is cut, `status` is a summary.
        let mut rooms: Vec<_> = plan.rooms.iter().collect();
        rooms.sort_by_key(|r| match steps.get(&r.room_id) {
            Some(RoomStep::Failed(_)) | Some(RoomStep::Skipped(_)) => 0,
            Some(RoomStep::AwaitingAccept) => 1,
            Some(RoomStep::Done) => 3,
            _ => 2,
        });
        const SHOWN: usize = 40;
        if rooms.len() > SHOWN {
            text.push_str(&format!("\n(the first {SHOWN} of {} rooms, those that need attention first)", rooms.len()));
        }
        for r in rooms.into_iter().take(SHOWN) {
            let label = r.name.clone().unwrap_or_else(|| r.room_id.to_string());
            let state = match steps.get(&r.room_id) {
                None | Some(RoomStep::Pending) => "to do".to_owned(),
                Some(RoomStep::Done) => "moved".to_owned(),
                Some(RoomStep::AwaitingAccept) if t.kind == TransferKind::Reserve => {
                    format!("reserved: {} joins when it imports the bundle file on its own server", t.new)
                }
                Some(RoomStep::AwaitingAccept) => "invited: accept it from your client".to_owned(),
                Some(RoomStep::Skipped(w)) => format!("skipped: {w}"),
                Some(RoomStep::Failed(w)) => format!("failed: {w}"),
                Some(other) => format!("in progress ({other:?})"),
            };
            text.push_str(&format!("\n• {label}: {state}"));
        }
    }
    bot.reply(ctx, text).await
}
