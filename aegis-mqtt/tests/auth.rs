//! The auth layer against a real HTTP auth service (hyper, on a loopback socket, started
//! by each test and counting its calls), and the static authenticator.
#![cfg(all(feature = "auth-http", feature = "auth-static"))]

mod common;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use aegis_core::error::BoxError;
use aegis_core::metrics::REJECTIONS_TOTAL;
use aegis_core::{Conn, metrics::testing};
use aegis_mqtt::auth::{
    AuthError, AuthLayer, Credentials, Decision, HttpAuth, StaticAuth, StaticAuthError,
    metrics as m,
};
use aegis_mqtt::layer::{MqttIo, MqttLayer};
use aegis_mqtt::{Config, MqttError, Version};
use bytes::Bytes;
use common::head;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use metrics_util::debugging::{DebugValue, Snapshotter};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tower::{Layer, ServiceExt, service_fn};

/// The gateway's address in every test.
const LOCAL: &str = "127.0.0.1:1883";
/// The client's address, unless a test says otherwise.
/// Moves tokio's clock `d` ahead at once. The HTTP exchanges need real time, so the
/// clock is paused only to move it.
async fn jump(d: Duration) {
    tokio::time::pause();
    tokio::time::advance(d).await;
    tokio::time::resume();
}

const PEER: &str = "192.0.2.1:4000";

/// A real HTTP auth service on a loopback socket: 200 for alice/secret, 500 for user
/// "error", 401 otherwise.
struct AuthServer {
    url: Uri,
    /// Requests received (counted when they arrive, before any answer).
    calls: Arc<AtomicUsize>,
    /// While `false`, requests wait before they are answered.
    open: watch::Sender<bool>,
    /// The last request's JSON body.
    last: Arc<Mutex<Option<serde_json::Value>>>,
    task: JoinHandle<()>,
}

impl AuthServer {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let (open, gate) = watch::channel(true);
        let last = Arc::new(Mutex::new(None));
        let (c, l) = (Arc::clone(&calls), Arc::clone(&last));
        let task = tokio::spawn(async move {
            // Aborting the task drops the listener and every connection in the set.
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (c, l, gate) = (Arc::clone(&c), Arc::clone(&l), gate.clone());
                let svc = hyper::service::service_fn(move |req| {
                    handle(req, Arc::clone(&c), Arc::clone(&l), gate.clone())
                });
                conns.spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self {
            url: format!("http://{addr}/auth").parse().unwrap(),
            calls,
            open,
            last,
            task,
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Stops the service: no listener, no connection.
    async fn stop(self) {
        self.task.abort();
        assert!(self.task.await.unwrap_err().is_cancelled());
    }
}

async fn handle(
    req: Request<Incoming>,
    calls: Arc<AtomicUsize>,
    last: Arc<Mutex<Option<serde_json::Value>>>,
    mut gate: watch::Receiver<bool>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    calls.fetch_add(1, Ordering::SeqCst);
    let ok_type = req.headers()["content-type"] == "application/json";
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let allow = ok_type && json["username"] == "alice" && json["password"] == "secret";
    let error = json["username"] == "error";
    *last.lock() = Some(json);
    let _ = gate.wait_for(|open| *open).await;
    let status = if allow {
        StatusCode::OK
    } else if error {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::UNAUTHORIZED
    };
    Ok(Response::builder()
        .status(status)
        .body(Full::new(Bytes::new()))
        .unwrap())
}

/// A CONNECT (3.1.1, or 5.0 with `v5`) with a client id, username and password.
fn connect(v5: bool, id: &str, user: &str, pass: &str) -> Vec<u8> {
    let b = head("MQTT", if v5 { 5 } else { 4 }, 0xC2);
    let b = if v5 { b.props(&[]) } else { b };
    b.s(id).s(user).s(pass).frame(0x10)
}

/// One connection's end: the stack's result (the inner service's bytes read, or the
/// refusal), and everything the client received.
struct Run {
    result: Result<Vec<u8>, BoxError>,
    got: Vec<u8>,
}

/// Sends `bytes` from `peer` through `MqttLayer` and `layer` to an inner service that
/// accepts the CONNECT and reads everything the client sent (and counts its calls in
/// `inner`).
async fn mqtt(
    layer: &AuthLayer<HttpAuth>,
    inner: &Arc<AtomicUsize>,
    peer: &str,
    bytes: Vec<u8>,
) -> Run {
    let inner = Arc::clone(inner);
    let broker = service_fn(move |mut io: MqttIo<Conn<DuplexStream>>| {
        inner.fetch_add(1, Ordering::SeqCst);
        async move {
            io.write_all(&common::connack_accepting(&io)).await?;
            let mut seen = Vec::new();
            io.read_to_end(&mut seen).await?;
            Ok::<_, BoxError>(seen)
        }
    });
    let svc = MqttLayer::new(Config::new()).layer(layer.clone().layer(broker));
    let (mut client, server) = tokio::io::duplex(4096);
    let io = Conn::new(server, peer.parse().unwrap(), LOCAL.parse().unwrap());
    let conn = tokio::spawn(svc.oneshot(io));
    client.write_all(&bytes).await.unwrap();
    client.shutdown().await.unwrap();
    let mut got = Vec::new();
    client.read_to_end(&mut got).await.unwrap();
    Run {
        result: conn.await.unwrap(),
        got,
    }
}

/// The refusal of a run.
fn refusal(run: &Run) -> MqttError {
    let err = run.result.as_ref().expect_err("a refusal");
    *aegis_core::error::find::<MqttError>(&**err).expect("an MqttError")
}

/// Counters and histogram sample counts from one snapshot of the recorder.
struct Seen(Vec<Series>);

/// A series' name, labels and value.
type Series = (String, Vec<(String, String)>, DebugValue);

impl Seen {
    fn take(snap: &Snapshotter) -> Self {
        Self(
            snap.snapshot()
                .into_vec()
                .into_iter()
                .map(|(k, _, _, v)| {
                    let key = k.key();
                    let labels = key
                        .labels()
                        .map(|l| (l.key().to_owned(), l.value().to_owned()))
                        .collect();
                    (key.name().to_owned(), labels, v)
                })
                .collect(),
        )
    }

    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&str, &str)],
    ) -> impl Iterator<Item = &'a DebugValue> + 'a {
        self.0
            .iter()
            .filter(move |(n, ls, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| ls.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, _, v)| v)
    }

    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.matching(name, labels)
            .map(|v| match v {
                DebugValue::Counter(c) => *c,
                _ => 0,
            })
            .sum()
    }

    fn auth(&self, result: &str, cache: &str) -> u64 {
        self.counter(m::AUTH_TOTAL, &[("result", result), ("cache", cache)])
    }

    fn rejections(&self, reason: &str) -> u64 {
        self.counter(REJECTIONS_TOTAL, &[("layer", "mqtt"), ("reason", reason)])
    }

    /// How many callout latencies were recorded.
    fn callouts(&self) -> usize {
        self.matching(m::CALLOUT_SECONDS, &[])
            .map(|v| match v {
                DebugValue::Histogram(h) => h.len(),
                _ => 0,
            })
            .sum()
    }
}

