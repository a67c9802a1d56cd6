//! `accounts import` from the binary: all or nothing with line numbers (also past the first
//! batch), and logs and a JSON summary as configured.

use super::{DUE, World, subjects};
use crate::helpers::now;
use serde_json::Value;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_all_or_nothing_with_line_numbers() {
    let w = World::start("").await;
    let bad_text = format!(
        "{}{{\"provider\":\"tiktok\",\"access_token\": oops\n{}{}{}",
        w.due_lines(&["a1"]),
        w.due_lines(&["a3"]),
        w.due_lines(&["a4"]),
        w.grant("a5", DUE, None)
            .to_string()
            .replace("\"provider\":\"tiktok\"", "\"provider\":\"myspace\"")
            + "\n",
    );
    let bad = w.write("bad.jsonl", &bad_text);
    let bad_arg = bad.to_str().unwrap();

    // Nothing exists yet: the rejected file must not even create the database.
    let out = w.cli(&["accounts", "import", bad_arg]).await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(out.stderr.contains(bad_arg), "names the file: {out:#?}");
    assert!(out.stderr.contains("line 2"), "{out:#?}");
    assert!(out.stderr.contains("not a valid import record"), "{out:#?}");
    assert!(out.stderr.contains("line 5"), "{out:#?}");
    assert!(
        out.stderr.contains("\"myspace\" is not configured"),
        "{out:#?}"
    );
    assert!(out.stderr.contains("nothing imported"), "{out:#?}");
    for good in ["line 1:", "line 3:", "line 4:"] {
        assert!(!out.stderr.contains(good), "{good} is fine: {out:#?}");
    }
    assert!(!out.stdout.contains("imported"), "{out:#?}");
    let out = w.cli(&["accounts", "list", "--json"]).await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(out.stderr.contains("does not exist"), "{out:#?}");
    assert!(!w.db.exists(), "a rejected import created the database");

    // A good file, twice: new accounts, then updates.
    let good = w.write("good.jsonl", &w.due_lines(&["b1", "b2", "b3"]));
    let good_arg = good.to_str().unwrap();
    let out = w.cli(&["accounts", "import", good_arg]).await;
    out.ok();
    assert!(
        out.stdout.contains(&format!(
            "imported 3 account(s) from {good_arg}: 3 new, 0 updated"
        )),
        "{out:#?}"
    );
    // The database holds tokens: created readable by its owner only.
    {
        use std::os::unix::fs::PermissionsExt;
        for f in ["refreshd.db", "refreshd.db-wal", "refreshd.db-shm"] {
            if let Ok(md) = std::fs::metadata(w.path(f)) {
                let mode = md.permissions().mode() & 0o777;
                assert_eq!(mode & 0o077, 0, "{f} has mode {mode:o}");
            }
        }
    }
    let out = w.cli(&["accounts", "import", good_arg]).await;
    out.ok();
    assert!(
        out.stdout.contains("imported 3 account(s)") && out.stdout.contains("0 new, 3 updated"),
        "{out:#?}"
    );

    // The bad file again, now that the database exists: still nothing of it is written.
    let out = w.cli(&["accounts", "import", bad_arg]).await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert_eq!(subjects(&w.list_json().await), ["b1", "b2", "b3"]);

    // From stdin.
    let out = w
        .cli_stdin(&["accounts", "import", "-"], &w.due_lines(&["c1", "c2"]))
        .await;
    out.ok();
    assert!(
        out.stdout
            .contains("imported 2 account(s) from stdin: 2 new, 0 updated"),
        "{out:#?}"
    );
    // A bad line from stdin is named as coming from stdin.
    let out = w
        .cli_stdin(
            &["accounts", "import", "-"],
            "\n{\"provider\":\"tiktok\"}\n",
        )
        .await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(
        out.stderr.contains("stdin") && out.stderr.contains("line 2"),
        "{out:#?}"
    );
    assert_eq!(
        subjects(&w.list_json().await),
        ["b1", "b2", "b3", "c1", "c2"]
    );
}

/// Every command honours [log] (issue 14): `accounts import` under log.format = "json"
/// writes JSON lines to a non-terminal stderr (here: a flagged account's WARN event), and
/// `--json` puts one stable summary on stdout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_logs_as_configured_and_summarises_in_json() {
    let w = World::start("").await;
    // A refresh token that ended long ago: flagged on import, announced as a WARN event.
    let mut expired = w.grant("j2", DUE, Some(Duration::from_secs(60)));
    expired["obtained_at"] = (now() - 100_000).into();
    let text = format!("{}{expired}\n", w.due_lines(&["j1"]));
    let file = w.write("j.jsonl", &text);
    let out = w
        .cli(&["accounts", "import", "--json", file.to_str().unwrap()])
        .await;
    out.ok();
    let summary: Value = serde_json::from_str(out.stdout.trim()).expect("one JSON object");
    assert_eq!(summary["accounts"], 2, "{summary}");
    assert_eq!(summary["inserted"], 2, "{summary}");
    assert_eq!(summary["updated"], 0, "{summary}");
    assert_eq!(summary["flagged"], 1, "{summary}");
    assert_eq!(summary["source"], file.to_str().unwrap(), "{summary}");
    let events: Vec<Value> = out
        .stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        events.iter().any(|e| e["event"] == "reauth_required"),
        "{events:?}"
    );
}

/// The import streams in batches of 1,000 inside one transaction: a bad line after the
/// first batch was written still leaves nothing of the file behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_line_after_the_first_batch_rolls_the_whole_import_back() {
    let w = World::start("").await;
    let first = w.write("first.jsonl", &w.due_lines(&["s0"]));
    w.cli(&["accounts", "import", first.to_str().unwrap()])
        .await
        .ok();
    let ids: Vec<String> = (1..=1500).map(|i| format!("s{i}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let text = w.due_lines(&refs) + "{\"provider\":\"tiktok\"}\n";
    let file = w.write("big.jsonl", &text);
    let out = w.cli(&["accounts", "import", file.to_str().unwrap()]).await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(out.stderr.contains("line 1501"), "names the line: {out:#?}");
    assert!(out.stderr.contains("nothing imported"), "{out:#?}");
    assert_eq!(
        subjects(&w.list_json().await),
        ["s0"],
        "nothing half-applied"
    );
}
