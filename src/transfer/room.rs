//! One room's stages, from wherever its journal says it got to, for the service and the device
//! side alike. Pass 1 takes the new account's seat (the old account invites, the new one joins);
//! pass 2 finishes the room (carries the rank, applies the tags, posts the move notice). A resumed
//! stage re-checks the room before acting again (without a journal, the plan read right before says
//! what the room is: [`Announced::planned`]), and the notice's transaction ID comes from the move, so
//! nothing happens twice.
//!
//! In an end-to-end encrypted room no message of the move goes out in clear text (the service
//! can't encrypt as a user, and clients flag a clear-text message there): the move is marked on
//! the announcing account's own membership instead (its `reason`, and the notice's structured
//! field), which membership events carry unencrypted by design.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use ruma::api::Direction;
use ruma::api::client::membership::{invite_user, join_room_by_id_or_alias};
use ruma::api::client::message::{get_message_events, send_message_event};
use ruma::api::client::state::{get_state_event_for_key, send_state_event};
use ruma::api::client::tag::create_tag;
use ruma::api::error::ErrorKind;
use ruma::events::room::member::MembershipState;
use ruma::events::room::message::RoomMessageEventContent;
use ruma::events::room::power_levels::RoomPowerLevelsEventContent;
use ruma::events::{MessageLikeEventType, StateEventType};
use ruma::serde::Raw;
use ruma::{Int, OwnedServerName, OwnedUserId, RoomId, UInt, UserId};
use serde_json::{Value as JsonValue, json};
use tokio::time::Instant;

use super::journal::RoomJournal;
use super::plan::{Action, Blocked, RoomPlan, Warning};
use super::world::reservation_reason;
use super::{ClientProfile, Error, FailReason, RoomStep, SkipReason, Stage, Transfer, TransferKind};
use crate::budget;
use crate::bundle::RoomEntry;
use crate::config::{NotifyConfig, NotifySender};
use crate::homeserver::{Backoff, Homeserver, HsError, Retry, Transient, within};
use crate::html::to_html;
use crate::transfer::arrivals::{Arrival, Arrivals};
use crate::transfer::pace::{Pace, Verdict};

/// The field of move notices that clients and bots can read.
pub const MOVE_FIELD: &str = "org.handoff.move";

/// Joins tried again, 1, 2, 4 and 8 s apart, when the join is refused right after the invite
/// came: 15 s for the inviting server to store its own invite.
const JOINS_AFTER_INVITE: u32 = 4;

/// What a room's stages need: who acts, the journal, the notice settings.
pub struct RoomWork {
    pub accounts: Accounts,
    pub journal: RoomJournal,
    /// The move notice; `None`: none is posted.
    pub notify: Option<NotifyConfig>,
    /// How long a room waits for another homeserver it needs (`handoff.federation_patience`).
    pub patience: Duration,
    /// How long a received room without its invite waits for it at least while no other invite
    /// of the move comes ([`super::arrivals::QUIET`]); zero: not at all (no reservation runs alongside).
    pub invites_patience: Duration,
    /// The invites that received rooms wait for.
    pub arrivals: Arrivals,
    pub reach: Reach,
    /// The pace of reservation invites to servers that limit them.
    pub pace: Pace,
    /// What becomes of the move notice in an end-to-end encrypted room.
    pub encrypted_notice: EncryptedNotice,
}

/// What becomes of the move notice in an end-to-end encrypted room, where a clear-text message
/// would be flagged by every client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EncryptedNotice {
    /// Marked on the announcing account's membership ([`Notice::mark`]): the service can't
    /// encrypt as a user.
    #[default]
    Mark,
    /// Left to the caller, which sends it encrypted: the device side, the account's own client.
    Caller,
}

/// Whom a room's stages act as, and through which client. Every request that needs another
/// homeserver goes through a `remote` twin that tries each once: every failure of theirs (no
/// answer in time, a refused connection, a 5xx) is [`RoomWork::across`]'s to wait for, up to the
/// patience.
// One per engine or import, built once: its size does not matter, an indirection would.
#[allow(clippy::large_enum_variant)]
pub enum Accounts {
    /// The service: the registration acts as the accounts of `domain` (`?user_id=`).
    Service { acting: Homeserver, remote: Homeserver, domain: OwnedServerName },
    /// The device side: each account through its own session; the old one only where given.
    Own { new: OwnSession, old: Option<OwnSession> },
}

/// One account's session on the device side.
pub struct OwnSession {
    pub user: OwnedUserId,
    pub hs: Homeserver,
    remote: Homeserver,
}

impl OwnSession {
    pub fn new(user: OwnedUserId, hs: Homeserver) -> OwnSession {
        OwnSession { user, remote: hs.with_retry(Retry::NONE), hs }
    }
}

impl Accounts {
    /// Whether the stages can act as `user`.
    pub fn acts_for(&self, user: &UserId) -> bool {
        match self {
            Accounts::Service { domain, .. } => user.server_name() == domain,
            Accounts::Own { .. } => self.own(user).is_some(),
        }
    }

    fn own(&self, user: &UserId) -> Option<&OwnSession> {
        let Accounts::Own { new, old } = self else { return None };
        [Some(new), old.as_ref()].into_iter().flatten().find(|s| s.user == user)
    }

    /// The client acting as `user`: the service asserts any of its accounts, and each stage acts
    /// only for accounts its move's kind lets it; the device side holds the sessions it was given.
    fn client(&self, user: &UserId) -> Result<&Homeserver, HsError> {
        match self {
            Accounts::Service { acting, .. } => Ok(acting),
            Accounts::Own { .. } => self.own(user).map(|s| &s.hs).ok_or_else(|| not_here(user)),
        }
    }

    /// The same, trying each request once ([`RoomWork::across`] waits).
    fn remote(&self, user: &UserId) -> Result<&Homeserver, HsError> {
        match self {
            Accounts::Service { remote, .. } => Ok(remote),
            Accounts::Own { .. } => self.own(user).map(|s| &s.remote).ok_or_else(|| not_here(user)),
        }
    }
}

fn not_here(user: &UserId) -> HsError {
    HsError::Protocol(format!("this device has no session of {user}"))
}

/// One move as a room's stages see it: a service's [`Transfer`], or a device side's import.
#[derive(Debug, Clone, Copy)]
pub struct Move<'a> {
    /// The move's number: the key of its journal and its servers' clocks, and of its notice.
    pub id: u64,
    pub old: &'a UserId,
    pub new: &'a UserId,
    pub kind: TransferKind,
    pub profile: ClientProfile,
}

impl<'a> From<&'a Transfer> for Move<'a> {
    fn from(t: &'a Transfer) -> Move<'a> {
        Move { id: t.id, old: &t.old, new: &t.new, kind: t.kind, profile: t.profile }
    }
}

/// Whether a room may hold this move's notice already, from a run that stopped after posting it:
/// only then are its last messages read before the notice goes out (a read Synapse serves slowly,
/// one per room).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announced {
    /// No run of this move posted its notice here (its journal, or the caller, knows).
    No,
    Maybe,
}

impl Announced {
    /// From a journal: only a notice stage journaled as started may have posted it.
    pub fn journaled(from: &RoomStep) -> Announced {
        if *from == RoomStep::Started(Stage::Notify) { Announced::Maybe } else { Announced::No }
    }

    /// For a caller without a journal (the device side), which plans every run from what the
    /// homeserver says right before and starts every room from that plan as the engine starts its
    /// fresh ones (`Pending`: an invite an earlier run sent, sent again by the same account with
    /// the same reason, is the same invite to Synapse; a room the account is in is neither invited
    /// to nor joined again). A room the plan found the account outside of holds no notice of this
    /// move (unless the account left it since: then the notice's transaction ID, the same from the
    /// same device on every run, is answered with the first notice for a day); one it found the
    /// account in may be an earlier run's, and the notice is looked for.
    pub fn planned(room: &RoomPlan) -> Announced {
        if room.action == Action::Join { Announced::No } else { Announced::Maybe }
    }
}

