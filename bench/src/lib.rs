//! refreshd-bench: measures refreshd at scale (issues 8 and 15) and prints each figure next
//! to its target. See BENCHMARKS.md.
//!
//! The store is filled through `refreshd accounts import` and prepared with plain SQL; the
//! provider is the sandbox run as its own process (`refreshd sandbox --adopt`), and the
//! daemon is the real `refreshd run` in its own process, so the two share the machine's CPUs
//! as they would in production and their CPU time and memory are read apart from /proc.
//! Nothing here is estimated: every figure is read from the processes, the database or the
//! daemon's /metrics.
//!
//! Modules by role:
//! - `harness`: [`harness::Bench`], the processes and configs it starts, the store it prepares.
//! - `scenarios/`: one file per scenario group (store, throughput, schedule, postgres).
//! - `db`: the benchmark's own connection to the store (SQLite or PostgreSQL).
//! - `procs`: processes and the machine read from /proc (CPU, RSS, load).
//! - `histogram`: the daemon's lateness histogram and its quantiles.
//! - `report`: the rows, the target table, the JSON.
//! - `plots`: the SVG plots.
//!
//! `all` runs: seed, startup, rounds (limit and burst interleaved), concurrency, steady,
//! realistic, sweep, postgres; then prints the table and draws the plots.

mod db;
mod harness;
mod histogram;
mod plots;
mod procs;
mod report;
mod scaled;
mod scenarios;

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use harness::Bench;
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// `refreshd accounts import` of --accounts generated lines into a new store.
    Seed,
    /// Spawn to ready, at each --scale size up to --accounts.
    Startup,
    /// The bare refresh requests, no store.
    Limit,
    /// Every account due at once.
    Burst,
    /// limit, burst, limit, burst, ... (--rounds of each).
    Rounds,
    /// A limit and a burst at each of --concurrencies.
    Concurrency,
    /// 300 due per second; lateness.
    Steady,
    /// 2-hour tokens spread evenly; daemon CPU.
    Realistic,
    /// The reauth sweep over the whole store.
    Sweep,
    /// Import and burst on PostgreSQL.
    Postgres,
    All,
}

