//! `refreshd run` as a process: `--once` and its exit code, SIGTERM drains, SIGHUP reloads,
//! and the ops server of the real binary.

use super::{World, events_in, id_of};
use crate::helpers;
use refreshd::sandbox::Faults;
use refreshd::store::Store;
use secrecy::ExposeSecret;
use serde_json::Value;
use std::time::{Duration, Instant};

/// The stored refresh token of every account, by subject.
async fn stored_refresh_tokens(store: &Store, list: &[Value]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for a in list {
        let id = a["id"].as_i64().unwrap();
        let acc = store.get(id).await.unwrap().expect("listed account exists");
        out.push((acc.subject, acc.refresh_token.expose_secret().to_string()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_once_refreshes_due_and_exit_code() {
    let w = World::start("").await;
    let good = ["g1", "g2", "g3", "g4"];
    let mut text = w.due_lines(&good);
    text += &w.due_lines(&["revoked"]);
    w.sandbox.revoke("revoked");
    let f = w.write("accounts.jsonl", &text);
    w.cli(&["accounts", "import", f.to_str().unwrap()])
        .await
        .ok();

    let out = w.cli(&["run", "--once"]).await;
    assert_eq!(out.code, Some(3), "an account newly needs reauth: {out:#?}");
    assert!(
        out.stderr
            .contains("1 account(s) newly need re-authorization"),
        "{out:#?}"
    );
    let done = events_in(
        &out.stderr.lines().map(String::from).collect::<Vec<_>>(),
        "run_once_done",
    );
    assert_eq!(done.len(), 1, "{out:#?}");
    assert_eq!(done[0]["rotated"], 4, "{}", done[0]);
    assert_eq!(done[0]["newly_flagged"], 1, "{}", done[0]);
    let flagged = events_in(
        &out.stderr.lines().map(String::from).collect::<Vec<_>>(),
        "reauth_required",
    );
    assert_eq!(flagged.len(), 1, "{out:#?}");
    let reconnect = format!(
        "refreshd connect tiktok --account {}",
        flagged[0]["account"]
    );
    assert_eq!(
        flagged[0]["reconnect"],
        reconnect.as_str(),
        "{}",
        flagged[0]
    );
    let stats = w.sandbox.stats();
    assert_eq!(stats.refreshed, 4, "{stats:?}");
    assert_eq!(stats.revoked_rejected, 1, "{stats:?}");
    assert_eq!(stats.reuse_rejected, 0, "{stats:?}");

    let list = w.list_json().await;
    let store = w.store().await;
    for (subject, token) in stored_refresh_tokens(&store, &list).await {
        assert_eq!(
            Some(token),
            w.sandbox.current_refresh_token(&subject),
            "{subject} holds the sandbox's current refresh token"
        );
    }
    for g in good {
        let acc = store.get(id_of(&list, g)).await.unwrap().unwrap();
        assert!(
            w.sandbox
                .access_token_valid(g, acc.access_token.expose_secret()),
            "{g} holds a working access token"
        );
    }
    store.close().await;
    for a in &list {
        let want = if a["subject"] == "revoked" {
            "needs_reauth"
        } else {
            "active"
        };
        assert_eq!(a["status"], want, "{a}");
    }
    let revoked = list.iter().find(|a| a["subject"] == "revoked").unwrap();
    assert_eq!(revoked["reauth_reason"], "invalid_grant", "{revoked}");

    let rid = revoked["id"].to_string();
    let out = w.cli(&["accounts", "show", &rid]).await;
    out.ok();
    assert!(
        out.stdout.contains("status             needs_reauth")
            && out
                .stdout
                .contains("reauth reason      invalid_grant (flagged ")
            && out.stdout.contains("Authorization has been revoked")
            && out.stdout.contains(&format!(
                "to re-authorize    refreshd connect tiktok --account {rid}"
            )),
        "{out:#?}"
    );

    // Nothing due, nothing newly flagged: exit 0, and the provider is not asked again.
    let out = w.cli(&["run", "--once"]).await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert_eq!(w.sandbox.stats().requests, 5);

    // A flagged account is not made due without --force; with it, it is tried once more
    // and, still revoked, flagged again: exit 3 again.
    let out = w.cli(&["accounts", "refresh", &rid]).await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(out.stderr.contains("--force"), "{out:#?}");
    let out = w.cli(&["accounts", "refresh", &rid, "--force"]).await;
    out.ok();
    assert!(
        out.stdout
            .contains(&format!("account {rid} (needs_reauth) is due now")),
        "{out:#?}"
    );
    let out = w.cli(&["run", "--once"]).await;
    assert_eq!(out.code, Some(3), "{out:#?}");
    assert_eq!(w.sandbox.stats().requests, 6);
    assert_eq!(w.sandbox.stats().revoked_rejected, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_and_exits_zero() {
    let w = World::start("\n[shutdown]\ngrace = \"10s\"\n").await;
    w.sandbox.set_faults(Faults {
        slow: 1.0,
        slow_delay: Duration::from_millis(500),
        ..Faults::default()
    });
    let names: Vec<String> = (0..50).map(|i| format!("user-{i:02}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    w.import_due("accounts.jsonl", &refs).await;

    let mut d = w.daemon();
    d.wait_event("ready", 10).await;
    let sandbox = &w.sandbox;
    d.wait_until(10, "a request in flight", |_| sandbox.stats().requests > 0)
        .await;
    let signalled = Instant::now();
    d.signal("TERM").await;
    let (code, log, _) = d.finish(Duration::from_secs(10)).await;
    let took = signalled.elapsed();
    let log_text = log.join("\n");
    assert_eq!(code, Some(0), "exit code after SIGTERM; log:\n{log_text}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    for event in ["signal", "stopping", "draining", "stopped"] {
        assert!(
            !events_in(&log, event).is_empty(),
            "no {event:?} event in the log:\n{log_text}"
        );
    }
    assert!(events_in(&log, "drain_timeout").is_empty(), "{log_text}");

    // Nothing lost: an in-flight refresh was recorded, a never-sent one kept its token.
    let stats = w.sandbox.stats();
    assert_eq!(stats.reuse_rejected, 0, "{stats:?}");
    assert!(
        stats.refreshed > 0,
        "in-flight refreshes finished: {stats:?}"
    );
    assert!(
        stats.refreshed < 50,
        "it stopped claiming after SIGTERM: {stats:?}"
    );
    let list = w.list_json().await;
    assert_eq!(list.len(), 50);
    let store = w.store().await;
    let mut rotated = 0;
    for (subject, token) in stored_refresh_tokens(&store, &list).await {
        assert_eq!(
            Some(token),
            w.sandbox.current_refresh_token(&subject),
            "{subject}: the stored refresh token is the sandbox's current one"
        );
        let acc = store.get(id_of(&list, &subject)).await.unwrap().unwrap();
        if acc.generation > 0 {
            rotated += 1;
        }
    }
    store.close().await;
    assert_eq!(
        rotated, stats.refreshed,
        "every rotation the sandbox made is stored"
    );
    for a in &list {
        assert_eq!(a["status"], "active", "{a}");
    }
    let stopped = &events_in(&log, "stopped")[0];
    assert_eq!(stopped["rotated"], stats.refreshed, "{stopped}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_config() {
    let w = World::start("").await;
    // The CLI keeps a valid config of its own while the daemon's file is rewritten.
    let cli_config = w.write(
        "cli.toml",
        &helpers::config_toml(&w.db, &w.sandbox.token_url(), ""),
    );
    w.import_due("one.jsonl", &["before"]).await;

    let mut d = w.daemon();
    d.wait_event("ready", 10).await;
    let sandbox = &w.sandbox;
    d.wait_until(10, "the first refresh", |_| sandbox.stats().refreshed == 1)
        .await;

    // Nothing changed: reloaded, but nothing to apply.
    d.signal("HUP").await;
    d.wait_event("config_reloaded", 10).await;
    assert_eq!(d.events("config_reloaded")[0]["changed"], "");

    std::fs::write(&w.config, w.config_with("lead = \"10m\"", "lead = \"5m\"")).unwrap();
    d.signal("HUP").await;
    d.wait_until(10, "a second config_reloaded", |d| {
        d.events("config_reloaded").len() >= 2
    })
    .await;
    let reloaded = d.events("config_reloaded").remove(1);
    let changed = reloaded["changed"].as_str().expect("changed");
    assert!(
        changed.split(',').any(|c| c == "refresh"),
        "changed = {changed:?}"
    );
    assert!(!changed.contains("providers"), "changed = {changed:?}");

    // An invalid config is rejected; the daemon keeps running on the old one.
    std::fs::write(&w.config, w.config_with("lead = \"10m\"", "leed = \"5m\"")).unwrap();
    d.signal("HUP").await;
    let rejected = d.wait_event("reload_rejected", 10).await;
    assert!(
        rejected["error"]
            .as_str()
            .is_some_and(|e| e.contains("refresh.leed")),
        "{rejected}"
    );
    assert_eq!(rejected["level"], "ERROR", "{rejected}");
    assert!(d.running(), "the daemon stopped on a bad reload");

    // ... and keeps working: a newly imported due account is refreshed.
    let f = w.write("two.jsonl", &w.due_lines(&["after"]));
    let out = w
        .cli(&[
            "--config",
            cli_config.to_str().unwrap(),
            "accounts",
            "import",
            f.to_str().unwrap(),
        ])
        .await;
    out.ok();
    d.wait_until(10, "the refresh after the rejected reload", |_| {
        sandbox.stats().refreshed == 2
    })
    .await;
    assert!(d.running());

    d.signal("TERM").await;
    let (code, log, _) = d.finish(Duration::from_secs(10)).await;
    assert_eq!(code, Some(0), "log:\n{}", log.join("\n"));
    assert!(!events_in(&log, "stopped").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_server_of_the_real_binary() {
    let secret = "an-api-secret-of-32-characters!!";
    let w = World::start("").await;
    let token_file = w.write("api-token", secret);
    w.write(
        "refreshd.toml",
        &helpers::config_toml(
            &w.db,
            &w.sandbox.token_url(),
            &format!(
                "\n[server]\nlisten = \"127.0.0.1:0\"\napi_token_file = {:?}\n",
                token_file.display().to_string()
            ),
        ),
    );
    w.import_due("accounts.jsonl", &["o1", "o2"]).await;
    let mut d = w.daemon();
    let listening = d.wait_event("server_listening", 10).await;
    let addr = listening["addr"].as_str().expect("addr").to_string();
    d.wait_event("ready", 10).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let get = |path: &str, bearer: Option<&str>| {
        let mut req = http.get(format!("http://{addr}{path}"));
        if let Some(b) = bearer {
            req = req.bearer_auth(b);
        }
        async move {
            let r = req.send().await.expect("request");
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    assert_eq!(get("/healthz", None).await.0, 200);
    let sandbox = &w.sandbox;
    d.wait_until(10, "both refreshed", |_| sandbox.stats().refreshed == 2)
        .await;
    let mut rotated = false;
    for _ in 0..250 {
        let (_, metrics) = get("/metrics", None).await;
        if metrics.contains(r#"refreshd_refreshes_total{provider="tiktok",outcome="rotated"} 2"#) {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(rotated, "{}", get("/metrics", None).await.1);
    assert_eq!(get("/readyz", None).await, (200, "ready\n".to_string()));

    let list = w.list_json().await;
    let id = id_of(&list, "o1");
    let path = format!("/v1/accounts/{id}/token");
    assert_eq!(get(&path, None).await.0, 401);
    assert_eq!(
        get(&path, Some("an-api-secret-of-32-characters!?")).await.0,
        401
    );
    let (status, body) = get(&path, Some(secret)).await;
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    let store = w.store().await;
    let stored = store.get(id).await.unwrap().unwrap();
    store.close().await;
    assert_eq!(body["access_token"], stored.access_token.expose_secret());

    d.signal("TERM").await;
    let (code, log, stdout) = d.finish(Duration::from_secs(10)).await;
    assert_eq!(code, Some(0));
    let all = format!("{}\n{}", log.join("\n"), stdout.join("\n"));
    assert!(
        !all.contains(stored.access_token.expose_secret()),
        "a token in the log"
    );
    assert!(!all.contains(secret), "the API secret in the log");
    assert_eq!(events_in(&log, "token_api_unauthorized").len(), 2);
    assert_eq!(events_in(&log, "token_handed_out").len(), 1);
}
