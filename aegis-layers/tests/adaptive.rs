//! Adaptive control: the rate law with hysteresis and clamps, minimum samples, ignored
//! rejections and cancellations, the gradient mode, the controller's lifetime, metrics.
#![cfg(feature = "adaptive")]

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use aegis_core::error::{Reject, reject};
use aegis_core::metrics::testing::{capture, run, run_watching};
use aegis_layers::adaptive::{
    ADAPTIVE_DECISIONS_TOTAL, ADAPTIVE_LIMIT, ADAPTIVE_MIN_RTT_SECONDS, ADAPTIVE_P95_SECONDS,
    ADAPTIVE_RATE, AdaptiveHandle, Classify, Direction, GradientConfig, MAX_THRESHOLD, RateConfig,
    Sample, SuccessOrTimeout,
};
use parking_lot::Mutex;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, sleep_until};
use tower::{Layer, ServiceExt, service_fn};

const SEC: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
#[error("rejected by a layer below")]
struct Shed;
impl Reject for Shed {
    fn layer(&self) -> &'static str {
        "test"
    }
    fn label(&self) -> &'static str {
        "shed"
    }
}

// A concrete error type rather than `BoxError`: a `BoxError` inner error inside
// `tokio::spawn` hits rustc's "implementation of `From` is not general enough" (the same
// happens with tower's own `E: Into<BoxError>` futures).
#[derive(Debug, thiserror::Error)]
enum TestError {
    #[error("shed")]
    Shed(#[source] aegis_core::error::Rejected),
    #[error("io")]
    Io(#[source] io::Error),
}

/// What one test call does.
#[derive(Debug, Clone, Copy)]
enum Call {
    /// Answers after the backend's current latency.
    Ok,
    /// Answers after 500 ms with a rejection.
    SlowReject,
    /// Answers after 500 ms with an ordinary error.
    SlowError,
    /// Takes 500 ms but is cancelled by the caller after 20 ms.
    Cancelled,
}

/// What the controller publishes, which the test traffic must stay under: a controller
/// only ever sees the calls its own limit lets through.
#[derive(Debug, Clone, Copy)]
enum Published {
    /// Rate mode: calls a second. A burst must fit in one second at the current rate
    /// (each test sends at most one burst's worth a second).
    Rate,
    /// Gradient mode: calls in flight at once.
    Concurrency,
}

/// Fires `n` calls of `kind` through `handle`'s layer around a backend whose latency is
/// `latency_ms`, at once but under the `published` limit, and waits for all of them.
#[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)] // small numbers
#[allow(clippy::cast_sign_loss)]
async fn burst(
    handle: &AdaptiveHandle,
    published: Published,
    latency_ms: &Arc<AtomicU64>,
    kind: Call,
    n: usize,
) {
    // Before, bursts ignored the limit: a gradient test fired 10 calls at once while the
    // limit was pinned to 2, and so never saw the limit cap its samples.
    let in_flight = match published {
        Published::Rate => {
            assert!(
                n as f64 <= handle.value(),
                "{n} calls are over the published rate {}",
                handle.value()
            );
            n
        }
        Published::Concurrency => handle.value().round() as usize,
    };
    let permits = Arc::new(tokio::sync::Semaphore::new(in_flight));
    let lat = Arc::clone(latency_ms);
    let svc = handle.layer().layer(service_fn(move |call: Call| {
        let ms = lat.load(Ordering::Relaxed);
        let (wait, result): (u64, Result<(), TestError>) = match call {
            Call::Ok => (ms, Ok(())),
            Call::SlowReject => (500, Err(TestError::Shed(reject(Shed)))),
            Call::SlowError | Call::Cancelled => {
                (500, Err(TestError::Io(io::ErrorKind::TimedOut.into())))
            }
        };
        async move {
            sleep(Duration::from_millis(wait)).await;
            result
        }
    }));
    let mut set = JoinSet::new();
    for _ in 0..n {
        let svc = svc.clone();
        let permits = Arc::clone(&permits);
        set.spawn(async move {
            let _permit = permits.acquire_owned().await.unwrap();
            let fut = svc.oneshot(kind);
            if matches!(kind, Call::Cancelled) {
                assert!(
                    tokio::time::timeout(Duration::from_millis(20), fut)
                        .await
                        .is_err()
                );
            } else {
                let _ = fut.await;
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
}

fn rate_log() -> (Arc<Mutex<Vec<f64>>>, impl Fn(f64) + Send + Sync + 'static) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let l = Arc::clone(&log);
    (log, move |r| l.lock().push(r))
}

fn assert_close(got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
    }
}

#[test]
fn rising_latency_drives_the_rate_down_not_twice_in_a_row_then_back_up_within_clamps() {
    run_watching(true, |snap| async move {
        let (log, sink) = rate_log();
        let t0 = Instant::now();
        let handle = RateConfig::new(Duration::from_millis(100), 600.0, 1000.0)
            .name("edge")
            .min_samples(5)
            .spawn(sink);
        let latency = Arc::new(AtomicU64::new(150));
        let mut values = Vec::new();
        for k in 1..=13u32 {
            if k == 7 {
                latency.store(50, Ordering::Relaxed); // recovered: under 0.7 x 100 ms
            }
            burst(&handle, Published::Rate, &latency, Call::Ok, 10).await;
            sleep_until(t0 + SEC * k + Duration::from_millis(10)).await;
            values.push(handle.value());
        }
        assert_close(
            &values,
            &[
                800.0, 800.0, // down, then hold: no two reductions in a row
                640.0, 640.0, // down, hold
                600.0, 600.0, // down to the floor (512 clamped), hold
                660.0, 726.0, 798.6, 878.46, 966.306, // up by 1.1
                1000.0, 1000.0, // clamped to the ceiling, then hold
            ],
        );
        // The sink saw the start and every change, nothing else.
        assert_close(
            &log.lock(),
            &[
                1000.0, 800.0, 640.0, 600.0, 660.0, 726.0, 798.6, 878.46, 966.306, 1000.0,
            ],
        );
        let m = capture(&snap);
        let dir = |d: Direction| {
            m.counter(
                ADAPTIVE_DECISIONS_TOTAL,
                &[("name", "edge"), ("direction", d.label())],
            )
        };
        assert_eq!(
            (
                dir(Direction::Down),
                dir(Direction::Hold),
                dir(Direction::Up)
            ),
            (3, 4, 6)
        );
        assert_eq!(m.gauge(ADAPTIVE_RATE), Some(1000.0));
        let p95 = m.gauge(ADAPTIVE_P95_SECONDS).unwrap();
        assert!((p95 - 0.050).abs() < 0.001, "p95 {p95}");
    });
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn decisions_wait_for_the_minimum_sample_count_over_two_windows() {
    let (log, sink) = rate_log();
    // Also: a shared `Arc<dyn Fn(f64)>` is a sink.
    let sink: Arc<dyn Fn(f64) + Send + Sync> = Arc::new(sink);
    let t0 = Instant::now();
    let handle = RateConfig::new(Duration::from_millis(100), 10.0, 1000.0)
        .min_samples(5)
        .spawn(sink);
    let latency = Arc::new(AtomicU64::new(300));
    // 2 samples, then 2 more: 4 over two windows, still fewer than 5.
    for k in 1..=2u32 {
        burst(&handle, Published::Rate, &latency, Call::Ok, 2).await;
        sleep_until(t0 + SEC * k + Duration::from_millis(10)).await;
        assert_close(&[handle.value()], &[1000.0]); // held with too few samples
    }
    // 3 more: this window and the one before make 5.
    burst(&handle, Published::Rate, &latency, Call::Ok, 3).await;
    sleep_until(t0 + SEC * 3 + Duration::from_millis(10)).await;
    assert_close(&[handle.value()], &[800.0]);
    assert_close(&log.lock(), &[1000.0, 800.0]);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn rejected_and_cancelled_calls_are_not_samples() {
    let t0 = Instant::now();
    let handle = RateConfig::new(Duration::from_millis(100), 10.0, 1000.0)
        .min_samples(5)
        .initial_rate(500.0)
        .spawn(|_| {});
    let latency = Arc::new(AtomicU64::new(10));
    // 5 fast answers, and 20 slow rejections and 20 slow cancelled calls: if either were
    // recorded, P95 would be 500 ms and the rate would go down.
    burst(&handle, Published::Rate, &latency, Call::Ok, 5).await;
    burst(&handle, Published::Rate, &latency, Call::SlowReject, 20).await;
    burst(&handle, Published::Rate, &latency, Call::Cancelled, 20).await;
    sleep_until(t0 + SEC + Duration::from_millis(10)).await;
    assert_close(&[handle.value()], &[550.0]); // only the fast answers count: up

    // Control: ordinary slow errors are samples (a timing-out backend is slow).
    burst(&handle, Published::Rate, &latency, Call::Ok, 5).await;
    burst(&handle, Published::Rate, &latency, Call::SlowError, 20).await;
    sleep_until(t0 + SEC * 2 + Duration::from_millis(10)).await;
    assert_close(&[handle.value()], &[440.0]);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_rate_controller_with_too_few_samples_never_lowers_the_rate() {
    // Slow answers, but too few of them for a decision: no cut, and no raise either.
    let control = RateConfig::new(Duration::from_millis(100), 5.0, 100.0)
        .initial_rate(50.0)
        .min_samples(1000)
        .spawn(|_: f64| {});
    let t0 = Instant::now();
    for k in 1..=10 {
        control.record(Duration::from_millis(300));
        sleep_until(t0 + SEC * k + Duration::from_millis(1)).await;
    }
    assert!((control.value() - 50.0).abs() < 1e-9, "{}", control.value());
}

#[test]
fn gradient_math_follows_envoy() {
    let cfg = GradientConfig::new(5, 1000).buffer(0.0);
    let ms = Duration::from_millis;
    // Sample equal to min RTT: gradient 1, plus sqrt headroom.
    assert!((cfg.next_limit(100.0, ms(10), ms(10)) - 110.0).abs() < 1e-9);
    // Twice the min RTT: gradient 0.5 -> 50 + sqrt(50).
    assert!((cfg.next_limit(100.0, ms(10), ms(20)) - (50.0 + 50f64.sqrt())).abs() < 1e-9);
    // Gradient clamped to [0.5, 2.0].
    assert!((cfg.next_limit(100.0, ms(10), ms(1000)) - (50.0 + 50f64.sqrt())).abs() < 1e-9);
    assert!((cfg.next_limit(100.0, ms(10), ms(1)) - (200.0 + 200f64.sqrt())).abs() < 1e-9);
    // The buffer tolerates latency above min RTT: 10 ms x 1.25 / 12.5 ms = 1.
    let buffered = GradientConfig::new(3, 1000).buffer(0.25);
    assert!(
        (buffered.next_limit(100.0, ms(10), Duration::from_micros(12_500)) - 110.0).abs() < 1e-9
    );
    // Limits clamp.
    assert!((cfg.next_limit(900.0, ms(10), ms(1)) - 1000.0).abs() < 1e-9);
    assert!((cfg.next_limit(4.0, ms(10), ms(100)) - 5.0).abs() < 1e-9); // 2 + sqrt(2) < 5
}

/// A service faster than the histogram's microsecond measures 0: a minimum RTT of 0
/// made every later gradient 0.5 (and a sample of 0, 2.0). Both count as 1 us.
#[test]
fn rtts_under_a_microsecond_count_as_one() {
    let cfg = GradientConfig::new(1, 1000).buffer(0.0);
    let us = Duration::from_micros;
    // Gradient 1: 100 + sqrt(100).
    assert!((cfg.next_limit(100.0, us(0), us(1)) - 110.0).abs() < 1e-9);
    assert!((cfg.next_limit(100.0, us(0), us(0)) - 110.0).abs() < 1e-9);
    assert!((cfg.next_limit(100.0, us(1), us(0)) - 110.0).abs() < 1e-9);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_minimum_rtt_measured_as_zero_does_not_halve_the_limit() {
    let t0 = Instant::now();
    let handle = GradientConfig::new(1, 100)
        .initial_limit(10)
        .buffer(0.0)
        .min_samples(1)
        .min_rtt_samples(1)
        .spawn(|_: usize| {});
    handle.record(Duration::ZERO);
    sleep_until(t0 + SEC + Duration::from_millis(10)).await;
    assert_close(&[handle.value()], &[10.0]); // min RTT measured: 0, the limit is back
    handle.record(Duration::from_micros(1));
    sleep_until(t0 + SEC * 2 + Duration::from_millis(10)).await;
    // 1 us against a minimum of 1 us: gradient 1, 10 + sqrt(10); it was 0.5 (5 + sqrt(5)).
    assert_close(&[handle.value()], &[10.0 + 10f64.sqrt()]);
}

/// A gradient controller whose minimum RTT is due again after 500 ms, half its 1 s
/// interval: limit 10 (1 to 100), a step on every sample.
fn remeasuring_every_500ms() -> AdaptiveHandle {
    GradientConfig::new(1, 100)
        .initial_limit(10)
        .buffer(0.0)
        .min_samples(1)
        .min_rtt_samples(1)
        .min_rtt_interval(Duration::from_millis(500))
        .spawn(|_: usize| {})
}

/// With `min_rtt_interval <= interval`, every running interval started a new
/// measurement and no gradient step was ever taken (the limit pinned to `min_limit`
/// every other interval). At least one step now comes between two measurements.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_min_rtt_interval_shorter_than_the_interval_still_lets_the_gradient_step() {
    let t0 = Instant::now();
    let handle = remeasuring_every_500ms();
    let at = |k: u32| t0 + SEC * k + Duration::from_millis(10);
    let stepped = 10.0 + 10f64.sqrt(); // gradient 1
    handle.record(Duration::from_millis(10));
    sleep_until(at(1)).await;
    assert_close(&[handle.value()], &[10.0]); // measured; the limit is back
    handle.record(Duration::from_millis(10));
    sleep_until(at(2)).await;
    assert_close(&[handle.value()], &[stepped]); // one step, not a new measurement
    sleep_until(at(3)).await;
    assert_close(&[handle.value()], &[1.0]); // past min_rtt_interval: measuring, pinned
    handle.record(Duration::from_millis(10));
    sleep_until(at(4)).await;
    assert_close(&[handle.value()], &[stepped]); // measured; back
    handle.record(Duration::from_millis(10));
    sleep_until(at(5)).await;
    assert!(
        handle.value() > stepped,
        "stepped again: {}",
        handle.value()
    );
}

/// A tick that holds for want of samples is not the step a new measurement waits for:
/// with few calls per interval, the controller must still step between measurements.
#[tokio::test(start_paused = true)]
async fn a_tick_without_samples_is_not_the_step_before_a_new_measurement() {
    let t0 = Instant::now();
    let handle = remeasuring_every_500ms();
    let at = |k: u32| t0 + SEC * k + Duration::from_millis(10);
    handle.record(Duration::from_millis(10));
    sleep_until(at(1)).await;
    assert_close(&[handle.value()], &[10.0]); // measured; the limit is back
    sleep_until(at(2)).await;
    assert_close(&[handle.value()], &[10.0]); // no sample: held
    handle.record(Duration::from_millis(10));
    sleep_until(at(3)).await;
    // The step, not a new measurement (which would pin the limit at 1).
    assert_close(&[handle.value()], &[10.0 + 10f64.sqrt()]);
}

/// A tick far behind its schedule (a tiny interval, a stalled runtime) skips the missed
/// ticks in one step: it used to count them one by one, lateness / interval times (here
/// a billion, some seconds of a spinning task). The controller runs on a paused runtime
/// of its own thread (`finishes_within`), so that a spinning task fails the test at its
/// deadline rather than hanging it.
#[test]
fn a_late_tick_skips_the_missed_ones_at_once() {
    let value = aegis_core::testing::finishes_within(Duration::from_secs(2), || async {
        let handle = RateConfig::new(Duration::from_millis(100), 10.0, 1000.0)
            .interval(Duration::from_micros(1))
            .min_samples(1)
            .spawn(|_| {});
        tokio::task::yield_now().await; // the controller waits for its first tick
        handle.record(Duration::from_millis(300));
        // A billion intervals late.
        tokio::time::advance(SEC * 1000).await;
        for _ in 0..100 {
            if handle.value() < 1000.0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        handle.value()
    })
    .expect("the late tick took over 2 s");
    assert_close(&[value], &[800.0]);
}

/// A NaN starting rate passed `clamp` and pinned a global rate limiter at 1/s.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_starting_rate_that_is_not_finite_is_ignored() {
    for rate in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let (log, sink) = rate_log();
        let handle = RateConfig::new(Duration::from_millis(100), 10.0, 1000.0)
            .initial_rate(rate)
            .spawn(sink);
        assert_close(&[handle.value()], &[1000.0]);
        assert_close(&log.lock(), &[1000.0]);
    }
    let handle = RateConfig::new(Duration::from_millis(100), 10.0, 1000.0)
        .initial_rate(5.0)
        .spawn(|_| {});
    assert_close(&[handle.value()], &[10.0]); // a finite one is clamped
}

/// After a reduction, a measurement that needs the windows from before it for its
/// samples does not cut again: those windows measured the old rate. Before, the
/// look-back mixed them in and cut a second time, hysteresis or not.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_rate_controller_does_not_cut_twice_on_the_windows_before_its_cut() {
    let (log, sink) = rate_log();
    let t0 = Instant::now();
    let handle = RateConfig::new(Duration::from_millis(100), 10.0, 1000.0)
        .min_samples(10)
        .spawn(sink);
    let window = |n: usize, ms: u64| {
        for _ in 0..n {
            handle.record(Duration::from_millis(ms));
        }
    };
    let at = |k: u32| t0 + SEC * k + Duration::from_millis(10);
    window(10, 300);
    sleep_until(at(1)).await;
    assert_close(&[handle.value()], &[800.0]); // cut
    window(3, 10);
    sleep_until(at(2)).await; // hysteresis: hold
    window(3, 10);
    sleep_until(at(3)).await;
    // 6 samples since the cut, too few: the P95 over the 10 slow ones before is 300 ms,
    // but they measured the rate of 1000, not 800.
    assert_close(&[handle.value()], &[800.0]);
    window(10, 300);
    sleep_until(at(4)).await;
    assert_close(&[handle.value()], &[640.0]); // enough evidence since: cut
    assert_close(&log.lock(), &[1000.0, 800.0, 640.0]);
}

/// Latencies just under the threshold do not cut: the histogram's bucket used to read
/// 99.9 ms as 100.35 ms, over a 100 ms threshold.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn latencies_just_under_the_threshold_do_not_cut() {
    let t0 = Instant::now();
    let handle = RateConfig::new(Duration::from_millis(100), 10.0, 1000.0)
        .min_samples(10)
        .spawn(|_| {});
    for _ in 0..10 {
        handle.record(Duration::from_micros(99_900));
    }
    sleep_until(t0 + SEC + Duration::from_millis(10)).await;
    assert_close(&[handle.value()], &[1000.0]);
    for _ in 0..10 {
        handle.record(Duration::from_millis(101));
    }
    sleep_until(t0 + SEC * 2 + Duration::from_millis(10)).await;
    assert_close(&[handle.value()], &[800.0]); // 1 % over: a cut
}

#[test]
fn rate_decisions_follow_the_table() {
    let cfg = RateConfig::new(Duration::from_millis(100), 1.0, 1000.0);
    let ms = Duration::from_millis;
    assert_eq!(cfg.decide(500.0, ms(101), false), (400.0, Direction::Down));
    assert_eq!(cfg.decide(500.0, ms(101), true), (500.0, Direction::Hold));
    assert_eq!(cfg.decide(500.0, ms(100), false), (500.0, Direction::Hold));
    assert_eq!(cfg.decide(500.0, ms(70), false), (500.0, Direction::Hold));
    assert_eq!(cfg.decide(500.0, ms(69), false).1, Direction::Up);
    assert_eq!(cfg.decide(1000.0, ms(1), false), (1000.0, Direction::Hold));
}

/// `got` is within 0.5 % of `want` (the latency histogram's resolution).
#[track_caller]
fn assert_within(got: Option<f64>, want: f64) {
    let got = got.expect("a gauge");
    assert!((got - want).abs() <= want * 0.005, "{got} vs {want}");
}

/// The limit pinned while measuring, then following the gradient, and remeasured; and
/// its gauges, `aegis_adaptive_limit` as published and `aegis_adaptive_min_rtt_seconds`
/// once measured. Each read is one capture, which drains the gauges: a gauge not set
/// since the previous capture reads 0, so each is read right after a step that sets it.
#[test]
fn gradient_mode_measures_min_rtt_then_follows_the_gradient_and_remeasures() {
    run_watching(true, |snap| async move {
        // The limit and the minimum RTT (if set since the previous read), one capture.
        let gauges = || {
            let m = capture(&snap);
            (m.gauge(ADAPTIVE_LIMIT), m.gauge(ADAPTIVE_MIN_RTT_SECONDS))
        };
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = Arc::clone(&log);
        let t0 = Instant::now();
        let handle = GradientConfig::new(2, 100)
            .initial_limit(50)
            .buffer(0.0)
            .min_samples(5)
            .min_rtt_samples(5)
            .min_rtt_interval(Duration::from_secs(10))
            .spawn(move |limit: usize| l.lock().push(limit));
        let latency = Arc::new(AtomicU64::new(10));
        let tick = |k: u32| {
            let (handle, latency) = (handle.clone(), Arc::clone(&latency));
            async move {
                burst(&handle, Published::Concurrency, &latency, Call::Ok, 10).await;
                sleep_until(t0 + SEC * k + Duration::from_millis(10)).await;
            }
        };
        assert_eq!(*log.lock(), [2], "pinned to min_limit while measuring");
        assert_eq!(gauges(), (Some(2.0), None), "pinned, nothing measured yet");
        tick(1).await; // min RTT = 10 ms; the limit goes back to 50
        let (limit, min_rtt) = gauges();
        assert_eq!(limit, Some(50.0));
        assert_within(min_rtt, 0.010);
        tick(2).await; // sample 10 ms: gradient 1, 50 + sqrt(50)
        let (limit, _) = gauges();
        assert_close(&[limit.unwrap()], &[50.0 + 50f64.sqrt()]);
        latency.store(40, Ordering::Relaxed);
        tick(3).await; // sample 40 ms: gradient 0.25 -> 0.5, 28.5 + sqrt(28.5)
        assert_eq!(*log.lock(), [2, 50, 57, 34]);
        let (limit, _) = gauges();
        let halved = (50.0 + 50f64.sqrt()) * 0.5;
        assert_close(&[limit.unwrap()], &[halved + halved.sqrt()]);

        for k in 4..=10 {
            tick(k).await;
        }
        let before = handle.value();
        tick(11).await; // 10 s after the first measurement: measure again, pinned
        assert_close(&[handle.value()], &[2.0]);
        assert_eq!(gauges().0, Some(2.0));
        tick(12).await; // min RTT = 40 ms now; the limit comes back
        assert!(
            (handle.value() - before).abs() < 1e-9,
            "{} vs {before}",
            handle.value()
        );
        let (limit, min_rtt) = gauges();
        assert_close(&[limit.unwrap()], &[before]);
        assert_within(min_rtt, 0.040);
        tick(13).await; // sample 40 ms = min RTT: gradient 1, the limit grows again
        assert!(handle.value() > before, "{} vs {before}", handle.value());
        assert_close(&[gauges().0.unwrap()], &[handle.value()]);
    });
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_stalled_upstream_past_the_histogram_still_cuts_the_longest_threshold() {
    // Samples are kept up to one minute: a five-minute stall reads 59.77 s, over any
    // threshold `RateConfig` accepts, so the rate goes down (not up).
    let t0 = Instant::now();
    let handle = RateConfig::new(MAX_THRESHOLD, 10.0, 1000.0)
        .initial_rate(100.0)
        .min_samples(1)
        .spawn(|_: f64| {});
    for _ in 0..5 {
        handle.record(Duration::from_secs(300));
    }
    sleep_until(t0 + SEC + Duration::from_millis(10)).await;
    assert_close(&[handle.value()], &[80.0]);
}

#[test]
#[should_panic(expected = "threshold must be at most MAX_THRESHOLD")]
fn a_threshold_the_histogram_cannot_tell_apart_from_a_stall_is_refused() {
    // At 2 min, a 5 min stall (kept as 59.77 s) read under 0.7 x 120 s: the controller
    // raised the rate every interval while the upstream was stalled.
    let _ = RateConfig::new(Duration::from_secs(120), 10.0, 1000.0);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn controller_stops_on_shutdown_and_when_every_handle_is_dropped() {
    let alive = Arc::new(());
    let watch = Arc::downgrade(&alive);
    let handle = RateConfig::new(Duration::from_millis(100), 10.0, 1000.0).spawn(move |_| {
        let _ = &alive;
    });
    let layer = handle.layer();
    sleep(SEC * 3).await;
    assert!(handle.is_running());
    assert!(watch.upgrade().is_some());
    drop(handle);
    sleep(SEC * 3).await;
    assert!(
        watch.upgrade().is_some(),
        "the layer keeps the controller alive"
    );
    drop(layer);
    tokio::task::yield_now().await;
    tokio::task::yield_now().await;
    assert!(
        watch.upgrade().is_none(),
        "the task ended and dropped its sink"
    );

    let t0 = Instant::now();
    let handle = RateConfig::new(Duration::from_millis(100), 10.0, 1000.0)
        .min_samples(1)
        .spawn(|_| {});
    handle.shutdown();
    tokio::task::yield_now().await;
    assert!(!handle.is_running());
    let latency = Arc::new(AtomicU64::new(300));
    burst(&handle, Published::Rate, &latency, Call::Ok, 5).await;
    sleep_until(t0 + SEC * 2).await;
    assert_close(&[handle.value()], &[1000.0]); // no decisions after shutdown
}

#[test]
fn a_controller_whose_runtime_is_gone_is_not_running() {
    // The runtime drops the controller's task without its loop ever breaking.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    let handle = rt.block_on(async {
        let handle = RateConfig::new(Duration::from_millis(100), 10.0, 1000.0).spawn(|_| {});
        sleep(SEC * 3).await;
        handle
    });
    assert!(handle.is_running());
    drop(rt);
    assert!(!handle.is_running());
    assert!(
        format!("{handle:?}").contains("running: false"),
        "{handle:?}"
    );
    // A task dropped before its first poll too: `block_on` returns as soon as its own
    // future is ready, before the spawned task runs.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let handle = rt.block_on(async {
        RateConfig::new(Duration::from_millis(100), 10.0, 1000.0).spawn(|_| {})
    });
    drop(rt);
    assert!(!handle.is_running(), "{handle:?}");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_controller_whose_sink_panicked_is_not_running() {
    let calls = AtomicUsize::new(0);
    // The first call is `spawn`'s own; the first decision panics in the task.
    let handle = RateConfig::new(Duration::from_millis(100), 10.0, 1000.0)
        .min_samples(1)
        .spawn(move |_: f64| {
            assert!(
                calls.fetch_add(1, Ordering::Relaxed) == 0,
                "the sink failed"
            );
        });
    handle.record(Duration::from_millis(300));
    sleep(SEC * 2).await;
    assert!(!handle.is_running());
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn durations_past_any_instant_do_not_kill_the_controller() {
    // Rate mode, `interval(Duration::MAX)`: the first deadline used to panic in the task.
    let alive = Arc::new(());
    let watch = Arc::downgrade(&alive);
    let handle = RateConfig::new(Duration::from_millis(100), 10.0, 1000.0)
        .interval(Duration::MAX)
        .spawn(move |_| {
            let _ = &alive;
        });
    sleep(SEC * 86_400).await;
    assert!(handle.is_running());
    assert!(watch.upgrade().is_some(), "the task still holds its sink");
    handle.shutdown();
    tokio::task::yield_now().await;
    assert!(!handle.is_running());
    assert!(watch.upgrade().is_none(), "and it ends on shutdown");

    // Gradient mode, `min_rtt_interval(Duration::MAX)`: the measurement's end used to
    // panic when it scheduled the next one.
    let t0 = Instant::now();
    let handle = GradientConfig::new(2, 100)
        .initial_limit(50)
        .min_rtt_samples(1)
        .min_samples(1)
        .min_rtt_interval(Duration::MAX)
        .spawn(|_: usize| {});
    handle.record(Duration::from_millis(10));
    sleep_until(t0 + SEC + Duration::from_millis(10)).await;
    assert!(handle.is_running());
    assert_close(&[handle.value()], &[50.0]); // measured; the limit is back
    handle.record(Duration::from_millis(10));
    sleep_until(t0 + SEC * 2 + Duration::from_millis(10)).await;
    assert!(handle.value() > 50.0, "still deciding: {}", handle.value());
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn latencies_recorded_through_the_handle_drive_the_rate() {
    let (log, sink) = rate_log();
    let t0 = Instant::now();
    let handle = RateConfig::new(Duration::from_millis(100), 10.0, 1000.0)
        .min_samples(5)
        .spawn(sink);
    // No layer at all: a handshake timer outside any service reports to the handle.
    for _ in 0..5 {
        handle.record(Duration::from_millis(300));
    }
    sleep_until(t0 + SEC + Duration::from_millis(10)).await;
    assert_close(&[handle.value()], &[800.0]);
    // Hysteresis holds the next interval; then fast handshakes raise the rate again.
    sleep_until(t0 + SEC * 2 + Duration::from_millis(10)).await;
    for _ in 0..5 {
        handle.record(Duration::from_millis(10));
    }
    sleep_until(t0 + SEC * 3 + Duration::from_millis(10)).await;
    assert_close(&[handle.value()], &[880.0]);
    assert_close(&log.lock(), &[1000.0, 800.0, 880.0]);
}

/// Steady demand above any limit: keeps as many calls in flight as the last published
/// concurrency limit (`limit`, which the sink stores) allows, through `handle`'s layer,
/// around a backend of `latency`.
fn closed_loop(handle: &AdaptiveHandle, limit: Arc<AtomicUsize>, latency: Duration) {
    let svc = handle.layer().layer(service_fn(move |()| async move {
        sleep(latency).await;
        Ok::<_, io::Error>(())
    }));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(tokio::sync::Notify::new());
    tokio::spawn(async move {
        loop {
            while in_flight.load(Ordering::Relaxed) < limit.load(Ordering::Relaxed) {
                in_flight.fetch_add(1, Ordering::Relaxed);
                let (svc, in_flight, done) =
                    (svc.clone(), Arc::clone(&in_flight), Arc::clone(&done));
                tokio::spawn(async move {
                    svc.oneshot(()).await.unwrap();
                    in_flight.fetch_sub(1, Ordering::Relaxed);
                    done.notify_one();
                });
            }
            // A slot came free, or the limit may have grown.
            tokio::select! {
                () = done.notified() => {}
                () = sleep(Duration::from_millis(5)) => {}
            }
        }
    });
}

/// Runs a gradient controller with `cfg` (`min_limit` 4) under [`closed_loop`] traffic
/// around a healthy 200 ms backend; returns the published limit just after each of the
/// first `intervals` decisions (1 s apart).
async fn gradient_under_steady_demand(cfg: GradientConfig, intervals: u32) -> Vec<usize> {
    let limit = Arc::new(AtomicUsize::new(0));
    let sink = Arc::clone(&limit);
    let t0 = Instant::now();
    let handle = cfg.spawn(move |l: usize| sink.store(l, Ordering::Relaxed));
    closed_loop(&handle, Arc::clone(&limit), Duration::from_millis(200));
    let mut seen = Vec::new();
    for k in 1..=intervals {
        sleep_until(t0 + SEC * k + Duration::from_millis(1)).await;
        seen.push(limit.load(Ordering::Relaxed));
    }
    seen
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_gradient_controller_at_its_floor_measures_and_climbs_under_its_own_limit() {
    // The defaults want 50 samples for the minimum RTT; pinned to 4 calls in flight of
    // 200 ms, a window gets 20, two windows 40: with two windows it never finished, and
    // the limit stayed at 4 for good (at start-up and at every re-measurement).
    let seen = gradient_under_steady_demand(
        GradientConfig::new(4, 100).min_rtt_interval(Duration::from_secs(10)),
        20,
    )
    .await;
    assert_eq!(seen[..2], [4, 4], "measuring: {seen:?}");
    let off = seen.iter().position(|&l| l > 4).expect("off the floor");
    assert!(
        off < 4,
        "off the floor after {} intervals: {seen:?}",
        off + 1
    );
    // Re-measured at 13 s (10 s after the measurement), pinned, and off again within
    // a bounded number of intervals, above where it was.
    let pinned = seen[12..]
        .iter()
        .position(|&l| l == 4)
        .expect("re-measured")
        + 12;
    let before = seen[pinned - 1];
    let back = seen[pinned..]
        .iter()
        .position(|&l| l >= before)
        .expect("back off the floor");
    assert!(back <= 4, "{back} intervals pinned: {seen:?}");

    // Minimums the floor cannot reach even over the eight windows a measurement may
    // span: the minimum-RTT measurement ends at that deadline on the samples there are,
    // and eight windows later those samples still raise the limit.
    let seen = gradient_under_steady_demand(
        GradientConfig::new(4, 100)
            .min_rtt_samples(1000)
            .min_samples(1000),
        20,
    )
    .await;
    let off = seen.iter().position(|&l| l > 4).expect("off the floor");
    assert!(
        off < 16,
        "off the floor after {} intervals: {seen:?}",
        off + 1
    );
    assert!(seen[19] > seen[off], "still climbing: {seen:?}");
}

/// `SuccessOrTimeout` records successes and timeouts, and neither other failures nor
/// rejections, wherever in the error's chain they sit.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn success_or_timeout_records_successes_and_timeouts_only() {
    use aegis_core::proxy::ProxyError;
    #[derive(Debug, thiserror::Error)]
    #[error("wrapped")]
    struct Wrapped(#[source] Box<dyn std::error::Error + Send + Sync>);
    let classify =
        |e: &(dyn std::error::Error + 'static)| Classify::<()>::classify(&SuccessOrTimeout, Err(e));
    let addr = "192.0.2.1:1883".parse().unwrap();
    let elapsed = tokio::time::timeout(Duration::ZERO, std::future::pending::<()>())
        .await
        .unwrap_err();
    let elapsed_in_io = tokio::time::timeout(Duration::ZERO, std::future::pending::<()>())
        .await
        .unwrap_err();
    let timeouts: Vec<Box<dyn std::error::Error + Send + Sync>> = vec![
        Box::new(ProxyError::ConnectTimeout { addr, timeout: SEC }),
        Box::new(elapsed),
        // An `io::Error`'s own `source()` skips the error it wraps: the walk must
        // look inside it (an IO wrapper turning a timeout into an `io::Error`).
        Box::new(io::Error::other(elapsed_in_io)),
        Box::new(Wrapped(Box::new(io::Error::other(
            ProxyError::ConnectTimeout { addr, timeout: SEC },
        )))),
        Box::new(io::Error::from(io::ErrorKind::TimedOut)),
        // tower's own timeout (`ServiceBuilder::timeout`), not tokio's.
        Box::new(tower::timeout::error::Elapsed::new()),
        Box::new(io::Error::other(tower::timeout::error::Elapsed::new())),
        Box::new(Wrapped(Box::new(ProxyError::ConnectTimeout {
            addr,
            timeout: SEC,
        }))),
    ];
    for e in &timeouts {
        assert_eq!(classify(&**e), Sample::Record, "{e:?}");
    }
    let others: Vec<Box<dyn std::error::Error + Send + Sync>> = vec![
        Box::new(ProxyError::ConnectRefused {
            addr,
            source: io::Error::from(io::ErrorKind::ConnectionRefused),
        }),
        Box::new(io::Error::from(io::ErrorKind::ConnectionReset)),
        Box::new(Wrapped(Box::new(io::Error::from(
            io::ErrorKind::ConnectionRefused,
        )))),
        Box::new(reject(Shed)),
        Box::new(io::Error::other(reject(Shed))),
    ];
    for e in &others {
        assert_eq!(classify(&**e), Sample::Ignore, "{e:?}");
    }
    assert_eq!(
        Classify::<()>::classify(&SuccessOrTimeout, Ok(&())),
        Sample::Record
    );
}

/// Around a real connector whose upstream refuses, `SuccessOrTimeout` gives the
/// controller no sample (no P95 is measured); the default classifier records the
/// refusals, over in microseconds, as latencies.
#[test]
fn refused_connects_are_no_samples_with_success_or_timeout() {
    use aegis_core::proxy::TcpConnect;
    let (_held, dead) = aegis_core::testing::dead_port();
    for with_success_or_timeout in [true, false] {
        let ((), snap) = run(true, || async {
            let control = RateConfig::new(Duration::from_millis(100), 10.0, 1000.0)
                .min_samples(1)
                .spawn(|_: f64| {});
            let connect = TcpConnect::new(dead);
            for _ in 0..3 {
                let refused = if with_success_or_timeout {
                    control
                        .layer_with(SuccessOrTimeout)
                        .layer(connect.clone())
                        .oneshot(())
                        .await
                } else {
                    control.layer().layer(connect.clone()).oneshot(()).await
                };
                assert!(refused.is_err());
            }
            sleep(SEC + Duration::from_millis(10)).await;
        });
        let p95 = capture(&snap).gauge(ADAPTIVE_P95_SECONDS);
        if with_success_or_timeout {
            assert_eq!(p95, None, "refused connects were measured");
        } else {
            assert!(p95.is_some(), "the default classifier records them");
        }
    }
}

/// A backend whose even calls answer in 10 ms and whose odd calls stall for a minute.
fn half_stalling() -> impl tower::Service<
    (),
    Response = (),
    Error = io::Error,
    Future = impl Future<Output = Result<(), io::Error>> + Send,
> + Clone
+ Send
+ 'static {
    let n = Arc::new(AtomicU64::new(0));
    service_fn(move |()| {
        let stall = n.fetch_add(1, Ordering::Relaxed) % 2 == 1;
        async move {
            sleep(Duration::from_millis(if stall { 60_000 } else { 10 })).await;
            Ok(())
        }
    })
}

/// A rate controller (100 ms threshold, 1 s interval, 20 samples, from 100/s) and the
/// rates it published.
fn stall_controller() -> (AdaptiveHandle, Arc<Mutex<Vec<f64>>>) {
    let (log, sink) = rate_log();
    let handle = RateConfig::new(Duration::from_millis(100), 10.0, 1000.0)
        .initial_rate(100.0)
        .min_samples(20)
        .spawn(sink);
    (handle, log)
}

/// 100 calls a second (the controller's starting rate) for 5 s, each on its own task,
/// then 10 ms for the controller's tick at 5 s.
async fn five_seconds_of_calls<S>(svc: S)
where
    S: tower::Service<()> + Clone + Send + 'static,
    S::Future: Send,
{
    let t0 = Instant::now();
    for i in 0..500 {
        sleep_until(t0 + Duration::from_millis(10 * i)).await;
        let svc = svc.clone();
        tokio::spawn(async move {
            let _ = svc.oneshot(()).await;
        });
    }
    sleep_until(t0 + SEC * 5 + Duration::from_millis(10)).await;
}

/// Whether the controller ever lowered its rate.
fn cut(log: &Mutex<Vec<f64>>) -> bool {
    let log = log.lock();
    log.windows(2).any(|w| w[1] < w[0]) || log.first().is_some_and(|&r| r < 100.0)
}

/// Half the calls stall and `ServiceBuilder::timeout` (tower's own timeout, whose error
/// is tower's `Elapsed`, not tokio's), below the layer, ends them at 2 s: with
/// `SuccessOrTimeout` those timeouts are samples, and the rate goes down.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn success_or_timeout_counts_towers_timeout_below_the_layer() {
    let (control, log) = stall_controller();
    let svc = tower::ServiceBuilder::new()
        .layer(control.layer_with(SuccessOrTimeout))
        .timeout(2 * SEC)
        .service(half_stalling());
    five_seconds_of_calls(svc).await;
    assert!(
        cut(&log),
        "half the calls time out at 2 s, yet the rates were {:?}",
        log.lock()
    );
}
/// Half the calls stall and a timeout ABOVE the layer drops their response futures at
/// 2 s, before they complete: a call dropped after the threshold is a sample (its age,
/// a lower bound of its latency), and the rate goes down. (A call cancelled before the
/// threshold is none: `rejected_and_cancelled_calls_are_not_samples`.)
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn calls_dropped_by_a_timeout_above_the_layer_after_the_threshold_are_samples() {
    for success_or_timeout in [false, true] {
        let (control, log) = stall_controller();
        let timeout = tower::timeout::TimeoutLayer::new(2 * SEC);
        if success_or_timeout {
            let measured = control.layer_with(SuccessOrTimeout).layer(half_stalling());
            five_seconds_of_calls(timeout.layer(measured)).await;
        } else {
            five_seconds_of_calls(timeout.layer(control.layer().layer(half_stalling()))).await;
        }
        assert!(
            cut(&log),
            "half the calls are dropped at 2 s, yet the rates were {:?} \
             (SuccessOrTimeout: {success_or_timeout})",
            log.lock()
        );
    }
}

/// Gradient mode: once the minimum RTT is measured (10 ms), half the calls start to
/// stall and a timeout above the layer drops them at 2 s, far past twice the buffered
/// minimum RTT (25 ms), where the gradient is at its lowest: those dropped calls are
/// samples, and the limit goes down. (Seeing only the fast half, it rose for good.)
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_gradient_controller_counts_calls_dropped_above_the_layer() {
    let (log, sink) = {
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = Arc::clone(&log);
        (log, move |v: usize| l.lock().push((Instant::now(), v)))
    };
    let control = GradientConfig::new(4, 1000)
        .min_rtt_samples(20)
        .min_rtt_interval(Duration::from_secs(3600))
        .spawn(sink);
    let stalling = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let n = Arc::new(AtomicU64::new(0));
    let backend = {
        let stalling = Arc::clone(&stalling);
        service_fn(move |()| {
            let stall =
                stalling.load(Ordering::Relaxed) && n.fetch_add(1, Ordering::Relaxed) % 2 == 1;
            async move {
                sleep(Duration::from_millis(if stall { 60_000 } else { 10 })).await;
                Ok::<_, io::Error>(())
            }
        })
    };
    let svc = tower::timeout::TimeoutLayer::new(2 * SEC).layer(control.layer().layer(backend));
    let t0 = Instant::now();
    let spawn_calls = |from: u64| {
        let svc = svc.clone();
        async move {
            for i in 0..300 {
                sleep_until(t0 + Duration::from_millis(from + 10 * i)).await;
                let svc = svc.clone();
                tokio::spawn(async move {
                    let _ = svc.oneshot(()).await;
                });
            }
        }
    };
    spawn_calls(0).await; // 3 s of fast calls: the minimum RTT is measured
    let healthy = log.lock().last().unwrap().1;
    assert!(healthy > 4, "off the floor: {:?}", log.lock());
    stalling.store(true, Ordering::Relaxed);
    spawn_calls(3000).await; // 3 s of half stalls, then 2 s for the last ones to drop
    sleep_until(t0 + SEC * 8 + Duration::from_millis(10)).await;
    let log = log.lock();
    let after: Vec<usize> = log
        .iter()
        .filter(|(t, _)| *t > t0 + SEC * 3)
        .map(|&(_, v)| v)
        .collect();
    // The fast half raises it until the first stalls drop (2 s in), then it comes down.
    assert!(
        after.windows(2).any(|w| w[1] < w[0]),
        "half the calls dropped at 2 s, yet the limit went from {healthy} to {after:?}"
    );
}

/// Records, for each of `secs` one-second windows from `t0`, `slow` samples of 700 ms
/// (threshold 500 ms) from each of the `slow_keys`, and 8 samples of 5 ms from key
/// `"victim"`; returns the rate after each window's decision.
async fn keyed_windows(
    control: &AdaptiveHandle,
    t0: Instant,
    secs: u32,
    slow_keys: &[String],
    slow: u32,
) -> Vec<f64> {
    let mut rates = Vec::new();
    for k in 1..=secs {
        for key in slow_keys {
            for _ in 0..slow {
                control.record_keyed(key.as_str(), Duration::from_millis(700));
            }
        }
        for _ in 0..8 {
            control.record_keyed("victim", Duration::from_millis(5));
        }
        sleep_until(t0 + SEC * k + Duration::from_millis(10)).await;
        rates.push(control.value());
    }
    rates
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn one_client_owning_the_slow_tail_does_not_lower_the_rate_many_clients_do() {
    // The http-gateway's setting: P95 over 500 ms cuts the per-client rate, 1 to 20/s,
    // 20 samples a decision. One client asks over and over for a URL the backend takes
    // 700 ms on (6 answers a second: 43 % of the samples), another makes 8 fast calls a
    // second. Keyed, that one client's tail is its own: the rate does not fall, and
    // from a cut it recovers.
    let control = RateConfig::new(Duration::from_millis(500), 1.0, 20.0)
        .min_samples(20)
        .initial_rate(10.0)
        .spawn(|_: f64| {});
    let t0 = Instant::now();
    let attacker = vec!["attacker".to_owned()];
    let rates = keyed_windows(&control, t0, 10, &attacker, 6).await;
    assert!(
        rates.windows(2).all(|w| w[1] >= w[0]) && rates[9] > 10.0,
        "one client's slow URL moved every client's rate: {rates:?}"
    );

    // Unkeyed (or all one key), the same samples are a tail like any other: the rate
    // falls (what the keyed samples were before).
    let control = RateConfig::new(Duration::from_millis(500), 1.0, 20.0)
        .min_samples(20)
        .initial_rate(10.0)
        .spawn(|_: f64| {});
    let t0 = Instant::now();
    let mut rates = Vec::new();
    for k in 1..=4 {
        for _ in 0..6 {
            control.record(Duration::from_millis(700));
        }
        for _ in 0..8 {
            control.record(Duration::from_millis(5));
        }
        sleep_until(t0 + SEC * k + Duration::from_millis(10)).await;
        rates.push(control.value());
    }
    assert!(rates[3] < 10.0, "{rates:?}");

    // The same slow answers spread over 24 clients, one each a window, with the fast
    // client's 8: a tail that does not hang on any one client. The rate falls.
    let control = RateConfig::new(Duration::from_millis(500), 1.0, 20.0)
        .min_samples(20)
        .initial_rate(10.0)
        .spawn(|_: f64| {});
    let t0 = Instant::now();
    let many: Vec<String> = (0..24).map(|i| format!("client{i}")).collect();
    let rates = keyed_windows(&control, t0, 4, &many, 1).await;
    assert!(
        rates[0] < 10.0 && rates[3] < rates[0],
        "a slow backend for many clients must still lower the rate: {rates:?}"
    );
}
