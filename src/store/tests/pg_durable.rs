//! PostgreSQL only: the store's sessions commit durably whatever the role's or database's
//! default (`synchronous_commit` is a startup option, which outranks them), a URL that turns
//! it off is refused without showing its password, and a server with `fsync = off` is
//! announced once per open.

use super::*;
use crate::telemetry::capture;
use tracing::Instrument;

/// The password the URLs of these tests carry: never in an error or a log line.
const PASSWORD: &str = "pw-never-shown-5d1c";

/// A connection of the test's own.
async fn raw(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    tokio::spawn(conn);
    client
}

async fn show(client: &tokio_postgres::Client, setting: &str) -> String {
    client
        .query_one(&format!("SHOW {setting}"), &[])
        .await
        .unwrap()
        .get(0)
}

/// `url` with `user` and [`PASSWORD`], on database `db` (without the schema's options) or the
/// same database.
fn as_user(url: &str, user: &str, db: Option<&str>) -> String {
    let mut u = url::Url::parse(url).unwrap();
    u.set_username(user).unwrap();
    u.set_password(Some(PASSWORD)).unwrap();
    if let Some(db) = db {
        u.set_path(&format!("/{db}"));
        u.set_query(None);
    }
    u.to_string()
}

/// A name no other test run uses.
fn unique(prefix: &str) -> String {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{prefix}_{}_{nanos}_{n}", std::process::id())
}

fn pg_options(dir: &TempDir, url: &str) -> StoreOptions {
    StoreOptions {
        path: dir.path().join("refreshd.db"),
        busy_timeout: Duration::from_millis(50),
        keyring: Default::default(),
        postgres: Some(PgOptions {
            url: SecretString::from(url.to_string()),
            pool_size: 4,
        }),
    }
}

/// `synchronous_commit` as each of the store's pooled sessions runs it: the pool's every
/// connection held at once, so each is a separate backend.
async fn sessions_synchronous_commit(store: &Store) -> Vec<String> {
    let pg = store.pg().expect("a PostgreSQL store");
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(pg.client("test: read synchronous_commit").await.unwrap());
    }
    let mut pids = Vec::new();
    let mut values = Vec::new();
    for c in &clients {
        let row = c
            .query_one(
                "SELECT pg_backend_pid(), current_setting('synchronous_commit')",
                &[],
            )
            .await
            .unwrap();
        pids.push(row.get::<_, i32>(0));
        values.push(row.get::<_, String>(1));
    }
    pids.sort();
    pids.dedup();
    assert_eq!(pids.len(), 4, "four sessions, each its own backend");
    values
}

/// The lines `f` logged: run in a span of its own, they are the process log's lines that
/// carry it (the log is global, see `capture::global`).
async fn logged_during<R>(f: impl std::future::Future<Output = R>) -> (R, Vec<String>) {
    let log = capture::global();
    let tag = unique("logs");
    let r = f
        .instrument(tracing::info_span!("pg_durable", logs = %tag))
        .await;
    let mark = format!("logs={tag}");
    let lines = log
        .text()
        .lines()
        .filter(|l| l.contains(&mark))
        .map(str::to_string)
        .collect();
    (r, lines)
}

fn events(lines: &[String], event: &str) -> Vec<String> {
    let field = format!("event=\"{event}\"");
    lines
        .iter()
        .filter(|l| l.contains(&field))
        .cloned()
        .collect()
}

/// A role whose default (the role's own, the role's in this database, or the database's) is
/// `synchronous_commit = off`: a plain session of that role runs with it off, the store's
/// sessions with it on, because a client's startup option outranks all three defaults.
#[tokio::test]
async fn sessions_commit_synchronously_whatever_the_role_or_database_default() {
    let test = "store::tests::pg_durable::sessions_commit_synchronously_whatever_the_role_or_database_default";
    let Some(url) = refreshd_testkit::postgres_schema(test).await else {
        return;
    };
    let admin = raw(&url).await;
    // Roles and databases are made here: a server of the user's own
    // (REFRESHD_TEST_POSTGRES_URL) may not let this URL's role make them.
    let superuser: bool = admin
        .query_one(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    if !superuser {
        refreshd_testkit::not_run(
            test,
            "a PostgreSQL superuser (to make a role and a database)",
            "give REFRESHD_TEST_POSTGRES_URL a superuser, or unset it for the throwaway cluster",
        );
        return;
    }
    let base_db: String = admin
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0);
    for default in ["role", "role in database", "database"] {
        let role = unique("refreshd_sc_role");
        // Superuser: the store migrates its schema; role defaults apply to superusers alike.
        admin
            .batch_execute(&format!(
                "CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{PASSWORD}'"
            ))
            .await
            .unwrap();
        let mut database = None;
        match default {
            "role" => admin
                .batch_execute(&format!("ALTER ROLE {role} SET synchronous_commit = off"))
                .await
                .unwrap(),
            "role in database" => admin
                .batch_execute(&format!(
                    "ALTER ROLE {role} IN DATABASE {base_db} SET synchronous_commit = off"
                ))
                .await
                .unwrap(),
            _ => {
                // A database of its own: other tests share the cluster's.
                let db = unique("refreshd_sc_db");
                // Two statements: CREATE DATABASE refuses a transaction block.
                for sql in [
                    format!("CREATE DATABASE {db}"),
                    format!("ALTER DATABASE {db} SET synchronous_commit = off"),
                ] {
                    admin.batch_execute(&sql).await.unwrap();
                }
                database = Some(db);
            }
        }
        let role_url = as_user(&url, &role, database.as_deref());
        // Without the store's option, the default holds: the case is real.
        let plain = raw(&role_url).await;
        assert_eq!(
            show(&plain, "synchronous_commit").await,
            "off",
            "{default} default"
        );
        drop(plain);
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(pg_options(&dir, &role_url)).await.unwrap();
        assert_eq!(
            sessions_synchronous_commit(&store).await,
            ["on", "on", "on", "on"],
            "the store's sessions, with a {default} default of off"
        );
        store.close().await;
        drop(store);
        if let Some(db) = &database {
            let _ = admin
                .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
                .await;
        }
        let _ = admin
            .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
            .await;
    }
}

