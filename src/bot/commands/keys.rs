//! `keys`: show the key export attached to the latest bundle. Dropping an Element key-export file
//! into the DM attaches it (the bot sees the file, not this command).

use super::{Args, Command, CommandError, Spec};

pub const SPEC: Spec = Spec {
    name: "keys",
    usage: "keys",
    summary: "show the encryption-key export attached to your bundle; drop an Element key-export file here to attach one",
    anywhere: false,
};

pub fn parse(args: Args) -> Result<Command, CommandError> {
    args.finish().map_err(|message| CommandError::Usage { command: SPEC.name, usage: SPEC.usage, message })?;
    Ok(Command::Keys)
}

/// How to make a key export, for users who have none attached.
pub const HOW_TO: &str = "To carry your encryption keys, export them from your current client \
(Element: Settings → Encryption → Export keys; choose a passphrase you will remember) and drop the \
file into this DM. handoff never sees your passphrase and cannot read the keys; the new account \
imports the file with the same passphrase.";
