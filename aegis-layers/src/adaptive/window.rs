//! The latency histograms: the open window the services record into, and the closed
//! windows the controller measures over.

use std::collections::VecDeque;
use std::fmt;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use tokio::sync::Notify;

/// Latencies are recorded in microseconds, up to this (one minute); longer ones count as
/// one minute, which reads back as 59.77 s (the lowest value of its bucket).
const MAX_MICROS: u64 = 60_000_000;

// A saturated sample must read over every threshold `RateConfig` accepts, with room.
const _: () = assert!(super::control::MAX_THRESHOLD.as_micros() * 2 <= MAX_MICROS as u128);
/// Two significant digits: each value is within 1 % of the recorded one. With
/// [`MAX_MICROS`], a histogram holds (19 buckets + 1) x 128 `u64` counts: 20 KiB.
const SIGFIG: u8 = 2;

/// How many closed windows (control intervals) a measurement may reach back over when
/// the newest ones hold too few samples: at a low rate or limit, the controller's own
/// limit caps how many samples one window can get, and two windows may never be enough.
/// Eight keeps a decision within eight intervals of its evidence: with the open window,
/// nine histograms (180 KiB) a controller, and a merged copy (20 KiB more) while a
/// decision reaches back over several windows.
pub(crate) const MAX_WINDOWS: usize = 8;

/// No dropped call is a sample (also any floor of `u64::MAX` microseconds or more).
const NO_DROP_FLOOR: u64 = u64::MAX;

fn histogram() -> Histogram<u64> {
    Histogram::new_with_max(MAX_MICROS, SIGFIG).expect("valid histogram bounds")
}

/// The buckets keyed samples are counted in, by a hash of their key
/// ([`Shared::record_keyed`]) under a per-controller random seed: a fixed 3 x 64
/// `u32` counts a window (768 bytes) however many clients there are. A client cannot
/// pick whose bucket it shares; sharing one only costs the other client's samples in
/// the one bucket [left out](Windows::tail_without_worst_key).
pub(crate) const KEY_BUCKETS: usize = 64;

/// What the rate law's tail rule counts, from [`Shared::set_tail`]: samples over the
/// threshold (`slow`) and at 0.7 x the threshold or over (`warm`), per key bucket
/// and in all.
#[derive(Clone, Copy)]
struct Tail {
    /// Keyed samples per bucket.
    all: [u32; KEY_BUCKETS],
    /// Keyed samples over the threshold per bucket.
    slow: [u32; KEY_BUCKETS],
    /// Keyed samples at `0.7 x threshold` or over per bucket.
    warm: [u32; KEY_BUCKETS],
    /// Every sample over the threshold, keyed or not.
    slow_total: u64,
    /// Every sample at `0.7 x threshold` or over, keyed or not.
    warm_total: u64,
}

impl Tail {
    const EMPTY: Self = Self {
        all: [0; KEY_BUCKETS],
        slow: [0; KEY_BUCKETS],
        warm: [0; KEY_BUCKETS],
        slow_total: 0,
        warm_total: 0,
    };

    fn add(&mut self, other: &Self) {
        for i in 0..KEY_BUCKETS {
            self.all[i] = self.all[i].saturating_add(other.all[i]);
            self.slow[i] = self.slow[i].saturating_add(other.slow[i]);
            self.warm[i] = self.warm[i].saturating_add(other.warm[i]);
        }
        self.slow_total = self.slow_total.saturating_add(other.slow_total);
        self.warm_total = self.warm_total.saturating_add(other.warm_total);
    }
}

/// One window: its latencies and its tail counts.
struct Window {
    hist: Histogram<u64>,
    tail: Tail,
}

impl Window {
    fn new() -> Self {
        Self {
            hist: histogram(),
            tail: Tail::EMPTY,
        }
    }

    fn reset(&mut self) {
        self.hist.reset();
        self.tail = Tail::EMPTY;
    }
}

/// Where the measured windows' P95 stands against the rate law's bounds once the
/// samples of the one key bucket holding the most of the tail are left out: see
/// [`Windows::tail_without_worst_key`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TailClass {
    /// Over the threshold.
    Over,
    /// From `0.7 x threshold` to the threshold.
    Between,
    /// Under `0.7 x threshold`.
    Under,
}

/// The controller's side: its shutdown signal, alive as long as the task is.
#[derive(Debug, Default)]
pub(crate) struct Control {
    pub(crate) notify: Notify,
    pub(crate) stopped: AtomicBool,
}

