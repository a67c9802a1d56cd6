//! Connecting accounts: the authorization URL (state, PKCE), the code exchange, and storing
//! the result as an account. The one-shot loopback callback of `refreshd connect` is in
//! `loopback.rs`, the page a browser sees at the end in `page.rs`.
//!
//! Nothing here prints or logs a token, a code, a state or a PKCE verifier.

use crate::config::{Config, ProviderConfig};
use crate::events::Event;
use crate::model::{Status, TokenSet};
use crate::policy;
use crate::provider::profile::{ClientAuth, Profile};
use crate::provider::{FailureClass, Provider, ProviderFailure};
use crate::store::{NewAccount, Store, StoreError};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use secrecy::SecretString;
use sha2::{Digest, Sha256};
use std::time::Duration;
use subtle::ConstantTimeEq;

mod loopback;
pub mod page;

pub use loopback::{
    CallbackListener, CallbackReply, CallbackResult, loopback_redirect, parse_callback,
};

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(
        "provider {provider:?} is not configured or is disabled: add an enabled [providers.{provider}] table to the config"
    )]
    UnknownProvider { provider: String },
    #[error(
        "providers.{provider}.redirect_uri is not set: set it to the redirect URI registered for your app, e.g. \"http://127.0.0.1:8788/callback\""
    )]
    NoRedirectUri { provider: String },
    #[error(
        "providers.{provider}.redirect_uri {uri:?} is not on loopback: `refreshd connect` can only listen on this machine (127.0.0.1, [::1] or localhost). Register a loopback redirect URI, let the daemon serve the callback ([connect] enabled = true, redirect_uri = \"https://<your host>/connect/{provider}/callback\"), or use `refreshd authorize-url` and `refreshd exchange`"
    )]
    NotLoopback { provider: String, uri: String },
    #[error("{what}: {message}")]
    Invalid { what: &'static str, message: String },
    #[error(
        "cannot listen on {addr} for the callback (is another `refreshd connect` running?): {source}"
    )]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the callback connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "no authorization arrived within {}: open the printed URL in a browser and approve, or pass a longer --timeout",
        humantime::format_duration(*.0)
    )]
    Timeout(Duration),
    #[error(
        "the callback's state does not match the one sent: the answer belongs to another request (or was forged); start over with a fresh authorization URL"
    )]
    StateMismatch,
    #[error("the provider refused the authorization: {error}{}", .description.as_ref().map(|d| format!(": {d}")).unwrap_or_default())]
    Denied {
        error: String,
        description: Option<String>,
    },
    #[error(
        "provider {provider} issued no refresh token, so refreshd cannot keep this account alive: an OpenID Connect server issues one only for the `offline_access` scope with prompt=consent (refreshd adds prompt=consent when offline_access is asked for and no prompt is configured); other providers have their own switch, e.g. Google's access_type=offline. See docs/src/providers/oidc.md"
    )]
    NoRefreshToken { provider: String },
    #[error("the callback carries no `code`: nothing to exchange")]
    NoCode,
    #[error("the code exchange with provider {provider} failed: {failure}; {hint}")]
    Exchange {
        provider: String,
        #[source]
        failure: ProviderFailure,
        hint: String,
    },
    #[error(
        "account {id} is {have_provider}/{have_subject}, but the login was {provider}/{subject}: nothing was written. Log in as the account's user, or leave out --account to add a new account"
    )]
    AccountMismatch {
        id: i64,
        have_provider: String,
        have_subject: String,
        provider: String,
        subject: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Provider(#[from] crate::provider::ProviderError),
}

/// An unguessable `state`: 256 random bits, URL-safe base64 without padding.
pub fn new_state() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Most characters a label keeps: it is a name for people, shown by the CLI and sent in
/// webhooks, and anyone who can reach `start` can set it.
pub const MAX_LABEL_CHARS: usize = 200;

/// A label as stored: control characters (and the bidirectional overrides that reorder a
/// terminal line) removed, surrounding blanks trimmed, at most [`MAX_LABEL_CHARS`]
/// characters; None when nothing is left.
pub fn clean_label(raw: &str) -> Option<String> {
    let kept: String = raw
        .chars()
        .filter(|c| {
            !c.is_control() && !matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        })
        .collect();
    let label: String = kept.trim().chars().take(MAX_LABEL_CHARS).collect();
    let label = label.trim_end();
    (!label.is_empty()).then(|| label.to_string())
}

/// Compares two states in constant time (for equal lengths).
pub fn state_matches(expected: &str, got: &str) -> bool {
    expected.as_bytes().ct_eq(got.as_bytes()).into()
}

/// A PKCE (RFC 7636) verifier and its S256 challenge.
pub struct Pkce {
    pub verifier: SecretString,
    pub challenge: String,
}

impl Pkce {
    /// 256 random bits as the verifier (43 URL-safe characters).
    pub fn new() -> Pkce {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        let verifier = URL_SAFE_NO_PAD.encode(bytes);
        Pkce {
            challenge: s256_challenge(&verifier),
            verifier: SecretString::from(verifier),
        }
    }
}

impl Default for Pkce {
    fn default() -> Self {
        Self::new()
    }
}

/// `BASE64URL(SHA256(verifier))`, no padding.
pub fn s256_challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// Splits `a,b c` into scope names.
pub fn parse_scopes(s: &str) -> Vec<String> {
    s.split([',', ' '])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Requested scopes the grant does not include.
pub fn missing_scopes(requested: &[String], granted: &str) -> Vec<String> {
    let granted = parse_scopes(granted);
    requested
        .iter()
        .filter(|r| !granted.contains(r))
        .cloned()
        .collect()
}

/// The configured redirect URI of a provider, exactly as written.
pub fn redirect_uri<'a>(name: &str, p: &'a ProviderConfig) -> Result<&'a str, ConnectError> {
    p.redirect_uri
        .as_deref()
        .ok_or_else(|| ConnectError::NoRedirectUri {
            provider: name.to_string(),
        })
}

