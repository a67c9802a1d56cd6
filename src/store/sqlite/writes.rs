//! The SQLite write path: imports (`upsert`) and refresh outcomes (`record`), and the
//! refresh-log rows they leave. `postgres/writes.rs` holds the same functions, in the same
//! order, under the same names.

use crate::crypto::Keyring;
use crate::model::app_subject;
use crate::store::error::StoreError;
use crate::store::record::{self, Update, give_back_lease};
use crate::store::rules;
use crate::store::types::{Actor, AppAdded, AuditAction, NewAccount, NewApp, Outcome, Recorded};
use rusqlite::{Connection, OptionalExtension, Transaction, params};

fn sql_err(context: &'static str) -> impl Fn(rusqlite::Error) -> StoreError {
    move |source| StoreError::Sqlite { context, source }
}

/// Accounts written by one INSERT of an import (a batch of `accounts import` is 1000: a
/// multiple of it leaves no odd tail). One statement per row spent a third of an import's
/// time on each statement's own work (finding it in the cache, opening a cursor per index,
/// halting), not on the rows.
const INSERT_ROWS: usize = 50;
/// Refresh-log rows written by one INSERT (one parameter each).
const LOG_ROWS: usize = 250;

/// The INSERT of `n` new accounts: ?1 is `now`, then 14 parameters per account.
fn insert_sql(n: usize) -> String {
    let mut sql = String::from(
        "INSERT INTO accounts (id, provider, subject, label, access_token, refresh_token,
            scope, token_type, access_expires_at, refresh_expires_at, next_refresh_at,
            status, reauth_reason, reauth_flagged_at, created_at, updated_at) VALUES ",
    );
    for k in 0..n {
        let p = 2 + 14 * k;
        if k > 0 {
            sql.push(',');
        }
        sql.push('(');
        for c in 0..14 {
            sql.push_str(&format!("?{},", p + c));
        }
        sql.push_str("?1,?1)");
    }
    sql.push_str(" ON CONFLICT (provider, subject) DO NOTHING RETURNING id");
    sql
}

/// The refresh log's "imported" rows of `n` accounts: ?1 is `now`, then one id each.
fn log_sql(n: usize) -> String {
    let mut sql = String::from("INSERT INTO refresh_log (account_id, at, outcome) VALUES ");
    for k in 0..n {
        if k > 0 {
            sql.push(',');
        }
        sql.push_str(&format!("(?{},?1,'imported')", k + 2));
    }
    sql
}

/// The statement text for `n` rows: built once for a full chunk, else for this call.
fn chunk_sql(
    n: usize,
    full: usize,
    cache: &'static std::sync::OnceLock<String>,
    build: fn(usize) -> String,
) -> std::borrow::Cow<'static, str> {
    if n == full {
        std::borrow::Cow::Borrowed(cache.get_or_init(|| build(full)).as_str())
    } else {
        std::borrow::Cow::Owned(build(n))
    }
}

