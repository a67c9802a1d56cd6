//! Provider profiles: everything that differs between platforms' token endpoints, as data.
//! A built-in profile (docs/src/providers/) or `kind = "generic"` is the base; every key of
//! `[providers.NAME]` overrides one field. Pure: no I/O.

use crate::config::ProviderConfig;
use crate::model::ReauthReason;
use crate::provider::FailureClass;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Get,
    Post,
}

/// Where the refresh request's parameters go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamsIn {
    Form,
    Query,
}

/// How the client authenticates on token requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// client id and secret as parameters (form body, or query for GET).
    Body,
    /// HTTP Basic with client id and secret, each form-urlencoded first (RFC 6749 §2.3.1).
    Basic,
    /// HTTP Basic with client id and secret as they are, for the few servers that do not
    /// decode them (differs from `Basic` only when they hold characters like `+/=%`).
    BasicRaw,
    /// client id and secret in the URL query (Facebook).
    Query,
    /// No client credentials on refresh (Instagram, Threads).
    None,
}

/// Which stored credential a refresh presents.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Credential {
    RefreshToken,
    /// Long-lived access tokens extended with themselves (Instagram, Facebook, Threads).
    AccessToken,
}

/// How the short-lived token of a code exchange becomes a long-lived one (Meta).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Upgrade {
    /// The refresh request itself, presenting the new access token (Facebook's
    /// `fb_exchange_token`).
    Refresh,
    /// `GET url?grant_type=..&client_secret=..&access_token=..` (Instagram, Threads).
    Exchange { url: String, grant_type: String },
}

/// Whether a refresh returns a new refresh token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rotation {
    /// Single use: the old one stops working once a new one is issued.
    Always,
    Maybe,
    Never,
}

/// How the refresh token's end moves when refreshing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RefreshTtl {
    /// Counts down from the first grant: a refresh never moves the end later.
    Fixed,
    /// Renewed by each refresh.
    Sliding,
    /// The provider gives no end.
    None,
}

/// How error answers map to outcomes. Codes are compared exactly; message matchers are
/// case-insensitive substrings of the error's description.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ErrorRules {
    pub reauth: Vec<String>,
    pub reauth_messages: Vec<String>,
    pub config: Vec<String>,
    pub transient: Vec<String>,
}

