//! Web connect: `GET /connect/{provider}/start` sends the browser to the provider with a
//! server-side, single-use `state` that expires; `GET /connect/{provider}/callback` checks
//! it, exchanges the code and stores the account, then answers with a small page or a
//! redirect to `connect.success_url` / `failure_url` (an account id or an error code, never
//! a token).
//!
//! Pending states live in the store (`connect_states`), keyed by the SHA-256 of the state
//! together with a nonce and the app's `ref` that `start` puts in a short-lived HttpOnly
//! `SameSite=Lax` cookie: only the browser that started can finish (an attacker's callback
//! link opened by someone else finds nothing), the lookup never compares a secret, the
//! callback may reach any replica sharing the store, and a restart between start and callback
//! forgets nothing. The PKCE verifier is sealed like a token when a key is configured. The
//! redirects to the app are signed (`signed_redirect`).

use super::AppState;
use super::signed_redirect::{self, CONNECTED};
use crate::connect::{self, ConnectError, Exchange};
use crate::events::Event;
use crate::store::PendingConnect;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use secrecy::SecretString;
use sha2::{Digest, Sha256};
use std::collections::HashMap;

/// Most authorizations in progress at once; beyond it `start` answers 503 (a flood of
/// `start` requests cannot grow the store without bound).
const MAX_PENDING: usize = 10_000;

pub use crate::store::StateProblem;

fn hex_sha256(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The store key of a pending connection: its state bound to the browser's cookie (nonce
/// and `ref`), so a state without its cookie, or with another one, finds nothing.
fn key(state: &str, nonce: &str, app_ref: &str) -> String {
    hex_sha256(&format!("{state}\n{nonce}\n{app_ref}"))
}

/// One cookie per authorization in progress (a user may run two at once).
fn cookie_name(state: &str) -> String {
    format!("refreshd_connect_{}", &hex_sha256(state)[..16])
}

/// The binding cookie: `nonce.ref`, sent back only to the callback's path.
fn binding_cookie(
    state: &str,
    nonce: &str,
    app_ref: &str,
    redirect_uri: &str,
    ttl: std::time::Duration,
) -> cookie::Cookie<'static> {
    let path = url::Url::parse(redirect_uri)
        .map(|u| u.path().to_string())
        .unwrap_or_else(|_| "/".into());
    cookie::Cookie::build((cookie_name(state), format!("{nonce}.{app_ref}")))
        .path(path)
        .http_only(true)
        .secure(redirect_uri.starts_with("https:"))
        .same_site(cookie::SameSite::Lax)
        .max_age(cookie::time::Duration::seconds(ttl.as_secs() as i64))
        .build()
}

/// The (nonce, ref) of the binding cookie of `state` among the request's cookies.
fn read_binding(headers: &HeaderMap, state: &str) -> Option<(String, String)> {
    let name = cookie_name(state);
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(cookie::Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == name)
        .and_then(|c| {
            let (nonce, app_ref) = c.value().split_once('.')?;
            Some((nonce.to_string(), app_ref.to_string()))
        })
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/connect/{provider}/start", get(start))
        .route("/connect/{provider}/callback", get(callback))
}

#[derive(serde::Deserialize)]
pub struct StartQuery {
    label: Option<String>,
    /// The app's opaque reference, returned in the signed redirect.
    #[serde(rename = "ref")]
    app_ref: Option<String>,
    account: Option<i64>,
    scopes: Option<String>,
}

fn page(status: StatusCode, title: &str, body: &str) -> Response {
    let mut r = (status, Html(connect::page::html_page(title, body))).into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, "no-store".parse().expect("valid"));
    r
}

/// The failure answer: a signed redirect to `connect.failure_url?error=CODE&ref=..`, or a
/// page. `app_ref` is empty when the request's own `ref` is not known (yet).
fn failure(s: &AppState, status: StatusCode, code: &str, message: &str, app_ref: &str) -> Response {
    let cfg = s.config();
    let target = cfg
        .connect
        .failure_url
        .as_deref()
        .and_then(|u| url::Url::parse(u).ok());
    match (target, cfg.connect.redirect_secret.as_ref()) {
        (Some(mut u), Some(secret)) => {
            u.query_pairs_mut().append_pair("error", code);
            signed_redirect::append(&mut u, secret, app_ref, None, code, s.clock.now());
            Redirect::to(u.as_str()).into_response()
        }
        _ => page(
            status,
            "Not connected",
            &format!("{message} (error: {code})"),
        ),
    }
}

