//! What an admin does to accounts, end to end against the sandbox: `accounts disable` /
//! `enable` (a disabled account is never refreshed, handed out or written to a sink);
//! `accounts export` and its round trip through `accounts import`.

use crate::helpers::{self, TestApp};
use crate::server::Daemon;
use refreshd::config::Config;
use refreshd::model::Status;
use refreshd::sandbox::SandboxConfig;
use secrecy::ExposeSecret;
use std::process::Command;
use std::time::Duration;

const API_TOKEN: &str = "admin-test-api-token-0123456789";

/// Who this file's direct store changes are by (the audit trail's row).
fn tester() -> refreshd::store::Actor {
    refreshd::store::Actor {
        who: "admin test".into(),
        via: "tests/it/admin.rs".into(),
    }
}

/// The token API's answer for account `id`: status and JSON body.
async fn token(d: &Daemon, id: i64) -> (u16, serde_json::Value) {
    let r = d
        .http
        .get(d.url(&format!("/v1/accounts/{id}/token")))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

async fn generation(d: &Daemon, id: i64) -> i64 {
    helpers::account(&d.store, id).await.generation
}

/// A config with the token API on and a sink for each of `sinks` (account id, file).
fn daemon_config(app: &TestApp, sinks: &[(i64, &std::path::Path)]) -> Config {
    let token_file = app.dir.path().join("api-token");
    std::fs::write(&token_file, format!("{API_TOKEN}\n")).unwrap();
    let mut extra = format!(
        "\n[server]\nlisten = \"127.0.0.1:0\"\napi_token_file = {:?}\n",
        token_file.display().to_string()
    );
    for (id, path) in sinks {
        extra += &format!(
            "\n[[sink]]\naccount = {id}\npath = {:?}\n",
            path.display().to_string()
        );
    }
    let mut c = app.config(&extra);
    c.store.create = true;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_account_is_not_refreshed_handed_out_or_written_until_enabled() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let store = app.store().await;
    let seed = app.config("");
    let ids = app.import(&store, &seed, &["off", "on"], None).await;
    let (off, on) = (ids[0], ids[1]);
    store
        .set_disabled(off, true, app.clock.now(), &tester())
        .await
        .unwrap();
    store.close().await;
    // Both access tokens are long expired when the daemon starts.
    app.clock.advance(Duration::from_secs(3 * 3600));
    let (off_file, on_file) = (
        app.dir.path().join("off.json"),
        app.dir.path().join("on.json"),
    );
    let d = Daemon::start(
        &app,
        daemon_config(&app, &[(off, &off_file), (on, &on_file)]),
    )
    .await;

    assert!(
        helpers::eventually(10, || async { generation(&d, on).await > 0 }).await,
        "the enabled account is refreshed"
    );
    assert!(
        helpers::eventually(10, || async { on_file.exists() }).await,
        "the enabled account's sink is written"
    );
    let a = helpers::account(&d.store, off).await;
    assert_eq!(
        (a.status, a.generation),
        (Status::Disabled, 0),
        "never refreshed"
    );
    assert!(
        !off_file.exists(),
        "a disabled account's sink is not written"
    );
    let (status, body) = token(&d, off).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"], "account_disabled", "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("account {off} (tiktok/off) is disabled")),
        "{message}"
    );
    assert!(!body.to_string().contains("access_token"), "{body}");
    assert_eq!(token(&d, on).await.0, 200);

    // Enabled again: due now, refreshed, handed out, written.
    d.store
        .set_disabled(off, false, app.clock.now(), &tester())
        .await
        .unwrap();
    d.engine.waker().notify_one();
    assert!(
        helpers::eventually(10, || async {
            app.clock.advance(Duration::from_secs(1));
            generation(&d, off).await > 0
        })
        .await,
        "the re-enabled account is refreshed"
    );
    let (status, body) = token(&d, off).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        helpers::eventually(10, || async {
            app.clock.advance(Duration::from_secs(1));
            off_file.exists()
        })
        .await,
        "the re-enabled account's sink is written"
    );
    d.stop().await;
}

