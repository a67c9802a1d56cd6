//! The claim on the SQLite worker, and the one transaction that commits a group of refresh
//! outcomes and then claims the next accounts: one fsync for both instead of two. The claim
//! is answered only once that transaction is durable (a lease must be on disk before its
//! request is sent). A claim whose statements fail is rolled back alone under its savepoint;
//! only a failure of the savepoint's own statements, or one after which SQLite ended the
//! whole transaction, fails the group, which is then split or deferred as any failed group,
//! and the claim re-run alone.

use super::{queries, writes};
use crate::crypto::Keyring;
use crate::model::Account;
use crate::store::error::StoreError;
use crate::store::types::{Outcome, Recorded};
use rusqlite::Connection;
use tokio::sync::oneshot;

/// One claim of due accounts, with what `Store::claim_due_except` worked out before it.
pub(crate) struct Claim {
    pub owner: String,
    /// Judges leases (expired ones, the dead owners').
    pub now: i64,
    /// The latest due second taken; may run ahead of `now`.
    pub due_by: i64,
    pub lease_until: i64,
    pub limit: usize,
    /// Providers whose accounts are left out (saturated).
    pub skip: Vec<String>,
    /// Accounts left out (their rotations wait in the recovery file).
    pub exclude: Vec<i64>,
    /// Owners found dead: their leases end before the claim.
    pub dead: Vec<String>,
}

pub(crate) type ClaimReply = oneshot::Sender<Result<Vec<Account>, StoreError>>;

/// Ends dead owners' leases, then leases the due accounts. Runs in the caller's
/// transaction, or as autocommit statements outside one.
pub(crate) fn run(
    conn: &Connection,
    keys: &Keyring,
    c: &Claim,
) -> Result<Vec<Account>, StoreError> {
    queries::expire_leases_of(conn, &c.dead, c.now)?;
    queries::claim_due_except(
        conn,
        keys,
        &c.owner,
        c.now,
        c.due_by,
        c.lease_until,
        c.limit,
        &c.skip,
        &c.exclude,
    )
}

/// What one group transaction did: the outcomes' results, and the claim's (None: there was
/// no claim in it).
pub(crate) type GroupResult = (Vec<Recorded>, Option<Result<Vec<Account>, StoreError>>);

/// Writes `outcomes`, then runs `claim` under a savepoint, in one IMMEDIATE transaction.
/// A failing claim is rolled back alone and its error returned beside the committed
/// outcomes; a failing outcome (or commit) fails the whole transaction, claim included.
/// The transaction and savepoint statements are cached like the others: rusqlite's
/// `Transaction` and `Savepoint` prepare each of them again, four times per group.
pub(crate) fn commit_group(
    conn: &mut Connection,
    keys: &Keyring,
    outcomes: &[&Outcome],
    claim: Option<&Claim>,
) -> Result<GroupResult, StoreError> {
    // A ROLLBACK that failed after the last group left its transaction open.
    if !conn.is_autocommit() {
        control(conn, "ROLLBACK", "roll back a transaction left open")?;
    }
    control(conn, "BEGIN IMMEDIATE", "begin commit of refresh outcomes")?;
    let result = write_and_claim(conn, keys, outcomes, claim).and_then(|r| {
        control(conn, "COMMIT", "commit refresh outcomes")?;
        Ok(r)
    });
    // A failed statement may have ended the transaction already (SQLite rolls back on
    // some I/O errors): roll back only what is still open.
    if result.is_err() && !conn.is_autocommit() {
        let _ = control(conn, "ROLLBACK", "roll back refresh outcomes");
    }
    result
}

/// The body of `commit_group`, inside its transaction.
fn write_and_claim(
    conn: &Connection,
    keys: &Keyring,
    outcomes: &[&Outcome],
    claim: Option<&Claim>,
) -> Result<GroupResult, StoreError> {
    let mut results = Vec::with_capacity(outcomes.len());
    for o in outcomes {
        results.push(writes::record(conn, keys, o)?);
    }
    let claimed = match claim {
        None => None,
        Some(c) => {
            let ctx = "claim due accounts";
            control(conn, "SAVEPOINT claim", ctx)?;
            let r = match run(conn, keys, c) {
                // SQLite ended the whole transaction (some I/O errors, a full disk): the
                // outcomes went with it, and the claim's own error says why.
                Err(e) if conn.is_autocommit() => return Err(e),
                Err(e) => {
                    control(conn, "ROLLBACK TO claim", ctx)?;
                    Err(e)
                }
                ok => ok,
            };
            control(conn, "RELEASE claim", ctx)?;
            Some(r)
        }
    };
    Ok((results, claimed))
}

/// Runs a transaction-control statement from the statement cache.
fn control(conn: &Connection, sql: &str, context: &'static str) -> Result<(), StoreError> {
    conn.prepare_cached(sql)
        .and_then(|mut s| s.execute([]))
        .map(|_| ())
        .map_err(|source| StoreError::Sqlite { context, source })
}
