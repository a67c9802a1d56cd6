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
