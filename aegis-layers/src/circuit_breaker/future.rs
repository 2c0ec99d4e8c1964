//! The response futures of [`CircuitBreaker`](super::CircuitBreaker) and
//! [`FirstReadBreaker`](super::FirstReadBreaker).

use std::error::Error;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use aegis_core::error::{BoxError, Rejected};
use pin_project_lite::pin_project;

use super::classify::Classify;
use super::io::FirstRead;
use super::state::Guard;

pin_project! {
    /// The response future of [`CircuitBreaker`](super::CircuitBreaker): the inner
    /// future, whose outcome is recorded when it completes, or an immediate
    /// [`CircuitOpen`](super::error::CircuitOpen) error.
    ///
    /// Dropping it before it completes is a cancellation: nothing is counted, and a
    /// half-open probe permit goes back to the circuit.
    #[must_use = "futures do nothing unless you `.await` or poll them"]
    pub struct ResponseFuture<F, C> {
        #[pin]
        state: State<F, C>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, C> {
        Called { #[pin] fut: F, guard: Option<Guard>, classifier: C },
        Open { err: Option<Rejected> },
    }
}

impl<F, C> ResponseFuture<F, C> {
    pub(crate) fn called(fut: F, guard: Guard, classifier: C) -> Self {
        Self {
            state: State::Called {
                fut,
                guard: Some(guard),
                classifier,
            },
        }
    }

    pub(crate) fn open(err: Rejected) -> Self {
        Self {
            state: State::Open { err: Some(err) },
        }
    }
}

impl<F, C> std::fmt::Debug for ResponseFuture<F, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

/// How a call through the breaker ended: failed fast, or completed with its admission's
/// guard still to record (and the classifier to judge it by).
enum Ended<'a, T, C> {
    Open(Rejected),
    Called {
        res: Result<T, BoxError>,
        guard: Guard,
        classifier: &'a C,
    },
}

impl<F, C> ResponseFuture<F, C> {
    /// Polls the call to its end; what is recorded is the caller's choice.
    fn poll_ended<T, E>(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Ended<'_, T, C>>
    where
        F: Future<Output = Result<T, E>>,
        E: Into<BoxError>,
    {
        Poll::Ready(match self.project().state.project() {
            StateProj::Called {
                fut,
                guard,
                classifier,
            } => {
                let res = ready!(fut.poll(cx)).map_err(Into::into);
                let guard = guard.take().expect("polled after completion");
                Ended::Called {
                    res,
                    guard,
                    classifier,
                }
            }
            StateProj::Open { err } => Ended::Open(err.take().expect("polled after completion")),
        })
    }
}

impl<F, T, E, C> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    C: Classify<T>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(match ready!(self.poll_ended(cx)) {
            Ended::Called {
                res,
                guard,
                classifier,
            } => {
                let outcome =
                    classifier.classify(res.as_ref().map_err(|e| &**e as &(dyn Error + 'static)));
                guard.record(outcome);
                res
            }
            Ended::Open(err) => Err(err.into()),
        })
    }
}

pin_project! {
    /// The response future of [`FirstReadBreaker`](super::FirstReadBreaker): the inner
    /// future, whose stream is returned as a [`FirstRead`] that judges the call later,
    /// or whose error is classified and recorded at once; or an immediate
    /// [`CircuitOpen`](super::error::CircuitOpen) error.
    ///
    /// Dropping it before it completes is a cancellation, as with [`ResponseFuture`].
    #[must_use = "futures do nothing unless you `.await` or poll them"]
    pub struct FirstReadFuture<F, C> {
        #[pin]
        inner: ResponseFuture<F, C>,
    }
}

impl<F, C> FirstReadFuture<F, C> {
    pub(crate) const fn new(inner: ResponseFuture<F, C>) -> Self {
        Self { inner }
    }
}

impl<F, C> std::fmt::Debug for FirstReadFuture<F, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FirstReadFuture").finish_non_exhaustive()
    }
}

impl<F, T, E, C> Future for FirstReadFuture<F, C>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    C: Classify<T>,
{
    type Output = Result<FirstRead<T>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(match ready!(self.project().inner.poll_ended(cx)) {
            Ended::Called {
                res: Ok(io), guard, ..
            } => Ok(FirstRead::new(io, guard)),
            Ended::Called {
                res: Err(e),
                guard,
                classifier,
            } => {
                guard.record(classifier.classify(Err(&*e as &(dyn Error + 'static))));
                Err(e)
            }
            Ended::Open(err) => Err(err.into()),
        })
    }
}
