//! No secret in any output of the binary: stdout, stderr and logs of every command, and config
//! errors on a secret's line.

use super::{DUE, World};
use crate::helpers::{self, CLIENT_SECRET};
use refreshd::sandbox::Faults;
use secrecy::ExposeSecret;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_secret_in_any_output() {
    let mut w = World::start("").await;
    // Everything at trace level, the CLI's quiet commands too.
    w.env.push(("RUST_LOG".into(), "trace".into()));
    // Tokens sealed at rest: the key must never be printed either.
    let key = w.path("token.key");
    refreshd::crypto::generate_key_file(&key).unwrap();
    let with_key = w.config_with(
        "[store]\n",
        &format!(
            "[store]\nencryption_key_file = {:?}\n",
            key.display().to_string()
        ),
    );
    std::fs::write(&w.config, &with_key).unwrap();
    let subjects_all = ["s1", "s2", "s3", "s4", "s5", "gone"];
    w.import_due("accounts.jsonl", &subjects_all[..4]).await;
    w.cli_stdin(
        &["accounts", "import", "-"],
        &w.due_lines(&subjects_all[4..]),
    )
    .await
    .ok();
    // Rejected lines holding real tokens: every way a line can be wrong.
    let bad = [
        w.grant("x1", DUE, None)
            .to_string()
            .replace("\"provider\":\"tiktok\"", "\"provider\":\"nope\""),
        {
            let mut g = w.grant("x2", DUE, None);
            g["expires_in"] = g["refresh_token"].clone();
            g.to_string()
        },
        {
            let mut g = w.grant("x3", DUE, None);
            g["scopes"] = g["access_token"].clone();
            g.to_string()
        },
        {
            let s = w.grant("x4", DUE, None).to_string();
            s[..s.len() - 40].to_string()
        },
        {
            let mut g = w.grant("x5", DUE, None);
            g["refresh_token"] = serde_json::json!([g["refresh_token"].clone()]);
            g.to_string()
        },
        w.due_lines(&["x6"]).trim().to_string(),
    ]
    .join("\n");
    let badf = w.write("bad.jsonl", &bad);
    let out = w.cli(&["accounts", "import", badf.to_str().unwrap()]).await;
    assert_eq!(out.code, Some(1), "{out:#?}");

    let list = w.list_json().await;
    let ids: Vec<String> = list.iter().map(|a| a["id"].to_string()).collect();
    w.cli(&["check"]).await.ok();

    // All 5xx first (transient failures logged), then successes and a revoked grant.
    w.sandbox.revoke("gone");
    w.sandbox.set_faults(Faults {
        server_error: 1.0,
        ..Faults::default()
    });
    let out = w.cli(&["run", "--once"]).await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert_eq!(w.sandbox.stats().faults_injected, 6);
    w.sandbox.set_faults(Faults::default());
    for id in &ids {
        w.cli(&["accounts", "refresh", id]).await.ok();
    }
    let out = w.cli(&["run", "--once"]).await;
    assert_eq!(out.code, Some(3), "{out:#?}");
    assert_eq!(w.sandbox.stats().refreshed, 5, "{}", out.stderr);

    // The daemon, with a few more due accounts, stopped by SIGTERM.
    w.import_due("more.jsonl", &["d1", "d2", "d3"]).await;
    let mut d = w.daemon();
    let sandbox = &w.sandbox;
    d.wait_until(10, "three more refreshes", |_| {
        sandbox.stats().refreshed == 8
    })
    .await;
    // A reload (SIGHUP) that changes a logged setting.
    std::fs::write(
        &w.config,
        with_key.replace("jitter = \"0s\"", "jitter = \"1s\""),
    )
    .unwrap();
    d.signal("HUP").await;
    d.wait_event("config_reloaded", 10).await;
    d.signal("TERM").await;
    let (code, log, stdout) = d.finish(Duration::from_secs(10)).await;
    assert_eq!(code, Some(0));
    {
        let mut t = w.transcript.lock().unwrap();
        t.push_str(&log.join("\n"));
        t.push_str(&stdout.join("\n"));
    }

    // The configuration-error class: the provider refuses our client credentials.
    let wrong_secret = "wrong-client-SECRET-0123456789";
    let bad_client = w.write(
        "bad-client.toml",
        &with_key.replace(CLIENT_SECRET, wrong_secret),
    );
    for a in w.list_json().await {
        if a["status"] == "active" {
            w.cli(&["accounts", "refresh", &a["id"].to_string()])
                .await
                .ok();
        }
    }
    let out = w
        .cli(&["--config", bad_client.to_str().unwrap(), "run", "--once"])
        .await;
    assert_eq!(out.code, Some(0), "{out:#?}");

    // Show and list after all that (last_error, refresh_log filled in).
    w.cli(&["accounts", "list"]).await.ok();
    w.cli(&["accounts", "list", "--needs-reauth"]).await.ok();
    let list = w.list_json().await;
    for a in &list {
        let id = a["id"].to_string();
        w.cli(&["accounts", "show", &id]).await.ok();
        w.cli(&["accounts", "show", &id, "--json"]).await.ok();
    }

    // Every secret the test knows of.
    let mut secrets: Vec<String> = w.issued.lock().unwrap().clone();
    secrets.push(CLIENT_SECRET.to_string());
    secrets.push(wrong_secret.to_string());
    secrets.push(std::fs::read_to_string(&key).unwrap().trim().to_string());
    let store = w.store_with_key(&key).await;
    for a in &list {
        let acc = store.get(a["id"].as_i64().unwrap()).await.unwrap().unwrap();
        secrets.push(acc.access_token.expose_secret().to_string());
        secrets.push(acc.refresh_token.expose_secret().to_string());
        if let Some(t) = w.sandbox.current_refresh_token(&acc.subject) {
            secrets.push(t);
        }
    }
    store.close().await;
    secrets.sort();
    secrets.dedup();
    assert!(secrets.len() > 30, "{} secrets", secrets.len());

    let transcript = w.transcript.lock().unwrap().clone();
    // The transcript really holds the interesting log lines, at trace level.
    for needle in [
        "\"event\":\"refresh\"",
        "\"outcome\":\"transient\"",
        "\"outcome\":\"rotated\"",
        "\"event\":\"reauth_required\"",
        "\"event\":\"config_reloaded\"",
        "invalid_client",
        "invalid_grant",
        "\"level\":\"TRACE\"",
        "not a valid import record",
        "config: ok",
    ] {
        assert!(transcript.contains(needle), "{needle} not in the output");
    }
    for s in &secrets {
        if let Some(at) = transcript.find(s.as_str()) {
            let from = transcript[..at].rfind('\n').map_or(0, |i| i + 1);
            let to = transcript[at..]
                .find('\n')
                .map_or(transcript.len(), |i| at + i);
            panic!(
                "a secret ({}…) was printed:\n{}",
                &s[..8.min(s.len())],
                &transcript[from..to]
            );
        }
    }
}

