//! Configuration errors as the user reads them: each names the key, where its value came
//! from (`file:line`, the environment variable, or the built-in default) and what is
//! allowed, without echoing a secret. Renders figment's errors and validation's problems.

use super::ENV_PREFIX;
use figment::Figment;
use std::path::{Path, PathBuf};

/// A configuration error that names the key, where its value came from, and what is allowed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config key `{key}` ({source_desc}): {message}")]
    Invalid {
        key: String,
        source_desc: String,
        message: String,
    },
    #[error("config file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{count} configuration errors:\n  {joined}")]
    Many { count: usize, joined: String },
}

/// Validation's (key, problem) pairs as errors naming where each value came from.
pub(super) fn invalid_values(
    problems: Vec<(String, String)>,
    figment: &Figment,
    file: Option<&Path>,
) -> ConfigError {
    let out = problems
        .into_iter()
        .map(|(key, message)| ConfigError::Invalid {
            source_desc: source_of(figment, &key, file),
            key,
            message,
        })
        .collect();
    one_or_many(out)
}

/// One error as itself; several as one list.
fn one_or_many(mut out: Vec<ConfigError>) -> ConfigError {
    if out.len() == 1 {
        out.pop().expect("one error")
    } else {
        ConfigError::Many {
            count: out.len(),
            joined: out
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n  "),
        }
    }
}

fn env_var_name(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.replace('.', "__").to_uppercase())
}

/// Says where the value of `key` came from: `file:line`, the env var, or the default.
fn source_of(figment: &Figment, key: &str, file: Option<&Path>) -> String {
    // Array entries (`sink[0].path`) are found through their array's key.
    let md = figment
        .find_metadata(key)
        .or_else(|| figment.find_metadata(key.split('[').next().unwrap_or(key)));
    match md {
        Some(md) => describe_metadata(md, key, file),
        None => "built-in default".to_string(),
    }
}

fn describe_metadata(md: &figment::Metadata, key: &str, file: Option<&Path>) -> String {
    match &md.source {
        Some(figment::Source::File(p)) => match find_line(p, key) {
            Some(line) => format!("{}:{line}", p.display()),
            None => p.display().to_string(),
        },
        _ if md.name.to_lowercase().contains("environment") => {
            format!("environment variable {}", env_var_name(key))
        }
        _ => match file {
            Some(p) if md.name.contains("TOML") => p.display().to_string(),
            _ => md.name.to_string(),
        },
    }
}

/// Best-effort line of `key` (dotted) in a TOML file: figment keeps the file, not the line.
fn find_line(path: &Path, key: &str) -> Option<usize> {
    if key.is_empty() {
        return None; // a syntax error: its message carries the line
    }
    let text = std::fs::read_to_string(path).ok()?;
    let (table, leaf) = match key.rsplit_once('.') {
        Some((t, l)) => (t, l),
        None => ("", key),
    };
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.starts_with('[') {
            current = l.trim_matches(|c| c == '[' || c == ']').trim().to_string();
            continue;
        }
        if let Some((k, _)) = l.split_once('=') {
            let k = k.trim().trim_matches('"');
            let full = if current.is_empty() {
                k.to_string()
            } else {
                format!("{current}.{k}")
            };
            if full == key || (current == table && k == leaf) {
                return Some(i + 1);
            }
        }
    }
    // The key is absent (a missing value): point at its table.
    text.lines()
        .position(|l| l.trim().trim_matches(|c| c == '[' || c == ']').trim() == table)
        .map(|i| i + 1)
}

fn is_secret_key(leaf: &str) -> bool {
    leaf == "client_secret" || leaf == "secret" || leaf == "redirect_secret"
}

