//! CI smoke test of the benchmark program (BENCHMARKS.md): every scenario runs at 10,000
//! accounts and prints its rows. Never a timed assertion: the debug build on a shared CI
//! machine measures nothing worth comparing; the figures come from release runs.

use std::process::Command;

#[test]
fn every_scenario_runs_at_ten_thousand_accounts() {
    smoke(None);
}

/// The same on PostgreSQL (README: "Scaling out on PostgreSQL"), on a schema of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_runs_at_ten_thousand_accounts_on_postgres() {
    let Some(url) = crate::postgres::postgres_url("bench").await else {
        return;
    };
    tokio::task::spawn_blocking(move || smoke(Some(&url)))
        .await
        .unwrap();
}

fn smoke(postgres: Option<&str>) {
    let _heavy = crate::helpers::heavy();
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("bench.json");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_refreshd-bench"));
    if let Some(url) = postgres {
        cmd.args(["--postgres", url]);
    }
    let out = cmd
        .args(["all", "--accounts", "10000", "--window", "2s"])
        .args(["--steady-window", "5s", "--startups", "1"])
        .arg("--dir")
        .arg(dir.path())
        .arg("--json")
        .arg(&json)
        .arg("--refreshd")
        .arg(env!("CARGO_BIN_EXE_refreshd"))
        .output()
        .expect("run refreshd-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "refreshd-bench failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    for scenario in ["seed", "startup", "limit", "burst", "steady", "sweep"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.split_whitespace().next() == Some(scenario)),
            "no {scenario} row in:\n{stdout}"
        );
    }
    for figure in [
        "committed refreshes per second",
        "ratio to limit",
        "lateness p99",
        "spawn to ready",
        "peak RSS",
    ] {
        assert!(stdout.contains(figure), "no {figure:?} in:\n{stdout}");
    }
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("JSON written")).expect("valid JSON");
    assert_eq!(doc["accounts"], 10000);
    assert!(doc["machine"]["nproc"].as_u64().unwrap_or(0) >= 1, "{doc}");
    let rows = doc["rows"].as_array().expect("rows");
    for scenario in ["seed", "startup", "limit", "burst", "steady", "sweep"] {
        assert!(
            rows.iter().any(|r| r["scenario"] == scenario),
            "no {scenario} row in the JSON"
        );
    }
    assert!(
        rows.iter().all(|r| r["measured"].as_f64().is_some()),
        "every figure is a number: {rows:?}"
    );
}
