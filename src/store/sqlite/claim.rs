//! The claim on the SQLite worker, and the one transaction that commits a group of refresh
//! outcomes and then claims the next accounts: one fsync for both instead of two. The claim
//! is answered only once that transaction is durable (a lease must be on disk before its
//! request is sent). A claim whose statements fail is rolled back alone under its savepoint;
//! only a failure to open or release that savepoint fails the group, which is then split or
//! deferred as any failed group, and the claim re-run alone.

use super::{queries, writes};
use crate::crypto::Keyring;
use crate::model::Account;
use crate::store::error::StoreError;
use crate::store::types::{Outcome, Recorded};
use rusqlite::{Connection, TransactionBehavior};
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
pub(crate) fn commit_group(
    conn: &mut Connection,
    keys: &Keyring,
    outcomes: &[&Outcome],
    claim: Option<&Claim>,
) -> Result<GroupResult, StoreError> {
    let mut tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|source| StoreError::Sqlite {
            context: "begin commit of refresh outcomes",
            source,
        })?;
    let mut results = Vec::with_capacity(outcomes.len());
    for o in outcomes {
        results.push(writes::record(&tx, keys, o)?);
    }
    let claimed = match claim {
        None => None,
        Some(c) => {
            let sp = tx.savepoint().map_err(|source| StoreError::Sqlite {
                context: "claim due accounts",
                source,
            })?;
            let r = run(&sp, keys, c);
            if r.is_ok() {
                sp.commit().map_err(|source| StoreError::Sqlite {
                    context: "claim due accounts",
                    source,
                })?;
            }
            // Dropped uncommitted, the savepoint rolls the failed claim back.
            Some(r)
        }
    };
    tx.commit().map_err(|source| StoreError::Sqlite {
        context: "commit refresh outcomes",
        source,
    })?;
    Ok((results, claimed))
}
