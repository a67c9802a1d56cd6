//! Checks of a SQLite store's health: SQLite's own page checks (`quick_check`, or the full
//! `integrity_check`) and whether the file and its directory can take a write. `run`
//! refuses a store that fails `quick_check`; `check` reports all of it.

use crate::store::error::StoreError;
use rusqlite::{Connection, OpenFlags};
use std::path::Path;

/// Most problems listed.
const MAX_PROBLEMS: usize = 20;

fn pages(conn: &Connection, pragma: &str) -> Result<Vec<String>, StoreError> {
    let sql = format!("PRAGMA {pragma}({MAX_PROBLEMS})");
    let mut stmt = conn.prepare(&sql).map_err(|source| StoreError::Sqlite {
        context: "check the database pages",
        source,
    })?;
    let rows: Vec<String> = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .and_then(|rows| rows.collect())
        .map_err(|source| StoreError::Sqlite {
            context: "check the database pages",
            source,
        })?;
    Ok(rows.into_iter().filter(|r| r != "ok").collect())
}

/// `PRAGMA quick_check`: what is wrong, empty when nothing is.
pub fn quick(conn: &Connection) -> Result<Vec<String>, StoreError> {
    pages(conn, "quick_check")
}

/// What `refreshd check` says about a SQLite store: (line, fine) pairs.
pub fn report(path: &Path, full: bool) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    let conn = match Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    ) {
        Ok(c) => c,
        Err(e) => return vec![(format!("store: cannot open {}: {e}", path.display()), false)],
    };
    let _ = conn.busy_timeout(std::time::Duration::from_secs(5));
    let which = if full {
        "integrity_check"
    } else {
        "quick_check"
    };
    match pages(&conn, which) {
        Ok(p) if p.is_empty() => out.push((format!("store: {which} ok"), true)),
        Ok(p) => out.push((
            format!(
                "store: {which} FAILED, the database is damaged: {}. Restore it from a backup or `sqlite3 {} .recover` into a new file (see docs/src/durability.md)",
                p.join("; "),
                path.display()
            ),
            false,
        )),
        Err(e) => out.push((
            format!(
                "store: {which} FAILED, the database is damaged or not a database: {e} (see docs/src/durability.md)"
            ),
            false,
        )),
    }
    out.push(match writable(path) {
        Ok(()) => ("store: writable".to_string(), true),
        Err(e) => (
            format!(
                "store: NOT writable: {e}. refreshd must write the database, its WAL and its recovery files: fix the file's and directory's permissions or mount"
            ),
            false,
        ),
    });
    out
}

/// Whether refreshd could write: the database (a write rolled back) and its directory (a
/// scratch file created and removed: the WAL and recovery files live there).
pub fn writable(path: &Path) -> Result<(), String> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| format!("cannot open {} for writing: {e}", path.display()))?;
    let _ = conn.busy_timeout(std::time::Duration::from_secs(5));
    conn.execute_batch("BEGIN IMMEDIATE; CREATE TABLE refreshd_write_probe(x); ROLLBACK;")
        .map_err(|e| {
            let _ = conn.execute_batch("ROLLBACK");
            format!("database {}: {e}", path.display())
        })?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    tempfile::Builder::new()
        .prefix(".refreshd-write-probe")
        .tempfile_in(dir)
        .map(drop)
        .map_err(|e| format!("directory {}: {e}", dir.display()))
}
