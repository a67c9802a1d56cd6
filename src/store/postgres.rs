//! The PostgreSQL backend: the same accounts table and refresh log, the same semantics as
//! `sqlite.rs` (leases, generation-guarded writes, group commit, recovery file), for several
//! replicas sharing one database. Claims use `FOR UPDATE SKIP LOCKED`, so replicas never wait
//! on each other's rows; migrations run under an advisory lock, so replicas starting together
//! do not race. A lost connection is a transient error: the pool reconnects on the next use.
//! Each replica's liveness lock (`liveness.rs`) lets the others take a dead one's leases.

use super::{
    AccountSummary, Gauges, ListFilter, LogEntry, NewAccount, Outcome, Recorded, StoreError,
    SweepReport, recovery,
};
use crate::crypto::{Column, Keyring};
use crate::model::{Account, ReauthReason, Status};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime, Transaction};
use secrecy::{ExposeSecret, SecretString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::{GenericClient, NoTls, Row};

/// Numbered like `schema::MIGRATIONS` (the same changes, in PostgreSQL's dialect), so one
/// version number means the same schema on both backends.
pub const MIGRATIONS: &[&str] = &[
    // 1: accounts and the refresh log.
    r#"
CREATE TABLE accounts (
    id                 BIGSERIAL PRIMARY KEY,
    provider           TEXT    NOT NULL,
    subject            TEXT    NOT NULL,
    label              TEXT,
    access_token       TEXT    NOT NULL,
    refresh_token      TEXT    NOT NULL,
    scope              TEXT    NOT NULL DEFAULT '',
    token_type         TEXT    NOT NULL DEFAULT 'Bearer',
    access_expires_at  BIGINT  NOT NULL,
    refresh_expires_at BIGINT,
    next_refresh_at    BIGINT  NOT NULL,
    status             TEXT    NOT NULL DEFAULT 'active'
                       CHECK (status IN ('active', 'expiring', 'needs_reauth', 'disabled')),
    reauth_reason      TEXT,
    reauth_flagged_at  BIGINT,
    failures           BIGINT  NOT NULL DEFAULT 0,
    last_error         TEXT,
    last_refreshed_at  BIGINT,
    lease_owner        TEXT,
    lease_expires_at   BIGINT,
    generation         BIGINT  NOT NULL DEFAULT 0,
    created_at         BIGINT  NOT NULL,
    updated_at         BIGINT  NOT NULL,
    UNIQUE (provider, subject)
);
CREATE INDEX accounts_due ON accounts (next_refresh_at) WHERE status IN ('active', 'expiring');
CREATE INDEX accounts_status ON accounts (status, provider);
CREATE INDEX accounts_refresh_expiry ON accounts (refresh_expires_at)
    WHERE status IN ('active', 'expiring') AND refresh_expires_at IS NOT NULL;

CREATE TABLE refresh_log (
    id          BIGSERIAL PRIMARY KEY,
    account_id  BIGINT  NOT NULL,
    at          BIGINT  NOT NULL,
    outcome     TEXT    NOT NULL,
    http_status INTEGER,
    error       TEXT,
    duration_ms BIGINT
);
CREATE INDEX refresh_log_account ON refresh_log (account_id, at);
CREATE INDEX refresh_log_at ON refresh_log (at);
"#,
    // 2: the crash window (see schema.rs).
    r#"
ALTER TABLE accounts ADD COLUMN interrupted_at BIGINT;
"#,
    // 3: web connects in progress (see schema.rs).
    r#"
CREATE TABLE connect_states (
    key        TEXT    PRIMARY KEY,
    provider   TEXT    NOT NULL,
    verifier   TEXT,
    label      TEXT,
    account    BIGINT,
    scopes     TEXT    NOT NULL DEFAULT '',
    expires_at BIGINT  NOT NULL,
    used       INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX connect_states_expiry ON connect_states (expires_at);
"#,
];

/// Taken (per database) while migrating: "refreshd" in ASCII.
const MIGRATION_LOCK: i64 = 0x7265_6672_6573_6864;

const ACCOUNT_COLUMNS: &str = "id, provider, subject, label, access_token, refresh_token, scope, \
    token_type, access_expires_at, refresh_expires_at, next_refresh_at, status, reauth_reason, \
    reauth_flagged_at, failures, last_error, last_refreshed_at, generation, created_at, updated_at, \
    interrupted_at";

const SUMMARY_COLUMNS: &str = "id, provider, subject, label, status, reauth_reason, \
    access_expires_at, refresh_expires_at, next_refresh_at, failures, last_error, \
    last_refreshed_at, reauth_flagged_at, scope";

pub(crate) fn pg_err(context: &'static str) -> impl Fn(tokio_postgres::Error) -> StoreError {
    move |e| StoreError::Postgres {
        context,
        message: describe_error(&e),
        transient: is_transient(&e),
    }
}

fn pool_err(context: &'static str) -> impl Fn(deadpool_postgres::PoolError) -> StoreError {
    move |e| StoreError::PgPool {
        context,
        message: match &e {
            deadpool_postgres::PoolError::Backend(b) => describe_error(b),
            other => other.to_string(),
        },
    }
}

/// What went wrong, without the server's DETAIL or WHERE (a constraint violation quotes the
/// failing row there, tokens included).
pub fn describe_error(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut m = format!("{} (SQLSTATE {})", db.message(), db.code().code());
        if let Some(c) = db.constraint() {
            m.push_str(&format!(", constraint {c}"));
        } else if let Some(t) = db.table() {
            m.push_str(&format!(", table {t}"));
        }
        return m;
    }
    // Client-side and I/O errors carry no data: their chain is safe to show.
    let mut m = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        m.push_str(&format!(": {s}"));
        source = s.source();
    }
    m
}

/// `postgres://user@host:port/db`, never the password: for logs and errors.
pub fn describe(url: &str) -> String {
    match url.parse::<tokio_postgres::Config>() {
        Ok(c) => {
            let host = c
                .get_hosts()
                .first()
                .map(|h| match h {
                    tokio_postgres::config::Host::Tcp(h) => h.clone(),
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                })
                .unwrap_or_else(|| "localhost".into());
            let port = c.get_ports().first().copied().unwrap_or(5432);
            format!(
                "postgres://{}@{host}:{port}/{}",
                c.get_user().unwrap_or(""),
                c.get_dbname().unwrap_or("")
            )
        }
        Err(_) => "postgres://(unparsable url)".into(),
    }
}

/// Checks a `store.url` without connecting; the message never carries the password.
pub fn validate_url(url: &str) -> Result<(), String> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err("must start with postgres:// or postgresql:// (leave it unset for SQLite at store.path)".into());
    }
    url.parse::<tokio_postgres::Config>()
        .map(|_| ())
        .map_err(|e| format!("is not a valid PostgreSQL URL: {e}"))
}

fn status(s: String) -> Result<Status, StoreError> {
    s.parse::<Status>().map_err(|e| StoreError::StoredStatus {
        message: e.to_string(),
        value: s,
    })
}

