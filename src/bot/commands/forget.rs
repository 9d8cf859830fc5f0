//! `forget`: delete every bundle and code handoff holds about the sender.

use super::{Args, Command, CommandError, Spec};
use crate::bot::state::{Bot, BotError, Ctx};
use crate::config::PermissionLevel;

pub const SPEC: Spec = Spec {
    name: "forget",
    usage: "forget",
    summary: "delete every bundle, code and record handoff holds about you",
    anywhere: false,
    permission: PermissionLevel::User,
    runs_long: false,
};

pub fn parse(args: Args) -> Result<Command, CommandError> {
    super::no_arguments(&SPEC, args)?;
    Ok(Command::Forget)
}

/// Stops the user's transfers, then deletes every record about them.
pub async fn run(bot: &Bot, ctx: &Ctx) -> Result<(), BotError> {
    let user = &ctx.sender;
    let transfers = bot.journal.of(user).await?;
    for t in transfers.iter().filter(|t| !t.state.is_finished()) {
        // A running transfer would write its journal again after the records are gone.
        bot.engine.stop(t.id);
    }
    // A reservation of this account's seats takes back the invites not taken (in the background,
    // from what its journal says before it goes).
    for t in transfers.iter().filter(|t| t.old == *user) {
        if let Err(e) = bot.engine.withdraw_forgotten(t).await {
            tracing::warn!(transfer = t.id, error = %e, "cannot withdraw a forgotten reservation's invites");
        }
    }
    bot.wrong_codes.forget(user);
    let forgotten = match bot.store.forget(user).await {
        Ok(gone) => bot.journal.forget(user).await.map(|transfers| (gone, transfers)),
        Err(e) => Err(e),
    };
    let text = match forgotten {
        Ok((gone, transfers)) => format!(
            "Deleted {} bundle(s), {} transfer code(s), {} transfer record(s) and {} offer(s); any transfer of yours that was running was stopped. handoff now holds nothing about you but the fact that this room is your DM with it.",
            gone.bundles, gone.codes, transfers, gone.offers
        ),
        Err(e) => {
            tracing::error!(error = ?e, "forget failed");
            "Deleting your data failed on the server's side; nothing was reported as deleted. Try again, or tell the server admin.".to_owned()
        }
    };
    bot.reply(ctx, text).await
}
