//! What handoff keeps, behind typed methods: the trees below, sealed where they hold secrets,
//! on an engine ([`kv`]: the embedded sled database, one process at a time). Nothing else in the
//! crate knows the engine: it sees records, never keys and bytes.
//!
//! Trees, one per record kind:
//! - `txns`: transaction IDs the homeserver pushed and that were handled (value: handled-at, ms).
//! - `dm_rooms`: the bot's DM with each user (room ID -> user ID), so a bare command is understood there.
//! - `bundles`: `owner \0 id` -> the bundle and its metadata, sealed with the store key.
//! - `codes`: SHA-256 of a transfer code -> [`CodeRecord`] (the code itself is never stored).
//! - `transfers`: transfer ID (u64, big-endian) -> the transfer's record, sealed (it holds room
//!   names). What a record means is `transfer::journal`'s business: the store keeps bytes.
//! - `journal`: transfer ID ++ room ID -> the room's journal entry: its progress, written before
//!   and after every step.
//! - `auto`: new account -> [`AutoStart`]: moves offered to that account when it becomes active.
//! - `inbox`: events accepted from the homeserver and not handled yet (sealed: they hold
//!   commands, and commands hold codes), so an acknowledged transaction survives a crash.
//! - `inbox_attempts`: inbox number -> how many times its handling began (u32, big-endian),
//!   written durably before each, so an event that kills the process is not tried forever.
//! - `meta`: schema version; the bot's device record (sealed: it holds the device's access token
//!   and the passphrase of its crypto store), whose meaning is `device`'s business.
//!
//! Retention ([`Store::purge`]) bounds every tree: old bundles, expired codes and offers,
//! finished transfers with their journals, and transaction IDs all go.
//!
//! The store key (32 random bytes) is generated on first open and kept beside the database in
//! `<database.path>.key`, mode 0600. Without it the sealed bundles can't be read.

mod kv;
pub mod seal;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chacha20poly1305::XChaCha20Poly1305;
use chacha20poly1305::aead::{KeyInit, OsRng};
use ruma::{OwnedUserId, RoomId, UserId};
use serde::{Deserialize, Serialize};

use crate::bundle::{Bundle, BundleId};
use crate::code::CodeHash;
pub use crate::code::{CodeRecord, RedeemError};
pub use kv::Leadership;
use kv::{Kv, Tree, Write};

/// How often a standing-by instance asks for the lead.
const LEAD_POLL: Duration = Duration::from_secs(1);

/// The layout of what the store keeps; a database of another version is refused at open.
pub(crate) const SCHEMA_VERSION: u32 = 1;

/// Stored bundles kept per account (its exports and the bundles it received): a new one beyond
/// this deletes the oldest.
pub const MAX_BUNDLES_PER_USER: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the database at {path}: {source} (is another `handoff serve` using it? check database.path)")]
    Open { path: String, source: sled::Error },
    #[error("database error: {0}")]
    Sled(#[from] sled::Error),
    #[error(
        "the database at {path} has schema version {found}, this handoff knows version {known}: a newer handoff made it (run that one, or restore a backup from before it)"
    )]
    Schema { path: String, found: u32, known: u32 },
    #[error("the store key {path}: {message}")]
    Key { path: String, message: String },
    #[error("a sealed record does not open with the store key (was {0} replaced?)")]
    Unseal(String),
    #[error("a stored record is corrupt: {0}")]
    Corrupt(String),
    #[error(
        "cannot reach the PostgreSQL database: {0} (check database.uri, and that the server runs and lets this user in)"
    )]
    Connect(String),
    #[error("the destination already holds records ({0}): copy into an empty database")]
    NotEmpty(&'static str),
    #[error("{0}")]
    Postgres(String),
    #[error("another handoff serve leads the database now: this one's writes are refused, and it stops")]
    Fenced,
}

impl From<tokio_postgres::Error> for StoreError {
    /// PostgreSQL's own words (tokio-postgres says only "db error"), and what to do where the
    /// fix is the admin's.
    fn from(e: tokio_postgres::Error) -> Self {
        use tokio_postgres::error::SqlState;
        let said = postgres_says(&e);
        StoreError::Postgres(match e.as_db_error().map(|db| db.code()) {
            Some(&SqlState::INSUFFICIENT_PRIVILEGE) => format!(
                "{said}: the user in database.uri may not create or use handoff's tables; make it the database's owner (ALTER DATABASE <db> OWNER TO <user>) or GRANT CREATE ON SCHEMA public TO <user>"
            ),
            _ => said,
        })
    }
}

/// What PostgreSQL answered, in its own words, or why it could not be asked.
pub(crate) fn postgres_says(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("PostgreSQL says: {} ({})", db.message(), db.code().code()),
        None => {
            let cause = std::error::Error::source(e).map(|s| format!(": {s}")).unwrap_or_default();
            format!("PostgreSQL: {e}{cause}")
        }
    }
}

#[derive(Clone)]
pub struct Store {
    kv: Kv,
    cipher: seal::Sealer,
    key_path: PathBuf,
}

/// A stored bundle and who it belongs to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredBundle {
    pub owner: OwnedUserId,
    pub created_at_ms: u64,
    pub bundle: Bundle,
}

/// `export --to NEW --auto`: when NEW first becomes active, the bot offers NEW the move in a DM;
/// the transfer starts only when NEW answers `accept` there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoStart {
    pub old: OwnedUserId,
    pub new: OwnedUserId,
    /// The hash of the (bound) code that accepting redeems.
    pub code_hash: [u8; 32],
    pub expires_at_ms: u64,
    /// Where the offer was made (NEW's DM with the bot), once NEW was active.
    #[serde(default)]
    pub offered_in: Option<ruma::OwnedRoomId>,
}

/// What `forget` removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Forgotten {
    pub bundles: usize,
    pub codes: usize,
    pub transfers: usize,
    /// Pending automatic moves (offers).
    pub offers: usize,
    /// Transaction IDs (purge only).
    pub txns: usize,
}

