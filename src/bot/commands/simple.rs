//! Commands without options: `status`, `cancel`, `accept`, `decline`.

use super::{Args, Command, CommandError, Spec};

pub const STATUS: Spec = Spec {
    name: "status",
    usage: "status",
    summary: "the current or last transfer: per-room state, counts, errors",
    anywhere: false,
};
pub const CANCEL: Spec = Spec {
    name: "cancel",
    usage: "cancel",
    summary: "stop a running transfer after the rooms in flight; what is done stays done",
    anywhere: false,
};
pub const ACCEPT: Spec = Spec {
    name: "accept",
    usage: "accept",
    summary: "on the new account: start a move that another account offered you (export --to you --auto)",
    anywhere: false,
};
pub const DECLINE: Spec = Spec {
    name: "decline",
    usage: "decline",
    summary: "on the new account: refuse a move offered to you; nothing is changed",
    anywhere: false,
};

pub fn parse(spec: &'static Spec, command: Command, args: Args) -> Result<Command, CommandError> {
    args.finish().map_err(|message| CommandError::Usage { command: spec.name, usage: spec.usage, message })?;
    Ok(command)
}
