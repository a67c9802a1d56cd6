//! Webhook notifications (`[notify.webhook]`): one signed JSON POST per state change
//! (reauth required, with web connect's `reconnect_url`; account recovered; provider
//! credentials rejected / accepted again), never on a plain rotation and never with a token.
//! The daemon's tasks (`spawn`), or one batch sent by a command (`send_now`).
//!
//! A forwarder turns broadcast events into bodies on a bounded queue (it never waits, so a
//! slow receiver cannot slow refreshes); a deliverer POSTs them one by one, retrying
//! failures with the one exponential backoff with full jitter (`policy::backoff`).
//!
//! Signature: `X-Refreshd-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`,
//! where `<timestamp>` is the `X-Refreshd-Timestamp` header (unix seconds) and `<body>` the
//! exact bytes received. A receiver recomputes it, compares in constant time, and rejects
//! timestamps far from its own clock (replays). `X-Refreshd-Delivery` (also the body's `id`)
//! stays the same across retries, so a receiver can drop duplicates.

use crate::clock::{Clock, rfc3339};
use crate::config::{Config, WebhookConfig};
use crate::events::{Event, Events};
use hmac::{Hmac, Mac};
use rand::Rng;
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub const SIGNATURE_HEADER: &str = "X-Refreshd-Signature";
pub const TIMESTAMP_HEADER: &str = "X-Refreshd-Timestamp";
pub const EVENT_HEADER: &str = "X-Refreshd-Event";
pub const DELIVERY_HEADER: &str = "X-Refreshd-Delivery";

