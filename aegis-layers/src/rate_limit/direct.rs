//! The global tier's unkeyed limiter.

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::NotKeyed;
use governor::{Quota, RateLimiter};
use parking_lot::Mutex;

use super::clock::{GovClock, TokioClock};
use super::keyed::clamp_quota;
use super::store::{Rescale, SharedCell};

/// An unkeyed limiter (the global tier) whose quota can change without losing state.
pub(super) struct DirectLimiter {
    cell: SharedCell,
    current: ArcSwap<DirectCurrent>,
    clock: TokioClock,
    /// One quota change at a time (see `KeyedLimiter::set_quota`).
    quota_change: Mutex<()>,
}

struct DirectCurrent {
    quota: Quota,
    limiter: RateLimiter<NotKeyed, SharedCell, GovClock<TokioClock>, NoOpMiddleware<Nanos>>,
}

impl DirectLimiter {
    /// A quota past [`MAX_BURST_REFILL`](super::MAX_BURST_REFILL) is clamped to it.
    pub(super) fn new(quota: Quota, clock: TokioClock) -> Self {
        let quota = clamp_quota(quota);
        let cell = SharedCell::default();
        let current = ArcSwap::from_pointee(Self::build(quota, &cell, clock));
        Self {
            cell,
            current,
            clock,
            quota_change: Mutex::new(()),
        }
    }

    fn build(quota: Quota, cell: &SharedCell, clock: TokioClock) -> DirectCurrent {
        // TokioClock reads from its own creation: that is the epoch.
        DirectCurrent {
            quota,
            limiter: RateLimiter::new(quota, cell.clone(), GovClock::new(clock, Nanos::new(0))),
        }
    }

    #[inline]
    pub(super) fn check(&self) -> bool {
        self.current.load().limiter.check().is_ok()
    }

    /// Replaces the quota, clamped as in [`new`](Self::new); the state keeps the cells
    /// used (see `store::Rescale`).
    pub(super) fn set_quota(&self, quota: Quota) {
        let quota = clamp_quota(quota);
        let _one_at_a_time = self.quota_change.lock();
        let by = Rescale::new(self.clock.now(), self.quota(), quota);
        let next = Arc::new(Self::build(quota, &self.cell, self.clock));
        by.change(|| self.current.store(next), |by| self.cell.rescale(by));
    }

    pub(super) fn quota(&self) -> Quota {
        self.current.load().quota
    }
}

impl fmt::Debug for DirectLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirectLimiter")
            .field("quota", &self.quota())
            .finish_non_exhaustive()
    }
}
