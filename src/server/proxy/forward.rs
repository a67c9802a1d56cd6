//! Sending one proxied request to the provider's API and streaming its answer back within
//! `proxy.max_response_bytes`: its own HTTP client (no redirects, no proxy from the
//! environment, the `[proxy]` timeouts), the account's token as a sensitive header.

use super::target;
use crate::config::{Config, ProxyConfig};
use crate::model::Account;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use secrecy::ExposeSecret;
use std::time::Duration;

/// The API's answer, or why there is none. Each holds the response for the caller.
pub enum Sent {
    Answer(Response),
    /// The answer announced more than `proxy.max_response_bytes`: 502.
    TooLarge(Response),
    /// Connecting, sending or waiting for the head failed: 502, or 504 on a timeout.
    Failed(Response),
}

/// The client the proxy forwards with.
#[derive(Clone)]
pub struct Upstream {
    client: reqwest::Client,
    timeout: Duration,
    max_response: u64,
}

impl Upstream {
    pub fn new(px: &ProxyConfig) -> Upstream {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(px.connect_timeout)
            .read_timeout(px.read_timeout)
            .build()
            .unwrap_or_default();
        Upstream {
            client,
            timeout: px.timeout,
            max_response: px.max_response_bytes,
        }
    }

    /// Sends the request with `a`'s access token (and the profile's static headers the
    /// caller did not set, e.g. Reddit's User-Agent).
    pub async fn send(
        &self,
        method: &Method,
        url: &url::Url,
        headers: &HeaderMap,
        body: &Bytes,
        a: &Account,
        cfg: &Config,
    ) -> Sent {
        let mut headers = headers.clone();
        let profile = cfg
            .providers
            .get(&a.provider)
            .and_then(|p| p.profile(&a.provider).ok());
        for (k, v) in profile.map(|p| p.headers).unwrap_or_default() {
            if let (Ok(k), Ok(v)) = (
                header::HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_str(&v),
            ) && !headers.contains_key(&k)
            {
                headers.insert(k, v);
            }
        }
        let Ok(mut bearer) =
            HeaderValue::from_str(&format!("Bearer {}", a.access_token.expose_secret()))
        else {
            return Sent::Failed(fail(
                StatusCode::CONFLICT,
                "bad_token",
                format!("account {}'s access token cannot be sent in a header", a.id),
            ));
        };
        bearer.set_sensitive(true);
        headers.insert(header::AUTHORIZATION, bearer);
        let req = self
            .client
            .request(method.clone(), url.as_str())
            .headers(headers)
            .body(body.clone());
        let answer = match tokio::time::timeout(self.timeout, req.send()).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                let timed_out = e.is_timeout();
                let e = e.without_url();
                return Sent::Failed(if timed_out {
                    timeout(a, self.timeout)
                } else {
                    fail(
                        StatusCode::BAD_GATEWAY,
                        "upstream_unreachable",
                        format!("the {} API did not answer: {e}", a.provider),
                    )
                });
            }
            Err(_) => return Sent::Failed(timeout(a, self.timeout)),
        };
        if answer
            .content_length()
            .is_some_and(|n| n > self.max_response)
        {
            return Sent::TooLarge(fail(
                StatusCode::BAD_GATEWAY,
                "response_too_large",
                format!(
                    "the {} API's answer is larger than proxy.max_response_bytes ({} bytes): it was not passed on",
                    a.provider, self.max_response
                ),
            ));
        }
        Sent::Answer(self.stream_back(answer, a.id))
    }

    /// The answer with its status and end-to-end headers, its body streamed as it arrives
    /// and cut past `max_response` bytes.
    fn stream_back(&self, answer: reqwest::Response, account: i64) -> Response {
        let status = answer.status();
        let headers = target::response_headers(answer.headers());
        let max = self.max_response;
        let chunks = futures::stream::unfold(Some((answer, 0u64)), move |state| async move {
            let (mut answer, seen) = state?;
            match answer.chunk().await {
                Ok(Some(c)) if seen + c.len() as u64 > max => {
                    tracing::warn!(
                        event = "proxy_response_cut",
                        account,
                        max_response_bytes = max,
                        "the API's answer ran past proxy.max_response_bytes: cut there"
                    );
                    Some((Err(std::io::Error::other("answer too large")), None))
                }
                Ok(Some(c)) => {
                    let seen = seen + c.len() as u64;
                    Some((Ok::<Bytes, std::io::Error>(c), Some((answer, seen))))
                }
                Ok(None) => None,
                Err(e) => Some((Err(std::io::Error::other(e.without_url())), None)),
            }
        });
        let mut r = Response::new(Body::from_stream(chunks));
        *r.status_mut() = status;
        *r.headers_mut() = headers;
        r
    }
}

fn fail(status: StatusCode, error: &str, message: String) -> Response {
    super::json_error(status, error, message)
}

fn timeout(a: &Account, after: Duration) -> Response {
    fail(
        StatusCode::GATEWAY_TIMEOUT,
        "upstream_timeout",
        format!(
            "the {} API did not answer within proxy.timeout ({}s)",
            a.provider,
            after.as_secs()
        ),
    )
}