/// Benchmarks refreshd: prints a table (figure, measured, target, met?), writes JSON and
/// SVG plots.
#[derive(Parser)]
#[command(name = "refreshd-bench")]
pub(crate) struct Cli {
    scenario: Scenario,
    /// Accounts in the store.
    #[arg(long, default_value_t = 1_000_000)]
    accounts: usize,
    /// Where the results go as JSON.
    #[arg(long, default_value = "target/refreshd-bench.json")]
    json: PathBuf,
    /// Where the plots go (SVG).
    #[arg(long, default_value = "target/bench/plots")]
    plots: PathBuf,
    /// Directory of the benchmark's database and generated import files (kept, so a seed is
    /// reused by later runs).
    #[arg(long, default_value = "target/bench")]
    dir: PathBuf,
    /// The refreshd binary (default: the one next to this program).
    #[arg(long, env = "REFRESHD_BIN")]
    refreshd: Option<PathBuf>,
    /// How long burst and limit measure.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "20s")]
    window: Duration,
    /// Limit and burst runs of `rounds`, interleaved (the medians are reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// refresh.concurrency values of `concurrency`.
    #[arg(long, value_delimiter = ',', default_value = "16,32,64,128,256")]
    concurrencies: Vec<usize>,
    /// How long each limit and burst of `concurrency` measures.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    sweep_window: Duration,
    /// How long steady measures (at most the spread of the due times: accounts / 300 s).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    steady_window: Duration,
    /// How long realistic measures.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    realistic_window: Duration,
    /// Start-ups measured at each size (the median is reported).
    #[arg(long, default_value_t = 3)]
    startups: usize,
    /// Store sizes startup also measures, below --accounts (SQLite; seeded once, kept).
    #[arg(long, value_delimiter = ',', default_value = "10000,100000,1000000")]
    scale: Vec<usize>,
    /// refresh.concurrency of the daemon, and the requests in flight in limit. The daemon's
    /// default (32) suits real providers' rate limits; a burst needs a deeper pipeline.
    #[arg(long, default_value_t = 128)]
    concurrency: usize,
    /// A PostgreSQL server the benchmark may fill (it drops and creates the schema
    /// `refreshd_bench` there). `all` and `postgres` run their PostgreSQL rows on it (without
    /// it: a throwaway cluster from the installed binaries); other scenarios run on it
    /// instead of SQLite.
    #[arg(long, value_name = "URL")]
    postgres: Option<String>,
    /// No PostgreSQL rows (they print NOT RUN).
    #[arg(long, conflicts_with = "postgres")]
    no_postgres: bool,
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
    let least = scenarios::STEADY_RATE as usize;
    if cli.accounts < least {
        bail!("--accounts must be at least {least}");
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
    let mut b = Bench::new(cli, refreshd)?;
    let started = time::OffsetDateTime::now_utc();
    let load_before = procs::loadavg();
    let scenarios: Vec<Scenario> = match b.cli.scenario {
        Scenario::All => vec![
            Scenario::Seed,
            Scenario::Startup,
            Scenario::Rounds,
            Scenario::Concurrency,
            Scenario::Steady,
            Scenario::Realistic,
            Scenario::Sweep,
            Scenario::Postgres,
        ],
        s => vec![s],
    };
    // A single scenario given --postgres runs on it instead of SQLite.
    if !matches!(b.cli.scenario, Scenario::All | Scenario::Postgres)
        && let Some(url) = &b.cli.postgres
    {
        b.pg = Some(Bench::pg_schema(url)?);
    }
    if !scenarios.contains(&Scenario::Seed) && scenarios != [Scenario::Postgres] {
        b.ensure_seeded().await?;
    }
    for s in scenarios {
        eprintln!("== {s:?} ({} accounts)", b.cli.accounts);
        match s {
            Scenario::Seed => b.seed().await?,
            Scenario::Startup => b.startup().await?,
            Scenario::Limit => b.limit().await?,
            Scenario::Burst => b.burst().await?,
            Scenario::Rounds => b.rounds().await?,
            Scenario::Concurrency => b.concurrency().await?,
            Scenario::Steady => b.steady().await?,
            Scenario::Realistic => b.realistic().await?,
            Scenario::Sweep => b.sweep().await?,
            Scenario::Postgres => b.postgres().await?,
            Scenario::All => unreachable!(),
        }
    }
    let build = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let machine = procs::machine();
    let heading = format!(
        "refreshd-bench: {} accounts, {build} build, refresh.concurrency {}, {} CPUs ({}), load {}",
        b.cli.accounts,
        b.cli.concurrency,
        machine["nproc"],
        machine["cpu_model"].as_str().unwrap_or("?"),
        procs::loadavg(),
    );
    let limit = b.limit_rate;
    b.report.scale_to(limit);
    writeln!(out, "{}", b.report.table(&heading))?;
    let label = format!(
        "refreshd-bench {}, {} accounts, {build} build, {} CPUs, load before {}, {}",
        format!("{:?}", b.cli.scenario).to_lowercase(),
        b.cli.accounts,
        machine["nproc"],
        load_before,
        started.format(&time::format_description::well_known::Rfc3339)?,
    );
    let plots = b.plots.write(&b.cli.plots, &label)?;
    let doc = json!({
        "accounts": b.cli.accounts,
        "build": build,
        "started_at": started.format(&time::format_description::well_known::Rfc3339)?,
        "machine": machine,
        "loadavg_before": load_before,
        "loadavg_after": procs::loadavg(),
        "rows": b.report.rows,
        "details": b.report.details,
        "plots": plots,
    });
    if let Some(dir) = b.cli.json.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&b.cli.json, serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("cannot write {}", b.cli.json.display()))?;
    writeln!(out, "results: {}", b.cli.json.display())?;
    for p in plots {
        writeln!(out, "plot: {}", p.display())?;
    }
    Ok(())
}
