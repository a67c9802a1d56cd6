//! The `refreshd` command line: parses arguments, loads the config, calls the library, and
//! maps errors to exit codes. Nothing else lives here.

use anyhow::{Context, Result, bail};
use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use refreshd::clock::{Clock, rfc3339};
use refreshd::config::Config;
use refreshd::lifecycle::{self, RunOptions};
use refreshd::model::Status;
use refreshd::store::{ListFilter, Store};
use refreshd::{connect, demo, import, telemetry};
use secrecy::{ExposeSecret, SecretString};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

// The generated CLI reference is written and checked by a test (see tests below).
#[cfg(test)]
mod cli_reference;

/// Exit codes (documented in docs/src/reference/cli.md).
mod exit {
    pub const OK: u8 = 0;
    pub const ERROR: u8 = 1;
    // 2 is clap's usage error.
    pub const NEEDS_REAUTH: u8 = 3;
    pub const CONFIG: u8 = 78; // EX_CONFIG
}

#[derive(Parser)]
#[command(
    name = "refreshd",
    version,
    about = "Keeps OAuth 2.0 connections alive: refreshes tokens ahead of expiry and flags accounts that need re-authorization."
)]
struct Cli {
    /// Config file (default: ./refreshd.toml when present). Read by run, check, accounts,
    /// connect, authorize-url, exchange, rekey and store; give it before the command.
    #[arg(
        long,
        short = 'c',
        env = "REFRESHD_CONFIG",
        hide_env_values = true,
        value_name = "PATH"
    )]
    config: Option<PathBuf>,
    /// Whether --config came from the command line (not the environment): commands that
    /// read no config refuse it rather than ignore it.
    #[arg(skip)]
    config_given: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: refresh tokens as they come due until SIGTERM/SIGINT.
    Run {
        /// Refresh what is due now, run the reauth sweep, and exit. Exit code 3 when an
        /// account newly needs re-authorization.
        #[arg(long)]
        once: bool,
    },
    /// Inspect and manage stored accounts.
    #[command(subcommand)]
    Accounts(AccountsCommand),
    /// Check the config, the store and the providers' settings; exit non-zero on a problem.
    Check {
        /// Run SQLite's full `integrity_check` instead of `quick_check`.
        #[arg(long)]
        full: bool,
        /// A JSON summary on stdout instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run the real daemon against a built-in sandbox provider and a temporary store.
    Demo(DemoArgs),
    /// Connect an account: print the authorization URL, wait for the browser's callback on
    /// the loopback redirect_uri, exchange the code and store the account.
    Connect {
        /// The provider's name: a [providers.NAME] table of the config (e.g. tiktok).
        provider: String,
        /// A label for the account (shown by `accounts list`).
        #[arg(long)]
        label: Option<String>,
        /// Scopes to request, comma-separated (default: the provider's `scopes`).
        #[arg(long)]
        scopes: Option<String>,
        /// Re-authorize this existing account: the login must be the same user.
        #[arg(long, value_name = "ID")]
        account: Option<i64>,
        /// How long to wait for the callback.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "5m")]
        timeout: Duration,
    },
    /// Print an authorization URL; the state (and PKCE verifier) go to stderr for you to
    /// keep. Finish with `refreshd exchange`.
    AuthorizeUrl {
        /// The provider's name: a [providers.NAME] table of the config (e.g. tiktok).
        provider: String,
        /// Scopes to request, comma-separated (default: the provider's `scopes`).
        #[arg(long)]
        scopes: Option<String>,
    },
    /// Exchange an authorization code from the provider's callback and store the account.
    Exchange {
        /// The provider's name: a [providers.NAME] table of the config (e.g. tiktok).
        provider: String,
        /// The `code` from the callback URL.
        #[arg(long)]
        code: String,
        /// The PKCE verifier printed by `authorize-url` (when pkce = true).
        #[arg(long)]
        code_verifier: Option<String>,
        /// A label for the account (shown by `accounts list`).
        #[arg(long)]
        label: Option<String>,
        /// Re-authorize this existing account: the login must be the same user.
        #[arg(long, value_name = "ID")]
        account: Option<i64>,
    },
    /// Write a new random encryption key to PATH (mode 0600; never overwrites) and print its
    /// id. Use it as store.encryption_key_file.
    Keygen {
        /// Where to write the key (a new file).
        path: PathBuf,
    },
    /// Re-seal every stored token under store.encryption_key_file (older keys from
    /// store.decryption_key_files open them). Encrypts a clear store in place. Resumable,
    /// and safe while the daemon runs.
    Rekey {
        /// Accounts per transaction.
        #[arg(long, default_value_t = 500)]
        batch: usize,
    },
    /// Move or back up the store itself.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Serve the TikTok-compatible sandbox token endpoint on its own (manual tests, benchmarks).
    Sandbox(SandboxArgs),
    /// Print a shell completion script to stdout, e.g.
    /// `refreshd completions bash > /etc/bash_completion.d/refreshd`.
    Completions {
        /// The shell to complete in.
        shell: clap_complete::Shell,
    },
    /// Print the manual page refreshd(1) (roff) to stdout, e.g.
    /// `refreshd man > /usr/local/share/man/man1/refreshd.1`.
    Man,
}

