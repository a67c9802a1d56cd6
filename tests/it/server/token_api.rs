//! The token API: its bearer secret, refresh on request, no routes without a secret, and the
//! same routes on a Unix socket.

use super::{API_TOKEN, Daemon, api_config, server_config};
use crate::helpers::TestApp;
use refreshd::config::Config;
use refreshd::sandbox::SandboxConfig;
use secrecy::ExposeSecret;
use std::time::Duration;

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
