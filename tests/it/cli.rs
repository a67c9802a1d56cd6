//! The real `refreshd` binary, driven as an operator would: a config file in a temp dir, a
//! real SQLite file, and the sandbox provider (in this test process, on loopback, on the
//! system clock) as the token endpoint. Accounts are imported already due (`obtained_at` in
//! the past) so nothing waits for real time to pass.

use crate::helpers::{self, CLIENT_SECRET, Out};
use refreshd::clock::Clock;
use refreshd::sandbox::{Faults, Sandbox, SandboxConfig};
use refreshd::store::{Store, StoreOptions};
use secrecy::ExposeSecret;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// Seconds ago the grants of "due" accounts were obtained. The sandbox's access tokens live
/// 2 h and the lead is 12 min (10 % of 2 h), so these are due now.
const DUE: i64 = 7_000;
/// Longest any single CLI invocation may take.
const CLI_TIMEOUT: Duration = Duration::from_secs(20);

impl Out {
    #[track_caller]
    fn ok(&self) -> &Self {
        assert_eq!(self.code, Some(0), "expected success: {self:#?}");
        self
    }
}

fn now() -> i64 {
    Clock::system().now()
}

/// A temp dir with a config file and a database path, and a sandbox on the system clock.
struct World {
    dir: TempDir,
    db: PathBuf,
    config: PathBuf,
    sandbox: Sandbox,
    /// Extra environment for every child process.
    env: Vec<(String, String)>,
    /// Every byte any child process printed, stdout and stderr.
    transcript: Mutex<String>,
    /// Every token the sandbox issued through `grant`.
    issued: Mutex<Vec<String>>,
}

impl World {
    async fn start(extra_config: &str) -> World {
        helpers::init_logs();
        let dir = tempfile::tempdir().expect("temp dir");
        let db = dir.path().join("refreshd.db");
        let sandbox = Sandbox::start(SandboxConfig::default(), Clock::system())
            .await
            .expect("sandbox");
        let config = dir.path().join("refreshd.toml");
        std::fs::write(
            &config,
            helpers::config_toml(&db, &sandbox.token_url(), extra_config),
        )
        .expect("write config");
        World {
            dir,
            db,
            config,
            sandbox,
            env: Vec::new(),
            transcript: Mutex::new(String::new()),
            issued: Mutex::new(Vec::new()),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, text).expect("write file");
        p
    }

    /// The test config, with `from` replaced by `to` (which must change something).
    fn config_with(&self, from: &str, to: &str) -> String {
        let base = helpers::config_toml(&self.db, &self.sandbox.token_url(), "");
        assert!(base.contains(from), "{from:?} not in the test config");
        base.replace(from, to)
    }

    /// One import line: a fresh sandbox grant of `open_id` obtained `ago` seconds ago.
    fn grant(&self, open_id: &str, ago: i64, refresh_ttl: Option<Duration>) -> Value {
        let mut g = self
            .sandbox
            .grant(open_id, "user.info.basic,video.list", refresh_ttl);
        let mut issued = self.issued.lock().unwrap();
        issued.push(g["access_token"].as_str().unwrap().to_string());
        issued.push(g["refresh_token"].as_str().unwrap().to_string());
        g["provider"] = "tiktok".into();
        g["label"] = format!("label of {open_id}").into();
        g["obtained_at"] = (now() - ago).into();
        g
    }

    /// Import text for due grants of `open_ids`.
    fn due_lines(&self, open_ids: &[&str]) -> String {
        open_ids
            .iter()
            .map(|o| self.grant(o, DUE, None).to_string() + "\n")
            .collect()
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(helpers::bin());
        // The world's config unless the arguments name another one.
        if !args.contains(&"--config") {
            cmd.arg("--config").arg(&self.config);
        }
        cmd.args(args);
        clean_env(&mut cmd);
        cmd.env("REFRESHD_LOG__FORMAT", "json")
            .env("REFRESHD_LOG__LEVEL", "trace");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.current_dir(self.dir.path());
        cmd
    }

    async fn cli(&self, args: &[&str]) -> Out {
        self.run(self.command(args), None).await
    }

    async fn cli_stdin(&self, args: &[&str], stdin: &str) -> Out {
        self.run(self.command(args), Some(stdin)).await
    }

    async fn cli_env(&self, args: &[&str], env: &[(&str, &str)]) -> Out {
        let mut cmd = self.command(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.run(cmd, None).await
    }

    async fn run(&self, mut cmd: Command, stdin: Option<&str>) -> Out {
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let out = output(cmd, stdin.map(str::to_string)).await;
        self.transcript.lock().unwrap().push_str(&out.all());
        out
    }

    /// `accounts list --json`, parsed.
    async fn list_json(&self) -> Vec<Value> {
        let out = self.cli(&["accounts", "list", "--json"]).await;
        out.ok();
        out.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
            .collect()
    }

    async fn store(&self) -> Store {
        assert!(self.db.exists(), "the database should exist by now");
        helpers::open_store(&self.db, Duration::from_secs(5)).await
    }

    async fn store_with_key(&self, key: &Path) -> Store {
        Store::open(StoreOptions {
            path: self.db.clone(),
            busy_timeout: Duration::from_secs(5),
            keyring: refreshd::crypto::Keyring::load(Some(key), &[]).expect("key"),
            postgres: None,
        })
        .await
        .expect("open store")
    }

    /// Starts `refreshd run` (the daemon) with stdout and stderr collected line by line.
    fn daemon(&self) -> Daemon {
        let mut cmd = self.command(&["run"]);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn refreshd run");
        let pid = child.id();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            helpers::collect_lines(child.stderr.take().expect("stderr"), stderr.clone()),
            helpers::collect_lines(child.stdout.take().expect("stdout"), stdout.clone()),
        ];
        Daemon {
            child,
            pid,
            stderr,
            stdout,
            readers,
        }
    }
}

/// Removes what the developer's environment could inject into the child: `REFRESHD_*`,
/// `RUST_LOG`, systemd's notification variables. PATH, HOME and the rest stay.
fn clean_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        let name = k.to_string_lossy();
        if name.starts_with("REFRESHD_")
            || name == "RUST_LOG"
            || name == "NOTIFY_SOCKET"
            || name.starts_with("WATCHDOG_")
        {
            cmd.env_remove(&k);
        }
    }
}

/// Runs `cmd` to the end, feeding it `stdin`; kills it after `CLI_TIMEOUT`.
async fn output(cmd: Command, stdin: Option<String>) -> Out {
    helpers::run_to_end(cmd, stdin, CLI_TIMEOUT).await
}