#[derive(Args)]
struct SandboxArgs {
    /// Address to listen on (loopback).
    #[arg(long, default_value = "127.0.0.1:8787")]
    listen: std::net::SocketAddr,
    /// Access-token lifetime the sandbox issues.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2h")]
    access_ttl: Duration,
    /// Refresh-token lifetime, fixed at each grant.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "180d")]
    refresh_ttl: Duration,
    /// Never rotate refresh tokens (refresh answers omit them).
    #[arg(long)]
    no_rotate: bool,
    /// Revoke the whole grant when a rotated-away refresh token is presented again.
    #[arg(long)]
    revoke_on_reuse: bool,
    /// Benchmarks: take an unknown refresh token `rft.adopt.<open_id>` as a new grant of
    /// <open_id>, so a seeded store needs no grant per account.
    #[arg(long)]
    adopt: bool,
}

#[derive(Subcommand)]
enum StoreCommand {
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

#[derive(Subcommand)]
enum AccountsCommand {
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
    /// Make an account due now (a running daemon picks it up at its next look).
    Refresh {
        /// The account's id (see `accounts list`).
        id: i64,
        /// Also retry an account flagged needs_reauth (clears the flag).
        #[arg(long)]
        force: bool,
    },
    /// Delete an account and its refresh history.
    Remove {
        /// The account's id (see `accounts list`).
        id: i64,
    },
}

#[derive(Args)]
struct DemoArgs {
    /// How many accounts to create.
    #[arg(long, default_value_t = 200)]
    accounts: usize,
    /// Stop after this long (default: run until Ctrl-C).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Access-token lifetime the sandbox issues.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    access_ttl: Duration,
    /// No injected failures (5xx, 429, errors in 200, slow answers).
    #[arg(long)]
    no_faults: bool,
    /// Keep the temporary database in this directory instead of deleting it.
    #[arg(long, value_name = "DIR")]
    keep_dir: Option<PathBuf>,
}

/// An account status on the command line: the library's `Status`, its values listed by
/// `--help` and the completions.
#[derive(Clone, Copy)]
struct StatusArg(Status);

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

/// The command line, parsed; exits with clap's usage error on a bad one.
fn parse_cli() -> Cli {
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    cli.config_given = matches.value_source("config") == Some(ValueSource::CommandLine);
    cli
}

fn main() -> ExitCode {
    let cli = parse_cli();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::ERROR);
        }
    };
    match rt.block_on(dispatch(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let code = if e.downcast_ref::<refreshd::config::ConfigError>().is_some() {
                exit::CONFIG
            } else {
                exit::ERROR
            };
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::from(code)
        }
    }
}

fn load_config(cli: &Cli) -> Result<Config> {
    Ok(Config::load(cli.config.as_deref())?)
}

