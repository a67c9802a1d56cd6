//! Scenarios about the store at rest: seed (the import path, measured), startup at each
//! store size, and the reauth sweep over the whole store.

use crate::harness::Bench;
use crate::plots::ScalePoint;
use crate::procs::{self, Finished, MIB};
use crate::report::{Scale, median, thousands};
use anyhow::{Result, bail};
use refreshd::clock::Clock;
use refreshd::config::Config;
use refreshd::sandbox::ADOPT_PREFIX;
use refreshd::store::Store;
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Instant;

const DAY: i64 = 86_400;
/// The import target of issue 15 (accounts per second) on SQLite and on PostgreSQL.
const IMPORT_TARGET_SQLITE: f64 = 150_000.0;
const IMPORT_TARGET_POSTGRES: f64 = 50_000.0;

impl Bench {
    /// The JSON-lines file of `n` accounts in the import format, generated once and kept in
    /// --dir: refresh tokens the sandbox adopts, 2-hour access tokens.
    fn accounts_file(&self, n: usize) -> Result<PathBuf> {
        let path = self.cli.dir.join(format!("accounts-{n}.jsonl"));
        if path.is_file() {
            return Ok(path);
        }
        let part = self.cli.dir.join(format!("accounts-{n}.jsonl.part"));
        let mut w = std::io::BufWriter::new(std::fs::File::create(&part)?);
        for k in 0..n {
            let subject = format!("bench-{k:07}");
            serde_json::to_writer(
                &mut w,
                &json!({"provider": "tiktok", "access_token": format!("act.{subject}"),
                        "expires_in": 7200, "refresh_token": format!("{ADOPT_PREFIX}{subject}"),
                        "refresh_expires_in": 180 * DAY, "open_id": subject,
                        "scope": "user.info.basic", "token_type": "Bearer"}),
            )?;
            w.write_all(b"\n")?;
        }
        w.into_inner()?.sync_all()?;
        std::fs::rename(&part, &path)?;
        Ok(path)
    }

