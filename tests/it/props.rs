//! Property tests (proptest) for the parsers that read hostile input: the token-response
//! parser and classifier, the import-line parser and the config loader. They must never
//! panic, must classify consistently, and must never echo a secret in an error.
//!
//! CI runs proptest's default 256 cases per property (about a second in all); a longer run
//! by hand: `PROPTEST_CASES=200000 cargo test --locked --test it props`. A failing case is
//! shrunk and saved under `proptest-regressions/`: commit that file, it is replayed first.

use proptest::prelude::*;
use refreshd::config::Config;
use refreshd::model::ReauthReason;
use refreshd::policy::RefreshTiming;
use refreshd::provider::FailureClass;
use refreshd::provider::response::MAX_LIFETIME;
use refreshd::provider::tiktok::parse_response;
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use std::time::Duration;

const ACCESS: &str = "act.PROPSECRET-access-7f3a";
const REFRESH: &str = "rft.PROPSECRET-refresh-91bc";

/// Any JSON value, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::from),
        "[0-9]{1,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(".{0,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A token-endpoint answer: each known field absent, well-formed, or any JSON value.
fn token_body() -> impl Strategy<Value = Value> {
    let field = |good: Value| {
        prop_oneof![
            2 => Just(None),
            3 => Just(Some(good)),
            2 => any_json().prop_map(Some),
        ]
    };
    let error = prop_oneof![
        4 => Just(None),
        1 => prop_oneof![
            Just(json!("invalid_grant")),
            Just(json!("invalid_client")),
            Just(json!("server_error")),
            Just(json!({"code": "invalid_grant", "message": "m"})),
            "[a-z_]{0,20}".prop_map(Value::from),
            any_json(),
        ]
        .prop_map(Some),
    ];
    (
        field(json!(ACCESS)),
        field(json!(REFRESH)),
        field(json!(7200)),
        field(json!(31_536_000)),
        field(json!("Bearer")),
        field(json!("open-id-1")),
        error,
        prop::collection::btree_map("[a-z_]{1,8}", any_json(), 0..3),
    )
        .prop_map(|(at, rt, exp, rexp, tt, oid, err, extra)| {
            let mut m: serde_json::Map<String, Value> = extra.into_iter().collect();
            for (k, v) in [
                ("access_token", at),
                ("refresh_token", rt),
                ("expires_in", exp),
                ("refresh_expires_in", rexp),
                ("token_type", tt),
                ("open_id", oid),
                ("error", err),
            ] {
                if let Some(v) = v {
                    m.insert(k.into(), v);
                }
            }
            Value::Object(m)
        })
}

fn status() -> impl Strategy<Value = u16> {
    prop_oneof![
        4 => Just(200u16),
        1 => prop::sample::select(vec![201u16, 204, 301, 302, 400, 401, 403, 404, 429, 500, 502, 503]),
        1 => 100u16..600,
    ]
}

fn no_secret(s: &str) -> bool {
    !s.contains("PROPSECRET")
}

/// One key for the sealing properties (key generation writes a file: once per run).
fn keyring() -> &'static refreshd::crypto::Keyring {
    static RING: std::sync::OnceLock<(tempfile::TempDir, refreshd::crypto::Keyring)> =
        std::sync::OnceLock::new();
    &RING
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("k");
            refreshd::crypto::generate_key_file(&p).unwrap();
            let ring = refreshd::crypto::Keyring::load(Some(&p), &[]).unwrap();
            (dir, ring)
        })
        .1
}

