//! Built-in provider profiles against wiremock on loopback: the exact request each one sends
//! (method, path, client auth, parameters) and how each documented answer is classified
//! (fixtures shaped as docs/src/providers/ describes); then the engine with several providers at once: independent
//! rate limits and failure counters, one provider's outage never delaying another, and
//! re-authorization by each profile's refresh-token TTL rule.

use crate::helpers::{self, T0, account, init_logs};
use refreshd::clock::Clock;
use refreshd::config::Config;
use refreshd::engine::{Engine, Settings};
use refreshd::lifecycle::{self, RunOptions};
use refreshd::model::{ReauthReason, Status, TokenSet};
use refreshd::provider::profile::Profile;
use refreshd::provider::{FailureClass, Provider, ProviderFailure};
use refreshd::store::Store;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use wiremock::matchers::{header, method, path};
use wiremock::{Match, Mock, MockServer, Request, ResponseTemplate};

const CLIENT_ID: &str = "cid-123";
const CLIENT_SECRET: &str = "csecret-456";
const DAY: i64 = 86_400;

/// The path of a built-in profile's refresh endpoint: the test serves it on loopback.
fn refresh_path(kind: &str) -> String {
    let p = Profile::built_in(kind).expect("built in");
    url::Url::parse(p.refresh_endpoint())
        .expect("url")
        .path()
        .to_string()
}

/// `[providers.NAME]` of `kind` with credentials, both endpoints on `server`, and `extra`.
fn provider_toml(name: &str, kind: &str, server: &str, extra: &str) -> String {
    let path = refresh_path(kind);
    format!(
        "[providers.{name}]\nkind = \"{kind}\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret = \"{CLIENT_SECRET}\"\ntoken_url = \"{server}{path}\"\nrefresh_url = \"{server}{path}\"\nrate_limit = 600000\nburst = 1000\n{extra}\n"
    )
}

fn config(db: &Path, refresh_extra: &str, providers: &str) -> Config {
    Config::from_toml_str(&format!(
        r#"
[store]
path = {db:?}
lease = "30s"

[refresh]
lead = "10m"
jitter = "0s"
min_interval = "1m"
request_timeout = "1s"
connect_timeout = "1s"
max_idle = "1s"
{refresh_extra}

[shutdown]
grace = "10s"

{providers}
"#,
        db = db.display().to_string()
    ))
    .expect("test config")
}

/// Matches a request whose parameters (query and form body together) are exactly
/// `params`, and whose Authorization header is HTTP Basic with our client iff `basic`.
struct Exact {
    params: BTreeMap<String, String>,
    basic: bool,
}

impl Match for Exact {
    fn matches(&self, req: &Request) -> bool {
        let mut got: BTreeMap<String, String> = req.url.query_pairs().into_owned().collect();
        if req
            .headers
            .get("content-type")
            .is_some_and(|v| v.to_str().unwrap_or("").contains("form-urlencoded"))
        {
            got.extend(url::form_urlencoded::parse(&req.body).into_owned());
        } else if !req.body.is_empty() {
            return false;
        }
        let auth = req
            .headers
            .get("authorization")
            .map(|v| v.to_str().unwrap_or("").to_string());
        let want_auth = self.basic.then(|| {
            use base64::Engine;
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD
                    .encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"))
            )
        });
        got == self.params && auth == want_auth
    }
}

/// What a built-in profile must send on refresh.
struct Shape {
    kind: &'static str,
    method: &'static str,
    basic: bool,
    /// The stored credential presented: the refresh token, or the access token itself.
    credential: &'static str,
    params: &'static [(&'static str, &'static str)],
}

const RT: &str = "RT-OLD";
const AT: &str = "AT-OLD";

