//! Errors of the upstream proxy.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

/// Why a proxied connection failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// The upstream did not accept the connection within the connect timeout.
    #[error("upstream {addr} did not accept within {timeout:?}")]
    ConnectTimeout {
        /// The upstream address.
        addr: SocketAddr,
        /// The configured connect timeout.
        timeout: Duration,
    },
    /// The upstream refused the connection.
    #[error("upstream {addr} refused the connection")]
    ConnectRefused {
        /// The upstream address.
        addr: SocketAddr,
        /// The error from `connect()`.
        #[source]
        source: io::Error,
    },
    /// Connecting to the upstream failed because this host is out of descriptors,
    /// memory or local ports (`EMFILE`, `ENFILE`, `ENOBUFS` or `ENOMEM` from `socket()`
    /// or `connect()`, `EADDRNOTAVAIL` from `connect()`): the gateway's own state, which
    /// says nothing about the upstream.
    /// A circuit breaker's default classifier ignores it.
    #[error("connecting to upstream {addr} failed: out of local descriptors, memory or ports")]
    LocalResources {
        /// The upstream address.
        addr: SocketAddr,
        /// The error from `socket()` or `connect()`.
        #[source]
        source: io::Error,
    },
    /// Connecting to the upstream failed for another reason.
    #[error("connecting to upstream {addr} failed")]
    Connect {
        /// The upstream address.
        addr: SocketAddr,
        /// The error from `connect()`.
        #[source]
        source: io::Error,
    },
    /// Reading from or writing to the client failed.
    #[error("client side of the proxied connection failed")]
    ClientIo(#[source] io::Error),
    /// Reading from or writing to the upstream failed.
    #[error("upstream side of the proxied connection failed")]
    UpstreamIo(#[source] io::Error),
}

impl ProxyError {
    /// What a failed `connect()` (or `socket()`) to `addr` says:
    /// [`ConnectRefused`](Self::ConnectRefused) for a refusal,
    /// [`LocalResources`](Self::LocalResources) when this host is out of descriptors,
    /// memory or local ports, [`Connect`](Self::Connect) otherwise. [`TcpConnect`](super::TcpConnect)
    /// classifies its failures so; a connector or probe of your own can too.
    ///
    /// ```
    /// use aegis_core::proxy::ProxyError;
    /// use std::io;
    ///
    /// let addr = "127.0.0.1:1883".parse().unwrap();
    /// let refused = ProxyError::from_connect(addr, io::ErrorKind::ConnectionRefused.into());
    /// assert_eq!(refused.label(), "connect_refused");
    /// let no_port = ProxyError::from_connect(addr, io::ErrorKind::AddrNotAvailable.into());
    /// assert_eq!(no_port.label(), "local_resources");
    /// ```
    pub fn from_connect(addr: SocketAddr, source: io::Error) -> Self {
        if source.kind() == io::ErrorKind::ConnectionRefused {
            Self::ConnectRefused { addr, source }
        } else if crate::exhausted::exhausted(&source).is_some()
            // No local port left to connect from (`EADDRNOTAVAIL`): this host's too.
            || source.kind() == io::ErrorKind::AddrNotAvailable
        {
            // This host's descriptors, memory or ports, not the upstream: told apart so
            // that a circuit breaker does not open on it, nor an operator look at the
            // upstream.
            Self::LocalResources { addr, source }
        } else {
            Self::Connect { addr, source }
        }
    }

    /// A stable, low-cardinality label: `connect_timeout`, `connect_refused`,
    /// `local_resources`, `connect_error`, `client_io` or `upstream_io`.
    pub const fn label(&self) -> &'static str {
        match self {
            Self::ConnectTimeout { .. } => "connect_timeout",
            Self::ConnectRefused { .. } => "connect_refused",
            Self::LocalResources { .. } => "local_resources",
            Self::Connect { .. } => "connect_error",
            Self::ClientIo(_) => "client_io",
            Self::UpstreamIo(_) => "upstream_io",
        }
    }

    /// Whether connecting to the upstream failed (timeout, refusal, lack of local
    /// resources or other error).
    pub const fn is_connect(&self) -> bool {
        matches!(
            self,
            Self::ConnectTimeout { .. }
                | Self::ConnectRefused { .. }
                | Self::LocalResources { .. }
                | Self::Connect { .. }
        )
    }

    /// Whether the upstream did not accept in time.
    pub const fn is_timeout(&self) -> bool {
        matches!(self, Self::ConnectTimeout { .. })
    }
}