fn row_to_account(r: &Row) -> Result<Account, StoreError> {
    let g = pg_err("read an account row");
    Ok(Account {
        id: r.try_get(0).map_err(&g)?,
        provider: r.try_get(1).map_err(&g)?,
        subject: r.try_get(2).map_err(&g)?,
        label: r.try_get(3).map_err(&g)?,
        access_token: SecretString::from(r.try_get::<_, String>(4).map_err(&g)?),
        refresh_token: SecretString::from(r.try_get::<_, String>(5).map_err(&g)?),
        scope: r.try_get(6).map_err(&g)?,
        token_type: r.try_get(7).map_err(&g)?,
        access_expires_at: r.try_get(8).map_err(&g)?,
        refresh_expires_at: r.try_get(9).map_err(&g)?,
        next_refresh_at: r.try_get(10).map_err(&g)?,
        status: status(r.try_get(11).map_err(&g)?)?,
        reauth_reason: r
            .try_get::<_, Option<String>>(12)
            .map_err(&g)?
            .and_then(|s| ReauthReason::parse(&s)),
        reauth_flagged_at: r.try_get(13).map_err(&g)?,
        failures: r.try_get(14).map_err(&g)?,
        last_error: r.try_get(15).map_err(&g)?,
        last_refreshed_at: r.try_get(16).map_err(&g)?,
        generation: r.try_get(17).map_err(&g)?,
        created_at: r.try_get(18).map_err(&g)?,
        updated_at: r.try_get(19).map_err(&g)?,
        interrupted_at: r.try_get(20).map_err(&g)?,
    })
}

fn open_tokens(keys: &Keyring, mut a: Account) -> Result<Account, StoreError> {
    a.access_token = keys.open(a.id, Column::AccessToken, a.access_token.expose_secret())?;
    a.refresh_token = keys.open(a.id, Column::RefreshToken, a.refresh_token.expose_secret())?;
    Ok(a)
}

fn row_to_summary(r: &Row) -> Result<AccountSummary, StoreError> {
    let g = pg_err("read an account row");
    Ok(AccountSummary {
        id: r.try_get(0).map_err(&g)?,
        provider: r.try_get(1).map_err(&g)?,
        subject: r.try_get(2).map_err(&g)?,
        label: r.try_get(3).map_err(&g)?,
        status: status(r.try_get(4).map_err(&g)?)?,
        reauth_reason: r
            .try_get::<_, Option<String>>(5)
            .map_err(&g)?
            .and_then(|s| ReauthReason::parse(&s)),
        access_expires_at: r.try_get(6).map_err(&g)?,
        refresh_expires_at: r.try_get(7).map_err(&g)?,
        next_refresh_at: r.try_get(8).map_err(&g)?,
        failures: r.try_get(9).map_err(&g)?,
        last_error: r.try_get(10).map_err(&g)?,
        last_refreshed_at: r.try_get(11).map_err(&g)?,
        reauth_flagged_at: r.try_get(12).map_err(&g)?,
        scope: r.try_get(13).map_err(&g)?,
    })
}

/// Most outcomes written by one commit.
const MAX_GROUP: usize = 1024;
/// How often deferred (recovery-file) commits are retried while any are pending.
const RETRY_EVERY: Duration = Duration::from_secs(2);

enum Job {
    Record(Outcome, oneshot::Sender<Result<Recorded, StoreError>>),
    Close(oneshot::Sender<()>),
}

