//! Chat commands: which messages are commands, and parsing them into typed [`Command`]s.
//!
//! One file per command (mini-redis style): each owns its parse and its help line.

pub mod approve;
mod args;
pub mod export;
pub mod finish;
pub mod forget;
pub mod help;
pub mod import;
pub mod keys;
pub mod simple;

pub use args::Args;

/// A parsed command, ready to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Help,
    Export(export::Export),
    Keys,
    Forget,
    Import(import::Import),
    /// `approve @importer`; `None` lists the pending imports instead.
    Approve(Option<ruma::OwnedUserId>),
    Deny(Option<ruma::OwnedUserId>),
    Accept,
    Decline,
    Status,
    Cancel,
    Finish {
        leave: bool,
        advertise: bool,
    },
}

impl Command {
    /// The command's [`Spec`]: its name, and where it may be used.
    pub fn spec(&self) -> &'static Spec {
        match self {
            Command::Help => &help::SPEC,
            Command::Export(_) => &export::SPEC,
            Command::Keys => &keys::SPEC,
            Command::Forget => &forget::SPEC,
            Command::Import(_) => &import::SPEC,
            Command::Approve(_) => &approve::APPROVE,
            Command::Deny(_) => &approve::DENY,
            Command::Accept => &simple::ACCEPT,
            Command::Decline => &simple::DECLINE,
            Command::Status => &simple::STATUS,
            Command::Cancel => &simple::CANCEL,
            Command::Finish { .. } => &finish::SPEC,
        }
    }
}

/// A command that exists: its name, usage and one-line explanation, for `help`.
pub struct Spec {
    pub name: &'static str,
    pub usage: &'static str,
    pub summary: &'static str,
    /// Whether it may be used outside the user's DM with the bot. Commands that show or take a
    /// code, a file or a transfer's details, or that change an account, only work in the DM:
    /// everyone in a group room would read the answer.
    pub anywhere: bool,
}

/// Every command the bot understands, in the order `help` lists them.
pub const COMMANDS: &[Spec] = &[
    help::SPEC,
    export::SPEC,
    keys::SPEC,
    import::SPEC,
    approve::APPROVE,
    approve::DENY,
    simple::ACCEPT,
    simple::DECLINE,
    simple::STATUS,
    simple::CANCEL,
    finish::SPEC,
    forget::SPEC,
];

/// Why a message that was meant as a command can't be run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("Unknown command `{given}`. Did you mean `{closest}`? Send `help` for the list of commands.")]
    Unknown { given: String, closest: &'static str },
    #[error("Empty command. Send `help` for the list of commands.")]
    Empty,
    #[error("Cannot read the command: {0}. Close your quotes, or escape them with a backslash.")]
    Quoting(String),
    #[error("{command}: {message}. Usage: `{usage}`")]
    Usage { command: &'static str, usage: &'static str, message: String },
}

/// Where a message was sent: in the user's DM with the bot commands are bare, elsewhere they need the prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    Dm,
    Group,
}

/// Returns `None` when the message is not addressed to the bot at all.
pub fn parse(body: &str, place: Place, prefix: &str) -> Option<Result<Command, CommandError>> {
    let body = body.trim();
    let text = match body.strip_prefix(prefix) {
        // "!handoffexport" is not the prefix followed by a command.
        Some(rest) if rest.is_empty() || rest.starts_with(char::is_whitespace) => rest,
        _ if place == Place::Dm => body,
        _ => return None,
    };
    Some(parse_command(text))
}

fn parse_command(text: &str) -> Result<Command, CommandError> {
    let words = shell_words::split(text).map_err(|e| CommandError::Quoting(e.to_string()))?;
    let Some((name, rest)) = words.split_first() else {
        return Err(CommandError::Empty);
    };
    let name = name.to_lowercase();
    let args = Args::new(rest.to_vec());
    match name.as_str() {
        "help" => help::parse(args),
        "export" => export::parse(args),
        "keys" => keys::parse(args),
        "forget" => forget::parse(args),
        "import" => import::parse(args),
        "approve" => approve::parse(&approve::APPROVE, args),
        "deny" => approve::parse(&approve::DENY, args),
        "accept" => simple::parse(&simple::ACCEPT, Command::Accept, args),
        "decline" => simple::parse(&simple::DECLINE, Command::Decline, args),
        "status" => simple::parse(&simple::STATUS, Command::Status, args),
        "cancel" => simple::parse(&simple::CANCEL, Command::Cancel, args),
        "finish" => finish::parse(args),
        _ => Err(CommandError::Unknown { closest: closest(&name), given: name }),
    }
}

/// The existing command nearest to what was typed.
fn closest(given: &str) -> &'static str {
    COMMANDS
        .iter()
        .map(|c| c.name)
        .min_by_key(|name| strsim::damerau_levenshtein(given, name))
        .expect("at least one command exists")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_in_dm_prefixed_elsewhere() {
        assert_eq!(parse("help", Place::Dm, "!handoff"), Some(Ok(Command::Help)));
        assert_eq!(parse("  !handoff help ", Place::Dm, "!handoff"), Some(Ok(Command::Help)));
        assert_eq!(parse("help", Place::Group, "!handoff"), None);
        assert_eq!(parse("!handoff HELP", Place::Group, "!handoff"), Some(Ok(Command::Help)));
        assert_eq!(parse("!handoffhelp", Place::Group, "!handoff"), None);
        assert_eq!(parse("hello everyone", Place::Group, "!handoff"), None);
    }

    #[test]
    fn unknown_command_names_the_closest() {
        let err = parse("hepl", Place::Dm, "!h").unwrap().unwrap_err();
        assert_eq!(err, CommandError::Unknown { given: "hepl".into(), closest: "help" });
        assert!(err.to_string().contains("Did you mean `help`?"));
    }

    #[test]
    fn empty_and_badly_quoted() {
        assert_eq!(parse("!h", Place::Group, "!h"), Some(Err(CommandError::Empty)));
        assert!(matches!(parse("help \"open", Place::Dm, "!h"), Some(Err(CommandError::Quoting(_)))));
    }

    #[test]
    fn help_takes_no_arguments() {
        let err = parse("help me", Place::Dm, "!h").unwrap().unwrap_err();
        assert!(err.to_string().contains("unexpected argument `me`"), "{err}");
    }
}
