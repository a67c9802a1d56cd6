//! PostgreSQL errors as the store reports them: converted without the server's DETAIL (it
//! can quote a whole row, tokens included), judged transient or not, and URLs shown
//! without their password.

use crate::store::error::StoreError;

pub(crate) fn pg_err(context: &'static str) -> impl Fn(tokio_postgres::Error) -> StoreError {
    move |e| StoreError::Postgres {
        context,
        message: describe_error(&e),
        transient: is_transient(&e),
    }
}

pub(crate) fn pool_err(
    context: &'static str,
) -> impl Fn(deadpool_postgres::PoolError) -> StoreError {
    move |e| StoreError::PgPool {
        context,
        message: match &e {
            deadpool_postgres::PoolError::Backend(b) => describe_error(b),
            other => other.to_string(),
        },
    }
}

/// What went wrong, without the server's DETAIL or WHERE (a constraint violation quotes the
/// failing row there, tokens included).
pub fn describe_error(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut m = format!("{} (SQLSTATE {})", db.message(), db.code().code());
        if let Some(c) = db.constraint() {
            m.push_str(&format!(", constraint {c}"));
        } else if let Some(t) = db.table() {
            m.push_str(&format!(", table {t}"));
        }
        return m;
    }
    // Client-side and I/O errors carry no data: their chain is safe to show.
    let mut m = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        m.push_str(&format!(": {s}"));
        source = s.source();
    }
    m
}

/// `postgres://user@host:port/db`, never the password: for logs and errors.
pub fn describe(url: &str) -> String {
    match url.parse::<tokio_postgres::Config>() {
        Ok(c) => {
            let host = c
                .get_hosts()
                .first()
                .map(|h| match h {
                    tokio_postgres::config::Host::Tcp(h) => h.clone(),
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                })
                .unwrap_or_else(|| "localhost".into());
            let port = c.get_ports().first().copied().unwrap_or(5432);
            format!(
                "postgres://{}@{host}:{port}/{}",
                c.get_user().unwrap_or(""),
                c.get_dbname().unwrap_or("")
            )
        }
        Err(_) => "postgres://(unparsable url)".into(),
    }
}

/// Whether a PostgreSQL error is worth retrying: the connection or server went away, or the
/// transaction lost a race (serialization, deadlock) or was cancelled.
pub fn is_transient(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if e.code().is_none() {
        // No SQLSTATE: transient only when talking to the server failed (I/O, a timeout),
        // not for a client-side mistake (a type mismatch, an unexpected row count).
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            if s.is::<std::io::Error>() {
                return true;
            }
            source = s.source();
        }
        return e.to_string().contains("timed out");
    }
    match e.code() {
        Some(code) => {
            let c = code.code();
            c.starts_with("08") // connection exception
                || c.starts_with("53") // insufficient resources (disk full, too many connections)
                || c.starts_with("57P") // admin shutdown, crash shutdown, cannot connect now
                || c == "40001" // serialization failure
                || c == "40P01" // deadlock
                || c == "55P03" // lock not available
                || c == "57014" // query cancelled (statement_timeout)
        }
        None => false,
    }
}
