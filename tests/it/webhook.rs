//! Webhook notifications: a wiremock receiver on loopback gets one signed event per state
//! change (the daemon with the sandbox on the manual clock, the import command, or events
//! emitted directly), retried after a 5xx, never a token, never a plain rotation; with web
//! connect the reconnect link; a failing account's recovery; no flag announced twice.

use crate::helpers::{self, TestApp};
use refreshd::clock::Clock;
use refreshd::config::{Config, WebhookConfig};
use refreshd::events::{Event, Events};
use refreshd::lifecycle::{self, RunOptions};
use refreshd::model::Status;
use refreshd::notify;
use refreshd::sandbox::SandboxConfig;
use secrecy::ExposeSecret;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

const SECRET: &str = "whsec-test-SECRET";

/// Checks the signature the way the README tells a receiver to; returns the parsed body.
fn verified(r: &Request) -> serde_json::Value {
    let header = |n: &str| {
        r.headers
            .get(n)
            .unwrap_or_else(|| panic!("missing header {n}"))
            .to_str()
            .unwrap()
            .to_string()
    };
    let ts = header("x-refreshd-timestamp");
    let sig = header("x-refreshd-signature");
    let hex = sig.strip_prefix("sha256=").expect("sha256= prefix");
    let signed = [ts.as_bytes(), b".", &r.body].concat();
    let want = crate::helpers::hmac_sha256_hex(SECRET, &signed);
    assert_eq!(hex, want, "signature does not verify");
    assert_eq!(header("content-type"), "application/json");
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(header("x-refreshd-event"), body["event"].as_str().unwrap());
    assert_eq!(header("x-refreshd-delivery"), body["id"].as_str().unwrap());
    body
}

fn webhook_toml(server: &MockServer, secret_file: &std::path::Path) -> String {
    format!(
        r#"
[notify.webhook]
url = "{}/hook"
secret_file = {secret_file:?}
timeout = "2s"
retries = 3
backoff_base = "10ms"
backoff_max = "40ms"
"#,
        server.uri()
    )
}

#[tokio::test]
async fn daemon_sends_one_signed_event_per_state_change_and_retries_after_500() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/hook"))
        .respond_with(ResponseTemplate::new(500))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/hook"))
        .respond_with(ResponseTemplate::new(204))
        .mount(&server)
        .await;
    let secret_file = app.dir.path().join("webhook-secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let config = app.config(&webhook_toml(&server, &secret_file));
    let store = app.store().await;
    let ids = app.import(&store, &config, &["u1", "gone"], None).await;
    let (u1, gone) = (ids[0], ids[1]);
    app.sandbox.revoke("gone");

    let shutdown = CancellationToken::new();
    let daemon = {
        let (config, clock, s) = (config.clone(), app.clock.clone(), shutdown.clone());
        tokio::spawn(async move { lifecycle::run(config, RunOptions::new(clock), s).await })
    };
    let mut due = i64::MIN;
    for &id in &ids {
        due = due.max(store.get(id).await.unwrap().unwrap().next_refresh_at);
    }
    app.clock.set(due);
    let (s, srv) = (&store, &server);
    let done = helpers::eventually(5, || async move {
        s.get(gone).await.unwrap().unwrap().status == Status::NeedsReauth
            && s.get(u1).await.unwrap().unwrap().generation > 0
            && srv.received_requests().await.unwrap_or_default().len() >= 2
    })
    .await;
    assert!(done, "account not flagged or webhook not retried");
    // Another pass of the loop and a sweep must not announce the same state again.
    app.clock.advance(Duration::from_secs(60));
    shutdown.cancel();
    daemon.await.unwrap().expect("daemon run");

    let requests = server.received_requests().await.unwrap();
    assert_eq!(
        requests.len(),
        2,
        "one 500 and one retry, no other event: {:?}",
        requests
            .iter()
            .map(|r| String::from_utf8_lossy(&r.body).into_owned())
            .collect::<Vec<_>>()
    );
    let (first, retry) = (verified(&requests[0]), verified(&requests[1]));
    assert_eq!(first, retry, "a retry sends the same event (same id)");
    assert_eq!(first["event"], "reauth_required");
    assert_eq!(first["account_id"], gone);
    assert_eq!(first["provider"], "tiktok");
    assert_eq!(first["subject"], "gone");
    assert_eq!(first["label"], "label of gone");
    assert_eq!(first["reason"], "invalid_grant");
    assert_eq!(
        first["reconnect"],
        format!("refreshd connect tiktok --account {gone}")
    );
    assert!(first["occurred_at"].is_string());
    assert!(
        first.get("reconnect_url").is_none(),
        "no reconnect_url without web connect: {first}"
    );

    // No token of any account, and not the signing secret, in what was sent.
    let sent: String = requests
        .iter()
        .map(|r| format!("{:?}{}", r.headers, String::from_utf8_lossy(&r.body)))
        .collect();
    for id in ids {
        let a = store.get(id).await.unwrap().unwrap();
        assert!(!sent.contains(a.access_token.expose_secret()));
        assert!(!sent.contains(a.refresh_token.expose_secret()));
    }
    assert!(!sent.contains("act.") && !sent.contains("rft."), "{sent}");
    assert!(!sent.contains(SECRET));
}

