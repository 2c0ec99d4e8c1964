//! The deadline arithmetic, kept apart from polling so that it can be tested alone.

use std::num::NonZeroU32;
use std::time::Duration;

use tokio::time::Instant;

use super::error::Clock;

/// How fast a client must send once its grace period is over (`mod_reqtimeout`'s
/// `MinRate`). See the [module docs](super#the-minimum-rate-formula) for the formula.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct MinRate {
    bytes_per_sec: NonZeroU32,
    grace: Limit,
}

impl MinRate {
    /// At least `bytes_per_sec` bytes per second on average, after a `grace` period.
    ///
    /// `mod_reqtimeout`'s `header=20-40,MinRate=500` is
    /// `MinRate::new(500, Duration::from_secs(20))` with a total deadline of 40 s.
    ///
    /// # Panics
    ///
    /// If `bytes_per_sec` is 0.
    pub const fn new(bytes_per_sec: u32, grace: Duration) -> Self {
        let Some(bytes_per_sec) = NonZeroU32::new(bytes_per_sec) else {
            panic!("MinRate::new: bytes_per_sec must be at least 1");
        };
        Self {
            bytes_per_sec,
            grace: Limit::new(grace),
        }
    }

    /// The required rate in bytes per second.
    pub const fn bytes_per_sec(&self) -> u32 {
        self.bytes_per_sec.get()
    }

    /// The time allowed before the rate rule starts to bite.
    pub const fn grace(&self) -> Duration {
        Duration::from_nanos(self.grace.0)
    }

    /// How long after the start a client that has sent `received` bytes may still take:
    /// `grace + received / bytes_per_sec` seconds, to the nanosecond.
    pub(crate) fn allowance(&self, received: u64) -> Duration {
        let rate = u64::from(self.bytes_per_sec.get());
        // u64 arithmetic up to 18 GB received; u128 (a slow division) beyond.
        let nanos = received.checked_mul(1_000_000_000).map_or_else(
            || {
                let n = u128::from(received) * 1_000_000_000 / u128::from(rate);
                u64::try_from(n).unwrap_or(u64::MAX)
            },
            |n| n / rate,
        );
        self.grace().saturating_add(Duration::from_nanos(nanos))
    }
}

/// A duration in nanoseconds, or off: 8 bytes where an `Option<Duration>` takes 16,
/// which keeps the copy of the clocks in every response future at 48 bytes.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) struct Limit(u64);

impl Limit {
    pub(crate) const OFF: Self = Self(u64::MAX);

    /// `d` to the nanosecond; 584 years or more (`u64::MAX` ns) count as off.
    pub(crate) const fn new(d: Duration) -> Self {
        let nanos = d.as_nanos();
        if nanos >= u64::MAX as u128 {
            Self::OFF
        } else {
            #[allow(clippy::cast_possible_truncation)] // checked just above
            Self(nanos as u64)
        }
    }

    pub(crate) const fn get(self) -> Option<Duration> {
        if self.0 == u64::MAX {
            None
        } else {
            Some(Duration::from_nanos(self.0))
        }
    }
}

impl Default for Limit {
    fn default() -> Self {
        Self::OFF
    }
}

/// The configured clocks; `Limit::OFF` and `None` mean off. Copied into every response future.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Clocks {
    pub(crate) first_byte: Limit,
    pub(crate) idle: Limit,
    pub(crate) total: Limit,
    pub(crate) min_rate: Option<MinRate>,
    pub(crate) idle_after_handshake: Limit,
}

/// What a connection has done so far, as the response future last saw it.
#[derive(Copy, Clone, Debug)]
pub(crate) struct Progress {
    /// When the layer was called.
    pub(crate) start: Instant,
    /// When the future last saw new bytes (or the handshake end, or with
    /// `writes_are_activity` a write after it); `start` before that.
    pub(crate) last_read: Instant,
    /// Bytes read from the client so far.
    pub(crate) received: u64,
    /// Whether the handshake is complete.
    pub(crate) handshake_done: bool,
    /// How early this connection's handshake deadlines come, in nanoseconds (its draw
    /// of the layer's jitter; 0 without one).
    pub(crate) early_ns: u32,
}

impl Clocks {
    /// The most a connection's handshake deadlines may come early, in nanoseconds: the
    /// layer's `jitter`, capped at half the shortest handshake clock set (so that no
    /// deadline comes before half its time) and at `u32::MAX` ns (4.29 s).
    pub(crate) fn jitter_cap(&self, jitter: Duration) -> u32 {
        let shortest = [
            self.first_byte.get(),
            self.idle.get(),
            self.total.get(),
            self.min_rate.map(|r| r.grace()),
        ]
        .into_iter()
        .flatten()
        .min();
        let cap = shortest.map_or(Duration::ZERO, |d| d / 2).min(jitter);
        u32::try_from(cap.as_nanos()).unwrap_or(u32::MAX)
    }