/// Polls `cond` (every millisecond of real time) until it holds; fails after 10 s.
async fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited too long for {what}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[test]
fn allowed_reaches_the_broker_byte_exact_and_denied_gets_not_authorized() {
    let ((), snap) = testing::run(false, || async {
        let server = AuthServer::start().await;
        let layer = AuthLayer::new(HttpAuth::new(server.url.clone()));
        let inner = Arc::new(AtomicUsize::new(0));

        for (v5, id) in [(false, "c4"), (true, "c5")] {
            let bytes = connect(v5, id, "alice", "secret");
            let run = mqtt(&layer, &inner, PEER, bytes.clone()).await;
            assert_eq!(run.result.unwrap(), bytes, "the CONNECT, byte for byte");
            assert_eq!(run.got[..2], [0x20, if v5 { 3 } else { 2 }], "the CONNACK");
        }
        assert_eq!(inner.load(Ordering::SeqCst), 2);
        assert_eq!(server.calls(), 2);
        assert_eq!(
            server.last.lock().take().unwrap(),
            serde_json::json!({"client_id": "c5", "username": "alice", "password": "secret",
                "client_addr": PEER, "protocol": "5.0"})
        );

        let run = mqtt(&layer, &inner, PEER, connect(false, "c4", "alice", "guess")).await;
        assert_eq!(run.got, [0x20, 0x02, 0x00, 0x05]);
        assert_eq!(refusal(&run), MqttError::NotAuthorized);
        let run = mqtt(&layer, &inner, PEER, connect(true, "c5", "alice", "guess")).await;
        assert_eq!(run.got, [0x20, 0x03, 0x00, 0x87, 0x00]);
        assert_eq!(refusal(&run), MqttError::NotAuthorized);
        assert_eq!(
            inner.load(Ordering::SeqCst),
            2,
            "a denied client never reaches it"
        );
        assert_eq!(server.calls(), 4);
    });
    let seen = Seen::take(&snap);
    assert_eq!(seen.auth("allow", "miss"), 2);
    assert_eq!(seen.auth("deny", "miss"), 2);
    assert_eq!(seen.counter(m::AUTH_TOTAL, &[]), 4);
    assert_eq!(seen.rejections("not_authorized"), 2);
    assert_eq!(seen.callouts(), 4);
}

#[test]
fn a_cache_hit_does_not_call_the_service_and_new_credentials_miss() {
    let ((), snap) = testing::run(false, || async {
        let server = AuthServer::start().await;
        let layer = AuthLayer::new(HttpAuth::new(server.url.clone()));
        let inner = Arc::new(AtomicUsize::new(0));
        let alice = connect(false, "c1", "alice", "secret");

        for _ in 0..3 {
            let run = mqtt(&layer, &inner, PEER, alice.clone()).await;
            assert_eq!(run.result.unwrap(), alice);
        }
        assert_eq!(
            server.calls(),
            1,
            "the second and third CONNECT are cache hits"
        );
        assert_eq!(inner.load(Ordering::SeqCst), 3);

        // A changed password is another key: the service is asked, and denies.
        let wrong = connect(false, "c1", "alice", "secret2");
        let run = mqtt(&layer, &inner, PEER, wrong.clone()).await;
        assert_eq!(run.got, [0x20, 0x02, 0x00, 0x05]);
        assert_eq!(server.calls(), 2);
        // The deny is cached too (a brute force of the same password stays here).
        let run = mqtt(&layer, &inner, PEER, wrong).await;
        assert_eq!(run.got, [0x20, 0x02, 0x00, 0x05]);
        assert_eq!(server.calls(), 2);

        // The same credentials from another address are another key as well; another
        // port of the same address is not.
        let run = mqtt(&layer, &inner, "192.0.2.2:4000", alice.clone()).await;
        assert_eq!(run.result.unwrap(), alice);
        assert_eq!(server.calls(), 3);
        let run = mqtt(&layer, &inner, "192.0.2.2:5000", alice.clone()).await;
        assert_eq!(run.result.unwrap(), alice);
        assert_eq!(server.calls(), 3);
        assert_eq!(layer.cached(), 3);
    });
    let seen = Seen::take(&snap);
    assert_eq!(seen.auth("allow", "miss"), 2);
    assert_eq!(seen.auth("allow", "hit"), 3);
    assert_eq!(seen.auth("deny", "miss"), 1);
    assert_eq!(seen.auth("deny", "hit"), 1);
    assert_eq!(seen.callouts(), 3, "hits are not callouts");
}

