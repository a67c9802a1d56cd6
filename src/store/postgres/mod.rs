//! The PostgreSQL backend: the same accounts table and refresh log, the same semantics as
//! SQLite's (leases, generation-guarded writes, group commit, recovery file), for several
//! replicas sharing one database. This file holds the pool and the group-commit task;
//! `queries.rs`, `reports.rs` and `writes.rs` the SQL, `schema.rs` the migrations,
//! `errors.rs` what a PostgreSQL error becomes, `durability.rs` the settings that make a
//! commit durable (`synchronous_commit` on for every session, `fsync` checked at open).
//! Claims use `FOR UPDATE SKIP LOCKED`, so replicas never wait on each other's rows;
//! migrations run under an advisory lock, so replicas starting together do not race. A lost
//! connection is a transient error: the pool reconnects on the next use. Each replica's
//! liveness lock (`liveness.rs`) lets the others take a dead one's leases.
//!
//! The group-commit task (`Worker`) keeps up to `COMMITS_IN_FLIGHT` group commits in
//! flight, each on a pooled connection of its own; `step` says when the next may start. A
//! connection whose failed group could not be rolled back is taken out of the pool.

mod durability;
mod errors;
pub(crate) mod group;
pub(crate) mod liveness;
pub(crate) mod queries;
pub(crate) mod reports;
pub mod schema;
pub(crate) mod writes;

pub use errors::{describe, describe_error, is_transient};
pub(crate) use errors::{pg_err, pool_err};
pub use schema::MIGRATIONS;

use crate::crypto::Keyring;
use crate::store::commit::{self, CLOSE_RETRIES, CLOSE_RETRY_EVERY, MAX_GROUP, RETRY_EVERY};
use crate::store::deferred::{Deferrals, Health};
use crate::store::error::{Refusal, StoreError};
use crate::store::instance;
use crate::store::recovery;
use crate::store::types::{Outcome, Recorded, Reply};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime, Transaction};
use secrecy::{ExposeSecret, SecretString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::NoTls;
use tracing::{Instrument, Span};

/// A job for the group-commit task, with the span of the caller that sent it.
#[allow(clippy::large_enum_variant)] // Nearly every job is a record; boxing would cost each.
enum Job {
    Record(Outcome, Reply, Span),
    Close(oneshot::Sender<()>),
}

/// Handle to a PostgreSQL store: a connection pool plus the group-commit task.
pub struct PgStore {
    pool: Pool,
    jobs: mpsc::UnboundedSender<Job>,
    describe: String,
    /// Ends the liveness task, and with its connection the lock (None when read-only).
    liveness_stop: Mutex<Option<oneshot::Sender<()>>>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PgStore({})", self.describe)
    }
}

