//! The SQLite backend: one worker thread owns the connection and runs the jobs async callers
//! send it, each inside the tracing span its caller was in (so its log lines carry the
//! account). Refresh outcomes that arrive together share one transaction (group commit, see
//! `commit.rs`), and a claim waiting beside them runs in it too (`claim.rs`); once it
//! committed, the group's answers go to the runtime in one task; rotations whose commit
//! fails go to the recovery file and are retried. The worker also watches that the
//! database file is still the one it opened and takes over what dead processes sharing the
//! file left (their recovery files and leases).
//! `open.rs` opens a store (its checks before any write), `queries.rs` and `writes.rs` hold
//! the SQL, `claim.rs` the claim and the group transaction, `schema.rs` the migrations,
//! `check.rs` the file's health checks, `checkpoint.rs` the thread that copies the WAL into
//! the database file beside the worker.

mod check;
mod checkpoint;
pub(crate) mod claim;
mod open;
pub(crate) mod queries;
pub mod schema;
pub(crate) mod writes;

pub use check::report as check_report;
#[cfg(test)]
use open::connect;
use open::{prepare, prepare_gated, prepare_read_only, set_query_only, take_over_dead};

use crate::crypto::Keyring;
use crate::model::Account;
use crate::store::commit::{
    self, CLOSE_RETRIES, CLOSE_RETRY_EVERY, COMMIT_WAIT, MAX_GROUP, RETRY_EVERY,
};
use crate::store::deferred::{self, Health};
use crate::store::error::StoreError;
use crate::store::gate::CheckHook;
use crate::store::instance;
use crate::store::recovery;
use crate::store::types::{Outcome, Recorded, Reply, StoreOptions};
use claim::{Claim, ClaimReply};
use rusqlite::{Connection, TransactionBehavior};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;
use tokio::sync::oneshot;
use tracing::Span;

/// A call answers its caller itself: with what it did on the connection, or the error
/// it was refused with (`refuse`).
type Call = Box<dyn FnOnce(Result<&mut Connection, StoreError>) + Send>;

/// A job for the worker, with the span of the caller that sent it.
enum Job {
    Call(Call, Span),
    /// A call that only reads: answered even before the start-up checks pass.
    Read(Call, Span),
    /// The start-up checks ended (how long they took, or why they failed).
    Checked(Result<Duration, StoreError>),
    Record(Outcome, Reply, Span),
    Claim(Claim, ClaimReply, Span),
    Close(oneshot::Sender<()>),
}

impl Job {
    /// The answer of a `close` call; any other job is dropped (its caller sees `Closed`).
    fn into_close(self) -> Option<oneshot::Sender<()>> {
        match self {
            Job::Close(done) => Some(done),
            _ => None,
        }
    }
}

/// A claim waiting for the next group transaction.
type PendingClaim = (Claim, ClaimReply, Span);

/// Handle to the worker thread. Cheap to clone.
#[derive(Clone)]
pub(crate) struct SqliteStore {
    jobs: std_mpsc::Sender<Job>,
    path: PathBuf,
    health: Arc<Health>,
}

/// How a store is opened.
pub(crate) enum Opening {
    /// An existing, migrated database for reading only, nothing replayed.
    ReadOnly,
    /// Checked before it is handed out.
    Checked,
    /// Handed out at once when its schema is current; the checks run on their own thread
    /// (after `hook`, for tests) and every write waits for them (`gate.rs`).
    Gated(Option<CheckHook>),
}

