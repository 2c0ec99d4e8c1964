//! The control loops: rate mode and gradient mode.

use std::fmt;
use std::hash::Hash;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::time::Instant;

use super::AdaptiveLayer;
use super::classify::DefaultClassifier;
use super::sink::{LimitSink, RateSink};
use super::window::{Control, Measured, Shared, TailClass, Windows};
use crate::time::deadline;

/// `aegis_adaptive_rate{name}`: the admitted rate (rate mode), per second.
pub const ADAPTIVE_RATE: &str = "aegis_adaptive_rate";
/// `aegis_adaptive_limit{name}`: the concurrency limit (gradient mode).
pub const ADAPTIVE_LIMIT: &str = "aegis_adaptive_limit";
/// `aegis_adaptive_p95_seconds{name}`: the latency quantile of the last decision, over
/// the newest windows holding `min_samples` samples (up to eight).
pub const ADAPTIVE_P95_SECONDS: &str = "aegis_adaptive_p95_seconds";
/// `aegis_adaptive_min_rtt_seconds{name}`: the measured minimum RTT (gradient mode).
pub const ADAPTIVE_MIN_RTT_SECONDS: &str = "aegis_adaptive_min_rtt_seconds";
/// `aegis_adaptive_decisions_total{name, direction}`.
pub const ADAPTIVE_DECISIONS_TOTAL: &str = "aegis_adaptive_decisions_total";

/// The longest [`RateConfig`] threshold: 30 s.
///
/// Latencies are recorded up to one minute; a longer one (a call that stalls for five
/// minutes) counts as one minute, and reads back as just under it (59.77 s). A threshold
/// near or over that could never be crossed by a stalled upstream, and one over 85 s
/// (59.77 s / 0.7) would read it as healthy and raise the rate. At most half the
/// histogram's top, every threshold is crossed by a saturated sample with room to
/// spare; a P95 target over 30 s is no overload control anyway.
pub const MAX_THRESHOLD: Duration = Duration::from_secs(30);

/// The way one decision moved the rate or limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Lowered.
    Down,
    /// Raised.
    Up,
    /// Kept.
    Hold,
}

impl Direction {
    /// The stable label: `down`, `up` or `hold`.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Down => "down",
            Self::Up => "up",
            Self::Hold => "hold",
        }
    }
}

/// Rate mode: keeps the P95 latency under a threshold by scaling an admitted rate.
///
/// On every [`interval`](Self::interval), with `p95` the 95th percentile latency of the
/// window that just closed:
///
/// | condition | decision |
/// |---|---|
/// | fewer than [`min_samples`](Self::min_samples) samples, even over the last eight windows | `rate × recovery` (up) if their P95 is under `0.7 × threshold`, else hold (see [Too few samples](super#too-few-samples)) |
/// | fewer than `min_samples` samples, with fewer than eight windows so far | hold |
/// | `p95 > threshold`, and the previous decision was **not** a reduction | `rate × reduction` (down) |
/// | `p95 > threshold` right after a reduction | hold (hysteresis: the reduced rate gets one full interval to show its effect) |
/// | `p95 > threshold` measured reaching back past the last reduction (the windows since hold fewer than `min_samples`) | hold: the older windows measured the rate before the reduction |
/// | `p95 < 0.7 × threshold` | `rate × recovery` (up) |
/// | otherwise | hold |
///
/// The rate is clamped to `[min_rate, max_rate]` and starts at
/// [`initial_rate`](Self::initial_rate) (default `max_rate`).
#[derive(Debug, Clone)]
#[must_use = "a config does nothing until `spawn` is called"]
pub struct RateConfig {
    name: &'static str,
    threshold: Duration,
    min_rate: f64,
    max_rate: f64,
    initial: Option<f64>,
    interval: Duration,
    min_samples: u64,
    reduction: f64,
    recovery: f64,
}