const SHAPES: &[Shape] = &[
    Shape {
        kind: "tiktok",
        method: "POST",
        basic: false,
        credential: RT,
        params: &[
            ("client_key", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
            ("grant_type", "refresh_token"),
            ("refresh_token", RT),
        ],
    },
    Shape {
        kind: "google",
        method: "POST",
        basic: false,
        credential: RT,
        params: &[
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
            ("grant_type", "refresh_token"),
            ("refresh_token", RT),
        ],
    },
    Shape {
        kind: "linkedin",
        method: "POST",
        basic: false,
        credential: RT,
        params: &[
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
            ("grant_type", "refresh_token"),
            ("refresh_token", RT),
        ],
    },
    Shape {
        kind: "x",
        method: "POST",
        basic: true,
        credential: RT,
        params: &[
            ("client_id", CLIENT_ID),
            ("grant_type", "refresh_token"),
            ("refresh_token", RT),
        ],
    },
    Shape {
        kind: "pinterest",
        method: "POST",
        basic: true,
        credential: RT,
        params: &[
            ("continuous_refresh", "true"),
            ("grant_type", "refresh_token"),
            ("refresh_token", RT),
        ],
    },
    Shape {
        kind: "instagram",
        method: "GET",
        basic: false,
        credential: AT,
        params: &[("access_token", AT), ("grant_type", "ig_refresh_token")],
    },
    Shape {
        kind: "facebook",
        method: "GET",
        basic: false,
        credential: AT,
        params: &[
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
            ("fb_exchange_token", AT),
            ("grant_type", "fb_exchange_token"),
        ],
    },
    Shape {
        kind: "threads",
        method: "GET",
        basic: false,
        credential: AT,
        params: &[("access_token", AT), ("grant_type", "th_refresh_token")],
    },
    Shape {
        kind: "reddit",
        method: "POST",
        basic: true,
        credential: RT,
        params: &[("grant_type", "refresh_token"), ("refresh_token", RT)],
    },
];

/// Sends one refresh of built-in `kind` to a fresh wiremock that answers `status` + `body`
/// only to a request of exactly the documented shape.
async fn refresh_once(kind: &str, status: u16, body: &Value) -> Result<TokenSet, ProviderFailure> {
    init_logs();
    let shape = SHAPES.iter().find(|s| s.kind == kind).expect("shape");
    let server = MockServer::start().await;
    let mut mock = Mock::given(method(shape.method))
        .and(path(refresh_path(kind)))
        .and(Exact {
            params: shape
                .params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            basic: shape.basic,
        });
    if kind == "reddit" {
        mock = mock.and(header(
            "user-agent",
            concat!("server:refreshd:", env!("CARGO_PKG_VERSION")),
        ));
    }
    let mut answer = ResponseTemplate::new(status).set_body_json(body);
    if status == 429 {
        answer = answer.insert_header("retry-after", "120");
    }
    mock.respond_with(answer).expect(1).mount(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        &dir.path().join("x.db"),
        "",
        &provider_toml(kind, kind, &server.uri(), ""),
    );
    let p = &config.providers[kind];
    let http = refreshd::provider::http_client(&config).unwrap();
    let provider = Provider::new(kind, p, &config, http).expect("provider");
    let out = provider
        .refresh(&SecretString::from(shape.credential), T0)
        .await
        .and_then(|(answer, status)| answer.into_tokens(status));
    server.verify().await;
    out
}

fn rejected(f: &ProviderFailure) -> bool {
    matches!(f.class, FailureClass::Rejected(_))
}

fn meta_error(code: i64, subcode: Option<i64>, message: &str) -> Value {
    let mut e = json!({"message": message, "type": "OAuthException", "code": code, "fbtrace_id": "AbC123xYz"});
    if let Some(s) = subcode {
        e["error_subcode"] = s.into();
    }
    json!({ "error": e })
}

#[tokio::test]
async fn tiktok_profile() {
    let t = refresh_once("tiktok", 200, &json!({"access_token":"act.NEW","expires_in":86400,"open_id":"u1","refresh_expires_in":31536000,"refresh_token":"rft.NEW","scope":"user.info.basic,video.list","token_type":"Bearer"})).await.unwrap();
    assert_eq!(t.refresh_token.unwrap().expose_secret(), "rft.NEW");
    assert_eq!(
        (t.expires_in, t.refresh_expires_in),
        (86_400, Some(31_536_000))
    );
    assert_eq!(t.subject.as_deref(), Some("u1"));
    let t = refresh_once(
        "tiktok",
        200,
        &json!({"access_token":"act.NEW","expires_in":7200,"open_id":"u1","token_type":"Bearer"}),
    )
    .await
    .unwrap();
    assert!(t.refresh_token.is_none());
    let f = refresh_once("tiktok", 200, &json!({"error":"invalid_grant","error_description":"Refresh token is invalid or expired.","log_id":"202611250000LOG"})).await.unwrap_err();
    assert_eq!(f.class, FailureClass::Rejected(ReauthReason::InvalidGrant));
    assert!(
        f.message.contains("log_id 202611250000LOG"),
        "{}",
        f.message
    );
    let f = refresh_once(
        "tiktok",
        200,
        &json!({"error":"temporarily_unavailable","error_description":"busy","log_id":"L"}),
    )
    .await
    .unwrap_err();
    assert_eq!(f.class, FailureClass::Transient);
}

#[tokio::test]
async fn google_profile() {
    let t = refresh_once("google", 200, &json!({"access_token":"ya29.NEW","expires_in":3599,"scope":"https://www.googleapis.com/auth/youtube.readonly","token_type":"Bearer"})).await.unwrap();
    assert!(t.refresh_token.is_none(), "Google keeps the stored one");
    assert_eq!(t.expires_in, 3599);
    let t = refresh_once("google", 200, &json!({"access_token":"ya29.NEW","expires_in":3599,"refresh_token":"1//NEW","refresh_token_expires_in":604799,"scope":"openid","token_type":"Bearer"})).await.unwrap();
    assert_eq!(t.refresh_expires_in, Some(604_799));
    for body in [
        json!({"error":"invalid_grant","error_description":"Token has been expired or revoked."}),
        json!({"error":"invalid_grant","error_description":"reauth related error (invalid_rapt)","error_uri":"https://support.google.com/a/answer/9368756","error_subtype":"invalid_rapt"}),
        json!({"error":"admin_policy_enforced","error_description":"blocked by admin"}),
    ] {
        let f = refresh_once("google", 400, &body).await.unwrap_err();
        assert!(rejected(&f), "{body}: {f:?}");
    }
    let f = refresh_once(
        "google",
        400,
        &json!({"error":"invalid_client","error_description":"The OAuth client was not found."}),
    )
    .await
    .unwrap_err();
    assert_eq!(f.class, FailureClass::Config);
    let f = refresh_once("google", 503, &json!({"error":"temporarily_unavailable"}))
        .await
        .unwrap_err();
    assert_eq!(f.class, FailureClass::Transient);
}

#[tokio::test]
async fn linkedin_profile() {
    let t = refresh_once("linkedin", 200, &json!({"access_token":"AQV-NEW","expires_in":5184000,"refresh_token":"AQX-SAME","refresh_token_expires_in":31449600,"scope":"r_liteprofile"})).await.unwrap();
    assert_eq!(t.refresh_expires_in, Some(31_449_600));
    let t = refresh_once(
        "linkedin",
        200,
        &json!({"access_token":"AQV-NEW","expires_in":5184000}),
    )
    .await
    .unwrap();
    assert!(t.refresh_token.is_none());
    let f = refresh_once("linkedin", 400, &json!({"error":"invalid_request","error_description":"The provided authorization grant or refresh token is invalid, expired or revoked."})).await.unwrap_err();
    assert_eq!(f.class, FailureClass::Rejected(ReauthReason::InvalidGrant));
    // The same code with another message is our request's fault, not the user's.
    let f = refresh_once("linkedin", 400, &json!({"error":"invalid_request","error_description":"A required parameter \"client_id\" is missing"})).await.unwrap_err();
    assert_eq!(f.class, FailureClass::Config);
    let f = refresh_once("linkedin", 429, &json!({"message":"Too many requests"}))
        .await
        .unwrap_err();
    assert_eq!(f.class, FailureClass::Transient);
    assert_eq!(f.retry_after, Some(Duration::from_secs(120)));
}

#[tokio::test]
async fn x_profile() {
    let t = refresh_once("x", 200, &json!({"token_type":"bearer","expires_in":7200,"access_token":"X-NEW","scope":"tweet.read users.read offline.access","refresh_token":"X-RT-NEW"})).await.unwrap();
    assert_eq!(t.refresh_token.unwrap().expose_secret(), "X-RT-NEW");
    let t = refresh_once(
        "x",
        200,
        &json!({"token_type":"bearer","expires_in":7200,"access_token":"X-NEW","scope":"tweet.read"}),
    )
    .await
    .unwrap();
    assert!(t.refresh_token.is_none());
    let f = refresh_once(
        "x",
        400,
        &json!({"error":"invalid_request","error_description":"Value passed for the token was invalid."}),
    )
    .await
    .unwrap_err();
    assert_eq!(f.class, FailureClass::Rejected(ReauthReason::InvalidGrant));
    let f = refresh_once("x", 503, &json!({"title":"Service Unavailable"}))
        .await
        .unwrap_err();
    assert_eq!(f.class, FailureClass::Transient);
}

#[tokio::test]
async fn pinterest_profile() {
    let t = refresh_once("pinterest", 200, &json!({"access_token":"pina_NEW","refresh_token":"pinr_NEW","response_type":"refresh_token","token_type":"bearer","expires_in":2592000,"refresh_token_expires_in":5184000,"refresh_token_expires_at":T0 + 5_184_000,"scope":"boards:read pins:read"})).await.unwrap();
    assert_eq!(t.refresh_token.unwrap().expose_secret(), "pinr_NEW");
    assert_eq!(t.refresh_expires_in, Some(5_184_000));
    // Only the absolute end given: read relative to now.
    let t = refresh_once("pinterest", 200, &json!({"access_token":"pina_NEW","token_type":"bearer","expires_in":2592000,"refresh_token_expires_at":T0 + 3_000_000})).await.unwrap();
    assert!(t.refresh_token.is_none());
    assert_eq!(t.refresh_expires_in, Some(3_000_000));
    let f = refresh_once(
        "pinterest",
        400,
        &json!({"error":"invalid_grant","error_description":"refresh token revoked"}),
    )
    .await
    .unwrap_err();
    assert!(rejected(&f));
    // Pinterest's own `{code, message}` re-auth codes are unconfirmed: never flagged on a
    // guess, logged as a configuration problem instead.
    let f = refresh_once(
        "pinterest",
        401,
        &json!({"code":2,"message":"Authentication failed."}),
    )
    .await
    .unwrap_err();
    assert_eq!(f.class, FailureClass::Config);
    assert!(f.message.contains("Authentication failed"), "{}", f.message);
    let f = refresh_once(
        "pinterest",
        503,
        &json!({"code":8,"message":"Service unavailable"}),
    )
    .await
    .unwrap_err();
    assert_eq!(f.class, FailureClass::Transient);
}

async fn meta_profile(kind: &str, new_token: &str) {
    let t = refresh_once(
        kind,
        200,
        &json!({"access_token":new_token,"token_type":"bearer","expires_in":5183944}),
    )
    .await
    .unwrap();
    assert_eq!(t.access_token.expose_secret(), new_token);
    assert!(t.refresh_token.is_none());
    assert_eq!(t.expires_in, 5_183_944);
    for (sub, reason) in [
        (None, ReauthReason::InvalidGrant),
        (Some(458), ReauthReason::InvalidGrant),
        (Some(460), ReauthReason::InvalidGrant),
        (Some(463), ReauthReason::RefreshTokenExpired),
        (Some(467), ReauthReason::InvalidGrant),
    ] {
        let f = refresh_once(
            kind,
            400,
            &meta_error(190, sub, "Error validating access token"),
        )
        .await
        .unwrap_err();
        assert_eq!(f.class, FailureClass::Rejected(reason), "{kind} {sub:?}");
        assert!(f.message.contains("fbtrace_id AbC123xYz"), "{}", f.message);
    }
    for code in [1, 2, 4, 17, 341] {
        let f = refresh_once(kind, 400, &meta_error(code, None, "Please retry"))
            .await
            .unwrap_err();
        assert_eq!(f.class, FailureClass::Transient, "{kind} code {code}");
    }
}

#[tokio::test]
async fn instagram_profile() {
    meta_profile("instagram", "IGQ-NEW").await;
}

#[tokio::test]
async fn facebook_profile() {
    meta_profile("facebook", "EAA-NEW").await;
}

#[tokio::test]
async fn threads_profile() {
    meta_profile("threads", "THQ-NEW").await;
}

#[tokio::test]
async fn reddit_profile() {
    let t = refresh_once(
        "reddit",
        200,
        &json!({"access_token":"eyJ-NEW","token_type":"bearer","expires_in":86400,"scope":"identity read"}),
    )
    .await
    .unwrap();
    assert!(t.refresh_token.is_none());
    let t = refresh_once("reddit", 200, &json!({"access_token":"eyJ-NEW","token_type":"bearer","expires_in":86400,"refresh_token":"RD-NEW","scope":"identity"})).await.unwrap();
    assert_eq!(t.refresh_token.unwrap().expose_secret(), "RD-NEW");
    let f = refresh_once("reddit", 400, &json!({"error":"invalid_grant"}))
        .await
        .unwrap_err();
    assert!(rejected(&f));
    let f = refresh_once(
        "reddit",
        401,
        &json!({"message":"Unauthorized","error":401}),
    )
    .await
    .unwrap_err();
    assert_eq!(f.class, FailureClass::Config);
    let f = refresh_once(
        "reddit",
        429,
        &json!({"message":"Too Many Requests","error":429}),
    )
    .await
    .unwrap_err();
    assert_eq!(f.class, FailureClass::Transient);
}

#[tokio::test]
async fn generic_profile_written_in_config() {
    init_logs();
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/oauth/refresh"))
        .and(Exact {
            params: [
                ("app", CLIENT_ID),
                ("token", RT),
                ("grant_type", "refresh"),
                ("format", "json"),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            basic: false,
        })
        .and(header("x-api-version", "2"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "data": 1, "token": "ignored", "access_token": "A-NEW", "ttl": 3600,
            "refresh_token": "R-NEW", "refresh_valid_until": "2026-12-25T00:00:00Z", "uid": "user-9"
        })))
        .expect(1)
        .mount(&server)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let uri = server.uri();
    let config = config(
        &dir.path().join("x.db"),
        "",
        &format!(
            r#"[providers.acme]
kind = "generic"
client_id = "{CLIENT_ID}"
token_url = "{uri}/oauth/token"
refresh_url = "{uri}/oauth/refresh"
client_auth = "none"
credential_param = "token"
grant_type = "refresh"
refresh_params = {{ format = "json", app = "{CLIENT_ID}" }}
headers = {{ "X-Api-Version" = "2" }}
expires_in_field = "ttl"
refresh_expires_at_field = "refresh_valid_until"
subject_field = "uid"
refresh_ttl = "sliding"
"#
        ),
    );
    let http = refreshd::provider::http_client(&config).unwrap();
    let provider = Provider::new("acme", &config.providers["acme"], &config, http).unwrap();
    let (answer, status) = provider.refresh(&SecretString::from(RT), T0).await.unwrap();
    assert_eq!(status, 200);
    let t = answer.into_tokens(status).unwrap();
    assert_eq!(t.access_token.expose_secret(), "A-NEW");
    assert_eq!(t.expires_in, 3600);
    assert_eq!(t.refresh_expires_in, Some(30 * DAY));
    assert_eq!(t.subject.as_deref(), Some("user-9"));
    server.verify().await;
}

