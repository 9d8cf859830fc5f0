//! How the bot tells a transfer's story in the new account's DM: it renders the engine's news
//! ([`Reporter`]) into a status message that is edited as rooms complete, files, and the report.

use std::collections::HashMap;
use std::fmt::Display;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use ruma::events::room::message::{ReplacementMetadata, RoomMessageEventContent};
use ruma::{OwnedEventId, RoomId};

use super::outbox::Outbox;
use crate::homeserver::HsError;
use crate::html::{escape, to_html};
use crate::transfer::arrivals::Awaited;
use crate::transfer::pace::Paced;
use crate::transfer::plan::Warning;
use crate::transfer::progress::{Counts, Delivery, Place, Reporter, RoomHistory, Stopped};
use crate::transfer::report::Report;
use crate::transfer::undo::UndoReport;
use crate::transfer::{ClientProfile, PATIENT, StepOutcome, Transfer, TransferKind};
use crate::wording;

/// A chat message is edited at most this often (a 500-room move would otherwise be 1,000 edits).
const EDIT_EVERY: Duration = Duration::from_secs(2);
/// With many transfers at once, each is edited less often: about one edit a second in all, so
/// status messages don't take the homeserver's time from the rooms (an edit costs it about as
/// much as a room's notice).
const EDITS_IN_ALL_EVERY: Duration = Duration::from_secs(1);

/// Renders transfers into chat, as the bot.
pub struct ChatReporter {
    outbox: Outbox,
    /// When each transfer's status message was last edited.
    last_edit: Mutex<HashMap<u64, Instant>>,
}

impl ChatReporter {
    pub fn new(bot: &Outbox) -> ChatReporter {
        ChatReporter { outbox: bot.with_retry(PATIENT), last_edit: Mutex::new(HashMap::new()) }
    }

    /// Posts as the bot; `key` makes the transaction ID, so a resumed transfer can't post twice.
    async fn send(&self, room: &RoomId, key: &str, content: RoomMessageEventContent) -> Result<OwnedEventId, HsError> {
        self.outbox.send(room, format!("handoff-{key}").into(), content).await
    }

    async fn post(&self, room: &RoomId, key: &str, text: &str) -> Result<OwnedEventId, HsError> {
        self.send(room, key, RoomMessageEventContent::notice_html(text.to_owned(), to_html(text))).await
    }

    async fn edit_status(&self, t: &Transfer, text: &str) -> Result<(), HsError> {
        let Some(status) = &t.status_event else { return Ok(()) };
        self.edit(t, status, text).await
    }

    /// Whether transfer `id`'s status is due an edit (at most every [`EDIT_EVERY`], less often
    /// with many reporting; always the last one).
    fn due(&self, id: u64, done: usize, total: usize) -> bool {
        let mut last = self.last_edit.lock().expect("lock");
        let reporting = last.len() + usize::from(!last.contains_key(&id));
        let every = EDIT_EVERY.max(EDITS_IN_ALL_EVERY * reporting as u32);
        let at = last.entry(id).or_insert_with(|| Instant::now() - every);
        let due = done == total || at.elapsed() >= every;
        if due {
            *at = Instant::now();
        }
        if done == total {
            last.remove(&id);
        }
        due
    }

    async fn edit(&self, t: &Transfer, status: &ruma::EventId, text: &str) -> Result<(), HsError> {
        let content = RoomMessageEventContent::notice_html(text.to_owned(), to_html(text))
            .make_replacement(ReplacementMetadata::new(status.to_owned(), None));
        // Edits are not deduplicated on purpose: each carries newer progress.
        self.send(&t.new_dm, &format!("edit-{}-{}", t.id, rand::random::<u64>()), content).await?;
        Ok(())
    }

    /// Uploads `bytes` encrypted and posts them as a file message (which holds the key).
    async fn send_file(&self, t: &Transfer, key: &str, name: &str, mime: &str, bytes: Vec<u8>) -> Result<(), HsError> {
        let content = self.outbox.hs().upload_encrypted_file(name, mime, bytes).await?;
        self.send(&t.new_dm, key, content).await?;
        Ok(())
    }
}

impl Reporter for ChatReporter {
    fn waiting<'a>(&'a self, t: &'a Transfer, place: Place) -> BoxFuture<'a, Result<(), HsError>> {
        Box::pin(async move {
            let ahead = match place.ahead {
                0 => "yours is next".to_owned(),
                1 => "1 move is ahead of yours".to_owned(),
                n => format!("{n} moves are ahead of yours"),
            };
            let text = format!(
                "Many people are moving right now: {} moves are running and {ahead}. Yours starts by itself when a place frees up; nothing needs doing meanwhile. `status` shows your place, `cancel` leaves the line.",
                place.running
            );
            self.post(&t.new_dm, &format!("waiting-{}", t.id), &text).await?;
            Ok(())
        })
    }