fn webhook_config(server: &MockServer, retries: u32) -> Config {
    let toml = format!(
        "[notify.webhook]\nurl = \"{}/hook\"\nsecret = \"{SECRET}\"\nretries = {retries}\nbackoff_base = \"10ms\"\nbackoff_max = \"20ms\"\ntimeout = \"2s\"\n",
        server.uri()
    );
    Config::from_toml_str(&toml).expect("webhook config")
}

fn webhook_mut(config: &mut Config) -> &mut WebhookConfig {
    config.notify.webhook.as_mut().expect("a webhook")
}

#[tokio::test]
async fn each_kind_of_state_change_is_notified_in_order_and_rotations_are_not() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    let events = Events::default();
    let handle = notify::spawn(
        &webhook_config(&server, 0),
        &events,
        Clock::manual(helpers::T0),
        CancellationToken::new(),
        Duration::from_secs(5),
    );
    events.emit(Event::ProviderRejected {
        provider: "tiktok".into(),
        error: "invalid_client".into(),
    });
    events.emit(Event::TokensChanged {
        account_id: 1,
        provider: "tiktok".into(),
        subject: "u".into(),
    });
    events.emit(Event::ProviderRecovered {
        provider: "tiktok".into(),
    });
    events.emit(Event::Recovered {
        account_id: 1,
        provider: "tiktok".into(),
        subject: "u".into(),
    });
    handle.stop().await; // delivers what is queued
    let bodies: Vec<serde_json::Value> = server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .map(verified)
        .collect();
    let kinds: Vec<&str> = bodies
        .iter()
        .map(|b| b["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "provider_rejected",
            "provider_recovered",
            "account_recovered"
        ]
    );
    assert_eq!(bodies[0]["error"], "invalid_client");
    assert_eq!(bodies[0]["occurred_at"], "2026-11-25T00:00:00Z");
    assert_eq!(bodies[2]["account_id"], 1);
}

#[tokio::test]
async fn a_client_error_is_not_retried_and_shutdown_gives_up_on_a_dead_receiver() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(401))
        .mount(&server)
        .await;
    let events = Events::default();
    let handle = notify::spawn(
        &webhook_config(&server, 5),
        &events,
        Clock::manual(helpers::T0),
        CancellationToken::new(),
        Duration::from_secs(5),
    );
    events.emit(Event::ProviderRecovered {
        provider: "tiktok".into(),
    });
    handle.stop().await;
    assert_eq!(server.received_requests().await.unwrap().len(), 1);

    // A receiver that always fails: stop returns after the grace, not after all retries.
    let dead = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&dead)
        .await;
    let mut config = webhook_config(&dead, 1000);
    webhook_mut(&mut config).backoff_base = Duration::from_secs(3600);
    webhook_mut(&mut config).backoff_max = Duration::from_secs(3600);
    let shutdown = CancellationToken::new();
    let handle = notify::spawn(
        &config,
        &events,
        Clock::manual(helpers::T0),
        shutdown.clone(),
        Duration::from_millis(100),
    );
    events.emit(Event::ProviderRecovered {
        provider: "tiktok".into(),
    });
    let d = &dead;
    assert!(
        helpers::eventually(5, || async move {
            !d.received_requests().await.unwrap_or_default().is_empty()
        })
        .await
    );
    shutdown.cancel();
    let started = std::time::Instant::now();
    handle.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "stop waited out the retries"
    );
}

/// Web connect served by the daemon at `https://refreshd.example` (the provider's
/// `redirect_uri` is its callback), and a webhook to `server` retried quickly.
fn web_connect_and_webhook(server: &MockServer, secret_file: &std::path::Path) -> String {
    format!(
        "redirect_uri = \"https://refreshd.example/connect/tiktok/callback\"\n\n[server]\nlisten = \"127.0.0.1:0\"\n\n[connect]\nenabled = true\n{}",
        webhook_toml(server, secret_file)
    )
}