/// Store options for a `store copy` end: a postgres:// URL, a SQLite path (sqlite://PATH
/// too), or `@FILE` holding either (keeps a password out of the command line). Never echoes
/// a URL: a mistyped one may carry a password.
fn copy_end(
    config: &Config,
    which: &str,
    given: &str,
    scratch: &std::path::Path,
) -> Result<refreshd::store::StoreOptions> {
    let text = match given.strip_prefix('@') {
        Some(file) => std::fs::read_to_string(file)
            .with_context(|| format!("store copy --{which}: cannot read {file}"))?
            .trim()
            .to_string(),
        None => given.to_string(),
    };
    let mut opts = lifecycle::store_options(config);
    // Anything shaped like `scheme:/...` is a URL, whatever its case.
    let scheme = text
        .split_once(":/")
        .map(|(s, _)| s.to_ascii_lowercase())
        .filter(|s| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c))
        });
    match scheme.as_deref() {
        Some("postgres" | "postgresql") => {
            let rest = text.split_once("://").map(|(_, r)| r).ok_or_else(|| {
                anyhow::anyhow!(
                    "store copy --{which}: a PostgreSQL URL starts with postgres:// (two slashes)"
                )
            })?;
            let url = format!("postgres://{rest}");
            refreshd::store::postgres::validate_url(&url).map_err(|m| {
                anyhow::anyhow!(
                    "store copy --{which} {}: {m}",
                    refreshd::store::postgres::describe(&url)
                )
            })?;
            opts.postgres = Some(refreshd::store::PgOptions {
                url: secrecy::SecretString::from(url),
                pool_size: 2,
            });
            // A PostgreSQL end has no recovery file of its own: never replay the daemon's.
            opts.path = scratch.join(format!("{which}.db"));
        }
        Some("sqlite") => {
            opts.path = PathBuf::from(text.split_once("://").map(|(_, p)| p).unwrap_or(""));
            opts.postgres = None;
        }
        Some(other) => bail!(
            "store copy --{which}: unknown store scheme {other:?}: give a SQLite file path, sqlite://PATH or postgres://USER:PASSWORD@HOST/DB"
        ),
        None => {
            opts.path = PathBuf::from(&text);
            opts.postgres = None;
        }
    }
    if opts.postgres.is_none() && opts.path.as_os_str().is_empty() {
        bail!("store copy --{which}: empty; give a SQLite file path or a postgres:// URL");
    }
    Ok(opts)
}

async fn store_copy(config: &Config, from: &str, to: &str, batch: usize, json: bool) -> Result<u8> {
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
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(total as u64),
        indicatif::ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} accounts copied, {eta} left")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
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
        "copied {} account(s) and {} refresh-log row(s) from {} to {} in {:.1}s",
        report.accounts_copied,
        report.log_rows_copied,
        source.describe(),
        dest.describe(),
        started.elapsed().as_secs_f64()
    );
    println!(
        "verified: accounts {} rows sha256 {}; refresh_log {} rows sha256 {}",
        report.accounts, report.accounts_sha256, report.log_rows, report.log_sha256
    );
    Ok(exit::OK)
}

async fn rekey_cmd(config: &Config, batch: usize) -> Result<u8> {
    let Some(primary) = config.store.keyring.primary_id().map(str::to_string) else {
        bail!(
            "rekey seals tokens under store.encryption_key_file, which is not set (write a key with `refreshd keygen PATH`)"
        );
    };
    refreshd::hardening::check_files(config)?;
    let store = open_existing(config).await?;
    let todo = store.count_to_rekey().await?;
    // indicatif draws nothing when stderr is not a terminal (logs, CI).
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(todo),
        indicatif::ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} accounts re-sealed, {eta} left",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
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

/// For commands that only read: no migration, no recovery replay (the daemon's job).
async fn open_read_only(config: &Config) -> Result<Store> {
    ensure_exists(config)?;
    Ok(Store::open_read_only(lifecycle::store_options(config)).await?)
}

fn ensure_exists(config: &Config) -> Result<()> {
    let path = &config.store.path;
    // A PostgreSQL store that was never migrated is named by open_read_only's error.
    if config.store.url.is_none() && !path.exists() {
        bail!(
            "database {} does not exist (check store.path; `refreshd accounts import`, or `refreshd run` with store.create = true, creates it)",
            path.display()
        );
    }
    Ok(())
}

/// For commands that change an existing store: a typo in store.path must not create an
/// empty database and report "no accounts".
async fn open_existing(config: &Config) -> Result<Store> {
    ensure_exists(config)?;
    Ok(Store::open(lifecycle::store_options(config)).await?)
}

