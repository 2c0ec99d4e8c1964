//! `mqtt-load`: an MQTT 3.1.1 load generator for `benches/compare.sh`.
//!
//! ```text
//! mqtt-load churn              --target ADDR [--duration S] [--concurrency C]
//! mqtt-load hold N             --target ADDR [--duration S] [--rss-pid PID] [--keep-alive S]
//! mqtt-load publish            --target ADDR [--qos 0|1] [--payload BYTES] [--duration S]
//! mqtt-load slowloris N        --target ADDR [--deadline-ms D] [--interval-ms I] [--duration S]
//! mqtt-load flood              --target ADDR [--attackers A] [--attackers-from IP] [--concurrency C] [--legit-clients K] [--duration S]
//! mqtt-load stall              --target ADDR --stop-pid PID [--stop-after-ms T] [--stop-for-ms T]
//! common: [--label NAME] [--cpu-pid PID] (CPU time of that process over the run:
//!         `cpu_ns` from /proc/PID/task/*/schedstat, and `cpu_ticks` from /proc/PID/stat)
//! ```
//!
//! Every run prints one JSON object on one line on stdout. Source addresses are spread
//! over 127.0.1.1 ..= 127.0.1.250 (each socket is bound before `connect`), so a per-IP
//! limiter sees many clients; the A attackers of `flood` come from A consecutive
//! addresses from `--attackers-from` (127.0.3.1 by default; a target may ban them, so
//! `compare.sh` gives each repetition its own: 127.0.3.1, 127.0.4.1, ...; the range must
//! stay in 127.0.0.0/8 and clear of 127.0.0.0 ..= 127.0.2.255, the targets' and the other
//! clients'),
//! the legitimate client of `slowloris` and `stall` connects from 127.0.2.1, and the K
//! legitimate clients of `flood` (8 by default) from 127.0.2.1 ..= 127.0.2.K. Only
//! loopback targets are accepted.
//!
//! `slowloris N` keeps N attacking connections for the whole `--duration` (at most
//! 9,000): each of N slots reconnects at once, from the same address, when the target
//! cuts its connection. Each connection's time is taken from before its connect, so the
//! lateness of a cut over `--deadline-ms` is an upper bound.
//!
//! Latency percentiles (`p50_us`, `p99_us`, `legit_*p99_us`) count every session
//! attempted, a failed one (refused, reset or timed out) as [`SESSION_LIMIT`], the time a
//! session is given: a target that drops its slowest sessions does not show a better p99
//! for it.
//!
//! Failures of this process's own (no socket, source port or address: `EMFILE`,
//! `EADDRINUSE`, `EADDRNOTAVAIL`, ...) are counted in every mode's `local_errors`, never
//! as the target's refusals or failures, nor in the percentiles. A `churn` cycle is `ok`
//! once the target has closed after its DISCONNECT; one whose DISCONNECT failed counts in
//! `disconnect_failed`, and so does a legitimate session of `flood` and `slowloris`
//! (`legit_disconnect_failed`: in `legit_total`, not in `legit_ok`). A `churn` or `flood`
//! worker pauses 1 ms after a local failure rather than retry at once. `hold` reports the target's anonymous memory
//! (`RssAnon` + `RssShmem`: `anon_*`) beside its `VmRSS` (`rss_*`, `bytes_per_conn`).
//!
//! `publish` gives up on a connection whose PUBACK or PINGRESP has not come (or whose
//! write has not gone out) by the end of the run plus [`GRACE`], and counts it in
//! `errors`: a target that drops a QoS 1 PUBLISH unanswered ends the run instead of
//! hanging it. `stall` fails (exit status 1) when its SIGSTOP or SIGCONT cannot be sent
//! (`kill`, from procps, must be on the PATH), rather than report a stall that never
//! happened.
//!
//! `IP_BIND_ADDRESS_NO_PORT` is not set. Neither tokio nor socket2 (0.5, 0.6) exposes it;
//! the `nix` crate does, safely (`nix::sys::socket::sockopt::IpBindAddressNoPort`, since
//! nix 0.28, Linux only), but nix is not a dependency of this workspace, and the option is
//! not needed: binding picks the port per source address, which gives 250 x ~28,000 ports.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Mutex;
use tokio::task::JoinSet;
use tokio::time::Instant;

const TOPIC: &str = "bench/t";
const LEGIT: Ipv4Addr = Ipv4Addr::new(127, 0, 2, 1);
/// The first attacker address of `flood` by default.
const ATTACKERS_FROM: Ipv4Addr = Ipv4Addr::new(127, 0, 3, 1);

/// How long after the end of a `publish` run its connections may still wait for an
/// acknowledgement (or for a write to go out) before they are counted as errors.
const GRACE: Duration = Duration::from_secs(3);

#[derive(Debug, Clone)]
struct Args {
    mode: String,
    n: usize,
    target: SocketAddr,
    label: String,
    duration: Duration,
    concurrency: usize,
    qos: u8,
    payload: usize,
    deadline: Duration,
    interval: Duration,
    attackers: u8,
    /// The first of `flood`'s attacker addresses (`--attackers-from`).
    attackers_from: Ipv4Addr,
    /// `flood`'s legitimate clients, each from its own address.
    legit_clients: usize,
    cpu_pid: Option<u32>,
    rss_pid: Option<u32>,
    stop_pid: Option<u32>,
    stop_after: Duration,
    stop_for: Duration,
    /// The keep-alive of `hold`'s sessions, in seconds (they send no PINGREQ).
    keep_alive: u16,
}

fn usage() -> ! {
    eprintln!(
        "usage: mqtt-load churn|hold N|publish|slowloris N|flood|stall --target ADDR [options]; see the source header"
    );
    std::process::exit(2)
}

impl Args {
    /// `mode`'s defaults, against `target`.
    fn new(mode: &str, target: SocketAddr) -> Self {
        Self {
            mode: mode.into(),
            n: 1000,
            target,
            label: String::new(),
            duration: Duration::from_secs(5),
            concurrency: 32,
            qos: 0,
            payload: 64,
            deadline: Duration::from_secs(3),
            interval: Duration::from_millis(500),
            attackers: 20,
            attackers_from: ATTACKERS_FROM,
            legit_clients: 8,
            cpu_pid: None,
            rss_pid: None,
            stop_pid: None,
            stop_after: Duration::from_secs(1),
            stop_for: Duration::from_secs(4),
            keep_alive: 0,
        }
    }
}

fn parse_args() -> Args {
    let mut it = std::env::args().skip(1);
    let mode = it.next().unwrap_or_else(|| usage());
    let mut args = Args::new(&mode, "127.0.0.1:1883".parse().expect("literal"));
    let rest: Vec<String> = it.collect();
    let mut i = 0;
    while i < rest.len() {
        let key = rest[i].as_str();
        if !key.starts_with("--") {
            args.n = key.parse().unwrap_or_else(|_| usage());
            i += 1;
            continue;
        }
        let val = rest.get(i + 1).cloned().unwrap_or_else(|| usage());
        let num = || val.parse::<u64>().unwrap_or_else(|_| usage());
        match key {
            "--target" => args.target = val.parse().unwrap_or_else(|_| usage()),
            "--label" => args.label.clone_from(&val),
            "--duration" => {
                args.duration = Duration::from_secs_f64(val.parse().unwrap_or_else(|_| usage()));
            }
            "--concurrency" => args.concurrency = usize::try_from(num()).unwrap_or(1).max(1),
            "--qos" => args.qos = u8::try_from(num()).unwrap_or(0).min(1),
            "--payload" => args.payload = usize::try_from(num()).unwrap_or(64),
            "--deadline-ms" => args.deadline = Duration::from_millis(num()),
            "--interval-ms" => args.interval = Duration::from_millis(num()),
            "--attackers" => args.attackers = u8::try_from(num()).unwrap_or(250).clamp(1, 250),
            "--attackers-from" => args.attackers_from = val.parse().unwrap_or_else(|_| usage()),
            "--legit-clients" => {
                args.legit_clients = usize::try_from(num()).unwrap_or(1).clamp(1, 250);
            }
            "--cpu-pid" => args.cpu_pid = u32::try_from(num()).ok(),
            "--rss-pid" => args.rss_pid = u32::try_from(num()).ok(),
            "--stop-pid" => args.stop_pid = u32::try_from(num()).ok(),
            "--stop-after-ms" => args.stop_after = Duration::from_millis(num()),
            "--stop-for-ms" => args.stop_for = Duration::from_millis(num()),
            "--keep-alive" => args.keep_alive = u16::try_from(num()).unwrap_or(u16::MAX),
            _ => usage(),
        }
        i += 2;
    }
    if !args.target.ip().is_loopback() {
        eprintln!("mqtt-load: only loopback targets may be load-tested");
        std::process::exit(2);
    }
    if let Err(why) = attacker_range(args.attackers_from, args.attackers) {
        eprintln!("mqtt-load: --attackers-from {}: {why}", args.attackers_from);
        std::process::exit(2);
    }
    args
}

