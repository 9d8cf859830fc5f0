//! `export [--to @new:server] [--only favourites|dms|rooms] [--exclude ROOM]… [--history N] [--file]`:
//! capture the sender's account into a bundle and hand back a one-time transfer code.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use ruma::events::room::message::RoomMessageEventContent;
use ruma::{MilliSecondsSinceUnixEpoch, OwnedRoomId, OwnedUserId, UInt, UserId};

use super::{Args, Command, CommandError, Spec};
use crate::bot::door::{self, Entry, Ticket};
use crate::bot::state::{Bot, BotError, Ctx};
use crate::bundle::capture::{self, CaptureOptions};
use crate::bundle::file;
use crate::bundle::{Blocked, BundleId, Only, Recipient};
use crate::code::CodeRecord;
use crate::code::TransferCode;
use crate::config::PermissionLevel;
use crate::html::{escape, to_html};
use crate::store::{AutoStart, MAX_BUNDLES_PER_USER, now_ms};
use crate::transfer::plan::{Action, Plan, Requirements};

pub const SPEC: Spec = Spec {
    name: "export",
    usage: "export [--to @new:server [--auto]] [--only favourites|dms|rooms] [--exclude ROOM]… [--history N] [--file]",
    summary: "capture this account (rooms, DMs, contacts, preferences, profile) and get a one-time transfer code",
    anywhere: false,
    permission: PermissionLevel::User,
    // Capturing a large account takes minutes: the user's `status` or `cancel` must not wait.
    runs_long: true,
};

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Export {
    pub to: Option<OwnedUserId>,
    pub only: Option<Only>,
    pub exclude: Vec<String>,
    pub history: Option<usize>,
    pub file: bool,
    /// Start the transfer as soon as the `--to` account becomes active.
    pub auto: bool,
}

pub fn parse(mut args: Args) -> Result<Command, CommandError> {
    let usage = |message: String| CommandError::Usage { command: SPEC.name, usage: SPEC.usage, message };
    let to = match args.option("--to").map_err(usage)? {
        Some(t) => Some(
            OwnedUserId::try_from(t.as_str())
                .map_err(|_| usage(format!("`--to` takes a full user ID such as @you:example.org, not `{t}`")))?,
        ),
        None => None,
    };
    let only = args.option("--only").map_err(usage)?.map(|o| o.parse()).transpose().map_err(usage)?;
    let exclude = args.options("--exclude").map_err(usage)?;
    for e in &exclude {
        if !e.starts_with('!') && !e.starts_with('#') {
            return Err(usage(format!("`--exclude` takes a room ID (!…) or alias (#…), not `{e}`")));
        }
    }
    let history = match args.option("--history").map_err(usage)? {
        Some(n) => Some(n.parse::<usize>().map_err(|_| usage(format!("`--history` takes a number, not `{n}`")))?),
        None => None,
    };
    let file = args.flag("--file");
    let auto = args.flag("--auto");
    args.finish().map_err(usage)?;
    if auto && to.is_none() {
        return Err(usage("`--auto` needs `--to`: the account whose first activity starts the transfer".into()));
    }
    Ok(Command::Export(Export { to, only, exclude, history, file, auto }))
}

/// Checks an `export`, then captures (it runs in the background: the dispatcher knows it runs
/// long). One export per user at a time.
pub async fn run(bot: &Bot, ctx: &Ctx, args: Export) -> Result<(), BotError> {
    if let Some(refusal) = refusal(bot, ctx, &args).await? {
        return bot.reply(ctx, refusal).await;
    }
    let Some(_capturing) = Capturing::start(bot, &ctx.sender) else {
        return bot
            .reply(ctx, "Your previous `export` is still capturing your account; wait for its answer.".into())
            .await;
    };
    capture(bot, ctx, args).await
}

/// An export in progress for one user; its end (however it ends) lets the next one start.
struct Capturing<'a> {
    bot: &'a Bot,
    user: OwnedUserId,
}

impl<'a> Capturing<'a> {
    fn start(bot: &'a Bot, user: &UserId) -> Option<Capturing<'a>> {
        bot.exports.lock().expect("lock").insert(user.to_owned()).then(|| Capturing { bot, user: user.to_owned() })
    }
}

impl Drop for Capturing<'_> {
    fn drop(&mut self) {
        self.bot.exports.lock().expect("lock").remove(&self.user);
    }
}

