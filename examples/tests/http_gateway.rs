//! The `http-gateway` example in-process: its modules are compiled into this test (the
//! examples package has no library), the gateway serves on a loopback port, and real
//! hyper backends started here count requests, record what they received, and can be
//! switched to fail with `503` or stopped and started again on the same port.
//!
//! The modules' own unit tests (balancer and warm-up math, health-check intervals under
//! paused time, header rules) run as part of this test binary too.
//!
//! One test runs the built binary, for `--metrics`: `cargo test -p examples` builds it
//! first, and `cargo test -p examples --test http_gateway` needs
//! `cargo build -p examples --example http-gateway` before (`common::example_bin`).
//!
//! Every wait on a socket or a background task is a poll with a deadline ([`WAIT`]).

#[allow(dead_code)]
#[path = "../http-gateway/backend_body.rs"]
mod backend_body;

#[allow(dead_code)]
#[path = "../http-gateway/balance.rs"]
mod balance;
#[allow(dead_code)]
#[path = "../http-gateway/client_body.rs"]
mod client_body;
#[allow(dead_code)]
#[path = "../http-gateway/gateway.rs"]
mod gateway;
#[allow(dead_code)]
#[path = "../http-gateway/headers.rs"]
mod headers;
#[allow(dead_code)]
#[path = "../http-gateway/health.rs"]
mod health;
#[allow(dead_code)]
#[path = "../shared/metrics_endpoint.rs"]
mod metrics_endpoint;
#[allow(dead_code)]
#[path = "../http-gateway/metrics_http.rs"]
mod metrics_http;
#[allow(dead_code)]
#[path = "../http-gateway/proxy.rs"]
mod proxy;
#[allow(dead_code)]
#[path = "../http-gateway/refusal.rs"]
mod refusal;
#[allow(dead_code)]
#[path = "../http-gateway/sanitize.rs"]
mod sanitize;
#[allow(dead_code)]
#[path = "../http-gateway/server.rs"]
mod server;
#[allow(dead_code)]
#[path = "../http-gateway/write_timeout.rs"]
mod write_timeout;
// `example_bin` and `free_port`, for the gateway run as a child process.
#[allow(dead_code)]
mod common;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use aegis_core::BoxError;
use aegis_core::metrics::testing::gauge;
use aegis_layers::adaptive::ADAPTIVE_P95_SECONDS;
use aegis_layers::circuit_breaker::CircuitState;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::HeaderMap;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use metrics_util::debugging::Snapshotter;
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{Instant, sleep, timeout};

use crate::gateway::{BackendSpec, Config, Gateway};

/// The bound on every single wait for an event.
const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------------

/// What a test backend shares with the test.
#[derive(Debug, Default)]
struct Seen {
    /// Requests served, `/healthz` excluded.
    hits: AtomicUsize,
    /// `/healthz` requests served.
    health_checks: AtomicUsize,
    /// Answer `/healthz` with `Connection: close`: each health check connects anew.
    close_health_checks: AtomicBool,
    /// Answer `503` to every request but `/healthz`.
    fail: AtomicBool,
    /// The headers of the last request, `/healthz` excluded.
    last_headers: Mutex<Option<HeaderMap>>,
    /// Milliseconds to wait before answering a request (not `/healthz`).
    delay_ms: AtomicUsize,
    /// Milliseconds to wait after reading a request's body, before answering.
    after_body_ms: AtomicUsize,
}

/// A hyper backend on a fixed loopback port that can be stopped and started again.
struct Backend {
    addr: SocketAddr,
    seen: Arc<Seen>,
    task: Option<JoinHandle<()>>,
}

impl Backend {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut b = Self {
            addr: listener.local_addr().unwrap(),
            seen: Arc::default(),
            task: None,
        };
        b.serve(listener);
        b
    }

    fn hits(&self) -> usize {
        self.seen.hits.load(Ordering::SeqCst)
    }

    fn fail(&self, fail: bool) {
        self.seen.fail.store(fail, Ordering::SeqCst);
    }

    /// Closes the listener and every open connection.
    fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort(); // drops the JoinSet of connections, which aborts them
        }
    }

    /// Listens again on the same port.
    async fn restart(&mut self) {
        let deadline = Instant::now() + WAIT;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("rebinding {}: {e}", self.addr);
                    sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("cannot rebind {}: {e}", self.addr),
            }
        };
        self.serve(listener);
    }

    fn serve(&mut self, listener: TcpListener) {
        let seen = Arc::clone(&self.seen);
        self.task = Some(tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let seen = Arc::clone(&seen);
                let svc = hyper::service::service_fn(move |req| answer(Arc::clone(&seen), req));
                conns.spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        }));
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `/healthz`: `200`. `/hang`: an hour's wait first. Anything else: counted, headers
/// recorded, `/slow/NNN` NNN ms late, body read in full, then
/// `503` when failing, the status `NNN` for a path `/status/NNN`, or `200` with hop-by-hop
/// and framing headers a proxy must drop.
async fn answer(
    seen: Arc<Seen>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() == "/healthz" {
        seen.health_checks.fetch_add(1, Ordering::SeqCst);
        let mut res = Response::new(Full::new(Bytes::from_static(b"ok")));
        if seen.close_health_checks.load(Ordering::SeqCst) {
            res.headers_mut()
                .insert("connection", "close".parse().unwrap());
        }
        return Ok(res);
    }
    seen.hits.fetch_add(1, Ordering::SeqCst);
    *seen.last_headers.lock() = Some(req.headers().clone());
    let path = req.uri().path().to_owned();
    if path == "/hang" {
        sleep(Duration::from_secs(3_600)).await; // past any backend timeout
    }
    let delay = seen.delay_ms.load(Ordering::SeqCst);
    sleep(Duration::from_millis(u64::try_from(delay).unwrap())).await;
    // `/slow/NNN`: NNN ms more, a URL the backend is slow at.
    if let Some(ms) = path.strip_prefix("/slow/").and_then(|s| s.parse().ok()) {
        sleep(Duration::from_millis(ms)).await;
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    let after = seen.after_body_ms.load(Ordering::SeqCst);
    sleep(Duration::from_millis(u64::try_from(after).unwrap())).await;
    let mut res = Response::new(Full::new(Bytes::from(format!("read {body} bytes"))));
    if seen.fail.load(Ordering::SeqCst) {
        *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        return Ok(res);
    }
    if let Some(status) = path
        .strip_prefix("/status/")
        .and_then(|s| StatusCode::from_bytes(s.as_bytes()).ok())
    {
        *res.status_mut() = status;
        return Ok(res);
    }
    let h = res.headers_mut();
    h.insert("connection", "x-hop".parse().unwrap());
    h.insert("x-hop", "1".parse().unwrap());
    h.insert("keep-alive", "timeout=5".parse().unwrap());
    h.insert("proxy-authenticate", "Basic".parse().unwrap());
    h.insert("x-frame-options", "SAMEORIGIN".parse().unwrap());
    Ok(res)
}

// ---------------------------------------------------------------------------------
// The gateway and its clients
// ---------------------------------------------------------------------------------

/// Fast timers, generous rates and limits: each test changes what it exercises.
fn config(backends: &[&Backend]) -> Config {
    let mut c = Config::new(
        backends
            .iter()
            .map(|b| BackendSpec {
                addr: b.addr,
                weight: 1,
            })
            .collect(),
    );
    c.per_client_rate = NonZeroU32::new(10_000).unwrap();
    c.per_client_burst = NonZeroU32::new(10_000).unwrap();
    c.latency_target = Duration::from_secs(5);
    c.health_interval = Duration::from_millis(100);
    c.health_timeout = Duration::from_millis(500);
    c.warmup = Duration::ZERO;
    c.breaker_failures = 1_000;
    c.breaker_open_for = Duration::from_secs(600);
    c.backend_timeout = Duration::from_secs(5);
    c
}

async fn start(config: &Config) -> Gateway {
    Gateway::start(config, TcpListener::bind("127.0.0.1:0").await.unwrap()).unwrap()
}

/// One request on a new connection; the whole response within [`WAIT`].
async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> Result<Response<Bytes>, BoxError> {
    timeout(WAIT, async {
        let stream = TcpStream::connect(addr).await?;
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let res = tx.send_request(req).await?;
        let (parts, body) = res.into_parts();
        Ok(Response::from_parts(
            parts,
            body.collect().await?.to_bytes(),
        ))
    })
    .await?
}

async fn get(addr: SocketAddr) -> Response<Bytes> {
    let req = Request::get("/")
        .header("host", "gw.test")
        .body(Full::default())
        .unwrap();
    send(addr, req).await.unwrap()
}

/// An HTTP/1 connection from the loopback address `local` (any port) to `addr`, kept
/// open for as long as the returned sender lives.
async fn connect_from(local: &str, addr: SocketAddr) -> SendRequest<Full<Bytes>> {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{local}:0").parse().unwrap()).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    tx
}

/// `GET /` on the connection `tx`; its status within [`WAIT`].
async fn get_on(tx: &mut SendRequest<Full<Bytes>>) -> Result<StatusCode, BoxError> {
    let req = Request::get("/")
        .header("host", "gw.test")
        .body(Full::default())
        .unwrap();
    timeout(WAIT, async {
        tx.ready().await?;
        let res = tx.send_request(req).await?;
        let status = res.status();
        res.into_body().collect().await?;
        Ok(status)
    })
    .await?
}

/// The time since `t0`.
fn since(t0: Instant) -> Duration {
    Instant::now().saturating_duration_since(t0)
}

/// Polls `cond` every 20 ms until it holds; panics after [`WAIT`].
async fn until(what: &str, cond: impl FnMut() -> bool) {
    until_within(what, WAIT, cond).await;
}

/// [`until`], bounded by `within` (for a wait longer than [`WAIT`] by design).
async fn until_within(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for: {what}"
        );
        sleep(Duration::from_millis(20)).await;
    }
}

/// Writes `bytes` on a new connection and reads until the gateway closes it; panics if
/// it is still open after [`WAIT`].
async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    String::from_utf8_lossy(&read_to_close(&mut stream).await).into_owned()
}

async fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0; 4096];
    loop {
        match timeout(WAIT, stream.read(&mut buf)).await {
            Err(_) => panic!("connection still open after {WAIT:?}; got {out:?}"),
            Ok(Ok(0) | Err(_)) => return out, // closed, or reset
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

// ---------------------------------------------------------------------------------
// Balancing, breakers, health
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn requests_spread_across_backends_by_weight() {
    let (b0, b1) = (Backend::start().await, Backend::start().await);
    let gw = start(&config(&[&b0, &b1])).await;
    for _ in 0..20 {
        assert_eq!(get(gw.addr).await.status(), StatusCode::OK);
    }
    assert_eq!((b0.hits(), b1.hits()), (10, 10), "round-robin");

    let (c0, c1) = (Backend::start().await, Backend::start().await);
    let mut cfg = config(&[&c0, &c1]);
    cfg.backends[1].weight = 3;
    let gw = start(&cfg).await;
    for _ in 0..20 {
        assert_eq!(get(gw.addr).await.status(), StatusCode::OK);
    }
    assert_eq!((c0.hits(), c1.hits()), (5, 15), "weights 1:3");
}

#[tokio::test]
async fn a_backend_answering_503_opens_its_breaker_traffic_moves_and_comes_back_warming_up() {
    let (b0, b1) = (Backend::start().await, Backend::start().await);
    let mut cfg = config(&[&b0, &b1]);
    cfg.breaker_failures = 3;
    // The 20 requests must all come before the open period ends (a probe would be a 4th
    // hit): they take far less than 8 s, even on a loaded machine.
    cfg.breaker_open_for = Duration::from_secs(8);
    cfg.warmup = Duration::from_secs(30);
    let gw = start(&cfg).await;
    b0.fail(true);

    let mut statuses = Vec::new();
    for _ in 0..20 {
        statuses.push(get(gw.addr).await.status());
    }
    let errors = statuses.iter().filter(|s| s.is_server_error()).count();
    assert_eq!(
        errors, 3,
        "the backend's 503s are relayed until its breaker opens: {statuses:?}"
    );
    assert_eq!(gw.breakers[0].state(), CircuitState::Open);
    assert_eq!(gw.breakers[1].state(), CircuitState::Closed);
    assert_eq!((b0.hits(), b1.hits()), (3, 17));
    assert!(
        statuses[6..].iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    assert!(
        gw.pool.is_healthy(0),
        "/healthz still answers: the breaker did it"
    );

    // Fixed: after `open_for` the breaker lets a probe through, the probe succeeds, the
    // circuit closes and the backend starts at a low weight.
    b0.fail(false);
    until_within("half-open", 2 * cfg.breaker_open_for, || {
        gw.breakers[0].state() == CircuitState::HalfOpen
    })
    .await;
    let deadline = Instant::now() + WAIT;
    while b0.hits() == 3 {
        assert!(Instant::now() < deadline, "no probe reached the backend");
        assert_eq!(get(gw.addr).await.status(), StatusCode::OK);
    }
    assert_eq!(gw.breakers[0].state(), CircuitState::Closed);
    let weight = gw.pool.weight_now(0, Instant::now());
    assert!(weight < 20, "warming up after the breaker closed: {weight}");
}

#[tokio::test]
async fn a_half_open_backend_gets_no_requests_while_its_probe_is_in_flight() {
    let (b0, b1) = (Backend::start().await, Backend::start().await);
    let mut cfg = config(&[&b0, &b1]);
    cfg.breaker_failures = 1;
    // Also the time the probe has: the requests below must all come within it (they take
    // far less than 8 s, even on a loaded machine).
    cfg.breaker_open_for = Duration::from_secs(8);
    let gw = start(&cfg).await;
    b0.fail(true);
    let deadline = Instant::now() + WAIT;
    while gw.breakers[0].state() != CircuitState::Open {
        assert!(
            Instant::now() < deadline,
            "backend 0's breaker never opened"
        );
        get(gw.addr).await;
    }
    b0.fail(false);
    b0.seen.delay_ms.store(60_000, Ordering::SeqCst); // the probe will hang
    until_within("half-open", 2 * cfg.breaker_open_for, || {
        gw.breakers[0].state() == CircuitState::HalfOpen
    })
    .await;

    // Requests in the background until one is the probe, hanging at backend 0.
    let hits = b0.hits();
    let mut background = JoinSet::new();
    let deadline = Instant::now() + WAIT;
    while b0.hits() == hits {
        assert!(Instant::now() < deadline, "no probe reached backend 0");
        background.spawn(get(gw.addr));
        sleep(Duration::from_millis(10)).await;
    }
    assert!(!gw.breakers[0].would_admit(), "the probe permit is taken");

    // Were it not passed over, backend 0 would be picked at its warm-up start weight, 10
    // against 100: smooth round-robin picks it once in every 11 (never more than 11 picks
    // apart), so 3 of these 33, each a 503 from its breaker.
    let mut statuses = Vec::new();
    for _ in 0..33 {
        statuses.push(get(gw.addr).await.status());
    }
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    assert_eq!(
        gw.breakers[0].state(),
        CircuitState::HalfOpen,
        "the probe was in flight throughout"
    );
    assert_eq!(b0.hits(), hits + 1, "only the probe reached backend 0");
    background.abort_all();
}

/// A probe had `open_for` (10 s by default), every other call the backend timeout (30
/// s): a request slower than `open_for` but within the backend timeout, which succeeds
/// while the circuit is closed, failed as the half-open probe and re-opened the circuit,
/// and meanwhile every other client got `503`. One client asking for such a slow page
/// kept a recovered backend's circuit open. The probe now has the backend timeout.
///
/// Paused clock over loopback: a write is in the peer's socket when the syscall returns,
/// so every socket event is seen before the clock moves.
#[tokio::test(start_paused = true)]
async fn a_probe_slower_than_open_for_but_within_the_backend_timeout_closes_the_circuit() {
    let b0 = Backend::start().await;
    let mut cfg = config(&[&b0]);
    cfg.breaker_failures = 1;
    cfg.breaker_open_for = Duration::from_secs(1);
    cfg.backend_timeout = Duration::from_secs(5);
    let gw = start(&cfg).await;
    b0.fail(true);
    assert_eq!(get(gw.addr).await.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(gw.breakers[0].state(), CircuitState::Open);
    b0.fail(false);
    // Slower than `open_for`, well within the backend timeout.
    b0.seen.delay_ms.store(3_000, Ordering::SeqCst);
    until_within("half-open", 2 * cfg.breaker_open_for, || {
        gw.breakers[0].state() == CircuitState::HalfOpen
    })
    .await;

    let hits = b0.hits();
    let t0 = Instant::now();
    assert_eq!(get(gw.addr).await.status(), StatusCode::OK, "the probe");
    assert!(since(t0) >= Duration::from_secs(3), "{:?}", since(t0));
    assert_eq!(b0.hits(), hits + 1, "the probe reached the backend");
    assert_eq!(
        gw.breakers[0].state(),
        CircuitState::Closed,
        "the slow probe succeeded"
    );
    b0.seen.delay_ms.store(0, Ordering::SeqCst);
    still_served(&gw, &b0).await;
}

/// One client's requests for a URL the backend is slow on time out together; five of
/// them were five failures in a row, with no success ending between them, and opened
/// the backend's circuit for every client, whose requests, started after them, were
/// being answered: `503` for everyone for `open_for`, again and again. A failure now
/// counts only if no request started after it has succeeded; five timeouts with nothing
/// answered since they started still open the circuit.
///
/// Paused clock over loopback, as above.
#[tokio::test(start_paused = true)]
async fn one_clients_timeouts_do_not_open_the_circuit_while_later_requests_are_answered() {
    let b0 = Backend::start().await;
    let mut cfg = config(&[&b0]);
    cfg.breaker_failures = 5;
    cfg.breaker_open_for = Duration::from_secs(10);
    cfg.backend_timeout = Duration::from_secs(2);
    let gw = start(&cfg).await;
    let hang = |addr| async move {
        let req = Request::get("/hang")
            .header("host", "gw.test")
            .body(Full::default())
            .unwrap();
        send(addr, req).await.unwrap().status()
    };

    let attack: Vec<_> = (0..5).map(|_| tokio::spawn(hang(gw.addr))).collect();
    sleep(Duration::from_millis(500)).await;
    assert_eq!(get(gw.addr).await.status(), StatusCode::OK, "started later");
    for a in attack {
        assert_eq!(a.await.unwrap(), StatusCode::GATEWAY_TIMEOUT);
    }
    assert_eq!(gw.breakers[0].state(), CircuitState::Closed);
    still_served(&gw, &b0).await;

    // Five timeouts with no request answered since they started: the backend is down.
    let attack: Vec<_> = (0..5).map(|_| tokio::spawn(hang(gw.addr))).collect();
    for a in attack {
        assert_eq!(a.await.unwrap(), StatusCode::GATEWAY_TIMEOUT);
    }
    assert_eq!(gw.breakers[0].state(), CircuitState::Open);
}

#[tokio::test]
async fn a_stopped_backend_is_marked_unhealthy_skipped_and_warmed_up_after_recovery() {
    let (mut b0, b1) = (Backend::start().await, Backend::start().await);
    let mut cfg = config(&[&b0, &b1]);
    cfg.warmup = Duration::from_secs(6); // the 22 cold requests take far less
    let gw = start(&cfg).await;
    until("both healthy", || {
        gw.pool.is_healthy(0) && gw.pool.is_healthy(1)
    })
    .await;

    b0.stop();
    until("backend 0 marked unhealthy", || !gw.pool.is_healthy(0)).await;
    for _ in 0..10 {
        assert_eq!(get(gw.addr).await.status(), StatusCode::OK);
    }
    assert_eq!(
        (b0.hits(), b1.hits()),
        (0, 10),
        "the unhealthy backend is skipped"
    );

    b0.restart().await;
    until("backend 0 healthy again", || gw.pool.is_healthy(0)).await;
    let weight = gw.pool.weight_now(0, Instant::now());
    assert!(weight < 50, "warming up from 10 % of 100: {weight}");
    let (a, b) = (b0.hits(), b1.hits());
    for _ in 0..22 {
        assert_eq!(get(gw.addr).await.status(), StatusCode::OK);
    }
    let (cold0, cold1) = (b0.hits() - a, b1.hits() - b);
    assert!(
        (1..=6).contains(&cold0),
        "some traffic, a small share while cold: {cold0} vs {cold1}"
    );

    until("backend 0 warm", || {
        gw.pool.weight_now(0, Instant::now()) == balance::SCALE
    })
    .await;
    let (a, b) = (b0.hits(), b1.hits());
    for _ in 0..20 {
        assert_eq!(get(gw.addr).await.status(), StatusCode::OK);
    }
    let (warm0, warm1) = (b0.hits() - a, b1.hits() - b);
    assert!(
        (8..=12).contains(&warm0),
        "an even share once warm: {warm0} vs {warm1}"
    );
}

#[tokio::test]
async fn no_backend_available_is_503_with_security_headers() {
    let (mut b0, mut b1) = (Backend::start().await, Backend::start().await);
    let gw = start(&config(&[&b0, &b1])).await;
    b0.stop();
    b1.stop();
    until("both unhealthy", || {
        !gw.pool.is_healthy(0) && !gw.pool.is_healthy(1)
    })
    .await;
    let res = get(gw.addr).await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()["x-content-type-options"], "nosniff");
    assert_eq!(res.headers()["x-frame-options"], "DENY");
}

// ---------------------------------------------------------------------------------
// Headers and limits
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_xff_is_the_socket_and_security_headers_are_set() {
    let b0 = Backend::start().await;
    let mut cfg = config(&[&b0]);
    cfg.hsts = Some(Duration::from_secs(86_400));
    let gw = start(&cfg).await;

    let req = Request::get("/page?q=1")
        .header("host", "gw.test")
        .header("connection", "keep-alive, X-Secret")
        .header("x-secret", "1")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("x-forwarded-for", "6.6.6.6")
        .header("forwarded", "for=6.6.6.6")
        .header("x-kept", "yes")
        .body(Full::default())
        .unwrap();
    let res = send(gw.addr, req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);

    let seen = b0
        .seen
        .last_headers
        .lock()
        .clone()
        .expect("the backend got the request");
    for name in [
        "x-secret",
        "keep-alive",
        "te",
        "proxy-authorization",
        "forwarded",
    ] {
        assert!(
            seen.get(name).is_none(),
            "{name} reached the backend: {seen:?}"
        );
    }
    assert!(
        seen.get("connection").is_none_or(|v| v == "keep-alive"),
        "only the gateway's own connection header: {seen:?}"
    );
    let xff: Vec<_> = seen.get_all("x-forwarded-for").iter().collect();
    assert_eq!(xff, ["127.0.0.1"], "from the socket, the client's replaced");
    assert_eq!(seen["x-kept"], "yes");
    assert_eq!(seen["host"], "gw.test", "the client's Host is kept");

    let h = res.headers();
    for name in ["x-hop", "keep-alive", "proxy-authenticate"] {
        assert!(h.get(name).is_none(), "{name} reached the client: {h:?}");
    }
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(
        h["x-frame-options"], "DENY",
        "overrides the backend's SAMEORIGIN"
    );
    assert_eq!(h["referrer-policy"], "no-referrer");
    assert_eq!(h["strict-transport-security"], "max-age=86400");
    assert_eq!(res.body().as_ref(), b"read 0 bytes");

    // Without HSTS configured, none is sent.
    let gw = start(&config(&[&b0])).await;
    assert!(
        get(gw.addr)
            .await
            .headers()
            .get("strict-transport-security")
            .is_none()
    );
}

#[tokio::test]
async fn the_backend_sees_no_forwarding_header_the_client_wrote() {
    let b0 = Backend::start().await;
    let gw = start(&config(&[&b0])).await;
    let forged = [
        ("x-forwarded-for", "6.6.6.6"),
        ("x-forwarded-host", "evil.test"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-port", "6666"),
        ("x-forwarded-prefix", "/evil"),
        ("x-forwarded-server", "evil.test"),
        ("x-forwarded-ssl", "on"),
        ("forwarded", "for=6.6.6.6;host=evil.test;proto=https"),
        ("x-real-ip", "6.6.6.6"),
        ("true-client-ip", "6.6.6.6"),
        ("x-client-ip", "6.6.6.6"),
        ("x-cluster-client-ip", "6.6.6.6"),
        ("cf-connecting-ip", "6.6.6.6"),
        ("fastly-client-ip", "6.6.6.6"),
        ("x-original-forwarded-for", "6.6.6.6"),
        ("client-ip", "6.6.6.6"),
        ("forwarded-for", "6.6.6.6"),
        ("x-originating-ip", "6.6.6.6"),
        ("x-remote-ip", "6.6.6.6"),
        ("x-remote-addr", "6.6.6.6"),
        ("cf-pseudo-ipv4", "6.6.6.6"),
        ("cf-connecting-ipv6", "6.6.6.6"),
        ("x-host", "evil.test"),
        ("x-original-host", "evil.test"),
        ("do-connecting-ip", "6.6.6.6"),
        ("x-appengine-user-ip", "6.6.6.6"),
        ("x-envoy-external-address", "6.6.6.6"),
        ("fly-client-ip", "6.6.6.6"),
        ("x-azure-clientip", "6.6.6.6"),
        ("x-azure-socketip", "6.6.6.6"),
        ("wl-proxy-client-ip", "6.6.6.6"),
        ("proxy-client-ip", "6.6.6.6"), // a `Proxy-*` header
        ("x-proxyuser-ip", "6.6.6.6"),
        ("remote-addr", "6.6.6.6"),
        ("x-true-ip", "6.6.6.6"),
        ("x-real-client-ip", "6.6.6.6"),
        ("x-client-addr", "6.6.6.6"),
        ("akamai-client-ip", "6.6.6.6"),
        ("x-custom-ip-authorization", "6.6.6.6"),
        // Paths that some frameworks take over the request line's (IIS's rewriting).
        ("x-original-url", "/evil"),
        ("x-rewrite-url", "/evil"),
        // One variable with `X-Forwarded-For` (`HTTP_X_FORWARDED_FOR`) to a CGI-style
        // backend, and the same for the others.
        ("x_forwarded_for", "6.6.6.6"),
        ("x_real_ip", "6.6.6.6"),
        ("client_ip", "6.6.6.6"),
        ("x-forwarded_host", "evil.test"),
    ];
    let mut req = Request::get("/").header("host", "gw.test");
    for (name, value) in forged {
        req = req.header(name, value);
    }
    let res = send(gw.addr, req.body(Full::default()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);

    let seen = b0.seen.last_headers.lock().clone().unwrap();
    for (name, value) in &seen {
        let value = value.to_str().unwrap();
        assert!(
            !value.contains("6.6.6.6") && !value.contains("evil") && !value.contains("https"),
            "{name}: {value} reached the backend: {seen:?}"
        );
    }
    let one = |name: &str| {
        let all: Vec<_> = seen.get_all(name).iter().collect();
        assert_eq!(all.len(), 1, "{name}: {all:?}");
        all[0].to_str().unwrap().to_owned()
    };
    assert_eq!(one("x-forwarded-for"), "127.0.0.1");
    assert_eq!(one("x-forwarded-proto"), "http");
    assert_eq!(one("x-forwarded-host"), "gw.test");
    for (name, _) in forged {
        if !["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"].contains(&name) {
            assert!(seen.get(name).is_none(), "{name} reached the backend");
        }
    }
}

#[tokio::test]
async fn connection_cannot_name_away_the_host_the_gateway_checked() {
    let b0 = Backend::start().await;
    let gw = start(&config(&[&b0])).await;
    let out = raw(
        gw.addr,
        b"GET / HTTP/1.1\r\nHost: gw\r\nConnection: host, close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let seen = b0.seen.last_headers.lock().clone().unwrap();
    let all = |name| seen.get_all(name).iter().collect::<Vec<_>>();
    assert_eq!(all("host"), ["gw"], "not the backend's address: {seen:?}");
    assert_eq!(all("x-forwarded-host"), ["gw"], "{seen:?}");
}

#[tokio::test]
async fn a_missing_repeated_or_invalid_host_is_400() {
    let b0 = Backend::start().await;
    let gw = start(&config(&[&b0])).await;
    for (what, req) in [
        (
            "HTTP/1.1 without Host",
            "GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
        ),
        (
            "two Host fields",
            "GET / HTTP/1.1\r\nHost: gw.test\r\nHost: other.test\r\nConnection: close\r\n\r\n",
        ),
        (
            "two Host fields in HTTP/1.0",
            "GET / HTTP/1.0\r\nHost: gw.test\r\nHost: other.test\r\n\r\n",
        ),
        (
            "userinfo in Host",
            "GET / HTTP/1.1\r\nHost: user@gw.test\r\nConnection: close\r\n\r\n",
        ),
    ] {
        let out = raw(gw.addr, req.as_bytes()).await;
        assert!(
            out.starts_with("HTTP/1.1 400") || out.starts_with("HTTP/1.0 400"),
            "{what}: {out}"
        );
    }
    assert_eq!(b0.hits(), 0, "refused before the backend");

    // HTTP/1.0 may leave `Host` out (RFC 9112 §3.2 asks it of 1.1), but forwarded
    // without one, the request reached the backend with hyper's client's `Host`: the
    // backend's own address, which the backend could put in a redirect.
    let out = raw(gw.addr, b"GET / HTTP/1.0\r\n\r\n").await;
    assert!(
        out.starts_with("HTTP/1.0 400") || out.starts_with("HTTP/1.1 400"),
        "HTTP/1.0 without Host: {out}"
    );
    assert_eq!(b0.hits(), 0, "refused before the backend");
    let out = raw(gw.addr, b"GET / HTTP/1.0\r\nHost: gw\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.0 200"), "{out}");
    assert_eq!(b0.hits(), 1);
    let seen = b0.seen.last_headers.lock().clone().unwrap();
    assert_eq!(seen["host"], "gw");
}

#[tokio::test]
async fn too_large_bodies_get_413_and_too_many_or_too_large_headers_431() {
    let b0 = Backend::start().await;
    let mut cfg = config(&[&b0]);
    cfg.max_body = 1024;
    cfg.limits.max_headers = 32;
    cfg.limits.max_header_bytes = 4096;
    cfg.breaker_failures = 1; // one counted failure would open it
    let gw = start(&cfg).await;

    // Declared too large: refused before the backend is called.
    let out = raw(
        gw.addr,
        b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 100000\r\nConnection: close\r\n\r\nabc",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    assert_eq!(b0.hits(), 0);

    // Within the limit: through.
    let req = Request::post("/")
        .header("host", "gw")
        .body(Full::new(Bytes::from(vec![b'x'; 1000])))
        .unwrap();
    let res = send(gw.addr, req).await.unwrap();
    assert_eq!(res.body().as_ref(), b"read 1000 bytes");

    let hits = b0.hits();
    let mut many = String::from("GET / HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n");
    for i in 0..40 {
        many.push_str(&format!("x-h{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let out = raw(gw.addr, many.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 431"), "40 headers: {out}");
    assert!(out.contains("x-content-type-options: nosniff"), "{out}");

    let big = format!(
        "GET / HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nx-big: {}\r\n\r\n",
        "z".repeat(5000)
    );
    let out = raw(gw.addr, big.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 431"), "5 kB of headers: {out}");
    assert_eq!(b0.hits(), hits, "refused headers never reach the backend");

    // Streamed past the limit: cut, 413, and not the backend's failure.
    let mut chunked =
        b"POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            .to_vec();
    for _ in 0..4 {
        chunked.extend_from_slice(b"200\r\n");
        chunked.extend_from_slice(&[b'y'; 0x200]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let out = raw(gw.addr, &chunked).await;
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    assert_eq!(
        gw.breakers[0].state(),
        CircuitState::Closed,
        "the client's fault"
    );
}

// ---------------------------------------------------------------------------------
// The client's faults are not the backend's
// ---------------------------------------------------------------------------------

/// A gateway over `b0` whose breaker opens at the first counted failure.
async fn one_failure_opens(b0: &Backend) -> Gateway {
    let mut cfg = config(&[b0]);
    cfg.breaker_failures = 1;
    cfg.backend_timeout = Duration::from_millis(500);
    start(&cfg).await
}

/// The breaker is closed and the backend serves the next request.
async fn still_served(gw: &Gateway, b0: &Backend) {
    assert_eq!(gw.breakers[0].state(), CircuitState::Closed);
    let hits = b0.hits();
    assert_eq!(get(gw.addr).await.status(), StatusCode::OK, "not 503");
    assert_eq!(b0.hits(), hits + 1);
}

/// `GET /status/NNN`: backend `Backend` answers with status `NNN`.
async fn get_status(addr: SocketAddr, status: u16) -> StatusCode {
    let req = Request::get(format!("/status/{status}"))
        .header("host", "gw")
        .body(Full::default())
        .unwrap();
    send(addr, req).await.unwrap().status()
}

/// A client opened any backend's breaker with five requests in a method the backend does
/// not implement (a stock server answers `501`), or to any URL the application answers
/// `500`. Only what shows the backend failing counts now: transport errors, timeouts,
/// and its own `502`, `503` and `504`; and a method the gateway does not relay is
/// answered `501` by the gateway, with no backend called.
#[tokio::test]
async fn only_a_backends_502_503_and_504_count_against_it_and_unknown_methods_are_501() {
    let b0 = Backend::start().await;
    let gw = one_failure_opens(&b0).await;
    for status in [500, 501, 505, 507, 599] {
        assert_eq!(
            get_status(gw.addr, status).await.as_u16(),
            status,
            "relayed"
        );
        assert_eq!(
            gw.breakers[0].state(),
            CircuitState::Closed,
            "after {status}"
        );
    }
    let hits = b0.hits();
    let out = raw(
        gw.addr,
        b"FOO / HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 501"), "{out}");
    assert!(
        out.to_ascii_lowercase().contains("\r\nallow: get, "),
        "{out}"
    );
    assert_eq!(
        b0.hits(),
        hits,
        "an unknown method never reaches the backend"
    );
    still_served(&gw, &b0).await;

    for status in [502, 503, 504] {
        assert_eq!(get_status(gw.addr, status).await.as_u16(), status);
        assert_eq!(gw.breakers[0].state(), CircuitState::Open, "after {status}");
        gw.breakers[0].force_closed();
        gw.breakers[0].release(); // closed again, with fresh counts
    }
}

#[tokio::test]
async fn a_malformed_chunked_body_leaves_the_breaker_closed() {
    let b0 = Backend::start().await;
    let gw = one_failure_opens(&b0).await;
    let out = raw(
        gw.addr,
        b"POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nZZ\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    still_served(&gw, &b0).await;
}

#[tokio::test]
async fn a_body_cut_short_by_a_close_leaves_the_breaker_closed() {
    let b0 = Backend::start().await;
    let gw = one_failure_opens(&b0).await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream
        .write_all(b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 100\r\n\r\nabc")
        .await
        .unwrap();
    until("the backend got the request", || b0.hits() == 1).await;
    stream.shutdown().await.unwrap(); // 97 bytes short; the answer can still be read
    let out = String::from_utf8_lossy(&read_to_close(&mut stream).await).into_owned();
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    still_served(&gw, &b0).await;
}

#[tokio::test]
async fn a_stalled_body_is_408_and_leaves_the_breaker_closed_but_a_stalled_backend_opens_it() {
    let b0 = Backend::start().await;
    let gw = one_failure_opens(&b0).await;
    // 3 of 1000 bytes, then silence: the backend waits for the rest until the 500 ms
    // response timeout, while the gateway waits on the client.
    let out = raw(
        gw.addr,
        b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 1000\r\nConnection: close\r\n\r\nabc",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert_eq!(b0.hits(), 1, "the request reached the backend");
    still_served(&gw, &b0).await;

    // The whole request sent, no answer within the timeout: the backend's failure.
    b0.seen.delay_ms.store(2_000, Ordering::SeqCst);
    assert_eq!(get(gw.addr).await.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(gw.breakers[0].state(), CircuitState::Open);
}

/// A raw backend that gives up on uploads: a `POST /upload` has its head read and its
/// connection closed at once, the body unread (a backend whose own timeout ended a slow
/// upload; the unread bytes make the close a reset); a `POST /early` is answered `401`
/// at once and closed, its body unread (a backend refusing a large upload early). Any
/// other request is answered `200` and closed.
async fn upload_refusing_backend() -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            conns.spawn(async move {
                let head = read_head(&mut stream).await;
                if head.starts_with(b"POST /upload ") {
                    return; // dropped: closed with the body unread
                }
                let answer: &[u8] = if head.starts_with(b"POST /early ") {
                    b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                } else {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                };
                let _ = stream.write_all(answer).await;
            });
        }
    });
    (addr, task)
}

/// Writes `bytes` on a new connection and reads the status line of the answer.
async fn status_line(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0; 1024];
    while !out.windows(2).any(|w| w == b"\r\n") {
        match timeout(WAIT, stream.read(&mut buf)).await {
            Err(_) => panic!("no status line after {WAIT:?}; got {out:?}"),
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    let out = String::from_utf8_lossy(&out).into_owned();
    out.lines().next().unwrap_or_default().to_string()
}

/// One client opened a backend's breaker with uploads the backend gave up on: a
/// backend that closed (reset) the connection while the gateway still waited for the
/// client's body, or that refused a large body early and closed with it unread, failed
/// the call with hyper's `SendRequest` error, which the breaker counted like any reset.
/// Such a failure is the client's upload cut short now: still `502`, counted
/// `during_upload`, and not against the breaker, which stays closed for the others.
#[test]
fn a_backend_closing_during_the_upload_does_not_count_against_its_breaker() {
    with_prometheus(|prometheus| async move {
        let endpoint = serve_metrics(prometheus).await;
        let (backend, _backend) = upload_refusing_backend().await;
        let mut cfg = config_over(backend);
        cfg.health_interval = Duration::MAX;
        cfg.breaker_failures = 2;
        let gw = start(&cfg).await;

        // 3 bytes of 100, then nothing: the backend closes under the waiting gateway.
        for i in 0..5 {
            let line = status_line(
                gw.addr,
                b"POST /upload HTTP/1.1\r\nHost: gw\r\nContent-Length: 100\r\n\r\nabc",
            )
            .await;
            assert_eq!(line, "HTTP/1.1 502 Bad Gateway", "slow upload {i}");
            assert_eq!(
                gw.breakers[0].state(),
                CircuitState::Closed,
                "after slow upload {i}"
            );
        }
        // 1 MB sent at once to a backend that answers `401` and closes without reading
        // it: the answer, or `502` when the reset beats it to the gateway.
        for i in 0..5 {
            let req = Request::post("/early")
                .header("host", "gw")
                .body(Full::new(Bytes::from(vec![0; 1_000_000])))
                .unwrap();
            let status = match send(gw.addr, req).await {
                Ok(res) => res.status(),
                // The gateway answered and closed while the client still sent.
                Err(e) => {
                    assert!(closed_by_peer(&*e), "early refusal {i}: {e:?}");
                    StatusCode::BAD_GATEWAY
                }
            };
            assert!(
                [StatusCode::UNAUTHORIZED, StatusCode::BAD_GATEWAY].contains(&status),
                "early refusal {i}: {status}"
            );
            assert_eq!(
                gw.breakers[0].state(),
                CircuitState::Closed,
                "after early refusal {i}"
            );
        }
        let mut other = connect_from("127.0.0.2", gw.addr).await;
        assert_eq!(get_on(&mut other).await.unwrap(), StatusCode::OK);

        let text = scrape(endpoint).await;
        let errors = by_reason(&text, "aegis_http_backend_errors_total", "");
        let cut = errors.get("during_upload").copied().unwrap_or(0);
        assert!(
            cut >= 5,
            "the slow uploads' 502s at least: /metrics:\n{text}"
        );
        assert_eq!(errors.get("failed"), None, "/metrics:\n{text}");
        assert_eq!(
            sample(&text, r#"aegis_circuit_state{name="backend0"}"#),
            Some(0.0),
            "/metrics:\n{text}"
        );
    });
}

/// A raw keep-alive backend: the first request on each connection is answered `200`
/// (`ok`, kept alive), the second one closes the connection unanswered, as a backend
/// whose keep-alive timeout fired just as the request came (its head read first, so the
/// close is an end of stream; with `reset`, the head left unread, so it is a reset).
/// `/healthz` is answered `200` and closed. Counts the connections that carried a
/// request other than `/healthz`.
async fn keep_alive_closing_backend(reset: bool) -> (SocketAddr, Arc<AtomicUsize>, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&conns);
    let task = tokio::spawn(async move {
        let mut tasks = JoinSet::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            let counter = Arc::clone(&counter);
            tasks.spawn(async move {
                let mut byte = [0; 1];
                for n in 0.. {
                    if n == 1 && reset {
                        // Wait for the request, and leave it unread.
                        let _ = stream.peek(&mut byte).await;
                        return;
                    }
                    let head = read_head(&mut stream).await;
                    if head.is_empty() {
                        return;
                    }
                    if head.starts_with(b"GET /healthz ") {
                        let _ = stream
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                            .await;
                        return;
                    }
                    if n == 1 {
                        return; // closed unanswered
                    }
                    counter.fetch_add(1, Ordering::SeqCst);
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
                        .await;
                }
            });
        }
    });
    (addr, conns, task)
}

/// A backend closed a kept-alive connection (its own idle timeout) just as the pool
/// sent a request on it: the client got `502` and the breaker counted a failure, so a
/// backend with a short keep-alive was opened by its ordinary traffic. A reused
/// connection closed or reset before any byte of its answer is the keep-alive race now,
/// `stale_connection`, not the breaker's; the same close on a new connection still is.
#[test]
fn a_reused_connection_closed_before_any_answer_does_not_count_against_the_breaker() {
    with_prometheus(|prometheus| async move {
        let endpoint = serve_metrics(prometheus).await;
        for reset in [false, true] {
            let (backend, conns, _backend) = keep_alive_closing_backend(reset).await;
            let mut cfg = config_over(backend);
            cfg.health_interval = Duration::MAX;
            cfg.breaker_failures = 1;
            let gw = start(&cfg).await;
            // A new connection is served; a reused one is closed under the request (when
            // the pool has it back before the next request comes, as it mostly has).
            let mut lost = 0;
            for i in 0..40 {
                let status = status_of(gw.addr, "/").await;
                assert!(
                    [StatusCode::OK, StatusCode::BAD_GATEWAY].contains(&status),
                    "reset {reset}, {i}: {status}"
                );
                assert_eq!(
                    gw.breakers[0].state(),
                    CircuitState::Closed,
                    "reset {reset}, after {i}: {status}"
                );
                lost += usize::from(status == StatusCode::BAD_GATEWAY);
                if lost == 3 {
                    break;
                }
            }
            assert_eq!(lost, 3, "reset {reset}: the pool reused no connection");
            assert!(conns.load(Ordering::SeqCst) >= 3);
        }
        let text = scrape(endpoint).await;
        let errors = by_reason(&text, "aegis_http_backend_errors_total", "");
        assert_eq!(
            errors.get("stale_connection"),
            Some(&6),
            "/metrics:\n{text}"
        );
        assert_eq!(errors.get("failed"), None, "/metrics:\n{text}");

        // The same close on a new connection: the backend's failure.
        let (backend, _backend) = raw_backend(b"").await;
        let mut cfg = config_over(backend);
        cfg.health_interval = Duration::MAX;
        cfg.breaker_failures = 1;
        let gw = start(&cfg).await;
        assert_eq!(status_of(gw.addr, "/").await, StatusCode::BAD_GATEWAY);
        assert_eq!(gw.breakers[0].state(), CircuitState::Open);
    });
}

/// A raw keep-alive backend: the first request on each connection is answered `200`
/// in full (kept alive); the second one gets `part`, the start of an answer, and then a
/// reset (`SO_LINGER` 0). `/healthz` is answered `200` and closed.
async fn partly_answering_backend(part: &'static [u8]) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut tasks = JoinSet::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            tasks.spawn(async move {
                for n in 0..2 {
                    let head = read_head(&mut stream).await;
                    if head.is_empty() {
                        return;
                    }
                    if head.starts_with(b"GET /healthz ") {
                        let _ = stream
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                            .await;
                        return;
                    }
                    let answer: &[u8] = if n == 0 {
                        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n"
                    } else {
                        part
                    };
                    let _ = stream.write_all(answer).await;
                }
                stream.set_zero_linger().unwrap();
            });
        }
    });
    (addr, task)
}

/// A backend that began its answer on a reused keep-alive connection (part of the
/// status line and headers, or a `100 Continue`) and then reset it was labelled
/// `stale_connection`, the keep-alive race, which its breaker ignores: the connection
/// use counted the reads that returned after the call, and a read of data followed by
/// a reset was one, as a lone end of stream is. Only an answer of no byte at all is the
/// race; this one is the backend's failure (`failed`, its breaker counts it).
#[test]
fn a_reused_connection_reset_after_part_of_an_answer_counts_against_the_breaker() {
    with_prometheus(|prometheus| async move {
        let endpoint = serve_metrics(prometheus).await;
        let parts: [&'static [u8]; 2] = [
            b"HTTP/1.1 200 OK\r\nContent-Le",
            b"HTTP/1.1 100 Continue\r\n\r\n",
        ];
        for part in parts {
            let what = String::from_utf8_lossy(part);
            let (backend, _backend) = partly_answering_backend(part).await;
            let mut cfg = config_over(backend);
            cfg.health_interval = Duration::MAX;
            cfg.breaker_failures = 1;
            let gw = start(&cfg).await;
            // A new connection is served in full; a reused one gets `part` and a reset
            // (when the pool has it back before the next request comes, as it mostly
            // has).
            let mut cut = false;
            for i in 0..40 {
                let status = status_of(gw.addr, "/").await;
                if status == StatusCode::BAD_GATEWAY {
                    cut = true;
                    break;
                }
                assert_eq!(status, StatusCode::OK, "{what:?}, {i}");
            }
            assert!(cut, "{what:?}: the pool reused no connection");
            assert_eq!(
                gw.breakers[0].state(),
                CircuitState::Open,
                "{what:?}: counted against the breaker"
            );
        }
        let text = scrape(endpoint).await;
        let errors = by_reason(&text, "aegis_http_backend_errors_total", "");
        assert_eq!(errors.get("stale_connection"), None, "/metrics:\n{text}");
        assert_eq!(errors.get("failed"), Some(&2), "/metrics:\n{text}");
    });
}

/// The pool kept an idle backend connection 30 s, longer than most backends keep one
/// (5 s for Node.js, uvicorn, Apache httpd), so requests after a pause met the
/// backend's close. It keeps one `backend_idle_timeout`, 4 s by default, then connects
/// anew.
///
/// Paused clock over loopback: the pool's clock is tokio's (`TokioTimer`).
#[tokio::test(start_paused = true)]
async fn an_idle_backend_connection_is_dropped_after_the_idle_timeout() {
    let b0 = Backend::start().await;
    let accepted = Arc::new(AtomicUsize::new(0));
    // A proxy in front of `b0` that counts the gateway's connections.
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front_addr = front.local_addr().unwrap();
    let count = Arc::clone(&accepted);
    let to = b0.addr;
    let _front = tokio::spawn(async move {
        while let Ok((mut from, _)) = front.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut to = TcpStream::connect(to).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut from, &mut to).await;
            });
        }
    });
    let mut cfg = config_over(front_addr);
    cfg.health_interval = Duration::MAX;
    assert_eq!(cfg.backend_idle_timeout, Duration::from_secs(4));
    let gw = start(&cfg).await;
    until("the start-up health check", || {
        accepted.load(Ordering::SeqCst) == 1
    })
    .await;
    let health = 1;
    assert_eq!(get(gw.addr).await.status(), StatusCode::OK);
    assert_eq!(accepted.load(Ordering::SeqCst), health + 1);
    sleep(Duration::from_millis(3_500)).await;
    assert_eq!(get(gw.addr).await.status(), StatusCode::OK);
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        health + 1,
        "reused within 4 s"
    );
    sleep(Duration::from_millis(4_500)).await;
    assert_eq!(get(gw.addr).await.status(), StatusCode::OK);
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        health + 2,
        "idle for 4.5 s: dropped, and a new one made"
    );
}

