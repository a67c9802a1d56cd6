//! The one-shot loopback callback of `refreshd connect`: a small axum server on the
//! redirect URI's address that waits for the browser's one request to the redirect path
//! (anything else gets a 404), checks its `state`, hands the code over, answers the
//! browser with the outcome, and stops.

use super::page::html_page;
use super::{ConnectError, redirect_uri, state_matches};
use crate::config::ProviderConfig;
use axum::Router;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::{Html, IntoResponse, Response};
use secrecy::{ExposeSecret, SecretString};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// How long the last answer may take to reach the browser once the outcome is known.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// The loopback listener `refreshd connect` waits on for exactly one callback.
pub struct CallbackListener {
    listener: TcpListener,
    path: String,
}

/// The browser's request waiting for its page; answer it once the outcome is known.
pub struct CallbackReply {
    page: oneshot::Sender<Response>,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<()>,
}

/// What the callback carried: the code and the granted scopes, or why not.
pub type CallbackResult = Result<(SecretString, Option<String>), ConnectError>;

/// Checks a redirect URI is on loopback and returns it parsed.
pub fn loopback_redirect(name: &str, p: &ProviderConfig) -> Result<url::Url, ConnectError> {
    let raw = redirect_uri(name, p)?;
    let url = crate::config::check_redirect_uri(raw).map_err(|message| ConnectError::Invalid {
        what: "redirect_uri",
        message,
    })?;
    let loopback = url.scheme() == "http"
        && match url.host() {
            Some(url::Host::Ipv4(a)) => a.is_loopback(),
            Some(url::Host::Ipv6(a)) => a.is_loopback(),
            Some(url::Host::Domain(d)) => d == "localhost",
            None => false,
        };
    if !loopback {
        return Err(ConnectError::NotLoopback {
            provider: name.to_string(),
            uri: raw.to_string(),
        });
    }
    Ok(url)
}

/// What the server's handler shares: the redirect path, the state to expect, and the one
/// slot the first callback takes.
struct Shared {
    path: String,
    expected_state: String,
    slot: Mutex<Option<oneshot::Sender<Arrival>>>,
}

/// The callback's outcome, and where its page goes once the caller knows the answer.
type Arrival = (CallbackResult, oneshot::Sender<Response>);

impl CallbackListener {
    /// Binds the redirect URI's host and port (port 80 when none is given).
    pub async fn bind(redirect: &url::Url) -> Result<CallbackListener, ConnectError> {
        let host = match redirect.host() {
            Some(url::Host::Domain(_)) => "127.0.0.1".to_string(),
            Some(url::Host::Ipv6(a)) => format!("[{a}]"),
            Some(h) => h.to_string(),
            None => "127.0.0.1".to_string(),
        };
        let addr = format!("{host}:{}", redirect.port_or_known_default().unwrap_or(80));
        let listener = TcpListener::bind(&addr)
            .await
            .map_err(|source| ConnectError::Bind { addr, source })?;
        Ok(CallbackListener {
            listener,
            path: redirect.path().to_string(),
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until the first GET of the redirect path, answering anything else with 404.
    /// Checks `state` in constant time and turns `error` into `Denied`. The code and the
    /// granted scopes come back with the browser's request still open; answer it with
    /// [`CallbackReply::respond`].
    pub async fn accept(
        self,
        expected_state: &str,
        timeout: Duration,
    ) -> Result<(CallbackReply, CallbackResult), ConnectError> {
        let (arrived, callback) = oneshot::channel();
        let shared = Arc::new(Shared {
            path: self.path,
            expected_state: expected_state.to_string(),
            slot: Mutex::new(Some(arrived)),
        });
        let app = Router::new().fallback(handle).with_state(shared);
        let stop = CancellationToken::new();
        let server = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let _ = axum::serve(self.listener, app)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await;
            })
        };
        match tokio::time::timeout(timeout, callback).await {
            Ok(Ok((result, page))) => Ok((CallbackReply { page, stop, server }, result)),
            Ok(Err(_)) | Err(_) => {
                stop.cancel();
                server.abort();
                Err(ConnectError::Timeout(timeout))
            }
        }
    }
}