impl Store {
    /// The embedded store at `path` (sled), its key beside it.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let kv = Kv::open_sled(path)?;
        Store::with_key(kv, key_path_for(path))
    }

    /// The store in a PostgreSQL database, sealed with the key in `key_path` (made there if it
    /// is not: every instance sharing the database needs the same one). Migrates its schema.
    pub async fn connect_postgres(uri: &str, pool_size: usize, key_path: &Path) -> Result<Self, StoreError> {
        let kv = Kv::connect_postgres(uri, pool_size).await?;
        Store::with_key(kv, key_path.to_owned())
    }

    fn with_key(kv: Kv, key_path: PathBuf) -> Result<Self, StoreError> {
        let cipher = seal::Sealer::new(&load_or_create_key(&key_path)?);
        Ok(Store { kv, cipher, key_path })
    }

    /// Whether this transaction ID was already handled.
    pub async fn txn_seen(&self, txn_id: &str) -> Result<bool, StoreError> {
        Ok(self.kv.get(Tree::Txns, txn_id.as_bytes()).await?.is_some())
    }

    /// Accepts a transaction: its events (as bytes) go into the inbox and its ID is recorded as
    /// seen, in one atomic write made durable before returning. `None` if the ID was seen before.
    /// Returns each event's inbox number, in order.
    pub async fn accept_txn(&self, txn_id: &str, events: &[Vec<u8>]) -> Result<Option<Vec<u64>>, StoreError> {
        let mut numbers = Vec::with_capacity(events.len());
        let mut writes = Vec::with_capacity(events.len() + 1);
        for event in events {
            let number = self.kv.generate_id().await?;
            let key = number.to_be_bytes();
            writes.push(Write::Insert(Tree::Inbox, key.to_vec(), self.seal(&key, event)));
            numbers.push(number);
        }
        writes.push(Write::Insert(Tree::Txns, txn_id.as_bytes().to_vec(), now_ms().to_be_bytes().to_vec()));
        if !self.kv.apply(Some((Tree::Txns, txn_id.as_bytes())), &writes).await? {
            return Ok(None);
        }
        // Nothing for the bot: if the ID is lost in a crash, the homeserver's retry finds nothing
        // to do either, so the write need not wait for the disk.
        if !numbers.is_empty() {
            self.kv.durable().await?;
        }
        Ok(Some(numbers))
    }

    /// An inbox event was handled: it is not replayed after a restart.
    pub async fn inbox_done(&self, number: u64) -> Result<(), StoreError> {
        let key = number.to_be_bytes().to_vec();
        // Together: an attempt count left behind would be a leak, never a wrong count (numbers
        // are not reused), but one write is as cheap as two.
        let writes = [Write::Remove(Tree::Inbox, key.clone()), Write::Remove(Tree::InboxAttempts, key)];
        self.kv.apply(None, &writes).await?;
        Ok(())
    }

    /// Changes an attempt count with `change` (a compare-and-swap, tried again if another writer
    /// came first); returns the new count.
    async fn change_attempts(
        &self,
        number: u64,
        change: impl Fn(Option<&[u8]>) -> Option<u32>,
    ) -> Result<u32, StoreError> {
        let key = number.to_be_bytes();
        loop {
            let old = self.kv.get(Tree::InboxAttempts, &key).await?;
            let new = change(old.as_deref());
            let bytes = new.map(u32::to_be_bytes);
            if self
                .kv
                .compare_and_swap(Tree::InboxAttempts, &key, old.as_deref(), bytes.as_ref().map(|b| &b[..]))
                .await?
            {
                return Ok(new.unwrap_or(0));
            }
        }
    }

    /// Handling of an inbox event begins: the attempt is counted and durable before this returns,
    /// so a process killed while handling it (out of memory, `kill -9`) has counted it too.
    /// Returns which attempt this is (1 the first time).
    pub async fn inbox_attempt(&self, number: u64) -> Result<u32, StoreError> {
        let count = self.change_attempts(number, |old| Some(attempts(old).saturating_add(1))).await?;
        self.kv.durable().await?;
        Ok(count)
    }

    /// Attempts that a clean stop interrupted (the event was not to blame) are not counted.
    pub async fn inbox_attempts_undo(&self, numbers: &[u64]) -> Result<(), StoreError> {
        for number in numbers {
            // An event done meanwhile has no count left to lower, and gets none.
            self.change_attempts(*number, |old| old.map(|_| attempts(old).saturating_sub(1))).await?;
        }
        if !numbers.is_empty() {
            self.kv.durable().await?;
        }
        Ok(())
    }

    /// Events accepted but not handled when the service stopped, oldest first.
    pub async fn inbox(&self) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.numbered(Tree::Inbox, "inbox key").await
    }

    /// The numbers of the inbox's events, in order (their events are not read).
    pub async fn inbox_numbers(&self) -> Result<Vec<u64>, StoreError> {
        let keys = self.kv.keys(Tree::Inbox, &[]).await?;
        keys.iter()
            .map(|k| {
                k.as_slice().try_into().map(u64::from_be_bytes).map_err(|_| StoreError::Corrupt("inbox key".into()))
            })
            .collect()
    }

    /// One inbox event, opened (`None`: handled since).
    pub async fn inbox_event(&self, number: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let key = number.to_be_bytes();
        match self.kv.get(Tree::Inbox, &key).await? {
            Some(sealed) => self.unseal(&key, &sealed).map(Some),
            None => Ok(None),
        }
    }

    /// Whether other processes may use this store at once (PostgreSQL): then one leads.
    pub fn is_shared(&self) -> bool {
        matches!(self.kv, Kv::Postgres(_))
    }

    /// Every sealed record of a tree keyed by a number (inbox events, transfers), opened, in order.
    async fn numbered(&self, tree: Tree, what: &str) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for (k, sealed) in self.kv.scan(tree, &[]).await? {
            let number = u64::from_be_bytes(k.as_slice().try_into().map_err(|_| StoreError::Corrupt(what.into()))?);
            out.push((number, self.unseal(&k, &sealed)?));
        }
        Ok(out)
    }

    pub async fn txn_count(&self) -> Result<usize, StoreError> {
        self.kv.len(Tree::Txns).await
    }

    pub async fn set_dm_room(&self, room: &RoomId, user: &UserId) -> Result<(), StoreError> {
        self.kv.insert(Tree::DmRooms, room.as_bytes(), user.as_bytes()).await
    }

    /// The user whose DM with the bot this room is, if it is one.
    pub async fn dm_room_user(&self, room: &RoomId) -> Result<Option<OwnedUserId>, StoreError> {
        Ok(self
            .kv
            .get(Tree::DmRooms, room.as_bytes())
            .await?
            .and_then(|v| std::str::from_utf8(&v).ok().and_then(|s| UserId::parse(s).ok())))
    }

    /// The rooms that are `user`'s DM with the bot.
    pub async fn dm_rooms_of(&self, user: &UserId) -> Result<Vec<ruma::OwnedRoomId>, StoreError> {
        let mut rooms = Vec::new();
        for (k, v) in self.kv.scan(Tree::DmRooms, &[]).await? {
            if v == user.as_bytes()
                && let Ok(room) = ruma::OwnedRoomId::try_from(String::from_utf8_lossy(&k).as_ref())
            {
                rooms.push(room);
            }
        }
        Ok(rooms)
    }

    pub async fn remove_dm_room(&self, room: &RoomId) -> Result<(), StoreError> {
        self.kv.remove(Tree::DmRooms, room.as_bytes()).await?;
        Ok(())
    }

    /// The database's size on disk, in bytes.
    pub async fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.kv.size_on_disk().await
    }

    /// A cheap read, for `/health`.
    pub async fn check(&self) -> Result<(), StoreError> {
        self.kv.get(Tree::Meta, b"health").await?;
        Ok(())
    }

    /// Copies everything this store keeps into `to` (a new PostgreSQL database, say), which must
    /// hold nothing yet: records stay sealed with this store's key, which `to` must use too.
    /// Returns how many entries each kind of record had.
    pub async fn copy_into(&self, to: &Store) -> Result<Vec<(&'static str, usize)>, StoreError> {
        for tree in [Tree::Txns, Tree::Inbox, Tree::Bundles, Tree::Codes, Tree::Transfers, Tree::Auto] {
            if to.kv.len(tree).await? > 0 {
                return Err(StoreError::NotEmpty(tree.name()));
            }
        }
        let copied = self.kv.copy_into(&to.kv).await?;
        Ok(copied.into_iter().map(|(tree, n)| (tree.name(), n)).collect())
    }

    /// Takes the lead of a database that several `handoff serve` may share (PostgreSQL), for the
    /// registration `id`: waits while another instance holds it (`standing_by` is called once
    /// then). `None` on sled, which one process alone can open anyway.
    pub async fn lead(&self, id: &str, standing_by: impl FnMut()) -> Result<Option<Leadership>, StoreError> {
        use sha2::{Digest, Sha256};
        match &self.kv {
            Kv::Sled(_) => Ok(None),
            Kv::Postgres(pg) => {
                let digest = Sha256::digest(format!("handoff leader {id}").as_bytes());
                let key = i64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
                Ok(Some(pg.lead(key, LEAD_POLL, standing_by).await?))
            }
        }
    }

    pub async fn flush(&self) -> Result<(), StoreError> {
        self.kv.durable().await
    }
}

