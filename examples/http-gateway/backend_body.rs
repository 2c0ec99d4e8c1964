//! [`BackendBody`]: a backend's response body on its way to the client, whose failure
//! is the backend's, so that a backend that cuts its answers short leaves the rotation.
//!
//! The breaker judges a call at the response head; the body comes after. A backend that
//! sends `200` with `Content-Length: 1000`, ten bytes, then closes or resets, was judged
//! a success, and the body's error went to nobody: the client got ten bytes and a closed
//! connection, nothing was counted, and the breaker never opened however often it
//! happened. Now:
//!
//! - **The success of an answer with a body is the body's**: [`Upstream`] gives the
//!   body a [`Verdict::Pending`], the classifier ([`GatewayClassifier`]) ignores the
//!   head, and the body records the success on the breaker once it ends. A body error
//!   from the backend records a failure instead, once, and counts
//!   `aegis_http_backend_errors_total{reason="truncated"}`. (Recorded at the head, the
//!   success reset the consecutive-failure count before each body's failure, and a
//!   backend truncating every answer never reached the threshold.)
//! - **An answer the head judged otherwise** keeps that judgement: a `502`, `503` or
//!   `504` of the backend's own was a failure at the head, and its truncated body is
//!   counted in the metric only; another `5xx`, ignored at the head, records a failure
//!   if its body fails ([`Verdict::FailOnly`]).
//! - **Only in the breaker's state of the call**: the outcome is recorded against the
//!   [`Mark`] [`Upstream`] took when the breaker admitted the call
//!   ([`CircuitHandle::record_success_since`]), and is ignored if the circuit changed
//!   state since, as the outcome of a call admitted in an earlier state is. A download
//!   begun while the circuit was closed says nothing of the backend once the circuit
//!   has opened: recorded as it was (`record_success`, whatever the state), each such
//!   download a client held and then dropped closed a half-open circuit with no probe
//!   ever reaching the backend.
//! - **A dropped body is a cancellation**: the client went away, or its timeout fired,
//!   before the end; nothing showed the backend failing, nor succeeding, so nothing is
//!   recorded. (Recorded as a success, it reset the consecutive-failure count: a client
//!   that gave up on a hung download after every four `503`s kept a backend failing
//!   every request in rotation.)
//! - **The client's doing is not counted**: an error while the client's request body
//!   has not gone out whole ([`Progress::sent`]) may be hyper closing the connection
//!   because that body failed or stalled ([`crate::client_body`]), so it records
//!   nothing and counts nothing; a body the client stops reading is dropped, not failed.
//! - **Nor a send timeout the client caused**: a client that stops reading a download
//!   stops hyper polling the body, the gateway stops reading the backend's socket, and
//!   the backend's writes stall once the socket buffers are full; a real backend gives
//!   up on them (nginx's `send_timeout`, 60 s; the gateway itself lets a silent client
//!   sit 75 s) and closes, and when the client reads on, the body ends short of its
//!   length. So a body error after the client held the body back ([`ClientHold`]: a
//!   frame, or the head, waited over [`CLIENT_HOLD_BOUND`] for hyper's next poll) is
//!   counted `truncated_held` and records nothing on the breaker. (Counted as the
//!   backend's failure, a few clients pausing their downloads opened its breaker, and
//!   every other client got `503`: the download-side twin of `during_upload`.)
//!
//! - **A backend that stalls mid-body fails it**: each wait for the backend's next
//!   frame (from a poll of the body that found nothing, to the frame) has the backend
//!   timeout, 30 s by default, as nginx's `proxy_read_timeout` times each read. On
//!   expiry the body fails with [`BodyTimeout`], counted
//!   `aegis_http_backend_errors_total{reason="body_timeout"}` and a failure of the
//!   breaker as a cut body is (with the same exception: nothing while the client's
//!   request body has not gone out whole). Before, the backend's head timeout ended at
//!   the head and nothing bounded the body: a backend that sent `Content-Length: 100`,
//!   five bytes and then nothing held the client until the client's own idle clock cut
//!   it, which blamed the client (a slowloris `idle` cut) and left the breaker closed;
//!   and once writes to the client count as its activity (see `gateway`), a backend
//!   trickling a byte now and then held it for ever. Only the backend's time counts:
//!   the wait begins when hyper polls the body and the backend has nothing for it, so a
//!   client holding the body back (hyper not polling) is not timed.
//!
//! Either way the error reaches hyper's server, which closes the client's connection
//! short of the announced length (or without the last chunk), so that an HTTP/1.1
//! client sees the truncation. **An HTTP/1.0 client may not**: an answer without a
//! `Content-Length` (the backend's chunked answer) goes to it delimited by the close of
//! the connection, and the gateway closes it with a FIN as at the body's end, so the
//! client takes the cut body for whole (the metric still counts it). Only a reset would
//! tell it, and the gateway does not reach the socket under its generic stream to send
//! one.
//!
//! The wrapper is the boxed body's only allocation; it holds the call's [`Progress`] and
//! its breaker's [`CircuitHandle`] and [`Mark`] (a reference count and a number, no
//! allocation) and its timer inline (a tokio `Sleep`, armed at the first wait on the
//! backend and then moved only when it fires early, so a frame costs no timer
//! operation), reads the clock once per poll for its [`ClientHold`] and its timer, and
//! counts with the `metrics` macro only on the error path.
//!
//! [`Upstream`]: crate::proxy::Upstream
//! [`GatewayClassifier`]: crate::proxy::GatewayClassifier

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use aegis_core::BoxError;
use aegis_layers::circuit_breaker::{CircuitHandle, Mark};
use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep, sleep_until};

