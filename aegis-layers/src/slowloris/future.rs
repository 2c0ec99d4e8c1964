//! Future types.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use aegis_core::BoxError;
use aegis_core::error::reject;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep, sleep_until};

use super::clock::{Clocks, Progress};
use super::error::Elapsed;
use super::io::Shared;

pin_project! {
    /// Response future of [`Slowloris`](super::Slowloris): drives the inner future and
    /// races it against the connection's clocks.
    ///
    /// The clocks fire even while nobody reads the stream. When one runs out, the inner
    /// future and the stream are dropped at once (closing the socket) and the future
    /// resolves to an [`Elapsed`] rejection.
    #[must_use = "futures do nothing unless you `.await` or poll them"]
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
        // What watches the clocks, boxed and dropped once no clock applies any more (the
        // handshake over, no idle clock): the future lives as long as the connection,
        // and an idle session should not keep the handshake's clocks.
        watch: Option<Box<Watch>>,
    }
}

/// The clocks of one connection and what they have seen.
#[derive(Debug)]
struct Watch {
    // One timer per connection, created on first need and reset in place: it is always
    // at or before the earliest deadline, and re-armed when it fires early.
    sleep: Option<Pin<Box<Sleep>>>,
    clocks: Clocks,
    progress: Progress,
    shared: Arc<Shared>,
}

pin_project! {
    #[project = StateProj]
    #[derive(Debug)]
    enum State<F> {
        Running { #[pin] fut: F },
        Finished,
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn new(
        fut: F,
        clocks: Clocks,
        shared: Arc<Shared>,
        start: Instant,
        early_ns: u32,
    ) -> Self {
        Self {
            state: State::Running { fut },
            watch: Some(Box::new(Watch {
                sleep: None,
                clocks,
                progress: Progress {
                    start,
                    last_read: start,
                    received: 0,
                    handshake_done: shared.handshake.is_complete(),
                    early_ns,
                },
                shared,
            })),
        }
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let StateProj::Running { fut } = this.state.as_mut().project() else {
            panic!("slowloris ResponseFuture polled after completion");
        };
        if let Poll::Ready(res) = fut.poll(cx) {
            this.state.set(State::Finished);
            *this.watch = None;
            return Poll::Ready(res.map_err(Into::into));
        }
        let Some(watch) = this.watch.as_deref_mut() else {
            return Poll::Pending;
        };
        match watch.poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                // No clock applies any more: nothing can fire from now on.
                *this.watch = None;
                Poll::Pending
            }
            Poll::Ready(Some(err)) => {
                this.state.set(State::Finished); // drops the inner future and the stream
                *this.watch = None;
                Poll::Ready(Err(reject(err).into()))
            }
        }
    }
}

impl Watch {
    /// `Ready(Some)` when a clock ran out, `Ready(None)` when none applies any more,
    /// `Pending` with the timer armed otherwise.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<Elapsed>> {
        // Whatever the inner future read or completed during its poll moves the clocks.
        let p = &mut self.progress;
        let mut changed = self.sleep.is_none();
        let received = self.shared.received();
        if received != p.received {
            p.received = received;
            if self.clocks.tracks_reads(p.handshake_done) {
                p.last_read = Instant::now();
            }
            changed = true;
        }
        if !p.handshake_done && self.shared.handshake.is_complete() {
            p.handshake_done = true;
            // The idle clock after the handshake counts from its end.
            if self.clocks.tracks_reads(true) {
                p.last_read = Instant::now();
            }
            changed = true;
        }
        // With `writes_are_activity`, a write to the client after the handshake counts
        // as a read does (one taken during the handshake only clears the mark).
        if self.shared.take_wrote() && p.handshake_done {
            p.last_read = Instant::now();
            changed = true;
        }

        loop {
            let Some((deadline, clock)) = self.clocks.next(p) else {
                if p.handshake_done {
                    // After the handshake only the idle clock can apply, and it is off;
                    // the handshake does not start over.
                    return Poll::Ready(None);
                }
                // No clock before the end of the handshake, but one may apply after it:
                // the inner future's next poll tells.
                self.sleep = None;
                return Poll::Pending;
            };
            let sleep = match &mut self.sleep {
                // Deadlines only move later, except at the first byte and the end of the
                // handshake: only then can the timer need to move earlier.
                Some(sleep) => {
                    if changed && deadline < sleep.deadline() {
                        sleep.as_mut().reset(deadline);
                    }
                    sleep
                }
                None => self.sleep.insert(Box::pin(sleep_until(deadline))),
            };
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // The timer fired: either a deadline passed, or the timer was early (reads
            // moved the deadline later since it was set) and is re-armed in place.
            let now = Instant::now();
            if deadline <= now {
                return Poll::Ready(Some(Elapsed::new(
                    clock,
                    now.saturating_duration_since(p.start),
                    p.received,
                    p.handshake_done,
                )));
            }
            sleep.as_mut().reset(deadline);
            changed = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Ready;
    use std::mem::size_of;

    use super::*;

    #[test]
    fn response_future_stays_small() {
        type Inner = Ready<Result<(), std::io::Error>>;
        let added = size_of::<ResponseFuture<Inner>>() - size_of::<Inner>();
        println!("ResponseFuture adds {added} bytes");
        // The clocks and their timer are boxed (dropped when no clock is left), not
        // inline: an idle session keeps one pointer of them.
        assert!(added <= 16, "adds {added} bytes");
        // The state shared with the stream: a byte count, the handshake handle and the
        // write mark.
        assert_eq!(size_of::<Shared>(), 24);
        // The watch the module docs size: the jitter's draw fits in the progress's padding.
        assert_eq!(size_of::<Watch>(), 112);
    }
}
