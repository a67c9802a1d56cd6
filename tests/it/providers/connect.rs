//! Connect identifies the user the way each profile says, or says what to set when it cannot.

use super::{CLIENT_SECRET, config, open_store, provider_toml, refresh_path};
use crate::helpers::{T0, account, init_logs};
use refreshd::provider::profile::Profile;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// A JWT whose payload is `claims` (unsigned: refreshd reads an id_token's `sub` only from
/// the token endpoint's own answer).
fn jwt(claims: &Value) -> String {
    use base64::Engine;
    let b = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    format!("{}.{}.sig", b(&json!({"alg": "RS256"})), b(claims))
}

#[tokio::test]
async fn connect_identifies_the_user_per_profile() {
    init_logs();
    // (kind, code-exchange answer, userinfo answer or None, the subject refreshd must store)
    let cases: Vec<(&str, Value, Option<Value>, &str)> = vec![
        (
            "google",
            json!({"access_token": "g-at", "expires_in": 3599, "refresh_token": "g-rt",
                   "scope": "openid email", "token_type": "Bearer",
                   "id_token": jwt(&json!({"sub": "google-oauth2|a@example.com", "email": "a@example.com"}))}),
            None,
            // Subjects are stored exactly: `|` and `@` included.
            "google-oauth2|a@example.com",
        ),
        (
            "linkedin",
            json!({"access_token": "l-at", "expires_in": 5183999, "refresh_token": "l-rt",
                   "refresh_token_expires_in": 31536000, "scope": "r_basicprofile"}),
            Some(json!({"sub": "li|782 bbtaQ@x", "name": "A"})),
            "li|782 bbtaQ@x",
        ),
        (
            "x",
            json!({"access_token": "x-at", "expires_in": 7200, "refresh_token": "x-rt",
                   "scope": "tweet.read users.read offline.access", "token_type": "bearer"}),
            Some(json!({"data": {"id": "2244994945", "username": "XDevelopers"}})),
            "2244994945",
        ),
        (
            "instagram",
            json!({"access_token": "ig-at", "user_id": 17841405793187218_i64, "expires_in": 5183944}),
            None,
            "17841405793187218",
        ),
        (
            "facebook",
            json!({"access_token": "fb-at", "token_type": "bearer", "expires_in": 5183944}),
            Some(json!({"id": "10158000000000001"})),
            "10158000000000001",
        ),
    ];
    for (kind, answer, userinfo, subject) in cases {
        let server = MockServer::start().await;
        let token_path = url::Url::parse(&Profile::built_in(kind).unwrap().token_url)
            .unwrap()
            .path()
            .to_string();
        Mock::given(method("POST"))
            .and(path(token_path.clone()))
            .respond_with(ResponseTemplate::new(200).set_body_json(&answer))
            .expect(1)
            .mount(&server)
            .await;
        let access = answer["access_token"].as_str().unwrap().to_string();
        if kind == "instagram" {
            // The short-lived token is traded for a long-lived one right away.
            Mock::given(method("GET"))
                .and(path("/access_token"))
                .and(wiremock::matchers::query_param("grant_type", "ig_exchange_token"))
                .and(wiremock::matchers::query_param("access_token", "ig-at"))
                .and(wiremock::matchers::query_param("client_secret", CLIENT_SECRET))
                .respond_with(ResponseTemplate::new(200).set_body_json(
                    json!({"access_token": "ig-long", "token_type": "bearer", "expires_in": 5183944}),
                ))
                .expect(1)
                .mount(&server)
                .await;
        }
        if kind == "facebook" {
            Mock::given(method("GET"))
                .and(path(token_path.clone()))
                .and(wiremock::matchers::query_param("grant_type", "fb_exchange_token"))
                .and(wiremock::matchers::query_param("fb_exchange_token", "fb-at"))
                .respond_with(ResponseTemplate::new(200).set_body_json(
                    json!({"access_token": "fb-long", "token_type": "bearer", "expires_in": 5183944}),
                ))
                .expect(1)
                .mount(&server)
                .await;
        }
        if let Some(info) = &userinfo {
            Mock::given(method("GET"))
                .and(path("/userinfo"))
                .and(header("authorization", format!("Bearer {access}").as_str()))
                .respond_with(ResponseTemplate::new(200).set_body_json(info))
                .expect(1)
                .mount(&server)
                .await;
        }
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("refreshd.db");
        let extra = format!(
            "redirect_uri = \"http://127.0.0.1:8788/callback\"\nuserinfo_url = \"{0}/userinfo\"\n{1}",
            server.uri(),
            if kind == "instagram" {
                format!("upgrade_url = \"{}/access_token\"\n", server.uri())
            } else {
                String::new()
            }
        );
        let mut toml = provider_toml(kind, kind, &server.uri(), &extra);
        toml = toml.replace(
            &format!("token_url = \"{}{}\"", server.uri(), refresh_path(kind)),
            &format!("token_url = \"{}{token_path}\"", server.uri()),
        );
        let cfg = config(&db, "", &toml);
        let store = open_store(&db).await;
        let connected = refreshd::connect::exchange_and_store(
            &cfg,
            &store,
            refreshd::connect::Exchange {
                provider: kind,
                code: SecretString::from("the-code".to_string()),
                code_verifier: None,
                label: None,
                account: None,
            },
            || T0,
        )
        .await
        .unwrap_or_else(|e| panic!("{kind}: {e}"));
        assert_eq!(connected.open_id, subject, "{kind}");
        let a = account(&store, connected.account_id).await;
        assert_eq!(a.subject, subject, "{kind}");
        let want = match kind {
            "instagram" => "ig-long".to_string(),
            "facebook" => "fb-long".to_string(),
            _ => access.clone(),
        };
        assert_eq!(a.access_token.expose_secret(), want, "{kind}");
        if matches!(kind, "instagram" | "facebook") {
            assert_eq!(
                a.access_expires_at,
                T0 + 5183944,
                "{kind}: the long-lived lifetime"
            );
        }
        store.close().await;
    }
}

#[tokio::test]
async fn connect_without_a_way_to_identify_the_user_says_what_to_set() {
    init_logs();
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(
                json!({"access_token": "a", "expires_in": 60, "refresh_token": "r"}),
            ),
        )
        .mount(&server)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("refreshd.db");
    let toml = format!(
        "[providers.acme]\nkind = \"generic\"\nclient_id = \"c\"\nclient_secret = \"s\"\ntoken_url = \"{}/token\"\nredirect_uri = \"http://127.0.0.1:8788/callback\"\n",
        server.uri()
    );
    let cfg = config(&db, "", &toml);
    let store = open_store(&db).await;
    let err = refreshd::connect::exchange_and_store(
        &cfg,
        &store,
        refreshd::connect::Exchange {
            provider: "acme",
            code: SecretString::from("code".to_string()),
            code_verifier: None,
            label: None,
            account: None,
        },
        || T0,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("subject_field") && err.contains("userinfo_url"),
        "{err}"
    );
    assert!(!err.contains("\"a\""), "{err}");
    store.close().await;
}
