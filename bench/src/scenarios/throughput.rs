//! Throughput scenarios: limit (the engine's refresh requests with no store), burst (every
//! account due, committed rotations per second), both interleaved in rounds so they share
//! the machine's state, and both across refresh.concurrency values.

use crate::harness::Bench;
use crate::plots::ConcurrencyPoint;
use crate::procs::{self, CpuTimes, MIB};
use crate::report::{Scale, median};
use anyhow::{Context, Result};
use refreshd::clock::Clock;
use refreshd::config::Config;
use refreshd::provider::Providers;
use refreshd::sandbox::ADOPT_PREFIX;
use secrecy::SecretString;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The burst-to-limit ratio and daemon CPU per committed refresh of issue 15.
const RATIO_TARGET: f64 = 0.7;
const DAEMON_US_TARGET: f64 = 25.0;
/// The same target against the machine's own yardstick: the issue set 25 µs where the bare
/// client took 16.5 µs per refresh. A slower machine (or CPU share) moves both alike.
const DAEMON_TO_CLIENT_TARGET: f64 = 25.0 / 16.5;
/// PostgreSQL's burst target (committed refreshes per second).
const PG_BURST_TARGET: f64 = 15_000.0;

/// One limit measurement.
pub(crate) struct LimitRun {
    rate: f64,
    client_us: f64,
    sandbox_us: f64,
    others_cores: f64,
    details: Value,
}

/// One burst measurement.
pub(crate) struct BurstRun {
    rate: f64,
    daemon_us: f64,
    sandbox_us: f64,
    machine_busy: f64,
    others_cores: f64,
    peak_rss: f64,
    details: Value,
}

