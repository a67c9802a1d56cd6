//! `accounts plan`: what comes due in a window (per provider and minute, the backlog apart),
//! the load against each provider's rate limit, and the soonest refresh-token ends, from
//! the store's `plan_rows`; and its text form (a chart per provider that fits 80 columns).
//! Pure: the time, the rows and the limits are passed in.

use crate::clock::rfc3339;
use crate::store::{PlanQuery, PlanRows, RefreshEnd};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;

/// Most chart columns: one minute each for an hour, a group of minutes for longer windows.
const CHART_COLUMNS: usize = 60;
/// The sparkline's heights, lowest first; a minute with nothing due is `.`.
const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// The plan of the `window_minutes` whole minutes from `start` (the minute of `now`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Plan {
    pub now: i64,
    pub start: i64,
    pub window_minutes: usize,
    pub providers: Vec<ProviderPlan>,
    /// Refreshable accounts whose refresh token ends soonest (a person must log in again
    /// before then, or the provider's sliding lifetime must be renewed).
    pub refresh_ends: Vec<RefreshEnd>,
}

/// One provider's load in the window.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProviderPlan {
    pub provider: String,
    /// Accounts already due before the window's first minute: refreshed as the rate limit
    /// allows.
    pub backlog: i64,
    /// Accounts due in the window (the backlog not counted). Each account is counted once,
    /// at its next refresh: one whose tokens live shorter than the window comes due again.
    pub due: i64,
    /// Due per minute, from `start`.
    pub per_minute: Vec<i64>,
    /// The busiest minute (the first of equals) and its count.
    pub peak: i64,
    pub peak_at: i64,
    /// `providers.NAME.rate_limit` (requests per minute); None when not configured.
    pub rate_limit: Option<u32>,
    /// Minutes whose due count exceeds the rate limit, and the first of them.
    pub minutes_over_limit: usize,
    pub first_over_limit_at: Option<i64>,
}

/// The store query for a window of `window_minutes` minutes from `now`'s minute.
pub fn query(
    now: i64,
    window_minutes: usize,
    provider: Option<String>,
    soonest: usize,
) -> PlanQuery {
    let start = now - now.rem_euclid(60);
    PlanQuery {
        start,
        end: start + window_minutes as i64 * 60,
        provider,
        soonest,
    }
}

/// The plan from the store's rows. `rate_limits` holds the configured providers (each one
/// gets a line, with nothing due or not); providers only in the rows have no limit.
pub fn build(
    now: i64,
    window_minutes: usize,
    rows: PlanRows,
    rate_limits: &BTreeMap<String, u32>,
) -> Plan {
    let start = now - now.rem_euclid(60);
    let first_minute = start / 60;
    let mut by_provider: BTreeMap<String, ProviderPlan> = rate_limits
        .iter()
        .map(|(p, limit)| (p.clone(), empty(p, window_minutes, Some(*limit))))
        .collect();
    for row in rows.due {
        let plan = by_provider
            .entry(row.provider.clone())
            .or_insert_with(|| empty(&row.provider, window_minutes, None));
        match usize::try_from(row.minute - first_minute) {
            Ok(i) if i < window_minutes => plan.per_minute[i] += row.count,
            // The store counts the backlog in the minute before the window.
            Ok(_) => {}
            Err(_) => plan.backlog += row.count,
        }
    }
    let providers = by_provider
        .into_values()
        .map(|mut p| {
            p.due = p.per_minute.iter().sum();
            let (i, peak) = p
                .per_minute
                .iter()
                .enumerate()
                .fold(
                    (0, 0),
                    |best, (i, &n)| if n > best.1 { (i, n) } else { best },
                );
            (p.peak, p.peak_at) = (peak, start + i as i64 * 60);
            if let Some(limit) = p.rate_limit {
                let over: Vec<usize> = (0..window_minutes)
                    .filter(|&i| p.per_minute[i] > i64::from(limit))
                    .collect();
                p.minutes_over_limit = over.len();
                p.first_over_limit_at = over.first().map(|&i| start + i as i64 * 60);
            }
            p
        })
        .collect();
    Plan {
        now,
        start,
        window_minutes,
        providers,
        refresh_ends: rows.refresh_ends,
    }
}

fn empty(provider: &str, window_minutes: usize, rate_limit: Option<u32>) -> ProviderPlan {
    ProviderPlan {
        provider: provider.to_string(),
        backlog: 0,
        due: 0,
        per_minute: vec![0; window_minutes],
        peak: 0,
        peak_at: 0,
        rate_limit,
        minutes_over_limit: 0,
        first_over_limit_at: None,
    }
}

