//! The store: accounts and the refresh log in SQLite. One worker thread owns the connection;
//! async callers send it jobs. Refresh outcomes that arrive together are committed in one
//! transaction (group commit), so durability costs one fsync per batch. Rotated tokens whose
//! commit fails go to a recovery file beside the database and are retried; `open` replays
//! that file before anything is claimed.

mod check;
pub mod copy;
mod deferred;
mod error;
pub mod instance;
mod liveness;
pub mod postgres;
mod recovery;
mod rules;
mod schema;
pub mod sqlite;
mod types;

pub use error::{IMPORT_ABORTED, Refusal, StoreError};
pub(crate) use rules::{CONNECT_REMEMBER, StateRow, check_mark_due, check_upsert, seal_verifier};
pub(crate) use types::Reply;
pub use types::{
    AccountSummary, Gauges, ListFilter, LogEntry, NewAccount, Outcome, PendingConnect, PgOptions,
    Recorded, RekeyBatch, RekeyReport, StateProblem, StoreOptions, SweepReport,
};

use crate::crypto::Keyring;
use crate::model::{Account, Status};
use rusqlite::{Connection, OpenFlags, TransactionBehavior};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;
use tokio::sync::oneshot;

pub use recovery::{FAULT_ENV as RECOVERY_FAULT_ENV, owner_recovery_path, recovery_path};

pub use check::report as check_report;

/// Recovery files beside `db` that hold rotations not committed yet (any owner).
pub fn pending_recovery_files(db: &Path) -> Vec<PathBuf> {
    recovery::pending_files(db)
}

type Call = Box<dyn FnOnce(&mut Connection) + Send>;

enum Job {
    Call(Call),
    Record(Outcome, oneshot::Sender<Result<Recorded, StoreError>>),
    Close(oneshot::Sender<()>),
}

/// Async handle to the store. Cheap to clone; all clones share one worker (SQLite: a
/// thread owning the connection; PostgreSQL: a pool and a group-commit task).
#[derive(Clone)]
pub struct Store {
    backend: Backend,
    keys: Keyring,
    /// Rotations waiting for the database, and whether refreshes may be sent.
    health: Arc<deferred::Health>,
    /// This process's lease owner, the name of its instance and recovery files.
    owner: Arc<str>,
}

pub(crate) type DeferredIds = Arc<deferred::Health>;

#[derive(Clone)]
enum Backend {
    Sqlite {
        tx: std_mpsc::Sender<Job>,
        path: PathBuf,
    },
    Postgres(Arc<postgres::PgStore>),
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.describe())
    }
}

/// Creates the database file with mode 0600 if it does not exist yet, so no other user can
/// read tokens even for an instant. SQLite gives the WAL and SHM files the same mode.
fn create_private(path: &Path) -> Result<(), StoreError> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    match opts.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(StoreError::Create {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Refuses to start when a stored token is sealed with a key that is not configured: every
/// refresh would fail to read its token, and the accounts would look broken for no reason.
fn check_keys(conn: &Connection, path: &Path, keys: &Keyring) -> Result<(), StoreError> {
    for key_id in sqlite::sealing_key_ids(conn)? {
        if !keys.knows(&key_id) {
            return Err(StoreError::MissingKey {
                path: path.to_path_buf(),
                key_id,
                configured: keys.describe(),
            });
        }
    }
    Ok(())
}

/// Opens a connection with the durability settings every process sharing the file uses.
pub(crate) fn connect(opts: &StoreOptions) -> Result<Connection, StoreError> {
    let open_err = |source| StoreError::Open {
        path: opts.path.clone(),
        source,
    };
    if let Some(parent) = opts.path.parent().filter(|p| !p.as_os_str().is_empty())
        && !parent.is_dir()
    {
        return Err(StoreError::Create {
            path: opts.path.clone(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "directory {} does not exist (set store.path)",
                    parent.display()
                ),
            ),
        });
    }
    create_private(&opts.path)?;
    let conn = Connection::open_with_flags(
        &opts.path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(open_err)?;
    conn.busy_timeout(opts.busy_timeout).map_err(open_err)?;
    // Several processes opening a brand-new file at once: converting it to WAL needs an
    // exclusive lock, and SQLite answers BUSY at once (no busy handler: it would deadlock)
    // to all but one. Try again until busy_timeout, as the busy handler would.
    let deadline = std::time::Instant::now() + opts.busy_timeout;
    let mode: String = loop {
        match conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0)) {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            result => break result.map_err(open_err)?,
        }
    };
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::NotWal {
            path: opts.path.clone(),
            mode,
        });
    }
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(open_err)?;
    // Overwrites deleted and moved content with zeros, so a token replaced by a rotation
    // (or by its sealed form, during rekey) does not linger in free space of the file.
    conn.pragma_update(None, "secure_delete", "ON")
        .map_err(open_err)?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

impl Store {
    /// Opens (creating if needed) the database, applies migrations, checks it
    /// (`quick_check`), takes the instance lock, replays the recovery files of dead
    /// processes, and starts the worker thread.
    pub async fn open(opts: StoreOptions) -> Result<Store, StoreError> {
        Self::start(opts, false).await
    }

