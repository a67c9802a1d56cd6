//! The PostgreSQL reports: read-only queries over the whole accounts table and its logs
//! (one account's refresh log, the latest outcomes, the audit trail, counts, the metrics'
//! gauges, the plan), for the CLI, the admin page, the metrics and `accounts plan`.
//! `sqlite/queries.rs` holds the same functions, in the same order, where `queries.rs`
//! names this file: read the two side by side.

use super::errors::pg_err;
use super::queries::status;
use crate::model::Status;
use crate::store::error::StoreError;
use crate::store::types::{
    AuditEntry, DueMinute, Gauges, LogEntry, PlanQuery, PlanRows, RecentOutcome, RefreshEnd,
};
use tokio_postgres::{GenericClient, Row};

/// A refresh log row's `at, outcome, http_status, error, duration_ms`, from column `first`.
fn log_entry_at(r: &Row, first: usize, ctx: &'static str) -> Result<LogEntry, StoreError> {
    Ok(LogEntry {
        at: r.try_get(first).map_err(pg_err(ctx))?,
        outcome: r.try_get(first + 1).map_err(pg_err(ctx))?,
        http_status: r
            .try_get::<_, Option<i32>>(first + 2)
            .map_err(pg_err(ctx))?
            .map(|s| s as u16),
        error: r.try_get(first + 3).map_err(pg_err(ctx))?,
        duration_ms: r.try_get(first + 4).map_err(pg_err(ctx))?,
    })
}

pub async fn log_entries(
    client: &impl GenericClient,
    id: i64,
    limit: usize,
) -> Result<Vec<LogEntry>, StoreError> {
    let ctx = "read refresh log";
    let rows = client
        .query(
            "SELECT at, outcome, http_status, error, duration_ms FROM refresh_log
             WHERE account_id = $1 ORDER BY at DESC, id DESC LIMIT $2",
            &[&id, &(limit as i64)],
        )
        .await
        .map_err(pg_err(ctx))?;
    rows.iter().map(|r| log_entry_at(r, 0, ctx)).collect()
}

/// The newest `limit` rows of the whole refresh log, newest first, with their accounts
/// (the primary key read backwards: bounded at any table size). Newest means written last,
/// as on SQLite, even when a clock stepped back between two writes; across replicas, whose
/// ids come from one sequence in an order their commits need not follow, nearly so.
pub async fn recent_outcomes(
    client: &impl GenericClient,
    limit: usize,
) -> Result<Vec<RecentOutcome>, StoreError> {
    let ctx = "read the latest refresh outcomes";
    let rows = client
        .query(
            "SELECT l.account_id, a.provider, a.subject, l.at, l.outcome, l.http_status, l.error,
                    l.duration_ms
             FROM refresh_log l LEFT JOIN accounts a ON a.id = l.account_id
             ORDER BY l.id DESC LIMIT $1",
            &[&(limit as i64)],
        )
        .await
        .map_err(pg_err(ctx))?;
    rows.iter()
        .map(|r| {
            Ok(RecentOutcome {
                account_id: r.try_get(0).map_err(pg_err(ctx))?,
                provider: r.try_get(1).map_err(pg_err(ctx))?,
                subject: r.try_get(2).map_err(pg_err(ctx))?,
                entry: log_entry_at(r, 3, ctx)?,
            })
        })
        .collect()
}

/// The audit trail of account `id` (also of a removed one), newest first.
pub async fn audit_entries(
    client: &impl GenericClient,
    id: i64,
) -> Result<Vec<AuditEntry>, StoreError> {
    let ctx = "read the audit trail";
    let rows = client
        .query(
            "SELECT at, account_id, provider, subject, action, actor, via, detail FROM audit_log
             WHERE account_id = $1 ORDER BY at DESC, id DESC",
            &[&id],
        )
        .await
        .map_err(pg_err(ctx))?;
    rows.iter()
        .map(|r| {
            Ok(AuditEntry {
                at: r.try_get(0).map_err(pg_err(ctx))?,
                account_id: r.try_get(1).map_err(pg_err(ctx))?,
                provider: r.try_get(2).map_err(pg_err(ctx))?,
                subject: r.try_get(3).map_err(pg_err(ctx))?,
                action: r.try_get(4).map_err(pg_err(ctx))?,
                who: r.try_get(5).map_err(pg_err(ctx))?,
                via: r.try_get(6).map_err(pg_err(ctx))?,
                detail: r.try_get(7).map_err(pg_err(ctx))?,
            })
        })
        .collect()
}

/// Counts by (provider, status).
pub async fn counts(client: &impl GenericClient) -> Result<Vec<(String, Status, i64)>, StoreError> {
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

/// What the metrics report about the accounts.
pub async fn gauges(client: &impl GenericClient, now: i64) -> Result<Gauges, StoreError> {
    let ctx = "read account gauges";
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
        by_status: counts(client).await?,
        flagged,
        access_expired,
        soonest_refresh_expiry,
    })
}

/// Due refreshes per (provider, minute) and the soonest refresh-token ends; see SQLite's.
pub async fn plan_rows(client: &impl GenericClient, q: &PlanQuery) -> Result<PlanRows, StoreError> {
    let ctx = "read the plan";
    let provider = q.provider.as_deref();
    let due = client
        .query(
            "SELECT provider, GREATEST(next_refresh_at, $1::bigint - 60) / 60 AS minute, COUNT(*)
             FROM accounts
             WHERE status IN ('active', 'expiring') AND next_refresh_at < $2
               AND ($3::text IS NULL OR provider = $3)
             GROUP BY 1, 2 ORDER BY 1, 2",
            &[&q.start, &q.end, &provider],
        )
        .await
        .map_err(pg_err(ctx))?
        .iter()
        .map(|r| {
            Ok(DueMinute {
                provider: r.try_get(0).map_err(pg_err(ctx))?,
                minute: r.try_get(1).map_err(pg_err(ctx))?,
                count: r.try_get(2).map_err(pg_err(ctx))?,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    let refresh_ends = client
        .query(
            "SELECT id, provider, subject, status, refresh_expires_at FROM accounts
             WHERE status IN ('active', 'expiring') AND refresh_expires_at IS NOT NULL
               AND ($1::text IS NULL OR provider = $1)
             ORDER BY refresh_expires_at, id LIMIT $2",
            &[&provider, &(q.soonest as i64)],
        )
        .await
        .map_err(pg_err(ctx))?
        .iter()
        .map(|r| {
            Ok(RefreshEnd {
                account_id: r.try_get(0).map_err(pg_err(ctx))?,
                provider: r.try_get(1).map_err(pg_err(ctx))?,
                subject: r.try_get(2).map_err(pg_err(ctx))?,
                status: status(r.try_get(3).map_err(pg_err(ctx))?)?,
                refresh_expires_at: r.try_get(4).map_err(pg_err(ctx))?,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(PlanRows { due, refresh_ends })
}