/// A running `refreshd run`; killed if dropped while running (a failed test).
struct Daemon {
    child: Child,
    pid: u32,
    stderr: Arc<Mutex<Vec<String>>>,
    stdout: Arc<Mutex<Vec<String>>>,
    readers: Vec<JoinHandle<()>>,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The JSON log lines of `lines` whose `event` is `name`.
fn events_in(lines: &[String], name: &str) -> Vec<Value> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"] == name)
        .collect()
}

impl Daemon {
    fn events(&self, name: &str) -> Vec<Value> {
        events_in(&self.stderr.lock().unwrap(), name)
    }

    /// Waits (polling every 20 ms) until `f` holds, or panics with the log after `secs`.
    async fn wait_until(&mut self, secs: u64, what: &str, mut f: impl FnMut(&Daemon) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if f(self) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // One last look: the condition may have come with the exit.
                tokio::time::sleep(Duration::from_millis(20)).await;
                if f(self) {
                    return;
                }
                panic!(
                    "refreshd exited ({status}) before {what}; log:\n{}",
                    self.stderr.lock().unwrap().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "timed out waiting for {what}; log:\n{}",
            self.stderr.lock().unwrap().join("\n")
        );
    }

    async fn wait_event(&mut self, name: &str, secs: u64) -> Value {
        let what = format!("event {name:?}");
        self.wait_until(secs, &what, |d| !d.events(name).is_empty())
            .await;
        self.events(name).remove(0)
    }