impl SqliteStore {
    /// Opens (creating if needed) the database, checks it (`quick_check`, the sealing
    /// keys), applies migrations, takes the instance lock, replays the recovery files of
    /// dead processes, and starts the worker thread; `opening` says what is done before it
    /// is handed out.
    pub async fn start(
        opts: StoreOptions,
        owner: Arc<str>,
        health: Arc<Health>,
        opening: Opening,
    ) -> Result<SqliteStore, StoreError> {
        let (tx, rx) = std_mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = oneshot::channel();
        let path = opts.path.clone();
        let worker_health = health.clone();
        let worker_owner = owner.clone();
        let checks_tx = tx.clone();
        let runtime = tokio::runtime::Handle::try_current().ok();
        std::thread::Builder::new()
            .name("refreshd-store".into())
            .spawn(move || {
                let prepared = match opening {
                    Opening::ReadOnly => prepare_read_only(&opts).map(|c| (c, None)),
                    Opening::Checked => {
                        prepare(&opts, &worker_owner, &worker_health).map(|(c, i)| (c, Some(i)))
                    }
                    Opening::Gated(hook) => {
                        prepare_gated(&opts, &worker_owner, &worker_health, hook, checks_tx)
                            .map(|(c, i)| (c, Some(i)))
                    }
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
                let mut closers = Worker::new(&opts, &worker_owner, instance, worker_health, runtime)
                    .run(&mut conn, &rx);
                // `close` answers only once the connection is closed: SQLite's last checkpoint
                // done and, when no other connection has the file, the WAL removed, so a
                // store opened right after does not meet this one's locks.
                if let Err((_, e)) = conn.close() {
                    tracing::warn!(event = "store_close_failed", path = %opts.path.display(), error = %e,
                        "closing the database connection failed; the system releases it when the process ends, and the next start reads what was committed from the WAL, as after a crash");
                }
                closers.extend(rx.try_iter().filter_map(Job::into_close));
                drop(rx);
                for done in closers {
                    let _ = done.send(());
                }
            })
            .map_err(|e| StoreError::Create {
                path: path.clone(),
                source: e,
            })?;
        ready_rx.await.map_err(|_| StoreError::Closed)??;
        Ok(SqliteStore {
            jobs: tx,
            path,
            health,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the worker thread with the connection, in the caller's span, once the
    /// start-up checks passed (it may write).
    pub async fn call<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<R, StoreError> + Send + 'static,
    {
        self.send_call(f, Job::Call).await
    }

    /// Runs `f`, which only reads, on the worker thread, even while the start-up checks
    /// run: the connection is `query_only` until they pass, so a write in `f` fails.
    pub async fn read<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<R, StoreError> + Send + 'static,
    {
        self.send_call(f, Job::Read).await
    }

    async fn send_call<R, F>(&self, f: F, job: fn(Call, Span) -> Job) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<R, StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let call = Box::new(move |c: Result<&mut Connection, StoreError>| {
            let _ = tx.send(c.and_then(f));
        });
        self.send(job(call, Span::current()))?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Sends a job; a write is refused at once when the start-up checks failed.
    fn send(&self, job: Job) -> Result<(), StoreError> {
        if !matches!(job, Job::Read(..) | Job::Close(_))
            && let Some(refused) = self.health.checks.refusal()
        {
            return Err(refused);
        }
        self.jobs.send(job).map_err(|_| StoreError::Closed)
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

    /// Hands one outcome to the group commit.
    pub async fn record(&self, outcome: Outcome) -> Result<Recorded, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(Job::Record(outcome, tx, Span::current()))?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Leases due accounts; answered once the leases are durable, possibly by the commit of
    /// a group of outcomes.
    pub async fn claim(&self, claim: Claim) -> Result<Vec<Account>, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(Job::Claim(claim, tx, Span::current()))?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Finishes queued work (retrying deferred commits a few times; what still fails waits
    /// in the recovery file) and stops the worker; returns once its connection is closed.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.jobs.send(Job::Close(tx)).is_ok() {
            let _ = rx.await;
        }
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
    health: &Health,
    lock: &instance::StoreLock,
) -> Result<(), StoreError> {
    let dead = instance::dead_owners(db, own, lock);
    for path in recovery::orphans(db, own) {
        replay(conn, keys, &path)?;
    }
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

/// While commits are deferred, a job first retries them, at most this often.
const RETRY_BEFORE_JOB: Duration = Duration::from_millis(250);
/// How often the worker checks the database file is still the one it opened and looks
/// for dead processes' leases and recovery files.
pub const WATCH_EVERY: Duration = Duration::from_secs(1);
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
    /// The start-up checks have not ended: writes wait in `held`, in their order.
    gated: bool,
    held: Vec<Job>,
    /// Started at the first group commit (`checkpoint.rs`); None when it could not start
    /// (then the worker checkpoints as SQLite does by default).
    checkpointer: Option<checkpoint::Checkpointer>,
    checkpointer_tried: bool,
    /// The runtime of the store's opener, which sends the answers of committed groups.
    runtime: Option<tokio::runtime::Handle>,
}

impl Worker {
    fn new(
        opts: &StoreOptions,
        owner: &str,
        instance: Option<instance::Instance>,
        health: Arc<Health>,
        runtime: Option<tokio::runtime::Handle>,
    ) -> Self {
        let log = if instance.is_some() {
            recovery::RecoveryLog::open(recovery::owner_recovery_path(&opts.path, owner))
        } else {
            recovery::RecoveryLog::unopened(recovery::owner_recovery_path(&opts.path, owner))
        };
        let gated = health.checks.state() == crate::store::gate::Checks::Pending;
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
            gated,
            held: Vec::new(),
            checkpointer: None,
            checkpointer_tried: false,
            runtime,
        }
    }

    /// Serves jobs until a `close` or until every handle is gone; returns the answers of
    /// the `close` calls it took, to be sent once the connection is closed.
    fn run(
        mut self,
        conn: &mut Connection,
        rx: &std_mpsc::Receiver<Job>,
    ) -> Vec<oneshot::Sender<()>> {
        let mut stash: Vec<Job> = Vec::new();
        loop {
            if self.instance.is_some() && !self.gated && self.last_watch.elapsed() >= WATCH_EVERY {
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
            let Some(job) = self.at_gate(conn, job, &mut stash) else {
                continue;
            };
            // Deferred rotations go first: nothing else should see the rows they update.
            if !self.deferrals.is_empty()
                && (matches!(job, Job::Call(..) | Job::Claim(..))
                    || self.last_retry.elapsed() >= RETRY_BEFORE_JOB)
            {
                self.retry_deferred(conn);
            }
            match job {
                Job::Call(f, span) | Job::Read(f, span) => span.in_scope(|| f(Ok(conn))),
                Job::Checked(_) => unreachable!("answered at the gate"),
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
                    let waiting = stash.into_iter().filter_map(Job::into_close);
                    return std::iter::once(done).chain(waiting).collect();
                }
                Job::Record(..) | Job::Claim(..) => {
                    let (mut batch, mut claim) = (Vec::new(), None);
                    let mut next = Some(job);
                    // Group commit: take every outcome already waiting and one claim; keep
                    // other jobs, in order, for after the commit.
                    let mut later = Vec::new();
                    while batch.len() < MAX_GROUP {
                        let job = match next.take() {
                            Some(j) => j,
                            None => match rx.try_recv() {
                                Ok(j) => j,
                                Err(_) => break,
                            },
                        };
                        match job {
                            Job::Record(o, r, s) => batch.push((o, r, s)),
                            Job::Claim(c, r, s) if claim.is_none() => claim = Some((c, r, s)),
                            other => later.push(other),
                        }
                    }
                    self.commit_spanned(conn, batch, claim);
                    // `stash` is popped from the end.
                    later.reverse();
                    stash.extend(later);
                }
            }
        }
        self.retry_deferred(conn);
        self.finish();
        Vec::new()
    }

    /// The write gate (`gate.rs`), the one place that decides whether a job may write: a
    /// read runs at once; a write waits while the start-up checks run and is refused when
    /// they failed. Returns the job when it may run now.
    fn at_gate(&mut self, conn: &mut Connection, job: Job, stash: &mut Vec<Job>) -> Option<Job> {
        match job {
            Job::Read(f, span) => {
                // Deferred rotations go first: a read must not see the rows they update.
                if !self.gated && !self.deferrals.is_empty() {
                    self.retry_deferred(conn);
                }
                span.in_scope(|| f(Ok(conn)))
            }
            Job::Checked(result) => self.checks_ended(conn, result, stash),
            Job::Close(_) => return Some(job),
            job if self.gated => {
                self.deferrals.health.checks.note_held();
                self.held.push(job)
            }
            job => match self.deferrals.health.checks.refusal() {
                Some(refused) => refuse(job, refused),
                None => return Some(job),
            },
        }
        None
    }

    /// The checks ended: when they passed, writes are allowed, dead processes' work is
    /// taken over (their recovery files replayed), and the held jobs run, in order; when
    /// they failed, the held jobs are refused and the connection stays `query_only`.
    fn checks_ended(
        &mut self,
        conn: &mut Connection,
        result: Result<Duration, StoreError>,
        stash: &mut Vec<Job>,
    ) {
        self.gated = false;
        let opts = self.options();
        let result = result.and_then(|took| {
            set_query_only(conn, &self.db, false)?;
            let lock = instance::StoreLock::acquire(&self.db)?;
            take_over_dead(conn, &opts, &self.owner, &self.deferrals.health, &lock)?;
            Ok(took)
        });
        let held = std::mem::take(&mut self.held);
        match result {
            Ok(took) => {
                self.deferrals.health.checks.pass(took);
                // A held claim carries the `now` (and lease end) of when it was sent, which
                // the checks may have outlasted: it is answered empty, and the engine,
                // woken once the checks pass, claims again with the time of then.
                let held = held.into_iter().filter_map(|job| match job {
                    Job::Claim(_, reply, _) => {
                        let _ = reply.send(Ok(Vec::new()));
                        None
                    }
                    job => Some(job),
                });
                // `stash` is popped from the end.
                stash.extend(held.collect::<Vec<_>>().into_iter().rev());
            }
            Err(e) => {
                let _ = set_query_only(conn, &self.db, true);
                self.deferrals.health.checks.fail(e);
                for job in held {
                    if let Some(refused) = self.deferrals.health.checks.refusal() {
                        refuse(job, refused);
                    }
                }
            }
        }
    }

    /// The options this store was opened with.
    fn options(&self) -> StoreOptions {
        StoreOptions {
            path: self.db.clone(),
            busy_timeout: self.busy_timeout,
            keyring: self.keys.clone(),
            postgres: None,
        }
    }

    /// A stop: the checkpoint thread ends, the own recovery file goes when empty, the
    /// instance lock with its file.
    fn finish(&mut self) {
        self.checkpointer = None;
        commit::stop(&mut self.instance, &mut self.deferrals, &self.db);
    }

    /// Whether the database this process opened is gone or replaced; the first time it is
    /// seen, it is logged and marked lost at once, so no later job of this worker (a retry of
    /// deferred rotations, a claim) writes into the unlinked file.
    fn note_lost(&self) -> Option<String> {
        if let Some(lost) = self.deferrals.health.lost() {
            return Some(lost);
        }
        self.instance.as_ref()?;
        let message = vanished(&self.db, self.identity)?;
        tracing::error!(event = "store_vanished", path = %self.db.display(), message = %message,
            "the database file this process opened is gone or replaced: stopping; restore it and start again (see docs/src/durability.md)");
        *self.deferrals.health.lost.lock().expect("not poisoned") = Some(message.clone());
        Some(message)
    }

    /// Notices a deleted or replaced database, and takes over dead processes' work.
    fn watch(&mut self, conn: &mut Connection) {
        self.last_watch = std::time::Instant::now();
        if self.note_lost().is_some() {
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

    /// Commits a group in the span of its outcome when it has one outcome (a group of
    /// several belongs to no one account), with the claim in the same transaction when the
    /// store is healthy and nothing is deferred (deferred rotations are retried first, as
    /// before any other job). The claim is answered only after its transaction committed.
    fn commit_spanned(
        &mut self,
        conn: &mut Connection,
        batch: Vec<(Outcome, Reply, Span)>,
        claim: Option<PendingClaim>,
    ) {
        let span = match &batch[..] {
            [(_, _, one)] => one.clone(),
            _ => Span::none(),
        };
        let batch: Vec<(Outcome, Reply)> = batch.into_iter().map(|(o, r, _)| (o, r)).collect();
        let healthy = self.deferrals.is_empty() && self.deferrals.health.lost().is_none();
        let claim = match claim {
            Some((c, reply, claim_span)) if healthy && !batch.is_empty() => {
                let unanswered =
                    span.in_scope(|| self.commit_group(conn, batch, Some((&c, reply))));
                // The group's transaction failed: the claim runs alone.
                unanswered.map(|reply| (c, reply, claim_span))
            }
            other => {
                if !batch.is_empty() {
                    span.in_scope(|| self.commit_group(conn, batch, None));
                }
                other
            }
        };
        if let Some((c, reply, claim_span)) = claim {
            if !self.deferrals.is_empty() {
                self.retry_deferred(conn);
            }
            let result = match self.deferrals.health.lost() {
                // A lost store is never written to, not even a lease.
                Some(message) => Err(StoreError::Lost {
                    path: self.db.clone(),
                    message,
                }),
                None => claim_span.in_scope(|| claim::run(conn, &self.keys, &c)),
            };
            let _ = reply.send(result);
        }
    }

    /// Commits a group (with `claim`, when given). Once the transaction committed, the claim
    /// is answered first (its accounts are the pipeline's next requests, which the outcomes'
    /// answers only end), then the outcomes. Returns the claim's reply when the claim did not
    /// run (the transaction failed).
    fn commit_group(
        &mut self,
        conn: &mut Connection,
        batch: Vec<(Outcome, Reply)>,
        claim: Option<(&Claim, ClaimReply)>,
    ) -> Option<ClaimReply> {
        let (claim, mut reply) = claim.unzip();
        let lost = self.note_lost();
        let result = match &lost {
            Some(message) => Err(StoreError::Lost {
                path: self.db.clone(),
                message: message.clone(),
            }),
            None => {
                let outcomes: Vec<&Outcome> = batch.iter().map(|(o, _)| o).collect();
                self.set_wait(conn, COMMIT_WAIT);
                let r = claim::commit_group(conn, &self.keys, &outcomes, claim);
                self.set_wait(conn, self.busy_timeout);
                r
            }
        };
        if result.is_ok() {
            self.committed(conn);
        }
        let result = result.map(|(recorded, claimed)| {
            if let (Some(claimed), Some(reply)) = (claimed, reply.take()) {
                let _ = reply.send(claimed);
            }
            recorded
        });
        let runtime = self.runtime.as_ref();
        let deliver = |answers| commit::answer_on(runtime, answers);
        if let Some(batch) =
            commit::settle(&mut self.deferrals, batch, result, lost.is_some(), deliver)
        {
            for one in batch {
                self.commit_group(conn, vec![one], None);
            }
        }
        reply
    }

    /// A group committed: the checkpoint thread is told, started first if it is not yet (a
    /// store opened by this process, once its checks passed and it wrote).
    fn committed(&mut self, conn: &Connection) {
        if !self.checkpointer_tried && self.instance.is_some() {
            self.checkpointer_tried = true;
            let opts = self.options();
            match checkpoint::Checkpointer::start(&opts, conn) {
                Ok(c) => self.checkpointer = Some(c),
                Err(e) => {
                    tracing::warn!(event = "checkpointer_not_started", error = %e, "cannot start the WAL checkpoint thread; the store thread checkpoints itself, as SQLite does by default")
                }
            }
        }
        if let Some(c) = &self.checkpointer {
            c.committed();
        }
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
        let result = apply_recovered(conn, &self.keys, &self.deferrals.pending);
        self.set_wait(conn, self.busy_timeout);
        commit::settle_retry(&mut self.deferrals, result);
    }
}

/// Answers a write the gate refuses.
fn refuse(job: Job, refused: StoreError) {
    match job {
        Job::Call(f, _) | Job::Read(f, _) => f(Err(refused)),
        Job::Record(_, reply, _) => {
            let _ = reply.send(Err(refused));
        }
        Job::Claim(_, reply, _) => {
            let _ = reply.send(Err(refused));
        }
        _ => {}
    }
}

/// Commits whatever a dead process could not, then removes its file.
fn replay(conn: &mut Connection, keys: &Keyring, path: &Path) -> Result<(), StoreError> {
    let Some(outcomes) = recovery::read(path, keys)? else {
        return Ok(());
    };
    let (applied, refused) = apply_recovered(conn, keys, &outcomes)?;
    recovery::replayed(path, keys, outcomes.len(), applied, &refused)
}

fn sql_err(context: &'static str) -> impl Fn(rusqlite::Error) -> StoreError {
    move |source| StoreError::Sqlite { context, source }
}

/// Commits deferred rotations in one transaction, each under its own savepoint. A rotation
/// already in the database (the process died after committing but before removing the
/// file) is skipped. One the database refuses for good (not a passing failure) is returned
/// with its error instead of failing the others; a passing failure fails the whole call.
fn apply_recovered(
    conn: &mut Connection,
    keys: &Keyring,
    outcomes: &[Outcome],
) -> Result<(usize, Vec<(Outcome, String)>), StoreError> {
    let ctx = "replay rotations that could not be committed";
    let mut tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql_err(ctx))?;
    let mut applied = 0;
    let mut refused = Vec::new();
    for o in outcomes {
        if recovery::already_committed(o, queries::get(&tx, keys, o.account_id())?.as_ref()) {
            continue;
        }
        let sp = tx.savepoint().map_err(sql_err(ctx))?;
        match writes::record(&sp, keys, o) {
            Ok(r) => {
                sp.commit().map_err(sql_err(ctx))?;
                if r == Recorded::Applied {
                    applied += 1;
                }
            }
            Err(e) if !e.is_transient() => {
                drop(sp);
                refused.push((o.clone(), e.to_string()));
            }
            Err(e) => return Err(e),
        }
    }
    tx.commit().map_err(sql_err(ctx))?;
    Ok((applied, refused))
}

#[cfg(test)]
mod tests;
