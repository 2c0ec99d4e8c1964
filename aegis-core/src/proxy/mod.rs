//! The upstream proxy: the innermost byte-stream service.
//!
//! [`Proxy`] connects to an upstream for each connection (through a connector service,
//! [`TcpConnect`] by default) and copies both directions until both have ended:
//!
//! - **Half-close is forwarded.** When one side finishes sending, the proxy shuts down
//!   the write half towards the other side and keeps copying the other direction.
//! - **Bytes arrive exactly**, in order, and are counted per direction in
//!   `aegis_proxy_bytes_total{direction}` and in the [`Transferred`] the service returns.
//! - **An idle connection holds no copy buffer.** Each direction reads onto the stack
//!   and allocates a heap buffer only while bytes wait for a slow writer or data streams
//!   (then up to [`Proxy::max_buffer`] bytes, 64 KiB by default); the buffer is freed as
//!   soon as the reader has nothing more to give. Memory per idle proxied connection is
//!   the sockets and the task.
//! - **Failures are typed**: [`ProxyError`] with a stable `label()`; connect failures are
//!   also counted in `aegis_upstream_errors_total{reason}`.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), aegis_core::BoxError> {
//! use aegis_core::{proxy::Proxy, Conn};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//! use tower::ServiceExt;
//!
//! // An upstream that answers "pong".
//! let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let upstream_addr = upstream.local_addr()?;
//! tokio::spawn(async move {
//!     let (mut s, _) = upstream.accept().await.unwrap();
//!     let mut buf = [0u8; 4];
//!     s.read_exact(&mut buf).await.unwrap();
//!     s.write_all(b"pong").await.unwrap();
//! });
//!
//! // One client connection, proxied.
//! let (mut client, io) = tokio::io::duplex(64);
//! let conn = Conn::new(io, "127.0.0.1:5000".parse()?, "127.0.0.1:1883".parse()?);
//! let proxied = tokio::spawn(Proxy::new(upstream_addr).oneshot(conn));
//! client.write_all(b"ping").await?;
//! client.shutdown().await?;
//! let mut reply = String::new();
//! client.read_to_string(&mut reply).await?;
//! assert_eq!(reply, "pong");
//! let sent = proxied.await??;
//! assert_eq!(sent.client_to_upstream, 4);
//! # Ok(())
//! # }
//! ```

mod connect;
mod copy;
mod error;
pub mod future;

use std::net::SocketAddr;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tower_service::Service;

pub use self::connect::{ConnectFuture, TcpConnect};
pub use self::copy::{Transfer, Transferred};
pub use self::error::ProxyError;
use crate::BoxError;

/// Proxies each connection to an upstream. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct Proxy<C = TcpConnect> {
    connect: C,
    max_buffer: usize,
}

impl Proxy<TcpConnect> {
    /// The default size of the heap buffer each direction uses while data streams.
    pub const DEFAULT_MAX_BUFFER: usize = 64 * 1024;

    /// Proxies to `upstream` over TCP, with [`TcpConnect`]'s defaults.
    pub const fn new(upstream: SocketAddr) -> Self {
        Self::with_connector(TcpConnect::new(upstream))
    }

    /// Sets the upstream connect timeout.
    #[must_use]
    pub const fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect = self.connect.timeout(timeout);
        self
    }
}

impl<C> Proxy<C> {
    /// Proxies through `connect`, any `Service<()>` that returns a byte stream: wrap the
    /// connect step with other layers (a circuit breaker, a TLS client) this way.
    pub const fn with_connector(connect: C) -> Self {
        Self {
            connect,
            max_buffer: Proxy::DEFAULT_MAX_BUFFER,
        }
    }

    /// Sets the size of the heap buffer each direction holds while data streams (at
    /// least 8 KiB). Larger buffers move bulk data with fewer system calls; an idle
    /// connection holds none either way.
    #[must_use]
    pub const fn max_buffer(mut self, bytes: usize) -> Self {
        self.max_buffer = bytes;
        self
    }

    /// The connector.
    pub fn get_ref(&self) -> &C {
        &self.connect
    }

    /// The connector, mutably.
    pub fn get_mut(&mut self) -> &mut C {
        &mut self.connect
    }

    /// Unwraps the connector.
    pub fn into_inner(self) -> C {
        self.connect
    }
}

impl<I, C, U> Service<I> for Proxy<C>
where
    I: AsyncRead + AsyncWrite,
    C: Service<(), Response = U>,
    C::Error: Into<BoxError>,
    U: AsyncRead + AsyncWrite,
{
    type Response = Transferred;
    type Error = BoxError;
    type Future = future::ResponseFuture<C::Future, I, U>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.connect.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, io: I) -> Self::Future {
        future::ResponseFuture::new(self.connect.call(()), io, self.max_buffer)
    }
}
