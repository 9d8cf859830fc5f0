//! `finish [--leave] [--advertise]`: after a transfer, tidy up the old account.

use ruma::api::client::membership::leave_room;
use ruma::api::client::profile::{get_profile, set_profile_field};
use ruma::events::room::member::MembershipState;
use ruma::profile::ProfileFieldValue;
use ruma::{RoomId, UserId};
use serde_json::Value as JsonValue;

use super::{Args, Command, CommandError, Spec};
use crate::bot::state::{Bot, BotError, Ctx};
use crate::config::PermissionLevel;
use crate::homeserver::HsError;
use crate::transfer::{RoomStep, TransferState, world};

pub const SPEC: Spec = Spec {
    name: "finish",
    usage: "finish [--leave] [--advertise]",
    summary: "on the old account, after a transfer: --leave the moved rooms (where the new account holds at least the same rank), --advertise the new user ID in the display name",
    anywhere: false,
    permission: PermissionLevel::User,
    runs_long: false,
};

pub fn parse(mut args: Args) -> Result<Command, CommandError> {
    let leave = args.flag("--leave");
    let advertise = args.flag("--advertise");
    args.finish().map_err(|message| CommandError::Usage { command: SPEC.name, usage: SPEC.usage, message })?;
    if !leave && !advertise {
        return Err(CommandError::Usage {
            command: SPEC.name,
            usage: SPEC.usage,
            message: "say what to do: --leave, --advertise, or both".into(),
        });
    }
    Ok(Command::Finish { leave, advertise })
}

pub async fn run(bot: &Bot, ctx: &Ctx, leave: bool, advertise: bool) -> Result<(), BotError> {
    let old = &ctx.sender;
    let latest = bot.journal.of(old).await?.into_iter().rev().find(|t| &t.old == old && t.state == TransferState::Done);
    let Some(t) = latest else {
        return bot
            .reply(ctx, "`finish` is for the old account after a completed transfer; there is none.".into())
            .await;
    };
    let mut lines = Vec::new();
    if leave {
        let steps = bot.journal.room_steps(t.id).await?;
        let (mut left, mut kept) = (0, Vec::new());
        for (room, step) in &steps {
            if *step != RoomStep::Done {
                continue;
            }
            match safe_to_leave(bot, room, old, &t.new).await {
                Ok(true) => {
                    let mut req = leave_room::v3::Request::new(room.clone());
                    req.reason = Some(format!("moved to {}", t.new));
                    bot.acting.send_as(old, req).await?;
                    // For the old account's `undo`, which rejoins what it left.
                    bot.journal
                        .update(t.id, |t| {
                            if !t.left_at_finish.contains(room) {
                                t.left_at_finish.push(room.clone());
                            }
                        })
                        .await?;
                    left += 1;
                }
                Ok(false) => kept.push(room.to_string()),
                Err(e) => kept.push(format!("{room} ({e})")),
            }
        }
        lines.push(format!("Left {left} room(s)."));
        if !kept.is_empty() {
            lines.push(format!(
                "Stayed in {} room(s) where {} is not joined with at least the same rank: {}",
                kept.len(),
                t.new,
                kept.join(", ")
            ));
        }
    }
    if advertise {
        let profile = bot.acting.send_as(old, get_profile::v3::Request::new(old.clone())).await?;
        let name = profile.get("displayname").and_then(JsonValue::as_str).unwrap_or(old.localpart()).to_owned();
        let base = name.split(" (moved to ").next().unwrap_or(&name).to_owned();
        let new_name = format!("{base} (moved to {})", t.new);
        let req = set_profile_field::v3::Request::new(old.clone(), ProfileFieldValue::DisplayName(new_name.clone()));
        bot.acting.send_as(old, req).await?;
        lines.push(format!("Your display name is now “{new_name}”."));
    }
    bot.reply(ctx, lines.join("\n")).await
}

/// The new account is joined and holds at least the old account's rank (a room-version-12
/// creator's rank can't be matched, so its creator stays).
async fn safe_to_leave(bot: &Bot, room: &RoomId, old: &UserId, new: &UserId) -> Result<bool, HsError> {
    let Some(facts) = world::room_facts(&bot.acting, old, new, &room.to_owned()).await? else {
        return Ok(false);
    };
    if facts.new_membership != Some(MembershipState::Join) {
        return Ok(false);
    }
    let pl = facts.power_levels();
    Ok(pl.for_user(new) >= pl.for_user(old))
}
