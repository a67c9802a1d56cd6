//! Providers: the HTTP client of token endpoints, one `Provider` per `[providers.NAME]`
//! table. A provider builds the request of its profile, sends it under its own rate limit
//! and slots (requests in flight; accounts claimed ahead wait for one) with a timeout and a
//! response-size cap, and reads the answer into tokens or a failure (see
//! docs/src/failures.md).
//!
//! The pure parts beside it: `profile.rs` (the profile type: requests, error classes),
//! `builtin.rs` (the built-in profiles as data), `response.rs` (answers -> tokens or a
//! failure), `failure.rs` (failure classes), `tiktok.rs` (the reference case), `advice.rs`
//! (what `check` says about refresh-token lifetimes).

pub mod advice;
pub mod builtin;
mod failure;
pub mod profile;
pub mod response;
pub mod tiktok;

pub use failure::{FailureClass, ProviderFailure};
pub use response::Revocation;

use crate::config::{Config, ProviderConfig};
use crate::model::TokenSet;
use crate::permits::{Bound, Permit};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use profile::{Method, ParamsIn, Profile, TokenRequest};
use reqwest::header::HeaderValue;
use secrecy::{ExposeSecret, SecretString};
use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

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
    #[error("provider profile: {0}")]
    Profile(String),
}

/// One configured provider, ready to refresh.
pub struct Provider {
    pub name: String,
    pub kind: String,
    client_key: String,
    client_secret: Option<SecretString>,
    profile: Profile,
    /// The refresh endpoint, parsed once: a refresh only copies it.
    refresh_url: Option<url::Url>,
    http: reqwest::Client,
    /// What sizes the limiter and the semaphores below (`Providers::carry_over`).
    pace: Pace,
    limiter: Arc<DefaultDirectRateLimiter>,
    /// Requests of this provider in flight: a stalled provider can hold only these, never
    /// every global permit.
    slots: Bound,
    /// Refreshes of this provider claimed and not answered yet (`policy::claim_depth`):
    /// those in flight and those claimed ahead, waiting for a slot.
    claims: Bound,
    concurrency: usize,
    max_body: usize,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("token_url", &self.profile.token_url)
            .finish_non_exhaustive()
    }
}

/// A provider's rate limit and bounds on requests: `rate_limit` per minute, `burst`, its
/// slots (`concurrency`) and its claim depth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pace {
    per_minute: NonZeroU32,
    burst: NonZeroU32,
    concurrency: usize,
    depth: usize,
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

/// `policy::claim_depth` of a provider under `config`'s lease.
fn claim_depth(concurrency: usize, per_minute: NonZeroU32, config: &Config) -> usize {
    let margin = crate::policy::answer_margin(config.refresh.request_timeout);
    let send_window = config.store.lease.saturating_sub(margin);
    crate::policy::claim_depth(concurrency, per_minute.get(), send_window)
}

impl Provider {
    pub fn new(
        name: &str,
        p: &ProviderConfig,
        config: &Config,
        http: reqwest::Client,
    ) -> Result<Provider, ProviderError> {
        let concurrency = p.concurrency.unwrap_or(config.refresh.concurrency).max(1);
        Self::with_concurrency(name, p, config, http, concurrency)
    }

    fn with_concurrency(
        name: &str,
        p: &ProviderConfig,
        config: &Config,
        http: reqwest::Client,
        concurrency: usize,
    ) -> Result<Provider, ProviderError> {
        let burst = NonZeroU32::new(p.burst).unwrap_or(NonZeroU32::MIN);
        let per_minute = NonZeroU32::new(p.rate_limit).unwrap_or(NonZeroU32::MIN);
        let profile = p.profile(name).map_err(ProviderError::Profile)?;
        if profile.needs_secret() && p.client_secret.is_none() {
            return Err(ProviderError::NoSecret {
                provider: name.to_string(),
            });
        }
        // A URL that does not parse is reported by `request` when it is used.
        let refresh_url = url::Url::parse(profile.refresh_endpoint()).ok();
        let depth = claim_depth(concurrency, per_minute, config);
        Ok(Provider {
            name: name.to_string(),
            kind: p.kind(name).to_string(),
            client_key: p.client_key.clone(),
            client_secret: p.client_secret.clone(),
            profile,
            refresh_url,
            http,
            pace: Pace {
                per_minute,
                burst,
                concurrency,
                depth,
            },
            limiter: Arc::new(RateLimiter::direct(
                Quota::per_minute(per_minute).allow_burst(burst),
            )),
            slots: Bound::new(concurrency),
            claims: Bound::new(depth),
            concurrency,
            max_body: config.refresh.max_response_bytes,
        })
    }