    fn started<'a>(&'a self, t: &'a Transfer, counts: Counts) -> BoxFuture<'a, Result<OwnedEventId, HsError>> {
        Box::pin(async move {
            let text = match t.kind {
                TransferKind::Reserve => format!(
                    "Reserving seats for {} in {} rooms…\n{}",
                    t.new,
                    counts.total,
                    progress_bar(0, counts.total)
                ),
                _ => format!(
                    "Moving {} rooms from {} to {}…\n{}",
                    counts.total,
                    t.old,
                    t.new,
                    progress_bar(0, counts.total)
                ),
            };
            self.post(&t.new_dm, &format!("status-{}", t.id), &text).await
        })
    }

    fn progress<'a>(&'a self, t: &'a Transfer, c: Counts) -> BoxFuture<'a, Result<(), HsError>> {
        Box::pin(async move {
            if !self.due(t.id, c.done, c.total) {
                return Ok(());
            }
            let joined = if t.kind == TransferKind::Reserve { "invited" } else { "joined" };
            let text = format!(
                "Moving rooms from {} to {}: {} {joined}, {} of {} finished\n{}",
                t.old,
                t.new,
                c.seated,
                c.done,
                c.total,
                progress_bar(c.done, c.total)
            );
            self.edit_status(t, &text).await
        })
    }

    fn stopped<'a>(&'a self, t: &'a Transfer, why: Stopped) -> BoxFuture<'a, Result<(), HsError>> {
        Box::pin(async move {
            let text = match why {
                Stopped::Revoked(who) => format!(
                    "This transfer was stopped: {who} may no longer use handoff on this server. What was done stays done."
                ),
                Stopped::BundleGone => "The bundle of this transfer is gone (deleted with `forget`, or past its retention). Nothing more will be done.".to_owned(),
                Stopped::CancelledWaiting => {
                    "This transfer was cancelled while it waited for its turn: nothing was changed.".to_owned()
                }
            };
            self.post(&t.new_dm, &format!("stopped-{}", t.id), &text).await?;
            Ok(())
        })
    }