impl RateConfig {
    /// Keeps P95 under `threshold`, with the rate between `min_rate` and `max_rate`
    /// per second. Defaults: 1 s interval, 20 samples minimum, reduction 0.8, recovery
    /// 1.1, name `"default"`.
    ///
    /// # Panics
    ///
    /// If `threshold` is zero or over [`MAX_THRESHOLD`] (30 s), or the rates are not
    /// `0 < min_rate <= max_rate` (finite).
    pub fn new(threshold: Duration, min_rate: f64, max_rate: f64) -> Self {
        assert!(!threshold.is_zero(), "threshold must be positive");
        assert!(
            threshold <= MAX_THRESHOLD,
            "threshold must be at most MAX_THRESHOLD (30 s)"
        );
        assert!(
            min_rate > 0.0 && min_rate <= max_rate && max_rate.is_finite(),
            "rates must satisfy 0 < min_rate <= max_rate"
        );
        Self {
            name: "default",
            threshold,
            min_rate,
            max_rate,
            initial: None,
            interval: Duration::from_secs(1),
            min_samples: 20,
            reduction: 0.8,
            recovery: 1.1,
        }
    }

    /// The `name` label of the metrics: a fixed string per controller (`"mqtt"`),
    /// never a value derived from input.
    pub fn name(mut self, name: &'static str) -> Self {
        self.name = name;
        self
    }

    /// The control interval: the length of a measurement window and the time between
    /// two decisions. A duration past what a `tokio::time::Instant` holds
    /// (`Duration::MAX`) means some thirty years.
    ///
    /// # Panics
    ///
    /// If `interval` is zero.
    pub fn interval(mut self, interval: Duration) -> Self {
        assert!(!interval.is_zero(), "interval must be positive");
        self.interval = interval;
        self
    }

    /// The fewest samples a decision needs. When the last window has fewer, the
    /// windows before are added, up to eight; with fewer even then, the rate may only
    /// rise (see [Too few samples](super#too-few-samples), and keep
    /// `n <= 8 × min_rate × interval` when driving a global rate).
    pub fn min_samples(mut self, n: u64) -> Self {
        self.min_samples = n.max(1);
        self
    }

    /// The factor applied when P95 is over the threshold.
    ///
    /// # Panics
    ///
    /// If `factor` is not in `(0, 1)`.
    pub fn reduction(mut self, factor: f64) -> Self {
        assert!(factor > 0.0 && factor < 1.0, "reduction must be in (0, 1)");
        self.reduction = factor;
        self
    }

    /// The factor applied when P95 is under 0.7 × the threshold.
    ///
    /// # Panics
    ///
    /// If `factor` is not greater than 1 (and finite).
    pub fn recovery(mut self, factor: f64) -> Self {
        assert!(factor > 1.0 && factor.is_finite(), "recovery must be > 1");
        self.recovery = factor;
        self
    }

    /// The starting rate (clamped to `[min_rate, max_rate]`); default `max_rate`. A
    /// rate that is not finite (NaN, an infinity) is ignored: the rate starts at
    /// `max_rate`.
    pub fn initial_rate(mut self, rate: f64) -> Self {
        // A NaN would pass `clamp` and pin the sink at its lowest rate for good.
        self.initial = rate.is_finite().then_some(rate);
        self
    }

    /// One decision of the control law (see the table above): the next rate and the
    /// direction, from the current `rate`, the measured `p95` and whether the previous
    /// decision was a reduction.
    pub fn decide(&self, rate: f64, p95: Duration, after_reduction: bool) -> (f64, Direction) {
        let (next, dir) = if p95 > self.threshold {
            if after_reduction {
                (rate, Direction::Hold)
            } else {
                (rate * self.reduction, Direction::Down)
            }
        } else if p95.as_secs_f64() < 0.7 * self.threshold.as_secs_f64() {
            (rate * self.recovery, Direction::Up)
        } else {
            (rate, Direction::Hold)
        };
        let next = next.clamp(self.min_rate, self.max_rate);
        // At a clamp, a "move" that changes nothing is a hold.
        #[allow(clippy::float_cmp, reason = "clamp returns its bound exactly")]
        let dir = if next == rate { Direction::Hold } else { dir };
        (next, dir)
    }