/// The provider's authorization URL: the profile's client id parameter (`client_key` for
/// TikTok, `client_id` elsewhere), `response_type=code`, `scope` joined by the profile's
/// separator, `redirect_uri`, `state`, the profile's static parameters, and the PKCE
/// challenge when given.
pub fn authorize_url(
    name: &str,
    p: &ProviderConfig,
    scopes: &[String],
    state: &str,
    pkce_challenge: Option<&str>,
) -> Result<url::Url, ConnectError> {
    let redirect = redirect_uri(name, p)?;
    let profile = p.profile(name).map_err(|message| ConnectError::Invalid {
        what: "provider profile",
        message,
    })?;
    let base = profile
        .authorize_url
        .clone()
        .ok_or_else(|| ConnectError::Invalid {
            what: "authorize_url",
            message: format!("providers.{name}.authorize_url is not set: connecting needs the provider's authorization page"),
        })?;
    let mut url =
        crate::config::check_endpoint_url(&base).map_err(|message| ConnectError::Invalid {
            what: "authorize_url",
            message,
        })?;
    {
        let mut q = url.query_pairs_mut();
        q.append_pair(&profile.client_id_param, &p.client_key)
            .append_pair("response_type", "code")
            .append_pair("scope", &scopes.join(&profile.scope_separator))
            .append_pair("redirect_uri", redirect)
            .append_pair("state", state);
        for (k, v) in &profile.authorize_params {
            q.append_pair(k, v);
        }
        // OpenID Connect Core 11: offline_access needs prompt=consent, or the server may
        // issue no refresh token; a configured prompt is left alone.
        if scopes.iter().any(|s| s == "offline_access")
            && !profile.authorize_params.iter().any(|(k, _)| k == "prompt")
        {
            q.append_pair("prompt", "consent");
        }
        if let Some(c) = pkce_challenge {
            q.append_pair("code_challenge", c)
                .append_pair("code_challenge_method", "S256");
        }
    }
    Ok(url)
}

