//! One group commit on PostgreSQL: every outcome of the group in one transaction, its rows
//! locked in account order first, sent to the server all at once. The rotations (nearly
//! all of a burst) go as one statement (`writes::ROTATE`: the guarded `UPDATE ... FROM
//! unnest(...)` and their log rows), whatever their number; the other outcomes one
//! statement each. tokio-postgres pipelines requests polled together on one connection: a
//! group of rotations is one round trip (BEGIN, the lock, the rotations and COMMIT in one
//! flight), a group with other outcomes two (their log rows wait for their updates' row
//! counts), more when it names an account twice (those writes go one after the other).
//! Guards, values and log rows are `record::plan`'s, as for a single outcome
//! (`writes::record`).
//!
//! A group that fails before its COMMIT was sent ends its transaction with a ROLLBACK; when
//! that fails too, the session may still be inside the transaction, and `Finished` says the
//! connection must not go back to the pool (the worker, which owns the pool, detaches it:
//! deadpool's fast recycling would hand it out again unchecked).

use super::errors::pg_err;
use super::writes::{self, Rotations};
use crate::crypto::Keyring;
use crate::store::commit::COMMIT_WAIT;
use crate::store::error::StoreError;
use crate::store::record::{self, Update, Write};
use crate::store::types::{Outcome, Recorded};
use deadpool_postgres::{Client, GenericClient};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};

/// Locks a group's rows (`$1`, ids) in account order.
const LOCK: &str = "SELECT id FROM accounts WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE";

/// A group commit's end: its result, and whether its connection may be used again.
#[must_use = "a connection left inside a transaction must not go back to the pool"]
pub(crate) struct Finished {
    pub result: Result<Vec<Recorded>, StoreError>,
    /// False when the ROLLBACK of a failed group failed: the session may still be inside
    /// the group's transaction (its rows locked, every later statement refused).
    pub reusable: bool,
}

/// Commits `outcomes` in one transaction on `client`; the results are in the order of
/// `outcomes`, and come back only once the transaction is committed. On an error from the
/// server the transaction is rolled back (the pipelined COMMIT of a failed transaction is a
/// ROLLBACK). An error once the COMMIT is out (the connection lost before its answer, or
/// an answer that does not decode) may leave the group committed: its rotations go to the
/// recovery file, whose replay finds them already committed.
pub(crate) async fn commit(client: &Client, keys: &Keyring, outcomes: &[&Outcome]) -> Finished {
    let mut reusable = true;
    let result = run(client, keys, outcomes, &mut reusable).await;
    Finished { result, reusable }
}

