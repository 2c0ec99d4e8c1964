use std::task::{Context, Poll};

use aegis_core::{BoxError, Handshake, Param};
use tokio::io::{AsyncRead, AsyncWrite};
use tower_service::Service;

use super::MqttIo;
use super::future::{ReadConnect, ResponseFuture};
use super::layer::MqttLayer;

/// Reads and validates a connection's CONNECT, answers a refusal the way the client's
/// protocol version expects, and hands an accepted connection to the inner service as an
/// [`MqttIo`] that validates every later client packet. See the [module docs](super).
///
/// `poll_ready` is the inner service's; the ready service moves into the connection's
/// future (a clone stays behind) and is called once the CONNECT is accepted.
#[derive(Debug, Clone)]
pub struct Mqtt<S> {
    pub(super) inner: S,
    pub(super) layer: MqttLayer,
}

impl<S> Mqtt<S> {
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

impl<S, I> Service<I> for Mqtt<S>
where
    I: AsyncRead + AsyncWrite + Unpin + Param<Handshake>,
    S: Service<MqttIo<I>> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<I, S, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, io: I) -> Self::Future {
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::new(
            ReadConnect::new(
                io,
                self.layer.config,
                self.layer.connect_timeout,
                self.layer.io,
            ),
            ready,
        )
    }
}