/// `sha256=<hex>` over `"<timestamp>.<body>"`.
pub fn signature(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in tag {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// The JSON body for a state change; None for events that are not notified.
/// `reconnect_url` (web connect's start URL for the account) goes into `reauth_required`.
pub fn body(
    event: &Event,
    id: &str,
    now: i64,
    reconnect_url: Option<String>,
) -> Option<serde_json::Value> {
    let mut v = match event {
        Event::TokensChanged { .. } => return None,
        Event::ReauthRequired {
            account_id,
            provider,
            subject,
            label,
            reason,
            refresh_expires_at,
        } => serde_json::json!({
            "account_id": account_id,
            "provider": provider,
            "subject": subject,
            "label": label,
            "reason": reason,
            "refresh_expires_at": refresh_expires_at.map(rfc3339),
            "reconnect": format!("refreshd connect {provider} --account {account_id}"),
        }),
        Event::Recovered {
            account_id,
            provider,
            subject,
        } => serde_json::json!({
            "account_id": account_id,
            "provider": provider,
            "subject": subject,
        }),
        Event::ProviderRejected { provider, error } => serde_json::json!({
            "provider": provider,
            "error": error,
        }),
        Event::ProviderRecovered { provider } => serde_json::json!({ "provider": provider }),
    };
    let obj = v.as_object_mut().expect("an object");
    if let (Event::ReauthRequired { .. }, Some(url)) = (event, reconnect_url) {
        obj.insert("reconnect_url".into(), url.into());
    }
    obj.insert("id".into(), id.into());
    obj.insert("event".into(), event.kind().into());
    obj.insert("occurred_at".into(), rfc3339(now).into());
    Some(v)
}

struct Queued {
    id: String,
    kind: &'static str,
    body: Vec<u8>,
}

/// The running webhook tasks; `stop` delivers what is queued within the grace period.
pub struct NotifyHandle {
    inner: Option<Running>,
}

struct Running {
    forwarder: tokio::task::JoinHandle<()>,
    deliverer: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
    pending: Arc<AtomicUsize>,
    grace: Duration,
    /// When the daemon's shutdown began: the grace counts from there, not from `stop`.
    shutdown_at: Arc<std::sync::OnceLock<Instant>>,
}

impl NotifyHandle {
    /// Call after the engine has stopped: events it emitted while draining are sent too.
    /// Gives up, with an error log, on what is not delivered within `grace`.
    pub async fn stop(self) {
        let Some(r) = self.inner else { return };
        r.stop.cancel();
        let _ = r.forwarder.await;
        let began = *r.shutdown_at.get_or_init(Instant::now);
        // At least a moment, so a notification emitted while draining gets one attempt.
        let left = r
            .grace
            .saturating_sub(began.elapsed())
            .max(Duration::from_millis(200));
        let mut deliverer = r.deliverer;
        if tokio::time::timeout(left, &mut deliverer).await.is_err() {
            deliverer.abort();
            tracing::error!(
                event = "webhook_undelivered",
                count = r.pending.load(Ordering::Relaxed),
                "shutdown grace period over: queued webhook notifications were not delivered"
            );
        }
    }
}

/// Starts the webhook tasks of `[notify.webhook]` (nothing when it is not set). Subscribes
/// now, so no event emitted after this call is missed. What is still queued `grace` after
/// `shutdown` is cancelled is given up by `stop`.
pub fn spawn(
    full: &Config,
    events: &Events,
    clock: Clock,
    shutdown: CancellationToken,
    grace: Duration,
) -> NotifyHandle {
    let Some(config) = full.notify.webhook.clone() else {
        return NotifyHandle { inner: None };
    };
    // What the bodies' `reconnect_url` is computed from: web connect's settings.
    let links = Arc::new(full.clone());
    let Some(secret) = config.secret.clone() else {
        // Config validation resolves secret_file into secret; this is a programming error.
        tracing::error!(
            event = "webhook_disabled",
            "notify.webhook has no secret; webhooks are off"
        );
        return NotifyHandle { inner: None };
    };
    let http = match reqwest::Client::builder()
        .user_agent(concat!("refreshd/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::none())
        .timeout(config.timeout)
        .connect_timeout(config.timeout)
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(event = "webhook_disabled", error = %e, "cannot build the webhook HTTP client; webhooks are off");
            return NotifyHandle { inner: None };
        }
    };
    let mut rx = events.subscribe();
    let (tx, queue) = mpsc::channel::<Queued>(config.queue);
    let stop = CancellationToken::new();
    let pending = Arc::new(AtomicUsize::new(0));

    let forwarder = {
        let (stop, pending, clock) = (stop.clone(), pending.clone(), clock.clone());
        tokio::spawn(async move {
            let enqueue = |ev: Event| {
                let id = delivery_id();
                let url = match &ev {
                    Event::ReauthRequired {
                        account_id,
                        provider,
                        ..
                    } => crate::connect::web_reconnect_url(&links, provider, *account_id),
                    _ => None,
                };
                let Some(body) = body(&ev, &id, clock.now(), url) else {
                    return;
                };
                let q = Queued {
                    id,
                    kind: ev.kind(),
                    body: body.to_string().into_bytes(),
                };
                match tx.try_send(q) {
                    Ok(()) => {
                        pending.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => tracing::error!(
                        event = "webhook_dropped",
                        kind = ev.kind(),
                        "webhook queue is full (receiver down or slow?): notification dropped"
                    ),
                }
            };
            loop {
                tokio::select! {
                    biased;
                    ev = rx.recv() => match ev {
                        Ok(ev) => enqueue(ev),
                        Err(RecvError::Lagged(n)) => tracing::error!(event = "webhook_lagged", missed = n,
                            "webhook forwarder fell behind: some events were not notified"),
                        Err(RecvError::Closed) => return,
                    },
                    _ = stop.cancelled() => break,
                }
            }
            // The engine has stopped: queue what it emitted while draining.
            while let Ok(ev) = rx.try_recv() {
                enqueue(ev);
            }
        })
    };
    let shutdown_at = Arc::new(std::sync::OnceLock::new());
    {
        let (shutdown_at, stop) = (shutdown_at.clone(), stop.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => { let _ = shutdown_at.set(Instant::now()); }
                _ = stop.cancelled() => {}
            }
        });
    }
    let deliverer = tokio::spawn(deliver_all(
        queue,
        http,
        Arc::new(config),
        secret,
        clock,
        pending.clone(),
    ));
    NotifyHandle {
        inner: Some(Running {
            forwarder,
            deliverer,
            stop,
            pending,
            grace,
            shutdown_at,
        }),
    }
}

/// Sends `events` from a short-lived command (`accounts import`), which has no daemon's
/// webhook tasks: delivered within `[shutdown] grace`, else given up with an error log.
pub async fn send_now(config: &Config, clock: Clock, events: Vec<Event>) {
    if config.notify.webhook.is_none() || events.is_empty() {
        return;
    }
    let bus = Events::default();
    let handle = spawn(
        config,
        &bus,
        clock,
        CancellationToken::new(),
        config.shutdown.grace,
    );
    for e in events {
        bus.emit(e);
    }
    handle.stop().await;
}

fn delivery_id() -> String {
    let n: u128 = rand::rng().random();
    format!("{n:032x}")
}

async fn deliver_all(
    mut queue: mpsc::Receiver<Queued>,
    http: reqwest::Client,
    config: Arc<WebhookConfig>,
    secret: SecretString,
    clock: Clock,
    pending: Arc<AtomicUsize>,
) {
    while let Some(q) = queue.recv().await {
        deliver(&http, &config, &secret, &clock, &q).await;
        pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Sends one notification, retrying transient failures with backoff.
async fn deliver(
    http: &reqwest::Client,
    config: &WebhookConfig,
    secret: &SecretString,
    clock: &Clock,
    q: &Queued,
) {
    let started = Instant::now();
    for attempt in 0..=config.retries {
        let ts = clock.now();
        let sig = signature(secret.expose_secret().as_bytes(), ts, &q.body);
        let res = http
            .post(&config.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(TIMESTAMP_HEADER, ts.to_string())
            .header(SIGNATURE_HEADER, sig)
            .header(EVENT_HEADER, q.kind)
            .header(DELIVERY_HEADER, &q.id)
            .body(q.body.clone())
            .send()
            .await;
        let (retry, why) = match res {
            Ok(r) if r.status().is_success() => {
                tracing::info!(event = "webhook_delivered", kind = q.kind, delivery = %q.id,
                    attempts = attempt + 1, duration_ms = started.elapsed().as_millis() as u64,
                    "webhook notification delivered");
                return;
            }
            Ok(r) => {
                let s = r.status();
                let retry = s.is_server_error()
                    || s == reqwest::StatusCode::TOO_MANY_REQUESTS
                    || s == reqwest::StatusCode::REQUEST_TIMEOUT;
                (retry, format!("HTTP {s}"))
            }
            // Without the URL: it may carry a token of the receiver's in its query.
            Err(e) => (true, e.without_url().to_string()),
        };
        if !retry {
            tracing::error!(event = "webhook_failed", kind = q.kind, delivery = %q.id, error = %why,
                "webhook receiver refused the notification; not retried (check the receiver and notify.webhook.secret)");
            return;
        }
        if attempt == config.retries {
            tracing::error!(event = "webhook_failed", kind = q.kind, delivery = %q.id, error = %why,
                attempts = attempt + 1, "webhook notification given up after its retries");
            return;
        }
        let delay = crate::policy::backoff(
            attempt + 1,
            config.backoff_base,
            config.backoff_max,
            None,
            &mut rand::rng(),
        );
        tracing::warn!(event = "webhook_retry", kind = q.kind, delivery = %q.id, error = %why,
            retry_in_ms = delay.as_millis() as u64, "webhook delivery failed; retrying");
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        // From `printf '1700000000.{}' | openssl dgst -sha256 -hmac Jefe`.
        let s = signature(b"Jefe", 1700000000, b"{}");
        assert_eq!(
            s,
            "sha256=d3793e2b4103edfbd98cc19591832f5fad701d413db9fcae0ae7dab8184ed207"
        );
        assert_ne!(s, signature(b"Jefe", 1700000001, b"{}"));
        assert_ne!(s, signature(b"jefe", 1700000000, b"{}"));
    }

    #[test]
    fn rotations_are_not_notified_and_bodies_carry_no_token() {
        let e = Event::TokensChanged {
            account_id: 1,
            provider: "tiktok".into(),
            subject: "u".into(),
        };
        assert!(body(&e, "id", 0, None).is_none());
        let e = Event::ReauthRequired {
            account_id: 1,
            provider: "tiktok".into(),
            subject: "u".into(),
            label: Some("Shop".into()),
            reason: "invalid_grant".into(),
            refresh_expires_at: Some(0),
        };
        let b = body(&e, "abc", 0, None).unwrap();
        assert_eq!(b["event"], "reauth_required");
        assert_eq!(b["id"], "abc");
        assert_eq!(b["refresh_expires_at"], "1970-01-01T00:00:00Z");
        assert_eq!(b["reconnect"], "refreshd connect tiktok --account 1");
        assert!(b.get("access_token").is_none());
        assert!(
            b.get("reconnect_url").is_none(),
            "absent without web connect"
        );
        let url = "https://r.example/connect/tiktok/start?account=1";
        let b = body(&e, "abc", 0, Some(url.into())).unwrap();
        assert_eq!(b["reconnect_url"], url);
        let e = Event::Recovered {
            account_id: 1,
            provider: "tiktok".into(),
            subject: "u".into(),
        };
        let b = body(&e, "abc", 0, Some(url.into())).unwrap();
        assert_eq!(b["event"], "account_recovered");
        assert!(b.get("reconnect_url").is_none());
    }
}