async fn dispatch(cli: Cli) -> Result<u8> {
    let reads_config = !matches!(
        cli.command,
        Command::Demo(_)
            | Command::Keygen { .. }
            | Command::Sandbox(_)
            | Command::Completions { .. }
            | Command::Man
    );
    if cli.config_given && !reads_config {
        bail!(
            "this command reads no config file: drop --config (see `refreshd help`; the demo runs its own config)"
        );
    }
    match &cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "refreshd",
                &mut std::io::stdout(),
            );
            Ok(exit::OK)
        }
        Command::Man => {
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            Ok(exit::OK)
        }
        Command::Run { once } => {
            let config = load_config(&cli)?;
            let log = telemetry::init(&config.log);
            let shutdown = CancellationToken::new();
            let reload = lifecycle::install_signals(shutdown.clone())?;
            let mut opts = RunOptions::new(Clock::system());
            opts.log = log;
            opts.config_file = config.file.clone();
            opts.once = *once;
            opts.reload = Some(reload);
            let report = lifecycle::run(config, opts, shutdown).await?;
            if *once && report.newly_flagged() > 0 {
                eprintln!(
                    "{} account(s) newly need re-authorization: see `refreshd accounts list --needs-reauth`",
                    report.newly_flagged()
                );
                return Ok(exit::NEEDS_REAUTH);
            }
            Ok(exit::OK)
        }
        Command::Check { full, json } => check(&cli, *full, *json).await,
        Command::Keygen { path } => {
            let id = refreshd::crypto::generate_key_file(path)?;
            println!("{id}");
            eprintln!(
                "wrote key {id} to {} (mode 0600): set store.encryption_key_file to it, keep a backup where the database's backups are not",
                path.display()
            );
            Ok(exit::OK)
        }
        Command::Store(StoreCommand::Copy {
            from,
            to,
            batch,
            json,
        }) => {
            let config = load_config(&cli)?;
            quiet_logs(&config);
            store_copy(&config, from, to, *batch, *json).await
        }
        Command::Rekey { batch } => {
            let config = load_config(&cli)?;
            quiet_logs(&config);
            rekey_cmd(&config, *batch).await
        }
        Command::Accounts(cmd) => {
            let config = load_config(&cli)?;
            quiet_logs(&config);
            accounts(&config, cmd).await
        }
        Command::Demo(args) => {
            let log_cfg = refreshd::config::LogConfig {
                format: refreshd::config::LogFormat::Auto,
                level: "info".into(),
            };
            telemetry::init(&log_cfg);
            let shutdown = CancellationToken::new();
            // Ctrl-C ends the demo with a summary; SIGHUP is not used here.
            let _ = lifecycle::install_signals(shutdown.clone())?;
            let opts = demo::DemoOptions {
                accounts: args.accounts,
                duration: args.duration,
                access_ttl: args.access_ttl,
                faults: !args.no_faults,
                keep_dir: args.keep_dir.clone(),
            };
            let summary = demo::run(opts, shutdown).await?;
            println!("{}", summary.table());
            Ok(exit::OK)
        }
        Command::Connect {
            provider,
            label,
            scopes,
            account,
            timeout,
        } => {
            let config = load_config(&cli)?;
            quiet_logs(&config);
            connect_cmd(
                &config,
                provider,
                label.clone(),
                scopes.as_deref(),
                *account,
                *timeout,
            )
            .await
        }
        Command::AuthorizeUrl { provider, scopes } => {
            let config = load_config(&cli)?;
            quiet_logs(&config);
            let p = connect::enabled_provider(&config, provider)?;
            let connect::Authorization {
                state, pkce, url, ..
            } = connect::prepare_authorization(provider, p, scopes.as_deref())?;
            println!("{url}");
            eprintln!("state: {state}");
            eprintln!("  check that the callback's `state` is exactly this before using its code");
            if let Some(k) = &pkce {
                eprintln!("code verifier: {}", k.verifier.expose_secret());
                eprintln!("  pass it to `refreshd exchange {provider} --code-verifier ...`");
            }
            Ok(exit::OK)
        }
        Command::Exchange {
            provider,
            code,
            code_verifier,
            label,
            account,
        } => {
            let config = load_config(&cli)?;
            quiet_logs(&config);
            let store = Store::open(lifecycle::store_options(&config)).await?;
            let clock = Clock::system();
            let result = connect::exchange_and_store(
                &config,
                &store,
                connect::Exchange {
                    provider,
                    code: SecretString::from(code.clone()),
                    code_verifier: code_verifier.clone().map(SecretString::from),
                    label: label.clone(),
                    account: *account,
                },
                || clock.now(),
            )
            .await;
            store.close().await;
            let c = result?;
            print_connected(&c, &[]);
            Ok(exit::OK)
        }
        Command::Sandbox(args) => {
            telemetry::init(&refreshd::config::LogConfig::default());
            sandbox(args).await
        }
    }
}

