//! [`ClientBody`]: a request body on its way to a backend, whose failures are marked as
//! the client's, so that a client cannot open a backend's circuit breaker.
//!
//! A client can make a proxied request fail in two ways that look like a backend's
//! failure unless marked:
//!
//! - **Its body fails**: a malformed chunk, a body shorter than its `Content-Length` cut
//!   off by a close, a body over the size limit. hyper's client reports the body's error
//!   as the request's error. [`ClientBody`] wraps each of them in a [`ClientBodyError`].
//! - **Its body stalls**: the backend waits for the rest until the response timeout
//!   fires. [`ClientBody`] records in its [`Progress`] whether its last poll of the
//!   client's body was pending, that is whether the gateway is waiting on the client.
//!   When the timeout fires then, [`Upstream`](crate::proxy::Upstream) reports a
//!   [`ClientBodyError`] ([`is_stall`](ClientBodyError::is_stall)) instead of the
//!   timeout. A backend that stops reading a large body stalls it too, but then the
//!   gateway is waiting on the backend (hyper polls a body only when it can write it),
//!   and the timeout counts against the backend. Once the backend has answered, that
//!   wait has no response timeout left, and the body's deadline (below) is not polled
//!   either: the connection's write-stall limit
//!   ([`WriteTimeout`](crate::write_timeout::WriteTimeout)) closes it.
//!
//! **A body has a deadline of its own**, given to [`ClientBody::new`]:
//! [`Upstream`](crate::proxy::Upstream) gives it the call's response deadline (the
//! gateway's `backend_timeout` from the call). The response timeout alone bounds the body
//! only until the backend's response head: hyper's client then hands the response over
//! and goes on streaming the body, and a backend that answers at once and reads the body
//! at its leisure (or discards it, as nginx does after an early answer) would leave the
//! body with no bound but the slowloris idle clock, which a byte now and then resets: a
//! client sending `Content-Length: 1000000` and one byte a minute held a client
//! connection and a backend connection for ever. Past the deadline, a poll of the body
//! that finds the gateway waiting on the client fails it with a stall
//! ([`ClientBodyError::stalled`], logged at debug as `request body stalled past its
//! deadline`); hyper's
//! client closes the backend connection, and the gateway closes the client's once the
//! response is out. So a client must have sent its whole body within the backend
//! timeout of its request's call, whether the backend answers first or reads it all
//! first, as most do (the response timeout then answers `408`, see below). A body
//! whose data is ready is never failed: once the gateway is not waiting on the client,
//! the time is the backend's. The deadline's timer is armed at the first poll that waits
//! on the client, so a body that never waits costs no timer.
//!
//! **An answer that is over ends the body.** A backend may answer before it has read
//! the body (an early `401` or `413`; with `Expect: 100-continue`, before it asked for
//! the body), and never read it. The answer went out at once, but hyper's server frames
//! a connection's next request only after the body's end, so it kept the client's
//! connection open, and hyper's client the backend's, until the deadline above, for a
//! body nobody would read. Now an answer that comes before the body has gone out whole
//! says `Connection: close` ([`crate::proxy`]), and when it is over (the
//! [`BackendBody`](crate::backend_body::BackendBody) dropped: hyper's server had its
//! end, or the client went away) the body is abandoned ([`Progress::abandon`]): the
//! client's body is dropped, so hyper's server stops reading it and closes the
//! connection after the answer, as servers do with a body they leave unread (hyper's own,
//! Go's net/http past 256 KiB), and the next poll of the [`ClientBody`] fails, so
//! hyper's client closes the backend's connection (one whose socket is full, hyper's
//! client does not poll the body, is closed by the write-stall limit). The rest of the
//! body is not sent to the backend: the exchange is over. An answer still streaming
//! keeps the body going (a backend may read it as it answers) up to its deadline. A
//! client still sending when the connection closes may see a reset, and lose the end of
//! the answer if it had not read it yet: the gateway does no lingering close.
//!
//! The same [`Progress`] adds up the time the gateway spent waiting on the client's
//! body ([`client_time`](Progress::client_time)): [`Upstream`](crate::proxy::Upstream)
//! leaves it out of the latency samples it gives the adaptive controller, which must
//! measure the backend, not how slowly a client uploads.
//!
//! The same time is left out of the response timeout: the backend has `backend_timeout`
//! of its own time, so a body finished just before its deadline does not leave the
//! backend the few milliseconds that remain (see [`Upstream`](crate::proxy::Upstream)).
//!
//! A stall has one more clock when the request is the half-open breaker's probe: the
//! breaker counts a probe still in flight at its probe timeout as failed and re-opens,
//! whatever the call reports later. So [`Upstream`](crate::proxy::Upstream) checks a
//! probe shortly before that timeout too (see
//! [`Upstream::watch_probes`](crate::proxy::Upstream::watch_probes)): one still waiting
//! on the client, or whose client's body took too much of the probe's time for the
//! backend to be judged on its own, ends there as a stall, and the breaker gets its
//! "ignore" in time.
//!
//! **A connection that fails mid-upload** is not counted against the backend either.
//! The backend may close or reset its connection while hyper still sends the body: it
//! gave up waiting for a client that sends slowly (its own request timeout), or it
//! answered early (`401`, `413`) and closed without reading the rest, and the kernel's
//! reset can destroy the answer before hyper reads it. hyper's client then reports a
//! `SendRequest` error, which looked like any reset: one client sending heads with
//! `Content-Length: 100` and three bytes opened the breaker for everyone after five
//! requests, and so did one uploading a large body to a URL the backend refuses early.
//! [`Progress`] records whether hyper has begun to send the body (it polled it) and
//! whether it has had all of it; a failure of the call in between (not a failed
//! connect, which comes before the head) becomes an [`UploadCut`]: the client gets
//! `502` (`aegis_http_backend_errors_total{reason="during_upload"}`), the breaker hears
//! "ignore". A backend that resets every request with a body is then judged by its
//! requests without one (and its health checks): a client can withhold a body, but
//! cannot tell a reset it caused from one it did not.
//!
//! The breaker's classifier ignores a [`ClientBodyError`]; the proxy answers `400`
//! (`408` for a stall, `413` over the size limit), unless the backend has answered
//! already: then its answer is on its way to the client, and the connection is closed
//! after it.

