//! The [`RateLimit`] service.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use aegis_core::error::reject;
use aegis_core::{BoxError, ClientAddr, Param};
use tower_service::Service;

use super::RateLimited;
use super::future::ResponseFuture;
use super::layer::Shared;

/// Rejects connections over the configured rates or concurrency, at once and without
/// calling the inner service; see [`RateLimitLayer`](super::RateLimitLayer).
///
/// `poll_ready` only asks the inner service: the limits are decided in `call`, per
/// connection, so a limited client never holds up the others.
#[derive(Clone, Debug)]
pub struct RateLimit<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> RateLimit<S> {
    pub(super) fn new(inner: S, shared: Arc<Shared>) -> Self {
        Self { inner, shared }
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

impl<S, I> Service<I> for RateLimit<S>
where
    I: Param<ClientAddr>,
    S: Service<I>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, io: I) -> Self::Future {
        let shared = &*self.shared;
        let key = shared.key_by.key(io.param().0.ip());
        // Concurrency first: a connection it refuses consumes no rate. Per client before
        // global: one client's flood is refused before it drains the global budget.
        let slot = match &shared.concurrency {
            Some(tier) => match tier.acquire(key) {
                Some(slot) => Some(slot),
                None => return ResponseFuture::rejected(reject(RateLimited::Concurrency)),
            },
            None => None,
        };
        if shared.per_client_on.load(Ordering::Relaxed)
            && let Err(over) = shared.per_client.check(&key)
        {
            // A refusal by the shared overflow bucket is told apart: it is no measure
            // of this client's rate. Dropping `slot` and `io` here gives the slot back
            // and closes the socket.
            let why = if over.overflow() {
                RateLimited::Overflow
            } else {
                RateLimited::PerClient
            };
            return ResponseFuture::rejected(reject(why));
        }
        if shared.global_on.load(Ordering::Relaxed) && !shared.global.check() {
            // The per-client cell spent above is not given back (see the module docs).
            return ResponseFuture::rejected(reject(RateLimited::Global));
        }
        ResponseFuture::inner(self.inner.call(io), slot)
    }
}
