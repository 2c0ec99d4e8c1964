//! The response future of [`RateLimit`](super::RateLimit).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use aegis_core::BoxError;
use aegis_core::error::Rejected;
use pin_project_lite::pin_project;

use super::concurrency::ConcurrencySlot;

pin_project! {
    /// The future of a connection through [`RateLimit`](super::RateLimit): the inner
    /// service's future, holding the client's concurrency slot until it completes or is
    /// dropped, or a ready rejection.
    #[must_use = "futures do nothing unless you `.await` or poll them"]
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Inner { #[pin] fut: F, slot: Option<ConcurrencySlot> },
        Rejected { err: Option<Rejected> },
    }
}

impl<F> ResponseFuture<F> {
    pub(super) fn inner(fut: F, slot: Option<ConcurrencySlot>) -> Self {
        Self {
            state: State::Inner { fut, slot },
        }
    }

    pub(super) fn rejected(err: Rejected) -> Self {
        Self {
            state: State::Rejected { err: Some(err) },
        }
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Inner { fut, slot } => {
                let out = std::task::ready!(fut.poll(cx));
                // The connection is over: free the slot now, not when the future drops.
                drop(slot.take());
                Poll::Ready(out.map_err(Into::into))
            }
            StateProj::Rejected { err } => {
                Poll::Ready(Err(err.take().expect("polled after ready").into()))
            }
        }
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