use crate::client_body::Progress;
use crate::refusal::{BackendError, count_backend_error};
use crate::write_timeout::wait_reached;

/// What a [`BackendBody`] still has to tell its breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The head was a success left to the body: a success when it ends, a failure if
    /// the backend fails it, nothing if it is dropped.
    Pending,
    /// The head was ignored: a failure if the backend fails the body, else nothing.
    FailOnly,
    /// Nothing (the head was a failure, or the body's verdict is in, or there is no
    /// breaker to tell): a failed body is counted in the metric only.
    Done,
}

/// The longest a frame of a backend's body (or its head) may wait for hyper's next poll
/// of the body before the client counts as holding the body back ([`ClientHold`]): 1 s.
///
/// hyper polls the body again as soon as the client's socket has taken the last frame,
/// so a client reading at any steady pace leaves gaps of milliseconds; a gap of a second
/// is a client that stopped reading (or the gateway stalled for a second, which is not
/// the backend's doing either). It must be shorter than any backend's send timeout, so
/// that a hold long enough for the backend to give up is always seen: those are tens of
/// seconds (nginx's `send_timeout` and Apache's `Timeout`, 60 s), and a write stalls only
/// once the socket buffers between the client and the backend, megabytes, are full.
/// The price: a backend that fails a body for its own reasons after such a pause is
/// counted in the metric only (`truncated_held`), not against its breaker.
pub const CLIENT_HOLD_BOUND: Duration = Duration::from_secs(1);

/// Whether the client held a backend's body back: a frame (or the head) it was handed
/// waited over [`CLIENT_HOLD_BOUND`] for hyper's next poll of the body. hyper polls the
/// body when the client's socket can take more, so the wait is the client's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientHold {
    /// Since when a frame waits for hyper's next poll (none while a poll waits on the
    /// backend).
    since: Option<Instant>,
    /// A wait was longer than the bound.
    held: bool,
}

impl ClientHold {
    /// The head was handed on at `now`: the first poll is awaited.
    pub fn new(now: Instant) -> Self {
        Self {
            since: Some(now),
            held: false,
        }
    }

    /// hyper polls the body at `now`: the wait since the last frame ends.
    pub fn polled(&mut self, now: Instant) {
        if let Some(since) = self.since.take()
            && now.saturating_duration_since(since) > CLIENT_HOLD_BOUND
        {
            self.held = true;
        }
    }

