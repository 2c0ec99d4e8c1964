//! `Unavailable`: a client whose broker cannot be reached gets the version-correct
//! "server unavailable" CONNACK from the gateway, then EOF. Real loopback sockets:
//! `client -> MqttLayer -> Proxy(on_connect_error(Unavailable)) -> upstream`.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use aegis_core::error::label_of;
use aegis_core::metrics::testing::run;
use aegis_core::metrics::{REJECTIONS_TOTAL, testing};
use aegis_core::proxy::{ConnectFuture, Proxy, TcpConnect, Transferred};
use aegis_core::testing::dead_port;
use aegis_core::{BoxError, Conn};
use aegis_layers::circuit_breaker::{CircuitBreakerLayer, CircuitState};
use aegis_mqtt::layer::{MqttLayer, Unavailable};
use common::{connect_v3, connect_v4, connect_v5};
use metrics_util::debugging::Snapshotter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::{Layer, Service, ServiceExt};

const V3_UNAVAILABLE: [u8; 4] = [0x20, 0x02, 0x00, 0x03];
const V5_UNAVAILABLE: [u8; 5] = [0x20, 0x03, 0x00, 0x88, 0x00];

/// One client over a real loopback connection: sends `sent`, reads until EOF, closes.
/// Returns what it read and what the gateway service returned.
async fn client<S>(svc: S, sent: &[u8]) -> (Vec<u8>, Result<Transferred, BoxError>)
where
    S: Service<Conn<TcpStream>, Response = Transferred, Error = BoxError>,
{
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front_addr = front.local_addr().unwrap();
    let mut client = TcpStream::connect(front_addr).await.unwrap();
    let (io, peer) = front.accept().await.unwrap();
    client.write_all(sent).await.unwrap();
    let read = async {
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        // Done too: lets a proxied connection end. The gateway may be gone already.
        let _ = client.shutdown().await;
        got
    };
    tokio::join!(read, svc.oneshot(Conn::new(io, peer, front_addr)))
}

/// Counts the connects that reach the TCP connector.
#[derive(Clone)]
struct Counting {
    inner: TcpConnect,
    connects: Arc<AtomicUsize>,
}

impl Service<()> for Counting {
    type Response = TcpStream;
    type Error = aegis_core::proxy::ProxyError;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, (): ()) -> Self::Future {
        self.connects.fetch_add(1, Ordering::SeqCst);
        self.inner.call(())
    }
}

fn unavailable_count(snap: &Snapshotter) -> u64 {
    testing::counter(
        snap,
        REJECTIONS_TOTAL,
        &[("layer", "mqtt"), ("reason", "server_unavailable")],
    )
}

#[test]
fn refused_broker_answers_each_version_with_its_connack_then_eof() {
    let ((v4, v5, v3), snap) = run(false, || async {
        // Held to the end: no front listener of `client` can get the port.
        let (_dead, broker) = dead_port();
        let svc =
            MqttLayer::default().layer(Proxy::new(broker).on_connect_error(Unavailable::new()));
        let v4 = client(svc.clone(), &connect_v4()).await;
        let v5 = client(svc.clone(), &connect_v5()).await;
        let v3 = client(svc, &connect_v3()).await;
        (v4, v5, v3)
    });
    // Exactly the CONNACK: read_to_end returned, so EOF followed it.
    assert_eq!(v4.0, V3_UNAVAILABLE, "3.1.1");
    assert_eq!(v5.0, V5_UNAVAILABLE, "5.0");
    assert_eq!(v3.0, V3_UNAVAILABLE, "3.1");
    for (_, res) in [v4, v5, v3] {
        let err = res.unwrap_err();
        assert_eq!(label_of(&*err), ("proxy", "connect_refused"), "{err}");
    }
    // One capture: a snapshot takes the counts it reads.
    let c = testing::capture(&snap);
    assert_eq!(
        c.counter(
            REJECTIONS_TOTAL,
            &[("layer", "mqtt"), ("reason", "server_unavailable")]
        ),
        3
    );
    // The gateway's own CONNACK, written through the same stream as the broker's would
    // be, is no refusal of the broker's.
    assert_eq!(c.counter("aegis_mqtt_broker_refusals_total", &[]), 0);
}