    /// Starts the controller on the current tokio runtime, driving `sink`; returns the
    /// handle that gives the [`AdaptiveLayer`] to measure with.
    ///
    /// The controller's task ends when every handle, layer and service is dropped, or
    /// on [`AdaptiveHandle::shutdown`].
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn spawn(self, sink: impl RateSink) -> AdaptiveHandle {
        let rate = self
            .initial
            .unwrap_or(self.max_rate)
            .clamp(self.min_rate, self.max_rate);
        let shared = Shared::new(rate);
        // A call dropped after the threshold is over it however long it would have run.
        shared.set_drop_floor(self.threshold);
        shared.set_tail(self.threshold);
        sink.set_rate(rate);
        metrics::gauge!(ADAPTIVE_RATE, "name" => self.name).set(rate);
        let interval = self.interval;
        let law = RateLaw {
            cfg: self,
            sink,
            windows: Windows::new(),
            rate,
            after_reduction: false,
        };
        spawn_loop(&shared, interval, law);
        AdaptiveHandle { shared }
    }
}

/// Gradient mode, after Envoy's adaptive concurrency filter: a concurrency limit that
/// follows the ratio of the minimum RTT to the sampled RTT.
///
/// On every [`interval`](Self::interval), with `sample` the
/// [`quantile`](Self::quantile) latency of the window that just closed:
///
/// ```text
/// gradient  = clamp(min_rtt × (1 + buffer) / sample, 0.5, 2.0)
/// limit'    = limit × gradient
/// new_limit = clamp(limit' + sqrt(limit'), min_limit, max_limit)   // sqrt: burst headroom
/// ```
///
/// `min_rtt` is measured at start and then every
/// [`min_rtt_interval`](Self::min_rtt_interval): the limit is pinned to `min_limit`
/// (so queueing does not inflate the measurement), the samples are cleared, and once
/// there are [`min_rtt_samples`](Self::min_rtt_samples) samples (over up to eight
/// windows) their quantile becomes the new `min_rtt` and the limit goes back to its
/// previous value. After eight intervals the measurement ends anyway, on the samples
/// there are or the previous `min_rtt` (see [Too few samples](super#too-few-samples)):
/// with the limit pinned, the samples may never reach the minimum.
#[derive(Debug, Clone)]
#[must_use = "a config does nothing until `spawn` is called"]
pub struct GradientConfig {
    name: &'static str,
    min_limit: usize,
    max_limit: usize,
    initial: Option<usize>,
    interval: Duration,
    quantile: f64,
    min_samples: u64,
    buffer: f64,
    min_rtt_interval: Duration,
    min_rtt_samples: u64,
}

impl GradientConfig {
    /// A limit between `min_limit` and `max_limit`. Defaults (Envoy's where it has
    /// one): 1 s interval, quantile 0.95, 20 samples minimum, buffer 0.25, minimum RTT
    /// re-measured every 60 s over at least 50 samples, initial limit `min_limit`, name
    /// `"default"`.
    ///
    /// # Panics
    ///
    /// If not `0 < min_limit <= max_limit`.
    pub fn new(min_limit: usize, max_limit: usize) -> Self {
        assert!(
            min_limit > 0 && min_limit <= max_limit,
            "limits must satisfy 0 < min_limit <= max_limit"
        );
        Self {
            name: "default",
            min_limit,
            max_limit,
            initial: None,
            interval: Duration::from_secs(1),
            quantile: 0.95,
            min_samples: 20,
            buffer: 0.25,
            min_rtt_interval: Duration::from_secs(60),
            min_rtt_samples: 50,
        }
    }

    /// The `name` label of the metrics: a fixed string per controller.
    pub fn name(mut self, name: &'static str) -> Self {
        self.name = name;
        self
    }

