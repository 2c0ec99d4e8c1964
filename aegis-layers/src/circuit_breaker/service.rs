use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use aegis_core::error::{BoxError, reject};
use tower_service::Service;

use super::classify::{Classify, DefaultClassifier};
use super::error::CircuitOpen;
use super::future::{FirstReadFuture, ResponseFuture};
use super::state::{CircuitHandle, Shared, Ticket};

/// A circuit breaker around any `tower::Service`: fails fast with [`CircuitOpen`]
/// while the inner service is failing.
///
/// Clones share the circuit. See the [module docs](super) for an example.
pub struct CircuitBreaker<S, C = DefaultClassifier> {
    inner: S,
    shared: Arc<Shared>,
    classifier: C,
    ticket: Option<Ticket>,
}

impl<S, C> CircuitBreaker<S, C> {
    pub(crate) fn from_parts(inner: S, shared: Arc<Shared>, classifier: C) -> Self {
        Self {
            inner,
            shared,
            classifier,
            ticket: None,
        }
    }

    /// A handle to read and force this service's circuit.
    pub fn handle(&self) -> CircuitHandle {
        CircuitHandle {
            shared: Arc::clone(&self.shared),
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

    /// Consumes the breaker and returns the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

// By hand, so that a clone does not inherit a reserved admission (a probe permit).
impl<S: Clone, C: Clone> Clone for CircuitBreaker<S, C> {
    fn clone(&self) -> Self {
        Self::from_parts(
            self.inner.clone(),
            Arc::clone(&self.shared),
            self.classifier.clone(),
        )
    }
}

impl<S: fmt::Debug, C> fmt::Debug for CircuitBreaker<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("inner", &self.inner)
            .field("circuit", &self.shared)
            .finish_non_exhaustive()
    }
}

impl<S, C, Req> Service<Req> for CircuitBreaker<S, C>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    C: Classify<S::Response>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C>;

    /// Checks the circuit *before* the inner service: when the call is to be rejected,
    /// returns ready at once (without polling the inner service) so that `call` can fail
    /// fast, as tower's `LoadShed` does. Otherwise reserves the admission (a probe permit
    /// when half-open) and waits for the inner service.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // A decision made earlier is made again when it may be out of date:
        // - an admission made before the circuit changed state (while the inner service
        //   kept us waiting): the circuit may have opened meanwhile;
        // - any rejection: it holds nothing, and the circuit may have closed since, or
        //   its open period ended (the move to half-open is only made by the next
        //   admission, so no state change would show). Without this, a service polled
        //   ready while open and called later would fail with `CircuitOpen` whatever
        //   the circuit's state by then.
        let stale = match &self.ticket {
            Some(Ticket::Admit(guard)) => guard.is_stale(),
            Some(Ticket::Reject) => true,
            None => false,
        };
        if stale {
            self.ticket = None;
        }
        let ticket = self.ticket.get_or_insert_with(|| self.shared.admit());
        if matches!(ticket, Ticket::Reject) {
            return Poll::Ready(Ok(()));
        }
        match self.inner.poll_ready(cx) {
            Poll::Ready(Err(e)) => {
                self.ticket = None; // returns a probe permit
                Poll::Ready(Err(e.into()))
            }
            other => other.map_err(Into::into),
        }
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let ticket = match self
            .ticket
            .take()
            .expect("service not ready; poll_ready must be called first")
        {
            // An admission the circuit has moved past since `poll_ready` (polled ready
            // while closed, called after it opened) is decided again: used as it was,
            // the call reached the inner service through an open circuit. The inner
            // service was polled ready for it, so a new admission may call it.
            Ticket::Admit(guard) if guard.is_stale() => {
                drop(guard);
                self.shared.admit()
            }
            ticket => ticket,
        };
        match ticket {
            Ticket::Reject => ResponseFuture::open(reject(CircuitOpen::new(self.shared.name()))),
            Ticket::Admit(mut guard) => {
                guard.start();
                ResponseFuture::called(self.inner.call(req), guard, self.classifier.clone())
            }
        }
    }
}

/// A [`CircuitBreaker`] whose successful calls are judged by the first read of the
/// stream they return ([`FirstRead`](super::FirstRead)), not by the call's completion:
/// from [`CircuitBreakerLayer::judge_by_first_read`](super::CircuitBreakerLayer::judge_by_first_read).
///
/// Errors are classified as the breaker's classifier says, at once. Clones share the
/// circuit.
pub struct FirstReadBreaker<S, C = DefaultClassifier> {
    inner: CircuitBreaker<S, C>,
}

impl<S, C> FirstReadBreaker<S, C> {
    pub(crate) const fn new(inner: CircuitBreaker<S, C>) -> Self {
        Self { inner }
    }

    /// A handle to read and force this service's circuit.
    pub fn handle(&self) -> CircuitHandle {
        self.inner.handle()
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        self.inner.get_ref()
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        self.inner.get_mut()
    }

    /// Consumes the breaker and returns the inner service.
    pub fn into_inner(self) -> S {
        self.inner.into_inner()
    }
}

impl<S: Clone, C: Clone> Clone for FirstReadBreaker<S, C> {
    fn clone(&self) -> Self {
        Self::new(self.inner.clone())
    }
}

impl<S: fmt::Debug, C> fmt::Debug for FirstReadBreaker<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FirstReadBreaker")
            .field("inner", &self.inner.inner)
            .field("circuit", &self.inner.shared)
            .finish_non_exhaustive()
    }
}

impl<S, C, Req> Service<Req> for FirstReadBreaker<S, C>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    C: Classify<S::Response>,
{
    type Response = super::FirstRead<S::Response>;
    type Error = BoxError;
    type Future = FirstReadFuture<S::Future, C>;

    /// As [`CircuitBreaker`]'s: the circuit first, then the inner service.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        FirstReadFuture::new(self.inner.call(req))
    }
}
