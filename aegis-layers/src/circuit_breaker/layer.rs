use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::CircuitBreaker;
use super::classify::DefaultClassifier;
use super::state::{CircuitHandle, Config, RateTrip, Shared};

/// Wraps services in a [`CircuitBreaker`]; one layer is **one circuit**.
///
/// Every service this layer builds, and every clone of those, shares the same circuit,
/// so build one layer per backend. Cloning the layer is cheap (an `Arc`) and shares the
/// circuit too. See the [module docs](super) for an example.
#[derive(Debug, Clone)]
pub struct CircuitBreakerLayer<C = DefaultClassifier> {
    shared: Arc<Shared>,
    classifier: C,
}

impl CircuitBreakerLayer {
    /// Starts configuring a breaker named `name`.
    ///
    /// `name` is the `name` label of the breaker's metrics: give each breaker in the
    /// process its own fixed string (`"upstream"`, `"auth_backend"`), never anything
    /// derived from input, so the label stays low-cardinality.
    pub const fn builder(name: &'static str) -> Builder {
        Builder {
            name,
            consecutive: Some(5),
            rate: None,
            open_for: Duration::from_secs(30),
            permits: 1,
            success_threshold: 1,
            classifier: DefaultClassifier,
        }
    }
}

impl<C> CircuitBreakerLayer<C> {
    /// A handle to read and force this layer's circuit.
    pub fn handle(&self) -> CircuitHandle {
        CircuitHandle {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S, C: Clone> Layer<S> for CircuitBreakerLayer<C> {
    type Service = CircuitBreaker<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker::from_parts(inner, Arc::clone(&self.shared), self.classifier.clone())
    }
}

/// Configuration of a [`CircuitBreakerLayer`], from
/// [`CircuitBreakerLayer::builder`].
///
/// Defaults: trip after 5 consecutive failures, no failure-rate trip, open for 30 s,
/// 1 probe permit, 1 successful probe to close, [`DefaultClassifier`].
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `build` is called"]
pub struct Builder<C = DefaultClassifier> {
    name: &'static str,
    consecutive: Option<u32>,
    rate: Option<RateTrip>,
    open_for: Duration,
    permits: u32,
    success_threshold: u32,
    classifier: C,
}

impl<C> Builder<C> {
    /// Trips after `n` failures in a row (a success resets the count); `None` turns
    /// this trip off.
    ///
    /// # Panics
    ///
    /// If `n` is `Some(0)`.
    pub fn consecutive_failures(mut self, n: Option<u32>) -> Self {
        assert!(n != Some(0), "consecutive_failures must be at least 1");
        self.consecutive = n;
        self
    }

    /// Also trips when at least `ratio` (0.0 to 1.0) of the last `window` classified
    /// calls failed, once at least `min_calls` calls are in the window.
    ///
    /// The window is **count-based**: the outcomes of the last `window` calls, whatever
    /// their age. It restarts empty each time the circuit closes.
    ///
    /// # Panics
    ///
    /// If `ratio` is not in `(0.0, 1.0]`, `window` is 0, or `min_calls` is 0 or larger
    /// than `window`.
    pub fn failure_rate(mut self, ratio: f64, window: usize, min_calls: usize) -> Self {
        assert!(ratio > 0.0 && ratio <= 1.0, "ratio must be in (0, 1]");
        assert!(window > 0, "window must be at least 1");
        assert!(
            min_calls > 0 && min_calls <= window,
            "min_calls must be in 1..=window"
        );
        self.rate = Some(RateTrip {
            ratio,
            window,
            min_calls,
        });
        self
    }

    /// How long the circuit stays open before it lets probes through (half-open). A
    /// duration past what a `tokio::time::Instant` holds (`Duration::MAX`) means some
    /// thirty years, as `tokio::time::sleep` does.
    pub fn open_for(mut self, open_for: Duration) -> Self {
        self.open_for = open_for;
        self
    }

    /// How many probe calls may be in flight at once while half-open, across all
    /// clones. A probe that succeeds, is ignored by the classifier or is cancelled
    /// gives its permit back.
    ///
    /// # Panics
    ///
    /// If `permits` is 0.
    pub fn half_open_permits(mut self, permits: u32) -> Self {
        assert!(permits > 0, "half_open_permits must be at least 1");
        self.permits = permits;
        self
    }

    /// How many successful probes close the circuit. Any failed probe re-opens it.
    ///
    /// # Panics
    ///
    /// If `n` is 0.
    pub fn success_threshold(mut self, n: u32) -> Self {
        assert!(n > 0, "success_threshold must be at least 1");
        self.success_threshold = n;
        self
    }

    /// Uses another classifier, for example [`HttpClassifier`](super::HttpClassifier).
    pub fn classifier<C2>(self, classifier: C2) -> Builder<C2> {
        Builder {
            name: self.name,
            consecutive: self.consecutive,
            rate: self.rate,
            open_for: self.open_for,
            permits: self.permits,
            success_threshold: self.success_threshold,
            classifier,
        }
    }

    /// Builds the layer, with a fresh closed circuit (its state gauge is set to 0).
    pub fn build(self) -> CircuitBreakerLayer<C> {
        CircuitBreakerLayer {
            shared: Shared::new(Config {
                name: self.name,
                consecutive: self.consecutive,
                rate: self.rate,
                open_for: self.open_for,
                permits: self.permits,
                success_threshold: self.success_threshold,
            }),
            classifier: self.classifier,
        }
    }
}
