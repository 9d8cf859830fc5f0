//! The one door into a transfer. Four commands start one — `import CODE` of a code of this server,
//! `accept` of an offer, `import CODE` of a bundle file from another server, and the seat
//! reservation of `export --to @new:other.server` — and each brings its proof of consent, a
//! [`Ticket`]. The door holds the consent records' lock, checks that the accounts the transfer acts
//! for may start one now, uses the ticket up (redeems or claims the code, takes the offer), stores
//! the transfer and starts it. A command parses, calls [`enter`], and says what came back.

use ruma::{OwnedRoomId, OwnedUserId, UserId};

use super::consent::{pending_for, start_refusal_of};
use super::state::{Bot, BotError};
use crate::bundle::border::Dropped;
use crate::bundle::{Bundle, BundleId};
use crate::code::CodeHash;
use crate::code::{CodeRecord, RedeemError};
use crate::store::MAX_BUNDLES_PER_USER;
use crate::transfer::plan::Requirements;
use crate::transfer::{ClientProfile, Transfer, TransferKind, TransferState, watch};

/// Reservations of one account whose seats are watched at once ([`watch`]).
pub const MAX_WATCHED_PER_USER: usize = 5;

/// What lets a transfer start: the consent each way in brings.
pub enum Ticket {
    /// A code of this server, typed by the new account (`import CODE`). A code bound to the new
    /// account (`export --to`) starts the move; an unbound one waits for the old account's
    /// `approve`.
    Code(CodeHash),
    /// The code of an offer the new account accepted (`accept`); the offer is used up either way.
    Offer(CodeHash),
    /// A bundle from another server, opened with its code by the account it names: stored for that
    /// account, its code claimed here as used so it opens nothing a second time.
    Received { code: CodeHash, bundle: Box<Bundle>, expires_at_ms: u64, dropped: Vec<Dropped> },
    /// The old account's own `export --to` another server, its bundle stored: seats reserved until
    /// the code expires.
    Reservation { bundle: BundleId, expires_at_ms: u64 },
}

/// The transfer asked for, whatever the ticket.
pub struct Entry {
    pub old: OwnedUserId,
    pub new: OwnedUserId,
    pub requirements: Requirements,
    pub profile: ClientProfile,
    /// Where progress and the report go.
    pub new_dm: OwnedRoomId,
    pub old_dm: Option<OwnedRoomId>,
}

/// Why the door stayed shut. Nothing was used up or written.
#[derive(Debug)]
pub enum Refused {
    /// One of the accounts the transfer acts for may not start one now (its permission, or a
    /// transfer of its own running): the sentence says which.
    Busy(String),
    /// The code can't be used any more (used or expired meanwhile).
    Code(RedeemError),
    /// A received bundle's code was used here before.
    AlreadyClaimed,
    /// No import by that account waits for this one's answer (answered, cancelled, lapsed).
    NotWaiting,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Busy(why) => f.write_str(why),
            Refused::Code(e) => write!(f, "{e}."),
            Refused::AlreadyClaimed => f.write_str(
                "This transfer code was already used here; ask the old account for a new one with `export --to`.",
            ),
            Refused::NotWaiting => {
                f.write_str("No such import is waiting for your approval (it may have lapsed with its code).")
            }
        }
    }
}

/// A transfer that went in: started, or waiting for the old account's approval.
pub struct Entered {
    pub transfer: Transfer,
    pub running: bool,
}

/// The accounts a transfer of `kind` acts for: a reservation only as the old account, a received
/// bundle only as the new one (the other is on another server), a move as both.
fn acts_for(kind: TransferKind, old: &UserId, new: &UserId) -> Vec<OwnedUserId> {
    match kind {
        TransferKind::Move => vec![old.to_owned(), new.to_owned()],
        TransferKind::Reserve => vec![old.to_owned()],
        TransferKind::Receive => vec![new.to_owned()],
    }
}

