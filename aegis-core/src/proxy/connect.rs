//! The TCP connector the proxy uses by default.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::TcpStream;
use tower_service::Service;

use super::ProxyError;

/// Connects to one upstream address with a timeout: a `Service<()>` that returns a
/// [`TcpStream`].
///
/// It is a tower service so that other layers (a circuit breaker, for example) can wrap
/// the connection step alone. Connect failures are typed ([`ProxyError`]) and counted in
/// `aegis_upstream_errors_total{reason}`; running out of descriptors, memory or local
/// ports on this host is [`ProxyError::LocalResources`] (`reason="local_resources"`), not an upstream
/// failure.
#[derive(Clone, Debug)]
pub struct TcpConnect {
    addr: SocketAddr,
    timeout: Duration,
    nodelay: bool,
}

impl TcpConnect {
    /// The default connect timeout: long enough for a loaded local broker, short enough
    /// that clients are not left hanging.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

    /// Connects to `addr` with [`Self::DEFAULT_TIMEOUT`] and `TCP_NODELAY` set.
    pub const fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            timeout: Self::DEFAULT_TIMEOUT,
            nodelay: true,
        }
    }

    /// Sets the connect timeout.
    #[must_use]
    pub const fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets `TCP_NODELAY` on upstream connections (on by default: a proxy should not add
    /// Nagle delay to small messages).
    #[must_use]
    pub const fn nodelay(mut self, nodelay: bool) -> Self {
        self.nodelay = nodelay;
        self
    }

    /// The upstream address.
    pub const fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// The future of [`TcpConnect`]: boxed, as it runs once per connection.
pub type ConnectFuture = Pin<Box<dyn Future<Output = Result<TcpStream, ProxyError>> + Send>>;

impl Service<()> for TcpConnect {
    type Response = TcpStream;
    type Error = ProxyError;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, (): ()) -> Self::Future {
        let Self {
            addr,
            timeout,
            nodelay,
        } = *self;
        Box::pin(async move {
            let res = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
                Err(_) => Err(ProxyError::ConnectTimeout { addr, timeout }),
                Ok(Err(source)) => Err(ProxyError::from_connect(addr, source)),
                Ok(Ok(s)) => {
                    if nodelay {
                        // Best effort: a socket that cannot take the option still works.
                        let _ = s.set_nodelay(true);
                    }
                    Ok(s)
                }
            };
            if let Err(e) = &res {
                metrics::counter!(crate::metrics::UPSTREAM_ERRORS_TOTAL, "reason" => e.label())
                    .increment(1);
                tracing::debug!(upstream = %addr, error = %e, "upstream connect failed");
            }
            res
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    /// With every local port in use (many connections to one upstream, or their
    /// `TIME_WAIT`s), `connect()` fails with `EADDRNOTAVAIL`: this host's lack, which a
    /// breaker around the connect must not take for the upstream's failure.
    #[test]
    fn no_local_port_left_is_a_local_resources_error() {
        let addr = SocketAddr::from(([127, 0, 0, 1], 1883));
        let err = ProxyError::from_connect(addr, io::Error::from(io::ErrorKind::AddrNotAvailable));
        assert_eq!(err.label(), "local_resources");
        #[cfg(target_os = "linux")]
        {
            let err =
                ProxyError::from_connect(addr, io::Error::from_raw_os_error(libc::EADDRNOTAVAIL));
            assert_eq!(err.label(), "local_resources");
            let err = ProxyError::from_connect(addr, io::Error::from_raw_os_error(libc::EMFILE));
            assert_eq!(err.label(), "local_resources");
        }
        let err = ProxyError::from_connect(addr, io::Error::from(io::ErrorKind::ConnectionRefused));
        assert_eq!(err.label(), "connect_refused");
        let err = ProxyError::from_connect(addr, io::Error::from(io::ErrorKind::HostUnreachable));
        assert_eq!(err.label(), "connect_error");
    }
}