/// How pass 2 went: the room's final step, or the stage that stopped it with its error; and the
/// rank's error, which stops no room.
#[derive(Debug)]
pub struct Finish {
    pub end: Result<RoomStep, (Stage, Error)>,
    pub rank: Option<HsError>,
}

/// Other homeservers that a transfer's rooms wait for, and since when each has been out of
/// reach: once one has been away longer than the patience, the next rooms that need it are
/// reported at once, instead of each waiting as long again.
#[derive(Default)]
pub struct Reach(Mutex<HashMap<(u64, String), Instant>>);

impl Reach {
    /// How long `servers` have been away for transfer `id` (zero the first time).
    fn away(&self, id: u64, servers: &str) -> Duration {
        self.failed(id, servers, Instant::now()).elapsed()
    }

    /// Since when `servers` have been away for transfer `id`, if they are.
    fn since(&self, id: u64, servers: &str) -> Option<Instant> {
        self.0.lock().expect("lock").get(&(id, servers.to_owned())).copied()
    }

    /// An attempt that began `at` failed: they are away since then, unless since before.
    fn failed(&self, id: u64, servers: &str, at: Instant) -> Instant {
        *self.0.lock().expect("lock").entry((id, servers.to_owned())).or_insert(at)
    }

    fn back(&self, id: u64, servers: &str) {
        self.0.lock().expect("lock").remove(&(id, servers.to_owned()));
    }

    /// Forgets a transfer's servers (at its end).
    pub fn forget(&self, id: u64) {
        self.0.lock().expect("lock").retain(|(t, _), _| *t != id);
    }
}

/// A room whose servers have been away for the whole patience already (another room waited it
/// out) still tries once, this long at most: a server that came back is noticed.
const LAST_LOOK: Duration = Duration::from_secs(5);

/// How long a request that needs another server holds its room's budget slot: one still running
/// after this is waiting for that server, not working this one, and lets others' work go first.
const WORKING: Duration = Duration::from_secs(2);

/// Why a request that needs another homeserver did not succeed.
#[derive(Debug)]
enum Unreached {
    /// Those servers did not answer for the whole patience: the last error, and how long.
    Away(HsError, Duration),
    /// A plain refusal (or any error that waiting would not cure).
    Refused(HsError),
}

impl std::fmt::Display for Unreached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unreached::Away(e, _) | Unreached::Refused(e) => e.fmt(f),
        }
    }
}

/// What is worth another try is the caller's to say ([`RoomWork::join_through`]).
impl Transient for Unreached {
    fn is_transient(&self) -> bool {
        false
    }
}

impl RoomWork {
    /// Runs `op`, a request that needs the homeservers `servers`, with one clock for them per
    /// transfer: whatever fails (no answer in time, a refused connection, a 5xx, a rate limit),
    /// it is tried again with backoff until they have been away for the patience, each attempt
    /// cut off at that deadline. The room's budget slot is given back while it waits.
    async fn across<F, Fut>(&self, t: Move<'_>, servers: &str, op: F) -> Result<(), Unreached>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), HsError>>,
    {
        self.across_unless(t, servers, op, |_| false).await
    }

    /// [`RoomWork::across`], ending early (as away) when `stop` says a failure is not worth
    /// waiting for on this clock.
    async fn across_unless<F, Fut>(
        &self,
        t: Move<'_>,
        servers: &str,
        mut op: F,
        stop: impl Fn(&HsError) -> bool,
    ) -> Result<(), Unreached>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), HsError>>,
    {
        let now = Instant::now();
        // Away already (another room waited): what is left of their clock, or one last look.
        let since = self.reach.since(t.id, servers).unwrap_or(now);
        let until = (since + self.patience).max(now + LAST_LOOK.min(self.patience));
        let tried = Backoff::new(Duration::from_millis(500), Duration::from_secs(15))
            .until(Some(until))
            .run(
                || {
                    let (started, attempt) = (Instant::now(), op());
                    async move {
                        let result = budget::away_after(WORKING, within(Some(until), attempt)).await;
                        if let Err(e) = &result
                            && e.is_transient()
                        {
                            self.reach.failed(t.id, servers, started);
                            tracing::info!(transfer = t.id, servers, error = %e, "another homeserver is out of reach, waiting");
                        }
                        result
                    }
                },
                |e: &HsError| e.is_transient() && !stop(e),
            )
            .await;
        match tried {
            Ok(()) => {
                self.reach.back(t.id, servers);
                Ok(())
            }
            Err(e) if e.is_transient() => {
                let away = self.reach.away(t.id, servers);
                tracing::warn!(transfer = t.id, servers, error = %e, "another homeserver stayed out of reach");
                Err(Unreached::Away(e, away))
            }
            Err(e) => Err(Unreached::Refused(e)),
        }
    }

