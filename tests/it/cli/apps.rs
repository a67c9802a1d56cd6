//! `refreshd apps add/list/remove` through the binary, and `run --once` fetching the app
//! token from the sandbox with the client credentials.

use super::World;
use refreshd::model::Grant;
use secrecy::ExposeSecret;
use serde_json::Value;

fn lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_add_list_fetch_and_remove() {
    let w = World::start("").await;
    w.import_due("users.jsonl", &["u1"]).await;

    let out = w.cli(&["apps", "add", "nope", "research"]).await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(out.stderr.contains("[providers.nope]"), "{out:#?}");
    let out = w.cli(&["apps", "add", "tiktok", "bad name"]).await;
    assert_eq!(out.code, Some(1), "{out:#?}");

    const ADD: &[&str] = &[
        "apps",
        "add",
        "tiktok",
        "research",
        "--scope",
        "research.data.basic",
    ];
    let out = w.cli(ADD).await;
    out.ok();
    assert!(
        out.stdout.contains("added app token tiktok/app:research"),
        "{out:#?}"
    );
    assert!(w.cli(ADD).await.ok().stdout.contains("already kept"));

    let out = w.cli(&["apps", "list", "--json"]).await;
    let listed = lines(&out.ok().stdout);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["name"], "research");
    assert_eq!(listed[0]["grant"], "client_credentials");
    assert_eq!(listed[0]["scope"], "research.data.basic");
    let table = w.cli(&["apps", "list"]).await;
    assert!(
        table.ok().stdout.contains("(not fetched yet)"),
        "{table:#?}"
    );

    // The daemon fetches it with the client credentials and stores it.
    w.cli(&["run", "--once"]).await.ok();
    let store = w.store().await;
    let id = listed[0]["id"].as_i64().unwrap();
    let a = store.get(id).await.unwrap().expect("the app's row");
    assert_eq!(a.grant, Grant::ClientCredentials);
    assert_eq!(
        w.sandbox.last_client_token().as_deref(),
        Some(a.access_token.expose_secret())
    );
    assert!(w.sandbox.client_token_valid(a.access_token.expose_secret()));
    store.close().await;
    // No token on any output.
    let table = w.cli(&["apps", "list"]).await;
    assert!(!table.ok().stdout.contains("clt."), "{table:#?}");
    assert!(!table.stdout.contains("(not fetched yet)"), "{table:#?}");

    // A user's account is not an app to remove.
    let out = w.cli(&["apps", "remove", "tiktok", "u1"]).await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(
        out.stderr.contains("no app token tiktok/app:u1"),
        "{out:#?}"
    );
    w.cli(&["apps", "remove", "tiktok", "research"]).await.ok();
    let out = w.cli(&["apps", "list", "--json"]).await;
    assert!(out.ok().stdout.trim().is_empty(), "{out:#?}");
    // The user's account is still there.
    let out = w.cli(&["accounts", "list", "--json"]).await;
    assert_eq!(lines(&out.ok().stdout).len(), 1);
}
