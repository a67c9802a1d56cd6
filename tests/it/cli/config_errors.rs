//! Config mistakes as the operator sees them: the key, the source and the line are named, and
//! `check` refuses what the daemon would refuse.

use super::World;
use crate::helpers::{self, CLIENT_SECRET};

/// The 1-based number of the first line of `text` that starts with `prefix`.
fn line_of(text: &str, prefix: &str) -> usize {
    text.lines()
        .position(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("a line starting with {prefix}"))
        + 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_errors_name_key_and_source() {
    let w = World::start("").await;

    // An unknown key in the file: named with file and line, exit 78 (EX_CONFIG).
    let text = w.config_with("lead = \"10m\"", "leed = \"5m\"");
    let line = line_of(&text, "leed");
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

/// A TOML syntax error is reported with the line it is on; the source named next to the key
/// must not point somewhere else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_syntax_error_points_at_its_line() {
    let w = World::start("").await;
    let text = w.config_with("jitter = \"0s\"", "jitter = \"0s");
    let line = line_of(&text, "jitter");
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
