//! TikTok Login Kit v2 token endpoint, the reference case: its answers read through the
//! built-in `tiktok` profile, and the tests that pin them. Pure; `mod.rs` does the HTTP.
//!
//! Request: `POST /v2/oauth/token/`, form-encoded, credentials in the body (`client_key`,
//! `client_secret`). Success: `access_token, expires_in, refresh_token, refresh_expires_in,
//! open_id, scope, token_type`. Errors: `error, error_description, log_id`, possibly with
//! HTTP 200, so the body decides, not only the status.

use super::failure::ProviderFailure;
use super::profile::Profile;
use crate::model::TokenSet;
use std::time::Duration;

/// Maps an HTTP answer of TikTok's token endpoint to tokens or a classified failure.
pub fn parse_response(
    http_status: u16,
    retry_after: Option<Duration>,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<TokenSet, ProviderFailure> {
    let profile = Profile::built_in("tiktok").expect("tiktok is built in");
    super::response::parse(&profile, 0, http_status, retry_after, content_type, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ReauthReason;
    use crate::provider::failure::FailureClass;
    use secrecy::ExposeSecret;

    fn ok(body: &str) -> TokenSet {
        parse_response(200, None, Some("application/json"), body.as_bytes()).unwrap()
    }
    fn err(status: u16, body: &str) -> ProviderFailure {
        parse_response(status, None, Some("application/json"), body.as_bytes()).unwrap_err()
    }

    #[test]
    fn success_fields() {
        let t = ok(
            r#"{"access_token":"act.A","expires_in":86400,"open_id":"u1","refresh_expires_in":31536000,"refresh_token":"rft.R","scope":"user.info.basic,video.list","token_type":"Bearer"}"#,
        );
        assert_eq!(t.access_token.expose_secret(), "act.A");
        assert_eq!(t.refresh_token.unwrap().expose_secret(), "rft.R");
        assert_eq!(t.expires_in, 86_400);
        assert_eq!(t.refresh_expires_in, Some(31_536_000));
        assert_eq!(t.subject.as_deref(), Some("u1"));
        assert_eq!(t.scope.as_deref(), Some("user.info.basic,video.list"));
    }

    #[test]
    fn missing_refresh_token_is_none() {
        let t = ok(r#"{"access_token":"a","expires_in":60,"token_type":"Bearer"}"#);
        assert!(t.refresh_token.is_none());
        assert_eq!(t.refresh_expires_in, None);
    }

    #[test]
    fn error_in_200_is_classified_by_body_with_log_id() {
        let f = err(
            200,
            r#"{"error":"invalid_grant","error_description":"Refresh token is invalid or expired.","log_id":"2026LOG"}"#,
        );
        assert_eq!(f.class, FailureClass::Rejected(ReauthReason::InvalidGrant));
        assert!(f.message.contains("log_id 2026LOG"), "{}", f.message);
        assert!(f.message.contains("invalid_grant"));
        let f = err(
            200,
            r#"{"error":"server_error","error_description":"x","log_id":"L"}"#,
        );
        assert_eq!(f.class, FailureClass::Transient);
    }

    #[test]
    fn config_errors() {
        for code in [
            "invalid_client",
            "unauthorized_client",
            "invalid_scope",
            "unsupported_grant_type",
            "invalid_request",
        ] {
            let f = err(
                400,
                &format!(r#"{{"error":"{code}","error_description":"d","log_id":"L"}}"#),
            );
            assert_eq!(f.class, FailureClass::Config, "{code}");
        }
    }

    #[test]
    fn transient_statuses_without_json() {
        assert_eq!(
            parse_response(502, None, Some("text/html"), b"<html>bad gateway</html>")
                .unwrap_err()
                .class,
            FailureClass::Transient
        );
        let f = parse_response(429, Some(Duration::from_secs(30)), None, b"").unwrap_err();
        assert_eq!(f.class, FailureClass::Transient);
        assert_eq!(f.retry_after, Some(Duration::from_secs(30)));
    }

    #[test]
    fn malformed_success_is_transient_and_does_not_quote_body() {
        for body in [
            "not json",
            "",
            r#"{"expires_in":60}"#,
            r#"{"access_token":"act.LEAK","expires_in":-5}"#,
            r#"{"access_token":"act.LEAK","expires_in":"soon"}"#,
            r#"{"access_token":"act.LEAK","expires_in":99999999999}"#,
            r#"{"access_token":"act.LEAK","expires_in":60,"token_type":"MAC"}"#,
            "<html>hello</html>",
        ] {
            let f = err(200, body);
            assert_eq!(f.class, FailureClass::Transient, "{body}");
            assert!(!f.message.contains("LEAK"), "{}", f.message);
        }
    }

    #[test]
    fn broken_answer_with_a_new_refresh_token_is_still_stored() {
        for body in [
            r#"{"access_token":"a","refresh_token":"rft.NEW","expires_in":0}"#,
            r#"{"access_token":"a","refresh_token":"rft.NEW","expires_in":"soon"}"#,
            r#"{"access_token":"a","refresh_token":"rft.NEW"}"#,
            r#"{"access_token":"a","refresh_token":"rft.NEW","expires_in":60,"refresh_expires_in":-1}"#,
            r#"{"access_token":"a","refresh_token":"rft.NEW","expires_in":60,"token_type":"MAC"}"#,
        ] {
            let t = ok(body);
            assert_eq!(
                t.refresh_token.unwrap().expose_secret(),
                "rft.NEW",
                "{body}"
            );
            assert!(t.expires_in > 0 && t.expires_in <= 600, "{body}");
        }
    }

    #[test]
    fn provider_identifiers_are_sanitized() {
        let long = "x".repeat(500);
        let f = err(
            400,
            &format!(r#"{{"error":"invalid_grant","log_id":"{long}\n<script>"}}"#),
        );
        assert!(f.message.len() < 200, "{}", f.message);
        assert!(!f.message.contains('<') && !f.message.contains('\n'));
    }

    #[test]
    fn numeric_string_lifetime_accepted() {
        assert_eq!(
            ok(r#"{"access_token":"a","expires_in":"3600"}"#).expires_in,
            3600
        );
    }

    #[test]
    fn redirect_is_an_unexpected_answer() {
        assert_eq!(
            parse_response(302, None, None, b"").unwrap_err().class,
            FailureClass::Unexpected
        );
    }
}
