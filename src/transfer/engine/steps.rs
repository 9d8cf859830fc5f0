//! The account steps (the merged settings, each once) and the deliveries (the key export, the
//! history), and the avatar carried from another server.

use std::collections::BTreeSet;

use ruma::api::client::media::create_content;
use ruma::events::room::MediaSource;
use ruma::{OwnedRoomId, UserId};

use super::Engine;
use crate::budget::Class;
use crate::bundle::Bundle;
use crate::transfer::plan::Plan;
use crate::transfer::progress::{Delivery, RoomHistory};
use crate::transfer::{AccountStep, Error, PATIENT, RoomStep, StepDone, StepFailure, StepOutcome, Transfer, world};

impl Engine {
    /// Account-level steps, each once (journaled in the transfer record). The new account's
    /// account data is read once, right before, and every merge is decided from it.
    pub(super) async fn account_steps(
        &self,
        t: &mut Transfer,
        bundle: &Bundle,
        steps: &[AccountStep],
        class: Class,
    ) -> Result<(), Error> {
        let todo: Vec<AccountStep> = steps.iter().copied().filter(|s| !t.account_steps.contains_key(s)).collect();
        if todo.is_empty() {
            return Ok(());
        }
        // The account steps are few requests, each one after the other, and they complete the
        // move the user sees (the profile, the DMs): one slot of a high `class` at a time.
        let world = {
            let _slot = self.budget.acquire(t.id, class).await;
            world::read_account(&self.acting, &t.new, bundle.preferences.client_settings.keys(), &todo).await?
        };
        // Kept before these merges write anything: what an undo puts back.
        t.before.get_or_insert_default().keep(&world, &todo);
        self.save(t).await?;
        let plan = t.plan.clone().expect("planned before the account steps");
        let room_steps = self.journal.room_steps(t.id).await?;
        let seated: BTreeSet<OwnedRoomId> = plan
            .rooms
            .iter()
            .filter(|r| matches!(room_steps.get(&r.room_id), Some(RoomStep::Done | RoomStep::AwaitingAccept)))
            .map(|r| r.room_id.clone())
            .collect();
        for step in todo {
            let _slot = self.budget.acquire(t.id, class).await;
            let done = match step.setting(&t.requirements) {
                Some(setting) => self.account.apply(setting, &t.old, &t.new, bundle, &seated, &world).await,
                None => self.deliver(step, t, bundle, &plan).await,
            };
            let outcome = match done {
                Ok(done) => StepOutcome::Done(done),
                Err(Error::Hs(e)) if !e.is_transient() => StepOutcome::Failed(StepFailure::Homeserver(e.to_string())),
                Err(e) => return Err(e),
            };
            t.account_steps.insert(step, outcome);
            self.save(t).await?;
        }
        Ok(())
    }

    /// Copies an avatar kept on another server into this one's media repository, as `new`, and
    /// points the bundle at the copy. If that fails the avatar stays where it is (still shown
    /// while its server is up), and the log says why.
    pub(super) async fn carry_avatar(&self, new: &UserId, bundle: &mut Bundle) {
        let Some(url) = bundle.profile.avatar_url.clone() else { return };
        if url.server_name().is_ok_and(|s| s == self.config.homeserver.domain) {
            return;
        }
        let copied = async {
            // The old server serves it through this one: its clock is `federation_patience`.
            let remote = self.acting.with_retry(PATIENT.within(self.config.handoff.federation_patience));
            let bytes = remote.download(&MediaSource::Plain(url.clone()), AVATAR_MAX).await?;
            let mut upload = create_content::v3::Request::new(bytes);
            // The homeserver makes thumbnails only for an image type.
            upload.content_type = Some(image_type(&upload.file).into());
            upload.filename = Some("avatar".into());
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(self.acting.send_as(new, upload).await?.content_uri)
        };
        match copied.await {
            Ok(copy) => bundle.profile.avatar_url = Some(copy),
            Err(e) => tracing::warn!(error = %e, "the avatar was not copied from the old server; it is linked there"),
        }
    }

    /// The account steps that hand files over to the new account's DM.
    async fn deliver(&self, step: AccountStep, t: &Transfer, bundle: &Bundle, plan: &Plan) -> Result<StepDone, Error> {
        match step {
            AccountStep::RoomKeys => {
                let Some(keys) = &bundle.room_keys else {
                    return Ok(StepDone::NoKeyExport);
                };
                self.reporter.deliver(t, Delivery::RoomKeys { armored: &keys.armored }).await?;
                Ok(StepDone::KeysDelivered)
            }
            AccountStep::History => self.history(t, bundle, plan).await,
            _ => Ok(StepDone::Nothing),
        }
    }

    /// With `import --history N`: the last N captured messages of each moved room.
    async fn history(&self, t: &Transfer, bundle: &Bundle, plan: &Plan) -> Result<StepDone, Error> {
        let n = t.requirements.history;
        if n == 0 {
            return Ok(StepDone::HistoryNotAsked);
        }
        let rooms: Vec<RoomHistory<'_>> = plan
            .rooms
            .iter()
            .filter_map(|r| bundle.rooms.iter().find(|e| e.room_id == r.room_id))
            .filter_map(|entry| {
                let history = entry.history.as_ref()?;
                let recent = &history.messages[history.messages.len().saturating_sub(n)..];
                (!recent.is_empty() || history.encrypted_count > 0).then(|| RoomHistory {
                    title: entry.name.clone().unwrap_or_else(|| entry.room_id.to_string()),
                    messages: recent,
                    encrypted: history.encrypted_count,
                })
            })
            .collect();
        if rooms.is_empty() {
            return Ok(StepDone::NoHistory);
        }
        let (count, messages) = (rooms.len(), rooms.iter().map(|r| r.messages.len()).sum::<usize>());
        let file = self.reporter.deliver(t, Delivery::History(rooms)).await?;
        Ok(StepDone::HistoryDelivered { messages, rooms: count, file })
    }
}

/// The largest avatar copied from another server.
const AVATAR_MAX: u64 = 10 * 1024 * 1024;

/// An image's type from its first bytes (the download says none), or none that the homeserver
/// would make thumbnails for.
fn image_type(bytes: &[u8]) -> &'static str {
    match infer::get(bytes) {
        Some(kind) if kind.matcher_type() == infer::MatcherType::Image => kind.mime_type(),
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first bytes of each kind of avatar clients upload, padded as a file would be.
    fn file(head: &[u8]) -> Vec<u8> {
        let mut bytes = head.to_vec();
        bytes.resize(64, 0);
        bytes
    }

    #[test]
    fn an_avatar_is_typed_from_its_first_bytes() {
        assert_eq!(image_type(&file(b"\x89PNG\r\n\x1a\n")), "image/png");
        assert_eq!(image_type(&file(b"\xFF\xD8\xFF\xE0")), "image/jpeg");
        assert_eq!(image_type(&file(b"GIF89a")), "image/gif");
        assert_eq!(image_type(&file(b"RIFF\0\0\0\0WEBPVP8 ")), "image/webp");
        // Not an image (a PDF), or nothing at all: no image type, so no thumbnails.
        assert_eq!(image_type(&file(b"%PDF-1.7")), "application/octet-stream");
        assert_eq!(image_type(b""), "application/octet-stream");
    }
}