/// Shared by the controller, its handles, layers and services.
pub(crate) struct Shared {
    /// The open window, recorded into by every call.
    current: Mutex<Window>,
    /// Seeds the hash of [`record_keyed`](Self::record_keyed)'s keys.
    seed: RandomState,
    /// The rate law's threshold and `0.7 x` it, in microseconds: the tail bounds
    /// ([`set_tail`](Self::set_tail); `u64::MAX`: none, nothing is counted).
    slow_over: AtomicU64,
    warm_from: AtomicU64,
    /// The current rate or limit, as `f64` bits.
    value: AtomicU64,
    /// The age in microseconds from which a call dropped before it completed is a
    /// sample ([`NO_DROP_FLOOR`]: none is). See [`record_dropped`](Self::record_dropped).
    drop_floor: AtomicU64,
    pub(crate) control: Arc<Control>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("value", &self.value())
            .finish_non_exhaustive()
    }
}

/// What the closed windows gave.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Measured {
    /// The quantile over the newest windows that hold the minimum of samples.
    Latency(Duration),
    /// Fewer samples than the minimum over all the closed windows: how many, their
    /// quantile when there is at least one, and whether there are [`MAX_WINDOWS`]
    /// windows (so waiting longer would not bring more).
    TooFew {
        samples: u64,
        latency: Option<Duration>,
        full: bool,
    },
}

/// `d` in whole microseconds, saturating at `u64::MAX` (some 584,000 years).
fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Shared {
    pub(crate) fn new(initial: f64) -> Arc<Self> {
        Arc::new(Self {
            current: Mutex::new(Window::new()),
            seed: RandomState::new(),
            slow_over: AtomicU64::new(u64::MAX),
            warm_from: AtomicU64::new(u64::MAX),
            value: AtomicU64::new(initial.to_bits()),
            drop_floor: AtomicU64::new(NO_DROP_FLOOR),
            control: Arc::new(Control::default()),
        })
    }

    pub(crate) fn record(&self, latency: Duration) {
        self.record_in(None, latency);
    }

    /// Records a sample of the client `key`: counted in its key bucket too, so that
    /// the rate law can tell a tail that one client makes by itself
    /// ([`Windows::tail_without_worst_key`]).
    pub(crate) fn record_keyed<K: Hash + ?Sized>(&self, key: &K, latency: Duration) {
        self.record_in(Some(self.bucket(key)), latency);
    }

    /// The bucket `key`'s samples are counted in.
    fn bucket<K: Hash + ?Sized>(&self, key: &K) -> usize {
        // The remainder is under KEY_BUCKETS: the cast cannot truncate.
        #[allow(clippy::cast_possible_truncation)]
        let bucket = (self.seed.hash_one(key) % KEY_BUCKETS as u64) as usize;
        bucket
    }

    fn record_in(&self, bucket: Option<usize>, latency: Duration) {
        let us = micros(latency);
        let slow = us > self.slow_over.load(Ordering::Relaxed);
        let warm = us >= self.warm_from.load(Ordering::Relaxed);
        let mut w = self.current.lock();
        w.hist.saturating_record(us);
        let t = &mut w.tail;
        t.slow_total += u64::from(slow);
        t.warm_total += u64::from(warm);
        if let Some(b) = bucket {
            t.all[b] = t.all[b].saturating_add(1);
            t.slow[b] = t.slow[b].saturating_add(u32::from(slow));
            t.warm[b] = t.warm[b].saturating_add(u32::from(warm));
        }
    }

    /// Sets the rate law's bounds the samples are counted against: over `threshold`
    /// and at `0.7 x threshold` or over.
    pub(crate) fn set_tail(&self, threshold: Duration) {
        self.slow_over.store(micros(threshold), Ordering::Relaxed);
        let warm = Duration::from_secs_f64(threshold.as_secs_f64() * 0.7);
        self.warm_from.store(micros(warm), Ordering::Relaxed);
    }

    /// Records a call dropped before it completed, `age` after it started, when that
    /// is at least the floor the controller set: its latency is at least its age, over
    /// the floor, where the controller's decision no longer depends on how far over it
    /// is (the rate threshold; twice the buffered minimum RTT, where the gradient is at
    /// its lowest). Below the floor (a cancelled fast call, or no floor set) it says too
    /// little, and is no sample. Long ages saturate as completed calls' do.
    pub(crate) fn record_dropped(&self, age: Duration) {
        let floor = self.drop_floor.load(Ordering::Relaxed);
        if floor != NO_DROP_FLOOR && micros(age) >= floor {
            self.record(age);
        }
    }

    /// Sets the floor of [`record_dropped`](Self::record_dropped).
    pub(crate) fn set_drop_floor(&self, floor: Duration) {
        self.drop_floor.store(micros(floor), Ordering::Relaxed);
    }

    /// Closes the open window: returns its samples and leaves `empty` in its place.
    fn take(&self, empty: Window) -> Window {
        std::mem::replace(&mut *self.current.lock(), empty)
    }

    pub(crate) fn value(&self) -> f64 {
        f64::from_bits(self.value.load(Ordering::Relaxed))
    }

    pub(crate) fn set_value(&self, v: f64) {
        self.value.store(v.to_bits(), Ordering::Relaxed);
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // The last handle, layer or service is gone: end the controller now rather than
        // at its next tick.
        self.control.notify.notify_one();
    }
}

