//! Chaos scenarios for the provider's answers (issue 13, items 5, 6, 8): the daemon's engine
//! runs in-process against the sandbox, which rotates on every use and revokes the whole
//! grant when a used refresh token comes back. The manual clock is driven forward in step
//! with real time (sped up in the short form), so lifetimes, probes and the recovery are
//! measured in clock seconds.

use crate::chaos_row::ChaosRow;
use crate::helpers::TestApp;
use refreshd::clock::Clock;
use refreshd::config::Config;
use refreshd::engine::{Engine, Settings};
use refreshd::model::Status;
use refreshd::sandbox::{Faults, SandboxConfig};
use refreshd::store::Store;
use secrecy::ExposeSecret;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The daemon's config for the scenarios: the defaults (rate limit, backoff, lease), with
/// no minimum interval so short sandbox lifetimes can be refreshed.
fn chaos_config(app: &TestApp) -> Config {
    Config::from_toml_str(&format!(
        r#"
[store]
path = {db:?}

[refresh]
min_interval = "0s"
jitter = "5s"
max_idle = "1s"

[providers.tiktok]
client_key = "{key}"
client_secret = "{secret}"
token_url = {url:?}
"#,
        db = app.db.display().to_string(),
        key = crate::helpers::CLIENT_KEY,
        secret = crate::helpers::CLIENT_SECRET,
        url = app.sandbox.token_url(),
    ))
    .expect("chaos config")
}

/// The manual clock moved forward by `speed` x real time, every 10 ms, recording the
/// sandbox's request counter per step.
struct TimeDriver {
    stop: CancellationToken,
    samples: Arc<Mutex<Vec<Sample>>>,
}

/// One step of the [`TimeDriver`].
#[derive(Clone, Copy, Debug)]
struct Sample {
    clock_ms: i64,
    /// Real ms since the driver started: the provider's rate limiter runs on real time.
    real_ms: i64,
    /// Sandbox token requests so far.
    requests: u64,
}

impl TimeDriver {
    fn start(app: &TestApp, speed: u32) -> TimeDriver {
        let stop = CancellationToken::new();
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (clock, sandbox_stats, s, st) = (
            app.clock.clone(),
            app.sandbox.stats_handle(),
            samples.clone(),
            stop.clone(),
        );
        let started = std::time::Instant::now();
        tokio::spawn(async move {
            while !st.is_cancelled() {
                tokio::time::sleep(Duration::from_millis(10)).await;
                clock.advance(Duration::from_millis(10 * speed as u64));
                let sample = Sample {
                    clock_ms: clock.now_millis(),
                    real_ms: started.elapsed().as_millis() as i64,
                    requests: sandbox_stats().requests,
                };
                s.lock().unwrap().push(sample);
            }
        });
        TimeDriver { stop, samples }
    }

