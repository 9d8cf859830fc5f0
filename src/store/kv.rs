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
    Postgres(PgKv),
}

impl Kv {
    pub(super) fn open_sled(path: &Path) -> Result<Kv, StoreError> {
        SledKv::open(path).map(Kv::Sled)
    }

    pub(super) async fn connect_postgres(uri: &str, pool_size: usize) -> Result<Kv, StoreError> {
        PgKv::connect(uri, pool_size).await.map(Kv::Postgres)
    }

    pub(super) async fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            Kv::Sled(s) => Ok(s.tree(tree).get(key)?.map(|v| v.to_vec())),
            Kv::Postgres(p) => p.get(tree, key).await,
        }
    }

    pub(super) async fn insert(&self, tree: Tree, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        match self {
            Kv::Sled(s) => {
                s.tree(tree).insert(key, value)?;
                Ok(())
            }
            Kv::Postgres(p) => p.insert(tree, key, value).await,
        }
    }

    /// Removes a key; returns its value if it had one.
    pub(super) async fn remove(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            Kv::Sled(s) => Ok(s.tree(tree).remove(key)?.map(|v| v.to_vec())),
            Kv::Postgres(p) => p.remove(tree, key).await,
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
            Kv::Postgres(p) => p.scan(tree, prefix, true).await,
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
            Kv::Postgres(p) => Ok(p.scan(tree, prefix, false).await?.into_iter().map(|(k, _)| k).collect()),
        }
    }

    pub(super) async fn len(&self, tree: Tree) -> Result<usize, StoreError> {
        match self {
            Kv::Sled(s) => Ok(s.tree(tree).len()),
            Kv::Postgres(p) => p.len(tree).await,
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
            Kv::Postgres(p) => p.compare_and_swap(tree, key, old, new).await,
        }
    }

    /// Applies `writes` at once, unless `unless` (a tree and key) holds a value already: whether
    /// they were applied. All or nothing.
    pub(super) async fn apply(&self, unless: Option<(Tree, &[u8])>, writes: &[Write]) -> Result<bool, StoreError> {
        match self {
            Kv::Sled(s) => s.apply(unless, writes),
            Kv::Postgres(p) => p.apply(unless, writes).await,
        }
    }

    /// A number never given before (inbox numbers, bundle and transfer IDs).
    pub(super) async fn generate_id(&self) -> Result<u64, StoreError> {
        match self {
            Kv::Sled(s) => Ok(s.db.generate_id()?),
            Kv::Postgres(p) => p.generate_id().await,
        }
    }

    /// Makes every write done so far durable.
    pub(super) async fn durable(&self) -> Result<(), StoreError> {
        match self {
            Kv::Sled(s) => s.durable().await,
            // Every statement commits before it returns.
            Kv::Postgres(_) => Ok(()),
        }
    }

    /// Copies every entry of every tree into `to` (as stored: sealed records stay sealed with the
    /// same key), and moves `to`'s IDs past every one given here. Returns the entries per tree.
    pub(super) async fn copy_into(&self, to: &Kv) -> Result<Vec<(Tree, usize)>, StoreError> {
        let mut copied = Vec::new();
        for tree in Tree::ALL {
            let mut n = 0;
            // Key by key: one record in memory at a time (a tree of bundles can be large).
            for k in self.keys(tree, &[]).await? {
                // Each engine keeps its own schema version.
                if tree == Tree::Meta && k == b"schema_version" {
                    continue;
                }
                let Some(v) = self.get(tree, &k).await? else { continue };
                to.insert(tree, &k, &v).await?;
                n += 1;
            }
            copied.push((tree, n));
        }
        let next = self.generate_id().await?;
        match to {
            Kv::Postgres(p) => p.ids_from(next).await?,
            Kv::Sled(s) => while s.db.generate_id()? < next {},
        }
        to.durable().await?;
        Ok(copied)
    }

    pub(super) async fn size_on_disk(&self) -> Result<u64, StoreError> {
        match self {
            Kv::Sled(s) => Ok(s.db.size_on_disk()?),
            Kv::Postgres(p) => p.size().await,
        }
    }
}

/// How long opening a sled store waits for the lock of one closed just before.
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(3);

/// The embedded engine: one sled database, a tree per [`Tree`].
#[derive(Clone)]
pub(super) struct SledKv {
    db: sled::Db,
    trees: Arc<[sled::Tree; 11]>,
    commit: Arc<GroupCommit>,
}

