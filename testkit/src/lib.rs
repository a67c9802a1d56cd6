//! Test support shared by refreshd's test binaries (the library's unit tests, `tests/it`):
//! the outside components a test needs, started or found by the test itself, and the one
//! NOT RUN mechanism for those that are not installed.
//!
//! - [`not_run`]: a test that cannot run prints one `NOT RUN: <what> (install: <command>)`
//!   line, and the test binary ends with one summary of what did not run. With
//!   `REFRESHD_TEST_STRICT=1` (`.ci/run` sets it) a NOT RUN fails the test instead.
//! - [`postgres`]: a throwaway PostgreSQL cluster (module `cluster`), one per test binary;
//!   [`durable_postgres`] one that fsyncs its commits, for the benchmark.
//! - [`tool`]: whether an installed program answers.
//! - [`browser`]: a chromedriver for tests that drive a real headless Chromium.

pub mod browser;
mod cluster;
mod exit;
mod report;

pub use cluster::{durable_postgres, is_root, postgres, postgres_schema};
pub use report::{not_run, strict};

use std::process::{Command, Stdio};

/// Whether `command` (a program and its arguments) runs and exits 0; when it does not, a
/// NOT RUN of `test` naming `what` is missing and the command that installs it.
pub fn tool(test: &str, what: &str, command: &[&str], install: &str) -> bool {
    let Some((program, args)) = command.split_first() else {
        return false;
    };
    let works = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !works {
        not_run(test, what, install);
    }
    works
}
