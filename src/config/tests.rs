//! Tests of loading and validation through `Config::load` and `Config::from_toml_str`: the
//! order of sources, errors naming key and source, secrets read from files and never shown,
//! and the example config/refreshd.toml documenting every key and default.

use super::*;
use crate::provider::profile::Profile;
use figment::Jail;
use std::path::{Path, PathBuf};
use std::time::Duration;

const GOOD: &str = r#"
[store]
path = "x.db"

[refresh]
lead = "5m"

[providers.tiktok]
client_key = "ck"
client_secret = "cs-SECRET"
token_url = "http://127.0.0.1:9/v2/oauth/token/"
"#;

#[test]
fn defaults_then_file_then_env() {
    Jail::expect_with(|jail| {
        jail.create_file("refreshd.toml", GOOD)?;
        jail.set_env("REFRESHD_REFRESH__JITTER", "3m");
        jail.set_env("REFRESHD_REFRESH__LEAD", "7m");
        let c = Config::load(None).map_err(|e| e.to_string())?;
        assert_eq!(c.store.path, PathBuf::from("x.db"));
        assert_eq!(c.refresh.lead, Duration::from_secs(420)); // env beats file
        assert_eq!(c.refresh.jitter, Duration::from_secs(180));
        assert_eq!(c.refresh.batch, 256); // default
        assert_eq!(c.reauth.window, Duration::from_secs(7 * 86_400));
        Ok(())
    });
}

#[test]
fn unknown_key_is_named_with_file_and_line() {
    Jail::expect_with(|jail| {
        jail.create_file("r.toml", "[refresh]\nlead = \"5m\"\nleed = \"5m\"\n")?;
        let err = Config::load(Some(Path::new("r.toml")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("refresh.leed"), "{err}");
        assert!(err.contains("r.toml:3"), "{err}");
        assert!(err.contains("unknown key"), "{err}");
        Ok(())
    });
}

#[test]
fn bad_duration_names_key_and_env_var() {
    Jail::expect_with(|_jail| {
        _jail.set_env("REFRESHD_REFRESH__LEAD", "ten minutes");
        let err = Config::load(None).unwrap_err().to_string();
        assert!(err.contains("refresh.lead"), "{err}");
        assert!(err.contains("REFRESHD_REFRESH__LEAD"), "{err}");
        Ok(())
    });
}

#[test]
fn validation_names_key_source_and_allowed_range() {
    Jail::expect_with(|jail| {
        jail.create_file("r.toml", "[refresh]\n\nlead_fraction = 1.5\n")?;
        let err = Config::load(Some(Path::new("r.toml")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("refresh.lead_fraction"), "{err}");
        assert!(err.contains("r.toml:3"), "{err}");
        assert!(err.contains("between 0.0 and 0.9"), "{err}");
        Ok(())
    });
}

#[test]
fn secret_from_file_and_never_in_debug() {
    Jail::expect_with(|jail| {
        jail.create_file("secret", "from-file-SECRET\n")?;
        jail.create_file(
            "r.toml",
            "[providers.tiktok]\nclient_key = \"ck\"\nclient_secret_file = \"secret\"\n",
        )?;
        let c = Config::load(Some(Path::new("r.toml"))).map_err(|e| e.to_string())?;
        let p = &c.providers["tiktok"];
        use secrecy::ExposeSecret;
        assert_eq!(
            p.client_secret.as_ref().unwrap().expose_secret(),
            "from-file-SECRET"
        );
        assert!(!format!("{c:?}").contains("SECRET"));
        Ok(())
    });
}

#[test]
fn missing_secret_file_is_named() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "r.toml",
            "[providers.tiktok]\nclient_key = \"ck\"\nclient_secret_file = \"/nope/secret\"\n",
        )?;
        let err = Config::load(Some(Path::new("r.toml")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("providers.tiktok.client_secret_file"), "{err}");
        assert!(err.contains("/nope/secret"), "{err}");
        Ok(())
    });
}

