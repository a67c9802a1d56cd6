//! Slow clients: idle, slow and dripping connections are closed after the header read
//! timeout, and a request longer than the request timeout is cut with 503.

use super::{API_TOKEN, Daemon, api_config, server_config};
use crate::helpers::{self, TestApp};
use refreshd::sandbox::SandboxConfig;
use std::time::Duration;

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
