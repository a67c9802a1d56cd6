//! `refreshd check`: the config, the providers' settings, sinks, webhook, encryption, the
//! secret files' modes and the store, one finding a line (or one JSON object); exit 1 on a
//! problem, 78 when the config does not load.

use super::{Cli, exit, load_config, quiet_logs};
use anyhow::Result;
use refreshd::lifecycle;
use refreshd::store::Store;

pub async fn check(cli: &Cli, full: bool, json: bool) -> Result<u8> {
    let mut lines: Vec<String> = Vec::new();
    let config = match load_config(cli) {
        Ok(c) => c,
        Err(e) => {
            if json {
                print_check(&[format!("config: FAILED\n  {e}")], false, true);
            } else {
                eprintln!("config: FAILED\n  {e}");
            }
            return Ok(exit::CONFIG);
        }
    };
    quiet_logs(&config);
    lines.push(format!(
        "config: ok ({})",
        config
            .file
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "built-in defaults and environment".into())
    ));
    let mut ok = true;
    if config.providers.is_empty() {
        lines.push("providers: none configured (add a [providers.tiktok] table)".into());
        ok = false;
    }
    match refreshd::provider::Providers::from_config(&config) {
        Ok(p) => {
            for (name, pc) in &config.providers {
                let state = if pc.enabled { "enabled" } else { "disabled" };
                let url = p
                    .get(name)
                    .map(|p| p.token_url().to_string())
                    .unwrap_or_default();
                lines.push(format!(
                    "provider {name}: ok, {state}, kind {}, token endpoint {url}",
                    pc.kind(name)
                ));
                if let Some(prof) = p.get(name).map(|p| p.profile()) {
                    for w in refreshd::provider::advice::lifetime_warnings(
                        name,
                        prof,
                        config.reauth.window,
                    ) {
                        lines.push(format!("warning: {w}"));
                    }
                }
            }
        }
        Err(e) => {
            lines.push(format!("providers: FAILED\n  {e}"));
            ok = false;
        }
    }
    for (line, fine) in refreshd::sink::check(&config.sink) {
        lines.push(line);
        ok &= fine;
    }
    if let Some(w) = &config.notify.webhook {
        lines.push(format!(
            "webhook: ok, POST to {} (retries {}, queue {})",
            refreshd::config::redact_url(&w.url),
            w.retries,
            w.queue
        ));
    }
    match config.store.keyring.primary_id() {
        Some(id) => lines.push(format!(
            "encryption: on, sealing with key {id}; keys: {}",
            config.store.keyring.describe()
        )),
        None => lines.push(
            "encryption: off (tokens stored in the clear; see store.encryption_key_file)".into(),
        ),
    }
    for (file, mode) in refreshd::hardening::exposed(&refreshd::hardening::secret_files(&config)) {
        lines.push(format!(
            "files: {} has mode {mode:03o}, readable by other users: chmod 600 it",
            file.display()
        ));
        if config.store.permissions == refreshd::config::FilePolicy::Refuse {
            ok = false;
        }
    }
    let path = &config.store.path;
    if path.exists() || config.store.url.is_some() {
        match Store::open_read_only(lifecycle::store_options(&config)).await {
            Ok(store) => {
                let counts = store.counts().await?;
                let total: i64 = counts.iter().map(|(_, _, n)| n).sum();
                let unknown: Vec<&String> = counts
                    .iter()
                    .map(|(p, _, _)| p)
                    .filter(|p| !config.providers.contains_key(*p))
                    .collect();
                lines.push(format!(
                    "store: ok ({}, {total} accounts)",
                    store.describe()
                ));
                if config.store.url.is_none() {
                    for (line, fine) in refreshd::store::check_report(path, full) {
                        lines.push(line);
                        ok &= fine;
                    }
                }
                let unsealed = store.count_to_rekey().await?;
                if unsealed > 0 {
                    lines.push(format!(
                        "store: {unsealed} account(s) not sealed under the primary key yet: run `refreshd rekey`"
                    ));
                }
                for p in unknown {
                    lines.push(format!(
                        "store: accounts of provider {p:?} exist but it is not configured"
                    ));
                    ok = false;
                }
                store.close().await;
            }
            Err(e) => {
                lines.push(format!("store: FAILED\n  {e}"));
                ok = false;
                if config.store.url.is_none() {
                    for (line, _) in refreshd::store::check_report(path, full) {
                        lines.push(line);
                    }
                }
            }
        }
    } else {
        lines.push(format!(
            "store: {} does not exist yet; `refreshd accounts import` (or `refreshd run` with store.create = true) creates it",
            path.display()
        ));
    }
    print_check(&lines, ok, json);
    Ok(if ok { exit::OK } else { exit::ERROR })
}

/// `check`'s findings: the lines as text, or with `--json` one object (see
/// [`findings_json`]).
fn print_check(lines: &[String], ok: bool, json: bool) {
    if json {
        println!("{}", findings_json(lines, ok));
    } else {
        for l in lines {
            println!("{l}");
        }
    }
}

/// `{"ok": bool, "checks": [{"check": "store", "message": "ok (...)"}, ...]}`, whose
/// `check` is each line's subject (config, providers, provider NAME, store, encryption,
/// files...).
fn findings_json(lines: &[String], ok: bool) -> serde_json::Value {
    let checks: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| {
            let (check, message) = l.split_once(": ").unwrap_or(("", l));
            serde_json::json!({"check": check, "message": message})
        })
        .collect();
    serde_json::json!({"ok": ok, "checks": checks})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_finding_is_named_by_its_subject() {
        let lines = [
            "config: ok (refreshd.toml)".to_string(),
            "provider tiktok: ok, enabled".to_string(),
            "store: FAILED\n  database is locked: retry".to_string(),
            "no subject".to_string(),
        ];
        let v = findings_json(&lines, false);
        assert_eq!(v["ok"], false);
        let checks = v["checks"].as_array().unwrap();
        assert_eq!(checks[0]["check"], "config");
        assert_eq!(checks[1]["check"], "provider tiktok");
        assert_eq!(checks[1]["message"], "ok, enabled");
        assert_eq!(checks[2]["message"], "FAILED\n  database is locked: retry");
        assert_eq!(checks[3]["check"], "");
        assert_eq!(checks[3]["message"], "no subject");
    }
}
