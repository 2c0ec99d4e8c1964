//! [`KeyedLimiter`]: GCRA rate limiting per key over a bounded, shared state store.

use std::fmt;
use std::hash::Hash;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::{Quota, RateLimiter};
use parking_lot::Mutex;

use tokio::time::Instant;

use super::clock::{GovClock, TokioClock, since};
use super::store::{Rescale, SharedStore, clear_overflowed, overflowed};
use crate::time::deadline;

/// How often idle keys are evicted by default.
pub const DEFAULT_EVICT_EVERY: Duration = Duration::from_secs(30);

/// How many keys a limiter tracks at most by default: about 4 MB of client-address
/// state when full (33 bytes a hash-table bucket, 1.1 to 2.3 buckets a key).
pub const DEFAULT_MAX_KEYS: usize = 100_000;

/// The longest a [`Quota`]'s whole burst may take to refill (its replenish interval
/// times its burst size): 2<sup>62</sup> ns, about 146 years.
///
/// Every limiter of this module clamps a quota past it, wherever the quota comes in
/// (the builder, the handle's setters, [`KeyedLimiter`]): the burst is cut to the cells
/// that refill within this bound, keeping the rate, or, when a single cell takes longer,
/// the interval is cut to this bound, with a burst of 1. Every quota of `n` per second
/// is within it (a burst of `u32::MAX` at 1/s refills in 136 years).
///
/// `governor` computes in `u64` nanoseconds, unchecked: `interval * (burst - 1)`
/// overflows past 584 years (a panic in debug builds, and in release builds a wrap to an
/// arbitrary tolerance), and an interval past 584 years panics in any build. It also
/// adds a key's state (up to a whole burst ahead of the clock) and the cells of one
/// [`check_n`](KeyedLimiter::check_n) (up to another burst) to the clock's reading; with
/// bursts within this bound those sums stay below 2<sup>63</sup> ns plus the time since
/// the limiter was created.
pub const MAX_BURST_REFILL: Duration = Duration::from_nanos(1 << 62);

/// `quota`, clamped to [`MAX_BURST_REFILL`]: the one place a quota is made safe for
/// `governor`, applied wherever a quota comes into a limiter. A quota within the bound
/// is returned as it is.
pub(super) fn clamp_quota(quota: Quota) -> Quota {
    let max = MAX_BURST_REFILL.as_nanos();
    if super::store::refill_span(quota) <= max {
        return quota;
    }
    // As governor takes the interval: at least one nanosecond.
    let interval = quota.replenish_interval().as_nanos().max(1);
    if interval >= max {
        // Even one cell takes too long.
        return Quota::with_period(MAX_BURST_REFILL)
            .expect("a non-zero period")
            .allow_burst(NonZeroU32::MIN);
    }
    // `interval < max < interval * burst`: between 1 and the burst, which is a `u32`.
    let burst = u32::try_from(max / interval)
        .ok()
        .and_then(NonZeroU32::new)
        .unwrap_or(NonZeroU32::MIN);
    quota.allow_burst(burst)
}

type Gov<K, C> = RateLimiter<K, SharedStore<K>, GovClock<C>, NoOpMiddleware<Nanos>>;

/// One quota and the `governor` limiter built for it.
struct Current<K: Hash + Eq + Clone, C: Clock> {
    quota: Quota,
    limiter: Gov<K, C>,
}

struct Inner<K: Hash + Eq + Clone, C: Clock> {
    store: SharedStore<K>,
    current: ArcSwap<Current<K, C>>,
    clock: C,
    epoch: C::Instant,
    evict_every: Duration,
    sweeper_started: AtomicBool,
    /// Held by [`KeyedLimiter::set_quota`]: one quota change at a time, so that each
    /// rescales the states from the quota it replaces.
    quota_change: Mutex<()>,
}

/// A key's request was over its rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Throttled {
    wait: Duration,
    overflow: bool,
}

impl Throttled {
    /// How long until the key's next request would conform to the current quota.
    pub const fn wait(&self) -> Duration {
        self.wait
    }

    /// Whether the shared overflow bucket refused the request, not the key's own
    /// budget: the key was not tracked and all `max_keys` slots were taken (see the
    /// [module docs](super#bounded-state)). Every untracked key shares that bucket, so
    /// such a refusal says nothing about this key's own rate: a flood of other keys
    /// may have drained it.
    pub const fn overflow(&self) -> bool {
        self.overflow
    }
}