#[test]
fn the_proxy_connect_timeout_gets_the_same_answer() {
    let ((answer, err, waited), snap) = run(true, || async {
        // A listener with a full accept queue: the kernel drops further SYNs, so a
        // connect hangs until its timeout.
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let full = sock.listen(0).unwrap();
        let addr = full.local_addr().unwrap();
        let mut fillers = Vec::new();
        loop {
            match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                Ok(s) => fillers.push(s),
                Err(_) => break,
            }
            assert!(fillers.len() < 64, "accept queue never filled");
        }
        let proxy = Proxy::new(addr)
            .connect_timeout(Duration::from_secs(3))
            .on_connect_error(Unavailable::new());
        let start = tokio::time::Instant::now();
        let (answer, res) = client(MqttLayer::default().layer(proxy), &connect_v5()).await;
        let waited = tokio::time::Instant::now().saturating_duration_since(start);
        drop((full, fillers));
        (answer, res.unwrap_err(), waited)
    });
    assert_eq!(answer, V5_UNAVAILABLE);
    assert_eq!(label_of(&*err), ("proxy", "connect_timeout"), "{err}");
    // Paused clock: the answer came when the connect timed out, not later.
    assert_eq!(waited, Duration::from_secs(3));
    assert_eq!(unavailable_count(&snap), 1);
}

#[test]
fn an_open_circuit_answers_at_once_without_a_connect_and_recovery_connects_again() {
    let ((), snap) = run(true, || async {
        // Refused until the broker comes back on this very socket (no other socket can
        // take the port meanwhile).
        let (dead, broker) = dead_port();
        let connects = Arc::new(AtomicUsize::new(0));
        let breaker = CircuitBreakerLayer::builder("broker")
            .consecutive_failures(Some(3))
            .open_for(Duration::from_secs(30))
            .build();
        let handle = breaker.handle();
        let connector = breaker.layer(Counting {
            inner: TcpConnect::new(broker),
            connects: Arc::clone(&connects),
        });
        let svc = MqttLayer::default()
            .layer(Proxy::with_connector(connector).on_connect_error(Unavailable::new()));

        // Three refused connects trip the circuit; each client is answered.
        for n in 1..=3 {
            assert_eq!(handle.state(), CircuitState::Closed);
            let (answer, res) = client(svc.clone(), &connect_v4()).await;
            assert_eq!(answer, V3_UNAVAILABLE);
            assert_eq!(label_of(&*res.unwrap_err()), ("proxy", "connect_refused"));
            assert_eq!(connects.load(Ordering::SeqCst), n);
        }
        assert_eq!(handle.state(), CircuitState::Open);

        // Open: both versions get their CONNACK with no connect attempt at all, and no
        // time passes on the paused clock.
        let start = tokio::time::Instant::now();
        for (connect, expected) in [
            (connect_v4(), &V3_UNAVAILABLE[..]),
            (connect_v5(), &V5_UNAVAILABLE[..]),
        ] {
            let (answer, res) = client(svc.clone(), &connect).await;
            assert_eq!(answer, expected);
            let err = res.unwrap_err();
            assert_eq!(label_of(&*err), ("circuit_breaker", "open"), "{err}");
        }
        assert_eq!(connects.load(Ordering::SeqCst), 3);
        assert_eq!(
            tokio::time::Instant::now().saturating_duration_since(start),
            Duration::ZERO
        );

        // The broker comes back on its port; once the circuit lets a probe through,
        // the client reaches it and gets the broker's own CONNACK.
        let up = dead.listen(16).expect("listen on the broker's port");
        let broker_task = tokio::spawn(async move {
            let (mut s, _) = up.accept().await.unwrap();
            let mut connect = vec![0u8; connect_v4().len()];
            s.read_exact(&mut connect).await.unwrap();
            s.write_all(&[0x20, 0x02, 0x00, 0x00]).await.unwrap();
            s.shutdown().await.unwrap();
            connect
        });
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(handle.state(), CircuitState::HalfOpen);
        let (answer, res) = client(svc, &connect_v4()).await;
        assert_eq!(answer, [0x20, 0x02, 0x00, 0x00], "the broker's CONNACK");
        assert_eq!(broker_task.await.unwrap(), connect_v4());
        res.unwrap();
        assert_eq!(connects.load(Ordering::SeqCst), 4);
        assert_eq!(handle.state(), CircuitState::Closed);
    });
    let captured = testing::capture(&snap);
    assert_eq!(
        captured.counter(
            REJECTIONS_TOTAL,
            &[("layer", "mqtt"), ("reason", "server_unavailable")]
        ),
        5
    );
    assert_eq!(
        captured.counter(
            REJECTIONS_TOTAL,
            &[("layer", "circuit_breaker"), ("reason", "open")]
        ),
        2
    );
}