impl SledKv {
    fn open(path: &Path) -> Result<SledKv, StoreError> {
        // The file lock of a store closed just now (in this process, or one that is exiting) is
        // let go when its last background flush ends: wait for that a little, not for a second
        // process that holds the store open (it is still refused, after the wait).
        let deadline = std::time::Instant::now() + LOCK_PATIENCE;
        let db = loop {
            match sled::Config::new().path(path).cache_capacity(64 << 20).open() {
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock") && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                opened => {
                    break opened.map_err(|source| StoreError::Open { path: path.display().to_string(), source })?;
                }
            }
        };
        let meta = db.open_tree(Tree::Meta.name())?;
        match meta.get("schema_version")? {
            None => {
                meta.insert("schema_version", &super::SCHEMA_VERSION.to_be_bytes())?;
            }
            Some(v) => {
                let found = u32::from_be_bytes(v.as_ref().try_into().unwrap_or([0xff; 4]));
                if found != super::SCHEMA_VERSION {
                    return Err(StoreError::Schema {
                        path: path.display().to_string(),
                        found,
                        known: super::SCHEMA_VERSION,
                    });
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

/// The shared engine: one PostgreSQL database, a table per [`Tree`] (`k bytea` primary key,
/// `v bytea`; bytea orders bytewise, as sled's keys do), IDs from a sequence. A statement is
/// durable once it returns (it commits; PostgreSQL's `synchronous_commit` is on by default), so
/// there is nothing to flush.
#[derive(Clone)]
pub(super) struct PgKv {
    pool: deadpool_postgres::Pool,
    /// For the leader's own session, outside the pool ([`PgKv::lead`]).
    uri: Arc<str>,
    fence: Arc<Fence>,
}

/// The epoch this instance leads in, once it leads: every write only a leader makes checks it
/// against the database's in the same statement (`handoff_leader`), so once another instance
/// has taken the lead (and counted the epoch up), not one more write of this one lands.
#[derive(Default)]
struct Fence {
    /// 0 until this instance leads (a store that does not lead — `copy-store`, a standby's edge,
    /// the tests — writes unfenced).
    epoch: std::sync::atomic::AtomicI64,
    /// Told when a write found another epoch.
    broken: tokio::sync::Notify,
}

/// The epoch row, read under a share lock: a new leader's count-up waits for the writes that
/// hold it, and those that come after see the new epoch.
const EPOCH: &str = "SELECT epoch FROM handoff_leader FOR SHARE";

impl Tree {
    /// Whether a write into this tree is a leader's alone, fenced by its epoch. The edge's
    /// writes are not (either instance takes the homeserver's transactions): transaction IDs,
    /// new inbox events, the DM rooms that invites name. Taking an event out of the inbox is.
    fn fenced(self, insert: bool) -> bool {
        !matches!((self, insert), (Tree::Txns, _) | (Tree::DmRooms, _) | (Tree::Inbox, true))
    }
}

/// The lead of a database shared by several instances: held while one session, of its own,
/// holds a session-level advisory lock. It ends with that session (the process died, or its
/// connection did), and PostgreSQL gives the lock to the next instance that asks.
pub struct Leadership {
    client: tokio_postgres::Client,
    session: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    fence: Arc<Fence>,
}

impl Leadership {
    /// The epoch this lead counted up to.
    pub fn epoch(&self) -> i64 {
        self.fence.epoch.load(Ordering::Relaxed)
    }

    /// Waits until the lead is lost (the session ended, or stopped answering, or a write found
    /// that another instance leads now); says why.
    pub async fn lost(mut self) -> String {
        loop {
            tokio::select! {
                // First: a refused write says more than the session's end that came with it.
                biased;
                _ = self.fence.broken.notified() => {
                    return "another instance leads the database now (its epoch is newer): this one's writes are refused".into();
                }
                ended = &mut self.session => {
                    return match ended {
                        Ok(Ok(())) => "the database closed the session".into(),
                        Ok(Err(e)) => super::postgres_says(&e),
                        Err(e) => e.to_string(),
                    };
                }
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {
                    let ping = tokio::time::timeout(std::time::Duration::from_secs(5), self.client.simple_query("SELECT 1"));
                    match ping.await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return super::postgres_says(&e),
                        Err(_) => return "the database did not answer for 5 s".into(),
                    }
                }
            }
        }
    }
}

/// The schema, step by step: a database has applied the first `version` of them
/// (`handoff_schema`); the others are applied at start-up, in order.
const MIGRATIONS: &[&str] = &[
    // 1: a table per tree, and the sequence of IDs.
    "CREATE TABLE handoff_txns (k bytea PRIMARY KEY, v bytea NOT NULL);
     CREATE TABLE handoff_dm_rooms (k bytea PRIMARY KEY, v bytea NOT NULL);
     CREATE TABLE handoff_bundles (k bytea PRIMARY KEY, v bytea NOT NULL);
     CREATE TABLE handoff_codes (k bytea PRIMARY KEY, v bytea NOT NULL);
     CREATE TABLE handoff_transfers (k bytea PRIMARY KEY, v bytea NOT NULL);
     CREATE TABLE handoff_journal (k bytea PRIMARY KEY, v bytea NOT NULL);
     CREATE TABLE handoff_auto (k bytea PRIMARY KEY, v bytea NOT NULL);
     CREATE TABLE handoff_dropped_files (k bytea PRIMARY KEY, v bytea NOT NULL);
     CREATE TABLE handoff_inbox (k bytea PRIMARY KEY, v bytea NOT NULL);
     CREATE TABLE handoff_inbox_attempts (k bytea PRIMARY KEY, v bytea NOT NULL);
     CREATE TABLE handoff_meta (k bytea PRIMARY KEY, v bytea NOT NULL);
     CREATE SEQUENCE handoff_ids;",
    // 2: the leader's epoch, counted up by each instance that takes the lead.
    "CREATE TABLE handoff_leader (one boolean PRIMARY KEY DEFAULT true CHECK (one), epoch bigint NOT NULL);
     INSERT INTO handoff_leader (epoch) VALUES (0);",
];

/// Held by the transaction that migrates, so two instances starting at once migrate once.
const MIGRATION_LOCK: i64 = 0x68616e646f6666; // "handoff"

fn table(tree: Tree) -> String {
    format!("handoff_{}", tree.name())
}

/// The smallest key after every key that starts with `prefix` (`None`: there is none).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

impl PgKv {
    async fn connect(uri: &str, pool_size: usize) -> Result<PgKv, StoreError> {
        let mut config = deadpool_postgres::Config::new();
        config.url = Some(uri.to_owned());
        config.pool = Some(deadpool_postgres::PoolConfig::new(pool_size.max(2)));
        let pool = config
            .create_pool(Some(deadpool_postgres::Runtime::Tokio1), tokio_postgres::NoTls)
            .map_err(|e| StoreError::Connect(e.to_string()))?;
        let kv = PgKv { pool, uri: uri.into(), fence: Arc::default() };
        kv.migrate().await?;
        Ok(kv)
    }

    /// Takes the lead of the database for `key`, waiting (asking every `poll`) while another
    /// instance holds it; `standing_by` is called once if it has to wait.
    pub(super) async fn lead(
        &self,
        key: i64,
        poll: std::time::Duration,
        mut standing_by: impl FnMut(),
    ) -> Result<Leadership, StoreError> {
        let mut told = false;
        loop {
            let (client, connection) = tokio_postgres::connect(&self.uri, tokio_postgres::NoTls)
                .await
                .map_err(|e| StoreError::Connect(super::postgres_says(&e)))?;
            let session = tokio::spawn(connection);
            loop {
                // A session lost while waiting: a new one, and ask again.
                let Ok(row) = client.query_one("SELECT pg_try_advisory_lock($1)", &[&key]).await else { break };
                if row.get::<_, bool>(0) {
                    // Counted up under the row's lock: it waits for the writes in flight of
                    // the instance that led before, and fences every one after.
                    let row =
                        client.query_one("UPDATE handoff_leader SET epoch = epoch + 1 RETURNING epoch", &[]).await?;
                    self.fence.epoch.store(row.get(0), Ordering::Relaxed);
                    return Ok(Leadership { client, session, fence: Arc::clone(&self.fence) });
                }
                if !told {
                    told = true;
                    standing_by();
                }
                tokio::time::sleep(poll).await;
                if session.is_finished() {
                    break;
                }
            }
        }
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => StoreError::Connect(super::postgres_says(&e)),
            e => StoreError::Connect(e.to_string()),
        })
    }

    /// Applies the schema steps this database lacks; refuses a database a newer handoff made.
    async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS handoff_schema (version integer NOT NULL)").await?;
        let version: i32 = match tx.query_opt("SELECT version FROM handoff_schema", &[]).await? {
            Some(row) => row.get(0),
            None => {
                tx.execute("INSERT INTO handoff_schema (version) VALUES (0)", &[]).await?;
                0
            }
        };
        let known = MIGRATIONS.len() as i32;
        if version > known {
            return Err(StoreError::Schema {
                path: "the PostgreSQL database".into(),
                found: version as u32,
                known: known as u32,
            });
        }
        for step in &MIGRATIONS[version as usize..] {
            tx.batch_execute(step).await?;
        }
        tx.execute("UPDATE handoff_schema SET version = $1", &[&known]).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let sql = format!("SELECT v FROM {} WHERE k = $1", table(tree));
        Ok(self.client().await?.query_opt(&sql, &[&key]).await?.map(|row| row.get(0)))
    }

