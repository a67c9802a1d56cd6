//! The sandbox's small TikTok-shaped API, so the token proxy is tested against a real
//! resource server: `GET /v2/user/info/` (the user of the token) and `/v2/echo/` (what
//! arrived: method, query, header names, body size; `?size=N` answers N bytes). Both check
//! `Authorization: Bearer` against the live access tokens (unexpired, unrevoked, latest of
//! their grant) and answer TikTok's 401 otherwise. `POST /v2/research/video/query/` (the
//! Research API) takes live client access tokens (app tokens) only. Tests can make the API refuse a token
//! that is still valid ([`Sandbox::refuse_in_api`]), as after a reset on the provider's side.

use super::{Sandbox, Shared, json_response};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// TikTok's user info endpoint.
pub const USER_INFO_PATH: &str = "/v2/user/info/";
/// Echoes what arrived (not a TikTok endpoint).
pub const ECHO_PATH: &str = "/v2/echo/";
/// TikTok's Research API video query: client access tokens only.
pub const RESEARCH_PATH: &str = "/v2/research/video/query/";
/// Largest body `/v2/echo/` reads or writes.
const ECHO_MAX: usize = 256 << 20;

/// Access tokens, or whole users (open_ids), the API refuses although they are valid.
#[derive(Debug, Default)]
pub(super) struct ApiRefusals {
    tokens: HashSet<Box<str>>,
    users: HashSet<Box<str>>,
}

pub(super) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route(USER_INFO_PATH, get(user_info))
        .route(ECHO_PATH, any(echo))
        .route(RESEARCH_PATH, axum::routing::post(research))
}

impl Sandbox {
    /// The API's base URL (what `providers.NAME.api_base` points at), e.g.
    /// `http://127.0.0.1:PORT`.
    pub fn api_base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// From now on the API answers 401 to this access token, though the token endpoint still
    /// takes its grant's refresh token (a refresh gives a token the API accepts).
    pub fn refuse_in_api(&self, access_token: &str) {
        self.shared
            .lock()
            .api_refusals
            .tokens
            .insert(access_token.into());
    }

    /// From now on the API answers 401 to every access token of `open_id`, refreshed or not.
    pub fn refuse_user_in_api(&self, open_id: &str) {
        self.shared.lock().api_refusals.users.insert(open_id.into());
    }
}

impl Shared {
    /// The open_id whose live access token the request carries (counted; a refusal too).
    fn caller(&self, headers: &HeaderMap) -> Option<String> {
        let token = bearer(headers);
        let now = self.clock.now();
        let mut book = self.lock();
        book.stats.api_calls += 1;
        let found = book
            .grants
            .iter()
            .find(|(_, g)| !token.is_empty() && &*g.access_token == token)
            .filter(|(open_id, g)| {
                !g.revoked
                    && now < g.access_expires_at
                    && !book.api_refusals.tokens.contains(token)
                    && !book.api_refusals.users.contains(&***open_id)
            })
            .map(|(open_id, _)| open_id.to_string());
        if found.is_none() {
            book.stats.api_unauthorized += 1;
        }
        found
    }

    /// Whether the request carries a live client access token (counted; a refusal too).
    fn client_caller(&self, headers: &HeaderMap) -> bool {
        let token = bearer(headers);
        let now = self.clock.now();
        let mut book = self.lock();
        book.stats.api_calls += 1;
        let live = book
            .client_tokens
            .get(token)
            .is_some_and(|expires_at| now < *expires_at);
        if !live {
            book.stats.api_unauthorized += 1;
        }
        live
    }

    /// TikTok's 401 for a missing, unknown, expired or revoked access token.
    fn unauthorized(&self) -> Response {
        json_response(
            StatusCode::UNAUTHORIZED,
            self.api_body(
                json!({}),
                "access_token_invalid",
                "The access token is invalid or not found in the request.",
            ),
        )
    }

    /// TikTok's API envelope: `{"data": .., "error": {"code", "message", "log_id"}}`.
    fn api_body(&self, data: Value, code: &str, message: &str) -> Value {
        json!({"data": data, "error": {"code": code, "message": message, "log_id": self.log_id()}})
    }
}

async fn user_info(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    match shared.caller(&headers) {
        Some(open_id) => {
            let user = json!({
                "open_id": open_id,
                "union_id": format!("union.{open_id}"),
                "display_name": format!("Sandbox user {open_id}"),
                "avatar_url": "https://example.invalid/avatar.png",
            });
            json_response(
                StatusCode::OK,
                shared.api_body(json!({"user": user}), "ok", ""),
            )
        }
        None => shared.unauthorized(),
    }
}

/// The `Authorization: Bearer` token, '' when none.
fn bearer(headers: &HeaderMap) -> &str {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
}

/// An empty page of videos for a live client token; TikTok's 401 for anything else (a
/// user's token included).
async fn research(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if !shared.client_caller(&headers) {
        return shared.unauthorized();
    }
    let data = json!({"videos": [], "cursor": 0, "has_more": false});
    json_response(StatusCode::OK, shared.api_body(data, "ok", ""))
}

async fn echo(
    State(shared): State<Arc<Shared>>,
    method: Method,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if shared.caller(&headers).is_none() {
        return shared.unauthorized();
    }
    let Ok(body) = axum::body::to_bytes(body, ECHO_MAX).await else {
        return StatusCode::PAYLOAD_TOO_LARGE.into_response();
    };
    if let Some(size) = query.get("size").and_then(|s| s.parse::<usize>().ok()) {
        return sized(size.min(ECHO_MAX), query.contains_key("chunked"));
    }
    let mut names: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
    names.sort_unstable();
    let data = json!({
        "method": method.as_str(),
        "query": query,
        "headers": names,
        "body_bytes": body.len(),
        "body": String::from_utf8_lossy(&body),
    });
    json_response(StatusCode::OK, shared.api_body(data, "ok", ""))
}

/// `size` bytes of `x`: with a Content-Length, or `chunked` (streamed in 64 KiB pieces
/// without one).
fn sized(size: usize, chunked: bool) -> Response {
    const PIECE: usize = 64 << 10;
    let ctype = [(header::CONTENT_TYPE, "application/octet-stream")];
    if !chunked {
        return (ctype, vec![b'x'; size]).into_response();
    }
    let pieces = (0..size.div_ceil(PIECE)).map(move |i| {
        let n = PIECE.min(size - i * PIECE);
        Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; n]))
    });
    (ctype, Body::from_stream(futures::stream::iter(pieces))).into_response()
}
