//! The response future of [`Adaptive`](super::Adaptive).

use std::error::Error;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use aegis_core::error::BoxError;
use pin_project_lite::pin_project;
use tokio::time::Instant;

use super::classify::{Classify, Sample};
use super::window::Shared;

pin_project! {
    /// The response future of [`Adaptive`](super::Adaptive): records the call's latency
    /// when the inner future completes. Dropped before that (cancelled), it records its
    /// age when that is at least the controller's floor for dropped calls (see
    /// [Cancelled calls](super#cancelled-calls)), and nothing otherwise.
    #[must_use = "futures do nothing unless you `.await` or poll them"]
    pub struct ResponseFuture<F, C> {
        #[pin]
        fut: F,
        start: Instant,
        shared: Arc<Shared>,
        classifier: C,
        // The inner future completed (and was classified): nothing to do on drop.
        done: bool,
    }

    impl<F, C> PinnedDrop for ResponseFuture<F, C> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if !*this.done {
                let age = Instant::now().saturating_duration_since(*this.start);
                this.shared.record_dropped(age);
            }
        }
    }
}

impl<F, C> ResponseFuture<F, C> {
    pub(crate) fn new(fut: F, start: Instant, shared: Arc<Shared>, classifier: C) -> Self {
        Self {
            fut,
            start,
            shared,
            classifier,
            done: false,
        }
    }
}

impl<F, C> std::fmt::Debug for ResponseFuture<F, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("start", &self.start)
            .finish_non_exhaustive()
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
        let this = self.project();
        let res = ready!(this.fut.poll(cx)).map_err(Into::into);
        *this.done = true;
        let sample = this
            .classifier
            .classify(res.as_ref().map_err(|e| &**e as &(dyn Error + 'static)));
        if sample == Sample::Record {
            let latency = Instant::now().saturating_duration_since(*this.start);
            this.shared.record(latency);
        }
        Poll::Ready(res)
    }
}
