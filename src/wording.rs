//! How the engine's reasons read, for people: each reason worded once, here, for the bot's chat
//! (`bot::progress`, `status`) and the device side's terminal and `--json` alike. The engine
//! decides why ([`crate::transfer::reason`]); this says it.

use std::fmt::{self, Display, Formatter};
use std::time::Duration;

use serde::Serializer;

use crate::transfer::arrivals::Awaited;
use crate::transfer::pace::Paced;
use crate::transfer::reason::{FailReason, SkipReason, StepDone, StepFailure, Withdrawal};

impl Display for SkipReason {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::Blocked(b) => f.write_str(b.explain()),
            SkipReason::Gone => f.write_str("the old account is no longer in this room, or it no longer exists"),
            SkipReason::NotStarted => {
                f.write_str("not reached: the transfer was cancelled before this room's turn; a new transfer moves it")
            }
            SkipReason::Interrupted => f.write_str(
                "not reached: the transfer was cancelled while this room waited for a server; a new transfer moves it",
            ),
            SkipReason::NeedsInvite { old } => write!(
                f,
                "the room is not public and no invite from {old} reached you: ask them (or anyone in the room) to invite you, then join it from your client"
            ),
            SkipReason::Declined { new } => write!(f, "{new} declined the invite"),
            SkipReason::BannedSince { new } => write!(f, "{new} was banned from the room"),
            SkipReason::OldLeft { old, new } => {
                write!(f, "{old} left the room before {new} joined, so whether it did can't be seen from here")
            }
            SkipReason::Reservation { why, new, withdrawn } => {
                let what = match why {
                    Withdrawal::Cancelled => "the reservation was cancelled",
                    Withdrawal::Expired => "the reservation expired",
                    Withdrawal::Forgotten => "the reservation was forgotten",
                };
                let invite = if *withdrawn { ": the invite was withdrawn" } else { "" };
                write!(f, "{what} before {new} joined{invite}")
            }
            SkipReason::Legacy(said) => f.write_str(said),
        }
    }
}

impl Display for FailReason {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            FailReason::InviteUnanswered { server, waited_secs, error, new } => write!(
                f,
                "{server} did not answer for {}, so the invite could not be sent ({error}): once it is back, invite {new} from your client",
                seconds(*waited_secs)
            ),
            FailReason::Invite { error } => write!(f, "the invite failed: {error}"),
            FailReason::Join { error } => write!(f, "joining failed: {error}"),
            FailReason::Unreached { servers, waited_secs, error, room } => {
                let servers = servers.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ");
                write!(
                    f,
                    "the servers the room is reached through ({servers}) did not answer for {} ({error}): once they are back, join {room} from your client",
                    seconds(*waited_secs)
                )
            }
            FailReason::Withdraw { new, error } => write!(
                f,
                "the invite of {new} could not be withdrawn ({error}): a moderator of the room can take it back"
            ),
            FailReason::Error(error) => f.write_str(error),
            FailReason::Legacy(said) => f.write_str(said),
        }
    }
}

impl Display for StepDone {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            StepDone::Merged(summary) => f.write_str(summary),
            StepDone::OldMentions { old } => write!(f, "mentions of {old} notify you"),
            StepDone::NoKeyExport => f.write_str("no key export in the bundle"),
            StepDone::KeysDelivered => f.write_str("key export delivered"),
            StepDone::HistoryNotAsked => f.write_str("not asked for (import --history N)"),
            StepDone::NoHistory => f.write_str("the bundle carries no history (export --history N)"),
            StepDone::HistoryDelivered { messages, rooms, file } => {
                write!(f, "{messages} message(s) from {rooms} room(s) delivered as {file}")
            }
            StepDone::Reserved { new } => write!(
                f,
                "{new} is on another server: it joins, and gets its tags, DMs, push rules, settings and profile, when it imports the bundle file with the code on its own server's handoff"
            ),
            StepDone::Nothing => Ok(()),
            StepDone::Legacy(said) => f.write_str(said),
        }
    }
}

impl Display for StepFailure {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            StepFailure::Homeserver(error) => f.write_str(error),
            StepFailure::Elsewhere { new } => write!(
                f,
                "{new} is on another server: tags, DMs, ignored users, push rules, settings and profile are applied by that server's handoff or your client"
            ),
            StepFailure::Legacy(said) => f.write_str(said),
        }
    }
}

