//! The store's engines: ordered maps of bytes, one per [`Tree`], with the few operations the
//! store's typed methods are made of. sled is the embedded default; each engine keeps what
//! "durable" means for it (sled: a flush, shared by the writers waiting at the same time).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sled::Transactional;

use super::StoreError;

/// One map of the store (a sled tree).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Tree {
    Txns,
    DmRooms,
    Bundles,
    Codes,
    Transfers,
    Journal,
    Auto,
    Dropped,
    Inbox,
    InboxAttempts,
    Meta,
}

impl Tree {
    pub(super) const ALL: [Tree; 11] = [
        Tree::Txns,
        Tree::DmRooms,
        Tree::Bundles,
        Tree::Codes,
        Tree::Transfers,
        Tree::Journal,
        Tree::Auto,
        Tree::Dropped,
        Tree::Inbox,
        Tree::InboxAttempts,
        Tree::Meta,
    ];

    /// Its name in the database (sled's tree names, kept from before there were engines).
    pub(super) fn name(self) -> &'static str {
        match self {
            Tree::Txns => "txns",
            Tree::DmRooms => "dm_rooms",
            Tree::Bundles => "bundles",
            Tree::Codes => "codes",
            Tree::Transfers => "transfers",
            Tree::Journal => "journal",
            Tree::Auto => "auto",
            Tree::Dropped => "dropped_files",
            Tree::Inbox => "inbox",
            Tree::InboxAttempts => "inbox_attempts",
            Tree::Meta => "meta",
        }
    }
}

/// A write of [`Kv::apply`].
pub(super) enum Write {
    Insert(Tree, Vec<u8>, Vec<u8>),
    Remove(Tree, Vec<u8>),
}

#[derive(Clone)]
pub(super) enum Kv {
    Sled(SledKv),
}

impl Kv {
    pub(super) fn open_sled(path: &Path) -> Result<Kv, StoreError> {
        SledKv::open(path).map(Kv::Sled)
    }

    pub(super) async fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            Kv::Sled(s) => Ok(s.tree(tree).get(key)?.map(|v| v.to_vec())),
        }
    }

    pub(super) async fn insert(&self, tree: Tree, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        match self {
            Kv::Sled(s) => {
                s.tree(tree).insert(key, value)?;
                Ok(())
            }
        }
    }

    /// Removes a key; returns its value if it had one.
    pub(super) async fn remove(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            Kv::Sled(s) => Ok(s.tree(tree).remove(key)?.map(|v| v.to_vec())),
        }
    }

    /// Every entry whose key starts with `prefix` (all with an empty one), in key order.
    pub(super) async fn scan(&self, tree: Tree, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        match self {
            Kv::Sled(s) => s
                .tree(tree)
                .scan_prefix(prefix)
                .map(|item| item.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(StoreError::from))
                .collect(),
        }
    }

    /// The keys alone, in order (for trees whose values are large: bundles).
    pub(super) async fn keys(&self, tree: Tree, prefix: &[u8]) -> Result<Vec<Vec<u8>>, StoreError> {
        match self {
            Kv::Sled(s) => s
                .tree(tree)
                .scan_prefix(prefix)
                .keys()
                .map(|k| k.map(|k| k.to_vec()).map_err(StoreError::from))
                .collect(),
        }
    }

    pub(super) async fn len(&self, tree: Tree) -> Result<usize, StoreError> {
        match self {
            Kv::Sled(s) => Ok(s.tree(tree).len()),
        }
    }

    /// Sets `key` to `new` (`None`: removes it) if its value is `old` (`None`: absent); whether
    /// it did.
    pub(super) async fn compare_and_swap(
        &self,
        tree: Tree,
        key: &[u8],
        old: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<bool, StoreError> {
        match self {
            Kv::Sled(s) => Ok(s.tree(tree).compare_and_swap(key, old, new)?.is_ok()),
        }
    }

    /// Applies `writes` at once, unless `unless` (a tree and key) holds a value already: whether
    /// they were applied. All or nothing.
    pub(super) async fn apply(&self, unless: Option<(Tree, &[u8])>, writes: &[Write]) -> Result<bool, StoreError> {
        match self {
            Kv::Sled(s) => s.apply(unless, writes),
        }
    }

    /// A number never given before (inbox numbers, bundle and transfer IDs).
    pub(super) async fn generate_id(&self) -> Result<u64, StoreError> {
        match self {
            Kv::Sled(s) => Ok(s.db.generate_id()?),
        }
    }

    /// Makes every write done so far durable.
    pub(super) async fn durable(&self) -> Result<(), StoreError> {
        match self {
            Kv::Sled(s) => s.durable().await,
        }
    }

    pub(super) fn size_on_disk(&self) -> Result<u64, StoreError> {
        match self {
            Kv::Sled(s) => Ok(s.db.size_on_disk()?),
        }
    }
}

