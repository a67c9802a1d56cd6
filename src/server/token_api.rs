//! The token API for the app the daemon serves: the current access token of one account,
//! only with the configured bearer secret. `?min_valid=5m` refreshes first when the token
//! would expire sooner, through the engine and its lease (never a second refresh). The
//! token proxy (`proxy/`) shares its authentication and that on-demand refresh.

use super::AppState;
use crate::clock::rfc3339;
use crate::model::{Account, Status};
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use std::time::Duration;
use subtle::ConstantTimeEq;

/// The longest `min_valid` accepted: tokens rarely live longer.
const MAX_MIN_VALID: Duration = Duration::from_secs(7 * 86_400);
/// How often a waiting request looks at the store while the engine refreshes.
const POLL: Duration = Duration::from_millis(50);

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/accounts/{id}/token", get(by_id))
        .route(
            "/v1/providers/{provider}/subjects/{subject}/token",
            get(by_subject),
        )
}

#[derive(serde::Deserialize)]
pub struct TokenQuery {
    min_valid: Option<String>,
}

pub(super) fn json_error(status: StatusCode, error: &str, message: String) -> Response {
    let mut r = (
        status,
        axum::Json(serde_json::json!({"error": error, "message": message})),
    )
        .into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, "no-store".parse().expect("valid"));
    r
}

/// Compares the bearer secret through SHA-256 digests, so neither content nor length leaks
/// through timing.
pub(super) fn authorized(state: &AppState, headers: &HeaderMap) -> bool {
    let Some(expected) = state.settings.borrow().config.server.api_token.clone() else {
        return false;
    };
    let got = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_credentials)
        .unwrap_or("");
    let a = Sha256::digest(expected.expose_secret().as_bytes());
    let b = Sha256::digest(got.as_bytes());
    bool::from(a.ct_eq(&b)) && !got.is_empty()
}

/// The credentials of an `Authorization: Bearer <token>` value. The scheme is matched
/// case-insensitively (RFC 7235 section 2.1): `bearer`, `BEARER` and `Bearer` are the same.
fn bearer_credentials(value: &str) -> Option<&str> {
    let (scheme, rest) = value.trim().split_once([' ', '\t'])?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim())
        .filter(|t| !t.is_empty())
}

/// Logs a request for `requested` (an account's token, the admin page) without the right
/// bearer secret.
pub(super) fn unauthorized_event(requested: &str) {
    tracing::warn!(
        event = "token_api_unauthorized",
        requested,
        "request without the right bearer secret"
    );
}

pub(super) fn unauthorized() -> Response {
    let mut r = json_error(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "send `Authorization: Bearer <the secret in server.api_token_file>`".into(),
    );
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("valid"));
    r
}

async fn by_id(
    State(s): State<AppState>,
    Path(id): Path<i64>,
    Query(q): Query<TokenQuery>,
    headers: HeaderMap,
) -> Response {
    let store = s.store.clone();
    answer(&s, &headers, q, format!("account {id}"), store.get(id)).await
}

async fn by_subject(
    State(s): State<AppState>,
    Path((provider, subject)): Path<(String, String)>,
    Query(q): Query<TokenQuery>,
    headers: HeaderMap,
) -> Response {
    let store = s.store.clone();
    let who = format!("{provider} account with subject {subject:?}");
    answer(&s, &headers, q, who, store.find(&provider, &subject)).await
}

/// Checks the bearer secret, then looks the account up and serves its token.
async fn answer(
    s: &AppState,
    headers: &HeaderMap,
    q: TokenQuery,
    who: String,
    lookup: impl std::future::Future<Output = Result<Option<Account>, crate::store::StoreError>>,
) -> Response {
    if !authorized(s, headers) {
        unauthorized_event(&who);
        return unauthorized();
    }
    match lookup.await {
        Ok(Some(a)) => serve(s, a, q).await,
        Ok(None) => json_error(StatusCode::NOT_FOUND, "not_found", format!("no {who}")),
        Err(e) => store_error(e),
    }
}

pub(super) fn store_error(e: crate::store::StoreError) -> Response {
    json_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        format!("the store did not answer: {e}"),
    )
}

