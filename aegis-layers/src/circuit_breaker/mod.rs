//! A circuit breaker for any `tower::Service`: stop piling onto a failing backend and
//! fail fast while it recovers.
//!
//! [`CircuitBreakerLayer`] wraps any service (a byte-stream service, an upstream
//! connector `Service<()>`, an HTTP client): it is generic over the request and asks
//! nothing of it. The breaker has three states:
//!
//! - **closed**: calls go to the inner service and a [classifier](Classify) marks each
//!   completed call a success, a failure, or neither. The circuit *trips* (opens) after
//!   [`consecutive_failures`](Builder::consecutive_failures) failures in a row (default
//!   5), or, if set, when the [`failure_rate`](Builder::failure_rate) over a
//!   **count-based** sliding window of the last calls reaches a ratio, once a minimum
//!   number of calls is in the window.
//! - **open**: every call fails at once with an [`error::CircuitOpen`] rejection
//!   (`aegis_rejections_total{layer="circuit_breaker", reason="open"}`); the inner
//!   service is neither polled nor called. After [`open_for`](Builder::open_for) the
//!   circuit goes half-open.
//! - **half-open**: at most [`half_open_permits`](Builder::half_open_permits) probe
//!   calls are in flight at once, across all clones (the permit is reserved under the
//!   circuit's lock in `poll_ready`); further calls fail fast. A probe that succeeds or
//!   is cancelled returns its permit.
//!   [`success_threshold`](Builder::success_threshold) successful probes close the
//!   circuit; any failed probe re-opens it for another `open_for`. A probe still in
//!   flight [`probe_timeout`](Builder::probe_timeout) after its admission (default:
//!   `open_for`) has failed: the circuit re-opens, and the probe's call goes on
//!   uncounted. A call that lasts a whole session is therefore a poor probe; see
//!   `probe_timeout` for what to do instead.
//!
//! A call whose response future is dropped before it completes (the client went away,
//! a timeout above the breaker fired) is a **cancellation**: it is never counted as a
//! failure. Outcomes of calls admitted under an earlier state (a slow call started
//! while closed that ends after the circuit opened) are ignored.
//!
//! # Failures in a row
//!
//! "In a row" is in the order the calls **started**: each call is numbered when `call`
//! passes it to the inner service, the circuit keeps the number of the latest-started
//! call that succeeded, and a failure of a call started before it does not count towards
//! `consecutive_failures` (it still enters the failure-rate window: a rate is a share of
//! calls, not a run). A call started later that succeeded has shown the backend up
//! since the failed one started. Counted by their end, five requests for one URL the
//! backend is slow on, sent together by one client, timed out together with no success
//! ending between them, and opened the circuit for every client, whose requests,
//! started later, were being answered; one client could repeat it every `open_for`.
//! Five failures with no later-started success still trip, and a success of a call
//! started before them resets the run when it ends, as ever. Outcomes recorded against a
//! [`Mark`] are ordered by the mark's taking
//! ([`CircuitHandle::record_success_since`]); those recorded without one
//! ([`CircuitHandle::record_failure`]) always count. Half-open probes are judged each on
//! its own: any failed probe re-opens the circuit.
//!
//! The circuit is checked *before* the inner service's readiness, as tower's `LoadShed`
//! does: when open, `poll_ready` returns ready without touching the inner service, so
//! `call` can fail fast even when the backend would make callers wait.
//!
//! Admission happens in `poll_ready`, so a service polled ready long before it is called
//! holds its admission (in half-open, one of the few probe permits) in between. Poll it
//! right before the call: `ServiceExt::oneshot` on a clone, for example. aegis-core's
//! [`Proxy`](aegis_core::proxy::Proxy) does so with its connector: the proxy itself is
//! always ready, and each connection polls its own clone of the connector ready when it
//! connects upstream. So a breaker around the connector
//! ([`Proxy::with_connector`](aegis_core::proxy::Proxy::with_connector)) admits a client
//! when the proxy connects for it, not when its connection was accepted, even when the
//! whole stack is polled ready at the accept and a protocol layer calls the proxy only
//! once the client has sent its first request (the MQTT layer, after the CONNECT): a
//! client that connects and says nothing takes no probe. A breaker between such a
//! protocol layer and the proxy would be admitted at the accept; wrap the connector
//! instead. A rejection holds nothing and is decided again by the next `poll_ready`, so
//! a service polled ready while the circuit was open is not refused after it recovers.
//! An admission the circuit has moved past by the time of the `call` (polled ready while
//! closed, called after the circuit opened) is decided again in `call`, so the call
//! fails fast rather than reach the inner service through an open circuit.
//!
//! **Combinators that hold readiness without calling** (tower's `Steer`, which polls
//! every route ready before each call and calls one; a ready cache) are a poor fit in
//! front of a breaker: half-open, such a route takes a probe permit in `poll_ready` and
//! holds it, uncalled, until [`probe_timeout`](Builder::probe_timeout), which counts
//! as a failed probe and re-opens the circuit; a route whose requests come less often
//! than that stays open for ever though its backend recovered. Give each request its
//! own clone polled right before its call (`oneshot`), as aegis-core's proxy and the
//! gateways do.
//!
//! # Classifiers
//!
//! | classifier | success | failure | ignored |
//! |---|---|---|---|
//! | [`DefaultClassifier`] | every `Ok` | errors, including tokio's `Elapsed` and upstream [`ProxyError`](aegis_core::proxy::ProxyError)s (connect timeout/refused/error, upstream IO) | client-side `ProxyError::ClientIo` and `ProxyError::LocalResources` (this host out of descriptors or memory); an `aegis_core` [`Rejected`](aegis_core::error::Rejected) from a layer below or an IO wrapper (found even inside an `io::Error`); a [`hyper::Error`] that [`is_user`](hyper::Error::is_user) (the caller's own request failed, such as a client's upload aborted half way under hyper-util's client) |
//! | [`HttpClassifier`] | `http::Response` with a status below 500 | `5xx` responses but `501` and `505`, and errors as above | as above, and `501` and `505` responses (they answer the request's method or version, RFC 9110 §15.6.2, §15.6.6) |
//!
//! Write your own by implementing [`Classify`].
//!
//! # Judged by the first read
//!
//! A connect to a stalled server (SIGSTOP, a hung process) succeeds: its kernel
//! completes the handshake. For a connector whose calls return a stream,
//! [`CircuitBreakerLayer::judge_by_first_read`] judges each successful call by the first
//! read of its stream ([`FirstRead`]) instead: the server's first byte is the success,
//! an end or error before it counts for nothing, a dropped stream is a cancellation, and
//! a half-open probe holds its permit until one of these or its `probe_timeout` (a
//! failure). So at most `half_open_permits` clients wait on a stalled server while it is
//! tested. A failure the protocol sees later (its own timeout for the server's answer)
//! is reported with [`CircuitHandle::record_failure`].
//!
//! An outcome known only well after its call (a response body that fails or ends
//! minutes after its head) is best recorded against a [`Mark`] taken at the call
//! ([`CircuitHandle::mark`], [`CircuitHandle::record_success_since`],
//! [`CircuitHandle::record_failure_since`]): like a call's own outcome, it is ignored if
//! the circuit changed state in between.
//!
//! # One circuit per backend
//!
//! One [`CircuitBreakerLayer`] is one circuit: every service it builds and every clone
//! shares it, so build one layer per backend. Each breaker has a `name`, the `name`
//! label of its metrics: a **fixed string** such as `"upstream"`, never a value derived
//! from input.
//!
//! A [`CircuitHandle`] (from [`CircuitBreakerLayer::handle`]) reads the state, tells
//! whether a call made now [would be let through](CircuitHandle::would_admit) (a
//! balancer's question: half-open with every probe permit in flight, it would not), and
//! can [force it open](CircuitHandle::force_open), [force it
//! closed](CircuitHandle::force_closed) and [release](CircuitHandle::release) the
//! forced state (the circuit is then closed with fresh counts).
//!
//! # Metrics
//!
//! | name | kind | labels | meaning |
//! |---|---|---|---|
//! | `aegis_circuit_state` | gauge | `name` | 0 closed, 1 half-open, 2 open (forced states included) |
//! | `aegis_circuit_transitions_total` | counter | `name`, `to`: `closed`, `half_open`, `open` | state changes |
//! | `aegis_rejections_total` | counter | `layer="circuit_breaker"`, `reason="open"` | calls failed fast |
//!
//! Every state change is also a tracing event (`warn` when opening, `info` otherwise).
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use aegis_layers::circuit_breaker::{CircuitBreakerLayer, CircuitState, error::CircuitOpen};
//! use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let breaker = CircuitBreakerLayer::builder("upstream")
//!     .consecutive_failures(Some(3))
//!     .open_for(Duration::from_secs(10))
//!     .build();
//! let handle = breaker.handle();
//!
//! // An upstream connector that always fails.
//! let mut connect = ServiceBuilder::new()
//!     .layer(breaker)
//!     .service(service_fn(|(): ()| async {
//!         Err::<(), std::io::Error>(std::io::ErrorKind::ConnectionRefused.into())
//!     }));
//!
//! for _ in 0..3 {
//!     let err = connect.ready().await.unwrap().call(()).await.unwrap_err();
//!     assert!(err.is::<std::io::Error>());
//! }
//! assert_eq!(handle.state(), CircuitState::Open);
//! // Now calls fail fast, without reaching the connector.
//! let err = connect.ready().await.unwrap().call(()).await.unwrap_err();
//! assert!(aegis_core::error::find::<CircuitOpen>(&*err).is_some());
//! # }
//! ```

mod classify;
pub mod error;
pub mod future;
mod io;
mod layer;
mod service;
mod state;

pub use self::classify::{
    Classify, DefaultClassifier, FailuresOnly, HttpClassifier, Outcome, classify_error,
};
pub use self::io::FirstRead;
pub use self::layer::{Builder, CircuitBreakerLayer, FirstReadLayer, MAX_WINDOW};
pub use self::service::{CircuitBreaker, FirstReadBreaker};
pub use self::state::{
    CIRCUIT_STATE, CIRCUIT_TRANSITIONS_TOTAL, CircuitHandle, CircuitState, Mark,
};