#[test]
fn the_ttl_expires() {
    testing::run(false, || async {
        let server = AuthServer::start().await;
        let ttl = Duration::from_secs(30);
        let layer = AuthLayer::new(HttpAuth::new(server.url.clone())).ttl(ttl);
        let inner = Arc::new(AtomicUsize::new(0));
        let alice = connect(true, "c1", "alice", "secret");

        mqtt(&layer, &inner, PEER, alice.clone())
            .await
            .result
            .unwrap();
        assert_eq!(server.calls(), 1);
        // Just before the TTL: still a hit.
        jump(Duration::from_secs(29)).await;
        mqtt(&layer, &inner, PEER, alice.clone())
            .await
            .result
            .unwrap();
        assert_eq!(server.calls(), 1);
        // Past it: the service is asked again.
        jump(Duration::from_secs(2)).await;
        mqtt(&layer, &inner, PEER, alice.clone())
            .await
            .result
            .unwrap();
        assert_eq!(server.calls(), 2);
        mqtt(&layer, &inner, PEER, alice).await.result.unwrap();
        assert_eq!(server.calls(), 2);
    });
}

#[test]
fn concurrent_connects_share_one_call() {
    const N: usize = 8;
    let ((), snap) = testing::run(false, || async {
        let server = AuthServer::start().await;
        server.open.send_replace(false);
        // All N from one address: room for them all.
        let layer = AuthLayer::new(HttpAuth::new(server.url.clone())).max_checks_per_addr(N);
        let inner = Arc::new(AtomicUsize::new(0));
        let alice = connect(false, "c1", "alice", "secret");

        let mut conns = JoinSet::new();
        for _ in 0..N {
            let (layer, inner, alice) = (layer.clone(), Arc::clone(&inner), alice.clone());
            conns.spawn(async move { mqtt(&layer, &inner, PEER, alice).await });
        }
        // All N wait on the callout, which has reached the (held) service.
        until("every check to wait", || layer.pending() == N).await;
        until("the callout", || server.calls() == 1).await;
        assert_eq!(inner.load(Ordering::SeqCst), 0);
        server.open.send_replace(true);
        while let Some(run) = conns.join_next().await {
            assert_eq!(run.unwrap().result.unwrap(), alice);
        }
        assert_eq!(server.calls(), 1, "one callout for all of them");
        assert_eq!(inner.load(Ordering::SeqCst), N);
        assert_eq!(layer.pending(), 0);
    });
    let seen = Seen::take(&snap);
    assert_eq!(seen.auth("allow", "miss"), 1);
    assert_eq!(seen.auth("allow", "shared"), N as u64 - 1);
    assert_eq!(seen.callouts(), 1);
}

#[test]
fn a_stopped_service_denies() {
    let ((), snap) = testing::run(false, || async {
        let server = AuthServer::start().await;
        let layer = AuthLayer::new(HttpAuth::new(server.url.clone()));
        let inner = Arc::new(AtomicUsize::new(0));
        let alice = connect(false, "c1", "alice", "secret");
        mqtt(&layer, &inner, PEER, alice).await.result.unwrap();
        assert_eq!(server.calls(), 1);

        server.stop().await;
        // Not in the cache (another client id): the callout fails, and the client is
        // refused all the same.
        let run = mqtt(
            &layer,
            &inner,
            PEER,
            connect(false, "c2", "alice", "secret"),
        )
        .await;
        assert_eq!(run.got, [0x20, 0x02, 0x00, 0x05]);
        assert_eq!(refusal(&run), MqttError::AuthError);
        assert_eq!(inner.load(Ordering::SeqCst), 1);
        // The error is not cached: the next attempt calls out again (and fails again).
        let run = mqtt(&layer, &inner, PEER, connect(true, "c2", "alice", "secret")).await;
        assert_eq!(run.got, [0x20, 0x03, 0x00, 0x87, 0x00]);
        assert_eq!(refusal(&run), MqttError::AuthError);
    });
    let seen = Seen::take(&snap);
    assert_eq!(seen.auth("allow", "miss"), 1);
    assert_eq!(seen.auth("error", "miss"), 2);
    assert_eq!(seen.rejections("auth_error"), 2);
    assert_eq!(seen.callouts(), 3);
}

#[test]
fn a_timeout_denies_and_is_not_cached() {
    let ((), snap) = testing::run(false, || async {
        let server = AuthServer::start().await;
        server.open.send_replace(false); // the service never answers
        let layer =
            AuthLayer::new(HttpAuth::new(server.url.clone())).timeout(Duration::from_millis(100));
        let inner = Arc::new(AtomicUsize::new(0));
        let alice = connect(true, "c1", "alice", "secret");

        let run = mqtt(&layer, &inner, PEER, alice.clone()).await;
        assert_eq!(run.got, [0x20, 0x03, 0x00, 0x87, 0x00]);
        assert_eq!(refusal(&run), MqttError::AuthError);
        assert_eq!(server.calls(), 1);
        assert_eq!(inner.load(Ordering::SeqCst), 0);
        assert_eq!(layer.cached(), 0);

        // The service is back: the same credentials are asked again and allowed. Through
        // a clone of the layer (the same cache) with time to spare: 100 ms for a real
        // HTTP round trip races a loaded machine.
        server.open.send_replace(true);
        let patient = layer.clone().timeout(Duration::from_secs(10));
        let run = mqtt(&patient, &inner, PEER, alice.clone()).await;
        assert_eq!(run.result.unwrap(), alice);
        assert_eq!(server.calls(), 2);
    });
    let seen = Seen::take(&snap);
    assert_eq!(seen.auth("error", "miss"), 1);
    assert_eq!(seen.auth("allow", "miss"), 1);
    assert_eq!(seen.rejections("auth_error"), 1);
}

