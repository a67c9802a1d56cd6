//! `refreshd store copy`: every account and its refresh log from one store to another
//! (SQLite to PostgreSQL and back), ids kept, sealed tokens copied as they are (their
//! associated data is the account id, which does not change). Each table is copied in id
//! order, in batches, so an interrupted copy resumes after the destination's last row.
//! Verified at the end by counts and SHA-256 checksums of both tables on both sides.

use super::columns::{self, Kind};
use super::{Refusal, Store, StoreError};
use sha2::{Digest, Sha256};

/// A column value as both backends hold it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(untagged)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
}

/// A table as copied: its columns, in order, with their kinds.
pub struct Table {
    pub name: &'static str,
    /// The column that orders and batches the copy.
    pub key: &'static str,
    columns: &'static [(&'static str, Kind)],
}

const ACCOUNTS: Table = Table {
    name: "accounts",
    key: "id",
    columns: columns::ACCOUNTS,
};

const LOG: Table = Table {
    name: "refresh_log",
    key: "id",
    columns: columns::REFRESH_LOG,
};

/// The audit trail: the only record of removed accounts, so it moves with them.
const AUDIT: Table = Table {
    name: "audit_log",
    key: "id",
    columns: columns::AUDIT_LOG,
};

impl Table {
    fn column_list(&self) -> String {
        self.columns
            .iter()
            .map(|(c, _)| *c)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

type Row = Vec<Value>;

/// What `copy` did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CopyReport {
    /// Accounts the destination already held from an interrupted copy.
    pub resumed_after: i64,
    pub accounts_copied: u64,
    pub log_rows_copied: u64,
    pub accounts: u64,
    pub log_rows: u64,
    pub accounts_sha256: String,
    pub log_sha256: String,
    pub audit_rows_copied: u64,
    pub audit_rows: u64,
    pub audit_sha256: String,
}

fn sqlite_err(context: &'static str) -> impl Fn(rusqlite::Error) -> StoreError {
    move |source| StoreError::Sqlite { context, source }
}

use super::postgres::pg_err;

/// Rows of `table` whose key is in (`after`, `upto`], in key then id order, at most `limit`
/// (None: all of them).
async fn read(
    store: &Store,
    table: &'static Table,
    after: i64,
    upto: i64,
    limit: Option<usize>,
) -> Result<Vec<Row>, StoreError> {
    let limit = limit.map(|l| l as i64).unwrap_or(i64::MAX);
    let order = if table.key == "id" {
        "id".to_string()
    } else {
        format!("{}, id", table.key)
    };
    if let Some(pg) = store.pg() {
        let c = pg.client("connect").await?;
        let sql = format!(
            "SELECT {} FROM {} WHERE {key} > $1 AND {key} <= $2 ORDER BY {order} LIMIT $3",
            table.column_list(),
            table.name,
            key = table.key
        );
        let rows = c
            .query(&sql, &[&after, &upto, &limit])
            .await
            .map_err(pg_err("read rows to copy"))?;
        return rows
            .iter()
            .map(|r| {
                table
                    .columns
                    .iter()
                    .enumerate()
                    .map(|(i, (_, kind))| {
                        let v = match kind {
                            Kind::Int => r.try_get::<_, Option<i64>>(i)?.map(Value::Int),
                            Kind::Int4 => r
                                .try_get::<_, Option<i32>>(i)?
                                .map(|v| Value::Int(v.into())),
                            Kind::Text => r.try_get::<_, Option<String>>(i)?.map(Value::Text),
                        };
                        Ok(v.unwrap_or(Value::Null))
                    })
                    .collect::<Result<Row, tokio_postgres::Error>>()
                    .map_err(pg_err("read rows to copy"))
            })
            .collect();
    }
    store
        .call(move |c| {
            let sql = format!(
                "SELECT {} FROM {} WHERE {key} > ?1 AND {key} <= ?2 ORDER BY {order} LIMIT ?3",
                table.column_list(),
                table.name,
                key = table.key
            );
            let mut stmt = c.prepare(&sql).map_err(sqlite_err("read rows to copy"))?;
            let rows = stmt
                .query_map(rusqlite::params![after, upto, limit], |r| {
                    (0..table.columns.len())
                        .map(|i| {
                            Ok(match r.get::<_, rusqlite::types::Value>(i)? {
                                rusqlite::types::Value::Integer(v) => Value::Int(v),
                                rusqlite::types::Value::Text(t) => Value::Text(t),
                                rusqlite::types::Value::Null => Value::Null,
                                other => Value::Text(format!("{other:?}")),
                            })
                        })
                        .collect()
                })
                .map_err(sqlite_err("read rows to copy"))?;
            rows.collect::<Result<Vec<Row>, _>>()
                .map_err(sqlite_err("read rows to copy"))
        })
        .await
}

/// An integer column holding text (SQLite allows it) would be written as NULL or fail with
/// the server quoting the row: refuse it by name instead, never showing the value.
fn check_types(table: &Table, row: &Row) -> Result<(), StoreError> {
    for ((column, kind), v) in table.columns.iter().zip(row) {
        if matches!(kind, Kind::Int | Kind::Int4) && matches!(v, Value::Text(_)) {
            return Err(Refusal::CopyTextInInteger {
                table: table.name,
                column,
                row: format!("{:?}", row.first().cloned().unwrap_or(Value::Null)),
            }
            .into());
        }
    }
    Ok(())
}

/// Writes rows of one table in one transaction.
async fn write(store: &Store, table: &'static Table, rows: Vec<Row>) -> Result<(), StoreError> {
    if let Some(pg) = store.pg() {
        let mut c = pg.client("connect").await?;
        let tx = c
            .transaction()
            .await
            .map_err(pg_err("begin copying a batch"))?;
        {
            let rows = &rows;
            let marks: Vec<String> = (1..=table.columns.len()).map(|i| format!("${i}")).collect();
            let stmt = tx
                .prepare(&format!(
                    "INSERT INTO {} ({}) VALUES ({})",
                    table.name,
                    table.column_list(),
                    marks.join(", ")
                ))
                .await
                .map_err(pg_err("prepare copying rows"))?;
            for row in rows {
                check_types(table, row)?;
                let ints: Vec<Option<i64>> = row
                    .iter()
                    .map(|v| match v {
                        Value::Int(i) => Some(*i),
                        _ => None,
                    })
                    .collect();
                let int4s: Vec<Option<i32>> = ints.iter().map(|v| v.map(|i| i as i32)).collect();
                let texts: Vec<Option<String>> = row
                    .iter()
                    .map(|v| match v {
                        Value::Text(t) => Some(t.clone()),
                        Value::Int(i) => Some(i.to_string()),
                        Value::Null => None,
                    })
                    .collect();
                let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = table
                    .columns
                    .iter()
                    .enumerate()
                    .map(
                        |(i, (_, kind))| -> &(dyn tokio_postgres::types::ToSql + Sync) {
                            match kind {
                                Kind::Int => &ints[i],
                                Kind::Int4 => &int4s[i],
                                Kind::Text => &texts[i],
                            }
                        },
                    )
                    .collect();
                tx.execute(&stmt, &params)
                    .await
                    .map_err(pg_err("copy a row"))?;
            }
        }
        // Ids were given explicitly: move the sequences past them for later inserts.
        for table in ["accounts", "refresh_log", "audit_log"] {
            tx.execute(
                &format!(
                    "SELECT setval(pg_get_serial_sequence('{table}', 'id'), GREATEST((SELECT MAX(id) FROM {table}), 1))"
                ),
                &[],
            )
            .await
            .map_err(pg_err("advance the id sequences"))?;
        }
        return tx.commit().await.map_err(pg_err("commit a copied batch"));
    }
    store
        .in_tx("copy a batch", move |tx| {
            {
                let rows = &rows;
                let marks: Vec<String> =
                    (1..=table.columns.len()).map(|i| format!("?{i}")).collect();
                let mut stmt = tx
                    .prepare(&format!(
                        "INSERT INTO {} ({}) VALUES ({})",
                        table.name,
                        table.column_list(),
                        marks.join(", ")
                    ))
                    .map_err(sqlite_err("prepare copying rows"))?;
                for row in rows {
                    check_types(table, row)?;
                    let values = row.iter().map(|v| match v {
                        Value::Null => rusqlite::types::Value::Null,
                        Value::Int(i) => rusqlite::types::Value::Integer(*i),
                        Value::Text(t) => rusqlite::types::Value::Text(t.clone()),
                    });
                    stmt.execute(rusqlite::params_from_iter(values))
                        .map_err(sqlite_err("copy a row"))?;
                }
            }
            Ok(())
        })
        .await
}

/// Count and SHA-256 of every row of `table`, in id order, read in pages.
async fn checksum(store: &Store, table: &'static Table) -> Result<(u64, String), StoreError> {
    let mut hasher = Sha256::new();
    let mut count = 0u64;
    let mut after = i64::MIN;
    loop {
        let page = read(store, table, after, i64::MAX, Some(5000)).await?;
        let Some(Value::Int(last)) = page.last().map(|r| r[0].clone()) else {
            break;
        };
        for r in &page {
            hasher.update(serde_json::to_vec(r).unwrap_or_default());
            hasher.update(b"\n");
        }
        count += page.len() as u64;
        after = last;
    }
    Ok((count, format!("{:x}", hasher.finalize())))
}

async fn max_id(store: &Store, table: &'static Table) -> Result<Option<i64>, StoreError> {
    let sql = format!("SELECT MAX(id) FROM {}", table.name);
    if let Some(pg) = store.pg() {
        let c = pg.client("connect").await?;
        return c
            .query_one(&sql, &[])
            .await
            .and_then(|r| r.try_get(0))
            .map_err(pg_err("read the last id"));
    }
    store
        .call(move |c| {
            c.query_row(&sql, [], |r| r.get(0))
                .map_err(sqlite_err("read the last id"))
        })
        .await
}

async fn live_leases(store: &Store, now: i64) -> Result<i64, StoreError> {
    if let Some(pg) = store.pg() {
        let c = pg.client("connect").await?;
        return c
            .query_one(
                "SELECT COUNT(*) FROM accounts WHERE lease_expires_at > $1",
                &[&now],
            )
            .await
            .and_then(|r| r.try_get(0))
            .map_err(pg_err("count live leases"));
    }
    store
        .call(move |c| {
            c.query_row(
                "SELECT COUNT(*) FROM accounts WHERE lease_expires_at > ?1",
                [now],
                |r| r.get(0),
            )
            .map_err(sqlite_err("count live leases"))
        })
        .await
}

/// Copies `from` into `to` in batches of `batch` accounts; `progress` gets the number of
/// accounts each batch copied. The source must not be refreshing meanwhile (stop the
/// daemons): a live lease refuses the copy, and the checksums catch any later change.
pub async fn copy(
    from: &Store,
    to: &Store,
    batch: usize,
    now: i64,
    mut progress: impl FnMut(u64),
) -> Result<CopyReport, StoreError> {
    let leased = live_leases(from, now).await?;
    if leased > 0 {
        return Err(Refusal::CopyWhileLeased {
            leased,
            store: from.describe(),
        }
        .into());
    }
    let mut report = CopyReport::default();
    // Each table in id order, in batches: a rerun continues after the destination's last row
    // (an interrupted copy), once it has checked that row is the source's.
    for table in [&ACCOUNTS, &LOG, &AUDIT] {
        let mut after = match max_id(to, table).await? {
            None => i64::MIN,
            Some(last) => {
                let theirs = read(to, table, last - 1, last, Some(1)).await?;
                let ours = read(from, table, last - 1, last, Some(1)).await?;
                let same =
                    |a: &[Row], b: &[Row]| a.first().map(|r| &r[..3]) == b.first().map(|r| &r[..3]);
                if !same(&theirs, &ours) {
                    return Err(Refusal::CopyNotPartial {
                        to: to.describe(),
                        rows: table.name,
                        from: from.describe(),
                        last,
                    }
                    .into());
                }
                if table.name == ACCOUNTS.name {
                    report.resumed_after = last;
                }
                last
            }
        };
        loop {
            let rows = read(from, table, after, i64::MAX, Some(batch.max(1))).await?;
            let Some(Value::Int(last)) = rows.last().map(|r| r[0].clone()) else {
                break;
            };
            let n = rows.len() as u64;
            write(to, table, rows).await?;
            if table.name == ACCOUNTS.name {
                report.accounts_copied += n;
                progress(n);
            } else if table.name == LOG.name {
                report.log_rows_copied += n;
            } else {
                report.audit_rows_copied += n;
            }
            after = last;
        }
    }
    // Verify: the same rows on both sides.
    for table in [&ACCOUNTS, &LOG, &AUDIT] {
        let (n_from, sum_from) = checksum(from, table).await?;
        let (n_to, sum_to) = checksum(to, table).await?;
        if (n_from, &sum_from) != (n_to, &sum_to) {
            return Err(Refusal::CopyMismatch {
                table: table.name,
                n_from,
                sum_from,
                from: from.describe(),
                n_to,
                sum_to,
                to: to.describe(),
            }
            .into());
        }
        if table.name == ACCOUNTS.name {
            (report.accounts, report.accounts_sha256) = (n_to, sum_to);
        } else if table.name == LOG.name {
            (report.log_rows, report.log_sha256) = (n_to, sum_to);
        } else {
            (report.audit_rows, report.audit_sha256) = (n_to, sum_to);
        }
    }
    Ok(report)
}
