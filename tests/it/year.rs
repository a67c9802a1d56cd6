//! A year under the simulated clock: 365 days of schedule against four sandbox providers on
//! loopback (2-hour and 1-day access tokens, each with a fixed 365-day and a sliding 180-day
//! refresh token), a six-hour provider outage and a key rotation (rekey) mid-year. The clock
//! jumps straight to the next due time, so a year runs in seconds without real sleeps.

use crate::helpers::{self, T0, import_text};
use refreshd::config::Config;
use refreshd::crypto::{Keyring, generate_key_file};
use refreshd::engine::{Engine, Settings};
use refreshd::model::Status;
use refreshd::sandbox::{Faults, Sandbox, SandboxConfig};
use refreshd::store::{self, Store, StoreError, StoreOptions};
use secrecy::ExposeSecret;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const MINUTE: i64 = 60;
const HOUR: i64 = 3_600;
const DAY: i64 = 86_400;
const END: i64 = T0 + 365 * DAY;
/// The provider answers 5xx for six hours on day 100.
const OUTAGE: (i64, i64) = (T0 + 100 * DAY + 10 * HOUR, T0 + 100 * DAY + 16 * HOUR);
/// After the outage every account is refreshed again within the longest backoff (the
/// helpers' `backoff_max`, 30 min) and one outage step.
const CATCH_UP: i64 = 30 * MINUTE + OUTAGE_STEP;
/// While the provider is down the clock moves at least this much per step (the circuit's
/// one-second probes would otherwise make a step of every second).
const OUTAGE_STEP: i64 = MINUTE;
/// The key is rotated (new primary key, `store rekey`) on day 200.
const REKEY_AT: i64 = T0 + 200 * DAY;
/// How late a refresh may be after its planned time outside the outage: the clock steps
/// to each due time exactly, so this is slack for the engine, not for the test.
const LATENESS: i64 = MINUTE;

/// One provider of the year: a sandbox with its access and refresh-token lifetimes.
struct Kind {
    provider: &'static str,
    access_ttl: i64,
    refresh_ttl: i64,
    sliding: bool,
}

const KINDS: [Kind; 4] = [
    Kind {
        provider: "tiktok",
        access_ttl: 2 * HOUR,
        refresh_ttl: 365 * DAY,
        sliding: false,
    },
    Kind {
        provider: "hours_sliding",
        access_ttl: 2 * HOUR,
        refresh_ttl: 180 * DAY,
        sliding: true,
    },
    Kind {
        provider: "day_fixed",
        access_ttl: DAY,
        refresh_ttl: 365 * DAY,
        sliding: false,
    },
    Kind {
        provider: "day_sliding",
        access_ttl: DAY,
        refresh_ttl: 180 * DAY,
        sliding: true,
    },
];
const PER_KIND: usize = 2;

/// What the test follows of one account from step to step.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Row {
    status: Status,
    next_refresh_at: i64,
    access_expires_at: i64,
    generation: i64,
    failures: i64,
}

async fn snapshot(store: &Store) -> HashMap<i64, Row> {
    let read = |c: &mut rusqlite::Connection| -> rusqlite::Result<HashMap<i64, Row>> {
        let mut stmt = c.prepare(
            "SELECT id, status, next_refresh_at, access_expires_at, generation, failures
             FROM accounts",
        )?;
        stmt.query_map([], |r| {
            let status: String = r.get(1)?;
            let row = Row {
                status: status.parse().expect("a known status"),
                next_refresh_at: r.get(2)?,
                access_expires_at: r.get(3)?,
                generation: r.get(4)?,
                failures: r.get(5)?,
            };
            Ok((r.get::<_, i64>(0)?, row))
        })?
        .collect()
    };
    store
        .call(move |c| {
            read(c).map_err(|source| StoreError::Sqlite {
                context: "year test snapshot",
                source,
            })
        })
        .await
        .expect("snapshot")
}

