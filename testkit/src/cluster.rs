//! A throwaway PostgreSQL cluster for one test binary: `initdb` in a temp dir with the
//! installed server's binaries (as the `postgres` user when run as root), started on a free
//! loopback port, stopped and removed when the binary exits. `REFRESHD_TEST_POSTGRES_URL`
//! overrides it with a server of your own.
//!
//! Tests get a cluster with `fsync = off`: they check behaviour, not what survives a power
//! cut, and fsyncs would only slow them down. The benchmark measures durable commits, so
//! [`durable_postgres`] keeps PostgreSQL's defaults (`fsync`, `synchronous_commit` on).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

/// The environment variable naming a PostgreSQL server to use instead of a throwaway one.
pub const URL_VAR: &str = "REFRESHD_TEST_POSTGRES_URL";
const INSTALL: &str = "apt-get install postgresql";
/// The superuser `initdb` creates; trust authentication on loopback, so the password in the
/// URL is accepted and never checked (tests look for it in error messages).
const USER: &str = "refreshd";

/// The running clusters' data directories and `pg_ctl`, for the removal at exit.
static RUNNING: Mutex<Vec<(PathBuf, PathBuf)>> = Mutex::new(Vec::new());

/// Whether the cluster's commits reach the disk.
#[derive(Clone, Copy)]
enum Fsync {
    Off,
    On,
}

/// The base URL of a PostgreSQL server for `test`: `REFRESHD_TEST_POSTGRES_URL`, else the
/// binary's throwaway cluster (started by the first caller). None after a NOT RUN when no
/// server is installed. Panics when an installed server fails to start.
pub fn postgres(test: &str) -> Option<String> {
    static CLUSTER: OnceLock<Result<String, String>> = OnceLock::new();
    cluster(test, &CLUSTER, Fsync::Off)
}

/// As [`postgres`], but a cluster whose commits are fsynced (PostgreSQL's defaults), for
/// measurements of what a durable deployment does. `REFRESHD_TEST_POSTGRES_URL` overrides
/// it too, whatever that server's settings (the bench records them).
pub fn durable_postgres(test: &str) -> Option<String> {
    static CLUSTER: OnceLock<Result<String, String>> = OnceLock::new();
    cluster(test, &CLUSTER, Fsync::On)
}

fn cluster(test: &str, once: &OnceLock<Result<String, String>>, fsync: Fsync) -> Option<String> {
    if let Ok(url) = std::env::var(URL_VAR) {
        return Some(url);
    }
    match once.get_or_init(|| start(fsync)) {
        Ok(url) => Some(url.clone()),
        Err(missing) => {
            crate::not_run(test, missing, INSTALL);
            None
        }
    }
}

/// A fresh schema named after `test` on [`postgres`]'s server, and a URL whose connections
/// use it: each test its own tables.
pub async fn postgres_schema(test: &str) -> Option<String> {
    let base = postgres(test)?;
    let (client, conn) = tokio_postgres::connect(&base, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("the test PostgreSQL server does not connect: {e}"));
    tokio::spawn(conn);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    // An identifier from the test's name: PostgreSQL keeps 63 bytes of it.
    let slug: String = test
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    let slug = &slug[slug.len().saturating_sub(36)..];
    let schema = format!("t_{}_{nanos}_{slug}", std::process::id());
    client
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
        ))
        .await
        .unwrap_or_else(|e| panic!("cannot create schema {schema}: {e}"));
    let sep = if base.contains('?') { '&' } else { '?' };
    Some(format!("{base}{sep}options=-c%20search_path%3D{schema}"))
}