    /// The time between two decisions (and the length of a window). A duration past
    /// what a `tokio::time::Instant` holds (`Duration::MAX`) means some thirty years.
    ///
    /// # Panics
    ///
    /// If `interval` is zero.
    pub fn interval(mut self, interval: Duration) -> Self {
        assert!(!interval.is_zero(), "interval must be positive");
        self.interval = interval;
        self
    }

    /// The latency quantile used as the sampled RTT (and as the minimum RTT).
    ///
    /// # Panics
    ///
    /// If `q` is not in `(0, 1]`.
    pub fn quantile(mut self, q: f64) -> Self {
        assert!(q > 0.0 && q <= 1.0, "quantile must be in (0, 1]");
        self.quantile = q;
        self
    }

    /// The fewest samples a decision needs (see [`RateConfig::min_samples`]; with too
    /// few even over eight windows, the limit may only rise).
    pub fn min_samples(mut self, n: u64) -> Self {
        self.min_samples = n.max(1);
        self
    }

    /// The tolerance added to the minimum RTT before comparing (0.25 = 25 %).
    ///
    /// # Panics
    ///
    /// If `buffer` is negative or not finite.
    pub fn buffer(mut self, buffer: f64) -> Self {
        assert!(buffer >= 0.0 && buffer.is_finite(), "buffer must be >= 0");
        self.buffer = buffer;
        self
    }

    /// How often the minimum RTT is measured again, counted from the end of the last
    /// measurement. At least one gradient step (one [`interval`](Self::interval)) comes
    /// between two measurements, however short this is. A duration past what a
    /// `tokio::time::Instant` holds (`Duration::MAX`) means some thirty years.
    pub fn min_rtt_interval(mut self, every: Duration) -> Self {
        self.min_rtt_interval = every;
        self
    }

    /// How many samples a minimum-RTT measurement needs; with the limit pinned to
    /// `min_limit`, at most `min_limit × interval / latency` come a window, over up to
    /// eight windows (see [Too few samples](super#too-few-samples)).
    pub fn min_rtt_samples(mut self, n: u64) -> Self {
        self.min_rtt_samples = n.max(1);
        self
    }

    /// The starting limit (clamped); default `min_limit`.
    pub fn initial_limit(mut self, limit: usize) -> Self {
        self.initial = Some(limit);
        self
    }

    /// One gradient step (the formula above), from the current `limit`, the minimum RTT
    /// and the sampled RTT. Both RTTs count as at least one microsecond, the histogram's
    /// resolution: a sub-microsecond service measures 0, and a zero minimum RTT would
    /// make every sample look like an overload (gradient 0.5 for good).
    #[allow(clippy::cast_precision_loss)] // limits are far below 2^52
    pub fn next_limit(&self, limit: f64, min_rtt: Duration, sample: Duration) -> f64 {
        let buffered = min_rtt.max(MIN_RTT_FLOOR).as_secs_f64() * (1.0 + self.buffer);
        let sample = sample.max(MIN_RTT_FLOOR).as_secs_f64();
        let gradient = (buffered / sample).clamp(0.5, 2.0);
        let scaled = limit * gradient;
        (scaled + scaled.sqrt()).clamp(self.min_limit as f64, self.max_limit as f64)
    }

    /// Starts the controller on the current tokio runtime, driving `sink`; returns the
    /// handle that gives the [`AdaptiveLayer`] to measure with. It starts by measuring
    /// the minimum RTT, with the limit at `min_limit`.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    #[allow(clippy::cast_precision_loss)] // limits are far below 2^52
    pub fn spawn(self, sink: impl LimitSink) -> AdaptiveHandle {
        let limit = self
            .initial
            .unwrap_or(self.min_limit)
            .clamp(self.min_limit, self.max_limit) as f64;
        let shared = Shared::new(self.min_limit as f64);
        let interval = self.interval;
        let mut law = GradientLaw {
            cfg: self,
            sink,
            windows: Windows::new(),
            limit,
            min_rtt: None,
            phase: Phase::Measuring,
        };
        law.start_measuring(&shared, limit);
        spawn_loop(&shared, interval, law);
        AdaptiveHandle { shared }
    }
}

