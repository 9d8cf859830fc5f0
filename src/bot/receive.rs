//! Bundle files from another server: the new account drops the file its old server's bot sent
//! (`export --to @you:this.server --file`) into its DM here, and `import CODE` opens it.
//!
//! Consent, as this side sees it:
//! - the file opens only with the code, and the code is kept here (as a hash) once used, so it
//!   opens nothing a second time;
//! - the bundle must name the importer as its recipient (`export --to`): nobody else on this server
//!   can use it, even holding file and code, and a file without a recipient is refused;
//! - the transfer only ever acts as the importer, who asked in their own DM (never as the old
//!   account, which is remote; a file claiming a local old account is refused);
//! - a move notice, which says the old account moved here, is posted only where the old account's
//!   own invite (the reservation, signed by its server) proves it chose this account.

use std::time::{Duration, UNIX_EPOCH};

use super::door::{self, Entry, Refused, Ticket};
use super::state::{Bot, BotError, Ctx};
use crate::bundle::border::{self, Limits};
use crate::bundle::{Bundle, file};
use crate::code::TransferCode;
use crate::store::now_ms;
use crate::transfer::ClientProfile;
use crate::transfer::plan::{self, Requirements};

/// What a bundle file starts with (the age format).
pub const AGE_MAGIC: &[u8] = b"age-encryption.org/";

/// A bundle file dropped into the DM: kept (sealed) until the `import CODE` that opens it.
pub async fn on_bundle_file(bot: &Bot, ctx: &Ctx, bytes: &[u8]) -> Result<(), BotError> {
    bot.store.put_dropped_file(&ctx.sender, bytes).await?;
    bot.reply(
        ctx,
        "This is a handoff bundle file. It opens only with the transfer code that came with it: send `import CODE` here to move it into this account (`import CODE --dry-run` shows the plan first).".into(),
    )
    .await
}

/// `import CODE` when the code is not one of this server's: opens the bundle file the sender
/// dropped here with it, checks whom it is for, and starts a transfer that acts only as the sender.
/// `Ok(false)` when the sender has no file here (the code is then simply unknown).
pub async fn import_file(
    bot: &Bot,
    ctx: &Ctx,
    code: &TransferCode,
    dry_run: bool,
    profile: ClientProfile,
    requirements: Requirements,
) -> Result<bool, BotError> {
    let new = &ctx.sender;
    let Some(bytes) = bot.store.dropped_file(new).await? else { return Ok(false) };
    let passphrase = code.display();
    // The file came from another server: it opens only as a file this service could have made.
    let policy = file::Policy::service(Limits {
        max_rooms: bot.config.handoff.max_rooms,
        max_history: bot.config.handoff.history_messages,
    });
    // scrypt: off the async threads.
    let opened = tokio::task::spawn_blocking(move || file::open(&bytes, &passphrase, &policy)).await.expect("no panic");
    let (mut bundle, dropped) = match opened {
        Ok(opened) => (opened.bundle, opened.dropped),
        Err(file::FileError::WrongPassphrase) => {
            bot.wrong_codes.record(new);
            bot.reply(ctx, "No such transfer code for this account, and it does not open the bundle file you dropped here. Check the code the old account's bot showed with the file.".into()).await?;
            return Ok(true);
        }
        Err(e) => {
            bot.reply(ctx, format!("The bundle file you dropped here can't be read: {e}. Nothing was changed."))
                .await?;
            return Ok(true);
        }
    };
    // A login token is for the device side's own account; this server never keeps one.
    bundle.login_token = None;
    if let Some(refusal) = refusal(bot, ctx, &bundle) {
        bot.reply(ctx, format!("{refusal} Nothing was changed.")).await?;
        return Ok(true);
    }
    let old = bundle.source.user_id.clone();
    if dry_run {
        let plan = bot.engine.plan_received(&bundle, new, &requirements).await?;
        let mut text = format!(
            "Dry run: nothing was changed, and the code is still valid.\n{}\n{} to join, {} already joined; {} without an invite from {old} (joined only if public, no move notice).",
            plan.table(),
            plan.count(|a| *a == plan::Action::Join),
            plan.count(|a| *a == plan::Action::AlreadyJoined),
            plan.rooms.iter().filter(|r| r.warnings.contains(&plan::Warning::Unreserved)).count(),
        );
        if !dropped.is_empty() {
            text.push_str(&format!("\n{}", border::describe(&dropped)));
        }
        bot.reply(ctx, text).await?;
        return Ok(true);
    }
    let expires_at_ms = bundle.recipient.as_ref().map_or(0, |r| u64::from(r.expires_at.get()));
    let rooms = bundle.rooms.len();
    let entry =
        Entry { old: old.clone(), new: new.clone(), requirements, profile, new_dm: ctx.room_id.clone(), old_dm: None };
    let ticket = Ticket::Received { code: code.hash(), bundle: Box::new(bundle), expires_at_ms, dropped };
    let tid = match door::enter(bot, entry, ticket).await? {
        Ok(entered) => entered.transfer.id,
        Err(refused @ Refused::Busy(_)) => {
            bot.reply(ctx, format!("{refused} The code is still valid.")).await?;
            return Ok(true);
        }
        Err(refused) => {
            bot.reply(ctx, refused.to_string()).await?;
            return Ok(true);
        }
    };
    let text = match bot.engine.place(tid) {
        Some(_) => format!(
            "The code opens the bundle file of {old}. Your move of {rooms} rooms waits for its turn: see below."
        ),
        None => format!(
            "The code opens the bundle file of {old}. Moving {rooms} rooms here: you join each through its servers; progress follows."
        ),
    };
    bot.reply(ctx, text).await?;
    Ok(true)
}

/// Why this server won't move an opened bundle into the sender's account, if it won't.
fn refusal(bot: &Bot, ctx: &Ctx, bundle: &Bundle) -> Option<String> {
    let old = &bundle.source.user_id;
    let domain = &bot.config.homeserver.domain;
    if old.server_name() == domain || bundle.source.server_name == *domain {
        return Some(format!(
            "This bundle is of {old}, an account on this server: its move is started with its code alone, without the file (`import CODE`), or ask {old} for a new `export --to {}`.",
            ctx.sender
        ));
    }
    if old == &ctx.sender {
        return Some("This bundle is of this same account.".into());
    }
    let Some(recipient) = &bundle.recipient else {
        return Some(format!(
            "This bundle file is not addressed to any account, so this server can't tell it is yours to import. Ask {old} to export again with `export --to {} --file`.",
            ctx.sender
        ));
    };
    if recipient.user_id != ctx.sender {
        return Some(format!(
            "This bundle file is addressed to {}, not to you: only that account can import it.",
            recipient.user_id
        ));
    }
    let expires = u64::from(recipient.expires_at.get());
    if expires <= now_ms() {
        let at = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(expires));
        return Some(format!(
            "The code of this bundle file expired at {at}. Ask {old} for a new one with `export --to {} --file`.",
            ctx.sender
        ));
    }
    None
}
