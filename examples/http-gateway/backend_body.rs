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
//!   head, and the body records the success on the breaker once it ends, or is dropped
//!   (the client went away: nothing showed the backend failing). A body error from the
//!   backend records a failure instead, once, and counts
//!   `aegis_http_backend_errors_total{reason="truncated"}`. (Recorded at the head, the
//!   success reset the consecutive-failure count before each body's failure, and a
//!   backend truncating every answer never reached the threshold.)
//! - **An answer the head judged otherwise** keeps that judgement: a `502`, `503` or
//!   `504` of the backend's own was a failure at the head, and its truncated body is
//!   counted in the metric only; another `5xx`, ignored at the head, records a failure
//!   if its body fails ([`Verdict::FailOnly`]).
//! - **The client's doing is not counted**: an error while the client's request body
//!   has not gone out whole ([`Progress::sent`]) may be hyper closing the connection
//!   because that body failed or stalled ([`crate::client_body`]), so it records
//!   nothing and counts nothing; a body the client stops reading is dropped, not failed.
//!
//! Either way the client sees the truncation: the error reaches hyper's server, which
//! closes the client's connection short of the announced length (or without the last
//! chunk).
//!
//! The wrapper is the boxed body's only allocation; it holds the call's [`Progress`] and
//! its breaker's [`CircuitHandle`] (reference counts, no allocation), and counts with the
//! `metrics` macro only on the error path.
//!
//! [`Upstream`]: crate::proxy::Upstream
//! [`GatewayClassifier`]: crate::proxy::GatewayClassifier

use std::pin::Pin;
use std::task::{Context, Poll};

use aegis_layers::circuit_breaker::CircuitHandle;
use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use pin_project_lite::pin_project;

use crate::client_body::Progress;
use crate::refusal::{BackendError, count_backend_error};

/// What a [`BackendBody`] still has to tell its breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The head was a success left to the body: a success when it ends or is dropped, a
    /// failure if the backend fails it.
    Pending,
    /// The head was ignored: a failure if the backend fails the body, else nothing.
    FailOnly,
    /// Nothing (the head was a failure, or the body's verdict is in, or there is no
    /// breaker to tell): a failed body is counted in the metric only.
    Done,
}

pin_project! {
    /// A backend's response body: see the [module docs](self).
    #[derive(Debug)]
    #[project = BackendBodyProj]
    pub struct BackendBody {
        #[pin]
        inner: Incoming,
        progress: Progress,
        breaker: Option<CircuitHandle>,
        verdict: Verdict,
    }

    impl PinnedDrop for BackendBody {
        fn drop(this: Pin<&mut Self>) {
            // Dropped before its end: the client went away, or stopped reading.
            this.project().settle(false);
        }
    }
}

impl BackendBody {
    /// `inner`, of the call whose client's body is `progress`, judged for `breaker`
    /// (`None`: nothing to tell; the error is still counted) as `verdict` says.
    pub fn new(
        inner: Incoming,
        progress: Progress,
        breaker: Option<CircuitHandle>,
        verdict: Verdict,
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
        }
    }

    /// Whether the success of this answer is left to its body (the classifier then
    /// ignores the head).
    pub fn is_pending(&self) -> bool {
        self.verdict == Verdict::Pending
    }
}

impl BackendBodyProj<'_> {
    /// Tells the breaker how the body ended, once: `failed` by the backend, or not.
    fn settle(&mut self, failed: bool) {
        let verdict = std::mem::replace(self.verdict, Verdict::Done);
        let Some(breaker) = self.breaker.as_ref() else {
            return;
        };
        match (verdict, failed) {
            (Verdict::Pending | Verdict::FailOnly, true) => breaker.record_failure(),
            (Verdict::Pending, false) => breaker.record_success(),
            (Verdict::FailOnly, false) | (Verdict::Done, _) => {}
        }
    }
}

impl Body for BackendBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let mut this = self.project();
        let poll = this.inner.as_mut().poll_frame(cx);
        match &poll {
            Poll::Ready(None) => this.settle(false),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.settle(false),
            Poll::Ready(Some(Err(e))) => {
                if this.progress.sent() {
                    tracing::debug!(error = %e, "backend answer cut off");
                    count_backend_error(BackendError::Truncated);
                    this.settle(true);
                } else {
                    // Maybe the client's body failing (hyper then closes the connection):
                    // not the backend's to answer for.
                    tracing::debug!(error = %e, "backend answer cut off before the request body was sent");
                    *this.verdict = Verdict::Done;
                }
            }
            _ => {}
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
