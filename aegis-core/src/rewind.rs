//! Replay of sniffed bytes.
//!
//! A layer that sniffs a connection (protocol detection, a PROXY header, the MQTT
//! CONNECT) reads some bytes before the inner service runs. [`Rewind`] gives them back:
//! it serves the buffered prefix first, then reads the inner stream again, and frees the
//! buffer as soon as it is drained so that a long-lived connection does not keep its
//! sniff buffer.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! use aegis_core::Rewind;
//! use bytes::Bytes;
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! let (mut client, server) = tokio::io::duplex(64);
//! client.write_all(b" world").await?;
//! drop(client);
//!
//! // "hello" was read earlier, by a sniffer.
//! let mut io = Rewind::new(Bytes::from_static(b"hello"), server);
//! let mut all = String::new();
//! io.read_to_string(&mut all).await?;
//! assert_eq!(all, "hello world");
//! # Ok(())
//! # }
//! ```

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::{ClientAddr, Handshake, LocalAddr, PeerAddr};

pin_project! {
    /// An IO that serves `prefix` before reading from the inner stream.
    ///
    /// Writes, vectored writes and the address params go straight to the inner stream.
    #[derive(Debug)]
    pub struct Rewind<I> {
        // Boxed, and `None` once drained: every sniffed connection keeps its `Rewind`
        // for its whole life, and an empty `Bytes` inline would still take 32 bytes.
        prefix: Option<Box<Bytes>>,
        #[pin]
        io: I,
    }
}

impl<I> Rewind<I> {
    /// Replays `prefix`, then reads `io`.
    pub fn new(prefix: Bytes, io: I) -> Self {
        let prefix = (!prefix.is_empty()).then(|| Box::new(prefix));
        Self { prefix, io }
    }

    /// The bytes not yet served.
    pub fn prefix(&self) -> &[u8] {
        self.prefix.as_deref().map_or(&[], |p| &p[..])
    }

    /// The inner stream.
    pub fn get_ref(&self) -> &I {
        &self.io
    }

    /// The inner stream, mutably.
    pub fn get_mut(&mut self) -> &mut I {
        &mut self.io
    }

    /// Returns the unserved prefix and the inner stream.
    pub fn into_parts(self) -> (Bytes, I) {
        (self.prefix.map_or_else(Bytes::new, |p| *p), self.io)
    }
}

crate::forward_params!(Rewind<I>.io: PeerAddr, LocalAddr, ClientAddr, Handshake);

impl<I: AsyncRead> AsyncRead for Rewind<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let Some(prefix) = this.prefix.as_deref_mut() else {
            return this.io.poll_read(cx, buf);
        };
        let n = prefix.len().min(buf.remaining());
        buf.put_slice(&prefix[..n]);
        prefix.advance(n);
        if prefix.is_empty() {
            // Drop the reference to the sniff buffer so its memory is freed now, not when
            // the connection ends.
            *this.prefix = None;
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncWrite> AsyncWrite for Rewind<I> {
    crate::forward_async_write!(io);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Conn, Param};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn a_drained_rewind_costs_one_pointer() {
        // It lives as long as the connection; the prefix is a boxed `Bytes` or nothing.
        assert_eq!(
            std::mem::size_of::<Rewind<()>>(),
            std::mem::size_of::<usize>()
        );
        let rw = Rewind::new(Bytes::new(), ());
        assert!(rw.prefix.is_none(), "an empty prefix allocates nothing");
    }

    #[tokio::test]
    async fn serves_prefix_then_inner_in_small_reads() {
        let io = tokio_test::io::Builder::new()
            .read(b"cd")
            .read(b"ef")
            .build();
        let mut rw = Rewind::new(Bytes::from_static(b"ab"), io);
        let mut one = [0u8; 1];
        let mut out = Vec::new();
        loop {
            let n = rw.read(&mut one).await.unwrap();
            if n == 0 {
                break;
            }
            out.push(one[0]);
        }
        assert_eq!(out, b"abcdef");
    }

    #[tokio::test]
    async fn drained_prefix_releases_the_buffer() {
        let (mut client, server) = tokio::io::duplex(16);
        let prefix = Bytes::from(vec![7u8; 1024]);
        let mut rw = Rewind::new(prefix.clone(), server);
        let mut buf = vec![0u8; 1024];
        rw.read_exact(&mut buf).await.unwrap();
        assert!(rw.prefix().is_empty());
        // Our clone is now the only owner: the wrapper let go of the allocation.
        assert!(prefix.is_unique());
        client.write_all(b"x").await.unwrap();
        assert_eq!(rw.read_u8().await.unwrap(), b'x');
    }

    #[tokio::test]
    async fn forwards_params_and_writes() {
        let (mut client, server) = tokio::io::duplex(64);
        let peer = "198.51.100.7:5555".parse().unwrap();
        let local = "127.0.0.1:1883".parse().unwrap();
        let mut rw = Rewind::new(Bytes::new(), Conn::new(server, peer, local));
        assert_eq!(Param::<PeerAddr>::param(&rw).0, peer);
        assert_eq!(Param::<LocalAddr>::param(&rw).0, local);
        assert_eq!(Param::<ClientAddr>::param(&rw).0, peer);
        let bufs = [io::IoSlice::new(b"ab"), io::IoSlice::new(b"cd")];
        let n = rw.write_vectored(&bufs).await.unwrap();
        assert!(n >= 2);
        let mut got = vec![0u8; n];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..], &b"abcd"[..n]);
    }
}
