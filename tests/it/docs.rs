//! The documentation stays true: every relative link in README.md, the top-level documents
//! and the book (docs/src) resolves to a file (and heading) inside the repository; nothing
//! points outside it; README.md fits its budget; the configuration reference lists exactly
//! the keys the code and config/refreshd.toml know; the metrics reference lists exactly the
//! metrics a running daemon serves; every log event the code emits is documented.

use crate::helpers;
use refreshd::config::Config;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

const README_BUDGET: usize = 12_000;
/// The documents at the top of the repository; the book's pages are under docs/src.
const TOP_LEVEL_DOCUMENTS: &[&str] = &[
    "README.md",
    "ARCHITECTURE.md",
    "SECURITY.md",
    "BENCHMARKS.md",
];
const CONFIG_REFERENCE: &str = "docs/src/reference/configuration.md";
const METRICS_REFERENCE: &str = "docs/src/reference/metrics.md";
const EVENTS_REFERENCE: &str = "docs/src/reference/events.md";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

/// Files under `dir` (relative to the repository) whose name ends with one of `exts`,
/// skipping build output and installed dependencies.
fn files_under(dir: &str, exts: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![repo().join(dir)];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if p.is_dir() {
                if !matches!(name.as_str(), "target" | "node_modules" | "book" | ".git") {
                    stack.push(p);
                }
            } else if exts.iter().any(|x| name.ends_with(x)) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The Markdown documents whose links must resolve.
fn documents() -> Vec<PathBuf> {
    let mut docs: Vec<PathBuf> = TOP_LEVEL_DOCUMENTS.iter().map(|f| repo().join(f)).collect();
    docs.extend(files_under("docs/src", &[".md"]));
    docs
}

fn rel(p: &Path) -> String {
    p.strip_prefix(repo()).unwrap_or(p).display().to_string()
}

/// Lines outside fenced code blocks, as written, numbered from 1.
fn unfenced_lines(text: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut fence: Option<&str> = None;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim_start();
        let marker = if t.starts_with("```") {
            Some("```")
        } else if t.starts_with("~~~") {
            Some("~~~")
        } else {
            None
        };
        match (fence, marker) {
            (None, Some(m)) => fence = Some(m),
            (Some(f), Some(m)) if f == m => fence = None,
            (None, None) => out.push((i + 1, line)),
            _ => {}
        }
    }
    out
}

/// Lines outside fenced code blocks with inline code spans blanked out: what can hold a
/// link.
fn prose_lines(text: &str) -> Vec<(usize, String)> {
    unfenced_lines(text)
        .into_iter()
        .map(|(n, l)| (n, blank_code_spans(l)))
        .collect()
}

fn blank_code_spans(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut in_code = false;
    for c in line.chars() {
        if c == '`' {
            in_code = !in_code;
            out.push(' ');
        } else {
            out.push(if in_code { ' ' } else { c });
        }
    }
    out
}

/// Link targets of one document: inline links `[text](target "title")`, images, and
/// reference definitions `[label]: target`, with their line numbers.
fn links(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (n, line) in prose_lines(text) {
        let mut rest = line.as_str();
        while let Some(i) = rest.find("](") {
            let after = &rest[i + 2..];
            let Some(end) = after.find(')') else { break };
            let target = after[..end].split_whitespace().next().unwrap_or("");
            out.push((n, target.trim_matches(['<', '>']).to_string()));
            rest = &after[end..];
        }
        let t = line.trim_start();
        if t.starts_with('[')
            && let Some((_, def)) = t.split_once("]: ")
            && !t.starts_with("[^")
        {
            out.push((n, def.split_whitespace().next().unwrap_or("").to_string()));
        }
    }
    out
}

/// mdBook's and GitHub's anchor of a heading: lower case, punctuation dropped, spaces to
/// hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors a page offers: its headings (numbered when repeated, as renderers do), and
/// those of the files it includes with mdBook's `{{#include}}`.
fn anchors(path: &Path) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    let Ok(text) = std::fs::read_to_string(path) else {
        return out;
    };
    for (_, line) in unfenced_lines(&text) {
        if let Some(target) = include_target(line) {
            out.extend(anchors(&path.parent().unwrap().join(target)));
            continue;
        }
        let t = line.trim_start();
        if !t.starts_with('#') {
            continue;
        }
        let title = t.trim_start_matches('#');
        if !title.starts_with(' ') {
            continue;
        }
        let s = slug(title.trim_end_matches('#'));
        let n = seen.entry(s.clone()).or_insert(0);
        let anchor = match *n {
            0 => s,
            n => format!("{s}-{n}"),
        };
        out.insert(anchor);
        *n += 1;
    }
    out
}