impl PgStore {
    /// Connects, migrates (unless `read_only`), checks the keys, replays the recovery file
    /// (unless `read_only`) and starts the group-commit task.
    pub(crate) async fn open(
        url: &SecretString,
        pool_size: usize,
        keys: Keyring,
        db: &Path,
        owner: &str,
        read_only: bool,
        health: Arc<Health>,
    ) -> Result<PgStore, StoreError> {
        let describe = describe(url.expose_secret());
        let mut config: tokio_postgres::Config =
            url.expose_secret()
                .parse()
                .map_err(|e| StoreError::PgConnect {
                    url: describe.clone(),
                    message: format!("invalid URL: {e}"),
                })?;
        if read_only {
            // The server refuses writes, as SQLite's read-only open does.
            add_startup_setting(&mut config, "default_transaction_read_only=on");
        }
        // Every session commits durably, whatever the server's, database's or role's default.
        durability::require_synchronous_commit(&mut config, &describe)?;
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        // sslmode=require: TLS, with the server's certificate checked against the system's
        // trust store (SSL_CERT_FILE may name another bundle). Otherwise the connection is
        // plain, as for a server on loopback, a Unix socket or a private network.
        // The liveness lock's connection is made the same way, outside the pool.
        let lock_config = config.clone();
        let (manager, connect): (Manager, liveness::Connect) =
            if config.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
                use rustls_platform_verifier::ConfigVerifierExt;
                let tls = rustls::ClientConfig::with_platform_verifier().map_err(|e| {
                    StoreError::PgConnect {
                        url: describe.clone(),
                        message: format!("cannot set up TLS: {e}"),
                    }
                })?;
                let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls);
                let lock_tls = tls.clone();
                (
                    Manager::from_config(config, tls, manager_config),
                    Arc::new(move || {
                        let (config, tls) = (lock_config.clone(), lock_tls.clone());
                        Box::pin(async move {
                            let (client, conn) = config.connect(tls).await?;
                            tokio::spawn(conn);
                            Ok(client)
                        })
                    }),
                )
            } else {
                (
                    Manager::from_config(config, NoTls, manager_config),
                    Arc::new(move || {
                        let config = lock_config.clone();
                        Box::pin(async move {
                            let (client, conn) = config.connect(NoTls).await?;
                            tokio::spawn(conn);
                            Ok(client)
                        })
                    }),
                )
            };
        // Room for the commits in flight and a claim (see COMMITS_IN_FLIGHT); the liveness
        // lock's connection is outside the pool.
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(COMMITS_IN_FLIGHT + 1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(30)))
            .create_timeout(Some(Duration::from_secs(10)))
            .build()
            .map_err(|e| StoreError::PgConnect {
                url: describe.clone(),
                message: e.to_string(),
            })?;
        // The first connection says whether the server is there at all: name it plainly.
        let mut client = pool.get().await.map_err(|e| StoreError::PgConnect {
            url: describe.clone(),
            message: e.to_string(),
        })?;
        if read_only {
            let v = schema::schema_version(&**client).await?;
            if v != schema::MIGRATIONS.len() {
                return Err(Refusal::SchemaBehind {
                    store: describe,
                    version: v as i64,
                    current: schema::MIGRATIONS.len(),
                }
                .into());
            }
        } else {
            durability::check(&**client, &describe).await?;
            schema::migrate(&mut client)
                .await
                .map_err(|(version, e)| StoreError::PgMigration {
                    url: describe.clone(),
                    version,
                    message: describe_error(&e),
                })?;
        }
        for key_id in queries::sealing_key_ids(&**client).await? {
            if !keys.knows(&key_id) {
                return Err(StoreError::MissingKey {
                    path: PathBuf::from(&describe),
                    key_id,
                    configured: keys.describe(),
                });
            }
        }
        if read_only {
            drop(client);
            let (jobs, rx) = mpsc::unbounded_channel();
            let log = recovery::RecoveryLog::unopened(recovery::owner_recovery_path(db, owner));
            tokio::spawn(
                Worker {
                    pool: pool.clone(),
                    keys: keys.clone(),
                    deferrals: Deferrals::new(log, keys.clone(), health),
                    instance: None,
                    db: db.to_path_buf(),
                }
                .run(rx),
            );
            return Ok(PgStore {
                pool,
                jobs,
                describe,
                liveness_stop: Mutex::new(None),
            });
        }
        let liveness = liveness::Liveness::start(connect, owner, &describe, health.clone())
            .await
            .map_err(|message| StoreError::PgConnect {
                url: describe.clone(),
                message: format!("cannot take this replica's liveness lock: {message}"),
            })?;
        // Recovery files and instance locks sit beside store.path: replicas on one host
        // sharing it take over each other's work as SQLite processes do.
        let lock = instance::StoreLock::acquire(db)?;
        let me = instance::Instance::acquire(db, owner, &lock)?;
        let mut c = client;
        for path in recovery::orphans(db, owner) {
            if let Some(outcomes) = recovery::read(&path, &keys)? {
                let (applied, refused) = apply_recovered(&mut c, &keys, &outcomes).await?;
                recovery::replayed(&path, &keys, outcomes.len(), applied, &refused)?;
            }
        }
        let dead = instance::dead_owners(db, owner, &lock);
        for o in &dead {
            instance::forget(db, o, &lock);
        }
        health
            .dead_owners
            .lock()
            .expect("not poisoned")
            .extend(dead);
        drop(lock);
        drop(c);
        let (jobs, rx) = mpsc::unbounded_channel();
        let log = recovery::RecoveryLog::open(recovery::owner_recovery_path(db, owner));
        tokio::spawn(
            Worker {
                pool: pool.clone(),
                keys: keys.clone(),
                deferrals: Deferrals::new(log, keys.clone(), health),
                instance: Some(me),
                db: db.to_path_buf(),
            }
            .run(rx),
        );
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(liveness.run(stopped));
        Ok(PgStore {
            pool,
            jobs,
            describe,
            liveness_stop: Mutex::new(Some(stop)),
        })
    }

    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// Runs `f` in one transaction on a pooled connection; commits when it returns Ok.
    pub async fn in_tx<R>(
        &self,
        context: &'static str,
        f: impl AsyncFnOnce(&Transaction<'_>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let mut client = self.pool.get().await.map_err(pool_err(context))?;
        let tx = client.transaction().await.map_err(pg_err(context))?;
        let r = f(&tx).await?;
        tx.commit().await.map_err(pg_err(context))?;
        Ok(r)
    }

    /// Hands one outcome to the group-commit task, with the caller's span.
    pub async fn record(&self, outcome: Outcome) -> Result<Recorded, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Job::Record(outcome, tx, Span::current()))
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.jobs.send(Job::Close(tx)).is_ok() {
            let _ = rx.await;
        }
        // Stopped cleanly: our leases are released or recorded, the lock may go.
        self.liveness_stop.lock().expect("not poisoned").take();
    }

    /// A pooled connection, for one query (`context` names it in errors), `store copy` and
    /// tests.
    pub(crate) async fn client(
        &self,
        context: &'static str,
    ) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(pool_err(context))
    }
}

