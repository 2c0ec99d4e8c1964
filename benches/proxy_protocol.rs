//! The cost of the PROXY protocol layer per connection, against the same service
//! without it, in one run; and the cost of parsing v1 and v2 headers.
//!
//! ```text
//! cargo bench -p benches --bench proxy_protocol
//! ```
//!
//! Connections are in-memory streams (`std::io::Cursor`, always ready), so the figures
//! are CPU only: no syscalls, no timer (the deadline is armed only when a read waits).
//! The inner service reads the whole connection and returns its client address.
//!
//! - `connection/baseline`: the payload alone, straight to the inner service.
//! - `connection/v1`, `connection/v2`: a trusted peer sends a header, then the payload.
//! - `connection/untrusted_plain`: an untrusted peer sends the payload (the layer passes
//!   it on at once, unread).
//! - `parse/v1`, `parse/v2`, `parse/v2_tlvs`: `ProxyHeader::parse` on a buffer.

use std::future::Future;
use std::hint::black_box;
use std::io::Cursor;
use std::net::SocketAddr;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use aegis_core::{ClientAddr, Conn, Param};
use aegis_layers::proxy_protocol::{ProxyHeader, ProxyProtocolLayer};
use criterion::Criterion;
use tokio::io::{AsyncRead, AsyncReadExt};
use tower::{Layer, Service, service_fn};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A small MQTT CONNECT, the first thing a client sends.
const PAYLOAD: &[u8] = b"\x10\x1a\x00\x04MQTT\x04\x02\x00\x3c\x00\x0eclient-1234567";
const V1: &[u8] = b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 1883\r\n";

fn v2(tlvs: &[u8]) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n\x21\x11".to_vec();
    h.extend_from_slice(&u16::try_from(12 + tlvs.len()).unwrap().to_be_bytes());
    h.extend_from_slice(&[203, 0, 113, 7, 192, 0, 2, 1]);
    h.extend_from_slice(&51000u16.to_be_bytes());
    h.extend_from_slice(&1883u16.to_be_bytes());
    h.extend_from_slice(tlvs);
    h
}

/// Polls a future that must complete without waiting (all streams are in memory).
fn run<F: Future>(fut: F) -> F::Output {
    let mut fut = pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("an in-memory connection never waits"),
    }
}

/// The inner service: read the connection to its end, return the client address.
async fn inner<I: AsyncRead + Unpin + Param<ClientAddr>>(
    mut io: I,
) -> Result<SocketAddr, std::io::Error> {
    let mut buf = [0u8; 256];
    while io.read(&mut buf).await? > 0 {}
    Ok(Param::<ClientAddr>::param(&io).0)
}

fn main() {
    let trusted: SocketAddr = "10.1.2.3:40000".parse().unwrap();
    let untrusted: SocketAddr = "192.0.2.99:40000".parse().unwrap();
    let local: SocketAddr = "10.1.2.4:1883".parse().unwrap();
    let layer = ProxyProtocolLayer::new(["10.0.0.0/8".parse().unwrap()]);
    let v2_plain = v2(&[]);
    let v2_tlvs = v2(b"\x02\x00\x0cmqtt.example\xea\x00\x17\x01vpce-0123456789abcdef0");
    let with = |h: &[u8]| [h, PAYLOAD].concat();
    let (conn_v1, conn_v2) = (with(V1), with(&v2_plain));

    let mut c = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();

    let mut g = c.benchmark_group("connection");
    g.bench_function("baseline", |b| {
        let mut svc = service_fn(inner::<Conn<Cursor<&[u8]>>>);
        b.iter(|| {
            let conn = Conn::new(Cursor::new(black_box(PAYLOAD)), untrusted, local);
            run(svc.call(conn)).unwrap()
        });
    });
    for (name, bytes, peer) in [
        ("v1", &conn_v1[..], trusted),
        ("v2", &conn_v2[..], trusted),
        ("untrusted_plain", PAYLOAD, untrusted),
    ] {
        g.bench_function(name, |b| {
            let mut svc = layer.layer(service_fn(inner));
            b.iter(|| {
                run(std::future::poll_fn(|cx| svc.poll_ready(cx))).unwrap();
                let conn = Conn::new(Cursor::new(black_box(bytes)), peer, local);
                run(svc.call(conn)).unwrap()
            });
        });
    }
    g.finish();

    let mut g = c.benchmark_group("parse");
    for (name, bytes) in [("v1", V1), ("v2", &v2_plain[..]), ("v2_tlvs", &v2_tlvs[..])] {
        g.bench_function(name, |b| {
            b.iter(|| {
                ProxyHeader::parse(black_box(bytes), 512)
                    .unwrap()
                    .unwrap()
                    .1
            });
        });
    }
    g.finish();
    c.final_summary();
}