/// A receiver that accepts everything.
async fn receiver() -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/hook"))
        .respond_with(ResponseTemplate::new(204))
        .mount(&server)
        .await;
    server
}

async fn bodies(server: &MockServer) -> Vec<serde_json::Value> {
    server
        .received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .map(verified)
        .collect()
}

/// The daemon on `config` and the app's manual clock, until `shutdown`.
fn daemon(
    app: &TestApp,
    config: &Config,
    shutdown: &CancellationToken,
) -> tokio::task::JoinHandle<Result<lifecycle::RunReport, lifecycle::DaemonError>> {
    let (config, clock, s) = (config.clone(), app.clock.clone(), shutdown.clone());
    tokio::spawn(async move { lifecycle::run(config, RunOptions::new(clock), s).await })
}

/// The real binary with `args` on the config file `config`, REFRESHD_* of the test's own
/// environment left out; JSON logs on stderr.
async fn refreshd_cli(config: &std::path::Path, args: &[&str]) -> helpers::Out {
    let mut cmd = std::process::Command::new(helpers::bin());
    cmd.arg("--config").arg(config).args(args);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("REFRESHD_") || k == "RUST_LOG" {
            cmd.env_remove(&k);
        }
    }
    cmd.env("REFRESHD_LOG__FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    helpers::run_to_end(cmd, None, Duration::from_secs(60)).await
}