    fn deliver<'a>(&'a self, t: &'a Transfer, what: Delivery<'a>) -> BoxFuture<'a, Result<String, HsError>> {
        Box::pin(async move {
            match what {
                Delivery::RoomKeys { armored } => {
                    let name = "element-keys.txt";
                    let bytes = armored.as_bytes().to_vec();
                    self.send_file(t, &format!("keys-{}", t.id), name, "text/plain", bytes).await?;
                    self.post(
                        &t.new_dm,
                        &format!("keys-help-{}", t.id),
                        "That file holds the encryption keys of your old account, still encrypted with the passphrase you chose when you exported them. Import it in your client (Element: Settings → Encryption → Import keys) with that passphrase to read your encrypted history.",
                    )
                    .await?;
                    Ok(name.to_owned())
                }
                Delivery::History(rooms) => {
                    let html = t.profile == ClientProfile::Desktop;
                    let (name, mime) = if html { ("history.html", "text/html") } else { ("history.txt", "text/plain") };
                    let text = history_document(t, &rooms, html);
                    self.send_file(t, &format!("history-{}", t.id), name, mime, text.into_bytes()).await?;
                    Ok(name.to_owned())
                }
            }
        })
    }

    fn finished<'a>(&'a self, t: &'a Transfer, report: &'a Report) -> BoxFuture<'a, Result<(), HsError>> {
        Box::pin(async move {
            self.last_edit.lock().expect("lock").remove(&t.id);
            if !report.cancelled
                && let Err(e) = self.edit_status(t, &format!("Done: {}", headline(report))).await
            {
                tracing::warn!(transfer = t.id, error = %e, "cannot edit the status message");
            }
            let content = match t.profile {
                ClientProfile::Mobile => RoomMessageEventContent::notice_plain(digest(report)),
                ClientProfile::Desktop => {
                    let plain = plain(report);
                    let html = to_html(&plain);
                    RoomMessageEventContent::notice_html(plain, html)
                }
            };
            self.send(&t.new_dm, &format!("report-{}", t.id), content).await?;
            Ok(())
        })
    }

    fn paced<'a>(&'a self, t: &'a Transfer, pace: Option<&'a Paced>, c: Counts) -> BoxFuture<'a, Result<(), HsError>> {
        Box::pin(async move {
            let (key, text) = match pace {
                Some(p) => {
                    (format!("paced-{}-{}-{}", t.id, p.landed, p.every.is_some()), wording::paced(p, c.seated, c.total))
                }
                None => (format!("full-speed-{}-{}", t.id, c.seated), wording::full_speed(t.new.server_name())),
            };
            self.post(&t.new_dm, &key, &text).await?;
            Ok(())
        })
    }

    fn awaiting_invites<'a>(
        &'a self,
        t: &'a Transfer,
        awaited: &'a Awaited,
        c: Counts,
    ) -> BoxFuture<'a, Result<(), HsError>> {
        Box::pin(async move {
            let key = format!("awaiting-{}-{}", t.id, awaited.every.is_some());
            self.post(&t.new_dm, &key, &wording::awaiting_invites(awaited, &t.old, c.seated, c.total)).await?;
            Ok(())
        })
    }

    fn taken_up<'a>(&'a self, t: &'a Transfer, report: &'a Report) -> BoxFuture<'a, Result<(), HsError>> {
        Box::pin(async move {
            let text = taken_up_text(t, report);
            self.post(&t.new_dm, &format!("taken-up-{}", t.id), &text).await?;
            Ok(())
        })
    }

    fn undoing<'a>(&'a self, t: &'a Transfer) -> BoxFuture<'a, Result<OwnedEventId, HsError>> {
        Box::pin(async move {
            let text = format!(
                "Undoing your move from {}: leaving the rooms it joined, then putting your settings back…",
                t.old
            );
            self.post(&t.new_dm, &format!("undo-{}", t.id), &text).await
        })
    }

    fn undo_progress<'a>(&'a self, t: &'a Transfer, done: usize, total: usize) -> BoxFuture<'a, Result<(), HsError>> {
        Box::pin(async move {
            let Some(status) = t.undo.as_ref().and_then(|u| u.status_event.as_ref()) else { return Ok(()) };
            if !self.due(t.id, done, total) {
                return Ok(());
            }
            let text = format!(
                "Undoing your move from {}: {done} of {total} rooms done\n{}",
                t.old,
                progress_bar(done, total)
            );
            self.edit(t, status, &text).await
        })
    }

    fn undone<'a>(&'a self, t: &'a Transfer, report: &'a UndoReport) -> BoxFuture<'a, Result<(), HsError>> {
        Box::pin(async move {
            let text = super::commands::undo::report_text(t, report);
            self.post(&t.new_dm, &format!("undone-{}", t.id), &text).await?;
            Ok(())
        })
    }
}

/// The old account's news that the new one, on its own server, has taken its reserved seats.
fn taken_up_text(t: &Transfer, r: &Report) -> String {
    let mut out = if r.moved == 0 {
        // Every invite was declined, or withdrawn (the code expired): nothing moved.
        format!("{} joined none of your {} rooms: your reservation for {} is over.", t.new, r.total, t.new)
    } else {
        format!("{} has joined {} of your {} rooms: your move to {} is complete.", t.new, r.moved, r.total, t.new)
    };
    if !r.skipped.is_empty() || !r.failed.is_empty() {
        out.push_str(
            "

Not moved:",
        );
        for (room, why) in not_moved(r) {
            out.push_str(&format!(
                "
• {room}: {why}"
            ));
        }
    }
    if r.moved == 0 {
        return out;
    }
    out.push_str(&format!(
        "

When you are ready, `finish --leave` takes this account out of the rooms where {} now holds at least your rank, and `finish --advertise` puts {} in your display name.",
        t.new, t.new
    ));
    out
}

/// Every room not moved and why, skipped ones first.
fn not_moved(r: &Report) -> impl Iterator<Item = (&String, &dyn Display)> {
    let skipped = r.skipped.iter().map(|(room, why)| (room, why as &dyn Display));
    skipped.chain(r.failed.iter().map(|(room, why)| (room, why as &dyn Display)))
}

fn progress_bar(done: usize, total: usize) -> String {
    let width = 20;
    let filled = (done * width).checked_div(total).unwrap_or(width);
    format!("[{}{}] {done}/{total}", "█".repeat(filled), "░".repeat(width - filled))
}

