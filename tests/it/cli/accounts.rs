//! `accounts list/show/refresh/remove` against a real database.

use super::{World, id_of, subjects};
use crate::helpers::now;
use serde_json::Value;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_list_show_refresh_remove() {
    let w = World::start("").await;

    // A missing database: a clear error naming it, and it is not created.
    let out = w.cli(&["accounts", "list"]).await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(
        out.stderr.contains(w.db.to_str().unwrap()) && out.stderr.contains("does not exist"),
        "{out:#?}"
    );
    assert!(!w.db.exists(), "`accounts list` created the database");

    let text = w.due_lines(&["u1", "u2", "u3"])
        + &w.grant("u4", 0, Some(Duration::from_secs(86_400)))
            .to_string()
        + "\n";
    let f = w.write("accounts.jsonl", &text);
    let out = w.cli(&["accounts", "import", f.to_str().unwrap()]).await;
    out.ok();
    assert!(
        out.stderr.contains("already need re-authorization"),
        "{out:#?}"
    );
    let list = w.list_json().await;
    assert_eq!(list.len(), 4, "{list:?}");
    for a in &list {
        assert!(a["id"].is_i64(), "{a}");
        assert_eq!(a["provider"], "tiktok", "{a}");
        assert!(a["subject"].is_string(), "{a}");
        assert!(a["status"].is_string(), "{a}");
        assert!(a.get("access_token").is_none() && a.get("refresh_token").is_none());
    }
    let (u1, u4) = (id_of(&list, "u1"), id_of(&list, "u4"));
    let status = |s: &str| list.iter().find(|a| a["subject"] == s).unwrap()["status"].clone();
    assert_eq!(status("u1"), "active");
    assert_eq!(status("u4"), "expiring");

    // The table: a header, one row per account starting with its id.
    let out = w.cli(&["accounts", "list"]).await;
    out.ok();
    let mut lines = out.stdout.lines();
    let header = lines.next().expect("header");
    for col in ["ID", "PROVIDER", "SUBJECT", "STATUS", "REFRESH EXPIRES"] {
        assert!(header.contains(col), "{header}");
    }
    let mut ids: Vec<i64> = lines
        .map(|l| l.split_whitespace().next().unwrap().parse().expect("id"))
        .collect();
    ids.sort();
    let mut want: Vec<i64> = list.iter().map(|a| a["id"].as_i64().unwrap()).collect();
    want.sort();
    assert_eq!(ids, want, "{out:#?}");
    assert!(out.stderr.contains("4 account(s)"), "{out:#?}");
    assert!(out.stdout.contains("label of u1"), "{out:#?}");

    // --needs-reauth: only the account whose refresh token ends within the window.
    let out = w
        .cli(&["accounts", "list", "--needs-reauth", "--json"])
        .await;
    out.ok();
    let flagged: Vec<Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(subjects(&flagged), ["u4"], "{out:#?}");
    assert_eq!(flagged[0]["reauth_reason"], "refresh_token_expiring");
    let out = w
        .cli(&["accounts", "list", "--status", "expiring", "--json"])
        .await;
    out.ok();
    assert_eq!(out.stdout.lines().count(), 1, "{out:#?}");

    // A refresh gives u1..u3 a second refresh_log entry.
    let out = w.cli(&["run", "--once"]).await;
    out.ok();
    let out = w.cli(&["accounts", "show", &u1.to_string()]).await;
    out.ok();
    assert!(
        out.stdout.starts_with(&format!("account {u1}\n")),
        "{out:#?}"
    );
    for want in [
        "subject            u1",
        "label of u1",
        "status             active",
        "refresh log (newest first):",
        "rotated",
        "imported",
    ] {
        assert!(out.stdout.contains(want), "{want}: {out:#?}");
    }
    assert!(
        out.stdout.find("rotated") < out.stdout.find("imported"),
        "newest first: {out:#?}"
    );
    let out = w
        .cli(&["accounts", "show", &u1.to_string(), "--json"])
        .await;
    out.ok();
    let v: Value = serde_json::from_str(&out.stdout).expect("show --json is JSON");
    assert_eq!(v["id"], u1);
    assert_eq!(v["subject"], "u1");
    assert_eq!(v["status"], "active");
    assert_eq!(v["generation"], 1, "{v}");
    let log: Vec<&str> = v["refresh_log"]
        .as_array()
        .expect("refresh_log")
        .iter()
        .map(|e| e["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(log, ["rotated", "imported"], "{v}");
    assert_eq!(v["refresh_log"][0]["http_status"], 200, "{v}");

    // An unknown id.
    for args in [
        &["accounts", "show", "999"][..],
        &["accounts", "show", "999", "--json"][..],
        &["accounts", "refresh", "999"][..],
        &["accounts", "remove", "999"][..],
    ] {
        let out = w.cli(args).await;
        assert_eq!(out.code, Some(1), "{args:?}: {out:#?}");
        assert!(out.stderr.contains("999"), "{args:?}: {out:#?}");
        assert!(out.stdout.is_empty(), "{args:?}: {out:#?}");
    }

    // `accounts refresh`: due now.
    let store = w.store().await;
    let before = store.get(u1).await.unwrap().unwrap().next_refresh_at;
    store.close().await;
    assert!(
        before > now() + 3600,
        "u1 was refreshed: next refresh is later"
    );
    let out = w.cli(&["accounts", "refresh", &u1.to_string()]).await;
    out.ok();
    assert!(
        out.stdout
            .contains(&format!("account {u1} (active) is due now")),
        "{out:#?}"
    );
    let store = w.store().await;
    let after = store.get(u1).await.unwrap().unwrap().next_refresh_at;
    store.close().await;
    assert!(after <= now(), "due now: {after} vs {}", now());

    // `accounts remove`, then `show` answers from the audit trail (tests/it/audit.rs).
    let out = w.cli(&["accounts", "remove", &u4.to_string()]).await;
    out.ok();
    assert!(
        out.stdout
            .contains(&format!("removed account {u4} (tiktok/u4)")),
        "{out:#?}"
    );
    let out = w.cli(&["accounts", "show", &u4.to_string()]).await;
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(out.stdout.contains(" removed at "), "{out:#?}");
    assert_eq!(subjects(&w.list_json().await), ["u1", "u2", "u3"]);
}