/// Logging for the one-shot commands: the config's [log] format (JSON to a non-terminal
/// stderr under `auto`), at `warn` unless RUST_LOG says otherwise, so stderr carries
/// problems and stdout the command's output.
fn quiet_logs(config: &Config) {
    let mut log = config.log.clone();
    if std::env::var_os("RUST_LOG").is_none() {
        log.level = "warn".into();
    }
    telemetry::init(&log);
}

async fn check(cli: &Cli, full: bool, json: bool) -> Result<u8> {
    let mut lines: Vec<String> = Vec::new();
    let config = match load_config(cli) {
        Ok(c) => c,
        Err(e) => {
            if json {
                print_check(&[format!("config: FAILED\n  {e}")], false, true);
            } else {
                eprintln!("config: FAILED\n  {e}");
            }
            return Ok(exit::CONFIG);
        }
    };
    quiet_logs(&config);
    lines.push(format!(
        "config: ok ({})",
        config
            .file
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "built-in defaults and environment".into())
    ));
    let mut ok = true;
    if config.providers.is_empty() {
        lines.push("providers: none configured (add a [providers.tiktok] table)".into());
        ok = false;
    }
    match refreshd::provider::Providers::from_config(&config) {
        Ok(p) => {
            for (name, pc) in &config.providers {
                let state = if pc.enabled { "enabled" } else { "disabled" };
                let url = p
                    .get(name)
                    .map(|p| p.token_url().to_string())
                    .unwrap_or_default();
                lines.push(format!(
                    "provider {name}: ok, {state}, kind {}, token endpoint {url}",
                    pc.kind(name)
                ));
                if let Some(prof) = p.get(name).map(|p| p.profile()) {
                    for w in refreshd::provider::advice::lifetime_warnings(
                        name,
                        prof,
                        config.reauth.window,
                    ) {
                        lines.push(format!("warning: {w}"));
                    }
                }
            }
        }
        Err(e) => {
            lines.push(format!("providers: FAILED\n  {e}"));
            ok = false;
        }
    }
    for (line, fine) in refreshd::sink::check(&config.sink) {
        lines.push(line);
        ok &= fine;
    }
    if let Some(w) = &config.notify.webhook {
        lines.push(format!(
            "webhook: ok, POST to {} (retries {}, queue {})",
            refreshd::config::redact_url(&w.url),
            w.retries,
            w.queue
        ));
    }
    match config.store.keyring.primary_id() {
        Some(id) => lines.push(format!(
            "encryption: on, sealing with key {id}; keys: {}",
            config.store.keyring.describe()
        )),
        None => lines.push(
            "encryption: off (tokens stored in the clear; see store.encryption_key_file)".into(),
        ),
    }
    for (file, mode) in refreshd::hardening::exposed(&refreshd::hardening::secret_files(&config)) {
        lines.push(format!(
            "files: {} has mode {mode:03o}, readable by other users: chmod 600 it",
            file.display()
        ));
        if config.store.permissions == refreshd::config::FilePolicy::Refuse {
            ok = false;
        }
    }
    let path = &config.store.path;
    if path.exists() || config.store.url.is_some() {
        match Store::open_read_only(lifecycle::store_options(&config)).await {
            Ok(store) => {
                let counts = store.counts().await?;
                let total: i64 = counts.iter().map(|(_, _, n)| n).sum();
                let unknown: Vec<&String> = counts
                    .iter()
                    .map(|(p, _, _)| p)
                    .filter(|p| !config.providers.contains_key(*p))
                    .collect();
                lines.push(format!(
                    "store: ok ({}, {total} accounts)",
                    store.describe()
                ));
                if config.store.url.is_none() {
                    for (line, fine) in refreshd::store::check_report(path, full) {
                        lines.push(line);
                        ok &= fine;
                    }
                }
                let unsealed = store.count_to_rekey().await?;
                if unsealed > 0 {
                    lines.push(format!(
                        "store: {unsealed} account(s) not sealed under the primary key yet: run `refreshd rekey`"
                    ));
                }
                for p in unknown {
                    lines.push(format!(
                        "store: accounts of provider {p:?} exist but it is not configured"
                    ));
                    ok = false;
                }
                store.close().await;
            }
            Err(e) => {
                lines.push(format!("store: FAILED\n  {e}"));
                ok = false;
                if config.store.url.is_none() {
                    for (line, _) in refreshd::store::check_report(path, full) {
                        lines.push(line);
                    }
                }
            }
        }
    } else {
        lines.push(format!(
            "store: {} does not exist yet; `refreshd accounts import` (or `refreshd run` with store.create = true) creates it",
            path.display()
        ));
    }
    print_check(&lines, ok, json);
    Ok(if ok { exit::OK } else { exit::ERROR })
}