#[test]
fn plain_http_token_url_refused_off_loopback() {
    let err = Config::from_toml_str(
        "[providers.tiktok]\nclient_key = \"k\"\nclient_secret = \"s\"\ntoken_url = \"http://example.com/t\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("providers.tiktok.token_url"), "{err}");
    assert!(err.contains("https"), "{err}");
}

#[test]
fn api_base_is_checked_like_the_other_urls() {
    let with = |base: &str| {
        Config::from_toml_str(&format!(
            "[providers.tiktok]\nclient_key = \"k\"\nclient_secret = \"s\"\napi_base = {base:?}\n"
        ))
    };
    assert!(with("http://127.0.0.1:9/api").is_ok());
    assert!(with("https://open.tiktokapis.com").is_ok());
    for bad in [
        "http://api.example.com",
        "ftp://127.0.0.1/",
        "https://user:pw@api.example.com",
        "https://api.example.com/?x=1",
        "https://api.example.com/#f",
        "not a url",
    ] {
        let err = with(bad).unwrap_err().to_string();
        assert!(err.contains("providers.tiktok.api_base"), "{bad}: {err}");
    }
}

#[test]
fn bad_cron_is_named() {
    let err = Config::from_toml_str("[reauth]\nsweep_cron = \"every tuesday\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("reauth.sweep_cron"), "{err}");
}

#[test]
fn missing_config_file_is_an_error() {
    let err = Config::load(Some(Path::new("/definitely/not/here.toml")))
        .unwrap_err()
        .to_string();
    assert!(err.contains("/definitely/not/here.toml"), "{err}");
}

#[test]
fn example_config_documents_every_provider_key_and_they_parse() {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/refreshd.toml"))
            .unwrap();
    // serde lists every accepted key when it meets an unknown one.
    let err = Config::from_toml_str(
        "[providers.tiktok]
client_key = \"k\"\nzzz = 1\n",
    )
    .unwrap_err()
    .to_string();
    let keys = err.split("expected one of: ").nth(1).expect(&err);
    for key in keys
        .split(", ")
        .map(|k| k.trim_matches(|c: char| c == '`' || c.is_whitespace()))
    {
        // `apps` is a map of tables, shown as `[providers.tiktok.apps.NAME]`.
        let documented = text.contains(&format!("{key} = ")) || text.contains(&format!(".{key}."));
        assert!(
            documented || key == "client_id",
            "providers key {key} is not in config/refreshd.toml"
        );
    }
    // The commented profile keys are valid as written.
    let start = text.find("# Profile keys.").unwrap();
    let end = ["# ---- ", "# App tokens"]
        .iter()
        .filter_map(|m| text[start..].find(m))
        .min()
        .map_or(text.len(), |i| start + i);
    let uncommented: String = text[start..end]
        .lines()
        .filter_map(|l| l.strip_prefix("# "))
        .filter(|l| {
            l.split_once(" = ")
                .is_some_and(|(k, _)| k.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let c = Config::from_toml_str(&format!(
        "[providers.tiktok]\nclient_key = \"k\"\nclient_secret = \"s\"\n{uncommented}"
    ))
    .unwrap();
    let p = c.providers["tiktok"].profile("tiktok").unwrap();
    let builtin = Profile::built_in("tiktok").unwrap();
    assert_eq!(p.client_id_param, builtin.client_id_param);
    assert_eq!(p.rotation, builtin.rotation);
    assert_eq!(p.refresh_ttl, builtin.refresh_ttl);
}

#[test]
fn key_files_are_read_with_credentials_directory_and_bad_ones_named() {
    Jail::expect_with(|jail| {
        let dir = jail.directory().to_path_buf();
        crate::crypto::generate_key_file(&dir.join("token-key")).unwrap();
        crate::crypto::generate_key_file(&dir.join("old-key")).unwrap();
        jail.set_env("CREDENTIALS_DIRECTORY", dir.display());
        jail.create_file(
            "r.toml",
            "[store]\nencryption_key_file = \"$CREDENTIALS_DIRECTORY/token-key\"\ndecryption_key_files = [\"old-key\"]\n",
        )?;
        let c = Config::load(Some(Path::new("r.toml"))).map_err(|e| e.to_string())?;
        assert!(c.store.keyring.seals());
        assert_eq!(c.store.keyring.files().count(), 2);

        jail.create_file("short", "c2hvcnQ=\n")?;
        jail.create_file(
            "bad.toml",
            "[store]\nencryption_key_file = \"token-key\"\ndecryption_key_files = [\"short\"]\n",
        )?;
        let e = Config::load(Some(Path::new("bad.toml")))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("store.decryption_key_files") && e.contains("short"),
            "{e}"
        );
        jail.create_file(
            "older.toml",
            "[store]\ndecryption_key_files = [\"old-key\"]\n",
        )?;
        let e = Config::load(Some(Path::new("older.toml")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("need store.encryption_key_file"), "{e}");
        jail.create_file("stdout.toml", "[store]\nhandoff_stdout = true\n")?;
        let e = Config::load(Some(Path::new("stdout.toml")))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("store.handoff_stdout") && e.contains("store.encryption_key_file"),
            "{e}"
        );
        jail.create_file(
            "sealed-stdout.toml",
            "[store]\nencryption_key_file = \"token-key\"\nhandoff_stdout = true\n",
        )?;
        Config::load(Some(Path::new("sealed-stdout.toml"))).map_err(|e| e.to_string())?;
        jail.create_file("missing.toml", "[store]\nencryption_key_file = \"nope\"\n")?;
        let e = Config::load(Some(Path::new("missing.toml")))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("store.encryption_key_file") && e.contains("nope"),
            "{e}"
        );
        Ok(())
    });
}

#[test]
fn a_non_loopback_listen_address_needs_allow_non_loopback() {
    for addr in ["0.0.0.0:8787", "192.0.2.7:8787", "[::]:8787"] {
        let e = Config::from_toml_str(&format!("[server]\nlisten = {addr:?}\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("server.listen")
                && e.contains("not a loopback address")
                && e.contains("allow_non_loopback"),
            "{addr}: {e}"
        );
        let c = Config::from_toml_str(&format!(
            "[server]\nlisten = {addr:?}\nallow_non_loopback = true\n"
        ))
        .unwrap();
        assert!(c.server.allow_non_loopback);
    }
    for addr in ["127.0.0.1:8787", "[::1]:0"] {
        Config::from_toml_str(&format!("[server]\nlisten = {addr:?}\n")).unwrap();
    }
}

#[test]
fn redirects_to_the_app_need_a_signing_secret() {
    let base = "[server]\nlisten = \"127.0.0.1:0\"\n[connect]\nenabled = true\nsuccess_url = \"https://app.example/ok\"\n";
    let e = Config::from_toml_str(base).unwrap_err().to_string();
    assert!(
        e.contains("connect.redirect_secret_file") && e.contains("signed"),
        "{e}"
    );
    let e = Config::from_toml_str(&format!("{base}redirect_secret = \"short\"\n"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("connect.redirect_secret") && !e.contains("short\""),
        "{e}"
    );
    Jail::expect_with(|jail| {
        jail.create_file("redirect-secret", "from-file-0123456789abcdef\n")?;
        jail.create_file(
            "r.toml",
            &format!("{base}redirect_secret_file = \"redirect-secret\"\n"),
        )?;
        let c = Config::load(Some(Path::new("r.toml"))).map_err(|e| e.to_string())?;
        assert_eq!(
            secrecy::ExposeSecret::expose_secret(c.connect.redirect_secret.as_ref().unwrap()),
            "from-file-0123456789abcdef"
        );
        assert!(!format!("{c:?}").contains("from-file"));
        Ok(())
    });
}

#[test]
fn test_suite_variables_are_not_config_keys() {
    Jail::expect_with(|jail| {
        jail.set_env("REFRESHD_TEST_POSTGRES_URL", "postgres://x@127.0.0.1/y");
        Config::load(None).map_err(|e| e.to_string())?;
        jail.set_env("REFRESHD_TSET_TYPO", "1");
        let e = Config::load(None).unwrap_err().to_string();
        assert!(e.contains("REFRESHD_TSET_TYPO"), "{e}");
        Ok(())
    });
}

#[test]
fn example_config_file_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/refreshd.toml");
    Jail::expect_with(|jail| {
        jail.create_file("client_secret", "s")?;
        let c = Config::load(Some(&path)).map_err(|e| e.to_string())?;
        let d = Config::default();
        // the example documents the defaults: its values must match them
        assert_eq!(c.refresh.lead, d.refresh.lead);
        assert_eq!(c.refresh.batch, d.refresh.batch);
        assert_eq!(c.reauth.window, d.reauth.window);
        assert_eq!(c.store.lease, d.store.lease);
        assert_eq!(c.proxy.enabled, d.proxy.enabled);
        assert_eq!(c.proxy.max_request_bytes, d.proxy.max_request_bytes);
        assert_eq!(c.proxy.max_response_bytes, d.proxy.max_response_bytes);
        assert_eq!(c.proxy.timeout, d.proxy.timeout);
        assert_eq!(c.proxy.read_timeout, d.proxy.read_timeout);
        assert_eq!(c.proxy.connect_timeout, d.proxy.connect_timeout);
        assert_eq!(c.store.encryption_key_file, d.store.encryption_key_file);
        assert_eq!(c.store.decryption_key_files, d.store.decryption_key_files);
        assert_eq!(c.store.permissions, d.store.permissions);
        assert_eq!(c.store.pool_size, d.store.pool_size);
        assert_eq!(c.store.create, d.store.create);
        assert_eq!(c.store.handoff_dir, d.store.handoff_dir);
        assert_eq!(c.store.handoff_stdout, d.store.handoff_stdout);
        assert!(c.store.url.is_none() && c.store.url_file.is_none());
        assert_eq!(c.refresh.read_timeout, d.refresh.read_timeout);
        assert_eq!(c.refresh.request_timeout, d.refresh.request_timeout);
        assert_eq!(c.refresh.connect_timeout, d.refresh.connect_timeout);
        assert_eq!(c.server.allow_non_loopback, d.server.allow_non_loopback);
        assert_eq!(c.server.header_read_timeout, d.server.header_read_timeout);
        assert_eq!(c.server.request_timeout, d.server.request_timeout);
        assert_eq!(c.server.max_connections, d.server.max_connections);
        assert_eq!(c.server.fd_reserve, d.server.fd_reserve);
        assert_eq!(
            c.server.max_concurrent_requests,
            d.server.max_concurrent_requests
        );
        Ok(())
    });
}

#[test]
fn sinks_and_webhook_parse_and_validate() {
    Jail::expect_with(|jail| {
        jail.create_file("hook-secret", "hook-SECRET\n")?;
        jail.create_file(
            "r.toml",
            r#"
[[sink]]
account = 42
path = "/run/app/token.json"

[[sink]]
provider = "tiktok"
subject = "-000abc"
path = "/run/app/token"
format = "token"
mode = "0640"

[notify.webhook]
url = "https://hooks.example.com/refreshd"
secret_file = "hook-secret"
retries = 2
"#,
        )?;
        let c = Config::load(Some(Path::new("r.toml"))).map_err(|e| e.to_string())?;
        assert_eq!(c.sink.len(), 2);
        assert_eq!(c.sink[0].account, Some(42));
        assert_eq!(c.sink[0].format, SinkFormat::Json);
        assert_eq!(c.sink[0].mode, 0o600);
        assert_eq!(c.sink[1].format, SinkFormat::Token);
        assert_eq!(c.sink[1].mode, 0o640);
        let w = c.notify.webhook.as_ref().unwrap();
        use secrecy::ExposeSecret;
        assert_eq!(w.secret.as_ref().unwrap().expose_secret(), "hook-SECRET");
        assert_eq!(w.retries, 2);
        assert_eq!(w.timeout, Duration::from_secs(10));
        assert!(!format!("{c:?}").contains("SECRET"));
        Ok(())
    });
}

#[test]
fn bad_sinks_and_webhooks_are_named() {
    let cases = [
        ("[[sink]]\npath = \"/t\"\n", "sink[0].account"),
        (
            "[[sink]]\nprovider = \"tiktok\"\npath = \"/t\"\n",
            "sink[0].subject",
        ),
        (
            "[[sink]]\naccount = 1\npath = \"/t\"\n[[sink]]\naccount = 2\npath = \"/t\"\n",
            "sink[1].path",
        ),
        (
            "[[sink]]\naccount = 1\npath = \"/t\"\nmode = \"0666\"\n",
            "sink[0].mode",
        ),
        (
            "[[sink]]\naccount = 1\npath = \"/t\"\nmode = \"rw\"\n",
            "not an octal file mode",
        ),
        (
            "[[sink]]\naccount = 1\npath = \"/t\"\nformat = \"yaml\"\n",
            "sink",
        ),
        (
            "[notify.webhook]\nurl = \"http://hooks.example.com/x\"\nsecret = \"s\"\n",
            "notify.webhook.url",
        ),
        (
            "[notify.webhook]\nurl = \"https://hooks.example.com/x\"\n",
            "notify.webhook.secret",
        ),
    ];
    for (toml, want) in cases {
        let err = Config::from_toml_str(toml).unwrap_err().to_string();
        assert!(err.contains(want), "{toml}: {err}");
    }
    // A secret in a bad place is not echoed.
    let err = Config::from_toml_str("[notify.webhook]\nurl = 5\nsecret = 7\n")
        .unwrap_err()
        .to_string();
    assert!(!err.contains('7'), "{err}");
    // A webhook URL's path is often its secret: neither errors nor Debug show it.
    let err = Config::from_toml_str(
        "[notify.webhook]\nurl = \"http://hooks.example.com/T0/B0/PATH-SECRET\"\nsecret = \"s\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("http://hooks.example.com/…"), "{err}");
    assert!(!err.contains("PATH-SECRET"), "{err}");
    let c = Config::from_toml_str(
        "[notify.webhook]\nurl = \"https://hooks.example.com/T0/B0/PATH-SECRET\"\nsecret = \"s\"\n",
    )
    .unwrap();
    assert!(!format!("{c:?}").contains("PATH-SECRET"));
}

#[test]
fn example_config_sink_and_webhook_examples_load_when_uncommented() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/refreshd.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let start = text.find("# ---- Token files").expect("sink section");
    let (head, tail) = text.split_at(start);
    let uncommented: String = tail
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest) if rest.starts_with('[') || rest.contains(" = ") => rest,
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
        .replace("/etc/refreshd/webhook-secret", "webhook-secret");
    Jail::expect_with(|jail| {
        jail.create_file("client_secret", "s")?;
        jail.create_file("webhook-secret", "w")?;
        jail.create_file("r.toml", &format!("{head}{uncommented}"))?;
        let c = Config::load(Some(Path::new("r.toml"))).map_err(|e| e.to_string())?;
        assert_eq!(c.sink.len(), 2);
        assert_eq!(c.sink[1].format, SinkFormat::Token);
        let w = c.notify.webhook.expect("webhook");
        let d = Config::from_toml_str(
            "[notify.webhook]\nurl = \"https://h.example.com/\"\nsecret = \"w\"\n",
        )
        .unwrap()
        .notify
        .webhook
        .unwrap();
        // the example documents the defaults
        assert_eq!(
            (w.timeout, w.retries, w.backoff_base, w.backoff_max, w.queue),
            (d.timeout, d.retries, d.backoff_base, d.backoff_max, d.queue)
        );
        assert_eq!(c.sink[0].mode, 0o600);
        Ok(())
    });
}

#[test]
fn keep_alive_is_validated_against_the_floors_and_the_refresh_lifetime() {
    let with = |extra: &str| {
        Config::from_toml_str(&format!(
            "[providers.own]\nkind = \"generic\"\nclient_key = \"k\"\nclient_secret = \"s\"\ntoken_url = \"https://auth.example/t\"\n{extra}"
        ))
    };
    let key = "providers.own.refresh_at_least_every";
    let ok = with("refresh_at_least_every = \"30d\"\n").unwrap();
    assert_eq!(
        ok.keep_alive_of("own"),
        Some(Duration::from_secs(30 * 86_400))
    );
    assert_eq!(with("").unwrap().keep_alive_of("own"), None);
    for (extra, says) in [
        ("refresh_at_least_every = \"0s\"\n", "more than 0s"),
        ("refresh_at_least_every = \"30s\"\n", "refresh.min_interval"),
        (
            "refresh_at_least_every = \"2h\"\nmin_token_age = \"1d\"\n",
            "min_token_age",
        ),
        // Sliding 30 days with the 7-day window: at most 23 days between refreshes.
        (
            "refresh_at_least_every = \"23d\"\nrefresh_ttl = \"sliding\"\nrefresh_token_lifetime = \"30d\"\n",
            "minus reauth.window",
        ),
        (
            "refresh_at_least_every = \"30d\"\nrefresh_ttl = \"fixed\"\nrefresh_token_lifetime = \"30d\"\n",
            "shorter than refresh_token_lifetime (30days)",
        ),
    ] {
        let err = with(extra).unwrap_err().to_string();
        assert!(err.contains(key) && err.contains(says), "{extra}: {err}");
    }
    let fine = "refresh_at_least_every = \"22d\"\nrefresh_ttl = \"sliding\"\nrefresh_token_lifetime = \"30d\"\n";
    assert!(with(fine).is_ok());
}

#[test]
fn the_admin_page_is_off_by_default_and_needs_the_api_secret_and_a_listener() {
    assert!(!Config::from_toml_str("").unwrap().server.admin_page);
    for server in [
        "listen = \"127.0.0.1:0\"\nadmin_page = true\n",
        "admin_page = true\napi_token_file = \"/nonexistent/api-token\"\n",
    ] {
        let e = Config::from_toml_str(&format!("[server]\n{server}"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("server.admin_page") && e.contains("server.api_token_file"),
            "{server}: {e}"
        );
    }
}

#[test]
fn log_refreshes_is_info_by_default_and_a_bad_value_names_its_key() {
    Jail::expect_with(|jail| {
        jail.create_file("refreshd.toml", GOOD)?;
        let c = Config::load(None).map_err(|e| e.to_string())?;
        assert_eq!(c.log.refreshes, RefreshLines::Info);
        jail.set_env("REFRESHD_LOG__REFRESHES", "debug");
        let c = Config::load(None).map_err(|e| e.to_string())?;
        assert_eq!(c.log.refreshes, RefreshLines::Debug);
        jail.set_env("REFRESHD_LOG__REFRESHES", "loud");
        let err = Config::load(None).unwrap_err().to_string();
        assert!(err.contains("log.refreshes"), "{err}");
        Ok(())
    });
}

#[test]
fn app_tokens_of_the_config_are_read_and_bad_names_named() {
    let base = "[providers.tiktok]\nclient_key = \"k\"\nclient_secret = \"s\"\n";
    let c = Config::from_toml_str(&format!(
        "{base}[providers.tiktok.apps.research]\nscope = \"research.data.basic\"\n[providers.tiktok.apps.plain]\n"
    ))
    .unwrap();
    let apps = &c.providers["tiktok"].apps;
    assert_eq!(apps["research"].scope, "research.data.basic");
    assert_eq!(apps["plain"].scope, "");
    let err = Config::from_toml_str(&format!("{base}[providers.tiktok.apps.\"a b\"]\n"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("providers.tiktok.apps.a b"), "{err}");
}
