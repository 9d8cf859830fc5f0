//! Running `export`: capture, store sealed, make a code, answer (and upload the file with `--file`).

use std::time::{Duration, SystemTime};

use ruma::events::room::message::RoomMessageEventContent;

use super::commands::export::Export;
use super::{Bot, Ctx, escape, store_err, to_html};
use crate::bundle::capture::{self, CaptureOptions};
use crate::bundle::file;
use crate::code::TransferCode;
use crate::homeserver::HsError;
use crate::store::{AutoStart, CodeRecord, now_ms};

pub async fn run(bot: &Bot, ctx: &Ctx, args: Export) -> Result<(), HsError> {
    let config = &bot.config;
    if ctx.sender.server_name() != config.homeserver.domain {
        return bot
            .reply(
                ctx,
                format!(
                    "handoff here can only capture accounts on {}. Use the handoff of your own server, or the `handoff export` command line tool.",
                    config.homeserver.domain
                ),
            )
            .await;
    }
    let max_history = config.handoff.history_messages;
    let history = args.history.unwrap_or(0);
    if history > max_history {
        return bot
            .reply(ctx, format!("`--history` can be at most {max_history} on this server (handoff.history_messages)."))
            .await;
    }
    bot.reply_n(ctx, 0, "Capturing your account…".into()).await?;

    let opts = CaptureOptions {
        only: args.only,
        exclude: args.exclude.clone(),
        skip: bot.store.dm_rooms_of(&ctx.sender).unwrap_or_default(),
        history,
        concurrency: config.handoff.concurrency.0 * 2,
        client: format!("handoff-bot {}", env!("CARGO_PKG_VERSION")),
    };
    let bundle = capture::capture(&bot.acting, &ctx.sender, config.homeserver.address.as_str(), &opts).await?;
    let summary = bundle.summary();
    let id = bot.store.put_bundle(&ctx.sender, &bundle).await.map_err(store_err)?;
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
        };
        bot.store.put_auto(&auto).await.map_err(store_err)?;
    }
    tracing::info!(user = %ctx.sender, rooms = summary.rooms, "bundle captured and stored");

    let expires = humantime::format_rfc3339_seconds(SystemTime::now() + ttl);
    let bound = match &args.to {
        Some(to) if args.auto => format!(
            "Only {to} can use it, and the move starts by itself as soon as {to} is first active (signs in, or writes to the handoff bot)."
        ),
        Some(to) => format!("Only {to} can use it."),
        None => "Any account can use it; you will be asked to approve the import.".to_owned(),
    };
    let plain = format!(
        "Captured your account.\n{}\n\nYour transfer code (one use, expires in {} at {expires}):\n{}\n\n{bound} On the new account, send `import CODE` to the handoff bot.",
        summary,
        humantime::format_duration(Duration::from_secs(ttl.as_secs())),
        code.display(),
    );
    let html = format!(
        "<p>Captured your account.</p><ul>{}</ul><p>Your transfer code (one use, expires in {} at {expires}):</p><pre><code>{}</code></pre><p>{} On the new account, send <code>import CODE</code> to the handoff bot.</p>",
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
        let content = bot.hs.upload_file(&filename, "application/octet-stream", sealed).await?;
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
