//! Connecting accounts from the command line: `connect` (browser and loopback callback),
//! `authorize-url` and `exchange` (the same flow by hand). Prints who was connected, never
//! a token; a flagged account reconnected is announced (`account_recovered`).

use super::{exit, open_existing};
use anyhow::{Result, bail};
use refreshd::clock::{Clock, rfc3339};
use refreshd::config::Config;
use refreshd::store::Store;
use refreshd::{connect, lifecycle, notify};
use secrecy::{ExposeSecret, SecretString};
use std::time::Duration;

/// `refreshd connect`: the browser flow through the loopback callback.
pub async fn connect(
    config: &Config,
    provider: &str,
    label: Option<String>,
    scopes: Option<&str>,
    account: Option<i64>,
    timeout: Duration,
) -> Result<u8> {
    let p = connect::enabled_provider(config, provider)?;
    let redirect = connect::loopback_redirect(provider, p)?;
    let connect::Authorization {
        scopes,
        state,
        pkce,
        url,
    } = connect::prepare_authorization(provider, p, scopes)?;
    if let Some(id) = account {
        // Fail before the browser dance when the account does not exist.
        let store = open_existing(config).await?;
        let found = store.get(id).await?;
        store.close().await;
        if found.is_none() {
            bail!("no account with id {id} (see `refreshd accounts list`)");
        }
    }
    let listener = connect::CallbackListener::bind(&redirect).await?;
    println!("Open this URL in a browser, log in and approve:");
    println!("{url}");
    println!(
        "Waiting up to {} for the callback on {redirect} ...",
        humantime::format_duration(timeout)
    );
    let (callback, result) = listener.accept(&state, timeout).await?;
    let (code, _granted) = match result {
        Ok(r) => r,
        Err(e) => {
            callback
                .respond(false, &format!("Not connected: {e}"))
                .await;
            return Err(e.into());
        }
    };
    let result = exchange_into_store(
        config,
        connect::Exchange {
            provider,
            code,
            code_verifier: pkce.map(|k| k.verifier),
            label,
            account,
        },
    )
    .await?;
    match result {
        Ok(c) => {
            callback
                .respond(
                    true,
                    &format!(
                        "Connected {} account {}. You can close this tab.",
                        c.provider, c.open_id
                    ),
                )
                .await;
            print_connected(&c, &scopes);
            announce_recovery(config, &c).await;
            Ok(exit::OK)
        }
        Err(e) => {
            callback
                .respond(false, &format!("Not connected: {e}"))
                .await;
            Err(e.into())
        }
    }
}

/// `refreshd authorize-url`: the URL on stdout, what to keep on stderr.
pub fn authorize_url(config: &Config, provider: &str, scopes: Option<&str>) -> Result<u8> {
    let p = connect::enabled_provider(config, provider)?;
    let connect::Authorization {
        state, pkce, url, ..
    } = connect::prepare_authorization(provider, p, scopes)?;
    println!("{url}");
    eprintln!("state: {state}");
    eprintln!("  check that the callback's `state` is exactly this before using its code");
    if let Some(k) = &pkce {
        eprintln!("code verifier: {}", k.verifier.expose_secret());
        eprintln!("  pass it to `refreshd exchange {provider} --code-verifier ...`");
    }
    Ok(exit::OK)
}

/// `refreshd exchange`: a code from a callback the user copied, exchanged and stored.
pub async fn exchange(
    config: &Config,
    provider: &str,
    code: &str,
    code_verifier: Option<&str>,
    label: Option<String>,
    account: Option<i64>,
) -> Result<u8> {
    let c = exchange_into_store(
        config,
        connect::Exchange {
            provider,
            code: SecretString::from(code.to_string()),
            code_verifier: code_verifier.map(|v| SecretString::from(v.to_string())),
            label,
            account,
        },
    )
    .await??;
    print_connected(&c, &[]);
    announce_recovery(config, &c).await;
    Ok(exit::OK)
}

/// A flagged account reconnected from the command line: `account_recovered` logged and
/// sent to the webhook by this command (no daemon hears of it).
async fn announce_recovery(config: &Config, c: &connect::Connected) {
    if let Some(e) = c.announce_recovery() {
        notify::send_now(config, Clock::system(), vec![e]).await;
    }
}

/// Exchanges the code and stores the account in the configured store (closed after). The
/// outer error is the store's; the inner one the connection's, for the browser to be told.
async fn exchange_into_store(
    config: &Config,
    req: connect::Exchange<'_>,
) -> Result<Result<connect::Connected, connect::ConnectError>> {
    let store = Store::open(lifecycle::store_options(config)).await?;
    let clock = Clock::system();
    let result = connect::exchange_and_store(config, &store, req, || clock.now()).await;
    store.close().await;
    Ok(result)
}

/// Who was connected; never a token.
fn print_connected(c: &connect::Connected, requested: &[String]) {
    println!(
        "connected {} account {} ({}): {} {}",
        c.provider,
        c.account_id,
        if c.created { "new" } else { "updated" },
        c.subject_name,
        c.open_id
    );
    println!(
        "  scopes granted     {}",
        if c.scope.is_empty() { "-" } else { &c.scope }
    );
    println!("  access expires     {}", rfc3339(c.access_expires_at));
    println!(
        "  refresh expires    {}",
        c.refresh_expires_at
            .map(rfc3339)
            .unwrap_or_else(|| "-".into())
    );
    println!("  status             {}", c.status);
    let missing = connect::missing_scopes(requested, &c.scope);
    if !missing.is_empty() {
        eprintln!(
            "warning: the user did not grant {} of the requested scopes: {}; connect again and approve them if they are needed",
            missing.len(),
            missing.join(", ")
        );
    }
}
