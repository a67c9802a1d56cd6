//! CI smoke test of the benchmark program (BENCHMARKS.md; the workspace member `bench/`, run
//! here in-process through its library): every scenario runs at 10,000 accounts and prints
//! its rows. Never a timed assertion: the debug build on a shared CI
//! machine measures nothing worth comparing; the figures come from release runs.

use std::ffi::OsString;

#[test]
fn every_scenario_runs_at_ten_thousand_accounts() {
    smoke(None);
}

/// The same on PostgreSQL (README: "Scaling out on PostgreSQL"), on a schema of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_runs_at_ten_thousand_accounts_on_postgres() {
    let Some(url) = crate::postgres::postgres_url(
        "bench::every_scenario_runs_at_ten_thousand_accounts_on_postgres",
    )
    .await
    else {
        return;
    };
    // Its own thread: the benchmark starts a runtime of its own.
    std::thread::spawn(move || smoke(Some(&url)))
        .join()
        .unwrap();
}

fn smoke(postgres: Option<&str>) {
    let _heavy = crate::helpers::heavy();
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("bench.json");
    let mut args: Vec<OsString> = vec!["refreshd-bench".into()];
    if let Some(url) = postgres {
        args.extend(["--postgres".into(), url.into()]);
    }
    for a in ["all", "--accounts", "10000", "--window", "2s"] {
        args.push(a.into());
    }
    for a in ["--steady-window", "5s", "--startups", "1", "--dir"] {
        args.push(a.into());
    }
    args.extend([dir.path().into(), "--json".into(), json.clone().into()]);
    args.extend(["--refreshd".into(), env!("CARGO_BIN_EXE_refreshd").into()]);
    let mut out = Vec::new();
    let code = refreshd_bench::main_with(args, &mut out);
    let stdout = String::from_utf8_lossy(&out);
    assert!(
        code == std::process::ExitCode::SUCCESS,
        "refreshd-bench failed ({code:?}; its errors are on stderr above)\nstdout:\n{stdout}"
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
