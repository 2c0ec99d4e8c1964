//! The upstream proxy: the innermost byte-stream service.
//!
//! [`Proxy`] connects to an upstream for each connection (through a connector service,
//! [`TcpConnect`] by default) and copies both directions until both have ended:
//!
//! - **Half-close is forwarded.** When one side finishes sending, the proxy shuts down
//!   the write half towards the other side and keeps copying the other direction.
//! - **An upstream that resets before its first byte** (it closed with the client's
//!   first bytes unread) gets the client's side shut down as at its EOF, so that a
//!   wrapper of the client's stream can answer in its place (`aegis_mqtt` answers
//!   "server unavailable"); the service returns the upstream's error, or the error the
//!   wrapper's next read gives. So does a reset found by the write of the client's
//!   bytes (what the upstream sent before it is still passed on). After the upstream's
//!   first byte a read failure closes the client's connection at once, with what was
//!   sent cut short; a write failure (a closed upstream's kernel resets at the client's
//!   next bytes) first passes on what the upstream had sent, as a direct connection
//!   would, dropping the client's bytes meanwhile. A failure on one side closes the
//!   other with a FIN, not a reset: a peer of a protocol whose messages end at the
//!   close (not MQTT, whose packets carry their length) cannot tell a stream cut short
//!   from a whole one. `HAProxy` resets it; a reset here would need every stream wrapper
//!   to forward a way to set `SO_LINGER` 0 on the socket beneath.
//! - **Bytes arrive exactly**, in order, and are counted per direction in
//!   `aegis_proxy_bytes_total{direction}` and in the [`Transferred`] the service returns.
//! - **An idle connection holds no copy buffer.** Each direction reads onto the stack
//!   and allocates a heap buffer only while bytes wait for a slow writer or data streams
//!   (then up to [`Proxy::max_buffer`] bytes, 64 KiB by default); the buffer is freed as
//!   soon as the reader has nothing more to give. Memory per idle proxied connection is
//!   the sockets and the task.
//! - **Failures are typed**: [`ProxyError`] with a stable `label()`; connect failures are
//!   also counted in `aegis_upstream_errors_total{reason}`.
//! - **The connector is polled ready when the proxy connects**, not when the connection
//!   is accepted. The proxy's own `poll_ready` is always ready; each connection's future
//!   drives its own clone of the connector ready and calls it, as
//!   `tower::ServiceExt::oneshot` does. So a stack that is polled ready at the accept
//!   (as `serve` does) and calls the proxy only once the client has sent its first
//!   request (as the MQTT layer does) holds nothing of the connector's meanwhile: a
//!   circuit breaker around the connector admits the connection, and takes a half-open
//!   probe, when it connects upstream, and a client that stays silent takes none. A
//!   connector that is not ready (a concurrency limit) makes that connection wait, not
//!   the accept loop; an error from its readiness is a failed connect, as below.
//! - **A client whose upstream is down can get an answer.** By default a failed connect
//!   just closes the client's connection; [`Proxy::on_connect_error`] sets an
//!   [`OnConnectError`] responder that gets the client's IO and the connector's error
//!   (from its readiness or its call) first (an MQTT gateway answers "server
//!   unavailable" this way). Either way the service returns the connector's error.
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
mod respond;

use std::net::SocketAddr;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tower_service::Service;

pub use self::connect::{ConnectFuture, TcpConnect};
use self::copy::ByteCounters;
pub use self::copy::{MAX_BULK, Transfer, Transferred};
pub use self::error::ProxyError;
pub use self::respond::OnConnectError;
use crate::BoxError;
use crate::metrics::Handles;

/// Proxies each connection to an upstream. See the [module docs](self).
///
/// `C` is the connector, `R` the [`OnConnectError`] responder (`()`: close the client).
/// The proxy is always ready; the connector is polled ready by each connection's future,
/// when it connects.
#[derive(Clone, Debug)]
pub struct Proxy<C = TcpConnect, R = ()> {
    connect: C,
    max_buffer: usize,
    on_connect_error: R,
    bytes: Handles<ByteCounters>,
}

impl Proxy<TcpConnect> {
    /// The default size of the heap buffer each direction uses while data streams.
    pub const DEFAULT_MAX_BUFFER: usize = 64 * 1024;

    /// Proxies to `upstream` over TCP, with [`TcpConnect`]'s defaults.
    pub fn new(upstream: SocketAddr) -> Self {
        Self::with_connector(TcpConnect::new(upstream))
    }
}

impl<R> Proxy<TcpConnect, R> {
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
    ///
    /// The connector must be `Clone`: each connection's future gets a clone, polls it
    /// ready and calls it when it connects (see the [module docs](self)), so keep it
    /// cheap to clone (reference counts and an address, as [`TcpConnect`] and a circuit
    /// breaker around it are).
    ///
    /// `aegis_proxy_bytes_total` is registered with the recorder at the first connection,
    /// once for this proxy and its clones.
    pub fn with_connector(connect: C) -> Self {
        Self {
            connect,
            max_buffer: Proxy::DEFAULT_MAX_BUFFER,
            on_connect_error: (),
            bytes: Handles::new(),
        }
    }
}

impl<C, R> Proxy<C, R> {
    /// Answers a client whose upstream could not be reached with `responder` before its
    /// connection closes; see [`OnConnectError`]. It gets the connector's error as is,
    /// from the connector's readiness or its call: a [`ProxyError`] from [`TcpConnect`],
    /// or what a layer around the connector returned (a circuit breaker's fast-fail
    /// rejection, for example).
    ///
    /// The responder is cloned into each connection's future.
    #[must_use]
    pub fn on_connect_error<R2>(self, responder: R2) -> Proxy<C, R2> {
        Proxy {
            connect: self.connect,
            max_buffer: self.max_buffer,
            on_connect_error: responder,
            bytes: self.bytes,
        }
    }

    /// The responder to failed connects.
    pub fn connect_error_responder(&self) -> &R {
        &self.on_connect_error
    }

    /// Sets the size of the heap buffer each direction holds while data streams (at
    /// least 8 KiB, at most [`MAX_BULK`], 16 MiB). Larger buffers move
    /// bulk data with fewer system calls; an idle connection holds none either way.
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

impl<I, C, U, R> Service<I> for Proxy<C, R>
where
    I: AsyncRead + AsyncWrite,
    C: Service<(), Response = U> + Clone,
    C::Error: Into<BoxError>,
    U: AsyncRead + AsyncWrite,
    R: OnConnectError<I> + Clone,
{
    type Response = Transferred;
    type Error = BoxError;
    type Future = future::ResponseFuture<C, I, U, R>;

    /// Always ready: the connector is polled ready by the connection's future, when it
    /// connects (see [`Proxy`]).
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, io: I) -> Self::Future {
        future::ResponseFuture::new(
            self.connect.clone(),
            io,
            self.max_buffer,
            self.on_connect_error.clone(),
            self.bytes.clone(),
        )
    }
}