async fn start(
    State(s): State<AppState>,
    Path(provider): Path<String>,
    Query(q): Query<StartQuery>,
) -> Response {
    let cfg = s.config();
    let app_ref = q.app_ref.unwrap_or_default();
    if !signed_redirect::valid_ref(&app_ref) {
        return failure(
            &s,
            StatusCode::BAD_REQUEST,
            "bad_request",
            "`ref` must be at most 200 letters, digits, '-', '.', '_' or '~'",
            "",
        );
    }
    let p = match connect::enabled_provider(&cfg, &provider) {
        Ok(p) => p,
        Err(e) => {
            return failure(
                &s,
                StatusCode::NOT_FOUND,
                "unknown_provider",
                &e.to_string(),
                // Not verified yet: a victim's ref must not be signed for anyone.
                "",
            );
        }
    };
    let redirect_uri = match connect::redirect_uri(&provider, p) {
        Ok(r) => r.to_string(),
        Err(e) => {
            tracing::error!(event = "connect_misconfigured", provider, error = %e, "web connect cannot start");
            return failure(
                &s,
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "this provider cannot be connected yet; the administrator has been told",
                &app_ref,
            );
        }
    };
    // `account` is not looked up here: an answer that differed for existing and unknown
    // ids would let anyone enumerate them. The callback refuses an unknown one.
    let auth = match connect::prepare_authorization(&provider, p, q.scopes.as_deref()) {
        Ok(a) => a,
        Err(e) => {
            return failure(
                &s,
                StatusCode::BAD_REQUEST,
                "bad_request",
                &e.to_string(),
                // Not verified yet: a victim's ref must not be signed for anyone.
                "",
            );
        }
    };
    let now = s.clock.now();
    let nonce = connect::new_state();
    let entry = PendingConnect {
        provider: provider.clone(),
        verifier: auth.pkce.map(|k| k.verifier),
        label: q.label.as_deref().and_then(connect::clean_label),
        account: q.account,
        scopes: auth.scopes,
        expires_at: now + cfg.connect.state_ttl.as_secs() as i64,
    };
    let stored = match s
        .store
        .connect_state_put(&key(&auth.state, &nonce, &app_ref), entry, now, MAX_PENDING)
        .await
    {
        Ok(stored) => stored,
        Err(e) => {
            tracing::error!(event = "connect_store_failed", provider, error = %e,
                "web connect: cannot remember the authorization in the store");
            return failure(
                &s,
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "try again in a moment",
                &app_ref,
            );
        }
    };
    if !stored {
        tracing::warn!(
            event = "connect_busy",
            provider,
            "too many authorizations in progress; refusing a new one"
        );
        return failure(
            &s,
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            "too many connections in progress; try again in a few minutes",
            &app_ref,
        );
    }
    tracing::info!(
        event = "connect_started",
        provider,
        account = q.account,
        "web connect: browser sent to the provider"
    );
    let cookie = binding_cookie(
        &auth.state,
        &nonce,
        &app_ref,
        &redirect_uri,
        cfg.connect.state_ttl,
    );
    let mut r = Redirect::to(auth.url.as_str()).into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie.to_string()) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    r
}

