//! The embedded database (sled), behind typed methods: nothing else in the crate touches sled.
//!
//! Trees, one per record kind:
//! - `txns`: transaction IDs the homeserver pushed and that were handled (value: handled-at, ms).
//! - `dm_rooms`: the bot's DM with each user (room ID -> user ID), so a bare command is understood there.
//! - `meta`: schema version.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use ruma::{OwnedUserId, RoomId, UserId};

const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot open the database at {path}: {source} (is another `handoff serve` using it? check database.path)"
    )]
    Open { path: String, source: sled::Error },
    #[error("database error: {0}")]
    Sled(#[from] sled::Error),
    #[error(
        "the database at {path} has schema version {found}, this handoff knows version {SCHEMA_VERSION}"
    )]
    Schema { path: String, found: u32 },
}

#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    txns: sled::Tree,
    dm_rooms: sled::Tree,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(64 << 20)
            .open()
            .map_err(|source| StoreError::Open {
                path: path.display().to_string(),
                source,
            })?;
        let meta = db.open_tree("meta")?;
        match meta.get("schema_version")? {
            None => {
                meta.insert("schema_version", &SCHEMA_VERSION.to_be_bytes())?;
            }
            Some(v) => {
                let found = u32::from_be_bytes(v.as_ref().try_into().unwrap_or([0xff; 4]));
                if found != SCHEMA_VERSION {
                    return Err(StoreError::Schema {
                        path: path.display().to_string(),
                        found,
                    });
                }
            }
        }
        Ok(Store {
            txns: db.open_tree("txns")?,
            dm_rooms: db.open_tree("dm_rooms")?,
            db,
        })
    }

    /// Whether this transaction ID was already handled.
    pub fn txn_seen(&self, txn_id: &str) -> Result<bool, StoreError> {
        Ok(self.txns.contains_key(txn_id)?)
    }

    /// Records a handled transaction and makes it durable before returning.
    pub async fn record_txn(&self, txn_id: &str) -> Result<(), StoreError> {
        self.txns.insert(txn_id, &now_ms().to_be_bytes())?;
        self.db.flush_async().await?;
        Ok(())
    }

    pub fn txn_count(&self) -> usize {
        self.txns.len()
    }

    pub fn set_dm_room(&self, room: &RoomId, user: &UserId) -> Result<(), StoreError> {
        self.dm_rooms.insert(room.as_str(), user.as_str())?;
        Ok(())
    }

    /// The user whose DM with the bot this room is, if it is one.
    pub fn dm_room_user(&self, room: &RoomId) -> Result<Option<OwnedUserId>, StoreError> {
        Ok(self.dm_rooms.get(room.as_str())?.and_then(|v| {
            std::str::from_utf8(&v)
                .ok()
                .and_then(|s| UserId::parse(s).ok())
        }))
    }

    pub fn remove_dm_room(&self, room: &RoomId) -> Result<(), StoreError> {
        self.dm_rooms.remove(room.as_str())?;
        Ok(())
    }

    /// A cheap read and write, for `/health`.
    pub fn check(&self) -> Result<(), StoreError> {
        self.db.get("health")?;
        Ok(())
    }

    pub async fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_async().await?;
        Ok(())
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn txns_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let store = Store::open(&path).unwrap();
            assert!(!store.txn_seen("1").unwrap());
            store.record_txn("1").await.unwrap();
            assert!(store.txn_seen("1").unwrap());
        }
        let store = Store::open(&path).unwrap();
        assert!(store.txn_seen("1").unwrap());
        assert!(!store.txn_seen("2").unwrap());
    }

    #[tokio::test]
    async fn second_opener_gets_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let _first = Store::open(&path).unwrap();
        let err = Store::open(&path).err().unwrap().to_string();
        assert!(err.contains("another `handoff serve`"), "{err}");
    }

    #[test]
    fn dm_rooms_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let room = <&RoomId>::try_from("!a:x.org").unwrap();
        let user = <&UserId>::try_from("@u:x.org").unwrap();
        assert_eq!(store.dm_room_user(room).unwrap(), None);
        store.set_dm_room(room, user).unwrap();
        assert_eq!(store.dm_room_user(room).unwrap().as_deref(), Some(user));
    }
}
