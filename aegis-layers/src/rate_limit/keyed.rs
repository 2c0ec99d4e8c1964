//! [`KeyedLimiter`]: GCRA rate limiting per key over a bounded, shared state store.

use std::fmt;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{NotKeyed, StateStore};
use governor::{Quota, RateLimiter};

use super::clock::{GovClock, TokioClock, since};
use super::metrics;

/// How often idle keys are evicted by default.
pub const DEFAULT_EVICT_EVERY: Duration = Duration::from_secs(30);

/// How many keys a limiter tracks at most by default (about 10 MB for IP keys).
pub const DEFAULT_MAX_KEYS: usize = 100_000;

/// One GCRA state: the theoretical arrival time (TAT) in nanoseconds since the store's
/// epoch, 0 meaning "never seen". Updated with a compare-and-swap loop, as governor's
/// own `InMemoryState` does.
#[derive(Default)]
pub(super) struct Cell(AtomicU64);

impl Cell {
    #[inline]
    fn measure_and_replace<T, F, E>(&self, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let read = |v: u64| (v != 0).then(|| Nanos::new(v));
        let mut prev = self.0.load(Ordering::Acquire);
        loop {
            let (out, next) = f(read(prev))?;
            match self.0.compare_exchange_weak(
                prev,
                next.as_u64(),
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(out),
                Err(actual) => prev = actual,
            }
        }
    }

    /// Whether the state is fully replenished at `now`: a TAT at or before `now` decides
    /// exactly like no state at all, so dropping it changes no decision.
    #[inline]
    fn is_idle(&self, now: Nanos) -> bool {
        self.0.load(Ordering::Relaxed) <= now.as_u64()
    }
}

/// The state of one direct (unkeyed) limiter, shared by every limiter built over it.
#[derive(Clone, Default)]
pub(super) struct SharedCell(Arc<Cell>);

impl StateStore for SharedCell {
    type Key = NotKeyed;

    #[inline]
    fn measure_and_replace<T, F, E>(&self, _key: &NotKeyed, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        self.0.measure_and_replace(f)
    }
}

impl fmt::Debug for SharedCell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SharedCell").finish()
    }
}

/// The bounded keyed store: at most `max_keys` entries, then one shared overflow cell.
pub(super) struct Store<K> {
    map: DashMap<K, Cell>,
    /// Entries in `map`, kept here so that the cap check does not lock every shard.
    len: AtomicUsize,
    max_keys: usize,
    overflow: Cell,
    name: &'static str,
}

impl<K: Hash + Eq + Clone> Store<K> {
    fn new(max_keys: usize, name: &'static str) -> Self {
        Self {
            map: DashMap::new(),
            len: AtomicUsize::new(0),
            max_keys,
            overflow: Cell::default(),
            name,
        }
    }

    /// Takes one of the `max_keys` slots, if any is left.
    fn reserve(&self) -> bool {
        self.len
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_keys).then_some(n + 1)
            })
            .is_ok()
    }

    fn evict_idle(&self, now: Nanos) -> usize {
        let mut evicted = 0;
        self.map.retain(|_, cell| {
            let idle = cell.is_idle(now);
            evicted += usize::from(idle);
            !idle
        });
        self.len.fetch_sub(evicted, Ordering::AcqRel);
        let len = self.len.load(Ordering::Acquire);
        // Give memory back after a flood has drained away.
        if evicted > 0 && len < self.map.capacity() / 4 {
            self.map.shrink_to_fit();
        }
        metrics::keys(self.name, len);
        if evicted > 0 {
            metrics::evicted(self.name, evicted);
        }
        evicted
    }
}

impl<K: Hash + Eq + Clone> StateStore for SharedStore<K> {
    type Key = K;

    #[inline]
    fn measure_and_replace<T, F, E>(&self, key: &K, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let store = &*self.0;
        if let Some(cell) = store.map.get(key) {
            return cell.measure_and_replace(f);
        }
        if !store.reserve() {
            metrics::overflow(store.name);
            return store.overflow.measure_and_replace(f);
        }
        match store.map.entry(key.clone()) {
            Entry::Occupied(e) => {
                // Another caller inserted this key meanwhile: give the slot back.
                store.len.fetch_sub(1, Ordering::AcqRel);
                e.get().measure_and_replace(f)
            }
            Entry::Vacant(e) => {
                let cell = e.insert(Cell::default());
                metrics::keys(store.name, store.len.load(Ordering::Relaxed));
                cell.measure_and_replace(f)
            }
        }
    }
}

/// A shared handle on a [`Store`], the state store of every `RateLimiter` swapped in.
pub(super) struct SharedStore<K>(Arc<Store<K>>);

