//! The pictures for operators stay true: every metric the Grafana dashboard
//! (deploy/grafana/refreshd.json) and the alert rules (deploy/prometheus/refreshd-rules.yaml)
//! name is served by the `/metrics` of a running daemon; the rules pass `promtool check
//! rules`; the PrometheusRule carries the same rules and the ServiceMonitor scrapes the
//! Services of the Kubernetes manifests; each alert's runbook is a section of the book's
//! Monitoring page.
//!
//! promtool (Debian's `prometheus`) and PyYAML are installed by `.ci/run`; where missing,
//! their checks are a NOT RUN (refreshd-testkit).

use crate::deploy::{documents, repo};
use crate::helpers;
use std::collections::BTreeSet;
use std::process::Command;

const DASHBOARD: &str = "deploy/grafana/refreshd.json";
const RULES: &str = "deploy/prometheus/refreshd-rules.yaml";
const OPERATOR: &str = "deploy/kubernetes/monitoring.yaml";
const MONITORING_PAGE: &str = "docs/src/monitoring.md";
/// Series Prometheus makes itself for each target, not served by refreshd.
const PROMETHEUS_MADE: &[&str] = &["up"];

/// The metric names a PromQL expression selects: refreshd's and the process's, outside
/// quoted strings (label values) and label matchers.
fn metrics_in(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut word = String::new();
    let (mut quote, mut braces) = (None::<char>, 0u32);
    for c in expr.chars().chain(std::iter::once(' ')) {
        if let Some(q) = quote {
            if c == q {
                quote = None;
            }
            continue;
        }
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
            continue;
        }
        let named = ["refreshd_", "process_"]
            .iter()
            .any(|p| word.starts_with(p))
            || PROMETHEUS_MADE.contains(&word.as_str());
        if braces == 0 && named {
            out.insert(std::mem::take(&mut word));
        }
        word.clear();
        match c {
            '"' | '\'' | '`' => quote = Some(c),
            '{' => braces += 1,
            '}' => braces = braces.saturating_sub(1),
            _ => {}
        }
    }
    out
}

/// The series names of a scrape (`name{labels} value` lines): what a query can select.
fn served_series(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .collect()
}

fn dashboard() -> serde_json::Value {
    let text = std::fs::read_to_string(repo(DASHBOARD)).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DASHBOARD} is not JSON: {e}"))
}

/// (where, expression) of every query in the dashboard: panels' targets and variables.
fn dashboard_queries(d: &serde_json::Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().expect("a target's expr");
            out.push((format!("panel {:?}", p["title"]), expr.to_string()));
        }
    }
    for v in d["templating"]["list"].as_array().expect("templating") {
        if let Some(q) = v["definition"].as_str() {
            out.push((format!("variable {:?}", v["name"]), q.to_string()));
        }
    }
    out
}

/// (alert, expression) of every rule of a `groups:` document.
fn rule_queries(groups: &serde_json::Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for g in groups.as_array().expect("groups") {
        for r in g["rules"].as_array().expect("rules") {
            let name = r["alert"].as_str().expect("alert rules only").to_string();
            out.push((name, r["expr"].as_str().expect("expr").to_string()));
        }
    }
    out
}

fn pyyaml(test: &str) -> bool {
    refreshd_testkit::tool(
        test,
        "PyYAML",
        &["python3", "-c", "import yaml"],
        "python3 -m pip install kubernetes-validate",
    )
}

