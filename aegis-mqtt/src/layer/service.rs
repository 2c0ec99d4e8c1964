use std::task::{Context, Poll};

use aegis_core::{BoxError, Handshake, Param};
use tokio::io::{AsyncRead, AsyncWrite};
use tower_service::Service;

use super::MqttIo;
use super::future::{ReadConnect, ResponseFuture};
use super::layer::{MqttLayer, NoPolicy};
use super::policy::ConnPolicy;

/// Reads and validates a connection's CONNECT, answers a refusal the way the client's
/// protocol version expects, and hands an accepted connection to the inner service as an
/// [`MqttIo`] that validates every later client packet. See the [module docs](super).
///
/// `poll_ready` is the inner service's; the ready service moves into the connection's
/// future (a clone stays behind) and is called once the CONNECT is accepted. An
/// aegis-core [`Proxy`](aegis_core::proxy::Proxy) is always ready and polls its connector
/// only when called, so a circuit breaker around its connector admits the client then.
///
/// With a `Policy` (`P`, feature `policy`), the stream must also give its
/// [`ClientAddr`](aegis_core::ClientAddr).
#[derive(Debug, Clone)]
pub struct Mqtt<S, P = NoPolicy> {
    pub(super) inner: S,
    pub(super) layer: MqttLayer<P>,
}

impl<S, P> Mqtt<S, P> {
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

    /// Starts a connection: the ready service moves into its future.
    fn start<I>(&mut self, io: I, policy: Option<ConnPolicy>) -> ResponseFuture<I, S, S::Future>
    where
        S: Service<MqttIo<I>> + Clone,
    {
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        let read = ReadConnect::new(
            io,
            self.layer.config,
            self.layer.connect_timeout,
            self.layer.io.clone(),
            policy,
        );
        ResponseFuture::new(read, ready)
    }
}

impl<S, I> Service<I> for Mqtt<S, NoPolicy>
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
        self.start(io, None)
    }
}

#[cfg(feature = "policy")]
impl<S, I> Service<I> for Mqtt<S, super::Policy>
where
    I: AsyncRead + AsyncWrite + Unpin + Param<Handshake> + Param<aegis_core::ClientAddr>,
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
        let addr = Param::<aegis_core::ClientAddr>::param(&io);
        let policy = ConnPolicy::new(self.layer.policy.clone(), addr);
        self.start(io, Some(policy))
    }
}
