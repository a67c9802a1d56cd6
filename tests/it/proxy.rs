//! The token proxy end to end: the real daemon (ops server on loopback, engine, SQLite store)
//! forwarding to the sandbox's API, which checks every access token. Each test runs on one
//! thread so the daemon's logs are captured and searched for secrets.

use crate::helpers::{Logs, TestApp};
use refreshd::config::Config;
use refreshd::engine::Engine;
use refreshd::lifecycle::{self, RunOptions};
use refreshd::sandbox::{SandboxConfig, SandboxStats};
use refreshd::store::Store;
use secrecy::ExposeSecret;
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const API_TOKEN: &str = "proxy-test-api-token-0123456789";

/// A daemon with the token API and the proxy, `providers.tiktok.api_base` on the sandbox,
/// and accounts `alice` and `bob` imported.
struct World {
    app: TestApp,
    addr: SocketAddr,
    store: Store,
    shutdown: CancellationToken,
    http: reqwest::Client,
    ids: Vec<i64>,
    logs: Logs,
    _log_guard: tracing::subscriber::DefaultGuard,
    daemon: tokio::task::JoinHandle<Result<lifecycle::RunReport, lifecycle::DaemonError>>,
}

impl World {
    async fn start(proxy: &str) -> World {
        let logs = Logs::default();
        let log_guard = tracing::subscriber::set_default(logs.subscriber());
        let app = TestApp::start(SandboxConfig::default()).await;
        let token_file = app.dir.path().join("api-token");
        std::fs::write(&token_file, API_TOKEN).unwrap();
        let mut config: Config = app.config(&format!(
            "api_base = {:?}\n\n[server]\nlisten = \"127.0.0.1:0\"\nunix_socket = {:?}\napi_token_file = {:?}\n\n[proxy]\n{proxy}\n",
            app.sandbox.api_base(),
            app.dir.path().join("refreshd.sock").display().to_string(),
            token_file.display().to_string()
        ));
        config.store.create = true;
        let store = app.store().await;
        let ids = app.import(&store, &config, &["alice", "bob"], None).await;
        store.close().await;
        let shutdown = CancellationToken::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let opts = RunOptions {
            on_ready: Some(Box::new(move |store: &Store, _: &Engine, addr| {
                let _ = tx.send((store.clone(), addr));
            })),
            ..RunOptions::new(app.clock.clone())
        };
        let daemon = tokio::spawn(lifecycle::run(config, opts, shutdown.clone()));
        let (store, addr) = tokio::time::timeout(Duration::from_secs(20), rx)
            .await
            .expect("daemon ready in time")
            .expect("daemon started");
        World {
            app,
            addr: addr.expect("the server listens"),
            store,
            shutdown,
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
            ids,
            logs,
            _log_guard: log_guard,
            daemon,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn access_token(&self, id: i64) -> String {
        let a = self.store.get(id).await.unwrap().unwrap();
        a.access_token.expose_secret().to_string()
    }

    async fn generation(&self, id: i64) -> i64 {
        self.store.get(id).await.unwrap().unwrap().generation
    }

    fn stats(&self) -> SandboxStats {
        self.app.sandbox.stats()
    }

    /// Sends `req` with the API secret; the status and the body as JSON (Null if not JSON).
    async fn call(&self, req: reqwest::RequestBuilder) -> (u16, Value) {
        let r = req.bearer_auth(API_TOKEN).send().await.expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(self.http.get(self.url(path))).await
    }

    /// A request written by hand, so the path reaches the server exactly as written (a
    /// client library would resolve `..` first). Returns the status code.
    async fn raw_status(&self, path: &str) -> u16 {
        let mut s = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {API_TOKEN}\r\nConnection: close\r\n\r\n",
            self.addr
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out.split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect(&out)
    }

    /// Stops the daemon and waits for it to end: every line it logs is in the logs.
    async fn stop(self) -> String {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.daemon)
            .await
            .expect("the daemon stops in time")
            .expect("the daemon task did not panic")
            .expect("the daemon stops cleanly");
        self.logs.text()
    }
}

fn assert_no_secret(logs: &str, secrets: &[String]) {
    for s in secrets {
        assert!(!logs.contains(s.as_str()), "a secret is in the logs: {s}");
    }
}

#[tokio::test]
async fn the_proxy_carries_a_request_with_the_current_token_and_survives_a_401() {
    let w = World::start("").await;
    let id = w.ids[0];
    let first = w.access_token(id).await;
    let info = format!("/proxy/{id}/v2/user/info/?fields=open_id,display_name");
    let (status, body) = w.get(&info).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["user"]["open_id"], "alice");
    assert_eq!(w.stats().api_calls, 1);