/// The closed windows, newest first, at most [`MAX_WINDOWS`]: the controller task's
/// own, so that measuring over them never holds the lock the services record under.
pub(crate) struct Windows {
    closed: VecDeque<Window>,
    /// How many windows were closed since the last [`mark`](Self::mark) (all of them
    /// when there was none).
    since_mark: usize,
    /// How many closed windows the last measurement reached over.
    used: usize,
}

impl fmt::Debug for Windows {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Windows")
            .field("closed", &self.closed.len())
            .field("since_mark", &self.since_mark)
            .field("used", &self.used)
            .finish()
    }
}

impl Windows {
    pub(crate) fn new() -> Self {
        Self {
            closed: VecDeque::with_capacity(MAX_WINDOWS),
            since_mark: usize::MAX,
            used: 0,
        }
    }

    /// Marks the windows closed so far as older than a change of the value: see
    /// [`reaches_past_mark`](Self::reaches_past_mark).
    pub(crate) fn mark(&mut self) {
        self.since_mark = 0;
    }

    /// Whether the last measurement reached back past the last [`mark`](Self::mark)
    /// for its samples: the windows closed since then held too few by themselves.
    pub(crate) fn reaches_past_mark(&self) -> bool {
        self.used > self.since_mark
    }

    /// Closes the open window and measures the `quantile` over the fewest newest
    /// windows (the one just closed first) that hold `min_samples` samples together:
    /// the last window alone when it has enough, else with the one before, and so on,
    /// back at most [`MAX_WINDOWS`] windows.
    pub(crate) fn rotate(&mut self, shared: &Shared, quantile: f64, min_samples: u64) -> Measured {
        // Reuse the oldest window's memory once there are enough of them.
        let empty = if self.closed.len() >= MAX_WINDOWS {
            let mut oldest = self.closed.pop_back().expect("MAX_WINDOWS > 0");
            oldest.reset();
            oldest
        } else {
            Window::new()
        };
        self.closed.push_front(shared.take(empty));
        self.since_mark = self.since_mark.saturating_add(1);

        let mut samples = 0;
        let mut used = 0;
        for w in &self.closed {
            samples += w.hist.len();
            used += 1;
            if samples >= min_samples {
                break;
            }
        }
        self.used = used;
        let latency = (samples > 0).then(|| self.quantile(used, quantile));
        match latency {
            Some(latency) if samples >= min_samples => Measured::Latency(latency),
            _ => Measured::TooFew {
                samples,
                latency,
                full: self.closed.len() >= MAX_WINDOWS,
            },
        }
    }

    /// The `quantile` over the `used` newest closed windows, rounded down to the
    /// lowest value of its histogram bucket.
    ///
    /// `value_at_quantile` gives the bucket's highest value, up to 0.8 % over the
    /// recorded ones (99.9 ms read 100.35 ms): latencies just under a threshold would
    /// cross it. Rounded down, a measured quantile over a threshold means recorded
    /// latencies over it; one up to 0.8 % over may read under.
    fn quantile(&self, used: usize, quantile: f64) -> Duration {
        let merged;
        let h = if used == 1 {
            &self.closed[0].hist
        } else {
            let mut all = self.closed[0].hist.clone();
            for w in self.closed.iter().take(used).skip(1) {
                all.add(&w.hist).expect("same bounds");
            }
            merged = all;
            &merged
        };
        Duration::from_micros(h.lowest_equivalent(h.value_at_quantile(quantile)))
    }

