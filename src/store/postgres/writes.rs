//! The PostgreSQL write path: imports (`upsert`) and refresh outcomes (`record`), and the
//! refresh-log rows they leave. `sqlite/writes.rs` holds the same functions, in the same
//! order, under the same names.

use super::errors::pg_err;
use crate::crypto::Keyring;
use crate::model::app_subject;
use crate::store::error::{Refusal, StoreError};
use crate::store::record::{self, Update, Write, give_back_lease};
use crate::store::rules;
use crate::store::types::{Actor, AppAdded, AuditAction, NewAccount, NewApp, Outcome, Recorded};
use deadpool_postgres::{GenericClient, Transaction};
use std::collections::HashSet;
use tokio_postgres::types::ToSql;

/// A batch's existing accounts (`ord` in the batch, id, lease, last refresh), locked.
///
/// Each account is found through the (provider, subject) index: `OFFSET 0` keeps the planner
/// from joining the batch to a scan of the whole table (it did, mid-import, with the table's
/// growth unseen by its statistics: 0.3 s a batch at 100,000 accounts, a quadratic import).
/// The rows are then locked in id order, as a commit group locks them: a batch and a
/// group do not deadlock (across the batches of one import they still can; PostgreSQL then
/// ends one, and either side's failure is whole: see import-format.md).
pub(crate) const LOOK_UP_BATCH: &str = "WITH found AS MATERIALIZED (
        SELECT u.ord, x.id
        FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS u(provider, subject, ord)
        CROSS JOIN LATERAL (SELECT a.id FROM accounts a
            WHERE a.provider = u.provider AND a.subject = u.subject OFFSET 0) x
        ORDER BY x.id)
    SELECT f.ord, l.id, l.lease_expires_at, l.last_refreshed_at
    FROM found f CROSS JOIN LATERAL (SELECT a.id, a.lease_expires_at, a.last_refreshed_at
        FROM accounts a WHERE a.id = f.id FOR UPDATE) l";

/// The batch INSERT of new accounts (`Rows`' arrays, `now` as $15); returns the ids written.
const INSERT_BATCH: &str = "INSERT INTO accounts (id, provider, subject, label, access_token,
        refresh_token, scope, token_type, access_expires_at, refresh_expires_at,
        next_refresh_at, status, reauth_reason, reauth_flagged_at, created_at, updated_at)
     SELECT u.*, $15::bigint, $15::bigint FROM unnest($1::bigint[], $2::text[],
        $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[],
        $9::bigint[], $10::bigint[], $11::bigint[], $12::text[], $13::text[],
        $14::bigint[]) AS u
     ON CONFLICT (provider, subject) DO NOTHING
     RETURNING id";

