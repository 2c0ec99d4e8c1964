//! What the tests that talk to a real mosquitto share: the broker as a child process,
//! and raw MQTT bytes over a socket.
//!
//! Each test binary that uses it says `mod common;`. Items only some of them use are
//! marked `#[allow(dead_code)]`, with the tests that use them named.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep, timeout};

/// The bound on the broker's start-up, and on [`Mosquitto::wait_for_log`].
const BROKER_WAIT: Duration = Duration::from_secs(10);

/// `target/<profile>/examples/<name>`, from this test binary's
/// `target/<profile>/deps/<test>-<hash>`, checked to be newer than every `.rs` file in
/// `sources` (files or directories, from the workspace root).
///
/// Cargo builds the examples for `cargo test -p examples` (and `--workspace`), not for
/// `cargo test -p examples --test <test>`, which would then run an old build: a binary
/// older than any of its sources fails here instead.
#[allow(dead_code)] // mqtt_gateway.rs, tcp_proxy.rs, http_gateway.rs
pub fn example_bin(name: &str, sources: &[&str]) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let bin = profile_dir.join("examples").join(name);
    let build = format!(
        "build it with `cargo build -p examples --example {name}` \
         (cargo test -p examples builds it first)"
    );
    let built = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| panic!("{} is missing: {build}", bin.display()));
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    for source in sources {
        if let Some(newer) = newer_source(&root.join(source), built) {
            panic!(
                "{} is older than {}: {build}",
                bin.display(),
                newer.display()
            );
        }
    }
    bin
}

/// A `.rs` file at or under `path` modified after `than`, if any.
#[allow(dead_code)] // example_bin
fn newer_source(path: &Path, than: std::time::SystemTime) -> Option<PathBuf> {
    if path.is_dir() {
        return std::fs::read_dir(path)
            .ok()?
            .flatten()
            .find_map(|entry| newer_source(&entry.path(), than));
    }
    let newer = path.extension().is_some_and(|e| e == "rs")
        && std::fs::metadata(path)
            .and_then(|m| m.modified())
            .is_ok_and(|m| m > than);
    newer.then(|| path.to_path_buf())
}

/// The environment variable that turns a test's skip into a failure: set (neither empty
/// nor `0`), a test that cannot run on this machine panics with the reason instead of
/// passing. `.ci/run` sets it where every test can run (two CPUs or more).
pub const REQUIRE_ALL_TESTS: &str = "AEGIS_REQUIRE_ALL_TESTS";

/// Skips `test` because `why` (the caller returns at once): says so on stderr, past
/// libtest's capture, which keeps an `eprintln!` of a passing test out of sight unless
/// `--nocapture` is given (it captures the print macros, not writes to
/// `std::io::stderr()`). Under [`REQUIRE_ALL_TESTS`], panics with `why` instead.
#[allow(dead_code)] // mqtt_gateway.rs, http_gateway.rs
#[track_caller]
pub fn skipped(test: &str, why: &str) {
    use std::io::Write as _;
    let required = std::env::var_os(REQUIRE_ALL_TESTS).is_some_and(|v| !v.is_empty() && v != "0");
    assert!(
        !required,
        "{test} cannot run: {why} (and {REQUIRE_ALL_TESTS} is set)"
    );
    let _ = writeln!(std::io::stderr().lock(), "{test}: skipped: {why}");
}