use std::error::Error;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use aegis_core::BoxError;
use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use parking_lot::Mutex;
use tokio::time::{Instant, Sleep};

use crate::proxy::GatewayBody;

/// Marks the errors of the client's body it holds as [`ClientBodyError`]s, records when
/// it waits on the client, fails as stalled when it still waits on the client past its
/// deadline, and fails once the body was abandoned ([`Progress::abandon`]). See the
/// [module docs](self).
#[derive(Debug)]
pub struct ClientBody {
    // The client's body is in `waits`, where `Progress::abandon` can drop it.
    waits: Arc<Mutex<Waits>>,
    deadline: Instant,
    // Armed at the first poll that waits on the client.
    timer: Option<Pin<Box<Sleep>>>,
}

/// The client's body, the gateway's waits on it, and how far it got.
#[derive(Debug, Default)]
struct Waits {
    /// The client's body; `None` once abandoned.
    body: Option<GatewayBody>,
    /// The task of the last poll that waited on the client: woken when the body is
    /// abandoned.
    waker: Option<Waker>,
    /// Since when it waits: the body's last poll was pending.
    since: Option<Instant>,
    /// The waits that ended.
    total: Duration,
    /// hyper has polled the body: the request head went out on a connection.
    started: bool,
    /// The body has been handed to hyper whole (its end seen, or it had none).
    done: bool,
}

