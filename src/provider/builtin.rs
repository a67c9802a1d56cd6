//! The built-in provider profiles (docs/src/providers/) and the generic RFC 6749 base, as
//! data: each platform's endpoints, parameter names, rotation, lifetimes and error codes.

use super::profile::{
    ClientAuth, Credential, ErrorRules, Method, ParamsIn, Profile, RefreshTtl, Rotation, Upgrade,
};
use std::time::Duration;

/// Built-in kinds, plus `generic` (everything written in the config).
pub const BUILT_IN: &[&str] = &[
    "tiktok",
    "google",
    "linkedin",
    "x",
    "pinterest",
    "instagram",
    "facebook",
    "threads",
    "reddit",
];
pub const GENERIC: &str = "generic";

fn s(v: &str) -> String {
    v.to_string()
}
fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter().map(|(a, b)| (s(a), s(b))).collect()
}
fn list(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| s(x)).collect()
}

const OAUTH_CONFIG: &[&str] = &[
    "invalid_client",
    "unauthorized_client",
    "invalid_scope",
    "unsupported_grant_type",
    "invalid_request",
    "access_denied",
];
const OAUTH_TRANSIENT: &[&str] = &[
    "server_error",
    "temporarily_unavailable",
    "rate_limit_exceeded",
];
/// Meta: 190 is an invalid or expired token; 1, 2, 4, 17, 341 are transient.
const META_TRANSIENT: &[&str] = &["1", "2", "4", "17", "341"];
const DAY: u64 = 86_400;

impl Profile {
    /// RFC 6749 defaults: the base of `kind = "generic"` (the token URL must be configured).
    pub fn generic() -> Profile {
        Profile {
            kind: s(GENERIC),
            authorize_url: None,
            token_url: String::new(),
            refresh_url: None,
            revoke_url: None,
            api_base: None,
            method: Method::Post,
            params_in: ParamsIn::Form,
            client_auth: ClientAuth::Body,
            send_client_id: false,
            client_id_param: s("client_id"),
            client_secret_param: s("client_secret"),
            credential: Credential::RefreshToken,
            credential_param: s("refresh_token"),
            grant_type: s("refresh_token"),
            refresh_params: Vec::new(),
            authorize_params: Vec::new(),
            scope_separator: s(" "),
            pkce: false,
            headers: Vec::new(),
            expires_in_field: s("expires_in"),
            expires_at_field: None,
            refresh_expires_in_field: None,
            refresh_expires_at_field: None,
            subject_field: None,
            userinfo_url: None,
            userinfo_subject_field: s("sub"),
            upgrade: None,
            min_token_age: Duration::ZERO,
            rotation: Rotation::Maybe,
            refresh_ttl: RefreshTtl::None,
            refresh_token_lifetime: None,
            refresh_at_least_every: None,
            errors: ErrorRules {
                reauth: list(&["invalid_grant"]),
                reauth_messages: Vec::new(),
                config: list(OAUTH_CONFIG),
                transient: list(OAUTH_TRANSIENT),
            },
        }
    }

