//! The store's own commands: `store copy` (between SQLite files and PostgreSQL, and where
//! each end's URL or path is read), `rekey` and `keygen`.

use super::{exit, open_existing, progress};
use anyhow::{Context, Result, bail};
use clap::Subcommand;
use refreshd::clock::Clock;
use refreshd::config::Config;
use refreshd::lifecycle;
use refreshd::store::{Store, StoreOptions};
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum StoreCommand {
    /// Copy every account and its refresh log from one store to another (SQLite file or
    /// postgres:// URL), ids and sealed tokens as they are. Stop the daemons first. Resumable:
    /// run it again after an interruption. Verified by counts and SHA-256 checksums.
    Copy {
        /// The store to read: a SQLite file path (or sqlite://PATH), a postgres:// URL, or
        /// @FILE holding one (keeps a password out of the command line and shell history).
        #[arg(long, value_name = "URL")]
        from: String,
        /// The store to write (created and migrated when new; must be empty or a partial
        /// copy), in the same forms.
        #[arg(long, value_name = "URL")]
        to: String,
        /// Accounts per transaction.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
        /// A JSON summary on stdout instead of text.
        #[arg(long)]
        json: bool,
    },
}

pub async fn store(config: &Config, cmd: &StoreCommand) -> Result<u8> {
    match cmd {
        StoreCommand::Copy {
            from,
            to,
            batch,
            json,
        } => copy(config, from, to, *batch, *json).await,
    }
}

pub fn keygen(path: &Path) -> Result<u8> {
    let id = refreshd::crypto::generate_key_file(path)?;
    println!("{id}");
    eprintln!(
        "wrote key {id} to {} (mode 0600): set store.encryption_key_file to it, keep a backup where the database's backups are not",
        path.display()
    );
    Ok(exit::OK)
}

/// What one end of `store copy` names, once an `@FILE` was read. Its `Debug` leaves the URL
/// out: it may carry a password.
#[derive(PartialEq)]
enum StoreEnd {
    /// A PostgreSQL URL, its scheme spelled `postgres://`.
    Postgres(String),
    Sqlite(PathBuf),
}

impl std::fmt::Debug for StoreEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreEnd::Postgres(_) => f.write_str("Postgres(<url>)"),
            StoreEnd::Sqlite(p) => f.debug_tuple("Sqlite").field(p).finish(),
        }
    }
}

/// Reads a `store copy` end: a postgres:// URL (postgresql://, any case), a SQLite path
/// (sqlite://PATH too). `which` is `from` or `to`, for the errors. Never echoes a URL: a
/// mistyped one may carry a password.
fn parse_store_end(which: &str, text: &str) -> Result<StoreEnd> {
    // Anything shaped like `scheme:/...` is a URL, whatever its case.
    let scheme = text
        .split_once(":/")
        .map(|(s, _)| s.to_ascii_lowercase())
        .filter(|s| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c))
        });
    let end = match scheme.as_deref() {
        Some("postgres" | "postgresql") => {
            let rest = text.split_once("://").map(|(_, r)| r).ok_or_else(|| {
                anyhow::anyhow!(
                    "store copy --{which}: a PostgreSQL URL starts with postgres:// (two slashes)"
                )
            })?;
            let url = format!("postgres://{rest}");
            refreshd::config::validate_postgres_url(&url).map_err(|m| {
                anyhow::anyhow!(
                    "store copy --{which} {}: {m}",
                    refreshd::store::postgres::describe(&url)
                )
            })?;
            StoreEnd::Postgres(url)
        }
        Some("sqlite") => StoreEnd::Sqlite(PathBuf::from(
            text.split_once("://").map(|(_, p)| p).unwrap_or(""),
        )),
        Some(other) => bail!(
            "store copy --{which}: unknown store scheme {other:?}: give a SQLite file path, sqlite://PATH or postgres://USER:PASSWORD@HOST/DB"
        ),
        None => StoreEnd::Sqlite(PathBuf::from(text)),
    };
    if end == StoreEnd::Sqlite(PathBuf::new()) {
        bail!("store copy --{which}: empty; give a SQLite file path or a postgres:// URL");
    }
    Ok(end)
}

/// Store options for a `store copy` end: [`parse_store_end`]'s forms, or `@FILE` holding
/// one (keeps a password out of the command line).
fn copy_end(config: &Config, which: &str, given: &str, scratch: &Path) -> Result<StoreOptions> {
    let text = match given.strip_prefix('@') {
        Some(file) => std::fs::read_to_string(file)
            .with_context(|| format!("store copy --{which}: cannot read {file}"))?
            .trim()
            .to_string(),
        None => given.to_string(),
    };
    let mut opts = lifecycle::store_options(config);
    match parse_store_end(which, &text)? {
        StoreEnd::Postgres(url) => {
            opts.postgres = Some(refreshd::store::PgOptions {
                url: secrecy::SecretString::from(url),
                pool_size: 2,
            });
            // A PostgreSQL end has no recovery file of its own: never replay the daemon's.
            opts.path = scratch.join(format!("{which}.db"));
        }
        StoreEnd::Sqlite(path) => {
            opts.path = path;
            opts.postgres = None;
        }
    }
    Ok(opts)
}