    pub fn token_url(&self) -> &str {
        &self.profile.token_url
    }

    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// Waits for this provider's rate limit.
    pub async fn ready(&self) {
        self.limiter.until_ready().await;
    }

    /// Room for one more claimed refresh without waiting, if there is some.
    pub fn try_claim(&self) -> Option<Permit> {
        self.claims.try_acquire()
    }

    /// Waits for room for one more claimed refresh.
    pub async fn claim(&self) -> Permit {
        self.claims.acquire().await
    }

    /// How many more refreshes may be claimed now (`policy::claim_depth`).
    pub fn claim_room(&self) -> usize {
        self.claims.available()
    }

    /// Waits for a slot: one request in flight.
    pub async fn slot(&self) -> Permit {
        self.slots.acquire().await
    }

    /// Free slots: requests that may be sent now.
    pub fn free_slots(&self) -> usize {
        self.slots.available()
    }

    /// Whether a refresh still holds one of its slots or claims (a bound in debt after a
    /// shrink has fewer free than its size too, and is held).
    fn holds_bounds(&self) -> bool {
        self.slots.available() < self.slots.size() || self.claims.available() < self.claims.size()
    }

    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    /// Presents `credential` for new tokens: `renew` of an account's stored credential.
    pub async fn refresh(
        &self,
        credential: &SecretString,
        now: i64,
    ) -> Result<(response::Answer, u16), ProviderFailure> {
        self.renew(profile::Presented::Credential(credential), now)
            .await
    }

    /// Presents `presented` (an account's credential, or an app's client credentials) for
    /// new tokens. `now` (unix seconds) turns absolute expiry fields into lifetimes. Returns
    /// the answer (tokens, or a new refresh token alone, with the problems tolerated in it)
    /// and the HTTP status.
    pub async fn renew(
        &self,
        presented: profile::Presented<'_>,
        now: i64,
    ) -> Result<(response::Answer, u16), ProviderFailure> {
        let req =
            self.profile
                .renew_request(&self.client_key, self.client_secret.as_ref(), presented);
        let mut answer = self.send(req, now).await?;
        // An app token's answer has no refresh token to rotate: none missing.
        if let profile::Presented::ClientCredentials { .. } = presented {
            answer.0.rotation_missing = false;
        }
        Ok(answer)
    }

    /// Asks the provider to revoke `token` (its grant with it), under the rate limit.
    pub async fn revoke(&self, token: &SecretString) -> Revocation {
        let Some(req) =
            self.profile
                .revoke_request(&self.client_key, self.client_secret.as_ref(), token)
        else {
            return Revocation::Unsupported;
        };
        self.ready().await;
        let rb = match self.request(req) {
            Ok(rb) => rb,
            Err(f) => return Revocation::Unreachable(f.message),
        };
        let resp = match rb.send().await {
            Ok(r) => r,
            Err(e) => return Revocation::Unreachable(describe_reqwest(&e.without_url())),
        };
        let status = resp.status();
        let body = match resp.bytes().await {
            Ok(b) if b.len() <= self.max_body => b,
            Ok(_) => {
                return Revocation::Unreachable(
                    "the answer is larger than refresh.max_response_bytes".into(),
                );
            }
            Err(e) => return Revocation::Unreachable(describe_reqwest(&e.without_url())),
        };
        response::revocation(status.as_u16(), &body)
    }

