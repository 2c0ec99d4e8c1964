//! Circuit breaker: trips, fails fast, probes, cancellation, forcing and metrics.
#![cfg(feature = "circuit-breaker")]

use std::error::Error;
use std::io;
use std::time::Duration;

use aegis_core::error::{BoxError, find, label_of};
use aegis_core::metrics::testing::{Captured, capture, run_watching};
use aegis_layers::circuit_breaker::{
    CIRCUIT_STATE, CIRCUIT_TRANSITIONS_TOTAL, CircuitBreaker, CircuitBreakerLayer, CircuitState,
    Classify, DefaultClassifier, FailuresOnly, HttpClassifier, MAX_WINDOW, Outcome,
    error::CircuitOpen,
};
use tokio_test::{assert_pending, assert_ready, task};
use tower::{Layer, Service, ServiceExt};
use tower_test::mock::{self, Handle, Mock};

type Svc = CircuitBreaker<Mock<(), ()>>;

fn refused() -> io::Error {
    io::ErrorKind::ConnectionRefused.into()
}

fn breaker(layer: &CircuitBreakerLayer) -> (Svc, Handle<(), ()>) {
    let (mock, handle) = mock::pair::<(), ()>();
    (layer.layer(mock), handle)
}

/// One call that reaches the inner service, which answers `ok` or fails.
async fn call<C: Classify<()>>(
    svc: &mut CircuitBreaker<Mock<(), ()>, C>,
    handle: &mut Handle<(), ()>,
    ok: bool,
) -> Result<(), BoxError> {
    let fut = svc.ready().await.unwrap().call(());
    let ((), send) = next_request(handle);
    if ok {
        send.send_response(());
    } else {
        send.send_error(refused());
    }
    fut.await
}

/// The request the inner service just received; fails (rather than hangs) if the
/// breaker did not call it.
fn next_request(handle: &mut Handle<(), ()>) -> ((), tower_test::mock::SendResponse<()>) {
    let mut next = task::spawn(handle.next_request());
    assert_ready!(next.poll()).expect("the inner service was called")
}