/// figment's message, without echoing a secret value or the file's text (TOML syntax errors
/// quote the offending line, which may hold a secret).
fn error_message(kind: &figment::error::Kind, secret: bool) -> String {
    use figment::error::{Actual, Kind};
    let kind_of = |a: &Actual| match a {
        Actual::Bool(_) => "a boolean",
        Actual::Unsigned(_) | Actual::Signed(_) => "an integer",
        Actual::Float(_) => "a float",
        Actual::Char(_) | Actual::Str(_) => "a string",
        Actual::Seq => "an array",
        Actual::Map => "a table",
        _ => "a value of another type",
    };
    match kind {
        Kind::InvalidType(a, exp) if secret => {
            format!("invalid type: found {}, expected {exp}", kind_of(a))
        }
        Kind::InvalidValue(a, exp) if secret => {
            format!("invalid value: found {}, expected {exp}", kind_of(a))
        }
        Kind::Message(m) => m
            .lines()
            .filter(|l| {
                let rest = l
                    .trim_start()
                    .trim_start_matches(|c: char| c.is_ascii_digit());
                !l.trim().is_empty() && !rest.trim_start().starts_with('|')
            })
            .collect::<Vec<_>>()
            .join(": "),
        other => other.to_string(),
    }
}

pub(super) fn from_figment(err: figment::Error, file: Option<&Path>) -> ConfigError {
    let mut out = Vec::new();
    for e in err {
        let key = e.path.join(".");
        let source_desc = match &e.metadata {
            Some(md) => describe_metadata(md, &key, file),
            None => "built-in default".into(),
        };
        let message = match &e.kind {
            figment::error::Kind::UnknownField(f, expected) => {
                // figment puts the unknown field at the end of the path already.
                let key_full = if key.is_empty() {
                    f.clone()
                } else if e.path.last() == Some(f) {
                    key.clone()
                } else {
                    format!("{key}.{f}")
                };
                let src = match &e.metadata {
                    Some(md) => describe_metadata(md, &key_full, file),
                    None => source_desc.clone(),
                };
                out.push(ConfigError::Invalid {
                    key: key_full,
                    source_desc: src,
                    message: format!("unknown key; expected one of: {}", expected.join(", ")),
                });
                continue;
            }
            figment::error::Kind::MissingField(f) => {
                let key_full = if key.is_empty() {
                    f.to_string()
                } else if e.path.last().map(String::as_str) == Some(f.as_ref()) {
                    key.clone()
                } else {
                    format!("{key}.{f}")
                };
                out.push(ConfigError::Invalid {
                    key: key_full,
                    source_desc,
                    message: "missing: this key is required".into(),
                });
                continue;
            }
            other => error_message(other, e.path.last().is_some_and(|k| is_secret_key(k))),
        };
        out.push(ConfigError::Invalid {
            key: if key.is_empty() {
                "(top level)".into()
            } else {
                key
            },
            source_desc,
            message,
        });
    }
    one_or_many(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use figment::error::{Actual, Kind};

    #[test]
    fn env_var_names_nest_with_double_underscores() {
        assert_eq!(env_var_name("refresh.lead"), "REFRESHD_REFRESH__LEAD");
        assert_eq!(
            env_var_name("providers.tiktok.client_secret"),
            "REFRESHD_PROVIDERS__TIKTOK__CLIENT_SECRET"
        );
    }

    #[test]
    fn a_secret_of_the_wrong_type_is_described_not_quoted() {
        let kind = Kind::InvalidType(Actual::Signed(7531), "a string".into());
        let shown = error_message(&kind, is_secret_key("client_secret"));
        assert!(
            shown.contains("found an integer") && !shown.contains("7531"),
            "{shown}"
        );
        assert!(error_message(&kind, false).contains("7531"));
    }

    #[test]
    fn a_syntax_error_keeps_its_line_number_but_not_the_quoted_text() {
        let kind = Kind::Message(
            "TOML parse error at line 2, column 17\n  |\n2 | client_secret = \"abc-SECRET\n  |                 ^\ninvalid basic string\n".into(),
        );
        let shown = error_message(&kind, false);
        assert!(shown.contains("line 2, column 17"), "{shown}");
        assert!(shown.contains("invalid basic string"), "{shown}");
        assert!(!shown.contains("SECRET"), "{shown}");
    }
}
