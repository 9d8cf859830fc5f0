//! `undo [--dry-run] [--all]`: on the account a move wrote into, take the move back: leave the
//! rooms it joined (rank lowered, tags off, its notices redacted) and put back the settings it
//! changed, each only where it still holds what the move wrote. On the old account: rejoin the
//! rooms `finish --leave` left, or withdraw a reservation's invites not taken yet.

use ruma::api::client::profile::{get_profile, set_profile_field};
use ruma::profile::ProfileFieldValue;

use super::{Args, Command, CommandError, Spec};
use crate::bot::state::{Bot, BotError, Ctx};
use crate::config::PermissionLevel;
use crate::transfer::undo::{self, Kept, Refusal, RoomUndo, UndoPlan, UndoReport};
use crate::transfer::{Transfer, engine, watch};

pub const SPEC: Spec = Spec {
    name: "undo",
    usage: "undo [--dry-run] [--all]",
    summary: "on the new account: take your last move back (leave the rooms it joined, put your settings back); --dry-run shows what would change, --all leaves rooms you wrote in since too; on the old account after `finish --leave`: rejoin the rooms it left; after `export --to` another server: withdraw the invites not taken yet",
    anywhere: false,
    permission: PermissionLevel::User,
    runs_long: true,
};

/// `undo`'s arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Undo {
    pub dry_run: bool,
    pub all: bool,
}

pub fn parse(mut args: Args) -> Result<Command, CommandError> {
    let dry_run = args.flag("--dry-run");
    let all = args.flag("--all");
    args.finish().map_err(|message| CommandError::Usage { command: SPEC.name, usage: SPEC.usage, message })?;
    Ok(Command::Undo(Undo { dry_run, all }))
}

pub async fn run(bot: &Bot, ctx: &Ctx, args: Undo) -> Result<(), BotError> {
    let user = &ctx.sender;
    let records = bot.journal.of(user).await?;
    // The old account of a move it left rooms of with `finish --leave`, later than any move into
    // it: its `undo` rejoins them.
    let into = records.iter().rev().find(|t| undo::may_undo(t, user)).map(|t| t.id);
    let left = records.iter().rev().find(|t| &t.old == user && !t.left_at_finish.is_empty());
    if let Some(t) = left.filter(|t| into.is_none_or(|id| t.id > id)) {
        return rejoin(bot, ctx, t, args.dry_run).await;
    }
    // The old account's last transfer, a reservation for an account on another server whose
    // seats still wait: its undo withdraws the invites not taken yet, as `cancel` does.
    if let Some(t) = records.last().filter(|t| &t.old == user && watch::is_watched(t)) {
        if args.dry_run {
            let text = format!(
                "Undoing your reservation for {} would withdraw the invites it has not taken yet. Rooms it has joined keep it (its own server's `undo`, on that account, leaves them).\n\nNothing was changed. Send `undo` to do it.",
                t.new
            );
            return bot.reply(ctx, text).await;
        }
        return super::cancel::run(bot, ctx, None).await;
    }
    // The account a move wrote into, and only it: an admin can't take someone else's move back.
    let latest = records.into_iter().rev().find(|t| undo::may_undo(t, user));
    let Some(t) = latest else {
        return bot.reply(ctx, "You have no move into this account to undo.".into()).await;
    };
    if let Some(refusal) = undo::refusal(&t, user, bot.config.handoff.bundle_retention) {
        return bot.reply(ctx, refusal_text(&t, refusal)).await;
    }
    if args.dry_run {
        let plan = bot.engine.undo_plan(&t, args.all).await?;
        return bot.reply(ctx, plan_text(&t, &plan)).await;
    }
    // Recorded under the records' lock, so two `undo`s (or an `undo` and a restart) start one.
    let records = bot.records.lock().await;
    let mut refused = None;
    bot.journal
        .update(t.id, |t| {
            refused = undo::refusal(t, user, bot.config.handoff.bundle_retention);
            if refused.is_none() {
                t.undo = Some(engine::begin_undo(args.all));
            }
        })
        .await?;
    drop(records);
    if let Some(refusal) = refused {
        return bot.reply(ctx, refusal_text(&t, refusal)).await;
    }
    tracing::info!(transfer = t.id, user = %user, all = args.all, "undo asked");
    bot.engine.spawn_undo(t.id);
    Ok(())
}

