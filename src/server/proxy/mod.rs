//! The token proxy: `/proxy/{account}/{path}` forwards the caller's method, path, query and
//! body to the account's provider API (`api_base` + path, nothing else: `target.rs`) with
//! `Authorization: Bearer <its current access token>`. A 401 from the API refreshes that
//! account once, through the engine and its lease like the token API's `min_valid`, and the
//! request is sent once more; a second 401 is passed back. Served with the token API, behind
//! the same bearer secret. Never logs a token, a header or a body.

mod forward;
mod target;

use super::AppState;
use super::token_api::{
    authorized, json_error, refresh_first, refreshable, removed, store_error, unauthorized,
};
use crate::config::Config;
use crate::model::{Account, Status};
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::Response;
use axum::routing::any;
use forward::{Sent, Upstream};
use std::time::Instant;

pub fn routes(config: &Config) -> Router<AppState> {
    let upstream = Upstream::new(&config.proxy);
    let handler = move |State(s): State<AppState>, req: Request| {
        let upstream = upstream.clone();
        async move { proxy(s, upstream, req).await }
    };
    Router::new()
        .route("/proxy/{account}", any(handler.clone()))
        .route("/proxy/{account}/{*path}", any(handler))
}

/// What a proxied request came to, for the metric and the log.
#[derive(Clone, Copy)]
enum Outcome {
    /// The API's answer, passed back (whatever its status).
    Forwarded,
    /// The API's answer after a 401, a refresh and one more try.
    Retried,
    /// Refused before anything was sent: path, account state, provider.
    Refused,
    /// A body over `proxy.max_request_bytes` / an answer over `proxy.max_response_bytes`.
    TooLarge,
    /// The API could not be reached or did not answer in time.
    UpstreamFailed,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Forwarded => "forwarded",
            Outcome::Retried => "retried",
            Outcome::Refused => "refused",
            Outcome::TooLarge => "too_large",
            Outcome::UpstreamFailed => "upstream_failed",
        }
    }
}

async fn proxy(s: AppState, upstream: Upstream, req: Request) -> Response {
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let (account, rest) = split_path(parts.uri.path());
    if !authorized(&s, &parts.headers) {
        tracing::warn!(event = "proxy_unauthorized", account = %account,
            "proxy request without the right bearer secret");
        return unauthorized();
    }
    let Ok(id) = account.parse::<i64>() else {
        return json_error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no account {account:?}: /proxy/{{account}}/... takes an account id"),
        );
    };
    let a = match s.store.get(id).await {
        Ok(Some(a)) => a,
        Ok(None) => {
            return json_error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no account {id}"),
            );
        }
        Err(e) => return store_error(e),
    };
    let method = parts.method.clone();
    let provider = a.provider.clone();
    let done = |outcome: Outcome, status: StatusCode, r: Response| {
        s.engine
            .metrics()
            .proxy_request(&provider, outcome.as_str());
        tracing::info!(event = "proxy_request", account = id, provider = %provider,
            method = %method, path = %rest, status = status.as_u16(), outcome = outcome.as_str(),
            duration_ms = started.elapsed().as_millis() as u64, "proxied an API request");
        r
    };
    let cfg = s.settings.borrow().config.clone();
    let url = match api_base(&cfg, &a)
        .and_then(|base| target::upstream_url(&base, rest, parts.uri.query()).map_err(refused))
    {
        Ok(u) => u,
        Err(r) => {
            let r = r.response();
            return done(Outcome::Refused, r.status(), r);
        }
    };
    let a = match usable(&s, a).await {
        Ok(a) => a,
        Err(r) => {
            let (status, outcome) = (r.status(), Outcome::Refused);
            return done(outcome, status, r);
        }
    };
    let body = match read_body(&parts.headers, body, cfg.proxy.max_request_bytes).await {
        Ok(b) => b,
        Err(r) => return done(Outcome::TooLarge, r.status(), r),
    };
    let headers = target::request_headers(&parts.headers);
    let send = async |a: &Account| upstream.send(&method, &url, &headers, &body, a, &cfg).await;
    let (sent, outcome) = match send(&a).await {
        Sent::Answer(r)
            if r.status() == StatusCode::UNAUTHORIZED
                && renewed_lately(a.last_refreshed_at, s.clock.now()) =>
        {
            tracing::info!(event = "proxy_refresh_skipped", account = a.id, provider = %a.provider,
                "the API refused a token renewed less than a minute ago: its 401 goes back to the caller without another refresh");
            (Sent::Answer(r), Outcome::Forwarded)
        }
        Sent::Answer(r) if r.status() == StatusCode::UNAUTHORIZED => {
            tracing::info!(event = "proxy_token_refused", account = a.id, provider = %a.provider,
                "the API refused the access token: refreshing the account once and retrying");
            match renewed(&s, &a).await {
                // A second 401 goes back to the caller as the API gave it.
                Ok(fresh) => (send(&fresh).await, Outcome::Retried),
                Err(r) => return done(Outcome::Refused, r.status(), r),
            }
        }
        sent => (sent, Outcome::Forwarded),
    };
    let r = match sent {
        Sent::Answer(r) => r,
        Sent::TooLarge(r) => return done(Outcome::TooLarge, r.status(), r),
        Sent::Failed(r) => return done(Outcome::UpstreamFailed, r.status(), r),
    };
    let status = r.status();
    done(outcome, status, r)
}

/// A token renewed this recently that the API still refuses is not the token's fault (a
/// scope, an app without access): another refresh would only spend a rotation and the
/// provider's rate limit on every such request.
const RENEWED_LATELY_SECS: i64 = 60;