    /// Imports `n` generated accounts into an empty store (the current backend) through
    /// `refreshd accounts import`, as a user would.
    async fn import_store(&self, n: usize) -> Result<Finished> {
        let file = self.accounts_file(n)?;
        if self.pg.is_none() {
            for suffix in ["", "-wal", "-shm", ".recovery"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", self.db.display()));
            }
            // Recovery files of earlier runs' processes would be replayed into the new store.
            for p in refreshd::store::pending_recovery_files(&self.db) {
                let _ = std::fs::remove_file(p);
            }
        }
        let config =
            self.write_config("import.toml", &self.config_toml(1, 0, "0 */15 * * * *", 1))?;
        let log_path = self.cli.dir.join("import.log");
        let done = procs::run_measured(
            self.refreshd_command()
                .arg("--config")
                .arg(&config)
                .args(["accounts", "import", "--json"])
                .arg(&file)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log_path)?),
        )?;
        if !done.success {
            bail!(
                "`refreshd accounts import {}` failed: see {}",
                file.display(),
                log_path.display()
            );
        }
        let count = self.open_ro()?.int("SELECT COUNT(*) FROM accounts")?;
        if count != n as i64 {
            bail!("the import of {n} accounts left {count} in the store");
        }
        Ok(done)
    }

    /// Seeds the store unless it already holds --accounts accounts.
    pub(crate) async fn ensure_seeded(&mut self) -> Result<()> {
        let n = if self.db.exists() || self.pg.is_some() {
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

    /// seed: --accounts accounts through `refreshd accounts import` of a generated JSON-lines
    /// file (one transaction, streamed, durable); its rate and peak memory are targets.
    pub(crate) async fn seed(&mut self) -> Result<()> {
        let n = self.cli.accounts;
        let done = self.import_store(n).await?;
        let size = match self.pg {
            Some(_) => self.open_ro()?.int(
                "SELECT pg_total_relation_size('accounts') + pg_total_relation_size('refresh_log')",
            )? as f64,
            None => std::fs::metadata(&self.db)?.len() as f64,
        };
        let rate = n as f64 / done.wall_secs;
        let (tag, target) = match self.pg {
            Some(_) => (self.tag("seed"), IMPORT_TARGET_POSTGRES),
            None => (self.tag("seed"), IMPORT_TARGET_SQLITE),
        };
        let r = &mut self.report;
        r.row(&tag, "accounts import: time", done.wall_secs, "s", None);
        let text = format!(">= {}/s", thousands(target));
        let figure = "accounts import: accounts per second";
        r.absolute_row(&tag, figure, rate, "/s", &text, target, Scale::Rate);
        r.row(
            &tag,
            "accounts import: peak RSS",
            done.max_rss / MIB,
            "MiB",
            Some(("<= 64 MiB at 1M lines", done.max_rss <= 64.0 * MIB)),
        );
        r.row(&tag, "database size", size / MIB, "MiB", None);
        r.details.insert(
            tag,
            json!({"secs": done.wall_secs, "accounts": n, "cpu_secs": done.cpu_secs,
                   "max_rss_bytes": done.max_rss, "db_bytes": size,
                   "path": "refreshd accounts import of a generated JSON-lines file"}),
        );
        let backend = if self.pg.is_some() {
            "PostgreSQL"
        } else {
            "SQLite"
        };
        self.plots.backend(backend).import_rate = Some(rate);
        Ok(())
    }

    /// Spawn-to-ready times (--startups of them) and the peak RSS at ready on the current
    /// store, nothing due.
    async fn startups(&self, label: &str) -> Result<(Vec<f64>, Vec<f64>)> {
        let at = Clock::system().now();
        self.prepare(
            &format!("{} + id % 3600", at + DAY),
            &format!("{} + 180 * 86400", at),
        )?;
        let ops = procs::free_port()?;
        let config = self.write_config(
            "startup.toml",
            &self.config_toml(procs::free_port()?, ops, "0 */15 * * * *", 32),
        )?;
        let (mut times, mut peaks) = (Vec::new(), Vec::new());
        for i in 0..self.cli.startups.max(1) {
            let (p, secs) = self
                .spawn_daemon(&config, ops, &format!("startup-{label}-{i}.log"))
                .await?;
            let (r, hwm) = procs::rss(p.pid());
            eprintln!(
                "   start-up {i} at {label}: ready in {secs:.3} s, RSS {:.1} MiB",
                r / MIB
            );
            times.push(secs);
            peaks.push(hwm.max(r));
            p.stop()?;
        }
        Ok((times, peaks))
    }

    /// startup: `refreshd run` until /readyz says ready, at each --scale size up to
    /// --accounts (SQLite; stores of the smaller sizes are seeded once and kept).
    pub(crate) async fn startup(&mut self) -> Result<()> {
        let n = self.cli.accounts;
        let mut sizes: Vec<usize> = match self.pg {
            Some(_) => Vec::new(),
            None => self.cli.scale.iter().copied().filter(|&s| s < n).collect(),
        };
        sizes.push(n);
        let main_db = self.db.clone();
        let mut points = Vec::new();
        for size in sizes {
            if size != n {
                self.db = self.cli.dir.join(format!("bench-{size}.db"));
                let have = match self.db.exists() {
                    true => self.open_ro()?.int("SELECT COUNT(*) FROM accounts")?,
                    false => 0,
                };
                if have != size as i64 {
                    self.import_store(size).await?;
                }
            }
            let got = self.startups(&size.to_string()).await;
            self.db = main_db.clone();
            let (times, peaks) = got?;
            points.push((size, times, peaks));
        }
        let tag = self.tag("startup");
        let mut details = Vec::new();
        for (size, times, peaks) in points {
            let ready = median(times.iter().copied());
            let peak = peaks.iter().copied().fold(0.0, f64::max);
            if size == n {
                self.report.row(
                    &tag,
                    "spawn to ready (median)",
                    ready,
                    "s",
                    Some(("<= 0.1 s at 1M", ready <= 0.1)),
                );
                self.report.row(
                    &tag,
                    "peak RSS at ready",
                    peak / MIB,
                    "MiB",
                    Some(("<= 32 MiB at 1M", peak <= 32.0 * MIB)),
                );
            } else {
                let figure = format!("spawn to ready at {} accounts", thousands(size as f64));
                self.report.row(&tag, &figure, ready, "s", None);
            }
            self.plots.scale.push(ScalePoint {
                accounts: size,
                ready_secs: ready,
                rss_mib: peak / MIB,
            });
            details.push(json!({"accounts": size, "ready_secs": times, "peak_rss_bytes": peaks}));
        }
        self.report.details.insert(
            tag,
            json!({"sizes": details,
                   "note": "process start with the database in the OS page cache (warm)"}),
        );
        Ok(())
    }

    /// sweep: the daemon's reauth sweep (`jobs::sweep`, as the cron job runs it) over the
    /// whole store, with 1% of the accounts entering the window and 0.1% expired.
    pub(crate) async fn sweep(&mut self) -> Result<()> {
        let at = Clock::system().now();
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
        let config = Config::from_toml_str(&self.config_toml(1, 0, "0 */15 * * * *", 32))?;
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
        let tag = self.tag("sweep");
        let r = &mut self.report;
        r.row(
            &tag,
            &format!("sweep flagging {changed} accounts"),
            first,
            "s",
            Some(("<= 2 s", first <= 2.0)),
        );
        r.row(&tag, "sweep with nothing new", second, "s", None);
        if self.pg.is_none() {
            r.row(
                &tag,
                "WAL written by that sweep",
                wal_written as f64 / MIB,
                "MiB",
                None,
            );
        }
        r.details.insert(
            tag,
            json!({"first_secs": first, "expiring": report.expiring.len(), "wal_bytes_written": wal_written,
                   "expired": report.expired.len(), "second_secs": second,
                   "second_changed": again.expiring.len() + again.expired.len(),
                   "note": "the store's single writer is busy for this long; steady runs the sweep every 10 s and reports lateness with it"}),
        );
        Ok(())
    }
}
