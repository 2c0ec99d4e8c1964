//! The bare proxy against a plain `tokio::io::copy_bidirectional` proxy, in one run.
//!
//! ```text
//! cargo bench -p benches --bench proxy
//! ```
//!
//! Each proxy runs in its own child process (this binary, started again with
//! `AEGIS_BENCH_PROXY_CHILD=aegis|naive`), so that its CPU and memory are its own.
//!
//! - **Throughput**: a client sends 32 MiB through the proxy to a sink upstream, which
//!   answers with the byte count once it has read everything.
//! - **Memory per idle proxied connection**: RSS growth of the proxy process while it
//!   holds `AEGIS_BENCH_IDLE` connections (3,000 by default), each of which has carried
//!   a small message both ways and is now idle. RSS counts user-space memory only; the
//!   kernel's socket buffers are not in it.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use criterion::{Criterion, Throughput};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PAYLOAD: usize = 32 * 1024 * 1024;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    if let Ok(kind) = std::env::var("AEGIS_BENCH_PROXY_CHILD") {
        child(&kind);
        return;
    }
    raise_nofile();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (echo, sink) = rt.block_on(async { (spawn_echo().await, spawn_sink().await) });

    let mut c = Criterion::default()
        .sample_size(10)
        .measurement_time(Duration::from_secs(8))
        .configure_from_args();
    let mut group = c.benchmark_group("proxy_throughput_32MiB");
    group.throughput(Throughput::Bytes(PAYLOAD as u64));
    group.bench_function("direct", |b| {
        b.iter_custom(|iters| rt.block_on(send_many(sink, iters)));
    });
    for kind in ["aegis", "naive"] {
        let (mut proc, addr) = start_child(kind, sink);
        group.bench_function(kind, |b| {
            b.iter_custom(|iters| rt.block_on(send_many(addr, iters)));
        });
        let _ = proc.kill();
        let _ = proc.wait();
    }
    group.finish();
    c.final_summary();

    let idle: usize = std::env::var("AEGIS_BENCH_IDLE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3_000);
    println!(
        "\nmemory per idle proxied connection ({idle} connections, RSS growth of the proxy process):"
    );
    let mut results = Vec::new();
    for kind in ["aegis", "naive"] {
        let per_conn = rt.block_on(idle_memory(kind, echo, idle));
        println!("  {kind:<6} {per_conn:>8.0} bytes/connection");
        results.push(per_conn);
    }
    println!("  ratio aegis/naive: {:.3}", results[0] / results[1]);
}

/// Sends `iters` payloads through `addr`, one connection each; returns the total time.
async fn send_many(addr: SocketAddr, iters: u64) -> Duration {
    let chunk = vec![0x5Au8; 256 * 1024];
    let start = tokio::time::Instant::now();
    for _ in 0..iters {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        let mut left = PAYLOAD;
        while left > 0 {
            let n = left.min(chunk.len());
            s.write_all(&chunk[..n]).await.unwrap();
            left -= n;
        }
        s.shutdown().await.unwrap();
        let got = s.read_u64().await.unwrap();
        assert_eq!(got, PAYLOAD as u64);
    }
    tokio::time::Instant::now().saturating_duration_since(start)
}

async fn idle_memory(kind: &str, echo: SocketAddr, n: usize) -> f64 {
    let (mut proc, addr) = start_child(kind, echo);
    let pid = proc.id();
    // Warm up: threads, allocator arenas and the runtime's slabs exist before the baseline.
    let mut warm = Vec::new();
    for _ in 0..50 {
        warm.push(hold_one(addr).await);
    }
    drop(warm);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_bytes(pid);
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        held.push(hold_one(addr).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_bytes(pid);
    drop(held);
    let _ = proc.kill();
    let _ = proc.wait();
    (after.saturating_sub(before)) as f64 / n as f64
}

/// One connection that carried 64 bytes each way and is now idle.
async fn hold_one(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let msg = [7u8; 64];
    s.write_all(&msg).await.unwrap();
    let mut back = [0u8; 64];
    s.read_exact(&mut back).await.unwrap();
    s
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

fn start_child(kind: &str, upstream: SocketAddr) -> (Child, SocketAddr) {
    let mut proc = Command::new(std::env::current_exe().unwrap())
        .env("AEGIS_BENCH_PROXY_CHILD", kind)
        .env("AEGIS_BENCH_UPSTREAM", upstream.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(proc.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (proc, line.trim().parse().unwrap())
}

async fn spawn_echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

async fn spawn_sink() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => total += n as u64,
                    }
                }
                let _ = s.write_u64(total).await;
            });
        }
    });
    addr
}

fn raise_nofile() {
    if let Ok((soft, hard)) = rlimit::getrlimit(rlimit::Resource::NOFILE)
        && soft < hard
    {
        let _ = rlimit::setrlimit(rlimit::Resource::NOFILE, hard, hard);
    }
}

/// The proxy process: `aegis` is `serve` + `Proxy`; `naive` is accept + spawn +
/// `copy_bidirectional` (8 KiB buffers per direction, held for the connection's life).
fn child(kind: &str) {
    raise_nofile();
    let upstream: SocketAddr = std::env::var("AEGIS_BENCH_UPSTREAM")
        .unwrap()
        .parse()
        .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("{}", listener.local_addr().unwrap());
        match kind {
            "aegis" => {
                let proxy = aegis_core::proxy::Proxy::new(upstream);
                aegis_core::serve(listener, proxy)
                    .max_connections(15_000)
                    .nodelay(true)
                    .await;
            }
            _ => loop {
                let (mut client, _) = listener.accept().await.unwrap();
                client.set_nodelay(true).unwrap();
                tokio::spawn(async move {
                    let mut up = TcpStream::connect(upstream).await.unwrap();
                    up.set_nodelay(true).unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                });
            },
        }
    });
}