/// A resolved profile: what the token endpoint of one provider expects and answers.
#[derive(Clone, Debug, PartialEq)]
pub struct Profile {
    pub kind: String,
    pub authorize_url: Option<String>,
    /// Code exchange (and refresh, unless `refresh_url` is set).
    pub token_url: String,
    pub refresh_url: Option<String>,
    pub revoke_url: Option<String>,
    pub method: Method,
    pub params_in: ParamsIn,
    pub client_auth: ClientAuth,
    /// Also send the client id as a parameter with Basic auth (X) or no client auth (a
    /// public client).
    pub send_client_id: bool,
    pub client_id_param: String,
    pub client_secret_param: String,
    pub credential: Credential,
    /// The parameter carrying the credential (`refresh_token`, `access_token`, ...).
    pub credential_param: String,
    pub grant_type: String,
    pub refresh_params: Vec<(String, String)>,
    pub authorize_params: Vec<(String, String)>,
    pub scope_separator: String,
    pub pkce: bool,
    pub headers: Vec<(String, String)>,
    pub expires_in_field: String,
    pub expires_at_field: Option<String>,
    pub refresh_expires_in_field: Option<String>,
    pub refresh_expires_at_field: Option<String>,
    /// The user id in the token answer (TikTok `open_id`). Without it a code exchange takes
    /// the `sub` of an `id_token` in the answer, else asks `userinfo_url`.
    pub subject_field: Option<String>,
    /// Asked with the new access token (Bearer) for the user id when the token answer has
    /// none: OpenID Connect userinfo, X's `/2/users/me`, Graph's `/me`.
    pub userinfo_url: Option<String>,
    /// Where the user id is in the userinfo answer; dots go into objects (`data.id`).
    pub userinfo_subject_field: String,
    /// Trade the code exchange's short-lived token for a long-lived one (built-ins only).
    pub upgrade: Option<Upgrade>,
    /// A token younger than this is not refreshed (Instagram, Threads: 24 h).
    pub min_token_age: Duration,
    pub rotation: Rotation,
    pub refresh_ttl: RefreshTtl,
    /// Taken as the refresh token's lifetime when the answer gives none (configured only).
    pub refresh_token_lifetime: Option<Duration>,
    pub errors: ErrorRules,
}

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
                authorize_url: Some(s(crate::config::TIKTOK_AUTHORIZE_URL)),
                token_url: s(crate::config::TIKTOK_TOKEN_URL),
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

    /// The profile of `[providers.NAME]`: its kind's base with every configured key applied.
    /// Errors are (key leaf, problem) pairs.
    pub fn resolve(name: &str, p: &ProviderConfig) -> Result<Profile, Vec<(String, String)>> {
        let mut errs = Vec::new();
        let kind = p.kind(name);
        let mut prof = match kind {
            GENERIC => Profile::generic(),
            k => match Profile::built_in(k) {
                Some(b) => b,
                None => {
                    let why = if p.kind.is_none() {
                        format!(
                            "[providers.{name}] is not a built-in provider: set kind to one of {}, or \"generic\" and describe it (token_url, ...)",
                            BUILT_IN.join(", ")
                        )
                    } else {
                        format!(
                            "unknown provider kind {k:?}; built-in kinds: {}, or \"generic\"",
                            BUILT_IN.join(", ")
                        )
                    };
                    return Err(vec![("kind".into(), why)]);
                }
            },
        };
        macro_rules! set {
            ($field:ident) => {
                if let Some(v) = &p.$field {
                    prof.$field = v.clone();
                }
            };
            ($field:ident, opt) => {
                if let Some(v) = &p.$field {
                    prof.$field = Some(v.clone()).filter(|x: &String| !x.is_empty());
                }
            };
        }
        if let Some(u) = &p.token_url {
            prof.token_url = u.clone();
        }
        set!(authorize_url, opt);
        set!(refresh_url, opt);
        set!(revoke_url, opt);
        set!(method);
        set!(params_in);
        set!(client_auth);
        set!(send_client_id);
        set!(client_id_param);
        set!(client_secret_param);
        set!(credential);
        set!(credential_param);
        set!(grant_type);
        set!(scope_separator);
        set!(pkce);
        set!(expires_in_field);
        set!(expires_at_field, opt);
        set!(refresh_expires_in_field, opt);
        set!(refresh_expires_at_field, opt);
        set!(subject_field, opt);
        set!(userinfo_url, opt);
        set!(userinfo_subject_field);
        match (&mut prof.upgrade, &p.upgrade_url, &p.upgrade_grant_type) {
            (Some(Upgrade::Exchange { url, grant_type }), u, g) => {
                if let Some(u) = u {
                    *url = u.clone();
                }
                if let Some(g) = g {
                    *grant_type = g.clone();
                }
            }
            (_, Some(u), Some(g)) => {
                prof.upgrade = Some(Upgrade::Exchange {
                    url: u.clone(),
                    grant_type: g.clone(),
                })
            }
            (_, None, None) => {}
            (_, _, _) => errs.push((
                "upgrade_url".to_string(),
                "give upgrade_url and upgrade_grant_type together".to_string(),
            )),
        }
        set!(min_token_age);
        set!(rotation);
        set!(refresh_ttl);
        if let Some(d) = p.refresh_token_lifetime {
            prof.refresh_token_lifetime = Some(d);
        }
        let map = |m: &std::collections::BTreeMap<String, String>| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<Vec<_>>()
        };
        if let Some(m) = &p.refresh_params {
            prof.refresh_params = map(m);
        }
        if let Some(m) = &p.authorize_params {
            prof.authorize_params = map(m);
        }
        if let Some(m) = &p.headers {
            prof.headers = map(m);
        }
        if let Some(v) = &p.reauth_errors {
            prof.errors.reauth = v.clone();
        }
        if let Some(v) = &p.reauth_messages {
            prof.errors.reauth_messages = v.clone();
        }
        if let Some(v) = &p.config_errors {
            prof.errors.config = v.clone();
        }
        if let Some(v) = &p.transient_errors {
            prof.errors.transient = v.clone();
        }

        let mut bad = |k: &str, m: String| errs.push((k.to_string(), m));
        if prof.token_url.is_empty() {
            bad(
                "token_url",
                "missing: a generic provider needs its token endpoint, e.g. \"https://auth.example.com/oauth/token\"".into(),
            );
        }
        for (k, v) in [
            ("client_id_param", &prof.client_id_param),
            ("client_secret_param", &prof.client_secret_param),
            ("credential_param", &prof.credential_param),
            ("grant_type", &prof.grant_type),
            ("expires_in_field", &prof.expires_in_field),
            ("userinfo_subject_field", &prof.userinfo_subject_field),
        ] {
            if v.trim().is_empty() {
                bad(k, "must not be empty".into());
            }
        }
        if let Some(d) = prof.refresh_token_lifetime {
            if d.as_secs() == 0 {
                bad("refresh_token_lifetime", "must be at least 1s".into());
            } else if prof.refresh_ttl == RefreshTtl::None {
                bad(
                    "refresh_token_lifetime",
                    "say how it counts: refresh_ttl = \"fixed\" (from the first grant) or \"sliding\" (from each refresh)".into(),
                );
            }
        }
        if prof.scope_separator.is_empty() {
            bad(
                "scope_separator",
                "must not be empty (e.g. \" \" or \",\")".into(),
            );
        }
        if prof.method == Method::Get && prof.params_in == ParamsIn::Form {
            bad(
                "params_in",
                "a GET request has no body: use params_in = \"query\" with method = \"get\"".into(),
            );
        }
        for (k, _) in &prof.headers {
            if reqwest::header::HeaderName::from_bytes(k.as_bytes()).is_err() {
                bad("headers", format!("{k:?} is not a valid HTTP header name"));
            }
        }
        if let Some((k, _)) = prof
            .headers
            .iter()
            .find(|(_, v)| reqwest::header::HeaderValue::from_str(v).is_err())
        {
            bad(
                "headers",
                format!("the value of {k:?} is not a valid HTTP header value"),
            );
        }
        if prof
            .errors
            .reauth_messages
            .iter()
            .any(|m| m.trim().is_empty())
        {
            bad("reauth_messages", "matchers must not be empty".into());
        }
        if errs.is_empty() { Ok(prof) } else { Err(errs) }
    }

    /// The profile's own word for the user id, for messages and CLI output: the token
    /// answer's `subject_field` (TikTok `open_id`), else the userinfo / id_token field
    /// (`sub` for OpenID Connect).
    pub fn subject_name(&self) -> &str {
        self.subject_field
            .as_deref()
            .unwrap_or(&self.userinfo_subject_field)
    }

    /// Where refresh requests go.
    pub fn refresh_endpoint(&self) -> &str {
        self.refresh_url.as_deref().unwrap_or(&self.token_url)
    }

    /// Whether refreshing needs the client secret.
    pub fn needs_secret(&self) -> bool {
        self.client_auth != ClientAuth::None
    }

    /// The refresh request presenting `credential`. Holds secrets: never log it.
    pub fn refresh_request(
        &self,
        client_id: &str,
        client_secret: Option<&SecretString>,
        credential: &SecretString,
    ) -> TokenRequest {
        let mut req = TokenRequest::new(self.method, self.refresh_endpoint(), self.params_in);
        self.client_auth(&mut req, self.client_auth, client_id, client_secret);
        req.params
            .push(("grant_type".into(), self.grant_type.clone()));
        req.params.push((
            self.credential_param.clone(),
            credential.expose_secret().to_string(),
        ));
        req.params.extend(self.refresh_params.iter().cloned());
        req.headers = self.headers.clone();
        req
    }

    /// The short-lived-to-long-lived exchange after a code exchange, if the profile has one.
    pub fn upgrade_request(
        &self,
        client_id: &str,
        client_secret: Option<&SecretString>,
        access_token: &SecretString,
    ) -> Option<TokenRequest> {
        match self.upgrade.as_ref()? {
            Upgrade::Refresh => Some(self.refresh_request(client_id, client_secret, access_token)),
            Upgrade::Exchange { url, grant_type } => {
                let mut req = TokenRequest::new(Method::Get, url, ParamsIn::Query);
                req.params.push(("grant_type".into(), grant_type.clone()));
                req.params.push((
                    self.client_secret_param.clone(),
                    client_secret
                        .map(|s| s.expose_secret().to_string())
                        .unwrap_or_default(),
                ));
                req.params.push((
                    "access_token".into(),
                    access_token.expose_secret().to_string(),
                ));
                req.headers = self.headers.clone();
                Some(req)
            }
        }
    }

    /// The authorization-code exchange: always a POST form to `token_url`; client
    /// credentials in the body unless the profile uses HTTP Basic.
    pub fn code_request(
        &self,
        client_id: &str,
        client_secret: Option<&SecretString>,
        code: &SecretString,
        redirect_uri: &str,
        code_verifier: Option<&SecretString>,
    ) -> TokenRequest {
        let mut req = TokenRequest::new(Method::Post, &self.token_url, ParamsIn::Form);
        let auth = match self.client_auth {
            a @ (ClientAuth::Basic | ClientAuth::BasicRaw) => a,
            _ => ClientAuth::Body,
        };
        self.client_auth(&mut req, auth, client_id, client_secret);
        req.params
            .push(("code".into(), code.expose_secret().to_string()));
        req.params
            .push(("grant_type".into(), "authorization_code".into()));
        req.params
            .push(("redirect_uri".into(), redirect_uri.to_string()));
        if let Some(v) = code_verifier {
            req.params
                .push(("code_verifier".into(), v.expose_secret().to_string()));
        }
        req.headers = self.headers.clone();
        req
    }

    fn client_auth(
        &self,
        req: &mut TokenRequest,
        auth: ClientAuth,
        client_id: &str,
        client_secret: Option<&SecretString>,
    ) {
        let secret = || {
            client_secret
                .map(|s| s.expose_secret().to_string())
                .unwrap_or_default()
        };
        match auth {
            ClientAuth::Body => {
                req.params
                    .push((self.client_id_param.clone(), client_id.to_string()));
                req.params
                    .push((self.client_secret_param.clone(), secret()));
            }
            ClientAuth::Query => {
                req.query
                    .push((self.client_id_param.clone(), client_id.to_string()));
                req.query.push((self.client_secret_param.clone(), secret()));
            }
            ClientAuth::Basic | ClientAuth::BasicRaw => {
                req.basic = Some(if auth == ClientAuth::Basic {
                    (
                        form_encode(client_id),
                        SecretString::from(form_encode(&secret())),
                    )
                } else {
                    (client_id.to_string(), SecretString::from(secret()))
                });
                if self.send_client_id {
                    req.params
                        .push((self.client_id_param.clone(), client_id.to_string()));
                }
            }
            // A public client identifies itself without a secret.
            ClientAuth::None => {
                if self.send_client_id {
                    req.params
                        .push((self.client_id_param.clone(), client_id.to_string()));
                }
            }
        }
    }

    /// Classifies an error code (and its description) by the profile's rules. Unknown codes
    /// are configuration problems unless the status says transient: never reauth on a guess.
    pub fn classify(
        &self,
        code: &str,
        subcode: Option<&str>,
        description: Option<&str>,
        http_status: u16,
    ) -> FailureClass {
        let r = &self.errors;
        let has = |l: &[String]| l.iter().any(|c| c == code);
        if has(&r.transient) {
            return FailureClass::Transient;
        }
        if has(&r.reauth) {
            // Meta 190/463: the token expired (rather than being revoked).
            let reason = if subcode == Some("463") {
                ReauthReason::RefreshTokenExpired
            } else {
                ReauthReason::InvalidGrant
            };
            return FailureClass::Rejected(reason);
        }
        if let Some(d) = description {
            let d = d.to_lowercase();
            if r.reauth_messages
                .iter()
                .any(|m| d.contains(&m.to_lowercase()))
            {
                return FailureClass::Rejected(ReauthReason::InvalidGrant);
            }
        }
        if has(&r.config) {
            return FailureClass::Config;
        }
        if http_status == 429 || http_status >= 500 {
            FailureClass::Transient
        } else {
            FailureClass::Config
        }
    }
}