    /// Exchanges an authorization code for tokens (grant_type=authorization_code). The
    /// answer must name the user (the profile's `subject_field`). Returns the tokens and
    /// the HTTP status.
    pub async fn exchange_code(
        &self,
        code: &SecretString,
        redirect_uri: &str,
        code_verifier: Option<&SecretString>,
        now: i64,
    ) -> Result<(TokenSet, u16), ProviderFailure> {
        let req = self.profile.code_request(
            &self.client_key,
            self.client_secret.as_ref(),
            code,
            redirect_uri,
            code_verifier,
        );
        let (mut tokens, mut status) = self.send_for_tokens(req, now).await?;
        if tokens.subject.is_none() {
            tokens.subject = self.identify(&tokens).await?;
        }
        // Meta's code exchange gives a token for an hour: trade it for a long-lived one
        // now, or the first refresh would come too late (or be refused).
        if let Some(req) = self.profile.upgrade_request(
            &self.client_key,
            self.client_secret.as_ref(),
            &tokens.access_token,
        ) {
            let (long, s) = self.send_for_tokens(req, now).await?;
            status = s;
            tokens = TokenSet {
                subject: tokens.subject,
                scope: long.scope.or(tokens.scope),
                refresh_token: long.refresh_token.or(tokens.refresh_token),
                ..long
            };
        }
        Ok((tokens, status))
    }

    /// Who was connected, when the token answer does not say (neither the profile's
    /// `subject_field` nor an `id_token`'s `sub`): the profile's userinfo endpoint.
    async fn identify(&self, tokens: &TokenSet) -> Result<Option<String>, ProviderFailure> {
        let config = |message: String| ProviderFailure {
            class: FailureClass::Config,
            message,
            http_status: None,
            retry_after: None,
            answer_lost: false,
        };
        let Some(url) = self.profile.userinfo_url.clone() else {
            return Err(config(format!(
                "provider {} ({}): the code exchange answer does not name the user (no {}, no id_token) and no userinfo_url is configured: set subject_field or userinfo_url",
                self.name,
                self.profile.kind,
                self.profile
                    .subject_field
                    .as_deref()
                    .unwrap_or("subject_field")
            )));
        };
        let mut rb = self
            .http
            .get(&url)
            .bearer_auth(tokens.access_token.expose_secret())
            .header(reqwest::header::ACCEPT, "application/json");
        for (k, v) in &self.profile.headers {
            rb = rb.header(k.as_str(), v.as_str());
        }
        let resp = rb.send().await.map_err(|e| ProviderFailure {
            class: FailureClass::Transient,
            message: format!(
                "asking {} who was connected: {}",
                self.name,
                describe_reqwest(&e.without_url())
            ),
            http_status: None,
            retry_after: None,
            answer_lost: false,
        })?;
        let status = resp.status().as_u16();
        let body = resp.bytes().await.unwrap_or_default();
        if body.len() > self.max_body || !(200..300).contains(&status) {
            return Err(ProviderFailure {
                http_status: Some(status),
                ..config(format!(
                    "the userinfo endpoint of provider {} answered HTTP {status} ({} bytes): check the scopes needed to read the user id (e.g. openid)",
                    self.name,
                    body.len()
                ))
            });
        }
        let value: serde_json::Value = serde_json::from_slice(&body).map_err(|_| {
            config(format!(
                "the userinfo answer of provider {} is not JSON",
                self.name
            ))
        })?;
        let field = &self.profile.userinfo_subject_field;
        let found = field
            .split('.')
            .try_fold(&value, |v, part| v.get(part))
            .and_then(|v| match v {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Number(n) => Some(n.to_string()),
                _ => None,
            })
            .filter(|s| !s.is_empty());
        match found {
            Some(s) => Ok(Some(s)),
            None => Err(ProviderFailure {
                http_status: Some(status),
                ..config(format!(
                    "the userinfo answer of provider {} has no `{field}`: set userinfo_subject_field",
                    self.name
                ))
            }),
        }
    }

    /// Sends a token request whose answer must carry an access token (a code exchange).
    async fn send_for_tokens(
        &self,
        req: TokenRequest,
        now: i64,
    ) -> Result<(TokenSet, u16), ProviderFailure> {
        let (answer, status) = self.send(req, now).await?;
        for problem in &answer.problems {
            tracing::warn!(event = "malformed_token_response", provider = %self.name, problem = %problem,
                "the code exchange answer has a broken field; its tokens are used with a short lifetime");
        }
        Ok((answer.into_tokens(status)?, status))
    }