    /// The epoch a write into `tree` must find (`None`: the write is not fenced).
    fn fence(&self, tree: Tree, insert: bool) -> Option<i64> {
        let epoch = self.fence.epoch.load(Ordering::Relaxed);
        (epoch > 0 && tree.fenced(insert)).then_some(epoch)
    }

    /// The epoch a fenced statement found: another than `mine` means another instance leads.
    fn check_epoch(&self, found: Option<i64>, mine: i64) -> Result<(), StoreError> {
        if found == Some(mine) {
            return Ok(());
        }
        tracing::error!(mine, found, "another handoff serve leads this database now: a write of this one was refused");
        self.fence.broken.notify_one();
        Err(StoreError::Fenced)
    }

    async fn insert(&self, tree: Tree, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let t = table(tree);
        let client = self.client().await?;
        let Some(mine) = self.fence(tree, true) else {
            let sql = format!("INSERT INTO {t} (k, v) VALUES ($1, $2) ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v");
            client.execute(&sql, &[&key, &value]).await?;
            return Ok(());
        };
        // One statement: the write happens only where the epoch is this instance's.
        let sql = format!(
            "WITH e AS ({EPOCH}), w AS (INSERT INTO {t} (k, v) SELECT $1, $2 FROM e WHERE e.epoch = $3 \
             ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v RETURNING 1) SELECT (SELECT epoch FROM e)"
        );
        let row = client.query_one(&sql, &[&key, &value, &mine]).await?;
        self.check_epoch(row.get(0), mine)
    }

