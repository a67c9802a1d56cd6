//! The store: accounts and the refresh log in SQLite. One worker thread owns the connection;
//! async callers send it jobs. Refresh outcomes that arrive together are committed in one
//! transaction (group commit), so durability costs one fsync per batch. Rotated tokens whose
//! commit fails go to a recovery file beside the database and are retried; `open` replays
//! that file before anything is claimed.

mod recovery;
mod schema;
pub mod sqlite;

use crate::crypto::Keyring;
use crate::model::{Account, ReauthReason, Status, TokenSet};
use rusqlite::{Connection, OpenFlags, TransactionBehavior};
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;
use tokio::sync::oneshot;

pub use recovery::recovery_path;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open database {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot create database file {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("database {path}: migration {version} failed: {source}")]
    Migration {
        path: PathBuf,
        version: usize,
        #[source]
        source: rusqlite::Error,
    },
    #[error("database error while trying to {context}: {source}")]
    Sqlite {
        context: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("recovery file {path}: {message}")]
    Recovery { path: PathBuf, message: String },
    #[error("no account with id {0} (see `refreshd accounts list`)")]
    NotFound(i64),
    #[error("{0}")]
    Invalid(String),
    #[error("the store's worker thread has stopped")]
    Closed,
    #[error(transparent)]
    Crypto(#[from] crate::crypto::CryptoError),
    #[error(
        "database {path} holds tokens sealed with key {key_id}, which is not configured (configured keys: {configured}); set store.encryption_key_file or add the key's file to store.decryption_key_files. Not opened: every refresh of those accounts would fail"
    )]
    MissingKey {
        path: PathBuf,
        key_id: String,
        configured: String,
    },
}

impl StoreError {
    /// Disk full, database locked past the busy timeout, I/O: worth retrying later.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Sqlite { source, .. } => matches!(
                source.sqlite_error_code(),
                Some(
                    rusqlite::ErrorCode::DatabaseBusy
                        | rusqlite::ErrorCode::DatabaseLocked
                        | rusqlite::ErrorCode::DiskFull
                        | rusqlite::ErrorCode::SystemIoFailure
                )
            ),
            _ => false,
        }
    }
}

/// An account to insert or update by (provider, subject): from an import or a code exchange.
#[derive(Clone, Debug)]
pub struct NewAccount {
    pub provider: String,
    pub subject: String,
    pub label: Option<String>,
    pub tokens: TokenSet,
    /// When the token response was issued (unix seconds): lifetimes count from here.
    pub obtained_at: i64,
    pub next_refresh_at: i64,
    pub status: Status,
    pub reauth_reason: Option<ReauthReason>,
}

/// What happened to one claimed account, to be written by `Store::record`.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// New tokens: stored only if `generation` is still the one that was claimed.
    Rotated {
        account_id: i64,
        generation: i64,
        tokens: TokenSet,
        at: i64,
        next_refresh_at: i64,
        status: Status,
        reauth_reason: Option<ReauthReason>,
        http_status: Option<u16>,
        duration_ms: i64,
    },
    /// Retry later; never flags. With `answer_lost` (the provider may have rotated in an
    /// answer we never read), the lease is not given back but runs until the retry, so the
    /// next claim records the crash window as for a process that died.
    Transient {
        account_id: i64,
        owner: String,
        at: i64,
        next_refresh_at: i64,
        error: String,
        http_status: Option<u16>,
        duration_ms: i64,
        answer_lost: bool,
    },
    /// The provider rejected our client credentials: accounts untouched, retried slowly.
    ConfigError {
        account_id: i64,
        owner: String,
        at: i64,
        next_refresh_at: i64,
        error: String,
        http_status: Option<u16>,
        duration_ms: i64,
    },
    /// Permanent rejection: flag `needs_reauth`, unless `generation` moved meanwhile.
    Rejected {
        account_id: i64,
        generation: i64,
        reason: ReauthReason,
        at: i64,
        error: String,
        http_status: Option<u16>,
        duration_ms: i64,
    },
    /// Never started (shutdown, or the lease would end before an answer could be stored):
    /// give the lease back.
    Released { account_id: i64, owner: String },
}

impl Outcome {
    pub fn account_id(&self) -> i64 {
        match self {
            Outcome::Rotated { account_id, .. }
            | Outcome::Transient { account_id, .. }
            | Outcome::ConfigError { account_id, .. }
            | Outcome::Rejected { account_id, .. }
            | Outcome::Released { account_id, .. } => *account_id,
        }
    }
}