/// One client kept a recovering backend's breaker from ever closing: while it was
/// half-open, a request announcing a body and sending none took the only probe permit,
/// the probe ended as a stall (`408`, which the breaker ignores), and the client's next
/// such request took the permit again; meanwhile the balancer passed over the backend
/// and every other client got `503`. A probe's body is now read before the request calls
/// into the breaker.
///
/// Paused clock over loopback: a write is in the peer's socket when the syscall returns,
/// so every socket event is seen before the clock moves.
#[tokio::test(start_paused = true)]
async fn a_request_withholding_its_body_does_not_hold_the_probe_permit() {
    let b0 = Backend::start().await;
    let mut cfg = config(&[&b0]);
    cfg.health_interval = Duration::MAX;
    cfg.breaker_failures = 1;
    cfg.breaker_open_for = Duration::from_secs(3);
    cfg.backend_timeout = Duration::from_secs(5);
    let gw = start(&cfg).await;
    b0.fail(true);
    assert_eq!(get(gw.addr).await.status(), StatusCode::SERVICE_UNAVAILABLE);
    b0.fail(false);
    sleep(cfg.breaker_open_for).await;
    assert_eq!(gw.breakers[0].state(), CircuitState::HalfOpen);

    // Ten bytes announced, none sent.
    let mut withheld = TcpStream::connect(gw.addr).await.unwrap();
    withheld
        .write_all(b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 10\r\n\r\n")
        .await
        .unwrap();
    sleep(Duration::from_millis(100)).await; // the gateway has read the head
    assert!(
        gw.breakers[0].would_admit(),
        "the probe permit is held for a body that may never come"
    );
    assert_eq!(
        get(gw.addr).await.status(),
        StatusCode::OK,
        "another client's request is the probe"
    );
    assert_eq!(gw.breakers[0].state(), CircuitState::Closed);
    let out = String::from_utf8_lossy(&read_to_close(&mut withheld).await).into_owned();
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert_eq!(
        b0.hits(),
        2,
        "the request without its body never reached the backend"
    );

    // A body that does come is sent on, as the probe, once it is in.
    b0.fail(true);
    assert_eq!(get(gw.addr).await.status(), StatusCode::SERVICE_UNAVAILABLE);
    b0.fail(false);
    sleep(cfg.breaker_open_for).await;
    assert_eq!(gw.breakers[0].state(), CircuitState::HalfOpen);
    let out = post_split_body(gw.addr, Duration::from_secs(2)).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.ends_with("read 2 bytes"), "{out}");
    assert_eq!(gw.breakers[0].state(), CircuitState::Closed);
}

/// A request body the test sends chunk by chunk; it ends when the sender is dropped.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(hyper::body::Frame::data(c))))
    }
}

/// A backend called as the gateway calls it, [`proxy::Upstream`] watching the probes
/// of its breaker, without the proxy in front (which reads a probe's body before the
/// call), with the circuit half-open: opened by one failure, `open_for` ago (also the
/// probe timeout).
async fn half_open_upstream(
    open_for: Duration,
    timeout: Duration,
) -> (proxy::Backend, aegis_layers::circuit_breaker::CircuitHandle) {
    let breaker = aegis_layers::circuit_breaker::CircuitBreakerLayer::builder("probe")
        .consecutive_failures(Some(1))
        .open_for(open_for)
        .probe_timeout(open_for)
        .classifier(proxy::GatewayClassifier)
        .build();
    let handle = breaker.handle();
    let idle = gateway::DEFAULT_BACKEND_IDLE_TIMEOUT;
    let upstream = proxy::Upstream::new(Duration::from_secs(2), timeout, idle)
        .watch_probes(handle.clone(), open_for);
    handle.record_failure();
    sleep(open_for).await;
    assert_eq!(handle.state(), CircuitState::HalfOpen);
    (tower::Layer::layer(&breaker, upstream), handle)
}

/// `POST /` to `b0` with `Content-Length: len`, its body from the returned sender.
fn post_streamed(b0: &Backend, len: usize) -> (Request<proxy::GatewayBody>, mpsc::Sender<Bytes>) {
    let (tx, rx) = mpsc::channel(4);
    let req = Request::post(format!("http://{}/", b0.addr))
        .header("host", "gw")
        .header("content-length", len)
        .body(ChannelBody(rx).boxed_unsync())
        .unwrap();
    (req, tx)
}

/// `GET /` to `b0` through `backend`: its status, once its body is read (the body's end
/// is the answer's success to the breaker; dropped, it counts nothing).
async fn get_through(b0: &Backend, backend: &proxy::Backend) -> StatusCode {
    let req = Request::get(format!("http://{}/", b0.addr))
        .header("host", "gw")
        .body(
            Full::default()
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .unwrap();
    let res = tower::ServiceExt::oneshot(backend.clone(), req)
        .await
        .unwrap();
    let status = res.status();
    res.into_body().collect().await.unwrap();
    status
}

/// Whether `res` is the stall of the client's body ([`client_body::ClientBodyError`]).
fn stalled<T>(res: &Result<T, BoxError>) -> bool {
    res.as_ref().err().is_some_and(|e| {
        aegis_core::error::find::<client_body::ClientBodyError>(&**e)
            .is_some_and(client_body::ClientBodyError::is_stall)
    })
}

/// A probe whose client stopped sending its body (3 of 1000 bytes, then silence) was
/// in flight past the probe timeout, and the breaker counted it failed and re-opened.
/// [`proxy::Upstream`] now ends it as a stall shortly before, which the breaker ignores.
/// (The gateway reads a probe's body before the call: this is the backstop.)
#[tokio::test(start_paused = true)]
async fn a_stalled_body_on_the_half_open_probe_does_not_reopen_the_breaker() {
    let b0 = Backend::start().await;
    let open_for = Duration::from_millis(1500);
    // The stall's `ClientBodyError` would come only at the response timeout.
    let (backend, breaker) = half_open_upstream(open_for, Duration::from_secs(5)).await;
    let (req, tx) = post_streamed(&b0, 1000);
    tx.send(Bytes::from_static(b"abc")).await.unwrap();
    let admitted = Instant::now();
    let res = tower::ServiceExt::oneshot(backend.clone(), req).await;
    assert!(stalled(&res), "{:?}", res.map(|r| r.status()));
    assert!(since(admitted) < open_for, "ended before the probe timeout");
    assert_eq!(b0.hits(), 1, "the probe reached the backend");
    // Past the probe timeout, and before the end of a second open period.
    tokio::time::sleep_until(admitted + open_for + Duration::from_millis(300)).await;
    assert_ne!(
        breaker.state(),
        CircuitState::Open,
        "the client's stalled body failed the probe"
    );
    assert_eq!(
        get_through(&b0, &backend).await,
        StatusCode::OK,
        "the next probe"
    );
    assert_eq!(breaker.state(), CircuitState::Closed);
    drop(tx);
}

/// An answer's body: `ok`, then open until `end` resolves (or its sender is dropped).
struct OpenUntil {
    first: Option<Bytes>,
    end: tokio::sync::oneshot::Receiver<()>,
}

impl hyper::body::Body for OpenUntil {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        if let Some(first) = self.first.take() {
            return std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(first))));
        }
        std::pin::Pin::new(&mut self.end).poll(cx).map(|_| None)
    }
}

/// A hyper backend that answers `200` at once, before reading the body, and then reads
/// and discards the body (as nginx does after an early answer), keeping the connection
/// for as long as the body comes; its answer's body (`ok`) stays open until the request
/// body has been read: the answer is not over while the body comes. Counts the bodies
/// that ended with an error: their connection was closed under them.
async fn early_answer_backend() -> (SocketAddr, Arc<AtomicUsize>, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cut = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&cut);
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            let cut = Arc::clone(&counter);
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let cut = Arc::clone(&cut);
                let (read, end) = tokio::sync::oneshot::channel::<()>();
                tokio::spawn(async move {
                    if req.into_body().collect().await.is_err() {
                        cut.fetch_add(1, Ordering::SeqCst);
                    }
                    drop(read);
                });
                let body = OpenUntil {
                    first: Some(Bytes::from_static(b"ok")),
                    end,
                };
                async { Ok::<_, Infallible>(Response::new(body)) }
            });
            conns.spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, cut, task)
}

/// A client announced a large body and trickled it a byte a second, which resets every
/// idle clock, to a backend that answered at once: the response timeout ended at the
/// answer, and nothing bounded the rest of the body, so the client's connection and the
/// backend's stayed open for as long as the trickle went on. The body must now be in
/// within the backend timeout of the call. (The backend's answer stays open meanwhile:
/// an answer that is over ends the body sooner, see the next test.)
///
/// Paused clock over loopback: a write is in the peer's socket when the syscall returns,
/// so every socket event is seen before the clock moves.
#[tokio::test(start_paused = true)]
async fn a_body_trickled_after_the_backends_answer_is_cut_at_the_backend_timeout() {
    let (backend, cut, _backend) = early_answer_backend().await;
    let mut cfg = config_over(backend);
    cfg.health_interval = Duration::MAX; // one round at start-up
    cfg.backend_timeout = Duration::from_secs(5);
    assert!(
        cfg.idle_timeout > Duration::from_secs(10),
        "the trickle's 1 s resets it"
    );
    let gw = start(&cfg).await;

    let stream = TcpStream::connect(gw.addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let t0 = Instant::now();
    wr.write_all(b"POST /x HTTP/1.1\r\nHost: gw\r\nContent-Length: 1000000\r\n\r\na")
        .await
        .unwrap();
    let reader = tokio::spawn(async move {
        let mut out = Vec::new();
        let mut buf = [0; 4096];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return (out, Instant::now()),
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    });
    // A byte a second, for six backend timeouts at most.
    while !reader.is_finished() && since(t0) < Duration::from_secs(30) {
        sleep(Duration::from_secs(1)).await;
        if wr.write_all(b"a").await.is_err() {
            break;
        }
    }
    assert!(
        reader.is_finished(),
        "the connection is still open {:?} after the request",
        since(t0)
    );
    let (out, closed) = reader.await.unwrap();
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.starts_with("HTTP/1.1 200"),
        "the backend's answer: {out}"
    );
    let took = closed.saturating_duration_since(t0);
    assert!(
        took >= cfg.backend_timeout && took < cfg.backend_timeout + Duration::from_secs(2),
        "closed at the backend timeout: {took:?}"
    );
    until("the backend's connection was closed", || {
        cut.load(Ordering::SeqCst) == 1
    })
    .await;
}

/// A raw backend that reads a request head and, but for `/healthz` (`200`, closed),
/// hands the connection and the head to the test, which answers ([`REFUSAL`]) and
/// never reads the request's body nor closes (as a backend refusing an upload on its
/// headers may).
async fn unread_backend() -> (
    SocketAddr,
    mpsc::UnboundedReceiver<(TcpStream, Vec<u8>)>,
    JoinHandle<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let head = read_head(&mut stream).await;
            if head.starts_with(b"GET /healthz ") {
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
                continue;
            }
            let _ = tx.send((stream, head));
        }
    });
    (addr, rx, task)
}

/// The answer of [`unread_backend`]'s connections.
const REFUSAL: &[u8] = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 5\r\n\r\nnope!";

/// A client sent `Expect: 100-continue` and a `Content-Length`, and the backend answered
/// `401` without reading the body: the gateway relayed the `401` at once, and then kept
/// the client's connection (and the backend's) open until the body's deadline, 30 s,
/// for a body nobody would read. Now the answer says `Connection: close`, and once it is
/// over the rest of the body is dropped: both connections close at once.
///
/// What the gateway does with `Expect: 100-continue` is checked too, as documented: it
/// removes the header, and hyper's server answers `100 Continue` itself when the body
/// is first read, which is when the request has gone on to the backend (not when the
/// backend asks for the body). Paused clock over loopback, as above.
#[tokio::test(start_paused = true)]
async fn an_answer_before_the_body_closes_both_connections_once_it_is_over() {
    let (backend, mut conns, _backend) = unread_backend().await;
    let mut cfg = config_over(backend);
    cfg.health_interval = Duration::MAX; // one round at start-up
    cfg.backend_timeout = Duration::from_secs(5);
    let gw = start(&cfg).await;

    let mut client = TcpStream::connect(gw.addr).await.unwrap();
    let t0 = Instant::now();
    client
        .write_all(
            b"POST /up HTTP/1.1\r\nHost: gw\r\nContent-Length: 100000\r\nExpect: 100-continue\r\n\r\n",
        )
        .await
        .unwrap();
    let (mut conn, head) = timeout(WAIT, conns.recv()).await.unwrap().unwrap();
    conn.write_all(REFUSAL).await.unwrap();
    let out = read_to_close(&mut client).await;
    let took = since(t0);
    let out = String::from_utf8_lossy(&out).to_ascii_lowercase();
    assert!(
        took < Duration::from_secs(1),
        "closed after the answer, not at the body's deadline: {took:?}; got {out}"
    );
    let (interim, last) = out
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(interim, "http/1.1 100 continue", "{out}");
    assert!(
        last.starts_with("http/1.1 401"),
        "the backend's answer: {out}"
    );
    assert!(last.contains("\r\nconnection: close\r\n"), "{out}");
    assert!(last.ends_with("\r\n\r\nnope!"), "{out}");

    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(
        !head.contains("\r\nexpect:"),
        "not forwarded (the gateway answered it): {head}"
    );
    let mut buf = [0; 16];
    let read = timeout(Duration::from_secs(1), conn.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0) | Err(_))),
        "the backend's connection is closed at once: {read:?}"
    );
}

