//! `refreshd accounts plan`: what comes due in the next hour or day per provider, against
//! each provider's rate limit, and the soonest refresh-token ends; text or `--json`. The
//! figures are `refreshd::plan`'s; this reads the store and prints.

use super::{exit, open_read_only};
use anyhow::{Result, bail};
use clap::Args;
use refreshd::clock::Clock;
use refreshd::config::Config;
use refreshd::plan;
use std::time::Duration;

/// The longest window: a week of minutes.
const MAX_WINDOW: Duration = Duration::from_secs(7 * 86_400);

#[derive(Args)]
pub struct PlanArgs {
    /// The window, from now: e.g. 1h, 90m, 1d (whole minutes, at most 7d).
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime::parse_duration, conflicts_with = "hours")]
    window: Duration,
    /// The window in hours (the same as --window Nh).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=168))]
    hours: Option<u64>,
    /// Only this provider (a [providers.NAME] of the config, or one with stored accounts).
    #[arg(long, value_name = "NAME")]
    provider: Option<String>,
    /// How many of the soonest refresh-token ends to list.
    #[arg(long, value_name = "N", default_value_t = 10)]
    top: usize,
    /// One JSON document instead of text (per-minute counts included).
    #[arg(long)]
    json: bool,
}

/// `refreshd accounts plan`.
pub async fn plan(config: &Config, args: &PlanArgs) -> Result<u8> {
    let window = args
        .hours
        .map_or(args.window, |h| Duration::from_secs(h * 3_600));
    if window.as_secs() < 60 || window.as_secs() % 60 != 0 || window > MAX_WINDOW {
        bail!(
            "--window {}: give whole minutes from 1m to 7d, e.g. 1h or 1d",
            humantime::format_duration(window)
        );
    }
    let minutes = (window.as_secs() / 60) as usize;
    let limits = config
        .providers
        .iter()
        .filter(|(name, _)| args.provider.as_ref().is_none_or(|p| p == *name))
        .map(|(name, p)| (name.clone(), p.rate_limit))
        .collect();
    let now = Clock::system().now();
    let store = open_read_only(config).await?;
    let rows = store
        .plan_rows(plan::query(now, minutes, args.provider.clone(), args.top))
        .await?;
    store.close().await;
    let plan = plan::build(now, minutes, rows, &limits);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        print!("{}", plan.render());
    }
    Ok(exit::OK)
}