/// `check`'s findings: the lines as text, or with `--json` one object
/// `{"ok": bool, "checks": [{"check": "store", "message": "ok (...)"}, ...]}` whose `check`
/// is each line's subject (config, providers, provider NAME, store, encryption, files...).
fn print_check(lines: &[String], ok: bool, json: bool) {
    if !json {
        for l in lines {
            println!("{l}");
        }
        return;
    }
    let checks: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| {
            let (check, message) = l.split_once(": ").unwrap_or(("", l));
            serde_json::json!({"check": check, "message": message})
        })
        .collect();
    println!("{}", serde_json::json!({"ok": ok, "checks": checks}));
}

async fn accounts(config: &Config, cmd: &AccountsCommand) -> Result<u8> {
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
            let Some(a) = store.get(*id).await? else {
                bail!("no account with id {id} (see `refreshd accounts list`)");
            };
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
            }
            Ok(exit::OK)
        }
        AccountsCommand::Import { file, json } => import_cmd(config, file, *json).await,
        AccountsCommand::Refresh { id, force } => {
            let store = open_existing(config).await?;
            let was = store.mark_due(*id, clock.now(), *force).await?;
            store.close().await;
            println!(
                "account {id} ({was}) is due now; a running daemon refreshes it at its next look at the store (within refresh.max_idle)"
            );
            Ok(exit::OK)
        }
        AccountsCommand::Remove { id } => {
            let store = open_existing(config).await?;
            let Some(a) = store.get(*id).await? else {
                bail!("no account with id {id} (see `refreshd accounts list`)");
            };
            store.remove(*id).await?;
            store.close().await;
            println!("removed account {id} ({}/{})", a.provider, a.subject);
            Ok(exit::OK)
        }
    }
}

/// What `accounts import` counted, for its closing line and `--json`.
#[derive(Default, serde::Serialize)]
struct ImportCounts {
    accounts: usize,
    inserted: usize,
    updated: usize,
    flagged: usize,
}