proptest! {
    #[test]
    fn sealed_values_open_only_where_they_were_sealed(clear in ".{0,200}", id in any::<i64>(), other in any::<i64>()) {
        use refreshd::crypto::Column;
        let k = keyring();
        let sealed = k.seal(id, Column::RefreshToken, &clear);
        prop_assert!(clear.len() < 8 || !sealed.contains(&clear));
        let opened = k.open(id, Column::RefreshToken, &sealed).unwrap();
        prop_assert_eq!(opened.expose_secret(), clear.as_str());
        prop_assert!(k.open(id, Column::AccessToken, &sealed).is_err());
        if other != id {
            prop_assert!(k.open(other, Column::RefreshToken, &sealed).is_err());
        }
    }

    #[test]
    fn stored_values_never_panic_the_opener(tail in ".{0,120}", id in any::<i64>()) {
        // Whatever an attacker writes into the column: a clear value, or an error.
        let k = keyring();
        let id_prefix = format!("enc:v1:{}:", k.primary_id().unwrap());
        for stored in [tail.clone(), format!("enc:v1:{tail}"), format!("{id_prefix}{tail}")] {
            if let Err(e) = k.open(id, refreshd::crypto::Column::AccessToken, &stored) {
                prop_assert!(e.to_string().contains(&format!("account {id}")), "{e}");
            }
        }
    }

    #[test]
    fn token_parser_never_panics_on_bytes(status in status(), body in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_response(status, None, Some("application/json"), &body);
    }

    #[test]
    fn token_answers_are_classified_consistently(status in status(), body in token_body()) {
        let bytes = serde_json::to_vec(&body).unwrap();
        match parse_response(status, Some(Duration::from_secs(7)), None, &bytes) {
            Ok(t) => {
                // Tokens only from a 2xx answer without an error, with a usable lifetime.
                prop_assert!((200..300).contains(&status), "tokens from HTTP {status}");
                // An error code is read only in its plain form (letters, digits, `_-.:`): one
                // with nothing readable ("¡") is no error, and an answer that carries new
                // tokens beside it must be stored (the provider may have rotated).
                let readable = |s: &str| s.chars().any(|c| c.is_ascii_alphanumeric() || "_-.:".contains(c));
                // ... or stands beside a token, which the storing rule keeps (a tolerated problem).
                let carries_token = ["refresh_token", "access_token"]
                    .iter()
                    .any(|f| matches!(body.get(*f), Some(Value::String(t)) if !t.is_empty()));
                prop_assert!(carries_token || body.get("error").is_none_or(|e| !matches!(e, Value::String(s) if readable(s))));
                prop_assert!(!t.access_token.expose_secret().is_empty());
                prop_assert!(t.expires_in > 0 && t.expires_in <= MAX_LIFETIME);
                prop_assert!(t.refresh_expires_in.is_none_or(|r| (0..=MAX_LIFETIME).contains(&r)));
                prop_assert_eq!(t.token_type.as_str(), "Bearer");
            }
            Err(f) => {
                prop_assert!(no_secret(&f.message), "secret in {:?}", f.message);
                prop_assert_eq!(f.http_status, Some(status));
                prop_assert_eq!(f.retry_after, Some(Duration::from_secs(7)));
                // Re-authorization is asked for only on an explicit invalid_grant.
                if let FailureClass::Rejected(r) = f.class {
                    prop_assert_eq!(r, ReauthReason::InvalidGrant);
                    prop_assert!(f.message.contains("invalid_grant"), "{}", f.message);
                }
                // Overload and server errors without an error code are never permanent.
                if (status == 429 || status >= 500) && body.get("error").is_none() {
                    prop_assert_eq!(f.class, FailureClass::Transient);
                }
            }
        }
    }

    #[test]
    fn import_lines_never_panic_nor_echo_tokens(
        lines in prop::collection::vec(
            prop_oneof![
                token_body().prop_map(|mut v| {
                    v["provider"] = json!("tiktok");
                    v.to_string()
                }),
                (token_body(), any_json()).prop_map(|(mut v, at)| {
                    v["provider"] = json!("tiktok");
                    v["obtained_at"] = at;
                    v.to_string()
                }),
                ".{0,40}",
            ],
            1..6,
        )
    ) {
        let text = lines.join("\n");
        let timing = RefreshTiming {
            lead: Duration::from_secs(600),
            lead_fraction: 0.1,
            jitter: Duration::from_secs(60),
            min_interval: Duration::from_secs(60),
        };
        match refreshd::import::parse("props", &text, 1_795_564_800, &timing, Duration::from_secs(7 * 86_400), |p| p == "tiktok") {
            Ok(records) => {
                for r in records {
                    prop_assert!(!r.tokens.access_token.expose_secret().is_empty());
                    prop_assert!(r.tokens.expires_in >= 0 && r.tokens.expires_in <= MAX_LIFETIME);
                }
            }
            Err(e) => prop_assert!(no_secret(&e.to_string()), "secret in {e}"),
        }
    }

    #[test]
    fn config_loader_never_panics_nor_echoes_the_secret(
        key in prop::sample::select(vec![
            "lead", "batch", "concurrency", "request_timeout", "max_response_bytes", "jitter",
            "lead_fraction", "client_secret", "token_url", "rate_limit", "bogus",
        ]),
        value in prop_oneof![
            any::<i64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|f| format!("{f:?}")),
            "\"[a-z0-9 .:/]{0,12}\"",
            Just(format!("\"{ACCESS}\"")),
            Just(ACCESS.to_string()),
            Just(format!("\"{ACCESS}")),
            "[\\[\\]{}=\"a-z0-9 ]{0,12}",
        ],
        table in prop::sample::select(vec!["refresh", "providers.tiktok", "store"]),
    ) {
        let text = format!(
            "[{table}]\n{key} = {value}\n\n[providers.tiktok]\nclient_key = \"ck\"\nclient_secret = \"{REFRESH}\"\ntoken_url = \"http://127.0.0.1:9/t\"\n"
        );
        // The client secret, and any value given as a client_secret, stay out of errors.
        if let Err(e) = Config::from_toml_str(&text) {
            let e = e.to_string();
            prop_assert!(!e.contains(REFRESH), "secret in {e}");
            if key == "client_secret" {
                prop_assert!(no_secret(&e), "secret in {e}");
            }
        }
    }
}