#[test]
fn check_reports_the_error_label() {
    testing::run(false, || async {
        let server = AuthServer::start().await;
        // The service never answers: the 50 ms timeout is certain.
        server.open.send_replace(false);
        let layer =
            AuthLayer::new(HttpAuth::new(server.url.clone())).timeout(Duration::from_millis(50));
        let creds = Credentials::new("c1", Some("alice"), Some(b"secret"), PEER.parse().unwrap());
        let err = layer.check(creds.clone()).await.unwrap_err();
        assert!(err.is_timeout());
        assert_eq!(err.label(), "timeout");
        // It answers again (500 for this user): a clone of the layer with time to spare
        // for the round trip, which 50 ms would race on a loaded machine.
        server.open.send_replace(true);
        let patient = layer.clone().timeout(Duration::from_secs(10));
        let addr = PEER.parse().unwrap();
        let broken = Credentials::new("c1", Some("error"), Some(b"x"), addr);
        let err = patient.check(broken).await.unwrap_err();
        assert!(matches!(err, AuthError::Status(500)), "{err:?}");
        assert_eq!(err.label(), "status");
        let url = server.url.clone();
        server.stop().await;
        // hyper-util's pool may still hold the connection the 500 came on, which the
        // stop closed: a request that finds it closed connects anew and is refused
        // ("unavailable", what it gets here in practice), one written on it before its
        // connection task has seen the server's FIN fails ("failed"). Which one hangs
        // on hyper-util and the scheduling of that task, not on this crate's code.
        let err = patient.check(creds.clone()).await.unwrap_err();
        assert!(matches!(err.label(), "unavailable" | "failed"), "{err:?}");
        // With no connection kept, the connect itself is refused: "unavailable".
        let fresh = AuthLayer::new(HttpAuth::new(url)).timeout(Duration::from_secs(10));
        let err = fresh.check(creds).await.unwrap_err();
        assert!(matches!(err, AuthError::Unavailable(_)), "{err:?}");
        assert_eq!(err.label(), "unavailable");
    });
}

/// Serves `answer` to every request, over HTTP/1 on a loopback socket: the URL, and the
/// task (aborting it drops the listener and every connection).
async fn serve_http<F, Fut, B>(answer: F) -> (Uri, JoinHandle<()>)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let svc = hyper::service::service_fn(answer.clone());
            conns.spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (format!("http://{addr}/auth").parse().unwrap(), task)
}

/// `n` distinct credentials: one client, each with its own password.
fn guesses(n: usize) -> impl Iterator<Item = Credentials> {
    let addr: SocketAddr = PEER.parse().unwrap();
    (0..n).map(move |i| {
        Credentials::new(
            "c1",
            Some("alice"),
            Some(format!("guess-{i}").as_bytes()),
            addr,
        )
    })
}

#[tokio::test]
async fn http_auth_runs_at_most_max_concurrent_callouts() {
    const CHECKS: usize = 50;
    const MAX: usize = 4;
    let (calls, in_flight, most) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let (open, gate) = watch::channel(false);
    let (url, server) = serve_http({
        let (calls, in_flight, most) = (
            Arc::clone(&calls),
            Arc::clone(&in_flight),
            Arc::clone(&most),
        );
        move |req: Request<Incoming>| {
            let (calls, in_flight, most, mut gate) = (
                Arc::clone(&calls),
                Arc::clone(&in_flight),
                Arc::clone(&most),
                gate.clone(),
            );
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                let _ = req.into_body().collect().await;
                let _ = gate.wait_for(|open| *open).await;
                in_flight.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
            }
        }
    })
    .await;
    let authn = HttpAuth::new(url).max_concurrent(MAX);
    // All the checks from one address: room for them all.
    let layer = AuthLayer::new(authn)
        .timeout(Duration::from_secs(60))
        .max_checks_per_addr(CHECKS);
    let mut checks = JoinSet::new();
    for creds in guesses(CHECKS) {
        checks.spawn(layer.check(creds));
    }
    until("every check to wait", || layer.pending() == CHECKS).await;
    until("the first callouts", || calls.load(Ordering::SeqCst) >= MAX).await;
    open.send_replace(true);
    while let Some(check) = checks.join_next().await {
        assert_eq!(check.unwrap().unwrap(), Decision::Allow);
    }
    assert_eq!(calls.load(Ordering::SeqCst), CHECKS);
    // The bound: never more than MAX callouts at the service at once (each waits at the
    // gate, until it opens, while holding its turn).
    assert_eq!(
        most.load(Ordering::SeqCst),
        MAX,
        "the others wait for a turn"
    );
    server.abort();
}

/// An answer's body that sends one byte, then nothing, ever.
struct Stalled {
    sent: bool,
}

impl hyper::body::Body for Stalled {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if std::mem::replace(&mut self.sent, true) {
            Poll::Pending
        } else {
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"{")))))
        }
    }
}

#[tokio::test]
async fn a_stalled_body_does_not_undo_the_decision_of_its_status() {
    // 200 with a body that stalls after a byte for password "slow"; 200 without a body
    // for the others.
    let (url, server) = serve_http(|req: Request<Incoming>| async move {
        let json = req.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&json).unwrap();
        let body = if json["password"] == "slow" {
            Either::Left(Stalled { sent: false })
        } else {
            Either::Right(Full::new(Bytes::new()))
        };
        Ok::<_, Infallible>(Response::new(body))
    })
    .await;
    // One callout at a time: the second check needs the turn of the first.
    let timeout = Duration::from_secs(2);
    let layer = AuthLayer::new(HttpAuth::new(url).max_concurrent(1)).timeout(timeout);
    let addr: SocketAddr = PEER.parse().unwrap();
    let start = tokio::time::Instant::now();
    let slow = Credentials::new("c1", Some("alice"), Some(b"slow"), addr);
    assert_eq!(layer.check(slow).await.unwrap(), Decision::Allow);
    let fast = Credentials::new("c2", Some("alice"), Some(b"fast"), addr);
    assert_eq!(layer.check(fast).await.unwrap(), Decision::Allow);
    let took = tokio::time::Instant::now().saturating_duration_since(start);
    assert!(took < timeout, "{took:?}");
    server.abort();
}

/// An authenticator that counts its calls and allows everyone.
fn counting(
    calls: &Arc<AtomicUsize>,
) -> impl tower::Service<Credentials, Response = Decision, Error = Infallible, Future = impl Send>
+ Clone
+ Send
+ 'static {
    let calls = Arc::clone(calls);
    service_fn(move |_: Credentials| {
        calls.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, Infallible>(Decision::Allow) }
    })
}

