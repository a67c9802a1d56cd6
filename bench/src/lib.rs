//! refreshd-bench: measures refreshd at scale (issue 8) and prints each figure next to its
//! target. See BENCHMARKS.md.
//!
//! The store is built and prepared through the library; the provider is the sandbox run as
//! its own process (`refreshd sandbox --adopt`), and the daemon is the real `refreshd run`
//! in its own process, so the two share the machine's CPUs as they would in production and
//! their CPU time and memory are read apart from /proc. Nothing here is estimated: every
//! figure is read from the processes, the database or the daemon's /metrics.
//!
//! Scenarios (`all` runs them in this order): seed, startup, limit, burst, steady, sweep.

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use refreshd::clock::Clock;
use refreshd::config::Config;
use refreshd::model::{Status, TokenSet};
use refreshd::provider::Providers;
use refreshd::sandbox::ADOPT_PREFIX;
use refreshd::store::{NewAccount, PgOptions, Store, StoreOptions};
use rusqlite::{Connection, OpenFlags};
use secrecy::SecretString;
use serde_json::{Value, json};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const MIB: f64 = 1024.0 * 1024.0;
/// Refreshes per second the steady scenario makes due.
const STEADY_RATE: i64 = 300;
/// Accounts per import transaction when seeding.
const SEED_BATCH: usize = 20_000;
const DAY: i64 = 86_400;
/// The reauth window the daemon runs with (its default).
const WINDOW: i64 = 7 * DAY;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Seed,
    Startup,
    Burst,
    Limit,
    Steady,
    Sweep,
    All,
}

/// Benchmarks refreshd: prints a table (figure, measured, target, met?) and writes JSON.
#[derive(Parser)]
#[command(name = "refreshd-bench")]
struct Cli {
    scenario: Scenario,
    /// Accounts in the store.
    #[arg(long, default_value_t = 1_000_000)]
    accounts: usize,
    /// Where the results go as JSON.
    #[arg(long, default_value = "target/refreshd-bench.json")]
    json: PathBuf,
    /// Directory of the benchmark's database (kept, so a seed is reused by later runs).
    #[arg(long, default_value = "target/bench")]
    dir: PathBuf,
    /// The refreshd binary (default: the one next to this program).
    #[arg(long, env = "REFRESHD_BIN")]
    refreshd: Option<PathBuf>,
    /// How long burst and limit measure.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "20s")]
    window: Duration,
    /// How long steady measures (at most the spread of the due times: accounts / 300 s).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    steady_window: Duration,
    /// Start-ups measured (the median is reported).
    #[arg(long, default_value_t = 3)]
    startups: usize,
    /// refresh.concurrency of the daemon, and the requests in flight in limit. The daemon's
    /// default (32) suits real providers' rate limits; a burst needs a deeper pipeline.
    #[arg(long, default_value_t = 128)]
    concurrency: usize,
    /// Run on PostgreSQL at this URL (a database the benchmark may fill: it drops and creates
    /// refreshd's tables there) instead of a SQLite file.
    #[arg(long, value_name = "URL")]
    postgres: Option<String>,
}

/// A connection the benchmark prepares and reads the store with, on either backend.
enum Db {
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

