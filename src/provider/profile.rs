//! Provider profiles: the type that says everything that differs between platforms' token
//! endpoints, and its pure methods: building token requests and classifying error codes.
//! The data of the built-in profiles is in `builtin.rs`; a configured provider's profile
//! (its kind's base with every `[providers.NAME]` key applied) is resolved by
//! `config::profile`. Pure: no I/O.

use super::failure::FailureClass;
use crate::model::ReauthReason;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use std::time::Duration;

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

/// What a request for a new access token presents: an account's stored credential, or,
/// for an app token, the client credentials alone.
#[derive(Clone, Copy, Debug)]
pub enum Presented<'a> {
    /// The account's refresh token (or its long-lived access token, per `Credential`).
    Credential(&'a SecretString),
    /// `grant_type=client_credentials`, asking for `scope` ('' leaves it out).
    ClientCredentials { scope: &'a str },
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
    /// Where the provider's API lives (`https://open.tiktokapis.com`): the one base the
    /// token proxy forwards to; None: the proxy refuses this provider's accounts.
    pub api_base: Option<String>,
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
    /// Refresh at least this often, however long the access token lives: providers that
    /// revoke refresh tokens left unused (sliding lifetimes) keep the account (configured
    /// only; None: off).
    pub refresh_at_least_every: Option<Duration>,
    pub errors: ErrorRules,
}

impl Profile {
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

    /// The request renewing an account's access token: its refresh request, or the client
    /// credentials grant of an app token. Holds secrets: never log it.
    pub fn renew_request(
        &self,
        client_id: &str,
        client_secret: Option<&SecretString>,
        presented: Presented<'_>,
    ) -> TokenRequest {
        match presented {
            Presented::Credential(c) => self.refresh_request(client_id, client_secret, c),
            Presented::ClientCredentials { scope } => {
                self.client_credentials_request(client_id, client_secret, scope)
            }
        }
    }

    /// The client credentials grant (RFC 6749 §4.4; TikTok's client access token): a POST
    /// form to `token_url` with the client credentials (in the body unless the profile uses
    /// HTTP Basic), `grant_type=client_credentials` and the scope when one is asked for.
    pub fn client_credentials_request(
        &self,
        client_id: &str,
        client_secret: Option<&SecretString>,
        scope: &str,
    ) -> TokenRequest {
        let mut req = TokenRequest::new(Method::Post, &self.token_url, ParamsIn::Form);
        self.client_auth(&mut req, self.form_auth(), client_id, client_secret);
        req.params
            .push(("grant_type".into(), "client_credentials".into()));
        if !scope.is_empty() {
            req.params.push(("scope".into(), scope.to_string()));
        }
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
        self.client_auth(&mut req, self.form_auth(), client_id, client_secret);
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

    /// The revocation request (RFC 7009; TikTok's `/v2/oauth/revoke/`): a POST form of the
    /// client credentials and `token` to `revoke_url`, or None without one. Holds secrets.
    pub fn revoke_request(
        &self,
        client_id: &str,
        client_secret: Option<&SecretString>,
        token: &SecretString,
    ) -> Option<TokenRequest> {
        let url = self.revoke_url.as_deref()?;
        let mut req = TokenRequest::new(Method::Post, url, ParamsIn::Form);
        self.client_auth(&mut req, self.form_auth(), client_id, client_secret);
        req.params
            .push(("token".into(), token.expose_secret().to_string()));
        req.headers = self.headers.clone();
        Some(req)
    }

    /// How a POST form to the provider (code exchange, revocation) authenticates the client:
    /// in the body unless the profile uses HTTP Basic.
    fn form_auth(&self) -> ClientAuth {
        match self.client_auth {
            a @ (ClientAuth::Basic | ClientAuth::BasicRaw) => a,
            _ => ClientAuth::Body,
        }
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

    fn cred() -> SecretString {
        SecretString::from("CRED-SECRET")
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
    fn tiktok_app_token_posts_the_client_credentials_grant_to_the_token_url() {
        let p = Profile::built_in("tiktok").unwrap();
        let cs = SecretString::from("cs");
        let r = p.renew_request("ck", Some(&cs), Presented::ClientCredentials { scope: "" });
        assert_eq!(r.method, Method::Post);
        assert_eq!(r.url, "https://open.tiktokapis.com/v2/oauth/token/");
        assert_eq!(r.params_in, ParamsIn::Form);
        assert_eq!(
            r.param_names(),
            ["client_key", "client_secret", "grant_type"]
        );
        assert_eq!(r.param("grant_type"), Some("client_credentials"));
        // A standard provider: its client auth (Basic for X), and the scope asked for.
        let x = Profile::built_in("x").unwrap();
        let scoped = Presented::ClientCredentials {
            scope: "tweet.read",
        };
        let r = x.renew_request("cid", Some(&cs), scoped);
        assert!(r.basic.is_some());
        assert_eq!(r.param("scope"), Some("tweet.read"));
        assert_eq!(r.param("grant_type"), Some("client_credentials"));
    }

    #[test]
    fn tiktok_revocation_posts_the_client_and_the_token_to_revoke_url() {
        let p = Profile::built_in("tiktok").unwrap();
        let r = p
            .revoke_request("ck", Some(&SecretString::from("cs")), &cred())
            .unwrap();
        assert_eq!(r.method, Method::Post);
        assert_eq!(r.url, "https://open.tiktokapis.com/v2/oauth/revoke/");
        assert_eq!(r.params_in, ParamsIn::Form);
        assert_eq!(r.param_names(), ["client_key", "client_secret", "token"]);
        assert_eq!(r.param("token"), Some("CRED-SECRET"));
        let none = Profile::built_in("instagram").unwrap();
        assert!(none.revoke_url.is_none());
        assert!(none.revoke_request("ck", None, &cred()).is_none());
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