fn creds(id: &str) -> Credentials {
    Credentials::new(id, Some("u"), Some(b"p"), PEER.parse().unwrap())
}

#[test]
fn the_cache_is_bounded() {
    let ((), snap) = testing::run(true, || async {
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = AuthLayer::new(counting(&calls)).max_entries(2);
        for id in ["a", "b", "c"] {
            assert_eq!(layer.check(creds(id)).await.unwrap(), Decision::Allow);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(layer.cached(), 2);
        // "a" and "b" are cached; "c" was not (the cache was full), so it calls again.
        for id in ["a", "b"] {
            layer.check(creds(id)).await.unwrap();
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        layer.check(creds("c")).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        // Once "a" and "b" expire, a full cache purges them and takes "c".
        tokio::time::advance(Duration::from_secs(61)).await;
        layer.check(creds("c")).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 5);
        assert_eq!(layer.cached(), 1);
        layer.check(creds("c")).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 5);
    });
    let seen = Seen::take(&snap);
    assert_eq!(seen.counter(m::CACHE_FULL_TOTAL, &[]), 2);
    assert_eq!(seen.auth("allow", "hit"), 3);
    assert_eq!(seen.auth("allow", "miss"), 5);
}

#[test]
fn a_deny_ttl_of_zero_does_not_cache_denies() {
    testing::run(true, || async {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = Arc::clone(&calls);
        let deny = service_fn(move |_: Credentials| {
            c.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, Infallible>(Decision::Deny) }
        });
        let layer = AuthLayer::new(deny).deny_ttl(Duration::ZERO);
        for _ in 0..2 {
            assert_eq!(layer.check(creds("a")).await.unwrap(), Decision::Deny);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // With the default (5 s), the deny is cached until it expires.
        let layer = AuthLayer::new(layer.authenticator().clone());
        layer.check(creds("a")).await.unwrap();
        layer.check(creds("a")).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        tokio::time::advance(Duration::from_secs(5)).await;
        layer.check(creds("a")).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    });
}

#[test]
fn the_protocol_version_is_part_of_the_cache_key() {
    let ((), snap) = testing::run(true, || async {
        // An authenticator that lets in MQTT 5 clients only (it is told the version).
        let calls = Arc::new(AtomicUsize::new(0));
        let c = Arc::clone(&calls);
        let v5_only = service_fn(move |creds: Credentials| {
            c.fetch_add(1, Ordering::SeqCst);
            let decision = if creds.version == Version::V5 {
                Decision::Allow
            } else {
                Decision::Deny
            };
            async move {
                // A callout that takes a while: concurrent checks would share it.
                tokio::time::sleep(Duration::from_millis(10)).await;
                Ok::<_, Infallible>(decision)
            }
        });
        let layer = AuthLayer::new(v5_only);
        let v5 = creds("a").with_version(Version::V5);
        assert_eq!(layer.check(v5.clone()).await.unwrap(), Decision::Allow);
        // The same credentials over 3.1.1 and 3.1: not the 5.0 client's cached allow.
        for version in [Version::V3_1_1, Version::V3_1] {
            let creds = creds("a").with_version(version);
            assert_eq!(
                layer.check(creds).await.unwrap(),
                Decision::Deny,
                "{version:?}"
            );
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(layer.check(v5).await.unwrap(), Decision::Allow);
        assert_eq!(calls.load(Ordering::SeqCst), 3, "the 5.0 allow is a hit");
        // Nor does a 3.1.1 check share the callout in flight for 5.0.
        let (v5, v4) = tokio::join!(
            layer.check(creds("b").with_version(Version::V5)),
            layer.check(creds("b").with_version(Version::V3_1_1)),
        );
        assert_eq!(
            (v5.unwrap(), v4.unwrap()),
            (Decision::Allow, Decision::Deny)
        );
        assert_eq!(calls.load(Ordering::SeqCst), 5);
        assert_eq!(layer.cached(), 5);
    });
    let seen = Seen::take(&snap);
    assert_eq!(seen.auth("allow", "miss"), 2);
    assert_eq!(seen.auth("allow", "hit"), 1);
    assert_eq!(seen.auth("deny", "miss"), 3);
    assert_eq!(seen.counter(m::AUTH_TOTAL, &[]), 6);
}

#[tokio::test]
async fn a_waiter_takes_over_when_the_leader_is_dropped() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&calls);
    // The first callout never ends; later ones allow.
    let authn = service_fn(move |_: Credentials| {
        let first = c.fetch_add(1, Ordering::SeqCst) == 0;
        async move {
            if first {
                std::future::pending::<()>().await;
            }
            Ok::<_, Infallible>(Decision::Allow)
        }
    });
    let layer = AuthLayer::new(authn);
    let leader = tokio::spawn(layer.check(creds("a")));
    until("the leader's callout", || calls.load(Ordering::SeqCst) == 1).await;
    let waiter = tokio::spawn(layer.check(creds("a")));
    until("the waiter", || layer.pending() == 2).await;
    leader.abort();
    assert_eq!(waiter.await.unwrap().unwrap(), Decision::Allow);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(layer.pending(), 0);
    // The waiter's decision is cached.
    layer.check(creds("a")).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[test]
fn credentials_debug_redacts_the_password() {
    let c = Credentials::new(
        "c1",
        Some("alice"),
        Some(b"hunter2"),
        "192.0.2.1:1".parse::<SocketAddr>().unwrap(),
    )
    .with_version(Version::V5);
    let s = format!("{c:?}");
    assert!(!s.contains("hunter2"), "{s}");
    assert!(
        s.contains("<redacted>") && s.contains("alice") && s.contains("c1"),
        "{s}"
    );
}