/// The shortest RTT the gradient works with: the histogram's resolution.
const MIN_RTT_FLOOR: Duration = Duration::from_micros(1);

trait Law: Send + 'static {
    fn tick(&mut self, shared: &Shared, now: Instant);
}

fn spawn_loop<L: Law>(shared: &Arc<Shared>, interval: Duration, mut law: L) {
    let weak: Weak<Shared> = Arc::downgrade(shared);
    let control = Arc::clone(&shared.control);
    // Marks the controller stopped however the task ends: the loop breaking, the task
    // dropped with its runtime (before its first poll too: made here and moved in, the
    // guard drops with the future), or a sink panicking inside `tick`.
    let stopped = Stopped(Arc::clone(&control));
    tokio::spawn(async move {
        let _stopped = stopped;
        // `deadline`: an interval past what an `Instant` holds waits some thirty years
        // rather than panicking in the task (which would leave the controller dead).
        let mut next = deadline(Instant::now(), interval);
        loop {
            if tokio::time::timeout_at(next, control.notify.notified())
                .await
                .is_ok()
            {
                break; // shutdown, or the last handle was dropped
            }
            let Some(shared) = weak.upgrade() else { break };
            let now = Instant::now();
            law.tick(&shared, now);
            // Skip missed ticks rather than bursting decisions: when the next tick is
            // already past (a stalled runtime, a tiny interval), start again from now,
            // in one step whatever the lateness.
            next = deadline(next, interval);
            if next <= now {
                next = deadline(now, interval);
            }
        }
    });
}

/// Sets `Control::stopped` when dropped.
struct Stopped(Arc<Control>);

impl Drop for Stopped {
    fn drop(&mut self) {
        self.0.stopped.store(true, Ordering::Release);
        tracing::debug!("adaptive controller stopped");
    }
}

fn decision(name: &'static str, dir: Direction) {
    metrics::counter!(ADAPTIVE_DECISIONS_TOTAL, "name" => name, "direction" => dir.label())
        .increment(1);
}

struct RateLaw<K> {
    cfg: RateConfig,
    sink: K,
    windows: Windows,
    rate: f64,
    after_reduction: bool,
}

impl<K: RateSink> Law for RateLaw<K> {
    fn tick(&mut self, shared: &Shared, _now: Instant) {
        let name = self.cfg.name;
        let (next, dir, p95) = match self.windows.rotate(shared, 0.95, self.cfg.min_samples) {
            Measured::TooFew {
                samples,
                latency,
                full,
            } => {
                // Too few samples even over the last eight windows. At a low rate the rate
                // itself caps how many samples can come, so holding could keep the
                // rate there for good: the samples there are may still raise it
                // (never lower it).
                let up = latency
                    .filter(|_| full)
                    .map(|p95| {
                        let p95 = self.without_one_client(p95);
                        self.cfg.decide(self.rate, p95, self.after_reduction)
                    })
                    .filter(|&(_, dir)| dir == Direction::Up);
                tracing::debug!(
                    controller = name,
                    samples,
                    p95 = ?latency,
                    up = up.is_some(),
                    "adaptive: too few samples, only an increase"
                );
                match up {
                    Some((next, dir)) => (next, dir, latency),
                    None => (self.rate, Direction::Hold, None),
                }
            }
            Measured::Latency(p95) => {
                metrics::gauge!(ADAPTIVE_P95_SECONDS, "name" => name).set(p95.as_secs_f64());
                // Windows that reach past the last reduction (too few samples since it
                // by themselves) measured the rate before it: on them, as right after a
                // reduction, no other, or one overload would cut twice.
                let after_reduction = self.after_reduction || self.windows.reaches_past_mark();
                let decided = self.without_one_client(p95);
                let (next, dir) = self.cfg.decide(self.rate, decided, after_reduction);
                (next, dir, Some(p95))
            }
        };
        self.after_reduction = dir == Direction::Down;
        if dir == Direction::Down {
            self.windows.mark();
        }
        decision(name, dir);
        metrics::gauge!(ADAPTIVE_RATE, "name" => name).set(next);
        if dir == Direction::Hold {
            tracing::debug!(controller = name, rate = next, ?p95, "adaptive: hold");
        } else {
            tracing::info!(
                controller = name,
                from = self.rate,
                rate = next,
                ?p95,
                direction = dir.label(),
                "adaptive: rate changed"
            );
        }
        if dir != Direction::Hold {
            self.rate = next;
            shared.set_value(next);
            self.sink.set_rate(next);
        }
    }
}