/// Inserts or updates accounts by (provider, subject), all in the caller's transaction.
/// Returns (id, inserted) per account in input order.
///
/// A few statements per batch, whatever its size, each carrying the whole batch as arrays
/// (`unnest`); those every import runs are prepared once per connection. Every account first gets an id from the
/// sequence (so its tokens are sealed for it before the INSERT), then one INSERT writes the
/// new ones and skips those that exist (their ids stay unused). Only the skipped ones are
/// then looked up and locked (`LOOK_UP_BATCH`), checked and written by one UPDATE; an
/// import of new accounts, the common case, looks nothing up. One refresh-log INSERT ends
/// the batch. An account the INSERT skipped that the lookup does not find (another
/// transaction was creating it) is written by `upsert_one`, as a connect is.
pub async fn upsert(
    tx: &Transaction<'_>,
    keys: &Keyring,
    accounts: &[NewAccount],
    now: i64,
) -> Result<Vec<(i64, bool)>, StoreError> {
    let mut out: Vec<Option<(i64, bool)>> = vec![None; accounts.len()];
    let ctx = "choose ids for imported accounts";
    let next_ids = tx
        // The sequence named once (a sub-select), not looked up again for every id.
        .prepare_cached(
            "SELECT nextval((SELECT pg_get_serial_sequence('accounts', 'id')::regclass))
             FROM generate_series(1, $1::bigint)",
        )
        .await
        .map_err(pg_err(ctx))?;
    let ids: Vec<i64> = tx
        .query(&next_ids, &[&(accounts.len() as i64)])
        .await
        .map_err(pg_err(ctx))?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()
        .map_err(pg_err(ctx))?;
    let mut insert = Rows::default();
    for (a, &id) in accounts.iter().zip(&ids) {
        insert.push(keys, id, a, now);
    }
    let ctx = "insert imported accounts";
    let statement = tx.prepare_cached(INSERT_BATCH).await.map_err(pg_err(ctx))?;
    let inserted: HashSet<i64> = tx
        .query(
            &statement,
            &[
                &insert.id,
                &insert.provider,
                &insert.subject,
                &insert.label,
                &insert.access_token,
                &insert.refresh_token,
                &insert.scope,
                &insert.token_type,
                &insert.access_expires_at,
                &insert.refresh_expires_at,
                &insert.next_refresh_at,
                &insert.status,
                &insert.reauth_reason,
                &insert.reauth_flagged_at,
                &now,
            ],
        )
        .await
        .map_err(pg_err(ctx))?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()
        .map_err(pg_err(ctx))?;
    drop(insert);
    for (i, &id) in ids.iter().enumerate() {
        if inserted.contains(&id) {
            out[i] = Some((id, true));
        }
    }
    // The accounts that exist: looked up and locked, checked, then updated.
    let skipped: Vec<usize> = (0..accounts.len()).filter(|&i| out[i].is_none()).collect();
    if !skipped.is_empty() {
        let ctx = "look up accounts for import";
        let providers: Vec<&str> = skipped
            .iter()
            .map(|&i| accounts[i].provider.as_str())
            .collect();
        let subjects: Vec<&str> = skipped
            .iter()
            .map(|&i| accounts[i].subject.as_str())
            .collect();
        let found = tx
            .query(LOOK_UP_BATCH, &[&providers, &subjects])
            .await
            .map_err(pg_err(ctx))?;
        let mut update = Rows::default();
        for r in &found {
            let (ord, id): (i64, i64) = (
                r.try_get(0).map_err(pg_err(ctx))?,
                r.try_get(1).map_err(pg_err(ctx))?,
            );
            let i = skipped[ord as usize - 1];
            let a = &accounts[i];
            rules::check_upsert(
                id,
                a,
                r.try_get(2).map_err(pg_err(ctx))?,
                r.try_get(3).map_err(pg_err(ctx))?,
                now,
            )?;
            update.push(keys, id, a, now);
            out[i] = Some((id, false));
        }
        if !update.id.is_empty() {
            update_batch(tx, &update, now).await?;
        }
    }
    let logged: Vec<i64> = out.iter().flatten().map(|(id, _)| *id).collect();
    append_imported_log(tx, &logged, now).await?;
    // Created meanwhile by another transaction (the INSERT skipped it, the lookup did not
    // see it): one at a time, as a connect is (`upsert_one` writes its refresh-log row).
    for (i, a) in accounts.iter().enumerate() {
        if out[i].is_none() {
            out[i] = Some(upsert_one(tx, keys, a, now).await?);
        }
    }
    Ok(out.into_iter().flatten().collect())
}

/// Re-imports the batch's accounts that exist (looked up, locked and checked): their
/// tokens, schedule and flag replaced, in one statement.
async fn update_batch(tx: &Transaction<'_>, update: &Rows<'_>, now: i64) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE accounts a SET label = COALESCE(u.label, a.label),
            access_token = u.access_token,
            refresh_token = CASE WHEN u.refresh_token = '' THEN a.refresh_token
                ELSE u.refresh_token END,
            scope = u.scope, token_type = u.token_type,
            access_expires_at = u.access_expires_at,
            refresh_expires_at = CASE WHEN u.refresh_token = ''
                THEN COALESCE(u.refresh_expires_at, a.refresh_expires_at)
                ELSE u.refresh_expires_at END,
            next_refresh_at = u.next_refresh_at,
            status = CASE WHEN a.status = 'disabled' THEN a.status ELSE u.status END,
            reauth_reason = u.reauth_reason, reauth_flagged_at = u.reauth_flagged_at,
            failures = 0, last_error = NULL, lease_owner = NULL, lease_expires_at = NULL,
            generation = a.generation + 1, updated_at = $12::bigint
         FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[],
            $6::text[], $7::bigint[], $8::bigint[], $9::bigint[], $10::text[], $11::text[],
            $13::bigint[])
            AS u(id, label, access_token, refresh_token, scope, token_type,
                 access_expires_at, refresh_expires_at, next_refresh_at, status,
                 reauth_reason, reauth_flagged_at)
         WHERE a.id = u.id",
        &[
            &update.id,
            &update.label,
            &update.access_token,
            &update.refresh_token,
            &update.scope,
            &update.token_type,
            &update.access_expires_at,
            &update.refresh_expires_at,
            &update.next_refresh_at,
            &update.status,
            &update.reauth_reason,
            &now,
            &update.reauth_flagged_at,
        ],
    )
    .await
    .map_err(pg_err("update imported accounts"))?;
    Ok(())
}

/// The rows of one batch's INSERT or UPDATE, column by column (`unnest`'s arrays).
#[derive(Default)]
struct Rows<'a> {
    id: Vec<i64>,
    provider: Vec<&'a str>,
    subject: Vec<&'a str>,
    label: Vec<Option<&'a str>>,
    access_token: Vec<String>,
    refresh_token: Vec<String>,
    scope: Vec<String>,
    token_type: Vec<&'a str>,
    access_expires_at: Vec<i64>,
    refresh_expires_at: Vec<Option<i64>>,
    next_refresh_at: Vec<i64>,
    status: Vec<&'static str>,
    reauth_reason: Vec<Option<&'static str>>,
    reauth_flagged_at: Vec<Option<i64>>,
}