/// As above, the client sending its body meanwhile, more than the sockets hold, so
/// that hyper's client waits on the backend's full socket and polls the client's body no
/// more when the answer ends: the client's body is dropped all the same, and the
/// client's connection closed at once (the backend's is left to the write-stall limit,
/// the backend timeout). Paused clock over loopback, as above.
#[tokio::test(start_paused = true)]
async fn an_answer_before_a_blocked_upload_closes_the_clients_connection_once_it_is_over() {
    const BODY: usize = 64 << 20; // more than the four sockets' buffers hold
    let (backend, mut conns, _backend) = unread_backend().await;
    let mut cfg = config_over(backend);
    cfg.health_interval = Duration::MAX; // one round at start-up
    cfg.backend_timeout = Duration::from_secs(5);
    cfg.max_body = BODY;
    let gw = start(&cfg).await;

    let client = TcpStream::connect(gw.addr).await.unwrap();
    let (mut rd, mut wr) = client.into_split();
    let head = format!("POST /up HTTP/1.1\r\nHost: gw\r\nContent-Length: {BODY}\r\n\r\n");
    wr.write_all(head.as_bytes()).await.unwrap();
    let writer = tokio::spawn(async move {
        let chunk = vec![b'a'; 64 * 1024];
        let mut sent = 0;
        while sent < BODY && wr.write_all(&chunk).await.is_ok() {
            sent += chunk.len();
        }
        (sent, wr) // kept open
    });
    let (mut conn, _head) = timeout(WAIT, conns.recv()).await.unwrap().unwrap();
    // Every task waits on a full socket when the paused clock moves.
    sleep(Duration::from_millis(100)).await;
    assert!(!writer.is_finished(), "the sockets hold the whole body");

    let t0 = Instant::now();
    conn.write_all(REFUSAL).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0; 4096];
    let took = loop {
        match timeout(WAIT, rd.read(&mut buf)).await {
            Err(_) => panic!("still open after {WAIT:?}; got {out:?}"),
            // Closed, or reset: the body's rest was unread.
            Ok(Ok(0) | Err(_)) => break since(t0),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    };
    assert!(
        took < Duration::from_secs(1),
        "closed after the answer, not at the backend timeout: {took:?}; got {:?}",
        String::from_utf8_lossy(&out)
    );
}

/// A raw backend that reads a request head, answers `200` at once with the head of a
/// one-byte body it never sends (an answer still going on: one that is over ends the
/// request body, see above), and then never reads again, keeping the connection open
/// (as a backend stopped after answering does). `/healthz` is answered and closed; every
/// other connection is handed to the test.
async fn answer_then_stop_reading_backend() -> (
    SocketAddr,
    mpsc::UnboundedReceiver<TcpStream>,
    JoinHandle<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            // A byte at a time: nothing of the body is read.
            let head = read_head(&mut stream).await;
            if head.starts_with(b"GET /healthz ") {
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                    .await;
                continue;
            }
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n")
                .await;
            let _ = tx.send(stream);
        }
    });
    (addr, rx, task)
}

/// A backend answered a large upload at once and then stopped reading it: the
/// connection's send buffer filled, hyper's connection task waited on the socket alone
/// (it polls the request body, and so its deadline, only when it can write), and the
/// backend connection and its task were held for as long as the backend did not read,
/// possibly for ever. A write that waits longer than the backend timeout now closes the
/// connection.
///
/// The backend checks by writing, not reading: a read would let the gateway write again,
/// and the request body's own deadline would then close the connection, fix or no fix.
/// A byte sent to a socket the gateway has closed is answered with a reset, which fails
/// the next write. Paused clock over loopback, as above.
#[tokio::test(start_paused = true)]
async fn a_backend_that_stops_reading_the_body_is_disconnected_at_the_backend_timeout() {
    const BODY: usize = 64 << 20; // more than the four sockets' buffers hold
    let (backend, mut conns, _backend) = answer_then_stop_reading_backend().await;
    let mut cfg = config_over(backend);
    cfg.health_interval = Duration::MAX; // one round at start-up
    cfg.backend_timeout = Duration::from_secs(5);
    cfg.max_body = BODY;
    let margin = Duration::from_secs(2);
    assert!(
        cfg.idle_timeout > cfg.backend_timeout + margin,
        "the client's connection is not cut first"
    );
    let gw = start(&cfg).await;

    let mut client = TcpStream::connect(gw.addr).await.unwrap();
    let t0 = Instant::now();
    let head = format!("POST /up HTTP/1.1\r\nHost: gw\r\nContent-Length: {BODY}\r\n\r\n");
    client.write_all(head.as_bytes()).await.unwrap();
    let _client = tokio::spawn(async move {
        let chunk = vec![b'a'; 64 * 1024];
        let mut sent = 0;
        while sent < BODY && client.write_all(&chunk).await.is_ok() {
            sent += chunk.len();
        }
        client // kept open
    });
    let mut conn = timeout(WAIT, conns.recv()).await.unwrap().unwrap();

    let closed = loop {
        let took = since(t0);
        assert!(
            took < cfg.backend_timeout + margin,
            "the backend connection is still open {took:?} after the request"
        );
        sleep(Duration::from_millis(250)).await;
        if conn.write_all(b"x").await.is_err() || conn.write_all(b"x").await.is_err() {
            break since(t0);
        }
    };
    assert!(
        closed >= cfg.backend_timeout,
        "closed before the backend timeout: {closed:?}"
    );
}

// ---------------------------------------------------------------------------------
// Request targets
// ---------------------------------------------------------------------------------

/// A `GET` with a chunked body: the gateway stripped the `Transfer-Encoding`, and
/// hyper's client, left with no framing header and a body of unknown length, sent the
/// request with no body.
#[tokio::test]
async fn a_chunked_body_of_a_get_reaches_the_backend() {
    let b0 = Backend::start().await;
    let gw = start(&config(&[&b0])).await;
    let out = raw(
        gw.addr,
        b"GET / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
          3\r\nabc\r\n0\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.ends_with("read 3 bytes"), "{out}");
    let headers = b0.seen.last_headers.lock().clone().unwrap();
    assert_eq!(headers["transfer-encoding"], "chunked");
}

/// hyper's server reads a request whose last transfer coding is `chunked` and undoes
/// the chunked framing alone: the gateway stripped the `Transfer-Encoding`, and the
/// backend got the still-gzipped bytes as a plain body. A coding other than one
/// `chunked` is now answered `501`.
#[tokio::test]
async fn a_transfer_coding_other_than_chunked_is_501() {
    let b0 = Backend::start().await;
    let gw = start(&config(&[&b0])).await;
    for coding in [
        "Transfer-Encoding: gzip, chunked",
        "Transfer-Encoding: chunked, chunked",
        "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked",
    ] {
        let req = format!(
            "POST / HTTP/1.1\r\nHost: gw\r\n{coding}\r\nConnection: close\r\n\r\n\
             3\r\nabc\r\n0\r\n\r\n"
        );
        let out = raw(gw.addr, req.as_bytes()).await;
        assert!(out.starts_with("HTTP/1.1 501"), "{coding}: {out}");
    }
    assert_eq!(b0.hits(), 0);
    let out = raw(
        gw.addr,
        b"POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: Chunked\r\nConnection: close\r\n\r\n\
          3\r\nabc\r\n0\r\n\r\n",
    )
    .await;
    assert!(out.ends_with("read 3 bytes"), "{out}");
}

/// A backend's `gzip, chunked` answer reached the client as raw gzip, the stripped
/// `Transfer-Encoding` gone and nothing saying so. It is now `502`, the backend's
/// failure.
#[tokio::test]
async fn a_backends_transfer_coding_other_than_chunked_is_502() {
    let (backend, _backend) = raw_backend(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
          3\r\nabc\r\n0\r\n\r\n",
    )
    .await;
    let mut cfg = config_over(backend);
    cfg.breaker_failures = 1;
    let gw = start(&cfg).await;
    let req = Request::get("/")
        .header("host", "gw.test")
        .body(Full::default())
        .unwrap();
    let res = send(gw.addr, req).await.unwrap();
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY, "{:?}", res.body());
    assert_eq!(gw.breakers[0].state(), CircuitState::Open);
}

