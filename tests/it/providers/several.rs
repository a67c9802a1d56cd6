//! Several providers in one daemon: one provider's outage never delays another, and
//! re-authorization follows each profile's refresh-token TTL rule.

use super::{DAY, config, ok_body, open_store, provider_toml, refresh_path};
use crate::helpers::{self, T0, account, init_logs};
use refreshd::clock::Clock;
use refreshd::config::Config;
use refreshd::engine::{Engine, Settings};
use refreshd::model::{ReauthReason, Status};
use refreshd::store::Store;
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// Imports one account per subject for `provider`, obtained at `obtained_at`.
async fn import(
    store: &Store,
    config: &Config,
    provider: &str,
    subjects: &[String],
    obtained_at: i64,
    fields: Value,
) -> Vec<i64> {
    let text: String = subjects
        .iter()
        .map(|s| {
            let mut line = json!({
                "provider": provider, "subject": s, "obtained_at": obtained_at,
                "access_token": format!("AT-{s}"), "expires_in": 3600,
                "refresh_token": format!("RT-{s}"),
            });
            for (k, v) in fields.as_object().unwrap() {
                if v.is_null() {
                    line.as_object_mut().unwrap().remove(k);
                } else {
                    line[k] = v.clone();
                }
            }
            line.to_string() + "\n"
        })
        .collect();
    helpers::import_text(store, config, "test", &text, T0.max(obtained_at)).await
}