impl<K> RateLaw<K> {
    /// The P95 the law decides on: the measured `p95`, but no higher than the
    /// measurement's samples stand without the one client (key bucket) holding the
    /// most of their tail ([`Windows::tail_without_worst_key`]; only with samples
    /// recorded by [`AdaptiveHandle::record_keyed`]). One client asking over and over
    /// for what the backend is slow at made the slowest 5 % by itself, and the rate of
    /// every client was cut to the floor.
    fn without_one_client(&self, p95: Duration) -> Duration {
        match self.windows.tail_without_worst_key() {
            None | Some(TailClass::Over) => p95,
            Some(TailClass::Between) => p95.min(self.cfg.threshold),
            Some(TailClass::Under) => Duration::ZERO,
        }
    }
}

impl<K> fmt::Debug for RateLaw<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLaw")
            .field("rate", &self.rate)
            .finish_non_exhaustive()
    }
}

enum Phase {
    /// The limit is pinned to `min_limit` while the minimum RTT is measured.
    Measuring,
    /// The gradient steps; the minimum RTT is measured again at `remeasure_at`, once
    /// at least one step was taken (`stepped`).
    Running {
        remeasure_at: Instant,
        stepped: bool,
    },
}

struct GradientLaw<K> {
    cfg: GradientConfig,
    sink: K,
    windows: Windows,
    /// The limit outside measurements (restored after each).
    limit: f64,
    min_rtt: Option<Duration>,
    phase: Phase,
}

impl<K: LimitSink> GradientLaw<K> {
    #[allow(clippy::cast_precision_loss)]
    fn start_measuring(&mut self, shared: &Shared, limit: f64) {
        self.limit = limit;
        self.phase = Phase::Measuring;
        self.windows.clear(shared);
        self.publish(shared, self.cfg.min_limit as f64);
        tracing::debug!(
            controller = self.cfg.name,
            "adaptive: measuring the minimum RTT"
        );
    }

    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // clamped, positive
    fn publish(&self, shared: &Shared, limit: f64) {
        metrics::gauge!(ADAPTIVE_LIMIT, "name" => self.cfg.name).set(limit);
        shared.set_value(limit);
        self.sink.set_limit(limit.round() as usize);
    }
}

impl<K: LimitSink> Law for GradientLaw<K> {
    fn tick(&mut self, shared: &Shared, now: Instant) {
        match self.phase {
            Phase::Measuring => self.measure(shared, now),
            Phase::Running {
                remeasure_at,
                stepped,
            } => self.run(shared, now, remeasure_at, stepped),
        }
    }
}