/// The newest installed server's binary directory (Debian's layout), else the one holding
/// `initdb` on PATH.
fn bin_dir() -> Option<PathBuf> {
    let newest = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .max_by_key(|(v, _)| *v)
        .map(|(_, bin)| bin);
    newest.or_else(|| {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .find(|d| d.join("initdb").is_file() && d.join("pg_ctl").is_file())
        })
    })
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// `program args`, as the `postgres` user when we are root (the server refuses root).
fn as_server_user(program: &Path, args: &[&str]) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program).args(args);
        c
    } else {
        let mut c = Command::new(program);
        c.args(args);
        c
    }
}

fn run(mut cmd: Command) -> Result<Output, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A port nobody listens on right now (the server binds it a moment later).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free loopback port: {e}"))
}

/// Starts the cluster: Ok(base URL), or Err(what is missing) when no server is installed.
fn start(fsync: Fsync) -> Result<String, String> {
    let Some(bin) = bin_dir() else {
        return Err("PostgreSQL (initdb and pg_ctl)".into());
    };
    if is_root() && !Path::new("/usr/sbin/runuser").exists() && !Path::new("/sbin/runuser").exists()
    {
        return Err("runuser (to run PostgreSQL as the postgres user)".into());
    }
    let made = run(as_server_user(
        Path::new("mktemp"),
        &["-d", "-t", "refreshd-test-pg.XXXXXX"],
    ))
    .unwrap_or_else(|e| panic!("cannot make the test cluster's directory: {e}"));
    let dir = PathBuf::from(String::from_utf8_lossy(&made.stdout).trim());
    let data = dir.join("data");
    let data_s = data.to_string_lossy().into_owned();
    let dir_s = dir.to_string_lossy().into_owned();
    let pg_ctl = bin.join("pg_ctl");
    RUNNING
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((dir.clone(), pg_ctl.clone()));
    crate::exit::on_exit(remove);
    let fail = |what: String| -> ! {
        let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
        panic!("the throwaway PostgreSQL cluster in {dir_s}: {what}\n{log}")
    };
    if let Err(e) = run(as_server_user(
        &bin.join("initdb"),
        &[
            "-D",
            &data_s,
            "-U",
            USER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        ],
    )) {
        fail(e)
    }
    let ssl = self_signed_certificate(&data);
    // The port may be taken between the probe and the bind: a few tries.
    for attempt in 1..=3 {
        let port = free_port();
        let opts = format!(
            "-p {port} -k {dir_s} -c listen_addresses=127.0.0.1 -c max_connections=200{}{}",
            match fsync {
                Fsync::Off => " -c fsync=off",
                Fsync::On => "",
            },
            if ssl { " -c ssl=on" } else { "" }
        );
        let log = format!("{dir_s}/log");
        let started = run(as_server_user(
            &pg_ctl,
            &[
                "-D", &data_s, "-l", &log, "-o", &opts, "-w", "-t", "60", "start",
            ],
        ));
        match started {
            Ok(_) => {
                return Ok(format!(
                    "postgres://{USER}:{USER}@127.0.0.1:{port}/postgres"
                ));
            }
            Err(e) if attempt == 3 => fail(e),
            Err(_) => {}
        }
    }
    unreachable!()
}

/// A self-signed certificate for `localhost` in the data directory, so TLS tests have a
/// server that speaks TLS; false (TLS off) without the openssl command.
fn self_signed_certificate(data: &Path) -> bool {
    let crt = data.join("server.crt").to_string_lossy().into_owned();
    let key = data.join("server.key").to_string_lossy().into_owned();
    let args = [
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=localhost",
        "-keyout",
        &key,
        "-out",
        &crt,
    ];
    run(as_server_user(Path::new("openssl"), &args)).is_ok()
}

/// Stops the clusters and removes their directories (at exit; never panics).
pub(crate) fn remove() {
    let running = std::mem::take(&mut *RUNNING.lock().unwrap_or_else(|e| e.into_inner()));
    for (dir, pg_ctl) in running {
        let data = dir.join("data").to_string_lossy().into_owned();
        let _ = as_server_user(&pg_ctl, &["-D", &data, "-m", "immediate", "-w", "stop"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
