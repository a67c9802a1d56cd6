//! The audit trail through the real binary, on SQLite and on PostgreSQL: `accounts disable`,
//! `enable`, `remove` and `remove --revoke` (revoked, refused) each leave their row, with who
//! and through what, and `accounts show` prints them, also after the account is removed.

use crate::helpers::{self, TestApp};
use refreshd::sandbox::SandboxConfig;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const WHO: &str = "auditor-test";

async fn cli(config: &Path, args: &[&str]) -> helpers::Out {
    let mut cmd = Command::new(helpers::bin());
    cmd.arg("--config").arg(config).args(args);
    cmd.env("USER", WHO)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    helpers::run_to_end(cmd, None, Duration::from_secs(30)).await
}

/// The config with `store_keys` added to `[store]` and `extra` to the provider.
fn config(app: &TestApp, name: &str, store_keys: &str, extra: &str) -> std::path::PathBuf {
    let p = app.dir.path().join(name);
    let text = helpers::config_toml(&app.db, &app.sandbox.token_url(), extra).replacen(
        "[store]\n",
        &format!("[store]\n{store_keys}\n"),
        1,
    );
    std::fs::write(&p, text).unwrap();
    p
}

/// Imports `subjects` through `accounts import`; their ids, from `accounts list --json`.
async fn import(app: &TestApp, config: &Path, subjects: &[&str]) -> Vec<String> {
    let file = app.dir.path().join("grants.jsonl");
    let text: String = subjects
        .iter()
        .map(|s| app.grant_line(s, None) + "\n")
        .collect();
    std::fs::write(&file, text).unwrap();
    let out = cli(config, &["accounts", "import", file.to_str().unwrap()]).await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    let out = cli(config, &["accounts", "list", "--json"]).await;
    let mut ids = Vec::new();
    for s in subjects {
        let line = out
            .stdout
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json line"))
            .find(|v| v["subject"] == *s)
            .unwrap_or_else(|| panic!("{s} not listed: {out:#?}"));
        ids.push(line["id"].to_string());
    }
    ids
}

/// The audit rows `accounts show ID --json` gives: (action, by, via, detail).
async fn trail(config: &Path, id: &str) -> Vec<(String, String, String, Option<String>)> {
    let out = cli(config, &["accounts", "show", id, "--json"]).await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    v["audit"]
        .as_array()
        .expect("an audit array")
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_string(),
                e["by"].as_str().unwrap().to_string(),
                e["via"].as_str().unwrap().to_string(),
                e["detail"].as_str().map(str::to_string),
            )
        })
        .collect()
}

async fn admin_changes_leave_an_audit_trail_shown_after_removal(app: &TestApp, store_keys: &str) {
    let revoke = format!("revoke_url = {:?}", app.sandbox.revoke_url());
    let good = config(app, "good.toml", store_keys, &revoke);
    let ids = import(app, &good, &["toggled", "refused", "plain"]).await;
    let (toggled, refused, plain) = (&ids[0], &ids[1], &ids[2]);
    let me = format!("{WHO} (uid {})", rustix::process::getuid().as_raw());
    let row = |action: &str, via: &str, detail: Option<&str>| {
        (
            action.to_string(),
            me.clone(),
            via.to_string(),
            detail.map(str::to_string),
        )
    };

    for args in [["disable"], ["disable"], ["enable"]] {
        let out = cli(&good, &["accounts", args[0], toggled]).await;
        assert_eq!(out.code, Some(0), "{out:#?}");
    }
    // The second disable changed nothing and left no row.
    assert_eq!(
        trail(&good, toggled).await,
        [
            row("enabled", "accounts enable", None),
            row("disabled", "accounts disable", None),
        ]
    );
    let out = cli(&good, &["accounts", "show", toggled]).await;
    assert!(
        out.stdout.contains("audit trail (newest first):"),
        "{out:#?}"
    );
    assert!(
        out.stdout
            .contains(&format!("disabled       by {me} via `accounts disable`")),
        "{out:#?}"
    );

    // Revoked, then removed: both rows, and `show` still answers for the removed account.
    let out = cli(&good, &["accounts", "remove", toggled, "--revoke"]).await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    let via = "accounts remove --revoke";
    assert_eq!(
        trail(&good, toggled).await,
        [
            row("removed", via, None),
            row("revoked", via, Some("provider tiktok answered HTTP 200")),
            row("enabled", "accounts enable", None),
            row("disabled", "accounts disable", None),
        ]
    );
    let out = cli(&good, &["accounts", "show", toggled]).await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(
        out.stdout.contains("subject            toggled"),
        "{out:#?}"
    );
    assert!(out.stdout.contains(" removed at "), "{out:#?}");
    assert!(
        out.stdout.contains(&format!("by {me} (`{via}`)")),
        "{out:#?}"
    );
    let out = cli(&good, &["accounts", "show", toggled, "--json"]).await;
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(
        (&v["removed_by"], &v["removed_via"]),
        (&me.clone().into(), &via.into())
    );

    // The provider refuses (a wrong client secret): the account stays, the refusal is kept.
    let wrong = config(app, "wrong.toml", store_keys, &revoke);
    let text = std::fs::read_to_string(&wrong)
        .unwrap()
        .replace(helpers::CLIENT_SECRET, "not-the-secret");
    std::fs::write(&wrong, text).unwrap();
    let out = cli(&wrong, &["accounts", "remove", refused, "--revoke"]).await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    let got = trail(&good, refused).await;
    assert_eq!(got.len(), 1, "{got:?}");
    let (action, by, via, detail) = &got[0];
    assert_eq!(
        (action.as_str(), by, via.as_str()),
        ("revoke_failed", &me, "accounts remove --revoke")
    );
    assert!(
        detail
            .as_deref()
            .is_some_and(|d| d.contains("HTTP 401, error invalid_client")),
        "{detail:?}"
    );

    // A plain removal.
    let out = cli(&good, &["accounts", "remove", plain]).await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert_eq!(
        trail(&good, plain).await,
        [row("removed", "accounts remove", None)]
    );

    // An id never seen is still an error.
    let out = cli(&good, &["accounts", "show", "999"]).await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(out.stderr.contains("no account with id 999"), "{out:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_trail_on_sqlite() {
    let app = TestApp::start(SandboxConfig::default()).await;
    admin_changes_leave_an_audit_trail_shown_after_removal(&app, "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_trail_on_postgres() {
    let Some(url) = crate::postgres::postgres_url("audit::audit_trail_on_postgres").await else {
        return;
    };
    let app = TestApp::start(SandboxConfig::default()).await;
    admin_changes_leave_an_audit_trail_shown_after_removal(&app, &format!("url = {url:?}")).await;
}
