//! Running `import`, `approve`/`deny`, `accept`/`decline` (with the offers of `export --auto`),
//! `status`, `cancel` and `finish`.
//!
//! Consent: nothing is written into an account unless its owner asked for it in their own DM
//! with the bot — `import CODE`, or `accept` of an offer. An unbound code also needs the old
//! account's `approve @importer`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ruma::api::client::device::get_devices;
use ruma::api::client::membership::leave_room;
use ruma::api::client::profile::{get_profile, set_profile_field};
use ruma::api::client::room::create_room;
use ruma::events::room::member::MembershipState;
use ruma::profile::ProfileFieldValue;
use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde_json::Value as JsonValue;
use sha2::{Digest, Sha256};

use super::commands::import::Import;
use super::{Bot, Ctx, store_err};
use crate::code::CodeHash;
use crate::config::PermissionLevel;
use crate::homeserver::HsError;
use crate::store::{RedeemError, now_ms};
use crate::transfer::plan::{self, Requirements};
use crate::transfer::{RoomStep, Transfer, TransferState, world};

/// Wrong codes allowed per user in [`WRONG_CODE_WINDOW`] before `import` is refused for a while.
const WRONG_CODE_LIMIT: usize = 5;
const WRONG_CODE_WINDOW: Duration = Duration::from_secs(600);

/// Remembers each user's recent wrong codes.
#[derive(Default)]
pub struct WrongCodes(Mutex<HashMap<OwnedUserId, Vec<Instant>>>);

impl WrongCodes {
    fn recent(&self, user: &UserId) -> usize {
        let mut map = self.0.lock().expect("lock");
        let Some(list) = map.get_mut(user) else { return 0 };
        list.retain(|t| t.elapsed() < WRONG_CODE_WINDOW);
        let n = list.len();
        // Users with no recent wrong code are not remembered.
        if n == 0 {
            map.remove(user);
        }
        n
    }
    fn record(&self, user: &UserId) {
        self.0.lock().expect("lock").entry(user.to_owned()).or_default().push(Instant::now());
    }
}

impl WrongCodes {
    /// Drops what is remembered about `user` (for `forget`).
    pub fn forget(&self, user: &UserId) {
        self.0.lock().expect("lock").remove(user);
    }
}

/// Why a transfer between `old` and `new` can't start now, if it can't: either account may no
/// longer use handoff, or already takes part in a running transfer (one at a time).
fn start_refusal(bot: &Bot, old: &UserId, new: &UserId) -> Result<Option<String>, HsError> {
    if let Some(user) = [old, new].into_iter().find(|u| bot.config.permission(u) < PermissionLevel::User) {
        return Ok(Some(format!("{user} may no longer use handoff on this server.")));
    }
    // One read of the records serves both accounts.
    let transfers = bot.journal.all().map_err(store_err)?;
    for user in [new, old] {
        let running = transfers.iter().find(|t| t.involves(user) && t.is_live());
        if let Some(t) = running {
            return Ok(Some(format!(
                "{user} already has a transfer running ({} → {}); one transfer per account at a time. Wait for its report, or `cancel` it.",
                t.old, t.new
            )));
        }
    }
    Ok(None)
}