impl<'a> Rows<'a> {
    /// Adds `a` as account `id`, its tokens sealed for that id.
    fn push(&mut self, keys: &Keyring, id: i64, a: &'a NewAccount, now: i64) {
        let new = record::imported(a, now);
        self.id.push(id);
        self.provider.push(&a.provider);
        self.subject.push(&a.subject);
        self.label.push(a.label.as_deref());
        self.access_token.push(new.access_token(keys, id));
        self.refresh_token.push(new.refresh_token(keys, id));
        self.token_type.push(&a.tokens.token_type);
        self.access_expires_at.push(new.access_expires_at);
        self.refresh_expires_at.push(new.refresh_expires_at);
        self.next_refresh_at.push(a.next_refresh_at);
        self.status.push(a.status.as_str());
        self.reauth_reason.push(new.reauth_reason);
        self.reauth_flagged_at.push(new.reauth_flagged_at);
        self.scope.push(new.scope);
    }
}

/// The refresh log's "imported" row of each account, in one statement.
async fn append_imported_log(
    tx: &Transaction<'_>,
    ids: &[i64],
    now: i64,
) -> Result<(), StoreError> {
    let statement = tx
        .prepare_cached(
            "INSERT INTO refresh_log (account_id, at, outcome)
             SELECT id, $2::bigint, 'imported' FROM unnest($1::bigint[]) AS id",
        )
        .await
        .map_err(pg_err("append refresh log"))?;
    tx.execute(&statement, &[&ids, &now])
        .await
        .map_err(pg_err("append refresh log"))?;
    Ok(())
}

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
    tx: &impl GenericClient,
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
    apply(tx, &record::plan(keys, o)).await
}

/// Runs one planned write: its guarded update, then its log row (a rotation's is written
/// by its own statement, `ROTATE`).
pub(super) async fn apply(
    tx: &impl GenericClient,
    write: &record::Write<'_>,
) -> Result<Recorded, StoreError> {
    let run = async |ctx: &'static str,
                     sql: &str,
                     params: &[&(dyn ToSql + Sync)]|
           -> Result<u64, StoreError> {
        let stmt = tx.prepare_cached(sql).await.map_err(pg_err(ctx))?;
        tx.execute(&stmt, params).await.map_err(pg_err(ctx))
    };
    let n = match &write.update {
        Update::Rotate { .. } => {
            let changed = !rotate(tx, &[write]).await?.is_empty();
            return Ok(write.ended(changed).0);
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
                concat!(
                    "UPDATE accounts SET last_error = $3, next_refresh_at = $4, updated_at = $5, ",
                    give_back_lease!(),
                    " WHERE id = $1 AND lease_owner = $2"
                ),
                &[account_id, owner, error, next_refresh_at, at],
            )
            .await?
        }
        Update::Flag {
            account_id,
            owner,
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
                 WHERE id = $1 AND generation = $2
                   AND ($6::text IS NULL OR lease_owner = $6)",
                &[account_id, generation, reason, at, error, owner],
            )
            .await?
        }
        Update::Release { account_id, owner } => {
            run(
                "release lease",
                concat!(
                    "UPDATE accounts SET ",
                    give_back_lease!(),
                    " WHERE id = $1 AND lease_owner = $2"
                ),
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

/// Rotations as one statement, whatever their number: the guarded UPDATE and, in the same
/// statement, each rotation's refresh-log row (the row `Write::ended` gives, as the guard
/// matched or not: `rotated` or `superseded`). One statement leaves nothing for the client
/// to wait on between the two, so a group commit sends all its statements at once
/// (`group.rs`). Its arguments are `Rotations::params`; it returns the ids whose guard matched.
pub(super) const ROTATE: &str = "WITH u AS MATERIALIZED (
        SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[],
                             $6::text[], $7::bigint[], $8::bigint[], $9::bigint[], $10::text[],
                             $11::text[], $12::bigint[], $13::integer[], $14::bigint[],
                             $15::text[], $16::text[], $17::text[], $18::text[]) WITH ORDINALITY
             AS u(id, generation, access_token, refresh_token, scope, token_type,
                  access_expires_at, refresh_expires_at, next_refresh_at, status,
                  reauth_reason, at, http_status, duration_ms,
                  applied_outcome, applied_error, lost_outcome, lost_error, ord)),
    done AS (
        UPDATE accounts AS a SET access_token = u.access_token,
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
        FROM u
        WHERE a.id = u.id AND a.generation = u.generation
        RETURNING a.id),
    logged AS (
        INSERT INTO refresh_log (account_id, at, outcome, http_status, error, duration_ms)
        SELECT l.id, l.at, l.outcome, l.http_status, l.error, l.duration_ms
        FROM (SELECT u.id, u.at, u.http_status, u.duration_ms, u.ord,
                     CASE WHEN d.id IS NULL THEN u.lost_outcome ELSE u.applied_outcome END,
                     CASE WHEN d.id IS NULL THEN u.lost_error ELSE u.applied_error END
              FROM u LEFT JOIN done d ON d.id = u.id)
             AS l(id, at, http_status, duration_ms, ord, outcome, error)
        WHERE l.outcome IS NOT NULL
        ORDER BY l.ord)
    SELECT id FROM done";