async fn serve(s: &AppState, mut a: Account, q: TokenQuery) -> Response {
    if a.status == Status::Disabled {
        return json_error(
            StatusCode::FORBIDDEN,
            "account_disabled",
            format!(
                "account {} ({}/{}) is disabled by an admin: its token is not handed out; `refreshd accounts enable {}` switches it back on",
                a.id, a.provider, a.subject, a.id
            ),
        );
    }
    let min_valid = match q.min_valid.as_deref().map(humantime::parse_duration) {
        None => Duration::ZERO,
        Some(Ok(d)) if d <= MAX_MIN_VALID => d,
        Some(Ok(_)) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                "bad_min_valid",
                "min_valid must be at most 7d".into(),
            );
        }
        Some(Err(e)) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                "bad_min_valid",
                format!(
                    "min_valid {:?} is not a duration ({e}); e.g. min_valid=5m",
                    q.min_valid.unwrap_or_default()
                ),
            );
        }
    };
    let now = s.clock.now();
    if a.access_expires_at - now < min_valid.as_secs() as i64 && refreshable(a.status) {
        match refresh_first(s, &a).await {
            Ok(fresh) => a = fresh,
            Err(r) => return r,
        }
    }
    let now = s.clock.now();
    if a.access_expires_at <= now {
        let reconnect = crate::telemetry::reconnect_command(&a.provider, a.id);
        return json_error(
            StatusCode::CONFLICT,
            "token_expired",
            format!(
                "account {} ({}) has no valid access token: status {}{}; re-authorize with `{reconnect}`",
                a.id,
                a.provider,
                a.status,
                a.reauth_reason
                    .map(|r| format!(" ({})", r.as_str()))
                    .unwrap_or_default()
            ),
        );
    }
    tracing::info!(
        event = "token_handed_out",
        account = a.id,
        provider = %a.provider,
        expires_at = %rfc3339(a.access_expires_at),
        "access token handed to the app"
    );
    let mut doc = a.token_document();
    doc["expires_in"] = (a.access_expires_at - now).into();
    doc["status"] = a.status.as_str().into();
    let mut r = axum::Json(doc).into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, "no-store".parse().expect("valid"));
    r
}

/// The account went away while a request about it was in progress.
pub(super) fn removed(id: i64) -> Response {
    json_error(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("account {id} was removed"),
    )
}

pub(super) fn refreshable(s: Status) -> bool {
    matches!(s, Status::Active | Status::Expiring)
}

/// Makes the account due, wakes the engine and waits until the refresh is recorded (a new
/// generation) or the account is flagged. The engine claims it with its lease like any due
/// account, so another process refreshing it at the same time is impossible.
pub(super) async fn refresh_first(s: &AppState, a: &Account) -> Result<Account, Response> {
    let cfg = s.settings.borrow().config.clone();
    if let Err(e) = s.store.mark_due(a.id, s.clock.now(), false).await {
        return Err(store_error(e));
    }
    s.engine.waker().notify_one();
    // Long enough for a claim, a rate-limit slot and one request.
    let deadline =
        tokio::time::Instant::now() + cfg.refresh.request_timeout * 2 + cfg.refresh.max_idle;
    loop {
        tokio::time::sleep(POLL).await;
        match s.store.get(a.id).await {
            Ok(Some(now)) if now.generation != a.generation || !refreshable(now.status) => {
                return Ok(now);
            }
            Ok(Some(now)) if now.failures > a.failures => {
                return Err(json_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "refresh_failed",
                    format!(
                        "the refresh failed for now ({}); it is retried with backoff",
                        now.last_error.unwrap_or_default()
                    ),
                ));
            }
            Ok(Some(_)) => {}
            Ok(None) => return Err(removed(a.id)),
            Err(e) => return Err(store_error(e)),
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "refresh_pending",
                "the refresh did not finish in time; ask again shortly".into(),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::bearer_credentials;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for v in ["Bearer abc", "bearer abc", "BEARER abc", "  bEaReR   abc "] {
            assert_eq!(bearer_credentials(v), Some("abc"), "{v:?}");
        }
        for v in ["Basic abc", "Bearer", "Bearer   ", "Bearerabc", "", "abc"] {
            assert_eq!(bearer_credentials(v), None, "{v:?}");
        }
    }
}
