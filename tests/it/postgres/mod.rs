//! PostgreSQL: real `refreshd run` replicas sharing one database, connection loss, and
//! `store copy` between the backends, on the test binary's throwaway PostgreSQL cluster
//! (refreshd-testkit; `REFRESHD_TEST_POSTGRES_URL` names another server). This file holds the
//! shared set-up: a fresh schema's URL, store options and imported accounts.

use crate::helpers::now;
use refreshd::model::{Account, Status, TokenSet};
use refreshd::sandbox::Sandbox;
use refreshd::store::{NewAccount, Outcome, PgOptions, Store, StoreOptions};
use secrecy::SecretString;
use std::path::Path;
use std::time::Duration;

mod commits;
mod connection;
mod copy;
mod replicas;

/// A URL on a fresh schema of the throwaway cluster (refreshd-testkit), or None after a
/// NOT RUN when PostgreSQL is not installed.
pub async fn postgres_url(test: &str) -> Option<String> {
    refreshd_testkit::postgres_schema(test).await
}

async fn raw(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

/// Tokens that live an hour, with no refresh-token lifetime, scope or subject.
fn tokens(access: impl Into<String>, refresh: impl Into<String>) -> TokenSet {
    TokenSet {
        access_token: SecretString::from(access.into()),
        refresh_token: Some(SecretString::from(refresh.into())),
        expires_in: 3600,
        refresh_expires_in: None,
        subject: None,
        scope: None,
        token_type: "Bearer".into(),
    }
}

fn pg_store_options(url: &str, dir: &Path) -> StoreOptions {
    StoreOptions {
        path: dir.join("refreshd.db"),
        busy_timeout: Duration::from_secs(5),
        keyring: Default::default(),
        postgres: Some(PgOptions {
            url: SecretString::from(url.to_string()),
            pool_size: 4,
        }),
    }
}

/// Opens the store on `url` (recovery file and keys under `dir`).
async fn open_pg(url: &str, dir: &Path) -> Store {
    Store::open(pg_store_options(url, dir)).await.unwrap()
}

/// A successful rotation of the claimed account `a` to `tokens`, answered a second after `t`
/// and due again 3,000 s after `t`.
fn rotated_a_second_later(a: &Account, tokens: TokenSet, t: i64) -> Outcome {
    Outcome::Rotated {
        account_id: a.id,
        generation: a.generation,
        tokens,
        at: t + 1,
        next_refresh_at: t + 3000,
        status: Status::Active,
        reauth_reason: None,
        http_status: Some(200),
        duration_ms: 5,
    }
}

/// Imports fresh sandbox grants for `n` users, due now.
async fn import(store: &Store, sandbox: &Sandbox, n: usize) -> Vec<i64> {
    let t = now();
    let accounts = (0..n)
        .map(|i| {
            let open_id = format!("user-{i:03}");
            let g = sandbox.grant(&open_id, "user.info.basic", None);
            NewAccount {
                provider: "tiktok".into(),
                subject: open_id,
                label: None,
                tokens: TokenSet {
                    access_token: SecretString::from(g["access_token"].as_str().unwrap()),
                    refresh_token: Some(SecretString::from(g["refresh_token"].as_str().unwrap())),
                    expires_in: g["expires_in"].as_i64().unwrap(),
                    refresh_expires_in: g["refresh_expires_in"].as_i64(),
                    subject: None,
                    scope: Some("user.info.basic".into()),
                    token_type: "Bearer".into(),
                },
                obtained_at: t,
                next_refresh_at: t,
                status: Status::Active,
                reauth_reason: None,
            }
        })
        .collect();
    store
        .upsert(accounts, t)
        .await
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect()
}

fn new_account(subject: &str, t: i64) -> NewAccount {
    NewAccount {
        provider: "tiktok".into(),
        subject: subject.into(),
        label: None,
        tokens: tokens(format!("at-{subject}"), format!("rt-{subject}")),
        obtained_at: t,
        next_refresh_at: t,
        status: Status::Active,
        reauth_reason: None,
    }
}
