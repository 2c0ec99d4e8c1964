//! The service.

use std::sync::Arc;
use std::task::{Context, Poll};

use aegis_core::{BoxError, Handshake, Param};
use tokio::time::Instant;
use tower_service::Service;

use super::clock::Clocks;
use super::future::ResponseFuture;
use super::io::{Shared, SlowlorisIo};

/// Cuts connections whose client is too slow while handshaking, and optionally idle
/// connections afterwards.
///
/// See the [module docs](super) for the clocks and an example.
#[derive(Debug, Clone)]
pub struct Slowloris<S> {
    inner: S,
    clocks: Clocks,
    /// The most a connection's handshake deadlines come early, in nanoseconds (capped).
    jitter_ns: u32,
    /// Whether writes to the client reset the idle clock after the handshake.
    writes_are_activity: bool,
}

impl<S> Slowloris<S> {
    pub(crate) const fn new(
        inner: S,
        clocks: Clocks,
        jitter_ns: u32,
        writes_are_activity: bool,
    ) -> Self {
        Self {
            inner,
            clocks,
            jitter_ns,
            writes_are_activity,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, I> Service<I> for Slowloris<S>
where
    I: Param<Handshake>,
    S: Service<SlowlorisIo<I>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, io: I) -> Self::Future {
        let start = Instant::now();
        // Share the handle of a deadline layer further out, if any, so that one
        // `complete()` ends the handshake for both; otherwise track a new one.
        let outer = io.param();
        let handshake = if outer.is_tracked() {
            outer
        } else {
            Handshake::tracked()
        };
        // Writes matter only to the idle clock after the handshake: without it, none is
        // marked.
        let mark_writes = self.writes_are_activity && self.clocks.tracks_reads(true);
        let shared = Arc::new(Shared::new(handshake, mark_writes));
        let early_ns = if self.jitter_ns == 0 {
            0
        } else {
            fastrand::u32(..=self.jitter_ns)
        };
        let fut = self.inner.call(SlowlorisIo::new(io, Arc::clone(&shared)));
        ResponseFuture::new(fut, self.clocks, shared, start, early_ns)
    }
}