/// What a connection produced; holds no secret.
#[derive(Clone, Debug)]
pub struct Connected {
    pub account_id: i64,
    /// True when a new account was created, false when an existing one was updated.
    pub created: bool,
    pub provider: String,
    /// The subject, exactly as stored (the name predates other providers than TikTok).
    pub open_id: String,
    /// The profile's word for it (`open_id`, `sub`, ...), for output.
    pub subject_name: String,
    pub scope: String,
    pub access_expires_at: i64,
    pub refresh_expires_at: Option<i64>,
    pub status: Status,
    /// The account's status before this connection (None: it is new).
    pub previous_status: Option<Status>,
}

impl Connected {
    /// A flagged account that this connection made healthy is a recovery: logs
    /// `account_recovered` and returns the event for the webhook; None otherwise.
    pub fn announce_recovery(&self) -> Option<Event> {
        let flagged_before = self.previous_status.is_some_and(Status::needs_human);
        if !flagged_before || self.status.needs_human() {
            return None;
        }
        crate::telemetry::account_recovered(
            self.account_id,
            &self.provider,
            &self.open_id,
            0,
            None,
        );
        Some(Event::Recovered {
            account_id: self.account_id,
            provider: self.provider.clone(),
            subject: self.open_id.clone(),
        })
    }
}

/// Builds the account row for a code-exchange answer obtained at `now`.
pub fn new_account(
    provider: &str,
    tokens: TokenSet,
    label: Option<String>,
    now: i64,
    config: &Config,
) -> Result<NewAccount, ConnectError> {
    let profile = config.providers.get(provider).map(|p| p.profile(provider));
    let subject_name = match &profile {
        Some(Ok(prof)) => prof.subject_name().to_string(),
        _ => "subject".to_string(),
    };
    let subject = tokens
        .subject
        .clone()
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| ConnectError::Invalid {
            what: "code exchange answer",
            message: format!(
                "`{subject_name}` is missing: cannot tell which account was connected"
            ),
        })?;
    // Stored exactly as given; an unusable one is refused, never altered.
    crate::subject::check(&subject).map_err(|why| ConnectError::Invalid {
        what: "code exchange answer",
        message: format!("the user id the provider gave cannot be stored: {why}"),
    })?;
    let refreshes_itself =
        config.credential_of(provider) == Some(crate::provider::profile::Credential::AccessToken);
    if tokens.refresh_token.is_none() && !refreshes_itself {
        return Err(ConnectError::NoRefreshToken {
            provider: provider.to_string(),
        });
    }
    let schedule = policy::schedule(
        &policy::Fresh {
            obtained_at: now,
            access: policy::Access::Issued {
                expires_in: tokens.expires_in,
            },
            refresh_expires_in: tokens.refresh_expires_in,
            origin: policy::Origin::FirstGrant,
            keep_alive: config.keep_alive_of(provider),
        },
        &config.refresh.timing(),
        config.reauth.window,
        now,
        &mut rand::rng(),
    );
    if let Some(life) = tokens.refresh_expires_in
        && life <= config.reauth.window.as_secs() as i64
    {
        tracing::warn!(
            event = "reauth_window_swallows_lifetime",
            provider,
            refresh_lifetime_s = life,
            "the refresh token lives no longer than reauth.window: the account is flagged expiring at once; set reauth.window to at most half the lifetime"
        );
    }
    Ok(NewAccount {
        provider: provider.to_string(),
        subject,
        label: label.as_deref().and_then(clean_label),
        tokens,
        obtained_at: now,
        next_refresh_at: schedule.next_refresh_at,
        status: schedule.status,
        reauth_reason: schedule.reauth_reason,
    })
}