async fn open(db: &Path, keyring: Keyring) -> Store {
    Store::open(StoreOptions {
        keyring,
        ..helpers::sqlite_options(db, Duration::from_secs(2))
    })
    .await
    .expect("open store")
}

fn engine(store: &Store, app: &Year) -> (Engine, watch::Sender<Arc<Settings>>) {
    let settings = Arc::new(Settings::new(app.config.clone()).expect("providers"));
    let (tx, rx) = watch::channel(settings);
    (Engine::new(store.clone(), app.clock.clone(), rx), tx)
}

struct Year {
    _dir: tempfile::TempDir,
    db: PathBuf,
    clock: refreshd::clock::Clock,
    sandboxes: Vec<Sandbox>,
    config: Config,
}

async fn start() -> Year {
    helpers::init_logs();
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("refreshd.db");
    let clock = refreshd::clock::Clock::manual(T0);
    let mut sandboxes = Vec::new();
    for k in &KINDS {
        let config = SandboxConfig {
            access_ttl: Duration::from_secs(k.access_ttl as u64),
            refresh_ttl: Duration::from_secs(k.refresh_ttl as u64),
            sliding_refresh: k.sliding,
            ..SandboxConfig::default()
        };
        sandboxes.push(
            Sandbox::start(config, clock.clone())
                .await
                .expect("sandbox"),
        );
    }
    // The first kind is the helpers' `[providers.tiktok]`; the others are TikTok profiles
    // with their own sandbox, the sliding ones saying so.
    let extra: String = KINDS[1..]
        .iter()
        .zip(&sandboxes[1..])
        .map(|(k, sb)| {
            format!(
                "\n[providers.{}]\nkind = \"tiktok\"\nclient_key = {:?}\nclient_secret = {:?}\n\
                 token_url = {:?}\nrate_limit = 600000\nburst = 1000\nrefresh_ttl = {:?}\n",
                k.provider,
                helpers::CLIENT_KEY,
                helpers::CLIENT_SECRET,
                sb.token_url(),
                if k.sliding { "sliding" } else { "fixed" },
            )
        })
        .collect();
    let config = Config::from_toml_str(&helpers::config_toml(
        &db,
        &sandboxes[0].token_url(),
        &extra,
    ))
    .expect("year config");
    Year {
        _dir: dir,
        db,
        clock,
        sandboxes,
        config,
    }
}

fn key(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    generate_key_file(&p).expect("keygen");
    p
}

