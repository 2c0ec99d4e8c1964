use std::task::{Context, Poll};

use aegis_core::BoxError;
use tokio::io::AsyncRead;
use tower_service::Service;

use aegis_core::metrics::Handles;

use super::future::{Detect, ResponseFuture};
use super::layer::Config;
use super::{Detections, Protocols, Sniffed};

/// Detects the protocol of each connection and passes the allowed ones, as
/// [`Sniffed`] streams, to the inner service. See the [module docs](super).
///
/// `poll_ready` is the inner service's; the ready service moves into the connection's
/// future (a clone stays behind), since it is only called once detection is done.
#[derive(Debug, Clone)]
pub struct Sniff<S> {
    pub(super) inner: S,
    pub(super) config: Config,
    /// `aegis_sniff_total`, registered at the first detection of this service and its
    /// clones.
    pub(super) detections: Handles<Detections>,
}

impl<S> Sniff<S> {
    /// Wraps `inner`, allowing `allowed`, with the default timeout and prefix size.
    pub fn new(inner: S, allowed: Protocols) -> Self {
        Self::with_config(inner, Config::new(allowed))
    }

    pub(super) fn with_config(inner: S, config: Config) -> Self {
        Self {
            inner,
            config,
            detections: Handles::new(),
        }
    }

    /// The protocols passed to the inner service.
    pub const fn allowed(&self) -> Protocols {
        self.config.allowed
    }

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

impl<S, I> Service<I> for Sniff<S>
where
    I: AsyncRead + Unpin,
    S: Service<Sniffed<I>> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<I, S, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, io: I) -> Self::Future {
        // The service that was polled ready goes with this connection.
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        let detect = Detect::new(io, self.config.max_prefix, self.config.timeout);
        ResponseFuture::new(detect, ready, self.config.allowed, self.detections.clone())
    }
}
