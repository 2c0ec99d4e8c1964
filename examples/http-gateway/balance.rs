//! Smooth weighted round-robin over the backends, skipping the unavailable ones, with
//! warm-up after recovery.
//!
//! A backend is **available** when the health check last found it healthy and its
//! circuit breaker would let a call through: not open, and not half-open with its probe
//! permits all in flight (a request sent there would be refused at once, a `503`
//! another backend could have spared). Picks follow nginx's smooth weighted round-robin: each
//! available backend adds its effective weight to a running score, the highest score
//! wins and pays back the sum of the weights. Over any window the picks follow the
//! weights, and they are interleaved (weights 2:1 give `a b a a b a`, not `a a b`).
//!
//! **Warm-up.** A backend that comes back (the health check finds it healthy again, or
//! its breaker leaves the open state) does not get its full share at once: a cold cache
//! or a JIT would be flooded. Its effective weight ramps linearly from
//! [`WARMUP_START_PERCENT`] of its weight to the full weight over the configured
//! warm-up time ([`ramp`]). While its breaker is half-open it stays at the start weight
//! (0 while its probes are in flight): the breaker lets only a few probes through
//! anyway. Backends are at full weight when the gateway starts.

use std::net::SocketAddr;
use std::time::Duration;

use aegis_layers::circuit_breaker::{CircuitHandle, CircuitState};
use parking_lot::Mutex;
use tokio::time::Instant;

/// Weights are counted in hundredths, so that a ramp has 100 steps per unit of weight.
pub const SCALE: u64 = 100;
/// A recovered backend starts at 10 % of its weight.
pub const WARMUP_START_PERCENT: u64 = 10;

/// One backend as the balancer sees it.
#[derive(Debug)]
pub struct Member {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its weight relative to the others (at least 1).
    pub weight: u32,
    /// Its circuit breaker, read on every pick.
    pub breaker: CircuitHandle,
}

#[derive(Debug)]
struct Slot {
    /// The last verdict of the health check (healthy until the first check says not).
    healthy: bool,
    /// The last pick found it unavailable; the next pick that finds it available starts
    /// its warm-up.
    down: bool,
    /// When it last came back; `None` once warm (or never down).
    up_since: Option<Instant>,
    /// The smooth round-robin score.
    current: i64,
}

/// The backends and the balancer's state; shared by the proxy and the health check.
#[derive(Debug)]
pub struct Pool {
    members: Vec<Member>,
    slots: Mutex<Vec<Slot>>,
    warmup: Duration,
}

impl Pool {
    /// A pool of `members`, all healthy and warm; `warmup` is the ramp time of a
    /// backend that comes back (zero turns warm-up off).
    pub fn new(members: Vec<Member>, warmup: Duration) -> Self {
        let slots = members
            .iter()
            .map(|_| Slot {
                healthy: true,
                down: false,
                up_since: None,
                current: 0,
            })
            .collect();
        Self {
            members,
            slots: Mutex::new(slots),
            warmup,
        }
    }

    /// The backends, in the order given.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// Records a health check verdict. A backend found healthy after being unhealthy
    /// starts its warm-up `now`. Returns whether the verdict changed.
    pub fn set_healthy(&self, i: usize, healthy: bool, now: Instant) -> bool {
        let mut slots = self.slots.lock();
        let slot = &mut slots[i];
        let changed = slot.healthy != healthy;
        if changed && healthy {
            slot.up_since = Some(now);
            slot.down = false;
        }
        slot.healthy = healthy;
        changed
    }

    /// The last health verdict of backend `i`.
    pub fn is_healthy(&self, i: usize) -> bool {
        self.slots.lock()[i].healthy
    }

    /// Backend `i`'s effective weight at `now`, in hundredths (0 when unavailable).
    pub fn weight_now(&self, i: usize, now: Instant) -> u64 {
        let slots = self.slots.lock();
        self.effective(i, &slots[i], now)
    }