impl Bench {
    /// The engine's refresh requests (the same provider, HTTP client settings and
    /// concurrency, built from the same config) against a fresh sandbox, with no store.
    async fn limit_run(&self, concurrency: usize, window: Duration) -> Result<LimitRun> {
        let port = procs::free_port()?;
        let sandbox = self.spawn_sandbox(port).await?;
        let config =
            Config::from_toml_str(&self.config_toml(port, 0, "0 */15 * * * *", concurrency))?;
        let providers = Providers::from_config(&config)?;
        let provider = providers.get("tiktok").context("tiktok provider")?.clone();
        let next = Arc::new(AtomicU64::new(0));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for _ in 0..config.refresh.concurrency {
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
                    match provider.refresh(&token, Clock::system().now()).await {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }));
        }
        let me = std::process::id();
        // Warm-up: connections opened, caches filled.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (load, ok0, cpu0, sb0, m0, t0) = (
            procs::loadavg(),
            ok.load(Ordering::Relaxed),
            procs::cpu_secs(me, self.clk_tck),
            procs::cpu_secs(sandbox.pid(), self.clk_tck),
            CpuTimes::now(),
            Instant::now(),
        );
        tokio::time::sleep(window).await;
        let (ok1, cpu1, sb1, m1, secs) = (
            ok.load(Ordering::Relaxed),
            procs::cpu_secs(me, self.clk_tck),
            procs::cpu_secs(sandbox.pid(), self.clk_tck),
            CpuTimes::now(),
            t0.elapsed().as_secs_f64(),
        );
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
        let stats = self.sandbox_stats(port).await?;
        sandbox.stop()?;
        let done = (ok1 - ok0).max(1) as f64;
        let others = (m0.busy_secs_until(m1, self.clk_tck) - (cpu1 - cpu0) - (sb1 - sb0)).max(0.0);
        Ok(LimitRun {
            rate: done / secs,
            client_us: (cpu1 - cpu0) / done * 1e6,
            sandbox_us: (sb1 - sb0) / done * 1e6,
            others_cores: others / secs,
            details: json!({"window_secs": secs, "refreshed": done, "rate": done / secs,
                   "failed": failed.load(Ordering::Relaxed), "concurrency": concurrency,
                   "client_cpu_secs": cpu1 - cpu0, "sandbox_cpu_secs": sb1 - sb0,
                   "machine_busy": m0.busy_share_until(m1), "others_cpu_secs": others,
                   "loadavg_at_start": load, "loadavg_at_end": procs::loadavg(),
                   "sandbox": stats}),
        })
    }

    /// Every account due now; committed rotations per second over the window.
    async fn burst_run(&self, concurrency: usize, window: Duration) -> Result<BurstRun> {
        let at = Clock::system().now();
        let prep = self.prepare(&format!("{}", at - 60), &format!("{} + 180 * 86400", at))?;
        eprintln!("   prepared in {prep:.1} s");
        let ro = self.open_ro()?;
        let base = ro.log_max_id()?;
        let (sb_port, ops) = (procs::free_port()?, procs::free_port()?);
        let sandbox = self.spawn_sandbox(sb_port).await?;
        let config = self.write_config(
            "burst.toml",
            &self.config_toml(sb_port, ops, "0 */15 * * * *", concurrency),
        )?;
        let (daemon, ready) = self.spawn_daemon(&config, ops, "burst.log").await?;
        let n = self.cli.accounts as i64;
        // Ready comes before the start-up checks end (writes wait for them): the burst
        // begins with its first commit, which a loaded machine can delay by seconds.
        let checks = Instant::now();
        while ro.log_max_id()? == base {
            if checks.elapsed() > Duration::from_secs(120) {
                daemon.stop()?;
                sandbox.stop()?;
                anyhow::bail!("burst: no refresh committed within 120 s of ready (see burst.log)");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let first_commit = checks.elapsed().as_secs_f64();
        // Warm-up after the first commit, unless the whole burst is over by then (small stores).
        let warm = Instant::now();
        while warm.elapsed() < Duration::from_secs(2) && ro.log_max_id()? - base < n / 2 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let load = procs::loadavg();
        let start_rotated = ro.count_rotated(base)?;
        let window = window.as_secs_f64();
        let mut last = (ro.log_max_id()?, 0.0);
        let (usage, watched) = self
            .watch(&daemon, &sandbox, |t| {
                let m = ro.log_max_id()?;
                if m != last.0 {
                    last = (m, t);
                }
                // Over when the window ends, or when nothing moved for a second (done).
                Ok(t >= window || t - last.1 > 1.0)
            })
            .await?;
        let end_rotated = ro.count_rotated(base)?;
        // A burst that ended early is measured up to its last commit.
        let secs = if watched >= window {
            watched
        } else {
            last.1.max(0.2)
        };
        let stats = self.sandbox_stats(sb_port).await?;
        let (_, hwm) = procs::rss(daemon.pid());
        daemon.stop()?;
        sandbox.stop()?;
        let outcomes = ro.outcomes_after(base)?;
        let done = (end_rotated - start_rotated).max(1) as f64;
        let peak = usage.hwm.max(hwm);
        Ok(BurstRun {
            rate: done / secs,
            daemon_us: usage.daemon_cpu / done * 1e6,
            sandbox_us: usage.sandbox_cpu / done * 1e6,
            machine_busy: usage.machine_busy,
            others_cores: usage.others_cpu / watched,
            peak_rss: peak,
            details: json!({"window_secs": secs, "committed_in_window": done, "rate": done / secs,
                   "ready_secs": ready, "first_commit_after_ready_secs": first_commit,
                   "prepare_secs": prep, "concurrency": concurrency,
                   "daemon_cpu_secs": usage.daemon_cpu, "sandbox_cpu_secs": usage.sandbox_cpu,
                   "machine_busy": usage.machine_busy, "bench_cpu_secs": usage.bench_cpu,
                   "others_cpu_secs": usage.others_cpu, "loadavg_at_start": load,
                   "loadavg_at_end": procs::loadavg(),
                   "max_rss_sampled_bytes": usage.max_rss, "vm_hwm_bytes": peak,
                   "log_outcomes_since_start": outcomes, "sandbox": stats}),
        })
    }

    /// limit: one limit run at --concurrency.
    pub(crate) async fn limit(&mut self) -> Result<()> {
        let l = self
            .limit_run(self.cli.concurrency, self.cli.window)
            .await?;
        self.throughput_rows(&[l], &[]);
        Ok(())
    }

    /// burst: one burst run at --concurrency (compared with the last limit, if any).
    pub(crate) async fn burst(&mut self) -> Result<()> {
        let b = self
            .burst_run(self.cli.concurrency, self.cli.window)
            .await?;
        self.throughput_rows(&[], &[b]);
        Ok(())
    }

    /// rounds: limit, burst, limit, burst, ... (--rounds of each), so both see the same
    /// machine; the medians and their ratio are the figures.
    pub(crate) async fn rounds(&mut self) -> Result<()> {
        let (mut limits, mut bursts) = (Vec::new(), Vec::new());
        for i in 0..self.cli.rounds.max(1) {
            eprintln!("   round {}: limit", i + 1);
            limits.push(
                self.limit_run(self.cli.concurrency, self.cli.window)
                    .await?,
            );
            eprintln!("   round {}: burst", i + 1);
            bursts.push(
                self.burst_run(self.cli.concurrency, self.cli.window)
                    .await?,
            );
        }
        self.plots.rounds = limits
            .iter()
            .zip(&bursts)
            .map(|(l, b)| (l.rate, b.rate))
            .collect();
        self.throughput_rows(&limits, &bursts);
        Ok(())
    }

    /// concurrency: a limit and a burst (--sweep-window each) at every --concurrencies value.
    pub(crate) async fn concurrency(&mut self) -> Result<()> {
        let mut details = Vec::new();
        for c in self.cli.concurrencies.clone() {
            eprintln!("   concurrency {c}");
            let l = self.limit_run(c, self.cli.sweep_window).await?;
            let b = self.burst_run(c, self.cli.sweep_window).await?;
            let tag = self.tag("concurrency");
            let r = &mut self.report;
            r.row(
                &tag,
                &format!("limit at concurrency {c}"),
                l.rate,
                "/s",
                None,
            );
            r.row(
                &tag,
                &format!("burst at concurrency {c}"),
                b.rate,
                "/s",
                None,
            );
            self.plots.concurrency.push(ConcurrencyPoint {
                concurrency: c,
                limit_rate: l.rate,
                burst_rate: b.rate,
                client_us: l.client_us,
                daemon_us: b.daemon_us,
            });
            details.push(json!({"concurrency": c, "limit": l.details, "burst": b.details}));
        }
        let tag = self.tag("concurrency");
        self.report.details.insert(tag, json!(details));
        Ok(())
    }

    /// The rows of limit and burst runs: medians over the runs, the ratio of the medians,
    /// and every run in the details.
    fn throughput_rows(&mut self, limits: &[LimitRun], bursts: &[BurstRun]) {
        let runs = limits.len().max(bursts.len());
        let of = if runs > 1 {
            format!(" (median of {runs})")
        } else {
            String::new()
        };
        if !limits.is_empty() {
            let tag = self.tag("limit");
            let rate = median(limits.iter().map(|l| l.rate));
            self.limit_rate = Some(rate);
            let r = &mut self.report;
            r.row(
                &tag,
                &format!("refreshes per second, no store{of}"),
                rate,
                "/s",
                None,
            );
            let client = median(limits.iter().map(|l| l.client_us));
            self.limit_client_us = Some(client);
            let r = &mut self.report;
            r.row(&tag, "client CPU per refresh", client, "µs", None);
            let sandbox = median(limits.iter().map(|l| l.sandbox_us));
            r.row(&tag, "sandbox CPU per refresh", sandbox, "µs", None);
            let others = limits.iter().map(|l| l.others_cores).fold(0.0, f64::max);
            r.row(
                &tag,
                "other processes' CPU (cores, max)",
                others,
                "cores",
                None,
            );
            let runs: Vec<&Value> = limits.iter().map(|l| &l.details).collect();
            r.details
                .insert(tag, json!({"median_rate": rate, "runs": runs}));
        }
        if bursts.is_empty() {
            return;
        }
        let on_pg = self.pg.is_some();
        let tag = self.tag("burst");
        let rate = median(bursts.iter().map(|b| b.rate));
        let limit = self.limit_rate;
        let client = self.limit_client_us;
        let r = &mut self.report;
        let figure = format!("committed refreshes per second{of}");
        match on_pg {
            true => r.absolute_row(
                &tag,
                &figure,
                rate,
                "/s",
                ">= 15,000/s",
                PG_BURST_TARGET,
                Scale::Rate,
            ),
            false => r.row(&tag, &figure, rate, "/s", None),
        }
        if let Some(limit) = limit.filter(|_| !on_pg) {
            let ratio = rate / limit;
            r.row(
                &tag,
                "ratio to limit",
                ratio,
                "x",
                Some((">= 0.7", ratio >= RATIO_TARGET)),
            );
        }
        let daemon = median(bursts.iter().map(|b| b.daemon_us));
        let target = (!on_pg).then_some(("<= 25 µs", daemon <= DAEMON_US_TARGET));
        r.row(
            &tag,
            "daemon CPU per committed refresh",
            daemon,
            "µs",
            target,
        );
        if let Some(client) = client.filter(|_| !on_pg) {
            let relative = daemon / client;
            r.row(
                &tag,
                "daemon CPU / bare client CPU per refresh",
                relative,
                "x",
                Some(("<= 1.52 (25/16.5 µs)", relative <= DAEMON_TO_CLIENT_TARGET)),
            );
        }
        let sandbox = median(bursts.iter().map(|b| b.sandbox_us));
        r.row(&tag, "sandbox CPU per refresh", sandbox, "µs", None);
        let busy = median(bursts.iter().map(|b| b.machine_busy));
        r.row(&tag, "machine CPU busy", busy * 100.0, "%", None);
        let others = bursts.iter().map(|b| b.others_cores).fold(0.0, f64::max);
        r.row(
            &tag,
            "other processes' CPU (cores, max)",
            others,
            "cores",
            None,
        );
        let peak = bursts.iter().map(|b| b.peak_rss).fold(0.0, f64::max);
        let target = Some(("<= 32 MiB at 1M", peak <= 32.0 * MIB));
        r.row(&tag, "peak RSS", peak / MIB, "MiB", target);
        let runs: Vec<&Value> = bursts.iter().map(|b| &b.details).collect();
        r.details.insert(
            tag,
            json!({"median_rate": rate, "ratio_to_limit": limit.map(|l| rate / l), "runs": runs}),
        );
        let backend = if on_pg { "PostgreSQL" } else { "SQLite" };
        self.plots.backend(backend).burst_rate = Some(rate);
    }
}
