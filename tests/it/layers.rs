//! The library's layering (ARCHITECTURE.md, "Layers"), kept by reading src/: every
//! `crate::` path, `super::` path and path into a child module is an arrow from its file's
//! module to another module. Each arrow must point to the same layer or below; the store's
//! backends import neither each other nor the facade; and no files import each other in a
//! loop. Test code (`#[cfg(test)]` items, `tests.rs` files) and the binary (main.rs, cli/)
//! are not read: the binary reaches the library only as `refreshd::`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The allowed layers, lowest first; a module takes the entry of its longest prefix
/// (`provider::profile::x` is `provider::profile`, `provider` alone is provider/mod.rs).
const LAYERS: &[(&str, u8)] = &[
    // 1 base: plain data, time, keys, in-process signals.
    ("clock", 1),
    ("events", 1),
    ("subject", 1),
    ("crypto", 1),
    ("model", 1),
    ("circuit", 1),
    ("provider_state", 1),
    ("permits", 1),
    // 2 rules: pure decisions and provider descriptions; no I/O.
    ("policy", 2),
    ("provider::failure", 2),
    ("provider::profile", 2),
    ("provider::response", 2),
    ("provider::tiktok", 2),
    ("provider::advice", 2),
    ("provider::builtin", 2),
    // 3 config: settings as the user wrote them, validated into types.
    ("config", 3),
    // 4 services: I/O over one resource each.
    ("store", 4),
    ("provider", 4),
    ("metrics", 4),
    ("telemetry", 4),
    ("hardening", 4),
    // 5 work: the refresh loop and what acts on its events.
    ("engine", 5),
    ("connect", 5),
    ("notify", 5),
    ("sink", 5),
    ("import", 5),
    ("jobs", 5),
    ("plan", 5),
    // 6 daemon: wiring the process together.
    ("server", 6),
    ("lifecycle", 6),
    // 7 tools: programs built on the daemon.
    ("demo", 7),
    ("sandbox", 7),
];

/// The layers' names, by number.
const LAYER_NAMES: [&str; 8] = [
    "", "base", "rules", "config", "services", "work", "daemon", "tools",
];

/// The store's backends: they import only the shared base files of store/.
const STORE_BACKENDS: &[&str] = &["store::sqlite", "store::postgres"];

/// Arrows (from module, to module) that break the rules today, each removed by the
/// engineer named: the coordinator empties this list as the branches land. An entry that
/// src/ no longer has fails the test, so the list only shrinks.
const KNOWN: &[(&str, &str)] = &[];

#[test]
fn the_library_keeps_its_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    read_sources(&src, &src, &mut files);
    assert!(
        files.len() > 20,
        "read only {} files under src/",
        files.len()
    );
    let borrowed: Vec<(&str, &str)> = files
        .iter()
        .map(|(p, t)| (p.as_str(), t.as_str()))
        .collect();
    let problems = check(&borrowed, KNOWN);
    assert!(
        problems.is_empty(),
        "the layering of ARCHITECTURE.md (\"Layers\") is broken:\n{}",
        problems.join("\n")
    );
}

/// Every library source under `dir`, as (path relative to src/, text).
fn read_sources(src: &Path, dir: &Path, out: &mut Vec<(String, String)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("src/ readable")
        .map(|e| e.expect("entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            read_sources(src, &path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let rel = path.strip_prefix(src).expect("under src");
            let rel = rel.to_string_lossy().replace('\\', "/");
            let text = std::fs::read_to_string(&path).expect("source readable");
            out.push((rel, text));
        }
    }
}

/// The module a library file defines (`store/sqlite.rs` is `store::sqlite`); None for what
/// is not read: the crate root, the binary, test files.
fn module_of(file: &str) -> Option<String> {
    let stem = file.strip_suffix(".rs")?;
    let parts: Vec<&str> = stem.split('/').collect();
    let name = *parts.last()?;
    if matches!(parts[0], "main" | "lib" | "cli" | "bin") || name == "tests" {
        return None;
    }
    let parts = if name == "mod" {
        &parts[..parts.len() - 1]
    } else {
        &parts[..]
    };
    Some(parts.join("::"))
}