    /// A frame was handed on at `now`.
    pub fn handed(&mut self, now: Instant) {
        self.since = Some(now);
    }

    /// Whether any wait was longer than [`CLIENT_HOLD_BOUND`].
    pub fn held(&self) -> bool {
        self.held
    }
}

/// The error of a backend's body that sent nothing for the backend timeout (see the
/// [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyTimeout(pub Duration);

impl fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the backend sent nothing of its body for {:?}", self.0)
    }
}

impl std::error::Error for BodyTimeout {}

/// The wait on the backend for its next frame, bounded by the backend timeout.
#[derive(Debug, Clone, Copy)]
struct Wait {
    /// The backend timeout.
    timeout: Duration,
    /// Since when a poll of the body waits on the backend (none while the last poll
    /// had a frame).
    since: Option<Instant>,
}

pin_project! {
    /// A backend's response body (hyper's [`Incoming`]; another body in the tests): see
    /// the [module docs](self). Dropped before its end it records nothing. Dropped at
    /// all, the answer is over: a client's body not sent whole by then is abandoned
    /// ([`Progress::abandon`]).
    #[derive(Debug)]
    #[project = BackendBodyProj]
    pub struct BackendBody<B = Incoming> {
        #[pin]
        inner: B,
        progress: Progress,
        breaker: Option<(CircuitHandle, Mark)>,
        verdict: Verdict,
        hold: ClientHold,
        wait: Wait,
        // Armed at or before the end of the current wait; made at the first wait and
        // reset in place (only moved when it fires early).
        #[pin]
        timer: Option<Sleep>,
    }

    impl<B> PinnedDrop for BackendBody<B> {
        fn drop(this: Pin<&mut Self>) {
            // hyper's server drops the body when it has had its end (or the client
            // went away): nobody reads the rest of the client's body now.
            this.progress.abandon();
        }
    }
}

impl<B: Body> BackendBody<B> {
    /// `inner`, of the call whose client's body is `progress`, judged for `breaker`
    /// against the [`Mark`] taken when it admitted the call (`None`: nothing to tell;
    /// the error is still counted) as `verdict` says; each wait for its next frame has
    /// `timeout` (the backend timeout).
    pub fn new(
        inner: B,
        progress: Progress,
        breaker: Option<(CircuitHandle, Mark)>,
        verdict: Verdict,
        timeout: Duration,
    ) -> Self {
        let verdict = if breaker.is_some() && !inner.is_end_stream() {
            verdict
        } else {
            Verdict::Done
        };
        Self {
            inner,
            progress,
            breaker,
            verdict,
            hold: ClientHold::new(Instant::now()),
            wait: Wait {
                timeout,
                since: None,
            },
            timer: None,
        }
    }

    /// Whether the success of this answer is left to its body (the classifier then
    /// ignores the head).
    pub fn is_pending(&self) -> bool {
        self.verdict == Verdict::Pending
    }

    /// Whether the client's request body has gone out whole ([`Progress::sent`]): if
    /// not, the client's connection is closed after this answer (see
    /// [`crate::client_body`]).
    pub fn request_sent(&self) -> bool {
        self.progress.sent()
    }
}

