//! The ops server, driven through `lifecycle::run` (the daemon in this process) with the
//! manual clock, the sandbox provider and a real SQLite file: health and readiness (also of a
//! stalled loop), metrics after refreshes, the token API and its bearer secret, and the web
//! connect flow end to end (the test plays the browser).

use crate::helpers::{self, TestApp};
use refreshd::config::Config;
use refreshd::engine::Engine;
use refreshd::events::Event;
use refreshd::lifecycle::{self, RunOptions, RunReport};
use refreshd::model::{ReauthReason, Status};
use refreshd::sandbox::{Consent, SandboxConfig};
use refreshd::store::{Outcome, Store};
use secrecy::ExposeSecret;
use std::net::SocketAddr;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const API_TOKEN: &str = "test-api-token-0123456789abcdef";

struct Daemon {
    addr: SocketAddr,
    store: Store,
    engine: Engine,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<RunReport, lifecycle::DaemonError>>,
    http: reqwest::Client,
}

impl Daemon {
    async fn start(app: &TestApp, mut config: Config) -> Daemon {
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

    fn url(&self, path: &str) -> String {
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

    async fn stop(self) -> RunReport {
        self.shutdown.cancel();
        self.task.await.unwrap().expect("clean stop")
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

fn server_config(app: &TestApp, server: &str) -> Config {
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

/// The value of one sample line (`name{labels} value`) in a Prometheus text exposition.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness_follow_the_loop() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let config = {
        let mut c = server_config(&app, "stall_after = \"2m\"");
        // Fail fast when the test holds the write lock.
        c.store.busy_timeout = Duration::from_millis(100);
        c
    };
    let store = app.store().await;
    app.import(&store, &config, &["u1"], None).await;
    store.close().await;
    let d = Daemon::start(&app, config).await;

    assert!(
        helpers::eventually(5, || async { d.get("/readyz").await.0 == 200 }).await,
        "{:?}",
        d.get("/readyz").await
    );
    assert_eq!(d.get("/healthz").await, (200, "ok\n".into()));

    // Stall the loop: another connection holds the write lock, so no claim completes; then
    // let more than stall_after pass.
    let lock = rusqlite::Connection::open(&app.db).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    app.clock.advance(Duration::from_secs(3 * 60));
    let (status, body) = d.get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("last completed a pass") && body.contains("stall_after"),
        "the body says why: {body}"
    );
    // Liveness allows twice as long before asking for a restart.
    assert_eq!(d.get("/healthz").await.0, 200);
    app.clock.advance(Duration::from_secs(2 * 60));
    let (status, body) = d.get("/healthz").await;
    assert_eq!(status, 503, "{body}");

    // Released: the loop completes a pass and both recover.
    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);
    assert!(
        helpers::eventually(10, || async { d.get("/readyz").await.0 == 200 }).await,
        "ready again: {:?}",
        d.get("/readyz").await
    );
    assert_eq!(d.get("/healthz").await.0, 200);

    // Draining: not ready any more once shutdown starts (the server stops with it).
    let addr = d.addr;
    d.stop().await;
    assert!(
        reqwest::Client::new()
            .get(format!("http://{addr}/readyz"))
            .send()
            .await
            .is_err(),
        "the server stopped with the daemon"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_after_refreshes() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let config = server_config(&app, "");
    let store = app.store().await;
    let ids = app
        .import(&store, &config, &["u1", "u2", "gone"], None)
        .await;
    store.close().await;
    app.sandbox.revoke("gone");
    let d = Daemon::start(&app, config).await;

    let (status, before) = d.get("/metrics").await;
    assert_eq!(status, 200);
    assert!(before.ends_with("# EOF\n"), "OpenMetrics text: {before}");
    assert_eq!(
        sample(
            &before,
            r#"refreshd_accounts{provider="tiktok",status="active"}"#
        ),
        Some(3.0),
        "{before}"
    );
    assert_eq!(
        sample(
            &before,
            r#"refreshd_active_accounts_access_expired{provider="tiktok"}"#
        ),
        Some(0.0),
        "{before}"
    );
    let soonest = sample(
        &before,
        r#"refreshd_refresh_token_soonest_expiry_seconds{provider="tiktok"}"#,
    )
    .expect("soonest refresh-token expiry");
    assert!(soonest > 0.0, "{soonest}");

    // Everything due: two rotate, one is rejected.
    let due = {
        let mut t = i64::MAX;
        for &id in &ids {
            t = t.min(d.store.get(id).await.unwrap().unwrap().next_refresh_at);
        }
        t
    };
    app.clock.set(due + 60);
    d.engine.waker().notify_one();
    assert!(
        helpers::eventually(10, || async {
            d.engine.stats().snapshot().rotated == 2 && d.engine.stats().snapshot().flagged == 1
        })
        .await
    );
    // Store gauges are cached for 10 s of the clock: step past it.
    app.clock.advance(Duration::from_secs(11));
    let (_, after) = d.get("/metrics").await;
    assert!(
        after.contains("# TYPE refreshd_refreshes counter")
            && after.contains("# UNIT refreshd_refresh_duration_seconds seconds"),
        "{after}"
    );
    assert_eq!(
        sample(
            &after,
            r#"refreshd_refreshes_total{provider="tiktok",outcome="rotated"}"#
        ),
        Some(2.0),
        "{after}"
    );
    assert_eq!(
        sample(
            &after,
            r#"refreshd_refreshes_total{provider="tiktok",outcome="rejected"}"#
        ),
        Some(1.0),
        "{after}"
    );
    assert_eq!(
        sample(
            &after,
            r#"refreshd_refresh_duration_seconds_count{provider="tiktok"}"#
        ),
        Some(3.0),
        "{after}"
    );
    assert_eq!(
        sample(&after, "refreshd_schedule_lateness_seconds_count"),
        Some(3.0),
        "{after}"
    );
    assert_eq!(
        sample(
            &after,
            r#"refreshd_accounts{provider="tiktok",status="needs_reauth"}"#
        ),
        Some(1.0),
        "{after}"
    );
    assert_eq!(
        sample(
            &after,
            r#"refreshd_accounts{provider="tiktok",status="active"}"#
        ),
        Some(2.0),
        "{after}"
    );
    assert_eq!(
        sample(
            &after,
            r#"refreshd_accounts_needing_reauth{provider="tiktok",reason="invalid_grant"}"#
        ),
        Some(1.0),
        "{after}"
    );
    assert_eq!(
        sample(
            &after,
            r#"refreshd_provider_consecutive_failures{provider="tiktok"}"#
        ),
        Some(0.0),
        "{after}"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_api_needs_the_bearer_secret_and_refreshes_on_request() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let config = api_config(&app);
    let store = app.store().await;
    let id = app.import(&store, &config, &["u1"], None).await[0];
    store.close().await;
    let d = Daemon::start(&app, config).await;
    let path = format!("/v1/accounts/{id}/token");

    for bearer in [None, Some("wrong"), Some(&API_TOKEN[..API_TOKEN.len() - 1])] {
        let (status, body) = d.get_auth(&path, bearer).await;
        assert_eq!(status, 401, "{bearer:?}: {body}");
        assert!(!body.to_string().contains("access_token"), "{body}");
    }
    // RFC 7235: the scheme is case-insensitive.
    for scheme in ["bearer", "BEARER"] {
        let r = d
            .http
            .get(d.url(&path))
            .header("authorization", format!("{scheme} {API_TOKEN}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "scheme {scheme:?}");
    }

    let stored = d.store.get(id).await.unwrap().unwrap();
    let (status, body) = d.get_auth(&path, Some(API_TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["access_token"], stored.access_token.expose_secret());
    assert_eq!(body["account_id"], id);
    assert_eq!(body["subject"], "u1");
    assert_eq!(body["scope"], stored.scope);
    assert_eq!(
        body["expires_in"].as_i64().unwrap(),
        stored.access_expires_at - app.clock.now()
    );
    let (status, by_subject) = d
        .get_auth("/v1/providers/tiktok/subjects/u1/token", Some(API_TOKEN))
        .await;
    assert_eq!(
        (status, &by_subject["access_token"]),
        (200, &body["access_token"])
    );
    assert_eq!(
        d.get_auth(
            "/v1/providers/tiktok/subjects/nobody/token",
            Some(API_TOKEN)
        )
        .await
        .0,
        404
    );
    assert_eq!(
        d.get_auth("/v1/accounts/999/token", Some(API_TOKEN))
            .await
            .0,
        404
    );
    let (status, bad) = d
        .get_auth(&format!("{path}?min_valid=soon"), Some(API_TOKEN))
        .await;
    assert_eq!(status, 400, "{bad}");
    assert!(
        bad["message"].as_str().unwrap().contains("min_valid"),
        "{bad}"
    );

    // The token has 2 h left: min_valid=1h needs no refresh, min_valid=3h does, through the
    // engine (one request to the provider, one new generation).
    let requests = app.sandbox.stats().requests;
    let (status, same) = d
        .get_auth(&format!("{path}?min_valid=1h"), Some(API_TOKEN))
        .await;
    assert_eq!(
        (status, &same["access_token"]),
        (200, &body["access_token"])
    );
    assert_eq!(app.sandbox.stats().requests, requests);
    app.clock.advance(Duration::from_secs(30 * 60));
    let (status, fresh) = d
        .get_auth(&format!("{path}?min_valid=100m"), Some(API_TOKEN))
        .await;
    assert_eq!(status, 200, "{fresh}");
    assert_ne!(fresh["access_token"], body["access_token"]);
    let now = d.store.get(id).await.unwrap().unwrap();
    assert_eq!(now.generation, stored.generation + 1);
    assert_eq!(fresh["access_token"], now.access_token.expose_secret());
    assert!(
        app.sandbox
            .access_token_valid("u1", now.access_token.expose_secret())
    );
    let s = app.sandbox.stats();
    assert_eq!(
        (s.requests, s.refreshed, s.reuse_rejected),
        (requests + 1, 1, 0),
        "{s:?}"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_secret_the_token_routes_do_not_exist() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let config = server_config(&app, "");
    let store = app.store().await;
    let id = app.import(&store, &config, &["u1"], None).await[0];
    store.close().await;
    let d = Daemon::start(&app, config).await;
    let (status, _) = d
        .get_auth(&format!("/v1/accounts/{id}/token"), Some(API_TOKEN))
        .await;
    assert_eq!(status, 404);
    assert_eq!(
        d.get("/connect/tiktok/start").await.0,
        404,
        "connect is off by default"
    );
    d.stop().await;
}

// ---- web connect ----

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_connect_happy_path_replay_and_fewer_scopes() {
    let w = Web::start("").await;
    w.consent("web-user", None);
    let authorize = w.start_url("?label=Shop%20main").await;
    let q: std::collections::HashMap<_, _> = authorize.query_pairs().into_owned().collect();
    assert_eq!(
        q["redirect_uri"],
        format!("http://{}/connect/tiktok/callback", w.d.addr)
    );
    assert_eq!(q["scope"], "user.info.basic,video.list");
    assert!(q["state"].len() >= 43, "256-bit state: {}", q["state"]);
    let back = w.provider_redirect(&authorize).await;
    let (status, page) = w.callback(&back).await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("Connected tiktok account web-user"), "{page}");
    let a =
        w.d.store
            .find("tiktok", "web-user")
            .await
            .unwrap()
            .expect("stored");
    assert_eq!(a.label.as_deref(), Some("Shop main"));
    assert_eq!(a.status, Status::Active);
    assert!(
        w.app
            .sandbox
            .access_token_valid("web-user", a.access_token.expose_secret())
    );
    assert!(!page.contains(a.access_token.expose_secret()));

    // The same callback again: the state is spent.
    let (status, page) = w.callback(&back).await;
    assert_eq!(status, 400, "{page}");
    assert!(page.contains("invalid_state"), "{page}");
    assert_eq!(
        w.d.store.get(a.id).await.unwrap().unwrap().generation,
        a.generation
    );

    // Fewer scopes granted than asked: stored as granted and reported on the page.
    w.consent("scoped-user", Some("user.info.basic"));
    let (status, page, _) = w.connect_flow("").await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("Not granted: video.list"), "{page}");
    let b =
        w.d.store
            .find("tiktok", "scoped-user")
            .await
            .unwrap()
            .unwrap();
    assert_eq!(b.scope, "user.info.basic");
    w.d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_connect_refuses_unknown_expired_and_denied() {
    let w = Web::start("").await;
    w.consent("u", None);
    // A state we never issued (a forged callback).
    let forged =
        url::Url::parse(&w.d.url("/connect/tiktok/callback?code=abc&state=forged")).unwrap();
    let (status, page) = w.callback(&forged).await;
    assert_eq!(status, 400);
    assert!(page.contains("invalid_state"), "{page}");
    let (status, _) = w
        .callback(&url::Url::parse(&w.d.url("/connect/tiktok/callback?code=abc")).unwrap())
        .await;
    assert_eq!(status, 400, "no state at all");

    // Expired: the user took longer than connect.state_ttl.
    let authorize = w.start_url("").await;
    let back = w.provider_redirect(&authorize).await;
    w.app.clock.advance(Duration::from_secs(11 * 60));
    let (status, page) = w.callback(&back).await;
    assert_eq!(status, 400);
    assert!(page.contains("took too long"), "{page}");
    assert!(w.d.store.find("tiktok", "u").await.unwrap().is_none());

    // Denied consent.
    w.app.sandbox.set_consent(Consent::Deny);
    let (status, page, _) = w.connect_flow("").await;
    assert_eq!(status, 400, "{page}");
    assert!(page.contains("access_denied"), "{page}");

    // A code the provider refuses (tampered): exchange failure, nothing stored.
    w.consent("u2", None);
    let authorize = w.start_url("").await;
    let mut back = w.provider_redirect(&authorize).await;
    let pairs: Vec<(String, String)> = back
        .query_pairs()
        .map(|(k, v)| {
            let v = if k == "code" {
                format!("{v}x")
            } else {
                v.into_owned()
            };
            (k.into_owned(), v)
        })
        .collect();
    back.query_pairs_mut().clear().extend_pairs(pairs);
    let (status, page) = w.callback(&back).await;
    assert_eq!(status, 502, "{page}");
    assert!(page.contains("exchange_failed"), "{page}");
    assert!(w.d.store.find("tiktok", "u2").await.unwrap().is_none());
    w.d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_reconnect_clears_the_flag_and_redirects_with_the_account_id() {
    let w = Web::start(
        &format!("success_url = \"https://app.example/connected\"\nfailure_url = \"https://app.example/failed?from=refreshd\"\nredirect_secret = {REDIRECT_SECRET:?}"),
    )
    .await;
    let config = w.app.config("");
    let id = w.app.import(&w.d.store, &config, &["flagged"], None).await[0];
    let a = w.d.store.get(id).await.unwrap().unwrap();
    w.d.store
        .record(Outcome::Rejected {
            account_id: id,
            generation: a.generation,
            reason: ReauthReason::InvalidGrant,
            at: w.app.clock.now(),
            error: "invalid_grant".into(),
            http_status: Some(400),
            duration_ms: 1,
        })
        .await
        .unwrap();
    let mut events = w.d.engine.events().subscribe();

    // Another user logs in for this account: refused, nothing overwritten.
    w.consent("someone-else", None);
    let (status, location, _) = w.connect_flow(&format!("?account={id}")).await;
    assert_eq!(status, 303);
    assert!(
        location.starts_with(
            "https://app.example/failed?from=refreshd&error=account_mismatch&ref=&ts="
        ),
        "{location}"
    );
    assert_eq!(verified(&location)["error"], "account_mismatch");
    let still = w.d.store.get(id).await.unwrap().unwrap();
    assert_eq!(still.status, Status::NeedsReauth);
    assert!(
        w.d.store
            .find("tiktok", "someone-else")
            .await
            .unwrap()
            .is_none()
    );

    // The account's own user: flag, reason and failures cleared; new tokens stored.
    w.consent("flagged", None);
    let (status, location, _) = w.connect_flow(&format!("?account={id}")).await;
    assert_eq!(status, 303);
    assert!(
        location.starts_with(&format!(
            "https://app.example/connected?account_id={id}&ref="
        )),
        "{location}"
    );
    assert_eq!(verified(&location)["account_id"], id.to_string());
    let fixed = w.d.store.get(id).await.unwrap().unwrap();
    assert_eq!(fixed.status, Status::Active);
    assert_eq!(fixed.reauth_reason, None);
    assert_eq!(fixed.failures, 0);
    assert!(
        w.app
            .sandbox
            .access_token_valid("flagged", fixed.access_token.expose_secret())
    );
    let mut seen = Vec::new();
    while let Ok(e) = events.try_recv() {
        seen.push(e);
    }
    assert!(
        seen.contains(&Event::Recovered {
            account_id: id,
            provider: "tiktok".into(),
            subject: "flagged".into()
        }),
        "{seen:?}"
    );

    // An unknown account id: `start` answers exactly as for a known one (no enumeration
    // without auth); the callback refuses it and writes nothing.
    for id in [id, 9999] {
        let r =
            w.d.http
                .get(w.d.url(&format!("/connect/tiktok/start?account={id}")))
                .send()
                .await
                .unwrap();
        assert_eq!(r.status().as_u16(), 303, "account {id}");
        let to = r.headers()["location"].to_str().unwrap();
        assert!(to.starts_with(&w.app.sandbox.authorize_url()), "{to}");
    }
    w.consent("newcomer", None);
    let (status, location, _) = w.connect_flow("?account=9999").await;
    assert_eq!(status, 303);
    assert_eq!(
        verified(&location)["error"],
        "unknown_account",
        "{location}"
    );
    assert!(
        w.d.store
            .find("tiktok", "newcomer")
            .await
            .unwrap()
            .is_none()
    );
    assert!(w.d.store.get(9999).await.unwrap().is_none());
    w.d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_routes_on_a_unix_socket_mode_0660() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::start(SandboxConfig::default()).await;
    let sock = app.dir.path().join("refreshd.sock");
    // A socket left behind by a killed daemon is replaced.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let config = api_config(&app);
    let config = Config {
        server: refreshd::config::ServerConfig {
            unix_socket: Some(sock.clone()),
            ..config.server
        },
        ..config
    };
    let d = Daemon::start(&app, config).await;
    let meta = std::fs::metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    let ask = |req: String| {
        let sock = sock.clone();
        async move {
            let mut s = tokio::net::UnixStream::connect(&sock).await.unwrap();
            s.write_all(req.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        }
    };
    let health =
        ask("GET /healthz HTTP/1.1\r\nHost: refreshd\r\nConnection: close\r\n\r\n".into()).await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let denied = ask(
        "GET /v1/accounts/1/token HTTP/1.1\r\nHost: refreshd\r\nConnection: close\r\n\r\n".into(),
    )
    .await;
    assert!(denied.starts_with("HTTP/1.1 401"), "{denied}");
    d.stop().await;
    assert!(!sock.exists(), "the socket file is removed on shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_gives_a_fixed_reason_and_logs_the_store_error() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let d = Daemon::start(&app, server_config(&app, "")).await;
    assert!(helpers::eventually(5, || async { d.get("/readyz").await.0 == 200 }).await);
    // The store stops answering: its error text (which may name paths or hosts) must not
    // reach an unauthenticated client.
    d.store.close().await;
    let detail = refreshd::store::StoreError::Closed.to_string();
    let (status, body) = d.get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("- the store does not answer (the daemon's log says why)\n"),
        "{body}"
    );
    assert!(!body.contains(&detail), "the detail leaked: {body}");
    let (status, body) = d.get("/metrics").await;
    assert_eq!(status, 503, "{body}");
    assert!(!body.contains(&detail), "the detail leaked: {body}");
    d.shutdown.cancel();
    let _ = d.task.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_connect_label_is_capped_and_loses_control_characters() {
    let w = Web::start("").await;
    w.consent("labelled", None);
    let raw = format!("Shop\r\n\u{1b}[31m main{}", "<i>x</i>".repeat(1_000));
    let query: String = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("label", &raw)
        .finish();
    let (status, page, _) = w.connect_flow(&format!("?{query}")).await;
    assert_eq!(status, 200, "{page}");
    let a =
        w.d.store
            .find("tiktok", "labelled")
            .await
            .unwrap()
            .expect("stored");
    let label = a.label.expect("a label");
    assert_eq!(label.chars().count(), 200, "{label}");
    assert!(label.starts_with("Shop[31m main<i>x</i>"), "{label}");
    assert!(!label.chars().any(char::is_control), "{label:?}");
    w.d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_idle_and_dripping_clients_are_closed_after_the_header_read_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::start(SandboxConfig::default()).await;
    let d = Daemon::start(
        &app,
        server_config(&app, "header_read_timeout = \"300ms\"\nmax_connections = 4"),
    )
    .await;
    let open = || tokio::net::TcpStream::connect(d.addr);
    // Silent, half-sent, and a byte every 50 ms (which a per-read timeout would never end).
    let silent = open().await.unwrap();
    let mut half = open().await.unwrap();
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut drip = open().await.unwrap();
    let dripping = tokio::spawn(async move {
        let started = std::time::Instant::now();
        for b in b"GET /healthz HTTP/1.1\r\nX-Slow: ".iter().cycle() {
            if drip.write_all(&[*b]).await.is_err() {
                return started.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            if started.elapsed() > Duration::from_secs(10) {
                break;
            }
        }
        started.elapsed()
    });
    let closed_within = |mut s: tokio::net::TcpStream| async move {
        let started = std::time::Instant::now();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
        started.elapsed()
    };
    for (what, took) in [
        ("silent", closed_within(silent).await),
        ("half-sent", closed_within(half).await),
    ] {
        assert!(took < Duration::from_secs(3), "{what} held {took:?}");
    }
    let took = dripping.await.unwrap();
    assert!(
        took < Duration::from_secs(3),
        "the drip sender held {took:?}"
    );
    // max_connections = 4: four silent clients fill the server; it serves again once the
    // header-read timeout has closed them.
    let mut fill = Vec::new();
    for _ in 0..4 {
        fill.push(open().await.unwrap());
    }
    assert_eq!(d.get("/healthz").await.0, 200);
    drop(fill);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_connect_redirect_is_signed_with_the_apps_ref_and_state_is_bound_to_the_browser() {
    let w = Web::start(&format!(
        "success_url = \"https://app.example/connected\"\nfailure_url = \"https://app.example/failed\"\nredirect_secret = {REDIRECT_SECRET:?}"
    ))
    .await;
    w.consent("signed-user", None);
    let (status, location, _) = w.connect_flow("?ref=session-7.abc_~").await;
    assert_eq!(status, 303, "{location}");
    let q = verified(&location);
    assert_eq!(q["ref"], "session-7.abc_~");
    let a =
        w.d.store
            .find("tiktok", "signed-user")
            .await
            .unwrap()
            .expect("stored");
    assert_eq!(q["account_id"], a.id.to_string());
    assert!((q["ts"].parse::<i64>().unwrap() - w.app.clock.now()).abs() <= 1);
    // A forged success link: another account id under the same signature does not verify.
    let forged = location.replace(&format!("account_id={}", a.id), "account_id=4242");
    assert!(std::panic::catch_unwind(|| verified(&forged)).is_err());

    // The binding cookie: HttpOnly, SameSite=Lax, scoped to the callback, short-lived.
    let r =
        w.d.http
            .get(w.d.url("/connect/tiktok/start"))
            .send()
            .await
            .unwrap();
    let set = r.headers()["set-cookie"].to_str().unwrap().to_string();
    for part in [
        "HttpOnly",
        "SameSite=Lax",
        "Path=/connect/tiktok/callback",
        "Max-Age=600",
    ] {
        assert!(set.contains(part), "{set}");
    }

    // Login CSRF: the attacker starts, consents as themselves, and has the victim open the
    // callback link. The victim's browser lacks the attacker's cookie: refused, nothing stored.
    w.consent("attacker", None);
    let authorize = w.start_url("").await;
    let attacker_cookies = w.cookies();
    let link = w.provider_redirect(&authorize).await;
    let (status, location) = w.callback_from(&link, "").await;
    assert_eq!(status, 303);
    assert_eq!(verified(&location)["error"], "invalid_state", "{location}");
    assert!(
        w.d.store
            .find("tiktok", "attacker")
            .await
            .unwrap()
            .is_none()
    );
    // A cookie whose ref was altered does not match either.
    let tampered = attacker_cookies.replace(".", ".x");
    let (_, location) = w.callback_from(&link, &tampered).await;
    assert_eq!(verified(&location)["error"], "invalid_state", "{location}");
    // The browser that started it finishes it.
    let (status, location) = w.callback_from(&link, &attacker_cookies).await;
    assert_eq!(status, 303);
    assert!(verified(&location).contains_key("account_id"), "{location}");

    // A bad ref is refused at start.
    let r =
        w.d.http
            .get(w.d.url("/connect/tiktok/start?ref=a%20b"))
            .send()
            .await
            .unwrap();
    let to = r.headers()["location"].to_str().unwrap().to_string();
    assert_eq!(verified(&to)["error"], "bad_request", "{to}");
    w.d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_connect_failures_before_the_ref_is_verified_are_signed_with_an_empty_ref() {
    let w = Web::start(&format!(
        "success_url = \"https://app.example/connected\"\nfailure_url = \"https://app.example/failed\"\nredirect_secret = {REDIRECT_SECRET:?}"
    ))
    .await;
    // An unknown provider at start: anyone could ask with a victim's ref.
    let r =
        w.d.http
            .get(w.d.url("/connect/nosuch/start?ref=victim-ref"))
            .send()
            .await
            .unwrap();
    let to = r.headers()["location"].to_str().unwrap().to_string();
    let q = verified(&to);
    assert_eq!(q["error"], "unknown_provider", "{to}");
    assert_eq!(q["ref"], "", "{to}");
    // A refused (replayed) state: the cookie's ref is not trusted.
    w.consent("replayed", None);
    let authorize = w.start_url("?ref=victim-ref").await;
    let cookies = w.cookies();
    let link = w.provider_redirect(&authorize).await;
    let (_, location) = w.callback_from(&link, &cookies).await;
    assert_eq!(verified(&location)["ref"], "victim-ref", "{location}");
    let (_, location) = w.callback_from(&link, &cookies).await;
    let q = verified(&location);
    assert_eq!(q["error"], "invalid_state", "{location}");
    assert_eq!(q["ref"], "", "{location}");
    w.d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_docs_verification_example_verifies_a_real_redirect() {
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/src/web-connect-security.md"),
    )
    .unwrap();
    let example = doc
        .split("```js\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a js example in the docs");
    const TEST: &str = "server::the_docs_verification_example_verifies_a_real_redirect";
    if !refreshd_testkit::tool(
        TEST,
        "node",
        &["node", "--version"],
        "apt-get install nodejs",
    ) {
        return;
    }
    let w = Web::start(&format!(
        "success_url = \"https://app.example/connected\"\nredirect_secret = {REDIRECT_SECRET:?}"
    ))
    .await;
    w.consent("docs-user", None);
    let (status, location, _) = w.connect_flow("?ref=session-42").await;
    assert_eq!(status, 303, "{location}");
    let script = w.app.dir.path().join("verify-refreshd-redirect.js");
    std::fs::write(&script, example).unwrap();
    let now = w.app.clock.now().to_string();
    let run = |url: &str, secret: &str, now: &str| {
        std::process::Command::new("node")
            .arg(&script)
            .args([url, secret, now])
            .output()
            .unwrap()
    };
    let ok = run(&location, REDIRECT_SECRET, &now);
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{out} {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let id = verified(&location)["account_id"].clone();
    assert!(
        out.contains(&format!("\"accountId\":\"{id}\"")) && out.contains("\"ref\":\"session-42\""),
        "{out}"
    );
    // Forged, signed under another key, or stale: refused.
    let forged = location.replace(&format!("account_id={id}"), "account_id=4242");
    let later = (w.app.clock.now() + 3600).to_string();
    for (url, secret, at) in [
        (forged.as_str(), REDIRECT_SECRET, now.as_str()),
        (location.as_str(), "another-secret-0123456789", now.as_str()),
        (location.as_str(), REDIRECT_SECRET, later.as_str()),
    ] {
        assert!(
            !run(url, secret, at).status.success(),
            "{url} {secret} {at}"
        );
    }
    w.d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_longer_than_the_request_timeout_is_cut_with_503() {
    let app = TestApp::start(SandboxConfig {
        faults: refreshd::sandbox::Faults {
            slow: 1.0,
            slow_delay: Duration::from_millis(1500),
            ..Default::default()
        },
        ..SandboxConfig::default()
    })
    .await;
    let mut config = api_config(&app);
    config.server.request_timeout = Duration::from_millis(300);
    let store = app.store().await;
    let id = app.import(&store, &config, &["u1"], None).await[0];
    store.close().await;
    let d = Daemon::start(&app, config).await;
    // The token has 2 h left: min_valid=3h refreshes first, and the provider is slow.
    let started = std::time::Instant::now();
    let (status, _) = d
        .get_auth(
            &format!("/v1/accounts/{id}/token?min_valid=3h"),
            Some(API_TOKEN),
        )
        .await;
    assert_eq!(status, 503);
    assert!(
        started.elapsed() < Duration::from_millis(1200),
        "{:?}",
        started.elapsed()
    );
    // The refresh itself is not cut: the engine commits it.
    assert!(
        helpers::eventually(10, || async {
            d.store.get(id).await.unwrap().unwrap().generation > 0
        })
        .await
    );
    d.stop().await;
}
