//! `refreshd run`: the daemon until SIGTERM/SIGINT, or one pass with `--once` (exit code 3
//! when an account newly needs re-authorization).

use super::exit;
use anyhow::Result;
use refreshd::clock::Clock;
use refreshd::config::Config;
use refreshd::lifecycle::{self, RunOptions};
use refreshd::telemetry;
use tokio_util::sync::CancellationToken;

pub async fn run(config: Config, once: bool) -> Result<u8> {
    let log = telemetry::init(&config.log);
    let shutdown = CancellationToken::new();
    let reload = lifecycle::install_signals(shutdown.clone())?;
    let mut opts = RunOptions::new(Clock::system());
    opts.log = log;
    opts.config_file = config.file.clone();
    opts.once = once;
    opts.reload = Some(reload);
    if !once {
        // Start-up's code stays mapped otherwise, some megabytes the daemon never runs again.
        opts.on_ready = Some(Box::new(|_, _, _| {
            super::resident::release_startup_code();
        }));
    }
    let report = lifecycle::run(config, opts, shutdown).await?;
    if once && report.newly_flagged() > 0 {
        eprintln!(
            "{} account(s) newly need re-authorization: see `refreshd accounts list --needs-reauth`",
            report.newly_flagged()
        );
        return Ok(exit::NEEDS_REAUTH);
    }
    Ok(exit::OK)
}
