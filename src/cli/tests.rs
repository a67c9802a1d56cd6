//! The clap definitions' own checks: help on every argument, no `--config` where none is
//! read, and the committed CLI reference equal to what they render.

use super::*;
use clap::{CommandFactory, Parser};
use refreshd::model::Status;

const REFERENCE: &str = "docs/src/reference/cli.md";

/// Every command, depth first, with its path.
fn commands(cmd: &clap::Command, path: String, out: &mut Vec<(String, clap::Command)>) {
    out.push((path.clone(), cmd.clone()));
    for sub in cmd.get_subcommands() {
        commands(sub, format!("{path} {}", sub.get_name()), out);
    }
}

#[test]
fn every_option_and_argument_has_help() {
    let mut root = Cli::command();
    root.build();
    let mut all = Vec::new();
    commands(&root, "refreshd".into(), &mut all);
    let mut missing = Vec::new();
    for (path, cmd) in &all {
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if arg.is_hide_set() || id == "help" || id == "version" {
                continue;
            }
            if arg.get_help().is_none() && arg.get_long_help().is_none() {
                missing.push(format!("{path}: {id}"));
            }
        }
        if cmd.get_about().is_none() && path != "refreshd" {
            missing.push(format!("{path}: the command itself"));
        }
    }
    assert!(missing.is_empty(), "no help text: {missing:#?}");
}

#[test]
fn commands_that_read_no_config_do_not_offer_it() {
    let mut root = Cli::command();
    root.build();
    for name in ["demo", "keygen", "sandbox", "completions", "man"] {
        let sub = root.find_subcommand_mut(name).unwrap();
        let help = sub.render_long_help().to_string();
        assert!(
            !help.contains("--config"),
            "{name} offers --config:\n{help}"
        );
    }
}

#[test]
fn status_lists_its_values() {
    let err = Cli::try_parse_from(["refreshd", "accounts", "list", "--status", "bogus"])
        .err()
        .expect("refused")
        .to_string();
    for s in Status::ALL {
        assert!(err.contains(s.as_str()), "{s} missing from: {err}");
    }
}

/// The committed CLI reference is what the definitions render; REFRESHD_BLESS=1 rewrites it.
#[test]
fn cli_reference_is_current() {
    let rendered = reference::render(Cli::command());
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(REFERENCE);
    if std::env::var("REFRESHD_BLESS").is_ok_and(|v| v == "1") {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &rendered).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == rendered,
        "{REFERENCE} is stale: regenerate it with `REFRESHD_BLESS=1 cargo test --bin refreshd cli_reference`"
    );
}