impl ClientBody {
    /// Wraps `inner`, which must be in by `deadline` (see the [module docs](self)); the
    /// [`Progress`] tells whether and how long it waits on the client, and abandons it.
    pub fn new(inner: GatewayBody, deadline: Instant) -> (Self, Progress) {
        let waits = Arc::new(Mutex::new(Waits {
            done: inner.is_end_stream(),
            body: Some(inner),
            ..Waits::default()
        }));
        let progress = Progress(Arc::clone(&waits));
        let body = Self {
            waits,
            deadline,
            timer: None,
        };
        (body, progress)
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let mut waits = this.waits.lock();
        let waits = &mut *waits;
        let Some(inner) = waits.body.as_mut() else {
            return Poll::Ready(Some(Err(ClientBodyError::failed(Abandoned.into()).into())));
        };
        let poll = Pin::new(&mut *inner).poll_frame(cx);
        waits.started = true;
        if matches!(poll, Poll::Ready(None))
            || matches!(poll, Poll::Ready(Some(Ok(_)))) && inner.is_end_stream()
        {
            waits.done = true;
        }
        match (poll.is_pending(), waits.since) {
            (true, None) => waits.since = Some(Instant::now()),
            (false, Some(since)) => {
                waits.since = None;
                waits.total += Instant::now().saturating_duration_since(since);
            }
            _ => {}
        }
        if poll.is_pending() {
            match &mut waits.waker {
                Some(waker) => waker.clone_from(cx.waker()),
                None => waits.waker = Some(cx.waker().clone()),
            }
            let deadline = this.deadline;
            let timer = this
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if timer.as_mut().poll(cx).is_ready() {
                tracing::debug!("request body stalled past its deadline");
                return Poll::Ready(Some(Err(ClientBodyError::stalled().into())));
            }
        }
        poll.map(|frame| frame.map(|r| r.map_err(|e| ClientBodyError::failed(e).into())))
    }

    fn is_end_stream(&self) -> bool {
        let mut waits = self.waits.lock();
        let end = waits.body.as_ref().is_some_and(Body::is_end_stream);
        if end {
            waits.done = true;
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        let waits = self.waits.lock();
        waits.body.as_ref().map(Body::size_hint).unwrap_or_default()
    }
}

/// Whether, and how long, a [`ClientBody`] waits on the client.
#[derive(Debug, Clone)]
pub struct Progress(Arc<Mutex<Waits>>);

impl Progress {
    /// The body's last poll was pending: the client has not sent the rest yet.
    pub fn waiting_on_client(&self) -> bool {
        self.0.lock().since.is_some()
    }

    /// hyper has begun sending the body (it polled it: the request head is out on a
    /// connection) and has not had all of it: a failure of the connection now cut the
    /// client's upload short, and may be of the client's making ([`UploadCut`]).
    pub fn upload_unfinished(&self) -> bool {
        let waits = self.0.lock();
        waits.started && !waits.done
    }

    /// The body went out whole: it was empty, or its last frame was polled. Until then
    /// an error of the backend's connection may be the client's doing (its body failed
    /// or stalled, and hyper closed the connection), and
    /// [`BackendBody`](crate::backend_body::BackendBody) does not count it.
    pub fn sent(&self) -> bool {
        self.0.lock().done
    }

    /// The answer to the request is over (its body ended, or was dropped): if the body
    /// has not gone out whole, nobody will read the rest. The client's body is dropped,
    /// so that hyper's server stops reading it and closes the client's connection once
    /// the answer is out (the answer says `Connection: close`, see
    /// [`crate::proxy`]), and the next poll of the [`ClientBody`] fails, so that
    /// hyper's client closes the backend's connection. See the [module docs](self).
    pub fn abandon(&self) {
        let (body, waker) = {
            let mut waits = self.0.lock();
            if waits.done {
                return;
            }
            (waits.body.take(), waits.waker.take())
        };
        if body.is_some() {
            tracing::debug!("request body abandoned: the answer is over before it was sent");
        }
        drop(body); // outside the lock: it wakes hyper's server
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// The time the body spent waiting on the client up to `now`: from each poll that
    /// found it pending to the next one that did not (or `now`). Time hyper spends
    /// writing to the backend, or waiting for the backend to read, is not in it: hyper
    /// polls the body only when it can write.
    pub fn client_time(&self, now: Instant) -> Duration {
        let waits = self.0.lock();
        let current = waits
            .since
            .map_or(Duration::ZERO, |since| now.saturating_duration_since(since));
        waits.total + current
    }
}

/// The connection to the backend failed while its request body was still being sent
/// ([`Progress::upload_unfinished`]): the `502` is answered (`during_upload`), but the
/// breaker does not count it. See the [module docs](self).
#[derive(Debug)]
pub struct UploadCut {
    source: BoxError,
}

impl UploadCut {
    /// The connection's failure, `source`, cut the upload short.
    pub fn new(source: BoxError) -> Self {
        Self { source }
    }
}

impl fmt::Display for UploadCut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("backend connection failed before the request body was all sent")
    }
}

