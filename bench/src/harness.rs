//! The bench itself: the store it prepares, the sandbox provider and the daemon it starts as
//! processes of their own, the configs it writes them, and the sampling of a running daemon.
//! Scenarios (scenarios/) are methods on [`Bench`] built from these parts.

use crate::Cli;
use crate::db::Db;
use crate::plots::PlotData;
use crate::procs::{self, CpuTimes, Proc, Usage};
use crate::report::Report;
use anyhow::{Context, Result, bail};
use refreshd::sandbox::ADOPT_PREFIX;
use refreshd::store::{PgOptions, StoreOptions};
use rusqlite::{Connection, OpenFlags};
use secrecy::SecretString;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) struct Bench {
    pub(crate) cli: Cli,
    pub(crate) refreshd: PathBuf,
    /// The SQLite store of the scenarios (`bench-N.db` in --dir).
    pub(crate) db: PathBuf,
    /// The PostgreSQL store the scenarios run on instead, when set (a URL naming its schema).
    pub(crate) pg: Option<String>,
    pub(crate) report: Report,
    pub(crate) plots: PlotData,
    pub(crate) http: reqwest::Client,
    /// The last limit measured: what a single burst is compared with.
    pub(crate) limit_rate: Option<f64>,
    /// The bare client's CPU per refresh in that limit: the yardstick of the machine.
    pub(crate) limit_client_us: Option<f64>,
    pub(crate) clk_tck: f64,
}

impl Bench {
    pub(crate) fn new(cli: Cli, refreshd: PathBuf) -> Result<Bench> {
        let db = cli.dir.join(format!("bench-{}.db", cli.accounts));
        Ok(Bench {
            cli,
            refreshd,
            db,
            pg: None,
            report: Report::default(),
            plots: PlotData::default(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?,
            limit_rate: None,
            limit_client_us: None,
            clk_tck: procs::clk_tck(),
        })
    }

    /// The scenario's name in the table: `pg-` in front while running on PostgreSQL.
    pub(crate) fn tag(&self, scenario: &str) -> String {
        match self.pg {
            Some(_) => format!("pg-{scenario}"),
            None => scenario.to_string(),
        }
    }

    pub(crate) fn store_options(&self) -> StoreOptions {
        StoreOptions {
            path: self.db.clone(),
            busy_timeout: Duration::from_secs(5),
            keyring: Default::default(),
            postgres: self.pg.as_ref().map(|url| PgOptions {
                url: SecretString::from(url.clone()),
                pool_size: 8,
            }),
        }
    }

    /// The daemon's config: defaults, except a rate limit the sandbox never reaches, the ops
    /// server for readiness and metrics, and JSON logs (to a file).
    pub(crate) fn config_toml(
        &self,
        sandbox_port: u16,
        ops_port: u16,
        sweep_cron: &str,
        concurrency: usize,
    ) -> String {
        format!(
            r#"[store]
path = {db:?}
{url}

[refresh]
concurrency = {concurrency}

[reauth]
sweep_cron = "{sweep_cron}"

[log]
format = "json"
level = "info"

[server]
listen = "127.0.0.1:{ops_port}"

[providers.tiktok]
client_key = "sandbox-client-key"
client_secret = "sandbox-client-secret"
token_url = "http://127.0.0.1:{sandbox_port}/v2/oauth/token/"
rate_limit = 60000000
burst = 100000
"#,
            db = self.db.display().to_string(),
            url = match &self.pg {
                Some(u) => format!("url = {u:?}"),
                None => String::new(),
            },
        )
    }

    /// Writes a config (0600: it names the sandbox's client secret) into --dir.
    pub(crate) fn write_config(&self, name: &str, toml: &str) -> Result<PathBuf> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.cli.dir.join(name);
        let _ = std::fs::remove_file(&path);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        std::io::Write::write_all(&mut f, toml.as_bytes())?;
        Ok(path)
    }

    /// The refreshd binary as a command, without `REFRESHD_BIN`: refreshd reads every
    /// `REFRESHD_*` variable as a config key and refuses one it does not know.
    pub(crate) fn refreshd_command(&self) -> Command {
        let mut c = Command::new(&self.refreshd);
        c.env_remove("REFRESHD_BIN");
        c
    }