/// Whether `module` is `prefix` or inside it, segment by segment.
fn within(module: &str, prefix: &str) -> bool {
    module == prefix
        || module
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with("::"))
}

/// The layers table's entry for `module` (its longest prefix).
fn layer_of(module: &str) -> Option<(&'static str, u8)> {
    LAYERS
        .iter()
        .filter(|(prefix, _)| within(module, prefix))
        .max_by_key(|(prefix, _)| prefix.len())
        .copied()
}

/// One arrow as written: the file, the path as it stands there, and the module it reaches.
struct Arrow {
    file: String,
    written: String,
    to: String,
}

/// The problems of a file set (paths relative to src/) against the rules; `known` arrows
/// are let through, and reported when no file has them any more.
fn check(files: &[(&str, &str)], known: &[(&str, &str)]) -> Vec<String> {
    let modules: BTreeMap<String, &str> = files
        .iter()
        .filter_map(|(f, _)| module_of(f).map(|m| (m, *f)))
        .collect();
    let mut problems = Vec::new();
    for (module, file) in &modules {
        if layer_of(module).is_none() {
            problems.push(format!(
                "src/{file}: module {module} has no layer: add it to LAYERS in tests/it/layers.rs and to ARCHITECTURE.md"
            ));
        }
    }
    let mut arrows: BTreeMap<(String, String), Arrow> = BTreeMap::new();
    for (file, text) in files {
        let Some(from) = module_of(file) else {
            continue;
        };
        for (written, segments) in paths(&without_tests(&strip(text)), &from, &modules) {
            let Some(to) = resolve(&segments, &modules) else {
                continue;
            };
            if to != from {
                arrows.entry((from.clone(), to.clone())).or_insert(Arrow {
                    file: file.to_string(),
                    written,
                    to,
                });
            }
        }
    }
    let mut seen_known = BTreeSet::new();
    let mut graph: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for ((from, to), arrow) in &arrows {
        if known.contains(&(from.as_str(), to.as_str())) {
            seen_known.insert((from.as_str(), to.as_str()));
            continue;
        }
        // A module using its own child modules is the module tree, not a loop: only the
        // layer rule judges it.
        if !within(to, from) {
            graph.entry(from).or_default().insert(to);
        }
        let where_ = format!("src/{}: `{}`", arrow.file, arrow.written);
        if let (Some((_, nf)), Some((_, nt))) = (layer_of(from), layer_of(&arrow.to))
            && nt > nf
        {
            let (lf, lt) = (LAYER_NAMES[nf as usize], LAYER_NAMES[nt as usize]);
            problems.push(format!(
                "{where_} runs up the layers: {from} is in layer {nf} ({lf}), {to} in layer {nt} ({lt}); a module imports its own layer or below"
            ));
        }
        if let Some(backend) = STORE_BACKENDS.iter().find(|b| within(from, b))
            && (to == "store"
                || STORE_BACKENDS
                    .iter()
                    .any(|other| other != backend && within(to, other)))
        {
            problems.push(format!(
                "{where_}: the store backend {backend} imports {to}; a backend imports only the shared base files of store/, never the facade (store/mod.rs) or the other backend"
            ));
        }
    }
    for cycle in loops(&graph) {
        let files: Vec<String> = cycle
            .iter()
            .map(|m| format!("src/{}", modules.get(*m).copied().unwrap_or("?")))
            .collect();
        let inside: Vec<String> = cycle
            .iter()
            .flat_map(|from| {
                let arrows = &arrows;
                graph[from]
                    .iter()
                    .filter(|to| cycle.contains(to))
                    .map(move |to| {
                        let a = &arrows[&(from.to_string(), to.to_string())];
                        format!("{from} -> {to} (src/{}: `{}`)", a.file, a.written)
                    })
            })
            .collect();
        problems.push(format!(
            "{} import each other in a loop: {}; files must not import each other in a loop",
            files.join(", "),
            inside.join("; ")
        ));
    }
    for (from, to) in known {
        if !seen_known.contains(&(*from, *to)) {
            problems.push(format!(
                "KNOWN lists {from} -> {to}, which src/ no longer has: remove the entry"
            ));
        }
    }
    problems
}

