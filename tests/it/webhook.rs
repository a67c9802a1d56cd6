//! Webhook notifications: a wiremock receiver on loopback gets one signed event per state
//! change (the daemon with the sandbox on the manual clock, or events emitted directly),
//! retried after a 5xx, never a token, never a plain rotation.

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

fn webhook_config(server: &MockServer, retries: u32) -> WebhookConfig {
    let toml = format!(
        "[notify.webhook]\nurl = \"{}/hook\"\nsecret = \"{SECRET}\"\nretries = {retries}\nbackoff_base = \"10ms\"\nbackoff_max = \"20ms\"\ntimeout = \"2s\"\n",
        server.uri()
    );
    Config::from_toml_str(&toml)
        .expect("webhook config")
        .notify
        .webhook
        .unwrap()
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
        Some(webhook_config(&server, 0)),
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
        ["provider_rejected", "provider_recovered", "recovered"]
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
        Some(webhook_config(&server, 5)),
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
    config.backoff_base = Duration::from_secs(3600);
    config.backoff_max = Duration::from_secs(3600);
    let shutdown = CancellationToken::new();
    let handle = notify::spawn(
        Some(config),
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