impl<B> BackendBodyProj<'_, B> {
    /// A poll at `now` found no frame: whether the wait on the backend, begun then or
    /// earlier, has reached the timeout. If not, the timer is armed for its end.
    fn waited_out(&mut self, now: Instant, cx: &mut Context<'_>) -> bool {
        let since = *self.wait.since.get_or_insert(now);
        let Some(end) = since.checked_add(self.wait.timeout) else {
            return false; // some thirty years: no end
        };
        if now >= end {
            return true;
        }
        if self.timer.is_none() {
            self.timer.set(Some(sleep_until(end)));
        }
        // Waits only begin later, so the timer is at or before this one's end; it fires
        // early when it was armed for an earlier wait.
        self.timer
            .as_mut()
            .as_pin_mut()
            .is_some_and(|timer| wait_reached(timer, end, cx))
    }

    /// Tells the breaker how the body ended, once: `failed` by the backend, or not; only
    /// if the circuit is still in the state of the call's mark.
    fn settle(&mut self, failed: bool) {
        let verdict = std::mem::replace(self.verdict, Verdict::Done);
        let Some((breaker, mark)) = self.breaker.as_ref() else {
            return;
        };
        match (verdict, failed) {
            (Verdict::Pending | Verdict::FailOnly, true) => breaker.record_failure_since(*mark),
            (Verdict::Pending, false) => breaker.record_success_since(*mark),
            (Verdict::FailOnly, false) | (Verdict::Done, _) => {}
        }
    }
}

