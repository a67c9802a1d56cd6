//! Chaos scenarios at the store's edges (issue 13, items 1, 2, 3, 4, 7): the real
//! `refreshd run` binary against the sandbox provider (rotates on every use, revokes the
//! grant on reuse), a real SQLite file in a temp dir, faults made by this test (a write lock
//! held on the database, the recovery-file full-disk seam, `kill -9`, a deleted file). Each
//! scenario returns a `ChaosRow` counted against the sandbox's own record; `chaos.rs` runs
//! them and prints the table.

use crate::chaos_row::ChaosRow;
use crate::helpers;
use refreshd::clock::Clock;
use refreshd::sandbox::{Faults, Sandbox, SandboxConfig};
use refreshd::store::{Store, StoreOptions};
use secrecy::ExposeSecret;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// Seconds ago the imported grants were obtained: due now (2 h tokens, 12 min lead).
const DUE: i64 = 7_000;

/// A temp dir with a config, a store holding `n` due accounts, and a sandbox.
struct Lab {
    dir: TempDir,
    db: PathBuf,
    config: PathBuf,
    sandbox: Sandbox,
    open_ids: Vec<String>,
    env: Vec<(String, String)>,
}

/// A running `refreshd run`; killed if dropped while running.
struct Proc {
    child: Child,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Proc {
    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn term(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    /// The exit code, waiting up to `secs`; None if still running then.
    async fn exit_within(&mut self, secs: u64) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s.code().unwrap_or(-1));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    fn log(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Log lines of event `event` so far.
    fn events(&self, event: &str) -> usize {
        let field = format!("\"event\":\"{event}\"");
        let lines = self.stderr.lock().unwrap();
        lines.iter().filter(|l| l.contains(&field)).count()
    }
}

fn store_options(db: &Path) -> StoreOptions {
    helpers::sqlite_options(db, Duration::from_secs(5))
}

impl Lab {
    /// `replace` edits the generated config (pairs of from -> to).
    async fn start(n: usize, replace: &[(&str, &str)]) -> Lab {
        helpers::init_logs();
        let dir = tempfile::tempdir().expect("temp dir");
        let db = dir.path().join("refreshd.db");
        // The provider: a used refresh token coming back revokes the whole grant.
        let sandbox_config = SandboxConfig {
            revoke_on_reuse: true,
            ..SandboxConfig::default()
        };
        let sandbox = Sandbox::start(sandbox_config, Clock::system())
            .await
            .expect("sandbox");
        let mut toml =
            helpers::config_toml(&db, &sandbox.token_url(), "[log]\nformat = \"json\"\n");
        for (from, to) in replace {
            assert!(toml.contains(from), "{from:?} not in the test config");
            toml = toml.replace(from, to);
        }
        let config = dir.path().join("refreshd.toml");
        std::fs::write(&config, &toml).expect("write config");
        let parsed = refreshd::config::Config::from_toml_str(&toml).expect("config");
        let open_ids: Vec<String> = (0..n).map(|i| format!("chaos-{i:04}")).collect();
        let now = Clock::system().now();
        let text: String = open_ids
            .iter()
            .map(|o| helpers::sandbox_line(&sandbox, o, "user.info.basic", now - DUE))
            .collect();
        let store = helpers::open_store(&db, Duration::from_secs(5)).await;
        helpers::import_text(&store, &parsed, "chaos", &text, now).await;
        store.close().await;
        Lab {
            dir,
            db,
            config,
            sandbox,
            open_ids,
            env: Vec::new(),
        }
    }

    fn spawn(&self) -> Proc {
        let mut cmd = Command::new(helpers::bin());
        cmd.arg("--config")
            .arg(&self.config)
            .arg("run")
            .env_remove("REFRESHD_LOG__LEVEL")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn refreshd run");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        helpers::collect_lines(child.stderr.take().expect("stderr"), stderr.clone());
        Proc { child, stderr }
    }

    /// Requests sent to the sandbox and not answered yet.
    fn in_flight(&self) -> u64 {
        let s = self.sandbox.stats();
        s.requests.saturating_sub(
            s.refreshed
                + s.reuse_rejected
                + s.expired_rejected
                + s.revoked_rejected
                + s.unknown_rejected
                + s.client_rejected,
        )
    }

    /// Waits until the sandbox has seen no new request or answer for `quiet`.
    async fn settle(&self, quiet: Duration, max_secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(max_secs);
        let mut last = self.sandbox.stats();
        let mut since = Instant::now();
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = self.sandbox.stats();
            if now != last {
                last = now;
                since = Instant::now();
            } else if since.elapsed() >= quiet {
                return;
            }
        }
    }

    /// Accounts whose stored refresh token is the sandbox's current one.
    async fn in_sync(&self) -> usize {
        let Ok(store) = Store::open_read_only(store_options(&self.db)).await else {
            return 0;
        };
        let mut n = 0;
        for o in &self.open_ids {
            if let Ok(Some(a)) = store.find("tiktok", o).await
                && self.sandbox.current_refresh_token(o).as_deref()
                    == Some(a.refresh_token.expose_secret())
            {
                n += 1;
            }
        }
        store.close().await;
        n
    }

    /// Counts against the sandbox's record: a grant whose current refresh token the store
    /// does not hold and whose account is not flagged is dropped.
    async fn row(&self, scenario: &str, at_risk: u64, in_flight_at_kill: Option<u64>) -> ChaosRow {
        let store = Store::open_read_only(store_options(&self.db))
            .await
            .expect("open the store to count");
        let mut dropped = 0;
        let mut flagged: std::collections::BTreeMap<String, u64> = Default::default();
        for o in &self.open_ids {
            let a = store
                .find("tiktok", o)
                .await
                .expect("find")
                .expect("account");
            if let Some(r) = a.reauth_reason {
                *flagged.entry(r.as_str().to_string()).or_default() += 1;
                continue;
            }
            if self.sandbox.current_refresh_token(o).as_deref()
                != Some(a.refresh_token.expose_secret())
            {
                dropped += 1;
            }
        }
        store.close().await;
        ChaosRow {
            scenario: scenario.into(),
            at_risk,
            dropped,
            flagged: flagged.into_iter().collect(),
            reuse: self.sandbox.stats().reuse_rejected,
            in_flight_at_kill,
        }
    }

    fn slow(&self, delay: Duration) {
        self.sandbox.set_faults(Faults {
            slow: 1.0,
            slow_delay: delay,
            ..Faults::default()
        });
    }

    fn own_recovery_files(&self) -> Vec<PathBuf> {
        refreshd::store::pending_recovery_files(&self.db)
    }
}

/// A second connection holding the database's write lock until dropped.
fn lock_writes(db: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(db).expect("open for locking");
    c.busy_timeout(Duration::from_secs(10))
        .expect("busy timeout");
    c.execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");
    c
}

async fn wait_for(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

fn count(short: bool) -> usize {
    if short { 12 } else { 60 }
}

/// Item 1: two processes on one file defer rotations while a lock outlasts their wait;
/// one is killed with its rotations only in its own recovery file; the other commits its
/// own and must not remove the dead one's; the dead one's are replayed by a live process
/// (within seconds) or the next start.
pub async fn shared_store_recovery(short: bool) -> ChaosRow {
    // A few slots each, so both processes hold some of the accounts.
    let lab = Lab::start(count(short), &[("concurrency = 16", "concurrency = 4")]).await;
    lab.slow(Duration::from_millis(1500));
    let mut a = lab.spawn();
    let mut b = lab.spawn();
    // Both processes' first claims (4 slots each) in flight before the lock.
    assert!(
        wait_for(20, || lab.sandbox.stats().requests >= 8).await,
        "not both processes refreshing"
    );
    let locker = lock_writes(&lab.db);
    // Every answer arrives while the lock is held: deferred to its writer's own file.
    lab.settle(Duration::from_millis(2500), 30).await;
    let at_risk = lab.sandbox.stats().refreshed;
    let files = lab.own_recovery_files();
    assert!(
        files.len() >= 2,
        "both processes deferred into files of their own: {files:?}\nA:\n{}\nB:\n{}",
        a.log(),
        b.log()
    );
    let in_flight = lab.in_flight();
    b.kill9();
    lab.sandbox.set_faults(Faults::default());
    drop(locker);
    // A commits its own rotations and, seeing B dead, takes over B's file.
    let all = lab.open_ids.len();
    let mut synced = false;
    for _ in 0..100 {
        if lab.in_sync().await == all {
            synced = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    a.term();
    let _ = a.exit_within(20).await;
    let _ = synced;
    lab.row("shared store, kill -9 one of two", at_risk, Some(in_flight))
        .await
}

/// Item 7: `kill -9` with leases held (5 min), immediate restart: the dead process's
/// accounts are refreshed again within 10 s, not after the lease.
pub async fn dead_predecessor_leases(short: bool) -> ChaosRow {
    let lab = Lab::start(
        count(short),
        &[
            ("lease = \"30s\"", "lease = \"5m\""),
            ("concurrency = 16", "concurrency = 2"),
        ],
    )
    .await;
    lab.slow(Duration::from_millis(3000));
    let mut first = lab.spawn();
    assert!(
        wait_for(20, || lab.sandbox.stats().requests >= 2).await,
        "no refresh started"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let in_flight = lab.in_flight();
    first.kill9();
    lab.sandbox.set_faults(Faults::default());
    let restarted = Instant::now();
    let mut second = lab.spawn();
    let all = lab.open_ids.len();
    let mut done_in = None;
    while restarted.elapsed() < Duration::from_secs(10) {
        let row = lab.row("", 0, None).await;
        let flagged: u64 = row.flagged.iter().map(|(_, n)| n).sum();
        if lab.in_sync().await as u64 + flagged >= all as u64
            && lab.sandbox.stats().refreshed >= (all as u64).saturating_sub(in_flight)
        {
            done_in = Some(restarted.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        done_in.is_some(),
        "the dead process's accounts were not refreshed within 10 s of the restart; log:\n{}",
        second.log()
    );
    second.term();
    let _ = second.exit_within(20).await;
    let at_risk = lab.sandbox.stats().refreshed;
    lab.row("kill -9, immediate restart", at_risk, Some(in_flight))
        .await
}

/// Item 2: the database locked and the recovery file failing as on a full disk: no
/// refresh is sent meanwhile beyond those already in flight; SIGTERM hands the rotations
/// to the operator (`store.handoff_dir`, 0600), exits non-zero naming each account and
/// never claims they are safe; the hand-off file, put beside the database, is committed.
pub async fn full_disk_handoff(short: bool) -> ChaosRow {
    let handoff = tempfile::tempdir().expect("hand-off dir");
    let handoff_line = format!(
        "lease = \"30s\"\nhandoff_dir = {:?}",
        handoff.path().display().to_string()
    );
    // At DEBUG: each look of the loop that declines to claim logs `backpressure`.
    let mut lab = Lab::start(
        count(short),
        &[
            ("lease = \"30s\"", &handoff_line),
            ("format = \"json\"", "format = \"json\"\nlevel = \"debug\""),
        ],
    )
    .await;
    let switch = lab.dir.path().join("disk-full");
    lab.env.push((
        refreshd::store::RECOVERY_FAULT_ENV.into(),
        switch.display().to_string(),
    ));
    lab.slow(Duration::from_millis(1500));
    let mut run = lab.spawn();
    assert!(
        wait_for(20, || lab.sandbox.stats().requests >= 1).await,
        "no refresh started"
    );
    let locker = lock_writes(&lab.db);
    std::fs::write(&switch, "").expect("flip the full-disk seam");
    lab.settle(Duration::from_millis(2500), 30).await;
    let at_risk = lab.sandbox.stats().refreshed;
    let sent = lab.sandbox.stats().requests;
    // Nothing durable anywhere: the loop keeps looking (every 100 ms) and each look
    // declines to claim; no new refresh goes out meanwhile.
    let looked = run.events("backpressure");
    assert!(
        wait_for(20, || run.events("backpressure") >= looked + 5).await,
        "the loop did not hold back its claims; log:\n{}",
        run.log()
    );
    assert_eq!(
        lab.sandbox.stats().requests,
        sent,
        "refreshes sent while nothing could store their answers"
    );
    run.term();
    let code = run.exit_within(30).await;
    let log = run.log();
    assert_ne!(
        code,
        Some(0),
        "a stop with rotations nowhere durable fails; log:\n{log}"
    );
    assert!(!log.contains("safe in the recovery file"), "{log}");
    if at_risk > 0 {
        assert!(log.contains("stopped_with_rotations_not_durable"), "{log}");
    }
    let files: Vec<PathBuf> = std::fs::read_dir(handoff.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    if at_risk > 0 {
        assert_eq!(files.len(), 1, "one hand-off file: {files:?}\n{log}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&files[0]).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // The operator's step: beside the database, then start.
        let mut dest = lab.db.clone().into_os_string();
        dest.push(".recovery.handoff");
        std::fs::copy(&files[0], PathBuf::from(dest)).unwrap();
    }
    drop(locker);
    std::fs::remove_file(&switch).unwrap();
    lab.sandbox.set_faults(Faults::default());
    let mut again = lab.spawn();
    let all = lab.open_ids.len();
    for _ in 0..100 {
        if lab.in_sync().await == all {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    again.term();
    let _ = again.exit_within(20).await;
    lab.row("full disk + locked database, SIGTERM", at_risk, None)
        .await
}

/// Item 3: the database deleted under a running daemon: it stops with an error, and the
/// next `run` refuses to create an empty store where it expected one.
pub async fn vanished_store(short: bool) -> ChaosRow {
    let lab = Lab::start(count(short), &[]).await;
    let mut run = lab.spawn();
    let all = lab.open_ids.len();
    for _ in 0..200 {
        if lab.sandbox.stats().refreshed >= all as u64 && lab.in_sync().await == all {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let row = lab
        .row("store file deleted", lab.sandbox.stats().refreshed, None)
        .await;
    let saved = lab.dir.path().join("saved.db");
    std::fs::copy(&lab.db, &saved).unwrap();
    std::fs::remove_file(&lab.db).unwrap();
    let code = run.exit_within(10).await;
    let log = run.log();
    assert!(
        code.is_some_and(|c| c != 0),
        "the daemon stops with an error: {code:?}\n{log}"
    );
    assert!(log.contains("store_vanished"), "{log}");
    let mut next = lab.spawn();
    let code = next.exit_within(20).await;
    assert!(
        code.is_some_and(|c| c != 0),
        "run refuses a missing store: {code:?}"
    );
    assert!(next.log().contains("does not exist"), "{}", next.log());
    assert!(!lab.db.exists(), "no empty store created");
    row
}

/// Item 4: the database locked while answers arrive, `kill -9` 0.4 s after the last one
/// (well inside busy_timeout, 2 s here): answers went to the recovery file at once instead
/// of waiting in memory, so what is lost is at most what was in flight at the kill; the
/// restart commits the rest.
pub async fn stalled_database(short: bool) -> ChaosRow {
    let lab = Lab::start(count(short), &[]).await;
    lab.slow(Duration::from_millis(800));
    let mut run = lab.spawn();
    assert!(
        wait_for(20, || lab.sandbox.stats().requests >= 1).await,
        "no refresh started"
    );
    let locker = lock_writes(&lab.db);
    let sent = lab.sandbox.stats().requests;
    assert!(
        wait_for(20, || lab.sandbox.stats().refreshed >= sent).await,
        "answers did not arrive"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let in_flight = lab.in_flight();
    let at_risk = lab.sandbox.stats().refreshed;
    run.kill9();
    drop(locker);
    lab.sandbox.set_faults(Faults::default());
    let mut again = lab.spawn();
    let all = lab.open_ids.len();
    for _ in 0..150 {
        let row = lab.row("", 0, None).await;
        let flagged: u64 = row.flagged.iter().map(|(_, n)| n).sum();
        if lab.in_sync().await as u64 + flagged >= all as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    again.term();
    let _ = again.exit_within(20).await;
    lab.row(
        "database locked, kill -9 0.4 s after answers",
        at_risk,
        Some(in_flight),
    )
    .await
}

/// Item 9: garbage in one page: `check` (and `check --full`) names the damage and exits
/// non-zero, and `run --once` refuses the store instead of reporting success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_on_a_damaged_store_and_run_refuses_it() {
    use std::io::{Seek, SeekFrom, Write};
    let lab = Lab::start(60, &[]).await;
    let cli = |args: &[&str]| {
        let out = Command::new(helpers::bin())
            .arg("--config")
            .arg(&lab.config)
            .args(args)
            .output()
            .expect("run refreshd");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.code(), text)
    };
    let (code, text) = cli(&["check"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("quick_check ok") && text.contains("writable"),
        "{text}"
    );
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&lab.db)
        .unwrap();
    f.seek(SeekFrom::Start(4096)).unwrap();
    f.write_all(&[0xA5; 512]).unwrap();
    f.sync_all().unwrap();
    for args in [&["check"][..], &["check", "--full"][..]] {
        let (code, text) = cli(args);
        assert_ne!(code, Some(0), "{args:?}: {text}");
        assert!(
            text.contains("FAILED") && text.contains("damaged"),
            "{args:?}: {text}"
        );
    }
    let (code, text) = cli(&["run", "--once"]);
    assert_ne!(code, Some(0), "{text}");
    assert!(text.contains("is damaged"), "{text}");
    // The daemon opens it (ready before its checks end), then stops with the same error.
    let mut run = Command::new(helpers::bin());
    run.arg("--config").arg(&lab.config).arg("run");
    run.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let out = helpers::run_to_end(run, None, Duration::from_secs(30)).await;
    assert_ne!(out.code, Some(0), "{}", out.all());
    assert!(
        out.all().contains("is damaged") && out.all().contains("store_checks_failed"),
        "{}",
        out.all()
    );
}

/// Item 9: a store refreshd can read but not write: `check` says so and exits non-zero.
/// As root (who writes any file) the check runs as `nobody`; otherwise the file is 0444.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_on_a_read_only_store() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let lab = Lab::start(3, &[]).await;
    let root = refreshd::hardening::running_as_root();
    let open = |p: &Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    open(lab.dir.path(), 0o755);
    open(&lab.config, 0o644);
    open(&lab.db, if root { 0o644 } else { 0o444 });
    let mut cmd = Command::new(helpers::bin());
    cmd.arg("--config").arg(&lab.config).arg("check");
    if root {
        cmd.uid(65534).gid(65534);
    }
    let out = cmd.output().expect("run refreshd check");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("store: NOT writable"), "{text}");
}