/// `accounts import`: the file is read line by line and streamed into one transaction in
/// batches, so memory stays flat in the file's size; a problem on any line rolls the whole
/// import back (nothing half-applied), and every problem names its line.
async fn import_cmd(config: &Config, file: &str, json: bool) -> Result<u8> {
    use std::io::BufRead;
    const BATCH: usize = 1000;
    let (name, reader, size): (String, Box<dyn BufRead + Send>, Option<u64>) = if file == "-" {
        (
            "stdin".into(),
            Box::new(std::io::BufReader::new(std::io::stdin())),
            None,
        )
    } else {
        let f =
            std::fs::File::open(file).with_context(|| format!("cannot read import file {file}"))?;
        let size = f.metadata().ok().map(|m| m.len());
        (file.to_string(), Box::new(std::io::BufReader::new(f)), size)
    };
    // indicatif draws nothing when stderr is not a terminal (logs, CI).
    let bar = match size {
        Some(len) => {
            let bar = indicatif::ProgressBar::with_draw_target(
                Some(len),
                indicatif::ProgressDrawTarget::stderr(),
            );
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {bytes}/{total_bytes} read, {msg}, {eta} left",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar
        }
        None => {
            indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr())
        }
    };
    let now = Clock::system().now();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Option<Vec<refreshd::store::NewAccount>>>(2);
    let parse = {
        let (timing, window, bar) = (config.refresh.timing(), config.reauth.window, bar.clone());
        let providers: std::collections::HashMap<String, _> = config
            .providers
            .keys()
            .filter_map(|p| config.credential_of(p).map(|c| (p.clone(), c)))
            .collect();
        let name = name.clone();
        tokio::task::spawn_blocking(move || -> Result<Result<usize, import::ImportError>> {
            let mut importer = import::Importer::new(&name, now, timing, window, |p: &str| {
                providers.get(p).copied()
            });
            let (mut reader, mut raw, mut n) = (reader, String::new(), 0usize);
            let mut batch = Vec::with_capacity(BATCH);
            loop {
                raw.clear();
                let read = reader
                    .read_line(&mut raw)
                    .with_context(|| format!("cannot read import file {name} after line {n}"))?;
                if read == 0 {
                    break;
                }
                n += 1;
                bar.inc(read as u64);
                let record = importer.line(n, &raw);
                // After a problem the import is refused: nothing more goes to the store.
                if let Some(r) = record.filter(|_| !importer.failed()) {
                    batch.push(r);
                    if batch.len() == BATCH
                        && tx.blocking_send(Some(std::mem::take(&mut batch))).is_err()
                    {
                        break; // the store refused a batch: its error is the answer
                    }
                }
            }
            let checked = importer.finish();
            if checked.is_ok() {
                // The last batch, then the commit; a dropped sender rolls back.
                let _ = tx.blocking_send(Some(batch));
                let _ = tx.blocking_send(None);
            }
            Ok(checked)
        })
    };
    // The store is opened once the first batch passed the checks: a file refused early
    // does not even create the database.
    let Some(first) = rx.recv().await else {
        bar.finish_and_clear();
        parse
            .await
            .context("the import's reader stopped")??
            .map(|_| ())?;
        bail!("{name}: the import stopped before its end: nothing imported");
    };
    let store = Store::open(lifecycle::store_options(config)).await?;
    let (fwd, batches) = tokio::sync::mpsc::channel(2);
    let _ = fwd.send(first).await;
    tokio::spawn(async move {
        while let Some(item) = rx.recv().await {
            if fwd.send(item).await.is_err() {
                break;
            }
        }
    });
    let counts = std::sync::Arc::new(std::sync::Mutex::new(ImportCounts::default()));
    // Accounts that arrive already flagged are announced after the commit, never before.
    let flagged = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let written = {
        let (counts, flagged, bar) = (counts.clone(), flagged.clone(), bar.clone());
        store
            .upsert_stream(batches, now, move |records, ids| {
                let mut c = counts.lock().unwrap_or_else(|e| e.into_inner());
                for (r, (id, new)) in records.iter().zip(ids) {
                    c.accounts += 1;
                    if *new {
                        c.inserted += 1
                    } else {
                        c.updated += 1
                    }
                    if r.reauth_reason.is_some() {
                        flagged
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push((r.clone(), (*id, *new)));
                    }
                }
                bar.set_message(format!("{} accounts written", c.accounts));
            })
            .await
    };
    store.close().await;
    bar.finish_and_clear();
    let checked = parse.await.context("the import's reader stopped")??;
    // A problem in the file outranks the rollback it caused.
    checked?;
    written?;
    let flagged = std::mem::take(&mut *flagged.lock().unwrap_or_else(|e| e.into_inner()));
    let (records, ids): (Vec<_>, Vec<_>) = flagged.into_iter().unzip();
    let mut counts = std::mem::take(&mut *counts.lock().unwrap_or_else(|e| e.into_inner()));
    counts.flagged = import::announce_flagged(&records, &ids);
    if json {
        let mut v = serde_json::to_value(&counts)?;
        v["source"] = serde_json::Value::from(name);
        println!("{v}");
        return Ok(exit::OK);
    }
    if counts.flagged > 0 {
        eprintln!(
            "{} imported account(s) already need re-authorization: see `refreshd accounts list --needs-reauth`",
            counts.flagged
        );
    }
    println!(
        "imported {} account(s) from {name}: {} new, {} updated",
        counts.accounts, counts.inserted, counts.updated
    );
    Ok(exit::OK)
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

