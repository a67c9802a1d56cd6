//! The PostgreSQL backend: the same accounts table and refresh log, the same semantics as
//! SQLite's (leases, generation-guarded writes, group commit, recovery file), for several
//! replicas sharing one database. This file holds the pool and the group-commit task;
//! `queries.rs`, `reports.rs` and `writes.rs` the SQL, `schema.rs` the migrations,
//! `errors.rs` what a PostgreSQL error becomes, `durability.rs` the settings that make a
//! commit durable (`synchronous_commit` on for every session, `fsync` checked at open).
//! Claims use `FOR UPDATE SKIP LOCKED`, so replicas never wait on each other's rows;
//! migrations run under an advisory lock, so replicas starting together do not race. A lost
//! connection is a transient error: the pool reconnects on the next use. Each replica's
//! liveness lock (`liveness.rs`) lets the others take a dead one's leases. A connection
//! whose failed group commit could not be rolled back is taken out of the pool.

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
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(2))
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

/// The group-commit task: outcomes that arrive together share one transaction.
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
        loop {
            let job = if self.deferrals.is_empty() {
                match rx.recv().await {
                    Some(j) => j,
                    None => break,
                }
            } else {
                match tokio::time::timeout(RETRY_EVERY, rx.recv()).await {
                    Ok(Some(j)) => j,
                    Ok(None) => break,
                    Err(_) => {
                        self.retry_deferred().await;
                        continue;
                    }
                }
            };
            match job {
                Job::Close(done) => {
                    self.close_retries().await;
                    self.finish();
                    let _ = done.send(());
                    return;
                }
                Job::Record(o, reply, span) => {
                    let mut batch = vec![(o, reply, span)];
                    let mut close = None;
                    while batch.len() < MAX_GROUP {
                        match rx.try_recv() {
                            Ok(Job::Record(o, r, s)) => batch.push((o, r, s)),
                            Ok(Job::Close(d)) => {
                                close = Some(d);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    // Deferred rotations go first: nothing else should see the rows they update.
                    self.retry_deferred().await;
                    self.commit_spanned(batch).await;
                    if let Some(done) = close {
                        self.close_retries().await;
                        self.finish();
                        let _ = done.send(());
                        return;
                    }
                }
            }
        }
        self.retry_deferred().await;
        self.finish();
    }

    /// A stop: the own recovery file goes when empty, the instance lock with its file.
    fn finish(&mut self) {
        commit::stop(&mut self.instance, &mut self.deferrals, &self.db);
    }

    async fn commit(&self, outcomes: &[&Outcome]) -> Result<Vec<Recorded>, StoreError> {
        commit_on(&self.pool, &self.keys, outcomes).await
    }

    /// Commits a group in the span of its outcome when it has one outcome (a group of
    /// several belongs to no one account).
    async fn commit_spanned(&mut self, batch: Vec<(Outcome, Reply, Span)>) {
        let span = match &batch[..] {
            [(_, _, one)] => one.clone(),
            _ => Span::none(),
        };
        let batch = batch.into_iter().map(|(o, r, _)| (o, r)).collect();
        self.commit_group(batch).instrument(span).await;
    }

    async fn commit_group(&mut self, batch: Vec<(Outcome, Reply)>) {
        let outcomes: Vec<&Outcome> = batch.iter().map(|(o, _)| o).collect();
        let result = self.commit(&outcomes).await;
        if let Some(batch) =
            commit::settle(&mut self.deferrals, batch, result, false, commit::answer)
        {
            for one in batch {
                Box::pin(self.commit_group(vec![one])).await;
            }
        }
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
