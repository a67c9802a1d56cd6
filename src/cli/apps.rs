//! `refreshd apps`: add, list and remove app tokens (client-credentials grant) kept in the
//! store beside the accounts. Tokens are never printed: the token API and sinks hand them out.

use super::{exit, open_existing, open_read_only};
use anyhow::{Result, bail};
use clap::Subcommand;
use refreshd::clock::{Clock, rfc3339};
use refreshd::config::Config;
use refreshd::model::{APP_SUBJECT_PREFIX, Grant, app_subject, check_app_name};
use refreshd::store::{AppAdded, ListFilter, NewApp};

#[derive(Subcommand)]
pub enum AppsCommand {
    /// Keep an app token of a provider (asked for with the client credentials alone); due
    /// at once: a running daemon fetches it at its next look.
    Add {
        /// The provider (a [providers.NAME] of the config).
        provider: String,
        /// The app's name: letters, digits, `.`, `_`, `-` (its subject is `app:NAME`).
        name: String,
        /// The scope to ask for (as the provider writes it); none by default.
        #[arg(long, default_value = "")]
        scope: String,
    },
    /// List the app tokens (tokens are never shown).
    List {
        /// Only app tokens of this provider.
        #[arg(long, value_name = "NAME")]
        provider: Option<String>,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Stop keeping an app token: its row and history are deleted.
    Remove {
        /// The provider (a [providers.NAME] of the config).
        provider: String,
        /// The app's name (see `apps list`).
        name: String,
    },
}

pub async fn apps(config: &Config, cmd: &AppsCommand) -> Result<u8> {
    match cmd {
        AppsCommand::Add {
            provider,
            name,
            scope,
        } => {
            if !config.providers.contains_key(provider) {
                bail!(
                    "provider {provider:?} is not configured: add [providers.{provider}] to the config first"
                );
            }
            if let Err(problem) = check_app_name(name) {
                bail!("app name {name:?}: {problem}");
            }
            if scope.chars().any(char::is_control) {
                bail!("--scope must not hold control characters");
            }
            let store = open_existing(config).await?;
            let app = NewApp {
                provider: provider.clone(),
                name: name.clone(),
                scope: scope.clone(),
                label: None,
            };
            let added = store.add_app(app, Clock::system().now()).await;
            store.close().await;
            let subject = app_subject(name);
            match added? {
                AppAdded::Created(id) => println!(
                    "added app token {provider}/{subject} as account {id}; a running daemon fetches it at its next look"
                ),
                AppAdded::Kept { id, rescoped } => println!(
                    "app token {provider}/{subject} is already kept as account {id}{}",
                    if rescoped {
                        "; its scope is changed and it is due now"
                    } else {
                        ""
                    }
                ),
            }
            Ok(exit::OK)
        }
        AppsCommand::List { provider, json } => {
            let store = open_read_only(config).await?;
            let filter = ListFilter {
                provider: provider.clone(),
                grant: Some(Grant::ClientCredentials),
                ..ListFilter::default()
            };
            if !json {
                println!(
                    "{:>8}  {:<10} {:<20} {:<13} {:<21} {:<24} LAST ERROR",
                    "ID", "PROVIDER", "NAME", "STATUS", "EXPIRES", "SCOPE"
                );
            }
            let mut after = 0;
            loop {
                let page = store.list(filter.clone(), after, 500).await?;
                let Some(last) = page.last() else { break };
                after = last.id;
                for a in &page {
                    let name = a
                        .subject
                        .strip_prefix(APP_SUBJECT_PREFIX)
                        .unwrap_or(&a.subject);
                    if *json {
                        let mut v = serde_json::to_value(a)?;
                        v["name"] = serde_json::json!(name);
                        println!("{v}");
                        continue;
                    }
                    // Not fetched yet: no token, and nothing expires.
                    let expires = match a.last_refreshed_at {
                        Some(_) => rfc3339(a.access_expires_at),
                        None => "(not fetched yet)".into(),
                    };
                    println!(
                        "{:>8}  {:<10} {:<20} {:<13} {:<21} {:<24} {}",
                        a.id,
                        a.provider,
                        name,
                        a.status.as_str(),
                        expires,
                        a.scope,
                        a.last_error.as_deref().unwrap_or("-")
                    );
                }
            }
            store.close().await;
            Ok(exit::OK)
        }
        AppsCommand::Remove { provider, name } => {
            let store = open_existing(config).await?;
            let subject = app_subject(name);
            let found = store.find(provider, &subject).await?;
            let Some(a) = found.filter(|a| a.grant == Grant::ClientCredentials) else {
                store.close().await;
                bail!("no app token {provider}/{subject} (see `refreshd apps list`)");
            };
            store
                .remove(
                    a.id,
                    Clock::system().now(),
                    &super::accounts::operator("apps remove"),
                    None,
                )
                .await?;
            store.close().await;
            println!("removed app token {provider}/{subject} (account {})", a.id);
            Ok(exit::OK)
        }
    }
}