async fn callback(
    State(s): State<AppState>,
    Path(provider): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let now = s.clock.now();
    let state = q.get("state").filter(|st| !st.is_empty());
    // Without the cookie `start` set in this browser, the state finds nothing: Unknown.
    let (nonce, app_ref) = state
        .and_then(|st| read_binding(&headers, st))
        .unwrap_or_default();
    if state.is_some() && nonce.is_empty() {
        tracing::warn!(
            event = "connect_unbound",
            provider,
            "web connect callback without the browser's binding cookie (opened in another browser, or a forged link)"
        );
    }
    let entry = match state {
        None => Err(StateProblem::Missing),
        Some(st) => match s
            .store
            .connect_state_take(&key(st, &nonce, &app_ref), &provider, now)
            .await
        {
            Ok(taken) => taken,
            Err(e) => {
                tracing::error!(event = "connect_store_failed", provider, error = %e,
                    "web connect: cannot read the authorization's state from the store");
                return failure(
                    &s,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    "try again in a moment",
                    &app_ref,
                );
            }
        },
    };
    let entry = match entry {
        Ok(e) => e,
        Err(problem) => {
            tracing::warn!(
                event = "connect_state_rejected",
                provider,
                problem = problem.as_str(),
                "web connect callback refused: its state is {} (a forged or replayed request, or a user who took too long)",
                problem.as_str()
            );
            let message = match problem {
                StateProblem::Expired => "this authorization took too long; please start again",
                _ => {
                    "this link is not valid (it was already used, or did not come from us); please start again"
                }
            };
            return failure(
                &s,
                StatusCode::BAD_REQUEST,
                "invalid_state",
                message,
                // Not verified yet: a victim's ref must not be signed for anyone.
                "",
            );
        }
    };
    if let Some(error) = q.get("error") {
        let code: String = error
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .take(64)
            .collect();
        tracing::info!(event = "connect_denied", provider, error = %code, account = entry.account,
            "the user or the provider refused the authorization");
        return failure(
            &s,
            StatusCode::BAD_REQUEST,
            if code.is_empty() {
                "access_denied"
            } else {
                &code
            },
            "the authorization was not granted",
            &app_ref,
        );
    }
    let Some(code) = q.get("code").filter(|c| !c.is_empty()) else {
        return failure(
            &s,
            StatusCode::BAD_REQUEST,
            "missing_code",
            "the provider sent no authorization code",
            &app_ref,
        );
    };
    let cfg = s.config();
    let clock = s.clock.clone();
    let result = connect::exchange_and_store(
        &cfg,
        &s.store,
        Exchange {
            provider: &provider,
            code: SecretString::from(code.clone()),
            code_verifier: entry.verifier,
            label: entry.label,
            account: entry.account,
        },
        || clock.now(),
    )
    .await;
    let c = match result {
        Ok(c) => c,
        Err(e) => {
            let code = match &e {
                ConnectError::AccountMismatch { .. } => "account_mismatch",
                ConnectError::Store(crate::store::StoreError::NotFound(_)) => "unknown_account",
                ConnectError::Exchange { .. } => "exchange_failed",
                ConnectError::NoRefreshToken { .. } => "no_refresh_token",
                ConnectError::Store(_) => "server_error",
                _ => "connect_failed",
            };
            tracing::warn!(event = "connect_failed", provider, account = entry.account, error = %e, code,
                "web connect failed");
            return failure(
                &s,
                StatusCode::BAD_GATEWAY,
                code,
                "the account could not be connected",
                &app_ref,
            );
        }
    };
    let missing = connect::missing_scopes(&entry.scopes, &c.scope);
    tracing::info!(event = "account_connected", account = c.account_id, provider, subject = %c.open_id,
        created = c.created, scope = %c.scope, missing_scopes = %missing.join(","),
        access_expires_at = %crate::clock::rfc3339(c.access_expires_at), "account connected through the web");
    if !missing.is_empty() {
        tracing::warn!(event = "connect_fewer_scopes", account = c.account_id, provider,
            missing_scopes = %missing.join(","), "the user granted fewer scopes than requested");
    }
    let events = s.engine.events();
    events.emit(Event::TokensChanged {
        account_id: c.account_id,
        provider: provider.clone(),
        subject: c.open_id.clone(),
    });
    if let Some(recovered) = c.announce_recovery() {
        events.emit(recovered);
    }
    // The engine schedules the new tokens at its next look; wake it so it notices now.
    s.engine.waker().notify_one();
    match cfg
        .connect
        .success_url
        .as_deref()
        .and_then(|u| url::Url::parse(u).ok())
    {
        Some(mut u) => {
            u.query_pairs_mut()
                .append_pair("account_id", &c.account_id.to_string());
            if let Some(secret) = cfg.connect.redirect_secret.as_ref() {
                signed_redirect::append(
                    &mut u,
                    secret,
                    &app_ref,
                    Some(c.account_id),
                    CONNECTED,
                    s.clock.now(),
                );
            }
            Redirect::to(u.as_str()).into_response()
        }
        None => {
            let mut body = format!(
                "Connected {} account {} (account {}). You can close this tab.",
                provider, c.open_id, c.account_id
            );
            if !missing.is_empty() {
                body.push_str(&format!(
                    " Not granted: {}. Connect again and approve them if they are needed.",
                    missing.join(", ")
                ));
            }
            page(StatusCode::OK, "Connected", &body)
        }
    }
}