/// RFC 6749 §2.3.1: the client id and secret are form-urlencoded before HTTP Basic; a secret
/// shaped like base64 (`+/=`) or holding `%` must reach the server intact. `basic_raw`
/// sends them as they are, for servers that do not decode.
#[tokio::test]
async fn basic_credentials_are_form_encoded_unless_raw() {
    init_logs();
    let id = "my client+1";
    let secret = "Ab3+x/Yz9=Q%zz~";
    let basic = |user: &str, pass: &str| {
        use base64::Engine;
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
        )
    };
    for (auth, want) in [
        ("basic", basic("my+client%2B1", "Ab3%2Bx%2FYz9%3DQ%25zz%7E")),
        ("basic_raw", basic(id, secret)),
    ] {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/token"))
            .and(header("authorization", want.as_str()))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                "access_token": "A-NEW", "expires_in": 3600, "refresh_token": "R-NEW"
            })))
            .expect(2)
            .mount(&server)
            .await;
        let dir = tempfile::tempdir().unwrap();
        let config = config(
            &dir.path().join("x.db"),
            "",
            &format!(
                "[providers.own]\nkind = \"generic\"\nclient_id = \"{id}\"\nclient_secret = \"{secret}\"\ntoken_url = \"{}/token\"\nclient_auth = \"{auth}\"\n",
                server.uri()
            ),
        );
        let http = refreshd::provider::http_client(&config).unwrap();
        let provider = Provider::new("own", &config.providers["own"], &config, http).unwrap();
        let refreshed = provider.refresh(&SecretString::from(RT), T0).await;
        assert!(refreshed.is_ok(), "{auth}: {:?}", refreshed.err());
        let exchanged = provider
            .exchange_code(&SecretString::from("C"), "http://127.0.0.1/cb", None, T0)
            .await;
        // The same mock answers the code exchange, which must carry the same header; it
        // names no user, so only a Config failure about the subject is acceptable.
        if let Err(f) = exchanged {
            assert!(f.message.contains("does not name the user"), "{auth}: {f}");
        }
        server.verify().await;
    }
}

