//! The response future of [`Proxy`](super::Proxy).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite};

use super::OnConnectError;
use super::copy::{ByteCounters, Transfer, Transferred};
use crate::BoxError;
use crate::metrics::Handles;

pin_project! {
    /// Connects to the upstream, then copies both directions until both have ended; if
    /// the connect fails, first lets the [`OnConnectError`] responder answer the client.
    #[must_use = "futures do nothing unless you `.await` or poll them"]
    pub struct ResponseFuture<F, I, U, R = ()>
    where
        R: OnConnectError<I>,
    {
        #[pin]
        state: State<F, I, U, R>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, I, U, R>
    where
        R: OnConnectError<I>,
    {
        Connecting {
            #[pin] fut: F,
            io: Option<I>,
            max_buffer: usize,
            responder: R,
            bytes: Handles<ByteCounters>,
        },
        Copying { #[pin] transfer: Transfer<I, U> },
        // Only after a failed connect: the answer to the client, then the connect error.
        Responding { #[pin] fut: R::Future, err: Option<BoxError> },
    }
}

impl<F, I, U, R: OnConnectError<I>> ResponseFuture<F, I, U, R> {
    pub(crate) fn new(
        fut: F,
        io: I,
        max_buffer: usize,
        responder: R,
        bytes: Handles<ByteCounters>,
    ) -> Self {
        Self {
            state: State::Connecting {
                fut,
                io: Some(io),
                max_buffer,
                responder,
                bytes,
            },
        }
    }
}

impl<F, I, U, R: OnConnectError<I>> std::fmt::Debug for ResponseFuture<F, I, U, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, E, I, U, R> Future for ResponseFuture<F, I, U, R>
where
    F: Future<Output = Result<U, E>>,
    E: Into<BoxError>,
    I: AsyncRead + AsyncWrite,
    U: AsyncRead + AsyncWrite,
    R: OnConnectError<I>,
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
                    responder,
                    bytes,
                } => {
                    let res = ready!(fut.poll(cx));
                    let io = io.take().expect("polled after completion");
                    let next = match res {
                        Ok(upstream) => State::Copying {
                            transfer: Transfer::with_counters(
                                io,
                                upstream,
                                *max_buffer,
                                bytes.clone(),
                            ),
                        },
                        Err(e) => {
                            let err: BoxError = e.into();
                            State::Responding {
                                fut: responder.respond(io, &*err),
                                err: Some(err),
                            }
                        }
                    };
                    self.as_mut().project().state.set(next);
                }
                StateProj::Copying { transfer } => {
                    return transfer.poll(cx).map_err(Into::into);
                }
                StateProj::Responding { fut, err } => {
                    ready!(fut.poll(cx));
                    return Poll::Ready(Err(err.take().expect("polled after completion")));
                }
            }
        }
    }
}
