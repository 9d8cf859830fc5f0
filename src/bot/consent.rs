//! Consent: nothing is written into an account unless its owner asked for it in their own DM
//! with the bot — `import CODE`, or `accept` of an offer. An unbound code also needs the old
//! account's `approve @importer`. This module holds what the commands share to keep that true:
//! whether a transfer may start, and the offers of `export --to … --auto`.

use std::time::Duration;

use ruma::api::client::room::create_room;
use ruma::{OwnedEventId, OwnedRoomId, UserId};
use sha2::{Digest, Sha256};

use super::state::{Bot, BotError, Ctx};
use crate::code::CodeHash;
use crate::config::PermissionLevel;
use crate::store::now_ms;
use crate::transfer::{Transfer, TransferState};

/// Why a transfer that acts for `users` can't start now, if it can't: one of them may no longer
/// use handoff, or already takes part in a running transfer (one at a time). A reservation acts
/// only as the old account, a received bundle only as the new one (the other is on another server).
pub async fn start_refusal_of(bot: &Bot, users: &[&UserId]) -> Result<Option<String>, BotError> {
    if let Some(user) = users.iter().find(|u| bot.config.permission(u) < PermissionLevel::User) {
        return Ok(Some(format!("{user} may no longer use handoff on this server.")));
    }
    // Only the accounts' own records are read (the journal indexes them by user).
    for user in users.iter().rev() {
        let transfers = bot.journal.of(user).await?;
        let running = transfers.iter().find(|t| t.is_live());
        if let Some(t) = running {
            return Ok(Some(format!(
                "{user} already has a transfer running ({} → {}); one transfer per account at a time. Wait for its report, or `cancel` it.",
                t.old, t.new
            )));
        }
    }
    Ok(None)
}

/// `user`'s imports waiting for approval (as the old account), unexpired, oldest first.
pub async fn pending_for(bot: &Bot, user: &UserId) -> Result<Vec<Transfer>, BotError> {
    let now = now_ms();
    Ok(bot
        .journal
        .of(user)
        .await?
        .into_iter()
        .filter(|t| {
            t.old == user && t.state == TransferState::AwaitingApproval && t.expires_at_ms.is_none_or(|e| e > now)
        })
        .collect())
}

pub fn state_text(s: TransferState) -> &'static str {
    match s {
        TransferState::AwaitingApproval => "waiting for the old account to approve",
        TransferState::Denied => "refused by the old account",
        TransferState::Running => "running",
        TransferState::Cancelling => "stopping after the rooms in flight",
        TransferState::Cancelled => "cancelled",
        TransferState::Done => "done",
    }
}

/// `export --to NEW --auto`, when NEW is active: offers NEW the move in its DM with the bot
/// (opened if `dm` is `None`). Nothing is written into NEW before NEW answers `accept` there. An
/// offer is made once; an expired one is dropped.
pub async fn offer(bot: &Bot, new: &UserId, dm: Option<OwnedRoomId>) -> Result<(), BotError> {
    let Some(auto) = bot.store.auto_for(new).await? else { return Ok(()) };
    if auto.offered_in.is_some() {
        return Ok(());
    }
    if auto.expires_at_ms <= now_ms() {
        bot.store.take_auto(new).await?;
        return Ok(());
    }
    // The account's DM with the bot, if it has one; a new one only if not (a retried offer must
    // not open a room each time).
    let known = bot.store.dm_rooms_of(new).await?.into_iter().next();
    let dm = match dm.or(known) {
        Some(dm) => dm,
        None => {
            let mut req = create_room::v3::Request::new();
            req.invite = vec![new.to_owned()];
            req.is_direct = true;
            req.preset = Some(create_room::v3::RoomPreset::TrustedPrivateChat);
            let room = bot.hs.send(req).await?.room_id;
            bot.store.set_dm_room(&room, new).await?;
            room
        }
    };
    let summary = match bot.store.codes_of(&auto.old).await?.into_iter().find(|c| c.bound_to.as_deref() == Some(new)) {
        Some(code) => match bot.store.get_bundle(&code.bundle).await? {
            Some(b) => format!(" ({} rooms, their DMs, contacts and settings)", b.bundle.rooms.len()),
            None => String::new(),
        },
        None => String::new(),
    };
    let expires = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(auto.expires_at_ms));
    let text = format!(
        "{} wants to move their rooms and settings here{summary}: reply `accept` to start, `decline` to refuse. Nothing changes in this account unless you accept. The offer lapses at {expires}.",
        auto.old
    );
    // The transaction ID comes from the offer, so a retried offer is posted once.
    let cause = hex::encode(&Sha256::digest(auto.code_hash)[..8]);
    let ctx = Ctx { room_id: dm.clone(), event_id: offer_event_id(&cause), sender: new.to_owned() };
    bot.reply_n(&ctx, 7, text).await?;
    let _records = bot.records.lock().await;
    // Recorded only if it is still the same offer (not declined, replaced or forgotten meanwhile).
    if let Some(mut current) = bot.store.auto_for(new).await?
        && current.code_hash == auto.code_hash
    {
        current.offered_in = Some(dm);
        bot.store.put_auto(&current).await?;
    }
    tracing::info!(old = %auto.old, new = %new, "automatic move offered");
    Ok(())
}

fn offer_event_id(cause: &str) -> OwnedEventId {
    OwnedEventId::try_from(format!("$offer-{cause}")).expect("a valid event ID")
}

/// Tells the old account of an offer what became of it, in its DM with the bot if it has one.
pub async fn tell_old(bot: &Bot, old: &UserId, cause: &Ctx, text: String) -> Result<(), BotError> {
    let Some(dm) = bot.store.dm_rooms_of(old).await?.into_iter().next() else { return Ok(()) };
    let ctx = Ctx { room_id: dm, event_id: cause.event_id.clone(), sender: old.to_owned() };
    bot.reply_n(&ctx, 6, text).await
}

/// At start-up: offers and pending imports of users whose permission was revoked are dropped
/// (running transfers stop themselves when they resume). Returns how many.
pub async fn sweep_revoked(bot: &Bot) -> Result<usize, BotError> {
    let permitted = |u: &UserId| bot.config.permission(u) >= PermissionLevel::User;
    let mut n = 0;
    for auto in bot.store.autos().await? {
        if !permitted(&auto.old) || !permitted(&auto.new) {
            bot.store.take_auto(&auto.new).await?;
            bot.store.remove_code(&CodeHash(auto.code_hash)).await?;
            n += 1;
        }
    }
    for mut t in bot.journal.all().await? {
        if t.state == TransferState::AwaitingApproval && (!permitted(&t.old) || !permitted(&t.new)) {
            t.state = TransferState::Cancelled;
            bot.journal.put(&t).await?;
            n += 1;
        }
    }
    Ok(n)
}
