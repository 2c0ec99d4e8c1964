//! The state stores: GCRA state (a TAT per key) kept apart from the quota, so limiters
//! rebuilt for a new quota share it.

use std::fmt;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use governor::Quota;
use governor::nanos::Nanos;
use governor::state::{NotKeyed, StateStore};

use super::metrics;

thread_local! {
    /// Whether this thread's last check of a keyed store went to the overflow cell: set
    /// by [`SharedStore`]'s `measure_and_replace`, which governor calls synchronously
    /// inside a check, read by the check right after (see [`overflowed`]).
    static OVERFLOWED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the last keyed check on this thread was decided by the overflow cell (the
/// key was not tracked and every slot was taken). Valid right after a check that
/// reached the store; a check governor refuses before reading any state (more cells
/// than the burst) leaves it as it was, so [`clear_overflowed`] first.
#[inline]
pub(super) fn overflowed() -> bool {
    OVERFLOWED.with(std::cell::Cell::get)
}

/// Resets what [`overflowed`] reports, before a check.
#[inline]
pub(super) fn clear_overflowed() {
    OVERFLOWED.with(|o| o.set(false));
}

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

    /// Re-expresses the state for a new quota: see [`Rescale`].
    fn rescale(&self, by: Rescale) {
        // A state at or before `now` is replenished under any quota: left as it is.
        let _ = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                (tat > by.now).then(|| by.apply(tat))
            });
    }
}

/// The nanoseconds `quota` takes to refill its whole burst: the cell interval (as
/// governor takes it, at least one nanosecond) times the burst.
pub(super) fn refill_span(quota: Quota) -> u128 {
    quota.replenish_interval().as_nanos().max(1) * u128::from(quota.burst_size().get())
}

/// A quota change, for the states stored under the old quota.
///
/// A TAT (theoretical arrival time) `tat` ahead of `now` is the part of a key's burst
/// in use: `(tat - now)` out of the burst's whole span, `t * burst`, `t` being the time
/// one cell takes to come back. Kept as it is under a new quota, the same TAT would be
/// another part of the new span: raising the rate tenfold left a key at its limit
/// locked out for ten times its burst, lowering it handed out burst again. So each
/// state is moved to `now + (tat - now) * span' / span`: a key keeps the part of its
/// burst it has used (at its limit, it stays at its limit; with half its burst left,
/// it has half of the new burst left). With the burst kept, as the `*_rate` setters
/// do, that is the cells it has used.
#[derive(Clone, Copy, Debug)]
pub(super) struct Rescale {
    now: u64,
    old_span: u128,
    new_span: u128,
}

impl Rescale {
    /// `now` on the stores' clock; `old` and `new` the quotas before and after.
    pub(super) fn new(now: Nanos, old: Quota, new: Quota) -> Self {
        Self {
            now: now.as_u64(),
            old_span: refill_span(old),
            new_span: refill_span(new),
        }
    }

    /// Makes the change: `swap` puts the new quota's limiter in, `rescale` re-expresses
    /// the states (skipped when they would not change).
    ///
    /// Checks go on during the pass, on one limiter or the other, so the order of the
    /// swap and the pass decides which reads states of the other quota's units. The
    /// order that only ever refuses more during the pass: when the states shrink (a
    /// raise of the rate or the burst), swap in the new limiter first (it reads states
    /// not yet shrunk: stricter); when they grow, re-express them first (the old limiter
    /// reads states already grown).
    pub(super) fn change(self, swap: impl FnOnce(), rescale: impl FnOnce(Self)) {
        use std::cmp::Ordering::{Equal, Greater, Less};
        match self.new_span.cmp(&self.old_span) {
            Equal => swap(),
            Less => {
                swap();
                rescale(self);
            }
            Greater => {
                rescale(self);
                swap();
            }
        }
    }

    /// `tat`, after `now`, re-expressed; never 0, which a cell reads as "never seen".
    fn apply(self, tat: u64) -> u64 {
        let used = u128::from(tat - self.now) * self.new_span / self.old_span;
        u64::try_from(u128::from(self.now) + used)
            .unwrap_or(u64::MAX)
            .max(1)
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

impl SharedCell {
    /// Re-expresses the state for a new quota (see [`Rescale`]).
    pub(super) fn rescale(&self, by: Rescale) {
        self.0.rescale(by);
    }
}

impl fmt::Debug for SharedCell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SharedCell").finish()
    }
}

/// The bounded keyed store: at most `max_keys` entries, then one shared overflow cell.
struct Store<K> {
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

    fn rescale(&self, by: Rescale) {
        for entry in &self.map {
            entry.value().rescale(by);
        }
        self.overflow.rescale(by);
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
            OVERFLOWED.with(|o| o.set(true));
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

impl<K: Hash + Eq + Clone> SharedStore<K> {
    pub(super) fn new(max_keys: usize, name: &'static str) -> Self {
        Self(Arc::new(Store::new(max_keys, name)))
    }

    /// Keys tracked, the overflow cell not counted.
    pub(super) fn len(&self) -> usize {
        self.0.len.load(Ordering::Acquire)
    }

    pub(super) fn max_keys(&self) -> usize {
        self.0.max_keys
    }

    pub(super) fn name(&self) -> &'static str {
        self.0.name
    }

    /// Re-expresses every key's state, and the overflow bucket's, for a new quota (see
    /// [`Rescale`]): one pass over the keys.
    pub(super) fn rescale(&self, by: Rescale) {
        self.0.rescale(by);
    }

    /// Drops every key whose state is fully replenished at `now`; returns how many.
    pub(super) fn evict_idle(&self, now: Nanos) -> usize {
        self.0.evict_idle(now)
    }
}

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