/// Runs the binary with the test config and `args`.
async fn cli(config: &std::path::Path, args: &[&str]) -> helpers::Out {
    let mut cmd = Command::new(helpers::bin());
    cmd.arg("--config").arg(config).args(args);
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    helpers::run_to_end(cmd, None, Duration::from_secs(30)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_disable_and_enable_say_what_changed_and_show_tells() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let config = app.config_path("");
    let store = app.store().await;
    let id = app.import(&store, &app.config(""), &["u1"], None).await[0];
    store.close().await;
    let sid = id.to_string();

    let out = cli(&config, &["accounts", "disable", &sid]).await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(
        out.stdout
            .contains(&format!("account {id} (tiktok/u1) disabled (was active)")),
        "{out:#?}"
    );
    let out = cli(&config, &["accounts", "disable", &sid]).await;
    assert!(
        out.stdout.contains("is already disabled; nothing changed"),
        "{out:#?}"
    );
    let out = cli(&config, &["accounts", "show", &sid]).await;
    assert!(
        out.stdout.contains("status             disabled"),
        "{out:#?}"
    );
    assert!(
        out.stdout
            .contains(&format!("`refreshd accounts enable {id}`")),
        "{out:#?}"
    );
    assert!(
        out.stdout.contains(" disabled "),
        "the log says when: {out:#?}"
    );
    let out = cli(&config, &["accounts", "refresh", &sid]).await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(out.stderr.contains("disabled"), "{out:#?}");

    let out = cli(&config, &["accounts", "enable", &sid]).await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(
        out.stdout.contains(&format!(
            "account {id} (tiktok/u1) enabled (active): it is due now"
        )),
        "{out:#?}"
    );
    let out = cli(&config, &["accounts", "show", &sid, "--json"]).await;
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(v["status"], "active");
    for args in [
        ["accounts", "disable", "999"],
        ["accounts", "enable", "999"],
    ] {
        let out = cli(&config, &args).await;
        assert_eq!(out.code, Some(1), "{out:#?}");
        assert!(out.stderr.contains("no account with id 999"), "{out:#?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_with_tokens_imports_back_into_a_fresh_store_as_the_same_accounts() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let config = app.config_path("");
    let now = refreshd::clock::Clock::system().now();
    let mut lines = String::new();
    for open_id in ["u1", "u2"] {
        let mut g: serde_json::Value =
            serde_json::from_str(&app.grant_line(open_id, None)).unwrap();
        g["obtained_at"] = (now - 10).into();
        lines += &format!("{g}\n");
    }
    let input = app.dir.path().join("in.jsonl");
    std::fs::write(&input, &lines).unwrap();
    let out = cli(&config, &["accounts", "import", input.to_str().unwrap()]).await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    let store = app.store().await;
    let originals = [
        store.find("tiktok", "u1").await.unwrap().unwrap(),
        store.find("tiktok", "u2").await.unwrap().unwrap(),
    ];
    store.close().await;
    let secrets: Vec<String> = originals
        .iter()
        .flat_map(|a| {
            [
                a.access_token.expose_secret().to_string(),
                a.refresh_token.expose_secret().to_string(),
            ]
        })
        .collect();
    let no_secret = |out: &helpers::Out| {
        for s in &secrets {
            assert!(
                !out.all().contains(s.as_str()),
                "a token was printed: {out:#?}"
            );
        }
    };

    // Without tokens: an inventory on stdout that import refuses, saying why.
    let out = cli(&config, &["accounts", "export"]).await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    no_secret(&out);
    assert_eq!(out.stdout.lines().count(), 2, "{out:#?}");
    assert!(
        out.stderr
            .contains("exported 2 account(s) to stdout without tokens"),
        "{out:#?}"
    );
    let bare = app.dir.path().join("bare.jsonl");
    std::fs::write(&bare, &out.stdout).unwrap();
    let out = cli(&config, &["accounts", "import", bare.to_str().unwrap()]).await;
    assert_ne!(out.code, Some(0), "{out:#?}");
    assert!(
        out.stderr.contains("tiktok/u1 has no `access_token`"),
        "{out:#?}"
    );
    assert!(out.stderr.contains("--include-tokens"), "{out:#?}");
    let out = cli(&config, &["accounts", "export", "--provider", "google"]).await;
    assert!(
        out.stdout.is_empty() && out.stderr.contains("exported 0"),
        "{out:#?}"
    );

    // Tokens go only to a new 0600 file.
    let out = cli(&config, &["accounts", "export", "--include-tokens"]).await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(
        out.stdout.is_empty() && out.stderr.contains("-o FILE"),
        "{out:#?}"
    );
    let file = app.dir.path().join("export.jsonl");
    let f = file.to_str().unwrap();
    let out = cli(
        &config,
        &["accounts", "export", "--include-tokens", "-o", f],
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    no_secret(&out);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let exported = std::fs::read_to_string(&file).unwrap();
    let out = cli(
        &config,
        &["accounts", "export", "--include-tokens", "-o", f],
    )
    .await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(out.stderr.contains("never overwrites"), "{out:#?}");
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        exported,
        "left as it was"
    );

    // Into a fresh store: the same accounts and tokens.
    let fresh_db = app.dir.path().join("fresh.db");
    let fresh = app.dir.path().join("fresh.toml");
    std::fs::write(
        &fresh,
        helpers::config_toml(&fresh_db, &app.sandbox.token_url(), ""),
    )
    .unwrap();
    let out = cli(&fresh, &["accounts", "import", f]).await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    let store = helpers::open_store(&fresh_db, Duration::from_secs(2)).await;
    for a in &originals {
        let b = store
            .find(&a.provider, &a.subject)
            .await
            .unwrap()
            .expect("imported");
        assert_eq!(b.label, a.label);
        assert_eq!(
            b.access_token.expose_secret(),
            a.access_token.expose_secret()
        );
        assert_eq!(
            b.refresh_token.expose_secret(),
            a.refresh_token.expose_secret()
        );
        assert_eq!(b.scope, a.scope);
        assert_eq!(b.token_type, a.token_type);
        assert_eq!(b.access_expires_at, a.access_expires_at);
        assert_eq!(b.refresh_expires_at, a.refresh_expires_at);
        assert_eq!(b.status, a.status);
    }
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_revoke_asks_the_sandbox_and_keeps_the_account_unless_revoked_or_forced() {
    let app = TestApp::start(SandboxConfig::default()).await;
    let revoke = format!("revoke_url = {:?}", app.sandbox.revoke_url());
    let config = app.config_path(&revoke);
    let store = app.store().await;
    let ids = app
        .import(&store, &app.config(""), &["gone", "kept", "forced"], None)
        .await;
    let tokens: Vec<String> = {
        let mut t = Vec::new();
        for id in &ids {
            t.push(
                helpers::account(&store, *id)
                    .await
                    .access_token
                    .expose_secret()
                    .to_string(),
            );
        }
        t
    };
    store.close().await;
    let exists = |id: i64| {
        let db = app.db.clone();
        async move {
            let s = helpers::open_store(&db, Duration::from_secs(2)).await;
            let found = s.get(id).await.unwrap().is_some();
            s.close().await;
            found
        }
    };

    // Revoked: the sandbox's grant is gone, then the account.
    assert!(app.sandbox.access_token_valid("gone", &tokens[0]));
    let out = cli(
        &config,
        &["accounts", "remove", &ids[0].to_string(), "--revoke"],
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(
        out.stdout
            .contains("provider tiktok revoked the grant of account"),
        "{out:#?}"
    );
    assert!(
        out.stdout.contains(&format!("removed account {}", ids[0])),
        "{out:#?}"
    );
    assert!(
        !app.sandbox.access_token_valid("gone", &tokens[0]),
        "revoked at the provider"
    );
    assert!(!exists(ids[0]).await);

    // The provider refuses (a wrong client secret): the account stays, unless --force.
    let wrong = app.dir.path().join("wrong.toml");
    std::fs::write(
        &wrong,
        helpers::config_toml(&app.db, &app.sandbox.token_url(), &revoke)
            .replace(helpers::CLIENT_SECRET, "not-the-secret"),
    )
    .unwrap();
    let kept = ids[1].to_string();
    let out = cli(&wrong, &["accounts", "remove", &kept, "--revoke"]).await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(out.stderr.contains("refused to revoke"), "{out:#?}");
    assert!(
        out.stderr.contains("HTTP 401, error invalid_client"),
        "{out:#?}"
    );
    assert!(out.stderr.contains("NOT removed"), "{out:#?}");
    assert!(exists(ids[1]).await);
    assert!(app.sandbox.access_token_valid("kept", &tokens[1]));

    // Unreachable: kept as well; --force removes it and says the tokens may still work.
    let closed = app.dir.path().join("closed.toml");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(
        &closed,
        helpers::config_toml(
            &app.db,
            &app.sandbox.token_url(),
            &format!("revoke_url = \"http://127.0.0.1:{port}/v2/oauth/revoke/\""),
        ),
    )
    .unwrap();
    let forced = ids[2].to_string();
    let out = cli(&closed, &["accounts", "remove", &forced, "--revoke"]).await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(out.stderr.contains("could not be reached"), "{out:#?}");
    assert!(exists(ids[2]).await);
    let out = cli(
        &closed,
        &["accounts", "remove", &forced, "--revoke", "--force"],
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(
        out.stdout.contains("removing it anyway (--force)"),
        "{out:#?}"
    );
    assert!(!exists(ids[2]).await);
    for t in &tokens {
        assert!(!out.all().contains(t.as_str()), "a token was printed");
    }
    // --force alone is a usage error.
    let out = cli(&config, &["accounts", "remove", &kept, "--force"]).await;
    assert_eq!(out.code, Some(2), "{out:#?}");
}