/// A paced reservation, for the old account: `reserved` of `total` rooms so far.
pub fn paced(p: &Paced, reserved: usize, total: usize) -> String {
    let server = &p.server;
    let left = total.saturating_sub(reserved);
    let rate = match p.every {
        Some(every) => {
            let every = Duration::from_secs(every.as_secs().max(1));
            format!(
                ", about one every {} (about {} for the {left} left)",
                humantime::format_duration(every),
                humantime::format_duration(every * left as u32)
            )
        }
        None => String::new(),
    };
    format!(
        "{server} limits the invites one of its users receives, and refuses the rest for now \
         (Synapse: `rc_invites.per_user`). {reserved} of your {total} rooms are reserved; handoff sends the \
         other invites one at a time at the rate {server} lets through{rate}, and fails none of them for it. \
         Its admin can raise `rc_invites.per_user` (say `per_second: 1, burst_count: 500`) to make it \
         minutes: handoff goes back to full speed by itself."
    )
}

/// Received rooms that wait for their invites, for the new account: `joined` of `total` rooms
/// so far, `old` the account whose server sends the invites.
pub fn awaiting_invites(a: &Awaited, old: &ruma::UserId, joined: usize, total: usize) -> String {
    let rate = match a.every {
        Some(every) => {
            let every = Duration::from_secs(every.as_secs().max(1));
            format!(
                " They come about one every {} (about {} for the {} waiting).",
                humantime::format_duration(every),
                humantime::format_duration(every * a.waiting as u32),
                a.waiting
            )
        }
        None => String::new(),
    };
    format!(
        "{joined} of your {total} rooms are joined; {waiting} for the invites of {old}, which {server} \
         sends while this server lets them in at a limited rate (Synapse: `rc_invites.per_user`, by default \
         5 at once, then one every 5m 33s). Each room is joined as its invite comes, nothing to do meanwhile.{rate} \
         A room whose invite has not come after {quiet} without any is skipped, saying so. This server's \
         admin can raise `rc_invites.per_user` (say `per_second: 1, burst_count: 500`) to make it minutes.",
        waiting = match a.waiting {
            1 => "1 waits".to_owned(),
            n => format!("{n} wait"),
        },
        server = old.server_name(),
        quiet = humantime::format_duration(Duration::from_secs(a.quiet.as_secs().max(1))),
    )
}

/// What a device-side import's joins take at Synapse's default limits on one account's joins,
/// for `--dry-run`.
#[cfg(feature = "e2ee")]
pub fn joins_at_defaults(joins: &crate::client::pace::Joins, new: &ruma::UserId) -> String {
    use crate::client::pace::{BURST, LOCAL_EVERY, REMOTE_EVERY};
    let server = new.server_name();
    let time = joins.at_defaults();
    let mut text = format!(
        "{} joins: {} into rooms {server} is in already, {} into rooms it joins over federation.",
        joins.total(),
        joins.local,
        joins.remote
    );
    if time.is_zero() {
        text.push_str(" Within Synapse's default burst: they go at once.");
    } else {
        text.push_str(&format!(
            " At Synapse's default limits on one account's joins (`rc_joins`: {BURST} at once, then one every {} \
             into the first kind, one every {} into the second) they take about {}: handoff waits as {server} \
             asks, and says so beside the progress bar. Its admin can raise `rc_joins` (`local` and `remote`) \
             for the day to make it minutes.",
            humantime::format_duration(LOCAL_EVERY),
            humantime::format_duration(REMOTE_EVERY),
            humantime::format_duration(Duration::from_secs(time.as_secs() / 60 * 60).max(Duration::from_secs(60))),
        ));
    }
    text
}

/// The same, back at full speed.
pub fn full_speed(server: &ruma::ServerName) -> String {
    format!("Invites to {server} land at full speed again.")
}

/// A wait, to the second, for people.
fn seconds(secs: u64) -> humantime::FormattedDuration {
    humantime::format_duration(Duration::from_secs(secs.max(1)))
}