    /// One row of integers (each possibly NULL).
    fn ints(&self, sql: &str) -> Result<Vec<Option<i64>>> {
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

    fn int(&self, sql: &str) -> Result<i64> {
        Ok(self.ints(sql)?.first().copied().flatten().unwrap_or(0))
    }

    /// Refresh-log outcomes and their counts after log id `base`.
    fn outcomes_after(&self, base: i64) -> Result<Vec<(String, i64)>> {
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

    fn exec(&self, sql: &str) -> Result<()> {
        match self {
            Db::Sqlite(c) => Ok(c.execute_batch(sql)?),
            Db::Postgres(c) => Self::pg(c, async |c| c.batch_execute(sql).await),
        }
    }
}

/// One line of the table.
#[derive(serde::Serialize)]
struct Row {
    scenario: &'static str,
    figure: String,
    measured: f64,
    unit: &'static str,
    target: Option<String>,
    met: Option<bool>,
}

struct Bench {
    cli: Cli,
    refreshd: PathBuf,
    db: PathBuf,
    rows: Vec<Row>,
    details: serde_json::Map<String, Value>,
    http: reqwest::Client,
    limit_rate: Option<f64>,
    clk_tck: f64,
}

/// The program: parses `args` (the program's name first), runs the scenarios, writes the
/// table to `out`. A library function so the CI smoke test (tests/it/bench.rs) runs it.
pub fn main_with<I, T>(args: I, out: &mut dyn Write) -> std::process::ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return std::process::ExitCode::from(2);
        }
    };
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    match rt.block_on(run(cli, out)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("refreshd-bench: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, out: &mut dyn Write) -> Result<()> {
    if cli.accounts < STEADY_RATE as usize {
        bail!("--accounts must be at least {STEADY_RATE}");
    }
    let refreshd = match &cli.refreshd {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no directory of this program")?
            .join("refreshd"),
    };
    if !refreshd.is_file() {
        bail!(
            "{} not found: build it first (`cargo build --release`), or pass --refreshd",
            refreshd.display()
        );
    }
    std::fs::create_dir_all(&cli.dir)?;
    let db = cli.dir.join(format!("bench-{}.db", cli.accounts));
    let clk_tck = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0);
    let mut b = Bench {
        cli,
        refreshd,
        db,
        rows: Vec::new(),
        details: Default::default(),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?,
        limit_rate: None,
        clk_tck,
    };
    let started = time::OffsetDateTime::now_utc();
    let load_before = loadavg();
    let scenarios: Vec<Scenario> = match b.cli.scenario {
        Scenario::All => vec![
            Scenario::Seed,
            Scenario::Startup,
            Scenario::Limit,
            Scenario::Burst,
            Scenario::Steady,
            Scenario::Sweep,
        ],
        s => vec![s],
    };
    if !scenarios.contains(&Scenario::Seed) {
        b.ensure_seeded().await?;
    }
    for s in scenarios {
        eprintln!("== {s:?} ({} accounts)", b.cli.accounts);
        match s {
            Scenario::Seed => b.seed().await?,
            Scenario::Startup => b.startup().await?,
            Scenario::Limit => b.limit().await?,
            Scenario::Burst => b.burst().await?,
            Scenario::Steady => b.steady().await?,
            Scenario::Sweep => b.sweep().await?,
            Scenario::All => unreachable!(),
        }
    }
    let table = b.table();
    writeln!(out, "{table}")?;
    let doc = json!({
        "accounts": b.cli.accounts,
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
        "started_at": started.format(&time::format_description::well_known::Rfc3339)?,
        "machine": machine(),
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "rows": b.rows,
        "details": b.details,
    });
    if let Some(dir) = b.cli.json.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&b.cli.json, serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("cannot write {}", b.cli.json.display()))?;
    writeln!(out, "results: {}", b.cli.json.display())?;
    Ok(())
}

fn now() -> i64 {
    Clock::system().now()
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string())
        .and_then(|k| k.parse::<f64>().ok())
        .map(|k| (k / 1024.0 / 1024.0 * 10.0).round() / 10.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": model,
        "mem_gib": mem,
        "kernel": kernel,
    })
}

/// A port that was free a moment ago on loopback.
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// CPU seconds (user + system) a process has used, from /proc/PID/stat.
fn cpu_secs(pid: u32, clk_tck: f64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line: 11 and 12 after the state.
    (ticks(11) + ticks(12)) / clk_tck
}

/// (VmRSS, VmHWM) of a process in bytes, from /proc/PID/status.
fn rss(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            * 1024.0
    };
    (kb("VmRSS:"), kb("VmHWM:"))
}

/// Busy share of all CPUs between two readings of /proc/stat's first line.
#[derive(Clone, Copy)]
struct CpuTimes {
    busy: f64,
    total: f64,
}

fn cpu_times() -> CpuTimes {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: f64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    CpuTimes {
        busy: total - idle,
        total,
    }
}

/// Busy CPU seconds of the whole machine between two readings.
fn machine_cpu_secs(a: CpuTimes, b: CpuTimes, clk_tck: f64) -> f64 {
    (b.busy - a.busy) / clk_tck
}

fn busy_share(a: CpuTimes, b: CpuTimes) -> f64 {
    let t = b.total - a.total;
    if t <= 0.0 { 0.0 } else { (b.busy - a.busy) / t }
}

/// A child process stopped (SIGTERM, then SIGKILL after 60 s) when dropped.
struct Proc {
    child: Child,
    name: &'static str,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM and wait: the daemon drains and closes its store.
    fn stop(mut self) -> Result<()> {
        self.terminate()
    }

    fn terminate(&mut self) -> Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    eprintln!("   {} exited with {status}", self.name);
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child.kill()?;
        self.child.wait()?;
        bail!("{} did not stop within 60 s of SIGTERM", self.name)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.terminate();
    }
}

