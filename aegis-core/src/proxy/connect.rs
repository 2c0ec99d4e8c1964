//! The TCP connector the proxy uses by default.

use std::future::Future;
use std::io;
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
/// `aegis_upstream_errors_total{reason}`; running out of descriptors or memory on this
/// host is [`ProxyError::LocalResources`] (`reason="local_resources"`), not an upstream
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
                Ok(Err(source)) if source.kind() == io::ErrorKind::ConnectionRefused => {
                    Err(ProxyError::ConnectRefused { addr, source })
                }
                // This host's descriptors or memory, not the upstream: told apart so that
                // a circuit breaker does not open on it, nor an operator look at the
                // upstream.
                Ok(Err(source)) if crate::exhausted::exhausted(&source).is_some() => {
                    Err(ProxyError::LocalResources { addr, source })
                }
                Ok(Err(source)) => Err(ProxyError::Connect { addr, source }),
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
