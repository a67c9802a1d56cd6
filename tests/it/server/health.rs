//! Health, readiness (also of a stalled loop or a failing store) and metrics after refreshes.

use super::{Daemon, server_config};
use crate::helpers::{self, TestApp};
use refreshd::sandbox::SandboxConfig;
use std::time::Duration;

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
