//! Unit tests of `response.rs`: every answer shape of the built-in profiles and the generic
//! one, mapped to tokens or a failure class.

use super::*;
use crate::model::ReauthReason;
use secrecy::ExposeSecret;

const NOW: i64 = 1_800_000_000;

fn parse_as(kind: &str, status: u16, body: &str) -> Result<TokenSet, ProviderFailure> {
    let p = Profile::built_in(kind).unwrap();
    parse(
        &p,
        NOW,
        status,
        None,
        Some("application/json"),
        body.as_bytes(),
    )
}

#[test]
fn control_characters_in_a_token_are_garbage_and_in_the_scope_dropped() {
    for body in [
        r#"{"access_token":"at\u0000x","refresh_token":"rt","expires_in":3600}"#,
        r#"{"access_token":"at","refresh_token":"rt\r\nSet-Cookie: x","expires_in":3600}"#,
    ] {
        let f = parse_as("tiktok", 200, body).unwrap_err();
        assert_eq!(f.class, FailureClass::Transient, "{body}");
        assert!(f.message.contains("control characters"), "{}", f.message);
        assert!(!f.message.contains("rt"), "no token in {}", f.message);
    }
    let t = parse_as(
        "tiktok",
        200,
        r#"{"access_token":"at","refresh_token":"rt","expires_in":3600,"scope":"user.info\u0000basic"}"#,
    )
    .unwrap();
    assert_eq!(t.scope.as_deref(), Some("user.infobasic"));
}

fn answer_as(kind: &str, body: &Value) -> Result<Answer, ProviderFailure> {
    let p = Profile::built_in(kind).unwrap();
    parse_answer(&p, NOW, 200, None, None, body.to_string().as_bytes())
}

/// Every way a field can be broken: missing, empty, of the wrong JSON type, out of range.
fn malformations() -> Vec<Option<Value>> {
    use serde_json::json;
    vec![
        None,
        Some(json!(null)),
        Some(json!("")),
        Some(json!(" ")),
        Some(json!("soon")),
        Some(json!(12345)),
        Some(json!(0)),
        Some(json!(-5)),
        Some(json!(3600.5)),
        Some(json!(1e300)),
        Some(json!(99_999_999_999i64)),
        Some(json!(u64::MAX)),
        Some(json!(true)),
        Some(json!(["a"])),
        Some(json!({"v": 1})),
        Some(json!("x\u{0}y")),
    ]
}

#[test]
fn an_error_field_beside_tokens_on_a_2xx_never_drops_the_rotated_token() {
    use serde_json::json;
    let base = json!({"access_token": "A2", "refresh_token": "R2", "expires_in": 86_400});
    // (error field, a problem reported)
    let table = [
        (json!({"code": "ok", "message": "", "log_id": "x"}), false),
        (json!(0), false),
        (json!("0"), false),
        (json!({"code": "internal_error", "message": "odd"}), true),
        (json!("invalid_grant"), true),
    ];
    for kind in ["tiktok", "google"] {
        for (error, reported) in &table {
            let mut body = base.clone();
            body["error"] = error.clone();
            let a = answer_as(kind, &body).unwrap_or_else(|f| panic!("{body}: {f:?}"));
            let Granted::Tokens(t) = a.granted else {
                panic!("{body}: {:?}", a.granted)
            };
            assert_eq!(t.refresh_token.unwrap().expose_secret(), "R2", "{body}");
            assert_eq!(t.access_token.expose_secret(), "A2", "{body}");
            assert_eq!(
                !a.problems.is_empty(),
                *reported,
                "{body}: {:?}",
                a.problems
            );
        }
    }
    // Without a token, a 2xx error body is the provider's error answer (TikTok answers
    // every error inside HTTP 200): nothing was rotated, so no answer was lost.
    for error in [json!({"code": "internal_error"}), json!("invalid_grant")] {
        let f = answer_as("tiktok", &json!({"error": error})).unwrap_err();
        assert!(!f.answer_lost, "{error}: {f:?}");
    }
}