/// Sampled resource use of the daemon (and the sandbox) over a window.
#[derive(Default)]
struct Usage {
    daemon_cpu: f64,
    sandbox_cpu: f64,
    /// This program's own CPU seconds (it samples; it should stay near 0).
    bench_cpu: f64,
    /// CPU seconds of every other process on the machine (other builds, ...).
    others_cpu: f64,
    machine_busy: f64,
    max_rss: f64,
    hwm: f64,
}

impl Bench {
    fn row(
        &mut self,
        scenario: &'static str,
        figure: &str,
        measured: f64,
        unit: &'static str,
        target: Option<(&str, bool)>,
    ) {
        self.rows.push(Row {
            scenario,
            figure: figure.to_string(),
            measured,
            unit,
            target: target.map(|(t, _)| t.to_string()),
            met: target.map(|(_, m)| m),
        });
    }

    fn table(&self) -> String {
        let mut t = format!(
            "refreshd-bench: {} accounts, {} build, refresh.concurrency {}, {} CPUs ({}), load {}\n",
            self.cli.accounts,
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            self.cli.concurrency,
            machine()["nproc"],
            machine()["cpu_model"].as_str().unwrap_or("?"),
            loadavg(),
        );
        t.push_str(&format!(
            "{:<9} {:<44} {:>14}  {:<20} {}\n",
            "scenario", "figure", "measured", "target", "met?"
        ));
        for r in &self.rows {
            let v = if r.measured.abs() >= 1000.0 || r.measured == r.measured.trunc() {
                format!("{:.0} {}", r.measured, r.unit)
            } else if r.measured.abs() >= 10.0 {
                format!("{:.1} {}", r.measured, r.unit)
            } else {
                format!("{:.3} {}", r.measured, r.unit)
            };
            let met = match r.met {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "",
            };
            let line = format!(
                "{:<9} {:<44} {:>14}  {:<20} {}",
                r.scenario,
                r.figure,
                v,
                r.target.as_deref().unwrap_or(""),
                met
            );
            t.push_str(line.trim_end());
            t.push('\n');
        }
        t
    }

    fn store_options(&self) -> StoreOptions {
        StoreOptions {
            path: self.db.clone(),
            busy_timeout: Duration::from_secs(5),
            keyring: Default::default(),
            postgres: self.cli.postgres.as_ref().map(|url| PgOptions {
                url: SecretString::from(url.clone()),
                pool_size: 8,
            }),
        }
    }