/// The bot's device record: bytes to the store, sealed.
impl Store {
    const DEVICE: &'static [u8] = b"device";

    pub async fn device_record(&self) -> Result<Option<Vec<u8>>, StoreError> {
        match self.kv.get(Tree::Meta, Self::DEVICE).await? {
            Some(sealed) => Ok(Some(self.unseal(Self::DEVICE, &sealed)?)),
            None => Ok(None),
        }
    }

    /// Durable before it returns: the crypto store it unlocks is written right after.
    pub async fn put_device_record(&self, record: &[u8]) -> Result<(), StoreError> {
        self.kv.insert(Tree::Meta, Self::DEVICE, &self.seal(Self::DEVICE, record)).await?;
        self.kv.durable().await
    }

    const DEVICE_SYNC: &'static [u8] = b"device_sync";

    /// Where the device's sync stands: every event before it is in the inbox.
    pub async fn device_sync_token(&self) -> Result<Option<String>, StoreError> {
        Ok(self.kv.get(Tree::Meta, Self::DEVICE_SYNC).await?.map(|t| String::from_utf8_lossy(&t).into_owned()))
    }

    /// A new device starts its sync afresh.
    pub async fn forget_device_sync_token(&self) -> Result<(), StoreError> {
        self.kv.remove(Tree::Meta, Self::DEVICE_SYNC).await?;
        Ok(())
    }

    pub async fn put_device_sync_token(&self, token: &str) -> Result<(), StoreError> {
        self.kv.insert(Tree::Meta, Self::DEVICE_SYNC, token.as_bytes()).await?;
        self.kv.durable().await
    }
}

/// Bundles and codes.
impl Store {
    fn seal(&self, aad: &[u8], plain: &[u8]) -> Vec<u8> {
        self.cipher.seal(aad, plain)
    }

