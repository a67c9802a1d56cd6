//! `refreshd connect` and `refreshd exchange`, driven through the real binary against the
//! sandbox's authorization page and token endpoint. The test plays the browser: it fetches
//! the printed authorization URL and follows the sandbox's 302 to the connect listener.

use crate::helpers::{self, Out, TestApp};
use refreshd::model::Status;
use refreshd::sandbox::{Consent, SandboxConfig};
use secrecy::ExposeSecret;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const RUN_TIMEOUT: Duration = Duration::from_secs(20);

struct World {
    app: TestApp,
    config: PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

impl World {
    async fn start() -> World {
        Self::start_with(&format!("http://127.0.0.1:{}/callback", free_port())).await
    }

    async fn start_with(redirect_uri: &str) -> World {
        let app = TestApp::start(SandboxConfig::default()).await;
        let extra = format!(
            "authorize_url = {:?}\nredirect_uri = {redirect_uri:?}\nscopes = [\"user.info.basic\", \"video.list\"]\n",
            app.sandbox.authorize_url(),
        );
        let config = app.config_path(&extra);
        World { app, config }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(helpers::bin());
        cmd.arg("--config").arg(&self.config).args(args);
        for (k, _) in std::env::vars_os() {
            let name = k.to_string_lossy();
            if name.starts_with("REFRESHD_") || name == "RUST_LOG" {
                cmd.env_remove(&k);
            }
        }
        cmd.current_dir(self.app.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    async fn cli(&self, args: &[&str]) -> Out {
        helpers::run_to_end(self.command(args), None, RUN_TIMEOUT).await
    }

    /// Runs `connect` with `args`; once it prints the authorization URL, `tamper` may change
    /// it, and the test "browser" opens it, following redirects. Returns the run and the
    /// page the browser ended on (status, body).
    async fn connect(
        &self,
        args: &[&str],
        tamper: impl Fn(url::Url) -> url::Url,
    ) -> (Out, u16, String) {
        let mut full = vec!["connect", "tiktok", "--timeout", "15s"];
        full.extend_from_slice(args);
        let mut child = self.command(&full).spawn().expect("spawn refreshd connect");
        let stdout = Arc::new(Mutex::new(Vec::<String>::new()));
        let stderr = Arc::new(Mutex::new(Vec::<String>::new()));
        let readers = [
            helpers::collect_lines(child.stdout.take().expect("stdout"), stdout.clone()),
            helpers::collect_lines(child.stderr.take().expect("stderr"), stderr.clone()),
        ];
        let find_url = || {
            stdout
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.starts_with("http"))
                .cloned()
        };
        let printed = helpers::eventually(15, || {
            let found = find_url().is_some();
            async move { found }
        })
        .await;
        let (status, page) = if printed {
            let url = tamper(url::Url::parse(&find_url().unwrap()).expect("a URL"));
            let resp = reqwest::Client::builder()
                .no_proxy()
                .build()
                .unwrap()
                .get(url)
                .send()
                .await
                .expect("the browser's request");
            let status = resp.status().as_u16();
            (status, resp.text().await.unwrap_or_default())
        } else {
            (0, String::new())
        };
        let waiting = tokio::task::spawn_blocking(move || child.wait());
        let code = tokio::time::timeout(RUN_TIMEOUT, waiting)
            .await
            .expect("connect finished in time")
            .expect("join")
            .expect("wait")
            .code();
        for r in readers {
            r.join().expect("reader");
        }
        let out = Out {
            code,
            stdout: stdout.lock().unwrap().join("\n"),
            stderr: stderr.lock().unwrap().join("\n"),
        };
        assert!(printed, "connect never printed a URL: {out:#?}");
        (out, status, page)
    }

    fn consent(&self, open_id: &str, grant_scopes: Option<&str>) {
        self.app.sandbox.set_consent(Consent::Approve {
            open_id: open_id.into(),
            grant_scopes: grant_scopes.map(str::to_string),
        });
    }

    /// Imports a fresh grant of `open_id` and flags it needs_reauth (invalid_grant).
    async fn flagged_account(&self, open_id: &str) -> i64 {
        let store = self.app.store().await;
        let config = self.app.config("");
        let id = self.app.import(&store, &config, &[open_id], None).await[0];
        helpers::flag_invalid_grant(&store, id).await;
        assert_eq!(
            store.get(id).await.unwrap().unwrap().status,
            Status::NeedsReauth
        );
        store.close().await;
        id
    }
}

fn id_in(stdout: &str) -> i64 {
    let rest = stdout
        .split("account ")
        .nth(1)
        .unwrap_or_else(|| panic!("no account id in {stdout:?}"));
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_stores_the_account_and_prints_no_token() {
    let w = World::start().await;
    w.consent("u-happy", Some("user.info.basic"));
    let (out, status, page) = w.connect(&["--label", "Main"], |u| u).await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("Connected"), "{page}");
    assert!(out.stdout.contains("open_id u-happy"), "{out:#?}");
    assert!(out.stdout.contains("(new)"), "{out:#?}");
    // Fewer scopes granted than requested: named.
    assert!(
        out.stderr.contains("warning") && out.stderr.contains("video.list"),
        "{out:#?}"
    );
    let id = id_in(&out.stdout);

    let show = w.cli(&["accounts", "show", &id.to_string()]).await;
    assert_eq!(show.code, Some(0), "{show:#?}");
    assert!(show.stdout.contains("u-happy"), "{show:#?}");
    assert!(show.stdout.contains("Main"), "{show:#?}");

    let store = w.app.store().await;
    let a = store.get(id).await.unwrap().unwrap();
    store.close().await;
    assert_eq!(a.status, Status::Active);
    assert_eq!(a.scope, "user.info.basic");
    let rt = a.refresh_token.expose_secret().to_string();
    assert_eq!(
        w.app.sandbox.current_refresh_token("u-happy").as_deref(),
        Some(rt.as_str())
    );
    for text in [out.all(), show.all(), page] {
        assert!(!text.contains(&rt), "refresh token leaked: {text}");
        assert!(
            !text.contains(a.access_token.expose_secret()),
            "access token leaked: {text}"
        );
        assert!(!text.contains("code."), "authorization code leaked: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_consent_fails_naming_access_denied() {
    let w = World::start().await;
    w.app.sandbox.set_consent(Consent::Deny);
    let (out, status, page) = w.connect(&[], |u| u).await;
    assert_ne!(out.code, Some(0), "{out:#?}");
    assert!(out.stderr.contains("access_denied"), "{out:#?}");
    assert_eq!(status, 400);
    assert!(page.contains("access_denied"), "{page}");
    assert!(!w.app.db.exists() || w.cli(&["accounts", "list"]).await.stdout.lines().count() == 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_state_is_rejected() {
    let w = World::start().await;
    w.consent("u-forged", None);
    let (out, status, _) = w
        .connect(&[], |u| {
            let pairs: Vec<(String, String)> = u
                .query_pairs()
                .into_owned()
                .map(|(k, v)| {
                    if k == "state" {
                        (k, "forged".into())
                    } else {
                        (k, v)
                    }
                })
                .collect();
            let mut u = u.clone();
            u.query_pairs_mut().clear().extend_pairs(pairs);
            u
        })
        .await;
    assert_ne!(out.code, Some(0), "{out:#?}");
    assert!(out.stderr.contains("state does not match"), "{out:#?}");
    assert_eq!(status, 400);
    assert_eq!(w.app.sandbox.stats().codes_exchanged, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_with_account_clears_needs_reauth() {
    let w = World::start().await;
    let id = w.flagged_account("u-re").await;
    w.consent("u-re", None);
    let (out, _, _) = w.connect(&["--account", &id.to_string()], |u| u).await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(
        out.stdout.contains(&format!("account {id} (updated)")),
        "{out:#?}"
    );
    let store = w.app.store().await;
    let a = store.get(id).await.unwrap().unwrap();
    store.close().await;
    assert_eq!(a.status, Status::Active);
    assert_eq!(a.reauth_reason, None);
    assert_eq!(
        w.app.sandbox.current_refresh_token("u-re").as_deref(),
        Some(a.refresh_token.expose_secret())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_user_with_account_is_refused_and_nothing_written() {
    let w = World::start().await;
    let id = w.flagged_account("u-owner").await;
    let store = w.app.store().await;
    let before = store.get(id).await.unwrap().unwrap();
    store.close().await;
    w.consent("u-intruder", None);
    let (out, _, page) = w.connect(&["--account", &id.to_string()], |u| u).await;
    assert_ne!(out.code, Some(0), "{out:#?}");
    assert!(out.stderr.contains("nothing was written"), "{out:#?}");
    assert!(out.stderr.contains("u-intruder"), "{out:#?}");
    assert!(page.contains("Not connected"), "{page}");
    let store = w.app.store().await;
    let after = store.get(id).await.unwrap().unwrap();
    assert!(store.find("tiktok", "u-intruder").await.unwrap().is_none());
    store.close().await;
    assert_eq!(after.status, Status::NeedsReauth);
    assert_eq!(after.generation, before.generation);
    assert_eq!(
        after.refresh_token.expose_secret(),
        before.refresh_token.expose_secret()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_with_a_bad_code_names_invalid_grant() {
    let w = World::start().await;
    let out = w
        .cli(&["exchange", "tiktok", "--code", "code.not-issued"])
        .await;
    assert_ne!(out.code, Some(0), "{out:#?}");
    assert!(out.stderr.contains("invalid_grant"), "{out:#?}");
    assert!(out.stderr.contains("start over"), "{out:#?}");
    assert!(!out.all().contains("code.not-issued"), "{out:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorize_url_then_exchange() {
    let w = World::start().await;
    w.consent("u-manual", None);
    let out = w
        .cli(&["authorize-url", "tiktok", "--scopes", "user.info.basic"])
        .await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(out.stderr.contains("state: "), "{out:#?}");
    // The browser, without following the redirect: read the code off the Location.
    let code = helpers::authorization_code(out.stdout.trim()).await;
    let out = w
        .cli(&["exchange", "tiktok", "--code", &code, "--label", "manual"])
        .await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(out.stdout.contains("open_id u-manual"), "{out:#?}");
    assert!(!out.all().contains(&code));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_times_out_with_a_clear_message() {
    let w = World::start().await;
    let out = w.cli(&["connect", "tiktok", "--timeout", "300ms"]).await;
    assert_ne!(out.code, Some(0), "{out:#?}");
    assert!(
        out.stderr.contains("no authorization arrived within 300ms"),
        "{out:#?}"
    );
    assert_eq!(w.app.sandbox.stats().codes_issued, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_needs_a_loopback_redirect_uri() {
    let w = World::start_with("https://app.example.com/tiktok/callback").await;
    let out = w.cli(&["connect", "tiktok"]).await;
    assert_ne!(out.code, Some(0), "{out:#?}");
    assert!(out.stderr.contains("not on loopback"), "{out:#?}");
    assert!(out.stderr.contains("[connect] enabled = true"), "{out:#?}");
    assert!(out.stderr.contains("authorize-url"), "{out:#?}");
}