impl<B> Body for BackendBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let now = Instant::now();
        this.hold.polled(now);
        let poll = match this.inner.as_mut().poll_frame(cx) {
            Poll::Pending if this.waited_out(now, cx) => {
                let timeout = this.wait.timeout;
                this.wait.since = None;
                this.timer.set(None);
                if this.progress.sent() {
                    tracing::debug!(?timeout, "backend answer stalled mid-body: cut off");
                    count_backend_error(BackendError::BodyTimeout);
                    this.settle(true);
                } else {
                    // As for a cut body: maybe waiting on the client's body.
                    tracing::debug!(
                        ?timeout,
                        "backend answer stalled before the request body was sent"
                    );
                    *this.verdict = Verdict::Done;
                }
                return Poll::Ready(Some(Err(BodyTimeout(timeout).into())));
            }
            Poll::Pending => return Poll::Pending,
            Poll::Ready(frame) => {
                this.wait.since = None;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
        };
        match &poll {
            Poll::Ready(None) => this.settle(false),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.settle(false),
            Poll::Ready(Some(Ok(_))) => this.hold.handed(now),
            Poll::Ready(Some(Err(e))) if !this.progress.sent() => {
                // Maybe the client's body failing (hyper then closes the connection): not
                // the backend's to answer for.
                tracing::debug!(error = %e, "backend answer cut off before the request body was sent");
                *this.verdict = Verdict::Done;
            }
            Poll::Ready(Some(Err(e))) if this.hold.held() => {
                // Maybe the backend's send timeout, the client having stopped reading.
                tracing::debug!(error = %e, "backend answer cut off after the client held it back");
                count_backend_error(BackendError::TruncatedHeld);
                *this.verdict = Verdict::Done;
            }
            Poll::Ready(Some(Err(e))) => {
                tracing::debug!(error = %e, "backend answer cut off");
                count_backend_error(BackendError::Truncated);
                this.settle(true);
            }
            Poll::Pending => {}
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use aegis_layers::circuit_breaker::{CircuitBreakerLayer, CircuitState};
    use http_body_util::{BodyExt, Empty};

    use super::*;
    use crate::client_body::ClientBody;

    /// A step of a [`Script`].
    #[derive(Debug, Clone, Copy)]
    enum Step {
        /// A data frame.
        Data(&'static str),
        /// A pending poll.
        Wait,
        /// An error: the backend cut the body off.
        Cut,
    }

    /// A backend's body that plays a script; it ends after its last step.
    struct Script(VecDeque<Step>);

    impl Body for Script {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            match self.0.pop_front() {
                Some(Step::Data(chunk)) => Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk))))),
                Some(Step::Wait) => Poll::Pending,
                Some(Step::Cut) => Poll::Ready(Some(Err(std::io::ErrorKind::UnexpectedEof.into()))),
                None => Poll::Ready(None),
            }
        }

        fn is_end_stream(&self) -> bool {
            self.0.is_empty()
        }
    }

    /// The progress of a request without a body: sent.
    fn sent() -> Progress {
        let empty = Empty::<Bytes>::new().map_err(|never| match never {});
        ClientBody::new(empty.boxed_unsync(), Instant::now()).1
    }

    /// `script` as the body of a call to `circuit` admitted at `mark` (pinned: its
    /// timer is inline).
    fn body(
        circuit: &CircuitHandle,
        script: &[Step],
        mark: Mark,
        verdict: Verdict,
    ) -> Pin<Box<BackendBody<Script>>> {
        let script = Script(script.iter().copied().collect());
        Box::pin(BackendBody::new(
            script,
            sent(),
            Some((circuit.clone(), mark)),
            verdict,
            TIMEOUT,
        ))
    }

    /// The backend timeout of the bodies here.
    const TIMEOUT: Duration = Duration::from_secs(30);

    /// One poll of `body`.
    async fn poll(
        body: &mut Pin<Box<BackendBody<Script>>>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        std::future::poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx))).await
    }

    /// A breaker that opens at the first failure, for 10 s.
    fn circuit() -> CircuitHandle {
        CircuitBreakerLayer::builder("backend0")
            .consecutive_failures(Some(1))
            .open_for(Duration::from_secs(10))
            .build()
            .handle()
    }

    /// A dropped body is a cancellation: it records nothing, for `Pending` and `FailOnly`
    /// alike (it recorded a success, which closed a half-open circuit with no probe).
    /// An ended body's success counts only in the state its call was admitted in.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_dropped_body_records_nothing_and_an_ended_one_counts_in_its_calls_state_only() {
        let circuit = circuit();
        let closed = circuit.mark();
        circuit.record_failure();
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(circuit.state(), CircuitState::HalfOpen);

        for verdict in [Verdict::Pending, Verdict::FailOnly] {
            let script = [Step::Data("0123456789"), Step::Wait];
            let mut held = body(&circuit, &script, circuit.mark(), verdict);
            assert!(matches!(poll(&mut held).await, Poll::Ready(Some(Ok(_)))));
            assert!(poll(&mut held).await.is_pending());
            drop(held);
            assert_eq!(circuit.state(), CircuitState::HalfOpen, "{verdict:?}");
        }

        // A body of a call admitted while closed ends: an earlier state's outcome.
        let mut old = body(
            &circuit,
            &[Step::Data("0123456789")],
            closed,
            Verdict::Pending,
        );
        assert!(matches!(poll(&mut old).await, Poll::Ready(Some(Ok(_)))));
        assert_eq!(
            circuit.state(),
            CircuitState::HalfOpen,
            "closed by an old call"
        );

        // The probe's body ends: closed.
        let script = [Step::Data("01234"), Step::Data("56789")];
        let mut probe = body(&circuit, &script, circuit.mark(), Verdict::Pending);
        assert!(matches!(poll(&mut probe).await, Poll::Ready(Some(Ok(_)))));
        assert_eq!(circuit.state(), CircuitState::HalfOpen);
        assert!(matches!(poll(&mut probe).await, Poll::Ready(Some(Ok(_)))));
        assert_eq!(circuit.state(), CircuitState::Closed);
    }

    /// A wait of a frame for hyper's next poll longer than the bound is a hold, and stays
    /// one; waits on the backend (from a pending poll to the next) are not.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_frame_waiting_past_the_bound_for_the_next_poll_is_a_hold() {
        let step = |d| tokio::time::advance(d);
        let mut hold = ClientHold::new(Instant::now());
        step(CLIENT_HOLD_BOUND).await;
        hold.polled(Instant::now()); // the head waited the bound exactly: no hold
        assert!(!hold.held());
        // The poll waits on the backend for long: not the client's.
        step(CLIENT_HOLD_BOUND * 10).await;
        hold.polled(Instant::now());
        hold.handed(Instant::now());
        assert!(!hold.held());
        step(CLIENT_HOLD_BOUND / 2).await;
        hold.polled(Instant::now());
        hold.handed(Instant::now());
        assert!(!hold.held());
        step(CLIENT_HOLD_BOUND + Duration::from_millis(1)).await;
        hold.polled(Instant::now());
        assert!(hold.held());
        hold.handed(Instant::now());
        hold.polled(Instant::now());
        assert!(hold.held(), "once held, the body stays held");

        let mut late = ClientHold::new(Instant::now());
        step(CLIENT_HOLD_BOUND * 2).await;
        late.polled(Instant::now());
        assert!(late.held(), "the head waited for the first poll");
    }

    /// A body the backend cuts off after the client held it back (the backend's send
    /// timeout, maybe) records nothing on the breaker; one cut off while the client read
    /// on, with pauses under the bound, is the backend's failure.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_body_cut_off_after_the_client_held_it_is_no_failure_of_the_backend() {
        let circuit = circuit();
        let script = [Step::Data("0123456789"), Step::Cut];
        let mut held = body(&circuit, &script, circuit.mark(), Verdict::Pending);
        assert!(matches!(poll(&mut held).await, Poll::Ready(Some(Ok(_)))));
        tokio::time::advance(CLIENT_HOLD_BOUND * 2).await;
        assert!(matches!(poll(&mut held).await, Poll::Ready(Some(Err(_)))));
        assert!(!held.is_pending(), "judged");
        drop(held);
        assert_eq!(circuit.state(), CircuitState::Closed);

        let script = [
            Step::Data("0123456789"),
            Step::Data("0123456789"),
            Step::Cut,
        ];
        let mut read_on = body(&circuit, &script, circuit.mark(), Verdict::Pending);
        for _ in 0..2 {
            tokio::time::advance(CLIENT_HOLD_BOUND / 2).await;
            assert!(matches!(poll(&mut read_on).await, Poll::Ready(Some(Ok(_)))));
        }
        tokio::time::advance(CLIENT_HOLD_BOUND / 2).await;
        assert!(matches!(
            poll(&mut read_on).await,
            Poll::Ready(Some(Err(_)))
        ));
        assert_eq!(circuit.state(), CircuitState::Open);
    }

    /// A backend that stalls mid-body was bounded by nothing of the gateway's (the
    /// client's idle clock cut it, and blamed the client). Each wait for its next frame
    /// now has the backend timeout: waits under it, however many, pass; one that reaches
    /// it fails the body with `BodyTimeout`, a failure of the backend's breaker.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_wait_on_the_backend_for_its_next_frame_is_bounded_by_the_backend_timeout() {
        let circuit = circuit();
        let short = TIMEOUT - Duration::from_millis(1);
        let mut script = vec![Step::Data("0123456789")];
        for _ in 0..3 {
            script.extend([Step::Wait, Step::Wait, Step::Data("0123456789")]);
        }
        script.extend([Step::Wait, Step::Wait, Step::Wait]);
        let mut stalling = body(&circuit, &script, circuit.mark(), Verdict::Pending);
        assert!(matches!(
            poll(&mut stalling).await,
            Poll::Ready(Some(Ok(_)))
        ));
        for _ in 0..3 {
            // A wait just under the timeout, then a frame: a new wait starts after it.
            assert!(poll(&mut stalling).await.is_pending());
            tokio::time::advance(short).await;
            assert!(poll(&mut stalling).await.is_pending());
            assert!(matches!(
                poll(&mut stalling).await,
                Poll::Ready(Some(Ok(_)))
            ));
        }
        assert!(poll(&mut stalling).await.is_pending());
        tokio::time::advance(short).await;
        assert!(poll(&mut stalling).await.is_pending());
        assert_eq!(circuit.state(), CircuitState::Closed);
        tokio::time::advance(Duration::from_millis(1)).await;
        let Poll::Ready(Some(Err(e))) = poll(&mut stalling).await else {
            panic!("not cut at the backend timeout");
        };
        assert_eq!(e.downcast_ref::<BodyTimeout>(), Some(&BodyTimeout(TIMEOUT)));
        assert_eq!(circuit.state(), CircuitState::Open, "the backend's failure");
    }
}