/// Inserts or updates accounts by (provider, subject), all in the caller's transaction.
/// Returns (id, inserted) per account in input order.
///
/// New accounts are written by multi-row INSERTs with their ids chosen here (after the
/// largest one: the transaction holds the write lock, so nothing takes them meanwhile), so
/// their tokens are sealed for their ids at once; the INSERT skips an account that exists
/// (its chosen id stays unused) and returns the ids it wrote. Only an account that exists
/// already is looked up, checked (`rules::check_upsert`) and updated. Each account's
/// refresh-log row follows, many to a statement.
pub fn upsert(
    tx: &Transaction<'_>,
    keys: &Keyring,
    accounts: &[NewAccount],
    now: i64,
) -> Result<Vec<(i64, bool)>, StoreError> {
    static INSERT_FULL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    static LOG_FULL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let mut next_id: i64 = tx
        .query_row("SELECT COALESCE(MAX(id), 0) + 1 FROM accounts", [], |r| {
            r.get(0)
        })
        .map_err(sql_err("choose ids for imported accounts"))?;
    let mut out = Vec::with_capacity(accounts.len());
    let mut written: Vec<i64> = Vec::with_capacity(INSERT_ROWS);
    for chunk in accounts.chunks(INSERT_ROWS) {
        let sql = chunk_sql(chunk.len(), INSERT_ROWS, &INSERT_FULL, insert_sql);
        let mut stmt = tx
            .prepare_cached(&sql)
            .map_err(sql_err("insert imported accounts"))?;
        let bind = |stmt: &mut rusqlite::CachedStatement<'_>| -> rusqlite::Result<()> {
            stmt.raw_bind_parameter(1, now)?;
            for (k, a) in chunk.iter().enumerate() {
                let (id, p) = (next_id + k as i64, 2 + 14 * k);
                let new = record::imported(a, now);
                stmt.raw_bind_parameter(p, id)?;
                stmt.raw_bind_parameter(p + 1, &a.provider)?;
                stmt.raw_bind_parameter(p + 2, &a.subject)?;
                stmt.raw_bind_parameter(p + 3, &a.label)?;
                stmt.raw_bind_parameter(p + 4, new.access_token(keys, id))?;
                stmt.raw_bind_parameter(p + 5, new.refresh_token(keys, id))?;
                stmt.raw_bind_parameter(p + 6, &new.scope)?;
                stmt.raw_bind_parameter(p + 7, &a.tokens.token_type)?;
                stmt.raw_bind_parameter(p + 8, new.access_expires_at)?;
                stmt.raw_bind_parameter(p + 9, new.refresh_expires_at)?;
                stmt.raw_bind_parameter(p + 10, a.next_refresh_at)?;
                stmt.raw_bind_parameter(p + 11, a.status.as_str())?;
                stmt.raw_bind_parameter(p + 12, new.reauth_reason)?;
                stmt.raw_bind_parameter(p + 13, new.reauth_flagged_at)?;
            }
            Ok(())
        };
        written.clear();
        bind(&mut stmt)
            .and_then(|()| {
                let mut rows = stmt.raw_query();
                while let Some(r) = rows.next()? {
                    written.push(r.get(0)?);
                }
                Ok(())
            })
            .map_err(sql_err("insert imported accounts"))?;
        drop(stmt);
        // RETURNING gives the written ids in any order; most often all of them.
        written.sort_unstable();
        for (k, a) in chunk.iter().enumerate() {
            let id = next_id + k as i64;
            if written.binary_search(&id).is_ok() {
                out.push((id, true));
            } else {
                let new = record::imported(a, now);
                out.push((update_existing(tx, keys, a, &new, now)?, false));
            }
        }
        next_id += chunk.len() as i64;
    }
    for chunk in out.chunks(LOG_ROWS) {
        let sql = chunk_sql(chunk.len(), LOG_ROWS, &LOG_FULL, log_sql);
        tx.prepare_cached(&sql)
            .and_then(|mut stmt| {
                stmt.raw_bind_parameter(1, now)?;
                for (k, (id, _)) in chunk.iter().enumerate() {
                    stmt.raw_bind_parameter(k + 2, id)?;
                }
                stmt.raw_execute()
            })
            .map_err(sql_err("append refresh log"))?;
    }
    Ok(out)
}

/// The connection's setting an import changes (`import_settings`), to put back after it.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    temp_store: i64,
}

/// Keeps temporary files in memory for a streamed import, set outside any transaction
/// (SQLite refuses to move temporary storage inside one); returns the setting before, for
/// `restore_settings` once the import's transaction ended.
///
/// A statement that writes many rows keeps the pages it changes in a statement journal (to
/// undo itself alone on a constraint failure); past 64 KiB SQLite moves that journal to a
/// temporary file, and a multi-row INSERT then spent a third of its time writing there. In
/// memory it holds one statement's pages (a few hundred KiB).
pub fn import_settings(conn: &mut Connection) -> Result<Settings, StoreError> {
    let before = Settings {
        temp_store: conn
            .query_row("PRAGMA temp_store", [], |r| r.get(0))
            .map_err(sql_err("read the connection's settings"))?,
    };
    // 2: MEMORY.
    restore_settings(conn, Settings { temp_store: 2 })?;
    Ok(before)
}