/// Stores a connection. With `account`, the existing account must be the same provider and
/// subject, else nothing is written.
pub async fn store_account(
    store: &Store,
    account: NewAccount,
    expect_id: Option<i64>,
    now: i64,
    subject_name: &str,
) -> Result<Connected, ConnectError> {
    // The check and the write share one transaction: nothing can slip in between.
    let (ids, previous_status) = store
        .store_connected(account.clone(), expect_id, now)
        .await?
        .map_err(
            |(id, have_provider, have_subject)| ConnectError::AccountMismatch {
                id,
                have_provider,
                have_subject,
                provider: account.provider.clone(),
                subject: account.subject.clone(),
            },
        )?;
    let (account_id, created) = ids.first().copied().ok_or(ConnectError::Invalid {
        what: "store",
        message: "the upsert returned no account id".into(),
    })?;
    Ok(Connected {
        account_id,
        created,
        provider: account.provider,
        open_id: account.subject,
        subject_name: subject_name.to_string(),
        scope: account.tokens.scope.clone().unwrap_or_default(),
        access_expires_at: now + account.tokens.expires_in,
        refresh_expires_at: account.tokens.refresh_expires_in.map(|s| now + s),
        status: account.status,
        previous_status,
    })
}

/// What to exchange and how to store it.
pub struct Exchange<'a> {
    pub provider: &'a str,
    pub code: SecretString,
    pub code_verifier: Option<SecretString>,
    pub label: Option<String>,
    pub account: Option<i64>,
}

/// Exchanges a code with the configured provider and stores the account.
pub async fn exchange_and_store(
    config: &Config,
    store: &Store,
    req: Exchange<'_>,
    now: impl Fn() -> i64,
) -> Result<Connected, ConnectError> {
    let p = enabled_provider(config, req.provider)?;
    let redirect = redirect_uri(req.provider, p)?;
    let http = crate::provider::http_client(config).map_err(|source| {
        crate::provider::ProviderError::Client {
            provider: req.provider.to_string(),
            source,
        }
    })?;
    let provider = Provider::new(req.provider, p, config, http)?;
    provider.ready().await;
    let (tokens, _status) = provider
        .exchange_code(&req.code, redirect, req.code_verifier.as_ref(), now())
        .await
        .map_err(|failure| ConnectError::Exchange {
            provider: req.provider.to_string(),
            hint: exchange_hint(provider.profile(), failure.class),
            failure,
        })?;
    let at = now();
    let account = new_account(req.provider, tokens, req.label, at, config)?;
    let subject_name = provider.profile().subject_name();
    store_account(store, account, req.account, at, subject_name).await
}

/// What to do after a failed code exchange, in the profile's own words.
fn exchange_hint(profile: &Profile, class: FailureClass) -> String {
    match class {
        FailureClass::Rejected(_) => {
            "authorization codes are single use, short-lived and bound to the redirect_uri (and PKCE verifier) of their request: start over with a fresh authorization".into()
        }
        FailureClass::Config => format!(
            "check the client id ({}), the client secret ({}{}), redirect_uri (exactly as registered) and the scopes of the app at the provider",
            profile.client_id_param,
            profile.client_secret_param,
            match profile.client_auth {
                ClientAuth::Basic => ", sent form-encoded in HTTP Basic; client_auth = \"basic_raw\" sends it as is",
                ClientAuth::BasicRaw => ", sent as is in HTTP Basic",
                _ => "",
            }
        ),
        FailureClass::Unexpected => {
            "the token endpoint answered with a redirect or an error without an OAuth body: check token_url".into()
        }
        FailureClass::Transient => {
            "the provider or the network failed for now: start over with a fresh authorization in a moment".into()
        }
    }
}

/// One authorization attempt: the scopes asked for, a fresh `state`, PKCE when the profile
/// wants it, and the URL to send the user to.
pub struct Authorization {
    pub scopes: Vec<String>,
    pub state: String,
    pub pkce: Option<Pkce>,
    pub url: url::Url,
}

/// Prepares an authorization for `name`, with `scopes` (comma-separated) or the
/// provider's configured ones.
pub fn prepare_authorization(
    name: &str,
    p: &ProviderConfig,
    scopes: Option<&str>,
) -> Result<Authorization, ConnectError> {
    let scopes = scopes.map(parse_scopes).unwrap_or_else(|| p.scopes.clone());
    let state = new_state();
    let pkce = p
        .profile(name)
        .map(|prof| prof.pkce)
        .unwrap_or(false)
        .then(Pkce::new);
    let url = authorize_url(
        name,
        p,
        &scopes,
        &state,
        pkce.as_ref().map(|k| k.challenge.as_str()),
    )?;
    Ok(Authorization {
        scopes,
        state,
        pkce,
        url,
    })
}