fn set_outage(sandboxes: &[Sandbox], down: bool) {
    for sb in sandboxes {
        sb.set_faults(Faults {
            server_error: if down { 1.0 } else { 0.0 },
            ..Faults::default()
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_year_of_refreshes_on_time_with_an_outage_and_a_key_rotation() {
    let app = start().await;
    let keys = app._dir.path();
    let (old_key, new_key) = (key(keys, "old.key"), key(keys, "new.key"));
    let mut store = open(&app.db, Keyring::load(Some(&old_key), &[]).unwrap()).await;

    // Accounts: PER_KIND of each kind, all granted and imported at T0.
    let mut kind_of: HashMap<i64, usize> = HashMap::new();
    let mut subject_of: HashMap<i64, String> = HashMap::new();
    for (i, (k, sb)) in KINDS.iter().zip(&app.sandboxes).enumerate() {
        let mut text = String::new();
        let subjects: Vec<String> = (0..PER_KIND)
            .map(|n| format!("{}-{n}", k.provider))
            .collect();
        for s in &subjects {
            let mut g = sb.grant(s, "user.info.basic", None);
            g["provider"] = k.provider.into();
            g["obtained_at"] = T0.into();
            text += &format!("{g}\n");
        }
        let ids = import_text(&store, &app.config, "year", &text, T0).await;
        for (id, s) in ids.into_iter().zip(subjects) {
            kind_of.insert(id, i);
            subject_of.insert(id, s);
        }
    }
    let window = app.config.reauth.window.as_secs() as i64;
    let backoff_max = app.config.refresh.backoff_max.as_secs() as i64;
    let (mut engine, mut _settings) = engine(&store, &app);

    let mut rows = snapshot(&store).await;
    let mut flagged_at: HashMap<i64, i64> = HashMap::new();
    let mut refreshes: HashMap<i64, u64> = HashMap::new();
    let mut retries = 0u64;
    let mut hit_by_outage: std::collections::HashSet<i64> = Default::default();
    let mut last_refresh: HashMap<i64, i64> = rows.keys().map(|&id| (id, T0)).collect();
    let mut rekeyed = false;
    let mut next_sweep = T0 + DAY;
    let mut now = T0;
    loop {
        let relaxed = (OUTAGE.0..OUTAGE.1 + CATCH_UP).contains(&now);
        let due = rows
            .values()
            .filter(|r| matches!(r.status, Status::Active | Status::Expiring))
            .map(|r| r.next_refresh_at)
            .min()
            .unwrap_or(END);
        let floor = now + if relaxed { OUTAGE_STEP } else { 1 };
        let mut next = due.max(floor);
        // Stop at each scheduled event too: outage start and end, the rotation, the sweep.
        for event in [
            OUTAGE.0,
            OUTAGE.1,
            OUTAGE.1 + CATCH_UP,
            REKEY_AT,
            next_sweep,
            END,
        ] {
            if event > now {
                next = next.min(event);
            }
        }
        if next >= END {
            break;
        }
        now = next;
        app.clock.set(now);
        if now == OUTAGE.0 {
            set_outage(&app.sandboxes, true);
        }
        if now == OUTAGE.1 {
            set_outage(&app.sandboxes, false);
        }
        if now == REKEY_AT {
            // The admin's key rotation: a new primary key, the old one kept for opening,
            // the daemon restarted on it and `store rekey` run beside it.
            drop(engine);
            store.close().await;
            store = open(
                &app.db,
                Keyring::load(Some(&new_key), std::slice::from_ref(&old_key)).unwrap(),
            )
            .await;
            (engine, _settings) = self::engine(&store, &app);
            let report = store::rekey(&store, 3, |_| {}).await.expect("rekey");
            assert_eq!((report.resealed, report.remaining), (8, 0), "{report:?}");
            rekeyed = true;
        }
        if !relaxed {
            for (id, r) in &rows {
                if r.status != Status::NeedsReauth {
                    assert!(
                        r.access_expires_at > now,
                        "{}: access token expired at {} before a refresh (now {now})",
                        subject_of[id],
                        r.access_expires_at
                    );
                }
            }
        }
        engine.run_due(CancellationToken::new()).await.unwrap();
        if now == next_sweep {
            store.sweep(now, app.config.reauth.window).await.unwrap();
            next_sweep += DAY;
        }

        let after = snapshot(&store).await;
        for (id, a) in &after {
            let (b, who) = (&rows[id], &subject_of[id]);
            let attempted = a.generation != b.generation || a.failures != b.failures;
            if attempted {
                assert!(
                    now >= b.next_refresh_at,
                    "{who}: tried at {now}, before its planned {}",
                    b.next_refresh_at
                );
                if !relaxed {
                    assert!(
                        now - b.next_refresh_at <= LATENESS,
                        "{who}: tried {}s after its planned time",
                        now - b.next_refresh_at
                    );
                }
            }
            if a.generation != b.generation {
                *refreshes.entry(*id).or_default() += 1;
                last_refresh.insert(*id, now);
            } else if a.failures > b.failures {
                // A retry during the outage: backed off, never flagged.
                retries += 1;
                hit_by_outage.insert(*id);
                assert!(
                    (OUTAGE.0..OUTAGE.1).contains(&now),
                    "{who}: failed at {now}"
                );
                let delay = a.next_refresh_at - now;
                assert!(
                    (1..=backoff_max).contains(&delay),
                    "{who}: retry in {delay}s"
                );
            }
            if !relaxed && matches!(a.status, Status::Active | Status::Expiring) {
                assert!(
                    a.next_refresh_at > now,
                    "{who}: left due at {now} (planned {})",
                    a.next_refresh_at
                );
            }
            if a.status != Status::Active {
                flagged_at.entry(*id).or_insert(now);
            }
        }
        if now == OUTAGE.1 + CATCH_UP {
            // Caught up: every account the outage hit refreshed since the provider came
            // back; none flagged.
            for (id, a) in &after {
                let who = &subject_of[id];
                if hit_by_outage.contains(id) {
                    assert!(last_refresh[id] >= OUTAGE.1, "{who}: not caught up");
                }
                assert_eq!((a.status, a.failures), (Status::Active, 0), "{who}");
                assert!(a.access_expires_at > now, "{who}");
            }
        }
        rows = after;
    }

    assert!(rekeyed);
    assert!(retries > 0, "the outage was never felt");
    // Every 2-hour account was due during the six hours.
    for (&id, &i) in &kind_of {
        if KINDS[i].access_ttl == 2 * HOUR {
            assert!(hit_by_outage.contains(&id), "{}", subject_of[&id]);
        }
    }
    for (&id, &i) in &kind_of {
        let (k, who) = (&KINDS[i], &subject_of[&id]);
        let interval = k.access_ttl - refreshed_lead(k.access_ttl);
        let n = refreshes.get(&id).copied().unwrap_or(0) as i64;
        // A year of refreshes at the lead rule's interval; the outage costs a few.
        let expected = 365 * DAY / interval;
        assert!(
            (expected - 5..=expected + 1).contains(&n),
            "{who}: {n} refreshes, expected about {expected}"
        );
        if k.sliding {
            assert_eq!(
                flagged_at.get(&id),
                None,
                "{who}: a sliding account was flagged"
            );
        } else {
            // Flagged in the window: not before it opens, by the first refresh in it, and
            // before the refresh token ends.
            let end = T0 + k.refresh_ttl;
            let at = *flagged_at
                .get(&id)
                .unwrap_or_else(|| panic!("{who}: never flagged"));
            assert!(
                at >= end - window,
                "{who}: flagged at {at}, before the window"
            );
            assert!(at <= end - window + interval, "{who}: flagged late at {at}");
            assert!(at < end, "{who}: flagged after the end");
            assert_eq!(rows[&id].status, Status::Expiring, "{who}");
        }
    }

    // No refresh token was ever presented twice, and the stored tokens (sealed under the new
    // key, readable without the old one) are each provider's current ones.
    drop(engine);
    store.close().await;
    let store = open(&app.db, Keyring::load(Some(&new_key), &[]).unwrap()).await;
    for (&id, &i) in &kind_of {
        let (sb, who) = (&app.sandboxes[i], &subject_of[&id]);
        let a = helpers::account(&store, id).await;
        assert_eq!(
            sb.current_refresh_token(who).as_deref(),
            Some(a.refresh_token.expose_secret()),
            "{who}"
        );
        assert!(
            sb.access_token_valid(who, a.access_token.expose_secret()),
            "{who}"
        );
    }
    for (k, sb) in KINDS.iter().zip(&app.sandboxes) {
        let s = sb.stats();
        assert_eq!(s.reuse_rejected, 0, "{}: {s:?}", k.provider);
        assert_eq!(
            (s.expired_rejected, s.revoked_rejected, s.unknown_rejected),
            (0, 0, 0),
            "{}: {s:?}",
            k.provider
        );
    }
}

/// The helpers' lead (`lead = 10m`, `lead_fraction = 0.1`): the larger of the two.
fn refreshed_lead(access_ttl: i64) -> i64 {
    (access_ttl / 10).max(10 * MINUTE)
}