/// GCRA rate limiting per key (a client address, an MQTT client id, ...) with bounded
/// state, scheduled eviction of idle keys and a quota that can change at run time.
///
/// This is the machinery behind the per-client tier of [`RateLimitLayer`]; it is public
/// so other layers can key by something else with the same guarantees. See the
/// [module docs](super) for how the bounded store, the eviction schedule and a rate
/// change work.
///
/// Cloning is cheap and clones share everything.
///
/// [`RateLimitLayer`]: super::RateLimitLayer
pub struct KeyedLimiter<K: Hash + Eq + Clone, C: Clock = TokioClock> {
    inner: Arc<Inner<K, C>>,
}

impl<K: Hash + Eq + Clone, C: Clock> Clone for KeyedLimiter<K, C> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<K> KeyedLimiter<K, TokioClock>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    /// A limiter with `quota` per key, at most `max_keys` keys, and tokio's clock.
    ///
    /// `name` labels its metrics (`limiter` label); it must be a constant. A quota whose
    /// burst takes longer than [`MAX_BURST_REFILL`] to refill is clamped to it.
    pub fn new(quota: Quota, max_keys: usize, name: &'static str) -> Self {
        Self::with_clock(quota, max_keys, name, TokioClock::new())
    }
}

impl<K, C> KeyedLimiter<K, C>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    C: Clock + Clone + Send + Sync + 'static,
{
    /// A limiter over an injected clock. A quota whose burst takes longer than
    /// [`MAX_BURST_REFILL`] to refill is clamped to it.
    pub fn with_clock(quota: Quota, max_keys: usize, name: &'static str, clock: C) -> Self {
        let quota = clamp_quota(quota);
        let epoch = clock.now();
        let store = SharedStore::new(max_keys, name);
        let current = Current::new(quota, &store, &clock, epoch);
        Self {
            inner: Arc::new(Inner {
                store,
                current: ArcSwap::from_pointee(current),
                clock,
                epoch,
                evict_every: DEFAULT_EVICT_EVERY,
                sweeper_started: AtomicBool::new(false),
                quota_change: Mutex::new(()),
            }),
        }
    }

    /// Sets how often idle keys are evicted (default [`DEFAULT_EVICT_EVERY`]). A
    /// duration past what a `tokio::time::Instant` holds (`Duration::MAX`) means some
    /// thirty years: no scheduled eviction.
    ///
    /// # Panics
    ///
    /// If called after the limiter was cloned or used, or with a zero duration.
    #[must_use]
    pub fn evict_every(mut self, every: Duration) -> Self {
        assert!(!every.is_zero(), "eviction interval must be positive");
        let inner = Arc::get_mut(&mut self.inner)
            .expect("evict_every must be set before the limiter is cloned");
        assert!(
            !*inner.sweeper_started.get_mut(),
            "evict_every must be set before first use"
        );
        inner.evict_every = every;
        self
    }

    /// Counts one request for `key`: `Ok` if it conforms to the quota, or how long to
    /// wait.
    ///
    /// A key not yet tracked takes a free slot; when all `max_keys` slots are taken, it
    /// is limited in the shared overflow bucket instead (see the module docs). The first
    /// call inside a tokio runtime starts the eviction task.
    ///
    /// # Errors
    ///
    /// [`Throttled`] if the request is over the key's quota; it was not counted.
    /// [`Throttled::overflow`] tells a refusal by the shared overflow bucket.
    #[inline]
    pub fn check(&self, key: &K) -> Result<(), Throttled> {
        self.ensure_sweeper();
        let current = self.inner.current.load();
        clear_overflowed();
        current
            .limiter
            .check_key(key)
            .map_err(|not_until| Throttled {
                wait: not_until.wait_time_from(since(&self.inner.clock, self.inner.epoch)),
                overflow: overflowed(),
            })
    }

    /// Counts `n` cells at once for `key` (bytes of a message, say): `Ok` if all `n`
    /// conform to the quota, or how long to wait. Keys take slots as in
    /// [`check`](Self::check).
    ///
    /// # Errors
    ///
    /// [`Throttled`] if the `n` cells are over the key's quota; none was counted. When
    /// `n` is larger than the burst size, the cells can never conform: the error's
    /// [`wait`](Throttled::wait) is [`Duration::MAX`] (and it is no
    /// [`overflow`](Throttled::overflow): no key's budget could take them).
    #[inline]
    pub fn check_n(&self, key: &K, n: NonZeroU32) -> Result<(), Throttled> {
        self.ensure_sweeper();
        let current = self.inner.current.load();
        // Before governor: it multiplies the cell interval by `n` unchecked, which a
        // slow quota and a large `n` (chosen by a client) overflow.
        if n > current.quota.burst_size() {
            return Err(Throttled {
                wait: Duration::MAX,
                overflow: false,
            });
        }
        clear_overflowed();
        match current.limiter.check_key_n(key, n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(Throttled {
                wait: not_until.wait_time_from(since(&self.inner.clock, self.inner.epoch)),
                overflow: overflowed(),
            }),
            Err(_) => Err(Throttled {
                wait: Duration::MAX,
                overflow: false,
            }),
        }
    }