    /// Whether the idle clock that applies in this phase needs the time of each read.
    pub(crate) const fn tracks_reads(&self, handshake_done: bool) -> bool {
        if handshake_done {
            self.idle_after_handshake.0 != Limit::OFF.0
        } else {
            self.idle.0 != Limit::OFF.0
        }
    }

    /// The earliest deadline that applies now, and the clock it belongs to. On a tie the
    /// more specific clock wins: first byte, then idle, then minimum rate, then total.
    pub(crate) fn next(&self, p: &Progress) -> Option<(Instant, Clock)> {
        fn at(from: Instant, d: Option<Duration>, clock: Clock) -> Option<(Instant, Clock)> {
            d.and_then(|d| from.checked_add(d)).map(|t| (t, clock))
        }
        fn earliest(
            a: Option<(Instant, Clock)>,
            b: Option<(Instant, Clock)>,
        ) -> Option<(Instant, Clock)> {
            match (a, b) {
                (Some(a), Some(b)) => Some(if b.0 < a.0 { b } else { a }),
                (a, b) => a.or(b),
            }
        }

        let (first_byte, idle, total) = (self.first_byte.get(), self.idle.get(), self.total.get());

        if p.handshake_done {
            return at(p.last_read, self.idle_after_handshake.get(), Clock::Idle);
        }
        let next = if p.received == 0 && first_byte.is_some() {
            // Before the first byte, the first-byte clock stands in for the idle clock.
            at(p.start, first_byte, Clock::FirstByte)
        } else {
            at(p.last_read, idle, Clock::Idle)
        };
        let total = at(p.start, total, Clock::Total);
        let rate = self
            .min_rate
            .and_then(|r| at(p.start, Some(r.allowance(p.received)), Clock::MinRate))
            // At or past the cap, the total deadline is the one that cuts.
            .filter(|r| total.is_none_or(|t| r.0 < t.0));
        let early = Duration::from_nanos(u64::from(p.early_ns));
        // The jitter takes the same time off every deadline, so they keep their order
        // and only move later with progress, as the timer expects.
        earliest(earliest(next, rate), total)
            .map(|(t, clock)| (t.checked_sub(early).unwrap_or(t).max(p.start), clock))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn progress(received: u64, last_read_secs: u32, done: bool) -> Progress {
        let start = Instant::now();
        Progress {
            start,
            last_read: start + last_read_secs * S,
            received,
            handshake_done: done,
            early_ns: 0,
        }
    }

    fn next_rel(c: &Clocks, p: &Progress) -> Option<(Duration, Clock)> {
        c.next(p)
            .map(|(t, k)| (t.saturating_duration_since(p.start), k))
    }

    #[test]
    fn min_rate_allowance_is_grace_plus_bytes_over_rate() {
        let r = MinRate::new(500, 20 * S);
        assert_eq!(r.allowance(0), 20 * S);
        assert_eq!(r.allowance(500), 21 * S);
        assert_eq!(r.allowance(250), Duration::from_millis(20_500));
        assert_eq!(r.allowance(1), Duration::from_millis(20_002));
        // No overflow at the extremes.
        assert!(r.allowance(u64::MAX) >= Duration::from_nanos(u64::MAX));
        // Both sides of the switch to 128-bit arithmetic agree.
        let edge = u64::MAX / 1_000_000_000;
        let r = MinRate::new(1_000, Duration::ZERO);
        assert_eq!(r.allowance(edge), Duration::from_millis(edge));
        assert_eq!(r.allowance(edge + 1), Duration::from_millis(edge + 1));
    }

    #[test]
    #[should_panic(expected = "bytes_per_sec must be at least 1")]
    fn min_rate_of_zero_panics() {
        let _ = MinRate::new(0, S);
    }

    #[test]
    fn first_byte_then_idle_then_total() {
        let c = Clocks {
            first_byte: Limit::new(5 * S),
            idle: Limit::new(3 * S),
            total: Limit::new(10 * S),
            ..Clocks::default()
        };
        assert_eq!(
            next_rel(&c, &progress(0, 0, false)),
            Some((5 * S, Clock::FirstByte))
        );
        // After the first byte the idle clock runs from the last read.
        assert_eq!(
            next_rel(&c, &progress(1, 1, false)),
            Some((4 * S, Clock::Idle))
        );
        // Reads keep idle away, never the total.
        assert_eq!(
            next_rel(&c, &progress(9, 8, false)),
            Some((10 * S, Clock::Total))
        );
    }

    #[test]
    fn idle_covers_the_first_byte_when_that_clock_is_off() {
        let c = Clocks {
            idle: Limit::new(3 * S),
            ..Clocks::default()
        };
        assert_eq!(
            next_rel(&c, &progress(0, 0, false)),
            Some((3 * S, Clock::Idle))
        );
    }

    #[test]
    fn min_rate_below_the_cap_then_total_at_the_cap() {
        let c = Clocks {
            total: Limit::new(40 * S),
            min_rate: Some(MinRate::new(500, 20 * S)),
            ..Clocks::default()
        };
        assert_eq!(
            next_rel(&c, &progress(1000, 0, false)),
            Some((22 * S, Clock::MinRate))
        );
        assert_eq!(
            next_rel(&c, &progress(20_000, 0, false)),
            Some((40 * S, Clock::Total))
        );
        // Exactly at the cap (20 s + 10,000 B / 500 B/s), the total clock cuts.
        assert_eq!(
            next_rel(&c, &progress(10_000, 0, false)),
            Some((40 * S, Clock::Total))
        );
        // Without a cap the rate deadline keeps growing.
        let uncapped = Clocks {
            total: Limit::OFF,
            ..c
        };
        assert_eq!(
            next_rel(&uncapped, &progress(100_000, 0, false)),
            Some((220 * S, Clock::MinRate))
        );
    }

    #[test]
    fn after_the_handshake_only_the_idle_clock_runs_and_it_is_off_by_default() {
        let mut c = Clocks {
            first_byte: Limit::new(S),
            idle: Limit::new(S),
            total: Limit::new(S),
            min_rate: Some(MinRate::new(1, S)),
            idle_after_handshake: Limit::OFF,
        };
        assert_eq!(next_rel(&c, &progress(5, 0, true)), None);
        c.idle_after_handshake = Limit::new(60 * S);
        assert_eq!(
            next_rel(&c, &progress(5, 2, true)),
            Some((62 * S, Clock::Idle))
        );
        assert!(!Clocks::default().tracks_reads(true));
        assert!(c.tracks_reads(true) && c.tracks_reads(false));
    }

    #[test]
    fn the_jitter_is_capped_at_half_the_shortest_handshake_clock() {
        let ms = Duration::from_millis;
        let c = Clocks {
            first_byte: Limit::new(2 * S),
            total: Limit::new(10 * S),
            ..Clocks::default()
        };
        assert_eq!(c.jitter_cap(ms(100)), 100_000_000);
        assert_eq!(c.jitter_cap(60 * S), 1_000_000_000);
        // The minimum rate's grace counts; the idle clock after the handshake does not.
        let c = Clocks {
            min_rate: Some(MinRate::new(10, S)),
            idle_after_handshake: Limit::new(ms(10)),
            ..c
        };
        assert_eq!(c.jitter_cap(60 * S), 500_000_000);
        // No handshake clock, nothing to spread; long clocks stop at u32::MAX ns.
        let only_after = Clocks {
            idle_after_handshake: Limit::new(60 * S),
            ..Clocks::default()
        };
        assert_eq!(only_after.jitter_cap(S), 0);
        let long = Clocks {
            total: Limit::new(100 * S),
            ..Clocks::default()
        };
        assert_eq!(long.jitter_cap(10 * S), u32::MAX);
    }

    #[test]
    fn an_early_draw_moves_every_handshake_deadline_but_never_before_the_start() {
        let c = Clocks {
            first_byte: Limit::new(5 * S),
            idle: Limit::new(3 * S),
            total: Limit::new(10 * S),
            idle_after_handshake: Limit::new(60 * S),
            ..Clocks::default()
        };
        let early = |mut p: Progress, ns: u32| {
            p.early_ns = ns;
            p
        };
        let half = 500_000_000;
        assert_eq!(
            next_rel(&c, &early(progress(0, 0, false), half)),
            Some((Duration::from_millis(4_500), Clock::FirstByte))
        );
        assert_eq!(
            next_rel(&c, &early(progress(9, 8, false), half)),
            Some((Duration::from_millis(9_500), Clock::Total))
        );
        // After the handshake, no jitter.
        assert_eq!(
            next_rel(&c, &early(progress(5, 2, true), half)),
            Some((62 * S, Clock::Idle))
        );
        // More than the clock (the layer caps it; this checks the floor).
        let short = Clocks {
            first_byte: Limit::new(S / 10),
            ..Clocks::default()
        };
        assert_eq!(
            next_rel(&short, &early(progress(0, 0, false), half)),
            Some((Duration::ZERO, Clock::FirstByte))
        );
    }

    #[test]
    fn no_clock_means_no_deadline_and_huge_ones_do_not_overflow() {
        assert_eq!(Clocks::default().next(&progress(0, 0, false)), None);
        let c = Clocks {
            total: Limit::new(Duration::MAX),
            ..Clocks::default()
        };
        assert_eq!(c.next(&progress(0, 0, false)), None);
        // Just under the limit of the representation, and past what an Instant holds.
        let c = Clocks {
            total: Limit::new(Duration::from_nanos(u64::MAX - 1)),
            ..Clocks::default()
        };
        assert_eq!(c.total.get(), Some(Duration::from_nanos(u64::MAX - 1)));
        assert!(
            c.next(&progress(0, 0, false))
                .is_none_or(|n| n.1 == Clock::Total)
        );
    }
}
