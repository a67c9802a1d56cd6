//! deploy/Dockerfile's cargo steps, without Docker: no container runtime runs on this
//! project's machines, so the image itself is never built here. What broke before (the
//! dependency-caching step naming a target that moved) is a cargo matter, and this test runs
//! the Dockerfile's own cargo-chef commands in a scratch copy of the build context:
//! `prepare` on the whole workspace, then `cook` in a directory holding the recipe alone.
//! Two changes keep it bounded: the dev profile instead of `--release`, and `--offline` (the
//! registry cache the test build used). The cook's intermediate files go to this test
//! binary's own build directory (cargo's `build.build-dir`), its final ones (the recipe's
//! placeholder binary) to a scratch directory, so the real `refreshd` other tests run is never
//! replaced. Where `cargo run` or `cargo build` built the dependencies there already (CI's
//! demo step, the README's first command, runs before the tests), the cook finds them built
//! and compiles only the placeholder; a cold build directory gets them built once, for later
//! runs. The placeholder is safe there because cargo-chef gives it another version than the
//! real crate's (asserted below), so its artifacts have other names.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const TEST: &str = "docker::dockerfile_cargo_steps_cache_dependencies_for_every_target";
const BOUND: Duration = Duration::from_secs(15 * 60);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The build context: the repository less what .dockerignore leaves out.
fn copy_context(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if matches!(name.as_ref(), "target" | ".git" | "node_modules") || name.ends_with(".db") {
            continue;
        }
        let (src, dst) = (entry.path(), to.join(&*name));
        if entry.file_type().unwrap().is_dir() {
            copy_context(&src, &dst);
        } else if entry.file_type().unwrap().is_file() {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

/// The arguments after `cargo` of each `RUN cargo chef ...` line of the Dockerfile.
fn chef_steps(dockerfile: &str) -> Vec<Vec<String>> {
    dockerfile
        .lines()
        .filter_map(|l| l.trim().strip_prefix("RUN cargo chef "))
        .map(|rest| {
            std::iter::once("chef".to_string())
                .chain(rest.split_whitespace().map(str::to_string))
                .collect()
        })
        .collect()
}

/// The build directory this test binary was built in: `<build-dir>/debug/deps/it-...`, or
/// `<build-dir>/<triple>/debug/deps/it-...` for a `--target` build. Anything else (a binary
/// copied elsewhere) gets a directory of this test's own under target/, built once.
fn build_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let in_deps = exe.parent().and_then(Path::file_name) == Some("deps".as_ref());
    let is_build_dir = |d: &&Path| d.join("CACHEDIR.TAG").is_file();
    let found = exe.ancestors().skip(3).take(2).find(is_build_dir);
    match found {
        Some(dir) if in_deps => dir.to_path_buf(),
        _ => repo().join("target/docker-cook"),
    }
}

/// Runs cargo in `dir`: intermediate files in `build`, final ones in `target`.
fn cargo(dir: &Path, args: &[String], build: &Path, target: &Path) {
    let started = Instant::now();
    let out = Command::new(env!("CARGO"))
        .args(args)
        .current_dir(dir)
        .env("CARGO_BUILD_BUILD_DIR", build)
        .env("CARGO_TARGET_DIR", target)
        .env("CARGO_NET_OFFLINE", "true")
        // The host's build, where `cargo run` left the dependencies.
        .env_remove("CARGO_BUILD_TARGET")
        .output()
        .unwrap_or_else(|e| panic!("cannot run cargo {args:?}: {e}"));
    assert!(
        out.status.success(),
        "cargo {} failed in {}:\n{}{}",
        args.join(" "),
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        started.elapsed() < BOUND,
        "cargo {args:?} took {:?}",
        started.elapsed()
    );
    let compiled = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.trim_start().starts_with("Compiling "))
        .count();
    eprintln!(
        "cargo {}: {:.0?}, {compiled} crates compiled",
        args.join(" "),
        started.elapsed()
    );
}

#[test]
fn dockerfile_cargo_steps_cache_dependencies_for_every_target() {
    let dockerfile = std::fs::read_to_string(repo().join("deploy/Dockerfile")).unwrap();
    let steps = chef_steps(&dockerfile);
    assert_eq!(steps.len(), 2, "a prepare and a cook step: {steps:?}");
    assert_eq!(steps[0][1], "prepare", "{steps:?}");
    assert_eq!(steps[1][1], "cook", "{steps:?}");
    assert!(
        dockerfile.contains("USER 65532") && dockerfile.contains("distroless"),
        "a non-root distroless runtime"
    );
    let install = "cargo install cargo-chef --locked --version 0.1.78";
    if !refreshd_testkit::tool(TEST, "cargo-chef", &["cargo", "chef", "--version"], install) {
        return;
    }
    let _heavy = crate::helpers::heavy();
    let scratch = tempfile::tempdir().unwrap();
    let (planner, build) = (scratch.path().join("planner"), scratch.path().join("build"));
    copy_context(&repo(), &planner);
    let (build_dir, target) = (build_dir(), scratch.path().join("target"));
    cargo(&planner, &steps[0], &build_dir, &target);
    std::fs::create_dir_all(&build).unwrap();
    std::fs::copy(planner.join("recipe.json"), build.join("recipe.json")).unwrap();
    // The cook step as written, in the dev profile and offline instead of optimised.
    let cook: Vec<String> = steps[1]
        .iter()
        .filter(|a| *a != "--release")
        .cloned()
        .chain(["--offline".to_string()])
        .collect();
    assert!(
        steps[1].iter().any(|a| a == "--release"),
        "the cook step no longer names --release: {:?}",
        steps[1]
    );
    cargo(&build, &cook, &build_dir, &target);
    // The placeholder crate shares the build directory with the real one: cargo-chef gives it
    // another version, hence other artifact names, so the real crate is never taken for it.
    let skeleton: toml::Table =
        toml::from_str(&std::fs::read_to_string(build.join("Cargo.toml")).unwrap()).unwrap();
    let placeholder = skeleton["package"]["version"].as_str().unwrap_or_default();
    assert_ne!(
        placeholder,
        env!("CARGO_PKG_VERSION"),
        "the recipe's placeholder has the real crate's version"
    );
    // The placeholder binary went to the scratch directory, not over the one other tests run.
    assert!(
        target.join("debug/refreshd").is_file(),
        "no placeholder binary in the scratch target"
    );
    let version = Command::new(crate::helpers::bin())
        .arg("--version")
        .output()
        .unwrap();
    let version = String::from_utf8_lossy(&version.stdout);
    assert!(
        version.starts_with("refreshd "),
        "the tests' binary answers {version:?}"
    );
    // Only the manifests reached the cook: the skeleton has every workspace member.
    for member in ["Cargo.toml", "bench/Cargo.toml", "testkit/Cargo.toml"] {
        assert!(
            build.join(member).is_file(),
            "{member} missing from the cook's skeleton"
        );
    }
}
