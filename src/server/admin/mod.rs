//! `GET /admin`: a read-only page for the people running refreshd (counts, accounts needing a
//! human with their reconnect link, the latest refresh outcomes, each provider's state).
//! Served only with `server.admin_page = true`, behind the token API's bearer secret; never
//! shows a token or a secret. `gather.rs` reads (bounded), `render.rs` writes the HTML.

mod gather;
mod render;

use super::AppState;
use super::token_api::{authorized, unauthorized_event};
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// No script may run, nothing is loaded from elsewhere, no other site may frame it.
const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

pub fn routes() -> Router<AppState> {
    Router::new().route("/admin", get(admin_page))
}

async fn admin_page(State(s): State<AppState>, headers: HeaderMap) -> Response {
    if !authorized(&s, &headers) {
        unauthorized_event("the admin page");
        return private(
            StatusCode::UNAUTHORIZED,
            "send `Authorization: Bearer <the secret in server.api_token_file>`\n".into_response(),
        );
    }
    let settings = s.settings.borrow().clone();
    match gather::gather(&s.store, &s.engine, &settings, s.clock.now()).await {
        Ok(view) => private(StatusCode::OK, render::page(&view).into_response()),
        Err(e) => {
            tracing::warn!(event = "admin_page_store_failed", error = %e, "/admin: cannot read the store");
            private(
                StatusCode::SERVICE_UNAVAILABLE,
                "cannot read the store for the admin page (the daemon's log says why)\n"
                    .into_response(),
            )
        }
    }
}

/// Sets the status and the headers every answer of the page carries: never cached, no
/// script, no referrer leaving with a reconnect link.
fn private(status: StatusCode, mut r: Response) -> Response {
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if status == StatusCode::UNAUTHORIZED {
        h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}
