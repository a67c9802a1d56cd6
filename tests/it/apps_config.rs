//! App tokens listed in the config (`[providers.NAME.apps.APP]`): the daemon adds them at
//! start and fetches them with no CLI step, the token API serves them, a reload with a new
//! scope rescopes and refetches, and an app taken out of the config is kept.

use crate::helpers::{self, TestApp};
use refreshd::config::Config;
use refreshd::engine::Engine;
use refreshd::lifecycle::{self, RunOptions};
use refreshd::model::Grant;
use refreshd::sandbox::SandboxConfig;
use refreshd::store::Store;
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const API_TOKEN: &str = "apps-config-api-token-0123456789";

/// The test config with `apps` (TOML under `[providers.tiktok]`), an ops server on a free
/// loopback port and the token API's secret; written where a reload reads it.
fn write_config(app: &TestApp, apps: &str) -> PathBuf {
    let token_file = app.dir.path().join("api-token");
    std::fs::write(&token_file, format!("{API_TOKEN}\n")).unwrap();
    app.config_path(&format!(
        "{apps}\n[server]\nlisten = \"127.0.0.1:0\"\napi_token_file = {:?}\n",
        token_file.display().to_string()
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_app_is_fetched_served_and_rescoped_on_reload() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let path = write_config(
        &app,
        "[providers.tiktok.apps.research]\nscope = \"research.data.basic\"\n",
    );
    let mut config = Config::load(Some(&path)).expect("config");
    config.store.create = true;
    let shutdown = CancellationToken::new();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
    let opts = RunOptions {
        on_ready: Some(Box::new(move |store: &Store, _: &Engine, addr| {
            let _ = ready_tx.send((store.clone(), addr));
        })),
        config_file: Some(path.clone()),
        reload: Some(reload_rx),
        ..RunOptions::new(app.clock.clone())
    };
    let task = tokio::spawn(lifecycle::run(config, opts, shutdown.clone()));
    let (store, addr) = tokio::time::timeout(Duration::from_secs(10), ready_rx)
        .await
        .expect("daemon ready in time")
        .expect("daemon started");
    let addr = addr.expect("the server listens");

    // No CLI step: the daemon added the app and fetches its token from the sandbox.
    let fetched = || async {
        let a = store.find("tiktok", "app:research").await.unwrap()?;
        a.last_refreshed_at.map(|_| a)
    };
    assert!(helpers::eventually(10, || async { fetched().await.is_some() }).await);
    let a = fetched().await.unwrap();
    assert_eq!(
        (a.grant, a.scope.as_str(), a.label.as_deref()),
        (
            Grant::ClientCredentials,
            "research.data.basic",
            Some("config")
        )
    );
    let token = app
        .sandbox
        .last_client_token()
        .expect("a client token issued");
    assert!(app.sandbox.client_token_valid(&token));

    // The token API serves it by its account id, behind the bearer secret.
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let r = http
        .get(format!("http://{addr}/v1/accounts/{}/token", a.id))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["access_token"], serde_json::json!(token));
    assert_eq!(body["subject"], "app:research");

    // A new scope in the config, then SIGHUP: the same row, rescoped and fetched again.
    write_config(
        &app,
        "[providers.tiktok.apps.research]\nscope = \"research.adlib.basic\"\n",
    );
    reload_tx.send(()).await.unwrap();
    assert!(
        helpers::eventually(10, || async {
            app.sandbox.stats().client_tokens_issued == 2
                && store
                    .get(a.id)
                    .await
                    .unwrap()
                    .is_some_and(|r| r.scope == "research.adlib.basic")
        })
        .await,
        "not rescoped and fetched again: {:?}",
        app.sandbox.stats()
    );
    let rescoped = store.get(a.id).await.unwrap().unwrap();
    assert_eq!(
        secrecy::ExposeSecret::expose_secret(&rescoped.access_token),
        app.sandbox.last_client_token().unwrap()
    );

    // Taken out of the config: kept (a typo must not drop tokens), with a warning.
    write_config(&app, "");
    reload_tx.send(()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        store.get(a.id).await.unwrap().is_some(),
        "an unlisted app is kept"
    );

    shutdown.cancel();
    task.await.unwrap().expect("clean stop");
}
