//! `approve @importer` / `deny @importer`: the old account's answer to a pending import of an
//! unbound code. The importer is named, so several pending imports are never answered at once.

use ruma::OwnedUserId;

use super::{Args, Command, CommandError, Spec};
use crate::bot::consent::pending_for;
use crate::bot::door::{self, Refused};
use crate::bot::state::{Bot, BotError, Ctx};
use crate::config::PermissionLevel;

pub const APPROVE: Spec = Spec {
    name: "approve",
    usage: "approve @importer:server",
    summary: "on the old account: let the named account's pending import go ahead",
    anywhere: false,
    permission: PermissionLevel::User,
    runs_long: false,
};
pub const DENY: Spec = Spec {
    name: "deny",
    usage: "deny @importer:server",
    summary: "on the old account: refuse the named account's pending import",
    anywhere: false,
    permission: PermissionLevel::User,
    runs_long: false,
};

/// Parses the importer's user ID; a bare `approve` is allowed and answered with the list of
/// pending imports, so the user learns which names to give.
pub fn parse(spec: &'static Spec, mut args: Args) -> Result<Command, CommandError> {
    let usage = |message: String| CommandError::Usage { command: spec.name, usage: spec.usage, message };
    let importer = match args.positional() {
        Some(u) => Some(OwnedUserId::try_from(u.as_str()).map_err(|_| {
            usage(format!("name the importing account by its full user ID such as @new:example.org, not `{u}`"))
        })?),
        None => None,
    };
    args.finish().map_err(usage)?;
    Ok(if spec.name == APPROVE.name { Command::Approve(importer) } else { Command::Deny(importer) })
}

/// `approve @importer` (`yes`) or `deny @importer`.
pub async fn run(bot: &Bot, ctx: &Ctx, importer: Option<OwnedUserId>, yes: bool) -> Result<(), BotError> {
    let verb = if yes { "approve" } else { "deny" };
    let Some(importer) = importer else {
        let text = match pending_for(bot, &ctx.sender).await?.as_slice() {
            [] => "No import is waiting for your approval.".to_owned(),
            list => format!(
                "Name the account: `{verb} @account:server`. Waiting for your answer: {}.",
                list.iter().map(|t| t.new.to_string()).collect::<Vec<_>>().join(", ")
            ),
        };
        return bot.reply(ctx, text).await;
    };
    let t = match door::answer(bot, &ctx.sender, &importer, yes).await? {
        Ok(t) => t,
        Err(Refused::NotWaiting) => {
            let text =
                format!("No import by {importer} is waiting for your approval (it may have lapsed with its code).");
            return bot.reply(ctx, text).await;
        }
        Err(refused) => {
            return bot.reply(ctx, format!("{refused} The request stays open until its code expires.")).await;
        }
    };
    let to_new = Ctx { room_id: t.new_dm.clone(), event_id: ctx.event_id.clone(), sender: t.new.clone() };
    if yes {
        bot.reply_n(&to_new, 6, format!("{} approved the import. Moving rooms now; progress follows.", t.old)).await?;
        bot.reply(ctx, format!("Approved: moving your rooms to {}.", t.new)).await
    } else {
        bot.reply_n(&to_new, 6, format!("{} refused the import. Nothing was changed.", t.old)).await?;
        bot.reply(ctx, format!("Refused: nothing goes to {}.", t.new)).await
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Place, parse as parse_command};
    use super::*;

    #[test]
    fn approve_names_the_importer() {
        let p = |t: &str| parse_command(t, Place::Dm, "!h").unwrap();
        assert_eq!(p("approve @bob:x.org"), Ok(Command::Approve(Some("@bob:x.org".try_into().unwrap()))));
        assert_eq!(p("deny @bob:x.org"), Ok(Command::Deny(Some("@bob:x.org".try_into().unwrap()))));
        assert_eq!(p("approve"), Ok(Command::Approve(None)));
        assert!(p("approve bob").unwrap_err().to_string().contains("full user ID"));
        assert!(p("approve @a:x.org @b:x.org").unwrap_err().to_string().contains("unexpected argument"));
    }
}