/// A backend's `101 Switching Protocols` (the gateway strips `Upgrade`, so it never asks
/// for one) was relayed to the client and counted a success by the breaker. It is the
/// backend's failure now: `502`, counted `informational`, and the breaker counts it.
#[test]
fn a_backends_101_is_502_counted_and_a_failure_of_the_backend() {
    with_prometheus(|prometheus| async move {
        let endpoint = serve_metrics(prometheus).await;
        let (backend, _backend) = raw_backend(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .await;
        let mut cfg = config_over(backend);
        cfg.breaker_failures = 1;
        let gw = start(&cfg).await;
        let req = Request::get("/chat")
            .header("host", "gw.test")
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(Full::default())
            .unwrap();
        let res = send(gw.addr, req).await.unwrap();
        assert_eq!(res.status(), StatusCode::BAD_GATEWAY, "{:?}", res.body());
        assert_eq!(gw.breakers[0].state(), CircuitState::Open);
        let text = scrape(endpoint).await;
        assert_eq!(
            by_reason(&text, "aegis_http_backend_errors_total", ""),
            BTreeMap::from([("informational".to_string(), 1)]),
            "/metrics:\n{text}"
        );
    });
}

/// A raw backend that reads a request head and answers `answer` to it, then closes the
/// connection; `/healthz` is answered `200`.
async fn raw_backend(answer: &'static [u8]) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            conns.spawn(async move {
                let head = read_head(&mut stream).await;
                let answer: &[u8] = if head.starts_with(b"GET /healthz ") {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                } else {
                    answer
                };
                let _ = stream.write_all(answer).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    (addr, task)
}

/// A gateway over the one backend at `addr`.
async fn start_over(addr: SocketAddr) -> Gateway {
    start(&config_over(addr)).await
}

/// The test configuration ([`config`]) over the one backend at `addr`.
fn config_over(addr: SocketAddr) -> Config {
    let mut cfg = config(&[]);
    cfg.backends = vec![BackendSpec { addr, weight: 1 }];
    cfg
}

/// A backend's chunked answer with a stale `Content-Length: 3`: the gateway stripped
/// the `Transfer-Encoding` and kept the length, and hyper's server cut the body to it.
#[tokio::test]
async fn a_chunked_answer_with_a_content_length_reaches_the_client_whole() {
    let (backend, _backend) = raw_backend(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n\
          6\r\nabcdef\r\n0\r\n\r\n",
    )
    .await;
    let gw = start_over(backend).await;
    let req = Request::get("/")
        .header("host", "gw.test")
        .body(Full::default())
        .unwrap();
    let res = send(gw.addr, req).await.expect("a whole answer");
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(&res.body()[..], b"abcdef");
}

/// A backend's answer with its `Content-Length` twice (or as a list, `2, 2`), which
/// hyper's client takes when the values agree: relayed as it came, hyper's server could
/// not encode the answer to a `HEAD` ("user sent unexpected header") and closed the
/// client's connection without one, and a `GET` got the list. Both get one
/// `Content-Length: 2` now.
#[tokio::test]
async fn a_repeated_content_length_is_relayed_once() {
    for lines in [
        "Content-Length: 2\r\nContent-Length: 2",
        "Content-Length: 2, 2",
    ] {
        for method in [hyper::Method::HEAD, hyper::Method::GET] {
            let body = if method == hyper::Method::HEAD {
                ""
            } else {
                "ok"
            };
            let answer = format!("HTTP/1.1 200 OK\r\n{lines}\r\n\r\n{body}");
            let (backend, _backend) = raw_backend(answer.leak().as_bytes()).await;
            let gw = start_over(backend).await;
            let req = Request::builder()
                .method(method.clone())
                .uri("/")
                .header("host", "gw.test")
                .body(Full::default())
                .unwrap();
            let res = send(gw.addr, req)
                .await
                .unwrap_or_else(|e| panic!("{method} with {lines:?}: no answer: {e}"));
            assert_eq!(res.status(), StatusCode::OK, "{method} with {lines:?}");
            let lengths: Vec<_> = res.headers().get_all("content-length").iter().collect();
            assert_eq!(lengths, ["2"], "{method} with {lines:?}");
            assert_eq!(res.body(), body, "{method} with {lines:?}");
        }
    }
}

/// The request heads [`keep_alive_backend`] read, lower-cased, each with the number of
/// its connection (from 0, in the order accepted).
type Heads = Arc<Mutex<Vec<(usize, String)>>>;

/// The answer [`keep_alive_backend`] sends as the body of a `204`, in a write of its own.
const SMUGGLED: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled";

/// A raw keep-alive backend that reads requests off each connection's bytes as a lenient
/// server does (a head up to its blank line, then `Content-Length` bytes of body; one
/// connection after another), and answers each `200` with its path as the body, but:
///
/// - `/expect` with `Expect: 100-continue`: `401` once the body's bytes are in, without
///   reading them, which are taken as the start of the connection's next request (a
///   server that answers an expectation early and takes the body as never sent);
/// - `/no-content`: `204` with a `Content-Length` of [`SMUGGLED`], which follows in a
///   write of its own when the next request head on the connection has come in, before
///   that request's answer (a backend writing a body after a `204`'s head);
/// - `/clte`: `200` with both a `Transfer-Encoding: chunked` and a `Content-Length` of
///   5 more than [`SMUGGLED`]'s, the chunked body empty (`0\r\n\r\n`), and
///   [`SMUGGLED`] after it as `/no-content` has it (the bytes the length says are left:
///   response splitting, by a backend or what it relays).
///
/// Every head read goes into the returned [`Heads`].
async fn keep_alive_backend() -> (SocketAddr, Heads, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Heads::default();
    let log = Arc::clone(&heads);
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        for n in 0.. {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let log = Arc::clone(&log);
            conns.spawn(async move {
                let mut buf = Vec::new();
                let mut tail: Option<&[u8]> = None;
                loop {
                    let end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        if !read_more(&mut stream, &mut buf).await {
                            return;
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    buf.drain(..end);
                    log.lock().push((n, head.clone()));
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    while buf.len() < len {
                        if !read_more(&mut stream, &mut buf).await {
                            return;
                        }
                    }
                    if let Some(tail) = tail.take() {
                        stream.write_all(tail).await.unwrap();
                    }
                    let path = head.split(' ').nth(1).unwrap_or_default().to_string();
                    let answer =
                        if path == "/expect" && head.contains("\r\nexpect: 100-continue\r\n") {
                            b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n".to_vec()
                        } else if path == "/no-content" {
                            buf.drain(..len);
                            tail = Some(SMUGGLED);
                            let len = SMUGGLED.len();
                            format!("HTTP/1.1 204 No Content\r\nContent-Length: {len}\r\n\r\n")
                                .into_bytes()
                        } else if path == "/clte" {
                            buf.drain(..len);
                            tail = Some(SMUGGLED);
                            let len = 5 + SMUGGLED.len();
                            format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\
                                 Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                            )
                            .into_bytes()
                        } else {
                            buf.drain(..len);
                            let len = path.len();
                            format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n{path}")
                                .into_bytes()
                        };
                    if stream.write_all(&answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, heads, task)
}

/// Reads what `stream` has into `buf`; false at its end (or an error).
async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0; 4096];
    match stream.read(&mut chunk).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

/// Sends `req` (to `path`) as a second client and asserts that it gets its own answer
/// (the keep-alive backend answers with the path it read); returns the heads the
/// backend read.
async fn second_client_gets_its_own_answer(
    addr: SocketAddr,
    req: hyper::http::request::Builder,
    path: &str,
    heads: &Heads,
) -> Vec<(usize, String)> {
    let res = send(addr, req.body(Full::default()).unwrap())
        .await
        .unwrap();
    let heads = heads.lock().clone();
    assert_eq!(
        res.body(),
        path,
        "the second client's own answer; the backend read: {heads:#?}"
    );
    heads
}

/// After an answer whose connection must not be reused, to the request `first` (method
/// and path, lower-cased): a pause that lets the pool have the connection back, then a
/// second client's `GET /next`, which gets its own answer, on another connection.
async fn next_client_not_on_the_connection_of(addr: SocketAddr, heads: &Heads, first: &str) {
    sleep(Duration::from_millis(100)).await;
    let req = Request::get("/next").header("host", "gw");
    let heads = second_client_gets_its_own_answer(addr, req, "/next", heads).await;
    assert_ne!(
        conn_of(&heads, "get /next"),
        conn_of(&heads, first),
        "{heads:#?}"
    );
}

/// The number of the connection [`keep_alive_backend`] read the request `start` (method
/// and path, lower-cased) on.
fn conn_of(heads: &[(usize, String)], start: &str) -> usize {
    heads
        .iter()
        .find(|(_, head)| head.starts_with(&format!("{start} ")))
        .unwrap_or_else(|| panic!("no {start}: {heads:#?}"))
        .0
}

/// A backend that answered `204` with a `Content-Length` and wrote the body it must not
/// have in a write of its own, after the next request on the connection (hyper's client
/// had it back in the pool at the end of the head), had that body read as the next
/// request's answer: another client got an answer of the backend's choosing. A `204`
/// that says it has a body is `502` now, and its connection is not reused.
///
/// Paused clock over loopback, as below.
#[tokio::test(start_paused = true)]
async fn a_204_saying_it_has_a_body_is_502_and_its_connection_is_not_reused() {
    let (backend, heads, _backend) = keep_alive_backend().await;
    let mut cfg = config_over(backend);
    cfg.health_interval = Duration::MAX; // one round at start-up
    let gw = start(&cfg).await;

    assert_eq!(
        status_of(gw.addr, "/no-content").await,
        StatusCode::BAD_GATEWAY
    );
    next_client_not_on_the_connection_of(gw.addr, &heads, "get /no-content").await;
}

/// A backend's answer with both a `Content-Length` and a `Transfer-Encoding: chunked`
/// (RFC 9112 §6.3: a sign of response splitting, which "ought to be handled as an
/// error") was relayed framed by the chunked coding, and its connection went back to
/// the pool with the bytes past that framing still to come: written after the next
/// request on the connection, they were read as that request's answer, and another
/// client got an answer of the backend's choosing. The answer is still relayed (the
/// `Content-Length` removed, as before), and its connection is not reused.
///
/// Paused clock over loopback, as below.
#[tokio::test(start_paused = true)]
async fn an_answer_with_a_content_length_and_chunked_does_not_leave_its_connection_pooled() {
    let (backend, heads, _backend) = keep_alive_backend().await;
    let mut cfg = config_over(backend);
    cfg.health_interval = Duration::MAX; // one round at start-up
    let gw = start(&cfg).await;

    let req = Request::get("/clte")
        .header("host", "gw")
        .body(Full::default())
        .unwrap();
    let res = send(gw.addr, req).await.expect("the answer relayed");
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.body().is_empty(), "{:?}", res.body());
    assert!(res.headers().get("content-length").is_none_or(|v| v == "0"));
    next_client_not_on_the_connection_of(gw.addr, &heads, "get /clte").await;
}

/// A request's `Expect: 100-continue` was forwarded, though the gateway answers the
/// client `100 Continue` itself and sends the body at once. A backend that answered such
/// a request early (`401`) and took the body as never sent read the body as its next
/// request, and as the body had all gone out before the answer, the pool kept the
/// connection: a request written as a body (`GET /admin`) reached the backend past the
/// gateway's rules, took the next client's request on that connection in as a header,
/// and that client, its cookie gone to the smuggled request, got its answer. The
/// backend never sees `Expect` now, and reads the body as a body.
///
/// Paused clock over loopback: a write is in the peer's socket when the syscall
/// returns, so every socket event is seen before the clock moves, and the pause before
/// the second request lets the pool have the connection back.
#[tokio::test(start_paused = true)]
async fn expect_100_continue_is_not_forwarded_so_a_body_cannot_smuggle_a_request() {
    let (backend, heads, _backend) = keep_alive_backend().await;
    let mut cfg = config_over(backend);
    cfg.health_interval = Duration::MAX; // one round at start-up
    let gw = start(&cfg).await;

    let smuggled = b"GET /admin HTTP/1.1\r\nHost: internal\r\nX-Ignore: ";
    let mut req = format!(
        "POST /expect HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        smuggled.len()
    )
    .into_bytes();
    req.extend_from_slice(smuggled);
    let mut first = TcpStream::connect(gw.addr).await.unwrap();
    first.write_all(&req).await.unwrap();
    sleep(Duration::from_millis(100)).await;

    let req = Request::get("/victim")
        .header("host", "gw")
        .header("cookie", "session=victim");
    let heads = second_client_gets_its_own_answer(gw.addr, req, "/victim", &heads).await;
    assert!(
        heads.iter().all(|(_, head)| !head.contains("\r\nexpect:")),
        "{heads:#?}"
    );
    assert_eq!(
        conn_of(&heads, "get /victim"),
        conn_of(&heads, "post /expect"),
        "on the first request's (pooled) connection: {heads:#?}"
    );
    let mut buf = [0; 4096];
    let n = first.read(&mut buf).await.unwrap();
    let out = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
    assert!(out.starts_with("http/1.1 100 continue\r\n\r\n"), "{out}");
    assert!(out.ends_with("\r\n\r\n/expect"), "read as a body: {out}");
}

#[tokio::test]
async fn only_origin_form_targets_reach_a_backend() {
    let b0 = Backend::start().await;
    // `GET *` once made the backend URI `http://127.0.0.1:PORT*`, whose port does not
    // parse, and hyper-util's connector went to port 80 of the backend's host. Watch that
    // port when it can be bound (it needs root), and count what it accepts.
    let port80 = Arc::new(AtomicUsize::new(0));
    let _watch = match TcpListener::bind("127.0.0.1:80").await {
        Ok(listener) => {
            let port80 = Arc::clone(&port80);
            Some(tokio::spawn(async move {
                while listener.accept().await.is_ok() {
                    port80.fetch_add(1, Ordering::SeqCst);
                }
            }))
        }
        Err(e) => {
            eprintln!("not watching 127.0.0.1:80: {e}");
            None
        }
    };
    let gw = start(&config(&[&b0])).await;

    let out = raw(
        gw.addr,
        b"GET * HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "GET *: {out}");

    let out = raw(
        gw.addr,
        b"OPTIONS * HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "OPTIONS *: {out}");
    assert!(out.to_ascii_lowercase().contains("\r\nallow: "), "{out}");

    let connect = format!(
        "CONNECT {0} HTTP/1.1\r\nHost: {0}\r\nConnection: close\r\n\r\n",
        b0.addr
    );
    let out = raw(gw.addr, connect.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 405"), "CONNECT: {out}");
    assert!(out.to_ascii_lowercase().contains("\r\nallow: "), "{out}");

    let out = raw(
        gw.addr,
        b"GET http://other.test/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "absolute-form: {out}");

    assert_eq!(b0.hits(), 0, "no refused target reached the backend");
    assert_eq!(port80.load(Ordering::SeqCst), 0, "nothing went to port 80");
    assert_eq!(get(gw.addr).await.status(), StatusCode::OK, "origin-form");
}

/// `TRACE` and `OPTIONS` with `Max-Forwards: 0` were forwarded, where RFC 9110 §7.6.2
/// has the recipient answer them itself, and decrement the value otherwise. `TRACE` is
/// now refused (`405`: it echoes the request, credentials included, to whoever can read
/// the answer: cross-site tracing); `OPTIONS` with `Max-Forwards: 0` is answered by the
/// gateway, with a greater value forwarded one less, with one that is not a number
/// refused (`400`). Other methods' `Max-Forwards` is left alone (RFC 9110 §7.6.2: it may
/// be ignored).
#[tokio::test]
async fn trace_is_405_and_options_with_max_forwards_zero_is_answered_by_the_gateway() {
    let b0 = Backend::start().await;
    let gw = start(&config(&[&b0])).await;
    let options = |max_forwards: &str| {
        format!(
            "OPTIONS /x HTTP/1.1\r\nHost: gw\r\nMax-Forwards: {max_forwards}\r\n\
             Connection: close\r\n\r\n"
        )
    };
    let out = raw(gw.addr, options("0").as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(
        out.to_ascii_lowercase().contains("\r\nallow: get, "),
        "{out}"
    );
    let out = raw(gw.addr, options("x1").as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    for trace in [
        "TRACE / HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
        "TRACE / HTTP/1.1\r\nHost: gw\r\nMax-Forwards: 0\r\nConnection: close\r\n\r\n",
    ] {
        let out = raw(gw.addr, trace.as_bytes()).await;
        assert!(out.starts_with("HTTP/1.1 405"), "{out}");
        let allow = out
            .to_ascii_lowercase()
            .lines()
            .find_map(|l| l.strip_prefix("allow: ").map(str::to_owned))
            .unwrap_or_else(|| panic!("no Allow: {out}"));
        assert!(!allow.contains("trace"), "{out}");
    }
    assert_eq!(b0.hits(), 0, "none reached the backend");

    let out = raw(gw.addr, options("3").as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(b0.hits(), 1);
    let seen = b0.seen.last_headers.lock().clone().unwrap();
    assert_eq!(seen["max-forwards"], "2", "one less");
    let out = raw(
        gw.addr,
        b"GET / HTTP/1.1\r\nHost: gw\r\nMax-Forwards: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let seen = b0.seen.last_headers.lock().clone().unwrap();
    assert_eq!(seen["max-forwards"], "0", "another method's is left alone");
}

// ---------------------------------------------------------------------------------
// Connection layers: rate limit, slowloris
// ---------------------------------------------------------------------------------

/// The controller's P95 is read from a recorder of this test's own (one thread: the
/// gateway's tasks, the controller's included, record into it): a `431` never reaches
/// the measurement, which the rate alone cannot show (it starts at its maximum, where
/// fast samples only hold it).
#[test]
fn slow_backends_make_the_controller_lower_the_per_client_rate() {
    aegis_core::metrics::testing::run_watching(false, |snap| async move {
        slow_backends_lower_the_rate(&snap).await;
    });
}

async fn slow_backends_lower_the_rate(snap: &Snapshotter) {
    let b0 = Backend::start().await;
    b0.seen.delay_ms.store(60, Ordering::SeqCst);
    let mut cfg = config(&[&b0]);
    cfg.per_client_rate = NonZeroU32::new(1_000).unwrap();
    cfg.latency_target = Duration::from_millis(20);
    cfg.control_interval = Duration::from_millis(300);
    cfg.control_min_samples = 3;
    let gw = start(&cfg).await;
    let interval = |gw: &Gateway| gw.rate.per_client().unwrap().replenish_interval();
    assert_eq!(interval(&gw), Duration::from_millis(1), "starts at 1000/s");

    // Requests the gateway refuses (431) never reach the measurement: over two control
    // intervals of them, the controller measured no P95 (it sets the gauge whenever it
    // has `control_min_samples`).
    let deadline = Instant::now() + Duration::from_millis(700);
    while Instant::now() < deadline {
        let req = Request::get("/")
            .header("x-big", "z".repeat(9000))
            .body(Full::default())
            .unwrap();
        assert_eq!(
            send(gw.addr, req).await.unwrap().status(),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
    }
    assert_eq!(
        gauge(snap, ADAPTIVE_P95_SECONDS),
        None,
        "the 431s were latency samples"
    );
    assert_eq!(
        interval(&gw),
        Duration::from_millis(1),
        "no backend latency yet"
    );

    // 60 ms answers against a 20 ms target, to several clients (one client's tail is
    // its own: `one_client_asking_for_a_slow_url_does_not_lower_everyones_rate`):
    // 1000/s × 0.8 at the next decision.
    let deadline = Instant::now() + WAIT;
    for from in CLIENTS.iter().cycle() {
        if interval(&gw) != Duration::from_millis(1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the controller never lowered the rate"
        );
        let out = raw_get_from(from, gw.addr).await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    }
    assert_eq!(interval(&gw), Duration::from_micros(1250), "800/s");
    assert!(
        (gw.control.value() - 800.0).abs() < 1e-9,
        "{}",
        gw.control.value()
    );
    // The recorder sees the controller: the P95 it lowered the rate on is the backend's.
    let p95 = gauge(snap, ADAPTIVE_P95_SECONDS).expect("a P95 was measured");
    assert!(p95 > cfg.latency_target.as_secs_f64(), "P95 {p95} s");
}

#[tokio::test]
async fn a_hung_backend_makes_the_controller_lower_the_per_client_rate() {
    let b0 = Backend::start().await;
    b0.seen.delay_ms.store(2_000, Ordering::SeqCst);
    let mut cfg = config(&[&b0]); // breaker_failures: 1000, the 504s leave it closed
    cfg.per_client_rate = NonZeroU32::new(1_000).unwrap();
    cfg.backend_timeout = Duration::from_millis(100);
    cfg.latency_target = Duration::from_millis(50);
    cfg.control_interval = Duration::from_millis(300);
    cfg.control_min_samples = 3;
    let gw = start(&cfg).await;

    // Every answer is the gateway's 504: each one a sample of 100 ms, the backend's
    // timeout, against a 50 ms target, for several clients.
    let deadline = Instant::now() + WAIT;
    for from in CLIENTS.iter().cycle() {
        if gw.control.value() < 1_000.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the controller never heard of the hung backend"
        );
        let out = raw_get_from(from, gw.addr).await;
        assert!(out.starts_with("HTTP/1.1 504"), "{out}");
    }
    assert_eq!(gw.breakers[0].state(), CircuitState::Closed);
}

/// Client addresses on the loopback: the controller lowers the rate only on a tail that
/// more than one client sees.
const CLIENTS: [&str; 8] = [
    "127.0.5.1",
    "127.0.5.2",
    "127.0.5.3",
    "127.0.5.4",
    "127.0.5.5",
    "127.0.5.6",
    "127.0.5.7",
    "127.0.5.8",
];

/// `POST /` with a 2-byte body whose second byte comes `pause` after the first; the
/// whole answer.
async fn post_split_body(addr: SocketAddr, pause: Duration) -> String {
    post_split_body_from("127.0.0.1", addr, pause).await
}

/// [`post_split_body`] from the loopback address `from`.
async fn post_split_body_from(from: &str, addr: SocketAddr, pause: Duration) -> String {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    stream
        .write_all(
            b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\nConnection: close\r\n\r\na",
        )
        .await
        .unwrap();
    sleep(pause).await; // the client's own slowness, not a wait for the gateway
    stream.write_all(b"b").await.unwrap();
    String::from_utf8_lossy(&read_to_close(&mut stream).await).into_owned()
}

#[tokio::test]
async fn a_client_sending_its_body_slowly_is_not_a_slow_backend_to_the_controller() {
    let b0 = Backend::start().await;
    let mut cfg = config(&[&b0]);
    cfg.per_client_rate = NonZeroU32::new(1_000).unwrap();
    // A fast backend's samples are a few milliseconds: only a scheduling stall of more
    // than 100 ms on a loaded machine could take one over the target.
    cfg.latency_target = Duration::from_millis(100);
    cfg.control_interval = Duration::from_millis(300);
    cfg.control_min_samples = 3;
    let gw = start(&cfg).await;
    let lowered = |gw: &Gateway| gw.control.value() < 1_000.0;
    let pause = Duration::from_millis(300); // three targets

    // A fast backend, and clients that pause three targets inside their bodies: ten
    // answers, one per control interval or so, so that some seven decisions have their
    // three samples (a measurement reaches back up to eight intervals for them).
    for from in CLIENTS.iter().cycle().take(10) {
        let out = post_split_body_from(from, gw.addr, pause).await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.ends_with("read 2 bytes"), "{out}");
        assert!(
            !lowered(&gw),
            "the clients' upload time was taken for the backend's"
        );
    }
    assert!(!lowered(&gw), "{}", gw.control.value());

    // The same requests to a backend that takes 750 ms before it reads the body: 450 ms
    // of it (four and a half targets) after the body's end, the backend's time, and the
    // controller hears of it.
    b0.seen.delay_ms.store(750, Ordering::SeqCst);
    let deadline = Instant::now() + WAIT;
    for from in CLIENTS.iter().cycle() {
        if lowered(&gw) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the controller never lowered the rate"
        );
        let out = post_split_body_from(from, gw.addr, pause).await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    }
}

/// `GET path` on the keep-alive connection `tx`; its status within [`WAIT`].
async fn get_path_on(tx: &mut SendRequest<Full<Bytes>>, path: &str) -> StatusCode {
    let req = Request::get(path)
        .header("host", "gw.test")
        .body(Full::default())
        .unwrap();
    timeout(WAIT, async {
        tx.ready().await.unwrap();
        let res = tx.send_request(req).await.unwrap();
        let status = res.status();
        res.into_body().collect().await.unwrap();
        status
    })
    .await
    .unwrap()
}

/// A reviewer: every backend answer was a latency sample, anyone's, so one client asking
/// over and over for a URL the backend is slow at made the slowest 5 % by itself: 4
/// keep-alive connections on a 0.7 s URL took the per-client rate from 20 to 2.15/s in
/// 20 s, and another client opening 8 connections a second was refused 6 of them a
/// second. Each sample is now its client's, and the P95 is taken without the client
/// holding the most of the slow ones: the rate holds. The same URL asked by several
/// clients still lowers it.
#[tokio::test]
async fn one_client_asking_for_a_slow_url_does_not_lower_everyones_rate() {
    let b0 = Backend::start().await;
    let mut cfg = config(&[&b0]);
    cfg.per_client_rate = NonZeroU32::new(1_000).unwrap();
    // A fast answer is a few milliseconds, a slow one 150 ms: three targets.
    cfg.latency_target = Duration::from_millis(50);
    cfg.control_interval = Duration::from_millis(300);
    cfg.control_min_samples = 3;
    let gw = start(&cfg).await;
    let lowered = |gw: &Gateway| gw.control.value() < 1_000.0;

    // The attacker: 4 keep-alive connections on `/slow/150` (some 26 answers a second);
    // the victim: one fast request a connection, 10 a second or so.
    let stop = Arc::new(AtomicBool::new(false));
    let mut attackers = JoinSet::new();
    for _ in 0..4 {
        let mut tx = connect_from("127.0.0.2", gw.addr).await;
        let stop = Arc::clone(&stop);
        attackers.spawn(async move {
            let mut slow = 0;
            while !stop.load(Ordering::SeqCst) {
                assert_eq!(get_path_on(&mut tx, "/slow/150").await, StatusCode::OK);
                slow += 1;
            }
            slow
        });
    }
    // Ten control intervals.
    let t0 = Instant::now();
    let mut fast = 0;
    while since(t0) < Duration::from_secs(3) {
        let out = raw_get_from("127.0.0.3", gw.addr).await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        fast += 1;
        assert!(
            !lowered(&gw),
            "one client's slow URL cut every client's rate: {} ({fast} fast answers)",
            gw.control.value()
        );
        sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let slow: usize = attackers.join_all().await.into_iter().sum();
    // The slow answers were over 5 % of the samples: unkeyed, a tail.
    assert!(slow * 19 > fast, "{slow} slow answers, {fast} fast");

    // The same URL for several clients: a tail that is no one client's.
    let deadline = Instant::now() + WAIT;
    for from in CLIENTS.iter().cycle() {
        if lowered(&gw) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a URL slow for every client never lowered the rate"
        );
        let mut tx = connect_from(from, gw.addr).await;
        assert_eq!(get_path_on(&mut tx, "/slow/150").await, StatusCode::OK);
    }
}

/// A client sent its body's last byte just before the response timeout, and the backend
/// needed 300 ms after it: one deadline bounded both, so the backend was left the few
/// milliseconds the client had not used, answered `504`, and its breaker counted the
/// client's slowness as its failure (one address could open every backend's breaker).
/// The backend now has the whole timeout of its own time.
#[tokio::test(start_paused = true)]
async fn a_body_finished_just_before_the_timeout_leaves_the_backend_its_own_time() {
    let b0 = Backend::start().await;
    b0.seen.after_body_ms.store(300, Ordering::SeqCst);
    let mut cfg = config(&[&b0]);
    cfg.health_interval = Duration::MAX; // one round at start-up
    cfg.breaker_failures = 1;
    cfg.backend_timeout = Duration::from_secs(2);
    let gw = start(&cfg).await;
    let out = post_split_body(gw.addr, Duration::from_millis(1900)).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.ends_with("read 2 bytes"), "{out}");
    assert_eq!(gw.breakers[0].state(), CircuitState::Closed);

    // The backend's own time is still bounded: 2.1 s after a body sent at once.
    b0.seen.after_body_ms.store(2_100, Ordering::SeqCst);
    let out = post_split_body(gw.addr, Duration::ZERO).await;
    assert!(out.starts_with("HTTP/1.1 504"), "{out}");
    assert_eq!(gw.breakers[0].state(), CircuitState::Open);
}

/// The same on the half-open breaker's probe: a body finished just before the probe's
/// stall check left the backend the second before the probe timeout, and the breaker
/// counted the probe failed and re-opened. The probe now ends as the client's stall.
/// (The gateway reads a probe's body before the call: this is the backstop, tested on
/// the backend's client without the proxy.)
#[tokio::test(start_paused = true)]
async fn a_probe_whose_body_took_its_window_does_not_reopen_the_breaker() {
    let b0 = Backend::start().await;
    let open_for = Duration::from_secs(5); // the probe's stall check at 4 s
    let (backend, breaker) = half_open_upstream(open_for, Duration::from_secs(10)).await;

    // The probe: its body's last byte at 3.9 s, then 1.5 s of the backend's time.
    b0.seen.after_body_ms.store(1_500, Ordering::SeqCst);
    let (req, tx) = post_streamed(&b0, 2);
    tx.send(Bytes::from_static(b"a")).await.unwrap();
    let probe = tokio::spawn(tower::ServiceExt::oneshot(backend.clone(), req));
    sleep(Duration::from_millis(3900)).await;
    tx.send(Bytes::from_static(b"b")).await.unwrap();
    drop(tx);
    let res = probe.await.unwrap();
    assert_ne!(
        breaker.state(),
        CircuitState::Open,
        "the client's time failed the probe"
    );
    assert!(stalled(&res), "{:?}", res.map(|r| r.status()));
    b0.seen.after_body_ms.store(0, Ordering::SeqCst);
    assert_eq!(
        get_through(&b0, &backend).await,
        StatusCode::OK,
        "the next probe"
    );
    assert_eq!(breaker.state(), CircuitState::Closed);
}

#[tokio::test]
async fn the_client_address_comes_from_a_trusted_proxy_header_only() {
    let b0 = Backend::start().await;
    let proxied = b"PROXY TCP4 203.0.113.9 127.0.0.1 5555 80\r\n\
        GET / HTTP/1.1\r\nHost: gw\r\nX-Forwarded-For: 6.6.6.6\r\nConnection: close\r\n\r\n";

    // Trusted: the header's source is the client.
    let mut cfg = config(&[&b0]);
    cfg.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
    let gw = start(&cfg).await;
    let out = raw(gw.addr, proxied).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let seen = b0.seen.last_headers.lock().take().unwrap();
    assert_eq!(seen["x-forwarded-for"], "203.0.113.9");

    // Not trusted: the PROXY layer is on, but for other networks. This peer is passed on
    // unread, and its PROXY line is its request line, never believed: hyper refuses it.
    let mut cfg = config(&[&b0]);
    cfg.trusted_proxies = vec!["10.0.0.0/8".parse().unwrap()];
    let gw = start(&cfg).await;
    let out = raw(gw.addr, proxied).await;
    assert!(out.starts_with("HTTP/1.1 400 "), "{out}");
    assert!(
        b0.seen.last_headers.lock().is_none(),
        "the request never reached the backend"
    );
    // Without a PROXY header the same peer is served as itself.
    let out = raw(
        gw.addr,
        b"GET / HTTP/1.1\r\nHost: gw\r\nX-Forwarded-For: 6.6.6.6\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let seen = b0.seen.last_headers.lock().take().unwrap();
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
}

#[tokio::test]
async fn a_per_ip_burst_beyond_the_rate_is_refused() {
    let b0 = Backend::start().await;
    let mut cfg = config(&[&b0]);
    cfg.per_client_rate = NonZeroU32::new(1).unwrap();
    cfg.per_client_burst = NonZeroU32::new(3).unwrap();
    let gw = start(&cfg).await;
    let quota = gw.rate.per_client().expect("per-client tier on");
    assert_eq!(
        quota.burst_size().get(),
        3,
        "the controller keeps the burst"
    );

    for i in 0..3 {
        assert_eq!(
            get(gw.addr).await.status(),
            StatusCode::OK,
            "connection {i}"
        );
    }
    let req = Request::get("/")
        .header("host", "gw")
        .body(Full::default())
        .unwrap();
    let refused = send(gw.addr, req).await;
    let err = refused.expect_err("the 4th connection within a second is served");
    assert!(
        closed_by_peer(&*err),
        "the 4th connection within a second is not closed by the gateway: {err:?}"
    );
    assert_eq!(b0.hits(), 3);
    let mut other = connect_from("127.0.0.2", gw.addr).await;
    assert_eq!(
        get_on(&mut other).await.unwrap(),
        StatusCode::OK,
        "another address is served meanwhile"
    );
    assert_eq!(b0.hits(), 4);
}

/// Whether `err`, from a request on a connection that was accepted, says the peer closed
/// or reset it: not a refused connect (the gateway gone), not a timeout (a hung one).
fn closed_by_peer(err: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionReset, UnexpectedEof};
    let mut source = Some(err);
    while let Some(e) = source {
        if let Some(e) = e.downcast_ref::<hyper::Error>()
            && (e.is_incomplete_message() || e.is_canceled())
        {
            return true;
        }
        if let Some(e) = e.downcast_ref::<std::io::Error>()
            && matches!(e.kind(), ConnectionReset | BrokenPipe | UnexpectedEof)
        {
            return true;
        }
        source = e.source();
    }
    false
}

#[tokio::test]
async fn one_address_cannot_hold_more_connections_than_its_cap() {
    let b0 = Backend::start().await;
    assert_eq!(
        config(&[&b0]).max_connections_per_client.get(),
        64,
        "default"
    );
    let mut cfg = config(&[&b0]);
    cfg.max_connections_per_client = NonZeroU32::new(2).unwrap();
    let gw = start(&cfg).await;
    assert_eq!(gw.rate.max_concurrent_per_client(), Some(2));

    // Two keep-alive connections from 127.0.0.1, held open.
    let mut held = Vec::new();
    for i in 0..2 {
        let mut tx = connect_from("127.0.0.1", gw.addr).await;
        assert_eq!(
            get_on(&mut tx).await.unwrap(),
            StatusCode::OK,
            "connection {i}"
        );
        held.push(tx);
    }
    let mut third = connect_from("127.0.0.1", gw.addr).await;
    let refused = get_on(&mut third).await;
    assert!(refused.is_err(), "the third is closed: {refused:?}");
    let mut other = connect_from("127.0.0.2", gw.addr).await;
    assert_eq!(
        get_on(&mut other).await.unwrap(),
        StatusCode::OK,
        "another address is served meanwhile"
    );
    assert_eq!(b0.hits(), 3);

    // Closing one gives its slot back.
    held.pop();
    let deadline = Instant::now() + WAIT;
    loop {
        let mut tx = connect_from("127.0.0.1", gw.addr).await;
        if get_on(&mut tx).await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "the slot was never given back");
        sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_partial_request_line_is_cut_by_hypers_header_timeout() {
    let b0 = Backend::start().await;
    let mut cfg = config(&[&b0]);
    cfg.header_read_timeout = Duration::from_millis(500);
    cfg.handshake_timeout = Duration::from_secs(60); // only hyper's clock can cut
    let gw = start(&cfg).await;
    // Before the connect: hyper's clock starts after the accept, so the cut comes at
    // least 500 ms after this (a timer never fires before its deadline).
    let t0 = Instant::now();
    raw(gw.addr, b"GET / HT").await;
    let took = since(t0);
    assert!(
        took >= Duration::from_millis(500),
        "cut by the timeout, not at once: {took:?}"
    );
    assert_eq!(b0.hits(), 0);
}

#[tokio::test]
async fn a_header_read_timeout_of_duration_max_serves_requests() {
    let b0 = Backend::start().await;
    let mut cfg = config(&[&b0]);
    cfg.header_read_timeout = Duration::MAX; // "never": hyper adds it to an Instant
    let gw = start(&cfg).await;
    assert_eq!(get(gw.addr).await.status(), StatusCode::OK);
    assert_eq!(get(gw.addr).await.status(), StatusCode::OK, "and again");
}

/// `GET /` on `stream`, kept alive; what came back, up to the end of the test backend's
/// answer or the connection's close.
async fn get_kept_alive(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    if stream
        .write_all(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .is_err()
    {
        return String::new();
    }
    let mut buf = [0; 4096];
    while !out.ends_with(b"read 0 bytes") {
        match timeout(WAIT, stream.read(&mut buf)).await {
            Err(_) => panic!("no answer and no close after {WAIT:?}; got {out:?}"),
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// hyper starts its header read clock whenever it waits for a request head, after a
/// response on a keep-alive connection too: an idle keep-alive connection is closed at
/// `header_read_timeout` (11 s by default), long before the slowloris `idle_timeout`
/// (75 s), which bounds silence within a request only. The defaults are checked, and
/// the cut is timed on the paused clock (a write over loopback is in the peer's socket
/// when the syscall returns, so every socket event is seen before the clock moves).
#[tokio::test(start_paused = true)]
async fn an_idle_keep_alive_connection_is_closed_at_the_header_read_timeout() {
    let b0 = Backend::start().await;
    let mut cfg = config(&[&b0]);
    cfg.health_interval = Duration::MAX; // one round at start-up
    let defaults = Config::new(Vec::new());
    assert_eq!(cfg.header_read_timeout, defaults.header_read_timeout);
    assert_eq!(cfg.idle_timeout, defaults.idle_timeout);
    let limit = cfg.header_read_timeout;
    assert_eq!(limit, Duration::from_secs(11));
    assert!(cfg.idle_timeout > 2 * limit, "{:?}", cfg.idle_timeout);
    assert!(
        defaults.handshake_timeout <= limit,
        "the slowloris handshake deadline would never fire before hyper's"
    );
    let gw = start(&cfg).await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    let out = get_kept_alive(&mut stream).await;
    assert!(out.starts_with("HTTP/1.1 200"), "first: {out}");

    // Silence just short of the limit: the connection serves the next request.
    sleep(limit - Duration::from_secs(1)).await;
    let out = get_kept_alive(&mut stream).await;
    assert!(out.starts_with("HTTP/1.1 200"), "after {:?}: {out}", limit);

    // Silence just past it: closed, without an answer.
    let t0 = Instant::now();
    sleep(limit + Duration::from_secs(1)).await;
    let out = get_kept_alive(&mut stream).await;
    assert!(
        out.is_empty(),
        "answered after {:?} of silence: {out}",
        since(t0)
    );
    assert_eq!(b0.hits(), 2);
}

#[tokio::test]
async fn a_trickled_request_is_cut_by_the_slowloris_total_deadline() {
    let b0 = Backend::start().await;
    let mut cfg = config(&[&b0]);
    cfg.header_read_timeout = Duration::from_secs(60); // only the slowloris clock can cut
    cfg.handshake_timeout = Duration::from_millis(800);
    cfg.slowloris_jitter = Duration::ZERO; // cut at the deadline, not up to 50 ms before
    let gw = start(&cfg).await;
    // Before the connect: the total clock starts after the accept, so the cut comes at
    // least 800 ms after this (a timer never fires before its deadline).
    let t0 = Instant::now();
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    // One byte every 100 ms: an idle clock would never fire.
    let mut cut = false;
    for b in b"GET / HTTP/1.1\r\nHost: gw\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
        if stream.write_all(&[*b]).await.is_err() {
            cut = true;
            break;
        }
        sleep(Duration::from_millis(100)).await;
        if since(t0) > Duration::from_secs(3) {
            break;
        }
    }
    if !cut {
        read_to_close(&mut stream).await;
    }
    let took = since(t0);
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(3),
        "cut at the 800 ms total deadline: {took:?}"
    );
    assert_eq!(b0.hits(), 0);
}

/// Timed on the paused clock, as the keep-alive test above: the cut comes exactly at
/// the first-byte deadline, not merely after it.
#[tokio::test(start_paused = true)]
async fn a_silent_client_is_cut_by_the_first_byte_timeout() {
    let b0 = Backend::start().await;
    let mut cfg = config(&[&b0]);
    cfg.health_interval = Duration::MAX; // one round at start-up
    cfg.header_read_timeout = Duration::from_secs(60);
    cfg.handshake_timeout = Duration::from_secs(60);
    cfg.first_byte_timeout = Duration::from_millis(300);
    cfg.slowloris_jitter = Duration::ZERO; // cut at the deadline, not up to 50 ms before
    let gw = start(&cfg).await;
    // The clock does not move between the connect and the gateway's accept (a loopback
    // connect is in the listener's queue when it returns): the first-byte clock starts
    // at t0.
    let t0 = Instant::now();
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    let out = read_to_close(&mut stream).await;
    let took = since(t0);
    assert!(out.is_empty(), "closed without an answer: {out:?}");
    assert_eq!(took, Duration::from_millis(300));
}

// ---------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------

/// Runs `f` on a current-thread runtime that records into a Prometheus recorder of its
/// own, the gateway's (`metrics_http::recorder`), whose handle `f` gets: what `--metrics`
/// installs, but local to this thread (the gateway's tasks run on it), so that the tests
/// running beside record elsewhere.
fn with_prometheus<F: std::future::Future<Output = ()>>(f: impl FnOnce(PrometheusHandle) -> F) {
    with_prometheus_on(false, f);
}

/// [`with_prometheus`] on tokio's paused clock (`start_paused`).
fn with_prometheus_paused<F: std::future::Future<Output = ()>>(
    f: impl FnOnce(PrometheusHandle) -> F,
) {
    with_prometheus_on(true, f);
}

fn with_prometheus_on<F: std::future::Future<Output = ()>>(
    paused: bool,
    f: impl FnOnce(PrometheusHandle) -> F,
) {
    let recorder = metrics_http::recorder().build_recorder();
    let handle = recorder.handle();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(paused)
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || rt.block_on(f(handle)));
}

/// The gateway's `/metrics` endpoint over `prometheus`, on a loopback port.
async fn serve_metrics(prometheus: PrometheusHandle) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(metrics_http::serve(listener, prometheus));
    addr
}

/// One scrape of `GET /metrics` at `addr`: the Prometheus text.
async fn scrape(addr: SocketAddr) -> String {
    let req = Request::get("/metrics")
        .header("host", "metrics")
        .body(Full::default())
        .unwrap();
    let res = send(addr, req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    String::from_utf8(res.body().to_vec()).unwrap()
}

/// The value of `series` (its name and labels as rendered) in the scrape `text`, if any.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Every sample of the counter `name` in `text` whose labels start with `labels` (as
/// rendered, `layer="http",` say), by the value of its `reason` label.
fn by_reason(text: &str, name: &str, labels: &str) -> BTreeMap<String, u64> {
    let prefix = format!("{name}{{{labels}reason=\"");
    text.lines()
        .filter_map(|l| {
            let (reason, value) = l.strip_prefix(&prefix)?.split_once("\"} ")?;
            Some((reason.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// An idle keep-alive connection, closed by hyper's header read timeout after its
/// requests were served, ended as an error: `aegis_connections_total{outcome="error"}`
/// and a `connection failed ... reason="unexpected"` log for every browser connection
/// left idle past the timeout. It is a connection that ended well now (`ok`). The first
/// request's head cut by hyper's timeout (here the only clock, the slowloris deadline
/// being far later) is a refusal: `rejected`, counted `header_timeout` as `aegis-layers`'
/// `sniff::Http1` counts it.
///
/// Paused clock over loopback, as the keep-alive test above.
#[test]
fn an_idle_keep_alive_connection_ends_ok_and_a_first_head_past_hypers_timeout_is_refused() {
    with_prometheus_paused(|prometheus| async move {
        let b0 = Backend::start().await;
        let mut cfg = config(&[&b0]);
        cfg.health_interval = Duration::MAX; // one round at start-up
        let gw = start(&cfg).await;
        let endpoint = serve_metrics(prometheus).await;
        let limit = cfg.header_read_timeout;

        // Two requests, then silence: closed at the header read timeout.
        let mut stream = TcpStream::connect(gw.addr).await.unwrap();
        for i in 0..2 {
            let out = get_kept_alive(&mut stream).await;
            assert!(out.starts_with("HTTP/1.1 200"), "request {i}: {out}");
        }
        sleep(limit + Duration::from_secs(1)).await;
        let out = read_to_close(&mut stream).await;
        assert!(out.is_empty(), "closed without an answer: {out:?}");

        // A first request head cut by hyper's clock alone.
        let mut cfg = config(&[&b0]);
        cfg.health_interval = Duration::MAX;
        cfg.header_read_timeout = Duration::from_secs(2);
        cfg.handshake_timeout = Duration::from_secs(60); // only hyper's clock can cut
        let slow = start(&cfg).await;
        let mut stream = TcpStream::connect(slow.addr).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: gw\r\n")
            .await
            .unwrap();
        let out = read_to_close(&mut stream).await;
        assert!(out.is_empty(), "closed without an answer: {out:?}");

        let text = scrape(endpoint).await;
        // Registered at start: 0 until counted.
        let series = |s: &str| sample(&text, s).unwrap_or(0.0);
        assert_eq!(
            series(r#"aegis_connections_total{outcome="error"}"#),
            0.0,
            "/metrics:\n{text}"
        );
        assert_eq!(
            series(r#"aegis_connections_total{outcome="ok"}"#),
            1.0,
            "/metrics:\n{text}"
        );
        assert_eq!(
            series(r#"aegis_connections_total{outcome="rejected"}"#),
            1.0,
            "/metrics:\n{text}"
        );
        assert_eq!(
            series(r#"aegis_rejections_total{layer="http",reason="header_timeout"}"#),
            1.0,
            "/metrics:\n{text}"
        );
        assert_eq!(b0.hits(), 2);
    });
}

/// With the defaults, a slow first request head must be cut by the slowloris handshake
/// deadline and counted there (`aegis_rejections_total{layer="slowloris",
/// reason="total"}`). hyper's header read timeout was as long, 10 s: both clocks start at
/// the accept, and with a jitter draw of zero they fired together; hyper's future, polled
/// first inside the slowloris one, then ended the connection with its own timeout, an
/// error (a refusal since). hyper's timeout now has a margin over the deadline.
///
/// The jitter is set to zero here, a draw the defaults can make: the tie the margin
/// must break. Paused clock over loopback, as above.
#[test]
fn a_slow_first_head_is_cut_by_the_slowloris_deadline_not_hypers_timeout() {
    with_prometheus_paused(|prometheus| async move {
        let b0 = Backend::start().await;
        let mut cfg = config(&[&b0]);
        cfg.health_interval = Duration::MAX; // one round at start-up
        let defaults = Config::new(Vec::new());
        assert_eq!(cfg.header_read_timeout, defaults.header_read_timeout);
        assert_eq!(cfg.handshake_timeout, defaults.handshake_timeout);
        cfg.slowloris_jitter = Duration::ZERO;
        let gw = start(&cfg).await;
        let endpoint = serve_metrics(prometheus).await;

        let t0 = Instant::now();
        let mut stream = TcpStream::connect(gw.addr).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: gw\r\n")
            .await
            .unwrap();
        sleep(cfg.handshake_timeout - Duration::from_secs(1)).await;
        let out = read_to_close(&mut stream).await;
        assert!(out.is_empty(), "closed without an answer: {out:?}");
        assert_eq!(since(t0), cfg.handshake_timeout, "cut at the deadline");

        let text = scrape(endpoint).await;
        let series = |s: &str| sample(&text, s).unwrap_or(0.0);
        for (s, n) in [
            (
                r#"aegis_rejections_total{layer="slowloris",reason="total"}"#,
                1.0,
            ),
            (
                r#"aegis_rejections_total{layer="http",reason="header_timeout"}"#,
                0.0,
            ),
            (r#"aegis_connections_total{outcome="rejected"}"#, 1.0),
            (r#"aegis_connections_total{outcome="error"}"#, 0.0),
        ] {
            assert_eq!(series(s), n, "{s}: /metrics:\n{text}");
        }
    });
}

/// Each refusal of the gateway, made once or twice, read from one scrape of the
/// endpoint: counted under its own reason, exactly as often as it was made (a refusal
/// seen by two places, such as a streamed body over the limit, or a malformed body that
/// also ends its connection, is counted once), and beside the layers' own.
#[test]
fn each_refusal_is_counted_once_under_its_reason_and_served_on_metrics() {
    with_prometheus(|prometheus| async move {
        let b0 = Backend::start().await;
        let mut cfg = config(&[&b0]);
        cfg.max_body = 1024;
        cfg.limits.max_headers = 32;
        cfg.limits.max_header_bytes = 4096;
        cfg.backend_timeout = Duration::from_millis(500); // the stalled body's 408
        let gw = start(&cfg).await;
        let endpoint = serve_metrics(prometheus).await;

        let mut many = String::from("GET / HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n");
        for i in 0..40 {
            many.push_str(&format!("x-h{i}: v\r\n"));
        }
        many.push_str("\r\n");
        let big = format!(
            "GET / HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nx-big: {}\r\n\r\n",
            "z".repeat(5000)
        );
        let mut streamed =
            b"POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                .to_vec();
        for _ in 0..4 {
            streamed.extend_from_slice(b"200\r\n");
            streamed.extend_from_slice(&[b'y'; 0x200]);
            streamed.extend_from_slice(b"\r\n");
        }
        streamed.extend_from_slice(b"0\r\n\r\n");
        let requests: [(&str, &[u8], &str); 19] = [
            ("absolute-form", b"GET http://other.test/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n", "400"),
            ("asterisk-form", b"GET * HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n", "400"),
            ("OPTIONS *, answered", b"OPTIONS * HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n", "200"),
            ("CONNECT", b"CONNECT gw:443 HTTP/1.1\r\nHost: gw:443\r\nConnection: close\r\n\r\n", "405"),
            ("TRACE", b"TRACE / HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n", "405"),
            ("unknown method", b"FOO / HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n", "501"),
            ("bad Max-Forwards", b"OPTIONS / HTTP/1.1\r\nHost: gw\r\nMax-Forwards: x\r\nConnection: close\r\n\r\n", "400"),
            ("HTTP/1.0 without Host", b"GET / HTTP/1.0\r\n\r\n", "400"),
            ("no Host", b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", "400"),
            ("two Hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n", "400"),
            ("gzip, chunked", b"POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n", "501"),
            ("declared too large", b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 100000\r\nConnection: close\r\n\r\nabc", "413"),
            ("streamed too large", &streamed, "413"),
            ("malformed chunked body", b"POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nZZ\r\n", "400"),
            ("stalled body", b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 1000\r\nConnection: close\r\n\r\nabc", "408"),
            ("40 headers", many.as_bytes(), "431"),
            ("5 kB of headers", big.as_bytes(), "431"),
            ("no HTTP", b"NOT HTTP AT ALL\r\n\r\n", "400"),
            ("served", b"GET / HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n", "200"),
        ];
        for (what, req, status) in requests {
            let out = raw(gw.addr, req).await;
            // HTTP/1.1, or HTTP/1.0 to an HTTP/1.0 request.
            assert!(
                out.starts_with("HTTP/1.")
                    && out
                        .get(8..)
                        .is_some_and(|rest| rest.starts_with(&format!(" {status}"))),
                "{what}: {out}"
            );
        }
        // A head past hyper's 16 KiB read buffer: hyper answers `431` and closes, with
        // the rest of the head unread (so the answer may be lost to the reset).
        let huge = format!(
            "GET / HTTP/1.1\r\nHost: gw\r\nx-huge: {}\r\n\r\n",
            "z".repeat(20_000)
        );
        let out = raw(gw.addr, huge.as_bytes()).await;
        assert!(out.is_empty() || out.starts_with("HTTP/1.1 431"), "{out}");

        // A per-client rate of 1 with a burst of 1: the second connection is refused.
        let mut cfg = config(&[&b0]);
        cfg.per_client_rate = NonZeroU32::MIN;
        cfg.per_client_burst = NonZeroU32::MIN;
        let limited = start(&cfg).await;
        assert_eq!(get(limited.addr).await.status(), StatusCode::OK);
        let req = Request::get("/")
            .header("host", "gw")
            .body(Full::default())
            .unwrap();
        let err = send(limited.addr, req).await.expect_err("over the rate");
        assert!(closed_by_peer(&*err), "{err:?}");

        let text = scrape(endpoint).await;
        let expected = [
            ("bad_body", 1),
            ("bad_host", 3),
            ("bad_target", 2),
            ("body_stall", 1),
            ("body_too_large", 2),
            ("headers_too_large", 3),
            ("max_forwards", 1),
            ("method", 2),
            ("parse", 1),
            ("transfer_coding", 1),
            ("unknown_method", 1),
        ];
        let expected: BTreeMap<String, u64> = expected.map(|(r, n)| (r.to_string(), n)).into();
        assert_eq!(
            by_reason(&text, "aegis_rejections_total", "layer=\"http\","),
            expected,
            "/metrics:\n{text}"
        );
        let series = |s: &str| sample(&text, s);
        assert_eq!(
            series(r#"aegis_rejections_total{layer="rate_limit",reason="per_client"}"#),
            Some(1.0),
            "a layer's rejection: /metrics:\n{text}"
        );
        // hyper's refusals (the head that does not parse, the one past its buffer) and
        // the rate limit's end their connections: rejected.
        assert_eq!(
            series(r#"aegis_connections_total{outcome="rejected"}"#),
            Some(3.0),
            "/metrics:\n{text}"
        );
        assert_eq!(
            series(r#"aegis_circuit_state{name="backend0"}"#),
            Some(0.0),
            "/metrics:\n{text}"
        );
        assert!(
            text.contains("aegis_connection_duration_seconds_bucket{"),
            "a histogram, not a summary: /metrics:\n{text}"
        );
    });
}

/// A raw backend that answers by path: `/te` in a transfer coding the gateway does not
/// implement, `/garbage` with bytes that are no HTTP, `/no-content` `204` with a body,
/// `/slow` not within [`WAIT`], and `/healthz` `200`.
async fn scripted_backend() -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            conns.spawn(async move {
                let head = read_head(&mut stream).await;
                let answer: &[u8] = if head.starts_with(b"GET /te ") {
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
                } else if head.starts_with(b"GET /garbage ") {
                    b"garbage\r\n\r\n"
                } else if head.starts_with(b"GET /no-content ") {
                    b"HTTP/1.1 204 No Content
Content-Length: 5

hello"
                } else if head.starts_with(b"GET /slow ") {
                    sleep(WAIT).await;
                    b""
                } else {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                };
                let _ = stream.write_all(answer).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    (addr, task)
}

/// `GET path` on a new connection to `addr`: the status.
async fn status_of(addr: SocketAddr, path: &str) -> StatusCode {
    let req = Request::get(path)
        .header("host", "gw")
        .body(Full::default())
        .unwrap();
    send(addr, req).await.unwrap().status()
}

/// Each answer the gateway makes in place of a backend's, read from one scrape of the
/// endpoint, under its own reason in `aegis_http_backend_errors_total`, and none of
/// them a client's refusal.
#[test]
fn each_answer_in_place_of_a_backends_is_counted_under_its_reason() {
    with_prometheus(|prometheus| async move {
        let endpoint = serve_metrics(prometheus).await;
        let (backend, _backend) = scripted_backend().await;
        let mut cfg = config_over(backend);
        cfg.backend_timeout = Duration::from_millis(500);
        let gw = start(&cfg).await;
        assert_eq!(status_of(gw.addr, "/te").await, StatusCode::BAD_GATEWAY);
        assert_eq!(
            status_of(gw.addr, "/garbage").await,
            StatusCode::BAD_GATEWAY
        );
        assert_eq!(
            status_of(gw.addr, "/no-content").await,
            StatusCode::BAD_GATEWAY
        );
        assert_eq!(
            status_of(gw.addr, "/slow").await,
            StatusCode::GATEWAY_TIMEOUT
        );

        // A port that refuses connections, healthy still after the one health round at
        // start-up (two failures make it unhealthy): refused, which opens its breaker,
        // and then no backend is left.
        let (_held, dead) = aegis_core::testing::dead_port();
        let mut cfg = config_over(dead);
        cfg.health_interval = Duration::MAX;
        cfg.breaker_failures = 1;
        let gone = start(&cfg).await;
        assert_eq!(status_of(gone.addr, "/").await, StatusCode::BAD_GATEWAY);
        assert_eq!(gone.breakers[0].state(), CircuitState::Open);
        assert_eq!(
            status_of(gone.addr, "/").await,
            StatusCode::SERVICE_UNAVAILABLE
        );

        let text = scrape(endpoint).await;
        let expected = [
            ("connect", 1),
            ("failed", 1),
            ("no_backend", 1),
            ("no_content_body", 1),
            ("timeout", 1),
            ("transfer_coding", 1),
        ];
        let expected: BTreeMap<String, u64> = expected.map(|(r, n)| (r.to_string(), n)).into();
        assert_eq!(
            by_reason(&text, "aegis_http_backend_errors_total", ""),
            expected,
            "/metrics:\n{text}"
        );
        assert_eq!(
            by_reason(&text, "aegis_rejections_total", "layer=\"http\","),
            BTreeMap::new(),
            "no client was refused: /metrics:\n{text}"
        );
    });
}

/// A raw backend whose answers stop short: `200` with `Content-Length: 1000`, ten bytes,
/// then a close (even answers) or a reset (odd ones, `SO_LINGER` 0); `/healthz` is
/// answered `200` in full.
async fn cutting_backend() -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        let mut answers = 0;
        while let Ok((mut stream, _)) = listener.accept().await {
            let head = read_head(&mut stream).await;
            if head.starts_with(b"GET /healthz ") {
                let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
                let _ = stream.write_all(ok).await;
                continue;
            }
            let reset = answers % 2 == 1;
            answers += 1;
            conns.spawn(async move {
                let cut = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789";
                let _ = stream.write_all(cut).await;
                if reset {
                    stream.set_zero_linger().unwrap();
                } else {
                    let _ = stream.shutdown().await;
                }
            });
        }
    });
    (addr, task)
}

/// Reads a request head from `stream`, byte by byte.
async fn read_head(stream: &mut TcpStream) -> Vec<u8> {
    let mut head = Vec::new();
    let mut byte = [0; 1];
    while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).await.unwrap_or(0) == 1 {
        head.push(byte[0]);
    }
    head
}

/// The body of the raw answer `out` (after its head).
fn raw_body(out: &str) -> &str {
    out.split_once("\r\n\r\n").map_or("", |(_, body)| body)
}

/// A backend that sends `200` with `Content-Length: 1000`, ten bytes, and then closes
/// or resets was a success to its breaker (judged at the head), and the body's error
/// went to nobody: the client got ten bytes, nothing was counted, and the backend stayed
/// in rotation however often it did so. Each such answer now reaches the client cut
/// short, is counted `truncated`, and is a failure of the backend's breaker, which opens
/// at its threshold (the successes at the heads no longer reset its count).
#[test]
fn a_backend_cutting_its_answers_short_is_counted_and_opens_its_breaker() {
    with_prometheus(|prometheus| async move {
        let endpoint = serve_metrics(prometheus).await;
        let (backend, _backend) = cutting_backend().await;
        let mut cfg = config_over(backend);
        cfg.breaker_failures = 3;
        let gw = start(&cfg).await;
        let get = b"GET / HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n";
        for n in 1..=3 {
            assert_eq!(gw.breakers[0].state(), CircuitState::Closed, "answer {n}");
            let out = raw(gw.addr, get).await;
            assert!(out.starts_with("HTTP/1.1 200"), "answer {n}: {out}");
            assert_eq!(raw_body(&out), "0123456789", "answer {n} cut short");
        }
        assert_eq!(gw.breakers[0].state(), CircuitState::Open);
        assert!(raw(gw.addr, get).await.starts_with("HTTP/1.1 503"));

        let text = scrape(endpoint).await;
        let reasons = by_reason(&text, "aegis_http_backend_errors_total", "");
        assert_eq!(reasons.get("truncated"), Some(&3), "/metrics:\n{text}");
        assert_eq!(
            sample(&text, "aegis_circuit_state{name=\"backend0\"}"),
            Some(2.0),
            "open: /metrics:\n{text}"
        );
    });
}

/// A raw backend that answers each request but `/healthz` (`200`, closed) with `200`,
/// `Content-Length: 100` and `pieces` of ten bytes `every` apart, then sends nothing
/// more and holds the connection until the gateway closes it (a backend that stalls
/// mid-body when `pieces` is under ten).
async fn slow_body_backend(pieces: usize, every: Duration) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            let head = read_head(&mut stream).await;
            if head.starts_with(b"GET /healthz ") {
                let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
                let _ = stream.write_all(ok).await;
                continue;
            }
            conns.spawn(async move {
                let head = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n";
                let _ = stream.write_all(head).await;
                for _ in 0..pieces {
                    sleep(every).await;
                    if stream.write_all(b"0123456789").await.is_err() {
                        return;
                    }
                }
                let _ = read_to_close(&mut stream).await;
            });
        }
    });
    (addr, task)
}

/// Every response was cut at the slowloris idle timeout, however fast the client took
/// it: only bytes read from the client counted as its activity, and a client sends
/// nothing while it reads a response (a 100 MB download at 320 kB/s was cut at 75 s,
/// a stream of server-sent events ended at 75 s without its last chunk, each counted as
/// a slowloris cut). Writes to the client count now: a body slower in all than the idle
/// timeout, with gaps shorter than it, reaches the client whole.
///
/// Paused clock over loopback: a write is in the peer's socket when the syscall returns.
#[test]
fn a_response_longer_than_the_idle_timeout_reaches_a_silent_client_whole() {
    with_prometheus_paused(|prometheus| async move {
        let endpoint = serve_metrics(prometheus).await;
        // 100 bytes in ten pieces a second apart: 10 s of a 3 s idle timeout.
        let (backend, _backend) = slow_body_backend(10, Duration::from_secs(1)).await;
        let mut cfg = config_over(backend);
        cfg.health_interval = Duration::MAX;
        cfg.idle_timeout = Duration::from_secs(3);
        assert!(
            cfg.backend_timeout > Duration::from_secs(1),
            "no wait is the backend's timeout"
        );
        let gw = start(&cfg).await;
        let t0 = Instant::now();
        let out = raw(
            gw.addr,
            b"GET / HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert_eq!(
            raw_body(&out),
            "0123456789".repeat(10),
            "cut at {:?}",
            since(t0)
        );
        assert!(since(t0) >= Duration::from_secs(10), "{:?}", since(t0));

        let text = scrape(endpoint).await;
        assert_eq!(
            by_reason(&text, "aegis_rejections_total", "layer=\"slowloris\","),
            BTreeMap::new(),
            "no slowloris cut: /metrics:\n{text}"
        );
        assert_eq!(
            by_reason(&text, "aegis_http_backend_errors_total", ""),
            BTreeMap::new(),
            "/metrics:\n{text}"
        );
    });
}

/// A backend that stalled mid-body (`Content-Length: 100`, ten bytes, then nothing) was
/// bounded only by the client's idle clock (75 s), and blamed on the client: a slowloris
/// `idle` cut, no backend error, the breaker closed. Each wait for the backend's next
/// piece of body now has the backend timeout: the client's connection is closed short
/// of the body at it, `body_timeout` is counted, and the breaker counts a failure.
///
/// Paused clock over loopback.
#[test]
fn a_backend_stalling_mid_body_is_cut_at_the_backend_timeout_and_counted() {
    with_prometheus_paused(|prometheus| async move {
        let endpoint = serve_metrics(prometheus).await;
        let (backend, _backend) = slow_body_backend(1, Duration::ZERO).await;
        let mut cfg = config_over(backend);
        cfg.health_interval = Duration::MAX;
        cfg.breaker_failures = 1;
        cfg.backend_timeout = Duration::from_secs(5);
        assert!(
            cfg.idle_timeout > 2 * cfg.backend_timeout,
            "{:?}",
            cfg.idle_timeout
        );
        let gw = start(&cfg).await;
        let t0 = Instant::now();
        let out = raw(gw.addr, b"GET / HTTP/1.1\r\nHost: gw.test\r\n\r\n").await;
        let took = since(t0);
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert_eq!(raw_body(&out), "0123456789", "cut short");
        assert!(
            took >= cfg.backend_timeout && took < cfg.backend_timeout + Duration::from_secs(1),
            "closed at the backend timeout: {took:?}"
        );
        assert_eq!(
            gw.breakers[0].state(),
            CircuitState::Open,
            "the backend's failure"
        );

        let text = scrape(endpoint).await;
        let expected: BTreeMap<String, u64> = [("body_timeout".to_string(), 1)].into();
        assert_eq!(
            by_reason(&text, "aegis_http_backend_errors_total", ""),
            expected,
            "/metrics:\n{text}"
        );
        assert_eq!(
            by_reason(&text, "aegis_rejections_total", "layer=\"slowloris\","),
            BTreeMap::new(),
            "not the client's: /metrics:\n{text}"
        );
    });
}

/// A client that goes away in the middle of a healthy backend's body is no failure of
/// the backend: nothing is counted, and its breaker (threshold 1) stays closed.
#[test]
fn a_client_leaving_in_the_middle_of_a_body_counts_nothing_against_the_backend() {
    with_prometheus(|prometheus| async move {
        let endpoint = serve_metrics(prometheus).await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend = listener.local_addr().unwrap();
        let ended = Arc::new(AtomicBool::new(false));
        let _backend = tokio::spawn({
            let ended = Arc::clone(&ended);
            async move {
                while let Ok((mut stream, _)) = listener.accept().await {
                    let head = read_head(&mut stream).await;
                    if head.starts_with(b"GET /healthz ") {
                        let ok =
                            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
                        let _ = stream.write_all(ok).await;
                        continue;
                    }
                    let ended = Arc::clone(&ended);
                    tokio::spawn(async move {
                        // The whole body, slowly: ten bytes every 20 ms, until written or
                        // the gateway closes the connection.
                        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789";
                        let mut sent = stream.write_all(head).await.map(|()| 10);
                        while let Ok(n @ ..1000) = sent {
                            sleep(Duration::from_millis(20)).await;
                            sent = stream.write_all(b"0123456789").await.map(|()| n + 10);
                        }
                        ended.store(true, Ordering::SeqCst);
                    });
                }
            }
        });
        let mut cfg = config_over(backend);
        cfg.breaker_failures = 1;
        let gw = start(&cfg).await;
        let client = hold_body(gw.addr, "/").await;
        client.set_zero_linger().unwrap();
        drop(client);
        until("the backend's answer ended", || {
            ended.load(Ordering::SeqCst)
        })
        .await;

        assert_eq!(gw.breakers[0].state(), CircuitState::Closed);
        let text = scrape(endpoint).await;
        assert_eq!(
            by_reason(&text, "aegis_http_backend_errors_total", ""),
            BTreeMap::new(),
            "/metrics:\n{text}"
        );
    });
}

/// A raw backend answering by path: `/503` with `503`, `/ok` with `200` and a body of
/// two bytes, `/held` with `200`, `Content-Length: 1000` and ten bytes, then nothing
/// until the gateway closes the connection (counted in the returned counter), and
/// `/healthz` with `200`. Every connection is closed after its answer.
async fn held_body_backend() -> (SocketAddr, Arc<AtomicUsize>, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let closed = Arc::new(AtomicUsize::new(0));
    let task = tokio::spawn({
        let closed = Arc::clone(&closed);
        async move {
            let mut conns = JoinSet::new();
            while let Ok((mut stream, _)) = listener.accept().await {
                let closed = Arc::clone(&closed);
                conns.spawn(async move {
                    let head = read_head(&mut stream).await;
                    let answer: &[u8] = if head.starts_with(b"GET /503 ") {
                        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    } else if head.starts_with(b"GET /ok ") {
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                    } else if head.starts_with(b"GET /held ") {
                        let _ = stream
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
                            .await;
                        // The gateway's close (or reset) ends the read.
                        while stream.read(&mut [0; 64]).await.is_ok_and(|n| n > 0) {}
                        closed.fetch_add(1, Ordering::SeqCst);
                        return;
                    } else {
                        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    };
                    let _ = stream.write_all(answer).await;
                    let _ = stream.shutdown().await;
                });
            }
        }
    });
    (addr, closed, task)
}

/// `GET path` through the gateway at `addr`: the connection, once a `200` head and the
/// first ten bytes of the body (`0123456789`) are in (the rest is not read).
async fn hold_body(addr: SocketAddr, path: &str) -> TcpStream {
    let mut client = TcpStream::connect(addr).await.unwrap();
    client
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: gw.test\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0; 1024];
    while !String::from_utf8_lossy(&got).contains("\r\n\r\n0123456789") {
        let n = timeout(WAIT, client.read(&mut buf)).await.unwrap().unwrap();
        assert_ne!(n, 0, "closed early: {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200"), "{got:?}");
    client
}

/// A client that gives up on a body (its timeout) is no success of the backend: the
/// dropped body recorded one, which reset the consecutive-failure count, and a backend
/// failing every other request never opened its breaker (four `503`s, a dropped body,
/// over and over). Now the drop counts nothing, and the fifth `503` opens it.
#[tokio::test]
async fn a_body_the_client_drops_does_not_reset_the_failure_count() {
    let (backend, closed, _backend) = held_body_backend().await;
    let mut cfg = config_over(backend);
    cfg.breaker_failures = 5;
    let gw = start(&cfg).await;
    for _ in 0..4 {
        assert_eq!(
            status_of(gw.addr, "/503").await,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
    let client = hold_body(gw.addr, "/held").await;
    drop(client);
    until("the gateway dropped the backend's body", || {
        closed.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(gw.breakers[0].state(), CircuitState::Closed);
    assert_eq!(
        status_of(gw.addr, "/503").await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        gw.breakers[0].state(),
        CircuitState::Open,
        "five failures in a row"
    );
}

/// A download begun while the backend was healthy and dropped after its breaker went
/// half-open closed the breaker, with no probe ever reaching the backend: a client
/// holding such downloads closed the circuit of a failing backend once per open period
/// (one dropped connection each). Now the dropped body counts nothing (and its outcome
/// would be one of an earlier state anyway): the circuit stays half-open until a probe
/// succeeds.
#[test]
fn a_body_begun_before_the_breaker_opened_does_not_close_it_when_dropped() {
    with_prometheus(|prometheus| async move {
        let endpoint = serve_metrics(prometheus).await;
        let (backend, closed, _backend) = held_body_backend().await;
        let mut cfg = config_over(backend);
        cfg.breaker_failures = 1;
        cfg.breaker_open_for = Duration::from_millis(300);
        let gw = start(&cfg).await;
        let held = hold_body(gw.addr, "/held").await;
        assert_eq!(
            status_of(gw.addr, "/503").await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(gw.breakers[0].state(), CircuitState::Open);
        until("half-open", || {
            gw.breakers[0].state() == CircuitState::HalfOpen
        })
        .await;

        drop(held);
        until("the gateway dropped the backend's body", || {
            closed.load(Ordering::SeqCst) == 1
        })
        .await;
        assert_eq!(
            gw.breakers[0].state(),
            CircuitState::HalfOpen,
            "closed by no probe"
        );
        let text = scrape(endpoint).await;
        assert_eq!(
            sample(
                &text,
                r#"aegis_circuit_transitions_total{name="backend0",to="closed"}"#
            ),
            None,
            "/metrics:\n{text}"
        );

        // A probe whose body ends closes it.
        assert_eq!(status_of(gw.addr, "/ok").await, StatusCode::OK);
        assert_eq!(gw.breakers[0].state(), CircuitState::Closed);
    });
}

/// A raw backend that answers every request (but `/healthz`, `200`) with `200` and a
/// body of [`BIG`] bytes, and gives up on a write that makes no progress for 2 s, as a
/// real server's send timeout does (nginx's `send_timeout`): it closes the connection,
/// short of the body, and sets the returned flag.
async fn send_timeout_backend() -> (SocketAddr, Arc<AtomicBool>, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let timed_out = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn({
        let timed_out = Arc::clone(&timed_out);
        async move {
            let mut conns = JoinSet::new();
            while let Ok((mut stream, _)) = listener.accept().await {
                let timed_out = Arc::clone(&timed_out);
                conns.spawn(async move {
                    let head = read_head(&mut stream).await;
                    if head.starts_with(b"GET /healthz ") {
                        let ok =
                            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
                        let _ = stream.write_all(ok).await;
                        return;
                    }
                    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {BIG}\r\n\r\n");
                    let _ = stream.write_all(head.as_bytes()).await;
                    let chunk = [b'x'; 64 * 1024];
                    for _ in 0..BIG / chunk.len() {
                        match timeout(Duration::from_secs(2), stream.write_all(&chunk)).await {
                            Ok(Ok(())) => {}
                            Ok(Err(_)) => return,
                            Err(_) => {
                                timed_out.store(true, Ordering::SeqCst);
                                return; // closes the connection
                            }
                        }
                    }
                });
            }
        }
    });
    (addr, timed_out, task)
}

/// The body of [`send_timeout_backend`]'s answers: more than the socket buffers on the
/// way to a client that stops reading can hold.
const BIG: usize = 64 * 1024 * 1024;

/// A client that stops reading a download makes the backend's writes stall, and a real
/// backend gives up on them (its send timeout) and closes: when the client reads on,
/// the body ends short of its length. That was counted `truncated` and as a failure of
/// the backend's breaker, so a few such clients opened it and every other client got
/// `503`. Now a body error after the client held the body back (the gateway had a frame
/// waiting for it for over `CLIENT_HOLD_BOUND`) is counted `truncated_held`, and not
/// against the breaker: the download-side twin of `during_upload`.
#[test]
fn a_body_cut_by_the_backends_send_timeout_while_the_client_held_it_is_not_a_backend_failure() {
    with_prometheus(|prometheus| async move {
        let endpoint = serve_metrics(prometheus).await;
        let (backend, timed_out, _backend) = send_timeout_backend().await;
        let mut cfg = config_over(backend);
        cfg.breaker_failures = 1;
        let gw = start(&cfg).await;
        let mut client = TcpStream::connect(gw.addr).await.unwrap();
        client
            .write_all(b"GET /big HTTP/1.1\r\nHost: gw.test\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = timeout(WAIT, client.read(&mut buf)).await.unwrap().unwrap();
            assert_ne!(n, 0, "closed early: {got:?}");
            got.extend_from_slice(&buf[..n]);
        }
        assert!(got.starts_with(b"HTTP/1.1 200"), "{got:?}");
        // The client stops reading until the backend gave up on its writes.
        until("the backend's send timed out", || {
            timed_out.load(Ordering::SeqCst)
        })
        .await;
        got.extend(read_to_close(&mut client).await);
        let body = got.len() - raw_body_start(&got);
        assert!(body < BIG, "the whole body came: {body}");

        assert_eq!(gw.breakers[0].state(), CircuitState::Closed);
        let text = scrape(endpoint).await;
        let expected: BTreeMap<String, u64> = [("truncated_held".to_string(), 1)].into();
        assert_eq!(
            by_reason(&text, "aegis_http_backend_errors_total", ""),
            expected,
            "/metrics:\n{text}"
        );
    });
}

/// Where the body of the raw answer `out` starts (after its head).
fn raw_body_start(out: &[u8]) -> usize {
    out.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(out.len(), |i| i + 4)
}

/// `target/<profile>/examples/http-gateway`, checked to be newer than its sources.
fn gateway_bin() -> std::path::PathBuf {
    common::example_bin(
        "http-gateway",
        &[
            "examples/http-gateway",
            "examples/shared",
            "aegis-core/src",
            "aegis-layers/src",
        ],
    )
}

/// The `http-gateway` binary as a user runs it, its log (stdout, without colours) in a
/// file of its own; killed and waited for on drop.
struct Process {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl Process {
    fn start(name: &str, args: &[&str]) -> Self {
        let log = std::env::temp_dir().join(format!(
            "aegis-http-gateway-{}-{name}.log",
            std::process::id()
        ));
        let child = std::process::Command::new(gateway_bin())
            .args(args)
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap();
        Self { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) for the start-up line; its `addr` and `metrics` fields.
    async fn listening(&mut self) -> (SocketAddr, String) {
        let deadline = Instant::now() + WAIT;
        loop {
            let log = self.log();
            if let Some(line) = log.lines().find(|l| l.contains("http-gateway listening")) {
                let field = |name: &str| {
                    line.split_whitespace()
                        .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
                        .unwrap_or_else(|| panic!("no {name} in {line:?}"))
                        .to_string()
                };
                return (field("addr").parse().unwrap(), field("metrics"));
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the gateway exited at start-up ({status}):\n{log}");
            }
            assert!(
                Instant::now() < deadline,
                "not listening after {WAIT:?}:\n{log}"
            );
            sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- gateway log ---\n{}", self.log());
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// The binary's `--metrics`: served with the layers' series and the gateway's own, a
/// port already taken is an error at start-up, and `off` serves none.
#[tokio::test]
async fn the_binary_serves_metrics_and_a_taken_metrics_port_is_a_startup_error() {
    let b0 = Backend::start().await;
    let backend = b0.addr.to_string();
    let mut gw = Process::start(
        "serves",
        &[
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
            "--backend",
            &backend,
            "--rate",
            "1",
        ],
    );
    let (addr, metrics) = gw.listening().await;
    let metrics: SocketAddr = metrics.parse().unwrap();
    // `--rate 1`: a burst of 2 connections, then one a second.
    let out = raw(
        addr,
        b"CONNECT gw:443 HTTP/1.1\r\nHost: gw:443\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 405"), "{out}");
    assert_eq!(get(addr).await.status(), StatusCode::OK);
    let req = Request::get("/")
        .header("host", "gw")
        .body(Full::default())
        .unwrap();
    let err = send(addr, req).await.expect_err("over the rate");
    assert!(closed_by_peer(&*err), "{err:?}");

    // A connection is counted when its task ends, which can be just after its client
    // saw the close: scrape until both served connections are in.
    let deadline = Instant::now() + WAIT;
    let text = loop {
        let text = scrape(metrics).await;
        let ok = sample(&text, r#"aegis_connections_total{outcome="ok"}"#);
        if ok.is_some_and(|n| n >= 2.0) || Instant::now() >= deadline {
            break text;
        }
        sleep(Duration::from_millis(20)).await;
    };
    let series = |s: &str| sample(&text, s);
    assert_eq!(
        series(r#"aegis_rejections_total{layer="rate_limit",reason="per_client"}"#),
        Some(1.0),
        "/metrics:\n{text}"
    );
    assert_eq!(
        series(r#"aegis_rejections_total{layer="http",reason="method"}"#),
        Some(1.0),
        "/metrics:\n{text}"
    );
    assert_eq!(
        series(r#"aegis_circuit_state{name="backend0"}"#),
        Some(0.0),
        "/metrics:\n{text}"
    );
    // The endpoint's own refusals (the shared server's, tested in mqtt_gateway.rs),
    // there from the start.
    for reason in ["concurrency", "over_capacity"] {
        assert_eq!(
            series(&format!(
                r#"aegis_rejections_total{{layer="metrics_endpoint",reason="{reason}"}}"#
            )),
            Some(0.0),
            "/metrics:\n{text}"
        );
    }
    assert!(
        series(r#"aegis_connections_total{outcome="ok"}"#).is_some_and(|n| n >= 2.0),
        "/metrics:\n{text}"
    );

    // Another gateway on the same metrics port.
    let other = tokio::process::Command::new(gateway_bin())
        .args(["--listen", "127.0.0.1:0", "--backend", &backend])
        .args(["--metrics", &metrics.to_string()])
        .env("NO_COLOR", "1")
        .kill_on_drop(true)
        .output();
    let out = timeout(WAIT, other).await.expect("exits").unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("--metrics {metrics}: cannot bind: ")),
        "{stderr}"
    );

    let mut off = Process::start(
        "off",
        &[
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "off",
            "--backend",
            &backend,
        ],
    );
    assert_eq!(off.listening().await.1, "off");
}

// ---------------------------------------------------------------------------------
// The open-files limit (the gateway binary as a child process)
// ---------------------------------------------------------------------------------

/// util-linux's `prlimit`, in every Debian install.
const PRLIMIT: &str = "/usr/bin/prlimit";

/// The `http-gateway` binary run under `prlimit --nofile=SOFT:HARD` in front of one
/// backend; its stdout and stderr (the log) in a file. Killed and waited for when
/// dropped.
struct ChildGateway {
    child: std::process::Child,
    addr: SocketAddr,
    /// Its `--metrics` endpoint (not the default port: tests run side by side).
    metrics: SocketAddr,
    log: std::path::PathBuf,
}

impl ChildGateway {
    /// Starts it and waits until it listens. The port is free when picked but not held
    /// until the gateway binds it: on "Address already in use" it is started again.
    async fn start(name: &str, backend: SocketAddr, limits: (u64, u64)) -> Self {
        Self::start_logging(name, backend, limits, "info").await
    }

    /// [`start`](Self::start) with `RUST_LOG=rust_log`.
    async fn start_logging(
        name: &str,
        backend: SocketAddr,
        (soft, hard): (u64, u64),
        rust_log: &str,
    ) -> Self {
        let bin = common::example_bin(
            "http-gateway",
            &[
                "examples/http-gateway",
                "examples/shared",
                "aegis-core/src",
                "aegis-layers/src",
            ],
        );
        let log = std::env::temp_dir().join(format!(
            "aegis-http-gateway-{name}-{}.log",
            std::process::id()
        ));
        for _attempt in 0..3 {
            let (addr, metrics) = (common::free_port(), common::free_port());
            let out = std::fs::File::create(&log).unwrap();
            let child = std::process::Command::new(PRLIMIT)
                .arg(format!("--nofile={soft}:{hard}"))
                .arg(&bin) // prlimit execs it: the child's pid is the gateway's
                .args(["--listen", &addr.to_string()])
                .args(["--metrics", &metrics.to_string()])
                .args(["--backend", &backend.to_string()])
                .env("RUST_LOG", rust_log)
                .env("NO_COLOR", "1")
                .stdin(std::process::Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .spawn()
                .unwrap();
            let mut gw = Self {
                child,
                addr,
                metrics,
                log: log.clone(),
            };
            let deadline = Instant::now() + WAIT;
            loop {
                if let Some(status) = gw.child.try_wait().unwrap() {
                    if gw.log().contains("Address already in use") {
                        break;
                    }
                    panic!("the gateway exited at start-up ({status}):\n{}", gw.log());
                }
                if gw.log().contains("http-gateway listening") {
                    return gw;
                }
                assert!(
                    Instant::now() < deadline,
                    "the gateway did not start within {WAIT:?}:\n{}",
                    gw.log()
                );
                sleep(Duration::from_millis(25)).await;
            }
        }
        panic!("no free port for the gateway in three tries");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its open-files limit, soft and hard, as `/proc/PID/limits` says.
    fn open_files_limit(&self) -> (u64, u64) {
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", self.pid())).unwrap();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap();
        let v: Vec<&str> = line.split_whitespace().collect();
        (v[3].parse().unwrap(), v[4].parse().unwrap())
    }

    /// Sets its open-files limit (`prlimit --pid`).
    fn set_open_files_limit(&self, soft: u64, hard: u64) {
        let ok = std::process::Command::new(PRLIMIT)
            .args(["--pid", &self.pid().to_string()])
            .arg(format!("--nofile={soft}:{hard}"))
            .status()
            .unwrap()
            .success();
        assert!(ok, "prlimit --pid {} --nofile={soft}:{hard}", self.pid());
    }

    /// Its descriptors' numbers.
    fn fds(&self) -> Vec<u64> {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect()
    }
}

impl Drop for ChildGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- http-gateway log ---\n{}", self.log());
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// `GET /` from `from` (a loopback address) with `Connection: close`: the whole answer.
async fn raw_get_from(from: &str, addr: SocketAddr) -> String {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    String::from_utf8_lossy(&read_to_close(&mut stream).await).into_owned()
}

/// Each client holds two of the gateway's descriptors (its socket and a backend
/// connection), and the gateway served up to 10,000 under whatever open-files limit it
/// was started with (often 1,024): out of descriptors, accepts fail and backend connects
/// too. It now raises its soft limit to the hard one, and keeps its connection cap within
/// `(limit - 128) / 2`, 36 here: the 37th connection is closed at once.
#[tokio::test]
async fn the_open_files_limit_is_raised_and_the_connection_cap_kept_within_it() {
    const TEST: &str = "the_open_files_limit_is_raised_and_the_connection_cap_kept_within_it";
    if !std::path::Path::new(PRLIMIT).exists() {
        common::skipped(TEST, "no /usr/bin/prlimit");
        return;
    }
    let b0 = Backend::start().await;
    let gw = ChildGateway::start("nofile", b0.addr, (150, 200)).await;
    assert_eq!(gw.open_files_limit(), (200, 200), "the soft limit raised");
    let log = gw.log();
    assert!(
        log.contains("max_connections=36 configured=10000 open_files_limit=200"),
        "{log}"
    );
    let mut held = Vec::new();
    for i in 0..36 {
        let socket = TcpSocket::new_v4().unwrap();
        socket
            .bind(format!("127.0.0.{}:0", 100 + i).parse().unwrap())
            .unwrap();
        held.push(socket.connect(gw.addr).await.unwrap());
    }
    // Over the cap, closed at once (the first-byte timeout would take 5 s).
    let t0 = Instant::now();
    // The gateway resets it: the reset can reach the connect itself (its `SO_ERROR`).
    match TcpStream::connect(gw.addr).await {
        Ok(mut over) => assert!(read_to_close(&mut over).await.is_empty()),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    assert!(since(t0) < Duration::from_secs(3), "{:?}", since(t0));
    drop(held);
    // The gateway frees a slot when it sees a held connection's close, which can come
    // just after this connect: a connection over the cap is closed at once, without an
    // answer; try again until one is served.
    let deadline = Instant::now() + WAIT;
    let out = loop {
        let out = raw_get_from("127.0.0.99", gw.addr).await;
        if !out.is_empty() || Instant::now() >= deadline {
            break out;
        }
        sleep(Duration::from_millis(20)).await;
    };
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
}

/// With the gateway out of descriptors, `socket()` failed with `EMFILE` when it connected
/// to a backend: the client got `502`, the backend's breaker counted it, and after five
/// the breaker answered `503` for 10 s, after the descriptors had come back. The
/// gateway's own shortage is now `503` and not the backend's failure.
///
/// The gateway's soft limit is lowered (`prlimit --pid`) to its second lowest free
/// descriptor: the accept of each request takes the lowest, and the backend connect finds
/// none.
#[tokio::test]
async fn a_backend_connect_out_of_descriptors_is_503_and_not_the_backends_failure() {
    const TEST: &str = "a_backend_connect_out_of_descriptors_is_503_and_not_the_backends_failure";
    if !std::path::Path::new(PRLIMIT).exists() {
        common::skipped(TEST, "no /usr/bin/prlimit");
        return;
    }
    let b0 = Backend::start().await;
    let gw = ChildGateway::start("emfile", b0.addr, (1024, 1024)).await;
    let (_, hard) = gw.open_files_limit();
    // The start-up round of health checks has its connection, which its client keeps
    // (the next rounds, every 5 s, take no new descriptor).
    until("the first health check", || {
        b0.seen.health_checks.load(Ordering::SeqCst) > 0
    })
    .await;
    let fds = gw.fds();
    let mut free = (0..).filter(|fd| !fds.contains(fd));
    let (lowest, next) = (free.next().unwrap(), free.next().unwrap());
    gw.set_open_files_limit(next, hard);
    for i in 0..6 {
        let out = raw_get_from("127.0.0.98", gw.addr).await;
        assert!(
            out.starts_with("HTTP/1.1 503") && out.ends_with("gateway out of resources\n"),
            "request {i} (descriptor {lowest} for the accept, {next} over the limit): {out}"
        );
    }
    assert_eq!(b0.hits(), 0);
    gw.set_open_files_limit(hard, hard);
    let out = raw_get_from("127.0.0.98", gw.addr).await;
    assert!(
        out.starts_with("HTTP/1.1 200"),
        "the backend's breaker counted the gateway's shortage: {out}"
    );
    assert_eq!(b0.hits(), 1);
    let text = scrape(gw.metrics).await;
    assert_eq!(
        sample(
            &text,
            r#"aegis_http_backend_errors_total{reason="local_resources"}"#
        ),
        Some(6.0),
        "/metrics:\n{text}"
    );
}

/// Whether a process holds a TCP connection to `to` still open (`/proc/net/tcp`: an
/// entry whose remote end is `to`, `ESTABLISHED` or `CLOSE_WAIT`; in every other state
/// the socket's descriptor is closed already).
fn connected_to(to: SocketAddr) -> bool {
    let SocketAddr::V4(to) = to else {
        panic!("{to}: IPv4 only")
    };
    // The address as the kernel prints it: the 32 bits in memory order, then the port.
    let rem = format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(to.ip().octets()),
        to.port()
    );
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap();
    tcp.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.get(2) == Some(&rem.as_str()) && matches!(f.get(3), Some(&"01" | &"08"))
    })
}

/// A health check that could not get a descriptor (`socket()` failed with `EMFILE`) was
/// the backend's failure: two of them in a row (5 s apart) marked it unhealthy, and the
/// gateway answered `503` until a check got through again. The gateway's own shortage
/// now leaves the backend's verdict as it was: the check is skipped, logged and counted.
///
/// The backend closes each health check's connection (`Connection: close`), so that each
/// check connects anew; once the first one's connection is closed, the gateway's soft
/// limit is lowered to its lowest free descriptor: none is left to connect with.
#[tokio::test]
async fn a_health_check_out_of_descriptors_leaves_the_backend_healthy() {
    const TEST: &str = "a_health_check_out_of_descriptors_leaves_the_backend_healthy";
    if !std::path::Path::new(PRLIMIT).exists() {
        common::skipped(TEST, "no /usr/bin/prlimit");
        return;
    }
    let b0 = Backend::start().await;
    b0.seen.close_health_checks.store(true, Ordering::SeqCst);
    let gw = ChildGateway::start_logging(
        "health-emfile",
        b0.addr,
        (1024, 1024),
        "info,http_gateway::health=debug",
    )
    .await;
    let (_, hard) = gw.open_files_limit();
    until("the first health check, its connection closed", || {
        b0.seen.health_checks.load(Ordering::SeqCst) > 0 && !connected_to(b0.addr)
    })
    .await;
    let fds = gw.fds();
    let lowest = (0..).find(|fd| !fds.contains(fd)).unwrap();
    gw.set_open_files_limit(lowest, hard);
    let checks = b0.seen.health_checks.load(Ordering::SeqCst);

    // The next two rounds (5 s apart; two failures in a row mark a backend unhealthy)
    // find no descriptor.
    let skips = |log: &str| {
        log.lines()
            .filter(|l| l.contains("health check skipped"))
            .count()
    };
    until_within("two rounds of health checks", 3 * WAIT, || {
        let log = gw.log();
        skips(&log) >= 2 || log.contains("backend unhealthy")
    })
    .await;
    let log = gw.log();
    assert!(
        !log.contains("backend unhealthy"),
        "the gateway's shortage marked the backend unhealthy:\n{log}"
    );
    assert_eq!(
        b0.seen.health_checks.load(Ordering::SeqCst),
        checks,
        "a check got a descriptor (limit {lowest}, descriptors {fds:?})"
    );
    assert_eq!(
        log.matches("health checks skipped").count(),
        1,
        "one warning, then debug lines:\n{log}"
    );

    gw.set_open_files_limit(hard, hard);
    let out = raw_get_from("127.0.0.97", gw.addr).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(b0.hits(), 1);
    let text = scrape(gw.metrics).await;
    let checked = |outcome: &str| {
        sample(
            &text,
            &format!(r#"aegis_http_health_checks_total{{outcome="{outcome}"}}"#),
        )
    };
    assert!(
        checked("local_resources").is_some_and(|n| n >= 2.0),
        "/metrics:\n{text}"
    );
    assert!(
        checked("passed").is_some_and(|n| n >= 1.0),
        "/metrics:\n{text}"
    );
    assert_eq!(checked("failed"), None, "/metrics:\n{text}");
}

/// A raw backend that answers every request but `/healthz` (`200`, closed) with a body
/// of [`BIG`] bytes, written as fast as the connection takes them. Counts the answers
/// begun, and adds up the bytes of their bodies written so far.
async fn endless_backend() -> (SocketAddr, Arc<(AtomicUsize, AtomicUsize)>, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counts = Arc::new((AtomicUsize::new(0), AtomicUsize::new(0)));
    let shared = Arc::clone(&counts);
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            let counts = Arc::clone(&shared);
            conns.spawn(async move {
                let head = read_head(&mut stream).await;
                if head.starts_with(b"GET /healthz ") {
                    let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
                    let _ = stream.write_all(ok).await;
                    return;
                }
                let (answers, written) = &*counts;
                answers.fetch_add(1, Ordering::SeqCst);
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {BIG}\r\n\r\n");
                let _ = stream.write_all(head.as_bytes()).await;
                let chunk = [b'x'; 16 * 1024];
                for _ in 0..BIG / chunk.len() {
                    if stream.write_all(&chunk).await.is_err() {
                        return;
                    }
                    written.fetch_add(chunk.len(), Ordering::SeqCst);
                }
            });
        }
    });
    (addr, counts, task)
}

/// The resident memory of process `pid`, in bytes (`VmRSS` of `/proc/PID/status`).
fn rss(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {status}"));
    kb * 1024
}

/// A client that asks for a large answer and reads none of it holds the gateway's
/// buffers on the way: some 1 MB of the gateway's memory each, as measured with the
/// release binary (40 such clients, `SO_RCVBUF` 4096: 5.6 MB to 45 MB of RSS), so that
/// the 9,936 connections the cap allowed could take some 9.4 GB. hyper's client read
/// the backend's answer into a buffer of up to some 400 KiB (its default `max_buf_size`),
/// and the server side queued a frame as large. With the backend connections' buffer at
/// 64 KiB ([`proxy::BACKEND_MAX_BUF_SIZE`]), the same 40 clients take the release binary
/// from 5.7 MB to 15 MB, some 240 KB each (16 KiB would make it some 100 KB, and cut
/// off answer heads over 16 KiB).
///
/// The binary here is the debug one `cargo test` builds; the buffers are the same, and so
/// were the figures (850 KB to 1 MB a client before, 220 to 250 KB after). The bound,
/// 500 KB a client, is twice the new figure and half the old one.
#[tokio::test]
async fn a_client_not_reading_a_large_answer_holds_a_bounded_share_of_the_gateways_memory() {
    const CLIENTS: usize = 40;
    const BOUND: usize = 500 * 1024;
    let (backend, counts, _backend) = endless_backend().await;
    let (answers, written) = &*counts;
    let backend = backend.to_string();
    let mut gw = Process::start(
        "unread",
        &[
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "off",
            "--backend",
            &backend,
        ],
    );
    let (addr, _) = gw.listening().await;
    let pid = gw.child.id();
    // The first health check's connection and the first timers: in the baseline.
    until("the first health check", || {
        gw.log().contains("backend status")
    })
    .await;
    let before = rss(pid);

    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        socket
            .bind(format!("127.8.{i}.1:0").parse().unwrap())
            .unwrap();
        let mut stream = socket.connect(addr).await.unwrap();
        stream
            .write_all(b"GET /big HTTP/1.1\r\nHost: gw\r\n\r\n")
            .await
            .unwrap();
        clients.push(stream);
    }
    // Every request answered, every buffer on the way full: the backend's writes stop.
    until("every request at the backend", || {
        answers.load(Ordering::SeqCst) == CLIENTS
    })
    .await;
    let mut last = (written.load(Ordering::SeqCst), Instant::now());
    until("the backend's writes stopped", || {
        let now = written.load(Ordering::SeqCst);
        if now != last.0 {
            last = (now, Instant::now());
        }
        since(last.1) > Duration::from_millis(500)
    })
    .await;
    let after = rss(pid);
    let each = after.saturating_sub(before) / CLIENTS;
    eprintln!(
        "RSS {before} -> {after} bytes, {each} a client; the backend wrote {} bytes",
        last.0
    );
    assert!(
        each < BOUND,
        "{each} bytes a client not reading (RSS {before} -> {after})"
    );
    drop(clients);
}
