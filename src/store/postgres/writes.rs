//! The PostgreSQL write path: imports (`upsert`) and refresh outcomes (`record`), and the
//! refresh-log rows they leave. `sqlite/writes.rs` holds the same functions, in the same
//! order, under the same names.

use super::errors::pg_err;
use crate::crypto::Keyring;
use crate::model::app_subject;
use crate::store::error::{Refusal, StoreError};
use crate::store::record::{self, Update};
use crate::store::rules;
use crate::store::types::{AppAdded, NewAccount, NewApp, Outcome, Recorded};
use deadpool_postgres::Transaction;

/// Inserts or updates accounts by (provider, subject), all in the caller's transaction.
/// Returns (id, inserted) per account in input order.
pub async fn upsert(
    tx: &Transaction<'_>,
    keys: &Keyring,
    accounts: &[NewAccount],
    now: i64,
) -> Result<Vec<(i64, bool)>, StoreError> {
    let mut out = Vec::with_capacity(accounts.len());
    // Accounts of a chunk in flight at once: tokio-postgres pipelines their statements on
    // the one connection (sent, and executed, in order), instead of a round trip each.
    for chunk in accounts.chunks(UPSERT_PIPELINE) {
        out.extend(
            futures::future::try_join_all(chunk.iter().map(|a| upsert_one(tx, keys, a, now)))
                .await?,
        );
    }
    Ok(out)
}

/// Accounts imported together whose statements are pipelined.
const UPSERT_PIPELINE: usize = 256;

/// Inserts or updates one account; returns (id, inserted).
async fn upsert_one(
    tx: &Transaction<'_>,
    keys: &Keyring,
    a: &NewAccount,
    now: i64,
) -> Result<(i64, bool), StoreError> {
    {
        let lookup = async || {
            tx.query_opt(
                "SELECT id, lease_expires_at, last_refreshed_at FROM accounts
                 WHERE provider = $1 AND subject = $2 FOR UPDATE",
                &[&a.provider, &a.subject],
            )
            .await
            .map_err(pg_err("look up account for import"))?
            .map(|r| -> Result<(i64, Option<i64>, Option<i64>), StoreError> {
                let g = pg_err("look up account for import");
                Ok((
                    r.try_get(0).map_err(&g)?,
                    r.try_get(1).map_err(&g)?,
                    r.try_get(2).map_err(&g)?,
                ))
            })
            .transpose()
        };
        let mut existing = lookup().await?;
        let new = record::imported(a, now);
        // FOR UPDATE locks nothing while the account does not exist yet: two connects of one
        // new user (two tabs, two replicas) would both insert, and one fail on the UNIQUE
        // constraint. The insert skips a conflict instead (waiting for the other transaction),
        // and the account it finds then is updated like any existing one.
        let done = loop {
            let Some((id, lease_expires_at, last_refreshed_at)) = existing else {
                let (access, refresh) = new.inserted_tokens(keys);
                let inserted = tx
                    .query_opt(
                        "INSERT INTO accounts (provider, subject, label, access_token, refresh_token,
                            scope, token_type, access_expires_at, refresh_expires_at, next_refresh_at,
                            status, reauth_reason, reauth_flagged_at, created_at, updated_at)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $14)
                         ON CONFLICT (provider, subject) DO NOTHING
                         RETURNING id",
                        &[
                            &a.provider,
                            &a.subject,
                            &a.label,
                            &access,
                            &refresh,
                            &new.scope,
                            &a.tokens.token_type,
                            &new.access_expires_at,
                            &new.refresh_expires_at,
                            &a.next_refresh_at,
                            &a.status.as_str(),
                            &new.reauth_reason,
                            &new.reauth_flagged_at,
                            &now,
                        ],
                    )
                    .await
                    .map_err(pg_err("insert imported account"))?;
                let Some(row) = inserted else {
                    // Created meanwhile by another transaction: update that one.
                    existing = lookup().await?;
                    if existing.is_none() {
                        return Err(Refusal::UpsertRaced {
                            provider: a.provider.clone(),
                            subject: a.subject.clone(),
                        }
                        .into());
                    }
                    continue;
                };
                let id: i64 = row.try_get(0).map_err(pg_err("insert imported account"))?;
                if record::Imported::sealed_after_insert(keys) {
                    tx.execute(
                        "UPDATE accounts SET access_token = $2, refresh_token = $3 WHERE id = $1",
                        &[
                            &id,
                            &new.access_token(keys, id),
                            &new.refresh_token(keys, id),
                        ],
                    )
                    .await
                    .map_err(pg_err("store imported tokens"))?;
                }
                break (id, true);
            };
            rules::check_upsert(id, a, lease_expires_at, last_refreshed_at, now)?;
            {
                tx.execute(
                    "UPDATE accounts SET label = COALESCE($2, label), access_token = $3,
                        refresh_token = CASE WHEN $4 = '' THEN refresh_token ELSE $4 END,
                        scope = $5, token_type = $6, access_expires_at = $7,
                        refresh_expires_at = CASE WHEN $4 = '' THEN COALESCE($8, refresh_expires_at) ELSE $8 END,
                        next_refresh_at = $9, status = CASE WHEN status = 'disabled' THEN status ELSE $10 END,
                        reauth_reason = $11, reauth_flagged_at = $12, failures = 0,
                        last_error = NULL, lease_owner = NULL, lease_expires_at = NULL,
                        generation = generation + 1, updated_at = $13
                     WHERE id = $1",
                    &[
                        &id,
                        &a.label,
                        &new.access_token(keys, id),
                        &new.refresh_token(keys, id),
                        &new.scope,
                        &a.tokens.token_type,
                        &new.access_expires_at,
                        &new.refresh_expires_at,
                        &a.next_refresh_at,
                        &a.status.as_str(),
                        &new.reauth_reason,
                        &new.reauth_flagged_at,
                        &now,
                    ],
                )
                .await
                .map_err(pg_err("update imported account"))?;
                break (id, false);
            }
        };
        append_log(tx, done.0, now, "imported", None, None, None).await?;
        Ok(done)
    }
}