    /// Opens an existing database for reading only (`accounts list/show`, `check`): no
    /// migration, no replay of the recovery file, which belongs to the daemon.
    pub async fn open_read_only(opts: StoreOptions) -> Result<Store, StoreError> {
        Self::start(opts, true).await
    }

    async fn start(opts: StoreOptions, read_only: bool) -> Result<Store, StoreError> {
        let mut owner: Arc<str> = instance::new_owner().into();
        if let Some(pg) = &opts.postgres {
            if !read_only {
                // The marker says this owner holds a liveness lock others may judge it by.
                owner = liveness::new_owner(&owner).into();
            }
            let health = DeferredIds::default();
            let store = postgres::PgStore::open(
                &pg.url,
                pg.pool_size,
                opts.keyring.clone(),
                &opts.path,
                &owner,
                read_only,
                health.clone(),
            )
            .await?;
            return Ok(Store {
                backend: Backend::Postgres(Arc::new(store)),
                keys: opts.keyring,
                health,
                owner,
            });
        }
        let (tx, rx) = std_mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = oneshot::channel();
        let path = opts.path.clone();
        let keys = opts.keyring.clone();
        let health = DeferredIds::default();
        let worker_health = health.clone();
        let worker_owner = owner.clone();
        std::thread::Builder::new()
            .name("refreshd-store".into())
            .spawn(move || {
                let prepared = if read_only {
                    Self::prepare_read_only(&opts).map(|c| (c, None))
                } else {
                    Self::prepare(&opts, &worker_owner, &worker_health).map(|(c, i)| (c, Some(i)))
                };
                let (mut conn, instance) = match prepared {
                    Ok(c) => {
                        let _ = ready_tx.send(Ok(()));
                        c
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                Worker::new(&opts, &worker_owner, instance, worker_health).run(&mut conn, rx);
            })
            .map_err(|e| StoreError::Create {
                path: path.clone(),
                source: e,
            })?;
        ready_rx.await.map_err(|_| StoreError::Closed)??;
        Ok(Store {
            backend: Backend::Sqlite { tx, path },
            keys,
            health,
            owner,
        })
    }

    fn prepare(
        opts: &StoreOptions,
        owner: &str,
        health: &deferred::Health,
    ) -> Result<(Connection, instance::Instance), StoreError> {
        let mut conn = connect(opts)?;
        // A damaged file is refused before anything (a migration included) writes to it.
        let problems = check::quick(&conn).map_err(|e| StoreError::Damaged {
            path: opts.path.clone(),
            problems: e.to_string(),
        })?;
        if !problems.is_empty() {
            return Err(StoreError::Damaged {
                path: opts.path.clone(),
                problems: problems.join("; "),
            });
        }
        schema::migrate(&mut conn).map_err(|(version, source)| StoreError::Migration {
            path: opts.path.clone(),
            version,
            source,
        })?;
        check_keys(&conn, &opts.path, &opts.keyring)?;
        let lock = instance::StoreLock::acquire(&opts.path)?;
        let me = instance::Instance::acquire(&opts.path, owner, &lock)?;
        // Others' `watch` skips rounds while the store lock is held, so keep it short:
        // try with the commit wait first, and only a second time with the full busy_timeout
        // (a failure here still stops the start, as before).
        let open_err = |source| StoreError::Open {
            path: opts.path.clone(),
            source,
        };
        conn.busy_timeout(COMMIT_WAIT).map_err(open_err)?;
        let quick = adopt_dead(&mut conn, &opts.keyring, &opts.path, owner, health, &lock);
        conn.busy_timeout(opts.busy_timeout).map_err(open_err)?;
        if quick.is_err() {
            adopt_dead(&mut conn, &opts.keyring, &opts.path, owner, health, &lock)?;
        }
        Ok((conn, me))
    }

    fn prepare_read_only(opts: &StoreOptions) -> Result<Connection, StoreError> {
        let open_err = |source| StoreError::Open {
            path: opts.path.clone(),
            source,
        };
        let conn = Connection::open_with_flags(
            &opts.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(open_err)?;
        conn.busy_timeout(opts.busy_timeout).map_err(open_err)?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(open_err)?;
        if version != schema::MIGRATIONS.len() as i64 {
            return Err(Refusal::SchemaBehind {
                store: opts.path.display().to_string(),
                version,
                current: schema::MIGRATIONS.len(),
            }
            .into());
        }
        check_keys(&conn, &opts.path, &opts.keyring)?;
        Ok(conn)
    }

    /// The SQLite file, or None on PostgreSQL.
    pub fn path(&self) -> Option<&Path> {
        match &self.backend {
            Backend::Sqlite { path, .. } => Some(path),
            Backend::Postgres(_) => None,
        }
    }

    /// Where the store is, for logs: the file, or the PostgreSQL URL without its password.
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Sqlite { path, .. } => path.display().to_string(),
            Backend::Postgres(pg) => pg.describe().to_string(),
        }
    }

    /// This process's lease owner (its instance and recovery files are named after it).
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// This process's own recovery file, for the SQLite file or (PostgreSQL) `store.path`.
    pub fn own_recovery_path(&self, db: &Path) -> PathBuf {
        owner_recovery_path(db, &self.owner)
    }

    /// Whether a new refresh may be sent now: rotated tokens have somewhere durable to go
    /// (the database, or reserved room in the recovery file), nothing is held in memory
    /// only, and at most `max_waiting` answers wait for their commit (backpressure).
    pub fn may_refresh(&self, max_waiting: usize) -> bool {
        self.health.may_refresh(max_waiting)
    }

    /// Why the store cannot be used any more (its file vanished or was replaced).
    pub fn lost(&self) -> Option<String> {
        self.health.lost()
    }

    /// Accounts whose rotated tokens are in memory only: neither the database nor the
    /// recovery file took them (after `close`: to be handed to the operator).
    pub fn volatile_rotations(&self) -> Vec<i64> {
        self.health.volatile_ids()
    }

    /// Writes the rotations held in memory only to a new 0600 file in `dir` (same format
    /// as a recovery file, sealed as in the database) and fsyncs it and `dir`.
    pub fn hand_off(&self, dir: &Path) -> std::io::Result<PathBuf> {
        let volatile = self.health.volatile.lock().expect("not poisoned").clone();
        let path = dir.join(format!("refreshd-handoff.{}.recovery", self.owner));
        recovery::append(&path, &self.keys, &volatile)?;
        Ok(path)
    }

    /// The rotations held in memory only, as recovery-file lines (for stdout, when asked).
    pub fn hand_off_lines(&self) -> std::io::Result<Vec<u8>> {
        let volatile = self.health.volatile.lock().expect("not poisoned").clone();
        recovery::encode(&self.keys, &volatile)
    }

    /// Accounts whose rotated tokens are still only in the recovery file (after `close`:
    /// the next start must replay that file; it must not be deleted).
    pub fn pending_rotations(&self) -> Vec<i64> {
        let mut ids: Vec<i64> = self
            .health
            .ids
            .lock()
            .expect("not poisoned")
            .iter()
            .copied()
            .collect();
        ids.sort_unstable();
        ids
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    fn pg(&self) -> Option<&postgres::PgStore> {
        match &self.backend {
            Backend::Postgres(pg) => Some(pg),
            Backend::Sqlite { .. } => None,
        }
    }

    /// The keys this store seals and opens tokens with (for queries run through `in_tx`).
    pub fn keyring(&self) -> &Keyring {
        &self.keys
    }

    /// Runs `f` on the SQLite worker thread with the connection (SQLite only).
    pub async fn call<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<R, StoreError> + Send + 'static,
    {
        let Backend::Sqlite { tx: jobs, .. } = &self.backend else {
            return Err(StoreError::SqliteOnly {
                what: "a raw SQLite query",
                store: self.describe(),
            });
        };
        let (tx, rx) = oneshot::channel();
        jobs.send(Job::Call(Box::new(move |c| {
            let _ = tx.send(f(c));
        })))
        .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Writes one outcome; outcomes sent while a commit is running share the next commit.
    pub async fn record(&self, outcome: Outcome) -> Result<Recorded, StoreError> {
        let jobs = match &self.backend {
            Backend::Sqlite { tx, .. } => tx,
            Backend::Postgres(pg) => {
                let _waiting = Waiting::new(&self.health);
                return pg.record(outcome).await;
            }
        };
        let (tx, rx) = oneshot::channel();
        let _waiting = Waiting::new(&self.health);
        jobs.send(Job::Record(outcome, tx))
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Finishes queued work (including retrying deferred commits once) and stops the worker.
    pub async fn close(&self) {
        let jobs = match &self.backend {
            Backend::Sqlite { tx, .. } => tx,
            Backend::Postgres(pg) => return pg.close().await,
        };
        let (tx, rx) = oneshot::channel();
        if jobs.send(Job::Close(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    pub async fn claim_due(
        &self,
        owner: &str,
        now: i64,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<Account>, StoreError> {
        self.claim_due_except(owner, now, lease, limit, Vec::new())
            .await
    }

    pub async fn next_due(&self, now: i64) -> Result<Option<i64>, StoreError> {
        self.next_due_except(now, Vec::new()).await
    }

    /// `claim_due` without the accounts of the `skip` providers.
    pub async fn claim_due_except(
        &self,
        owner: &str,
        now: i64,
        lease: Duration,
        limit: usize,
        skip: Vec<String>,
    ) -> Result<Vec<Account>, StoreError> {
        if let Some(message) = self.lost() {
            return Err(StoreError::Lost {
                path: PathBuf::from(self.describe()),
                message,
            });
        }
        if self
            .health
            .liveness_lost
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Err(StoreError::PgPool {
                context: "claim due accounts",
                message: "this replica's liveness lock is lost (its connection dropped); not claiming until it is re-acquired".into(),
            });
        }
        self.health
            .claim_now
            .store(now, std::sync::atomic::Ordering::Relaxed);
        let owner = owner.to_string();
        let until = now + lease.as_secs() as i64;
        let exclude: Vec<i64> = self
            .health
            .ids
            .lock()
            .expect("not poisoned")
            .iter()
            .copied()
            .collect();
        // Leases of processes found dead end now: taken over like expired ones, so the
        // claim records the crash window (`refresh_interrupted`).
        let dead = std::mem::take(&mut *self.health.dead_owners.lock().expect("not poisoned"));
        if let Some(pg) = self.pg() {
            pg.expire_leases_of(&dead, now).await?;
            return pg
                .claim_due_except(&owner, now, until, limit, &skip, &exclude)
                .await;
        }
        let keys = self.keys.clone();
        self.call(move |c| {
            sqlite::expire_leases_of(c, &dead, now)?;
            sqlite::claim_due_except(c, &keys, &owner, now, until, limit, &skip, &exclude)
        })
        .await
    }

    /// `next_due` without the accounts of the `skip` providers.
    pub async fn next_due_except(
        &self,
        now: i64,
        skip: Vec<String>,
    ) -> Result<Option<i64>, StoreError> {
        if let Some(pg) = self.pg() {
            return pg.next_due_except(now, &skip).await;
        }
        self.call(move |c| sqlite::next_due_except(c, now, &skip))
            .await
    }

    pub async fn get(&self, id: i64) -> Result<Option<Account>, StoreError> {
        if let Some(pg) = self.pg() {
            return pg.get(id).await;
        }
        let keys = self.keys.clone();
        self.call(move |c| sqlite::get(c, &keys, id)).await
    }

    pub async fn find(&self, provider: &str, subject: &str) -> Result<Option<Account>, StoreError> {
        if let Some(pg) = self.pg() {
            return pg.find(provider, subject).await;
        }
        let (p, s) = (provider.to_string(), subject.to_string());
        let keys = self.keys.clone();
        self.call(move |c| sqlite::find(c, &keys, &p, &s)).await
    }

    pub async fn list(
        &self,
        filter: ListFilter,
        after_id: i64,
        page: usize,
    ) -> Result<Vec<AccountSummary>, StoreError> {
        if let Some(pg) = self.pg() {
            return pg.list(&filter, after_id, page).await;
        }
        self.call(move |c| sqlite::list(c, &filter, after_id, page))
            .await
    }

    pub async fn log_entries(&self, id: i64, limit: usize) -> Result<Vec<LogEntry>, StoreError> {
        if let Some(pg) = self.pg() {
            return pg.log_entries(id, limit).await;
        }
        self.call(move |c| sqlite::log_entries(c, id, limit)).await
    }

    pub async fn counts(&self) -> Result<Vec<(String, Status, i64)>, StoreError> {
        if let Some(pg) = self.pg() {
            return pg.counts().await;
        }
        self.call(|c| sqlite::counts(c)).await
    }

    /// True when the database answers and carries every migration this build knows.
    pub async fn schema_current(&self) -> Result<bool, StoreError> {
        if let Some(pg) = self.pg() {
            return pg.schema_current().await;
        }
        self.call(|c| {
            let v: i64 = c
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .map_err(|source| StoreError::Sqlite {
                    context: "read the schema version",
                    source,
                })?;
            Ok(v as usize == schema::MIGRATIONS.len())
        })
        .await
    }

    /// What the metrics report about the accounts, read in one go.
    pub async fn gauges(&self, now: i64) -> Result<Gauges, StoreError> {
        if let Some(pg) = self.pg() {
            return pg.gauges(now).await;
        }
        self.call(move |c| sqlite::gauges(c, now)).await
    }

    /// Inserts or updates all accounts in one transaction: all or nothing.
    pub async fn upsert(
        &self,
        accounts: Vec<NewAccount>,
        now: i64,
    ) -> Result<Vec<(i64, bool)>, StoreError> {
        if let Some(pg) = self.pg() {
            return pg.upsert(&accounts, now).await;
        }
        let keys = self.keys.clone();
        self.in_tx("import accounts", move |tx| {
            sqlite::upsert(tx, &keys, &accounts, now)
        })
        .await
    }

    /// Upserts batches as they arrive on `batches`, all in one transaction: `Some(batch)`
    /// is written (then handed to `per_batch` with its ids), `None` commits. A channel
    /// closed before `None` rolls everything back, so the sender aborts by dropping it:
    /// a large import streams through without a half-applied end.
    pub async fn upsert_stream<F>(
        &self,
        batches: tokio::sync::mpsc::Receiver<Option<Vec<NewAccount>>>,
        now: i64,
        per_batch: F,
    ) -> Result<(), StoreError>
    where
        F: FnMut(&[NewAccount], &[(i64, bool)]) + Send + 'static,
    {
        if let Some(pg) = self.pg() {
            return pg.upsert_stream(batches, now, per_batch).await;
        }
        let keys = self.keys.clone();
        let (mut batches, mut per_batch) = (batches, per_batch);
        self.in_tx("import accounts", move |tx| {
            while let Some(item) = batches.blocking_recv() {
                let Some(batch) = item else { return Ok(()) };
                let ids = sqlite::upsert(tx, &keys, &batch, now)?;
                per_batch(&batch, &ids);
            }
            Err(Refusal::ImportAborted.into())
        })
        .await
    }

    /// Stores a connected account in one transaction. With `expect_id`, the account with
    /// that id must be this provider and subject: else nothing is written and the stored
    /// (id, provider, subject) comes back as the inner error. Ok gives the upsert's result
    /// and the account's status before.
    #[allow(clippy::type_complexity)]
    pub async fn store_connected(
        &self,
        row: NewAccount,
        expect_id: Option<i64>,
        now: i64,
    ) -> Result<Result<(Vec<(i64, bool)>, Option<Status>), (i64, String, String)>, StoreError> {
        if let Some(pg) = self.pg() {
            return pg.store_connected(&row, expect_id, now).await;
        }
        let keys = self.keys.clone();
        self.in_tx("store a connected account", move |tx| {
            if let Some(id) = expect_id {
                let existing = sqlite::get(tx, &keys, id)?.ok_or(StoreError::NotFound(id))?;
                if existing.provider != row.provider || existing.subject != row.subject {
                    return Ok(Err((id, existing.provider, existing.subject)));
                }
            }
            let previous = sqlite::find(tx, &keys, &row.provider, &row.subject)?.map(|a| a.status);
            Ok(Ok((
                sqlite::upsert(tx, &keys, std::slice::from_ref(&row), now)?,
                previous,
            )))
        })
        .await
    }

    pub async fn sweep(&self, now: i64, window: Duration) -> Result<SweepReport, StoreError> {
        let end = now + window.as_secs() as i64;
        if let Some(pg) = self.pg() {
            return pg.sweep(now, end).await;
        }
        self.in_tx("reauth sweep", move |tx| sqlite::sweep(tx, now, end))
            .await
    }

    pub async fn flagged_ids(&self) -> Result<Vec<(i64, Status)>, StoreError> {
        if let Some(pg) = self.pg() {
            return pg.flagged_ids().await;
        }
        self.call(|c| sqlite::flagged_ids(c)).await
    }

    pub async fn prune_log(&self, before: i64) -> Result<usize, StoreError> {
        if let Some(pg) = self.pg() {
            return pg.prune_log(before).await;
        }
        self.call(move |c| sqlite::prune_log(c, before)).await
    }

    pub async fn mark_due(&self, id: i64, now: i64, force: bool) -> Result<Status, StoreError> {
        if let Some(pg) = self.pg() {
            return pg.mark_due(id, now, force).await;
        }
        self.in_tx("mark account due", move |tx| {
            sqlite::mark_due(tx, id, now, force)
        })
        .await
    }

    pub async fn remove(&self, id: i64) -> Result<(), StoreError> {
        if let Some(pg) = self.pg() {
            return pg.remove(id).await;
        }
        self.in_tx("remove account", move |tx| sqlite::remove(tx, id))
            .await
    }

    /// Accounts whose tokens are not sealed under the primary key yet (0 without one).
    pub async fn count_to_rekey(&self) -> Result<u64, StoreError> {
        let Some(id) = self.keys.primary_id().map(str::to_string) else {
            return Ok(0);
        };
        if let Some(pg) = self.pg() {
            return pg.count_to_rekey(&id).await;
        }
        self.call(move |c| sqlite::count_to_rekey(c, &id)).await
    }

    /// Remembers a web connect under `key` (the SHA-256 of its state, hex) until its callback.
    /// False when `max_open` are already in progress (a flood of starts cannot fill the
    /// database). Forgets states that ended long ago.
    pub async fn connect_state_put(
        &self,
        key: &str,
        pending: PendingConnect,
        now: i64,
        max_open: usize,
    ) -> Result<bool, StoreError> {
        if let Some(pg) = self.pg() {
            return pg.connect_state_put(key, &pending, now, max_open).await;
        }
        let key = key.to_string();
        let verifier = seal_verifier(&self.keys, &pending);
        self.in_tx("remember a web connect", move |tx| {
            sqlite::connect_state_put(tx, &key, &pending, verifier, now, max_open)
        })
        .await
    }

    /// Takes a web connect's state for its one use, whichever replica stored it.
    pub async fn connect_state_take(
        &self,
        key: &str,
        provider: &str,
        now: i64,
    ) -> Result<Result<PendingConnect, StateProblem>, StoreError> {
        if let Some(pg) = self.pg() {
            return pg.connect_state_take(key, provider, now).await;
        }
        let (key, provider) = (key.to_string(), provider.to_string());
        let keys = self.keys.clone();
        self.in_tx("take a web connect's state", move |tx| {
            sqlite::connect_state_take(tx, &keys, &key, &provider, now)
        })
        .await
    }

    /// Re-seals one batch under the primary key; see `sqlite::rekey_batch`.
    pub async fn rekey_batch(&self, after_id: i64, limit: usize) -> Result<RekeyBatch, StoreError> {
        if let Some(pg) = self.pg() {
            return pg.rekey_batch(after_id, limit).await;
        }
        let keys = self.keys.clone();
        self.in_tx("re-seal tokens", move |tx| {
            sqlite::rekey_batch(tx, &keys, after_id, limit)
        })
        .await
    }

    /// One integer (or NULL) from a raw query whose `?1` is `id`, on either backend.
    #[cfg(test)]
    pub(crate) async fn test_query_i64(
        &self,
        sql: &'static str,
        id: i64,
    ) -> Result<Option<i64>, StoreError> {
        if let Some(pg) = self.pg() {
            let c = pg.client().await?;
            let row = c
                .query_one(&sql.replace("?1", "$1::bigint"), &[&id])
                .await
                .map_err(postgres::pg_err("test query"))?;
            return Ok(row.get(0));
        }
        self.call(move |c| {
            c.query_row(sql, [id], |r| r.get(0))
                .map_err(|source| StoreError::Sqlite {
                    context: "test query",
                    source,
                })
        })
        .await
    }

    #[cfg(test)]
    pub(crate) async fn test_lease(
        &self,
        id: i64,
    ) -> Result<(Option<String>, Option<i64>), StoreError> {
        if let Some(pg) = self.pg() {
            let c = pg.client().await?;
            let row = c
                .query_one(
                    "SELECT lease_owner, lease_expires_at FROM accounts WHERE id = $1",
                    &[&id],
                )
                .await
                .map_err(postgres::pg_err("test query"))?;
            return Ok((row.get(0), row.get(1)));
        }
        self.call(move |c| {
            c.query_row(
                "SELECT lease_owner, lease_expires_at FROM accounts WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(|source| StoreError::Sqlite {
                context: "test query",
                source,
            })
        })
        .await
    }

    /// Runs `f` in one IMMEDIATE transaction on the worker thread; commits when it returns Ok.
    pub async fn in_tx<R, F>(&self, context: &'static str, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&rusqlite::Transaction<'_>) -> Result<R, StoreError> + Send + 'static,
    {
        self.call(move |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(|source| StoreError::Sqlite { context, source })?;
            let r = f(&tx)?;
            tx.commit()
                .map_err(|source| StoreError::Sqlite { context, source })?;
            Ok(r)
        })
        .await
    }
}

/// Re-seals every account's tokens under the primary key, `batch` accounts per transaction
/// (the write lock is never held for long, so a running daemon keeps working). Resumable:
/// rows already under the primary key are skipped by the query, so an interrupted run just
/// starts again. `progress` gets the number of accounts re-sealed by each batch.
pub async fn rekey(
    store: &Store,
    batch: usize,
    mut progress: impl FnMut(u64),
) -> Result<RekeyReport, StoreError> {
    let mut report = RekeyReport::default();
    // Rows rewritten under an older key by a concurrent writer fall behind the cursor: a
    // few more passes catch them; what remains after that is reported, never looped on.
    for _pass in 0..3 {
        let mut after = 0;
        while let Some(last) = {
            let b = store.rekey_batch(after, batch.max(1)).await?;
            report.resealed += b.resealed as u64;
            progress(b.resealed as u64);
            b.last_id
        } {
            after = last;
        }
        report.remaining = store.count_to_rekey().await?;
        if report.remaining == 0 {
            break;
        }
    }
    // The WAL still holds page images with the values just replaced: fold it into the
    // database (whose free space secure_delete zeroes) and truncate it. A running daemon's
    // reads can keep it from truncating; SQLite deletes it when the last connection closes.
    if store.is_postgres() {
        return Ok(report);
    }
    store
        .call(|c| {
            c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                .map_err(|source| StoreError::Sqlite {
                    context: "checkpoint the WAL after rekey",
                    source,
                })
        })
        .await?;
    Ok(report)
}

/// Counts one outcome as waiting for durability while it lives.
struct Waiting<'a>(&'a deferred::Health);

impl<'a> Waiting<'a> {
    fn new(h: &'a deferred::Health) -> Self {
        h.waiting.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Waiting(h)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0
            .waiting
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Takes over what dead processes left (store lock held): commits their recovery files
/// (and an old single `<db>.recovery`), then hands their owners to the next claim, which
/// ends their leases, and forgets their instance files.
fn adopt_dead(
    conn: &mut Connection,
    keys: &Keyring,
    db: &Path,
    own: &str,
    health: &deferred::Health,
    lock: &instance::StoreLock,
) -> Result<(), StoreError> {
    let dead = instance::dead_owners(db, own, lock);
    recovery::replay_orphans(conn, keys, db, own)?;
    for owner in &dead {
        tracing::warn!(event = "dead_owner_taken_over", owner = %owner, store = %db.display(),
            "a process that used this store died; its leases are taken over now and its accounts refreshed again (flagged refresh_interrupted where an answer may have been lost)");
        instance::forget(db, owner, lock);
    }
    health
        .dead_owners
        .lock()
        .expect("not poisoned")
        .extend(dead);
    Ok(())
}

/// (device, inode) of a file, to notice it being deleted or replaced under us.
pub(crate) fn identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Compares the store file with the one opened; the message says what changed.
pub(crate) fn vanished(path: &Path, opened: Option<(u64, u64)>) -> Option<String> {
    let opened = opened?;
    match identity(path) {
        None => Some("the database file was deleted while in use".into()),
        Some(now) if now != opened => {
            Some("the database file was replaced by another file while in use".into())
        }
        Some(_) => None,
    }
}

/// Most outcomes written by one commit.
const MAX_GROUP: usize = 1024;
/// How often `close` tries to commit deferred rotations, `CLOSE_RETRY_EVERY` apart, before
/// leaving them to the recovery file (a short blip at shutdown loses nothing either way).
pub(crate) const CLOSE_RETRIES: usize = 5;
pub(crate) const CLOSE_RETRY_EVERY: Duration = Duration::from_millis(200);
/// How often deferred (recovery-file) commits are retried when the worker is idle.
const RETRY_EVERY: Duration = Duration::from_secs(2);
/// While commits are deferred, a job first retries them, at most this often.
const RETRY_BEFORE_JOB: Duration = Duration::from_millis(250);
/// How often the worker checks the database file is still the one it opened and looks
/// for dead processes' leases and recovery files.
pub const WATCH_EVERY: Duration = Duration::from_secs(1);
/// How long a commit of outcomes waits for another process's write lock before its
/// rotations go to the recovery file: answers are not held in memory for busy_timeout.
const COMMIT_WAIT: Duration = Duration::from_millis(100);

struct Worker {
    db: PathBuf,
    owner: String,
    keys: Keyring,
    busy_timeout: Duration,
    deferrals: deferred::Deferrals,
    instance: Option<instance::Instance>,
    /// (device, inode) of the database when opened.
    identity: Option<(u64, u64)>,
    last_retry: std::time::Instant,
    last_watch: std::time::Instant,
}

impl Worker {
    fn new(
        opts: &StoreOptions,
        owner: &str,
        instance: Option<instance::Instance>,
        health: DeferredIds,
    ) -> Self {
        let log = if instance.is_some() {
            recovery::RecoveryLog::open(owner_recovery_path(&opts.path, owner))
        } else {
            recovery::RecoveryLog::unopened(owner_recovery_path(&opts.path, owner))
        };
        Worker {
            db: opts.path.clone(),
            owner: owner.to_string(),
            keys: opts.keyring.clone(),
            busy_timeout: opts.busy_timeout,
            deferrals: deferred::Deferrals::new(log, opts.keyring.clone(), health),
            identity: instance.as_ref().and_then(|_| identity(&opts.path)),
            instance,
            last_retry: std::time::Instant::now(),
            last_watch: std::time::Instant::now(),
        }
    }

    fn run(mut self, conn: &mut Connection, rx: std_mpsc::Receiver<Job>) {
        let mut stash: Vec<Job> = Vec::new();
        loop {
            if self.instance.is_some() && self.last_watch.elapsed() >= WATCH_EVERY {
                self.watch(conn);
            }
            let job = if let Some(j) = stash.pop() {
                j
            } else {
                let wait = if self.instance.is_none() {
                    Duration::from_secs(3600)
                } else if self.deferrals.is_empty() {
                    WATCH_EVERY
                } else {
                    RETRY_EVERY.min(WATCH_EVERY)
                };
                match rx.recv_timeout(wait) {
                    Ok(j) => j,
                    Err(std_mpsc::RecvTimeoutError::Timeout) => {
                        if self.last_retry.elapsed() >= RETRY_EVERY {
                            self.retry_deferred(conn);
                        }
                        continue;
                    }
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
                }
            };
            // Deferred rotations go first: nothing else should see the rows they update.
            if !self.deferrals.is_empty()
                && (matches!(job, Job::Call(_)) || self.last_retry.elapsed() >= RETRY_BEFORE_JOB)
            {
                self.retry_deferred(conn);
            }
            match job {
                Job::Call(f) => f(conn),
                Job::Close(done) => {
                    // A few more tries: what is still deferred after them waits for the
                    // next start in the recovery file.
                    for _ in 0..CLOSE_RETRIES {
                        self.retry_deferred(conn);
                        if self.deferrals.is_empty() {
                            break;
                        }
                        std::thread::sleep(CLOSE_RETRY_EVERY);
                    }
                    self.finish();
                    let _ = done.send(());
                    return;
                }
                Job::Record(o, reply) => {
                    let mut batch = vec![(o, reply)];
                    // Group commit: take every outcome already waiting; keep other jobs, in
                    // order, for after the commit.
                    let mut later = Vec::new();
                    while batch.len() < MAX_GROUP {
                        match rx.try_recv() {
                            Ok(Job::Record(o, r)) => batch.push((o, r)),
                            Ok(other) => later.push(other),
                            Err(_) => break,
                        }
                    }
                    self.commit_group(conn, batch);
                    // `stash` is popped from the end.
                    later.reverse();
                    stash.extend(later);
                }
            }
        }
        self.retry_deferred(conn);
        self.finish();
    }

    /// A stop: the own recovery file goes when empty, the instance lock with its file.
    fn finish(&mut self) {
        let Some(me) = self.instance.take() else {
            return;
        };
        let log = std::mem::replace(
            &mut self.deferrals.log,
            recovery::RecoveryLog::unopened(owner_recovery_path(&self.db, &self.owner)),
        );
        if self.deferrals.is_empty() {
            log.remove();
        }
        if let Ok(lock) = instance::StoreLock::acquire(&self.db) {
            me.release(&lock);
        }
    }

    /// Notices a deleted or replaced database, and takes over dead processes' work.
    fn watch(&mut self, conn: &mut Connection) {
        self.last_watch = std::time::Instant::now();
        if self.deferrals.health.lost().is_none()
            && let Some(message) = vanished(&self.db, self.identity)
        {
            tracing::error!(event = "store_vanished", path = %self.db.display(), message = %message,
                "the database file this process opened is gone or replaced: stopping; restore it and start again (see docs/src/durability.md)");
            *self.deferrals.health.lost.lock().expect("not poisoned") = Some(message);
        }
        if self.deferrals.health.lost().is_some() {
            return;
        }
        // Never block the worker (and its group commits) on another process's store lock:
        // a busy round is skipped and tried again in a second.
        let Some(lock) = instance::StoreLock::try_acquire(&self.db) else {
            return;
        };
        if let Some(me) = self.instance.as_mut()
            && let Err(e) = me.ensure(&lock)
        {
            tracing::warn!(event = "instance_file_lost", error = %e, "this process's instance file was removed and cannot be recreated; other processes may take this one for dead");
        }
        self.set_wait(conn, COMMIT_WAIT);
        if let Err(e) = adopt_dead(
            conn,
            &self.keys,
            &self.db,
            &self.owner,
            &self.deferrals.health,
            &lock,
        ) {
            tracing::warn!(event = "adopt_dead_failed", error = %e, "cannot take over a dead process's recovery file yet; retried in a second");
        }
        self.set_wait(conn, self.busy_timeout);
    }

    fn set_wait(&self, conn: &Connection, wait: Duration) {
        let _ = conn.busy_timeout(wait);
    }

    fn commit_group(&mut self, conn: &mut Connection, batch: Vec<(Outcome, Reply)>) {
        let lost = self.deferrals.health.lost().or_else(|| {
            self.instance
                .as_ref()
                .and_then(|_| vanished(&self.db, self.identity))
        });
        let result = match &lost {
            Some(message) => Err(StoreError::Lost {
                path: self.db.clone(),
                message: message.clone(),
            }),
            None => {
                let outcomes: Vec<&Outcome> = batch.iter().map(|(o, _)| o).collect();
                self.set_wait(conn, COMMIT_WAIT);
                let r = Self::commit(conn, &self.keys, &outcomes);
                self.set_wait(conn, self.busy_timeout);
                r
            }
        };
        // A locked or full database fails every outcome alike; anything else may be one bad
        // outcome, which must not hold the others hostage: then commit each alone.
        if let Err(e) = &result
            && batch.len() > 1
            && !e.is_transient()
            && lost.is_none()
        {
            for one in batch {
                self.commit_group(conn, vec![one]);
            }
            return;
        }
        match result {
            Ok(results) => {
                self.deferrals.commit_ok();
                for ((_, reply), r) in batch.into_iter().zip(results) {
                    let _ = reply.send(Ok(r));
                }
            }
            Err(e) => self.deferrals.settle_failed(batch, &e),
        }
    }

    fn commit(
        conn: &mut Connection,
        keys: &Keyring,
        outcomes: &[&Outcome],
    ) -> Result<Vec<Recorded>, StoreError> {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|source| StoreError::Sqlite {
                context: "begin commit of refresh outcomes",
                source,
            })?;
        let mut results = Vec::with_capacity(outcomes.len());
        for o in outcomes {
            results.push(sqlite::record(&tx, keys, o)?);
        }
        tx.commit().map_err(|source| StoreError::Sqlite {
            context: "commit refresh outcomes",
            source,
        })?;
        Ok(results)
    }

    fn retry_deferred(&mut self, conn: &mut Connection) {
        if self.deferrals.is_empty() {
            return;
        }
        self.last_retry = std::time::Instant::now();
        if let Some(message) = self.deferrals.health.lost() {
            self.deferrals.retry_failed(&StoreError::Lost {
                path: self.db.clone(),
                message,
            });
            return;
        }
        self.set_wait(conn, COMMIT_WAIT);
        let result = recovery::apply(conn, &self.keys, &self.deferrals.pending);
        self.set_wait(conn, self.busy_timeout);
        match result {
            Ok((_, refused)) => self.deferrals.committed(&refused),
            Err(e) => self.deferrals.retry_failed(&e),
        }
    }
}

#[cfg(test)]
mod tests;