fn main() {
    let args = parse_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let cpu_before = args.cpu_pid.and_then(cpu_ticks);
    let ns_before = args.cpu_pid.and_then(cpu_ns);
    let started = Instant::now();
    let mut fields = rt.block_on(async {
        match args.mode.as_str() {
            "churn" => churn(&args).await,
            "hold" => hold(&args).await,
            "publish" => publish(&args).await,
            "slowloris" => slowloris(&args).await,
            "flood" => flood(&args).await,
            "stall" => stall(&args).await.unwrap_or_else(|e| {
                eprintln!("mqtt-load: stall: {e}");
                std::process::exit(1)
            }),
            _ => usage(),
        }
    });
    let wall = since(started);
    if let (Some(pid), Some(before)) = (args.cpu_pid, cpu_before) {
        if let Some(after) = cpu_ticks(pid) {
            let user = after.user.saturating_sub(before.user);
            let system = after.system.saturating_sub(before.system);
            fields.push(("cpu_ticks", (user + system).to_string()));
            fields.push(("cpu_user_ticks", user.to_string()));
            fields.push(("clk_tck", clk_tck().to_string()));
        }
        if let (Some(before), Some(after)) = (ns_before, cpu_ns(pid)) {
            fields.push(("cpu_ns", after.saturating_sub(before).to_string()));
        }
    }
    fields.push(("wall_s", format!("{:.3}", wall.as_secs_f64())));
    let mut out = format!(
        "{{\"mode\":\"{}\",\"label\":{},\"target\":\"{}\"",
        args.mode,
        serde_json::Value::from(args.label.as_str()),
        args.target
    );
    for (k, v) in fields {
        out.push_str(&format!(",\"{k}\":{v}"));
    }
    out.push('}');
    println!("{out}");
    // Idle sessions and stragglers end with the process.
    rt.shutdown_background();
}

type Fields = Vec<(&'static str, String)>;

// ---------------------------------------------------------------------------------------
// MQTT 3.1.1 encoding and reading.

fn remaining_length(buf: &mut Vec<u8>, mut len: usize) {
    loop {
        let mut byte = u8::try_from(len % 128).expect("< 128");
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        buf.push(byte);
        if len == 0 {
            break;
        }
    }
}

fn mqtt_str(buf: &mut Vec<u8>, s: &[u8]) {
    buf.extend_from_slice(&u16::try_from(s.len()).expect("short").to_be_bytes());
    buf.extend_from_slice(s);
}

fn connect_packet(client_id: &str, keep_alive: u16) -> Vec<u8> {
    let mut body = Vec::with_capacity(32);
    mqtt_str(&mut body, b"MQTT");
    body.push(4); // 3.1.1
    body.push(0x02); // clean session
    body.extend_from_slice(&keep_alive.to_be_bytes()); // 0: off
    mqtt_str(&mut body, client_id.as_bytes());
    let mut p = vec![0x10];
    remaining_length(&mut p, body.len());
    p.extend_from_slice(&body);
    p
}

fn publish_packet(buf: &mut Vec<u8>, qos: u8, id: u16, payload: &[u8]) {
    let id_len = if qos > 0 { 2 } else { 0 };
    buf.push(0x30 | (qos << 1));
    remaining_length(buf, 2 + TOPIC.len() + id_len + payload.len());
    mqtt_str(buf, TOPIC.as_bytes());
    if qos > 0 {
        buf.extend_from_slice(&id.to_be_bytes());
    }
    buf.extend_from_slice(payload);
}

const DISCONNECT: [u8; 2] = [0xE0, 0x00];
const PINGREQ: [u8; 2] = [0xC0, 0x00];

/// Reads one packet; returns its first byte and its body.
async fn read_packet(s: &mut TcpStream) -> io::Result<(u8, Vec<u8>)> {
    let first = s.read_u8().await?;
    let mut len = 0usize;
    let mut shift = 0;
    loop {
        let b = s.read_u8().await?;
        len |= usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 21 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "bad length"));
        }
    }
    let mut body = vec![0; len];
    s.read_exact(&mut body).await?;
    Ok((first, body))
}

fn spread(i: u64) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 1, u8::try_from(i % 250).expect("< 250") + 1)
}

/// The `i`-th of `n` attacker addresses of `flood`, from `from` on (checked by
/// [`attacker_range`]): apart from every other scenario's clients, so that a target that
/// bans attackers (the gateway's security layer does) does not refuse later scenarios'
/// clients.
fn attacker(from: Ipv4Addr, n: u8, i: u64) -> Ipv4Addr {
    let offset = u32::try_from(i % u64::from(n.max(1))).expect("< 256");
    Ipv4Addr::from(u32::from(from).wrapping_add(offset))
}

/// Whether `n` attacker addresses from `from` on stay on loopback (127.0.0.0/8) and
/// clear of 127.0.0.0 ..= 127.0.2.255: the targets (127.0.0.1), the spread clients
/// (127.0.1.0/24) and the legitimate ones (127.0.2.0/24).
fn attacker_range(from: Ipv4Addr, n: u8) -> Result<(), &'static str> {
    let first = u32::from(from);
    let last = first.saturating_add(u32::from(n.max(1)) - 1);
    let loopback = |a: u32| Ipv4Addr::from(a).octets()[0] == 127;
    if !loopback(first) || !loopback(last) {
        return Err("the attackers' addresses must stay in 127.0.0.0/8");
    }
    if first <= u32::from(Ipv4Addr::new(127, 0, 2, 255)) {
        return Err("127.0.0.0 ..= 127.0.2.255 are the targets' and the other clients'");
    }
    Ok(())
}

/// Why a connection failed: on this side or on the target's.
#[derive(Debug)]
enum ConnectError {
    /// This process's own failure, before the target had a say: no socket (`EMFILE`,
    /// `ENFILE`, `ENOBUFS`, `ENOMEM`), no source address or port (`EADDRINUSE`,
    /// `EADDRNOTAVAIL`), at `socket`, `bind` or `connect` (see [`is_local`]).
    Local,
    /// The target's doing (or the network's): refused, reset, unreachable.
    Target,
}

// Linux's errno values of the local failures io::ErrorKind has no stable kind for.
const ENFILE: i32 = 23;
const EMFILE: i32 = 24;
const ENOBUFS: i32 = 105;

/// Whether a `connect` error is this side's: out of source ports or addresses, of file
/// descriptors, or of kernel memory, rather than the target's answer.
fn is_local(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::AddrInUse | io::ErrorKind::AddrNotAvailable | io::ErrorKind::OutOfMemory
    ) || matches!(e.raw_os_error(), Some(EMFILE | ENFILE | ENOBUFS))
}

/// A TCP connection from `src` (bound before the connect) to `target`. Failures to
/// create, bind or set up the socket are always [`ConnectError::Local`]; `connect`'s
/// errors as [`is_local`] says.
async fn connect_from(src: Ipv4Addr, target: SocketAddr) -> Result<TcpStream, ConnectError> {
    let local = |_| ConnectError::Local;
    let socket = TcpSocket::new_v4().map_err(local)?;
    socket.bind(SocketAddr::new(src.into(), 0)).map_err(local)?;
    let stream = socket.connect(target).await.map_err(|e| {
        if is_local(&e) {
            ConnectError::Local
        } else {
            ConnectError::Target
        }
    })?;
    stream.set_nodelay(true).map_err(local)?;
    Ok(stream)
}

/// How one MQTT session attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// CONNACK 0.
    Accepted,
    /// A CONNACK with a non-zero code, or the connection closed or reset.
    Refused,
    /// No answer in time.
    TimedOut,
    /// This process failed before the target was involved ([`ConnectError::Local`]):
    /// counted in `local_errors`, never as the target's refusal or success.
    LocalError,
}

/// TCP connect + CONNECT (keep-alive off) until the CONNACK. Returns the stream when
/// accepted.
async fn session(
    src: Ipv4Addr,
    target: SocketAddr,
    id: &str,
    limit: Duration,
) -> (Outcome, Option<TcpStream>) {
    session_with(src, target, id, limit, 0).await
}

