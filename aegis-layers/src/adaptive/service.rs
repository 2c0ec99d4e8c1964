use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use aegis_core::error::BoxError;
use tokio::time::Instant;
use tower_service::Service;

use super::classify::{Classify, DefaultClassifier};
use super::future::ResponseFuture;
use super::window::Shared;

/// Records the latency of every call to the inner service, from `call` to the
/// completion of the response future, for an adaptive controller.
///
/// It never rejects: the controller acts through its sink (a rate limiter or a
/// concurrency limit placed in front). See the [module docs](super) for an example.
#[derive(Clone)]
pub struct Adaptive<S, C = DefaultClassifier> {
    inner: S,
    shared: Arc<Shared>,
    classifier: C,
}

impl<S, C> Adaptive<S, C> {
    pub(crate) fn from_parts(inner: S, shared: Arc<Shared>, classifier: C) -> Self {
        Self {
            inner,
            shared,
            classifier,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes the layer's service and returns the inner one.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: fmt::Debug, C> fmt::Debug for Adaptive<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Adaptive")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, C, Req> Service<Req> for Adaptive<S, C>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    C: Classify<S::Response>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let start = Instant::now();
        ResponseFuture::new(
            self.inner.call(req),
            start,
            Arc::clone(&self.shared),
            self.classifier.clone(),
        )
    }
}