/// Adds an app token's row (see SQLite's). Two replicas adding the same app at once: the
/// second one's insert does nothing and it keeps the first one's row.
pub async fn add_app(tx: &Transaction<'_>, app: &NewApp, now: i64) -> Result<AppAdded, StoreError> {
    let subject = app_subject(&app.name);
    let ctx = "add app token";
    let inserted = tx
        .query_opt(
            "INSERT INTO accounts (provider, subject, label, access_token, refresh_token, scope,
                access_expires_at, next_refresh_at, created_at, updated_at, grant_type)
             VALUES ($1, $2, $3, '', '', $4, $5, $5, $5, $5, 'client_credentials')
             ON CONFLICT (provider, subject) DO NOTHING
             RETURNING id",
            &[&app.provider, &subject, &app.label, &app.scope, &now],
        )
        .await
        .map_err(pg_err(ctx))?;
    if let Some(row) = inserted {
        let id: i64 = row.try_get(0).map_err(pg_err(ctx))?;
        append_log(tx, id, now, "app_added", None, None, None).await?;
        return Ok(AppAdded::Created(id));
    }
    let row = tx
        .query_one(
            "SELECT id, grant_type, scope FROM accounts
             WHERE provider = $1 AND subject = $2 FOR UPDATE",
            &[&app.provider, &subject],
        )
        .await
        .map_err(pg_err(ctx))?;
    let (id, grant, scope): (i64, String, String) = (
        row.try_get(0).map_err(pg_err(ctx))?,
        row.try_get(1).map_err(pg_err(ctx))?,
        row.try_get(2).map_err(pg_err(ctx))?,
    );
    let kept = rules::existing_app(id, &grant, &scope, app)?;
    if kept == (AppAdded::Kept { id, rescoped: true }) {
        tx.execute(
            "UPDATE accounts SET scope = $2, next_refresh_at = $3, updated_at = $3 WHERE id = $1",
            &[&id, &app.scope, &now],
        )
        .await
        .map_err(pg_err("rescope app token"))?;
    }
    Ok(kept)
}

