//! The store: accounts, the refresh log, the audit trail and web connects in progress, in SQLite (one file,
//! one worker thread) or PostgreSQL (replicas sharing one database). This file is the
//! facade: `Store`, which every other part uses, and its dispatch to the backend. Each
//! backend (`sqlite/`, `postgres/`) builds only on the shared files beside this one:
//! `types` (the data), `error`, `rules` (pure decisions), `columns` (the tables' columns
//! and rows), `record` (what writing an outcome means), `commit` (the group-commit policy),
//! `deferred` and `recovery` (rotations whose commit failed, and their file), `instance`
//! (which processes are alive). `rekey`, `copy` and `audit` (admin changes with their
//! audit rows) build on the facade; `apps` is the facade's part for app tokens.

mod apps;
mod audit;
mod columns;
mod commit;
pub mod copy;
mod deferred;
mod error;
mod gate;
pub mod instance;
pub mod postgres;
mod record;
mod recovery;
mod rekey;
mod rules;
pub mod sqlite;
mod types;

pub use error::{IMPORT_ABORTED, Refusal, StoreError};
pub use gate::{CheckHook, Checks};
pub use recovery::{FAULT_ENV as RECOVERY_FAULT_ENV, owner_recovery_path, recovery_path};
pub use rekey::rekey;
pub use sqlite::{WATCH_EVERY, check_report};
pub use types::{
    AccountSummary, Actor, AppAdded, AuditAction, AuditEntry, DueMinute, Gauges, ListFilter,
    LogEntry, NewAccount, NewApp, Outcome, PendingConnect, PgOptions, PlanQuery, PlanRows,
    RecentOutcome, Recorded, RefreshEnd, RekeyBatch, RekeyReport, StateProblem, StoreOptions,
    SweepReport,
};

use crate::crypto::Keyring;
use crate::model::{Account, Status};
use postgres::{PgStore, queries as pg, reports as pg_reports};
use rusqlite::Connection;
use sqlite::{SqliteStore, queries as lite};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Most accounts of each kind (expired, expiring) one transaction of the reauth sweep flags.
pub const SWEEP_CHUNK: usize = 500;

/// Recovery files beside `db` that hold rotations not committed yet (any owner).
pub fn pending_recovery_files(db: &Path) -> Vec<PathBuf> {
    recovery::pending_files(db)
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

#[derive(Clone)]
enum Backend {
    Sqlite(SqliteStore),
    Postgres(Arc<PgStore>),
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.describe())
    }
}

impl Store {
    /// Opens (creating if needed) the database, applies migrations, checks it
    /// (`quick_check`), takes the instance lock, replays the recovery files of dead
    /// processes, and starts the worker.
    pub async fn open(opts: StoreOptions) -> Result<Store, StoreError> {
        Self::start(opts, sqlite::Opening::Checked).await
    }

    /// The daemon's open: as `open`, but a SQLite store whose schema is current is handed
    /// out before its start-up checks (`quick_check`, the sealing keys) end, so tokens can
    /// be read at once; every write waits for them (`checks_settled` says how they ended).
    /// `before_checks` runs on the checks' thread first (tests hold the checks with it).
    /// PostgreSQL is checked before it is handed out, as by `open`.
    pub async fn open_gated(
        opts: StoreOptions,
        before_checks: Option<CheckHook>,
    ) -> Result<Store, StoreError> {
        Self::start(opts, sqlite::Opening::Gated(before_checks)).await
    }

    /// Opens an existing database for reading only (`accounts list/show`, `check`): no
    /// migration, no replay of the recovery file, which belongs to the daemon.
    pub async fn open_read_only(opts: StoreOptions) -> Result<Store, StoreError> {
        Self::start(opts, sqlite::Opening::ReadOnly).await
    }