/// Group commits in flight at once, each on a pooled connection of its own: while one waits
/// for the server's fsync of its COMMIT, the next is sent. With this many held by commits
/// the pool must still have a connection for claims and reads: `open` raises a smaller
/// `store.pool_size` to `COMMITS_IN_FLIGHT + 1`. A commit finding every connection taken
/// waits for one (up to the pool's wait timeout), as a claim does.
pub(crate) const COMMITS_IN_FLIGHT: usize = 2;

/// What the worker does with the group it holds, given the accounts of the commits in
/// flight (`in_flight`, one list each), the group's (`group`), each sorted and without
/// repeats, and whether rotations are deferred. The rules keep what one commit at a time
/// guaranteed:
/// - deferred rotations are retried before the next group, with nothing in flight ("nothing
///   else should see the rows they update"), so with some pending the group waits for the
///   commits in flight to settle, then `Retry` (and the group starts whatever the retry did);
/// - a group naming an account of a commit in flight waits until that commit has settled:
///   its guards must see the earlier write (and both would lock the row). Groups on disjoint
///   accounts may commit in either order, and never wait on each other's row locks;
/// - at most `COMMITS_IN_FLIGHT` at once.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Start,
    Retry,
    Wait,
}

fn step(in_flight: &[&[i64]], group: &[i64], deferred: bool) -> Step {
    if deferred {
        return if in_flight.is_empty() {
            Step::Retry
        } else {
            Step::Wait
        };
    }
    // Sorted lists: a binary search each, as a group holds up to MAX_GROUP accounts.
    let shares = |accounts: &&[i64]| accounts.iter().any(|a| group.binary_search(a).is_ok());
    if in_flight.len() >= COMMITS_IN_FLIGHT || in_flight.iter().any(shares) {
        Step::Wait
    } else {
        Step::Start
    }
}

/// A group taken from the channel: its outcomes with their callers, the span of its outcome
/// when it has one (a group of several belongs to no one account), its accounts.
struct Group {
    batch: Vec<(Outcome, Reply)>,
    span: Span,
    /// Each outcome's caller's span, in `batch`'s order: a group split into single commits
    /// runs each in its own.
    spans: Vec<Span>,
    accounts: Vec<i64>,
}

impl Group {
    fn new(batch: Vec<(Outcome, Reply, Span)>) -> Group {
        let span = match &batch[..] {
            [(_, _, one)] => one.clone(),
            _ => Span::none(),
        };
        let (batch, spans): (Vec<(Outcome, Reply)>, Vec<Span>) =
            batch.into_iter().map(|(o, r, s)| ((o, r), s)).unzip();
        let mut accounts: Vec<i64> = batch.iter().map(|(o, _)| o.account_id()).collect();
        accounts.sort_unstable();
        accounts.dedup();
        Group {
            batch,
            span,
            spans,
            accounts,
        }
    }
}

/// A group commit in flight: its accounts, and the commit, which gives the group back with
/// its result.
struct InFlight {
    accounts: Vec<i64>,
    commit: futures::future::BoxFuture<'static, (Group, Result<Vec<Recorded>, StoreError>)>,
}

impl std::future::Future for InFlight {
    type Output = (Group, Result<Vec<Recorded>, StoreError>);

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        self.commit.as_mut().poll(cx)
    }
}

/// How the worker's loop ends: a `close` (answered once everything settled), or the channel
/// closed (every handle dropped).
enum Closing {
    Close(oneshot::Sender<()>),
    Dropped,
}

/// The group-commit task: outcomes that arrive together share one transaction, and up to
/// `COMMITS_IN_FLIGHT` transactions run at once (`step` says when the next may start). What
/// a commit's result does (answers, deferrals, a group split) is settled here, in the loop,
/// one commit at a time; the commits in flight only run their transactions.
struct Worker {
    pool: Pool,
    keys: Keyring,
    deferrals: Deferrals,
    /// This process's instance lock (None when read-only).
    instance: Option<instance::Instance>,
    db: PathBuf,
}

