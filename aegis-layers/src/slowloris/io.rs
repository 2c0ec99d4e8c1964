//! The IO wrapper that counts the client's bytes, marks writes to it when they count,
//! and hands out the handshake handle.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use aegis_core::{ClientAddr, Handshake, LocalAddr, Param, PeerAddr};
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The state the IO wrapper and the response future share: one allocation per
/// connection (40 bytes with the `Arc` counts), plus the handshake handle's own.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Bytes read from the client. Only the IO wrapper writes it (through `Pin<&mut>`,
    /// so one writer at a time), which lets it add with a plain load and store.
    received: AtomicU64,
    /// The handle the inner layer completes; the future watches it.
    pub(crate) handshake: Handshake,
    /// Whether writes to the client are marked in `wrote` (the layer's
    /// `writes_are_activity`).
    mark_writes: bool,
    /// A write of at least one byte went to the client since the future last looked.
    wrote: AtomicBool,
}

impl Shared {
    pub(crate) const fn new(handshake: Handshake, mark_writes: bool) -> Self {
        Self {
            received: AtomicU64::new(0),
            handshake,
            mark_writes,
            wrote: AtomicBool::new(false),
        }
    }

    /// Whether a write went to the client since the last call; clears the mark. Without
    /// `writes_are_activity` nothing is ever marked, and this is one load.
    pub(crate) fn take_wrote(&self) -> bool {
        self.wrote.load(Ordering::Relaxed) && self.wrote.swap(false, Ordering::Relaxed)
    }

    #[inline]
    fn wrote(&self, n: usize) {
        if self.mark_writes && n > 0 {
            self.wrote.store(true, Ordering::Relaxed);
        }
    }

    pub(crate) fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    fn add(&self, n: usize) {
        // Single writer: no read-modify-write (and no locked instruction) is needed.
        let total = self.received().saturating_add(n as u64);
        self.received.store(total, Ordering::Relaxed);
    }
}

pin_project! {
    /// The stream the inner service of a [`Slowloris`](super::Slowloris) receives.
    ///
    /// It counts the bytes read from the client for the layer's clocks and answers
    /// `Param<Handshake>` with the handle the layer watches: call
    /// [`Handshake::complete`] on it when the protocol's handshake is done. Writes,
    /// vectored writes and the address params go straight to the inner stream; with
    /// [`writes_are_activity`](super::SlowlorisLayer::writes_are_activity), a write that
    /// took at least one byte is noted for the idle clock after the handshake.
    #[derive(Debug)]
    pub struct SlowlorisIo<I> {
        #[pin]
        io: I,
        shared: Arc<Shared>,
    }
}

impl<I> SlowlorisIo<I> {
    pub(crate) const fn new(io: I, shared: Arc<Shared>) -> Self {
        Self { io, shared }
    }

    /// The bytes read from the client so far.
    pub fn received(&self) -> u64 {
        self.shared.received()
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &I {
        &self.io
    }

    /// The wrapped stream, mutably.
    pub fn get_mut(&mut self) -> &mut I {
        &mut self.io
    }

    /// Unwraps the stream; the layer sees no more reads from it.
    pub fn into_inner(self) -> I {
        self.io
    }
}

aegis_core::forward_params!(SlowlorisIo<I>.io: PeerAddr, LocalAddr, ClientAddr);

impl<I> Param<Handshake> for SlowlorisIo<I> {
    /// The handle the layer watches (not the inner stream's): completing it ends the
    /// handshake phase, and completes the outer layer's too when one is tracking.
    #[inline]
    fn param(&self) -> Handshake {
        self.shared.handshake.clone()
    }
}

impl<I: AsyncRead> AsyncRead for SlowlorisIo<I> {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        ready!(this.io.poll_read(cx, buf))?;
        let n = buf.filled().len().saturating_sub(before);
        if n > 0 {
            this.shared.add(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncWrite> AsyncWrite for SlowlorisIo<I> {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let n = ready!(this.io.poll_write(cx, buf))?;
        this.shared.wrote(n);
        Poll::Ready(Ok(n))
    }

    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let n = ready!(this.io.poll_write_vectored(cx, bufs))?;
        this.shared.wrote(n);
        Poll::Ready(Ok(n))
    }

    #[inline]
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    #[inline]
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}
