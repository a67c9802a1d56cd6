//! `refreshd accounts plan` on the real binary over a seeded SQLite store: the due counts
//! per minute, the backlog, the load against the rate limit, the soonest refresh-token ends,
//! as JSON and as text.

use crate::helpers::{Out, bin, open_store, run_to_end};
use refreshd::clock::Clock;
use refreshd::model::{Status, TokenSet};
use refreshd::store::NewAccount;
use secrecy::SecretString;
use std::process::Command;
use std::time::Duration;

fn account(provider: &str, subject: &str, now: i64, next: i64, ends_in: Option<i64>) -> NewAccount {
    NewAccount {
        provider: provider.into(),
        subject: subject.into(),
        label: None,
        tokens: TokenSet {
            access_token: SecretString::from("at.plan"),
            refresh_token: Some(SecretString::from("rt.plan")),
            expires_in: 86_400,
            refresh_expires_in: ends_in,
            subject: None,
            scope: None,
            token_type: "Bearer".into(),
        },
        obtained_at: now,
        next_refresh_at: next,
        status: Status::Active,
        reauth_reason: None,
    }
}

async fn plan(config: &std::path::Path, args: &[&str]) -> Out {
    let mut cmd = Command::new(bin());
    cmd.arg("--config")
        .arg(config)
        .args(["accounts", "plan"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("REFRESHD_") || k == "RUST_LOG" {
            cmd.env_remove(&k);
        }
    }
    run_to_end(cmd, None, Duration::from_secs(60)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_shows_due_minutes_the_rate_limit_and_the_soonest_ends() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("refreshd.db");
    let config = dir.path().join("refreshd.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\npath = {db:?}\n\n[providers.tiktok]\nclient_key = \"k\"\nclient_secret = \"s\"\nrate_limit = 5\n\n[providers.google]\nclient_key = \"k\"\nclient_secret = \"s\"\n"
        ),
    )
    .unwrap();
    // The binary reads the system clock: the accounts are placed around it, in the middle
    // of a minute so that the minute the binary starts in is the same or the next.
    let now = Clock::system().now();
    let minute = now - now % 60;
    let store = open_store(&db, Duration::from_secs(2)).await;
    let mut seeded: Vec<NewAccount> = (0..8)
        .map(|i| {
            account(
                "tiktok",
                &format!("burst-{i}"),
                now,
                minute + 10 * 60 + 30,
                None,
            )
        })
        .collect();
    seeded.push(account(
        "tiktok",
        "overdue-1",
        now,
        now - 600,
        Some(90 * 86_400),
    ));
    seeded.push(account("tiktok", "overdue-2", now, now - 900, None));
    seeded.push(account(
        "tiktok",
        "later",
        now,
        minute + 30 * 60 + 30,
        Some(3 * 86_400),
    ));
    seeded.push(account(
        "tiktok",
        "tomorrow",
        now,
        now + 20 * 3_600,
        Some(10 * 86_400),
    ));
    seeded.push(account(
        "google",
        "g-1",
        now,
        minute + 45 * 60 + 30,
        Some(2 * 86_400),
    ));
    store.upsert(seeded, now).await.unwrap();
    store.close().await;

    let out = plan(&config, &["--json", "--top", "2"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    let v: serde_json::Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|_| panic!("{}", out.all()));
    assert_eq!(v["window_minutes"], 60);
    let providers = v["providers"].as_array().unwrap();
    assert_eq!(providers.len(), 2, "{v}");
    let (google, tiktok) = (&providers[0], &providers[1]);
    assert_eq!(
        (&google["provider"], &google["due"]),
        (&"google".into(), &1.into())
    );
    assert_eq!(tiktok["provider"], "tiktok");
    assert_eq!(
        (&tiktok["due"], &tiktok["backlog"]),
        (&9.into(), &2.into()),
        "{tiktok}"
    );
    assert_eq!(
        (&tiktok["peak"], &tiktok["rate_limit"]),
        (&8.into(), &5.into())
    );
    assert_eq!(tiktok["minutes_over_limit"], 1);
    assert_eq!(tiktok["per_minute"].as_array().unwrap().len(), 60);
    let ends: Vec<&str> = v["refresh_ends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["subject"].as_str().unwrap())
        .collect();
    assert_eq!(ends, ["g-1", "later"], "the soonest two");

    // A day: tomorrow's account comes in; one provider only.
    let out = plan(
        &config,
        &["--window", "1d", "--provider", "tiktok", "--json"],
    )
    .await;
    let v: serde_json::Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|_| panic!("{}", out.all()));
    assert_eq!(v["providers"].as_array().unwrap().len(), 1);
    assert_eq!(v["providers"][0]["due"], 10);
    assert_eq!(v["window_minutes"], 1_440);

    // The text: 80 columns, the overload named, the soonest ends listed.
    let out = plan(&config, &[]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(
        out.stdout.lines().all(|l| l.chars().count() <= 80),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("tiktok: 9 due, 2 overdue (backlog); peak 8/min"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("EXCEEDS the limit of 5/min in 1 minute(s)"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("google: 1 due"), "{}", out.stdout);
    assert!(out.stdout.contains("later"), "{}", out.stdout);
    assert!(
        !out.all().contains("at.plan") && !out.all().contains("rt.plan"),
        "no token shown"
    );

    // A window that is not whole minutes is refused, naming the flag.
    let out = plan(&config, &["--window", "90s"]).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(out.stderr.contains("--window"), "{}", out.stderr);
}