    pub(crate) async fn spawn_sandbox(&self, port: u16) -> Result<Proc> {
        let child = self
            .refreshd_command()
            .args([
                "sandbox",
                "--adopt",
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start the sandbox")?;
        let p = Proc {
            child,
            name: "sandbox",
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.sandbox_stats(port).await.is_err() {
            if Instant::now() > deadline {
                bail!("the sandbox did not answer within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(p)
    }

    pub(crate) async fn sandbox_stats(&self, port: u16) -> Result<Value> {
        Ok(self
            .http
            .get(format!(
                "http://127.0.0.1:{port}{}",
                refreshd::sandbox::STATS_PATH
            ))
            .send()
            .await?
            .json()
            .await?)
    }

    /// Starts `refreshd run` and waits until /readyz answers 200; returns it and the time
    /// from spawn to ready.
    /// Waits for the daemon's start-up checks to end (its `store_checked` line in `log`, in
    /// the bench directory): ready comes before them and writes wait for them. Returns the
    /// seconds waited.
    pub(crate) async fn wait_for_checks(&self, log: &str) -> Result<f64> {
        let path = self.cli.dir.join(log);
        let t = Instant::now();
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.contains("\"event\":\"store_checked\"") {
                return Ok(t.elapsed().as_secs_f64());
            }
            if text.contains("\"event\":\"store_checks_failed\"") {
                bail!(
                    "the store failed its start-up checks (see {})",
                    path.display()
                );
            }
            if t.elapsed() > Duration::from_secs(120) {
                bail!(
                    "the store's start-up checks did not end within 120 s (see {})",
                    path.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(crate) async fn spawn_daemon(
        &self,
        config: &Path,
        ops_port: u16,
        log: &str,
    ) -> Result<(Proc, f64)> {
        let log = std::fs::File::create(self.cli.dir.join(log))?;
        let t = Instant::now();
        let child = self
            .refreshd_command()
            .arg("--config")
            .arg(config)
            .arg("run")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start refreshd run")?;
        let mut p = Proc {
            child,
            name: "refreshd run",
        };
        let url = format!("http://127.0.0.1:{ops_port}/readyz");
        let quick = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        loop {
            if let Ok(r) = quick.get(&url).send().await
                && r.status().is_success()
            {
                return Ok((p, t.elapsed().as_secs_f64()));
            }
            if let Some(status) = p.child.try_wait()? {
                bail!(
                    "refreshd run exited with {status} before it was ready (log in the bench directory)"
                );
            }
            if t.elapsed() > Duration::from_secs(120) {
                bail!("refreshd run was not ready within 120 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub(crate) fn open_rw(&self) -> Result<Db> {
        if self.pg.is_some() {
            return self.open_ro();
        }
        let c = Connection::open(&self.db)?;
        c.busy_timeout(Duration::from_secs(30))?;
        Ok(Db::Sqlite(c))
    }

    /// A connection the benchmark only reads with while the daemon runs (WAL: it never
    /// blocks the daemon's writes). Not opened read-only: SQLite cannot open a WAL database
    /// read-only while its -shm file does not exist.
    pub(crate) fn open_ro(&self) -> Result<Db> {
        if let Some(url) = &self.pg {
            return Db::connect_pg(url);
        }
        let c = Connection::open_with_flags(
            &self.db,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        c.busy_timeout(Duration::from_secs(30))?;
        Ok(Db::Sqlite(c))
    }

    /// Puts every account back to a fresh state (active, unleased, the refresh token the
    /// sandbox adopts) with `next_refresh_at` from `due` (an SQL expression over `id`), and
    /// `refresh_expires_at` from `refresh_end`; then folds the WAL into the database so the
    /// daemon starts on a clean file.
    pub(crate) fn prepare(&self, due: &str, refresh_end: &str) -> Result<f64> {
        let t = Instant::now();
        let c = self.open_rw()?;
        let update = format!(
            "UPDATE accounts SET refresh_token = '{ADOPT_PREFIX}' || subject,
                status = 'active', reauth_reason = NULL, reauth_flagged_at = NULL, failures = 0,
                last_error = NULL, last_refreshed_at = NULL, lease_owner = NULL,
                lease_expires_at = NULL, interrupted_at = NULL,
                next_refresh_at = {due}, refresh_expires_at = {refresh_end};"
        );
        match &c {
            Db::Sqlite(_) => c.exec(&format!(
                "BEGIN IMMEDIATE; {update} COMMIT; PRAGMA wal_checkpoint(TRUNCATE);"
            ))?,
            // Rewriting every row leaves a dead copy of each: vacuum, so every run starts
            // from the same table.
            Db::Postgres(_) => {
                c.exec(&update)?;
                c.exec("VACUUM ANALYZE accounts")?;
            }
        }
        Ok(t.elapsed().as_secs_f64())
    }

    /// Samples the daemon and the sandbox every 200 ms until `until` (given the seconds
    /// since the start) says stop; returns what they used and the seconds watched.
    pub(crate) async fn watch(
        &self,
        daemon: &Proc,
        sandbox: &Proc,
        mut until: impl FnMut(f64) -> Result<bool>,
    ) -> Result<(Usage, f64)> {
        let me = std::process::id();
        let (d0, s0, b0, m0, t0) = (
            procs::cpu_secs(daemon.pid(), self.clk_tck),
            procs::cpu_secs(sandbox.pid(), self.clk_tck),
            procs::cpu_secs(me, self.clk_tck),
            CpuTimes::now(),
            Instant::now(),
        );
        let mut u = Usage::default();
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let (r, hwm) = procs::rss(daemon.pid());
            u.max_rss = u.max_rss.max(r);
            u.hwm = u.hwm.max(hwm);
            if until(t0.elapsed().as_secs_f64())? {
                break;
            }
        }
        u.daemon_cpu = procs::cpu_secs(daemon.pid(), self.clk_tck) - d0;
        u.sandbox_cpu = procs::cpu_secs(sandbox.pid(), self.clk_tck) - s0;
        u.bench_cpu = procs::cpu_secs(me, self.clk_tck) - b0;
        let m1 = CpuTimes::now();
        u.machine_busy = m0.busy_share_until(m1);
        let secs = t0.elapsed().as_secs_f64();
        u.others_cpu =
            (m0.busy_secs_until(m1, self.clk_tck) - u.daemon_cpu - u.sandbox_cpu - u.bench_cpu)
                .max(0.0);
        Ok((u, secs))
    }
}
