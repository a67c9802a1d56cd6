//! The store's errors: `Refusal`s, which a user caused and can act on (each names the
//! account, file or setting and what to do), apart from the failures of opening, committing
//! and talking to the database. `is_transient` says which failures are worth retrying.

use crate::model::Status;
use std::path::PathBuf;

/// The error of an import whose sender stopped before the end: nothing was written.
pub const IMPORT_ABORTED: &str = "import aborted before its end: nothing imported";

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
    /// A refusal: the request was understood, and saying no leaves everything as it was.
    #[error(transparent)]
    Refused(Box<Refusal>),
    #[error(
        "database {path}: cannot switch to WAL journal mode (got {mode:?}); is it on a network file system?"
    )]
    NotWal { path: PathBuf, mode: String },
    #[error("stored status {value:?}: {message}")]
    StoredStatus { value: String, message: String },
    #[error(
        "commit failed, outcome not stored (will be retried after the lease expires): {message}"
    )]
    NotStored { message: String },
    #[error("the store's worker thread has stopped")]
    Closed,
    /// A write held until the start-up checks ended, and they failed: nothing is written.
    #[error("not written: the store failed its start-up checks: {message}")]
    ChecksFailed { message: String },
    #[error(
        "store {path}: {message}; stopping (see docs/src/durability.md). Restore the database file, then start again: rotations not committed are in the recovery file beside it"
    )]
    Lost { path: PathBuf, message: String },
    #[error(
        "database {path} is damaged: {problems}. Not used: restore it from a backup or `sqlite3 {path} .recover` into a new file (see docs/src/durability.md)"
    )]
    Damaged { path: PathBuf, problems: String },
    #[error(transparent)]
    Crypto(#[from] crate::crypto::CryptoError),
    #[error(
        "cannot connect to PostgreSQL at {url}: {message} (check store.url, and that the server is up and reachable)"
    )]
    PgConnect { url: String, message: String },
    /// A setting that would let COMMIT return before a rotation is on disk.
    #[error(
        "PostgreSQL {url}: {found}: a COMMIT could return before the rotated refresh token is on disk, and a crash would lose it (the old one is already dead). Not opened: {fix}"
    )]
    PgNotDurable {
        url: String,
        found: String,
        fix: &'static str,
    },
    #[error("PostgreSQL {url}: migration {version} failed: {message}")]
    PgMigration {
        url: String,
        version: usize,
        message: String,
    },
    /// `message` is built from the server's code, message, table and constraint, never its
    /// DETAIL, which can quote a whole row (tokens included).
    #[error("PostgreSQL error while trying to {context}: {message}")]
    Postgres {
        context: &'static str,
        message: String,
        transient: bool,
    },
    #[error("PostgreSQL: no connection to {context}: {message}")]
    PgPool {
        context: &'static str,
        message: String,
    },
    #[error("{what} needs the SQLite store; this store is {store}")]
    SqliteOnly { what: &'static str, store: String },
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
            StoreError::Postgres { transient, .. } => *transient,
            // The pool could not hand out a connection: the server is down or saturated.
            StoreError::PgPool { .. } => true,
            _ => false,
        }
    }
}

impl From<Refusal> for StoreError {
    fn from(r: Refusal) -> Self {
        StoreError::Refused(Box::new(r))
    }
}

/// A request the store says no to, leaving everything as it was. Texts are shown to users.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error(
        "account {id} ({provider}/{subject}) is being refreshed right now; nothing imported, try again in a minute"
    )]
    UpsertUnderLease {
        id: i64,
        provider: String,
        subject: String,
    },
    #[error(
        "account {id} ({provider}/{subject}) was refreshed after these tokens were obtained (obtained_at is older than its last refresh); nothing imported: drop that line or give a newer token response"
    )]
    UpsertOlderTokens {
        id: i64,
        provider: String,
        subject: String,
    },
    #[error(
        "account {provider}/{subject} was created and removed by others while being imported; nothing imported, try again"
    )]
    UpsertRaced { provider: String, subject: String },
    #[error("{IMPORT_ABORTED}")]
    ImportAborted,
    #[error(
        "account {id} ({provider}/{subject}) is a user's account, not an app token: choose another app name"
    )]
    NotAnApp {
        id: i64,
        provider: String,
        subject: String,
    },
    #[error("account {id} is disabled by an admin: it is not refreshed")]
    MarkDueDisabled { id: i64 },
    #[error(
        "account {id} is {status}: it is not refreshed automatically. Reconnect it, or pass --force to try its stored refresh token once more"
    )]
    MarkDueFlagged { id: i64, status: Status },
    #[error(
        "database {store} has schema version {version}, this refreshd uses {current}: run `refreshd run` (or `refreshd accounts import`) once to migrate it"
    )]
    SchemaBehind {
        store: String,
        version: i64,
        current: usize,
    },
    #[error("rekey needs store.encryption_key_file: the key every token is sealed under")]
    RekeyWithoutKey,
    #[error(
        "{table}.{column} of row {row} holds text where an integer belongs: fix that row in the source, then copy again"
    )]
    CopyTextInInteger {
        table: &'static str,
        column: &'static str,
        /// The row's id as `Value`'s Debug shows it, never another value of the row.
        row: String,
    },
    #[error(
        "{leased} account(s) of {store} are being refreshed right now: stop every refreshd using it, then copy"
    )]
    CopyWhileLeased { leased: i64, store: String },
    #[error(
        "{to} already holds {rows} rows that are not a partial copy of {from} (row {last} differs): copy into an empty store"
    )]
    CopyNotPartial {
        to: String,
        rows: &'static str,
        from: String,
        last: i64,
    },
    #[error(
        "verification failed for {table}: {n_from} rows (sha256 {sum_from}) in {from}, {n_to} rows (sha256 {sum_to}) in {to}; was a daemon writing to either store?"
    )]
    CopyMismatch {
        table: &'static str,
        n_from: u64,
        sum_from: String,
        from: String,
        n_to: u64,
        sum_to: String,
        to: String,
    },
}