    /// Where the P95 of the last measurement's windows stands against the rate law's
    /// bounds ([`Shared::set_tail`]) without the key bucket that holds the most of its
    /// tail: over the threshold when more than 5 % of the samples left are over it
    /// with the bucket holding the most of those left out, under `0.7 x threshold`
    /// when at most 5 % are at it or over with the bucket holding the most of those
    /// left out, else between. (With the histogram's rounding, the P95 of the samples
    /// itself may read a hair under where these counts put it.)
    ///
    /// One client's samples are in one bucket: a tail it makes by itself (a slow URL it
    /// asks for over and over) is not over the threshold here, however large a share of
    /// the samples it has, while one that many clients see is.
    ///
    /// `None` when none of the samples was keyed (only [`Shared::record`]): then there
    /// is no client to tell.
    pub(crate) fn tail_without_worst_key(&self) -> Option<TailClass> {
        let mut t = Tail::EMPTY;
        let mut samples = 0;
        for w in self.closed.iter().take(self.used) {
            t.add(&w.tail);
            samples += w.hist.len();
        }
        if t.all.iter().all(|&n| n == 0) {
            return None;
        }
        // More than 5 % of the samples left, with the bucket holding the most of
        // `part` (the keyed ones of it, per bucket) left out, are in `part`.
        let over_5pct = |part: &[u32; KEY_BUCKETS], total: u64| {
            let worst = (0..KEY_BUCKETS).max_by_key(|&b| part[b]).expect("buckets");
            let left = samples.saturating_sub(u64::from(t.all[worst]));
            let part_left = total.saturating_sub(u64::from(part[worst]));
            part_left.saturating_mul(20) > left
        };
        Some(if over_5pct(&t.slow, t.slow_total) {
            TailClass::Over
        } else if over_5pct(&t.warm, t.warm_total) {
            TailClass::Between
        } else {
            TailClass::Under
        })
    }