/// The file of an mdBook `{{#include FILE}}` or `{{#include FILE:START:END}}` line.
fn include_target(line: &str) -> Option<&str> {
    let inner = line
        .trim()
        .strip_prefix("{{#include ")?
        .strip_suffix("}}")?;
    Some(inner.split(':').next().unwrap_or(inner).trim())
}

/// `a/../b/./c` without touching the file system, so a missing file can still be named.
fn normalise(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// The part of `file` an mdBook `{{#include FILE:SPEC}}` takes: all of it, lines
/// `START:END` (1-based, either may be empty), or the lines between `ANCHOR: name` and
/// `ANCHOR_END: name` (anchor lines themselves dropped, as mdBook does).
fn included_part(text: &str, spec: Option<&str>) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let keep = |l: &&&str| !l.contains("ANCHOR:") && !l.contains("ANCHOR_END:");
    let part: Vec<&str> = match spec {
        None => lines.iter().filter(keep).copied().collect(),
        Some(spec) if spec.starts_with(|c: char| c.is_ascii_digit() || c == ':') => {
            let (a, b) = spec.split_once(':').unwrap_or((spec, spec));
            let a = a.parse::<usize>().unwrap_or(1).max(1);
            let b = b.parse::<usize>().unwrap_or(lines.len()).min(lines.len());
            lines[a - 1..b].iter().filter(keep).copied().collect()
        }
        Some(name) => {
            let start = format!("ANCHOR: {name}");
            let end = format!("ANCHOR_END: {name}");
            let from = lines.iter().position(|l| l.contains(&start));
            let from = from.unwrap_or_else(|| panic!("no `{start}` in the included file"));
            lines[from + 1..]
                .iter()
                .take_while(|l| !l.contains(&end))
                .filter(keep)
                .copied()
                .collect()
        }
    };
    part.join("\n")
}

