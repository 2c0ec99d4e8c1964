use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use aegis_core::error::reject;
use aegis_core::{ClientAddr, Handshake, LocalAddr, PeerAddr, Rewind};
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::{MqttError, Next, Session};

/// Each read from the client asks for this much room: a few small packets.
const READ_CHUNK: usize = 4096;

/// A client connection whose reads only ever return whole, validated MQTT packets.
///
/// The inner service reads the client's original bytes: first the CONNECT, then every
/// later packet once it is complete and valid. Bytes of a packet still arriving are held
/// (at most the configured packet size, plus one read). The first invalid packet is never
/// returned: the read fails with [`io::ErrorKind::InvalidData`] wrapping a counted
/// [`Rejected`](aegis_core::error::Rejected) (`aegis_rejections_total{layer="mqtt"}`),
/// and so does every read after it. Writes (broker to client) pass through untouched.
#[derive(Debug)]
pub struct MqttIo<I> {
    io: Rewind<I>,
    /// Validated bytes not yet read by the inner service.
    ready: Bytes,
    /// Bytes read from the client and not validated yet.
    buf: BytesMut,
    session: Session,
    failed: Option<MqttError>,
}

aegis_core::forward_params!(MqttIo<I>.io: PeerAddr, LocalAddr, ClientAddr, Handshake);

impl<I> MqttIo<I> {
    pub(super) fn new(io: I, session: Session, connect: Bytes, rest: Bytes) -> Self {
        Self {
            io: Rewind::new(rest, io),
            ready: connect,
            buf: BytesMut::new(),
            session,
            failed: None,
        }
    }

    /// The session: the client's protocol version and state.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// The rejection that ended the client's stream, if any.
    pub fn error(&self) -> Option<MqttError> {
        self.failed
    }

    /// The inner stream.
    pub fn get_ref(&self) -> &I {
        self.io.get_ref()
    }

    /// The inner stream, mutably.
    pub fn get_mut(&mut self) -> &mut I {
        self.io.get_mut()
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for MqttIo<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.ready.is_empty() {
                let n = this.ready.len().min(out.remaining());
                out.put_slice(&this.ready[..n]);
                this.ready.advance(n);
                return Poll::Ready(Ok(()));
            }
            if let Some(e) = this.failed {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
            }
            // Release every whole, valid packet buffered, in one piece.
            let mut valid = 0;
            while valid < this.buf.len() {
                match this.session.next(&this.buf[valid..]) {
                    Ok(Next::Packet { len, .. }) => valid += len,
                    Ok(Next::NeedMore(_)) => break,
                    Err(e) => {
                        this.failed = Some(e);
                        if valid == 0 {
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                reject(e),
                            )));
                        }
                        // Counted now; returned once the valid packets before it are read.
                        drop(reject(e));
                        break;
                    }
                }
            }
            if valid > 0 {
                this.ready = this.buf.split_to(valid).freeze();
                continue;
            }
            let start = this.buf.len();
            this.buf.resize(start + READ_CHUNK, 0);
            let mut rb = ReadBuf::new(&mut this.buf[start..]);
            let res = Pin::new(&mut this.io).poll_read(cx, &mut rb);
            let n = rb.filled().len();
            this.buf.truncate(start + n);
            match res {
                Poll::Ready(Ok(())) if n == 0 => return Poll::Ready(Ok(())), // EOF
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for MqttIo<I> {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    #[inline]
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    #[inline]
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
