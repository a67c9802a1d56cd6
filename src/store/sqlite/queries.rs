//! The SQLite queries: plain synchronous functions over a `rusqlite::Connection`, run only on
//! the store's worker thread. `postgres/queries.rs` holds the same functions, in the same
//! order, under the same names (its read-only reports, logs to plan, in `postgres/reports.rs`):
//! read them side by side. Writes of imports and outcomes are in `writes.rs`. Tested on
//! `:memory:` in `tests.rs`.

use super::writes::append_log;
use crate::crypto::{Column, Keyring};
use crate::model::{Account, Grant, ReauthReason, Status};
use crate::store::columns::{self, ACCOUNT_COLUMNS, RowRead, SUMMARY_COLUMNS};
use crate::store::error::{Refusal, StoreError};
use crate::store::rules::{self, StateRow, sealed_pattern};
use crate::store::types::{
    AccountSummary, AuditEntry, DueMinute, Gauges, ListFilter, LogEntry, PendingConnect, PlanQuery,
    PlanRows, RecentOutcome, RefreshEnd, RekeyBatch, StateProblem, SweepReport,
};
use rusqlite::{Connection, OptionalExtension, Row, Transaction, params};

fn sql_err(context: &'static str) -> impl Fn(rusqlite::Error) -> StoreError {
    move |source| StoreError::Sqlite { context, source }
}

fn parse_status(s: String) -> rusqlite::Result<Status> {
    s.parse::<Status>().map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, e.into())
    })
}

impl RowRead for Row<'_> {
    type Error = rusqlite::Error;
    fn int(&self, i: usize) -> rusqlite::Result<i64> {
        self.get(i)
    }
    fn opt_int(&self, i: usize) -> rusqlite::Result<Option<i64>> {
        self.get(i)
    }
    fn text(&self, i: usize) -> rusqlite::Result<String> {
        self.get(i)
    }
    fn opt_text(&self, i: usize) -> rusqlite::Result<Option<String>> {
        self.get(i)
    }
    fn bad_status(_value: String, e: String) -> rusqlite::Error {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, e.into())
    }
}

fn row_to_account(r: &Row<'_>) -> rusqlite::Result<Account> {
    columns::account_from(r)
}

fn row_to_summary(r: &Row<'_>) -> rusqlite::Result<AccountSummary> {
    columns::summary_from(r)
}

/// `NOT IN (...)` over `skip` with numbered parameters from `first`, or nothing.
fn skip_clause(skip: &[String], first: usize) -> String {
    if skip.is_empty() {
        return String::new();
    }
    let marks: Vec<String> = (0..skip.len()).map(|i| format!("?{}", first + i)).collect();
    format!("AND provider NOT IN ({})", marks.join(", "))
}

/// Leases up to `limit` refreshable accounts due by `due_by` and unleased at `now` in one
/// statement, leaving out accounts of the `skip` providers (saturated ones) and the
/// `exclude` accounts (rotations waiting in the recovery file). A lease is judged by `now`,
/// never by `due_by` (which runs ahead of it by the engine's claim lead).
#[allow(clippy::too_many_arguments)]
pub fn claim_due_except(
    conn: &Connection,
    keys: &Keyring,
    owner: &str,
    now: i64,
    due_by: i64,
    lease_until: i64,
    limit: usize,
    skip: &[String],
    exclude: &[i64],
) -> Result<Vec<Account>, StoreError> {
    let mut stmt = conn
        .prepare_cached(&claim_sql(skip, !exclude.is_empty()))
        .map_err(sql_err("claim due accounts"))?;
    let mut values: Vec<rusqlite::types::Value> = vec![
        owner.to_string().into(),
        lease_until.into(),
        now.into(),
        (limit as i64).into(),
        serde_json::to_string(exclude).unwrap_or_default().into(),
        due_by.into(),
    ];
    values.extend(skip.iter().map(|s| rusqlite::types::Value::from(s.clone())));
    let rows = stmt
        .query_map(rusqlite::params_from_iter(values), row_to_account)
        .map_err(sql_err("claim due accounts"))?;
    let sealed: Vec<Account> = rows
        .collect::<Result<_, _>>()
        .map_err(sql_err("claim due accounts"))?;
    Ok(columns::open_claimed(keys, sealed))
}