fn renewed_lately(last_refreshed_at: Option<i64>, now: i64) -> bool {
    last_refreshed_at.is_some_and(|at| now - at < RENEWED_LATELY_SECS)
}

/// `("42", "/v2/user/info/")` from `/proxy/42/v2/user/info/`; the rest stays encoded.
fn split_path(path: &str) -> (&str, &str) {
    let after = path.strip_prefix("/proxy/").unwrap_or("");
    match after.find('/') {
        Some(i) => (&after[..i], &after[i..]),
        None => (after, ""),
    }
}

/// Why a request is not forwarded, before any I/O: the answer's parts (small, unlike a
/// `Response`).
struct Refusal {
    status: StatusCode,
    error: &'static str,
    message: String,
}

impl Refusal {
    fn response(self) -> Response {
        json_error(self.status, self.error, self.message)
    }
}

/// The account's provider API base, or why there is none.
fn api_base(cfg: &Config, a: &Account) -> Result<url::Url, Refusal> {
    let conflict = |error: &'static str, message: String| Refusal {
        status: StatusCode::CONFLICT,
        error,
        message,
    };
    let Some(pc) = cfg.providers.get(&a.provider) else {
        return Err(conflict(
            "provider_not_configured",
            format!(
                "account {} belongs to provider {:?}, which is not in the config: add [providers.{}]",
                a.id, a.provider, a.provider
            ),
        ));
    };
    let base = pc.profile(&a.provider).ok().and_then(|p| p.api_base);
    let Some(base) = base else {
        return Err(conflict(
            "no_api_base",
            format!(
                "provider {:?} (account {}) has no API base to forward to: set providers.{}.api_base",
                a.provider, a.id, a.provider
            ),
        ));
    };
    url::Url::parse(&base).map_err(|e| {
        conflict(
            "no_api_base",
            format!(
                "providers.{}.api_base {base:?} is not a URL ({e})",
                a.provider
            ),
        )
    })
}

fn refused(why: target::Refused) -> Refusal {
    Refusal {
        status: StatusCode::BAD_REQUEST,
        error: "path_refused",
        message: format!(
            "{}: the proxy forwards only to paths under the provider's api_base",
            why.reason()
        ),
    }
}

/// The account if it may be used now: not disabled, not waiting for a person, with an
/// unexpired access token (refreshed first through the engine when it has expired).
async fn usable(s: &AppState, a: Account) -> Result<Account, Response> {
    if a.status == Status::Disabled {
        return Err(json_error(
            StatusCode::CONFLICT,
            "account_disabled",
            format!(
                "account {} ({}/{}) is disabled by an admin: nothing is forwarded for it; `refreshd accounts enable {}` switches it back on",
                a.id, a.provider, a.subject, a.id
            ),
        ));
    }
    let a = if refreshable(a.status) && a.access_expires_at <= s.clock.now() {
        refresh_first(s, &a).await?
    } else {
        a
    };
    if !refreshable(a.status) || a.access_expires_at <= s.clock.now() {
        return Err(needs_human(&a));
    }
    Ok(a)
}

fn needs_human(a: &Account) -> Response {
    let reconnect = crate::telemetry::reconnect_command(&a.provider, a.id);
    json_error(
        StatusCode::CONFLICT,
        "needs_reauth",
        format!(
            "account {} ({}/{}) has no usable access token: status {}{}; nothing is forwarded until it is re-authorized with `{reconnect}`",
            a.id,
            a.provider,
            a.subject,
            a.status,
            a.reauth_reason
                .map(|r| format!(" ({})", r.as_str()))
                .unwrap_or_default()
        ),
    )
}

/// After the API refused the token: a token another process rotated in meanwhile, else one
/// refresh of the account through the engine (under its lease: never a second in flight).
async fn renewed(s: &AppState, a: &Account) -> Result<Account, Response> {
    let now = match s.store.get(a.id).await {
        Ok(Some(now)) => now,
        Ok(None) => return Err(removed(a.id)),
        Err(e) => return Err(store_error(e)),
    };
    let fresh = if now.generation != a.generation || !refreshable(now.status) {
        now
    } else {
        refresh_first(s, &now).await?
    };
    if !refreshable(fresh.status) || fresh.generation == a.generation {
        return Err(needs_human(&fresh));
    }
    Ok(fresh)
}

/// The caller's body, whole (a retry resends it), or 413 past `max` bytes.
async fn read_body(
    headers: &axum::http::HeaderMap,
    body: Body,
    max: usize,
) -> Result<axum::body::Bytes, Response> {
    let too_large = || {
        json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            format!(
                "the request body is larger than proxy.max_request_bytes ({max} bytes): it was not forwarded"
            ),
        )
    };
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    axum::body::to_bytes(body, max)
        .await
        .map_err(|_| too_large())
}

#[cfg(test)]
mod tests {
    use super::{renewed_lately, split_path};

    #[test]
    fn a_token_renewed_within_the_minute_is_not_refreshed_again() {
        assert!(!renewed_lately(None, 1_000));
        assert!(renewed_lately(Some(1_000), 1_000));
        assert!(renewed_lately(Some(1_000), 1_059));
        assert!(!renewed_lately(Some(1_000), 1_060));
    }

    #[test]
    fn the_account_and_the_rest_of_the_path_are_split_as_written() {
        assert_eq!(
            split_path("/proxy/42/v2/user/info/"),
            ("42", "/v2/user/info/")
        );
        assert_eq!(split_path("/proxy/42"), ("42", ""));
        assert_eq!(split_path("/proxy/7/a%2Fb"), ("7", "/a%2Fb"));
    }
}
