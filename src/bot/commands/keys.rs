//! `keys`: show the key export attached to the latest bundle. Dropping an Element key-export file
//! into the DM attaches it (the bot sees the file, not this command).

use super::{Args, Command, CommandError, Spec};
use crate::bot::state::{Bot, BotError, Ctx};
use crate::config::PermissionLevel;

pub const SPEC: Spec = Spec {
    name: "keys",
    usage: "keys",
    summary: "show the encryption-key export attached to your bundle; drop an Element key-export file here to attach one",
    anywhere: false,
    permission: PermissionLevel::User,
    runs_long: false,
};

pub fn parse(args: Args) -> Result<Command, CommandError> {
    super::no_arguments(&SPEC, args)?;
    Ok(Command::Keys)
}

/// How to make a key export, for users who have none attached.
pub const HOW_TO: &str = "To carry your encryption keys, export them from your current client \
(Element: Settings → Encryption → Export keys; choose a passphrase you will remember) and drop the \
file into this DM. handoff never sees your passphrase and cannot read the keys; the new account \
imports the file with the same passphrase.";

pub async fn run(bot: &Bot, ctx: &Ctx) -> Result<(), BotError> {
    let text = match bot.store.latest_bundle(&ctx.sender).await? {
        Some((_, record)) => match &record.bundle.room_keys {
            Some(k) => format!(
                "Your latest bundle carries a key export: {} bytes of encrypted keys ({} PBKDF2 rounds).",
                k.encrypted_len, k.rounds
            ),
            None => format!("Your latest bundle carries no key export. {HOW_TO}"),
        },
        None => format!("You have no bundle yet: send `export` first. {HOW_TO}"),
    };
    bot.reply(ctx, text).await
}
