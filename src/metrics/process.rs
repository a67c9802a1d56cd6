//! The process's own resource use (CPU, memory, file descriptors, start time) under the
//! usual `process_*` names, read from /proc through the `procfs` crate on Linux; elsewhere
//! there is nothing to read and the metrics are not served.

/// One reading of the process's counters, in base units.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProcessSample {
    pub cpu_seconds: f64,
    pub resident_memory_bytes: u64,
    pub virtual_memory_bytes: u64,
    pub open_fds: u64,
    /// None when the soft limit is unlimited.
    pub max_fds: Option<u64>,
    pub start_time_seconds: u64,
}

/// Reads the current process's sample; None where /proc cannot be read.
#[cfg(target_os = "linux")]
pub fn sample() -> Option<ProcessSample> {
    use procfs::process::{LimitValue, Process};
    let me = Process::myself().ok()?;
    let stat = me.stat().ok()?;
    let ticks = procfs::ticks_per_second() as f64;
    let max_fds = match me.limits().ok()?.max_open_files.soft_limit {
        LimitValue::Value(n) => Some(n),
        LimitValue::Unlimited => None,
    };
    Some(ProcessSample {
        cpu_seconds: (stat.utime + stat.stime) as f64 / ticks,
        resident_memory_bytes: stat.rss * procfs::page_size(),
        virtual_memory_bytes: stat.vsize,
        open_fds: me.fd_count().ok()? as u64,
        max_fds,
        start_time_seconds: procfs::boot_time_secs().ok()? + stat.starttime / ticks as u64,
    })
}

#[cfg(not(target_os = "linux"))]
pub fn sample() -> Option<ProcessSample> {
    None
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn a_sample_of_this_process_is_plausible() {
        let s = sample().expect("/proc is readable on Linux");
        assert!(s.resident_memory_bytes > 1024 * 1024, "{s:?}");
        assert!(s.virtual_memory_bytes >= s.resident_memory_bytes, "{s:?}");
        assert!(s.open_fds >= 3, "stdin, stdout, stderr at least: {s:?}");
        assert!(s.max_fds.is_none_or(|m| m >= s.open_fds), "{s:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        // Started within the last day, not in the future (boot time and ticks agree).
        assert!(s.start_time_seconds <= now + 1, "{s:?}");
        assert!(s.start_time_seconds + 86_400 > now, "{s:?}");
        // Burn a little CPU: the counter moves.
        let before = s.cpu_seconds;
        let mut x = 0u64;
        let until = std::time::Instant::now() + std::time::Duration::from_millis(150);
        while std::time::Instant::now() < until {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        assert!(x > 0);
        assert!(sample().unwrap().cpu_seconds > before, "{s:?}");
    }
}