impl<K: LimitSink> GradientLaw<K> {
    /// One interval of a minimum-RTT measurement.
    fn measure(&mut self, shared: &Shared, now: Instant) {
        let name = self.cfg.name;
        let rotated = self
            .windows
            .rotate(shared, self.cfg.quantile, self.cfg.min_rtt_samples);
        let measured = match rotated {
            Measured::Latency(min_rtt) => Some(min_rtt),
            // The deadline: with the limit pinned to `min_limit`, the samples may never
            // reach `min_rtt_samples` (at most min_limit x interval / latency a window).
            // Take the ones there are (measured at `min_limit`, as they should be), or
            // else keep the previous minimum RTT.
            Measured::TooFew {
                samples,
                latency,
                full: true,
            } => {
                let fallback = latency.or(self.min_rtt);
                if fallback.is_some() {
                    tracing::info!(
                        controller = name,
                        samples,
                        wanted = self.cfg.min_rtt_samples,
                        from = if latency.is_some() {
                            "samples"
                        } else {
                            "previous"
                        },
                        "adaptive: too few samples for the minimum RTT in time"
                    );
                }
                fallback
            }
            Measured::TooFew { .. } => None,
        };
        if let Some(min_rtt) = measured {
            let min_rtt = min_rtt.max(MIN_RTT_FLOOR);
            self.min_rtt = Some(min_rtt);
            // From twice the buffered minimum RTT on, the gradient is at its floor (0.5)
            // whatever the sample: a call dropped that old is a sample (its age).
            let floor = min_rtt.as_secs_f64() * 2.0 * (1.0 + self.cfg.buffer);
            shared.set_drop_floor(Duration::try_from_secs_f64(floor).unwrap_or(Duration::MAX));
            metrics::gauge!(ADAPTIVE_MIN_RTT_SECONDS, "name" => name).set(min_rtt.as_secs_f64());
            tracing::info!(
                controller = name,
                ?min_rtt,
                "adaptive: minimum RTT measured"
            );
            self.phase = Phase::Running {
                remeasure_at: deadline(now, self.cfg.min_rtt_interval),
                stepped: false,
            };
            self.windows.clear(shared);
            self.publish(shared, self.limit);
        }
        decision(name, Direction::Hold);
    }

    /// Moves the limit by the gradient for `sample`, and publishes it if it moved; never
    /// down unless `may_lower` (with too few samples, which at a low limit the limit
    /// itself caps, the ones there are may still raise it, never lower it).
    fn step(
        &mut self,
        shared: &Shared,
        min_rtt: Duration,
        sample: Duration,
        may_lower: bool,
    ) -> Direction {
        let next = self.cfg.next_limit(self.limit, min_rtt, sample);
        let dir = if next > self.limit {
            Direction::Up
        } else if next < self.limit && may_lower {
            Direction::Down
        } else {
            Direction::Hold
        };
        tracing::debug!(
            controller = self.cfg.name,
            from = self.limit,
            limit = next,
            ?sample,
            ?min_rtt,
            ?dir,
            "adaptive: gradient step"
        );
        if dir != Direction::Hold {
            self.limit = next;
            self.publish(shared, next);
        }
        dir
    }

    /// One interval of the gradient.
    fn run(&mut self, shared: &Shared, now: Instant, remeasure_at: Instant, stepped: bool) {
        let name = self.cfg.name;
        // Not before one step: with `min_rtt_interval <= interval`, every interval would
        // start a measurement and the gradient would never move the limit.
        if stepped && now >= remeasure_at {
            decision(name, Direction::Hold);
            self.start_measuring(shared, self.limit);
            return;
        }
        let min_rtt = self.min_rtt.unwrap_or_default();
        let (dir, step) = match self
            .windows
            .rotate(shared, self.cfg.quantile, self.cfg.min_samples)
        {
            // Too few even over the last eight windows: at a low limit the limit
            // itself caps the samples, so the ones there are may still raise it
            // (never lower it).
            Measured::TooFew {
                latency: Some(sample),
                samples,
                full: true,
            } => {
                tracing::debug!(controller = name, samples, "adaptive: too few samples");
                (self.step(shared, min_rtt, sample, false), true)
            }
            // No step: a tick that held for want of samples is not the step the next
            // measurement waits for.
            Measured::TooFew { .. } => (Direction::Hold, false),
            Measured::Latency(sample) => {
                metrics::gauge!(ADAPTIVE_P95_SECONDS, "name" => name).set(sample.as_secs_f64());
                (self.step(shared, min_rtt, sample, true), true)
            }
        };
        self.phase = Phase::Running {
            remeasure_at,
            stepped: stepped || step,
        };
        decision(name, dir);
    }
}