    async fn remove(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let t = table(tree);
        let client = self.client().await?;
        let Some(mine) = self.fence(tree, false) else {
            let sql = format!("DELETE FROM {t} WHERE k = $1 RETURNING v");
            return Ok(client.query_opt(&sql, &[&key]).await?.map(|row| row.get(0)));
        };
        let sql = format!(
            "WITH e AS ({EPOCH}), w AS (DELETE FROM {t} WHERE k = $1 AND (SELECT epoch FROM e) = $2 RETURNING v) \
             SELECT (SELECT epoch FROM e), (SELECT v FROM w)"
        );
        let row = client.query_one(&sql, &[&key, &mine]).await?;
        self.check_epoch(row.get(0), mine)?;
        Ok(row.get(1))
    }

    async fn scan(&self, tree: Tree, prefix: &[u8], values: bool) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        let what = if values { "k, v" } else { "k, ''::bytea" };
        let client = self.client().await?;
        let rows = match (prefix.is_empty(), prefix_end(prefix)) {
            (true, _) => client.query(&format!("SELECT {what} FROM {} ORDER BY k", table(tree)), &[]).await?,
            (false, Some(end)) => {
                let sql = format!("SELECT {what} FROM {} WHERE k >= $1 AND k < $2 ORDER BY k", table(tree));
                client.query(&sql, &[&prefix, &end]).await?
            }
            (false, None) => {
                let sql = format!("SELECT {what} FROM {} WHERE k >= $1 ORDER BY k", table(tree));
                client.query(&sql, &[&prefix]).await?
            }
        };
        Ok(rows.into_iter().map(|row| (row.get(0), row.get(1))).collect())
    }

    async fn len(&self, tree: Tree) -> Result<usize, StoreError> {
        let row = self.client().await?.query_one(&format!("SELECT count(*) FROM {}", table(tree)), &[]).await?;
        Ok(row.get::<_, i64>(0) as usize)
    }

    async fn compare_and_swap(
        &self,
        tree: Tree,
        key: &[u8],
        old: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<bool, StoreError> {
        let t = table(tree);
        let client = self.client().await?;
        let fence = if new.is_some() || old.is_some() { self.fence(tree, old.is_none()) } else { None };
        // Fenced, the same statement in a `w` that runs only under this instance's epoch.
        let fenced = |write: &str, guard: &str| {
            format!(
                "WITH e AS ({EPOCH}), w AS ({write} {guard} RETURNING 1) SELECT (SELECT epoch FROM e), (SELECT count(*) FROM w)"
            )
        };
        let changed = match (old, new, fence) {
            (None, Some(new), None) => {
                let sql = format!("INSERT INTO {t} (k, v) VALUES ($1, $2) ON CONFLICT (k) DO NOTHING");
                client.execute(&sql, &[&key, &new]).await?
            }
            (Some(old), Some(new), None) => {
                let sql = format!("UPDATE {t} SET v = $3 WHERE k = $1 AND v = $2");
                client.execute(&sql, &[&key, &old, &new]).await?
            }
            (Some(old), None, None) => {
                client.execute(&format!("DELETE FROM {t} WHERE k = $1 AND v = $2"), &[&key, &old]).await?
            }
            (None, Some(new), Some(mine)) => {
                let write = format!("INSERT INTO {t} (k, v) SELECT $1, $2 FROM e WHERE e.epoch = $3");
                let row = client.query_one(&fenced(&write, "ON CONFLICT (k) DO NOTHING"), &[&key, &new, &mine]).await?;
                self.check_epoch(row.get(0), mine)?;
                row.get::<_, i64>(1) as u64
            }
            (Some(old), Some(new), Some(mine)) => {
                let write = format!("UPDATE {t} SET v = $3 WHERE k = $1 AND v = $2");
                let row = client
                    .query_one(&fenced(&write, "AND (SELECT epoch FROM e) = $4"), &[&key, &old, &new, &mine])
                    .await?;
                self.check_epoch(row.get(0), mine)?;
                row.get::<_, i64>(1) as u64
            }
            (Some(old), None, Some(mine)) => {
                let write = format!("DELETE FROM {t} WHERE k = $1 AND v = $2");
                let row =
                    client.query_one(&fenced(&write, "AND (SELECT epoch FROM e) = $3"), &[&key, &old, &mine]).await?;
                self.check_epoch(row.get(0), mine)?;
                row.get::<_, i64>(1) as u64
            }
            (None, None, _) => {
                let sql = format!("SELECT 1 FROM {t} WHERE k = $1");
                u64::from(client.query_opt(&sql, &[&key]).await?.is_none())
            }
        };
        Ok(changed == 1)
    }

    async fn apply(&self, unless: Option<(Tree, &[u8])>, writes: &[Write]) -> Result<bool, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // Fenced if any write is: the epoch row's share lock is held to the commit.
        let fence = writes.iter().find_map(|w| match w {
            Write::Insert(tree, ..) => self.fence(*tree, true),
            Write::Remove(tree, _) => self.fence(*tree, false),
        });
        if let Some(mine) = fence {
            let found = tx.query_opt(EPOCH, &[]).await?.map(|row| row.get(0));
            self.check_epoch(found, mine)?;
        }
        let mut claimed = None;
        if let Some((tree, key)) = unless {
            // The key the writes claim (a transaction ID): inserted first, so of two instances
            // taking the same one, only one goes on (the other's insert waits, then finds it).
            let claim = writes.iter().position(|w| matches!(w, Write::Insert(t, k, _) if *t == tree && k == key));
            let fresh = match claim.map(|i| &writes[i]) {
                Some(Write::Insert(_, k, v)) => {
                    let sql = format!("INSERT INTO {} (k, v) VALUES ($1, $2) ON CONFLICT (k) DO NOTHING", table(tree));
                    tx.execute(&sql, &[k, v]).await? == 1
                }
                _ => {
                    let sql = format!("SELECT 1 FROM {} WHERE k = $1 FOR UPDATE", table(tree));
                    tx.query_opt(&sql, &[&key]).await?.is_none()
                }
            };
            if !fresh {
                return Ok(false);
            }
            claimed = claim;
        }
        for (i, write) in writes.iter().enumerate() {
            if Some(i) == claimed {
                continue;
            }
            match write {
                Write::Insert(tree, k, v) => {
                    let sql = format!(
                        "INSERT INTO {} (k, v) VALUES ($1, $2) ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v",
                        table(*tree)
                    );
                    tx.execute(&sql, &[k, v]).await?;
                }
                Write::Remove(tree, k) => {
                    tx.execute(&format!("DELETE FROM {} WHERE k = $1", table(*tree)), &[k]).await?;
                }
            }
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn generate_id(&self) -> Result<u64, StoreError> {
        let row = self.client().await?.query_one("SELECT nextval('handoff_ids')", &[]).await?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    /// The sequence gives `next` or more from now on (never less than it would have).
    async fn ids_from(&self, next: u64) -> Result<(), StoreError> {
        let sql = "SELECT setval('handoff_ids', GREATEST($1, (SELECT last_value FROM handoff_ids)))";
        self.client().await?.execute(sql, &[&(next as i64)]).await?;
        Ok(())
    }

    async fn size(&self) -> Result<u64, StoreError> {
        let row = self.client().await?.query_one("SELECT pg_database_size(current_database())", &[]).await?;
        Ok(row.get::<_, i64>(0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn a_prefix_ends_after_its_last_byte_below_0xff() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[1, 0xff, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
    }
}
