//! The command line: the top-level clap types, the exit codes, dispatch to the command
//! groups (one file each), and what the commands share: loading the config, quiet logs for
//! one-shot commands, opening an existing store.

mod accounts;
mod apps;
mod check;
mod connect;
mod demo;
mod docs;
mod export;
mod import;
mod plan;
#[cfg(test)]
mod reference;
mod resident;
mod run;
mod store;
#[cfg(test)]
mod tests;

use anyhow::{Result, bail};
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use refreshd::config::Config;
use refreshd::lifecycle;
use refreshd::store::Store;
use refreshd::telemetry;
use std::path::PathBuf;
use std::time::Duration;

/// Exit codes (documented in docs/src/reference/cli.md).
pub mod exit {
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
pub struct Cli {
    /// Config file (default: ./refreshd.toml when present). Read by run, check, accounts,
    /// connect, authorize-url, exchange, rekey and store; give it before the command.
    #[arg(
        long,
        short = 'c',
        env = "REFRESHD_CONFIG",
        hide_env_values = true,
        value_name = "PATH"
    )]
    pub config: Option<PathBuf>,
    /// Whether --config came from the command line (not the environment): commands that
    /// read no config refuse it rather than ignore it.
    #[arg(skip)]
    pub config_given: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the daemon: refresh tokens as they come due until SIGTERM/SIGINT.
    Run {
        /// Refresh what is due now, run the reauth sweep, and exit. Exit code 3 when an
        /// account newly needs re-authorization.
        #[arg(long)]
        once: bool,
    },
    /// Inspect and manage stored accounts.
    #[command(subcommand)]
    Accounts(accounts::AccountsCommand),
    /// Add, list and remove app tokens (client-credentials grant).
    #[command(subcommand)]
    Apps(apps::AppsCommand),
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
    Demo(demo::DemoArgs),
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
    Store(store::StoreCommand),
    /// Serve the TikTok-compatible sandbox token endpoint on its own (manual tests, benchmarks).
    Sandbox(demo::SandboxArgs),
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

/// The command line, parsed; exits with clap's usage error on a bad one.
pub fn parse() -> Cli {
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    cli.config_given = matches.value_source("config") == Some(ValueSource::CommandLine);
    cli
}

pub(crate) fn load_config(cli: &Cli) -> Result<Config> {
    Ok(Config::load(cli.config.as_deref())?)
}

/// Logging for the one-shot commands: the config's [log] format (JSON to a non-terminal
/// stderr under `auto`), at `warn` unless RUST_LOG says otherwise, so stderr carries
/// problems and stdout the command's output.
pub(crate) fn quiet_logs(config: &Config) {
    let mut log = config.log.clone();
    if std::env::var_os("RUST_LOG").is_none() {
        log.level = "warn".into();
    }
    telemetry::init(&log);
}

/// For commands that only read: no migration, no recovery replay (the daemon's job).
pub(crate) async fn open_read_only(config: &Config) -> Result<Store> {
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
pub(crate) async fn open_existing(config: &Config) -> Result<Store> {
    ensure_exists(config)?;
    Ok(Store::open(lifecycle::store_options(config)).await?)
}

/// A progress bar of `len` steps on stderr, drawn in `template`; indicatif draws nothing
/// when stderr is not a terminal (logs, CI).
fn progress(len: u64, template: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(len),
        indicatif::ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template(template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// The config of a one-shot command, with its quiet logging set up.
fn one_shot_config(cli: &Cli) -> Result<Config> {
    let config = load_config(cli)?;
    quiet_logs(&config);
    Ok(config)
}

/// Runs the parsed command; its exit code, or the error `main` maps to one.
pub async fn dispatch(cli: Cli) -> Result<u8> {
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
        Command::Completions { shell } => docs::completions(*shell),
        Command::Man => docs::man(),
        Command::Run { once } => run::run(load_config(&cli)?, *once).await,
        Command::Check { full, json } => check::check(&cli, *full, *json).await,
        Command::Keygen { path } => store::keygen(path),
        Command::Store(cmd) => store::store(&one_shot_config(&cli)?, cmd).await,
        Command::Rekey { batch } => store::rekey(&one_shot_config(&cli)?, *batch).await,
        Command::Accounts(cmd) => accounts::accounts(&one_shot_config(&cli)?, cmd).await,
        Command::Apps(cmd) => apps::apps(&one_shot_config(&cli)?, cmd).await,
        Command::Demo(args) => demo::demo(args).await,
        Command::Connect {
            provider,
            label,
            scopes,
            account,
            timeout,
        } => {
            let config = one_shot_config(&cli)?;
            connect::connect(
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
            connect::authorize_url(&one_shot_config(&cli)?, provider, scopes.as_deref())
        }
        Command::Exchange {
            provider,
            code,
            code_verifier,
            label,
            account,
        } => {
            let config = one_shot_config(&cli)?;
            connect::exchange(
                &config,
                provider,
                code,
                code_verifier.as_deref(),
                label.clone(),
                *account,
            )
            .await
        }
        Command::Sandbox(args) => demo::sandbox(args).await,
    }
}
