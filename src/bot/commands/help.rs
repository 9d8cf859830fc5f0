//! `help`: the commands, each with a one-line explanation.

use super::{Args, COMMANDS, Command, CommandError, Spec};
use crate::html::escape;

pub const SPEC: Spec =
    Spec { name: "help", usage: "help", summary: "show the commands and what they do", anywhere: true };

pub fn parse(args: Args) -> Result<Command, CommandError> {
    args.finish().map_err(|message| CommandError::Usage { command: SPEC.name, usage: SPEC.usage, message })?;
    Ok(Command::Help)
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
