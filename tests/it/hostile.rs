//! Hostile provider answers: a catalogue of broken, oversized, slow, misleading and
//! redirecting responses from a hand-written loopback server (wiremock cannot reset a
//! connection mid-body or drip forever). Each case runs the real refresh path
//! (`lifecycle::run` with `once`) for a victim account on the hostile provider and a normal
//! account on the sandbox: the victim gets a classified outcome and a clear recorded error,
//! keeps its stored tokens, and the normal account is still refreshed. Real waiting is
//! bounded by a 600 ms request timeout (the slow-drip case). Only the cases that test a
//! timeout run with tight ones: in every other case the answer alone decides the class,
//! however late a loaded machine schedules the server.

use crate::helpers::{self, CLIENT_KEY, CLIENT_SECRET, TestApp};
use refreshd::config::Config;
use refreshd::lifecycle::{self, RunOptions};
use refreshd::model::{ReauthReason, Status};
use refreshd::sandbox::SandboxConfig;
use secrecy::ExposeSecret;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
enum Answer {
    /// These bytes, then close.
    Raw(Vec<u8>),
    /// A 200 with a Content-Length of 10 MiB, and that many bytes.
    Huge,
    /// Headers, then one byte every 50 ms, forever.
    Drip,
    /// Headers promising 1000 bytes, 10 of them, then a TCP reset.
    ResetMidBody,
    /// Headers, then silence with the connection open.
    Stall,
}

fn http(status: &str, headers: &[(&str, &str)], body: &str) -> Answer {
    let mut s = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        s.push_str(&format!("{k}: {v}\r\n"));
    }
    s.push_str("Connection: close\r\n\r\n");
    s.push_str(body);
    Answer::Raw(s.into_bytes())
}

fn json(body: &str) -> Answer {
    http("200 OK", &[("Content-Type", "application/json")], body)
}

/// Reads one request (headers and a Content-Length body) so the client sees a server that
/// listened before it answered.
async fn read_request(s: &mut TcpStream) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let Ok(n) = s.read(&mut chunk).await else {
            return;
        };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        // A TLS ClientHello (record type 22): a plain-HTTP server answers it at once.
        if buf[0] == 0x16 {
            return;
        }
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return;
            }
        }
    }
}

async fn serve_one(mut s: TcpStream, answer: Answer) {
    read_request(&mut s).await;
    match answer {
        Answer::Raw(bytes) => {
            let _ = s.write_all(&bytes).await;
            let _ = s.shutdown().await;
        }
        Answer::Huge => {
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                10 << 20
            );
            let _ = s.write_all(head.as_bytes()).await;
            let block = vec![b' '; 64 << 10];
            for _ in 0..160 {
                if s.write_all(&block).await.is_err() {
                    return; // the client hung up at its cap
                }
            }
        }
        Answer::Drip => {
            let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n{";
            let _ = s.write_all(head.as_bytes()).await;
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if s.write_all(b" ").await.is_err() {
                    return;
                }
            }
        }
        Answer::Stall => {
            let head =
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{";
            let _ = s.write_all(head.as_bytes()).await;
            // Never another byte: the client's read timeout must end it.
            std::future::pending::<()>().await;
        }
        Answer::ResetMidBody => {
            let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"access_t";
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.flush().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = s.set_zero_linger();
            drop(s); // linger 0: RST instead of FIN
        }
    }
}

/// A loopback server giving `answer` to every connection; returns its address and a hit
/// counter.
async fn hostile_server(answer: Answer) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            h.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve_one(s, answer.clone()));
        }
    });
    (addr, hits)
}

/// The expected result for the victim account.
enum Expect {
    /// Retried later; `min_delay` seconds at least (Retry-After).
    Transient {
        min_delay: i64,
    },
    ConfigError,
    Rejected(ReauthReason),
}

struct Case {
    name: &'static str,
    answer: Answer,
    https: bool,
    expect: Expect,
    /// Must appear in the recorded error.
    error_has: &'static str,
    /// Bounds on the recorded duration, in ms: which timeout ended the request.
    duration_ms: std::ops::Range<i64>,
    /// The client's timeouts are the tight ones (600 ms total, 150 ms read, 400 ms
    /// connect): only for the cases that test a timeout.
    tight_timeouts: bool,
}

fn case(name: &'static str, answer: Answer, expect: Expect, error_has: &'static str) -> Case {
    Case {
        name,
        answer,
        https: false,
        expect,
        error_has,
        duration_ms: 0..i64::MAX,
        tight_timeouts: false,
    }
}

const T: Expect = Expect::Transient { min_delay: 0 };

