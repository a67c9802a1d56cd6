//! `log.refreshes`: the one line of a successful refresh, at `info` (the default) or at
//! `debug`, where `log.level = "info"` leaves it out.

use super::{World, events_in};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_refreshes_debug_leaves_the_line_of_a_rotation_out_at_info() {
    for (setting, lines) in [("info", 2), ("debug", 0)] {
        let w = World::start(&format!("[log]\nrefreshes = \"{setting}\"\n")).await;
        w.import_due("accounts.jsonl", &["r1", "r2"]).await;
        let out = w
            .cli_env(&["run", "--once"], &[("REFRESHD_LOG__LEVEL", "info")])
            .await;
        let printed: Vec<String> = out.stderr.lines().map(String::from).collect();
        let done = events_in(&printed, "run_once_done");
        assert_eq!(done.len(), 1, "{out:#?}");
        assert_eq!(done[0]["rotated"], 2, "both refreshed either way: {out:#?}");
        let rotated = events_in(&printed, "refresh")
            .into_iter()
            .filter(|e| e["outcome"] == "rotated")
            .count();
        assert_eq!(rotated, lines, "log.refreshes = {setting:?}: {out:#?}");
    }
}

/// The line of a rotation names everything itself; at `info` no per-refresh span is made,
/// so none is serialized into it (issue 15: that cost CPU on every refresh).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_line_carries_its_fields_and_no_span_at_info() {
    let w = World::start("").await;
    w.import_due("accounts.jsonl", &["r1"]).await;
    let out = w
        .cli_env(&["run", "--once"], &[("REFRESHD_LOG__LEVEL", "info")])
        .await;
    let printed: Vec<String> = out.stderr.lines().map(String::from).collect();
    let rotated = events_in(&printed, "refresh");
    let [line] = &rotated[..] else {
        panic!("one refresh line expected: {out:#?}");
    };
    assert_eq!(line["outcome"], "rotated", "{line}");
    assert_eq!(line["provider"], "tiktok", "{line}");
    assert!(line["account"].as_i64().is_some_and(|id| id > 0), "{line}");
    assert_eq!(line["commit"], "committed", "{line}");
    assert_eq!(line["new_refresh_token"], true, "{line}");
    assert!(line["duration_ms"].as_i64().is_some(), "{line}");
    let next = line["next_refresh_at"].as_str().unwrap_or_default();
    assert!(
        time::OffsetDateTime::parse(next, &time::format_description::well_known::Rfc3339).is_ok(),
        "{line}"
    );
    assert!(line.get("span").is_none(), "{line}");
}