/// One call that must fail fast without reaching the inner service.
async fn assert_fails_fast(svc: &mut Svc, handle: &mut Handle<(), ()>) {
    let err = svc.ready().await.unwrap().call(()).await.unwrap_err();
    assert!(find::<CircuitOpen>(&*err).is_some(), "{err}");
    assert_eq!(label_of(&*err), ("circuit_breaker", "open"));
    let mut next = task::spawn(handle.next_request());
    assert_pending!(next.poll(), "the inner service must not be called");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn failing_backend_opens_after_consecutive_failures_then_fails_fast() {
    let layer = CircuitBreakerLayer::builder("upstream")
        .consecutive_failures(Some(3))
        .build();
    let (mut svc, mut handle) = breaker(&layer);
    let circuit = layer.handle();

    call(&mut svc, &mut handle, true).await.unwrap();
    // Two failures, a success (resets the run), then three failures.
    for _ in 0..2 {
        call(&mut svc, &mut handle, false).await.unwrap_err();
    }
    call(&mut svc, &mut handle, true).await.unwrap();
    for _ in 0..2 {
        let err = call(&mut svc, &mut handle, false).await.unwrap_err();
        assert!(err.is::<io::Error>(), "inner errors pass through: {err}");
        assert_eq!(circuit.state(), CircuitState::Closed);
    }
    call(&mut svc, &mut handle, false).await.unwrap_err();
    assert_eq!(circuit.state(), CircuitState::Open);
    assert_fails_fast(&mut svc, &mut handle).await;
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn open_circuit_is_ready_even_when_the_inner_service_is_not() {
    let layer = CircuitBreakerLayer::builder("upstream").build();
    let (svc, mut handle) = breaker(&layer);
    let mut svc = mock::Spawn::new(svc);
    handle.allow(0);
    assert_pending!(svc.poll_ready(), "closed: waits for the inner service");
    // The circuit opens while this service waits: the next poll fails fast.
    layer.handle().force_open();
    assert_ready!(svc.poll_ready()).unwrap();
    let err = svc.call(()).await.unwrap_err();
    assert!(find::<CircuitOpen>(&*err).is_some());
    layer.handle().release();
    assert_pending!(svc.poll_ready(), "closed: waits for the inner service");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_rejection_made_in_poll_ready_is_decided_again_once_the_circuit_recovers() {
    let layer = probing_layer(1, 1);
    let (mut svc, mut handle) = breaker(&layer);
    let circuit = layer.handle();
    call(&mut svc, &mut handle, false).await.unwrap_err();
    assert_eq!(circuit.state(), CircuitState::Open);

    // Polled ready while open (a rejection), then not called.
    let mut idle = svc.clone();
    idle.ready().await.unwrap();
    // Another clone probes once the open period is over, and the circuit closes.
    tokio::time::sleep(Duration::from_secs(10)).await;
    call(&mut svc, &mut handle, true).await.unwrap();
    assert_eq!(circuit.state(), CircuitState::Closed);
    // The idle clone's next call goes through: its old rejection is not kept.
    call(&mut idle, &mut handle, true)
        .await
        .expect("closed circuit, not CircuitOpen");

    // The same when nothing else happens: the open period ends unnoticed (no state
    // change until the next admission), and the held rejection becomes a probe.
    call(&mut svc, &mut handle, false).await.unwrap_err();
    assert_eq!(circuit.state(), CircuitState::Open);
    idle.ready().await.unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    call(&mut idle, &mut handle, true)
        .await
        .expect("a probe, not CircuitOpen");
    assert_eq!(circuit.state(), CircuitState::Closed);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn failure_rate_trips_only_after_the_minimum_number_of_calls() {
    let layer = CircuitBreakerLayer::builder("upstream")
        .consecutive_failures(None)
        .failure_rate(0.5, 6, 4)
        .build();
    let (mut svc, mut handle) = breaker(&layer);
    let circuit = layer.handle();

    // 3 failures out of 3 calls: 100 %, but below the minimum of 4 calls.
    for _ in 0..3 {
        call(&mut svc, &mut handle, false).await.unwrap_err();
    }
    assert_eq!(circuit.state(), CircuitState::Closed);
    // 4th call, a success: 3/4 = 75 % >= 50 % over 4 calls: no trip on a success...
    call(&mut svc, &mut handle, true).await.unwrap();
    assert_eq!(circuit.state(), CircuitState::Closed);
    // ...the next failure trips it: 4/5 = 80 %.
    call(&mut svc, &mut handle, false).await.unwrap_err();
    assert_eq!(circuit.state(), CircuitState::Open);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn failure_rate_window_slides() {
    let layer = CircuitBreakerLayer::builder("upstream")
        .consecutive_failures(None)
        .failure_rate(0.5, 4, 4)
        .build();
    let (mut svc, mut handle) = breaker(&layer);
    let circuit = layer.handle();
    // 3 failures in 10 calls never reach 50 % of the last 4...
    for ok in [false, true, true, true, true, true, true, true, false] {
        let _ = call(&mut svc, &mut handle, ok).await;
        assert_eq!(circuit.state(), CircuitState::Closed);
    }
    // ...but the window is [T, T, T, F]: old successes leave it, and one more failure
    // makes 2 of the last 4 (cumulatively 3 of 10 would not trip).
    call(&mut svc, &mut handle, false).await.unwrap_err();
    assert_eq!(circuit.state(), CircuitState::Open);
}

async fn open_then_wait(layer: &CircuitBreakerLayer, svc: &mut Svc, handle: &mut Handle<(), ()>) {
    call(svc, handle, false).await.unwrap_err();
    assert_eq!(layer.handle().state(), CircuitState::Open);
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert_eq!(
        layer.handle().state(),
        CircuitState::Open,
        "still open before open_for"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(layer.handle().state(), CircuitState::HalfOpen);
}

fn probing_layer(permits: u32, successes: u32) -> CircuitBreakerLayer {
    CircuitBreakerLayer::builder("upstream")
        .consecutive_failures(Some(1))
        .open_for(Duration::from_secs(10))
        .half_open_permits(permits)
        .success_threshold(successes)
        .build()
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn half_open_admits_exactly_n_probes_across_clones_and_a_cancelled_probe_returns_its_permit()
{
    let layer = probing_layer(2, 1);
    let (mut svc, mut handle) = breaker(&layer);
    open_then_wait(&layer, &mut svc, &mut handle).await;

    let mut a = svc.clone();
    let mut b = svc.clone();
    let mut c = svc.clone();
    let fa = a.ready().await.unwrap().call(());
    let fb = b.ready().await.unwrap().call(());
    let _ = next_request(&mut handle);
    let _ = next_request(&mut handle);
    // The third clone is refused: both permits are in flight.
    let err = c.ready().await.unwrap().call(()).await.unwrap_err();
    assert!(find::<CircuitOpen>(&*err).is_some());
    let mut next = task::spawn(handle.next_request());
    assert_pending!(next.poll());
    drop(next);

    // Cancel one probe: its permit comes back, and the next call is a probe.
    drop(fa);
    let fc = c.ready().await.unwrap().call(());
    let _ = next_request(&mut handle); // a probe after the cancelled one
    // Still two in flight (fb, fc): refused again.
    let err = svc.ready().await.unwrap().call(()).await.unwrap_err();
    assert!(find::<CircuitOpen>(&*err).is_some());
    assert_eq!(
        layer.handle().state(),
        CircuitState::HalfOpen,
        "cancellation is no failure"
    );
    drop((fb, fc));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn permit_reserved_in_poll_ready_is_returned_when_the_service_is_dropped() {
    let layer = probing_layer(1, 1);
    let (mut svc, mut handle) = breaker(&layer);
    open_then_wait(&layer, &mut svc, &mut handle).await;
    let mut a = svc.clone();
    a.ready().await.unwrap(); // reserves the only permit
    let err = svc.ready().await.unwrap().call(()).await.unwrap_err();
    assert!(find::<CircuitOpen>(&*err).is_some());
    drop(a);
    call(&mut svc, &mut handle, true).await.unwrap();
    assert_eq!(layer.handle().state(), CircuitState::Closed);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn would_admit_tells_a_free_probe_permit_from_a_taken_one_and_takes_none() {
    let layer = probing_layer(1, 1);
    let circuit = layer.handle();
    let (mut svc, mut handle) = breaker(&layer);
    assert!(circuit.would_admit(), "closed");
    call(&mut svc, &mut handle, false).await.unwrap_err();
    assert!(!circuit.would_admit(), "open");
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(circuit.would_admit(), "half-open, the permit free");
    assert!(circuit.would_admit(), "asking took nothing");

    let probe = svc.ready().await.unwrap().call(());
    let ((), send) = next_request(&mut handle);
    assert_eq!(circuit.state(), CircuitState::HalfOpen);
    assert!(
        !circuit.would_admit(),
        "half-open, the only permit in flight"
    );
    assert_fails_fast(&mut svc, &mut handle).await;
    send.send_response(());
    probe.await.unwrap();
    assert_eq!(circuit.state(), CircuitState::Closed);
    assert!(circuit.would_admit());

    circuit.force_open();
    assert!(!circuit.would_admit(), "forced open");
    circuit.force_closed();
    assert!(circuit.would_admit(), "forced closed");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn probe_successes_up_to_the_threshold_close_the_circuit() {
    let layer = probing_layer(1, 3);
    let (mut svc, mut handle) = breaker(&layer);
    open_then_wait(&layer, &mut svc, &mut handle).await;
    for _ in 0..2 {
        call(&mut svc, &mut handle, true).await.unwrap();
        assert_eq!(layer.handle().state(), CircuitState::HalfOpen);
    }
    call(&mut svc, &mut handle, true).await.unwrap();
    assert_eq!(layer.handle().state(), CircuitState::Closed);
    // Closed again with fresh counts: one failure trips (threshold 1).
    call(&mut svc, &mut handle, true).await.unwrap();
    call(&mut svc, &mut handle, false).await.unwrap_err();
    assert_eq!(layer.handle().state(), CircuitState::Open);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_probe_that_never_ends_reopens_the_circuit_after_probe_timeout() {
    let layer = CircuitBreakerLayer::builder("upstream")
        .consecutive_failures(Some(1))
        .open_for(Duration::from_secs(10))
        .probe_timeout(Duration::from_secs(3))
        .build();
    let (mut svc, mut handle) = breaker(&layer);
    let circuit = layer.handle();
    open_then_wait(&layer, &mut svc, &mut handle).await;

    // The first caller after open_for is the probe, and never finishes (a session).
    let mut prober = svc.clone();
    let probe = prober.ready().await.unwrap().call(());
    let ((), probe_send) = next_request(&mut handle);
    assert_fails_fast(&mut svc, &mut handle).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(circuit.state(), CircuitState::HalfOpen);
    // Not polled, not dropped: the probe still times out.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        circuit.state(),
        CircuitState::Open,
        "an unfinished probe is a failure after probe_timeout"
    );
    assert_fails_fast(&mut svc, &mut handle).await;
    // Open for open_for from the timeout, then another probe gets through.
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert_eq!(circuit.state(), CircuitState::Open);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(circuit.state(), CircuitState::HalfOpen);
    call(&mut svc, &mut handle, true).await.unwrap();
    assert_eq!(circuit.state(), CircuitState::Closed);
    // The timed-out probe's call was not cancelled; its late outcome counts for nothing.
    probe_send.send_error(refused());
    probe.await.unwrap_err();
    assert_eq!(circuit.state(), CircuitState::Closed);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_probe_ending_after_the_default_probe_timeout_has_failed() {
    let layer = probing_layer(1, 1); // open_for 10 s, so probe_timeout 10 s
    let (mut svc, mut handle) = breaker(&layer);
    open_then_wait(&layer, &mut svc, &mut handle).await;
    let probe = svc.ready().await.unwrap().call(());
    let ((), send) = next_request(&mut handle);
    // Nobody looks at the circuit until the probe answers, 10 s later: too late.
    tokio::time::sleep(Duration::from_secs(10)).await;
    send.send_response(());
    probe.await.unwrap();
    assert_eq!(layer.handle().state(), CircuitState::Open);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn any_probe_failure_reopens_for_another_period() {
    let layer = probing_layer(2, 2);
    let (mut svc, mut handle) = breaker(&layer);
    open_then_wait(&layer, &mut svc, &mut handle).await;
    call(&mut svc, &mut handle, true).await.unwrap();
    call(&mut svc, &mut handle, false).await.unwrap_err();
    assert_eq!(layer.handle().state(), CircuitState::Open);
    assert_fails_fast(&mut svc, &mut handle).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(layer.handle().state(), CircuitState::HalfOpen);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn open_for_duration_max_trips_without_panicking_and_stays_open() {
    let layer = CircuitBreakerLayer::builder("upstream")
        .consecutive_failures(Some(1))
        .open_for(Duration::MAX) // "until forced or released"
        .build();
    let (mut svc, mut handle) = breaker(&layer);
    // The trip happens in the poll of this call's response future: the inner error
    // comes back, not a panic.
    let err = call(&mut svc, &mut handle, false).await.unwrap_err();
    assert!(err.is::<io::Error>(), "{err}");
    assert_eq!(layer.handle().state(), CircuitState::Open);
    tokio::time::sleep(Duration::from_secs(86_400 * 365)).await;
    assert_eq!(layer.handle().state(), CircuitState::Open);
    assert_fails_fast(&mut svc, &mut handle).await;
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn client_aborts_never_trip_the_breaker() {
    let layer = CircuitBreakerLayer::builder("upstream")
        .consecutive_failures(Some(2))
        .failure_rate(0.5, 4, 2)
        .build();
    let (mut svc, mut handle) = breaker(&layer);
    for _ in 0..10 {
        let fut = svc.ready().await.unwrap().call(());
        let ((), send) = next_request(&mut handle);
        drop(fut); // the client gave up
        send.send_error(refused()); // the answer arrives too late to matter
    }
    // A timeout above the breaker is a cancellation too.
    for _ in 0..10 {
        let fut = svc.ready().await.unwrap().call(());
        let _pending = next_request(&mut handle);
        tokio::time::timeout(Duration::from_secs(1), fut)
            .await
            .unwrap_err();
    }
    assert_eq!(layer.handle().state(), CircuitState::Closed);
    call(&mut svc, &mut handle, true).await.unwrap();
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn outcomes_from_an_earlier_state_are_ignored() {
    let layer = probing_layer(1, 1);
    let (mut svc, mut handle) = breaker(&layer);
    let mut slow = svc.clone();
    let slow_fut = slow.ready().await.unwrap().call(());
    let ((), slow_send) = next_request(&mut handle);
    open_then_wait(&layer, &mut svc, &mut handle).await;
    // The slow call admitted while closed now fails: it must not re-open half-open.
    slow_send.send_error(refused());
    slow_fut.await.unwrap_err();
    assert_eq!(layer.handle().state(), CircuitState::HalfOpen);
}

/// An admission held from `poll_ready` (made while closed) is not used by a `call` made
/// after the circuit opened: the call fails fast without reaching the inner service.
/// It was used as it was, and the call went through the open circuit.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_held_admission_calls_through_an_open_circuit() {
    let layer = CircuitBreakerLayer::builder("upstream")
        .consecutive_failures(Some(1))
        .open_for(Duration::from_secs(60))
        .build();
    let (mut svc, mut handle) = breaker(&layer);
    let circuit = layer.handle();
    svc.ready().await.unwrap(); // admitted while closed, and held
    circuit.record_failure(); // the circuit opens meanwhile
    assert_eq!(circuit.state(), CircuitState::Open);
    let mut fut = task::spawn(svc.call(()));
    let mut next = task::spawn(handle.next_request());
    assert_pending!(
        next.poll(),
        "the inner service must not be called while open"
    );
    let err = assert_ready!(fut.poll(), "fails fast").unwrap_err();
    assert!(find::<CircuitOpen>(&*err).is_some(), "{err}");
    assert_eq!(circuit.state(), CircuitState::Open);
}

/// `n` calls started now on clones of `svc`, each with the inner service's end of it.
fn start_calls(
    svc: &Svc,
    handle: &mut Handle<(), ()>,
    n: usize,
) -> Vec<(
    <Svc as Service<()>>::Future,
    tower_test::mock::SendResponse<()>,
)> {
    (0..n)
        .map(|_| {
            let mut clone = svc.clone();
            let mut ready = task::spawn(clone.ready());
            assert_ready!(ready.poll()).unwrap();
            drop(ready);
            let fut = clone.call(());
            let ((), send) = next_request(handle);
            (fut, send)
        })
        .collect()
}

/// A failure counts towards `consecutive_failures` only if no call started after it has
/// succeeded: five slow calls start, a call started after them succeeds, then the five
/// fail (a backend slow on one URL, five requests for it timing out together): the
/// circuit stays closed. Counted, one client opened the circuit for every client whose
/// requests, started later, were being answered.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn failures_of_calls_started_before_a_success_do_not_trip() {
    let layer = CircuitBreakerLayer::builder("upstream")
        .consecutive_failures(Some(5))
        .build();
    let (svc, mut handle) = breaker(&layer);
    let circuit = layer.handle();

    let slow = start_calls(&svc, &mut handle, 5);
    let [(fast, send)] = start_calls(&svc, &mut handle, 1).try_into().ok().unwrap();
    send.send_response(());
    fast.await.unwrap();
    for (fut, send) in slow {
        send.send_error(refused());
        fut.await.unwrap_err();
    }
    assert_eq!(circuit.state(), CircuitState::Closed);

    // The run starts again with the calls started after that success: five more trip.
    for (fut, send) in start_calls(&svc, &mut handle, 5) {
        send.send_error(refused());
        fut.await.unwrap_err();
    }
    assert_eq!(circuit.state(), CircuitState::Open);
}

/// Five failures with no success of a call started after them still trip, even when a
/// success of a call started before them lands among them: the order is the calls'
/// start, not their end.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn failures_trip_when_only_earlier_started_calls_succeed() {
    let layer = CircuitBreakerLayer::builder("upstream")
        .consecutive_failures(Some(5))
        .build();
    let (svc, mut handle) = breaker(&layer);
    let circuit = layer.handle();

    let [(early, early_send)] = start_calls(&svc, &mut handle, 1).try_into().ok().unwrap();
    let mut slow = start_calls(&svc, &mut handle, 5).into_iter();
    for (fut, send) in slow.by_ref().take(2) {
        send.send_error(refused());
        fut.await.unwrap_err();
    }
    // Ended after two failures, it resets the run as ever...
    early_send.send_response(());
    early.await.unwrap();
    for (fut, send) in slow {
        send.send_error(refused());
        fut.await.unwrap_err();
        assert_eq!(circuit.state(), CircuitState::Closed);
    }
    // ...and the next two failures, with the three after it, make five in a row.
    for (fut, send) in start_calls(&svc, &mut handle, 2) {
        send.send_error(refused());
        fut.await.unwrap_err();
    }
    assert_eq!(circuit.state(), CircuitState::Open);
}

/// The same ordering for outcomes recorded against a [`Mark`]: a success recorded
/// against a mark taken after some calls started makes their failures not count (the
/// http-gateway records a response's success when its body ends, against the mark it
/// took at the call); a failure recorded against a mark counts unless work started
/// later succeeded.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn marks_order_outcomes_as_calls_do() {
    let layer = CircuitBreakerLayer::builder("upstream")
        .consecutive_failures(Some(2))
        .build();
    let (svc, mut handle) = breaker(&layer);
    let circuit = layer.handle();

    let slow = start_calls(&svc, &mut handle, 2);
    let marked_failures = [circuit.mark(), circuit.mark()];
    let success = circuit.mark();
    circuit.record_success_since(success);
    for (fut, send) in slow {
        send.send_error(refused());
        fut.await.unwrap_err();
    }
    for mark in marked_failures {
        circuit.record_failure_since(mark);
    }
    assert_eq!(circuit.state(), CircuitState::Closed);
    // Marked after that success: two failures trip.
    let after = [circuit.mark(), circuit.mark()];
    for mark in after {
        circuit.record_failure_since(mark);
    }
    assert_eq!(circuit.state(), CircuitState::Open);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn handle_forces_open_and_closed_and_releases() {
    let layer = CircuitBreakerLayer::builder("upstream")
        .consecutive_failures(Some(1))
        .build();
    let (mut svc, mut handle) = breaker(&layer);
    let circuit = layer.handle();

    circuit.force_open();
    assert_eq!(circuit.state(), CircuitState::Open);
    assert_eq!(circuit.forced(), Some(CircuitState::Open));
    assert_fails_fast(&mut svc, &mut handle).await;
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(
        circuit.state(),
        CircuitState::Open,
        "a forced open never times out"
    );

    circuit.force_closed();
    assert_eq!(circuit.state(), CircuitState::Closed);
    for _ in 0..5 {
        call(&mut svc, &mut handle, false).await.unwrap_err();
    }
    assert_eq!(
        circuit.state(),
        CircuitState::Closed,
        "forced closed counts nothing"
    );

    circuit.release();
    assert_eq!(circuit.forced(), None);
    call(&mut svc, &mut handle, false).await.unwrap_err();
    assert_eq!(
        circuit.state(),
        CircuitState::Open,
        "released: counting again"
    );
    circuit.release(); // not forced: no-op
    assert_eq!(circuit.state(), CircuitState::Open);
}

/// `aegis_circuit_transitions_total{name, to}` in the captured metrics `m`.
fn transitions(m: &Captured, name: &str, to: &str) -> u64 {
    m.counter(CIRCUIT_TRANSITIONS_TOTAL, &[("name", name), ("to", to)])
}

#[test]
fn state_changes_and_fast_failures_are_metrics() {
    run_watching(true, |snap| async move {
        let layer = probing_layer(1, 1);
        let (mut svc, mut handle) = breaker(&layer);
        // Registered when the layer is built (a gauge never set would read 0 too).
        assert_eq!(capture(&snap).gauge(CIRCUIT_STATE), Some(0.0));

        call(&mut svc, &mut handle, false).await.unwrap_err();
        let m = capture(&snap);
        assert_eq!(m.gauge(CIRCUIT_STATE), Some(2.0));
        assert_eq!(transitions(&m, "upstream", "open"), 1);
        assert_fails_fast(&mut svc, &mut handle).await;
        assert_fails_fast(&mut svc, &mut handle).await;
        let m = capture(&snap);
        assert_eq!(
            m.counter(
                aegis_core::metrics::REJECTIONS_TOTAL,
                &[("layer", "circuit_breaker"), ("reason", "open")]
            ),
            2
        );

        // A snapshot drains the gauge to 0, so each 0 below is checked after a
        // non-zero value that only the transition can have overwritten.
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(layer.handle().state(), CircuitState::HalfOpen);
        let m = capture(&snap);
        assert_eq!(m.gauge(CIRCUIT_STATE), Some(1.0), "half-open");
        assert_eq!(transitions(&m, "upstream", "half_open"), 1);
        metrics::gauge!(CIRCUIT_STATE, "name" => "upstream").set(-1.0);
        call(&mut svc, &mut handle, true).await.unwrap();
        let m = capture(&snap);
        assert_eq!(transitions(&m, "upstream", "closed"), 1);
        assert_eq!(m.gauge(CIRCUIT_STATE), Some(0.0), "closed, over the -1");

        layer.handle().force_open();
        assert_eq!(capture(&snap).gauge(CIRCUIT_STATE), Some(2.0));

        // Two breakers in one process: each counts under its own name.
        let other = CircuitBreakerLayer::builder("auth_backend")
            .consecutive_failures(Some(1))
            .build();
        let (mut svc2, mut handle2) = breaker(&other);
        call(&mut svc2, &mut handle2, false).await.unwrap_err();
        let m = capture(&snap);
        assert_eq!(transitions(&m, "auth_backend", "open"), 1);
        assert_eq!(
            m.counter(CIRCUIT_TRANSITIONS_TOTAL, &[("name", "upstream")]),
            0,
            "the first breaker did not move"
        );
    });
}

#[test]
fn default_classifier_counts_errors_and_timeouts_but_not_client_side_or_rejections_even_io_wrapped()
{
    let c = DefaultClassifier;
    let classify = |e: &(dyn Error + 'static)| Classify::<()>::classify(&c, Err(e));
    assert_eq!(Classify::<()>::classify(&c, Ok(&())), Outcome::Success);
    assert_eq!(classify(&refused()), Outcome::Failure);

    let elapsed: BoxError = Box::new(tokio_test::block_on(async {
        tokio::time::timeout(Duration::ZERO, std::future::pending::<()>())
            .await
            .unwrap_err()
    }));
    assert_eq!(classify(&*elapsed), Outcome::Failure);

    let rejected: BoxError = aegis_core::error::reject(Dummy).into();
    assert_eq!(classify(&*rejected), Outcome::Ignore);

    // A rejection carried in an `io::Error`, as IO wrappers report one from `poll_read`
    // (aegis-mqtt's do): `io::Error::source()` skips the error it wraps, but the
    // classifier must still see the client's rejection, not a backend failure.
    let io_wrapped = io::Error::new(
        io::ErrorKind::InvalidData,
        aegis_core::error::Rejected::uncounted(Dummy),
    );
    assert_eq!(classify(&io_wrapped), Outcome::Ignore);
    // ... also deeper, inside a proxy error and a box.
    let through_proxy: BoxError =
        Box::new(aegis_core::proxy::ProxyError::UpstreamIo(io::Error::new(
            io::ErrorKind::InvalidData,
            aegis_core::error::Rejected::uncounted(Dummy),
        )));
    assert_eq!(classify(&*through_proxy), Outcome::Ignore);
    // A client-side proxy error inside an `io::Error` is the client's failure too.
    let client_in_io = io::Error::other(aegis_core::proxy::ProxyError::ClientIo(
        io::ErrorKind::ConnectionReset.into(),
    ));
    assert_eq!(classify(&client_in_io), Outcome::Ignore);
    // A plain `io::Error` with a custom payload that is neither is still a failure.
    assert_eq!(
        classify(&io::Error::other("backend broke")),
        Outcome::Failure
    );
}

#[derive(Debug, thiserror::Error)]
#[error("dummy")]
struct Dummy;
impl aegis_core::error::Reject for Dummy {
    fn layer(&self) -> &'static str {
        "dummy"
    }
    fn label(&self) -> &'static str {
        "dummy"
    }
}

#[tokio::test(flavor = "current_thread")]
async fn proxy_errors_count_only_when_the_upstream_is_at_fault() {
    use aegis_core::proxy::ProxyError;
    // Build real ProxyErrors by connecting to a closed port.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let connect_err = tokio::net::TcpStream::connect(addr).await.unwrap_err();
    let refused = ProxyError::ConnectRefused {
        addr,
        source: connect_err,
    };
    let client = ProxyError::ClientIo(io::ErrorKind::ConnectionReset.into());
    let up = ProxyError::UpstreamIo(io::ErrorKind::ConnectionReset.into());
    let c = DefaultClassifier;
    assert_eq!(
        Classify::<()>::classify(&c, Err(&refused)),
        Outcome::Failure
    );
    assert_eq!(Classify::<()>::classify(&c, Err(&up)), Outcome::Failure);
    assert_eq!(Classify::<()>::classify(&c, Err(&client)), Outcome::Ignore);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn http_classifier_trips_on_5xx_only() {
    let layer = CircuitBreakerLayer::builder("api")
        .consecutive_failures(Some(2))
        .classifier(HttpClassifier)
        .build();
    let circuit = layer.handle();
    let mut client = layer.layer(tower::service_fn(|status: u16| async move {
        Ok::<_, io::Error>(http::Response::builder().status(status).body(()).unwrap())
    }));
    for status in [404, 200, 429, 503, 201, 500] {
        client.ready().await.unwrap().call(status).await.unwrap();
        assert_eq!(circuit.state(), CircuitState::Closed, "after {status}");
    }
    client.ready().await.unwrap().call(502).await.unwrap();
    assert_eq!(circuit.state(), CircuitState::Open);
}

/// `501` and `505` answer the request's method or HTTP version, which any client
/// chooses: counted, five requests in a method a stock server does not implement opened
/// the circuit for every client. They are ignored: neither a failure nor a success that
/// would reset the run of failures.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn http_classifier_ignores_501_and_505() {
    let answer = |status: u16| http::Response::builder().status(status).body(()).unwrap();
    for status in [501, 505] {
        assert_eq!(
            HttpClassifier.classify(Ok(&answer(status))),
            Outcome::Ignore,
            "{status}"
        );
    }
    let layer = CircuitBreakerLayer::builder("api")
        .consecutive_failures(Some(2))
        .classifier(HttpClassifier)
        .build();
    let circuit = layer.handle();
    let mut client = layer.layer(tower::service_fn(|status: u16| async move {
        Ok::<_, io::Error>(answer(status))
    }));
    for status in [501, 505, 501, 500, 505, 501] {
        client.ready().await.unwrap().call(status).await.unwrap();
        assert_eq!(circuit.state(), CircuitState::Closed, "after {status}");
    }
    client.ready().await.unwrap().call(503).await.unwrap();
    assert_eq!(circuit.state(), CircuitState::Open, "500 and 503 in a row");
}

#[test]
fn record_failure_trips_like_failed_calls_with_metrics() {
    run_watching(true, |snap| async move {
        let layer = CircuitBreakerLayer::builder("upstream")
            .consecutive_failures(Some(3))
            .open_for(Duration::from_secs(10))
            .build();
        let (mut svc, mut handle) = breaker(&layer);
        let circuit = layer.handle();

        // Reported failures and failed calls make one run; a success resets it.
        circuit.record_failure();
        call(&mut svc, &mut handle, false).await.unwrap_err();
        call(&mut svc, &mut handle, true).await.unwrap();
        for _ in 0..2 {
            circuit.record_failure();
            assert_eq!(circuit.state(), CircuitState::Closed);
        }
        circuit.record_failure();
        assert_eq!(circuit.state(), CircuitState::Open);
        assert_fails_fast(&mut svc, &mut handle).await;
        let m = capture(&snap);
        assert_eq!(m.gauge(CIRCUIT_STATE), Some(2.0));
        assert_eq!(transitions(&m, "upstream", "open"), 1);

        // While open it changes nothing: still half-open after `open_for`.
        circuit.record_failure();
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(circuit.state(), CircuitState::HalfOpen);
        // While half-open it re-opens, as a failed probe does, for another period.
        circuit.record_failure();
        assert_eq!(circuit.state(), CircuitState::Open);
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert_eq!(circuit.state(), CircuitState::Open);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(circuit.state(), CircuitState::HalfOpen);
        // (A capture drains the recorder: one more opening since the last one.)
        assert_eq!(transitions(&capture(&snap), "upstream", "open"), 1);

        // Forced closed: nothing is counted.
        circuit.force_closed();
        for _ in 0..5 {
            circuit.record_failure();
        }
        assert_eq!(circuit.state(), CircuitState::Closed);
        circuit.release();
        assert_eq!(circuit.state(), CircuitState::Closed);
    });
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn record_failure_feeds_the_failure_rate() {
    let layer = CircuitBreakerLayer::builder("upstream")
        .consecutive_failures(None)
        .failure_rate(0.5, 4, 4)
        .build();
    let (mut svc, mut handle) = breaker(&layer);
    let circuit = layer.handle();
    // Connects that succeed, each followed by a reported failure: 50 % of the last 4.
    call(&mut svc, &mut handle, true).await.unwrap();
    circuit.record_failure();
    call(&mut svc, &mut handle, true).await.unwrap();
    assert_eq!(circuit.state(), CircuitState::Closed);
    circuit.record_failure();
    assert_eq!(circuit.state(), CircuitState::Open);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn failures_only_lets_reported_outcomes_decide() {
    // A stalled broker: every connect succeeds, every CONNACK times out.
    let layer = CircuitBreakerLayer::builder("upstream")
        .consecutive_failures(Some(3))
        .open_for(Duration::from_secs(10))
        .half_open_permits(1)
        .success_threshold(2)
        .classifier(FailuresOnly)
        .build();
    let (mock, mut handle) = mock::pair::<(), ()>();
    let mut svc = layer.layer(mock);
    let circuit = layer.handle();
    for i in 0..3 {
        assert_eq!(circuit.state(), CircuitState::Closed, "connect {i}");
        call(&mut svc, &mut handle, true).await.unwrap();
        circuit.record_failure();
    }
    // With the default classifier the successful connects would have reset the count.
    assert_eq!(circuit.state(), CircuitState::Open);

    // Half-open: a probe connect that succeeds decides nothing and returns its permit...
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(circuit.state(), CircuitState::HalfOpen);
    for _ in 0..2 {
        call(&mut svc, &mut handle, true).await.unwrap();
        assert_eq!(circuit.state(), CircuitState::HalfOpen);
    }
    // ...the reported successes (CONNACKs) close the circuit at the threshold.
    circuit.record_success();
    assert_eq!(circuit.state(), CircuitState::HalfOpen);
    circuit.record_success();
    assert_eq!(circuit.state(), CircuitState::Closed);

    // Closed: a reported success resets the consecutive count.
    circuit.record_failure();
    circuit.record_failure();
    circuit.record_success();
    circuit.record_failure();
    circuit.record_failure();
    assert_eq!(circuit.state(), CircuitState::Closed);
    circuit.record_failure();
    assert_eq!(circuit.state(), CircuitState::Open);
    // Open: ignored.
    circuit.record_success();
    assert_eq!(circuit.state(), CircuitState::Open);
}

/// The breaker of the marks tests: two failures in a row trip it, for 10 s; one probe
/// at a time, which closes it alone; a probe fails after 3 s.
fn marked_layer() -> CircuitBreakerLayer {
    CircuitBreakerLayer::builder("upstream")
        .consecutive_failures(Some(2))
        .open_for(Duration::from_secs(10))
        .probe_timeout(Duration::from_secs(3))
        .half_open_permits(1)
        .success_threshold(1)
        .build()
}

/// An outcome recorded against a mark taken while closed (a download begun while the
/// backend was healthy) counts nothing once the circuit has opened and gone half-open:
/// its success does not close the circuit with no probe sent, nor its failure re-open
/// it. Recorded without the mark, a client holding such downloads closed a recovering
/// circuit for each one it dropped.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_mark_taken_while_closed_counts_nothing_once_the_circuit_changed() {
    let layer = marked_layer();
    let circuit = layer.handle();
    let closed = circuit.mark();
    circuit.record_failure();
    circuit.record_failure();
    assert_eq!(circuit.state(), CircuitState::Open);
    // While open: nothing, as ever.
    circuit.record_success_since(closed);
    assert_eq!(circuit.state(), CircuitState::Open);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(circuit.state(), CircuitState::HalfOpen);

    circuit.record_success_since(closed);
    assert_eq!(
        circuit.state(),
        CircuitState::HalfOpen,
        "closed by no probe"
    );
    circuit.record_failure_since(closed);
    assert_eq!(
        circuit.state(),
        CircuitState::HalfOpen,
        "re-opened by no probe"
    );

    // A mark of this half-open period counts: its success closes the circuit...
    let half_open = circuit.mark();
    circuit.record_success_since(half_open);
    assert_eq!(circuit.state(), CircuitState::Closed);
    // ...and then neither it nor the first closed period's mark counts in the new closed
    // period: two failures would trip it.
    circuit.record_failure_since(half_open);
    circuit.record_failure_since(closed);
    circuit.record_failure();
    assert_eq!(circuit.state(), CircuitState::Closed);
    circuit.record_failure();
    assert_eq!(circuit.state(), CircuitState::Open);
}

/// A mark of the state the circuit is still in counts as `record_success` and
/// `record_failure` do: while closed, a success resets the failure run and a failure
/// trips the circuit; while half-open, a failure re-opens it.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_mark_of_the_current_state_counts() {
    let layer = marked_layer();
    let circuit = layer.handle();
    let mark = circuit.mark();
    circuit.record_failure();
    circuit.record_success_since(mark); // resets the run
    circuit.record_failure();
    assert_eq!(circuit.state(), CircuitState::Closed);
    circuit.record_failure_since(mark);
    assert_eq!(circuit.state(), CircuitState::Open);

    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(circuit.state(), CircuitState::HalfOpen);
    let half_open = circuit.mark();
    circuit.record_failure_since(half_open);
    assert_eq!(circuit.state(), CircuitState::Open, "a failed probe");
    // The next half-open period is another state: that mark is spent.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(circuit.state(), CircuitState::HalfOpen);
    circuit.record_success_since(half_open);
    assert_eq!(circuit.state(), CircuitState::HalfOpen);
}

/// A half-open period whose probe passed its timeout unnoticed (nobody looked) is over:
/// the outcome recorded against its mark sees the clock first, as a call's own outcome
/// does, and the probe's failure re-opens the circuit rather than the late success
/// closing it.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_mark_sees_a_probe_timed_out_before_it_counts() {
    let layer = marked_layer();
    let (mut svc, mut handle) = breaker(&layer);
    let circuit = layer.handle();
    circuit.record_failure();
    circuit.record_failure();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(circuit.state(), CircuitState::HalfOpen);
    let mark = circuit.mark();
    let _probe = svc.ready().await.unwrap().call(()); // never answered
    let _request = next_request(&mut handle);
    tokio::time::sleep(Duration::from_secs(3)).await;
    circuit.record_success_since(mark);
    assert_eq!(circuit.state(), CircuitState::Open);
}

/// A forced state changes the state: a mark taken before it counts nothing after the
/// release, and nothing counts while forced.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_mark_counts_nothing_across_a_forced_state() {
    let layer = marked_layer();
    let circuit = layer.handle();
    let before = circuit.mark();
    circuit.force_closed();
    let forced = circuit.mark();
    circuit.record_failure_since(forced);
    circuit.record_failure_since(forced);
    assert_eq!(circuit.state(), CircuitState::Closed);
    circuit.release();
    circuit.record_failure_since(before);
    circuit.record_failure_since(forced);
    circuit.record_failure();
    assert_eq!(circuit.state(), CircuitState::Closed);
}

#[test]
fn failures_only_ignores_successes_and_classifies_errors_as_the_default_does() {
    let ok: Result<&(), &(dyn Error + 'static)> = Ok(&());
    assert_eq!(FailuresOnly.classify(ok), Outcome::Ignore);
    let e = refused();
    let err: Result<&(), &(dyn Error + 'static)> = Err(&e);
    assert_eq!(FailuresOnly.classify(err), Outcome::Failure);
    assert_eq!(DefaultClassifier.classify(err), Outcome::Failure);
}

/// A failure-rate window is held in memory, allocated when the breaker is built: one
/// past the bound is refused at once, not left to a huge allocation.
#[test]
#[should_panic(expected = "window must be in 1..=100000")]
fn a_failure_rate_window_past_the_bound_is_refused() {
    let _ = CircuitBreakerLayer::builder("upstream").failure_rate(0.5, MAX_WINDOW + 1, 1);
}

#[test]
fn a_failure_rate_window_at_the_bound_is_built() {
    let _ = CircuitBreakerLayer::builder("upstream")
        .failure_rate(0.5, MAX_WINDOW, 1)
        .build();
}

/// A zero `open_for` was also the default probe timeout, and a zero probe timeout
/// fails every probe: a probe admitted at `now` has timed out by the time it ends
/// (`now >= now + 0`), its success is dropped and the circuit re-opens, so a tripped
/// circuit never closed again (every call let through uncounted, with two transitions
/// and two warnings each). Refused at once, as `half_open_permits(0)` is.
#[test]
#[should_panic(expected = "open_for must be longer than zero")]
fn a_zero_open_for_is_refused() {
    let _ = CircuitBreakerLayer::builder("upstream").open_for(Duration::ZERO);
}

/// The same for an explicit zero probe timeout.
#[test]
#[should_panic(expected = "probe_timeout must be longer than zero")]
fn a_zero_probe_timeout_is_refused() {
    let _ = CircuitBreakerLayer::builder("upstream").probe_timeout(Duration::ZERO);
}

/// The shortest period left, one nanosecond (also the default probe timeout): a probe
/// that ends at once closes the circuit.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn the_shortest_open_for_still_lets_a_successful_probe_close_the_circuit() {
    let layer = CircuitBreakerLayer::builder("upstream")
        .consecutive_failures(Some(1))
        .open_for(Duration::from_nanos(1))
        .build();
    let (mut svc, mut handle) = breaker(&layer);
    call(&mut svc, &mut handle, false).await.unwrap_err();
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(layer.handle().state(), CircuitState::HalfOpen);
    call(&mut svc, &mut handle, true).await.unwrap();
    assert_eq!(layer.handle().state(), CircuitState::Closed);
}

/// A breaker judged by the first read, around a connector that returns the client end
/// of an in-memory stream; the test holds the server ends.
mod first_read {
    use std::time::Duration;

    use aegis_core::error::{find, label_of};
    use aegis_layers::circuit_breaker::{
        CircuitBreakerLayer, CircuitHandle, CircuitState, FirstRead, FirstReadBreaker,
        error::CircuitOpen,
    };
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, DuplexStream, ReadBuf, duplex};
    use tokio_test::{assert_pending, task};
    use tower::{Layer, Service, ServiceExt};
    use tower_test::mock::{self, Handle, Mock};

    type Svc = FirstReadBreaker<Mock<(), DuplexStream>>;

    const OPEN_FOR: Duration = Duration::from_secs(10);
    const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

    fn setup(consecutive: u32) -> (Svc, Handle<(), DuplexStream>, CircuitHandle) {
        let layer = CircuitBreakerLayer::builder("upstream")
            .consecutive_failures(Some(consecutive))
            .open_for(OPEN_FOR)
            .probe_timeout(PROBE_TIMEOUT)
            .half_open_permits(1)
            .build();
        let circuit = layer.handle();
        let (mock, handle) = mock::pair::<(), DuplexStream>();
        (layer.judge_by_first_read().layer(mock), handle, circuit)
    }

    /// One call the connector answers with a fresh stream: the breaker's stream and
    /// the server's end.
    async fn connect(
        svc: &mut Svc,
        handle: &mut Handle<(), DuplexStream>,
    ) -> (FirstRead<DuplexStream>, DuplexStream) {
        let fut = svc.ready().await.unwrap().call(());
        let mut next = task::spawn(handle.next_request());
        let ((), send) = tokio_test::assert_ready!(next.poll()).expect("the connector was called");
        let (client, server) = duplex(64);
        send.send_response(client);
        (fut.await.unwrap(), server)
    }

    async fn assert_fails_fast(svc: &mut Svc, handle: &mut Handle<(), DuplexStream>) {
        let err = svc.ready().await.unwrap().call(()).await.unwrap_err();
        assert!(find::<CircuitOpen>(&*err).is_some(), "{err}");
        assert_eq!(label_of(&*err), ("circuit_breaker", "open"));
        let mut next = task::spawn(handle.next_request());
        assert_pending!(next.poll(), "the connector must not be called");
    }

    /// Opens the circuit and waits out the open period: the next call is the probe.
    async fn half_open(circuit: &CircuitHandle) {
        circuit.record_failure();
        assert_eq!(circuit.state(), CircuitState::Open);
        tokio::time::sleep(OPEN_FOR).await;
        assert_eq!(circuit.state(), CircuitState::HalfOpen);
    }

    /// The server's first byte, read through the breaker's stream.
    async fn answer(io: &mut FirstRead<DuplexStream>, server: &mut DuplexStream) {
        server.write_all(&[0x20]).await.unwrap();
        let mut byte = [0; 1];
        io.read_exact(&mut byte).await.unwrap();
        assert_eq!(byte, [0x20]);
    }

    /// A stalled server completes every connect: judged by the connect, a half-open
    /// probe would give its permit back at once and let every client through to the
    /// stall. Judged by the first read, the probe holds its permit until the server
    /// answers, and the answer closes the circuit.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_probe_holds_its_permit_until_the_server_answers() {
        let (mut svc, mut handle, circuit) = setup(1);
        half_open(&circuit).await;
        let (mut probe, mut server) = connect(&mut svc, &mut handle).await;
        assert!(probe.is_pending());
        for _ in 0..3 {
            assert_fails_fast(&mut svc, &mut handle).await;
        }
        assert_eq!(circuit.state(), CircuitState::HalfOpen);

        answer(&mut probe, &mut server).await;
        assert!(!probe.is_pending());
        assert_eq!(circuit.state(), CircuitState::Closed);
        let _next = connect(&mut svc, &mut handle).await;
    }

    /// A probe whose client goes away (its stream dropped) or whose server closes or
    /// fails before any byte says nothing of the server: its permit goes back, the
    /// circuit stays half-open, and the next client is the next probe. Counted as a
    /// failure, one client could keep the circuit open for everyone.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_probe_dropped_or_ended_before_any_byte_gives_its_permit_back() {
        let (mut svc, mut handle, circuit) = setup(1);
        half_open(&circuit).await;

        let (probe, _server) = connect(&mut svc, &mut handle).await;
        assert_fails_fast(&mut svc, &mut handle).await;
        drop(probe);
        assert_eq!(circuit.state(), CircuitState::HalfOpen);

        let (mut probe, server) = connect(&mut svc, &mut handle).await;
        assert_fails_fast(&mut svc, &mut handle).await;
        drop(server); // the server closes without a byte
        assert_eq!(probe.read(&mut [0; 8]).await.unwrap(), 0);
        assert!(!probe.is_pending(), "the end judged it");
        assert_eq!(circuit.state(), CircuitState::HalfOpen);

        let (mut probe, mut server) = connect(&mut svc, &mut handle).await;
        answer(&mut probe, &mut server).await;
        assert_eq!(circuit.state(), CircuitState::Closed);
    }

    /// A probe still unanswered at `probe_timeout` failed: the circuit re-opens, and a
    /// byte read after that changes nothing.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_probe_unanswered_at_its_timeout_reopens_the_circuit() {
        let (mut svc, mut handle, circuit) = setup(1);
        half_open(&circuit).await;
        let (mut probe, mut server) = connect(&mut svc, &mut handle).await;
        tokio::time::sleep(PROBE_TIMEOUT).await;
        assert_eq!(circuit.state(), CircuitState::Open);
        assert_fails_fast(&mut svc, &mut handle).await;

        answer(&mut probe, &mut server).await;
        assert_eq!(circuit.state(), CircuitState::Open, "a late answer");
    }

    /// While closed, a successful connect is no success (it would reset the failures
    /// reported in between); the server's first byte is.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn while_closed_the_first_byte_is_the_success_not_the_connect() {
        let (mut svc, mut handle, circuit) = setup(2);
        let (mut first, mut server) = connect(&mut svc, &mut handle).await;
        circuit.record_failure();
        answer(&mut first, &mut server).await; // resets the run
        circuit.record_failure();
        assert_eq!(circuit.state(), CircuitState::Closed);

        let _stalled = connect(&mut svc, &mut handle).await;
        circuit.record_failure();
        assert_eq!(
            circuit.state(),
            CircuitState::Open,
            "the connect reset nothing"
        );
    }

    /// A failed connect is classified at once, as by the plain breaker.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_failed_connect_is_a_failure_at_once() {
        let (mut svc, mut handle, circuit) = setup(1);
        let fut = svc.ready().await.unwrap().call(());
        let ((), send) = {
            let mut next = task::spawn(handle.next_request());
            tokio_test::assert_ready!(next.poll()).unwrap()
        };
        send.send_error(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        let err = fut.await.unwrap_err();
        assert!(err.is::<std::io::Error>(), "{err}");
        assert_eq!(circuit.state(), CircuitState::Open);
        assert_fails_fast(&mut svc, &mut handle).await;
    }

    /// A read into a full buffer returns no bytes and is no end of stream: it judges
    /// nothing.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_read_with_no_room_judges_nothing() {
        let (mut svc, mut handle, circuit) = setup(1);
        half_open(&circuit).await;
        let (mut probe, mut server) = connect(&mut svc, &mut handle).await;
        let mut empty = [0u8; 0];
        let mut buf = ReadBuf::new(&mut empty);
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut probe).poll_read(cx, &mut buf))
            .await
            .unwrap();
        assert!(probe.is_pending());
        assert_eq!(circuit.state(), CircuitState::HalfOpen);
        answer(&mut probe, &mut server).await;
        assert_eq!(circuit.state(), CircuitState::Closed);
    }
}