/// A stalled provider (answers after the request timeout), a throttled one (1 request a
/// minute) and a failing one (503) share one daemon with a healthy one: every account of
/// the healthy provider is refreshed at once, and failures are counted per account of the
/// failing provider only.
#[tokio::test]
async fn one_providers_outage_never_delays_another() {
    init_logs();
    let stalled = MockServer::start().await;
    let throttled = MockServer::start().await;
    let failing = MockServer::start().await;
    let healthy = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(ok_body("late"))
                .set_delay(Duration::from_secs(5)),
        )
        .mount(&stalled)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(ok_body("throttled-new")))
        .mount(&throttled)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503).set_body_string("unavailable"))
        .mount(&failing)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(ok_body("healthy-new")))
        .mount(&healthy)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("refreshd.db");
    let providers = [
        provider_toml("linkedin", "linkedin", &stalled.uri(), ""),
        provider_toml("pinterest", "pinterest", &throttled.uri(), "").replace(
            "rate_limit = 600000\nburst = 1000",
            "rate_limit = 1\nburst = 1",
        ),
        provider_toml("x", "x", &failing.uri(), ""),
        provider_toml("google", "google", &healthy.uri(), ""),
    ]
    .concat();
    let config = config(&db, "concurrency = 8", &providers);
    let store = open_store(&db).await;
    let names = |p: &str, n: usize| (0..n).map(|i| format!("{p}-{i}")).collect::<Vec<_>>();
    // The troubled providers' accounts are due first: under a global-only cap they would
    // take every permit before the healthy provider's turn.
    let no_ttl = json!({});
    let mut troubled = Vec::new();
    for p in ["linkedin", "pinterest", "x"] {
        troubled.extend(import(&store, &config, p, &names(p, 30), T0 - 3000, no_ttl.clone()).await);
    }
    let good = import(&store, &config, "google", &names("google", 40), T0, no_ttl).await;
    let clock = Clock::manual(T0 + 3100);
    let settings = Arc::new(Settings::new(config.clone()).unwrap());
    let (_tx, rx) = watch::channel(settings);
    let engine = Engine::new(store.clone(), clock.clone(), rx);
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let run = tokio::spawn({
        let engine = engine.clone();
        let shutdown = shutdown.clone();
        async move { engine.run(shutdown).await }
    });
    let mut all_done = None;
    while started.elapsed() < Duration::from_secs(4) {
        let mut done = 0;
        for id in &good {
            if account(&store, *id).await.access_token.expose_secret() == "healthy-new" {
                done += 1;
            }
        }
        if done == good.len() {
            all_done = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = all_done.expect("the healthy provider's accounts were delayed by the others");
    eprintln!(
        "healthy provider: {} accounts refreshed in {took:?} while the others stalled",
        good.len()
    );
    assert!(took < Duration::from_millis(1500), "{took:?}");
    for id in &good {
        let a = account(&store, *id).await;
        assert_eq!((a.status, a.failures), (Status::Active, 0));
    }
    // The failing provider's accounts each count their own failure; nobody is flagged.
    let mut failed = 0;
    for id in &troubled {
        let a = account(&store, *id).await;
        assert_ne!(a.status, Status::NeedsReauth);
        if a.provider == "x" && a.failures == 1 {
            failed += 1;
        }
    }
    assert!(failed > 0, "the 503 provider was not tried at all");
    shutdown.cancel();
    run.await.unwrap().unwrap();
    // The throttled provider got its one request a minute, not more.
    assert!(throttled.received_requests().await.unwrap().len() <= 1);
}

/// Re-authorization by each profile's refresh-token TTL rule, through `run --once`.
#[tokio::test]
async fn reauth_follows_each_profiles_ttl_rule() {
    init_logs();
    let server = MockServer::start().await;
    // Pinterest: sliding, renewed by refreshing.
    Mock::given(method("POST"))
        .and(path(refresh_path("pinterest")))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "access_token":"pina_NEW","refresh_token":"pinr_NEW","response_type":"refresh_token",
            "token_type":"bearer","expires_in":2592000,"refresh_token_expires_in":5184000,"scope":"boards:read"
        })))
        .mount(&server)
        .await;
    // LinkedIn: fixed from the first grant; the answer's longer TTL does not extend it.
    Mock::given(method("POST"))
        .and(path(refresh_path("linkedin")))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "access_token":"AQV-NEW","expires_in":5184000,"refresh_token":"AQX-SAME","refresh_token_expires_in":31536000
        })))
        .mount(&server)
        .await;
    // Instagram: the long-lived access token is extended with itself.
    Mock::given(method("GET"))
        .and(path(refresh_path("instagram")))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "access_token":"IGQ-NEW","token_type":"bearer","expires_in":5183944
        })))
        .mount(&server)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("refreshd.db");
    let uri = server.uri();
    let config = config(
        &db,
        "",
        &[
            provider_toml("pinterest", "pinterest", &uri, ""),
            provider_toml("linkedin", "linkedin", &uri, ""),
            provider_toml("instagram", "instagram", &uri, ""),
        ]
        .concat(),
    );
    let store = open_store(&db).await;
    let one = |s: &str| vec![s.to_string()];
    let obtained = T0 - 3000;
    let pin = import(
        &store,
        &config,
        "pinterest",
        &one("p"),
        obtained,
        json!({"refresh_expires_in": 3 * DAY}),
    )
    .await[0];
    let li = import(
        &store,
        &config,
        "linkedin",
        &one("l"),
        obtained,
        json!({"refresh_expires_in": 100 * DAY}),
    )
    .await[0];
    let ig = import(
        &store,
        &config,
        "instagram",
        &one("ok"),
        T0 - 2 * DAY,
        json!({"refresh_token": null, "expires_in": 2 * DAY + 3600}),
    )
    .await[0];
    let ig_dead = import(
        &store,
        &config,
        "instagram",
        &one("dead"),
        T0 - 70 * DAY,
        json!({"refresh_token": null, "expires_in": 60 * DAY}),
    )
    .await[0];
    let ig_young = import(
        &store,
        &config,
        "instagram",
        &one("young"),
        T0,
        json!({"refresh_token": null, "expires_in": 60 * DAY}),
    )
    .await[0];
    // An admin asks for a refresh now (`accounts refresh`).
    store.mark_due(ig_young, T0, false).await.unwrap();
    assert_eq!(account(&store, pin).await.status, Status::Expiring);
    store.close().await;

    let clock = Clock::manual(T0 + 3300);
    let report = helpers::run_once(&config, clock.clone()).await;
    let now = T0 + 3300;
    let store = open_store(&db).await;

    let a = account(&store, pin).await;
    assert_eq!(a.status, Status::Active, "sliding TTL renewed");
    assert_eq!(a.refresh_expires_at, Some(now + 5_184_000));
    assert_eq!(a.refresh_token.expose_secret(), "pinr_NEW");

    let a = account(&store, li).await;
    assert_eq!(a.access_token.expose_secret(), "AQV-NEW");
    assert_eq!(
        a.refresh_expires_at,
        Some(obtained + 100 * DAY),
        "fixed TTL counts from the first grant"
    );

    let a = account(&store, ig).await;
    assert_eq!(a.access_token.expose_secret(), "IGQ-NEW");
    assert_eq!(a.status, Status::Active);
    assert_eq!(a.access_expires_at, now + 5_183_944);
    assert!(a.next_refresh_at >= now + DAY);

    let a = account(&store, ig_dead).await;
    assert_eq!(a.status, Status::NeedsReauth);
    assert_eq!(a.reauth_reason, Some(ReauthReason::RefreshTokenExpired));
    assert!(
        a.last_error
            .as_deref()
            .unwrap()
            .contains("cannot be extended"),
        "{:?}",
        a.last_error
    );

    // Younger than 24 h: not sent (Instagram would refuse), tried again when old enough.
    let a = account(&store, ig_young).await;
    assert_eq!(a.access_token.expose_secret(), "AT-young");
    assert_eq!(a.status, Status::Active);
    assert_eq!(a.next_refresh_at, T0 + DAY);
    let requests = server.received_requests().await.unwrap();
    let ig_requests = requests
        .iter()
        .filter(|r| r.url.path() == refresh_path("instagram"))
        .count();
    assert_eq!(
        ig_requests, 1,
        "only the old-enough, unexpired Instagram token is sent"
    );
    assert!(report.stats.flagged >= 1, "{report:?}");
}