/// Most OpenID Connect servers never announce the refresh token's end: a configured
/// `refresh_token_lifetime` stands in for it, and it needs a `refresh_ttl` to count by.
#[tokio::test]
async fn configured_refresh_lifetime_fills_what_the_server_does_not_say() {
    init_logs();
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "access_token": "A-NEW", "expires_in": 30, "refresh_token": "R-NEW"
        })))
        .mount(&server)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let toml = |extra: &str| {
        format!(
            "[providers.own]\nkind = \"generic\"\nclient_id = \"id\"\nclient_secret = \"s\"\ntoken_url = \"{}/token\"\n{extra}",
            server.uri()
        )
    };
    let config = config(
        &dir.path().join("x.db"),
        "",
        &toml("refresh_ttl = \"fixed\"\nrefresh_token_lifetime = \"30d\"\n"),
    );
    let http = refreshd::provider::http_client(&config).unwrap();
    let provider = Provider::new("own", &config.providers["own"], &config, http).unwrap();
    let (answer, status) = provider.refresh(&SecretString::from(RT), T0).await.unwrap();
    let t = answer.into_tokens(status).unwrap();
    assert_eq!(t.refresh_expires_in, Some(30 * DAY));
    let e = Config::from_toml_str(&toml("refresh_token_lifetime = \"30d\"\n"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("providers.own.refresh_token_lifetime"), "{e}");
    assert!(e.contains("refresh_ttl"), "{e}");
}