    /// Picks the next backend, or `None` when none is available.
    pub fn pick(&self, now: Instant) -> Option<usize> {
        let mut slots = self.slots.lock();
        let mut total: i64 = 0;
        let mut best: Option<(usize, i64)> = None;
        for i in 0..self.members.len() {
            let weight = self.effective(i, &slots[i], now);
            let slot = &mut slots[i];
            if weight == 0 {
                slot.down = true;
                slot.current = 0; // no debt or credit carried over an outage
                continue;
            }
            if slot.down {
                slot.down = false;
                slot.up_since = Some(now);
            }
            let weight = i64::try_from(weight).unwrap_or(i64::MAX);
            slot.current = slot.current.saturating_add(weight);
            total = total.saturating_add(weight);
            if best.is_none_or(|(_, score)| slot.current > score) {
                best = Some((i, slot.current));
            }
        }
        let (best, _) = best?;
        slots[best].current = slots[best].current.saturating_sub(total);
        Some(best)
    }

    fn effective(&self, i: usize, slot: &Slot, now: Instant) -> u64 {
        let member = &self.members[i];
        let full = u64::from(member.weight.max(1)) * SCALE;
        if !slot.healthy {
            return 0;
        }
        match member.breaker.state() {
            CircuitState::Open => 0,
            // Probes all in flight: a call would be refused (`CircuitOpen`).
            CircuitState::HalfOpen if !member.breaker.would_admit() => 0,
            CircuitState::HalfOpen => start_weight(full),
            CircuitState::Closed => match slot.up_since {
                // A backend seen down by the last pick restarts its ramp on this one.
                _ if slot.down => start_weight(full),
                Some(since) => ramp(full, now.saturating_duration_since(since), self.warmup),
                None => full,
            },
        }
    }
}

/// The weight a recovering backend starts at: [`WARMUP_START_PERCENT`] of `full`, at
/// least 1.
pub fn start_weight(full: u64) -> u64 {
    (full * WARMUP_START_PERCENT / 100).max(1)
}

