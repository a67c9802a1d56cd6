//! Hostile clients at the ops port: the real binary, its open-files limit pinned at 1024 (a
//! service's usual soft limit) with no room to raise it, flooded by 2,000 slow clients that
//! send half a request and hold it (half of them dripping a byte at a time). Refreshes must
//! keep committing through the flood, the daemon must keep its descriptor reserve, and the
//! port must serve again once the clients go.

use crate::helpers;
use refreshd::clock::Clock;
use refreshd::config::Config;
use refreshd::sandbox::{Sandbox, SandboxConfig};
use std::process::{Command, Stdio};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

/// The daemon's RLIMIT_NOFILE, soft and hard.
const FD_LIMIT: u64 = 1024;
const SLOW_CLIENTS: usize = 2000;
/// Accounts imported (already due) while the port is flooded.
const ACCOUNTS: usize = 20;

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// One slow client: connects, sends half a request head, then holds it (or drips one more
/// header byte every 500 ms) until released or closed.
async fn slow_client(addr: std::net::SocketAddr, drip: bool, release: CancellationToken) {
    let Ok(Ok(mut s)) =
        tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr)).await
    else {
        return; // the backlog is full too: the kernel holds this one off
    };
    if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: refreshd\r\nX-Slow: ")
        .await
        .is_err()
    {
        return;
    }
    let hold = async {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if drip && s.write_all(b"a").await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = hold => {}
        _ = release.cancelled() => {}
    }
}

async fn healthz(http: &reqwest::Client, addr: std::net::SocketAddr) -> bool {
    http.get(format!("http://{addr}/healthz"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshes_go_on_while_2000_slow_clients_hold_the_ops_port() {
    helpers::init_logs();
    // This process holds the clients' ends of 2,000 connections.
    refreshd::hardening::raise_fd_limit();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("refreshd.db");
    let sandbox = Sandbox::start(SandboxConfig::default(), Clock::system())
        .await
        .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // A header-read timeout longer than the flood: the connection cap alone must hold.
    let toml = helpers::config_toml(
        &db,
        &sandbox.token_url(),
        &format!("\n[server]\nlisten = \"{addr}\"\nheader_read_timeout = \"2m\"\n"),
    );
    let config_path = dir.path().join("refreshd.toml");
    std::fs::write(&config_path, &toml).unwrap();
    let config = Config::from_toml_str(&toml).unwrap();
    let log = std::fs::File::create(dir.path().join("refreshd.log")).unwrap();

    let mut cmd = Command::new(helpers::bin());
    cmd.arg("--config")
        .arg(&config_path)
        .arg("run")
        .env("REFRESHD_LOG__FORMAT", "json")
        // A first start: the daemon creates its store (docs/src/durability.md).
        .env("REFRESHD_STORE__CREATE", "true")
        .env("REFRESHD_LOG__LEVEL", "info")
        .env_remove("NOTIFY_SOCKET")
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    {
        use rustix::process::{Resource, Rlimit, setrlimit};
        use std::os::unix::process::CommandExt;
        // SAFETY: setrlimit is a single async-signal-safe system call.
        unsafe {
            cmd.pre_exec(|| {
                let pinned = Rlimit {
                    current: Some(FD_LIMIT),
                    maximum: Some(FD_LIMIT),
                };
                setrlimit(Resource::Nofile, pinned).map_err(std::io::Error::from)
            });
        }
    }
    let mut child = cmd.spawn().expect("spawn refreshd run");
    let pid = child.id();
    let log_text = || std::fs::read_to_string(dir.path().join("refreshd.log")).unwrap();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    assert!(
        helpers::eventually(20, || healthz(&http, addr)).await,
        "the daemon did not come up: {}",
        log_text()
    );

    // The flood.
    let release = CancellationToken::new();
    let clients: Vec<_> = (0..SLOW_CLIENTS)
        .map(|i| tokio::spawn(slow_client(addr, i % 2 == 1, release.clone())))
        .collect();
    // The daemon takes connections up to its cap (1024 - 256 reserved = 768).
    assert!(
        helpers::eventually(30, || async { open_fds(pid) >= 700 }).await,
        "the flood never reached the daemon: {} files open",
        open_fds(pid)
    );

    // Due accounts arrive while the port is held: every one is refreshed and committed.
    let store = helpers::open_store(&db, Duration::from_secs(5)).await;
    let now = Clock::system().now();
    let lines: String = (0..ACCOUNTS)
        .map(|i| {
            helpers::sandbox_line(
                &sandbox,
                &format!("flooded-{i}"),
                "user.info.basic",
                now - 7_000,
            )
        })
        .collect();
    let ids = helpers::import_text(&store, &config, "flood", &lines, now).await;
    let mut before = Vec::new();
    for &id in &ids {
        before.push((id, store.get(id).await.unwrap().unwrap().generation));
    }
    let mut most_fds = 0;
    let all_rotated = helpers::eventually(30, || {
        most_fds = most_fds.max(open_fds(pid));
        let store = store.clone();
        let before = before.clone();
        async move {
            for (id, generation) in before {
                match store.get(id).await {
                    Ok(Some(a)) if a.generation > generation => {}
                    _ => return false,
                }
            }
            true
        }
    })
    .await;
    assert!(
        all_rotated,
        "refreshes stopped under the flood ({} files open); log:\n{}",
        open_fds(pid),
        log_text()
    );
    assert_eq!(sandbox.stats().refreshed as usize, ACCOUNTS);
    assert!(
        most_fds < (FD_LIMIT - 200) as usize,
        "the descriptor reserve was eaten: {most_fds} of {FD_LIMIT} open"
    );
    assert!(
        log_text().contains("server_connections_capped"),
        "the cap was never reached"
    );

    // The clients go: the port serves again.
    release.cancel();
    for c in clients {
        let _ = c.await;
    }
    assert!(
        helpers::eventually(20, || healthz(&http, addr)).await,
        "the port did not serve again: {}",
        log_text()
    );
    store.close().await;
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}: {}", log_text());
}
