//! The gateway assembled from its [`Config`]: the connection stack, the backends and
//! their breakers, the balancer, the health checks and the latency controller.
//!
//! ```text
//! serve (max connections)
//!  └─ ProxyProtocolLayer      only with trusted proxies: the client address from their PROXY header
//!      └─ RateLimitLayer      per client address: open connections capped, adaptive rate
//!          └─ SlowlorisLayer  first byte, total (until the first request's headers), idle within requests (reads and writes)
//!              └─ HttpServer  hyper HTTP/1 + the per-request stack (see `server`)
//!                  └─ Proxy   pool pick -> CircuitBreaker -> Upstream (hyper-util Client) -> backend
//! ```
//!
//! The latency controller's samples come from each [`Upstream`]: the backend's time of
//! each call, without the time spent waiting on the client's body.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use aegis_core::serve;
use aegis_layers::adaptive::{AdaptiveHandle, PerClientRate, RateConfig};
use aegis_layers::circuit_breaker::{CircuitBreakerLayer, CircuitHandle};
use aegis_layers::proxy_protocol::ProxyProtocolLayer;
use aegis_layers::rate_limit::{Quota, RateLimitHandle, RateLimitLayer};
use aegis_layers::slowloris::SlowlorisLayer;
use ipnet::IpNet;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tower::{Layer, ServiceBuilder};

use crate::balance::{Member, Pool};
use crate::health::Thresholds;
use crate::proxy::{GatewayClassifier, Proxy, Upstream};
use crate::sanitize::Limits;
use crate::server::{HttpServer, Stack};

/// A backend address and its weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendSpec {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its share relative to the others.
    pub weight: u32,
}

impl std::str::FromStr for BackendSpec {
    type Err = String;

    /// `ADDR` (weight 1) or `ADDR@WEIGHT`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, weight) = s.split_once('@').unwrap_or((s, "1"));
        let addr = addr
            .parse()
            .map_err(|e| format!("backend address {addr:?}: {e}"))?;
        let weight = weight
            .parse::<u32>()
            .ok()
            .filter(|w| *w > 0)
            .ok_or_else(|| format!("backend weight {weight:?}: a whole number from 1"))?;
        Ok(Self { addr, weight })
    }
}

/// How much longer hyper's header read timeout is by default than the slowloris
/// handshake deadline (10 s and 11 s): 1 s.
///
/// Both bound the first request's head from the accept. When they were equal, a slow
/// first head was cut by whichever fired first, and with a jitter draw of zero (the
/// slowloris deadlines come up to 50 ms early, by a per-connection draw) they fired
/// together: hyper's future, polled first inside the slowloris layer's, ended the
/// connection on its own timeout, an unexpected error instead of the slowloris
/// layer's `total` rejection. With the margin the slowloris clock fires first unless
/// the runtime stalls a whole second. Later requests, and so the keep-alive idle limit,
/// have hyper's 11 s.
pub const HEADER_TIMEOUT_MARGIN: Duration = Duration::from_secs(1);

/// [`Config::backend_idle_timeout`]'s default: below the 5 s keep-alive timeout of
/// Node.js, uvicorn and Apache httpd.
pub const DEFAULT_BACKEND_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// `--backend-idle-timeout`: a duration with its unit (`4s`, `500ms`, `1m`; `0s`: no
/// connection kept idle), as `humantime` reads it.
pub fn parse_idle_timeout(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?}: {e}: a duration such as 4s or 500ms (0s: no reuse)"))
}

