//! `import CODE [--only favourites|dms|rooms] [--max-rooms N] [--profile mobile|desktop] [--dry-run]`:
//! redeem a transfer code on the new account; the options are the second client's requirements.

use super::{Args, Command, CommandError, Spec};
use crate::bundle::Only;
use crate::code::TransferCode;
use crate::transfer::ClientProfile;

pub const SPEC: Spec = Spec {
    name: "import",
    usage: "import CODE [--only favourites|dms|rooms] [--max-rooms N] [--history N] [--profile mobile|desktop] [--dry-run]",
    summary: "on the new account: move the bundle of a transfer code here (--dry-run shows the plan and changes nothing)",
    anywhere: false,
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Import {
    pub code: TransferCode,
    pub only: Option<Only>,
    pub max_rooms: Option<usize>,
    /// Deliver up to N captured messages per room (as a file in the DM).
    pub history: usize,
    pub profile: ClientProfile,
    pub dry_run: bool,
}

pub fn parse(mut args: Args) -> Result<Command, CommandError> {
    let usage = |message: String| CommandError::Usage { command: SPEC.name, usage: SPEC.usage, message };
    let only = args.option("--only").map_err(usage)?.map(|o| o.parse()).transpose().map_err(usage)?;
    let max_rooms = match args.option("--max-rooms").map_err(usage)? {
        Some(n) => Some(
            n.parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| usage(format!("`--max-rooms` takes a number above 0, not `{n}`")))?,
        ),
        None => None,
    };
    let history = match args.option("--history").map_err(usage)? {
        Some(n) => n.parse::<usize>().map_err(|_| usage(format!("`--history` takes a number, not `{n}`")))?,
        None => 0,
    };
    let profile = args.option("--profile").map_err(usage)?.map(|p| p.parse()).transpose().map_err(usage)?;
    let dry_run = args.flag("--dry-run");
    // The code may have been pasted with spaces between its groups: take every remaining word.
    let mut words = Vec::new();
    while let Some(w) = args.positional() {
        words.push(w);
    }
    args.finish().map_err(usage)?;
    if words.is_empty() {
        return Err(usage("give the transfer code that `export` showed on the old account".into()));
    }
    let code = TransferCode::parse(&words.join("")).map_err(|e| usage(e.to_string()))?;
    Ok(Command::Import(Import { code, only, max_rooms, history, profile: profile.unwrap_or_default(), dry_run }))
}