#[tokio::test]
async fn reauth_webhook_has_the_reconnect_url_and_a_forced_retry_rejected_again_is_not_announced_twice()
 {
    let app = TestApp::start(SandboxConfig::default()).await;
    let server = receiver().await;
    let secret_file = app.dir.path().join("webhook-secret");
    std::fs::write(&secret_file, SECRET).unwrap();
    let extra = web_connect_and_webhook(&server, &secret_file);
    let (config, config_file) = (app.config(&extra), app.config_path(&extra));
    let store = app.store().await;
    let gone = app.import(&store, &config, &["gone"], None).await[0];
    app.sandbox.revoke("gone");

    let shutdown = CancellationToken::new();
    let run = daemon(&app, &config, &shutdown);
    app.clock
        .set(store.get(gone).await.unwrap().unwrap().next_refresh_at);
    let (s, srv) = (&store, &server);
    assert!(
        helpers::eventually(5, || async move {
            s.get(gone).await.unwrap().unwrap().status == Status::NeedsReauth
                && !srv.received_requests().await.unwrap_or_default().is_empty()
        })
        .await,
        "account not flagged or not notified"
    );
    let first = bodies(&server).await;
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(first[0]["event"], "reauth_required");
    assert_eq!(
        first[0]["reconnect_url"],
        format!("https://refreshd.example/connect/tiktok/start?account={gone}")
    );

    // `accounts refresh --force` (another process, on the system clock): the daemon tries
    // once more when the manual clock reaches that time; the provider rejects it again.
    let out = refreshd_cli(
        &config_file,
        &["accounts", "refresh", &gone.to_string(), "--force"],
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    let forced = store.get(gone).await.unwrap().unwrap();
    assert_eq!(forced.status, Status::Active);
    app.clock
        .set(forced.next_refresh_at.max(app.clock.now()) + 1);
    let sandbox = &app.sandbox;
    assert!(
        helpers::eventually(5, || async move {
            sandbox.stats().revoked_rejected == 2
                && s.get(gone).await.unwrap().unwrap().status == Status::NeedsReauth
        })
        .await,
        "the forced refresh was not tried and rejected"
    );
    // Time for a second webhook to arrive, were one sent.
    tokio::time::sleep(Duration::from_millis(300)).await;
    shutdown.cancel();
    run.await.unwrap().expect("daemon run");
    let all = bodies(&server).await;
    assert_eq!(all.len(), 1, "a second reauth_required was sent: {all:?}");
    let again = store.get(gone).await.unwrap().unwrap();
    assert_eq!(
        again.reauth_reason,
        Some(refreshd::model::ReauthReason::InvalidGrant)
    );
}

#[tokio::test]
async fn account_recovered_after_a_failing_stretch_and_a_forced_refresh_not_after_a_blip() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let server = receiver().await;
    let secret_file = app.dir.path().join("webhook-secret");
    std::fs::write(&secret_file, SECRET).unwrap();
    let config = app.config(&webhook_toml(&server, &secret_file));
    let store = app.store().await;
    let failing = app.import(&store, &config, &["failing"], None).await[0];
    // Flagged by mistake (its token still works): only a forced refresh tries it.
    let text = app.grant_line("flagged", None);
    let mut records = refreshd::import::parse_with(
        "test",
        &text,
        app.clock.now(),
        &config.refresh.timing(),
        config.reauth.window,
        |p| config.credential_of(p),
    )
    .unwrap();
    records[0].status = Status::NeedsReauth;
    records[0].reauth_reason = Some(refreshd::model::ReauthReason::InvalidGrant);
    let flagged = store.upsert(records, app.clock.now()).await.unwrap()[0].0;
    let generation = store.get(flagged).await.unwrap().unwrap().generation;
    // Imported 30 minutes later: it fails once, after "failing" has begun to, and its
    // retry works long before its access token ends: a blip, not announced.
    app.clock.advance(Duration::from_secs(1800));
    let blip = app.import(&store, &config, &["blip"], None).await[0];

    app.sandbox.set_faults(refreshd::sandbox::Faults {
        server_error: 1.0,
        ..Default::default()
    });
    let shutdown = CancellationToken::new();
    let run = daemon(&app, &config, &shutdown);
    app.clock
        .set(store.get(failing).await.unwrap().unwrap().next_refresh_at);
    let s = &store;
    assert!(
        helpers::eventually(5, || async move {
            s.get(failing).await.unwrap().unwrap().failures >= 1
        })
        .await,
        "no transient failure"
    );
    app.clock
        .set(store.get(blip).await.unwrap().unwrap().next_refresh_at);
    assert!(
        helpers::eventually(5, || async move {
            s.get(blip).await.unwrap().unwrap().failures == 1
        })
        .await,
        "no blip"
    );
    app.sandbox.set_faults(Default::default());
    // The blip's retry (one backoff_base at most) comes before its access token ends.
    app.clock.advance(Duration::from_secs(60));
    assert!(
        helpers::eventually(5, || async move {
            s.get(blip).await.unwrap().unwrap().failures == 0
        })
        .await,
        "the blip was not retried"
    );
    store
        .mark_due(flagged, app.clock.now(), true)
        .await
        .unwrap();
    // Past the failing account's backoff (at most backoff_max): its token ended meanwhile.
    app.clock.advance(Duration::from_secs(3600));
    let srv = &server;
    assert!(
        helpers::eventually(5, || async move {
            s.get(failing).await.unwrap().unwrap().failures == 0
                && s.get(flagged).await.unwrap().unwrap().generation > generation
                && srv.received_requests().await.unwrap_or_default().len() >= 2
        })
        .await,
        "not both refreshed and notified"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    shutdown.cancel();
    run.await.unwrap().expect("daemon run");

    let mut got: Vec<(String, i64)> = bodies(&server)
        .await
        .iter()
        .map(|b| {
            (
                b["event"].as_str().unwrap().to_string(),
                b["account_id"].as_i64().unwrap(),
            )
        })
        .collect();
    got.sort();
    let mut want = vec![
        ("account_recovered".to_string(), failing),
        ("account_recovered".to_string(), flagged),
    ];
    want.sort();
    assert_eq!(got, want);
    let fixed = store.get(flagged).await.unwrap().unwrap();
    assert_eq!((fixed.status, fixed.reauth_reason), (Status::Active, None));
}

#[tokio::test]
async fn accounts_flagged_at_import_are_announced_once_by_event_webhook_and_metric() {
    let app = TestApp::start(SandboxConfig::default()).await;
    // The import command runs on the system clock: grants are made at its time.
    let now = Clock::system().now();
    app.clock.set(now);
    let server = receiver().await;
    let secret_file = app.dir.path().join("webhook-secret");
    std::fs::write(&secret_file, SECRET).unwrap();
    let extra = web_connect_and_webhook(&server, &secret_file);
    let (config, config_file) = (app.config(&extra), app.config_path(&extra));
    let day = Duration::from_secs(86_400);
    let mut ended: serde_json::Value =
        serde_json::from_str(&app.grant_line("ended", Some(day))).unwrap();
    ended["obtained_at"] = (now - 2 * 86_400).into();
    let lines = format!(
        "{ended}\n{}\n{}\n",
        app.grant_line("ending", Some(2 * day)),
        app.grant_line("fine", None)
    );
    let file = app.dir.path().join("accounts.jsonl");
    std::fs::write(&file, lines).unwrap();

    let out = refreshd_cli(
        &config_file,
        &["accounts", "import", file.to_str().unwrap()],
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(
        out.stderr
            .contains("2 imported account(s) already need re-authorization"),
        "{out:#?}"
    );
    let store = app.store().await;
    let id_of = async |subject: &str| store.find("tiktok", subject).await.unwrap().unwrap().id;
    let (ended_id, ending_id) = (id_of("ended").await, id_of("ending").await);

    // The log event, with the reconnect URL.
    let logged: Vec<serde_json::Value> = out
        .stderr
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| v["event"] == "reauth_required")
        .collect();
    assert_eq!(logged.len(), 2, "{}", out.stderr);
    assert!(
        logged.iter().all(|v| v["reconnect_url"]
            .as_str()
            .is_some_and(|u| u.starts_with("https://refreshd.example/connect/tiktok/start"))),
        "{logged:?}"
    );

    // The webhook, sent by the import command itself.
    let mut hooks: Vec<(i64, String, String)> = bodies(&server)
        .await
        .iter()
        .map(|b| {
            assert_eq!(b["event"], "reauth_required");
            (
                b["account_id"].as_i64().unwrap(),
                b["reason"].as_str().unwrap().to_string(),
                b["reconnect_url"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    hooks.sort();
    let url = |id: i64| format!("https://refreshd.example/connect/tiktok/start?account={id}");
    let mut want = vec![
        (ended_id, "refresh_token_expired".to_string(), url(ended_id)),
        (
            ending_id,
            "refresh_token_expiring".to_string(),
            url(ending_id),
        ),
    ];
    want.sort();
    assert_eq!(hooks, want);

    // The metric, as /metrics serves it.
    let metrics = std::sync::Arc::new(refreshd::metrics::Metrics::new());
    let text = metrics.render(&store, now, now).await.unwrap();
    for reason in ["refresh_token_expired", "refresh_token_expiring"] {
        let line = format!(
            "refreshd_accounts_needing_reauth{{provider=\"tiktok\",reason=\"{reason}\"}} 1"
        );
        assert!(text.contains(&line), "{line} not in\n{text}");
    }

    // Once: the daemon refreshing the flagged account it can still refresh announces nothing.
    let shutdown = CancellationToken::new();
    let run = daemon(&app, &config, &shutdown);
    let before = store.get(ending_id).await.unwrap().unwrap().generation;
    app.clock
        .set(store.get(ending_id).await.unwrap().unwrap().next_refresh_at);
    let s = &store;
    assert!(
        helpers::eventually(5, || async move {
            s.get(ending_id).await.unwrap().unwrap().generation > before
        })
        .await,
        "the expiring account was not refreshed"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    shutdown.cancel();
    run.await.unwrap().expect("daemon run");
    assert_eq!(bodies(&server).await.len(), 2, "announced a second time");
    assert_eq!(
        store.get(ending_id).await.unwrap().unwrap().status,
        Status::Expiring
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flagged_account_reconnected_from_the_command_line_is_announced_recovered() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let server = receiver().await;
    let secret_file = app.dir.path().join("webhook-secret");
    std::fs::write(&secret_file, SECRET).unwrap();
    let extra = format!(
        "authorize_url = {:?}\nredirect_uri = \"http://127.0.0.1:9/callback\"\nscopes = [\"user.info.basic\"]\n{}",
        app.sandbox.authorize_url(),
        webhook_toml(&server, &secret_file)
    );
    let (config, config_file) = (app.config(&extra), app.config_path(&extra));
    let store = app.store().await;
    let id = app.import(&store, &config, &["back"], None).await[0];
    helpers::flag_invalid_grant(&store, id).await;
    store.close().await;

    // The user logs in again: the code read off the sandbox's redirect, exchanged by hand.
    app.sandbox
        .set_consent(refreshd::sandbox::Consent::Approve {
            open_id: "back".into(),
            grant_scopes: None,
        });
    let out = refreshd_cli(&config_file, &["authorize-url", "tiktok"]).await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    let code = helpers::authorization_code(out.stdout.trim()).await;
    let out = refreshd_cli(
        &config_file,
        &[
            "exchange",
            "tiktok",
            "--code",
            &code,
            "--account",
            &id.to_string(),
        ],
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(
        out.stderr.contains("\"event\":\"account_recovered\""),
        "{out:#?}"
    );
    let hooks = bodies(&server).await;
    assert_eq!(hooks.len(), 1, "{hooks:?}");
    assert_eq!(hooks[0]["event"], "account_recovered");
    assert_eq!(hooks[0]["account_id"], id);
    assert_eq!(hooks[0]["subject"], "back");
}
