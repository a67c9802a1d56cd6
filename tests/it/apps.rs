//! App tokens (client-credentials grant, issue 16 item 2) end to end against the sandbox:
//! kept fresh over a simulated day on the manual clock, and a refused client secret taken
//! for the provider's configuration, never for an account needing a human.

use crate::helpers::{T0, TestApp, rotation_times};
use refreshd::engine::{Engine, Settings};
use refreshd::model::{Grant, Status};
use refreshd::sandbox::SandboxConfig;
use refreshd::store::{AppAdded, NewApp, Store};
use secrecy::ExposeSecret;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

const DAY: i64 = 86_400;
/// The sandbox's client tokens live 2 hours, as TikTok's do.
const TOKEN_TTL: i64 = 7_200;

fn research() -> NewApp {
    NewApp {
        provider: "tiktok".into(),
        name: "research".into(),
        scope: "research.data.basic".into(),
        label: None,
    }
}

async fn engine_for(app: &TestApp, store: &Store, extra: &str) -> Engine {
    let config = app.config(extra);
    let settings = Arc::new(Settings::new(config).expect("providers"));
    let (tx, rx) = tokio::sync::watch::channel(settings);
    // The sender lives as long as the test: the engine keeps its settings.
    std::mem::forget(tx);
    Engine::new(store.clone(), app.clock.clone(), rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_token_is_kept_fresh_over_a_simulated_day() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let store = app.store().await;
    let engine = engine_for(&app, &store, "").await;
    let AppAdded::Created(id) = store.add_app(research(), T0).await.unwrap() else {
        panic!("a new app")
    };
    let mut served = Vec::new();
    let mut now = T0;
    while now <= T0 + DAY {
        app.clock.set(now);
        engine.run_due(CancellationToken::new()).await.unwrap();
        let a = store.get(id).await.unwrap().expect("the app's row");
        let token = a.access_token.expose_secret().to_string();
        // What the token API and the sinks hand out (`token_document`) is the stored row:
        // it is the provider's latest token, stored before anything else saw it, and alive.
        assert_eq!(
            a.token_document()["access_token"],
            serde_json::json!(token),
            "at +{}s",
            now - T0
        );
        assert_eq!(app.sandbox.last_client_token().as_deref(), Some(&*token));
        assert!(
            app.sandbox.client_token_valid(&token),
            "the served token is expired at +{}s",
            now - T0
        );
        assert_eq!(
            (a.status, a.grant),
            (Status::Active, Grant::ClientCredentials)
        );
        assert_eq!((a.refresh_expires_at, a.reauth_reason), (None, None));
        if served.last() != Some(&token) {
            served.push(token);
        }
        now += 300;
    }
    let times = rotation_times(&store, id).await;
    // Fetched at once, then again 12 minutes (the lead: 10 % of 2 hours) before each end.
    assert_eq!(times[0], T0);
    for pair in times.windows(2) {
        assert!(
            pair[1] - pair[0] < TOKEN_TTL,
            "refreshed too late: {times:?}"
        );
        assert!(
            pair[1] - pair[0] >= TOKEN_TTL - 720,
            "refreshed too early: {times:?}"
        );
    }
    assert!((12..=15).contains(&times.len()), "{times:?}");
    // Every token the sandbox issued was stored and served, one request each.
    let stats = app.sandbox.stats();
    assert_eq!(stats.client_tokens_issued, times.len() as u64, "{stats:?}");
    assert_eq!(served.len(), times.len());
    assert_eq!(
        (stats.refreshed, stats.client_rejected),
        (0, 0),
        "{stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_client_secret_is_the_providers_configuration_not_a_flag() {
    let app = TestApp::start(SandboxConfig {
        client_secret: "another-secret".into(),
        ..SandboxConfig::default()
    })
    .await;
    let store = app.store().await;
    let engine = engine_for(&app, &store, "").await;
    let mut events = engine.events().subscribe();
    let id = store.add_app(research(), T0).await.unwrap().id();
    app.clock.set(T0);
    engine.run_due(CancellationToken::new()).await.unwrap();
    let a = store.get(id).await.unwrap().expect("the app's row");
    // Not flagged: no person can log in for an app. Retried slowly, saying what to check.
    assert_eq!((a.status, a.reauth_reason), (Status::Active, None));
    let error = a.last_error.unwrap_or_default();
    assert!(
        error.contains("client_secret") && error.contains("app:research"),
        "{error}"
    );
    assert!(a.next_refresh_at > T0 + 600, "retried slowly");
    let mut kinds = Vec::new();
    while let Ok(e) = events.try_recv() {
        kinds.push(e.kind());
    }
    assert!(kinds.contains(&"provider_rejected"), "{kinds:?}");
    assert!(!kinds.contains(&"reauth_required"), "{kinds:?}");
    assert_eq!(app.sandbox.stats().client_rejected, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_file_holds_the_current_app_token() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let store = app.store().await;
    let engine = engine_for(&app, &store, "").await;
    store.add_app(research(), T0).await.unwrap();
    app.clock.set(T0);
    engine.run_due(CancellationToken::new()).await.unwrap();
    let path = app.dir.path().join("research.json");
    let sink = refreshd::config::SinkConfig {
        account: None,
        provider: Some("tiktok".into()),
        subject: Some("app:research".into()),
        path: path.clone(),
        format: Default::default(),
        mode: 0o600,
    };
    refreshd::sink::write_sink(&sink, &store, T0, None)
        .await
        .expect("written");
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(doc["subject"], "app:research");
    assert_eq!(
        doc["access_token"].as_str(),
        app.sandbox.last_client_token().as_deref()
    );
}