/// Puts back the setting `import_settings` returned.
pub fn restore_settings(conn: &mut Connection, s: Settings) -> Result<(), StoreError> {
    conn.pragma_update(None, "temp_store", s.temp_store)
        .map_err(sql_err("set the connection's settings"))
}

/// Re-imports an account that exists: checked (`rules::check_upsert`), then its tokens,
/// schedule and flag replaced. Returns its id.
fn update_existing(
    tx: &Transaction<'_>,
    keys: &Keyring,
    a: &NewAccount,
    new: &record::Imported<'_>,
    now: i64,
) -> Result<i64, StoreError> {
    let (id, lease_expires_at, last_refreshed_at): (i64, Option<i64>, Option<i64>) = tx
        .prepare_cached(
            "SELECT id, lease_expires_at, last_refreshed_at FROM accounts
             WHERE provider = ?1 AND subject = ?2",
        )
        .and_then(|mut s| {
            s.query_row([&a.provider, &a.subject], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
        })
        .map_err(sql_err("look up account for import"))?;
    rules::check_upsert(id, a, lease_expires_at, last_refreshed_at, now)?;
    tx.prepare_cached(
        "UPDATE accounts SET label = COALESCE(?2, label), access_token = ?3,
            refresh_token = CASE WHEN ?4 = '' THEN refresh_token ELSE ?4 END,
            scope = ?5, token_type = ?6, access_expires_at = ?7,
            refresh_expires_at = CASE WHEN ?4 = '' THEN COALESCE(?8, refresh_expires_at) ELSE ?8 END,
            next_refresh_at = ?9, status = CASE WHEN status = 'disabled' THEN status ELSE ?10 END,
            reauth_reason = ?11, reauth_flagged_at = ?12, failures = 0,
            last_error = NULL, lease_owner = NULL, lease_expires_at = NULL,
            generation = generation + 1, updated_at = ?13
         WHERE id = ?1",
    )
    .and_then(|mut s| {
        s.execute(params![
            id,
            a.label,
            new.access_token(keys, id),
            new.refresh_token(keys, id),
            new.scope,
            a.tokens.token_type,
            new.access_expires_at,
            new.refresh_expires_at,
            a.next_refresh_at,
            a.status.as_str(),
            new.reauth_reason,
            new.reauth_flagged_at,
            now
        ])
    })
    .map_err(sql_err("update imported account"))?;
    Ok(id)
}

/// Adds an app token's row (grant `client_credentials`, no token yet, due now), or keeps
/// the existing one, rescoped and due now when the scope asked for changed.
pub fn add_app(tx: &Transaction<'_>, app: &NewApp, now: i64) -> Result<AppAdded, StoreError> {
    let subject = app_subject(&app.name);
    let existing: Option<(i64, String, String)> = tx
        .prepare_cached(
            "SELECT id, grant_type, scope FROM accounts WHERE provider = ?1 AND subject = ?2",
        )
        .and_then(|mut s| {
            s.query_row([&app.provider, &subject], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()
        })
        .map_err(sql_err("look up app token"))?;
    if let Some((id, grant, scope)) = existing {
        let kept = rules::existing_app(id, &grant, &scope, app)?;
        if kept == (AppAdded::Kept { id, rescoped: true }) {
            tx.prepare_cached(
                "UPDATE accounts SET scope = ?2, next_refresh_at = ?3, updated_at = ?3 WHERE id = ?1",
            )
            .and_then(|mut s| s.execute(params![id, app.scope, now]))
            .map_err(sql_err("rescope app token"))?;
        }
        return Ok(kept);
    }
    let id: i64 = tx
        .prepare_cached(
            "INSERT INTO accounts (provider, subject, label, access_token, refresh_token, scope,
                access_expires_at, next_refresh_at, created_at, updated_at, grant_type)
             VALUES (?1, ?2, ?3, '', '', ?4, ?5, ?5, ?5, ?5, 'client_credentials')
             RETURNING id",
        )
        .and_then(|mut s| {
            s.query_row(
                params![app.provider, subject, app.label, app.scope, now],
                |r| r.get(0),
            )
        })
        .map_err(sql_err("insert app token"))?;
    append_log(tx, id, now, "app_added", None, None, None)?;
    Ok(AppAdded::Created(id))
}

pub(super) fn append_log(
    conn: &Connection,
    id: i64,
    at: i64,
    outcome: &str,
    http_status: Option<u16>,
    error: Option<&str>,
    duration_ms: Option<i64>,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO refresh_log (account_id, at, outcome, http_status, error, duration_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )
    .and_then(|mut s| s.execute(params![id, at, outcome, http_status, error, duration_ms]))
    .map_err(sql_err("append refresh log"))?;
    Ok(())
}

/// What every rotation writes (?3-?12 as in `record`). Status and refresh end are left to
/// the statements below: SQLite rewrites the entries of every index whose column (or whose
/// partial-index condition's column) is in an UPDATE's SET list, even to the same value.
macro_rules! rotate_set {
    () => {
        "UPDATE accounts SET access_token = ?3, refresh_token = COALESCE(?4, refresh_token),
            scope = COALESCE(?5, scope), token_type = ?6, access_expires_at = ?7,
            next_refresh_at = ?9, reauth_reason = ?11,
            reauth_flagged_at = CASE WHEN ?11 IS NULL THEN NULL
                WHEN reauth_reason IS ?11 THEN reauth_flagged_at ELSE ?12 END,
            failures = 0, last_error = NULL, last_refreshed_at = ?12,
            lease_owner = NULL, lease_expires_at = NULL,
            generation = generation + 1, updated_at = ?12"
    };
}

/// The common rotation: status and refresh-token end as stored (a disabled account stays
/// disabled), so neither `accounts_status` nor `accounts_refresh_expiry` is written.
const ROTATE_KEEPING_STATUS_AND_END: &str = concat!(
    rotate_set!(),
    " WHERE id = ?1 AND generation = ?2 AND (status = ?10 OR status = 'disabled')
        AND (?8 IS NULL OR refresh_expires_at IS ?8)"
);
/// Status as stored, a new refresh-token end: `accounts_status` is left alone.
const ROTATE_KEEPING_STATUS: &str = concat!(
    rotate_set!(),
    ", refresh_expires_at = ?8
     WHERE id = ?1 AND generation = ?2 AND (status = ?10 OR status = 'disabled')"
);
/// Any rotation, the status changing included.
const ROTATE: &str = concat!(
    rotate_set!(),
    ", refresh_expires_at = COALESCE(?8, refresh_expires_at),
        status = CASE WHEN status = 'disabled' THEN status ELSE ?10 END
     WHERE id = ?1 AND generation = ?2"
);

/// The rotation statements to try in order, narrowest first; the last one matches any row
/// of the claimed generation. `new_end`: the provider gave a refresh-token lifetime.
fn rotate_statements(new_end: bool) -> &'static [&'static str] {
    if new_end {
        &[ROTATE_KEEPING_STATUS_AND_END, ROTATE_KEEPING_STATUS, ROTATE]
    } else {
        &[ROTATE_KEEPING_STATUS_AND_END, ROTATE]
    }
}

