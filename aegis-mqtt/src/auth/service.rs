use std::sync::Arc;
use std::task::{Context, Poll};

use aegis_core::{BoxError, ClientAddr, Param};
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tower_service::Service;

use super::future::ResponseFuture;
use super::{AuthLayer, Credentials, Decision};
use crate::layer::MqttIo;

/// Authenticates the CONNECT of each connection before the inner service sees it. See
/// the [module docs](super).
///
/// `poll_ready` is the inner service's; the ready service moves into the connection's
/// future (a clone stays behind) and is called, with the same [`MqttIo`], once the
/// CONNECT is allowed.
#[derive(Debug, Clone)]
pub struct Auth<S, A> {
    pub(super) inner: S,
    pub(super) layer: AuthLayer<A>,
}

impl<S, A> Auth<S, A> {
    /// The inner service.
    pub const fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub const fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// The layer's configuration and cache.
    pub const fn layer(&self) -> &AuthLayer<A> {
        &self.layer
    }
}

impl<S, A, I> Service<MqttIo<I>> for Auth<S, A>
where
    I: AsyncRead + AsyncWrite + Unpin + Param<ClientAddr>,
    S: Service<MqttIo<I>> + Clone,
    S::Error: Into<BoxError>,
    A: Service<Credentials, Response = Decision> + Clone + Send + 'static,
    A::Error: Into<BoxError>,
    A::Future: Send,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<I, S, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, io: MqttIo<I>) -> Self::Future {
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        let ClientAddr(client_addr) = Param::<ClientAddr>::param(&io);
        let Some(c) = io.connect() else {
            // The CONNECT was read already: nothing to decide on, so fail closed.
            return ResponseFuture::no_connect(io, client_addr);
        };
        let creds = Credentials {
            client_id: Arc::from(c.client_id),
            username: c.username.map(Arc::from),
            password: c.password.map(Bytes::copy_from_slice),
            client_addr,
            version: c.version,
        };
        let client_id = Arc::clone(&creds.client_id);
        let check = Box::pin(self.layer.check(creds));
        ResponseFuture::new(check, io, ready, client_id, client_addr)
    }
}