impl Error for UploadCut {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&*self.source)
    }
}

/// A [`ClientBody`] polled after it was abandoned ([`Progress::abandon`]): the answer
/// to the request was over before the body had gone out whole.
#[derive(Debug)]
pub struct Abandoned;

impl fmt::Display for Abandoned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("request body abandoned: the answer was over before it was sent")
    }
}

impl Error for Abandoned {}

/// The client's request body failed or stalled: the client's fault, not the backend's.
#[derive(Debug)]
pub struct ClientBodyError {
    /// The body's error; `None`: it stalled.
    source: Option<BoxError>,
}

impl ClientBodyError {
    /// The body failed with `source`.
    pub fn failed(source: BoxError) -> Self {
        Self {
            source: Some(source),
        }
    }

    /// The body stalled: the client had not sent it when the response timeout fired, or
    /// by the body's own deadline.
    pub const fn stalled() -> Self {
        Self { source: None }
    }

    /// Whether the body stalled (rather than failed).
    pub const fn is_stall(&self) -> bool {
        self.source.is_none()
    }
}

impl fmt::Display for ClientBodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.is_stall() {
            "request body stalled"
        } else {
            "request body failed"
        })
    }
}

impl Error for ClientBodyError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use http_body_util::BodyExt;

    use super::*;

    /// A body that plays a script: `Some(chunk)` is a frame, `None` a pending poll.
    struct Script(VecDeque<Option<&'static str>>);

    impl Body for Script {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            match self.0.pop_front() {
                Some(Some(chunk)) => Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk))))),
                Some(None) => Poll::Pending,
                None => Poll::Ready(None),
            }
        }
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn past_its_deadline_a_body_waiting_on_the_client_stalls_one_with_data_does_not() {
        let deadline = Instant::now() + Duration::from_secs(5);
        let script = Script([None, Some("a"), None].into());
        let (body, progress) = ClientBody::new(script.boxed_unsync(), deadline);
        let mut body = std::pin::pin!(body);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut poll = || match body.as_mut().poll_frame(&mut cx) {
            Poll::Pending => "pending",
            Poll::Ready(Some(Ok(_))) => "data",
            Poll::Ready(Some(Err(e))) if find_stall(&e) => "stalled",
            Poll::Ready(Some(Err(_))) => "failed",
            Poll::Ready(None) => "end",
        };

        assert_eq!(poll(), "pending");
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(
            poll(),
            "data",
            "data ready past the deadline is the backend's time"
        );
        assert_eq!(poll(), "stalled", "waiting on the client past the deadline");
        assert!(progress.waiting_on_client());
    }

    fn find_stall(e: &BoxError) -> bool {
        e.downcast_ref::<ClientBodyError>()
            .is_some_and(ClientBodyError::is_stall)
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn the_time_spent_waiting_on_the_client_is_counted_and_no_other() {
        let step = |ms| tokio::time::advance(Duration::from_millis(ms));
        let script = Script([None, Some("a"), None, Some("b")].into());
        let far = Instant::now() + Duration::from_secs(3600);
        let (body, progress) = ClientBody::new(script.boxed_unsync(), far);
        let mut body = std::pin::pin!(body);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut poll = || body.as_mut().poll_frame(&mut cx).is_pending();

        step(40).await; // before the first poll: connecting, writing the head
        assert!(poll(), "pending");
        assert!(progress.waiting_on_client());
        step(100).await;
        assert!(!poll(), "a");
        assert!(!progress.waiting_on_client());
        assert_eq!(
            progress.client_time(Instant::now()),
            Duration::from_millis(100)
        );
        step(50).await; // writing `a` to the backend
        assert!(poll(), "pending");
        step(30).await;
        assert_eq!(
            progress.client_time(Instant::now()),
            Duration::from_millis(130),
            "a wait still going on counts up to now"
        );
        assert!(!poll(), "b");
        assert!(!poll(), "end");
        step(20).await; // the backend's answer
        assert_eq!(
            progress.client_time(Instant::now()),
            Duration::from_millis(130)
        );
    }
}