/// A free loopback port (free when this returns: the listener is closed again).
pub fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// `N` distinct free loopback ports (all are bound until all are known, so no two are
/// the same).
#[allow(dead_code)] // mqtt_gateway.rs
pub fn free_ports<const N: usize>() -> [SocketAddr; N] {
    let held: [std::net::TcpListener; N] =
        std::array::from_fn(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    held.map(|l| l.local_addr().unwrap())
}

// ---------------------------------------------------------------------------------
// The broker
// ---------------------------------------------------------------------------------

/// A mosquitto broker on a loopback port, with its config and its log (its stderr) in
/// its own temporary directory. The process is killed and waited on wherever it ends:
/// on a failed start-up, in [`Mosquitto::stop`], and on drop.
pub struct Mosquitto {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl Mosquitto {
    /// Starts a broker on a free port, logging what mosquitto logs by default.
    #[allow(dead_code)] // stack, breaker, mqtt_gateway
    pub async fn start() -> Self {
        Self::start_fresh(false).await
    }

    /// Starts a broker on a free port that logs everything (`log_type all`: each
    /// connection and each packet it receives), for tests that read [`Mosquitto::log`].
    #[allow(dead_code)] // mqtt_e2e, mqtt_gateway
    pub async fn start_logging_everything() -> Self {
        Self::start_fresh(true).await
    }

    /// Starts a broker on a free port. The port is free when picked, not held: two tests
    /// starting brokers at once can be given the same one, and the broker that loses
    /// exits at start-up. Each try gets a port and a directory of its own.
    async fn start_fresh(everything: bool) -> Self {
        let mut failure = String::new();
        for _ in 0..5 {
            let mut broker = Self::configure(free_port().port(), everything);
            match broker.try_restart().await {
                Ok(()) => return broker,
                Err(why) => failure = why,
            }
        }
        panic!("{failure}");
    }

    fn configure(port: u16, everything: bool) -> Self {
        static TRIES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = TRIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("aegis-mosquitto-{}-{n}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // `log_dest stderr` is unbuffered, and stderr is a file opened by us, so it stays
        // writable after mosquitto drops root privileges.
        let log_types = if everything {
            "log_type all\nconnection_messages true\n"
        } else {
            ""
        };
        std::fs::write(
            dir.join("mosquitto.conf"),
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 log_dest stderr\n{log_types}"
            ),
        )
        .unwrap();
        Self {
            child: None,
            port,
            dir,
        }
    }

    /// The broker's address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Starts the broker process on its port (again, after [`Mosquitto::stop`]) with a
    /// fresh log, and waits until it listens.
    #[allow(dead_code)] // breaker, http_gateway
    pub async fn restart(&mut self) {
        if let Err(failure) = self.try_restart().await {
            panic!("{failure}");
        }
    }

    /// [`restart`](Self::restart), with a failure to start returned (the broker's log
    /// included) rather than a panic.
    async fn try_restart(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "mosquitto is already running");
        let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto", "mosquitto"]
            .into_iter()
            .find(|p| !p.starts_with('/') || Path::new(p).exists())
            .unwrap();
        let log = File::create(self.dir.join("broker.log")).unwrap();
        let spawned = Command::new(bin)
            .arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => panic!(
                "cannot start mosquitto ({e}): install it (apt-get install -y mosquitto) \
                 or run .ci/run"
            ),
        };
        // Ready once it logs "running", which it does after opening its listener:
        // probing the port would add a connection to the log that tests count.
        let deadline = Instant::now() + BROKER_WAIT;
        let failure = loop {
            match child.try_wait() {
                Ok(None) => {}
                Ok(Some(status)) => break format!("mosquitto exited at start-up ({status})"),
                Err(e) => break format!("cannot wait on mosquitto: {e}"),
            }
            if self.log().contains(" running") {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() >= deadline {
                break format!("mosquitto did not start listening on {}", self.addr());
            }
            sleep(Duration::from_millis(25)).await;
        };
        let _ = child.kill();
        let _ = child.wait();
        Err(format!("{failure}; its log:\n{}", self.log()))
    }

    /// Kills the broker and waits for it: its port refuses connects from here on.
    #[allow(dead_code)] // breaker
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends the broker `signal` (`"STOP"` stalls it: the kernel still completes TCP
    /// handshakes on its port, but nothing answers; `"CONT"` resumes it).
    #[allow(dead_code)] // breaker
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("mosquitto is running").id();
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .expect("kill(1) runs");
        assert!(status.success(), "kill -{signal} {pid}");
    }

    /// Everything the broker logged since it last started.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("broker.log")).unwrap_or_default()
    }

    /// Waits (bounded) until the broker logs a line containing `needle`.
    #[allow(dead_code)] // mqtt_e2e, mqtt_gateway
    pub async fn wait_for_log(&self, needle: &str) {
        let found = timeout(BROKER_WAIT, async {
            while !self.log().contains(needle) {
                sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(
            found.is_ok(),
            "the broker never logged {needle:?}; its log:\n{}",
            self.log()
        );
    }

    /// How many times the broker logged `needle`.
    #[allow(dead_code)] // mqtt_e2e
    pub fn count(&self, needle: &str) -> usize {
        self.log().matches(needle).count()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- mosquitto log ---\n{}", self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------
// Raw MQTT
// ---------------------------------------------------------------------------------

/// A packet: first byte, Remaining Length (variable-length encoded), body.
pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut p = vec![first];
    let mut len = body.len();
    loop {
        let mut b = u8::try_from(len % 128).unwrap();
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        p.push(b);
        if len == 0 {
            break;
        }
    }
    p.extend_from_slice(body);
    p
}

/// A length-prefixed UTF-8 string.
pub fn string(s: &str) -> Vec<u8> {
    let mut v = u16::try_from(s.len()).unwrap().to_be_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

/// A clean-session CONNECT of protocol `level` (4: 3.1.1, 5: 5.0, no properties) with
/// `client_id` and `keep_alive` seconds. Its connect flags are at index 9.
pub fn connect(level: u8, client_id: &str, keep_alive: u16) -> Vec<u8> {
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', level, 0x02];
    body.extend_from_slice(&keep_alive.to_be_bytes());
    if level == 5 {
        body.push(0x00); // no properties
    }
    body.extend_from_slice(&string(client_id));
    packet(0x10, &body)
}

/// Reads one MQTT packet: (first byte, body).
pub async fn read_packet(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let first = s.read_u8().await?;
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let b = s.read_u8().await?;
        len |= usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    let mut body = vec![0; len];
    s.read_exact(&mut body).await?;
    Ok((first, body))
}

/// An MQTT 5 CONNECT of `client_id` with the Authentication Method "SCRAM-X" (enhanced
/// authentication: the broker may answer with AUTH before its CONNACK).
#[allow(dead_code)] // breaker, mqtt_gateway
pub fn connect_scram(client_id: &str) -> Vec<u8> {
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 60];
    let props = [&[0x15][..], &string("SCRAM-X")].concat();
    body.extend_from_slice(&packet(0, &props)[1..]); // its length, then it
    body.extend_from_slice(&string(client_id));
    packet(0x10, &body)
}

/// Whether the peer closed the connection (EOF or reset) within `within`, without
/// sending anything.
#[allow(dead_code)] // stack, mqtt_gateway
pub async fn closed_silently(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(timeout(within, s.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
}