/// The claim statement with `skip` left out: one cached statement per number of skipped
/// providers and whether any account is excluded, never re-prepared (the connection has the
/// query planner stability guarantee, so binding a new LIMIT does not expire it). Without
/// `exclude` (nearly always: nothing waits in the recovery file) it has no `json_each`
/// clause, which costs a lookup for every due row walked past (6-14 % of the statement
/// claiming 32 accounts past 128 leased ones, SQLite 3.51). `?5` is still bound, unused.
pub(crate) fn claim_sql(skip: &[String], exclude: bool) -> String {
    let exclude = if exclude {
        "AND id NOT IN (SELECT value FROM json_each(?5))"
    } else {
        ""
    };
    format!(
        "UPDATE accounts SET lease_owner = ?1, lease_expires_at = ?2,
             interrupted_at = CASE WHEN lease_owner IS NOT NULL THEN lease_expires_at END
         WHERE id IN (
             SELECT id FROM accounts INDEXED BY accounts_due
             WHERE status IN ('active', 'expiring') AND next_refresh_at <= ?6
               AND (lease_owner IS NULL OR lease_expires_at <= ?3)
               {exclude}
               {}
             ORDER BY next_refresh_at
             LIMIT ?4)
         RETURNING {ACCOUNT_COLUMNS}",
        skip_clause(skip, 7)
    )
}

/// Ends now the leases of processes found dead (their instance lock is free), so the next
/// claim takes their accounts over and records the crash window as for an expired lease.
pub fn expire_leases_of(conn: &Connection, owners: &[String], now: i64) -> Result<(), StoreError> {
    for owner in owners {
        conn.prepare_cached(
            "UPDATE accounts SET lease_expires_at = ?2
             WHERE lease_owner IS NOT NULL AND lease_expires_at > ?2
               AND substr(lease_owner, 1, length(?1) + 1) = ?1 || ':'",
        )
        .and_then(|mut st| st.execute(rusqlite::params![owner, now]))
        .map_err(sql_err("take over a dead process's leases"))?;
    }
    Ok(())
}

/// The earliest due time among refreshable accounts that nobody holds a valid lease on,
/// leaving out accounts of the `skip` providers. Accounts leased by a process that died
/// become visible when their lease expires; the engine's `refresh.max_idle` bounds how late
/// it notices.
pub fn next_due_except(
    conn: &Connection,
    now: i64,
    skip: &[String],
) -> Result<Option<i64>, StoreError> {
    let sql = format!(
        "SELECT next_refresh_at FROM accounts INDEXED BY accounts_due
         WHERE status IN ('active', 'expiring')
           AND (lease_owner IS NULL OR lease_expires_at <= ?1
                OR lease_expires_at <= next_refresh_at)
           {}
         ORDER BY next_refresh_at LIMIT 1",
        skip_clause(skip, 2)
    );
    let mut values: Vec<rusqlite::types::Value> = vec![now.into()];
    values.extend(skip.iter().map(|s| rusqlite::types::Value::from(s.clone())));
    let due: Option<i64> = conn
        .prepare_cached(&sql)
        .and_then(|mut s| {
            s.query_row(rusqlite::params_from_iter(values), |r| r.get(0))
                .optional()
        })
        .map_err(sql_err("find next due account"))?;
    Ok(due)
}

pub fn get(conn: &Connection, keys: &Keyring, id: i64) -> Result<Option<Account>, StoreError> {
    conn.prepare_cached(&format!(
        "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = ?1"
    ))
    .and_then(|mut s| s.query_row([id], row_to_account).optional())
    .map_err(sql_err("read account"))?
    .map(|a| columns::open_tokens(keys, a))
    .transpose()
}

