use std::task::{Context, Poll};

use aegis_core::{BoxError, Param, PeerAddr};
use tokio::io::AsyncRead;
use tower_service::Service;

use super::ProxiedIo;
use super::future::{ReadHeader, ResponseFuture};
use super::layer::Config;

/// Reads the PROXY header of connections from trusted networks and passes each
/// connection on as a [`ProxiedIo`] whose client address is the header's source. See
/// the [module docs](super).
///
/// Built by [`ProxyProtocolLayer`](super::ProxyProtocolLayer). `poll_ready` is the inner
/// service's; the ready service moves into the connection's future (a clone stays
/// behind), since it is only called once the header is read.
#[derive(Debug, Clone)]
pub struct ProxyProtocol<S> {
    pub(super) inner: S,
    pub(super) config: Config,
}

impl<S> ProxyProtocol<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, I> Service<I> for ProxyProtocol<S>
where
    I: AsyncRead + Unpin + Param<PeerAddr>,
    S: Service<ProxiedIo<I>> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<I, S, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, io: I) -> Self::Future {
        let peer = Param::<PeerAddr>::param(&io).0.ip();
        // The service that was polled ready goes with this connection.
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::new(ReadHeader::new(io, peer, &self.config), ready)
    }
}
