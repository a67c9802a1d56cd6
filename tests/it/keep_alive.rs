//! Keep-alive refresh end to end: with `providers.NAME.refresh_at_least_every`, accounts
//! whose access tokens live for weeks are still refreshed at least that often, against the
//! sandbox, on the manual clock over simulated days.

use crate::helpers::{T0, TestApp, account, rotation_times};
use refreshd::engine::{Engine, Settings};
use refreshd::import::Importer;
use refreshd::sandbox::SandboxConfig;
use refreshd::store::Store;
use secrecy::ExposeSecret;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const HOUR: i64 = 3_600;
const DAY: i64 = 86_400;

/// Imports `open_ids` as the CLI does, each provider scheduled with its keep-alive.
async fn import_kept_alive(
    app: &TestApp,
    store: &Store,
    config: &refreshd::config::Config,
    open_ids: &[&str],
) -> Vec<i64> {
    let keep_alive: HashMap<String, Duration> = config
        .providers
        .keys()
        .filter_map(|p| config.keep_alive_of(p).map(|d| (p.clone(), d)))
        .collect();
    let now = app.clock.now();
    let mut importer = Importer::new(
        "test",
        now,
        config.refresh.timing(),
        config.reauth.window,
        |p: &str| config.credential_of(p),
    )
    .with_keep_alive(keep_alive);
    let records: Vec<_> = open_ids
        .iter()
        .enumerate()
        .filter_map(|(i, o)| importer.line(i + 1, &app.grant_line(o, None)))
        .collect();
    importer.finish().expect("valid import");
    store
        .upsert(records, now)
        .await
        .expect("upsert")
        .into_iter()
        .map(|(id, _)| id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_lived_access_tokens_are_refreshed_at_least_every_interval() {
    const SIM_DAYS: i64 = 10;
    let app = TestApp::start(SandboxConfig {
        access_ttl: Duration::from_secs(30 * DAY as u64),
        refresh_ttl: Duration::from_secs(365 * DAY as u64),
        ..SandboxConfig::default()
    })
    .await;
    let config = app.config("refresh_at_least_every = \"1d\"\n");
    let store = app.store().await;
    let settings = Arc::new(Settings::new(config.clone()).expect("providers"));
    let (_tx, rx) = tokio::sync::watch::channel(settings);
    let engine = Engine::new(store.clone(), app.clock.clone(), rx);

    let kept = import_kept_alive(&app, &store, &config, &["ka-1", "ka-2", "ka-3"]).await;
    // The control: the same grant imported without the keep-alive waits for the lead rule
    // (30 days - 3 days of lead), past the end of this run.
    let control = crate::helpers::import_text(
        &store,
        &config,
        "test",
        &(app.grant_line("ctl", None) + "\n"),
        T0,
    )
    .await[0];
    assert_eq!(
        account(&store, control).await.next_refresh_at,
        T0 + 27 * DAY
    );

    let end = T0 + SIM_DAYS * DAY;
    let mut now = T0;
    while now < end {
        now += HOUR;
        app.clock.set(now);
        engine.run_due(CancellationToken::new()).await.unwrap();
    }

    let mut total = 0;
    for id in kept {
        let a = account(&store, id).await;
        let times = rotation_times(&store, id).await;
        // Due each day exactly (no jitter in the tests' config), refreshed on the hour.
        assert_eq!(times.len() as i64, SIM_DAYS, "{}: {times:?}", a.subject);
        let mut last = T0;
        for t in &times {
            assert!(
                t - last <= DAY,
                "{}: {}s without a refresh",
                a.subject,
                t - last
            );
            last = *t;
        }
        assert!(end - last <= DAY, "{}", a.subject);
        // The access token still has weeks left, and the tokens are the provider's current.
        assert!(a.access_expires_at - now > 28 * DAY, "{}", a.subject);
        assert!(
            app.sandbox
                .access_token_valid(&a.subject, a.access_token.expose_secret())
        );
        assert_eq!(
            app.sandbox.current_refresh_token(&a.subject).as_deref(),
            Some(a.refresh_token.expose_secret())
        );
        total += times.len() as u64;
    }
    let control = rotation_times(&store, control).await;
    assert!(control.is_empty(), "the control was refreshed: {control:?}");
    let s = app.sandbox.stats();
    assert_eq!((s.refreshed, s.reuse_rejected), (total, 0), "{s:?}");
}
