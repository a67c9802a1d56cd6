//! The writes of one group commit on PostgreSQL: every outcome of the group in one
//! transaction, its rows locked in account order first. The rotations (nearly all of a
//! burst) go as one `UPDATE ... FROM unnest(...)` and one log INSERT, whatever their number;
//! the other outcomes one statement each, pipelined. Guards, values and log rows are
//! `record::plan`'s, as for a single outcome (`writes::record`).

use super::errors::pg_err;
use super::writes;
use crate::crypto::Keyring;
use crate::store::error::StoreError;
use crate::store::record::{self, LogRow, Update, Write};
use crate::store::types::{Outcome, Recorded};
use deadpool_postgres::Transaction;
use std::collections::HashSet;

/// Records `outcomes` inside `tx`; the results are in the order of `outcomes`.
pub(super) async fn record_group(
    tx: &Transaction<'_>,
    keys: &Keyring,
    outcomes: &[&Outcome],
) -> Result<Vec<Recorded>, StoreError> {
    let ctx = "commit refresh outcomes";
    let mut ids: Vec<i64> = outcomes.iter().map(|o| o.account_id()).collect();
    ids.sort_unstable();
    // Rows locked in account order: two replicas' group commits then never wait on each
    // other in a cycle (a deadlock). The lock is the one an UPDATE takes.
    let lock = tx
        .prepare_cached("SELECT id FROM accounts WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE")
        .await
        .map_err(pg_err(ctx))?;
    tx.query(&lock, &[&ids]).await.map_err(pg_err(ctx))?;
    let writes: Vec<Write> = outcomes.iter().map(|o| record::plan(keys, o)).collect();
    // Two outcomes of one account in a group are written one after the other, as each
    // one's guard must see the other's effect: only rotations of an account named once go
    // into the batch.
    let twice: HashSet<i64> = ids
        .windows(2)
        .filter(|w| w[0] == w[1])
        .map(|w| w[0])
        .collect();
    let (rotations, others): (Vec<usize>, Vec<usize>) = (0..writes.len()).partition(|&i| {
        matches!(writes[i].update, Update::Rotate { .. })
            && !twice.contains(&outcomes[i].account_id())
    });
    let mut results = vec![Recorded::Applied; outcomes.len()];
    // Everything else: one statement each, all in flight at once on the one connection
    // (tokio-postgres pipelines them), in account order.
    let mut others = others;
    others.sort_by_key(|&i| outcomes[i].account_id());
    let recorded =
        futures::future::try_join_all(others.iter().map(|&i| writes::apply(tx, &writes[i])))
            .await?;
    for (&i, r) in others.iter().zip(recorded) {
        results[i] = r;
    }
    if rotations.is_empty() {
        return Ok(results);
    }
    let applied = rotate(tx, &writes, &rotations).await?;
    let mut logs = Vec::with_capacity(rotations.len());
    for &i in &rotations {
        let (recorded, log) = writes[i].ended(applied.contains(&outcomes[i].account_id()));
        results[i] = recorded;
        logs.extend(log);
    }
    append_logs(tx, &logs).await?;
    Ok(results)
}

