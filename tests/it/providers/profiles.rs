//! Each built-in profile against wiremock: the exact refresh request it sends and how each
//! documented answer is classified; tokens carried in the URL never reach an error.

use super::{
    AT, CLIENT_ID, CLIENT_SECRET, Exact, RT, config, ok_body, provider_toml, refresh_path,
};
use crate::helpers::{T0, init_logs};
use refreshd::model::{ReauthReason, TokenSet};
use refreshd::provider::{FailureClass, Provider, ProviderFailure};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use std::time::Duration;
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// What a built-in profile must send on refresh.
struct Shape {
    kind: &'static str,
    method: &'static str,
    basic: bool,
    /// The stored credential presented: the refresh token, or the access token itself.
    credential: &'static str,
    params: &'static [(&'static str, &'static str)],
}

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