    /// Replaces the quota. Every key keeps the part of its burst it has used (a key at its
    /// limit stays at it; with the burst kept, a key keeps the cells it has used): each
    /// key's state is re-expressed for the new quota, in one pass over the keys (see the
    /// module docs). A quota whose burst takes longer than [`MAX_BURST_REFILL`] to
    /// refill is clamped to it.
    pub fn set_quota(&self, quota: Quota) {
        let quota = clamp_quota(quota);
        let _one_at_a_time = self.inner.quota_change.lock();
        let by = Rescale::new(
            since(&self.inner.clock, self.inner.epoch),
            self.inner.current.load().quota,
            quota,
        );
        let next = Arc::new(Current::new(
            quota,
            &self.inner.store,
            &self.inner.clock,
            self.inner.epoch,
        ));
        by.change(
            || self.inner.current.store(next),
            |by| self.inner.store.rescale(by),
        );
    }

    /// The current quota, as clamped to [`MAX_BURST_REFILL`].
    pub fn quota(&self) -> Quota {
        self.inner.current.load().quota
    }

    /// How many keys are tracked (the overflow bucket not counted).
    pub fn len(&self) -> usize {
        self.inner.store.len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most keys tracked at once.
    pub fn max_keys(&self) -> usize {
        self.inner.store.max_keys()
    }

    /// Evicts every key whose burst is fully replenished now and returns how many.
    ///
    /// The eviction task calls this every `evict_every`; call it yourself outside a
    /// tokio runtime. Evicting such a key changes no decision while a slot is free: a
    /// fully replenished key and an unknown key are limited alike. With every slot
    /// taken, an evicted key that comes back is new, limited in the overflow bucket
    /// (see the [module docs](super#bounded-state)).
    pub fn evict_idle(&self) -> usize {
        self.inner
            .store
            .evict_idle(since(&self.inner.clock, self.inner.epoch))
    }

    #[inline]
    fn ensure_sweeper(&self) {
        if self.inner.sweeper_started.load(Ordering::Relaxed) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.inner.sweeper_started.swap(true, Ordering::AcqRel) {
            return;
        }
        let guard = SweeperGuard(Arc::downgrade(&self.inner));
        let every = self.inner.evict_every;
        rt.spawn(async move {
            // `deadline` rather than `+` (and no `tokio::time::Interval`, which adds its
            // period unchecked): a huge `evict_every` waits instead of panicking.
            let mut next = deadline(Instant::now(), every);
            loop {
                tokio::time::sleep_until(next).await;
                // Ends once the limiter and every clone of it are gone.
                let Some(inner) = guard.0.upgrade() else {
                    break;
                };
                inner.store.evict_idle(since(&inner.clock, inner.epoch));
                drop(inner);
                // The next sweep `every` after this one, even if this one was late.
                next = deadline(Instant::now(), every);
            }
        });
    }
}

/// Owned by the eviction task. When the task ends or is dropped without the limiter
/// (the runtime it runs on shut down, or it panicked), clears `sweeper_started`, so
/// that the next check starts another one instead of leaving eviction off for good.
struct SweeperGuard<K: Hash + Eq + Clone, C: Clock>(Weak<Inner<K, C>>);

impl<K: Hash + Eq + Clone, C: Clock> Drop for SweeperGuard<K, C> {
    fn drop(&mut self) {
        if let Some(inner) = self.0.upgrade() {
            inner.sweeper_started.store(false, Ordering::Release);
        }
    }
}

impl<K: Hash + Eq + Clone, C: Clock + Clone> Current<K, C> {
    fn new(quota: Quota, store: &SharedStore<K>, clock: &C, epoch: C::Instant) -> Self {
        let gov_clock = GovClock::new(clock.clone(), epoch);
        Self {
            quota,
            limiter: RateLimiter::new(quota, store.clone(), gov_clock),
        }
    }
}

impl<K: Hash + Eq + Clone, C: Clock> fmt::Debug for KeyedLimiter<K, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedLimiter")
            .field("name", &self.inner.store.name())
            .field("quota", &self.inner.current.load().quota)
            .field("keys", &self.inner.store.len())
            .field("max_keys", &self.inner.store.max_keys())
            .field("evict_every", &self.inner.evict_every)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;
    use std::time::Duration;