#[test]
fn a_new_refresh_token_is_kept_whatever_else_is_broken() {
    use serde_json::json;
    let good = json!({
        "access_token": "act.OK", "expires_in": 3600, "refresh_token": "rft.NEW",
        "refresh_expires_in": 86_400, "open_id": "u1", "scope": "user.info.basic",
        "token_type": "Bearer",
    });
    let fields = [
        "access_token",
        "expires_in",
        "refresh_expires_in",
        "open_id",
        "scope",
        "token_type",
    ];
    for field in fields {
        for value in malformations() {
            let mut body = good.clone();
            match &value {
                None => drop(body.as_object_mut().unwrap().remove(field)),
                Some(v) => body[field] = v.clone(),
            }
            let a = answer_as("tiktok", &body)
                .unwrap_or_else(|f| panic!("{body}: refused: {}", f.message));
            match a.granted {
                Granted::Tokens(t) => {
                    assert_eq!(t.refresh_token.unwrap().expose_secret(), "rft.NEW");
                    let at = t.access_token.expose_secret();
                    assert_eq!(
                        Some(at),
                        body[field]
                            .as_str()
                            .filter(|_| field == "access_token")
                            .or(Some("act.OK")),
                        "{body}"
                    );
                    assert!((1..=MAX_LIFETIME).contains(&t.expires_in), "{body}");
                }
                Granted::RefreshTokenOnly { refresh_token, .. } => {
                    assert_eq!(field, "access_token", "{body}");
                    assert_eq!(refresh_token.expose_secret(), "rft.NEW");
                    assert_eq!(a.problems.len(), 1, "{body}: the problem is reported");
                    assert!(!a.problems[0].contains("x\u{0}"), "{:?}", a.problems);
                }
            }
        }
    }
    // The issue's answer: a new refresh token and no access token at all.
    let a = answer_as(
        "tiktok",
        &json!({"refresh_token": "rft.NEW", "expires_in": 3600, "open_id": "u1"}),
    )
    .unwrap();
    assert!(
        matches!(&a.granted, Granted::RefreshTokenOnly { refresh_token, subject, .. }
            if refresh_token.expose_secret() == "rft.NEW" && subject.as_deref() == Some("u1")),
        "{a:?}"
    );
    // A caller that needs an access token gets a transient failure, never a token.
    let f = a.into_tokens(200).unwrap_err();
    assert_eq!(f.class, FailureClass::Transient);
    assert!(f.message.contains("access_token"), "{}", f.message);
}

#[test]
fn a_token_that_is_not_a_json_string_is_malformed_never_coerced() {
    use serde_json::json;
    // The issue's answer: nothing of it is usable, and nothing is stored.
    for body in [
        json!({"access_token": 12345, "refresh_token": ["a"], "expires_in": 3600, "open_id": "u1"}),
        json!({"access_token": "act.A", "refresh_token": 12345, "expires_in": 3600}),
        json!({"access_token": "act.A", "refresh_token": {"t": "x"}, "expires_in": 3600}),
        json!({"access_token": "act.A", "refresh_token": true, "expires_in": 3600}),
        json!({"access_token": 12345, "expires_in": 3600}),
        json!({"access_token": ["act.A"], "expires_in": 3600}),
    ] {
        let f = answer_as("tiktok", &body).unwrap_err();
        assert_eq!(f.class, FailureClass::Transient, "{body}");
        assert!(f.answer_lost, "{body}: the provider may have rotated");
        assert!(f.message.contains("not a JSON string"), "{}", f.message);
        assert!(!f.message.contains("12345"), "{}", f.message);
    }
    // An access token that is a number beside a good refresh token: only the refresh
    // token is kept.
    let a = answer_as(
        "tiktok",
        &json!({"access_token": 12345, "refresh_token": "rft.NEW", "expires_in": 3600}),
    )
    .unwrap();
    assert!(
        matches!(a.granted, Granted::RefreshTokenOnly { .. }),
        "{a:?}"
    );
    assert!(
        a.problems[0].contains("`access_token` is a number"),
        "{:?}",
        a.problems
    );
}

#[test]
fn problems_and_missing_rotation_are_reported_not_logged_here() {
    let a = answer_as(
        "tiktok",
        &serde_json::json!({"access_token": "act.A", "refresh_token": "rft.N", "expires_in": "soon"}),
    )
    .unwrap();
    assert_eq!(a.problems.len(), 1, "{a:?}");
    assert!(!a.rotation_missing);
    let a = answer_as(
        "tiktok",
        &serde_json::json!({"access_token": "act.A", "expires_in": 60}),
    )
    .unwrap();
    assert!(a.rotation_missing && a.problems.is_empty(), "{a:?}");
}

#[test]
fn google_invalid_rapt_is_reauth_and_named() {
    let f = parse_as(
        "google",
        400,
        r#"{"error":"invalid_grant","error_description":"reauth related error (invalid_rapt)","error_uri":"https://support.google.com/a/answer/9368756","error_subtype":"invalid_rapt"}"#,
    )
    .unwrap_err();
    assert_eq!(f.class, FailureClass::Rejected(ReauthReason::InvalidGrant));
    assert!(f.message.contains("invalid_rapt"), "{}", f.message);
}

#[test]
fn meta_nested_error_with_subcode_and_trace() {
    let f = parse_as(
        "instagram",
        400,
        r#"{"error":{"message":"Error validating access token: Session has expired on Tuesday.","type":"OAuthException","code":190,"error_subcode":463,"fbtrace_id":"AbCdEf123"}}"#,
    )
    .unwrap_err();
    assert_eq!(
        f.class,
        FailureClass::Rejected(ReauthReason::RefreshTokenExpired)
    );
    assert!(f.message.contains("190 (subcode 463)"), "{}", f.message);
    assert!(f.message.contains("fbtrace_id AbCdEf123"), "{}", f.message);
}

