//! Token endpoint answers -> tokens or a classified failure, driven by a profile. Pure.
//!
//! Errors are read from the body whatever the status (TikTok answers some with HTTP 200):
//! a string `error` (OAuth, with `error_description`, Google's `error_subtype`), a numeric
//! `error` (Reddit), a nested `error.code` + `error_subcode` (Meta), or a top-level `code` +
//! `message` (Pinterest).

use super::failure::{FailureClass, ProviderFailure};
use super::profile::{Credential, Profile, Rotation};
use crate::model::TokenSet;
use secrecy::SecretString;
use serde_json::{Map, Value};
use std::time::Duration;

/// Longest lifetime we believe (10 years): anything longer is a broken answer.
pub const MAX_LIFETIME: i64 = 10 * 365 * 86_400;

/// A lifetime in seconds: a whole number (or numeric string) in `0..=MAX_LIFETIME`.
pub fn seconds(v: Option<&Value>, field: &str) -> Result<Option<i64>, String> {
    let n = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => n.as_i64(),
        // Some providers send lifetimes as numeric strings; accept exactly that.
        Some(Value::String(s)) => s.trim().parse::<i64>().ok(),
        Some(_) => None,
    };
    match n {
        Some(n) if (0..=MAX_LIFETIME).contains(&n) => Ok(Some(n)),
        Some(n) => Err(format!(
            "`{field}` = {n} is outside 0..={MAX_LIFETIME} seconds"
        )),
        None => Err(format!("`{field}` is not a whole number of seconds")),
    }
}

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
        // A top-level `code` is an error only beside no token: a 2xx answer carrying one
        // is read as tokens, so a new refresh token is never lost to a stray field.
        _ if !obj.contains_key("access_token") && !obj.contains_key("refresh_token") => (
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

/// What a provider answered to a revocation (`accounts remove --revoke`).
#[derive(Debug, PartialEq, Eq)]
pub enum Revocation {
    /// A 2xx without an error in its body: the grant is gone.
    Revoked { http_status: u16 },
    /// The provider answered with an error: its HTTP status, code and description.
    Refused {
        http_status: u16,
        code: String,
        description: String,
    },
    /// No answer (connection refused, timeout, oversized answer): why.
    Unreachable(String),
    /// The provider has no `revoke_url`.
    Unsupported,
}

/// A revocation's answer: revoked on a 2xx whose body (JSON or empty, RFC 7009) names no
/// error; refused with the provider's code otherwise (`http_<status>` when it names none).
pub fn revocation(status: u16, body: &[u8]) -> Revocation {
    let error = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.as_object().and_then(error_answer))
        .filter(|e| !means_success(&e.code));
    match error {
        None if (200..300).contains(&status) => Revocation::Revoked {
            http_status: status,
        },
        e => Revocation::Refused {
            http_status: status,
            code: e
                .as_ref()
                .map_or_else(|| format!("http_{status}"), |e| e.code.clone()),
            description: e
                .and_then(|e| {
                    let trace = e
                        .trace
                        .map(|(k, v)| format!(" ({k} {v})"))
                        .unwrap_or_default();
                    e.description.map(|d| d + &trace)
                })
                .unwrap_or_default(),
        },
    }
}

/// An `error` code that says there is none (TikTok v2 `"ok"`, a numeric `0`).
fn means_success(code: &str) -> bool {
    code.eq_ignore_ascii_case("ok") || code == "0"
}

fn string(v: Option<&Value>) -> Option<String> {
    scalar(v).filter(|s| !s.is_empty())
}

/// A JSON string only: no number or array is taken for text.
fn text(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str).map(str::to_string)
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

/// What a usable 2xx answer gave.
#[derive(Debug)]
pub enum Granted {
    /// New tokens.
    Tokens(TokenSet),
    /// A new refresh token but no usable access token: the refresh token must be stored
    /// (the provider may already have retired the old one), the stored access token kept,
    /// and an access token asked for again soon.
    RefreshTokenOnly {
        refresh_token: SecretString,
        refresh_expires_in: Option<i64>,
        subject: Option<String>,
    },
}

/// A 2xx answer the engine can store, with what was wrong in it.
#[derive(Debug)]
pub struct Answer {
    pub granted: Granted,
    /// Broken fields tolerated because the answer carries a new credential: the caller
    /// reports them (naming the account) once it knows whether the credential was stored.
    pub problems: Vec<String>,
    /// The profile rotates refresh tokens, but this answer carried none.
    pub rotation_missing: bool,
}

impl Answer {
    /// The tokens, when the answer has an access token: a code exchange needs one.
    pub fn into_tokens(self, http_status: u16) -> Result<TokenSet, ProviderFailure> {
        match self.granted {
            Granted::Tokens(t) => Ok(t),
            Granted::RefreshTokenOnly { .. } => Err(ProviderFailure {
                class: FailureClass::Transient,
                message: format!("malformed token response: {}", self.problems.join("; ")),
                http_status: Some(http_status),
                retry_after: None,
                answer_lost: true,
            }),
        }
    }
}

/// A token field: `Ok(None)` when absent, null or empty; an error when it is not a JSON
/// string (never coerced) or could never be sent back (control characters: tokens go into
/// headers and form bodies, and PostgreSQL text cannot hold a NUL).
fn token_field(obj: &Map<String, Value>, name: &str) -> Result<Option<String>, String> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) if s.chars().any(char::is_control) => Err(format!(
            "`{name}` contains control characters; it could never be used"
        )),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(format!("`{name}` is {}, not a JSON string", json_kind(v))),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Maps an answer of the token endpoint to tokens or a classified failure, for callers that
