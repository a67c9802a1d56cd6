//! Opening a SQLite store: the file created private, the connection's durability
//! settings, the start-up checks (`quick_check`, the sealing keys), migrations, the
//! instance lock and the take-over of dead processes' work, in the order that writes
//! nothing to a store before its checks pass. `Opening::Gated` (the daemon) hands the
//! store out before the checks end: they run on a thread of their own and report to the
//! worker (`Job::Checked`), whose gate holds every write until then.

use super::{Job, adopt_dead, check, queries, schema};
use crate::crypto::Keyring;
use crate::store::commit::COMMIT_WAIT;
use crate::store::deferred::Health;
use crate::store::error::{Refusal, StoreError};
use crate::store::gate::CheckHook;
use crate::store::types::StoreOptions;
use crate::store::{instance, recovery};
use rusqlite::{Connection, OpenFlags};
use std::path::Path;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

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
    for key_id in queries::sealing_key_ids(conn)? {
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

/// Opens a connection with the durability settings every process sharing the file uses,
/// creating the file (private to its owner) when it is missing.
pub(crate) fn connect(opts: &StoreOptions) -> Result<Connection, StoreError> {
    connect_to(opts, true)
}

/// `connect` to a file that must exist: never created here, so a store file deleted
/// meanwhile stays deleted for the store's watch to report.
pub(crate) fn connect_existing(opts: &StoreOptions) -> Result<Connection, StoreError> {
    connect_to(opts, false)
}

fn connect_to(opts: &StoreOptions, create: bool) -> Result<Connection, StoreError> {
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
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if create {
        create_private(&opts.path)?;
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
    let conn = Connection::open_with_flags(&opts.path, flags).map_err(open_err)?;
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
    // The query planner stability guarantee: without it, binding a new LIMIT to a cached
    // statement (the claim's) expires it, and every claim is prepared again.
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )
    .map_err(open_err)?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

pub(super) fn prepare(
    opts: &StoreOptions,
    owner: &str,
    health: &Health,
) -> Result<(Connection, instance::Instance), StoreError> {
    let mut conn = connect(opts)?;
    // A damaged file is refused before anything (a migration included) writes to it.
    refuse_damaged(&conn, &opts.path)?;
    schema::migrate(&mut conn).map_err(|(version, source)| StoreError::Migration {
        path: opts.path.clone(),
        version,
        source,
    })?;
    check_keys(&conn, &opts.path, &opts.keyring)?;
    let lock = instance::StoreLock::acquire(&opts.path)?;
    let me = instance::Instance::acquire(&opts.path, owner, &lock)?;
    take_over_dead(&mut conn, opts, owner, health, &lock)?;
    Ok((conn, me))
}

/// Refuses a file that fails `quick_check`.
fn refuse_damaged(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let damaged = |problems: String| StoreError::Damaged {
        path: path.to_path_buf(),
        problems,
    };
    let problems = check::quick(conn).map_err(|e| damaged(e.to_string()))?;
    if problems.is_empty() {
        Ok(())
    } else {
        Err(damaged(problems.join("; ")))
    }
}

/// The daemon's opening: a store whose schema is current is handed out before its checks
/// end, its connection `query_only`; the checks run on their own thread and connection
/// and report to the worker (`Job::Checked`), which writes nothing before. A store that
/// needs a migration (a write), or holds a dead process's recovery file (rotations the
/// database does not have yet: nothing may read the rows before they are replayed), is
/// checked first, as `prepare` does.
pub(super) fn prepare_gated(
    opts: &StoreOptions,
    owner: &str,
    health: &Health,
    hook: Option<CheckHook>,
    worker: std_mpsc::Sender<Job>,
) -> Result<(Connection, instance::Instance), StoreError> {
    let conn = connect(opts)?;
    if schema::version(&conn)? != schema::MIGRATIONS.len()
        || !recovery::orphans(&opts.path, owner).is_empty()
    {
        drop(conn);
        return prepare(opts, owner, health);
    }
    set_query_only(&conn, &opts.path, true)?;
    let lock = instance::StoreLock::acquire(&opts.path)?;
    let me = instance::Instance::acquire(&opts.path, owner, &lock)?;
    drop(lock);
    health.checks.hold();
    let (path, keys) = (opts.path.clone(), opts.keyring.clone());
    std::thread::Builder::new()
        .name("refreshd-check".into())
        .spawn(move || {
            if let Some(hook) = hook {
                hook();
            }
            let started = std::time::Instant::now();
            let checked = run_checks(&path, &keys).map(|()| started.elapsed());
            let _ = worker.send(Job::Checked(checked));
        })
        .map_err(|source| StoreError::Create {
            path: opts.path.clone(),
            source,
        })?;
    Ok((conn, me))
}

/// The start-up checks on a connection of their own (reading only): `quick_check`, then
/// the sealing keys.
fn run_checks(path: &Path, keys: &Keyring) -> Result<(), StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|source| StoreError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let _ = conn.busy_timeout(Duration::from_secs(5));
    refuse_damaged(&conn, path)?;
    check_keys(&conn, path, keys)
}

/// `PRAGMA query_only`: SQLite itself refuses every write while it is on.
pub(super) fn set_query_only(conn: &Connection, path: &Path, on: bool) -> Result<(), StoreError> {
    conn.pragma_update(None, "query_only", on)
        .map_err(|source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        })
}

/// Replays dead processes' recovery files and takes over their leases (store lock held).
/// Others' `watch` skips rounds while the store lock is held, so keep it short: try with
/// the commit wait first, and only a second time with the full busy_timeout (a failure
/// then stops the start).
pub(super) fn take_over_dead(
    conn: &mut Connection,
    opts: &StoreOptions,
    owner: &str,
    health: &Health,
    lock: &instance::StoreLock,
) -> Result<(), StoreError> {
    let open_err = |source| StoreError::Open {
        path: opts.path.clone(),
        source,
    };
    conn.busy_timeout(COMMIT_WAIT).map_err(open_err)?;
    let quick = adopt_dead(conn, &opts.keyring, &opts.path, owner, health, lock);
    conn.busy_timeout(opts.busy_timeout).map_err(open_err)?;
    if quick.is_err() {
        adopt_dead(conn, &opts.keyring, &opts.path, owner, health, lock)?;
    }
    Ok(())
}

pub(super) fn prepare_read_only(opts: &StoreOptions) -> Result<Connection, StoreError> {
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