    /// Sends an invite that the new account's server must sign, at the lane's pace ([`Pace`]):
    /// at full speed on the patience clock until the refusals show that server limits these
    /// invites, then one try at a time at the rate that gets through, until nothing has landed
    /// for [`Pace::gave_up`]'s span.
    async fn invite_across<F, Fut>(&self, t: Move<'_>, mut op: F) -> Result<(), Unreached>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), HsError>>,
    {
        let server = t.new.server_name().to_owned();
        loop {
            if !self.pace.is_paced(t.id) {
                let stop = |_: &HsError| self.pace.refused(t.id, &server, false) == Verdict::Paced;
                match self.across_unless(t, server.as_str(), &mut op, stop).await {
                    Ok(()) => {
                        self.pace.landed(t.id, &server);
                        return Ok(());
                    }
                    Err(Unreached::Away(..)) if self.pace.is_paced(t.id) => {}
                    Err(e) => return Err(e),
                }
            }
            // Paced: the room gives its budget slot back while it waits for its turn.
            let tried = budget::away(async {
                let turn = self.pace.turn(t.id).await?;
                let until = Some(Instant::now() + self.patience);
                Some((turn, within(until, op()).await))
            })
            .await;
            match tried {
                // Back to full speed meanwhile.
                None => {}
                Some((_turn, Ok(()))) => {
                    self.reach.back(t.id, server.as_str());
                    self.pace.landed(t.id, &server);
                    return Ok(());
                }
                Some((_turn, Err(e))) if e.is_transient() => {
                    self.pace.refused(t.id, &server, true);
                    if let Some(quiet) = self.pace.gave_up(t.id, self.patience) {
                        tracing::warn!(transfer = t.id, server = %server, error = %e, "no paced invite landed for long: the server is away");
                        return Err(Unreached::Away(e, quiet));
                    }
                }
                Some((_turn, Err(e))) => return Err(Unreached::Refused(e)),
            }
        }
    }

    /// Journals `Started(stage)` before a stage runs: the record of the previous stage's end, and
    /// what tells a resumed transfer to re-check the room before acting again.
    async fn started(&self, t: Move<'_>, room: &RoomId, stage: Stage) -> Result<(), Error> {
        Ok(self.journal.set_room_step(t.id, room, &RoomStep::Started(stage)).await?)
    }

    /// Whether a stage from `from` may have run before, and so re-checks the room first: one
    /// started (journaled so, or said so by a caller without a journal). `Pending`: the plan's
    /// reads, made right before, are what the room is.
    fn resumed(from: &RoomStep) -> bool {
        matches!(from, RoomStep::Started(_))
    }

    /// Pass 1: reserve (the old account invites) and join. `None` when the new account has its
    /// seat (joined, or invited if it is on another server) and the room goes on to pass 2;
    /// otherwise the room's final step.
    pub async fn take_seat<'t>(
        &self,
        t: impl Into<Move<'t>>,
        room: &RoomPlan,
        from: &RoomStep,
    ) -> Result<Option<RoomStep>, Error> {
        let t = t.into();
        let rid = &room.room_id;
        match room.action {
            Action::Blocked(b) => return Ok(Some(RoomStep::Skipped(SkipReason::Blocked(b)))),
            Action::Gone => return Ok(Some(RoomStep::Skipped(SkipReason::Gone))),
            Action::Join | Action::AlreadyJoined => {}
        }
        if t.kind == TransferKind::Receive {
            return self.join_received(t, room, from).await;
        }
        let local_new = self.accounts.acts_for(t.new) && t.kind == TransferKind::Move;
        let resumed = Self::resumed(from);
        // The invite and the join reach another homeserver when the accounts' servers differ (the
        // service acts as the old account only on its own server).
        let other_server = t.new.server_name() != t.old.server_name();

        // 1. Reserve: the old account invites the new one (checked against the room first).
        if !from.completed(Stage::Invite) {
            self.started(t, rid, Stage::Invite).await?;
            match self.new_membership(t, room, resumed).await? {
                Some(MembershipState::Join) | Some(MembershipState::Invite) => {}
                Some(MembershipState::Ban) => return Ok(Some(RoomStep::Skipped(SkipReason::Blocked(Blocked::Banned)))),
                _ => {
                    let invited = if !other_server {
                        invite(self.accounts.client(t.old)?, t.old, rid, t.new).await.map_err(Unreached::Refused)
                    } else {
                        // The new account's server signs the invite: it must answer, and may limit
                        // how many its user receives.
                        let remote = self.accounts.remote(t.old)?;
                        self.invite_across(t, || invite(remote, t.old, rid, t.new)).await
                    };
                    match invited {
                        Ok(()) => {}
                        Err(Unreached::Away(e, away)) => {
                            return Ok(Some(RoomStep::Failed(FailReason::InviteUnanswered {
                                server: t.new.server_name().to_owned(),
                                waited_secs: FailReason::seconds(away),
                                error: e.to_string(),
                                new: t.new.to_owned(),
                            })));
                        }
                        // A public room can be joined without the invite.
                        Err(Unreached::Refused(e))
                            if room.action == Action::Join && matches!(e.kind(), Some(ErrorKind::Forbidden)) => {}
                        Err(Unreached::Refused(e)) => {
                            return Ok(Some(RoomStep::Failed(FailReason::Invite { error: e.to_string() })));
                        }
                    }
                }
            }
        }
        // 2. Join: a local new account is joined by the service; a remote one accepts from its client.
        if !from.completed(Stage::Join) && local_new {
            self.started(t, rid, Stage::Join).await?;
            // A join into a room the account is in is not nothing: Synapse fills in the global
            // display name and avatar, and a per-room one set since is replaced by a new member event.
            if self.new_membership(t, room, resumed).await? != Some(MembershipState::Join) {
                if !other_server {
                    // The old account is in the room, so its server (the new one's) is too: no via
                    // servers needed.
                    if let Err(e) = join(self.accounts.client(t.new)?, t.new, rid, &[]).await {
                        return Ok(Some(RoomStep::Failed(FailReason::Join { error: e.to_string() })));
                    }
                } else {
                    // Acting as both accounts on two servers (the device side): through the via servers.
                    match self.join_through(t, room).await {
                        Ok(()) => {}
                        Err(Unreached::Away(e, away)) => return Ok(Some(unreached(room, e, away))),
                        Err(Unreached::Refused(e)) => {
                            return Ok(Some(RoomStep::Failed(FailReason::Join { error: e.to_string() })));
                        }
                    }
                }
            }
        }
        // The end of pass 1, and what a restart resumes from.
        self.started(t, rid, Stage::Joined).await?;
        Ok(None)
    }