/// Writes one refresh outcome (see `record::plan`). Runs inside the group-commit
/// transaction.
pub fn record(tx: &Connection, keys: &Keyring, o: &Outcome) -> Result<Recorded, StoreError> {
    let write = record::plan(keys, o);
    let run = |ctx: &'static str, sql: &str, params: &[&dyn rusqlite::ToSql]| {
        tx.prepare_cached(sql)
            .and_then(|mut s| s.execute(params))
            .map_err(sql_err(ctx))
    };
    let n = match &write.update {
        Update::Rotate {
            account_id,
            generation,
            access_token,
            refresh_token,
            scope,
            token_type,
            access_expires_at,
            refresh_expires_at,
            next_refresh_at,
            status,
            reauth_reason,
            at,
        } => {
            let params = params![
                account_id,
                generation,
                access_token,
                refresh_token,
                scope,
                token_type,
                access_expires_at,
                refresh_expires_at,
                next_refresh_at,
                status,
                reauth_reason,
                at
            ];
            // The narrowest statement whose guard matches writes the rotation: one of 0
            // rows changed by all of them was superseded.
            let mut n = 0;
            for sql in rotate_statements(refresh_expires_at.is_some()) {
                n = run("store rotated tokens", sql, params)?;
                if n > 0 {
                    break;
                }
            }
            n
        }
        Update::Fail {
            account_id,
            owner,
            error,
            next_refresh_at,
            at,
            keep_lease,
        } => run(
            "record transient failure",
            "UPDATE accounts SET failures = failures + 1, last_error = ?3,
                next_refresh_at = ?4,
                lease_owner = CASE WHEN ?6 OR interrupted_at IS NOT NULL THEN lease_owner END,
                lease_expires_at = CASE WHEN ?6 OR interrupted_at IS NOT NULL THEN ?4 END,
                updated_at = ?5
             WHERE id = ?1 AND lease_owner = ?2",
            params![account_id, owner, error, next_refresh_at, at, keep_lease],
        )?,
        Update::Postpone {
            account_id,
            owner,
            error,
            next_refresh_at,
            at,
        } => run(
            "record provider configuration error",
            concat!(
                "UPDATE accounts SET last_error = ?3, next_refresh_at = ?4, updated_at = ?5, ",
                give_back_lease!(),
                " WHERE id = ?1 AND lease_owner = ?2"
            ),
            params![account_id, owner, error, next_refresh_at, at],
        )?,
        Update::Flag {
            account_id,
            owner,
            generation,
            reason,
            at,
            error,
        } => run(
            "flag account for re-authorization",
            "UPDATE accounts SET reauth_reason = ?3,
                status = CASE WHEN status = 'disabled' THEN status ELSE 'needs_reauth' END,
                reauth_flagged_at = ?4, last_error = ?5, failures = failures + 1,
                lease_owner = NULL, lease_expires_at = NULL, updated_at = ?4
             WHERE id = ?1 AND generation = ?2 AND (?6 IS NULL OR lease_owner = ?6)",
            params![account_id, generation, reason, at, error, owner],
        )?,
        Update::Release { account_id, owner } => run(
            "release lease",
            concat!(
                "UPDATE accounts SET ",
                give_back_lease!(),
                " WHERE id = ?1 AND lease_owner = ?2"
            ),
            params![account_id, owner],
        )?,
    };
    let (recorded, log) = write.ended(n > 0);
    if let Some(l) = log {
        append_log(
            tx,
            l.account_id,
            l.at,
            l.outcome,
            l.http_status,
            l.error.as_deref(),
            l.duration_ms,
        )?;
    }
    Ok(recorded)
}

/// Appends an audit-trail row for account `id`, in the caller's transaction (the change it
/// records commits with it or not at all). The account must still exist: its provider and
/// subject are copied, so the row outlives it.
pub fn append_audit(
    tx: &Transaction<'_>,
    id: i64,
    at: i64,
    action: AuditAction,
    by: &Actor,
    detail: Option<&str>,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO audit_log (at, account_id, provider, subject, action, actor, via, detail)
         SELECT ?2, id, provider, subject, ?3, ?4, ?5, ?6 FROM accounts WHERE id = ?1",
        params![id, at, action.as_str(), by.who, by.via, detail],
    )
    .map_err(sql_err("append to the audit trail"))?;
    Ok(())
}