/// Why this export can't go ahead, if it can't: whose consent a `--to` would need and can't get.
async fn refusal(bot: &Bot, ctx: &Ctx, args: &Export) -> Result<Option<String>, BotError> {
    let config = &bot.config;
    if ctx.sender.server_name() != config.homeserver.domain {
        return Ok(Some(format!(
            "handoff here can only capture accounts on {}. Use the handoff of your own server, or the `handoff export` command line tool.",
            config.homeserver.domain
        )));
    }
    let max_history = config.handoff.history_messages;
    if args.history.unwrap_or(0) > max_history {
        return Ok(Some(format!(
            "`--history` can be at most {max_history} on this server (handoff.history_messages)."
        )));
    }
    let Some(to) = &args.to else { return Ok(None) };
    if to == &ctx.sender {
        return Ok(Some(
            "`--to` names the account that receives your rooms; it can't be this same account. A new client of the same account only needs to log in.".into(),
        ));
    }
    let remote = to.server_name() != config.homeserver.domain;
    if remote && args.auto {
        return Ok(Some(format!(
            "`--auto` starts a move when the account first signs in here, and {to} is on another server. Use `export --to {to} --file`: {to} drops the file into a DM with their own server's handoff bot and sends `import CODE` there."
        )));
    }
    // A remote account is never acted for here: its own server's handoff imports the file.
    if !remote && config.permission(to) < PermissionLevel::User {
        return Ok(Some(format!(
            "{to} may not use handoff on this server, so it could never accept or import this move."
        )));
    }
    // Checked before capturing (to spare the work), and again under the lock when the offer is stored.
    if args.auto && offered_by_another(bot, to, &ctx.sender).await? {
        return Ok(Some(offer_taken(to)));
    }
    Ok(None)
}

/// Whether `to` holds a pending offer from another account than `old`: it is never replaced.
async fn offered_by_another(bot: &Bot, to: &UserId, old: &UserId) -> Result<bool, BotError> {
    let existing = bot.store.auto_for(to).await?;
    Ok(existing.is_some_and(|e| e.old != old && e.expires_at_ms > now_ms()))
}

fn offer_taken(to: &UserId) -> String {
    format!(
        "Another account already offered {to} a move that is still pending; yours can't replace it. Try again after it expires, or use `export --to {to}` without `--auto` and send the code yourself."
    )
}

