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
//!   and the timeout counts against the backend.
//!
//! The same [`Progress`] adds up the time the gateway spent waiting on the client's
//! body ([`client_time`](Progress::client_time)): [`Upstream`](crate::proxy::Upstream)
//! leaves it out of the latency samples it gives the adaptive controller, which must
//! measure the backend, not how slowly a client uploads.
//!
//! A stall has one more clock when the request is the half-open breaker's probe: the
//! breaker counts a probe still in flight at its probe timeout as failed and re-opens,
//! whatever the call reports later. So [`Upstream`](crate::proxy::Upstream) checks a
//! probe shortly before that timeout too (see
//! [`Upstream::watch_probes`](crate::proxy::Upstream::watch_probes)): one still waiting
//! on the client ends there as a stall, and the breaker gets its "ignore" in time.
//!
//! The breaker's classifier ignores a [`ClientBodyError`]; the proxy answers `400`
//! (`408` for a stall, `413` over the size limit).

use std::error::Error;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use aegis_core::BoxError;
use hyper::body::{Body, Frame, SizeHint};
use parking_lot::Mutex;
use pin_project_lite::pin_project;
use tokio::time::Instant;

pin_project! {
    /// Marks the errors of the body it wraps as [`ClientBodyError`]s and records when
    /// it waits on the client. See the [module docs](self).
    #[derive(Debug)]
    pub struct ClientBody<B> {
        #[pin]
        inner: B,
        waits: Arc<Mutex<Waits>>,
    }
}

/// The gateway's waits on the client's body.
#[derive(Debug, Default)]
struct Waits {
    /// Since when it waits: the body's last poll was pending.
    since: Option<Instant>,
    /// The waits that ended.
    total: Duration,
}

impl<B> ClientBody<B> {
    /// Wraps `inner`; the [`Progress`] tells whether and how long it waits on the client.
    pub fn new(inner: B) -> (Self, Progress) {
        let waits = Arc::default();
        let progress = Progress(Arc::clone(&waits));
        (Self { inner, waits }, progress)
    }
}

impl<B> Body for ClientBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, BoxError>>> {
        let this = self.project();
        let poll = this.inner.poll_frame(cx);
        let mut waits = this.waits.lock();
        match (poll.is_pending(), waits.since) {
            (true, None) => waits.since = Some(Instant::now()),
            (false, Some(since)) => {
                waits.since = None;
                waits.total += Instant::now().saturating_duration_since(since);
            }
            _ => {}
        }
        drop(waits);
        poll.map(|frame| frame.map(|r| r.map_err(|e| ClientBodyError::failed(e.into()).into())))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
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

    /// The body stalled: the client had not sent it when the response timeout fired.
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

    use bytes::Bytes;

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
    async fn the_time_spent_waiting_on_the_client_is_counted_and_no_other() {
        let step = |ms| tokio::time::advance(Duration::from_millis(ms));
        let script = Script([None, Some("a"), None, Some("b")].into());
        let (body, progress) = ClientBody::new(script);
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