    use governor::Quota;
    use governor::clock::FakeRelativeClock;

    use super::{KeyedLimiter, MAX_BURST_REFILL, clamp_quota};

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    #[test]
    fn check_n_counts_cells_and_refuses_more_than_the_burst() {
        let clock = FakeRelativeClock::default();
        clock.advance(Duration::from_secs(100));
        // 100 cells a second, bursts of 100.
        let limiter = KeyedLimiter::with_clock(Quota::per_second(nz(100)), 10, "n", clock.clone());
        assert!(limiter.check_n(&1_u8, nz(60)).is_ok());
        // 40 left: 50 more must wait for 10 cells, 100 ms.
        assert_eq!(
            limiter.check_n(&1_u8, nz(50)).unwrap_err().wait(),
            Duration::from_millis(100)
        );
        assert!(limiter.check_n(&1_u8, nz(40)).is_ok());
        // Other keys keep their own budget.
        assert!(limiter.check_n(&2_u8, nz(100)).is_ok());
        // More than the burst never conforms, however long one waits.
        clock.advance(Duration::from_secs(10));
        assert_eq!(
            limiter.check_n(&1_u8, nz(101)).unwrap_err().wait(),
            Duration::MAX
        );
        assert!(limiter.check_n(&1_u8, nz(100)).is_ok());
    }

    /// Raising the rate must not lock out a key at its limit: at 1/s with a burst of 40,
    /// a key that used all 40 gets its next cell after 1 s. Kept as it was, its state
    /// (40 s ahead) read at 2/s (tolerance 19.5 s) refused it for 20.5 s.
    #[test]
    fn raising_the_rate_keeps_a_key_at_its_limit_as_limited_not_more() {
        let clock = FakeRelativeClock::default();
        clock.advance(Duration::from_secs(100));
        let limiter = KeyedLimiter::with_clock(
            Quota::per_second(nz(1)).allow_burst(nz(40)),
            10,
            "raise",
            clock.clone(),
        );
        for _ in 0..40 {
            assert!(limiter.check(&1_u8).is_ok());
        }
        assert_eq!(
            limiter.check(&1_u8).unwrap_err().wait(),
            Duration::from_secs(1)
        );
        limiter.set_quota(Quota::per_second(nz(2)).allow_burst(nz(40)));
        // Still out of burst, now coming back at 2/s.
        assert_eq!(
            limiter.check(&1_u8).unwrap_err().wait(),
            Duration::from_millis(500)
        );
        clock.advance(Duration::from_millis(500));
        assert!(limiter.check(&1_u8).is_ok());
        assert!(limiter.check(&1_u8).is_err());
    }

    /// Lowering the rate must not hand out burst again: at 20/s with a burst of 40, a key
    /// that used all 40 is out of burst at 16/s too. Kept as it was, its state (2 s
    /// ahead) read at 16/s (tolerance 2.44 s) admitted 8 more at once.
    #[test]
    fn lowering_the_rate_hands_out_no_burst() {
        let clock = FakeRelativeClock::default();
        clock.advance(Duration::from_secs(100));
        let limiter = KeyedLimiter::with_clock(
            Quota::per_second(nz(20)).allow_burst(nz(40)),
            10,
            "lower",
            clock.clone(),
        );
        for _ in 0..40 {
            assert!(limiter.check(&1_u8).is_ok());
        }
        limiter.set_quota(Quota::per_second(nz(16)).allow_burst(nz(40)));
        assert_eq!(
            limiter.check(&1_u8).unwrap_err().wait(),
            Duration::from_micros(62_500)
        );
        // A key that used half its burst has the other half left, at either rate.
        for _ in 0..20 {
            assert!(limiter.check(&2_u8).is_ok());
        }
        limiter.set_quota(Quota::per_second(nz(4)).allow_burst(nz(40)));
        for _ in 0..20 {
            assert!(limiter.check(&2_u8).is_ok());
        }
        assert!(limiter.check(&2_u8).is_err());
        // Keys over the cap share the overflow bucket: it is rescaled too.
        let full = KeyedLimiter::with_clock(
            Quota::per_second(nz(20)).allow_burst(nz(40)),
            0,
            "overflow",
            clock.clone(),
        );
        for _ in 0..40 {
            assert!(full.check(&3_u8).is_ok());
        }
        full.set_quota(Quota::per_second(nz(16)).allow_burst(nz(40)));
        assert!(full.check(&4_u8).is_err());
    }

