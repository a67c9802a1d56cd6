//! `accounts import` announces only the flags it makes: a re-import of an account that was
//! already flagged (same status) says nothing again; a re-import that flags an account that
//! was fine, or moves it from expiring to ended, is announced.

use crate::helpers::{self, TestApp};
use refreshd::clock::Clock;
use refreshd::sandbox::SandboxConfig;
use std::process::Command;
use std::time::Duration;

const DAY: u64 = 86_400;

async fn import(
    app: &TestApp,
    config: &std::path::Path,
    lines: &str,
) -> (helpers::Out, Vec<String>) {
    let file = app.dir.path().join("accounts.jsonl");
    std::fs::write(&file, lines).unwrap();
    let mut cmd = Command::new(helpers::bin());
    cmd.arg("--config")
        .arg(config)
        .args(["accounts", "import", file.to_str().unwrap()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let out = helpers::run_to_end(cmd, None, Duration::from_secs(30)).await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    // The subjects announced by `reauth_required`, sorted.
    let mut announced: Vec<String> = out
        .stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "reauth_required")
        .map(|v| v["subject"].as_str().unwrap_or_default().to_string())
        .collect();
    announced.sort();
    (out, announced)
}

#[tokio::test]
async fn a_reimport_announces_only_the_flags_it_makes() {
    let app = TestApp::start(SandboxConfig::default()).await;
    // The import command runs on the system clock: grants are made at its time.
    app.clock.set(Clock::system().now());
    let config = app.config_path("");
    let ending = app.grant_line("ending", Some(Duration::from_secs(2 * DAY)));
    let fine = app.grant_line("fine", None);

    let (out, announced) = import(&app, &config, &format!("{ending}\n{fine}\n")).await;
    assert_eq!(announced, ["ending"], "{out:#?}");
    assert!(
        out.stderr
            .contains("1 imported account(s) already need re-authorization"),
        "{out:#?}"
    );

    // The same file again: "ending" was already flagged expiring, nothing is new.
    let (out, announced) = import(&app, &config, &format!("{ending}\n{fine}\n")).await;
    assert!(announced.is_empty(), "announced again: {out:#?}");
    assert!(
        !out.stderr.contains("already need re-authorization"),
        "{out:#?}"
    );

    // "fine" re-granted with a short refresh token: a new flag, announced; "ending" still not.
    let fine_now_ending = app.grant_line("fine", Some(Duration::from_secs(2 * DAY)));
    let (out, announced) = import(&app, &config, &format!("{ending}\n{fine_now_ending}\n")).await;
    assert_eq!(announced, ["fine"], "{out:#?}");
}
