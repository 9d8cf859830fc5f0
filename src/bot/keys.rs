//! Key-export files dropped into the DM (the `keys` command shows what is attached).

use ruma::events::room::message::FileMessageEventContent;

use super::receive;
use super::state::{Bot, BotError, Ctx};
use crate::homeserver::DownloadError;
use crate::keys;

/// Key exports are small (a few hundred bytes per room key); anything bigger is not one.
const MAX_FILE: u64 = 64 << 20;

pub async fn on_file(bot: &Bot, ctx: &Ctx, file: &FileMessageEventContent) -> Result<(), BotError> {
    // Capped while it arrives: the size the sender declares is not to be trusted.
    let bytes = match bot.hs.download(&file.source, MAX_FILE).await {
        Ok(bytes) => bytes,
        Err(DownloadError::TooLarge { .. }) => {
            let mib = MAX_FILE >> 20;
            return bot
                .reply(
                    ctx,
                    format!("This file is larger than {mib} MiB and can't be a key export; nothing was attached."),
                )
                .await;
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot download a file dropped into a DM");
            return bot.reply(ctx, format!("handoff could not read this file ({e}); nothing was attached.")).await;
        }
    };
    // A bundle file from another server's bot: it waits for the code that opens it.
    if bytes.starts_with(receive::AGE_MAGIC) {
        return receive::on_bundle_file(bot, ctx, &bytes).await;
    }
    let text = String::from_utf8_lossy(&bytes);
    let export = match keys::validate(&text) {
        Ok(k) => k,
        Err(e) => return bot.reply(ctx, format!("{e}. Nothing was attached.")).await,
    };
    let latest = match bot.store.latest_bundle(&ctx.sender).await {
        Ok(Some(b)) => b,
        Ok(None) => {
            return bot
                .reply(ctx, "This is a valid key export, but you have no bundle to attach it to: send `export` first, then drop the file again.".into())
                .await;
        }
        Err(e) => return store_failure(bot, ctx, e).await,
    };
    let (id, mut record) = latest;
    let size = export.encrypted_len;
    let rounds = export.rounds;
    record.bundle.room_keys = Some(export);
    if let Err(e) = bot.store.update_bundle(&id, &record).await {
        return store_failure(bot, ctx, e).await;
    }
    bot.reply(
        ctx,
        format!(
            "Attached your key export ({size} bytes of encrypted keys, {rounds} PBKDF2 rounds) to your latest bundle. It stays encrypted with your passphrase: handoff cannot read it. The new account receives the file with instructions."
        ),
    )
    .await
}

async fn store_failure(bot: &Bot, ctx: &Ctx, e: crate::store::StoreError) -> Result<(), BotError> {
    tracing::error!(error = ?e, "store failure");
    bot.reply(
        ctx,
        "The server could not read or write its store; nothing changed. Try again, or tell the server admin.".into(),
    )
    .await
}
