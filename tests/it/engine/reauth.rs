//! The re-authorization window: accounts whose refresh token ends soon are flagged and
//! listed in the digest.

use super::{DAY, outcomes, refresh_token, run_once};
use crate::helpers::{T0, TestApp, account};
use refreshd::jobs;
use refreshd::model::{ReauthReason, Status};
use refreshd::sandbox::SandboxConfig;
use std::time::Duration;

#[tokio::test]
async fn reauth_window_flagging_and_digest() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let config = app.config("");
    let window = config.reauth.window;
    assert_eq!(window, Duration::from_secs(7 * DAY as u64));
    let store = app.store().await;
    let days = |d: i64| Duration::from_secs((d * DAY) as u64);
    let short = app
        .import(&store, &config, &["short"], Some(days(30)))
        .await[0];
    let long = app
        .import(&store, &config, &["long"], Some(days(180)))
        .await[0];
    let brief = app
        .import(&store, &config, &["brief"], Some(days(25)))
        .await[0];
    for id in [short, long, brief] {
        assert_eq!(account(&store, id).await.status, Status::Active);
    }

    // Day 24: "short" ends in 6 days and "brief" in 1, both inside the 7-day window.
    app.clock.set(T0 + 24 * DAY);
    let report = jobs::sweep(&store, &app.clock, &config, &Default::default())
        .await
        .unwrap();
    let mut expiring: Vec<i64> = report.expiring.iter().map(|a| a.id).collect();
    expiring.sort();
    assert_eq!(expiring, [short, brief]);
    assert!(report.expired.is_empty());
    for id in [short, brief] {
        let a = account(&store, id).await;
        assert_eq!(a.status, Status::Expiring);
        assert_eq!(a.reauth_reason, Some(ReauthReason::RefreshTokenExpiring));
        assert_eq!(a.reauth_flagged_at, Some(T0 + 24 * DAY));
    }
    assert_eq!(account(&store, long).await.status, Status::Active);
    // Reported once.
    let again = jobs::sweep(&store, &app.clock, &config, &Default::default())
        .await
        .unwrap();
    assert!(again.expiring.is_empty() && again.expired.is_empty());
    assert_eq!(jobs::digest(&store).await.unwrap(), 2);

    // Expiring accounts are still refreshed, and stay expiring (not reported again).
    app.clock.set(T0 + 24 * DAY + 1);
    let report = run_once(&app, &config).await;
    assert_eq!(report.stats.rotated, 3, "{report:?}");
    assert_eq!(report.newly_flagged(), 0, "{report:?}");
    for (id, subject, ends) in [(short, "short", 30), (brief, "brief", 25)] {
        let a = account(&store, id).await;
        assert_eq!(a.status, Status::Expiring, "{subject}");
        assert_eq!(a.reauth_reason, Some(ReauthReason::RefreshTokenExpiring));
        assert_eq!(
            a.reauth_flagged_at,
            Some(T0 + 24 * DAY),
            "{subject}: flag time moved"
        );
        assert_eq!(a.refresh_expires_at, Some(T0 + ends * DAY), "{subject}");
        assert_eq!(a.generation, 1, "{subject}");
        assert_eq!(
            app.sandbox.current_refresh_token(subject).as_deref(),
            Some(refresh_token(&a))
        );
    }
    assert_eq!(account(&store, long).await.status, Status::Active);

    // Day 26: "brief" has ended: the sweep flags it, and it is not refreshed any more.
    app.clock.set(T0 + 26 * DAY);
    let report = jobs::sweep(&store, &app.clock, &config, &Default::default())
        .await
        .unwrap();
    assert_eq!(
        report.expired.iter().map(|a| a.id).collect::<Vec<_>>(),
        [brief]
    );
    assert!(report.expiring.is_empty());
    let a = account(&store, brief).await;
    assert_eq!(a.status, Status::NeedsReauth);
    assert_eq!(a.reauth_reason, Some(ReauthReason::RefreshTokenExpired));
    let requests = app.sandbox.stats().requests;
    let report = run_once(&app, &config).await;
    assert_eq!(report.stats.rotated, 2, "{report:?}");
    assert_eq!(report.newly_flagged(), 0, "{report:?}");
    assert_eq!(app.sandbox.stats().requests, requests + 2);
    assert_eq!(account(&store, short).await.status, Status::Expiring);

    // Day 31: "short" has ended. Nobody swept: the engine flags it without asking the
    // provider (a dead refresh token cannot work).
    app.clock.set(T0 + 31 * DAY);
    let requests = app.sandbox.stats().requests;
    let report = run_once(&app, &config).await;
    assert_eq!(report.stats.rotated, 1, "{report:?}");
    assert_eq!(report.stats.flagged, 1, "{report:?}");
    assert_eq!(report.newly_flagged(), 1, "{report:?}");
    assert_eq!(
        app.sandbox.stats().requests,
        requests + 1,
        "only \"long\" was asked"
    );
    assert_eq!(app.sandbox.stats().expired_rejected, 0);
    let a = account(&store, short).await;
    assert_eq!(a.status, Status::NeedsReauth);
    assert_eq!(a.reauth_reason, Some(ReauthReason::RefreshTokenExpired));
    assert!(
        a.last_error.as_deref().unwrap().contains("expired"),
        "{:?}",
        a.last_error
    );
    assert_eq!(outcomes(&store, short).await[0], "reauth_required");
    let again = jobs::sweep(&store, &app.clock, &config, &Default::default())
        .await
        .unwrap();
    assert!(again.expiring.is_empty() && again.expired.is_empty());
    assert_eq!(jobs::digest(&store).await.unwrap(), 2);
    assert_eq!(account(&store, long).await.status, Status::Active);
    assert_eq!(app.sandbox.stats().reuse_rejected, 0);
}
