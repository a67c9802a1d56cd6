//! What makes a committed rotation durable on PostgreSQL, and the checks that it is: the
//! store's sessions run with `synchronous_commit = on` (a startup option, which outranks the
//! server's, the database's and the role's defaults), a URL whose `options` turn it off is
//! refused, and at open the server's `fsync` and the session's `synchronous_commit` are read
//! back. A rotated refresh token retires the old one at once: a COMMIT that returns before
//! its WAL is flushed can lose the only token left.

use super::errors::pg_err;
use crate::store::error::StoreError;
use tokio_postgres::GenericClient;

const SETTING: &str = "synchronous_commit";

/// What to do about a URL that turns `synchronous_commit` off.
const FIX_OPTIONS: &str = "remove synchronous_commit from the URL's options, or set it to on, local, remote_write or remote_apply";

/// Adds `-c synchronous_commit=on` to the startup options of `config` (the pool's sessions),
/// unless its `options` already name the setting: then `off` is refused and any other value
/// (`local`, `remote_write`, `remote_apply`, `on`) is kept as the user chose.
pub(super) fn require_synchronous_commit(
    config: &mut tokio_postgres::Config,
    describe: &str,
) -> Result<(), StoreError> {
    let options = config.get_options().unwrap_or("");
    match named_setting(options, SETTING) {
        Some(value) if is_off(&value) => Err(StoreError::PgNotDurable {
            url: describe.to_string(),
            found: format!("the URL's options set {SETTING}={value}"),
            fix: FIX_OPTIONS,
        }),
        Some(_) => Ok(()),
        None => {
            super::add_startup_setting(config, &format!("{SETTING}=on"));
            Ok(())
        }
    }
}

/// Reads back, on one of the pool's sessions, that `synchronous_commit` took (a pooler in
/// between may drop startup options), and warns once when the server runs with `fsync = off`,
/// where nothing it commits is durable.
pub(super) async fn check(client: &impl GenericClient, describe: &str) -> Result<(), StoreError> {
    let show = async |setting: &str| -> Result<String, StoreError> {
        let row = client
            .query_one(&format!("SHOW {setting}"), &[])
            .await
            .map_err(pg_err("read the server's durability settings"))?;
        Ok(row.get(0))
    };
    let synchronous_commit = show(SETTING).await?;
    if is_off(&synchronous_commit) {
        return Err(StoreError::PgNotDurable {
            url: describe.to_string(),
            found: format!(
                "the store's sessions run with {SETTING}={synchronous_commit} although refreshd asks for on in their startup options (does a connection pooler drop them?)"
            ),
            fix: "connect to the server directly or make the pooler pass the startup options on, or set synchronous_commit = on for this role and database",
        });
    }
    let fsync = show("fsync").await?;
    if is_off(&fsync) {
        tracing::warn!(event = "postgres_not_durable", setting = "fsync", value = %fsync,
            store = %describe,
            fix = "set fsync = on in postgresql.conf; with fsync off a crash of the host can corrupt the database and lose any commit, rotated refresh tokens included",
            "PostgreSQL {describe} runs with fsync = off: its commits are not durable");
    }
    Ok(())
}

/// Whether a boolean-like setting's value means off, as the server reads it.
fn is_off(value: &str) -> bool {
    ["off", "false", "no", "0"]
        .iter()
        .any(|off| value.eq_ignore_ascii_case(off))
}

/// The value the startup options give setting `name` (the last one, as the server applies
/// them in order), read as the server reads them: words split at unescaped white space
/// (a backslash escapes the next character), `-c name=value`, `-cname=value` or
/// `--name=value`, names case-insensitive with `-` for `_`. A form it misses (grouped
/// flags) is caught by the read-back at open (`check`), which is the guarantee.
fn named_setting(options: &str, name: &str) -> Option<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => word.extend(chars.next()),
            // C's isspace, as the server splits them (vertical tab included).
            c if c.is_ascii_whitespace() || c == '\x0b' => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    let mut found = None;
    let mut words = words.into_iter();
    while let Some(w) = words.next() {
        let assignment = if w == "-c" {
            words.next()
        } else if let Some(rest) = w.strip_prefix("--") {
            Some(rest.to_string())
        } else {
            w.strip_prefix("-c").map(str::to_string)
        };
        let Some((n, value)) = assignment.as_deref().and_then(|a| a.split_once('=')) else {
            continue;
        };
        if n.replace('-', "_").eq_ignore_ascii_case(name) {
            found = Some(value.to_string());
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_setting_is_found_in_each_form_the_server_reads() {
        let sc = |o: &str| named_setting(o, SETTING);
        assert_eq!(sc(""), None);
        assert_eq!(sc("-c search_path=s1"), None);
        assert_eq!(sc("-c synchronous_commit=off").as_deref(), Some("off"));
        assert_eq!(sc("-csynchronous_commit=local").as_deref(), Some("local"));
        assert_eq!(sc("--synchronous-commit=OFF").as_deref(), Some("OFF"));
        assert_eq!(
            sc("-c search_path=s1  -c Synchronous_Commit=remote_apply").as_deref(),
            Some("remote_apply")
        );
        // The server applies them in order: the last one holds.
        assert_eq!(
            sc("-c synchronous_commit=off -c synchronous_commit=on").as_deref(),
            Some("on")
        );
        // An escaped space is part of the word, not a separator.
        assert_eq!(
            sc(r"-c application_name=a\ -c\ synchronous_commit=off"),
            None
        );
    }

    #[test]
    fn off_is_refused_and_other_values_are_kept() {
        let config = |options: &str| {
            let mut c = tokio_postgres::Config::new();
            if !options.is_empty() {
                c.options(options);
            }
            c
        };
        let mut c = config("-c search_path=s1");
        require_synchronous_commit(&mut c, "postgres://u@h:5432/d").unwrap();
        assert_eq!(
            c.get_options(),
            Some("-c search_path=s1 -c synchronous_commit=on")
        );
        let mut c = config("");
        require_synchronous_commit(&mut c, "postgres://u@h:5432/d").unwrap();
        assert_eq!(c.get_options(), Some("-c synchronous_commit=on"));
        let mut c = config("-c synchronous_commit=remote_write");
        require_synchronous_commit(&mut c, "postgres://u@h:5432/d").unwrap();
        assert_eq!(c.get_options(), Some("-c synchronous_commit=remote_write"));
        for off in ["off", "OFF", "false", "no", "0"] {
            let mut c = config(&format!("-c synchronous_commit={off}"));
            let e = require_synchronous_commit(&mut c, "postgres://u@h:5432/d")
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("synchronous_commit={off}")), "{e}");
        }
    }
}
