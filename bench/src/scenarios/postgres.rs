//! PostgreSQL beside SQLite: the import and the burst on a PostgreSQL store, in a schema of
//! the run's own on --postgres's server, else on a throwaway cluster started from the
//! installed binaries with PostgreSQL's durable defaults (the tests' cluster skips fsync);
//! NOT RUN rows when there is none. The server's durability settings are a row of their own:
//! a rate measured without fsynced commits is not the daemon's.

use crate::db::Db;
use crate::harness::Bench;
use anyhow::Result;

/// The schema the benchmark fills on a server it was given (dropped and created each run).
const SCHEMA: &str = "refreshd_bench";
const NO_SERVER: &str = "skipped: no PostgreSQL";

impl Bench {
    /// A URL whose connections use a fresh schema on `base`'s server; a URL that already
    /// names a search_path (a test's own schema) is used as it is.
    pub(crate) fn pg_schema(base: &str) -> Result<String> {
        if base.contains("search_path") {
            return Ok(base.to_string());
        }
        Db::connect_pg(base)?.exec(&format!(
            "DROP SCHEMA IF EXISTS {SCHEMA} CASCADE; CREATE SCHEMA {SCHEMA}"
        ))?;
        let sep = if base.contains('?') { '&' } else { '?' };
        Ok(format!("{base}{sep}options=-c%20search_path%3D{SCHEMA}"))
    }

    /// The server of the PostgreSQL rows: --postgres, else a throwaway cluster when
    /// PostgreSQL is installed; none with --no-postgres.
    fn pg_server(&self) -> Option<String> {
        if self.cli.no_postgres {
            return None;
        }
        self.cli
            .postgres
            .clone()
            .or_else(|| refreshd_testkit::durable_postgres("refreshd-bench"))
    }

    /// postgres: `accounts import` of --accounts lines into PostgreSQL, then a burst.
    pub(crate) async fn postgres(&mut self) -> Result<()> {
        let Some(base) = self.pg_server() else {
            let r = &mut self.report;
            let figure = "accounts import: accounts per second";
            r.not_run("pg-seed", figure, ">= 50,000/s", NO_SERVER);
            let figure = "committed refreshes per second";
            r.not_run("pg-burst", figure, ">= 15,000/s", NO_SERVER);
            return Ok(());
        };
        self.pg_durability(&base)?;
        self.pg = Some(Self::pg_schema(&base)?);
        let run = async {
            eprintln!("   PostgreSQL: import");
            self.seed().await?;
            eprintln!("   PostgreSQL: burst");
            self.burst().await
        }
        .await;
        self.pg = None;
        run
    }

    /// Records the server's settings that decide whether a commit is durable (and its
    /// memory), and a row saying whether it fsyncs (`synchronous_commit` is the daemon's
    /// own: its sessions set it on, whatever the server's default).
    fn pg_durability(&mut self, base: &str) -> Result<()> {
        let settings = Db::connect_pg(base)?.pg_settings(&[
            "server_version",
            "fsync",
            "synchronous_commit",
            "full_page_writes",
            "shared_buffers",
            "max_wal_size",
        ])?;
        let durable = settings.iter().any(|(n, v)| n == "fsync" && v == "on");
        let shown: Vec<String> = settings.iter().map(|(n, v)| format!("{n}={v}")).collect();
        eprintln!("   PostgreSQL server: {}", shown.join(" "));
        let r = &mut self.report;
        r.row(
            "pg-seed",
            "server durable (fsync on)",
            if durable { 1.0 } else { 0.0 },
            "",
            Some(("= 1", durable)),
        );
        r.details.insert(
            "pg_server".into(),
            serde_json::Value::Object(
                settings
                    .into_iter()
                    .map(|(n, v)| (n, serde_json::Value::String(v)))
                    .collect(),
            ),
        );
        Ok(())
    }
}
