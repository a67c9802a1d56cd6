//! Providers: one per `[providers.NAME]` table. A provider builds the refresh request of its
//! profile, sends it under its own rate limit with a timeout and a response-size cap, and
//! classifies the answer into tokens or a failure class (see DESIGN.md "Outcomes").

pub mod tiktok;

use crate::config::{Config, ProviderConfig};
use crate::model::{ReauthReason, TokenSet};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use secrecy::SecretString;
use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

/// How a failed refresh is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureClass {
    /// For good: flag the account (after checking its generation did not move).
    Rejected(ReauthReason),
    /// Our client credentials or request are wrong: log loudly, leave accounts, retry slowly.
    Config,
    /// 429, 5xx, timeouts, broken answers: back off and retry; never flags.
    Transient,
}

impl FailureClass {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::Rejected(_) => "rejected",
            FailureClass::Config => "config_error",
            FailureClass::Transient => "transient",
        }
    }
}

/// A refresh that did not produce tokens. `message` never contains a secret.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct ProviderFailure {
    pub class: FailureClass,
    pub message: String,
    pub http_status: Option<u16>,
    pub retry_after: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("provider {provider}: cannot build HTTP client: {source}")]
    Client {
        provider: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("provider {provider}: client_secret is not set")]
    NoSecret { provider: String },
}

/// One configured provider, ready to refresh.
pub struct Provider {
    pub name: String,
    pub kind: String,
    client_key: String,
    client_secret: SecretString,
    token_url: String,
    http: reqwest::Client,
    limiter: DefaultDirectRateLimiter,
    max_body: usize,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("token_url", &self.token_url)
            .finish_non_exhaustive()
    }
}

/// The HTTP client every token request uses: rustls, no redirects, timeouts from config.
pub fn http_client(config: &Config) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .user_agent(concat!("refreshd/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::none())
        .timeout(config.refresh.request_timeout)
        .connect_timeout(config.refresh.connect_timeout)
        // A read timeout above the total one would never fire.
        .read_timeout(
            config
                .refresh
                .read_timeout
                .min(config.refresh.request_timeout),
        )
        .pool_max_idle_per_host(config.refresh.concurrency)
        .build()
}

impl Provider {
    pub fn new(
        name: &str,
        p: &ProviderConfig,
        config: &Config,
        http: reqwest::Client,
    ) -> Result<Provider, ProviderError> {
        let burst = NonZeroU32::new(p.burst).unwrap_or(NonZeroU32::MIN);
        let per_minute = NonZeroU32::new(p.rate_limit).unwrap_or(NonZeroU32::MIN);
        Ok(Provider {
            name: name.to_string(),
            kind: p.kind(name).to_string(),
            client_key: p.client_key.clone(),
            client_secret: p
                .client_secret
                .clone()
                .ok_or_else(|| ProviderError::NoSecret {
                    provider: name.to_string(),
                })?,
            token_url: Config::token_url(name, p),
            http,
            limiter: RateLimiter::direct(Quota::per_minute(per_minute).allow_burst(burst)),
            max_body: config.refresh.max_response_bytes,
        })
    }

    pub fn token_url(&self) -> &str {
        &self.token_url
    }

    /// Waits for this provider's rate limit.
    pub async fn ready(&self) {
        self.limiter.until_ready().await;
    }

    /// Exchanges a refresh token for new tokens. Returns the tokens and the HTTP status.
    pub async fn refresh(
        &self,
        refresh_token: &SecretString,
    ) -> Result<(TokenSet, u16), ProviderFailure> {
        let form = tiktok::refresh_form(&self.client_key, &self.client_secret, refresh_token);
        self.post_token(&form).await
    }

    /// Exchanges an authorization code for tokens (grant_type=authorization_code). The
    /// answer must name the user (`open_id`). Returns the tokens and the HTTP status.
    pub async fn exchange_code(
        &self,
        code: &SecretString,
        redirect_uri: &str,
        code_verifier: Option<&SecretString>,
    ) -> Result<(TokenSet, u16), ProviderFailure> {
        let form = tiktok::code_form(
            &self.client_key,
            &self.client_secret,
            code,
            redirect_uri,
            code_verifier,
        );
        let (tokens, status) = self.post_token(&form).await?;
        if tokens.subject.is_none() {
            return Err(ProviderFailure {
                class: FailureClass::Config,
                message: format!(
                    "the code exchange answer of provider {} has no `open_id`: cannot tell which account was connected [HTTP {status}]",
                    self.name
                ),
                http_status: Some(status),
                retry_after: None,
            });
        }
        Ok((tokens, status))
    }

    /// POSTs a token request form and parses the answer, with the body-size cap.
    async fn post_token(
        &self,
        form: &[(&'static str, String)],
    ) -> Result<(TokenSet, u16), ProviderFailure> {
        let transient = |message: String| ProviderFailure {
            class: FailureClass::Transient,
            message,
            http_status: None,
            retry_after: None,
        };
        let mut resp = self
            .http
            .post(&self.token_url)
            .header(reqwest::header::ACCEPT, "application/json")
            .form(form)
            .send()
            .await
            .map_err(|e| transient(describe_reqwest(&e)))?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.chars().take(60).collect::<String>());
        let mut body = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > self.max_body {
                        return Err(ProviderFailure {
                            http_status: Some(status),
                            ..transient(format!(
                                "response body larger than refresh.max_response_bytes ({} bytes); cut off",
                                self.max_body
                            ))
                        });
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => {
                    return Err(ProviderFailure {
                        http_status: Some(status),
                        ..transient(format!(
                            "reading the response body failed: {}",
                            describe_reqwest(&e)
                        ))
                    });
                }
            }
        }
        tiktok::parse_response(status, retry_after, content_type.as_deref(), &body)
            .map(|t| (t, status))
    }
}

/// A reqwest error as a sentence, without the URL's query (none here) or any body.
fn describe_reqwest(e: &reqwest::Error) -> String {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_body() || e.is_decode() {
        "broken response body"
    } else if e.is_request() {
        "request failed"
    } else {
        "HTTP error"
    };
    let mut msg = what.to_string();
    let mut src = std::error::Error::source(e);
    if let Some(s) = src.take() {
        msg.push_str(&format!(": {s}"));
        if let Some(inner) = s.source() {
            msg.push_str(&format!(": {inner}"));
        }
    }
    msg
}

/// `Retry-After`: delta-seconds or an HTTP-date.
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs.min(86_400)));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO)
            .min(Duration::from_secs(86_400)),
    )
}

/// Every configured, enabled provider by name.
#[derive(Debug, Default)]
pub struct Providers(BTreeMap<String, Arc<Provider>>);

impl Providers {
    pub fn from_config(config: &Config) -> Result<Providers, ProviderError> {
        let http = http_client(config).map_err(|source| ProviderError::Client {
            provider: "(all)".into(),
            source,
        })?;
        let mut map = BTreeMap::new();
        for (name, p) in config.providers.iter().filter(|(_, p)| p.enabled) {
            map.insert(
                name.clone(),
                Arc::new(Provider::new(name, p, config, http.clone())?),
            );
        }
        Ok(Providers(map))
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Provider>> {
        self.0.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_seconds_and_date() {
        assert_eq!(parse_retry_after("120"), Some(Duration::from_secs(120)));
        let future = std::time::SystemTime::now() + Duration::from_secs(90);
        let d = parse_retry_after(&httpdate::fmt_http_date(future)).unwrap();
        assert!(
            d <= Duration::from_secs(90) && d >= Duration::from_secs(85),
            "{d:?}"
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}