#[test]
fn generic_profile_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("x.db");
    let try_config = |providers: &str| {
        Config::from_toml_str(&format!(
            "[store]\npath = {:?}\n{providers}",
            db.display().to_string()
        ))
        .map(|_| ())
        .unwrap_err()
        .to_string()
    };
    let e = try_config(
        "[providers.acme]\nkind = \"generic\"\nclient_id = \"a\"\nclient_secret = \"SECRET-VALUE\"\n",
    );
    assert!(e.contains("providers.acme.token_url"), "{e}");
    assert!(!e.contains("SECRET-VALUE"), "{e}");
    let e = try_config("[providers.acme]\nclient_id = \"a\"\nclient_secret = \"s\"\n");
    assert!(e.contains("providers.acme.kind"), "{e}");
    assert!(e.contains("generic"), "{e}");
    let e = try_config(
        "[providers.acme]\nkind = \"generic\"\nclient_id = \"a\"\nclient_secret = \"s\"\ntoken_url = \"https://a.example/t\"\nmethod = \"get\"\n",
    );
    assert!(e.contains("providers.acme.params_in"), "{e}");
    let e = try_config(
        "[providers.acme]\nkind = \"generic\"\nclient_id = \"a\"\nclient_secret = \"s\"\ntoken_url = \"https://a.example/t\"\nclient_auth = \"mtls\"\n",
    );
    assert!(e.contains("providers.acme.client_auth"), "{e}");
    let e = try_config(
        "[providers.acme]\nkind = \"generic\"\nclient_id = \"a\"\nclient_secret = \"s\"\ntoken_url = \"https://a.example/t\"\nrefresh_url = \"http://a.example/r\"\n",
    );
    assert!(e.contains("providers.acme.refresh_url"), "{e}");
    // Instagram needs no client secret to refresh; Google does.
    try_config("[providers.instagram]\nclient_id = \"a\"\nclient_secret = \"s\"\nbogus = 1\n");
    Config::from_toml_str(&format!(
        "[store]\npath = {:?}\n[providers.instagram]\nclient_id = \"a\"\n",
        db.display().to_string()
    ))
    .expect("instagram without a secret");
    let e = try_config("[providers.yt]\nkind = \"google\"\nclient_id = \"a\"\n");
    assert!(e.contains("providers.yt.client_secret"), "{e}");
}

