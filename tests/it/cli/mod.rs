//! The real `refreshd` binary, driven as an operator would: a config file in a temp dir, a
//! real SQLite file, and the sandbox provider (in this test process, on loopback, on the
//! system clock) as the token endpoint. Accounts are imported already due (`obtained_at` in
//! the past) so nothing waits for real time to pass. This file holds the shared set-up: the
//! `World` (temp dir, config, sandbox), the running `Daemon` and reading what they print.

use crate::helpers::{self, Out, now};
use refreshd::clock::Clock;
use refreshd::sandbox::{Sandbox, SandboxConfig};
use refreshd::store::{Store, StoreOptions};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tempfile::TempDir;

mod accounts;
mod apps;
mod commands;
mod config_errors;
mod daemon;
mod import;
mod refresh_lines;
mod secrets;

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

    /// Writes due grants of `open_ids` to the file `name` and imports them (which must
    /// succeed) with the binary.
    async fn import_due(&self, name: &str, open_ids: &[&str]) {
        let f = self.write(name, &self.due_lines(open_ids));
        self.cli(&["accounts", "import", f.to_str().unwrap()])
            .await
            .ok();
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
