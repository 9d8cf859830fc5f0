//! Executing a transfer: two passes over the plan, highest priority first (pass 1 invites and
//! joins every room, pass 2 carries rank, applies tags and posts the notice), each room's steps
//! journaled before and after they run, with all transfers' rooms drawing on one bounded pool.
//! On resume, a step that was started is re-checked against the room before it is done again,
//! and sends use transaction IDs derived from the transfer, so nothing happens twice.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt};
use ruma::api::Direction;
use ruma::api::client::config::{get_global_account_data, set_global_account_data};
use ruma::api::client::membership::{invite_user, join_room_by_id};
use ruma::api::client::message::{get_message_events, send_message_event};
use ruma::api::client::profile::set_profile_field;
use ruma::api::client::push::{set_pushrule, set_pushrule_enabled};
use ruma::api::client::state::{get_state_event_for_key, send_state_event};
use ruma::api::client::tag::create_tag;
use ruma::api::error::ErrorKind;
use ruma::events::direct::DirectEventContent;
use ruma::events::ignored_user_list::IgnoredUserListEventContent;
use ruma::events::room::member::MembershipState;
use ruma::events::room::message::{ReplacementMetadata, RoomMessageEventContent};
use ruma::events::room::power_levels::RoomPowerLevelsEventContent;
use ruma::events::{GlobalAccountDataEventType, MessageLikeEventType, StateEventType};
use ruma::profile::ProfileFieldValue;
use ruma::push::{
    Action, AnyPushRuleRef, HighlightTweakValue, NewConditionalPushRule, NewPatternedPushRule, NewPushRule,
    NewSimplePushRule, PushCondition, RuleKind, Ruleset, Tweak,
};
use ruma::serde::Raw;
use ruma::{Int, OwnedEventId, OwnedRoomId, RoomId, UInt, UserId};
use serde_json::{Value as JsonValue, json};

use super::plan::{self, Action as PlanAction, Plan, RoomPlan};
use super::{ClientProfile, RoomStep, StepOutcome, Transfer, TransferState, world};
use crate::bot::to_html;
use crate::bundle::Bundle;
use crate::config::{Config, NotifySender, PermissionLevel};
use crate::homeserver::{Homeserver, HsError, Retry};
use crate::store::{Store, StoreError};

/// Transient failures (homeserver away, rate limits) are waited out, however long it takes: the
/// transfer completes when the homeserver is back.
const PATIENT: Retry =
    Retry { attempts: u32::MAX, backoff: Duration::from_millis(250), max_wait: Duration::from_secs(15) };

/// The journal's mark for a room whose pass 1 (invite, join) is complete.
const JOINED: &str = "joined";

/// How pass 1 left a room.
enum Seat {
    /// Seated (its index in the plan, and its step): pass 2 finishes it.
    Taken(usize, RoomStep),
    /// Skipped or failed, journaled as such.
    Ended,
    /// Not started: the transfer was cancelled first.
    NotStarted,
}

/// The field of move notices that clients and bots can read.
pub const MOVE_FIELD: &str = "org.handoff.move";

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Hs(#[from] HsError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("transfer {0} not found")]
    Missing(u64),
}

/// Runs transfers: one task each, many at once, their rooms drawing on one bounded pool.
pub struct Engine {
    config: Arc<Config>,
    /// The bot's client (progress, reports, files).
    bot: Homeserver,
    /// Acts as the old and (local) new accounts.
    acting: Homeserver,
    store: Store,
    /// Transfers running in this process, with the handle that stops one at once.
    running: Mutex<HashMap<u64, tokio::task::AbortHandle>>,
    /// Transfers asked to stop (also persisted as `Cancelling`, for a restart).
    cancelling: Mutex<HashSet<u64>>,
    /// Rooms in flight across every transfer (`handoff.concurrency`): what the homeserver sees
    /// stays bounded however many users move at once. Waiters are served in turn, so a small
    /// transfer is not starved by a large one.
    rooms_in_flight: Arc<tokio::sync::Semaphore>,
}

impl Engine {
    pub fn new(config: Arc<Config>, bot: Homeserver, acting: Homeserver, store: Store) -> Arc<Self> {
        Arc::new(Engine {
            bot: bot.with_retry(PATIENT),
            acting: acting.with_retry(PATIENT),
            store,
            running: Mutex::new(HashMap::new()),
            cancelling: Mutex::new(HashSet::new()),
            rooms_in_flight: Arc::new(tokio::sync::Semaphore::new(config.handoff.concurrency.0)),
            config,
        })
    }

    /// Starts (or resumes) a transfer in the background, unless it is already running.
    pub fn spawn(self: &Arc<Self>, id: u64) {
        // Held while spawning, so the task's own removal (at its end) comes after the insert.
        let mut running = self.running.lock().expect("lock");
        if running.contains_key(&id) {
            return;
        }
        let engine = Arc::clone(self);
        let task = tokio::spawn(async move {
            // Removes the entry however the task ends: finished, failed, panicked or stopped.
            let _entry = RunningEntry { engine: Arc::clone(&engine), id };
            if let Err(e) = engine.run(id).await {
                tracing::error!(transfer = id, error = %e, "transfer stopped with an error; it resumes at the next start");
            }
        });
        running.insert(id, task.abort_handle());
    }

    /// Stops a transfer at once, wherever it is (for `forget`: its records are about to go).
    /// What it did stays done; the journal is as of its last step.
    pub fn stop(&self, id: u64) {
        if let Some(task) = self.running.lock().expect("lock").remove(&id) {
            task.abort();
            tracing::info!(transfer = id, "transfer stopped");
        }
    }

    /// The pool of rooms in flight (`handoff.concurrency`), shared with capture and planning
    /// reads so the homeserver's load stays bounded whatever runs.
    pub fn pool(&self) -> Arc<tokio::sync::Semaphore> {
        Arc::clone(&self.rooms_in_flight)
    }

    /// Resumes every transfer that was running when the service stopped.
    pub fn resume_all(self: &Arc<Self>) -> Result<usize, StoreError> {
        let mut n = 0;
        for t in self.store.transfers()? {
            if matches!(t.state, TransferState::Running | TransferState::Cancelling) {
                tracing::info!(transfer = t.id, old = %t.old, new = %t.new, "resuming transfer");
                self.spawn(t.id);
                n += 1;
            }
        }
        Ok(n)
    }

