//! `accept`: on the new account, start the move another account offered it
//! (`export --to … --auto`). Nothing was written into this account before.

use super::{Args, Command, CommandError, Spec};
use crate::bot::consent::{start_refusal, tell_old};
use crate::bot::state::{Bot, BotError, Ctx};
use crate::code::CodeHash;
use crate::config::PermissionLevel;
use crate::store::now_ms;
use crate::transfer::Transfer;
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
    let records = bot.records.lock().await;
    let Some(auto) = bot.store.auto_for(new)? else {
        drop(records);
        return bot.reply(ctx, "No move is waiting for your answer.".into()).await;
    };
    if auto.expires_at_ms <= now_ms() {
        bot.store.take_auto(new).await?;
        drop(records);
        return bot.reply(ctx, format!("The move offered by {} lapsed; ask them to export again.", auto.old)).await;
    }
    if let Some(refusal) = start_refusal(bot, &auto.old, new)? {
        drop(records);
        return bot.reply(ctx, format!("{refusal} The offer stays open until it lapses.")).await;
    }
    let record = match bot.store.redeem_code(&CodeHash(auto.code_hash), new).await? {
        Ok(r) => r,
        Err(e) => {
            bot.store.take_auto(new).await?;
            drop(records);
            return bot.reply(ctx, format!("This offer can't be used any more: {e}.")).await;
        }
    };
    bot.store.take_auto(new).await?;
    let requirements = Requirements { max_rooms: Some(bot.config.handoff.max_rooms), ..Default::default() };
    let old_dm = bot.store.dm_rooms_of(&auto.old)?.into_iter().next();
    let id = bot.journal.new_id()?;
    let t =
        Transfer::new(id, auto.old.clone(), new.to_owned(), record.bundle, requirements, ctx.room_id.clone(), old_dm);
    bot.journal.put(&t).await?;
    drop(records);
    bot.engine.spawn(t.id);
    tracing::info!(transfer = t.id, old = %auto.old, new = %new, "offered move accepted");
    bot.reply(ctx, format!("Accepted: moving the rooms and settings of {} here; progress follows.", auto.old)).await?;
    tell_old(bot, &auto.old, ctx, format!("{new} accepted your move; it is running now.")).await
}
