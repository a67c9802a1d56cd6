//! A chromedriver of the test's own on a free loopback port, for tests that drive a real
//! headless Chromium (Debian's `chromium` and `chromium-driver`); a NOT RUN where either is
//! missing. Stopped when dropped.

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What installs the browser and its driver on Debian (`.ci/run` does).
pub const INSTALL: &str = "apt-get install chromium chromium-driver";
/// Where Debian's package puts the browser.
pub const CHROMIUM: &str = "/usr/bin/chromium";

pub struct Chromedriver {
    child: Child,
    /// The WebDriver endpoint, `http://127.0.0.1:<port>`.
    pub url: String,
}

impl Chromedriver {
    /// Starts chromedriver and waits until it accepts connections; None (after a NOT RUN
    /// of `test`) when the browser or the driver is not installed.
    pub fn start(test: &str) -> Option<Chromedriver> {
        let installed = crate::tool(test, "chromium", &[CHROMIUM, "--version"], INSTALL)
            && crate::tool(
                test,
                "chromedriver",
                &["chromedriver", "--version"],
                INSTALL,
            );
        if !installed {
            return None;
        }
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let driver = Chromedriver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "chromedriver did not listen on port {port} within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(driver)
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
