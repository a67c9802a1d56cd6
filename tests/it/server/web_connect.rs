//! The web connect flow end to end (the test plays the browser): the happy path, replays,
//! refusals, reconnecting a flagged account, and the label's limits.

use super::{REDIRECT_SECRET, Web, verified};
use refreshd::events::Event;
use refreshd::model::{ReauthReason, Status};
use refreshd::sandbox::Consent;
use refreshd::store::Outcome;
use secrecy::ExposeSecret;
use std::time::Duration;

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
            owner: None,
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