    /// Pass 2 for a seated room: carry rank, tags, notify. Returns the room's final step.
    pub async fn finish<'t>(
        &self,
        t: impl Into<Move<'t>>,
        entry: Option<&RoomEntry>,
        room: &RoomPlan,
        from: &RoomStep,
    ) -> Result<RoomStep, Error> {
        self.finish_stages(t.into(), entry, room, from, Announced::journaled(from)).await.end.map_err(|(_, e)| e)
    }

    /// Pass 2, saying which stage stopped it and whether the rank was carried; `announced` says
    /// whether the room may hold the notice already.
    pub async fn finish_stages(
        &self,
        t: Move<'_>,
        entry: Option<&RoomEntry>,
        room: &RoomPlan,
        from: &RoomStep,
        announced: Announced,
    ) -> Finish {
        let mut rank = None;
        let end = self.finish_steps(t, entry, room, from, announced, &mut rank).await;
        Finish { end, rank }
    }

    async fn finish_steps(
        &self,
        t: Move<'_>,
        entry: Option<&RoomEntry>,
        room: &RoomPlan,
        from: &RoomStep,
        announced: Announced,
        rank: &mut Option<HsError>,
    ) -> Result<RoomStep, (Stage, Error)> {
        let rid = &room.room_id;
        let at = |stage| move |e: Error| (stage, e);
        // A reservation seats a remote account (its server joins it); a received bundle's new
        // account is this server's own.
        let local_new = self.accounts.acts_for(t.new) && t.kind != TransferKind::Reserve;
        // 3. Carry rank: re-read the power levels right before writing them. Only in a whole move:
        // a received bundle's old account is not acted for, and a reservation's invitee gets the
        // rank once the seat watch sees it joined (an invite alone, a typo in `--to`, gets none).
        if !from.completed(Stage::Rank)
            && t.kind == TransferKind::Move
            && let Some(level) = room.give_level
        {
            self.started(t, rid, Stage::Rank).await.map_err(at(Stage::Rank))?;
            let carried = match self.accounts.client(t.old) {
                Ok(hs) => carry_rank(hs, t.old, rid, t.new, level).await,
                Err(e) => Err(e),
            };
            if let Err(e) = carried {
                tracing::warn!(room_id = %rid, error = %e, "carrying the rank failed");
                *rank = Some(e);
            }
        }
        // 4. Tags, on the new account (PUT is idempotent).
        if !from.completed(Stage::Tags)
            && local_new
            && let Some(entry) = entry.filter(|e| !e.tags.is_empty())
        {
            self.started(t, rid, Stage::Tags).await.map_err(at(Stage::Tags))?;
            let tagged = match self.accounts.client(t.new) {
                Ok(hs) => apply_tags(hs, t.new, rid, entry).await,
                Err(e) => Err(e),
            };
            tagged.map_err(|e| (Stage::Tags, e.into()))?;
        }
        // 5. Notify: one notice per room, never two. A reservation announces nothing yet (the move
        // is announced when the new account takes its seat); a received bundle only when the old
        // account's invites prove the move, and only in rooms the old account is in.
        let announce = self.notify.is_some()
            && match t.kind {
                TransferKind::Move => true,
                TransferKind::Reserve => false,
                TransferKind::Receive => {
                    !from.completed(Stage::Notify)
                        && !room.warnings.contains(&Warning::Unreserved)
                        && matches!(self.reads(t.new, rid, t.old).await, Ok(Some(MembershipState::Join)))
                }
            };
        if announce && !from.completed(Stage::Notify) {
            self.started(t, rid, Stage::Notify).await.map_err(at(Stage::Notify))?;
            let encrypted = entry.is_some_and(|e| e.encrypted);
            self.notify(t, rid, local_new, encrypted, announced).await.map_err(at(Stage::Notify))?;
        }
        Ok(if local_new { RoomStep::Done } else { RoomStep::AwaitingAccept })
    }

    /// Pass 1 of a received bundle: the new account joins by the room's ID through the bundle's
    /// via servers. No invite (the old account's server sent it, or nobody did): a room that is
    /// not public and has no invite is skipped, saying what to do.
    async fn join_received(&self, t: Move<'_>, room: &RoomPlan, from: &RoomStep) -> Result<Option<RoomStep>, Error> {
        let rid = &room.room_id;
        if room.action == Action::Join && !from.completed(Stage::Join) {
            self.started(t, rid, Stage::Join).await?;
            // A resumed join re-checks first; the new account reads its own membership (a room it
            // is not in answers forbidden).
            let joined =
                Self::resumed(from) && matches!(self.reads(t.new, rid, t.new).await, Ok(Some(MembershipState::Join)));
            if !joined {
                match self.join_through(t, room).await {
                    Ok(()) => {}
                    Err(Unreached::Away(e, away)) => return Ok(Some(unreached(room, e, away))),
                    Err(Unreached::Refused(e)) if matches!(e.kind(), Some(ErrorKind::Forbidden)) => {
                        return Ok(Some(RoomStep::Skipped(SkipReason::NeedsInvite { old: t.old.to_owned() })));
                    }
                    Err(Unreached::Refused(e)) => {
                        return Ok(Some(RoomStep::Failed(FailReason::Join { error: e.to_string() })));
                    }
                }
            }
        }
        self.started(t, rid, Stage::Joined).await?;
        Ok(None)
    }

    /// Joins a room through its via servers (they must answer). The old account's server may
    /// still be reserving the seats while a received bundle is imported, at the rate this server
    /// lets its invites in: where the move is proven (some invite of it came) and the bundle does
    /// not say the old server won't reserve the room, a room without its invite yet waits for it,
    /// without its budget slot, while invites keep coming ([`super::arrivals`]).
    async fn join_through(&self, t: Move<'_>, room: &RoomPlan) -> Result<(), Unreached> {
        let rid = &room.room_id;
        let servers = room.via.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ");
        let awaits = !room.warnings.contains(&Warning::Unreserved) && !self.invites_patience.is_zero();
        let remote = self.accounts.remote(t.new).map_err(Unreached::Refused)?;
        // Joins refused since the invite came: the inviting server may not have its own invite
        // in the room yet when this one shows it (Synapse sends the invite to the invitee's server
        // before it stores it), so a join right after is refused for a moment.
        let mut after_invite: Option<u32> = None;
        loop {
            match self.across(t, &servers, || join(remote, t.new, rid, &room.via)).await {
                // Forbidden: no invite yet. Once it came, the join is tried again a few times.
                Err(Unreached::Refused(e)) if awaits && matches!(e.kind(), Some(ErrorKind::Forbidden)) => {
                    match after_invite {
                        None => {
                            tracing::debug!(transfer = t.id, room_id = %rid, "no invite yet: waiting for the reservation");
                            let reader = self.accounts.client(t.new).map_err(Unreached::Refused)?;
                            let wait = self.arrivals.wait_for(reader, t.id, t.new, t.old, rid, self.invites_patience);
                            match budget::away(wait).await {
                                Arrival::Came => after_invite = Some(0),
                                Arrival::Quiet => return Err(Unreached::Refused(e)),
                            }
                        }
                        Some(tries) if tries < JOINS_AFTER_INVITE => {
                            tracing::debug!(transfer = t.id, room_id = %rid, tries, "the invite came, the join is refused yet");
                            budget::away(tokio::time::sleep(Duration::from_secs(1 << tries))).await;
                            after_invite = Some(tries + 1);
                        }
                        Some(_) => return Err(Unreached::Refused(e)),
                    }
                }
                joined => return joined,
            }
        }
    }

    /// The new account's membership of a room as a stage takes it: fresh rooms were read when
    /// planning; a resumed stage re-checks the room first (as the old account sees it).
    async fn new_membership(
        &self,
        t: Move<'_>,
        room: &RoomPlan,
        resumed: bool,
    ) -> Result<Option<MembershipState>, Error> {
        Ok(match room.action {
            _ if resumed => self.membership(t.old, &room.room_id, t.new).await?,
            Action::AlreadyJoined => Some(MembershipState::Join),
            _ => None,
        })
    }

    async fn membership(
        &self,
        reader: &UserId,
        room: &RoomId,
        user: &UserId,
    ) -> Result<Option<MembershipState>, Error> {
        Ok(self.reads(reader, room, user).await?)
    }

    /// `user`'s membership of the room as `reader` sees it, through `reader`'s client.
    async fn reads(&self, reader: &UserId, room: &RoomId, user: &UserId) -> Result<Option<MembershipState>, HsError> {
        membership(self.accounts.client(reader)?, reader, room, user).await
    }

    /// Posts the move notice (in an encrypted room, marks the sender's membership with it). Where
    /// it may be there already, it is looked for first.
    async fn notify(
        &self,
        t: Move<'_>,
        room: &RoomId,
        local_new: bool,
        encrypted: bool,
        announced: Announced,
    ) -> Result<(), Error> {
        let Some(notify) = &self.notify else { return Ok(()) };
        let sender = match notify.sender {
            // The old account of a received bundle is remote: the new one says it moved.
            _ if t.kind == TransferKind::Receive => t.new,
            NotifySender::New if local_new => t.new,
            // The bot is not in the users' rooms, and a remote new account can't be acted for.
            _ => t.old,
        };
        let hs = self.accounts.client(sender)?;
        let notice = Notice { template: &notify.template, id: t.id, old: t.old, new: t.new, profile: t.profile };
        if encrypted {
            return match self.encrypted_notice {
                // Marked once whatever happened before: the mark reads the membership first.
                EncryptedNotice::Mark => Ok(notice.mark(hs, sender, room).await?),
                EncryptedNotice::Caller => Ok(()),
            };
        }
        if announced == Announced::Maybe && notice_exists(hs, sender, room, t.id).await? {
            return Ok(());
        }
        Ok(notice.post(hs, sender, room).await?)
    }
}

/// A room whose via servers did not answer for `away`.
fn unreached(room: &RoomPlan, e: HsError, away: Duration) -> RoomStep {
    RoomStep::Failed(FailReason::Unreached {
        servers: room.via.clone(),
        waited_secs: FailReason::seconds(away),
        error: e.to_string(),
        room: room.room_id.clone(),
    })
}