/// `application/x-www-form-urlencoded` of one value, as RFC 6749 §2.3.1 asks for the
/// client id and secret before they go into HTTP Basic.
fn form_encode(v: &str) -> String {
    url::form_urlencoded::byte_serialize(v.as_bytes()).collect()
}

/// A token request ready to send. Holds secrets: its `Debug` shows parameter names only.
pub struct TokenRequest {
    pub method: Method,
    pub url: String,
    pub params_in: ParamsIn,
    /// Form body, or query when `params_in` is query.
    pub params: Vec<(String, String)>,
    /// Always in the URL query (client_auth = "query").
    pub query: Vec<(String, String)>,
    /// HTTP Basic user and password, exactly as they go into the header (already
    /// form-urlencoded for `client_auth = "basic"`).
    pub basic: Option<(String, SecretString)>,
    pub headers: Vec<(String, String)>,
}

impl TokenRequest {
    fn new(method: Method, url: &str, params_in: ParamsIn) -> TokenRequest {
        TokenRequest {
            method,
            url: url.to_string(),
            params_in,
            params: Vec::new(),
            query: Vec::new(),
            basic: None,
            headers: Vec::new(),
        }
    }

    /// Names of every parameter, in order: query first, then form or query params.
    pub fn param_names(&self) -> Vec<&str> {
        self.query
            .iter()
            .chain(&self.params)
            .map(|(k, _)| k.as_str())
            .collect()
    }

    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .chain(&self.params)
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl std::fmt::Debug for TokenRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenRequest")
            .field("method", &self.method)
            .field("params_in", &self.params_in)
            .field("params", &self.param_names())
            .field("basic", &self.basic.is_some())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn resolve(toml: &str) -> Profile {
        let c = Config::from_toml_str(toml).unwrap();
        let (name, p) = c.providers.iter().next().unwrap();
        Profile::resolve(name, p).unwrap()
    }