/// How `record` ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recorded {
    Applied,
    /// The account's generation moved: another refresh got there first; nothing written.
    Superseded,
    /// Our lease was taken over; the failure was logged but the row left to its new owner.
    LeaseLost,
    /// The commit failed; the rotated tokens are fsynced in the recovery file and retried.
    Deferred,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct AccountSummary {
    pub id: i64,
    pub provider: String,
    pub subject: String,
    pub label: Option<String>,
    pub status: Status,
    pub reauth_reason: Option<ReauthReason>,
    pub access_expires_at: i64,
    pub refresh_expires_at: Option<i64>,
    pub next_refresh_at: i64,
    pub failures: i64,
    pub last_error: Option<String>,
    pub last_refreshed_at: Option<i64>,
    pub reauth_flagged_at: Option<i64>,
    pub scope: String,
}

#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    pub provider: Option<String>,
    pub status: Option<Status>,
    pub needs_reauth: bool,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct LogEntry {
    pub at: i64,
    pub outcome: String,
    pub http_status: Option<u16>,
    pub error: Option<String>,
    pub duration_ms: Option<i64>,
}

/// Counts over all accounts, for the metrics.
#[derive(Clone, Debug, Default)]
pub struct Gauges {
    pub by_status: Vec<(String, Status, i64)>,
    /// (provider, reason, count) of accounts `needs_reauth` or `expiring`.
    pub flagged: Vec<(String, String, i64)>,
    /// (provider, count) of refreshable accounts whose access token has already expired.
    pub access_expired: Vec<(String, i64)>,
    /// (provider, soonest refresh-token end) over refreshable accounts that have one.
    pub soonest_refresh_expiry: Vec<(String, i64)>,
}

/// Accounts whose state the reauth sweep changed.
#[derive(Clone, Debug, Default)]
pub struct SweepReport {
    pub expiring: Vec<AccountSummary>,
    pub expired: Vec<AccountSummary>,
}

type Call = Box<dyn FnOnce(&mut Connection) + Send>;

enum Job {
    Call(Call),
    Record(Outcome, oneshot::Sender<Result<Recorded, StoreError>>),
    Close(oneshot::Sender<()>),
}

/// Settings the store needs; a subset of `[store]`.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    pub path: PathBuf,
    pub busy_timeout: Duration,
    /// Seals tokens on write, opens them on read. The default keyring stores them clear.
    pub keyring: Keyring,
}