    /// The daemon's config: defaults, except a rate limit the sandbox never reaches, the ops
    /// server for readiness and metrics, and JSON logs (to a file).
    fn config_toml(&self, sandbox_port: u16, ops_port: u16, sweep_cron: &str) -> String {
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
            url = match &self.cli.postgres {
                Some(u) => format!("url = {u:?}"),
                None => String::new(),
            },
            concurrency = self.cli.concurrency,
        )
    }

    fn write_config(&self, name: &str, toml: &str) -> Result<PathBuf> {
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

    async fn spawn_sandbox(&self, port: u16) -> Result<Proc> {
        let child = Command::new(&self.refreshd)
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

    async fn sandbox_stats(&self, port: u16) -> Result<Value> {
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
    async fn spawn_daemon(&self, config: &Path, ops_port: u16, log: &str) -> Result<(Proc, f64)> {
        let log = std::fs::File::create(self.cli.dir.join(log))?;
        let t = Instant::now();
        let child = Command::new(&self.refreshd)
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

    fn open_rw(&self) -> Result<Db> {
        if self.cli.postgres.is_some() {
            return self.open_ro();
        }
        let c = Connection::open(&self.db)?;
        c.busy_timeout(Duration::from_secs(30))?;
        Ok(Db::Sqlite(c))
    }

    /// A connection the benchmark only reads with while the daemon runs (WAL: it never
    /// blocks the daemon's writes). Not opened read-only: SQLite cannot open a WAL database
    /// read-only while its -shm file does not exist.
    fn open_ro(&self) -> Result<Db> {
        if let Some(url) = &self.cli.postgres {
            let (client, conn) = tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current()
                    .block_on(tokio_postgres::connect(url, tokio_postgres::NoTls))
            })
            .map_err(|e| anyhow::anyhow!("{}", refreshd::store::postgres::describe_error(&e)))?;
            tokio::spawn(conn);
            return Ok(Db::Postgres(client));
        }
        let c = Connection::open_with_flags(
            &self.db,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        c.busy_timeout(Duration::from_secs(30))?;
        Ok(Db::Sqlite(c))
    }

    async fn ensure_seeded(&mut self) -> Result<()> {
        let n = if self.db.exists() || self.cli.postgres.is_some() {
            self.open_ro()?
                .int("SELECT COUNT(*) FROM accounts")
                .unwrap_or(0)
        } else {
            0
        };
        if n != self.cli.accounts as i64 {
            eprintln!(
                "   no store with {} accounts yet: seeding",
                self.cli.accounts
            );
            self.seed().await?;
        }
        Ok(())
    }

    /// seed: N accounts through the store's import path (`Store::upsert`, the code `accounts
    /// import` runs), SEED_BATCH per transaction, durable commits.
    async fn seed(&mut self) -> Result<()> {
        for suffix in ["", "-wal", "-shm", ".recovery"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.db.display()));
        }
        // Recovery files of earlier runs' processes would be replayed into the new store.
        for p in refreshd::store::pending_recovery_files(&self.db) {
            let _ = std::fs::remove_file(p);
        }
        if self.cli.postgres.is_some() {
            self.open_rw()?.exec(
                "DROP TABLE IF EXISTS accounts, refresh_log, connect_states, refreshd_schema",
            )?;
        }
        let n = self.cli.accounts;
        let store = Store::open(self.store_options()).await?;
        let t = Instant::now();
        let at = now();
        let mut i = 0;
        while i < n {
            let end = (i + SEED_BATCH).min(n);
            let batch: Vec<NewAccount> = (i..end).map(|k| new_account(k, at)).collect();
            store.upsert(batch, at).await?;
            i = end;
        }
        let secs = t.elapsed().as_secs_f64();
        if !store.is_postgres() {
            store
                .call(|c| {
                    c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                        .map_err(|source| refreshd::store::StoreError::Sqlite {
                            context: "checkpoint",
                            source,
                        })
                })
                .await?;
        }
        store.close().await;
        let size = match self.cli.postgres {
            Some(_) => self.open_ro()?.int(
                "SELECT pg_total_relation_size('accounts') + pg_total_relation_size('refresh_log')",
            )? as f64,
            None => std::fs::metadata(&self.db)?.len() as f64,
        };
        self.row("seed", "time", secs, "s", None);
        self.row("seed", "accounts per second", n as f64 / secs, "/s", None);
        self.row("seed", "database size", size / MIB, "MiB", None);
        self.details.insert(
            "seed".into(),
            json!({"secs": secs, "accounts": n, "batch": SEED_BATCH, "db_bytes": size,
                   "path": "Store::upsert (the import path), one transaction per batch"}),
        );
        Ok(())
    }

    /// Puts every account back to a fresh state (active, unleased, the refresh token the
    /// sandbox adopts) with `next_refresh_at` from `due` (an SQL expression over `id`), and
    /// `refresh_expires_at` from `refresh_end`; then folds the WAL into the database so the
    /// daemon starts on a clean file.
    fn prepare(&self, due: &str, refresh_end: &str) -> Result<f64> {
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

    fn log_max_id(c: &Db) -> Result<i64> {
        c.int("SELECT COALESCE(MAX(id), 0) FROM refresh_log")
    }

    fn count_rotated(c: &Db, after: i64) -> Result<i64> {
        c.int(&format!(
            "SELECT COUNT(*) FROM refresh_log WHERE id > {after} AND outcome = 'rotated'"
        ))
    }

    /// startup: `refreshd run` on the seeded store, nothing due, until /readyz says ready.
    async fn startup(&mut self) -> Result<()> {
        let at = now();
        self.prepare(
            &format!("{} + id % 3600", at + DAY),
            &format!("{} + 180 * 86400", now()),
        )?;
        let ops = free_port()?;
        let config = self.write_config(
            "startup.toml",
            &self.config_toml(free_port()?, ops, "0 */15 * * * *"),
        )?;
        let mut times = Vec::new();
        let mut rss_ready = Vec::new();
        for i in 0..self.cli.startups.max(1) {
            let (p, secs) = self
                .spawn_daemon(&config, ops, &format!("startup-{i}.log"))
                .await?;
            let (r, hwm) = rss(p.pid());
            eprintln!(
                "   start-up {i}: ready in {secs:.3} s, RSS {:.1} MiB",
                r / MIB
            );
            times.push(secs);
            rss_ready.push(hwm.max(r));
            p.stop()?;
        }
        let mut sorted = times.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        let rss_max = rss_ready.iter().copied().fold(0.0, f64::max);
        self.row(
            "startup",
            "spawn to ready (median)",
            median,
            "s",
            Some(("<= 0.5 s at 1M", median <= 0.5)),
        );
        self.row(
            "startup",
            "peak RSS at ready",
            rss_max / MIB,
            "MiB",
            Some(("<= 64 MiB", rss_max <= 64.0 * MIB)),
        );
        self.details.insert(
            "startup".into(),
            json!({"ready_secs": times, "peak_rss_bytes": rss_ready,
                   "note": "process start with the database in the OS page cache (warm)"}),
        );
        Ok(())
    }

    /// limit: the engine's refresh requests (the same provider, HTTP client settings and
    /// concurrency, built from the same config) against a fresh sandbox, with no store.
    async fn limit(&mut self) -> Result<()> {
        let port = free_port()?;
        let sandbox = self.spawn_sandbox(port).await?;
        let config = Config::from_toml_str(&self.config_toml(port, 0, "0 */15 * * * *"))?;
        let concurrency = config.refresh.concurrency;
        let providers = Providers::from_config(&config)?;
        let provider = providers.get("tiktok").context("tiktok provider")?.clone();
        let next = Arc::new(AtomicU64::new(0));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for _ in 0..concurrency {
            let (provider, next, ok, failed, stop) = (
                provider.clone(),
                next.clone(),
                ok.clone(),
                failed.clone(),
                stop.clone(),
            );
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let _slot = provider.slot().await;
                    provider.ready().await;
                    let token = SecretString::from(format!("{ADOPT_PREFIX}limit-{k}"));
                    match provider.refresh(&token, now()).await {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }));
        }
        let me = std::process::id();
        // Warm-up: connections opened, caches filled.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (ok0, cpu0, sb0, m0, t0) = (
            ok.load(Ordering::Relaxed),
            cpu_secs(me, self.clk_tck),
            cpu_secs(sandbox.pid(), self.clk_tck),
            cpu_times(),
            Instant::now(),
        );
        tokio::time::sleep(self.cli.window).await;
        let (ok1, cpu1, sb1, m1, secs) = (
            ok.load(Ordering::Relaxed),
            cpu_secs(me, self.clk_tck),
            cpu_secs(sandbox.pid(), self.clk_tck),
            cpu_times(),
            t0.elapsed().as_secs_f64(),
        );
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
        let stats = self.sandbox_stats(port).await?;
        sandbox.stop()?;
        let done = (ok1 - ok0) as f64;
        let rate = done / secs;
        self.limit_rate = Some(rate);
        self.row("limit", "refreshes per second (no store)", rate, "/s", None);
        self.row(
            "limit",
            "client CPU s per 1,000 refreshes",
            (cpu1 - cpu0) / done * 1000.0,
            "s",
            None,
        );
        self.row(
            "limit",
            "sandbox CPU s per 1,000 refreshes",
            (sb1 - sb0) / done * 1000.0,
            "s",
            None,
        );
        self.row(
            "limit",
            "machine CPU busy",
            busy_share(m0, m1) * 100.0,
            "%",
            None,
        );
        let others =
            (machine_cpu_secs(m0, m1, self.clk_tck) - (cpu1 - cpu0) - (sb1 - sb0)).max(0.0);
        self.row(
            "limit",
            "other processes' CPU (cores)",
            others / secs,
            "cores",
            None,
        );
        self.details.insert(
            "limit".into(),
            json!({"window_secs": secs, "refreshed": done, "failed": failed.load(Ordering::Relaxed),
                   "concurrency": concurrency, "client_cpu_secs": cpu1 - cpu0,
                   "sandbox_cpu_secs": sb1 - sb0, "machine_busy": busy_share(m0, m1),
                   "others_cpu_secs": others,
                   "sandbox": stats}),
        );
        Ok(())
    }

    /// Samples the daemon and the sandbox every 200 ms until `until` says stop.
    async fn watch(
        &self,
        daemon: &Proc,
        sandbox: &Proc,
        mut until: impl FnMut(f64) -> Result<bool>,
    ) -> Result<(Usage, f64)> {
        let me = std::process::id();
        let (d0, s0, b0, m0, t0) = (
            cpu_secs(daemon.pid(), self.clk_tck),
            cpu_secs(sandbox.pid(), self.clk_tck),
            cpu_secs(me, self.clk_tck),
            cpu_times(),
            Instant::now(),
        );
        let mut u = Usage::default();
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let (r, hwm) = rss(daemon.pid());
            u.max_rss = u.max_rss.max(r);
            u.hwm = u.hwm.max(hwm);
            if until(t0.elapsed().as_secs_f64())? {
                break;
            }
        }
        u.daemon_cpu = cpu_secs(daemon.pid(), self.clk_tck) - d0;
        u.sandbox_cpu = cpu_secs(sandbox.pid(), self.clk_tck) - s0;
        u.bench_cpu = cpu_secs(me, self.clk_tck) - b0;
        let m1 = cpu_times();
        u.machine_busy = busy_share(m0, m1);
        let secs = t0.elapsed().as_secs_f64();
        u.others_cpu =
            (machine_cpu_secs(m0, m1, self.clk_tck) - u.daemon_cpu - u.sandbox_cpu - u.bench_cpu)
                .max(0.0);
        Ok((u, secs))
    }

    /// burst: every account due now; committed rotations per second over the window.
    async fn burst(&mut self) -> Result<()> {
        let at = now();
        let prep = self.prepare(&format!("{}", at - 60), &format!("{} + 180 * 86400", now()))?;
        eprintln!("   prepared in {prep:.1} s");
        let ro = self.open_ro()?;
        let base = Self::log_max_id(&ro)?;
        let (sb_port, ops) = (free_port()?, free_port()?);
        let sandbox = self.spawn_sandbox(sb_port).await?;
        let config = self.write_config(
            "burst.toml",
            &self.config_toml(sb_port, ops, "0 */15 * * * *"),
        )?;
        let (daemon, ready) = self.spawn_daemon(&config, ops, "burst.log").await?;
        let n = self.cli.accounts as i64;
        // Warm-up after ready, unless the whole burst is over by then (small stores).
        let warm = Instant::now();
        while warm.elapsed() < Duration::from_secs(2) && Self::log_max_id(&ro)? - base < n / 2 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let start_rotated = Self::count_rotated(&ro, base)?;
        let window = self.cli.window.as_secs_f64();
        let mut last = (Self::log_max_id(&ro)?, 0.0);
        let (usage, secs) = self
            .watch(&daemon, &sandbox, |t| {
                let m = Self::log_max_id(&ro)?;
                if m != last.0 {
                    last = (m, t);
                }
                // Over when the window ends, or when nothing moved for a second (done).
                Ok(t >= window || t - last.1 > 1.0)
            })
            .await?;
        let end_rotated = Self::count_rotated(&ro, base)?;
        let watched = secs;
        // A burst that ended early is measured up to its last commit.
        let secs = if secs >= window {
            secs
        } else {
            last.1.max(0.2)
        };
        let stats = self.sandbox_stats(sb_port).await?;
        let (_, hwm) = rss(daemon.pid());
        daemon.stop()?;
        sandbox.stop()?;
        let outcomes: Vec<(String, i64)> = ro.outcomes_after(base)?;
        let done = (end_rotated - start_rotated) as f64;
        let rate = done / secs;
        let peak = usage.hwm.max(hwm);
        self.row(
            "burst",
            "committed refreshes per second",
            rate,
            "/s",
            Some((">= 10,000/s", rate >= 10_000.0)),
        );
        if let Some(limit) = self.limit_rate {
            let ratio = rate / limit;
            self.row(
                "burst",
                "ratio to limit",
                ratio,
                "x",
                Some((">= 0.7", ratio >= 0.7)),
            );
        }
        self.row(
            "burst",
            "daemon CPU s per 1,000 refreshes",
            usage.daemon_cpu / done * 1000.0,
            "s",
            None,
        );
        self.row(
            "burst",
            "sandbox CPU s per 1,000 refreshes",
            usage.sandbox_cpu / done * 1000.0,
            "s",
            None,
        );
        self.row(
            "burst",
            "machine CPU busy",
            usage.machine_busy * 100.0,
            "%",
            None,
        );
        self.row(
            "burst",
            "other processes' CPU (cores)",
            usage.others_cpu / watched,
            "cores",
            None,
        );
        self.row(
            "burst",
            "peak RSS",
            peak / MIB,
            "MiB",
            Some(("<= 64 MiB", peak <= 64.0 * MIB)),
        );
        self.details.insert(
            "burst".into(),
            json!({"window_secs": secs, "committed_in_window": done, "ready_secs": ready,
                   "prepare_secs": prep, "daemon_cpu_secs": usage.daemon_cpu,
                   "sandbox_cpu_secs": usage.sandbox_cpu, "machine_busy": usage.machine_busy,
                   "bench_cpu_secs": usage.bench_cpu, "others_cpu_secs": usage.others_cpu,
                   "concurrency": self.cli.concurrency,
                   "max_rss_sampled_bytes": usage.max_rss, "vm_hwm_bytes": peak,
                   "log_outcomes_since_start": outcomes, "sandbox": stats}),
        );
        Ok(())
    }

    /// steady: due times spread so STEADY_RATE accounts are due each second; lateness from
    /// the daemon's histogram and from the database; the reauth sweep runs every 10 s
    /// meanwhile and flags accounts as their refresh tokens enter the window.
    async fn steady(&mut self) -> Result<()> {
        let n = self.cli.accounts as i64;
        let window = (self.cli.steady_window.as_secs() as i64).min(n / STEADY_RATE);
        // Time to prepare the store and start the daemon before the first account is due.
        let mut lead_in = if n > 100_000 { 8 } else { 3 };
        let mut attempts = 0;
        let (t0, prep) = loop {
            let t0 = now() + lead_in;
            let prep = self.prepare(
                &format!("{t0} + (id - 1) / {STEADY_RATE}"),
                &format!(
                    "CASE WHEN id % 100 = 50 THEN {} + (id / 100) % {} ELSE {} END",
                    t0 + WINDOW,
                    window.max(1),
                    now() + 180 * DAY
                ),
            )?;
            // The daemon needs a moment to start before the first account is due; when
            // preparing ate the lead-in, plan again with a longer one.
            if now() + 2 <= t0 {
                break (t0, prep);
            }
            attempts += 1;
            if attempts == 3 {
                bail!(
                    "preparing the store takes longer than {lead_in} s each time; nothing measured"
                );
            }
            lead_in = prep.ceil() as i64 + 4;
        };
        let (sb_port, ops) = (free_port()?, free_port()?);
        let sandbox = self.spawn_sandbox(sb_port).await?;
        let config = self.write_config(
            "steady.toml",
            &self.config_toml(sb_port, ops, "*/10 * * * * *"),
        )?;
        let (daemon, _) = self.spawn_daemon(&config, ops, "steady.log").await?;
        // Measure from the first due second to the end of the window.
        let wait = (t0 * 1000 - Clock::system().now_millis()).max(0) as u64;
        tokio::time::sleep(Duration::from_millis(wait)).await;
        let end = t0 + window;
        let (usage, secs) = self
            .watch(&daemon, &sandbox, |_| Ok(now() >= end + 2))
            .await?;
        let metrics = self
            .http
            .get(format!("http://127.0.0.1:{ops}/metrics"))
            .send()
            .await?
            .text()
            .await?;
        let stats = self.sandbox_stats(sb_port).await?;
        daemon.stop()?;
        sandbox.stop()?;
        let hist = lateness_histogram(&metrics);
        let (p50, p99) = (quantile(&hist, 0.5), quantile(&hist, 0.99));
        let ro = self.open_ro()?;
        let planned = format!("({t0} + (id - 1) / {STEADY_RATE})");
        let got = ro.ints(&format!(
            "SELECT COUNT(*), MAX(last_refreshed_at - {planned}) FROM accounts
             WHERE last_refreshed_at IS NOT NULL AND {planned} < {end}"
        ))?;
        let (refreshed, max_late) = (got[0].unwrap_or(0), got[1]);
        let missed = ro.int(&format!(
            "SELECT COUNT(*) FROM accounts WHERE {planned} < {end} AND last_refreshed_at IS NULL"
        ))?;
        let expected = (window * STEADY_RATE).min(n);
        let log = std::fs::read_to_string(self.cli.dir.join("steady.log")).unwrap_or_default();
        let sweeps = log.matches("\"event\":\"reauth_sweep\"").count();
        let flagged = log.matches("\"reason\":\"refresh_token_expiring\"").count();
        let cpu_pct = usage.daemon_cpu / secs * 100.0;
        self.row(
            "steady",
            "lateness p50 (at most: histogram bucket)",
            p50,
            "s",
            None,
        );
        self.row(
            "steady",
            "lateness p99 (at most: histogram bucket)",
            p99,
            "s",
            Some(("<= 1 s", p99 <= 1.0)),
        );
        self.row(
            "steady",
            "lateness max (database, whole seconds)",
            max_late.unwrap_or(0) as f64,
            "s",
            None,
        );
        self.row(
            "steady",
            "refreshed / due in window",
            refreshed as f64 / expected.max(1) as f64,
            "x",
            Some(("all, none missed", missed == 0)),
        );
        self.row("steady", "daemon CPU", cpu_pct, "% of 1 CPU", None);
        self.row(
            "steady",
            "peak RSS",
            usage.hwm / MIB,
            "MiB",
            Some(("<= 64 MiB", usage.hwm <= 64.0 * MIB)),
        );
        self.details.insert(
            "steady".into(),
            json!({"window_secs": window, "measured_secs": secs, "rate_due_per_sec": STEADY_RATE,
                   "prepare_secs": prep,
                   "refreshed": refreshed, "expected": expected, "missed": missed,
                   "lateness_histogram": hist, "p50": p50, "p99": p99,
                   "max_lateness_db_secs": max_late, "daemon_cpu_secs": usage.daemon_cpu,
                   "sandbox_cpu_secs": usage.sandbox_cpu, "machine_busy": usage.machine_busy,
                   "others_cpu_secs": usage.others_cpu,
                   "vm_hwm_bytes": usage.hwm, "max_rss_sampled_bytes": usage.max_rss,
                   "sweeps_during_window": sweeps, "accounts_flagged_by_sweeps": flagged,
                   "sandbox": stats}),
        );
        Ok(())
    }

    /// sweep: the daemon's reauth sweep (`jobs::sweep`, as the cron job runs it) over the
    /// whole store, with 1% of the accounts entering the window and 0.1% expired.
    async fn sweep(&mut self) -> Result<()> {
        let at = now();
        self.prepare(
            &format!("{} + id % 3600", at + DAY),
            &format!(
                "CASE WHEN id % 1000 = 7 THEN {} WHEN id % 100 = 3 THEN {} ELSE {} END",
                at - 10,
                at + 3 * DAY,
                at + 180 * DAY
            ),
        )?;
        let store = Store::open(self.store_options()).await?;
        let config = Config::from_toml_str(&self.config_toml(1, 0, "0 */15 * * * *"))?;
        let events = refreshd::events::Events::default();
        let clock = Clock::system();
        let wal = PathBuf::from(format!("{}-wal", self.db.display()));
        let wal_size = || std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
        let wal_before = wal_size();
        let t = Instant::now();
        let report = refreshd::jobs::sweep(&store, &clock, &config, &events).await?;
        let first = t.elapsed().as_secs_f64();
        // The WAL is empty after `prepare`: what it holds now is what the sweep wrote.
        let wal_written = wal_size().saturating_sub(wal_before);
        let t = Instant::now();
        let again = refreshd::jobs::sweep(&store, &clock, &config, &events).await?;
        let second = t.elapsed().as_secs_f64();
        store.close().await;
        let changed = report.expiring.len() + report.expired.len();
        self.row(
            "sweep",
            &format!("sweep flagging {changed} accounts"),
            first,
            "s",
            Some(("<= 2 s", first <= 2.0)),
        );
        self.row("sweep", "sweep with nothing new", second, "s", None);
        if self.cli.postgres.is_none() {
            self.row(
                "sweep",
                "WAL written by that sweep",
                wal_written as f64 / MIB,
                "MiB",
                None,
            );
        }
        self.details.insert(
            "sweep".into(),
            json!({"first_secs": first, "expiring": report.expiring.len(), "wal_bytes_written": wal_written,
                   "expired": report.expired.len(), "second_secs": second,
                   "second_changed": again.expiring.len() + again.expired.len(),
                   "note": "the store's single writer is busy for this long; steady runs the sweep every 10 s and reports lateness with it"}),
        );
        Ok(())
    }
}

