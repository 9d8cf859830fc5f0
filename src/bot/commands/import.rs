//! `import CODE [--only favourites|dms|rooms] [--max-rooms N] [--profile mobile|desktop] [--profile-from-old] [--dry-run]`:
//! redeem a transfer code on the new account; the options are the second client's requirements.
//! (`--profile` is the second client's kind; `--profile-from-old` takes the old display name and
//! avatar over the account's own.)

use super::{Args, Command, CommandError, Spec};
use crate::bot::door::{self, Entry, Refused, Ticket};
use crate::bot::receive;
use crate::bot::state::{Bot, BotError, Ctx, WRONG_CODE_LIMIT};
use crate::bundle::Only;
use crate::code::RedeemError;
use crate::code::TransferCode;
use crate::config::PermissionLevel;
use crate::transfer::ClientProfile;
use crate::transfer::merge::PROFILE_FROM_OLD;
use crate::transfer::plan::{self, Requirements};

pub const SPEC: Spec = Spec {
    name: "import",
    usage: "import CODE [--only favourites|dms|rooms] [--max-rooms N] [--history N] [--profile mobile|desktop] [--profile-from-old] [--dry-run]",
    summary: "on the new account: move the bundle of a transfer code here (--dry-run shows the plan and changes nothing); this account keeps a display name and avatar of its own unless --profile-from-old",
    anywhere: false,
    permission: PermissionLevel::User,
    runs_long: false,
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Import {
    pub code: TransferCode,
    pub only: Option<Only>,
    pub max_rooms: Option<usize>,
    /// Deliver up to N captured messages per room (as a file in the DM).
    pub history: usize,
    pub profile: ClientProfile,
    /// Take the old display name and avatar even where this account has its own.
    pub profile_from_old: bool,
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
    let profile_from_old = args.flag(PROFILE_FROM_OLD);
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
    Ok(Command::Import(Import {
        code,
        only,
        max_rooms,
        history,
        profile: profile.unwrap_or_default(),
        profile_from_old,
        dry_run,
    }))
}

pub async fn run(bot: &Bot, ctx: &Ctx, args: Import) -> Result<(), BotError> {
    let new = &ctx.sender;
    if bot.wrong_codes.recent(new) >= WRONG_CODE_LIMIT {
        return bot.reply(ctx, "Too many wrong codes: wait ten minutes before trying again.".into()).await;
    }
    let hash = args.code.hash();
    // The server's limit applies whatever the importer asks for.
    let max_rooms = Some(args.max_rooms.map_or(bot.config.handoff.max_rooms, |m| m.min(bot.config.handoff.max_rooms)));
    let requirements =
        Requirements { only: args.only, max_rooms, history: args.history, profile_from_old: args.profile_from_old };
    // Look before using the code up: a dry run, or the same account, leaves it valid.
    let record = match bot.store.peek_code(&hash, new).await? {
        Ok(r) => r,
        Err(RedeemError::NotFound) => {
            // Not one of this server's codes: perhaps the code of a bundle file from another server.
            if receive::import_file(bot, ctx, &args.code, args.dry_run, args.profile, requirements).await? {
                return Ok(());
            }
            bot.wrong_codes.record(new);
            return bot.reply(ctx, format!("{}. If the code came with a bundle file from another server, drop the file here first, then send `import CODE` again.", RedeemError::NotFound)).await;
        }
        Err(e) => return bot.reply(ctx, format!("{e}.")).await,
    };
    let old = record.owner.clone();
    if &old == new {
        return bot
            .reply(ctx, "That code belongs to this same account: its rooms and settings are already here. A new client of the same account only needs to log in.".into())
            .await;
    }
    let Some(stored) = bot.store.get_bundle(&record.bundle).await? else {
        return bot.reply(ctx, "The bundle of this code is gone (deleted with `forget`, or past its retention). Ask for a new one with `export`.".into()).await;
    };
    if args.dry_run {
        let plan = bot.engine.preview(&stored.bundle, new, &requirements).await?;
        let text = format!(
            "Dry run: nothing was changed, and the code is still valid.\n{}\n{} to join, {} already joined, {} blocked, {} gone.",
            plan.table(),
            plan.count(|a| *a == plan::Action::Join),
            plan.count(|a| *a == plan::Action::AlreadyJoined),
            plan.count(|a| matches!(a, plan::Action::Blocked(_))),
            plan.count(|a| *a == plan::Action::Gone),
        );
        return bot.reply(ctx, text).await;
    }
    let old_dm = bot.store.dm_rooms_of(&old).await?.into_iter().next();
    let entry = Entry {
        old: old.clone(),
        new: new.clone(),
        requirements,
        profile: args.profile,
        new_dm: ctx.room_id.clone(),
        old_dm: old_dm.clone(),
    };
    let t = match door::enter(bot, entry, Ticket::Code(hash)).await? {
        Ok(entered) if entered.running => {
            let n = stored.bundle.rooms.len();
            let text = match bot.engine.place(entered.transfer.id) {
                // Its place follows in a message of its own (also after a restart or an approval).
                Some(_) => {
                    format!("The code is good. Your move of {n} rooms from {old} waits for its turn: see below.")
                }
                None => format!("The code is good. Moving {n} rooms from {old} here; progress follows."),
            };
            return bot.reply(ctx, text).await;
        }
        Ok(entered) => entered.transfer,
        Err(refused @ Refused::Busy(_)) => return bot.reply(ctx, format!("{refused} The code is still valid.")).await,
        // Redeemed by a concurrent import in between.
        Err(refused) => return bot.reply(ctx, refused.to_string()).await,
    };
    let Some(old_dm) = old_dm else {
        return bot
            .reply(ctx, format!("{old} must approve this import, but has no DM with the handoff bot. Ask them to start one and export again with `export --to {new}`."))
            .await;
    };
    let prompt = format!(
        "{new} wants to import your bundle (client profile: {}). Send `approve {new}` to let it go ahead, or `deny {new}` to refuse. Without an answer the request lapses when the code expires.",
        t.profile
    );
    let prompt_ctx = Ctx { room_id: old_dm, event_id: ctx.event_id.clone(), sender: old.clone() };
    bot.reply_n(&prompt_ctx, 5, prompt).await?;
    bot.reply(ctx, format!("The code is good. {old} has been asked to approve; the move starts as soon as they do."))
        .await
}

#[cfg(test)]
mod tests {
    use super::super::{Place, parse as parse_command};
    use super::*;

    fn import(text: &str) -> Import {
        match parse_command(text, Place::Dm, "!h").unwrap() {
            Ok(Command::Import(i)) => i,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_old_profile_is_asked_for_apart_from_the_client_profile() {
        let code = TransferCode::generate().display();
        let i = import(&format!("import {code} --profile mobile --profile-from-old"));
        assert_eq!((i.profile, i.profile_from_old), (ClientProfile::Mobile, true));
        let i = import(&format!("import {code} --profile-from-old"));
        assert_eq!((i.profile, i.profile_from_old), (ClientProfile::Desktop, true));
        assert!(!import(&format!("import {code}")).profile_from_old);
    }
}