impl<K> Clone for SharedStore<K> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<K> fmt::Debug for SharedStore<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedStore")
            .field("keys", &self.0.len.load(Ordering::Relaxed))
            .field("max_keys", &self.0.max_keys)
            .finish_non_exhaustive()
    }
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
}

/// A key's request was over its rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Throttled {
    wait: Duration,
}

impl Throttled {
    /// How long until the key's next request would conform to the current quota.
    pub const fn wait(&self) -> Duration {
        self.wait
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
    /// `name` labels its metrics (`limiter` label); it must be a constant.
    pub fn new(quota: Quota, max_keys: usize, name: &'static str) -> Self {
        Self::with_clock(quota, max_keys, name, TokioClock::new())
    }
}

impl<K, C> KeyedLimiter<K, C>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    C: Clock + Clone + Send + Sync + 'static,
{
    /// A limiter over an injected clock.
    pub fn with_clock(quota: Quota, max_keys: usize, name: &'static str, clock: C) -> Self {
        let epoch = clock.now();
        let store = SharedStore(Arc::new(Store::new(max_keys, name)));
        let current = Current::new(quota, &store, &clock, epoch);
        Self {
            inner: Arc::new(Inner {
                store,
                current: ArcSwap::from_pointee(current),
                clock,
                epoch,
                evict_every: DEFAULT_EVICT_EVERY,
                sweeper_started: AtomicBool::new(false),
            }),
        }
    }

    /// Sets how often idle keys are evicted (default [`DEFAULT_EVICT_EVERY`]).
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
    #[inline]
    pub fn check(&self, key: &K) -> Result<(), Throttled> {
        self.ensure_sweeper();
        let current = self.inner.current.load();
        current
            .limiter
            .check_key(key)
            .map_err(|not_until| Throttled {
                wait: not_until.wait_time_from(since(&self.inner.clock, self.inner.epoch)),
            })
    }

    /// Replaces the quota. Every key keeps the burst it has used: the state store is
    /// kept, only the GCRA parameters change (see the module docs).
    pub fn set_quota(&self, quota: Quota) {
        let next = Current::new(
            quota,
            &self.inner.store,
            &self.inner.clock,
            self.inner.epoch,
        );
        self.inner.current.store(Arc::new(next));
    }

    /// The current quota.
    pub fn quota(&self) -> Quota {
        self.inner.current.load().quota
    }

    /// How many keys are tracked (the overflow bucket not counted).
    pub fn len(&self) -> usize {
        self.inner.store.0.len.load(Ordering::Acquire)
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most keys tracked at once.
    pub fn max_keys(&self) -> usize {
        self.inner.store.0.max_keys
    }

    /// Evicts every key whose burst is fully replenished now and returns how many.
    ///
    /// The eviction task calls this every `evict_every`; call it yourself outside a
    /// tokio runtime. Evicting such a key changes no decision: a fully replenished key
    /// and an unknown key are limited alike.
    pub fn evict_idle(&self) -> usize {
        self.inner
            .store
            .0
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
        let weak: Weak<Inner<K, C>> = Arc::downgrade(&self.inner);
        let every = self.inner.evict_every;
        rt.spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                // Ends once the limiter and every clone of it are gone.
                let Some(inner) = weak.upgrade() else { break };
                inner.store.0.evict_idle(since(&inner.clock, inner.epoch));
            }
        });
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
            .field("name", &self.inner.store.0.name)
            .field("quota", &self.inner.current.load().quota)
            .field("keys", &self.inner.store.0.len.load(Ordering::Relaxed))
            .field("max_keys", &self.inner.store.0.max_keys)
            .field("evict_every", &self.inner.evict_every)
            .finish_non_exhaustive()
    }
}

/// An unkeyed limiter (the global tier) whose quota can change without losing state.
pub(super) struct DirectLimiter {
    cell: SharedCell,
    current: ArcSwap<DirectCurrent>,
    clock: TokioClock,
}

struct DirectCurrent {
    quota: Quota,
    limiter: RateLimiter<NotKeyed, SharedCell, GovClock<TokioClock>, NoOpMiddleware<Nanos>>,
}

impl DirectLimiter {
    pub(super) fn new(quota: Quota, clock: TokioClock) -> Self {
        let cell = SharedCell::default();
        let current = ArcSwap::from_pointee(Self::build(quota, &cell, clock));
        Self {
            cell,
            current,
            clock,
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

    pub(super) fn set_quota(&self, quota: Quota) {
        let next = Self::build(quota, &self.cell, self.clock);
        self.current.store(Arc::new(next));
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
