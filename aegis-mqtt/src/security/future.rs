use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use aegis_core::BoxError;
use aegis_core::error::{Rejected, reject};
use pin_project_lite::pin_project;
use tokio::task::futures::TaskLocalFuture;

use super::{ConnCtx, SecurityError, Tracked};

pin_project! {
    /// The future of [`SecurityService`](super::SecurityService): the inner service's
    /// future, run inside the connection's security context, or a refusal.
    ///
    /// When the inner future fails with a rejection that no layer inside reported
    /// itself, this reports it as a `rejection` event and counts it toward the detector.
    /// When a ban closes the connection, it ends with [`SecurityError::ClosedByBan`]
    /// (the inner future, with the connection, drops with this one).
    #[must_use = "futures do nothing unless you `.await` or poll them"]
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Inner {
            #[pin]
            fut: TaskLocalFuture<Arc<ConnCtx>, F>,
            ctx: Tracked,
        },
        Rejected { err: Option<Rejected> },
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F> ResponseFuture<F> {
    pub(super) const fn new(fut: TaskLocalFuture<Arc<ConnCtx>, F>, ctx: Tracked) -> Self {
        Self {
            state: State::Inner { fut, ctx },
        }
    }

    pub(super) const fn rejected(err: Rejected) -> Self {
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
        let mut state = self.project().state;
        if let StateProj::Inner { ctx, .. } = state.as_mut().project()
            && ctx.closed(cx)
        {
            // Dropped now: the connection closes, and its slot is free. The ban's event
            // has it; not a rejection of the client's doing (no `on_error`).
            let err = Some(reject(SecurityError::ClosedByBan));
            state.set(State::Rejected { err });
        }
        match state.project() {
            StateProj::Inner { fut, ctx } => match ready!(fut.poll(cx)) {
                Ok(response) => Poll::Ready(Ok(response)),
                Err(e) => {
                    let e: BoxError = e.into();
                    ctx.on_error(&*e);
                    Poll::Ready(Err(e))
                }
            },
            StateProj::Rejected { err } => Poll::Ready(Err(err
                .take()
                .expect("ResponseFuture polled after completion")
                .into())),
        }
    }
}