pub fn find(
    conn: &Connection,
    keys: &Keyring,
    provider: &str,
    subject: &str,
) -> Result<Option<Account>, StoreError> {
    conn.prepare_cached(&format!(
        "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE provider = ?1 AND subject = ?2"
    ))
    .and_then(|mut s| s.query_row([provider, subject], row_to_account).optional())
    .map_err(sql_err("find account"))?
    .map(|a| columns::open_tokens(keys, a))
    .transpose()
}

/// One page of accounts (ids after `after_id`), filtered; never the whole table at once.
pub fn list(
    conn: &Connection,
    filter: &ListFilter,
    after_id: i64,
    page: usize,
) -> Result<Vec<AccountSummary>, StoreError> {
    // App tokens through their partial index (the grant as the index's literal): without
    // it, listing the few apps reads every account.
    let apps = filter.grant == Some(Grant::ClientCredentials);
    let from = if apps {
        "accounts INDEXED BY accounts_apps"
    } else {
        "accounts"
    };
    let mut sql = format!("SELECT {SUMMARY_COLUMNS} FROM {from} WHERE id > ?1");
    let mut args: Vec<rusqlite::types::Value> = vec![after_id.into()];
    if let Some(p) = &filter.provider {
        args.push(p.clone().into());
        sql.push_str(&format!(" AND provider = ?{}", args.len()));
    }
    if let Some(s) = filter.status {
        args.push(s.as_str().to_string().into());
        sql.push_str(&format!(" AND status = ?{}", args.len()));
    }
    if filter.needs_reauth {
        sql.push_str(" AND status IN ('expiring', 'needs_reauth')");
    }
    if apps {
        sql.push_str(" AND grant_type = 'client_credentials'");
    } else if let Some(g) = filter.grant {
        args.push(g.as_str().to_string().into());
        sql.push_str(&format!(" AND grant_type = ?{}", args.len()));
    }
    args.push((page as i64).into());
    sql.push_str(&format!(" ORDER BY id LIMIT ?{}", args.len()));
    let mut stmt = conn.prepare(&sql).map_err(sql_err("list accounts"))?;
    let rows = stmt
        .query_map(rusqlite::params_from_iter(args), row_to_summary)
        .map_err(sql_err("list accounts"))?;
    rows.collect::<Result<_, _>>()
        .map_err(sql_err("list accounts"))
}

/// A refresh log row's `at, outcome, http_status, error, duration_ms`, from column `first`.
fn log_entry_at(r: &Row<'_>, first: usize) -> rusqlite::Result<LogEntry> {
    Ok(LogEntry {
        at: r.get(first)?,
        outcome: r.get(first + 1)?,
        http_status: r.get(first + 2)?,
        error: r.get(first + 3)?,
        duration_ms: r.get(first + 4)?,
    })
}

pub fn log_entries(conn: &Connection, id: i64, limit: usize) -> Result<Vec<LogEntry>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT at, outcome, http_status, error, duration_ms FROM refresh_log
             WHERE account_id = ?1 ORDER BY at DESC, id DESC LIMIT ?2",
        )
        .map_err(sql_err("read refresh log"))?;
    let rows = stmt
        .query_map(params![id, limit as i64], |r| log_entry_at(r, 0))
        .map_err(sql_err("read refresh log"))?;
    rows.collect::<Result<_, _>>()
        .map_err(sql_err("read refresh log"))
}

/// The newest `limit` rows of the whole refresh log, newest first, with their accounts
/// (walks the rowid backwards: bounded at any table size). Newest means written last: the
/// rowid follows the writes, even when the clock stepped back between two of them.
pub fn recent_outcomes(conn: &Connection, limit: usize) -> Result<Vec<RecentOutcome>, StoreError> {
    let ctx = "read the latest refresh outcomes";
    let mut stmt = conn
        .prepare_cached(
            "SELECT l.account_id, a.provider, a.subject, l.at, l.outcome, l.http_status, l.error,
                    l.duration_ms
             FROM refresh_log l LEFT JOIN accounts a ON a.id = l.account_id
             ORDER BY l.id DESC LIMIT ?1",
        )
        .map_err(sql_err(ctx))?;
    let rows = stmt
        .query_map([limit as i64], |r| {
            Ok(RecentOutcome {
                account_id: r.get(0)?,
                provider: r.get(1)?,
                subject: r.get(2)?,
                entry: log_entry_at(r, 3)?,
            })
        })
        .map_err(sql_err(ctx))?;
    rows.collect::<Result<_, _>>().map_err(sql_err(ctx))
}