#[test]
fn metric_names_are_read_from_expressions() {
    let m = metrics_in(
        r#"sum by (le) (rate(refreshd_x_bucket{job=~"refreshd_not_a_metric", a="b"}[5m])) / process_open_fds or up == 0"#,
    );
    let want: BTreeSet<String> = ["refreshd_x_bucket", "process_open_fds", "up"]
        .map(String::from)
        .into();
    assert_eq!(m, want);
    let served = served_series("# TYPE a counter\na_total{p=\"x\"} 1\nb 2\n# EOF\n");
    assert_eq!(served, ["a_total", "b"].map(String::from).into());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_the_rules_name_is_served() {
    const TEST: &str = "dashboards::every_metric_the_dashboard_and_the_rules_name_is_served";
    let mut queries = dashboard_queries(&dashboard());
    assert!(queries.len() >= 20, "the dashboard's queries: {queries:?}");
    let rules_read = pyyaml(TEST);
    if rules_read {
        let rules = &documents(&repo(RULES))[0];
        queries.extend(rule_queries(&rules["groups"]));
    }
    let scrape = helpers::scrape_after_refreshes().await;
    let mut served = served_series(&scrape);
    served.extend(PROMETHEUS_MADE.iter().map(|s| s.to_string()));
    let mut missing = Vec::new();
    for (place, expr) in &queries {
        let named = metrics_in(expr);
        assert!(!named.is_empty(), "{place} names no metric: {expr}");
        for m in named.difference(&served) {
            missing.push(format!("{place}: {m}"));
        }
    }
    assert!(
        missing.is_empty(),
        "named but not served by /metrics (rename or serve them):\n  {}\nserved: {served:?}",
        missing.join("\n  ")
    );
    // What the brief promised to show, by name.
    for m in [
        "refreshd_build_info",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
        "refreshd_last_rotation_timestamp_seconds",
        "refreshd_store_last_commit_timestamp_seconds",
        "refreshd_next_refresh_timestamp_seconds",
        "refreshd_store_pending_rotations",
    ] {
        assert!(served.contains(m), "{m} is not served:\n{scrape}");
    }
    let build = scrape
        .lines()
        .find(|l| l.starts_with("refreshd_build_info{"))
        .expect("build info");
    assert!(
        build.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION")))
            && build.contains("commit=\"")
            && build.ends_with(" 1"),
        "{build}"
    );
}

#[test]
fn the_dashboard_imports_with_a_datasource_variable() {
    let d = dashboard();
    assert_eq!(d["uid"], "refreshd");
    let vars = d["templating"]["list"].as_array().unwrap();
    let ds = vars
        .iter()
        .find(|v| v["type"] == "datasource")
        .expect("a datasource variable");
    assert_eq!(ds["query"], "prometheus");
    let name = ds["name"].as_str().unwrap();
    // Every query goes through the variable, so the dashboard imports into any Grafana.
    for p in d["panels"].as_array().unwrap() {
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(
            p["datasource"]["uid"],
            format!("${{{name}}}"),
            "panel {}",
            p["title"]
        );
        assert!(
            !p["targets"].as_array().unwrap().is_empty(),
            "{}",
            p["title"]
        );
    }
    // No two panels overlap on the 24-column grid.
    let mut cells = BTreeSet::new();
    for p in d["panels"].as_array().unwrap() {
        let g = &p["gridPos"];
        let [x, y, w, h] = ["x", "y", "w", "h"].map(|k| g[k].as_u64().unwrap());
        assert!(x + w <= 24, "{} is wider than the grid", p["title"]);
        for cx in x..x + w {
            for cy in y..y + h {
                assert!(
                    cells.insert((cx, cy)),
                    "{} overlaps another panel",
                    p["title"]
                );
            }
        }
    }
}

#[test]
fn the_rules_pass_promtool_and_each_names_its_runbook() {
    const TEST: &str = "dashboards::the_rules_pass_promtool_and_each_names_its_runbook";
    if !pyyaml(TEST) {
        return;
    }
    let groups = documents(&repo(RULES))[0]["groups"].clone();
    let page = std::fs::read_to_string(repo(MONITORING_PAGE)).unwrap();
    let headings: BTreeSet<String> = page
        .lines()
        .filter_map(|l| l.strip_prefix("### "))
        .map(|h| h.trim().to_lowercase())
        .collect();
    let mut alerts = BTreeSet::new();
    for g in groups.as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            let alert = r["alert"].as_str().unwrap();
            assert!(alerts.insert(alert.to_string()), "{alert} twice");
            let a = &r["annotations"];
            for key in ["summary", "description"] {
                assert!(
                    a[key].as_str().is_some_and(|s| !s.is_empty()),
                    "{alert}: {key}"
                );
            }
            assert!(
                ["warning", "critical"].contains(&r["labels"]["severity"].as_str().unwrap()),
                "{alert}: severity"
            );
            let runbook = a["runbook"].as_str().unwrap();
            assert_eq!(
                runbook,
                format!("{MONITORING_PAGE}#{}", alert.to_lowercase()),
                "{alert}"
            );
            assert!(
                headings.contains(&alert.to_lowercase()),
                "{MONITORING_PAGE} has no `### {alert}` section"
            );
        }
    }
    assert!(alerts.len() >= 10, "{alerts:?}");

    if !refreshd_testkit::tool(
        TEST,
        "promtool",
        &["promtool", "--version"],
        "apt-get install prometheus",
    ) {
        return;
    }
    let check = |path: &std::path::Path| {
        Command::new("promtool")
            .args(["check", "rules"])
            .arg(path)
            .output()
            .unwrap()
    };
    let out = check(&repo(RULES));
    assert!(
        out.status.success(),
        "promtool check rules {RULES}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // promtool does reject a broken expression.
    let text = std::fs::read_to_string(repo(RULES)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, text.replacen("> 600", "> > 600", 1)).unwrap();
    assert!(
        !check(&bad).status.success(),
        "a broken rule passed promtool"
    );
}

