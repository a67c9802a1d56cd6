//! The ops server, driven through `lifecycle::run` (the daemon in this process) with the
//! manual clock, the sandbox provider and a real SQLite file: health, readiness and metrics,
//! the token API, the web connect flow end to end (the test plays the browser) and slow
//! clients. This file holds the shared set-up: the running `Daemon` and the browser's `Web`.

use crate::helpers::{self, TestApp};
use refreshd::config::Config;
use refreshd::engine::Engine;
use refreshd::lifecycle::{self, RunOptions, RunReport};
use refreshd::sandbox::{Consent, SandboxConfig};
use refreshd::store::Store;
use std::net::SocketAddr;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

mod health;
mod limits;
mod token_api;
mod web_connect;
mod web_redirect;

pub(crate) const API_TOKEN: &str = "test-api-token-0123456789abcdef";

pub(crate) struct Daemon {
    pub(crate) addr: SocketAddr,
    pub(crate) store: Store,
    pub(crate) engine: Engine,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<RunReport, lifecycle::DaemonError>>,
    pub(crate) http: reqwest::Client,
}

impl Daemon {
    pub(crate) async fn start(app: &TestApp, mut config: Config) -> Daemon {
        // A first start: the daemon may create its store (docs/src/durability.md).
        config.store.create = true;
        let shutdown = CancellationToken::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let opts = RunOptions {
            on_ready: Some(Box::new(move |store: &Store, engine: &Engine, addr| {
                let _ = tx.send((store.clone(), engine.clone(), addr));
            })),
            ..RunOptions::new(app.clock.clone())
        };
        let task = tokio::spawn(lifecycle::run(config, opts, shutdown.clone()));
        let (store, engine, addr) = tokio::time::timeout(Duration::from_secs(10), rx)
            .await
            .expect("daemon ready in time")
            .expect("daemon started");
        Daemon {
            addr: addr.expect("the server listens"),
            store,
            engine,
            shutdown,
            task,
            http: reqwest::Client::builder()
                .no_proxy()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
        }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let r = self.http.get(self.url(path)).send().await.expect("request");
        (r.status().as_u16(), r.text().await.unwrap())
    }

    async fn get_auth(&self, path: &str, bearer: Option<&str>) -> (u16, serde_json::Value) {
        let mut req = self.http.get(self.url(path));
        if let Some(b) = bearer {
            req = req.bearer_auth(b);
        }
        let r = req.send().await.expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    pub(crate) async fn stop(self) -> RunReport {
        self.shutdown.cancel();
        self.task.await.unwrap().expect("clean stop")
    }
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

pub(crate) fn server_config(app: &TestApp, server: &str) -> Config {
    app.config(&format!("\n[server]\nlisten = \"127.0.0.1:0\"\n{server}\n"))
}

fn api_config(app: &TestApp) -> Config {
    let token_file = app.dir.path().join("api-token");
    std::fs::write(&token_file, format!("{API_TOKEN}\n")).unwrap();
    server_config(
        app,
        &format!("api_token_file = {:?}", token_file.display().to_string()),
    )
}

struct Web {
    app: TestApp,
    d: Daemon,
    /// The browser's cookie jar: `name=value` of every cookie `start` set.
    jar: std::sync::Mutex<Vec<String>>,
}

const REDIRECT_SECRET: &str = "redirect-secret-0123456789abcdef";

impl Web {
    async fn start(connect: &str) -> Web {
        let app = TestApp::start(SandboxConfig::default()).await;
        let port = free_port();
        let extra = format!(
            "authorize_url = {:?}\nredirect_uri = \"http://127.0.0.1:{port}/connect/tiktok/callback\"\nscopes = [\"user.info.basic\", \"video.list\"]\n\n[server]\nlisten = \"127.0.0.1:{port}\"\n\n[connect]\nenabled = true\nstate_ttl = \"10m\"\n{connect}\n",
            app.sandbox.authorize_url(),
        );
        let config = app.config(&extra);
        let d = Daemon::start(&app, config).await;
        Web {
            app,
            d,
            jar: Default::default(),
        }
    }

    /// GET /connect/tiktok/start: returns the provider URL the browser is sent to.
    async fn start_url(&self, query: &str) -> url::Url {
        let r = self
            .d
            .http
            .get(self.d.url(&format!("/connect/tiktok/start{query}")))
            .send()
            .await
            .unwrap();
        let set: Vec<String> = r
            .headers()
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect();
        for c in &set {
            let pair = c.split(';').next().unwrap().to_string();
            self.jar.lock().unwrap().push(pair);
        }
        assert_eq!(r.status().as_u16(), 303, "{:?}", r.text().await);
        url::Url::parse(r.headers()["location"].to_str().unwrap()).unwrap()
    }

    /// The cookies the browser sends (all of them: each has its own name).
    fn cookies(&self) -> String {
        self.jar.lock().unwrap().join("; ")
    }

    /// The browser at the provider: consent, then the redirect back to our callback URL.
    async fn provider_redirect(&self, authorize: &url::Url) -> url::Url {
        let r = self.d.http.get(authorize.clone()).send().await.unwrap();
        assert!(r.status().is_redirection(), "{:?}", r.status());
        url::Url::parse(r.headers()["location"].to_str().unwrap()).unwrap()
    }

    /// Opens the callback URL: (status, Location or body).
    async fn callback(&self, url: &url::Url) -> (u16, String) {
        self.callback_from(url, &self.cookies()).await
    }

    /// Opens the callback URL in a browser holding `cookies`.
    async fn callback_from(&self, url: &url::Url, cookies: &str) -> (u16, String) {
        let mut req = self.d.http.get(url.clone());
        if !cookies.is_empty() {
            req = req.header("cookie", cookies);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        match r.headers().get("location") {
            Some(l) => (status, l.to_str().unwrap().to_string()),
            None => (status, r.text().await.unwrap()),
        }
    }

    async fn connect_flow(&self, query: &str) -> (u16, String, url::Url) {
        let authorize = self.start_url(query).await;
        let back = self.provider_redirect(&authorize).await;
        let (status, out) = self.callback(&back).await;
        (status, out, back)
    }

    fn consent(&self, open_id: &str, grant_scopes: Option<&str>) {
        self.app.sandbox.set_consent(Consent::Approve {
            open_id: open_id.into(),
            grant_scopes: grant_scopes.map(str::to_string),
        });
    }
}

/// The query of a redirect to the app, after checking its signature independently of the
/// daemon's code: HMAC-SHA256 over `ref \n account_id \n outcome \n ts`.
fn verified(location: &str) -> std::collections::HashMap<String, String> {
    let u = url::Url::parse(location).unwrap();
    let q: std::collections::HashMap<String, String> = u.query_pairs().into_owned().collect();
    let account_id = q.get("account_id").cloned().unwrap_or_default();
    let outcome = q.get("error").map(String::as_str).unwrap_or("connected");
    let signed = format!("{}\n{account_id}\n{outcome}\n{}", q["ref"], q["ts"]);
    let want = helpers::hmac_sha256_hex(REDIRECT_SECRET, signed.as_bytes());
    assert_eq!(q["sig"], want, "bad signature on {location}");
    q
}