    pub fn is_running(&self, id: u64) -> bool {
        self.running.lock().expect("lock").contains_key(&id)
    }

    fn is_local(&self, user: &UserId) -> bool {
        user.server_name() == self.config.homeserver.domain
    }

    async fn run(&self, id: u64) -> Result<(), RunError> {
        let started = Instant::now();
        let mut t = self.store.get_transfer(id)?.ok_or(RunError::Missing(id))?;
        // Permission is checked at every start and resume: revoking it stops the transfer.
        if let Some(who) = [&t.old, &t.new].into_iter().find(|u| self.config.permission(u) < PermissionLevel::User) {
            t.state = TransferState::Cancelled;
            self.store.put_transfer(&t).await?;
            tracing::info!(transfer = id, user = %who, "transfer stopped: the user may no longer use handoff");
            self.say(&t, format!("This transfer was stopped: {who} may no longer use handoff on this server. What was done stays done.")).await?;
            return Ok(());
        }
        if t.state == TransferState::Cancelling {
            self.cancel(id);
        }
        let Some(stored) = self.store.get_bundle(&t.bundle)? else {
            t.state = TransferState::Cancelled;
            self.store.put_transfer(&t).await?;
            self.say(&t, "The bundle of this transfer is gone (deleted with `forget`, or past its retention). Nothing more will be done.".into()).await?;
            return Ok(());
        };
        let bundle = stored.bundle;
        if t.plan.is_none() {
            let rooms: Vec<OwnedRoomId> = bundle.rooms.iter().map(|r| r.room_id.clone()).collect();
            let world = world::read(&self.acting, &t.old, &t.new, rooms, &self.rooms_in_flight).await?;
            let plan = plan::plan(&bundle, &t.new, &t.requirements, &world);
            tracing::info!(
                transfer = id,
                rooms = plan.rooms.len(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "planned"
            );
            t.plan = Some(plan);
            self.store.put_transfer(&t).await?;
        }
        let plan = t.plan.clone().expect("planned above");
        if t.status_event.is_none() {
            let text = format!(
                "Moving {} rooms from {} to {}…\n{}",
                plan.rooms.len(),
                t.old,
                t.new,
                progress_bar(0, plan.rooms.len())
            );
            t.status_event = Some(self.post(&t.new_dm, &format!("status-{id}"), &text).await?);
            self.store.put_transfer(&t).await?;
        }

        self.profile_step(&mut t, &bundle, &plan).await?;
        let steps = self.store.room_steps(id)?;
        // Plan indices of the rooms left to do (indices, not references, keep the futures `Send`).
        let todo: Vec<usize> = (0..plan.rooms.len())
            .filter(|&i| !steps.get(&plan.rooms[i].room_id).is_some_and(RoomStep::is_final))
            .collect();
        let progress = Progress::new(&plan, &steps);
        let (bundle_ref, t_ref, progress_ref, steps_ref, plan_ref) = (&bundle, &t, &progress, &steps, &plan);

        // Pass 1, seats: every room's invite and join, highest priority first, so the new account
        // is in its rooms as early as the homeserver allows.
        let seats: Vec<Seat> = stream::iter(todo)
            .map(|index: usize| async move {
                let room = &plan_ref.rooms[index];
                let from = steps_ref.get(&room.room_id).cloned().unwrap_or(RoomStep::Pending);
                // Seated before a restart: straight to pass 2, without taking a slot.
                if stage_of(&from) >= 2 {
                    return Seat::Taken(index, from);
                }
                let _slot = self.rooms_in_flight.acquire().await.expect("the pool is never closed");
                if self.cancel_requested(id) {
                    return Seat::NotStarted;
                }
                let ended = match self.take_seat(t_ref, room, &from).await {
                    Ok(None) => {
                        progress_ref.seated.fetch_add(1, Ordering::Relaxed);
                        self.advance(t_ref, plan_ref, progress_ref).await;
                        return Seat::Taken(index, RoomStep::Started(JOINED.into()));
                    }
                    Ok(Some(step)) => step,
                    Err(e) => RoomStep::Failed(e.to_string()),
                };
                self.end_room(t_ref, plan_ref, progress_ref, room, &ended).await;
                Seat::Ended
            })
            .buffer_unordered(self.config.handoff.concurrency.0)
            .collect()
            .await;
        let cancelled = seats.iter().any(|s| matches!(s, Seat::NotStarted));
        let mut seated: Vec<(usize, RoomStep)> = seats
            .into_iter()
            .filter_map(|s| match s {
                Seat::Taken(index, from) => Some((index, from)),
                _ => None,
            })
            .collect();
        seated.sort_by_key(|(index, _)| *index);
        tracing::info!(
            transfer = id,
            seated = seated.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "rooms joined"
        );

        // Pass 2: rank, tags and the notice of every seated room, in the same order. A cancel does
        // not stop it: every room the new account was joined to is finished and announced.
        stream::iter(seated)
            .map(|(index, from): (usize, RoomStep)| async move {
                let _slot = self.rooms_in_flight.acquire().await.expect("the pool is never closed");
                let room = &plan_ref.rooms[index];
                let step = match self.finish_room(t_ref, bundle_ref, room, &from).await {
                    Ok(step) => step,
                    Err(e) => RoomStep::Failed(e.to_string()),
                };
                self.end_room(t_ref, plan_ref, progress_ref, room, &step).await;
            })
            .buffer_unordered(self.config.handoff.concurrency.0)
            .collect::<Vec<()>>()
            .await;

        let mut t = self.store.get_transfer(id)?.ok_or(RunError::Missing(id))?;
        // The report goes out before the final state is stored: a crash in between resumes and
        // posts it again under the same transaction ID (so once), instead of never.
        if cancelled || t.state == TransferState::Cancelling {
            let report = self.report(&t, &plan, true)?;
            self.finish_with(&mut t, TransferState::Cancelled, &report, None).await?;
            return Ok(());
        }
        tracing::info!(transfer = id, elapsed_ms = started.elapsed().as_millis() as u64, "rooms done");
        self.account_steps(&mut t, &bundle, &plan).await?;
        let report = self.report(&t, &plan, false)?;
        let headline = format!("Done: {}", report.headline);
        self.finish_with(&mut t, TransferState::Done, &report, Some(&headline)).await?;
        tracing::info!(transfer = id, elapsed_ms = started.elapsed().as_millis() as u64, "transfer done");
        Ok(())
    }

    /// Posts the report (and the status message's last edit), then stores the final state. A
    /// report that can't be posted for good (the DM is gone) is logged; the transfer still ends.
    async fn finish_with(
        &self,
        t: &mut Transfer,
        state: TransferState,
        report: &Report,
        status: Option<&str>,
    ) -> Result<(), RunError> {
        if let Some(text) = status
            && let Err(e) = self.edit_status(t, text).await
        {
            tracing::warn!(transfer = t.id, error = %e, "cannot edit the status message");
        }
        if let Err(e) = self.post_report(t, report).await {
            tracing::warn!(transfer = t.id, error = %e, "cannot post the report");
        }
        t.state = state;
        self.store.put_transfer(t).await?;
        Ok(())
    }

    /// Asks a running transfer to stop after the rooms in flight.
    pub fn cancel(&self, id: u64) {
        self.cancelling.lock().expect("lock").insert(id);
    }

    fn cancel_requested(&self, id: u64) -> bool {
        self.cancelling.lock().expect("lock").contains(&id)
    }

    /// Journals `Started(stage)` before a stage runs: the record of the previous stage's end, and
    /// what tells a resumed transfer to re-check the room before acting again.
    async fn started(&self, t: &Transfer, room: &RoomId, stage: &str) -> Result<(), RunError> {
        Ok(self.store.set_room_step(t.id, room, &RoomStep::Started(stage.into())).await?)
    }

    /// Journals a room's final step and counts it in the status message.
    async fn end_room(&self, t: &Transfer, plan: &Plan, progress: &Progress, room: &RoomPlan, step: &RoomStep) {
        if let Err(e) = self.store.set_room_step(t.id, &room.room_id, step).await {
            tracing::error!(error = %e, "cannot journal a room's outcome");
        }
        progress.done.fetch_add(1, Ordering::Relaxed);
        self.advance(t, plan, progress).await;
    }

    /// Pass 1 for one room, from wherever its journal says it got to: reserve (the old account
    /// invites) and join. `None` when the new account has its seat (joined, or invited if it is on
    /// another server) and the room goes on to pass 2; otherwise the room's final step.
    async fn take_seat(&self, t: &Transfer, room: &RoomPlan, from: &RoomStep) -> Result<Option<RoomStep>, RunError> {
        let rid = &room.room_id;
        match room.action {
            PlanAction::Blocked(b) => return Ok(Some(RoomStep::Skipped(b.explain().into()))),
            PlanAction::Gone => {
                return Ok(Some(RoomStep::Skipped(
                    "the old account is no longer in this room, or it no longer exists".into(),
                )));
            }
            PlanAction::Join | PlanAction::AlreadyJoined => {}
        }
        let stage = stage_of(from);
        let local_new = self.is_local(&t.new);

        // 1. Reserve: the old account invites the new one (checked against the room first).
        if stage < 1 {
            self.started(t, rid, "invite").await?;
            // Fresh rooms were read when planning; a resumed step re-checks the room first.
            let membership = match (from, room.action) {
                (RoomStep::Started(_), _) => self.membership(&t.old, rid, &t.new).await?,
                (_, PlanAction::AlreadyJoined) => Some(MembershipState::Join),
                _ => None,
            };
            match membership {
                Some(MembershipState::Join) | Some(MembershipState::Invite) => {}
                Some(MembershipState::Ban) => {
                    return Ok(Some(RoomStep::Skipped(plan::Blocked::Banned.explain().into())));
                }
                _ => {
                    let mut invitee = invite_user::v3::InviteUserId::new(t.new.clone());
                    invitee.reason = Some(format!("{} is moving to this account (handoff)", t.old));
                    let req = invite_user::v3::Request::new(rid.clone(), invitee.into());
                    if let Err(e) = self.acting.send_as(&t.old, req).await {
                        // A public room can be joined without the invite.
                        let public = room.action == PlanAction::Join && matches!(e.kind(), Some(ErrorKind::Forbidden));
                        if !public {
                            return Ok(Some(RoomStep::Failed(format!("the invite failed: {e}"))));
                        }
                    }
                }
            }
        }
        // 2. Join: a local new account is joined by the service; a remote one accepts from its client.
        if stage < 2 && local_new {
            self.started(t, rid, "join").await?;
            let resumed = matches!(from, RoomStep::Started(_));
            if !resumed || self.membership(&t.old, rid, &t.new).await? != Some(MembershipState::Join) {
                // The old account is local and in the room, so this server is too: no via servers needed.
                if let Err(e) = self.acting.send_as(&t.new, join_room_by_id::v3::Request::new(rid.clone())).await {
                    return Ok(Some(RoomStep::Failed(format!("joining failed: {e}"))));
                }
            }
        }
        // The end of pass 1, and what a restart resumes from.
        self.started(t, rid, JOINED).await?;
        Ok(None)
    }

    /// Pass 2 for a seated room: carry rank, tags, notify. Returns the room's final step.
    async fn finish_room(
        &self,
        t: &Transfer,
        bundle: &Bundle,
        room: &RoomPlan,
        from: &RoomStep,
    ) -> Result<RoomStep, RunError> {
        let rid = &room.room_id;
        let stage = stage_of(from);
        let local_new = self.is_local(&t.new);
        // 3. Carry rank: re-read the power levels right before writing them.
        if stage < 3
            && let Some(level) = room.give_level
        {
            self.started(t, rid, "rank").await?;
            if let Err(e) = self.carry_rank(&t.old, rid, &t.new, level).await {
                tracing::warn!(room_id = %rid, error = %e, "carrying the rank failed");
            }
        }
        // 4. Tags, on the new account (PUT is idempotent).
        if stage < 4
            && local_new
            && let Some(entry) = bundle.rooms.iter().find(|r| &r.room_id == rid && !r.tags.is_empty())
        {
            self.started(t, rid, "tags").await?;
            for (name, info) in &entry.tags {
                let req = create_tag::v3::Request::new(t.new.clone(), rid.clone(), name.to_string(), info.clone());
                self.acting.send_as(&t.new, req).await?;
            }
        }
        // 5. Notify: one notice per room, never two.
        if stage < 5 {
            self.started(t, rid, "notify").await?;
            // Only a notify step that was started may have posted its notice already.
            let resumed = matches!(from, RoomStep::Started(s) if s == "notify");
            self.notify(t, rid, local_new, resumed).await?;
        }
        Ok(if local_new { RoomStep::Done } else { RoomStep::AwaitingAccept })
    }

    async fn membership(
        &self,
        reader: &UserId,
        room: &RoomId,
        user: &UserId,
    ) -> Result<Option<MembershipState>, RunError> {
        let req =
            get_state_event_for_key::v3::Request::new(room.to_owned(), StateEventType::RoomMember, user.to_string());
        match self.acting.send_as(reader, req).await {
            Ok(resp) => {
                let content: JsonValue = serde_json::from_str(resp.event_or_content.get()).unwrap_or_default();
                Ok(content.get("membership").and_then(|m| serde_json::from_value(m.clone()).ok()))
            }
            Err(e) if matches!(e.kind(), Some(ErrorKind::NotFound)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn carry_rank(&self, old: &UserId, room: &RoomId, new: &UserId, level: Int) -> Result<(), RunError> {
        let req =
            get_state_event_for_key::v3::Request::new(room.to_owned(), StateEventType::RoomPowerLevels, String::new());
        let resp = self.acting.send_as(old, req).await?;
        let mut content: RoomPowerLevelsEventContent =
            serde_json::from_str(resp.event_or_content.get()).map_err(|e| HsError::Protocol(e.to_string()))?;
        let current = content.users.get(new).copied().unwrap_or(content.users_default);
        if current >= level {
            return Ok(());
        }
        content.users.insert(new.to_owned(), level);
        let req = send_state_event::v3::Request::new(room.to_owned(), &ruma::events::EmptyStateKey, &content)
            .map_err(|e| HsError::Protocol(e.to_string()))?;
        self.acting.send_as(old, req).await?;
        Ok(())
    }

    /// Posts the move notice. A resumed step first looks for one of this transfer in the room.
    async fn notify(&self, t: &Transfer, room: &RoomId, local_new: bool, resumed: bool) -> Result<(), RunError> {
        let sender = match self.config.handoff.notify.sender {
            NotifySender::New if local_new => t.new.clone(),
            // The bot is not in the users' rooms, and a remote new account can't be acted for.
            _ => t.old.clone(),
        };
        if resumed && self.notice_exists(&sender, room, t.id).await? {
            return Ok(());
        }
        let text =
            self.config.handoff.notify.template.replace("{old}", t.old.as_str()).replace("{new}", t.new.as_str());
        let mut content = serde_json::to_value(RoomMessageEventContent::notice_html(text.clone(), to_html(&text)))
            .expect("content serialises");
        content[MOVE_FIELD] = json!({
            "transfer": t.id,
            "from": t.old,
            "to": t.new,
            "profile": t.profile,
        });
        let raw = Raw::from_json(serde_json::value::to_raw_value(&content).expect("json"));
        let req = send_message_event::v3::Request::new_raw(
            room.to_owned(),
            format!("handoff-move-{}", t.id).into(),
            MessageLikeEventType::RoomMessage,
            raw,
        );
        self.acting.send_as(&sender, req).await?;
        Ok(())
    }

    async fn notice_exists(&self, sender: &UserId, room: &RoomId, transfer: u64) -> Result<bool, RunError> {
        let mut req = get_message_events::v3::Request::new(room.to_owned(), Direction::Backward);
        req.limit = UInt::from(50u32);
        req.filter.types = Some(vec!["m.room.message".into()]);
        req.filter.senders = Some(vec![sender.to_owned()]);
        let chunk = match self.acting.send_as(sender, req).await {
            Ok(r) => r.chunk,
            Err(e) if !e.is_transient() => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        Ok(chunk.iter().any(|ev| {
            ev.get_field::<JsonValue>("content")
                .ok()
                .flatten()
                .and_then(|c| c.get(MOVE_FIELD)?.get("transfer")?.as_u64())
                == Some(transfer)
        }))
    }

    /// Account-level steps, each once (journaled in the transfer record).
    async fn account_steps(&self, t: &mut Transfer, bundle: &Bundle, plan: &Plan) -> Result<(), RunError> {
        if !self.is_local(&t.new) {
            t.account_steps.insert(
                "account".into(),
                StepOutcome::Failed(format!(
                    "{} is on another server: tags, DMs, ignored users, push rules, settings and profile are applied by that server's handoff or your client",
                    t.new
                )),
            );
            return Ok(());
        }
        let steps: [(&str, StepFn); 7] = [
            ("direct", |e, t, b, p| Box::pin(e.merge_direct(t, b, p))),
            ("ignored_users", |e, t, b, _| Box::pin(e.merge_ignored(t, b))),
            ("push_rules", |e, t, b, _| Box::pin(e.apply_push_rules(t, b))),
            ("client_settings", |e, t, b, _| Box::pin(e.apply_settings(t, b))),
            ("old_mentions", |e, t, _, _| Box::pin(e.add_mention_rule(t))),
            ("room_keys", |e, t, b, _| Box::pin(e.deliver_keys(t, b))),
            ("history", |e, t, b, p| Box::pin(e.deliver_history(t, b, p))),
        ];
        self.account_step_list(t, bundle, plan, &steps).await
    }

    /// The profile goes first: set after the joins, it would add a member event to every room.
    async fn profile_step(&self, t: &mut Transfer, bundle: &Bundle, plan: &Plan) -> Result<(), RunError> {
        if !self.is_local(&t.new) {
            return Ok(());
        }
        let steps: [(&str, StepFn); 1] = [("profile", |e, t, b, _| Box::pin(e.apply_profile(t, b)))];
        self.account_step_list(t, bundle, plan, &steps).await
    }

    async fn account_step_list(
        &self,
        t: &mut Transfer,
        bundle: &Bundle,
        plan: &Plan,
        steps: &[(&str, StepFn)],
    ) -> Result<(), RunError> {
        for &(name, step) in steps {
            if t.account_steps.contains_key(name) {
                continue;
            }
            let outcome = match step(self, t, bundle, plan).await {
                Ok(done) => StepOutcome::Done(done),
                Err(RunError::Hs(e)) if !e.is_transient() => StepOutcome::Failed(e.to_string()),
                Err(e) => return Err(e),
            };
            t.account_steps.insert(name.into(), outcome);
            self.store.put_transfer(t).await?;
        }
        Ok(())
    }

    async fn global_data(
        &self,
        user: &UserId,
        kind: GlobalAccountDataEventType,
    ) -> Result<Option<JsonValue>, RunError> {
        match self.acting.send_as(user, get_global_account_data::v3::Request::new(user.to_owned(), kind)).await {
            Ok(r) => Ok(Some(r.account_data.deserialize_as().map_err(|e| HsError::Protocol(e.to_string()))?)),
            Err(e) if matches!(e.kind(), Some(ErrorKind::NotFound)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn set_global_data(&self, user: &UserId, kind: &str, content: &JsonValue) -> Result<(), RunError> {
        let raw = Raw::from_json(serde_json::value::to_raw_value(content).expect("json"));
        let req = set_global_account_data::v3::Request::new_raw(user.to_owned(), kind.into(), raw);
        self.acting.send_as(user, req).await?;
        Ok(())
    }

    /// `m.direct` on the new account gains the moved DMs; nothing it had is removed.
    async fn merge_direct(&self, t: &Transfer, bundle: &Bundle, plan: &Plan) -> Result<String, RunError> {
        let moved: BTreeSet<&OwnedRoomId> = self.moved_rooms(t, plan)?;
        let current: DirectEventContent = self
            .global_data(&t.new, GlobalAccountDataEventType::Direct)
            .await?
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default();
        let mut merged = current.clone();
        let mut added = 0;
        for contact in &bundle.contacts {
            let rooms = merged.entry(contact.user_id.clone().into()).or_default();
            for r in contact.dm_rooms.iter().filter(|r| moved.contains(r)) {
                if !rooms.contains(r) {
                    rooms.push(r.clone());
                    added += 1;
                }
            }
        }
        merged.retain(|_, rooms| !rooms.is_empty());
        if added > 0 {
            let content = serde_json::to_value(&merged).expect("json");
            self.set_global_data(&t.new, "m.direct", &content).await?;
        }
        Ok(format!("{added} DM room(s) marked as DMs"))
    }

    fn moved_rooms<'a>(&self, t: &Transfer, plan: &'a Plan) -> Result<BTreeSet<&'a OwnedRoomId>, RunError> {
        let steps = self.store.room_steps(t.id)?;
        Ok(plan
            .rooms
            .iter()
            .map(|r| &r.room_id)
            .filter(|r| matches!(steps.get(*r), Some(RoomStep::Done) | Some(RoomStep::AwaitingAccept)))
            .collect())
    }

    async fn merge_ignored(&self, t: &Transfer, bundle: &Bundle) -> Result<String, RunError> {
        let mut current: IgnoredUserListEventContent = self
            .global_data(&t.new, GlobalAccountDataEventType::IgnoredUserList)
            .await?
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_else(|| IgnoredUserListEventContent::new(Default::default()));
        let before = current.ignored_users.len();
        for user in &bundle.preferences.ignored_users {
            current.ignored_users.entry(user.clone()).or_default();
        }
        let added = current.ignored_users.len() - before;
        if added > 0 {
            let content = serde_json::to_value(&current).expect("json");
            self.set_global_data(&t.new, "m.ignored_user_list", &content).await?;
        }
        Ok(format!("{added} ignored user(s) added"))
    }

    /// Non-default rules are added (where the new account lacks them); default rules' enabled flags
    /// are mirrored.
    async fn apply_push_rules(&self, t: &Transfer, bundle: &Bundle) -> Result<String, RunError> {
        let Some(rules) = &bundle.preferences.push_rules else {
            return Ok("none in the bundle".into());
        };
        let current: Ruleset = self
            .global_data(&t.new, GlobalAccountDataEventType::PushRules)
            .await?
            .and_then(|v| v.get("global").cloned())
            .and_then(|g| serde_json::from_value(g).ok())
            .unwrap_or_default();
        let existing: BTreeMap<String, bool> = current.iter().map(|r| (r.rule_id().to_owned(), r.enabled())).collect();
        let (mut added, mut mirrored) = (0, 0);
        for (new_rule, enabled) in new_rules(rules) {
            let id = new_rule.rule_id().to_owned();
            let kind = new_rule.kind();
            if existing.contains_key(&id) {
                continue;
            }
            self.acting.send_as(&t.new, set_pushrule::v3::Request::new(new_rule)).await?;
            if !enabled {
                self.acting.send_as(&t.new, set_pushrule_enabled::v3::Request::new(kind, id, false)).await?;
            }
            added += 1;
        }
        for rule in rules.iter().filter(|r| r.is_server_default()) {
            let id = rule.rule_id();
            if existing.get(id).is_some_and(|e| *e != rule.enabled()) {
                let req = set_pushrule_enabled::v3::Request::new(kind_of(&rule), id.to_owned(), rule.enabled());
                self.acting.send_as(&t.new, req).await?;
                mirrored += 1;
            }
        }
        Ok(format!("{added} push rule(s) added, {mirrored} default rule(s) switched to match"))
    }

    async fn apply_settings(&self, t: &Transfer, bundle: &Bundle) -> Result<String, RunError> {
        let (mut set, mut conflicts) = (0, Vec::new());
        for (kind, content) in &bundle.preferences.client_settings {
            match self.global_data(&t.new, kind.as_str().into()).await? {
                None => {
                    self.set_global_data(&t.new, kind, content).await?;
                    set += 1;
                }
                Some(existing) if &existing == content => {}
                Some(_) => conflicts.push(kind.clone()),
            }
        }
        let mut out = format!("{set} client setting(s) applied");
        if !conflicts.is_empty() {
            out.push_str(&format!("; kept the new account's own {} (it differs)", conflicts.join(", ")));
        }
        Ok(out)
    }

    async fn apply_profile(&self, t: &Transfer, bundle: &Bundle) -> Result<String, RunError> {
        let mut done = vec![];
        if let Some(name) = &bundle.profile.display_name {
            let req = set_profile_field::v3::Request::new(t.new.clone(), ProfileFieldValue::DisplayName(name.clone()));
            self.acting.send_as(&t.new, req).await?;
            done.push("display name");
        }
        if let Some(avatar) = &bundle.profile.avatar_url {
            let req = set_profile_field::v3::Request::new(t.new.clone(), ProfileFieldValue::AvatarUrl(avatar.clone()));
            self.acting.send_as(&t.new, req).await?;
            done.push("avatar");
        }
        Ok(if done.is_empty() { "nothing to set".into() } else { format!("{} set", done.join(" and ")) })
    }

    /// Mentions of the old user ID keep notifying the new account.
    async fn add_mention_rule(&self, t: &Transfer) -> Result<String, RunError> {
        let condition: PushCondition = serde_json::from_value(json!({
            "kind": "event_property_contains",
            "key": "content.m\\.mentions.user_ids",
            "value": t.old,
        }))
        .map_err(|e| HsError::Protocol(e.to_string()))?;
        let rule = NewConditionalPushRule::new(
            "org.handoff.old_mentions".into(),
            vec![condition],
            vec![
                Action::Notify,
                Action::SetTweak(Tweak::Highlight(HighlightTweakValue::Yes)),
                Action::SetTweak(Tweak::Sound("default".into())),
            ],
        );
        self.acting.send_as(&t.new, set_pushrule::v3::Request::new(NewPushRule::Override(rule))).await?;
        Ok(format!("mentions of {} notify you", t.old))
    }

    /// The key export goes to the new account's DM, as a file, with instructions.
    async fn deliver_keys(&self, t: &Transfer, bundle: &Bundle) -> Result<String, RunError> {
        let Some(keys) = &bundle.room_keys else {
            return Ok("no key export in the bundle".into());
        };
        let name = "element-keys.txt";
        self.send_file(&t.new_dm, &format!("keys-{}", t.id), name, "text/plain", keys.armored.clone().into_bytes())
            .await?;
        self.post(
            &t.new_dm,
            &format!("keys-help-{}", t.id),
            "That file holds the encryption keys of your old account, still encrypted with the passphrase you chose when you exported them. Import it in your client (Element: Settings → Encryption → Import keys) with that passphrase to read your encrypted history.",
        )
        .await?;
        Ok("key export delivered".into())
    }

    /// With `import --history N`: the last N captured messages of each moved room, as one file in
    /// the new account's DM (HTML for desktop clients, plain text for mobile ones).
    async fn deliver_history(&self, t: &Transfer, bundle: &Bundle, plan: &Plan) -> Result<String, RunError> {
        let n = t.requirements.history;
        if n == 0 {
            return Ok("not asked for (import --history N)".into());
        }
        let html = t.profile == ClientProfile::Desktop;
        let (mut text, mut messages, mut rooms) = (String::new(), 0, 0);
        for r in &plan.rooms {
            let Some(entry) = bundle.rooms.iter().find(|e| e.room_id == r.room_id) else { continue };
            let Some(history) = &entry.history else { continue };
            let recent = &history.messages[history.messages.len().saturating_sub(n)..];
            if recent.is_empty() && history.encrypted_count == 0 {
                continue;
            }
            rooms += 1;
            let title = entry.name.clone().unwrap_or_else(|| entry.room_id.to_string());
            text.push_str(&if html {
                format!("<h2>{}</h2>\n<ul>\n", crate::bot::escape(&title))
            } else {
                format!("== {title} ==\n")
            });
            for m in recent {
                let when = humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + Duration::from_millis(m.origin_server_ts.get().into()),
                );
                let line = format!("[{when}] {}: {}", m.sender, m.content.body());
                text.push_str(&if html {
                    format!("<li>{}</li>\n", crate::bot::escape(&line))
                } else {
                    format!("{line}\n")
                });
                messages += 1;
            }
            if history.encrypted_count > 0 {
                let note = format!(
                    "({} encrypted messages are not copied: import your keys to read them in the room)",
                    history.encrypted_count
                );
                text.push_str(&if html { format!("<li><em>{note}</em></li>\n") } else { format!("{note}\n") });
            }
            if html {
                text.push_str("</ul>\n");
            }
        }
        if rooms == 0 {
            return Ok("the bundle carries no history (export --history N)".into());
        }
        let (name, mime) = if html { ("history.html", "text/html") } else { ("history.txt", "text/plain") };
        if html {
            text = format!(
                "<!doctype html><meta charset=utf-8><title>History from {}</title>\n{text}",
                crate::bot::escape(t.old.as_str())
            );
        }
        self.send_file(&t.new_dm, &format!("history-{}", t.id), name, mime, text.into_bytes()).await?;
        Ok(format!("{messages} message(s) from {rooms} room(s) delivered as {name}"))
    }

    /// Uploads `bytes` as the bot, encrypted, and posts them as a file message (which holds the key).
    async fn send_file(
        &self,
        room: &RoomId,
        key: &str,
        name: &str,
        mime: &str,
        bytes: Vec<u8>,
    ) -> Result<(), RunError> {
        let content = self.bot.upload_encrypted_file(name, mime, bytes).await?;
        self.send_bot(room, key, content).await?;
        Ok(())
    }

    /// Edits the status message at most every two seconds, and always for the last room.
    async fn advance(&self, t: &Transfer, plan: &Plan, progress: &Progress) {
        let (seated, done, total) =
            (progress.seated.load(Ordering::Relaxed), progress.done.load(Ordering::Relaxed), plan.rooms.len());
        let due = {
            let mut last = progress.last_edit.lock().expect("lock");
            let due = done == total || last.elapsed() >= Duration::from_secs(2);
            if due {
                *last = Instant::now();
            }
            due
        };
        if due {
            let text = format!(
                "Moving rooms from {} to {}: {seated} joined, {done} of {total} finished\n{}",
                t.old,
                t.new,
                progress_bar(done, total)
            );
            if let Err(e) = self.edit_status(t, &text).await {
                tracing::warn!(error = %e, "cannot edit the status message");
            }
        }
    }

    async fn edit_status(&self, t: &Transfer, text: &str) -> Result<(), RunError> {
        let Some(status) = &t.status_event else {
            return Ok(());
        };
        let content = RoomMessageEventContent::notice_html(text.to_owned(), to_html(text))
            .make_replacement(ReplacementMetadata::new(status.clone(), None));
        // Edits are not deduplicated on purpose: each carries newer progress.
        let txn = format!("edit-{}-{}", t.id, rand::random::<u64>());
        self.send_bot(&t.new_dm, &txn, content).await?;
        Ok(())
    }

    /// Posts a notice as the bot; `key` makes the transaction ID, so a resumed transfer can't post twice.
    pub async fn post(&self, room: &RoomId, key: &str, text: &str) -> Result<OwnedEventId, RunError> {
        self.send_bot(room, key, RoomMessageEventContent::notice_html(text.to_owned(), to_html(text))).await
    }

    async fn send_bot(
        &self,
        room: &RoomId,
        key: &str,
        content: RoomMessageEventContent,
    ) -> Result<OwnedEventId, RunError> {
        let req = send_message_event::v3::Request::new(room.to_owned(), format!("handoff-{key}").into(), &content)
            .map_err(|e| HsError::Protocol(e.to_string()))?;
        Ok(self.bot.send(req).await?.event_id)
    }

    async fn say(&self, t: &Transfer, text: String) -> Result<(), RunError> {
        self.post(&t.new_dm, &format!("say-{}-{}", t.id, rand::random::<u64>()), &text).await?;
        Ok(())
    }

    fn report(&self, t: &Transfer, plan: &Plan, cancelled: bool) -> Result<Report, RunError> {
        let steps = self.store.room_steps(t.id)?;
        Ok(Report::new(t, plan, &steps, cancelled))
    }

    async fn post_report(&self, t: &Transfer, report: &Report) -> Result<(), RunError> {
        let content = match t.profile {
            ClientProfile::Mobile => RoomMessageEventContent::notice_plain(report.digest()),
            ClientProfile::Desktop => RoomMessageEventContent::notice_html(report.plain(), report.html()),
        };
        self.send_bot(&t.new_dm, &format!("report-{}", t.id), content).await?;
        Ok(())
    }
}

/// Removes a transfer from [`Engine::running`] when its task ends, however it ends.
struct RunningEntry {
    engine: Arc<Engine>,
    id: u64,
}

impl Drop for RunningEntry {
    fn drop(&mut self) {
        if let Ok(mut running) = self.engine.running.lock() {
            running.remove(&self.id);
        }
    }
}

type StepFuture<'a> = std::pin::Pin<Box<dyn Future<Output = Result<String, RunError>> + Send + 'a>>;
type StepFn = for<'a> fn(&'a Engine, &'a Transfer, &'a Bundle, &'a Plan) -> StepFuture<'a>;

struct Progress {
    /// Rooms the new account has its seat in (pass 1 done).
    seated: AtomicUsize,
    /// Rooms with their final step (moved, skipped or failed).
    done: AtomicUsize,
    last_edit: Mutex<Instant>,
}

impl Progress {
    /// Counts what the journal says was done before this run.
    fn new(plan: &Plan, steps: &BTreeMap<OwnedRoomId, RoomStep>) -> Progress {
        let step = |r: &RoomPlan| steps.get(&r.room_id).cloned().unwrap_or(RoomStep::Pending);
        // Seated: past pass 1, whether finished since or not (skipped and failed rooms never were).
        let seated = plan.rooms.iter().filter(|r| match step(r) {
            RoomStep::Done | RoomStep::AwaitingAccept => true,
            s @ RoomStep::Started(_) => stage_of(&s) >= 2,
            _ => false,
        });
        let done = plan.rooms.iter().filter(|r| step(r).is_final());
        Progress {
            seated: AtomicUsize::new(seated.count()),
            done: AtomicUsize::new(done.count()),
            last_edit: Mutex::new(Instant::now()),
        }
    }
}

/// How many stages a room completed: 0 nothing, 1 invite, 2 join (pass 1 ends), 3 rank, 4 tags,
/// 5 notify.
fn stage_of(step: &RoomStep) -> u8 {
    match step {
        RoomStep::Pending => 0,
        RoomStep::Started(s) => match s.as_str() {
            "invite" => 0,
            "join" => 1,
            JOINED | "rank" => 2,
            "tags" => 3,
            _ => 4, // "notify"
        },
        _ => 5,
    }
}

fn progress_bar(done: usize, total: usize) -> String {
    let width = 20;
    let filled = (done * width).checked_div(total).unwrap_or(width);
    format!("[{}{}] {done}/{total}", "█".repeat(filled), "░".repeat(width - filled))
}

/// The bundle's push rules as rules to create, with their enabled flags. Server-default rules are
/// not created (they exist everywhere): their flags are mirrored instead.
fn new_rules(rules: &Ruleset) -> Vec<(NewPushRule, bool)> {
    let conditional = |r: &ruma::push::ConditionalPushRule| {
        NewConditionalPushRule::new(r.rule_id.clone(), r.conditions.clone(), r.actions.clone())
    };
    rules
        .iter()
        .filter(|r| !r.is_server_default())
        .filter_map(|rule| {
            let new = match rule {
                AnyPushRuleRef::Override(r) => NewPushRule::Override(conditional(r)),
                AnyPushRuleRef::Content(r) => NewPushRule::Content(NewPatternedPushRule::new(
                    r.rule_id.clone(),
                    r.pattern.clone(),
                    r.actions.clone(),
                )),
                AnyPushRuleRef::Room(r) => {
                    NewPushRule::Room(NewSimplePushRule::new(r.rule_id.clone(), r.actions.clone()))
                }
                AnyPushRuleRef::Sender(r) => {
                    NewPushRule::Sender(NewSimplePushRule::new(r.rule_id.clone(), r.actions.clone()))
                }
                AnyPushRuleRef::Underride(r) => NewPushRule::Underride(conditional(r)),
                #[allow(unreachable_patterns)]
                _ => return None, // kinds behind unstable features
            };
            Some((new, rule.enabled()))
        })
        .collect()
}

fn kind_of(rule: &AnyPushRuleRef<'_>) -> RuleKind {
    match rule {
        AnyPushRuleRef::Override(_) => RuleKind::Override,
        AnyPushRuleRef::Content(_) => RuleKind::Content,
        AnyPushRuleRef::Room(_) => RuleKind::Room,
        AnyPushRuleRef::Sender(_) => RuleKind::Sender,
        AnyPushRuleRef::Underride(_) => RuleKind::Underride,
        #[allow(unreachable_patterns)]
        _ => RuleKind::Override,
    }
}

/// The final report: counts, per-room outcomes, and what to do about skipped rooms.
pub struct Report {
    pub headline: String,
    pub moved: usize,
    pub awaiting: usize,
    pub skipped: Vec<(String, String)>,
    pub failed: Vec<(String, String)>,
    pub warnings: Vec<(String, String)>,
    pub account: Vec<(String, StepOutcome)>,
    pub left_out: usize,
    pub cancelled: bool,
}

impl Report {
    fn new(t: &Transfer, plan: &Plan, steps: &BTreeMap<OwnedRoomId, RoomStep>, cancelled: bool) -> Report {
        let label = |r: &RoomPlan| r.name.clone().unwrap_or_else(|| r.room_id.to_string());
        let (mut moved, mut awaiting, mut skipped, mut failed, mut warnings) = (0, 0, vec![], vec![], vec![]);
        for r in &plan.rooms {
            match steps.get(&r.room_id) {
                Some(RoomStep::Done) => moved += 1,
                Some(RoomStep::AwaitingAccept) => awaiting += 1,
                Some(RoomStep::Skipped(why)) => skipped.push((label(r), why.clone())),
                Some(RoomStep::Failed(why)) => failed.push((label(r), why.clone())),
                _ => {}
            }
            for w in &r.warnings {
                warnings.push((label(r), w.explain()));
            }
        }
        let headline = format!(
            "{}{moved} of {} rooms moved to {}{}{}{}",
            if cancelled { "Cancelled. " } else { "" },
            plan.rooms.len(),
            t.new,
            if awaiting > 0 { format!(", {awaiting} invites to accept") } else { String::new() },
            if skipped.is_empty() { String::new() } else { format!(", {} skipped", skipped.len()) },
            if failed.is_empty() { String::new() } else { format!(", {} failed", failed.len()) },
        );
        Report {
            headline,
            moved,
            awaiting,
            skipped,
            failed,
            warnings,
            account: t.account_steps.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            left_out: plan.left_out,
            cancelled,
        }
    }

    /// For mobile: short, plain.
    pub fn digest(&self) -> String {
        let mut out = self.headline.clone();
        for (room, why) in self.skipped.iter().chain(&self.failed) {
            out.push_str(&format!("\n✗ {room}: {why}"));
        }
        if self.awaiting > 0 {
            out.push_str("\nAccept the pending invites from your client.");
        }
        out
    }

    pub fn plain(&self) -> String {
        let mut out = format!("{}.\n", self.headline);
        let section = |out: &mut String, title: &str, items: &[(String, String)]| {
            if !items.is_empty() {
                out.push_str(&format!("\n{title}:\n"));
                for (room, why) in items {
                    out.push_str(&format!("• {room}: {why}\n"));
                }
            }
        };
        section(&mut out, "Skipped (what you can do)", &self.skipped);
        section(&mut out, "Failed (run `import` again with a new code to retry)", &self.failed);
        // The same warning in many rooms (a creator's rank, say) is said once, with the rooms.
        let mut grouped: Vec<(String, Vec<&str>)> = Vec::new();
        for (room, why) in &self.warnings {
            match grouped.iter_mut().find(|(w, _)| w == why) {
                Some((_, rooms)) => rooms.push(room),
                None => grouped.push((why.clone(), vec![room])),
            }
        }
        let grouped: Vec<(String, String)> = grouped
            .into_iter()
            .map(|(why, rooms)| {
                let shown = rooms.iter().take(5).copied().collect::<Vec<_>>().join(", ");
                let more = if rooms.len() > 5 { format!(" and {} more", rooms.len() - 5) } else { String::new() };
                (format!("{shown}{more}"), why)
            })
            .collect();
        section(&mut out, "Warnings", &grouped);
        if self.awaiting > 0 {
            out.push_str(&format!(
                "\n{} rooms wait for you to accept their invites from your new account's client.\n",
                self.awaiting
            ));
        }
        if !self.account.is_empty() {
            out.push_str("\nAccount:\n");
            for (step, outcome) in &self.account {
                let text = match outcome {
                    StepOutcome::Done(d) => format!("✓ {step}: {d}"),
                    StepOutcome::Failed(d) => format!("✗ {step}: {d}"),
                };
                out.push_str(&format!("{text}\n"));
            }
        }
        if self.left_out > 0 {
            out.push_str(&format!("\n{} room(s) of the bundle were left out by your import options.\n", self.left_out));
        }
        out.trim_end().to_owned()
    }

    pub fn html(&self) -> String {
        to_html(&self.plain())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_follow_the_journal() {
        assert_eq!(stage_of(&RoomStep::Pending), 0);
        assert_eq!(stage_of(&RoomStep::Started("invite".into())), 0);
        assert_eq!(stage_of(&RoomStep::Started("join".into())), 1);
        // The end of pass 1: pass 2 starts at the rank.
        assert_eq!(stage_of(&RoomStep::Started(JOINED.into())), 2);
        assert_eq!(stage_of(&RoomStep::Started("rank".into())), 2);
        assert_eq!(stage_of(&RoomStep::Started("notify".into())), 4);
        assert_eq!(stage_of(&RoomStep::Done), 5);
        assert_eq!(progress_bar(5, 10), format!("[{}{}] 5/10", "█".repeat(10), "░".repeat(10)));
    }
}
