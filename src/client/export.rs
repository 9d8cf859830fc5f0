//! The device side of a move: the bundle of the account logged in on this device, captured from
//! the client's own view (the same model and file format as the service's `export --file`).

use std::path::Path;

use anyhow::{Context, Result};

use crate::budget::Budget;
use crate::bundle::capture::{CaptureOptions, capture};
use crate::bundle::{Bundle, Only};
use crate::client::session::Session;
use crate::keys::{self, KeyExport};

/// Requests in flight at once: one person's account, from their own device.
const IN_FLIGHT: usize = 8;

pub struct ExportOptions {
    pub only: Option<Only>,
    pub history: usize,
    /// An Element key export to carry inside the bundle ([`read_room_keys`]).
    pub room_keys: Option<KeyExport>,
}

/// Reads and checks an Element key-export file (never decrypted: it stays encrypted with its own
/// passphrase, inside the bundle).
pub fn read_room_keys(path: &Path) -> Result<KeyExport> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    keys::validate(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// What was captured, and how many rooms were over the limit.
pub struct Exported {
    pub bundle: Bundle,
    pub left_out: usize,
}

/// Captures the session's account.
pub async fn export(session: &Session, opts: &ExportOptions) -> Result<Exported> {
    let hs = session.homeserver().await.with_context(|| format!("cannot reach {}", session.homeserver))?;
    let options = CaptureOptions {
        only: opts.only,
        exclude: Vec::new(),
        skip: Vec::new(),
        history: opts.history,
        pool: Budget::new(IN_FLIGHT),
        max_rooms: usize::MAX,
        client: format!("handoff-cli {}", env!("CARGO_PKG_VERSION")),
    };
    let captured = capture(&hs, &session.user_id, &session.homeserver, &options)
        .await
        .with_context(|| format!("cannot read the account {}", session.user_id))?;
    let mut bundle = captured.bundle;
    bundle.room_keys = opts.room_keys.clone();
    Ok(Exported { bundle, left_out: captured.left_out })
}