    /// A built-in profile, as docs/src/providers/ describes it; None for an unknown kind.
    pub fn built_in(kind: &str) -> Option<Profile> {
        let g = Profile::generic();
        let meta_errors = ErrorRules {
            reauth: list(&["190"]),
            reauth_messages: Vec::new(),
            config: Vec::new(),
            transient: list(META_TRANSIENT),
        };
        let p = match kind {
            "tiktok" => Profile {
                api_base: Some(s("https://open.tiktokapis.com")),
                authorize_url: Some(s("https://www.tiktok.com/v2/auth/authorize/")),
                token_url: s("https://open.tiktokapis.com/v2/oauth/token/"),
                revoke_url: Some(s("https://open.tiktokapis.com/v2/oauth/revoke/")),
                client_id_param: s("client_key"),
                scope_separator: s(","),
                refresh_expires_in_field: Some(s("refresh_expires_in")),
                subject_field: Some(s("open_id")),
                rotation: Rotation::Always,
                // Whether refresh_expires_in resets on refresh is unconfirmed: assume not.
                refresh_ttl: RefreshTtl::Fixed,
                ..g
            },
            "google" => Profile {
                api_base: Some(s("https://www.googleapis.com")),
                authorize_url: Some(s("https://accounts.google.com/o/oauth2/v2/auth")),
                token_url: s("https://oauth2.googleapis.com/token"),
                revoke_url: Some(s("https://oauth2.googleapis.com/revoke")),
                authorize_params: pairs(&[("access_type", "offline"), ("prompt", "consent")]),
                userinfo_url: Some(s("https://openidconnect.googleapis.com/v1/userinfo")),
                refresh_expires_in_field: Some(s("refresh_token_expires_in")),
                rotation: Rotation::Never,
                refresh_ttl: RefreshTtl::Fixed,
                errors: ErrorRules {
                    reauth: list(&["invalid_grant", "admin_policy_enforced"]),
                    ..g.errors.clone()
                },
                ..g
            },
            "linkedin" => Profile {
                api_base: Some(s("https://api.linkedin.com")),
                authorize_url: Some(s("https://www.linkedin.com/oauth/v2/authorization")),
                token_url: s("https://www.linkedin.com/oauth/v2/accessToken"),
                revoke_url: Some(s("https://www.linkedin.com/oauth/v2/revoke")),
                userinfo_url: Some(s("https://api.linkedin.com/v2/userinfo")),
                refresh_expires_in_field: Some(s("refresh_token_expires_in")),
                rotation: Rotation::Never,
                refresh_ttl: RefreshTtl::Fixed,
                errors: ErrorRules {
                    reauth_messages: list(&["invalid, expired or revoked"]),
                    ..g.errors.clone()
                },
                ..g
            },
            "x" => Profile {
                api_base: Some(s("https://api.x.com")),
                authorize_url: Some(s("https://x.com/i/oauth2/authorize")),
                token_url: s("https://api.x.com/2/oauth2/token"),
                revoke_url: Some(s("https://api.x.com/2/oauth2/revoke")),
                userinfo_url: Some(s("https://api.x.com/2/users/me")),
                userinfo_subject_field: s("data.id"),
                client_auth: ClientAuth::Basic,
                send_client_id: true,
                pkce: true,
                rotation: Rotation::Always,
                errors: ErrorRules {
                    reauth_messages: list(&["value passed for the token was invalid"]),
                    ..g.errors.clone()
                },
                ..g
            },
            "pinterest" => Profile {
                api_base: Some(s("https://api.pinterest.com")),
                authorize_url: Some(s("https://www.pinterest.com/oauth/")),
                token_url: s("https://api.pinterest.com/v5/oauth/token"),
                client_auth: ClientAuth::Basic,
                refresh_params: pairs(&[("continuous_refresh", "true")]),
                userinfo_url: Some(s("https://api.pinterest.com/v5/user_account")),
                userinfo_subject_field: s("id"),
                scope_separator: s(","),
                refresh_expires_in_field: Some(s("refresh_token_expires_in")),
                refresh_expires_at_field: Some(s("refresh_token_expires_at")),
                rotation: Rotation::Always,
                refresh_ttl: RefreshTtl::Sliding,
                // Pinterest's `{code, message}` re-auth codes are unconfirmed: only the
                // standard invalid_grant flags; other codes are configuration errors.
                ..g
            },
            "instagram" => Profile {
                api_base: Some(s("https://graph.instagram.com")),
                authorize_url: Some(s("https://www.instagram.com/oauth/authorize")),
                token_url: s("https://api.instagram.com/oauth/access_token"),
                refresh_url: Some(s("https://graph.instagram.com/refresh_access_token")),
                // The code exchange answers {"access_token", "user_id", "permissions"}.
                subject_field: Some(s("user_id")),
                upgrade: Some(Upgrade::Exchange {
                    url: s("https://graph.instagram.com/access_token"),
                    grant_type: s("ig_exchange_token"),
                }),
                method: Method::Get,
                params_in: ParamsIn::Query,
                client_auth: ClientAuth::None,
                credential: Credential::AccessToken,
                credential_param: s("access_token"),
                grant_type: s("ig_refresh_token"),
                scope_separator: s(","),
                min_token_age: Duration::from_secs(DAY),
                rotation: Rotation::Never,
                errors: meta_errors,
                ..g
            },
            "facebook" => Profile {
                api_base: Some(s("https://graph.facebook.com")),
                authorize_url: Some(s("https://www.facebook.com/v24.0/dialog/oauth")),
                token_url: s("https://graph.facebook.com/v24.0/oauth/access_token"),
                userinfo_url: Some(s("https://graph.facebook.com/v24.0/me?fields=id")),
                userinfo_subject_field: s("id"),
                upgrade: Some(Upgrade::Refresh),
                method: Method::Get,
                params_in: ParamsIn::Query,
                client_auth: ClientAuth::Query,
                credential: Credential::AccessToken,
                credential_param: s("fb_exchange_token"),
                grant_type: s("fb_exchange_token"),
                scope_separator: s(","),
                rotation: Rotation::Never,
                errors: meta_errors,
                ..g
            },
            "threads" => Profile {
                api_base: Some(s("https://graph.threads.net")),
                authorize_url: Some(s("https://threads.net/oauth/authorize")),
                token_url: s("https://graph.threads.net/oauth/access_token"),
                refresh_url: Some(s("https://graph.threads.net/refresh_access_token")),
                subject_field: Some(s("user_id")),
                upgrade: Some(Upgrade::Exchange {
                    url: s("https://graph.threads.net/access_token"),
                    grant_type: s("th_exchange_token"),
                }),
                method: Method::Get,
                params_in: ParamsIn::Query,
                client_auth: ClientAuth::None,
                credential: Credential::AccessToken,
                credential_param: s("access_token"),
                grant_type: s("th_refresh_token"),
                scope_separator: s(","),
                min_token_age: Duration::from_secs(DAY),
                rotation: Rotation::Never,
                errors: meta_errors,
                ..g
            },
            "reddit" => Profile {
                api_base: Some(s("https://oauth.reddit.com")),
                authorize_url: Some(s("https://www.reddit.com/api/v1/authorize")),
                token_url: s("https://www.reddit.com/api/v1/access_token"),
                revoke_url: Some(s("https://www.reddit.com/api/v1/revoke_token")),
                userinfo_url: Some(s("https://oauth.reddit.com/api/v1/me")),
                userinfo_subject_field: s("id"),
                client_auth: ClientAuth::Basic,
                authorize_params: pairs(&[("duration", "permanent")]),
                // Reddit throttles requests without a descriptive User-Agent.
                headers: pairs(&[(
                    "User-Agent",
                    concat!("server:refreshd:", env!("CARGO_PKG_VERSION")),
                )]),
                ..g
            },
            _ => return None,
        };
        Some(Profile { kind: s(kind), ..p })
    }
}
