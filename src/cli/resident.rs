//! The daemon's resident code after start-up: once it is ready, the executable's read-only
//! mappings (code and read-only data) are unmapped, so only the code it runs from then on is
//! mapped again, on its first use, from the page cache (or from the disk, if the kernel has
//! reclaimed them meanwhile: unmapped cache pages are the first it takes under pressure).
//!
//! Start-up (the command line, the config, the migrations, the store's checks) leaves about
//! 11 MiB of the binary mapped, where a burst of refreshes uses about 4 MiB of it (each
//! fault maps the 64 KiB around it, so about 8 MiB come back).

/// Unmaps the executable's private, read-only mappings that hold no copied-on-write page
/// (neither resident nor swapped out);
/// returns the bytes of address space advised (0 where /proc cannot be read).
pub fn release_startup_code() -> usize {
    let Ok(exe) = std::fs::read_link("/proc/self/exe") else {
        return 0;
    };
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return 0;
    };
    let mut advised = 0;
    for m in read_only_mappings(&smaps, &exe.to_string_lossy()) {
        if dont_need(m) {
            advised += m.end - m.start;
        }
    }
    advised
}

#[cfg(target_os = "linux")]
fn dont_need(m: Mapping) -> bool {
    // SAFETY: the range is a private mapping of the executable file that cannot be written
    // (no `w`) and holds no anonymous page, resident or swapped out (none copied on write,
    // such as the relocated read-only data): every page of it reads back the same from the
    // file.
    unsafe {
        rustix::mm::madvise(
            m.start as *mut std::ffi::c_void,
            m.end - m.start,
            rustix::mm::Advice::LinuxDontNeed,
        )
    }
    .is_ok()
}

#[cfg(not(target_os = "linux"))]
fn dont_need(_: Mapping) -> bool {
    false
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Mapping {
    start: usize,
    end: usize,
}

/// The mappings of the file `path` in `smaps` (the text of /proc/PID/smaps) that are
/// private, not writable, and whose `Anonymous:` and `Swap:` lines say 0 kB (a relocated
/// page swapped out counts under `Swap:` only).
fn read_only_mappings(smaps: &str, path: &str) -> Vec<Mapping> {
    let mut out = Vec::new();
    // The mapping being read, while it still qualifies.
    let mut cur: Option<Mapping> = None;
    for line in smaps.lines() {
        if let Some((range, perms, name)) = header(line) {
            out.extend(cur.take());
            let Some((start, end)) = range else { continue };
            let p = perms.as_bytes();
            if name == path && p.len() == 4 && p[0] == b'r' && p[1] == b'-' && p[3] == b'p' {
                cur = Some(Mapping { start, end });
            }
        } else if let Some(kb) = line
            .strip_prefix("Anonymous:")
            .or_else(|| line.strip_prefix("Swap:"))
            && kb.trim() != "0 kB"
        {
            cur = None;
        }
    }
    out.extend(cur.take());
    out
}

type Header<'a> = (Option<(usize, usize)>, &'a str, &'a str);

/// A mapping's first line: `start-end perms offset dev inode   path` (the path may hold
/// spaces, or be missing).
fn header(line: &str) -> Option<Header<'_>> {
    let mut rest = line;
    let mut fields = [""; 5];
    for f in &mut fields {
        let t = rest.trim_start();
        let end = t.find(' ').unwrap_or(t.len());
        (*f, rest) = t.split_at(end);
    }
    let (s, e) = fields[0].split_once('-')?;
    // Every other line is `Key:   value`.
    if fields[0].ends_with(':') || fields[1].len() != 4 {
        return None;
    }
    let range = usize::from_str_radix(s, 16)
        .ok()
        .zip(usize::from_str_radix(e, 16).ok());
    Some((range, fields[1], rest.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d000000000-55d000400000 r--p 00000000 fd:01 1234                       /opt/refreshd bin/refreshd
Size:               4096 kB
Rss:                1200 kB
Anonymous:             0 kB
VmFlags: rd mr mw me sd
55d000400000-55d000c00000 r-xp 00400000 fd:01 1234                       /opt/refreshd bin/refreshd
Size:               8192 kB
Anonymous:             0 kB
55d000c00000-55d000d00000 r--p 00c00000 fd:01 1234                       /opt/refreshd bin/refreshd
Size:               1024 kB
Anonymous:           280 kB
55d000d00000-55d000d08000 r--p 00d00000 fd:01 1234                       /opt/refreshd bin/refreshd
Anonymous:             0 kB
Swap:                  8 kB
55d000d00000-55d000d10000 rw-p 00d00000 fd:01 1234                       /opt/refreshd bin/refreshd
Anonymous:             0 kB
55d000e00000-55d000f00000 rw-p 00000000 00:00 0                          [heap]
Anonymous:           100 kB
7f0000000000-7f0000100000 r-xp 00028000 fd:01 99                         /usr/lib/x86_64-linux-gnu/libc.so.6
Anonymous:             0 kB
7f0000100000-7f0000101000 r--s 00000000 fd:01 1234                       /opt/refreshd bin/refreshd
Anonymous:             0 kB
7f0000200000-7f0000201000 r--p 00000000 00:00 0 
Anonymous:             0 kB
";

    /// What `SMAPS` leaves to unmap: its first two mappings (not the one with copied
    /// pages resident, nor the one with a copied page swapped out).
    const KEPT: [Mapping; 2] = [
        Mapping {
            start: 0x55d000000000,
            end: 0x55d000400000,
        },
        Mapping {
            start: 0x55d000400000,
            end: 0x55d000c00000,
        },
    ];

    #[test]
    fn only_the_executables_private_read_only_unwritten_mappings() {
        let m = read_only_mappings(SMAPS, "/opt/refreshd bin/refreshd");
        assert_eq!(m, KEPT);
        assert!(read_only_mappings(SMAPS, "/opt/refreshd").is_empty());
    }

    #[test]
    fn a_mapping_without_its_anonymous_line_is_not_kept_past_the_next_header() {
        let text = "1000-2000 r-xp 00000000 fd:01 1 /x\n3000-4000 rw-p 00000000 fd:01 1 /x\n";
        assert_eq!(
            read_only_mappings(text, "/x"),
            [Mapping {
                start: 0x1000,
                end: 0x2000
            }]
        );
    }

    /// This test binary's own code and read-only data are unmapped, and read back intact:
    /// the parser (code) run over `SMAPS` (read-only data) after the release finds what it
    /// found before.
    #[cfg(target_os = "linux")]
    #[test]
    fn the_running_program_survives_its_code_being_released() {
        let before = read_only_mappings(SMAPS, "/opt/refreshd bin/refreshd");
        assert!(release_startup_code() > 0);
        assert_eq!(
            read_only_mappings(SMAPS, "/opt/refreshd bin/refreshd"),
            before
        );
        assert_eq!(before, KEPT);
    }
}
