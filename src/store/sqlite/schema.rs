//! The SQLite schema: numbered migrations (numbered as PostgreSQL's, so one version means
//! the same schema on both backends), applied at start-up in one transaction.

use rusqlite::Connection;

/// Each entry is one migration; its number is its index + 1 (kept in `PRAGMA user_version`).
/// Never edit a released migration: append a new one.
pub const MIGRATIONS: &[&str] = &[
    // 1: accounts and the refresh log.
    r#"
CREATE TABLE accounts (
    id                 INTEGER PRIMARY KEY,
    provider           TEXT    NOT NULL,
    subject            TEXT    NOT NULL,
    label              TEXT,
    access_token       TEXT    NOT NULL,
    refresh_token      TEXT    NOT NULL,
    scope              TEXT    NOT NULL DEFAULT '',
    token_type         TEXT    NOT NULL DEFAULT 'Bearer',
    access_expires_at  INTEGER NOT NULL,
    refresh_expires_at INTEGER,
    next_refresh_at    INTEGER NOT NULL,
    status             TEXT    NOT NULL DEFAULT 'active'
                       CHECK (status IN ('active', 'expiring', 'needs_reauth', 'disabled')),
    reauth_reason      TEXT,
    reauth_flagged_at  INTEGER,
    failures           INTEGER NOT NULL DEFAULT 0,
    last_error         TEXT,
    last_refreshed_at  INTEGER,
    lease_owner        TEXT,
    lease_expires_at   INTEGER,
    generation         INTEGER NOT NULL DEFAULT 0,
    created_at         INTEGER NOT NULL,
    updated_at         INTEGER NOT NULL,
    UNIQUE (provider, subject)
);
-- The table is the queue: only refreshable rows are indexed by due time. The claim,
-- next-due and sweep queries name their index (INDEXED BY): without statistics the planner
-- would pick accounts_status and sort every active row.
CREATE INDEX accounts_due ON accounts (next_refresh_at) WHERE status IN ('active', 'expiring');
CREATE INDEX accounts_status ON accounts (status, provider);
CREATE INDEX accounts_refresh_expiry ON accounts (refresh_expires_at)
    WHERE status IN ('active', 'expiring') AND refresh_expires_at IS NOT NULL;

CREATE TABLE refresh_log (
    id          INTEGER PRIMARY KEY,
    account_id  INTEGER NOT NULL,
    at          INTEGER NOT NULL,
    outcome     TEXT    NOT NULL,
    http_status INTEGER,
    error       TEXT,
    duration_ms INTEGER
);
CREATE INDEX refresh_log_account ON refresh_log (account_id, at);
CREATE INDEX refresh_log_at ON refresh_log (at);
"#,
    // 2: when a claim finds the lease of an earlier attempt never given back (the process
    // died, or its outcome could not be stored), that lease's end: the crash window. An
    // invalid_grant right after it most likely means the provider rotated the token in an
    // answer that was lost.
    r#"
ALTER TABLE accounts ADD COLUMN interrupted_at INTEGER;
"#,
    // 3: web connects in progress (single-use states), in the store so that any replica can
    // take the callback and a restart forgets none. Keyed by the SHA-256 of the state.
    r#"
CREATE TABLE connect_states (
    key        TEXT    PRIMARY KEY,
    provider   TEXT    NOT NULL,
    verifier   TEXT,
    label      TEXT,
    account    INTEGER,
    scopes     TEXT    NOT NULL DEFAULT '',
    expires_at INTEGER NOT NULL,
    used       INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX connect_states_expiry ON connect_states (expires_at);
"#,
    // 4: the audit trail: admins' removals, disables, enables and revocations, with who and
    // through what. No foreign key: a row outlives its account (provider and subject copied).
    r#"
CREATE TABLE audit_log (
    id         INTEGER PRIMARY KEY,
    at         INTEGER NOT NULL,
    account_id INTEGER NOT NULL,
    provider   TEXT    NOT NULL,
    subject    TEXT    NOT NULL,
    action     TEXT    NOT NULL,
    actor      TEXT    NOT NULL,
    via        TEXT    NOT NULL,
    detail     TEXT
);
CREATE INDEX audit_log_account ON audit_log (account_id, at);
"#,
    // 5: how an account's token is renewed: `refresh_token` (a user's account) or
    // `client_credentials` (an app token: no user, no refresh token). Existing rows are
    // users' accounts.
    r#"
ALTER TABLE accounts ADD COLUMN grant_type TEXT NOT NULL DEFAULT 'refresh_token'
    CHECK (grant_type IN ('refresh_token', 'client_credentials'));
"#,
    // 6: the app tokens, found without reading every account: each start (and reload)
    // lists them to warn about the ones the config dropped, which read all of a million
    // accounts (2 s) without it. Queries name the grant as this literal to use it.
    r#"
CREATE INDEX accounts_apps ON accounts (id) WHERE grant_type = 'client_credentials';
"#,
    // 7: the refresh log's `at` index goes: one b-tree insert less per refresh, on the
    // writer every refresh waits for. Its rowid grows with `at` (the processes sharing a
    // file stamp both from one host's clock, in commit order; a log brought over by `store
    // copy` keeps its ids, and mostly their order), so the newest rows and the prune walk
    // the rowid instead (`queries::recent_outcomes`, `queries::prune_log`); the prune still
    // compares each row's `at`, so an id out of order only delays a row's turn.
    r#"
DROP INDEX IF EXISTS refresh_log_at;
"#,
    // 8: PostgreSQL leaves room in the accounts table's pages (fillfactor) so that a claim
    // can be a HOT update; SQLite has no such setting. Kept as a version, so one number
    // means the same tables on both backends.
    r#"
SELECT 1;
"#,
];

/// Applies every migration newer than the database, all in one transaction.
/// Returns (from, to) versions.
pub fn migrate(conn: &mut Connection) -> Result<(usize, usize), (usize, rusqlite::Error)> {
    let current: usize = conn
        .query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
        .map_err(|e| (0, e))? as usize;
    if current > MIGRATIONS.len() {
        // A newer refreshd wrote this database; refuse rather than guess.
        return Err((
            current,
            rusqlite::Error::InvalidParameterName(format!(
                "database schema version {current} is newer than this refreshd knows ({})",
                MIGRATIONS.len()
            )),
        ));
    }
    if current == MIGRATIONS.len() {
        return Ok((current, current));
    }
    // IMMEDIATE, then read the version again: a second process opening a fresh database at
    // the same moment waits for the first one's migration instead of repeating it.
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(|e| (current, e))?;
    let current: usize = tx
        .query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
        .map_err(|e| (current, e))? as usize;
    if current >= MIGRATIONS.len() {
        return Ok((current, current));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        tx.execute_batch(sql).map_err(|e| (i + 1, e))?;
    }
    tx.pragma_update(None, "user_version", MIGRATIONS.len() as i64)
        .map_err(|e| (MIGRATIONS.len(), e))?;
    tx.commit().map_err(|e| (MIGRATIONS.len(), e))?;
    Ok((current, MIGRATIONS.len()))
}

/// The schema version the database carries (`PRAGMA user_version`).
pub fn version(conn: &Connection) -> Result<usize, crate::store::error::StoreError> {
    conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
        .map(|v| v as usize)
        .map_err(|source| crate::store::error::StoreError::Sqlite {
            context: "read the schema version",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrates_fresh_and_is_idempotent() {
        let mut c = Connection::open_in_memory().unwrap();
        assert_eq!(migrate(&mut c).unwrap(), (0, MIGRATIONS.len()));
        assert_eq!(
            migrate(&mut c).unwrap(),
            (MIGRATIONS.len(), MIGRATIONS.len())
        );
    }

    /// Migration 7 drops the log's `at` index; the prune walks the rowid in chunks of
    /// 10,000, past a row stamped ahead at the log's start and across chunks, and takes a
    /// row stamped back by the clock as soon as it is older than the cutoff.
    #[test]
    fn the_log_has_no_at_index_and_the_prune_walks_the_rowid_in_chunks() {
        let mut c = Connection::open_in_memory().unwrap();
        migrate(&mut c).unwrap();
        let indexes: Vec<String> = c
            .prepare(
                "SELECT name FROM sqlite_master WHERE tbl_name = 'refresh_log' AND type = 'index'",
            )
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(indexes, ["refresh_log_account"]);
        // One row stamped ahead (1,000,000 s), 25,000 rows at 0..25,000 s, then one
        // stamped 100 by a clock that stepped back.
        c.execute_batch(
            "INSERT INTO refresh_log (account_id, at, outcome) VALUES (1, 1000000, 'rotated');
             WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 24999)
             INSERT INTO refresh_log (account_id, at, outcome) SELECT 1, i, 'rotated' FROM n;
             INSERT INTO refresh_log (account_id, at, outcome) VALUES (1, 100, 'rotated');",
        )
        .unwrap();
        let count =
            |c: &Connection, sql: &str| -> i64 { c.query_row(sql, [], |r| r.get(0)).unwrap() };
        assert_eq!(
            crate::store::sqlite::queries::prune_log(&c, 22_000).unwrap(),
            22_001
        );
        assert_eq!(
            count(&c, "SELECT MIN(at) FROM refresh_log WHERE id > 1"),
            22_000
        );
        assert_eq!(count(&c, "SELECT COUNT(*) FROM refresh_log"), 3_001);
        assert_eq!(
            crate::store::sqlite::queries::prune_log(&c, 30_000).unwrap(),
            3_000
        );
        assert_eq!(count(&c, "SELECT at FROM refresh_log"), 1_000_000);
    }

    /// Rows stamped ahead at the log's start are read once, not again for every stretch:
    /// 9,990 of them before 50,000 old rows take 7 stretches (each its own statement),
    /// where re-reading them made each stretch delete 10 rows (5,000 stretches).
    #[test]
    fn rows_stamped_ahead_at_the_logs_start_are_walked_past_once() {
        let mut c = Connection::open_in_memory().unwrap();
        migrate(&mut c).unwrap();
        c.execute_batch(
            "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 59989)
             INSERT INTO refresh_log (account_id, at, outcome)
                 SELECT 1, CASE WHEN i < 9990 THEN 1000000 ELSE i END, 'rotated' FROM n;",
        )
        .unwrap();
        let (deleted, stretches) =
            crate::store::sqlite::queries::prune_log_in_stretches(&c, 500_000).unwrap();
        assert_eq!(deleted, 50_000);
        assert!(stretches <= 7, "{stretches} stretches");
        let left: i64 = c
            .query_row(
                "SELECT COUNT(*) FROM refresh_log WHERE at = 1000000",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(left, 9_990);
    }

    #[test]
    fn refuses_newer_schema() {
        let mut c = Connection::open_in_memory().unwrap();
        c.pragma_update(None, "user_version", 999).unwrap();
        let (v, e) = migrate(&mut c).unwrap_err();
        assert_eq!(v, 999);
        assert!(e.to_string().contains("newer"));
    }
}
