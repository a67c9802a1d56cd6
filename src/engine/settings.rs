//! What the engine runs with: the validated config, the providers built from it and the
//! decision rules read from it, replaced as a whole on reload (SIGHUP).

use super::decide::Rules;
use crate::config::Config;
use crate::provider::{ProviderError, Providers};

/// What the engine runs with; replaced as a whole on reload (SIGHUP).
#[derive(Debug)]
pub struct Settings {
    pub config: Config,
    pub providers: Providers,
    /// The decisions' settings, read from `config` once rather than per refresh.
    pub rules: Rules,
}

impl Settings {
    pub fn new(config: Config) -> Result<Settings, ProviderError> {
        let providers = Providers::from_config(&config)?;
        let rules = Rules::from_config(&config);
        Ok(Settings {
            config,
            providers,
            rules,
        })
    }

    /// The settings a reload switches to: as `new`, with each provider keeping its slots
    /// and claims, resized, and its rate limiter while its rate is the same
    /// (`Providers::carry_over`).
    pub fn reloaded(config: Config, old: &Settings) -> Result<Settings, ProviderError> {
        let mut settings = Settings::new(config)?;
        settings.providers = settings.providers.carry_over(&old.providers);
        Ok(settings)
    }
}
