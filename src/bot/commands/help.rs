//! `help`: the commands, each with a one-line explanation.

use ruma::events::room::message::RoomMessageEventContent;

use super::{Args, COMMANDS, Command, CommandError, Spec};
use crate::bot::state::{Bot, BotError, Ctx};
use crate::config::PermissionLevel;
use crate::html::escape;

pub const SPEC: Spec = Spec {
    name: "help",
    usage: "help",
    summary: "show the commands and what they do",
    anywhere: true,
    permission: PermissionLevel::User,
    runs_long: false,
};

pub fn parse(args: Args) -> Result<Command, CommandError> {
    super::no_arguments(&SPEC, args)?;
    Ok(Command::Help)
}

pub async fn run(bot: &Bot, ctx: &Ctx) -> Result<(), BotError> {
    let (plain, html) = text(&bot.config.handoff.command_prefix);
    bot.send_notice(ctx, 0, RoomMessageEventContent::notice_html(plain, html)).await
}

/// The help text, plain and HTML. `prefix` is shown for use outside the DM.
pub fn text(prefix: &str) -> (String, String) {
    let mut plain = String::from(
        "handoff moves your Matrix life (rooms, DMs, contacts, preferences, keys) to another client or account.\n\
         Commands, sent here in this DM (codes, files and transfer details are only shown here; \
         in other rooms only ",
    );
    plain.push_str(prefix);
    plain.push_str(" help works):\n");
    let mut html = format!(
        "<p>handoff moves your Matrix life (rooms, DMs, contacts, preferences, keys) to another client or account.</p>\
         <p>Commands, sent here in this DM (codes, files and transfer details are only shown here; in other rooms only <code>{} help</code> works):</p><ul>",
        escape(prefix)
    );
    for c in COMMANDS {
        plain.push_str(&format!("• {} — {}\n", c.usage, c.summary));
        html.push_str(&format!("<li><code>{}</code> — {}</li>", escape(c.usage), escape(c.summary)));
    }
    html.push_str("</ul>");
    (plain.trim_end().to_owned(), html)
}
