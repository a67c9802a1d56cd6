//! Token endpoint answers -> tokens or a classified failure, driven by a profile. Pure.
//!
//! Errors are read from the body whatever the status (TikTok answers some with HTTP 200):
//! a string `error` (OAuth, with `error_description`, Google's `error_subtype`), a numeric
//! `error` (Reddit), a nested `error.code` + `error_subcode` (Meta), or a top-level `code` +
//! `message` (Pinterest).

use super::profile::{Credential, Profile};
use super::tiktok::seconds;
use super::{FailureClass, ProviderFailure};
use crate::model::TokenSet;
use secrecy::SecretString;
use serde_json::{Map, Value};
use std::time::Duration;

/// Access-token lifetime assumed when a rotating answer gives no usable one.
const FALLBACK_LIFETIME: i64 = 600;

/// An error answer, with every part sanitized.
struct ErrorAnswer {
    code: String,
    subcode: Option<String>,
    description: Option<String>,
    /// What the provider's support asks for: TikTok `log_id`, Meta `fbtrace_id`.
    trace: Option<(&'static str, String)>,
}

fn scalar(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn error_answer(obj: &Map<String, Value>) -> Option<ErrorAnswer> {
    let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
    let trace = |o: &Map<String, Value>| {
        text(o.get("log_id"))
            .map(|t| ("log_id", t))
            .or_else(|| text(o.get("fbtrace_id")).map(|t| ("fbtrace_id", t)))
    };
    let (code, subcode, description, trace) = match obj.get("error") {
        Some(Value::Object(e)) => (
            scalar(e.get("code"))?,
            scalar(e.get("error_subcode")),
            text(e.get("message")),
            trace(e),
        ),
        Some(v @ (Value::String(_) | Value::Number(_))) => (
            scalar(Some(v))?,
            scalar(obj.get("error_subtype")),
            text(obj.get("error_description")).or_else(|| text(obj.get("message"))),
            trace(obj),
        ),
        _ if !obj.contains_key("access_token") => (
            scalar(obj.get("code"))?,
            None,
            text(obj.get("message")),
            trace(obj),
        ),
        _ => return None,
    };
    let code = sanitize(&code, 64);
    if code.is_empty() {
        return None;
    }
    Some(ErrorAnswer {
        code,
        subcode: subcode.map(|s| sanitize(&s, 64)).filter(|s| !s.is_empty()),
        description: description
            .filter(|d| !d.is_empty())
            .map(|d| d.chars().filter(|c| !c.is_control()).take(300).collect()),
        trace: trace
            .map(|(k, v)| (k, sanitize(&v, 64)))
            .filter(|(_, v)| !v.is_empty()),
    })
}

fn string(v: Option<&Value>) -> Option<String> {
    scalar(v).filter(|s| !s.is_empty())
}

/// An absolute time (unix seconds, or RFC 3339) as seconds remaining after `now`.
fn remaining(v: Option<&Value>, field: &str, now: i64) -> Result<Option<i64>, String> {
    let at = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => n.as_i64(),
        Some(Value::String(s)) => s.trim().parse::<i64>().ok().or_else(|| {
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                .ok()
                .map(|t| t.unix_timestamp())
        }),
        Some(_) => None,
    };
    let Some(at) = at else {
        return Err(format!("`{field}` is not a unix time or RFC 3339"));
    };
    seconds(Some(&Value::from(at.saturating_sub(now).max(0))), field)
}

/// Maps an answer of the token endpoint to tokens or a classified failure. `now` turns
/// absolute expiry fields into lifetimes.
pub fn parse(
    profile: &Profile,
    now: i64,
    http_status: u16,
    retry_after: Option<Duration>,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<TokenSet, ProviderFailure> {
    let fail = |class, message: String| ProviderFailure {
        class,
        message,
        http_status: Some(http_status),
        retry_after,
        answer_lost: false,
    };
    // A 2xx answer we cannot use: the provider said it did the refresh, so it may have
    // rotated the refresh token in this answer.
    let lost = |f: ProviderFailure| ProviderFailure {
        answer_lost: true,
        ..f
    };
    let json: Option<Value> = serde_json::from_slice(body).ok();
    // An error body wins whatever the status.
    if let Some(Value::Object(obj)) = &json
        && let Some(e) = error_answer(obj)
    {
        let mut message = e.code.clone();
        if let Some(sub) = &e.subcode {
            message.push_str(&format!(" (subcode {sub})"));
        }
        if let Some(d) = &e.description {
            message.push_str(": ");
            message.push_str(d);
        }
        if let Some((k, v)) = &e.trace {
            message.push_str(&format!(" ({k} {v})"));
        }
        message.push_str(&format!(" [HTTP {http_status}]"));
        let class = profile.classify(
            &e.code,
            e.subcode.as_deref(),
            e.description.as_deref(),
            http_status,
        );
        return Err(fail(class, message));
    }
    if http_status == 429 || http_status >= 500 {
        return Err(fail(
            FailureClass::Transient,
            format!(
                "HTTP {http_status} from the token endpoint{}",
                describe_body(content_type, body)
            ),
        ));
    }
    if (300..400).contains(&http_status) {
        return Err(fail(
            FailureClass::Config,
            format!(
                "HTTP {http_status}: the token endpoint redirects; redirects are not followed on token requests, check token_url"
            ),
        ));
    }
    if !(200..300).contains(&http_status) {
        return Err(fail(
            FailureClass::Config,
            format!(
                "HTTP {http_status} without an OAuth error body{}",
                describe_body(content_type, body)
            ),
        ));
    }
    let Some(Value::Object(obj)) = json else {
        return Err(lost(fail(
            FailureClass::Transient,
            format!(
                "malformed token response: not a JSON object{}",
                describe_body(content_type, body)
            ),
        )));
    };
    let malformed = |m: String| {
        lost(fail(
            FailureClass::Transient,
            format!("malformed token response: {m}"),
        ))
    };
    let access_token = string(obj.get("access_token"))
        .ok_or_else(|| malformed("`access_token` missing or empty".into()))?;
    let refresh_token = string(obj.get("refresh_token"));
    // A token is sent back in headers and form bodies, where control characters cannot go,
    // and PostgreSQL text cannot hold a NUL: such an answer is garbage, retried like one.
    let control = |t: &str| t.chars().any(char::is_control);
    if control(&access_token) || refresh_token.as_deref().is_some_and(control) {
        return Err(malformed(
            "a token contains control characters; it could never be used".into(),
        ));
    }
    // A new credential means the provider may already have retired the old one: such an
    // answer is stored even when other fields are broken, with a short lifetime so the
    // account is refreshed again soon. Otherwise a broken answer is simply retried.
    let new_credential = refresh_token.is_some() || profile.credential == Credential::AccessToken;
    let tolerate = |problem: String| -> Result<(), ProviderFailure> {
        if new_credential {
            tracing::warn!(event = "malformed_token_response", problem = %problem,
                "storing the new token anyway; the account is refreshed again soon");
            Ok(())
        } else {
            Err(malformed(problem))
        }
    };
    let field = &profile.expires_in_field;
    let mut expires = seconds(obj.get(field.as_str()), field);
    if let (Ok(None), Some(at)) = (&expires, &profile.expires_at_field) {
        expires = remaining(obj.get(at.as_str()), at, now);
    }
    let expires_in = match expires {
        Ok(Some(n)) if n > 0 => n,
        Ok(Some(_)) => {
            tolerate(format!("`{field}` is 0: the new token is already expired"))?;
            FALLBACK_LIFETIME
        }
        Ok(None) => {
            tolerate(format!("`{field}` missing"))?;
            FALLBACK_LIFETIME
        }
        Err(m) => {
            tolerate(m)?;
            FALLBACK_LIFETIME
        }
    };
    let mut refresh_expires = Ok(None);
    if let Some(f) = &profile.refresh_expires_in_field {
        refresh_expires = seconds(obj.get(f.as_str()), f);
    }
    if let (Ok(None), Some(f)) = (&refresh_expires, &profile.refresh_expires_at_field) {
        refresh_expires = remaining(obj.get(f.as_str()), f, now);
    }
    let refresh_expires_in = match refresh_expires {
        Ok(v) => v,
        Err(m) => {
            tolerate(m)?;
            None
        }
    };
    let token_type = string(obj.get("token_type")).unwrap_or_else(|| "Bearer".into());
    if !token_type.eq_ignore_ascii_case("bearer") {
        tolerate(format!(
            "unsupported token_type {:?} (expected Bearer)",
            token_type.chars().take(40).collect::<String>()
        ))?;
    }
    let subject = profile
        .subject_field
        .as_ref()
        .and_then(|f| string(obj.get(f.as_str())))
        .or_else(|| string(obj.get("id_token")).and_then(|t| id_token_subject(&t)));
    Ok(TokenSet {
        access_token: SecretString::from(access_token),
        refresh_token: refresh_token.map(SecretString::from),
        expires_in,
        refresh_expires_in,
        subject,
        scope: string(obj.get("scope"))
            .map(|s| s.chars().filter(|c| !c.is_control()).collect::<String>())
            .filter(|s| !s.is_empty()),
        token_type: "Bearer".into(),
    })
}

/// The `sub` claim of a JWT's payload, unverified taken from the token endpoint over TLS, so its signature need not
/// be checked (OpenID Connect Core 3.1.3.7).
fn id_token_subject(jwt: &str) -> Option<String> {
    use base64::Engine;
    let payload = jwt.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    // Kept exactly: `auth0|123` and `alice@example.org` are ids, not text to clean.
    claims
        .get("sub")?
        .as_str()
        .map(str::to_string)
        .filter(|s| !s.is_empty())
}

/// Provider-chosen error codes and trace ids end up in logs: keep them short and plain.
/// Never applied to subjects (see `crate::subject`).
fn sanitize(s: &str, max: usize) -> String {
    s.chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'))
        .take(max)
        .collect()
}

/// Describes a body for an error message without quoting it: a body may hold tokens.
fn describe_body(content_type: Option<&str>, body: &[u8]) -> String {
    if body.is_empty() {
        " (empty body)".into()
    } else {
        format!(
            " ({} bytes of {})",
            body.len(),
            content_type.unwrap_or("unknown content type")
        )
    }
}

#[cfg(test)]
mod tests {
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
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .finish();
        let t = tracing::subscriber::with_default(sub, || {
            parse_as("x", 200, r#"{"access_token":"a","expires_in":60}"#)
        })
        .unwrap();
        assert!(t.refresh_token.is_none());
        let logged = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
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
}
