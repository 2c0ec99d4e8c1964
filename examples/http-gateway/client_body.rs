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
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use aegis_core::BoxError;
use hyper::body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// Marks the errors of the body it wraps as [`ClientBodyError`]s and records whether
    /// it waits on the client. See the [module docs](self).
    #[derive(Debug)]
    pub struct ClientBody<B> {
        #[pin]
        inner: B,
        waiting: Arc<AtomicBool>,
    }
}

impl<B> ClientBody<B> {
    /// Wraps `inner`; the [`Progress`] tells whether it waits on the client.
    pub fn new(inner: B) -> (Self, Progress) {
        let waiting = Arc::new(AtomicBool::new(false));
        let progress = Progress(Arc::clone(&waiting));
        (Self { inner, waiting }, progress)
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
        this.waiting.store(poll.is_pending(), Ordering::Relaxed);
        poll.map(|frame| frame.map(|r| r.map_err(|e| ClientBodyError::failed(e.into()).into())))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether a [`ClientBody`] waits on the client.
#[derive(Debug, Clone)]
pub struct Progress(Arc<AtomicBool>);

impl Progress {
    /// The body's last poll was pending: the client has not sent the rest yet.
    pub fn waiting_on_client(&self) -> bool {
        self.0.load(Ordering::Relaxed)
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
