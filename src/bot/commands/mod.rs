//! Chat commands: which messages are commands, parsing them into typed [`Command`]s, and
//! running them.
//!
//! One file per command (mini-redis style): each owns its [`Spec`] (name, usage, help line, who
//! may use it, where, and whether it runs long), its parse and its handler, `run`.

pub mod accept;
pub mod approve;
mod args;
pub mod cancel;
pub mod decline;
pub mod export;
pub mod finish;
pub mod forget;
pub mod help;
pub mod import;
pub mod keys;
pub mod status;
pub mod undo;

use std::sync::Arc;

use ruma::OwnedUserId;

pub use args::Args;

use crate::bot::state::{Bot, BotError, Ctx};
use crate::config::PermissionLevel;
use crate::metrics::{self, CommandOutcome};

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
    /// `status [@user]`: someone else's only for admins.
    Status(Option<OwnedUserId>),
    Cancel(Option<OwnedUserId>),
    Finish {
        leave: bool,
        advertise: bool,
    },
    Undo(undo::Undo),
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
            Command::Accept => &accept::SPEC,
            Command::Decline => &decline::SPEC,
            Command::Status(_) => &status::SPEC,
            Command::Cancel(_) => &cancel::SPEC,
            Command::Finish { .. } => &finish::SPEC,
            Command::Undo(_) => &undo::SPEC,
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
    /// Who may use it (`handoff.permissions`).
    pub permission: PermissionLevel,
    /// Whether it runs in the background: the user's next commands don't wait for it.
    pub runs_long: bool,
}

/// Every command the bot understands, in the order `help` lists them.
pub const COMMANDS: &[Spec] = &[
    help::SPEC,
    export::SPEC,
    keys::SPEC,
    import::SPEC,
    approve::APPROVE,
    approve::DENY,
    accept::SPEC,
    decline::SPEC,
    status::SPEC,
    cancel::SPEC,
    finish::SPEC,
    undo::SPEC,
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
        "accept" => accept::parse(args),
        "decline" => decline::parse(args),
        "status" => status::parse(args),
        "cancel" => cancel::parse(args),
        "finish" => finish::parse(args),
        "undo" => undo::parse(args),
        _ => Err(CommandError::Unknown { closest: closest(&name), given: name }),
    }
}

/// Runs a command for a user permitted to use it, in the right place. A command that runs long is
/// run in the background; its failure is answered there.
pub async fn run(bot: &Arc<Bot>, ctx: &Ctx, command: Command) -> Result<(), BotError> {
    let spec = command.spec();
    if bot.config.permission(&ctx.sender) < spec.permission {
        metrics::command(spec.name, CommandOutcome::Refused);
        return bot.reply(ctx, format!("`{}` is for handoff admins only.", spec.name)).await;
    }
    if !spec.runs_long {
        let outcome = handle(bot, ctx, command).await;
        metrics::command(spec.name, if outcome.is_ok() { CommandOutcome::Ok } else { CommandOutcome::Failed });
        return outcome;
    }
    let (bot, ctx) = (Arc::clone(bot), ctx.clone());
    bot.shutdown.clone().spawn(async move {
        let (inner, ctx2) = (Arc::clone(&bot), ctx.clone());
        // In a task of its own, so a panic is answered like an error.
        let outcome = tokio::spawn(async move { handle(&inner, &ctx2, command).await }).await;
        let ok = matches!(outcome, Ok(Ok(())));
        metrics::command(spec.name, if ok { CommandOutcome::Ok } else { CommandOutcome::Failed });
        let failure = match outcome {
            Ok(Ok(())) => return,
            Ok(Err(e)) => {
                tracing::warn!(command = spec.name, error = ?e, "command failed");
                e.to_string()
            }
            Err(e) => {
                tracing::error!(command = spec.name, task = %e.id(), "command panicked");
                "an internal error (the server's log has the details)".to_owned()
            }
        };
        let text = format!("`{}` failed: {failure}. Nothing was kept; try again.", spec.name);
        if let Err(e) = bot.reply_n(&ctx, 9, text).await {
            tracing::warn!(error = ?e, "cannot report a failure");
        }
    });
    Ok(())
}

async fn handle(bot: &Bot, ctx: &Ctx, command: Command) -> Result<(), BotError> {
    match command {
        Command::Help => help::run(bot, ctx).await,
        Command::Export(args) => export::run(bot, ctx, args).await,
        Command::Keys => keys::run(bot, ctx).await,
        Command::Forget => forget::run(bot, ctx).await,
        Command::Import(args) => import::run(bot, ctx, args).await,
        Command::Approve(who) => approve::run(bot, ctx, who, true).await,
        Command::Deny(who) => approve::run(bot, ctx, who, false).await,
        Command::Accept => accept::run(bot, ctx).await,
        Command::Decline => decline::run(bot, ctx).await,
        Command::Status(whom) => status::run(bot, ctx, whom).await,
        Command::Cancel(whom) => cancel::run(bot, ctx, whom).await,
        Command::Finish { leave, advertise } => finish::run(bot, ctx, leave, advertise).await,
        Command::Undo(args) => undo::run(bot, ctx, args).await,
    }
}

/// What a user is told when they name another account in a command only admins may aim at others.
pub const ADMIN_ONLY: &str =
    "Only a handoff admin can name another account here; without a name, the command is about your own.";

/// The account a command is about: the sender's own, or (for an admin) the one named. `None` when
/// a user who is not an admin names someone else.
pub fn whose(bot: &Bot, ctx: &Ctx, named: Option<OwnedUserId>, verb: &str) -> Option<OwnedUserId> {
    match named {
        None => Some(ctx.sender.clone()),
        Some(user) if user == ctx.sender => Some(user),
        Some(user) if bot.config.permission(&ctx.sender) >= PermissionLevel::Admin => {
            tracing::info!(admin = %ctx.sender, user = %user, verb, "admin command about another account");
            Some(user)
        }
        Some(_) => None,
    }
}

/// Parses a command that takes no arguments.
pub fn no_arguments(spec: &'static Spec, args: Args) -> Result<(), CommandError> {
    args.finish().map_err(|message| CommandError::Usage { command: spec.name, usage: spec.usage, message })
}

/// Parses an optional full user ID (`status @user`).
pub fn optional_user(spec: &'static Spec, mut args: Args) -> Result<Option<OwnedUserId>, CommandError> {
    let usage = |message: String| CommandError::Usage { command: spec.name, usage: spec.usage, message };
    let user =
        match args.positional() {
            Some(u) => Some(OwnedUserId::try_from(u.as_str()).map_err(|_| {
                usage(format!("name the account by its full user ID such as @you:example.org, not `{u}`"))
            })?),
            None => None,
        };
    args.finish().map_err(usage)?;
    Ok(user)
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