/// Everything the gateway can be told. [`Config::new`] has the defaults.
#[derive(Debug, Clone)]
pub struct Config {
    /// The backends.
    pub backends: Vec<BackendSpec>,
    /// Networks whose PROXY protocol header is believed; empty: none (and no PROXY
    /// layer at all).
    pub trusted_proxies: Vec<IpNet>,
    /// Connections admitted at once.
    pub max_connections: usize,
    /// Connections one client address may have open at once (the rate limiter's
    /// concurrency tier; over it, a new connection is closed at once). Without it, one
    /// address could hold every one of `max_connections` with slow keep-alive requests.
    pub max_connections_per_client: NonZeroU32,
    /// New connections per client address and second: the ceiling of the adaptive
    /// controller.
    pub per_client_rate: NonZeroU32,
    /// The per-client burst.
    pub per_client_burst: NonZeroU32,
    /// The floor of the adaptive controller.
    pub min_per_client_rate: NonZeroU32,
    /// P95 latency above which the controller lowers the per-client rate.
    pub latency_target: Duration,
    /// How often the controller decides.
    pub control_interval: Duration,
    /// The fewest latency samples a decision needs (fewer: hold).
    pub control_min_samples: u64,
    /// The most bytes of request body.
    pub max_body: usize,
    /// Header count and size limits (`431`).
    pub limits: Limits,
    /// hyper's read buffer cap (request line and headers must fit).
    pub max_buf_size: usize,
    /// hyper: the time to read each request's headers, from when hyper starts waiting
    /// for them: the accept for the first request, the end of the previous response for
    /// each later one. So it is also the **keep-alive idle limit**: hyper closes a
    /// connection that sends no next request within it (hyper starts this clock
    /// whenever it waits for a request head), and the connection counts as ended well
    /// (`aegis_connections_total{outcome="ok"}`; a first request head cut so is refused,
    /// `header_timeout`). `Duration::MAX`: some thirty years.
    pub header_read_timeout: Duration,
    /// Slowloris: the time to the first byte.
    pub first_byte_timeout: Duration,
    /// Slowloris: the time to the end of the first request's headers. hyper's
    /// `header_read_timeout` bounds the same wait from the accept, so a longer deadline
    /// never fires; the default is [`HEADER_TIMEOUT_MARGIN`] shorter than hyper's, so
    /// that the slowloris clock cuts a slow first request, and counts the cut
    /// (`layer="slowloris", reason="total"`).
    pub handshake_timeout: Duration,
    /// Slowloris: the longest a connection may go without progress either way after
    /// the first request's headers, while a request is in progress: no byte read from
    /// the client (gaps in a request body) and none of the response written to it (a
    /// client that stopped reading its download, whose socket buffers are full). A
    /// write counts as a read does (`SlowlorisLayer::writes_are_activity`), so a long
    /// response to a client that reads it and sends nothing meanwhile (a download, a
    /// stream of server-sent events) is never cut for it; a backend that stalls
    /// mid-body is cut at `backend_timeout` (see `backend_body`). Between requests
    /// hyper's `header_read_timeout` closes an idle keep-alive connection first unless
    /// it is the longer of the two.
    pub idle_timeout: Duration,
    /// Slowloris: the first-byte and total deadlines of each connection come up to this
    /// early, by a per-connection draw, so that connections opened together are not
    /// all cut (nor come back) at once (`SlowlorisLayer::jitter`).
    pub slowloris_jitter: Duration,
    /// `Strict-Transport-Security` max-age; only set it behind TLS.
    pub hsts: Option<Duration>,
    /// Breaker: consecutive failures that open it.
    pub breaker_failures: u32,
    /// Breaker: how long it stays open before probing. Longer than zero. A probe (the
    /// one call let through while half-open) has this or `backend_timeout`, whichever
    /// is longer, before the breaker counts it failed and re-opens the circuit: never
    /// less than any other call, or a request slow but in time would fail as the probe.
    pub breaker_open_for: Duration,
    /// Health checks: every so often (at least `health::MIN_INTERVAL`; `Duration::MAX`
    /// for one round at start-up only).
    pub health_interval: Duration,
    /// Health checks: the time a probe has.
    pub health_timeout: Duration,
    /// Health checks: failed and passed probes in a row that change a verdict. A probe the
    /// gateway could not make for want of its own descriptors, memory or local ports is
    /// neither, and breaks no streak (see `health`).
    pub health_thresholds: Thresholds,
    /// The ramp of a backend that comes back.
    pub warmup: Duration,
    /// Connecting to a backend.
    pub connect_timeout: Duration,
    /// A backend's response headers, and the client's request body: the body must be in
    /// within this of the call to the backend, even when the backend answers before it
    /// has read the body (see `client_body`), and the headers within this of the
    /// backend's own time (the call's time less the time spent waiting on the body). Also the longest a write to a backend
    /// connection may wait without progress (a backend that stops reading the body):
    /// the connection is closed then (see `write_timeout`).
    pub backend_timeout: Duration,
    /// How long a backend connection may wait idle in the pool for its next request
    /// (`--backend-idle-timeout`, default 4 s); zero: none is kept, every request
    /// connects anew. Keep it below the backends' own keep-alive timeout: a backend
    /// closes an idle connection at its timeout, and a request the pool sends on it just
    /// then crosses the close and fails (`502`, the keep-alive race; such a failure is
    /// not counted against the breaker, see `proxy::is_stale`, but the client's request
    /// is lost). Node.js, uvicorn and Apache httpd close after 5 s, hence 4 s; gunicorn
    /// after 2 s, for which set it lower.
    pub backend_idle_timeout: Duration,
}

