//! The smaller commands: `demo`, shell completions and the manual page, and the JSON output of
//! `check` and `store copy`.

use super::{World, clean_env, output};
use crate::helpers;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Stdio};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_and_prints_summary() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(helpers::bin());
    cmd.args([
        "demo",
        "--accounts",
        "50",
        "--duration",
        "6s",
        "--access-ttl",
        "4s",
    ]);
    clean_env(&mut cmd);
    cmd.current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = output(cmd, None).await;
    let (stdout, stderr) = (&out.stdout, &out.stderr);
    assert_eq!(out.code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("refreshd demo summary"), "{stdout}");
    let row = |name: &str| -> u64 {
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name:?} row: {stdout}"))
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{name}: {e}: {stdout}"))
    };
    assert!(row("refreshes committed (rotations)") > 0, "{stdout}");
    assert_eq!(row("used refresh token presented again"), 0, "{stdout}");
    assert_eq!(row("accounts"), 50, "{stdout}");
    assert!(!Path::new(&dir.path().join("refreshd.db")).exists());
}

/// Shell habits (issue 14): completions and the manual page come from the binary itself.
#[test]
fn completions_and_man_page_are_printed() {
    let run = |args: &[&str]| {
        std::process::Command::new(crate::helpers::bin())
            .args(args)
            .output()
            .expect("run refreshd")
    };
    let bash = run(&["completions", "bash"]);
    assert!(bash.status.success(), "{bash:?}");
    let script = String::from_utf8_lossy(&bash.stdout);
    assert!(script.contains("_refreshd()"), "{script}");
    assert!(
        script.contains("needs_reauth"),
        "--status values complete: {script}"
    );
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        assert!(run(&["completions", shell]).status.success(), "{shell}");
    }
    let man = run(&["man"]);
    assert!(man.status.success(), "{man:?}");
    let page = String::from_utf8_lossy(&man.stdout);
    assert!(
        page.starts_with(".ie") || page.contains(".TH refreshd 1"),
        "{page}"
    );
    assert!(page.contains("accounts"), "{page}");
}

/// A command that reads no config refuses --config instead of ignoring it.
#[test]
fn demo_refuses_a_config_it_would_ignore() {
    let out = std::process::Command::new(crate::helpers::bin())
        .args([
            "--config",
            "/nonexistent/refreshd.toml",
            "demo",
            "--duration",
            "1s",
        ])
        .output()
        .expect("run refreshd");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("reads no config file: drop --config"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_and_store_copy_offer_json() {
    let w = World::start("").await;
    let file = w.write("c.jsonl", &w.due_lines(&["k1", "k2"]));
    w.cli(&["accounts", "import", file.to_str().unwrap()])
        .await
        .ok();
    let out = w.cli(&["check", "--json"]).await;
    out.ok();
    let v: Value = serde_json::from_str(out.stdout.trim()).expect("one JSON object");
    assert_eq!(v["ok"], true, "{v}");
    let checks = v["checks"].as_array().expect("checks");
    assert!(
        checks
            .iter()
            .any(|c| c["check"] == "store" && c["message"].as_str().unwrap().contains("2 accounts")),
        "{v}"
    );
    let copy = w.path("copy.db");
    let out = w
        .cli(&[
            "store",
            "copy",
            "--json",
            "--from",
            w.db.to_str().unwrap(),
            "--to",
            copy.to_str().unwrap(),
        ])
        .await;
    out.ok();
    let v: Value = serde_json::from_str(out.stdout.trim()).expect("one JSON object");
    assert_eq!(v["accounts_copied"], 2, "{v}");
    assert_eq!(v["accounts"], 2, "{v}");
    assert!(
        v["accounts_sha256"].as_str().is_some_and(|s| s.len() == 64),
        "{v}"
    );
}