/// `HH:MM` (UTC) of unix time `t`.
fn hhmm(t: i64) -> String {
    rfc3339(t).get(11..16).unwrap_or("?").to_string()
}

/// A span of seconds as the largest whole unit: `45s`, `12m`, `5h`, `3d`.
fn span(secs: i64) -> String {
    match secs.max(0) {
        s if s < 60 => format!("{s}s"),
        s if s < 3_600 => format!("{}m", s / 60),
        s if s < 86_400 => format!("{}h", s / 3_600),
        s => format!("{}d", s / 86_400),
    }
}

impl ProviderPlan {
    /// The chart's columns: each the busiest minute of its group of `per_column` minutes.
    fn columns(&self, per_column: usize) -> Vec<i64> {
        self.per_minute
            .chunks(per_column.max(1))
            .map(|c| c.iter().copied().max().unwrap_or(0))
            .collect()
    }

    /// The load against the rate limit, in words.
    fn verdict(&self) -> String {
        match (self.rate_limit, self.first_over_limit_at) {
            (None, _) => "no rate limit configured (provider not in the config)".into(),
            (Some(limit), None) => format!("within the limit of {limit}/min"),
            (Some(limit), Some(first)) => format!(
                "EXCEEDS the limit of {limit}/min in {} minute(s), first at {}: they run late",
                self.minutes_over_limit,
                hhmm(first)
            ),
        }
    }
}

impl Plan {
    /// The plan as text that fits 80 columns: per provider a summary and a sparkline of the
    /// busiest minute per column (`!` below a column over the rate limit), then the soonest
    /// refresh-token ends.
    pub fn render(&self) -> String {
        let per_column = self.window_minutes.div_ceil(CHART_COLUMNS).max(1);
        let end = self.start + self.window_minutes as i64 * 60;
        let mut out = String::new();
        let _ = writeln!(out, "Due from {} to {}", rfc3339(self.start), rfc3339(end));
        let _ = writeln!(
            out,
            "(one column = {per_column} min, its height the busiest minute; . = none due)"
        );
        if self.providers.is_empty() {
            let _ = writeln!(out, "\n(no provider configured and nothing due)");
        }
        for p in &self.providers {
            let _ = writeln!(
                out,
                "\n{}: {} due, {} overdue (backlog); peak {}/min at {}",
                p.provider,
                p.due,
                p.backlog,
                p.peak,
                if p.peak > 0 {
                    hhmm(p.peak_at)
                } else {
                    "-".into()
                }
            );
            let _ = writeln!(out, "  {}", p.verdict());
            let columns = p.columns(per_column);
            let line: String = columns
                .iter()
                .map(|&n| match n {
                    0 => '.',
                    n => BARS[((n * 8 - 1) / p.peak.max(1)).clamp(0, 7) as usize],
                })
                .collect();
            let _ = writeln!(out, "  |{line}|");
            if let Some(limit) = p.rate_limit.filter(|_| p.minutes_over_limit > 0) {
                let marks: String = columns
                    .iter()
                    .map(|&n| if n > i64::from(limit) { '!' } else { ' ' })
                    .collect();
                let _ = writeln!(out, "   {}", marks.trim_end());
            }
            let _ = writeln!(
                out,
                "  {:<width$}{}",
                hhmm(self.start),
                hhmm(end),
                width = columns.len() + 2 - 5
            );
        }
        let _ = writeln!(out, "\nSoonest refresh-token ends:");
        if self.refresh_ends.is_empty() {
            let _ = writeln!(out, "  (none known)");
        } else {
            let _ = writeln!(
                out,
                "{:>8}  {:<10} {:<20} {:<8} ENDS",
                "ID", "PROVIDER", "SUBJECT", "STATUS"
            );
        }
        for e in &self.refresh_ends {
            let subject: String = e.subject.chars().take(20).collect();
            let _ = writeln!(
                out,
                "{:>8}  {:<10} {:<20} {:<8} {} (in {})",
                e.account_id,
                e.provider.chars().take(10).collect::<String>(),
                subject,
                e.status.as_str(),
                rfc3339(e.refresh_expires_at),
                span(e.refresh_expires_at - self.now)
            );
        }
        out
    }
}

#[cfg(test)]
mod tests;
