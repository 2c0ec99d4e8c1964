//! The sniffing layer: the classifier's cost per prefix kind, and the CPU the layer adds
//! per connection against the same service without it, in one run.
//!
//! ```text
//! cargo bench -p benches --bench sniff
//! ```
//!
//! - `sniff_classify/*`: [`classify`] on a complete first message of each kind.
//! - `sniff_conn_ready/*`: one whole connection over an in-memory stream whose first
//!   message (a 14-byte MQTT CONNECT) is already there: the service reads it and ends.
//!   `baseline` is that service alone; `filter` is it behind `SniffLayer` (detection,
//!   replay through `Rewind`, the timer never armed); `router` is it as the MQTT route
//!   of a `SniffRouter` (plus one boxed future per connection).
//! - `sniff_conn_waits/*`: the same over `tokio::io::duplex`, with the client writing
//!   only after the service has polled once and found nothing, so the layer arms its
//!   detection timer (the usual path of a real connection).

use std::hint::black_box;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use aegis_core::Conn;
use aegis_layers::sniff::{Protocols, SniffLayer, SniffRouter, classify};
use criterion::Criterion;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt, service_fn};

const CONNECT: &[u8] = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00";

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// An in-memory stream: serves `data`, then EOF; swallows writes.
struct Mem {
    data: &'static [u8],
}

impl AsyncRead for Mem {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self.data.len().min(buf.remaining());
        buf.put_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Mem {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(b.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The inner service in every case: read the CONNECT, end.
async fn read_connect<I: AsyncRead + Unpin>(mut io: I) -> io::Result<()> {
    let mut buf = [0; CONNECT.len()];
    io.read_exact(&mut buf).await?;
    Ok(())
}

fn addrs() -> (SocketAddr, SocketAddr) {
    (
        "192.0.2.7:40000".parse().unwrap(),
        "127.0.0.1:1883".parse().unwrap(),
    )
}

async fn ready_conns<S>(iters: u64, svc: &S) -> Duration
where
    S: Service<Conn<Mem>, Response = ()> + Clone,
    S::Error: std::fmt::Debug,
{
    let (peer, local) = addrs();
    let start = Instant::now();
    for _ in 0..iters {
        let io = Conn::new(Mem { data: CONNECT }, peer, local);
        svc.clone().oneshot(io).await.unwrap();
    }
    Instant::now().saturating_duration_since(start)
}

async fn waiting_conns<S>(iters: u64, svc: &S) -> Duration
where
    S: Service<Conn<tokio::io::DuplexStream>, Response = ()> + Clone,
    S::Error: std::fmt::Debug,
{
    let (peer, local) = addrs();
    let start = Instant::now();
    for _ in 0..iters {
        let (mut client, server) = tokio::io::duplex(64);
        let served = svc.clone().oneshot(Conn::new(server, peer, local));
        let client = async move {
            tokio::task::yield_now().await; // let the service find nothing first
            client.write_all(CONNECT).await.unwrap();
            client
        };
        let (served, _client) = tokio::join!(served, client);
        served.unwrap();
    }
    Instant::now().saturating_duration_since(start)
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();

    let mut group = c.benchmark_group("sniff_classify");
    for (name, bytes) in [
        ("mqtt", CONNECT),
        ("http1", b"GET /healthz HTTP/1.1\r\n".as_slice()),
        ("http2", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
        ("tls", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
        ("proxy_v1", b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n"),
        ("proxy_v2", b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c"),
        ("unknown", b"SSH-2.0-OpenSSH_9.6\r\n"),
    ] {
        group.bench_function(name, |b| b.iter(|| classify(black_box(bytes))));
    }
    group.finish();

    let baseline = service_fn(read_connect::<Conn<Mem>>);
    let filter = SniffLayer::new(Protocols::MQTT).layer(service_fn(read_connect));
    let router = SniffRouter::new().route(Protocols::MQTT, service_fn(read_connect));
    let mut group = c.benchmark_group("sniff_conn_ready");
    group.bench_function("baseline", |b| {
        b.iter_custom(|n| rt.block_on(ready_conns(n, &baseline)));
    });
    group.bench_function("filter", |b| {
        b.iter_custom(|n| rt.block_on(ready_conns(n, &filter)));
    });
    group.bench_function("router", |b| {
        b.iter_custom(|n| rt.block_on(ready_conns(n, &router)));
    });
    group.finish();

    let baseline = service_fn(read_connect::<Conn<tokio::io::DuplexStream>>);
    let filter = SniffLayer::new(Protocols::MQTT).layer(service_fn(read_connect));
    let mut group = c.benchmark_group("sniff_conn_waits");
    group.bench_function("baseline", |b| {
        b.iter_custom(|n| rt.block_on(waiting_conns(n, &baseline)));
    });
    group.bench_function("filter", |b| {
        b.iter_custom(|n| rt.block_on(waiting_conns(n, &filter)));
    });
    group.finish();

    c.final_summary();
}