/// [`session`] with a keep-alive of `keep_alive` seconds in the CONNECT.
async fn session_with(
    src: Ipv4Addr,
    target: SocketAddr,
    id: &str,
    limit: Duration,
    keep_alive: u16,
) -> (Outcome, Option<TcpStream>) {
    let attempt = async {
        let mut s = match connect_from(src, target).await {
            Ok(s) => s,
            Err(ConnectError::Local) => return Err(Outcome::LocalError),
            Err(ConnectError::Target) => return Err(Outcome::Refused),
        };
        let answered = async {
            s.write_all(&connect_packet(id, keep_alive)).await?;
            read_packet(&mut s).await
        };
        match answered.await {
            Ok((0x20, body)) if body.len() == 2 && body[1] == 0 => Ok(s),
            // A refusing CONNACK, another packet, or the connection closed or reset.
            _ => Err(Outcome::Refused),
        }
    };
    match tokio::time::timeout(limit, attempt).await {
        Ok(Ok(s)) => (Outcome::Accepted, Some(s)),
        Ok(Err(o)) => (o, None),
        Err(_) => (Outcome::TimedOut, None),
    }
}

/// How long [`disconnect`] waits for the broker to close.
const DISCONNECT_LIMIT: Duration = Duration::from_secs(1);

/// DISCONNECT, then wait (at most [`DISCONNECT_LIMIT`]) for the broker to close first:
/// the server side keeps the TIME_WAIT, not our source ports. Whether the session ended
/// as MQTT says: the DISCONNECT was written and the broker then closed the connection
/// (EOF) in time; not when the write failed, the connection was reset, or it was still
/// open at the limit.
async fn disconnect(mut s: TcpStream) -> bool {
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(DISCONNECT_LIMIT, async {
        s.write_all(&DISCONNECT).await?;
        while s.read(&mut buf).await? > 0 {}
        Ok::<_, io::Error>(())
    })
    .await;
    matches!(closed, Ok(Ok(())))
}

/// Time since `t`; never panics.
fn since(t: Instant) -> Duration {
    Instant::now().saturating_duration_since(t)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// Milliseconds from `start` to `t`: when a session started, into its run.
fn millis_after(start: Instant, t: Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(start).as_millis()).unwrap_or(u64::MAX)
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds")
}

fn pct(h: &Histogram<u64>, q: f64) -> u64 {
    if h.is_empty() {
        0
    } else {
        h.value_at_quantile(q)
    }
}

fn f3(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.3}")
    } else {
        "null".into()
    }
}

// ---------------------------------------------------------------------------------------
// /proc readers.

fn clk_tck() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100)
}

/// CPU time of a process (all its threads), in clock ticks.
#[derive(Clone, Copy)]
struct CpuTicks {
    /// utime: in user space.
    user: u64,
    /// stime: in the kernel on its behalf (its syscalls; on loopback, also the peer's
    /// side of the TCP receive path that its sends run).
    system: u64,
}

fn cpu_ticks(pid: u32) -> Option<CpuTicks> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `after` starts at field 3.
    Some(CpuTicks {
        user: f.get(11)?.parse().ok()?,
        system: f.get(12)?.parse().ok()?,
    })
}

/// On-CPU time of a process, in nanoseconds: the first field of
/// `/proc/PID/task/TID/schedstat`, summed over its threads (as `churn_pairs.sh` reads
/// it). Exact where `/proc/PID/stat` counts 10 ms clock ticks; a thread that ends
/// during the run takes its time with it (the targets' threads live as long as they do).
fn cpu_ns(pid: u32) -> Option<u64> {
    let mut sum = None;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        if let Some(ns) = stat
            .split_whitespace()
            .next()
            .and_then(|f| f.parse::<u64>().ok())
        {
            sum = Some(sum.unwrap_or(0) + ns);
        }
    }
    sum
}

/// A process's resident memory, in bytes, from `/proc/PID/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Memory {
    /// `VmRSS`: every resident page, file-backed ones (code, mapped files) too.
    rss: u64,
    /// `RssAnon` + `RssShmem`: the process's own memory (heap, stacks, shared
    /// anonymous), without the code and files it has paged in. `None` where the kernel
    /// does not give them (before Linux 4.5).
    anon: Option<u64>,
}