async fn capture(bot: &Bot, ctx: &Ctx, args: Export) -> Result<(), BotError> {
    let config = &bot.config;
    let history = args.history.unwrap_or(0);
    bot.reply_n(ctx, 0, "Capturing your account…".into()).await?;

    let opts = CaptureOptions {
        only: args.only,
        exclude: args.exclude.clone(),
        skip: bot.store.dm_rooms_of(&ctx.sender).await.unwrap_or_default(),
        history,
        pool: bot.engine.pool(),
        max_rooms: config.handoff.max_rooms,
        client: format!("handoff-bot {}", env!("CARGO_PKG_VERSION")),
    };
    let captured = capture::capture(&bot.acting, &ctx.sender, &config.homeserver.address, &opts).await?;
    let mut bundle = captured.bundle;
    let ttl = config.handoff.code_ttl;
    let expires_at_ms = now_ms() + ttl.as_millis() as u64;
    // An account on another server gets its seats reserved: planned now, before anything is
    // stored, so the bundle can say where no seat will wait (that server's import then expects
    // no invite there).
    let remote = args.to.as_ref().filter(|to| to.server_name() != config.homeserver.domain);
    let reservation = match remote {
        Some(to) => {
            let requirements = Requirements { max_rooms: Some(config.handoff.max_rooms), ..Default::default() };
            let plan = bot.engine.preview(&bundle, to, &requirements).await?;
            Some((to.clone(), requirements, plan))
        }
        None => None,
    };
    let unreserved: BTreeMap<OwnedRoomId, Blocked> = reservation
        .iter()
        .flat_map(|(_, _, plan)| &plan.rooms)
        .filter_map(|r| match r.action {
            Action::Blocked(b) => Some((r.room_id.clone(), b)),
            _ => None,
        })
        .collect();
    // Inside the bundle (and so the file) too: another server's handoff reads whom it is for.
    bundle.recipient = args.to.clone().map(|user_id| Recipient {
        user_id,
        expires_at: MilliSecondsSinceUnixEpoch(UInt::new_saturating(expires_at_ms)),
        unreserved,
    });
    let summary = bundle.summary();
    let id = bot.store.put_bundle(&ctx.sender, &bundle).await?;
    let trimmed = bot.store.trim_bundles(&ctx.sender, MAX_BUNDLES_PER_USER).await?;
    let code = TransferCode::generate();
    let record = CodeRecord {
        owner: ctx.sender.clone(),
        bundle: id.clone(),
        expires_at_ms,
        bound_to: args.to.clone(),
        redeemed_by: None,
    };
    bot.store.put_code(&code.hash(), &record).await?;
    if args.auto
        && let Some(to) = &args.to
    {
        let auto = AutoStart {
            old: ctx.sender.clone(),
            new: to.clone(),
            code_hash: code.hash().0,
            expires_at_ms: record.expires_at_ms,
            offered_in: None,
        };
        // Checked again under the lock: someone else's pending offer is never replaced.
        let records = bot.records.lock().await;
        if offered_by_another(bot, to, &ctx.sender).await? {
            drop(records);
            return bot.reply_n(ctx, 1, offer_taken(to)).await;
        }
        bot.store.put_auto(&auto).await?;
    }
    tracing::info!(user = %ctx.sender, rooms = summary.rooms, "bundle captured and stored");

    let expires = humantime::format_rfc3339_seconds(SystemTime::now() + ttl);
    let bound = match &args.to {
        Some(to) if args.auto => format!(
            "Only {to} can use it. As soon as {to} is first active (signs in, or writes to the handoff bot), the bot asks {to} in a DM whether to accept the move; nothing changes there before {to} answers `accept`."
        ),
        Some(to) if to.server_name() != config.homeserver.domain && args.file => format!(
            "Only {to} can use it. {to} is on another server: send them the file below and the code; they drop the file into a DM with the handoff bot of {} and send `import CODE` there.",
            to.server_name()
        ),
        Some(to) if to.server_name() != config.homeserver.domain => format!(
            "Only {to} can use it. {to} is on another server: without `--file` they can only accept your invites from their client; `export --to {to} --file` also carries tags, DMs and settings."
        ),
        Some(to) => format!("Only {to} can use it."),
        None => "Any account can use it; you will be asked to approve the import.".to_owned(),
    };
    let mut notes = String::new();
    if captured.left_out > 0 {
        notes.push_str(&format!(
            "\n{} more room(s) were not captured: this server moves at most {} rooms at a time (handoff.max_rooms), the most important first.",
            captured.left_out, config.handoff.max_rooms
        ));
    }
    if trimmed > 0 {
        notes.push_str(&format!(
            "\nYour {trimmed} oldest bundle(s) were deleted, with their codes: handoff keeps at most {MAX_BUNDLES_PER_USER} per account."
        ));
    }
    let plain = format!(
        "Captured your account.\n{}{notes}\n\nYour transfer code (one use, expires in {} at {expires}):\n{}\n\n{bound} On the new account, send `import CODE` to the handoff bot.",
        summary,
        humantime::format_duration(Duration::from_secs(ttl.as_secs())),
        code.display(),
    );
    let notes_html = if notes.is_empty() { String::new() } else { format!("<p>{}</p>", to_html(notes.trim())) };
    let html = format!(
        "<p>Captured your account.</p><ul>{}</ul>{notes_html}<p>Your transfer code (one use, expires in {} at {expires}):</p><pre><code>{}</code></pre><p>{} On the new account, send <code>import CODE</code> to the handoff bot.</p>",
        summary.lines().iter().map(|l| format!("<li>{}</li>", to_html(l))).collect::<String>(),
        humantime::format_duration(Duration::from_secs(ttl.as_secs())),
        code.display(),
        escape(&bound),
    );
    bot.send_notice(ctx, 1, RoomMessageEventContent::notice_html(plain, html)).await?;

    // A code for another server's account: reserve its seats now, before it ever signs in.
    if let Some((to, requirements, plan)) = reservation {
        reserve(bot, ctx, id, &to, requirements, &plan, expires_at_ms).await?;
    }

    if args.file {
        let sealed = file::seal(&bundle, &code.display());
        let filename = format!(
            "handoff-{}-{}.age",
            ctx.sender.localpart(),
            humantime::format_rfc3339_seconds(SystemTime::now()).to_string().replace(':', "")
        );
        let content = bot.hs.upload_encrypted_file(&filename, "application/octet-stream", sealed).await?;
        bot.send_notice(ctx, 2, content).await?;
        bot.reply_n(
            ctx,
            3,
            "That file is your bundle, encrypted with the transfer code as its passphrase. Open it with `handoff inspect FILE` (or `age -d FILE`) and the code. It stays readable after the code expires."
                .into(),
        )
        .await?;
    }
    Ok(())
}

