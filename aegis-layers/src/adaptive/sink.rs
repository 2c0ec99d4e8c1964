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
