//! Commands without options: `approve`, `deny`, `status`, `cancel`.

use super::{Args, Command, CommandError, Spec};

pub const APPROVE: Spec =
    Spec { name: "approve", usage: "approve", summary: "on the old account: let a pending import go ahead" };
pub const DENY: Spec = Spec { name: "deny", usage: "deny", summary: "on the old account: refuse a pending import" };
pub const STATUS: Spec =
    Spec { name: "status", usage: "status", summary: "the current or last transfer: per-room state, counts, errors" };
pub const CANCEL: Spec = Spec {
    name: "cancel",
    usage: "cancel",
    summary: "stop a running transfer after the rooms in flight; what is done stays done",
};

pub fn parse(spec: &'static Spec, command: Command, args: Args) -> Result<Command, CommandError> {
    args.finish().map_err(|message| CommandError::Usage { command: spec.name, usage: spec.usage, message })?;
    Ok(command)
}
