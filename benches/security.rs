//! The cost of a ban's pass over the open connections (`Security::ban` with
//! `close_on_ban`, the default, closes the open connections it matches): one manual ban
//! of an address that no open connection has, then its lifting (`Security::unban`), with
//! 0, 1,000 and 9,000 connections open under the `SecurityLayer` (from as many
//! addresses, their CONNECT not read yet), and with `close_on_ban(false)`, which keeps
//! no open connections and makes no pass, and 9,000 open.
//!
//! ```text
//! cargo bench -p benches --bench security
//! ```
//!
//! The difference between `open_9000` and `open_0` is the pass; `open_9000` against
//! `no_close_on_ban_9000` shows the same. A ban by the anomaly detector makes the same
//! pass (and a client id or username ban takes each connection's lock of its names as
//! well; an address ban, measured here, does not).
//!
//! Then what checking a new connection's address costs with 0 bans, with 1,000 bans of
//! one prefix length, and with 1,000 bans spread over four lengths (/32, /24, /16, /8):
//! the ban table makes one lookup per length in use.

use std::hint::black_box;
use std::io;
use std::time::Duration;

use aegis_core::Conn;
use aegis_mqtt::security::{BanKey, Security};
use criterion::Criterion;
use tokio::io::DuplexStream;
use tower::{Layer, Service, service_fn};

/// `n` connections open under `sec`'s layer: their futures, kept and never polled (the
/// layer keeps a connection from its call until its future drops).
fn open(sec: &Security, n: usize) -> Vec<impl Future + use<>> {
    let mut svc = sec.layer().layer(service_fn(|_: Conn<DuplexStream>| {
        std::future::pending::<Result<(), io::Error>>()
    }));
    let local = "127.0.0.1:1883".parse().unwrap();
    (0..n)
        .map(|i| {
            let (_client, server) = tokio::io::duplex(64);
            let peer = format!("10.{}.{}.{}:4000", i / 62_500, (i / 250) % 250, i % 250 + 1);
            svc.call(Conn::new(server, peer.parse().unwrap(), local))
        })
        .collect()
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    let key = BanKey::addr("192.0.2.7".parse().unwrap());
    let ban = |sec: &Security| {
        sec.ban(black_box(key.clone()), Duration::from_secs(60));
        assert!(sec.unban(&key));
    };

    let mut g = c.benchmark_group("security_ban_and_unban");
    for n in [0, 1_000, 9_000] {
        let sec = Security::default();
        let conns = open(&sec, n);
        assert_eq!(sec.open_connections(), n);
        g.bench_function(format!("open_{n}"), |b| b.iter(|| ban(&sec)));
        drop(conns);
        assert_eq!(sec.open_connections(), 0);
    }
    let sec = Security::builder().close_on_ban(false).build();
    let conns = open(&sec, 9_000);
    g.bench_function("no_close_on_ban_9000", |b| b.iter(|| ban(&sec)));
    drop(conns);
    g.finish();

    // What a connection's address check costs (`refuse_banned`, as the accept loop runs
    // it; the layer's check is the same lookup) for an address no ban holds: one hash
    // lookup per prefix length among the network bans, none while nothing is banned.
    let mut g = c.benchmark_group("security_check_unbanned_address");
    // No ban below holds it: the /8 bans end at 250.0.0.0/8.
    let peer = "254.0.0.7:4000".parse().unwrap();
    for (name, lengths) in [
        ("bans_0", &[][..]),
        ("bans_1000_1_length", &[32][..]),
        ("bans_1000_4_lengths", &[32, 24, 16, 8][..]),
    ] {
        let sec = Security::default();
        let per_length = 1_000 / lengths.len().max(1) as u32;
        for &len in lengths {
            // Distinct networks: the k-th of each length is k + 1 in its prefix bits.
            for k in 1..=per_length {
                let ip = std::net::Ipv4Addr::from_bits(k << (32 - u32::from(len)));
                let net = aegis_core::ClientKey::new(ip.into(), len).unwrap();
                sec.ban(BanKey::Addr(net), Duration::from_secs(600));
            }
        }
        assert_eq!(sec.bans().len(), lengths.len() * per_length as usize);
        g.bench_function(name, |b| {
            b.iter(|| sec.refuse_banned(black_box(peer)).unwrap())
        });
    }
    g.finish();
    c.final_summary();
}
