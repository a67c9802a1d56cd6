//! CI smoke test of the benchmark program (BENCHMARKS.md; the workspace member `bench/`, run
//! here in-process through its library): `all` runs every scenario at 10,000 accounts with
//! short windows, SQLite and PostgreSQL (the test binary's throwaway cluster), and prints
//! its rows, valid JSON and well-formed SVG plots. Never a timed assertion: the debug build
//! on a shared CI machine measures nothing worth comparing; the figures come from release
//! runs.

use std::ffi::OsString;

const SCENARIOS: [&str; 10] = [
    "seed",
    "startup",
    "limit",
    "burst",
    "concurrency",
    "steady",
    "realistic",
    "sweep",
    "pg-seed",
    "pg-burst",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_runs_every_scenario_at_ten_thousand_accounts() {
    let url =
        crate::postgres::postgres_url("bench::all_runs_every_scenario_at_ten_thousand_accounts")
            .await;
    // Its own thread: the benchmark starts a runtime of its own.
    std::thread::spawn(move || smoke(url.as_deref()))
        .join()
        .unwrap();
}

fn smoke(postgres: Option<&str>) {
    let _heavy = crate::helpers::heavy();
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("bench.json");
    let plots = dir.path().join("plots");
    let mut args: Vec<OsString> = vec!["refreshd-bench".into()];
    match postgres {
        Some(url) => args.extend(["--postgres".into(), url.into()]),
        None => args.push("--no-postgres".into()),
    }
    for a in [
        "all",
        "--accounts",
        "10000",
        "--window",
        "1s",
        "--rounds",
        "2",
    ] {
        args.push(a.into());
    }
    for a in ["--concurrencies", "16,64", "--sweep-window", "1s"] {
        args.push(a.into());
    }
    for a in [
        "--steady-window",
        "3s",
        "--realistic-window",
        "3s",
        "--startups",
        "1",
    ] {
        args.push(a.into());
    }
    args.extend([
        "--dir".into(),
        dir.path().into(),
        "--json".into(),
        json.clone().into(),
    ]);
    args.extend(["--plots".into(), plots.clone().into()]);
    args.extend(["--refreshd".into(), env!("CARGO_BIN_EXE_refreshd").into()]);
    let mut out = Vec::new();
    let code = refreshd_bench::main_with(args, &mut out);
    let stdout = String::from_utf8_lossy(&out);
    assert!(
        code == std::process::ExitCode::SUCCESS,
        "refreshd-bench failed ({code:?}; its errors are on stderr above)\nstdout:\n{stdout}"
    );
    for scenario in SCENARIOS {
        assert!(
            stdout
                .lines()
                .any(|l| l.split_whitespace().next() == Some(scenario)),
            "no {scenario} row in:\n{stdout}"
        );
    }
    for figure in [
        "accounts import: accounts per second",
        "committed refreshes per second (median of 2)",
        "ratio to limit",
        "daemon CPU per committed refresh",
        "lateness p99",
        "spawn to ready",
        "peak RSS",
        "burst at concurrency 64",
    ] {
        assert!(stdout.contains(figure), "no {figure:?} in:\n{stdout}");
    }
    // Every target row says met or missed (or, for PostgreSQL when there is none, NOT RUN).
    for line in stdout
        .lines()
        .filter(|l| l.contains(">=") || l.contains("<="))
    {
        assert!(
            line.ends_with("yes")
                || line.ends_with("NO")
                || line.ends_with("skipped: no PostgreSQL"),
            "a target row without its verdict: {line}"
        );
    }
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("JSON written")).expect("valid JSON");
    assert_eq!(doc["accounts"], 10000);
    assert!(doc["machine"]["nproc"].as_u64().unwrap_or(0) >= 1, "{doc}");
    let rows = doc["rows"].as_array().expect("rows");
    for scenario in SCENARIOS {
        assert!(
            rows.iter().any(|r| r["scenario"] == scenario),
            "no {scenario} row in the JSON"
        );
    }
    assert!(
        rows.iter()
            .all(|r| r["measured"].as_f64().is_some() || r["skipped"].is_string()),
        "every figure is a number, or says why not: {rows:?}"
    );
    let rounds = doc["details"]["burst"]["runs"]
        .as_array()
        .expect("burst runs");
    assert_eq!(rounds.len(), 2, "every round in the JSON");
    assert!(rounds[0]["others_cpu_secs"].is_number() && rounds[0]["loadavg_at_start"].is_string());
    let mut svgs = Vec::new();
    for f in [
        "throughput",
        "cpu-per-refresh",
        "rounds",
        "lateness",
        "scale",
        "backends",
    ] {
        let path = plots.join(format!("{f}.svg"));
        let svg =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        svgs.push((path, svg));
    }
    for (path, svg) in svgs {
        assert!(
            svg.trim_start().starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
            "{} is no SVG",
            path.display()
        );
        let doc = roxmltree::Document::parse(&svg)
            .unwrap_or_else(|e| panic!("{} is not well-formed XML: {e}", path.display()));
        assert_eq!(
            doc.root_element().tag_name().name(),
            "svg",
            "{}",
            path.display()
        );
    }
}