/// Serialises a reason as it reads (the device side's `--json` keeps its sentences).
pub fn as_text<S: Serializer>(reason: &impl Display, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::Blocked;
    use ruma::OwnedUserId;

    #[test]
    fn a_paced_reservation_says_how_far_how_fast_and_what_the_admin_can_change() {
        let server: ruma::OwnedServerName = "b.example".try_into().unwrap();
        let p = Paced { server: server.clone(), landed: 5, every: None };
        let text = paced(&p, 5, 12);
        assert!(text.contains("b.example limits the invites"), "{text}");
        assert!(text.contains("5 of your 12 rooms are reserved"), "{text}");
        assert!(text.contains("`rc_invites.per_user`"), "{text}");
        assert!(!text.contains("about one every"), "no rate before one is measured: {text}");
        let p = Paced { server, landed: 6, every: Some(Duration::from_millis(333_400)) };
        let text = paced(&p, 6, 12);
        assert!(text.contains("about one every 5m 33s (about 33m 18s for the 6 left)"), "{text}");
    }

    #[test]
    fn rooms_awaiting_invites_say_how_many_from_whom_how_fast_and_until_when() {
        let old = user("@old:a.example");
        let mut a =
            Awaited { waiting: 7, since_last: Duration::from_secs(90), every: None, quiet: Duration::from_secs(720) };
        let text = awaiting_invites(&a, &old, 5, 12);
        assert!(
            text.starts_with(
                "5 of your 12 rooms are joined; 7 wait for the invites of @old:a.example, which a.example sends"
            ),
            "{text}"
        );
        assert!(text.contains("`rc_invites.per_user`"), "{text}");
        assert!(text.contains("after 12m without any is skipped"), "{text}");
        assert!(!text.contains("about one every"), "no rate before one is measured: {text}");
        a.every = Some(Duration::from_millis(333_400));
        let text = awaiting_invites(&a, &old, 5, 12);
        assert!(text.contains("about one every 5m 33s (about 38m 51s for the 7 waiting)"), "{text}");
    }

    #[cfg(feature = "e2ee")]
    #[test]
    fn a_dry_run_says_what_the_joins_take_at_the_default_limits() {
        use crate::client::pace::Joins;
        let new = user("@new:b.org");
        let text = joins_at_defaults(&Joins { local: 30, remote: 25 }, &new);
        assert!(
            text.starts_with("55 joins: 30 into rooms b.org is in already, 25 into rooms it joins over federation."),
            "{text}"
        );
        assert!(
            text.contains("one every 10s into the first kind, one every 1m 40s into the second) they take about 25m"),
            "{text}"
        );
        assert!(text.contains("raise `rc_joins`"), "{text}");
        let text = joins_at_defaults(&Joins { local: 4, remote: 2 }, &new);
        assert!(text.ends_with("Within Synapse's default burst: they go at once."), "{text}");
    }

    fn user(id: &str) -> OwnedUserId {
        id.try_into().unwrap()
    }

    /// The phrases the reports have always carried (tests on Synapse look for some of them).
    #[test]
    fn reasons_read_as_before() {
        let (old, new) = (user("@old:a.org"), user("@new:b.org"));
        let cases: Vec<(String, &str)> = vec![
            (
                SkipReason::Blocked(Blocked::Banned).to_string(),
                "the new account is banned there: ask a moderator to unban it",
            ),
            (
                SkipReason::NotStarted.to_string(),
                "not reached: the transfer was cancelled before this room's turn; a new transfer moves it",
            ),
            (SkipReason::Declined { new: new.clone() }.to_string(), "@new:b.org declined the invite"),
            (
                SkipReason::Reservation { why: Withdrawal::Expired, new: new.clone(), withdrawn: true }.to_string(),
                "the reservation expired before @new:b.org joined: the invite was withdrawn",
            ),
            (
                SkipReason::Reservation { why: Withdrawal::Cancelled, new: new.clone(), withdrawn: false }.to_string(),
                "the reservation was cancelled before @new:b.org joined",
            ),
            (
                FailReason::InviteUnanswered {
                    server: "b.org".try_into().unwrap(),
                    waited_secs: 600,
                    error: "no answer within 10s".into(),
                    new: new.clone(),
                }
                .to_string(),
                "b.org did not answer for 10m, so the invite could not be sent (no answer within 10s): once it is back, invite @new:b.org from your client",
            ),
            (
                FailReason::Unreached {
                    servers: vec!["b.org".try_into().unwrap(), "c.org".try_into().unwrap()],
                    waited_secs: 0,
                    error: "502".into(),
                    room: "!r:b.org".try_into().unwrap(),
                }
                .to_string(),
                "the servers the room is reached through (b.org, c.org) did not answer for 1s (502): once they are back, join !r:b.org from your client",
            ),
            (FailReason::Join { error: "M_FORBIDDEN".into() }.to_string(), "joining failed: M_FORBIDDEN"),
            (
                StepDone::HistoryDelivered { messages: 2, rooms: 1, file: "history.html".into() }.to_string(),
                "2 message(s) from 1 room(s) delivered as history.html",
            ),
            (StepDone::OldMentions { old }.to_string(), "mentions of @old:a.org notify you"),
            (StepDone::Legacy("3 set".into()).to_string(), "3 set"),
            (StepFailure::Homeserver("M_FORBIDDEN: no".into()).to_string(), "M_FORBIDDEN: no"),
        ];
        for (said, expected) in cases {
            assert_eq!(said, expected);
        }
    }
}
