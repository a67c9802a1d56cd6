//! What the engine runs with: the validated config and the providers built from it,
//! replaced as a whole on reload (SIGHUP).

use crate::config::Config;
use crate::provider::{ProviderError, Providers};

/// What the engine runs with; replaced as a whole on reload (SIGHUP).
#[derive(Debug)]
pub struct Settings {
    pub config: Config,
    pub providers: Providers,
}

impl Settings {
    pub fn new(config: Config) -> Result<Settings, ProviderError> {
        let providers = Providers::from_config(&config)?;
        Ok(Settings { config, providers })
    }
}