    fn cred() -> SecretString {
        SecretString::from("CRED-SECRET")
    }

    #[test]
    fn every_built_in_resolves_with_credentials_only() {
        for kind in BUILT_IN {
            let p = resolve(&format!(
                "[providers.{kind}]\nclient_key = \"id\"\nclient_secret = \"sec\"\n"
            ));
            assert_eq!(p.kind, *kind);
            assert!(p.token_url.starts_with("https://"), "{kind}");
            assert!(p.authorize_url.is_some(), "{kind}");
        }
    }

    #[test]
    fn tiktok_request_is_unchanged() {
        let p = Profile::built_in("tiktok").unwrap();
        let r = p.refresh_request("ck", Some(&SecretString::from("cs")), &cred());
        assert_eq!(r.method, Method::Post);
        assert_eq!(
            r.param_names(),
            ["client_key", "client_secret", "grant_type", "refresh_token"]
        );
        assert_eq!(r.param("grant_type"), Some("refresh_token"));
        assert!(r.basic.is_none());
    }

    #[test]
    fn request_shapes_per_built_in() {
        let sec = SecretString::from("cs");
        let shape = |kind: &str| {
            let p = Profile::built_in(kind).unwrap();
            let r = p.refresh_request("cid", Some(&sec), &cred());
            (p, r)
        };
        for kind in ["google", "linkedin"] {
            let (_, r) = shape(kind);
            let mut names = r.param_names();
            names.sort();
            assert_eq!(
                names,
                ["client_id", "client_secret", "grant_type", "refresh_token"],
                "{kind}"
            );
        }
        let (_, r) = shape("x");
        assert!(r.basic.is_some());
        assert_eq!(
            r.param_names(),
            ["client_id", "grant_type", "refresh_token"]
        );
        let (_, r) = shape("pinterest");
        assert!(r.basic.is_some());
        assert_eq!(r.param("continuous_refresh"), Some("true"));
        assert_eq!(r.param("client_id"), None);
        let (p, r) = shape("instagram");
        assert_eq!((r.method, r.params_in), (Method::Get, ParamsIn::Query));
        assert_eq!(r.param_names(), ["grant_type", "access_token"]);
        assert_eq!(r.param("grant_type"), Some("ig_refresh_token"));
        assert_eq!(r.url, "https://graph.instagram.com/refresh_access_token");
        assert_eq!(p.min_token_age, Duration::from_secs(86_400));
        let (_, r) = shape("facebook");
        assert_eq!(
            r.param_names(),
            [
                "client_id",
                "client_secret",
                "grant_type",
                "fb_exchange_token"
            ]
        );
        assert_eq!(r.param("fb_exchange_token"), Some("CRED-SECRET"));
        let (_, r) = shape("threads");
        assert_eq!(r.param("grant_type"), Some("th_refresh_token"));
        assert!(r.basic.is_none() && r.param("client_id").is_none());
        let (_, r) = shape("reddit");
        assert!(r.basic.is_some());
        assert!(r.headers.iter().any(|(k, _)| k == "User-Agent"));
    }