    fn unseal(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, StoreError> {
        // Told apart from a wrong key: a row cut short is damage, not the key file's fault.
        if sealed.len() < seal::NONCE {
            return Err(StoreError::Corrupt("sealed record too short".into()));
        }
        self.cipher.open(aad, sealed).ok_or_else(|| StoreError::Unseal(self.key_path.display().to_string()))
    }

    async fn write_bundle(&self, id: &BundleId, record: &StoredBundle) -> Result<(), StoreError> {
        let json = serde_json::to_vec(record).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.kv.insert(Tree::Bundles, id.as_bytes(), &self.seal(id.as_bytes(), &json)).await
    }

    /// Stores a bundle sealed with the store key; returns its ID.
    pub async fn put_bundle(&self, owner: &UserId, bundle: &Bundle) -> Result<BundleId, StoreError> {
        let id = BundleId::new(owner, self.kv.generate_id().await?);
        let record = StoredBundle { owner: owner.to_owned(), created_at_ms: now_ms(), bundle: bundle.clone() };
        self.write_bundle(&id, &record).await?;
        self.kv.durable().await?;
        Ok(id)
    }

    pub async fn get_bundle(&self, id: &BundleId) -> Result<Option<StoredBundle>, StoreError> {
        let Some(sealed) = self.kv.get(Tree::Bundles, id.as_bytes()).await? else {
            return Ok(None);
        };
        self.open_bundle(id.as_bytes(), &sealed).map(Some)
    }

    fn open_bundle(&self, key: &[u8], sealed: &[u8]) -> Result<StoredBundle, StoreError> {
        let json = self.unseal(key, sealed)?;
        serde_json::from_slice(&json).map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    /// Replaces a stored bundle's content (e.g. to attach keys), keeping its ID.
    pub async fn update_bundle(&self, id: &BundleId, record: &StoredBundle) -> Result<(), StoreError> {
        self.write_bundle(id, record).await?;
        self.kv.durable().await
    }

    /// The owner's most recent bundle.
    pub async fn latest_bundle(&self, owner: &UserId) -> Result<Option<(BundleId, StoredBundle)>, StoreError> {
        let Some(key) = self.kv.keys(Tree::Bundles, &owner_prefix(owner)).await?.pop() else {
            return Ok(None);
        };
        let id = BundleId::from_stored(&key);
        Ok(self.get_bundle(&id).await?.map(|b| (id, b)))
    }

    pub async fn bundle_count(&self, owner: &UserId) -> Result<usize, StoreError> {
        Ok(self.kv.keys(Tree::Bundles, &owner_prefix(owner)).await?.len())
    }

    /// Keeps `owner`'s newest `keep` bundles and deletes the older ones with their codes.
    /// Returns how many were deleted.
    pub async fn trim_bundles(&self, owner: &UserId, keep: usize) -> Result<usize, StoreError> {
        // Keys are `owner \0 zero-padded id`: oldest first.
        let keys = self.kv.keys(Tree::Bundles, &owner_prefix(owner)).await?;
        let old = keys.len().saturating_sub(keep);
        if old == 0 {
            return Ok(0);
        }
        let gone: Vec<BundleId> = keys[..old].iter().map(|k| BundleId::from_stored(k)).collect();
        for key in &keys[..old] {
            self.kv.remove(Tree::Bundles, key).await?;
        }
        let now = now_ms();
        for (k, v) in self.kv.scan(Tree::Codes, &[]).await? {
            let record = self.code_record(&v)?;
            if gone.contains(&record.bundle) && !record.remembered_as_used(now) {
                self.kv.remove(Tree::Codes, &k).await?;
            }
        }
        self.kv.durable().await?;
        Ok(old)
    }

    /// Records a new code for a stored bundle. Only the code's hash is kept.
    pub async fn put_code(&self, hash: &CodeHash, record: &CodeRecord) -> Result<(), StoreError> {
        let json = serde_json::to_vec(record).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.kv.insert(Tree::Codes, &hash.0, &json).await?;
        self.kv.durable().await
    }

    fn code_record(&self, v: &[u8]) -> Result<CodeRecord, StoreError> {
        serde_json::from_slice(v).map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    /// Checks a code for `redeemer` without using it up (for `import --dry-run`).
    pub async fn peek_code(
        &self,
        hash: &CodeHash,
        redeemer: &UserId,
    ) -> Result<Result<CodeRecord, RedeemError>, StoreError> {
        let Some(current) = self.kv.get(Tree::Codes, &hash.0).await? else {
            return Ok(Err(RedeemError::NotFound));
        };
        let record = self.code_record(&current)?;
        Ok(crate::code::check(record, redeemer, now_ms()))
    }

    /// Redeems a code for `redeemer`: it must exist, be unexpired, unused, and (if bound) bound to
    /// `redeemer`. Marking it used is a compare-and-swap, so two redeemers can't both succeed.
    pub async fn redeem_code(
        &self,
        hash: &CodeHash,
        redeemer: &UserId,
    ) -> Result<Result<CodeRecord, RedeemError>, StoreError> {
        loop {
            let Some(current) = self.kv.get(Tree::Codes, &hash.0).await? else {
                return Ok(Err(RedeemError::NotFound));
            };
            let mut record = match crate::code::check(self.code_record(&current)?, redeemer, now_ms()) {
                Ok(r) => r,
                Err(e) => return Ok(Err(e)),
            };
            record.redeemed_by = Some(redeemer.to_owned());
            let new = serde_json::to_vec(&record).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            if self.kv.compare_and_swap(Tree::Codes, &hash.0, Some(&current), Some(&new)).await? {
                self.kv.durable().await?;
                return Ok(Ok(record));
            }
        }
    }

    /// Records the code of a bundle that came from another server, already redeemed by the
    /// account it is for, so it opens nothing here a second time. `false` if the code is known
    /// here already (used before): nothing is written then.
    pub async fn claim_code(&self, hash: &CodeHash, record: &CodeRecord) -> Result<bool, StoreError> {
        let json = serde_json::to_vec(record).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let claimed = self.kv.compare_and_swap(Tree::Codes, &hash.0, None, Some(&json)).await?;
        if claimed {
            self.kv.durable().await?;
        }
        Ok(claimed)
    }

    /// Deletes one stored bundle.
    pub async fn remove_bundle(&self, id: &BundleId) -> Result<(), StoreError> {
        self.kv.remove(Tree::Bundles, id.as_bytes()).await?;
        self.kv.durable().await
    }

    /// Keeps a bundle file `user` dropped into their DM until an `import CODE` opens it (the code
    /// is not known here before): the latest replaces an earlier one.
    pub async fn put_dropped_file(&self, user: &UserId, bytes: &[u8]) -> Result<(), StoreError> {
        let mut record = now_ms().to_be_bytes().to_vec();
        record.extend(self.seal(&dropped_aad(user), bytes));
        self.kv.insert(Tree::Dropped, user.as_bytes(), &record).await?;
        self.kv.durable().await
    }

    /// The bundle file `user` dropped last, if any is kept.
    pub async fn dropped_file(&self, user: &UserId) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(record) = self.kv.get(Tree::Dropped, user.as_bytes()).await? else { return Ok(None) };
        let sealed = record.get(8..).ok_or_else(|| StoreError::Corrupt("dropped file record too short".into()))?;
        self.unseal(&dropped_aad(user), sealed).map(Some)
    }

    /// Removes `user`'s dropped bundle file (it was imported).
    pub async fn remove_dropped_file(&self, user: &UserId) -> Result<(), StoreError> {
        self.kv.remove(Tree::Dropped, user.as_bytes()).await?;
        self.kv.durable().await
    }

    /// The codes `owner` made.
    pub async fn codes_of(&self, owner: &UserId) -> Result<Vec<CodeRecord>, StoreError> {
        let mut out = Vec::new();
        for (_, v) in self.kv.scan(Tree::Codes, &[]).await? {
            let record = self.code_record(&v)?;
            if record.owner == owner {
                out.push(record);
            }
        }
        Ok(out)
    }

    /// Deletes every bundle, code and offer of `user` (as either account). Transfer records are
    /// the journal's to forget.
    pub async fn forget(&self, user: &UserId) -> Result<Forgotten, StoreError> {
        let mut gone = Forgotten::default();
        for key in self.kv.keys(Tree::Bundles, &owner_prefix(user)).await? {
            self.kv.remove(Tree::Bundles, &key).await?;
            gone.bundles += 1;
        }
        let now = now_ms();
        for (k, v) in self.kv.scan(Tree::Codes, &[]).await? {
            let record = self.code_record(&v)?;
            if (record.owner == user || record.redeemed_by.as_deref() == Some(user)) && !record.remembered_as_used(now)
            {
                self.kv.remove(Tree::Codes, &k).await?;
                gone.codes += 1;
            }
        }
        if self.kv.remove(Tree::Dropped, user.as_bytes()).await?.is_some() {
            gone.bundles += 1;
        }
        for auto in self.autos().await? {
            if auto.old == user || auto.new == user {
                self.kv.remove(Tree::Auto, auto.new.as_bytes()).await?;
                gone.offers += 1;
            }
        }
        self.kv.durable().await?;
        Ok(gone)
    }

    /// Deletes bundles older than `retention`, codes that expired before then, lapsed offers and
    /// old transaction IDs. Transfer records are the journal's to purge.
    pub async fn purge(&self, retention: Duration) -> Result<Forgotten, StoreError> {
        let cutoff = now_ms().saturating_sub(retention.as_millis() as u64);
        let mut gone = Forgotten::default();
        // One bundle at a time: all of them at once could be large.
        for k in self.kv.keys(Tree::Bundles, &[]).await? {
            let Some(sealed) = self.kv.get(Tree::Bundles, &k).await? else { continue };
            let record = self.open_bundle(&k, &sealed).ok();
            // An unreadable bundle is of no use to anybody.
            if record.is_none_or(|b| b.created_at_ms < cutoff) {
                self.kv.remove(Tree::Bundles, &k).await?;
                gone.bundles += 1;
            }
        }
        for (k, v) in self.kv.scan(Tree::Codes, &[]).await? {
            if self.code_record(&v).map_or(true, |r| r.expires_at_ms < cutoff) {
                self.kv.remove(Tree::Codes, &k).await?;
                gone.codes += 1;
            }
        }
        for k in self.kv.keys(Tree::Dropped, &[]).await? {
            let Some(v) = self.kv.get(Tree::Dropped, &k).await? else { continue };
            let at = v.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes).unwrap_or(0);
            if at < cutoff {
                self.kv.remove(Tree::Dropped, &k).await?;
                gone.bundles += 1;
            }
        }
        for auto in self.autos().await? {
            if auto.expires_at_ms < now_ms() {
                self.kv.remove(Tree::Auto, auto.new.as_bytes()).await?;
                gone.offers += 1;
            }
        }
        for (k, v) in self.kv.scan(Tree::Txns, &[]).await? {
            let at = v.as_slice().try_into().map(u64::from_be_bytes).unwrap_or(0);
            if at < cutoff {
                self.kv.remove(Tree::Txns, &k).await?;
                gone.txns += 1;
            }
        }
        if gone != Forgotten::default() {
            self.kv.durable().await?;
        }
        Ok(gone)
    }

    pub async fn put_auto(&self, auto: &AutoStart) -> Result<(), StoreError> {
        let json = serde_json::to_vec(auto).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.kv.insert(Tree::Auto, auto.new.as_bytes(), &json).await?;
        self.kv.durable().await
    }

    /// The pending automatic move into `new`, if any.
    pub async fn auto_for(&self, new: &UserId) -> Result<Option<AutoStart>, StoreError> {
        let Some(v) = self.kv.get(Tree::Auto, new.as_bytes()).await? else { return Ok(None) };
        serde_json::from_slice(&v).map(Some).map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    /// Removes a code (a declined offer's, say), so it can't be redeemed any more.
    pub async fn remove_code(&self, hash: &CodeHash) -> Result<(), StoreError> {
        self.kv.remove(Tree::Codes, &hash.0).await?;
        self.kv.durable().await
    }

    /// Takes (removes) the pending automatic start for `new`, if any.
    pub async fn take_auto(&self, new: &UserId) -> Result<Option<AutoStart>, StoreError> {
        let Some(v) = self.kv.remove(Tree::Auto, new.as_bytes()).await? else { return Ok(None) };
        self.kv.durable().await?;
        serde_json::from_slice(&v).map(Some).map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    /// Every pending automatic start.
    pub async fn autos(&self) -> Result<Vec<AutoStart>, StoreError> {
        self.kv
            .scan(Tree::Auto, &[])
            .await?
            .into_iter()
            .map(|(_, v)| serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt(e.to_string())))
            .collect()
    }

    /// Every raw byte of the bundle tree, for tests that look for plaintext at rest.
    pub async fn raw_bundle_bytes(&self) -> Result<Vec<u8>, StoreError> {
        Ok(self.kv.scan(Tree::Bundles, &[]).await?.into_iter().flat_map(|(k, v)| [k, v].concat()).collect())
    }
}

/// Transfer records and their journals, as bytes: what they hold is the transfer journal's
/// business (`transfer::journal`). Records are sealed (they hold room names); journal entries
/// hold steps and reasons only.
impl Store {
    pub async fn new_transfer_id(&self) -> Result<u64, StoreError> {
        Ok(self.kv.generate_id().await? + 1)
    }

    /// Writes a transfer record and makes it durable.
    pub async fn put_transfer(&self, id: u64, record: &[u8]) -> Result<(), StoreError> {
        let key = id.to_be_bytes();
        self.kv.insert(Tree::Transfers, &key, &self.seal(&key, record)).await?;
        self.kv.durable().await
    }

    pub async fn transfer(&self, id: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let key = id.to_be_bytes();
        match self.kv.get(Tree::Transfers, &key).await? {
            Some(sealed) => Ok(Some(self.unseal(&key, &sealed)?)),
            None => Ok(None),
        }
    }

    /// Every transfer record, oldest first.
    pub async fn transfers(&self) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.numbered(Tree::Transfers, "transfer key").await
    }

    /// Removes transfer records with their journals, durably.
    pub async fn remove_transfers(&self, ids: &[u64]) -> Result<(), StoreError> {
        for id in ids {
            self.kv.remove(Tree::Transfers, &id.to_be_bytes()).await?;
            for key in self.kv.keys(Tree::Journal, &id.to_be_bytes()).await? {
                self.kv.remove(Tree::Journal, &key).await?;
            }
        }
        if !ids.is_empty() {
            self.kv.durable().await?;
        }
        Ok(())
    }

    /// Writes one room's journal entry of a transfer and makes it durable before returning.
    pub async fn put_journal_entry(&self, id: u64, room: &RoomId, entry: &[u8]) -> Result<(), StoreError> {
        self.kv.insert(Tree::Journal, &[&id.to_be_bytes()[..], room.as_bytes()].concat(), entry).await?;
        self.kv.durable().await
    }

    /// Every room's journal entry of a transfer.
    pub async fn journal(&self, id: u64) -> Result<Vec<(ruma::OwnedRoomId, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for (k, v) in self.kv.scan(Tree::Journal, &id.to_be_bytes()).await? {
            let room = ruma::OwnedRoomId::try_from(String::from_utf8_lossy(&k[8..]).as_ref())
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            out.push((room, v));
        }
        Ok(out)
    }
}

fn owner_prefix(owner: &UserId) -> Vec<u8> {
    BundleId::prefix(owner).into_bytes()
}

pub fn key_path_for(db_path: &Path) -> PathBuf {
    let mut name = db_path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".key");
    db_path.with_file_name(name)
}