impl Config {
    /// The defaults, for `backends`.
    pub fn new(backends: Vec<BackendSpec>) -> Self {
        Self {
            backends,
            trusted_proxies: Vec::new(),
            max_connections: 10_000,
            max_connections_per_client: NonZeroU32::new(64).expect("non-zero"),
            per_client_rate: NonZeroU32::new(20).expect("non-zero"),
            per_client_burst: NonZeroU32::new(40).expect("non-zero"),
            min_per_client_rate: NonZeroU32::MIN,
            latency_target: Duration::from_millis(500),
            control_interval: Duration::from_secs(1),
            control_min_samples: 20,
            max_body: 1024 * 1024,
            limits: Limits {
                max_headers: 64,
                max_header_bytes: 8 * 1024,
            },
            max_buf_size: 16 * 1024,
            header_read_timeout: Duration::from_secs(10) + HEADER_TIMEOUT_MARGIN,
            first_byte_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(75),
            slowloris_jitter: Duration::from_millis(50),
            hsts: None,
            breaker_failures: 5,
            breaker_open_for: Duration::from_secs(10),
            health_interval: Duration::from_secs(5),
            health_timeout: Duration::from_secs(2),
            health_thresholds: Thresholds { fall: 2, rise: 1 },
            warmup: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(2),
            backend_timeout: Duration::from_secs(30),
            backend_idle_timeout: DEFAULT_BACKEND_IDLE_TIMEOUT,
        }
    }
}

/// A running gateway. Dropping it stops the accept loop, the health checks and the
/// controller.
#[derive(Debug)]
pub struct Gateway {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The balancer (health verdicts, weights).
    pub pool: Arc<Pool>,
    /// The backends' breakers, in the order given.
    pub breakers: Vec<CircuitHandle>,
    /// The rate limiter's handle.
    pub rate: RateLimitHandle,
    /// The latency controller.
    pub control: AdaptiveHandle,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        self.control.shutdown();
    }
}

