//! `cancel [@user]`: stop the running transfer after the rooms in flight. An admin may cancel
//! another account's transfer.

use ruma::OwnedUserId;

use super::{Args, Command, CommandError, Spec};
use crate::bot::consent::state_text;
use crate::bot::state::{Bot, BotError, Ctx};
use crate::config::PermissionLevel;
use crate::transfer::{TransferState, Withdrawal, watch};

pub const SPEC: Spec = Spec {
    name: "cancel",
    usage: "cancel [@user:server]",
    summary: "stop a running transfer after the rooms in flight; what is done stays done (admins: of any account)",
    anywhere: false,
    permission: PermissionLevel::User,
    runs_long: false,
};

pub fn parse(args: Args) -> Result<Command, CommandError> {
    Ok(Command::Cancel(super::optional_user(&SPEC, args)?))
}

pub async fn run(bot: &Bot, ctx: &Ctx, whom: Option<OwnedUserId>) -> Result<(), BotError> {
    let Some(user) = super::whose(bot, ctx, whom, "cancel") else {
        return bot.reply(ctx, super::ADMIN_ONLY.into()).await;
    };
    let records = bot.records.lock().await;
    let Some(latest) = bot.journal.latest_of(&user).await? else {
        drop(records);
        return bot.reply(ctx, "You have no transfer to cancel.".into()).await;
    };
    // Changed in place: the running engine writes the same record (its plan, its progress).
    let mut was = latest.state;
    let mut reserved = false;
    let t = bot
        .journal
        .update(latest.id, |t| {
            was = t.state;
            // A finished reservation whose seats still wait is called off: that ends its watch.
            reserved = watch::is_watched(t);
            t.state = match t.state {
                TransferState::Running => TransferState::Cancelling,
                TransferState::AwaitingApproval => TransferState::Cancelled,
                TransferState::Done if reserved => TransferState::Cancelled,
                other => other,
            };
        })
        .await?
        .unwrap_or(latest);
    let text = match was {
        TransferState::Done if reserved => {
            bot.engine.withdraw_later(t.id, Withdrawal::Cancelled);
            format!(
                "Cancelled your reservation for {}: the invites not taken yet are being withdrawn. Rooms {} has joined already keep it.",
                t.new, t.new
            )
        }
        TransferState::Running => {
            if bot.engine.cancel(t.id) {
                "Cancelled before its turn came: nothing was changed.".to_owned()
            } else {
                "Stopping after the rooms in flight. What is done stays done.".to_owned()
            }
        }
        TransferState::AwaitingApproval => "Cancelled before it started: nothing was changed.".to_owned(),
        other => format!("The last transfer is already {}.", state_text(other)),
    };
    drop(records);
    if user != ctx.sender {
        tracing::info!(admin = %ctx.sender, user = %user, transfer = t.id, "an admin cancelled a transfer");
    }
    bot.reply(ctx, text).await
}