/// The web connect start URL that re-authorizes `account`, when the daemon serves web
/// connect and the provider's redirect URI is its callback (`.../connect/{provider}/callback`).
pub fn web_reconnect_url(config: &Config, provider: &str, account: i64) -> Option<String> {
    if !config.connect.enabled {
        return None;
    }
    let redirect = config.providers.get(provider)?.redirect_uri.as_deref()?;
    let base = redirect.strip_suffix(&format!("/connect/{provider}/callback"))?;
    Some(format!("{base}/connect/{provider}/start?account={account}"))
}

/// The enabled provider config named `name`.
pub fn enabled_provider<'a>(
    config: &'a Config,
    name: &str,
) -> Result<&'a ProviderConfig, ConnectError> {
    config
        .providers
        .get(name)
        .filter(|p| p.enabled)
        .ok_or_else(|| ConnectError::UnknownProvider {
            provider: name.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    /// A config with a `tiktok` provider and `extra` keys in its table.
    pub(super) fn provider(extra: &str) -> Config {
        Config::from_toml_str(&format!(
            "[providers.tiktok]\nclient_key = \"ck\"\nclient_secret = \"cs\"\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn labels_lose_control_characters_and_are_capped() {
        assert_eq!(clean_label("  Shop main "), Some("Shop main".into()));
        assert_eq!(
            clean_label("a\u{0}b\r\nc\u{1b}[31md\u{7f}\u{85}e\u{202e}f"),
            Some("abc[31mdef".into())
        );
        assert_eq!(clean_label("\t\n "), None);
        assert_eq!(clean_label(""), None);
        let long = "é".repeat(60_000);
        assert_eq!(clean_label(&long).unwrap().chars().count(), MAX_LABEL_CHARS);
        // HTML is text here: pages escape it, nothing else interprets it.
        assert_eq!(clean_label("<b>x</b>"), Some("<b>x</b>".into()));
    }

    #[test]
    fn state_is_256_bits_urlsafe_and_compared_exactly() {
        let a = new_state();
        assert_eq!(a.len(), 43);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
        assert_ne!(a, new_state());
        assert!(state_matches(&a, &a.clone()));
        assert!(!state_matches(&a, &a[..42]));
        assert!(!state_matches(&a, ""));
    }

    #[test]
    fn web_reconnect_url_only_when_the_daemon_serves_the_callback() {
        let web = "redirect_uri = \"https://app.example/connect/tiktok/callback\"\n[server]\nlisten = \"127.0.0.1:0\"\n[connect]\nenabled = true\n";
        assert_eq!(
            web_reconnect_url(&provider(web), "tiktok", 7).as_deref(),
            Some("https://app.example/connect/tiktok/start?account=7")
        );
        let off = web.replace("enabled = true", "enabled = false");
        assert_eq!(web_reconnect_url(&provider(&off), "tiktok", 7), None);
        let own = "redirect_uri = \"https://app.example/oauth/cb\"\n[server]\nlisten = \"127.0.0.1:0\"\n[connect]\nenabled = true\n";
        assert_eq!(web_reconnect_url(&provider(own), "tiktok", 7), None);
        assert_eq!(web_reconnect_url(&provider(web), "google", 7), None);
    }

    #[test]
    fn pkce_s256_matches_rfc7636_example() {
        assert_eq!(
            s256_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
        let p = Pkce::new();
        assert_eq!(p.verifier.expose_secret().len(), 43);
        assert_eq!(p.challenge, s256_challenge(p.verifier.expose_secret()));
    }

    #[test]
    fn authorize_url_has_tiktok_params() {
        let c = provider("redirect_uri = \"http://127.0.0.1:8788/callback\"\n");
        let p = &c.providers["tiktok"];
        let scopes = vec!["user.info.basic".to_string(), "video.list".to_string()];
        let u = authorize_url("tiktok", p, &scopes, "st", None).unwrap();
        assert!(
            u.as_str()
                .starts_with("https://www.tiktok.com/v2/auth/authorize/?")
        );
        let q: Vec<(String, String)> = u.query_pairs().into_owned().collect();
        let get = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("client_key"), Some("ck"));
        assert_eq!(get("response_type"), Some("code"));
        assert_eq!(get("scope"), Some("user.info.basic,video.list"));
        assert_eq!(get("redirect_uri"), Some("http://127.0.0.1:8788/callback"));
        assert_eq!(get("state"), Some("st"));
        assert_eq!(get("code_challenge"), None);
        let u = authorize_url("tiktok", p, &scopes, "st", Some("chal")).unwrap();
        let q: Vec<(String, String)> = u.query_pairs().into_owned().collect();
        assert!(q.contains(&("code_challenge".into(), "chal".into())));
        assert!(q.contains(&("code_challenge_method".into(), "S256".into())));
    }

    #[test]
    fn authorize_url_follows_the_profile() {
        let c = Config::from_toml_str(
            "[providers.yt]\nkind = \"google\"\nclient_id = \"gid\"\nclient_secret = \"cs\"\nredirect_uri = \"http://127.0.0.1:8788/callback\"\n",
        )
        .unwrap();
        let scopes = vec!["openid".to_string(), "email".to_string()];
        let u = authorize_url("yt", &c.providers["yt"], &scopes, "st", None).unwrap();
        assert!(
            u.as_str()
                .starts_with("https://accounts.google.com/o/oauth2/v2/auth?")
        );
        let q: std::collections::HashMap<_, _> = u.query_pairs().into_owned().collect();
        assert_eq!(q["client_id"], "gid");
        assert!(!q.contains_key("client_key"));
        assert_eq!(q["scope"], "openid email");
        assert_eq!(q["access_type"], "offline");
        assert_eq!(q["prompt"], "consent");
        // X requires PKCE: on by default in its profile.
        let c = Config::from_toml_str(
            "[providers.x]\nclient_id = \"xid\"\nclient_secret = \"cs\"\nredirect_uri = \"http://127.0.0.1:8788/callback\"\n",
        )
        .unwrap();
        let a = prepare_authorization("x", &c.providers["x"], Some("tweet.read")).unwrap();
        assert!(a.pkce.is_some());
        assert!(
            a.url
                .as_str()
                .starts_with("https://x.com/i/oauth2/authorize?")
        );
    }

    #[test]
    fn offline_access_asks_for_consent_unless_a_prompt_is_configured() {
        let toml = |extra: &str| {
            Config::from_toml_str(&format!(
                "[providers.own]\nkind = \"generic\"\nclient_id = \"id\"\nclient_secret = \"s\"\ntoken_url = \"https://auth.example/token\"\nauthorize_url = \"https://auth.example/auth\"\nredirect_uri = \"http://127.0.0.1:8788/callback\"\n{extra}"
            ))
            .unwrap()
        };
        let prompts = |c: &Config, scopes: &[&str]| {
            let scopes: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
            authorize_url("own", &c.providers["own"], &scopes, "st", None)
                .unwrap()
                .query_pairs()
                .filter(|(k, _)| k == "prompt")
                .map(|(_, v)| v.into_owned())
                .collect::<Vec<_>>()
        };
        let c = toml("");
        assert_eq!(prompts(&c, &["openid", "offline_access"]), ["consent"]);
        assert!(prompts(&c, &["openid"]).is_empty());
        let c = toml("authorize_params = { prompt = \"login consent\" }\n");
        assert_eq!(
            prompts(&c, &["openid", "offline_access"]),
            ["login consent"]
        );
    }

    #[test]
    fn no_refresh_token_at_connect_says_what_to_ask_for() {
        let c = provider("");
        let tokens = TokenSet {
            access_token: SecretString::from("a"),
            refresh_token: None,
            expires_in: 60,
            refresh_expires_in: None,
            subject: Some("u1".into()),
            scope: None,
            token_type: "Bearer".into(),
        };
        let e = new_account("tiktok", tokens, None, 1000, &c).unwrap_err();
        assert!(matches!(e, ConnectError::NoRefreshToken { .. }), "{e}");
        let e = e.to_string();
        assert!(
            e.contains("offline_access") && e.contains("prompt=consent"),
            "{e}"
        );
    }

    #[test]
    fn authorize_url_needs_redirect_uri() {
        let c = provider("");
        let e = authorize_url("tiktok", &c.providers["tiktok"], &[], "s", None).unwrap_err();
        assert!(e.to_string().contains("redirect_uri is not set"), "{e}");
    }

    #[test]
    fn config_validates_new_keys() {
        for (extra, key) in [
            ("redirect_uri = \"/callback\"", "redirect_uri"),
            (
                "authorize_url = \"http://example.com/auth\"",
                "authorize_url",
            ),
            ("scopes = [\"a,b\"]", "scopes"),
        ] {
            let e = Config::from_toml_str(&format!(
                "[providers.tiktok]\nclient_key = \"ck\"\nclient_secret = \"cs\"\n{extra}"
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains(key), "{extra}: {e}");
        }
        let c = provider("authorize_url = \"http://127.0.0.1:9/a\"\nscopes = [\"x\"]\npkce = true");
        assert_eq!(c.providers["tiktok"].pkce, Some(true));
    }

    #[test]
    fn missing_scopes_named() {
        let req = parse_scopes("user.info.basic, video.list");
        assert_eq!(
            missing_scopes(&req, "user.info.basic"),
            vec!["video.list".to_string()]
        );
        assert!(missing_scopes(&req, "video.list,user.info.basic").is_empty());
    }

    #[test]
    fn new_account_from_tokens() {
        let c = provider("");
        let tokens = TokenSet {
            access_token: SecretString::from("a"),
            refresh_token: Some(SecretString::from("r")),
            expires_in: 7200,
            refresh_expires_in: Some(180 * 86_400),
            subject: Some("u1".into()),
            scope: Some("user.info.basic".into()),
            token_type: "Bearer".into(),
        };
        let a = new_account("tiktok", tokens.clone(), Some("me".into()), 1000, &c).unwrap();
        assert_eq!(a.subject, "u1");
        assert_eq!(a.status, Status::Active);
        assert!(a.next_refresh_at <= 1000 + 7200 && a.next_refresh_at > 1000);
        let mut no_id = tokens;
        no_id.subject = None;
        assert!(new_account("tiktok", no_id, None, 1000, &c).is_err());
    }

    #[test]
    fn messages_use_the_profile_words() {
        let c = Config::from_toml_str(
            "[providers.own]\nkind = \"generic\"\nclient_id = \"id\"\nclient_secret = \"s\"\ntoken_url = \"https://auth.example/token\"\nclient_auth = \"basic\"\n",
        )
        .unwrap();
        let prof = c.providers["own"].profile("own").unwrap();
        let hint = exchange_hint(&prof, FailureClass::Config);
        assert!(hint.contains("client id (client_id)"), "{hint}");
        assert!(hint.contains("basic_raw"), "{hint}");
        assert!(!hint.contains("client_key"), "{hint}");
        let tokens = TokenSet {
            access_token: SecretString::from("a"),
            refresh_token: Some(SecretString::from("r")),
            expires_in: 60,
            refresh_expires_in: None,
            subject: None,
            scope: None,
            token_type: "Bearer".into(),
        };
        let e = new_account("own", tokens, None, 1000, &c)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`sub` is missing"), "{e}");
        let tiktok = Profile::built_in("tiktok").unwrap();
        assert_eq!(tiktok.subject_name(), "open_id");
        assert!(exchange_hint(&tiktok, FailureClass::Config).contains("(client_key)"));
    }
}
