use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::CircuitBreaker;
use super::classify::DefaultClassifier;
use super::state::{CircuitHandle, Config, RateTrip, Shared};

/// The largest [`failure_rate`](Builder::failure_rate) window: the outcomes of its calls
/// are held in memory, one byte each.
pub const MAX_WINDOW: usize = 100_000;

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
            probe_timeout: None,
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

impl<C> CircuitBreakerLayer<C> {
    /// This circuit, for a connector whose successful calls prove little: each call's
    /// success is the first byte read from the stream it returns
    /// ([`FirstRead`](super::FirstRead)), not the call's completion.
    ///
    /// The case it is made for: a breaker around the connector of a proxy to a server
    /// that answers each client's first request (an MQTT broker's CONNACK). A stalled
    /// server (SIGSTOP, a hung process) still has its TCP handshakes completed by the
    /// kernel, so every connect succeeds. Judged by its completion, each half-open probe
    /// would give its permit back at once and let the next client through, and every
    /// client arriving while half-open would wait on the stalled server. Judged by the
    /// first read, a probe holds its permit until the server answers (a success),
    /// until [`probe_timeout`](Builder::probe_timeout) (a failure, re-opening the
    /// circuit), or until the connection ends first (nothing counted), so at most
    /// [`half_open_permits`](Builder::half_open_permits) clients wait on the server
    /// while it is tested.
    ///
    /// Wrap the proxy's connector with it, as below: the proxy polls the connector ready
    /// (and the breaker admits, taking a half-open probe) when it connects upstream for a
    /// client, after the layers above have read what they wait for (the MQTT layer, the
    /// CONNECT), so a client that connects and stays silent holds no probe.
    ///
    /// The returned layer shares this circuit. Failed calls are classified at once, as
    /// this layer's classifier says. A failure seen later, such as the protocol's own
    /// timeout for the server's answer, is reported with
    /// [`CircuitHandle::record_failure`].
    ///
    /// ```
    /// use std::time::Duration;
    /// use aegis_core::proxy::{Proxy, TcpConnect};
    /// use aegis_layers::circuit_breaker::CircuitBreakerLayer;
    /// use tower::Layer;
    ///
    /// let breaker = CircuitBreakerLayer::builder("upstream")
    ///     .open_for(Duration::from_secs(10))
    ///     .probe_timeout(Duration::from_secs(5))
    ///     .build();
    /// let circuit = breaker.handle(); // record_failure() on the protocol's timeout
    /// let connector = breaker
    ///     .judge_by_first_read()
    ///     .layer(TcpConnect::new("127.0.0.1:1883".parse().unwrap()));
    /// // Admitted per connection when the proxy connects, whatever polled the proxy ready.
    /// let proxy = Proxy::with_connector(connector);
    /// # let _ = (proxy, circuit);
    /// ```
    pub fn judge_by_first_read(self) -> FirstReadLayer<C> {
        FirstReadLayer { breaker: self }
    }
}

/// Wraps services in a [`FirstReadBreaker`](super::FirstReadBreaker): from
/// [`CircuitBreakerLayer::judge_by_first_read`], whose circuit it shares.
#[derive(Debug, Clone)]
pub struct FirstReadLayer<C = DefaultClassifier> {
    breaker: CircuitBreakerLayer<C>,
}

impl<C> FirstReadLayer<C> {
    /// A handle to read and force this layer's circuit.
    pub fn handle(&self) -> CircuitHandle {
        self.breaker.handle()
    }
}

impl<S, C: Clone> Layer<S> for FirstReadLayer<C> {
    type Service = super::FirstReadBreaker<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        super::FirstReadBreaker::new(self.breaker.layer(inner))
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
/// 1 probe permit, a probe timeout equal to the open period, 1 successful probe to
/// close, [`DefaultClassifier`].
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `build` is called"]
pub struct Builder<C = DefaultClassifier> {
    name: &'static str,
    consecutive: Option<u32>,
    rate: Option<RateTrip>,
    open_for: Duration,
    probe_timeout: Option<Duration>,
    permits: u32,
    success_threshold: u32,
    classifier: C,
}

impl<C> Builder<C> {
    /// Trips after `n` failures in a row (a success resets the count); `None` turns
    /// this trip off. A failure of a call started before the latest-started success is
    /// not counted: see [Failures in a row](super#failures-in-a-row).
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
    /// If `ratio` is not in `(0.0, 1.0]`, `window` is 0 or over [`MAX_WINDOW`] (the
    /// window's outcomes are held in memory, allocated when the breaker is built), or
    /// `min_calls` is 0 or larger than `window`.
    pub fn failure_rate(mut self, ratio: f64, window: usize, min_calls: usize) -> Self {
        assert!(ratio > 0.0 && ratio <= 1.0, "ratio must be in (0, 1]");
        assert!(
            (1..=MAX_WINDOW).contains(&window),
            "window must be in 1..={MAX_WINDOW}"
        );
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
    ///
    /// # Panics
    ///
    /// If `open_for` is zero. It is also the default
    /// [`probe_timeout`](Self::probe_timeout), and a zero probe timeout fails every
    /// probe: the circuit would never close again.
    pub fn open_for(mut self, open_for: Duration) -> Self {
        assert!(!open_for.is_zero(), "open_for must be longer than zero");
        self.open_for = open_for;
        self
    }

    /// How long a half-open probe may take: a probe (counted from its admission in
    /// `poll_ready`; around a proxy's connector, when the proxy connects) that has not
    /// ended after `timeout` is a **failed probe**, and re-opens the circuit for another
    /// [`open_for`](Self::open_for) from that moment.
    /// Its call is not cancelled; its outcome, whenever it comes, is ignored. Default:
    /// the open period, `open_for`. A duration past what a `tokio::time::Instant` holds
    /// (`Duration::MAX`) means some thirty years.
    ///
    /// A failure rather than a permit given back: the probe is the breaker's test of
    /// the backend, and one that does not answer in time is what a timeout is (the
    /// [`DefaultClassifier`] counts timeouts as failures). Handing the permit to the
    /// next caller would instead let a hung backend collect a new stuck call every
    /// `probe_timeout`, the pile-up the breaker exists to stop; re-opening lets through
    /// at most [`half_open_permits`](Self::half_open_permits) calls per open period.
    ///
    /// So a call that lasts a whole session (a byte-stream service wrapped with the
    /// default classifier) cannot close the circuit by finishing if the session outlives
    /// `probe_timeout`. Wrap the connector instead, judged by the server's first byte
    /// ([`CircuitBreakerLayer::judge_by_first_read`], as the mqtt-gateway does), or
    /// report the session's health early with
    /// [`CircuitHandle::record_success`](super::CircuitHandle::record_success) (and
    /// [`FailuresOnly`](super::FailuresOnly)): either closes the circuit while the
    /// probe's session goes on.
    ///
    /// # Panics
    ///
    /// If `timeout` is zero: every probe would have failed by the time it ended, and the
    /// circuit would never close again.
    pub fn probe_timeout(mut self, timeout: Duration) -> Self {
        assert!(!timeout.is_zero(), "probe_timeout must be longer than zero");
        self.probe_timeout = Some(timeout);
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
            probe_timeout: self.probe_timeout,
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
                probe_timeout: self.probe_timeout.unwrap_or(self.open_for),
                permits: self.permits,
                success_threshold: self.success_threshold,
            }),
            classifier: self.classifier,
        }
    }
}