/// A mistake on the secret's line of the config (a missing quote, a secret that looks like
/// a number) must be reported by key and line without echoing the value: stderr and the JSON
/// logs of a rejected SIGHUP reload end up in journald and log pipelines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_errors_never_echo_a_secret() {
    let w = World::start("").await;
    let secret_line = format!("client_secret = \"{CLIENT_SECRET}\"");
    let mut leaks = Vec::new();
    let mut check = |what: &str, secret: &str, output: &str| {
        if output.contains(secret) {
            leaks.push(format!("{what}:\n{output}"));
        }
    };

    // A missing closing quote: a TOML syntax error on the secret's line.
    let cfg = w.write(
        "unterminated.toml",
        &w.config_with(&secret_line, &format!("client_secret = \"{CLIENT_SECRET}")),
    );
    for cmd in [&["check"][..], &["run", "--once"][..]] {
        let mut args = vec!["--config", cfg.to_str().unwrap()];
        args.extend_from_slice(cmd);
        let out = w.cli(&args).await;
        assert_eq!(out.code, Some(78), "{out:#?}");
        assert!(out.all().contains("line "), "still says where: {out:#?}");
        check(&format!("syntax error, {cmd:?}"), CLIENT_SECRET, &out.all());
    }

    // A secret of digits, unquoted in the file or through the environment.
    let digits = "918273645501";
    let cfg = w.write(
        "number.toml",
        &w.config_with(&secret_line, &format!("client_secret = {digits}")),
    );
    let out = w.cli(&["--config", cfg.to_str().unwrap(), "check"]).await;
    assert_eq!(out.code, Some(78), "{out:#?}");
    assert!(
        out.all().contains("providers.tiktok.client_secret"),
        "{out:#?}"
    );
    check("unquoted number in the file", digits, &out.all());
    let out = w
        .cli_env(
            &["run", "--once"],
            &[("REFRESHD_PROVIDERS__TIKTOK__CLIENT_SECRET", digits)],
        )
        .await;
    check("digits through the environment", digits, &out.all());

    // The same typo picked up by a SIGHUP reload goes into the daemon's JSON log.
    // `run` starts on an existing store only (docs/src/durability.md).
    helpers::open_store(&w.db, Duration::from_secs(5))
        .await
        .close()
        .await;
    let mut d = w.daemon();
    d.wait_event("ready", 10).await;
    std::fs::write(
        &w.config,
        w.config_with(&secret_line, &format!("client_secret = \"{CLIENT_SECRET}")),
    )
    .unwrap();
    d.signal("HUP").await;
    let rejected = d.wait_event("reload_rejected", 10).await;
    check(
        "reload_rejected event",
        CLIENT_SECRET,
        &rejected.to_string(),
    );
    d.signal("TERM").await;
    let (code, log, _) = d.finish(Duration::from_secs(10)).await;
    assert_eq!(code, Some(0));
    check("daemon log", CLIENT_SECRET, &log.join("\n"));

    assert!(
        leaks.is_empty(),
        "{} output(s) echo a secret:\n\n{}",
        leaks.len(),
        leaks.join("\n\n")
    );
}