    async fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([format!("-{sig}"), self.pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} {} failed", self.pid);
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the exit; returns the exit code, the stderr lines and the stdout lines.
    async fn finish(mut self, within: Duration) -> (Option<i32>, Vec<String>, Vec<String>) {
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait for refreshd") {
                break s;
            }
            if Instant::now() > deadline {
                panic!(
                    "refreshd did not exit within {within:?}; log:\n{}",
                    self.stderr.lock().unwrap().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // The pipes close with the process: the readers end by themselves.
        let readers: Vec<_> = self.readers.drain(..).collect();
        let _ = tokio::task::spawn_blocking(move || {
            for r in readers {
                let _ = r.join();
            }
        })
        .await;
        let stderr = self.stderr.lock().unwrap().clone();
        let stdout = self.stdout.lock().unwrap().clone();
        (status.code(), stderr, stdout)
    }
}

fn subjects(list: &[Value]) -> Vec<String> {
    let mut v: Vec<String> = list
        .iter()
        .map(|a| a["subject"].as_str().expect("subject").to_string())
        .collect();
    v.sort();
    v
}

fn id_of(list: &[Value], subject: &str) -> i64 {
    list.iter()
        .find(|a| a["subject"] == subject)
        .unwrap_or_else(|| panic!("{subject} not listed in {list:?}"))["id"]
        .as_i64()
        .expect("id")
}

/// The stored refresh token of every account, by subject.
async fn stored_refresh_tokens(store: &Store, list: &[Value]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for a in list {
        let id = a["id"].as_i64().unwrap();
        let acc = store.get(id).await.unwrap().expect("listed account exists");
        out.push((acc.subject, acc.refresh_token.expose_secret().to_string()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_all_or_nothing_with_line_numbers() {
    let w = World::start("").await;
    let bad_text = format!(
        "{}{{\"provider\":\"tiktok\",\"access_token\": oops\n{}{}{}",
        w.due_lines(&["a1"]),
        w.due_lines(&["a3"]),
        w.due_lines(&["a4"]),
        w.grant("a5", DUE, None)
            .to_string()
            .replace("\"provider\":\"tiktok\"", "\"provider\":\"myspace\"")
            + "\n",
    );
    let bad = w.write("bad.jsonl", &bad_text);
    let bad_arg = bad.to_str().unwrap();

    // Nothing exists yet: the rejected file must not even create the database.
    let out = w.cli(&["accounts", "import", bad_arg]).await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(out.stderr.contains(bad_arg), "names the file: {out:#?}");
    assert!(out.stderr.contains("line 2"), "{out:#?}");
    assert!(out.stderr.contains("not a valid import record"), "{out:#?}");
    assert!(out.stderr.contains("line 5"), "{out:#?}");
    assert!(
        out.stderr.contains("\"myspace\" is not configured"),
        "{out:#?}"
    );
    assert!(out.stderr.contains("nothing imported"), "{out:#?}");
    for good in ["line 1:", "line 3:", "line 4:"] {
        assert!(!out.stderr.contains(good), "{good} is fine: {out:#?}");
    }
    assert!(!out.stdout.contains("imported"), "{out:#?}");
    let out = w.cli(&["accounts", "list", "--json"]).await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(out.stderr.contains("does not exist"), "{out:#?}");
    assert!(!w.db.exists(), "a rejected import created the database");

    // A good file, twice: new accounts, then updates.
    let good = w.write("good.jsonl", &w.due_lines(&["b1", "b2", "b3"]));
    let good_arg = good.to_str().unwrap();
    let out = w.cli(&["accounts", "import", good_arg]).await;
    out.ok();
    assert!(
        out.stdout.contains(&format!(
            "imported 3 account(s) from {good_arg}: 3 new, 0 updated"
        )),
        "{out:#?}"
    );
    // The database holds tokens: created readable by its owner only.
    {
        use std::os::unix::fs::PermissionsExt;
        for f in ["refreshd.db", "refreshd.db-wal", "refreshd.db-shm"] {
            if let Ok(md) = std::fs::metadata(w.path(f)) {
                let mode = md.permissions().mode() & 0o777;
                assert_eq!(mode & 0o077, 0, "{f} has mode {mode:o}");
            }
        }
    }
    let out = w.cli(&["accounts", "import", good_arg]).await;
    out.ok();
    assert!(
        out.stdout.contains("imported 3 account(s)") && out.stdout.contains("0 new, 3 updated"),
        "{out:#?}"
    );

    // The bad file again, now that the database exists: still nothing of it is written.
    let out = w.cli(&["accounts", "import", bad_arg]).await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert_eq!(subjects(&w.list_json().await), ["b1", "b2", "b3"]);

    // From stdin.
    let out = w
        .cli_stdin(&["accounts", "import", "-"], &w.due_lines(&["c1", "c2"]))
        .await;
    out.ok();
    assert!(
        out.stdout
            .contains("imported 2 account(s) from stdin: 2 new, 0 updated"),
        "{out:#?}"
    );
    // A bad line from stdin is named as coming from stdin.
    let out = w
        .cli_stdin(
            &["accounts", "import", "-"],
            "\n{\"provider\":\"tiktok\"}\n",
        )
        .await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(
        out.stderr.contains("stdin") && out.stderr.contains("line 2"),
        "{out:#?}"
    );
    assert_eq!(
        subjects(&w.list_json().await),
        ["b1", "b2", "b3", "c1", "c2"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_errors_name_key_and_source() {
    let w = World::start("").await;

    // An unknown key in the file: named with file and line, exit 78 (EX_CONFIG).
    let text = w.config_with("lead = \"10m\"", "leed = \"5m\"");
    let line = text
        .lines()
        .position(|l| l.starts_with("leed"))
        .expect("leed line")
        + 1;
    let bad = w.write("typo.toml", &text);
    let bad_arg = bad.to_str().unwrap();
    for args in [
        &["--config", bad_arg, "accounts", "list"][..],
        &["--config", bad_arg, "run", "--once"][..],
    ] {
        let out = w.cli(args).await;
        assert_eq!(out.code, Some(78), "{args:?}: {out:#?}");
        assert!(out.stderr.contains("refresh.leed"), "{out:#?}");
        assert!(
            out.stderr.contains(&format!("{bad_arg}:{line}")),
            "names {bad_arg}:{line}: {out:#?}"
        );
        assert!(out.stderr.contains("unknown key"), "{out:#?}");
    }
    assert!(!w.db.exists(), "a bad config created the database");

    // A config file that is not there.
    let missing = w.path("missing.toml");
    let out = w
        .cli(&["--config", missing.to_str().unwrap(), "accounts", "list"])
        .await;
    assert_eq!(out.code, Some(78), "{out:#?}");
    assert!(out.stderr.contains(missing.to_str().unwrap()), "{out:#?}");

    // A bad duration from the environment: named with the variable.
    let out = w
        .cli_env(&["run", "--once"], &[("REFRESHD_REFRESH__LEAD", "ten")])
        .await;
    assert_eq!(out.code, Some(78), "{out:#?}");
    assert!(out.stderr.contains("refresh.lead"), "{out:#?}");
    assert!(out.stderr.contains("REFRESHD_REFRESH__LEAD"), "{out:#?}");

    // `check` with a good config.
    let out = w.cli(&["check"]).await;
    out.ok();
    let config = w.config.to_str().unwrap();
    assert!(
        out.stdout.contains(&format!("config: ok ({config})")),
        "{out:#?}"
    );
    assert!(
        out.stdout.contains(&format!(
            "provider tiktok: ok, enabled, kind tiktok, token endpoint {}",
            w.sandbox.token_url()
        )),
        "{out:#?}"
    );
    assert!(out.stdout.contains("store: "), "{out:#?}");

    // `check` names a provider whose refresh-token end nobody gives (issue 18), and a
    // reauth window that swallows a configured lifetime; both are warnings, not failures.
    let own = format!(
        "{}\n[providers.own]\nkind = \"generic\"\nclient_id = \"id\"\nclient_secret = \"s\"\ntoken_url = \"https://auth.example/token\"\nrefresh_ttl = \"fixed\"\n[providers.short]\nkind = \"generic\"\nclient_id = \"id\"\nclient_secret = \"s\"\ntoken_url = \"https://auth.example/token\"\nrefresh_ttl = \"sliding\"\nrefresh_token_lifetime = \"3d\"\n",
        std::fs::read_to_string(&w.config).unwrap()
    );
    let cfg = w.write("own.toml", &own);
    let out = w.cli(&["--config", cfg.to_str().unwrap(), "check"]).await;
    out.ok();
    assert!(
        out.stdout
            .contains("warning: providers.own: refresh_ttl says the refresh token ends"),
        "{out:#?}"
    );
    assert!(
        out.stdout.contains("`expiring` flag cannot work"),
        "{out:#?}"
    );
    assert!(
        out.stdout
            .contains("warning: providers.short: reauth.window (7days) is more than half"),
        "{out:#?}"
    );

    // `check` with a client secret file that is not there.
    let missing = w.path("no-such-secret");
    let text = w.config_with(
        &format!("client_secret = \"{CLIENT_SECRET}\""),
        &format!("client_secret_file = {:?}", missing.display().to_string()),
    );
    let cfg = w.write("nosecret.toml", &text);
    let out = w.cli(&["--config", cfg.to_str().unwrap(), "check"]).await;
    assert_eq!(out.code, Some(78), "{out:#?}");
    assert!(
        out.all().contains("providers.tiktok.client_secret_file"),
        "{out:#?}"
    );
    assert!(
        out.all().contains(missing.to_str().unwrap()),
        "names the missing file: {out:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_list_show_refresh_remove() {
    let w = World::start("").await;

    // A missing database: a clear error naming it, and it is not created.
    let out = w.cli(&["accounts", "list"]).await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(
        out.stderr.contains(w.db.to_str().unwrap()) && out.stderr.contains("does not exist"),
        "{out:#?}"
    );
    assert!(!w.db.exists(), "`accounts list` created the database");

    let text = w.due_lines(&["u1", "u2", "u3"])
        + &w.grant("u4", 0, Some(Duration::from_secs(86_400)))
            .to_string()
        + "\n";
    let f = w.write("accounts.jsonl", &text);
    let out = w.cli(&["accounts", "import", f.to_str().unwrap()]).await;
    out.ok();
    assert!(
        out.stderr.contains("already need re-authorization"),
        "{out:#?}"
    );
    let list = w.list_json().await;
    assert_eq!(list.len(), 4, "{list:?}");
    for a in &list {
        assert!(a["id"].is_i64(), "{a}");
        assert_eq!(a["provider"], "tiktok", "{a}");
        assert!(a["subject"].is_string(), "{a}");
        assert!(a["status"].is_string(), "{a}");
        assert!(a.get("access_token").is_none() && a.get("refresh_token").is_none());
    }
    let (u1, u4) = (id_of(&list, "u1"), id_of(&list, "u4"));
    let status = |s: &str| list.iter().find(|a| a["subject"] == s).unwrap()["status"].clone();
    assert_eq!(status("u1"), "active");
    assert_eq!(status("u4"), "expiring");

    // The table: a header, one row per account starting with its id.
    let out = w.cli(&["accounts", "list"]).await;
    out.ok();
    let mut lines = out.stdout.lines();
    let header = lines.next().expect("header");
    for col in ["ID", "PROVIDER", "SUBJECT", "STATUS", "REFRESH EXPIRES"] {
        assert!(header.contains(col), "{header}");
    }
    let mut ids: Vec<i64> = lines
        .map(|l| l.split_whitespace().next().unwrap().parse().expect("id"))
        .collect();
    ids.sort();
    let mut want: Vec<i64> = list.iter().map(|a| a["id"].as_i64().unwrap()).collect();
    want.sort();
    assert_eq!(ids, want, "{out:#?}");
    assert!(out.stderr.contains("4 account(s)"), "{out:#?}");
    assert!(out.stdout.contains("label of u1"), "{out:#?}");

    // --needs-reauth: only the account whose refresh token ends within the window.
    let out = w
        .cli(&["accounts", "list", "--needs-reauth", "--json"])
        .await;
    out.ok();
    let flagged: Vec<Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(subjects(&flagged), ["u4"], "{out:#?}");
    assert_eq!(flagged[0]["reauth_reason"], "refresh_token_expiring");
    let out = w
        .cli(&["accounts", "list", "--status", "expiring", "--json"])
        .await;
    out.ok();
    assert_eq!(out.stdout.lines().count(), 1, "{out:#?}");

    // A refresh gives u1..u3 a second refresh_log entry.
    let out = w.cli(&["run", "--once"]).await;
    out.ok();
    let out = w.cli(&["accounts", "show", &u1.to_string()]).await;
    out.ok();
    assert!(
        out.stdout.starts_with(&format!("account {u1}\n")),
        "{out:#?}"
    );
    for want in [
        "subject            u1",
        "label of u1",
        "status             active",
        "refresh log (newest first):",
        "rotated",
        "imported",
    ] {
        assert!(out.stdout.contains(want), "{want}: {out:#?}");
    }
    assert!(
        out.stdout.find("rotated") < out.stdout.find("imported"),
        "newest first: {out:#?}"
    );
    let out = w
        .cli(&["accounts", "show", &u1.to_string(), "--json"])
        .await;
    out.ok();
    let v: Value = serde_json::from_str(&out.stdout).expect("show --json is JSON");
    assert_eq!(v["id"], u1);
    assert_eq!(v["subject"], "u1");
    assert_eq!(v["status"], "active");
    assert_eq!(v["generation"], 1, "{v}");
    let log: Vec<&str> = v["refresh_log"]
        .as_array()
        .expect("refresh_log")
        .iter()
        .map(|e| e["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(log, ["rotated", "imported"], "{v}");
    assert_eq!(v["refresh_log"][0]["http_status"], 200, "{v}");

    // An unknown id.
    for args in [
        &["accounts", "show", "999"][..],
        &["accounts", "show", "999", "--json"][..],
        &["accounts", "refresh", "999"][..],
        &["accounts", "remove", "999"][..],
    ] {
        let out = w.cli(args).await;
        assert_eq!(out.code, Some(1), "{args:?}: {out:#?}");
        assert!(out.stderr.contains("999"), "{args:?}: {out:#?}");
        assert!(out.stdout.is_empty(), "{args:?}: {out:#?}");
    }

    // `accounts refresh`: due now.
    let store = w.store().await;
    let before = store.get(u1).await.unwrap().unwrap().next_refresh_at;
    store.close().await;
    assert!(
        before > now() + 3600,
        "u1 was refreshed: next refresh is later"
    );
    let out = w.cli(&["accounts", "refresh", &u1.to_string()]).await;
    out.ok();
    assert!(
        out.stdout
            .contains(&format!("account {u1} (active) is due now")),
        "{out:#?}"
    );
    let store = w.store().await;
    let after = store.get(u1).await.unwrap().unwrap().next_refresh_at;
    store.close().await;
    assert!(after <= now(), "due now: {after} vs {}", now());

    // `accounts remove`, then `show` fails.
    let out = w.cli(&["accounts", "remove", &u4.to_string()]).await;
    out.ok();
    assert!(
        out.stdout
            .contains(&format!("removed account {u4} (tiktok/u4)")),
        "{out:#?}"
    );
    let out = w.cli(&["accounts", "show", &u4.to_string()]).await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(
        out.stderr.contains(&format!("no account with id {u4}")),
        "{out:#?}"
    );
    assert_eq!(subjects(&w.list_json().await), ["u1", "u2", "u3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_once_refreshes_due_and_exit_code() {
    let w = World::start("").await;
    let good = ["g1", "g2", "g3", "g4"];
    let mut text = w.due_lines(&good);
    text += &w.due_lines(&["revoked"]);
    w.sandbox.revoke("revoked");
    let f = w.write("accounts.jsonl", &text);
    w.cli(&["accounts", "import", f.to_str().unwrap()])
        .await
        .ok();

    let out = w.cli(&["run", "--once"]).await;
    assert_eq!(out.code, Some(3), "an account newly needs reauth: {out:#?}");
    assert!(
        out.stderr
            .contains("1 account(s) newly need re-authorization"),
        "{out:#?}"
    );
    let done = events_in(
        &out.stderr.lines().map(String::from).collect::<Vec<_>>(),
        "run_once_done",
    );
    assert_eq!(done.len(), 1, "{out:#?}");
    assert_eq!(done[0]["rotated"], 4, "{}", done[0]);
    assert_eq!(done[0]["newly_flagged"], 1, "{}", done[0]);
    let flagged = events_in(
        &out.stderr.lines().map(String::from).collect::<Vec<_>>(),
        "reauth_required",
    );
    assert_eq!(flagged.len(), 1, "{out:#?}");
    let reconnect = format!(
        "refreshd connect tiktok --account {}",
        flagged[0]["account"]
    );
    assert_eq!(
        flagged[0]["reconnect"],
        reconnect.as_str(),
        "{}",
        flagged[0]
    );
    let stats = w.sandbox.stats();
    assert_eq!(stats.refreshed, 4, "{stats:?}");
    assert_eq!(stats.revoked_rejected, 1, "{stats:?}");
    assert_eq!(stats.reuse_rejected, 0, "{stats:?}");

    let list = w.list_json().await;
    let store = w.store().await;
    for (subject, token) in stored_refresh_tokens(&store, &list).await {
        assert_eq!(
            Some(token),
            w.sandbox.current_refresh_token(&subject),
            "{subject} holds the sandbox's current refresh token"
        );
    }
    for g in good {
        let acc = store.get(id_of(&list, g)).await.unwrap().unwrap();
        assert!(
            w.sandbox
                .access_token_valid(g, acc.access_token.expose_secret()),
            "{g} holds a working access token"
        );
    }
    store.close().await;
    for a in &list {
        let want = if a["subject"] == "revoked" {
            "needs_reauth"
        } else {
            "active"
        };
        assert_eq!(a["status"], want, "{a}");
    }
    let revoked = list.iter().find(|a| a["subject"] == "revoked").unwrap();
    assert_eq!(revoked["reauth_reason"], "invalid_grant", "{revoked}");

    let rid = revoked["id"].to_string();
    let out = w.cli(&["accounts", "show", &rid]).await;
    out.ok();
    assert!(
        out.stdout.contains("status             needs_reauth")
            && out
                .stdout
                .contains("reauth reason      invalid_grant (flagged ")
            && out.stdout.contains("Authorization has been revoked")
            && out.stdout.contains(&format!(
                "to re-authorize    refreshd connect tiktok --account {rid}"
            )),
        "{out:#?}"
    );

    // Nothing due, nothing newly flagged: exit 0, and the provider is not asked again.
    let out = w.cli(&["run", "--once"]).await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert_eq!(w.sandbox.stats().requests, 5);

    // A flagged account is not made due without --force; with it, it is tried once more
    // and, still revoked, flagged again: exit 3 again.
    let out = w.cli(&["accounts", "refresh", &rid]).await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(out.stderr.contains("--force"), "{out:#?}");
    let out = w.cli(&["accounts", "refresh", &rid, "--force"]).await;
    out.ok();
    assert!(
        out.stdout
            .contains(&format!("account {rid} (needs_reauth) is due now")),
        "{out:#?}"
    );
    let out = w.cli(&["run", "--once"]).await;
    assert_eq!(out.code, Some(3), "{out:#?}");
    assert_eq!(w.sandbox.stats().requests, 6);
    assert_eq!(w.sandbox.stats().revoked_rejected, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_and_exits_zero() {
    let w = World::start("\n[shutdown]\ngrace = \"10s\"\n").await;
    w.sandbox.set_faults(Faults {
        slow: 1.0,
        slow_delay: Duration::from_millis(500),
        ..Faults::default()
    });
    let names: Vec<String> = (0..50).map(|i| format!("user-{i:02}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let f = w.write("accounts.jsonl", &w.due_lines(&refs));
    w.cli(&["accounts", "import", f.to_str().unwrap()])
        .await
        .ok();

    let mut d = w.daemon();
    d.wait_event("ready", 10).await;
    let sandbox = &w.sandbox;
    d.wait_until(10, "a request in flight", |_| sandbox.stats().requests > 0)
        .await;
    let signalled = Instant::now();
    d.signal("TERM").await;
    let (code, log, _) = d.finish(Duration::from_secs(10)).await;
    let took = signalled.elapsed();
    let log_text = log.join("\n");
    assert_eq!(code, Some(0), "exit code after SIGTERM; log:\n{log_text}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    for event in ["signal", "stopping", "draining", "stopped"] {
        assert!(
            !events_in(&log, event).is_empty(),
            "no {event:?} event in the log:\n{log_text}"
        );
    }
    assert!(events_in(&log, "drain_timeout").is_empty(), "{log_text}");

    // Nothing lost: an in-flight refresh was recorded, a never-sent one kept its token.
    let stats = w.sandbox.stats();
    assert_eq!(stats.reuse_rejected, 0, "{stats:?}");
    assert!(
        stats.refreshed > 0,
        "in-flight refreshes finished: {stats:?}"
    );
    assert!(
        stats.refreshed < 50,
        "it stopped claiming after SIGTERM: {stats:?}"
    );
    let list = w.list_json().await;
    assert_eq!(list.len(), 50);
    let store = w.store().await;
    let mut rotated = 0;
    for (subject, token) in stored_refresh_tokens(&store, &list).await {
        assert_eq!(
            Some(token),
            w.sandbox.current_refresh_token(&subject),
            "{subject}: the stored refresh token is the sandbox's current one"
        );
        let acc = store.get(id_of(&list, &subject)).await.unwrap().unwrap();
        if acc.generation > 0 {
            rotated += 1;
        }
    }
    store.close().await;
    assert_eq!(
        rotated, stats.refreshed,
        "every rotation the sandbox made is stored"
    );
    for a in &list {
        assert_eq!(a["status"], "active", "{a}");
    }
    let stopped = &events_in(&log, "stopped")[0];
    assert_eq!(stopped["rotated"], stats.refreshed, "{stopped}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_config() {
    let w = World::start("").await;
    // The CLI keeps a valid config of its own while the daemon's file is rewritten.
    let cli_config = w.write(
        "cli.toml",
        &helpers::config_toml(&w.db, &w.sandbox.token_url(), ""),
    );
    let f = w.write("one.jsonl", &w.due_lines(&["before"]));
    w.cli(&["accounts", "import", f.to_str().unwrap()])
        .await
        .ok();

    let mut d = w.daemon();
    d.wait_event("ready", 10).await;
    let sandbox = &w.sandbox;
    d.wait_until(10, "the first refresh", |_| sandbox.stats().refreshed == 1)
        .await;

    // Nothing changed: reloaded, but nothing to apply.
    d.signal("HUP").await;
    d.wait_event("config_reloaded", 10).await;
    assert_eq!(d.events("config_reloaded")[0]["changed"], "");

    std::fs::write(&w.config, w.config_with("lead = \"10m\"", "lead = \"5m\"")).unwrap();
    d.signal("HUP").await;
    d.wait_until(10, "a second config_reloaded", |d| {
        d.events("config_reloaded").len() >= 2
    })
    .await;
    let reloaded = d.events("config_reloaded").remove(1);
    let changed = reloaded["changed"].as_str().expect("changed");
    assert!(
        changed.split(',').any(|c| c == "refresh"),
        "changed = {changed:?}"
    );
    assert!(!changed.contains("providers"), "changed = {changed:?}");

    // An invalid config is rejected; the daemon keeps running on the old one.
    std::fs::write(&w.config, w.config_with("lead = \"10m\"", "leed = \"5m\"")).unwrap();
    d.signal("HUP").await;
    let rejected = d.wait_event("reload_rejected", 10).await;
    assert!(
        rejected["error"]
            .as_str()
            .is_some_and(|e| e.contains("refresh.leed")),
        "{rejected}"
    );
    assert_eq!(rejected["level"], "ERROR", "{rejected}");
    assert!(d.running(), "the daemon stopped on a bad reload");

    // ... and keeps working: a newly imported due account is refreshed.
    let f = w.write("two.jsonl", &w.due_lines(&["after"]));
    let out = w
        .cli(&[
            "--config",
            cli_config.to_str().unwrap(),
            "accounts",
            "import",
            f.to_str().unwrap(),
        ])
        .await;
    out.ok();
    d.wait_until(10, "the refresh after the rejected reload", |_| {
        sandbox.stats().refreshed == 2
    })
    .await;
    assert!(d.running());

    d.signal("TERM").await;
    let (code, log, _) = d.finish(Duration::from_secs(10)).await;
    assert_eq!(code, Some(0), "log:\n{}", log.join("\n"));
    assert!(!events_in(&log, "stopped").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_secret_in_any_output() {
    let mut w = World::start("").await;
    // Everything at trace level, the CLI's quiet commands too.
    w.env.push(("RUST_LOG".into(), "trace".into()));
    // Tokens sealed at rest: the key must never be printed either.
    let key = w.path("token.key");
    refreshd::crypto::generate_key_file(&key).unwrap();
    let with_key = w.config_with(
        "[store]\n",
        &format!(
            "[store]\nencryption_key_file = {:?}\n",
            key.display().to_string()
        ),
    );
    std::fs::write(&w.config, &with_key).unwrap();
    let subjects_all = ["s1", "s2", "s3", "s4", "s5", "gone"];
    let f = w.write("accounts.jsonl", &w.due_lines(&subjects_all[..4]));
    w.cli(&["accounts", "import", f.to_str().unwrap()])
        .await
        .ok();
    w.cli_stdin(
        &["accounts", "import", "-"],
        &w.due_lines(&subjects_all[4..]),
    )
    .await
    .ok();
    // Rejected lines holding real tokens: every way a line can be wrong.
    let bad = [
        w.grant("x1", DUE, None)
            .to_string()
            .replace("\"provider\":\"tiktok\"", "\"provider\":\"nope\""),
        {
            let mut g = w.grant("x2", DUE, None);
            g["expires_in"] = g["refresh_token"].clone();
            g.to_string()
        },
        {
            let mut g = w.grant("x3", DUE, None);
            g["scopes"] = g["access_token"].clone();
            g.to_string()
        },
        {
            let s = w.grant("x4", DUE, None).to_string();
            s[..s.len() - 40].to_string()
        },
        {
            let mut g = w.grant("x5", DUE, None);
            g["refresh_token"] = serde_json::json!([g["refresh_token"].clone()]);
            g.to_string()
        },
        w.due_lines(&["x6"]).trim().to_string(),
    ]
    .join("\n");
    let badf = w.write("bad.jsonl", &bad);
    let out = w.cli(&["accounts", "import", badf.to_str().unwrap()]).await;
    assert_eq!(out.code, Some(1), "{out:#?}");

    let list = w.list_json().await;
    let ids: Vec<String> = list.iter().map(|a| a["id"].to_string()).collect();
    w.cli(&["check"]).await.ok();

    // All 5xx first (transient failures logged), then successes and a revoked grant.
    w.sandbox.revoke("gone");
    w.sandbox.set_faults(Faults {
        server_error: 1.0,
        ..Faults::default()
    });
    let out = w.cli(&["run", "--once"]).await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert_eq!(w.sandbox.stats().faults_injected, 6);
    w.sandbox.set_faults(Faults::default());
    for id in &ids {
        w.cli(&["accounts", "refresh", id]).await.ok();
    }
    let out = w.cli(&["run", "--once"]).await;
    assert_eq!(out.code, Some(3), "{out:#?}");
    assert_eq!(w.sandbox.stats().refreshed, 5, "{}", out.stderr);

    // The daemon, with a few more due accounts, stopped by SIGTERM.
    let f = w.write("more.jsonl", &w.due_lines(&["d1", "d2", "d3"]));
    w.cli(&["accounts", "import", f.to_str().unwrap()])
        .await
        .ok();
    let mut d = w.daemon();
    let sandbox = &w.sandbox;
    d.wait_until(10, "three more refreshes", |_| {
        sandbox.stats().refreshed == 8
    })
    .await;
    // A reload (SIGHUP) that changes a logged setting.
    std::fs::write(
        &w.config,
        with_key.replace("jitter = \"0s\"", "jitter = \"1s\""),
    )
    .unwrap();
    d.signal("HUP").await;
    d.wait_event("config_reloaded", 10).await;
    d.signal("TERM").await;
    let (code, log, stdout) = d.finish(Duration::from_secs(10)).await;
    assert_eq!(code, Some(0));
    {
        let mut t = w.transcript.lock().unwrap();
        t.push_str(&log.join("\n"));
        t.push_str(&stdout.join("\n"));
    }

    // The configuration-error class: the provider refuses our client credentials.
    let wrong_secret = "wrong-client-SECRET-0123456789";
    let bad_client = w.write(
        "bad-client.toml",
        &with_key.replace(CLIENT_SECRET, wrong_secret),
    );
    for a in w.list_json().await {
        if a["status"] == "active" {
            w.cli(&["accounts", "refresh", &a["id"].to_string()])
                .await
                .ok();
        }
    }
    let out = w
        .cli(&["--config", bad_client.to_str().unwrap(), "run", "--once"])
        .await;
    assert_eq!(out.code, Some(0), "{out:#?}");

    // Show and list after all that (last_error, refresh_log filled in).
    w.cli(&["accounts", "list"]).await.ok();
    w.cli(&["accounts", "list", "--needs-reauth"]).await.ok();
    let list = w.list_json().await;
    for a in &list {
        let id = a["id"].to_string();
        w.cli(&["accounts", "show", &id]).await.ok();
        w.cli(&["accounts", "show", &id, "--json"]).await.ok();
    }

    // Every secret the test knows of.
    let mut secrets: Vec<String> = w.issued.lock().unwrap().clone();
    secrets.push(CLIENT_SECRET.to_string());
    secrets.push(wrong_secret.to_string());
    secrets.push(std::fs::read_to_string(&key).unwrap().trim().to_string());
    let store = w.store_with_key(&key).await;
    for a in &list {
        let acc = store.get(a["id"].as_i64().unwrap()).await.unwrap().unwrap();
        secrets.push(acc.access_token.expose_secret().to_string());
        secrets.push(acc.refresh_token.expose_secret().to_string());
        if let Some(t) = w.sandbox.current_refresh_token(&acc.subject) {
            secrets.push(t);
        }
    }
    store.close().await;
    secrets.sort();
    secrets.dedup();
    assert!(secrets.len() > 30, "{} secrets", secrets.len());

    let transcript = w.transcript.lock().unwrap().clone();
    // The transcript really holds the interesting log lines, at trace level.
    for needle in [
        "\"event\":\"refresh\"",
        "\"outcome\":\"transient\"",
        "\"outcome\":\"rotated\"",
        "\"event\":\"reauth_required\"",
        "\"event\":\"config_reloaded\"",
        "invalid_client",
        "invalid_grant",
        "\"level\":\"TRACE\"",
        "not a valid import record",
        "config: ok",
    ] {
        assert!(transcript.contains(needle), "{needle} not in the output");
    }
    for s in &secrets {
        if let Some(at) = transcript.find(s.as_str()) {
            let from = transcript[..at].rfind('\n').map_or(0, |i| i + 1);
            let to = transcript[at..]
                .find('\n')
                .map_or(transcript.len(), |i| at + i);
            panic!(
                "a secret ({}…) was printed:\n{}",
                &s[..8.min(s.len())],
                &transcript[from..to]
            );
        }
    }
}

/// A mistake on the secret's line of the config (a missing quote, a secret that looks like
/// a number) must be reported by key and line without echoing the value: stderr and the JSON
/// logs of a rejected SIGHUP reload end up in journald and log pipelines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_errors_never_echo_a_secret() {
    let w = World::start("").await;
    let secret_line = format!("client_secret = \"{CLIENT_SECRET}\"");
    let mut leaks = Vec::new();
    let mut check = |what: &str, secret: &str, output: &str| {
        if output.contains(secret) {
            leaks.push(format!("{what}:\n{output}"));
        }
    };

    // A missing closing quote: a TOML syntax error on the secret's line.
    let cfg = w.write(
        "unterminated.toml",
        &w.config_with(&secret_line, &format!("client_secret = \"{CLIENT_SECRET}")),
    );
    for cmd in [&["check"][..], &["run", "--once"][..]] {
        let mut args = vec!["--config", cfg.to_str().unwrap()];
        args.extend_from_slice(cmd);
        let out = w.cli(&args).await;
        assert_eq!(out.code, Some(78), "{out:#?}");
        assert!(out.all().contains("line "), "still says where: {out:#?}");
        check(&format!("syntax error, {cmd:?}"), CLIENT_SECRET, &out.all());
    }

    // A secret of digits, unquoted in the file or through the environment.
    let digits = "918273645501";
    let cfg = w.write(
        "number.toml",
        &w.config_with(&secret_line, &format!("client_secret = {digits}")),
    );
    let out = w.cli(&["--config", cfg.to_str().unwrap(), "check"]).await;
    assert_eq!(out.code, Some(78), "{out:#?}");
    assert!(
        out.all().contains("providers.tiktok.client_secret"),
        "{out:#?}"
    );
    check("unquoted number in the file", digits, &out.all());
    let out = w
        .cli_env(
            &["run", "--once"],
            &[("REFRESHD_PROVIDERS__TIKTOK__CLIENT_SECRET", digits)],
        )
        .await;
    check("digits through the environment", digits, &out.all());

    // The same typo picked up by a SIGHUP reload goes into the daemon's JSON log.
    // `run` starts on an existing store only (docs/src/durability.md).
    helpers::open_store(&w.db, Duration::from_secs(5))
        .await
        .close()
        .await;
    let mut d = w.daemon();
    d.wait_event("ready", 10).await;
    std::fs::write(
        &w.config,
        w.config_with(&secret_line, &format!("client_secret = \"{CLIENT_SECRET}")),
    )
    .unwrap();
    d.signal("HUP").await;
    let rejected = d.wait_event("reload_rejected", 10).await;
    check(
        "reload_rejected event",
        CLIENT_SECRET,
        &rejected.to_string(),
    );
    d.signal("TERM").await;
    let (code, log, _) = d.finish(Duration::from_secs(10)).await;
    assert_eq!(code, Some(0));
    check("daemon log", CLIENT_SECRET, &log.join("\n"));

    assert!(
        leaks.is_empty(),
        "{} output(s) echo a secret:\n\n{}",
        leaks.len(),
        leaks.join("\n\n")
    );
}

/// A TOML syntax error is reported with the line it is on; the source named next to the key
/// must not point somewhere else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_syntax_error_points_at_its_line() {
    let w = World::start("").await;
    let text = w.config_with("jitter = \"0s\"", "jitter = \"0s");
    let line = text
        .lines()
        .position(|l| l.starts_with("jitter"))
        .expect("jitter line")
        + 1;
    let cfg = w.write("syntax.toml", &text);
    let path = cfg.to_str().unwrap();
    let out = w.cli(&["--config", path, "accounts", "list"]).await;
    assert_eq!(out.code, Some(78), "{out:#?}");
    assert!(out.stderr.contains(&format!("line {line}")), "{out:#?}");
    // Every `PATH:N` the message gives must be the line of the error.
    let prefix = format!("{path}:");
    for (at, _) in out.stderr.match_indices(&prefix) {
        let n: String = out.stderr[at + prefix.len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        assert!(
            n.is_empty() || n == line.to_string(),
            "names {path}:{n}, but the error is on line {line}: {}",
            out.stderr
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_and_prints_summary() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(helpers::bin());
    cmd.args([
        "demo",
        "--accounts",
        "50",
        "--duration",
        "6s",
        "--access-ttl",
        "4s",
    ]);
    clean_env(&mut cmd);
    cmd.current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = output(cmd, None).await;
    let (stdout, stderr) = (&out.stdout, &out.stderr);
    assert_eq!(out.code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("refreshd demo summary"), "{stdout}");
    let row = |name: &str| -> u64 {
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name:?} row: {stdout}"))
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{name}: {e}: {stdout}"))
    };
    assert!(row("refreshes committed (rotations)") > 0, "{stdout}");
    assert_eq!(row("used refresh token presented again"), 0, "{stdout}");
    assert_eq!(row("accounts"), 50, "{stdout}");
    assert!(!Path::new(&dir.path().join("refreshd.db")).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_server_of_the_real_binary() {
    let secret = "an-api-secret-of-32-characters!!";
    let w = World::start("").await;
    let token_file = w.write("api-token", secret);
    w.write(
        "refreshd.toml",
        &helpers::config_toml(
            &w.db,
            &w.sandbox.token_url(),
            &format!(
                "\n[server]\nlisten = \"127.0.0.1:0\"\napi_token_file = {:?}\n",
                token_file.display().to_string()
            ),
        ),
    );
    let f = w.write("accounts.jsonl", &w.due_lines(&["o1", "o2"]));
    w.cli(&["accounts", "import", f.to_str().unwrap()])
        .await
        .ok();
    let mut d = w.daemon();
    let listening = d.wait_event("server_listening", 10).await;
    let addr = listening["addr"].as_str().expect("addr").to_string();
    d.wait_event("ready", 10).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let get = |path: &str, bearer: Option<&str>| {
        let mut req = http.get(format!("http://{addr}{path}"));
        if let Some(b) = bearer {
            req = req.bearer_auth(b);
        }
        async move {
            let r = req.send().await.expect("request");
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    assert_eq!(get("/healthz", None).await.0, 200);
    let sandbox = &w.sandbox;
    d.wait_until(10, "both refreshed", |_| sandbox.stats().refreshed == 2)
        .await;
    let mut rotated = false;
    for _ in 0..250 {
        let (_, metrics) = get("/metrics", None).await;
        if metrics.contains(r#"refreshd_refreshes_total{provider="tiktok",outcome="rotated"} 2"#) {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(rotated, "{}", get("/metrics", None).await.1);
    assert_eq!(get("/readyz", None).await, (200, "ready\n".to_string()));

    let list = w.list_json().await;
    let id = id_of(&list, "o1");
    let path = format!("/v1/accounts/{id}/token");
    assert_eq!(get(&path, None).await.0, 401);
    assert_eq!(
        get(&path, Some("an-api-secret-of-32-characters!?")).await.0,
        401
    );
    let (status, body) = get(&path, Some(secret)).await;
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    let store = w.store().await;
    let stored = store.get(id).await.unwrap().unwrap();
    store.close().await;
    assert_eq!(body["access_token"], stored.access_token.expose_secret());

    d.signal("TERM").await;
    let (code, log, stdout) = d.finish(Duration::from_secs(10)).await;
    assert_eq!(code, Some(0));
    let all = format!("{}\n{}", log.join("\n"), stdout.join("\n"));
    assert!(
        !all.contains(stored.access_token.expose_secret()),
        "a token in the log"
    );
    assert!(!all.contains(secret), "the API secret in the log");
    assert_eq!(events_in(&log, "token_api_unauthorized").len(), 2);
    assert_eq!(events_in(&log, "token_handed_out").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_refuses_a_plain_http_listen_address_off_loopback() {
    let w = World::start("\n[server]\nlisten = \"0.0.0.0:8787\"\n").await;
    for args in [&["check"][..], &["run", "--once"][..]] {
        let out = w.cli(args).await;
        assert_eq!(out.code, Some(78), "{args:?}: {out:#?}");
        let all = out.all();
        assert!(
            all.contains("server.listen")
                && all.contains("not a loopback address")
                && all.contains("server.allow_non_loopback = true"),
            "{args:?}: {out:#?}"
        );
    }
    let allowed = w.write(
        "allowed.toml",
        &helpers::config_toml(
            &w.db,
            &w.sandbox.token_url(),
            "\n[server]\nlisten = \"0.0.0.0:8787\"\nallow_non_loopback = true\n",
        ),
    );
    let out = w
        .cli(&["--config", allowed.to_str().unwrap(), "check"])
        .await;
    assert!(out.stdout.contains("config: ok"), "{out:#?}");
}

/// Shell habits (issue 14): completions and the manual page come from the binary itself.
#[test]
fn completions_and_man_page_are_printed() {
    let run = |args: &[&str]| {
        std::process::Command::new(crate::helpers::bin())
            .args(args)
            .output()
            .expect("run refreshd")
    };
    let bash = run(&["completions", "bash"]);
    assert!(bash.status.success(), "{bash:?}");
    let script = String::from_utf8_lossy(&bash.stdout);
    assert!(script.contains("_refreshd()"), "{script}");
    assert!(
        script.contains("needs_reauth"),
        "--status values complete: {script}"
    );
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        assert!(run(&["completions", shell]).status.success(), "{shell}");
    }
    let man = run(&["man"]);
    assert!(man.status.success(), "{man:?}");
    let page = String::from_utf8_lossy(&man.stdout);
    assert!(
        page.starts_with(".ie") || page.contains(".TH refreshd 1"),
        "{page}"
    );
    assert!(page.contains("accounts"), "{page}");
}

/// A command that reads no config refuses --config instead of ignoring it.
#[test]
fn demo_refuses_a_config_it_would_ignore() {
    let out = std::process::Command::new(crate::helpers::bin())
        .args([
            "--config",
            "/nonexistent/refreshd.toml",
            "demo",
            "--duration",
            "1s",
        ])
        .output()
        .expect("run refreshd");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("reads no config file: drop --config"), "{err}");
}

/// Every command honours [log] (issue 14): `accounts import` under log.format = "json"
/// writes JSON lines to a non-terminal stderr (here: a flagged account's WARN event), and
/// `--json` puts one stable summary on stdout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_logs_as_configured_and_summarises_in_json() {
    let w = World::start("").await;
    // A refresh token that ended long ago: flagged on import, announced as a WARN event.
    let mut expired = w.grant("j2", DUE, Some(Duration::from_secs(60)));
    expired["obtained_at"] = (now() - 100_000).into();
    let text = format!("{}{expired}\n", w.due_lines(&["j1"]));
    let file = w.write("j.jsonl", &text);
    let out = w
        .cli(&["accounts", "import", "--json", file.to_str().unwrap()])
        .await;
    out.ok();
    let summary: Value = serde_json::from_str(out.stdout.trim()).expect("one JSON object");
    assert_eq!(summary["accounts"], 2, "{summary}");
    assert_eq!(summary["inserted"], 2, "{summary}");
    assert_eq!(summary["updated"], 0, "{summary}");
    assert_eq!(summary["flagged"], 1, "{summary}");
    assert_eq!(summary["source"], file.to_str().unwrap(), "{summary}");
    let events: Vec<Value> = out
        .stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        events.iter().any(|e| e["event"] == "reauth_required"),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_and_store_copy_offer_json() {
    let w = World::start("").await;
    let file = w.write("c.jsonl", &w.due_lines(&["k1", "k2"]));
    w.cli(&["accounts", "import", file.to_str().unwrap()])
        .await
        .ok();
    let out = w.cli(&["check", "--json"]).await;
    out.ok();
    let v: Value = serde_json::from_str(out.stdout.trim()).expect("one JSON object");
    assert_eq!(v["ok"], true, "{v}");
    let checks = v["checks"].as_array().expect("checks");
    assert!(
        checks
            .iter()
            .any(|c| c["check"] == "store" && c["message"].as_str().unwrap().contains("2 accounts")),
        "{v}"
    );
    let copy = w.path("copy.db");
    let out = w
        .cli(&[
            "store",
            "copy",
            "--json",
            "--from",
            w.db.to_str().unwrap(),
            "--to",
            copy.to_str().unwrap(),
        ])
        .await;
    out.ok();
    let v: Value = serde_json::from_str(out.stdout.trim()).expect("one JSON object");
    assert_eq!(v["accounts_copied"], 2, "{v}");
    assert_eq!(v["accounts"], 2, "{v}");
    assert!(
        v["accounts_sha256"].as_str().is_some_and(|s| s.len() == 64),
        "{v}"
    );
}

/// The import streams in batches of 1,000 inside one transaction: a bad line after the
/// first batch was written still leaves nothing of the file behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_line_after_the_first_batch_rolls_the_whole_import_back() {
    let w = World::start("").await;
    let first = w.write("first.jsonl", &w.due_lines(&["s0"]));
    w.cli(&["accounts", "import", first.to_str().unwrap()])
        .await
        .ok();
    let ids: Vec<String> = (1..=1500).map(|i| format!("s{i}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let text = w.due_lines(&refs) + "{\"provider\":\"tiktok\"}\n";
    let file = w.write("big.jsonl", &text);
    let out = w.cli(&["accounts", "import", file.to_str().unwrap()]).await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(out.stderr.contains("line 1501"), "names the line: {out:#?}");
    assert!(out.stderr.contains("nothing imported"), "{out:#?}");
    assert_eq!(
        subjects(&w.list_json().await),
        ["s0"],
        "nothing half-applied"
    );
}