    async fn start(opts: StoreOptions, opening: sqlite::Opening) -> Result<Store, StoreError> {
        let read_only = matches!(opening, sqlite::Opening::ReadOnly);
        let mut owner: Arc<str> = instance::new_owner().into();
        let health = Arc::new(deferred::Health::default());
        let keys = opts.keyring.clone();
        let backend = if let Some(pgo) = &opts.postgres {
            if !read_only {
                // The marker says this owner holds a liveness lock others may judge it by.
                owner = postgres::liveness::new_owner(&owner).into();
            }
            let store = PgStore::open(
                &pgo.url,
                pgo.pool_size,
                keys.clone(),
                &opts.path,
                &owner,
                read_only,
                health.clone(),
            )
            .await?;
            Backend::Postgres(Arc::new(store))
        } else {
            Backend::Sqlite(SqliteStore::start(opts, owner.clone(), health.clone(), opening).await?)
        };
        Ok(Store {
            backend,
            keys,
            health,
            owner,
        })
    }

    /// The SQLite file, or None on PostgreSQL.
    pub fn path(&self) -> Option<&Path> {
        match &self.backend {
            Backend::Sqlite(s) => Some(s.path()),
            Backend::Postgres(_) => None,
        }
    }

    /// Where the store is, for logs: the file, or the PostgreSQL URL without its password.
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Sqlite(s) => s.path().display().to_string(),
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

    /// Whether a claimed account's request may still be sent, checked again just before it
    /// goes (it may have waited for a slot since its claim): the lease holds and a rotated
    /// token has somewhere durable to go.
    pub fn may_send(&self) -> bool {
        self.health.may_send()
    }

    /// Where the start-up checks are (`open_gated`; any other open passed them).
    pub fn checks(&self) -> Checks {
        self.health.checks.state()
    }

    /// How many writes (the engine's claims included) arrived while the start-up checks ran:
    /// each waited for their end. Tests see a write reach the gate by it, without sleeping.
    pub fn writes_held(&self) -> usize {
        self.health.checks.held()
    }