impl CallbackReply {
    /// Answers the browser with a short HTML page, then stops the server once the page is
    /// sent (or after [`ANSWER_TIMEOUT`]).
    pub async fn respond(self, ok: bool, message: &str) {
        let status = if ok {
            StatusCode::OK
        } else {
            StatusCode::BAD_REQUEST
        };
        let _ = self.page.send(answer(status, message));
        self.stop.cancel();
        let mut server = self.server;
        if tokio::time::timeout(ANSWER_TIMEOUT, &mut server)
            .await
            .is_err()
        {
            server.abort();
        }
    }
}

/// Every request: the first GET of the redirect path is the callback; the rest get a 404.
async fn handle(State(shared): State<Arc<Shared>>, method: Method, uri: Uri) -> Response {
    if method != Method::GET || uri.path() != shared.path {
        return answer(StatusCode::NOT_FOUND, "Not found.");
    }
    let taken = shared.slot.lock().unwrap_or_else(|e| e.into_inner()).take();
    let Some(arrived) = taken else {
        // One code is accepted; a second callback finds the door closing.
        return answer(StatusCode::NOT_FOUND, "Not found.");
    };
    let result = parse_callback(uri.query().unwrap_or(""), &shared.expected_state);
    let (page, reply) = oneshot::channel();
    if arrived.send((result, page)).is_err() {
        return answer(StatusCode::SERVICE_UNAVAILABLE, "refreshd stopped waiting.");
    }
    reply.await.unwrap_or_else(|_| {
        answer(
            StatusCode::INTERNAL_SERVER_ERROR,
            "refreshd stopped before it could answer.",
        )
    })
}

/// A page that is never cached, on a connection closed after it.
fn answer(status: StatusCode, message: &str) -> Response {
    let mut r = (status, Html(html_page("refreshd", message))).into_response();
    let headers = r.headers_mut();
    headers.insert(header::CACHE_CONTROL, "no-store".parse().expect("valid"));
    headers.insert(header::CONNECTION, "close".parse().expect("valid"));
    r
}

/// Parses a callback query: checks the state, then `error` or `code` (+ `scopes`).
pub fn parse_callback(
    query: &str,
    expected_state: &str,
) -> Result<(SecretString, Option<String>), ConnectError> {
    let mut code = None;
    let mut state = None;
    let mut scopes = None;
    let mut error = None;
    let mut description = None;
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "code" => code = Some(SecretString::from(v.into_owned())),
            "state" => state = Some(v.into_owned()),
            "scopes" | "scope" => scopes = Some(v.into_owned()),
            "error" => error = Some(v.into_owned()),
            "error_description" => description = Some(v.into_owned()),
            _ => {}
        }
    }
    if !state.is_some_and(|s| state_matches(expected_state, &s)) {
        return Err(ConnectError::StateMismatch);
    }
    if let Some(error) = error {
        return Err(ConnectError::Denied {
            error: clip(&error, 80),
            description: description.map(|d| clip(&d, 300)),
        });
    }
    let code = code
        .filter(|c| !c.expose_secret().is_empty())
        .ok_or(ConnectError::NoCode)?;
    Ok((code, scopes))
}