/// Async handle to the store. Cheap to clone; all clones talk to one worker thread.
#[derive(Clone)]
pub struct Store {
    tx: std_mpsc::Sender<Job>,
    path: PathBuf,
    keys: Keyring,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.path.display())
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
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
        .map_err(open_err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Invalid(format!(
            "database {}: cannot switch to WAL journal mode (got {mode:?}); is it on a network file system?",
            opts.path.display()
        )));
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
    /// Opens (creating if needed) the database, applies migrations, replays the recovery
    /// file, and starts the worker thread.
    pub async fn open(opts: StoreOptions) -> Result<Store, StoreError> {
        Self::start(opts, false).await
    }

    /// Opens an existing database for reading only (`accounts list/show`, `check`): no
    /// migration, no replay of the recovery file, which belongs to the daemon.
    pub async fn open_read_only(opts: StoreOptions) -> Result<Store, StoreError> {
        Self::start(opts, true).await
    }

    async fn start(opts: StoreOptions, read_only: bool) -> Result<Store, StoreError> {
        let (tx, rx) = std_mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = oneshot::channel();
        let path = opts.path.clone();
        let keys = opts.keyring.clone();
        std::thread::Builder::new()
            .name("refreshd-store".into())
            .spawn(move || {
                let prepared = if read_only {
                    Self::prepare_read_only(&opts)
                } else {
                    Self::prepare(&opts)
                };
                let mut conn = match prepared {
                    Ok(c) => {
                        let _ = ready_tx.send(Ok(()));
                        c
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                Worker::new(&opts).run(&mut conn, rx);
            })
            .map_err(|e| StoreError::Create {
                path: path.clone(),
                source: e,
            })?;
        ready_rx.await.map_err(|_| StoreError::Closed)??;
        Ok(Store { tx, path, keys })
    }

    fn prepare(opts: &StoreOptions) -> Result<Connection, StoreError> {
        let mut conn = connect(opts)?;
        schema::migrate(&mut conn).map_err(|(version, source)| StoreError::Migration {
            path: opts.path.clone(),
            version,
            source,
        })?;
        check_keys(&conn, &opts.path, &opts.keyring)?;
        recovery::replay(&mut conn, &opts.keyring, &recovery_path(&opts.path))?;
        Ok(conn)
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
            return Err(StoreError::Invalid(format!(
                "database {} has schema version {version}, this refreshd uses {}: run `refreshd run` (or `refreshd accounts import`) once to migrate it",
                opts.path.display(),
                schema::MIGRATIONS.len()
            )));
        }
        check_keys(&conn, &opts.path, &opts.keyring)?;
        Ok(conn)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The keys this store seals and opens tokens with (for queries run through `in_tx`).
    pub fn keyring(&self) -> &Keyring {
        &self.keys
    }

    /// Runs `f` on the worker thread with the connection.
    pub async fn call<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<R, StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Job::Call(Box::new(move |c| {
                let _ = tx.send(f(c));
            })))
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Writes one outcome; outcomes sent while a commit is running share the next commit.
    pub async fn record(&self, outcome: Outcome) -> Result<Recorded, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Job::Record(outcome, tx))
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Finishes queued work (including retrying deferred commits once) and stops the worker.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Job::Close(tx)).is_ok() {
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
        let owner = owner.to_string();
        let until = now + lease.as_secs() as i64;
        let keys = self.keys.clone();
        self.call(move |c| sqlite::claim_due(c, &keys, &owner, now, until, limit))
            .await
    }

    pub async fn next_due(&self, now: i64) -> Result<Option<i64>, StoreError> {
        self.call(move |c| sqlite::next_due(c, now)).await
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
        let owner = owner.to_string();
        let until = now + lease.as_secs() as i64;
        let keys = self.keys.clone();
        self.call(move |c| sqlite::claim_due_except(c, &keys, &owner, now, until, limit, &skip))
            .await
    }

    /// `next_due` without the accounts of the `skip` providers.
    pub async fn next_due_except(
        &self,
        now: i64,
        skip: Vec<String>,
    ) -> Result<Option<i64>, StoreError> {
        self.call(move |c| sqlite::next_due_except(c, now, &skip))
            .await
    }

    pub async fn get(&self, id: i64) -> Result<Option<Account>, StoreError> {
        let keys = self.keys.clone();
        self.call(move |c| sqlite::get(c, &keys, id)).await
    }

    pub async fn find(&self, provider: &str, subject: &str) -> Result<Option<Account>, StoreError> {
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
        self.call(move |c| sqlite::list(c, &filter, after_id, page))
            .await
    }

    pub async fn log_entries(&self, id: i64, limit: usize) -> Result<Vec<LogEntry>, StoreError> {
        self.call(move |c| sqlite::log_entries(c, id, limit)).await
    }

    pub async fn counts(&self) -> Result<Vec<(String, Status, i64)>, StoreError> {
        self.call(|c| sqlite::counts(c)).await
    }

    /// True when the database answers and carries every migration this build knows.
    pub async fn schema_current(&self) -> Result<bool, StoreError> {
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
        self.call(move |c| sqlite::gauges(c, now)).await
    }

    /// Inserts or updates all accounts in one transaction: all or nothing.
    pub async fn upsert(
        &self,
        accounts: Vec<NewAccount>,
        now: i64,
    ) -> Result<Vec<(i64, bool)>, StoreError> {
        let keys = self.keys.clone();
        self.in_tx("import accounts", move |tx| {
            sqlite::upsert(tx, &keys, &accounts, now)
        })
        .await
    }

    pub async fn sweep(&self, now: i64, window: Duration) -> Result<SweepReport, StoreError> {
        let end = now + window.as_secs() as i64;
        self.in_tx("reauth sweep", move |tx| sqlite::sweep(tx, now, end))
            .await
    }

    pub async fn flagged_ids(&self) -> Result<Vec<(i64, Status)>, StoreError> {
        self.call(|c| sqlite::flagged_ids(c)).await
    }

    pub async fn prune_log(&self, before: i64) -> Result<usize, StoreError> {
        self.call(move |c| sqlite::prune_log(c, before)).await
    }

    pub async fn mark_due(&self, id: i64, now: i64, force: bool) -> Result<Status, StoreError> {
        self.in_tx("mark account due", move |tx| {
            sqlite::mark_due(tx, id, now, force)
        })
        .await
    }

    pub async fn remove(&self, id: i64) -> Result<(), StoreError> {
        self.in_tx("remove account", move |tx| sqlite::remove(tx, id))
            .await
    }

    /// Accounts whose tokens are not sealed under the primary key yet (0 without one).
    pub async fn count_to_rekey(&self) -> Result<u64, StoreError> {
        let Some(id) = self.keys.primary_id().map(str::to_string) else {
            return Ok(0);
        };
        self.call(move |c| sqlite::count_to_rekey(c, &id)).await
    }

    /// Re-seals one batch under the primary key; see `sqlite::rekey_batch`.
    pub async fn rekey_batch(
        &self,
        after_id: i64,
        limit: usize,
    ) -> Result<sqlite::RekeyBatch, StoreError> {
        let keys = self.keys.clone();
        self.in_tx("re-seal tokens", move |tx| {
            sqlite::rekey_batch(tx, &keys, after_id, limit)
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

/// What `rekey` did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RekeyReport {
    pub resealed: u64,
    /// Accounts still not under the primary key at the end: written meanwhile by a process
    /// that seals with another key (a daemon not restarted with the new config).
    pub remaining: u64,
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

/// Most outcomes written by one commit.
const MAX_GROUP: usize = 1024;
/// How often deferred (recovery-file) commits are retried when the worker is idle.
const RETRY_EVERY: Duration = Duration::from_secs(2);
/// While commits are deferred, a job first retries them, at most this often (each retry may
/// wait `busy_timeout` on a locked database).
const RETRY_BEFORE_JOB: Duration = Duration::from_millis(250);

struct Worker {
    recovery: PathBuf,
    keys: Keyring,
    /// Rotations that could not be committed: in the recovery file and here, until committed.
    deferred: Vec<Outcome>,
    last_retry: std::time::Instant,
}

impl Worker {
    fn new(opts: &StoreOptions) -> Self {
        Worker {
            recovery: recovery_path(&opts.path),
            keys: opts.keyring.clone(),
            deferred: Vec::new(),
            last_retry: std::time::Instant::now(),
        }
    }

    fn run(mut self, conn: &mut Connection, rx: std_mpsc::Receiver<Job>) {
        let mut stash: Vec<Job> = Vec::new();
        loop {
            let job = if let Some(j) = stash.pop() {
                j
            } else if self.deferred.is_empty() {
                match rx.recv() {
                    Ok(j) => j,
                    Err(_) => break,
                }
            } else {
                match rx.recv_timeout(RETRY_EVERY) {
                    Ok(j) => j,
                    Err(std_mpsc::RecvTimeoutError::Timeout) => {
                        self.retry_deferred(conn);
                        continue;
                    }
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
                }
            };
            // Deferred rotations go first: nothing else should see the rows they update.
            if !self.deferred.is_empty()
                && (matches!(job, Job::Call(_)) || self.last_retry.elapsed() >= RETRY_BEFORE_JOB)
            {
                self.retry_deferred(conn);
            }
            match job {
                Job::Call(f) => f(conn),
                Job::Close(done) => {
                    self.retry_deferred(conn);
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
    }

    fn commit_group(
        &mut self,
        conn: &mut Connection,
        batch: Vec<(Outcome, oneshot::Sender<Result<Recorded, StoreError>>)>,
    ) {
        let outcomes: Vec<&Outcome> = batch.iter().map(|(o, _)| o).collect();
        let result = Self::commit(conn, &self.keys, &outcomes);
        // A locked or full database fails every outcome alike; anything else may be one bad
        // outcome, which must not hold the others hostage: then commit each alone.
        if let Err(e) = &result
            && batch.len() > 1
            && !e.is_transient()
        {
            for one in batch {
                self.commit_group(conn, vec![one]);
            }
            return;
        }
        match result {
            Ok(results) => {
                for ((_, reply), r) in batch.into_iter().zip(results) {
                    let _ = reply.send(Ok(r));
                }
            }
            Err(e) => {
                let message = e.to_string();
                let (rotated, others): (Vec<_>, Vec<_>) = batch
                    .into_iter()
                    .partition(|(o, _)| matches!(o, Outcome::Rotated { .. }));
                if !rotated.is_empty() {
                    let outcomes: Vec<Outcome> = rotated.iter().map(|(o, _)| o.clone()).collect();
                    let saved = recovery::append(&self.recovery, &self.keys, &outcomes);
                    self.deferred.extend(outcomes);
                    for (_, reply) in rotated {
                        let _ = reply.send(match &saved {
                            Ok(()) => Ok(Recorded::Deferred),
                            // Still held in memory and retried, but not crash-safe: say so.
                            Err(e) => Err(StoreError::Recovery {
                                path: self.recovery.clone(),
                                message: format!("{e}; commit failed too: {message}"),
                            }),
                        });
                    }
                }
                for (_, reply) in others {
                    let _ = reply.send(Err(StoreError::Invalid(format!(
                        "commit failed, outcome not stored (will be retried after the lease expires): {message}"
                    ))));
                }
            }
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
        if self.deferred.is_empty() {
            return;
        }
        self.last_retry = std::time::Instant::now();
        match recovery::apply(conn, &self.keys, &self.deferred) {
            Ok(_) => {
                self.deferred.clear();
                if let Err(e) = recovery::remove(&self.recovery) {
                    tracing::error!(event = "recovery_cleanup_failed", path = %self.recovery.display(), error = %e,
                        "deferred tokens are committed but the recovery file could not be removed; it is replayed harmlessly at next start");
                } else {
                    tracing::info!(event = "recovery_committed", path = %self.recovery.display(), "deferred token rotations are now committed");
                }
            }
            Err(e) => {
                tracing::warn!(event = "recovery_retry_failed", pending = self.deferred.len(), error = %e,
                    "rotated tokens still waiting to be committed; they are safe in the recovery file");
            }
        }
    }
}

#[cfg(test)]
mod tests;
