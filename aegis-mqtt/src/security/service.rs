use std::sync::Arc;
use std::task::{Context, Poll};

use aegis_core::error::reject;
use aegis_core::{BoxError, ClientAddr, Param};
use tower_service::Service;

use super::future::ResponseFuture;
use super::{CTX, ConnCtx, Security};

/// Refuses a banned client address at once, without reading from the connection, and
/// runs every other connection inside its security context. See the [module
/// docs](super).
///
/// `poll_ready` is the inner service's. The stream must give its effective
/// [`ClientAddr`].
#[derive(Debug, Clone)]
pub struct SecurityService<S> {
    inner: S,
    security: Security,
}

impl<S> SecurityService<S> {
    pub(super) const fn new(inner: S, security: Security) -> Self {
        Self { inner, security }
    }

    /// The shared [`Security`] handle.
    pub fn security(&self) -> &Security {
        &self.security
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

impl<S, I> Service<I> for SecurityService<S>
where
    I: Param<ClientAddr>,
    S: Service<I>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, io: I) -> Self::Future {
        let addr = Param::<ClientAddr>::param(&io).0;
        let bans = self.security.ban_changes();
        if let Err(refused) = self.security.admit(addr) {
            // `io` is dropped here, unread: that closes the connection.
            return ResponseFuture::rejected(reject(refused));
        }
        let ctx = Arc::new(ConnCtx::new(self.security.clone(), addr));
        let inner = &mut self.inner;
        let fut = CTX.sync_scope(Arc::clone(&ctx), || inner.call(io));
        let tracked = self.security.track_admitted(Arc::clone(&ctx), bans);
        ResponseFuture::new(CTX.scope(ctx, fut), tracked)
    }
}
