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

/// Inserts or updates accounts by (provider, subject), all in the caller's transaction.
/// Returns (id, inserted) per account in input order.
///
/// A new account is written by one INSERT with its id chosen here (the next rowid, as SQLite
/// would choose it: the transaction holds the write lock, so nothing takes it meanwhile), so
/// its tokens are sealed for that id at once; only an account that exists already is looked
/// up, checked (`rules::check_upsert`) and updated. Two statements per new account, with the
/// refresh-log row.
pub fn upsert(
    tx: &Transaction<'_>,
    keys: &Keyring,
    accounts: &[NewAccount],
    now: i64,
) -> Result<Vec<(i64, bool)>, StoreError> {
    let mut next_id: i64 = tx
        .query_row("SELECT COALESCE(MAX(id), 0) + 1 FROM accounts", [], |r| {
            r.get(0)
        })
        .map_err(sql_err("choose ids for imported accounts"))?;
    let mut out = Vec::with_capacity(accounts.len());
    for a in accounts {
        let new = record::imported(a, now);
        let inserted = tx
            .prepare_cached(
                "INSERT INTO accounts (id, provider, subject, label, access_token, refresh_token,
                    scope, token_type, access_expires_at, refresh_expires_at, next_refresh_at,
                    status, reauth_reason, reauth_flagged_at, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?15)
                 ON CONFLICT (provider, subject) DO NOTHING",
            )
            .and_then(|mut s| {
                s.execute(params![
                    next_id,
                    a.provider,
                    a.subject,
                    a.label,
                    new.access_token(keys, next_id),
                    new.refresh_token(keys, next_id),
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
            .map_err(sql_err("insert imported account"))?;
        let id = if inserted == 1 {
            next_id += 1;
            out.push((next_id - 1, true));
            next_id - 1
        } else {
            let id = update_existing(tx, keys, a, &new, now)?;
            out.push((id, false));
            id
        };
        append_log(tx, id, now, "imported", None, None, None)?;
    }
    Ok(out)
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
