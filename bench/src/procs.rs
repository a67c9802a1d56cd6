//! The processes the benchmark starts and what it reads of them and of the machine from
//! /proc: CPU seconds, resident memory, the machine's busy share and load. Nothing here is
//! estimated: every figure is the kernel's.

use anyhow::{Result, bail};
use serde_json::{Value, json};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

pub(crate) const MIB: f64 = 1024.0 * 1024.0;

/// Clock ticks per second of /proc's CPU times.
pub(crate) fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

pub(crate) fn machine() -> Value {
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
pub(crate) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// CPU seconds (user + system) a process has used, from /proc/PID/stat.
pub(crate) fn cpu_secs(pid: u32, clk_tck: f64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line: 11 and 12 after the state.
    (ticks(11) + ticks(12)) / clk_tck
}

/// (VmRSS, VmHWM) of a process in bytes, from /proc/PID/status.
pub(crate) fn rss(pid: u32) -> (f64, f64) {
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

/// Busy and total time of all CPUs, from /proc/stat's first line.
#[derive(Clone, Copy)]
pub(crate) struct CpuTimes {
    busy: f64,
    total: f64,
}

impl CpuTimes {
    pub(crate) fn now() -> CpuTimes {
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

    /// Busy CPU seconds of the whole machine since `self`.
    pub(crate) fn busy_secs_until(self, later: CpuTimes, clk_tck: f64) -> f64 {
        (later.busy - self.busy) / clk_tck
    }

    /// Busy share of all CPUs since `self`.
    pub(crate) fn busy_share_until(self, later: CpuTimes) -> f64 {
        let t = later.total - self.total;
        if t <= 0.0 {
            0.0
        } else {
            (later.busy - self.busy) / t
        }
    }
}

/// A child process stopped (SIGTERM, then SIGKILL after 60 s) when dropped.
pub(crate) struct Proc {
    pub(crate) child: Child,
    pub(crate) name: &'static str,
}

impl Proc {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM and wait: the daemon drains and closes its store.
    pub(crate) fn stop(mut self) -> Result<()> {
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

/// What a command that ran to its end used: the kernel's own account of that one child.
pub(crate) struct Finished {
    pub(crate) success: bool,
    pub(crate) wall_secs: f64,
    pub(crate) cpu_secs: f64,
    /// Peak resident memory (ru_maxrss), bytes.
    pub(crate) max_rss: f64,
}

/// Runs `cmd` to its end and reads its peak memory and CPU from `wait4`, exactly (a sampled
/// /proc reading would miss the peak of a short run).
pub(crate) fn run_measured(cmd: &mut Command) -> Result<Finished> {
    let t = Instant::now();
    let child = cmd.spawn()?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our own unwaited child; status and usage point to live locals.
    let got =
        tokio::task::block_in_place(|| unsafe { libc::wait4(pid, &mut status, 0, &mut usage) });
    if got != pid {
        bail!(
            "waiting for process {pid}: {}",
            std::io::Error::last_os_error()
        );
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(Finished {
        success: libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        wall_secs: t.elapsed().as_secs_f64(),
        cpu_secs: secs(usage.ru_utime) + secs(usage.ru_stime),
        max_rss: usage.ru_maxrss as f64 * 1024.0,
    })
}

/// Sampled resource use of the daemon (and the sandbox) over a window.
#[derive(Default, Clone, Copy)]
pub(crate) struct Usage {
    pub(crate) daemon_cpu: f64,
    pub(crate) sandbox_cpu: f64,
    /// This program's own CPU seconds (it samples; it should stay near 0).
    pub(crate) bench_cpu: f64,
    /// CPU seconds of every other process on the machine (other builds, ...).
    pub(crate) others_cpu: f64,
    pub(crate) machine_busy: f64,
    pub(crate) max_rss: f64,
    pub(crate) hwm: f64,
}
