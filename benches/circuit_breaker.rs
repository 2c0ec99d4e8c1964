//! The circuit breaker: cost per call of a closed breaker against the bare service, and
//! of failing fast while open.
//!
//! ```text
//! cargo bench -p benches --bench circuit_breaker
//! ```
//!
//! - **bare**: `poll_ready`, `call` and one poll of the (ready) future of a
//!   `service_fn` that does nothing.
//! - **closed**: the same behind a closed `CircuitBreakerLayer` with both trips on
//!   (consecutive failures and a failure-rate window), so every call takes the fast
//!   admission path and records its outcome under the circuit's lock.
//! - **closed_consecutive_only**: the default breaker (5 consecutive failures, no
//!   window): a success on a healthy backend skips the lock.
//! - **open**: a forced-open breaker: the call fails fast with a counted `CircuitOpen`
//!   rejection (two small allocations, no recorder installed).

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use aegis_core::BoxError;
use aegis_layers::circuit_breaker::CircuitBreakerLayer;
use criterion::Criterion;
use tower::{Layer, Service, service_fn};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();

    let mut g = c.benchmark_group("circuit_breaker_per_call");
    let bare = service_fn(|()| async { Ok::<_, BoxError>(()) });
    g.bench_function("bare", |b| per_call(b, bare, true));
    let closed = CircuitBreakerLayer::builder("bench")
        .consecutive_failures(Some(5))
        .failure_rate(0.5, 100, 20)
        .build();
    g.bench_function("closed", |b| per_call(b, closed.layer(bare), true));
    let consecutive = CircuitBreakerLayer::builder("bench_consecutive").build();
    g.bench_function("closed_consecutive_only", |b| {
        per_call(b, consecutive.layer(bare), true)
    });
    let open = CircuitBreakerLayer::builder("bench_open").build();
    open.handle().force_open();
    g.bench_function("open_fail_fast", |b| per_call(b, open.layer(bare), false));
    g.finish();
    c.final_summary();
}

fn per_call<S>(b: &mut criterion::Bencher<'_>, mut svc: S, ok: bool)
where
    S: Service<(), Response = (), Error = BoxError>,
{
    let mut cx = Context::from_waker(Waker::noop());
    b.iter(|| {
        assert!(svc.poll_ready(&mut cx).is_ready());
        let fut = pin!(svc.call(()));
        match fut.poll(&mut cx) {
            Poll::Ready(r) => assert_eq!(r.is_ok(), ok),
            Poll::Pending => unreachable!("the inner service is ready at once"),
        }
    });
}