async fn copy(config: &Config, from: &str, to: &str, batch: usize, json: bool) -> Result<u8> {
    let scratch = tempfile::tempdir()?;
    let from_opts = copy_end(config, "from", from, scratch.path())?;
    let to_opts = copy_end(config, "to", to, scratch.path())?;
    if from_opts.postgres.is_none() {
        if !from_opts.path.exists() {
            bail!(
                "store copy: the source {} does not exist",
                from_opts.path.display()
            );
        }
        // Rotations a run could not commit live only there: copying without them would
        // leave the destination with refresh tokens the provider has already retired.
        if let Some(recovery) = refreshd::store::pending_recovery_files(&from_opts.path).first() {
            bail!(
                "store copy: {} holds rotated tokens not yet committed to {}: run `refreshd run` on it once (start-up commits them), stop it, then copy",
                recovery.display(),
                from_opts.path.display()
            );
        }
    }
    let source = Store::open_read_only(from_opts).await?;
    let dest = Store::open(to_opts).await?;
    let total: i64 = source.counts().await?.iter().map(|(_, _, n)| n).sum();
    let bar = progress(
        total as u64,
        "{bar:40} {pos}/{len} accounts copied, {eta} left",
    );
    let started = std::time::Instant::now();
    let report =
        refreshd::store::copy::copy(&source, &dest, batch, Clock::system().now(), |n| bar.inc(n))
            .await;
    bar.finish_and_clear();
    source.close().await;
    dest.close().await;
    let report = report?;
    if json {
        let summary = serde_json::json!({
            "from": source.describe(),
            "to": dest.describe(),
            "resumed_after": report.resumed_after,
            "accounts_copied": report.accounts_copied,
            "log_rows_copied": report.log_rows_copied,
            "accounts": report.accounts,
            "accounts_sha256": report.accounts_sha256,
            "log_rows": report.log_rows,
            "log_sha256": report.log_sha256,
            "audit_rows_copied": report.audit_rows_copied,
            "audit_rows": report.audit_rows,
            "audit_sha256": report.audit_sha256,
            "seconds": started.elapsed().as_secs_f64(),
        });
        println!("{summary}");
        return Ok(exit::OK);
    }
    if report.resumed_after > 0 {
        println!(
            "resumed after account {} (copied by an earlier, interrupted run)",
            report.resumed_after
        );
    }
    println!(
        "copied {} account(s), {} refresh-log row(s) and {} audit row(s) from {} to {} in {:.1}s",
        report.accounts_copied,
        report.log_rows_copied,
        report.audit_rows_copied,
        source.describe(),
        dest.describe(),
        started.elapsed().as_secs_f64()
    );
    println!(
        "verified: accounts {} rows sha256 {}; refresh_log {} rows sha256 {}; audit_log {} rows sha256 {}",
        report.accounts,
        report.accounts_sha256,
        report.log_rows,
        report.log_sha256,
        report.audit_rows,
        report.audit_sha256
    );
    Ok(exit::OK)
}

/// `refreshd rekey`: re-seals every token under the primary key, with a progress bar.
pub async fn rekey(config: &Config, batch: usize) -> Result<u8> {
    let Some(primary) = config.store.keyring.primary_id().map(str::to_string) else {
        bail!(
            "rekey seals tokens under store.encryption_key_file, which is not set (write a key with `refreshd keygen PATH`)"
        );
    };
    refreshd::hardening::check_files(config)?;
    let store = open_existing(config).await?;
    let todo = store.count_to_rekey().await?;
    let bar = progress(todo, "{bar:40} {pos}/{len} accounts re-sealed, {eta} left");
    let report = refreshd::store::rekey(&store, batch, |n| bar.inc(n)).await;
    bar.finish_and_clear();
    store.close().await;
    let report = report?;
    println!(
        "re-sealed {} account(s) under key {primary}; {} left",
        report.resealed, report.remaining
    );
    if report.remaining > 0 {
        eprintln!(
            "{} account(s) were rewritten under another key while rekey ran: restart every daemon with the new store.encryption_key_file, then run `refreshd rekey` again",
            report.remaining
        );
        return Ok(exit::ERROR);
    }
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end(text: &str) -> Result<StoreEnd, String> {
        parse_store_end("to", text).map_err(|e| e.to_string())
    }

    #[test]
    fn store_ends_are_urls_or_paths() {
        assert_eq!(
            end("postgres://u:p@db/x"),
            Ok(StoreEnd::Postgres("postgres://u:p@db/x".into()))
        );
        assert_eq!(
            end("PostgreSQL://u:p@db/x"),
            Ok(StoreEnd::Postgres("postgres://u:p@db/x".into()))
        );
        assert_eq!(
            end("sqlite:///var/lib/a.db"),
            Ok(StoreEnd::Sqlite("/var/lib/a.db".into()))
        );
        assert_eq!(end("data/a.db"), Ok(StoreEnd::Sqlite("data/a.db".into())));
        // A colon alone is no scheme: a file may be called so.
        assert_eq!(end("C:a.db"), Ok(StoreEnd::Sqlite("C:a.db".into())));
    }

    #[test]
    fn bad_store_ends_are_named_without_the_url() {
        let e = end("postgres:/db/x").unwrap_err();
        assert!(
            e.contains("--to: a PostgreSQL URL starts with postgres://"),
            "{e}"
        );
        let e = end("mysql://u:secret@db/x").unwrap_err();
        assert!(e.contains("unknown store scheme \"mysql\""), "{e}");
        assert!(!e.contains("secret"), "{e}");
        let e = end("").unwrap_err();
        assert!(e.contains("--to: empty"), "{e}");
        let e = end("sqlite://").unwrap_err();
        assert!(e.contains("--to: empty"), "{e}");
    }
}