    /// Forgets every sample, in the open window and the closed ones.
    pub(crate) fn clear(&mut self, shared: &Shared) {
        self.closed.clear();
        self.used = 0;
        shared.current.lock().reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(shared: &Shared, samples: u64, ms: u64) {
        for _ in 0..samples {
            shared.record(Duration::from_millis(ms));
        }
    }

    /// The measured latency in whole milliseconds (the histogram keeps two digits), and
    /// whether it rested on enough samples (or, with too few, on all windows).
    fn ms(m: Measured) -> (Option<u64>, bool) {
        let round = |d: Duration| u64::try_from((d.as_micros() + 500) / 1000).unwrap();
        match m {
            Measured::Latency(d) => (Some(round(d)), true),
            Measured::TooFew { latency, full, .. } => (latency.map(round), full),
        }
    }

    #[test]
    fn dropped_calls_are_samples_from_the_floor_on_and_saturate() {
        // What one call dropped at `age` gives, with `floor` set (or none).
        let dropped = |floor: Option<Duration>, age: Duration| {
            let shared = Shared::new(0.0);
            if let Some(floor) = floor {
                shared.set_drop_floor(floor);
            }
            shared.record_dropped(age);
            ms(Windows::new().rotate(&shared, 0.95, 1))
        };
        let floor = Some(Duration::from_millis(100));
        // No floor set (gradient mode before its first minimum RTT): never a sample.
        assert_eq!(dropped(None, Duration::MAX), (None, false));
        assert_eq!(dropped(floor, Duration::from_millis(99)), (None, false));
        assert_eq!(
            dropped(floor, Duration::from_millis(100)),
            (Some(100), true)
        );
        // Any age, however long, counts as the histogram's top, as completed calls do.
        assert_eq!(dropped(floor, Duration::MAX), (Some(59_769), true));
        // A floor past any age: never.
        assert_eq!(dropped(Some(Duration::MAX), Duration::MAX), (None, false));
    }

    #[test]
    fn a_quantile_never_reads_over_the_recorded_latencies() {
        let shared = Shared::new(0.0);
        let mut w = Windows::new();
        for us in [99_900, 100_000, 59_999, 1_000_000, 150] {
            shared.record(Duration::from_micros(us));
            let Measured::Latency(d) = w.rotate(&shared, 0.95, 1) else {
                panic!("one sample is enough");
            };
            let us = u128::from(us);
            // At most the recorded value, within the histogram's 1 %.
            assert!(
                d.as_micros() <= us && d.as_micros() * 100 >= us * 99,
                "{us} read {d:?}"
            );
        }
    }

    #[test]
    fn a_latency_past_the_histogram_reads_over_every_threshold() {
        // A stalled upstream's five-minute sample is kept as one minute: it still reads
        // over the longest threshold, never under 0.7 x it.
        let shared = Shared::new(0.0);
        let mut w = Windows::new();
        shared.record(Duration::from_secs(300));
        let Measured::Latency(d) = w.rotate(&shared, 0.95, 1) else {
            panic!("one sample is enough");
        };
        assert!(d > super::super::control::MAX_THRESHOLD, "{d:?}");
        assert_eq!(
            d,
            Duration::from_micros(59_768_832),
            "the top bucket's lowest"
        );
    }

    #[test]
    fn the_tail_is_measured_without_the_key_holding_the_most_of_it() {
        let shared = Shared::new(0.0);
        shared.set_tail(Duration::from_millis(100));
        let mut w = Windows::new();
        let ms = Duration::from_millis;
        // Unkeyed samples only: no client to tell.
        window(&shared, 20, 300);
        w.rotate(&shared, 0.95, 1);
        assert_eq!(w.tail_without_worst_key(), None);
        // Three keys in three buckets (the seed is random).
        let key = |not: &[usize]| {
            (0..u32::MAX)
                .find(|k: &u32| !not.contains(&shared.bucket(k)))
                .expect("a free bucket")
        };
        let slow = key(&[]);
        let fast = key(&[shared.bucket(&slow)]);
        let warm = key(&[shared.bucket(&slow), shared.bucket(&fast)]);
        // One key's slow samples and another's fast ones: under without the first.
        for _ in 0..10 {
            shared.record_keyed(&slow, ms(300));
            shared.record_keyed(&fast, ms(5));
        }
        assert!(ms_of(w.rotate(&shared, 0.95, 1)) > Some(100));
        assert_eq!(w.tail_without_worst_key(), Some(TailClass::Under));
        // Between 70 and 100 ms for one key: the same.
        for _ in 0..10 {
            shared.record_keyed(&warm, ms(80));
            shared.record_keyed(&fast, ms(5));
        }
        w.rotate(&shared, 0.95, 1);
        assert_eq!(w.tail_without_worst_key(), Some(TailClass::Under));
        // Slow for one key, between for the other: between without the first.
        for _ in 0..10 {
            shared.record_keyed(&slow, ms(300));
            shared.record_keyed(&warm, ms(80));
        }
        w.rotate(&shared, 0.95, 1);
        assert_eq!(w.tail_without_worst_key(), Some(TailClass::Between));
        // Slow for 30 keys, one sample each: over (some may share a bucket, never 30).
        for i in 100..130_u32 {
            shared.record_keyed(&i, ms(300));
            shared.record_keyed(&fast, ms(5));
        }
        w.rotate(&shared, 0.95, 1);
        assert_eq!(w.tail_without_worst_key(), Some(TailClass::Over));
    }

    fn ms_of(m: Measured) -> Option<u64> {
        ms(m).0
    }

    #[test]
    fn a_histogram_holds_20_kib_of_counts() {
        // What the memory figures above rest on: (19 + 1) x 128 counts of 8 bytes.
        assert_eq!(histogram().distinct_values() * 8, 20 * 1024);
    }

    #[test]
    fn measures_over_the_fewest_newest_windows_holding_enough_samples() {
        let shared = Shared::new(0.0);
        let mut w = Windows::new();
        window(&shared, 5, 20);
        assert_eq!(
            ms(w.rotate(&shared, 1.0, 5)),
            (Some(20), true),
            "one is enough"
        );
        window(&shared, 3, 10);
        // 3 + the 5 before: the older window's 20 ms are in the measurement.
        assert_eq!(ms(w.rotate(&shared, 1.0, 5)), (Some(20), true));
        window(&shared, 6, 10);
        assert_eq!(ms(w.rotate(&shared, 1.0, 5)), (Some(10), true));
        // One sample a window and 5 needed: five windows back, not two.
        w.clear(&shared);
        for _ in 0..4 {
            window(&shared, 1, 30);
            assert_eq!(ms(w.rotate(&shared, 1.0, 5)), (Some(30), false));
        }
        window(&shared, 1, 30);
        assert_eq!(ms(w.rotate(&shared, 1.0, 5)), (Some(30), true));
        for _ in 0..MAX_WINDOWS {
            window(&shared, 1, 40);
            w.rotate(&shared, 1.0, 100);
        }
        // Only the last MAX_WINDOWS windows count, and they hold fewer than the
        // minimum: their quantile is still given.
        window(&shared, 1, 30);
        let m = w.rotate(&shared, 1.0, 100);
        assert!(
            matches!(m, Measured::TooFew { samples, .. } if samples == MAX_WINDOWS as u64),
            "{m:?}"
        );
        assert_eq!(
            ms(m),
            (Some(40), true),
            "too few, over all the windows there are"
        );
        w.clear(&shared);
        assert_eq!(
            w.rotate(&shared, 1.0, 1),
            Measured::TooFew {
                samples: 0,
                latency: None,
                full: false,
            }
        );
    }
}
