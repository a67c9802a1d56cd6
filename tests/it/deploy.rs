//! The deployment files: the systemd unit passes `systemd-analyze verify` and scores at most
//! 2.0 in `systemd-analyze security --offline=yes`; the Kubernetes manifests validate offline
//! with `kubernetes-validate` (the Prometheus operator's kinds in monitoring.yaml have no
//! schema there: tests/it/dashboards.rs checks them); the example configs in them load.
//!
//! The tools are installed by `.ci/run`. A missing tool is a NOT RUN (refreshd-testkit): a
//! failure under `REFRESHD_TEST_STRICT=1`.

use refreshd::config::Config;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Native sidecars (init containers with `restartPolicy: Always`) need Kubernetes >= 1.29.
const KUBERNETES_VERSION: &str = "1.33.0";
const SYSTEMD_ANALYZE: &str = "systemd-analyze";
const MAX_EXPOSURE: f64 = 2.0;

pub(crate) fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn systemd_unit_verifies_and_scores_at_most_2() {
    if !refreshd_testkit::tool(
        "deploy::systemd_unit_verifies_and_scores_at_most_2",
        SYSTEMD_ANALYZE,
        &[SYSTEMD_ANALYZE, "--version"],
        "apt-get install systemd",
    ) {
        return;
    }
    // verify checks that ExecStart= exists: point it at the binary under test.
    let unit = std::fs::read_to_string(repo("deploy/systemd/refreshd.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/usr/local/bin/refreshd "),
        "{unit}"
    );
    let unit = unit.replace(
        "ExecStart=/usr/local/bin/refreshd ",
        &format!("ExecStart={} ", env!("CARGO_BIN_EXE_refreshd")),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("refreshd.service");
    std::fs::write(&path, unit).unwrap();

    // Documentation=man:refreshd(1): verify runs `man`, so the page `refreshd man` prints is
    // installed where a MANPATH finds it.
    let man1 = dir.path().join("man/man1");
    std::fs::create_dir_all(&man1).unwrap();
    let page = Command::new(env!("CARGO_BIN_EXE_refreshd"))
        .arg("man")
        .output()
        .unwrap();
    assert!(page.status.success(), "refreshd man: {page:?}");
    std::fs::write(man1.join("refreshd.1"), &page.stdout).unwrap();
    let (ok, stdout, stderr) = run(Command::new(SYSTEMD_ANALYZE)
        .arg("verify")
        .arg(&path)
        .env("MANPATH", dir.path().join("man")));
    assert!(ok, "systemd-analyze verify failed:\n{stdout}{stderr}");
    assert!(
        !stderr.contains("refreshd.service"),
        "systemd-analyze verify warns about the unit:\n{stderr}"
    );

    let (ok, stdout, stderr) = run(Command::new(SYSTEMD_ANALYZE)
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&path));
    assert!(ok, "systemd-analyze security failed:\n{stdout}{stderr}");
    let line = stdout
        .lines()
        .chain(stderr.lines())
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level in:\n{stdout}{stderr}"));
    let score: f64 = line
        .rsplit(':')
        .next()
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the score in {line:?}"));
    eprintln!("systemd-analyze security: {score}");
    assert!(
        score <= MAX_EXPOSURE,
        "exposure {score} > {MAX_EXPOSURE}:\n{stdout}"
    );
}