/// The audit trail of account `id` (also of a removed one), newest first.
pub fn audit_entries(conn: &Connection, id: i64) -> Result<Vec<AuditEntry>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT at, account_id, provider, subject, action, actor, via, detail FROM audit_log
             WHERE account_id = ?1 ORDER BY at DESC, id DESC",
        )
        .map_err(sql_err("read the audit trail"))?;
    let rows = stmt
        .query_map([id], |r| {
            Ok(AuditEntry {
                at: r.get(0)?,
                account_id: r.get(1)?,
                provider: r.get(2)?,
                subject: r.get(3)?,
                action: r.get(4)?,
                who: r.get(5)?,
                via: r.get(6)?,
                detail: r.get(7)?,
            })
        })
        .map_err(sql_err("read the audit trail"))?;
    rows.collect::<Result<_, _>>()
        .map_err(sql_err("read the audit trail"))
}

/// Counts by (provider, status).
pub fn counts(conn: &Connection) -> Result<Vec<(String, Status, i64)>, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT provider, status, COUNT(*) FROM accounts GROUP BY provider, status ORDER BY provider, status")
        .map_err(sql_err("count accounts"))?;
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, parse_status(r.get(1)?)?, r.get(2)?)))
        .map_err(sql_err("count accounts"))?;
    rows.collect::<Result<_, _>>()
        .map_err(sql_err("count accounts"))
}