/// Handle to a PostgreSQL store: a connection pool plus the group-commit task.
pub struct PgStore {
    pool: Pool,
    keys: Keyring,
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
        health: super::DeferredIds,
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
            let options = format!(
                "{} -c default_transaction_read_only=on",
                config.get_options().unwrap_or("")
            );
            config.options(options.trim());
        }
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        // sslmode=require: TLS, with the server's certificate checked against the system's
        // trust store (SSL_CERT_FILE may name another bundle). Otherwise the connection is
        // plain, as for a server on loopback, a Unix socket or a private network.
        // The liveness lock's connection is made the same way, outside the pool.
        let lock_config = config.clone();
        let (manager, connect): (Manager, super::liveness::Connect) =
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
            let v = schema_version(&**client).await?;
            if v != MIGRATIONS.len() {
                return Err(super::Refusal::SchemaBehind {
                    store: describe,
                    version: v as i64,
                    current: MIGRATIONS.len(),
                }
                .into());
            }
        } else {
            migrate(&mut client)
                .await
                .map_err(|(version, e)| StoreError::PgMigration {
                    url: describe.clone(),
                    version,
                    message: describe_error(&e),
                })?;
        }
        for key_id in sealing_key_ids(&**client).await? {
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
            let log = recovery::RecoveryLog::unopened(super::owner_recovery_path(db, owner));
            tokio::spawn(
                Worker {
                    pool: pool.clone(),
                    keys: keys.clone(),
                    deferrals: super::deferred::Deferrals::new(log, keys.clone(), health),
                    instance: None,
                    db: db.to_path_buf(),
                }
                .run(rx),
            );
            return Ok(PgStore {
                pool,
                keys,
                jobs,
                describe,
                liveness_stop: Mutex::new(None),
            });
        }
        let liveness = super::liveness::Liveness::start(connect, owner, &describe, health.clone())
            .await
            .map_err(|message| StoreError::PgConnect {
                url: describe.clone(),
                message: format!("cannot take this replica's liveness lock: {message}"),
            })?;
        // Recovery files and instance locks sit beside store.path: replicas on one host
        // sharing it take over each other's work as SQLite processes do.
        let lock = super::instance::StoreLock::acquire(db)?;
        let me = super::instance::Instance::acquire(db, owner, &lock)?;
        let mut c = client;
        for path in recovery::orphans(db, owner) {
            if let Some(outcomes) = recovery::read(&path, &keys)? {
                let (applied, refused) = apply_recovered(&mut c, &keys, &outcomes).await?;
                recovery::quarantine(&path, &keys, &refused).map_err(|e| {
                    StoreError::Recovery {
                        path: recovery::quarantine_path(&path),
                        message: format!(
                            "cannot save refused rotations ({e}); {} is kept and replayed again: free disk space or make the directory writable",
                            path.display()
                        ),
                    }
                })?;
                recovery::remove(&path).map_err(|e| StoreError::Recovery {
                    path: path.clone(),
                    message: format!("replayed but cannot remove: {e}"),
                })?;
                tracing::info!(event = "recovery_replayed", path = %path.display(), entries = outcomes.len(), applied, "replayed rotations a process could not commit before it stopped");
            }
        }
        let dead = super::instance::dead_owners(db, owner, &lock);
        for o in &dead {
            super::instance::forget(db, o, &lock);
        }
        health
            .dead_owners
            .lock()
            .expect("not poisoned")
            .extend(dead);
        drop(lock);
        drop(c);
        let (jobs, rx) = mpsc::unbounded_channel();
        let log = recovery::RecoveryLog::open(super::owner_recovery_path(db, owner));
        tokio::spawn(
            Worker {
                pool: pool.clone(),
                keys: keys.clone(),
                deferrals: super::deferred::Deferrals::new(log, keys.clone(), health),
                instance: Some(me),
                db: db.to_path_buf(),
            }
            .run(rx),
        );
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(liveness.run(stopped));
        Ok(PgStore {
            pool,
            keys,
            jobs,
            describe,
            liveness_stop: Mutex::new(Some(stop)),
        })
    }

    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// Runs `f` in one transaction on a pooled connection; commits when it returns Ok.
    async fn in_tx<R>(
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

    pub async fn record(&self, outcome: Outcome) -> Result<Recorded, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Job::Record(outcome, tx))
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

    /// Ends now the leases of processes found dead; see `sqlite::expire_leases_of`.
    pub async fn expire_leases_of(&self, owners: &[String], now: i64) -> Result<(), StoreError> {
        if owners.is_empty() {
            return Ok(());
        }
        let ctx = "take over a dead process's leases";
        let client = self.pool.get().await.map_err(pool_err(ctx))?;
        for owner in owners {
            client
                .execute(
                    "UPDATE accounts SET lease_expires_at = $2
                     WHERE lease_owner IS NOT NULL AND lease_expires_at > $2
                       AND left(lease_owner, length($1) + 1) = $1 || ':'",
                    &[owner, &now],
                )
                .await
                .map_err(pg_err(ctx))?;
        }
        Ok(())
    }

    pub async fn claim_due_except(
        &self,
        owner: &str,
        now: i64,
        lease_until: i64,
        limit: usize,
        skip: &[String],
        exclude: &[i64],
    ) -> Result<Vec<Account>, StoreError> {
        let ctx = "claim due accounts";
        // One statement: atomic on its own, no transaction round trips needed.
        let client = self.pool.get().await.map_err(pool_err(ctx))?;
        // SKIP LOCKED: rows another replica is claiming right now are left to it.
        let stmt = client
            .prepare_cached(&format!(
                "UPDATE accounts a SET lease_owner = $1, lease_expires_at = $2,
                    interrupted_at = CASE WHEN a.lease_owner IS NOT NULL THEN a.lease_expires_at END
                 FROM (SELECT id FROM accounts
                       WHERE status IN ('active', 'expiring') AND next_refresh_at <= $3
                         AND (lease_owner IS NULL OR lease_expires_at <= $3)
                         AND provider <> ALL($5::text[])
                         AND id <> ALL($6::bigint[])
                       ORDER BY next_refresh_at
                       LIMIT $4
                       FOR UPDATE SKIP LOCKED) due
                 WHERE a.id = due.id
                 RETURNING {}",
                ACCOUNT_COLUMNS
                    .split(", ")
                    .map(|c| format!("a.{c}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
            .await
            .map_err(pg_err(ctx))?;
        let rows = client
            .query(
                &stmt,
                &[&owner, &lease_until, &now, &(limit as i64), &skip, &exclude],
            )
            .await
            .map_err(pg_err(ctx))?;
        let sealed = rows
            .iter()
            .map(row_to_account)
            .collect::<Result<Vec<_>, _>>()?;
        let mut out = Vec::with_capacity(sealed.len());
        for a in sealed {
            let id = a.id;
            match open_tokens(&self.keys, a) {
                Ok(a) => out.push(a),
                Err(e) => {
                    tracing::error!(event = "token_unreadable", account = id, error = %e,
                        "cannot open this account's stored tokens; it is skipped until its lease ends")
                }
            }
        }
        out.sort_by_key(|a| a.next_refresh_at);
        Ok(out)
    }

    pub async fn next_due_except(
        &self,
        now: i64,
        skip: &[String],
    ) -> Result<Option<i64>, StoreError> {
        let ctx = "find next due account";
        let client = self.pool.get().await.map_err(pool_err(ctx))?;
        let stmt = client
            .prepare_cached(
                "SELECT next_refresh_at FROM accounts
                 WHERE status IN ('active', 'expiring')
                   AND (lease_owner IS NULL OR lease_expires_at <= $1
                        OR lease_expires_at <= next_refresh_at)
                   AND provider <> ALL($2::text[])
                 ORDER BY next_refresh_at LIMIT 1",
            )
            .await
            .map_err(pg_err(ctx))?;
        let row = client
            .query_opt(&stmt, &[&now, &skip])
            .await
            .map_err(pg_err(ctx))?;
        row.map(|r| r.try_get(0).map_err(pg_err(ctx))).transpose()
    }

    pub async fn get(&self, id: i64) -> Result<Option<Account>, StoreError> {
        let client = self.pool.get().await.map_err(pool_err("read account"))?;
        get_on(&**client, &self.keys, id).await
    }

    pub async fn find(&self, provider: &str, subject: &str) -> Result<Option<Account>, StoreError> {
        let client = self.pool.get().await.map_err(pool_err("find account"))?;
        find_on(&**client, &self.keys, provider, subject).await
    }

    pub async fn list(
        &self,
        filter: &ListFilter,
        after_id: i64,
        page: usize,
    ) -> Result<Vec<AccountSummary>, StoreError> {
        let ctx = "list accounts";
        let client = self.pool.get().await.map_err(pool_err(ctx))?;
        let needs = if filter.needs_reauth {
            " AND status IN ('expiring', 'needs_reauth')"
        } else {
            ""
        };
        let sql = format!(
            "SELECT {SUMMARY_COLUMNS} FROM accounts WHERE id > $1
               AND ($2::text IS NULL OR provider = $2) AND ($3::text IS NULL OR status = $3){needs}
             ORDER BY id LIMIT $4"
        );
        let rows = client
            .query(
                &sql,
                &[
                    &after_id,
                    &filter.provider,
                    &filter.status.map(|s| s.as_str()),
                    &(page as i64),
                ],
            )
            .await
            .map_err(pg_err(ctx))?;
        rows.iter().map(row_to_summary).collect()
    }

    pub async fn log_entries(&self, id: i64, limit: usize) -> Result<Vec<LogEntry>, StoreError> {
        let ctx = "read refresh log";
        let client = self.pool.get().await.map_err(pool_err(ctx))?;
        let rows = client
            .query(
                "SELECT at, outcome, http_status, error, duration_ms FROM refresh_log
                 WHERE account_id = $1 ORDER BY at DESC, id DESC LIMIT $2",
                &[&id, &(limit as i64)],
            )
            .await
            .map_err(pg_err(ctx))?;
        rows.iter()
            .map(|r| {
                Ok(LogEntry {
                    at: r.try_get(0).map_err(pg_err(ctx))?,
                    outcome: r.try_get(1).map_err(pg_err(ctx))?,
                    http_status: r
                        .try_get::<_, Option<i32>>(2)
                        .map_err(pg_err(ctx))?
                        .map(|s| s as u16),
                    error: r.try_get(3).map_err(pg_err(ctx))?,
                    duration_ms: r.try_get(4).map_err(pg_err(ctx))?,
                })
            })
            .collect()
    }

    pub async fn counts(&self) -> Result<Vec<(String, Status, i64)>, StoreError> {
        let client = self.pool.get().await.map_err(pool_err("count accounts"))?;
        counts_on(&**client).await
    }

    pub async fn schema_current(&self) -> Result<bool, StoreError> {
        let client = self
            .pool
            .get()
            .await
            .map_err(pool_err("read the schema version"))?;
        Ok(schema_version(&**client).await? == MIGRATIONS.len())
    }

    pub async fn gauges(&self, now: i64) -> Result<Gauges, StoreError> {
        let ctx = "read account gauges";
        let client = self.pool.get().await.map_err(pool_err(ctx))?;
        let pairs = |rows: Vec<Row>| -> Result<Vec<(String, i64)>, StoreError> {
            rows.iter()
                .map(|r| {
                    Ok((
                        r.try_get(0).map_err(pg_err(ctx))?,
                        r.try_get(1).map_err(pg_err(ctx))?,
                    ))
                })
                .collect()
        };
        let flagged = client
            .query(
                "SELECT provider, COALESCE(reauth_reason, 'unknown'), COUNT(*) FROM accounts
                 WHERE status IN ('needs_reauth', 'expiring') GROUP BY 1, 2 ORDER BY 1, 2",
                &[],
            )
            .await
            .map_err(pg_err(ctx))?
            .iter()
            .map(|r| {
                Ok((
                    r.try_get(0).map_err(pg_err(ctx))?,
                    r.try_get(1).map_err(pg_err(ctx))?,
                    r.try_get(2).map_err(pg_err(ctx))?,
                ))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let access_expired = pairs(
            client
                .query(
                    "SELECT provider, COUNT(*) FROM accounts
                     WHERE status IN ('active', 'expiring') AND access_expires_at <= $1
                     GROUP BY 1 ORDER BY 1",
                    &[&now],
                )
                .await
                .map_err(pg_err(ctx))?,
        )?;
        let soonest_refresh_expiry = pairs(
            client
                .query(
                    "SELECT provider, MIN(refresh_expires_at) FROM accounts
                     WHERE status IN ('active', 'expiring') AND refresh_expires_at IS NOT NULL
                     GROUP BY 1 ORDER BY 1",
                    &[],
                )
                .await
                .map_err(pg_err(ctx))?,
        )?;
        Ok(Gauges {
            by_status: counts_on(&**client).await?,
            flagged,
            access_expired,
            soonest_refresh_expiry,
        })
    }

    pub async fn upsert(
        &self,
        accounts: &[NewAccount],
        now: i64,
    ) -> Result<Vec<(i64, bool)>, StoreError> {
        let keys = self.keys.clone();
        self.in_tx("import accounts", async |tx| {
            upsert_on(tx, &keys, accounts, now).await
        })
        .await
    }

    /// `Store::upsert_stream` on PostgreSQL: every batch in one transaction.
    pub async fn upsert_stream<F>(
        &self,
        mut batches: tokio::sync::mpsc::Receiver<Option<Vec<NewAccount>>>,
        now: i64,
        mut per_batch: F,
    ) -> Result<(), StoreError>
    where
        F: FnMut(&[NewAccount], &[(i64, bool)]),
    {
        let keys = self.keys.clone();
        self.in_tx("import accounts", async |tx| {
            while let Some(item) = batches.recv().await {
                let Some(batch) = item else { return Ok(()) };
                let ids = upsert_on(tx, &keys, &batch, now).await?;
                per_batch(&batch, &ids);
            }
            Err(super::Refusal::ImportAborted.into())
        })
        .await
    }

    /// `connect`'s write: with `expect_id`, the account must be that provider and subject.
    /// Returns the upsert's result and the status the account had before, or the mismatch.
    #[allow(clippy::type_complexity)]
    pub async fn store_connected(
        &self,
        row: &NewAccount,
        expect_id: Option<i64>,
        now: i64,
    ) -> Result<Result<(Vec<(i64, bool)>, Option<Status>), (i64, String, String)>, StoreError> {
        let keys = self.keys.clone();
        self.in_tx("store a connected account", async |tx| {
            if let Some(id) = expect_id {
                let existing = get_on(&**tx, &keys, id)
                    .await?
                    .ok_or(StoreError::NotFound(id))?;
                if existing.provider != row.provider || existing.subject != row.subject {
                    return Ok(Err((id, existing.provider, existing.subject)));
                }
            }
            let previous = find_on(&**tx, &keys, &row.provider, &row.subject)
                .await?
                .map(|a| a.status);
            Ok(Ok((
                upsert_on(tx, &keys, std::slice::from_ref(row), now).await?,
                previous,
            )))
        })
        .await
    }

    pub async fn sweep(&self, now: i64, window_end: i64) -> Result<SweepReport, StoreError> {
        self.in_tx("reauth sweep", async |tx| {
            let run = async |sql: &str, params: &[&(dyn tokio_postgres::types::ToSql + Sync)]| {
                tx.query(sql, params)
                    .await
                    .map_err(pg_err("sweep refresh-token expiries"))?
                    .iter()
                    .map(row_to_summary)
                    .collect::<Result<Vec<_>, _>>()
            };
            let expired = run(
                &format!(
                    "UPDATE accounts SET status = 'needs_reauth', reauth_reason = 'refresh_token_expired',
                        reauth_flagged_at = $1, updated_at = $1,
                        last_error = 'refresh token expired at ' || to_char(
                            to_timestamp(refresh_expires_at) AT TIME ZONE 'UTC',
                            'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
                     WHERE status IN ('active', 'expiring') AND refresh_expires_at IS NOT NULL
                       AND refresh_expires_at <= $1
                     RETURNING {SUMMARY_COLUMNS}"
                ),
                &[&now],
            )
            .await?;
            let expiring = run(
                &format!(
                    "UPDATE accounts SET status = 'expiring', reauth_reason = 'refresh_token_expiring',
                        reauth_flagged_at = $1, updated_at = $1
                     WHERE status = 'active' AND refresh_expires_at IS NOT NULL
                       AND refresh_expires_at <= $2
                     RETURNING {SUMMARY_COLUMNS}"
                ),
                &[&now, &window_end],
            )
            .await?;
            for a in &expired {
                append_log(tx, a.id, now, "reauth_required", None, Some("refresh token expired"), None)
                    .await?;
            }
            for a in &expiring {
                append_log(
                    tx,
                    a.id,
                    now,
                    "reauth_required",
                    None,
                    Some("refresh token ends within the reauth window"),
                    None,
                )
                .await?;
            }
            // Each list in id order, as on SQLite, whatever order the update visited rows in.
            let (mut expiring, mut expired) = (expiring, expired);
            expiring.sort_by_key(|a| a.id);
            expired.sort_by_key(|a| a.id);
            Ok(SweepReport { expiring, expired })
        })
        .await
    }

    pub async fn flagged_ids(&self) -> Result<Vec<(i64, Status)>, StoreError> {
        let ctx = "list flagged accounts";
        let client = self.pool.get().await.map_err(pool_err(ctx))?;
        client
            .query(
                "SELECT id, status FROM accounts WHERE status IN ('expiring', 'needs_reauth') ORDER BY id",
                &[],
            )
            .await
            .map_err(pg_err(ctx))?
            .iter()
            .map(|r| {
                Ok((
                    r.try_get(0).map_err(pg_err(ctx))?,
                    status(r.try_get(1).map_err(pg_err(ctx))?)?,
                ))
            })
            .collect()
    }

    pub async fn prune_log(&self, before: i64) -> Result<usize, StoreError> {
        let ctx = "prune refresh log";
        let client = self.pool.get().await.map_err(pool_err(ctx))?;
        let mut total = 0;
        loop {
            let n = client
                .execute(
                    "DELETE FROM refresh_log WHERE id IN
                        (SELECT id FROM refresh_log WHERE at < $1 LIMIT 10000)",
                    &[&before],
                )
                .await
                .map_err(pg_err(ctx))? as usize;
            total += n;
            if n < 10_000 {
                return Ok(total);
            }
        }
    }

    pub async fn mark_due(&self, id: i64, now: i64, force: bool) -> Result<Status, StoreError> {
        self.in_tx("mark account due", async |tx| {
            let row = tx
                .query_opt("SELECT status FROM accounts WHERE id = $1 FOR UPDATE", &[&id])
                .await
                .map_err(pg_err("read account"))?
                .ok_or(StoreError::NotFound(id))?;
            let st = status(row.try_get(0).map_err(pg_err("read account"))?)?;
            super::check_mark_due(id, st, force)?;
            tx.execute(
                "UPDATE accounts SET next_refresh_at = $2, updated_at = $2,
                    failures = CASE WHEN status = 'needs_reauth' THEN 0 ELSE failures END,
                    reauth_reason = CASE WHEN status = 'needs_reauth' THEN NULL ELSE reauth_reason END,
                    reauth_flagged_at = CASE WHEN status = 'needs_reauth' THEN NULL ELSE reauth_flagged_at END,
                    status = CASE WHEN status = 'needs_reauth' THEN 'active' ELSE status END
                 WHERE id = $1",
                &[&id, &now],
            )
            .await
            .map_err(pg_err("mark account due"))?;
            append_log(tx, id, now, "marked_due", None, None, None).await?;
            Ok(st)
        })
        .await
    }

    pub async fn remove(&self, id: i64) -> Result<(), StoreError> {
        self.in_tx("remove account", async |tx| {
            let n = tx
                .execute("DELETE FROM accounts WHERE id = $1", &[&id])
                .await
                .map_err(pg_err("remove account"))?;
            if n == 0 {
                return Err(StoreError::NotFound(id));
            }
            tx.execute("DELETE FROM refresh_log WHERE account_id = $1", &[&id])
                .await
                .map_err(pg_err("remove account's refresh log"))?;
            Ok(())
        })
        .await
    }

    pub async fn count_to_rekey(&self, key_id: &str) -> Result<u64, StoreError> {
        let ctx = "count accounts to re-seal";
        let client = self.pool.get().await.map_err(pool_err(ctx))?;
        let n: i64 = client
            .query_one(
                "SELECT COUNT(*) FROM accounts WHERE access_token NOT LIKE $1 OR refresh_token NOT LIKE $1",
                &[&super::rules::sealed_pattern(key_id)],
            )
            .await
            .map_err(pg_err(ctx))?
            .try_get(0)
            .map_err(pg_err(ctx))?;
        Ok(n as u64)
    }

    pub async fn rekey_batch(
        &self,
        after_id: i64,
        limit: usize,
    ) -> Result<super::RekeyBatch, StoreError> {
        let Some(primary) = self.keys.primary_id().map(str::to_string) else {
            return Err(super::Refusal::RekeyWithoutKey.into());
        };
        let keys = self.keys.clone();
        self.in_tx("re-seal tokens", async |tx| {
            let ctx = "read accounts to re-seal";
            // FOR UPDATE: no rotation lands between reading a value and replacing it.
            let rows = tx
                .query(
                    "SELECT id, access_token, refresh_token FROM accounts
                     WHERE id > $1 AND (access_token NOT LIKE $2 OR refresh_token NOT LIKE $2)
                     ORDER BY id LIMIT $3 FOR UPDATE",
                    &[
                        &after_id,
                        &super::rules::sealed_pattern(&primary),
                        &(limit as i64),
                    ],
                )
                .await
                .map_err(pg_err(ctx))?;
            let mut out = super::RekeyBatch {
                last_id: None,
                resealed: 0,
            };
            for r in rows {
                let id: i64 = r.try_get(0).map_err(pg_err(ctx))?;
                let access: String = r.try_get(1).map_err(pg_err(ctx))?;
                let refresh: String = r.try_get(2).map_err(pg_err(ctx))?;
                out.last_id = Some(id);
                let new_access = keys.reseal(id, Column::AccessToken, &access)?;
                let new_refresh = keys.reseal(id, Column::RefreshToken, &refresh)?;
                if new_access.is_none() && new_refresh.is_none() {
                    continue;
                }
                out.resealed +=
                    tx.execute(
                        "UPDATE accounts SET access_token = $2, refresh_token = $3 WHERE id = $1",
                        &[
                            &id,
                            &new_access.as_deref().unwrap_or(&access),
                            &new_refresh.as_deref().unwrap_or(&refresh),
                        ],
                    )
                    .await
                    .map_err(pg_err("re-seal account tokens"))? as usize;
            }
            Ok(out)
        })
        .await
    }

    pub async fn connect_state_put(
        &self,
        key: &str,
        p: &super::PendingConnect,
        now: i64,
        max_open: usize,
    ) -> Result<bool, StoreError> {
        let verifier = super::seal_verifier(&self.keys, p);
        self.in_tx("remember a web connect", async |tx| {
            let ctx = "remember a web connect";
            tx.execute(
                "DELETE FROM connect_states WHERE expires_at < $1",
                &[&(now - super::CONNECT_REMEMBER)],
            )
            .await
            .map_err(pg_err(ctx))?;
            let open: i64 = tx
                .query_one(
                    "SELECT COUNT(*) FROM connect_states WHERE used = 0 AND expires_at >= $1",
                    &[&now],
                )
                .await
                .and_then(|r| r.try_get(0))
                .map_err(pg_err(ctx))?;
            if open as usize >= max_open {
                return Ok(false);
            }
            tx.execute(
                "INSERT INTO connect_states (key, provider, verifier, label, account, scopes, expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &key,
                    &p.provider,
                    &verifier,
                    &p.label,
                    &p.account,
                    &p.scopes.join(" "),
                    &p.expires_at,
                ],
            )
            .await
            .map_err(pg_err(ctx))?;
            Ok(true)
        })
        .await
    }

    pub async fn connect_state_take(
        &self,
        key: &str,
        provider: &str,
        now: i64,
    ) -> Result<Result<super::PendingConnect, super::StateProblem>, StoreError> {
        let keys = self.keys.clone();
        self.in_tx("take a web connect's state", async |tx| {
            let ctx = "take a web connect's state";
            let Some(r) = tx
                .query_opt(
                    "SELECT provider, verifier, label, account, scopes, expires_at, used
                     FROM connect_states WHERE key = $1 FOR UPDATE",
                    &[&key],
                )
                .await
                .map_err(pg_err(ctx))?
            else {
                return Ok(Err(super::StateProblem::Unknown));
            };
            let g = pg_err(ctx);
            let row = super::StateRow {
                provider: r.try_get(0).map_err(&g)?,
                verifier: r.try_get(1).map_err(&g)?,
                label: r.try_get(2).map_err(&g)?,
                account: r.try_get(3).map_err(&g)?,
                scopes: r.try_get(4).map_err(&g)?,
                expires_at: r.try_get(5).map_err(&g)?,
                used: r.try_get::<_, i32>(6).map_err(&g)? != 0,
            };
            if !row.used {
                tx.execute(
                    "UPDATE connect_states SET used = 1, verifier = NULL WHERE key = $1",
                    &[&key],
                )
                .await
                .map_err(pg_err(ctx))?;
            }
            row.judge(&keys, provider, now)
        })
        .await
    }

    /// A pooled connection, for `store copy` and tests.
    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(pool_err("connect"))
    }
}

async fn schema_version(client: &impl GenericClient) -> Result<usize, StoreError> {
    let ctx = "read the schema version";
    let exists: bool = client
        .query_one("SELECT to_regclass('refreshd_schema') IS NOT NULL", &[])
        .await
        .map_err(pg_err(ctx))?
        .try_get(0)
        .map_err(pg_err(ctx))?;
    if !exists {
        return Ok(0);
    }
    let v: i32 = client
        .query_one("SELECT COALESCE(MAX(version), 0) FROM refreshd_schema", &[])
        .await
        .map_err(pg_err(ctx))?
        .try_get(0)
        .map_err(pg_err(ctx))?;
    Ok(v as usize)
}

/// Applies every migration newer than the database in one transaction, under an advisory
/// lock: a replica starting at the same moment waits, then finds nothing left to do.
async fn migrate(
    client: &mut deadpool_postgres::Object,
) -> Result<(), (usize, tokio_postgres::Error)> {
    let tx = client.transaction().await.map_err(|e| (0, e))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(|e| (0, e))?;
    // Under the lock, so this cannot race; checked first, so the server logs no NOTICE.
    let exists: bool = tx
        .query_one("SELECT to_regclass('refreshd_schema') IS NOT NULL", &[])
        .await
        .and_then(|r| r.try_get(0))
        .map_err(|e| (0, e))?;
    if !exists {
        tx.batch_execute("CREATE TABLE refreshd_schema (version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
            .await
            .map_err(|e| (0, e))?;
    }
    let current: i32 = tx
        .query_one("SELECT COALESCE(MAX(version), 0) FROM refreshd_schema", &[])
        .await
        .and_then(|r| r.try_get(0))
        .map_err(|e| (0, e))?;
    let current = current as usize;
    if current > MIGRATIONS.len() {
        // Surfaced as a migration error on a version this build does not know.
        return Err((
            current,
            tx.execute("SELECT 1/0", &[])
                .await
                .expect_err("division by zero fails"),
        ));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        tx.batch_execute(sql).await.map_err(|e| (i + 1, e))?;
        tx.execute(
            "INSERT INTO refreshd_schema (version) VALUES ($1)",
            &[&((i + 1) as i32)],
        )
        .await
        .map_err(|e| (i + 1, e))?;
    }
    tx.commit().await.map_err(|e| (MIGRATIONS.len(), e))?;
    if current < MIGRATIONS.len() {
        tracing::info!(
            event = "schema_migrated",
            from = current,
            to = MIGRATIONS.len(),
            "PostgreSQL schema migrated"
        );
    }
    Ok(())
}

async fn sealing_key_ids(client: &impl GenericClient) -> Result<Vec<String>, StoreError> {
    let ctx = "list encryption key ids";
    client
        .query(
            "SELECT DISTINCT substr(v, 8, 16) FROM (
                SELECT access_token AS v FROM accounts
                UNION ALL SELECT refresh_token FROM accounts) t
             WHERE v LIKE 'enc:v1:%' AND substr(v, 24, 1) = ':'
               AND substr(v, 8, 16) ~ '^[0-9a-f]{16}$'",
            &[],
        )
        .await
        .map_err(pg_err(ctx))?
        .iter()
        .map(|r| r.try_get(0).map_err(pg_err(ctx)))
        .collect()
}

async fn counts_on(client: &impl GenericClient) -> Result<Vec<(String, Status, i64)>, StoreError> {
    let ctx = "count accounts";
    client
        .query(
            "SELECT provider, status, COUNT(*) FROM accounts GROUP BY provider, status ORDER BY provider, status",
            &[],
        )
        .await
        .map_err(pg_err(ctx))?
        .iter()
        .map(|r| {
            Ok((
                r.try_get(0).map_err(pg_err(ctx))?,
                status(r.try_get(1).map_err(pg_err(ctx))?)?,
                r.try_get(2).map_err(pg_err(ctx))?,
            ))
        })
        .collect()
}

async fn get_on(
    c: &impl GenericClient,
    keys: &Keyring,
    id: i64,
) -> Result<Option<Account>, StoreError> {
    c.query_opt(
        &format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = $1"),
        &[&id],
    )
    .await
    .map_err(pg_err("read account"))?
    .map(|r| open_tokens(keys, row_to_account(&r)?))
    .transpose()
}

async fn find_on(
    c: &impl GenericClient,
    keys: &Keyring,
    provider: &str,
    subject: &str,
) -> Result<Option<Account>, StoreError> {
    c.query_opt(
        &format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE provider = $1 AND subject = $2"),
        &[&provider, &subject],
    )
    .await
    .map_err(pg_err("find account"))?
    .map(|r| open_tokens(keys, row_to_account(&r)?))
    .transpose()
}

async fn append_log(
    tx: &Transaction<'_>,
    id: i64,
    at: i64,
    outcome: &str,
    http_status: Option<u16>,
    error: Option<&str>,
    duration_ms: Option<i64>,
) -> Result<(), StoreError> {
    let stmt = tx
        .prepare_cached(
            "INSERT INTO refresh_log (account_id, at, outcome, http_status, error, duration_ms)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .await
        .map_err(pg_err("append refresh log"))?;
    tx.execute(
        &stmt,
        &[
            &id,
            &at,
            &outcome,
            &http_status.map(i32::from),
            &error,
            &duration_ms,
        ],
    )
    .await
    .map_err(pg_err("append refresh log"))?;
    Ok(())
}

async fn upsert_on(
    tx: &Transaction<'_>,
    keys: &Keyring,
    accounts: &[NewAccount],
    now: i64,
) -> Result<Vec<(i64, bool)>, StoreError> {
    let mut out = Vec::with_capacity(accounts.len());
    // Accounts of a chunk in flight at once: tokio-postgres pipelines their statements on
    // the one connection (sent, and executed, in order), instead of a round trip each.
    for chunk in accounts.chunks(UPSERT_PIPELINE) {
        out.extend(
            futures::future::try_join_all(chunk.iter().map(|a| upsert_one(tx, keys, a, now)))
                .await?,
        );
    }
    Ok(out)
}

/// Accounts imported together whose statements are pipelined.
const UPSERT_PIPELINE: usize = 256;

/// Inserts or updates one account; returns (id, inserted).
async fn upsert_one(
    tx: &Transaction<'_>,
    keys: &Keyring,
    a: &NewAccount,
    now: i64,
) -> Result<(i64, bool), StoreError> {
    {
        let lookup = async || {
            tx.query_opt(
                "SELECT id, lease_expires_at, last_refreshed_at FROM accounts
                 WHERE provider = $1 AND subject = $2 FOR UPDATE",
                &[&a.provider, &a.subject],
            )
            .await
            .map_err(pg_err("look up account for import"))?
            .map(|r| -> Result<(i64, Option<i64>, Option<i64>), StoreError> {
                let g = pg_err("look up account for import");
                Ok((
                    r.try_get(0).map_err(&g)?,
                    r.try_get(1).map_err(&g)?,
                    r.try_get(2).map_err(&g)?,
                ))
            })
            .transpose()
        };
        let mut existing = lookup().await?;
        let refresh_clear = a
            .tokens
            .refresh_token
            .as_ref()
            .map(|t| t.expose_secret().to_string())
            .unwrap_or_default();
        let seal_refresh = |id| {
            if refresh_clear.is_empty() {
                String::new()
            } else {
                keys.seal(id, Column::RefreshToken, &refresh_clear)
            }
        };
        let access_expires_at = a.obtained_at + a.tokens.expires_in;
        let refresh_expires_at = a.tokens.refresh_expires_in.map(|s| a.obtained_at + s);
        let scope = a.tokens.scope.clone().unwrap_or_default();
        let reason = a.reauth_reason.map(|r| r.as_str());
        let flagged_at = a.reauth_reason.map(|_| now);
        // FOR UPDATE locks nothing while the account does not exist yet: two connects of one
        // new user (two tabs, two replicas) would both insert, and one fail on the UNIQUE
        // constraint. The insert skips a conflict instead (waiting for the other transaction),
        // and the account it finds then is updated like any existing one.
        let done = loop {
            let Some((id, lease_expires_at, last_refreshed_at)) = existing else {
                // The id is part of a sealed value's associated data and known only after
                // the insert: with a key, the tokens are written by a second statement.
                let (access, refresh) = if keys.seals() {
                    (String::new(), String::new())
                } else {
                    (
                        a.tokens.access_token.expose_secret().to_string(),
                        refresh_clear.clone(),
                    )
                };
                let inserted = tx
                    .query_opt(
                        "INSERT INTO accounts (provider, subject, label, access_token, refresh_token,
                            scope, token_type, access_expires_at, refresh_expires_at, next_refresh_at,
                            status, reauth_reason, reauth_flagged_at, created_at, updated_at)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $14)
                         ON CONFLICT (provider, subject) DO NOTHING
                         RETURNING id",
                        &[
                            &a.provider,
                            &a.subject,
                            &a.label,
                            &access,
                            &refresh,
                            &scope,
                            &a.tokens.token_type,
                            &access_expires_at,
                            &refresh_expires_at,
                            &a.next_refresh_at,
                            &a.status.as_str(),
                            &reason,
                            &flagged_at,
                            &now,
                        ],
                    )
                    .await
                    .map_err(pg_err("insert imported account"))?;
                let Some(row) = inserted else {
                    // Created meanwhile by another transaction: update that one.
                    existing = lookup().await?;
                    if existing.is_none() {
                        return Err(super::Refusal::UpsertRaced {
                            provider: a.provider.clone(),
                            subject: a.subject.clone(),
                        }
                        .into());
                    }
                    continue;
                };
                let id: i64 = row.try_get(0).map_err(pg_err("insert imported account"))?;
                if keys.seals() {
                    tx.execute(
                        "UPDATE accounts SET access_token = $2, refresh_token = $3 WHERE id = $1",
                        &[
                            &id,
                            &keys.seal(
                                id,
                                Column::AccessToken,
                                a.tokens.access_token.expose_secret(),
                            ),
                            &seal_refresh(id),
                        ],
                    )
                    .await
                    .map_err(pg_err("store imported tokens"))?;
                }
                break (id, true);
            };
            super::check_upsert(id, a, lease_expires_at, last_refreshed_at, now)?;
            {
                tx.execute(
                    "UPDATE accounts SET label = COALESCE($2, label), access_token = $3,
                        refresh_token = CASE WHEN $4 = '' THEN refresh_token ELSE $4 END,
                        scope = $5, token_type = $6, access_expires_at = $7,
                        refresh_expires_at = CASE WHEN $4 = '' THEN COALESCE($8, refresh_expires_at) ELSE $8 END,
                        next_refresh_at = $9, status = $10,
                        reauth_reason = $11, reauth_flagged_at = $12, failures = 0,
                        last_error = NULL, lease_owner = NULL, lease_expires_at = NULL,
                        generation = generation + 1, updated_at = $13
                     WHERE id = $1",
                    &[
                        &id,
                        &a.label,
                        &keys.seal(id, Column::AccessToken, a.tokens.access_token.expose_secret()),
                        &seal_refresh(id),
                        &scope,
                        &a.tokens.token_type,
                        &access_expires_at,
                        &refresh_expires_at,
                        &a.next_refresh_at,
                        &a.status.as_str(),
                        &reason,
                        &flagged_at,
                        &now,
                    ],
                )
                .await
                .map_err(pg_err("update imported account"))?;
                break (id, false);
            }
        };
        append_log(tx, done.0, now, "imported", None, None, None).await?;
        Ok(done)
    }
}

/// Writes one refresh outcome inside the group-commit transaction; see `sqlite::record`.
async fn record(tx: &Transaction<'_>, keys: &Keyring, o: &Outcome) -> Result<Recorded, StoreError> {
    let exec = async |ctx: &'static str,
                      sql: &str,
                      params: &[&(dyn tokio_postgres::types::ToSql + Sync)]|
           -> Result<u64, StoreError> {
        let stmt = tx.prepare_cached(sql).await.map_err(pg_err(ctx))?;
        tx.execute(&stmt, params).await.map_err(pg_err(ctx))
    };
    match o {
        Outcome::Rotated {
            account_id,
            generation,
            tokens,
            at,
            next_refresh_at,
            status,
            reauth_reason,
            http_status,
            duration_ms,
        } => {
            let refresh_token = tokens
                .refresh_token
                .as_ref()
                .map(|t| keys.seal(*account_id, Column::RefreshToken, t.expose_secret()));
            let n = exec(
                "store rotated tokens",
                "UPDATE accounts SET access_token = $3,
                    refresh_token = COALESCE($4, refresh_token),
                    scope = COALESCE($5, scope), token_type = $6,
                    access_expires_at = $7,
                    refresh_expires_at = COALESCE($8, refresh_expires_at),
                    next_refresh_at = $9, status = $10,
                    reauth_reason = $11::text,
                    reauth_flagged_at = CASE WHEN $11::text IS NULL THEN NULL
                        WHEN reauth_reason IS NOT DISTINCT FROM $11::text THEN reauth_flagged_at ELSE $12 END,
                    failures = 0, last_error = NULL, last_refreshed_at = $12,
                    lease_owner = NULL, lease_expires_at = NULL,
                    generation = generation + 1, updated_at = $12
                 WHERE id = $1 AND generation = $2",
                &[
                    account_id,
                    generation,
                    &keys.seal(
                        *account_id,
                        Column::AccessToken,
                        tokens.access_token.expose_secret(),
                    ),
                    &refresh_token,
                    &tokens.scope,
                    &tokens.token_type,
                    &(at + tokens.expires_in),
                    &tokens.refresh_expires_in.map(|s| at + s),
                    next_refresh_at,
                    &status.as_str(),
                    &reauth_reason.map(|r| r.as_str()),
                    at,
                ],
            )
            .await?;
            if n == 0 {
                append_log(
                    tx,
                    *account_id,
                    *at,
                    "superseded",
                    *http_status,
                    Some(
                        "another refresh rotated this account first; these tokens were not stored",
                    ),
                    Some(*duration_ms),
                )
                .await?;
                return Ok(Recorded::Superseded);
            }
            append_log(
                tx,
                *account_id,
                *at,
                "rotated",
                *http_status,
                None,
                Some(*duration_ms),
            )
            .await?;
            Ok(Recorded::Applied)
        }
        Outcome::Transient {
            account_id,
            owner,
            at,
            next_refresh_at,
            error,
            http_status,
            duration_ms,
            answer_lost,
        } => {
            // As in sqlite.rs: the lease is kept until the retry when the answer may have
            // been lost, or when this attempt already followed a cut-off one.
            let n = exec(
                "record transient failure",
                "UPDATE accounts SET failures = failures + 1, last_error = $3,
                    next_refresh_at = $4::bigint,
                    lease_owner = CASE WHEN $6::boolean OR interrupted_at IS NOT NULL THEN lease_owner END,
                    lease_expires_at = CASE WHEN $6::boolean OR interrupted_at IS NOT NULL THEN $4::bigint END,
                    updated_at = $5
                 WHERE id = $1 AND lease_owner = $2",
                &[account_id, owner, error, next_refresh_at, at, answer_lost],
            )
            .await?;
            append_log(
                tx,
                *account_id,
                *at,
                "transient",
                *http_status,
                Some(error),
                Some(*duration_ms),
            )
            .await?;
            Ok(if n == 0 {
                Recorded::LeaseLost
            } else {
                Recorded::Applied
            })
        }
        Outcome::ConfigError {
            account_id,
            owner,
            at,
            next_refresh_at,
            error,
            http_status,
            duration_ms,
        } => {
            let n = exec(
                "record provider configuration error",
                "UPDATE accounts SET last_error = $3, next_refresh_at = $4,
                    lease_owner = NULL, lease_expires_at = NULL, updated_at = $5
                 WHERE id = $1 AND lease_owner = $2",
                &[account_id, owner, error, next_refresh_at, at],
            )
            .await?;
            append_log(
                tx,
                *account_id,
                *at,
                "config_error",
                *http_status,
                Some(error),
                Some(*duration_ms),
            )
            .await?;
            Ok(if n == 0 {
                Recorded::LeaseLost
            } else {
                Recorded::Applied
            })
        }
        Outcome::Rejected {
            account_id,
            generation,
            reason,
            at,
            error,
            http_status,
            duration_ms,
        } => {
            let n = exec(
                "flag account for re-authorization",
                "UPDATE accounts SET status = 'needs_reauth', reauth_reason = $3,
                    reauth_flagged_at = $4, last_error = $5, failures = failures + 1,
                    lease_owner = NULL, lease_expires_at = NULL, updated_at = $4
                 WHERE id = $1 AND generation = $2",
                &[account_id, generation, &reason.as_str(), at, error],
            )
            .await?;
            if n == 0 {
                append_log(
                    tx,
                    *account_id,
                    *at,
                    "superseded",
                    *http_status,
                    Some(&format!(
                        "rejected, but another refresh had rotated the account: not flagged ({error})"
                    )),
                    Some(*duration_ms),
                )
                .await?;
                return Ok(Recorded::Superseded);
            }
            append_log(
                tx,
                *account_id,
                *at,
                "reauth_required",
                *http_status,
                Some(error),
                Some(*duration_ms),
            )
            .await?;
            Ok(Recorded::Applied)
        }
        Outcome::Released { account_id, owner } => {
            exec(
                "release lease",
                "UPDATE accounts SET lease_owner = NULL, lease_expires_at = NULL
                 WHERE id = $1 AND lease_owner = $2",
                &[account_id, owner],
            )
            .await?;
            Ok(Recorded::Applied)
        }
    }
}

/// Commits deferred rotations, each under its own savepoint; see `recovery::apply`.
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
        if let Outcome::Rotated {
            account_id,
            generation,
            tokens,
            ..
        } = o
            && let Some(current) = get_on(&*tx, keys, *account_id).await?
            && current.generation == generation + 1
            && current.access_token.expose_secret() == tokens.access_token.expose_secret()
        {
            continue;
        }
        let sp = tx.transaction().await.map_err(pg_err(ctx))?;
        match record(&sp, keys, o).await {
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

/// The group-commit task: outcomes that arrive together share one transaction.
struct Worker {
    pool: Pool,
    keys: Keyring,
    deferrals: super::deferred::Deferrals,
    /// This process's instance lock (None when read-only).
    instance: Option<super::instance::Instance>,
    db: PathBuf,
}

use super::Reply;

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
                Job::Record(o, reply) => {
                    let mut batch = vec![(o, reply)];
                    let mut close = None;
                    while batch.len() < MAX_GROUP {
                        match rx.try_recv() {
                            Ok(Job::Record(o, r)) => batch.push((o, r)),
                            Ok(Job::Close(d)) => {
                                close = Some(d);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    // Deferred rotations go first: nothing else should see the rows they update.
                    self.retry_deferred().await;
                    self.commit_group(batch).await;
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
        let Some(me) = self.instance.take() else {
            return;
        };
        let path = self.deferrals.log.path().to_path_buf();
        let log = std::mem::replace(
            &mut self.deferrals.log,
            recovery::RecoveryLog::unopened(path),
        );
        if self.deferrals.is_empty() {
            log.remove();
        }
        if let Ok(lock) = super::instance::StoreLock::acquire(&self.db) {
            me.release(&lock);
        }
    }

    async fn commit(&self, outcomes: &[&Outcome]) -> Result<Vec<Recorded>, StoreError> {
        let ctx = "commit refresh outcomes";
        let mut client = self.pool.get().await.map_err(pool_err(ctx))?;
        let tx = client.transaction().await.map_err(pg_err(ctx))?;
        // A row another transaction holds fails the commit fast (55P03, transient): the
        // rotations go to the recovery file instead of waiting in memory.
        tx.batch_execute("SET LOCAL lock_timeout = '100ms'")
            .await
            .map_err(pg_err(ctx))?;
        // Rows locked in account order, as the sweep and rekey lock them: two replicas'
        // transactions then never wait on each other in a cycle (a deadlock).
        let mut order: Vec<usize> = (0..outcomes.len()).collect();
        order.sort_by_key(|&i| outcomes[i].account_id());
        // All outcomes in flight at once on the one connection: tokio-postgres pipelines
        // them (sent in this order, answered in order), so a batch costs a few round trips
        // instead of two per outcome. The first failure fails the transaction.
        let recorded = futures::future::try_join_all(
            order.iter().map(|&i| record(&tx, &self.keys, outcomes[i])),
        )
        .await?;
        let mut results = vec![Recorded::Applied; outcomes.len()];
        for (&i, r) in order.iter().zip(recorded) {
            results[i] = r;
        }
        tx.commit().await.map_err(pg_err(ctx))?;
        Ok(results)
    }

    async fn commit_group(&mut self, batch: Vec<(Outcome, Reply)>) {
        let outcomes: Vec<&Outcome> = batch.iter().map(|(o, _)| o).collect();
        let result = self.commit(&outcomes).await;
        // A lost connection fails every outcome alike; anything else may be one bad outcome,
        // which must not hold the others hostage: then commit each alone.
        if let Err(e) = &result
            && batch.len() > 1
            && !e.is_transient()
        {
            for one in batch {
                Box::pin(self.commit_group(vec![one])).await;
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

    /// A few more tries before closing: what is still deferred after them waits for the
    /// next start in the recovery file.
    async fn close_retries(&mut self) {
        for _ in 0..super::CLOSE_RETRIES {
            self.retry_deferred().await;
            if self.deferrals.is_empty() {
                break;
            }
            tokio::time::sleep(super::CLOSE_RETRY_EVERY).await;
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
        match result {
            Ok((_, refused)) => self.deferrals.committed(&refused),
            Err(e) => self.deferrals.retry_failed(&e),
        }
    }
}

/// Whether a PostgreSQL error is worth retrying: the connection or server went away, or the
/// transaction lost a race (serialization, deadlock) or was cancelled.
pub fn is_transient(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if e.code().is_none() {
        // No SQLSTATE: transient only when talking to the server failed (I/O, a timeout),
        // not for a client-side mistake (a type mismatch, an unexpected row count).
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            if s.is::<std::io::Error>() {
                return true;
            }
            source = s.source();
        }
        return e.to_string().contains("timed out");
    }
    match e.code() {
        Some(code) => {
            let c = code.code();
            c.starts_with("08") // connection exception
                || c.starts_with("53") // insufficient resources (disk full, too many connections)
                || c.starts_with("57P") // admin shutdown, crash shutdown, cannot connect now
                || c == "40001" // serialization failure
                || c == "40P01" // deadlock
                || c == "55P03" // lock not available
                || c == "57014" // query cancelled (statement_timeout)
        }
        None => false,
    }
}