/// The URL's own `options` decide when they name the setting: `off` is refused at open,
/// naming the setting and what to do, with the password in neither the error nor the log;
/// any other value is kept.
#[tokio::test]
async fn a_url_that_turns_synchronous_commit_off_is_refused_and_another_value_kept() {
    let test = "store::tests::pg_durable::a_url_that_turns_synchronous_commit_off_is_refused_and_another_value_kept";
    let Some(url) = refreshd_testkit::postgres_schema(test).await else {
        return;
    };
    // Refused before connecting: any password will do.
    let user = url::Url::parse(&url).unwrap().username().to_string();
    let with_password = as_user(&url, &user, None);
    assert!(with_password.contains(PASSWORD), "{with_password}");
    // The schema's search_path stays first: the setting comes after it in the options.
    let off = format!("{with_password}%20-c%20synchronous_commit%3Doff");
    let dir = tempfile::tempdir().unwrap();
    let (opened, _) = logged_during(Store::open(pg_options(&dir, &off))).await;
    let e = opened.unwrap_err();
    assert!(matches!(e, StoreError::PgNotDurable { .. }), "{e:?}");
    let e = e.to_string();
    assert!(!e.contains(PASSWORD), "{e}");
    for said in [
        "synchronous_commit=off",
        "remove synchronous_commit from the URL's options",
        "on, local, remote_write or remote_apply",
        &format!("postgres://{user}@"),
    ] {
        assert!(e.contains(said), "{said:?} in {e}");
    }
    // No line of the whole process's log.
    assert!(!capture::global().text().contains(PASSWORD));

    let local = format!("{url}%20-c%20synchronous_commit%3Dlocal");
    let store = Store::open(pg_options(&dir, &local)).await.unwrap();
    assert_eq!(
        sessions_synchronous_commit(&store).await,
        ["local", "local", "local", "local"],
        "the user's choice is kept"
    );
    store.close().await;
}

/// A server with `fsync = off` (the throwaway cluster runs so, for speed) is announced once
/// per open, naming the store without its password and what to do.
#[tokio::test]
async fn a_server_without_fsync_is_announced_once_per_open() {
    let test = "store::tests::pg_durable::a_server_without_fsync_is_announced_once_per_open";
    let Some(url) = refreshd_testkit::postgres_schema(test).await else {
        return;
    };
    let fsync = show(&raw(&url).await, "fsync").await;
    let dir = tempfile::tempdir().unwrap();
    for round in 0..2 {
        // The open, and the store at work: the warning comes with the open only.
        let (store, logged) = logged_during(async {
            let store = Store::open(pg_options(&dir, &url)).await.unwrap();
            insert(
                &store,
                vec![new_account("tiktok", &format!("u{round}"), NOW)],
            )
            .await;
            store.close().await;
            store
        })
        .await;
        drop(store);
        let warned = events(&logged, "postgres_not_durable");
        if fsync != "off" {
            // A server of REFRESHD_TEST_POSTGRES_URL that runs with fsync on.
            assert!(warned.is_empty(), "{logged:#?}");
            continue;
        }
        assert_eq!(warned.len(), 1, "once per open: {logged:#?}");
        let w = &warned[0];
        let describe = crate::store::postgres::describe(&url);
        for said in [
            " WARN ",
            "setting=\"fsync\"",
            "value=off",
            &format!("store={describe} "),
            "fix=\"set fsync = on in postgresql.conf; with fsync off a crash of the host can corrupt the database",
        ] {
            assert!(w.contains(said), "{said:?} in {w}");
        }
    }
}