/// The unit runs as the user refreshd.sysusers creates, in the directories
/// refreshd.tmpfiles creates: both applied to a scratch root by systemd's own tools.
#[test]
fn sysusers_and_tmpfiles_create_the_units_user_and_directories() {
    const TEST: &str = "deploy::sysusers_and_tmpfiles_create_the_units_user_and_directories";
    for tool in ["systemd-sysusers", "systemd-tmpfiles"] {
        if !refreshd_testkit::tool(TEST, tool, &[tool, "--version"], "apt-get install systemd") {
            return;
        }
    }
    let unit = std::fs::read_to_string(repo("deploy/systemd/refreshd.service")).unwrap();
    for line in [
        "User=refreshd",
        "Group=refreshd",
        "StateDirectory=refreshd",
        "WorkingDirectory=/var/lib/refreshd",
        "Documentation=man:refreshd(1)",
        "--config /etc/refreshd/refreshd.toml",
    ] {
        assert!(unit.contains(line), "the unit lacks {line:?}");
    }
    assert!(
        !unit.contains("DynamicUser=yes"),
        "a static user, from sysusers.d"
    );
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("etc")).unwrap();
    for f in ["etc/passwd", "etc/group"] {
        std::fs::write(root.path().join(f), "").unwrap();
    }
    let apply = |tool: &str, args: &[&str], file: &str| {
        let text = std::fs::read(repo(file)).unwrap();
        let mut child = Command::new(tool)
            .arg(format!("--root={}", root.path().display()))
            .args(args)
            .arg("-")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&text).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{tool} {file}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    apply("systemd-sysusers", &[], "deploy/systemd/refreshd.sysusers");
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    let user = passwd
        .lines()
        .find(|l| l.starts_with("refreshd:"))
        .unwrap_or_else(|| panic!("no refreshd user in:\n{passwd}"));
    let fields: Vec<&str> = user.split(':').collect();
    let uid: u32 = fields[2].parse().unwrap();
    assert!(uid > 0 && uid < 1000, "a system user: {user}");
    assert_eq!(fields[5], "/var/lib/refreshd", "{user}");
    assert!(fields[6].ends_with("nologin"), "{user}");
    // tmpfiles resolves the owner from the scratch root's passwd.
    apply(
        "systemd-tmpfiles",
        &["--create"],
        "deploy/systemd/refreshd.tmpfiles",
    );
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let state = std::fs::metadata(root.path().join("var/lib/refreshd")).unwrap();
    assert_eq!(state.permissions().mode() & 0o777, 0o700);
    if refreshd_testkit::is_root() {
        assert_eq!(state.uid(), uid, "/var/lib/refreshd belongs to refreshd");
    }
    let etc = std::fs::metadata(root.path().join("etc/refreshd")).unwrap();
    assert!(etc.is_dir());
}

fn kubernetes_validate(files: &[&Path]) -> (bool, String) {
    let (ok, out, err) = run(Command::new("python3")
        .args([
            "-m",
            "kubernetes_validate",
            "--strict",
            "-k",
            KUBERNETES_VERSION,
        ])
        .args(files));
    (ok, format!("{out}{err}"))
}

/// The manifests' documents as JSON (PyYAML comes with kubernetes-validate).
pub(crate) fn documents(file: &Path) -> Vec<serde_json::Value> {
    let (ok, out, err) = run(Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
        ])
        .arg(file));
    assert!(ok, "cannot read {}: {err}", file.display());
    serde_json::from_str(&out).unwrap()
}

fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo("deploy/kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn kubernetes_manifests_validate_offline() {
    if !refreshd_testkit::tool(
        "deploy::kubernetes_manifests_validate_offline",
        "kubernetes-validate",
        &["python3", "-m", "kubernetes_validate", "--version"],
        "python3 -m pip install kubernetes-validate",
    ) {
        return;
    }
    let files = manifests();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "monitoring.yaml",
            "replicas-postgres.yaml",
            "sidecar.yaml",
            "standalone.yaml"
        ]
    );
    // Custom resources have no schema in kubernetes-validate: only that warning is allowed.
    let no_schema = |l: &str| {
        ["ServiceMonitor", "PodMonitor", "PrometheusRule"]
            .iter()
            .any(|k| {
                l.contains(&format!(
                    "Couldn't find schema for kind {k} with api version monitoring.coreos.com/v1"
                ))
            })
    };
    for f in &files {
        let (ok, out) = kubernetes_validate(&[f]);
        assert!(ok, "{} does not validate:\n{out}", f.display());
        let warnings: Vec<&str> = out
            .lines()
            .filter(|l| l.contains("WARN") && !no_schema(l))
            .collect();
        assert!(warnings.is_empty(), "{}:\n{out}", f.display());
    }

    // The validator does reject a mistake (an unknown field, strict mode).
    let sidecar = std::fs::read_to_string(&files[2]).unwrap();
    let needle = "\n          restartPolicy: Always\n";
    assert!(sidecar.contains(needle));
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        sidecar.replace(
            needle,
            "\n          restartPolicy: Always\n          restartPolicyy: Always\n",
        ),
    )
    .unwrap();
    let (ok, out) = kubernetes_validate(&[&bad]);
    assert!(!ok, "an unknown field passed validation:\n{out}");

    // What the manifests promise: a native sidecar, probes on the ops port, locked down.
    for f in &files {
        for doc in documents(f) {
            if doc["kind"] != "Deployment" {
                continue;
            }
            let name = format!("{} {}", f.display(), doc["metadata"]["name"]);
            if f.ends_with("replicas-postgres.yaml") {
                // Replicas share PostgreSQL: several at once, rolled one by one.
                assert_eq!(doc["spec"]["replicas"], 3, "{name}");
                assert_eq!(doc["spec"]["strategy"]["type"], "RollingUpdate", "{name}");
            } else {
                // One SQLite file has one writer: the old pod must be gone first.
                assert_eq!(doc["spec"]["replicas"], 1, "{name}");
                assert_eq!(doc["spec"]["strategy"]["type"], "Recreate", "{name}");
            }
            let pod = &doc["spec"]["template"]["spec"];
            assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{name}");
            assert_eq!(pod["automountServiceAccountToken"], false, "{name}");
            let mut containers: Vec<&serde_json::Value> = Vec::new();
            for key in ["initContainers", "containers"] {
                if let Some(list) = pod[key].as_array() {
                    containers.extend(list);
                }
            }
            let refreshd: Vec<&&serde_json::Value> = containers
                .iter()
                .filter(|c| c["name"] == "refreshd")
                .collect();
            assert_eq!(refreshd.len(), 1, "{name}");
            let r = refreshd[0];
            if f.ends_with("sidecar.yaml") {
                let init = pod["initContainers"].as_array().expect("initContainers");
                assert!(
                    init.iter()
                        .any(|c| c["name"] == "refreshd" && c["restartPolicy"] == "Always"),
                    "{name}: refreshd must be a native sidecar"
                );
            }
            assert_eq!(r["livenessProbe"]["httpGet"]["path"], "/healthz", "{name}");
            assert_eq!(r["readinessProbe"]["httpGet"]["path"], "/readyz", "{name}");
            for c in &containers {
                let sc = &c["securityContext"];
                let cname = format!("{name} container {}", c["name"]);
                assert_eq!(sc["readOnlyRootFilesystem"], true, "{cname}");
                assert_eq!(sc["allowPrivilegeEscalation"], false, "{cname}");
                assert_eq!(sc["runAsNonRoot"], true, "{cname}");
                assert_eq!(sc["capabilities"]["drop"][0], "ALL", "{cname}");
                assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{cname}");
                assert!(c["resources"]["requests"].is_object(), "{cname}");
                assert!(c["resources"]["limits"]["memory"].is_string(), "{cname}");
            }
        }
    }
}

