//! The keys that decrypt an account's encrypted history, on the device side: read out of the
//! account's server-side key backup (unlocked with the recovery key) into an Element key export,
//! and imported from one into this device, and from there into the new account's key backup.
//!
//! matrix-sdk reads and writes key exports through files: they are written into the session's own
//! folder (mode 0700), each removed as soon as it was read.

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail};
use matrix_sdk::encryption::backups::BackupState;
use matrix_sdk::encryption::recovery::{RecoveryError, RecoveryState};
use matrix_sdk::encryption::secret_storage::SecretStorageError;
use matrix_sdk::encryption::{KeyExportError, RoomKeyImportError, RoomKeyImportResult};
use ruma::RoomId;
use serde::Serialize;

use crate::client::session::Session;
use crate::config::Secret;
use crate::keys::{self, KeyExport};

/// Unlocks the account's secret storage with its recovery key, which turns on this device's use
/// of the key backup. Done first, so a wrong key stops a command before it changed anything.
pub async fn recover(session: &Session, recovery_key: &Secret) -> Result<()> {
    let recovery = session.client.encryption().recovery();
    recovery.recover(recovery_key.expose().trim()).await.map_err(|e| match e {
        RecoveryError::SecretStorage(SecretStorageError::MissingKeyInfo { .. }) => {
            anyhow!("{} has no recovery set up, so no key backup to unlock", session.user_id)
        }
        RecoveryError::SecretStorage(SecretStorageError::SecretStorageKey(_)) => {
            anyhow!(
                "that recovery key does not unlock the key backup of {} (check it, or use a key file)",
                session.user_id
            )
        }
        other => anyhow!("cannot unlock the key backup of {}: {other}", session.user_id),
    })?;
    if !session.client.encryption().backups().are_enabled().await {
        bail!(
            "{} has no usable key backup (recovery is {:?}): set up key backup in your client first",
            session.user_id,
            recovery.state()
        );
    }
    if recovery.state() != RecoveryState::Enabled {
        tracing::debug!(state = ?recovery.state(), "recovery unlocked, not fully enabled");
    }
    Ok(())
}

/// Downloads the backed-up keys of `rooms` (after [`recover`]) and writes every key this device
/// holds into a key export encrypted with `passphrase`. Returns it and how many keys it holds.
pub async fn from_backup<'a>(
    session: &Session,
    rooms: impl IntoIterator<Item = &'a RoomId>,
    passphrase: &Secret,
) -> Result<(KeyExport, usize)> {
    let backups = session.client.encryption().backups();
    for room in rooms {
        backups
            .download_room_keys_for_room(room)
            .await
            .with_context(|| format!("cannot download the keys of {room} from the key backup"))?;
    }
    let path = scratch(session, "backup-keys.txt");
    let mut count = 0usize;
    let written = session
        .client
        .encryption()
        .export_room_keys(path.clone(), passphrase.expose(), |_| {
            count += 1;
            true
        })
        .await;
    let text = std::fs::read_to_string(&path);
    let _ = std::fs::remove_file(&path);
    written.context("cannot write the keys into a key export")?;
    let export = keys::validate(&text.context("cannot read the key export back")?)
        .map_err(|e| anyhow!("the key export matrix-sdk wrote does not read back: {e}"))?;
    Ok((export, count))
}

/// What importing a key export did.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Imported {
    /// Keys this device did not have before.
    pub imported: usize,
    /// Keys in the export.
    pub total: usize,
    /// Whether they were sent on to the account's key backup as well (with `--recovery-key`).
    pub backed_up: bool,
}

/// Imports a key export into this device, trying each passphrase in turn (the bundle's own
/// first: a key export made by `handoff export --recovery-key` is encrypted with it).
pub async fn import(session: &Session, export: &KeyExport, passphrases: &[&Secret]) -> Result<RoomKeyImportResult> {
    let path = scratch(session, "import-keys.txt");
    crate::registration::write_private(&path, &export.armored)?;
    let mut result = Err(anyhow!("no passphrase for the key export: pass --room-keys-passphrase-file"));
    for passphrase in passphrases {
        result = match session.client.encryption().import_room_keys(path.clone(), passphrase.expose()).await {
            Ok(r) => Ok(r),
            Err(RoomKeyImportError::Export(KeyExportError::InvalidMac)) => Err(anyhow!(
                "wrong passphrase for the key export in the bundle: pass the one it was made with (--room-keys-passphrase-file)"
            )),
            Err(e) => Err(anyhow!("cannot import the room keys: {e}")),
        };
        if result.is_ok() {
            break;
        }
    }
    let _ = std::fs::remove_file(&path);
    result
}

/// Waits until the key backup has taken every key this device holds (after [`recover`] and
/// [`import`]), so the account's other devices can fetch them.
pub async fn wait_for_backup(session: &Session) -> Result<()> {
    let backups = session.client.encryption().backups();
    backups.wait_for_steady_state().await.map_err(|e| anyhow!("the keys did not reach the key backup: {e}"))?;
    if backups.state() != BackupState::Enabled {
        bail!("the key backup is {:?}, not enabled: the keys are on this device only", backups.state());
    }
    Ok(())
}

fn scratch(session: &Session, name: &str) -> PathBuf {
    session.dir().join(name)
}
