//! Loading: built-in defaults < TOML file < `REFRESHD_*` environment (`__` nests), read with
//! figment, then validated; every failure becomes a `ConfigError` naming key and source.

use super::errors::{ConfigError, from_figment, invalid_values};
use super::{Config, DEFAULT_CONFIG_FILE, ENV_PREFIX};
use figment::Figment;
use figment::providers::{Env, Format, Toml};
use std::path::{Path, PathBuf};

impl Config {
    /// Loads defaults < `file` (or `./refreshd.toml` when `file` is None and it exists) < env.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let path = match file {
            Some(p) => {
                if !p.is_file() {
                    return Err(ConfigError::File {
                        path: p.to_path_buf(),
                        message: "not found or not a file (check --config / REFRESHD_CONFIG)"
                            .into(),
                    });
                }
                Some(p.to_path_buf())
            }
            None => Some(PathBuf::from(DEFAULT_CONFIG_FILE)).filter(|p| p.is_file()),
        };
        let mut figment = Figment::new();
        if let Some(p) = &path {
            figment = figment.merge(Toml::file_exact(p));
        }
        // REFRESHD_CONFIG selects the file; REFRESHD_TEST_* belong to the test suite.
        let env = Env::prefixed(ENV_PREFIX)
            .split("__")
            .ignore(&["config"])
            .filter(|k| !k.as_str().to_ascii_lowercase().starts_with("test_"));
        Self::extract(figment.merge(env), path)
    }

    /// Loads from a TOML string (tests, the demo). No environment.
    pub fn from_toml_str(toml: &str) -> Result<Config, ConfigError> {
        Self::extract(Figment::from(Toml::string(toml)), None)
    }

    /// Reads the merged sources into a `Config` and validates it; `file` is the TOML file
    /// among the sources, if any.
    fn extract(figment: Figment, file: Option<PathBuf>) -> Result<Config, ConfigError> {
        let mut config: Config = figment
            .extract()
            .map_err(|e| from_figment(e, file.as_deref()))?;
        config.file = file;
        config
            .validate()
            .map_err(|problems| invalid_values(problems, &figment, config.file.as_deref()))?;
        Ok(config)
    }
}