/// The rotations at `which` as one guarded UPDATE; the accounts whose guard matched.
async fn rotate(
    tx: &Transaction<'_>,
    writes: &[Write<'_>],
    which: &[usize],
) -> Result<HashSet<i64>, StoreError> {
    let ctx = "store rotated tokens";
    let n = which.len();
    let mut c = RotateColumns::with_capacity(n);
    for &i in which {
        if let Update::Rotate {
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
        } = &writes[i].update
        {
            c.id.push(*account_id);
            c.generation.push(*generation);
            c.access_token.push(access_token.as_str());
            c.refresh_token.push(refresh_token.as_deref());
            c.scope.push(*scope);
            c.token_type.push(token_type);
            c.access_expires_at.push(*access_expires_at);
            c.refresh_expires_at.push(*refresh_expires_at);
            c.next_refresh_at.push(*next_refresh_at);
            c.status.push(status);
            c.reauth_reason.push(*reauth_reason);
            c.at.push(*at);
        }
    }
    let stmt = tx
        .prepare_cached(
            "UPDATE accounts AS a SET access_token = u.access_token,
                refresh_token = COALESCE(u.refresh_token, a.refresh_token),
                scope = COALESCE(u.scope, a.scope), token_type = u.token_type,
                access_expires_at = u.access_expires_at,
                refresh_expires_at = COALESCE(u.refresh_expires_at, a.refresh_expires_at),
                next_refresh_at = u.next_refresh_at,
                status = CASE WHEN a.status = 'disabled' THEN a.status ELSE u.status END,
                reauth_reason = u.reauth_reason,
                reauth_flagged_at = CASE WHEN u.reauth_reason IS NULL THEN NULL
                    WHEN a.reauth_reason IS NOT DISTINCT FROM u.reauth_reason
                    THEN a.reauth_flagged_at ELSE u.at END,
                failures = 0, last_error = NULL, last_refreshed_at = u.at,
                lease_owner = NULL, lease_expires_at = NULL,
                generation = a.generation + 1, updated_at = u.at
             FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[],
                         $6::text[], $7::bigint[], $8::bigint[], $9::bigint[], $10::text[],
                         $11::text[], $12::bigint[])
                  AS u(id, generation, access_token, refresh_token, scope, token_type,
                       access_expires_at, refresh_expires_at, next_refresh_at, status,
                       reauth_reason, at)
             WHERE a.id = u.id AND a.generation = u.generation
             RETURNING a.id",
        )
        .await
        .map_err(pg_err(ctx))?;
    let rows = tx
        .query(
            &stmt,
            &[
                &c.id,
                &c.generation,
                &c.access_token,
                &c.refresh_token,
                &c.scope,
                &c.token_type,
                &c.access_expires_at,
                &c.refresh_expires_at,
                &c.next_refresh_at,
                &c.status,
                &c.reauth_reason,
                &c.at,
            ],
        )
        .await
        .map_err(pg_err(ctx))?;
    Ok(rows.iter().map(|r| r.get::<_, i64>(0)).collect())
}

/// The columns of a batch of rotations (`unnest`'s arrays).
#[derive(Default)]
struct RotateColumns<'a> {
    id: Vec<i64>,
    generation: Vec<i64>,
    access_token: Vec<&'a str>,
    refresh_token: Vec<Option<&'a str>>,
    scope: Vec<Option<&'a str>>,
    token_type: Vec<&'a str>,
    access_expires_at: Vec<i64>,
    refresh_expires_at: Vec<Option<i64>>,
    next_refresh_at: Vec<i64>,
    status: Vec<&'a str>,
    reauth_reason: Vec<Option<&'a str>>,
    at: Vec<i64>,
}

impl RotateColumns<'_> {
    fn with_capacity(n: usize) -> Self {
        RotateColumns {
            id: Vec::with_capacity(n),
            generation: Vec::with_capacity(n),
            access_token: Vec::with_capacity(n),
            refresh_token: Vec::with_capacity(n),
            scope: Vec::with_capacity(n),
            token_type: Vec::with_capacity(n),
            access_expires_at: Vec::with_capacity(n),
            refresh_expires_at: Vec::with_capacity(n),
            next_refresh_at: Vec::with_capacity(n),
            status: Vec::with_capacity(n),
            reauth_reason: Vec::with_capacity(n),
            at: Vec::with_capacity(n),
        }
    }
}

/// `logs` as one INSERT.
async fn append_logs(tx: &Transaction<'_>, logs: &[LogRow]) -> Result<(), StoreError> {
    if logs.is_empty() {
        return Ok(());
    }
    let ctx = "append refresh log";
    let stmt = tx
        .prepare_cached(
            "INSERT INTO refresh_log (account_id, at, outcome, http_status, error, duration_ms)
             SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::integer[],
                                  $5::text[], $6::bigint[])",
        )
        .await
        .map_err(pg_err(ctx))?;
    let account_id: Vec<i64> = logs.iter().map(|l| l.account_id).collect();
    let at: Vec<i64> = logs.iter().map(|l| l.at).collect();
    let outcome: Vec<&str> = logs.iter().map(|l| l.outcome).collect();
    let http_status: Vec<Option<i32>> = logs.iter().map(|l| l.http_status.map(i32::from)).collect();
    let error: Vec<Option<&str>> = logs.iter().map(|l| l.error.as_deref()).collect();
    let duration_ms: Vec<Option<i64>> = logs.iter().map(|l| l.duration_ms).collect();
    tx.execute(
        &stmt,
        &[
            &account_id,
            &at,
            &outcome,
            &http_status,
            &error,
            &duration_ms,
        ],
    )
    .await
    .map_err(pg_err(ctx))?;
    Ok(())
}