fn load_or_create_key(path: &Path) -> Result<[u8; 32], StoreError> {
    let err = |message: String| StoreError::Key { path: path.display().to_string(), message };
    match std::fs::read(path) {
        Ok(bytes) => bytes.try_into().map_err(|b: Vec<u8>| err(format!("expected 32 bytes, found {}", b.len()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            use std::io::Write;
            let key: [u8; 32] = XChaCha20Poly1305::generate_key(&mut OsRng).into();
            // Whole or not at all: a crash mid-write must not leave a short key behind.
            let mut f = crate::registration::private_file_beside(path).map_err(|e| err(format!("{e:#}")))?;
            f.write_all(&key).and_then(|_| f.as_file().sync_all()).map_err(|e| err(e.to_string()))?;
            f.persist_noclobber(path).map_err(|e| err(e.error.to_string()))?;
            Ok(key)
        }
        Err(e) => Err(err(e.to_string())),
    }
}

/// An inbox event's attempt count as stored (none: 0; a record that does not read: counted as 0).
fn attempts(stored: Option<&[u8]>) -> u32 {
    stored.and_then(|v| v.try_into().ok()).map(u32::from_be_bytes).unwrap_or(0)
}

/// What a dropped file's seal is bound to: its user (a record moved to another key won't open).
fn dropped_aad(user: &UserId) -> Vec<u8> {
    [b"dropped\0".as_slice(), user.as_bytes()].concat()
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::postgres::Postgres;

    /// Where a test's store lives: a sled folder, or a database of a PostgreSQL started for the
    /// test. [`Db::open`] opens it (again: a restart), its key beside it either way.
    struct Db {
        dir: tempfile::TempDir,
        postgres: Option<(Postgres, String)>,
    }

    impl Db {
        fn sled() -> Db {
            Db { dir: tempfile::tempdir().unwrap(), postgres: None }
        }

        async fn postgres() -> Db {
            let dir = tempfile::tempdir().unwrap();
            let server = Postgres::start(&dir.path().join("pg")).await.unwrap();
            let uri = server.create_database("handoff").await.unwrap();
            Db { dir, postgres: Some((server, uri)) }
        }

        fn path(&self) -> PathBuf {
            self.dir.path().join("db")
        }

        fn key_path(&self) -> PathBuf {
            key_path_for(&self.path())
        }

        async fn open(&self) -> Store {
            match &self.postgres {
                None => Store::open(&self.path()).unwrap(),
                Some((_, uri)) => Store::connect_postgres(uri, 4, &self.key_path()).await.unwrap(),
            }
        }
    }

    /// The test `$name(db)` on each engine: `$name::sled` and `$name::postgres`.
    macro_rules! on_both {
        ($name:ident) => {
            mod $name {
                #[tokio::test]
                async fn sled() {
                    super::$name(super::Db::sled()).await
                }
                #[tokio::test]
                async fn postgres() {
                    super::$name(super::Db::postgres().await).await
                }
            }
        };
    }

    async fn txns_survive_reopen(db: Db) {
        {
            let store = db.open().await;
            assert!(!store.txn_seen("1").await.unwrap());
            let numbers = store.accept_txn("1", &[b"{\"a\":1}".to_vec(), b"{}".to_vec()]).await.unwrap().unwrap();
            assert_eq!(numbers.len(), 2);
            assert!(store.txn_seen("1").await.unwrap());
            // Seen: accepted once only, nothing more in the inbox.
            assert_eq!(store.accept_txn("1", &[b"{}".to_vec()]).await.unwrap(), None);
            store.inbox_done(numbers[1]).await.unwrap();
        }
        let store = db.open().await;
        assert!(store.txn_seen("1").await.unwrap());
        assert!(!store.txn_seen("2").await.unwrap());
        // The unhandled event survived the restart, sealed at rest.
        let inbox = store.inbox().await.unwrap();
        assert_eq!(inbox.len(), 1);
        assert_eq!(inbox[0].1, b"{\"a\":1}");
        let raw = store.kv.scan(Tree::Inbox, &[]).await.unwrap();
        assert!(!raw.iter().any(|(_, v)| v.windows(5).any(|w| w == b"\"a\":1")));
    }
    on_both!(txns_survive_reopen);

    async fn attempts_count_across_restarts_until_the_event_is_done(db: Db) {
        let numbers = {
            let store = db.open().await;
            let numbers = store.accept_txn("t", &[b"{}".to_vec(), b"{}".to_vec()]).await.unwrap().unwrap();
            assert_eq!(store.inbox_attempt(numbers[0]).await.unwrap(), 1);
            numbers
        };
        let store = db.open().await;
        assert_eq!(store.inbox_attempt(numbers[0]).await.unwrap(), 2, "counted across the restart");
        assert_eq!(store.inbox_attempt(numbers[1]).await.unwrap(), 1, "each event has its own count");
        // A clean stop interrupted the second attempt: it does not count.
        store.inbox_attempts_undo(&numbers[..1]).await.unwrap();
        assert_eq!(store.inbox_attempt(numbers[0]).await.unwrap(), 2);
        // Done: the count goes with the event, and an undo after it makes none.
        store.inbox_done(numbers[0]).await.unwrap();
        store.inbox_attempts_undo(&numbers[..1]).await.unwrap();
        assert!(store.kv.get(Tree::InboxAttempts, &numbers[0].to_be_bytes()).await.unwrap().is_none());
        assert_eq!(store.inbox().await.unwrap().len(), 1);
    }
    on_both!(attempts_count_across_restarts_until_the_event_is_done);

    /// The child half of the test below: counts an attempt, then is killed by SIGKILL.
    const KILLED_CHILD: &str = "HANDOFF_TEST_KILLED_STORE";

    #[tokio::test]
    async fn an_attempt_counted_before_a_kill_9_is_still_counted() {
        if let Ok(path) = std::env::var(KILLED_CHILD) {
            let store = Store::open(Path::new(&path)).unwrap();
            let number = store.inbox().await.unwrap()[0].0;
            store.inbox_attempt(number).await.unwrap();
            // As the out-of-memory killer would: no destructor runs, nothing is flushed on the way out.
            std::process::Command::new("kill").arg("-KILL").arg(std::process::id().to_string()).status().unwrap();
            std::thread::sleep(Duration::from_secs(60));
            unreachable!("not killed");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let number = {
            let store = Store::open(&path).unwrap();
            store.accept_txn("t", &[b"{}".to_vec()]).await.unwrap().unwrap()[0]
        };
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "store::tests::an_attempt_counted_before_a_kill_9_is_still_counted", "--nocapture"])
            .env(KILLED_CHILD, &path)
            .status()
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "the child was killed: {status}");
        let store = Store::open(&path).unwrap();
        assert_eq!(store.inbox_attempt(number).await.unwrap(), 2, "the killed attempt counted");
    }

    #[tokio::test]
    async fn second_opener_gets_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let _first = Store::open(&path).unwrap();
        let err = Store::open(&path).err().unwrap().to_string();
        assert!(err.contains("another `handoff serve`"), "{err}");
    }

    async fn bundles_are_sealed_and_codes_redeem_once(db: Db) {
        let store = db.open().await;
        let owner = <&UserId>::try_from("@old:x.org").unwrap();
        let newer = <&UserId>::try_from("@new:x.org").unwrap();
        let bundle = crate::bundle::tests::sample();
        let id = store.put_bundle(owner, &bundle).await.unwrap();
        assert_eq!(store.get_bundle(&id).await.unwrap().unwrap().bundle.to_json(), bundle.to_json());
        assert_eq!(store.latest_bundle(owner).await.unwrap().unwrap().0, id);
        // Nothing readable at rest: not the display name, not a room ID.
        let raw = store.raw_bundle_bytes().await.unwrap();
        for needle in ["Favourite", "!fav:example.org", "spam:evil.org"] {
            assert!(!raw.windows(needle.len()).any(|w| w == needle.as_bytes()), "{needle} readable at rest");
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(db.key_path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let code = crate::code::TransferCode::generate();
        let record = CodeRecord {
            owner: owner.to_owned(),
            bundle: id.clone(),
            expires_at_ms: now_ms() + 60_000,
            bound_to: Some(newer.to_owned()),
            redeemed_by: None,
        };
        store.put_code(&code.hash(), &record).await.unwrap();
        // Bound to @new: anyone else sees "no such code".
        assert_eq!(store.redeem_code(&code.hash(), owner).await.unwrap(), Err(RedeemError::NotFound));
        let redeemed = store.redeem_code(&code.hash(), newer).await.unwrap().unwrap();
        assert_eq!(redeemed.bundle, id);
        assert_eq!(store.redeem_code(&code.hash(), newer).await.unwrap(), Err(RedeemError::Used));
        let other = crate::code::TransferCode::generate();
        assert_eq!(store.redeem_code(&other.hash(), newer).await.unwrap(), Err(RedeemError::NotFound));
        let expired = CodeRecord { expires_at_ms: now_ms() - 1, bound_to: None, ..record };
        store.put_code(&other.hash(), &expired).await.unwrap();
        assert_eq!(store.redeem_code(&other.hash(), newer).await.unwrap(), Err(RedeemError::Expired));

        let gone = store.forget(owner).await.unwrap();
        assert_eq!(gone, Forgotten { bundles: 1, codes: 1, ..Default::default() });
        assert!(store.latest_bundle(owner).await.unwrap().is_none());
        assert!(store.raw_bundle_bytes().await.unwrap().is_empty());
        // The used code outlives `forget` (by either account) until it expires: it opens nothing.
        store.forget(newer).await.unwrap();
        assert_eq!(store.redeem_code(&code.hash(), newer).await.unwrap(), Err(RedeemError::Used));
        assert!(!store.claim_code(&code.hash(), &redeemed).await.unwrap(), "a claim of it is refused");
        assert_eq!(store.codes_of(owner).await.unwrap().len(), 1);
    }
    on_both!(bundles_are_sealed_and_codes_redeem_once);

    async fn retention_purges_codes_offers_and_txns(db: Db) {
        let store = db.open().await;
        let old = now_ms() - 10_000;
        store.accept_txn("t1", &[]).await.unwrap();
        let auto = AutoStart {
            old: UserId::parse("@old:x.org").unwrap(),
            new: UserId::parse("@new:x.org").unwrap(),
            code_hash: [1; 32],
            expires_at_ms: old,
            offered_in: None,
        };
        store.put_auto(&auto).await.unwrap();
        // Within retention: nothing goes but the expired offer.
        let gone = store.purge(Duration::from_secs(3600)).await.unwrap();
        assert_eq!(gone, Forgotten { offers: 1, ..Default::default() });
        assert!(store.txn_seen("t1").await.unwrap());
        tokio::time::sleep(Duration::from_millis(5)).await;
        let gone = store.purge(Duration::from_millis(1)).await.unwrap();
        assert_eq!(gone, Forgotten { txns: 1, ..Default::default() });
        assert!(!store.txn_seen("t1").await.unwrap());
        assert!(store.autos().await.unwrap().is_empty());
    }
    on_both!(retention_purges_codes_offers_and_txns);

    async fn transfer_records_are_sealed_and_go_with_their_journals(db: Db) {
        let store = db.open().await;
        let room = <&RoomId>::try_from("!r:x.org").unwrap();
        store.put_transfer(7, b"{\"name\":\"Secret room\"}").await.unwrap();
        store.put_journal_entry(7, room, b"\"done\"").await.unwrap();
        let raw = store.kv.scan(Tree::Transfers, &[]).await.unwrap();
        assert!(!raw.iter().any(|(_, v)| v.windows(6).any(|w| w == b"Secret")));
        assert_eq!(store.transfer(7).await.unwrap().unwrap(), b"{\"name\":\"Secret room\"}");
        assert_eq!(store.journal(7).await.unwrap(), vec![(room.to_owned(), b"\"done\"".to_vec())]);
        store.remove_transfers(&[7]).await.unwrap();
        assert!(store.transfer(7).await.unwrap().is_none());
        assert!(store.journal(7).await.unwrap().is_empty());
    }
    on_both!(transfer_records_are_sealed_and_go_with_their_journals);

    async fn bundles_beyond_the_cap_go_with_their_codes(db: Db) {
        let store = db.open().await;
        let owner = <&UserId>::try_from("@old:x.org").unwrap();
        let mut ids = Vec::new();
        for _ in 0..4 {
            let id = store.put_bundle(owner, &crate::bundle::tests::sample()).await.unwrap();
            let record = CodeRecord {
                owner: owner.to_owned(),
                bundle: id.clone(),
                expires_at_ms: now_ms() + 60_000,
                bound_to: None,
                redeemed_by: None,
            };
            store.put_code(&crate::code::TransferCode::generate().hash(), &record).await.unwrap();
            ids.push(id);
        }
        assert_eq!(store.trim_bundles(owner, 2).await.unwrap(), 2);
        assert_eq!(store.bundle_count(owner).await.unwrap(), 2);
        assert!(store.get_bundle(&ids[0]).await.unwrap().is_none(), "the oldest went");
        assert!(store.get_bundle(&ids[3]).await.unwrap().is_some(), "the newest stayed");
        let codes: Vec<BundleId> = store.codes_of(owner).await.unwrap().into_iter().map(|c| c.bundle).collect();
        assert_eq!(codes.len(), 2);
        assert!(codes.iter().all(|b| *b == ids[2] || *b == ids[3]));
        assert_eq!(store.trim_bundles(owner, 2).await.unwrap(), 0);
    }
    on_both!(bundles_beyond_the_cap_go_with_their_codes);

    async fn purge_drops_old_bundles_and_a_wrong_key_is_reported(db: Db) {
        let owner = <&UserId>::try_from("@old:x.org").unwrap();
        {
            let store = db.open().await;
            store.put_bundle(owner, &crate::bundle::tests::sample()).await.unwrap();
            assert_eq!(store.purge(Duration::from_secs(3600)).await.unwrap().bundles, 0);
        }
        std::fs::write(db.key_path(), [7u8; 32]).unwrap();
        let store = db.open().await;
        let err = store.latest_bundle(owner).await.unwrap_err().to_string();
        assert!(err.contains("does not open with the store key"), "{err}");
        assert_eq!(store.purge(Duration::ZERO).await.unwrap().bundles, 1);
    }
    on_both!(purge_drops_old_bundles_and_a_wrong_key_is_reported);

    async fn dm_rooms_round_trip(db: Db) {
        let store = db.open().await;
        let room = <&RoomId>::try_from("!a:x.org").unwrap();
        let user = <&UserId>::try_from("@u:x.org").unwrap();
        assert_eq!(store.dm_room_user(room).await.unwrap(), None);
        store.set_dm_room(room, user).await.unwrap();
        assert_eq!(store.dm_room_user(room).await.unwrap().as_deref(), Some(user));
    }
    on_both!(dm_rooms_round_trip);

    /// Two instances on one PostgreSQL take the same transaction from the homeserver at once (a
    /// retry that reached the other): it is accepted once, its events in the inbox once.
    #[tokio::test]
    async fn two_instances_accept_a_transaction_once() {
        let db = Db::postgres().await;
        let (a, b) = (db.open().await, db.open().await);
        let events = [b"{\"n\":1}".to_vec(), b"{\"n\":2}".to_vec()];
        for round in 0..20 {
            let txn = format!("t{round}");
            let (x, y) = tokio::join!(a.accept_txn(&txn, &events), b.accept_txn(&txn, &events));
            let accepted = [x.unwrap(), y.unwrap()].into_iter().filter(Option::is_some).count();
            assert_eq!(accepted, 1, "round {round}");
        }
        assert_eq!(a.inbox().await.unwrap().len(), 40, "two events per transaction, once each");
    }

    /// A leader that lost its lead without noticing yet (its lock session ended while it was
    /// stopped, say) writes nothing once another instance leads: every write a leader alone makes
    /// is refused by the epoch and says so, while the edge's writes (a transaction from the
    /// homeserver) still land; the new leader's writes do.
    #[tokio::test]
    async fn a_stale_leader_writes_nothing_once_another_leads() {
        let db = Db::postgres().await;
        let (a, b) = (db.open().await, db.open().await);
        let lead_a = a.lead("handoff", || {}).await.unwrap().expect("PostgreSQL has a lead");
        let room = <&RoomId>::try_from("!r:x.org").unwrap();
        let id = a.new_transfer_id().await.unwrap();
        a.put_transfer(id, b"a leads").await.unwrap();
        a.put_journal_entry(id, room, b"\"invited\"").await.unwrap();
        let numbers = a.accept_txn("t1", &[b"{}".to_vec()]).await.unwrap().unwrap();

        // a's lock session ends (as when the database stops hearing from it); b takes the lead.
        let Some((_, uri)) = &db.postgres else { unreachable!() };
        let (admin, connection) = tokio_postgres::connect(uri, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        let killed = admin
            .query("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted", &[])
            .await
            .unwrap();
        assert_eq!(killed.len(), 1, "the lead is one session's lock");
        let lead_b =
            tokio::time::timeout(Duration::from_secs(10), b.lead("handoff", || {})).await.unwrap().unwrap().unwrap();
        assert_eq!((lead_a.epoch(), lead_b.epoch()), (1, 2));

        // a still believes it leads: each kind of leader write is refused.
        assert!(matches!(a.put_transfer(id, b"stale").await, Err(StoreError::Fenced)));
        assert!(matches!(a.put_journal_entry(id, room, b"\"joined\"").await, Err(StoreError::Fenced)));
        assert!(matches!(a.inbox_done(numbers[0]).await, Err(StoreError::Fenced)), "an event taken out of the inbox");
        assert!(matches!(a.remove_transfers(&[id]).await, Err(StoreError::Fenced)), "a batch");
        let code = crate::code::TransferCode::generate();
        let owner = <&UserId>::try_from("@old:x.org").unwrap();
        let record = CodeRecord {
            owner: owner.to_owned(),
            bundle: BundleId::new(owner, 1),
            expires_at_ms: now_ms() + 60_000,
            bound_to: None,
            redeemed_by: None,
        };
        assert!(matches!(a.put_code(&code.hash(), &record).await, Err(StoreError::Fenced)));
        assert!(matches!(a.claim_code(&code.hash(), &record).await, Err(StoreError::Fenced)), "a compare-and-swap");
        assert!(matches!(a.inbox_attempt(numbers[0]).await, Err(StoreError::Fenced)));
        let why = tokio::time::timeout(Duration::from_secs(5), lead_a.lost()).await.expect("a learns it lost the lead");
        assert!(why.contains("another instance leads"), "{why}");
        // What a wrote as leader is as it was; the edge's writes still land from either.
        assert_eq!(b.transfer(id).await.unwrap().unwrap(), b"a leads");
        assert_eq!(b.journal(id).await.unwrap(), vec![(room.to_owned(), b"\"invited\"".to_vec())]);
        assert_eq!(b.inbox().await.unwrap().len(), 1);
        assert!(a.accept_txn("t2", &[b"{}".to_vec()]).await.unwrap().is_some(), "a's edge still takes transactions");
        assert!(b.peek_code(&code.hash(), owner).await.unwrap().is_err(), "the stale code was not written");
        // The new leader writes.
        b.put_transfer(id, b"b leads").await.unwrap();
        b.inbox_done(numbers[0]).await.unwrap();
        assert_eq!(a.transfer(id).await.unwrap().unwrap(), b"b leads");
        drop(lead_b);
    }

    /// A database that a newer handoff migrated further is refused, not guessed at.
    #[tokio::test]
    async fn a_database_newer_than_this_handoff_is_refused() {
        let db = Db::postgres().await;
        db.open().await;
        let Some((_, uri)) = &db.postgres else { unreachable!() };
        let (client, connection) = tokio_postgres::connect(uri, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        client.execute("UPDATE handoff_schema SET version = version + 1", &[]).await.unwrap();
        let err = Store::connect_postgres(uri, 2, &db.key_path()).await.err().expect("refused").to_string();
        assert!(err.contains("schema version 3, this handoff knows version 2"), "{err}");
    }

    /// A bad address says where it looked, and what to check.
    #[tokio::test]
    async fn an_unreachable_postgres_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let port = crate::sandbox::free_port();
        let uri = format!("postgres://handoff@127.0.0.1:{port}/handoff");
        let err = Store::connect_postgres(&uri, 2, &dir.path().join("k")).await.err().expect("refused").to_string();
        assert!(err.contains("cannot reach the PostgreSQL database") && err.contains("database.uri"), "{err}");
    }

    /// A sled store copied into PostgreSQL: every record reads there with the same key (a
    /// transfer with its journal, a bundle, a code, an unhandled inbox event, a DM), the IDs go
    /// on past the copied ones, and a second copy into the same database is refused.
    #[tokio::test]
    async fn a_sled_store_copied_into_postgresql_reads_the_same_there() {
        let sled = Db::sled();
        let from = sled.open().await;
        let owner = <&UserId>::try_from("@old:x.org").unwrap();
        let room = <&RoomId>::try_from("!r:x.org").unwrap();
        let bundle = from.put_bundle(owner, &crate::bundle::tests::sample()).await.unwrap();
        let record = CodeRecord {
            owner: owner.to_owned(),
            bundle: bundle.clone(),
            expires_at_ms: now_ms() + 60_000,
            bound_to: None,
            redeemed_by: None,
        };
        let code = crate::code::TransferCode::generate();
        from.put_code(&code.hash(), &record).await.unwrap();
        let id = from.new_transfer_id().await.unwrap();
        from.put_transfer(id, b"{\"t\":1}").await.unwrap();
        from.put_journal_entry(id, room, b"\"done\"").await.unwrap();
        let numbers = from.accept_txn("t", &[b"{\"e\":1}".to_vec()]).await.unwrap().unwrap();
        from.set_dm_room(room, owner).await.unwrap();

        let pg = Db::postgres().await;
        let Some((_, uri)) = &pg.postgres else { unreachable!() };
        // The same key: the copy is the same records, sealed as they were.
        let to = Store::connect_postgres(uri, 2, &sled.key_path()).await.unwrap();
        let copied = from.copy_into(&to).await.unwrap();
        assert!(copied.contains(&("bundles", 1)) && copied.contains(&("journal", 1)), "{copied:?}");
        assert_eq!(to.get_bundle(&bundle).await.unwrap().unwrap().owner, owner);
        assert_eq!(to.peek_code(&code.hash(), owner).await.unwrap().unwrap().bundle, bundle);
        assert_eq!(to.transfer(id).await.unwrap().unwrap(), b"{\"t\":1}");
        assert_eq!(to.journal(id).await.unwrap(), vec![(room.to_owned(), b"\"done\"".to_vec())]);
        assert_eq!(to.inbox().await.unwrap(), vec![(numbers[0], b"{\"e\":1}".to_vec())]);
        assert!(to.txn_seen("t").await.unwrap());
        assert_eq!(to.dm_room_user(room).await.unwrap().as_deref(), Some(owner));
        assert!(to.new_transfer_id().await.unwrap() > id, "IDs go on past the copied ones");
        let err = from.copy_into(&to).await.unwrap_err().to_string();
        assert!(err.contains("already holds records"), "{err}");
    }

    /// A user that may connect but not create tables (PostgreSQL 15 and later give no one but
    /// the owner CREATE on `public`), and a database that does not exist: each says so, and what
    /// to do.
    #[tokio::test]
    async fn postgresql_refusals_say_what_to_do() {
        let db = Db::postgres().await;
        let Some((server, uri)) = &db.postgres else { unreachable!() };
        let (client, connection) = tokio_postgres::connect(uri, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        client.batch_execute("CREATE ROLE visitor LOGIN").await.unwrap();
        let visitor = uri.replacen("postgres@", "visitor@", 1);
        let err = Store::connect_postgres(&visitor, 2, &db.key_path()).await.err().expect("refused").to_string();
        assert!(err.contains("permission denied") && err.contains("GRANT CREATE ON SCHEMA public"), "{err}");
        let missing = server.uri("nowhere");
        let err = Store::connect_postgres(&missing, 2, &db.key_path()).await.err().expect("refused").to_string();
        assert!(
            err.contains("cannot reach the PostgreSQL database") && err.contains("\"nowhere\" does not exist"),
            "{err}"
        );
    }
}