    /// Waits until the clock has moved `secs` clock seconds.
    async fn run_for(clock: &Clock, secs: u64) {
        let until = clock.now_millis() + secs as i64 * 1000;
        while clock.now_millis() < until {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for TimeDriver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The engine running as the daemon runs it, until `stop`.
struct Daemon {
    stop: CancellationToken,
    metrics: Arc<refreshd::metrics::Metrics>,
    task: tokio::task::JoinHandle<()>,
    _settings: watch::Sender<Arc<Settings>>,
}

impl Daemon {
    fn start(store: &Store, clock: &Clock, config: &Config) -> Daemon {
        let (tx, rx) = watch::channel(Arc::new(Settings::new(config.clone()).unwrap()));
        let engine = Engine::new(store.clone(), clock.clone(), rx);
        let metrics = engine.metrics();
        let stop = CancellationToken::new();
        let s = stop.clone();
        let task = tokio::spawn(async move {
            engine.run(s).await.expect("engine");
        });
        Daemon {
            stop,
            metrics,
            task,
            _settings: tx,
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap();
    }
}

/// Counts the row's columns from the store and the sandbox's own record.
async fn tally(
    scenario: &str,
    app: &TestApp,
    store: &Store,
    ids: &[i64],
    subjects: &[String],
    at_risk: u64,
) -> ChaosRow {
    let mut row = ChaosRow {
        scenario: scenario.into(),
        at_risk,
        reuse: app.sandbox.stats().reuse_rejected,
        ..ChaosRow::default()
    };
    for (&id, subject) in ids.iter().zip(subjects) {
        let a = store.get(id).await.unwrap().unwrap();
        if a.status == Status::NeedsReauth {
            let reason = a.reauth_reason.map(|r| r.as_str().to_string()).unwrap();
            match row.flagged.iter_mut().find(|(r, _)| *r == reason) {
                Some((_, n)) => *n += 1,
                None => row.flagged.push((reason, 1)),
            }
        } else if app.sandbox.current_refresh_token(subject).as_deref()
            != Some(a.refresh_token.expose_secret())
        {
            row.dropped += 1;
        }
    }
    row
}

fn subjects(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("chaos-{i}")).collect()
}

/// Items 5 and 6: a share of the refreshes is answered with odd shapes (no or a numeric
/// access token, text or negative lifetimes, a strange token_type, broken fields), each
/// after the provider rotated the refresh token. Nothing may be dropped, no used token
/// presented again.
pub async fn odd_answers(short: bool) -> ChaosRow {
    let app = TestApp::start(SandboxConfig {
        access_ttl: Duration::from_secs(60),
        revoke_on_reuse: true,
        faults: Faults {
            odd_answer: 0.3,
            ..Faults::default()
        },
        ..SandboxConfig::default()
    })
    .await;
    let config = chaos_config(&app);
    let store = app.store().await;
    let subjects = subjects(20);
    let names: Vec<&str> = subjects.iter().map(String::as_str).collect();
    let ids = app.import(&store, &config, &names, None).await;
    let _time = TimeDriver::start(&app, 10);
    let daemon = Daemon::start(&store, &app.clock, &config);
    TimeDriver::run_for(&app.clock, if short { 120 } else { 900 }).await;
    daemon.stop().await;
    let at_risk = app.sandbox.stats().odd_answers;
    assert!(at_risk > 0, "the scenario made no odd answer");
    tally("odd answers (5, 6)", &app, &store, &ids, &subjects, at_risk).await
}

/// Item 8: the provider answers 503 to everything for a while (the issue's 90 s in the long
/// form). During the outage at most one request per clock second reaches it (after the
/// failures that open the circuit); after it, every access token is valid again within
/// 30 s, at the default rate limit.
pub async fn outage(short: bool) -> ChaosRow {
    // Long form: real time, the issue's 90 s. Short form: 5x, a 40 s outage.
    let (speed, ttl, outage_secs, accounts) = if short {
        (5, 30, 40, 30)
    } else {
        (1, 60, 90, 150)
    };
    let app = TestApp::start(SandboxConfig {
        access_ttl: Duration::from_secs(ttl),
        revoke_on_reuse: true,
        ..SandboxConfig::default()
    })
    .await;
    let config = chaos_config(&app);
    let store = app.store().await;
    let subjects = subjects(accounts);
    let names: Vec<&str> = subjects.iter().map(String::as_str).collect();
    let ids = app.import(&store, &config, &names, None).await;
    let time = TimeDriver::start(&app, speed);
    let daemon = Daemon::start(&store, &app.clock, &config);
    TimeDriver::run_for(&app.clock, ttl).await;

    let refreshed_before = app.sandbox.stats().refreshed;
    let outage_start = app.clock.now_millis();
    app.sandbox.set_faults(Faults {
        server_error: 1.0,
        ..Faults::default()
    });
    // The clock time the circuit opened, from the daemon's own metric.
    let mut opened_at = None;
    let until = app.clock.now_millis() + outage_secs as i64 * 1000;
    while app.clock.now_millis() < until {
        if opened_at.is_none() {
            let text = daemon
                .metrics
                .render(&store, app.clock.now(), 0)
                .await
                .unwrap();
            if text.contains("refreshd_provider_circuit_open{provider=\"tiktok\"} 1") {
                opened_at = Some(app.clock.now_millis());
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The accounts that came due during the outage: their access token has expired.
    let due: Vec<bool> = valid_now(&app, &store, &ids, &subjects)
        .await
        .iter()
        .map(|valid| !valid)
        .collect();
    let came_due = due.iter().filter(|d| **d).count();
    let provider = &config.providers["tiktok"];
    assert!(
        came_due > provider.burst as usize,
        "only {came_due} account(s) came due during the outage: the rate limit (burst {}) is not tested",
        provider.burst
    );
    app.sandbox.set_faults(Faults::default());
    let recovered_at = app.clock.now_millis();
    let at_risk = app.sandbox.stats().refreshed - refreshed_before;

    // Every stored access token valid again: how long after the recovery?
    let mut all_valid_after = None;
    while app.clock.now_millis() < recovered_at + 60_000 {
        let valid = valid_now(&app, &store, &ids, &subjects).await;
        if valid.iter().all(|v| *v) {
            all_valid_after = Some(app.clock.now_millis() - recovered_at);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // None left behind: every account that came due holds a new, valid access token.
    let left_behind = valid_now(&app, &store, &ids, &subjects)
        .await
        .iter()
        .zip(&due)
        .filter(|(valid, due)| **due && !**valid)
        .count();
    daemon.stop().await;
    let samples = time.samples.lock().unwrap().clone();
    // Requests that reached the provider while the circuit was open: one probe per
    // second at most (the samples are 10 ms of real time apart, so a bucket may see the
    // probe of a neighbour second: the total is the strict bound).
    let opened_at = opened_at.expect("the circuit opened during the outage");
    let from = opened_at + 500;
    let requests_at = |t: i64| {
        samples
            .iter()
            .find(|s| s.clock_ms >= t)
            .map_or(0, |s| s.requests)
    };
    let probes = requests_at(recovered_at) - requests_at(from);
    let open_secs = (recovered_at - from) as f64 / 1000.0;
    let mut per_second = std::collections::BTreeMap::<i64, u64>::new();
    for w in samples.windows(2) {
        let (before, s) = (w[0], w[1]);
        if s.clock_ms > from && s.clock_ms <= recovered_at {
            *per_second.entry((s.clock_ms - from) / 1000).or_default() +=
                s.requests - before.requests;
        }
    }
    // After the recovery: the herd of due accounts within the provider's rate limit.
    let after_recovery = &samples[samples
        .iter()
        .rposition(|s| s.clock_ms <= recovered_at)
        .unwrap_or(0)..];
    let herd = after_recovery.last().unwrap().requests - after_recovery[0].requests;
    let busiest = busiest_window(after_recovery, provider.rate_limit, provider.burst);
    let max_per_second = per_second.values().copied().max().unwrap_or(0);
    println!(
        "outage: {outage_secs} s at {speed}x, {accounts} accounts: circuit open {:.1} s into it; {probes} probe(s) in {open_secs:.1} s open (at most {max_per_second} in one second); every access token valid {} after the recovery; {came_due} came due, {herd} request(s) after the recovery, busiest window {} in {} real ms (limit allows {})",
        (opened_at - outage_start) as f64 / 1000.0,
        all_valid_after.map_or("NOT within 60 s".to_string(), |ms| format!(
            "{:.1} s",
            ms as f64 / 1000.0
        )),
        busiest.requests,
        busiest.real_ms,
        busiest.allowed,
    );
    assert!(
        probes as f64 <= open_secs + 1.0 && max_per_second <= 2,
        "more than one probe per second reached the provider: {per_second:?}"
    );
    assert!(
        busiest.requests <= busiest.allowed,
        "after the recovery {} requests reached the provider in {} real ms; rate_limit {}/min with burst {} allows {}",
        busiest.requests,
        busiest.real_ms,
        provider.rate_limit,
        provider.burst,
        busiest.allowed
    );
    assert_eq!(
        left_behind, 0,
        "{left_behind} of the {came_due} accounts that came due during the outage not refreshed within 60 s of the recovery"
    );
    let after = all_valid_after.expect("every access token valid again within 60 s");
    assert!(
        after <= 30_000,
        "valid again only {after} ms after the recovery"
    );
    tally(
        "provider outage (8)",
        &app,
        &store,
        &ids,
        &subjects,
        at_risk,
    )
    .await
}

/// Which stored access tokens the sandbox takes as valid now, one per account.
async fn valid_now(app: &TestApp, store: &Store, ids: &[i64], subjects: &[String]) -> Vec<bool> {
    let mut valid = Vec::with_capacity(ids.len());
    for (&id, subject) in ids.iter().zip(subjects) {
        let a = store.get(id).await.unwrap().unwrap();
        valid.push(
            app.sandbox
                .access_token_valid(subject, a.access_token.expose_secret()),
        );
    }
    valid
}

/// The requests that reached the provider in one window of real time, and how many its
/// rate limiter lets through in that long.
#[derive(Debug, PartialEq)]
struct Window {
    requests: u64,
    real_ms: i64,
    allowed: u64,
}

/// Time a request may take from the rate limiter to the sandbox's counter, beyond another's:
/// requests released apart may be counted closer together.
const LIMITER_TO_COUNTER_MS: i64 = 200;

/// The window between two samples whose requests exceed (or come nearest to) what a
/// limiter of `per_minute` with `burst` allows: at most `burst` at once plus one per
/// 60/`per_minute` s (governor's GCRA), in real time because the limiter runs on it.
fn busiest_window(samples: &[Sample], per_minute: u32, burst: u32) -> Window {
    let excess = |w: &Window| (w.requests as i64 - w.allowed as i64, w.requests);
    let mut busiest: Option<Window> = None;
    for (i, first) in samples.iter().enumerate() {
        for last in &samples[i + 1..] {
            let real_ms = last.real_ms - first.real_ms;
            let window = Window {
                requests: last.requests - first.requests,
                real_ms,
                allowed: burst as u64
                    + ((real_ms + LIMITER_TO_COUNTER_MS) as u64 * per_minute as u64) / 60_000,
            };
            if busiest.as_ref().is_none_or(|b| excess(&window) > excess(b)) {
                busiest = Some(window);
            }
        }
    }
    busiest.unwrap_or(Window {
        requests: 0,
        real_ms: 0,
        allowed: burst as u64,
    })
}

#[test]
fn busiest_window_finds_a_herd_and_passes_a_paced_stream() {
    let at = |real_ms, requests| Sample {
        clock_ms: real_ms,
        real_ms,
        requests,
    };
    // 600/min, burst 20: 20 at once then one per 100 ms holds.
    let paced: Vec<Sample> = std::iter::once(at(-10, 0))
        .chain((0..50).map(|i| at(i * 100, 20 + i as u64)))
        .collect();
    let w = busiest_window(&paced, 600, 20);
    assert!(w.requests <= w.allowed, "{w:?}");
    // 30 at once does not.
    let herd = [at(0, 0), at(10, 30)];
    assert_eq!(
        busiest_window(&herd, 600, 20),
        Window {
            requests: 30,
            real_ms: 10,
            allowed: 22
        }
    );
}