#[tokio::test]
async fn static_auth_verifies_argon2_hashes() {
    let hash = StaticAuth::hash_password(b"secret");
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    let file = format!("# users\n\nalice:{hash}\n  # indented comment\n");
    let authn = StaticAuth::parse(&file).unwrap();
    assert_eq!(authn.len(), 1);
    // argon2 with its default parameters takes seconds in an unoptimized test build.
    let layer = AuthLayer::new(authn).timeout(Duration::from_secs(300));
    let addr: SocketAddr = PEER.parse().unwrap();
    let check = |user: &str, pass: Option<&[u8]>| {
        layer.check(Credentials::new("c1", Some(user), pass, addr))
    };
    let (right, wrong, unknown, none) = tokio::join!(
        check("alice", Some(b"secret")),
        check("alice", Some(b"secreT")),
        check("bob", Some(b"secret")),
        check("alice", None),
    );
    assert_eq!(right.unwrap(), Decision::Allow);
    assert_eq!(wrong.unwrap(), Decision::Deny);
    assert_eq!(unknown.unwrap(), Decision::Deny);
    assert_eq!(none.unwrap(), Decision::Deny);
}

#[test]
fn static_auth_refuses_plain_text_with_its_line() {
    const HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$bcApkbUtaybh7kdFzZIOgQ$AMiJikT93HQQclhe+ZjOzwSoVPivp5uvtKyNiJvL1Ck";
    let line = |text: &str| match StaticAuth::parse(text) {
        Err(StaticAuthError::Line { line, .. }) => line,
        other => panic!("{other:?}"),
    };
    assert_eq!(line(&format!("alice:{HASH}\n# c\nbob:hunter2\n")), 3);
    assert_eq!(line(&format!("\nalice:{HASH}\nbob\n")), 3);
    assert_eq!(line(&format!(":{HASH}\n")), 1);
    assert_eq!(line(&format!("alice:{HASH}\nalice:{HASH}\n")), 2);
    // A valid PHC string, but not argon2.
    assert_eq!(
        line("carol:$pbkdf2-sha256$i=1000$c2FsdHNhbHQ$Zm9vYmFyYmF6cXV4Zm9vYmFyYmF6cXV4\n"),
        1
    );
    let err = StaticAuth::parse("bob:hunter2").unwrap_err();
    assert_eq!(err.label(), "line");
    assert_eq!(
        err.to_string(),
        "line 1: not a PHC password hash (plain text?)"
    );
    assert_eq!(
        StaticAuth::parse(&format!("alice:{HASH}\n")).unwrap().len(),
        1
    );
    assert!(matches!(
        StaticAuth::from_file("/nonexistent/aegis-users"),
        Err(StaticAuthError::Io(_))
    ));
}

