//! The connection handed to the inner service.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use aegis_core::{ClientAddr, Handshake, LocalAddr, Param, PeerAddr, Rewind};
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{Detection, Protocol};

pin_project! {
    /// A sniffed connection: the bytes read during detection are replayed first (through
    /// [`Rewind`]), and the [`Detection`] travels with the stream.
    ///
    /// Read the protocol with `Param::<Protocol>::param(&io)` (or [`Param<Detection>`]
    /// for the MQTT level). The four connection params ([`PeerAddr`], [`LocalAddr`],
    /// [`ClientAddr`], [`Handshake`]) and every write method are forwarded.
    #[derive(Debug)]
    pub struct Sniffed<I> {
        #[pin]
        io: Rewind<I>,
        detection: Detection,
    }
}

impl<I> Sniffed<I> {
    /// Wraps a rewound stream with its detection.
    pub const fn new(io: Rewind<I>, detection: Detection) -> Self {
        Self { io, detection }
    }

    /// The detection.
    pub const fn detection(&self) -> Detection {
        self.detection
    }

    /// The detected protocol.
    pub const fn protocol(&self) -> Protocol {
        self.detection.protocol()
    }

    /// The rewound stream.
    pub fn get_ref(&self) -> &Rewind<I> {
        &self.io
    }

    /// The rewound stream, mutably.
    pub fn get_mut(&mut self) -> &mut Rewind<I> {
        &mut self.io
    }

    /// Unwraps the rewound stream.
    pub fn into_inner(self) -> Rewind<I> {
        self.io
    }
}

aegis_core::forward_params!(Sniffed<I>.io: PeerAddr, LocalAddr, ClientAddr, Handshake);

impl<I> Param<Detection> for Sniffed<I> {
    #[inline]
    fn param(&self) -> Detection {
        self.detection
    }
}

impl<I> Param<Protocol> for Sniffed<I> {
    #[inline]
    fn param(&self) -> Protocol {
        self.detection.protocol()
    }
}

impl<I: AsyncRead> AsyncRead for Sniffed<I> {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().io.poll_read(cx, buf)
    }
}

impl<I: AsyncWrite> AsyncWrite for Sniffed<I> {
    aegis_core::forward_async_write!(io);
}