/// Lets a transfer in, if its ticket holds: see the module's comment.
pub async fn enter(bot: &Bot, entry: Entry, ticket: Ticket) -> Result<Result<Entered, Refused>, BotError> {
    let kind = match ticket {
        Ticket::Code(_) | Ticket::Offer(_) => TransferKind::Move,
        Ticket::Received { .. } => TransferKind::Receive,
        Ticket::Reservation { .. } => TransferKind::Reserve,
    };
    let Entry { old, new, requirements, profile, new_dm, old_dm } = entry;
    let records = bot.records.lock().await;
    let users = acts_for(kind, &old, &new);
    let users: Vec<&UserId> = users.iter().map(|u| &**u).collect();
    if let Some(refusal) = start_refusal_of(bot, &users).await? {
        return Ok(Err(Refused::Busy(refusal)));
    }
    // Each reservation whose seats are still watched costs a look now and then: a few per account.
    if kind == TransferKind::Reserve {
        let watched = bot.journal.of(&old).await?.iter().filter(|t| watch::is_watched(t)).count();
        if watched >= MAX_WATCHED_PER_USER {
            return Ok(Err(Refused::Busy(format!(
                "{old} already has {watched} reservations whose seats are still waiting for their new accounts (at most {MAX_WATCHED_PER_USER}); `cancel` one, or wait until they are taken or expire."
            ))));
        }
    }
    let (bundle, running, expires_at_ms, dropped) = match ticket {
        Ticket::Code(hash) => match bot.store.redeem_code(&hash, &new).await? {
            Ok(record) => {
                let approved = record.bound_to.as_deref() == Some(&*new);
                // An unanswered request lapses with its code.
                (record.bundle, approved, (!approved).then_some(record.expires_at_ms), vec![])
            }
            Err(e) => return Ok(Err(Refused::Code(e))),
        },
        Ticket::Offer(hash) => {
            let redeemed = bot.store.redeem_code(&hash, &new).await?;
            bot.store.take_auto(&new).await?;
            match redeemed {
                Ok(record) => (record.bundle, true, None, vec![]),
                Err(e) => return Ok(Err(Refused::Code(e))),
            }
        }
        Ticket::Received { code, bundle, expires_at_ms, dropped } => {
            // Held for the new account, which may `forget` it.
            let id = bot.store.put_bundle(&new, &bundle).await?;
            let record = CodeRecord {
                owner: old.clone(),
                bundle: id.clone(),
                expires_at_ms,
                bound_to: Some(new.clone()),
                redeemed_by: Some(new.clone()),
            };
            if !bot.store.claim_code(&code, &record).await? {
                bot.store.remove_bundle(&id).await?;
                return Ok(Err(Refused::AlreadyClaimed));
            }
            bot.store.remove_dropped_file(&new).await?;
            // Kept like the account's own exports: the newest few (no move of this account runs).
            bot.store.trim_bundles(&new, MAX_BUNDLES_PER_USER).await?;
            (id, true, None, dropped)
        }
        Ticket::Reservation { bundle, expires_at_ms } => (bundle, true, Some(expires_at_ms), vec![]),
    };
    let id = bot.journal.new_id().await?;
    let mut t = Transfer::new(id, old, new, bundle, requirements, new_dm, old_dm);
    t.kind = kind;
    t.profile = profile;
    t.dropped = dropped;
    t.expires_at_ms = expires_at_ms;
    if !running {
        t.state = TransferState::AwaitingApproval;
    }
    bot.journal.put(&t).await?;
    drop(records);
    if running {
        // Started before any answer is sent: the first rooms don't wait for it.
        bot.engine.spawn(t.id);
    }
    tracing::info!(transfer = t.id, old = %t.old, new = %t.new, kind = ?t.kind, running, "transfer entered");
    Ok(Ok(Entered { transfer: t, running }))
}

/// The old account's answer to an import that waits for its approval (an unbound code): `yes`
/// starts it, as [`enter`] would have; no denies it. Returns the answered transfer.
pub async fn answer(
    bot: &Bot,
    old: &UserId,
    importer: &UserId,
    yes: bool,
) -> Result<Result<Transfer, Refused>, BotError> {
    let records = bot.records.lock().await;
    // Read under the lock: the request may have been answered or cancelled meanwhile.
    let Some(mut t) = pending_for(bot, old).await?.into_iter().find(|t| t.new == importer) else {
        return Ok(Err(Refused::NotWaiting));
    };
    if yes && let Some(refusal) = start_refusal_of(bot, &[&t.old, &t.new]).await? {
        return Ok(Err(Refused::Busy(refusal)));
    }
    t.state = if yes { TransferState::Running } else { TransferState::Denied };
    t.expires_at_ms = None;
    bot.journal.put(&t).await?;
    drop(records);
    if yes {
        bot.engine.spawn(t.id);
    }
    Ok(Ok(t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ruma::user_id;

    #[test]
    fn a_transfer_acts_only_for_the_local_accounts_its_kind_names() {
        let (old, new) = (user_id!("@old:a.org"), user_id!("@new:b.org"));
        assert_eq!(acts_for(TransferKind::Move, old, new), [old.to_owned(), new.to_owned()]);
        assert_eq!(acts_for(TransferKind::Reserve, old, new), [old.to_owned()]);
        assert_eq!(acts_for(TransferKind::Receive, old, new), [new.to_owned()]);
    }
}
