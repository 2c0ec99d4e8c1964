//! Where the controller's decisions go.

/// Receives the admitted rate decided in [rate mode](super::RateConfig).
///
/// Implemented for closures `Fn(f64)` (and so for `Box<dyn Fn(f64) + Send + Sync>`) and
/// for `Arc<dyn Fn(f64) + Send + Sync>`. A rate limiter implements it to follow the
/// controller, for example by reconfiguring its global rate.
pub trait RateSink: Send + Sync + 'static {
    /// Sets the admitted rate, in calls (connections) per second. Called once when the
    /// controller starts and then whenever the rate changes.
    fn set_rate(&self, per_second: f64);
}

impl<F: Fn(f64) + Send + Sync + 'static> RateSink for F {
    fn set_rate(&self, per_second: f64) {
        self(per_second);
    }
}

/// Receives the concurrency limit decided in [gradient mode](super::GradientConfig).
///
/// Implemented for closures `Fn(usize)`.
pub trait LimitSink: Send + Sync + 'static {
    /// Sets the concurrency limit. Called once when the controller starts and then
    /// whenever the limit changes.
    fn set_limit(&self, limit: usize);
}

impl<F: Fn(usize) + Send + Sync + 'static> LimitSink for F {
    fn set_limit(&self, limit: usize) {
        self(limit);
    }
}

impl RateSink for std::sync::Arc<dyn Fn(f64) + Send + Sync> {
    fn set_rate(&self, per_second: f64) {
        (**self)(per_second);
    }
}

#[cfg(feature = "rate-limit")]
pub use self::rate_limit_sinks::{GlobalRate, PerClientRate};

/// Sinks that drive a [`RateLimitLayer`](crate::rate_limit::RateLimitLayer) through its
/// runtime handle. Changing the rate keeps every client's state (see the rate limiter's
/// docs); the burst stays as configured.
#[cfg(feature = "rate-limit")]
mod rate_limit_sinks {
    use std::num::NonZeroU32;

    use super::RateSink;
    use crate::rate_limit::RateLimitHandle;

    /// Sets the rate limiter's **global** rate: the controller caps the connections
    /// admitted per second from everyone together. Use this for overload protection.
    #[derive(Clone, Debug)]
    pub struct GlobalRate(pub RateLimitHandle);

    /// Sets the rate limiter's **per-client** rate: each client may connect this many
    /// times per second.
    #[derive(Clone, Debug)]
    pub struct PerClientRate(pub RateLimitHandle);

    impl RateSink for GlobalRate {
        fn set_rate(&self, per_second: f64) {
            self.0.set_global_rate(whole_rate(per_second));
        }
    }

    impl RateSink for PerClientRate {
        fn set_rate(&self, per_second: f64) {
            self.0.set_per_client_rate(whole_rate(per_second));
        }
    }

    /// A rate limiter counts whole connections per second: round, at least 1.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // clamped first
    fn whole_rate(per_second: f64) -> NonZeroU32 {
        let r = if per_second.is_finite() {
            per_second.round().clamp(1.0, f64::from(u32::MAX))
        } else {
            1.0
        };
        NonZeroU32::new(r as u32).unwrap_or(NonZeroU32::MIN)
    }

    #[cfg(test)]
    mod tests {
        use super::whole_rate;

        #[test]
        fn rates_round_to_whole_connections_and_never_reach_zero() {
            assert_eq!(whole_rate(799.6).get(), 800);
            assert_eq!(whole_rate(0.2).get(), 1);
            assert_eq!(whole_rate(-5.0).get(), 1);
            assert_eq!(whole_rate(f64::NAN).get(), 1);
            assert_eq!(whole_rate(1e12).get(), u32::MAX);
        }
    }
}