/// One room's membership of `user`, as `reader` sees it (`None`: it has none).
pub async fn membership(
    hs: &Homeserver,
    reader: &UserId,
    room: &RoomId,
    user: &UserId,
) -> Result<Option<MembershipState>, HsError> {
    let req = get_state_event_for_key::v3::Request::new(room.to_owned(), StateEventType::RoomMember, user.to_string());
    match hs.send_as(reader, req).await {
        Ok(resp) => {
            let content: JsonValue = serde_json::from_str(resp.event_or_content.get()).unwrap_or_default();
            Ok(content.get("membership").and_then(|m| serde_json::from_value(m.clone()).ok()))
        }
        Err(e) if matches!(e.kind(), Some(ErrorKind::NotFound)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The reservation: `old` invites `new`, saying why.
pub async fn invite(hs: &Homeserver, old: &UserId, room: &RoomId, new: &UserId) -> Result<(), HsError> {
    let mut invitee = invite_user::v3::InviteUserId::new(new.to_owned());
    invitee.reason = Some(reservation_reason(old));
    hs.send_as(old, invite_user::v3::Request::new(room.to_owned(), invitee.into())).await?;
    Ok(())
}

/// `user` joins by the room's ID, through `via` when its own server is not in the room.
pub async fn join(hs: &Homeserver, user: &UserId, room: &RoomId, via: &[OwnedServerName]) -> Result<(), HsError> {
    let mut req = join_room_by_id_or_alias::v3::Request::new(room.to_owned().into());
    req.via = via.to_vec();
    hs.send_as(user, req).await?;
    Ok(())
}

/// The room's tags from the bundle, on `user` (PUT is idempotent).
pub async fn apply_tags(hs: &Homeserver, user: &UserId, room: &RoomId, entry: &RoomEntry) -> Result<(), HsError> {
    for (name, info) in &entry.tags {
        let req = create_tag::v3::Request::new(user.to_owned(), room.to_owned(), name.to_string(), info.clone());
        hs.send_as(user, req).await?;
    }
    Ok(())
}

/// Gives `new` power level `level`, as `old`, re-reading the power levels right before.
pub async fn carry_rank(hs: &Homeserver, old: &UserId, room: &RoomId, new: &UserId, level: Int) -> Result<(), HsError> {
    let req =
        get_state_event_for_key::v3::Request::new(room.to_owned(), StateEventType::RoomPowerLevels, String::new());
    let resp = hs.send_as(old, req).await?;
    let mut content: RoomPowerLevelsEventContent =
        serde_json::from_str(resp.event_or_content.get()).map_err(|e| HsError::Protocol(e.to_string()))?;
    let current = content.users.get(new).copied().unwrap_or(content.users_default);
    if current >= level {
        return Ok(());
    }
    content.users.insert(new.to_owned(), level);
    let req = send_state_event::v3::Request::new(room.to_owned(), &ruma::events::EmptyStateKey, &content)
        .map_err(|e| HsError::Protocol(e.to_string()))?;
    hs.send_as(old, req).await?;
    Ok(())
}

/// The notice of one move: its text, and the structured field clients and bots read.
pub struct Notice<'a> {
    pub template: &'a str,
    /// The move's number: the notice's transaction ID, and how a resumed move finds its notice.
    pub id: u64,
    pub old: &'a UserId,
    pub new: &'a UserId,
    pub profile: ClientProfile,
}

impl Notice<'_> {
    fn text(&self) -> String {
        self.template.replace("{old}", self.old.as_str()).replace("{new}", self.new.as_str())
    }

    /// The structured field clients and bots read.
    fn field(&self) -> JsonValue {
        json!({
            "transfer": self.id,
            "from": self.old,
            "to": self.new,
            "profile": self.profile,
        })
    }

    /// The notice's `m.room.message` content: its text, and the field clients and bots read.
    pub fn content(&self) -> JsonValue {
        let text = self.text();
        let mut content = serde_json::to_value(RoomMessageEventContent::notice_html(text.clone(), to_html(&text)))
            .expect("content serialises");
        content[MOVE_FIELD] = self.field();
        content
    }

    /// Its transaction ID: the move's, so that a notice sent twice is one.
    pub fn txn_id(&self) -> String {
        format!("handoff-move-{}", self.id)
    }

    pub async fn post(&self, hs: &Homeserver, sender: &UserId, room: &RoomId) -> Result<(), HsError> {
        let content = self.content();
        let raw = Raw::from_json(serde_json::value::to_raw_value(&content).expect("json"));
        let req = send_message_event::v3::Request::new_raw(
            room.to_owned(),
            self.txn_id().into(),
            MessageLikeEventType::RoomMessage,
            raw,
        );
        hs.send_as(sender, req).await?;
        Ok(())
    }
}

impl Notice<'_> {
    /// Marks the move on `sender`'s own membership of the room (a join that keeps its name and
    /// avatar, with the notice's text as its `reason` and the notice's field), unless it is marked
    /// already: for an encrypted room, where a clear-text message would be flagged.
    pub async fn mark(&self, hs: &Homeserver, sender: &UserId, room: &RoomId) -> Result<(), HsError> {
        let req =
            get_state_event_for_key::v3::Request::new(room.to_owned(), StateEventType::RoomMember, sender.to_string());
        let current = hs.send_as(sender, req).await?;
        let mut content: JsonValue =
            serde_json::from_str(current.event_or_content.get()).map_err(|e| HsError::Protocol(e.to_string()))?;
        if content[MOVE_FIELD]["transfer"] == self.id {
            return Ok(());
        }
        if content["membership"] != "join" {
            return Err(HsError::Protocol(format!("{sender} is not in the room to mark the move")));
        }
        content["reason"] = self.text().into();
        content[MOVE_FIELD] = self.field();
        let raw = Raw::from_json(serde_json::value::to_raw_value(&content).expect("json"));
        let req = send_state_event::v3::Request::new_raw(
            room.to_owned(),
            StateEventType::RoomMember,
            sender.to_string(),
            raw,
        );
        hs.send_as(sender, req).await?;
        Ok(())
    }
}

/// Whether `sender`'s last messages in the room hold the notice of move `id`.
pub async fn notice_exists(hs: &Homeserver, sender: &UserId, room: &RoomId, id: u64) -> Result<bool, HsError> {
    let mut req = get_message_events::v3::Request::new(room.to_owned(), Direction::Backward);
    req.limit = UInt::from(50u32);
    req.filter.types = Some(vec!["m.room.message".into()]);
    req.filter.senders = Some(vec![sender.to_owned()]);
    let chunk = match hs.send_as(sender, req).await {
        Ok(r) => r.chunk,
        Err(e) if !e.is_transient() => return Ok(false),
        Err(e) => return Err(e),
    };
    Ok(chunk.iter().any(|ev| {
        ev.get_field::<JsonValue>("content").ok().flatten().and_then(|c| c.get(MOVE_FIELD)?.get("transfer")?.as_u64())
            == Some(id)
    }))
}

#[cfg(test)]
mod tests {
    //! The stages against the in-memory homeserver ([`Fake`]), in simulated time where they wait:
    //! what a user would check of a room (the new account in it, tagged, ranked, one notice),
    //! after a crash at any write, and with another server away.
    use super::*;
    use futures_util::StreamExt;
    use ruma::{OwnedRoomId, owned_room_id, owned_server_name, owned_user_id};
    use tokio_util::sync::CancellationToken;

    use crate::budget::{Budget, Class};
    use crate::bundle::{BundleId, Priority, RoomKind};
    use crate::homeserver::fake::{Answer, Endpoint, Fake};
    use crate::store::Store;
    use crate::transfer::PATIENT;
    use crate::transfer::journal::Journal;

    fn old() -> OwnedUserId {
        owned_user_id!("@old:example.org")
    }

    fn new() -> OwnedUserId {
        owned_user_id!("@new:example.org")
    }

    /// A new account on another server (a reservation's).
    fn remote_new() -> OwnedUserId {
        owned_user_id!("@new:other.org")
    }

    fn room_id() -> OwnedRoomId {
        owned_room_id!("!room:example.org")
    }

    /// The homeserver of example.org with one room, the old account in it at power level 100.
    fn homeserver() -> Fake {
        let fake = Fake::new("example.org");
        fake.create_room(&room_id(), &old());
        fake
    }

    /// The plan of a room to join, where the new account gets power level 50.
    fn plan(room_id: OwnedRoomId, via: Vec<OwnedServerName>) -> RoomPlan {
        RoomPlan {
            room_id,
            via,
            name: None,
            kind: RoomKind::Group,
            priority: Priority::Normal,
            action: Action::Join,
            give_level: Some(Int::from(50)),
            warnings: vec![],
        }
    }

    /// The bundle's entry of the room: a favourite (order 0.25), not encrypted.
    fn entry() -> RoomEntry {
        let mut entry = crate::bundle::tests::sample().rooms.remove(0);
        entry.room_id = room_id();
        entry.encrypted = false;
        entry
    }

    /// The service's stages, as the engine builds them.
    async fn service(fake: &Fake, journal: RoomJournal, patience: Duration) -> RoomWork {
        let acting = fake.appservice().await.with_retry(PATIENT);
        RoomWork {
            accounts: Accounts::Service {
                remote: acting.with_retry(Retry::NONE),
                acting,
                domain: owned_server_name!("example.org"),
            },
            journal,
            notify: Some(NotifyConfig::default()),
            patience,
            invites_patience: crate::transfer::arrivals::QUIET,
            arrivals: Arrivals::default(),
            reach: Reach::default(),
            pace: Default::default(),
            encrypted_notice: EncryptedNotice::Mark,
        }
    }

