//! `refreshd demo` (the real daemon against the sandbox, on a temporary store) and
//! `refreshd sandbox` (the sandbox provider on its own).

use super::exit;
use anyhow::{Context, Result, bail};
use clap::Args;
use refreshd::clock::Clock;
use refreshd::{demo, lifecycle, telemetry};
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Args)]
pub struct DemoArgs {
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

#[derive(Args)]
pub struct SandboxArgs {
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

pub async fn demo(args: &DemoArgs) -> Result<u8> {
    let log_cfg = refreshd::config::LogConfig {
        format: refreshd::config::LogFormat::Auto,
        level: "info".into(),
        ..Default::default()
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

pub async fn sandbox(args: &SandboxArgs) -> Result<u8> {
    telemetry::init(&refreshd::config::LogConfig::default());
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
    let stop = CancellationToken::new();
    lifecycle::install_stop_signals(stop.clone())?;
    stop.cancelled().await;
    println!("{}", serde_json::to_string_pretty(&sb.stats())?);
    sb.shutdown().await;
    Ok(exit::OK)
}