pub fn gauges(conn: &Connection, now: i64) -> Result<Gauges, StoreError> {
    let ctx = "read account gauges";
    let flagged = conn
        .prepare_cached(
            "SELECT provider, COALESCE(reauth_reason, 'unknown'), COUNT(*) FROM accounts
             WHERE status IN ('needs_reauth', 'expiring') GROUP BY 1, 2 ORDER BY 1, 2",
        )
        .and_then(|mut s| {
            s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<Result<Vec<_>, _>>()
        })
        .map_err(sql_err(ctx))?;
    let access_expired = conn
        .prepare_cached(
            "SELECT provider, COUNT(*) FROM accounts INDEXED BY accounts_status
             WHERE status IN ('active', 'expiring') AND access_expires_at <= ?1
             GROUP BY 1 ORDER BY 1",
        )
        .and_then(|mut s| {
            s.query_map([now], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<Vec<_>, _>>()
        })
        .map_err(sql_err(ctx))?;
    let soonest_refresh_expiry = conn
        .prepare_cached(
            "SELECT provider, MIN(refresh_expires_at) FROM accounts INDEXED BY accounts_status
             WHERE status IN ('active', 'expiring') AND refresh_expires_at IS NOT NULL
             GROUP BY 1 ORDER BY 1",
        )
        .and_then(|mut s| {
            s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<Vec<_>, _>>()
        })
        .map_err(sql_err(ctx))?;
    Ok(Gauges {
        by_status: counts(conn)?,
        flagged,
        access_expired,
        soonest_refresh_expiry,
    })
}

/// Due refreshes per (provider, minute) in `[q.start, q.end)`, the backlog in the minute
/// before, and the `q.soonest` nearest refresh-token ends of refreshable accounts.
pub fn plan_rows(conn: &Connection, q: &PlanQuery) -> Result<PlanRows, StoreError> {
    let ctx = "read the plan";
    let provider = q.provider.as_deref();
    let due = conn
        .prepare_cached(
            "SELECT provider, MAX(next_refresh_at, ?1 - 60) / 60 AS minute, COUNT(*)
             FROM accounts INDEXED BY accounts_due
             WHERE status IN ('active', 'expiring') AND next_refresh_at < ?2
               AND (?3 IS NULL OR provider = ?3)
             GROUP BY 1, 2 ORDER BY 1, 2",
        )
        .and_then(|mut s| {
            s.query_map(rusqlite::params![q.start, q.end, provider], |r| {
                Ok(DueMinute {
                    provider: r.get(0)?,
                    minute: r.get(1)?,
                    count: r.get(2)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()
        })
        .map_err(sql_err(ctx))?;
    let refresh_ends = conn
        .prepare_cached(
            "SELECT id, provider, subject, status, refresh_expires_at
             FROM accounts INDEXED BY accounts_refresh_expiry
             WHERE status IN ('active', 'expiring') AND refresh_expires_at IS NOT NULL
               AND (?1 IS NULL OR provider = ?1)
             ORDER BY refresh_expires_at, id LIMIT ?2",
        )
        .and_then(|mut s| {
            s.query_map(rusqlite::params![provider, q.soonest as i64], |r| {
                Ok(RefreshEnd {
                    account_id: r.get(0)?,
                    provider: r.get(1)?,
                    subject: r.get(2)?,
                    status: parse_status(r.get(3)?)?,
                    refresh_expires_at: r.get(4)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()
        })
        .map_err(sql_err(ctx))?;
    Ok(PlanRows { due, refresh_ends })
}

/// The reauth sweep: flags refreshable accounts whose refresh token ends inside the window
/// (`expiring`) or has ended (`needs_reauth`, with that end as `last_error`: the error that
/// decided the status, not an earlier 503). Returns only the accounts whose state changed.
/// One chunk of the reauth sweep: at most `limit` accounts of each kind flagged (see
/// `Store::sweep`). A token that has ended is never flagged `expiring`, even when more have
/// ended than the chunk takes: the next chunk flags it `needs_reauth`, once.
pub fn sweep(
    tx: &Transaction<'_>,
    now: i64,
    window_end: i64,
    limit: usize,
) -> Result<SweepReport, StoreError> {
    let expired: Vec<AccountSummary> = {
        let mut s = tx
            .prepare_cached(&format!(
                "UPDATE accounts
                    SET status = 'needs_reauth', reauth_reason = 'refresh_token_expired',
                    reauth_flagged_at = ?1, updated_at = ?1,
                    last_error = 'refresh token expired at '
                        || strftime('%Y-%m-%dT%H:%M:%SZ', refresh_expires_at, 'unixepoch')
                 WHERE id IN (SELECT id FROM accounts INDEXED BY accounts_refresh_expiry
                     WHERE status IN ('active', 'expiring') AND refresh_expires_at IS NOT NULL
                       AND refresh_expires_at <= ?1
                     LIMIT ?2)
                 RETURNING {SUMMARY_COLUMNS}"
            ))
            .map_err(sql_err("sweep expired refresh tokens"))?;
        s.query_map(rusqlite::params![now, limit as i64], row_to_summary)
            .and_then(|rows| rows.collect())
            .map_err(sql_err("sweep expired refresh tokens"))?
    };
    // `status IN (...)` repeats the partial index's condition, so INDEXED BY can use it.
    let expiring: Vec<AccountSummary> = {
        let mut s = tx
            .prepare_cached(&format!(
                "UPDATE accounts
                    SET status = 'expiring', reauth_reason = 'refresh_token_expiring',
                    reauth_flagged_at = ?1, updated_at = ?1
                 WHERE id IN (SELECT id FROM accounts INDEXED BY accounts_refresh_expiry
                     WHERE status IN ('active', 'expiring') AND refresh_expires_at IS NOT NULL
                       AND status = 'active'
                       AND refresh_expires_at > ?1 AND refresh_expires_at <= ?2
                     LIMIT ?3)
                 RETURNING {SUMMARY_COLUMNS}"
            ))
            .map_err(sql_err("sweep expiring refresh tokens"))?;
        s.query_map(
            rusqlite::params![now, window_end, limit as i64],
            row_to_summary,
        )
        .and_then(|rows| rows.collect())
        .map_err(sql_err("sweep expiring refresh tokens"))?
    };
    for a in &expired {
        append_log(
            tx,
            a.id,
            now,
            "reauth_required",
            None,
            Some("refresh token expired"),
            None,
        )?;
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
        )?;
    }
    Ok(SweepReport { expiring, expired })
}

/// Ids of every account that needs a human, for the digest.
pub fn flagged_ids(conn: &Connection) -> Result<Vec<(i64, Status)>, StoreError> {
    let mut s = conn
        .prepare_cached("SELECT id, status FROM accounts WHERE status IN ('expiring', 'needs_reauth') ORDER BY id")
        .map_err(sql_err("list flagged accounts"))?;
    s.query_map([], |r| Ok((r.get(0)?, parse_status(r.get(1)?)?)))
        .and_then(|rows| rows.collect())
        .map_err(sql_err("list flagged accounts"))
}

/// Deletes the refresh log's rows older than `before`, oldest first, walking the rowid
/// (the log has no index on `at`, migration 7) 10,000 rows at a time: each stretch loses
/// its rows stamped before `before`, and the walk ends at a stretch with none. No row goes
/// before its time, and rows stamped ahead (a clock that was fast, then set back) neither
/// hold back the older rows written after them nor are read again for each stretch.
pub fn prune_log(conn: &Connection, before: i64) -> Result<usize, StoreError> {
    prune_log_in_stretches(conn, before).map(|(deleted, _)| deleted)
}

/// `prune_log`, and how many stretches it walked.
pub(super) fn prune_log_in_stretches(
    conn: &Connection,
    before: i64,
) -> Result<(usize, usize), StoreError> {
    const STRETCH: i64 = 10_000;
    let ctx = "prune refresh log";
    // Each stretch is its own statement, so a large backlog never holds the write lock
    // for long.
    let (mut total, mut stretches, mut after) = (0, 0, 0_i64);
    loop {
        let last: Option<i64> = conn
            .prepare_cached(
                "SELECT MAX(id) FROM
                    (SELECT id FROM refresh_log WHERE id > ?1 ORDER BY id LIMIT ?2)",
            )
            .and_then(|mut s| s.query_row(params![after, STRETCH], |r| r.get(0)))
            .map_err(sql_err(ctx))?;
        let Some(last) = last else {
            return Ok((total, stretches));
        };
        stretches += 1;
        let n = conn
            .prepare_cached("DELETE FROM refresh_log WHERE id > ?1 AND id <= ?2 AND at < ?3")
            .and_then(|mut s| s.execute(params![after, last, before]))
            .map_err(sql_err(ctx))?;
        total += n;
        if n == 0 {
            return Ok((total, stretches));
        }
        after = last;
    }
}

/// Makes an account due now (`accounts refresh`). `force` also makes a `needs_reauth` account
/// refreshable, keeping its reason until the refresh answers (so a rejection again is not a
/// new flag).
pub fn mark_due(
    tx: &Transaction<'_>,
    id: i64,
    now: i64,
    force: bool,
) -> Result<Status, StoreError> {
    let status: Status = tx
        .query_row("SELECT status FROM accounts WHERE id = ?1", [id], |r| {
            parse_status(r.get(0)?)
        })
        .optional()
        .map_err(sql_err("read account"))?
        .ok_or(StoreError::NotFound(id))?;
    rules::check_mark_due(id, status, force)?;
    // The lease is left alone: a daemon may be refreshing this account right now.
    tx.execute(
        "UPDATE accounts SET next_refresh_at = ?2, updated_at = ?2,
            failures = CASE WHEN status = 'needs_reauth' THEN 0 ELSE failures END,
            status = CASE WHEN status = 'needs_reauth' THEN 'active' ELSE status END
         WHERE id = ?1",
        params![id, now],
    )
    .map_err(sql_err("mark account due"))?;
    append_log(tx, id, now, "marked_due", None, None, None)?;
    Ok(status)
}

/// `accounts disable` / `enable`: the status before and, when it changed, after. An enabled
/// account is due now. The lease is left alone: a refresh in flight still stores its tokens
/// (`record` keeps `disabled`).
pub fn set_disabled(
    tx: &Transaction<'_>,
    id: i64,
    disable: bool,
    now: i64,
) -> Result<(Status, Option<Status>), StoreError> {
    let (status, reason): (Status, Option<String>) = tx
        .query_row(
            "SELECT status, reauth_reason FROM accounts WHERE id = ?1",
            [id],
            |r| Ok((parse_status(r.get(0)?)?, r.get(1)?)),
        )
        .optional()
        .map_err(sql_err("read account"))?
        .ok_or(StoreError::NotFound(id))?;
    let reason = reason.as_deref().and_then(ReauthReason::parse);
    let Some(to) = rules::toggled_status(status, reason, disable) else {
        return Ok((status, None));
    };
    tx.execute(
        "UPDATE accounts SET status = ?2, updated_at = ?3,
            next_refresh_at = CASE WHEN ?4 THEN next_refresh_at ELSE ?3 END
         WHERE id = ?1",
        params![id, to.as_str(), now, disable],
    )
    .map_err(sql_err("disable or enable account"))?;
    let outcome = if disable { "disabled" } else { "enabled" };
    append_log(tx, id, now, outcome, None, None, None)?;
    Ok((status, Some(to)))
}

pub fn remove(tx: &Transaction<'_>, id: i64) -> Result<(), StoreError> {
    let n = tx
        .execute("DELETE FROM accounts WHERE id = ?1", [id])
        .map_err(sql_err("remove account"))?;
    if n == 0 {
        return Err(StoreError::NotFound(id));
    }
    tx.execute("DELETE FROM refresh_log WHERE account_id = ?1", [id])
        .map_err(sql_err("remove account's refresh log"))?;
    Ok(())
}

/// See `Store::connect_state_put`.
pub fn connect_state_put(
    tx: &Transaction<'_>,
    key: &str,
    p: &PendingConnect,
    verifier: Option<String>,
    now: i64,
    max_open: usize,
) -> Result<bool, StoreError> {
    let ctx = "remember a web connect";
    tx.execute(
        "DELETE FROM connect_states WHERE expires_at < ?1",
        [now - rules::CONNECT_REMEMBER],
    )
    .map_err(sql_err(ctx))?;
    let open: i64 = tx
        .query_row(
            "SELECT COUNT(*) FROM connect_states WHERE used = 0 AND expires_at >= ?1",
            [now],
            |r| r.get(0),
        )
        .map_err(sql_err(ctx))?;
    if open as usize >= max_open {
        return Ok(false);
    }
    tx.execute(
        "INSERT INTO connect_states (key, provider, verifier, label, account, scopes, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            key,
            p.provider,
            verifier,
            p.label,
            p.account,
            p.scopes.join(" "),
            p.expires_at
        ],
    )
    .map_err(sql_err(ctx))?;
    Ok(true)
}

/// See `Store::connect_state_take`.
pub fn connect_state_take(
    tx: &Transaction<'_>,
    keys: &Keyring,
    key: &str,
    provider: &str,
    now: i64,
) -> Result<Result<PendingConnect, StateProblem>, StoreError> {
    let ctx = "take a web connect's state";
    let row = tx
        .query_row(
            "SELECT provider, verifier, label, account, scopes, expires_at, used
             FROM connect_states WHERE key = ?1",
            [key],
            |r| {
                Ok(StateRow {
                    provider: r.get(0)?,
                    verifier: r.get(1)?,
                    label: r.get(2)?,
                    account: r.get(3)?,
                    scopes: r.get(4)?,
                    expires_at: r.get(5)?,
                    used: r.get::<_, i64>(6)? != 0,
                })
            },
        )
        .optional()
        .map_err(sql_err(ctx))?;
    let Some(row) = row else {
        return Ok(Err(StateProblem::Unknown));
    };
    if !row.used {
        tx.execute(
            "UPDATE connect_states SET used = 1, verifier = NULL WHERE key = ?1",
            [key],
        )
        .map_err(sql_err(ctx))?;
    }
    row.judge(keys, provider, now)
}

/// Distinct ids of the keys that sealed stored tokens: one scan of the table at start-up.
/// Only well-formed values count (`enc:v1:` + 16 hex digits + `:`); a garbled one is a
/// problem of its row alone, reported when that row is read.
///
/// Both columns are read in a single pass (each row joined with two column numbers, the
/// table on the outside): a `UNION ALL` of the two columns scanned the table twice, and
/// this scan is most of a start-up at a million accounts (BENCHMARKS.md).
pub fn sealing_key_ids(conn: &Connection) -> Result<Vec<String>, StoreError> {
    let mut s = conn
        .prepare(
            "SELECT DISTINCT substr(v, 8, 16) FROM (
                SELECT CASE c.n WHEN 1 THEN a.access_token ELSE a.refresh_token END AS v
                FROM accounts AS a CROSS JOIN (SELECT 1 AS n UNION ALL SELECT 2) AS c)
             WHERE v LIKE 'enc:v1:%' AND substr(v, 24, 1) = ':'
               AND substr(v, 8, 16) NOT GLOB '*[^0-9a-f]*'",
        )
        .map_err(sql_err("list encryption key ids"))?;
    s.query_map([], |r| r.get(0))
        .and_then(|rows| rows.collect())
        .map_err(sql_err("list encryption key ids"))
}

/// Accounts with a token not yet sealed under the primary key `key_id`.
pub fn count_to_rekey(conn: &Connection, key_id: &str) -> Result<u64, StoreError> {
    conn.query_row(
        "SELECT COUNT(*) FROM accounts WHERE access_token NOT LIKE ?1 OR refresh_token NOT LIKE ?1",
        [sealed_pattern(key_id)],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n as u64)
    .map_err(sql_err("count accounts to re-seal"))
}

/// Re-seals, under the primary key, the tokens of up to `limit` accounts after `after_id`
/// that are not sealed under it yet (clear ones included: this encrypts a store in place).
/// Runs in the caller's IMMEDIATE transaction, so no rotation can land between reading a
/// value and replacing it; each update is still guarded on the value it replaces. The
/// generation is deliberately not bumped: a refresh in flight must still be able to store
/// the provider's rotation, which its generation guard would otherwise refuse (and that
/// rotation would be lost, the provider having already retired the old refresh token).
pub fn rekey_batch(
    tx: &Transaction<'_>,
    keys: &Keyring,
    after_id: i64,
    limit: usize,
) -> Result<RekeyBatch, StoreError> {
    let Some(primary) = keys.primary_id() else {
        return Err(Refusal::RekeyWithoutKey.into());
    };
    let rows: Vec<(i64, String, String)> = tx
        .prepare_cached(
            "SELECT id, access_token, refresh_token FROM accounts
             WHERE id > ?1 AND (access_token NOT LIKE ?2 OR refresh_token NOT LIKE ?2)
             ORDER BY id LIMIT ?3",
        )
        .and_then(|mut s| {
            s.query_map(
                params![after_id, sealed_pattern(primary), limit as i64],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )?
            .collect()
        })
        .map_err(sql_err("read accounts to re-seal"))?;
    let mut out = RekeyBatch {
        last_id: rows.last().map(|r| r.0),
        resealed: 0,
    };
    for (id, access, refresh) in rows {
        let new_access = keys.reseal(id, Column::AccessToken, &access)?;
        let new_refresh = keys.reseal(id, Column::RefreshToken, &refresh)?;
        if new_access.is_none() && new_refresh.is_none() {
            continue;
        }
        out.resealed += tx
            .prepare_cached(
                "UPDATE accounts SET access_token = ?4, refresh_token = ?5
                 WHERE id = ?1 AND access_token = ?2 AND refresh_token = ?3",
            )
            .and_then(|mut s| {
                s.execute(params![
                    id,
                    access,
                    refresh,
                    new_access.as_deref().unwrap_or(&access),
                    new_refresh.as_deref().unwrap_or(&refresh)
                ])
            })
            .map_err(sql_err("re-seal account tokens"))?;
    }
    Ok(out)
}
