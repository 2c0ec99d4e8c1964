//! The adaptive controller drives the rate limiter's runtime handle.
#![cfg(all(feature = "adaptive", feature = "rate-limit"))]

use std::io;
use std::num::NonZeroU32;
use std::time::Duration;

use aegis_core::Conn;
use aegis_layers::adaptive::{GlobalRate, PerClientRate, RateConfig};
use aegis_layers::rate_limit::{Quota, RateLimitLayer};
use tokio::time::{Instant, sleep, sleep_until};
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

/// Runs `cfg` (a floor of 5/s) driving a real limiter's global rate, which admits what
/// the controller publishes out of a steady demand of 50 connections a second, around a
/// healthy 10 ms backend; returns the rate after each of the first `intervals` decisions.
async fn rate_under_steady_demand(cfg: RateConfig, intervals: u32) -> Vec<f64> {
    let nz = |n| NonZeroU32::new(n).unwrap();
    let limiter = RateLimitLayer::builder()
        .global(Quota::per_second(nz(5)).allow_burst(nz(1)))
        .build();
    let control = cfg.initial_rate(5.0).spawn(GlobalRate(limiter.handle()));
    let svc = limiter.layer(control.layer().layer(service_fn(|_: Conn<()>| async {
        sleep(Duration::from_millis(10)).await;
        Ok::<_, io::Error>(())
    })));
    let (peer, local) = (
        "192.0.2.1:40000".parse().unwrap(),
        "127.0.0.1:1883".parse().unwrap(),
    );
    let t0 = Instant::now();
    let mut seen = Vec::new();
    for i in 1..=intervals * 50 {
        let svc = svc.clone();
        // Refused connections are fine: the limiter admits what the controller allows.
        tokio::spawn(async move { svc.oneshot(Conn::new((), peer, local)).await });
        sleep_until(t0 + Duration::from_millis(20 * u64::from(i))).await;
        if i % 50 == 0 {
            sleep(Duration::from_millis(1)).await; // just after the decision
            seen.push(control.value());
        }
    }
    let q = limiter.handle().global().unwrap();
    let published = 1.0 / q.replenish_interval().as_secs_f64();
    assert!(
        (published - control.value()).abs() < 0.5,
        "the limiter follows"
    );
    seen
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_rate_controller_at_its_floor_climbs_off_it_when_the_backend_is_healthy() {
    // The default minimum of 20 samples: at 5/s two windows hold at most 10, and with
    // two windows the rate held at the floor for good while demand stayed above it.
    let seen =
        rate_under_steady_demand(RateConfig::new(Duration::from_millis(100), 5.0, 100.0), 10).await;
    let off = seen.iter().position(|&r| r > 5.0).expect("off the floor");
    assert!(
        off < 5,
        "off the floor after {} intervals: {seen:?}",
        off + 1
    );
    assert!(seen[9] > seen[off], "still climbing: {seen:?}");

    // A minimum the floor cannot reach even over the eight windows a measurement may
    // span: once there are eight, the samples there are still raise the rate (they may
    // only raise it).
    let seen = rate_under_steady_demand(
        RateConfig::new(Duration::from_millis(100), 5.0, 100.0).min_samples(1000),
        10,
    )
    .await;
    assert_eq!(seen[..7], [5.0; 7], "waits for eight windows: {seen:?}");
    assert!(seen[7] > 5.0, "{seen:?}");
    assert!(seen[9] > seen[7], "{seen:?}");
}