    /// Waits for the start-up checks: how long they took, or the error they failed with.
    pub async fn checks_settled(&self) -> Result<Duration, StoreError> {
        self.health.checks.settled().await
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

    pub(crate) fn pg(&self) -> Option<&PgStore> {
        match &self.backend {
            Backend::Postgres(pg) => Some(pg),
            Backend::Sqlite(_) => None,
        }
    }

    /// The keys this store seals and opens tokens with (for queries run through `in_tx`).
    pub fn keyring(&self) -> &Keyring {
        &self.keys
    }

    fn sqlite(&self, what: &'static str) -> Result<&SqliteStore, StoreError> {
        match &self.backend {
            Backend::Sqlite(s) => Ok(s),
            Backend::Postgres(_) => Err(StoreError::SqliteOnly {
                what,
                store: self.describe(),
            }),
        }
    }

    /// Runs `f` on the SQLite worker thread with the connection (SQLite only), inside the
    /// caller's tracing span.
    pub async fn call<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<R, StoreError> + Send + 'static,
    {
        self.sqlite("a raw SQLite query")?.call(f).await
    }

    /// Runs `f` in one IMMEDIATE transaction on the worker thread; commits when it returns Ok.
    pub async fn in_tx<R, F>(&self, context: &'static str, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&rusqlite::Transaction<'_>) -> Result<R, StoreError> + Send + 'static,
    {
        self.sqlite("a raw SQLite query")?.in_tx(context, f).await
    }

    /// Writes one outcome; outcomes sent while a commit is running share the next commit.
    pub async fn record(&self, outcome: Outcome) -> Result<Recorded, StoreError> {
        let _waiting = Waiting::new(&self.health);
        match &self.backend {
            Backend::Sqlite(s) => s.record(outcome).await,
            Backend::Postgres(pg) => pg.record(outcome).await,
        }
    }

    /// Finishes queued work (retrying deferred commits a few times; what still fails waits
    /// in the recovery file) and stops the worker; on SQLite, returns once its connection is
    /// closed.
    pub async fn close(&self) {
        match &self.backend {
            Backend::Sqlite(s) => s.close().await,
            Backend::Postgres(pg) => pg.close().await,
        }
    }

    pub async fn claim_due(
        &self,
        owner: &str,
        now: i64,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<Account>, StoreError> {
        self.claim_due_except(owner, now, now, lease, limit, Vec::new())
            .await
    }

    pub async fn next_due(&self, now: i64) -> Result<Option<i64>, StoreError> {
        self.next_due_except(now, Vec::new()).await
    }

    /// `claim_due` of the accounts due by `due_by`, without those of the `skip` providers.
    /// Leases (expired, dead owners', the new `lease_until`) are judged by `now` only:
    /// `due_by` may run ahead of it (the engine's claim lead), a lease never does.
    #[allow(clippy::too_many_arguments)]
    pub async fn claim_due_except(
        &self,
        owner: &str,
        now: i64,
        due_by: i64,
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
        let exclude: Vec<i64> = self.pending_rotations();
        // Leases of processes found dead end now: taken over like expired ones, so the
        // claim records the crash window (`refresh_interrupted`).
        let dead = std::mem::take(&mut *self.health.dead_owners.lock().expect("not poisoned"));
        let keys = self.keys.clone();
        let claimed = match &self.backend {
            Backend::Sqlite(s) => {
                s.claim(sqlite::claim::Claim {
                    owner,
                    now,
                    due_by,
                    lease_until: until,
                    limit,
                    skip,
                    exclude,
                    dead: dead.clone(),
                })
                .await
            }
            Backend::Postgres(p) => {
                async {
                    let c = p.client("claim due accounts").await?;
                    if !dead.is_empty() {
                        pg::expire_leases_of(&**c, &dead, now).await?;
                    }
                    pg::claim_due_except(
                        &c, &keys, &owner, now, due_by, until, limit, &skip, &exclude,
                    )
                    .await
                }
                .await
            }
        };
        if claimed.is_err() && !dead.is_empty() {
            // The failed claim rolled the take-over back: the next claim ends those leases.
            self.health
                .dead_owners
                .lock()
                .expect("not poisoned")
                .extend(dead);
        }
        claimed
    }

    /// `next_due` without the accounts of the `skip` providers.
    pub async fn next_due_except(
        &self,
        now: i64,
        skip: Vec<String>,
    ) -> Result<Option<i64>, StoreError> {
        match &self.backend {
            Backend::Sqlite(s) => s.read(move |c| lite::next_due_except(c, now, &skip)).await,
            Backend::Postgres(p) => {
                let c = p.client("find next due account").await?;
                pg::next_due_except(&c, now, &skip).await
            }
        }
    }

    pub async fn get(&self, id: i64) -> Result<Option<Account>, StoreError> {
        let keys = self.keys.clone();
        match &self.backend {
            Backend::Sqlite(s) => s.read(move |c| lite::get(c, &keys, id)).await,
            Backend::Postgres(p) => pg::get(&**p.client("read account").await?, &keys, id).await,
        }
    }

    pub async fn find(&self, provider: &str, subject: &str) -> Result<Option<Account>, StoreError> {
        let (p, s) = (provider.to_string(), subject.to_string());
        let keys = self.keys.clone();
        match &self.backend {
            Backend::Sqlite(lt) => lt.read(move |c| lite::find(c, &keys, &p, &s)).await,
            Backend::Postgres(pgs) => {
                pg::find(&**pgs.client("find account").await?, &keys, &p, &s).await
            }
        }
    }

    pub async fn list(
        &self,
        filter: ListFilter,
        after_id: i64,
        page: usize,
    ) -> Result<Vec<AccountSummary>, StoreError> {
        match &self.backend {
            Backend::Sqlite(s) => {
                s.read(move |c| lite::list(c, &filter, after_id, page))
                    .await
            }
            Backend::Postgres(p) => {
                pg::list(&**p.client("list accounts").await?, &filter, after_id, page).await
            }
        }
    }

    pub async fn log_entries(&self, id: i64, limit: usize) -> Result<Vec<LogEntry>, StoreError> {
        match &self.backend {
            Backend::Sqlite(s) => s.read(move |c| lite::log_entries(c, id, limit)).await,
            Backend::Postgres(p) => {
                pg_reports::log_entries(&**p.client("read refresh log").await?, id, limit).await
            }
        }
    }

    /// The newest `limit` refresh outcomes of all accounts, newest first (the admin page).
    pub async fn recent_outcomes(&self, limit: usize) -> Result<Vec<RecentOutcome>, StoreError> {
        match &self.backend {
            Backend::Sqlite(s) => s.read(move |c| lite::recent_outcomes(c, limit)).await,
            Backend::Postgres(p) => {
                let c = p.client("read the latest refresh outcomes").await?;
                pg_reports::recent_outcomes(&**c, limit).await
            }
        }
    }

    pub async fn counts(&self) -> Result<Vec<(String, Status, i64)>, StoreError> {
        match &self.backend {
            Backend::Sqlite(s) => s.read(|c| lite::counts(c)).await,
            Backend::Postgres(p) => pg_reports::counts(&**p.client("count accounts").await?).await,
        }
    }

    /// True when the database answers and carries every migration this build knows.
    pub async fn schema_current(&self) -> Result<bool, StoreError> {
        match &self.backend {
            Backend::Sqlite(s) => {
                s.read(|c| Ok(sqlite::schema::version(c)? == sqlite::schema::MIGRATIONS.len()))
                    .await
            }
            Backend::Postgres(p) => {
                let c = p.client("read the schema version").await?;
                Ok(postgres::schema::schema_version(&**c).await? == postgres::MIGRATIONS.len())
            }
        }
    }

    /// What the metrics report about the accounts, read in one go.
    pub async fn gauges(&self, now: i64) -> Result<Gauges, StoreError> {
        match &self.backend {
            Backend::Sqlite(s) => s.read(move |c| lite::gauges(c, now)).await,
            Backend::Postgres(p) => {
                pg_reports::gauges(&**p.client("read account gauges").await?, now).await
            }
        }
    }

    /// What `accounts plan` reads: due refreshes per provider and minute, and the soonest
    /// refresh-token ends (`plan.rs` turns them into the plan).
    pub async fn plan_rows(&self, q: PlanQuery) -> Result<PlanRows, StoreError> {
        match &self.backend {
            Backend::Sqlite(s) => s.read(move |c| lite::plan_rows(c, &q)).await,
            Backend::Postgres(p) => {
                pg_reports::plan_rows(&**p.client("read the plan").await?, &q).await
            }
        }
    }

    /// Inserts or updates all accounts in one transaction: all or nothing.
    pub async fn upsert(
        &self,
        accounts: Vec<NewAccount>,
        now: i64,
    ) -> Result<Vec<(i64, bool)>, StoreError> {
        let keys = self.keys.clone();
        match &self.backend {
            Backend::Sqlite(s) => {
                s.in_tx("import accounts", move |tx| {
                    sqlite::writes::upsert(tx, &keys, &accounts, now)
                })
                .await
            }
            Backend::Postgres(p) => {
                p.in_tx("import accounts", async |tx| {
                    postgres::writes::upsert(tx, &keys, &accounts, now).await
                })
                .await
            }
        }
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
        let keys = self.keys.clone();
        let (mut batches, mut per_batch) = (batches, per_batch);
        match &self.backend {
            Backend::Sqlite(s) => {
                // The import's own settings, put back after its transaction whatever its end.
                let before = s.call(sqlite::writes::import_settings).await?;
                let written = s
                    .in_tx("import accounts", move |tx| {
                        while let Some(item) = batches.blocking_recv() {
                            let Some(batch) = item else { return Ok(()) };
                            let ids = sqlite::writes::upsert(tx, &keys, &batch, now)?;
                            per_batch(&batch, &ids);
                        }
                        Err(Refusal::ImportAborted.into())
                    })
                    .await;
                let back = s
                    .call(move |c| sqlite::writes::restore_settings(c, before))
                    .await;
                // Once the import committed, a setting left changed must not hide it (its
                // counts and flagged accounts are still to be reported).
                if let (Ok(()), Err(e)) = (&written, &back) {
                    tracing::warn!(event = "import_setting_not_restored", error = %e,
                        "the import committed; its connection keeps temp_store = MEMORY");
                }
                written
            }
            Backend::Postgres(p) => {
                p.in_tx("import accounts", async |tx| {
                    while let Some(item) = batches.recv().await {
                        let Some(batch) = item else { return Ok(()) };
                        let ids = postgres::writes::upsert(tx, &keys, &batch, now).await?;
                        per_batch(&batch, &ids);
                    }
                    Err(Refusal::ImportAborted.into())
                })
                .await
            }
        }
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
        let keys = self.keys.clone();
        let ctx = "store a connected account";
        match &self.backend {
            Backend::Sqlite(s) => {
                s.in_tx(ctx, move |tx| {
                    let existing = expect_id.map(|id| lite::get(tx, &keys, id)).transpose()?;
                    if let Some(mismatch) = rules::connected_mismatch(expect_id, existing, &row)? {
                        return Ok(Err(mismatch));
                    }
                    let previous = lite::find(tx, &keys, &row.provider, &row.subject)?;
                    let ids = sqlite::writes::upsert(tx, &keys, std::slice::from_ref(&row), now)?;
                    Ok(Ok((ids, previous.map(|a| a.status))))
                })
                .await
            }
            Backend::Postgres(p) => {
                p.in_tx(ctx, async |tx| {
                    let existing = match expect_id {
                        Some(id) => Some(pg::get(&**tx, &keys, id).await?),
                        None => None,
                    };
                    if let Some(mismatch) = rules::connected_mismatch(expect_id, existing, &row)? {
                        return Ok(Err(mismatch));
                    }
                    let previous = pg::find(&**tx, &keys, &row.provider, &row.subject).await?;
                    let ids = postgres::writes::upsert(tx, &keys, std::slice::from_ref(&row), now)
                        .await?;
                    Ok(Ok((ids, previous.map(|a| a.status))))
                })
                .await
            }
        }
    }

    /// Flags the accounts whose refresh token has ended or ends within `window`, in
    /// transactions of at most `SWEEP_CHUNK` accounts of each kind: SQLite's one writer
    /// commits refreshes and claims between them, instead of waiting for all of a large
    /// sweep (a sweep flagging 1,670 of a million accounts held refreshes back 0.33 s).
    pub async fn sweep(&self, now: i64, window: Duration) -> Result<SweepReport, StoreError> {
        let end = now + window.as_secs() as i64;
        let mut report = SweepReport::default();
        loop {
            let chunk = match &self.backend {
                Backend::Sqlite(s) => {
                    s.in_tx("reauth sweep", move |tx| {
                        lite::sweep(tx, now, end, SWEEP_CHUNK)
                    })
                    .await?
                }
                Backend::Postgres(p) => {
                    p.in_tx("reauth sweep", async |tx| {
                        pg::sweep(tx, now, end, SWEEP_CHUNK).await
                    })
                    .await?
                }
            };
            let last = chunk.expired.len() < SWEEP_CHUNK && chunk.expiring.len() < SWEEP_CHUNK;
            report.expired.extend(chunk.expired);
            report.expiring.extend(chunk.expiring);
            if last {
                return Ok(report);
            }
        }
    }

    pub async fn flagged_ids(&self) -> Result<Vec<(i64, Status)>, StoreError> {
        match &self.backend {
            Backend::Sqlite(s) => s.read(|c| lite::flagged_ids(c)).await,
            Backend::Postgres(p) => {
                pg::flagged_ids(&**p.client("list flagged accounts").await?).await
            }
        }
    }

    pub async fn prune_log(&self, before: i64) -> Result<usize, StoreError> {
        match &self.backend {
            Backend::Sqlite(s) => s.call(move |c| lite::prune_log(c, before)).await,
            Backend::Postgres(p) => {
                pg::prune_log(&**p.client("prune refresh log").await?, before).await
            }
        }
    }

    pub async fn mark_due(&self, id: i64, now: i64, force: bool) -> Result<Status, StoreError> {
        let ctx = "mark account due";
        match &self.backend {
            Backend::Sqlite(s) => {
                s.in_tx(ctx, move |tx| lite::mark_due(tx, id, now, force))
                    .await
            }
            Backend::Postgres(p) => {
                p.in_tx(ctx, async |tx| pg::mark_due(tx, id, now, force).await)
                    .await
            }
        }
    }

    /// `accounts disable` (`disable`) or `enable`: the status before and, when it changed,
    /// after. A disabled account is never claimed, handed out or written to a sink; enabling
    /// makes it due now.
    /// Accounts whose tokens are not sealed under the primary key yet (0 without one).
    pub async fn count_to_rekey(&self) -> Result<u64, StoreError> {
        let Some(id) = self.keys.primary_id().map(str::to_string) else {
            return Ok(0);
        };
        match &self.backend {
            Backend::Sqlite(s) => s.read(move |c| lite::count_to_rekey(c, &id)).await,
            Backend::Postgres(p) => {
                let c = p.client("count accounts to re-seal").await?;
                pg::count_to_rekey(&**c, &id).await
            }
        }
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
        let key = key.to_string();
        let verifier = rules::seal_verifier(&self.keys, &pending);
        let ctx = "remember a web connect";
        match &self.backend {
            Backend::Sqlite(s) => {
                s.in_tx(ctx, move |tx| {
                    lite::connect_state_put(tx, &key, &pending, verifier, now, max_open)
                })
                .await
            }
            Backend::Postgres(p) => {
                p.in_tx(ctx, async |tx| {
                    pg::connect_state_put(tx, &key, &pending, verifier, now, max_open).await
                })
                .await
            }
        }
    }

    /// Takes a web connect's state for its one use, whichever replica stored it.
    pub async fn connect_state_take(
        &self,
        key: &str,
        provider: &str,
        now: i64,
    ) -> Result<Result<PendingConnect, StateProblem>, StoreError> {
        let (key, provider) = (key.to_string(), provider.to_string());
        let keys = self.keys.clone();
        let ctx = "take a web connect's state";
        match &self.backend {
            Backend::Sqlite(s) => {
                s.in_tx(ctx, move |tx| {
                    lite::connect_state_take(tx, &keys, &key, &provider, now)
                })
                .await
            }
            Backend::Postgres(p) => {
                p.in_tx(ctx, async |tx| {
                    pg::connect_state_take(tx, &keys, &key, &provider, now).await
                })
                .await
            }
        }
    }

    /// Re-seals one batch under the primary key; see `sqlite::queries::rekey_batch`.
    pub async fn rekey_batch(&self, after_id: i64, limit: usize) -> Result<RekeyBatch, StoreError> {
        let keys = self.keys.clone();
        match &self.backend {
            Backend::Sqlite(s) => {
                s.in_tx("re-seal tokens", move |tx| {
                    lite::rekey_batch(tx, &keys, after_id, limit)
                })
                .await
            }
            Backend::Postgres(p) => {
                p.in_tx("re-seal tokens", async |tx| {
                    pg::rekey_batch(tx, &keys, after_id, limit).await
                })
                .await
            }
        }
    }
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

#[cfg(test)]
mod tests;