/// Rotations (other writes are skipped) as one statement (`ROTATE`), whatever their
/// number: the accounts whose guard matched. A single rotation (`writes::apply`) goes this
/// way too.
pub(super) async fn rotate(
    c: &impl GenericClient,
    writes: &[&Write<'_>],
) -> Result<HashSet<i64>, StoreError> {
    let ctx = "store rotated tokens";
    let stmt = c.prepare_cached(ROTATE).await.map_err(pg_err(ctx))?;
    let r = Rotations::of(writes);
    rotated(c.query(&stmt, &r.params()).await)
}

/// The ids `ROTATE` returned: those whose guard matched.
pub(super) fn rotated(
    rows: Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>,
) -> Result<HashSet<i64>, StoreError> {
    let ctx = "store rotated tokens";
    rows.map_err(pg_err(ctx))?
        .iter()
        .map(|r| r.try_get::<_, i64>(0).map_err(pg_err(ctx)))
        .collect()
}

/// The arguments of `ROTATE` (`unnest`'s arrays) for a batch of rotations: the new values,
/// then the log row's fields, with the outcome and error it gets as the guard matches or not.
#[derive(Default)]
pub(super) struct Rotations<'a> {
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
    http_status: Vec<Option<i32>>,
    duration_ms: Vec<Option<i64>>,
    applied_outcome: Vec<Option<&'static str>>,
    applied_error: Vec<Option<String>>,
    lost_outcome: Vec<Option<&'static str>>,
    lost_error: Vec<Option<String>>,
}

impl<'a> Rotations<'a> {
    /// The rotations among `writes`, in their order.
    pub(super) fn of(writes: &[&'a Write<'a>]) -> Self {
        let mut c = Rotations::default();
        for write in writes {
            let Update::Rotate {
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
            } = &write.update
            else {
                continue;
            };
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
            // The log row as the guard matches or not; a rotation's two differ only in
            // their outcome and error (`Write::ended`).
            let (_, applied) = write.ended(true);
            let (_, lost) = write.ended(false);
            let any = applied.as_ref().or(lost.as_ref());
            debug_assert!(any.is_none_or(|l| l.account_id == *account_id && l.at == *at));
            c.at.push(*at);
            c.http_status
                .push(any.and_then(|l| l.http_status.map(i32::from)));
            c.duration_ms.push(any.and_then(|l| l.duration_ms));
            c.applied_outcome.push(applied.as_ref().map(|l| l.outcome));
            c.lost_outcome.push(lost.as_ref().map(|l| l.outcome));
            c.applied_error.push(applied.and_then(|l| l.error));
            c.lost_error.push(lost.and_then(|l| l.error));
        }
        c
    }

    /// `ROTATE`'s parameters, in order.
    pub(super) fn params(&self) -> [&(dyn ToSql + Sync); 18] {
        [
            &self.id,
            &self.generation,
            &self.access_token,
            &self.refresh_token,
            &self.scope,
            &self.token_type,
            &self.access_expires_at,
            &self.refresh_expires_at,
            &self.next_refresh_at,
            &self.status,
            &self.reauth_reason,
            &self.at,
            &self.http_status,
            &self.duration_ms,
            &self.applied_outcome,
            &self.applied_error,
            &self.lost_outcome,
            &self.lost_error,
        ]
    }
}

/// Appends an audit-trail row for account `id`, in the caller's transaction (the change it
/// records commits with it or not at all). The account must still exist: its provider and
/// subject are copied, so the row outlives it.
pub async fn append_audit(
    tx: &Transaction<'_>,
    id: i64,
    at: i64,
    action: AuditAction,
    by: &Actor,
    detail: Option<&str>,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO audit_log (at, account_id, provider, subject, action, actor, via, detail)
         SELECT $2, id, provider, subject, $3, $4, $5, $6 FROM accounts WHERE id = $1",
        &[&id, &at, &action.as_str(), &by.who, &by.via, &detail],
    )
    .await
    .map_err(pg_err("append to the audit trail"))?;
    Ok(())
}