impl Gateway {
    /// Builds the gateway from `config` and serves on `listener` (on a spawned task).
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime, with no backend, or with a zero `breaker_open_for`.
    pub fn start(config: &Config, listener: TcpListener) -> std::io::Result<Self> {
        assert!(!config.backends.is_empty(), "at least one backend");
        let addr = listener.local_addr()?;

        let rate_limit = RateLimitLayer::builder()
            .max_concurrent_per_client(config.max_connections_per_client.get())
            .per_client(
                Quota::per_second(config.per_client_rate).allow_burst(config.per_client_burst),
            )
            .build();
        let rate = rate_limit.handle();
        let max = f64::from(config.per_client_rate.get());
        let control = RateConfig::new(
            config.latency_target,
            f64::from(config.min_per_client_rate.get()).min(max),
            max,
        )
        .name("http_gateway")
        .interval(config.control_interval)
        .min_samples(config.control_min_samples)
        .spawn(PerClientRate(rate.clone()));

        let mut members = Vec::new();
        let mut backends = Vec::new();
        for (i, spec) in config.backends.iter().enumerate() {
            // The metric label: from the configuration, bounded by its length.
            let name: &'static str = Box::leak(format!("backend{i}").into_boxed_str());
            // A probe has a normal call's time, the backend timeout, or `open_for` if
            // longer (the breaker's default): with `open_for` under the backend timeout,
            // a request slower than `open_for` but in time (which succeeds while the
            // circuit is closed) failed as the probe and re-opened the circuit, and while
            // it was in flight the balancer passed over the backend and every other
            // client got `503`: one client asking for a slow page kept a recovered
            // backend's circuit open. `Upstream` ends a probe stalled on the client's
            // body before it.
            let probe_timeout = config.breaker_open_for.max(config.backend_timeout);
            let breaker = CircuitBreakerLayer::builder(name)
                .consecutive_failures(Some(config.breaker_failures.max(1)))
                .open_for(config.breaker_open_for)
                .probe_timeout(probe_timeout)
                .classifier(GatewayClassifier)
                .build();
            members.push(Member {
                addr: spec.addr,
                weight: spec.weight,
                breaker: breaker.handle(),
            });
            let upstream = Upstream::new(
                config.connect_timeout,
                config.backend_timeout,
                config.backend_idle_timeout,
            )
            .watch_probes(breaker.handle(), probe_timeout)
            .record_latency(control.clone());
            backends.push(breaker.layer(upstream));
        }
        let breakers = members.iter().map(|m| m.breaker.clone()).collect();
        let pool = Arc::new(Pool::new(members, config.warmup));
        let health = crate::health::spawn(
            &pool,
            config.health_interval,
            config.health_timeout,
            config.health_thresholds,
            crate::health::http_probe(config.connect_timeout),
        );

        let stack = Stack {
            max_body: config.max_body,
            limits: config.limits,
            hsts: config.hsts,
            proxy: Proxy::new(Arc::clone(&pool), backends, config.backend_timeout),
        };
        let http = HttpServer::new(stack, config.header_read_timeout, config.max_buf_size);
        let slowloris = SlowlorisLayer::new()
            .first_byte_timeout(config.first_byte_timeout)
            .handshake_timeout(config.handshake_timeout)
            .idle_timeout_after_handshake(config.idle_timeout)
            // A response the client takes is progress: without it every response
            // longer than the idle timeout (a download, server-sent events) was cut.
            .writes_are_activity(true)
            .jitter(config.slowloris_jitter);
        let conn_stack = ServiceBuilder::new()
            .layer(rate_limit)
            .layer(slowloris)
            .service(http);
        let max_connections = config.max_connections;
        let server = if config.trusted_proxies.is_empty() {
            tokio::spawn(async move {
                serve(listener, conn_stack)
                    .max_connections(max_connections)
                    .await;
            })
        } else {
            let proxied =
                ProxyProtocolLayer::new(config.trusted_proxies.iter().copied()).layer(conn_stack);
            tokio::spawn(async move {
                serve(listener, proxied)
                    .max_connections(max_connections)
                    .await;
            })
        };
        Ok(Self {
            addr,
            pool,
            breakers,
            rate,
            control,
            tasks: vec![server, health],
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{BackendSpec, Config, DEFAULT_BACKEND_IDLE_TIMEOUT, parse_idle_timeout};

    #[test]
    fn the_backend_idle_timeout_is_4s_by_default_and_parses_with_its_unit() {
        assert_eq!(DEFAULT_BACKEND_IDLE_TIMEOUT, Duration::from_secs(4));
        assert_eq!(
            Config::new(Vec::new()).backend_idle_timeout,
            DEFAULT_BACKEND_IDLE_TIMEOUT
        );
        assert_eq!(parse_idle_timeout("4s"), Ok(Duration::from_secs(4)));
        assert_eq!(parse_idle_timeout("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_idle_timeout("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_idle_timeout("0s"), Ok(Duration::ZERO));
        for bad in ["4", "", "4x", "-1s"] {
            assert!(parse_idle_timeout(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn backends_parse_as_addr_or_addr_at_weight() {
        let b: BackendSpec = "127.0.0.1:9001".parse().unwrap();
        assert_eq!((b.addr.port(), b.weight), (9001, 1));
        let b: BackendSpec = "[::1]:9002@3".parse().unwrap();
        assert_eq!((b.addr.port(), b.weight), (9002, 3));
        assert!(
            "127.0.0.1:9001@0".parse::<BackendSpec>().is_err(),
            "weight 0"
        );
        assert!(
            "localhost:9001".parse::<BackendSpec>().is_err(),
            "an address, not a name"
        );
        assert!("127.0.0.1:9001@x".parse::<BackendSpec>().is_err());
    }
}
