//! The stream handed to the inner service.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use aegis_core::{ClientAddr, Handshake, LocalAddr, Param, PeerAddr, Rewind};
use bytes::Bytes;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::ProxyHeader;

pin_project! {
    /// A connection after its PROXY header: the header's source is its [`ClientAddr`].
    ///
    /// The header is consumed; bytes the client sent after it are replayed first
    /// ([`Rewind`]). [`PeerAddr`], [`LocalAddr`] and [`Handshake`] are the inner
    /// stream's; [`ClientAddr`] is the header's [`source`](ProxyHeader::source) when it
    /// has one (a `PROXY` command from a trusted peer), else the inner stream's.
    /// Writes, vectored writes included, go straight to the inner stream.
    #[derive(Debug)]
    pub struct ProxiedIo<I> {
        #[pin]
        io: Rewind<I>,
        // Boxed: most of a connection's life is idle, and only proxied connections pay.
        header: Option<Box<ProxyHeader>>,
    }
}

impl<I> ProxiedIo<I> {
    pub(crate) fn new(header: Option<ProxyHeader>, rest: Bytes, io: I) -> Self {
        Self {
            io: Rewind::new(rest, io),
            header: header.map(Box::new),
        }
    }

    /// The PROXY header, if a trusted peer sent one.
    pub fn header(&self) -> Option<&ProxyHeader> {
        self.header.as_deref()
    }

    /// The inner stream (the bytes after the header may not all be read from it yet).
    pub fn get_ref(&self) -> &I {
        self.io.get_ref()
    }

    /// The inner stream, mutably.
    pub fn get_mut(&mut self) -> &mut I {
        self.io.get_mut()
    }

    /// Returns the bytes after the header not yet read, and the inner stream.
    pub fn into_parts(self) -> (Bytes, I) {
        self.io.into_parts()
    }
}

impl<I: Param<ClientAddr>> Param<ClientAddr> for ProxiedIo<I> {
    #[inline]
    fn param(&self) -> ClientAddr {
        match self.header.as_ref().and_then(|h| h.source()) {
            Some(source) => ClientAddr(source),
            None => self.io.param(),
        }
    }
}

// Only the client address is replaced; the other params are the inner stream's.
aegis_core::forward_params!(ProxiedIo<I>.io: PeerAddr, LocalAddr, Handshake);

impl<I: AsyncRead> AsyncRead for ProxiedIo<I> {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().io.poll_read(cx, buf)
    }
}

impl<I: AsyncWrite> AsyncWrite for ProxiedIo<I> {
    aegis_core::forward_async_write!(io);
}
