//! Scheduled load: due times spread evenly so a fixed number of accounts is due each second,
//! measured over a window. steady: 300 per second with the reauth sweep every 10 s
//! (lateness is the figure); realistic: --accounts with 2-hour tokens (at 1M ~139 per
//! second, the daemon's CPU is the figure).

use crate::harness::Bench;
use crate::histogram::{lateness_histogram, quantile};
use crate::procs::{self, MIB};
use crate::report::Scale;
use anyhow::{Result, bail};
use refreshd::clock::Clock;
use serde_json::json;
use std::time::Duration;

/// Refreshes per second the steady scenario makes due.
pub(crate) const STEADY_RATE: i64 = 300;
/// The access-token lifetime of the realistic scenario: every account refreshed once in it.
const REALISTIC_SPAN: i64 = 7_200;
const DAY: i64 = 86_400;
/// The reauth window the daemon runs with (its default).
const WINDOW: i64 = 7 * DAY;

/// How a scheduled run spreads its due times: `per` accounts due every `every` seconds.
struct Spread {
    per: i64,
    every: i64,
}

impl Spread {
    /// When account `id` is due, as SQL (both backends: integer arithmetic in 64 bits).
    fn planned(&self, t0: i64) -> String {
        format!(
            "({t0} + (CAST(id AS BIGINT) - 1) * {} / {})",
            self.every, self.per
        )
    }

    fn per_sec(&self) -> f64 {
        self.per as f64 / self.every as f64
    }
}

/// What a scheduled run measured.
struct ScheduleRun {
    hist: Vec<(f64, f64)>,
    p50: f64,
    p99: f64,
    refreshed: i64,
    expected: i64,
    missed: i64,
    max_late: Option<i64>,
    cpu_pct: f64,
    hwm: f64,
    details: serde_json::Value,
}