    #[test]
    fn request_debug_hides_secrets() {
        let p = Profile::built_in("facebook").unwrap();
        let r = p.refresh_request("cid", Some(&SecretString::from("CS-SECRET")), &cred());
        let d = format!("{r:?}");
        assert!(!d.contains("SECRET"), "{d}");
    }

    #[test]
    fn overrides_apply_to_built_ins() {
        let p = resolve(
            "[providers.yt]\nkind = \"google\"\nclient_key = \"id\"\nclient_secret = \"s\"\ntoken_url = \"http://127.0.0.1:9/t\"\nrotation = \"always\"\nrefresh_params = { foo = \"bar\" }\nmin_token_age = \"1h\"\n",
        );
        assert_eq!(p.kind, "google");
        assert_eq!(p.token_url, "http://127.0.0.1:9/t");
        assert_eq!(p.rotation, Rotation::Always);
        assert_eq!(p.refresh_params, vec![("foo".into(), "bar".into())]);
        assert_eq!(p.min_token_age, Duration::from_secs(3600));
        assert_eq!(p.errors.reauth, ["invalid_grant", "admin_policy_enforced"]);
    }

    #[test]
    fn classification_rules() {
        let li = Profile::built_in("linkedin").unwrap();
        let d = "The provided authorization grant or refresh token is invalid, expired or revoked.";
        assert_eq!(
            li.classify("invalid_request", None, Some(d), 400),
            FailureClass::Rejected(ReauthReason::InvalidGrant)
        );
        assert_eq!(
            li.classify("invalid_request", None, Some("missing param"), 400),
            FailureClass::Config
        );
        let meta = Profile::built_in("facebook").unwrap();
        assert_eq!(
            meta.classify("190", Some("460"), None, 400),
            FailureClass::Rejected(ReauthReason::InvalidGrant)
        );
        assert_eq!(
            meta.classify("190", Some("463"), None, 400),
            FailureClass::Rejected(ReauthReason::RefreshTokenExpired)
        );
        assert_eq!(meta.classify("4", None, None, 400), FailureClass::Transient);
        assert_eq!(meta.classify("100", None, None, 400), FailureClass::Config);
        assert_eq!(
            meta.classify("100", None, None, 503),
            FailureClass::Transient
        );
    }
}
