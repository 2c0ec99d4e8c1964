//! The response future of [`Proxy`](super::Proxy).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite};

use super::copy::{Transfer, Transferred};
use crate::BoxError;

pin_project! {
    /// Connects to the upstream, then copies both directions until both have ended.
    #[must_use = "futures do nothing unless you `.await` or poll them"]
    pub struct ResponseFuture<F, I, U> {
        #[pin]
        state: State<F, I, U>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, I, U> {
        Connecting { #[pin] fut: F, io: Option<I>, max_buffer: usize },
        Copying { #[pin] transfer: Transfer<I, U> },
    }
}

impl<F, I, U> ResponseFuture<F, I, U> {
    pub(crate) fn new(fut: F, io: I, max_buffer: usize) -> Self {
        Self {
            state: State::Connecting {
                fut,
                io: Some(io),
                max_buffer,
            },
        }
    }
}

impl<F, I, U> std::fmt::Debug for ResponseFuture<F, I, U> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, E, I, U> Future for ResponseFuture<F, I, U>
where
    F: Future<Output = Result<U, E>>,
    E: Into<BoxError>,
    I: AsyncRead + AsyncWrite,
    U: AsyncRead + AsyncWrite,
{
    type Output = Result<Transferred, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let this = self.as_mut().project();
            match this.state.project() {
                StateProj::Connecting {
                    fut,
                    io,
                    max_buffer,
                } => {
                    let upstream = ready!(fut.poll(cx)).map_err(Into::into)?;
                    let io = io.take().expect("polled after completion");
                    let transfer = Transfer::new(io, upstream, *max_buffer);
                    self.as_mut()
                        .project()
                        .state
                        .set(State::Copying { transfer });
                }
                StateProj::Copying { transfer } => {
                    return transfer.poll(cx).map_err(Into::into);
                }
            }
        }
    }
}
