//! The foundation of Aegis: the connection contract, replay of sniffed bytes, typed
//! rejections, the accept loop and the upstream proxy.
//!
//! Aegis hardens network servers with composable [`tower`] layers over a **byte-stream
//! service**: a `tower::Service<I>` whose request `I` is one accepted connection (an
//! `AsyncRead + AsyncWrite` stream that carries its addresses) and whose future drives
//! that connection to its end. Layers from `aegis-layers` and `aegis-mqtt` wrap such a
//! service; [`serve()`] runs one behind a listener; [`proxy::Proxy`] is the innermost one.
//!
//! [`tower`]: https://docs.rs/tower
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use aegis_core::{serve, proxy::Proxy};
//!
//! #[tokio::main]
//! async fn main() -> std::io::Result<()> {
//!     let listener = tokio::net::TcpListener::bind("127.0.0.1:1883").await?;
//!     let upstream = Proxy::new("127.0.0.1:1884".parse().unwrap())
//!         .connect_timeout(Duration::from_secs(2));
//!     let report = serve(listener, upstream)
//!         .max_connections(9_000)
//!         .with_graceful_shutdown(async { tokio::signal::ctrl_c().await.unwrap() })
//!         .await;
//!     std::process::exit(if report.drained() { 0 } else { 1 });
//! }
//! ```
//!
//! # Without the accept loop
//!
//! Bring your own listener or acceptor (TLS, Unix sockets, an existing server): wrap each
//! accepted stream in a [`Conn`] and call the service yourself.
//!
//! ```no_run
//! use aegis_core::{Conn, proxy::Proxy};
//! use tower::ServiceExt;
//!
//! # async fn run() -> Result<(), aegis_core::BoxError> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:1883").await?;
//! let local = listener.local_addr()?;
//! let proxy = Proxy::new("127.0.0.1:1884".parse()?);
//! loop {
//!     let (stream, peer) = listener.accept().await?;
//!     // A TLS acceptor would run here and hand over its stream instead.
//!     let svc = proxy.clone();
//!     tokio::spawn(svc.oneshot(Conn::new(stream, peer, local)));
//! }
//! # }
//! ```
//!
//! # The connection contract
//!
//! A layer may ask any connection for three addresses, each a distinct type so that
//! they cannot be swapped by mistake:
//!
//! - [`PeerAddr`]: the socket's remote end, as the kernel reported it at accept;
//! - [`LocalAddr`]: the address the connection was accepted on;
//! - [`ClientAddr`]: the *effective* client, the peer unless a trusted source (a PROXY
//!   protocol header from a configured trusted network) replaced it. Rate limiters and
//!   bans key on it.
//!
//! They are read through [`Param<T>`], after linkerd2-proxy's `Param` and `PeerAddr`
//! traits: a stack states what it needs as bounds (`I: Param<ClientAddr>`, or
//! [`ConnParams`] for all three), and the compiler checks that every IO wrapper between
//! the listener and the layer forwards them. The accept loop reads the addresses once,
//! at accept, into a [`Conn`]; users with their own acceptor (TLS, Unix sockets) build a
//! `Conn` themselves.
//!
//! **Why typed params and not an extensions map.** An extensions map (`http::Extensions`)
//! is looked up by type at run time: a missing address becomes an `Option` every layer
//! must handle, and a wrapper that forgets to carry the map loses it silently. With
//! params, a missing address is a compile error, lookups are free (a copy of a
//! `SocketAddr`), and the connection carries no map allocation, which matters at tens
//! of thousands of idle connections. The cost is that each IO wrapper forwards the
//! params by hand; [`forward_params!`] makes that one line, and the rule is that every
//! wrapper forwards all of `AsyncWrite`, vectored writes included.
//!
//! A fourth param, [`Handshake`], lets a protocol layer tell a deadline layer outside it
//! that the handshake phase is over (the MQTT CONNECT is complete, HTTP headers are
//! read).
//!
//! # Rejections and metrics
//!
//! Layers reject with small typed errors that implement [`error::Reject`] and carry a
//! stable, low-cardinality label; [`error::label_of`] maps any boxed error to its
//! labels. All metric names are listed in [`metrics`].
//!
//! # Cargo features
//!
//! - `serve` (default): the accept loop.
//! - `proxy` (default): the upstream proxy service.
//! - `test-util`: helpers for tests: reading metrics ([`metrics::testing`]), a
//!   loopback port that refuses connects ([`testing::dead_port`]), a test's log lines
//!   ([`testing::capture_logs`]) and more in [`testing`].
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod addr;
pub mod error;
#[cfg(any(feature = "serve", feature = "proxy"))]
mod exhausted;
mod handshake;
mod key;
pub mod metrics;
mod netmap;
mod rewind;
#[cfg(feature = "test-util")]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub mod testing;
pub mod time;

#[cfg(feature = "proxy")]
pub mod proxy;
#[cfg(feature = "serve")]
pub mod serve;

pub use self::addr::{ClientAddr, Conn, ConnParams, LocalAddr, Param, PeerAddr};
pub use self::error::BoxError;
pub use self::handshake::Handshake;
pub use self::key::{ClientKey, KeyBy, ParseClientKeyError};
pub use self::netmap::NetMap;
pub use self::rewind::Rewind;

/// Paths the exported macros use; not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use tokio::io::AsyncWrite;
}
#[cfg(feature = "serve")]
pub use self::serve::serve;