impl Bench {
    /// Prepares the spread, runs the daemon from the first due second to the end of the
    /// window (`window` seconds at most), and reads lateness from /metrics and the store.
    /// With `flag_some`, 1% of the accounts' refresh tokens enter the reauth window meanwhile
    /// and the sweep runs every 10 s.
    async fn scheduled(
        &self,
        name: &str,
        spread: Spread,
        window: i64,
        flag_some: bool,
    ) -> Result<ScheduleRun> {
        let n = self.cli.accounts as i64;
        let window = window.min(n * spread.every / spread.per).max(1);
        let sweep_cron = if flag_some {
            "*/10 * * * * *"
        } else {
            "0 0 */6 * * *"
        };
        // Time to prepare the store and start the daemon before the first account is due.
        let mut lead_in = if n > 100_000 { 8 } else { 3 };
        let mut attempts = 0;
        let (t0, prep) = loop {
            let t0 = Clock::system().now() + lead_in;
            let far = Clock::system().now() + 180 * DAY;
            let refresh_end = match flag_some {
                true => format!(
                    "CASE WHEN id % 100 = 50 THEN {} + (id / 100) % {window} ELSE {far} END",
                    t0 + WINDOW
                ),
                false => far.to_string(),
            };
            let prep = self.prepare(&spread.planned(t0), &refresh_end)?;
            // The daemon needs a moment to start before the first account is due; when
            // preparing ate the lead-in, plan again with a longer one.
            if Clock::system().now() + 2 <= t0 {
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
        let (sb_port, ops) = (procs::free_port()?, procs::free_port()?);
        let sandbox = self.spawn_sandbox(sb_port).await?;
        let config = self.write_config(
            &format!("{name}.toml"),
            &self.config_toml(sb_port, ops, sweep_cron, self.cli.concurrency),
        )?;
        let log_name = format!("{name}.log");
        let (daemon, _) = self.spawn_daemon(&config, ops, &log_name).await?;
        self.wait_for_checks(&log_name).await?;
        // Negative: the checks ended before the first due second, as they should.
        let checks_late = Clock::system().now_millis() as f64 / 1000.0 - t0 as f64;
        if checks_late > 0.0 {
            eprintln!(
                "   warning: the start-up checks ended {checks_late:.1} s after the first due second; lateness includes that wait"
            );
        }
        // Measure from the first due second to the end of the window.
        let wait = (t0 * 1000 - Clock::system().now_millis()).max(0) as u64;
        tokio::time::sleep(Duration::from_millis(wait)).await;
        let load = procs::loadavg();
        let end = t0 + window;
        let (usage, secs) = self
            .watch(&daemon, &sandbox, |_| Ok(Clock::system().now() >= end + 2))
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
        let planned = spread.planned(t0);
        let got = ro.ints(&format!(
            "SELECT COUNT(*), MAX(last_refreshed_at - {planned}) FROM accounts
             WHERE last_refreshed_at IS NOT NULL AND {planned} < {end}"
        ))?;
        let (refreshed, max_late) = (got[0].unwrap_or(0), got[1]);
        let missed = ro.int(&format!(
            "SELECT COUNT(*) FROM accounts WHERE {planned} < {end} AND last_refreshed_at IS NULL"
        ))?;
        let expected = ro.int(&format!(
            "SELECT COUNT(*) FROM accounts WHERE {planned} < {end}"
        ))?;
        let log = std::fs::read_to_string(self.cli.dir.join(&log_name)).unwrap_or_default();
        let sweeps = log.matches("\"event\":\"reauth_sweep\"").count();
        let flagged = log.matches("\"reason\":\"refresh_token_expiring\"").count();
        let cpu_pct = usage.daemon_cpu / secs * 100.0;
        Ok(ScheduleRun {
            p50,
            p99,
            refreshed,
            expected,
            missed,
            max_late,
            cpu_pct,
            hwm: usage.hwm,
            details: json!({"window_secs": window, "measured_secs": secs,
                   "checks_end_after_first_due_secs": checks_late,
                   "due_per_sec": spread.per_sec(), "prepare_secs": prep,
                   "refreshed": refreshed, "expected": expected, "missed": missed,
                   "lateness_histogram": hist, "p50": p50, "p99": p99,
                   "max_lateness_db_secs": max_late, "daemon_cpu_secs": usage.daemon_cpu,
                   "sandbox_cpu_secs": usage.sandbox_cpu, "machine_busy": usage.machine_busy,
                   "others_cpu_secs": usage.others_cpu, "loadavg_at_start": load,
                   "loadavg_at_end": procs::loadavg(),
                   "vm_hwm_bytes": usage.hwm, "max_rss_sampled_bytes": usage.max_rss,
                   "sweeps_during_window": sweeps, "accounts_flagged_by_sweeps": flagged,
                   "sandbox": stats}),
            hist,
        })
    }

    /// steady: STEADY_RATE accounts due each second; lateness from the daemon's histogram
    /// and from the database; the reauth sweep runs every 10 s meanwhile and flags accounts
    /// as their refresh tokens enter the window.
    pub(crate) async fn steady(&mut self) -> Result<()> {
        let spread = Spread {
            per: STEADY_RATE,
            every: 1,
        };
        let window = self.cli.steady_window.as_secs() as i64;
        let run = self.scheduled("steady", spread, window, true).await?;
        let tag = self.tag("steady");
        let r = &mut self.report;
        let bucket = "(at most: histogram bucket)";
        r.row(&tag, &format!("lateness p50 {bucket}"), run.p50, "s", None);
        let target = Some(("<= 10 ms", run.p99 <= 0.010));
        r.row(
            &tag,
            &format!("lateness p99 {bucket}"),
            run.p99,
            "s",
            target,
        );
        let max_late = run.max_late.unwrap_or(0) as f64;
        r.row(
            &tag,
            "lateness max (database, whole seconds)",
            max_late,
            "s",
            None,
        );
        let share = run.refreshed as f64 / run.expected.max(1) as f64;
        let target = Some(("all, none missed", run.missed == 0));
        r.row(&tag, "refreshed / due in window", share, "x", target);
        r.row(&tag, "daemon CPU", run.cpu_pct, "% of 1 CPU", None);
        let target = Some(("<= 32 MiB at 1M", run.hwm <= 32.0 * MIB));
        r.row(&tag, "peak RSS", run.hwm / MIB, "MiB", target);
        r.details.insert(tag, run.details);
        self.plots.lateness = run.hist;
        Ok(())
    }

    /// realistic: every account refreshed once per 2-hour token lifetime, spread evenly;
    /// the daemon's CPU over --realistic-window is the figure.
    pub(crate) async fn realistic(&mut self) -> Result<()> {
        let spread = Spread {
            per: self.cli.accounts as i64,
            every: REALISTIC_SPAN,
        };
        let per_sec = spread.per_sec();
        let window = self.cli.realistic_window.as_secs() as i64;
        let run = self.scheduled("realistic", spread, window, false).await?;
        let tag = self.tag("realistic");
        let r = &mut self.report;
        r.row(&tag, "refreshes due per second", per_sec, "/s", None);
        let share = run.refreshed as f64 / run.expected.max(1) as f64;
        let target = Some(("all, none missed", run.missed == 0));
        r.row(&tag, "refreshed / due in window", share, "x", target);
        let (cpu, unit) = (run.cpu_pct, "% of 1 CPU");
        r.absolute_row(
            &tag,
            "daemon CPU",
            cpu,
            unit,
            "<= 1% at 1M",
            1.0,
            Scale::CpuShare,
        );
        r.row(
            &tag,
            "lateness p99 (at most: histogram bucket)",
            run.p99,
            "s",
            None,
        );
        r.details.insert(tag, run.details);
        Ok(())
    }
}