    /// Sends a token request and parses the answer, with the body-size cap.
    async fn send(
        &self,
        req: TokenRequest,
        now: i64,
    ) -> Result<(response::Answer, u16), ProviderFailure> {
        let rb = self.request(req)?;
        // Only a failure to connect proves the provider never saw the request.
        let mut resp = rb.send().await.map_err(|e| ProviderFailure {
            answer_lost: !e.is_connect(),
            ..transient(describe_reqwest(&e.without_url()))
        })?;
        self.read_answer(&mut resp, now).await
    }

    /// The HTTP request of `req`: its URL, query, method, headers and client auth.
    fn request(&self, req: TokenRequest) -> Result<reqwest::RequestBuilder, ProviderFailure> {
        let mut url = match &self.refresh_url {
            Some(parsed) if req.url == self.profile.refresh_endpoint() => parsed.clone(),
            _ => url::Url::parse(&req.url).map_err(|e| ProviderFailure {
                class: FailureClass::Config,
                message: format!("token URL of provider {} is not a URL: {e}", self.name),
                http_status: None,
                retry_after: None,
                answer_lost: false,
            })?,
        };
        {
            let query_params = req.query.iter().chain(
                req.params
                    .iter()
                    .filter(|_| req.params_in == ParamsIn::Query),
            );
            let mut any = false;
            let mut q = url.query_pairs_mut();
            for (k, v) in query_params {
                q.append_pair(k, v);
                any = true;
            }
            drop(q);
            if !any && url.query() == Some("") {
                url.set_query(None);
            }
        }
        let mut rb = match req.method {
            Method::Get => self.http.get(url),
            Method::Post => self.http.post(url),
        }
        .header(
            reqwest::header::ACCEPT,
            HeaderValue::from_static("application/json"),
        );
        for (k, v) in &req.headers {
            rb = rb.header(k.as_str(), v.as_str());
        }
        if let Some((id, secret)) = &req.basic {
            rb = rb.basic_auth(id, Some(secret.expose_secret()));
        }
        if req.params_in == ParamsIn::Form {
            // The pairs go straight into the body (the bytes `RequestBuilder::form` makes
            // through serde, at a fraction of its cost per refresh); a profile's own
            // Content-Type wins, as it does there.
            let body = url::form_urlencoded::Serializer::new(String::new())
                .extend_pairs(&req.params)
                .finish();
            if !req
                .headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            {
                rb = rb.header(
                    reqwest::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/x-www-form-urlencoded"),
                );
            }
            rb = rb.body(body);
        }
        Ok(rb)
    }

    /// Reads a token endpoint's answer, with the body-size cap.
    async fn read_answer(
        &self,
        resp: &mut reqwest::Response,
        now: i64,
    ) -> Result<(response::Answer, u16), ProviderFailure> {
        let answered_ok = resp.status().is_success();
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
                            answer_lost: answered_ok,
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
                        answer_lost: answered_ok,
                        ..transient(format!(
                            "reading the response body failed: {}",
                            describe_reqwest(&e.without_url())
                        ))
                    });
                }
            }
        }
        let mut answer = response::parse_answer(
            &self.profile,
            now,
            status,
            retry_after,
            content_type.as_deref(),
            &body,
        )?;
        // What the server does not announce, the config may: policy::schedule() then
        // keeps a fixed end at the first grant's, or slides it with each refresh.
        let announced = match &mut answer.granted {
            response::Granted::Tokens(t) => &mut t.refresh_expires_in,
            response::Granted::RefreshTokenOnly {
                refresh_expires_in, ..
            } => refresh_expires_in,
        };
        if announced.is_none() {
            *announced = self
                .profile
                .refresh_token_lifetime
                .map(|d| d.as_secs().min(response::MAX_LIFETIME as u64) as i64);
        }
        Ok((answer, status))
    }
}