/// `commit`'s work; clears `reusable` when a ROLLBACK fails.
async fn run(
    client: &Client,
    keys: &Keyring,
    outcomes: &[&Outcome],
    reusable: &mut bool,
) -> Result<Vec<Recorded>, StoreError> {
    let ctx = "commit refresh outcomes";
    let mut ids: Vec<i64> = outcomes.iter().map(|o| o.account_id()).collect();
    ids.sort_unstable();
    let writes: Vec<Write> = outcomes.iter().map(|o| record::plan(keys, o)).collect();
    // Two outcomes of one account in a group are written one after the other, as each
    // one's guard must see the other's effect: only rotations of an account named once go
    // into the batch.
    let twice: HashSet<i64> = ids
        .windows(2)
        .filter(|w| w[0] == w[1])
        .map(|w| w[0])
        .collect();
    let (rotations, mut others): (Vec<usize>, Vec<usize>) = (0..writes.len()).partition(|&i| {
        matches!(writes[i].update, Update::Rotate { .. })
            && !twice.contains(&outcomes[i].account_id())
    });
    others.sort_by_key(|&i| outcomes[i].account_id());
    let batch: Vec<&Write> = rotations.iter().map(|&i| &writes[i]).collect();
    let args = Rotations::of(&batch);
    let params = args.params();
    // Prepared first (once per connection): a statement still to be prepared would wait
    // for that round trip and reach the server behind the statements after it.
    let lock = client.prepare_cached(LOCK).await.map_err(pg_err(ctx))?;
    let rotate = client
        .prepare_cached(writes::ROTATE)
        .await
        .map_err(pg_err(ctx))?;
    // A row another transaction holds fails the commit fast (55P03, transient): the
    // rotations go to the recovery file instead of waiting in memory.
    let begin = format!(
        "BEGIN; SET LOCAL lock_timeout = '{}ms'",
        COMMIT_WAIT.as_millis()
    );
    // Each request is sent when its future is first polled, and `try_join!` polls them in
    // the order written: the server runs them in that order. Rows locked in account order,
    // as the reauth sweep locks both its kinds in one statement (`queries::sweep`): two
    // replicas' group commits, or a group commit and a sweep, then never wait on each
    // other in a cycle (a deadlock). The lock is the one an UPDATE takes.
    let begin = async { client.batch_execute(&begin).await.map_err(pg_err(ctx)) };
    let locked = async { client.query(&lock, &[&ids]).await.map_err(pg_err(ctx)) };
    // Everything else: one statement each. An account named twice has its writes sent one
    // after the other: polled together, one still waiting for its statement to be prepared
    // would reach the server behind the other.
    let (repeated, once): (Vec<usize>, Vec<usize>) = others
        .iter()
        .partition(|&&i| twice.contains(&outcomes[i].account_id()));
    let others_done = async {
        let in_order = async {
            let mut done = Vec::with_capacity(repeated.len());
            for &i in &repeated {
                done.push(writes::apply(client, &writes[i]).await?);
            }
            Ok(done)
        };
        let together =
            futures::future::try_join_all(once.iter().map(|&i| writes::apply(client, &writes[i])));
        let (together, in_order) = futures::try_join!(together, in_order)?;
        Ok::<_, StoreError>(
            once.iter()
                .zip(together)
                .chain(repeated.iter().zip(in_order))
                .map(|(&i, r)| (i, r))
                .collect::<Vec<_>>(),
        )
    };
    let rotated = async {
        if batch.is_empty() {
            return Ok(HashSet::new());
        }
        writes::rotated(client.query(&rotate, &params).await)
    };
    let commit_sent = AtomicBool::new(false);
    let end = async {
        // Set on the first poll, when the request goes out.
        commit_sent.store(true, Ordering::Relaxed);
        client.batch_execute("COMMIT").await.map_err(pg_err(ctx))
    };
    let (recorded, applied) = if others.is_empty() {
        match futures::try_join!(begin, locked, others_done, rotated, end) {
            Ok((_, _, recorded, applied, _)) => (recorded, applied),
            Err(e) => {
                // The pipelined COMMIT has ended the failed transaction (as a rollback),
                // unless a request failed before it was sent: then this ends it.
                if !commit_sent.load(Ordering::Relaxed) {
                    *reusable = rollback(client).await;
                }
                return Err(e);
            }
        }
    } else {
        let body = async { futures::try_join!(begin, locked, others_done, rotated) };
        match body.await {
            Ok((_, _, recorded, applied)) => {
                end.await?;
                (recorded, applied)
            }
            Err(e) => {
                // The COMMIT was never sent: end the transaction, or the connection
                // would go back to the pool inside it.
                *reusable = rollback(client).await;
                return Err(e);
            }
        }
    };
    let mut results = vec![Recorded::Applied; outcomes.len()];
    for (i, r) in recorded {
        results[i] = r;
    }
    for &i in &rotations {
        results[i] = writes[i]
            .ended(applied.contains(&outcomes[i].account_id()))
            .0;
    }
    Ok(results)
}

/// Ends a failed group's transaction; false when the ROLLBACK failed too, so the session
/// may still be inside the transaction. (The group's own error is answered to its callers.)
async fn rollback(client: &Client) -> bool {
    match client.batch_execute("ROLLBACK").await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(event = "postgres_rollback_failed", error = %super::describe_error(&e),
                "a failed group commit could not be rolled back; its connection is closed instead of going back to the pool");
            false
        }
    }
}