    // The API stops taking the (unexpired) token: one refresh, one retry, the caller gets 200.
    w.app.sandbox.refuse_in_api(&first);
    let generation = w.generation(id).await;
    let before = w.stats();
    let (status, body) = w.get(&info).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["user"]["open_id"], "alice");
    let after = w.stats();
    assert_eq!(
        after.refreshed - before.refreshed,
        1,
        "exactly one rotation"
    );
    assert_eq!(after.api_calls - before.api_calls, 2, "one try, one retry");
    assert_eq!(after.api_unauthorized - before.api_unauthorized, 1);
    assert_eq!(after.reuse_rejected, 0);
    assert_eq!(w.generation(id).await, generation + 1);
    let second = w.access_token(id).await;
    assert_ne!(second, first);

    // The next call uses the new token at once.
    let (status, _) = w.get(&info).await;
    assert_eq!(status, 200);
    assert_eq!(w.stats().refreshed, after.refreshed);

    let (status, metrics) = (
        200,
        w.http
            .get(w.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    assert_eq!(status, 200);
    assert!(
        metrics.contains(r#"refreshd_proxy_requests_total{provider="tiktok",outcome="retried"} 1"#),
        "{metrics}"
    );
    let logs = w.stop().await;
    assert!(logs.contains("proxy_token_refused"), "{logs}");
    assert!(logs.contains("proxy_request"), "{logs}");
    assert_no_secret(&logs, &[first, second, API_TOKEN.to_string()]);
}

#[tokio::test]
async fn a_second_401_is_passed_back_to_the_caller() {
    let w = World::start("").await;
    let id = w.ids[1];
    let first = w.access_token(id).await;
    w.app.sandbox.refuse_user_in_api("bob");
    let (status, body) = w.get(&format!("/proxy/{id}/v2/user/info/")).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(
        body["error"]["code"], "access_token_invalid",
        "TikTok's own answer"
    );
    let s = w.stats();
    assert_eq!(s.refreshed, 1, "one refresh, not one per 401");
    assert_eq!((s.api_calls, s.api_unauthorized), (2, 2));
    let second = w.access_token(id).await;
    let logs = w.stop().await;
    assert_no_secret(&logs, &[first, second]);
}

#[tokio::test]
async fn paths_that_would_leave_the_api_base_and_callers_without_the_secret_are_refused() {
    let w = World::start("").await;
    let id = w.ids[0];
    for path in [
        format!("/proxy/{id}/../../v1/accounts/{id}/token"),
        format!("/proxy/{id}/v2/../../x"),
        format!("/proxy/{id}/v2/%2e%2e/x"),
        format!("/proxy/{id}/%2F%2Fevil.example/x"),
        format!("/proxy/{id}/v2/%5c..%5cx"),
        format!("/proxy/{id}/v2/%252e%252e/x"),
        format!("/proxy/{id}/https://evil.example/x"),
        format!("/proxy/{id}//evil.example/x"),
        format!("/proxy/{id}/user@evil.example/x"),
        format!("/proxy/{id}/v2\\..\\x"),
        format!("/proxy/{id}/http:evil.example"),
    ] {
        let status = w.raw_status(&path).await;
        assert!(
            status == 400 || status == 404,
            "{path}: {status}, expected a refusal"
        );
    }
    // (A client library resolves `%2e%2e` itself; an encoded slash it keeps.)
    let (status, body) = w.get(&format!("/proxy/{id}/v2/%2F%2Fevil.example/x")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("path_refused"))
    );
    // No bearer, a wrong one, the account's own token: 401, nothing forwarded.
    let info = w.url(&format!("/proxy/{id}/v2/user/info/"));
    let token = w.access_token(id).await;
    for bearer in [None, Some("wrong"), Some(token.as_str())] {
        let mut req = w.http.get(&info);
        if let Some(b) = bearer {
            req = req.bearer_auth(b);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status().as_u16(), 401, "{bearer:?}");
    }
    assert_eq!(w.stats().api_calls, 0, "nothing reached the API");
    let (status, body) = w.get("/proxy/999/v2/user/info/").await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
    let logs = w.stop().await;
    assert!(logs.contains("proxy_unauthorized"), "{logs}");
    assert_no_secret(&logs, &[token, API_TOKEN.to_string()]);
}

#[tokio::test]
async fn disabled_and_flagged_accounts_are_refused_with_the_reason() {
    let w = World::start("").await;
    let (alice, bob) = (w.ids[0], w.ids[1]);
    w.store
        .set_disabled(
            alice,
            true,
            w.app.clock.now(),
            &refreshd::store::Actor {
                who: "proxy test".into(),
                via: "tests/it/proxy.rs".into(),
            },
        )
        .await
        .unwrap();
    let (status, body) = w.get(&format!("/proxy/{alice}/v2/user/info/")).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"], "account_disabled");
    let msg = body["message"].as_str().unwrap();
    assert!(
        msg.contains(&format!("account {alice}")) && msg.contains("accounts enable"),
        "{msg}"
    );

    crate::helpers::flag_invalid_grant(&w.store, bob).await;
    let (status, body) = w.get(&format!("/proxy/{bob}/v2/user/info/")).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"], "needs_reauth");
    let msg = body["message"].as_str().unwrap();
    assert!(
        msg.contains("invalid_grant") && msg.contains("refreshd connect tiktok"),
        "{msg}"
    );
    assert_eq!(w.stats().api_calls, 0, "nothing forwarded");
    w.stop().await;
}

#[tokio::test]
async fn bodies_are_bounded_resent_on_retry_and_answers_streamed_within_the_bound() {
    let w = World::start("max_request_bytes = 4096\nmax_response_bytes = 100000\n").await;
    let id = w.ids[0];
    let echo = w.url(&format!("/proxy/{id}/v2/echo/?a=1&b=two"));
    let send = |body: Vec<u8>| {
        w.http
            .post(&echo)
            .header("content-type", "text/plain")
            .header("connection", "keep-alive, x-private")
            .header("x-private", "hop")
            .header("x-app", "kept")
            .body(body)
    };
    let (status, body) = w.call(send(vec![b'a'; 3000])).await;
    assert_eq!(status, 200, "{body}");
    let data = &body["data"];
    assert_eq!(
        (data["method"].as_str(), data["body_bytes"].as_u64()),
        (Some("POST"), Some(3000))
    );
    assert_eq!(data["query"]["b"], "two");
    let headers: Vec<&str> = data["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        headers.contains(&"x-app") && headers.contains(&"authorization"),
        "{headers:?}"
    );
    assert!(
        !headers.contains(&"x-private") && !headers.contains(&"keep-alive"),
        "{headers:?}"
    );

    // The body is resent after a 401 and a refresh.
    w.app.sandbox.refuse_in_api(&w.access_token(id).await);
    let (status, body) = w.call(send(vec![b'b'; 4000])).await;
    assert_eq!(
        (status, body["data"]["body_bytes"].as_u64()),
        (200, Some(4000)),
        "{body}"
    );
    assert_eq!(w.stats().refreshed, 1);

    // Over the request bound: 413, nothing forwarded.
    let calls = w.stats().api_calls;
    let (status, body) = w.call(send(vec![b'c'; 5000])).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (413, Some("request_too_large"))
    );
    assert_eq!(w.stats().api_calls, calls);

    // Answers: within the bound streamed whole; announced larger 502; unannounced cut.
    let get = |q: &str| {
        w.http
            .get(w.url(&format!("/proxy/{id}/v2/echo/?{q}")))
            .bearer_auth(API_TOKEN)
    };
    let r = get("size=90000&chunked=1").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.bytes().await.unwrap().len(), 90000);
    let (status, body) = w
        .call(
            w.http
                .get(w.url(&format!("/proxy/{id}/v2/echo/?size=200000"))),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (502, Some("response_too_large"))
    );
    let r = get("size=200000&chunked=1").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let got = r.bytes().await.map(|b| b.len()).unwrap_or(0);
    assert!(got <= 100000, "cut at the bound, got {got}");
    let logs = w.stop().await;
    assert!(logs.contains("proxy_response_cut"), "{logs}");
    assert!(
        !logs.contains("bbbbbbbb") && !logs.contains("aaaaaaaa"),
        "no body in the logs"
    );
}

#[tokio::test]
async fn the_unix_socket_serves_the_proxy_behind_the_same_secret() {
    let w = World::start("").await;
    let id = w.ids[0];
    let http = reqwest::Client::builder()
        .unix_socket(w.app.dir.path().join("refreshd.sock"))
        .build()
        .unwrap();
    let url = format!("http://refreshd/proxy/{id}/v2/user/info/");
    let r = http.get(&url).send().await.unwrap();
    assert_eq!(
        r.status().as_u16(),
        401,
        "the socket does not replace the secret"
    );
    let r = http.get(&url).bearer_auth(API_TOKEN).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["data"]["user"]["open_id"], "alice");
    assert_eq!(w.stats().api_calls, 1);
    w.stop().await;
}