#[test]
fn static_auth_refuses_users_with_other_argon2_parameters() {
    // Argon2's defaults (m=19456, t=2), then the `argon2` tool's (argon2i, m=4096, t=3):
    // an unknown user's check could not cost what both users' checks cost.
    const DEFAULT: &str = "$argon2id$v=19$m=19456,t=2,p=1$bcApkbUtaybh7kdFzZIOgQ$AMiJikT93HQQclhe+ZjOzwSoVPivp5uvtKyNiJvL1Ck";
    const CLI: &str =
        "$argon2i$v=19$m=4096,t=3,p=1$c29tZXNhbHQ$iWh06vD8Fy27wf9npn6FXWiCX4K6pW6Ue1Bnzz07Z8A";
    let refused = |text: &str| match StaticAuth::parse(text) {
        Err(StaticAuthError::Line { line, reason }) => (line, reason),
        other => panic!("{other:?}"),
    };
    let (line, reason) = refused(&format!("alice:{DEFAULT}\n# c\nbob:{CLI}\n"));
    assert_eq!(line, 3);
    assert!(reason.contains("argon2 parameters differ"), "{reason}");
    assert_eq!(refused(&format!("bob:{CLI}\nalice:{DEFAULT}\n")).0, 2);
    // Only t differs; then only the output length (a 16-byte hash).
    let t2 = "$argon2i$v=19$m=4096,t=2,p=1$c29tZXNhbHQ$iWh06vD8Fy27wf9npn6FXWiCX4K6pW6Ue1Bnzz07Z8A";
    assert_eq!(refused(&format!("bob:{CLI}\ncarol:{t2}\n")).0, 2);
    let short = "$argon2i$v=19$m=4096,t=3,p=1$c29tZXNhbHQ$iWh06vD8Fy27wf9npn6FXQ";
    assert_eq!(refused(&format!("bob:{CLI}\ncarol:{short}\n")).0, 2);
    // Parameters argon2 refuses (less than 8 KiB of memory per lane).
    assert_eq!(
        refused("dave:$argon2id$v=19$m=4,t=1,p=1$c29tZXNhbHQ$iWh06vD8Fy27wf9npn6FXQ\n"),
        (1, "invalid argon2 parameters")
    );
    // One set of parameters, whatever the salts: loaded.
    let other_salt = CLI.replace("c29tZXNhbHQ", "b3RoZXJzYWx0");
    let auth = StaticAuth::parse(&format!("bob:{CLI}\ncarol:{other_salt}\n")).unwrap();
    assert_eq!(auth.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn refusals_are_security_events_and_denials_count_toward_a_ban() {
    use aegis_mqtt::security::{BanKey, EventKind, Security, SecurityLayer, Severity};

    let sec = Security::builder().max_auth_failures(1).build();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&calls);
    // alice/secret is allowed, user "boom" makes the authenticator fail, all else is denied.
    let authn = service_fn(move |creds: Credentials| {
        c.fetch_add(1, Ordering::SeqCst);
        async move {
            match (creds.username.as_deref(), creds.password.as_deref()) {
                (Some("alice"), Some(b"secret")) => Ok(Decision::Allow),
                (Some("boom"), _) => Err(std::io::Error::other("backend down")),
                _ => Ok(Decision::Deny),
            }
        }
    });
    let broker = service_fn(|_: MqttIo<Conn<DuplexStream>>| async { Ok::<_, BoxError>(()) });
    let svc = SecurityLayer::new(sec.clone())
        .layer(MqttLayer::new(Config::new()).layer(AuthLayer::new(authn).layer(broker)));
    let run = |peer: &str, bytes: Vec<u8>| {
        let svc = svc.clone();
        let peer = peer.parse().unwrap();
        async move {
            let (mut client, server) = tokio::io::duplex(4096);
            let conn = tokio::spawn(svc.oneshot(Conn::new(server, peer, LOCAL.parse().unwrap())));
            // A client refused at once may find the stream closed.
            let _ = client.write_all(&bytes).await;
            let mut got = Vec::new();
            let _ = client.read_to_end(&mut got).await;
            (conn.await.unwrap().unwrap_err(), got)
        }
    };

    let (err, got) = run("192.0.2.9:1", connect(false, "c9", "boom", "x")).await;
    assert_eq!(got, [0x20, 0x02, 0x00, 0x05]);
    assert_eq!(aegis_core::error::label_of(&*err), ("mqtt", "auth_error"));
    for _ in 0..2 {
        // The second is a cache hit, reported all the same.
        let (err, got) = run(PEER, connect(false, "c1", "alice", "guess")).await;
        assert_eq!(got, [0x20, 0x02, 0x00, 0x05]);
        assert_eq!(
            aegis_core::error::label_of(&*err),
            ("mqtt", "not_authorized")
        );
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // Two denials (over the limit of 1): the address is banned, and even the right password is refused
    // before the authenticator is asked.
    assert!(sec.is_banned(&BanKey::addr("192.0.2.1".parse().unwrap())));
    assert!(!sec.is_banned(&BanKey::addr("192.0.2.9".parse().unwrap())));
    let (err, _) = run(PEER, connect(false, "c1", "alice", "secret")).await;
    assert_eq!(aegis_core::error::label_of(&*err).1, "banned");
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    let events = sec.events(100);
    let auth: Vec<_> = events.iter().filter(|e| e.layer == "auth").collect();
    assert_eq!(auth.len(), 3, "{events:#?}");
    assert!(auth.iter().all(|e| e.kind == EventKind::AuthFailure));
    assert_eq!(auth[0].rule.as_deref(), Some("failed"));
    assert_eq!(auth[0].severity, Severity::Low);
    assert_eq!(auth[0].username.as_deref(), Some("boom"));
    for e in &auth[1..] {
        assert_eq!(e.rule.as_deref(), Some("denied"));
        assert_eq!(e.severity, Severity::Medium);
        assert_eq!(e.client_id.as_deref(), Some("c1"));
        assert_eq!(e.client_addr, Some(PEER.parse().unwrap()));
        assert!(!e.details.contains("guess"));
    }
    // Reported once: the security layer does not log these refusals again.
    assert!(
        !events
            .iter()
            .any(|e| matches!(e.rule.as_deref(), Some("not_authorized" | "auth_error"))),
        "{events:#?}"
    );
}

/// Lets the spawned tasks run until they wait (on the authenticator, or the clock): with
/// the clock paused, a sleep ends only once every task is idle.
async fn settle() {
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[test]
fn each_address_has_at_most_max_checks_per_addr_in_flight() {
    let ((), snap) = testing::run(true, || async {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = Arc::clone(&calls);
        // Password "good" is allowed at once; any other never gets an answer.
        let authn = service_fn(move |creds: Credentials| {
            c.fetch_add(1, Ordering::SeqCst);
            async move {
                if creds.password.as_deref() != Some(b"good") {
                    std::future::pending::<()>().await;
                }
                Ok::<_, Infallible>(Decision::Allow)
            }
        });
        let layer = AuthLayer::new(authn)
            .max_checks_per_addr(2)
            .timeout(Duration::from_secs(60));
        let guess = |pass: &str, peer: &str| {
            Credentials::new("c", Some("u"), Some(pass.as_bytes()), peer.parse().unwrap())
        };
        // A decision cached for PEER before the flood.
        assert_eq!(
            layer.check(guess("good", PEER)).await.unwrap(),
            Decision::Allow
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        // Two guesses from PEER wait on the authenticator.
        let mut waiting: Vec<_> = ["g1", "g2"]
            .into_iter()
            .map(|p| tokio::spawn(layer.check(guess(p, PEER))))
            .collect();
        settle().await;
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(layer.pending(), 2);
        assert_eq!(layer.addrs_checking(), 1);

        // A third, from another port of the same IP, is refused at once, unqueued.
        let start = tokio::time::Instant::now();
        let err = layer
            .check(guess("g3", "192.0.2.1:5000"))
            .await
            .unwrap_err();
        assert!(err.is_too_many_checks(), "{err:?}");
        assert_eq!(err.label(), "too_many_checks");
        assert_eq!(
            tokio::time::Instant::now().saturating_duration_since(start),
            Duration::ZERO
        );
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        // A cache hit needs no turn.
        assert_eq!(
            layer.check(guess("good", PEER)).await.unwrap(),
            Decision::Allow
        );
        // Another address still reaches the authenticator.
        waiting.push(tokio::spawn(layer.check(guess("g1", "192.0.2.2:4000"))));
        settle().await;
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        assert_eq!(layer.addrs_checking(), 2);

        // IPv6 clients are keyed by /64.
        for peer in ["[2001:db8::1]:1", "[2001:db8::2]:2"] {
            waiting.push(tokio::spawn(layer.check(guess("g", peer))));
        }
        settle().await;
        assert_eq!(calls.load(Ordering::SeqCst), 6);
        let err = layer
            .check(guess("g", "[2001:db8::3]:3"))
            .await
            .unwrap_err();
        assert!(err.is_too_many_checks(), "{err:?}");
        waiting.push(tokio::spawn(layer.check(guess("g", "[2001:db8:0:1::1]:1"))));
        settle().await;
        assert_eq!(calls.load(Ordering::SeqCst), 7);
        assert_eq!(layer.addrs_checking(), 4);

        // A dropped check gives its turn back: PEER is admitted again.
        waiting.remove(0).abort();
        settle().await;
        assert_eq!(layer.pending(), 5);
        waiting.push(tokio::spawn(layer.check(guess("g4", PEER))));
        settle().await;
        assert_eq!(calls.load(Ordering::SeqCst), 8);
        let err = layer.check(guess("g5", PEER)).await.unwrap_err();
        assert!(err.is_too_many_checks(), "{err:?}");

        // Once every check has timed out, no address is left and PEER is admitted again.
        tokio::time::advance(Duration::from_secs(61)).await;
        for w in waiting {
            assert!(w.await.unwrap().unwrap_err().is_timeout());
        }
        assert_eq!(layer.pending(), 0);
        assert_eq!(layer.addrs_checking(), 0);
        let again = tokio::spawn(layer.check(guess("g6", PEER)));
        settle().await;
        assert_eq!(calls.load(Ordering::SeqCst), 9);
        assert_eq!(layer.addrs_checking(), 1);
        again.abort();
        settle().await;
        assert_eq!(layer.addrs_checking(), 0);
    });
    let seen = Seen::take(&snap);
    assert_eq!(seen.auth("too_many_checks", "refused"), 3);
    assert_eq!(seen.auth("allow", "hit"), 1);
}

#[tokio::test(start_paused = true)]
async fn too_many_checks_are_reported_with_medium_severity_and_count_toward_a_ban() {
    use aegis_mqtt::security::{BanKey, EventKind, Security, SecurityLayer, Severity};

    let sec = Security::builder().max_auth_failures(1).build();
    // An authenticator that never answers.
    let authn = service_fn(|_: Credentials| async {
        std::future::pending::<()>().await;
        Ok::<_, Infallible>(Decision::Allow)
    });
    let layer = AuthLayer::new(authn).max_checks_per_addr(1);
    let broker = service_fn(|_: MqttIo<Conn<DuplexStream>>| async { Ok::<_, BoxError>(()) });
    let svc = SecurityLayer::new(sec.clone())
        .layer(MqttLayer::new(Config::new()).layer(layer.clone().layer(broker)));
    let open = |port: u16, pass: &str, v5: bool| {
        let svc = svc.clone();
        let peer = SocketAddr::new("192.0.2.1".parse().unwrap(), port);
        let bytes = connect(v5, "c1", "alice", pass);
        async move {
            let (mut client, server) = tokio::io::duplex(4096);
            let conn = tokio::spawn(svc.oneshot(Conn::new(server, peer, LOCAL.parse().unwrap())));
            let _ = client.write_all(&bytes).await;
            (client, conn)
        }
    };

    // The first check waits on the authenticator.
    let (_first_client, first) = open(4000, "g0", false).await;
    until("the first check", || layer.pending() == 1).await;
    // Two more from the same address are refused at once, the version-correct way.
    for (port, v5, connack) in [
        (4001, false, &[0x20, 0x02, 0x00, 0x05][..]),
        (4002, true, &[0x20, 0x03, 0x00, 0x87, 0x00][..]),
    ] {
        assert_eq!(layer.pending(), 1);
        assert!(!sec.is_banned(&BanKey::addr("192.0.2.1".parse().unwrap())));
        let (mut client, conn) = open(port, "g", v5).await;
        let mut got = Vec::new();
        let _ = client.read_to_end(&mut got).await;
        assert_eq!(got, connack);
        let err = conn.await.unwrap().unwrap_err();
        assert_eq!(aegis_core::error::label_of(&*err), ("mqtt", "auth_error"));
    }
    // Two refusals over the limit of 1: the address is banned for flooding.
    assert!(sec.is_banned(&BanKey::addr("192.0.2.1".parse().unwrap())));
    // The ban closes the connection still waiting, and its check gives its turn back.
    let err = first.await.unwrap().unwrap_err();
    assert_eq!(
        aegis_core::error::label_of(&*err),
        ("security", "closed_by_ban")
    );
    assert_eq!(layer.pending(), 0);

    let events = sec.events(100);
    let auth: Vec<_> = events.iter().filter(|e| e.layer == "auth").collect();
    assert_eq!(auth.len(), 2, "{events:#?}");
    for e in auth {
        assert_eq!(e.kind, EventKind::AuthFailure);
        assert_eq!(e.rule.as_deref(), Some("too_many_checks"));
        assert_eq!(e.severity, Severity::Medium);
    }
    assert_eq!(layer.addrs_checking(), 0);
}

#[test]
fn max_checks_per_addr_keys_clients_by_key_by() {
    let ((), snap) = testing::run(true, || async {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = Arc::clone(&calls);
        // An authenticator that never answers.
        let authn = service_fn(move |_: Credentials| {
            c.fetch_add(1, Ordering::SeqCst);
            async {
                std::future::pending::<()>().await;
                Ok::<_, Infallible>(Decision::Allow)
            }
        });
        let layer = AuthLayer::new(authn)
            .max_checks_per_addr(1)
            .key_by(aegis_core::KeyBy::new(24, 48));
        let from = |peer: &str| Credentials::new("c", Some("u"), Some(b"p"), peer.parse().unwrap());
        let mut waiting = vec![
            tokio::spawn(layer.check(from("192.0.2.1:1"))),
            tokio::spawn(layer.check(from("[2001:db8:0:1::1]:1"))),
        ];
        settle().await;
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // The same /24 and the same /48: one client each.
        for peer in ["192.0.2.200:2", "[2001:db8:0:2::1]:2"] {
            let err = layer.check(from(peer)).await.unwrap_err();
            assert!(err.is_too_many_checks(), "{peer}: {err:?}");
        }
        // Another /24 is another client.
        waiting.push(tokio::spawn(layer.check(from("192.0.3.1:1"))));
        settle().await;
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(layer.addrs_checking(), 3);
        for w in &waiting {
            w.abort();
        }
        settle().await;
        assert_eq!(layer.addrs_checking(), 0);
    });
    assert_eq!(Seen::take(&snap).auth("too_many_checks", "refused"), 2);
}