/// A passing failure with no answer read (yet): the fields a caller fills in come after.
fn transient(message: String) -> ProviderFailure {
    ProviderFailure {
        class: FailureClass::Transient,
        message,
        http_status: None,
        retry_after: None,
        answer_lost: false,
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
pub struct Providers {
    live: BTreeMap<String, Arc<Provider>>,
    /// Providers a reload removed while their refreshes still held slots or claims: kept
    /// (never claimed for) so that one added back before those end gets its old bounds,
    /// not fresh ones beside those held.
    retired: BTreeMap<String, Arc<Provider>>,
}

impl Providers {
    pub fn from_config(config: &Config) -> Result<Providers, ProviderError> {
        let http = http_client(config).map_err(|source| ProviderError::Client {
            provider: "(all)".into(),
            source,
        })?;
        let enabled: Vec<_> = config.providers.iter().filter(|(_, p)| p.enabled).collect();
        let global = config.refresh.concurrency.max(1);
        // With several providers, none may take every global permit by default: a stalled
        // one then still leaves a quarter for the others.
        let default_cap = if enabled.len() > 1 {
            (global - global / 4).max(1)
        } else {
            global
        };
        let mut map = BTreeMap::new();
        for (name, p) in enabled {
            let cap = p.concurrency.unwrap_or(default_cap).max(1);
            map.insert(
                name.clone(),
                Arc::new(Provider::with_concurrency(
                    name,
                    p,
                    config,
                    http.clone(),
                    cap,
                )?),
            );
        }
        Ok(Providers {
            live: map,
            retired: BTreeMap::new(),
        })
    }

    /// After a reload: each provider of `old`'s name keeps `old`'s slots and claims,
    /// resized to its new pace, so the requests in flight and the accounts claimed ahead
    /// still count against the new bounds; and its rate limiter while its rate limit and
    /// burst are the same, so the reload grants no fresh burst (a new rate needs a new
    /// limiter: the refreshes waiting for their turn move to it, `Engine::wait_turn`).
    /// A provider an earlier reload removed, whose refreshes are still under way, counts as
    /// `old`'s too (`retired`).
    pub fn carry_over(mut self, old: &Providers) -> Providers {
        for (name, new) in self.live.iter_mut() {
            let Some(prev) = old.live.get(name).or_else(|| old.retired.get(name)) else {
                continue;
            };
            let p = Arc::get_mut(new).expect("a provider being built is not shared yet");
            if (prev.pace.per_minute, prev.pace.burst) == (p.pace.per_minute, p.pace.burst) {
                p.limiter = prev.limiter.clone();
            }
            prev.slots.resize(p.pace.concurrency);
            p.slots = prev.slots.clone();
            prev.claims.resize(p.pace.depth);
            p.claims = prev.claims.clone();
        }
        let gone = old.live.iter().chain(&old.retired);
        self.retired = gone
            .filter(|(name, p)| !self.live.contains_key(*name) && p.holds_bounds())
            .map(|(name, p)| (name.clone(), p.clone()))
            .collect();
        self
    }

    /// Providers with no room for another claim: the engine does not claim their accounts.
    pub fn saturated(&self) -> Vec<String> {
        self.live
            .iter()
            .filter(|(_, p)| p.claim_room() == 0)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// The providers whose accounts a claim may take: all but `skip`.
    fn claimable<'a>(&'a self, skip: &'a [String]) -> impl Iterator<Item = &'a Provider> {
        self.live
            .iter()
            .filter(|(name, _)| !skip.contains(name))
            .map(|(_, p)| p.as_ref())
    }

    /// Whether some provider outside `skip` has room enough to be worth a claim while
    /// refreshes are in flight (`policy::worth_claiming`: a quarter of its slots).
    pub fn worth_claiming(&self, skip: &[String]) -> bool {
        self.claimable(skip)
            .any(|p| crate::policy::worth_claiming(p.claim_room(), p.concurrency()))
    }

    /// Room for claims over the providers outside `skip` (a held provider's room would
    /// size a claim that only the others' accounts fill).
    pub fn claim_room(&self, skip: &[String]) -> usize {
        self.claimable(skip).map(|p| p.claim_room()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Provider>> {
        self.live.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.live.keys().map(String::as_str)
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

    fn providers(toml: &str) -> Providers {
        Providers::from_config(&Config::from_toml_str(toml).unwrap()).unwrap()
    }

    /// Two providers; a rate of 1 a minute, so no token of the burst comes back during a
    /// test (their claim depth is the slots and the 2 requests the rate sends in half a
    /// lease).
    const TWO: &str = "[providers.tiktok]\nclient_key = \"k\"\nclient_secret = \"s\"\n\
                       rate_limit = 1\nburst = 2\nconcurrency = 4\n\
                       [providers.linkedin]\nclient_key = \"k\"\nclient_secret = \"s\"\n\
                       rate_limit = 1\nburst = 2\nconcurrency = 4\n";

    /// `TWO` with tiktok's `from` setting replaced by `to`.
    fn tiktok_with(from: &str, to: &str) -> Providers {
        assert!(TWO.contains(from));
        providers(&TWO.replacen(from, to, 1))
    }

    /// A reload that leaves a provider's pace alone grants it no fresh burst and no fresh
    /// slots: what is in flight, claimed or spent before the reload still counts.
    #[tokio::test]
    async fn a_reload_keeps_the_limiter_and_slots_of_an_unchanged_provider() {
        let old = providers(TWO);
        let tiktok = old.get("tiktok").unwrap();
        let _in_flight = tiktok.slot().await;
        let _claimed = tiktok.try_claim().unwrap();
        assert!(tiktok.limiter.check().is_ok() && tiktok.limiter.check().is_ok());
        assert!(tiktok.limiter.check().is_err(), "the burst of 2 is spent");

        let new = providers(TWO).carry_over(&old);
        let t = new.get("tiktok").unwrap();
        assert_eq!(t.free_slots(), 3, "the request in flight holds a slot");
        assert_eq!(
            t.claim_room(),
            t.pace.depth - 1,
            "the account claimed holds a claim"
        );
        assert!(
            t.limiter.check().is_err(),
            "no fresh burst after the reload"
        );
        let (l, old_l) = (new.get("linkedin").unwrap(), old.get("linkedin").unwrap());
        assert!(Arc::ptr_eq(&l.limiter, &old_l.limiter));
        assert!(l.slots.same(&old_l.slots));
        assert!(l.claims.same(&old_l.claims));
    }

    /// A new rate limit or burst needs a new limiter (governor's cannot change); the slots
    /// and claims stay, with what they hold.
    #[tokio::test]
    async fn a_reload_with_a_new_rate_or_burst_gives_a_new_limiter_only() {
        for (from, to) in [
            ("rate_limit = 1", "rate_limit = 2"),
            ("burst = 2", "burst = 3"),
        ] {
            let old = providers(TWO);
            let tiktok = old.get("tiktok").unwrap();
            let _in_flight = tiktok.slot().await;
            while tiktok.limiter.check().is_ok() {}
            let new = tiktok_with(from, to).carry_over(&old);
            let t = new.get("tiktok").unwrap();
            assert!(!Arc::ptr_eq(&t.limiter, &tiktok.limiter), "{to}");
            assert!(t.limiter.check().is_ok(), "{to}: the new limiter's burst");
            assert!(t.slots.same(&tiktok.slots), "{to}");
            assert_eq!(
                t.free_slots(),
                3,
                "{to}: the request in flight still counts"
            );
            let l = new.get("linkedin").unwrap();
            assert!(Arc::ptr_eq(
                &l.limiter,
                &old.get("linkedin").unwrap().limiter
            ));
        }
    }

    /// Fewer slots than requests in flight: nothing new is sent until enough have ended;
    /// more slots: the new ones are free at once beside those held.
    #[tokio::test]
    async fn a_reload_resizes_the_slots_and_claims_keeping_what_is_held() {
        let old = providers(TWO);
        let tiktok = old.get("tiktok").unwrap();
        let mut in_flight = vec![
            tiktok.slot().await,
            tiktok.slot().await,
            tiktok.slot().await,
        ];
        let _claimed: Vec<_> = (0..3).map(|_| tiktok.try_claim().unwrap()).collect();
        let fewer = tiktok_with("concurrency = 4", "concurrency = 2").carry_over(&old);
        let t = fewer.get("tiktok").unwrap();
        assert_eq!(t.concurrency(), 2);
        assert_eq!(t.pace.depth, 4);
        assert_eq!(
            (t.free_slots(), t.claim_room()),
            (0, 1),
            "three claimed of four"
        );
        assert!(
            Arc::ptr_eq(&t.limiter, &tiktok.limiter),
            "same rate, same limiter"
        );
        in_flight.pop();
        assert_eq!(t.free_slots(), 0, "two in flight: the new bound");
        in_flight.pop();
        assert_eq!(t.free_slots(), 1);

        let more = tiktok_with("concurrency = 4", "concurrency = 8").carry_over(&fewer);
        let t = more.get("tiktok").unwrap();
        assert_eq!(t.concurrency(), 8);
        assert_eq!(t.free_slots(), 7, "one in flight of eight");
        assert_eq!(t.claim_room(), t.pace.depth - 3, "three still claimed");
    }

    /// A provider removed by one reload and added back by the next, while a refresh of it
    /// is still in flight, gets its old slots back (the refresh still counts), not fresh
    /// ones beside it; once nothing of it is held, a removal forgets it.
    #[tokio::test]
    async fn a_provider_added_back_while_its_refreshes_run_keeps_its_bounds() {
        // TWO less tiktok.
        const LINKEDIN_ONLY: &str = "[providers.linkedin]\nclient_key = \"k\"\n\
                                     client_secret = \"s\"\nrate_limit = 1\nburst = 2\n\
                                     concurrency = 4\n";
        let old = providers(TWO);
        let tiktok = old.get("tiktok").unwrap();
        let in_flight = tiktok.slot().await;
        let without = providers(LINKEDIN_ONLY).carry_over(&old);
        assert!(without.get("tiktok").is_none());
        // Still away after a second reload: kept while held.
        let still_without = providers(LINKEDIN_ONLY).carry_over(&without);
        let back = providers(TWO).carry_over(&still_without);
        let t = back.get("tiktok").unwrap();
        assert!(t.slots.same(&tiktok.slots));
        assert_eq!(t.free_slots(), 3, "the request in flight holds a slot");

        // An account claimed ahead, not yet sent, holds it too.
        drop(in_flight);
        let claimed = t.try_claim().unwrap();
        let without = providers(LINKEDIN_ONLY).carry_over(&back);
        let back = providers(TWO).carry_over(&without);
        let t = back.get("tiktok").unwrap();
        assert!(t.claims.same(&tiktok.claims));
        assert_eq!(t.claim_room(), t.pace.depth - 1, "the claim still counts");

        drop(claimed);
        let without = providers(LINKEDIN_ONLY).carry_over(&back);
        let back = providers(TWO).carry_over(&without);
        let t = back.get("tiktok").unwrap();
        assert!(!t.slots.same(&tiktok.slots), "nothing held: fresh bounds");
        assert_eq!(t.free_slots(), 4);
    }

    /// A provider without a `concurrency` of its own takes its share of
    /// `refresh.concurrency`: a new global bound resizes its slots, and keeps its limiter.
    #[tokio::test]
    async fn a_new_global_bound_resizes_the_default_slots_and_keeps_the_limiter() {
        let config = |global: usize| {
            format!(
                "[refresh]\nconcurrency = {global}\n\
                 [providers.tiktok]\nclient_key = \"k\"\nclient_secret = \"s\"\n\
                 rate_limit = 1\nburst = 2\n"
            )
        };
        let old = providers(&config(4));
        let tiktok = old.get("tiktok").unwrap();
        let _in_flight = tiktok.slot().await;
        let new = providers(&config(6)).carry_over(&old);
        let t = new.get("tiktok").unwrap();
        assert_eq!(t.free_slots(), 5);
        assert!(Arc::ptr_eq(&t.limiter, &tiktok.limiter));
    }
}