// ---- several providers in one daemon ----

async fn open_store(db: &Path) -> Store {
    helpers::open_store(db, Duration::from_secs(2)).await
}

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

fn ok_body(access: &str) -> Value {
    json!({"access_token": access, "expires_in": 3600, "token_type": "Bearer"})
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
    let report = lifecycle::run(
        config.clone(),
        RunOptions {
            once: true,
            ..RunOptions::new(clock.clone())
        },
        CancellationToken::new(),
    )
    .await
    .expect("run --once");
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

/// The book's generic example is a valid config describing what it says.
#[test]
fn docs_generic_example_loads() {
    let page = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/src/providers/generic.md"
    ))
    .expect("docs/src/providers/generic.md");
    let section = page
        .split("# A generic profile")
        .nth(1)
        .expect("the page has the generic example");
    let block = section
        .split("```toml\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a toml block");
    let toml = block.replace(
        "client_secret_file = \"/etc/refreshd/acme-client-secret\"",
        "client_secret = \"s\"",
    );
    let c = Config::from_toml_str(&toml).expect("the README example loads");
    let p = c.providers["acme"].profile("acme").unwrap();
    assert_eq!(
        p.refresh_endpoint(),
        "https://api.acme.example/oauth/refresh"
    );
    assert_eq!(
        p.client_auth,
        refreshd::provider::profile::ClientAuth::Basic
    );
    assert_eq!(p.errors.reauth, ["invalid_grant", "token_revoked"]);
    let f = refreshd::provider::response::parse(
        &p,
        T0,
        401,
        None,
        None,
        br#"{"error": {"code": "token_revoked", "message": "The user revoked access"}}"#,
    )
    .unwrap_err();
    assert_eq!(f.class, FailureClass::Rejected(ReauthReason::InvalidGrant));
    let t = refreshd::provider::response::parse(
        &p,
        T0,
        200,
        None,
        None,
        br#"{"access_token": "A", "ttl": 3600, "refresh_token": "R", "refresh_valid_until": "2026-12-25T00:00:00Z", "user": "42"}"#,
    )
    .unwrap();
    assert_eq!(
        (t.expires_in, t.refresh_expires_in, t.subject.as_deref()),
        (3600, Some(30 * DAY), Some("42"))
    );
}