/// The stack of the circuit breaker's docs, polled ready when a client connects as
/// `serve` does: the breaker (around the connector, judged by the broker's first byte)
/// admits a client when the proxy connects for it, after its CONNECT. A client that
/// connects and never sends a CONNECT takes no half-open probe, so its silence past the
/// probe timeout is no broker failure, and the next real client closes the circuit.
#[test]
fn a_silent_client_takes_no_half_open_probe_and_a_connect_closes_the_circuit() {
    let ((), _) = run(true, || async {
        let (dead, broker) = dead_port();
        let breaker = CircuitBreakerLayer::builder("broker")
            .consecutive_failures(Some(1))
            .open_for(Duration::from_secs(2)) // and the probe timeout
            .build();
        let handle = breaker.handle();
        let connector = breaker.judge_by_first_read().layer(TcpConnect::new(broker));
        let svc = MqttLayer::default()
            .layer(Proxy::with_connector(connector).on_connect_error(Unavailable::new()));

        // A refused connect trips the circuit; open, it answers at once.
        let (answer, _) = client(svc.clone(), &connect_v4()).await;
        assert_eq!(answer, V3_UNAVAILABLE);
        assert_eq!(handle.state(), CircuitState::Open);
        let (answer, res) = client(svc.clone(), &connect_v4()).await;
        assert_eq!(answer, V3_UNAVAILABLE);
        assert_eq!(label_of(&*res.unwrap_err()), ("circuit_breaker", "open"));

        // The broker comes back and answers each CONNECT; the open period ends.
        let up = dead.listen(16).expect("listen on the broker's port");
        tokio::spawn(async move {
            loop {
                let (mut s, _) = up.accept().await.unwrap();
                let mut connect = vec![0u8; connect_v4().len()];
                s.read_exact(&mut connect).await.unwrap();
                s.write_all(&[0x20, 0x02, 0x00, 0x00]).await.unwrap();
                s.shutdown().await.unwrap();
            }
        });
        tokio::time::advance(Duration::from_secs(2)).await;

        // A client connects, is polled ready and called, and sends nothing for longer
        // than the probe timeout.
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front_addr = front.local_addr().unwrap();
        let silent = TcpStream::connect(front_addr).await.unwrap();
        let (io, peer) = front.accept().await.unwrap();
        let mut accepted = svc.clone();
        let ready = ServiceExt::<Conn<TcpStream>>::ready(&mut accepted);
        let held = tokio::spawn(ready.await.unwrap().call(Conn::new(io, peer, front_addr)));
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(
            handle.state(),
            CircuitState::HalfOpen,
            "the silent client's probe"
        );

        // A real client is the probe: the broker's CONNACK, and the circuit closes.
        let (answer, res) = client(svc, &connect_v4()).await;
        assert_eq!(answer, [0x20, 0x02, 0x00, 0x00], "the broker's CONNACK");
        res.unwrap();
        assert_eq!(handle.state(), CircuitState::Closed);
        held.abort();
        drop(silent);
    });
}