/// The effective weight `elapsed` into a warm-up of length `warmup`: a straight line
/// from [`start_weight`] to `full`, then `full`.
pub fn ramp(full: u64, elapsed: Duration, warmup: Duration) -> u64 {
    if elapsed >= warmup {
        return full;
    }
    let start = start_weight(full);
    let span = u128::from(full - start);
    let step = span * elapsed.as_nanos() / warmup.as_nanos();
    start + u64::try_from(step).unwrap_or(full - start)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aegis_layers::circuit_breaker::CircuitBreakerLayer;

    fn pool(weights: &[u32], warmup: Duration) -> Pool {
        let members = weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| Member {
                addr: SocketAddr::from(([127, 0, 0, 1], 9000 + u16::try_from(i).unwrap())),
                weight,
                breaker: CircuitBreakerLayer::builder("test").build().handle(),
            })
            .collect();
        Pool::new(members, warmup)
    }

    fn counts(pool: &Pool, n: usize, now: Instant) -> Vec<usize> {
        let mut c = vec![0; pool.members().len()];
        for _ in 0..n {
            c[pool.pick(now).expect("a backend")] += 1;
        }
        c
    }

    #[test]
    fn ramp_goes_from_ten_percent_to_full_in_a_straight_line() {
        let w = Duration::from_secs(10);
        assert_eq!(ramp(1000, Duration::ZERO, w), 100);
        assert_eq!(ramp(1000, Duration::from_secs(5), w), 550);
        assert_eq!(ramp(1000, Duration::from_millis(9_999), w), 999);
        assert_eq!(ramp(1000, w, w), 1000);
        assert_eq!(ramp(1000, Duration::from_secs(60), w), 1000);
        assert_eq!(ramp(100, Duration::ZERO, Duration::ZERO), 100, "no warm-up");
        assert_eq!(start_weight(5), 1, "never zero");
    }

    #[test]
    fn equal_weights_alternate_and_weights_are_followed_smoothly() {
        let now = Instant::now();
        let p = pool(&[1, 1], Duration::ZERO);
        let seq: Vec<_> = (0..4).map(|_| p.pick(now).unwrap()).collect();
        assert_eq!(seq, [0, 1, 0, 1]);
        let p = pool(&[2, 1], Duration::ZERO);
        let seq: Vec<_> = (0..6).map(|_| p.pick(now).unwrap()).collect();
        assert_eq!(seq, [0, 1, 0, 0, 1, 0], "smooth: interleaved, 2:1");
    }

    #[test]
    fn unhealthy_and_open_backends_are_skipped_and_none_left_is_none() {
        let now = Instant::now();
        let p = pool(&[1, 1, 1], Duration::ZERO);
        p.set_healthy(0, false, now);
        p.members()[1].breaker.force_open();
        assert_eq!(counts(&p, 9, now), [0, 0, 9]);
        p.set_healthy(2, false, now);
        assert_eq!(p.pick(now), None);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_recovered_backend_ramps_up_over_the_warmup() {
        let warmup = Duration::from_secs(10);
        let p = pool(&[1, 1], warmup);
        let t0 = Instant::now();
        assert!(p.set_healthy(0, false, t0));
        assert_eq!(counts(&p, 10, t0), [0, 10]);

        tokio::time::advance(Duration::from_secs(3)).await;
        let t1 = Instant::now();
        assert!(p.set_healthy(0, true, t1));
        assert_eq!(p.weight_now(0, t1), 10, "starts at 10 % of 100");
        assert_eq!(
            counts(&p, 110, t1),
            [10, 100],
            "10:100 right after recovery"
        );

        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(p.weight_now(0, Instant::now()), 55, "half-way: 10 + 90 / 2");

        tokio::time::advance(Duration::from_secs(5)).await;
        let t2 = Instant::now();
        assert_eq!(p.weight_now(0, t2), 100, "warm");
        let c = counts(&p, 100, t2);
        assert!(c[0].abs_diff(c[1]) <= 2, "even again: {c:?}");
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_half_open_backend_is_passed_over_while_its_probe_is_in_flight() {
        use tower::ServiceExt;

        let breaker = CircuitBreakerLayer::builder("test")
            .consecutive_failures(Some(1))
            .open_for(Duration::from_secs(1))
            .build();
        let member = |port, breaker| Member {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            weight: 1,
            breaker,
        };
        let other = CircuitBreakerLayer::builder("test").build().handle();
        let p = Pool::new(
            vec![member(9000, breaker.handle()), member(9001, other)],
            Duration::ZERO,
        );
        breaker.handle().record_failure();
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(breaker.handle().state(), CircuitState::HalfOpen);
        assert_eq!(counts(&p, 110, Instant::now()), [10, 100], "a probe may go");

        let mut probe = tower::Layer::layer(
            &breaker,
            tower::service_fn(|()| async { Ok::<_, std::io::Error>(()) }),
        );
        probe.ready().await.unwrap(); // takes the only permit
        assert_eq!(p.weight_now(0, Instant::now()), 0);
        assert_eq!(counts(&p, 100, Instant::now()), [0, 100], "none would pass");
        drop(probe); // the permit comes back
        assert_eq!(counts(&p, 110, Instant::now()), [10, 100]);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_breaker_that_closes_again_starts_a_warmup_too() {
        let p = pool(&[1, 1], Duration::from_secs(10));
        p.members()[0].breaker.force_open();
        assert_eq!(counts(&p, 4, Instant::now()), [0, 4]);
        p.members()[0].breaker.force_closed();
        let now = Instant::now();
        assert_eq!(counts(&p, 110, now), [10, 100]);
        assert_eq!(p.weight_now(0, now), 10);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(p.weight_now(0, Instant::now()), 100);
    }
}