fn clip(s: &str, n: usize) -> String {
    s.chars().filter(|c| !c.is_control()).take(n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connect::tests::provider;

    #[test]
    fn loopback_redirect_required_for_connect() {
        let c = provider("redirect_uri = \"https://app.example.com/cb\"");
        let e = loopback_redirect("tiktok", &c.providers["tiktok"]).unwrap_err();
        assert!(e.to_string().contains("[connect] enabled = true"), "{e}");
        let c = provider("redirect_uri = \"http://localhost:8788/callback\"");
        assert!(loopback_redirect("tiktok", &c.providers["tiktok"]).is_ok());
    }

    #[test]
    fn callback_parsing() {
        let (code, scopes) = parse_callback("code=abc&scopes=a%2Cb&state=S", "S").unwrap();
        assert_eq!(code.expose_secret(), "abc");
        assert_eq!(scopes.as_deref(), Some("a,b"));
        assert!(matches!(
            parse_callback("code=abc&state=T", "S"),
            Err(ConnectError::StateMismatch)
        ));
        assert!(matches!(
            parse_callback("code=abc", "S"),
            Err(ConnectError::StateMismatch)
        ));
        let e = parse_callback(
            "error=access_denied&error_description=User+said+no&state=S",
            "S",
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "the provider refused the authorization: access_denied: User said no"
        );
        assert!(matches!(
            parse_callback("state=S", "S"),
            Err(ConnectError::NoCode)
        ));
    }

    #[tokio::test]
    async fn listener_skips_other_paths_and_answers_the_callback() {
        let redirect = url::Url::parse("http://127.0.0.1:0/callback").unwrap();
        let l = CallbackListener::bind(&redirect).await.unwrap();
        let addr = l.local_addr().unwrap();
        let browser = tokio::spawn(async move {
            // A connection that sends nothing must not hold the one callback slot.
            let _idle = tokio::net::TcpStream::connect(addr).await.unwrap();
            let http = reqwest::Client::builder().no_proxy().build().unwrap();
            let get = |path: &'static str| {
                let http = http.clone();
                async move {
                    let r = http
                        .get(format!("http://{addr}{path}"))
                        .send()
                        .await
                        .unwrap();
                    let no_store = r.headers()[reqwest::header::CACHE_CONTROL] == "no-store";
                    (r.status().as_u16(), no_store, r.text().await.unwrap())
                }
            };
            let favicon = get("/favicon.ico").await;
            let page = get("/callback?code=c1&scopes=a&state=S").await;
            (favicon, page)
        });
        let (reply, result) = l.accept("S", Duration::from_secs(10)).await.unwrap();
        let (code, scopes) = result.unwrap();
        assert_eq!(code.expose_secret(), "c1");
        assert_eq!(scopes.as_deref(), Some("a"));
        reply.respond(true, "Connected <you>.").await;
        let (favicon, page) = browser.await.unwrap();
        assert_eq!(favicon.0, 404, "{favicon:?}");
        assert_eq!((page.0, page.1), (200, true), "{page:?}");
        assert!(page.2.contains("Connected &lt;you&gt;."), "{page:?}");
    }

    #[tokio::test]
    async fn a_refused_callback_is_answered_400_and_the_server_stops() {
        let redirect = url::Url::parse("http://127.0.0.1:0/cb").unwrap();
        let l = CallbackListener::bind(&redirect).await.unwrap();
        let addr = l.local_addr().unwrap();
        let browser = tokio::spawn(async move {
            let r = reqwest::get(format!("http://{addr}/cb?code=c1&state=forged"))
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        });
        let (reply, result) = l.accept("S", Duration::from_secs(10)).await.unwrap();
        let e = result.err().unwrap();
        assert!(matches!(e, ConnectError::StateMismatch), "{e}");
        reply.respond(false, &format!("Not connected: {e}")).await;
        let (status, page) = browser.await.unwrap();
        assert_eq!(status, 400);
        assert!(
            page.contains("Not connected: the callback&#x27;s state"),
            "{page}"
        );
        // One callback, then the port is closed.
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn listener_times_out() {
        let redirect = url::Url::parse("http://127.0.0.1:0/callback").unwrap();
        let l = CallbackListener::bind(&redirect).await.unwrap();
        let e = l
            .accept("S", Duration::from_millis(50))
            .await
            .err()
            .unwrap();
        assert!(
            e.to_string()
                .contains("no authorization arrived within 50ms"),
            "{e}"
        );
    }
}