/// Loads an example config with its secret files created in a temp dir (`secret_dir` is the
/// path the example uses for them).
fn load_example(text: &str, secret_dir: &str, what: &str) -> Config {
    let dir = tempfile::tempdir().unwrap();
    for name in ["tiktok-client-secret", "api-token", "webhook-secret"] {
        std::fs::write(dir.path().join(name), "0123456789abcdef0123456789abcdef").unwrap();
    }
    std::fs::write(
        dir.path().join("store-url"),
        "postgres://refreshd:pw@db.example.internal:5432/refreshd\n",
    )
    .unwrap();
    let text = text.replace(secret_dir, &dir.path().display().to_string());
    Config::from_toml_str(&text).unwrap_or_else(|e| panic!("{what}: {e}"))
}

#[test]
fn example_configs_in_deploy_load() {
    let host = std::fs::read_to_string(repo("deploy/systemd/refreshd.toml")).unwrap();
    let c = load_example(
        &host,
        "$CREDENTIALS_DIRECTORY",
        "deploy/systemd/refreshd.toml",
    );
    assert_eq!(c.store.path, Path::new("/var/lib/refreshd/refreshd.db"));
    assert!(c.providers.contains_key("tiktok"));
    assert!(host.contains("listen = \"127.0.0.1:8787\""));

    if !refreshd_testkit::tool(
        "deploy::example_configs_in_deploy_load",
        "PyYAML",
        &["python3", "-c", "import yaml"],
        "python3 -m pip install kubernetes-validate",
    ) {
        return;
    }
    for f in manifests() {
        for doc in documents(&f) {
            if doc["kind"] != "ConfigMap" {
                continue;
            }
            let text = doc["data"]["refreshd.toml"]
                .as_str()
                .expect("refreshd.toml");
            let what = format!("{} ConfigMap refreshd.toml", f.display());
            let c = load_example(text, "/var/run/secrets/refreshd", &what);
            assert_eq!(
                c.store.path,
                Path::new("/var/lib/refreshd/refreshd.db"),
                "{what}"
            );
            assert!(text.contains("listen = \"0.0.0.0:8787\""), "{what}");
            assert_eq!(
                c.store.url.is_some(),
                f.ends_with("replicas-postgres.yaml"),
                "{what}: only the replicas run on PostgreSQL"
            );
        }
    }
}
