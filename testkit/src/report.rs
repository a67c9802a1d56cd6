//! The NOT RUN bookkeeping: one line per test that could not run, one summary when the test
//! binary exits, and the strict mode that turns a NOT RUN into a failure.

use std::io::Write;
use std::sync::Mutex;

/// The environment variable that makes a NOT RUN fail its test.
pub const STRICT_VAR: &str = "REFRESHD_TEST_STRICT";

static NOT_RUN: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Whether `REFRESHD_TEST_STRICT=1`: every test must really run.
pub fn strict() -> bool {
    std::env::var(STRICT_VAR).is_ok_and(|v| v == "1")
}

/// Records that `test` did not run because `what` is missing, and says so on stderr with
/// the command that installs it. Panics (fails the test) in strict mode.
pub fn not_run(test: &str, what: &str, install: &str) {
    let line = format!("NOT RUN: {test}: needs {what} (install: {install})");
    if strict() {
        panic!("{line}; {STRICT_VAR}=1 makes this a failure");
    }
    // Straight to stderr: the test harness captures the print macros, not this.
    let _ = writeln!(std::io::stderr(), "{line}");
    NOT_RUN.lock().unwrap_or_else(|e| e.into_inner()).push(line);
    crate::exit::on_exit(summary);
}

/// The summary of what did not run, on stderr (registered to run at exit).
fn summary() {
    let lines = NOT_RUN.lock().unwrap_or_else(|e| e.into_inner());
    if lines.is_empty() {
        return;
    }
    let mut err = std::io::stderr().lock();
    let _ = writeln!(
        err,
        "\nNOT RUN summary: {} test(s) did not run (set {STRICT_VAR}=1 to make this a failure):",
        lines.len()
    );
    for line in lines.iter() {
        let _ = writeln!(err, "  {line}");
    }
}
