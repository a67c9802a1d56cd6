//! `refreshd accounts`: list, show, import (in `import.rs`), export (in `export.rs`), refresh, disable, enable and
//! remove stored accounts. Tokens are never printed.

use super::{exit, export, import, open_existing, open_read_only};
use anyhow::{Result, bail};
use clap::{Subcommand, ValueEnum};
use refreshd::clock::{Clock, rfc3339};
use refreshd::config::Config;
use refreshd::model::Status;
use refreshd::provider::Revocation;
use refreshd::store::{Actor, AuditAction, AuditEntry, ListFilter};
use refreshd::{connect, telemetry};

#[derive(Subcommand)]
pub enum AccountsCommand {
    /// List accounts (tokens are never shown).
    List {
        /// Only accounts with this status.
        #[arg(long)]
        status: Option<StatusArg>,
        /// Only accounts of this provider (a [providers.NAME] of the config).
        #[arg(long, value_name = "NAME")]
        provider: Option<String>,
        /// Only accounts that need a human: `expiring` and `needs_reauth`.
        #[arg(long)]
        needs_reauth: bool,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one account and its latest refresh attempts.
    Show {
        /// The account's id (see `accounts list`).
        id: i64,
        /// One JSON document instead of text.
        #[arg(long)]
        json: bool,
        /// How many refresh_log entries to show.
        #[arg(long, default_value_t = 10)]
        log: usize,
    },
    /// Import accounts from JSON lines (a file, or - for stdin). All or nothing: one
    /// transaction, streamed (memory stays flat whatever the file's size).
    Import {
        /// The JSON-lines file, or - for stdin.
        file: String,
        /// A JSON summary on stdout instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Write the accounts in the import format (JSON lines). Without --include-tokens an
    /// inventory that `import` refuses; with it, a new 0600 file that imports back.
    Export {
        /// Only accounts of this provider (a [providers.NAME] of the config).
        #[arg(long, value_name = "NAME")]
        provider: Option<String>,
        /// Also write each account's access and refresh token (needs -o FILE).
        #[arg(long)]
        include_tokens: bool,
        /// A new file to write (mode 0600; never overwritten) instead of stdout.
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        output: Option<std::path::PathBuf>,
    },
    /// Make an account due now (a running daemon picks it up at its next look).
    Refresh {
        /// The account's id (see `accounts list`).
        id: i64,
        /// Also retry an account flagged needs_reauth (clears the flag).
        #[arg(long)]
        force: bool,
    },
    /// What comes due in the next hour or day per provider, against each provider's rate
    /// limit, and the soonest refresh-token ends.
    Plan(super::plan::PlanArgs),
    /// Switch an account off: it is not refreshed, the token API refuses its token and
    /// sinks leave its file alone, until `accounts enable`.
    Disable {
        /// The account's id (see `accounts list`).
        id: i64,
    },
    /// Switch a disabled account back on: it is due now (or needs a human again if it was
    /// flagged).
    Enable {
        /// The account's id (see `accounts list`).
        id: i64,
    },
    /// Delete an account and its refresh history.
    Remove {
        /// The account's id (see `accounts list`).
        id: i64,
        /// First ask the provider to revoke the grant (its `revoke_url`); the account is
        /// kept when the provider refuses or cannot be reached.
        #[arg(long)]
        revoke: bool,
        /// With --revoke: remove the account even when the revocation failed.
        #[arg(long, requires = "revoke")]
        force: bool,
    },
}

/// An account status on the command line: the library's `Status`, its values listed by
/// `--help` and the completions.
#[derive(Clone, Copy)]
pub struct StatusArg(Status);

impl ValueEnum for StatusArg {
    fn value_variants<'a>() -> &'a [Self] {
        const ALL: [StatusArg; 4] = [
            StatusArg(Status::ALL[0]),
            StatusArg(Status::ALL[1]),
            StatusArg(Status::ALL[2]),
            StatusArg(Status::ALL[3]),
        ];
        &ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        let help = match self.0 {
            Status::Active => "refreshed automatically",
            Status::Expiring => "refreshed, but the refresh token ends within the reauth window",
            Status::NeedsReauth => "cannot be refreshed: a person must log in again",
            Status::Disabled => "switched off by an admin",
        };
        Some(clap::builder::PossibleValue::new(self.0.as_str()).help(help))
    }
}

/// `refreshd accounts ...`.
pub async fn accounts(config: &Config, cmd: &AccountsCommand) -> Result<u8> {
    let clock = Clock::system();
    match cmd {
        AccountsCommand::List {
            status,
            provider,
            needs_reauth,
            json,
        } => {
            let store = open_read_only(config).await?;
            let filter = ListFilter {
                provider: provider.clone(),
                status: status.map(|s| s.0),
                needs_reauth: *needs_reauth,
                grant: None,
            };
            let mut after = 0;
            let mut n = 0usize;
            if !json {
                println!(
                    "{:>8}  {:<10} {:<24} {:<16} {:<13} {:<23} {:<21} {:<21} {:>4}",
                    "ID",
                    "PROVIDER",
                    "SUBJECT",
                    "LABEL",
                    "STATUS",
                    "REASON",
                    "ACCESS EXPIRES",
                    "REFRESH EXPIRES",
                    "FAIL"
                );
            }
            loop {
                let page = store.list(filter.clone(), after, 1000).await?;
                let Some(last) = page.last() else { break };
                after = last.id;
                for a in &page {
                    n += 1;
                    if *json {
                        println!("{}", serde_json::to_string(&summary_json(a))?);
                    } else {
                        println!(
                            "{:>8}  {:<10} {:<24} {:<16} {:<13} {:<23} {:<21} {:<21} {:>4}",
                            a.id,
                            a.provider,
                            truncate(&a.subject, 24),
                            truncate(a.label.as_deref().unwrap_or("-"), 16),
                            a.status.as_str(),
                            a.reauth_reason.map(|r| r.as_str()).unwrap_or("-"),
                            rfc3339(a.access_expires_at),
                            a.refresh_expires_at
                                .map(rfc3339)
                                .unwrap_or_else(|| "-".into()),
                            a.failures
                        );
                    }
                }
            }
            if !json {
                eprintln!("{n} account(s)");
            }
            store.close().await;
            Ok(exit::OK)
        }
        AccountsCommand::Show { id, json, log } => {
            let store = open_read_only(config).await?;
            let audit = store.audit_entries(*id).await?;
            let Some(a) = store.get(*id).await? else {
                store.close().await;
                return show_removed(*id, &audit, *json);
            };
            // SQLite may give a removed account's id to a new one: its rows are not this one's.
            let audit: Vec<AuditEntry> = audit
                .into_iter()
                .filter(|e| e.provider == a.provider && e.subject == a.subject)
                .collect();
            let entries = store.log_entries(*id, *log).await?;
            store.close().await;
            if *json {
                let mut v = serde_json::json!({
                    "id": a.id, "provider": a.provider, "subject": a.subject, "label": a.label,
                    "status": a.status, "reauth_reason": a.reauth_reason,
                    "reconnect": a.status.needs_human().then(|| telemetry::reconnect_command(&a.provider, a.id)),
                    "reconnect_url": a.status.needs_human().then(|| connect::web_reconnect_url(config, &a.provider, a.id)).flatten(),
                    "reauth_flagged_at": a.reauth_flagged_at.map(rfc3339),
                    "scope": a.scope, "token_type": a.token_type,
                    "access_expires_at": rfc3339(a.access_expires_at),
                    "refresh_expires_at": a.refresh_expires_at.map(rfc3339),
                    "next_refresh_at": rfc3339(a.next_refresh_at),
                    "last_refreshed_at": a.last_refreshed_at.map(rfc3339),
                    "failures": a.failures, "last_error": a.last_error, "generation": a.generation,
                    "created_at": rfc3339(a.created_at), "updated_at": rfc3339(a.updated_at),
                });
                v["refresh_log"] = entries
                    .iter()
                    .map(|e| serde_json::json!({"at": rfc3339(e.at), "outcome": e.outcome, "http_status": e.http_status, "error": e.error, "duration_ms": e.duration_ms}))
                    .collect();
                v["audit"] = audit.iter().map(audit_json).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let opt = |o: Option<i64>| o.map(rfc3339).unwrap_or_else(|| "-".into());
                println!("account {}", a.id);
                println!("  provider           {}", a.provider);
                println!("  subject            {}", a.subject);
                println!("  label              {}", a.label.as_deref().unwrap_or("-"));
                println!("  status             {}", a.status);
                if let Some(r) = a.reauth_reason {
                    println!(
                        "  reauth reason      {r} (flagged {})",
                        opt(a.reauth_flagged_at)
                    );
                }
                if a.status == Status::Disabled {
                    println!(
                        "  disabled           not refreshed, token not handed out; `refreshd accounts enable {}`",
                        a.id
                    );
                }
                if a.status.needs_human() {
                    println!(
                        "  to re-authorize    {}",
                        telemetry::reconnect_command(&a.provider, a.id)
                    );
                    if let Some(u) = connect::web_reconnect_url(config, &a.provider, a.id) {
                        println!("  or send the user   {u}");
                    }
                }
                println!("  scope              {}", a.scope);
                println!("  access expires     {}", rfc3339(a.access_expires_at));
                println!("  refresh expires    {}", opt(a.refresh_expires_at));
                println!("  next refresh       {}", rfc3339(a.next_refresh_at));
                println!("  last refreshed     {}", opt(a.last_refreshed_at));
                println!("  failures           {}", a.failures);
                println!(
                    "  last error         {}",
                    a.last_error.as_deref().unwrap_or("-")
                );
                println!("  generation         {}", a.generation);
                println!("  refresh log (newest first):");
                if entries.is_empty() {
                    println!("    (none)");
                }
                for e in entries {
                    println!(
                        "    {}  {:<16} {:>4} {:>6}  {}",
                        rfc3339(e.at),
                        e.outcome,
                        e.http_status
                            .map(|s| s.to_string())
                            .unwrap_or_else(|| "-".into()),
                        e.duration_ms
                            .map(|d| format!("{d}ms"))
                            .unwrap_or_else(|| "-".into()),
                        e.error.as_deref().unwrap_or("")
                    );
                }
                print_audit(&audit);
            }
            Ok(exit::OK)
        }
        AccountsCommand::Import { file, json } => import::import(config, file, *json).await,
        AccountsCommand::Export {
            provider,
            include_tokens,
            output,
        } => {
            export::export(
                config,
                provider.as_deref(),
                *include_tokens,
                output.as_deref(),
            )
            .await
        }
        AccountsCommand::Refresh { id, force } => {
            let store = open_existing(config).await?;
            let was = store.mark_due(*id, clock.now(), *force).await?;
            store.close().await;
            println!(
                "account {id} ({was}) is due now; a running daemon refreshes it at its next look at the store (within refresh.max_idle)"
            );
            Ok(exit::OK)
        }
        AccountsCommand::Disable { id } => toggle(config, *id, true, clock.now()).await,
        AccountsCommand::Enable { id } => toggle(config, *id, false, clock.now()).await,
        AccountsCommand::Remove { id, revoke, force } => {
            let store = open_existing(config).await?;
            let Some(a) = store.get(*id).await? else {
                store.close().await;
                bail!("no account with id {id} (see `refreshd accounts list`)");
            };
            let via = match (*revoke, *force) {
                (false, _) => "accounts remove",
                (true, false) => "accounts remove --revoke",
                (true, true) => "accounts remove --revoke --force",
            };
            let by = operator(via);
            let mut revocation = None;
            if *revoke {
                let (go, action, answer) = revoked(config, &a, *force).await?;
                if !go {
                    let noted = store.audit(*id, clock.now(), action, &by, &answer).await;
                    store.close().await;
                    noted?;
                    return Ok(exit::ERROR);
                }
                revocation = Some((action, answer));
            }
            let removed = store
                .remove(
                    *id,
                    clock.now(),
                    &by,
                    revocation.as_ref().map(|(a, s)| (*a, s.as_str())),
                )
                .await;
            store.close().await;
            removed?;
            println!("removed account {id} ({}/{})", a.provider, a.subject);
            Ok(exit::OK)
        }
        AccountsCommand::Plan(args) => super::plan::plan(config, args).await,
    }
}

/// `accounts remove --revoke`: asks the provider and says what it answered. Returns whether
/// the account may go (revoked, or `force`), and the audit trail's action and answer.
async fn revoked(
    config: &Config,
    a: &refreshd::model::Account,
    force: bool,
) -> Result<(bool, AuditAction, String)> {
    let providers = refreshd::provider::Providers::from_config(config)?;
    let Some(provider) = providers.get(&a.provider) else {
        bail!(
            "provider {:?} of account {} is not configured or disabled: add [providers.{}] to revoke, or remove without --revoke",
            a.provider,
            a.id,
            a.provider
        );
    };
    // The access token: what TikTok's revocation takes, and Google's ends the grant from it.
    let token = &a.access_token;
    let who = format!("account {} ({}/{})", a.id, a.provider, a.subject);
    let failed = match provider.revoke(token).await {
        Revocation::Revoked { http_status } => {
            println!(
                "provider {} revoked the grant of {who} (HTTP {http_status})",
                a.provider
            );
            let answer = format!("provider {} answered HTTP {http_status}", a.provider);
            return Ok((true, AuditAction::Revoked, answer));
        }
        Revocation::Refused {
            http_status,
            code,
            description,
        } => format!(
            "provider {} refused to revoke {who}: HTTP {http_status}, error {code}{}",
            a.provider,
            if description.is_empty() {
                String::new()
            } else {
                format!(": {description}")
            }
        ),
        Revocation::Unreachable(why) => {
            format!(
                "provider {} could not be reached to revoke {who}: {why}",
                a.provider
            )
        }
        Revocation::Unsupported => format!(
            "provider {} has no revoke_url: {who} cannot be revoked by refreshd (set revoke_url, or revoke it at the provider)",
            a.provider
        ),
    };
    if force {
        println!(
            "{failed}; removing it anyway (--force): its tokens may still work at the provider"
        );
    } else {
        eprintln!(
            "{failed}; the account is NOT removed (retry, or add --force to remove it anyway)"
        );
    }
    Ok((force, AuditAction::RevokeFailed, failed))
}

/// `accounts disable` / `enable`: says what changed, or that nothing had to.
async fn toggle(config: &Config, id: i64, disable: bool, now: i64) -> Result<u8> {
    let store = open_existing(config).await?;
    let Some(a) = store.get(id).await? else {
        store.close().await;
        bail!("no account with id {id} (see `refreshd accounts list`)");
    };
    let via = if disable {
        "accounts disable"
    } else {
        "accounts enable"
    };
    let changed = store.set_disabled(id, disable, now, &operator(via)).await;
    store.close().await;
    let who = format!("account {id} ({}/{})", a.provider, a.subject);
    match changed? {
        (was, None) => println!("{who} is already {was}; nothing changed"),
        (was, Some(Status::Disabled)) => println!(
            "{who} disabled (was {was}): not refreshed, its token not handed out, until `refreshd accounts enable {id}`"
        ),
        (_, Some(now @ (Status::Active | Status::Expiring))) => println!(
            "{who} enabled ({now}): it is due now; a running daemon refreshes it at its next look at the store"
        ),
        (_, Some(now)) => println!(
            "{who} enabled, but it is {now}: a person must log in again (`{}`)",
            telemetry::reconnect_command(&a.provider, id)
        ),
    }
    Ok(exit::OK)
}

/// The audit trail's "who" for this command: the OS user running it (its name as the
/// environment gives it, and the uid, which the environment cannot fake).
pub(crate) fn operator(via: &str) -> Actor {
    let uid = rustix::process::getuid().as_raw();
    let name = ["USER", "LOGNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|n| !n.is_empty()));
    let who = match name {
        Some(n) => format!("{n} (uid {uid})"),
        None => format!("uid {uid}"),
    };
    Actor {
        who,
        via: via.to_string(),
    }
}

/// `accounts show` of an account that is gone: its audit trail says when and by whom.
fn show_removed(id: i64, audit: &[AuditEntry], json: bool) -> Result<u8> {
    let Some(removal) = audit
        .iter()
        .find(|e| e.action == AuditAction::Removed.as_str())
    else {
        bail!("no account with id {id} (see `refreshd accounts list`)");
    };
    if json {
        let v = serde_json::json!({
            "id": id, "provider": removal.provider, "subject": removal.subject,
            "removed_at": rfc3339(removal.at), "removed_by": removal.who, "removed_via": removal.via,
            "audit": audit.iter().map(audit_json).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("account {id}");
        println!("  provider           {}", removal.provider);
        println!("  subject            {}", removal.subject);
        println!(
            "  removed at {} by {} (`{}`)",
            rfc3339(removal.at),
            removal.who,
            removal.via
        );
        print_audit(audit);
    }
    Ok(exit::OK)
}

fn print_audit(audit: &[AuditEntry]) {
    println!("  audit trail (newest first):");
    if audit.is_empty() {
        println!("    (none)");
    }
    for e in audit {
        println!(
            "    {}  {:<14} by {} via `{}`{}",
            rfc3339(e.at),
            e.action,
            e.who,
            e.via,
            e.detail
                .as_deref()
                .map(|d| format!(": {d}"))
                .unwrap_or_default()
        );
    }
}

fn audit_json(e: &AuditEntry) -> serde_json::Value {
    serde_json::json!({
        "at": rfc3339(e.at), "action": e.action, "by": e.who, "via": e.via, "detail": e.detail,
    })
}

fn summary_json(a: &refreshd::store::AccountSummary) -> serde_json::Value {
    serde_json::json!({
        "id": a.id, "provider": a.provider, "subject": a.subject, "label": a.label,
        "status": a.status, "reauth_reason": a.reauth_reason,
        "access_expires_at": rfc3339(a.access_expires_at),
        "refresh_expires_at": a.refresh_expires_at.map(rfc3339),
        "next_refresh_at": rfc3339(a.next_refresh_at),
        "last_refreshed_at": a.last_refreshed_at.map(rfc3339),
        "reauth_flagged_at": a.reauth_flagged_at.map(rfc3339),
        "failures": a.failures, "last_error": a.last_error, "scope": a.scope,
    })
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}
