//! The PostgreSQL queries: async functions over a pooled connection or a transaction.
//! `sqlite/queries.rs` holds the same functions, in the same order, under the same names:
//! read the two side by side (the SQL differs in dialect, and here in `FOR UPDATE` row
//! locks and `SKIP LOCKED` claims, which SQLite's single writer does not need). The reports
//! (logs, audit trail, counts, gauges, plan) are in `reports.rs`; writes of imports and
//! outcomes are in `writes.rs`.

use super::errors::pg_err;
use super::writes::append_log;
use crate::crypto::{Column, Keyring};
use crate::model::{Account, Grant, ReauthReason, Status};
use crate::store::columns::{self, ACCOUNT_COLUMNS, RowRead, SUMMARY_COLUMNS};
use crate::store::error::{Refusal, StoreError};
use crate::store::rules::{self, StateRow, sealed_pattern};
use crate::store::types::{
    AccountSummary, ListFilter, PendingConnect, RekeyBatch, StateProblem, SweepReport,
};
use deadpool_postgres::{ClientWrapper, Transaction};
use tokio_postgres::{GenericClient, Row};

impl RowRead for Row {
    type Error = StoreError;
    fn int(&self, i: usize) -> Result<i64, StoreError> {
        self.try_get(i).map_err(pg_err("read an account row"))
    }
    fn opt_int(&self, i: usize) -> Result<Option<i64>, StoreError> {
        self.try_get(i).map_err(pg_err("read an account row"))
    }
    fn text(&self, i: usize) -> Result<String, StoreError> {
        self.try_get(i).map_err(pg_err("read an account row"))
    }
    fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError> {
        self.try_get(i).map_err(pg_err("read an account row"))
    }
    fn bad_status(value: String, message: String) -> StoreError {
        StoreError::StoredStatus { value, message }
    }
}

pub(super) fn status(s: String) -> Result<Status, StoreError> {
    s.parse::<Status>().map_err(|e| StoreError::StoredStatus {
        message: e.to_string(),
        value: s,
    })
}

fn row_to_account(r: &Row) -> Result<Account, StoreError> {
    columns::account_from(r)
}

fn row_to_summary(r: &Row) -> Result<AccountSummary, StoreError> {
    columns::summary_from(r)
}