fn new_account(k: usize, at: i64) -> NewAccount {
    let subject = format!("bench-{k:07}");
    NewAccount {
        provider: "tiktok".into(),
        tokens: TokenSet {
            access_token: SecretString::from(format!("act.{subject}")),
            refresh_token: Some(SecretString::from(format!("{ADOPT_PREFIX}{subject}"))),
            expires_in: 7200,
            refresh_expires_in: Some(180 * DAY),
            subject: Some(subject.clone()),
            scope: Some("user.info.basic".into()),
            token_type: "Bearer".into(),
        },
        subject,
        label: None,
        obtained_at: at,
        next_refresh_at: at + DAY + (k as i64 % 3600),
        status: Status::Active,
        reauth_reason: None,
    }
}

/// The cumulative buckets of `refreshd_schedule_lateness_seconds`: (upper bound, count).
fn lateness_histogram(metrics: &str) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("refreshd_schedule_lateness_seconds_bucket{le=\"")
        else {
            continue;
        };
        let Some((le, count)) = rest.split_once("\"}") else {
            continue;
        };
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap_or(f64::NAN)
        };
        let count = count.trim().parse().unwrap_or(0.0);
        out.push((le, count));
    }
    out
}

/// The upper bound of the bucket holding quantile `q`: the histogram cannot say more
/// (interpolating inside a bucket would invent precision). Infinite past the last bound.
fn quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let total = buckets.last().map(|b| b.1).unwrap_or(0.0);
    if total == 0.0 {
        return 0.0;
    }
    let rank = q * total;
    buckets
        .iter()
        .find(|&&(_, count)| count >= rank)
        .map(|&(le, _)| le)
        .unwrap_or(f64::INFINITY)
}
