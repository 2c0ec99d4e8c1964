//! CPU added per connection by the slowloris layer, against the same service without it,
//! in one run.
//!
//! ```text
//! cargo bench -p benches --bench slowloris
//! ```
//!
//! Each iteration is one whole connection over an in-memory `tokio::io::duplex`: the
//! service reads a 16-byte greeting, completes the handshake and ends.
//!
//! - `client_waits`: the client writes only after the service has polled once and found
//!   nothing, so the layer arms its timer, then sees the first byte and the end of the
//!   handshake, and drops the timer (the usual path of a real connection).
//! - `data_ready`: the greeting is already buffered, so the service ends on its first
//!   poll and the layer never arms its timer (its floor: three small allocations).
//!
//! Wall-clock figures are noisy on a shared machine. For instruction counts, run one
//! variant alone under callgrind, with `N` and `2 N` connections, and divide the
//! difference of the totals by `N` (which removes the start-up cost):
//!
//! ```text
//! cargo bench -p benches --bench slowloris --no-run   # prints the binary's path
//! AEGIS_BENCH_SLOWLORIS_ONLY=slowloris/client_waits AEGIS_BENCH_SLOWLORIS_N=10000 \
//!     valgrind --tool=callgrind --callgrind-out-file=/dev/null target/release/deps/slowloris-HASH
//! ```
//!
//! (`baseline`, `tokio_timeout` or `slowloris`, then `/client_waits` or `/data_ready`;
//! each timed connection follows one untimed baseline connection, as in the groups.)
//!
//! The layer runs with every handshake clock on (first byte, idle, total, minimum rate)
//! and the idle clock after the handshake. The difference between `slowloris` and
//! `baseline` in a group is the layer's cost per connection; `tokio_timeout` (the
//! service under a plain `tokio::time::timeout`) shows how much of it any timer costs.

use std::net::SocketAddr;
use std::time::Duration;

use aegis_core::{Conn, Handshake, Param};
use aegis_layers::slowloris::{MinRate, SlowlorisLayer};
use criterion::Criterion;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt, service_fn};

const GREETING: &[u8; 16] = b"\x10\x0e\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x00\x00";

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Reads the greeting, ends the handshake and closes: the inner service in both cases.
async fn greet<I: AsyncRead + Param<Handshake> + Unpin>(mut io: I) -> std::io::Result<()> {
    let mut buf = [0; GREETING.len()];
    io.read_exact(&mut buf).await?;
    Param::<Handshake>::param(&io).complete();
    Ok(())
}

/// One whole connection: the client writes the greeting, the service reads it and ends.
async fn connection<S>(svc: &S, client_waits: bool)
where
    S: Service<Conn<DuplexStream>, Response = ()> + Clone,
    S::Error: std::fmt::Debug,
{
    let peer = SocketAddr::from(([192, 0, 2, 7], 40000));
    let local = SocketAddr::from(([127, 0, 0, 1], 1883));
    let (mut client, server) = tokio::io::duplex(64);
    let served = svc.clone().oneshot(Conn::new(server, peer, local));
    if client_waits {
        let client = async move {
            tokio::task::yield_now().await; // let the service find nothing first
            client.write_all(GREETING).await.unwrap();
            client
        };
        let (served, _client) = tokio::join!(served, client);
        served.unwrap();
    } else {
        client.write_all(GREETING).await.unwrap();
        served.await.unwrap();
    }
}

/// Times `iters` connections of `svc`, each after one untimed connection of `pace`, so
/// that every variant runs under the same mix of work (and the same load from the
/// rest of the machine) and only its own connections are counted.
async fn connections<S, P>(iters: u64, svc: &S, pace: &P, client_waits: bool) -> Duration
where
    S: Service<Conn<DuplexStream>, Response = ()> + Clone,
    S::Error: std::fmt::Debug,
    P: Service<Conn<DuplexStream>, Response = ()> + Clone,
    P::Error: std::fmt::Debug,
{
    let mut took = Duration::ZERO;
    for _ in 0..iters {
        connection(pace, client_waits).await;
        let start = Instant::now();
        connection(svc, client_waits).await;
        took += Instant::now().saturating_duration_since(start);
    }
    took
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let layer = SlowlorisLayer::new()
        .first_byte_timeout(Duration::from_secs(5))
        .idle_timeout(Duration::from_secs(10))
        .handshake_timeout(Duration::from_secs(40))
        .min_rate(MinRate::new(500, Duration::from_secs(20)))
        .idle_timeout_after_handshake(Duration::from_secs(300));
    let bare = service_fn(greet::<Conn<DuplexStream>>);
    let guarded = layer.layer(service_fn(greet));
    // For scale: the same service under a plain `tokio::time::timeout`.
    let timed = service_fn(|io: Conn<DuplexStream>| async move {
        tokio::time::timeout(Duration::from_secs(40), greet(io))
            .await
            .map_err(std::io::Error::from)?
    });

    // Instruction counts, which the machine's load does not disturb (see the top).
    if let Ok(which) = std::env::var("AEGIS_BENCH_SLOWLORIS_ONLY") {
        let n: u64 =
            std::env::var("AEGIS_BENCH_SLOWLORIS_N").map_or(20_000, |n| n.parse().unwrap());
        let (variant, group) = which.split_once('/').expect("variant/group");
        let client_waits = group == "client_waits";
        rt.block_on(async {
            match variant {
                "baseline" => connections(n, &bare, &bare, client_waits).await,
                "tokio_timeout" => connections(n, &timed, &bare, client_waits).await,
                "slowloris" => connections(n, &guarded, &bare, client_waits).await,
                _ => panic!("unknown variant {variant}"),
            }
        });
        return;
    }

    let mut c = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .configure_from_args();
    for (group, client_waits) in [("client_waits", true), ("data_ready", false)] {
        let mut g = c.benchmark_group(format!("slowloris_per_connection/{group}"));
        g.bench_function("baseline", |b| {
            b.iter_custom(|iters| rt.block_on(connections(iters, &bare, &bare, client_waits)));
        });
        g.bench_function("tokio_timeout", |b| {
            b.iter_custom(|iters| rt.block_on(connections(iters, &timed, &bare, client_waits)));
        });
        g.bench_function("slowloris", |b| {
            b.iter_custom(|iters| rt.block_on(connections(iters, &guarded, &bare, client_waits)));
        });
        g.finish();
    }
    c.final_summary();
}
