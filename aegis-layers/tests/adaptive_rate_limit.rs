//! The adaptive controller drives the rate limiter's runtime handle.
#![cfg(all(feature = "adaptive", feature = "rate-limit"))]

use std::num::NonZeroU32;
use std::time::Duration;

use aegis_layers::adaptive::{GlobalRate, PerClientRate, RateConfig};
use aegis_layers::rate_limit::{Quota, RateLimitLayer};
use tower::{Layer, ServiceExt, service_fn};

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn rising_latency_lowers_the_limiters_global_rate_and_recovery_raises_it() {
    let limiter = RateLimitLayer::builder()
        .global(Quota::per_second(NonZeroU32::new(1000).unwrap()))
        .build();
    let handle = limiter.handle();
    let control = RateConfig::new(Duration::from_millis(100), 10.0, 1000.0)
        .interval(Duration::from_secs(1))
        .min_samples(3)
        .spawn(GlobalRate(handle.clone()));
    // The controller's first value reaches the limiter at once.
    tokio::task::yield_now().await;
    assert_eq!(
        handle.global().unwrap().replenish_interval(),
        Duration::from_millis(1)
    );

    let slow = control.layer().layer(service_fn(|()| async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok::<_, std::io::Error>(())
    }));
    for _ in 0..3 {
        slow.clone().oneshot(()).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // P95 of 300 ms is over the 100 ms threshold: 1000/s x 0.8.
    assert!(
        (control.value() - 800.0).abs() < 1e-9,
        "{}",
        control.value()
    );
    let interval = handle.global().unwrap().replenish_interval();
    assert_eq!(interval, Duration::from_secs(1) / 800);

    // Fast calls for the next windows: the rate recovers (x 1.1) after the hold.
    let fast = control.layer().layer(service_fn(|()| async {
        tokio::time::sleep(Duration::from_millis(5)).await;
        Ok::<_, std::io::Error>(())
    }));
    for _ in 0..3 {
        for _ in 0..5 {
            fast.clone().oneshot(()).await.unwrap();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(
        control.value() > 800.0,
        "rate did not recover: {}",
        control.value()
    );
    // The limiter follows the controller: its interval is one second over the rate.
    let interval = handle.global().unwrap().replenish_interval().as_secs_f64();
    assert!((1.0 / interval - control.value().round()).abs() < 0.5);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn per_client_sink_sets_the_per_client_tier() {
    let limiter = RateLimitLayer::builder().build();
    let handle = limiter.handle();
    assert!(handle.per_client().is_none());
    let _control = RateConfig::new(Duration::from_millis(100), 5.0, 50.0)
        .initial_rate(20.0)
        .spawn(PerClientRate(handle.clone()));
    tokio::task::yield_now().await;
    let q = handle.per_client().expect("the sink turns the tier on");
    assert_eq!(q.replenish_interval(), Duration::from_millis(50));
}
