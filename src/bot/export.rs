//! Running `export`: capture, store sealed, make a code, answer (and upload the file with `--file`).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ruma::UserId;
use ruma::events::room::message::RoomMessageEventContent;

use super::commands::export::Export;
use super::{Bot, Ctx, store_err};
use crate::bundle::capture::{self, CaptureOptions};
use crate::bundle::file;
use crate::code::TransferCode;
use crate::config::PermissionLevel;
use crate::homeserver::HsError;
use crate::html::{escape, to_html};
use crate::store::{AutoStart, CodeRecord, now_ms};

/// Stored bundles kept per account: a new export beyond this deletes the oldest.
pub const MAX_BUNDLES_PER_USER: usize = 5;

/// Checks an `export` and starts its capture in the background (it can take minutes, and the
/// user's `status` or `cancel` must not wait for it). One export per user at a time.
pub async fn start(bot: &Arc<Bot>, ctx: Ctx, args: Export) -> Result<(), HsError> {
    if let Some(refusal) = refusal(bot, &ctx, &args)? {
        return bot.reply(&ctx, refusal).await;
    }
    if !bot.exports.lock().expect("lock").insert(ctx.sender.clone()) {
        return bot
            .reply(&ctx, "Your previous `export` is still capturing your account; wait for its answer.".into())
            .await;
    }
    let bot = Arc::clone(bot);
    tokio::spawn(async move {
        let inner = Arc::clone(&bot);
        let (ctx2, sender) = (ctx.clone(), ctx.sender.clone());
        // In a task of its own, so a panic is reported like an error and the guard still goes.
        let outcome = tokio::spawn(async move { run(&inner, &ctx2, args).await }).await;
        bot.exports.lock().expect("lock").remove(&sender);
        let failure = match outcome {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(e) => {
                tracing::error!(task = %e.id(), "export panicked");
                "an internal error (the server's log has the details)".to_owned()
            }
        };
        tracing::warn!(error = %failure, "export failed");
        let _ = bot.reply_n(&ctx, 9, format!("The export failed: {failure}. Nothing was stored; try again.")).await;
    });
    Ok(())
}

/// Why this export can't go ahead, if it can't: whose consent a `--to` would need and can't get.
fn refusal(bot: &Bot, ctx: &Ctx, args: &Export) -> Result<Option<String>, HsError> {
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
    if config.permission(to) < PermissionLevel::User {
        return Ok(Some(format!(
            "{to} may not use handoff on this server, so it could never accept or import this move."
        )));
    }
    // Checked before capturing (to spare the work), and again under the lock when the offer is stored.
    if args.auto && offered_by_another(bot, to, &ctx.sender)? {
        return Ok(Some(offer_taken(to)));
    }
    Ok(None)
}

/// Whether `to` holds a pending offer from another account than `old`: it is never replaced.
fn offered_by_another(bot: &Bot, to: &UserId, old: &UserId) -> Result<bool, HsError> {
    let existing = bot.store.auto_for(to).map_err(store_err)?;
    Ok(existing.is_some_and(|e| e.old != old && e.expires_at_ms > now_ms()))
}

fn offer_taken(to: &UserId) -> String {
    format!(
        "Another account already offered {to} a move that is still pending; yours can't replace it. Try again after it expires, or use `export --to {to}` without `--auto` and send the code yourself."
    )
}

async fn run(bot: &Bot, ctx: &Ctx, args: Export) -> Result<(), HsError> {
    let config = &bot.config;
    let history = args.history.unwrap_or(0);
    bot.reply_n(ctx, 0, "Capturing your account…".into()).await?;

    let opts = CaptureOptions {
        only: args.only,
        exclude: args.exclude.clone(),
        skip: bot.store.dm_rooms_of(&ctx.sender).unwrap_or_default(),
        history,
        pool: bot.engine.pool(),
        max_rooms: config.handoff.max_rooms,
        client: format!("handoff-bot {}", env!("CARGO_PKG_VERSION")),
    };
    let captured = capture::capture(&bot.acting, &ctx.sender, config.homeserver.address.as_str(), &opts).await?;
    let bundle = captured.bundle;
    let summary = bundle.summary();
    let id = bot.store.put_bundle(&ctx.sender, &bundle).await.map_err(store_err)?;
    let trimmed = bot.store.trim_bundles(&ctx.sender, MAX_BUNDLES_PER_USER).await.map_err(store_err)?;
    let code = TransferCode::generate();
    let ttl = config.handoff.code_ttl;
    let record = CodeRecord {
        owner: ctx.sender.clone(),
        bundle: id,
        expires_at_ms: now_ms() + ttl.as_millis() as u64,
        bound_to: args.to.clone(),
        redeemed_by: None,
    };
    bot.store.put_code(&code.hash(), &record).await.map_err(store_err)?;
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
        if offered_by_another(bot, to, &ctx.sender)? {
            drop(records);
            return bot.reply_n(ctx, 1, offer_taken(to)).await;
        }
        bot.store.put_auto(&auto).await.map_err(store_err)?;
    }
    tracing::info!(user = %ctx.sender, rooms = summary.rooms, "bundle captured and stored");

    let expires = humantime::format_rfc3339_seconds(SystemTime::now() + ttl);
    let bound = match &args.to {
        Some(to) if args.auto => format!(
            "Only {to} can use it. As soon as {to} is first active (signs in, or writes to the handoff bot), the bot asks {to} in a DM whether to accept the move; nothing changes there before {to} answers `accept`."
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