/// A handle to a running controller: the layer to measure with, the current value,
/// shutdown. Cheap to clone.
#[derive(Clone)]
pub struct AdaptiveHandle {
    pub(crate) shared: Arc<Shared>,
}

impl fmt::Debug for AdaptiveHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdaptiveHandle")
            .field("value", &self.value())
            .field("running", &self.is_running())
            .finish()
    }
}

impl AdaptiveHandle {
    /// The layer that measures latency for this controller, with the
    /// [`DefaultClassifier`]. Every service it builds feeds the same histogram.
    pub fn layer(&self) -> AdaptiveLayer {
        AdaptiveLayer::new(Arc::clone(&self.shared), DefaultClassifier)
    }

    /// The layer with another classifier.
    pub fn layer_with<C>(&self, classifier: C) -> AdaptiveLayer<C> {
        AdaptiveLayer::new(Arc::clone(&self.shared), classifier)
    }

    /// Records one latency measured outside a wrapped service, into the same window the
    /// layer feeds: for a byte-stream stack, where one call lasts a whole connection,
    /// measure the handshake instead (for MQTT, the CONNECT to CONNACK round trip through
    /// the upstream: `aegis_mqtt::layer::MqttLayer::connack_latency`).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// # use std::time::Duration;
    /// # use aegis_layers::adaptive::RateConfig;
    /// let handle = RateConfig::new(Duration::from_millis(100), 10.0, 1000.0).spawn(|_rate: f64| {});
    /// handle.record(Duration::from_millis(12));
    /// # }
    /// ```
    pub fn record(&self, latency: Duration) {
        self.shared.record(latency);
    }

    /// [`record`](Self::record)s one latency of the client `key` (such as its
    /// [`ClientKey`](aegis_core::ClientKey)). In rate mode, the samples of one client
    /// cannot lower the rate by themselves: a decision takes the P95 as it stands
    /// without the client holding the most of the slowest samples, so that one client
    /// asking over and over for what the backend is slow at (its slowest 5 % by
    /// itself) does not cut every client's rate. Latencies over the threshold that many
    /// clients see still do. Keys are counted in 64 buckets by a hash with a random
    /// seed (a fixed 768 bytes a window), so clients sharing the worst one's bucket are
    /// left out with it. The gradient mode measures them as any other sample.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// # use std::time::Duration;
    /// # use aegis_layers::adaptive::RateConfig;
    /// let handle = RateConfig::new(Duration::from_millis(100), 10.0, 1000.0).spawn(|_rate: f64| {});
    /// let client: std::net::IpAddr = "192.0.2.7".parse().unwrap();
    /// handle.record_keyed(&client, Duration::from_millis(12));
    /// # }
    /// ```
    pub fn record_keyed<K: Hash + ?Sized>(&self, key: &K, latency: Duration) {
        self.shared.record_keyed(key, latency);
    }

    /// The current admitted rate (rate mode) or concurrency limit (gradient mode; the
    /// pinned `min_limit` while the minimum RTT is measured).
    pub fn value(&self) -> f64 {
        self.shared.value()
    }

    /// Stops the controller: it makes no more decisions and the sink keeps the last
    /// value. Layers and services keep working (their samples are no longer read).
    pub fn shutdown(&self) {
        self.shared.control.notify.notify_one();
    }

    /// Whether the controller's task is still running: `false` once it has ended, on
    /// [`shutdown`](Self::shutdown), with its runtime shut down, or after its sink
    /// panicked.
    pub fn is_running(&self) -> bool {
        !self.shared.control.stopped.load(Ordering::Acquire)
    }
}