/// `columns` (a column list) of the table aliased `a`, for a statement that joins another.
fn of_a(columns: &str) -> String {
    columns
        .split(", ")
        .map(|c| format!("a.{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Leases up to `limit` refreshable accounts due by `due_by` and unleased at `now` in one
/// statement, leaving out accounts of the `skip` providers and the `exclude` accounts; see
/// SQLite's.
#[allow(clippy::too_many_arguments)]
pub async fn claim_due_except(
    client: &ClientWrapper,
    keys: &Keyring,
    owner: &str,
    now: i64,
    due_by: i64,
    lease_until: i64,
    limit: usize,
    skip: &[String],
    exclude: &[i64],
) -> Result<Vec<Account>, StoreError> {
    let ctx = "claim due accounts";
    // One statement: atomic on its own, no transaction round trips needed.
    // SKIP LOCKED: rows another replica is claiming right now are left to it.
    let stmt = client
        .prepare_cached(&format!(
            "UPDATE accounts a SET lease_owner = $1, lease_expires_at = $2,
                interrupted_at = CASE WHEN a.lease_owner IS NOT NULL THEN a.lease_expires_at END
             FROM (SELECT id FROM accounts
                   WHERE status IN ('active', 'expiring') AND next_refresh_at <= $7
                     AND (lease_owner IS NULL OR lease_expires_at <= $3)
                     AND provider <> ALL($5::text[])
                     AND id <> ALL($6::bigint[])
                   ORDER BY next_refresh_at
                   LIMIT $4
                   FOR UPDATE SKIP LOCKED) due
             WHERE a.id = due.id
             RETURNING {}",
            of_a(ACCOUNT_COLUMNS)
        ))
        .await
        .map_err(pg_err(ctx))?;
    let rows = client
        .query(
            &stmt,
            &[
                &owner,
                &lease_until,
                &now,
                &(limit as i64),
                &skip,
                &exclude,
                &due_by,
            ],
        )
        .await
        .map_err(pg_err(ctx))?;
    let sealed = rows
        .iter()
        .map(row_to_account)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(columns::open_claimed(keys, sealed))
}

/// Ends now the leases of processes found dead; see SQLite's.
pub async fn expire_leases_of(
    client: &impl GenericClient,
    owners: &[String],
    now: i64,
) -> Result<(), StoreError> {
    if owners.is_empty() {
        return Ok(());
    }
    let ctx = "take over a dead process's leases";
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

/// The earliest due time among refreshable accounts nobody holds a valid lease on.
pub async fn next_due_except(
    client: &ClientWrapper,
    now: i64,
    skip: &[String],
) -> Result<Option<i64>, StoreError> {
    let ctx = "find next due account";
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

pub async fn get(
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
    .map(|r| columns::open_tokens(keys, row_to_account(&r)?))
    .transpose()
}

pub async fn find(
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
    .map(|r| columns::open_tokens(keys, row_to_account(&r)?))
    .transpose()
}

/// One page of accounts (ids after `after_id`), filtered.
pub async fn list(
    client: &impl GenericClient,
    filter: &ListFilter,
    after_id: i64,
    page: usize,
) -> Result<Vec<AccountSummary>, StoreError> {
    let ctx = "list accounts";
    let needs = if filter.needs_reauth {
        " AND status IN ('expiring', 'needs_reauth')"
    } else {
        ""
    };
    // App tokens through their partial index, which only the literal lets the planner use:
    // without it, listing the few apps reads every account.
    let apps = if filter.grant == Some(Grant::ClientCredentials) {
        " AND grant_type = 'client_credentials'"
    } else {
        ""
    };
    let sql = format!(
        "SELECT {SUMMARY_COLUMNS} FROM accounts WHERE id > $1
           AND ($2::text IS NULL OR provider = $2) AND ($3::text IS NULL OR status = $3){needs}
           AND ($5::text IS NULL OR grant_type = $5){apps}
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
                &filter.grant.map(|g| g.as_str()),
            ],
        )
        .await
        .map_err(pg_err(ctx))?;
    rows.iter().map(row_to_summary).collect()
}

// The reports over the whole table and its logs (SQLite's next functions, in the same
// order) are in `reports.rs`.

/// One chunk of the reauth sweep: at most `limit` accounts of each kind flagged; see
/// SQLite's and `Store::sweep`. Both kinds' rows are locked in ONE statement, in id order,
/// as a group commit locks its rows: two transactions that lock in one order cannot wait
/// on each other in a cycle, so the sweep and a group commit never deadlock. The lock
/// re-checks each row's state (a refresh may have renewed it meanwhile), and the update
/// decides the kind from the row as locked.
pub async fn sweep(
    tx: &Transaction<'_>,
    now: i64,
    window_end: i64,
    limit: usize,
) -> Result<SweepReport, StoreError> {
    let limit = limit as i64;
    let ctx = "sweep refresh-token expiries";
    let returning = of_a(SUMMARY_COLUMNS);
    let stmt = tx
        .prepare_cached(&format!(
            "WITH due AS (
                 (SELECT id FROM accounts
                  WHERE status IN ('active', 'expiring') AND refresh_expires_at IS NOT NULL
                    AND refresh_expires_at <= $1
                  ORDER BY id LIMIT $3)
                 UNION ALL
                 (SELECT id FROM accounts
                  WHERE status = 'active' AND refresh_expires_at IS NOT NULL
                    AND refresh_expires_at > $1 AND refresh_expires_at <= $2
                  ORDER BY id LIMIT $3)
             ), locked AS (
                 SELECT id FROM accounts
                 WHERE id IN (SELECT id FROM due) AND refresh_expires_at IS NOT NULL
                   AND ((status IN ('active', 'expiring') AND refresh_expires_at <= $1)
                        OR (status = 'active' AND refresh_expires_at <= $2))
                 ORDER BY id FOR NO KEY UPDATE
             )
             UPDATE accounts a SET
                 status = CASE WHEN a.refresh_expires_at <= $1
                     THEN 'needs_reauth' ELSE 'expiring' END,
                 reauth_reason = CASE WHEN a.refresh_expires_at <= $1
                     THEN 'refresh_token_expired' ELSE 'refresh_token_expiring' END,
                 reauth_flagged_at = $1, updated_at = $1,
                 last_error = CASE WHEN a.refresh_expires_at <= $1
                     THEN 'refresh token expired at ' || to_char(
                         to_timestamp(a.refresh_expires_at) AT TIME ZONE 'UTC',
                         'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
                     ELSE a.last_error END
             FROM locked WHERE a.id = locked.id
             RETURNING {returning}"
        ))
        .await
        .map_err(pg_err(ctx))?;
    let flagged = tx
        .query(&stmt, &[&now, &window_end, &limit])
        .await
        .map_err(pg_err(ctx))?
        .iter()
        .map(row_to_summary)
        .collect::<Result<Vec<_>, _>>()?;
    let (expired, expiring): (Vec<_>, Vec<_>) = flagged
        .into_iter()
        .partition(|a| a.status == Status::NeedsReauth);
    let reasons = [
        (&expired, "refresh token expired"),
        (&expiring, "refresh token ends within the reauth window"),
    ];
    for (accounts, reason) in reasons {
        for a in accounts {
            let reason = Some(reason);
            append_log(tx, a.id, now, "reauth_required", None, reason, None).await?;
        }
    }
    // Each list in id order, as on SQLite, whatever order the update visited rows in.
    let (mut expiring, mut expired) = (expiring, expired);
    expiring.sort_by_key(|a| a.id);
    expired.sort_by_key(|a| a.id);
    Ok(SweepReport { expiring, expired })
}

/// Ids of every account that needs a human, for the digest.
pub async fn flagged_ids(client: &impl GenericClient) -> Result<Vec<(i64, Status)>, StoreError> {
    let ctx = "list flagged accounts";
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

pub async fn prune_log(client: &impl GenericClient, before: i64) -> Result<usize, StoreError> {
    let ctx = "prune refresh log";
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

/// Makes an account due now (`accounts refresh`). `force` also makes a `needs_reauth` account
/// refreshable, keeping its reason until the refresh answers (so a rejection again is not a
/// new flag).
pub async fn mark_due(
    tx: &Transaction<'_>,
    id: i64,
    now: i64,
    force: bool,
) -> Result<Status, StoreError> {
    {
        let row = tx
            .query_opt(
                "SELECT status FROM accounts WHERE id = $1 FOR UPDATE",
                &[&id],
            )
            .await
            .map_err(pg_err("read account"))?
            .ok_or(StoreError::NotFound(id))?;
        let st = status(row.try_get(0).map_err(pg_err("read account"))?)?;
        rules::check_mark_due(id, st, force)?;
        tx.execute(
            "UPDATE accounts SET next_refresh_at = $2, updated_at = $2,
                failures = CASE WHEN status = 'needs_reauth' THEN 0 ELSE failures END,
                status = CASE WHEN status = 'needs_reauth' THEN 'active' ELSE status END
             WHERE id = $1",
            &[&id, &now],
        )
        .await
        .map_err(pg_err("mark account due"))?;
        append_log(tx, id, now, "marked_due", None, None, None).await?;
        Ok(st)
    }
}

/// `accounts disable` / `enable`: the status before and, when it changed, after. An enabled
/// account is due now. The lease is left alone: a refresh in flight still stores its tokens
/// (`record` keeps `disabled`).
pub async fn set_disabled(
    tx: &Transaction<'_>,
    id: i64,
    disable: bool,
    now: i64,
) -> Result<(Status, Option<Status>), StoreError> {
    let row = tx
        .query_opt(
            "SELECT status, reauth_reason FROM accounts WHERE id = $1 FOR UPDATE",
            &[&id],
        )
        .await
        .map_err(pg_err("read account"))?
        .ok_or(StoreError::NotFound(id))?;
    let st = status(row.try_get(0).map_err(pg_err("read account"))?)?;
    let reason: Option<String> = row.try_get(1).map_err(pg_err("read account"))?;
    let reason = reason.as_deref().and_then(ReauthReason::parse);
    let Some(to) = rules::toggled_status(st, reason, disable) else {
        return Ok((st, None));
    };
    tx.execute(
        "UPDATE accounts SET status = $2, updated_at = $3,
            next_refresh_at = CASE WHEN $4 THEN next_refresh_at ELSE $3 END
         WHERE id = $1",
        &[&id, &to.as_str(), &now, &disable],
    )
    .await
    .map_err(pg_err("disable or enable account"))?;
    let outcome = if disable { "disabled" } else { "enabled" };
    append_log(tx, id, now, outcome, None, None, None).await?;
    Ok((st, Some(to)))
}

pub async fn remove(tx: &Transaction<'_>, id: i64) -> Result<(), StoreError> {
    {
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
    }
}

/// See `Store::connect_state_put`.
pub async fn connect_state_put(
    tx: &Transaction<'_>,
    key: &str,
    p: &PendingConnect,
    verifier: Option<String>,
    now: i64,
    max_open: usize,
) -> Result<bool, StoreError> {
    {
        let ctx = "remember a web connect";
        tx.execute(
            "DELETE FROM connect_states WHERE expires_at < $1",
            &[&(now - rules::CONNECT_REMEMBER)],
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
    }
}

/// See `Store::connect_state_take`.
pub async fn connect_state_take(
    tx: &Transaction<'_>,
    keys: &Keyring,
    key: &str,
    provider: &str,
    now: i64,
) -> Result<Result<PendingConnect, StateProblem>, StoreError> {
    {
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
            return Ok(Err(StateProblem::Unknown));
        };
        let g = pg_err(ctx);
        let row = StateRow {
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
        row.judge(keys, provider, now)
    }
}

/// Distinct ids of the keys that sealed stored tokens: one scan at start-up.
pub async fn sealing_key_ids(client: &impl GenericClient) -> Result<Vec<String>, StoreError> {
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

/// Accounts with a token not yet sealed under the primary key `key_id`.
pub async fn count_to_rekey(client: &impl GenericClient, key_id: &str) -> Result<u64, StoreError> {
    let ctx = "count accounts to re-seal";
    let n: i64 = client
        .query_one(
            "SELECT COUNT(*) FROM accounts WHERE access_token NOT LIKE $1 OR refresh_token NOT LIKE $1",
            &[&sealed_pattern(key_id)],
        )
        .await
        .map_err(pg_err(ctx))?
        .try_get(0)
        .map_err(pg_err(ctx))?;
    Ok(n as u64)
}

/// Re-seals one batch under the primary key; see SQLite's.
pub async fn rekey_batch(
    tx: &Transaction<'_>,
    keys: &Keyring,
    after_id: i64,
    limit: usize,
) -> Result<RekeyBatch, StoreError> {
    let Some(primary) = keys.primary_id().map(str::to_string) else {
        return Err(Refusal::RekeyWithoutKey.into());
    };
    {
        let ctx = "read accounts to re-seal";
        // FOR UPDATE: no rotation lands between reading a value and replacing it.
        let rows = tx
            .query(
                "SELECT id, access_token, refresh_token FROM accounts
                 WHERE id > $1 AND (access_token NOT LIKE $2 OR refresh_token NOT LIKE $2)
                 ORDER BY id LIMIT $3 FOR UPDATE",
                &[&after_id, &sealed_pattern(&primary), &(limit as i64)],
            )
            .await
            .map_err(pg_err(ctx))?;
        let mut out = RekeyBatch {
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
            out.resealed += tx
                .execute(
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
    }
}