    /// The device side's stages, as `import` builds them: each account's own session, no journal.
    async fn device(fake: &Fake, old: Option<&UserId>, new: &UserId, patience: Duration) -> RoomWork {
        let old = match old {
            Some(old) => Some(OwnSession::new(old.to_owned(), fake.session(old).await)),
            None => None,
        };
        RoomWork {
            accounts: Accounts::Own { new: OwnSession::new(new.to_owned(), fake.session(new).await), old },
            journal: RoomJournal::Nothing,
            notify: Some(NotifyConfig { sender: NotifySender::New, ..NotifyConfig::default() }),
            patience,
            invites_patience: Duration::ZERO,
            arrivals: Arrivals::default(),
            reach: Reach::default(),
            pace: Default::default(),
            encrypted_notice: EncryptedNotice::Caller,
        }
    }

    /// Transfer 1, from the old account to `new`.
    fn transfer(new: OwnedUserId, kind: TransferKind) -> Transfer {
        let old = old();
        let mut t = Transfer::new(
            1,
            old.clone(),
            new,
            BundleId::new(&old, 1),
            Default::default(),
            "!dm:example.org".try_into().unwrap(),
            None,
        );
        t.kind = kind;
        t
    }

    /// A room through both passes from `from`, as the engine runs it.
    async fn run(work: &RoomWork, t: Move<'_>, room: &RoomPlan, from: RoomStep) -> RoomStep {
        let from = match from {
            from if from.is_seated() => from,
            from => match work.take_seat(t, room, &from).await.unwrap() {
                Some(end) => return end,
                None => RoomStep::Started(Stage::Joined),
            },
        };
        work.finish(t, Some(&entry()), room, &from).await.unwrap()
    }

    /// What a user checks of a moved room: the new account in it, with its favourite tag and
    /// its rank, and one notice of the move.
    fn assert_moved(fake: &Fake, new: &UserId, why: &str) {
        let room = room_id();
        assert_eq!(fake.membership(&room, new), Some(MembershipState::Join), "{why}");
        assert_eq!(fake.tags(new, &room).get("m.favourite").and_then(|t| t.order), Some(0.25), "{why}");
        assert_eq!(fake.level(&room, new), 50, "{why}");
        let notices = fake.messages(&room).iter().filter(|ev| ev["content"][MOVE_FIELD]["transfer"] == 1).count();
        assert_eq!(notices, 1, "{why}");
    }

    #[tokio::test]
    async fn a_room_moves_whole_joined_tagged_ranked_and_announced_once() {
        let fake = homeserver();
        let dir = tempfile::tempdir().unwrap();
        let journal = RoomJournal::Sled(Journal::new(Store::open(&dir.path().join("db")).unwrap()));
        let work = service(&fake, journal, Duration::from_secs(600)).await;
        let t = transfer(new(), TransferKind::Move);
        assert_eq!(run(&work, (&t).into(), &plan(room_id(), vec![]), RoomStep::Pending).await, RoomStep::Done);
        assert_moved(&fake, &new(), "moved");
        // The old account invited, the service joined the new one, and the old one announced it.
        let by = |endpoint| fake.seen().into_iter().filter(|s| s.endpoint == endpoint).map(|s| s.user).collect();
        let who: [Vec<_>; 3] = [by(Endpoint::Invite), by(Endpoint::Join), by(Endpoint::Send)];
        assert_eq!(who, [vec![Some(old())], vec![Some(new())], vec![Some(old())]]);
    }

    /// A room the plan found the new account in already: not invited nor joined again (a join
    /// would put the global display name back over a per-room one), still ranked, tagged and
    /// announced.
    #[tokio::test]
    async fn a_room_the_account_is_in_already_is_not_joined_again() {
        let fake = homeserver();
        fake.set_membership(&room_id(), &new(), MembershipState::Join);
        let dir = tempfile::tempdir().unwrap();
        let journal = RoomJournal::Sled(Journal::new(Store::open(&dir.path().join("db")).unwrap()));
        let work = service(&fake, journal, Duration::from_secs(600)).await;
        let t = transfer(new(), TransferKind::Move);
        let mut room = plan(room_id(), vec![]);
        room.action = Action::AlreadyJoined;
        assert_eq!(run(&work, (&t).into(), &room, RoomStep::Pending).await, RoomStep::Done);
        assert_moved(&fake, &new(), "moved");
        assert_eq!([Endpoint::Invite, Endpoint::Join].map(|e| fake.count(e)), [0, 0], "invites, joins asked");
    }

    /// An end-to-end encrypted room: no message of the move goes out (it would be clear text);
    /// the move is marked on the announcing account's own membership, keeping what it had, and
    /// once, also when the stage runs again as a resumed one would.
    #[tokio::test]
    async fn in_an_encrypted_room_the_move_is_marked_on_the_membership_and_no_message_is_sent() {
        let fake = homeserver();
        let work = service(&fake, RoomJournal::Nothing, Duration::from_secs(600)).await;
        let t = transfer(new(), TransferKind::Move);
        let room = plan(room_id(), vec![]);
        let mut encrypted = entry();
        encrypted.encrypted = true;
        assert_eq!(work.take_seat(&t, &room, &RoomStep::Pending).await.unwrap(), None);
        for pass in ["first", "again"] {
            let end = work.finish(&t, Some(&encrypted), &room, &RoomStep::Started(Stage::Joined)).await.unwrap();
            assert_eq!(end, RoomStep::Done, "{pass}");
        }
        let events = fake.messages(&room_id());
        assert!(events.iter().all(|ev| ev["type"] != "m.room.message"), "a message in an encrypted room: {events:?}");
        let marks: Vec<&JsonValue> = events.iter().filter(|ev| ev["content"][MOVE_FIELD]["transfer"] == 1).collect();
        assert_eq!(marks.len(), 1, "marked once: {events:?}");
        let mark = marks[0];
        // The old account announces by default: its own membership, still a join.
        assert_eq!((mark["type"].as_str(), mark["state_key"].as_str()), (Some("m.room.member"), Some(old().as_str())));
        assert_eq!(mark["content"]["membership"], "join");
        assert_eq!(mark["content"][MOVE_FIELD]["to"], new().as_str());
        assert!(mark["content"]["reason"].as_str().unwrap().contains(new().as_str()), "{mark}");
        assert_eq!(fake.membership(&room_id(), &new()), Some(MembershipState::Join));
    }

    /// A crash right after the homeserver applied any of the move's writes (its answer lost, the
    /// journal one step behind): resumed from the journal, the room ends moved, and nothing was
    /// asked twice: the invite, the join, the rank and the notice are re-checked first.
    #[tokio::test]
    async fn a_crash_after_any_write_then_a_resume_does_nothing_twice() {
        // The move's writes in order: invite, join, power levels, the tag, the notice.
        for crash in 1..=5 {
            let fake = homeserver();
            let dir = tempfile::tempdir().unwrap();
            let journal = Journal::new(Store::open(&dir.path().join("db")).unwrap());
            let work = service(&fake, RoomJournal::Sled(journal.clone()), Duration::from_secs(600)).await;
            let (t, room) = (transfer(new(), TransferKind::Move), plan(room_id(), vec![]));
            let crashed = fake.crash_after(crash);
            tokio::select! {
                end = run(&work, (&t).into(), &room, RoomStep::Pending) => panic!("no crash at write {crash}: {end:?}"),
                _ = crashed.notified() => {}
            }
            fake.restart();
            let from = journal.room_steps(t.id).await.unwrap().remove(&room_id()).expect("journaled");
            assert!(matches!(from, RoomStep::Started(_)), "{from:?}");
            let why = format!("crash after write {crash}, resumed from {from:?}");
            assert_eq!(run(&work, (&t).into(), &room, from).await, RoomStep::Done, "{why}");
            assert_moved(&fake, &new(), &why);
            let asked =
                [Endpoint::Invite, Endpoint::Join, Endpoint::SetPowerLevels, Endpoint::Send].map(|e| fake.count(e));
            assert_eq!(asked, [1, 1, 1, 1], "{why}: invites, joins, power levels, notices asked");
        }
    }