#[test]
fn every_relative_link_resolves_inside_the_repository() {
    let root = repo();
    let mut problems = Vec::new();
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).unwrap();
        let here = doc.parent().unwrap();
        // The links of what the page includes are read from the page, as mdBook renders
        // them there: `(label, text)` of the page and of each part it includes.
        let mut parts = vec![(rel(&doc), text.clone())];
        for (line, l) in prose_lines(&text) {
            let Some(target) = include_target(&l) else {
                continue;
            };
            let path = normalise(&here.join(target));
            let Ok(included) = std::fs::read_to_string(&path) else {
                continue;
            };
            let inner = l
                .trim()
                .trim_start_matches("{{#include ")
                .trim_end_matches("}}");
            let spec = inner.split_once(':').map(|(_, s)| s.trim());
            parts.push((
                format!("{}:{line}, including {}", rel(&doc), rel(&path)),
                included_part(&included, spec),
            ));
        }
        for (label, text) in &parts {
            for (line, target) in links(text) {
                let at = format!("{label}:{line}");
                if target.is_empty() {
                    problems.push(format!("{at}: an empty link"));
                    continue;
                }
                if target.contains("://") || target.starts_with("mailto:") {
                    problems.push(format!(
                    "{at}: {target} leaves the repository: name it in `code` instead, or link a page inside the repository"
                ));
                    continue;
                }
                let (file, anchor) = match target.split_once('#') {
                    Some((f, a)) => (f, Some(a)),
                    None => (target.as_str(), None),
                };
                let path = if file.is_empty() {
                    doc.clone()
                } else if let Some(abs) = file.strip_prefix('/') {
                    root.join(abs)
                } else {
                    normalise(&here.join(file))
                };
                if !path.starts_with(&root) {
                    problems.push(format!(
                        "{at}: {target} resolves outside the repository ({})",
                        path.display()
                    ));
                    continue;
                }
                if !path.exists() {
                    problems.push(format!(
                        "{at}: {target} names {}, which does not exist",
                        rel(&path)
                    ));
                    continue;
                }
                if let Some(a) = anchor
                    && path.extension().is_some_and(|e| e == "md")
                    && !anchors(&path).contains(a)
                {
                    problems.push(format!(
                        "{at}: {target}: {} has no heading with the anchor #{a}",
                        rel(&path)
                    ));
                }
            }
        }
        for (line, l) in prose_lines(&text) {
            if let Some(target) = include_target(&l) {
                let path = normalise(&here.join(target));
                if !path.starts_with(&root) || !path.exists() {
                    problems.push(format!(
                        "{}:{line}: {{{{#include {target}}}}} names no file in the repository",
                        rel(&doc)
                    ));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "broken links (fix the link or the heading it points at):\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn the_summary_names_every_page_and_every_page_it_names_is_in_the_book() {
    let summary = read("docs/src/SUMMARY.md");
    let named: BTreeSet<String> = links(&summary)
        .into_iter()
        .map(|(_, t)| format!("docs/src/{t}"))
        .collect();
    let pages: BTreeSet<String> = files_under("docs/src", &[".md"])
        .iter()
        .map(|p| rel(p))
        .filter(|p| p != "docs/src/SUMMARY.md")
        .collect();
    let unlisted: Vec<_> = pages.difference(&named).collect();
    assert!(
        unlisted.is_empty(),
        "pages the book does not show: add them to docs/src/SUMMARY.md: {unlisted:?}"
    );
}

#[test]
fn no_file_points_at_the_shared_folder_outside_the_repository() {
    // Built at run time so that this file does not name it.
    let needle = ["..", "/shared/"].concat();
    let mut found = Vec::new();
    let mut files: Vec<PathBuf> = TOP_LEVEL_DOCUMENTS.iter().map(|f| repo().join(f)).collect();
    for dir in ["docs", "src", "tests", "deploy", "config", ".ci"] {
        files.extend(files_under(dir, &[""]));
    }
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue; // binary files
        };
        for (i, line) in text.lines().enumerate() {
            if line.contains(&needle) {
                found.push(format!("{}:{}: {}", rel(&f), i + 1, line.trim()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "files outside the repository are not there for a reader: point at ARCHITECTURE.md or a docs/src page instead:\n  {}",
        found.join("\n  ")
    );
}

#[test]
fn readme_fits_its_budget() {
    let size = std::fs::metadata(repo().join("README.md")).unwrap().len() as usize;
    assert!(
        size <= README_BUDGET,
        "README.md is {size} bytes, more than {README_BUDGET}: move the detail into a docs/src page and link it"
    );
}

#[test]
fn readme_starts_with_the_two_commands() {
    let readme = read("README.md");
    let block: Vec<&str> = readme
        .split("```")
        .nth(1)
        .expect("README.md has a fenced block")
        .lines()
        .skip(1) // the info string
        .filter(|l| !l.trim().is_empty())
        .collect();
    let command = |l: &str| l.split('#').next().unwrap_or("").trim().to_string();
    assert_eq!(
        block.iter().take(2).map(|l| command(l)).collect::<Vec<_>>(),
        ["cargo run -- demo", "cargo test --locked"],
        "CI runs the first two commands of README.md's first fenced block"
    );
}

/// The keys a config table accepts, as serde lists them when it meets an unknown one. None
/// when `toml` does not make serde name them (a scalar, or the wrong shape of table).
fn accepted_keys(toml: &str) -> Option<Vec<String>> {
    let err = Config::from_toml_str(toml).err()?.to_string();
    let list = err.split("unknown key; expected one of: ").nth(1)?;
    let list = list.lines().next().unwrap_or(list);
    Some(
        list.split(", ")
            .map(|k| {
                k.trim_matches(|c: char| c == '`' || c.is_whitespace())
                    .to_string()
            })
            .collect(),
    )
}

/// Every key the code's config types know, as documented keys are written: `store.path`,
/// `providers.NAME.client_key`, `sink.path`, `notify.webhook.url`. Derived from the types
/// themselves (serde's list of fields), not kept by hand.
fn keys_the_code_knows() -> BTreeSet<String> {
    const UNKNOWN: &str = "zzz_not_a_key = 1\n";
    // A table at `path` (dotted, as written in TOML) in each shape serde may want: a struct,
    // a map of structs (one entry, written as NAME), or an array of tables.
    let probe = |path: &str| -> Option<(String, Vec<String>)> {
        if let Some(keys) = accepted_keys(&format!("[{path}]\n{UNKNOWN}")) {
            return Some((path.to_string(), keys));
        }
        if let Some(keys) = accepted_keys(&format!("[{path}.probe]\n{UNKNOWN}")) {
            return Some((format!("{path}.NAME"), keys));
        }
        accepted_keys(&format!("[[{path}]]\n{UNKNOWN}")).map(|keys| (path.to_string(), keys))
    };
    let mut out = BTreeSet::new();
    let mut tables = vec![(String::new(), accepted_keys(UNKNOWN).expect("top level"))];
    while let Some((prefix, keys)) = tables.pop() {
        for key in keys {
            let (written, toml_path) = if prefix.is_empty() {
                (key.clone(), key.clone())
            } else {
                (
                    format!("{prefix}.{key}"),
                    format!("{}.{key}", prefix.replace(".NAME", ".probe")),
                )
            };
            match probe(&toml_path) {
                Some((shape, inner)) => {
                    tables.push((
                        if prefix.is_empty() {
                            shape
                        } else {
                            written.clone() + &shape[toml_path.len()..]
                        },
                        inner,
                    ));
                }
                None => {
                    out.insert(written);
                }
            }
        }
    }
    out
}

/// Keys of config/refreshd.toml, set or shown commented out, with the value written and
/// whether it is commented out (an unset default or an example).
fn keys_of_the_example() -> BTreeMap<String, (String, bool)> {
    let mut out = BTreeMap::new();
    let mut table = String::new();
    for line in read("config/refreshd.toml").lines() {
        let (body, commented) = match line.strip_prefix("# ") {
            Some(b) if !b.starts_with("# ") => (b, true),
            Some(_) => continue, // a comment inside a commented-out example
            None if line.starts_with('#') => continue,
            None => (line, false),
        };
        let header = body.trim().trim_start_matches('[').trim_end_matches(']');
        if body.trim().starts_with('[') && !header.contains(' ') && !header.is_empty() {
            table = match header.split('.').collect::<Vec<_>>()[..] {
                ["providers", _, "apps", _] => "providers.NAME.apps.NAME".into(),
                ["providers", ..] => "providers.NAME".into(),
                _ => header.to_string(),
            };
            continue;
        }
        if let Some((k, v)) = body.split_once(" = ")
            && !k.is_empty()
            && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
            && !table.is_empty()
        {
            out.entry(format!("{table}.{k}"))
                .or_insert((v.trim().to_string(), commented));
        }
    }
    out
}

/// The configuration reference's rows: key -> (default, environment) cells.
fn keys_of_the_reference() -> BTreeMap<String, (String, String)> {
    let mut out = BTreeMap::new();
    for line in read(CONFIG_REFERENCE).lines() {
        let cells: Vec<&str> = line.split(" | ").map(str::trim).collect();
        if cells.len() < 4 || !cells[0].starts_with("| `") {
            continue;
        }
        let key = cells[0].trim_start_matches("| ").trim_matches('`');
        if key.contains('.') {
            out.insert(
                key.to_string(),
                (cells[1].to_string(), cells[2].to_string()),
            );
        }
    }
    out
}

#[test]
fn the_configuration_reference_lists_every_key_and_only_keys() {
    let code = keys_the_code_knows();
    assert!(
        code.contains("store.path")
            && code.contains("providers.NAME.client_key")
            && code.contains("sink.path")
            && code.contains("notify.webhook.url"),
        "the key list from the config types looks wrong: {code:?}"
    );
    let example = keys_of_the_example();
    let documented = keys_of_the_reference();
    let missing: Vec<_> = code
        .iter()
        .filter(|k| !documented.contains_key(*k))
        .collect();
    assert!(
        missing.is_empty(),
        "keys the code accepts but {CONFIG_REFERENCE} does not describe: add a row for each: {missing:?}"
    );
    let missing: Vec<_> = example
        .keys()
        .filter(|k| !documented.contains_key(*k))
        .collect();
    assert!(
        missing.is_empty(),
        "keys of config/refreshd.toml that {CONFIG_REFERENCE} does not describe: add a row for each: {missing:?}"
    );
    let unknown: Vec<_> = documented.keys().filter(|k| !code.contains(*k)).collect();
    assert!(
        unknown.is_empty(),
        "{CONFIG_REFERENCE} describes keys the code does not accept: remove or rename those rows: {unknown:?}"
    );
}

#[test]
fn the_configuration_reference_gives_each_key_its_default_and_environment_form() {
    let documented = keys_of_the_reference();
    let example = keys_of_the_example();
    let mut problems = Vec::new();
    for (key, (default, env)) in &documented {
        let want_env = if key.starts_with("sink.") {
            "file only".to_string()
        } else {
            format!("`REFRESHD_{}`", key.to_uppercase().replace('.', "__"))
        };
        if *env != want_env {
            problems.push(format!("{key}: environment {env}, expected {want_env}"));
        }
        // config/refreshd.toml shows each default of these sections (a test in config.rs
        // keeps it equal to the code's): the reference must say the same.
        let section = key.split('.').next().unwrap_or("");
        if ["providers", "sink", "notify"].contains(&section) {
            continue;
        }
        match example.get(key) {
            Some((value, false)) if *default != format!("`{value}`") => problems.push(format!(
                "{key}: default {default}, but config/refreshd.toml says {value}"
            )),
            Some((_, true)) if default != "unset" => problems.push(format!(
                "{key}: default {default}, but config/refreshd.toml leaves it unset"
            )),
            _ => {}
        }
    }
    assert!(
        problems.is_empty(),
        "fix these rows of {CONFIG_REFERENCE}:\n  {}",
        problems.join("\n  ")
    );
}

/// The metric names a Prometheus query uses, from the `# TYPE` lines of a scrape (counters
/// are queried with their `_total` suffix).
fn served_metrics(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, kind)| match kind {
            "counter" => format!("{name}_total"),
            _ => name.to_string(),
        })
        .collect()
}

fn documented_metrics() -> BTreeSet<String> {
    read(METRICS_REFERENCE)
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter(|m| m.starts_with("refreshd_") || m.starts_with("process_"))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_reference_lists_every_metric_the_daemon_serves() {
    let scrape = helpers::scrape_after_refreshes().await;
    let served = served_metrics(&scrape);
    assert!(served.len() >= 5, "a real scrape: {scrape}");
    let documented = documented_metrics();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "/metrics serves metrics that {METRICS_REFERENCE} does not list: add a row for each: {undocumented:?}"
    );
    let gone: Vec<_> = documented.difference(&served).collect();
    assert!(
        gone.is_empty(),
        "{METRICS_REFERENCE} lists metrics that /metrics does not serve: remove or rename those rows: {gone:?}"
    );
}

/// `event = "name"` in the code's log calls.
fn events_in_code() -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for f in files_under("src", &[".rs"]) {
        let text = std::fs::read_to_string(&f).unwrap();
        for (i, line) in text.lines().enumerate() {
            let mut rest = line;
            while let Some(at) = rest.find("event = \"") {
                let after = &rest[at + "event = \"".len()..];
                let Some(end) = after.find('"') else { break };
                out.entry(after[..end].to_string())
                    .or_insert_with(|| format!("{}:{}", rel(&f), i + 1));
                rest = &after[end..];
            }
        }
    }
    out
}

#[test]
fn every_log_event_is_documented() {
    let events = events_in_code();
    assert!(events.contains_key("reauth_required"), "{events:?}");
    let book: String = files_under("docs/src", &[".md"])
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    let missing: Vec<String> = events
        .iter()
        .filter(|(name, _)| !book.contains(&format!("`{name}`")))
        .map(|(name, at)| format!("{name} ({at})"))
        .collect();
    assert!(
        missing.is_empty(),
        "log events no page of the book names: add a row for each to {EVENTS_REFERENCE}:\n  {}",
        missing.join("\n  ")
    );
}

#[test]
fn slugs_and_links_are_read_as_renderers_do() {
    assert_eq!(
        slug(" Connecting from your app (web endpoints)"),
        "connecting-from-your-app-web-endpoints"
    );
    assert_eq!(slug(" `[providers.NAME]`"), "providersname");
    let text = "See [a](a.md#x) and `[not](code.md)`.\n```\n[no](fenced.md)\n```\n[ref]: b.md\n";
    assert_eq!(
        links(text),
        [(1, "a.md#x".to_string()), (5, "b.md".to_string())]
    );
}
