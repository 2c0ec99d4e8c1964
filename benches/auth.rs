//! The auth layer's check: a cache hit, and a cache miss against a local hyper HTTP
//! service on loopback.
//!
//! ```text
//! cargo bench -p benches --bench auth
//! ```
//!
//! - **Hit**: `AuthLayer::check` of credentials already cached (key digest, lock, lookup),
//!   polled once with a no-op waker, as criterion's median and as an hdrhistogram P99
//!   over 200,000 checks timed one by one. Goal: P99 under 10 µs.
//! - **Miss**: `AuthLayer::check` through `HttpAuth` to a hyper HTTP/1 service on
//!   127.0.0.1 that answers 200 at once; every check has a new client id, so each one is
//!   a callout (a POST over a pooled keep-alive connection). An hdrhistogram P99 over
//!   2,000 sequential checks, after 200 of warm-up. Goal: P99 under 10 ms.

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::net::SocketAddr;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use aegis_mqtt::auth::{AuthLayer, Credentials, Decision, HttpAuth};
use criterion::Criterion;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tower::service_fn;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const HIT_SAMPLES: u64 = 200_000;
const MISS_SAMPLES: u64 = 2_000;
const MISS_WARM_UP: u64 = 200;

fn creds(id: &str, addr: SocketAddr) -> Credentials {
    Credentials::new(id, Some("alice"), Some(b"secret"), addr)
}

/// Polls `fut` once: a cache hit is ready at once.
fn poll_once<F: Future>(fut: F) -> F::Output {
    let mut cx = Context::from_waker(Waker::noop());
    match pin!(fut).poll(&mut cx) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("a cache hit is ready at once"),
    }
}

fn percentiles(name: &str, h: &Histogram<u64>, unit: &str, div: f64) {
    println!(
        "auth {name}: n = {}, p50 = {:.2} {unit}, p99 = {:.2} {unit}, p99.9 = {:.2} {unit}, max = {:.2} {unit}",
        h.len(),
        h.value_at_quantile(0.50) as f64 / div,
        h.value_at_quantile(0.99) as f64 / div,
        h.value_at_quantile(0.999) as f64 / div,
        h.max() as f64 / div,
    );
}

/// A hyper HTTP/1 service on loopback answering 200 to every request.
async fn serve() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            stream.set_nodelay(true).unwrap();
            let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                let _ = req.into_body().collect().await;
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

fn main() {
    let peer: SocketAddr = "192.0.2.1:4000".parse().unwrap();
    let mut c = Criterion::default()
        .sample_size(50)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();

    // Hit: an authenticator that allows everyone, and one cached entry.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let allow = service_fn(|_: Credentials| async { Ok::<_, Infallible>(Decision::Allow) });
    let layer = AuthLayer::new(allow);
    let cached = creds("c1", peer);
    assert_eq!(
        rt.block_on(layer.check(cached.clone())).unwrap(),
        Decision::Allow
    );
    c.bench_function("auth/check_cache_hit", |b| {
        b.iter(|| poll_once(layer.check(black_box(cached.clone()))));
    });
    let mut hit = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
    for _ in 0..HIT_SAMPLES {
        let start = Instant::now();
        let d = poll_once(layer.check(black_box(cached.clone())));
        let ns = Instant::now().saturating_duration_since(start).as_nanos();
        black_box(d).unwrap();
        hit.record(u64::try_from(ns).unwrap_or(u64::MAX).max(1))
            .unwrap();
    }
    percentiles("cache hit", &hit, "µs", 1_000.0);

    // Miss: a new client id for every check, against the local hyper service.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let miss = rt.block_on(async {
        let addr = serve().await;
        let url = format!("http://{addr}/auth").parse().unwrap();
        let layer = AuthLayer::new(HttpAuth::new(url)).max_entries(MISS_SAMPLES as usize);
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
        for i in 0..MISS_WARM_UP + MISS_SAMPLES {
            let creds = creds(&format!("miss-{i}"), peer);
            let start = Instant::now();
            let d = layer.check(creds).await;
            let ns = Instant::now().saturating_duration_since(start).as_nanos();
            assert_eq!(d.unwrap(), Decision::Allow);
            if i >= MISS_WARM_UP {
                h.record(u64::try_from(ns).unwrap_or(u64::MAX).max(1))
                    .unwrap();
            }
        }
        h
    });
    percentiles("cache miss (HTTP, loopback)", &miss, "ms", 1_000_000.0);

    c.final_summary();
}