fn catalogue(redirect_to: &str) -> Vec<Case> {
    let soon = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(300));
    let soon: &'static str = Box::leak(soon.into_boxed_str());
    let location: &'static str = Box::leak(redirect_to.to_string().into_boxed_str());
    let html = "<html><body><h1>Bad Gateway</h1></body></html>";
    vec![
        case(
            "malformed JSON",
            json(r#"{"access_token": "act.x", "#),
            T,
            "not a JSON object",
        ),
        case(
            "HTML page with 200",
            http("200 OK", &[("Content-Type", "text/html")], html),
            T,
            "text/html",
        ),
        case(
            "HTML page with 502",
            http("502 Bad Gateway", &[("Content-Type", "text/html")], html),
            T,
            "HTTP 502",
        ),
        case("empty body", json(""), T, "empty body"),
        case("10 MiB body", Answer::Huge, T, "max_response_bytes"),
        // Bytes every 50 ms defeat the 150 ms read timeout: the 600 ms total one ends it.
        Case {
            duration_ms: 550..5000,
            tight_timeouts: true,
            ..case("slow drip, never ends", Answer::Drip, T, "timed out")
        },
        Case {
            duration_ms: 100..550,
            tight_timeouts: true,
            ..case("stalls after the headers", Answer::Stall, T, "timed out")
        },
        case(
            "missing access_token",
            json(r#"{"expires_in":7200,"token_type":"Bearer"}"#),
            T,
            "access_token",
        ),
        case(
            "missing expires_in",
            json(r#"{"access_token":"act.h1","token_type":"Bearer"}"#),
            T,
            "expires_in",
        ),
        case(
            "negative expires_in",
            json(r#"{"access_token":"act.h2","expires_in":-5,"token_type":"Bearer"}"#),
            T,
            "expires_in",
        ),
        case(
            "absurd expires_in",
            json(r#"{"access_token":"act.h3","expires_in":99999999999,"token_type":"Bearer"}"#),
            T,
            "expires_in",
        ),
        case(
            "expires_in as a word",
            json(r#"{"access_token":"act.h4","expires_in":"soon","token_type":"Bearer"}"#),
            T,
            "expires_in",
        ),
        case(
            "unknown token_type",
            json(r#"{"access_token":"act.h5","expires_in":7200,"token_type":"MAC"}"#),
            T,
            "token_type",
        ),
        case(
            "another user's open_id",
            json(
                r#"{"access_token":"act.h6","expires_in":7200,"refresh_token":"rft.h6","open_id":"someone-else","token_type":"Bearer"}"#,
            ),
            Expect::Rejected(ReauthReason::SubjectMismatch),
            "someone-else",
        ),
        case(
            "200 with an error object",
            json(
                r#"{"data":{},"error":{"code":"invalid_grant","message":"expired","log_id":"L1"}}"#,
            ),
            Expect::Rejected(ReauthReason::InvalidGrant),
            "invalid_grant",
        ),
        case(
            "429 with Retry-After seconds",
            http("429 Too Many Requests", &[("Retry-After", "900")], ""),
            Expect::Transient { min_delay: 900 },
            "HTTP 429",
        ),
        case(
            "429 with Retry-After date",
            http("429 Too Many Requests", &[("Retry-After", soon)], ""),
            Expect::Transient { min_delay: 240 },
            "HTTP 429",
        ),
        case(
            "429 without Retry-After",
            http("429 Too Many Requests", &[], ""),
            T,
            "HTTP 429",
        ),
        case(
            "302 redirect",
            http("302 Found", &[("Location", location)], ""),
            Expect::ConfigError,
            "redirect",
        ),
        case(
            "connection reset mid-body",
            Answer::ResetMidBody,
            T,
            "response body",
        ),
        // The TLS handshake fails on the plain answer. reqwest's read timeout runs from the
        // request's start, handshake included, and wins over an error already there when
        // the client is polled late: with 150 ms, a loaded machine recorded "timed out".
        Case {
            https: true,
            ..case(
                "plain HTTP on an https URL",
                json(r#"{"access_token":"act.h7","expires_in":7200,"token_type":"Bearer"}"#),
                T,
                "connection failed",
            )
        },
    ]
}

/// The test config with the hostile provider; `tight`: timeouts short enough to test them
/// (else the helper's: 5 s total, 2 s connect).
fn config(app: &TestApp, hostile_url: &str, tight: bool) -> Config {
    let extra = format!(
        r#"
[providers.hostile]
kind = "tiktok"
client_key = "{CLIENT_KEY}"
client_secret = "{CLIENT_SECRET}"
token_url = {hostile_url:?}
"#
    );
    let mut text = helpers::config_toml(&app.db, &app.sandbox.token_url(), &extra);
    if tight {
        text = text
            .replace(
                "request_timeout = \"5s\"",
                "request_timeout = \"600ms\"\nread_timeout = \"150ms\"",
            )
            .replace("connect_timeout = \"2s\"", "connect_timeout = \"400ms\"");
    }
    Config::from_toml_str(&text).expect("hostile test config")
}

/// Runs one case; returns a description of what went wrong, if anything.
async fn run_case(c: Case, redirect_hits: &AtomicUsize) -> Result<(), String> {
    let app = TestApp::start(SandboxConfig::default()).await;
    let (addr, hits) = hostile_server(c.answer.clone()).await;
    let scheme = if c.https { "https" } else { "http" };
    let cfg = config(
        &app,
        &format!("{scheme}://{addr}/v2/oauth/token/"),
        c.tight_timeouts,
    );
    let store = app.store().await;
    let normal = app.import(&store, &cfg, &["normal"], None).await[0];
    let mut line: serde_json::Value =
        serde_json::from_str(&app.grant_line("victim", None)).unwrap();
    line["provider"] = "hostile".into();
    let now = app.clock.now();
    let records = refreshd::import::parse(
        "test",
        &line.to_string(),
        now,
        &cfg.refresh.timing(),
        cfg.reauth.window,
        |p| cfg.providers.contains_key(p),
    )
    .map_err(|e| e.to_string())?;
    let victim = store.upsert(records, now).await.unwrap()[0].0;
    let before = store.get(victim).await.unwrap().unwrap();
    let normal_before = store.get(normal).await.unwrap().unwrap();
    store.close().await;
    app.clock
        .set(before.next_refresh_at.max(normal_before.next_refresh_at));
    let at = app.clock.now();

    let report = lifecycle::run(
        cfg.clone(),
        RunOptions {
            once: true,
            ..RunOptions::new(app.clock.clone())
        },
        CancellationToken::new(),
    )
    .await
    .map_err(|e| format!("run failed: {e}"))?;

    let store = app.store().await;
    let after = store.get(victim).await.unwrap().unwrap();
    let normal_after = store.get(normal).await.unwrap().unwrap();
    let log = store.log_entries(victim, 1).await.unwrap();
    store.close().await;
    let mut problems = Vec::new();
    if hits.load(Ordering::SeqCst) != 1 {
        problems.push(format!(
            "{} requests to the hostile server, expected 1",
            hits.load(Ordering::SeqCst)
        ));
    }
    if after.access_token.expose_secret() != before.access_token.expose_secret()
        || after.refresh_token.expose_secret() != before.refresh_token.expose_secret()
    {
        problems.push("stored tokens changed".into());
    }
    if after.generation != before.generation {
        problems.push("generation moved".into());
    }
    if normal_after.generation != normal_before.generation + 1 {
        problems.push(format!("the normal account was not refreshed: {report:?}"));
    }
    let error = after.last_error.clone().unwrap_or_default();
    if !error.contains(c.error_has) {
        problems.push(format!("recorded error {error:?} lacks {:?}", c.error_has));
    }
    let outcome = log.first().map(|l| l.outcome.clone()).unwrap_or_default();
    let took = log.first().and_then(|l| l.duration_ms).unwrap_or(-1);
    if !c.duration_ms.contains(&took) {
        problems.push(format!("took {took} ms, expected {:?}", c.duration_ms));
    }
    match c.expect {
        Expect::Transient { min_delay } => {
            if after.status != Status::Active || after.failures != 1 || outcome != "transient" {
                problems.push(format!(
                    "expected transient: status {}, failures {}, outcome {outcome}",
                    after.status, after.failures
                ));
            }
            if after.next_refresh_at < at + min_delay.max(1) {
                problems.push(format!(
                    "retried after {} s, expected at least {min_delay}",
                    after.next_refresh_at - at
                ));
            }
        }
        Expect::ConfigError => {
            if after.status != Status::Active || outcome != "config_error" {
                problems.push(format!(
                    "expected config_error: status {}, outcome {outcome}",
                    after.status
                ));
            }
            if redirect_hits.load(Ordering::SeqCst) != 0 {
                problems.push("the redirect was followed".into());
            }
        }
        Expect::Rejected(reason) => {
            if after.status != Status::NeedsReauth || after.reauth_reason != Some(reason) {
                problems.push(format!(
                    "expected needs_reauth ({reason:?}): status {}, reason {:?}",
                    after.status, after.reauth_reason
                ));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_provider_answers_are_classified_and_harmless() {
    // Where the 302 points: must never be asked.
    let (target, redirect_hits) = hostile_server(json(
        r#"{"access_token":"act.REDIRECTED","expires_in":7200,"refresh_token":"rft.REDIRECTED","token_type":"Bearer"}"#,
    ))
    .await;
    let cases = catalogue(&format!("http://{target}/v2/oauth/token/"));
    assert!(cases.len() >= 20);
    let mut failures = Vec::new();
    for c in cases {
        let name = c.name;
        // A panic anywhere in the daemon would surface here as a failed case.
        if let Err(e) = run_case(c, &redirect_hits).await {
            failures.push(format!("{name}: {e}"));
        }
    }
    assert!(
        failures.is_empty(),
        "failed cases:\n{}",
        failures.join("\n")
    );
}
