//! What the admin page shows, gathered in a bounded number of queries whatever the number of
//! accounts: counts by provider and status (one aggregate), the accounts needing a human
//! (one page, `NEEDS_HUMAN_ROWS`), the latest refresh outcomes (`RECENT_ROWS`) and each
//! provider's state in this process. Holds no token: only summaries and log rows.

use crate::circuit::Phase;
use crate::config::Config;
use crate::engine::{Engine, ProviderHealth, Settings};
use crate::model::Status;
use crate::store::{AccountSummary, ListFilter, RecentOutcome, Store, StoreError};

/// Most accounts needing a human listed; the counts say how many there are in all.
pub const NEEDS_HUMAN_ROWS: usize = 100;
/// Most refresh outcomes listed.
pub const RECENT_ROWS: usize = 50;

/// Everything the page shows.
#[derive(Debug)]
pub struct AdminView {
    pub now: i64,
    pub counts: CountTable,
    pub needs_human: Vec<Flagged>,
    pub recent: Vec<RecentOutcome>,
    pub providers: Vec<ProviderRow>,
}

/// Accounts by provider (rows) and status (columns, in `Status::ALL` order).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CountTable {
    pub rows: Vec<(String, [i64; Status::ALL.len()])>,
    pub totals: [i64; Status::ALL.len()],
}

impl CountTable {
    /// Pivots the store's (provider, status, count) rows, ordered by provider.
    pub fn from_counts(counts: &[(String, Status, i64)]) -> CountTable {
        let mut t = CountTable::default();
        for (provider, status, n) in counts {
            let col = Status::ALL
                .iter()
                .position(|s| s == status)
                .expect("listed");
            if t.rows.last().is_none_or(|(p, _)| p != provider) {
                t.rows.push((provider.clone(), [0; Status::ALL.len()]));
            }
            t.rows.last_mut().expect("pushed").1[col] += n;
            t.totals[col] += n;
        }
        t
    }

    pub fn needing_a_human(&self) -> i64 {
        Status::ALL
            .iter()
            .zip(self.totals)
            .filter(|(s, _)| s.needs_human())
            .map(|(_, n)| n)
            .sum()
    }
}

/// One account needing a human and how to reconnect it.
#[derive(Debug)]
pub struct Flagged {
    pub account: AccountSummary,
    /// The web connect link (as in the webhook's `reconnect_url`), when web connect is on.
    pub reconnect_url: Option<String>,
    pub reconnect_command: String,
}

/// One provider's state in this process, and its limits from the config.
#[derive(Debug, PartialEq, Eq)]
pub struct ProviderRow {
    pub name: String,
    /// False: `enabled = false`, or accounts of a provider missing from the config.
    pub configured: bool,
    pub health: ProviderHealth,
    /// Token requests per minute, and the burst above it.
    pub rate_limit: Option<(u32, u32)>,
    /// (free, all) slots: requests that may be sent now, of all.
    pub slots: Option<(usize, usize)>,
}

pub async fn gather(
    store: &Store,
    engine: &Engine,
    settings: &Settings,
    now: i64,
) -> Result<AdminView, StoreError> {
    let config = &settings.config;
    let counts = CountTable::from_counts(&store.counts().await?);
    let filter = ListFilter {
        needs_reauth: true,
        ..ListFilter::default()
    };
    let needs_human = store
        .list(filter, 0, NEEDS_HUMAN_ROWS)
        .await?
        .into_iter()
        .map(|a| flagged(config, a))
        .collect();
    let recent = store.recent_outcomes(RECENT_ROWS).await?;
    let providers = provider_names(config, &counts)
        .into_iter()
        .map(|name| provider_row(settings, engine.provider_health(&name), name))
        .collect();
    Ok(AdminView {
        now,
        counts,
        needs_human,
        recent,
        providers,
    })
}

fn flagged(config: &Config, account: AccountSummary) -> Flagged {
    Flagged {
        reconnect_url: crate::connect::web_reconnect_url(config, &account.provider, account.id),
        reconnect_command: crate::telemetry::reconnect_command(&account.provider, account.id),
        account,
    }
}

/// The configured providers and those that only have accounts, sorted.
fn provider_names(config: &Config, counts: &CountTable) -> Vec<String> {
    let mut names: Vec<String> = config.providers.keys().cloned().collect();
    names.extend(counts.rows.iter().map(|(p, _)| p.clone()));
    names.sort();
    names.dedup();
    names
}

fn provider_row(settings: &Settings, health: ProviderHealth, name: String) -> ProviderRow {
    let conf = settings.config.providers.get(&name).filter(|p| p.enabled);
    let client = settings.providers.get(&name);
    ProviderRow {
        configured: conf.is_some(),
        health,
        rate_limit: conf.map(|p| (p.rate_limit, p.burst)),
        slots: client.map(|c| (c.free_slots(), c.concurrency())),
        name,
    }
}

/// The circuit's state in words (the page shows words, never colour alone).
pub fn circuit_words(phase: Phase) -> &'static str {
    match phase {
        Phase::Closed => "closed",
        Phase::Open { .. } => "open",
        Phase::Probing => "probing",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_pivot_by_provider_and_status_with_totals() {
        let t = CountTable::from_counts(&[
            ("google".into(), Status::Active, 3),
            ("tiktok".into(), Status::Active, 5),
            ("tiktok".into(), Status::NeedsReauth, 2),
            ("tiktok".into(), Status::Expiring, 1),
        ]);
        assert_eq!(
            t.rows,
            [
                ("google".to_string(), [3, 0, 0, 0]),
                ("tiktok".to_string(), [5, 1, 2, 0])
            ]
        );
        assert_eq!(t.totals, [8, 1, 2, 0]);
        assert_eq!(t.needing_a_human(), 3);
        assert_eq!(CountTable::from_counts(&[]), CountTable::default());
    }

    #[test]
    fn providers_with_accounts_but_no_config_are_listed_too() {
        let config = Config::from_toml_str(
            "[providers.tiktok]\nclient_key = \"k\"\nclient_secret = \"s\"\n",
        )
        .unwrap();
        let counts = CountTable::from_counts(&[
            ("gone".into(), Status::Active, 1),
            ("tiktok".into(), Status::Active, 1),
        ]);
        assert_eq!(provider_names(&config, &counts), ["gone", "tiktok"]);
        let settings = Settings::new(config).unwrap();
        let health = ProviderHealth {
            circuit: Phase::Closed,
            rejecting: false,
        };
        let gone = provider_row(&settings, health, "gone".into());
        assert_eq!(
            (gone.configured, gone.rate_limit, gone.slots),
            (false, None, None)
        );
        let tiktok = provider_row(&settings, health, "tiktok".into());
        assert!(tiktok.configured && tiktok.rate_limit.is_some() && tiktok.slots.is_some());
    }
}
