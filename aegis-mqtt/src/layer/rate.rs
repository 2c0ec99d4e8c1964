use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// A per-connection limit on the packets a client sends after its CONNECT: a token
/// bucket of `burst` packets refilled at `per_second`.
///
/// Every packet counts, PINGREQ included. What happens to a client over the limit is its
/// [`OverRate`]: by default its packets are held back (the layer stops reading, and TCP
/// pushes back on the client); with [`PacketRate::disconnect`] it is refused with
/// `message_rate` (an MQTT 5 client first gets DISCONNECT 0x96).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PacketRate {
    per_second: f64,
    burst: f64,
    over: OverRate,
}

/// What the layer does with a client over its [`PacketRate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OverRate {
    /// Hold the client's next packet until the bucket has a token.
    Throttle,
    /// Refuse the connection (`message_rate`).
    Disconnect,
}

impl PacketRate {
    /// `per_second` packets a second with bursts of `burst` (each at least 1), throttled.
    pub fn new(per_second: u32, burst: u32) -> Self {
        Self {
            per_second: f64::from(per_second.max(1)),
            burst: f64::from(burst.max(1)),
            over: OverRate::Throttle,
        }
    }

    /// Refuse a client over the limit instead of slowing it down.
    #[must_use]
    pub const fn disconnect(mut self) -> Self {
        self.over = OverRate::Disconnect;
        self
    }

    /// What happens to a client over the limit.
    pub const fn over(&self) -> OverRate {
        self.over
    }
}

/// The shortest wait for a token.
const MIN_WAIT: Duration = Duration::from_millis(1);

/// One connection's bucket.
#[derive(Debug)]
pub(super) struct Bucket {
    rate: PacketRate,
    tokens: f64,
    last: Instant,
    /// Created on the first wait and reset in place after that.
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Bucket {
    pub(super) fn new(rate: PacketRate) -> Self {
        Self {
            rate,
            tokens: rate.burst,
            last: Instant::now(),
            sleep: None,
        }
    }

    /// Takes a token: `Ready(true)` if there was one, `Ready(false)` if the client is over
    /// a `Disconnect` limit, `Pending` while a throttled client waits for one.
    pub(super) fn poll_take(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        loop {
            let now = Instant::now();
            let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
            self.last = now;
            self.tokens = (self.tokens + elapsed * self.rate.per_second).min(self.rate.burst);
            if self.tokens >= 1.0 {
                self.tokens -= 1.0;
                return Poll::Ready(true);
            }
            if self.rate.over == OverRate::Disconnect {
                return Poll::Ready(false);
            }
            // At least a millisecond (tokio's timer resolution): a bucket a float
            // epsilon short of a token would otherwise wait zero, a sleep due at once,
            // and loop here without the clock moving.
            let wait =
                Duration::from_secs_f64((1.0 - self.tokens) / self.rate.per_second).max(MIN_WAIT);
            let deadline = now + wait;
            let sleep = match &mut self.sleep {
                Some(sleep) => {
                    sleep.as_mut().reset(deadline);
                    sleep
                }
                None => self
                    .sleep
                    .insert(Box::pin(tokio::time::sleep_until(deadline))),
            };
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::time::Duration;

    use super::{Bucket, PacketRate};

    /// Found by the `mqtt_io` fuzz target: a bucket refilled to a float epsilon under
    /// one token (0.1 + 0.18 * 5 = 0.9999999999999999) waited
    /// `Duration::from_secs_f64(2.2e-17)`, zero: the sleep was due at once and, on
    /// tokio's paused clock, `poll_take` looped for ever (on a real clock it spun until
    /// the clock moved). The test runs on a thread of its own, so that a spin fails it
    /// instead of hanging it.
    #[test]
    fn a_bucket_a_float_epsilon_short_of_a_token_waits_instead_of_spinning() {
        let ended = aegis_core::testing::finishes_within(Duration::from_secs(10), || async {
            let mut bucket = Bucket::new(PacketRate::new(5, 3));
            for _ in 0..3 {
                assert!(poll_fn(|cx| bucket.poll_take(cx)).await);
            }
            tokio::time::advance(Duration::from_millis(20)).await;
            assert!(poll_fn(|cx| bucket.poll_take(cx)).await);
        });
        assert!(ended.is_some(), "Bucket::poll_take spins");
    }
}