    /// A room through both passes as the device side runs it, without a journal: planned from
    /// what the homeserver says right before (the new account in the room or not), each stage
    /// looking for its notice where [`Announced::planned`] says.
    async fn run_unjournaled(fake: &Fake, work: &RoomWork, t: Move<'_>) -> RoomStep {
        let mut room = plan(room_id(), vec![]);
        if fake.membership(&room_id(), t.new) == Some(MembershipState::Join) {
            room.action = Action::AlreadyJoined;
        }
        let announced = Announced::planned(&room);
        if let Some(end) = work.take_seat(t, &room, &RoomStep::Pending).await.unwrap() {
            return end;
        }
        let from = RoomStep::Started(Stage::Joined);
        work.finish_stages(t, Some(&entry()), &room, &from, announced).await.end.unwrap()
    }

    /// The device side: its own sessions, no journal. A second run, planned again, finds
    /// everything done and asks nothing twice; no identity is asserted.
    #[tokio::test]
    async fn the_device_side_run_twice_without_a_journal_does_nothing_twice() {
        let fake = homeserver();
        let work = device(&fake, Some(&old()), &new(), Duration::from_secs(600)).await;
        let (old, new) = (old(), new());
        let t = Move { id: 1, old: &old, new: &new, kind: TransferKind::Move, profile: ClientProfile::Desktop };
        for run_ in ["first run", "second run"] {
            assert_eq!(run_unjournaled(&fake, &work, t).await, RoomStep::Done, "{run_}");
            assert_moved(&fake, &new, run_);
        }
        let asked = [Endpoint::Invite, Endpoint::Join, Endpoint::SetPowerLevels, Endpoint::Send].map(|e| fake.count(e));
        assert_eq!(asked, [1, 1, 1, 1], "invites, joins, power levels, notices asked");
        let seen = fake.seen();
        assert!(seen.iter().all(|s| s.query.iter().all(|(k, _)| k != "user_id")), "an identity was asserted");
        let sent = seen.iter().find(|s| s.endpoint == Endpoint::Send).unwrap();
        assert_eq!(sent.user.as_ref(), Some(&new), "the new account says it moved");
        // The first run read nothing of the room it had planned; the second looked before acting.
        assert_eq!(fake.count(Endpoint::Messages), 1, "the notice looked for once, by the second run");
    }

    /// The device side stopped right after the homeserver applied any of its writes (its answer
    /// lost), then run again, planned again: the room ends moved with one invite, one join, one
    /// rank and one notice.
    #[tokio::test]
    async fn the_device_side_stopped_after_any_write_and_run_again_does_nothing_twice() {
        for crash in 1..=5 {
            let fake = homeserver();
            let work = device(&fake, Some(&old()), &new(), Duration::from_secs(600)).await;
            let (old, new) = (old(), new());
            let t = Move { id: 1, old: &old, new: &new, kind: TransferKind::Move, profile: ClientProfile::Desktop };
            let crashed = fake.crash_after(crash);
            tokio::select! {
                end = run_unjournaled(&fake, &work, t) => panic!("no crash at write {crash}: {end:?}"),
                _ = crashed.notified() => {}
            }
            fake.restart();
            let why = format!("stopped after write {crash}");
            assert_eq!(run_unjournaled(&fake, &work, t).await, RoomStep::Done, "{why}");
            assert_moved(&fake, &new, &why);
            assert_eq!(fake.member_events(&room_id(), &new), 2, "{why}: one invite and one join");
            assert_eq!(fake.count(Endpoint::SetPowerLevels), 1, "{why}: power levels set");
        }
    }

    /// The new account's server (a reservation's invitee) away for the whole patience, whether it
    /// fails at once, refuses the connection or never answers: the room fails naming it, after
    /// the patience and not later. The transfer's next room that needs it has one last look.
    #[tokio::test(start_paused = true)]
    async fn another_server_away_for_the_patience_fails_the_room_naming_it() {
        let patience = Duration::from_secs(600);
        for away in [Answer::other_server_away(), Answer::Refused, Answer::Silent] {
            let fake = homeserver();
            let next = owned_room_id!("!next:example.org");
            fake.create_room(&next, &old());
            fake.script(Endpoint::Invite, away.clone(), None);
            let work = service(&fake, RoomJournal::Nothing, patience).await;
            let t = transfer(remote_new(), TransferKind::Reserve);

            let start = Instant::now();
            let step = work.take_seat(&t, &plan(room_id(), vec![]), &RoomStep::Pending).await.unwrap();
            let took = start.elapsed();
            let Some(RoomStep::Failed(FailReason::InviteUnanswered { server, waited_secs, new, .. })) = step else {
                panic!("{away:?}: {step:?}")
            };
            assert_eq!((server.as_str(), new), ("other.org", remote_new()), "{away:?}");
            // The last attempt is given its moment before the deadline: no wait ends closer to it.
            assert!((599..=600).contains(&waited_secs), "{away:?}: waited {waited_secs}");
            assert!(took >= patience - Duration::from_millis(500) && took <= patience, "{away:?}: took {took:?}");
            let tries = fake.count(Endpoint::Invite);
            match away {
                // Each attempt waits a minute at most (`REQUEST_LIMIT`), the last one cut at the deadline.
                Answer::Silent => assert_eq!(tries, 9, "attempts without an answer"),
                _ => assert!(tries > 10, "{away:?}: tried again meanwhile ({tries})"),
            }

            let start = Instant::now();
            let step = work.take_seat(&t, &plan(next, vec![]), &RoomStep::Pending).await.unwrap();
            let Some(RoomStep::Failed(FailReason::InviteUnanswered { waited_secs, .. })) = step else {
                panic!("{away:?}: {step:?}")
            };
            assert!(waited_secs >= 599, "{away:?}: the server's clock went on ({waited_secs})");
            assert!(start.elapsed() <= LAST_LOOK, "{away:?}: took {:?}", start.elapsed());
        }
    }

    /// The device side imports a received room through its via servers, which stay away: the
    /// room fails naming them after the patience.
    #[tokio::test(start_paused = true)]
    async fn a_received_room_whose_servers_stay_away_fails_naming_them() {
        let fake = Fake::new("example.org");
        fake.script(Endpoint::Join, Answer::other_server_away(), None);
        let patience = Duration::from_secs(60);
        let work = device(&fake, None, &new(), patience).await;
        let (old, new) = (owned_user_id!("@old:other.org"), new());
        let t = Move { id: 1, old: &old, new: &new, kind: TransferKind::Receive, profile: ClientProfile::Desktop };
        let far = plan(owned_room_id!("!far:other.org"), vec![owned_server_name!("other.org")]);
        let start = Instant::now();
        let step = work.take_seat(t, &far, &RoomStep::Pending).await.unwrap();
        let Some(RoomStep::Failed(FailReason::Unreached { servers, waited_secs, room, .. })) = step else {
            panic!("{step:?}")
        };
        assert_eq!((servers, room), (vec![owned_server_name!("other.org")], far.room_id));
        assert!((59..=60).contains(&waited_secs), "waited {waited_secs}");
        assert!(start.elapsed() <= patience, "took {:?}", start.elapsed());
        let joins = fake.seen().into_iter().filter(|s| s.endpoint == Endpoint::Join).collect::<Vec<_>>();
        assert!(joins.len() > 5, "tried again meanwhile");
        assert!(joins.iter().all(|j| j.query.contains(&("via".into(), "other.org".into()))), "{joins:?}");
    }

