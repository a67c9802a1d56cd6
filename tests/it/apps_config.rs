//! App tokens listed in the config (`[providers.NAME.apps.APP]`): the daemon adds them at
//! start and fetches them with no CLI step, the token API serves them, a reload with a new
//! scope rescopes and refetches, an app taken out of the config is kept, and the token
//! proxy forwards with the app's current token. An import cannot overwrite an app's row.

use crate::helpers::{self, TestApp};
use refreshd::config::Config;
use refreshd::engine::Engine;
use refreshd::lifecycle::{self, RunOptions};
use refreshd::model::Account;
use refreshd::model::Grant;
use refreshd::sandbox::{RESEARCH_PATH, SandboxConfig};
use refreshd::store::{NewApp, Store};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::instrument::WithSubscriber;

const API_TOKEN: &str = "apps-config-api-token-0123456789";

/// The test config with `apps` (TOML under `[providers.tiktok]`), an ops server on a free
/// loopback port and the token API's secret; written where a reload reads it.
fn write_config(app: &TestApp, apps: &str) -> PathBuf {
    let token_file = app.dir.path().join("api-token");
    std::fs::write(&token_file, format!("{API_TOKEN}\n")).unwrap();
    app.config_path(&format!(
        "api_base = {:?}\n{apps}\n[server]\nlisten = \"127.0.0.1:0\"\napi_token_file = {:?}\n",
        app.sandbox.api_base(),
        token_file.display().to_string()
    ))
}

/// The daemon running on the config at `path`, with SIGHUP replaced by `Daemon::reload`.
struct Daemon {
    store: Store,
    engine: Engine,
    addr: SocketAddr,
    reload: tokio::sync::mpsc::Sender<()>,
    /// What the daemon's run logged (not its spawned tasks).
    logs: helpers::Logs,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<lifecycle::RunReport, lifecycle::DaemonError>>,
}

impl Daemon {
    async fn start(app: &TestApp, path: PathBuf) -> Daemon {
        let mut config = Config::load(Some(&path)).expect("config");
        config.store.create = true;
        let shutdown = CancellationToken::new();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (reload, reload_rx) = tokio::sync::mpsc::channel(1);
        let opts = RunOptions {
            on_ready: Some(Box::new(move |store: &Store, engine: &Engine, addr| {
                let _ = ready_tx.send((store.clone(), engine.clone(), addr));
            })),
            config_file: Some(path),
            reload: Some(reload_rx),
            ..RunOptions::new(app.clock.clone())
        };
        let logs = helpers::Logs::default();
        let run = lifecycle::run(config, opts, shutdown.clone());
        let task = tokio::spawn(run.with_subscriber(logs.subscriber()));
        let (store, engine, addr) = tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .expect("daemon ready in time")
            .expect("daemon started");
        Daemon {
            store,
            engine,
            addr: addr.expect("the server listens"),
            reload,
            logs,
            shutdown,
            task,
        }
    }

    /// The app token `app:NAME` once it was fetched.
    async fn fetched(&self, name: &str) -> Account {
        let subject = format!("app:{name}");
        let get = || async {
            let a = self.store.find("tiktok", &subject).await.unwrap()?;
            a.last_refreshed_at.map(|_| a)
        };
        assert!(helpers::eventually(10, || async { get().await.is_some() }).await);
        get().await.unwrap()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().expect("clean stop");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_app_is_fetched_served_and_rescoped_on_reload() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let path = write_config(
        &app,
        "[providers.tiktok.apps.research]\nscope = \"research.data.basic\"\n",
    );
    let d = Daemon::start(&app, path).await;
    let (store, addr) = (d.store.clone(), d.addr);

    // No CLI step: the daemon added the app and fetches its token from the sandbox.
    let a = d.fetched("research").await;
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
    d.reload.send(()).await.unwrap();
    assert!(
        helpers::eventually(10, || async {
            // The second token recorded, not only issued.
            app.sandbox.stats().client_tokens_issued == 2
                && store.get(a.id).await.unwrap().is_some_and(|r| {
                    r.scope == "research.adlib.basic"
                        && app.sandbox.last_client_token().as_deref()
                            == Some(secrecy::ExposeSecret::expose_secret(&r.access_token))
                })
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
    d.reload.send(()).await.unwrap();
    let warned = |l: &str| {
        l.contains("\"event\":\"config_app_unlisted\"")
            && l.contains("\"app\":\"research\"")
            && l.contains(&format!("\"account_id\":{}", a.id))
    };
    assert!(
        helpers::eventually(10, || async { d.logs.text().lines().any(warned) }).await,
        "no config_app_unlisted warning after the reload: {}",
        d.logs.text()
    );
    assert!(
        store.get(a.id).await.unwrap().is_some(),
        "an unlisted app is kept"
    );

    d.stop().await;
}

/// The Research API takes client tokens only: the proxy's call with the app's account id
/// succeeds, and still does once the first token has expired and the app was fetched again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_forwards_with_the_apps_current_token() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let path = write_config(&app, "[providers.tiktok.apps.research]\n");
    let d = Daemon::start(&app, path).await;
    let a = d.fetched("research").await;
    let first = app.sandbox.last_client_token().unwrap();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let query = async || {
        let r = http
            .post(format!("http://{}/proxy/{}{RESEARCH_PATH}", d.addr, a.id))
            .bearer_auth(API_TOKEN)
            .body("{}")
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    let (status, body) = query().await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"videos\""), "{body}");
    assert!(!body.contains(&first), "the token leaked into the answer");

    // Past the first token's end: the daemon asked again, and the proxy uses the new one.
    app.clock.set(a.access_expires_at + 1);
    assert!(!app.sandbox.client_token_valid(&first));
    d.engine.waker().notify_one();
    assert!(
        helpers::eventually(10, || async {
            app.sandbox.stats().client_tokens_issued == 2
                && d.store.get(a.id).await.unwrap().unwrap().generation > a.generation
        })
        .await,
        "the app token was not fetched again"
    );
    let (status, body) = query().await;
    assert_eq!(status, 200, "{body}");
    d.stop().await;
}

/// An import line with an app token's subject is refused (file and line named), and the
/// app's row is left as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_cannot_overwrite_an_app_token() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let store = app.store().await;
    let app_row = NewApp {
        provider: "tiktok".into(),
        name: "research".into(),
        scope: "research.data.basic".into(),
        label: None,
    };
    let id = store.add_app(app_row, helpers::T0).await.unwrap().id();
    let config = app.config("");
    let line = helpers::sandbox_line(&app.sandbox, "app:research", "user.info.basic", helpers::T0);
    let err = refreshd::import::parse_with(
        "accounts.jsonl",
        &line,
        helpers::T0,
        &config.refresh.timing(),
        config.reauth.window,
        |p| config.credential_of(p),
    )
    .expect_err("an app's subject is refused")
    .to_string();
    assert!(
        err.contains("accounts.jsonl")
            && err.contains("line 1")
            && err.contains("refreshd apps add"),
        "{err}"
    );
    let a = store.get(id).await.unwrap().unwrap();
    assert_eq!(
        (a.grant, a.scope.as_str()),
        (Grant::ClientCredentials, "research.data.basic")
    );
    store.close().await;
}
