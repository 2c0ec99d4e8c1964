//! Adaptive overload control: measure the latency of a service and lower the admitted
//! rate (or the concurrency limit) when its P95 rises.
//!
//! [`Adaptive`] (built by [`AdaptiveLayer`]) wraps any `tower::Service` and records the
//! latency of each call, from `call` to the completion of the response future, into an
//! [`HdrHistogram`](hdrhistogram) window, closed on each control interval (the
//! controller keeps the last eight closed windows). Latencies are kept to within 1 %,
//! and a measured quantile is rounded down (never read over the recorded latencies, so
//! ones just under a threshold do not cross it). They are kept up to one minute: a
//! longer one counts as one minute, which is why a rate-mode threshold is at most
//! [`MAX_THRESHOLD`] (30 s), so that a stalled call that ends (or is dropped, below)
//! after a minute or more reads over it. Rejections are not recorded: the
//! [`DefaultClassifier`] skips any error holding an [`aegis_core::error::Rejected`],
//! since a fast "no" says nothing about the backend's latency. Write your own
//! [`Classify`] for other rules.
//!
//! # Cancelled calls
//!
//! A call is seen when it ends, never while it runs:
//!
//! - a call that **completes** (with a response or an error) is classified, and its
//!   latency recorded when its classifier says so;
//! - a call whose response future is **dropped** before it completes (a timeout above
//!   the layer, a caller that went away) is recorded, with its age as its latency (a
//!   lower bound), only when that age is at least the controller's floor: in rate mode
//!   the threshold, in gradient mode twice the buffered minimum RTT
//!   (`2 × min_rtt × (1 + buffer)`, where the gradient is at its lowest; none until
//!   the first minimum RTT is measured). Past that floor the decision is the same
//!   however much longer the call would have run. A call dropped sooner says too
//!   little and is no sample; classifiers are not asked (there is no result);
//! - a call **still in flight** gives no sample until it ends or is dropped. A backend
//!   that hangs every call, with no timeout anywhere, leaves the controller without
//!   samples: it holds. Bound the calls with a timeout, best **below** the layer
//!   (between it and the backend), so that a timed-out call completes through the
//!   layer with its error (with [`SuccessOrTimeout`], recorded as a timeout); a
//!   timeout above the layer works through the drop rule above.
//!
//! A controller runs as its own tokio task, started by [`RateConfig::spawn`] or
//! [`GradientConfig::spawn`]. On each interval it closes the window, computes the
//! latency quantile over the newest windows that together hold `min_samples` samples
//! (the last one alone when it has enough, else back up to eight windows; with fewer,
//! see [Too few samples](#too-few-samples)) and drives a sink. The task ends when
//! every [`AdaptiveHandle`], layer and service is dropped, or on
//! [`AdaptiveHandle::shutdown`]. The layer itself never rejects anything: it only
//! measures. The sink does the limiting.
//!
//! # The two modes
//!
//! **Rate mode** ([`RateConfig`]) keeps P95 under a threshold by scaling an admitted
//! rate, fed to a [`RateSink`] (such as a connection rate limiter):
//!
//! - `P95 > threshold`: `rate × 0.8` (the reduction factor), but never twice in a row:
//!   the interval right after a reduction holds (hysteresis), so the reduced rate has a
//!   whole window to show its effect before the next cut;
//! - `P95 < 0.7 × threshold`: `rate × 1.1` (the recovery factor);
//! - in between: hold. The rate stays within `[min_rate, max_rate]`.
//!
//! **Gradient mode** ([`GradientConfig`]), after Envoy's adaptive concurrency filter,
//! sets a concurrency limit, fed to a [`LimitSink`]:
//! `limit = limit × gradient + sqrt(limit × gradient)` with
//! `gradient = clamp(min_rtt × (1 + buffer) / sample_rtt, 0.5, 2.0)`, clamped to
//! `[min_limit, max_limit]`. `min_rtt` is re-measured periodically with the limit pinned
//! to `min_limit`; the intervals spent measuring count as `hold` decisions.
//!
//! # Too few samples
//!
//! A controller only sees the calls its own limit lets through. Driving a global rate,
//! a window holds at most `rate × interval` samples, `min_rate × interval` at the floor;
//! in gradient mode at most `limit × interval / latency`. A minimum the floor cannot
//! supply would hold the controller at its floor for good, so:
//!
//! - a measurement reaches back up to **eight windows** for its `min_samples`. For
//!   decisions on full evidence at the floor of a global rate, keep
//!   `min_samples <= 8 × min_rate × interval` (the defaults, 20 samples a 1 s
//!   interval, need `min_rate >= 2.5`/s); in gradient mode, keep `min_rtt_samples`
//!   and `min_samples` under `8 × min_limit × interval / latency`. This is not checked
//!   at spawn: with a per-client rate (`PerClientRate`) every client's calls are
//!   samples, and the floor does not cap their total;
//! - with fewer samples even over eight windows, the samples there are may **raise**
//!   the value but never lower it: rate mode multiplies by the recovery factor when
//!   their P95 is under `0.7 × threshold`, gradient mode takes the gradient step only
//!   when it raises the limit. With no sample at all, it holds;
//! - in rate mode, a measurement that reaches back past the last reduction (the windows
//!   since hold fewer than `min_samples`) does not lower the rate again: the older
//!   windows measured the rate before the cut, and one overload would be cut twice on
//!   the same evidence. It may still raise the rate;
//! - the minimum-RTT measurement ends after eight intervals at the latest: on the
//!   samples there are (taken at `min_limit`, as they should be), or with none, on the
//!   previous minimum RTT (at start-up, with none, it goes on measuring).
//!
//! # Which mode to use
//!
//! - **Rate mode for connection admission.** New connections arrive at a rate, and the
//!   cost of a connection (handshake, TLS, authentication) is paid up front: a rate
//!   limiter in front of the accept path is the natural actuator, and a latency
//!   threshold (an SLO) is what operators can state. Give the controller the rate
//!   limiter's handle as its sink, and measure **time the backend controls**: the
//!   handshake's round trip through the upstream (for MQTT, CONNECT forwarded to
//!   CONNACK received, reported with [`AdaptiveHandle::record`]; `aegis_mqtt`'s
//!   `MqttLayer::connack_latency` does it), or the layer around the upstream connector
//!   or HTTP client, with [`SuccessOrTimeout`] as its classifier
//!   ([`AdaptiveHandle::layer_with`]): the default one records failed calls too, and a
//!   refused connect, over in microseconds, would pull the P95 down while the upstream
//!   fails.
//!
//!   Do **not** wrap the connection service, nor time anything from the client's
//!   side: a connection's call lasts as long as the client stays, and a handshake timed
//!   from the client's first byte includes how slowly the client sends. Then a few
//!   clients that stay connected, or trickle their bytes, are the slowest 5 % by
//!   themselves and push the P95 over the threshold however healthy the backend is;
//!   the controller then cuts the rate at which **everyone** is admitted, down to
//!   `min_rate`, for as long as they keep it up: a handful of idle connections becomes
//!   a denial of service for all clients.
//!
//!   Give each sample its client with [`AdaptiveHandle::record_keyed`] where there
//!   is one: in rate mode a decision then takes the P95 as it stands without the one
//!   client holding the most of the slowest samples (counted in 64 hashed buckets a
//!   window, a fixed 768 bytes). Unkeyed, one client asking over and over for what
//!   the backend is slow at (a slow URL) is the slowest 5 % by itself, and every
//!   client's rate falls to `min_rate`; keyed, only a tail that more than one client
//!   sees lowers the rate (a client alone, or all traffic as one key, never does).
//! - **Gradient mode for concurrency.** For requests in flight to a backend (calls
//!   through an upstream connector or HTTP client), the limit that matters is how many
//!   are outstanding at once. The gradient needs no threshold: it finds the queueing
//!   point itself from the ratio of the unloaded latency (`min_rtt`) to the current
//!   one. It needs steady traffic to measure `min_rtt`, and it briefly cuts the limit
//!   to `min_limit` for each re-measurement.
//!
//! # Metrics
//!
//! Every decision is counted and logged (tracing: `info` for a change, `debug` for a
//! hold). `name` is the fixed string given with `.name(..)` (default `"default"`).
//!
//! | name | kind | labels | meaning |
//! |---|---|---|---|
//! | `aegis_adaptive_rate` | gauge | `name` | the admitted rate per second (rate mode) |
//! | `aegis_adaptive_limit` | gauge | `name` | the concurrency limit (gradient mode) |
//! | `aegis_adaptive_p95_seconds` | gauge | `name` | the latency quantile of the last decision (P95 in rate mode; the configured quantile in gradient mode), over the newest windows that hold `min_samples` samples: the last one alone when it has enough, else up to eight; not set when too few samples |
//! | `aegis_adaptive_min_rtt_seconds` | gauge | `name` | the last minimum-RTT measurement (gradient mode) |
//! | `aegis_adaptive_decisions_total` | counter | `name`, `direction`: `down`, `up`, `hold` | decisions, one per interval |
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use aegis_layers::adaptive::RateConfig;
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! # tokio::time::pause();
//! // The sink would be a rate limiter's handle; here, a closure.
//! let control = RateConfig::new(Duration::from_millis(100), 10.0, 1000.0)
//!     .interval(Duration::from_secs(1))
//!     .min_samples(3)
//!     .spawn(|per_second: f64| println!("admit {per_second:.0}/s"));
//!
//! // A slow backend: 300 ms per call.
//! let svc = control.layer().layer(service_fn(|()| async {
//!     tokio::time::sleep(Duration::from_millis(300)).await;
//!     Ok::<_, std::io::Error>(())
//! }));
//! for _ in 0..3 {
//!     svc.clone().oneshot(()).await.unwrap(); // 0.9 s in all
//! }
//! tokio::time::sleep(Duration::from_millis(200)).await; // the controller decides at 1 s
//! assert_eq!(control.value(), 800.0); // P95 300 ms > 100 ms: 1000 × 0.8
//! # }
//! ```

mod classify;
mod control;
pub mod future;
mod layer;
mod service;
mod sink;
mod window;

pub use self::classify::{Classify, DefaultClassifier, Sample, SuccessOrTimeout};
pub use self::control::{
    ADAPTIVE_DECISIONS_TOTAL, ADAPTIVE_LIMIT, ADAPTIVE_MIN_RTT_SECONDS, ADAPTIVE_P95_SECONDS,
    ADAPTIVE_RATE, AdaptiveHandle, Direction, GradientConfig, MAX_THRESHOLD, RateConfig,
};
pub use self::layer::AdaptiveLayer;
pub use self::service::Adaptive;
#[cfg(feature = "rate-limit")]
pub use self::sink::{GlobalRate, PerClientRate};
pub use self::sink::{LimitSink, RateSink};