    /// `M_LIMIT_EXCEEDED` is waited out as long as the homeserver asked (`retry_after_ms`), not
    /// the backoff's first wait, then the stage goes on: on the device side's own session, and
    /// in the service's wait for another server.
    #[tokio::test(start_paused = true)]
    async fn a_rate_limit_is_waited_out_as_asked_then_the_stage_goes_on() {
        let (took, joins, joined) = device_join_limited(20_000, 1).await;
        assert!(took >= Duration::from_secs(20) && took < Duration::from_secs(21), "took {took:?}");
        assert_eq!((joins, joined), (2, Some(MembershipState::Join)));

        let fake = homeserver();
        fake.script(Endpoint::Invite, Answer::limited(3_000), Some(1));
        let work = service(&fake, RoomJournal::Nothing, Duration::from_secs(600)).await;
        let t = transfer(remote_new(), TransferKind::Reserve);
        let start = Instant::now();
        assert_eq!(work.take_seat(&t, &plan(room_id(), vec![]), &RoomStep::Pending).await.unwrap(), None);
        let took = start.elapsed();
        assert!(took >= Duration::from_secs(3) && took < Duration::from_secs(4), "took {took:?}");
        let invited = fake.membership(&room_id(), &remote_new());
        assert_eq!((fake.count(Endpoint::Invite), invited), (2, Some(MembershipState::Invite)));
    }

    /// Synapse at its defaults lets a user join rooms on other servers once per 100 s after a
    /// burst: the device side's join is asked to wait 100 s eight times in a row, more tries than
    /// its retries allow and longer than its longest wait, and still joins, when asked.
    #[tokio::test(start_paused = true)]
    async fn the_device_side_waits_out_a_long_rate_limit_in_full() {
        let (took, joins, joined) = device_join_limited(100_000, 8).await;
        assert!(took >= Duration::from_secs(800) && took < Duration::from_secs(802), "took {took:?}");
        assert_eq!((joins, joined), (9, Some(MembershipState::Join)));
    }

    /// The device side's seat in a room whose join is refused `times` in a row, each asking to
    /// wait `ms`: how long it took, the joins sent, and the new account's membership after.
    async fn device_join_limited(ms: u64, times: usize) -> (Duration, usize, Option<MembershipState>) {
        let fake = homeserver();
        fake.script(Endpoint::Join, Answer::limited(ms), Some(times));
        let work = device(&fake, Some(&old()), &new(), Duration::from_secs(600)).await;
        let (old, new) = (old(), new());
        let t = Move { id: 1, old: &old, new: &new, kind: TransferKind::Move, profile: ClientProfile::Desktop };
        let start = Instant::now();
        assert_eq!(work.take_seat(t, &plan(room_id(), vec![]), &RoomStep::Pending).await.unwrap(), None);
        (start.elapsed(), fake.count(Endpoint::Join), fake.membership(&room_id(), &new))
    }

    /// A reservation of 8 rooms to a server that takes 3 invites, then one every 100 s (the
    /// shape of Synapse's `rc_invites.per_user`, faster): every room is reserved, none failed
    /// though it takes longer than the patience, in about the time the limit allows, the paced
    /// lane says the rate it measured, and the refused invites stay few.
    #[tokio::test(start_paused = true)]
    async fn a_reservation_to_a_server_that_limits_invites_is_paced_not_failed() {
        let fake = Fake::new("example.org");
        let rooms: Vec<OwnedRoomId> =
            (0..8).map(|i| OwnedRoomId::try_from(format!("!room{i}:example.org")).unwrap()).collect();
        for room in &rooms {
            fake.create_room(room, &old());
        }
        let every = Duration::from_secs(100);
        fake.limit_remote_invites(3, every);
        // A patience shorter than the whole: a paced room must not fail on it.
        let work = service(&fake, RoomJournal::Nothing, Duration::from_secs(120)).await;
        let t = transfer(remote_new(), TransferKind::Reserve);
        let start = Instant::now();
        let news = work.pace.watch(t.id, &owned_server_name!("other.org"));
        let seats = futures_util::stream::iter(&rooms)
            .map(|room| {
                let (work, t) = (&work, &t);
                async move { work.take_seat(t, &plan(room.clone(), vec![]), &RoomStep::Pending).await.unwrap() }
            })
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await;
        let took = start.elapsed();
        assert!(seats.iter().all(Option::is_none), "{seats:?}");
        for room in &rooms {
            assert_eq!(fake.membership(room, &remote_new()), Some(MembershipState::Invite), "{room}");
        }
        // 5 invites after the burst, one per 100 s: 500 s at best; the probes cost a little more.
        assert!(took >= Duration::from_secs(500) && took < Duration::from_secs(800), "took {took:?}");
        let sent = fake.count(Endpoint::Invite);
        assert!(sent <= 8 + 16 + 5 * 3, "{sent} invites sent for 8 rooms");
        assert!(news.has_changed().unwrap(), "the lane never said it was paced");
        let note = work.pace.note(t.id).expect("still paced at the end");
        let measured = note.every.expect("a measured rate");
        assert!(measured >= every && measured < every * 3, "{measured:?}");
        assert_eq!(note.landed, 8);
    }

    /// A room waiting for a server that answers 502 gives its slot back between attempts (the
    /// budget's only one: another party gets it at once), and a cancel ends the wait at once,
    /// slot included, with no attempt after it.
    #[tokio::test(start_paused = true)]
    async fn a_waiting_room_lends_its_slot_and_a_cancel_ends_the_wait_at_once() {
        let fake = homeserver();
        fake.script(Endpoint::Invite, Answer::other_server_away(), None);
        let work = service(&fake, RoomJournal::Nothing, Duration::from_secs(600)).await;
        let (t, room) = (transfer(remote_new(), TransferKind::Reserve), plan(room_id(), vec![]));
        let budget = Budget::new(1);
        let stop = CancellationToken::new();
        let seat = work.take_seat(&t, &room, &RoomStep::Pending);
        // Boxed, as the engine's spawned task has it: a debug build's futures are large.
        let seat = Box::pin(budget.hold(t.id, Class::Normal, seat));
        let waiting = async {
            tokio::select! {
                seat = seat => Some(seat),
                _ = stop.cancelled() => None,
            }
        };
        let others = async {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let asked = Instant::now();
            let slot = tokio::time::timeout(Duration::from_secs(1), budget.acquire(2, Class::Low)).await;
            assert!(slot.is_ok(), "the waiting room kept the only slot");
            drop(slot);
            assert!(asked.elapsed() < Duration::from_secs(1));
            stop.cancel();
            Instant::now()
        };
        let (seat, cancelled_at) = tokio::join!(waiting, others);
        assert!(seat.is_none(), "the room's wait outlived the patience of the test: {seat:?}");
        assert!(cancelled_at.elapsed() < Duration::from_millis(100), "the cancel took {:?}", cancelled_at.elapsed());
        let tries = fake.count(Endpoint::Invite);
        assert!(tries >= 2, "tried again while it waited: {tries}");
        // Nothing left running: no attempt after the cancel, and the slot is back.
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(fake.count(Endpoint::Invite), tries);
        assert!(tokio::time::timeout(Duration::from_millis(10), budget.acquire(3, Class::Low)).await.is_ok());
    }

    #[test]
    fn a_server_is_away_since_its_first_failure_until_it_answers_and_per_transfer() {
        let reach = Reach::default();
        assert!(reach.away(1, "b.org") < Duration::from_millis(5), "the first failure starts the clock");
        std::thread::sleep(Duration::from_millis(20));
        // The next room that needs it sees how long it has been away already, not zero.
        assert!(reach.away(1, "b.org") >= Duration::from_millis(20));
        assert!(reach.away(2, "b.org") < Duration::from_millis(5), "another transfer has its own clock");
        reach.back(1, "b.org");
        assert!(reach.away(1, "b.org") < Duration::from_millis(5), "back: the clock starts again");
        std::thread::sleep(Duration::from_millis(20));
        reach.forget(2);
        assert!(reach.away(2, "b.org") < Duration::from_millis(5), "forgotten at the transfer's end");
    }
}
