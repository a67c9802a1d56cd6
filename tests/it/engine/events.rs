//! Events for listeners in the process (sinks, webhooks): each state change is announced once.

use super::{all_due_at, config_with, drain, engine};
use crate::helpers::{TestApp, account};
use refreshd::engine::Settings;
use refreshd::sandbox::SandboxConfig;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn engine_announces_state_changes_once() {
    use refreshd::events::Event;
    let app = TestApp::start(SandboxConfig::default()).await;
    let config = app.config("");
    let store = app.store().await;
    let ids = app
        .import(&store, &config, &["u1", "u2", "gone"], None)
        .await;
    app.sandbox.revoke("gone");
    let (engine, settings) = engine(&store, &app.clock, &config);
    let mut rx = engine.events().subscribe();

    app.clock.set(all_due_at(&store, &ids).await);
    engine.run_due(CancellationToken::new()).await.unwrap();
    let mut events = drain(&mut rx);
    events.sort_by_key(|e| format!("{e:?}"));
    assert_eq!(
        events,
        vec![
            Event::ReauthRequired {
                account_id: ids[2],
                provider: "tiktok".into(),
                subject: "gone".into(),
                label: Some("label of gone".into()),
                reason: "invalid_grant".into(),
                refresh_expires_at: account(&store, ids[2]).await.refresh_expires_at,
            },
            Event::TokensChanged {
                account_id: ids[0],
                provider: "tiktok".into(),
                subject: "u1".into(),
            },
            Event::TokensChanged {
                account_id: ids[1],
                provider: "tiktok".into(),
                subject: "u2".into(),
            },
        ]
    );

    // Wrong client credentials: announced once for the provider, not once per account.
    let wrong = config_with(
        &app,
        &app.sandbox.token_url(),
        &[
            ("providers.tiktok", "client_secret", "not-the-secret".into()),
            ("refresh", "config_error_retry", "10m".into()),
        ],
    );
    settings.send_replace(Arc::new(Settings::new(wrong).unwrap()));
    app.clock.set(all_due_at(&store, &ids[..2]).await);
    engine.run_due(CancellationToken::new()).await.unwrap();
    let events = drain(&mut rx);
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(
        matches!(&events[0], Event::ProviderRejected { provider, error } if provider == "tiktok" && !error.contains("not-the-secret")),
        "{events:?}"
    );
    assert!(app.sandbox.stats().client_rejected >= 2);

    // Fixed credentials: the provider recovers once, both accounts get new tokens.
    settings.send_replace(Arc::new(Settings::new(config.clone()).unwrap()));
    app.clock.advance(Duration::from_secs(11 * 60));
    engine.run_due(CancellationToken::new()).await.unwrap();
    let events = drain(&mut rx);
    let kinds: Vec<&str> = events.iter().map(|e| e.kind()).collect();
    assert_eq!(
        kinds,
        ["provider_recovered", "tokens_changed", "tokens_changed"],
        "{events:?}"
    );
}
