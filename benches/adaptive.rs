//! Adaptive control: cost per call of latency recording against the bare service.
//!
//! ```text
//! cargo bench -p benches --bench adaptive
//! ```
//!
//! - **bare**: `poll_ready`, `call` and one poll of the (ready) future of a
//!   `service_fn` that does nothing.
//! - **recorded**: the same behind the `AdaptiveLayer` of a running rate-mode
//!   controller: two clock reads, the classifier, and one histogram record under the
//!   window's lock per call. The controller's interval is long, so its rotations do not
//!   land in the measurement.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use aegis_core::BoxError;
use aegis_layers::adaptive::RateConfig;
use criterion::Criterion;
use tower::{Layer, Service, service_fn};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();

    let mut g = c.benchmark_group("adaptive_per_call");
    let bare = service_fn(|()| async { Ok::<_, BoxError>(()) });
    g.bench_function("bare", |b| per_call(b, bare));
    let control = RateConfig::new(Duration::from_millis(100), 10.0, 1000.0)
        .interval(Duration::from_secs(3600))
        .spawn(|_| {});
    g.bench_function("recorded", |b| per_call(b, control.layer().layer(bare)));
    g.finish();
    c.final_summary();
}

fn per_call<S>(b: &mut criterion::Bencher<'_>, mut svc: S)
where
    S: Service<(), Response = (), Error = BoxError>,
{
    let mut cx = Context::from_waker(Waker::noop());
    b.iter(|| {
        assert!(svc.poll_ready(&mut cx).is_ready());
        let fut = pin!(svc.call(()));
        match fut.poll(&mut cx) {
            Poll::Ready(r) => r.unwrap(),
            Poll::Pending => unreachable!("the inner service is ready at once"),
        }
    });
}