/// need an access token (a code exchange, tools). `now` turns absolute expiry fields into
/// lifetimes.
pub fn parse(
    profile: &Profile,
    now: i64,
    http_status: u16,
    retry_after: Option<Duration>,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<TokenSet, ProviderFailure> {
    parse_answer(profile, now, http_status, retry_after, content_type, body)?
        .into_tokens(http_status)
        .map_err(|f| ProviderFailure { retry_after, ..f })
}

/// Maps an answer of the token endpoint to what can be stored or a classified failure.
///
/// The storing rule: a 2xx answer carrying a new refresh token (a JSON string) is stored
/// whatever else is broken in it (missing, empty, wrongly typed or out-of-range fields),
/// because the provider may already have retired the old one.
pub fn parse_answer(
    profile: &Profile,
    now: i64,
    http_status: u16,
    retry_after: Option<Duration>,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<Answer, ProviderFailure> {
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
    let success = (200..300).contains(&http_status);
    // An error body wins whatever the status, except beside a token on a 2xx: the storing
    // rule keeps that answer, and the error field is only a tolerated problem.
    let mut error_problem = None;
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
        let carries_token = ["refresh_token", "access_token"]
            .iter()
            .any(|f| matches!(obj.get(*f), Some(Value::String(t)) if !t.is_empty()));
        if success && carries_token {
            // TikTok's v2 envelope says `"error":{"code":"ok"}` on every success.
            if !means_success(&e.code) {
                error_problem = Some(format!("error field beside the tokens: {message}"));
            }
        } else {
            let class = profile.classify(
                &e.code,
                e.subcode.as_deref(),
                e.description.as_deref(),
                http_status,
            );
            let f = fail(class, message);
            // An error answer without a token is the provider's word that nothing was
            // rotated (TikTok answers every error inside HTTP 200): not a lost answer.
            return Err(f);
        }
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
    // Odd answers: one account's until several accounts get them (`provider_state`).
    if (300..400).contains(&http_status) {
        return Err(fail(
            FailureClass::Unexpected,
            format!(
                "HTTP {http_status}: the token endpoint redirects; redirects are not followed on token requests, check token_url"
            ),
        ));
    }
    if !(200..300).contains(&http_status) {
        return Err(fail(
            FailureClass::Unexpected,
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
    // A refresh token that is not a usable string cannot be stored: the whole answer is
    // garbage, retried like one.
    let refresh_token = token_field(&obj, "refresh_token").map_err(malformed)?;
    let mut problems: Vec<String> = error_problem.into_iter().collect();
    // No usable access token: with a new refresh token, that token alone is stored.
    let access_token = match token_field(&obj, "access_token") {
        Ok(Some(t)) => Some(t),
        bad => {
            let problem = bad
                .err()
                .unwrap_or_else(|| "`access_token` missing or empty".into());
            if refresh_token.is_none() {
                return Err(malformed(problem));
            }
            problems.push(problem);
            None
        }
    };
    // A new credential means the provider may already have retired the old one: such an
    // answer is stored even when other fields are broken, with a short lifetime so the
    // account is refreshed again soon. Otherwise a broken answer is simply retried.
    let new_credential = refresh_token.is_some() || profile.credential == Credential::AccessToken;
    let mut tolerate = |problem: String| -> Result<(), ProviderFailure> {
        if new_credential {
            problems.push(problem);
            Ok(())
        } else {
            Err(malformed(problem))
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
    let subject = profile
        .subject_field
        .as_ref()
        .and_then(|f| string(obj.get(f.as_str())))
        .or_else(|| {
            text(obj.get("id_token"))
                .filter(|t| !t.is_empty())
                .and_then(|t| id_token_subject(&t))
        });
    let Some(access_token) = access_token else {
        let refresh_token = refresh_token.expect("only an answer with one gets here");
        return Ok(Answer {
            granted: Granted::RefreshTokenOnly {
                refresh_token: SecretString::from(refresh_token),
                refresh_expires_in,
                subject,
            },
            problems,
            rotation_missing: false,
        });
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
    match obj.get("token_type") {
        None | Some(Value::Null) => {}
        Some(Value::String(t)) if t.is_empty() || t.eq_ignore_ascii_case("bearer") => {}
        Some(Value::String(t)) => tolerate(format!(
            "unsupported token_type {:?} (expected Bearer)",
            t.chars().take(40).collect::<String>()
        ))?,
        Some(v) => tolerate(format!(
            "`token_type` is {}, not a JSON string",
            json_kind(v)
        ))?,
    }
    let rotation_missing = profile.rotation == Rotation::Always
        && profile.credential == Credential::RefreshToken
        && refresh_token.is_none();
    Ok(Answer {
        granted: Granted::Tokens(TokenSet {
            access_token: SecretString::from(access_token),
            refresh_token: refresh_token.map(SecretString::from),
            expires_in,
            refresh_expires_in,
            subject,
            scope: text(obj.get("scope"))
                .map(|s| s.chars().filter(|c| !c.is_control()).collect::<String>())
                .filter(|s| !s.is_empty()),
            token_type: "Bearer".into(),
        }),
        problems,
        rotation_missing,
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
mod tests;