#[test]
fn the_operator_manifests_carry_the_same_rules_and_scrape_the_ops_port() {
    const TEST: &str =
        "dashboards::the_operator_manifests_carry_the_same_rules_and_scrape_the_ops_port";
    if !pyyaml(TEST) {
        return;
    }
    let rules = &documents(&repo(RULES))[0];
    let docs = documents(&repo(OPERATOR));
    let of_kind =
        |k: &str| -> Vec<&serde_json::Value> { docs.iter().filter(|d| d["kind"] == k).collect() };
    let [rule] = of_kind("PrometheusRule")[..] else {
        panic!("{OPERATOR}: one PrometheusRule")
    };
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(
        rule["spec"]["groups"], rules["groups"],
        "{OPERATOR}'s PrometheusRule differs from {RULES}: copy the groups over"
    );
    let [monitor] = of_kind("ServiceMonitor")[..] else {
        panic!("{OPERATOR}: one ServiceMonitor")
    };
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    let selector = monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels");
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["path"], "/metrics");
    // The rules filter on job="refreshd": the job label comes from the Service's label.
    let job_label = monitor["spec"]["jobLabel"].as_str().expect("jobLabel");
    for file in ["standalone.yaml", "replicas-postgres.yaml"] {
        let path = repo(&format!("deploy/kubernetes/{file}"));
        let services: Vec<serde_json::Value> = documents(&path)
            .into_iter()
            .filter(|d| d["kind"] == "Service")
            .collect();
        assert!(!services.is_empty(), "{file}: a Service");
        for s in services {
            let labels = &s["metadata"]["labels"];
            for (k, v) in selector {
                assert_eq!(
                    &labels[k], v,
                    "{file}: the ServiceMonitor selects the Service"
                );
            }
            assert_eq!(labels[job_label], "refreshd", "{file}: job=\"refreshd\"");
            let ports = s["spec"]["ports"].as_array().unwrap();
            assert!(
                ports.iter().any(|p| p["name"] == endpoint["port"]),
                "{file}: no port named {}",
                endpoint["port"]
            );
        }
    }

    // The sidecar has no Service: a PodMonitor scrapes the app's pods, under job="refreshd".
    let [pods] = of_kind("PodMonitor")[..] else {
        panic!("{OPERATOR}: one PodMonitor")
    };
    let endpoint = &pods["spec"]["podMetricsEndpoints"][0];
    assert_eq!(endpoint["path"], "/metrics");
    let relabel = &endpoint["relabelings"][0];
    assert_eq!(relabel["targetLabel"], "job");
    assert_eq!(relabel["replacement"], "refreshd");
    let selector = pods["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels");
    let sidecar = documents(&repo("deploy/kubernetes/sidecar.yaml"));
    let app = sidecar
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("sidecar.yaml: a Deployment");
    let pod = &app["spec"]["template"];
    for (k, v) in selector {
        assert_eq!(
            &pod["metadata"]["labels"][k], v,
            "the PodMonitor selects the app's pods"
        );
    }
    let refreshd = pod["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "refreshd")
        .expect("the refreshd sidecar");
    assert!(
        refreshd["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == endpoint["port"]),
        "the sidecar has no port named {}",
        endpoint["port"]
    );
}
