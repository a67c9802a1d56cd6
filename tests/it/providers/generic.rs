//! The generic profile written in config: its requests, client authentication, the configured
//! refresh-token lifetime, errors that name the key, and the book's example.

use super::{CLIENT_ID, DAY, Exact, RT, config};
use crate::helpers::{T0, init_logs};
use refreshd::config::Config;
use refreshd::model::ReauthReason;
use refreshd::provider::{FailureClass, Provider};
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

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

/// The generic provider `own` answering at `uri`/token, with `lines` of its TOML table.
fn own_provider(uri: &str, lines: &str) -> Provider {
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        &dir.path().join("x.db"),
        "",
        &format!("[providers.own]\nkind = \"generic\"\ntoken_url = \"{uri}/token\"\n{lines}"),
    );
    let http = refreshd::provider::http_client(&config).unwrap();
    Provider::new("own", &config.providers["own"], &config, http).unwrap()
}

/// A token endpoint's answer with new tokens.
fn new_tokens() -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(json!({
        "access_token": "A-NEW", "expires_in": 3600, "refresh_token": "R-NEW"
    }))
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
            .respond_with(new_tokens())
            .expect(2)
            .mount(&server)
            .await;
        let provider = own_provider(
            &server.uri(),
            &format!(
                "client_id = \"{id}\"\nclient_secret = \"{secret}\"\nclient_auth = \"{auth}\"\n"
            ),
        );
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

/// The form body is the pairs urlencoded once (reserved and non-ASCII bytes escaped), with
/// one Content-Type: ours, or the profile's own when its `headers` name one.
#[tokio::test]
async fn form_body_is_encoded_once_under_one_content_type() {
    init_logs();
    let token = "a+b/c=d&e%f é~";
    let want_body = "client_id=id&client_secret=s&grant_type=refresh_token&refresh_token=a%2Bb%2Fc%3Dd%26e%25f+%C3%A9%7E";
    for (headers, want_type) in [
        ("", "application/x-www-form-urlencoded"),
        (
            "headers = { \"Content-Type\" = \"application/x-www-form-urlencoded; charset=utf-8\" }\n",
            "application/x-www-form-urlencoded; charset=utf-8",
        ),
    ] {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/token"))
            .and(move |req: &wiremock::Request| {
                let types: Vec<_> = req.headers.get_all("content-type").iter().collect();
                types.len() == 1 && types[0] == want_type && req.body == want_body.as_bytes()
            })
            .respond_with(new_tokens())
            .expect(1)
            .mount(&server)
            .await;
        let provider = own_provider(
            &server.uri(),
            &format!("client_id = \"id\"\nclient_secret = \"s\"\n{headers}"),
        );
        let refreshed = provider.refresh(&SecretString::from(token), T0).await;
        assert!(refreshed.is_ok(), "{want_type}: {:?}", refreshed.err());
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