async fn connect_cmd(
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
    let store = Store::open(lifecycle::store_options(config)).await?;
    let clock = Clock::system();
    let result = connect::exchange_and_store(
        config,
        &store,
        connect::Exchange {
            provider,
            code,
            code_verifier: pkce.map(|k| k.verifier),
            label,
            account,
        },
        || clock.now(),
    )
    .await;
    store.close().await;
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

async fn sandbox(args: &SandboxArgs) -> Result<u8> {
    let listen = args.listen;
    if !listen.ip().is_loopback() {
        bail!("the sandbox listens on loopback only; {listen} is not a loopback address");
    }
    let config = refreshd::sandbox::SandboxConfig {
        access_ttl: args.access_ttl,
        refresh_ttl: args.refresh_ttl,
        rotate: !args.no_rotate,
        adopt: args.adopt,
        revoke_on_reuse: args.revoke_on_reuse,
        ..Default::default()
    };
    let sb = refreshd::sandbox::Sandbox::start_on(listen, config, Clock::system())
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    println!("sandbox token endpoint: {}", sb.token_url());
    println!("sandbox authorization page: {}", sb.authorize_url());
    println!(
        "client_key = \"sandbox-client-key\", client_secret = \"sandbox-client-secret\"; Ctrl-C stops it"
    );
    println!("counters: http://{listen}{}", refreshd::sandbox::STATS_PATH);
    // SIGTERM too: a benchmark or a supervisor stops it like the daemon.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    println!("{}", serde_json::to_string_pretty(&sb.stats())?);
    sb.shutdown().await;
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    const REFERENCE: &str = "docs/src/reference/cli.md";

    /// Every command, depth first, with its path.
    fn commands(cmd: &clap::Command, path: String, out: &mut Vec<(String, clap::Command)>) {
        out.push((path.clone(), cmd.clone()));
        for sub in cmd.get_subcommands() {
            commands(sub, format!("{path} {}", sub.get_name()), out);
        }
    }

    #[test]
    fn every_option_and_argument_has_help() {
        let mut root = Cli::command();
        root.build();
        let mut all = Vec::new();
        commands(&root, "refreshd".into(), &mut all);
        let mut missing = Vec::new();
        for (path, cmd) in &all {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if arg.is_hide_set() || id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path}: {id}"));
                }
            }
            if cmd.get_about().is_none() && path != "refreshd" {
                missing.push(format!("{path}: the command itself"));
            }
        }
        assert!(missing.is_empty(), "no help text: {missing:#?}");
    }

    #[test]
    fn commands_that_read_no_config_do_not_offer_it() {
        let mut root = Cli::command();
        root.build();
        for name in ["demo", "keygen", "sandbox", "completions", "man"] {
            let sub = root.find_subcommand_mut(name).unwrap();
            let help = sub.render_long_help().to_string();
            assert!(
                !help.contains("--config"),
                "{name} offers --config:\n{help}"
            );
        }
    }

    #[test]
    fn status_lists_its_values() {
        let err = Cli::try_parse_from(["refreshd", "accounts", "list", "--status", "bogus"])
            .err()
            .expect("refused")
            .to_string();
        for s in Status::ALL {
            assert!(err.contains(s.as_str()), "{s} missing from: {err}");
        }
    }

    /// The committed CLI reference is what the definitions render; REFRESHD_BLESS=1 rewrites it.
    #[test]
    fn cli_reference_is_current() {
        let rendered = cli_reference::render(Cli::command());
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(REFERENCE);
        if std::env::var("REFRESHD_BLESS").is_ok_and(|v| v == "1") {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &rendered).unwrap();
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == rendered,
            "{REFERENCE} is stale: regenerate it with `REFRESHD_BLESS=1 cargo test --bin refreshd cli_reference`"
        );
    }
}