/// `export --to @new:other.server`: the old account invites the new one into every room of the
/// bundle right away (the seat reservation), journaled and resumed like a transfer, with progress
/// and a report here. It acts only as the old account, who asked for it. The invites not taken
/// when the code expires (`expires_at_ms`) are withdrawn.
async fn reserve(
    bot: &Bot,
    ctx: &Ctx,
    id: BundleId,
    to: &UserId,
    requirements: Requirements,
    plan: &Plan,
    expires_at_ms: u64,
) -> Result<(), BotError> {
    // Preflight, before anything changes: the rooms that can't reach the new account's server
    // (a server ACL, `m.federate: false`) or where it can't be seated, each with the reason.
    let blocked: Vec<String> = plan
        .rooms
        .iter()
        .filter_map(|r| match r.action {
            Action::Blocked(b) => {
                Some(format!("- {}: {}", r.name.clone().unwrap_or_else(|| r.room_id.to_string()), b.explain()))
            }
            _ => None,
        })
        .collect();
    if !blocked.is_empty() {
        let text = format!(
            "{} of your rooms can't be moved to {to}, and {to} won't be invited there:\n{}",
            blocked.len(),
            blocked.join("\n")
        );
        bot.reply_n(ctx, 5, text).await?;
    }
    let rooms = plan.rooms.len() - blocked.len();
    let entry = Entry {
        old: ctx.sender.clone(),
        new: to.to_owned(),
        requirements,
        profile: Default::default(),
        new_dm: ctx.room_id.clone(),
        old_dm: Some(ctx.room_id.clone()),
    };
    if let Err(refused) = door::enter(bot, entry, Ticket::Reservation { bundle: id, expires_at_ms }).await? {
        let text = format!(
            "Your seats were not reserved for {to}: {refused} Export again once it is over, or {to} asks to be invited."
        );
        return bot.reply_n(ctx, 4, text).await;
    }
    let text = format!(
        "Reserving {to}'s seats: you invite {to} into your {rooms} rooms now, so the seats wait for them; progress follows here. {to} gets your rank in a room once it has joined it; the invites not taken by the time the code expires are withdrawn (and at once with `cancel`)."
    );
    bot.reply_n(ctx, 4, text).await
}

#[cfg(test)]
mod tests {
    use super::super::{Place, parse as parse_command};
    use super::*;

    fn export(text: &str) -> Result<Export, String> {
        match parse_command(text, Place::Dm, "!h").unwrap() {
            Ok(Command::Export(e)) => Ok(e),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e.to_string()),
        }
    }

    #[test]
    fn options_parse() {
        let e = export("export --to @new:b.org --only dms --exclude !a:b --exclude '#x:b' --history 5 --file").unwrap();
        assert_eq!(e.to.unwrap().as_str(), "@new:b.org");
        assert_eq!(e.only, Some(Only::Dms));
        assert_eq!(e.exclude, vec!["!a:b", "#x:b"]);
        assert_eq!(e.history, Some(5));
        assert!(e.file);
        assert_eq!(export("export").unwrap(), Export::default());
    }

    #[test]
    fn bad_options_say_what_is_expected() {
        assert!(export("export --to bob").unwrap_err().contains("full user ID"));
        assert!(export("export --only cats").unwrap_err().contains("favourites, dms or rooms"));
        assert!(export("export --history lots").unwrap_err().contains("takes a number"));
        assert!(export("export --exclude general").unwrap_err().contains("room ID"));
        assert!(export("export --force").unwrap_err().contains("unknown option `--force`"));
        assert!(export("export --auto").unwrap_err().contains("`--auto` needs `--to`"));
        assert!(export("export --to @n:b.org --auto").unwrap().auto);
    }
}