#[test]
fn pinterest_code_message_and_absolute_refresh_expiry() {
    let f = parse_as(
        "pinterest",
        401,
        r#"{"code":2,"message":"Authentication failed."}"#,
    )
    .unwrap_err();
    assert_eq!(f.class, FailureClass::Config);
    let t = parse_as(
        "pinterest",
        200,
        &format!(
            r#"{{"access_token":"pina_A","refresh_token":"pinr_R","response_type":"refresh_token","token_type":"bearer","expires_in":2592000,"refresh_token_expires_at":{},"scope":"boards:read"}}"#,
            NOW + 5_184_000
        ),
    )
    .unwrap();
    assert_eq!(t.refresh_expires_in, Some(5_184_000));
    assert_eq!(t.refresh_token.unwrap().expose_secret(), "pinr_R");
}

/// A code exchange without a refresh token has nothing stored to keep: the answer is
/// parsed without the refresh-only `rotation_missing` warning (connect says what is wrong).
#[test]
fn parsing_never_warns_about_a_missing_rotation() {
    let buf = crate::telemetry::capture::Captured::default();
    let sub = tracing_subscriber::fmt().with_writer(buf.clone()).finish();
    let t = tracing::subscriber::with_default(sub, || {
        parse_as("x", 200, r#"{"access_token":"a","expires_in":60}"#)
    })
    .unwrap();
    assert!(t.refresh_token.is_none());
    let logged = buf.text();
    assert!(!logged.contains("rotation_missing"), "{logged}");
}

#[test]
fn reddit_numeric_error_is_config() {
    let f = parse_as("reddit", 401, r#"{"message":"Unauthorized","error":401}"#).unwrap_err();
    assert_eq!(f.class, FailureClass::Config);
    assert!(f.message.starts_with("401: Unauthorized"), "{}", f.message);
}

#[test]
fn meta_refresh_answer_without_refresh_token() {
    let t = parse_as(
        "threads",
        200,
        r#"{"access_token":"THQ-NEW","token_type":"bearer","expires_in":5183944}"#,
    )
    .unwrap();
    assert!(t.refresh_token.is_none());
    assert_eq!(t.expires_in, 5_183_944);
    assert_eq!(t.access_token.expose_secret(), "THQ-NEW");
}

#[test]
fn error_descriptions_never_quote_control_characters_or_long_text() {
    let long = "y".repeat(1000);
    let f = parse_as(
        "x",
        400,
        &format!(r#"{{"error":"invalid_request","error_description":"a\nb{long}"}}"#),
    )
    .unwrap_err();
    assert!(!f.message.contains('\n'));
    assert!(f.message.len() < 400, "{}", f.message.len());
}

#[test]
fn a_lifetime_is_whole_seconds_within_ten_years() {
    use serde_json::json;
    assert_eq!(seconds(None, "expires_in"), Ok(None));
    assert_eq!(seconds(Some(&json!(null)), "expires_in"), Ok(None));
    assert_eq!(seconds(Some(&json!(3600)), "expires_in"), Ok(Some(3600)));
    assert_eq!(
        seconds(Some(&json!(" 3600 ")), "expires_in"),
        Ok(Some(3600))
    );
    assert_eq!(
        seconds(Some(&json!(MAX_LIFETIME)), "expires_in"),
        Ok(Some(MAX_LIFETIME))
    );
    for bad in [
        json!(-1),
        json!(MAX_LIFETIME + 1),
        json!(1.5),
        json!("soon"),
        json!([1]),
    ] {
        let e = seconds(Some(&bad), "expires_in").unwrap_err();
        assert!(e.contains("`expires_in`"), "{bad}: {e}");
    }
}

#[test]
fn a_revocation_is_revoked_on_a_clean_2xx_and_refused_with_the_providers_code() {
    use crate::provider::Revocation;
    for body in [&b""[..], b"{}", br#"{"error":{"code":"ok","message":""}}"#] {
        assert_eq!(
            revocation(200, body),
            Revocation::Revoked { http_status: 200 }
        );
    }
    let tiktok = br#"{"error":"invalid_client","error_description":"Client key or secret is invalid.","log_id":"L1"}"#;
    assert_eq!(
        revocation(401, tiktok),
        Revocation::Refused {
            http_status: 401,
            code: "invalid_client".into(),
            description: "Client key or secret is invalid. (log_id L1)".into(),
        }
    );
    // An error in a 200 is still an error; a bare 5xx names its status.
    assert!(matches!(
        revocation(200, br#"{"error":"invalid_request"}"#),
        Revocation::Refused { code, .. } if code == "invalid_request"
    ));
    assert!(matches!(
        revocation(503, b"<html>down</html>"),
        Revocation::Refused { code, .. } if code == "http_503"
    ));
}
