//! The writes of one group commit on PostgreSQL: every outcome of the group in one
//! transaction, its rows locked in account order first. The rotations (nearly all of a
//! burst) go as one `UPDATE ... FROM unnest(...)` (`writes::rotate`, the one rotation
//! statement, which a single rotation uses too) and one log INSERT, whatever their number;
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
    // Rows locked in account order, as the reauth sweep locks both its kinds in one
    // statement (`queries::sweep`): two replicas' group commits, or a group commit and a
    // sweep, then never wait on each other in a cycle (a deadlock). The lock is the one an
    // UPDATE takes.
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
    let batch: Vec<&Write> = rotations.iter().map(|&i| &writes[i]).collect();
    let applied = writes::rotate(tx, &batch).await?;
    let mut logs = Vec::with_capacity(rotations.len());
    for &i in &rotations {
        let (recorded, log) = writes[i].ended(applied.contains(&outcomes[i].account_id()));
        results[i] = recorded;
        logs.extend(log);
    }
    append_logs(tx, &logs).await?;
    Ok(results)
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