/// Instagram, Threads and Facebook carry the token in the URL: a failed request must not
/// quote the URL in its error (connection refused, timeout).
#[tokio::test]
async fn tokens_in_the_query_never_reach_an_error() {
    init_logs();
    let slow = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(ok_body("late"))
                .set_delay(Duration::from_secs(3)),
        )
        .mount(&slow)
        .await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let dir = tempfile::tempdir().unwrap();
    for server in [closed, slow.uri()] {
        let config = config(
            &dir.path().join("x.db"),
            "",
            &[
                provider_toml("instagram", "instagram", &server, ""),
                provider_toml("facebook", "facebook", &server, ""),
            ]
            .concat(),
        );
        let http = refreshd::provider::http_client(&config).unwrap();
        for kind in ["instagram", "facebook"] {
            let p = Provider::new(kind, &config.providers[kind], &config, http.clone()).unwrap();
            let f = p
                .refresh(&SecretString::from("AT-SECRET-TOKEN"), T0)
                .await
                .unwrap_err();
            assert_eq!(f.class, FailureClass::Transient, "{f:?}");
            let shown = format!("{f} {f:?}");
            assert!(!shown.contains("AT-SECRET"), "{shown}");
            assert!(!shown.contains(CLIENT_SECRET), "{shown}");
            assert!(!format!("{p:?}").contains(CLIENT_SECRET));
        }
    }
}

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