/// The old account's `undo` after `finish --leave`: rejoins by ID the rooms it left, through
/// its own server, the new account's and the servers the bundle names; takes the "moved to" off
/// its display name if `finish --advertise` put it there.
async fn rejoin(bot: &Bot, ctx: &Ctx, t: &Transfer, dry_run: bool) -> Result<(), BotError> {
    let old = &t.old;
    if dry_run {
        let names: Vec<String> = t.left_at_finish.iter().map(|r| name(t, r)).collect();
        let text = format!(
            "Undoing `finish --leave` would rejoin the {} room(s) you left: {}.\n\nNothing was changed. Send `undo` to do it.",
            names.len(),
            names.join(", ")
        );
        return bot.reply(ctx, text).await;
    }
    let bundle = bot.store.get_bundle(&t.bundle).await?.map(|b| b.bundle);
    let (mut rejoined, mut not) = (Vec::new(), Vec::new());
    for room in &t.left_at_finish {
        let mut via = vec![old.server_name().to_owned()];
        if t.new.server_name() != old.server_name() {
            via.push(t.new.server_name().to_owned());
        }
        if let Some(entry) = bundle.as_ref().and_then(|b| b.rooms.iter().find(|e| &e.room_id == room)) {
            for server in &entry.via {
                if !via.contains(server) {
                    via.push(server.clone());
                }
            }
        }
        match crate::transfer::room::join(&bot.acting, old, room, &via).await {
            Ok(()) => rejoined.push(room.clone()),
            Err(e) if e.is_transient() => return Err(e.into()),
            Err(e) => not.push(format!("• {}: {e}", name(t, room))),
        }
    }
    // What is still left waits for the next `undo` (after an invite, say).
    bot.journal.update(t.id, |t| t.left_at_finish.retain(|r| !rejoined.contains(r))).await?;
    let mut text = format!(
        "Rejoined {} of the {} room(s) you left with `finish --leave`.",
        rejoined.len(),
        t.left_at_finish.len()
    );
    if !not.is_empty() {
        text.push_str(&format!(
            "\n\nNot rejoined (a room that needs an invite now: ask a member, such as {}, to invite you, then send `undo` again):\n{}",
            t.new,
            not.join("\n")
        ));
    }
    // `finish --advertise`'s "moved to" comes off the display name.
    let profile = bot.acting.send_as(old, get_profile::v3::Request::new(old.clone())).await?;
    let shown = profile.get("displayname").and_then(serde_json::Value::as_str).unwrap_or_default();
    if let Some(base) = shown.strip_suffix(&format!(" (moved to {})", t.new)) {
        let req = set_profile_field::v3::Request::new(old.clone(), ProfileFieldValue::DisplayName(base.to_owned()));
        bot.acting.send_as(old, req).await?;
        text.push_str(&format!("\n\nYour display name is “{base}” again."));
    }
    bot.reply(ctx, text).await
}

fn refusal_text(t: &Transfer, refusal: Refusal) -> String {
    match refusal {
        Refusal::NotYours => "Only the account a move wrote into can undo it.".into(),
        Refusal::Running => "Your move is still running: `cancel` it first, then `undo` what it did.".into(),
        Refusal::NothingDone => "Your last move changed nothing: there is nothing to undo.".into(),
        Refusal::Expired => {
            "Your last move is older than this server keeps moves (`handoff.bundle_retention`): it can't be undone any more.".into()
        }
        Refusal::Undone => format!("Your move from {} was undone already.", t.old),
        Refusal::Undoing => format!("Your move from {} is being undone: its report follows here.", t.old),
    }
}

fn name<'a>(t: &'a Transfer, room: &'a ruma::RoomId) -> String {
    let named = t.plan.as_ref().and_then(|p| p.rooms.iter().find(|r| r.room_id == room)).and_then(|r| r.name.clone());
    named.unwrap_or_else(|| room.to_string())
}

/// `undo --dry-run`: what an undo would do now.
fn plan_text(t: &Transfer, plan: &UndoPlan) -> String {
    let mut out = format!(
        "Undoing your move from {} would leave {} room(s) it joined (taking off the tags it set, redacting its notices, lowering the rank it gave first).",
        t.old,
        plan.leaving()
    );
    let kept: Vec<String> = plan
        .rooms
        .iter()
        .filter_map(|(room, named, what)| match what {
            RoomUndo::Kept(Kept::NotMoved) | RoomUndo::Leave { .. } => None,
            RoomUndo::Kept(why) => {
                Some(format!("• {}: {}", named.clone().unwrap_or_else(|| room.to_string()), why.text("`undo --all`")))
            }
        })
        .collect();
    if !kept.is_empty() {
        out.push_str(&format!("\n\nRooms that would stay:\n{}", kept.join("\n")));
    }
    match &plan.settings {
        None => out.push_str("\n\nYour settings would stay as they are: the move's bundle is gone, so what it wrote can't be told apart from your own."),
        Some(s) => {
            let (back, kept) = s.names();
            if !back.is_empty() {
                out.push_str(&format!("\n\nSettings that would go back to what you had before: {}.", back.join(", ")));
            }
            if !kept.is_empty() {
                out.push_str(&format!("\n\nSettings you changed since the move, which would stay: {}.", kept.join(", ")));
            }
        }
    }
    out.push_str("\n\nNothing was changed. Send `undo` to do it.");
    out
}

/// The report of an undo, for the new account's DM.
pub fn report_text(t: &Transfer, r: &UndoReport) -> String {
    let mut out = format!(
        "Your move from {} is undone: left {} room(s), redacted {} move notice(s).",
        t.old,
        r.left.len(),
        r.redacted
    );
    let s = &r.settings;
    if !s.restored.is_empty() {
        out.push_str(&format!("\n\nPut back as you had them before the move: {}.", s.restored.join(", ")));
    }
    if !s.kept.is_empty() {
        out.push_str(&format!("\n\nKept, changed since the move: {}.", s.kept.join(", ")));
    }
    if !s.failed.is_empty() {
        out.push_str(&format!("\n\nCould not put back: {}.", s.failed.join(", ")));
    }
    if !r.kept.is_empty() {
        out.push_str("\n\nRooms you stay in:");
        for (room, why) in &r.kept {
            out.push_str(&format!("\n• {}: {}", name(t, room), why.text("`undo --all`")));
        }
    }
    if !r.rank_kept.is_empty() {
        out.push_str(
            "\n\nLeft, but the rank the move gave stays in the room's power levels (a room admin can remove it):",
        );
        for (room, why) in &r.rank_kept {
            out.push_str(&format!("\n• {}: {why}", name(t, room)));
        }
    }
    if !r.failed.is_empty() {
        out.push_str("\n\nNot left:");
        for (room, why) in &r.failed {
            out.push_str(&format!("\n• {}: {why}", name(t, room)));
        }
    }
    if r.notices_by_old {
        out.push_str(&format!("\n\nThe move notices were posted as {}: they are its messages, and stay.", t.old));
    }
    out.push_str("\n\nMessages you sent in the rooms are not deleted.");
    out
}
