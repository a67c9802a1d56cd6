//! The PostgreSQL schema: the migrations (numbered as SQLite's, so one version means the
//! same schema on both backends), applied under an advisory lock, and the version read back.

use super::errors::pg_err;
use crate::store::error::StoreError;
use tokio_postgres::GenericClient;

/// Numbered like `sqlite::schema::MIGRATIONS` (the same changes, in PostgreSQL's dialect), so one
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
    // 2: the crash window (see sqlite/schema.rs).
    r#"
ALTER TABLE accounts ADD COLUMN interrupted_at BIGINT;
"#,
    // 3: web connects in progress (see sqlite/schema.rs).
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
    // 4: the audit trail (see sqlite/schema.rs).
    r#"
CREATE TABLE audit_log (
    id         BIGSERIAL PRIMARY KEY,
    at         BIGINT  NOT NULL,
    account_id BIGINT  NOT NULL,
    provider   TEXT    NOT NULL,
    subject    TEXT    NOT NULL,
    action     TEXT    NOT NULL,
    actor      TEXT    NOT NULL,
    via        TEXT    NOT NULL,
    detail     TEXT
);
CREATE INDEX audit_log_account ON audit_log (account_id, at);
"#,
    // 5: how an account's token is renewed (see sqlite/schema.rs).
    r#"
ALTER TABLE accounts ADD COLUMN grant_type TEXT NOT NULL DEFAULT 'refresh_token'
    CHECK (grant_type IN ('refresh_token', 'client_credentials'));
"#,
    // 6: the app tokens, found without reading every account (see sqlite/schema.rs).
    r#"
CREATE INDEX accounts_apps ON accounts (id) WHERE grant_type = 'client_credentials';
"#,
    // 7: SQLite drops `refresh_log_at` here; PostgreSQL keeps it. Replicas on several hosts
    // stamp `at` with their own clocks and draw ids from one sequence in an order their
    // commits need not follow, so the id is no stand-in for `at` when pruning, and the log's
    // rows are written by one multi-row INSERT per group (`group.rs`), not one per refresh.
    // Kept as a version, so one number means the same tables on both backends.
    r#"
SELECT 1;
"#,
    // 8: the accounts table leaves a fifth of each page free. A claim sets only the lease
    // columns (`lease_owner`, `lease_expires_at`, `interrupted_at`), none of them indexed
    // nor in an index's predicate, so it can be a HOT update (the new row version on the same
    // page, no index entry written) when its page has room; an imported table's pages are
    // full (fillfactor 100), so every claim wrote a new entry into each of the table's
    // indexes. Applies to pages written from now on: an existing table gets it for the old
    // pages with `VACUUM FULL accounts` (or pg_repack). SQLite has no such setting (a no-op
    // there).
    r#"
ALTER TABLE accounts SET (fillfactor = 80);
"#,
];

/// Taken (per database) while migrating: "refreshd" in ASCII.
const MIGRATION_LOCK: i64 = 0x7265_6672_6573_6864;

pub(crate) async fn schema_version(client: &impl GenericClient) -> Result<usize, StoreError> {
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
pub(crate) async fn migrate(
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