/// The module a path reaches: the longest prefix of its segments that is a module.
fn resolve(segments: &[String], modules: &BTreeMap<String, &str>) -> Option<String> {
    (1..=segments.len())
        .rev()
        .map(|n| segments[..n].join("::"))
        .find(|m| modules.contains_key(m))
}

/// The text without comments, and with every string and char literal emptied.
fn strip(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let at = |i: usize| chars.get(i).copied().unwrap_or('\0');
    while i < chars.len() {
        let c = chars[i];
        if c == '/' && at(i + 1) == '/' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            loop {
                if at(i) == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if at(i) == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else if i >= chars.len() {
                    break;
                } else {
                    i += 1;
                }
            }
        } else if c == 'r'
            && (at(i + 1) == '"' || at(i + 1) == '#')
            && !ident_char(at_prev(&chars, i))
        {
            let mut hashes = 0;
            let mut j = i + 1;
            while at(j) == '#' {
                hashes += 1;
                j += 1;
            }
            if at(j) != '"' {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            let close: Vec<char> = std::iter::once('"')
                .chain(std::iter::repeat_n('#', hashes))
                .collect();
            while j < chars.len() && !chars[j..].starts_with(&close) {
                j += 1;
            }
            out.push_str("\"\"");
            i = j + close.len();
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            out.push_str("\"\"");
            i += 1;
        } else if c == '\'' && at(i + 1) == '\\' {
            // Past the backslash and the escaped character, to the closing quote.
            i += 3;
            while i < chars.len() && chars[i] != '\'' {
                i += 1;
            }
            out.push_str("' '");
            i += 1;
        } else if c == '\'' && at(i + 2) == '\'' {
            out.push_str("' '");
            i += 3;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn at_prev(chars: &[char], i: usize) -> char {
    if i == 0 { '\0' } else { chars[i - 1] }
}

fn ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The code without `#[cfg(test)]` items (test modules import what they like).
fn without_tests(code: &str) -> String {
    const MARK: &str = "#[cfg(test)]";
    let mut out = String::new();
    let mut rest = code;
    while let Some(start) = rest.find(MARK) {
        out.push_str(&rest[..start]);
        let item = &rest[start + MARK.len()..];
        let end = match (item.find(';'), item.find('{')) {
            (Some(semi), Some(brace)) if semi < brace => semi + 1,
            (Some(semi), None) => semi + 1,
            (_, Some(brace)) => {
                let mut depth = 0;
                let mut end = item.len();
                for (k, ch) in item[brace..].char_indices() {
                    match ch {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = brace + k + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                end
            }
            (None, None) => item.len(),
        };
        rest = &item[end..];
    }
    out.push_str(rest);
    out
}

/// The tokens that matter for paths: identifiers, `::`, braces, commas; anything else is
/// a separator.
fn tokens(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let chars: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if ident_char(c) || (c == '$' && chars.get(i + 1).is_some_and(|n| ident_char(*n))) {
            let start = i;
            i += 1;
            while i < chars.len() && ident_char(chars[i]) {
                i += 1;
            }
            out.push(chars[start..i].iter().collect());
        } else if c == ':' && chars.get(i + 1) == Some(&':') {
            out.push("::".into());
            i += 2;
        } else {
            if matches!(c, '{' | '}' | ',') {
                out.push(c.to_string());
            } else if !c.is_whitespace() {
                out.push(".".into());
            }
            i += 1;
        }
    }
    out
}

/// Every path the code writes into the crate, as (the path as written, its absolute
/// segments): `crate::a::b`, `super::x`, `self::x`, a child module's `child::x`, and the
/// branches of `use` groups (`crate::a::{b, c::d}`).
fn paths(code: &str, module: &str, modules: &BTreeMap<String, &str>) -> Vec<(String, Vec<String>)> {
    let toks = tokens(code);
    let here: Vec<String> = if module.is_empty() {
        Vec::new()
    } else {
        module.split("::").map(str::to_string).collect()
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        let starts = (i == 0 || toks[i - 1] != "::") && toks.get(i + 1).is_some_and(|t| t == "::");
        let base: Option<Vec<String>> = if !starts {
            None
        } else {
            match toks[i].as_str() {
                "crate" => Some(Vec::new()),
                "self" => Some(here.clone()),
                "super" => {
                    // super::super:: climbs once per `super`.
                    let mut up = here.clone();
                    let mut j = i;
                    while toks.get(j).is_some_and(|t| t == "super")
                        && toks.get(j + 1).is_some_and(|t| t == "::")
                    {
                        up.pop();
                        j += 2;
                    }
                    let climbed = (j - i) / 2;
                    let written = vec!["super"; climbed].join("::");
                    let mut o = Vec::new();
                    let end = use_tree(&toks, j, up, written, &mut o);
                    out.extend(o);
                    i = end.max(i + 1);
                    continue;
                }
                name => {
                    let mut child = here.clone();
                    child.push(name.to_string());
                    modules
                        .contains_key(&child.join("::"))
                        .then(|| here.clone())
                }
            }
        };
        match base {
            Some(base) if toks[i] == "crate" || toks[i] == "self" => {
                let mut o = Vec::new();
                let end = use_tree(&toks, i + 2, base, toks[i].clone(), &mut o);
                out.extend(o);
                i = end.max(i + 1);
            }
            Some(base) => {
                let mut o = Vec::new();
                let end = use_tree(&toks, i, base, String::new(), &mut o);
                out.extend(o);
                i = end.max(i + 1);
            }
            None => i += 1,
        }
    }
    out
}

/// Reads a path (or `use` tree) from token `i` under `base`; pushes each branch and
/// returns the index after it.
fn use_tree(
    toks: &[String],
    mut i: usize,
    base: Vec<String>,
    written: String,
    out: &mut Vec<(String, Vec<String>)>,
) -> usize {
    let mut segments = base;
    let mut written = written;
    loop {
        match toks.get(i).map(String::as_str) {
            Some("{") => {
                i += 1;
                loop {
                    match toks.get(i).map(String::as_str) {
                        Some("}") => return i + 1,
                        Some(",") => i += 1,
                        None => return i,
                        _ => {
                            let next = use_tree(toks, i, segments.clone(), written.clone(), out);
                            i = next.max(i + 1);
                        }
                    }
                }
            }
            Some(t) if ident_char(t.chars().next().unwrap_or('.')) => {
                if t != "self" {
                    segments.push(t.to_string());
                    written = if written.is_empty() {
                        t.to_string()
                    } else {
                        format!("{written}::{t}")
                    };
                }
                if toks.get(i + 1).is_some_and(|n| n == "::") {
                    i += 2;
                } else {
                    out.push((written, segments));
                    return i + 1;
                }
            }
            _ => {
                out.push((written, segments));
                return i;
            }
        }
    }
}

/// The loops of a graph: its strongly connected components of more than one module
/// (Tarjan).
fn loops<'a>(graph: &BTreeMap<&'a str, BTreeSet<&'a str>>) -> Vec<Vec<&'a str>> {
    struct Walk<'a, 'g> {
        graph: &'g BTreeMap<&'a str, BTreeSet<&'a str>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        found: Vec<Vec<&'a str>>,
    }
    impl<'a> Walk<'a, '_> {
        fn visit(&mut self, v: &'a str) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            self.on_stack.insert(v);
            for &w in self.graph.get(v).into_iter().flatten() {
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(lw);
                } else if self.on_stack.contains(w) {
                    let iw = self.index[w];
                    let lv = self.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    component.push(w);
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.found.push(component);
                }
            }
        }
    }
    let mut walk = Walk {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for &v in graph.keys() {
        if !walk.index.contains_key(v) {
            walk.visit(v);
        }
    }
    walk.found
}

mod checker {
    use super::check;

    /// A small crate that keeps the rules: each test adds one file that breaks one.
    const CLEAN: &[(&str, &str)] = &[
        ("lib.rs", "pub mod clock; pub mod store; pub mod engine;"),
        ("clock.rs", "pub fn now() -> i64 { 0 }"),
        ("model.rs", "pub struct Account;"),
        (
            "store/mod.rs",
            "mod sqlite; mod types;\nuse crate::clock;\npub use types::Row;\npub fn open() { sqlite::open() }",
        ),
        ("store/types.rs", "pub struct Row;"),
        (
            "store/sqlite.rs",
            "use super::types::Row;\npub fn open() {}",
        ),
        (
            "engine.rs",
            "use crate::{clock::now, store::{self, Row}};\n// use crate::server;\nconst S: &str = \"crate::server::x\";\n#[cfg(test)]\nmod tests { use crate::server::Server; }",
        ),
        ("server/mod.rs", "use crate::engine;"),
    ];

    fn with(file: (&'static str, &'static str)) -> Vec<(&'static str, &'static str)> {
        let mut files: Vec<_> = CLEAN
            .iter()
            .copied()
            .filter(|(f, _)| *f != file.0)
            .collect();
        files.push(file);
        files
    }

    #[test]
    fn a_clean_crate_passes() {
        assert_eq!(check(CLEAN, &[]), Vec::<String>::new());
    }

    #[test]
    fn an_upward_import_names_file_import_and_rule() {
        let problems = check(&with(("model.rs", "use crate::store::Row;")), &[]);
        assert_eq!(problems.len(), 1, "{problems:#?}");
        let p = &problems[0];
        assert!(
            p.starts_with("src/model.rs: `crate::store::Row` runs up the layers"),
            "{p}"
        );
        assert!(
            p.contains("model is in layer 1 (base), store in layer 4 (services)"),
            "{p}"
        );
        // Listed as known, it passes; a known arrow that is gone is reported.
        let known = [("model", "store")];
        assert!(check(&with(("model.rs", "use crate::store::Row;")), &known).is_empty());
        let stale = check(CLEAN, &known);
        assert!(stale[0].contains("KNOWN lists model -> store"), "{stale:?}");
    }

    #[test]
    fn super_and_grouped_paths_are_arrows_too() {
        let p = check(
            &with(("store/types.rs", "fn f() { super::super::engine::run() }")),
            &[],
        );
        assert!(
            p.iter()
                .any(|p| p.contains("`super::super::engine::run` runs up")),
            "{p:#?}"
        );
        let p = check(
            &with(("clock.rs", "use crate::{model, engine::{Engine, run}};")),
            &[],
        );
        assert!(
            p.iter()
                .any(|p| p.contains("src/clock.rs") && p.contains("engine in layer 5")),
            "{p:#?}"
        );
    }

    #[test]
    fn loops_are_found_and_named() {
        let p = check(&with(("store/types.rs", "use super::sqlite::open;")), &[]);
        assert_eq!(p.len(), 1, "{p:#?}");
        assert!(
            p[0].starts_with("src/store/sqlite.rs, src/store/types.rs import each other in a loop"),
            "{p:#?}"
        );
        assert!(
            p[0].contains(
                "store::types -> store::sqlite (src/store/types.rs: `super::sqlite::open`)"
            ),
            "{p:#?}"
        );
        // A child using its parent's items is the module tree, not a loop.
        assert!(check(&with(("store/types.rs", "use super::open;")), &[]).is_empty());
    }

    #[test]
    fn store_backends_import_neither_the_facade_nor_each_other() {
        let mut files = with(("store/sqlite.rs", "use super::postgres::Pool;"));
        files.push(("store/postgres.rs", "pub struct Pool;"));
        let p = check(&files, &[]);
        assert!(p.iter().any(|p| p.contains("src/store/sqlite.rs: `super::postgres::Pool`: the store backend store::sqlite imports store::postgres")), "{p:#?}");
        let p = check(
            &with(("store/sqlite.rs", "fn f() -> crate::store::Row { todo!() }")),
            &[],
        );
        assert!(p.iter().any(|p| p.contains("imports store;")), "{p:#?}");
    }

    #[test]
    fn a_module_without_a_layer_is_refused() {
        let p = check(&with(("gadget.rs", "")), &[]);
        assert!(p[0].contains("module gadget has no layer"), "{p:#?}");
    }
}