    /// A slow quota and a large `n` (the bytes of a message a client chose) overflowed
    /// governor's cell arithmetic: a panic in debug builds, and in release builds a wrap
    /// that let the cells conform.
    #[test]
    fn check_n_far_over_a_slow_quota_is_refused_without_overflow() {
        let clock = FakeRelativeClock::default();
        clock.advance(Duration::from_secs(100));
        let quota = Quota::per_hour(nz(1)).allow_burst(nz(1000));
        let limiter = KeyedLimiter::with_clock(quota, 10, "n", clock);
        assert_eq!(
            limiter.check_n(&1_u8, nz(5_124_097)).unwrap_err().wait(),
            Duration::MAX
        );
        assert!(limiter.check_n(&1_u8, nz(1000)).is_ok());
    }

    const YEAR: Duration = Duration::from_secs(31_557_600);

    #[test]
    fn clamp_quota_leaves_quotas_within_the_bound_and_cuts_the_burst_of_others() {
        // Within the bound, unchanged, including every quota of n per second.
        for q in [
            Quota::per_second(NonZeroU32::MAX),
            Quota::per_second(nz(1)).allow_burst(NonZeroU32::MAX),
            Quota::with_period(MAX_BURST_REFILL).unwrap(),
            Quota::with_period(MAX_BURST_REFILL / 4)
                .unwrap()
                .allow_burst(nz(4)),
        ] {
            assert_eq!(clamp_quota(q), q);
        }
        // Past it: the burst cut to what refills within it, the rate kept.
        assert_eq!(
            clamp_quota(
                Quota::with_period(MAX_BURST_REFILL / 4)
                    .unwrap()
                    .allow_burst(nz(5))
            ),
            Quota::with_period(MAX_BURST_REFILL / 4)
                .unwrap()
                .allow_burst(nz(4))
        );
        assert_eq!(
            clamp_quota(Quota::per_hour(nz(1)).allow_burst(nz(5_124_097))),
            Quota::per_hour(nz(1)).allow_burst(nz(1_281_023))
        );
        // One cell past it (even past u64 nanoseconds): the interval cut to it.
        for period in [
            MAX_BURST_REFILL + Duration::from_nanos(1),
            600 * YEAR,
            Duration::MAX,
        ] {
            assert_eq!(
                clamp_quota(Quota::with_period(period).unwrap().allow_burst(nz(7))),
                Quota::with_period(MAX_BURST_REFILL).unwrap()
            );
        }
    }

    /// One cell every 40 years with a burst of 12 refills in 480 years (a quota the
    /// mqtt-gateway once accepted) and passed governor's own arithmetic, but `check_n`
    /// of the whole burst twice added a state 480 years ahead to 440 years of cells: past
    /// `u64` nanoseconds, a panic in debug builds. Clamped to a burst of 3, the sums
    /// stay in range.
    #[test]
    fn check_n_under_a_quota_past_the_bound_does_not_overflow() {
        let clock = FakeRelativeClock::default();
        clock.advance(Duration::from_secs(100));
        let quota = Quota::with_period(40 * YEAR).unwrap().allow_burst(nz(12));
        let limiter = KeyedLimiter::with_clock(quota, 10, "n", clock.clone());
        for _ in 0..2 {
            let _ = limiter.check_n(&1_u8, nz(12));
            let _ = limiter.check_n(&1_u8, nz(3));
        }
        assert_eq!(
            limiter.quota(),
            Quota::with_period(40 * YEAR).unwrap().allow_burst(nz(3))
        );
        assert_eq!(limiter.check_n(&2_u8, nz(3)), Ok(()));
        assert_eq!(limiter.check(&2_u8).unwrap_err().wait(), 40 * YEAR);
        // Set at run time, the same.
        let limiter = KeyedLimiter::with_clock(Quota::per_second(nz(1)), 10, "n", clock);
        limiter.set_quota(quota);
        assert_eq!(limiter.quota().burst_size(), nz(3));
        assert_eq!(limiter.check_n(&1_u8, nz(3)), Ok(()));
        assert!(limiter.check_n(&1_u8, nz(3)).is_err());
    }
}
