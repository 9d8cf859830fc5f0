//! `finish [--leave] [--advertise]`: after a transfer, tidy up the old account.

use super::{Args, Command, CommandError, Spec};

pub const SPEC: Spec = Spec {
    name: "finish",
    usage: "finish [--leave] [--advertise]",
    summary: "on the old account, after a transfer: --leave the moved rooms (where the new account holds at least the same rank), --advertise the new user ID in the display name",
    anywhere: false,
};

pub fn parse(mut args: Args) -> Result<Command, CommandError> {
    let leave = args.flag("--leave");
    let advertise = args.flag("--advertise");
    args.finish().map_err(|message| CommandError::Usage { command: SPEC.name, usage: SPEC.usage, message })?;
    if !leave && !advertise {
        return Err(CommandError::Usage {
            command: SPEC.name,
            usage: SPEC.usage,
            message: "say what to do: --leave, --advertise, or both".into(),
        });
    }
    Ok(Command::Finish { leave, advertise })
}