impl Worker {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Job>) {
        use futures::StreamExt;
        let mut in_flight = futures::stream::FuturesUnordered::<InFlight>::new();
        let mut next: Option<Group> = None;
        let mut closing: Option<Closing> = None;
        loop {
            if let Some(group) = next.take() {
                let next_step = {
                    let flying: Vec<&[i64]> = in_flight.iter().map(|f| &f.accounts[..]).collect();
                    step(&flying, &group.accounts, !self.deferrals.is_empty())
                };
                match next_step {
                    Step::Wait => next = Some(group),
                    Step::Retry => {
                        // Deferred rotations go first: nothing else should see the rows
                        // they update.
                        self.retry_deferred().await;
                        in_flight.push(self.start(group));
                        continue;
                    }
                    Step::Start => {
                        in_flight.push(self.start(group));
                        continue;
                    }
                }
            }
            if next.is_none()
                && let Some(closing) = closing.take()
            {
                // Every commit in flight settles (its callers answered) before the stop.
                while let Some(done) = in_flight.next().await {
                    self.settled(done, &mut in_flight).await;
                }
                match closing {
                    Closing::Close(done) => {
                        self.close_retries().await;
                        self.finish();
                        let _ = done.send(());
                    }
                    Closing::Dropped => {
                        self.retry_deferred().await;
                        self.finish();
                    }
                }
                return;
            }
            // Something to wait for: a group held (`next`) waits only behind a commit in
            // flight, and with no group held the channel is read.
            tokio::select! {
                Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                    self.settled(done, &mut in_flight).await;
                }
                // Only while a commit could start: outcomes arriving meanwhile wait in the
                // channel and join the next group rather than form one that cannot start.
                job = rx.recv(), if next.is_none() && in_flight.len() < COMMITS_IN_FLIGHT => match job {
                    None => closing = Some(Closing::Dropped),
                    Some(Job::Close(done)) => closing = Some(Closing::Close(done)),
                    Some(Job::Record(o, reply, span)) => {
                        let mut batch = vec![(o, reply, span)];
                        while batch.len() < MAX_GROUP {
                            match rx.try_recv() {
                                Ok(Job::Record(o, r, s)) => batch.push((o, r, s)),
                                Ok(Job::Close(d)) => {
                                    closing = Some(Closing::Close(d));
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                        next = Some(Group::new(batch));
                    }
                },
                _ = tokio::time::sleep(RETRY_EVERY),
                    if !self.deferrals.is_empty() && in_flight.is_empty() && next.is_none() =>
                {
                    self.retry_deferred().await;
                }
            }
        }
    }

    /// A stop: the own recovery file goes when empty, the instance lock with its file.
    fn finish(&mut self) {
        commit::stop(&mut self.instance, &mut self.deferrals, &self.db);
    }

    /// The commit of `group` on a pooled connection of its own, in the group's span.
    fn start(&self, group: Group) -> InFlight {
        let (pool, keys) = (self.pool.clone(), self.keys.clone());
        let span = group.span.clone();
        InFlight {
            accounts: group.accounts.clone(),
            commit: Box::pin(
                async move {
                    let outcomes: Vec<&Outcome> = group.batch.iter().map(|(o, _)| o).collect();
                    let result = commit_on(&pool, &keys, &outcomes).await;
                    (group, result)
                }
                .instrument(span),
            ),
        }
    }

    /// Settles a commit that completed: its callers are answered, its failure deferred. A
    /// group that comes back (one outcome may be bad) waits for the other commits in flight
    /// to settle, then its outcomes are committed one at a time, with nothing else in flight.
    async fn settled(
        &mut self,
        (group, result): (Group, Result<Vec<Recorded>, StoreError>),
        in_flight: &mut futures::stream::FuturesUnordered<InFlight>,
    ) {
        use futures::StreamExt;
        let mut split = std::collections::VecDeque::new();
        split.extend(self.settle(group, result));
        if split.is_empty() {
            return;
        }
        while let Some((group, result)) = in_flight.next().await {
            split.extend(self.settle(group, result));
        }
        while let Some(batch) = split.pop_front() {
            for one in batch {
                let (group, result) = self.start(Group::new(vec![one])).await;
                split.extend(self.settle(group, result));
            }
        }
    }

    /// `commit::settle` in the group's span; the group back when it is to be split.
    fn settle(
        &mut self,
        group: Group,
        result: Result<Vec<Recorded>, StoreError>,
    ) -> Option<Vec<(Outcome, Reply, Span)>> {
        let _in = group.span.enter();
        let back = commit::settle(
            &mut self.deferrals,
            group.batch,
            result,
            false,
            commit::answer,
        );
        // A group comes back as it went in: each outcome meets its span again.
        back.map(|batch| {
            batch
                .into_iter()
                .zip(group.spans)
                .map(|((o, r), s)| (o, r, s))
                .collect()
        })
    }

    /// A few more tries before closing: what is still deferred after them waits for the
    /// next start in the recovery file.
    async fn close_retries(&mut self) {
        for _ in 0..CLOSE_RETRIES {
            self.retry_deferred().await;
            if self.deferrals.is_empty() {
                break;
            }
            tokio::time::sleep(CLOSE_RETRY_EVERY).await;
        }
    }

    async fn retry_deferred(&mut self) {
        if self.deferrals.is_empty() {
            return;
        }
        let result = match self.pool.get().await {
            Ok(mut c) => apply_recovered(&mut c, &self.keys, &self.deferrals.pending).await,
            Err(e) => Err(pool_err("retry deferred rotations")(e)),
        };
        commit::settle_retry(&mut self.deferrals, result);
    }
}

/// Commits `outcomes` (`group::commit`) on a connection from `pool`. The pool owns its
/// connections: one whose failed group could not be rolled back is taken out of it (and
/// closed when dropped), as it may still be inside the group's transaction.
pub(crate) async fn commit_on(
    pool: &Pool,
    keys: &Keyring,
    outcomes: &[&Outcome],
) -> Result<Vec<Recorded>, StoreError> {
    let client = pool
        .get()
        .await
        .map_err(pool_err("commit refresh outcomes"))?;
    let finished = group::commit(&client, keys, outcomes).await;
    if !finished.reusable {
        drop(deadpool_postgres::Object::take(client));
    }
    finished.result
}

/// Appends `-c name=value` to the startup options of the sessions `config` opens (after the
/// URL's own, so it is the one that holds).
fn add_startup_setting(config: &mut tokio_postgres::Config, setting: &str) {
    let options = format!("{} -c {setting}", config.get_options().unwrap_or(""));
    config.options(options.trim());
}

/// Commits deferred rotations, each under its own savepoint; see SQLite's.
async fn apply_recovered(
    client: &mut deadpool_postgres::Object,
    keys: &Keyring,
    outcomes: &[Outcome],
) -> Result<(usize, Vec<(Outcome, String)>), StoreError> {
    let ctx = "replay rotations that could not be committed";
    let mut tx = client.transaction().await.map_err(pg_err(ctx))?;
    let mut applied = 0;
    let mut refused = Vec::new();
    for o in outcomes {
        let current = queries::get(&*tx, keys, o.account_id()).await?;
        if recovery::already_committed(o, current.as_ref()) {
            continue;
        }
        let sp = tx.transaction().await.map_err(pg_err(ctx))?;
        match writes::record(&sp, keys, o).await {
            Ok(r) => {
                sp.commit().await.map_err(pg_err(ctx))?;
                if r == Recorded::Applied {
                    applied += 1;
                }
            }
            Err(e) if !e.is_transient() => {
                sp.rollback().await.map_err(pg_err(ctx))?;
                refused.push((o.clone(), e.to_string()));
            }
            Err(e) => return Err(e),
        }
    }
    tx.commit().await.map_err(pg_err(ctx))?;
    Ok((applied, refused))
}

#[cfg(test)]
mod tests {
    use super::{COMMITS_IN_FLIGHT, Step, step};

    #[test]
    fn a_group_starts_beside_commits_on_other_accounts_up_to_the_limit() {
        assert_eq!(step(&[], &[1, 2], false), Step::Start);
        assert_eq!(step(&[&[1, 2]], &[3], false), Step::Start);
        let full: Vec<&[i64]> = (0..COMMITS_IN_FLIGHT as i64)
            .map(|i| &[10, 20, 30, 40][i as usize..=i as usize])
            .collect();
        assert_eq!(step(&full, &[3], false), Step::Wait, "the limit");
    }

    #[test]
    fn a_group_naming_an_account_in_flight_waits_for_its_commit() {
        assert_eq!(step(&[&[1, 5]], &[5], false), Step::Wait);
        assert_eq!(step(&[&[1], &[7, 9]], &[2, 9], false), Step::Wait);
    }

    #[test]
    fn deferred_rotations_are_retried_first_with_nothing_in_flight() {
        assert_eq!(step(&[], &[1], true), Step::Retry);
        assert_eq!(
            step(&[&[2]], &[1], true),
            Step::Wait,
            "even beside a commit on other accounts"
        );
    }
}
