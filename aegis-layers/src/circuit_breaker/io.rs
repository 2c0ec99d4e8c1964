//! [`FirstRead`]: the upstream stream of a breaker judged by the server's first byte.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use aegis_core::{ClientAddr, Handshake, LocalAddr, PeerAddr};
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::classify::Outcome;
use super::state::Guard;

pin_project! {
    /// A stream returned through a breaker built with
    /// [`CircuitBreakerLayer::judge_by_first_read`](super::CircuitBreakerLayer::judge_by_first_read):
    /// the call's outcome waits for the stream's first read.
    ///
    /// - The first read that returns bytes is the call's **success**.
    /// - An end of stream or a read error before any byte is **ignored**: a server may
    ///   close on a request it refuses, and counted, one client's bad requests would
    ///   open the circuit for every client. A half-open probe that ends so gives its
    ///   permit back.
    /// - Dropped before either, the call was **cancelled**: nothing is counted, and a
    ///   half-open probe's permit goes back.
    /// - A half-open probe still unjudged at the breaker's
    ///   [`probe_timeout`](super::Builder::probe_timeout) has **failed**, and the
    ///   circuit re-opens. Report other failures (a protocol's own timeout) with
    ///   [`CircuitHandle::record_failure`](super::CircuitHandle::record_failure).
    ///
    /// Writes, and the connection's address params, go straight to the inner stream.
    pub struct FirstRead<T> {
        #[pin]
        io: T,
        guard: Option<Guard>,
    }
}

impl<T> FirstRead<T> {
    pub(crate) fn new(io: T, guard: Guard) -> Self {
        Self {
            io,
            guard: Some(guard),
        }
    }

    /// Whether the call's outcome is still to come (no byte, end or error read yet).
    pub fn is_pending(&self) -> bool {
        self.guard.is_some()
    }

    /// The inner stream.
    pub fn get_ref(&self) -> &T {
        &self.io
    }

    /// The inner stream, mutably. Reading from it directly is not seen by the breaker.
    pub fn get_mut(&mut self) -> &mut T {
        &mut self.io
    }

    /// The inner stream. A call still pending is cancelled (nothing is counted).
    pub fn into_inner(self) -> T {
        self.io
    }
}

impl<T: fmt::Debug> fmt::Debug for FirstRead<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FirstRead")
            .field("io", &self.io)
            .field("pending", &self.is_pending())
            .finish_non_exhaustive()
    }
}

impl<T: AsyncRead> AsyncRead for FirstRead<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if this.guard.is_none() {
            return this.io.poll_read(cx, buf);
        }
        // A read into a full buffer returns no bytes without being an end of stream.
        let room = buf.remaining();
        let before = buf.filled().len();
        let res = ready!(this.io.poll_read(cx, buf));
        let outcome = match &res {
            Ok(()) if buf.filled().len() > before => Some(Outcome::Success),
            Ok(()) if room == 0 => None,
            Ok(()) | Err(_) => Some(Outcome::Ignore),
        };
        if let Some(outcome) = outcome
            && let Some(guard) = this.guard.take()
        {
            guard.record(outcome);
        }
        Poll::Ready(res)
    }
}

impl<T: AsyncWrite> AsyncWrite for FirstRead<T> {
    aegis_core::forward_async_write!(io);
}

aegis_core::forward_params!(FirstRead<T>.io: PeerAddr, LocalAddr, ClientAddr, Handshake);