/// The history file: one section per room, HTML for desktop clients, plain text for mobile ones.
fn history_document(t: &Transfer, rooms: &[RoomHistory<'_>], html: bool) -> String {
    let mut text = String::new();
    for room in rooms {
        text.push_str(&if html {
            format!("<h2>{}</h2>\n<ul>\n", escape(&room.title))
        } else {
            format!("== {} ==\n", room.title)
        });
        for m in room.messages {
            let when = humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + Duration::from_millis(m.origin_server_ts.get().into()),
            );
            let line = format!("[{when}] {}: {}", m.sender, m.content.body());
            text.push_str(&if html { format!("<li>{}</li>\n", escape(&line)) } else { format!("{line}\n") });
        }
        if room.encrypted > 0 {
            let note = format!(
                "({} encrypted messages are not copied: import your keys to read them in the room)",
                room.encrypted
            );
            text.push_str(&if html { format!("<li><em>{note}</em></li>\n") } else { format!("{note}\n") });
        }
        if html {
            text.push_str("</ul>\n");
        }
    }
    if html {
        text = format!(
            "<!doctype html><meta charset=utf-8><title>History from {}</title>\n{text}",
            escape(t.old.as_str())
        );
    }
    text
}

fn headline(r: &Report) -> String {
    if r.kind == TransferKind::Reserve {
        return format!(
            "{}{} of {} rooms reserved for {}{}{}",
            if r.cancelled { "Cancelled. " } else { "" },
            r.awaiting,
            r.total,
            r.new,
            if r.skipped.is_empty() { String::new() } else { format!(", {} skipped", r.skipped.len()) },
            if r.failed.is_empty() { String::new() } else { format!(", {} failed", r.failed.len()) },
        );
    }
    format!(
        "{}{} of {} rooms moved to {}{}{}{}",
        if r.cancelled { "Cancelled. " } else { "" },
        r.moved,
        r.total,
        r.new,
        if r.awaiting > 0 { format!(", {} invites to accept", r.awaiting) } else { String::new() },
        if r.skipped.is_empty() { String::new() } else { format!(", {} skipped", r.skipped.len()) },
        if r.failed.is_empty() { String::new() } else { format!(", {} failed", r.failed.len()) },
    )
}

/// For mobile: short, plain.
fn digest(r: &Report) -> String {
    let mut out = headline(r);
    for (room, why) in not_moved(r) {
        out.push_str(&format!("\n✗ {room}: {why}"));
    }
    if r.awaiting > 0 {
        out.push_str("\nAccept the pending invites from your client.");
    }
    if !r.dropped.is_empty() {
        out.push_str(&format!("\n{}", crate::bundle::border::describe(&r.dropped)));
    }
    out
}

fn plain(r: &Report) -> String {
    let mut out = format!("{}.\n", headline(r));
    fn section(out: &mut String, title: &str, items: &[(String, impl Display)]) {
        if !items.is_empty() {
            out.push_str(&format!("\n{title}:\n"));
            for (room, why) in items {
                out.push_str(&format!("• {room}: {why}\n"));
            }
        }
    }
    section(&mut out, "Skipped (what you can do)", &r.skipped);
    let retry = if r.kind == TransferKind::Reserve {
        "Failed (what you can do, or `export --to` again later)"
    } else {
        "Failed (run `import` again with a new code to retry)"
    };
    section(&mut out, retry, &r.failed);
    // The same warning in many rooms (a creator's rank, say) is said once, with the rooms.
    let mut grouped: Vec<(String, Vec<&str>)> = Vec::new();
    for (room, warning) in &r.warnings {
        let why = Warning::explain(warning);
        match grouped.iter_mut().find(|(w, _)| *w == why) {
            Some((_, rooms)) => rooms.push(room),
            None => grouped.push((why, vec![room])),
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
    if r.awaiting > 0 && r.kind == TransferKind::Reserve {
        out.push_str(&format!(
            "\n{} is invited into {} rooms: it joins them when it imports the bundle file with the code on its own server's handoff (or accepts the invites from its client).\n",
            r.new, r.awaiting
        ));
    } else if r.awaiting > 0 {
        out.push_str(&format!(
            "\n{} rooms wait for you to accept their invites from your new account's client.\n",
            r.awaiting
        ));
    }
    if !r.account.is_empty() {
        out.push_str("\nAccount:\n");
        for (step, outcome) in &r.account {
            let text = match outcome {
                StepOutcome::Done(d) => format!("✓ {}: {d}", step.name()),
                StepOutcome::Failed(d) => format!("✗ {}: {d}", step.name()),
            };
            out.push_str(&format!("{text}\n"));
        }
    }
    if r.left_out > 0 {
        out.push_str(&format!("\n{} room(s) of the bundle were left out by your import options.\n", r.left_out));
    }
    if !r.dropped.is_empty() {
        out.push_str(&format!("\n{}\n", crate::bundle::border::describe(&r.dropped)));
    }
    out.trim_end().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_fills_with_the_rooms_done() {
        assert_eq!(progress_bar(5, 10), format!("[{}{}] 5/10", "█".repeat(10), "░".repeat(10)));
        assert_eq!(progress_bar(0, 0), format!("[{}] 0/0", "█".repeat(20)));
    }
}
