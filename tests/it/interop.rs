//! refreshd against an OAuth server nobody here wrote: the short form of the interop and
//! chaos harness in `tests/interop/` (oidc-provider with refresh-token rotation and reuse
//! detection; scenarios steady, replicas, crash, outage, end_of_life, cut, and the generic
//! profile against a client_secret_basic + PKCE server: generic_fixed, generic_sliding), run with the binary
//! under test, its conditions asserted here.
//!
//! It needs Node.js (20.19 or newer), the `sqlite3` shell and the harness's packages
//! (`npm ci` in tests/interop); `.ci/run` installs them. A missing one is a NOT RUN
//! (refreshd-testkit): a failure under `REFRESHD_TEST_STRICT=1`.
//! The whole harness takes about 1.5 minutes (its scenarios run side by side).

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const HARNESS_TIMEOUT: Duration = Duration::from_secs(300);

fn interop_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop")
}

const TEST: &str = "interop::interop_with_oidc_provider_short_form";

/// Whether the harness can run here; a NOT RUN naming what is missing when it cannot.
fn have_tools(dir: &Path) -> bool {
    refreshd_testkit::tool(
        TEST,
        "Node.js >= 20.19",
        &["node", "-e", NODE_20_19],
        "apt-get install nodejs npm",
    ) && refreshd_testkit::tool(
        TEST,
        "the sqlite3 shell",
        &["sqlite3", "-version"],
        "apt-get install sqlite3",
    ) && (dir.join("node_modules/oidc-provider/package.json").exists() || {
        let install = format!("cd {} && npm ci", dir.display());
        refreshd_testkit::not_run(TEST, "the harness's npm packages", &install);
        false
    })
}

/// Exits 0 on Node.js 20.19 or newer.
const NODE_20_19: &str = "const [a, b] = process.versions.node.split('.').map(Number); process.exit(a > 20 || (a === 20 && b >= 19) ? 0 : 1)";

fn num(row: &Value, key: &str) -> i64 {
    row[key]
        .as_i64()
        .unwrap_or_else(|| panic!("{key} missing in {row}"))
}

#[test]
fn interop_with_oidc_provider_short_form() {
    let _heavy = crate::helpers::heavy();
    let dir = interop_dir();
    if !have_tools(&dir) {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let out_file = work.path().join("interop-results.json");
    // Niced: its daemons and providers run in real time beside the other tests of this
    // binary, whose timing-sensitive parts must not starve on a small machine.
    let mut child = Command::new("nice")
        .args(["-n", "15", "node", "harness.mjs"])
        .args(["--form", "short", "--bin", env!("CARGO_BIN_EXE_refreshd")])
        .arg("--keep")
        .arg(work.path().join("run"))
        .arg("--out")
        .arg(&out_file)
        .current_dir(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start node harness.mjs");
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if started.elapsed() > HARNESS_TIMEOUT {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The table, shown with --nocapture and on failure.
    println!("{stdout}");
    let Some(status) = status else {
        panic!("the harness ran longer than {HARNESS_TIMEOUT:?}:\n{stdout}\n{stderr}");
    };
    let results: Value = serde_json::from_slice(
        &std::fs::read(&out_file)
            .unwrap_or_else(|e| panic!("no results ({e}); harness said:\n{stdout}\n{stderr}")),
    )
    .unwrap();
    let rows = results["results"].as_array().unwrap();
    let names: Vec<&str> = rows
        .iter()
        .map(|r| r["scenario"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "steady",
            "replicas",
            "crash",
            "outage",
            "end_of_life",
            "cut",
            "generic_fixed",
            "generic_sliding"
        ]
    );
    for row in rows {
        let name = row["scenario"].as_str().unwrap();
        assert!(
            row.get("error").is_none(),
            "{name} did not run: {}\n{stderr}",
            row["error"]
        );
        assert_eq!(num(row, "lost"), 0, "{name}: accounts lost: {row:#}");
        match name {
            "crash" | "cut" => {
                // Each flag is a rotation the provider made in an answer refreshd never
                // read (the process was killed, or the connection cut): at most one per
                // refresh in flight at the kills / per answer cut, each naming the window.
                let flagged = num(row, "flagged");
                let bound = if name == "crash" {
                    num(&row["details"], "in_flight_at_kills")
                } else {
                    num(&row["details"]["provider"], "answers_cut")
                };
                assert!(
                    flagged <= bound,
                    "{name}: {flagged} flagged > {bound}: {row:#}"
                );
                assert!(
                    row["details"]["flagged_reasons"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .all(|r| r == "refresh_interrupted"),
                    "{name}: a flag names another reason: {row:#}"
                );
            }
            "end_of_life" => {
                assert_eq!(num(row, "reuse_revocations"), 0, "{name}: {row:#}");
                assert!(
                    row["details"]["late"].as_array().unwrap().is_empty(),
                    "end_of_life: accounts not flagged before their refresh token ended: {row:#}"
                );
            }
            "generic_fixed" | "generic_sliding" => {
                // Issue 18: client_secret_basic with a secret holding +/=%, PKCE, a refresh
                // lifetime from the config, subjects holding @ and |.
                assert_eq!(num(row, "reuse_revocations"), 0, "{name}: {row:#}");
                assert_eq!(num(row, "flagged"), 0, "{name}: {row:#}");
                let d = &row["details"];
                assert!(
                    d["not_refreshed"].as_array().unwrap().is_empty(),
                    "{name}: accounts never refreshed: {row:#}"
                );
                assert!(
                    d["inexact_subjects"].as_array().unwrap().is_empty(),
                    "{name}: subjects not stored exactly: {row:#}"
                );
                // Transit time of the answer, bounded by request_timeout (harness.mjs).
                assert!(
                    num(d, "max_expiry_diff_s") <= 5,
                    "{name}: stored refresh-token ends differ from the server's: {row:#}"
                );
            }
            _ => {
                assert_eq!(num(row, "reuse_revocations"), 0, "{name}: {row:#}");
                assert_eq!(num(row, "flagged"), 0, "{name}: {row:#}");
            }
        }
        assert_eq!(row["ok"], true, "{name} missed a condition: {row:#}");
    }
    assert!(status.success(), "harness failed:\n{stdout}\n{stderr}");
}