/// The embedded engine: one sled database, a tree per [`Tree`].
#[derive(Clone)]
pub(super) struct SledKv {
    db: sled::Db,
    trees: Arc<[sled::Tree; 11]>,
    commit: Arc<GroupCommit>,
}

impl SledKv {
    fn open(path: &Path) -> Result<SledKv, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(64 << 20)
            .open()
            .map_err(|source| StoreError::Open { path: path.display().to_string(), source })?;
        let meta = db.open_tree(Tree::Meta.name())?;
        match meta.get("schema_version")? {
            None => {
                meta.insert("schema_version", &super::SCHEMA_VERSION.to_be_bytes())?;
            }
            Some(v) => {
                let found = u32::from_be_bytes(v.as_ref().try_into().unwrap_or([0xff; 4]));
                if found != super::SCHEMA_VERSION {
                    return Err(StoreError::Schema { path: path.display().to_string(), found });
                }
            }
        }
        let mut trees = Vec::with_capacity(Tree::ALL.len());
        for tree in Tree::ALL {
            trees.push(db.open_tree(tree.name())?);
        }
        let trees: [sled::Tree; 11] = trees.try_into().map_err(|_| StoreError::Corrupt("trees".into()))?;
        Ok(SledKv { db, trees: Arc::new(trees), commit: Arc::default() })
    }

    fn tree(&self, tree: Tree) -> &sled::Tree {
        &self.trees[Tree::ALL.iter().position(|t| *t == tree).expect("every tree is opened")]
    }

    fn apply(&self, unless: Option<(Tree, &[u8])>, writes: &[Write]) -> Result<bool, StoreError> {
        use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
        // One sled transaction over every tree involved (sled takes them as a slice).
        let mut involved: Vec<Tree> = writes
            .iter()
            .map(|w| match w {
                Write::Insert(t, ..) | Write::Remove(t, _) => *t,
            })
            .collect();
        involved.extend(unless.map(|(t, _)| t));
        involved.sort_by_key(|t| t.name());
        involved.dedup();
        let trees: Vec<sled::Tree> = involved.iter().map(|t| self.tree(*t).clone()).collect();
        let at = |t: Tree| involved.iter().position(|i| *i == t).expect("involved");
        trees
            .as_slice()
            .transaction(|tx: &Vec<TransactionalTree>| {
                if let Some((tree, key)) = unless
                    && tx[at(tree)].get(key)?.is_some()
                {
                    return Ok(false);
                }
                for write in writes {
                    match write {
                        Write::Insert(tree, k, v) => {
                            tx[at(*tree)].insert(k.as_slice(), v.as_slice())?;
                        }
                        Write::Remove(tree, k) => {
                            tx[at(*tree)].remove(k.as_slice())?;
                        }
                    }
                }
                Ok::<_, ConflictableTransactionError<()>>(true)
            })
            .map_err(|e| match e {
                TransactionError::Storage(e) => StoreError::Sled(e),
                TransactionError::Abort(()) => StoreError::Corrupt("transaction aborted".into()),
            })
    }

    /// Concurrent callers share one flush: while one flushes, the others queue; the next one
    /// flushes for all of them at once.
    async fn durable(&self) -> Result<(), StoreError> {
        let commit = &self.commit;
        let mine = commit.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let _turn = commit.lock.lock().await;
        if commit.flushed.load(Ordering::SeqCst) >= mine {
            return Ok(());
        }
        let upto = commit.requested.load(Ordering::SeqCst);
        // In unit tests, inline: awaiting sled's flush thread leaves the runtime idle, and a
        // paused clock (tests in simulated time) would jump to the next timer meanwhile.
        #[cfg(test)]
        self.db.flush()?;
        #[cfg(not(test))]
        self.db.flush_async().await?;
        commit.flushed.fetch_max(upto, Ordering::SeqCst);
        Ok(())
    }
}

/// Group commit: writers that wait for durability at the same time share one flush.
#[derive(Default)]
struct GroupCommit {
    /// Writes that asked to be durable, numbered.
    requested: AtomicU64,
    /// The highest number a completed flush covered.
    flushed: AtomicU64,
    lock: tokio::sync::Mutex<()>,
}
