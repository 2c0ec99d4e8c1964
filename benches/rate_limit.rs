//! The rate-limiting layer: cost per connection against the bare service, the keyed
//! limiter's decision with 1 and with 1,000,000 keys, and state memory per key.
//!
//! ```text
//! cargo bench -p benches --bench rate_limit
//! ```
//!
//! - **Per connection**: one `call` and one poll of its (ready) future, through a
//!   `service_fn` that does nothing, bare and behind `RateLimitLayer` with all three tiers
//!   on (quotas so high nothing is refused, so every tier does its full work). Peers
//!   rotate over 1,024 addresses.
//! - **Decision**: `KeyedLimiter::check` on one key, and on keys drawn in a scattered
//!   order from 1,000,000 tracked keys (cache misses included).
//! - **Memory per key**: RSS growth of this process while 1,000,000 client keys are
//!   inserted, divided by the count, measured first thing so nothing else is allocated in
//!   between.

use std::future::Future;
use std::hint::black_box;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use aegis_core::{BoxError, Conn};
use aegis_layers::rate_limit::{ClientKey, KeyBy, KeyedLimiter, Quota, RateLimitLayer};
use criterion::Criterion;
use tower::{Layer, Service, service_fn};

const KEYS: u32 = 1_000_000;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Inside a runtime, so the limiters start their eviction task once, as in a server.
    let _guard = rt.enter();
    let unlimited = Quota::per_second(NonZeroU32::MAX);

    let before = rss_bytes();
    let many = KeyedLimiter::new(unlimited, 2 * KEYS as usize, "bench");
    for i in 0..KEYS {
        many.check(&key(i)).unwrap();
    }
    let per_key = (rss_bytes() - before) as f64 / f64::from(KEYS);
    assert_eq!(many.len(), KEYS as usize);

    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();

    let mut g = c.benchmark_group("rate_limit_per_connection");
    let bare = service_fn(|_: Conn<()>| async { Ok::<_, BoxError>(()) });
    g.bench_function("bare", |b| per_connection(b, bare));
    let layer = RateLimitLayer::builder()
        .global(unlimited)
        .per_client(unlimited)
        .max_concurrent_per_client(u32::MAX)
        .build();
    g.bench_function("rate_limited", |b| per_connection(b, layer.layer(bare)));
    g.finish();

    let mut g = c.benchmark_group("rate_limit_decision");
    let one = KeyedLimiter::new(unlimited, 10, "bench_one");
    g.bench_function("1_key", |b| {
        b.iter(|| one.check(black_box(&key(1))).is_ok())
    });
    let mut i: u32 = 0;
    g.bench_function("1M_keys", |b| {
        b.iter(|| {
            // A stride coprime with 1,000,000 visits every key in a scattered order.
            i = (i + 7_919) % KEYS;
            // The key is computed, not read from a list: a list read would add a cache
            // miss of the benchmark's own.
            many.check(black_box(&key(i))).is_ok()
        });
    });
    g.finish();
    c.final_summary();

    println!(
        "\nstate memory per tracked key ({KEYS} keys, RSS growth while inserting): \
         {per_key:.1} bytes (an entry is size_of::<(ClientKey, u64)>() = {} bytes plus one \
         control byte, in hash tables kept at most 7/8 full)",
        size_of::<(ClientKey, u64)>(),
    );
}

/// Rotating peers, as from a realistic mix of clients.
fn key(i: u32) -> ClientKey {
    KeyBy::default().key(IpAddr::V6(Ipv6Addr::from(u128::from(i) << 64)))
}

fn per_connection<S>(b: &mut criterion::Bencher<'_>, mut svc: S)
where
    S: Service<Conn<()>, Response = (), Error = BoxError>,
{
    let local: SocketAddr = "127.0.0.1:1883".parse().unwrap();
    let peers: Vec<SocketAddr> = (0..1024_u32)
        .map(|i| SocketAddr::new(IpAddr::from((0x0a00_0000 + i).to_be_bytes()), 40_000))
        .collect();
    let mut cx = Context::from_waker(Waker::noop());
    let mut n = 0;
    b.iter(|| {
        n = (n + 1) % peers.len();
        assert!(svc.poll_ready(&mut cx).is_ready());
        let fut = pin!(svc.call(Conn::new((), peers[n], local)));
        match fut.poll(&mut cx) {
            Poll::Ready(r) => r.unwrap(),
            Poll::Pending => unreachable!("the inner service is ready at once"),
        }
    });
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}