pub(super) async fn append_log(
    tx: &Transaction<'_>,
    id: i64,
    at: i64,
    outcome: &str,
    http_status: Option<u16>,
    error: Option<&str>,
    duration_ms: Option<i64>,
) -> Result<(), StoreError> {
    let stmt = tx
        .prepare_cached(
            "INSERT INTO refresh_log (account_id, at, outcome, http_status, error, duration_ms)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .await
        .map_err(pg_err("append refresh log"))?;
    tx.execute(
        &stmt,
        &[
            &id,
            &at,
            &outcome,
            &http_status.map(i32::from),
            &error,
            &duration_ms,
        ],
    )
    .await
    .map_err(pg_err("append refresh log"))?;
    Ok(())
}

/// Writes one refresh outcome (see `record::plan`) inside the group-commit transaction.
pub async fn record(
    tx: &Transaction<'_>,
    keys: &Keyring,
    o: &Outcome,
) -> Result<Recorded, StoreError> {
    let write = record::plan(keys, o);
    let run = async |ctx: &'static str,
                     sql: &str,
                     params: &[&(dyn tokio_postgres::types::ToSql + Sync)]|
           -> Result<u64, StoreError> {
        let stmt = tx.prepare_cached(sql).await.map_err(pg_err(ctx))?;
        tx.execute(&stmt, params).await.map_err(pg_err(ctx))
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
            run(
                "store rotated tokens",
                "UPDATE accounts SET access_token = $3,
                    refresh_token = COALESCE($4, refresh_token),
                    scope = COALESCE($5, scope), token_type = $6,
                    access_expires_at = $7,
                    refresh_expires_at = COALESCE($8, refresh_expires_at),
                    next_refresh_at = $9, status = CASE WHEN status = 'disabled' THEN status ELSE $10 END,
                    reauth_reason = $11::text,
                    reauth_flagged_at = CASE WHEN $11::text IS NULL THEN NULL
                        WHEN reauth_reason IS NOT DISTINCT FROM $11::text THEN reauth_flagged_at ELSE $12 END,
                    failures = 0, last_error = NULL, last_refreshed_at = $12,
                    lease_owner = NULL, lease_expires_at = NULL,
                    generation = generation + 1, updated_at = $12
                 WHERE id = $1 AND generation = $2",
                &[
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
                ],
            )
            .await?
        }
        Update::Fail {
            account_id,
            owner,
            error,
            next_refresh_at,
            at,
            keep_lease,
        } => {
            run(
                "record transient failure",
                "UPDATE accounts SET failures = failures + 1, last_error = $3,
                    next_refresh_at = $4::bigint,
                    lease_owner = CASE WHEN $6::boolean OR interrupted_at IS NOT NULL THEN lease_owner END,
                    lease_expires_at = CASE WHEN $6::boolean OR interrupted_at IS NOT NULL THEN $4::bigint END,
                    updated_at = $5
                 WHERE id = $1 AND lease_owner = $2",
                &[account_id, owner, error, next_refresh_at, at, keep_lease],
            )
            .await?
        }
        Update::Postpone {
            account_id,
            owner,
            error,
            next_refresh_at,
            at,
        } => {
            run(
                "record provider configuration error",
                "UPDATE accounts SET last_error = $3, next_refresh_at = $4,
                    lease_owner = NULL, lease_expires_at = NULL, updated_at = $5
                 WHERE id = $1 AND lease_owner = $2",
                &[account_id, owner, error, next_refresh_at, at],
            )
            .await?
        }
        Update::Flag {
            account_id,
            generation,
            reason,
            at,
            error,
        } => {
            run(
                "flag account for re-authorization",
                "UPDATE accounts SET reauth_reason = $3,
                    status = CASE WHEN status = 'disabled' THEN status ELSE 'needs_reauth' END,
                    reauth_flagged_at = $4, last_error = $5, failures = failures + 1,
                    lease_owner = NULL, lease_expires_at = NULL, updated_at = $4
                 WHERE id = $1 AND generation = $2",
                &[account_id, generation, reason, at, error],
            )
            .await?
        }
        Update::Release { account_id, owner } => {
            run(
                "release lease",
                "UPDATE accounts SET lease_owner = NULL, lease_expires_at = NULL
                 WHERE id = $1 AND lease_owner = $2",
                &[account_id, owner],
            )
            .await?
        }
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
        )
        .await?;
    }
    Ok(recorded)
}
