//! The connection the benchmark prepares and reads the store with, on either backend: plain
//! SQL, so the benchmark sees what the daemon committed without going through the daemon.

use anyhow::Result;
use rusqlite::Connection;

/// A connection to the store under test.
pub(crate) enum Db {
    Sqlite(Connection),
    Postgres(tokio_postgres::Client),
}

impl Db {
    /// Runs `f` on the PostgreSQL client from synchronous code (the runtime is multi-thread).
    fn pg<T>(
        c: &tokio_postgres::Client,
        f: impl AsyncFnOnce(&tokio_postgres::Client) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T> {
        tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f(c)))
            .map_err(|e| anyhow::anyhow!("{}", refreshd::store::postgres::describe_error(&e)))
    }

    /// A client of the PostgreSQL server at `url` (its connection task spawned).
    pub(crate) fn connect_pg(url: &str) -> Result<Db> {
        let (client, conn) = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current()
                .block_on(tokio_postgres::connect(url, tokio_postgres::NoTls))
        })
        .map_err(|e| anyhow::anyhow!("{}", refreshd::store::postgres::describe_error(&e)))?;
        tokio::spawn(conn);
        Ok(Db::Postgres(client))
    }

    /// One row of integers (each possibly NULL).
    pub(crate) fn ints(&self, sql: &str) -> Result<Vec<Option<i64>>> {
        match self {
            Db::Sqlite(c) => Ok(c.query_row(sql, [], |r| {
                (0..r.as_ref().column_count())
                    .map(|i| r.get::<_, Option<i64>>(i))
                    .collect()
            })?),
            Db::Postgres(c) => Self::pg(c, async |c| {
                let row = c.query_one(sql, &[]).await?;
                (0..row.len())
                    .map(|i| row.try_get::<_, Option<i64>>(i))
                    .collect()
            }),
        }
    }

    pub(crate) fn int(&self, sql: &str) -> Result<i64> {
        Ok(self.ints(sql)?.first().copied().flatten().unwrap_or(0))
    }

    /// Refresh-log outcomes and their counts after log id `base`.
    pub(crate) fn outcomes_after(&self, base: i64) -> Result<Vec<(String, i64)>> {
        let sql = format!(
            "SELECT outcome, COUNT(*) FROM refresh_log WHERE id > {base} GROUP BY 1 ORDER BY 1"
        );
        match self {
            Db::Sqlite(c) => {
                let mut s = c.prepare(&sql)?;
                Ok(s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<_, _>>()?)
            }
            Db::Postgres(c) => Self::pg(c, async |c| {
                c.query(&sql, &[])
                    .await?
                    .iter()
                    .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                    .collect()
            }),
        }
    }

    pub(crate) fn exec(&self, sql: &str) -> Result<()> {
        match self {
            Db::Sqlite(c) => Ok(c.execute_batch(sql)?),
            Db::Postgres(c) => Self::pg(c, async |c| c.batch_execute(sql).await),
        }
    }

    /// The PostgreSQL server's values of `names` (`pg_settings`), in their order; empty on
    /// SQLite.
    pub(crate) fn pg_settings(&self, names: &[&str]) -> Result<Vec<(String, String)>> {
        match self {
            Db::Sqlite(_) => Ok(Vec::new()),
            Db::Postgres(c) => Self::pg(c, async |c| {
                let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
                c.query(
                    "SELECT name, current_setting(name) FROM pg_settings
                     WHERE name = ANY($1) ORDER BY array_position($1, name)",
                    &[&names],
                )
                .await?
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect()
            }),
        }
    }

    /// The highest refresh-log id: what was committed before a measurement starts.
    pub(crate) fn log_max_id(&self) -> Result<i64> {
        self.int("SELECT COALESCE(MAX(id), 0) FROM refresh_log")
    }

    /// Rotations committed after log id `after`.
    pub(crate) fn count_rotated(&self, after: i64) -> Result<i64> {
        self.int(&format!(
            "SELECT COUNT(*) FROM refresh_log WHERE id > {after} AND outcome = 'rotated'"
        ))
    }
}