pub async fn import(bot: &Bot, ctx: &Ctx, args: Import) -> Result<(), HsError> {
    let new = &ctx.sender;
    if bot.wrong_codes.recent(new) >= WRONG_CODE_LIMIT {
        return bot.reply(ctx, "Too many wrong codes: wait ten minutes before trying again.".into()).await;
    }
    let hash = args.code.hash();
    // Look before using the code up: a dry run, or the same account, leaves it valid.
    let record = match bot.store.peek_code(&hash, new).map_err(store_err)? {
        Ok(r) => r,
        Err(e) => {
            if e == RedeemError::NotFound {
                bot.wrong_codes.record(new);
            }
            return bot.reply(ctx, format!("{e}.")).await;
        }
    };
    let old = record.owner.clone();
    if &old == new {
        return bot
            .reply(ctx, "That code belongs to this same account: its rooms and settings are already here. A new client of the same account only needs to log in.".into())
            .await;
    }
    let Some(stored) = bot.store.get_bundle(&record.bundle).map_err(store_err)? else {
        return bot.reply(ctx, "The bundle of this code is gone (deleted with `forget`, or past its retention). Ask for a new one with `export`.".into()).await;
    };
    // The server's limit applies whatever the importer asks for.
    let max_rooms = Some(args.max_rooms.map_or(bot.config.handoff.max_rooms, |m| m.min(bot.config.handoff.max_rooms)));
    let requirements = Requirements { only: args.only, max_rooms, history: args.history };
    if args.dry_run {
        let rooms: Vec<_> = stored.bundle.rooms.iter().map(|r| r.room_id.clone()).collect();
        let world = world::read(&bot.acting, &old, new, rooms, &bot.engine.pool()).await?;
        let plan = plan::plan(&stored.bundle, new, &requirements, &world);
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
    let approved = record.bound_to.as_deref() == Some(new.as_ref());
    let records = bot.records.lock().await;
    if let Some(refusal) = start_refusal(bot, &old, new)? {
        drop(records);
        return bot.reply(ctx, format!("{refusal} The code is still valid.")).await;
    }
    let record = match bot.store.redeem_code(&hash, new).await.map_err(store_err)? {
        Ok(r) => r,
        // Redeemed by a concurrent import in between.
        Err(e) => {
            drop(records);
            return bot.reply(ctx, format!("{e}.")).await;
        }
    };
    let old_dm = bot.store.dm_rooms_of(&old).map_err(store_err)?.into_iter().next();
    let id = bot.journal.new_id().map_err(store_err)?;
    let mut t =
        Transfer::new(id, old.clone(), new.clone(), record.bundle, requirements, ctx.room_id.clone(), old_dm.clone());
    t.profile = args.profile;
    if !approved {
        t.state = TransferState::AwaitingApproval;
        // An unanswered request lapses with its code.
        t.expires_at_ms = Some(record.expires_at_ms);
    }
    bot.journal.put(&t).await.map_err(store_err)?;
    drop(records);
    if approved {
        bot.reply(
            ctx,
            format!("The code is good. Moving {} rooms from {old} here; progress follows.", stored.bundle.rooms.len()),
        )
        .await?;
        bot.engine.spawn(t.id);
        return Ok(());
    }
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

/// `user`'s imports waiting for approval (as the old account), unexpired, oldest first.
fn pending_for(bot: &Bot, user: &UserId) -> Result<Vec<Transfer>, HsError> {
    let now = now_ms();
    Ok(bot
        .journal
        .all()
        .map_err(store_err)?
        .into_iter()
        .filter(|t| {
            t.old == user && t.state == TransferState::AwaitingApproval && t.expires_at_ms.is_none_or(|e| e > now)
        })
        .collect())
}

/// `approve @importer` (`yes`) or `deny @importer`.
pub async fn approve(bot: &Bot, ctx: &Ctx, importer: Option<OwnedUserId>, yes: bool) -> Result<(), HsError> {
    let verb = if yes { "approve" } else { "deny" };
    let Some(importer) = importer else {
        let text = match pending_for(bot, &ctx.sender)?.as_slice() {
            [] => "No import is waiting for your approval.".to_owned(),
            list => format!(
                "Name the account: `{verb} @account:server`. Waiting for your answer: {}.",
                list.iter().map(|t| t.new.to_string()).collect::<Vec<_>>().join(", ")
            ),
        };
        return bot.reply(ctx, text).await;
    };
    let records = bot.records.lock().await;
    // Re-read under the lock: the request may have been answered or cancelled meanwhile.
    let Some(mut t) = pending_for(bot, &ctx.sender)?.into_iter().find(|t| t.new == importer) else {
        drop(records);
        return bot
            .reply(
                ctx,
                format!("No import by {importer} is waiting for your approval (it may have lapsed with its code)."),
            )
            .await;
    };
    if yes && let Some(refusal) = start_refusal(bot, &t.old, &t.new)? {
        drop(records);
        return bot.reply(ctx, format!("{refusal} The request stays open until its code expires.")).await;
    }
    t.state = if yes { TransferState::Running } else { TransferState::Denied };
    t.expires_at_ms = None;
    bot.journal.put(&t).await.map_err(store_err)?;
    drop(records);
    let to_new = Ctx { room_id: t.new_dm.clone(), event_id: ctx.event_id.clone(), sender: t.new.clone() };
    if yes {
        bot.reply_n(&to_new, 6, format!("{} approved the import. Moving rooms now; progress follows.", t.old)).await?;
        bot.engine.spawn(t.id);
        bot.reply(ctx, format!("Approved: moving your rooms to {}.", t.new)).await
    } else {
        bot.reply_n(&to_new, 6, format!("{} refused the import. Nothing was changed.", t.old)).await?;
        bot.reply(ctx, format!("Refused: nothing goes to {}.", t.new)).await
    }
}

pub async fn status(bot: &Bot, ctx: &Ctx) -> Result<(), HsError> {
    let Some(t) = bot.journal.latest_of(&ctx.sender).map_err(store_err)? else {
        return bot.reply(ctx, "You have no transfer yet. Start one with `export` on the old account and `import CODE` on the new one.".into()).await;
    };
    let steps = bot.journal.room_steps(t.id).map_err(store_err)?;
    let mut text = format!("Transfer {} → {}: {}", t.old, t.new, state_text(t.state));
    if let Some(plan) = &t.plan {
        let count =
            |f: &dyn Fn(&RoomStep) -> bool| plan.rooms.iter().filter(|r| steps.get(&r.room_id).is_some_and(f)).count();
        let done = count(&|s| *s == RoomStep::Done);
        let awaiting = count(&|s| *s == RoomStep::AwaitingAccept);
        let skipped = count(&|s| matches!(s, RoomStep::Skipped(_)));
        let failed = count(&|s| matches!(s, RoomStep::Failed(_)));
        let pending = plan.rooms.len() - done - awaiting - skipped - failed;
        text.push_str(&format!(
            "\n{} rooms: {done} moved, {awaiting} awaiting accept, {skipped} skipped, {failed} failed, {pending} to do",
            plan.rooms.len()
        ));
        // Rooms that need attention first; a long list is cut, `status` is a summary.
        let mut rooms: Vec<_> = plan.rooms.iter().collect();
        rooms.sort_by_key(|r| match steps.get(&r.room_id) {
            Some(RoomStep::Failed(_)) | Some(RoomStep::Skipped(_)) => 0,
            Some(RoomStep::AwaitingAccept) => 1,
            Some(RoomStep::Done) => 3,
            _ => 2,
        });
        const SHOWN: usize = 40;
        if rooms.len() > SHOWN {
            text.push_str(&format!("\n(the first {SHOWN} of {} rooms, those that need attention first)", rooms.len()));
        }
        for r in rooms.into_iter().take(SHOWN) {
            let label = r.name.clone().unwrap_or_else(|| r.room_id.to_string());
            let state = match steps.get(&r.room_id) {
                None | Some(RoomStep::Pending) => "to do".to_owned(),
                Some(RoomStep::Done) => "moved".to_owned(),
                Some(RoomStep::AwaitingAccept) => "invited: accept it from your client".to_owned(),
                Some(RoomStep::Skipped(w)) => format!("skipped: {w}"),
                Some(RoomStep::Failed(w)) => format!("failed: {w}"),
                Some(other) => format!("in progress ({other:?})"),
            };
            text.push_str(&format!("\n• {label}: {state}"));
        }
    }
    bot.reply(ctx, text).await
}

fn state_text(s: TransferState) -> &'static str {
    match s {
        TransferState::AwaitingApproval => "waiting for the old account to approve",
        TransferState::Denied => "refused by the old account",
        TransferState::Running => "running",
        TransferState::Cancelling => "stopping after the rooms in flight",
        TransferState::Cancelled => "cancelled",
        TransferState::Done => "done",
    }
}

pub async fn cancel(bot: &Bot, ctx: &Ctx) -> Result<(), HsError> {
    let records = bot.records.lock().await;
    let Some(mut t) = bot.journal.latest_of(&ctx.sender).map_err(store_err)? else {
        drop(records);
        return bot.reply(ctx, "You have no transfer to cancel.".into()).await;
    };
    let text = match t.state {
        TransferState::Running => {
            t.state = TransferState::Cancelling;
            bot.journal.put(&t).await.map_err(store_err)?;
            bot.engine.cancel(t.id);
            "Stopping after the rooms in flight. What is done stays done.".to_owned()
        }
        TransferState::AwaitingApproval => {
            t.state = TransferState::Cancelled;
            bot.journal.put(&t).await.map_err(store_err)?;
            "Cancelled before it started: nothing was changed.".to_owned()
        }
        other => format!("Your last transfer is already {}.", state_text(other)),
    };
    drop(records);
    bot.reply(ctx, text).await
}

pub async fn finish(bot: &Bot, ctx: &Ctx, leave: bool, advertise: bool) -> Result<(), HsError> {
    let old = &ctx.sender;
    let latest = bot
        .journal
        .all()
        .map_err(store_err)?
        .into_iter()
        .rev()
        .find(|t| &t.old == old && t.state == TransferState::Done);
    let Some(t) = latest else {
        return bot
            .reply(ctx, "`finish` is for the old account after a completed transfer; there is none.".into())
            .await;
    };
    let mut lines = Vec::new();
    if leave {
        let steps = bot.journal.room_steps(t.id).map_err(store_err)?;
        let (mut left, mut kept) = (0, Vec::new());
        for (room, step) in &steps {
            if *step != RoomStep::Done {
                continue;
            }
            match safe_to_leave(bot, room, old, &t.new).await {
                Ok(true) => {
                    let mut req = leave_room::v3::Request::new(room.clone());
                    req.reason = Some(format!("moved to {}", t.new));
                    bot.acting.send_as(old, req).await?;
                    left += 1;
                }
                Ok(false) => kept.push(room.to_string()),
                Err(e) => kept.push(format!("{room} ({e})")),
            }
        }
        lines.push(format!("Left {left} room(s)."));
        if !kept.is_empty() {
            lines.push(format!(
                "Stayed in {} room(s) where {} is not joined with at least the same rank: {}",
                kept.len(),
                t.new,
                kept.join(", ")
            ));
        }
    }
    if advertise {
        let profile = bot.acting.send_as(old, get_profile::v3::Request::new(old.clone())).await?;
        let name = profile.get("displayname").and_then(JsonValue::as_str).unwrap_or(old.localpart()).to_owned();
        let base = name.split(" (moved to ").next().unwrap_or(&name).to_owned();
        let new_name = format!("{base} (moved to {})", t.new);
        let req = set_profile_field::v3::Request::new(old.clone(), ProfileFieldValue::DisplayName(new_name.clone()));
        bot.acting.send_as(old, req).await?;
        lines.push(format!("Your display name is now “{new_name}”."));
    }
    bot.reply(ctx, lines.join("\n")).await
}

/// The new account is joined and holds at least the old account's rank (a room-version-12
/// creator's rank can't be matched, so its creator stays).
async fn safe_to_leave(bot: &Bot, room: &RoomId, old: &UserId, new: &UserId) -> Result<bool, HsError> {
    let Some(facts) = world::room_facts(&bot.acting, old, new, &room.to_owned()).await? else {
        return Ok(false);
    };
    if facts.new_membership != Some(MembershipState::Join) {
        return Ok(false);
    }
    let pl = facts.power_levels();
    Ok(pl.for_user(new) >= pl.for_user(old))
}

/// `export --to NEW --auto`, when NEW is active: offers NEW the move in its DM with the bot
/// (opened if `dm` is `None`). Nothing is written into NEW before NEW answers `accept` there. An
/// offer is made once; an expired one is dropped.
pub async fn offer(bot: &Bot, new: &UserId, dm: Option<OwnedRoomId>) -> Result<(), HsError> {
    let Some(auto) = bot.store.auto_for(new).map_err(store_err)? else { return Ok(()) };
    if auto.offered_in.is_some() {
        return Ok(());
    }
    if auto.expires_at_ms <= now_ms() {
        bot.store.take_auto(new).await.map_err(store_err)?;
        return Ok(());
    }
    // The account's DM with the bot, if it has one; a new one only if not (a retried offer must
    // not open a room each time).
    let known = bot.store.dm_rooms_of(new).map_err(store_err)?.into_iter().next();
    let dm = match dm.or(known) {
        Some(dm) => dm,
        None => {
            let mut req = create_room::v3::Request::new();
            req.invite = vec![new.to_owned()];
            req.is_direct = true;
            req.preset = Some(create_room::v3::RoomPreset::TrustedPrivateChat);
            let room = bot.hs.send(req).await?.room_id;
            bot.store.set_dm_room(&room, new).map_err(store_err)?;
            room
        }
    };
    let summary = match bot
        .store
        .codes_of(&auto.old)
        .map_err(store_err)?
        .into_iter()
        .find(|c| c.bound_to.as_deref() == Some(new))
    {
        Some(code) => match bot.store.get_bundle(&code.bundle).map_err(store_err)? {
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
    let digest = Sha256::digest(auto.code_hash);
    let cause: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    let ctx = Ctx { room_id: dm.clone(), event_id: offer_event_id(&cause), sender: new.to_owned() };
    bot.reply_n(&ctx, 7, text).await?;
    let _records = bot.records.lock().await;
    // Recorded only if it is still the same offer (not declined, replaced or forgotten meanwhile).
    if let Some(mut current) = bot.store.auto_for(new).map_err(store_err)?
        && current.code_hash == auto.code_hash
    {
        current.offered_in = Some(dm);
        bot.store.put_auto(&current).await.map_err(store_err)?;
    }
    tracing::info!(old = %auto.old, new = %new, "automatic move offered");
    Ok(())
}

fn offer_event_id(cause: &str) -> OwnedEventId {
    OwnedEventId::try_from(format!("$offer-{cause}")).expect("a valid event ID")
}

/// Tells the old account of an offer what became of it, in its DM with the bot if it has one.
async fn tell_old(bot: &Bot, old: &UserId, cause: &Ctx, text: String) -> Result<(), HsError> {
    let Some(dm) = bot.store.dm_rooms_of(old).map_err(store_err)?.into_iter().next() else { return Ok(()) };
    let ctx = Ctx { room_id: dm, event_id: cause.event_id.clone(), sender: old.to_owned() };
    bot.reply_n(&ctx, 6, text).await
}

/// `accept`: the new account consents to the move offered to it; the transfer starts.
pub async fn accept(bot: &Bot, ctx: &Ctx) -> Result<(), HsError> {
    let new = &ctx.sender;
    let records = bot.records.lock().await;
    let Some(auto) = bot.store.auto_for(new).map_err(store_err)? else {
        drop(records);
        return bot.reply(ctx, "No move is waiting for your answer.".into()).await;
    };
    if auto.expires_at_ms <= now_ms() {
        bot.store.take_auto(new).await.map_err(store_err)?;
        drop(records);
        return bot.reply(ctx, format!("The move offered by {} lapsed; ask them to export again.", auto.old)).await;
    }
    if let Some(refusal) = start_refusal(bot, &auto.old, new)? {
        drop(records);
        return bot.reply(ctx, format!("{refusal} The offer stays open until it lapses.")).await;
    }
    let record = match bot.store.redeem_code(&CodeHash(auto.code_hash), new).await.map_err(store_err)? {
        Ok(r) => r,
        Err(e) => {
            bot.store.take_auto(new).await.map_err(store_err)?;
            drop(records);
            return bot.reply(ctx, format!("This offer can't be used any more: {e}.")).await;
        }
    };
    bot.store.take_auto(new).await.map_err(store_err)?;
    let requirements = Requirements { max_rooms: Some(bot.config.handoff.max_rooms), ..Default::default() };
    let old_dm = bot.store.dm_rooms_of(&auto.old).map_err(store_err)?.into_iter().next();
    let id = bot.journal.new_id().map_err(store_err)?;
    let t =
        Transfer::new(id, auto.old.clone(), new.to_owned(), record.bundle, requirements, ctx.room_id.clone(), old_dm);
    bot.journal.put(&t).await.map_err(store_err)?;
    drop(records);
    bot.engine.spawn(t.id);
    tracing::info!(transfer = t.id, old = %auto.old, new = %new, "offered move accepted");
    bot.reply(ctx, format!("Accepted: moving the rooms and settings of {} here; progress follows.", auto.old)).await?;
    tell_old(bot, &auto.old, ctx, format!("{new} accepted your move; it is running now.")).await
}

/// `decline`: the new account refuses the offered move; its code is destroyed.
pub async fn decline(bot: &Bot, ctx: &Ctx) -> Result<(), HsError> {
    let new = &ctx.sender;
    let records = bot.records.lock().await;
    let Some(auto) = bot.store.take_auto(new).await.map_err(store_err)? else {
        drop(records);
        return bot.reply(ctx, "No move is waiting for your answer.".into()).await;
    };
    bot.store.remove_code(&CodeHash(auto.code_hash)).await.map_err(store_err)?;
    drop(records);
    tracing::info!(old = %auto.old, new = %new, "offered move declined");
    bot.reply(ctx, format!("Declined: nothing of {} comes here, and this account was not changed.", auto.old)).await?;
    tell_old(
        bot,
        &auto.old,
        ctx,
        format!("{new} declined your move. Nothing was changed there, and the code no longer works."),
    )
    .await
}

/// Watches pending offers: a local account that has a device (has signed in) is active, and is
/// offered its move in its own queue (so the offer and the account's own commands never race).
pub fn spawn_auto_watch(bot: Arc<Bot>) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            every.tick().await;
            let autos = match bot.store.autos() {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read pending offers");
                    continue;
                }
            };
            for auto in autos {
                if auto.offered_in.is_some() || auto.expires_at_ms <= now_ms() {
                    continue; // answered in the DM; expired ones go with retention
                }
                if auto.new.server_name() != bot.config.homeserver.domain {
                    continue; // remote accounts are offered it when they write to the bot
                }
                let active = match bot.acting.send_as(&auto.new, get_devices::v3::Request::new()).await {
                    Ok(r) => !r.devices.is_empty(),
                    Err(_) => false, // not registered yet
                };
                if active {
                    bot.enqueue(auto.new.clone(), super::Job::Offer(auto.new.clone()));
                }
            }
        }
    });
}

/// At start-up: offers and pending imports of users whose permission was revoked are dropped
/// (running transfers stop themselves when they resume). Returns how many.
pub async fn sweep_revoked(bot: &Bot) -> Result<usize, HsError> {
    let permitted = |u: &UserId| bot.config.permission(u) >= PermissionLevel::User;
    let mut n = 0;
    for auto in bot.store.autos().map_err(store_err)? {
        if !permitted(&auto.old) || !permitted(&auto.new) {
            bot.store.take_auto(&auto.new).await.map_err(store_err)?;
            bot.store.remove_code(&CodeHash(auto.code_hash)).await.map_err(store_err)?;
            n += 1;
        }
    }
    for mut t in bot.journal.all().map_err(store_err)? {
        if t.state == TransferState::AwaitingApproval && (!permitted(&t.old) || !permitted(&t.new)) {
            t.state = TransferState::Cancelled;
            bot.journal.put(&t).await.map_err(store_err)?;
            n += 1;
        }
    }
    Ok(n)
}
