//! `decline`: on the new account, refuse a move offered to it; its code is destroyed.

use super::{Args, Command, CommandError, Spec};
use crate::bot::consent::tell_old;
use crate::bot::state::{Bot, BotError, Ctx};
use crate::code::CodeHash;
use crate::config::PermissionLevel;

pub const SPEC: Spec = Spec {
    name: "decline",
    usage: "decline",
    summary: "on the new account: refuse a move offered to you; nothing is changed",
    anywhere: false,
    permission: PermissionLevel::User,
    runs_long: false,
};

pub fn parse(args: Args) -> Result<Command, CommandError> {
    super::no_arguments(&SPEC, args)?;
    Ok(Command::Decline)
}

/// `decline`: the new account refuses the offered move; its code is destroyed.
pub async fn run(bot: &Bot, ctx: &Ctx) -> Result<(), BotError> {
    let new = &ctx.sender;
    let records = bot.records.lock().await;
    let Some(auto) = bot.store.take_auto(new).await? else {
        drop(records);
        return bot.reply(ctx, "No move is waiting for your answer.".into()).await;
    };
    bot.store.remove_code(&CodeHash(auto.code_hash)).await?;
    drop(records);
    tracing::info!(old = %auto.old, new = %new, "offered move declined");
    bot.reply(ctx, format!("Declined: nothing of {} comes here, and this account was not changed.", auto.old)).await?;
    tell_old(
        bot,
        &auto.old,
        ctx,
        format!("{new} declined your move. Nothing was changed there, and the code no longer works."),
    )
    .await
}
