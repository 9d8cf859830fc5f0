//! `forget`: delete every bundle and code handoff holds about the sender.

use super::{Args, Command, CommandError, Spec};

pub const SPEC: Spec = Spec {
    name: "forget",
    usage: "forget",
    summary: "delete every bundle, code and record handoff holds about you",
    anywhere: false,
};

pub fn parse(args: Args) -> Result<Command, CommandError> {
    args.finish().map_err(|message| CommandError::Usage { command: SPEC.name, usage: SPEC.usage, message })?;
    Ok(Command::Forget)
}
