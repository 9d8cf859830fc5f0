//! `accept`: on the new account, start the move another account offered it
//! (`export --to … --auto`). Nothing was written into this account before.

use super::{Args, Command, CommandError, Spec};
use crate::bot::consent::tell_old;
use crate::bot::door::{self, Entry, Refused, Ticket};
use crate::bot::state::{Bot, BotError, Ctx};
use crate::code::CodeHash;
use crate::config::PermissionLevel;
use crate::store::now_ms;
use crate::transfer::plan::Requirements;

pub const SPEC: Spec = Spec {
    name: "accept",
    usage: "accept",
    summary: "on the new account: start a move that another account offered you (export --to you --auto)",
    anywhere: false,
    permission: PermissionLevel::User,
    runs_long: false,
};

pub fn parse(args: Args) -> Result<Command, CommandError> {
    super::no_arguments(&SPEC, args)?;
    Ok(Command::Accept)
}

/// `accept`: the new account consents to the move offered to it; the transfer starts.
pub async fn run(bot: &Bot, ctx: &Ctx) -> Result<(), BotError> {
    let new = &ctx.sender;
    let Some(auto) = bot.store.auto_for(new).await? else {
        return bot.reply(ctx, "No move is waiting for your answer.".into()).await;
    };
    if auto.expires_at_ms <= now_ms() {
        bot.store.take_auto(new).await?;
        return bot.reply(ctx, format!("The move offered by {} lapsed; ask them to export again.", auto.old)).await;
    }
    let entry = Entry {
        old: auto.old.clone(),
        new: new.to_owned(),
        requirements: Requirements { max_rooms: Some(bot.config.handoff.max_rooms), ..Default::default() },
        profile: Default::default(),
        new_dm: ctx.room_id.clone(),
        old_dm: bot.store.dm_rooms_of(&auto.old).await?.into_iter().next(),
    };
    // The offer's code is redeemed under the door's lock: a second `accept` finds it used.
    match door::enter(bot, entry, Ticket::Offer(CodeHash(auto.code_hash))).await? {
        Ok(_) => {}
        Err(refused @ Refused::Busy(_)) => {
            return bot.reply(ctx, format!("{refused} The offer stays open until it lapses.")).await;
        }
        Err(refused) => return bot.reply(ctx, format!("This offer can't be used any more: {refused}")).await,
    }
    bot.reply(ctx, format!("Accepted: moving the rooms and settings of {} here; progress follows.", auto.old)).await?;
    tell_old(bot, &auto.old, ctx, format!("{new} accepted your move; it is running now.")).await
}
