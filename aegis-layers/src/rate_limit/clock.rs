//! The limiter's clock: monotonic tokio time by default, any governor clock if injected.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

use governor::clock::{Clock, Reference};
use governor::nanos::Nanos;

/// A monotonic [`governor::clock::Clock`] over [`tokio::time::Instant`], the default
/// clock of every limiter in this module.
///
/// Readings are [`Nanos`] since the clock was created. Because it reads tokio's clock,
/// tests that pause time (`#[tokio::test(start_paused = true)]`, `tokio::time::advance`)
/// move it too.
#[derive(Clone, Copy, Debug)]
pub struct TokioClock {
    origin: tokio::time::Instant,
}

impl TokioClock {
    /// A clock whose readings start at zero now.
    pub fn new() -> Self {
        Self {
            origin: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    type Instant = Nanos;

    #[inline]
    fn now(&self) -> Nanos {
        let d = tokio::time::Instant::now().saturating_duration_since(self.origin);
        // u64 nanoseconds last 584 years; saturate rather than panic past that.
        Nanos::new(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    }
}

/// The clock each `governor::RateLimiter` of this module is built with.
///
/// It reads the user's clock as [`Nanos`] since a fixed `epoch` shared by every limiter
/// built over the same state store, so stored GCRA state (a theoretical arrival time,
/// TAT) means the same instant to all of them. `RateLimiter::new` reads the clock once
/// to record its `start`, against which it measures every TAT; the first reading of a
/// `GovClock` is therefore pinned to zero (the epoch), so `start` is the epoch for every
/// limiter, and a limiter swapped in after a rate change reads the TATs written by the
/// one before it exactly. `rate_change_keeps_state` in the tests guards this.
pub(super) struct GovClock<C: Clock> {
    clock: C,
    epoch: C::Instant,
    started: AtomicBool,
}

impl<C: Clock> GovClock<C> {
    pub(super) fn new(clock: C, epoch: C::Instant) -> Self {
        Self {
            clock,
            epoch,
            started: AtomicBool::new(false),
        }
    }
}

/// Nanoseconds since `epoch` on `clock`, as stored in the state stores.
#[inline]
pub(super) fn since<C: Clock>(clock: &C, epoch: C::Instant) -> Nanos {
    clock.now().duration_since(epoch)
}

impl<C: Clock> Clock for GovClock<C> {
    type Instant = Nanos;

    #[inline]
    fn now(&self) -> Nanos {
        if !self.started.load(Ordering::Relaxed) {
            // The reading `RateLimiter::new` takes as its `start`.
            self.started.store(true, Ordering::Relaxed);
            return Nanos::new(0);
        }
        since(&self.clock, self.epoch)
    }
}

impl<C: Clock> fmt::Debug for GovClock<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GovClock")
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}
