//! The response future of [`Proxy`](super::Proxy).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite};
use tower_service::Service;

use super::OnConnectError;
use super::copy::{ByteCounters, Transfer, Transferred};
use crate::BoxError;
use crate::metrics::Handles;

pin_project! {
    /// Drives its own clone of the connector `C` ready and calls it, then copies both
    /// directions until both have ended; if the connector fails (its readiness or its
    /// call), first lets the [`OnConnectError`] responder answer the client.
    #[must_use = "futures do nothing unless you `.await` or poll them"]
    pub struct ResponseFuture<C, I, U, R = ()>
    where
        C: Service<()>,
        R: OnConnectError<I>,
    {
        #[pin]
        state: State<C, I, U, R>,
    }
}

pin_project! {
    #[project = StateProj]
    #[project_replace = StateProjReplace]
    enum State<C, I, U, R>
    where
        C: Service<()>,
        R: OnConnectError<I>,
    {
        // The connector's readiness and its call change `connect` alone: the client's
        // stream moves once, into the copy (a state holding it is hundreds of bytes,
        // copied whole at each change of state).
        Connecting {
            #[pin] connect: Connect<C>,
            io: I,
            max_buffer: usize,
            responder: R,
            bytes: Handles<ByteCounters>,
        },
        Copying { #[pin] transfer: Transfer<I, U> },
        // Only after a failed connect: the answer to the client, then the connect error.
        Responding { #[pin] fut: R::Future, err: Option<BoxError> },
        // Only for the moment between two states.
        Moving,
    }
}

pin_project! {
    /// The connector's side of [`State::Connecting`].
    #[project = ConnectProj]
    enum Connect<C>
    where
        C: Service<()>,
    {
        // Not yet ready: its readiness is taken here, when the proxy connects, not when
        // the connection was accepted.
        Ready { connect: C },
        // The connector's clone went once called, as `oneshot`'s does.
        Called { #[pin] fut: C::Future },
    }
}

impl<C, I, U, R> ResponseFuture<C, I, U, R>
where
    C: Service<()>,
    R: OnConnectError<I>,
{
    pub(crate) fn new(
        connect: C,
        io: I,
        max_buffer: usize,
        responder: R,
        bytes: Handles<ByteCounters>,
    ) -> Self {
        Self {
            state: State::Connecting {
                connect: Connect::Ready { connect },
                io,
                max_buffer,
                responder,
                bytes,
            },
        }
    }
}

impl<C, I, U, R> std::fmt::Debug for ResponseFuture<C, I, U, R>
where
    C: Service<()>,
    R: OnConnectError<I>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<C, I, U, R> Future for ResponseFuture<C, I, U, R>
where
    C: Service<(), Response = U>,
    C::Error: Into<BoxError>,
    I: AsyncRead + AsyncWrite,
    U: AsyncRead + AsyncWrite,
    R: OnConnectError<I>,
{
    type Output = Result<Transferred, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let mut state = self.as_mut().project().state;
            let failed = match state.as_mut().project() {
                StateProj::Connecting { mut connect, .. } => {
                    let res = match connect.as_mut().project() {
                        ConnectProj::Ready { connect: c } => match ready!(c.poll_ready(cx)) {
                            Ok(()) => {
                                let fut = c.call(());
                                connect.set(Connect::Called { fut });
                                continue;
                            }
                            // Not ready: the client is answered as after a failed call.
                            Err(e) => Err(e),
                        },
                        ConnectProj::Called { fut } => ready!(fut.poll(cx)),
                    };
                    let StateProjReplace::Connecting {
                        connect: _,
                        io,
                        max_buffer,
                        responder,
                        bytes,
                    } = state.as_mut().project_replace(State::Moving)
                    else {
                        unreachable!("the state was Connecting")
                    };
                    match res {
                        Ok(upstream) => {
                            state.set(State::Copying {
                                transfer: Transfer::with_counters(io, upstream, max_buffer, bytes),
                            });
                            continue;
                        }
                        Err(e) => responding(&responder, io, e.into()),
                    }
                }
                StateProj::Copying { transfer } => {
                    return transfer.poll(cx).map_err(Into::into);
                }
                StateProj::Responding { fut, err } => {
                    ready!(fut.poll(cx));
                    return Poll::Ready(Err(err.take().expect("polled after completion")));
                }
                StateProj::Moving => unreachable!("polled after a panic"),
            };
            state.set(failed);
        }
    }
}

/// The state that answers the client after the connector failed with `err`.
fn responding<C, I, U, R>(responder: &R, io: I, err: BoxError) -> State<C, I, U, R>
where
    C: Service<()>,
    R: OnConnectError<I>,
{
    State::Responding {
        fut: responder.respond(io, &*err),
        err: Some(err),
    }
}