/// The `KEY:` line of a `/proc/PID/status` text, in bytes (the file gives kB).
fn status_bytes(status: &str, key: &str) -> Option<u64> {
    let line = status
        .lines()
        .find(|l| l.strip_prefix(key).is_some_and(|r| r.starts_with(':')))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn parse_memory(status: &str) -> Option<Memory> {
    Some(Memory {
        rss: status_bytes(status, "VmRSS")?,
        anon: status_bytes(status, "RssAnon")
            .and_then(|anon| Some(anon + status_bytes(status, "RssShmem")?)),
    })
}

fn memory(pid: u32) -> Option<Memory> {
    parse_memory(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// `hold`'s memory fields from the target's memory before and while it holds `count`
/// sessions. The per-connection figure (`anon_bytes_per_conn`) is the growth of
/// anonymous memory: the first sessions a fresh proxy sees also page in the code that
/// serves them (file-backed, once per process), which `VmRSS` counts and would divide
/// by the sessions as if theirs. `VmRSS` stays under its old keys (`rss_before`,
/// `rss_during`, `bytes_per_conn`), comparable with files from before.
fn memory_fields(before: Memory, during: Memory, count: usize) -> Fields {
    #[allow(clippy::cast_precision_loss)]
    let per = |b: u64, d: u64| f3(d.saturating_sub(b) as f64 / count.max(1) as f64);
    let mut fields = vec![
        ("rss_before", before.rss.to_string()),
        ("rss_during", during.rss.to_string()),
        ("bytes_per_conn", per(before.rss, during.rss)),
    ];
    if let (Some(b), Some(d)) = (before.anon, during.anon) {
        fields.push(("anon_before", b.to_string()));
        fields.push(("anon_during", d.to_string()));
        fields.push(("anon_bytes_per_conn", per(b, d)));
    }
    fields
}

// ---------------------------------------------------------------------------------------
// Modes.

/// The time a churn or legitimate session is given to get its CONNACK; a failed session
/// counts as this long in the latency percentiles.
const SESSION_LIMIT: Duration = Duration::from_secs(3);

/// How many of a churn run's slowest sessions are reported with their start: enough to
/// see whether they gather at some moment (a periodic stall) or spread over the run.
const CHURN_SLOWEST: usize = 40;

/// CONNECT, CONNACK, DISCONNECT cycles from `concurrency` workers. A cycle is `ok` once
/// the broker has closed after its DISCONNECT ([`disconnect`]); one accepted whose
/// disconnect failed counts in `disconnect_failed` (its CONNACK latency in the
/// percentiles), not in `ok`, `ops` or `per_s`. Sources spread over 127.0.1.0/24
/// ([`spread`]).
async fn churn(a: &Args) -> Fields {
    churn_from(a, spread).await
}

/// [`churn`] with the `i`-th cycle's source address from `source`.
async fn churn_from(a: &Args, source: fn(u64) -> Ipv4Addr) -> Fields {
    let start = Instant::now();
    let end = start + a.duration;
    let next = Arc::new(AtomicU64::new(0));
    let mut set = JoinSet::new();
    for _ in 0..a.concurrency {
        let (next, target) = (next.clone(), a.target);
        set.spawn(async move {
            let (mut h, mut ok, mut failed, mut local) = (new_hist(), 0u64, 0u64, 0u64);
            let mut disconnect_failed = 0u64;
            let mut all = Vec::new();
            while Instant::now() < end {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let t0 = Instant::now();
                match session(source(i), target, &format!("c{i}"), SESSION_LIMIT).await {
                    (Outcome::Accepted, Some(s)) => {
                        let us = micros(since(t0));
                        let _ = h.record(us);
                        all.push((millis_after(start, t0), us));
                        // Bounded however long the run: only the slowest can be kept.
                        if all.len() == 2 * CHURN_SLOWEST {
                            all = slowest(std::mem::take(&mut all), CHURN_SLOWEST);
                        }
                        if disconnect(s).await {
                            ok += 1;
                        } else {
                            disconnect_failed += 1;
                        }
                    }
                    // Not the target's: neither in `failed` nor in the percentiles.
                    (Outcome::LocalError, _) => {
                        local += 1;
                        local_pause().await;
                    }
                    _ => {
                        let _ = h.record(micros(SESSION_LIMIT));
                        failed += 1;
                    }
                }
            }
            (h, ok, failed, local, disconnect_failed, all)
        });
    }
    let (mut h, mut ok, mut failed, mut local) = (new_hist(), 0, 0, 0);
    let mut disconnect_failed = 0;
    let mut all = Vec::new();
    while let Some(Ok((wh, wok, wf, wl, wd, wall))) = set.join_next().await {
        let _ = h.add(&wh);
        ok += wok;
        disconnect_failed += wd;
        failed += wf;
        local += wl;
        all.extend(wall);
    }
    let slow = pairs_json(&slowest(all, CHURN_SLOWEST));
    let secs = a.duration.as_secs_f64();
    #[allow(clippy::cast_precision_loss)]
    let rate = ok as f64 / secs;
    vec![
        ("concurrency", a.concurrency.to_string()),
        ("ok", ok.to_string()),
        ("failed", failed.to_string()),
        ("disconnect_failed", disconnect_failed.to_string()),
        ("local_errors", local.to_string()),
        ("ops", ok.to_string()),
        ("per_s", f3(rate)),
        ("p50_us", pct(&h, 0.5).to_string()),
        ("p99_us", pct(&h, 0.99).to_string()),
        ("slowest", slow),
    ]
}

/// N idle sessions; memory of `--rss-pid` before and while they are held
/// ([`memory_fields`]).
async fn hold(a: &Args) -> Fields {
    let before = a.rss_pid.and_then(memory);
    let next = Arc::new(AtomicU64::new(0));
    let held = Arc::new(Mutex::new(Vec::with_capacity(a.n)));
    let n = a.n as u64;
    let failed = Arc::new(AtomicU64::new(0));
    let local = Arc::new(AtomicU64::new(0));
    let mut set = JoinSet::new();
    for _ in 0..a.concurrency.max(64) {
        let (next, held, failed, target) = (next.clone(), held.clone(), failed.clone(), a.target);
        let local = local.clone();
        let keep_alive = a.keep_alive;
        set.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let id = format!("h{i}");
                match session_with(spread(i), target, &id, Duration::from_secs(5), keep_alive).await
                {
                    (Outcome::Accepted, Some(s)) => held.lock().await.push(s),
                    (Outcome::LocalError, _) => {
                        local.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }
    while set.join_next().await.is_some() {}
    let count = held.lock().await.len();
    eprintln!("mqtt-load: holding {count} sessions");
    // Let the proxy settle, then read its RSS; then hold for the rest of the duration
    // (or until SIGINT / SIGTERM) so that it can also be read from outside.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let during = a.rss_pid.and_then(memory);
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal");
    tokio::select! {
        () = tokio::time::sleep(a.duration.saturating_sub(Duration::from_secs(1))) => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    let mut fields = vec![
        ("requested", a.n.to_string()),
        ("held", count.to_string()),
        ("failed", failed.load(Ordering::Relaxed).to_string()),
        ("local_errors", local.load(Ordering::Relaxed).to_string()),
        ("keep_alive", a.keep_alive.to_string()),
    ];
    if let (Some(b), Some(d)) = (before, during) {
        fields.extend(memory_fields(b, d, count));
    }
    fields
}

/// Publishes as fast as the target takes them: QoS 0 in batches closed by a PINGREQ
/// (its PINGRESP proves the broker read the batch), QoS 1 in windows of PUBACKs. A
/// connection whose batch has not gone out, or not been acknowledged, by the end of the
/// run plus [`GRACE`] ends with an error.
async fn publish(a: &Args) -> Fields {
    let end = Instant::now() + a.duration;
    let give_up = end + GRACE;
    let mut set = JoinSet::new();
    for w in 0..a.concurrency.min(64) {
        let (qos, size, target) = (a.qos, a.payload, a.target);
        set.spawn(async move {
            let (o, s) = session(
                spread(w as u64),
                target,
                &format!("p{w}"),
                Duration::from_secs(5),
            )
            .await;
            let Some(mut s) = s else {
                // (sent, errors, local errors)
                return if o == Outcome::LocalError {
                    (0u64, 0u64, 1u64)
                } else {
                    (0, 1, 0)
                };
            };
            let payload = vec![b'x'; size];
            let batch: u16 = if qos == 0 {
                u16::try_from((256 * 1024 / (size + 16)).clamp(1, 1000)).expect("<= 1000")
            } else {
                64
            };
            let mut buf = Vec::new();
            let mut sent = 0u64;
            let mut id: u16 = 0;
            while Instant::now() < end {
                buf.clear();
                for _ in 0..batch {
                    id = id.wrapping_add(1).max(1);
                    publish_packet(&mut buf, qos, id, &payload);
                }
                if qos == 0 {
                    buf.extend_from_slice(&PINGREQ);
                }
                if !matches!(
                    tokio::time::timeout_at(give_up, s.write_all(&buf)).await,
                    Ok(Ok(()))
                ) {
                    return (sent, 1, 0);
                }
                let want = if qos == 0 { 1 } else { batch };
                let mut got = 0;
                while got < want {
                    match tokio::time::timeout_at(give_up, read_packet(&mut s)).await {
                        Ok(Ok((0xD0 | 0x40, _))) => got += 1,
                        Ok(Ok(_)) => {}
                        // Closed, reset, or no acknowledgement in time.
                        Ok(Err(_)) | Err(_) => return (sent, 1, 0),
                    }
                }
                sent += u64::from(batch);
            }
            disconnect(s).await;
            (sent, 0, 0)
        });
    }
    let (mut sent, mut errors, mut local) = (0, 0, 0);
    while let Some(Ok((s, e, l))) = set.join_next().await {
        sent += s;
        errors += e;
        local += l;
    }
    let secs = a.duration.as_secs_f64();
    #[allow(clippy::cast_precision_loss)]
    let (msgs, bytes) = (sent as f64 / secs, (sent * a.payload as u64) as f64 / secs);
    vec![
        ("qos", a.qos.to_string()),
        ("payload", a.payload.to_string()),
        ("clients", a.concurrency.min(64).to_string()),
        ("msgs", sent.to_string()),
        ("ops", sent.to_string()),
        ("errors", errors.to_string()),
        ("local_errors", local.to_string()),
        ("per_s", f3(msgs)),
        ("mib_per_s", f3(bytes / 1_048_576.0)),
    ]
}

/// The `n` slowest of `(start_ms, us)` sessions, slowest first.
fn slowest(mut all: Vec<(u64, u64)>, n: usize) -> Vec<(u64, u64)> {
    all.sort_unstable_by_key(|s| std::cmp::Reverse(s.1));
    all.truncate(n);
    all
}

/// How long a `churn` or `flood` worker waits after a failure of this process's own
/// ([`Outcome::LocalError`]) before its next attempt.
const LOCAL_ERROR_PAUSE: Duration = Duration::from_millis(1);

/// A pause after a local failure: such a failure comes at once (no socket, port or
/// address to bind), and a worker meeting only those would otherwise spin for the whole
/// run, taking a core from the target it measures. Ports in `TIME_WAIT` and descriptors
/// come back with time.
async fn local_pause() {
    tokio::time::sleep(LOCAL_ERROR_PAUSE).await;
}

/// `[[start_ms, us], ...]`: raw JSON for a field.
fn pairs_json(pairs: &[(u64, u64)]) -> String {
    serde_json::to_string(pairs).expect("pairs of integers serialize")
}

/// What the legitimate clients saw: their latencies, their successes out of their
/// attempts, how the others failed, and their slowest sessions.
struct Legit {
    hist: Histogram<u64>,
    ok: u64,
    total: u64,
    /// Attempts refused: a CONNACK with a non-zero code, or the connection closed or reset.
    refused: u64,
    /// Attempts with no CONNACK within 3 s.
    timed_out: u64,
    /// Attempts that failed on this side ([`Outcome::LocalError`]): not in `total`.
    local_errors: u64,
    /// Attempts accepted whose DISCONNECT failed ([`disconnect`]): in `total`, not in
    /// `ok`.
    disconnect_failed: u64,
    /// The [`SLOWEST`] slowest successful sessions, slowest first: when each started
    /// (ms after the clients started) and how long it took (us).
    slowest: Vec<(u64, u64)>,
}

/// How one legitimate session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LegitEnd {
    /// Accepted and closed by the target after its DISCONNECT: when it started (ms after
    /// the clients started) and its CONNACK latency (us).
    Ok(u64, u64),
    /// Accepted (its CONNACK latency, us), but the session did not end as MQTT says
    /// ([`disconnect`]).
    DisconnectFailed(u64),
    /// Never accepted.
    Failed(Outcome),
}

/// How many of the legitimate clients' slowest sessions are reported with their start.
const SLOWEST: usize = 5;

impl Legit {
    fn none() -> Self {
        Self {
            hist: new_hist(),
            ok: 0,
            total: 0,
            refused: 0,
            timed_out: 0,
            local_errors: 0,
            disconnect_failed: 0,
            slowest: Vec::new(),
        }
    }
}

/// The `j`-th legitimate client's address: 127.0.2.1 ..= 127.0.2.250 (`LEGIT` is the
/// first).
fn legit_addr(j: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 2, u8::try_from(j % 250).expect("< 250") + 1)
}

/// Legitimate clients: from each of `clients` addresses (127.0.2.1 onwards) one session
/// every `every`, until `end`; their ticks spread evenly over `every`. Each address
/// opens `1 / every` sessions a second, so `every` must keep it under the targets'
/// per-IP limits (100 new connections a second, 64 at once): a failure is then the
/// attack's doing, not the client's own limit.
async fn legit(clients: usize, target: SocketAddr, every: Duration, end: Instant) -> Legit {
    let start = Instant::now();
    let mut ticks = Vec::with_capacity(clients);
    for j in 0..clients {
        let offset = every.mul_f64(j as f64 / clients as f64);
        let mut tick = tokio::time::interval_at(start + offset, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.push(tick);
    }
    let mut clients_set = JoinSet::new();
    for (j, mut tick) in ticks.into_iter().enumerate() {
        let src = legit_addr(j);
        clients_set.spawn(async move {
            let mut sessions = JoinSet::new();
            let mut i = 0u64;
            while Instant::now() < end {
                tick.tick().await;
                if Instant::now() >= end {
                    break;
                }
                i += 1;
                // Unique ids: the broker would take a session over from another with
                // the same id.
                let id = format!("legit{j}-{i}");
                sessions.spawn(async move {
                    let t0 = Instant::now();
                    match session(src, target, &id, SESSION_LIMIT).await {
                        (Outcome::Accepted, Some(s)) => {
                            let took = since(t0);
                            if disconnect(s).await {
                                LegitEnd::Ok(millis_after(start, t0), micros(took))
                            } else {
                                LegitEnd::DisconnectFailed(micros(took))
                            }
                        }
                        (Outcome::TimedOut, _) => LegitEnd::Failed(Outcome::TimedOut),
                        (Outcome::LocalError, _) => LegitEnd::Failed(Outcome::LocalError),
                        _ => LegitEnd::Failed(Outcome::Refused),
                    }
                });
            }
            sessions.join_all().await
        });
    }
    let mut l = Legit::none();
    let mut all = Vec::new();
    while let Some(Ok(results)) = clients_set.join_next().await {
        for r in results {
            if r == LegitEnd::Failed(Outcome::LocalError) {
                // Not the target's: neither a success nor a failure of it.
                l.local_errors += 1;
                continue;
            }
            l.total += 1;
            match r {
                LegitEnd::Ok(at, us) => {
                    l.ok += 1;
                    let _ = l.hist.record(us);
                    all.push((at, us));
                }
                // Accepted, but the session did not end as MQTT says: a failure, whose
                // CONNACK latency was the target's and stays in the percentiles.
                LegitEnd::DisconnectFailed(us) => {
                    l.disconnect_failed += 1;
                    let _ = l.hist.record(us);
                }
                LegitEnd::Failed(failed) => {
                    let _ = l.hist.record(micros(SESSION_LIMIT));
                    match failed {
                        Outcome::TimedOut => l.timed_out += 1,
                        _ => l.refused += 1,
                    }
                }
            }
        }
    }
    l.slowest = slowest(all, SLOWEST);
    l
}

/// [`legit`] on a thread and a runtime of its own. On this process's runtime its
/// connects would queue behind the attackers' tasks (500 slowloris tasks wake on the
/// same timer tick), and its latency would be partly this process's, for every target
/// alike.
async fn legit_apart(clients: usize, target: SocketAddr, every: Duration, end: Instant) -> Legit {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for the legitimate clients");
        let _ = tx.send(rt.block_on(legit(clients, target, every, end)));
    });
    match rx.await {
        Ok(result) => result,
        // The thread ended without a result: it panicked; so does this task.
        Err(_) => match thread.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the legitimate clients' thread sends before it ends"),
        },
    }
}

/// Most attacking connections `slowloris` opens at once: each slot holds one at a time,
/// and a target holds at most about 9,000 proxied connections here (the open-files
/// limit is 20,000 per process).
const MAX_SLOWLORIS: usize = 9_000;

/// How one attacking connection of `slowloris` ended.
enum Attack {
    /// The target closed it this long after its connect began.
    Cut(Duration),
    /// Still open at the end of the window.
    Uncut,
    /// The connect failed, or had not completed by the end of the window.
    ConnectFailed,
    /// This process could not open the connection ([`ConnectError::Local`]).
    LocalError,
}

/// Counts an open attacking connection while it lives.
struct Open(Arc<AtomicU64>);

impl Open {
    fn new(open: &Arc<AtomicU64>) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        Self(open.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One attacking connection from `src`: connects, trickles `packet` one byte per
/// `interval`, and waits until the target closes it or `end`. Its time is taken from
/// before the connect, so a cut's lateness over the deadline is an upper bound: the
/// target's clock starts at its accept, after that instant. `connected`, if given,
/// counts the connect once it has succeeded or failed.
async fn attack_once(
    src: Ipv4Addr,
    target: SocketAddr,
    packet: &[u8],
    interval: Duration,
    end: Instant,
    open: &Arc<AtomicU64>,
    connected: Option<&AtomicU64>,
) -> Attack {
    let t0 = Instant::now();
    let s = tokio::time::timeout_at(end, connect_from(src, target)).await;
    let _open = matches!(s, Ok(Ok(_))).then(|| Open::new(open));
    if let Some(connected) = connected {
        connected.fetch_add(1, Ordering::Relaxed);
    }
    let s = match s {
        Ok(Ok(s)) => s,
        Ok(Err(ConnectError::Local)) => return Attack::LocalError,
        Ok(Err(ConnectError::Target)) | Err(_) => return Attack::ConnectFailed,
    };
    let (mut r, mut w) = s.into_split();
    let trickle = async move {
        for &b in packet {
            if w.write_all(&[b]).await.is_err() {
                // Closed or reset: the read below sees it.
                break;
            }
            tokio::time::sleep(interval).await;
        }
        std::future::pending::<()>().await;
    };
    let closed = async move {
        let mut buf = [0u8; 16];
        while matches!(r.read(&mut buf).await, Ok(n) if n > 0) {}
    };
    tokio::select! {
        () = closed => Attack::Cut(since(t0)),
        () = trickle => Attack::Uncut,
        () = tokio::time::sleep_until(end) => Attack::Uncut,
    }
}

/// One attacker slot of `slowloris`: an attacking connection from `src`, and whenever
/// one ends before `end` (cut, or its connect failed), another at once from the same
/// address, so that the attack lasts the whole window whatever the target cuts. A slot
/// opens a connection at most every `interval`, so a target that cuts at once cannot
/// turn it into a flood. Returns the first connection's end and the later ones'.
/// `first_done` counts the slots whose first connect is done.
async fn attack_slot(
    src: Ipv4Addr,
    target: SocketAddr,
    packet: Arc<[u8]>,
    interval: Duration,
    end: Instant,
    open: Arc<AtomicU64>,
    first_done: Arc<AtomicU64>,
) -> (Attack, Vec<Attack>) {
    let mut began = Instant::now();
    let first = attack_once(
        src,
        target,
        &packet,
        interval,
        end,
        &open,
        Some(&first_done),
    )
    .await;
    let mut later = Vec::new();
    loop {
        tokio::time::sleep_until((began + interval).min(end)).await;
        if Instant::now() >= end {
            break;
        }
        began = Instant::now();
        later.push(attack_once(src, target, &packet, interval, end, &open, None).await);
    }
    (first, later)
}

/// How many attacking connections were open, sampled every 5 ms from the end of the
/// first connect burst (every slot's first connect done) to `end`: the least, the mean,
/// and how long the burst took.
async fn sample_open(
    open: Arc<AtomicU64>,
    first_done: Arc<AtomicU64>,
    n: u64,
    start: Instant,
    end: Instant,
) -> (u64, f64, Duration) {
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while first_done.load(Ordering::Relaxed) < n && Instant::now() < end {
        tick.tick().await;
    }
    let burst = since(start);
    let (mut least, mut sum, mut samples) = (u64::MAX, 0u64, 0u64);
    loop {
        tick.tick().await;
        // Read before the clock: a reading taken before `end` counts no connection
        // closed for the end of the window.
        let now_open = open.load(Ordering::Relaxed);
        if Instant::now() >= end {
            break;
        }
        least = least.min(now_open);
        sum += now_open;
        samples += 1;
    }
    #[allow(clippy::cast_precision_loss)]
    let mean = if samples == 0 {
        f64::NAN
    } else {
        sum as f64 / samples as f64
    };
    (if samples == 0 { 0 } else { least }, mean, burst)
}

/// Cut lateness over `deadline` in ms (negative: early), sorted.
fn lateness(cuts: &[Duration], deadline: Duration) -> Vec<i64> {
    #[allow(clippy::cast_possible_truncation)]
    let mut late: Vec<i64> = cuts
        .iter()
        .map(|d| d.as_millis() as i64 - deadline.as_millis() as i64)
        .collect();
    late.sort_unstable();
    late
}

/// The `p` quantile of sorted `late`, or `null`.
fn quantile(late: &[i64], p: f64) -> String {
    if late.is_empty() {
        "null".into()
    } else {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let idx = ((late.len() - 1) as f64 * p).round() as usize;
        late[idx].to_string()
    }
}

/// N attacker slots, each trickling a CONNECT one byte per interval and reconnecting
/// at once when cut, for the whole window; when was each connection cut? The first
/// connection of each slot is reported against N (`cut`, `uncut`, `connect_failed`,
/// `cut_within_100ms`, `late_*`), the slots' later connections apart (`reconnect_*`).
async fn slowloris(a: &Args) -> Fields {
    if a.n > MAX_SLOWLORIS {
        eprintln!("mqtt-load: slowloris holds at most {MAX_SLOWLORIS} connections at once");
        std::process::exit(2);
    }
    // Baseline: the legitimate client alone, as long as the attack will last, so that
    // both p99s are taken over as many samples.
    let every = Duration::from_millis(20);
    let base = legit_apart(1, a.target, every, Instant::now() + a.duration).await;
    let start = Instant::now();
    let end = start + a.duration;
    let legit_task = tokio::spawn(legit_apart(1, a.target, every, end));
    let open = Arc::new(AtomicU64::new(0));
    let first_done = Arc::new(AtomicU64::new(0));
    let sampler = tokio::spawn(sample_open(
        open.clone(),
        first_done.clone(),
        a.n as u64,
        start,
        end,
    ));
    let mut set = JoinSet::new();
    let packet: Arc<[u8]> = connect_packet("slowloris-client-with-a-long-id", 0).into();
    for i in 0..a.n {
        set.spawn(attack_slot(
            spread(i as u64),
            a.target,
            packet.clone(),
            a.interval,
            end,
            open.clone(),
            first_done.clone(),
        ));
    }
    let (mut cut_at, mut uncut, mut connect_failed) = (Vec::new(), 0u64, 0u64);
    let mut local = 0u64;
    let (mut re_cut_at, mut re_uncut, mut re_failed, mut reconnects) =
        (Vec::new(), 0u64, 0u64, 0u64);
    while let Some(Ok((first, later))) = set.join_next().await {
        match first {
            Attack::Cut(d) => cut_at.push(d),
            Attack::Uncut => uncut += 1,
            Attack::ConnectFailed => connect_failed += 1,
            Attack::LocalError => local += 1,
        }
        for r in later {
            reconnects += 1;
            match r {
                Attack::Cut(d) => re_cut_at.push(d),
                Attack::Uncut => re_uncut += 1,
                Attack::ConnectFailed => re_failed += 1,
                Attack::LocalError => local += 1,
            }
        }
    }
    let (open_min, open_mean, burst) = sampler.await.unwrap_or((0, f64::NAN, a.duration));
    let l = legit_task.await.unwrap_or_else(|_| Legit::none());
    let late = lateness(&cut_at, a.deadline);
    let re_late = lateness(&re_cut_at, a.deadline);
    let within = |late: &[i64]| late.iter().filter(|&&l| (-100..=100).contains(&l)).count();
    let first_or_null = |late: &[i64]| late.first().map_or("null".into(), ToString::to_string);
    let last_or_null = |late: &[i64]| late.last().map_or("null".into(), ToString::to_string);
    vec![
        ("n", a.n.to_string()),
        ("deadline_ms", a.deadline.as_millis().to_string()),
        ("interval_ms", a.interval.as_millis().to_string()),
        // Lateness is timed from before each connect: an upper bound.
        ("late_from", "\"before_connect\"".into()),
        ("cut", cut_at.len().to_string()),
        ("uncut", uncut.to_string()),
        ("connect_failed", connect_failed.to_string()),
        // Every attacking and legitimate connection of the run that this process failed
        // to open (the attackers' are in neither `cut`, `uncut` nor `connect_failed`).
        (
            "local_errors",
            (local + base.local_errors + l.local_errors).to_string(),
        ),
        ("cut_within_100ms", within(&late).to_string()),
        ("late_min_ms", first_or_null(&late)),
        ("late_p50_ms", quantile(&late, 0.5)),
        ("late_p99_ms", quantile(&late, 0.99)),
        ("late_max_ms", last_or_null(&late)),
        ("reconnects", reconnects.to_string()),
        ("reconnect_cut", re_cut_at.len().to_string()),
        ("reconnect_uncut", re_uncut.to_string()),
        ("reconnect_failed", re_failed.to_string()),
        ("reconnect_cut_within_100ms", within(&re_late).to_string()),
        ("reconnect_late_max_ms", last_or_null(&re_late)),
        ("burst_ms", burst.as_millis().to_string()),
        ("open_min", open_min.to_string()),
        ("open_mean", f3(open_mean)),
        ("legit_base_p99_us", pct(&base.hist, 0.99).to_string()),
        ("legit_base_ok", base.ok.to_string()),
        ("legit_base_total", base.total.to_string()),
        ("legit_base_slowest", pairs_json(&base.slowest)),
        ("legit_p99_us", pct(&l.hist, 0.99).to_string()),
        ("legit_ok", l.ok.to_string()),
        ("legit_total", l.total.to_string()),
        ("legit_disconnect_failed", l.disconnect_failed.to_string()),
        ("legit_slowest", pairs_json(&l.slowest)),
    ]
}

/// Attackers from `--attackers` addresses connect as fast as they can (CONNECT, then
/// drop); `--legit-clients` legitimate clients, each from its own address and one
/// session every 20 ms (50 a second, half the targets' per-IP rate limit), measure
/// success and latency.
async fn flood(a: &Args) -> Fields {
    let end = Instant::now() + a.duration;
    let legit_task = tokio::spawn(legit_apart(
        a.legit_clients,
        a.target,
        Duration::from_millis(20),
        end,
    ));
    let next = Arc::new(AtomicU64::new(0));
    let mut set = JoinSet::new();
    for _ in 0..a.concurrency {
        let (next, target) = (next.clone(), a.target);
        let (from, n) = (a.attackers_from, a.attackers);
        set.spawn(async move {
            let (mut acc, mut rej, mut to, mut local) = (0u64, 0u64, 0u64, 0u64);
            while Instant::now() < end {
                // `attacker` takes it round the `n` addresses.
                let i = next.fetch_add(1, Ordering::Relaxed);
                match session(
                    attacker(from, n, i),
                    target,
                    "flood",
                    Duration::from_millis(500),
                )
                .await
                {
                    (Outcome::Accepted, Some(s)) => {
                        acc += 1;
                        disconnect(s).await;
                    }
                    (Outcome::TimedOut, _) => to += 1,
                    // This process's failure: not a rejection by the target (`rejected`
                    // divides its CPU).
                    (Outcome::LocalError, _) => {
                        local += 1;
                        local_pause().await;
                    }
                    _ => rej += 1,
                }
            }
            (acc, rej, to, local)
        });
    }
    let (mut acc, mut rej, mut to, mut local) = (0, 0, 0, 0);
    while let Some(Ok((x, y, z, w))) = set.join_next().await {
        acc += x;
        rej += y;
        to += z;
        local += w;
    }
    let l = legit_task.await.unwrap_or_else(|_| Legit::none());
    let secs = a.duration.as_secs_f64();
    #[allow(clippy::cast_precision_loss)]
    let (rej_rate, success) = (
        rej as f64 / secs,
        100.0 * l.ok as f64 / l.total.max(1) as f64,
    );
    vec![
        ("attackers", a.attackers.to_string()),
        ("attackers_from", format!("\"{}\"", a.attackers_from)),
        ("concurrency", a.concurrency.to_string()),
        ("accepted", acc.to_string()),
        ("rejected", rej.to_string()),
        ("timed_out", to.to_string()),
        // The attackers' and the legitimate clients' (the latter in no `legit_*`).
        ("local_errors", (local + l.local_errors).to_string()),
        ("ops", rej.to_string()),
        ("rejected_per_s", f3(rej_rate)),
        ("legit_clients", a.legit_clients.to_string()),
        ("legit_ok", l.ok.to_string()),
        ("legit_total", l.total.to_string()),
        ("legit_failed", (l.total - l.ok).to_string()),
        ("legit_refused", l.refused.to_string()),
        ("legit_disconnect_failed", l.disconnect_failed.to_string()),
        ("legit_timed_out", l.timed_out.to_string()),
        ("legit_success_pct", f3(success)),
        ("legit_p99_us", pct(&l.hist, 0.99).to_string()),
        ("legit_slowest", pairs_json(&l.slowest)),
    ]
}

/// The largest PID Linux gives (`PID_MAX_LIMIT` on 64-bit).
const PID_MAX_LIMIT: u32 = 4_194_304;

/// Why `stall` could not stop or resume the broker.
#[derive(Debug, PartialEq, Eq)]
enum StallError {
    /// Not a single process's PID (0, 1 and larger values would signal groups or every
    /// process once `kill` takes them as negative).
    BadPid(u32),
    /// `kill` could not be run (procps missing?), or it failed (no such process, not
    /// permitted): the stall did not happen, or the broker may still be stopped.
    Signal { signal: &'static str, why: String },
}

impl std::fmt::Display for StallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::BadPid(pid) => write!(f, "--stop-pid {pid} is not a single process's PID"),
            Self::Signal { signal, why } => write!(f, "could not send SIG{signal}: {why}"),
        }
    }
}

/// `kill -SIGNAL PID` (procps' `kill`: this crate sends no signal itself, that would
/// take `unsafe`).
fn signal_pid(pid: u32, signal: &'static str) -> Result<(), StallError> {
    if !(2..=PID_MAX_LIMIT).contains(&pid) {
        return Err(StallError::BadPid(pid));
    }
    let failed = |why: String| StallError::Signal { signal, why };
    let out = std::process::Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .output()
        .map_err(|e| failed(format!("`kill` could not be run ({e}); procps installs it")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(failed(format!(
            "`kill` {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// The broker stalls (SIGSTOP) and comes back (SIGCONT) while a client tries a session
/// every 50 ms: how soon are clients refused fast, and how soon served again? Fails when
/// either signal cannot be sent.
async fn stall(a: &Args) -> Result<Fields, StallError> {
    let Some(pid) = a.stop_pid else { usage() };
    let t0 = Instant::now();
    let total = a.stop_after + a.stop_for + a.duration;
    let mut set = JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut stopped = false;
    let mut resumed = false;
    while since(t0) < total {
        tick.tick().await;
        if !stopped && since(t0) >= a.stop_after {
            signal_pid(pid, "STOP")?;
            stopped = true;
        }
        if !resumed && since(t0) >= a.stop_after + a.stop_for {
            signal_pid(pid, "CONT")?;
            resumed = true;
        }
        let target = a.target;
        set.spawn(async move {
            let start = since(t0);
            let (o, s) = session(LEGIT, target, "stall-probe", Duration::from_secs(3)).await;
            let took = since(t0).saturating_sub(start);
            if let Some(s) = s {
                disconnect(s).await;
            }
            (start, took, o)
        });
    }
    if !resumed {
        signal_pid(pid, "CONT")?;
    }
    let mut results = Vec::new();
    while let Some(Ok(r)) = set.join_next().await {
        results.push(r);
    }
    results.sort_by_key(|r| r.0);
    let (stop, cont) = (a.stop_after, a.stop_after + a.stop_for);
    // First attempt, started after SIGSTOP, that was refused within 250 ms.
    let fast = results
        .iter()
        .find(|(s, took, o)| {
            *s >= stop && *o == Outcome::Refused && *took < Duration::from_millis(250)
        })
        .map(|(s, took, _)| (*s + *took).saturating_sub(stop));
    // First attempt that succeeded after SIGCONT (end time, from SIGCONT).
    let recovered = results
        .iter()
        .filter(|(s, took, o)| *o == Outcome::Accepted && *s + *took >= cont)
        .map(|(s, took, _)| (*s + *took).saturating_sub(cont))
        .min();
    let during = |o: Outcome| {
        results
            .iter()
            .filter(|(s, _, oo)| *s >= stop && *s < cont && *oo == o)
            .count()
    };
    let slow = results
        .iter()
        .filter(|(s, took, _)| *s >= stop && *s < cont && *took >= Duration::from_secs(1))
        .count();
    let ms = |d: Option<Duration>| d.map_or("null".into(), |d| d.as_millis().to_string());
    Ok(vec![
        ("stop_ms", a.stop_for.as_millis().to_string()),
        ("attempts", results.len().to_string()),
        ("stalled_accepted", during(Outcome::Accepted).to_string()),
        ("stalled_answered_after_1s", slow.to_string()),
        ("stalled_refused", during(Outcome::Refused).to_string()),
        ("stalled_timed_out", during(Outcome::TimedOut).to_string()),
        (
            "local_errors",
            results
                .iter()
                .filter(|(_, _, o)| *o == Outcome::LocalError)
                .count()
                .to_string(),
        ),
        ("fast_refusal_after_ms", ms(fast)),
        ("recovery_after_cont_ms", ms(recovered)),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    fn field<'a>(fields: &'a Fields, key: &str) -> &'a str {
        fields
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("no {key} in {fields:?}"))
    }

    /// A broker that answers CONNECT and then reads every PUBLISH and PINGREQ without
    /// ever answering one (as the gateway's publish tier drops a QoS 1 PUBLISH).
    async fn mute_broker() -> SocketAddr {
        serve_each(|mut s| async move {
            if read_packet(&mut s).await.is_ok() && s.write_all(&[0x20, 2, 0, 0]).await.is_ok() {
                let mut buf = vec![0u8; 64 * 1024];
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            }
        })
        .await
    }

    /// A loopback listener whose every connection `serve` drives in a task of its own.
    async fn serve_each<F, Fut>(serve: F) -> SocketAddr
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(serve(s));
            }
        });
        addr
    }

    /// What [`broker`] does after the client's DISCONNECT.
    #[derive(Clone, Copy, Debug)]
    enum AfterDisconnect {
        /// Closes (as MQTT says the server does).
        Close,
        /// Resets the connection.
        Reset,
        /// Keeps it open until the client closes.
        StayOpen,
    }

    /// A broker that answers every CONNECT with CONNACK 0, then does `after` once the
    /// DISCONNECT comes.
    async fn broker(after: AfterDisconnect) -> SocketAddr {
        serve_each(move |mut s| async move {
            if read_packet(&mut s).await.is_err() || s.write_all(&[0x20, 2, 0, 0]).await.is_err() {
                return;
            }
            while let Ok((first, _)) = read_packet(&mut s).await {
                if first == DISCONNECT[0] {
                    match after {
                        AfterDisconnect::Close => return,
                        AfterDisconnect::Reset => {
                            s.set_zero_linger().unwrap();
                            return;
                        }
                        AfterDisconnect::StayOpen => {}
                    }
                }
            }
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn disconnect_says_whether_the_broker_closed_after_it() {
        for (after, closed) in [
            (AfterDisconnect::Close, true),
            (AfterDisconnect::Reset, false),
            (AfterDisconnect::StayOpen, false),
        ] {
            let target = broker(after).await;
            let (o, s) = session(LEGIT, target, "d", SESSION_LIMIT).await;
            assert_eq!(o, Outcome::Accepted, "{after:?}");
            assert_eq!(disconnect(s.unwrap()).await, closed, "{after:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn churn_counts_no_cycle_ok_whose_disconnect_failed() {
        // Not a broker that resets: its cycles would never wait, nor let the paused clock
        // reach the end of the run (`disconnect_says_whether_...` has it).
        for after in [AfterDisconnect::StayOpen] {
            let mut a = Args::new("churn", broker(after).await);
            a.concurrency = 1;
            a.duration = Duration::from_secs(3);
            let fields = churn(&a).await;
            assert_eq!(field(&fields, "ok"), "0", "{after:?}: {fields:?}");
            assert_eq!(field(&fields, "ops"), "0", "{after:?}: {fields:?}");
            assert_eq!(field(&fields, "failed"), "0", "{after:?}: {fields:?}");
            let failed: u64 = field(&fields, "disconnect_failed").parse().unwrap();
            assert!(failed >= 1, "{after:?}: {fields:?}");
        }
    }

    #[test]
    fn local_failures_are_told_from_the_targets() {
        use io::{Error, ErrorKind};
        const EADDRINUSE: i32 = 98;
        const EADDRNOTAVAIL: i32 = 99;
        const ENOMEM: i32 = 12;
        for errno in [EADDRINUSE, EADDRNOTAVAIL, EMFILE, ENFILE, ENOBUFS, ENOMEM] {
            assert!(is_local(&Error::from_raw_os_error(errno)), "errno {errno}");
        }
        // ECONNREFUSED, ECONNRESET, ETIMEDOUT, ENETUNREACH, EHOSTUNREACH.
        for errno in [111, 104, 110, 101, 113] {
            assert!(!is_local(&Error::from_raw_os_error(errno)), "errno {errno}");
        }
        assert!(!is_local(&Error::from(ErrorKind::ConnectionRefused)));
    }

    /// An address no interface here has (TEST-NET-2; a host may have one of TEST-NET-1,
    /// this one has 192.0.2.2): binding to it fails with `EADDRNOTAVAIL`, this side's
    /// failure, as running out of ports or descriptors is.
    const UNASSIGNED: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

    #[tokio::test]
    async fn a_session_that_cannot_bind_is_a_local_error_not_a_refusal() {
        let target = broker(AfterDisconnect::Close).await;
        let (o, s) = session(UNASSIGNED, target, "l", SESSION_LIMIT).await;
        assert!(s.is_none());
        assert_eq!(o, Outcome::LocalError);
        // A refusal by the target stays one: nothing listens on a closed port.
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed_addr = closed.local_addr().unwrap();
        drop(closed);
        assert_eq!(
            session(LEGIT, closed_addr, "r", SESSION_LIMIT).await.0,
            Outcome::Refused
        );
    }

    /// On the real clock: attackers that fail at once never let a paused clock move.
    #[tokio::test]
    async fn flood_counts_its_own_failures_apart_from_rejections() {
        let mut a = Args::new("flood", broker(AfterDisconnect::Close).await);
        a.attackers_from = UNASSIGNED;
        a.attackers = 1;
        a.concurrency = 2;
        a.legit_clients = 1;
        a.duration = Duration::from_millis(300);
        let fields = flood(&a).await;
        assert_eq!(field(&fields, "rejected"), "0", "{fields:?}");
        assert_eq!(field(&fields, "accepted"), "0", "{fields:?}");
        let local: u64 = field(&fields, "local_errors").parse().unwrap();
        assert!(local >= 2, "{fields:?}");
        // The legitimate client, from a local address, is served.
        assert_ne!(field(&fields, "legit_ok"), "0", "{fields:?}");
    }

    /// On the real clock, as the test above. Each worker's attempts after its first
    /// come after a pause of at least [`LOCAL_ERROR_PAUSE`] (tokio's timer has a
    /// millisecond's grain): at most 301 a worker in 300 ms, where a worker that retried
    /// at once made tens of thousands.
    #[tokio::test]
    async fn churn_pauses_after_its_own_failures() {
        let mut a = Args::new("churn", broker(AfterDisconnect::Close).await);
        a.concurrency = 2;
        a.duration = Duration::from_millis(300);
        let fields = churn_from(&a, |_| UNASSIGNED).await;
        assert_eq!(field(&fields, "ok"), "0", "{fields:?}");
        assert_eq!(field(&fields, "failed"), "0", "{fields:?}");
        let local: u64 = field(&fields, "local_errors").parse().unwrap();
        let most = 2 * (300 / LOCAL_ERROR_PAUSE.as_millis() as u64 + 1);
        assert!(
            (2..=most).contains(&local),
            "{local} not in 2..={most}: {fields:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_legitimate_session_whose_disconnect_failed_is_not_a_success() {
        for (after, ok) in [
            (AfterDisconnect::Close, true),
            (AfterDisconnect::Reset, false),
            (AfterDisconnect::StayOpen, false),
        ] {
            let target = broker(after).await;
            let start = Instant::now();
            let l = legit(
                1,
                target,
                Duration::from_millis(100),
                start + Duration::from_millis(250),
            )
            .await;
            assert!(l.total >= 2, "{after:?}: {} attempts", l.total);
            assert_eq!(l.local_errors, 0, "{after:?}");
            assert_eq!((l.refused, l.timed_out), (0, 0), "{after:?}");
            if ok {
                assert_eq!((l.ok, l.disconnect_failed), (l.total, 0), "{after:?}");
            } else {
                assert_eq!((l.ok, l.disconnect_failed), (0, l.total), "{after:?}");
            }
            // Their CONNACK latencies are the target's, counted either way.
            assert_eq!(l.hist.len(), l.total, "{after:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn publish_ends_when_the_target_never_acknowledges() {
        for qos in [1, 0] {
            let mut a = Args::new("publish", mute_broker().await);
            a.qos = qos;
            a.concurrency = 1;
            a.duration = Duration::from_secs(1);
            let began = Instant::now();
            let fields = tokio::time::timeout(Duration::from_secs(60), publish(&a))
                .await
                .unwrap_or_else(|_| panic!("QoS {qos}: publish still waiting after 60 s"));
            assert!(since(began) <= a.duration + GRACE + Duration::from_secs(1));
            assert_eq!(field(&fields, "errors"), "1", "QoS {qos}: {fields:?}");
            assert_eq!(field(&fields, "msgs"), "0", "QoS {qos}: {fields:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn stall_fails_when_the_broker_cannot_be_stopped() {
        // No process has the PID pid_max: PIDs stay below it.
        let pid_max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(pid_max <= PID_MAX_LIMIT);
        let mut a = Args::new("stall", "127.0.0.1:9".parse().unwrap());
        a.stop_pid = Some(pid_max);
        a.stop_after = Duration::ZERO;
        a.duration = Duration::from_millis(100);
        a.stop_for = Duration::from_millis(100);
        let err = stall(&a).await.expect_err("a stall that never happened");
        assert!(
            matches!(err, StallError::Signal { signal: "STOP", .. }),
            "{err}"
        );
    }

    /// A `/proc/PID/status` text with these kB figures.
    fn status(rss: u64, anon: u64, file: u64, shmem: u64) -> String {
        format!(
            "Name:\tmqtt-gateway\nVmHWM:\t{rss} kB\nVmRSS:\t{rss} kB\nRssAnon:\t{anon} kB\n\
             RssFile:\t{file} kB\nRssShmem:\t{shmem} kB\nVmData:\t9 kB\n"
        )
    }

    #[test]
    fn hold_counts_anonymous_memory_per_connection_not_code_paged_in() {
        // The reviewer's gw_all over a `hold 4000`: RssFile 7,992 -> 8,184 kB, the code
        // the first sessions paged in; the anonymous memory grew by 7,860 kB.
        let before = parse_memory(&status(7_992 + 1_000 + 4, 1_000, 7_992, 4)).unwrap();
        let during = parse_memory(&status(8_184 + 8_860 + 4, 8_860, 8_184, 4)).unwrap();
        assert_eq!(before.anon, Some(1_004 * 1024));
        let fields = memory_fields(before, during, 4000);
        assert_eq!(field(&fields, "anon_bytes_per_conn"), "2012.160");
        // VmRSS stays, under its old keys.
        assert_eq!(field(&fields, "bytes_per_conn"), "2061.312");
        assert_eq!(field(&fields, "rss_during"), (17_048 * 1024).to_string());
        // No RssAnon (before Linux 4.5): no anonymous figure, rather than a wrong one.
        let old = parse_memory("VmRSS:\t100 kB\n").unwrap();
        assert_eq!(old.anon, None);
        assert!(
            !memory_fields(old, old, 1)
                .iter()
                .any(|(k, _)| k.starts_with("anon"))
        );
    }

    #[test]
    fn signal_pid_refuses_what_would_signal_more_than_one_process() {
        // Never run: 0 is the process group, 1 init, and procps' kill reads 4294967295 as
        // -1, every process.
        for pid in [0, 1, PID_MAX_LIMIT + 1, u32::MAX] {
            assert_eq!(signal_pid(pid, "CONT"), Err(StallError::BadPid(pid)));
        }
    }

    #[test]
    fn attackers_stay_on_loopback_and_apart() {
        let at = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(attacker_range(ATTACKERS_FROM, 250), Ok(()));
        assert_eq!(attacker_range(at("127.0.255.1"), 250), Ok(()));
        for (from, n) in [
            ("127.0.0.1", 10),
            ("127.0.1.1", 10),
            ("127.0.2.200", 10),
            ("10.0.3.1", 10),
            ("127.255.255.200", 100),
            ("255.255.255.255", 250),
        ] {
            assert!(attacker_range(at(from), n).is_err(), "{from} + {n}");
        }
        let from = at("127.0.4.1");
        assert_eq!(attacker(from, 10, 0), from);
        assert_eq!(attacker(from, 10, 9), at("127.0.4.10"));
        assert_eq!(attacker(from, 10, 10), from);
        assert_eq!(attacker(at("127.0.4.250"), 10, 7), at("127.0.5.1"));
    }
}
